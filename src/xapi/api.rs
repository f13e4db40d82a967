//! Typed calls and records for what backup and restore use. Records come as JSON objects (or
//! XML-RPC structs mapped onto them); xapi sends 64-bit integers as strings in XML-RPC and
//! sometimes booleans as strings, so fields are read tolerantly.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::client::Xapi;
use super::error::XapiError;

fn field_str(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn field_u64(v: &Value, k: &str) -> Option<u64> {
    match v.get(k)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn field_bool(v: &Value, k: &str) -> bool {
    match v.get(k) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

fn field_refs(v: &Value, k: &str) -> Vec<String> {
    match v.get(k) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

fn field_map(v: &Value, k: &str) -> BTreeMap<String, String> {
    match v.get(k) {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A reference that names nothing.
pub const NULL_REF: &str = "OpaqueRef:NULL";

#[derive(Debug, Clone)]
pub struct VdiRecord {
    pub uuid: String,
    pub name_label: String,
    pub virtual_size: u64,
    pub kind: String,
    pub on_boot: String,
    pub cbt_enabled: bool,
    pub is_a_snapshot: bool,
    pub snapshot_of: String,
    /// Unix seconds (snapshots only).
    pub snapshot_time: Option<i64>,
    pub snapshots: Vec<String>,
    pub vbds: Vec<String>,
    pub sr: String,
    pub other_config: BTreeMap<String, String>,
}

impl VdiRecord {
    /// A VDI record from `VDI.get_record` (a JSON object or an XML-RPC struct mapped onto one).
    pub fn from_value(v: &Value) -> Result<VdiRecord, String> {
        Ok(VdiRecord {
            uuid: field_str(v, "uuid"),
            name_label: field_str(v, "name_label"),
            virtual_size: field_u64(v, "virtual_size").ok_or("VDI record without virtual_size")?,
            kind: field_str(v, "type"),
            on_boot: field_str(v, "on_boot"),
            cbt_enabled: field_bool(v, "cbt_enabled"),
            is_a_snapshot: field_bool(v, "is_a_snapshot"),
            snapshot_of: field_str(v, "snapshot_of"),
            snapshot_time: crate::timefmt::parse(&field_str(v, "snapshot_time"))
                .ok()
                .filter(|&t| t > 0),
            snapshots: field_refs(v, "snapshots"),
            vbds: field_refs(v, "VBDs"),
            sr: field_str(v, "SR"),
            other_config: field_map(v, "other_config"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct VbdRecord {
    pub vm: String,
    pub vdi: String,
    pub currently_attached: bool,
    pub kind: String,
    /// The disk's position in its VM (`0`, `1`, ...; xapi's `userdevice`).
    pub userdevice: String,
}

#[derive(Debug, Clone)]
pub struct VmRecord {
    pub uuid: String,
    pub name_label: String,
    pub vbds: Vec<String>,
    pub is_a_snapshot: bool,
    pub is_a_template: bool,
    pub is_control_domain: bool,
    pub power_state: String,
    /// xapi's `tags` (a string set).
    pub tags: Vec<String>,
}

impl VmRecord {
    /// A VM record from `VM.get_record` or one entry of `VM.get_all_records`.
    pub fn from_value(v: &Value) -> VmRecord {
        VmRecord {
            uuid: field_str(v, "uuid"),
            name_label: field_str(v, "name_label"),
            vbds: field_refs(v, "VBDs"),
            is_a_snapshot: field_bool(v, "is_a_snapshot"),
            is_a_template: field_bool(v, "is_a_template"),
            is_control_domain: field_bool(v, "is_control_domain"),
            power_state: field_str(v, "power_state"),
            tags: field_refs(v, "tags"),
        }
    }

    /// A VM a backup job may take: not a template, a snapshot or a control domain.
    pub fn is_backup_candidate(&self) -> bool {
        !self.is_a_template && !self.is_a_snapshot && !self.is_control_domain
    }
}

/// One entry of `VDI.get_nbd_info`.
#[derive(Debug, Clone)]
pub struct NbdInfo {
    pub address: String,
    pub port: u16,
    pub exportname: String,
    /// PEM: the host's certificate, on `nbd` and `insecure_nbd` networks alike (xapi fills it
    /// whatever the purpose), so it never says whether the server offers TLS.
    pub cert: String,
    pub subject: String,
}

impl Xapi {
    fn bad(&self, call: &str, detail: String) -> XapiError {
        XapiError::Protocol {
            host: self.host().to_string(),
            call: call.into(),
            detail,
        }
    }

    /// The pool's hosts as the master knows them: (address, server certificate PEM) each
    /// (`host.get_all`, `host.get_address`, `host.get_server_certificate`).
    pub async fn pool_certificates(&self) -> Result<Vec<(String, String)>, XapiError> {
        let v = self.call("host.get_all", vec![]).await?;
        let Value::Array(hosts) = v else {
            return Err(self.bad("host.get_all", "not a list".into()));
        };
        let mut out = Vec::new();
        for h in hosts {
            let address = self.call_str("host.get_address", vec![h.clone()]).await?;
            let pem = self
                .call_str("host.get_server_certificate", vec![h])
                .await?;
            out.push((address, pem));
        }
        Ok(out)
    }

    pub async fn vdi_by_uuid(&self, uuid: &str) -> Result<String, XapiError> {
        self.call_str("VDI.get_by_uuid", vec![json!(uuid)]).await
    }

    pub async fn vdi_record(&self, vdi: &str) -> Result<VdiRecord, XapiError> {
        let v = self.call("VDI.get_record", vec![json!(vdi)]).await?;
        VdiRecord::from_value(&v).map_err(|e| self.bad("VDI.get_record", e))
    }

    pub async fn vbd_record(&self, vbd: &str) -> Result<VbdRecord, XapiError> {
        let v = self.call("VBD.get_record", vec![json!(vbd)]).await?;
        Ok(VbdRecord {
            vm: field_str(&v, "VM"),
            vdi: field_str(&v, "VDI"),
            currently_attached: field_bool(&v, "currently_attached"),
            kind: field_str(&v, "type"),
            userdevice: field_str(&v, "userdevice"),
        })
    }

    pub async fn vm_record(&self, vm: &str) -> Result<VmRecord, XapiError> {
        let v = self.call("VM.get_record", vec![json!(vm)]).await?;
        Ok(VmRecord::from_value(&v))
    }

    /// The pool's name label (`pool.get_all_records`: every host is in exactly one pool; a
    /// standalone host's pool has an empty name unless someone set one).
    pub async fn pool_name(&self) -> Result<String, XapiError> {
        let v = self.call("pool.get_all_records", vec![]).await?;
        let Value::Object(pools) = v else {
            return Err(self.bad("pool.get_all_records", "not a map of records".into()));
        };
        Ok(pools
            .values()
            .next()
            .map(|p| field_str(p, "name_label"))
            .unwrap_or_default())
    }

    /// Every VM the host knows (`VM.get_all_records`), as (reference, record), sorted by
    /// name then uuid; templates, snapshots and control domains included (see
    /// [`VmRecord::is_backup_candidate`]).
    pub async fn all_vms(&self) -> Result<Vec<(String, VmRecord)>, XapiError> {
        let v = self.call("VM.get_all_records", vec![]).await?;
        let Value::Object(vms) = v else {
            return Err(self.bad("VM.get_all_records", "not a map of records".into()));
        };
        let mut out: Vec<(String, VmRecord)> = vms
            .iter()
            .map(|(r, rec)| (r.clone(), VmRecord::from_value(rec)))
            .collect();
        out.sort_by(|a, b| {
            (a.1.name_label.as_str(), a.1.uuid.as_str())
                .cmp(&(b.1.name_label.as_str(), b.1.uuid.as_str()))
        });
        Ok(out)
    }

    pub async fn vm_by_uuid(&self, uuid: &str) -> Result<String, XapiError> {
        self.call_str("VM.get_by_uuid", vec![json!(uuid)]).await
    }

    pub async fn vm_by_name(&self, name: &str) -> Result<Vec<String>, XapiError> {
        let v = self.call("VM.get_by_name_label", vec![json!(name)]).await?;
        Ok(match v {
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        })
    }

    pub async fn sr_by_uuid(&self, uuid: &str) -> Result<String, XapiError> {
        self.call_str("SR.get_by_uuid", vec![json!(uuid)]).await
    }

    pub async fn sr_name(&self, sr: &str) -> Result<String, XapiError> {
        self.call_str("SR.get_name_label", vec![json!(sr)]).await
    }

    pub async fn enable_cbt(&self, vdi: &str) -> Result<(), XapiError> {
        self.call("VDI.enable_cbt", vec![json!(vdi)])
            .await
            .map(|_| ())
    }

    pub async fn disable_cbt(&self, vdi: &str) -> Result<(), XapiError> {
        self.call("VDI.disable_cbt", vec![json!(vdi)])
            .await
            .map(|_| ())
    }

    pub async fn cbt_enabled(&self, vdi: &str) -> Result<bool, XapiError> {
        let v = self.call("VDI.get_cbt_enabled", vec![json!(vdi)]).await?;
        Ok(matches!(v, Value::Bool(true)) || v.as_str() == Some("true"))
    }

    /// `VDI.snapshot`, returning the snapshot's reference.
    pub async fn snapshot(&self, vdi: &str) -> Result<String, XapiError> {
        self.call_str("VDI.snapshot", vec![json!(vdi), json!({})])
            .await
    }

    pub async fn add_to_other_config(
        &self,
        vdi: &str,
        key: &str,
        value: &str,
    ) -> Result<(), XapiError> {
        self.call(
            "VDI.add_to_other_config",
            vec![json!(vdi), json!(key), json!(value)],
        )
        .await
        .map(|_| ())
    }

    pub async fn remove_from_other_config(&self, vdi: &str, key: &str) -> Result<(), XapiError> {
        self.call("VDI.remove_from_other_config", vec![json!(vdi), json!(key)])
            .await
            .map(|_| ())
    }

    /// The base64 bitmap of blocks changed from `from` to `to`.
    pub async fn list_changed_blocks(&self, from: &str, to: &str) -> Result<String, XapiError> {
        self.call_str("VDI.list_changed_blocks", vec![json!(from), json!(to)])
            .await
    }

    pub async fn nbd_info(&self, vdi: &str) -> Result<Vec<NbdInfo>, XapiError> {
        let v = self.call("VDI.get_nbd_info", vec![json!(vdi)]).await?;
        let Value::Array(list) = v else {
            return Err(self.bad("VDI.get_nbd_info", "not a list".into()));
        };
        list.iter()
            .map(|e| {
                let port = field_u64(e, "port")
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| self.bad("VDI.get_nbd_info", "entry without a port".into()))?;
                Ok(NbdInfo {
                    address: field_str(e, "address"),
                    port,
                    exportname: field_str(e, "exportname"),
                    cert: field_str(e, "cert"),
                    subject: field_str(e, "subject"),
                })
            })
            .collect()
    }

    pub async fn data_destroy(&self, vdi: &str) -> Result<(), XapiError> {
        self.call("VDI.data_destroy", vec![json!(vdi)])
            .await
            .map(|_| ())
    }

    pub async fn vdi_destroy(&self, vdi: &str) -> Result<(), XapiError> {
        self.call("VDI.destroy", vec![json!(vdi)]).await.map(|_| ())
    }

    /// `VDI.create` of a VDI of type `kind` (`user`, `system`); returns its reference.
    pub async fn vdi_create(
        &self,
        sr: &str,
        name: &str,
        virtual_size: u64,
        kind: &str,
    ) -> Result<String, XapiError> {
        let rec = json!({
            "SR": sr,
            "virtual_size": virtual_size.to_string(),
            "type": kind,
            "sharable": false,
            "read_only": false,
            "other_config": {},
            "name_label": name,
            "name_description": "restored by cbtfs",
            "xenstore_data": {},
            "sm_config": {},
            "tags": [],
        });
        self.call_str("VDI.create", vec![rec]).await
    }

    pub async fn task_create(&self, label: &str) -> Result<String, XapiError> {
        self.call_str("task.create", vec![json!(label), json!("cbtfs")])
            .await
    }

    /// A task's (status, result, error_info).
    pub async fn task_status(
        &self,
        task: &str,
    ) -> Result<(String, String, Vec<String>), XapiError> {
        let v = self.call("task.get_record", vec![json!(task)]).await?;
        Ok((
            field_str(&v, "status"),
            field_str(&v, "result"),
            field_refs(&v, "error_info"),
        ))
    }

    pub async fn task_destroy(&self, task: &str) -> Result<(), XapiError> {
        self.call("task.destroy", vec![json!(task)])
            .await
            .map(|_| ())
    }
}
