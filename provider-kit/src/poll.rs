//! Waiting for a platform's asynchronous task or job: poll until it is
//! done, fails, or runs out of time.
//!
//! Every REST platform here answers long operations with a handle (an SCP
//! task id, a ZStack API job location, an oVirt entity whose status
//! changes) that the caller polls. [`until`] is that loop once: the caller's
//! `step` looks once and says [`Poll::Done`], [`Poll::Pending`] (with what
//! it saw, for the timeout's message) or fails; between looks it sleeps
//! [`PollPolicy::interval`], growing by [`PollPolicy::backoff`] up to
//! [`PollPolicy::max_interval`]; after [`PollPolicy::timeout`] the caller's
//! `timed_out` builds the error from the last thing seen. Retrying a
//! failed look (a dropped connection) is the step's business (see
//! [`crate::retry`](mod@crate::retry)); a failed look ends the wait.

use std::future::Future;
use std::time::{Duration, Instant};

use provider_api::{Error, Result};

/// What one look at the operation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll<T, S = ()> {
    /// Finished, with its result.
    Done(T),
    /// Still running; `S` is what the look saw (a status, a progress).
    Pending(S),
}

/// How often and how long to look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PollPolicy {
    /// Sleep between the first looks.
    pub interval: Duration,
    /// The sleep is multiplied by this after each look (1.0: constant).
    pub backoff: f64,
    /// The sleep grows no longer than this.
    pub max_interval: Duration,
    /// Give up after this long (measured from the call).
    pub timeout: Duration,
}

impl PollPolicy {
    /// Looks every `interval` for at most `timeout`, no backoff.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        PollPolicy {
            interval,
            backoff: 1.0,
            max_interval: interval,
            timeout,
        }
    }

    /// The same, with the sleep growing by `factor` up to `max`.
    pub fn with_backoff(mut self, factor: f64, max: Duration) -> Self {
        self.backoff = factor.max(1.0);
        self.max_interval = max.max(self.interval);
        self
    }
}

/// Look with `step` until it is done, fails, or `policy.timeout` passes;
/// then `timed_out(elapsed, what the last look saw)` is the error. The first look is
/// immediate; no look starts after the deadline.
pub async fn until<T, S, F, Fut>(
    policy: &PollPolicy,
    mut step: F,
    timed_out: impl FnOnce(Duration, S) -> Error,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T, S>>>,
{
    let start = Instant::now();
    let mut sleep = policy.interval;
    loop {
        let seen = match step().await? {
            Poll::Done(t) => return Ok(t),
            Poll::Pending(s) => s,
        };
        let elapsed = start.elapsed();
        if elapsed >= policy.timeout {
            return Err(timed_out(elapsed, seen));
        }
        tokio::time::sleep(sleep.min(policy.timeout - elapsed)).await;
        sleep = sleep.mul_f64(policy.backoff).min(policy.max_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_api::ErrorKind;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn looks_until_done_and_backs_off_up_to_the_cap() {
        let looks = AtomicU32::new(0);
        let policy = PollPolicy::new(Duration::from_millis(20), Duration::from_secs(60))
            .with_backoff(4.0, Duration::from_millis(40));
        let t0 = Instant::now();
        let v: u32 = until(
            &policy,
            || async {
                let n = looks.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(if n == 5 {
                    Poll::Done(n)
                } else {
                    Poll::Pending(())
                })
            },
            |_, _| Error::other("unreachable"),
        )
        .await
        .unwrap();
        assert_eq!(v, 5);
        // Sleeps 20, 40, 40, 40 ms (80 capped) between the five looks: at
        // least 140 ms; uncapped (20, 80, 320, 1280) it would be 1.7 s.
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(140), "{took:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
    }

    #[tokio::test]
    async fn a_timeout_reports_the_last_status_and_a_failed_look_ends_the_wait() {
        let looks = AtomicU32::new(0);
        let policy = PollPolicy::new(Duration::from_millis(20), Duration::from_millis(100));
        let e = until(
            &policy,
            || async {
                let n = looks.fetch_add(1, Ordering::SeqCst);
                Ok::<Poll<(), String>, Error>(Poll::Pending(format!("doing {n}0%")))
            },
            |after, last| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("task not done after {after:?}, last {}", last),
                )
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        // Looks at 0, 20, … 100 ms (fewer on a slow machine), the message
        // from the last one.
        let n = looks.load(Ordering::SeqCst);
        assert!((2..=6).contains(&n), "{n} looks");
        assert!(
            e.to_string().contains(&format!("last doing {}0%", n - 1)),
            "{e}"
        );

        let failed = until(
            &policy,
            || async { Err::<Poll<(), ()>, _>(Error::new(ErrorKind::Platform, "task failed")) },
            |_, _| Error::other("not a timeout"),
        )
        .await
        .unwrap_err();
        assert_eq!(failed.kind(), ErrorKind::Platform);
    }
}
