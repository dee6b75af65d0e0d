//! The demo seed (`--seed demo`), created once on an empty state directory.
//!
//! SCP: base image `centos-base` (128 MiB: text, random, allocated zeroes and
//! holes) with replicas on both storages and a custom attribute bound to it;
//! two linked VMs on it (`linked-vm-1`, `linked-vm-2`, 192 MiB system disks
//! with their own writes); one full VM `full-vm` (128 MiB system disk +
//! 64 MiB data disk); and `backup-proxy`, the VM disks get hot-added to.

use std::sync::Arc;

use crate::admin::{Fill, FillTarget, write_fill};
use crate::disk::Pattern;
use crate::error::{Error, Result};
use crate::scp::ScpPlatform;
use crate::scp::base_images::{CreateBaseImage, create_record, make_available, settle};
use crate::scp::servers::{CreateServer, NewDisk, create_server_record};

const MIB: u64 = 1024 * 1024;

fn fill(offset_mib: u64, length_mib: u64, pattern: Pattern, seed: u64) -> Fill {
    Fill {
        offset: offset_mib * MIB,
        length: length_mib * MIB,
        pattern,
        seed,
    }
}

fn server(name: &str, disks: Vec<NewDisk>) -> CreateServer {
    CreateServer {
        name: name.into(),
        storage_id: None,
        application: String::new(),
        revert_mode: 0,
        cpu: 2,
        memory_mb: 2048,
        os_type: "linux".into(),
        disks,
        cbt_enable: Some(1),
    }
}

fn disk(size_mib: u64, base: Option<&str>) -> NewDisk {
    NewDisk {
        size: size_mib * MIB,
        base_image_id: base.map(str::to_string),
        linked: true,
    }
}

async fn write_disk(scp: &Arc<ScpPlatform>, disk_id: &str, fills: Vec<Fill>) -> Result<()> {
    let d = scp.hypervisor().store.disk(disk_id)?;
    tokio::task::spawn_blocking(move || {
        fills
            .iter()
            .try_for_each(|f| write_fill(FillTarget::Disk(&d), f))
    })
    .await
    .map_err(|e| Error::Conflict(e.to_string()))?
}

/// Creates the demo objects unless the SCP inventory already has servers.
pub async fn demo(scp: &Arc<ScpPlatform>) -> Result<()> {
    if scp.inventory().read(|d| !d.servers.is_empty()) {
        return Ok(());
    }
    let err = |e: crate::scp::ScpError| Error::Conflict(e.message);
    let base = create_record(
        scp,
        CreateBaseImage {
            name: "centos-base".into(),
            size: 128 * MIB,
            storage_id: Some("storage-local".into()),
            description: "CentOS base image for linked clones".into(),
            os_type: Some("linux".into()),
        },
    )
    .map_err(err)?;
    let image = scp.hypervisor().store.image(&base.id)?;
    let fills = [
        fill(0, 8, Pattern::Text, 1),
        fill(8, 32, Pattern::Random, 2),
        fill(40, 4, Pattern::Zero, 0),
        fill(64, 8, Pattern::Text, 3),
        fill(100, 4, Pattern::Random, 4),
    ];
    tokio::task::spawn_blocking(move || {
        fills
            .iter()
            .try_for_each(|f| write_fill(FillTarget::Image(&image), f))
    })
    .await
    .map_err(|e| Error::Conflict(e.to_string()))??;
    make_available(scp, &base.id).map_err(err)?;
    // Its data is complete: sealed, as a platform's finished image is.
    settle(scp, &base.id).map_err(err)?;
    scp.inventory().update(|doc| {
        if let Some(b) = doc.base_images.get_mut(&base.id) {
            b.replicas.push(crate::scp::model::Replica {
                storage_id: "storage-vs".into(),
                status: "AVAILABLE".into(),
            });
        }
        let attr = crate::ids::new_uuid();
        doc.custom_attributes.insert(
            attr.clone(),
            crate::scp::model::CustomAttribute {
                id: attr.clone(),
                name: "os-family".into(),
                description: "Operating system family".into(),
                resource_type: "base_image".into(),
            },
        );
        let binding = crate::ids::new_uuid();
        doc.bindings.insert(
            binding.clone(),
            crate::scp::model::Binding {
                id: binding,
                custom_attribute_id: attr,
                resource_type: "base_image".into(),
                resource_id: base.id.clone(),
                value: "centos".into(),
            },
        );
        Ok(())
    })?;

    let vm1 = create_server_record(scp, server("linked-vm-1", vec![disk(192, Some(&base.id))]))
        .await
        .map_err(err)?;
    write_disk(
        scp,
        &vm1.disks[0].id,
        vec![
            fill(10, 2, Pattern::Random, 11),
            fill(150, 1, Pattern::Text, 12),
        ],
    )
    .await?;
    let vm2 = create_server_record(scp, server("linked-vm-2", vec![disk(192, Some(&base.id))]))
        .await
        .map_err(err)?;
    write_disk(
        scp,
        &vm2.disks[0].id,
        vec![
            fill(20, 4, Pattern::Random, 21),
            fill(0, 1, Pattern::Text, 22),
        ],
    )
    .await?;
    let full = create_server_record(
        scp,
        server("full-vm", vec![disk(128, None), disk(64, None)]),
    )
    .await
    .map_err(err)?;
    write_disk(
        scp,
        &full.disks[0].id,
        vec![
            fill(0, 4, Pattern::Text, 31),
            fill(4, 24, Pattern::Random, 32),
            fill(32, 2, Pattern::Zero, 0),
            fill(96, 4, Pattern::Text, 33),
        ],
    )
    .await?;
    write_disk(
        scp,
        &full.disks[1].id,
        vec![
            fill(0, 16, Pattern::Random, 41),
            fill(32, 4, Pattern::Text, 42),
        ],
    )
    .await?;
    create_server_record(scp, server("backup-proxy", vec![disk(16, None)]))
        .await
        .map_err(err)?;
    Ok(())
}
