//! A registry of platform kinds: how a host program (the `vmbackup` CLI)
//! turns one `[platforms.NAME]` table of its configuration into a provider
//! without knowing the platforms it supports.
//!
//! Each provider crate exports a registration (`provider_scp::register`,
//! ...) that adds its [`PlatformKind`] to a [`Registry`]; the host builds
//! its registry in one place and looks kinds up by the table's `kind`. A
//! vendor adds a platform by registering its kind, not by editing the
//! host's factory.
//!
//! ```
//! use provider_kit::registry::{Platform, PlatformError, PlatformSettings, Registry};
//! # use std::sync::Arc;
//! #[derive(Debug, serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct MySettings {
//!     endpoint: String,
//! }
//! impl PlatformSettings for MySettings {
//!     const KIND: &'static str = "mine";
//!     fn build(self, name: &str) -> Result<Platform, PlatformError> {
//!         Err(PlatformError::new(format!("platform {name}: {} is not reachable", self.endpoint)))
//!     }
//! }
//! let mut registry = Registry::new();
//! registry.register::<MySettings>();
//! let table = serde_json::json!({"kind": "mine", "endpoint": "http://x", "typo": 1});
//! let e = registry.check("p", table.as_object().unwrap()).unwrap_err().to_string();
//! assert!(e.contains("typo") && e.contains("platform p"), "{e}");
//! ```
//!
//! ## The table's type: a JSON object
//!
//! A factory receives the platform's table as a [`serde_json::Map`] (the
//! `kind` key removed), not as a `toml::Table` nor a generic
//! `serde::Deserializer`:
//! - providers deserialize their own settings type from it
//!   (`#[serde(deny_unknown_fields)]`) and already depend on `serde_json`
//!   (their APIs speak JSON), so no provider needs `toml`; only the host
//!   parses its file format and converts the table (`serde_json::to_value`
//!   of a TOML table keeps strings, numbers, booleans, arrays and tables);
//! - a `Deserializer` is generic, so a factory taking one could not be a
//!   plain function pointer stored in a map without type erasure (an extra
//!   dependency such as `erased-serde`); a value can also be checked
//!   ([`Registry::check`]) and then built from the same table;
//! - deserializing from a value carries no file positions, so errors are
//!   prefixed with the platform's name and kind instead
//!   ([`settings`]): `platform lab (kind scp): unknown field "acess", ...`.
//!
//! ## Errors
//!
//! An unknown kind is an error listing the known kinds; registering a kind
//! twice panics ([`Registry::register`], [`Registry::add`]) or is an error
//! ([`Registry::try_add`]): both happen when the host starts. Secrets stay
//! out of `Debug` output and errors ([`Redacted`], [`read_secret`]).

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use provider_api::BackupProvider;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A platform's table: its keys and values, without `kind`.
pub type Table = Map<String, Value>;

/// What a factory builds: the provider and the host-side settings the
/// host needs besides it.
#[derive(Clone)]
#[non_exhaustive]
pub struct Platform {
    /// The provider.
    pub provider: Arc<dyn BackupProvider>,
    /// Where restores serve their sources over HTTP for the platform to
    /// fetch (ZStack's backup storage), when configured.
    pub http_restore: Option<HttpRestore>,
}

impl Platform {
    /// A provider with no host-side settings.
    pub fn new(provider: Arc<dyn BackupProvider>) -> Self {
        Platform {
            provider,
            http_restore: None,
        }
    }

    /// With (or without) an HTTP listener for restores.
    pub fn with_http_restore(mut self, http: Option<HttpRestore>) -> Self {
        self.http_restore = http;
        self
    }
}

impl fmt::Debug for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Platform")
            .field("provider", &self.provider.provider_name())
            .field("http_restore", &self.http_restore)
            .finish()
    }
}

/// Where restores serve their sources over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRestore {
    /// The address the host listens on.
    pub listen: SocketAddr,
    /// The base URL the platform reaches `listen` by (default
    /// `http://<listen>`).
    pub advertise_url: Option<String>,
}

/// A platform's settings type: deserialized from its table (with
/// `#[serde(deny_unknown_fields)]`), then built into a provider.
pub trait PlatformSettings: DeserializeOwned {
    /// The `kind` of the tables these settings come from.
    const KIND: &'static str;

    /// The provider of platform `name` (errors name the platform).
    fn build(self, name: &str) -> Result<Platform, PlatformError>;
}

/// Checks a table of a kind: `(platform name, table)`.
pub type CheckFn = fn(&str, &Table) -> Result<(), PlatformError>;
/// Builds a platform from a table of a kind: `(platform name, table)`.
pub type BuildFn = fn(&str, Table) -> Result<Platform, PlatformError>;

/// One platform kind: its name and its factory.
#[derive(Clone, Copy)]
pub struct PlatformKind {
    kind: &'static str,
    check: CheckFn,
    build: BuildFn,
}

impl PlatformKind {
    /// The kind of a settings type.
    pub fn of<S: PlatformSettings>() -> Self {
        PlatformKind {
            kind: S::KIND,
            check: check_settings::<S>,
            build: build_settings::<S>,
        }
    }

    /// A kind from plain functions: `check` validates a table without
    /// side effects (no files read, nothing connected), `build` makes the
    /// provider.
    pub fn new(kind: &'static str, check: CheckFn, build: BuildFn) -> Self {
        PlatformKind { kind, check, build }
    }

    /// The kind's name, the `kind` of its tables.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

impl fmt::Debug for PlatformKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PlatformKind").field(&self.kind).finish()
    }
}

fn check_settings<S: PlatformSettings>(name: &str, table: &Table) -> Result<(), PlatformError> {
    settings::<S>(name, S::KIND, table.clone()).map(drop)
}

fn build_settings<S: PlatformSettings>(
    name: &str,
    table: Table,
) -> Result<Platform, PlatformError> {
    settings::<S>(name, S::KIND, table)?.build(name)
}

/// Deserialize platform `name`'s settings of `kind` from its table; an
/// error (an unknown or missing key, a wrong type) names the platform and
/// the kind.
pub fn settings<S: DeserializeOwned>(
    name: &str,
    kind: &str,
    table: Table,
) -> Result<S, PlatformError> {
    S::deserialize(Value::Object(table))
        .map_err(|e| PlatformError::new(format!("platform {name} (kind {kind}): {e}")))
}

/// Platform kinds by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, PlatformKind>,
}

impl Registry {
    /// No kinds.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Add a kind; an error if a kind of that name is registered already.
    pub fn try_add(&mut self, kind: PlatformKind) -> Result<&mut Self, PlatformError> {
        if self.kinds.contains_key(kind.kind) {
            return Err(PlatformError::new(format!(
                "platform kind {:?} is registered twice",
                kind.kind
            )));
        }
        self.kinds.insert(kind.kind, kind);
        Ok(self)
    }

    /// Add a kind.
    ///
    /// # Panics
    ///
    /// If a kind of that name is registered already (a program error,
    /// found when the host starts).
    pub fn add(&mut self, kind: PlatformKind) -> &mut Self {
        match self.try_add(kind) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// Add the kind of a settings type.
    ///
    /// # Panics
    ///
    /// As [`Self::add`].
    pub fn register<S: PlatformSettings>(&mut self) -> &mut Self {
        self.add(PlatformKind::of::<S>())
    }

    /// The known kinds, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    /// The kind named `kind`; an error listing the known kinds if none is.
    pub fn get(&self, kind: &str) -> Result<&PlatformKind, PlatformError> {
        self.kinds.get(kind).ok_or_else(|| {
            PlatformError::new(format!(
                "unknown platform kind {kind:?} (known kinds: {})",
                self.known()
            ))
        })
    }

    fn known(&self) -> String {
        self.kinds().collect::<Vec<_>>().join(", ")
    }

    /// The kind of platform `name`'s table and the table without `kind`.
    fn split<'a>(
        &'a self,
        name: &str,
        table: &Table,
    ) -> Result<(&'a PlatformKind, Table), PlatformError> {
        let kind = match table.get("kind") {
            Some(Value::String(kind)) => kind,
            Some(_) => {
                return Err(PlatformError::new(format!(
                    "platform {name}: kind must be a string (known kinds: {})",
                    self.known()
                )));
            }
            None => {
                return Err(PlatformError::new(format!(
                    "platform {name}: kind is required (known kinds: {})",
                    self.known()
                )));
            }
        };
        let kind = self
            .get(kind)
            .map_err(|e| PlatformError::new(format!("platform {name}: {e}")))?;
        let mut rest = table.clone();
        rest.remove("kind");
        Ok((kind, rest))
    }

    /// Check platform `name`'s table (with its `kind`): a known kind and
    /// settings that deserialize. Reads no files, connects nowhere.
    pub fn check(&self, name: &str, table: &Table) -> Result<(), PlatformError> {
        let (kind, rest) = self.split(name, table)?;
        (kind.check)(name, &rest)
    }

    /// Build platform `name` from its table (with its `kind`).
    pub fn build(&self, name: &str, table: &Table) -> Result<Platform, PlatformError> {
        let (kind, rest) = self.split(name, table)?;
        (kind.build)(name, rest)
    }
}

/// An error of the registry or of a factory: a message naming the
/// platform, and the error it comes from, if any (reachable through
/// [`std::error::Error::source`], not repeated in the message).
#[derive(Debug)]
pub struct PlatformError {
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl PlatformError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        PlatformError {
            message: message.into(),
            source: None,
        }
    }

    /// An error with a message and its source.
    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        PlatformError {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for PlatformError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// A secret setting (a password, a secret key): deserialized from a
/// string, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Redacted(String);

impl Redacted {
    /// Wrap a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Redacted(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The secret `key` of platform `platform`, given either as its value
/// (`key = "..."`) or as a file (`<key>_file`, its first line); exactly one
/// of them. Errors name the platform, the keys and the file, never the
/// secret.
pub fn read_secret(
    platform: &str,
    key: &str,
    value: Option<&Redacted>,
    file: Option<&Path>,
) -> Result<String, PlatformError> {
    match (value, file) {
        (Some(v), None) => Ok(v.expose().to_owned()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).map_err(|e| {
                PlatformError::with_source(
                    format!("platform {platform}: reading {key} file {}", f.display()),
                    e,
                )
            })?;
            Ok(text.lines().next().unwrap_or_default().to_owned())
        }
        (Some(_), Some(_)) => Err(PlatformError::new(format!(
            "platform {platform}: set {key} or {key}_file, not both"
        ))),
        (None, None) => Err(PlatformError::new(format!(
            "platform {platform}: {key} or {key}_file is required"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Fake {
        #[allow(dead_code)]
        endpoint: String,
        password: Option<Redacted>,
    }

    impl PlatformSettings for Fake {
        const KIND: &'static str = "fake";
        fn build(self, name: &str) -> Result<Platform, PlatformError> {
            let pw = read_secret(name, "password", self.password.as_ref(), None)?;
            Err(PlatformError::new(format!(
                "built {name} ({} chars)",
                pw.len()
            )))
        }
    }

    fn table(v: Value) -> Table {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn kinds_are_found_checked_and_built() {
        let mut r = Registry::new();
        r.register::<Fake>();
        assert_eq!(r.kinds().collect::<Vec<_>>(), ["fake"]);
        let t = table(serde_json::json!({"kind": "fake", "endpoint": "e", "password": "pw"}));
        r.check("p", &t).unwrap();
        let e = r.build("p", &t).unwrap_err().to_string();
        assert_eq!(e, "built p (2 chars)");
        let e = r
            .check(
                "p",
                &table(serde_json::json!({"kind": "fake", "endpoint": "e", "typo": 1})),
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("platform p (kind fake)") && e.contains("typo"),
            "{e}"
        );
        let e = r
            .check("p", &table(serde_json::json!({"kind": "vmware"})))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vmware") && e.contains("known kinds: fake"),
            "{e}"
        );
        let e = r.check("p", &table(serde_json::json!({}))).unwrap_err();
        assert!(e.to_string().contains("kind is required"), "{e}");
        assert!(r.try_add(PlatformKind::of::<Fake>()).is_err());
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_kind_registered_twice_panics() {
        let mut r = Registry::new();
        r.register::<Fake>().register::<Fake>();
    }

    #[test]
    fn secrets_are_redacted_and_read_from_files() {
        let f: Fake = settings(
            "p",
            "fake",
            table(serde_json::json!({"endpoint": "e", "password": "hunter2"})),
        )
        .unwrap();
        assert!(!format!("{f:?}").contains("hunter2"));
        let e = read_secret("p", "password", None, None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "platform p: password or password_file is required");
        let e = read_secret("p", "password", f.password.as_ref(), Some(Path::new("/x")))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "platform p: set password or password_file, not both");
        let e =
            read_secret("p", "secret_key", None, Some(Path::new("/nonexistent/s"))).unwrap_err();
        assert!(
            e.to_string()
                .contains("reading secret_key file /nonexistent/s"),
            "{e}"
        );
        assert!(e.source().is_some());
    }
}
