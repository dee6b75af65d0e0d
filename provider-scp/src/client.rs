//! The janus HTTP client: token auth, the `{code, message, data}`
//! envelope, asynchronous tasks and paged lists.
//!
//! Retries: HTTP 502, 503, 504 and 429 and connection failures are
//! retryable errors; idempotent calls (every `GET`, so task polling and
//! paged lists too) go through [`provider_kit::retry`] with
//! [`ScpOptions::retry`]. Calls that change something are sent once.

use std::time::Instant;

use provider_api::{Error, ErrorKind, Result};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::api::{AuthAnswer, Envelope, Page, Task, TaskRef, codes};
use crate::options::{ScpOptions, Secret};

/// A logged-in janus client. Cheap to share behind an `Arc`.
pub struct ScpClient {
    http: reqwest::Client,
    base: String,
    username: String,
    password: Secret,
    token: Mutex<Option<Secret>>,
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
        codes::UNAUTHORIZED => ErrorKind::Auth,
        codes::NOT_FOUND => ErrorKind::NotFound,
        codes::CONFLICT | codes::REFUSED | codes::REVERT_MODE | codes::BASE_CBT_UNAVAILABLE => {
            ErrorKind::Refused
        }
        codes::CBT_EXPIRED | codes::CBT_DISABLED | codes::CHECKPOINT_INVALID => {
            ErrorKind::ChangeTrackingLost
        }
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

/// The envelope code of an error built by [`scp_error`], if any.
pub fn error_code(e: &Error) -> Option<i64> {
    let m = e.message().strip_prefix("SCP answered code ")?;
    m.split_whitespace().next()?.parse().ok()
}

impl ScpClient {
    /// A client (not yet logged in).
    pub fn new(options: &ScpOptions) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(options.request_timeout)
            .build()
            .map_err(|e| Error::new(ErrorKind::Other, "building the HTTP client").with_source(e))?;
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

    /// Log in (`POST /janus/authenticate`). The password is sent as the
    /// mock documents it (plain); a real SCP wants it RSA-encrypted with
    /// `GET /janus/public-key` (not implemented here, see the crate docs).
    pub async fn login(&self) -> Result<()> {
        let body = json!({"auth": {"passwordCredentials": {
            "username": self.username, "password": self.password.expose()}}});
        let answer: AuthAnswer = self
            .send(Method::POST, "/janus/authenticate", &[], Some(&body), None)
            .await?;
        *self.token.lock().await = Some(Secret::new(answer.access.token.id));
        Ok(())
    }

    /// Forget the token.
    pub async fn logout(&self) {
        *self.token.lock().await = None;
    }

    async fn token(&self) -> Result<Secret> {
        if let Some(t) = self.token.lock().await.clone() {
            return Ok(t);
        }
        self.login().await?;
        self.token
            .lock()
            .await
            .clone()
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
        if let Some(t) = token {
            req = req.header("Authorization", format!("Token {}", t.expose()));
        }
        if let Some(b) = body {
            req = req.json(b);
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
    /// until `success` (or `failure`, or the task timeout), return
    /// `data.result`.
    pub async fn task<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T> {
        let call = format!("{method} {path}");
        let started: TaskRef = self.call(method, path, &[], body).await?;
        let task_path = format!("/janus/20180725/tasks/{}", started.task_id);
        let deadline = Instant::now() + self.options.task_timeout;
        loop {
            let task: Task = self.call(Method::GET, &task_path, &[], None).await?;
            match task.status.as_str() {
                "success" => {
                    return serde_json::from_value(task.result).map_err(|e| {
                        Error::new(
                            ErrorKind::Platform,
                            format!("SCP task {} result does not parse: {e}", started.task_id),
                        )
                        .api_call(&call)
                    });
                }
                "failure" => {
                    return Err(scp_error(
                        StatusCode::OK,
                        task.error_code,
                        &format!("task {} failed: {}", started.task_id, task.error_message),
                        &call,
                    ));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "SCP task {} did not finish within {:?}",
                        started.task_id, self.options.task_timeout
                    ),
                )
                .api_call(&call));
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }
    }

    /// Every item of a paged list.
    pub async fn list<T: DeserializeOwned>(
        &self,
        path: &str,
        filters: &[(&str, String)],
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let mut page_num = 1u64;
        loop {
            let mut query = filters.to_vec();
            query.push(("page_num", page_num.to_string()));
            query.push(("page_size", "1000".into()));
            let page: Page<T> = self.call(Method::GET, path, &query, None).await?;
            let n = page.data.len();
            out.extend(page.data);
            if n == 0 || out.len() as u64 >= page.total_count {
                return Ok(out);
            }
            page_num += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds_and_back() {
        let e = scp_error(
            StatusCode::OK,
            codes::CBT_EXPIRED,
            "The VM CBT has expired. Please reset it.",
            "GET /x",
        );
        assert_eq!(e.kind(), ErrorKind::ChangeTrackingLost);
        assert_eq!(error_code(&e), Some(60001));
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
        let e = scp_error(StatusCode::OK, codes::CBT_EXPIRED, "expired", "GET /z");
        assert!(!e.is_retryable());
    }
}
