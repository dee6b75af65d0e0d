//! The conformance kit (issue 12) against provider-zstack and the mock's
//! ZStack, through [`scenarios::zstack::ZsDriver`].
//!
//! provider-zstack claims no incremental, no containers and no in-place
//! restore, so the kit skips `incremental-reads` and the in-place parts
//! of its checks by itself; nothing is skipped here.

use std::sync::Arc;

use conformance::Kit;
use provider_api::BackupProvider;
use serde_json::json;

use scenarios::zstack::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_kit_v2_passes() {
    let zs = Zs::start().await;
    // Each kit guest has its own root image and restores keep theirs.
    zs.admin()
        .put("/zstack/quota", json!({"image_num": 10_000}))
        .await;
    let provider: Arc<dyn BackupProvider> = zs.provider();
    let driver = Arc::new(ZsDriver {
        admin: zs.admin().clone(),
    });
    let kit = Kit::new(provider, driver).guest_prefix("zskit");
    match kit.run_all().await {
        Ok(report) => println!("{report}"),
        Err(failure) => panic!("{}{failure}", failure.before),
    }
}

/// The driver alone: what it writes, grows and reads is what the
/// platform holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstack_driver_round_trips_bytes() {
    use conformance::PlatformDriver;
    let zs = Zs::start().await;
    let d = ZsDriver {
        admin: zs.admin().clone(),
    };
    let g = d
        .create_guest("drv", &[5 * MIB + 4096, 3 * MIB, 2 * MIB])
        .await
        .unwrap();
    let vols = d.volumes(&g).await.unwrap();
    let devices: Vec<&str> = vols.iter().map(|v| v.device.as_str()).collect();
    assert_eq!(devices, ["root", "data-1", "data-2"]);
    assert_eq!(vols[0].size, 5 * MIB + 4096);
    d.write(&g, "data-2", 2 * MIB - 3, b"end").await.unwrap();
    d.write(&g, "root", 0, b"first").await.unwrap();
    let data2 = d.read(&g, "data-2").await.unwrap();
    assert_eq!(&data2[2 * MIB as usize - 3..], b"end");
    // The root volume grows in place: same disk, still a thin clone of
    // its image (the base-image link is kept, nothing is copied up).
    let root_disk = |o: &serde_json::Value| {
        o["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vmInstanceUuid"] == g.id.0.as_str() && v["type"] == "Root")
            .unwrap()["diskId"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let disk_before = root_disk(&zs.admin().get("/zstack/objects").await);
    let base_of = |disks: &serde_json::Value, id: &str| {
        disks
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap()["base_image_id"]
            .clone()
    };
    let base_before = base_of(&zs.admin().get("/disks").await, &disk_before);
    assert!(base_before.is_string(), "the root volume is a linked clone");
    d.grow(&g, "root", 9 * MIB).await.unwrap();
    assert_eq!(
        root_disk(&zs.admin().get("/zstack/objects").await),
        disk_before
    );
    assert_eq!(
        base_of(&zs.admin().get("/disks").await, &disk_before),
        base_before
    );
    let root = d.read(&g, "root").await.unwrap();
    assert_eq!(root.len() as u64, 9 * MIB);
    assert_eq!(&root[..5], b"first");
    assert!(root[5 * MIB as usize + 4096..].iter().all(|b| *b == 0));
    assert_eq!(d.volumes(&g).await.unwrap()[0].size, 9 * MIB);
    assert!(d.leftovers().await.unwrap().is_empty());
    d.remove_guest(&g).await.unwrap();
    assert!(d.volumes(&g).await.unwrap().is_empty());
}
