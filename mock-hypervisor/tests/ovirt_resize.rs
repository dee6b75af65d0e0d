//! oVirt disk extend: `PUT /vms/{vm}/diskattachments/{disk}` with a larger
//! `<disk><provisioned_size>` (the model's `DiskAttachmentService.update`),
//! and what a backup application sees afterwards: the new size on the disk,
//! on a new NBD connection and in the dirty extents of an incremental (the
//! grown tail is not dirty), while a snapshot taken before keeps its size.

use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

struct Api {
    mock: RunningMock,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    base: String,
    token: String,
}

async fn start() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = MockConfig::new(dir.path().join("state"));
    config.ovirt.snapshot_polls = 0;
    config.ovirt.backup_polls = 0;
    config.ovirt.transfer_polls = 0;
    // The mock extension these tests read transfers through.
    config.ovirt.transfer_nbd_url = true;
    // Plain HTTP: these tests read the mock's own answers.
    config.ovirt.https = false;
    let mock = MockHypervisor::start(config).await.unwrap();
    let http = reqwest::Client::new();
    let ep = mock.endpoints().platforms["ovirt"].clone();
    let tok: Value = http
        .post(ep["sso_url"].as_str().unwrap())
        .body("grant_type=password&scope=ovirt-app-api&username=admin%40internal&password=ovirt-password")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Api {
        base: ep["base_url"].as_str().unwrap().to_string(),
        token: tok["access_token"].as_str().unwrap().to_string(),
        mock,
        _dir: dir,
        http,
    }
}

impl Api {
    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("Accept", "application/json");
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.json(method, path, body).await;
        assert!(s.is_success(), "{path}: {s} {v}");
        v
    }

    async fn put_xml(&self, path: &str, body: &str) -> (StatusCode, String) {
        let resp = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("Content-Type", "application/xml")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(
            method,
            format!("{}/admin{path}", self.mock.endpoints().http_url),
        );
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        assert!(r.status().is_success(), "{path}");
        r.json().await.unwrap()
    }

    /// Full backup (or incremental from `from`) of `disk`, ready; returns
    /// (backup id, checkpoint id).
    async fn backup(&self, vm: &str, disk: &str, from: Option<&str>) -> (String, String) {
        let mut body = json!({"disks": {"disk": [{"id": disk}]}});
        if let Some(f) = from {
            body["from_checkpoint_id"] = json!(f);
        }
        let b = self
            .ok(Method::POST, &format!("/vms/{vm}/backups"), Some(body))
            .await;
        let bid = b["id"].as_str().unwrap().to_string();
        let mut phase = String::new();
        for _ in 0..5 {
            phase = self
                .ok(Method::GET, &format!("/vms/{vm}/backups/{bid}"), None)
                .await["phase"]
                .as_str()
                .unwrap()
                .to_string();
            if phase == "ready" {
                break;
            }
        }
        assert_eq!(phase, "ready");
        (bid, b["to_checkpoint_id"].as_str().unwrap().to_string())
    }

    async fn finalize(&self, vm: &str, bid: &str) {
        self.ok(
            Method::POST,
            &format!("/vms/{vm}/backups/{bid}/finalize"),
            Some(json!({})),
        )
        .await;
        for _ in 0..5 {
            let b = self
                .ok(Method::GET, &format!("/vms/{vm}/backups/{bid}"), None)
                .await;
            if b["phase"] == "succeeded" {
                return;
            }
        }
        panic!("backup {bid} did not succeed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_through_the_disk_attachment_keeps_change_tracking() {
    let api = start().await;
    let old = 4 * MIB + 4096;
    let new = 8 * MIB;
    let vm = api
        .admin(
            Method::POST,
            "/ovirt/vms",
            Some(json!({"name": "vm1", "disks": [
                {"size": old, "format": "cow", "fill": [{"offset": 0, "length": MIB, "pattern": "random", "seed": 1}]}]})),
        )
        .await;
    let vm_id = vm["id"].as_str().unwrap().to_string();
    let disk = vm["disks"][0]["id"].as_str().unwrap().to_string();
    let att = format!("/vms/{vm_id}/diskattachments/{disk}");

    // A full backup: checkpoint 1 at the old size. While it runs, the disk
    // cannot be extended.
    let (b1, cp1) = api.backup(&vm_id, &disk, None).await;
    let (s, v) = api
        .put_xml(
            &att,
            &format!("<disk_attachment><disk><provisioned_size>{new}</provisioned_size></disk></disk_attachment>"),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v.contains("backup"), "{v}");
    api.finalize(&vm_id, &b1).await;

    // A snapshot before the extend keeps the old size.
    let snap = api
        .ok(
            Method::POST,
            &format!("/vms/{vm_id}/snapshots"),
            Some(json!({"description": "before", "persist_memorystate": false})),
        )
        .await;
    let snap_id = snap["id"].as_str().unwrap().to_string();

    // Shrinking is refused; the same size changes nothing.
    let (s, v) = api
        .json(
            Method::PUT,
            &att,
            Some(json!({"disk": {"provisioned_size": old - 512}})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = api
        .json(
            Method::PUT,
            &att,
            Some(json!({"disk": {"provisioned_size": old}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The extend, in the real API's XML shape.
    let (s, v) = api
        .put_xml(
            &att,
            &format!("<disk_attachment><disk><provisioned_size>{new}</provisioned_size></disk></disk_attachment>"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v.contains("<disk_attachment"), "{v}");
    let d = api.ok(Method::GET, &format!("/disks/{disk}"), None).await;
    assert_eq!(
        d["provisioned_size"].to_string().trim_matches('"'),
        new.to_string()
    );
    let disks = api.admin(Method::GET, "/disks", None).await;
    let model = disks
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == disk.as_str())
        .unwrap();
    assert_eq!(model["size"], new);
    assert_eq!(model["checkpoints"]["1"]["size"], old);
    let snaps = api
        .ok(
            Method::GET,
            &format!("/vms/{vm_id}/snapshots/{snap_id}/disks"),
            None,
        )
        .await;
    assert_eq!(snaps["disk"][0]["id"], disk.as_str());

    // The guest writes at its old end and in the new tail.
    for (offset, seed) in [(old - 10, 7), (6 * MIB, 8)] {
        api.admin(
            Method::POST,
            &format!("/disks/{disk}/write"),
            Some(json!({"offset": offset, "length": 20, "pattern": "random", "seed": seed})),
        )
        .await;
    }

    // Incremental from checkpoint 1: a new NBD connection sees the new
    // size; the dirty extents cover it, and only written blocks are dirty.
    let (b2, _) = api.backup(&vm_id, &disk, Some(&cp1)).await;
    let tr = api
        .ok(
            Method::POST,
            "/imagetransfers",
            Some(json!({"disk": {"id": disk}, "backup": {"id": b2}, "direction": "download", "format": "raw"})),
        )
        .await;
    let tid = tr["id"].as_str().unwrap().to_string();
    let tr = api
        .ok(Method::GET, &format!("/imagetransfers/{tid}"), None)
        .await;
    let nbd = nbd::client::Client::connect_uri(tr["nbd_url"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(nbd.size(), new);
    let url = tr["transfer_url"].as_str().unwrap().to_string();
    let dirty: Value = api
        .http
        .get(format!("{url}/extents?context=dirty"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = dirty.as_array().unwrap();
    assert_eq!(
        list.iter()
            .map(|e| e["length"].as_u64().unwrap())
            .sum::<u64>(),
        new
    );
    let dirty: Vec<(u64, u64)> = list
        .iter()
        .filter(|e| e["dirty"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    // Block 64 (4 MiB .. 4 MiB + 64 KiB, the old short last block) and
    // block 96 (6 MiB).
    assert_eq!(dirty, [(4 * MIB, 65536), (6 * MIB, 65536)]);
    drop(nbd);
    api.ok(
        Method::POST,
        &format!("/imagetransfers/{tid}/finalize"),
        Some(json!({})),
    )
    .await;
    for _ in 0..5 {
        let t = api
            .ok(Method::GET, &format!("/imagetransfers/{tid}"), None)
            .await;
        if t["phase"] == "finished_success" {
            break;
        }
    }
    api.finalize(&vm_id, &b2).await;

    // The snapshot from before the extend still has the old size when
    // attached to an appliance.
    let app = api
        .admin(
            Method::POST,
            "/ovirt/vms",
            Some(json!({"name": "appliance", "appliance": true})),
        )
        .await;
    let app_id = app["id"].as_str().unwrap().to_string();
    let a = api
        .ok(
            Method::POST,
            &format!("/vms/{app_id}/diskattachments"),
            Some(json!({"disk": {"id": disk, "snapshot": {"id": snap_id}}, "interface": "virtio_scsi", "active": true})),
        )
        .await;
    let file = a["logical_name"].as_str().unwrap().to_string();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), old);
    // A snapshot disk attachment cannot be extended.
    let (s, v) = api
        .json(
            Method::PUT,
            &format!("/vms/{app_id}/diskattachments/{disk}"),
            Some(json!({"disk": {"provisioned_size": 16 * MIB}})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    api.ok(
        Method::DELETE,
        &format!("/vms/{app_id}/diskattachments/{disk}"),
        None,
    )
    .await;
    // Unknown attachment.
    let (s, _) = api
        .json(
            Method::PUT,
            &format!("/vms/{vm_id}/diskattachments/nope"),
            Some(json!({"disk": {"provisioned_size": new}})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
