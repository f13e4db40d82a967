//! JSON-RPC response decoding (`xapi::client::decode_json_reply`) of arbitrary bytes, and the
//! VDI record reader on whatever result it yields: never a panic.
#![no_main]

use cbtfs::xapi::VdiRecord;
use cbtfs::xapi::client::{JsonReply, decode_json_reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode_json_reply(data) {
        JsonReply::Result(v) => {
            let _ = VdiRecord::from_value(&v);
        }
        JsonReply::Failure(code, params) => {
            let f = cbtfs::xapi::ApiFailure {
                call: "VDI.get_record".into(),
                code,
                params,
            };
            let _ = f.kind();
            let _ = f.to_string();
        }
        JsonReply::NotJson | JsonReply::Empty => {}
    }
});
