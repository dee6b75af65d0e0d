//! The configuration file and the registry of platform kinds that turns a
//! platform's table into a provider.
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
//! Each `[platforms.NAME]` table is kept as written; its `kind` selects a
//! [`PlatformKind`](provider_kit::registry::PlatformKind) of [`registry`],
//! whose provider crate owns the table's other keys (its settings type,
//! e.g. [`provider_scp::ScpSettings`], rejects unknown keys). Adding a
//! platform is one registration in [`registry`], no change here.
//! [`Config::load`] checks every table (a known kind, valid keys) without
//! reading secrets; [`provider`] builds one.
//!
//! Passwords are read from the file or the value and never printed: the
//! tables' and the settings' `Debug` output redacts them, and errors name
//! the platform and the file, not the secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use provider_kit::registry::{Platform, Registry, Table};
use serde::Deserialize;

/// The platform kinds this program knows: the one place they are listed.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    provider_scp::register(&mut registry);
    provider_ovirt::register(&mut registry);
    provider_zstack::register(&mut registry);
    provider_template::register(&mut registry);
    registry
}

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
    pub platforms: BTreeMap<String, PlatformTable>,
}

/// One platform's table as written: `kind` and the kind's own keys.
/// `Debug` shows the kind and the keys, never the values.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct PlatformTable(pub toml::Table);

impl PlatformTable {
    /// The table as the registry takes it.
    pub fn to_table(&self) -> Result<Table> {
        match serde_json::to_value(&self.0)? {
            serde_json::Value::Object(table) => Ok(table),
            _ => unreachable!("a TOML table converts to a JSON object"),
        }
    }
}

impl std::fmt::Debug for PlatformTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self
            .0
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "kind")
            .collect();
        f.debug_struct("PlatformTable")
            .field("kind", &self.0.get("kind").and_then(|k| k.as_str()))
            .field("keys", &keys)
            .finish()
    }
}

impl Config {
    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Config::parse(&text, &registry())
            .with_context(|| format!("parsing config {}", path.display()))
    }

    /// Parse a file's text and check every platform's table against
    /// `registry` (a known kind, keys its settings know, values of the
    /// right types); no secret is read.
    pub fn parse(text: &str, registry: &Registry) -> Result<Config> {
        let config: Config = toml::from_str(text)?;
        for (name, table) in &config.platforms {
            registry.check(name, &table.to_table()?)?;
        }
        Ok(config)
    }

    /// The settings of platform `name`.
    pub fn platform(&self, name: &str) -> Result<&PlatformTable> {
        self.platforms.get(name).with_context(|| {
            let known: Vec<&str> = self.platforms.keys().map(String::as_str).collect();
            format!(
                "no platform {name:?} in the config (known: {})",
                known.join(", ")
            )
        })
    }
}

/// The factory: platform `name`'s provider (and host-side settings), by
/// its kind in [`registry`].
pub fn provider(name: &str, table: &PlatformTable) -> Result<Platform> {
    Ok(registry().build(name, &table.to_table()?)?)
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
restore_listen = "127.0.0.1:8099"
"#;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, &registry())
    }

    /// SCP settings as the provider's options.
    fn scp_options(name: &str, table: &PlatformTable) -> Result<provider_scp::ScpOptions> {
        let mut table = table.to_table()?;
        table.remove("kind");
        let settings: provider_scp::ScpSettings =
            provider_kit::registry::settings(name, "scp", table)?;
        Ok(settings.options(name)?)
    }

    #[test]
    fn every_platform_kind_builds_its_provider() {
        let config = parse(SAMPLE).unwrap();
        assert_eq!(
            config.datastore.as_deref(),
            Some(Path::new("/var/lib/vmbackup"))
        );
        for (name, kind) in [("lab", "scp"), ("engine", "ovirt"), ("zs", "zstack")] {
            let p = provider(name, config.platform(name).unwrap()).unwrap();
            assert_eq!(p.provider.provider_name(), kind);
            // Only ZStack restores serve their sources over HTTP.
            assert_eq!(p.http_restore.is_some(), kind == "zstack", "{kind}");
        }
        let zs = provider("zs", config.platform("zs").unwrap()).unwrap();
        let http = zs.http_restore.unwrap();
        assert_eq!(http.listen, "127.0.0.1:8099".parse().unwrap());
        assert_eq!(http.advertise_url, None);
        let debug = format!("{:?}", config.platforms);
        assert!(!debug.contains("pw-"), "{debug}");
    }

    #[test]
    fn bad_settings_are_named() {
        let config = parse(SAMPLE).unwrap();
        let e = config.platform("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("lab"), "{e}");
        let bad = parse(
            "[platforms.x]\nkind = \"scp\"\nendpoint = \"http://h\"\nusername = \"u\"\naccess = \"carrier-pigeon\"\npassword = \"p\"\n",
        )
        .unwrap();
        let e = provider("x", bad.platform("x").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("carrier-pigeon"), "{e}");
        let nopw =
            parse("[platforms.x]\nkind = \"zstack\"\nendpoint = \"http://h\"\nusername = \"u\"\n")
                .unwrap();
        let e = provider("x", nopw.platform("x").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("password"), "{e}");
        assert!(parse("[platforms.x]\nkind = \"vmware\"\n").is_err());
    }

    #[test]
    fn an_unknown_key_names_the_key_and_the_platform() {
        for (kind, extra) in [
            ("scp", ""),
            ("ovirt", "appliance = \"a\"\n"),
            ("zstack", ""),
        ] {
            let text = format!(
                "[platforms.prod-{kind}]\nkind = \"{kind}\"\nendpoint = \"http://h\"\nusername = \"u\"\npassword = \"p\"\n{extra}pasword_file = \"/x\"\n"
            );
            let e = format!("{:#}", parse(&text).unwrap_err());
            assert!(
                e.contains("pasword_file") && e.contains(&format!("platform prod-{kind}")),
                "{e}"
            );
        }
    }

    #[test]
    fn an_unknown_kind_lists_the_known_kinds() {
        let e = format!(
            "{:#}",
            parse("[platforms.x]\nkind = \"vmware\"\n").unwrap_err()
        );
        assert!(
            e.contains("platform x")
                && e.contains("\"vmware\"")
                && e.contains("ovirt, qcow2dir, scp, zstack"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            parse("[platforms.x]\nendpoint = \"h\"\n").unwrap_err()
        );
        assert!(e.contains("kind is required"), "{e}");
    }

    /// A vendor's platform: its crate registers a kind; the CLI's factory
    /// is not edited.
    mod vendor {
        use std::path::PathBuf;
        use std::sync::Arc;

        use provider_kit::registry::{Platform, PlatformError, PlatformSettings, Registry};
        use serde::Deserialize;

        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct FakeSettings {
            restore_dir: PathBuf,
        }

        impl PlatformSettings for FakeSettings {
            const KIND: &'static str = "fake";
            fn build(self, _name: &str) -> Result<Platform, PlatformError> {
                Ok(Platform::new(Arc::new(provider_nbd::NbdProvider::new(
                    [],
                    self.restore_dir,
                ))))
            }
        }

        pub fn register(registry: &mut Registry) {
            registry.register::<FakeSettings>();
        }
    }

    #[test]
    fn a_kind_registered_outside_the_list_is_found_and_built() {
        let mut registry = registry();
        vendor::register(&mut registry);
        let text = format!("{SAMPLE}\n[platforms.v]\nkind = \"fake\"\nrestore_dir = \"/tmp\"\n");
        assert!(parse(&text).is_err(), "the CLI's own list has no fake kind");
        let config = Config::parse(&text, &registry).unwrap();
        let p = registry
            .build("v", &config.platform("v").unwrap().to_table().unwrap())
            .unwrap();
        assert_eq!(p.provider.provider_name(), "nbd");
        let e = Config::parse(
            "[platforms.v]\nkind = \"fake\"\nrestore_dir = \"/tmp\"\nzone = 1\n",
            &registry,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("zone"), "{e:#}");
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_kind_registered_twice_panics_at_startup() {
        let mut registry = registry();
        provider_scp::register(&mut registry);
    }

    #[test]
    fn the_qcow2dir_kind_is_known() {
        let config = parse("[platforms.d]\nkind = \"qcow2dir\"\nroot = \"/srv/guests\"\n").unwrap();
        let p = provider("d", config.platform("d").unwrap()).unwrap();
        assert_eq!(p.provider.provider_name(), "qcow2dir");
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
        let c = parse(&text).unwrap();
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
            parse("[platforms.x]\nkind = \"scp\"\nendpoint = \"http://h\"\nusername = \"u\"\naccess_key = \"AK\"\n")
                .unwrap()
                .platform("x")
                .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("secret_key"), "{e}");
        let e = scp_options(
            "x",
            parse("[platforms.x]\nkind = \"scp\"\nendpoint = \"http://h\"\nusername = \"u\"\npassword = \"p\"\nsecret_key = \"s\"\n")
                .unwrap()
                .platform("x")
                .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("access_key"), "{e}");
    }
}
