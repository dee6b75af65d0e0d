//! `vmbackup`: back up and restore VMs into a deduplicating datastore.
//!
//! Exit codes: 0 success; 1 a backup, restore or check failed (or the
//! datastore, config or platform could not be used); 2 bad usage.

mod appliance;
mod config;
mod demo;
mod demo_mock;
mod docs;
mod files;
mod jobs;
mod keys;
mod progress;
mod repo;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use datastore::{Datastore, DatastoreOptions, KeepOptions, VerifyScope};
use engine::{
    BackupDriver, JobOptions, MoverOptions, NbdExposer, RestoreDriver, StandardMover, VolumeExport,
};
use provider_api::{Guest, GuestId, Layer, NbdAccess, NbdAddress, SnapshotId, Target, TlsSettings};
use provider_nbd::{NbdGuest, NbdProvider};

/// Back up and restore virtual machines into a deduplicating datastore.
#[derive(Debug, Parser)]
#[command(name = "vmbackup", version, long_about = None)]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Configuration file (TOML: datastore and platforms).
    #[arg(long, global = true, env = "VMBACKUP_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct StoreArg {
    /// Datastore: a directory (created on first backup) or
    /// s3://bucket/prefix (created by `init`; AWS_* environment for
    /// credentials and endpoint); default: the config file's `datastore`.
    #[arg(long, short = 'd', env = "VMBACKUP_DATASTORE")]
    datastore: Option<PathBuf>,
    /// Key file of an encrypted datastore (see `vmbackup key`); a first
    /// backup with it creates the datastore encrypted.
    #[arg(long, env = "VMBACKUP_KEYFILE")]
    keyfile: Option<PathBuf>,
    #[command(flatten)]
    passphrase: keys::Passphrase,
}

impl StoreArg {
    /// The master key of `--keyfile`, opened with its passphrase.
    fn key(&self) -> Result<Option<datastore::MasterKey>> {
        self.keyfile
            .as_deref()
            .map(|f| keys::open_key(f, &self.passphrase))
            .transpose()
    }

    fn path(&self, config: &config::Config) -> Result<PathBuf> {
        self.datastore
            .clone()
            .or_else(|| config.datastore.clone())
            .context("no datastore: pass -d DIR or set datastore in the config file")
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the end-to-end demo: full and incremental backups of generated
    /// guests served over NBD, restores, and byte-for-byte checks.
    Demo(demo::DemoArgs),
    /// Create a datastore: encrypted with --keyfile (an existing key file,
    /// or a new one with --new-key), otherwise not.
    Init(InitArgs),
    /// Back up an NBD export (qemu-nbd, qemu-storage-daemon, nbdkit).
    Backup(BackupArgs),
    /// List finished snapshots.
    List(ListArgs),
    /// Show one snapshot: volumes, modes, checkpoints, base images,
    /// warnings, configuration.
    Show(ShowArgs),
    /// Restore a snapshot's volume into a new raw file.
    Restore(RestoreArgs),
    /// Serve a snapshot's volume over NBD, read-only (instant restore).
    Serve(ServeArgs),
    /// Re-read and re-hash stored chunks.
    Verify(VerifyArgs),
    /// Apply a retention policy to one guest's snapshots.
    Prune(PruneArgs),
    /// Remove chunks no snapshot references.
    Gc(GcArgs),
    /// Run the mock hypervisor (SCP, oVirt, ZStack APIs and disks) until
    /// Ctrl-C; prints its endpoints as one JSON line.
    Mock(MockArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. `vmbackup completions bash >
    /// /etc/bash_completion.d/vmbackup`.
    Completions(docs::CompletionsArgs),
    /// Print the manual page vmbackup(1), or write every page with --dir.
    Man(docs::ManArgs),
    /// Manage the passphrase-protected key file of client-side encryption.
    Key(keys::KeyArgs),
    /// List a tree snapshot's entries (the catalog only: nothing else is
    /// read), under PATH, or everything below it with -r.
    Ls(files::LsArgs),
    /// Restore one file or directory of a tree snapshot into a directory.
    RestoreFile(files::RestoreFileArgs),
    /// Import an appliance (OVA, or OVF with its files beside it) as a
    /// snapshot: disks read in place, configuration kept platform-neutral.
    Import(appliance::ImportArgs),
    /// Write a snapshot as an OVA (streamOptimized VMDKs, OVF 1.0, SHA-256
    /// manifest) that VMware, VirtualBox, oVirt and Proxmox import.
    Export(appliance::ExportArgs),
}

#[derive(Debug, Args)]
struct MockArgs {
    /// State directory (created if missing; survives restarts).
    #[arg(long)]
    state_dir: PathBuf,
    /// HTTP listen address; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// TLS directory for NBDSSL (generated when missing).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Create the demo guests on a new state directory.
    #[arg(long)]
    seed_demo: bool,
    /// Password of the SCP account the mock accepts.
    #[arg(long, default_value = "admin-password")]
    scp_password: String,
}

#[derive(Debug, Args)]
struct BackupArgs {
    #[command(flatten)]
    store: StoreArg,
    /// A platform of the config file whose guests to back up (with --guest).
    #[arg(long, conflicts_with_all = ["nbd", "dir"], requires = "guest")]
    platform: Option<String>,
    /// A directory tree (a container's root file system, or any tree),
    /// backed up as a container guest under --id: incremental, unchanged
    /// files are not read again.
    #[arg(long, conflicts_with = "nbd", requires = "id")]
    dir: Option<PathBuf>,
    /// With --dir, an unprivileged container's owner id mapping
    /// HOST_BASE:COUNT (e.g. 100000:65536): host ids are stored as the
    /// container sees them.
    #[arg(long, requires = "dir", value_parser = files::parse_id_map)]
    id_map: Option<provider_api::IdMap>,
    /// Guest (VM id on the platform); repeat for several.
    #[arg(long)]
    guest: Vec<String>,
    /// Guests backed up at once (at least 1).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    parallel: u64,
    /// A plain NBD export instead of a platform, e.g. nbd://127.0.0.1:10809/disk or nbd+unix:///disk?socket=/run/x.sock.
    #[arg(long, requires = "id")]
    nbd: Option<String>,
    /// Guest id to file an NBD export's snapshots under.
    #[arg(long)]
    id: Option<String>,
    /// qemu dirty bitmap of the export for incrementals (qemu-nbd --bitmap NAME).
    #[arg(long)]
    bitmap: Option<String>,
    /// CA certificate (PEM) for nbds:// exports; the server is always verified.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify their clients
    /// (qemu-nbd's verify-peer); with --tls-key.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds to wait for one answer of an NBD source before handling it
    /// as a dropped connection (retried, then the guest fails).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    io_timeout: u64,
    /// Read at most this many MiB per second from the source (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    bwlimit: Option<u64>,
}

#[derive(Debug, Args)]
struct InitArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Generate a new master key into --keyfile (never overwrites a file).
    #[arg(long, requires = "keyfile")]
    new_key: bool,
    /// Store in clear on object storage (encrypted is the default there).
    #[arg(long, conflicts_with = "keyfile")]
    no_encryption: bool,
    /// Chunk size in bytes: a power of two from 4 KiB to 64 MiB.
    #[arg(long, default_value_t = datastore::DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Only this platform's snapshots (nbd, or a platform of the config).
    #[arg(long)]
    platform: Option<String>,
    /// Only this guest's snapshots; a guest without any is an error.
    #[arg(long)]
    id: Option<String>,
}

#[derive(Debug, Args)]
struct ShowArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot id as `list` shows it.
    snapshot: String,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot id as `list` shows it.
    snapshot: String,
    /// Restore through this platform of the config file (to a new VM, or
    /// in place with --in-place); without it, into raw files (--to).
    #[arg(long, conflicts_with = "to")]
    platform: Option<String>,
    /// Overwrite the original VM (platforms that support it).
    #[arg(long, requires = "platform", conflicts_with = "name")]
    in_place: bool,
    /// Directory for the restored raw file(s), named after --name.
    #[arg(long, required_unless_present = "platform")]
    to: Option<PathBuf>,
    /// Name of the restored guest (default: GUEST-restored).
    #[arg(long)]
    name: Option<String>,
    /// Container snapshots: hand the tree over as a tar stream (the `tar`
    /// restore mechanism, extracted by GNU tar) instead of writing the
    /// directory directly.
    #[arg(long, requires = "to")]
    tar: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot id.
    snapshot: String,
    /// Volume (device) name.
    volume: String,
    /// Address to listen on. Beyond loopback only with TLS
    /// (--tls-cert/--tls-key) or --insecure-listen.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Listen beyond loopback without TLS: anyone who can reach the port
    /// reads the disk.
    #[arg(long)]
    insecure_listen: bool,
    /// Export name (default: the volume name).
    #[arg(long)]
    export: Option<String>,
    /// Server certificate (PEM): clients must use nbds:// (STARTTLS).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that client certificates must chain to: only
    /// clients with such a certificate are served.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Memory for decoded chunks shared by all clients, in MiB (0: no
    /// cache; concurrent reads of a chunk still decode it once).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=65536))]
    cache_mib: u64,
    /// Request payloads in flight, all clients together, in MiB (at
    /// least 32: one request of the largest size).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(32..=65536))]
    max_in_flight_mib: u64,
    /// Seconds a client may leave a reply unread (or a handshake
    /// unfinished) before it is disconnected.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    io_timeout: u64,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    store: StoreArg,
    /// One snapshot (default: everything).
    snapshot: Option<String>,
}

#[derive(Debug, Args)]
struct PruneArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Platform (provider name) of the guest, e.g. nbd, scp.
    #[arg(long, default_value = "nbd")]
    platform: String,
    /// Guest id.
    #[arg(long)]
    id: String,
    /// Keep the newest N. (at least 1).
    #[arg(long, value_parser = keep_count)]
    keep_last: Option<u64>,
    /// Keep one per hour for the last N hours. (at least 1).
    #[arg(long, value_parser = keep_count)]
    keep_hourly: Option<u64>,
    /// Keep one per day for the last N days. (at least 1).
    #[arg(long, value_parser = keep_count)]
    keep_daily: Option<u64>,
    /// Keep one per week for the last N weeks. (at least 1).
    #[arg(long, value_parser = keep_count)]
    keep_weekly: Option<u64>,
    /// Keep one per month for the last N months. (at least 1).
    #[arg(long, value_parser = keep_count)]
    keep_monthly: Option<u64>,
    /// Keep one per year for the last N years. (at least 1).
    #[arg(long, value_parser = keep_count)]
    keep_yearly: Option<u64>,
    /// Remove every snapshot of the guest that is not protected (the only
    /// way to keep nothing: a retention of 0 is refused).
    #[arg(long, conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"])]
    keep_none: bool,
    /// Only show what would be removed.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct GcArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Keep unreferenced chunks younger than this many seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    grace_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMBACKUP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal, and never with NO_COLOR set.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<Usage>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A command line that asks for something refused before anything runs
/// (exit 2, one line).
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

pub(crate) fn open_store(arg: &StoreArg, config: &config::Config) -> Result<Datastore> {
    let path = arg.path(config)?;
    if let repo::Repo::S3(b) = repo::Repo::parse(&path)? {
        let at = b.location();
        if arg.keyfile.is_none()
            && let Ok(Some(fp)) = Datastore::key_fingerprint_on(&b)
        {
            bail!(
                "datastore {at} is encrypted (key {fp}): pass --keyfile FILE (or set \
                 VMBACKUP_KEYFILE) and its passphrase (--passphrase-file or VMBACKUP_PASSPHRASE)"
            );
        }
        let key = arg.key()?;
        return Datastore::open_on(b, key.as_ref())
            .map(repo::settings)
            .with_context(|| format!("opening datastore {at}"));
    }
    if !path.exists() {
        bail!(
            "no datastore at {}: the directory does not exist (a first backup creates it)",
            path.display()
        );
    }
    if path.is_dir() && !path.join(".datastore.json").exists() {
        bail!(
            "{} is not a datastore (it has no .datastore.json)",
            path.display()
        );
    }
    if arg.keyfile.is_none()
        && let Ok(Some(fp)) = Datastore::key_fingerprint_at(&path)
    {
        bail!(
            "datastore {} is encrypted (key {fp}): pass --keyfile FILE (or set VMBACKUP_KEYFILE) \
             and its passphrase (--passphrase-file or VMBACKUP_PASSPHRASE)",
            path.display()
        );
    }
    let key = arg.key()?;
    Datastore::open_with_key(&path, key.as_ref())
        .with_context(|| format!("opening datastore {}", path.display()))
}

/// A retention count: a whole number from 1 (0 would keep nothing of
/// that kind, which `--keep-none` says explicitly).
fn keep_count(s: &str) -> std::result::Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => {
            Err("0 keeps nothing; to remove every unprotected snapshot, use --keep-none".into())
        }
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a count (a whole number from 1)")),
    }
}

pub(crate) fn open_or_create_store(arg: &StoreArg, config: &config::Config) -> Result<Datastore> {
    let path = arg.path(config)?;
    if path.to_string_lossy().starts_with("s3://") {
        // Created by `vmbackup init` only: there, encryption is chosen.
        return open_store(arg, config);
    }
    let empty = std::fs::read_dir(&path)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if !empty {
        return open_store(arg, config);
    }
    let key = arg.key()?;
    Datastore::create_with_key(&path, DatastoreOptions::default(), key.as_ref())
        .with_context(|| format!("creating datastore {}", path.display()))
}

/// `vmbackup init`: create a datastore, encrypted when a key file is given.
fn init(args: InitArgs, config: &config::Config, json: bool) -> Result<()> {
    let path = args.store.path(config)?;
    let key = match (&args.store.keyfile, args.new_key) {
        (Some(file), true) => Some(keys::create_key(file, &args.store.passphrase)?),
        (Some(_), false) => args.store.key()?,
        (None, true) => bail!("--new-key needs --keyfile FILE: where to write the new key"),
        (None, false) => None,
    };
    let options = DatastoreOptions {
        chunk_size: args.chunk_size,
        ..DatastoreOptions::default()
    };
    let ds = match repo::Repo::parse(&path)? {
        repo::Repo::S3(b) => {
            if key.is_none() && !args.no_encryption {
                bail!(
                    "a datastore on object storage is encrypted unless you say otherwise: pass \
                     --keyfile FILE (--new-key to create one), or --no-encryption"
                );
            }
            Datastore::create_on(b, options, key.as_ref())
                .map(repo::settings)
                .with_context(|| format!("creating datastore {}", path.display()))?
        }
        repo::Repo::Dir => Datastore::create_with_key(&path, options, key.as_ref())
            .with_context(|| format!("creating datastore {}", path.display()))?,
    };
    let fingerprint = ds.key_fingerprint();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "datastore": path,
                "chunk_size": ds.chunk_size(),
                "encrypted": fingerprint.is_some(),
                "key_fingerprint": fingerprint,
            })
        );
    } else {
        match fingerprint {
            Some(fp) => println!("created datastore {} (encrypted, key {fp})", path.display()),
            None => println!("created datastore {} (not encrypted)", path.display()),
        }
        if let (Some(file), true) = (&args.store.keyfile, args.new_key) {
            println!(
                "new key file {}: without it (or its master key) nothing in this datastore can be \
                 restored; keep a recovery copy offline: vmbackup key export-master --file {}",
                file.display(),
                file.display()
            );
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let json = cli.json;
    let config = match &cli.config {
        Some(path) => config::Config::load(path)?,
        None => config::Config::default(),
    };
    match cli.command {
        Command::Demo(args) => demo::run(args, json).await,
        Command::Init(args) => {
            init(args, &config, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup(args) => backup(args, &config, json).await,
        Command::List(args) => {
            let ds = open_store(&args.store, &config)?;
            let guest = args.id.clone().map(GuestId);
            let list = ds
                .list_snapshots(args.platform.as_deref(), guest.as_ref())
                .await?;
            if list.is_empty()
                && let Some(id) = &args.id
            {
                bail!(
                    "no snapshots of guest {id}{} in this datastore",
                    args.platform
                        .as_ref()
                        .map_or(String::new(), |p| format!(" (platform {p})"))
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no snapshots in this datastore");
            } else {
                report::print_snapshots(&list);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore(args) => restore(args, &config, json).await,
        Command::Ls(args) => files::ls(args, &config, json).await,
        Command::RestoreFile(args) => files::restore_file(args, &config, json).await,
        Command::Import(args) => appliance::import(args, &config, json).await,
        Command::Export(args) => appliance::export(args, &config, json).await,
        Command::Show(args) => {
            let ds = open_store(&args.store, &config)?;
            let reader = ds.open_snapshot(&SnapshotId(args.snapshot.clone())).await?;
            let info = reader.info().clone();
            let guest_config = reader.config(provider_api::ConfigKind::Guest).await?;
            let metadata = reader.metadata().await?;
            let spec = match reader.config(provider_api::ConfigKind::Spec).await? {
                Some(blob) => provider_api::GuestSpec::from_config(&blob)
                    .transpose()
                    .with_context(|| format!("the guest spec stored with {}", info.id))?,
                None => None,
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "snapshot": info,
                        "guest_config": guest_config.as_ref().map(|c| String::from_utf8_lossy(&c.data).into_owned()),
                        "spec": spec,
                        "metadata": metadata,
                    }))?
                );
            } else {
                println!("snapshot {}", info.id);
                println!("  guest     {} (platform {})", info.guest, info.platform);
                println!("  archive   {}", info.archive);
                println!("  time      {}", report::time_utc(info.time));
                println!(
                    "  verified  {}",
                    match info.verified {
                        Some(true) => "ok",
                        Some(false) => "FAILED (never used as an incremental base)",
                        None => "not yet",
                    }
                );
                for v in &info.volumes {
                    println!(
                        "  volume    {}: {} ({} bytes), {}, {}",
                        v.volume.device,
                        report::human(v.volume.size),
                        v.volume.size,
                        report::format_name(&v.volume.format),
                        report::mode_words(v.bitmap_mode),
                    );
                    if let Some(c) = &v.checkpoint {
                        println!("            checkpoint {}", c.0);
                    }
                    if let Some(b) = &v.base {
                        println!("            base image {}", b.0);
                    }
                }
                for w in &info.warnings {
                    println!("  warning   {w}");
                }
                if let Some(c) = guest_config {
                    println!(
                        "  config    {}, {}",
                        c.content_type,
                        report::human(c.data.len() as u64)
                    );
                }
                if let Some(s) = spec {
                    println!(
                        "  spec      {} CPU(s), {} MiB, {} disk(s), {} NIC(s), {:?} firmware",
                        s.cpus,
                        s.memory_mib,
                        s.disks.len(),
                        s.nics.len(),
                        s.firmware
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve(args, &config).await,
        Command::Verify(args) => {
            let ds = open_store(&args.store, &config)?;
            let scope = match args.snapshot {
                Some(s) => {
                    // A snapshot that is not there is a usage error (as
                    // for `show`), not a failed verification.
                    drop(ds.open_snapshot(&SnapshotId(s.clone())).await?);
                    VerifyScope::Snapshot(SnapshotId(s))
                }
                None => VerifyScope::All,
            };
            let report = tokio::task::spawn_blocking(move || ds.verify(scope)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (id, ok) in &report.snapshots {
                    println!("{id}: {}", if *ok { "ok" } else { "FAILED" });
                }
                for e in &report.errors {
                    println!("error: {e}");
                }
                println!(
                    "{} chunks checked, {} bad",
                    report.chunks_checked,
                    report.bad_chunks.len()
                );
            }
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Prune(args) => {
            let keep = KeepOptions {
                keep_last: if args.keep_none {
                    Some(0)
                } else {
                    args.keep_last
                },
                keep_hourly: args.keep_hourly,
                keep_daily: args.keep_daily,
                keep_weekly: args.keep_weekly,
                keep_monthly: args.keep_monthly,
                keep_yearly: args.keep_yearly,
            };
            if !keep.any() {
                eprintln!(
                    "error: prune needs a retention (--keep-last N, --keep-daily N, ...) or --keep-none"
                );
                return Ok(ExitCode::from(2));
            }
            let ds = open_store(&args.store, &config)?;
            let decisions = ds.prune(
                &args.platform,
                &GuestId(args.id.clone()),
                &keep,
                args.dry_run,
            )?;
            if decisions.is_empty() {
                bail!(
                    "no snapshots of guest {} (platform {}) in this datastore",
                    args.id,
                    args.platform
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&decisions)?);
            } else {
                let (keep, remove) = if args.dry_run {
                    ("would keep", "would remove")
                } else {
                    ("kept", "removed")
                };
                for (id, kept) in decisions {
                    println!("{id}: {}", if kept { keep } else { remove });
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Mock(args) => {
            let mut config = mock_hypervisor::MockConfig::new(args.state_dir);
            config.listen = args.listen;
            config.tls_dir = args.tls_dir;
            config.seed = args.seed_demo.then_some(mock_hypervisor::Seed::Demo);
            config.scp.password = args.scp_password;
            let mock = mock_hypervisor::MockHypervisor::start(config)
                .await
                .context("starting the mock hypervisor")?;
            println!("{}", serde_json::to_string(mock.endpoints())?);
            jobs::wait_for_stop_signal().await?;
            mock.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions(args) => {
            docs::completions(&args, Cli::command())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man(args) => {
            docs::man(&args, Cli::command())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Key(args) => {
            keys::run(args, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc(args) => {
            let ds = open_store(&args.store, &config)?;
            let grace = std::time::Duration::from_secs(args.grace_secs);
            let stats = tokio::task::spawn_blocking(move || ds.gc(grace)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!(
                    "removed {} chunks ({}), kept {} chunks ({})",
                    stats.removed_chunks,
                    report::human(stats.removed_bytes),
                    stats.kept_chunks,
                    report::human(stats.kept_bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// TLS files of an NBD client: the CA that signs the server, and an
/// optional client certificate with its key.
#[derive(Debug, Default, Clone, Copy)]
struct ClientTls<'a> {
    ca: Option<&'a PathBuf>,
    cert: Option<&'a PathBuf>,
    key: Option<&'a PathBuf>,
}

fn read_pem(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

fn parse_nbd_uri(uri: &str, files: ClientTls<'_>) -> Result<NbdAccess> {
    let tls_ca = files.ca;
    let parsed = nbd::uri::NbdUri::parse(uri).with_context(|| format!("parsing {uri}"))?;
    let address = match parsed.address {
        nbd::client::Address::Tcp { host, port } => NbdAddress::Tcp { host, port },
        nbd::client::Address::Unix(p) => NbdAddress::Unix(p),
    };
    let tls = match (parsed.tls, tls_ca) {
        (true, Some(ca)) => {
            let host = match &address {
                NbdAddress::Tcp { host, .. } => host.clone(),
                NbdAddress::Unix(_) => "localhost".into(),
            };
            Some(TlsSettings {
                ca_pem: read_pem(ca, "CA certificate")?,
                server_name: host,
                client_cert_pem: files
                    .cert
                    .map(|p| read_pem(p, "client certificate"))
                    .transpose()?,
                client_key_pem: files.key.map(|p| read_pem(p, "client key")).transpose()?,
            })
        }
        (true, None) => bail!("{uri} uses TLS: pass --tls-ca with the CA that signs the server"),
        (false, Some(_)) => {
            return Err(Usage(format!(
                "--tls-ca is given but {uri} is plain NBD: use nbds:// (or nbds+unix://) to connect with TLS"
            ))
            .into());
        }
        (false, None) => None,
    };
    Ok(NbdAccess::new(address, parsed.export).with_tls(tls))
}

async fn backup(args: BackupArgs, config: &config::Config, json: bool) -> Result<ExitCode> {
    if let Some(dir) = &args.dir {
        let id = args.id.as_deref().context("--dir needs --id")?;
        return files::backup_dir(&args.store, dir, id, args.id_map, config, json).await;
    }
    let work = tempfile::tempdir()?;
    let (platform, provider, guests): (String, Arc<dyn provider_api::BackupProvider>, Vec<Guest>) =
        match (&args.platform, &args.nbd) {
            (Some(name), _) => (
                name.clone(),
                config::provider(name, config.platform(name)?)?.provider,
                args.guest.iter().map(|g| Guest::vm(g.clone())).collect(),
            ),
            (None, Some(uri)) => {
                let id = args.id.clone().context("--nbd needs --id")?;
                let tls = ClientTls {
                    ca: args.tls_ca.as_ref(),
                    cert: args.tls_cert.as_ref(),
                    key: args.tls_key.as_ref(),
                };
                let guest = nbd_guest(uri, &id, args.bitmap.clone(), tls).await?;
                (
                    "nbd".into(),
                    Arc::new(NbdProvider::new([guest], work.path().to_path_buf())),
                    vec![Guest::vm(id)],
                )
            }
            (None, None) => {
                bail!(
                    "back up what? pass --platform NAME --guest ID, --nbd URI --id NAME or --dir PATH --id NAME"
                )
            }
        };
    // The sources are checked before the datastore is created or opened.
    let ds = open_or_create_store(&args.store, config)?;
    let mover = StandardMover::new(MoverOptions {
        bandwidth_limit: args.bwlimit.map(|m| m << 20),
        io_timeout: std::time::Duration::from_secs(args.io_timeout),
        ..MoverOptions::default()
    });
    let driver = BackupDriver::new(provider, Arc::new(ds), Arc::new(mover))
        .with_progress(Arc::new(progress::Reporter::new(json)));
    let job = jobs::register(config, "backup", now())?;
    let options = JobOptions {
        info: job.info.clone(),
        parallelism: args.parallel as usize,
        log_dir: work.path().join("logs"),
    };
    let (interrupt, cancel) = jobs::Interrupt::install()?;
    let report = driver.run_job_cancellable(&options, guests, cancel).await;
    report::print_job(&report, &platform, json);
    if let Some(code) = interrupt.exit_code() {
        eprintln!("backup interrupted; cleanups ran, nothing was published for unfinished guests");
        return Ok(ExitCode::from(code));
    }
    Ok(if report.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// An NBD export as a guest: its size is learnt by connecting.
async fn nbd_guest(
    uri: &str,
    id: &str,
    bitmap: Option<String>,
    tls: ClientTls<'_>,
) -> Result<NbdGuest> {
    let access = parse_nbd_uri(uri, tls)?;
    let opts = nbd::client::ConnectOptions::from_uri(
        &nbd::uri::NbdUri::parse(uri)?,
        access.tls.as_ref().map(|t| nbd::client::TlsClientConfig {
            ca_pem: t.ca_pem.clone(),
            client_cert_pem: t.client_cert_pem.clone(),
            client_key_pem: t.client_key_pem.clone(),
            server_name: t.server_name.clone(),
        }),
    )?;
    let context = bitmap.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
    let opts = match &context {
        Some(c) => opts.meta_context(c.clone()),
        None => opts,
    };
    let c = nbd::client::Client::connect(&opts)
        .await
        .with_context(|| format!("connecting to {uri}"))?;
    let size = c.size();
    let offered = context
        .as_ref()
        .is_none_or(|want| c.meta_contexts().iter().any(|have| have == want));
    let _ = c.disconnect().await;
    if !offered {
        // Checked on every backup, the first one included: a full backup
        // would otherwise record a bitmap that does not exist as its
        // checkpoint, and every later incremental would fail.
        return Err(Usage(format!(
            "{uri} does not offer the dirty bitmap {:?} (qemu-nbd --bitmap NAME exports it)",
            bitmap.unwrap_or_default()
        ))
        .into());
    }
    Ok(NbdGuest::single(id, access, size, bitmap))
}

async fn restore(args: RestoreArgs, config: &config::Config, json: bool) -> Result<ExitCode> {
    let id = SnapshotId(args.snapshot.clone());
    if let Some(to) = &args.to {
        let ds = open_store(&args.store, config)?;
        if files::is_container_snapshot(&ds, &id).await? {
            return files::restore_container(ds, &id, to, args.name.clone(), args.tar, json).await;
        }
        if args.tar {
            bail!("--tar is for tree (container) snapshots; {id} holds VM volumes");
        }
    }
    let ds = Arc::new(open_store(&args.store, config)?);
    // The provider, and where its platform fetches sources over HTTP
    // (ZStack), if it does.
    let (provider, http_restore): (Arc<dyn provider_api::BackupProvider>, _) =
        match (&args.platform, &args.to) {
            (Some(name), _) => {
                let platform = config::provider(name, config.platform(name)?)?;
                (platform.provider, platform.http_restore)
            }
            (None, Some(to)) => (Arc::new(NbdProvider::new([], to.clone())), None),
            (None, None) => bail!("restore where? pass --platform NAME or --to DIR"),
        };
    let destination = if args.in_place {
        provider_api::RestoreTarget::InPlace
    } else {
        provider_api::RestoreTarget::NewGuest {
            name: args.name.clone(),
        }
    };
    let exposer = Arc::new(NbdExposer::start("127.0.0.1:0".parse()?).await?);
    let job = jobs::register(config, "restore", now())?;
    let mut driver = RestoreDriver::new(provider, ds, Arc::new(StandardMover::default()), exposer)
        .with_progress(Arc::new(progress::Reporter::new(json)))
        .with_job(job.info.clone());
    // Sources a platform fetches over HTTP (ZStack), where it reaches them.
    if let Some(http) = http_restore {
        let http = engine::HttpExposer::start(http.listen, http.advertise_url.as_deref()).await?;
        driver = driver.with_http_exposer(Arc::new(http));
    }
    let (interrupt, cancel) = jobs::Interrupt::install()?;
    let result = driver
        .restore_vm_cancellable(&id, destination, cancel)
        .await;
    if let Some(code) = interrupt.exit_code() {
        if let Err(e) = &result {
            eprintln!("error: {}", e.report());
        }
        eprintln!("restore interrupted; cleanups ran");
        return Ok(ExitCode::from(code));
    }
    let done = result?;
    let written: u64 = done.volumes.iter().map(|v| v.1).sum();
    if json {
        println!(
            "{}",
            serde_json::json!({"guest": done.guest.id, "volumes": done.volumes, "bytes_written": written, "seconds": done.elapsed.as_secs_f64(), "warnings": done.warnings})
        );
    } else {
        println!(
            "restored {} as {} ({written} bytes written) in {:.1}s",
            args.snapshot,
            done.guest.id,
            done.elapsed.as_secs_f64()
        );
        for w in &done.warnings {
            println!("warning: {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs, config: &config::Config) -> Result<ExitCode> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(nbd::server::TlsServerConfig {
            cert_pem: read_pem(cert, "server certificate")?,
            key_pem: read_pem(key, "server key")?,
            client_ca_pem: args
                .tls_client_ca
                .as_ref()
                .map(|p| read_pem(p, "client CA certificate"))
                .transpose()?,
        }),
        _ => None,
    };
    if !args.listen.ip().is_loopback() && tls.is_none() && !args.insecure_listen {
        return Err(Usage(format!(
            "--listen {} is reachable beyond this host: serve with TLS (--tls-cert/--tls-key, and --tls-client-ca to admit only known clients) or pass --insecure-listen",
            args.listen
        ))
        .into());
    }
    let ds = open_store(&args.store, config)?;
    ds.set_chunk_cache_bytes(args.cache_mib << 20);
    let reader = ds.open_snapshot(&SnapshotId(args.snapshot.clone())).await?;
    let volume = reader.open_volume(&args.volume, Layer::Merged).await?;
    let tls_on = tls.is_some();
    let server = nbd::server::Server::new(nbd::server::ServerConfig {
        tls_required: tls_on,
        tls,
        max_total_in_flight_bytes: (args.max_in_flight_mib << 20) as usize,
        io_timeout: Some(std::time::Duration::from_secs(args.io_timeout)),
        ..nbd::server::ServerConfig::default()
    })
    .context("setting up the NBD server")?;
    let export = args.export.unwrap_or_else(|| args.volume.clone());
    server.add_export(export.clone(), Arc::new(VolumeExport::new(volume)));
    let addr = server
        .listen_tcp(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let scheme = if tls_on { "nbds" } else { "nbd" };
    println!(
        "serving {} {} at {scheme}://{addr}/{export} (Ctrl-C stops)",
        args.snapshot, args.volume
    );
    jobs::wait_for_stop_signal().await?;
    // Stops accepting, gives in-flight requests a moment, then closes
    // every connection.
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
