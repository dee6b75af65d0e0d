//! Retries with capped exponential backoff and jitter.
//!
//! Only errors that say retrying can help ([`Error::is_retryable`]: a
//! timeout, a busy platform answering 503, a dropped data connection) are
//! retried; anything else is returned at once. The delay before attempt
//! `n + 1` is drawn uniformly from `[d/2, d]` where
//! `d = min(max_delay, initial_delay * 2^(n-1))` ("equal jitter": never
//! zero, and concurrent clients spread out). Each retry is logged at
//! `warn` with the operation, the attempt number and the error; the last
//! error is returned unchanged once `attempts` are spent.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use provider_api::{Error, Result};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub attempts: u32,
    /// Delay before the second attempt (before jitter).
    pub initial_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 200 ms doubling up to 5 s (at most about 10 s of waiting).
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// No retry at all.
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The un-jittered delay after failed attempt `attempt` (1-based).
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The jittered delay after failed attempt `attempt`: uniform in
    /// `[base/2, base]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base_delay(attempt);
        let half = base / 2;
        let spread = (base - half).as_nanos() as u64;
        let jitter = if spread == 0 {
            0
        } else {
            next_random() % (spread + 1)
        };
        half + Duration::from_nanos(jitter)
    }
}

/// Run `op` (given the 1-based attempt number) until it succeeds, fails
/// with an error that is not retryable, or `policy.attempts` are spent.
/// `what` names the operation in logs (`GET /vms/1`, `read disk0 at 4096`).
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, what: &str, mut op: F) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let attempts = policy.attempts.max(1);
    let mut attempt = 1;
    loop {
        match op(attempt).await {
            Ok(v) => {
                if attempt > 1 {
                    tracing::info!(operation = what, attempt, "succeeded after retrying");
                }
                return Ok(v);
            }
            Err(e) if e.is_retryable() && attempt < attempts => {
                let delay = policy.delay(attempt);
                tracing::warn!(
                    operation = what,
                    attempt,
                    of = attempts,
                    delay_ms = delay.as_millis() as u64,
                    error = %e.report(),
                    "retryable failure; retrying"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(give_up(e, what, attempt)),
        }
    }
}

fn give_up(e: Error, what: &str, attempt: u32) -> Error {
    if attempt > 1 {
        tracing::warn!(operation = what, attempt, error = %e.report(), "giving up");
    }
    e
}

/// A small xorshift generator seeded from the clock: jitter needs spread,
/// not cryptographic quality, and a dependency is not worth it.
fn next_random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    x
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use provider_api::ErrorKind;

    use super::*;

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_inside_bounds() {
        let p = RetryPolicy::default();
        assert_eq!(p.base_delay(1), Duration::from_millis(200));
        assert_eq!(p.base_delay(2), Duration::from_millis(400));
        assert_eq!(p.base_delay(5), Duration::from_millis(3200));
        assert_eq!(p.base_delay(6), Duration::from_secs(5));
        assert_eq!(p.base_delay(60), Duration::from_secs(5));
        for attempt in 1..10 {
            let d = p.delay(attempt);
            let b = p.base_delay(attempt);
            assert!(d >= b / 2 && d <= b, "{d:?} outside [{:?}, {b:?}]", b / 2);
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried() {
        let calls = AtomicU32::new(0);
        let v = retry(&fast(5), "op", |n| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(Error::new(ErrorKind::Platform, "503").retryable(true))
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn persistent_failures_stop_after_the_budget() {
        let calls = AtomicU32::new(0);
        let e = retry(&fast(4), "op", |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Error::new(ErrorKind::Timeout, "slow")) }
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn errors_that_are_not_retryable_return_at_once() {
        let calls = AtomicU32::new(0);
        let e = retry(&fast(5), "op", |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Error::not_found("gone")) }
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
