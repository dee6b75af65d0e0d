//! Appliances: `import FILE.ova|FILE.ovf --id NAME` and `export SNAP --ova
//! FILE`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use appliance::import::{Appliance, OvaProvider};
use appliance::ovf::ExportDisk;
use appliance::spec::{Bus, DiskSpec, GuestSpec};
use clap::Args;
use engine::{NbdExposer, SourceExposer};
use provider_api::{ConfigKind, Guest, Layer, SnapshotId, Target};

use crate::{StoreArg, config, open_or_create_store, open_store};

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The appliance: an OVA, or an OVF with its files beside it.
    file: PathBuf,
    /// Guest id of the snapshot.
    #[arg(long)]
    id: String,
    /// Name of the guest in its configuration (default: the descriptor's).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot id as `list` shows it.
    snapshot: String,
    /// The OVA to write (must not exist).
    #[arg(long)]
    ova: PathBuf,
}

/// `import`: the appliance's disks read in place by qemu and stored as a
/// snapshot of guest `--id` (platform `ova`), its configuration as a
/// platform-neutral guest spec.
pub async fn import(args: ImportArgs, config: &config::Config, json: bool) -> Result<ExitCode> {
    let file = args.file.clone();
    let name = args.name.clone();
    // Parsing, the manifest check and qemu-img info are blocking work.
    let appliance = tokio::task::spawn_blocking(move || Appliance::load(&file, name.as_deref()))
        .await
        .context("loading the appliance")??;
    for w in &appliance.warnings {
        eprintln!("warning: {w}");
    }
    let work = tempfile::tempdir()?;
    let provider = OvaProvider::new(args.id.clone(), appliance, work.path().join("sockets"));
    let ds = open_or_create_store(&args.store, config)?;
    crate::files::one_guest_job(
        Arc::new(provider),
        ds,
        Guest::vm(args.id.clone()),
        appliance::import::PLATFORM,
        config,
        work.path(),
        json,
    )
    .await
}

/// Characters safe in a member name (`guest` for an empty name).
fn file_safe(text: &str) -> String {
    let s = provider_nbd::file_safe(text);
    if s.is_empty() { "guest".to_owned() } else { s }
}

/// The guest spec of a snapshot: the stored one (platform backups and
/// imports), else a minimal one from its volumes, with a warning naming
/// what was assumed.
fn spec_of(
    info: &provider_api::SnapshotInfo,
    config: Option<&provider_api::ConfigBlob>,
    warnings: &mut Vec<String>,
) -> Result<GuestSpec> {
    let stored = config.and_then(GuestSpec::from_config).transpose()?;
    let mut spec = match stored {
        Some(s) => s,
        None => {
            warnings.push(format!(
                "snapshot {} (platform {}) holds no platform-neutral guest spec: 1 CPU, 1024 MiB and SCSI disks assumed",
                info.id, info.platform
            ));
            GuestSpec {
                name: info.guest.0.clone(),
                os: None,
                firmware: Default::default(),
                cpus: 1,
                memory_mib: 1024,
                disks: Vec::new(),
                nics: Vec::new(),
            }
        }
    };
    // The stored volumes decide the disks: their order and sizes.
    let disks = info
        .volumes
        .iter()
        .map(|v| {
            let known = spec.disks.iter().find(|d| d.device == v.volume.device);
            DiskSpec {
                device: v.volume.device.clone(),
                size: v.volume.size,
                bus: known.map_or(Bus::Scsi, |d| d.bus),
                controller: known.and_then(|d| d.controller.clone()),
                boot_order: known.and_then(|d| d.boot_order),
            }
        })
        .collect();
    spec.disks = disks;
    Ok(spec)
}

/// `export`: the snapshot's volumes as streamOptimized VMDKs (qemu-img
/// reads them from this process's NBD server) and an OVF 1.0 descriptor,
/// in an OVA with a SHA-256 manifest.
pub async fn export(args: ExportArgs, config: &config::Config, json: bool) -> Result<ExitCode> {
    if args.ova.exists() {
        bail!("{} exists already", args.ova.display());
    }
    let ds = open_store(&args.store, config)?;
    let id = SnapshotId(args.snapshot.clone());
    let reader = ds.open_snapshot(&id).await?;
    let info = reader.info().clone();
    if info.volumes.is_empty() {
        bail!("snapshot {id} holds no disks (a tree snapshot): nothing to export as an OVA");
    }
    let mut warnings = Vec::new();
    // A platform backup's spec beside its configuration, else the
    // configuration (imports store the spec as their configuration).
    let guest_config = match reader.config(ConfigKind::Spec).await? {
        Some(spec) => Some(spec),
        None => reader.config(ConfigKind::Guest).await?,
    };
    let spec = spec_of(&info, guest_config.as_ref(), &mut warnings)
        .with_context(|| format!("the guest spec stored with {id}"))?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let parent = args
        .ova
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // The VMDKs are made beside the OVA (same file system), then copied in.
    let work = tempfile::Builder::new()
        .prefix(".vmbackup-export-")
        .tempdir_in(parent)
        .with_context(|| format!("a work directory in {}", parent.display()))?;
    let exposer = NbdExposer::start("127.0.0.1:0".parse()?).await?;
    let base = file_safe(&spec.name);
    let mut disks = Vec::new();
    let mut files = Vec::new();
    for d in &spec.disks {
        let volume = reader.open_volume(&d.device, Layer::Merged).await?;
        let (uri, _withdraw) = exposer.expose(&d.device, volume).await?;
        let member = format!("{base}-{}.vmdk", file_safe(&d.device));
        let out = work.path().join(&member);
        let status = tokio::process::Command::new("qemu-img")
            .args([
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
            ])
            .arg(&uri)
            .arg(&out)
            .status()
            .await
            .context("running qemu-img")?;
        if !status.success() {
            bail!(
                "qemu-img convert of volume {} of {id} to VMDK failed ({status})",
                d.device
            );
        }
        let file_size = std::fs::metadata(&out)?.len();
        disks.push(ExportDisk {
            spec: d.clone(),
            href: member.clone(),
            file_size,
        });
        files.push((member, out));
    }
    let descriptor = appliance::ovf::write(&spec, &disks);
    let ova = args.ova.clone();
    let ovf_name = format!("{base}.ovf");
    tokio::task::spawn_blocking(move || {
        appliance::ova::write(&ova, &ovf_name, descriptor.as_bytes(), &files)
    })
    .await
    .context("writing the OVA")??;
    let size = std::fs::metadata(&args.ova)?.len();
    if json {
        println!(
            "{}",
            serde_json::json!({"snapshot": id.0, "ova": args.ova, "bytes": size, "disks": disks.len(), "warnings": warnings})
        );
    } else {
        println!(
            "exported {id} to {} ({} disk(s), {size} bytes)",
            args.ova.display(),
            disks.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
