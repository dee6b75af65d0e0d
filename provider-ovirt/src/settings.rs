//! The platform's configuration table (`kind = "ovirt"`) and its
//! registration in a [`Registry`].
//!
//! ```toml
//! [platforms.engine]
//! kind = "ovirt"
//! endpoint = "https://engine.example.com/ovirt-engine/api"
//! username = "admin@internal"
//! password_file = "/etc/vmbackup/ovirt.password"  # or password = "..."
//! appliance = "backup-appliance"                 # VM the snapshot disks attach to
//! mode = "auto"                                  # auto | incremental | snapshot-attach
//! tls_ca = "/etc/pki/ovirt-engine/ca.pem"        # the engine's CA (always verified)
//! # device_root = "/dev/disk/by-id"              # where the appliance sees attached disks
//! # cluster = "Default"                          # cluster of restored VMs
//! # storage_domain = "data"                      # domain of restored disks (default: the saved one;
//! #                                              # required to restore a snapshot from another platform)
//! # network = "ovirtmgmt"                        # network of restored NICs (from another platform)
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use provider_kit::registry::{
    Platform, PlatformError, PlatformSettings, Redacted, Registry, read_secret,
};
use serde::Deserialize;

use crate::{BackupMode, OvirtOptions, OvirtProvider};

/// One oVirt platform's table (the password redacted in `Debug`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OvirtSettings {
    /// API root, e.g. `https://engine/ovirt-engine/api`.
    pub endpoint: String,
    /// Account, e.g. `admin@internal`.
    pub username: String,
    /// Password (prefer `password_file`).
    pub password: Option<Redacted>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// Name of the backup appliance VM disks are attached to.
    pub appliance: String,
    /// `auto` (default), `incremental` or `snapshot-attach`.
    pub mode: Option<String>,
    /// CA certificate (PEM) of the engine and its image servers (default:
    /// the system's roots; always verified).
    pub tls_ca: Option<PathBuf>,
    /// Where attached disks appear on this appliance, by disk id (default
    /// `/dev/disk/by-id`).
    pub device_root: Option<PathBuf>,
    /// Cluster restored VMs are created in (default `Default`).
    pub cluster: Option<String>,
    /// Storage domain (name) of restored disks (default: the domain the
    /// backup recorded; required for snapshots from other platforms).
    pub storage_domain: Option<String>,
    /// Network (name) the NICs of a VM restored from another platform
    /// connect to (without it such a VM gets no NICs, with a warning).
    pub network: Option<String>,
}

impl OvirtSettings {
    /// The provider's options for platform `name` (reads the password
    /// file).
    pub fn options(&self, name: &str) -> Result<OvirtOptions, PlatformError> {
        let pw = read_secret(
            name,
            "password",
            self.password.as_ref(),
            self.password_file.as_deref(),
        )?;
        let mut options = OvirtOptions::new(&self.endpoint, &self.username, &pw, &self.appliance);
        options.tls_ca = self.tls_ca.clone();
        if let Some(root) = &self.device_root {
            options.device_root = root.clone();
        }
        if let Some(cluster) = &self.cluster {
            options.cluster = cluster.clone();
        }
        options.storage_domain = self.storage_domain.clone();
        options.network = self.network.clone();
        options.mode = match self.mode.as_deref().unwrap_or("auto") {
            "auto" => BackupMode::Auto,
            "incremental" => BackupMode::Incremental,
            "snapshot-attach" => BackupMode::SnapshotAttach,
            other => {
                return Err(PlatformError::new(format!(
                    "platform {name}: mode {other:?} is not auto, incremental or snapshot-attach"
                )));
            }
        };
        Ok(options)
    }
}

impl PlatformSettings for OvirtSettings {
    const KIND: &'static str = "ovirt";

    fn build(self, name: &str) -> Result<Platform, PlatformError> {
        let provider = OvirtProvider::new(self.options(name)?)
            .map_err(|e| PlatformError::with_source(format!("platform {name}"), e))?;
        Ok(Platform::new(Arc::new(provider)))
    }
}

/// Add the `ovirt` platform kind to `registry`.
///
/// # Panics
///
/// If `registry` has an `ovirt` kind already.
pub fn register(registry: &mut Registry) {
    registry.register::<OvirtSettings>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_and_password_are_checked() {
        let table = serde_json::json!({"endpoint": "http://e/api", "username": "u", "password": "s3cret", "appliance": "a", "mode": "sideways"});
        let s: OvirtSettings =
            provider_kit::registry::settings("x", "ovirt", table.as_object().unwrap().clone())
                .unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
        let e = s.options("x").unwrap_err().to_string();
        assert!(e.contains("sideways") && e.contains("platform x"), "{e}");
    }

    #[test]
    fn restore_placement() {
        let table = serde_json::json!({"endpoint": "http://e/api", "username": "u", "password": "p", "appliance": "a",
            "cluster": "prod", "storage_domain": "fast", "network": "lan"});
        let s: OvirtSettings =
            provider_kit::registry::settings("x", "ovirt", table.as_object().unwrap().clone())
                .unwrap();
        let o = s.options("x").unwrap();
        assert_eq!(
            (
                o.cluster.as_str(),
                o.storage_domain.as_deref(),
                o.network.as_deref()
            ),
            ("prod", Some("fast"), Some("lan"))
        );
    }
}
