//! The simulated host's ustar reader (`sim::tar::read`) on arbitrary bytes: an error or members
//! inside the input; members written again read back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(members) = cbtfs::sim::tar::read(data) else {
        return;
    };
    let total: usize = members.iter().map(|(_, b)| b.len()).sum();
    assert!(total <= data.len());
    if members
        .iter()
        .all(|(n, _)| n.len() <= 100 && !n.contains('\0'))
    {
        let files: Vec<(&str, &[u8])> = members.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        let rebuilt = cbtfs::sim::tar::write(&files);
        let back = cbtfs::sim::tar::read(&rebuilt).expect("reads back");
        assert_eq!(back.len(), members.len());
        for ((n1, b1), (n2, b2)) in back.iter().zip(members.iter()) {
            assert_eq!(b1, b2);
            assert_eq!(n1.trim_end_matches('\0'), n2.trim_end_matches('\0'));
        }
    }
});
