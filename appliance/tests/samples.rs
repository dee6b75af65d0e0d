//! Real descriptors (tests/data/ovf, origins in its README) parse to what
//! `expected.json` (computed independently with Python's ElementTree)
//! says, and each gives a guest.

use std::path::Path;

use appliance::ovf;

fn data() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ovf"))
}

#[test]
fn real_descriptors_parse_as_their_exporters_meant() {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data().join("expected.json")).unwrap()).unwrap();
    let expected = expected.as_object().unwrap();
    assert!(expected.len() >= 8, "{} samples", expected.len());
    for (file, want) in expected {
        let xml = std::fs::read(data().join(file)).unwrap();
        let d = ovf::parse(&xml).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            d.name.as_deref().or(d.system_id.as_deref()),
            want["name"].as_str(),
            "{file}: name"
        );
        if let Some(cpus) = want["cpus"].as_u64() {
            let got = d
                .items
                .iter()
                .find(|i| i.resource_type == 3)
                .and_then(|i| i.virtual_quantity);
            assert_eq!(got, Some(cpus), "{file}: cpus");
        }
        let disks = want["disks"].as_array().unwrap();
        assert_eq!(d.disks.len(), disks.len(), "{file}: disks");
        for (got, want) in d.disks.iter().zip(disks) {
            assert_eq!(
                got.capacity,
                want["capacity_bytes"].as_u64(),
                "{file}: {got:?}"
            );
            let href = got
                .file_ref
                .as_ref()
                .and_then(|id| d.files.iter().find(|f| &f.id == id))
                .map(|f| f.href.as_str());
            assert_eq!(href, want["file_href"].as_str(), "{file}: {got:?}");
            assert_eq!(got.format.as_deref(), want["format"].as_str(), "{file}");
        }
        let nics = d.items.iter().filter(|i| i.resource_type == 10).count();
        assert_eq!(nics as u64, want["nics"].as_u64().unwrap(), "{file}: nics");
        if file.contains("cot-iosv") {
            // Four deployment options; the default one has 2 NICs.
            assert_eq!(d.configuration.as_deref(), Some("1CPU-384MB-2NIC"));
        }
        if let Some(os) = want["os"]["description"].as_str() {
            assert_eq!(d.os.as_deref(), Some(os), "{file}: os");
        }
        let (spec, imports, warnings) = d
            .guest("fallback")
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        if let Some(mib) = want["memory_mib"].as_u64() {
            assert_eq!(spec.memory_mib, mib, "{file}: memory");
        }
        assert_eq!(imports.len(), disks.len(), "{file}: {warnings:?}");
        assert_eq!(spec.disks.len(), disks.len(), "{file}");
        eprintln!("{file}: {spec:?} warnings {warnings:?}");
    }
}
