//! The conformance kit (crate `conformance`) on provider-ovirt against the
//! mock's oVirt, in both backup modes, through [`OvirtDriver`] (which grows
//! a disk as an operator does, through `PUT /vms/{vm}/diskattachments/{d}`).
//! Nothing is skipped.
//!
//! Incremental mode runs twice: with the mock's `nbd_url` on image
//! transfers (a mock extension: the provider reads the backup's NBD
//! export), and without it, as a real engine answers, so that the provider
//! downloads through the image server into a staging file. The second is
//! where a disk grown since the previous backup must be downloaded in full
//! (issue 12's resize case: the round-trip check grows a disk).

use std::sync::Arc;

use conformance::{Kit, PlatformDriver};
use provider_ovirt::{BackupMode, WireFormat};
use scenarios::ovirt::*;

async fn run(mode: BackupMode, format: WireFormat, transfer_nbd_url: bool) {
    let env = Env::start_with("up", |c| c.ovirt.transfer_nbd_url = transfer_nbd_url).await;
    let driver = Arc::new(OvirtDriver::new(&env));
    assert_eq!(driver.leftovers().await.unwrap(), Vec::<String>::new());
    let kit = Kit::new(env.provider(mode, format), driver);
    let access = if transfer_nbd_url { "nbd" } else { "imageio" };
    match kit.run_all().await {
        Ok(report) => println!("{mode:?}/{format:?}/{access}:\n{report}"),
        Err(failure) => panic!("{mode:?}/{format:?}/{access}: {}{failure}", failure.before),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_passes_in_snapshot_attach_mode() {
    run(BackupMode::SnapshotAttach, WireFormat::Xml, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_passes_in_incremental_mode() {
    run(BackupMode::Incremental, WireFormat::Json, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_passes_in_incremental_mode_through_the_image_server() {
    run(BackupMode::Incremental, WireFormat::Xml, false).await;
}
