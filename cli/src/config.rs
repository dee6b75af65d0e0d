//! The configuration file and the factory that turns a platform's settings
//! into a provider.
//!
//! ```toml
//! datastore = "/var/lib/vmbackup"
//!
//! [platforms.scp-prod]
//! kind = "scp"
//! endpoint = "https://scp.example.com"
//! username = "backup"
//! password_file = "/etc/vmbackup/scp.password"   # or password = "..."
//! access = "nbdssl"                              # nbd | nbdssl | hotadd
//! tls_ca = "/etc/vmbackup/scp-ca.pem"            # nbdssl: verifies the NBD server
//! # proxy_server_id = "..."                      # hotadd: the backup proxy VM
//! # hotadd_device_root = "/dev/disk/by-id"       # hotadd: where the proxy sees its disks by serial
//! # access_key = "..."; secret_key_file = "..."  # signed requests instead of the password
//! # restore_storage_id = "..."                   # storage for restored VMs and base-image replicas
//!
//! [platforms.engine]
//! kind = "ovirt"
//! endpoint = "https://engine.example.com/ovirt-engine/api"
//! username = "admin@internal"
//! password_file = "/etc/vmbackup/ovirt.password"
//! appliance = "backup-appliance"                 # VM the snapshot disks attach to
//! mode = "auto"                                  # auto | incremental | snapshot-attach
//! tls_ca = "/etc/pki/ovirt-engine/ca.pem"        # the engine's CA (always verified)
//!
//! [platforms.zs]
//! kind = "zstack"
//! endpoint = "http://zstack.example.com:8080/zstack"
//! username = "admin"
//! password_file = "/etc/vmbackup/zstack.password"
//! # backup_storage_uuid = "..."; work_dir = "/var/tmp/vmbackup-zstack"
//! restore_listen = "0.0.0.0:8099"                # restores: ZStack's backup storage fetches from here
//! advertise_url = "http://10.0.0.5:8099"         # ... by this URL (default http://<restore_listen>)
//! ```
//!
//! Passwords are read from the file or the value and never printed: the
//! settings' `Debug` output redacts them, and errors name the platform and
//! the file, not the secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use provider_api::BackupProvider;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Datastore directory (the `-d` flag overrides it).
    pub datastore: Option<PathBuf>,
    /// This backup host's id in job markers (default: `VMBACKUP_HOST_ID`,
    /// else the host name). Distinct for hosts sharing a platform.
    pub host_id: Option<String>,
    /// Where this host keeps its job registry (default:
    /// `VMBACKUP_STATE_DIR`, else `$XDG_STATE_HOME/vmbackup`, else
    /// `~/.local/state/vmbackup`).
    pub state_dir: Option<PathBuf>,
    /// Platforms by name.
    #[serde(default)]
    pub platforms: BTreeMap<String, PlatformConfig>,
}

/// One platform's settings.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum PlatformConfig {
    /// Sangfor Cloud Platform.
    Scp {
        /// Base URL of the janus API.
        endpoint: String,
        /// Account.
        username: String,
        /// Password (prefer `password_file`).
        password: Option<String>,
        /// File holding the password (first line).
        password_file: Option<PathBuf>,
        /// `nbd`, `nbdssl` or `hotadd`.
        #[serde(default)]
        access: Option<String>,
        /// CA of the NBD server's certificate (`nbdssl`).
        tls_ca: Option<PathBuf>,
        /// Backup proxy VM (`hotadd`).
        proxy_server_id: Option<String>,
        /// Where hot-added disks appear on the proxy, by serial (`hotadd`;
        /// the proxy's `/dev/disk/by-id`).
        hotadd_device_root: Option<PathBuf>,
        /// Access key: requests are signed with it and the secret key
        /// instead of logging in with a password.
        access_key: Option<String>,
        /// Secret key of `access_key` (prefer `secret_key_file`).
        secret_key: Option<String>,
        /// File holding the secret key (first line).
        secret_key_file: Option<PathBuf>,
        /// Storage restored VMs and base-image replicas go to (default:
        /// the original VM's).
        restore_storage_id: Option<String>,
    },
    /// oVirt / RHV engine.
    Ovirt {
        /// API root, e.g. `https://engine/ovirt-engine/api`.
        endpoint: String,
        /// Account, e.g. `admin@internal`.
        username: String,
        /// Password (prefer `password_file`).
        password: Option<String>,
        /// File holding the password (first line).
        password_file: Option<PathBuf>,
        /// Name of the backup appliance VM disks are attached to.
        appliance: String,
        /// `auto`, `incremental` or `snapshot-attach`.
        #[serde(default)]
        mode: Option<String>,
        /// CA certificate (PEM) of the engine and its image servers
        /// (default: the system's roots; always verified).
        tls_ca: Option<PathBuf>,
        /// Where attached disks appear on this appliance, by disk id
        /// (default `/dev/disk/by-id`).
        device_root: Option<PathBuf>,
    },
    /// ZStack.
    Zstack {
        /// API root, e.g. `http://zstack:8080/zstack`.
        endpoint: String,
        /// Account name.
        username: String,
        /// Password (prefer `password_file`).
        password: Option<String>,
        /// File holding the password (first line).
        password_file: Option<PathBuf>,
        /// Backup storage for temporary images (default: the first).
        backup_storage_uuid: Option<String>,
        /// Work directory for downloaded exports.
        work_dir: Option<PathBuf>,
        /// Where restores serve their sources over HTTP for ZStack's
        /// backup storage to fetch (default: loopback, any port, which
        /// only a ZStack on this host reaches).
        #[serde(default)]
        restore_listen: Option<std::net::SocketAddr>,
        /// The base URL the backup storage reaches `restore_listen` by
        /// (default `http://<restore_listen>`; used with `restore_listen`).
        #[serde(default)]
        advertise_url: Option<String>,
    },
}

impl PlatformConfig {
    /// Where restores of this platform serve their sources over HTTP:
    /// `(restore_listen, advertise_url)`, when configured.
    pub fn http_restore(&self) -> Option<(std::net::SocketAddr, Option<String>)> {
        match self {
            PlatformConfig::Zstack {
                restore_listen,
                advertise_url,
                ..
            } => restore_listen.map(|l| (l, advertise_url.clone())),
            _ => None,
        }
    }
}

impl std::fmt::Debug for PlatformConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlatformConfig::Scp {
                endpoint,
                username,
                access,
                ..
            } => f
                .debug_struct("Scp")
                .field("endpoint", endpoint)
                .field("username", username)
                .field("access", access)
                .finish_non_exhaustive(),
            PlatformConfig::Ovirt {
                endpoint,
                username,
                appliance,
                mode,
                ..
            } => f
                .debug_struct("Ovirt")
                .field("endpoint", endpoint)
                .field("username", username)
                .field("appliance", appliance)
                .field("mode", mode)
                .finish_non_exhaustive(),
            PlatformConfig::Zstack {
                endpoint, username, ..
            } => f
                .debug_struct("Zstack")
                .field("endpoint", endpoint)
                .field("username", username)
                .finish_non_exhaustive(),
        }
    }
}

impl Config {
    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// The settings of platform `name`.
    pub fn platform(&self, name: &str) -> Result<&PlatformConfig> {
        self.platforms.get(name).with_context(|| {
            let known: Vec<&str> = self.platforms.keys().map(String::as_str).collect();
            format!(
                "no platform {name:?} in the config (known: {})",
                known.join(", ")
            )
        })
    }
}

fn secret(platform: &str, value: &Option<String>, file: &Option<PathBuf>) -> Result<String> {
    match (value, file) {
        (Some(v), None) => Ok(v.clone()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| {
                format!("platform {platform}: reading password file {}", f.display())
            })?;
            Ok(text.lines().next().unwrap_or_default().to_owned())
        }
        (Some(_), Some(_)) => bail!("platform {platform}: set password or password_file, not both"),
        (None, None) => bail!("platform {platform}: password or password_file is required"),
    }
}

/// SCP settings as the provider's options.
fn scp_options(name: &str, config: &PlatformConfig) -> Result<provider_scp::ScpOptions> {
    let PlatformConfig::Scp {
        endpoint,
        username,
        password,
        password_file,
        access,
        tls_ca,
        proxy_server_id,
        hotadd_device_root,
        access_key,
        secret_key,
        secret_key_file,
        restore_storage_id,
    } = config
    else {
        bail!("platform {name} is not an SCP platform");
    };
    // With an access key the password is not used: requests are signed.
    let pw = match access_key {
        Some(_) if password.is_none() && password_file.is_none() => String::new(),
        _ => secret(name, password, password_file)?,
    };
    let mut options = provider_scp::ScpOptions::new(endpoint.clone(), username.clone(), pw);
    options.access = match access.as_deref().unwrap_or("nbd") {
        "nbd" => provider_scp::AccessMode::Nbd,
        "nbdssl" => {
            let ca = tls_ca
                .as_ref()
                .with_context(|| format!("platform {name}: nbdssl needs tls_ca"))?;
            provider_scp::AccessMode::NbdSsl {
                ca_pem: std::fs::read_to_string(ca)
                    .with_context(|| format!("platform {name}: reading {}", ca.display()))?,
                server_name: None,
            }
        }
        "hotadd" => provider_scp::AccessMode::HotAdd {
            proxy_server_id: proxy_server_id
                .clone()
                .with_context(|| format!("platform {name}: hotadd needs proxy_server_id"))?,
        },
        other => bail!("platform {name}: access {other:?} is not nbd, nbdssl or hotadd"),
    };
    options.hotadd_device_root = hotadd_device_root.clone();
    options.restore_storage_id = restore_storage_id.clone();
    if let Some(key) = access_key {
        let secret = match (secret_key, secret_key_file) {
            (None, None) => {
                bail!("platform {name}: access_key needs secret_key or secret_key_file")
            }
            _ => self::secret(name, secret_key, secret_key_file)?,
        };
        options.access_key = Some(key.clone());
        options.secret_key = Some(provider_scp::Secret::new(secret));
    } else if secret_key.is_some() || secret_key_file.is_some() {
        bail!("platform {name}: secret_key without access_key");
    }
    Ok(options)
}

/// The factory: one provider per platform kind.
pub fn provider(name: &str, config: &PlatformConfig) -> Result<Arc<dyn BackupProvider>> {
    match config {
        PlatformConfig::Scp { .. } => Ok(Arc::new(provider_scp::ScpProvider::new(scp_options(
            name, config,
        )?)?)),
        PlatformConfig::Ovirt {
            endpoint,
            username,
            password,
            password_file,
            appliance,
            mode,
            tls_ca,
            device_root,
        } => {
            let pw = secret(name, password, password_file)?;
            let mut options = provider_ovirt::OvirtOptions::new(endpoint, username, &pw, appliance);
            options.tls_ca = tls_ca.clone();
            if let Some(root) = device_root {
                options.device_root = root.clone();
            }
            options.mode = match mode.as_deref().unwrap_or("auto") {
                "auto" => provider_ovirt::BackupMode::Auto,
                "incremental" => provider_ovirt::BackupMode::Incremental,
                "snapshot-attach" => provider_ovirt::BackupMode::SnapshotAttach,
                other => bail!(
                    "platform {name}: mode {other:?} is not auto, incremental or snapshot-attach"
                ),
            };
            Ok(Arc::new(provider_ovirt::OvirtProvider::new(options)?))
        }
        PlatformConfig::Zstack {
            endpoint,
            username,
            password,
            password_file,
            backup_storage_uuid,
            work_dir,
            ..
        } => {
            let pw = secret(name, password, password_file)?;
            let work = work_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join(format!("vmbackup-zstack-{name}")));
            let mut options =
                provider_zstack::ZStackOptions::new(endpoint.clone(), username.clone(), pw, work);
            options.backup_storage_uuid = backup_storage_uuid.clone();
            Ok(Arc::new(provider_zstack::ZStackProvider::new(options)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
datastore = "/var/lib/vmbackup"

[platforms.lab]
kind = "scp"
endpoint = "http://127.0.0.1:1"
username = "backup"
password = "pw-scp"

[platforms.engine]
kind = "ovirt"
endpoint = "http://127.0.0.1:1/ovirt-engine/api"
username = "admin@internal"
password = "pw-ovirt"
appliance = "backup-appliance"
mode = "incremental"

[platforms.zs]
kind = "zstack"
endpoint = "http://127.0.0.1:1/zstack"
username = "admin"
password = "pw-zstack"
"#;

    #[test]
    fn every_platform_kind_builds_its_provider() {
        let config: Config = toml::from_str(SAMPLE).unwrap();
        assert_eq!(
            config.datastore.as_deref(),
            Some(Path::new("/var/lib/vmbackup"))
        );
        for (name, kind) in [("lab", "scp"), ("engine", "ovirt"), ("zs", "zstack")] {
            let p = provider(name, config.platform(name).unwrap()).unwrap();
            assert_eq!(p.provider_name(), kind);
        }
        let debug = format!("{:?}", config.platforms);
        assert!(!debug.contains("pw-"), "{debug}");
    }

    #[test]
    fn bad_settings_are_named() {
        let config: Config = toml::from_str(SAMPLE).unwrap();
        let e = config.platform("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("lab"), "{e}");
        let bad: Config = toml::from_str(
            "[platforms.x]\nkind = \"scp\"\nendpoint = \"http://h\"\nusername = \"u\"\naccess = \"carrier-pigeon\"\npassword = \"p\"\n",
        )
        .unwrap();
        let e = provider("x", bad.platform("x").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("carrier-pigeon"), "{e}");
        let nopw: Config = toml::from_str(
            "[platforms.x]\nkind = \"zstack\"\nendpoint = \"http://h\"\nusername = \"u\"\n",
        )
        .unwrap();
        let e = provider("x", nopw.platform("x").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("password"), "{e}");
        assert!(toml::from_str::<Config>("[platforms.x]\nkind = \"vmware\"\n").is_err());
    }

    #[test]
    fn scp_keys_reach_the_options() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret");
        std::fs::write(&key, "s3cret\n").unwrap();
        let text = format!(
            "[platforms.x]\nkind = \"scp\"\nendpoint = \"http://h\"\nusername = \"u\"\naccess = \"hotadd\"\nproxy_server_id = \"proxy\"\nhotadd_device_root = \"/dev/disk/by-id\"\naccess_key = \"AK\"\nsecret_key_file = \"{}\"\nrestore_storage_id = \"st-2\"\n",
            key.display()
        );
        let c: Config = toml::from_str(&text).unwrap();
        let o = scp_options("x", c.platform("x").unwrap()).unwrap();
        assert_eq!(
            o.hotadd_device_root.as_deref(),
            Some(Path::new("/dev/disk/by-id"))
        );
        assert_eq!(o.access_key.as_deref(), Some("AK"));
        assert_eq!(o.secret_key.as_ref().map(|s| s.expose()), Some("s3cret"));
        assert_eq!(o.restore_storage_id.as_deref(), Some("st-2"));
        assert!(!format!("{o:?}").contains("s3cret"));
        // A secret without its key, and a key without its secret, are named.
        let e = scp_options(
            "x",
            toml::from_str::<Config>("[platforms.x]\nkind = \"scp\"\nendpoint = \"http://h\"\nusername = \"u\"\naccess_key = \"AK\"\n")
                .unwrap()
                .platform("x")
                .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("secret_key"), "{e}");
        let e = scp_options(
            "x",
            toml::from_str::<Config>("[platforms.x]\nkind = \"scp\"\nendpoint = \"http://h\"\nusername = \"u\"\npassword = \"p\"\nsecret_key = \"s\"\n")
                .unwrap()
                .platform("x")
                .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("access_key"), "{e}");
    }
}
