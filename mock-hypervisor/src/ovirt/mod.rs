//! oVirt emulation: the REST API subset a backup application uses
//! (`/ovirt-engine/api`, XML and JSON), the SSO token endpoint, and an
//! imageio-like image server (`/images/{ticket}`). Every endpoint is
//! documented in the crate README ("oVirt API").
//!
//! Modules: [`wire`] (formats, faults, lenient readers), [`model`]
//! (persisted objects), [`api`] (VMs, disks, attachments, snapshots),
//! [`backups`] (4.4 backups, checkpoints, image transfers, image server),
//! [`ovf`] (VM configuration), [`import`] (a VM from an OVF), [`admin`] (test extensions), [`seed`].
//!
//! Two backup flows:
//! - snapshot-attach (the backup API seed): a snapshot's disks are attached
//!   to a backup appliance VM; an attached disk appears to the appliance
//!   as a sparse raw file under `<state-dir>/ovirt-appliance/`, removed
//!   on detach (writes to a live disk attached this way are written back
//!   on detach). Shortly after the attachment, links named after the
//!   disk's serial (`virtio-<id[..20]>`, `scsi-0QEMU_QEMU_HARDDISK_<id>`)
//!   appear in the appliance's `/dev/disk/by-id`,
//!   `<state-dir>/ovirt-appliance/by-id` (`device_root` in the endpoints),
//!   and go on detach. The attachment's `logical_name` is the file's path
//!   at once, or with `guest_agent_names` what an engine reports: `/dev/vdX`
//!   from the second poll on;
//! - incremental (4.4+): backups with checkpoints and image transfers; a
//!   transfer serves ranged GET/PUT, `OPTIONS` (features) and extents on
//!   the image server; only when configured (`transfer_nbd_url`, a mock
//!   extension outside the API model) the same data as an NBD export.
//!
//! Wire details the official SDK and imageio check (see
//! `tests/ovirt_sdk.rs`): dates are `xs:dateTime` in XML (milliseconds in
//! JSON), errors are `<fault>` bodies (unknown paths and methods too),
//! objects link by `id` and `href`, transfers name their `<host>`. With
//! `https` on, the API, SSO and image server are served over HTTPS only
//! ([`https`]).
//!
//! Locking: the inventory lock is never held across disk copies.

pub mod admin;
pub mod api;
pub mod backups;
pub mod https;
pub mod import;
pub mod model;
pub mod ovf;
pub mod seed;
pub mod system;
pub mod wire;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use crate::disk::lock;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;
use crate::inventory::Inventory;
use crate::platform::Platform;
use model::OvirtInventory;
use wire::{Fault, Format};

/// Settings of the oVirt emulation.
#[derive(Clone)]
pub struct OvirtConfig {
    /// Engine version (`4.5.5`); below 4.4 the backup API answers 404.
    pub version: String,
    /// SSO user name.
    pub username: String,
    /// SSO password.
    pub password: String,
    /// Status polls a new snapshot stays `locked`.
    pub snapshot_polls: u32,
    /// Polls per transitional backup phase.
    pub backup_polls: u32,
    /// Polls a transfer stays `initializing`.
    pub transfer_polls: u32,
    /// Token lifetime.
    pub token_ttl: Duration,
    /// Storage domain name.
    pub storage_domain: String,
    /// Whether transfers report `nbd_url`: a mock extension outside the
    /// API model (a real engine has no such field), off by default.
    pub transfer_nbd_url: bool,
    /// Serve the API, SSO and the image server over HTTPS (a second
    /// listener, certificates from the mock's CA) and refuse them over
    /// plain HTTP, as an engine does (the default). Off: plain HTTP (tests
    /// that ask for it).
    pub https: bool,
    /// Report an appliance attachment's `logical_name` as a real engine
    /// does: `/dev/vdX`, and only from the second poll of the attachment
    /// on (once "the guest agent" has reported it). Off (the default): the
    /// path of the file the mock serves the disk from, at once (a mock
    /// convenience for tests that read that file).
    pub guest_agent_names: bool,
    /// Create the `/dev/disk/by-id`-like links of disks attached to an
    /// appliance in [`OvirtPlatform::device_root`] (on by default); off:
    /// the device never appears to the appliance.
    pub device_links: bool,
    /// How long after an attachment its by-id links appear.
    pub device_link_delay: Duration,
}

impl std::fmt::Debug for OvirtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvirtConfig")
            .field("version", &self.version)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Default for OvirtConfig {
    fn default() -> Self {
        OvirtConfig {
            version: "4.5.5".into(),
            username: "admin@internal".into(),
            password: "ovirt-password".into(),
            snapshot_polls: 1,
            backup_polls: 1,
            transfer_polls: 1,
            token_ttl: Duration::from_secs(30 * 60),
            storage_domain: "data".into(),
            transfer_nbd_url: false,
            https: true,
            guest_agent_names: false,
            device_links: true,
            device_link_delay: Duration::from_millis(30),
        }
    }
}

/// A response to corrupt (malformed-response fault).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Malformed {
    /// HTTP method (any when absent).
    #[serde(default)]
    pub method: Option<String>,
    /// Substring of the path or route template.
    pub path: String,
    /// How many answers to corrupt (unlimited when absent).
    #[serde(default)]
    pub times: Option<u32>,
}

/// An answer to alter (tampered-answer fault): one field removed or given
/// another value, or the whole body replaced; the status is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tamper {
    /// HTTP method (any when absent).
    #[serde(default)]
    pub method: Option<String>,
    /// Substring of the path or route template.
    pub path: String,
    /// Element, attribute or JSON key to remove (every occurrence), or to
    /// set to `value`.
    #[serde(default)]
    pub field: Option<String>,
    /// New text of `field` (absent: remove the field).
    #[serde(default)]
    pub value: Option<String>,
    /// Replaces the whole body instead.
    #[serde(default)]
    pub body: Option<String>,
    /// How many answers to alter (unlimited when absent).
    #[serde(default)]
    pub times: Option<u32>,
}

/// oVirt-specific faults (generic HTTP faults also apply).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OvirtFaults {
    /// New snapshots stay `locked` forever.
    #[serde(default)]
    pub snapshot_stuck_locked: bool,
    /// Disk attachments fail once this many more have succeeded.
    #[serde(default)]
    pub attach_fail_after: Option<u32>,
    /// Answers cut in half (invalid XML/JSON) with status 200.
    #[serde(default)]
    pub malformed: Vec<Malformed>,
    /// Answers with a field removed or changed.
    #[serde(default)]
    pub tamper: Vec<Tamper>,
}

/// The oVirt platform.
#[derive(Debug)]
pub struct OvirtPlatform {
    hv: Arc<Hypervisor>,
    config: RwLock<OvirtConfig>,
    inv: Inventory<OvirtInventory>,
    tokens: Mutex<HashMap<String, Instant>>,
    faults: Mutex<OvirtFaults>,
    appliance_dir: PathBuf,
    device_root: PathBuf,
    /// Polls of each appliance attachment (for `guest_agent_names`).
    attachment_polls: Mutex<HashMap<String, u32>>,
    events: Mutex<Vec<Value>>,
    https: RwLock<Option<HttpsEndpoint>>,
}

/// Where the oVirt emulation serves HTTPS.
#[derive(Debug, Clone)]
pub struct HttpsEndpoint {
    /// `https://127.0.0.1:PORT`.
    pub base: String,
    /// The CA that signed the server certificate (`ca-cert.pem`).
    pub ca_file: PathBuf,
}

/// Request extension the HTTPS listener adds: the request came over TLS.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// API root.
pub const API: &str = "/ovirt-engine/api";

/// Parses `4.5.5` into comparable numbers.
pub fn parse_version(v: &str) -> Vec<u32> {
    v.split('.')
        .map(|p| p.trim().parse().unwrap_or(0))
        .collect()
}

impl OvirtPlatform {
    /// Loads (or starts) the inventory in `state_dir/ovirt.json`.
    pub fn open(hv: Arc<Hypervisor>, state_dir: &Path, config: OvirtConfig) -> Result<Arc<Self>> {
        let inv = Inventory::<OvirtInventory>::load(&state_dir.join("ovirt.json"))?;
        let appliance_dir = state_dir.join("ovirt-appliance");
        std::fs::create_dir_all(&appliance_dir).map_err(Error::io(&appliance_dir))?;
        let device_root = appliance_dir.join("by-id");
        std::fs::create_dir_all(&device_root).map_err(Error::io(&device_root))?;
        Ok(Arc::new(OvirtPlatform {
            hv,
            config: RwLock::new(config),
            inv,
            tokens: Mutex::new(HashMap::new()),
            faults: Mutex::new(OvirtFaults::default()),
            appliance_dir,
            device_root,
            attachment_polls: Mutex::new(HashMap::new()),
            events: Mutex::new(Vec::new()),
            https: RwLock::new(None),
        }))
    }

    /// Records where HTTPS is served (set by the mock at start).
    pub fn set_https(&self, endpoint: HttpsEndpoint) {
        *crate::disk::write_lock(&self.https) = Some(endpoint);
    }

    /// Where HTTPS is served, when it is.
    pub fn https(&self) -> Option<HttpsEndpoint> {
        crate::disk::read_lock(&self.https).clone()
    }

    /// The base URL clients reach the image server at: the HTTPS one when
    /// HTTPS is on, else the plain one the request came to.
    pub fn public_base(&self, headers: &axum::http::HeaderMap) -> String {
        if let Some(h) = self.https() {
            return h.base;
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        format!("http://{host}")
    }

    /// The audit log, oldest first.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.events).clone()
    }

    /// Appends an event; returns it as the API shows it.
    pub fn add_event(
        &self,
        description: &str,
        origin: &str,
        severity: &str,
        custom_id: Option<u64>,
        vm: Option<&str>,
    ) -> Value {
        let mut events = lock(&self.events);
        let id = events.len() as u64 + 1;
        let v = system::event_view(
            id,
            crate::ids::unix_now(),
            description,
            origin,
            severity,
            custom_id,
            vm,
        );
        events.push(v.clone());
        v
    }

    fn revoke_token(&self, token: &str) {
        lock(&self.tokens).remove(token);
    }

    /// Current settings.
    pub fn config(&self) -> RwLockReadGuard<'_, OvirtConfig> {
        crate::disk::read_lock(&self.config)
    }

    /// Changes the engine version at run time.
    pub fn set_version(&self, version: &str) {
        crate::disk::write_lock(&self.config).version = version.to_string();
    }

    /// Whether the engine version is at least `v`.
    pub fn version_at_least(&self, v: &str) -> bool {
        parse_version(&self.config().version) >= parse_version(v)
    }

    /// Shared hypervisor resources.
    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hv
    }

    /// The persisted inventory.
    pub fn inventory(&self) -> &Inventory<OvirtInventory> {
        &self.inv
    }

    /// Where appliance-attached disks are materialised.
    pub fn appliance_dir(&self) -> &Path {
        &self.appliance_dir
    }

    /// The appliance's `/dev/disk/by-id`: links named after the serial of
    /// each disk attached to an appliance (`virtio-<id[..20]>` on virtio,
    /// `scsi-0QEMU_QEMU_HARDDISK_<id>` otherwise) pointing at the file the
    /// disk is served from; listed as `device_root` in the endpoints.
    pub fn device_root(&self) -> &Path {
        &self.device_root
    }

    /// Counts one poll of an attachment; returns the count.
    pub(crate) fn poll_attachment(&self, key: &str) -> u32 {
        let mut m = lock(&self.attachment_polls);
        let n = m.entry(key.to_string()).or_default();
        *n += 1;
        *n
    }

    /// Polls of an attachment so far.
    pub(crate) fn attachment_polls(&self, key: &str) -> u32 {
        lock(&self.attachment_polls).get(key).copied().unwrap_or(0)
    }

    /// Forgets the polls of a detached attachment.
    pub(crate) fn forget_attachment(&self, key: &str) {
        lock(&self.attachment_polls).remove(key);
    }

    /// Arms oVirt faults (merged with those armed).
    pub fn add_faults(&self, f: OvirtFaults) {
        let mut cur = lock(&self.faults);
        cur.snapshot_stuck_locked |= f.snapshot_stuck_locked;
        if f.attach_fail_after.is_some() {
            cur.attach_fail_after = f.attach_fail_after;
        }
        cur.malformed.extend(f.malformed);
        cur.tamper.extend(f.tamper);
    }

    /// Disarms every oVirt fault.
    pub fn clear_faults(&self) {
        *lock(&self.faults) = OvirtFaults::default();
    }

    /// Armed faults.
    pub fn faults(&self) -> OvirtFaults {
        lock(&self.faults).clone()
    }

    pub(crate) fn snapshot_stuck(&self) -> bool {
        lock(&self.faults).snapshot_stuck_locked
    }

    /// Consumes one attachment from the attach-failure budget: `true` when
    /// this attachment must fail.
    pub(crate) fn attach_should_fail(&self) -> bool {
        let mut f = lock(&self.faults);
        match f.attach_fail_after {
            Some(0) => true,
            Some(n) => {
                f.attach_fail_after = Some(n - 1);
                false
            }
            None => false,
        }
    }

    fn take_malformed(&self, method: &str, path: &str, template: &str) -> bool {
        let mut f = lock(&self.faults);
        let Some(i) = f.malformed.iter().position(|m| {
            m.method
                .as_deref()
                .is_none_or(|x| x.eq_ignore_ascii_case(method))
                && (path.contains(&m.path) || template.contains(&m.path))
        }) else {
            return false;
        };
        if let Some(t) = &mut f.malformed[i].times {
            *t = t.saturating_sub(1);
            if *t == 0 {
                f.malformed.remove(i);
            }
        }
        true
    }

    fn take_tamper(&self, method: &str, path: &str, template: &str) -> Option<Tamper> {
        let mut f = lock(&self.faults);
        let i = f.tamper.iter().position(|m| {
            m.method
                .as_deref()
                .is_none_or(|x| x.eq_ignore_ascii_case(method))
                && (path.contains(&m.path) || template.contains(&m.path))
        })?;
        let t = f.tamper[i].clone();
        if let Some(n) = &mut f.tamper[i].times {
            *n = n.saturating_sub(1);
            if *n == 0 {
                f.tamper.remove(i);
            }
        }
        Some(t)
    }

    fn new_token(&self) -> String {
        let t = crate::ids::new_uuid().replace('-', "");
        let ttl = self.config().token_ttl;
        lock(&self.tokens).insert(t.clone(), Instant::now() + ttl);
        t
    }

    fn token_valid(&self, token: &str) -> bool {
        lock(&self.tokens)
            .get(token)
            .is_some_and(|exp| *exp > Instant::now())
    }
}

pub(crate) fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `POST /ovirt-engine/sso/oauth/token` (form: grant_type=password,
/// scope=ovirt-app-api, username, password) → `{"access_token", ...}`.
async fn token(State(p): State<Arc<OvirtPlatform>>, body: axum::body::Bytes) -> Response {
    let text = String::from_utf8_lossy(&body);
    let form: HashMap<String, String> = text
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (form_decode(k), form_decode(v)))
        .collect();
    let deny = |status: StatusCode, code: &str, desc: &str| {
        (
            status,
            axum::Json(json!({"error": code, "error_description": desc})),
        )
            .into_response()
    };
    if form.get("grant_type").map(String::as_str) != Some("password") {
        return deny(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be password",
        );
    }
    let ok = {
        let c = p.config();
        form.get("username") == Some(&c.username) && form.get("password") == Some(&c.password)
    };
    if !ok {
        return deny(
            StatusCode::UNAUTHORIZED,
            "access_denied",
            "Cannot authenticate user: invalid user name or password",
        );
    }
    let ttl = p.config().token_ttl.as_secs();
    let t = p.new_token();
    axum::Json(json!({
        "access_token": t,
        "scope": "ovirt-app-api",
        "exp": (crate::ids::unix_now() + ttl).to_string(),
        "token_type": "Bearer",
    }))
    .into_response()
}

/// Middleware: requires `Authorization: Bearer <token>`.
async fn require_token(State(p): State<Arc<OvirtPlatform>>, req: Request, next: Next) -> Response {
    let format = Format::of(req.headers());
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if token.is_empty() || !p.token_valid(token) {
        return Fault::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "a valid bearer token is required",
        )
        .in_format(format)
        .into_response();
    }
    next.run(req).await
}

/// Middleware: generic HTTP faults and malformed answers.
async fn inject_faults(State(p): State<Arc<OvirtPlatform>>, req: Request, next: Next) -> Response {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let format = Format::of(req.headers());
    if p.config().https && req.extensions().get::<OverTls>().is_none() {
        return Fault::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "the engine and its image server are served over HTTPS only",
        )
        .in_format(format)
        .into_response();
    }
    let decision = p.hv.faults.http_call(&method, &path, &template);
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }
    if let Some((status, _code, message)) = decision.error {
        return Fault::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "Operation Failed",
            message,
        )
        .in_format(format)
        .into_response();
    }
    let malformed = p.take_malformed(&method, &path, &template);
    let tamper = p.take_tamper(&method, &path, &template);
    let resp = next.run(req).await;
    if let Some(t) = tamper {
        let (mut parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 64 << 20)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let altered = match (&t.body, &t.field) {
            (Some(b), _) => b.clone(),
            (None, Some(field)) => wire::tamper(&text, field, t.value.as_deref()),
            (None, None) => text,
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::from(altered));
    }
    if !malformed {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let cut = bytes.len() / 2;
    let mut broken = bytes[..cut].to_vec();
    broken.extend_from_slice(b"<\x01{");
    parts.status = StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(broken))
}

impl Platform for OvirtPlatform {
    fn name(&self) -> &'static str {
        "ovirt"
    }

    fn api_router(self: Arc<Self>) -> Router {
        let a = |p: &str| format!("{API}{p}");
        let protected = Router::new()
            .route(API, get(api::product_info))
            .route(&a("/vms"), get(api::list_vms).post(api::create_vm))
            .route(&a("/vms/{vm}"), get(api::get_vm).delete(api::delete_vm))
            .route(&a("/vms/{vm}/nics"), get(api::list_nics))
            .route(&a("/vnicprofiles"), get(system::list_vnic_profiles))
            .route(&a("/vnicprofiles/{id}"), get(system::get_vnic_profile))
            .route(
                &a("/vms/{vm}/diskattachments"),
                get(api::list_attachments).post(api::attach),
            )
            .route(
                &a("/vms/{vm}/diskattachments/{disk}"),
                get(api::get_attachment)
                    .put(api::update_attachment)
                    .delete(api::detach),
            )
            .route(
                &a("/vms/{vm}/snapshots"),
                get(api::list_snapshots).post(api::create_snapshot),
            )
            .route(
                &a("/vms/{vm}/snapshots/{snapshot}"),
                get(api::get_snapshot).delete(api::delete_snapshot),
            )
            .route(
                &a("/vms/{vm}/snapshots/{snapshot}/disks"),
                get(api::snapshot_disks),
            )
            .route(
                &a("/vms/{vm}/backups"),
                get(backups::list_backups).post(backups::start_backup),
            )
            .route(&a("/vms/{vm}/backups/{backup}"), get(backups::get_backup))
            .route(
                &a("/vms/{vm}/backups/{backup}/disks"),
                get(backups::backup_disks),
            )
            .route(&a("/hosts"), get(system::list_hosts))
            .route(&a("/hosts/{id}"), get(system::get_host))
            .route(&a("/datacenters"), get(system::list_data_centers))
            .route(&a("/datacenters/{id}"), get(system::get_data_center))
            .route(&a("/storagedomains"), get(system::list_storage_domains))
            .route(&a("/storagedomains/{id}"), get(system::get_storage_domain))
            .route(
                &a("/events"),
                get(system::list_events).post(system::add_event),
            )
            .route(&a("/jobs"), get(system::list_jobs))
            .route(&a("/jobs/{id}"), get(system::get_job))
            .route(&a("/{*rest}"), axum::routing::any(system::not_found))
            .route(
                &a("/vms/{vm}/backups/{backup}/finalize"),
                post(backups::finalize_backup),
            )
            .route(&a("/vms/{vm}/checkpoints"), get(backups::list_checkpoints))
            .route(
                &a("/vms/{vm}/checkpoints/{checkpoint}"),
                get(backups::get_checkpoint).delete(backups::delete_checkpoint),
            )
            .route(&a("/disks"), get(api::list_disks).post(api::create_disk))
            .route(
                &a("/disks/{disk}"),
                get(api::get_disk).delete(api::delete_disk),
            )
            .route(
                &a("/imagetransfers"),
                get(backups::list_transfers).post(backups::start_transfer),
            )
            .route(&a("/imagetransfers/{transfer}"), get(backups::get_transfer))
            .route(
                &a("/imagetransfers/{transfer}/finalize"),
                post(backups::finalize_transfer),
            )
            .route(
                &a("/imagetransfers/{transfer}/cancel"),
                post(backups::cancel_transfer),
            )
            .route_layer(from_fn_with_state(self.clone(), require_token));
        Router::new()
            .route("/ovirt-engine/sso/oauth/token", post(token))
            .route(
                "/ovirt-engine/services/sso-logout",
                post(system::sso_logout),
            )
            .route(
                "/ovirt-engine/{*rest}",
                axum::routing::any(system::not_found),
            )
            .route(
                "/images/{ticket}",
                get(backups::image_get)
                    .put(backups::image_put)
                    .options(backups::image_options),
            )
            .route("/images/{ticket}/extents", get(backups::image_extents))
            .merge(protected)
            .method_not_allowed_fallback(system::method_not_allowed)
            .route_layer(from_fn_with_state(self.clone(), inject_faults))
            .with_state(self)
    }

    fn admin_router(self: Arc<Self>) -> Router {
        admin::router(self)
    }

    fn endpoint(&self, http_base: &str) -> Value {
        let c = self.config();
        let https = self.https();
        let base = https.as_ref().map_or(http_base, |h| h.base.as_str());
        json!({
            "engine_url": base,
            "ca_file": https.as_ref().map(|h| h.ca_file.display().to_string()),
            "base_url": format!("{base}{API}"),
            "sso_url": format!("{base}/ovirt-engine/sso/oauth/token"),
            "username": c.username,
            "password": c.password,
            "version": c.version,
            "device_root": self.device_root.display().to_string(),
        })
    }

    fn objects(&self) -> Value {
        admin::objects(self)
    }
}
