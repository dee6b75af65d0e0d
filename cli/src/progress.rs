//! Copy progress: bars on a terminal, plain log lines otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use engine::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of every volume of a job.
pub enum Reporter {
    /// One bar per volume (stderr is a terminal).
    Bars {
        multi: MultiProgress,
        bars: Mutex<HashMap<String, ProgressBar>>,
    },
    /// A line per volume every few seconds and at the end.
    Lines {
        last: Mutex<HashMap<String, Instant>>,
    },
    /// Nothing (JSON output).
    Quiet,
}

impl Reporter {
    /// Bars when stderr is a terminal, lines otherwise, nothing with `quiet`.
    pub fn new(quiet: bool) -> Self {
        if quiet {
            Reporter::Quiet
        } else if std::io::stderr().is_terminal() {
            Reporter::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                bars: Mutex::default(),
            }
        } else {
            Reporter::Lines {
                last: Mutex::default(),
            }
        }
    }
}

impl Progress for Reporter {
    fn update(&self, device: &str, done: u64, total: u64) {
        match self {
            Reporter::Quiet => {}
            Reporter::Bars { multi, bars } => {
                let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
                let bar = bars.entry(device.to_owned()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(total));
                    if let Ok(style) = ProgressStyle::with_template(
                        "{prefix:>20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b.set_prefix(device.to_owned());
                    b
                });
                bar.set_position(done);
                if done >= total {
                    bar.finish();
                }
            }
            Reporter::Lines { last } => {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let due = last
                    .get(device)
                    .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(5));
                if due || done >= total {
                    last.insert(device.to_owned(), now);
                    let pct = (done * 100).checked_div(total).unwrap_or(100);
                    eprintln!("{device}: {pct}% ({done} of {total} bytes)");
                }
            }
        }
    }
}
