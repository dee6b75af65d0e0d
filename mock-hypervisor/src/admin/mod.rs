//! The admin API (`/admin/...`): what tests and the demo use to play the
//! guest and the platform operator. Plain JSON, no auth, errors as
//! `{"error": "..."}` with a 4xx/5xx status. Documented in the README.
//!
//! Generic endpoints live here; each platform nests its own under
//! `/admin/<platform>` (see [`crate::platform::Platform::admin_router`]).

use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::disk::{BLOCK_SIZE, BaseImage, Pattern, View, VirtualDisk};
use crate::error::{Error, Result};
use crate::faults::{HttpFault, NbdFault};
use crate::hypervisor::Hypervisor;
use crate::platform::Platform;

/// An admin error answer.
#[derive(Debug)]
pub struct AdminError(pub StatusCode, pub String);

impl From<Error> for AdminError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::Conflict(_) | Error::Refused(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        AdminError(status, e.to_string())
    }
}

impl From<crate::scp::ScpError> for AdminError {
    fn from(e: crate::scp::ScpError) -> Self {
        let status = if e.status == StatusCode::OK {
            StatusCode::CONFLICT
        } else {
            e.status
        };
        AdminError(status, e.message)
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

/// Result of an admin handler.
pub type AdminResult = std::result::Result<Json<Value>, AdminError>;

/// Parses a JSON body (empty reads as `{}`).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> std::result::Result<T, AdminError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| AdminError(StatusCode::BAD_REQUEST, format!("malformed body: {e}")))
}

/// One guest write: `length` bytes of `pattern` at `offset`.
#[derive(Debug, Clone, Deserialize)]
pub struct Fill {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub length: u64,
    /// Kind of data.
    #[serde(default)]
    pub pattern: Pattern,
    /// Seed (same seed, same bytes).
    #[serde(default)]
    pub seed: u64,
}

/// Where a [`Fill`] goes.
#[derive(Debug, Clone, Copy)]
pub enum FillTarget<'a> {
    /// The live content of a disk, as the guest writes it.
    Disk(&'a VirtualDisk),
    /// An unsealed base image.
    Image(&'a BaseImage),
}

/// Writes a fill in chunks of 4 MiB (bounded memory).
pub fn write_fill(target: FillTarget<'_>, fill: &Fill) -> Result<()> {
    const CHUNK: u64 = 64 * BLOCK_SIZE;
    let mut pos = fill.offset;
    let end = fill
        .offset
        .checked_add(fill.length)
        .ok_or_else(|| Error::Invalid("offset + length overflows".into()))?;
    let mut i = 0u64;
    while pos < end {
        let n = CHUNK.min(end - pos);
        let data = fill
            .pattern
            .generate(fill.seed.wrapping_add(i.wrapping_mul(0x9E37)), n as usize);
        match target {
            FillTarget::Disk(d) => d.write(pos, &data)?,
            FillTarget::Image(img) => img.write(pos, &data)?,
        }
        pos += n;
        i += 1;
    }
    Ok(())
}

/// Shared state of the admin API.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Shared resources.
    pub hv: Arc<Hypervisor>,
    /// Emulated platforms.
    pub platforms: Vec<Arc<dyn Platform>>,
    /// The endpoints line (filled once listeners are bound).
    pub endpoints: Arc<RwLock<Value>>,
}

/// Builds `/admin` with every platform's extension nested in it.
pub fn router(state: AdminState) -> Router {
    let mut r = Router::new()
        .route("/admin/endpoints", get(endpoints))
        .route("/admin/objects", get(objects))
        .route("/admin/disks", get(list_disks))
        .route("/admin/disks/{disk_id}/write", post(write_disk))
        .route("/admin/disks/{disk_id}/sha256", get(disk_sha256))
        .route("/admin/images/{image_id}/sha256", get(image_sha256))
        .route("/admin/exports", get(exports))
        .route(
            "/admin/exports/history",
            axum::routing::delete(clear_export_history),
        )
        .route("/admin/faults", get(list_faults).delete(clear_faults))
        .route("/admin/faults/http", post(add_http_fault))
        .route("/admin/faults/nbd", post(add_nbd_fault))
        .with_state(state.clone());
    for p in &state.platforms {
        r = r.nest(&format!("/admin/{}", p.name()), p.clone().admin_router());
    }
    r
}

async fn endpoints(State(s): State<AdminState>) -> AdminResult {
    Ok(Json(crate::disk::read_lock(&s.endpoints).clone()))
}

fn disk_view(d: &VirtualDisk) -> Value {
    json!({
        "id": d.id(),
        "size": d.size(),
        "base_image_id": d.base_image().map(|b| b.id().to_string()),
        "snapshots": d.snapshot_ids(),
        "checkpoints": d.checkpoints(),
    })
}

/// Everything that exists, for leak checks.
pub fn all_objects(s: &AdminState) -> Value {
    let disks: Vec<Value> =
        s.hv.store
            .disk_ids()
            .iter()
            .filter_map(|id| s.hv.store.disk(id).ok())
            .map(|d| disk_view(&d))
            .collect();
    let images: Vec<Value> =
        s.hv.store
            .image_ids()
            .iter()
            .filter_map(|id| s.hv.store.image(id).ok())
            .map(|i| json!({"id": i.id(), "size": i.size(), "sealed": i.is_sealed()}))
            .collect();
    let mut platforms = serde_json::Map::new();
    for p in &s.platforms {
        platforms.insert(p.name().to_string(), p.objects());
    }
    json!({
        "disks": disks,
        "images": images,
        "exports": s.hv.exports.active_stats(),
        "platforms": platforms,
    })
}

async fn objects(State(s): State<AdminState>) -> AdminResult {
    Ok(Json(all_objects(&s)))
}

async fn list_disks(State(s): State<AdminState>) -> AdminResult {
    let disks: Vec<Value> =
        s.hv.store
            .disk_ids()
            .iter()
            .filter_map(|id| s.hv.store.disk(id).ok())
            .map(|d| disk_view(&d))
            .collect();
    Ok(Json(json!(disks)))
}

async fn write_disk(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    body: Bytes,
) -> AdminResult {
    let fill: Fill = parse(&body)?;
    let disk = s.hv.store.disk(&id)?;
    let f2 = fill.clone();
    run_blocking(move || write_fill(FillTarget::Disk(&disk), &f2)).await?;
    Ok(Json(
        json!({"disk_id": id, "offset": fill.offset, "length": fill.length}),
    ))
}

/// Runs blocking work off the executor.
pub async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<T, AdminError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(AdminError::from),
        Err(e) => Err(AdminError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct ShaQuery {
    #[serde(default)]
    snapshot_id: Option<String>,
}

async fn disk_sha256(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    Query(q): Query<ShaQuery>,
) -> AdminResult {
    let disk = s.hv.store.disk(&id)?;
    let view = q
        .snapshot_id
        .clone()
        .map(View::Snapshot)
        .unwrap_or(View::Live);
    let size = disk.size();
    let sha = run_blocking(move || disk.sha256(&view)).await?;
    Ok(Json(
        json!({"disk_id": id, "snapshot_id": q.snapshot_id, "size": size, "sha256": sha}),
    ))
}

async fn image_sha256(State(s): State<AdminState>, Path(id): Path<String>) -> AdminResult {
    let image = s.hv.store.image(&id)?;
    let size = image.size();
    let sha = run_blocking(move || image.sha256()).await?;
    Ok(Json(json!({"image_id": id, "size": size, "sha256": sha})))
}

async fn exports(State(s): State<AdminState>) -> AdminResult {
    Ok(Json(json!({
        "active": s.hv.exports.active_stats(),
        "closed": s.hv.exports.closed_stats(),
    })))
}

async fn clear_export_history(State(s): State<AdminState>) -> AdminResult {
    s.hv.exports.clear_history();
    Ok(Json(json!({})))
}

async fn list_faults(State(s): State<AdminState>) -> AdminResult {
    let (http, nbd) = s.hv.faults.list();
    Ok(Json(json!({"http": http, "nbd": nbd})))
}

async fn clear_faults(State(s): State<AdminState>) -> AdminResult {
    s.hv.faults.clear();
    Ok(Json(json!({})))
}

async fn add_http_fault(State(s): State<AdminState>, body: Bytes) -> AdminResult {
    let f: HttpFault = parse(&body)?;
    if f.status.is_some_and(|st| !(200..=599).contains(&st)) {
        return Err(AdminError(
            StatusCode::BAD_REQUEST,
            "status must be 200..=599".into(),
        ));
    }
    s.hv.faults.add_http(f);
    Ok(Json(json!({})))
}

async fn add_nbd_fault(State(s): State<AdminState>, body: Bytes) -> AdminResult {
    let f: NbdFault = parse(&body)?;
    s.hv.faults.add_nbd(f);
    Ok(Json(json!({})))
}
