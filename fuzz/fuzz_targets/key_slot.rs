//! A key slot record (`repo::keys::open_slot_record`: checksum, format, fields, KDF cost bound,
//! then the unwrap) from arbitrary bytes, and the same with a valid checksum appended so the JSON,
//! the checks and the KDF are reached, tried with a fixed password and a fixed key file. The
//! cost bound is lowered to a few MiB so that the fuzzer's slots stay cheap; `unlock` uses
//! `KdfCost::MAX`. Whatever opens is an encrypted repository's keys.
#![no_main]

use cbtfs::repo::keys::{KdfCost, Secret, open_slot_record};
use libfuzzer_sys::fuzz_target;

const LIMIT: KdfCost = KdfCost {
    m_kib: 8 * 1024,
    t: 4,
    p: 4,
};

fn try_secrets(bytes: &[u8]) {
    let secrets = [
        Secret::Password("fuzz password".into()),
        Secret::KeyFile {
            path: "fuzz.key".into(),
            key: [7; 32],
        },
    ];
    for secret in &secrets {
        match open_slot_record("fuzz-repo", "0123456789abcdef", bytes, secret, &LIMIT) {
            Ok(Some(keys)) => {
                assert!(keys.encrypted());
                let sealed = keys.seal(b"x", b"y");
                assert_eq!(keys.open(b"x", &sealed).as_deref(), Ok(&b"y"[..]));
            }
            Ok(None) => {}
            Err(why) => assert!(!why.is_empty()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    try_secrets(data);
    let mut signed = data.to_vec();
    signed.extend_from_slice(format!("\ncbtfs-crc32c:{:08x}\n", crc32c::crc32c(data)).as_bytes());
    try_secrets(&signed);
});
