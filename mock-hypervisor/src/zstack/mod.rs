//! ZStack emulation: the `/zstack/v1` REST API subset a backup product
//! uses (session login, async API jobs, images on backup storage, the
//! primary storage image cache, VMs, volumes, volume snapshots, templates,
//! export from backup storage over HTTP, the `image.num` quota). Every
//! endpoint is documented in the crate README (section "ZStack API").
//!
//! Modules: [`model`] (persisted objects), [`api`] (REST handlers),
//! [`transfer`] (export downloads with `Range`, AddImage fetches from
//! `http(s)://` URLs only, as a backup storage host), [`admin`] (test-only extensions),
//! [`seed`] (demo content).
//!
//! Locking: the inventory lock is never held across a copy; long work
//! (template creation, downloads) runs in background tasks that report
//! through the API job board.
//!
//! Test-only faults (never reached without arming them through the admin
//! API): the shared HTTP faults of `POST /admin/faults/http` answer as a
//! proxy in front of an unavailable management node would (the status
//! with a plain-text body, no ZStack error object), and the ZStack faults
//! of `POST /admin/zstack/faults` ([`ZsFaultKind`]) break answers the
//! ways a platform can: a job result lost, an image stuck, an export
//! broken, a field missing from an answer.

pub mod admin;
pub mod api;
mod message_api;
pub mod model;
pub mod seed;
pub mod transfer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use crate::disk::lock;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;
use crate::inventory::Inventory;
use crate::platform::Platform;
use model::{BackupStorage, ZsInventory, zs_uuid};

/// Settings of the ZStack emulation.
#[derive(Debug, Clone)]
pub struct ZStackConfig {
    /// Account name.
    pub account: String,
    /// Account password (clients send its SHA-512 hex digest).
    pub password: String,
    /// Polls an API job answers 202 before its result (default 1).
    pub job_polls: u32,
    /// Private-image quota (`image.num`) on first start (default 50).
    pub image_quota: u64,
    /// Backup storage names created on first start.
    pub backup_storages: Vec<String>,
    /// Lifetime of a session from its login, in seconds (ZStack's
    /// `session.timeout`, default 7200); then the session answers 401.
    pub session_timeout_secs: f64,
    /// Whether the volume snapshot group API (ZStack 3.6+) exists
    /// (default true); false answers its calls like an older ZStack: 404.
    pub snapshot_groups: bool,
}

impl Default for ZStackConfig {
    fn default() -> Self {
        ZStackConfig {
            account: "admin".into(),
            password: "password".into(),
            job_polls: 1,
            image_quota: 50,
            backup_storages: vec!["imagestore-1".into(), "imagestore-2".into()],
            session_timeout_secs: 7200.0,
            snapshot_groups: true,
        }
    }
}

/// A ZStack API error: HTTP status plus `{"error": {code, description,
/// details}}`.
#[derive(Debug, Clone)]
pub struct ZsError {
    /// HTTP status.
    pub status: StatusCode,
    /// ZStack error code (`SYS.1001`, ...).
    pub code: String,
    /// Short description.
    pub description: String,
    /// Details.
    pub details: String,
}

/// Result of a ZStack handler.
pub type ZsResult<T = Value> = std::result::Result<T, ZsError>;

impl ZsError {
    /// A new error.
    pub fn new(
        status: StatusCode,
        code: &str,
        description: &str,
        details: impl Into<String>,
    ) -> Self {
        ZsError {
            status,
            code: code.into(),
            description: description.into(),
            details: details.into(),
        }
    }

    // Every failed API answers 503 with the error (zstackio/zstack
    // RestServer.sendReplyResponse and the job query of a failed event);
    // codes and descriptions as conf/errorCodes/sys.xml has them.

    /// `SYS.1007` invalid argument.
    pub fn invalid(details: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SYS.1007",
            "One or more API argument is invalid",
            details,
        )
    }

    /// `SYS.1003` resource not found (`SysErrors.RESOURCE_NOT_FOUND`).
    pub fn not_found(what: &str, uuid: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SYS.1003",
            "A resource can not be found",
            format!("{what}[uuid:{uuid}] is not found"),
        )
    }

    /// `SYS.1006` an operation refused in the object's state (ZStack's
    /// interceptors answer `operr`, `SysErrors.OPERATION_ERROR`).
    pub fn refused(details: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SYS.1006",
            "An operation failed",
            details,
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code, "description": self.description, "details": self.details}})
    }
}

impl From<Error> for ZsError {
    fn from(e: Error) -> Self {
        match &e {
            Error::NotFound { kind, id } => ZsError::not_found(kind, id),
            Error::Invalid(m) => ZsError::invalid(m.clone()),
            Error::Conflict(m) | Error::Refused(m) => ZsError::refused(m.clone()),
            _ => ZsError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SYS.1000",
                "An internal error happened in system",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ZsError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// What a ZStack fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZsFaultKind {
    /// Polling a finished job answers 503 with an error body (the job's
    /// work was done; its result is lost).
    #[serde(rename = "job_poll_503")]
    JobPoll503,
    /// AddImage leaves the image in `Downloading` and its job running.
    StuckDownloading,
    /// An export download stops after `after_bytes` bytes of a response.
    ExportBreak,
    /// Every export response covering byte `after_bytes` (an offset in
    /// the image) serves it flipped; `exportMd5Sum` stays the image's.
    /// Not consumed by responses (`times` is ignored).
    ExportCorrupt,
    /// Test-only malformed answer: `field` is removed from the JSON answer
    /// of requests whose path contains `path` (from the answer itself,
    /// from `inventory` and from each of `inventories`).
    DropField,
}

/// A ZStack fault armed through `POST /admin/zstack/faults`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZsFault {
    /// Effect.
    pub kind: ZsFaultKind,
    /// Substring of the API action (`AddImage`,
    /// `CreateRootVolumeTemplateFromVolumeSnapshot`, ...) for `job_poll_503`
    /// (any when absent).
    #[serde(default)]
    pub action: Option<String>,
    /// `export_break`: bytes served before the response breaks.
    #[serde(default)]
    pub after_bytes: u64,
    /// How many times it fires (unlimited when absent).
    #[serde(default)]
    pub times: Option<u32>,
    /// `drop_field`: substring of the request path.
    #[serde(default)]
    pub path: Option<String>,
    /// `drop_field`: the field removed.
    #[serde(default)]
    pub field: Option<String>,
}

#[derive(Debug)]
struct Job {
    action: String,
    result: Option<ZsResult>,
    polls_left: u32,
}

/// The ZStack platform.
#[derive(Debug)]
pub struct ZStackPlatform {
    hv: Arc<Hypervisor>,
    config: RwLock<ZStackConfig>,
    inv: Inventory<ZsInventory>,
    sessions: Mutex<HashMap<String, std::time::Instant>>,
    jobs: Mutex<HashMap<String, Job>>,
    faults: Mutex<Vec<ZsFault>>,
    http_base: RwLock<String>,
}

impl ZStackPlatform {
    /// Loads (or starts) the inventory in `state_dir/zstack.json`.
    pub fn open(hv: Arc<Hypervisor>, state_dir: &Path, config: ZStackConfig) -> Result<Arc<Self>> {
        let inv = Inventory::<ZsInventory>::load(&state_dir.join("zstack.json"))?;
        let c = config.clone();
        inv.update(|doc| {
            if doc.backup_storages.is_empty() {
                for name in &c.backup_storages {
                    doc.backup_storages.push(BackupStorage {
                        uuid: zs_uuid(),
                        name: name.clone(),
                        status: "Connected".into(),
                    });
                }
                doc.primary_storage_uuid = zs_uuid();
                doc.image_quota = c.image_quota;
            }
            doc.ensure_defaults();
            Ok(())
        })?;
        Ok(Arc::new(ZStackPlatform {
            hv,
            config: RwLock::new(config),
            inv,
            sessions: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            faults: Mutex::new(Vec::new()),
            http_base: RwLock::new(String::new()),
        }))
    }

    /// Shared resources.
    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hv
    }

    /// The inventory.
    pub fn inventory(&self) -> &Inventory<ZsInventory> {
        &self.inv
    }

    /// Settings.
    pub fn config(&self) -> ZStackConfig {
        crate::disk::read_lock(&self.config).clone()
    }

    /// HTTP base URL (known once the server is bound).
    pub fn http_base(&self) -> String {
        crate::disk::read_lock(&self.http_base).clone()
    }

    /// Arms a fault.
    pub fn add_fault(&self, f: ZsFault) {
        lock(&self.faults).push(f);
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    /// The first armed fault of `kind`, left armed.
    pub fn peek_fault(&self, kind: ZsFaultKind) -> Option<ZsFault> {
        lock(&self.faults)
            .iter()
            .find(|f| f.kind == kind && f.times != Some(0))
            .cloned()
    }

    /// Consumes one firing of a fault of `kind` matching `action`; returns
    /// it when one fired.
    pub fn take_fault(&self, kind: ZsFaultKind, action: &str) -> Option<ZsFault> {
        let mut faults = lock(&self.faults);
        let i = faults.iter().position(|f| {
            f.kind == kind
                && f.times != Some(0)
                && f.action.as_deref().is_none_or(|a| action.contains(a))
        })?;
        let f = &mut faults[i];
        if let Some(t) = &mut f.times {
            *t -= 1;
        }
        Some(f.clone())
    }

    /// Registers a finished job; answers 202 with its location.
    pub fn submit(&self, action: &str, result: ZsResult) -> Response {
        let id = self.submit_pending(action);
        self.finish(&id, result);
        self.accepted(&id)
    }

    /// Registers a running job; returns its UUID: the one the client
    /// named with `X-Job-UUID`, or a new one.
    pub fn submit_pending(&self, action: &str) -> String {
        let id = REQUESTED_JOB
            .try_with(|j| j.clone())
            .ok()
            .flatten()
            .unwrap_or_else(zs_uuid);
        let polls = self.config().job_polls;
        lock(&self.jobs).insert(
            id.clone(),
            Job {
                action: action.into(),
                result: None,
                polls_left: polls,
            },
        );
        id
    }

    /// Stores a job's result.
    pub fn finish(&self, id: &str, result: ZsResult) {
        if let Some(j) = lock(&self.jobs).get_mut(id) {
            j.result = Some(result);
        }
    }

    /// 202 with the job's location.
    pub fn accepted(&self, id: &str) -> Response {
        let location = format!("{}/zstack/v1/api-jobs/{id}", self.http_base());
        (
            StatusCode::ACCEPTED,
            axum::Json(json!({"location": location})),
        )
            .into_response()
    }

    /// Answers a job poll: 202 while running, 200 with the result, 503
    /// with the error.
    pub fn poll(&self, id: &str) -> Response {
        let mut jobs = lock(&self.jobs);
        let Some(job) = jobs.get_mut(id) else {
            return job_expired();
        };
        if job.result.is_none() || job.polls_left > 0 {
            job.polls_left = job.polls_left.saturating_sub(1);
            let location = format!("{}/zstack/v1/api-jobs/{id}", self.http_base());
            return (
                StatusCode::ACCEPTED,
                axum::Json(json!({"location": location})),
            )
                .into_response();
        }
        let action = job.action.clone();
        drop(jobs);
        if self.take_fault(ZsFaultKind::JobPoll503, &action).is_some() {
            let e = ZsError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SYS.1006",
                "Service unavailable",
                format!("injected fault while polling job {id} ({action})"),
            );
            self.finish(id, Err(e.clone()));
            return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(e.body())).into_response();
        }
        let jobs = lock(&self.jobs);
        match jobs.get(id).and_then(|j| j.result.clone()) {
            Some(Ok(v)) => (StatusCode::OK, axum::Json(v)).into_response(),
            Some(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(e.body())).into_response(),
            None => job_expired(),
        }
    }

    /// Jobs still running (for leak checks).
    pub fn running_jobs(&self) -> Vec<String> {
        lock(&self.jobs)
            .iter()
            .filter(|(_, j)| j.result.is_none())
            .map(|(id, j)| format!("{id} ({})", j.action))
            .collect()
    }

    /// A new session id.
    pub fn new_session(&self) -> String {
        let id = zs_uuid();
        lock(&self.sessions).insert(id.clone(), std::time::Instant::now());
        id
    }

    /// Ends a session.
    pub fn end_session(&self, id: &str) -> bool {
        lock(&self.sessions).remove(id).is_some()
    }

    /// Whether `id` is a live session (an expired one is forgotten).
    fn has_session(&self, id: &str) -> bool {
        let lifetime =
            std::time::Duration::from_secs_f64(self.config().session_timeout_secs.max(0.0));
        let mut sessions = lock(&self.sessions);
        match sessions.get(id) {
            Some(t) if t.elapsed() < lifetime => true,
            Some(_) => {
                sessions.remove(id);
                false
            }
            None => false,
        }
    }

    /// Whether a job of this UUID exists.
    fn has_job(&self, id: &str) -> bool {
        lock(&self.jobs).contains_key(id)
    }
}

/// Middleware: the shared HTTP faults (as a proxy in front of ZStack
/// answers: plain text, no ZStack error) and `drop_field` faults.
async fn inject_faults(
    State(zs): State<Arc<ZStackPlatform>>,
    req: Request,
    next: Next,
) -> Response {
    let template = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    let decision = zs
        .hv
        .faults
        .http_call(req.method().as_str(), &path, &template);
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }
    if let Some((status, _code, message)) = decision.error {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        return (status, format!("{status}: {message}\n")).into_response();
    }
    let drop = {
        let mut faults = lock(&zs.faults);
        let i = faults.iter().position(|f| {
            f.kind == ZsFaultKind::DropField
                && f.times != Some(0)
                && f.path.as_deref().is_some_and(|p| path.contains(p))
        });
        i.and_then(|i| {
            let f = &mut faults[i];
            if let Some(t) = &mut f.times {
                *t -= 1;
            }
            f.field.clone()
        })
    };
    let resp = next.run(req).await;
    let Some(field) = drop else { return resp };
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let strip = |o: &mut Value| {
        if let Some(m) = o.as_object_mut() {
            m.remove(&field);
        }
    };
    strip(&mut v);
    if let Some(i) = v.get_mut("inventory") {
        strip(i);
    }
    if let Some(list) = v.get_mut("inventories").and_then(Value::as_array_mut) {
        list.iter_mut().for_each(strip);
    }
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(v.to_string()))
}

tokio::task_local! {
    /// The job UUID the client asked for (`X-Job-UUID`) while its call is
    /// handled.
    static REQUESTED_JOB: Option<String>;
}

/// Middleware: `X-Job-UUID`. A client may name the API job of its call;
/// as zstackio/zstack's RestServer checks it: not 32 characters, or a
/// name already used by a POST/PUT/DELETE, is a RestException (400,
/// plain text). A client that lost an answer follows the job it named with
/// `GET /v1/api-jobs/{uuid}` instead of sending the call again.
async fn job_uuid_header(
    State(zs): State<Arc<ZStackPlatform>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(v) = req.headers().get("X-Job-UUID") else {
        return REQUESTED_JOB.scope(None, next.run(req)).await;
    };
    let id = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
    if id.len() != 32 {
        return (
            StatusCode::BAD_REQUEST,
            "Invalid header[X-Job-UUID], it must be a UUID with '-' stripped".to_owned(),
        )
            .into_response();
    }
    if req.method() != axum::http::Method::GET && zs.has_job(&id) {
        return (StatusCode::BAD_REQUEST, format!("Duplicate job uuid[{id}]")).into_response();
    }
    REQUESTED_JOB.scope(Some(id), next.run(req)).await
}

/// An unknown (or forgotten) job: RestServer.handleJobQuery's plain-text
/// 404.
fn job_expired() -> Response {
    (StatusCode::NOT_FOUND, "the job has been expired".to_owned()).into_response()
}

/// Middleware: `Authorization: OAuth <session>`.
async fn require_session(
    State(zs): State<Arc<ZStackPlatform>>,
    req: Request,
    next: Next,
) -> Response {
    let session = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("OAuth "))
        .map(str::trim);
    // As zstackio/zstack's RestServer answers: no `Authorization` header is
    // a RestException (400, plain text); an unknown or expired session
    // fails the API message in SessionAPIRequestChecker, and a failed
    // reply is 503 with the error (`sendReplyResponse`), the description
    // from conf/errorCodes/identity.xml. Never 401.
    match session {
        Some(s) if zs.has_session(s) => next.run(req).await,
        None => (
            StatusCode::BAD_REQUEST,
            "missing header 'Authorization'".to_owned(),
        )
            .into_response(),
        Some(_) => ZsError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ID.1001",
            "The session is invalid, either wrong session id or the session has been expired",
            "unknown or expired session: log in with PUT /zstack/v1/accounts/login",
        )
        .into_response(),
    }
}

impl Platform for ZStackPlatform {
    fn name(&self) -> &'static str {
        "zstack"
    }

    fn api_router(self: Arc<Self>) -> Router {
        use axum::routing::delete;
        let protected = Router::new()
            .route("/zstack/v1/accounts/sessions/{uuid}", delete(api::logout))
            .route("/zstack/v1/accounts/quotas", get(api::query_quotas))
            .route("/zstack/v1/backup-storage", get(api::query_backup_storage))
            .route(
                "/zstack/v1/backup-storage/{uuid}",
                get(api::query_backup_storage_one),
            )
            .route(
                "/zstack/v1/backup-storage/{uuid}/actions",
                put(api::backup_storage_action),
            )
            .route(
                "/zstack/v1/backup-storage/{uuid}/exported-images/{image_uuid}",
                delete(api::delete_export),
            )
            .route(
                "/zstack/v1/primary-storage",
                get(api::query_primary_storage),
            )
            .route(
                "/zstack/v1/images",
                get(api::query_images).post(api::add_image),
            )
            .route(
                "/zstack/v1/images/{uuid}",
                get(api::query_image_one).delete(api::delete_image),
            )
            .route("/zstack/v1/images/{uuid}/actions", put(api::image_action))
            .route(
                "/zstack/v1/images/root-volume-templates/from/volume-snapshots/{uuid}",
                post(api::root_template_from_snapshot),
            )
            .route(
                "/zstack/v1/images/root-volume-templates/from/volumes/{uuid}",
                post(api::root_template_from_volume),
            )
            .route(
                "/zstack/v1/images/data-volume-templates/from/volume-snapshots/{uuid}",
                post(api::data_template_from_snapshot),
            )
            .route(
                "/zstack/v1/images/data-volume-templates/from/volumes/{uuid}",
                post(api::data_template_from_volume),
            )
            .route("/zstack/v1/instance-offerings", get(api::query_offerings))
            .route("/zstack/v1/l3-networks", get(api::query_l3_networks))
            .route(
                "/zstack/v1/vm-instances",
                get(api::query_vms).post(api::create_vm),
            )
            .route(
                "/zstack/v1/vm-instances/{uuid}",
                get(api::query_vm_one).delete(api::destroy_vm),
            )
            .route(
                "/zstack/v1/vm-instances/{uuid}/actions",
                put(api::vm_action),
            )
            .route("/zstack/v1/volumes/{uuid}/actions", put(api::volume_action))
            .route("/zstack/v1/volumes", get(api::query_volumes))
            .route(
                "/zstack/v1/volumes/{uuid}",
                get(api::query_volume_one).delete(api::delete_volume),
            )
            .route(
                "/zstack/v1/volumes/data/from/data-volume-templates/{uuid}",
                post(api::data_volume_from_template),
            )
            .route(
                "/zstack/v1/volumes/{uuid}/vm-instances/{vm_uuid}",
                post(api::attach_volume),
            )
            .route(
                "/zstack/v1/volumes/{uuid}/volume-snapshots",
                post(api::create_snapshot),
            )
            .route("/zstack/v1/volume-snapshots", get(api::query_snapshots))
            .route(
                "/zstack/v1/volume-snapshots/group",
                post(api::create_snapshot_group).get(api::query_snapshot_groups),
            )
            .route(
                "/zstack/v1/volume-snapshots/group/{uuid}",
                axum::routing::delete(api::delete_snapshot_group),
            )
            .route(
                "/zstack/v1/volume-snapshots/{uuid}",
                get(api::query_snapshot_one).delete(api::delete_snapshot),
            )
            .route_layer(from_fn_with_state(self.clone(), job_uuid_header))
            .route_layer(from_fn_with_state(self.clone(), require_session));
        Router::new()
            .route("/zstack/v1/accounts/login", put(api::login))
            .route(
                "/zstack/imagestore/export/{image_uuid}/{file}",
                get(transfer::download_export),
            )
            // Job results need no session (RestServer.handleJobQuery).
            .route("/zstack/v1/api-jobs/{uuid}", get(api::poll_job))
            .merge(protected)
            .merge(message_api::router())
            .route_layer(from_fn_with_state(self.clone(), inject_faults))
            .with_state(self)
    }

    fn admin_router(self: Arc<Self>) -> Router {
        admin::router(self)
    }

    fn endpoint(&self, http_base: &str) -> Value {
        *crate::disk::write_lock(&self.http_base) = http_base.to_string();
        let c = self.config();
        json!({
            "base_url": format!("{http_base}/zstack"),
            "account": c.account,
            "password": c.password,
        })
    }

    fn objects(&self) -> Value {
        admin::objects(self)
    }
}
