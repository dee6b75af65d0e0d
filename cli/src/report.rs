//! Printing job outcomes as a table or JSON.

use engine::JobReport;
use provider_api::{BitmapMode, SnapshotInfo, VolumeFormat};

/// One row of the summary table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub guest: String,
    pub platform: String,
    pub mode: String,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub logical: u64,
    pub seconds: f64,
    pub verified: Option<bool>,
    pub error: Option<String>,
}

impl Row {
    pub fn mib_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes_read as f64 / (1 << 20) as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Logical bytes per stored byte (infinite when nothing new was
    /// stored).
    pub fn dedup_ratio(&self) -> f64 {
        if self.bytes_stored > 0 {
            self.logical as f64 / self.bytes_stored as f64
        } else {
            f64::INFINITY
        }
    }

    /// The dedup column: `-` when nothing new was stored (an unchanged
    /// incremental), not "infx".
    fn dedup_cell(&self) -> String {
        if self.bytes_stored > 0 {
            format!("{:.1}x", self.dedup_ratio())
        } else {
            "-".into()
        }
    }
}

pub fn mode_name(modes: impl Iterator<Item = BitmapMode>) -> String {
    let mut any_use = false;
    let mut all_use = true;
    for m in modes {
        any_use |= m == BitmapMode::Use;
        all_use &= m == BitmapMode::Use;
    }
    match (any_use, all_use) {
        (true, true) => "incremental".into(),
        (true, false) => "mixed".into(),
        _ => "full".into(),
    }
}

pub fn rows(report: &JobReport, platform: &str) -> Vec<Row> {
    report
        .guests
        .iter()
        .map(|g| match &g.result {
            Ok(b) => Row {
                guest: g.guest.name.clone().unwrap_or_else(|| g.guest.id.0.clone()),
                platform: platform.to_owned(),
                mode: mode_name(b.volumes.iter().map(|v| v.bitmap_mode)),
                bytes_read: b.volumes.iter().map(|v| v.stats.bytes_read).sum(),
                bytes_stored: b.volumes.iter().map(|v| v.stats.target.bytes_stored).sum(),
                logical: b.volumes.iter().map(|v| v.size).sum(),
                seconds: b.elapsed.as_secs_f64(),
                verified: None,
                error: None,
            },
            Err(e) => Row {
                guest: g.guest.name.clone().unwrap_or_else(|| g.guest.id.0.clone()),
                platform: platform.to_owned(),
                mode: "-".into(),
                bytes_read: 0,
                bytes_stored: 0,
                logical: 0,
                seconds: 0.0,
                verified: Some(false),
                error: Some(e.report()),
            },
        })
        .collect()
}

/// Bytes in binary units (`2.1 GiB`), exact below 1 KiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn print_table(rows: &[Row]) {
    print!("{}", table(rows));
}

/// The job table: a header, one line per guest, errors under their guest.
pub fn table(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    // The guest column is as wide as its longest name (UUIDs included).
    let gw = rows
        .iter()
        .map(|r| r.guest.len())
        .max()
        .unwrap_or(0)
        .max(12);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<gw$} {:<9} {:<12} {:>11} {:>11} {:>7} {:>9} {:>7} {:<8}",
        "guest", "platform", "mode", "read", "stored", "time", "MiB/s", "dedup", "verified"
    );
    for r in rows {
        let verified = match r.verified {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let _ = writeln!(
            out,
            "{:<gw$} {:<9} {:<12} {:>11} {:>11} {:>6.2}s {:>9.0} {:>7} {:<8}",
            r.guest,
            r.platform,
            r.mode,
            human(r.bytes_read),
            human(r.bytes_stored),
            r.seconds,
            r.mib_per_s(),
            r.dedup_cell(),
            verified
        );
        if let Some(e) = &r.error {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    out
}

pub fn print_job(report: &JobReport, platform: &str, json: bool) {
    let rows = rows(report, platform);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
    } else {
        print_table(&rows);
        if let Some(e) = &report.init_error {
            println!("job_init failed: {}", e.report());
        }
        if let Some(e) = &report.cleanup_error {
            println!("job_cleanup failed: {}", e.report());
        }
    }
    // Failures also go to stderr, one line each (whatever stdout carries):
    // the error's report names guest, volume, offset and API call.
    if let Some(e) = &report.init_error {
        eprintln!("error: job_init failed: {}", e.report());
    }
    for g in &report.guests {
        if let Err(e) = &g.result {
            eprintln!(
                "error: guest {}: {}",
                g.guest.id,
                e.report().replace('\n', " ")
            );
        }
    }
    if let Some(e) = &report.cleanup_error {
        eprintln!("error: job_cleanup failed: {}", e.report());
    }
}

/// A backup time (seconds since the epoch) as RFC 3339 in UTC, the form
/// snapshot ids carry.
pub fn time_utc(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} s after the epoch"))
}

/// What a volume's bitmap mode meant for its backup, in words.
pub fn mode_words(mode: BitmapMode) -> &'static str {
    match mode {
        BitmapMode::New => "full (new checkpoint)",
        BitmapMode::Use => "incremental",
        BitmapMode::None => "full",
    }
}

/// A volume format as users write it.
pub fn format_name(format: &VolumeFormat) -> &str {
    match format {
        VolumeFormat::Raw => "raw",
        VolumeFormat::Qcow2 => "qcow2",
        VolumeFormat::Other(s) => s,
        _ => "format unknown to this build",
    }
}

fn verified_word(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "ok",
        Some(false) => "FAILED",
        None => "-",
    }
}

/// `list`: one line per snapshot under a header, columns as wide as their
/// longest cell (ids hold UUIDs).
pub fn print_snapshots(list: &[SnapshotInfo]) {
    let header = [
        "snapshot", "volumes", "size", "mode", "verified", "warnings",
    ];
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|s| {
            [
                s.id.to_string(),
                s.volumes.len().to_string(),
                human(s.volumes.iter().map(|v| v.volume.size).sum()),
                mode_name(s.volumes.iter().map(|v| v.bitmap_mode)),
                verified_word(s.verified).to_owned(),
                s.warnings.len().to_string(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            // Text left, counts and sizes right.
            let right = matches!(i, 1 | 2 | 5);
            if right {
                out.push_str(&format!("{c:>w$}  "));
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_users() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(2202009600), "2.1 GiB");
        assert_eq!(time_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(mode_words(BitmapMode::Use), "incremental");
        assert_eq!(format_name(&VolumeFormat::Qcow2), "qcow2");
        assert_eq!(format_name(&VolumeFormat::Other("vmdk".into())), "vmdk");
    }

    #[test]
    fn the_job_table_fits_long_guest_names_and_shows_no_ratio_when_nothing_was_stored() {
        let row = |guest: &str, stored| Row {
            guest: guest.into(),
            platform: "ovirt".into(),
            mode: "incremental".into(),
            bytes_read: 4 << 20,
            bytes_stored: stored,
            logical: 8 << 20,
            seconds: 1.0,
            verified: None,
            error: None,
        };
        let t = table(&[
            row("6f9619ff-8b86-d011-b42d-00c04fc964ff", 0),
            row("web1", 2 << 20),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        // Every column starts at the same place on every line.
        let platform_at = |l: &str| l.find("ovirt").or(l.find("platform"));
        assert_eq!(platform_at(lines[0]), platform_at(lines[1]), "{t}");
        assert_eq!(platform_at(lines[1]), platform_at(lines[2]), "{t}");
        assert!(!t.contains("inf"), "{t}");
        assert!(lines[1].contains("      - -"), "{t}");
        assert!(lines[2].contains("   4.0x -"), "{t}");
    }
}
