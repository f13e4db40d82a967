//! The NBD client's handshake (greeting, option replies, GO or EXPORT_NAME) and then its
//! reply reader: the input is everything the server sends. Nothing may panic, hang or
//! allocate without bound; an export whose size was never stated must never be accepted.
#![no_main]

use cbtfs::nbd::client::{Client, handshake_plain};
use libfuzzer_sys::fuzz_target;

#[path = "nbd_stream.rs"]
mod nbd_stream;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut s = nbd_stream::Script::new(data);
        let Ok(n) = handshake_plain(&mut s, "disk", "fuzz").await else {
            return;
        };
        if n.status_context.is_some() {
            assert!(n.structured);
        }
        s.gate(28 * nbd_stream::REQUESTS.len());
        let c = Client::over(s, n, 8, "fuzz".into());
        nbd_stream::drive(c).await;
    });
});
