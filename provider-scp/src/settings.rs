//! The platform's configuration table (`kind = "scp"`) and its
//! registration in a [`Registry`].
//!
//! ```toml
//! [platforms.scp-prod]
//! kind = "scp"
//! endpoint = "https://scp.example.com"
//! username = "backup"
//! password_file = "/etc/vmbackup/scp.password"   # or password = "..."
//! access = "nbdssl"                              # nbd | nbdssl | hotadd
//! tls_ca = "/etc/vmbackup/scp-ca.pem"            # nbdssl: verifies the NBD server
//! # api_ca = "/etc/vmbackup/scp-api-ca.pem"      # a private CA of the HTTPS API
//! # proxy_server_id = "..."                      # hotadd: the backup proxy VM
//! # hotadd_device_root = "/dev/disk/by-id"       # hotadd: where the proxy sees its disks by serial
//! # access_key = "..."; secret_key_file = "..."  # signed requests instead of the password
//! # restore_storage_id = "..."                   # storage for restored VMs and base-image replicas
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use provider_kit::registry::{
    Platform, PlatformError, PlatformSettings, Redacted, Registry, read_secret,
};
use serde::Deserialize;

use crate::{AccessMode, ScpOptions, ScpProvider, Secret};

/// One SCP platform's table (secrets redacted in `Debug`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScpSettings {
    /// Base URL of the janus API.
    pub endpoint: String,
    /// Account.
    pub username: String,
    /// Password (prefer `password_file`).
    pub password: Option<Redacted>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// `nbd` (default), `nbdssl` or `hotadd`.
    pub access: Option<String>,
    /// CA of the NBD server's certificate (`nbdssl`).
    pub tls_ca: Option<PathBuf>,
    /// CA of the API's HTTPS certificate, when it is not a public one.
    pub api_ca: Option<PathBuf>,
    /// Backup proxy VM (`hotadd`).
    pub proxy_server_id: Option<String>,
    /// Where hot-added disks appear on the proxy, by serial (`hotadd`;
    /// the proxy's `/dev/disk/by-id`).
    pub hotadd_device_root: Option<PathBuf>,
    /// Access key: requests are signed with it and the secret key
    /// instead of logging in with a password.
    pub access_key: Option<String>,
    /// Secret key of `access_key` (prefer `secret_key_file`).
    pub secret_key: Option<Redacted>,
    /// File holding the secret key (first line).
    pub secret_key_file: Option<PathBuf>,
    /// Storage restored VMs and base-image replicas go to (default: the
    /// original VM's).
    pub restore_storage_id: Option<String>,
}

impl ScpSettings {
    /// The provider's options for platform `name` (reads the secret files
    /// and the CA).
    pub fn options(&self, name: &str) -> Result<ScpOptions, PlatformError> {
        // With an access key the password is not used: requests are signed.
        let pw = match &self.access_key {
            Some(_) if self.password.is_none() && self.password_file.is_none() => String::new(),
            _ => read_secret(
                name,
                "password",
                self.password.as_ref(),
                self.password_file.as_deref(),
            )?,
        };
        let mut options = ScpOptions::new(self.endpoint.clone(), self.username.clone(), pw);
        options.access = match self.access.as_deref().unwrap_or("nbd") {
            "nbd" => AccessMode::Nbd,
            "nbdssl" => {
                let ca = self.tls_ca.as_ref().ok_or_else(|| {
                    PlatformError::new(format!("platform {name}: nbdssl needs tls_ca"))
                })?;
                AccessMode::NbdSsl {
                    ca_pem: std::fs::read_to_string(ca).map_err(|e| {
                        PlatformError::with_source(
                            format!("platform {name}: reading {}", ca.display()),
                            e,
                        )
                    })?,
                    server_name: None,
                }
            }
            "hotadd" => AccessMode::HotAdd {
                proxy_server_id: self.proxy_server_id.clone().ok_or_else(|| {
                    PlatformError::new(format!("platform {name}: hotadd needs proxy_server_id"))
                })?,
            },
            other => {
                return Err(PlatformError::new(format!(
                    "platform {name}: access {other:?} is not nbd, nbdssl or hotadd"
                )));
            }
        };
        options.hotadd_device_root = self.hotadd_device_root.clone();
        options.api_ca = self.api_ca.clone();
        options.restore_storage_id = self.restore_storage_id.clone();
        if let Some(key) = &self.access_key {
            if self.secret_key.is_none() && self.secret_key_file.is_none() {
                return Err(PlatformError::new(format!(
                    "platform {name}: access_key needs secret_key or secret_key_file"
                )));
            }
            let secret = read_secret(
                name,
                "secret_key",
                self.secret_key.as_ref(),
                self.secret_key_file.as_deref(),
            )?;
            options.access_key = Some(key.clone());
            options.secret_key = Some(Secret::new(secret));
        } else if self.secret_key.is_some() || self.secret_key_file.is_some() {
            return Err(PlatformError::new(format!(
                "platform {name}: secret_key without access_key"
            )));
        }
        Ok(options)
    }
}

impl PlatformSettings for ScpSettings {
    const KIND: &'static str = "scp";

    fn build(self, name: &str) -> Result<Platform, PlatformError> {
        let provider = ScpProvider::new(self.options(name)?)
            .map_err(|e| PlatformError::with_source(format!("platform {name}"), e))?;
        Ok(Platform::new(Arc::new(provider)))
    }
}

/// Add the `scp` platform kind to `registry`.
///
/// # Panics
///
/// If `registry` has an `scp` kind already.
pub fn register(registry: &mut Registry) {
    registry.register::<ScpSettings>();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<ScpSettings, PlatformError> {
        provider_kit::registry::settings("x", "scp", v.as_object().unwrap().clone())
    }

    #[test]
    fn unknown_keys_and_bad_access_are_named() {
        let e = parse(serde_json::json!({"endpoint": "http://h", "username": "u", "acess": "nbd"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("acess") && e.contains("platform x"), "{e}");
        let s = parse(serde_json::json!({"endpoint": "http://h", "username": "u", "password": "hunter2", "access": "nbdssl"}))
            .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        let e = s.options("x").unwrap_err().to_string();
        assert_eq!(e, "platform x: nbdssl needs tls_ca");
    }

    #[test]
    fn the_api_ca_reaches_the_client_and_a_missing_one_is_named() {
        let s = parse(
            serde_json::json!({"endpoint": "https://h", "username": "u", "password": "p",
            "api_ca": "/nonexistent/scp-api-ca.pem"}),
        )
        .unwrap();
        let e = s.build("x").err().unwrap();
        let text = format!("{e}: {:?}", std::error::Error::source(&e));
        assert!(
            text.contains("scp-api-ca.pem") && text.contains("SCP CA"),
            "{text}"
        );
    }
}
