//! NBD URI parsing: any text gives a URI or an error naming what is wrong, never a panic;
//! a session id in the text never reaches the error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match cbtfs::nbd::uri::parse(text) {
        Ok(u) => {
            if let cbtfs::nbd::client::Address::Tcp { host, .. } = &u.address {
                assert!(!host.is_empty());
            }
        }
        Err(e) => {
            // The text whole (with its session id) never shows; only the redacted form does.
            const REDACTED: &str = "session_id=<redacted>";
            if let Some(i) = text.find("session_id")
                && !text.contains("redacted")
                && !REDACTED.starts_with(&text[i..])
            {
                assert!(!e.contains(text), "{e}");
            }
        }
    }
});
