//! Directory trees and file-level restore: `backup --dir`, `restore` of a
//! container snapshot, `ls` and `restore-file`.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use datastore::Datastore;
use engine::{BackupDriver, CONTAINER_ARCHIVE, JobOptions, StandardMover};
use provider_api::{FileArchiveReader, FileEntry, FileKind, Guest, IdMap, SnapshotId, Target};
use provider_dir::DirProvider;

use crate::{StoreArg, config, jobs, open_or_create_store, open_store, progress, report};

/// Parse `HOST_BASE:COUNT` (e.g. `100000:65536`).
pub fn parse_id_map(s: &str) -> std::result::Result<IdMap, String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST_BASE:COUNT, e.g. 100000:65536"))?;
    let host_base = a.parse().map_err(|_| format!("{a:?} is not a number"))?;
    let count = b.parse().map_err(|_| format!("{b:?} is not a number"))?;
    Ok(IdMap { host_base, count })
}

/// `backup --dir PATH --id NAME`: the tree as a container guest of the
/// directory provider, through the engine.
pub async fn backup_dir(
    store: &StoreArg,
    dir: &Path,
    id: &str,
    id_map: Option<IdMap>,
    config: &config::Config,
    json: bool,
) -> Result<ExitCode> {
    let work = tempfile::tempdir()?;
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("the tree to back up, {}", dir.display()))?;
    let mut provider = DirProvider::new([(id.to_owned(), dir)], work.path().join("restore"));
    if let Some(m) = id_map {
        provider = provider.with_id_map(m);
    }
    let ds = open_or_create_store(store, config)?;
    one_guest_job(
        Arc::new(provider),
        ds,
        Guest::container(id),
        provider_dir::PROVIDER_NAME,
        config,
        work.path(),
        json,
    )
    .await
}

/// One guest's backup through `provider` into `ds` as a job of this host:
/// progress, the job's report, interruption by a signal (its exit code).
pub(crate) async fn one_guest_job(
    provider: Arc<dyn provider_api::BackupProvider>,
    ds: Datastore,
    guest: Guest,
    platform: &str,
    config: &config::Config,
    work: &Path,
    json: bool,
) -> Result<ExitCode> {
    let driver = BackupDriver::new(provider, Arc::new(ds), Arc::new(StandardMover::default()))
        .with_progress(Arc::new(progress::Reporter::new(json)));
    let job = jobs::register(config, "backup", crate::now())?;
    let options = JobOptions {
        info: job.info.clone(),
        parallelism: 1,
        log_dir: work.join("logs"),
    };
    let (interrupt, cancel) = jobs::Interrupt::install()?;
    let report = driver
        .run_job_cancellable(&options, vec![guest], cancel)
        .await;
    report::print_job(&report, platform, json);
    if let Some(code) = interrupt.exit_code() {
        eprintln!("interrupted; cleanups ran, nothing was published");
        return Ok(ExitCode::from(code));
    }
    Ok(if report.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Whether a snapshot is a container's (a tree, no volumes).
pub async fn is_container_snapshot(ds: &Datastore, id: &SnapshotId) -> Result<bool> {
    let r = ds.open_snapshot(id).await?;
    Ok(r.info().volumes.is_empty() && r.file_archives().iter().any(|a| a == CONTAINER_ARCHIVE))
}

/// `restore SNAP --to DIR`: a container snapshot into `DIR/NAME`.
pub async fn restore_container(
    ds: Datastore,
    id: &SnapshotId,
    to: &Path,
    name: Option<String>,
    tar: bool,
    json: bool,
) -> Result<ExitCode> {
    let mut provider = DirProvider::new([], to.to_path_buf());
    if tar {
        provider = provider.with_tar_restore();
    }
    let driver = engine::RestoreDriver::new(
        Arc::new(provider),
        Arc::new(ds),
        Arc::new(StandardMover::default()),
        Arc::new(engine::NbdExposer::start("127.0.0.1:0".parse()?).await?),
    );
    let (interrupt, cancel) = jobs::Interrupt::install()?;
    let result = driver
        .restore_container(id, provider_api::RestoreTarget::NewGuest { name }, cancel)
        .await;
    if let Some(code) = interrupt.exit_code() {
        eprintln!("restore interrupted; what it wrote was removed");
        return Ok(ExitCode::from(code));
    }
    let done = result?;
    let dest = to.join(&done.guest.id.0);
    if json {
        println!(
            "{}",
            serde_json::json!({"guest": done.guest.id, "directory": dest, "bytes_written": done.volumes.first().map(|v| v.1), "seconds": done.elapsed.as_secs_f64(), "warnings": done.warnings})
        );
    } else {
        println!(
            "restored {id} into {} in {:.1}s",
            dest.display(),
            done.elapsed.as_secs_f64()
        );
        for w in &done.warnings {
            println!("warning: {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot id as `list` shows it.
    snapshot: String,
    /// Path in the tree (default: its root).
    path: Option<String>,
    /// Everything below PATH, not only its direct entries.
    #[arg(long, short = 'r')]
    recursive: bool,
    /// File archive (default: the container tree).
    #[arg(long, default_value = CONTAINER_ARCHIVE)]
    archive: String,
}

#[derive(Debug, Args)]
pub struct RestoreFileArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot id as `list` shows it.
    snapshot: String,
    /// Path in the tree of a file or directory (directories with all
    /// they hold).
    path: String,
    /// Directory to restore into (created if missing); the entry lands
    /// as DIR/NAME (NAME: its last path component).
    #[arg(long)]
    to: PathBuf,
    /// File archive (default: the container tree).
    #[arg(long, default_value = CONTAINER_ARCHIVE)]
    archive: String,
}

fn normalize(p: Option<&str>) -> Vec<u8> {
    p.unwrap_or("")
        .trim_matches('/')
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
        .into_bytes()
}

async fn open_archive(
    ds: &Datastore,
    snapshot: &str,
    archive: &str,
) -> Result<Arc<dyn FileArchiveReader>> {
    let id = SnapshotId(snapshot.to_owned());
    let r = ds.open_snapshot(&id).await?;
    if r.file_archives().is_empty() {
        bail!(
            "snapshot {snapshot} holds VM volumes, not a file tree: to get files out of a VM \
             disk, serve it (`vmbackup serve`) and mount it read-only with qemu-nbd or nbdfuse \
             (see README, \"Files from a VM backup\")"
        );
    }
    Ok(r.open_file_archive(archive).await?)
}

fn line(e: &FileEntry) -> String {
    let t = chrono_like(e.mtime_ns);
    let mut s = format!(
        "{}{:04o} {:>6}:{:<6} {:>12} {t} {}",
        e.kind.letter(),
        e.mode,
        e.uid,
        e.gid,
        if e.kind == FileKind::File { e.size } else { 0 },
        e.display_path()
    );
    if matches!(e.kind, FileKind::Symlink | FileKind::Hardlink) {
        s.push_str(if e.kind == FileKind::Symlink {
            " -> "
        } else {
            " link to "
        });
        s.push_str(&String::from_utf8_lossy(&e.link));
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of nanoseconds since the epoch.
fn chrono_like(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `ls SNAP [PATH]`: the catalog only, no file content is read.
pub async fn ls(args: LsArgs, config: &config::Config, json: bool) -> Result<ExitCode> {
    let ds = open_store(&args.store, config)?;
    let files = open_archive(&ds, &args.snapshot, &args.archive).await?;
    let want = normalize(args.path.as_deref());
    let recursive = args.recursive;
    let snapshot = args.snapshot.clone();
    let out = tokio::task::spawn_blocking(move || -> Result<Vec<FileEntry>> {
        let mut out = Vec::new();
        let mut found = false;
        for e in files.entries()? {
            let e = e?;
            if e.path == want {
                found = true;
                if e.kind != FileKind::Dir || want.is_empty() {
                    if !want.is_empty() {
                        out.push(e);
                    }
                    continue;
                }
                continue;
            }
            let below = want.is_empty()
                || (e.path.starts_with(&want) && e.path.get(want.len()) == Some(&b'/'));
            if !below {
                continue;
            }
            let rest = &e.path[if want.is_empty() { 0 } else { want.len() + 1 }..];
            if recursive || !rest.contains(&b'/') {
                out.push(e);
            }
        }
        if !found {
            bail!(
                "snapshot {snapshot} has no {}",
                String::from_utf8_lossy(&want)
            );
        }
        Ok(out)
    })
    .await??;
    for e in &out {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "path": e.display_path(), "type": e.kind.letter().to_string(),
                    "mode": e.mode, "uid": e.uid, "gid": e.gid, "size": e.size,
                    "mtime_ns": e.mtime_ns,
                    "link": (!e.link.is_empty()).then(|| String::from_utf8_lossy(&e.link).into_owned()),
                })
            );
        } else {
            println!("{}", line(e));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `restore-file SNAP PATH --to DIR`.
pub async fn restore_file(
    args: RestoreFileArgs,
    config: &config::Config,
    json: bool,
) -> Result<ExitCode> {
    let ds = open_store(&args.store, config)?;
    let files = open_archive(&ds, &args.snapshot, &args.archive).await?;
    let only = normalize(Some(&args.path));
    if only.is_empty() {
        bail!("restore-file needs a path inside the tree (to restore all of it, use restore)");
    }
    let to = args.to.clone();
    let rep = tokio::task::spawn_blocking(move || {
        filetree::restore_tree(
            &*files,
            &to,
            &filetree::RestoreOptions {
                only: Some(only),
                ..Default::default()
            },
        )
    })
    .await??;
    for w in &rep.warnings {
        eprintln!("warning: {w}");
    }
    let name = Path::new(std::ffi::OsStr::from_bytes(
        args.path
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .as_bytes(),
    ));
    if json {
        println!(
            "{}",
            serde_json::json!({"entries": rep.entries, "bytes": rep.bytes, "to": args.to.join(name), "warnings": rep.warnings})
        );
    } else {
        println!(
            "restored {} ({} entries, {} bytes) to {}",
            args.path,
            rep.entries,
            rep.bytes,
            args.to.join(name).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
