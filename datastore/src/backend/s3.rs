//! [`Backend`] on S3 or an S3-compatible store (Ceph RGW, MinIO, moto),
//! through the `object_store` crate.
//!
//! - Conditional writes are S3's own: `put_new` is a PUT with
//!   `If-None-Match: *`, `put_if_version` one with `If-Match: <ETag>`
//!   (AWS since 2024, Ceph RGW, MinIO, moto; a store without them fails
//!   the first `put_new` with an error saying so).
//! - Retries: `object_store` retries 5xx answers (503 SlowDown included),
//!   429s and connection failures with exponential backoff (100 ms
//!   doubling to 5 s, [`S3Options::max_retries`] times, within
//!   [`S3Options::retry_timeout`]). A conditional PUT is not repeated by
//!   it once it may have reached the server, because a repeat could
//!   answer "exists" to our own first write; this backend repeats it
//!   itself and, when a repeat finds the key taken, reads the object:
//!   the same bytes mean the first attempt created it.
//! - Errors name the operation, the key and the store, and say what to
//!   check: credentials (`Auth`), a missing bucket (`NotFound`).
//! - The clock: [`Backend::now`] writes a small object under `.clock/`,
//!   reads its `Last-Modified` back and deletes it.
//! - The async client runs on a two-thread runtime owned by the backend;
//!   the synchronous calls wait for it from any thread.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};
use provider_api::{Error, ErrorKind, Result};

use super::{Backend, ObjectMeta, check_key};
use crate::util::{corrupt, unique_suffix};

/// How to reach an S3 bucket. Unset fields come from the usual
/// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`).
#[derive(Clone, Default)]
pub struct S3Options {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// Endpoint of an S3-compatible store (`http://127.0.0.1:9000`); AWS
    /// when unset.
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials.
    pub session_token: Option<String>,
    /// Allow plain `http://` endpoints (test servers, a store on a trusted
    /// network).
    pub allow_http: bool,
    /// Retries of a failed request (default 8).
    pub max_retries: Option<usize>,
    /// Give up retrying a request after this long (default 120 s).
    pub retry_timeout: Option<Duration>,
    /// Timeout of one request (default 300 s: a chunk is at most 64 MiB).
    pub request_timeout: Option<Duration>,
    /// Keep no idle connections (each request on a new one). For tests
    /// that inject faults per connection.
    pub no_connection_reuse: bool,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

/// Bucket and key prefix of an `s3://bucket[/prefix]` URL.
pub fn parse_s3_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| Error::invalid(format!("{url:?} is not an s3://bucket[/prefix] URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(Error::invalid(format!(
            "{url:?}: {bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-', '.')"
        )));
    }
    if !prefix.is_empty() && !super::is_valid_key(prefix) {
        return Err(Error::invalid(format!(
            "{url:?}: {prefix:?} is not a valid key prefix"
        )));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// A [`Backend`] in an S3 bucket, under a key prefix.
pub struct S3Backend {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    location: String,
    rt: Option<tokio::runtime::Runtime>,
    retries: usize,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("location", &self.location)
            .finish()
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which Tokio forbids inside another
        // runtime: shut it down in the background instead.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Whether an error is worth repeating a conditional PUT for (anything
/// but an answer about the request itself).
fn transient(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. })
        && !describe(e).contains("NoSuchBucket")
        && !describe(e).contains("AccessDenied")
        && !describe(e).contains("InvalidAccessKeyId")
        && !describe(e).contains("SignatureDoesNotMatch")
}

/// An error and its sources, in one line.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}

impl S3Backend {
    /// Connect (lazily: nothing is sent until the first request).
    pub fn new(options: &S3Options) -> Result<S3Backend> {
        let (bucket, prefix) = parse_s3_url(&options.url)?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_virtual_hosted_style_request(false);
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        if let Some(v) = &options.region {
            b = b.with_region(v);
        }
        if let Some(v) = &options.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &options.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &options.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = &options.session_token {
            b = b.with_token(v);
        }
        let retries = options.max_retries.unwrap_or(8);
        let mut client = ClientOptions::new()
            .with_allow_http(options.allow_http)
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(options.request_timeout.unwrap_or(Duration::from_secs(300)));
        if options.no_connection_reuse {
            client = client.with_pool_max_idle_per_host(0);
        }
        let store = b
            .with_allow_http(options.allow_http)
            .with_client_options(client)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: retries,
                retry_timeout: options.retry_timeout.unwrap_or(Duration::from_secs(120)),
            })
            .build()
            .map_err(|e| Error::invalid(format!("S3 store {}: {}", options.url, describe(&e))))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmbackup-s3")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Io, "starting the S3 client's runtime").with_source(e)
            })?;
        let location = match prefix.is_empty() {
            true => format!("s3://{bucket}"),
            false => format!("s3://{bucket}/{prefix}"),
        };
        Ok(S3Backend {
            store: Arc::new(store),
            prefix,
            location,
            rt: Some(rt),
            retries,
        })
    }

    fn path(&self, key: &str) -> Result<ObjPath> {
        check_key(key)?;
        let full = match self.prefix.is_empty() {
            true => key.to_owned(),
            false => format!("{}/{key}", self.prefix),
        };
        ObjPath::parse(&full).map_err(|e| Error::invalid(format!("object key {key:?}: {e}")))
    }

    /// The object path a listing of `prefix` (a key prefix ending in `/`,
    /// or empty) starts from; `None` for the whole bucket.
    fn prefix_path(&self, prefix: &str) -> Result<Option<ObjPath>> {
        let trimmed = prefix.trim_end_matches('/');
        Ok(match (trimmed.is_empty(), self.prefix.is_empty()) {
            (true, true) => None,
            (true, false) => Some(
                ObjPath::parse(&self.prefix)
                    .map_err(|e| Error::invalid(format!("prefix {:?}: {e}", self.prefix)))?,
            ),
            (false, _) => Some(self.path(trimmed)?),
        })
    }

    fn key_of(&self, path: &ObjPath) -> String {
        let p = path.as_ref();
        match self.prefix.is_empty() {
            true => p.to_owned(),
            false => p
                .strip_prefix(&self.prefix)
                .map(|k| k.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| p.to_owned()),
        }
    }

    /// Run a request on the backend's runtime and wait for it.
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| Error::other("the S3 client was shut down"))?;
        // Unconstrained: polled from a caller's async task, the join handle
        // would spend that task's cooperative budget, and once it is spent
        // tokio defers the wake-up to the caller's runtime, which this
        // blocking wait keeps from ever running (a hang after ~128
        // requests in one task).
        futures::executor::block_on(tokio::task::unconstrained(rt.spawn(f)))
            .map_err(|e| Error::other("an S3 request task failed").with_source(e))
    }

    fn err(&self, op: &str, key: &str, e: object_store::Error) -> Error {
        let text = describe(&e);
        let at = format!("{}/{key}", self.location);
        let (kind, hint) = if matches!(
            e,
            object_store::Error::Unauthenticated { .. }
                | object_store::Error::PermissionDenied { .. }
        ) || text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
            || text.contains("AccessDenied")
        {
            (
                ErrorKind::Auth,
                " (check the access key and secret: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the repository's settings)",
            )
        } else if text.contains("NoSuchBucket") {
            (
                ErrorKind::NotFound,
                " (the bucket does not exist: create it first)",
            )
        } else if matches!(e, object_store::Error::NotImplemented) {
            (
                ErrorKind::Unsupported,
                " (the store does not support conditional writes, which a shared datastore needs)",
            )
        } else {
            (ErrorKind::Io, "")
        };
        Error::new(kind, format!("S3 {op} of {at} failed{hint}: {text}"))
    }

    fn meta(&self, m: &object_store::ObjectMeta) -> ObjectMeta {
        ObjectMeta {
            key: self.key_of(&m.location),
            size: m.size,
            modified: SystemTime::from(m.last_modified),
            version: m.e_tag.clone().unwrap_or_default(),
        }
    }

    fn conditional(&self, key: &str, data: Bytes, mode: PutMode) -> Result<Option<String>> {
        let path = self.path(key)?;
        let op = match mode {
            PutMode::Create => "create",
            _ => "conditional replace",
        };
        let mut attempt = 0;
        let mut ambiguous = false;
        loop {
            let store = self.store.clone();
            let (p, payload, m) = (path.clone(), PutPayload::from(data.clone()), mode.clone());
            let res = self.run(async move {
                store
                    .put_opts(
                        &p,
                        payload,
                        PutOptions {
                            mode: m,
                            ..Default::default()
                        },
                    )
                    .await
            })?;
            match res {
                Ok(r) => return Ok(Some(r.e_tag.unwrap_or_default())),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {
                    if ambiguous {
                        // An earlier attempt may have been ours: the same
                        // bytes say it was.
                        if let Some((now, meta)) = self.get(key, data.len() as u64 + 1)?
                            && now == data
                        {
                            return Ok(Some(meta.version));
                        }
                    }
                    return Ok(None);
                }
                Err(e) if transient(&e) && attempt < self.retries => {
                    attempt += 1;
                    ambiguous = true;
                    let pause = Duration::from_millis(100u64 << attempt.min(6));
                    tracing::info!(
                        "S3 {op} of {key}: retry {attempt} after {pause:?}: {}",
                        describe(&e)
                    );
                    std::thread::sleep(pause);
                }
                Err(e) => return Err(self.err(op, key, e)),
            }
        }
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn get(&self, key: &str, limit: u64) -> Result<Option<(Vec<u8>, ObjectMeta)>> {
        let path = self.path(key)?;
        let store = self.store.clone();
        let res = self.run(async move {
            let r = store.get(&path).await?;
            if r.meta.size > limit {
                return Ok(Err(r.meta.size));
            }
            let meta = r.meta.clone();
            let bytes = r.bytes().await?;
            Ok(Ok((bytes, meta)))
        })?;
        match res {
            Ok(Ok((bytes, meta))) => {
                if bytes.len() as u64 > limit {
                    return Err(corrupt(format!(
                        "{}/{key} grew past {limit} bytes",
                        self.location
                    )));
                }
                Ok(Some((bytes.to_vec(), self.meta(&meta))))
            }
            Ok(Err(size)) => Err(corrupt(format!(
                "{}/{key} is {size} bytes, more than the limit of {limit}",
                self.location
            ))),
            Err(e @ object_store::Error::NotFound { .. })
                if !describe(&e).contains("NoSuchBucket") =>
            {
                Ok(None)
            }
            Err(e) => Err(self.err("read", key, e)),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        let store = self.store.clone();
        match self.run(async move { store.head(&path).await })? {
            Ok(m) => Ok(Some(self.meta(&m))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    fn put(&self, key: &str, data: Bytes) -> Result<String> {
        let path = self.path(key)?;
        let store = self.store.clone();
        match self.run(async move { store.put(&path, PutPayload::from(data)).await })? {
            Ok(r) => Ok(r.e_tag.unwrap_or_default()),
            Err(e) => Err(self.err("write", key, e)),
        }
    }

    fn put_new(&self, key: &str, data: Bytes) -> Result<Option<String>> {
        self.conditional(key, data, PutMode::Create)
    }

    fn put_if_version(&self, key: &str, data: Bytes, version: &str) -> Result<Option<String>> {
        self.conditional(
            key,
            data,
            PutMode::Update(UpdateVersion {
                e_tag: Some(version.to_owned()),
                version: None,
            }),
        )
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let store = self.store.clone();
        match self.run(async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let path = self.prefix_path(prefix)?;
        let store = self.store.clone();
        let res = self.run(async move {
            store
                .list(path.as_ref())
                .try_collect::<Vec<object_store::ObjectMeta>>()
                .await
        })?;
        match res {
            Ok(v) => Ok(v.iter().map(|m| self.meta(m)).collect()),
            Err(e) => Err(self.err("list", prefix, e)),
        }
    }

    fn children(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.prefix_path(prefix)?;
        let store = self.store.clone();
        let res = self.run(async move { store.list_with_delimiter(path.as_ref()).await })?;
        match res {
            Ok(r) => {
                let mut v: Vec<String> = r
                    .common_prefixes
                    .iter()
                    .chain(r.objects.iter().map(|o| &o.location))
                    .filter_map(|p| p.filename().map(str::to_owned))
                    .collect();
                v.sort();
                v.dedup();
                Ok(v)
            }
            Err(e) => Err(self.err("list", prefix, e)),
        }
    }

    fn check(&self) -> Result<()> {
        S3Backend::check(self)
    }

    fn now(&self) -> Result<SystemTime> {
        let key = format!(".clock/{}", unique_suffix());
        self.put(&key, Bytes::from_static(b"clock"))?;
        let meta = self.head(&key)?;
        let _ = self.delete(&key);
        meta.map(|m| m.modified).ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!(
                    "{}/{key} vanished right after it was written",
                    self.location
                ),
            )
        })
    }
}

impl S3Backend {
    /// One request that reaches the bucket (a listing of at most one
    /// page): a wrong bucket name, endpoint or credentials fail here with
    /// one clear error, before anything is read or written. (A HEAD of a
    /// missing bucket answers a bare 404, the same as a missing object.)
    pub fn check(&self) -> Result<()> {
        let store = self.store.clone();
        let res = self.run(async move {
            let mut s = store.list(None);
            s.try_next().await.map(|_| ())
        })?;
        res.map_err(|e| self.err("listing", "", e))
    }
}
