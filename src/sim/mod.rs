//! A simulated XenServer host, for tests and the demo: its state and management API (`host`),
//! copy-on-write disks (`disk`), its networks (`network`), HTTPS and the HTTP handlers (`server` over
//! its own HTTP/1.1 in `http`), and an NBD server that behaves as xen-api's xapi-nbd does (`nbd`).
//! It follows the real wire formats and error codes, with its own encoders (`xmlrpc`, `tar`, the
//! NBD numbers) written from the protocol documents: it shares no wire code with the client.

pub mod disk;
pub mod host;
pub mod http;
pub mod nbd;
pub mod network;
pub mod server;
pub mod tar;
pub mod xmlrpc;

pub use server::{NbdMode, Sim, SimConfig};
