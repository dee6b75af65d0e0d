//! The engine's system objects a backup application and the SDK examples
//! touch besides VMs and disks: the one host, data center, cluster and
//! storage domain of the emulated setup (`/hosts`, `/datacenters`,
//! `/clusters`, `/storagedomains`), the audit log (`/events`, in memory),
//! `/jobs`, SSO logout (`/ovirt-engine/services/sso-logout`), and the XML
//! `<fault>` answers of unknown paths and methods.
//!
//! The ids of the fixed objects derive from their names, so they stay the
//! same across restarts of one state directory.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::api::{created, done, ok};
use super::wire::{self, Fault, Format, parse_body, text};
use super::{API, OvirtPlatform};

type P = State<Arc<OvirtPlatform>>;
type Q = Query<HashMap<String, String>>;

/// A stable UUID for a fixed object (`kind`, `name`).
pub fn fixed_id(kind: &str, name: &str) -> String {
    let h = Sha256::digest(format!("ovirt-mock/{kind}/{name}").as_bytes());
    let x: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-4{}-8{}-{}",
        &x[0..8],
        &x[8..12],
        &x[13..16],
        &x[17..20],
        &x[20..32]
    )
}

/// The one host's name.
pub const HOST_NAME: &str = "host1";
/// The data center's name.
pub const DATA_CENTER: &str = "Default";

/// Id of the emulated host.
pub fn host_id() -> String {
    fixed_id("host", HOST_NAME)
}

/// Id of the storage domain `name`.
pub fn storage_domain_id(name: &str) -> String {
    fixed_id("storagedomain", name)
}

/// `{"id", "href"}` of the host.
pub fn host_link() -> Value {
    let id = host_id();
    json!({"id": id, "href": format!("{API}/hosts/{id}")})
}

/// `{"id", "href"}` of a storage domain.
pub fn storage_domain_link(name: &str) -> Value {
    let id = storage_domain_id(name);
    json!({"id": id, "href": format!("{API}/storagedomains/{id}")})
}

fn data_center_view() -> Value {
    let id = fixed_id("datacenter", DATA_CENTER);
    json!({
        "id": id,
        "href": format!("{API}/datacenters/{id}"),
        "name": DATA_CENTER,
        "local": false,
        "status": "up",
        "storage_format": "v5",
        "version": {"major": 4, "minor": 7},
    })
}

fn host_view() -> Value {
    let mut v = host_link();
    v["name"] = json!(HOST_NAME);
    v["address"] = json!("127.0.0.1");
    v["status"] = json!("up");
    v["type"] = json!("rhel");
    v["cluster"] = cluster_link();
    v
}

fn cluster_link() -> Value {
    let id = fixed_id("cluster", "Default");
    json!({"id": id, "href": format!("{API}/clusters/{id}")})
}

fn storage_domain_view(p: &OvirtPlatform) -> Value {
    let name = p.config().storage_domain.clone();
    let mut v = storage_domain_link(&name);
    v["name"] = json!(name);
    v["type"] = json!("data");
    v["storage_format"] = json!("v5");
    v["status"] = json!("active");
    v["external_status"] = json!("ok");
    v["master"] = json!(true);
    v["available"] = json!(1u64 << 40);
    v["used"] = json!(1u64 << 30);
    v["storage"] = json!({"type": "nfs", "address": "127.0.0.1", "path": "/exports/data"});
    v["data_centers"] = json!({"data_center": [{"id": fixed_id("datacenter", DATA_CENTER)}]});
    v
}

/// `search=name=X` (also `name=X and ...`): the name asked for, if any.
fn searched_name(q: &HashMap<String, String>) -> Option<String> {
    let s = q.get("search")?;
    s.split(" and ")
        .find_map(|c| c.trim().strip_prefix("name="))
        .map(|n| n.trim().to_string())
}

fn one_or_none(v: Value, q: &HashMap<String, String>) -> Vec<Value> {
    match searched_name(q) {
        Some(n) if v.get("name").and_then(Value::as_str) != Some(n.as_str()) => Vec::new(),
        _ => vec![v],
    }
}

/// The management network's vNIC profile (the only one).
fn vnic_profile_view() -> Value {
    use super::import::{MANAGEMENT_NETWORK, MANAGEMENT_NETWORK_ID, MANAGEMENT_PROFILE_ID};
    json!({
        "id": MANAGEMENT_PROFILE_ID,
        "href": format!("{API}/vnicprofiles/{MANAGEMENT_PROFILE_ID}"),
        "name": MANAGEMENT_NETWORK,
        "pass_through": {"mode": "disabled"},
        "port_mirroring": false,
        "network": {"id": MANAGEMENT_NETWORK_ID, "href": format!("{API}/networks/{MANAGEMENT_NETWORK_ID}")},
    })
}

/// `GET /vnicprofiles`.
pub async fn list_vnic_profiles(headers: HeaderMap) -> Response {
    done(
        Format::of(&headers),
        Ok(ok(
            "vnic_profiles",
            json!({"vnic_profile": [vnic_profile_view()]}),
        )),
    )
}

/// `GET /vnicprofiles/{id}`.
pub async fn get_vnic_profile(headers: HeaderMap, Path(id): Path<String>) -> Response {
    let v = vnic_profile_view();
    let r = if v["id"] == json!(id) {
        Ok(ok("vnic_profile", v))
    } else {
        Err(Fault::not_found("VNIC profile", &id))
    };
    done(Format::of(&headers), r)
}

/// `GET /hosts`.
pub async fn list_hosts(headers: HeaderMap, Query(q): Q) -> Response {
    let list = one_or_none(host_view(), &q);
    done(Format::of(&headers), Ok(ok("hosts", json!({"host": list}))))
}

/// `GET /hosts/{id}`.
pub async fn get_host(headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = if id == host_id() {
        Ok(ok("host", host_view()))
    } else {
        Err(Fault::not_found("Host", &id))
    };
    done(Format::of(&headers), r)
}

/// `GET /datacenters`.
pub async fn list_data_centers(headers: HeaderMap, Query(q): Q) -> Response {
    let list = one_or_none(data_center_view(), &q);
    done(
        Format::of(&headers),
        Ok(ok("data_centers", json!({"data_center": list}))),
    )
}

/// `GET /datacenters/{id}`.
pub async fn get_data_center(headers: HeaderMap, Path(id): Path<String>) -> Response {
    let v = data_center_view();
    let r = if v["id"] == json!(id) {
        Ok(ok("data_center", v))
    } else {
        Err(Fault::not_found("Data center", &id))
    };
    done(Format::of(&headers), r)
}

/// `GET /storagedomains`.
pub async fn list_storage_domains(State(p): P, headers: HeaderMap, Query(q): Q) -> Response {
    let v = storage_domain_view(&p);
    let list = one_or_none(v, &q);
    done(
        Format::of(&headers),
        Ok(ok("storage_domains", json!({"storage_domain": list}))),
    )
}

/// `GET /storagedomains/{id}`.
pub async fn get_storage_domain(
    State(p): P,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let v = storage_domain_view(&p);
    let r = if v["id"] == json!(id) {
        Ok(ok("storage_domain", v))
    } else {
        Err(Fault::not_found("Storage domain", &id))
    };
    done(Format::of(&headers), r)
}

/// `GET /jobs`: the mock runs every command synchronously, so no job is
/// ever left running; finished ones are not kept.
pub async fn list_jobs(headers: HeaderMap) -> Response {
    done(Format::of(&headers), Ok(ok("jobs", json!({"job": []}))))
}

/// `GET /jobs/{id}`.
pub async fn get_job(headers: HeaderMap, Path(id): Path<String>) -> Response {
    done(Format::of(&headers), Err(Fault::not_found("Job", &id)))
}

/// `GET /events[?search=TEXT]`: newest first; a search matches the
/// description (or the correlation of a backup: its id).
pub async fn list_events(State(p): P, headers: HeaderMap, Query(q): Q) -> Response {
    let search = q.get("search").cloned().unwrap_or_default();
    let list: Vec<Value> = p
        .events()
        .into_iter()
        .rev()
        .filter(|e| {
            search.is_empty()
                || e.get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| d.contains(search.trim()))
        })
        .collect();
    done(
        Format::of(&headers),
        Ok(ok("events", json!({"event": list}))),
    )
}

/// `POST /events`: `<event><description/><origin/><severity/>
/// <custom_id/>[<vm id=""/>]</event>`.
pub async fn add_event(State(p): P, headers: HeaderMap, body: Bytes) -> Response {
    let format = Format::of(&headers);
    let r = (|| {
        let req = parse_body(&headers, &body)?;
        let description = text(&req, "description")
            .ok_or_else(|| Fault::bad_request("event.description is required"))?;
        let origin =
            text(&req, "origin").ok_or_else(|| Fault::bad_request("event.origin is required"))?;
        let severity = text(&req, "severity")
            .ok_or_else(|| Fault::bad_request("event.severity is required"))?;
        if !["alert", "error", "normal", "warning"].contains(&severity.as_str()) {
            return Err(Fault::bad_request(format!("unknown severity {severity}")));
        }
        let custom_id = wire::number(&req, "custom_id")?;
        let vm = wire::nested_id(&req, "vm");
        if let Some(vm) = &vm
            && p.inv.read(|doc| !doc.vms.contains_key(vm))
        {
            return Err(Fault::not_found("VM", vm));
        }
        Ok(created(
            "event",
            p.add_event(&description, &origin, &severity, custom_id, vm.as_deref()),
        ))
    })();
    done(format, r)
}

/// `POST /ovirt-engine/services/sso-logout` (form: `scope`, `token`):
/// revokes the token; answers `{}` as the engine does.
pub async fn sso_logout(State(p): P, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body);
    for kv in text.split('&') {
        if let Some(("token", t)) = kv.split_once('=') {
            p.revoke_token(&super::form_decode(t));
        }
    }
    axum::Json(json!({})).into_response()
}

/// Unknown paths under `/ovirt-engine`: a 404 `<fault>`, as the engine
/// answers (the SDK maps it to `NotFoundError`).
pub async fn not_found(headers: HeaderMap, uri: axum::http::Uri) -> Response {
    Fault::new(
        StatusCode::NOT_FOUND,
        "Not Found",
        format!("no such resource: {}", uri.path()),
    )
    .in_format(Format::of(&headers))
    .into_response()
}

/// A known path with another method: a 405 `<fault>`.
pub async fn method_not_allowed(headers: HeaderMap, method: axum::http::Method) -> Response {
    Fault::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        format!("{method} is not allowed on this resource"),
    )
    .in_format(Format::of(&headers))
    .into_response()
}

/// An event as the API shows it.
pub fn event_view(
    id: u64,
    time: u64,
    description: &str,
    origin: &str,
    severity: &str,
    custom_id: Option<u64>,
    vm: Option<&str>,
) -> Value {
    json!({
        "id": id.to_string(),
        "href": format!("{API}/events/{id}"),
        "code": if origin == "oVirt" { 0 } else { 9000 + id % 100 },
        "description": description,
        "origin": origin,
        "severity": severity,
        "custom_id": custom_id.map(|c| c as i64).unwrap_or(-1),
        "flood_rate": 30,
        "time": wire::date(time),
        "vm": vm.map(|v| json!({"id": v, "href": format!("{API}/vms/{v}")})),
    })
}
