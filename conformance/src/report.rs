//! What a run of the kit tells its caller: which checks ran, which were
//! skipped and why, and for a failed check exactly where the provider went
//! wrong.

use std::fmt;
use std::time::Duration;

/// One check of the kit. Each has its own `pub async fn` on
/// [`crate::Kit`]; [`crate::Kit::run_all`] runs them in the order of
/// [`Check::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Check {
    /// The v1 lifecycle rules of `provider_api::testing::check_all`,
    /// driven directly (no engine): lifecycle order, cleanups on failure
    /// paths, bitmap-mode answers, container methods.
    Lifecycle,
    /// What `capabilities()` claims is exercised, what it denies answers
    /// `Unsupported`.
    CapabilityHonesty,
    /// Full → guest writes → incremental → disk grown → backup, then every
    /// snapshot restored to a new guest (and in place where claimed) and
    /// compared byte for byte with what the guest held at backup time.
    RoundTrip,
    /// An incremental writes into the target only the guest's written
    /// ranges (expanded to the tracking granularity), covers all of them,
    /// and uses bitmap mode `Use` for every volume that had a checkpoint.
    IncrementalReads,
    /// Two guests backed up in one job with parallelism 2 (full and
    /// incremental), every snapshot restored and compared.
    MultiGuest,
    /// Every restore runs its cleanups and leaves nothing on the platform.
    RestoreCleanups,
    /// A failure injected at every lifecycle step and in the data copy:
    /// cleanups run, no snapshot is published, nothing is left behind, and
    /// the next backup still holds every change.
    FailureInjection,
    /// Containers ([`crate::ContainerKit`], not in [`Check::ALL`]): the
    /// directory mechanism, full and incremental tree backups restored
    /// through the provider's mechanism and compared entry by entry
    /// (content, type, mode, times, links), refusals that leave nothing.
    Containers,
}

impl Check {
    /// Every check, in the order `run_all` runs them.
    pub const ALL: [Check; 7] = [
        Check::Lifecycle,
        Check::CapabilityHonesty,
        Check::RoundTrip,
        Check::IncrementalReads,
        Check::MultiGuest,
        Check::RestoreCleanups,
        Check::FailureInjection,
    ];

    /// Short name (kebab-case), as printed in reports and failures.
    pub fn name(self) -> &'static str {
        match self {
            Check::Lifecycle => "lifecycle",
            Check::CapabilityHonesty => "capability-honesty",
            Check::RoundTrip => "round-trip",
            Check::IncrementalReads => "incremental-reads",
            Check::MultiGuest => "multi-guest",
            Check::RestoreCleanups => "restore-cleanups",
            Check::FailureInjection => "failure-injection",
            Check::Containers => "containers",
        }
    }

    /// One line on what the check proves.
    pub fn describe(self) -> &'static str {
        match self {
            Check::Lifecycle => {
                "v1 lifecycle rules: call order, cleanups on failure paths, bitmap-mode answers"
            }
            Check::CapabilityHonesty => "claimed abilities work, denied ones answer Unsupported",
            Check::RoundTrip => {
                "full, incremental, grown disk: every snapshot restored and compared byte for byte"
            }
            Check::IncrementalReads => {
                "incrementals store only the guest's written ranges (at tracking granularity), all of them"
            }
            Check::MultiGuest => "two guests in one job with parallelism 2, restored and compared",
            Check::RestoreCleanups => "every restore runs its cleanups and leaves nothing behind",
            Check::Containers => {
                "container trees: full and incremental, restored and compared entry by entry"
            }
            Check::FailureInjection => {
                "failure at every step: cleanups run, nothing published or leaked, no change lost"
            }
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a check ran.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// It ran and passed.
    Passed,
    /// It did not run.
    Skipped {
        /// Why: the caller's reason given to [`crate::Kit::skip`], or the
        /// capability the provider denies.
        reason: String,
    },
}

/// The result of one check that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Which check.
    pub check: Check,
    /// Passed or skipped.
    pub status: Status,
    /// What the check observed beyond pass/fail (bytes an incremental
    /// stored, parts not exercised and why, ...).
    pub notes: Vec<String>,
    /// How long it took.
    pub elapsed: Duration,
}

impl CheckReport {
    pub(crate) fn skipped(check: Check, reason: impl Into<String>) -> Self {
        CheckReport {
            check,
            status: Status::Skipped {
                reason: reason.into(),
            },
            notes: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// True when the check ran (and passed).
    pub fn ran(&self) -> bool {
        self.status == Status::Passed
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.status {
            Status::Passed => write!(
                f,
                "{:<20} passed  ({:.1} s)",
                self.check.name(),
                self.elapsed.as_secs_f64()
            )?,
            Status::Skipped { reason } => write!(f, "{:<20} skipped: {reason}", self.check.name())?,
        }
        for n in &self.notes {
            write!(f, "\n{:<20}   - {n}", "")?;
        }
        Ok(())
    }
}

/// What [`crate::Kit::run_all`] found: one entry per check, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// One entry per check that passed or was skipped.
    pub checks: Vec<CheckReport>,
}

impl Report {
    /// The checks that ran (and passed).
    pub fn ran(&self) -> Vec<Check> {
        self.checks
            .iter()
            .filter(|c| c.ran())
            .map(|c| c.check)
            .collect()
    }

    /// The checks that were skipped, with their reasons.
    pub fn skipped(&self) -> Vec<(Check, &str)> {
        self.checks
            .iter()
            .filter_map(|c| match &c.status {
                Status::Skipped { reason } => Some((c.check, reason.as_str())),
                Status::Passed => None,
            })
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "conformance kit: {} checks passed, {} skipped",
            self.ran().len(),
            self.skipped().len()
        )?;
        for c in &self.checks {
            writeln!(f, "  {c}")?;
        }
        Ok(())
    }
}

/// A check failed: which rule, and where (guest, volume, offset of the
/// first differing byte, what differs).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// The failed check.
    pub check: Check,
    /// The guest concerned (platform id), if one is.
    pub guest: Option<String>,
    /// The volume (device name), if one is.
    pub volume: Option<String>,
    /// The byte offset in the volume (the first differing byte for a
    /// content mismatch), if one applies.
    pub offset: Option<u64>,
    /// What went wrong, in the words of the contract.
    pub message: String,
    /// For [`crate::Kit::run_all`]: the checks that passed or were skipped
    /// before this one failed.
    pub before: Report,
}

impl Failure {
    pub(crate) fn new(check: Check, message: impl Into<String>) -> Self {
        Failure {
            check,
            guest: None,
            volume: None,
            offset: None,
            message: message.into(),
            before: Report::default(),
        }
    }

    pub(crate) fn guest(mut self, guest: impl fmt::Display) -> Self {
        self.guest.get_or_insert_with(|| guest.to_string());
        self
    }

    pub(crate) fn volume(mut self, volume: impl fmt::Display) -> Self {
        self.volume.get_or_insert_with(|| volume.to_string());
        self
    }

    pub(crate) fn offset(mut self, offset: u64) -> Self {
        self.offset.get_or_insert(offset);
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conformance check `{}` failed", self.check.name())?;
        let mut parts = Vec::new();
        if let Some(g) = &self.guest {
            parts.push(format!("guest {g}"));
        }
        if let Some(v) = &self.volume {
            parts.push(format!("volume {v}"));
        }
        if let Some(o) = self.offset {
            parts.push(format!("offset {o}"));
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for Failure {}
