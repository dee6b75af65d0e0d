//! oVirt wire formats: XML by default, JSON on `Accept` / `Content-Type:
//! application/json`.
//!
//! Handlers build answers as [`serde_json::Value`] trees in the JSON shape
//! (`{"vm": [...]}` for collections, nested lists as
//! `{"disks": {"disk": [...]}}`); [`render`] turns them into either format.
//! In XML, the keys `id` and `href` become attributes and arrays become
//! repeated elements; in JSON every number and boolean is sent as a string,
//! as the real engine does.
//!
//! Request bodies go the other way through [`parse_body`]: XML elements
//! become objects (attributes as keys), text-only elements strings, and
//! repeated elements arrays. Readers use the lenient accessors ([`text`],
//! [`number`], [`flag`], [`list`]) that accept strings for numbers and
//! booleans, and one element where a list is expected.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quick_xml::Reader;
use quick_xml::events::Event;
use serde_json::{Map, Value};

/// Response format chosen by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/xml` (the default).
    Xml,
    /// `application/json`.
    Json,
}

impl Format {
    /// From the `Accept` header.
    pub fn of(headers: &HeaderMap) -> Format {
        match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
            Some(a) if a.contains("json") => Format::Json,
            _ => Format::Xml,
        }
    }
}

/// An oVirt fault answer: `<fault><reason/><detail/></fault>`.
#[derive(Debug, Clone)]
pub struct Fault {
    /// HTTP status.
    pub status: StatusCode,
    /// Short reason ("Operation Failed").
    pub reason: String,
    /// Details.
    pub detail: String,
    /// Answer format.
    pub format: Format,
}

impl Fault {
    /// Any fault.
    pub fn new(status: StatusCode, reason: &str, detail: impl Into<String>) -> Self {
        Fault {
            status,
            reason: reason.into(),
            detail: detail.into(),
            format: Format::Xml,
        }
    }

    /// 400 with a detail.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Incomplete parameters", detail)
    }

    /// 404.
    pub fn not_found(kind: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "Not Found",
            format!("{kind} {id} was not found"),
        )
    }

    /// 409 (an object in the wrong state).
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Operation Failed", detail)
    }

    /// Sets the answer format.
    pub fn in_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }
}

impl From<crate::error::Error> for Fault {
    fn from(e: crate::error::Error) -> Self {
        use crate::error::Error as E;
        let status = match &e {
            E::NotFound { .. } => StatusCode::NOT_FOUND,
            E::Invalid(_) => StatusCode::BAD_REQUEST,
            E::Conflict(_) | E::Refused(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Fault::new(status, "Operation Failed", e.to_string())
    }
}

impl IntoResponse for Fault {
    fn into_response(self) -> Response {
        let body =
            serde_json::json!({"reason": self.reason, "detail": format!("[{}]", self.detail)});
        render_status(self.status, self.format, "fault", &body)
    }
}

/// Result of an API handler.
pub type ApiResult = std::result::Result<Response, Fault>;

/// Answers 200 with `value` as element `root`.
pub fn render(format: Format, root: &str, value: &Value) -> Response {
    render_status(StatusCode::OK, format, root, value)
}

/// Answers `status` with `value` as element `root`.
pub fn render_status(status: StatusCode, format: Format, root: &str, value: &Value) -> Response {
    let (body, ctype) = match format {
        Format::Json => (
            serde_json::to_string(&stringify(value)).unwrap_or_default(),
            "application/json",
        ),
        Format::Xml => {
            let mut out =
                String::from("<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n");
            write_xml(&mut out, root, value);
            (out, "application/xml")
        }
    };
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// An answer (XML or JSON, told apart by its first character) with every
/// occurrence of `field` (element, attribute or key) removed, or its text
/// set to `value` (fault injection: answers that miss a field).
pub fn tamper(text: &str, field: &str, value: Option<&str>) -> String {
    if let Ok(mut v) = serde_json::from_str::<Value>(text) {
        tamper_json(&mut v, field, value);
        return serde_json::to_string(&v).unwrap_or_default();
    }
    let mut out = tamper_attributes(text, field, value);
    // Elements `<field>…</field>`, `<field …>…</field>`, `<field/>`.
    let open = format!("<{field}");
    let close = format!("</{field}>");
    let mut from = 0;
    while let Some(at) = out[from..].find(&open).map(|i| i + from) {
        let rest = &out[at + open.len()..];
        if !rest.starts_with(['>', '/', ' ']) {
            from = at + open.len();
            continue;
        }
        let Some(gt) = rest.find('>').map(|i| at + open.len() + i) else {
            break;
        };
        let self_closing = out[..gt].ends_with('/');
        let end = if self_closing {
            gt + 1
        } else {
            match out[gt..].find(&close) {
                Some(i) => gt + i + close.len(),
                None => break,
            }
        };
        match value {
            None => {
                out.replace_range(at..end, "");
                from = at;
            }
            Some(v) => {
                let new = format!("<{field}>{}</{field}>", quick_xml::escape::escape(v));
                out.replace_range(at..end, &new);
                from = at + new.len();
            }
        }
    }
    out
}

fn tamper_attributes(text: &str, field: &str, value: Option<&str>) -> String {
    let pat = format!(" {field}=\"");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&pat) {
        out.push_str(&rest[..at]);
        let after = &rest[at + pat.len()..];
        let end = after.find('"').unwrap_or(after.len());
        if let Some(v) = value {
            out.push_str(&format!(" {field}=\"{}\"", quick_xml::escape::escape(v)));
        }
        rest = &after[(end + 1).min(after.len())..];
    }
    out.push_str(rest);
    out
}

fn tamper_json(v: &mut Value, field: &str, value: Option<&str>) {
    match v {
        Value::Object(map) => {
            match value {
                None => {
                    map.remove(field);
                }
                Some(x) => {
                    if let Some(slot) = map.get_mut(field) {
                        *slot = Value::String(x.to_string());
                    }
                }
            }
            map.values_mut().for_each(|c| tamper_json(c, field, value));
        }
        Value::Array(a) => a.iter_mut().for_each(|c| tamper_json(c, field, value)),
        _ => {}
    }
}

/// A date field (`xs:dateTime` in XML, milliseconds since the epoch in
/// JSON, as the engine renders them) from seconds since the epoch.
pub fn date(secs: u64) -> Value {
    serde_json::json!({ DATE_KEY: secs })
}

const DATE_KEY: &str = "$date";

fn date_secs(v: &Value) -> Option<u64> {
    match v {
        Value::Object(m) if m.len() == 1 => m.get(DATE_KEY).and_then(Value::as_u64),
        _ => None,
    }
}

/// `2024-05-01T10:20:30.000+00:00` (the engine's `xs:dateTime`).
pub fn xs_date_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000+00:00",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Numbers and booleans as strings, recursively (dates as milliseconds).
pub fn stringify(value: &Value) -> Value {
    if let Some(secs) = date_secs(value) {
        return Value::String((secs * 1000).to_string());
    }
    match value {
        Value::Number(n) => Value::String(n.to_string()),
        Value::Bool(b) => Value::String(b.to_string()),
        Value::Array(a) => Value::Array(a.iter().map(stringify).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), stringify(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn write_xml(out: &mut String, name: &str, value: &Value) {
    if let Some(secs) = date_secs(value) {
        out.push_str(&format!("<{name}>{}</{name}>", xs_date_time(secs)));
        return;
    }
    match value {
        Value::Null => {}
        Value::Array(items) => items.iter().for_each(|i| write_xml(out, name, i)),
        Value::Object(map) => {
            out.push('<');
            out.push_str(name);
            for key in ["href", "id"] {
                if let Some(t) = map.get(key).and_then(scalar_text) {
                    out.push_str(&format!(" {key}=\"{}\"", quick_xml::escape::escape(t)));
                }
            }
            let children: Vec<_> = map
                .iter()
                .filter(|(k, v)| *k != "href" && *k != "id" && !v.is_null())
                .collect();
            if children.is_empty() {
                out.push_str("/>");
                return;
            }
            out.push('>');
            for (k, v) in children {
                write_xml(out, k, v);
            }
            out.push_str(&format!("</{name}>"));
        }
        scalar => {
            let t = scalar_text(scalar).unwrap_or_default();
            out.push_str(&format!(
                "<{name}>{}</{name}>",
                quick_xml::escape::escape(t.as_str())
            ));
        }
    }
}

/// Parses a request body by its `Content-Type` (JSON, else XML) into the
/// JSON shape; an empty body reads as `{}`.
pub fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, Fault> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("json"));
    if json {
        serde_json::from_slice(body)
            .map_err(|e| Fault::bad_request(format!("malformed JSON body: {e}")))
    } else {
        let text = std::str::from_utf8(body)
            .map_err(|_| Fault::bad_request("the XML body is not UTF-8"))?;
        xml_to_value(text)
            .map(|(_, v)| v)
            .map_err(|e| Fault::bad_request(format!("malformed XML body: {e}")))
    }
}

struct Node {
    name: String,
    map: Map<String, Value>,
    text: String,
}

fn attach(parent: &mut Map<String, Value>, name: String, value: Value) {
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

fn finish(node: Node) -> (String, Value) {
    let value = if node.map.is_empty() {
        Value::String(node.text.trim().to_string())
    } else {
        Value::Object(node.map)
    };
    (node.name, value)
}

/// Parses an XML document into `(root element name, value)`.
pub fn xml_to_value(text: &str) -> Result<(String, Value), String> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Node> = Vec::new();
    let mut root = None;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| format!("at byte {}: {e}", reader.buffer_position()))?;
        match ev {
            Event::Start(e) | Event::Empty(e) if root.is_some() => {
                let _ = e;
                return Err("content after the root element".into());
            }
            Event::Start(e) => {
                stack.push(open(&e)?);
            }
            Event::Empty(e) => {
                let node = open(&e)?;
                let (name, value) = finish(node);
                match stack.last_mut() {
                    Some(p) => attach(&mut p.map, name, value),
                    None => root = Some((name, value)),
                }
            }
            Event::End(_) => {
                let node = stack.pop().ok_or("unbalanced end tag")?;
                let (name, value) = finish(node);
                match stack.last_mut() {
                    Some(p) => attach(&mut p.map, name, value),
                    None => root = Some((name, value)),
                }
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| e.to_string())?;
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&s);
                } else if !s.trim().is_empty() {
                    return Err("text outside the root element".into());
                }
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| e.to_string())?;
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&s);
                }
            }
            Event::GeneralRef(r) => {
                let ch = match r.resolve_char_ref().map_err(|e| e.to_string())? {
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
                    n.text.push(ch);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(format!(
            "element <{}> is not closed",
            stack[stack.len() - 1].name
        ));
    }
    root.ok_or_else(|| "no root element".to_string())
}

fn open(e: &quick_xml::events::BytesStart<'_>) -> Result<Node, String> {
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut map = Map::new();
    for a in e.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a.unescape_value().map_err(|e| e.to_string())?;
        map.insert(key, Value::String(value.into_owned()));
    }
    Ok(Node {
        name,
        map,
        text: String::new(),
    })
}

/// A string field (numbers accepted).
pub fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(scalar_text).filter(|s| !s.is_empty())
}

/// A number field given as a number or a string.
pub fn number(v: &Value, key: &str) -> Result<Option<u64>, Fault> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| Fault::bad_request(format!("{key} must be a non-negative integer"))),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Fault::bad_request(format!("{key} must be a number, not {s:?}"))),
        Some(other) => Err(Fault::bad_request(format!(
            "{key} must be a number, not {other}"
        ))),
    }
}

/// A boolean field given as a boolean or `"true"`/`"false"`.
pub fn flag(v: &Value, key: &str) -> Result<Option<bool>, Fault> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => match s.trim() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            other => Err(Fault::bad_request(format!(
                "{key} must be true or false, not {other:?}"
            ))),
        },
        Some(other) => Err(Fault::bad_request(format!(
            "{key} must be true or false, not {other}"
        ))),
    }
}

/// `{"disks": {"disk": [..]}}` (or one `disk`) as a list.
pub fn list<'a>(v: &'a Value, outer: &str, inner: &str) -> Vec<&'a Value> {
    match v.get(outer).and_then(|o| o.get(inner)) {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(one @ Value::Object(_)) => vec![one],
        _ => Vec::new(),
    }
}

/// The `id` of a nested object (`{"disk": {"id": ..}}`).
pub fn nested_id(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(|o| text(o, "id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_round_trip_with_attributes_lists_and_entities() {
        let v = serde_json::json!({
            "id": "a&b",
            "name": "vm <1>",
            "disks": {"disk": [{"id": "d1"}, {"id": "d2", "format": "cow"}]},
            "size": 10,
            "active": true,
        });
        let mut out = String::new();
        write_xml(&mut out, "vm", &v);
        let (root, back) = xml_to_value(&out).unwrap();
        assert_eq!(root, "vm");
        assert_eq!(text(&back, "id").as_deref(), Some("a&b"));
        assert_eq!(text(&back, "name").as_deref(), Some("vm <1>"));
        assert_eq!(list(&back, "disks", "disk").len(), 2);
        assert_eq!(number(&back, "size").unwrap(), Some(10));
        assert_eq!(flag(&back, "active").unwrap(), Some(true));
    }

    #[test]
    fn tampered_answers_miss_or_change_a_field() {
        let xml = r#"<disk id="d" href="/x"><alias>a</alias><provisioned_size>10</provisioned_size><disks><disk id="e"/></disks></disk>"#;
        let t = super::tamper(xml, "provisioned_size", None);
        assert_eq!(
            t,
            r#"<disk id="d" href="/x"><alias>a</alias><disks><disk id="e"/></disks></disk>"#
        );
        let t = super::tamper(xml, "provisioned_size", Some("ten"));
        assert!(
            t.contains("<provisioned_size>ten</provisioned_size>"),
            "{t}"
        );
        let t = super::tamper(xml, "id", None);
        assert!(!t.contains("id="), "{t}");
        let t = super::tamper(xml, "disks", None);
        assert!(!t.contains("disks") && t.contains("<alias>"), "{t}");
        let json = r#"{"disk":[{"id":"d","provisioned_size":"10"}]}"#;
        let t = super::tamper(json, "provisioned_size", None);
        assert_eq!(t, r#"{"disk":[{"id":"d"}]}"#);
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(xml_to_value("<vm><name>x</vm>").is_err());
        assert!(xml_to_value("<vm>").is_err());
        assert!(xml_to_value("").is_err());
    }

    #[test]
    fn dates_are_xs_date_time_in_xml_and_milliseconds_in_json() {
        assert_eq!(xs_date_time(0), "1970-01-01T00:00:00.000+00:00");
        assert_eq!(xs_date_time(1_700_000_000), "2023-11-14T22:13:20.000+00:00");
        assert_eq!(xs_date_time(951_782_400), "2000-02-29T00:00:00.000+00:00");
        let mut out = String::new();
        write_xml(
            &mut out,
            "vm",
            &serde_json::json!({"creation_time": date(1)}),
        );
        assert_eq!(
            out,
            "<vm><creation_time>1970-01-01T00:00:01.000+00:00</creation_time></vm>"
        );
        assert_eq!(
            stringify(&serde_json::json!({"date": date(2)})),
            serde_json::json!({"date": "2000"})
        );
    }

    #[test]
    fn json_scalars_become_strings() {
        let v = stringify(&serde_json::json!({"a": 1, "b": [true, null], "c": null}));
        assert_eq!(v, serde_json::json!({"a": "1", "b": ["true", null]}));
    }
}
