//! Provider settings: where ZStack is, how to log in, where the work
//! directory is, timeouts and retries, restore overrides.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of the provider.
#[derive(Clone, Serialize, Deserialize)]
pub struct ZStackOptions {
    /// Base URL of the API up to `/v1`, e.g. `http://zstack:8080/zstack`.
    pub base_url: String,
    /// Account name.
    pub account: String,
    /// Account password (sent as its SHA-512 digest; never logged).
    pub password: String,
    /// Backup storage for temporary templates and restored images (default:
    /// the first `Connected` one).
    #[serde(default)]
    pub backup_storage_uuid: Option<String>,
    /// Local directory for the base-image digest cache (32 bytes per
    /// 64 KiB of each base image; exports are streamed, never staged).
    pub work_dir: PathBuf,
    /// Pause between API job polls, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Longest wait for one API job, in seconds; jobs that move an
    /// image's data (templates, AddImage) get `job_timeout_secs_per_gib`
    /// more per GiB of the image.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_secs: f64,
    /// Extra wait per GiB of image for the jobs that copy data, in
    /// seconds (default 120: a backup storage fetching 8.5 MiB/s).
    #[serde(default = "default_job_timeout_per_gib")]
    pub job_timeout_secs_per_gib: f64,
    /// Longest silence of the management node or of a download, in
    /// seconds (each read; a long download that keeps flowing is fine).
    #[serde(default = "default_io_timeout")]
    pub io_timeout_secs: u64,
    /// How often one ranged read of an export whose transfer broke is
    /// resumed (at the first missing byte) before it fails.
    #[serde(default = "default_retries")]
    pub download_retries: u32,
    /// Keep the images a restore uploaded (so that a later restore of the
    /// same data reuses them), each taking one slot of the `image.num`
    /// quota; by default (false) they are deleted and expunged once the
    /// VM exists (its volumes stay in the primary storage image cache),
    /// so that backups and restores leave the image count unchanged.
    #[serde(default)]
    pub keep_restore_images: bool,
    /// Attempts of an idempotent API call (login, queries, job polls)
    /// whose transport failed (1 = no retry).
    #[serde(default = "default_retries")]
    pub retry_attempts: u32,
    /// Delay before the first retry, in milliseconds (doubles up to 5 s,
    /// with jitter).
    #[serde(default = "default_retry_ms")]
    pub retry_initial_ms: u64,
    /// Instance offering of restored VMs (default: the backed-up VM's, or
    /// its CPU and memory when it had none). For a target that lacks the
    /// original offering.
    #[serde(default)]
    pub instance_offering_uuid: Option<String>,
    /// L3 networks of restored VMs, the first the default (default: the
    /// backed-up VM's NICs' networks). For a target that lacks them.
    #[serde(default)]
    pub l3_network_uuids: Vec<String>,
    /// A PEM file of the CA that signs the management node's HTTPS
    /// certificate (then the only root trusted); `None`: the built-in web
    /// roots.
    #[serde(default)]
    pub api_ca: Option<PathBuf>,
}

fn default_poll_ms() -> u64 {
    200
}
fn default_job_timeout() -> f64 {
    600.0
}
fn default_io_timeout() -> u64 {
    120
}
fn default_retries() -> u32 {
    5
}
fn default_job_timeout_per_gib() -> f64 {
    120.0
}
fn default_retry_ms() -> u64 {
    200
}

impl std::fmt::Debug for ZStackOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZStackOptions")
            .field("base_url", &self.base_url)
            .field("account", &self.account)
            .field("backup_storage_uuid", &self.backup_storage_uuid)
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

impl ZStackOptions {
    /// Options with defaults for everything but the essentials.
    pub fn new(
        base_url: impl Into<String>,
        account: impl Into<String>,
        password: impl Into<String>,
        work_dir: impl Into<PathBuf>,
    ) -> Self {
        ZStackOptions {
            base_url: base_url.into(),
            account: account.into(),
            password: password.into(),
            backup_storage_uuid: None,
            work_dir: work_dir.into(),
            poll_interval_ms: default_poll_ms(),
            job_timeout_secs: default_job_timeout(),
            job_timeout_secs_per_gib: default_job_timeout_per_gib(),
            io_timeout_secs: default_io_timeout(),
            download_retries: default_retries(),
            keep_restore_images: false,
            retry_attempts: default_retries(),
            retry_initial_ms: default_retry_ms(),
            instance_offering_uuid: None,
            l3_network_uuids: Vec::new(),
            api_ca: None,
        }
    }
}
