//! ZStack demo content: one cached image `centos7-zs` (64 MiB: text,
//! random data, allocated zeroes and holes) and two VMs whose root volumes
//! are thin-cloned from it, `zs-vm-1` (own writes) and `zs-vm-2` (own
//! writes and a 32 MiB data volume).

use std::sync::Arc;

use super::ZStackPlatform;
use super::admin::{NewImageReq, create_image_record, create_vm_admin};
use crate::admin::Fill;
use crate::disk::Pattern;
use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;

fn fill(offset: u64, length: u64, pattern: Pattern, seed: u64) -> Fill {
    Fill {
        offset,
        length,
        pattern,
        seed,
    }
}

/// Creates the demo content unless ZStack VMs already exist.
pub async fn demo(zs: &Arc<ZStackPlatform>) -> Result<()> {
    if zs.inv.read(|d| !d.vms.is_empty()) {
        return Ok(());
    }
    let err = |e: crate::admin::AdminError| Error::Invalid(format!("zstack demo seed: {}", e.1));
    let image = create_image_record(
        zs,
        NewImageReq {
            name: "centos7-zs".into(),
            size: 64 * MIB,
            fill: vec![
                fill(0, 4 * MIB, Pattern::Text, 1),
                fill(8 * MIB, 8 * MIB, Pattern::Random, 2),
                fill(24 * MIB, 2 * MIB, Pattern::Zero, 0),
                fill(40 * MIB, 4 * MIB, Pattern::Random, 3),
            ],
            media_type: None,
            platform: None,
            backup_storage_uuids: Vec::new(),
        },
    )
    .await
    .map_err(err)?;
    let uuid = image["uuid"].as_str().unwrap_or_default().to_string();
    create_vm_admin(
        zs,
        "zs-vm-1",
        &uuid,
        vec![fill(MIB, MIB, Pattern::Random, 11)],
        Vec::new(),
        None,
    )
    .await
    .map_err(err)?;
    create_vm_admin(
        zs,
        "zs-vm-2",
        &uuid,
        vec![fill(10 * MIB, 2 * MIB, Pattern::Text, 21)],
        vec![(32 * MIB, vec![fill(0, 4 * MIB, Pattern::Random, 22)])],
        None,
    )
    .await
    .map_err(err)?;
    Ok(())
}
