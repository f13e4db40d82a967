//! The LVM2 metadata text parser and LV mapping (`cbtfs::volumes::lvm_text_layout`) on any
//! text, with two PVs whose uuids are `pvA` and `pvB` (1 TiB each, on a 4 TiB disk): the
//! seeds (`fuzz/seeds/lvm_text/`) are real-looking VG metadata naming them.
#![no_main]

use cbtfs::volumes::lvm_text_layout;
use libfuzzer_sys::fuzz_target;

const DISK: u64 = 4 << 40;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let pvs = [
        ("pvA", 1 << 20, 1 << 40),
        ("pvB", (1 << 40) + (1 << 20), 1 << 40),
    ];
    let Ok(layout) = lvm_text_layout(&text, &pvs, DISK) else {
        return;
    };
    let text = layout.to_text();
    // `CBTFS_FUZZ_PRINT=1 cargo fuzz run TARGET FILE` shows what an input makes.
    if std::env::var_os("CBTFS_FUZZ_PRINT").is_some() {
        eprintln!("{text}");
    }
    for v in &layout.volumes {
        for offset in [0, v.size / 3, v.size.saturating_sub(1), v.size] {
            let mut total = 0u64;
            for (disk, l) in v.map(offset, 1 << 20) {
                assert!(disk.checked_add(l).is_some_and(|e| e <= DISK), "{v:?}");
                total += l;
            }
            assert_eq!(total, v.size.saturating_sub(offset).min(1 << 20), "{v:?}");
        }
    }
});
