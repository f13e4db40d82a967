//! A point manifest's plain JSON (`repo::decode_point_manifest`: checksum, format, fields, then
//! the checks that keep its object keys to the writers' shapes and its counts consistent) from
//! arbitrary bytes, and the same with a valid checksum appended so the JSON and the checks are
//! reached. Whatever is accepted names only objects of the repository's own prefixes and
//! re-encodes to a manifest that decodes the same.
#![no_main]

use cbtfs::repo::{self, PointManifest, decode_point_manifest, manifest};
use libfuzzer_sys::fuzz_target;

fn plain_key(k: &str, prefix: &str) {
    let rest = k.strip_prefix(prefix).expect("its prefix");
    assert!(rest.len() == 32 && rest.bytes().all(|c| c.is_ascii_hexdigit()));
}

fn accepted(m: &PointManifest) {
    plain_key(&m.index.key, "pindex/");
    if let Some(v) = &m.vm_metadata {
        plain_key(&v.key, "meta/");
    }
    assert!(repo::valid_set_name(&m.set) && !m.set.contains('/') && !m.set.contains(".."));
    assert!(repo::valid_uuid(&m.vdi));
    assert!(m.virtual_size <= repo::MAX_VIRTUAL_SIZE);
    assert!(m.data_blocks <= m.changed_blocks);
    assert!(m.generation >= 1);
    if let Some(c) = &m.copied_from {
        assert!(repo::valid_set_name(&c.set));
        for id in [&c.repo, &c.point] {
            assert!(id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()));
        }
    }
    let _ = m.label();
    let _ = m.key();
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
