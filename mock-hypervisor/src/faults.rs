//! Fault injection: HTTP errors and latency on named calls, NBD read errors
//! and disconnects after a number of bytes.
//!
//! Faults are armed through the admin API and consumed by the HTTP front
//! ends (middleware) and by [`crate::exports`].

use std::sync::Mutex;
use std::time::Duration;

use crate::disk::lock;

use serde::{Deserialize, Serialize};

/// An HTTP fault: matches a call by method and path, then delays it and/or
/// answers it with an error instead of running it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpFault {
    /// HTTP method to match (any when absent), e.g. `"POST"`.
    #[serde(default)]
    pub method: Option<String>,
    /// Substring of the request path or of the route template
    /// (e.g. `"/snapshots"` or `"/servers/{server_id}/cbt/changed-areas"`).
    pub path: String,
    /// HTTP status to answer with; absent means "only add latency".
    #[serde(default)]
    pub status: Option<u16>,
    /// Platform error code put in the envelope (default 500).
    #[serde(default)]
    pub code: Option<i64>,
    /// Error message (default "injected fault").
    #[serde(default)]
    pub message: Option<String>,
    /// Delay before answering, in milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
    /// How many calls it fires for (unlimited when absent).
    #[serde(default)]
    pub times: Option<u32>,
}

/// What an NBD fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NbdFaultKind {
    /// Reads fail with an I/O error.
    ReadError,
    /// The export stops serving (connection dropped) once reached.
    Disconnect,
}

/// An NBD fault on exports whose name contains `export`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NbdFault {
    /// Substring of the export name (`""` matches every export).
    #[serde(default)]
    pub export: String,
    /// Effect.
    pub kind: NbdFaultKind,
    /// Fires once the export has served this many bytes.
    #[serde(default)]
    pub after_bytes: u64,
    /// How many reads it fires for (unlimited when absent).
    #[serde(default)]
    pub times: Option<u32>,
}

/// Decision for one HTTP call.
#[derive(Debug, Clone, Default)]
pub struct HttpDecision {
    /// Delay to apply first.
    pub latency: Duration,
    /// Error to answer with: (status, code, message).
    pub error: Option<(u16, i64, String)>,
}

/// Armed faults.
#[derive(Debug, Default)]
pub struct FaultRegistry {
    http: Mutex<Vec<HttpFault>>,
    nbd: Mutex<Vec<NbdFault>>,
}

impl FaultRegistry {
    /// Arms an HTTP fault.
    pub fn add_http(&self, fault: HttpFault) {
        lock(&self.http).push(fault);
    }

    /// Arms an NBD fault.
    pub fn add_nbd(&self, fault: NbdFault) {
        lock(&self.nbd).push(fault);
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        lock(&self.http).clear();
        lock(&self.nbd).clear();
    }

    /// Armed faults, for the admin API.
    pub fn list(&self) -> (Vec<HttpFault>, Vec<NbdFault>) {
        (lock(&self.http).clone(), lock(&self.nbd).clone())
    }

    /// Consumes the first HTTP fault matching a call.
    pub fn http_call(&self, method: &str, path: &str, template: &str) -> HttpDecision {
        let mut faults = lock(&self.http);
        let hit = faults.iter().position(|f| {
            f.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && (path.contains(&f.path) || template.contains(&f.path))
        });
        let Some(i) = hit else {
            return HttpDecision::default();
        };
        let f = faults[i].clone();
        consume(&mut faults, i, |f| &mut f.times);
        HttpDecision {
            latency: Duration::from_millis(f.latency_ms),
            error: f.status.map(|s| {
                (
                    s,
                    f.code.unwrap_or(500),
                    f.message.unwrap_or_else(|| "injected fault".into()),
                )
            }),
        }
    }

    /// Consumes the first NBD fault that fires for a read on `export` which
    /// has served `served` bytes so far.
    pub fn nbd_read(&self, export: &str, served: u64) -> Option<NbdFaultKind> {
        let mut faults = lock(&self.nbd);
        let i = faults
            .iter()
            .position(|f| export.contains(&f.export) && served >= f.after_bytes)?;
        let kind = faults[i].kind;
        consume(&mut faults, i, |f| &mut f.times);
        Some(kind)
    }
}

fn consume<T>(faults: &mut Vec<T>, i: usize, times: impl Fn(&mut T) -> &mut Option<u32>) {
    if let Some(t) = times(&mut faults[i]) {
        *t = t.saturating_sub(1);
        if *t == 0 {
            faults.remove(i);
        }
    }
}
