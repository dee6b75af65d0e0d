//! The provider against the in-process mock: the conformance kit in both
//! modes, with a probe over the mock's oVirt inventory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mock_hypervisor::platform::Platform;
use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock};
use provider_api::Guest;
use provider_api::testing::{PlatformProbe, check_all};
use provider_ovirt::{BackupMode, OvirtOptions, OvirtProvider, WireFormat};

struct Probe(Arc<mock_hypervisor::ovirt::OvirtPlatform>);

#[async_trait]
impl PlatformProbe for Probe {
    async fn leftovers(&self) -> Vec<String> {
        let o = self.0.objects();
        [
            "snapshots",
            "backup_attachments",
            "appliance_files",
            "active_backups",
            "active_transfers",
            "exports",
        ]
        .iter()
        .flat_map(|k| {
            o[*k]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |v| format!("{k}: {v}"))
        })
        .collect()
    }
}

async fn mock(dir: &tempfile::TempDir) -> RunningMock {
    let mut c = MockConfig::new(dir.path().join("state"));
    c.seed = Some(mock_hypervisor::Seed::Demo);
    MockHypervisor::start(c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_kit_on_the_demo_seed() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock(&dir).await;
    let ep = mock.endpoints().platforms["ovirt"].clone();
    let vm = mock.ovirt().inventory().read(|d| {
        d.vms
            .values()
            .find(|v| v.name == "ovirt-vm1")
            .map(|v| v.id.clone())
            .unwrap()
    });
    for (mode, format) in [
        (BackupMode::SnapshotAttach, WireFormat::Json),
        (BackupMode::Incremental, WireFormat::Xml),
    ] {
        let mut o = OvirtOptions::new(
            ep["base_url"].as_str().unwrap(),
            ep["username"].as_str().unwrap(),
            ep["password"].as_str().unwrap(),
            "backup-appliance",
        );
        o.mode = mode;
        o.format = format;
        o.poll_interval = Duration::from_millis(10);
        // The engine is HTTPS only, with the mock's CA.
        o.tls_ca = ep["ca_file"].as_str().map(std::path::PathBuf::from);
        // The mock's appliance sees its disks by id there.
        o.device_root = ep["device_root"].as_str().unwrap().into();
        let p = OvirtProvider::new(o).unwrap();
        check_all(&p, &Guest::vm(vm.clone()), &Probe(mock.ovirt().clone()))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    }
}
