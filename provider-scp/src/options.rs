//! Provider settings: where SCP is, how to log in, how disks are read.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use provider_kit::RetryPolicy;
use serde::{Deserialize, Serialize};

/// A password (or any secret) that never shows in `Debug` output, logs or
/// errors.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the provider gives the host access to a snapshot's disks (and how
/// it writes restored disks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum AccessMode {
    /// sfvddk-style NBD export of each disk (plain TCP).
    Nbd,
    /// NBD with STARTTLS ("NBDSSL"); the server certificate is verified
    /// against `ca_pem`, never trusted blindly.
    NbdSsl {
        /// PEM of the CA that signs the NBD server's certificate.
        ca_pem: String,
        /// Name to verify in the certificate (default: the export's host).
        server_name: Option<String>,
    },
    /// Each disk is hot-added to a backup proxy VM (the machine the host
    /// runs on) and read as a local file.
    HotAdd {
        /// The proxy VM's server id.
        proxy_server_id: String,
    },
}

/// Everything the provider needs to talk to one SCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScpOptions {
    /// Base URL, e.g. `https://scp.example:443` (paths start at `/janus`).
    pub base_url: String,
    /// Account name.
    pub username: String,
    /// Account password (redacted in `Debug`).
    pub password: Secret,
    /// How disks are read and written.
    pub access: AccessMode,
    /// Lease of the backup resource, seconds (`remain_time`).
    pub lease_seconds: u32,
    /// How often the lease is renewed while a backup or restore runs.
    pub renew_interval: Duration,
    /// How long an asynchronous task may run before the provider gives up.
    pub task_timeout: Duration,
    /// Pause between two polls of a task.
    pub poll_interval: Duration,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// Storage restored VMs (and base image replicas) go to; default: the
    /// original VM's storage.
    pub restore_storage_id: Option<String>,
    /// Retries of idempotent calls (`GET`s, task polls) on retryable
    /// errors (HTTP 502/503/504/429, connection failures). Not part of the
    /// configuration file: the default (5 attempts, 200 ms doubling up to
    /// 5 s) unless code sets it.
    #[serde(skip)]
    pub retry: RetryPolicy,
    /// Access key: when set (with [`Self::secret_key`]), requests are
    /// signed (`AWS4-HMAC-SHA256`) instead of logging in with the password.
    #[serde(default)]
    pub access_key: Option<String>,
    /// Secret key of [`Self::access_key`] (redacted in `Debug`).
    #[serde(default)]
    pub secret_key: Option<Secret>,
    /// Region of the signature scope (`cn-south-1` by default).
    #[serde(default = "default_region")]
    pub region: String,
    /// Service of the signature scope (`open-api` by default).
    #[serde(default = "default_service")]
    pub service: String,
    /// HotAdd: where the proxy's guest lists its disks by serial (the
    /// proxy's `/dev/disk/by-id`). When set, a hot-added disk is the device
    /// `<root>/virtio-<serial>` (waited for up to
    /// [`Self::hotadd_device_wait`]), not a path the platform hands out.
    #[serde(default)]
    pub hotadd_device_root: Option<PathBuf>,
    /// How long a hot-added disk may take to appear under
    /// [`Self::hotadd_device_root`].
    #[serde(default = "default_device_wait")]
    pub hotadd_device_wait: Duration,
    /// A site command that serves each disk as NBD on a Unix socket (the
    /// sfvddk path, e.g. `nbdkit` with a plugin around `sfdisklib_open`).
    /// When set (with `Nbd` or `NbdSsl` access), disks are opened through
    /// it instead of the platform's REST export; see
    /// [`crate::disk_access::HelperCommand`]. Refused with `HotAdd`.
    #[serde(default)]
    pub helper_command: Option<HelperCommandOptions>,
    /// A PEM file of the CA that signs the platform's HTTPS certificate
    /// (then the only root trusted for the API); `None`: the built-in web
    /// roots.
    #[serde(default)]
    pub api_ca: Option<PathBuf>,
}

/// The disk helper command ([`ScpOptions::helper_command`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperCommandOptions {
    /// Program and arguments (never run through a shell), with the
    /// placeholders of [`crate::disk_access::HelperCommand`] (`{socket}`,
    /// `{server}`, `{disk}`, `{snapshot}`, `{base_image}`, `{readonly}`,
    /// and the `{if_readonly}` argument prefix).
    pub argv: Vec<String>,
    /// How long the command may take to accept connections on its socket.
    #[serde(default = "default_helper_timeout")]
    pub start_timeout: Duration,
}

impl HelperCommandOptions {
    /// A helper running `argv`, with a 30 s start timeout.
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        HelperCommandOptions {
            argv: argv.into_iter().map(Into::into).collect(),
            start_timeout: default_helper_timeout(),
        }
    }
}

fn default_helper_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_device_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_region() -> String {
    "cn-south-1".into()
}

fn default_service() -> String {
    "open-api".into()
}

impl ScpOptions {
    /// Defaults for everything but the address and the credentials: NBD,
    /// a 300 s lease renewed every 60 s, 10 min task timeout.
    pub fn new(
        base_url: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        ScpOptions {
            base_url: base_url.into(),
            username: username.into(),
            password: Secret::new(password),
            access: AccessMode::Nbd,
            lease_seconds: 300,
            renew_interval: Duration::from_secs(60),
            task_timeout: Duration::from_secs(600),
            poll_interval: Duration::from_millis(200),
            request_timeout: Duration::from_secs(60),
            restore_storage_id: None,
            retry: RetryPolicy::default(),
            access_key: None,
            secret_key: None,
            region: default_region(),
            service: default_service(),
            hotadd_device_root: None,
            hotadd_device_wait: default_device_wait(),
            helper_command: None,
            api_ca: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_password() {
        let o = ScpOptions::new("http://scp", "admin", "hunter2-secret");
        let text = format!("{o:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("***"));
    }
}
