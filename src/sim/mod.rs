//! A simulated XenServer host, for tests and the demo: its state and management API (`host`),
//! copy-on-write disks (`disk`), HTTPS and the HTTP handlers (`server`), and an NBD server that
//! behaves as xen-api's xapi-nbd does (`nbd`). It follows the real wire formats and error codes.

pub mod disk;
pub mod host;
pub mod nbd;
pub mod server;

pub use server::{NbdMode, Sim, SimConfig};
