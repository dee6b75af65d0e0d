//! The VM configuration as OVF (what `GET /vms/{id}?all_content=true`
//! returns in `initialization.configuration.data`), in the shape the engine
//! writes: a `DiskSection` with one `Disk` per disk (size in GiB, rounded
//! up, plus the exact `ovf:size-bytes` the mock adds) and a
//! `VirtualSystem` with name, memory and CPUs.

use quick_xml::escape::escape;

use super::model::{OvirtInventory, Vm};

/// OVF of a VM and its own disks.
pub fn generate(doc: &OvirtInventory, vm: &Vm) -> String {
    let mut refs = String::new();
    let mut disks = String::new();
    for (a, d) in doc.own_disks(&vm.id) {
        let gib = d.provisioned_size.div_ceil(1 << 30);
        refs.push_str(&format!(
            "<File ovf:href=\"{}/{}\" ovf:id=\"{}\" ovf:size=\"{}\" ovf:description=\"\" ovf:disk_storage_type=\"IMAGE\" ovf:cinder_volume_type=\"\"></File>",
            d.id, d.image_id, d.image_id, d.provisioned_size
        ));
        disks.push_str(&format!(
            "<Disk ovf:diskId=\"{}\" ovf:size=\"{gib}\" ovf:size-bytes=\"{}\" ovf:actual_size=\"{gib}\" ovf:vm_snapshot_id=\"\" ovf:parentRef=\"\" ovf:fileRef=\"{}/{}\" ovf:format=\"http://www.vmware.com/specifications/vmdk.html#sparse\" ovf:volume-format=\"{}\" ovf:volume-type=\"{}\" ovf:disk-interface=\"{}\" ovf:read-only=\"false\" ovf:shareable=\"false\" ovf:boot=\"{}\" ovf:pass-discard=\"false\" ovf:incremental-backup=\"{}\" ovf:disk-alias=\"{}\" ovf:disk-description=\"\" ovf:wipe-after-delete=\"false\"></Disk>",
            d.image_id,
            d.provisioned_size,
            d.id,
            d.image_id,
            escape(d.format.to_uppercase()),
            if d.sparse { "Sparse" } else { "Preallocated" },
            interface_name(&a.interface),
            a.bootable,
            d.backup == "incremental",
            escape(d.alias.as_str()),
        ));
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ovf:Envelope xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1/\" xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\" xmlns:vssd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" ovf:version=\"4.4.0.0\"><References>{refs}</References><Section xsi:type=\"ovf:NetworkSection_Type\"><Info>List of networks</Info></Section><Section xsi:type=\"ovf:DiskSection_Type\"><Info>List of Virtual Disks</Info>{disks}</Section><Content ovf:id=\"out\" xsi:type=\"ovf:VirtualSystem_Type\"><Name>{}</Name><TemplateId>00000000-0000-0000-0000-000000000000</TemplateId><TemplateName>Blank</TemplateName><CreationDate>{}</CreationDate><IsAutoStartup>false</IsAutoStartup><Section ovf:id=\"{}\" ovf:required=\"false\" xsi:type=\"ovf:OperatingSystemSection_Type\"><Info>Guest Operating System</Info><Description>other_linux</Description></Section><Section xsi:type=\"ovf:VirtualHardwareSection_Type\"><Info>{} CPU, {} Memory</Info><Item><rasd:Caption>{} virtual cpu</rasd:Caption><rasd:ResourceType>3</rasd:ResourceType><rasd:num_of_sockets>1</rasd:num_of_sockets><rasd:cpu_per_socket>{}</rasd:cpu_per_socket><rasd:threads_per_cpu>1</rasd:threads_per_cpu></Item><Item><rasd:Caption>{} MB of memory</rasd:Caption><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>{}</rasd:VirtualQuantity></Item></Section></Content></ovf:Envelope>",
        escape(vm.name.as_str()),
        vm.creation_time,
        vm.id,
        vm.cpu_cores,
        vm.memory >> 20,
        vm.cpu_cores,
        vm.cpu_cores,
        vm.memory >> 20,
        vm.memory >> 20,
    )
}

fn interface_name(i: &str) -> &'static str {
    match i {
        "virtio_scsi" => "VirtIO_SCSI",
        "ide" => "IDE",
        "sata" => "SATA",
        _ => "VirtIO",
    }
}

/// Checks that `data` is an XML document whose root is an OVF `Envelope`.
pub fn check(data: &str) -> Result<(), String> {
    let (root, _) = super::wire::xml_to_value(data)?;
    if root == "ovf:Envelope" || root == "Envelope" {
        Ok(())
    } else {
        Err(format!("the root element is {root}, not ovf:Envelope"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ovf_is_valid() {
        let doc = OvirtInventory::default();
        let vm = Vm {
            id: "v".into(),
            name: "a<b".into(),
            status: "down".into(),
            memory: 1 << 30,
            cpu_cores: 2,
            cluster: "Default".into(),
            appliance: false,
            ovf: None,
            creation_time: 0,
            nics: Vec::new(),
        };
        check(&generate(&doc, &vm)).unwrap();
        assert!(check("<vm/>").is_err());
        assert!(check("<ovf:Envelope>").is_err());
    }
}
