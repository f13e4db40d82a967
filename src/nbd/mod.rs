//! The NBD client: fixed newstyle negotiation, TLS pinned to the host's certificate,
//! structured replies and block status where the server has them, many pipelined connections.
//!
//! `proto` is the codec (pure, property-tested); `client` one connection (its handshake and
//! reply reader are the `nbd_handshake` and `nbd_reply` fuzz targets); `fetch` many;
//! `tls` the trust rules; `uri` NBD URIs. Read-only: no write command is ever sent.

mod buffers;
pub mod client;
pub mod fetch;
pub mod proto;
pub mod tls;
pub mod uri;

pub use client::{Address, Client, NbdError, Target};
pub use fetch::{FetchError, FetchOptions, Pool};
pub use tls::Trust;
