//! SCP restore flows: base image restore over NBD, replica sync, custom
//! attributes, restore to a new linked VM, interrupted base image restore,
//! overwrite restore with recovery-baseimage, hot-add for write.

use crate::common;

use common::{MIB, sha_of, start};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_linked_vm_to_new_server() {
    let h = start().await;
    let scp = &h.scp;
    let base_data: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();

    // 1. The base image does not exist: create it and make it AVAILABLE
    //    (seed 4.5.2: its data is written later, through a linked VM).
    let q = scp
        .get("/janus/20180725/base-images?name=restored-base")
        .await;
    assert_eq!(q["total_size"], 0);
    let b = scp
        .post(
            "/janus/20180725/base-images",
            json!({"name": "restored-base", "size": 4 * MIB, "storage_id": "storage-local"}),
        )
        .await;
    let base = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["status"], "CREATING");
    // Writing a base image by its own id is refused.
    let lease = scp
        .post(
            "/janus/20240725/backup-resources",
            json!({"type": "Recovery"}),
        )
        .await;
    let lid = lease["id"].as_str().unwrap().to_string();
    let (status, _) = scp
        .call(
            Method::POST,
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            Some(json!({"base_image_id": base, "open_base_image": 1})),
        )
        .await;
    assert!(status.is_client_error(), "{status}");
    scp.delete(&format!("/janus/20240725/backup-resources/{lid}"))
        .await;
    let img = scp
        .put(
            &format!("/janus/20180725/base-images/{base}"),
            json!({"status": "AVAILABLE"}),
        )
        .await;
    assert_eq!(img["status"], "AVAILABLE");
    let mut full = base_data.clone();
    full.resize(4 * MIB as usize, 0);

    // 2. Replica on the target storage.
    let r = scp
        .post(
            &format!("/janus/20180725/base-images/{base}/replicas/actions/sync"),
            json!({"storage_id": "storage-vs"}),
        )
        .await;
    scp.wait_task(&r).await;
    let reps = scp
        .get(&format!("/janus/20180725/base-images/{base}/replicas"))
        .await;
    assert_eq!(reps["total_size"], 2);
    let q = scp
        .get("/janus/20180725/base-images?storage_id=storage-vs")
        .await;
    assert_eq!(q["data"][0]["id"], base.as_str());

    // 3. Custom attributes and bindings.
    let a = scp
        .post(
            "/janus/20190725/custom-attributes",
            json!({"name": "owner", "resource_type": "base_image"}),
        )
        .await;
    let attr = a["id"].as_str().unwrap();
    let a2 = scp
        .post("/janus/20190725/custom-attributes", json!({"name": "tier"}))
        .await;
    scp.post(
        "/janus/20190725/custom-attributes/bindings/actions/bulk-create",
        json!({"bindings": [
            {"custom_attribute_id": attr, "resource_type": "base_image", "resource_id": base, "value": "ops"},
            {"custom_attribute_id": a2["id"], "resource_type": "base_image", "resource_id": base, "value": "gold"},
        ]}),
    )
    .await;
    let binds = scp
        .get(&format!(
            "/janus/20190725/custom-attributes/bindings?resource_id={base}"
        ))
        .await;
    assert_eq!(binds["total_size"], 2);
    let (status, v) = scp
        .call(
            Method::POST,
            "/janus/20190725/custom-attributes/bindings",
            Some(json!({"custom_attribute_id": attr, "resource_type": "base_image", "resource_id": base})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, _) = scp
        .call(
            Method::POST,
            "/janus/20190725/custom-attributes",
            Some(json!({"name": "owner"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // 4. New linked VM on the target storage, its own data written over NBD.
    let t = scp
        .post(
            "/janus/20250725/servers",
            json!({"name": "restored", "storage_id": "storage-vs",
                   "disks": [{"size": 8 * MIB, "base_image_id": base}, {"size": 2 * MIB}]}),
        )
        .await;
    let r = scp.wait_task(&t).await;
    let server = r["server_id"].as_str().unwrap().to_string();
    let srv = scp.get(&format!("/janus/20250725/servers/{server}")).await;
    assert_eq!(srv["disks"][0]["base_image_id"], base.as_str());
    assert_eq!(srv["is_linked"], true);
    let sys_disk = srv["disks"][0]["id"].as_str().unwrap().to_string();
    // The base image's data goes through the VM's system disk with the
    // base-image flag (SFDISKLIB_FLAG_OPEN_BASE_IMAGE); until it is
    // complete the disk itself cannot be opened.
    let lease = scp
        .post(
            "/janus/20240725/backup-resources",
            json!({"server_id": server, "type": "Recovery"}),
        )
        .await;
    let lid = lease["id"].as_str().unwrap().to_string();
    let (status, _) = scp
        .call(
            Method::POST,
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            Some(json!({"disk_id": sys_disk})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let exp = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            json!({"disk_id": sys_disk, "open_base_image": 1}),
        )
        .await;
    assert_eq!(exp["writable"], true);
    let c = h.nbd(exp["export_name"].as_str().unwrap(), &[]).await;
    c.write(0, &base_data).await.unwrap();
    c.flush().await.ok();
    c.disconnect().await.ok();
    scp.delete(&format!("/janus/20240725/backup-resources/{lid}"))
        .await;
    let sha = h
        .admin(Method::GET, &format!("/images/{base}/sha256"), None)
        .await;
    assert_eq!(sha["sha256"], sha_of(&full));
    // Its own data, over NBD.
    let lease = scp
        .post(
            "/janus/20240725/backup-resources",
            json!({"server_id": server, "type": "Recovery"}),
        )
        .await;
    let lid = lease["id"].as_str().unwrap().to_string();
    let exp = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            json!({"disk_id": sys_disk}),
        )
        .await;
    let c = h.nbd(exp["export_name"].as_str().unwrap(), &[]).await;
    let own = vec![7u8; 65536];
    c.write(5 * MIB, &own).await.unwrap();
    c.disconnect().await.ok();
    scp.delete(&format!("/janus/20240725/backup-resources/{lid}"))
        .await;
    full.resize(8 * MIB as usize, 0);
    full[5 * MIB as usize..5 * MIB as usize + 65536].copy_from_slice(&own);
    assert_eq!(h.disk_sha(&sys_disk, None).await, sha_of(&full));

    // 5. Overwrite restore of a linked VM: recovery-baseimage erases own data.
    let t = scp
        .post(
            &format!("/janus/20240725/servers/{server}/recovery-baseimage"),
            json!({}),
        )
        .await;
    scp.wait_task(&t).await;
    full.truncate(4 * MIB as usize);
    full.resize(8 * MIB as usize, 0);
    full[..2 * MIB as usize].copy_from_slice(&base_data);
    assert_eq!(h.disk_sha(&sys_disk, None).await, sha_of(&full));
    assert!(
        h.mock
            .scp()
            .inventory()
            .read(|d| d.servers[&server].cbt.expired)
    );

    // A base image in use cannot be deleted.
    let (status, _) = scp
        .call(
            Method::DELETE,
            &format!("/janus/20180725/base-images/{base}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    h.mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_base_image_restore_is_deleted_and_hot_add_writes_back() {
    let h = start().await;
    let scp = &h.scp;
    let b = scp
        .post(
            "/janus/20180725/base-images",
            json!({"name": "half", "size": 2 * MIB}),
        )
        .await;
    let base = b["id"].as_str().unwrap().to_string();
    let o = h.objects().await;
    assert_eq!(
        o["platforms"]["scp"]["temporary_base_images"][0],
        base.as_str()
    );
    // A linked VM cannot use a CREATING base image.
    let (status, _) = scp
        .call(
            Method::POST,
            "/janus/20250725/servers",
            Some(json!({"name": "x", "disks": [{"size": 2 * MIB, "base_image_id": base}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    scp.delete(&format!("/janus/20180725/base-images/{base}"))
        .await;
    let (status, v) = scp
        .call(
            Method::GET,
            &format!("/janus/20180725/base-images/{base}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["code"], 40400);

    // Hot-add for write: restore a data disk through a file on the proxy.
    let (proxy, _) = h
        .server(json!({"name": "proxy", "disks": [{"size": MIB}]}))
        .await;
    let (vm, disks) = h
        .server(json!({"name": "vm", "disks": [{"size": MIB}, {"size": 2 * MIB}]}))
        .await;
    let t = scp
        .put(
            &format!("/janus/20250725/servers/{proxy}"),
            json!({"disks": {"server_id": vm, "disk_id": disks[1], "mode": "rw"}}),
        )
        .await;
    let r = scp.wait_task(&t).await;
    let hot = &r["hotadd_disks"][0];
    let path = hot["local_path"].as_str().unwrap().to_string();
    let mut data = std::fs::read(&path).unwrap();
    assert_eq!(data.len() as u64, 2 * MIB);
    data[100..200].fill(0xAB);
    std::fs::write(&path, &data).unwrap();
    scp.wait_task(
        &scp.put(
            &format!("/janus/20250725/servers/{proxy}"),
            json!({"disks": [{"action": "detach", "hotadd_id": hot["id"]}]}),
        )
        .await,
    )
    .await;
    assert_eq!(h.disk_sha(&disks[1], None).await, sha_of(&data));
    assert!(!std::path::Path::new(&path).exists());
    h.mock.shutdown().await;
}
