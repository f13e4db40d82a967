//! S3's XML answers (`store::s3::sign::parse_xml`, what the Object Lock code reads listings,
//! retention and errors with): never a panic, nesting bounded, and a parsed tree's depth stays
//! within the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn depth(n: &cbtfs::repo::store::s3::sign::Node) -> usize {
    1 + n.children.iter().map(depth).max().unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(root) = cbtfs::repo::store::s3::sign::parse_xml(&text) {
        assert!(depth(&root) <= 17);
        let _ = root.text_of("IsTruncated");
        let _ = root.all("Version").count();
    }
});
