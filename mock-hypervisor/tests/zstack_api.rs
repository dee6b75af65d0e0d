//! The ZStack module over HTTP: login, API jobs, queries, the image
//! lifecycle, exports with Range, AddImage from URLs, quota, demo seed.

use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock, Seed};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha512};

const MIB: u64 = 1 << 20;

struct Api {
    http: reqwest::Client,
    base: String,
    admin: String,
    session: String,
}

impl Api {
    async fn login(mock: &RunningMock) -> Api {
        let ep = mock.endpoints();
        let z = &ep.platforms["zstack"];
        let base = z["base_url"].as_str().unwrap().to_owned();
        let http = reqwest::Client::new();
        let hash = mock_hypervisor::disk::hex(&Sha512::digest(z["password"].as_str().unwrap()));
        let r = http
            .put(format!("{base}/v1/accounts/login"))
            .json(&json!({"logInByAccount": {"accountName": z["account"], "password": hash}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        Api {
            http,
            base,
            admin: ep.admin_url.clone(),
            session: v["inventory"]["uuid"].as_str().unwrap().to_owned(),
        }
    }

    async fn raw(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}/v1{path}", self.base)
        };
        let mut r = self
            .http
            .request(method, url)
            .header("Authorization", format!("OAuth {}", self.session));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (s, v) = self.raw(Method::GET, path, None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        v
    }

    /// A job call: returns (final status, body) after polling.
    async fn job(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (s, v) = self.raw(method, path, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{path}: {v}");
        let loc = v["location"].as_str().unwrap().to_owned();
        let mut polls = 0;
        loop {
            let (s, v) = self.raw(Method::GET, &loc, None).await;
            if s != StatusCode::ACCEPTED {
                assert!(polls >= 1, "a job answers 202 at least once");
                return (s, v);
            }
            polls += 1;
            assert!(polls < 500, "job never finished");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.job(method, path, body).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        v
    }

    async fn admin(&self, method: Method, path: &str, body: Value) -> Value {
        let r = self
            .http
            .request(method, format!("{}/zstack{path}", self.admin))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}");
        r.json().await.unwrap()
    }
}

async fn start(seed: bool) -> (tempfile::TempDir, RunningMock) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = MockConfig::new(dir.path().join("m"));
    if seed {
        c.seed = Some(Seed::Demo);
    }
    let mock = MockHypervisor::start(c).await.unwrap();
    (dir, mock)
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let (_d, mock) = start(false).await;
    let base = mock.endpoints().platforms["zstack"]["base_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let http = reqwest::Client::new();
    // No Authorization header: RestServer's RestException, 400 text.
    let r = http.get(format!("{base}/v1/images")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.text().await.unwrap(), "missing header 'Authorization'");
    // An unknown session fails the API: 503 with ID.1001.
    let r = http
        .get(format!("{base}/v1/images"))
        .header("Authorization", "OAuth 0123456789abcdef0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "ID.1001");
    let r = http
        .put(format!("{base}/v1/accounts/login"))
        .json(&json!({"logInByAccount": {"accountName": "admin", "password": "plain-text"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "ID.1000");
    let api = Api::login(&mock).await;
    let (s, _) = api
        .raw(
            Method::DELETE,
            &format!("/accounts/sessions/{}", api.session),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, v) = api.raw(Method::GET, "/images", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "ID.1001", "{v}");
}

#[tokio::test]
async fn demo_seed_shares_one_cached_image() {
    let (_d, mock) = start(true).await;
    let api = Api::login(&mock).await;
    let vms = api.get("/vm-instances").await["inventories"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(vms.len(), 2);
    let roots: Vec<Value> = vms
        .iter()
        .flat_map(|v| v["allVolumes"].as_array().unwrap().clone())
        .filter(|v| v["type"] == "Root")
        .collect();
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[0]["rootImageUuid"], roots[1]["rootImageUuid"]);
    let data = api.get("/volumes?q=type=Data").await["inventories"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(data, 1);
    let ps = api.get("/primary-storage").await;
    assert_eq!(
        ps["inventories"][0]["cachedImageUuids"][0],
        roots[0]["rootImageUuid"]
    );
}

#[tokio::test]
async fn image_lifecycle_export_range_and_add_from_url() {
    let (_d, mock) = start(true).await;
    let api = Api::login(&mock).await;
    let bss: Vec<String> = api.get("/backup-storage").await["inventories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["uuid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bss.len(), 2);
    let img = api.get("/images?q=name=centos7-zs&q=status=Ready").await["inventories"][0].clone();
    let uuid = img["uuid"].as_str().unwrap().to_owned();
    assert_eq!(img["backupStorageRefs"].as_array().unwrap().len(), 2);
    assert_eq!(
        api.get("/images?q=name~=centos%&count=true").await["total"],
        1
    );
    assert_eq!(
        api.get("/images?q=status!=Ready").await["inventories"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Export from backup storage: ranged reads, then the whole image.
    let e = api
        .ok(
            Method::PUT,
            &format!("/backup-storage/{}/actions", bss[0]),
            Some(
                json!({"exportImageFromBackupStorage": {"imageUuid": uuid, "exportFormat": "raw"}}),
            ),
        )
        .await;
    let url = e["imageUrl"].as_str().unwrap().to_owned();
    assert_eq!(e["exportMd5Sum"], img["md5Sum"]);
    let r = api
        .http
        .get(&url)
        .header("Range", "bytes=1048576-1048591")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1048576-1048591/{}", 64 * MIB).as_str()
    );
    assert_eq!(r.bytes().await.unwrap().len(), 16);

    // AddImage from the export URL onto both backup storages, one of them
    // disconnected: succeeds on the other.
    api.admin(
        Method::PUT,
        &format!("/backup-storage/{}/status", bss[1]),
        json!({"status": "Disconnected"}),
    )
    .await;
    let added = api
        .ok(
            Method::POST,
            "/images",
            Some(json!({"params": {"name": "copy", "url": url, "mediaType": "RootVolumeTemplate", "format": "raw",
                "backupStorageUuids": bss}})),
        )
        .await["inventory"]
        .clone();
    assert_eq!(added["status"], "Ready");
    assert_eq!(added["md5Sum"], img["md5Sum"]);
    assert_eq!(added["backupStorageRefs"].as_array().unwrap().len(), 1);
    // Onto the disconnected one only: fails (503 with an error body).
    let (s, v) = api
        .job(
            Method::POST,
            "/images",
            Some(
                json!({"params": {"name": "nowhere", "url": url, "backupStorageUuids": [bss[1]]}}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["error"]["details"]
            .as_str()
            .unwrap()
            .contains("Disconnected")
    );
    api.admin(
        Method::PUT,
        &format!("/backup-storage/{}/status", bss[1]),
        json!({"status": "Connected"}),
    )
    .await;
    api.ok(
        Method::DELETE,
        &format!("/backup-storage/{}/exported-images/{uuid}", bss[0]),
        None,
    )
    .await;
    let r = api.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Delete from one backup storage, then all; recover; delete; expunge.
    let path = format!("/images/{uuid}");
    api.ok(
        Method::DELETE,
        &format!("{path}?backupStorageUuids={}", bss[0]),
        None,
    )
    .await;
    let i = api.get(&path).await["inventories"][0].clone();
    assert_eq!(i["status"], "Ready");
    assert_eq!(i["backupStorageRefs"].as_array().unwrap().len(), 1);
    api.ok(
        Method::DELETE,
        &format!("{path}?deleteMode=Permissive"),
        None,
    )
    .await;
    assert_eq!(api.get(&path).await["inventories"][0]["status"], "Deleted");
    let rec = api
        .ok(
            Method::PUT,
            &format!("{path}/actions"),
            Some(json!({"recoverImage": {}})),
        )
        .await;
    assert_eq!(rec["inventory"]["status"], "Ready");
    assert_eq!(
        rec["inventory"]["backupStorageRefs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (s, _) = api
        .job(
            Method::PUT,
            &format!("{path}/actions"),
            Some(json!({"expungeImage": {}})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "expunge needs Deleted");
    let dis = api
        .ok(
            Method::PUT,
            &format!("{path}/actions"),
            Some(json!({"changeImageState": {"stateEvent": "disable"}})),
        )
        .await;
    assert_eq!(dis["inventory"]["state"], "Disabled");
    // Everything else a VM needs is there: the image is what is refused.
    let l3 = api.get("/l3-networks").await["inventories"][0]["uuid"].clone();
    let (s, v) = api
        .job(
            Method::POST,
            "/vm-instances",
            Some(json!({"params": {
                "name": "x",
                "imageUuid": uuid,
                "cpuNum": 1,
                "memorySize": 1u64 << 30,
                "l3NetworkUuids": [l3],
            }})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["error"]["details"].as_str().unwrap().contains("Disabled"),
        "{v}"
    );
    api.ok(Method::DELETE, &path, None).await;
    api.ok(
        Method::PUT,
        &format!("{path}/actions"),
        Some(json!({"expungeImage": {}})),
    )
    .await;
    // A query by uuid of an expunged image: empty, as ZStack queries are.
    let (s, v) = api.raw(Method::GET, &path, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["inventories"], json!([]), "{v}");
    // The VMs made from it still run on the image cache.
    let o = api
        .http
        .get(format!("{}/zstack/objects", api.admin))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert!(o["image_cache"].get(&uuid).is_some());
}

#[tokio::test]
async fn snapshots_templates_quota_and_faults() {
    let (_d, mock) = start(true).await;
    let api = Api::login(&mock).await;
    let vm = api.get("/vm-instances?q=name=zs-vm-2").await["inventories"][0].clone();
    let data = vm["allVolumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["type"] == "Data")
        .unwrap()
        .clone();
    let snap = api
        .ok(
            Method::POST,
            &format!(
                "/volumes/{}/volume-snapshots",
                data["uuid"].as_str().unwrap()
            ),
            Some(json!({"params": {"name": "s1"}})),
        )
        .await["inventory"]
        .clone();
    let sid = snap["uuid"].as_str().unwrap();
    // A root volume template from a data volume snapshot is refused.
    let (s, _) = api
        .job(
            Method::POST,
            &format!("/images/root-volume-templates/from/volume-snapshots/{sid}"),
            Some(json!({"params": {"name": "t"}})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let t = api
        .ok(
            Method::POST,
            &format!("/images/data-volume-templates/from/volume-snapshots/{sid}"),
            Some(json!({"params": {"name": "t"}})),
        )
        .await["inventory"]
        .clone();
    assert_eq!(t["mediaType"], "DataVolumeTemplate");
    assert_eq!(t["url"], format!("volumeSnapshot://{sid}"));
    assert_eq!(t["size"], 32 * MIB);

    // Quota: 2 private images exist; at 2 the next template is refused.
    api.admin(Method::PUT, "/quota", json!({"image_num": 2}))
        .await;
    let q = api.get("/accounts/quotas?q=name=image.num").await;
    assert_eq!(q["inventories"][0]["value"], 2);
    let (s, v) = api
        .job(
            Method::POST,
            &format!("/images/data-volume-templates/from/volume-snapshots/{sid}"),
            Some(json!({"params": {"name": "t2"}})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["error"]["details"]
            .as_str()
            .unwrap()
            .contains("image.num")
    );

    // Job polling 503 once.
    api.admin(
        Method::POST,
        "/faults",
        json!({"kind": "job_poll_503", "action": "DeleteVolumeSnapshot", "times": 1}),
    )
    .await;
    let (s, v) = api
        .job(Method::DELETE, &format!("/volume-snapshots/{sid}"), None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "SYS.1006");
    assert_eq!(
        api.get("/volume-snapshots").await["inventories"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}
