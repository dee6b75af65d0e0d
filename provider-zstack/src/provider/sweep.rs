//! Naming and removing temporary platform objects: the [`Tag`] every
//! object of one backup or restore is named by, the sweep of one tag's
//! objects (`backup_cleanup`, a failed restore) and `job_init`'s sweep of
//! what stale jobs of this host left.
//!
//! No locks: everything here is API calls.

use super::*;

/// The name of the platform objects one backup or restore of one guest
/// creates: `<job marker>.<scope>.<device>` (e.g.
/// `vmbackup.host-1.job-7.b0-1f3a9c2e.data-1`). `.` ends the marker and
/// the scope, so job `1` never matches job `10` nor scope `b1` scope
/// `b10`; matching is always exact, on the client, after the platform's
/// (case-insensitive, wildcard) `~=` query narrowed the candidates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Tag {
    pub(super) marker: String,
    pub(super) scope: String,
}

impl Tag {
    pub(super) fn new(marker: &JobMarker, scope: String) -> Self {
        Tag {
            marker: marker.to_string(),
            scope,
        }
    }

    /// `<marker>.<scope>`: the common part of every name.
    pub(super) fn prefix(&self) -> String {
        format!("{}.{}", self.marker, self.scope)
    }

    /// The name of the object made for `device`.
    pub(super) fn name(&self, device: &str) -> String {
        format!("{}.{device}", self.prefix())
    }

    /// Whether `name` is the name of one of this tag's objects (exactly:
    /// the marker and the scope are whole, a device follows).
    pub(super) fn owns(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|device| !device.is_empty())
    }

    /// The `~=` condition finding the candidates of [`Tag::owns`].
    pub(super) fn like(&self, field: &str) -> String {
        format!("{field}~={}.%", like_escape(&self.prefix()))
    }
}

/// The `~=` condition on `field` finding every object named by a marker
/// of `host` (candidates: check with [`JobMarker::find_in`]).
fn host_like(field: &str, host: &str, anywhere: bool) -> String {
    let lead = if anywhere { "%" } else { "" };
    format!(
        "{field}~={lead}{}%",
        like_escape(&format!("{}{host}.", JobMarker::PREFIX))
    )
}

impl ZStackProvider {
    /// Deletes and expunges an image (every backup storage).
    pub(super) async fn drop_image(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/images/{uuid}?deleteMode=Permissive"),
                None,
                "DeleteImage",
            )
            .await
        {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            r => r?,
        };
        self.client
            .call(
                Method::PUT,
                &format!("/images/{uuid}/actions"),
                Some(json!({"expungeImage": {}})),
                "ExpungeImage",
            )
            .await
            .map(|_| ())
    }

    /// Deletes a volume snapshot (gone already is fine).
    pub(super) async fn drop_snapshot(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/volume-snapshots/{uuid}"),
                None,
                "DeleteVolumeSnapshot",
            )
            .await
        {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes a volume snapshot group with its member snapshots
    /// (`DeleteVolumeSnapshotGroup`: ZStack deletes every member snapshot
    /// of a volume still attached to the group's VM, and the group goes
    /// with its root volume's snapshot). Gone already, or a platform
    /// without groups, is fine. A member left behind (its volume was
    /// detached) keeps its tagged name and is found by the snapshot sweep.
    pub(super) async fn drop_snapshot_group(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/volume-snapshots/group/{uuid}"),
                None,
                "DeleteVolumeSnapshotGroup",
            )
            .await
        {
            Err(e) if !matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Unsupported) => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes every temporary image and volume snapshot named by `tag`
    /// (exactly, see [`Tag::owns`]). Returns the first error after trying
    /// everything.
    pub(super) async fn sweep(&self, tag: &Tag) -> Result<()> {
        let mut first: Option<Error> = None;
        match self
            .client
            .query::<ImageInventory>("/images", &[tag.like("name")])
            .await
        {
            Ok(images) => {
                for img in images.iter().filter(|i| tag.owns(&i.name)) {
                    if let Err(e) = self.drop_image(&img.uuid).await {
                        first.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        // Snapshot groups (ZStack 3.6+; an older platform has none).
        match self
            .client
            .query::<VolumeSnapshotGroupInventory>("/volume-snapshots/group", &[tag.like("name")])
            .await
        {
            Ok(groups) => {
                for g in groups.iter().filter(|g| tag.owns(&g.name)) {
                    if let Err(e) = self.drop_snapshot_group(&g.uuid).await {
                        first.get_or_insert(e);
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::Unsupported => {}
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        match self
            .client
            .query::<VolumeSnapshotInventory>("/volume-snapshots", &[tag.like("name")])
            .await
        {
            Ok(snaps) => {
                for sn in snaps.iter().filter(|s| tag.owns(&s.name)) {
                    if let Err(e) = self.drop_snapshot(&sn.uuid).await {
                        first.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// `job_init`'s sweep: every object whose job marker names this host
    /// and a job that is not running ([`JobMarker::is_stale_for`]): VMs
    /// and data volumes a restore was creating (marker in the
    /// description), temporary templates and uploaded images, volume
    /// snapshot groups and volume snapshots (marker in the name). Another
    /// host's objects and those of running jobs are never touched. Returns
    /// what was removed.
    pub(super) async fn sweep_stale(&self, job: &JobInfo) -> Result<Vec<String>> {
        let stale = |text: Option<&str>| {
            text.and_then(JobMarker::find_in)
                .filter(|m| m.is_stale_for(job))
        };
        let mut removed = Vec::new();
        let vms: Vec<VmInventory> = self
            .client
            .query(
                "/vm-instances",
                &[host_like("description", &job.host_id, true)],
            )
            .await?;
        for vm in vms {
            if let Some(m) = stale(vm.description.as_deref()) {
                self.destroy_vm(&vm.uuid).await?;
                removed.push(format!("VM {} ({m})", vm.uuid));
            }
        }
        let vols: Vec<VolumeInventory> = self
            .client
            .query(
                "/volumes",
                &[
                    host_like("description", &job.host_id, true),
                    "type=Data".into(),
                ],
            )
            .await?;
        for v in vols {
            if let Some(m) = stale(v.description.as_deref()) {
                self.delete_volume(&v.uuid).await?;
                removed.push(format!("volume {} ({m})", v.uuid));
            }
        }
        let images: Vec<ImageInventory> = self
            .client
            .query("/images", &[host_like("name", &job.host_id, false)])
            .await?;
        for i in images {
            if let Some(m) = stale(Some(&i.name)) {
                self.drop_image(&i.uuid).await?;
                removed.push(format!("image {} ({m})", i.uuid));
            }
        }
        // Snapshot groups first: deleting one deletes its member
        // snapshots as ZStack does (a ZStack before 3.6 has none).
        let groups: Vec<VolumeSnapshotGroupInventory> = match self
            .client
            .query(
                "/volume-snapshots/group",
                &[host_like("name", &job.host_id, false)],
            )
            .await
        {
            Ok(g) => g,
            Err(e) if e.kind() == ErrorKind::Unsupported => Vec::new(),
            Err(e) => return Err(e),
        };
        for g in groups {
            if let Some(m) = stale(Some(&g.name)) {
                self.drop_snapshot_group(&g.uuid).await?;
                removed.push(format!("volume snapshot group {} ({m})", g.uuid));
            }
        }
        let snaps: Vec<VolumeSnapshotInventory> = self
            .client
            .query(
                "/volume-snapshots",
                &[host_like("name", &job.host_id, false)],
            )
            .await?;
        for sn in snaps {
            if let Some(m) = stale(Some(&sn.name)) {
                self.drop_snapshot(&sn.uuid).await?;
                removed.push(format!("volume snapshot {} ({m})", sn.uuid));
            }
        }
        Ok(removed)
    }

    /// Deletes a data volume (gone already is fine).
    pub(super) async fn delete_volume(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/volumes/{uuid}"),
                None,
                "DeleteDataVolume",
            )
            .await
        {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Destroys then expunges a VM (a destroyed VM keeps its volumes
    /// until expunged; gone already is fine).
    pub(super) async fn destroy_vm(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/vm-instances/{uuid}?deleteMode=Enforcing"),
                None,
                "DestroyVmInstance",
            )
            .await
        {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        match self
            .client
            .call(
                Method::PUT,
                &format!("/vm-instances/{uuid}/actions"),
                Some(json!({"expungeVmInstance": {}})),
                "ExpungeVmInstance",
            )
            .await
        {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
