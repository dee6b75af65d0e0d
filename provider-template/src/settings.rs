//! The platform's configuration table (`kind = "qcow2dir"`) and its
//! registration in a [`Registry`]:
//!
//! ```toml
//! [platforms.lab-dir]
//! kind = "qcow2dir"
//! root = "/srv/guests"    # one subdirectory per guest (see the crate docs)
//! ```

use std::path::PathBuf;

use provider_kit::registry::{Platform, PlatformError, PlatformSettings, Registry};
use serde::Deserialize;

/// One guest directory's table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSettings {
    /// The directory holding one subdirectory per guest.
    pub root: PathBuf,
}

impl PlatformSettings for TemplateSettings {
    const KIND: &'static str = crate::KIND;

    fn build(self, name: &str) -> Result<Platform, PlatformError> {
        let provider = crate::TemplateProvider::new(self.root);
        let provider =
            provider.map_err(|e| PlatformError::with_source(format!("platform {name}"), e))?;
        Ok(Platform::new(std::sync::Arc::new(provider)))
    }
}

/// Add the `qcow2dir` platform kind to `registry`.
///
/// # Panics
///
/// If `registry` has a `qcow2dir` kind already.
pub fn register(registry: &mut Registry) {
    registry.register::<TemplateSettings>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_required_and_unknown_keys_are_named() {
        let mut registry = Registry::new();
        register(&mut registry);
        let table = |v: serde_json::Value| v.as_object().unwrap().clone();
        let e = registry.check(
            "d",
            &table(serde_json::json!({"kind": "qcow2dir", "rot": "/x"})),
        );
        let e = e.unwrap_err().to_string();
        assert!(e.contains("rot") && e.contains("platform d"), "{e}");
        let e = registry.check("d", &table(serde_json::json!({"kind": "qcow2dir"})));
        assert!(e.unwrap_err().to_string().contains("root"));
        let p = registry.build(
            "d",
            &table(serde_json::json!({"kind": "qcow2dir", "root": "/x"})),
        );
        assert_eq!(p.unwrap().provider.provider_name(), "qcow2dir");
    }
}
