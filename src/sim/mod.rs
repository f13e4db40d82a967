//! A simulated XenServer host, for tests and the demo. For now its NBD server (`nbd`), which
//! behaves as xen-api's xapi-nbd does; the management API follows with `cbtfs backup`.

pub mod nbd;
