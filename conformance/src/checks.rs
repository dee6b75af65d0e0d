//! The checks. Each creates its own guests through the platform driver,
//! drives the provider with the engine into a fresh recording target, and
//! returns the first broken rule as a [`Failure`].

use std::sync::Arc;

use async_trait::async_trait;
use provider_api::testing::PlatformProbe;
use provider_api::{
    BitmapMode, ErrorKind, GuestKind, RestoreMechanism, RestoreTarget, SnapshotInfo, StartFrom,
};

use crate::content::{CHUNK, Span, expand, first_outside, merge, pattern, size_text, spans_text};
use crate::driver::PlatformDriver;
use crate::kit::{Session, Taken, TestGuest};
use crate::recorder::Call;
use crate::report::Failure;
use crate::target::Fault;

type CheckResult = std::result::Result<(), Failure>;

/// The v1 kit's probe over the driver's leftovers.
struct DriverProbe(Arc<dyn PlatformDriver>);

#[async_trait]
impl PlatformProbe for DriverProbe {
    async fn leftovers(&self) -> Vec<String> {
        match self.0.leftovers().await {
            Ok(l) => l,
            Err(e) => vec![format!(
                "platform driver: leftovers() failed: {}",
                e.report()
            )],
        }
    }
}

/// [`crate::Check::Lifecycle`]: the v1 rules on a one-volume guest.
pub(crate) async fn lifecycle(s: &mut Session<'_>) -> CheckResult {
    let sizes = s.sizes();
    let g = s.new_guest("lc", &sizes[..1]).await?;
    let probe = DriverProbe(s.kit.driver().clone());
    provider_api::testing::check_all(&**s.kit.provider(), &g.guest, &probe)
        .await
        .map_err(|e| {
            s.fail(format!(
                "lifecycle rule broken (provider_api::testing): {e}"
            ))
            .guest(g.id())
        })?;
    s.notes
        .push("provider_api::testing::check_all passed on a one-volume guest".into());
    Ok(())
}

fn modes(snap: &SnapshotInfo) -> String {
    let mut out: Vec<String> = snap
        .volumes
        .iter()
        .map(|v| format!("{} {:?}", v.volume.device, v.bitmap_mode))
        .collect();
    if !snap.warnings.is_empty() {
        out.push(format!("warnings: {}", snap.warnings.join(" | ")));
    }
    out.join(", ")
}

fn expect_unsupported(s: &Session<'_>, call: &str, r: provider_api::Result<()>) -> CheckResult {
    match r {
        Err(e) if e.kind() == ErrorKind::Unsupported => Ok(()),
        Err(e) => Err(s.fail(format!(
            "capabilities() denies containers, so {call} must answer ErrorKind::Unsupported; \
             it answered {:?}: {}",
            e.kind(),
            e.report()
        ))),
        Ok(()) => Err(s.fail(format!(
            "capabilities() denies containers, but {call} succeeded: claim the ability or answer \
             ErrorKind::Unsupported"
        ))),
    }
}

/// [`crate::Check::CapabilityHonesty`].
///
/// Decision on refusals: an ability [`provider_api::Capabilities`] denies
/// must answer [`ErrorKind::Unsupported`], nothing else (the trait's docs
/// say so for containers and in-place restore; `Refused` means the
/// *platform* refused something the provider does support).
pub(crate) async fn capability_honesty(s: &mut Session<'_>) -> CheckResult {
    let caps = s.kit.provider().capabilities();
    let p = s.kit.provider().clone();
    match p.restore_get_mechanism(GuestKind::Vm).await {
        Ok(RestoreMechanism::QemuImg) => {}
        Ok(m) => {
            return Err(s.fail(format!(
                "restore_get_mechanism(Vm) answered {m:?}; VMs restore through QemuImg"
            )));
        }
        Err(e) => {
            return Err(s.fail(format!("restore_get_mechanism(Vm) failed: {}", e.report())));
        }
    }

    let sizes = s.sizes();
    let mut g = s.new_guest("cap", &sizes[..sizes.len().min(2)]).await?;
    s.fill(&mut g, 21).await?;
    s.take(&mut g, "full backup").await?;
    for v in 0..g.volumes.len() {
        s.scatter(&mut g, v, 22).await?;
    }
    let second = s.take(&mut g, "second backup").await?;
    let used: Vec<&str> = second
        .snapshot
        .volumes
        .iter()
        .filter(|v| v.bitmap_mode == BitmapMode::Use)
        .map(|v| v.volume.device.as_str())
        .collect();
    if caps.incremental && used.is_empty() {
        return Err(s
            .fail(format!(
                "capabilities().incremental is true, but the second backup of an unchanged-size \
                 guest used bitmap mode Use for no volume ({})",
                modes(&second.snapshot)
            ))
            .guest(g.id()));
    }
    if !caps.incremental && !used.is_empty() {
        return Err(s
            .fail(format!(
                "capabilities().incremental is false, but the second backup used change \
                 tracking for {}: claim the ability",
                used.join(", ")
            ))
            .guest(g.id()));
    }

    if caps.containers != p.containers().is_some() {
        return Err(s.fail(format!(
            "capabilities().containers is {} but containers() {} the container half",
            caps.containers,
            if p.containers().is_some() {
                "gives"
            } else {
                "does not give"
            }
        )));
    }
    if caps.containers {
        s.notes.push(
            "containers are claimed: the ContainerKit checks them (Check::Containers)".into(),
        );
    } else {
        let r = p
            .restore_get_mechanism(GuestKind::Container)
            .await
            .map(|_| ());
        expect_unsupported(s, "restore_get_mechanism(Container)", r)?;
    }

    if caps.restore_in_place {
        for v in 0..g.volumes.len() {
            s.scatter(&mut g, v, 23).await?;
        }
        let report = s
            .restore(&second.snapshot.id, RestoreTarget::InPlace)
            .await
            .map_err(|e| {
                s.fail(format!(
                    "capabilities().restore_in_place is true, but restoring the second backup in \
                     place failed: {}",
                    e.report()
                ))
                .guest(g.id())
            })?;
        s.leftovers("a restore in place").await?;
        s.compare_guest(&g.guest, &second.expected, "restore in place")
            .await?;
        g.model = second.expected.clone();
        if report.guest.id != g.guest.id {
            s.notes.push(format!(
                "restore in place answered guest {} for the original {}",
                report.guest.id, g.guest.id
            ));
        }
    } else {
        let before = s.capture(&mut g).await?;
        match s.restore(&second.snapshot.id, RestoreTarget::InPlace).await {
            Ok(r) => {
                return Err(s
                    .fail(format!(
                        "capabilities().restore_in_place is false, but a restore in place \
                         succeeded (into guest {}): claim the ability or answer Unsupported",
                        r.guest.id
                    ))
                    .guest(g.id()));
            }
            Err(e) if e.kind() == ErrorKind::Unsupported => {}
            Err(e) => {
                return Err(s
                    .fail(format!(
                        "capabilities().restore_in_place is false, so a restore in place must \
                         answer ErrorKind::Unsupported; it answered {:?}: {}",
                        e.kind(),
                        e.report()
                    ))
                    .guest(g.id()));
            }
        }
        s.leftovers("a refused restore in place").await?;
        s.compare_guest(
            &g.guest,
            &before,
            "a refused restore in place (the guest must be untouched)",
        )
        .await?;
    }
    if caps.hot_add {
        s.notes.push(
            "hot_add is claimed; the kit backs up through whatever access backup_vm exposes".into(),
        );
    }
    Ok(())
}

/// [`crate::Check::RoundTrip`].
pub(crate) async fn round_trip(s: &mut Session<'_>) -> CheckResult {
    let caps = s.kit.provider().capabilities();
    let sizes = s.sizes();
    let mut g = s.new_guest("rt", &sizes).await?;
    let n = g.volumes.len();
    s.fill(&mut g, 1).await?;
    let mut taken = vec![s.take(&mut g, "snapshot 1 (full backup)").await?];

    for v in 0..n {
        s.scatter(&mut g, v, 2).await?;
    }
    taken.push(s.take(&mut g, "snapshot 2 (after guest writes)").await?);

    let old = g.volumes[0].size;
    s.grow(&mut g, 0, old + CHUNK).await?;
    let new = g.volumes[0].size;
    let tail = (new - old).min(64 * 1024);
    s.write(&mut g, 0, old, pattern(3, old, tail as usize))
        .await?;
    s.scatter(&mut g, 0, 3).await?;
    if n > 1 {
        s.scatter(&mut g, 1, 3).await?;
    }
    let what = format!(
        "snapshot 3 (after volume {} grew from {old} to {new} bytes)",
        g.volumes[0].device
    );
    taken.push(s.take(&mut g, &what).await?);

    for t in &taken {
        s.restore_new_and_compare(t).await?;
    }

    if caps.restore_in_place {
        for v in 0..n {
            s.scatter(&mut g, v, 4).await?;
        }
        let t4 = s
            .take(&mut g, "snapshot 4 (guest writes after snapshot 3)")
            .await?;
        let t3 = taken[2].clone();
        s.restore(&t3.snapshot.id, RestoreTarget::InPlace)
            .await
            .map_err(|e| {
                s.fail(format!(
                    "restore in place of snapshot 3 failed: {}",
                    e.report()
                ))
                .guest(g.id())
            })?;
        s.leftovers("the restore in place of snapshot 3").await?;
        s.compare_guest(
            &g.guest,
            &t3.expected,
            "restore in place of snapshot 3 over the guest",
        )
        .await?;
        g.model = t3.expected.clone();
        for v in 0..n {
            s.scatter(&mut g, v, 5).await?;
        }
        // Change tracking must see what the restore in place rewrote: this
        // snapshot starts from snapshot 4, which the guest no longer holds.
        let t5 = s
            .take(
                &mut g,
                "snapshot 5 (after the restore in place of snapshot 3 and guest writes)",
            )
            .await?;
        s.restore_new_and_compare(&t4).await?;
        s.restore_new_and_compare(&t5).await?;
        taken.push(t4);
        taken.push(t5);
        s.notes.push(
            "restored snapshot 3 in place over the guest, then checked the next backup".into(),
        );
    } else {
        s.notes
            .push("restore in place not claimed: the in-place part was not run".into());
    }
    let total: u64 = g.volumes.iter().map(|v| v.size).sum();
    s.notes.push(format!(
        "{} snapshots of {n} volumes ({}) stored, restored to new guests and compared byte for byte",
        taken.len(),
        size_text(total)
    ));
    Ok(())
}

/// [`crate::Check::IncrementalReads`].
///
/// The bound: the engine's mover reads exactly the dirty regions the
/// provider reports (split at 4 MiB piece boundaries, never widened; holes
/// that `base:allocation` reports inside them are written as zeroes
/// without reading), and writes what it read into the target. Merging a
/// partly dirty chunk with the previous snapshot happens inside the target
/// (the datastore), not on the read side. So every region written into a
/// volume that starts from the previous snapshot must lie inside the
/// guest's writes expanded to [`PlatformDriver::tracking_granularity`],
/// and no wider: chunk alignment is not part of the bound.
pub(crate) async fn incremental_reads(s: &mut Session<'_>) -> CheckResult {
    let gran = s.granularity();
    let sizes = s.sizes();
    let mut g = s.new_guest("inc", &sizes).await?;
    s.fill(&mut g, 31).await?;
    let first = s.take(&mut g, "full backup").await?;
    let mut written = Vec::new();
    for v in 0..g.volumes.len() {
        written.push(s.scatter(&mut g, v, 32).await?);
    }
    let expected = s.capture(&mut g).await?;
    let snapshot = s
        .backup(&[&g], 1, "incremental backup")
        .await?
        .pop()
        .ok_or_else(|| s.fail("incremental backup: the job reported no guest"))?;
    let second = Taken {
        what: "incremental backup".into(),
        snapshot,
        expected,
    };
    let logs = s.target.logs_of(&second.snapshot.id);
    let mut used = 0;
    for (i, v) in g.volumes.iter().enumerate() {
        let fail = |m: String| s.fail(m).guest(g.id()).volume(&v.device);
        let before = first.snapshot.volume(&v.device).map(|x| x.bitmap_mode);
        let now = second.snapshot.volume(&v.device).map(|x| x.bitmap_mode);
        let Some(log) = logs.iter().find(|l| l.device == v.device) else {
            return Err(fail(format!(
                "the incremental backup stored no volume {:?} ({})",
                v.device,
                modes(&second.snapshot)
            )));
        };
        if matches!(before, Some(BitmapMode::New | BitmapMode::Use)) && now != Some(BitmapMode::Use)
        {
            return Err(fail(format!(
                "the full backup started change tracking for this volume (bitmap mode {before:?}), \
                 nothing invalidated it, but the incremental backup used bitmap mode {now:?}: it \
                 read the whole volume ({})",
                modes(&second.snapshot)
            )));
        }
        if now != Some(BitmapMode::Use) {
            continue;
        }
        if !matches!(log.start_from, StartFrom::Previous(_)) {
            return Err(fail(format!(
                "bitmap mode Use, but the host started the volume from {:?}",
                log.start_from
            )));
        }
        let allowed = expand(&written[i], gran, log.size);
        let mut stored: Vec<Span> = Vec::new();
        for &(off, len, zeroes) in &log.writes {
            if let Some((a, b)) = first_outside((off, off + len), &allowed) {
                let everything = log.writes.iter().map(|w| w.1).sum::<u64>() >= log.size;
                return Err(fail(format!(
                    "the incremental backup stored {} at {a}..{b} ({}), outside what the guest \
                     wrote since the full backup expanded to the platform's {gran}-byte tracking \
                     granularity (allowed: {}){}",
                    if zeroes { "zeroes" } else { "data" },
                    size_text(b - a),
                    spans_text(&allowed, 8),
                    if everything {
                        "; it read the whole volume: the dirty regions are not the changes"
                    } else {
                        ""
                    }
                ))
                .offset(a));
            }
            stored.push((off, off + len));
        }
        let stored = merge(&mut stored);
        for &(off, len) in &written[i] {
            if let Some((a, b)) = first_outside((off, off + len), &stored) {
                return Err(fail(format!(
                    "the guest wrote {a}..{b} since the full backup, but the incremental backup \
                     did not read it: the dirty regions miss a change (stored: {})",
                    spans_text(&stored, 8)
                ))
                .offset(a));
            }
        }
        let bytes: u64 = log.writes.iter().map(|w| w.1).sum();
        s.notes.push(format!(
            "volume {}: the incremental stored {} of {} ({} regions)",
            v.device,
            size_text(bytes),
            size_text(log.size),
            stored.len()
        ));
        used += 1;
    }
    if used == 0 {
        return Err(s
            .fail(format!(
                "capabilities().incremental is true, but no volume was backed up incrementally \
                 ({})",
                modes(&second.snapshot)
            ))
            .guest(g.id()));
    }
    s.verify_stored(&g, &second)?;
    s.restore_new_and_compare(&second).await?;
    Ok(())
}

/// [`crate::Check::MultiGuest`].
pub(crate) async fn multi_guest(s: &mut Session<'_>) -> CheckResult {
    let sizes = s.sizes();
    let sa: Vec<u64> = sizes.iter().take(2).copied().collect();
    let sb: Vec<u64> = sizes.iter().rev().take(2).copied().collect();
    let mut a = s.new_guest("mga", &sa).await?;
    let mut b = s.new_guest("mgb", &sb).await?;
    s.fill(&mut a, 41).await?;
    s.fill(&mut b, 42).await?;
    let mark = s.provider.mark();
    let mut all = Vec::new();
    for round in 0..2 {
        if round == 1 {
            for v in 0..a.volumes.len() {
                s.scatter(&mut a, v, 43).await?;
            }
            for v in 0..b.volumes.len() {
                s.scatter(&mut b, v, 44).await?;
            }
        }
        let ea = s.capture(&mut a).await?;
        let eb = s.capture(&mut b).await?;
        let what = if round == 0 {
            "full backup of two guests in one job (parallelism 2)"
        } else {
            "second backup of two guests in one job (parallelism 2)"
        };
        let snaps = s.backup(&[&a, &b], 2, what).await?;
        for ((g, expected), snapshot) in [(&a, ea), (&b, eb)].into_iter().zip(snaps) {
            if snapshot.guest != g.guest.id {
                return Err(s
                    .fail(format!(
                        "{what}: the snapshot for guest {} names guest {}",
                        g.guest.id, snapshot.guest
                    ))
                    .guest(g.id()));
            }
            let t = Taken {
                what: format!("{what}, guest {}", g.guest.id),
                snapshot,
                expected,
            };
            s.verify_stored(g, &t)?;
            all.push(t);
        }
    }
    for t in &all {
        s.restore_new_and_compare(t).await?;
    }
    // Did the two guests' transactions overlap in time?
    let calls = s.provider.timed_calls_since(mark);
    let span = |id: &str| {
        let start = calls.iter().find_map(|(t, c)| match c {
            Call::BackupInit(g) if g == id => Some(*t),
            _ => None,
        });
        let end = calls.iter().rev().find_map(|(t, c)| match c {
            Call::BackupCleanup { guest, .. } if guest == id => Some(*t),
            _ => None,
        });
        start.zip(end)
    };
    if let (Some((sa, ea)), Some((sb, eb))) = (span(a.id()), span(b.id())) {
        s.notes.push(if sa < eb && sb < ea {
            "the two guests' transactions overlapped in time".into()
        } else {
            "the two guests' transactions did not overlap (the provider serialises them)".into()
        });
    }
    Ok(())
}

/// The calls of one restore: a vm init, volume inits each followed by
/// their cleanup, one vm cleanup last with the expected outcome.
fn check_restore_calls(
    s: &Session<'_>,
    calls: &[Call],
    devices: &[String],
    success: bool,
    ctx: &str,
) -> CheckResult {
    let fail = |m: String| s.fail(format!("{ctx}: {m} (calls: {calls:?})"));
    let inits: Vec<(&String, &String)> = calls
        .iter()
        .filter_map(|c| match c {
            Call::RestoreVolumeInit { guest, device } => Some((guest, device)),
            _ => None,
        })
        .collect();
    for (i, (guest, device)) in inits.iter().enumerate() {
        let pos = calls
            .iter()
            .position(|c| matches!(c, Call::RestoreVolumeInit { guest: g, device: d } if g == *guest && d == *device))
            .unwrap_or(0);
        let cleaned = calls[pos..].iter().any(|c| {
            matches!(c, Call::RestoreVolumeCleanup { guest: g, device: d, success: ok }
                if g == *guest && d == *device && (*ok || !success))
        });
        if !cleaned {
            return Err(fail(format!(
                "restore_vm_volume_init of {device} (volume {} of the restore) was not followed \
                 by its restore_vm_volume_cleanup{}",
                i + 1,
                if success { "(success)" } else { "" }
            )));
        }
    }
    if success {
        for d in devices {
            if !inits.iter().any(|(_, device)| *device == d) {
                return Err(fail(format!("volume {d} was never restored")));
            }
        }
    }
    let vm_cleanups: Vec<(usize, bool)> = calls
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            Call::RestoreVmCleanup { success, .. } => Some((i, *success)),
            _ => None,
        })
        .collect();
    match vm_cleanups.as_slice() {
        [(i, ok)] if *ok == success => {
            let later = calls[i + 1..].iter().any(|c| {
                matches!(
                    c,
                    Call::RestoreVolumeInit { .. } | Call::RestoreVolumeCleanup { .. }
                )
            });
            if later {
                return Err(fail("volume calls came after restore_vm_cleanup".into()));
            }
            Ok(())
        }
        other => Err(fail(format!(
            "expected exactly one restore_vm_cleanup({}), got {other:?}",
            if success { "success" } else { "failure" }
        ))),
    }
}

/// [`crate::Check::RestoreCleanups`].
pub(crate) async fn restore_cleanups(s: &mut Session<'_>) -> CheckResult {
    let sizes = s.sizes();
    let mut g = s.new_guest("rc", &sizes).await?;
    s.fill(&mut g, 51).await?;
    let t = s.take(&mut g, "full backup").await?;
    let mark = s.provider.mark();
    s.restore_new_and_compare(&t).await?;
    let calls = s.provider.calls_since(mark);
    let devices: Vec<String> = g.volumes.iter().map(|v| v.device.clone()).collect();
    check_restore_calls(s, &calls, &devices, true, "a restore to a new guest")?;
    s.notes.push(format!(
        "{} volume cleanups and one VM cleanup ran; the platform was clean after the restore",
        devices.len()
    ));
    Ok(())
}

async fn snapshot_count(s: &Session<'_>, g: &TestGuest) -> std::result::Result<usize, Failure> {
    use provider_api::Target;
    s.target
        .list_snapshots(None, Some(&g.guest.id))
        .await
        .map(|l| l.len())
        .map_err(|e| s.fail(format!("listing the kit's target: {}", e.report())))
}

/// [`crate::Check::FailureInjection`].
pub(crate) async fn failure_injection(s: &mut Session<'_>) -> CheckResult {
    let sizes = s.sizes();
    let mut g = s.new_guest("fi", &sizes).await?;
    let n = g.volumes.len();
    s.fill(&mut g, 61).await?;
    s.take(&mut g, "the first (full) backup").await?;

    for (k, fault) in Fault::BACKUP.into_iter().enumerate() {
        // A change every later good backup must hold, whatever happens to
        // this one (a failed backup must not advance change tracking).
        for v in 0..n {
            let size = g.volumes[v].size;
            let at = ((k as u64 + 1) * 256 * 1024 + 777).min(size.saturating_sub(4096));
            s.write(&mut g, v, at, pattern(70 + k as u64, at, 4096))
                .await?;
            let old = g.model[v][0];
            s.write(&mut g, v, 0, vec![!old]).await?;
        }
        let published = snapshot_count(s, &g).await?;
        let mark = s.provider.mark();
        s.faults.arm(fault);
        let report = s.run_job(&[&g], 1).await;
        s.faults.disarm();
        let fired = s.faults.take_fired();
        let ctx = format!("with a failure injected in {}", fault.describe());
        let outcome = match (&report.init_error, report.guests.first().map(|o| &o.result)) {
            (Some(e), _) => format!("job_init failed: {}", e.report()),
            (None, Some(Err(e))) => format!("the guest failed: {}", e.report()),
            (None, Some(Ok(b))) => format!("the guest succeeded: snapshot {}", b.snapshot.id),
            (None, None) => "no guest outcome".into(),
        };
        if !fired.contains(&fault) {
            return Err(s
                .fail(format!(
                    "{ctx}: the kit's fault was never reached ({outcome})"
                ))
                .guest(g.id()));
        }
        let failed = report.init_error.is_some() || report.guests.iter().any(|o| o.result.is_err());
        if !failed {
            return Err(s
                .fail(format!(
                    "{ctx}: the backup was reported successful ({outcome})"
                ))
                .guest(g.id()));
        }
        let calls = s.provider.calls_since(mark);
        let job_cleanups = calls.iter().filter(|c| **c == Call::JobCleanup).count();
        if job_cleanups != 1 {
            return Err(s.fail(format!(
                "{ctx}: job_cleanup ran {job_cleanups} times, not once (calls: {calls:?})"
            )));
        }
        if fault != Fault::JobInit {
            let last = calls.iter().rev().find_map(|c| match c {
                Call::BackupCleanup { guest, success } if guest == g.id() => Some(*success),
                _ => None,
            });
            if last != Some(false) {
                return Err(s
                    .fail(format!(
                        "{ctx}: the guest's last cleanup was not backup_cleanup(failure) \
                         (calls: {calls:?})"
                    ))
                    .guest(g.id()));
            }
        }
        if snapshot_count(s, &g).await? != published {
            return Err(s
                .fail(format!("{ctx}: a snapshot was published ({outcome})"))
                .guest(g.id()));
        }
        s.leftovers(&format!("a backup {ctx}"))
            .await
            .map_err(|f| f.guest(g.id()))?;
    }
    // Every change since the first backup must be in the next good one.
    let after = s
        .take(&mut g, "the first good backup after the injected failures")
        .await?;
    s.notes.push(format!(
        "{} backup failure points: cleanups ran, nothing published or left, the next backup ({}) held every change",
        Fault::BACKUP.len(),
        modes(&after.snapshot)
    ));

    let devices: Vec<String> = g.volumes.iter().map(|v| v.device.clone()).collect();
    for fault in Fault::RESTORE {
        let ctx = format!("a restore with a failure injected in {}", fault.describe());
        let mark = s.provider.mark();
        let restored_before = s.provider.restored_guests().len();
        s.faults.arm(fault);
        let r = s
            .restore(
                &after.snapshot.id,
                RestoreTarget::NewGuest {
                    name: Some(s.kit.guest_name("fr")),
                },
            )
            .await;
        s.faults.disarm();
        let fired = s.faults.take_fired();
        for guest in s.provider.restored_guests().split_off(restored_before) {
            s.remove_guest(&guest).await;
        }
        if !fired.contains(&fault) {
            return Err(s.fail(format!(
                "{ctx}: the kit's fault was never reached ({})",
                match &r {
                    Ok(_) => "the restore succeeded".to_owned(),
                    Err(e) => format!("the restore failed: {}", e.report()),
                }
            )));
        }
        if let Ok(rep) = &r {
            return Err(s.fail(format!(
                "{ctx}: the restore was reported successful (guest {})",
                rep.guest.id
            )));
        }
        let calls = s.provider.calls_since(mark);
        check_restore_calls(s, &calls, &devices, false, &ctx)?;
        s.leftovers(&ctx).await?;
    }
    s.restore_new_and_compare(&after).await?;
    s.notes.push(format!(
        "{} restore failure points: cleanups ran and nothing was left; a clean restore followed",
        Fault::RESTORE.len()
    ));
    Ok(())
}
