//! Authentication, as the real SCP and its Open API clients do it:
//!
//! - `GET /janus/v2/public-key` and `GET /janus/public-key` answer
//!   `{"public_key": "<hex RSA modulus>"}` (exponent 65537);
//! - `POST /janus/authenticate` takes the password RSA-encrypted (PKCS#1
//!   v1.5) with that key and hex-encoded; the mock decrypts it with its
//!   private key and refuses a wrong password (or a clear-text one); the
//!   answer is `{"access": {"token": {"id", "expires_in"}}}`;
//! - every other call carries `Authorization: Token <id>` (valid for
//!   [`super::ScpConfig::token_ttl`]), or is signed with the account's
//!   access key and secret key (`AWS4-HMAC-SHA256`, as `sangfor_scp.auth.ec2`
//!   signs: canonical request `METHOD\npath\n\nx-amz-date:<date>\n\nx-amz-date\n<sha256(body)>`,
//!   scope `<yyyymmdd>/<region>/<service>/aws4_request`, header `X-Amz-Date`).
//!
//! The key pair is a fixed test key (`test-rsa-key.txt`), never a secret.

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Pkcs1v15Encrypt, RsaPrivateKey};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::ScpPlatform;
use super::envelope::{ScpError, ScpResult, UNAUTHORIZED, ok, parse_body};
use crate::ids::new_uuid;

const KEY_FILE: &str = include_str!("test-rsa-key.txt");

/// How far a signed request's `X-Amz-Date` may be from the mock's clock.
const MAX_SKEW_SECS: i64 = 15 * 60;

/// The mock's RSA private key (parsed once).
pub fn private_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let field = |name: &str| {
            let line = KEY_FILE
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("test key lacks {name}"));
            BigUint::parse_bytes(line.trim().as_bytes(), 16)
                .unwrap_or_else(|| panic!("test key {name} is not hex"))
        };
        let key = RsaPrivateKey::from_components(
            field("n"),
            BigUint::from(65537u32),
            field("d"),
            vec![field("p"), field("q")],
        )
        .expect("test key components");
        key.validate().expect("test key is valid");
        key
    })
}

/// The public modulus as the platform hands it out (hex).
pub fn public_modulus_hex() -> String {
    private_key().n().to_str_radix(16)
}

#[derive(Deserialize)]
struct AuthBody {
    auth: AuthInner,
}

#[derive(Deserialize)]
struct AuthInner {
    #[serde(rename = "passwordCredentials")]
    password_credentials: Credentials,
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

/// `GET /janus/public-key` and `GET /janus/v2/public-key`
pub async fn public_key() -> ScpResult {
    ok(json!({"public_key": public_modulus_hex()}))
}

/// Hex decoding (either case); `None` when not hex.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let t = text.trim().as_bytes();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    t.chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A password as clients send it to this mock: RSA-encrypted (PKCS#1
/// v1.5) with its public key, hex-encoded (for in-process tests).
pub fn encrypt_password(password: &str) -> String {
    let public = rsa::RsaPublicKey::from(private_key());
    let mut rng = rsa::rand_core::OsRng;
    let c = public
        .encrypt(&mut rng, Pkcs1v15Encrypt, password.as_bytes())
        .expect("the password fits the key");
    hex(&c)
}

/// The clear password inside an RSA PKCS#1 v1.5 hex ciphertext.
fn decrypt_password(ciphertext_hex: &str) -> Option<String> {
    let c = hex_decode(ciphertext_hex)?;
    let plain = private_key().decrypt(Pkcs1v15Encrypt, &c).ok()?;
    String::from_utf8(plain).ok()
}

fn refused_login(message: &str) -> ScpError {
    ScpError::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED, message)
}

/// `POST /janus/authenticate`
pub async fn authenticate(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> ScpResult {
    let body: AuthBody = parse_body(&body)?;
    let creds = body.auth.password_credentials;
    let (user, password, ttl) = {
        let c = scp.config();
        (c.username.clone(), c.password.clone(), c.token_ttl)
    };
    let Some(clear) = decrypt_password(&creds.password) else {
        return Err(refused_login(
            "The password must be RSA-encrypted (PKCS#1 v1.5) with the key of \
             GET /janus/public-key and hex-encoded",
        ));
    };
    if creds.username != user || clear != password {
        return Err(refused_login("The username or password is incorrect"));
    }
    let token = new_uuid();
    scp.tokens_lock()
        .insert(token.clone(), Instant::now() + ttl);
    scp.logins
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ok(json!({"access": {"token": {"id": token, "expires_in": ttl.as_secs()}}}))
}

/// HMAC-SHA256.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Unix seconds of `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(d: &str) -> Option<i64> {
    let b = d.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| d.get(r)?.parse::<i64>().ok();
    let (y, m, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Checks an `AWS4-HMAC-SHA256` signature; `Err` says why it is refused.
pub fn verify_signature(
    scp: &ScpPlatform,
    authorization: &str,
    amz_date: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(), String> {
    let rest = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not an AWS4-HMAC-SHA256 signature")?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let (credential, signed, signature) = match (credential, signed, signature) {
        (Some(c), Some(s), Some(g)) => (c, s, g),
        _ => return Err("Credential, SignedHeaders and Signature are required".into()),
    };
    if signed != "x-amz-date" {
        return Err(format!("unsupported SignedHeaders {signed}"));
    }
    let amz_date = amz_date.ok_or("the X-Amz-Date header is missing")?;
    let when = parse_amz_date(amz_date).ok_or("X-Amz-Date is not YYYYMMDDTHHMMSSZ")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if (now - when).abs() > MAX_SKEW_SECS {
        return Err("X-Amz-Date is too far from the platform's clock".into());
    }
    let mut scope = credential.split('/');
    let (ak, date, region, service, term) = (
        scope.next().unwrap_or_default(),
        scope.next().unwrap_or_default(),
        scope.next().unwrap_or_default(),
        scope.next().unwrap_or_default(),
        scope.next().unwrap_or_default(),
    );
    if term != "aws4_request" || !amz_date.starts_with(date) || date.len() != 8 {
        return Err("malformed credential scope".into());
    }
    let secret = {
        let c = scp.config();
        if c.access_key.is_empty() || ak != c.access_key {
            return Err("unknown access key".into());
        }
        c.secret_key.clone()
    };
    let canonical = [
        method.to_ascii_uppercase(),
        path.to_string(),
        String::new(),
        format!("x-amz-date:{amz_date}\n"),
        "x-amz-date".into(),
        hex(&Sha256::digest(body)),
    ]
    .join("\n");
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = [
        "AWS4-HMAC-SHA256".to_string(),
        amz_date.to_string(),
        scope,
        hex(&Sha256::digest(canonical.as_bytes())),
    ]
    .join("\n");
    let k = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac_sha256(&k, region.as_bytes());
    let k = hmac_sha256(&k, service.as_bytes());
    let k = hmac_sha256(&k, b"aws4_request");
    let expected = hex(&hmac_sha256(&k, to_sign.as_bytes()));
    if expected != signature.to_ascii_lowercase() {
        return Err("the signature does not match".into());
    }
    Ok(())
}

fn unauthorized(message: impl Into<String>) -> Response {
    ScpError::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED, message).into_response()
}

/// Middleware: requires a valid `Authorization: Token <id>` header or an
/// access-key signature.
pub async fn require_token(
    State(scp): State<Arc<ScpPlatform>>,
    req: Request,
    next: Next,
) -> Response {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    if auth.starts_with("AWS4-HMAC-SHA256 ") {
        let amz_date = req
            .headers()
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, 64 << 20).await else {
            return ScpError::invalid("unreadable request body").into_response();
        };
        return match verify_signature(&scp, &auth, amz_date.as_deref(), &method, &path, &bytes) {
            Ok(()) => {
                next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                    .await
            }
            Err(why) => unauthorized(format!("Access key authentication failed: {why}")),
        };
    }
    let token = auth.strip_prefix("Token ").map(|t| t.trim().to_string());
    let valid = token.is_some_and(|t| {
        let mut tokens = scp.tokens_lock();
        match tokens.get(&t) {
            Some(expiry) if *expiry > Instant::now() => true,
            Some(_) => {
                tokens.remove(&t);
                false
            }
            None => false,
        }
    });
    if valid {
        next.run(req).await
    } else {
        unauthorized("Authentication required: missing, unknown or expired token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_key_round_trips_a_password() {
        let key = private_key();
        let public = rsa::RsaPublicKey::from(key);
        let mut rng = rsa::rand_core::OsRng;
        let c = public
            .encrypt(&mut rng, Pkcs1v15Encrypt, b"admin-password")
            .unwrap();
        assert_eq!(
            decrypt_password(&hex(&c)).as_deref(),
            Some("admin-password")
        );
        assert_eq!(decrypt_password("admin-password"), None);
        assert_eq!(public_modulus_hex().len(), 512);
    }

    #[test]
    fn amz_dates_parse() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20240229T120000Z"), Some(1_709_208_000));
        assert_eq!(parse_amz_date("2024-02-29"), None);
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
