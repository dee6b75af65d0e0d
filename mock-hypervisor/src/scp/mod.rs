//! SCP (Sangfor Cloud Platform) emulation: the janus OpenAPI subset used to
//! back up and restore (linked) VMs. Every endpoint is documented in the
//! crate README.
//!
//! Modules: [`envelope`] (response shape, error codes), [`auth`] (tokens),
//! [`model`] (persisted objects), [`tasks`], and one module per API area:
//! [`servers`] (incl. hot-add and recovery-baseimage), [`snapshots`],
//! [`cbt`], [`base_images`], [`custom_attributes`], [`backup_resources`]
//! (leases and NBD exports), [`admin`] (test-only extensions).
//!
//! Locking: the inventory lock is taken before any disk lock and released
//! before long copies; the lease table lock is never held while taking the
//! inventory lock.

pub mod admin;
pub mod auth;
pub mod backup_resources;
pub mod base_images;
pub mod cbt;
pub mod custom_attributes;
pub mod envelope;
pub mod general;
pub mod model;
pub mod servers;
pub mod snapshots;
pub mod tasks;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

pub use envelope::ScpError;
use model::{ScpInventory, Storage};

use crate::error::Result;
use crate::hypervisor::Hypervisor;
use crate::inventory::Inventory;
use crate::platform::Platform;

/// Settings of the SCP emulation.
#[derive(Debug, Clone)]
pub struct ScpConfig {
    /// Platform version (`6.11.2`, `6.11.3`, ...); changes the CBT rules.
    pub version: String,
    /// Account name.
    pub username: String,
    /// Account password.
    pub password: String,
    /// Polls a task answers unfinished (`waiting`, then `doing`) before
    /// `finish` or `failure`.
    pub task_polls: u32,
    /// Largest range one changed-areas call covers (bytes).
    pub changed_areas_page: u64,
    /// Token lifetime.
    pub token_ttl: Duration,
    /// Access key of the account (request signing); empty: none.
    pub access_key: String,
    /// Secret key of the account.
    pub secret_key: String,
    /// Storages created on first start.
    pub storages: Vec<Storage>,
    /// When set, a hot-added disk appears to the proxy as a link
    /// `<dir>/virtio-<serial>` (the proxy's `/dev/disk/by-id`), and hot-add
    /// answers carry its `serial` but no `local_path`.
    pub disk_by_id_dir: Option<std::path::PathBuf>,
}

impl Default for ScpConfig {
    fn default() -> Self {
        ScpConfig {
            version: "6.11.3".into(),
            username: "admin".into(),
            password: "admin-password".into(),
            task_polls: 2,
            changed_areas_page: 64 * 1024 * 1024,
            token_ttl: Duration::from_secs(30 * 60),
            access_key: "mock-access-key".into(),
            secret_key: "mock-secret-key".into(),
            storages: vec![
                Storage {
                    id: "storage-local".into(),
                    name: "local-lvm".into(),
                },
                Storage {
                    id: "storage-vs".into(),
                    name: "virtual-storage".into(),
                },
            ],
            disk_by_id_dir: None,
        }
    }
}

/// The SCP platform.
#[derive(Debug)]
pub struct ScpPlatform {
    hv: Arc<Hypervisor>,
    config: RwLock<ScpConfig>,
    inv: Inventory<ScpInventory>,
    tokens: Mutex<HashMap<String, Instant>>,
    tasks: tasks::TaskBoard,
    leases: Mutex<backup_resources::LeaseTable>,
    answer_faults: Mutex<Vec<AnswerFault>>,
    task_faults: Mutex<Vec<TaskFault>>,
    logins: std::sync::atomic::AtomicU64,
}

/// Admin fault (`POST /admin/scp/faults/tasks`): the next tasks of an
/// action fail with the platform's error text, without doing their work
/// (as a task the platform refuses midway).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskFault {
    /// Task action (`create_snapshot`, `update_server`, ...).
    pub action: String,
    /// The error text the task reports in `description`.
    pub message: String,
    /// How many tasks it fails (unlimited when absent).
    #[serde(default)]
    pub times: Option<u32>,
}

/// Test-only fault (admin API `POST /admin/scp/faults/answers`): the call
/// runs normally, then fields are removed from its JSON answer, so that a
/// client's handling of incomplete answers can be tested. Not a platform
/// behaviour: a real SCP is not known to drop fields.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AnswerFault {
    /// HTTP method to match (any when absent).
    #[serde(default)]
    pub method: Option<String>,
    /// Substring of the request path or of the route template.
    pub path: String,
    /// JSON pointers into the whole answer (envelope included, e.g.
    /// `/data/areas` or `/data/data/*/size`; `*` stands for every array
    /// item or object member) whose fields are removed.
    pub remove: Vec<String>,
    /// How many answers it fires for (unlimited when absent).
    #[serde(default)]
    pub times: Option<u32>,
}

/// Removes the field `pointer` (with `*` wildcards) from `v`; returns how
/// many fields were removed.
pub fn remove_pointer(v: &mut Value, pointer: &str) -> usize {
    let parts: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect();
    remove_parts(v, &parts)
}

fn remove_parts(v: &mut Value, parts: &[String]) -> usize {
    let Some((first, rest)) = parts.split_first() else {
        return 0;
    };
    if rest.is_empty() {
        return match v {
            Value::Object(o) if first == "*" => {
                let n = o.len();
                o.clear();
                n
            }
            Value::Object(o) => usize::from(o.remove(first).is_some()),
            _ => 0,
        };
    }
    match v {
        Value::Object(o) if first == "*" => o.values_mut().map(|c| remove_parts(c, rest)).sum(),
        Value::Object(o) => o.get_mut(first).map_or(0, |c| remove_parts(c, rest)),
        Value::Array(a) if first == "*" => a.iter_mut().map(|c| remove_parts(c, rest)).sum(),
        Value::Array(a) => first
            .parse::<usize>()
            .ok()
            .and_then(|i| a.get_mut(i))
            .map_or(0, |c| remove_parts(c, rest)),
        _ => 0,
    }
}

/// Parses a version into comparable numbers the way clients read
/// `build_version`: an optional `SCP` prefix, the first word only, and the
/// leading digits of each dotted part (`6.11.3-beta` is 6.11.3,
/// `SCP6.11.3 B-2025-07-25` too).
pub fn parse_version(v: &str) -> Vec<u32> {
    let word = v.split_whitespace().next().unwrap_or_default();
    let word = word
        .strip_prefix("SCP")
        .or_else(|| word.strip_prefix("scp"))
        .unwrap_or(word);
    word.split('.')
        .map(|p| {
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap_or(0)
        })
        .collect()
}

/// The `build_version` the platform reports for a version.
pub fn build_version(version: &str) -> String {
    format!("SCP{version} B-2025-07-25 10:00:00")
}

impl ScpPlatform {
    /// Loads (or starts) the SCP inventory in `state_dir/scp.json`.
    pub fn open(hv: Arc<Hypervisor>, state_dir: &Path, config: ScpConfig) -> Result<Arc<Self>> {
        let inv = Inventory::<ScpInventory>::load(&state_dir.join("scp.json"))?;
        let storages = config.storages.clone();
        inv.update(|doc| {
            for s in storages {
                if !doc.has_storage(&s.id) {
                    doc.storages.push(s);
                }
            }
            Ok(())
        })?;
        Ok(Arc::new(ScpPlatform {
            hv,
            config: RwLock::new(config),
            inv,
            tokens: Mutex::new(HashMap::new()),
            tasks: tasks::TaskBoard::default(),
            leases: Mutex::new(Default::default()),
            answer_faults: Mutex::new(Vec::new()),
            task_faults: Mutex::new(Vec::new()),
            logins: Default::default(),
        }))
    }

    /// Current settings.
    pub fn config(&self) -> RwLockReadGuard<'_, ScpConfig> {
        crate::disk::read_lock(&self.config)
    }

    /// Changes the platform version at run time.
    pub fn set_version(&self, version: &str) {
        crate::disk::write_lock(&self.config).version = version.to_string();
    }

    /// Whether the platform version is at least `v`.
    pub fn version_at_least(&self, v: &str) -> bool {
        let mine = parse_version(&self.config().version);
        let other = parse_version(v);
        let n = mine.len().max(other.len());
        let pad = |p: &[u32]| {
            let mut p = p.to_vec();
            p.resize(n, 0);
            p
        };
        pad(&mine) >= pad(&other)
    }

    /// Successful logins so far (`POST /janus/authenticate`).
    pub fn logins(&self) -> u64 {
        self.logins.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the token lifetime of new logins.
    pub fn set_token_ttl(&self, ttl: Duration) {
        crate::disk::write_lock(&self.config).token_ttl = ttl;
    }

    /// Arms a [`TaskFault`].
    pub fn add_task_fault(&self, fault: TaskFault) {
        self.task_faults_lock().push(fault);
    }

    /// Disarms every [`TaskFault`]; returns the ones still armed.
    pub fn clear_task_faults(&self) -> Vec<TaskFault> {
        std::mem::take(&mut *self.task_faults_lock())
    }

    fn task_faults_lock(&self) -> MutexGuard<'_, Vec<TaskFault>> {
        self.task_faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When a [`TaskFault`] is armed for `action`: records the failing task
    /// and gives the answer to send (the caller then does no work).
    pub fn failed_task(&self, action: &str, object_id: &str) -> Option<envelope::ScpResult> {
        let message = {
            let mut faults = self.task_faults_lock();
            let i = faults.iter().position(|f| f.action == action)?;
            let message = faults[i].message.clone();
            if let Some(t) = &mut faults[i].times {
                *t = t.saturating_sub(1);
                if *t == 0 {
                    faults.remove(i);
                }
            }
            message
        };
        let polls = self.config().task_polls;
        let id = self.tasks.record(action, object_id, polls, Err(message));
        Some(envelope::ok(json!({"task_id": id})))
    }

    /// The shared hypervisor resources.
    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hv
    }

    /// The persisted inventory.
    pub fn inventory(&self) -> &Inventory<ScpInventory> {
        &self.inv
    }

    fn tokens_lock(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn leases_lock(&self) -> MutexGuard<'_, backup_resources::LeaseTable> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer_faults_lock(&self) -> MutexGuard<'_, Vec<AnswerFault>> {
        self.answer_faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms a test-only [`AnswerFault`].
    pub fn add_answer_fault(&self, fault: AnswerFault) {
        self.answer_faults_lock().push(fault);
    }

    /// Disarms every [`AnswerFault`]; returns the ones still armed.
    pub fn clear_answer_faults(&self) -> Vec<AnswerFault> {
        std::mem::take(&mut *self.answer_faults_lock())
    }

    /// Consumes the first answer fault matching a call: the pointers to
    /// remove.
    fn take_answer_fault(&self, method: &str, path: &str, template: &str) -> Option<Vec<String>> {
        let mut faults = self.answer_faults_lock();
        let i = faults.iter().position(|f| {
            f.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && (path.contains(&f.path) || template.contains(&f.path))
        })?;
        let remove = faults[i].remove.clone();
        if let Some(t) = &mut faults[i].times {
            *t = t.saturating_sub(1);
            if *t == 0 {
                faults.remove(i);
            }
        }
        Some(remove)
    }

    /// Records a task whose `entities` are `result` once it finishes and
    /// answers `{"task_id"}` only.
    fn task(&self, action: &str, object_id: &str, result: Value) -> envelope::ScpResult {
        let polls = self.config().task_polls;
        let id = self.tasks.record(action, object_id, polls, Ok(result));
        envelope::ok(json!({"task_id": id}))
    }

    /// Marks a server's CBT expired (revert, restore) and invalidates its
    /// disks' checkpoints.
    pub fn expire_cbt(&self, server_id: &str) -> std::result::Result<(), ScpError> {
        let disks = self.inv.update(|doc| {
            let server = doc
                .servers
                .get_mut(server_id)
                .ok_or_else(|| crate::error::Error::not_found("server", server_id))?;
            server.cbt.expired = true;
            Ok(server
                .disks
                .iter()
                .map(|d| d.id.clone())
                .collect::<Vec<_>>())
        })?;
        for d in disks {
            self.hv.store.disk(&d)?.invalidate_checkpoints()?;
        }
        Ok(())
    }
}

/// Middleware: applies HTTP faults armed through the admin API.
async fn inject_faults(State(scp): State<Arc<ScpPlatform>>, req: Request, next: Next) -> Response {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let decision = scp
        .hv
        .faults
        .http_call(req.method().as_str(), req.uri().path(), &template);
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }
    if let Some((status, code, message)) = decision.error {
        return ScpError::new(
            axum::http::StatusCode::from_u16(status)
                .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message,
        )
        .into_response();
    }
    let remove = scp.take_answer_fault(req.method().as_str(), req.uri().path(), &template);
    let resp = next.run(req).await;
    let Some(remove) = remove else {
        return resp;
    };
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let Ok(mut answer) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    for p in &remove {
        remove_pointer(&mut answer, p);
    }
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(answer.to_string()))
}

impl Platform for ScpPlatform {
    fn name(&self) -> &'static str {
        "scp"
    }

    fn api_router(self: Arc<Self>) -> Router {
        let protected = Router::new()
            .route("/janus/20180725/tasks", get(general::list_tasks))
            .route("/janus/20180725/tasks/{task_id}", get(servers::get_task))
            .route("/janus/20180725/system/version", get(servers::get_version))
            .route("/janus/20180725/storages", get(servers::list_storages))
            .route("/janus/20180725/azs", get(general::list_azs))
            .route("/janus/20180725/azs/{az_id}", get(general::get_az))
            .route("/janus/20180725/volumes", get(general::list_volumes))
            .route(
                "/janus/20180725/volumes/{volume_id}",
                get(general::get_volume),
            )
            .route("/janus/20180725/images", get(general::list_images))
            .route(
                "/janus/20180725/servers",
                get(servers::list_servers).post(servers::create_server),
            )
            .route(
                "/janus/20180725/servers/{server_id}",
                get(servers::get_server)
                    .put(servers::update_server)
                    .delete(servers::delete_server),
            )
            .route(
                "/janus/20240725/servers/{server_id}",
                get(servers::get_server),
            )
            .route(
                "/janus/20250725/servers",
                get(servers::list_servers).post(servers::create_server),
            )
            .route(
                "/janus/20250725/servers/{server_id}",
                get(servers::get_server)
                    .put(servers::update_server)
                    .delete(servers::delete_server),
            )
            .route(
                "/janus/20240725/servers/{server_id}/recovery-baseimage",
                post(servers::recovery_base_image),
            )
            .route(
                "/janus/20240725/servers/{server_id}/snapshots",
                get(snapshots::list).post(snapshots::create),
            )
            .route(
                "/janus/20240725/servers/{server_id}/snapshots/{snapshot_id}",
                get(snapshots::get_one).delete(snapshots::delete),
            )
            .route(
                "/janus/20240725/servers/{server_id}/snapshots/{snapshot_id}/actions/revert",
                post(snapshots::revert),
            )
            .route(
                "/janus/20240725/servers/{server_id}/cbt/status",
                get(cbt::get_status).put(cbt::put_status),
            )
            .route(
                "/janus/20240725/servers/{server_id}/cbt/changed-areas",
                get(cbt::changed_areas),
            )
            .route(
                "/janus/20180725/base-images",
                get(base_images::list).post(base_images::create),
            )
            .route(
                "/janus/20180725/base-images/{base_image_id}",
                get(base_images::get_one)
                    .put(base_images::update)
                    .delete(base_images::delete),
            )
            .route(
                "/janus/20180725/base-images/{base_image_id}/replicas",
                get(base_images::list_replicas),
            )
            .route(
                "/janus/20180725/base-images/{base_image_id}/replicas/actions/sync",
                post(base_images::sync_replica),
            )
            .route(
                "/janus/20190725/custom-attributes",
                get(custom_attributes::list).post(custom_attributes::create),
            )
            .route(
                "/janus/20190725/custom-attributes/bindings",
                get(custom_attributes::list_bindings).post(custom_attributes::create_binding),
            )
            .route(
                "/janus/20190725/custom-attributes/bindings/actions/bulk-create",
                post(custom_attributes::bulk_create_bindings),
            )
            .route(
                "/janus/20240725/backup-resources",
                get(backup_resources::list).post(backup_resources::create),
            )
            .route(
                "/janus/20240725/backup-resources/{resource_id}",
                get(backup_resources::get_one)
                    .put(backup_resources::renew)
                    .delete(backup_resources::release),
            )
            .route(
                "/janus/20240725/backup-resources/{resource_id}/exports",
                get(backup_resources::list_exports).post(backup_resources::open_export),
            )
            .route(
                "/janus/20240725/backup-resources/{resource_id}/exports/{export_id}",
                axum::routing::delete(backup_resources::close_export),
            )
            .route_layer(from_fn_with_state(self.clone(), auth::require_token));
        Router::new()
            .route("/janus/public-key", get(auth::public_key))
            .route("/janus/v2/public-key", get(auth::public_key))
            .route("/janus/authenticate", post(auth::authenticate))
            .merge(protected)
            .route_layer(from_fn_with_state(self.clone(), inject_faults))
            .with_state(self)
    }

    fn admin_router(self: Arc<Self>) -> Router {
        admin::router(self)
    }

    fn endpoint(&self, http_base: &str) -> Value {
        let c = self.config();
        json!({
            "base_url": http_base,
            "username": c.username,
            "password": c.password,
            "access_key": c.access_key,
            "secret_key": c.secret_key,
            "version": c.version,
        })
    }

    fn objects(&self) -> Value {
        admin::objects(self)
    }

    fn tick(&self) {
        backup_resources::expire_due(self);
    }
}
