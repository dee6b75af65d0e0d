//! Token authentication: `GET /janus/public-key`, `POST /janus/authenticate`
//! and the `Authorization: Token <id>` check on every other call.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::ScpPlatform;
use super::envelope::{ScpError, ScpResult, UNAUTHORIZED, ok, parse_body};
use crate::ids::new_uuid;

/// The RSA public key handed to clients (the mock does not hold the private
/// key: see the README on how passwords are checked).
pub const PUBLIC_KEY_PEM: &str = include_str!("public-key.pem");

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

/// `GET /janus/public-key`
pub async fn public_key() -> ScpResult {
    ok(json!({"public_key": PUBLIC_KEY_PEM}))
}

/// Whether `password` is an RSA-2048 ciphertext in hex or base64 (which the
/// mock accepts without decrypting).
fn looks_rsa_encrypted(password: &str) -> bool {
    let p = password.trim();
    let hex = p.len() == 512 && p.bytes().all(|c| c.is_ascii_hexdigit());
    let b64 = p.len() == 344
        && p.ends_with('=')
        && p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=');
    hex || b64
}

/// `POST /janus/authenticate`
pub async fn authenticate(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> ScpResult {
    let body: AuthBody = parse_body(&body)?;
    let creds = body.auth.password_credentials;
    let (user, password, ttl) = {
        let c = scp.config();
        (c.username.clone(), c.password.clone(), c.token_ttl)
    };
    if creds.username != user
        || !(creds.password == password || looks_rsa_encrypted(&creds.password))
    {
        return Err(ScpError::new(
            StatusCode::UNAUTHORIZED,
            UNAUTHORIZED,
            "The username or password is incorrect",
        ));
    }
    let token = new_uuid();
    scp.tokens_lock()
        .insert(token.clone(), Instant::now() + ttl);
    ok(json!({"access": {"token": {"id": token, "expires_in": ttl.as_secs()}}}))
}

/// Middleware: requires a valid `Authorization: Token <id>` header.
pub async fn require_token(
    State(scp): State<Arc<ScpPlatform>>,
    req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Token "))
        .map(|t| t.trim().to_string());
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
        ScpError::new(
            StatusCode::UNAUTHORIZED,
            UNAUTHORIZED,
            "Authentication required: missing, unknown or expired token",
        )
        .into_response()
    }
}
