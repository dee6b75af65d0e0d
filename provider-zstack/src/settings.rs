//! The platform's configuration table (`kind = "zstack"`) and its
//! registration in a [`Registry`].
//!
//! ```toml
//! [platforms.zs]
//! kind = "zstack"
//! endpoint = "http://zstack.example.com:8080/zstack"
//! username = "admin"
//! password_file = "/etc/vmbackup/zstack.password"  # or password = "..."
//! # backup_storage_uuid = "..."; work_dir = "/var/tmp/vmbackup-zstack"
//! # api_ca = "/etc/vmbackup/zstack-ca.pem"        # a private CA of an HTTPS endpoint
//! # l3_network_uuids = ["..."]                  # restored VMs' networks, the first the default
//! #                                             # (required for other platforms' snapshots)
//! # instance_offering_uuid = "..."              # restored VMs' offering (default: the backed-up one)
//! restore_listen = "0.0.0.0:8099"                # restores: ZStack's backup storage fetches from here
//! advertise_url = "http://10.0.0.5:8099"         # ... by this URL (default http://<restore_listen>)
//! ```
//!
//! `restore_listen` and `advertise_url` are the host's, not the
//! provider's: they come back as [`Platform::http_restore`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use provider_kit::registry::{
    HttpRestore, Platform, PlatformError, PlatformSettings, Redacted, Registry, read_secret,
};
use serde::Deserialize;

use crate::{ZStackOptions, ZStackProvider};

/// One ZStack platform's table (the password redacted in `Debug`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZStackSettings {
    /// API root, e.g. `http://zstack:8080/zstack`.
    pub endpoint: String,
    /// Account name.
    pub username: String,
    /// Password (prefer `password_file`).
    pub password: Option<Redacted>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// Backup storage for temporary images (default: the first).
    pub backup_storage_uuid: Option<String>,
    /// Work directory (default: `vmbackup-zstack-<platform name>` in the
    /// temporary directory).
    pub work_dir: Option<PathBuf>,
    /// Where restores serve their sources over HTTP for ZStack's backup
    /// storage to fetch (default: loopback, any port, which only a ZStack
    /// on this host reaches).
    pub restore_listen: Option<SocketAddr>,
    /// The base URL the backup storage reaches `restore_listen` by
    /// (default `http://<restore_listen>`; used with `restore_listen`).
    pub advertise_url: Option<String>,
    /// CA of the API's HTTPS certificate, when it is not a public one.
    pub api_ca: Option<PathBuf>,
    /// L3 networks of restored VMs, the first the default (default: the
    /// backed-up VM's; required for snapshots of other platforms).
    #[serde(default)]
    pub l3_network_uuids: Vec<String>,
    /// Instance offering of restored VMs (default: the backed-up VM's, or
    /// its CPUs and memory).
    pub instance_offering_uuid: Option<String>,
}

impl ZStackSettings {
    /// The provider's options for platform `name` (reads the password
    /// file).
    pub fn options(&self, name: &str) -> Result<ZStackOptions, PlatformError> {
        let pw = read_secret(
            name,
            "password",
            self.password.as_ref(),
            self.password_file.as_deref(),
        )?;
        let work = self
            .work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("vmbackup-zstack-{name}")));
        let mut options =
            ZStackOptions::new(self.endpoint.clone(), self.username.clone(), pw, work);
        options.backup_storage_uuid = self.backup_storage_uuid.clone();
        options.api_ca = self.api_ca.clone();
        options.l3_network_uuids = self.l3_network_uuids.clone();
        options.instance_offering_uuid = self.instance_offering_uuid.clone();
        Ok(options)
    }

    /// Where restores serve their sources over HTTP, when configured.
    pub fn http_restore(&self) -> Option<HttpRestore> {
        self.restore_listen.map(|listen| HttpRestore {
            listen,
            advertise_url: self.advertise_url.clone(),
        })
    }
}

impl PlatformSettings for ZStackSettings {
    const KIND: &'static str = "zstack";

    fn build(self, name: &str) -> Result<Platform, PlatformError> {
        let provider = ZStackProvider::new(self.options(name)?)
            .map_err(|e| PlatformError::with_source(format!("platform {name}"), e))?;
        Ok(Platform::new(Arc::new(provider)).with_http_restore(self.http_restore()))
    }
}

/// Add the `zstack` platform kind to `registry`.
///
/// # Panics
///
/// If `registry` has a `zstack` kind already.
pub fn register(registry: &mut Registry) {
    registry.register::<ZStackSettings>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_listen_and_work_dir() {
        let table = serde_json::json!({"endpoint": "http://z", "username": "u", "password": "s3cret", "restore_listen": "0.0.0.0:8099"});
        let s: ZStackSettings =
            provider_kit::registry::settings("zs", "zstack", table.as_object().unwrap().clone())
                .unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(
            s.http_restore(),
            Some(HttpRestore {
                listen: "0.0.0.0:8099".parse().unwrap(),
                advertise_url: None
            })
        );
        let o = s.options("zs").unwrap();
        assert_eq!(o.work_dir, std::env::temp_dir().join("vmbackup-zstack-zs"));
        assert!(o.l3_network_uuids.is_empty());
    }

    #[test]
    fn restore_networks_and_offering() {
        let table = serde_json::json!({"endpoint": "http://z", "username": "u", "password": "p",
            "l3_network_uuids": ["l3-a", "l3-b"], "instance_offering_uuid": "io"});
        let s: ZStackSettings =
            provider_kit::registry::settings("zs", "zstack", table.as_object().unwrap().clone())
                .unwrap();
        let o = s.options("zs").unwrap();
        assert_eq!(o.l3_network_uuids, ["l3-a", "l3-b"]);
        assert_eq!(o.instance_offering_uuid.as_deref(), Some("io"));
    }

    #[test]
    fn the_api_ca_reaches_the_client_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let table = serde_json::json!({"endpoint": "https://z", "username": "u", "password": "p",
            "work_dir": dir.path(), "api_ca": dir.path().join("zs-ca.pem")});
        let s: ZStackSettings =
            provider_kit::registry::settings("zs", "zstack", table.as_object().unwrap().clone())
                .unwrap();
        let e = s.build("zs").err().unwrap();
        let text = format!("{e}: {:?}", std::error::Error::source(&e));
        assert!(
            text.contains("zs-ca.pem") && text.contains("ZStack CA"),
            "{text}"
        );
    }
}
