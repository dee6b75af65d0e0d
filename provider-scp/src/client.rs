//! The janus HTTP client: auth, the `{code, message, data}` envelope,
//! asynchronous tasks and paged lists, as the platform and its Open API
//! clients (`sangfor-scp`) speak them.
//!
//! Auth: with an access key ([`ScpOptions::access_key`]) every request is
//! signed (`AWS4-HMAC-SHA256` over method, path, `X-Amz-Date` and the
//! body's SHA-256, as `sangfor_scp.auth.ec2` does). Otherwise the client
//! logs in: `GET /janus/v2/public-key` (falling back to
//! `/janus/public-key`) gives the RSA modulus in hex (exponent 65537), the
//! password goes RSA-encrypted (PKCS#1 v1.5), hex-encoded, to
//! `POST /janus/authenticate`, and the token is sent as
//! `Authorization: Token <id>`; it is renewed before `expires_in` runs out
//! and on any 401.
//!
//! Tasks go `waiting → doing → finish | failure` (or `canceled`); a
//! failure carries the platform's error text in `description`. Lists page
//! from `page_num=0` (`page_size` ≤ 100) until `next_page_num` is `""`.
//!
//! Retries: HTTP 502, 503, 504 and 429 and connection failures are
//! retryable errors; idempotent calls (every `GET`, so task polling and
//! paged lists too) go through [`provider_kit::retry()`] with
//! [`ScpOptions::retry`]. Calls that change something are sent once.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Pkcs1v15Encrypt, RsaPublicKey};
use sha2::{Digest, Sha256};

use provider_api::{Error, ErrorKind, Result};
use provider_kit::poll::{self, Poll, PollPolicy};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::api::{AuthAnswer, Envelope, Page, Task, TaskRef, codes, says_cbt_expired};
use crate::options::{ScpOptions, Secret};

/// A logged-in janus client. Cheap to share behind an `Arc`.
pub struct ScpClient {
    http: reqwest::Client,
    base: String,
    username: String,
    password: Secret,
    /// The token and when to renew it.
    token: Mutex<Option<(Secret, Option<Instant>)>>,
    options: ScpOptions,
}

impl std::fmt::Debug for ScpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScpClient")
            .field("base", &self.base)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Turns an envelope error into the contract's error kind.
pub fn scp_error(status: StatusCode, code: i64, message: &str, call: &str) -> Error {
    let kind = match code {
        _ if says_cbt_expired(message) => ErrorKind::ChangeTrackingLost,
        codes::UNAUTHORIZED => ErrorKind::Auth,
        codes::NOT_FOUND => ErrorKind::NotFound,
        codes::CONFLICT | codes::REFUSED | codes::REVERT_MODE | codes::BASE_CBT_UNAVAILABLE => {
            ErrorKind::Refused
        }
        codes::CBT_DISABLED | codes::CHECKPOINT_INVALID => ErrorKind::ChangeTrackingLost,
        codes::LEASE_EXPIRED => ErrorKind::LeaseLost,
        _ if status == StatusCode::UNAUTHORIZED => ErrorKind::Auth,
        _ if status == StatusCode::NOT_FOUND => ErrorKind::NotFound,
        _ => ErrorKind::Platform,
    };
    let retryable = transient(status);
    Error::new(
        kind,
        format!(
            "SCP answered code {code} (HTTP {}): {message}",
            status.as_u16()
        ),
    )
    .api_call(call)
    .retryable(retryable)
    .with_platform_code(code.to_string())
}

/// Whether an HTTP status says "try again later" (a busy platform or a
/// gateway in front of it), not "this request is wrong".
pub fn transient(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS
    )
}

/// Whether an error is the platform's "The VM CBT has expired" answer.
pub fn is_cbt_expired(e: &Error) -> bool {
    e.kind() == ErrorKind::ChangeTrackingLost && says_cbt_expired(e.message())
}

/// The envelope code of an error built by [`scp_error`], if any.
pub fn error_code(e: &Error) -> Option<i64> {
    e.platform_code()?.parse().ok()
}

impl ScpClient {
    /// A client (not yet logged in).
    pub fn new(options: &ScpOptions) -> Result<Self> {
        let http = provider_kit::http_client(&provider_kit::HttpClientOptions {
            platform: "SCP",
            connect_timeout: options.request_timeout,
            timeout: Some(options.request_timeout),
            read_timeout: None,
            tls_ca: options.api_ca.as_deref(),
        })?;
        Ok(ScpClient {
            http,
            base: options.base_url.trim_end_matches('/').to_owned(),
            username: options.username.clone(),
            password: options.password.clone(),
            token: Mutex::new(None),
            options: options.clone(),
        })
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ScpOptions {
        &self.options
    }

    /// The platform's RSA public key: `GET /janus/v2/public-key`, then
    /// `GET /janus/public-key` (older platforms), each answering the
    /// modulus in hex; the exponent is 65537.
    pub async fn public_key(&self) -> Result<RsaPublicKey> {
        #[derive(serde::Deserialize)]
        struct Key {
            public_key: String,
        }
        let key: Key = match self
            .send(Method::GET, "/janus/v2/public-key", &[], None, None)
            .await
        {
            Ok(k) => k,
            Err(_) => {
                self.send(Method::GET, "/janus/public-key", &[], None, None)
                    .await?
            }
        };
        let hex = key.public_key.trim().trim_end_matches("\\n").trim();
        let n = BigUint::parse_bytes(hex.as_bytes(), 16).ok_or_else(|| {
            Error::new(
                ErrorKind::Platform,
                "the SCP public key is not a hex RSA modulus",
            )
            .api_call("GET /janus/public-key")
        })?;
        RsaPublicKey::new(n, BigUint::from(65537u32)).map_err(|e| {
            Error::new(ErrorKind::Platform, "the SCP public key is not usable")
                .api_call("GET /janus/public-key")
                .with_source(e)
        })
    }

    /// Log in (`POST /janus/authenticate`) with the password RSA-encrypted
    /// (PKCS#1 v1.5) with [`Self::public_key`] and hex-encoded. Nothing to
    /// do with an access key (requests are signed).
    pub async fn login(&self) -> Result<()> {
        if self.signer().is_some() {
            return Ok(());
        }
        let key = self.public_key().await?;
        let mut rng = rsa::rand_core::OsRng;
        let limit = key.size().saturating_sub(11);
        if self.password.expose().len() > limit {
            return Err(Error::new(
                ErrorKind::Auth,
                format!(
                    "the password is longer than the platform's RSA key allows ({limit} bytes)"
                ),
            ));
        }
        let encrypted = key
            .encrypt(&mut rng, Pkcs1v15Encrypt, self.password.expose().as_bytes())
            .map_err(|e| Error::new(ErrorKind::Auth, "encrypting the password").with_source(e))?;
        let body = json!({"auth": {"passwordCredentials": {
            "username": self.username, "password": hex(&encrypted)}}});
        let answer: AuthAnswer = self
            .send(Method::POST, "/janus/authenticate", &[], Some(&body), None)
            .await?;
        // Renew a little before the platform's lifetime runs out.
        let renew_at = answer.access.token.expires_in.map(|secs| {
            let ttl = Duration::from_secs_f64(secs.max(0.0));
            Instant::now() + ttl - (ttl / 10).min(Duration::from_secs(60))
        });
        *self.token.lock().await = Some((Secret::new(answer.access.token.id), renew_at));
        Ok(())
    }

    /// Forget the token.
    pub async fn logout(&self) {
        *self.token.lock().await = None;
    }

    fn signer(&self) -> Option<(&str, &Secret)> {
        match (&self.options.access_key, &self.options.secret_key) {
            (Some(ak), Some(sk)) if !ak.is_empty() => Some((ak.as_str(), sk)),
            _ => None,
        }
    }

    async fn token(&self) -> Result<Secret> {
        let current = self.token.lock().await.clone();
        match current {
            Some((t, None)) => return Ok(t),
            Some((t, Some(at))) if Instant::now() < at => return Ok(t),
            _ => {}
        }
        self.login().await?;
        self.token
            .lock()
            .await
            .clone()
            .map(|(t, _)| t)
            .ok_or_else(|| Error::new(ErrorKind::Auth, "no token after login"))
    }

    /// One call with the token; logs in again once on 401. A `GET` is
    /// retried on retryable errors ([`ScpOptions::retry`]).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<T> {
        if method != Method::GET {
            return self.call_once(method, path, query, body).await;
        }
        let what = format!("GET {path}");
        provider_kit::retry(&self.options.retry, &what, |_| {
            self.call_once(Method::GET, path, query, body)
        })
        .await
    }

    async fn call_once<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<T> {
        if self.signer().is_some() {
            return self.send(method, path, query, body, None).await;
        }
        let token = self.token().await?;
        match self
            .send(method.clone(), path, query, body, Some(&token))
            .await
        {
            Err(e) if e.kind() == ErrorKind::Auth => {
                self.login().await?;
                let token = self.token().await?;
                self.send(method, path, query, body, Some(&token)).await
            }
            r => r,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        token: Option<&Secret>,
    ) -> Result<T> {
        let call = format!("{method} {path}");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(query);
        let bytes = body.map(|b| b.to_string().into_bytes());
        if let Some(t) = token {
            req = req.header("Authorization", format!("Token {}", t.expose()));
        } else if let Some((ak, sk)) = self
            .signer()
            .filter(|_| !path.starts_with("/janus/authenticate"))
        {
            let (authorization, amz_date) = sign(
                ak,
                sk.expose(),
                &self.options.region,
                &self.options.service,
                method_name(&call),
                path,
                bytes.as_deref().unwrap_or_default(),
                SystemTime::now(),
            );
            req = req
                .header("Authorization", authorization)
                .header("X-Amz-Date", amz_date);
        }
        if let Some(b) = bytes {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else {
                ErrorKind::Platform
            };
            // Connection refused or reset, timeouts: worth another try
            // (for idempotent calls); a request we could not build is not.
            Error::new(kind, "SCP request failed")
                .api_call(&call)
                .retryable(!e.is_builder())
                .with_source(e.without_url())
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            Error::new(ErrorKind::Platform, "reading the SCP answer failed")
                .api_call(&call)
                .retryable(true)
                .with_source(e.without_url())
        })?;
        let envelope: Envelope = serde_json::from_str(&text).map_err(|e| {
            // A gateway's own error page on 502/503/504 has no envelope.
            Error::new(
                ErrorKind::Platform,
                format!("SCP answered HTTP {} without an envelope", status.as_u16()),
            )
            .api_call(&call)
            .retryable(transient(status))
            .with_source(e)
        })?;
        if envelope.code != 0 {
            return Err(scp_error(status, envelope.code, &envelope.message, &call));
        }
        if !status.is_success() {
            return Err(scp_error(status, -1, &envelope.message, &call));
        }
        // Names the missing or malformed field (`missing field `areas``).
        serde_json::from_value(envelope.data).map_err(|e| {
            Error::new(
                ErrorKind::Platform,
                format!("SCP answer does not parse: {e}"),
            )
            .api_call(&call)
        })
    }

    /// A call marked *task*: start it, poll `GET /janus/20180725/tasks/{id}`
    /// through `waiting` and `doing` until `finish` (its `entities` are
    /// returned), `failure` (an error with the platform's `description`),
    /// `canceled`, or the task timeout.
    pub async fn task<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T> {
        let call = format!("{method} {path}");
        let started: TaskRef = self.call(method, path, &[], body).await?;
        let task_path = &format!("/janus/20180725/tasks/{}", started.task_id);
        let (call, started) = (&call, &started);
        let policy = PollPolicy::new(self.options.poll_interval, self.options.task_timeout);
        poll::until(
            &policy,
            || async move {
                let task: Task = self.call(Method::GET, task_path, &[], None).await?;
                match task.status.as_str() {
                    "finish" => serde_json::from_value(task.entities)
                        .map(Poll::Done)
                        .map_err(|e| {
                            Error::new(
                                ErrorKind::Platform,
                                format!("SCP task {} result does not parse: {e}", started.task_id),
                            )
                            .api_call(call)
                        }),
                    "failure" => {
                        let why = if task.description.is_empty() {
                            "no description".to_owned()
                        } else {
                            task.description.clone()
                        };
                        let kind = if says_cbt_expired(&why) {
                            ErrorKind::ChangeTrackingLost
                        } else {
                            ErrorKind::Platform
                        };
                        Err(Error::new(kind, format!("SCP task {} failed: {why}", started.task_id))
                            .api_call(call))
                    }
                    "canceled" | "canceling" => Err(Error::new(
                        ErrorKind::Platform,
                        format!("SCP task {} was canceled", started.task_id),
                    )
                    .api_call(call)),
                    "waiting" | "doing" => Ok(Poll::Pending((task.status, task.progress))),
                    other => Err(Error::new(
                        ErrorKind::Platform,
                        format!(
                            "SCP task {} has an unknown status {other:?}",
                            started.task_id
                        ),
                    )
                    .api_call(call)),
                }
            },
            |_, (status, progress)| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "SCP task {} did not finish within {:?} (last status {status}, progress {progress})",
                        started.task_id, self.options.task_timeout
                    ),
                )
                .api_call(call)
            },
        )
        .await
    }

    /// Every item of a paged list.
    pub async fn list<T: DeserializeOwned>(
        &self,
        path: &str,
        filters: &[(&str, String)],
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let mut page_num = 0u64;
        loop {
            let mut query = filters.to_vec();
            query.push(("page_num", page_num.to_string()));
            query.push(("page_size", PAGE_SIZE.to_string()));
            let page: Page<T> = self.call(Method::GET, path, &query, None).await?;
            let next = page.next();
            let total = page.total_size;
            out.extend(page.data);
            match next {
                Some(n) if n > page_num => page_num = n,
                Some(n) => {
                    return Err(Error::new(
                        ErrorKind::Platform,
                        format!("the list did not advance (page {page_num}, next_page_num {n})"),
                    )
                    .api_call(format!("GET {path}")));
                }
                None if (out.len() as u64) < total => {
                    return Err(Error::new(
                        ErrorKind::Platform,
                        format!(
                            "the list ended after {} of {total} items (total_size)",
                            out.len()
                        ),
                    )
                    .api_call(format!("GET {path}")));
                }
                None => return Ok(out),
            }
        }
    }
}

/// Largest page the platform serves.
pub const PAGE_SIZE: u64 = 100;

fn method_name(call: &str) -> &str {
    call.split(' ').next().unwrap_or_default()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256.
#[allow(
    clippy::expect_used,
    reason = "HMAC accepts keys of every length; new_from_slice cannot fail"
)]
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// `YYYYMMDDTHHMMSSZ` of a time.
pub fn amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The `Authorization` and `X-Amz-Date` headers of an access-key signed
/// request, as `sangfor_scp.auth.ec2.EC2Signer` builds them (the query
/// string is not signed).
#[allow(clippy::too_many_arguments)]
pub fn sign(
    access_key: &str,
    secret_key: &str,
    region: &str,
    service: &str,
    method: &str,
    path: &str,
    body: &[u8],
    now: SystemTime,
) -> (String, String) {
    let date_time = amz_date(now);
    let date = &date_time[..8];
    let canonical = [
        method.to_ascii_uppercase(),
        path.to_owned(),
        String::new(),
        format!("x-amz-date:{date_time}\n"),
        "x-amz-date".to_owned(),
        hex(&Sha256::digest(body)),
    ]
    .join("\n");
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = [
        "AWS4-HMAC-SHA256".to_owned(),
        date_time.clone(),
        scope.clone(),
        hex(&Sha256::digest(canonical.as_bytes())),
    ]
    .join("\n");
    let k = hmac_sha256(format!("AWS4{secret_key}").as_bytes(), date.as_bytes());
    let k = hmac_sha256(&k, region.as_bytes());
    let k = hmac_sha256(&k, service.as_bytes());
    let k = hmac_sha256(&k, b"aws4_request");
    let signature = hex(&hmac_sha256(&k, to_sign.as_bytes()));
    (
        format!(
            "AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders=x-amz-date, Signature={signature}"
        ),
        date_time,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates_format() {
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(1_709_208_000)),
            "20240229T120000Z"
        );
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn cbt_expiry_is_recognised_by_the_documented_message_whatever_the_code() {
        for code in [60000, 1, 40900] {
            let e = scp_error(
                StatusCode::OK,
                code,
                "The VM CBT has expired. Please reset it.",
                "GET /x",
            );
            assert!(is_cbt_expired(&e), "{code}");
        }
        let e = scp_error(StatusCode::OK, 60000, "refused", "GET /x");
        assert!(!is_cbt_expired(&e));
    }

    #[test]
    fn codes_map_to_kinds_and_back() {
        let e = scp_error(
            StatusCode::OK,
            codes::CHECKPOINT_INVALID,
            "checkpoint gone",
            "GET /x",
        );
        assert_eq!(e.kind(), ErrorKind::ChangeTrackingLost);
        assert_eq!(error_code(&e), Some(codes::CHECKPOINT_INVALID));
        assert_eq!(e.context().api_call.as_deref(), Some("GET /x"));
        let e = scp_error(StatusCode::OK, codes::LEASE_EXPIRED, "gone", "PUT /y");
        assert_eq!(e.kind(), ErrorKind::LeaseLost);
        let e = scp_error(StatusCode::INTERNAL_SERVER_ERROR, 50000, "boom", "GET /z");
        assert_eq!(e.kind(), ErrorKind::Platform);
        assert!(!e.is_retryable(), "an internal error is not transient");
        for status in [
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        ] {
            let e = scp_error(status, 50000, "busy", "GET /z");
            assert!(e.is_retryable(), "{status}");
        }
        let e = scp_error(StatusCode::OK, 60000, "The VM CBT has expired.", "GET /z");
        assert!(!e.is_retryable());
    }
}
