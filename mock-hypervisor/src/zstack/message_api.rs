//! ZStack's message API (the legacy "REST API facade" every ZStack release
//! still serves beside `/zstack/v1`): `POST /zstack/api` with one JSON
//! object `{"<full message class>": {...fields, "session": {"uuid": S}}}`,
//! and `GET /zstack/api/result/{uuid}` for the result of an asynchronous
//! message. Each message is answered by the same inventory operations the
//! `/zstack/v1` handlers use ([`super::api`]): this module only translates.
//!
//! Wire format, from zstackio/zstack (master, 2024-10):
//! - `core/src/main/java/org/zstack/core/rest/RESTApiController.java`:
//!   `POST|PUT {REST_API_CALL}` (`/api`, `header/.../rest/RESTConstant.java`;
//!   the servlet lives under `/zstack`) always answers HTTP 200 with a
//!   `RestAPIResponse` as JSON; a body that does not decode to a message
//!   answers HTTP 200 with the decoder's exception message as plain text
//!   (`RESTApiDecoder.java`: `Unable to deserialize class <name>` for a
//!   class ZStack lacks). `GET {REST_API_RESULT}{uuid}` (`/api/result/`)
//!   answers the stored `RestAPIResponse`, or HTTP 404 `No api
//!   result[uuid:<uuid>] found`.
//! - `header/.../rest/RestAPIResponse.java`: `uuid`, `state`
//!   (`RestAPIState.java`: `Processing` or `Done`), `createdDate`,
//!   `finishedDate`, `result` (a JSON *string*); null fields are left out
//!   (Gson).
//! - `core/.../rest/RESTApiFacadeImpl.java`: a synchronous message
//!   (`APISyncCallMessage`: queries, sessions) is `call`ed: `state` `Done`,
//!   no `uuid`, `result` = `RESTApiDecoder.dump(reply)` =
//!   `{"<full reply class>": {...}}`. Any other message is `send`: `state`
//!   `Processing` and `uuid` (the message id, the key of the result);
//!   when the message's `APIEvent` arrives the stored result becomes
//!   `{"<full event class>": {...}}` with `state` `Done`.
//! - Errors travel inside the reply/event: `success: false` and `error`
//!   (`header/.../errorcode/ErrorCode.java`: `code`, `description`,
//!   `details`, ...). An error raised before the message reaches its
//!   service (session check, argument check) is answered by
//!   `CloudBusImpl3.replyErrorToApiMessage` as a bare
//!   `org.zstack.header.message.APIReply` (sync) or
//!   `org.zstack.header.message.APIEvent` (async).
//! - Sessions: `identity/.../SessionAPIRequestChecker.java` and
//!   `Session.java` refuse a missing, unknown or expired session with
//!   `IdentityErrors.INVALID_SESSION` (`ID.1001`, description from
//!   `conf/errorCodes/identity.xml`); a wrong password is `ID.1000` `wrong
//!   account name or password` (`identity/.../AccountLoginBackend.java`).
//! - Queries (`search/.../query/QueryFacadeImpl.java`): `conditions`
//!   (`name`, `op`, `value`; `in`/`not in` values are comma-separated),
//!   `limit`, `start`, `count` (only `total`), `replyWithCount`
//!   (`inventories` and `total`), `sortBy`/`sortDirection`, `fields`.
//!
//! Message classes the mock does not emulate are answered as ZStack
//! answers a class it lacks (plain-text `Unable to deserialize class`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::model::fmt_date;
use super::{ZStackPlatform, ZsError, api, lock};
use crate::ids::unix_now;

type Zs = State<Arc<ZStackPlatform>>;

/// The routes, merged into the ZStack router (they share its fault layer).
pub(super) fn router() -> Router<Arc<ZStackPlatform>> {
    Router::new()
        .route("/zstack/api", post(call).put(call))
        .route("/zstack/api/", post(call).put(call))
        .route("/zstack/api/result/{uuid}", get(result).put(result))
}

/// The result of an asynchronous message, by its `uuid`.
#[derive(Debug, Clone)]
enum Pending {
    /// Delivered by the mock's API job of the same UUID; `event` is the
    /// full event class.
    Job { event: String },
    /// Already known (an error raised before the message ran).
    Ready(Value),
}

/// Asynchronous messages sent through this API (job UUIDs are unique
/// across mocks, so one table serves every instance in a process).
static PENDING: LazyLock<Mutex<HashMap<String, Pending>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

const INVALID_SESSION: &str =
    "The session is invalid, either wrong session id or the session has been expired";

fn now() -> String {
    fmt_date(unix_now())
}

fn error_json(e: &ZsError) -> Value {
    json!({"code": e.code, "description": e.description, "details": e.details})
}

/// `RestAPIResponse` of a synchronous call: `Done` with the reply.
fn done(reply_class: &str, mut reply: Value) -> Response {
    if let Some(m) = reply.as_object_mut() {
        m.entry("success").or_insert(json!(true));
    }
    let d = now();
    let result = json!({ reply_class: reply }).to_string();
    axum::Json(json!({"state": "Done", "createdDate": d, "finishedDate": d, "result": result}))
        .into_response()
}

/// A failed synchronous reply of class `reply_class`.
fn failed(reply_class: &str, e: &ZsError) -> Response {
    done(
        reply_class,
        json!({"success": false, "error": error_json(e)}),
    )
}

/// `RestAPIResponse` of an asynchronous message just sent.
fn processing(uuid: &str) -> Response {
    axum::Json(json!({"uuid": uuid, "state": "Processing", "createdDate": now()})).into_response()
}

/// What the decoder answers for a body it cannot turn into a message
/// (HTTP 200, plain text: `RESTApiController.handleByMessageType`).
fn undecodable(text: String) -> Response {
    (StatusCode::OK, text).into_response()
}

fn session_error(zs: &ZStackPlatform, class: &str, msg: &Value) -> Option<ZsError> {
    let err = |details: String| {
        Some(ZsError::new(
            StatusCode::UNAUTHORIZED,
            "ID.1001",
            INVALID_SESSION,
            details,
        ))
    };
    let Some(session) = msg.get("session").filter(|s| s.is_object()) else {
        return err(format!("session of message[{class}] is null"));
    };
    match session.get("uuid").and_then(Value::as_str) {
        None => err("session uuid is null".into()),
        Some(s) if zs.has_session(s) => None,
        Some(_) => err("Session expired".into()),
    }
}

fn replace_suffix(class: &str, from: &str, to: &str) -> String {
    format!("{}{to}", class.strip_suffix(from).unwrap_or(class))
}

async fn body_value(resp: Response) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 256 << 20)
        .await
        .unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// `POST /zstack/api`.
async fn call(State(zs): Zs, body: Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return undecodable(format!("com.google.gson.JsonSyntaxException: {e}")),
    };
    let Some((class, msg)) = v.as_object().and_then(|m| m.iter().next()) else {
        return undecodable("java.lang.IllegalStateException: Not a JSON Object".into());
    };
    let (class, msg) = (class.clone(), msg.clone());
    let short = class.rsplit('.').next().unwrap_or_default();
    match short {
        "APILogInByAccountMsg" => return log_in(&zs, &class, &msg).await,
        "APILogOutMsg" => {
            if let Some(s) = msg.get("sessionUuid").and_then(Value::as_str) {
                zs.end_session(s);
            }
            return done(&replace_suffix(&class, "Msg", "Reply"), json!({}));
        }
        _ => {}
    }
    if let Some(list) = query_source(&class) {
        if let Some(e) = session_error(&zs, &class, &msg) {
            return failed("org.zstack.header.message.APIReply", &e);
        }
        let reply_class = replace_suffix(&class, "Msg", "Reply");
        let (_, all) = body_value(list(zs.clone()).await).await;
        let items = all["inventories"].as_array().cloned().unwrap_or_default();
        return match query(&msg, items) {
            Ok(reply) => done(&reply_class, reply),
            Err(e) => failed(&reply_class, &e),
        };
    }
    if is_async(&class) {
        return send(&zs, &class, &msg).await;
    }
    undecodable(format!("Unable to deserialize class {class}"))
}

/// APILogInByAccountMsg through the v1 login (same account and SHA-512
/// password check); a refusal is `ID.1000` as `AccountLoginBackend` words it.
async fn log_in(zs: &Arc<ZStackPlatform>, class: &str, msg: &Value) -> Response {
    let reply_class = replace_suffix(class, "ByAccountMsg", "Reply");
    let v1 = json!({"logInByAccount": {"accountName": msg.get("accountName"),
                                        "password": msg.get("password")}});
    let (status, v) =
        body_value(api::login(State(zs.clone()), Bytes::from(v1.to_string())).await).await;
    if status.is_success() {
        return done(&reply_class, json!({"inventory": v["inventory"]}));
    }
    let e = ZsError::new(
        status,
        "ID.1000",
        "Unable to authenticate a user",
        "wrong account name or password",
    );
    failed(&reply_class, &e)
}

type ListFn = fn(
    Arc<ZStackPlatform>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// The v1 list handler behind a query message (called without a query:
/// every inventory; the message's conditions are applied here).
fn query_source(class: &str) -> Option<ListFn> {
    macro_rules! list {
        ($f:path) => {
            Some(|zs| Box::pin(async move { $f(State(zs), RawQuery(None)).await }))
        };
    }
    match class {
        "org.zstack.header.vm.APIQueryVmInstanceMsg" => list!(api::query_vms),
        "org.zstack.header.volume.APIQueryVolumeMsg" => list!(api::query_volumes),
        "org.zstack.header.image.APIQueryImageMsg" => list!(api::query_images),
        "org.zstack.header.storage.backup.APIQueryBackupStorageMsg" => {
            list!(api::query_backup_storage)
        }
        "org.zstack.header.storage.primary.APIQueryPrimaryStorageMsg" => {
            list!(api::query_primary_storage)
        }
        "org.zstack.header.storage.snapshot.APIQueryVolumeSnapshotMsg" => {
            list!(api::query_snapshots)
        }
        "org.zstack.header.configuration.APIQueryInstanceOfferingMsg" => {
            list!(api::query_offerings)
        }
        "org.zstack.header.network.l3.APIQueryL3NetworkMsg" => list!(api::query_l3_networks),
        _ => None,
    }
}

// ---------------------------------------------------------------- queries

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// A field by name; `a.b` walks into objects.
fn field<'a>(item: &'a Value, name: &str) -> Option<&'a Value> {
    name.split('.')
        .try_fold(item, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn compare(got: &Value, want: &str) -> Option<std::cmp::Ordering> {
    let g = text(got);
    match (g.parse::<f64>(), want.parse::<f64>()) {
        (Ok(a), Ok(b)) => a.partial_cmp(&b),
        _ => Some(g.as_str().cmp(want)),
    }
}

/// One query condition (`QueryOp` of ZStack): `=`, `!=`, `>`, `>=`, `<`,
/// `<=`, `in`, `not in` (comma-separated values), `like`, `not like`
/// (the MySQL `LIKE` matcher `/zstack/v1` uses for `~=`), `is null`,
/// `is not null`.
fn matches(item: &Value, c: &Value) -> Result<bool, ZsError> {
    let name = c["name"]
        .as_str()
        .ok_or_else(|| ZsError::invalid(format!("query condition {c} has no name")))?;
    let op = c["op"].as_str().unwrap_or("=").trim().to_ascii_lowercase();
    let want = c.get("value").filter(|v| !v.is_null()).map(text);
    let got = field(item, name);
    let gtext = got.map(text);
    let need = || {
        want.clone()
            .ok_or_else(|| ZsError::invalid(format!("query condition {name} {op} needs a value")))
    };
    use std::cmp::Ordering::{Greater, Less};
    Ok(match op.as_str() {
        "=" => gtext == Some(need()?),
        "!=" => gtext != Some(need()?),
        "like" => gtext.is_some_and(|g| api::like(&want.clone().unwrap_or_default(), &g)),
        "not like" => !gtext.is_some_and(|g| api::like(&want.clone().unwrap_or_default(), &g)),
        "in" => {
            let w = need()?;
            gtext.is_some_and(|g| w.split(',').any(|x| x == g))
        }
        "not in" => {
            let w = need()?;
            !gtext.is_some_and(|g| w.split(',').any(|x| x == g))
        }
        "is null" => got.is_none(),
        "is not null" => got.is_some(),
        ">" | ">=" | "<" | "<=" => {
            let w = need()?;
            let Some(o) = got.and_then(|g| compare(g, &w)) else {
                return Ok(false);
            };
            match op.as_str() {
                ">" => o == Greater,
                ">=" => o != Less,
                "<" => o == Less,
                _ => o != Greater,
            }
        }
        other => {
            return Err(ZsError::invalid(format!(
                "invalid query op[{other}] of condition {name}"
            )));
        }
    })
}

fn flag(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_i64().is_some_and(|n| n != 0),
        Value::String(s) => s == "true",
        _ => false,
    }
}

fn number(msg: &Value, key: &str) -> Result<Option<u64>, ZsError> {
    match msg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .map(Some)
            .ok_or_else(|| ZsError::invalid(format!("{key} {v} is not a non-negative integer"))),
    }
}

/// Filters, sorts, pages (through the v1 [`api::Query`]: `limit`,
/// `start`, `count`, `replyWithCount`) and projects `items`.
fn query(msg: &Value, items: Vec<Value>) -> Result<Value, ZsError> {
    let conds = msg["conditions"].as_array().cloned().unwrap_or_default();
    let mut hits = Vec::new();
    for item in items {
        let mut ok = true;
        for c in &conds {
            if !matches(&item, c)? {
                ok = false;
                break;
            }
        }
        if ok {
            hits.push(item);
        }
    }
    if let Some(by) = msg["sortBy"].as_str() {
        let desc = msg["sortDirection"]
            .as_str()
            .is_some_and(|d| d.eq_ignore_ascii_case("desc"));
        hits.sort_by(|a, b| {
            let o = match (field(a, by), field(b, by)) {
                (Some(x), Some(y)) => compare(x, &text(y)).unwrap_or(std::cmp::Ordering::Equal),
                (x, y) => x.is_some().cmp(&y.is_some()),
            };
            if desc { o.reverse() } else { o }
        });
    }
    let mut raw = Vec::new();
    if let Some(l) = number(msg, "limit")? {
        raw.push(format!("limit={l}"));
    }
    if let Some(s) = number(msg, "start")? {
        raw.push(format!("start={s}"));
    }
    if flag(&msg["count"]) {
        raw.push("count=true".into());
    }
    if flag(&msg["replyWithCount"]) {
        raw.push("replyWithCount=true".into());
    }
    let mut reply = api::parse_query(Some(&raw.join("&")))?.answer(hits);
    let fields: Vec<&str> = msg["fields"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !fields.is_empty()
        && let Some(list) = reply.get_mut("inventories").and_then(Value::as_array_mut)
    {
        for inv in list.iter_mut() {
            let mut m = Map::new();
            for f in &fields {
                if let Some(v) = inv.get(*f) {
                    m.insert((*f).to_string(), v.clone());
                }
            }
            *inv = Value::Object(m);
        }
    }
    Ok(reply)
}

// ---------------------------------------------------------------- async

fn is_async(class: &str) -> bool {
    matches!(
        class,
        "org.zstack.header.volume.APICreateVolumeSnapshotMsg"
            | "org.zstack.header.storage.snapshot.APIDeleteVolumeSnapshotMsg"
    )
}

/// Sends an asynchronous message: runs it as a mock API job (the v1
/// handler) and answers `Processing` with the job's UUID.
async fn send(zs: &Arc<ZStackPlatform>, class: &str, msg: &Value) -> Response {
    let event = replace_suffix(class, "Msg", "Event");
    let refuse = |e: ZsError| {
        let uuid = super::model::zs_uuid();
        let evt = json!({"org.zstack.header.message.APIEvent":
            {"apiId": uuid, "success": false, "error": error_json(&e)}});
        lock(&PENDING).insert(uuid.clone(), Pending::Ready(evt));
        processing(&uuid)
    };
    if let Some(e) = session_error(zs, class, msg) {
        return refuse(e);
    }
    let arg = |k: &str| msg.get(k).and_then(Value::as_str).map(str::to_string);
    let st = State(zs.clone());
    let resp = if class.ends_with("APICreateVolumeSnapshotMsg") {
        let (Some(volume), Some(name)) = (arg("volumeUuid"), arg("name")) else {
            return refuse(ZsError::invalid(
                "volumeUuid and name are mandatory parameters",
            ));
        };
        let p = json!({"params": {"name": name, "description": arg("description"),
                                  "resourceUuid": arg("resourceUuid")}});
        api::create_snapshot(st, Path(volume), Bytes::from(p.to_string())).await
    } else {
        let Some(uuid) = arg("uuid") else {
            return refuse(ZsError::invalid("uuid is a mandatory parameter"));
        };
        api::delete_snapshot(st, Path(uuid)).await
    };
    let (_, v) = body_value(resp).await;
    let Some(job) = v["location"]
        .as_str()
        .and_then(|l| l.rsplit('/').next())
        .map(str::to_string)
    else {
        return refuse(ZsError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "SYS.1000",
            "An internal error happened",
            format!("no API job for {class}: {v}"),
        ));
    };
    lock(&PENDING).insert(job.clone(), Pending::Job { event });
    processing(&job)
}

/// `GET /zstack/api/result/{uuid}`.
async fn result(State(zs): Zs, Path(uuid): Path<String>) -> Response {
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            format!("No api result[uuid:{uuid}] found"),
        )
            .into_response()
    };
    let Some(p) = lock(&PENDING).get(&uuid).cloned() else {
        return not_found();
    };
    let finished = |evt: Value| {
        let d = now();
        axum::Json(json!({"uuid": uuid, "state": "Done", "createdDate": d,
                          "finishedDate": d, "result": evt.to_string()}))
        .into_response()
    };
    let event = match p {
        Pending::Ready(evt) => return finished(evt),
        Pending::Job { event } => event,
    };
    let (status, v) = body_value(zs.poll(&uuid)).await;
    match status {
        StatusCode::ACCEPTED => processing(&uuid),
        StatusCode::NOT_FOUND => not_found(),
        s if s.is_success() => {
            let mut body = v.as_object().cloned().unwrap_or_default();
            body.insert("apiId".into(), json!(uuid));
            body.insert("success".into(), json!(true));
            finished(json!({ event: body }))
        }
        _ => {
            let error = v.get("error").cloned().unwrap_or_else(|| {
                json!({"code": "SYS.1000", "description": "An internal error happened",
                       "details": v.to_string()})
            });
            finished(json!({ event: {"apiId": uuid, "success": false, "error": error} }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Hypervisor;
    use sha2::Digest;

    async fn platform() -> (tempfile::TempDir, Arc<ZStackPlatform>) {
        let dir = tempfile::tempdir().unwrap();
        let hv = Arc::new(Hypervisor::open(dir.path()).unwrap());
        let zs =
            ZStackPlatform::open(hv, dir.path(), super::super::ZStackConfig::default()).unwrap();
        (dir, zs)
    }

    async fn post(zs: &Arc<ZStackPlatform>, body: Value) -> (StatusCode, String) {
        let r = call(State(zs.clone()), Bytes::from(body.to_string())).await;
        let status = r.status();
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&b).into_owned())
    }

    /// The reply inside a `Done` answer: (class, body).
    fn reply(text: &str) -> (String, Value) {
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["state"], "Done", "{text}");
        let r: Value = serde_json::from_str(v["result"].as_str().unwrap()).unwrap();
        let (k, b) = r.as_object().unwrap().iter().next().unwrap();
        (k.clone(), b.clone())
    }

    fn sha512(s: &str) -> String {
        crate::disk::hex(&sha2::Sha512::digest(s.as_bytes()))
    }

    async fn login(zs: &Arc<ZStackPlatform>, password: &str) -> (String, Value) {
        let (_, t) = post(
            zs,
            json!({"org.zstack.header.identity.APILogInByAccountMsg":
                {"accountName": "admin", "password": sha512(password)}}),
        )
        .await;
        reply(&t)
    }

    #[tokio::test]
    async fn login_checks_the_password() {
        let (_d, zs) = platform().await;
        let (class, bad) = login(&zs, "nope").await;
        assert_eq!(class, "org.zstack.header.identity.APILogInReply");
        assert_eq!(bad["success"], false);
        assert_eq!(bad["error"]["code"], "ID.1000");
        let (_, good) = login(&zs, "password").await;
        assert_eq!(good["success"], true);
        assert!(good["inventory"]["uuid"].as_str().is_some());
    }

    #[tokio::test]
    async fn queries_page_count_and_refuse_bad_sessions() {
        let (_d, zs) = platform().await;
        let (_, good) = login(&zs, "password").await;
        let session = good["inventory"]["uuid"].as_str().unwrap().to_string();
        let q = |extra: Value| {
            let mut m = json!({"conditions": [], "session": {"uuid": session}});
            for (k, v) in extra.as_object().unwrap() {
                m[k] = v.clone();
            }
            json!({"org.zstack.header.storage.backup.APIQueryBackupStorageMsg": m})
        };
        let (_, all) = reply(&post(&zs, q(json!({}))).await.1);
        assert_eq!(all["inventories"].as_array().unwrap().len(), 2);
        assert!(all.get("total").is_none());
        let (class, page) = reply(
            &post(
                &zs,
                q(json!({"limit": 1, "start": 1, "replyWithCount": true})),
            )
            .await
            .1,
        );
        assert_eq!(
            class,
            "org.zstack.header.storage.backup.APIQueryBackupStorageReply"
        );
        assert_eq!(page["inventories"].as_array().unwrap().len(), 1);
        assert_eq!(page["inventories"][0], all["inventories"][1]);
        assert_eq!(page["total"], 2);
        let (_, count) = reply(&post(&zs, q(json!({"count": true}))).await.1);
        assert_eq!(count["total"], 2);
        assert!(count.get("inventories").is_none());
        let (_, like) = reply(
            &post(
                &zs,
                q(
                    json!({"conditions": [{"name": "name", "op": "like", "value": "%store-_"}],
                         "fields": ["uuid"]}),
                ),
            )
            .await
            .1,
        );
        assert_eq!(like["inventories"].as_array().unwrap().len(), 2);
        assert_eq!(like["inventories"][0].as_object().unwrap().len(), 1);
        let name = all["inventories"][0]["name"].as_str().unwrap().to_string();
        let (_, inq) = reply(
            &post(
                &zs,
                q(json!({"conditions": [{"name": "name", "op": "in", "value": format!("x,{name}")}]})),
            )
            .await
            .1,
        );
        assert_eq!(inq["inventories"].as_array().unwrap().len(), 1);
        // A logged-out session is refused with the code clients re-login on.
        post(
            &zs,
            json!({"org.zstack.header.identity.APILogOutMsg": {"sessionUuid": session}}),
        )
        .await;
        let (class, refused) = reply(&post(&zs, q(json!({}))).await.1);
        assert_eq!(class, "org.zstack.header.message.APIReply");
        assert_eq!(refused["success"], false);
        assert_eq!(refused["error"]["code"], "ID.1001");
    }

    #[tokio::test]
    async fn unknown_messages_answer_like_zstack() {
        let (_d, zs) = platform().await;
        let (status, text) = post(&zs, json!({"org.zstack.header.Nope": {}})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(text, "Unable to deserialize class org.zstack.header.Nope");
        let r = result(State(zs.clone()), Path("0".repeat(32))).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn async_messages_finish_through_the_result() {
        let (_d, zs) = platform().await;
        let (_, good) = login(&zs, "password").await;
        let session = good["inventory"]["uuid"].as_str().unwrap().to_string();
        let (_, text) = post(
            &zs,
            json!({"org.zstack.header.storage.snapshot.APIDeleteVolumeSnapshotMsg":
                {"uuid": "f".repeat(32), "session": {"uuid": session}}}),
        )
        .await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["state"], "Processing");
        let uuid = v["uuid"].as_str().unwrap().to_string();
        let mut last = Value::Null;
        for _ in 0..5 {
            let (_, b) = body_value(result(State(zs.clone()), Path(uuid.clone())).await).await;
            last = b;
            if last["state"] == "Done" {
                break;
            }
        }
        let (class, evt) = reply(&last.to_string());
        assert_eq!(
            class,
            "org.zstack.header.storage.snapshot.APIDeleteVolumeSnapshotEvent"
        );
        assert_eq!(evt["success"], false);
        // The v1 handler's not-found error, carried by the event.
        assert!(
            evt["error"]["code"].as_str().unwrap().starts_with("SYS."),
            "{evt}"
        );
    }
}
