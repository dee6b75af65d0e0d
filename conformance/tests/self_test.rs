//! The kit's self-test: a correct file-backed provider passes every
//! check, and deliberately broken variants are caught with a message that
//! names the check, the guest, the volume and the offset.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod fake;

use conformance::{Check, Failure, Kit, Status};
use fake::{Bugs, FakePlatform};

fn kit(bugs: Bugs) -> Kit {
    let platform = FakePlatform::new(bugs);
    Kit::new(platform.provider(), platform.driver())
}

fn caught(f: &Failure, check: Check, parts: &[&str]) {
    println!("{f}");
    assert_eq!(f.check, check, "{f}");
    let text = f.to_string();
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_provider_passes_the_whole_kit() {
    let report = kit(Bugs::default())
        .run_all()
        .await
        .unwrap_or_else(|f| panic!("{}{f}", f.before));
    println!("{report}");
    assert_eq!(report.ran(), Check::ALL.to_vec());
    assert!(report.skipped().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_check_is_reported_with_its_reason() {
    let report = kit(Bugs::default())
        .skip(Check::MultiGuest, "one guest at a time on this lab")
        .multi_guest()
        .await
        .unwrap();
    assert_eq!(
        report.status,
        Status::Skipped {
            reason: "one guest at a time on this lab".into()
        }
    );
    assert!(report.to_string().contains("skipped: one guest at a time"));
}

/// The multi-disk truncation bug: every restored volume of a guest goes to
/// one file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_volume_restored_into_one_file_fails_the_round_trip() {
    let f = kit(Bugs {
        shared_restore_file: true,
        ..Bugs::default()
    })
    .round_trip()
    .await
    .expect_err("the kit must catch a restore that writes every volume to one file");
    caught(
        &f,
        Check::RoundTrip,
        &[
            "restore of snapshot 1 (full backup) to a new guest",
            "the restored volume differs",
            "volume disk0",
        ],
    );
    assert!(f.offset.is_some(), "{f}");

    let f = kit(Bugs {
        shared_restore_file: true,
        ..Bugs::default()
    })
    .run_all()
    .await
    .expect_err("run_all fails too");
    assert_eq!(f.check, Check::RoundTrip, "{f}");
    assert_eq!(f.before.ran(), [Check::Lifecycle, Check::CapabilityHonesty]);
}

/// The oVirt resize bug: only dirty extents staged, served as a full read
/// once the disk grew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_only_staging_read_in_full_after_a_resize_fails_the_round_trip() {
    let f = kit(Bugs {
        dirty_only_staging: true,
        ..Bugs::default()
    })
    .round_trip()
    .await
    .expect_err("the kit must catch zeroes stored for a grown disk");
    caught(
        &f,
        Check::RoundTrip,
        &[
            "snapshot 3 (after volume disk0 grew",
            "the stored volume differs from what the guest held at backup time",
            "where only zeroes were found",
            "volume disk0",
        ],
    );
    assert!(f.offset.is_some(), "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_that_reads_everything_fails_the_bound() {
    let k = kit(Bugs {
        read_everything: true,
        ..Bugs::default()
    });
    let f = k
        .incremental_reads()
        .await
        .expect_err("the kit must catch an incremental that reads the whole volume");
    caught(
        &f,
        Check::IncrementalReads,
        &[
            "outside what the guest wrote since the full backup",
            "it read the whole volume",
        ],
    );
    // The bytes are right: only the bound catches it.
    k.round_trip().await.unwrap_or_else(|f| panic!("{f}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_that_forgets_failed_backups_fails_the_injection() {
    let f = kit(Bugs {
        leak_on_failure: true,
        ..Bugs::default()
    })
    .failure_injection()
    .await
    .expect_err("the kit must catch a leak on the failure path");
    caught(
        &f,
        Check::FailureInjection,
        &["with a failure injected in", "the platform still holds"],
    );
}

/// The fix of the resize bug passes: dirty-only staging declared as such,
/// and a whole volume staged whenever the host reads in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_only_staging_declared_and_only_where_the_host_reads_dirty_passes() {
    let k = kit(Bugs {
        honest_dirty_staging: true,
        ..Bugs::default()
    });
    k.round_trip().await.unwrap_or_else(|f| panic!("{f}"));
    k.incremental_reads()
        .await
        .unwrap_or_else(|f| panic!("{f}"));
}
