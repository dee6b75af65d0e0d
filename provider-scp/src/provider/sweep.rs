//! Job markers on the platform objects a job creates, and the sweep in
//! `job_init` of what an earlier, no longer running job of the same host
//! left behind (a crash, a kill, a dropped job).
//!
//! Where the marker goes (SCP gives some objects no name or description):
//!
//! | object | marker | how the sweep finds it |
//! | --- | --- | --- |
//! | backup snapshot | its `description`: `vmbackup.<host>.<job> backup snapshot (backup resource <id>)` | listed per server |
//! | backup resource (lease) | none: the API has no name or description | its id, recorded in the snapshot's (or base image's) description |
//! | NBD export | none (name chosen by the platform) | closed with its backup resource |
//! | hot-added disk | none | its `source.snapshot_id` / `source.base_image_id` names a marked object |
//! | base image being restored | its `description`, with the `Recovery` resource's id (marker removed once its data is written; `AVAILABLE` before that, as the seed orders) | listed; only marked images are swept |
//! | VM created on a base image being restored | its `description` | its disks name a swept base image |
//!
//! A lease opened by a job that died before it took its snapshot (or
//! created its base image) is recorded nowhere: nothing renews it any more
//! and the platform releases it after `remain_time`
//! ([`ScpOptions::lease_seconds`](crate::ScpOptions)). The same holds for
//! the `Recovery` lease of a restore into a VM once its base image is
//! complete, and a VM a crashed restore created on a complete base image
//! is not swept (its name is the user's, and deleting a VM on a guess is
//! worse than leaving one). A VM on an incomplete base image is swept with
//! it (seed 4.5.3 rule 8: that image cannot be used; the VM would not boot).
//!
//! Only markers that name this host and a job not in
//! [`JobInfo::running_jobs`] are swept ([`JobMarker::is_stale_for`]): never
//! another host's objects, never a running job's, never anything unmarked.

use super::*;

/// Text recording a backup resource's id in a description.
const RESOURCE_TAG: &str = "(backup resource ";

/// The description of a backup snapshot.
pub(super) fn snapshot_description(marker: Option<&JobMarker>, lease: Option<&str>) -> String {
    let mut text = match marker {
        Some(m) => format!("{m} backup snapshot"),
        None => "backup snapshot".to_owned(),
    };
    if let Some(l) = lease {
        text.push_str(&format!(" {RESOURCE_TAG}{l})"));
    }
    text
}

/// `description` plus the marker and the lease (for an object while a job
/// works on it).
pub(super) fn marked(description: &str, marker: Option<&JobMarker>, lease: Option<&str>) -> String {
    let mut text = description.trim().to_owned();
    if let Some(m) = marker {
        text.push_str(&format!(" {m}"));
    }
    if let Some(l) = lease {
        text.push_str(&format!(" {RESOURCE_TAG}{l})"));
    }
    text.trim().to_owned()
}

/// The backup resource id recorded in a description.
pub(super) fn recorded_resource(text: &str) -> Option<String> {
    let at = text.find(RESOURCE_TAG)? + RESOURCE_TAG.len();
    let id: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    (!id.is_empty()).then_some(id)
}

impl ScpProvider {
    /// The marker of the current job (none before `job_init`).
    pub(super) fn marker(&self) -> Option<JobMarker> {
        lock(&self.job).as_ref().map(JobInfo::marker)
    }

    /// Sweep what earlier jobs of this host left behind; returns one line
    /// per object removed. Stops at the first failing call.
    pub(super) async fn sweep(&self, job: &JobInfo) -> Result<Vec<String>> {
        let stale = |text: &str| JobMarker::find_in(text).filter(|m| m.is_stale_for(job));
        let servers: Vec<api::ServerListed> = self.client.list(SERVERS, &[]).await?;
        let hotadds: Vec<(String, api::HotAddListed)> = servers
            .iter()
            .flat_map(|s| s.hotadd_disks.iter().map(|h| (s.id.clone(), h.clone())))
            .collect();
        let mut swept = Vec::new();
        for server in &servers {
            let path = format!("/janus/20240725/servers/{}/snapshots", server.id);
            let snapshots: Vec<api::SnapshotListed> = self.client.list(&path, &[]).await?;
            for s in snapshots {
                let Some(m) = stale(&format!("{} {}", s.name, s.description)) else {
                    continue;
                };
                // Hot-adds of the snapshot, then its lease (which closes its
                // exports), then the snapshot itself.
                for (proxy, h) in &hotadds {
                    if h.source.snapshot_id.as_deref() == Some(s.id.as_str()) {
                        self.hot_remove_on(proxy, &h.id).await?;
                        swept.push(format!("hot-added disk {} on server {proxy} ({m})", h.id));
                    }
                }
                if let Some(lease) = recorded_resource(&s.description) {
                    self.release_resource(&lease).await?;
                    swept.push(format!("backup resource {lease} ({m})"));
                }
                match self
                    .client
                    .task::<Value>(Method::DELETE, &format!("{path}/{}", s.id), None)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                swept.push(format!("snapshot {} of server {} ({m})", s.id, server.id));
            }
        }
        let images: Vec<BaseImage> = self.client.list(BASE_IMAGES, &[]).await?;
        for img in images {
            // The marker stays on a base image until its data is complete
            // (it is `AVAILABLE` before: the seed's order); a complete one
            // is data VMs use and carries no marker.
            let Some(m) = stale(&img.description) else {
                continue;
            };
            let users: Vec<&api::ServerListed> = servers
                .iter()
                .filter(|s| {
                    s.disks
                        .iter()
                        .any(|d| d.base_image_id.as_deref() == Some(img.id.as_str()))
                })
                .collect();
            if users.iter().any(|s| stale(&s.description).is_none()) {
                tracing::warn!(base_image = %img.id,
                    "an incomplete base image is used by a VM no stale job created: left");
                continue;
            }
            for (proxy, h) in &hotadds {
                if h.source.base_image_id.as_deref() == Some(img.id.as_str()) {
                    self.hot_remove_on(proxy, &h.id).await?;
                    swept.push(format!("hot-added disk {} on server {proxy} ({m})", h.id));
                }
            }
            if let Some(lease) = recorded_resource(&img.description) {
                self.release_resource(&lease).await?;
                swept.push(format!("backup resource {lease} ({m})"));
            }
            for s in users {
                match self
                    .client
                    .task::<Value>(Method::DELETE, &format!("{SERVERS}/{}", s.id), None)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                swept.push(format!(
                    "server {} on the incomplete base image {} ({m})",
                    s.id, img.id
                ));
            }
            self.delete_base_image(&img.id).await?;
            swept.push(format!("incomplete base image {} ({m})", img.id));
        }
        Ok(swept)
    }

    /// Release a backup resource by id (already gone is fine).
    async fn release_resource(&self, id: &str) -> Result<()> {
        let path = format!("{RESOURCES}/{id}");
        match self
            .client
            .call::<Value>(Method::DELETE, &path, &[], None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::LeaseLost) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_carry_the_marker_and_the_resource() {
        let job = JobInfo::new("job-1", 0).on_host("host-a", Vec::<String>::new());
        let m = job.marker();
        let d = snapshot_description(Some(&m), Some("4f1c-99"));
        assert_eq!(JobMarker::find_in(&d), Some(m.clone()));
        assert_eq!(recorded_resource(&d).as_deref(), Some("4f1c-99"));
        let d = marked("CentOS [restored from base image b]", Some(&m), None);
        assert_eq!(JobMarker::find_in(&d), Some(m));
        assert_eq!(recorded_resource(&d), None);
        assert_eq!(JobMarker::find_in(&snapshot_description(None, None)), None);
    }
}
