//! A small ZStack REST client: session login, API jobs polled to
//! completion with a timeout, `q=` queries, and the calls the provider
//! uses. Every error names the API call; the password and the session id
//! never appear in errors or logs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use provider_api::{Error, ErrorKind, Result};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha512};

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
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("base_url", &self.base_url)
            .field("account", &self.account)
            .field("poll_interval", &self.poll_interval)
            .field("job_timeout", &self.job_timeout)
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

fn platform_error(call: &str, status: StatusCode, body: &Value) -> Error {
    let e = body.get("error").cloned().unwrap_or(Value::Null);
    let code = e.get("code").and_then(Value::as_str).unwrap_or("?");
    let desc = e.get("description").and_then(Value::as_str).unwrap_or("");
    let details = e.get("details").and_then(Value::as_str).unwrap_or("");
    let kind = match (status, code) {
        (StatusCode::UNAUTHORIZED, _) => ErrorKind::Auth,
        (StatusCode::NOT_FOUND, _) | (_, "SYS.1001") => ErrorKind::NotFound,
        (_, "SYS.1003") => ErrorKind::Refused,
        (StatusCode::CONFLICT, _) | (_, "SYS.1008") => ErrorKind::Refused,
        _ => ErrorKind::Platform,
    };
    let retry = status == StatusCode::SERVICE_UNAVAILABLE && code == "SYS.1006";
    Error::new(
        kind,
        format!(
            "ZStack answered HTTP {} {code}: {desc}: {details}",
            status.as_u16()
        ),
    )
    .api_call(call)
    .retryable(retry)
}

impl ZStackClient {
    /// A client (not logged in yet).
    pub fn new(conn: Connection) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::new(ErrorKind::Other, "building the HTTP client").with_source(e))?;
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

    /// `PUT /v1/accounts/login`; keeps the session.
    pub async fn login(&self) -> Result<()> {
        let call = "PUT /zstack/v1/accounts/login";
        let hash: String = Sha512::digest(self.conn.password.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let body = json!({"logInByAccount": {"accountName": self.conn.account, "password": hash}});
        let resp = self
            .http
            .put(self.url("/accounts/login"))
            .json(&body)
            .send()
            .await
            .map_err(|e| transport(call, e))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(platform_error(call, status, &v));
        }
        let id = v["inventory"]["uuid"].as_str().ok_or_else(|| {
            Error::new(ErrorKind::Platform, "login answer has no session").api_call(call)
        })?;
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
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

    /// `GET` with query pairs; the JSON answer.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let call = format!("GET /zstack/v1{path}");
        let resp = self
            .request(Method::GET, &self.url(path))
            .query(query)
            .send()
            .await
            .map_err(|e| transport(&call, e))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(platform_error(&call, status, &v));
        }
        Ok(v)
    }

    /// Query a resource with `q=` conditions (`field=value`, `field!=value`,
    /// `field~=pattern%`, `field?=a,b`).
    pub async fn query(&self, resource: &str, conds: &[String]) -> Result<Vec<Value>> {
        let q: Vec<(&str, String)> = conds.iter().map(|c| ("q", c.clone())).collect();
        let v = self.get(resource, &q).await?;
        Ok(v["inventories"].as_array().cloned().unwrap_or_default())
    }

    /// How many objects match.
    pub async fn count(&self, resource: &str, conds: &[String]) -> Result<u64> {
        let mut q: Vec<(&str, String)> = conds.iter().map(|c| ("q", c.clone())).collect();
        q.push(("count", "true".into()));
        let v = self.get(resource, &q).await?;
        v["total"].as_u64().ok_or_else(|| {
            Error::new(ErrorKind::Platform, "count query answered without total")
                .api_call(format!("GET /zstack/v1{resource}"))
        })
    }

    /// One object by UUID (`GET /v1/<resource>/<uuid>`).
    pub async fn get_one(&self, resource: &str, uuid: &str) -> Result<Value> {
        let v = self.get(&format!("{resource}/{uuid}"), &[]).await?;
        v["inventories"]
            .as_array()
            .and_then(|a| a.first().cloned())
            .ok_or_else(|| {
                Error::not_found(format!("{resource}/{uuid} does not exist"))
                    .api_call(format!("GET /zstack/v1{resource}/{uuid}"))
            })
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
        let call = format!("{method} /zstack/v1{path} ({action})");
        let mut req = self.request(method, &self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| transport(&call, e))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        match status {
            StatusCode::ACCEPTED => {}
            s if s.is_success() => return Ok(v),
            s => return Err(platform_error(&call, s, &v)),
        }
        let location = v["location"]
            .as_str()
            .ok_or_else(|| {
                Error::new(ErrorKind::Platform, "202 without a job location").api_call(&call)
            })?
            .to_string();
        let started = Instant::now();
        loop {
            if started.elapsed() > self.conn.job_timeout {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "ZStack job did not finish within {:?} (the object may be stuck, e.g. an image in Downloading)",
                        self.conn.job_timeout
                    ),
                )
                .api_call(&call));
            }
            tokio::time::sleep(self.conn.poll_interval).await;
            let resp = self
                .request(Method::GET, &location)
                .send()
                .await
                .map_err(|e| transport(&call, e))?;
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            match status {
                StatusCode::ACCEPTED => continue,
                StatusCode::OK => return Ok(v),
                s => {
                    return Err(platform_error(
                        &format!("{call}, polling its API job"),
                        s,
                        &v,
                    ));
                }
            }
        }
    }
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
