//! The simulated host's state and its management API: VMs, VDIs, VBDs and one SR, sessions,
//! CBT as the storage manager keeps it, and the calls backup and restore make, answering with
//! xen-api's error codes and parameters.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use roaring::RoaringBitmap;
use serde_json::{Value, json};

use super::disk::Image;
use super::network::Net;
use crate::blocks_for;

/// An API failure: `ErrorDescription` (code first).
pub type Failure = Vec<String>;

fn fail(code: &str, params: &[&str]) -> Failure {
    std::iter::once(code.to_string())
        .chain(params.iter().map(|s| s.to_string()))
        .collect()
}

/// xapi's null reference.
pub const NULL_REF: &str = "OpaqueRef:NULL";

/// Unix seconds as xapi's XML-RPC `dateTime.iso8601` text (`20261123T10:00:00Z`).
fn xapi_time(unix: i64) -> String {
    let f = time::macros::format_description!("[year][month][day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(f).ok())
        .unwrap_or_else(|| "19700101T00:00:00Z".into())
}

pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn new_ref() -> String {
    format!("OpaqueRef:{}", new_uuid())
}

/// CBT state of a VDI: which set (chain) it belongs to and its place in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cbt {
    pub chain: u64,
    pub seq: u64,
}

#[derive(Debug)]
pub struct Vdi {
    pub uuid: String,
    pub name_label: String,
    /// `user`, `system`, `ephemeral`, ..., `cbt_metadata` after data_destroy.
    pub kind: String,
    pub on_boot: String,
    pub virtual_size: u64,
    pub is_a_snapshot: bool,
    pub snapshot_of: String,
    pub snapshot_time: i64,
    /// None once the data is destroyed.
    pub image: Option<Image>,
    pub cbt: Option<Cbt>,
    /// Live disks: blocks written since their last snapshot.
    pub dirty: RoaringBitmap,
    pub other_config: BTreeMap<String, String>,
    pub vbds: Vec<String>,
    /// Open NBD connections and HTTP transfers (each plugs a VBD in dom0).
    pub users: usize,
    /// The VBDs of closed connections are still unplugging until then.
    pub busy_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Vbd {
    pub vm: String,
    pub vdi: String,
    pub attached: bool,
    /// The disk's position in its VM (`0`, `1`, ...), xapi's `userdevice`.
    pub userdevice: String,
}

/// A host of the pool: its reference, uuid, address and server certificate (PEM).
#[derive(Debug, Clone)]
pub struct PoolHost {
    pub reference: String,
    pub uuid: String,
    pub address: String,
    pub cert_pem: String,
}

#[derive(Debug)]
pub struct Vm {
    pub uuid: String,
    pub name_label: String,
    pub vbds: Vec<String>,
    pub power_state: String,
    /// xapi's `tags` (a string set: what `xe vm-param-add param-name=tags` adds).
    pub tags: Vec<String>,
    pub is_a_template: bool,
    /// dom0: every host has one; it is never backed up.
    pub is_control_domain: bool,
}

/// A VM (and its disks) the host deletes when a call reaches one of them (a user running
/// `xe vm-uninstall` while a backup goes on).
#[derive(Debug, Clone)]
pub struct VmDeletion {
    /// The VM's name label.
    pub vm: String,
    /// The method (`VDI.snapshot`, `VDI.get_nbd_info`, ...) whose first call on one of the
    /// VM's disks, or on a snapshot of one, deletes it just before that call is answered.
    pub at: String,
}

/// Faults and host states tests switch on.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// No Enterprise licence: enabling CBT fails.
    pub no_licence: bool,
    /// The SR is detached.
    pub sr_detached: bool,
    /// NBD connections drop after this many requests.
    pub nbd_drop_after: Option<u64>,
    /// `/export_raw_vdi` answers 200 with an error page.
    pub export_error_page: bool,
    /// `/export_raw_vdi` first answers 302 to another path.
    pub export_redirect: bool,
    /// `/export_raw_vdi` sends this many bytes more than the VDI holds (a hostile host).
    pub export_extra_bytes: u64,
    /// Extra blocks list_changed_blocks reports (CBT may over-report).
    pub overreport: Vec<u32>,
    /// How long a VDI stays "in use" after its last NBD connection closed.
    pub unplug_delay: Duration,
    /// The SR has this many bytes free (VDI.create, import_raw_vdi).
    pub sr_free: Option<u64>,
    /// New snapshots come attached to the VM (as if someone plugged them).
    pub attach_snapshots: bool,
    /// Bytes added to (or, negative, cut from) every list_changed_blocks bitmap.
    pub bitmap_len_delta: i64,
    /// `/import_raw_vdi` drops the connection after this many bytes.
    pub import_drop_after: Option<u64>,
    /// `/export_raw_vdi` closes the connection after this many bytes of the body (a short
    /// close-delimited body).
    pub export_close_after: Option<u64>,
    /// `/export_metadata` closes the connection after this many bytes of the archive.
    pub metadata_close_after: Option<u64>,
    /// network, PIF and host calls answer `RBAC_PERMISSION_DENIED` (a user whose role may not
    /// read them): a client cannot learn the NBD network's purpose.
    pub networks_denied: bool,
    /// The next `VDI.snapshot` makes the snapshot, then its answer never comes (the client
    /// waits until it is killed). Cleared when it fires.
    pub withhold_snapshot_reply: bool,
    /// The next `VDI.add_to_other_config` after a `VDI.snapshot` answered never answers and
    /// changes nothing: the client hangs between making a snapshot and tagging it. Cleared
    /// when it fires.
    pub hang_after_snapshot: bool,
    /// `/export_raw_vdi` answers 302 to the same request at this base URL
    /// (`https://ADDRESS:PORT`, a pool member holding the disk); the member serves it.
    pub export_redirect_to: Option<String>,
    /// `/export_raw_vdi` stops sending (and never ends the body) after this many bytes.
    pub export_hangs_after: Option<u64>,
    /// `/import_raw_vdi` stops reading the upload (and never answers) after this many bytes.
    pub import_hangs_after: Option<u64>,
    /// The management API and the HTTP handlers accept connections (and TLS) but never
    /// answer a request (a hung xapi).
    pub api_hangs: bool,
    /// NBD connections the host serves at once over all its addresses; one more is closed
    /// right after accept (xapi-nbd's limit is 16, shared with every other client). None: 16.
    pub nbd_connection_limit: Option<usize>,
    /// NBD addresses that are down: a connection to one is closed right after accept, and
    /// open connections to it end at their next request.
    pub nbd_down: std::collections::BTreeSet<String>,
    /// (address, n): that address goes down once it has served n requests in all.
    pub nbd_dies_after: Option<(String, u64)>,
    /// Delete a VM with its VBDs and disks (not their snapshots, as `xe vm-uninstall`) when
    /// a call reaches it. Cleared when it fires.
    pub delete_vm: Option<VmDeletion>,
    /// NBD reads wait until this many connections have been served at once (`nbd_peak`):
    /// a test's proof that disks were read concurrently (a run that reads one disk at a
    /// time never gets past it).
    pub nbd_hold_reads_until: Option<usize>,
}

#[derive(Debug)]
pub struct State {
    pub dir: PathBuf,
    pub user: String,
    pub password: String,
    /// Some(master address): this host is a pool member.
    pub slave_of: Option<String>,
    /// The pool's hosts (`host.get_all`), the master first.
    pub hosts: Vec<PoolHost>,
    pub sessions: HashMap<String, String>,
    pub vdis: BTreeMap<String, Vdi>,
    pub vbds: BTreeMap<String, Vbd>,
    pub vms: BTreeMap<String, Vm>,
    pub tasks: BTreeMap<String, (String, String)>,
    pub sr_ref: String,
    pub sr_uuid: String,
    /// Changed blocks of every snapshot of every CBT chain, by position: kept when snapshots are
    /// destroyed (their bitmaps merge forward).
    pub cbt_history: HashMap<u64, BTreeMap<u64, RoaringBitmap>>,
    pub next_chain: u64,
    pub faults: Faults,
    /// The NBD server: (port, certificate PEM, subject); None when the host runs none.
    pub nbd: Option<(u16, String, String)>,
    /// Networks, PIFs and the host record; `get_nbd_info` lists the addresses of PIFs on
    /// networks whose purpose is `nbd` or `insecure_nbd`.
    pub net: Net,
    /// The addresses the NBD server listens on, (ip, port), one get_nbd_info record each (a
    /// host lists one per address on an NBD network); empty: 127.0.0.1 and `nbd`'s port.
    pub nbd_addresses: Vec<(String, u16)>,
    /// NBD requests served, by the address the client connected to.
    pub nbd_requests: BTreeMap<String, u64>,
    /// Benchmarks: get_nbd_info names this server instead (address, port, export, cert,
    /// subject), e.g. a qemu-nbd serving the same bytes.
    pub nbd_override: Option<(String, u16, String, String, String)>,
    /// Methods called, in order (tests check the procedure).
    pub calls: Vec<String>,
    /// Bytes served over NBD and /export_raw_vdi.
    pub served_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub clock: i64,
    /// Set by `dispatch` when a fault withholds the answer to the call it just made.
    pub withhold_reply: bool,
    /// A `VDI.snapshot` answered and `hang_after_snapshot` waits for the tagging call.
    snapshot_answered: bool,
    /// The pool (`pool.get_all` answers this one reference) and its name label (xapi's
    /// default for a new pool is empty).
    pub pool_ref: String,
    pub pool_uuid: String,
    pub pool_name: String,
    /// The most NBD connections served at once, and the connections closed at accept
    /// because the limit was reached (a client that kept to the limit never sees one).
    pub nbd_peak: usize,
    pub nbd_refused: u64,
    /// NBD connections dropped by `faults.nbd_drop_after`.
    pub nbd_dropped: u64,
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

impl State {
    /// How the NBD server treats a new connection to `address`.
    pub fn nbd_admission(&self, address: &str) -> (usize, bool) {
        (
            self.faults
                .nbd_connection_limit
                .unwrap_or(super::nbd::MAX_CONNECTIONS),
            self.faults.nbd_down.contains(address),
        )
    }

    /// Count a request to be served over a connection to `address`; false when the address
    /// is down (the connection ends instead).
    pub fn nbd_serving(&mut self, address: &str) -> bool {
        if self.faults.nbd_down.contains(address) {
            return false;
        }
        let n = self.nbd_requests.entry(address.to_string()).or_insert(0);
        *n += 1;
        if let Some((a, limit)) = &self.faults.nbd_dies_after
            && a == address
            && *n > *limit
        {
            self.faults.nbd_down.insert(address.to_string());
            return false;
        }
        true
    }

    pub fn new(dir: PathBuf, user: &str, password: &str) -> State {
        let mut st = State {
            dir,
            user: user.into(),
            password: password.into(),
            slave_of: None,
            hosts: Vec::new(),
            sessions: HashMap::new(),
            vdis: BTreeMap::new(),
            vbds: BTreeMap::new(),
            vms: BTreeMap::new(),
            tasks: BTreeMap::new(),
            sr_ref: new_ref(),
            sr_uuid: new_uuid(),
            cbt_history: HashMap::new(),
            next_chain: 1,
            faults: Faults {
                unplug_delay: Duration::from_millis(300),
                ..Faults::default()
            },
            nbd: None,
            net: Net::new("127.0.0.1", "xenserver-sim", "", &[]),
            nbd_addresses: Vec::new(),
            nbd_requests: BTreeMap::new(),
            nbd_override: None,
            calls: Vec::new(),
            served_bytes: Default::default(),
            clock: 0,
            withhold_reply: false,
            snapshot_answered: false,
            pool_ref: new_ref(),
            pool_uuid: new_uuid(),
            pool_name: String::new(),
            nbd_peak: 0,
            nbd_refused: 0,
            nbd_dropped: 0,
        };
        // Every host runs its control domain: listed among the VMs, never backed up.
        st.vms.insert(
            new_ref(),
            Vm {
                uuid: new_uuid(),
                name_label: "Control domain on host: xenserver-sim".into(),
                vbds: Vec::new(),
                power_state: "Running".into(),
                tags: Vec::new(),
                is_a_template: false,
                is_control_domain: true,
            },
        );
        st
    }

    /// Tag the VM named `name` (every VM of that name).
    pub fn tag_vm(&mut self, name: &str, tag: &str) {
        for v in self.vms.values_mut().filter(|v| v.name_label == name) {
            if !v.tags.iter().any(|t| t == tag) {
                v.tags.push(tag.to_string());
            }
        }
    }

    /// Turn the VM named `name` into a template (`xe vm-param-set is-a-template=true`): its
    /// disks stay, and no backup job selects it.
    pub fn make_template(&mut self, name: &str) {
        for v in self.vms.values_mut().filter(|v| v.name_label == name) {
            v.is_a_template = true;
            v.power_state = "Halted".into();
        }
    }

    /// `xe vm-uninstall`: the VM, its VBDs and its disks go; snapshots of the disks stay
    /// (their `snapshot_of` then names nothing, as on a real host).
    pub fn uninstall_vm(&mut self, vm_ref: &str) {
        let Some(vm) = self.vms.remove(vm_ref) else {
            return;
        };
        for b in &vm.vbds {
            if let Some(vbd) = self.vbds.remove(b) {
                self.vdis.remove(&vbd.vdi);
            }
        }
    }

    /// The VM a VDI (or the disk a snapshot is of) belongs to.
    fn vm_of_vdi(&self, vdi_ref: &str) -> Option<String> {
        let v = self.vdis.get(vdi_ref)?;
        let disk = if v.is_a_snapshot {
            v.snapshot_of.as_str()
        } else {
            vdi_ref
        };
        self.vbds
            .values()
            .find(|b| b.vdi == disk)
            .map(|b| b.vm.clone())
    }

    /// `VM.get_record`'s fields as xen-api's datamodel (datamodel_vm.ml) names them, those a
    /// client may read to choose VMs.
    fn vm_record(&self, r: &str) -> Result<Value, Failure> {
        let v = self
            .vms
            .get(r)
            .ok_or_else(|| fail("HANDLE_INVALID", &["VM", r]))?;
        let resident = if v.power_state == "Running" {
            self.net.host_ref.clone()
        } else {
            NULL_REF.to_string()
        };
        Ok(json!({
            "uuid": v.uuid,
            "name_label": v.name_label,
            "name_description": "",
            "power_state": v.power_state,
            "is_a_template": v.is_a_template,
            "is_default_template": false,
            "is_a_snapshot": false,
            "snapshot_of": NULL_REF,
            "snapshots": [],
            "snapshot_time": xapi_time(0),
            "is_control_domain": v.is_control_domain,
            "resident_on": resident,
            "affinity": NULL_REF,
            "domid": if v.power_state == "Running" { "1" } else { "-1" },
            "VBDs": v.vbds,
            "VIFs": [],
            "tags": v.tags,
            "other_config": {},
            "blocked_operations": {},
            "user_version": "1",
        }))
    }

    /// Add a VM with one disk per image; returns (vm uuid, vdi uuids).
    pub fn add_vm(&mut self, name: &str, disks: Vec<(String, Image)>) -> (String, Vec<String>) {
        let vm_ref = new_ref();
        let vm_uuid = new_uuid();
        let mut vbds = Vec::new();
        let mut uuids = Vec::new();
        for (label, image) in disks {
            let vdi_ref = self.add_vdi(&label, image);
            let vbd = new_ref();
            self.vbds.insert(
                vbd.clone(),
                Vbd {
                    vm: vm_ref.clone(),
                    vdi: vdi_ref.clone(),
                    attached: true,
                    userdevice: vbds.len().to_string(),
                },
            );
            if let Some(v) = self.vdis.get_mut(&vdi_ref) {
                v.vbds.push(vbd.clone());
                uuids.push(v.uuid.clone());
            }
            vbds.push(vbd);
        }
        self.vms.insert(
            vm_ref,
            Vm {
                uuid: vm_uuid.clone(),
                name_label: name.into(),
                vbds,
                power_state: "Running".into(),
                tags: Vec::new(),
                is_a_template: false,
                is_control_domain: false,
            },
        );
        (vm_uuid, uuids)
    }

    pub fn add_vdi(&mut self, label: &str, image: Image) -> String {
        let r = new_ref();
        self.vdis.insert(
            r.clone(),
            Vdi {
                uuid: new_uuid(),
                name_label: label.into(),
                kind: "user".into(),
                on_boot: "persist".into(),
                virtual_size: image.size(),
                is_a_snapshot: false,
                snapshot_of: NULL_REF.into(),
                snapshot_time: 0,
                image: Some(image),
                cbt: None,
                dirty: RoaringBitmap::new(),
                other_config: BTreeMap::new(),
                vbds: Vec::new(),
                users: 0,
                busy_until: None,
            },
        );
        r
    }

    pub fn vdi_ref(&self, uuid_or_ref: &str) -> Option<String> {
        if self.vdis.contains_key(uuid_or_ref) {
            return Some(uuid_or_ref.to_string());
        }
        self.vdis
            .iter()
            .find(|(_, v)| v.uuid == uuid_or_ref)
            .map(|(r, _)| r.clone())
    }

    /// A guest write to a live VDI: CBT marks the blocks.
    pub fn guest_write(&mut self, vdi: &str, off: u64, data: &[u8]) -> Result<(), String> {
        let r = self.vdi_ref(vdi).ok_or("no such VDI")?;
        let v = self.vdis.get_mut(&r).ok_or("no such VDI")?;
        let img = v.image.as_mut().ok_or("the VDI has no data")?;
        let touched = img.write_at(data, off).map_err(|e| e.to_string())?;
        v.dirty.extend(touched);
        Ok(())
    }

    /// The guest writes every non-zero 64 KiB block of the file at `path` (same offsets):
    /// a benchmark's way to change a chosen set of blocks at once. Returns blocks written.
    pub fn guest_write_file(&mut self, vdi: &str, path: &std::path::Path) -> Result<u64, String> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = vec![0u8; crate::BLOCK_SIZE as usize];
        let (mut off, mut n) = (0u64, 0u64);
        loop {
            let mut got = 0;
            while got < buf.len() {
                match f.read(&mut buf[got..]).map_err(|e| e.to_string())? {
                    0 => break,
                    k => got += k,
                }
            }
            if got == 0 {
                return Ok(n);
            }
            if !crate::is_zero(&buf[..got]) {
                self.guest_write(vdi, off, &buf[..got])?;
                n += 1;
            }
            off += got as u64;
        }
    }

    /// `VDI.snapshot` of `vdi` (a reference or uuid): a frozen copy of its data, the next place
    /// in its CBT chain, and (as xapi's `snapshot_and_clone` does) the VDI's name, type,
    /// on_boot and other_config copied. Tests call it directly to play another tool.
    pub fn snapshot(&mut self, vdi: &str) -> Result<String, Failure> {
        if self.faults.sr_detached {
            return Err(fail("SR_NOT_ATTACHED", &[&self.sr_ref.clone()]));
        }
        let r = self
            .vdi_ref(vdi)
            .ok_or_else(|| fail("HANDLE_INVALID", &["VDI", vdi]))?;
        // Snapshot times are wall-clock seconds, never repeating.
        self.clock = crate::timefmt::now().max(self.clock + 1);
        let now = self.clock;
        let v = self.vdi_mut(&r)?;
        if v.is_a_snapshot {
            return Err(fail(
                "OPERATION_NOT_ALLOWED",
                &["cannot snapshot a snapshot"],
            ));
        }
        let image = v
            .image
            .as_mut()
            .ok_or_else(|| fail("VDI_INCOMPATIBLE_TYPE", &[&r, "cbt_metadata"]))?
            .freeze()
            .map_err(|e| fail("SR_BACKEND_FAILURE_44", &["", &e.to_string(), ""]))?;
        let cbt = v.cbt.map(|c| Cbt {
            chain: c.chain,
            seq: c.seq + 1,
        });
        let changed = std::mem::take(&mut v.dirty);
        if let Some(c) = cbt {
            v.cbt = Some(c);
        }
        let (label, kind, on_boot, size, other_config) = (
            v.name_label.clone(),
            v.kind.clone(),
            v.on_boot.clone(),
            v.virtual_size,
            v.other_config.clone(),
        );
        if let Some(c) = cbt {
            self.cbt_history
                .entry(c.chain)
                .or_default()
                .insert(c.seq, changed);
        }
        let sr = new_ref();
        let mut snap_vbds = Vec::new();
        if self.faults.attach_snapshots {
            let vm = self
                .vbds
                .values()
                .find(|b| b.vdi == r)
                .map(|b| b.vm.clone())
                .unwrap_or_else(|| NULL_REF.into());
            let vbd = new_ref();
            self.vbds.insert(
                vbd.clone(),
                Vbd {
                    vm,
                    vdi: sr.clone(),
                    attached: true,
                    userdevice: "autodetect".into(),
                },
            );
            snap_vbds.push(vbd);
        }
        self.vdis.insert(
            sr.clone(),
            Vdi {
                uuid: new_uuid(),
                name_label: label,
                kind,
                on_boot,
                virtual_size: size,
                is_a_snapshot: true,
                snapshot_of: r,
                snapshot_time: now,
                image: Some(image),
                cbt,
                dirty: RoaringBitmap::new(),
                other_config,
                vbds: snap_vbds,
                users: 0,
                busy_until: None,
            },
        );
        Ok(sr)
    }

    /// A host or SR crash: CBT is disabled on every VDI.
    pub fn crash(&mut self) {
        for v in self.vdis.values_mut() {
            if !v.is_a_snapshot {
                v.cbt = None;
            }
        }
    }

    fn vdi(&self, r: &str) -> Result<&Vdi, Failure> {
        self.vdis
            .get(r)
            .ok_or_else(|| fail("HANDLE_INVALID", &["VDI", r]))
    }

    fn vdi_mut(&mut self, r: &str) -> Result<&mut Vdi, Failure> {
        self.vdis
            .get_mut(r)
            .ok_or_else(|| fail("HANDLE_INVALID", &["VDI", r]))
    }

    fn in_use(&self, r: &str) -> bool {
        let Some(v) = self.vdis.get(r) else {
            return false;
        };
        v.users > 0
            || v.busy_until.is_some_and(|t| Instant::now() < t)
            || v.vbds
                .iter()
                .any(|b| self.vbds.get(b).is_some_and(|b| b.attached))
    }

    fn vdi_record(&self, r: &str) -> Result<Value, Failure> {
        let v = self.vdi(r)?;
        let snapshots: Vec<&String> = self
            .vdis
            .iter()
            .filter(|(_, x)| x.snapshot_of == r)
            .map(|(k, _)| k)
            .collect();
        Ok(json!({
            "uuid": v.uuid,
            "name_label": v.name_label,
            "name_description": "",
            "virtual_size": v.virtual_size.to_string(),
            "physical_utilisation": "0",
            "type": v.kind,
            "on_boot": v.on_boot,
            "cbt_enabled": v.cbt.is_some(),
            "is_a_snapshot": v.is_a_snapshot,
            "snapshot_of": v.snapshot_of,
            "snapshots": snapshots,
            "snapshot_time": xapi_time(v.snapshot_time),
            "VBDs": v.vbds,
            "SR": self.sr_ref,
            "sharable": false,
            "read_only": false,
            "managed": true,
            "other_config": v.other_config,
            "sm_config": {},
            "xenstore_data": {},
            "tags": [],
        }))
    }

    /// A session's user; checks the session.
    fn session(&self, sref: &str) -> Result<(), Failure> {
        if self.sessions.contains_key(sref) {
            Ok(())
        } else {
            Err(fail("SESSION_INVALID", &[sref]))
        }
    }

    /// `host.*` calls: the pool's hosts, their addresses and certificates (xen-api's
    /// datamodel_host.ml: `get_all`, `get_address`, `get_server_certificate`, `get_record`).
    fn host_call(&self, method: &str, params: &[Value]) -> Option<Result<Value, Failure>> {
        let call = method.strip_prefix("host.")?;
        let want = if call == "get_all" { 1 } else { 2 };
        if !matches!(
            call,
            "get_all" | "get_address" | "get_server_certificate" | "get_record"
        ) {
            return None;
        }
        if params.len() != want {
            return Some(Err(fail(
                "MESSAGE_PARAMETER_COUNT_MISMATCH",
                &[method, &want.to_string(), &params.len().to_string()],
            )));
        }
        if let Err(e) = self.session(s(&params[0])) {
            return Some(Err(e));
        }
        if call == "get_all" {
            return Some(Ok(json!(
                self.hosts
                    .iter()
                    .map(|h| h.reference.clone())
                    .collect::<Vec<_>>()
            )));
        }
        let r = s(&params[1]);
        let Some(h) = self.hosts.iter().find(|h| h.reference == r) else {
            return Some(Err(fail("HANDLE_INVALID", &["host", r])));
        };
        Some(Ok(match call {
            "get_address" => json!(h.address),
            "get_server_certificate" => json!(h.cert_pem),
            _ => json!({
                "uuid": h.uuid, "address": h.address, "hostname": h.address,
                "name_label": h.address, "enabled": true,
            }),
        }))
    }

    /// Add a host to the pool; returns its reference.
    pub fn add_host(&mut self, address: &str, cert_pem: &str) -> String {
        let reference = new_ref();
        self.hosts.push(PoolHost {
            reference: reference.clone(),
            uuid: new_uuid(),
            address: address.to_string(),
            cert_pem: cert_pem.to_string(),
        });
        reference
    }

    /// Answer one API call.
    pub fn dispatch(&mut self, method: &str, params: &[Value]) -> Result<Value, Failure> {
        self.calls.push(method.to_string());
        if let Some(r) = self.host_call(method, params) {
            return r;
        }
        let count = |n: usize| -> Result<(), Failure> {
            if params.len() == n {
                Ok(())
            } else {
                Err(fail(
                    "MESSAGE_PARAMETER_COUNT_MISMATCH",
                    &[method, &n.to_string(), &params.len().to_string()],
                ))
            }
        };
        match method {
            "session.login_with_password" => {
                if params.len() < 2 {
                    return Err(fail(
                        "MESSAGE_PARAMETER_COUNT_MISMATCH",
                        &[method, "4", &params.len().to_string()],
                    ));
                }
                if let Some(m) = &self.slave_of {
                    return Err(fail("HOST_IS_SLAVE", &[m]));
                }
                if s(&params[0]) != self.user || s(&params[1]) != self.password {
                    return Err(fail(
                        "SESSION_AUTHENTICATION_FAILED",
                        &[s(&params[0]), "Authentication failure"],
                    ));
                }
                let r = new_ref();
                self.sessions.insert(r.clone(), s(&params[0]).to_string());
                return Ok(json!(r));
            }
            "session.logout" => {
                count(1)?;
                self.sessions.remove(s(&params[0]));
                return Ok(json!(""));
            }
            _ => {}
        }
        let Some(sref) = params.first() else {
            return Err(fail(
                "MESSAGE_PARAMETER_COUNT_MISMATCH",
                &[method, "1", "0"],
            ));
        };
        self.session(s(sref))?;
        let a = &params[1..];
        if let Some(d) = &self.faults.delete_vm
            && d.at == method
            && let Some(vm) = a.first().map(s).and_then(|r| self.vm_of_vdi(r))
            && self.vms.get(&vm).is_some_and(|v| v.name_label == d.vm)
        {
            self.faults.delete_vm = None;
            self.uninstall_vm(&vm);
        }
        let argc = |n: usize| count(n + 1);
        let arg = |i: usize| a.get(i).map(s).unwrap_or("");
        match method {
            "VDI.get_by_uuid" => {
                argc(1)?;
                self.vdis
                    .iter()
                    .find(|(_, v)| v.uuid == arg(0))
                    .map(|(r, _)| json!(r))
                    .ok_or_else(|| fail("UUID_INVALID", &["VDI", arg(0)]))
            }
            "VDI.get_record" => {
                argc(1)?;
                self.vdi_record(arg(0))
            }
            "VDI.get_uuid" => {
                argc(1)?;
                Ok(json!(self.vdi(arg(0))?.uuid))
            }
            "VDI.get_cbt_enabled" => {
                argc(1)?;
                Ok(json!(self.vdi(arg(0))?.cbt.is_some()))
            }
            "VDI.get_type" => {
                argc(1)?;
                Ok(json!(self.vdi(arg(0))?.kind))
            }
            "VDI.enable_cbt" => {
                argc(1)?;
                let r = arg(0).to_string();
                let v = self.vdi(&r)?;
                if v.cbt.is_some() {
                    return Ok(json!(""));
                }
                if self.faults.no_licence {
                    return Err(fail("LICENCE_RESTRICTION", &["CBT"]));
                }
                if v.kind != "user" && v.kind != "system" {
                    return Err(fail("VDI_INCOMPATIBLE_TYPE", &[&r, &v.kind]));
                }
                if v.on_boot == "reset" {
                    return Err(fail("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION", &[]));
                }
                if self.faults.sr_detached {
                    return Err(fail("SR_HAS_NO_PBDS", &[&self.sr_ref.clone()]));
                }
                let chain = self.next_chain;
                self.next_chain += 1;
                self.cbt_history.insert(chain, BTreeMap::new());
                let v = self.vdi_mut(&r)?;
                v.cbt = Some(Cbt { chain, seq: 0 });
                v.dirty = RoaringBitmap::new();
                Ok(json!(""))
            }
            "VDI.disable_cbt" => {
                argc(1)?;
                self.vdi_mut(arg(0))?.cbt = None;
                Ok(json!(""))
            }
            "VDI.snapshot" => {
                if a.is_empty() || a.len() > 2 {
                    return Err(fail(
                        "MESSAGE_PARAMETER_COUNT_MISMATCH",
                        &[method, "3", &params.len().to_string()],
                    ));
                }
                let r = self.snapshot(arg(0))?;
                if std::mem::take(&mut self.faults.withhold_snapshot_reply) {
                    self.withhold_reply = true;
                }
                self.snapshot_answered = true;
                Ok(json!(r))
            }
            "VDI.list_changed_blocks" => {
                argc(2)?;
                let (from, to) = (self.vdi(arg(0))?, self.vdi(arg(1))?);
                let Some(fc) = from.cbt else {
                    return Err(fail("VDI_NO_CBT_METADATA", &[arg(0)]));
                };
                let Some(tc) = to.cbt else {
                    return Err(fail("VDI_NO_CBT_METADATA", &[arg(1)]));
                };
                if to
                    .vbds
                    .iter()
                    .any(|b| self.vbds.get(b).is_some_and(|b| b.attached))
                {
                    return Err(fail("VDI_IN_USE", &[arg(1), "list_changed_blocks"]));
                }
                if fc.chain != tc.chain {
                    return Err(fail(
                        "SR_BACKEND_FAILURE_460",
                        &[
                            "",
                            "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]",
                            "",
                        ],
                    ));
                }
                let blocks = blocks_for(to.virtual_size);
                let mut changed = RoaringBitmap::new();
                if let Some(h) = self.cbt_history.get(&fc.chain) {
                    for (_, b) in h.range(fc.seq + 1..=tc.seq) {
                        changed |= b;
                    }
                }
                changed.extend(self.faults.overreport.iter().copied());
                let len = (blocks.div_ceil(8) as i64 + self.faults.bitmap_len_delta).max(0);
                let mut bytes = vec![0u8; len as usize];
                for b in changed
                    .iter()
                    .filter(|&b| ((b >> 3) as usize) < len as usize)
                {
                    bytes[(b >> 3) as usize] |= 0x80 >> (b & 7);
                }
                Ok(json!(
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                ))
            }
            "VDI.get_nbd_info" => {
                argc(1)?;
                let r = arg(0).to_string();
                let v = self.vdi(&r)?;
                if v.image.is_none() {
                    return Err(fail("VDI_INCOMPATIBLE_TYPE", &[&r, "cbt_metadata"]));
                }
                if let Some((address, port, export, cert, subject)) = &self.nbd_override {
                    return Ok(json!([{
                        "exportname": export, "address": address, "port": port,
                        "cert": cert, "subject": subject,
                    }]));
                }
                // As `_get_nbd_info`: one record per address on an NBD network, each with the
                // host's certificate whatever the network's purpose.
                let Some((port, _, subject)) = &self.nbd else {
                    return Ok(json!([]));
                };
                let export = format!("/{}?session_id={}", v.uuid, s(sref));
                let ports: BTreeMap<String, u16> = self.nbd_addresses.iter().cloned().collect();
                Ok(Value::Array(
                    self.net
                        .nbd_addresses()
                        .into_iter()
                        .map(|address| {
                            let port = ports.get(&address).copied().unwrap_or(*port);
                            json!({
                                "exportname": export, "address": address, "port": port,
                                "cert": self.net.cert_pem, "subject": subject,
                            })
                        })
                        .collect(),
                ))
            }
            "VDI.data_destroy" => {
                argc(1)?;
                let r = arg(0).to_string();
                let v = self.vdi(&r)?;
                if v.cbt.is_none() {
                    return Err(fail("VDI_NO_CBT_METADATA", &[&r]));
                }
                if self.in_use(&r) {
                    return Err(fail("VDI_IN_USE", &[&r, "data_destroy"]));
                }
                let v = self.vdi_mut(&r)?;
                v.image = None;
                v.kind = "cbt_metadata".into();
                Ok(json!(""))
            }
            "VDI.destroy" => {
                argc(1)?;
                let r = arg(0).to_string();
                self.vdi(&r)?;
                if self.in_use(&r) {
                    return Err(fail("VDI_IN_USE", &[&r, "destroy"]));
                }
                self.vdis.remove(&r);
                Ok(json!(""))
            }
            "VDI.resize" => {
                argc(2)?;
                let size = match &a[1] {
                    Value::String(x) => x.parse::<u64>().ok(),
                    Value::Number(n) => n.as_u64(),
                    _ => None,
                }
                .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["size"]))?;
                let r = arg(0).to_string();
                let v = self.vdi_mut(&r)?;
                if size < v.virtual_size {
                    return Err(fail("VDI_TOO_SMALL", &[&r, &v.virtual_size.to_string()]));
                }
                let img = v
                    .image
                    .as_mut()
                    .ok_or_else(|| fail("VDI_INCOMPATIBLE_TYPE", &[&r, "cbt_metadata"]))?;
                img.grow(size);
                v.virtual_size = size;
                Ok(json!(""))
            }
            "VDI.add_to_other_config" => {
                argc(3)?;
                if std::mem::take(&mut self.snapshot_answered)
                    && std::mem::take(&mut self.faults.hang_after_snapshot)
                {
                    self.withhold_reply = true;
                    return Ok(json!(""));
                }
                let (k, val) = (arg(1).to_string(), arg(2).to_string());
                let v = self.vdi_mut(arg(0))?;
                if v.other_config.contains_key(&k) {
                    return Err(fail(
                        "MAP_DUPLICATE_KEY",
                        &["VDI", "other_config", arg(0), &k],
                    ));
                }
                v.other_config.insert(k, val);
                Ok(json!(""))
            }
            "VDI.remove_from_other_config" => {
                argc(2)?;
                let k = arg(1).to_string();
                self.vdi_mut(arg(0))?.other_config.remove(&k);
                Ok(json!(""))
            }
            "VDI.create" => {
                argc(1)?;
                let rec = &a[0];
                let size = match rec.get("virtual_size") {
                    Some(Value::String(x)) => x.parse::<u64>().ok(),
                    Some(Value::Number(n)) => n.as_u64(),
                    _ => None,
                }
                .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["virtual_size"]))?;
                if s(rec.get("SR").unwrap_or(&Value::Null)) != self.sr_ref {
                    return Err(fail(
                        "HANDLE_INVALID",
                        &["SR", s(rec.get("SR").unwrap_or(&Value::Null))],
                    ));
                }
                if self.faults.sr_detached {
                    return Err(fail("SR_NOT_ATTACHED", &[&self.sr_ref.clone()]));
                }
                if self.faults.sr_free.is_some_and(|f| f < size) {
                    return Err(fail(
                        "SR_FULL",
                        &[
                            &size.to_string(),
                            &self.faults.sr_free.unwrap_or(0).to_string(),
                        ],
                    ));
                }
                let image = Image::empty(&self.dir, size)
                    .map_err(|e| fail("SR_BACKEND_FAILURE_44", &["", &e.to_string(), ""]))?;
                let label = s(rec.get("name_label").unwrap_or(&Value::Null)).to_string();
                let kind = s(rec.get("type").unwrap_or(&Value::Null)).to_string();
                if !matches!(
                    kind.as_str(),
                    "user" | "system" | "ephemeral" | "suspend" | "crashdump"
                ) {
                    return Err(fail("FIELD_TYPE_ERROR", &["type"]));
                }
                let r = self.add_vdi(&label, image);
                if let Some(v) = self.vdis.get_mut(&r) {
                    v.kind = kind;
                }
                Ok(json!(r))
            }
            "VBD.get_record" => {
                argc(1)?;
                let b = self
                    .vbds
                    .get(arg(0))
                    .ok_or_else(|| fail("HANDLE_INVALID", &["VBD", arg(0)]))?;
                Ok(
                    json!({"VM": b.vm, "VDI": b.vdi, "currently_attached": b.attached, "type": "Disk", "mode": "RW", "userdevice": b.userdevice}),
                )
            }
            "VM.get_by_uuid" => {
                argc(1)?;
                self.vms
                    .iter()
                    .find(|(_, v)| v.uuid == arg(0))
                    .map(|(r, _)| json!(r))
                    .ok_or_else(|| fail("UUID_INVALID", &["VM", arg(0)]))
            }
            "VM.get_by_name_label" => {
                argc(1)?;
                Ok(json!(
                    self.vms
                        .iter()
                        .filter(|(_, v)| v.name_label == arg(0))
                        .map(|(r, _)| r.clone())
                        .collect::<Vec<_>>()
                ))
            }
            "VM.get_record" => {
                argc(1)?;
                self.vm_record(arg(0))
            }
            "VM.get_all_records" => {
                argc(0)?;
                let mut all = serde_json::Map::new();
                for r in self.vms.keys() {
                    all.insert(r.clone(), self.vm_record(r)?);
                }
                Ok(Value::Object(all))
            }
            "VM.get_tags" => {
                argc(1)?;
                Ok(json!(self.vm_record(arg(0))?["tags"]))
            }
            "pool.get_all" => {
                argc(0)?;
                Ok(json!([self.pool_ref]))
            }
            "pool.get_all_records" => {
                argc(0)?;
                let master = self
                    .hosts
                    .first()
                    .map(|h| h.reference.clone())
                    .unwrap_or_else(|| NULL_REF.into());
                let mut all = serde_json::Map::new();
                all.insert(
                    self.pool_ref.clone(),
                    json!({
                        "uuid": self.pool_uuid,
                        "name_label": self.pool_name,
                        "name_description": "",
                        "master": master,
                        "default_SR": self.sr_ref,
                        "other_config": {},
                        "tags": [],
                    }),
                );
                Ok(Value::Object(all))
            }
            "pool.get_name_label" => {
                argc(1)?;
                if arg(0) != self.pool_ref {
                    return Err(fail("HANDLE_INVALID", &["pool", arg(0)]));
                }
                Ok(json!(self.pool_name))
            }
            "SR.get_name_label" => {
                argc(1)?;
                if arg(0) != self.sr_ref {
                    return Err(fail("HANDLE_INVALID", &["SR", arg(0)]));
                }
                Ok(json!("Local storage"))
            }
            "SR.get_by_uuid" => {
                argc(1)?;
                if arg(0) == self.sr_uuid {
                    Ok(json!(self.sr_ref))
                } else {
                    Err(fail("UUID_INVALID", &["SR", arg(0)]))
                }
            }
            "SR.get_uuid" => {
                argc(1)?;
                Ok(json!(self.sr_uuid))
            }
            "task.create" => {
                argc(2)?;
                let r = new_ref();
                self.tasks
                    .insert(r.clone(), ("pending".into(), String::new()));
                Ok(json!(r))
            }
            "task.get_record" => {
                argc(1)?;
                let t = self
                    .tasks
                    .get(arg(0))
                    .ok_or_else(|| fail("HANDLE_INVALID", &["task", arg(0)]))?;
                Ok(json!({"status": t.0, "result": t.1, "error_info": []}))
            }
            "task.destroy" => {
                argc(1)?;
                self.tasks.remove(arg(0));
                Ok(json!(""))
            }
            _ => self
                .net
                .call(method, a, self.faults.networks_denied)
                .unwrap_or_else(|| Err(fail("MESSAGE_METHOD_UNKNOWN", &[method]))),
        }
    }

    /// `/import_metadata`: a new VM from a metadata export, disks mapped by `vdi_map` (original
    /// uuid → new uuid). Returns the new VM's reference.
    pub fn import_metadata(
        &mut self,
        tar: &[u8],
        vdi_map: &[(String, String)],
    ) -> Result<String, Failure> {
        let members = super::tar::read(tar)
            .map_err(|e| fail("IMPORT_ERROR", &[&format!("not a tar: {e}")]))?;
        let (_, ova) = members
            .iter()
            .find(|(n, _)| n == "ova.xml")
            .ok_or_else(|| fail("IMPORT_ERROR", &["no ova.xml"]))?;
        let v = super::xmlrpc::decode_value(&String::from_utf8_lossy(ova))
            .map_err(|e| fail("IMPORT_ERROR", &[&e]))?;
        let name = v["objects"][0]["snapshot"]["name_label"]
            .as_str()
            .unwrap_or("imported")
            .to_string();
        let vm_ref = new_ref();
        // One VBD per disk of the export, at the disk's position, on the VDI the map names.
        // A disk left out of the map is refused here, so a restore that forgets one fails
        // visibly instead of getting a VM whose disk is whatever the host finds by its old uuid.
        let disks: Vec<(String, String)> = v["disks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| {
                        (
                            d["uuid"].as_str().unwrap_or("").to_string(),
                            d["userdevice"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some((from, _)) = disks
            .iter()
            .find(|(from, _)| !vdi_map.iter().any(|(f, _)| f == from))
        {
            return Err(fail("IMPORT_ERROR", &["VDI not in the map", from]));
        }
        let mut planned = Vec::new();
        for (from, to) in vdi_map {
            let vdi = self
                .vdi_ref(to)
                .ok_or_else(|| fail("UUID_INVALID", &["VDI", to]))?;
            let userdevice = disks
                .iter()
                .find(|(f, _)| f == from)
                .map(|(_, u)| u.clone())
                .ok_or_else(|| fail("IMPORT_ERROR", &["mapped VDI not in the export", from]))?;
            planned.push((vdi, userdevice));
        }
        let mut vbds = Vec::new();
        for (vdi, userdevice) in planned {
            let vbd = new_ref();
            self.vbds.insert(
                vbd.clone(),
                Vbd {
                    vm: vm_ref.clone(),
                    vdi: vdi.clone(),
                    attached: false,
                    userdevice,
                },
            );
            if let Some(v) = self.vdis.get_mut(&vdi) {
                v.vbds.push(vbd.clone());
            }
            vbds.push(vbd);
        }
        self.vms.insert(
            vm_ref.clone(),
            Vm {
                uuid: new_uuid(),
                name_label: name,
                vbds,
                power_state: "Halted".into(),
                tags: Vec::new(),
                is_a_template: false,
                is_control_domain: false,
            },
        );
        Ok(vm_ref)
    }

    /// True when a VM has the VDI plugged.
    pub fn attached(&self, vdi_ref: &str) -> bool {
        self.vdis.get(vdi_ref).is_some_and(|v| {
            v.vbds
                .iter()
                .any(|b| self.vbds.get(b).is_some_and(|b| b.attached))
        })
    }

    /// The VM metadata export of `vm_uuid`: a tar holding `ova.xml`.
    pub fn export_metadata(&self, vm_uuid: &str) -> Option<Vec<u8>> {
        let (vm_ref, vm) = self.vms.iter().find(|(_, v)| v.uuid == vm_uuid)?;
        let disks: Vec<Value> = vm
            .vbds
            .iter()
            .filter_map(|b| self.vbds.get(b))
            .filter_map(|b| self.vdis.get(&b.vdi).map(|d| json!({"uuid": d.uuid, "name_label": d.name_label, "virtual_size": d.virtual_size.to_string(), "userdevice": b.userdevice})))
            .collect();
        let value = json!({"version": {"xapi_major": "25"}, "objects": [{"class": "VM", "id": vm_ref, "snapshot": {"uuid": vm.uuid, "name_label": vm.name_label}}], "disks": disks});
        // ova.xml is one XML-RPC value, as xapi's export writes it.
        let xml = super::xmlrpc::encode_value(&value);
        Some(super::tar::write(&[("ova.xml", xml.as_bytes())]))
    }
}

/// Answer one API call on the shared state; when a fault withholds the answer, never return
/// (the client waits until it gives up or is killed). The lock is not held while waiting.
pub async fn answer(
    state: &std::sync::Mutex<State>,
    method: &str,
    params: &[Value],
) -> Result<Value, Failure> {
    let (result, withhold) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let r = st.dispatch(method, params);
        (r, std::mem::take(&mut st.withhold_reply))
    };
    if withhold {
        std::future::pending::<()>().await;
    }
    result
}
