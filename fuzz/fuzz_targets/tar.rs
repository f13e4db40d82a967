//! The tar reader (`tar::members`) on arbitrary bytes: None or members that lie inside the
//! input; a tar built from the members read back gives the same members.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(members) = cbtfs::tar::members(data) else {
        return;
    };
    let total: usize = members.iter().map(|(_, b)| b.len()).sum();
    assert!(total <= data.len());
    // Names of at most 100 bytes survive a rebuild (longer ones are cut by the format).
    if members
        .iter()
        .all(|(n, _)| n.len() <= 100 && !n.contains('\0'))
    {
        let files: Vec<(&str, &[u8])> = members.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        let rebuilt = cbtfs::tar::build(&files);
        let back = cbtfs::tar::members(&rebuilt).expect("a built tar reads back");
        assert_eq!(back.len(), members.len());
        for ((n1, b1), (n2, b2)) in back.iter().zip(members.iter()) {
            assert_eq!(b1, b2);
            assert_eq!(n1.trim_end_matches('\0'), n2.as_str());
        }
    }
});
