//! Bad input, authentication, injected faults, lease expiry, NBDSSL,
//! restart persistence and the demo seed.

use crate::common;

use std::time::{Duration, Instant};

use common::{MIB, Scp, read_allocated, start, start_with};
use mock_hypervisor::{MockConfig, MockHypervisor, Seed};
use nbd::client::{Address, Client, ConnectOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_error_envelope() {
    let h = start().await;
    let scp = &h.scp;
    let base = &scp.base;
    // Authentication.
    let r = h
        .http
        .post(format!("{base}/janus/authenticate"))
        .json(
            &json!({"auth": {"passwordCredentials": {"username": "admin",
            "password": mock_hypervisor::scp::auth::encrypt_password("wrong")}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], 40100);
    let r = h
        .http
        .get(format!("{base}/janus/20250725/servers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = h
        .http
        .get(format!("{base}/janus/20250725/servers"))
        .header("Authorization", "Token nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let pk: Value = h
        .http
        .get(format!("{base}/janus/public-key"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        pk["data"]["public_key"],
        mock_hypervisor::scp::auth::public_modulus_hex().as_str()
    );

    // Malformed bodies, missing fields, wrong types, unknown objects.
    let raw = h
        .http
        .post(format!("{base}/janus/20250725/servers"))
        .header("Authorization", format!("Token {}", scp.token))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    assert_eq!(raw.json::<Value>().await.unwrap()["code"], 40000);
    let cases: Vec<(Method, &str, Option<Value>, u16)> = vec![
        (
            Method::POST,
            "/janus/20250725/servers",
            Some(json!({"name": "x"})),
            400,
        ),
        (
            Method::POST,
            "/janus/20250725/servers",
            Some(json!({"name": "x", "disks": [{"size": 1000}]})),
            400,
        ),
        (
            Method::POST,
            "/janus/20250725/servers",
            Some(json!({"name": "x", "disks": [{"size": -1}]})),
            400,
        ),
        (
            Method::POST,
            "/janus/20250725/servers",
            Some(json!({"name": "x", "disks": [{"size": 1048576, "base_image_id": "nope"}]})),
            404,
        ),
        (Method::GET, "/janus/20250725/servers/nope", None, 404),
        (
            Method::POST,
            "/janus/20240725/servers/nope/snapshots",
            Some(json!({})),
            404,
        ),
        (
            Method::GET,
            "/janus/20240725/servers/nope/cbt/changed-areas?snapshot_id=x",
            None,
            404,
        ),
        (
            Method::GET,
            "/janus/20240725/servers/nope/cbt/changed-areas?checkpoint_id=-3",
            None,
            400,
        ),
        (
            Method::POST,
            "/janus/20180725/base-images",
            Some(json!({"name": "b", "size": 0})),
            400,
        ),
        (
            Method::PUT,
            "/janus/20180725/base-images/nope",
            Some(json!({"status": "AVAILABLE"})),
            404,
        ),
        (
            Method::POST,
            "/janus/20240725/backup-resources",
            Some(json!({"type": "Backup"})),
            400,
        ),
        (
            Method::POST,
            "/janus/20240725/backup-resources",
            Some(json!({"type": "Weird", "server_id": "x"})),
            400,
        ),
        (Method::GET, "/janus/20180725/tasks/nope", None, 404),
        (
            Method::POST,
            "/janus/20250725/servers",
            Some(json!({"name": "huge", "disks": [{"size": 1u64 << 60}]})),
            400,
        ),
        (
            Method::POST,
            "/janus/20180725/base-images",
            Some(json!({"name": "huge", "size": 1u64 << 60})),
            400,
        ),
        (
            Method::GET,
            "/janus/20250725/servers?page_num=abc",
            None,
            400,
        ),
        (
            Method::PUT,
            "/janus/20240725/servers/x/cbt/status",
            Some(json!({"enable": "yes"})),
            400,
        ),
        (Method::GET, "/janus/20180725/no-such-api", None, 404),
        (
            Method::POST,
            "/janus/20190725/custom-attributes/bindings/actions/bulk-create",
            Some(json!({"bindings": 5})),
            400,
        ),
    ];
    for (m, path, body, want) in cases {
        let (status, v) = scp.call(m.clone(), path, body).await;
        assert_eq!(status.as_u16(), want, "{m} {path}: {v}");
        assert_ne!(v["code"], 0, "{m} {path}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    h.mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_http_and_nbd_faults_and_lease_expiry() {
    let h = start().await;
    let scp = &h.scp;
    let (vm, disks) = h
        .server(json!({"name": "vm", "disks": [{"size": 2 * MIB,
            "fill": [{"offset": 0, "length": 2 * MIB, "pattern": "random", "seed": 3}]}]}))
        .await;

    // HTTP error once, then success; an HTTP-200 error; latency.
    h.admin(
        Method::POST,
        "/faults/http",
        Some(json!({"method": "POST", "path": "/snapshots", "status": 503, "code": 50300, "message": "busy", "times": 1})),
    )
    .await;
    let path = format!("/janus/20240725/servers/{vm}/snapshots");
    let (status, v) = scp.call(Method::POST, &path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["code"], 50300);
    let (snap, _) = scp.snapshot(&vm).await;
    h.admin(
        Method::POST,
        "/faults/http",
        Some(json!({"path": "/servers/{server_id}/cbt/status", "status": 200, "code": 12345, "times": 1})),
    )
    .await;
    let (status, v) = scp
        .call(
            Method::GET,
            &format!("/janus/20240725/servers/{vm}/cbt/status"),
            None,
        )
        .await;
    assert_eq!((status, v["code"].clone()), (StatusCode::OK, json!(12345)));
    h.admin(
        Method::POST,
        "/faults/http",
        Some(json!({"path": "/system/version", "latency_ms": 200, "times": 1})),
    )
    .await;
    let t = Instant::now();
    scp.get("/janus/20180725/system/version").await;
    assert!(t.elapsed() >= Duration::from_millis(200));

    // NBD read error after 1 MiB, then a disconnect.
    let lease = scp
        .post("/janus/20240725/backup-resources", json!({"server_id": vm}))
        .await;
    let lid = lease["id"].as_str().unwrap().to_string();
    let exp = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            json!({"snapshot_id": snap}),
        )
        .await;
    let name = exp["export_name"].as_str().unwrap().to_string();
    h.admin(
        Method::POST,
        "/faults/nbd",
        Some(json!({"export": name, "kind": "read_error", "after_bytes": MIB, "times": 1})),
    )
    .await;
    let c = h.nbd(&name, &[]).await;
    c.read(0, MIB as usize).await.unwrap();
    assert!(c.read(MIB, 4096).await.is_err());
    let c = h.nbd(&name, &[]).await;
    c.read(MIB, 4096).await.unwrap();
    h.admin(
        Method::POST,
        "/faults/nbd",
        Some(json!({"export": name, "kind": "disconnect"})),
    )
    .await;
    assert!(c.read(0, 4096).await.is_err());
    h.admin(Method::DELETE, "/faults", None).await;
    assert!(
        c.read(0, 4096).await.is_err(),
        "a disconnected export stays dead"
    );

    // Lease expiry aborts the backup: exports stop serving.
    let exp = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            json!({"snapshot_id": snap}),
        )
        .await;
    let c = h.nbd(exp["export_name"].as_str().unwrap(), &[]).await;
    c.read(0, 4096).await.unwrap();
    h.admin(
        Method::POST,
        &format!("/scp/backup-resources/{lid}/expire"),
        None,
    )
    .await;
    assert!(c.read(0, 4096).await.is_err());
    let (status, v) = scp
        .call(
            Method::PUT,
            &format!("/janus/20240725/backup-resources/{lid}"),
            Some(json!({"remain_time": 60})),
        )
        .await;
    assert_eq!((status, v["code"].clone()), (StatusCode::OK, json!(60006)));
    let o = h.objects().await;
    assert_eq!(o["exports"].as_array().unwrap().len(), 0);
    assert_eq!(
        o["platforms"]["scp"]["backup_resources"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Real expiry by time.
    let lease = scp
        .post(
            "/janus/20240725/backup-resources",
            json!({"server_id": vm, "remain_time": 1}),
        )
        .await;
    let lid = lease["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (_, v) = scp
        .call(
            Method::GET,
            &format!("/janus/20240725/backup-resources/{lid}"),
            None,
        )
        .await;
    assert_eq!(v["code"], 60006);
    let _ = disks;
    h.mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdssl_export_reads_over_tls() {
    let h = start_with(|c| {
        c.tls_dir = Some(c.state_dir.join("tls"));
        c.nbd_tls_required = true;
    })
    .await;
    let scp = &h.scp;
    let (vm, disks) = h
        .server(json!({"name": "vm", "disks": [{"size": MIB,
            "fill": [{"offset": 0, "length": 65536, "pattern": "text", "seed": 3}]}]}))
        .await;
    let (snap, _) = scp.snapshot(&vm).await;
    let lease = scp
        .post("/janus/20240725/backup-resources", json!({"server_id": vm}))
        .await;
    let lid = lease["id"].as_str().unwrap();
    let (status, _) = scp
        .call(
            Method::POST,
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            Some(json!({"snapshot_id": snap, "transport": "nbd"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "TLS is required");
    let exp = scp
        .post(
            &format!("/janus/20240725/backup-resources/{lid}/exports"),
            json!({"snapshot_id": snap, "transport": "nbdssl"}),
        )
        .await;
    assert!(exp["uri"].as_str().unwrap().starts_with("nbds://"));
    let ep = h.mock.endpoints();
    let ca_dir = ep.nbd.ca_cert.as_ref().unwrap().parent().unwrap();
    let tls = nbd::tls::TlsClientConfig::from_dir(ca_dir).unwrap();
    let opts = ConnectOptions::new(
        Address::Tcp {
            host: ep.nbd.host.clone(),
            port: ep.nbd.port,
        },
        exp["export_name"].as_str().unwrap(),
    )
    .meta_context("base:allocation")
    .tls(tls);
    let c = Client::connect(&opts).await.unwrap();
    let (sha, read) = read_allocated(&c).await;
    assert_eq!(sha, h.disk_sha(&disks[0], Some(&snap)).await);
    assert_eq!(read, 65536);
    h.mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restart_and_demo_seed_is_realistic() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = MockConfig::new(dir.path().join("state"));
    config.seed = Some(Seed::Demo);
    let mock = MockHypervisor::start(config.clone()).await.unwrap();
    let http = reqwest::Client::new();
    let scp = Scp::login(&http, mock.endpoints().scp_url()).await;
    let servers = scp.get("/janus/20250725/servers").await;
    let names: Vec<&str> = servers["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for n in ["linked-vm-1", "linked-vm-2", "full-vm", "backup-proxy"] {
        assert!(names.contains(&n), "{names:?}");
    }
    let linked: Vec<&Value> = servers["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["is_linked"] == true)
        .collect();
    assert_eq!(linked.len(), 2);
    assert_eq!(
        linked[0]["disks"][0]["base_image_id"],
        linked[1]["disks"][0]["base_image_id"]
    );
    let full = servers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "full-vm")
        .unwrap();
    assert_eq!(full["disks"].as_array().unwrap().len(), 2);
    let vm = full["id"].as_str().unwrap().to_string();
    let disk = full["disks"][1]["id"].as_str().unwrap().to_string();
    let (snap, _) = scp.snapshot(&vm).await;
    let admin = mock.endpoints().admin_url.clone();
    let sha = |url: String| {
        let http = http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["sha256"]
                .clone()
        }
    };
    let live = sha(format!("{admin}/disks/{disk}/sha256")).await;
    let frozen = sha(format!("{admin}/disks/{disk}/sha256?snapshot_id={snap}")).await;
    mock.shutdown().await;

    config.seed = Some(Seed::Demo); // seeding again must not duplicate
    let mock = MockHypervisor::start(config).await.unwrap();
    let scp = Scp::login(&http, mock.endpoints().scp_url()).await;
    let servers = scp.get("/janus/20250725/servers").await;
    assert_eq!(servers["total_size"], 4);
    let s = scp
        .get(&format!("/janus/20240725/servers/{vm}/snapshots/{snap}"))
        .await;
    assert_eq!(s["id"], snap.as_str());
    let admin = mock.endpoints().admin_url.clone();
    assert_eq!(sha(format!("{admin}/disks/{disk}/sha256")).await, live);
    assert_eq!(
        sha(format!("{admin}/disks/{disk}/sha256?snapshot_id={snap}")).await,
        frozen
    );
    mock.shutdown().await;
}
