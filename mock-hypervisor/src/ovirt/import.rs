//! `POST /vms` with `initialization.configuration {type: ovf, data}`, the
//! way the engine's `ImportVmFromConfigurationCommand` does it:
//!
//! - the VM is built from the OVF: its id is the OVF's VM id (the `ovf:id`
//!   of the `OperatingSystemSection` in `Content`), a new one with
//!   `initialization.regenerate_ids=true`; its name is `<Name>` unless the
//!   request gives `vm.name`; memory and CPUs come from the
//!   `VirtualHardwareSection`;
//! - an existing VM with that id, or with that name, is a Conflict (409);
//! - the disks of the `DiskSection` are not created: once the VM exists,
//!   each disk the section lists (by the disk id of its `ovf:fileRef`,
//!   `<disk id>/<image id>`) is attached to it, active, with its
//!   `ovf:disk-interface` and `ovf:boot`. A disk that does not exist or
//!   cannot be attached (a non-shareable disk attached to another VM, an
//!   injected attach fault) is left out: the VM is still created (201) and
//!   the audit log gets the engine's
//!   `VM_IMPORT_FROM_CONFIGURATION_ATTACH_DISKS_FAILED` event, "Failed to
//!   attach Disk(s) `<aliases>` to VM `<name>`".
//! - each network item (`ResourceType` 10) is a NIC: `rasd:Name`, the
//!   interface from `rasd:ResourceSubType` (the engine's `VmInterfaceType`:
//!   1 rtl8139, 2 e1000, 3 pv = virtio), `rasd:MACAddress` or one from
//!   the MAC pool (`56:6f:…`) when empty, the vNIC profile named by
//!   `rasd:OtherResourceType` on the network `rasd:Connection` (the
//!   engine's only network here is `ovirtmgmt` with its profile of the
//!   same name). A NIC whose network or profile does not exist is added
//!   unconnected, with the engine's `IMPORTEXPORT_IMPORT_VM_INVALID_INTERFACES`
//!   event.

use std::sync::Arc;

use serde_json::Value;

use super::OvirtPlatform;
use super::api::{AttachRequest, attach_disk};
use super::model::Vm;
use super::wire::{Fault, text};
use crate::ids::{new_uuid, unix_now};

/// A disk the OVF's `DiskSection` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// Disk id (image group id).
    pub disk_id: String,
    /// `ovf:disk-alias` (the id when absent).
    pub alias: String,
    /// API interface name (`virtio`, `virtio_scsi`, `ide`, `sata`,
    /// `spapr_vscsi`).
    pub interface: String,
    /// `ovf:boot`.
    pub bootable: bool,
}

/// What the engine reads from an OVF to build a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OvfVm {
    /// VM id (`OperatingSystemSection ovf:id`).
    pub id: Option<String>,
    /// `<Name>`.
    pub name: Option<String>,
    /// Memory in bytes.
    pub memory: Option<u64>,
    /// vCPUs (sockets × cores × threads).
    pub cpus: Option<u32>,
    /// The `DiskSection`.
    pub disks: Vec<OvfDisk>,
    /// Network items.
    pub nics: Vec<OvfNic>,
}

/// A network item of the `VirtualHardwareSection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfNic {
    /// `rasd:Name`.
    pub name: String,
    /// API interface name.
    pub interface: String,
    /// `rasd:MACAddress` (empty: allocate).
    pub mac: String,
    /// `rasd:Connection`.
    pub network: String,
    /// `rasd:OtherResourceType` (the vNIC profile's name).
    pub profile: String,
}

/// The management network every engine has, and its vNIC profile.
pub const MANAGEMENT_NETWORK: &str = "ovirtmgmt";
/// The id of the management network.
pub const MANAGEMENT_NETWORK_ID: &str = "00000000-0000-0000-0000-000000000009";
/// The id of the management network's vNIC profile.
pub const MANAGEMENT_PROFILE_ID: &str = "0000000a-000a-000a-000a-000000000398";

fn items(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(one) => vec![one],
        None => Vec::new(),
    }
}

fn section<'a>(parent: &'a Value, kind: &str) -> Option<&'a Value> {
    items(parent.get("Section")).into_iter().find(|s| {
        text(s, "xsi:type").is_some_and(|t| t == kind || t.ends_with(&format!(":{kind}")))
    })
}

fn interface_of(ovf: &str) -> String {
    match ovf.to_ascii_lowercase().as_str() {
        "virtio_scsi" => "virtio_scsi",
        "ide" => "ide",
        "sata" => "sata",
        "spapr_vscsi" => "spapr_vscsi",
        _ => "virtio",
    }
    .to_string()
}

/// Reads an OVF the way the engine's OVF reader does (the parts the mock
/// keeps).
pub fn parse(data: &str) -> Result<OvfVm, String> {
    let (root, env) = super::wire::xml_to_value(data)?;
    if root != "ovf:Envelope" && root != "Envelope" {
        return Err(format!("the root element is {root}, not ovf:Envelope"));
    }
    // References: image id -> disk id (`ovf:href` is `<disk>/<image>`).
    let files: Vec<(String, String)> = env
        .get("References")
        .map(|r| items(r.get("File")))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| {
            let href = text(f, "ovf:href")?;
            let disk = href.split('/').next()?.to_string();
            Some((text(f, "ovf:id").unwrap_or_default(), disk))
        })
        .collect();
    let mut vm = OvfVm::default();
    if let Some(ds) = section(&env, "DiskSection_Type") {
        for d in items(ds.get("Disk")) {
            let image = text(d, "ovf:diskId").unwrap_or_default();
            let disk_id = text(d, "ovf:fileRef")
                .and_then(|r| r.split('/').next().map(str::to_string))
                .filter(|s| !s.is_empty())
                .or_else(|| {
                    files
                        .iter()
                        .find(|(img, _)| *img == image)
                        .map(|(_, disk)| disk.clone())
                });
            let Some(disk_id) = disk_id else {
                return Err(format!("disk {image} of the DiskSection has no file"));
            };
            vm.disks.push(OvfDisk {
                alias: text(d, "ovf:disk-alias").unwrap_or_else(|| disk_id.clone()),
                disk_id,
                interface: interface_of(&text(d, "ovf:disk-interface").unwrap_or_default()),
                bootable: text(d, "ovf:boot").is_some_and(|b| b == "true"),
            });
        }
    }
    let content = env
        .get("Content")
        .ok_or("the OVF has no Content (VirtualSystem)")?;
    vm.name = text(content, "Name");
    vm.id = section(content, "OperatingSystemSection_Type").and_then(|s| text(s, "ovf:id"));
    if let Some(hw) = section(content, "VirtualHardwareSection_Type") {
        for item in items(hw.get("Item")) {
            let n = |k: &str| text(item, k).and_then(|s| s.trim().parse::<u64>().ok());
            match text(item, "rasd:ResourceType").as_deref() {
                Some("3") => {
                    let cpus = n("rasd:num_of_sockets").unwrap_or(1)
                        * n("rasd:cpu_per_socket").unwrap_or(1)
                        * n("rasd:threads_per_cpu").unwrap_or(1);
                    vm.cpus = u32::try_from(cpus).ok();
                }
                Some("4") => vm.memory = n("rasd:VirtualQuantity").map(|mb| mb << 20),
                Some("10") => {
                    let t = |k: &str| text(item, k).unwrap_or_default();
                    vm.nics.push(OvfNic {
                        name: t("rasd:Name"),
                        interface: match t("rasd:ResourceSubType").trim() {
                            "1" => "rtl8139",
                            "2" => "e1000",
                            _ => "virtio",
                        }
                        .into(),
                        mac: t("rasd:MACAddress"),
                        network: t("rasd:Connection"),
                        profile: t("rasd:OtherResourceType"),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(vm)
}

/// The import: the VM from the OVF (see the module documentation);
/// returns it once the disks the engine could attach are attached.
pub async fn import_vm(
    p: &Arc<OvirtPlatform>,
    data: &str,
    name: Option<String>,
    cluster: String,
    regenerate_ids: bool,
) -> Result<Vm, Fault> {
    let ovf = parse(data)
        .map_err(|e| Fault::bad_request(format!("configuration.data is not a valid OVF: {e}")))?;
    let id = if regenerate_ids {
        new_uuid()
    } else {
        ovf.id
            .clone()
            .ok_or_else(|| Fault::bad_request("the OVF names no VM id"))?
    };
    let name = name
        .or(ovf.name.clone())
        .ok_or_else(|| Fault::bad_request("vm.name is required (the OVF has no <Name>)"))?;
    let mut unconnected = Vec::new();
    let nics = ovf
        .nics
        .iter()
        .enumerate()
        .map(|(n, nic)| {
            let known = nic.network == MANAGEMENT_NETWORK
                && (nic.profile.is_empty() || nic.profile == MANAGEMENT_NETWORK);
            if !known {
                unconnected.push((nic.name.clone(), nic.network.clone()));
            }
            let nic_id = new_uuid();
            super::model::Nic {
                name: if nic.name.is_empty() {
                    format!("nic{}", n + 1)
                } else {
                    nic.name.clone()
                },
                interface: nic.interface.clone(),
                mac: if nic.mac.trim().is_empty() {
                    // The default MAC pool's range.
                    format!(
                        "56:6f:{}:{}:{}:{}",
                        &nic_id[0..2],
                        &nic_id[2..4],
                        &nic_id[4..6],
                        &nic_id[6..8]
                    )
                } else {
                    nic.mac.trim().to_owned()
                },
                vnic_profile: known.then(|| MANAGEMENT_PROFILE_ID.to_owned()),
                id: nic_id,
            }
        })
        .collect();
    let vm = Vm {
        id,
        name,
        status: "down".into(),
        memory: ovf.memory.unwrap_or(1 << 30),
        cpu_cores: ovf.cpus.unwrap_or(1).max(1),
        cluster,
        appliance: false,
        // The engine writes the OVF of the VM it built: served from the
        // VM and its disks as they are.
        ovf: None,
        creation_time: unix_now(),
        nics,
    };
    p.inv
        .read(|doc| {
            if doc.vms.contains_key(&vm.id) {
                return Err(Fault::conflict(
                    "Cannot import VM. VM with the same identifier already exists.",
                ));
            }
            if doc.vms.values().any(|v| v.name == vm.name) {
                return Err(Fault::conflict(
                    "Cannot import VM. The VM name is already in use, please choose a unique name and try again.",
                ));
            }
            Ok(())
        })?;
    p.inv.update(|doc| {
        if doc.vms.contains_key(&vm.id) || doc.vms.values().any(|v| v.name == vm.name) {
            return Err(crate::error::Error::Conflict(format!(
                "Cannot import VM. VM {} was added meanwhile.",
                vm.name
            )));
        }
        doc.vms.insert(vm.id.clone(), vm.clone());
        Ok(())
    })?;
    if !unconnected.is_empty() {
        // IMPORTEXPORT_IMPORT_VM_INVALID_INTERFACES
        let networks: Vec<&str> = unconnected.iter().map(|(_, n)| n.as_str()).collect();
        let interfaces: Vec<&str> = unconnected.iter().map(|(i, _)| i.as_str()).collect();
        p.add_event(
            &format!(
                "While importing VM {}, the Network/s {} were found to be Non-VM Networks or do not exist in Cluster or are missing a suitable VM network interface profile. Network Name was not set in the Interface/s {}.",
                vm.name,
                networks.join(", "),
                interfaces.join(", ")
            ),
            "oVirt",
            "warning",
            None,
            Some(&vm.id),
        );
    }
    let mut failed = Vec::new();
    for d in &ovf.disks {
        let r = attach_disk(
            p,
            AttachRequest {
                vm_id: vm.id.clone(),
                disk_id: d.disk_id.clone(),
                snapshot_id: None,
                bootable: d.bootable,
                interface: d.interface.clone(),
                active: true,
                read_only: false,
            },
        )
        .await;
        if let Err(e) = r {
            tracing::info!(vm = %vm.id, disk = %d.disk_id, error = ?e, "import: disk not attached");
            failed.push(d.alias.clone());
        }
    }
    if !failed.is_empty() {
        // VM_IMPORT_FROM_CONFIGURATION_ATTACH_DISKS_FAILED
        p.add_event(
            &format!(
                "Failed to attach Disk(s) {} to VM {}.",
                failed.join(", "),
                vm.name
            ),
            "oVirt",
            "warning",
            None,
            Some(&vm.id),
        );
    }
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_generate_writes() {
        let mut doc = super::super::model::OvirtInventory::default();
        let vm = Vm {
            id: "11111111-1111-1111-1111-111111111111".into(),
            name: "src".into(),
            status: "down".into(),
            memory: 2 << 30,
            cpu_cores: 3,
            cluster: "Default".into(),
            appliance: false,
            ovf: None,
            creation_time: 0,
            nics: Vec::new(),
        };
        for (i, (iface, boot)) in [("virtio_scsi", true), ("sata", false)].iter().enumerate() {
            let id = format!("d{i}");
            doc.disks.insert(
                id.clone(),
                super::super::model::Disk {
                    id: id.clone(),
                    alias: format!("disk {i}"),
                    image_id: format!("i{i}"),
                    provisioned_size: 1 << 20,
                    format: "cow".into(),
                    sparse: true,
                    backup: "none".into(),
                    storage_domain: "data".into(),
                    status: "ok".into(),
                },
            );
            doc.attachments.insert(
                super::super::model::attachment_key(&vm.id, &id),
                super::super::model::Attachment {
                    disk_id: id,
                    vm_id: vm.id.clone(),
                    snapshot_id: None,
                    bootable: *boot,
                    interface: iface.to_string(),
                    active: true,
                    read_only: false,
                    local_path: None,
                    device: None,
                    seq: i as u64,
                },
            );
        }
        let got = parse(&super::super::ovf::generate(&doc, &vm)).unwrap();
        assert_eq!(got.id.as_deref(), Some(vm.id.as_str()));
        assert_eq!(got.name.as_deref(), Some("src"));
        assert_eq!(got.memory, Some(2 << 30));
        assert_eq!(got.cpus, Some(3));
        assert_eq!(
            got.disks,
            vec![
                OvfDisk {
                    disk_id: "d0".into(),
                    alias: "disk 0".into(),
                    interface: "virtio_scsi".into(),
                    bootable: true
                },
                OvfDisk {
                    disk_id: "d1".into(),
                    alias: "disk 1".into(),
                    interface: "sata".into(),
                    bootable: false
                },
            ]
        );
        assert!(parse("<vm/>").is_err());
    }

    mod http {
        use reqwest::{Method, StatusCode};
        use serde_json::{Value, json};

        use crate::{MockConfig, MockHypervisor, RunningMock};

        struct Api {
            mock: RunningMock,
            _dir: tempfile::TempDir,
            http: reqwest::Client,
            base: String,
            token: String,
        }

        async fn start() -> Api {
            let dir = tempfile::tempdir().unwrap();
            let mut config = MockConfig::new(dir.path().join("state"));
            config.ovirt.https = false;
            let mock = MockHypervisor::start(config).await.unwrap();
            let http = reqwest::Client::new();
            let ep = mock.endpoints().platforms["ovirt"].clone();
            let tok: Value = http
                .post(ep["sso_url"].as_str().unwrap())
                .body("grant_type=password&scope=ovirt-app-api&username=admin%40internal&password=ovirt-password")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            Api {
                base: ep["base_url"].as_str().unwrap().to_string(),
                token: tok["access_token"].as_str().unwrap().to_string(),
                mock,
                _dir: dir,
                http,
            }
        }

        impl Api {
            async fn call(
                &self,
                method: Method,
                path: &str,
                body: Option<Value>,
            ) -> (StatusCode, Value) {
                let mut r = self
                    .http
                    .request(method, format!("{}{path}", self.base))
                    .bearer_auth(&self.token)
                    .header("Accept", "application/json");
                if let Some(b) = body {
                    r = r.json(&b);
                }
                let resp = r.send().await.unwrap();
                let status = resp.status();
                let text = resp.text().await.unwrap();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }

            async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
                let (s, v) = self.call(method, path, body).await;
                assert!(s.is_success(), "{path}: {s} {v}");
                v
            }

            /// A VM `vm1` with a bootable virtio_scsi disk and a sata
            /// disk, 3 GiB, 3 CPUs: `(vm id, disk ids, its OVF)`.
            async fn source(&self) -> (String, Vec<String>, String) {
                let r = self
                    .http
                    .post(format!("{}/admin/ovirt/vms", self.mock.endpoints().http_url))
                    .json(&json!({"name": "vm1", "memory_mb": 3072, "cpu_cores": 3, "status": "down", "disks": [
                        {"size": 1 << 20, "alias": "boot", "interface": "virtio_scsi", "bootable": true},
                        {"size": 2 << 20, "alias": "data", "format": "raw", "interface": "sata", "bootable": false}]}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                let vm: Value = r.json().await.unwrap();
                let id = vm["id"].as_str().unwrap().to_string();
                let disks = vm["disks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["id"].as_str().unwrap().to_string())
                    .collect();
                let full = self
                    .ok(Method::GET, &format!("/vms/{id}?all_content=true"), None)
                    .await;
                let ovf = full["initialization"]["configuration"]["data"]
                    .as_str()
                    .unwrap()
                    .to_string();
                (id, disks, ovf)
            }

            async fn import(
                &self,
                name: Option<&str>,
                ovf: &str,
                regenerate: bool,
            ) -> (StatusCode, Value) {
                let mut body = json!({"cluster": {"name": "Default"},
                    "initialization": {"configuration": {"type": "ovf", "data": ovf}}});
                if let Some(n) = name {
                    body["name"] = json!(n);
                }
                if regenerate {
                    body["initialization"]["regenerate_ids"] = json!(true);
                }
                self.call(Method::POST, "/vms", Some(body)).await
            }

            /// `(disk id, interface, bootable, active)` of a VM.
            async fn attachments(&self, vm: &str) -> Vec<(String, String, bool, bool)> {
                let v = self
                    .ok(Method::GET, &format!("/vms/{vm}/diskattachments"), None)
                    .await;
                let list = v["disk_attachment"].as_array().cloned().unwrap_or_default();
                let b = |x: &Value| x.as_bool().unwrap_or_else(|| x.as_str() == Some("true"));
                list.iter()
                    .map(|a| {
                        (
                            a["disk"]["id"].as_str().unwrap().to_string(),
                            a["interface"].as_str().unwrap().to_string(),
                            b(&a["bootable"]),
                            b(&a["active"]),
                        )
                    })
                    .collect()
            }

            async fn events(&self) -> Vec<String> {
                let v = self.ok(Method::GET, "/events", None).await;
                v["event"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|e| e["description"].as_str().map(str::to_string))
                    .collect()
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn ovirt_import_takes_id_name_and_hardware_from_the_ovf_and_attaches_its_disks() {
            let api = start().await;
            let (vm, disks, ovf) = api.source().await;
            // Same id as an existing VM: refused.
            let (s, v) = api.import(Some("copy"), &ovf, false).await;
            assert_eq!(s, StatusCode::CONFLICT, "{v}");
            assert!(v.to_string().contains("same identifier"), "{v}");
            // The disks detached and the VM removed: the import recreates it.
            for d in &disks {
                api.ok(
                    Method::DELETE,
                    &format!("/vms/{vm}/diskattachments/{d}"),
                    None,
                )
                .await;
            }
            api.ok(Method::DELETE, &format!("/vms/{vm}"), None).await;
            let (s, v) = api.import(None, &ovf, false).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            assert_eq!(v["id"], json!(vm));
            assert_eq!(v["name"], json!("vm1"));
            let got = api.ok(Method::GET, &format!("/vms/{vm}"), None).await;
            assert_eq!(
                got["memory"].to_string().trim_matches('"'),
                (3u64 << 30).to_string()
            );
            assert_eq!(
                got["cpu"]["topology"]["cores"]
                    .to_string()
                    .trim_matches('"'),
                "3"
            );
            assert_eq!(
                api.attachments(&vm).await,
                vec![
                    (disks[0].clone(), "virtio_scsi".to_string(), true, true),
                    (disks[1].clone(), "sata".to_string(), false, true),
                ]
            );
            assert!(
                !api.events()
                    .await
                    .iter()
                    .any(|e| e.contains("Failed to attach"))
            );
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn ovirt_import_with_regenerated_id_and_name_leaves_attached_and_missing_disks_out() {
            let api = start().await;
            let (vm, disks, ovf) = api.source().await;
            // The name from the OVF (vm1) or given: in use, refused.
            let (s, v) = api.import(None, &ovf, true).await;
            assert_eq!(s, StatusCode::CONFLICT, "{v}");
            assert!(v.to_string().contains("name is already in use"), "{v}");
            let (s, _) = api.import(Some("vm1"), &ovf, true).await;
            assert_eq!(s, StatusCode::CONFLICT);
            // A new id; both disks belong to vm1: the VM comes without them.
            let (s, v) = api.import(Some("copy"), &ovf, true).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            let copy = v["id"].as_str().unwrap().to_string();
            assert_ne!(copy, vm);
            assert_eq!(v["name"], json!("copy"));
            assert!(api.attachments(&copy).await.is_empty());
            assert_eq!(api.attachments(&vm).await.len(), 2);
            let events = api.events().await;
            assert!(
                events
                    .iter()
                    .any(|e| e == "Failed to attach Disk(s) boot, data to VM copy."),
                "{events:?}"
            );
            // One disk detached from vm1, the other one unknown: only the
            // first is attached.
            api.ok(
                Method::DELETE,
                &format!("/vms/{vm}/diskattachments/{}", disks[1]),
                None,
            )
            .await;
            let missing = crate::ids::new_uuid();
            let ovf2 = ovf.replace(&disks[0], &missing);
            let (s, v) = api.import(Some("copy2"), &ovf2, true).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            let copy2 = v["id"].as_str().unwrap().to_string();
            assert_eq!(
                api.attachments(&copy2).await,
                vec![(disks[1].clone(), "sata".to_string(), false, true)]
            );
            assert!(
                api.events()
                    .await
                    .iter()
                    .any(|e| e == "Failed to attach Disk(s) boot to VM copy2."),
            );
            // Not an OVF: refused, nothing created.
            let (s, _) = api.import(Some("bad"), "<not-ovf", false).await;
            assert_eq!(s, StatusCode::BAD_REQUEST);
        }
    }
}
