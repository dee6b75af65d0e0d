//! REST handlers of `/zstack/v1`. Reads (`GET`) answer directly; every
//! other call but login answers `202 {"location": …/api-jobs/<uuid>}` and
//! delivers its result (or its error, HTTP 503) through the job.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::Digest;

use super::model::{
    BsRef, GroupRef, Image, Snapshot, SnapshotGroup, Vm, Volume, ZsInventory, zs_uuid,
};
use super::{ZStackPlatform, ZsError, ZsFaultKind, ZsResult, transfer};
use crate::disk::View;
use crate::ids::unix_now;

type Zs = State<Arc<ZStackPlatform>>;

// ---------------------------------------------------------------- queries

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Like,
    In,
}

/// A parsed `?q=…&limit=…&start=…&count=…` query.
#[derive(Debug, Default)]
pub struct Query {
    conds: Vec<(String, Op, String)>,
    limit: Option<usize>,
    start: usize,
    count: bool,
    reply_with_count: bool,
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the raw query string.
pub fn parse_query(raw: Option<&str>) -> ZsResult<Query> {
    let mut q = Query::default();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (pct_decode(k), pct_decode(v));
        match k.as_str() {
            "q" => {
                let cond = [
                    ("!=", Op::Ne),
                    ("~=", Op::Like),
                    ("?=", Op::In),
                    ("=", Op::Eq),
                ]
                .iter()
                .find_map(|(s, op)| {
                    v.split_once(s)
                        .map(|(f, val)| (f.to_string(), *op, val.to_string()))
                })
                .ok_or_else(|| {
                    ZsError::invalid(format!(
                        "query condition {v:?} has no operator (=, !=, ~=, ?=)"
                    ))
                })?;
                q.conds.push(cond);
            }
            "limit" => {
                q.limit = Some(
                    v.parse()
                        .map_err(|_| ZsError::invalid(format!("limit {v:?}")))?,
                )
            }
            "start" => {
                q.start = v
                    .parse()
                    .map_err(|_| ZsError::invalid(format!("start {v:?}")))?
            }
            "count" => q.count = v == "true",
            "replyWithCount" => q.reply_with_count = v == "true",
            _ => {}
        }
    }
    Ok(q)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// ZStack's `~=`: the value goes through ZQL into MySQL's `LIKE` with the
/// default collation, so `%` matches any run of characters, `_` any one
/// character, `\` makes the next character literal, and letters compare
/// case-insensitively.
pub fn like(pattern: &str, s: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Tok {
        Any,
        One,
        Lit(char),
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '%' => Tok::Any,
            '_' => Tok::One,
            '\\' => Tok::Lit(chars.next().unwrap_or('\\')),
            c => Tok::Lit(c),
        });
    }
    let text: Vec<char> = s.chars().collect();
    // Classic wildcard matching with backtracking to the last `%`.
    let (mut t, mut p) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match toks.get(p) {
            Some(Tok::One) => {
                t += 1;
                p += 1;
            }
            Some(Tok::Lit(c)) if c.eq_ignore_ascii_case(&text[t]) => {
                t += 1;
                p += 1;
            }
            Some(Tok::Any) => {
                star = Some((p, t));
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    toks[p..].iter().all(|t| matches!(t, Tok::Any))
}

impl Query {
    fn matches(&self, item: &Value) -> bool {
        self.conds.iter().all(|(field, op, val)| {
            let got = text(item.get(field).unwrap_or(&Value::Null));
            match op {
                Op::Eq => &got == val,
                Op::Ne => &got != val,
                Op::Like => like(val, &got),
                Op::In => val.split(',').any(|x| x == got),
            }
        })
    }

    /// `{"inventories": [...]}`; with `count=true`, `{"total": n}`; with
    /// `replyWithCount=true`, both (`total` counts every match, the
    /// inventories are the `start`/`limit` page).
    pub fn answer(&self, items: Vec<Value>) -> Value {
        let hits: Vec<Value> = items.into_iter().filter(|i| self.matches(i)).collect();
        let total = hits.len();
        if self.count {
            return json!({"total": total});
        }
        let page: Vec<Value> = hits
            .into_iter()
            .skip(self.start)
            .take(self.limit.unwrap_or(usize::MAX))
            .collect();
        if self.reply_with_count {
            return json!({"inventories": page, "total": total});
        }
        json!({"inventories": page})
    }
}

fn query_answer(raw: Option<String>, items: Vec<Value>) -> Response {
    match parse_query(raw.as_deref()) {
        Ok(q) => Json(q.answer(items)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/<resource>/<uuid>` is a query with a uuid condition in ZStack
/// (the SDK's `Query*Action` with `uuid`): an object that does not exist
/// is an empty `inventories`, not an error.
fn one(items: Vec<Value>, _what: &str, uuid: &str) -> Response {
    let hits: Vec<Value> = items.into_iter().filter(|i| i["uuid"] == uuid).collect();
    Json(json!({"inventories": hits})).into_response()
}

// ---------------------------------------------------------------- bodies

fn body_json(body: &[u8]) -> ZsResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| ZsError::invalid(format!("malformed JSON body: {e}")))
}

fn params(body: &[u8]) -> ZsResult<Value> {
    let v = body_json(body)?;
    Ok(v.get("params").cloned().unwrap_or(json!({})))
}

fn s(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn string_list(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn quota_check(doc: &ZsInventory) -> ZsResult<()> {
    let used = doc.private_images();
    if used >= doc.image_quota {
        // `IdentityErrors.QUOTA_EXCEEDING`.
        return Err(ZsError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ID.1003",
            "Quota exceeding",
            format!(
                "quota exceeding. The account[uuid: admin] exceeds a quota[name: image.num, value: {}]: {used} images exist",
                doc.image_quota
            ),
        ));
    }
    Ok(())
}

/// Picks the backup storages for a new image: the requested ones (all
/// must exist) or the first connected one.
fn pick_backup_storages(doc: &ZsInventory, requested: &[String]) -> ZsResult<Vec<String>> {
    for r in requested {
        if !doc.backup_storages.iter().any(|b| &b.uuid == r) {
            return Err(ZsError::not_found("BackupStorageVO", r));
        }
    }
    if requested.is_empty() {
        return doc
            .backup_storages
            .iter()
            .find(|b| b.status == "Connected")
            .map(|b| vec![b.uuid.clone()])
            .ok_or_else(|| ZsError::refused("no connected backup storage"));
    }
    Ok(requested.to_vec())
}

fn bs_connected(doc: &ZsInventory, uuid: &str) -> bool {
    doc.backup_storages
        .iter()
        .any(|b| b.uuid == uuid && b.status == "Connected")
}

fn new_ref(bs: &str, image: &str) -> BsRef {
    BsRef {
        backup_storage_uuid: bs.to_string(),
        install_path: format!("zstore://{bs}/{image}"),
        created: unix_now(),
    }
}

// ---------------------------------------------------------------- accounts

/// `PUT /zstack/v1/accounts/login`.
pub async fn login(State(zs): Zs, body: Bytes) -> Response {
    let r = (|| {
        let v = body_json(&body)?;
        let l = v
            .get("logInByAccount")
            .ok_or_else(|| ZsError::invalid("missing logInByAccount"))?;
        let c = zs.config();
        let want = crate::disk::hex(&sha2::Sha512::digest(c.password.as_bytes()));
        if s(l, "accountName").as_deref() != Some(&c.account)
            || s(l, "password").map(|p| p.to_ascii_lowercase()).as_deref() != Some(&want)
        {
            // A failed reply: 503 (RestServer.sendReplyResponse), ID.1000
            // as conf/errorCodes/identity.xml words it.
            return Err(ZsError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ID.1000",
                "Unable to authenticate a user",
                "wrong account name or password",
            ));
        }
        let id = zs.new_session();
        let expires = unix_now() + c.session_timeout_secs.max(0.0).ceil() as u64;
        Ok(
            json!({"inventory": {"uuid": id, "accountUuid": "admin", "userUuid": "admin",
                "expiredDate": super::model::fmt_date(expires)}}),
        )
    })();
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /zstack/v1/accounts/sessions/{uuid}` (job).
pub async fn logout(State(zs): Zs, Path(id): Path<String>) -> Response {
    zs.end_session(&id);
    zs.submit("LogOut", Ok(json!({})))
}

/// `GET /zstack/v1/accounts/quotas`.
pub async fn query_quotas(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    let quota = zs.inv.read(|d| d.image_quota);
    query_answer(
        q,
        vec![
            json!({"name": "image.num", "identityUuid": "admin", "identityType": "AccountVO", "value": quota}),
            json!({"name": "image.size", "identityUuid": "admin", "identityType": "AccountVO", "value": 1u64 << 50}),
        ],
    )
}

/// `GET /zstack/v1/api-jobs/{uuid}`.
pub async fn poll_job(State(zs): Zs, Path(id): Path<String>) -> Response {
    zs.poll(&id)
}

// ---------------------------------------------------------------- storages

fn bs_inventory(doc: &ZsInventory) -> Vec<Value> {
    doc.backup_storages
        .iter()
        .map(|b| {
            json!({"uuid": b.uuid, "name": b.name, "type": "ImageStoreBackupStorage", "state": "Enabled",
                   "status": b.status, "url": format!("/zstack_bs/{}", b.name),
                   "totalCapacity": 1u64 << 42, "availableCapacity": 1u64 << 41})
        })
        .collect()
}

/// `GET /zstack/v1/backup-storage`.
pub async fn query_backup_storage(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    query_answer(q, zs.inv.read(bs_inventory))
}

/// `GET /zstack/v1/backup-storage/{uuid}`.
pub async fn query_backup_storage_one(State(zs): Zs, Path(id): Path<String>) -> Response {
    one(zs.inv.read(bs_inventory), "BackupStorageVO", &id)
}

/// `GET /zstack/v1/primary-storage`.
pub async fn query_primary_storage(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    let inv = zs.inv.read(|d| {
        json!({"uuid": d.primary_storage_uuid, "name": "local-ps", "type": "LocalStorage", "state": "Enabled",
               "status": "Connected", "cachedImageUuids": d.image_cache.keys().collect::<Vec<_>>()})
    });
    query_answer(q, vec![inv])
}

/// `PUT /zstack/v1/backup-storage/{uuid}/actions`: `exportImageFromBackupStorage`.
pub async fn backup_storage_action(State(zs): Zs, Path(bs): Path<String>, body: Bytes) -> Response {
    let r = (|| {
        let v = body_json(&body)?;
        let a = v.get("exportImageFromBackupStorage").ok_or_else(|| {
            ZsError::invalid(
                "unknown backup storage action (supported: exportImageFromBackupStorage)",
            )
        })?;
        let image_uuid = s(a, "imageUuid").ok_or_else(|| ZsError::invalid("missing imageUuid"))?;
        let format = s(a, "exportFormat").unwrap_or_else(|| "raw".into());
        if format != "raw" && format != "qcow2" {
            return Err(ZsError::invalid(format!(
                "exportFormat {format:?}: raw or qcow2"
            )));
        }
        let base = zs.http_base();
        zs.inv.update(|doc| {
            if !doc.backup_storages.iter().any(|b| b.uuid == bs) {
                return Ok(Err(ZsError::not_found("BackupStorageVO", &bs)));
            }
            if !bs_connected(doc, &bs) {
                return Ok(Err(ZsError::refused(format!(
                    "backup storage {bs} is Disconnected"
                ))));
            }
            let Some(img) = doc.images.get(&image_uuid) else {
                return Ok(Err(ZsError::not_found("ImageVO", &image_uuid)));
            };
            if img.status != "Ready" {
                return Ok(Err(ZsError::refused(format!(
                    "image[uuid:{image_uuid}] is {}, only Ready images can be exported",
                    img.status
                ))));
            }
            if img.state == "Disabled" {
                return Ok(Err(ZsError::refused(format!(
                    "image[uuid:{image_uuid}] is Disabled and cannot be used"
                ))));
            }
            if !img
                .backup_storage_refs
                .iter()
                .any(|r| r.backup_storage_uuid == bs)
            {
                return Ok(Err(ZsError::refused(format!(
                    "image[uuid:{image_uuid}] is not on backup storage {bs}"
                ))));
            }
            let md5 = img.md5_sum.clone();
            let path = format!("/zstack/imagestore/export/{image_uuid}/{image_uuid}.{format}");
            doc.exports.insert(
                image_uuid.clone(),
                super::model::Export {
                    image_uuid: image_uuid.clone(),
                    backup_storage_uuid: bs.clone(),
                    path: path.clone(),
                    format,
                },
            );
            Ok(Ok(
                json!({"imageUrl": format!("{base}{path}"), "exportMd5Sum": md5,
                         "backupStorageUuid": bs, "imageUuid": image_uuid}),
            ))
        })?
    })();
    zs.submit("ExportImageFromBackupStorage", r)
}

/// `DELETE /zstack/v1/backup-storage/{uuid}/exported-images/{imageUuid}`.
pub async fn delete_export(State(zs): Zs, Path((_bs, image)): Path<(String, String)>) -> Response {
    let r = zs
        .inv
        .update(|doc| {
            doc.exports.remove(&image);
            Ok(json!({}))
        })
        .map_err(ZsError::from);
    zs.submit("DeleteExportedImageFromBackupStorage", r)
}

// ---------------------------------------------------------------- images

/// `GET /zstack/v1/images`.
pub async fn query_images(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    query_answer(
        q,
        zs.inv
            .read(|d| d.images.values().map(Image::inventory).collect()),
    )
}

/// `GET /zstack/v1/images/{uuid}`.
pub async fn query_image_one(State(zs): Zs, Path(id): Path<String>) -> Response {
    one(
        zs.inv
            .read(|d| d.images.values().map(Image::inventory).collect()),
        "ImageVO",
        &id,
    )
}

/// `POST /zstack/v1/images` (AddImage): fetches `url` (`http(s)://` only)
/// in the background; the image is `Downloading` meanwhile.
pub async fn add_image(State(zs): Zs, body: Bytes) -> Response {
    let prepared = (|| {
        let p = params(&body)?;
        let name = s(&p, "name").ok_or_else(|| ZsError::invalid("missing name"))?;
        let url = s(&p, "url").ok_or_else(|| ZsError::invalid("missing url"))?;
        // The backup storage host downloads http(s) URLs; `volume://`
        // and `volumeSnapshot://` are not emulated.
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ZsError::invalid(format!(
                "url {:?}: the backup storage can only download http:// or https:// URLs",
                transfer::redact(&url)
            )));
        }
        let bss = string_list(&p, "backupStorageUuids");
        if bss.is_empty() {
            return Err(ZsError::invalid(
                "backupStorageUuids must name at least one backup storage",
            ));
        }
        let media = s(&p, "mediaType").unwrap_or_else(|| "RootVolumeTemplate".into());
        if !["RootVolumeTemplate", "DataVolumeTemplate", "ISO"].contains(&media.as_str()) {
            return Err(ZsError::invalid(format!("mediaType {media:?}")));
        }
        let uuid = s(&p, "resourceUuid").unwrap_or_else(zs_uuid);
        let image = Image {
            uuid: uuid.clone(),
            name,
            description: s(&p, "description").unwrap_or_default(),
            state: "Enabled".into(),
            status: "Downloading".into(),
            size: 0,
            actual_size: 0,
            url: url.clone(),
            media_type: media,
            guest_os_type: s(&p, "guestOsType").unwrap_or_default(),
            platform: s(&p, "platform").unwrap_or_else(|| "Linux".into()),
            system: p.get("system").and_then(Value::as_bool).unwrap_or(false),
            format: s(&p, "format").unwrap_or_else(|| "raw".into()),
            md5_sum: "not calculated".into(),
            backup_storage_refs: Vec::new(),
            deleted_refs: Vec::new(),
            data_id: String::new(),
            created: unix_now(),
        };
        zs.inv.update(|doc| {
            if doc.images.contains_key(&uuid) {
                return Ok(Err(ZsError::refused(format!("image[uuid:{uuid}] exists"))));
            }
            if let Err(e) = pick_backup_storages(doc, &bss) {
                return Ok(Err(e));
            }
            if !image.system
                && let Err(e) = quota_check(doc)
            {
                return Ok(Err(e));
            }
            doc.images.insert(uuid.clone(), image);
            Ok(Ok(()))
        })??;
        Ok((uuid, url, bss))
    })();
    let (uuid, url, bss) = match prepared {
        Ok(x) => x,
        Err(e) => return zs.submit("AddImage", Err(e)),
    };
    let job = zs.submit_pending("AddImage");
    let stuck = zs
        .take_fault(ZsFaultKind::StuckDownloading, "AddImage")
        .is_some();
    if !stuck {
        let zs2 = zs.clone();
        let job2 = job.clone();
        tokio::spawn(async move {
            let r = finish_add_image(&zs2, &uuid, &url, &bss).await;
            zs2.finish(&job2, r);
        });
    }
    zs.accepted(&job)
}

async fn finish_add_image(
    zs: &Arc<ZStackPlatform>,
    uuid: &str,
    url: &str,
    bss: &[String],
) -> ZsResult {
    let fetched = transfer::fetch_into_image(zs, url).await;
    let (data, md5) = match fetched {
        Ok(x) => x,
        Err(e) => {
            let _ = zs.inv.update(|doc| {
                doc.images.remove(uuid);
                Ok(())
            });
            return Err(ZsError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SYS.1000",
                "Failed to download the image",
                format!(
                    "AddImage {uuid}: downloading {}: {e}",
                    transfer::redact(url)
                ),
            ));
        }
    };
    let data_id = data.id().to_string();
    let size = data.size();
    let r = zs.inv.update(|doc| {
        let connected: Vec<String> = bss
            .iter()
            .filter(|b| bs_connected(doc, b))
            .cloned()
            .collect();
        let Some(img) = doc.images.get_mut(uuid) else {
            return Ok(Err(ZsError::not_found("ImageVO", uuid)));
        };
        if img.status != "Downloading" {
            return Ok(Err(ZsError::refused(format!(
                "image[uuid:{uuid}] was {} while downloading",
                img.status
            ))));
        }
        img.size = size;
        img.actual_size = size;
        img.md5_sum = md5.clone();
        img.data_id = data_id.clone();
        if connected.is_empty() {
            img.status = "Error".into();
            return Ok(Err(ZsError::refused(format!(
                "failed to add image[uuid:{uuid}] to every backup storage {bss:?}: all Disconnected"
            ))));
        }
        img.backup_storage_refs = connected.iter().map(|b| new_ref(b, uuid)).collect();
        img.status = "Ready".into();
        Ok(Ok(json!({"inventory": img.inventory()})))
    });
    let r = r.map_err(ZsError::from).and_then(|x| x);
    if r.is_err() {
        release_data(zs, &data_id);
    }
    r
}

/// Drops an image's data unless a cached image or a disk still uses it.
pub fn release_data(zs: &ZStackPlatform, data_id: &str) {
    if data_id.is_empty() {
        return;
    }
    let cached = zs
        .inv
        .read(|d| d.image_cache.values().any(|v| v == data_id));
    if !cached && zs.hv.store.disks_using(data_id).is_empty() {
        let _ = zs.hv.store.delete_image(data_id);
    }
}

/// `DELETE /zstack/v1/images/{uuid}?backupStorageUuids=a,b&deleteMode=…`:
/// soft delete from some or all backup storages.
pub async fn delete_image(
    State(zs): Zs,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let mut only: Vec<String> = Vec::new();
    for pair in q.as_deref().unwrap_or("").split('&') {
        if let Some(v) = pair.strip_prefix("backupStorageUuids=") {
            only.extend(
                pct_decode(v)
                    .split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string),
            );
        }
    }
    let r = zs
        .inv
        .update(|doc| {
            let Some(img) = doc.images.get_mut(&id) else {
                return Ok(Err(ZsError::not_found("ImageVO", &id)));
            };
            let (gone, kept): (Vec<BsRef>, Vec<BsRef>) = img
                .backup_storage_refs
                .drain(..)
                .partition(|r| only.is_empty() || only.contains(&r.backup_storage_uuid));
            img.deleted_refs.extend(gone);
            img.backup_storage_refs = kept;
            if img.backup_storage_refs.is_empty() {
                img.status = "Deleted".into();
                doc.exports.remove(&id);
            }
            Ok(Ok(json!({})))
        })
        .map_err(ZsError::from)
        .and_then(|x| x);
    zs.submit("DeleteImage", r)
}

/// `PUT /zstack/v1/images/{uuid}/actions`: `changeImageState`,
/// `expungeImage`, `recoverImage`, `updateImage`.
pub async fn image_action(State(zs): Zs, Path(id): Path<String>, body: Bytes) -> Response {
    let v = match body_json(&body) {
        Ok(v) => v,
        Err(e) => return zs.submit("ImageAction", Err(e)),
    };
    if let Some(a) = v.get("changeImageState") {
        let r = zs
            .inv
            .update(|doc| {
                let Some(img) = doc.images.get_mut(&id) else {
                    return Ok(Err(ZsError::not_found("ImageVO", &id)));
                };
                match s(a, "stateEvent").as_deref() {
                    Some("enable") => img.state = "Enabled".into(),
                    Some("disable") => img.state = "Disabled".into(),
                    other => {
                        return Ok(Err(ZsError::invalid(format!(
                            "stateEvent {other:?}: enable or disable"
                        ))));
                    }
                }
                Ok(Ok(json!({"inventory": img.inventory()})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x);
        return zs.submit("ChangeImageState", r);
    }
    if v.get("expungeImage").is_some() {
        let r = zs
            .inv
            .update(|doc| {
                let Some(img) = doc.images.get(&id) else {
                    return Ok(Err(ZsError::not_found("ImageVO", &id)));
                };
                if img.status != "Deleted" {
                    return Ok(Err(ZsError::refused(format!(
                        "image[uuid:{id}] is {}: delete it before expunging",
                        img.status
                    ))));
                }
                let data = img.data_id.clone();
                doc.images.remove(&id);
                doc.exports.remove(&id);
                Ok(Ok(data))
            })
            .map_err(ZsError::from)
            .and_then(|x| x)
            .map(|data| {
                release_data(&zs, &data);
                json!({})
            });
        return zs.submit("ExpungeImage", r);
    }
    if let Some(a) = v.get("updateImage") {
        let r = zs
            .inv
            .update(|doc| {
                let Some(img) = doc.images.get_mut(&id) else {
                    return Ok(Err(ZsError::not_found("ImageVO", &id)));
                };
                if let Some(n) = s(a, "name") {
                    img.name = n;
                }
                if let Some(d) = s(a, "description") {
                    img.description = d;
                }
                Ok(Ok(json!({"inventory": img.inventory()})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x);
        return zs.submit("UpdateImage", r);
    }
    if v.get("recoverImage").is_some() {
        let r = zs
            .inv
            .update(|doc| {
                let Some(img) = doc.images.get_mut(&id) else {
                    return Ok(Err(ZsError::not_found("ImageVO", &id)));
                };
                let back: Vec<BsRef> = img.deleted_refs.drain(..).collect();
                img.backup_storage_refs.extend(back);
                if img.status == "Deleted" {
                    img.status = if img.backup_storage_refs.is_empty() {
                        "Error"
                    } else {
                        "Ready"
                    }
                    .into();
                }
                Ok(Ok(json!({"inventory": img.inventory()})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x);
        return zs.submit("RecoverImage", r);
    }
    zs.submit(
        "ImageAction",
        Err(ZsError::invalid(
            "unknown image action (changeImageState, expungeImage, recoverImage, updateImage)",
        )),
    )
}

enum TemplateSource {
    Snapshot(String),
    Volume(String),
}

async fn create_template(
    zs: Arc<ZStackPlatform>,
    src: TemplateSource,
    media: &str,
    action: &str,
    body: Bytes,
) -> Response {
    let prepared = (|| {
        let p = params(&body)?;
        let name = s(&p, "name").ok_or_else(|| ZsError::invalid("missing name"))?;
        let uuid = s(&p, "resourceUuid").unwrap_or_else(zs_uuid);
        zs.inv.update(|doc| {
            let (volume_uuid, view, url) = match &src {
                TemplateSource::Snapshot(sid) => match doc.snapshots.get(sid) {
                    Some(sn) => (sn.volume_uuid.clone(), View::Snapshot(sid.clone()), format!("volumeSnapshot://{sid}")),
                    None => return Ok(Err(ZsError::not_found("VolumeSnapshotVO", sid))),
                },
                TemplateSource::Volume(vid) => (vid.clone(), View::Live, format!("volume://{vid}")),
            };
            let Some(vol) = doc.volumes.get(&volume_uuid) else {
                return Ok(Err(ZsError::not_found("VolumeVO", &volume_uuid)));
            };
            if media == "RootVolumeTemplate" && vol.kind != "Root" {
                return Ok(Err(ZsError::invalid(format!(
                    "volume[uuid:{volume_uuid}] is a {} volume: root volume templates need a root volume",
                    vol.kind
                ))));
            }
            let bss = match pick_backup_storages(doc, &string_list(&p, "backupStorageUuids")) {
                Ok(b) => b,
                Err(e) => return Ok(Err(e)),
            };
            if let Err(e) = quota_check(doc) {
                return Ok(Err(e));
            }
            if doc.images.contains_key(&uuid) {
                return Ok(Err(ZsError::refused(format!("image[uuid:{uuid}] exists"))));
            }
            let platform = vol
                .vm_instance_uuid
                .as_ref()
                .and_then(|v| doc.vms.get(v))
                .map(|v| v.platform.clone())
                .unwrap_or_else(|| "Linux".into());
            let disk_id = vol.disk_id.clone();
            doc.images.insert(
                uuid.clone(),
                Image {
                    uuid: uuid.clone(),
                    name,
                    description: s(&p, "description").unwrap_or_default(),
                    state: "Enabled".into(),
                    status: "Creating".into(),
                    size: vol.size,
                    actual_size: 0,
                    url,
                    media_type: media.into(),
                    guest_os_type: s(&p, "guestOsType").unwrap_or_default(),
                    platform: s(&p, "platform").unwrap_or(platform),
                    system: false,
                    format: "raw".into(),
                    md5_sum: "not calculated".into(),
                    backup_storage_refs: Vec::new(),
                    deleted_refs: Vec::new(),
                    data_id: String::new(),
                    created: unix_now(),
                },
            );
            Ok(Ok((uuid.clone(), disk_id, view, bss)))
        })?
    })();
    let (uuid, disk_id, view, bss) = match prepared {
        Ok(x) => x,
        Err(e) => return zs.submit(action, Err(e)),
    };
    let job = zs.submit_pending(action);
    let zs2 = zs.clone();
    let job2 = job.clone();
    tokio::spawn(async move {
        let hv = zs2.hv.clone();
        let copied = tokio::task::spawn_blocking(move || {
            let disk = hv.store.disk(&disk_id)?;
            transfer::copy_disk_to_image(&hv, &disk, &view)
        })
        .await;
        let r = match copied {
            Ok(Ok((image, md5))) => zs2
                .inv
                .update(|doc| {
                    let Some(img) = doc.images.get_mut(&uuid) else {
                        return Ok(Err((
                            ZsError::not_found("ImageVO", &uuid),
                            image.id().to_string(),
                        )));
                    };
                    img.data_id = image.id().to_string();
                    img.md5_sum = md5;
                    img.actual_size = image.allocated_map().count() * crate::disk::BLOCK_SIZE;
                    img.backup_storage_refs = bss.iter().map(|b| new_ref(b, &uuid)).collect();
                    img.status = "Ready".into();
                    Ok(Ok(json!({"inventory": img.inventory()})))
                })
                .map_err(|e| (ZsError::from(e), image.id().to_string()))
                .and_then(|x| x)
                .map_err(|(e, data)| {
                    release_data(&zs2, &data);
                    e
                }),
            Ok(Err(e)) => {
                let _ = zs2.inv.update(|doc| {
                    if let Some(i) = doc.images.get_mut(&uuid) {
                        i.status = "Error".into();
                    }
                    Ok(())
                });
                Err(ZsError::from(e))
            }
            Err(e) => Err(ZsError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SYS.1000",
                "An internal error happened in system",
                e.to_string(),
            )),
        };
        zs2.finish(&job2, r);
    });
    zs.accepted(&job)
}

/// `POST /zstack/v1/images/root-volume-templates/from/volume-snapshots/{snapshotUuid}`.
pub async fn root_template_from_snapshot(
    State(zs): Zs,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    create_template(
        zs,
        TemplateSource::Snapshot(id),
        "RootVolumeTemplate",
        "CreateRootVolumeTemplateFromVolumeSnapshot",
        body,
    )
    .await
}

/// `POST /zstack/v1/images/root-volume-templates/from/volumes/{rootVolumeUuid}`.
pub async fn root_template_from_volume(
    State(zs): Zs,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    create_template(
        zs,
        TemplateSource::Volume(id),
        "RootVolumeTemplate",
        "CreateRootVolumeTemplateFromRootVolume",
        body,
    )
    .await
}

/// `POST /zstack/v1/images/data-volume-templates/from/volume-snapshots/{snapshotUuid}`.
pub async fn data_template_from_snapshot(
    State(zs): Zs,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    create_template(
        zs,
        TemplateSource::Snapshot(id),
        "DataVolumeTemplate",
        "CreateDataVolumeTemplateFromVolumeSnapshot",
        body,
    )
    .await
}

/// `POST /zstack/v1/images/data-volume-templates/from/volumes/{volumeUuid}`.
pub async fn data_template_from_volume(
    State(zs): Zs,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    create_template(
        zs,
        TemplateSource::Volume(id),
        "DataVolumeTemplate",
        "CreateDataVolumeTemplateFromVolume",
        body,
    )
    .await
}

// ---------------------------------------------------------------- VMs and volumes

/// Puts an image into the primary storage image cache and creates a volume
/// thin-cloned from it. Checks the image is usable.
pub fn clone_volume_from_image(
    zs: &ZStackPlatform,
    doc: &mut ZsInventory,
    image_uuid: &str,
    media: &str,
    kind: &str,
    name: String,
    volume_uuid: String,
) -> ZsResult<Volume> {
    let img = doc
        .images
        .get(image_uuid)
        .ok_or_else(|| ZsError::not_found("ImageVO", image_uuid))?;
    if img.status != "Ready" {
        return Err(ZsError::refused(format!(
            "image[uuid:{image_uuid}] is {}, not Ready",
            img.status
        )));
    }
    if img.state == "Disabled" {
        return Err(ZsError::refused(format!(
            "image[uuid:{image_uuid}] is Disabled: creating volumes from it is not allowed"
        )));
    }
    if img.media_type != media {
        return Err(ZsError::invalid(format!(
            "image[uuid:{image_uuid}] is a {}, {media} needed",
            img.media_type
        )));
    }
    let data_id = img.data_id.clone();
    let size = img.size;
    let disk = zs.hv.store.create_disk(size, Some(&data_id))?;
    doc.image_cache.insert(image_uuid.to_string(), data_id);
    let vol = Volume {
        uuid: volume_uuid.clone(),
        name,
        kind: kind.into(),
        vm_instance_uuid: None,
        root_image_uuid: (kind == "Root").then(|| image_uuid.to_string()),
        device_id: 0,
        size,
        disk_id: disk.id().to_string(),
        created: unix_now(),
        description: String::new(),
        status: "Ready".into(),
    };
    doc.volumes.insert(volume_uuid, vol.clone());
    Ok(vol)
}

/// What a VM is created with: an instance offering or CPU and memory, and
/// its L3 networks (one NIC each).
#[derive(Debug, Clone, Default)]
pub struct VmSpec {
    /// Instance offering.
    pub instance_offering_uuid: Option<String>,
    /// CPUs (without an offering).
    pub cpu_num: Option<u32>,
    /// Memory in bytes (without an offering).
    pub memory_size: Option<u64>,
    /// L3 networks (at least one).
    pub l3_network_uuids: Vec<String>,
}

/// Checks a spec against the inventory as CreateVmInstance does; `None`
/// takes the first instance offering and L3 network (admin and demo VMs).
fn resolve_spec(
    doc: &mut ZsInventory,
    spec: Option<VmSpec>,
) -> ZsResult<(Option<String>, u32, u64, Vec<String>)> {
    let spec = match spec {
        Some(s) => s,
        None => {
            doc.ensure_defaults();
            VmSpec {
                instance_offering_uuid: doc.instance_offerings.keys().next().cloned(),
                l3_network_uuids: doc.l3_networks.keys().next().cloned().into_iter().collect(),
                ..VmSpec::default()
            }
        }
    };
    let (cpu, mem) = match (&spec.instance_offering_uuid, spec.cpu_num, spec.memory_size) {
        (Some(o), _, _) => {
            let o = doc
                .instance_offerings
                .get(o)
                .ok_or_else(|| ZsError::not_found("InstanceOfferingVO", o))?;
            (o.cpu_num, o.memory_size)
        }
        (None, Some(c), Some(m)) if c > 0 && m > 0 => (c, m),
        _ => {
            return Err(ZsError::invalid(
                "instanceOfferingUuid is required (or both cpuNum and memorySize)",
            ));
        }
    };
    if spec.l3_network_uuids.is_empty() {
        return Err(ZsError::invalid(
            "l3NetworkUuids is required: a VM needs at least one L3 network",
        ));
    }
    for l3 in &spec.l3_network_uuids {
        if !doc.l3_networks.contains_key(l3) {
            return Err(ZsError::not_found("L3NetworkVO", l3));
        }
    }
    Ok((spec.instance_offering_uuid, cpu, mem, spec.l3_network_uuids))
}
/// Creates a VM (root volume thin-cloned from `image_uuid`).
pub fn create_vm_record(
    zs: &ZStackPlatform,
    name: &str,
    image_uuid: &str,
    uuid: Option<String>,
    spec: Option<VmSpec>,
) -> ZsResult<Value> {
    let uuid = uuid.unwrap_or_else(zs_uuid);
    zs.inv
        .update(|doc| {
            if doc.vms.contains_key(&uuid) {
                return Ok(Err(ZsError::refused(format!("VM[uuid:{uuid}] exists"))));
            }
            let (offering, cpu_num, memory_size, l3) = match resolve_spec(doc, spec.clone()) {
                Ok(s) => s,
                Err(e) => return Ok(Err(e)),
            };
            let platform = doc
                .images
                .get(image_uuid)
                .map(|i| i.platform.clone())
                .unwrap_or_default();
            let vol = match clone_volume_from_image(
                zs,
                doc,
                image_uuid,
                "RootVolumeTemplate",
                "Root",
                format!("ROOT-for-{name}"),
                zs_uuid(),
            ) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            if let Some(v) = doc.volumes.get_mut(&vol.uuid) {
                v.vm_instance_uuid = Some(uuid.clone());
            }
            let vm = Vm {
                uuid: uuid.clone(),
                name: name.to_string(),
                image_uuid: Some(image_uuid.to_string()),
                root_volume_uuid: vol.uuid,
                platform,
                created: unix_now(),
                description: String::new(),
                instance_offering_uuid: offering,
                cpu_num,
                memory_size,
                l3_network_uuids: l3,
                state: "Running".into(),
            };
            let inv = doc.vm_inventory(&vm);
            doc.vms.insert(uuid.clone(), vm);
            Ok(Ok(json!({"inventory": inv})))
        })
        .map_err(ZsError::from)
        .and_then(|x| x)
}

/// `GET /zstack/v1/vm-instances`.
pub async fn query_vms(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    query_answer(
        q,
        zs.inv
            .read(|d| d.vms.values().map(|v| d.vm_inventory(v)).collect()),
    )
}

/// `GET /zstack/v1/vm-instances/{uuid}`.
pub async fn query_vm_one(State(zs): Zs, Path(id): Path<String>) -> Response {
    one(
        zs.inv
            .read(|d| d.vms.values().map(|v| d.vm_inventory(v)).collect()),
        "VmInstanceVO",
        &id,
    )
}

/// `POST /zstack/v1/vm-instances` (CreateVmInstance).
pub async fn create_vm(State(zs): Zs, body: Bytes) -> Response {
    let r = params(&body).and_then(|p| {
        let name = s(&p, "name").ok_or_else(|| ZsError::invalid("missing name"))?;
        let image = s(&p, "imageUuid").ok_or_else(|| ZsError::invalid("missing imageUuid"))?;
        let spec = VmSpec {
            instance_offering_uuid: s(&p, "instanceOfferingUuid"),
            cpu_num: p["cpuNum"].as_u64().map(|c| c as u32),
            memory_size: p["memorySize"].as_u64(),
            l3_network_uuids: p["l3NetworkUuids"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let created = create_vm_record(&zs, &name, &image, s(&p, "resourceUuid"), Some(spec))?;
        let uuid = created["inventory"]["uuid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let description = s(&p, "description").unwrap_or_default();
        zs.inv
            .update(|doc| {
                let Some(vm) = doc.vms.get_mut(&uuid) else {
                    return Ok(Err(ZsError::not_found("VmInstanceVO", &uuid)));
                };
                vm.description = description.clone();
                let vm = vm.clone();
                Ok(Ok(json!({"inventory": doc.vm_inventory(&vm)})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x)
    });
    zs.submit("CreateVmInstance", r)
}

/// Deletes a volume's disk and its snapshots' records.
fn drop_volume(zs: &ZStackPlatform, doc: &mut ZsInventory, volume_uuid: &str) {
    if let Some(v) = doc.volumes.remove(volume_uuid) {
        doc.snapshots.retain(|_, s| s.volume_uuid != volume_uuid);
        let _ = zs.hv.store.delete_disk(&v.disk_id);
    }
}

/// `DELETE /zstack/v1/vm-instances/{uuid}` (DestroyVmInstance): the VM
/// becomes `Destroyed`, still listed and still holding its volumes, until
/// `expungeVmInstance` (destroying it again is a no-op). Its root volume
/// becomes `Deleted` (`VmDeleteVolumeFlow` with the default `Delay`
/// policy), so no snapshot can be taken of it.
pub async fn destroy_vm(State(zs): Zs, Path(id): Path<String>) -> Response {
    let r = zs
        .inv
        .update(|doc| {
            let Some(vm) = doc.vms.get_mut(&id) else {
                return Ok(Err(ZsError::not_found("VmInstanceVO", &id)));
            };
            vm.state = "Destroyed".into();
            let root = vm.root_volume_uuid.clone();
            if let Some(v) = doc.volumes.get_mut(&root) {
                v.status = "Deleted".into();
            }
            Ok(Ok(json!({})))
        })
        .map_err(ZsError::from)
        .and_then(|x| x);
    zs.submit("DestroyVmInstance", r)
}

/// ExpungeVmInstance: removes a `Destroyed` VM with its volumes.
fn expunge_vm(zs: &ZStackPlatform, id: &str) -> ZsResult {
    zs.inv
        .update(|doc| {
            match doc.vms.get(id) {
                None => return Ok(Err(ZsError::not_found("VmInstanceVO", id))),
                Some(vm) if vm.state != "Destroyed" => {
                    return Ok(Err(ZsError::refused(format!(
                        "vm[uuid:{id}] is {}: only a Destroyed VM can be expunged",
                        vm.state
                    ))));
                }
                _ => {}
            }
            doc.vms.remove(id);
            let vols: Vec<String> = doc
                .volumes
                .values()
                .filter(|v| v.vm_instance_uuid.as_deref() == Some(id))
                .map(|v| v.uuid.clone())
                .collect();
            for v in vols {
                drop_volume(zs, doc, &v);
            }
            Ok(Ok(json!({})))
        })
        .map_err(ZsError::from)
        .and_then(|x| x)
}

/// `GET /zstack/v1/instance-offerings`.
pub async fn query_offerings(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    query_answer(
        q,
        zs.inv.read(|d| {
            d.instance_offerings
                .values()
                .map(|o| o.inventory())
                .collect()
        }),
    )
}

/// `GET /zstack/v1/l3-networks`.
pub async fn query_l3_networks(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    query_answer(
        q,
        zs.inv
            .read(|d| d.l3_networks.values().map(|n| n.inventory()).collect()),
    )
}

fn volume_inventories(d: &ZsInventory) -> Vec<Value> {
    d.volumes
        .values()
        .map(|v| v.inventory(&d.primary_storage_uuid))
        .collect()
}

/// `GET /zstack/v1/volumes`.
pub async fn query_volumes(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    query_answer(q, zs.inv.read(volume_inventories))
}

/// `GET /zstack/v1/volumes/{uuid}`.
pub async fn query_volume_one(State(zs): Zs, Path(id): Path<String>) -> Response {
    one(zs.inv.read(volume_inventories), "VolumeVO", &id)
}

/// `DELETE /zstack/v1/volumes/{uuid}` (data volumes).
pub async fn delete_volume(State(zs): Zs, Path(id): Path<String>) -> Response {
    let r = zs
        .inv
        .update(|doc| {
            match doc.volumes.get(&id) {
                None => return Ok(Err(ZsError::not_found("VolumeVO", &id))),
                Some(v) if v.kind == "Root" => {
                    return Ok(Err(ZsError::refused(format!(
                        "volume[uuid:{id}] is a root volume"
                    ))));
                }
                _ => {}
            }
            drop_volume(&zs, doc, &id);
            Ok(Ok(json!({})))
        })
        .map_err(ZsError::from)
        .and_then(|x| x);
    zs.submit("DeleteDataVolume", r)
}

/// `POST /zstack/v1/volumes/data/from/data-volume-templates/{imageUuid}`.
pub async fn data_volume_from_template(
    State(zs): Zs,
    Path(image): Path<String>,
    body: Bytes,
) -> Response {
    let r = params(&body).and_then(|p| {
        let name = s(&p, "name").ok_or_else(|| ZsError::invalid("missing name"))?;
        let uuid = s(&p, "resourceUuid").unwrap_or_else(zs_uuid);
        let description = s(&p, "description").unwrap_or_default();
        zs.inv
            .update(|doc| {
                let mut vol = match clone_volume_from_image(
                    &zs,
                    doc,
                    &image,
                    "DataVolumeTemplate",
                    "Data",
                    name.clone(),
                    uuid.clone(),
                ) {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                };
                vol.description = description.clone();
                doc.volumes.insert(vol.uuid.clone(), vol.clone());
                Ok(Ok(
                    json!({"inventory": vol.inventory(&doc.primary_storage_uuid)}),
                ))
            })
            .map_err(ZsError::from)
            .and_then(|x| x)
    });
    zs.submit("CreateDataVolumeFromVolumeTemplate", r)
}

/// `POST /zstack/v1/volumes/{uuid}/vm-instances/{vmUuid}` (attach).
pub async fn attach_volume(State(zs): Zs, Path((id, vm)): Path<(String, String)>) -> Response {
    let r = zs
        .inv
        .update(|doc| {
            match doc.vms.get(&vm) {
                None => return Ok(Err(ZsError::not_found("VmInstanceVO", &vm))),
                Some(v) if v.state == "Destroyed" => {
                    return Ok(Err(ZsError::refused(format!(
                        "vm[uuid:{vm}] is Destroyed: volumes cannot be attached"
                    ))));
                }
                _ => {}
            }
            let next = doc
                .volumes
                .values()
                .filter(|v| v.vm_instance_uuid.as_deref() == Some(&vm))
                .map(|v| v.device_id + 1)
                .max()
                .unwrap_or(1);
            let ps = doc.primary_storage_uuid.clone();
            let Some(v) = doc.volumes.get_mut(&id) else {
                return Ok(Err(ZsError::not_found("VolumeVO", &id)));
            };
            if v.vm_instance_uuid.is_some() {
                return Ok(Err(ZsError::refused(format!(
                    "volume[uuid:{id}] is already attached"
                ))));
            }
            v.vm_instance_uuid = Some(vm.clone());
            v.device_id = next;
            Ok(Ok(json!({"inventory": v.inventory(&ps)})))
        })
        .map_err(ZsError::from)
        .and_then(|x| x);
    zs.submit("AttachDataVolumeToVm", r)
}

/// `POST /zstack/v1/volumes/{uuid}/volume-snapshots`.
pub async fn create_snapshot(State(zs): Zs, Path(id): Path<String>, body: Bytes) -> Response {
    let r = params(&body).and_then(|p| {
        let name = s(&p, "name").ok_or_else(|| ZsError::invalid("missing name"))?;
        let uuid = s(&p, "resourceUuid").unwrap_or_else(zs_uuid);
        zs.inv
            .update(|doc| {
                let Some(vol) = doc.volumes.get(&id) else {
                    return Ok(Err(resource_not_found("volumeUuid", &id, "VolumeVO")));
                };
                if let Err(e) = snapshot_ready(vol) {
                    return Ok(Err(e));
                }
                let disk = zs.hv.store.disk(&vol.disk_id)?;
                let cp = disk.checkpoints().keys().max().copied().unwrap_or(0) + 1;
                disk.create_snapshot(&uuid, cp)?;
                let sn = Snapshot {
                    uuid: uuid.clone(),
                    name: name.clone(),
                    volume_uuid: id.clone(),
                    size: vol.size,
                    created: unix_now(),
                };
                let inv = sn.inventory(&vol.kind, &doc.primary_storage_uuid);
                doc.snapshots.insert(uuid.clone(), sn);
                doc.snapshot_creates += 1;
                Ok(Ok(json!({"inventory": inv})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x)
    });
    zs.submit("CreateVolumeSnapshot", r)
}

fn snapshot_inventories(d: &ZsInventory) -> Vec<Value> {
    d.snapshots
        .values()
        .map(|s| {
            let kind = d
                .volumes
                .get(&s.volume_uuid)
                .map(|v| v.kind.as_str())
                .unwrap_or("Root");
            s.inventory(kind, &d.primary_storage_uuid)
        })
        .collect()
}

/// `SysErrors.RESOURCE_NOT_FOUND` as ZStack's API validator words a
/// missing `@APIParam(resourceType=…)` (`PortApiValidator`; descriptions
/// from `conf/errorCodes/sys.xml`).
fn resource_not_found(field: &str, uuid: &str, vo: &str) -> ZsError {
    ZsError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "SYS.1003",
        "A resource can not be found",
        format!("invalid field[{field}], resource[uuid:{uuid}, type:{vo}] not found"),
    )
}

/// `SysErrors.OPERATION_ERROR` (`operr`).
fn operr(details: String) -> ZsError {
    ZsError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "SYS.1006",
        "An operation failed",
        details,
    )
}

/// ZStack snapshots only `Ready` volumes (`VolumeApiInterceptor`; the root
/// volume of a destroyed VM is `Deleted`).
fn snapshot_ready(vol: &Volume) -> ZsResult<()> {
    if vol.status == "Ready" {
        return Ok(());
    }
    Err(operr(format!(
        "volume[uuid:{}] is not in status Ready, current is {}, can't create snapshot",
        vol.uuid, vol.status
    )))
}

fn group_inventory(g: &SnapshotGroup) -> Value {
    let refs: Vec<Value> = g
        .refs
        .iter()
        .map(|r| {
            json!({"volumeSnapshotUuid": r.snapshot_uuid, "volumeSnapshotName": r.snapshot_name,
                "volumeUuid": r.volume_uuid, "volumeSnapshotGroupUuid": g.uuid,
                "deviceId": r.device_id, "volumeType": r.volume_type,
                "snapshotDeleted": r.deleted})
        })
        .collect();
    json!({"uuid": g.uuid, "name": g.name, "description": g.description,
        "vmInstanceUuid": g.vm_instance_uuid, "snapshotCount": refs.len(),
        "volumeSnapshotRefs": refs})
}

/// A ZStack before 3.6 has no group API; its `RestServer` answers in
/// plain text, without a ZStack error object:
/// - `POST /v1/volume-snapshots/group` falls on the path pattern
///   `/v1/volume-snapshots/{uuid}`, which has only a query and a delete
///   API: `500 No creational API found for the path[…]`;
/// - `DELETE /v1/volume-snapshots/group/{uuid}` matches no pattern:
///   `404 no api mapping to …`.
fn no_snapshot_groups(status: StatusCode, text: String) -> Response {
    (status, text).into_response()
}

/// `POST /zstack/v1/volume-snapshots/group` (`CreateVolumeSnapshotGroup`,
/// ZStack 3.6+): one snapshot of every volume of the root volume's VM,
/// all taken at the same instant, named `<group name>-<volume name>`. As
/// ZStack validates it: the root volume must exist (`SYS.1003`), be a
/// VM's root volume (`SYS.1007`), and every volume of the VM must be
/// `Ready` (`SYS.1006`).
pub async fn create_snapshot_group(State(zs): Zs, body: Bytes) -> Response {
    if !zs.config().snapshot_groups {
        return no_snapshot_groups(
            StatusCode::INTERNAL_SERVER_ERROR,
            "No creational API found for the path[/zstack/v1/volume-snapshots/group]".into(),
        );
    }
    let r = params(&body).and_then(|p| {
        let name = s(&p, "name").ok_or_else(|| ZsError::invalid("missing name"))?;
        let root =
            s(&p, "rootVolumeUuid").ok_or_else(|| ZsError::invalid("missing rootVolumeUuid"))?;
        let description = s(&p, "description").unwrap_or_default();
        let uuid = s(&p, "resourceUuid").unwrap_or_else(zs_uuid);
        zs.inv
            .update(|doc| {
                let Some(root_vol) = doc.volumes.get(&root) else {
                    return Ok(Err(resource_not_found("rootVolumeUuid", &root, "VolumeVO")));
                };
                let Some(vm) = root_vol
                    .vm_instance_uuid
                    .clone()
                    .filter(|vm| root_vol.kind == "Root" && doc.vms.contains_key(vm))
                else {
                    return Ok(Err(ZsError::invalid(format!(
                        "volume[uuid:{root}] is not root volume"
                    ))));
                };
                let mut vols: Vec<Volume> = doc
                    .volumes
                    .values()
                    .filter(|v| v.vm_instance_uuid.as_deref() == Some(vm.as_str()))
                    .cloned()
                    .collect();
                vols.sort_by_key(|v| (v.kind != "Root", v.device_id));
                if let Some(Err(e)) = vols.iter().map(snapshot_ready).find(Result::is_err) {
                    return Ok(Err(e));
                }
                let mut refs = Vec::new();
                for vol in vols {
                    let id = zs_uuid();
                    let disk = zs.hv.store.disk(&vol.disk_id)?;
                    let cp = disk.checkpoints().keys().max().copied().unwrap_or(0) + 1;
                    disk.create_snapshot(&id, cp)?;
                    let snapshot_name = format!("{name}-{}", vol.name);
                    doc.snapshots.insert(
                        id.clone(),
                        Snapshot {
                            uuid: id.clone(),
                            name: snapshot_name.clone(),
                            volume_uuid: vol.uuid.clone(),
                            size: vol.size,
                            created: unix_now(),
                        },
                    );
                    refs.push(GroupRef {
                        snapshot_uuid: id,
                        snapshot_name,
                        volume_uuid: vol.uuid.clone(),
                        volume_type: vol.kind.clone(),
                        device_id: vol.device_id,
                        deleted: false,
                    });
                }
                let g = SnapshotGroup {
                    uuid: uuid.clone(),
                    name,
                    description,
                    vm_instance_uuid: vm,
                    refs,
                };
                let inv = group_inventory(&g);
                doc.snapshot_groups.insert(uuid.clone(), g);
                doc.snapshot_group_creates += 1;
                Ok(Ok(json!({"inventory": inv})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x)
    });
    zs.submit("CreateVolumeSnapshotGroup", r)
}

/// `GET /zstack/v1/volume-snapshots/group`. A ZStack before 3.6 runs
/// the path as `QueryVolumeSnapshot` of the snapshot whose UUID is
/// `group`: no inventories.
pub async fn query_snapshot_groups(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    if !zs.config().snapshot_groups {
        return query_answer(q, Vec::new());
    }
    query_answer(
        q,
        zs.inv
            .read(|d| d.snapshot_groups.values().map(group_inventory).collect()),
    )
}

/// Deletes a snapshot and what ZStack deletes with it: deleting a root
/// volume's member snapshot removes its group
/// (`VolumeSnapshotTreeBase.ungroupAfterDeleted`); a data volume's member
/// stays in the group marked `snapshotDeleted`.
fn remove_snapshot(
    zs: &ZStackPlatform,
    doc: &mut ZsInventory,
    id: &str,
) -> crate::error::Result<()> {
    let Some(sn) = doc.snapshots.remove(id) else {
        return Ok(());
    };
    let root = match doc.volumes.get(&sn.volume_uuid) {
        Some(vol) => {
            zs.hv.store.disk(&vol.disk_id)?.delete_snapshot(id)?;
            vol.kind == "Root"
        }
        None => false,
    };
    if root {
        doc.snapshot_groups
            .retain(|_, g| !g.refs.iter().any(|r| r.snapshot_uuid == id));
    } else {
        for g in doc.snapshot_groups.values_mut() {
            for r in g.refs.iter_mut().filter(|r| r.snapshot_uuid == id) {
                r.deleted = true;
            }
        }
    }
    Ok(())
}

/// `DELETE /zstack/v1/volume-snapshots/group/{uuid}`
/// (`DeleteVolumeSnapshotGroup`): deletes the member snapshots of the
/// volumes still attached to the group's VM; the group goes with its root
/// volume's snapshot. A group that does not exist is a success
/// (`successIfResourceNotExisting`).
pub async fn delete_snapshot_group(State(zs): Zs, Path(id): Path<String>) -> Response {
    if !zs.config().snapshot_groups {
        return no_snapshot_groups(
            StatusCode::NOT_FOUND,
            format!("no api mapping to /v1/volume-snapshots/group/{id}"),
        );
    }
    let r =
        zs.inv
            .update(|doc| {
                let Some(g) = doc.snapshot_groups.get(&id).cloned() else {
                    return Ok(Ok(json!({})));
                };
                for r in g.refs.iter().filter(|r| !r.deleted) {
                    let attached = doc.volumes.get(&r.volume_uuid).is_some_and(|v| {
                        v.vm_instance_uuid.as_deref() == Some(&g.vm_instance_uuid)
                    });
                    if attached {
                        remove_snapshot(&zs, doc, &r.snapshot_uuid)?;
                    }
                }
                doc.snapshot_groups.remove(&id);
                doc.snapshot_group_deletes += 1;
                Ok(Ok(json!({})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x);
    zs.submit("DeleteVolumeSnapshotGroup", r)
}

/// `GET /zstack/v1/volume-snapshots`.
pub async fn query_snapshots(State(zs): Zs, RawQuery(q): RawQuery) -> Response {
    query_answer(q, zs.inv.read(snapshot_inventories))
}

/// `GET /zstack/v1/volume-snapshots/{uuid}`.
pub async fn query_snapshot_one(State(zs): Zs, Path(id): Path<String>) -> Response {
    one(zs.inv.read(snapshot_inventories), "VolumeSnapshotVO", &id)
}

/// `DELETE /zstack/v1/volume-snapshots/{uuid}`.
pub async fn delete_snapshot(State(zs): Zs, Path(id): Path<String>) -> Response {
    let r = zs
        .inv
        .update(|doc| {
            if !doc.snapshots.contains_key(&id) {
                return Ok(Err(ZsError::not_found("VolumeSnapshotVO", &id)));
            }
            remove_snapshot(&zs, doc, &id)?;
            Ok(Ok(json!({})))
        })
        .map_err(ZsError::from)
        .and_then(|x| x);
    zs.submit("DeleteVolumeSnapshot", r)
}

/// `PUT /zstack/v1/vm-instances/{uuid}/actions`: `updateVmInstance`
/// (name, description), `expungeVmInstance`.
pub async fn vm_action(State(zs): Zs, Path(id): Path<String>, body: Bytes) -> Response {
    if body_json(&body).is_ok_and(|v| v.get("expungeVmInstance").is_some()) {
        return zs.submit("ExpungeVmInstance", expunge_vm(&zs, &id));
    }
    let r = body_json(&body).and_then(|v| {
        let a = v.get("updateVmInstance").cloned().ok_or_else(|| {
            ZsError::invalid("unknown VM action (supported: updateVmInstance, expungeVmInstance)")
        })?;
        zs.inv
            .update(|doc| {
                let Some(vm) = doc.vms.get_mut(&id) else {
                    return Ok(Err(ZsError::not_found("VmInstanceVO", &id)));
                };
                if let Some(n) = s(&a, "name") {
                    vm.name = n;
                }
                if let Some(d) = s(&a, "description") {
                    vm.description = d;
                }
                let vm = vm.clone();
                Ok(Ok(json!({"inventory": doc.vm_inventory(&vm)})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x)
    });
    zs.submit("UpdateVmInstance", r)
}

/// `PUT /zstack/v1/volumes/{uuid}/actions`: `updateVolume` (name,
/// description).
pub async fn volume_action(State(zs): Zs, Path(id): Path<String>, body: Bytes) -> Response {
    let r = body_json(&body).and_then(|v| {
        let a = v
            .get("updateVolume")
            .cloned()
            .ok_or_else(|| ZsError::invalid("unknown volume action (supported: updateVolume)"))?;
        zs.inv
            .update(|doc| {
                let ps = doc.primary_storage_uuid.clone();
                let Some(vol) = doc.volumes.get_mut(&id) else {
                    return Ok(Err(ZsError::not_found("VolumeVO", &id)));
                };
                if let Some(n) = s(&a, "name") {
                    vol.name = n;
                }
                if let Some(d) = s(&a, "description") {
                    vol.description = d;
                }
                Ok(Ok(json!({"inventory": vol.inventory(&ps)})))
            })
            .map_err(ZsError::from)
            .and_then(|x| x)
    });
    zs.submit("UpdateVolume", r)
}

#[cfg(test)]
mod tests {
    use super::like;

    #[test]
    fn like_has_mysql_semantics() {
        assert!(like("vmbackup.h.%", "vmbackup.h.job-1.b0.root"));
        assert!(!like("vmbackup.h.%", "vmbackup.h2.job-1"));
        // `_` is any one character; `\_` only itself.
        assert!(like("a_c", "abc"));
        assert!(!like(r"a\_c", "abc"));
        assert!(like(r"a\_c", "a_c"));
        assert!(like(r"100\%", "100%"));
        assert!(!like(r"100\%", "1000"));
        assert!(like(r"a\\b", r"a\b"));
        // Case-insensitive, like the default collation.
        assert!(like("VMBACKUP.%", "vmbackup.x"));
        assert!(like("%in-progress (x)%", "restore in-progress (x) now"));
        assert!(like("%", ""));
        assert!(!like("a%b", "a"));
        assert!(like("a%b%c", "aXbYbc"));
    }
}
