//! A point manifest (`repo::decode_point_manifest`: checksum, format, fields, then the
//! checks that keep its names in its set and its counts consistent) from arbitrary bytes, and
//! the same with a valid checksum appended so the JSON and the checks are reached. Whatever is
//! accepted names only plain objects of its set and re-encodes to a manifest that decodes the
//! same.
#![no_main]

use cbtfs::repo::{
    self, ObjectKind, PointManifest, decode_point_manifest, manifest, valid_object_name,
};
use libfuzzer_sys::fuzz_target;

fn accepted(m: &PointManifest) {
    for (f, kind) in [
        (Some(&m.index), ObjectKind::Index),
        (Some(&m.data), ObjectKind::Data),
        (m.vm_metadata.as_ref(), ObjectKind::VmMetadata),
    ] {
        if let Some(f) = f {
            assert!(valid_object_name(&f.name, kind));
            assert!(!f.name.contains('/') && !f.name.contains("..") && !f.name.contains('\0'));
        }
    }
    assert!(repo::valid_set_name(&m.set) && !m.set.contains('/') && !m.set.contains(".."));
    assert!(repo::valid_uuid(&m.vdi));
    assert!(m.virtual_size <= repo::MAX_VIRTUAL_SIZE);
    assert!(m.data_blocks <= m.changed_blocks);
    let _ = m.label();
    let again = decode_point_manifest(&manifest::encode(m), "again").expect("re-encoded");
    assert_eq!(&again, m);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_point_manifest(data, "fuzz.point") {
        accepted(&m);
    }
    // The JSON alone, checksummed as a writer would.
    let mut signed = data.to_vec();
    signed.extend_from_slice(format!("\ncbtfs-crc32c:{:08x}\n", crc32c::crc32c(data)).as_bytes());
    if let Ok(m) = decode_point_manifest(&signed, "fuzz.point") {
        accepted(&m);
    }
});
