//! The simulated host's HTTP request-head parser (`sim::http::parse_head`) on arbitrary bytes:
//! an error, "need more", or a head that lies inside the input and whose accessors never panic.
#![no_main]

use cbtfs::sim::http::{MAX_HEAD, MAX_HEADERS, parse_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_head(data) {
        Ok(Some((head, n))) => {
            assert!(n <= data.len());
            assert!(head.headers.len() <= MAX_HEADERS);
            assert!(head.target.len() <= MAX_HEAD);
            let _ = head.content_length();
            let _ = head.query();
            let _ = head.keep_alive();
            assert!(head.target.starts_with(head.path()));
        }
        // Not complete yet: never more than a bounded amount is waited for.
        Ok(None) => assert!(data.len() < MAX_HEAD + 64),
        Err(_) => {}
    }
});
