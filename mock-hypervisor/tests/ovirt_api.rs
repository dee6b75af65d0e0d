//! oVirt emulation: auth, XML and JSON, the snapshot-attach flow with
//! appliance files, the 4.4 backup flow (phases, checkpoints, transfers,
//! image server), upload, faults and the objects listing.

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

    async fn xml(&self, method: Method, path: &str, body: Option<&str>) -> (StatusCode, String) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r
                .header("Content-Type", "application/xml")
                .body(b.to_string());
        }
        let resp = r.send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    async fn admin(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!(
                "{}/admin/ovirt{path}",
                self.mock.endpoints().http_url
            ))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}");
        r.json().await.unwrap()
    }

    async fn objects(&self) -> Value {
        self.http
            .get(format!(
                "{}/admin/ovirt/objects",
                self.mock.endpoints().http_url
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn vm_and_appliance(&self) -> (String, Vec<String>, String) {
        let vm = self
            .admin(
                "/vms",
                json!({"name": "vm1", "disks": [
                    {"size": 4 * MIB, "format": "cow", "fill": [{"offset": 0, "length": MIB, "pattern": "random", "seed": 1}]},
                    {"size": 2 * MIB, "format": "raw"}]}),
            )
            .await;
        let app = self
            .admin("/vms", json!({"name": "appliance", "appliance": true}))
            .await;
        let disks = vm["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect();
        (
            vm["id"].as_str().unwrap().to_string(),
            disks,
            app["id"].as_str().unwrap().to_string(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_required_and_formats_negotiated() {
    let api = start().await;
    let (vm, disks, _) = api.vm_and_appliance().await;
    let r = api
        .http
        .get(format!("{}/vms", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let bad = api
        .http
        .post(
            api.mock.endpoints().platforms["ovirt"]["sso_url"]
                .as_str()
                .unwrap(),
        )
        .body("grant_type=password&username=admin%40internal&password=nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);

    // JSON: numbers and booleans as strings, collections as {"disk": [..]}.
    let d = api
        .ok(Method::GET, &format!("/disks/{}", disks[0]), None)
        .await;
    assert_eq!(d["provisioned_size"], json!((4 * MIB).to_string()));
    assert_eq!(d["sparse"], "true");
    assert_eq!(d["backup"], "incremental");
    let list = api
        .ok(Method::GET, &format!("/vms/{vm}/diskattachments"), None)
        .await;
    assert_eq!(list["disk_attachment"].as_array().unwrap().len(), 2);
    // XML by default, id as attribute.
    let (s, x) = api.xml(Method::GET, &format!("/vms/{vm}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        x.contains(&format!(
            "<vm href=\"/ovirt-engine/api/vms/{vm}\" id=\"{vm}\">"
        )),
        "{x}"
    );
    // all_content carries the OVF.
    let full = api
        .ok(Method::GET, &format!("/vms/{vm}?all_content=true"), None)
        .await;
    let ovf = full["initialization"]["configuration"]["data"]
        .as_str()
        .unwrap();
    assert!(ovf.contains("ovf:Envelope") && ovf.contains(&disks[0]));
    // Malformed XML body: 400 with a fault.
    let (s, x) = api
        .xml(
            Method::POST,
            &format!("/vms/{vm}/snapshots"),
            Some("<snapshot><description>"),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(x.contains("<fault>") && x.contains("malformed XML"), "{x}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_attach_flow_materialises_and_removes_appliance_files() {
    let api = start().await;
    let (vm, disks, app) = api.vm_and_appliance().await;
    let (s, x) = api
        .xml(
            Method::POST,
            &format!("/vms/{vm}/snapshots"),
            Some("<snapshot><description>b1</description><persist_memorystate>false</persist_memorystate></snapshot>"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{x}");
    assert!(
        x.contains("<snapshot_status>locked</snapshot_status>"),
        "{x}"
    );
    let sid = x
        .split("id=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    // Attaching a locked snapshot is refused; one poll makes it ok.
    let attach = |d: &str| {
        format!(
            "<disk_attachment><disk id=\"{d}\"><snapshot id=\"{sid}\"/></disk><active>true</active><bootable>false</bootable><interface>virtio</interface></disk_attachment>"
        )
    };
    let (s, _) = api
        .xml(
            Method::POST,
            &format!("/vms/{app}/diskattachments"),
            Some(&attach(&disks[0])),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let snap = api
        .ok(Method::GET, &format!("/vms/{vm}/snapshots/{sid}"), None)
        .await;
    assert_eq!(snap["snapshot_status"], "ok");
    let sd = api
        .ok(
            Method::GET,
            &format!("/vms/{vm}/snapshots/{sid}/disks"),
            None,
        )
        .await;
    assert_eq!(sd["disk"].as_array().unwrap().len(), 2);
    // The guest writes after the snapshot; the attached file is frozen.
    let before = api
        .http
        .get(format!(
            "{}/admin/disks/{}/sha256",
            api.mock.endpoints().http_url,
            disks[0]
        ))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["sha256"]
        .clone();
    api.http
        .post(format!(
            "{}/admin/disks/{}/write",
            api.mock.endpoints().http_url,
            disks[0]
        ))
        .json(&json!({"offset": 0, "length": MIB, "pattern": "text", "seed": 3}))
        .send()
        .await
        .unwrap();
    let (s, x) = api
        .xml(
            Method::POST,
            &format!("/vms/{app}/diskattachments"),
            Some(&attach(&disks[0])),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{x}");
    let path = x
        .split("<logical_name>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_string();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len() as u64, 4 * MIB);
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(json!(sha), before);
    // The snapshot cannot go while its disk is attached.
    let (s, v) = api
        .json(Method::DELETE, &format!("/vms/{vm}/snapshots/{sid}"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        api.objects().await["backup_attachments"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    api.ok(
        Method::DELETE,
        &format!("/vms/{app}/diskattachments/{}", disks[0]),
        None,
    )
    .await;
    assert!(!std::path::Path::new(&path).exists());
    api.ok(Method::DELETE, &format!("/vms/{vm}/snapshots/{sid}"), None)
        .await;
    let o = api.objects().await;
    for k in ["snapshots", "backup_attachments", "appliance_files"] {
        assert_eq!(o[k], json!([]), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_flow_with_checkpoints_transfers_and_dirty_extents() {
    let api = start().await;
    let (vm, disks, _) = api.vm_and_appliance().await;
    let b = api
        .ok(
            Method::POST,
            &format!("/vms/{vm}/backups"),
            Some(json!({"disks": {"disk": [{"id": disks[0]}]}})),
        )
        .await;
    assert_eq!(b["phase"], "initializing");
    let bid = b["id"].as_str().unwrap().to_string();
    let cp1 = b["to_checkpoint_id"].as_str().unwrap().to_string();
    // A transfer needs a ready backup.
    let t = json!({"disk": {"id": disks[0]}, "backup": {"id": bid}, "direction": "download", "format": "raw"});
    let (s, _) = api
        .json(Method::POST, "/imagetransfers", Some(t.clone()))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let mut phase = String::new();
    for _ in 0..5 {
        phase = api
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
    let tr = api.ok(Method::POST, "/imagetransfers", Some(t)).await;
    let tid = tr["id"].as_str().unwrap().to_string();
    let tr = api
        .ok(Method::GET, &format!("/imagetransfers/{tid}"), None)
        .await;
    assert_eq!(tr["phase"], "transferring");
    assert!(tr["nbd_url"].as_str().unwrap().starts_with("nbd://"));
    let url = tr["transfer_url"].as_str().unwrap().to_string();
    // Ranged GET and zero extents; dirty extents need an incremental.
    let r = api
        .http
        .get(&url)
        .header("Range", "bytes=0-1023")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().len(), 1024);
    let zero: Value = api
        .http
        .get(format!("{url}/extents?context=zero"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        zero[0],
        json!({"start": 0, "length": MIB, "zero": false, "hole": false})
    );
    let r = api
        .http
        .get(format!("{url}/extents?context=dirty"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The backup cannot be finalized before its transfer.
    let (s, _) = api
        .json(
            Method::POST,
            &format!("/vms/{vm}/backups/{bid}/finalize"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    api.ok(
        Method::POST,
        &format!("/imagetransfers/{tid}/finalize"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        api.ok(Method::GET, &format!("/imagetransfers/{tid}"), None)
            .await["phase"],
        "finished_success"
    );
    api.ok(
        Method::POST,
        &format!("/vms/{vm}/backups/{bid}/finalize"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        api.ok(Method::GET, &format!("/vms/{vm}/backups/{bid}"), None)
            .await["phase"],
        "succeeded"
    );
    let cps = api
        .ok(Method::GET, &format!("/vms/{vm}/checkpoints"), None)
        .await;
    assert_eq!(cps["checkpoint"][0]["id"], json!(cp1));
    assert_eq!(cps["checkpoint"][0]["state"], "created");

    // Incremental: 64 KiB written at 2 MiB is the only dirty extent.
    api.http
        .post(format!(
            "{}/admin/disks/{}/write",
            api.mock.endpoints().http_url,
            disks[0]
        ))
        .json(&json!({"offset": 2 * MIB, "length": 65536, "pattern": "random", "seed": 5}))
        .send()
        .await
        .unwrap();
    let b2 = api
        .ok(
            Method::POST,
            &format!("/vms/{vm}/backups"),
            Some(json!({"from_checkpoint_id": cp1, "disks": {"disk": [{"id": disks[0]}]}})),
        )
        .await;
    let bid2 = b2["id"].as_str().unwrap().to_string();
    for _ in 0..3 {
        api.ok(Method::GET, &format!("/vms/{vm}/backups/{bid2}"), None)
            .await;
    }
    let tr = api
        .ok(
            Method::POST,
            "/imagetransfers",
            Some(json!({"disk": {"id": disks[0]}, "backup": {"id": bid2}, "direction": "download", "format": "raw"})),
        )
        .await;
    let tid2 = tr["id"].as_str().unwrap().to_string();
    let tr = api
        .ok(Method::GET, &format!("/imagetransfers/{tid2}"), None)
        .await;
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
    let dirty: Vec<&Value> = dirty
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["dirty"] == true)
        .collect();
    assert_eq!(
        dirty,
        [&json!({"start": 2 * MIB, "length": 65536, "dirty": true})]
    );
    api.ok(
        Method::POST,
        &format!("/imagetransfers/{tid2}/cancel"),
        Some(json!({})),
    )
    .await;
    api.ok(
        Method::POST,
        &format!("/vms/{vm}/backups/{bid2}/finalize"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        api.ok(Method::GET, &format!("/vms/{vm}/backups/{bid2}"), None)
            .await["phase"],
        "succeeded"
    );
    // Invalidated checkpoints refuse incrementals.
    api.admin(&format!("/vms/{vm}/checkpoints/invalidate"), json!({}))
        .await;
    let (s, v) = api
        .json(
            Method::POST,
            &format!("/vms/{vm}/backups"),
            Some(json!({"from_checkpoint_id": cp1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let o = api.objects().await;
    for k in ["active_backups", "active_transfers", "exports"] {
        assert_eq!(o[k], json!([]), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_vm_from_ovf_and_upload_with_ranged_put() {
    let api = start().await;
    let (vm, _, _) = api.vm_and_appliance().await;
    let full = api
        .ok(Method::GET, &format!("/vms/{vm}?all_content=true"), None)
        .await;
    let ovf = full["initialization"]["configuration"]["data"]
        .as_str()
        .unwrap()
        .to_string();
    let new = api
        .ok(
            Method::POST,
            "/vms",
            // The OVF's VM id is vm1's: a new one (engine rules, see
            // mock-hypervisor/src/ovirt/import.rs).
            Some(json!({"name": "copy", "cluster": {"name": "Default"}, "template": {"name": "Blank"},
                "initialization": {"regenerate_ids": true, "configuration": {"type": "ovf", "data": ovf}}})),
        )
        .await;
    let nid = new["id"].as_str().unwrap();
    assert_ne!(nid, vm);
    let back = api
        .ok(Method::GET, &format!("/vms/{nid}?all_content=true"), None)
        .await;
    let data = back["initialization"]["configuration"]["data"]
        .as_str()
        .unwrap();
    assert!(
        data.contains("<Name>copy</Name>") && data.contains(nid),
        "{data}"
    );
    let (s, _) = api
        .json(
            Method::POST,
            "/vms",
            Some(json!({"name": "bad", "cluster": {"name": "Default"},
                "initialization": {"configuration": {"type": "ovf", "data": "<not-ovf"}}})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Disk formats are checked.
    let (s, _) = api
        .json(
            Method::POST,
            "/disks",
            Some(json!({"provisioned_size": "1048576", "format": "vmdk"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let d = api
        .ok(
            Method::POST,
            "/disks",
            Some(json!({"alias": "up", "provisioned_size": "1048576", "format": "cow", "sparse": "true",
                "storage_domains": {"storage_domain": [{"name": "data"}]}})),
        )
        .await;
    let did = d["id"].as_str().unwrap();
    let tr = api
        .ok(
            Method::POST,
            "/imagetransfers",
            Some(json!({"disk": {"id": did}, "direction": "upload", "format": "raw"})),
        )
        .await;
    let tid = tr["id"].as_str().unwrap().to_string();
    let tr = api
        .ok(Method::GET, &format!("/imagetransfers/{tid}"), None)
        .await;
    let url = tr["transfer_url"].as_str().unwrap();
    let r = api
        .http
        .put(url)
        .header("Content-Range", "bytes 4096-4099/*")
        .body(vec![1u8, 2, 3, 4])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = api
        .http
        .get(url)
        .header("Range", "bytes=4096-4099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &[1, 2, 3, 4]);
    api.ok(
        Method::POST,
        &format!("/imagetransfers/{tid}/finalize"),
        Some(json!({})),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_stuck_snapshot_failing_attachment_malformed_answer() {
    let api = start().await;
    let (vm, disks, app) = api.vm_and_appliance().await;
    api.admin(
        "/faults",
        json!({"snapshot_stuck_locked": true, "attach_fail_after": 0,
               "malformed": [{"method": "GET", "path": "/disks", "times": 1}]}),
    )
    .await;
    let (s, v) = api
        .json(Method::GET, &format!("/disks/{}", disks[0]), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.is_string(), "cut answer is not JSON: {v}");
    let snap = api
        .ok(
            Method::POST,
            &format!("/vms/{vm}/snapshots"),
            Some(json!({"persist_memorystate": false})),
        )
        .await;
    let sid = snap["id"].as_str().unwrap();
    for _ in 0..5 {
        let s = api
            .ok(Method::GET, &format!("/vms/{vm}/snapshots/{sid}"), None)
            .await;
        assert_eq!(s["snapshot_status"], "locked");
    }
    api.ok(Method::DELETE, &format!("/vms/{vm}/snapshots/{sid}"), None)
        .await;
    // Live disk attachment fails by injection.
    let d = api
        .ok(
            Method::POST,
            "/disks",
            Some(json!({"provisioned_size": 65536, "format": "raw",
                "storage_domains": {"storage_domain": [{"name": "data"}]}})),
        )
        .await;
    let (s, v) = api
        .json(
            Method::POST,
            &format!("/vms/{app}/diskattachments"),
            Some(json!({"disk": {"id": d["id"]}, "interface": "virtio", "bootable": false})),
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    let o = api.objects().await;
    for k in ["snapshots", "backup_attachments", "appliance_files"] {
        assert_eq!(o[k], json!([]), "{k}");
    }
}
