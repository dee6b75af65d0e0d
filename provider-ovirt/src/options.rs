//! Settings of the provider: [`OvirtOptions`] and [`BackupMode`].

use std::path::PathBuf;
use std::time::Duration;

use provider_kit::RetryPolicy;
use serde::{Deserialize, Serialize};

use crate::client::WireFormat;

/// How backups are taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupMode {
    /// Incremental on 4.4+, snapshot attach before.
    #[default]
    Auto,
    /// Snapshot disks attached to the appliance (always full).
    SnapshotAttach,
    /// 4.4+ backups with checkpoints and image transfers.
    Incremental,
}

/// Settings of the provider.
#[derive(Clone, Serialize, Deserialize)]
pub struct OvirtOptions {
    /// API root, e.g. `https://engine/ovirt-engine/api`.
    pub api_url: String,
    /// SSO token URL (default: derived from `api_url`).
    pub sso_url: Option<String>,
    /// User (`admin@internal`).
    pub username: String,
    /// Password (never logged).
    pub password: String,
    /// The backup appliance VM (id or name).
    pub appliance: String,
    /// Wire format.
    pub format: WireFormat,
    /// Backup mode.
    pub mode: BackupMode,
    /// Cluster of restored VMs.
    pub cluster: String,
    /// Storage domain of restored disks (default: the saved one; required
    /// for snapshots taken on other platforms).
    pub storage_domain: Option<String>,
    /// Network the NICs of a VM restored from another platform connect to
    /// (none: such a VM gets no NICs, with a warning).
    pub network: Option<String>,
    /// Pause between status polls.
    pub poll_interval: Duration,
    /// How long a snapshot may stay `locked`, a backup may take to get
    /// ready, a transfer to start, an attached disk to show its path.
    pub operation_timeout: Duration,
    /// Timeout of one HTTP call.
    pub http_timeout: Duration,
    /// The engine's CA certificate (PEM, the engine's `ca.pem`): the only
    /// root trusted for the engine and its image servers (their
    /// certificates are always verified; absent: the system's roots).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Where the appliance sees its disks by id (default
    /// `/dev/disk/by-id`): an attached disk is found there by its serial,
    /// `virtio-<first 20 characters of the disk id>` or
    /// `scsi-0QEMU_QEMU_HARDDISK_<disk id>`, never by the attachment's
    /// `logical_name` (which the engine reports only once the guest agent
    /// has, if ever).
    #[serde(default = "default_device_root")]
    pub device_root: PathBuf,
    /// Retries of calls that are safe to repeat (not part of the
    /// configuration file: the default suits engines).
    #[serde(skip)]
    pub retry: RetryPolicy,
}

fn default_device_root() -> PathBuf {
    PathBuf::from("/dev/disk/by-id")
}

impl std::fmt::Debug for OvirtOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvirtOptions")
            .field("api_url", &self.api_url)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .field("appliance", &self.appliance)
            .field("format", &self.format)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl OvirtOptions {
    /// Defaults: XML, automatic mode, cluster `Default`, 1 s polls,
    /// 10 min operation timeout.
    pub fn new(api_url: &str, username: &str, password: &str, appliance: &str) -> Self {
        OvirtOptions {
            api_url: api_url.to_string(),
            sso_url: None,
            username: username.to_string(),
            password: password.to_string(),
            appliance: appliance.to_string(),
            format: WireFormat::Xml,
            mode: BackupMode::Auto,
            cluster: "Default".into(),
            storage_domain: None,
            network: None,
            poll_interval: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(600),
            http_timeout: Duration::from_secs(120),
            tls_ca: None,
            device_root: default_device_root(),
            retry: RetryPolicy::default(),
        }
    }

    pub(crate) fn sso(&self) -> String {
        self.sso_url.clone().unwrap_or_else(|| {
            let root = self
                .api_url
                .trim_end_matches('/')
                .trim_end_matches("/api")
                .to_string();
            format!("{root}/sso/oauth/token")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_hide_the_password() {
        let o = OvirtOptions::new(
            "https://e/ovirt-engine/api",
            "admin@internal",
            "s3cret",
            "app",
        );
        assert!(!format!("{o:?}").contains("s3cret"));
        assert_eq!(o.sso(), "https://e/ovirt-engine/sso/oauth/token");
    }
}
