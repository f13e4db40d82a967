//! The XenServer management API (XenAPI) as the real host speaks it: JSON-RPC with an XML-RPC
//! fallback (`client`, `xmlrpc`), typed errors with advice (`error`), the records and calls
//! backup and restore need (`api`), and TLS trust for HTTPS (`trust`).

pub mod api;
pub mod client;
pub mod error;
pub mod trust;
pub mod xmlrpc;

pub use api::{NULL_REF, NbdInfo, VbdRecord, VdiRecord, VmRecord};
pub use client::{HostConfig, Xapi};
pub use error::{ApiFailure, Failure, XapiError};
pub use trust::HostTrust;
