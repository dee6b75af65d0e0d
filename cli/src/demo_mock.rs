//! The platform part of the demo: the mock hypervisor's demo guests,
//! backed up through their providers, changed by guest writes, backed up
//! incrementally, restored to new VMs, and compared disk by disk (SHA-256
//! of what each guest sees, from the mock's admin API) with the source at
//! backup time.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use engine::{BackupDriver, JobOptions, RestoreDriver, StandardMover};
use provider_api::{BackupProvider, Guest, JobInfo, RestoreTarget, SnapshotId, Target};
use serde_json::{Value, json};

use crate::report::{Row, rows};

/// The mock's admin API.
pub struct Admin {
    http: reqwest::Client,
    url: String,
}

impl Admin {
    pub fn new(url: &str) -> Self {
        Admin {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let r = self.http.get(format!("{}{path}", self.url)).send().await?;
        let status = r.status();
        let v: Value = r.json().await.with_context(|| format!("GET {path}"))?;
        anyhow::ensure!(status.is_success(), "GET {path}: {status} {v}");
        Ok(v)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "POST {path}: {status} {v}");
        Ok(v)
    }

    /// SHA-256 of a disk as its guest sees it.
    pub async fn disk_sha256(&self, disk: &str) -> Result<String> {
        let v = self.get(&format!("/disks/{disk}/sha256")).await?;
        v["sha256"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no sha256 for disk {disk}: {v}"))
    }

    /// The guest writes `percent` of a disk in 1 MiB runs.
    pub async fn guest_writes(&self, disk: &str, size: u64, percent: f64, seed: u64) -> Result<()> {
        let run = 1u64 << 20;
        let runs = ((size as f64 * percent / 100.0) / run as f64)
            .ceil()
            .max(1.0) as u64;
        let slots = (size / run).max(1);
        for i in 0..runs {
            let off = (seed.wrapping_mul(2654435761).wrapping_add(i * 7919)) % slots * run;
            self.post(
                &format!("/disks/{disk}/write"),
                json!({"offset": off, "length": run.min(size - off), "pattern": "random", "seed": seed + i}),
            )
            .await?;
        }
        Ok(())
    }
}

/// Lists a guest's disks (id, size) in volume order from the platform's
/// admin object listing.
pub type DiskLister = Box<dyn Fn(&Value, &str) -> Vec<(String, u64)> + Send + Sync>;

/// One platform's demo guests.
pub struct PlatformRun {
    /// Provider name for the table.
    pub name: &'static str,
    pub provider: Arc<dyn BackupProvider>,
    /// Guests to back up.
    pub guests: Vec<Guest>,
    /// The disks (ids, sizes) of a guest, in volume order.
    pub disks: DiskLister,
    /// Admin path listing the platform's objects.
    pub objects_path: &'static str,
    /// The real id of a restored guest, when the provider reports a
    /// provisional one.
    pub restored_id: Box<dyn Fn(&Guest) -> String + Send + Sync>,
}

/// SCP: every demo VM but the backup proxy.
pub async fn scp(admin: &Admin, endpoints: &Value) -> Result<PlatformRun> {
    let scp = &endpoints["scp"];
    let options = provider_scp::ScpOptions::new(
        scp["base_url"].as_str().unwrap_or_default(),
        scp["username"].as_str().unwrap_or_default(),
        scp["password"].as_str().unwrap_or_default(),
    );
    let provider = Arc::new(provider_scp::ScpProvider::new(options)?);
    let objects = admin.get("/scp/objects").await?;
    let p = provider.clone();
    Ok(PlatformRun {
        name: "scp",
        provider,
        guests: guests_of(&objects, "servers", |s| s["name"] == "backup-proxy"),
        disks: disks_of("servers"),
        objects_path: "/scp/objects",
        restored_id: Box::new(move |g| p.restored_server_id(g).unwrap_or_else(|| g.id.0.clone())),
    })
}

fn disks_of(collection: &'static str) -> DiskLister {
    Box::new(move |objects: &Value, guest: &str| {
        objects[collection]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["id"] == guest)
            .flat_map(|s| s["disks"].as_array().cloned().unwrap_or_default())
            .map(|d| {
                (
                    d["id"].as_str().unwrap_or_default().to_owned(),
                    d["size"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    })
}

fn guests_of(objects: &Value, collection: &str, skip: impl Fn(&Value) -> bool) -> Vec<Guest> {
    objects[collection]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|s| !skip(s))
        .map(|s| Guest {
            id: provider_api::GuestId(s["id"].as_str().unwrap_or_default().to_owned()),
            kind: provider_api::GuestKind::Vm,
            name: s["name"].as_str().map(str::to_owned),
        })
        .collect()
}

/// oVirt: every demo VM but the backup appliance, in the mode the engine
/// supports (incremental on 4.4+).
pub async fn ovirt(admin: &Admin, endpoints: &Value) -> Result<PlatformRun> {
    let ep = &endpoints["ovirt"];
    let mut options = provider_ovirt::OvirtOptions::new(
        ep["base_url"].as_str().unwrap_or_default(),
        ep["username"].as_str().unwrap_or_default(),
        ep["password"].as_str().unwrap_or_default(),
        "backup-appliance",
    );
    options.poll_interval = std::time::Duration::from_millis(50);
    // The engine is HTTPS only, with the mock's CA.
    options.tls_ca = ep["ca_file"].as_str().map(std::path::PathBuf::from);
    // Where the mock's "appliance" shows attached disks (its /dev/disk/by-id).
    if let Some(root) = ep["device_root"].as_str() {
        options.device_root = std::path::PathBuf::from(root);
    }
    let provider = Arc::new(provider_ovirt::OvirtProvider::new(options)?);
    let objects = admin.get("/ovirt/objects").await?;
    Ok(PlatformRun {
        name: "ovirt",
        provider,
        guests: guests_of(&objects, "vms", |v| v["appliance"] == true),
        disks: disks_of("vms"),
        objects_path: "/ovirt/objects",
        restored_id: Box::new(|g| g.id.0.clone()),
    })
}

/// ZStack: every demo VM, through the image export path.
pub async fn zstack(
    admin: &Admin,
    endpoints: &Value,
    work: &std::path::Path,
) -> Result<PlatformRun> {
    let ep = &endpoints["zstack"];
    let mut options = provider_zstack::ZStackOptions::new(
        ep["base_url"].as_str().unwrap_or_default(),
        ep["account"].as_str().unwrap_or_default(),
        ep["password"].as_str().unwrap_or_default(),
        work.join("zstack-work"),
    );
    options.poll_interval_ms = 20;
    let provider = Arc::new(provider_zstack::ZStackProvider::new(options)?);
    let objects = admin.get("/zstack/objects").await?;
    Ok(PlatformRun {
        name: "zstack",
        provider,
        guests: guests_of(&objects, "vms", |_| false),
        disks: disks_of("vms"),
        objects_path: "/zstack/objects",
        restored_id: Box::new(|g| g.id.0.clone()),
    })
}

/// Back up (full, writes, incremental), restore and compare one platform's
/// guests. Returns the table rows with `verified` set.
pub async fn run_platform(
    run: &PlatformRun,
    admin: &Admin,
    target: Arc<dyn Target>,
    work: &std::path::Path,
    change_percent: f64,
    corrupt: bool,
) -> Result<Vec<Row>> {
    let mover = Arc::new(StandardMover::default());
    let driver = BackupDriver::new(run.provider.clone(), target.clone(), mover.clone());
    let mut all_rows = Vec::new();
    // (row, snapshot, digests of the guest's disks at backup time)
    let mut expected: Vec<(usize, SnapshotId, Vec<String>)> = Vec::new();
    // Different platforms' guests write different data.
    let platform_seed = run.name.bytes().fold(1000u64, |h, b| h * 31 + b as u64);
    for (round, label) in ["full", "incremental"].iter().enumerate() {
        let objects = admin.get(run.objects_path).await?;
        let mut digests = Vec::new();
        for (i, g) in run.guests.iter().enumerate() {
            let mut d = Vec::new();
            for (disk, size) in (run.disks)(&objects, &g.id.0) {
                if round == 1 {
                    admin
                        .guest_writes(&disk, size, change_percent, platform_seed + i as u64)
                        .await?;
                }
                d.push(admin.disk_sha256(&disk).await?);
            }
            digests.push(d);
        }
        let options = JobOptions {
            info: JobInfo::new(
                format!("demo-{}-{label}", run.name),
                crate::now() + round as i64,
            ),
            parallelism: 2,
            log_dir: work.join("logs"),
        };
        let report = driver.run_job(&options, run.guests.clone()).await;
        for (i, g) in report.guests.iter().enumerate() {
            if let Ok(b) = &g.result {
                expected.push((
                    all_rows.len() + i,
                    b.snapshot.id.clone(),
                    digests[i].clone(),
                ));
            }
        }
        all_rows.extend(rows(&report, run.name));
    }
    let exposer = Arc::new(engine::NbdExposer::start("127.0.0.1:0".parse()?).await?);
    let restorer = RestoreDriver::new(run.provider.clone(), target, mover, exposer);
    for (n, (row, id, digests)) in expected.iter().enumerate() {
        let name = format!("restored-{}-{n}", run.name);
        let verified = match restorer
            .restore_vm(id, RestoreTarget::NewGuest { name: Some(name) })
            .await
        {
            Ok(done) => {
                let new_id = (run.restored_id)(&done.guest);
                let objects = admin.get(run.objects_path).await?;
                let disks = (run.disks)(&objects, &new_id);
                let mut got = Vec::new();
                for (i, (disk, size)) in disks.iter().enumerate() {
                    if corrupt && n == 0 && i == 0 {
                        admin
                            .post(
                                &format!("/disks/{disk}/write"),
                                json!({"offset": size / 2, "length": 1, "pattern": "byte", "seed": 7}),
                            )
                            .await?;
                    }
                    got.push(admin.disk_sha256(disk).await?);
                }
                if got.is_empty() {
                    eprintln!("MISMATCH: {id} restored as {new_id}: the restored VM has no disks");
                    false
                } else if &got != digests {
                    eprintln!(
                        "MISMATCH: {id} restored as {new_id}: disks {got:?}, the guest had {digests:?}"
                    );
                    false
                } else {
                    true
                }
            }
            Err(e) => {
                eprintln!("restore of {id} failed: {}", e.report());
                false
            }
        };
        if let Some(r) = all_rows.get_mut(*row) {
            r.verified = Some(verified);
        }
    }
    Ok(all_rows)
}
