//! The plug-in point for emulated platforms.
//!
//! Each platform (SCP in [`crate::scp`]; oVirt and ZStack later as sibling
//! modules) implements [`Platform`]: it contributes a router for its public
//! API, a router for its admin extensions, its entry in the endpoints line,
//! and a listing of its objects for leak checks.

use std::sync::Arc;

use axum::Router;

/// An emulated virtualization platform.
pub trait Platform: Send + Sync + std::fmt::Debug {
    /// Short name, also the key in the endpoints JSON (`"scp"`).
    fn name(&self) -> &'static str;

    /// Router of the platform's public API (paths are absolute, e.g.
    /// `/janus/...`); merged into the mock's HTTP server.
    fn api_router(self: Arc<Self>) -> Router;

    /// Router of the platform's admin extensions, nested under
    /// `/admin/<name>`.
    fn admin_router(self: Arc<Self>) -> Router;

    /// Endpoint description (base URL, credentials) given the HTTP base URL.
    fn endpoint(&self, http_base: &str) -> serde_json::Value;

    /// Every live platform object (for "nothing leaked" assertions).
    fn objects(&self) -> serde_json::Value;

    /// Periodic housekeeping (lease expiry); called about every 100 ms.
    fn tick(&self) {}
}
