//! CBT rules: platform version gating, desktop VMs, expiry after revert and
//! restore, reset, paging, revert mode.

use crate::common;

use common::{MIB, start, start_with};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_6_11_2_refuses_base_image_cbt_and_merges_it_into_the_system_disk() {
    let h = start_with(|c| c.scp.version = "6.11.2".into()).await;
    let scp = &h.scp;
    let v = scp.get("/janus/20180725/system/version").await;
    assert_eq!(v["build_version"], "SCP6.11.2 B-2025-07-25 10:00:00");
    let base = h.base_image(4 * MIB).await;
    let fill = json!([{"offset": 3 * MIB, "length": 64 * 1024, "pattern": "random", "seed": 1}]);
    let (vm, disks) = h
        .server(json!({"name": "vm", "disks": [{"size": 4 * MIB, "base_image_id": base, "fill": fill}]}))
        .await;
    let (desk, _) = h
        .server(json!({"name": "desk", "application": "desk",
                       "disks": [{"size": 4 * MIB, "base_image_id": base, "fill": fill}]}))
        .await;
    let (snap, _) = scp.snapshot(&vm).await;
    let (dsnap, _) = scp.snapshot(&desk).await;

    let path = format!(
        "/janus/20240725/servers/{vm}/cbt/changed-areas?snapshot_id={snap}&base_image=1&checkpoint_id=0"
    );
    let (status, v) = scp.call(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["code"], 60003, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("already includes the base image")
    );
    let path = format!(
        "/janus/20240725/servers/{desk}/cbt/changed-areas?snapshot_id={dsnap}&base_image=1"
    );
    let (_, v) = scp.call(Method::GET, &path, None).await;
    assert_eq!(v["code"], 60003);
    assert!(v["message"].as_str().unwrap().contains("desktop"));

    // Below 6.11.3 the system disk's full map includes the base image, except
    // for desktop VMs.
    let q = format!(
        "snapshot_id={snap}&disk_id={}&base_image=0&checkpoint_id=0",
        disks[0]
    );
    assert_eq!(
        scp.changed_areas(&vm, &q).await,
        vec![(0, MIB), (2 * MIB, MIB + 64 * 1024)]
    );
    let q = format!("snapshot_id={dsnap}&checkpoint_id=0");
    assert_eq!(
        scp.changed_areas(&desk, &q).await,
        vec![(3 * MIB, 64 * 1024)]
    );

    // From 6.11.3 both work.
    h.admin(
        Method::PUT,
        "/scp/version",
        Some(json!({"version": "6.11.3"})),
    )
    .await;
    let q = format!("snapshot_id={snap}&base_image=1&checkpoint_id=0");
    assert_eq!(
        scp.changed_areas(&vm, &q).await,
        vec![(0, MIB), (2 * MIB, MIB)]
    );
    let q = format!("snapshot_id={snap}&base_image=0&checkpoint_id=0");
    assert_eq!(scp.changed_areas(&vm, &q).await, vec![(3 * MIB, 64 * 1024)]);
    let q = format!("snapshot_id={dsnap}&base_image=1&checkpoint_id=0");
    assert_eq!(
        scp.changed_areas(&desk, &q).await,
        vec![(0, MIB), (2 * MIB, MIB)]
    );
    h.mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_expires_after_revert_and_restore_until_reset() {
    let h = start().await;
    let scp = &h.scp;
    let (vm, disks) = h
        .server(json!({"name": "vm", "disks": [{"size": 2 * MIB,
            "fill": [{"offset": 0, "length": MIB, "pattern": "text", "seed": 1}]}]}))
        .await;
    let (s1, cp1) = scp.snapshot(&vm).await;
    let before = h.disk_sha(&disks[0], None).await;
    h.guest_write(&disks[0], 0, 4096, 7).await;
    scp.wait_task(
        &scp.post(
            &format!("/janus/20240725/servers/{vm}/snapshots/{s1}/actions/revert"),
            json!({}),
        )
        .await,
    )
    .await;
    assert_eq!(h.disk_sha(&disks[0], None).await, before);
    assert!(
        h.mock
            .scp()
            .inventory()
            .read(|d| d.servers[&vm].cbt.expired)
    );
    let (s2, _) = scp.snapshot(&vm).await;
    for cp in [0, cp1] {
        let path = format!(
            "/janus/20240725/servers/{vm}/cbt/changed-areas?snapshot_id={s2}&checkpoint_id={cp}"
        );
        let (status, v) = scp.call(Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_ne!(v["code"], 0);
        assert_eq!(v["message"], "The VM CBT has expired. Please reset it.");
    }
    scp.put(
        &format!("/janus/20240725/servers/{vm}/cbt/status"),
        json!({"enable": 1}),
    )
    .await;
    // After the reset: a full works, the old checkpoint does not.
    let q = format!("snapshot_id={s2}&checkpoint_id=0");
    assert_eq!(scp.changed_areas(&vm, &q).await, vec![(0, MIB)]);
    let path = format!(
        "/janus/20240725/servers/{vm}/cbt/changed-areas?snapshot_id={s2}&checkpoint_id={cp1}"
    );
    let (_, v) = scp.call(Method::GET, &path, None).await;
    assert_eq!(v["code"], 60004, "{v}");

    // A restore (writable export of the live disk) expires CBT too.
    let lease = scp
        .post(
            "/janus/20240725/backup-resources",
            json!({"server_id": vm, "type": "Recovery"}),
        )
        .await;
    let lid = lease["id"].as_str().unwrap();
    let exp = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            json!({"disk_id": disks[0]}),
        )
        .await;
    assert_eq!(exp["writable"], true);
    assert!(
        h.mock
            .scp()
            .inventory()
            .read(|d| d.servers[&vm].cbt.expired)
    );
    scp.delete(&format!("/janus/20240725/backup-resources/{lid}"))
        .await;

    // Admin-injected expiry.
    scp.put(
        &format!("/janus/20240725/servers/{vm}/cbt/status"),
        json!({"enable": 1}),
    )
    .await;
    h.admin(Method::POST, &format!("/scp/servers/{vm}/cbt/expire"), None)
        .await;
    let path = format!("/janus/20240725/servers/{vm}/cbt/changed-areas?snapshot_id={s2}");
    assert_eq!(
        scp.call(Method::GET, &path, None).await.1["message"],
        "The VM CBT has expired. Please reset it."
    );

    // Disabled CBT.
    scp.put(
        &format!("/janus/20240725/servers/{vm}/cbt/status"),
        json!({"enable": 0}),
    )
    .await;
    assert_eq!(scp.call(Method::GET, &path, None).await.1["code"], 60002);
    h.mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_areas_are_paged_and_revert_mode_refuses_backup() {
    let h = start_with(|c| c.scp.changed_areas_page = MIB).await;
    let scp = &h.scp;
    let (vm, disks) = h
        .server(json!({"name": "vm", "disks": [{"size": 4 * MIB}]}))
        .await;
    h.guest_write(&disks[0], MIB - 65536, 2 * 65536, 1).await;
    h.guest_write(&disks[0], 3 * MIB, 65536, 2).await;
    let (snap, _) = scp.snapshot(&vm).await;
    let first = scp
        .get(&format!(
            "/janus/20240725/servers/{vm}/cbt/changed-areas?snapshot_id={snap}"
        ))
        .await;
    assert_eq!(first["length"], MIB);
    assert_eq!(first["next_offset"], MIB);
    assert_eq!(first["disk_size"], 4 * MIB);
    let all = scp.changed_areas(&vm, &format!("snapshot_id={snap}")).await;
    assert_eq!(
        all,
        vec![(MIB - 65536, 65536), (MIB, 65536), (3 * MIB, 65536)],
        "areas are cut at page boundaries"
    );

    let (desk, _) = h
        .server(
            json!({"name": "d", "application": "desk", "revert_mode": 1, "disks": [{"size": MIB}]}),
        )
        .await;
    let (_, v) = scp
        .call(
            Method::POST,
            "/janus/20240725/backup-resources",
            Some(json!({"server_id": desk, "type": "Backup"})),
        )
        .await;
    assert_eq!(v["code"], 60005, "{v}");
    h.mock.shutdown().await;
}
