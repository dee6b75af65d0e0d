//! SCP backup flows: linked VM full + incremental over NBD, with the
//! seed's base image rules, hot-add, and leak checks.

use crate::common;

use common::{MIB, read_allocated, start};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_vm_full_then_incremental_over_nbd() {
    let h = start().await;
    let scp = &h.scp;
    let base = h.base_image(8 * MIB).await;
    let (server, disks) = h
        .server(json!({
            "name": "vm1",
            "disks": [{"size": 16 * MIB, "base_image_id": base,
                       "fill": [{"offset": 5 * MIB, "length": MIB, "pattern": "random", "seed": 9}]}]
        }))
        .await;
    let disk = &disks[0];

    // Linked-VM detection through the snapshot's vmconf.
    let (snap1, cp1) = scp.snapshot(&server).await;
    let s = scp
        .get(&format!(
            "/janus/20240725/servers/{server}/snapshots/{snap1}"
        ))
        .await;
    let conf_disk = &s["vmconf"]["hardware_option"]["disks"][0];
    assert_eq!(conf_disk["base_image_id"], base.as_str());
    assert_eq!(s["checkpoint_id"], cp1);
    let images = scp
        .get(&format!("/janus/20180725/base-images?id={base}"))
        .await;
    assert_eq!(images["total_size"], 1);
    assert_eq!(images["data"][0]["status"], "AVAILABLE");
    let srv = scp.get(&format!("/janus/20250725/servers/{server}")).await;
    assert_eq!(srv["application"], "");
    assert_eq!(srv["revert_mode"], 0);

    // Guest keeps writing after the snapshot.
    let frozen_sha = h.disk_sha(disk, Some(&snap1)).await;
    h.guest_write(disk, 0, 64 * 1024, 100).await;
    assert_eq!(h.disk_sha(disk, Some(&snap1)).await, frozen_sha);

    // CBT: system disk (own data) and base image (checkpoint 0).
    let q = format!("snapshot_id={snap1}&disk_id={disk}&base_image=0&checkpoint_id=0");
    assert_eq!(scp.changed_areas(&server, &q).await, vec![(5 * MIB, MIB)]);
    let q = format!("snapshot_id={snap1}&disk_id={disk}&base_image=1&checkpoint_id=0");
    assert_eq!(
        scp.changed_areas(&server, &q).await,
        vec![(0, MIB), (2 * MIB, MIB)]
    );

    // Lease + NBD exports of the snapshot disk and its base image.
    let lease = scp
        .post(
            "/janus/20240725/backup-resources",
            json!({"server_id": server, "type": "Backup", "remain_time": 60}),
        )
        .await;
    let lease_id = lease["id"].as_str().unwrap().to_string();
    assert!(lease["remain_time"].as_u64().unwrap() > 50);
    let sys = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lease_id}/exports"),
            json!({"snapshot_id": snap1, "disk_id": disk, "open_base_image": 0, "transport": "nbd"}),
        )
        .await;
    let base_exp = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lease_id}/exports"),
            json!({"snapshot_id": snap1, "disk_id": disk, "open_base_image": 1}),
        )
        .await;
    assert_eq!(sys["size"], 16 * MIB);
    assert_eq!(base_exp["size"], 8 * MIB);
    let c = h
        .nbd(sys["export_name"].as_str().unwrap(), &["base:allocation"])
        .await;
    assert!(c.is_read_only());
    let (sha, read) = read_allocated(&c).await;
    assert_eq!(sha, frozen_sha);
    assert_eq!(read, 3 * MIB, "base text + base random + own MiB");
    let cb = h
        .nbd(
            base_exp["export_name"].as_str().unwrap(),
            &["base:allocation"],
        )
        .await;
    let (bsha, _) = read_allocated(&cb).await;
    let image_sha = h
        .admin(Method::GET, &format!("/images/{base}/sha256"), None)
        .await;
    assert_eq!(bsha, image_sha["sha256"].as_str().unwrap());
    c.disconnect().await.ok();
    cb.disconnect().await.ok();
    let renewed = scp
        .put(
            &format!("/janus/20240725/backup-resources/{lease_id}"),
            json!({"remain_time": 120}),
        )
        .await;
    assert!(renewed["remain_time"].as_u64().unwrap() > 100);
    scp.delete(&format!("/janus/20240725/backup-resources/{lease_id}"))
        .await;
    scp.wait_task(
        &scp.delete(&format!(
            "/janus/20240725/servers/{server}/snapshots/{snap1}"
        ))
        .await,
    )
    .await;

    // Incremental: only what changed since checkpoint 1 is dirty and read.
    h.guest_write(disk, 10 * MIB, 128 * 1024, 101).await;
    let (snap2, cp2) = scp.snapshot(&server).await;
    assert!(cp2 > cp1);
    let q = format!("snapshot_id={snap2}&disk_id={disk}&checkpoint_id={cp1}");
    let areas = scp.changed_areas(&server, &q).await;
    assert_eq!(areas, vec![(0, 64 * 1024), (10 * MIB, 128 * 1024)]);
    let lease = scp
        .post(
            "/janus/20240725/backup-resources",
            json!({"server_id": server}),
        )
        .await;
    let lease_id = lease["id"].as_str().unwrap().to_string();
    let exp = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lease_id}/exports"),
            json!({"snapshot_id": snap2, "disk_id": disk}),
        )
        .await;
    let bitmap = format!("qemu:dirty-bitmap:checkpoint-{cp1}");
    assert!(
        exp["meta_contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == &bitmap)
    );
    let name = exp["export_name"].as_str().unwrap().to_string();
    let c = h.nbd(&name, &["base:allocation", &bitmap]).await;
    let dirty = c.block_status(0, 16 * MIB, &bitmap).await.unwrap();
    let dirty: Vec<(u64, u64)> = dirty
        .iter()
        .filter(|e| e.flags & 1 != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty, areas);
    for (off, len) in &areas {
        c.read(*off, *len as usize).await.unwrap();
    }
    c.disconnect().await.ok();
    scp.delete(&format!("/janus/20240725/backup-resources/{lease_id}"))
        .await;
    let stats = h.mock.hypervisor().exports.stats_named(&name);
    assert_eq!(stats.len(), 1);
    assert_eq!(
        stats[0].bytes_read,
        192 * 1024,
        "incremental read only the changed extents"
    );
    assert!(!stats[0].active);
    scp.wait_task(
        &scp.delete(&format!(
            "/janus/20240725/servers/{server}/snapshots/{snap2}"
        ))
        .await,
    )
    .await;

    // Nothing leaked.
    let o = h.objects().await;
    let s = &o["platforms"]["scp"];
    for k in [
        "snapshots",
        "hotadds",
        "backup_resources",
        "exports",
        "temporary_base_images",
    ] {
        assert_eq!(s[k].as_array().map(Vec::len), Some(0), "{k} leaked: {o}");
    }
    h.mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_add_snapshot_disk_and_base_image_to_proxy() {
    let h = start().await;
    let scp = &h.scp;
    let base = h.base_image(4 * MIB).await;
    let (server, disks) = h
        .server(json!({"name": "vm", "disks": [{"size": 8 * MIB, "base_image_id": base}, {"size": 4 * MIB,
            "fill": [{"offset": 0, "length": MIB, "pattern": "text", "seed": 5}]}]}))
        .await;
    let (proxy, _) = h
        .server(json!({"name": "proxy", "disks": [{"size": MIB}]}))
        .await;
    h.guest_write(&disks[0], MIB, MIB, 3).await;
    let (snap, _) = scp.snapshot(&server).await;
    let d = scp
        .put(
            &format!("/janus/20250725/servers/{proxy}"),
            json!({"disks": [
                {"action": "attach", "snapshot_id": snap, "disk_id": disks[0], "open_base_image": 0},
                {"action": "attach", "snapshot_id": snap, "disk_id": disks[0], "open_base_image": 1},
                {"action": "attach", "snapshot_id": snap, "disk_id": disks[1]},
            ]}),
        )
        .await;
    let r = scp.wait_task(&d).await;
    let added = r["hotadd_disks"].as_array().unwrap().clone();
    assert_eq!(added.len(), 3);
    let file_sha = |i: usize| {
        let p = added[i]["local_path"].as_str().unwrap().to_string();
        common::sha_of(&std::fs::read(p).unwrap())
    };
    assert_eq!(file_sha(0), h.disk_sha(&disks[0], Some(&snap)).await);
    let img = h
        .admin(Method::GET, &format!("/images/{base}/sha256"), None)
        .await;
    assert_eq!(file_sha(1), img["sha256"].as_str().unwrap());
    assert_eq!(file_sha(2), h.disk_sha(&disks[1], Some(&snap)).await);
    let srv = scp.get(&format!("/janus/20250725/servers/{proxy}")).await;
    assert_eq!(srv["hotadd_disks"].as_array().unwrap().len(), 3);
    let mut devices: Vec<&str> = srv["hotadd_disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    devices.sort();
    assert_eq!(devices, ["/dev/vdb", "/dev/vdc", "/dev/vdd"]);

    // A snapshot disk cannot be added writable.
    let (status, v) = scp
        .call(
            Method::PUT,
            &format!("/janus/20250725/servers/{proxy}"),
            Some(json!({"disks": {"snapshot_id": snap, "mode": "rw"}})),
        )
        .await;
    assert_eq!(status, 400, "{v}");

    let remove: Vec<_> = added
        .iter()
        .map(|a| json!({"action": "detach", "hotadd_id": a["id"]}))
        .collect();
    scp.wait_task(
        &scp.put(
            &format!("/janus/20250725/servers/{proxy}"),
            json!({"disks": remove}),
        )
        .await,
    )
    .await;
    for a in &added {
        assert!(!std::path::Path::new(a["local_path"].as_str().unwrap()).exists());
    }
    let o = h.objects().await;
    assert_eq!(
        o["platforms"]["scp"]["hotadds"].as_array().unwrap().len(),
        0
    );
    h.mock.shutdown().await;
}
