//! The oVirt REST client: SSO login, XML or JSON bodies, fault answers
//! turned into [`provider_api::Error`]s that name the call, retries.
//!
//! Responses are read into a [`serde_json::Value`] in the JSON shape
//! whatever the wire format: XML attributes (`id`, `href`) become keys,
//! repeated elements arrays, text elements strings; [`Client::get_as`] and
//! [`Client::post_as`] then read them into the typed shapes of
//! [`crate::api`].
//!
//! Retries: a 502, 503 or 504 answer and a connection failure are
//! retryable; calls that are safe to repeat (every `GET`, the login,
//! `DELETE`s, ranged reads and extents of the image server) go through
//! [`provider_kit::retry()`] with [`Client`]'s policy. Other `POST`s run
//! once: repeating one whose answer was lost could create a second object.

use std::sync::Mutex;
use std::time::Duration;

use provider_api::{Error, ErrorKind, Result};
use provider_kit::RetryPolicy;
use quick_xml::Reader;
use quick_xml::events::Event;
use reqwest::{Method, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Wire format of request and response bodies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// `application/xml` (the engine's default).
    #[default]
    Xml,
    /// `application/json`.
    Json,
}

/// An authenticated client of one engine.
pub struct Client {
    http: reqwest::Client,
    api: String,
    sso: String,
    username: String,
    password: String,
    format: WireFormat,
    retry: RetryPolicy,
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("api", &self.api)
            .field("username", &self.username)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The HTTP transport: `timeout` per call; with `tls_ca`, that CA (PEM)
/// is the only root trusted for the engine and its image servers.
pub fn http_client(timeout: Duration, tls_ca: Option<&std::path::Path>) -> Result<reqwest::Client> {
    provider_kit::http_client(&provider_kit::HttpClientOptions {
        platform: "engine",
        connect_timeout: timeout,
        timeout: Some(timeout),
        read_timeout: None,
        tls_ca,
    })
}

impl Client {
    /// A client; `api` is the API root (`https://engine/ovirt-engine/api`),
    /// `http` the transport ([`http_client`]).
    pub fn new(
        api: &str,
        sso: &str,
        username: &str,
        password: &str,
        format: WireFormat,
        retry: RetryPolicy,
        http: reqwest::Client,
    ) -> Result<Self> {
        Ok(Client {
            http,
            api: api.trim_end_matches('/').to_string(),
            sso: sso.to_string(),
            username: username.to_string(),
            password: password.to_string(),
            format,
            retry,
            token: Mutex::new(None),
        })
    }

    /// The API root.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// `POST <sso>` with the password grant; keeps the bearer token.
    /// Retried (a second token does no harm).
    pub async fn login(&self) -> Result<()> {
        let call = "POST /ovirt-engine/sso/oauth/token";
        provider_kit::retry(&self.retry, call, |_| self.login_once(call)).await
    }

    async fn login_once(&self, call: &str) -> Result<()> {
        let body = format!(
            "grant_type=password&scope=ovirt-app-api&username={}&password={}",
            form_encode(&self.username),
            form_encode(&self.password)
        );
        let resp = self
            .http
            .post(&self.sso)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| transport(call, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport(call, e))?;
        if is_transient(status) {
            return Err(fault(call, status, None));
        }
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(ErrorKind::Platform, "malformed JSON answer to the login")
                .api_call(call)
                .with_source(e)
        })?;
        if !status.is_success() {
            let desc = v
                .get("error_description")
                .and_then(Value::as_str)
                .unwrap_or("login refused");
            return Err(Error::new(
                ErrorKind::Auth,
                format!("login as {} failed: {desc}", self.username),
            )
            .api_call(call));
        }
        let token = crate::api::decode::<crate::api::Token>(call, v)?.access_token;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
        Ok(())
    }

    /// Forgets the token.
    pub fn logout(&self) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The bearer token, logging in first when there is none.
    async fn bearer(&self) -> Result<String> {
        if let Some(t) = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(t);
        }
        self.login().await?;
        self.token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Auth, "the login gave no token"))
    }

    /// `GET <api><path>`, retried.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let name = call_name(&Method::GET, path);
        provider_kit::retry(&self.retry, &name, |_| self.call(Method::GET, path, None)).await
    }

    /// `GET <api><path>` read as a `T` ([`crate::api::decode`]).
    pub async fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let v = self.get(path).await?;
        crate::api::decode(&call_name(&Method::GET, path), v)
    }

    /// `POST <api><path>` with `body` as element `root` (run once).
    pub async fn post(&self, path: &str, root: &str, body: Value) -> Result<Value> {
        self.call(Method::POST, path, Some((root, body))).await
    }

    /// [`Client::post`] with the answer read as a `T`.
    pub async fn post_as<T: DeserializeOwned>(
        &self,
        path: &str,
        root: &str,
        body: Value,
    ) -> Result<T> {
        let v = self.post(path, root, body).await?;
        crate::api::decode(&call_name(&Method::POST, path), v)
    }

    /// `DELETE <api><path>`, retried; a retry that finds the object gone
    /// (the first attempt's answer was lost) succeeds.
    pub async fn delete(&self, path: &str) -> Result<()> {
        let name = call_name(&Method::DELETE, path);
        provider_kit::retry(&self.retry, &name, |attempt| async move {
            match self.call(Method::DELETE, path, None).await {
                Err(e) if attempt > 1 && e.kind() == ErrorKind::NotFound => Ok(()),
                r => r.map(|_| ()),
            }
        })
        .await
    }

    /// Any call; the answer in the JSON shape (`{}` for empty bodies).
    /// An expired token (401) is renewed once.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Value)>,
    ) -> Result<Value> {
        match self.call_once(method.clone(), path, body.clone()).await {
            Err(e) if e.kind() == ErrorKind::Auth => {
                self.logout();
                self.call_once(method, path, body).await
            }
            r => r,
        }
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Value)>,
    ) -> Result<Value> {
        let name = call_name(&method, path);
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.api))
            .bearer_auth(self.bearer().await?)
            .header("Version", "4");
        let (accept, ctype) = match self.format {
            WireFormat::Xml => ("application/xml", "application/xml"),
            WireFormat::Json => ("application/json", "application/json"),
        };
        req = req.header(header::ACCEPT, accept);
        if let Some((root, value)) = body {
            let text = match self.format {
                WireFormat::Json => serde_json::to_string(&value).unwrap_or_default(),
                WireFormat::Xml => to_xml(root, &value),
            };
            req = req.header(header::CONTENT_TYPE, ctype).body(text);
        } else if method == Method::POST {
            req = req
                .header(header::CONTENT_TYPE, ctype)
                .body(match self.format {
                    WireFormat::Json => "{}".to_string(),
                    WireFormat::Xml => "<action/>".to_string(),
                });
        }
        let resp = req.send().await.map_err(|e| transport(&name, e))?;
        let status = resp.status();
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.contains("json"));
        let bytes = resp.bytes().await.map_err(|e| transport(&name, e))?;
        let parsed = parse_answer(&bytes, is_json || self.format == WireFormat::Json);
        if !status.is_success() {
            return Err(fault(&name, status, parsed.ok()));
        }
        parsed.map_err(|e| {
            Error::new(
                ErrorKind::Platform,
                format!("malformed answer ({e}); status {status}"),
            )
            .api_call(&name)
        })
    }

    /// Ranged `GET` of `length` bytes at `offset` from the image server,
    /// retried.
    pub async fn image_range(&self, url: &str, offset: u64, length: u64) -> Result<bytes::Bytes> {
        let name = "GET /images/{ticket}";
        provider_kit::retry(&self.retry, name, |_| {
            self.image_range_once(name, url, offset, length)
        })
        .await
    }

    async fn image_range_once(
        &self,
        name: &str,
        url: &str,
        offset: u64,
        length: u64,
    ) -> Result<bytes::Bytes> {
        let resp = self
            .http
            .get(url)
            .header(
                header::RANGE,
                format!("bytes={offset}-{}", offset + length - 1),
            )
            .send()
            .await
            .map_err(|e| transport(name, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(Error::new(
                status_kind(status),
                format!("image server answered {status} to a ranged read"),
            )
            .api_call(name)
            .retryable(is_transient(status)));
        }
        let data = resp.bytes().await.map_err(|e| transport(name, e))?;
        if data.len() as u64 != length {
            return Err(platform_err(format!(
                "image server sent {} bytes for a {length}-byte range",
                data.len()
            ))
            .api_call(name));
        }
        Ok(data)
    }

    /// `OPTIONS <url>` on the image server, retried: the features the
    /// ticket offers (`extents`, `zero`, `flush`). A server that does not
    /// know `OPTIONS` (405, 501: an old imageio) offers none.
    pub async fn image_features(&self, url: &str) -> Result<Vec<String>> {
        let name = format!("OPTIONS {url}");
        provider_kit::retry(&self.retry, &name, |_| self.image_features_once(&name, url)).await
    }

    async fn image_features_once(&self, name: &str, url: &str) -> Result<Vec<String>> {
        let resp = self
            .http
            .request(Method::OPTIONS, url)
            .send()
            .await
            .map_err(|e| transport(name, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport(name, e))?;
        if matches!(status.as_u16(), 405 | 501) {
            return Ok(Vec::new());
        }
        if !status.is_success() {
            return Err(Error::new(
                status_kind(status),
                format!(
                    "image server answered {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                ),
            )
            .api_call(name)
            .retryable(is_transient(status)));
        }
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(ErrorKind::Platform, "malformed JSON from the image server")
                .api_call(name)
                .with_source(e)
        })?;
        Ok(crate::api::decode::<crate::api::ImageOptions>(name, v)?.features)
    }

    /// `GET` on the image server (no bearer token: the ticket is the
    /// credential), retried; the JSON answer read as a `T`.
    pub async fn image_json<T: DeserializeOwned>(&self, url: &str, what: &str) -> Result<T> {
        let name = format!("GET {what}");
        let v =
            provider_kit::retry(&self.retry, &name, |_| self.image_json_once(&name, url)).await?;
        crate::api::decode(&name, v)
    }

    async fn image_json_once(&self, name: &str, url: &str) -> Result<Value> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| transport(name, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport(name, e))?;
        if !status.is_success() {
            return Err(Error::new(
                status_kind(status),
                format!(
                    "image server answered {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                ),
            )
            .api_call(name)
            .retryable(is_transient(status)));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(ErrorKind::Platform, "malformed JSON from the image server")
                .api_call(name)
                .with_source(e)
        })
    }
}

fn platform_err(msg: String) -> Error {
    Error::new(ErrorKind::Platform, msg)
}

fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

/// `GET /vms/{id}` as errors name a call (without the query).
fn call_name(method: &Method, path: &str) -> String {
    match strip_query(path) {
        "" => format!("{method} /"),
        p => format!("{method} {p}"),
    }
}

/// Answers that say "try again later": a busy engine or a proxy in front
/// of it that could not reach it.
fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

fn transport(call: &str, e: reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Platform
    };
    if let Some(cert) = certificate_problem(&e) {
        let host = e
            .url()
            .and_then(|u| {
                u.host_str()
                    .map(|h| format!("{h}:{}", u.port_or_known_default().unwrap_or(443)))
            })
            .unwrap_or_default();
        // Never retried: another attempt meets the same certificate.
        return Error::new(
            ErrorKind::Platform,
            format!("the TLS certificate of {host} was refused ({cert}): check tls_ca"),
        )
        .api_call(call)
        .with_source(e.without_url());
    }
    // reqwest errors carry the URL, never credentials (they are in bodies
    // and headers only).
    Error::new(kind, "the engine could not be reached")
        .api_call(call)
        .retryable(true)
        .with_source(e.without_url())
}

/// The certificate verification failure behind a transport error, if any.
fn certificate_problem(e: &reqwest::Error) -> Option<String> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        let text = s.to_string();
        if text.contains("certificate")
            || text.contains("UnknownIssuer")
            || text.contains("NotValidForName")
        {
            return Some(text);
        }
        src = s.source();
    }
    None
}

fn status_kind(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        400 | 422 => ErrorKind::InvalidInput,
        401 | 403 => ErrorKind::Auth,
        404 => ErrorKind::NotFound,
        409 => ErrorKind::Refused,
        _ => ErrorKind::Platform,
    }
}

fn fault(call: &str, status: StatusCode, body: Option<Value>) -> Error {
    let (reason, detail) = body
        .map(|b| (text(&b, "reason"), text(&b, "detail")))
        .unwrap_or((None, None));
    let msg = match (reason, detail) {
        (Some(r), Some(d)) => format!("{r}: {d}"),
        (Some(r), None) => r,
        (None, Some(d)) => d,
        (None, None) => "no fault details".to_string(),
    };
    Error::new(
        status_kind(status),
        format!("the engine answered {status}: {msg}"),
    )
    .api_call(call)
    .retryable(is_transient(status))
}

fn parse_answer(bytes: &[u8], json: bool) -> std::result::Result<Value, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    if json {
        serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))
    } else {
        let text = std::str::from_utf8(bytes).map_err(|_| "the XML is not UTF-8".to_string())?;
        xml_to_value(text)
            .map(|(_, v)| v)
            .map_err(|e| format!("invalid XML: {e}"))
    }
}

// ------------------------------------------------------------------ XML

/// Serialises a JSON-shaped value as an XML element (`id`/`href` as
/// attributes, arrays as repeated elements).
pub fn to_xml(root: &str, value: &Value) -> String {
    let mut out = String::new();
    write_xml(&mut out, root, value);
    out
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn write_xml(out: &mut String, name: &str, value: &Value) {
    match value {
        Value::Null => {}
        Value::Array(items) => items.iter().for_each(|i| write_xml(out, name, i)),
        Value::Object(map) => {
            out.push('<');
            out.push_str(name);
            for key in ["id", "href"] {
                if let Some(t) = map.get(key).and_then(scalar) {
                    out.push_str(&format!(" {key}=\"{}\"", quick_xml::escape::escape(t)));
                }
            }
            out.push('>');
            for (k, v) in map.iter().filter(|(k, _)| *k != "id" && *k != "href") {
                write_xml(out, k, v);
            }
            out.push_str(&format!("</{name}>"));
        }
        s => {
            let t = scalar(s).unwrap_or_default();
            out.push_str(&format!(
                "<{name}>{}</{name}>",
                quick_xml::escape::escape(t.as_str())
            ));
        }
    }
}

struct Node {
    name: String,
    map: Map<String, Value>,
    text: String,
}

fn put(parent: &mut Map<String, Value>, name: String, value: Value) {
    match parent.get_mut(&name) {
        Some(Value::Array(a)) => a.push(value),
        Some(existing) => {
            let first = existing.take();
            *existing = Value::Array(vec![first, value]);
        }
        None => {
            parent.insert(name, value);
        }
    }
}

fn close(node: Node) -> (String, Value) {
    let v = if node.map.is_empty() {
        Value::String(node.text.trim().to_string())
    } else {
        Value::Object(node.map)
    };
    (node.name, v)
}

fn start(e: &quick_xml::events::BytesStart<'_>) -> std::result::Result<Node, String> {
    let mut map = Map::new();
    for a in e.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        let v = a.unescape_value().map_err(|e| e.to_string())?;
        map.insert(
            String::from_utf8_lossy(a.key.as_ref()).into_owned(),
            Value::String(v.into_owned()),
        );
    }
    Ok(Node {
        name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
        map,
        text: String::new(),
    })
}

/// Parses an XML document into `(root name, value)` in the JSON shape.
pub fn xml_to_value(text: &str) -> std::result::Result<(String, Value), String> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Node> = Vec::new();
    let mut root = None;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| format!("at byte {}: {e}", reader.buffer_position()))?;
        let finished = match ev {
            Event::Start(_) | Event::Empty(_) if root.is_some() => {
                return Err("content after the root element".into());
            }
            Event::Start(e) => {
                stack.push(start(&e)?);
                None
            }
            Event::Empty(e) => Some(close(start(&e)?)),
            Event::End(_) => Some(close(stack.pop().ok_or("unbalanced end tag")?)),
            Event::Text(t) => {
                let s = t.decode().map_err(|e| e.to_string())?;
                match stack.last_mut() {
                    Some(n) => n.text.push_str(&s),
                    None if !s.trim().is_empty() => {
                        return Err("text outside the root element".into());
                    }
                    None => {}
                }
                None
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| e.to_string())?;
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&s);
                }
                None
            }
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                    Some(c) => c,
                    None => match r.decode().map_err(|e| e.to_string())?.as_ref() {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "apos" => '\'',
                        "quot" => '"',
                        other => return Err(format!("unknown entity &{other};")),
                    },
                };
                if let Some(n) = stack.last_mut() {
                    n.text.push(c);
                }
                None
            }
            Event::Eof => break,
            _ => None,
        };
        if let Some((name, value)) = finished {
            match stack.last_mut() {
                Some(p) => put(&mut p.map, name, value),
                None => root = Some((name, value)),
            }
        }
    }
    if let Some(n) = stack.last() {
        return Err(format!("element <{}> is not closed", n.name));
    }
    root.ok_or_else(|| "no root element".to_string())
}

// ------------------------------------------------------------ faults

/// A text field of a fault answer (numbers accepted); empty reads as absent.
fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(scalar).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_answers_read_like_json_answers() {
        let xml = r#"<?xml version="1.0"?><disk_attachments>
            <disk_attachment href="/x" id="d1"><bootable>false</bootable>
              <logical_name>/dev/vdb</logical_name><disk id="d1"><snapshot id="s1"/></disk>
            </disk_attachment></disk_attachments>"#;
        let (root, v) = xml_to_value(xml).unwrap();
        assert_eq!(root, "disk_attachments");
        // No interface: the attachment is refused, naming the field.
        let e = crate::api::decode::<crate::api::DiskAttachments>("GET /x", v.clone()).unwrap_err();
        assert!(e.to_string().contains("interface"), "{e}");
        let mut v = v;
        v["disk_attachment"]["interface"] = Value::String("virtio".into());
        let list: crate::api::DiskAttachments = crate::api::decode("GET /x", v).unwrap();
        assert_eq!(list.disk_attachment.len(), 1);
        let a = &list.disk_attachment[0];
        assert_eq!(a.logical_name.as_deref(), Some("/dev/vdb"));
        assert!(!a.bootable);
        assert_eq!(a.disk.snapshot.as_ref().map(|s| s.id.as_str()), Some("s1"));
    }

    #[test]
    fn request_bodies_round_trip_through_xml() {
        let body = serde_json::json!({"disk": {"id": "D", "snapshot": {"id": "S"}},
            "active": true, "bootable": false, "interface": "virtio"});
        let xml = to_xml("disk_attachment", &body);
        assert!(xml.starts_with("<disk_attachment><"), "{xml}");
        assert!(
            xml.contains(r#"<disk id="D"><snapshot id="S"></snapshot></disk>"#),
            "{xml}"
        );
        let (_, back) = xml_to_value(&xml).unwrap();
        let a: crate::api::DiskAttachment = crate::api::decode("POST /x", back).unwrap();
        assert_eq!(a.disk.snapshot.map(|s| s.id).as_deref(), Some("S"));
        assert_eq!(a.interface, "virtio");
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(parse_answer(b"<vm><name>x</na", false).is_err());
        assert!(parse_answer(b"{\"vm\": ", true).is_err());
        assert!(xml_to_value("<a></b>").is_err());
    }

    proptest::proptest! {
        /// Hostile answers never panic the parsers.
        #[test]
        fn arbitrary_answers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_answer(&bytes, false);
            let _ = parse_answer(&bytes, true);
        }

        /// Values written as XML read back with the same text fields.
        #[test]
        fn xml_round_trip(name in "[a-zA-Z0-9 <>&'\"]{0,40}", size in 0u64..u64::MAX, flag_v: bool) {
            let v = serde_json::json!({"id": "x", "alias": format!("a{name}"), "provisioned_size": size,
                "sparse": flag_v, "format": "raw"});
            let (_, back) = xml_to_value(&to_xml("disk", &v)).unwrap();
            let d: crate::api::Disk = crate::api::decode("GET /disks/x", back).unwrap();
            proptest::prop_assert_eq!(d.alias, format!("a{name}").trim_end().to_string());
            proptest::prop_assert_eq!(d.provisioned_size, size);
            proptest::prop_assert_eq!(d.sparse, flag_v);
        }
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b&c=d@x"), "a+b%26c%3Dd%40x");
    }
}
