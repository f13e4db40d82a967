//! XML-RPC decoding (`xapi::xmlrpc::decode_response`, `decode_value`) of arbitrary text: an
//! error or a value, never a panic or unbounded recursion; a decoded value re-encodes to XML
//! that decodes again.
#![no_main]

use cbtfs::xapi::xmlrpc;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(v) = xmlrpc::decode_response(&text) {
        let again = xmlrpc::decode_response(&xmlrpc::encode_response(&v));
        assert!(again.is_ok(), "re-encoded response refused: {again:?}");
    }
    if let Ok(v) = xmlrpc::decode_value(&text) {
        let again = xmlrpc::decode_value(&xmlrpc::encode_value_fragment(&v));
        assert!(again.is_ok(), "re-encoded value refused: {again:?}");
    }
    let _ = xmlrpc::decode_call(&text);
});
