//! Printing job outcomes as a table or JSON.

use engine::JobReport;
use provider_api::BitmapMode;

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

    /// Logical bytes per stored byte.
    pub fn dedup_ratio(&self) -> f64 {
        if self.bytes_stored > 0 {
            self.logical as f64 / self.bytes_stored as f64
        } else {
            f64::INFINITY
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

fn human(bytes: u64) -> String {
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
    println!(
        "{:<12} {:<9} {:<12} {:>11} {:>11} {:>7} {:>9} {:>7} {:<8}",
        "guest", "platform", "mode", "read", "stored", "time", "MiB/s", "dedup", "verified"
    );
    for r in rows {
        let verified = match r.verified {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "{:<12} {:<9} {:<12} {:>11} {:>11} {:>6.2}s {:>9.0} {:>6.1}x {:<8}",
            r.guest,
            r.platform,
            r.mode,
            human(r.bytes_read),
            human(r.bytes_stored),
            r.seconds,
            r.mib_per_s(),
            r.dedup_ratio(),
            verified
        );
        if let Some(e) = &r.error {
            println!("  error: {e}");
        }
    }
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
