//! The saved OVF made fit for a restore to a new VM.
//!
//! The engine builds a VM added from an OVF configuration with the OVF's
//! VM id and, once it exists, attaches every disk the OVF's `DiskSection`
//! names (`ImportVmFromConfigurationCommand`). The OVF saved with a backup
//! names the source VM and its disks: sent as it is, it would collide with
//! the source VM (same id) or, once the source's disks are detached, give
//! them to the restored VM. [`rewrite`] gives the VM (and its snapshots) new
//! ids, points every restored disk at the disk the restore created (ids are
//! UUIDs: every occurrence is replaced, `File` references, `fileRef`s and
//! device `Item`s included), and drops the `File`, `Disk` and `Item`
//! entries of the disks that were not restored.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::client::xml_to_value;

/// A fresh random (version 4) UUID.
pub fn new_uuid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // `RandomState` keys come from the OS's randomness.
    let s = std::collections::hash_map::RandomState::new();
    let mut h = s.build_hasher();
    h.write_u64(nanos);
    h.write_u64(n);
    h.write_u32(std::process::id());
    let a = h.finish();
    let mut h = s.build_hasher();
    h.write_u64(a);
    h.write_u64(!n);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// What [`rewrite`] reads from an OVF.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OvfIds {
    /// The VM id (`ovf:id` of the `OperatingSystemSection` in `Content`).
    pub vm_id: String,
    /// Snapshot ids (`SnapshotsSection`).
    pub snapshots: Vec<String>,
    /// `(disk id, image id)` of every disk (`References`, `DiskSection`).
    pub disks: Vec<(String, String)>,
}

fn items(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(one) => vec![one],
        None => Vec::new(),
    }
}

fn attr(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn section<'a>(parent: &'a Value, kind: &str) -> Option<&'a Value> {
    items(parent.get("Section")).into_iter().find(|s| {
        attr(s, "xsi:type").is_some_and(|t| t == kind || t.ends_with(&format!(":{kind}")))
    })
}

fn split_ref(r: &str) -> Option<(String, String)> {
    let (d, i) = r.split_once('/')?;
    (!d.is_empty()).then(|| (d.to_string(), i.to_string()))
}

/// Reads the ids of an OVF.
pub fn ids(ovf: &str) -> Result<OvfIds, String> {
    let (root, env) = xml_to_value(ovf)?;
    if root != "ovf:Envelope" && root != "Envelope" {
        return Err(format!("the root element is {root}, not ovf:Envelope"));
    }
    let content = env
        .get("Content")
        .ok_or("the OVF has no Content (VirtualSystem)")?;
    let vm_id = section(content, "OperatingSystemSection_Type")
        .and_then(|s| attr(s, "ovf:id"))
        .ok_or("the OVF names no VM id (OperatingSystemSection ovf:id)")?;
    let snapshots = section(content, "SnapshotsSection_Type")
        .map(|s| {
            items(s.get("Snapshot"))
                .into_iter()
                .filter_map(|x| attr(x, "ovf:id"))
                .collect()
        })
        .unwrap_or_default();
    let mut disks: Vec<(String, String)> = Vec::new();
    let refs = env
        .get("References")
        .map(|r| items(r.get("File")))
        .unwrap_or_default();
    let listed = section(&env, "DiskSection_Type")
        .map(|s| items(s.get("Disk")))
        .unwrap_or_default();
    let found = refs
        .iter()
        .filter_map(|f| attr(f, "ovf:href"))
        .chain(listed.iter().filter_map(|d| attr(d, "ovf:fileRef")));
    for r in found {
        if let Some(pair) = split_ref(&r)
            && !disks.contains(&pair)
        {
            disks.push(pair);
        }
    }
    Ok(OvfIds {
        vm_id,
        snapshots,
        disks,
    })
}

/// A restored disk: the source disk's id and the new disk (with its image
/// id when the engine gave it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    /// Disk id in the saved OVF.
    pub original: String,
    /// The disk the restore created.
    pub new: String,
    /// Its image id.
    pub new_image: Option<String>,
}

/// `xml` without the `<tag …>…</tag>` (or `<tag …/>`) elements that
/// contain `needle`. Elements of `tag` must not nest.
fn drop_elements(xml: &str, tag: &str, needle: &str) -> String {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let boundary = after
            .chars()
            .next()
            .is_some_and(|c| c.is_whitespace() || c == '>' || c == '/');
        if !boundary {
            out.push_str(&rest[..i + open.len()]);
            rest = after;
            continue;
        }
        let Some(gt) = after.find('>') else {
            break;
        };
        let end = if after[..gt].ends_with('/') {
            i + open.len() + gt + 1
        } else {
            match after.find(&close) {
                Some(c) => i + open.len() + c + close.len(),
                None => break,
            }
        };
        if rest[i..end].contains(needle) {
            out.push_str(&rest[..i]);
        } else {
            out.push_str(&rest[..end]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The saved OVF for a new VM `vm_id`: see the module documentation.
/// Disks of the OVF that `restored` does not name are dropped; `also_vm`
/// are more ids of the source VM to replace (the backup metadata's).
pub fn rewrite(
    ovf: &str,
    vm_id: &str,
    restored: &[Swap],
    also_vm: &[&str],
) -> Result<String, String> {
    let found = ids(ovf)?;
    let kept: BTreeSet<&str> = restored.iter().map(|s| s.original.as_str()).collect();
    let mut out = ovf.to_string();
    for (disk, _) in &found.disks {
        if !kept.contains(disk.as_str()) {
            for tag in ["File", "Disk", "Item"] {
                out = drop_elements(&out, tag, disk);
            }
        }
    }
    let mut swaps: Vec<(String, String)> = Vec::new();
    swaps.push((found.vm_id.clone(), vm_id.to_string()));
    for v in also_vm {
        if !v.is_empty() && *v != found.vm_id {
            swaps.push((v.to_string(), vm_id.to_string()));
        }
    }
    for s in &found.snapshots {
        swaps.push((s.clone(), new_uuid()));
    }
    for s in restored {
        swaps.push((s.original.clone(), s.new.clone()));
        if let Some(new_image) = &s.new_image
            && let Some((_, old)) = found.disks.iter().find(|(d, _)| *d == s.original)
            && !old.is_empty()
        {
            swaps.push((old.clone(), new_image.clone()));
        }
    }
    for (from, to) in &swaps {
        if from.len() >= 8 {
            out = out.replace(from.as_str(), to);
        }
    }
    // What comes out must read back with the new ids.
    let back = ids(&out).map_err(|e| format!("the rewritten OVF does not parse: {e}"))?;
    if back.vm_id != vm_id {
        return Err(format!(
            "the rewritten OVF names VM {}, not {vm_id}",
            back.vm_id
        ));
    }
    let new: BTreeSet<&str> = restored.iter().map(|s| s.new.as_str()).collect();
    if let Some((d, _)) = back.disks.iter().find(|(d, _)| !new.contains(d.as_str())) {
        return Err(format!("the rewritten OVF still names disk {d}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "11111111-1111-1111-1111-111111111111";
    const D1: &str = "d1111111-1111-1111-1111-111111111111";
    const I1: &str = "e1111111-1111-1111-1111-111111111111";
    const D2: &str = "d2222222-2222-2222-2222-222222222222";
    const I2: &str = "e2222222-2222-2222-2222-222222222222";
    const SNAP: &str = "55555555-5555-5555-5555-555555555555";

    fn engine_ovf() -> String {
        let file = |d: &str, i: &str| {
            format!(
                "<File ovf:href=\"{d}/{i}\" ovf:id=\"{i}\" ovf:size=\"1048576\" ovf:description=\"\"></File>"
            )
        };
        let disk = |d: &str, i: &str, boot: bool| {
            format!(
                "<Disk ovf:diskId=\"{i}\" ovf:size=\"1\" ovf:fileRef=\"{d}/{i}\" ovf:vm_snapshot_id=\"{SNAP}\" ovf:disk-interface=\"VirtIO\" ovf:boot=\"{boot}\" ovf:disk-alias=\"a\"></Disk>"
            )
        };
        let item = |d: &str, i: &str| {
            format!(
                "<Item><rasd:Caption>a</rasd:Caption><rasd:InstanceId>{i}</rasd:InstanceId><rasd:ResourceType>17</rasd:ResourceType><rasd:HostResource>{d}/{i}</rasd:HostResource><Type>disk</Type><Device>disk</Device></Item>"
            )
        };
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ovf:Envelope xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1/\" xmlns:rasd=\"r\" xmlns:xsi=\"x\"><References>{}{}</References><Section xsi:type=\"ovf:DiskSection_Type\"><Info>List of Virtual Disks</Info>{}{}</Section><Content ovf:id=\"out\" xsi:type=\"ovf:VirtualSystem_Type\"><Name>src</Name><Section ovf:id=\"{VM}\" ovf:required=\"false\" xsi:type=\"ovf:OperatingSystemSection_Type\"><Info>Guest Operating System</Info></Section><Section xsi:type=\"ovf:VirtualHardwareSection_Type\"><Info>1 CPU</Info><Item><rasd:ResourceType>3</rasd:ResourceType></Item>{}{}</Section><Section xsi:type=\"ovf:SnapshotsSection_Type\"><Snapshot ovf:id=\"{SNAP}\"><Type>ACTIVE</Type></Snapshot></Section></Content></ovf:Envelope>",
            file(D1, I1),
            file(D2, I2),
            disk(D1, I1, true),
            disk(D2, I2, false),
            item(D1, I1),
            item(D2, I2),
        )
    }

    #[test]
    fn uuids_are_fresh_v4() {
        let a = new_uuid();
        let b = new_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn reads_the_ids() {
        let got = ids(&engine_ovf()).unwrap();
        assert_eq!(got.vm_id, VM);
        assert_eq!(got.snapshots, vec![SNAP.to_string()]);
        assert_eq!(
            got.disks,
            vec![
                (D1.to_string(), I1.to_string()),
                (D2.to_string(), I2.to_string())
            ]
        );
        assert!(ids("<vm/>").is_err());
    }

    #[test]
    fn new_ids_everywhere_and_unrestored_disks_dropped() {
        let new_vm = new_uuid();
        let new_disk = new_uuid();
        let new_image = new_uuid();
        let out = rewrite(
            &engine_ovf(),
            &new_vm,
            &[Swap {
                original: D1.into(),
                new: new_disk.clone(),
                new_image: Some(new_image.clone()),
            }],
            &[VM],
        )
        .unwrap();
        for old in [VM, D1, I1, D2, I2, SNAP] {
            assert!(!out.contains(old), "{old} left in {out}");
        }
        let got = ids(&out).unwrap();
        assert_eq!(got.vm_id, new_vm);
        assert_eq!(got.disks, vec![(new_disk.clone(), new_image.clone())]);
        assert_eq!(got.snapshots.len(), 1);
        // One File, one Disk, one disk Item (and the CPU Item) left.
        assert_eq!(out.matches("<File ").count(), 1);
        assert_eq!(out.matches("<Disk ").count(), 1);
        assert_eq!(out.matches("<Item>").count(), 2);
        assert!(out.contains("<Section xsi:type=\"ovf:DiskSection_Type\">"));
        // Nothing restored: no disk at all.
        let out = rewrite(&engine_ovf(), &new_vm, &[], &[]).unwrap();
        assert!(ids(&out).unwrap().disks.is_empty());
        assert!(!out.contains(D1) && !out.contains(D2));
    }

    #[test]
    fn drop_elements_leaves_prefixes_and_others() {
        let x = "<a><Disks/><Disk x=\"1\"/><Disk x=\"2\"></Disk><DiskX>1</DiskX></a>";
        assert_eq!(
            drop_elements(x, "Disk", "1"),
            "<a><Disks/><Disk x=\"2\"></Disk><DiskX>1</DiskX></a>"
        );
    }
}
