//! A small ZStack REST client: session login, API jobs polled to
//! completion with a timeout, `q=` queries, and the calls the provider
//! uses. Every error names the API call; the password and the session id
//! never appear in errors or logs. Answers are read through the typed
//! shapes of [`crate::api`].
//!
//! ## Retries
//!
//! ZStack answers `503` with `{"error": …}` when an API *failed* (a
//! failed job's poll answers the same way, for good): that is a platform
//! answer and retrying it cannot help. What can pass is the transport: a
//! connection refused or reset, and `502`/`503`/`504` without a ZStack
//! error body (a proxy or load balancer in front of a management node
//! that is restarting), or a ZStack error whose code says the management
//! node was unreachable (`SYS.1012`, `SYS.1011`). Those are marked
//! retryable. Idempotent calls (login, queries and reads, job polls) run
//! through [`provider_kit::retry()`] with the connection's
//! [`RetryPolicy`]; a call that starts an API job is sent once (a lost
//! answer may still have started the job: whatever it created carries the
//! job marker and is found by the sweeps).

use std::sync::Mutex;
use std::time::Duration;

use provider_api::{Error, ErrorKind, Result};
use provider_kit::poll::{self, Poll, PollPolicy};
use provider_kit::{RetryPolicy, retry};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha512};

use crate::api::{self, ErrorAnswer, Inventories, InventoryAnswer, JobLocation, SessionInventory};

/// Where and how to reach ZStack.
#[derive(Clone)]
pub struct Connection {
    /// Base URL up to (excluding) `/v1`, e.g. `http://zstack:8080/zstack`.
    pub base_url: String,
    /// Account name.
    pub account: String,
    /// Account password (sent as its SHA-512 hex digest).
    pub password: String,
    /// Pause between two polls of an API job.
    pub poll_interval: Duration,
    /// Longest wait for one API job (AddImage, template creation, ...).
    pub job_timeout: Duration,
    /// Longest wait for one read of an answer (API or download).
    pub io_timeout: Duration,
    /// Retries of idempotent calls (login, queries, job polls).
    pub retry: RetryPolicy,
    /// CA of the API's HTTPS certificate, when it is not a public one.
    pub api_ca: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("base_url", &self.base_url)
            .field("account", &self.account)
            .field("poll_interval", &self.poll_interval)
            .field("job_timeout", &self.job_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// The client.
#[derive(Debug)]
pub struct ZStackClient {
    conn: Connection,
    http: reqwest::Client,
    session: Mutex<Option<String>>,
}

/// The error of a non-success answer. `body` is the raw answer: a ZStack
/// error object when ZStack itself answered, anything else (or nothing)
/// when something in front of it did.
fn platform_error(call: &str, status: StatusCode, body: &[u8]) -> Error {
    let zs = serde_json::from_slice::<ErrorAnswer>(body)
        .ok()
        .map(|a| a.error);
    let gateway = matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    );
    let Some(e) = zs else {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)])
            .trim()
            .replace(['\n', '\r'], " ");
        if no_such_api(status, &text) {
            return Error::new(
                ErrorKind::Unsupported,
                format!("ZStack has no such API (HTTP {}: {text})", status.as_u16()),
            )
            .api_call(call);
        }
        return Error::new(
            if status == StatusCode::UNAUTHORIZED {
                ErrorKind::Auth
            } else {
                ErrorKind::Platform
            },
            format!(
                "ZStack answered HTTP {} without a ZStack error{}",
                status.as_u16(),
                if gateway {
                    " (a proxy or a management node that is not up)"
                } else {
                    ""
                }
            ),
        )
        .api_call(call)
        .retryable(gateway)
        .with_platform_code(format!("HTTP {}", status.as_u16()));
    };
    let code = e.code.as_str();
    let kind = match (status, code) {
        (StatusCode::UNAUTHORIZED, _) | (_, "ID.1000" | "ID.1001") => ErrorKind::Auth,
        // `SysErrors.RESOURCE_NOT_FOUND` (conf/errorCodes/sys.xml).
        (StatusCode::NOT_FOUND, _) | (_, "SYS.1003") => ErrorKind::NotFound,
        // `IdentityErrors.QUOTA_EXCEEDING`.
        (_, "ID.1003") => ErrorKind::Refused,
        (StatusCode::CONFLICT, _) => ErrorKind::Refused,
        _ => ErrorKind::Platform,
    };
    // The management node could not be reached behind the API gateway.
    let retry = matches!(code, "SYS.1011" | "SYS.1012");
    Error::new(
        kind,
        format!(
            "ZStack answered HTTP {} {code}: {}: {}",
            status.as_u16(),
            e.description.as_deref().unwrap_or(""),
            e.details.as_deref().unwrap_or("")
        ),
    )
    .api_call(call)
    .retryable(retry)
    .with_platform_code(code)
}

/// Whether a plain-text answer (no ZStack error object) is ZStack's
/// `RestServer` saying that it has no API for the call: `404 no api
/// mapping to <path>` when no API path matches, or `500 No creational
/// API found for the path[…]` when a `POST` falls on a path pattern that
/// only has query and delete APIs (a ZStack before 3.6 answers `POST
/// /v1/volume-snapshots/group` so: the path matches
/// `/v1/volume-snapshots/{uuid}`). A 404 about an expired API job is not.
fn no_such_api(status: StatusCode, text: &str) -> bool {
    match status {
        StatusCode::NOT_FOUND => !text.contains("the job has been expired"),
        StatusCode::INTERNAL_SERVER_ERROR => text.contains("No creational API found"),
        _ => false,
    }
}

/// The JSON of a success answer; a body that is not JSON is an error.
fn json_body(call: &str, status: StatusCode, body: &[u8]) -> Result<Value> {
    serde_json::from_slice(body).map_err(|e| {
        Error::new(
            ErrorKind::Platform,
            format!(
                "ZStack answered HTTP {} with a body that is not JSON",
                status.as_u16()
            ),
        )
        .api_call(call)
        .with_source(e)
    })
}

impl ZStackClient {
    /// A client (not logged in yet).
    pub fn new(conn: Connection) -> Result<Self> {
        let http = provider_kit::http_client(&provider_kit::HttpClientOptions {
            read_timeout: Some(conn.io_timeout),
            tls_ca: conn.api_ca.as_deref(),
            ..provider_kit::HttpClientOptions::new("ZStack")
        })?;
        Ok(ZStackClient {
            conn,
            http,
            session: Mutex::new(None),
        })
    }

    /// The HTTP client (shared with downloads).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Settings.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1{path}", self.conn.base_url.trim_end_matches('/'))
    }

    fn session(&self) -> Option<String> {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `PUT /v1/accounts/login`; keeps the session. Retried when the
    /// transport fails (a second session is harmless).
    pub async fn login(&self) -> Result<()> {
        let call = "PUT /zstack/v1/accounts/login";
        let hash: String = Sha512::digest(self.conn.password.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let body = json!({"logInByAccount": {"accountName": self.conn.account, "password": hash}});
        let body = &body;
        let v = retry(&self.conn.retry, call, |_| async move {
            let resp = self
                .http
                .put(self.url("/accounts/login"))
                .json(&body)
                .send()
                .await
                .map_err(|e| transport(call, e))?;
            read_answer(call, resp).await
        })
        .await?;
        let a: InventoryAnswer<SessionInventory> = api::parse(call, v)?;
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(a.inventory.uuid);
        Ok(())
    }

    /// Logs in unless a session exists.
    pub async fn ensure_session(&self) -> Result<()> {
        if self.session().is_none() {
            self.login().await?;
        }
        Ok(())
    }

    /// Ends the session (errors ignored: the session expires anyway).
    pub async fn logout(&self) {
        let Some(s) = self.session() else { return };
        let _ = self
            .call(
                Method::DELETE,
                &format!("/accounts/sessions/{s}"),
                None,
                "LogOut",
            )
            .await;
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match self.session() {
            Some(s) => r.header("Authorization", format!("OAuth {s}")),
            None => r,
        }
    }

    /// `GET` with query pairs; the JSON answer. Retried when the
    /// transport fails; a `401` (expired session) logs in again once.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let call = &format!("GET /zstack/v1{path}");
        self.with_relogin(call, || {
            retry(&self.conn.retry, call, |_| async move {
                let resp = self
                    .request(Method::GET, &self.url(path))
                    .query(query)
                    .send()
                    .await
                    .map_err(|e| transport(call, e))?;
                read_answer(call, resp).await
            })
        })
        .await
    }

    /// Query a resource with `q=` conditions (`field=value`, `field!=value`,
    /// `field~=pattern%` — escape literal text with [`api::like_escape`] —,
    /// `field?=a,b`); the typed inventories.
    pub async fn query<T: DeserializeOwned>(
        &self,
        resource: &str,
        conds: &[String],
    ) -> Result<Vec<T>> {
        let q: Vec<(&str, String)> = conds.iter().map(|c| ("q", c.clone())).collect();
        let v = self.get(resource, &q).await?;
        let a: Inventories<T> = api::parse(&format!("GET /zstack/v1{resource}"), v)?;
        Ok(a.inventories)
    }

    /// Matching objects and how many there are in all
    /// (`replyWithCount=true`: `{"inventories": […], "total": n}`; the
    /// inventories stop at `limit`).
    pub async fn query_with_total<T: DeserializeOwned>(
        &self,
        resource: &str,
        conds: &[String],
        limit: u32,
    ) -> Result<(Vec<T>, u64)> {
        let mut q: Vec<(&str, String)> = conds.iter().map(|c| ("q", c.clone())).collect();
        q.push(("replyWithCount", "true".into()));
        q.push(("limit", limit.to_string()));
        let v = self.get(resource, &q).await?;
        let a: api::InventoriesWithTotal<T> =
            api::parse(&format!("GET /zstack/v1{resource} (replyWithCount)"), v)?;
        Ok((a.inventories, a.total))
    }

    /// How many objects match.
    pub async fn count(&self, resource: &str, conds: &[String]) -> Result<u64> {
        let mut q: Vec<(&str, String)> = conds.iter().map(|c| ("q", c.clone())).collect();
        q.push(("count", "true".into()));
        let v = self.get(resource, &q).await?;
        let t: api::Total = api::parse(&format!("GET /zstack/v1{resource} (count)"), v)?;
        Ok(t.total)
    }

    /// One object by UUID (`GET /v1/<resource>/<uuid>`), typed.
    pub async fn get_one<T: DeserializeOwned>(&self, resource: &str, uuid: &str) -> Result<T> {
        let call = format!("GET /zstack/v1{resource}/{uuid}");
        let v = self.get(&format!("{resource}/{uuid}"), &[]).await?;
        let a: Inventories<T> = api::parse(&call, v)?;
        a.inventories.into_iter().next().ok_or_else(|| {
            Error::not_found(format!("{resource}/{uuid} does not exist")).api_call(&call)
        })
    }

    /// [`ZStackClient::call`] whose job result is read as `T`.
    pub async fn call_as<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        action: &str,
    ) -> Result<T> {
        let call = format!("{method} /zstack/v1{path} ({action})");
        let v = self.call(method, path, body, action).await?;
        api::parse(&call, v)
    }

    /// [`ZStackClient::call_within`] whose job result is read as `T`.
    pub async fn call_as_within<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        action: &str,
        timeout: Duration,
    ) -> Result<T> {
        let call = format!("{method} /zstack/v1{path} ({action})");
        let v = self
            .call_within(method, path, body, action, timeout)
            .await?;
        api::parse(&call, v)
    }

    /// A non-GET call: expects `202 {"location"}` and polls the API job
    /// until 200 (result) or 503 (error), within the job timeout.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        action: &str,
    ) -> Result<Value> {
        self.call_within(method, path, body, action, self.conn.job_timeout)
            .await
    }

    /// [`ZStackClient::call`] with its own job timeout (long transfers).
    ///
    /// The job is named by the client (`X-Job-UUID`): when the answer to
    /// the call is lost on the way back, the job is looked up by that
    /// name instead of failing (a job ZStack never saw answers 404, and
    /// the transport error is reported). An expired session (`ID.1001`,
    /// or a `401` from a gateway) logs in again and sends the call once
    /// more under a new job name (ZStack refuses a job name it has seen:
    /// `Duplicate job uuid`): the call was refused before anything ran.
    pub async fn call_within(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        action: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let call = format!("{method} /zstack/v1{path} ({action})");
        let mut job_uuid = job_uuid();
        let send = |job_uuid: &str| {
            let mut req = self
                .request(method.clone(), &self.url(path))
                .header("X-Job-UUID", job_uuid);
            if let Some(b) = &body {
                req = req.json(b);
            }
            req.send()
        };
        let mut relogged = false;
        let location = loop {
            let resp = match send(&job_uuid).await {
                Ok(r) => r,
                Err(e) => {
                    // The answer may be lost while the job runs.
                    let location = self.url(&format!("/api-jobs/{job_uuid}"));
                    let err = transport(&call, e);
                    match self.request(Method::GET, &location).send().await {
                        Ok(r) if r.status() != StatusCode::NOT_FOUND => {
                            tracing::info!(
                                call,
                                "the call's answer was lost; following its job by X-Job-UUID"
                            );
                            break location;
                        }
                        _ => return Err(err),
                    }
                }
            };
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| transport(&call, e))?;
            match status {
                StatusCode::ACCEPTED => {}
                s if s.is_success() => return json_body(&call, s, &bytes),
                s => {
                    let e = platform_error(&call, s, &bytes);
                    if e.is_session_expired() && !relogged {
                        relogged = true;
                        self.relogin(&call).await?;
                        job_uuid = self::job_uuid();
                        continue;
                    }
                    return Err(e);
                }
            }
            let location: JobLocation = api::parse(&call, json_body(&call, status, &bytes)?)?;
            break location.location;
        };
        let polling = &format!("{call}, polling its API job");
        let location = &location;
        // The job was just accepted: the first look waits one interval.
        tokio::time::sleep(self.conn.poll_interval).await;
        let policy = PollPolicy::new(self.conn.poll_interval, timeout);
        poll::until(
            &policy,
            || async move {
                // 202: running; 200: the result; a ZStack error: the job failed.
                self.with_relogin(polling, || {
                    retry(&self.conn.retry, polling, |_| async move {
                        let resp = self
                            .request(Method::GET, location)
                            .send()
                            .await
                            .map_err(|e| transport(polling, e))?;
                        let status = resp.status();
                        let bytes = resp.bytes().await.map_err(|e| transport(polling, e))?;
                        match status {
                            StatusCode::ACCEPTED => Ok(Poll::Pending(())),
                            StatusCode::OK => json_body(polling, status, &bytes).map(Poll::Done),
                            s => Err(platform_error(polling, s, &bytes)),
                        }
                    })
                })
                .await
            },
            |_, _| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "ZStack job did not finish within {timeout:?} (the object may be stuck, e.g. an image in Downloading)"
                    ),
                )
                .api_call(&call)
            },
        )
        .await
    }

    /// Logs in again after a `401` (the session expired).
    async fn relogin(&self, call: &str) -> Result<()> {
        tracing::info!(call, "the ZStack session expired; logging in again");
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.login().await
    }

    /// Runs `f`; when it fails with a `401` while a session was held,
    /// logs in again and runs it once more.
    async fn with_relogin<T, F, Fut>(&self, call: &str, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match f().await {
            Err(e) if e.is_session_expired() && self.session().is_some() => {
                self.relogin(call).await?;
                f().await
            }
            r => r,
        }
    }
}

/// A fresh job name for `X-Job-UUID` (32 hex digits, like a ZStack UUID).
fn job_uuid() -> String {
    use sha2::Sha256;
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = Sha256::digest(format!(
        "{nanos}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Whether an error is ZStack's answer to an expired or unknown session.
trait SessionExpired {
    fn is_session_expired(&self) -> bool;
}

impl SessionExpired for Error {
    fn is_session_expired(&self) -> bool {
        // Real ZStack answers 503 with `ID.1001` (a failed API reply); a
        // gateway in front of it may answer 401.
        self.kind() == ErrorKind::Auth
            && matches!(self.platform_code(), Some("ID.1001" | "HTTP 401"))
    }
}

/// The JSON of an answer that must be a success (`2xx`).
async fn read_answer(call: &str, resp: reqwest::Response) -> Result<Value> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| transport(call, e))?;
    if !status.is_success() {
        return Err(platform_error(call, status, &bytes));
    }
    json_body(call, status, &bytes)
}

fn transport(call: &str, e: reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Platform
    };
    Error::new(kind, "ZStack is unreachable")
        .api_call(call)
        .retryable(true)
        .with_source(e.without_url())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session counts as expired by ZStack's code (or a gateway's bare
    /// 401), not by words that happen to be in a message.
    #[test]
    fn an_expired_session_is_told_by_its_code() {
        let answer = |code: &str, details: &str| {
            format!(r#"{{"error":{{"code":"{code}","description":"d","details":"{details}"}}}}"#)
        };
        let e = |status: u16, body: String| {
            platform_error(
                "GET /v1/vm-instances",
                StatusCode::from_u16(status).unwrap(),
                body.as_bytes(),
            )
        };
        assert!(e(503, answer("ID.1001", "session expired")).is_session_expired());
        assert!(e(401, "Unauthorized".into()).is_session_expired());
        // Wrong password: an auth error, not an expired session.
        assert!(!e(503, answer("ID.1000", "wrong password, not ID.1001")).is_session_expired());
        // A refusal whose text quotes ID.1001 is still a refusal.
        assert!(!e(409, answer("SYS.1007", "see ID.1001 and HTTP 401")).is_session_expired());
        assert_eq!(
            e(503, answer("ID.1001", "x")).platform_code(),
            Some("ID.1001")
        );
    }

    /// What ZStack's `RestServer` answers for an API it does not have is
    /// told apart from an API that refuses.
    #[test]
    fn a_missing_api_is_unsupported_and_a_refusal_is_not() {
        let call = "POST /zstack/v1/volume-snapshots/group (CreateVolumeSnapshotGroup)";
        let kind = |status: u16, body: &str| {
            platform_error(call, StatusCode::from_u16(status).unwrap(), body.as_bytes()).kind()
        };
        assert_eq!(
            kind(404, "no api mapping to /v1/volume-snapshots/group"),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind(
                500,
                "No creational API found for the path[/zstack/v1/volume-snapshots/group]"
            ),
            ErrorKind::Unsupported
        );
        assert_eq!(kind(404, "the job has been expired"), ErrorKind::Platform);
        assert_eq!(
            kind(500, "java.lang.NullPointerException"),
            ErrorKind::Platform
        );
        let zs = |code: &str| {
            format!(r#"{{"error":{{"code":"{code}","description":"d","details":"x"}}}}"#)
        };
        assert_eq!(kind(503, &zs("SYS.1003")), ErrorKind::NotFound);
        assert_eq!(kind(503, &zs("SYS.1006")), ErrorKind::Platform);
        assert_eq!(kind(503, &zs("ID.1003")), ErrorKind::Refused);
    }
}
