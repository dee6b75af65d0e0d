//! The oVirt part of the demo seed: `ovirt-vm1` (64 MiB qcow2 system disk
//! with incremental backup enabled + 32 MiB raw data disk, realistic data)
//! and `backup-appliance`, the VM snapshot disks get attached to.

use std::sync::Arc;

use serde_json::json;

use super::OvirtPlatform;
use super::admin::{AdminVm, create_vm_record};
use crate::error::{Error, Result};

const MIB: u64 = 1024 * 1024;

/// Creates the demo objects unless the oVirt inventory already has VMs.
pub async fn demo(p: &Arc<OvirtPlatform>) -> Result<()> {
    if p.inventory().read(|d| !d.vms.is_empty()) {
        return Ok(());
    }
    let vm: AdminVm = serde_json::from_value(json!({
        "name": "ovirt-vm1",
        "disks": [
            {"size": 64 * MIB, "format": "cow", "fill": [
                {"offset": 0, "length": 4 * MIB, "pattern": "text", "seed": 51},
                {"offset": 4 * MIB, "length": 16 * MIB, "pattern": "random", "seed": 52},
                {"offset": 48 * MIB, "length": 2 * MIB, "pattern": "text", "seed": 53}]},
            {"size": 32 * MIB, "format": "raw", "sparse": false, "fill": [
                {"offset": 0, "length": 8 * MIB, "pattern": "random", "seed": 54}]}
        ]
    }))
    .map_err(|e| Error::Invalid(e.to_string()))?;
    create_vm_record(p, vm)
        .await
        .map_err(|e| Error::Conflict(e.1))?;
    let appliance: AdminVm = serde_json::from_value(json!({
        "name": "backup-appliance", "appliance": true,
        "disks": [{"size": 16 * MIB, "format": "raw"}]
    }))
    .map_err(|e| Error::Invalid(e.to_string()))?;
    create_vm_record(p, appliance)
        .await
        .map_err(|e| Error::Conflict(e.1))?;
    Ok(())
}
