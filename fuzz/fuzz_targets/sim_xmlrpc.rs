//! The simulated host's XML-RPC decoder (`sim::xmlrpc`) on arbitrary text: an error or a value;
//! a decoded value encodes to a document that decodes again.
#![no_main]

use cbtfs::sim::xmlrpc::{decode_call, decode_value, encode_value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(v) = decode_value(&text) {
        let again = decode_value(&encode_value(&v)).expect("an encoded value decodes");
        // Integers travel untyped (as text), so compare the re-encoding instead.
        assert_eq!(encode_value(&again), encode_value(&v));
    }
    if let Ok((name, params)) = decode_call(&text) {
        assert!(!name.is_empty());
        for p in &params {
            decode_value(&encode_value(p)).expect("a parameter re-encodes");
        }
    }
});
