//! The per-guest task log handed to `backup_handle_log_file`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A guest's task log: plain lines with a UTC timestamp, flushed at once so
/// that a crash leaves what happened so far.
#[derive(Debug)]
pub struct GuestLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl GuestLog {
    /// Create (truncate) the log at `path`. A log that cannot be created is
    /// not fatal: lines then go to tracing only.
    pub fn create(path: PathBuf) -> Self {
        let file = std::fs::File::create(&path)
            .map_err(
                |e| tracing::warn!(path = %path.display(), error = %e, "cannot create guest log"),
            )
            .ok();
        GuestLog {
            path,
            file: Mutex::new(file),
        }
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append a line (also emitted as a tracing event).
    pub fn line(&self, text: impl AsRef<str>) {
        let text = text.as_ref();
        tracing::info!("{text}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Ok(mut guard) = self.file.lock()
            && let Some(f) = guard.as_mut()
        {
            let _ = writeln!(f, "{now} {text}");
        }
    }

    /// Append a warning line.
    pub fn warn(&self, text: impl AsRef<str>) {
        self.line(format!("WARN: {}", text.as_ref()));
    }
}
