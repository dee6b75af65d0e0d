//! Interrupting a job so that its cleanups still run.
//!
//! A host that is asked to stop (SIGINT, SIGTERM, a user's "cancel")
//! must not simply drop the job's future: every snapshot, attachment,
//! transfer and lease the provider holds would stay on the platform. It
//! cancels instead: the drivers stop the data copy at the next await
//! point, then run the failure cleanups of every guest that started
//! (`backup_cleanup(false)`, `restore_vm_volume_cleanup`,
//! `restore_vm_cleanup`) and `job_cleanup`, and report the guests as
//! interrupted. Guests that had not started are not touched.

use tokio::sync::watch;

/// Asks a job to stop.
#[derive(Debug)]
pub struct Canceller(watch::Sender<bool>);

impl Canceller {
    /// Ask every token of this pair to stop (idempotent).
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
}

/// What a driver watches to know it should stop.
#[derive(Debug, Clone)]
pub struct CancelToken(watch::Receiver<bool>);

/// A connected canceller and token.
pub fn cancel_pair() -> (Canceller, CancelToken) {
    let (tx, rx) = watch::channel(false);
    (Canceller(tx), CancelToken(rx))
}

impl CancelToken {
    /// A token that is never cancelled.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        drop(tx);
        CancelToken(rx)
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when cancelled (never, for a token whose canceller is gone
    /// without cancelling).
    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        loop {
            if *rx.borrow_and_update() {
                return;
            }
            if rx.changed().await.is_err() {
                // The canceller is gone without cancelling: never.
                if *rx.borrow() {
                    return;
                }
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn cancel_wakes_every_clone() {
        let (c, t) = cancel_pair();
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { t2.cancelled().await });
        assert!(!t.is_cancelled());
        c.cancel();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(t.is_cancelled());
        t.cancelled().await; // already cancelled: returns at once
    }

    #[tokio::test]
    async fn never_stays_pending() {
        let t = CancelToken::never();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), t.cancelled())
                .await
                .is_err()
        );
    }
}
