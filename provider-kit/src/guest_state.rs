//! Per-guest state between the calls of one backup or restore, and the
//! poison-tolerant lock every provider needs for it.
//!
//! A provider learns things in `backup_init` (the VM's platform id, the
//! snapshot it took, the disks it attached) that later calls need and that
//! `backup_cleanup` must undo. [`GuestStates`] keeps one such record per
//! guest: a call that comes without its starting call gets an error naming
//! the guest and the missing call; a cleanup takes the record out and, if
//! undoing part of it failed, puts the rest back so that a retried cleanup
//! (or `job_cleanup`) still knows what is left.
//!
//! Locking: one short-held `std::sync::Mutex` per map, never held across
//! an `.await` (closures run under it; nothing async can). A lock poisoned
//! by a panicking thread is taken anyway ([`lock`]): the record is still
//! the best account of what to clean up, and refusing it would leak
//! snapshots and attachments on the platform.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use provider_api::{Error, ErrorKind, GuestId, Result};

/// Lock `m`, also when a thread panicked while holding it (see the module
/// docs for why the data is still used).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One record of type `T` per guest, keyed by guest id.
#[derive(Debug)]
pub struct GuestStates<T> {
    /// The call that creates a guest's record (`backup_init`,
    /// `restore_vm_init`), named when a later call finds none.
    started_by: &'static str,
    map: Mutex<HashMap<String, T>>,
}

impl<T> GuestStates<T> {
    /// An empty map whose records `started_by` creates.
    pub fn new(started_by: &'static str) -> Self {
        GuestStates {
            started_by,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Start (or replace) the record of guest `id`; returns the one it
    /// replaces.
    pub fn insert(&self, id: &str, state: T) -> Option<T> {
        lock(&self.map).insert(id.to_owned(), state)
    }

    /// Run `f` on the record of `guest`; an error naming the guest and the
    /// starting call when there is none.
    pub fn with<R>(&self, guest: &GuestId, f: impl FnOnce(&mut T) -> R) -> Result<R> {
        self.with_id(&guest.0, f).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("{} was not called", self.started_by),
            )
            .guest(guest)
        })
    }

    /// Run `f` on the record under `id`, if there is one.
    pub fn with_id<R>(&self, id: &str, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        lock(&self.map).get_mut(id).map(f)
    }

    /// Take the record of `guest` out (a cleanup starting); put what is
    /// left back with [`GuestStates::insert`] when undoing it failed.
    pub fn take(&self, guest: &GuestId) -> Option<T> {
        lock(&self.map).remove(&guest.0)
    }

    /// Take every record out (`job_cleanup`).
    pub fn drain(&self) -> Vec<T> {
        lock(&self.map).drain().map(|(_, st)| st).collect()
    }

    /// `f` of every record that gives `Some` (diagnostics, lookups across
    /// guests).
    pub fn collect<R>(&self, f: impl FnMut(&T) -> Option<R>) -> Vec<R> {
        lock(&self.map).values().filter_map(f).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_without_its_starting_call_names_the_guest_and_the_call() {
        let states: GuestStates<u32> = GuestStates::new("backup_init");
        let g = GuestId("vm-7".into());
        let e = states.with(&g, |n| *n).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let text = e.to_string();
        assert!(text.contains("backup_init was not called"), "{text}");
        assert!(text.contains("vm-7"), "{text}");

        states.insert("vm-7", 1);
        assert_eq!(states.with(&g, |n| std::mem::replace(n, 2)).unwrap(), 1);
        assert_eq!(states.collect(|n| Some(*n)), vec![2]);
        // A cleanup takes the record; what it could not undo goes back.
        let st = states.take(&g).unwrap();
        assert!(states.with_id("vm-7", |_| ()).is_none());
        states.insert("vm-7", st);
        assert_eq!(states.drain(), vec![2]);
        assert!(states.drain().is_empty());
    }

    #[test]
    fn a_lock_poisoned_by_a_panic_still_gives_its_record() {
        let states: std::sync::Arc<GuestStates<u32>> =
            std::sync::Arc::new(GuestStates::new("backup_init"));
        states.insert("vm", 5);
        let s = states.clone();
        let _ = std::thread::spawn(move || {
            s.with_id("vm", |_| panic!("a provider bug"));
        })
        .join();
        assert!(states.map.is_poisoned());
        assert_eq!(states.with_id("vm", |n| *n), Some(5));
    }
}
