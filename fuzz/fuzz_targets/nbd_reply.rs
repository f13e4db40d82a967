//! The NBD client's reply reader: the input is the server's byte stream after the handshake,
//! read while reads and a block status request are pending. Nothing may panic, hang or
//! allocate beyond what the requests justify; every answer must be well formed.
#![no_main]

use cbtfs::nbd::client::{Client, Negotiated};
use cbtfs::nbd::proto::ExportInfo;
use libfuzzer_sys::fuzz_target;

#[path = "nbd_stream.rs"]
mod nbd_stream;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses what negotiation agreed.
    let Some((&mode, server)) = data.split_first() else {
        return;
    };
    let structured = mode & 1 != 0;
    let n = Negotiated {
        info: ExportInfo {
            size: 1 << 20,
            flags: 3,
            min_block: 0,
            max_block: 0,
        },
        structured,
        status_context: (structured && mode & 2 != 0).then_some(u32::from(mode >> 2)),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut s = nbd_stream::Script::new(server);
        // Replies start once every request is on the wire (28 bytes each).
        s.gate(28 * nbd_stream::REQUESTS.len());
        let c = Client::over(s, n, 8, "fuzz".into());
        nbd_stream::drive(c).await;
    });
});
