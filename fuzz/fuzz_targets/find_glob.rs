//! `find`'s shell-glob matcher over a guest's file names (untrusted) and a user's pattern:
//! never panics, stays quadratic, and agrees with two facts every glob obeys.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Pattern, a NUL, then the name (names hold no NUL and no `/`).
    let (pat, name) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let name: Vec<u8> = name
        .iter()
        .copied()
        .filter(|&b| b != 0 && b != b'/')
        .take(255)
        .collect();
    let _ = cbtfs::find::glob_match(pat, &name);
    // Every byte escaped: matches exactly the name itself.
    let escaped: Vec<u8> = name.iter().flat_map(|&b| [b'\\', b]).collect();
    assert!(cbtfs::find::glob_match(&escaped, &name));
    // `*` matches every name but those starting with a dot.
    assert_eq!(
        cbtfs::find::glob_match(b"*", &name),
        name.first() != Some(&b'.')
    );
});
