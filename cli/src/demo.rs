//! `vmbackup demo`: the whole data path end to end on one machine.
//!
//! Guests are NBD exports served in-process by the workspace's NBD server
//! over real TCP sockets, with a dirty bitmap that records every write
//! (as qemu's persistent bitmaps do). The demo backs every guest up in
//! full into a fresh datastore, writes guest data through NBD, backs up
//! incrementally (only the dirty extents are read), restores every
//! snapshot into new raw files, and compares each restored disk byte for
//! byte (SHA-256) with the guest's disk at backup time. It also verifies
//! the datastore. Exit 0 only when every check passed.
//!
//! Then the same for the mock hypervisor's demo guests of each platform
//! (see `demo_mock`), through their providers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use datastore::{Datastore, DatastoreOptions, VerifyScope};
use engine::{BackupDriver, JobOptions, NbdExposer, RestoreDriver, StandardMover};
use nbd::server::{MemoryExport, Server, ServerConfig};
use provider_api::{Guest, JobInfo, NbdAccess, NbdAddress, RestoreTarget};
use provider_nbd::{NbdGuest, NbdProvider};
use sha2::{Digest, Sha256};

use crate::demo_mock::{Admin, run_platform};
use crate::report::{Row, print_table, rows};

/// Options of the demo.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of each guest disk in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Keep the datastore and restored disks in this directory (default:
    /// a temporary directory removed at the end).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Percentage of each disk the guests rewrite between the backups.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Testing aid: flip one byte of a restored disk before the checks
    /// (the demo must then fail).
    #[arg(long, hide = true)]
    corrupt_restored_byte: bool,
}

const BITMAP: &str = "cbt0";
const GUESTS: [&str; 3] = ["web-1", "web-2", "db-1"];

/// A small, fast PRNG (xorshift64*) for generated guest data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Guest content: an OS-like part shared by the web servers (dedups), then
/// per-guest random data, text-like data and zeroes.
fn seed_guest(export: &MemoryExport, index: usize, size: u64) -> Result<()> {
    let piece = 1 << 20;
    let mut buf = vec![0u8; piece];
    let third = size / 3 / piece as u64 * piece as u64;
    let mut shared = Rng(0x5eed);
    let mut own = Rng(0x1000 + index as u64);
    let text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit; backup line ";
    let mut off = 0;
    while off < size {
        let n = (size - off).min(piece as u64) as usize;
        if off < third {
            // "Operating system": identical on web-1 and web-2.
            if index < 2 {
                shared.fill(&mut buf[..n])
            } else {
                own.fill(&mut buf[..n])
            }
        } else if off < 2 * third {
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = text[(i + index) % text.len()];
            }
            own.fill(&mut buf[..64]);
        } else {
            off += n as u64;
            continue; // zeroes: never written, a hole
        }
        export.fill(off, &buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Guest writes: `percent` of the disk in 64 KiB blocks at random offsets.
async fn guest_writes(
    client: &nbd::client::Client,
    size: u64,
    percent: f64,
    seed: u64,
) -> Result<u64> {
    let block = 64 * 1024u64;
    let blocks = ((size as f64 * percent / 100.0) / block as f64).ceil() as u64;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; block as usize];
    for _ in 0..blocks {
        let off = rng.next() % (size / block) * block;
        rng.fill(&mut buf);
        client.write(off, &buf).await?;
    }
    client.flush().await.ok();
    Ok(blocks * block)
}

async fn sha256_of_export(client: &nbd::client::Client) -> Result<String> {
    let size = client.size();
    let mut h = Sha256::new();
    let piece = 4 << 20;
    let mut off = 0;
    while off < size {
        let n = (size - off).min(piece);
        let data: Bytes = client.read(off, n as usize).await?;
        h.update(&data);
        off += n;
    }
    Ok(hex(&h.finalize()))
}

fn sha256_of_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn run(args: DemoArgs, json: bool) -> Result<ExitCode> {
    let tmp;
    let root = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let size = args.size_mib.max(4) << 20;
    let store_dir = root.join("datastore");
    if store_dir.exists() {
        bail!(
            "{} exists: the demo wants a fresh datastore",
            store_dir.display()
        );
    }
    let ds = Arc::new(Datastore::create(&store_dir, DatastoreOptions::default())?);

    // The "hypervisor": one NBD server, one export per guest disk.
    let server = Server::new(ServerConfig::default())?;
    let mut exports = Vec::new();
    for (i, g) in GUESTS.iter().enumerate() {
        let export = Arc::new(MemoryExport::new(size).with_dirty_bitmap(BITMAP));
        seed_guest(&export, i, size)?;
        server.add_export(g.to_string(), export.clone());
        exports.push(export);
    }
    let addr = server.listen_tcp("127.0.0.1:0".parse()?).await?;
    let guests: Vec<NbdGuest> = GUESTS
        .iter()
        .map(|g| {
            NbdGuest::single(
                g.to_string(),
                NbdAccess::new(
                    NbdAddress::Tcp {
                        host: addr.ip().to_string(),
                        port: addr.port(),
                    },
                    g.to_string(),
                ),
                size,
                Some(BITMAP.into()),
            )
        })
        .collect();
    let restore_dir = root.join("restored");
    let provider = Arc::new(NbdProvider::new(guests, restore_dir.clone()));
    let mover = Arc::new(StandardMover::default());
    let driver = BackupDriver::new(provider.clone(), ds.clone(), mover.clone());
    let clients = {
        let mut v = Vec::new();
        for g in GUESTS {
            let opts = nbd::client::ConnectOptions::new(
                nbd::client::Address::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                },
                g,
            );
            v.push(nbd::client::Client::connect(&opts).await?);
        }
        v
    };
    if !json {
        println!(
            "demo: {} guests of {} MiB served over NBD at {addr}; datastore {}",
            GUESTS.len(),
            args.size_mib,
            store_dir.display()
        );
    }

    let mut all_rows: Vec<Row> = Vec::new();
    let mut expected = Vec::new(); // (row, snapshot id, guest, sha256 at backup time)
    for (round, label) in ["full", "incremental"].iter().enumerate() {
        if round == 1 {
            for (i, c) in clients.iter().enumerate() {
                guest_writes(c, size, args.change_percent, 77 + i as u64).await?;
            }
        }
        let mut hashes = Vec::new();
        for c in &clients {
            hashes.push(sha256_of_export(c).await?);
        }
        let options = JobOptions {
            info: JobInfo::new(format!("demo-{label}"), crate::now() + round as i64),
            parallelism: 2,
            log_dir: root.join("logs"),
        };
        let guests = GUESTS.iter().map(|g| Guest::vm(*g)).collect();
        let report = driver.run_job(&options, guests).await;
        // A successful backup consumes the changes: clear the bitmaps, as a
        // platform rotates its CBT checkpoints.
        for e in &exports {
            e.clear_dirty();
        }
        for (i, g) in report.guests.iter().enumerate() {
            if let Ok(b) = &g.result {
                let row = all_rows.len() + i;
                expected.push((row, b.snapshot.id.clone(), GUESTS[i], hashes[i].clone()));
            }
        }
        all_rows.extend(rows(&report, "nbd"));
    }

    // Restore every snapshot to a new disk and compare.
    let exposer = Arc::new(NbdExposer::start("127.0.0.1:0".parse()?).await?);
    let restorer = RestoreDriver::new(provider, ds.clone(), mover, exposer);
    let mut all_ok = all_rows.iter().all(|r| r.error.is_none());
    for (n, (row, id, guest, hash)) in expected.iter().enumerate() {
        let name = format!("{guest}-{n}");
        let verified = match restorer
            .restore_vm(
                id,
                RestoreTarget::NewGuest {
                    name: Some(name.clone()),
                },
            )
            .await
        {
            Ok(_) => {
                let path = restore_dir.join(format!("{name}.raw"));
                if args.corrupt_restored_byte && n == 0 {
                    corrupt_one_byte(&path)?;
                }
                let got = sha256_of_file(&path)?;
                if &got != hash {
                    eprintln!(
                        "MISMATCH: {id} restored as {} has sha256 {got}, the guest had {hash}",
                        path.display()
                    );
                }
                &got == hash
            }
            Err(e) => {
                eprintln!("restore of {id} failed: {}", e.report());
                false
            }
        };
        all_ok &= verified;
        if let Some(r) = all_rows.get_mut(*row) {
            r.verified = Some(verified);
        }
    }
    // The platforms of the mock hypervisor.
    let mut config = mock_hypervisor::MockConfig::new(root.join("mock"));
    config.seed = Some(mock_hypervisor::Seed::Demo);
    let mock = mock_hypervisor::MockHypervisor::start(config)
        .await
        .context("starting the mock hypervisor")?;
    let endpoints = serde_json::to_value(mock.endpoints())?;
    let admin = Admin::new(endpoints["admin_url"].as_str().unwrap_or_default());
    if !json {
        println!(
            "demo: mock hypervisor at {} (admin {})",
            endpoints["http_url"], endpoints["admin_url"]
        );
    }
    let platforms = vec![
        crate::demo_mock::scp(&admin, &endpoints).await?,
        crate::demo_mock::ovirt(&admin, &endpoints).await?,
        crate::demo_mock::zstack(&admin, &endpoints, &root).await?,
    ];
    for platform in &platforms {
        let target: Arc<dyn provider_api::Target> = ds.clone();
        let platform_rows =
            run_platform(platform, &admin, target, &root, args.change_percent, false).await?;
        all_ok &= platform_rows
            .iter()
            .all(|r| r.error.is_none() && r.verified == Some(true));
        all_rows.extend(platform_rows);
    }
    mock.shutdown().await;

    let store = ds.as_ref().clone();
    let verify = tokio::task::spawn_blocking(move || store.verify(VerifyScope::All)).await??;
    all_ok &= verify.is_ok();
    let stats = ds.stats()?;

    if json {
        println!(
            "{}",
            serde_json::json!({"rows": all_rows, "datastore": stats, "verify_ok": verify.is_ok(), "success": all_ok})
        );
    } else {
        print_table(&all_rows);
        println!(
            "datastore: {} snapshots, {} base images, {} chunks ({} stored); verify checked {} chunks: {}",
            stats.snapshots,
            stats.base_images,
            stats.chunks,
            crate::report::human(stats.chunk_bytes),
            verify.chunks_checked,
            if verify.is_ok() { "ok" } else { "FAILED" },
        );
        println!(
            "{}",
            if all_ok {
                "demo: every check passed"
            } else {
                "demo: FAILED"
            }
        );
    }
    server.shutdown().await;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn corrupt_one_byte(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 4096)?;
    b[0] ^= 0xff;
    f.write_all_at(&b, 4096)?;
    Ok(())
}
