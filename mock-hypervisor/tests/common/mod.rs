//! Test harness: an in-process mock, an SCP client speaking plain HTTP
//! (reqwest), admin helpers and NBD helpers.
#![allow(dead_code)]

use std::time::Duration;

use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock};
use nbd::client::{Address, Client, ConnectOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const MIB: u64 = 1024 * 1024;

pub struct Harness {
    pub mock: RunningMock,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub scp: Scp,
}

pub struct Scp {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

pub async fn start_with(f: impl FnOnce(&mut MockConfig)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = MockConfig::new(dir.path().join("state"));
    config.scp.task_polls = 1;
    f(&mut config);
    let mock = MockHypervisor::start(config).await.expect("start mock");
    let http = reqwest::Client::new();
    let scp = Scp::login(&http, mock.endpoints().scp_url()).await;
    Harness {
        mock,
        dir,
        http,
        scp,
    }
}

impl Scp {
    pub async fn login(http: &reqwest::Client, base: &str) -> Scp {
        let r: Value = http
            .post(format!("{base}/janus/authenticate"))
            .json(
                &json!({"auth": {"passwordCredentials": {"username": "admin",
                "password": mock_hypervisor::scp::auth::encrypt_password("admin-password")}}}),
            )
            .send()
            .await
            .expect("auth")
            .json()
            .await
            .expect("auth json");
        assert_eq!(r["code"], 0, "{r}");
        Scp {
            base: base.to_string(),
            token: r["data"]["access"]["token"]["id"]
                .as_str()
                .expect("token")
                .to_string(),
            http: http.clone(),
        }
    }

    /// Any call: (HTTP status, envelope).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("Token {}", self.token));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        (status, v)
    }

    /// A call that must succeed: returns `data`.
    pub async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method.clone(), path, body).await;
        assert!(
            status.is_success() && v["code"] == 0,
            "{method} {path}: {status} {v}"
        );
        v["data"].clone()
    }

    pub async fn get(&self, path: &str) -> Value {
        self.ok(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.ok(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Value {
        self.ok(Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Value {
        self.ok(Method::DELETE, path, None).await
    }

    /// Polls a task until it finishes; returns its result.
    pub async fn wait_task(&self, data: &Value) -> Value {
        let id = data["task_id"].as_str().expect("task_id").to_string();
        for _ in 0..100 {
            let t = self.get(&format!("/janus/20180725/tasks/{id}")).await;
            match t["status"].as_str() {
                Some("finish") => return t["entities"].clone(),
                Some("failure") => panic!("task failed: {t}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        panic!("task {id} never finished");
    }

    /// Takes a snapshot; returns (snapshot id, checkpoint id).
    pub async fn snapshot(&self, server: &str) -> (String, u64) {
        let d = self
            .post(
                &format!("/janus/20240725/servers/{server}/snapshots"),
                json!({"name": "backup"}),
            )
            .await;
        let r = self.wait_task(&d).await;
        (
            r["snapshot_id"].as_str().expect("snapshot_id").to_string(),
            r["checkpoint_id"].as_u64().expect("checkpoint_id"),
        )
    }

    /// All changed areas, following `next_offset`.
    pub async fn changed_areas(&self, server: &str, query: &str) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut offset = 0u64;
        loop {
            let d = self
                .get(&format!(
                    "/janus/20240725/servers/{server}/cbt/changed-areas?{query}&offset={offset}"
                ))
                .await;
            for a in d["areas"].as_array().expect("areas") {
                out.push((a["offset"].as_u64().unwrap(), a["length"].as_u64().unwrap()));
            }
            match d["next_offset"].as_u64() {
                Some(n) => offset = n,
                None => return out,
            }
        }
    }
}

impl Harness {
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.mock.endpoints().admin_url)
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method.clone(), self.admin_url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin send");
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "admin {method} {path}: {status} {v}");
        v
    }

    /// Creates an AVAILABLE base image of `size` with text and random data.
    pub async fn base_image(&self, size: u64) -> String {
        let v = self
            .admin(
                Method::POST,
                "/scp/base-images",
                Some(json!({
                    "name": "base", "size": size, "storage_ids": ["storage-local"],
                    "fill": [
                        {"offset": 0, "length": MIB, "pattern": "text", "seed": 1},
                        {"offset": 2 * MIB, "length": MIB, "pattern": "random", "seed": 2},
                    ]
                })),
            )
            .await;
        v["id"].as_str().expect("id").to_string()
    }

    /// Creates a server; returns (server id, disk ids).
    pub async fn server(&self, body: Value) -> (String, Vec<String>) {
        let v = self.admin(Method::POST, "/scp/servers", Some(body)).await;
        let disks = v["disks"]
            .as_array()
            .expect("disks")
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect();
        (v["id"].as_str().unwrap().to_string(), disks)
    }

    pub async fn guest_write(&self, disk: &str, offset: u64, length: u64, seed: u64) {
        self.admin(
            Method::POST,
            &format!("/disks/{disk}/write"),
            Some(json!({"offset": offset, "length": length, "pattern": "random", "seed": seed})),
        )
        .await;
    }

    pub async fn disk_sha(&self, disk: &str, snapshot: Option<&str>) -> String {
        let q = snapshot
            .map(|s| format!("?snapshot_id={s}"))
            .unwrap_or_default();
        self.admin(Method::GET, &format!("/disks/{disk}/sha256{q}"), None)
            .await["sha256"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn nbd(&self, export: &str, contexts: &[&str]) -> Client {
        let ep = &self.mock.endpoints().nbd;
        let mut opts = ConnectOptions::new(
            Address::Tcp {
                host: ep.host.clone(),
                port: ep.port,
            },
            export,
        );
        for c in contexts {
            opts = opts.meta_context(*c);
        }
        Client::connect(&opts).await.expect("nbd connect")
    }

    pub async fn objects(&self) -> Value {
        self.admin(Method::GET, "/objects", None).await
    }
}

/// Reads a whole export the way a backup does: only allocated extents,
/// zeroes elsewhere; returns (sha256 of the full content, bytes read).
pub async fn read_allocated(client: &Client) -> (String, u64) {
    let size = client.size();
    let mut h = Sha256::new();
    let mut pos = 0u64;
    let mut read = 0u64;
    while pos < size {
        let len = (size - pos).min(4 * MIB);
        let extents = client
            .block_status(pos, len, "base:allocation")
            .await
            .expect("block status");
        let mut p = pos;
        for e in extents {
            let l = e.length.min(pos + len - p);
            if l == 0 {
                break;
            }
            if e.flags & 1 == 0 {
                let mut off = p;
                while off < p + l {
                    let n = (p + l - off).min(MIB);
                    let data = client.read(off, n as usize).await.expect("read");
                    h.update(&data);
                    read += n;
                    off += n;
                }
            } else {
                h.update(vec![0u8; l as usize]);
            }
            p += l;
        }
        assert!(p > pos, "block status made no progress at {pos}");
        pos = p;
    }
    (hex(&h.finalize()), read)
}

pub fn sha_of(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
