//! The simulated host's networks, PIFs and host record, as xen-api's datamodel has them
//! (`network`, `PIF`, `host` classes, field names as the API spells them), and
//! `VDI.get_nbd_info` computed from them as xen-api's `_get_nbd_info` does: for every network
//! whose purpose holds `nbd` or `insecure_nbd`, the addresses of the host's attached PIFs on
//! it, each record carrying the host's certificate and subject, whatever the purpose.

use serde_json::{Value, json};

use super::host::{Failure, new_uuid};

#[derive(Debug, Clone)]
pub struct Network {
    pub uuid: String,
    pub name_label: String,
    pub bridge: String,
    /// `nbd`, `insecure_nbd` (never both), or nothing.
    pub purpose: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Pif {
    pub uuid: String,
    pub device: String,
    pub network: String,
    pub ip: String,
    /// `address/prefix`, as xapi lists them.
    pub ipv6: Vec<String>,
    pub management: bool,
    pub currently_attached: bool,
}

/// The host's side of the network: one host, its networks and PIFs (by reference).
#[derive(Debug, Clone)]
pub struct Net {
    pub host_ref: String,
    pub host_uuid: String,
    pub hostname: String,
    /// The management address (`host.address`).
    pub address: String,
    /// `host.get_server_certificate`: PEM.
    pub cert_pem: String,
    pub networks: Vec<(String, Network)>,
    pub pifs: Vec<(String, Pif)>,
}

fn new_ref() -> String {
    format!("OpaqueRef:{}", new_uuid())
}

impl Net {
    /// One host with one network (`purpose`) and one attached management PIF at `address`.
    pub fn new(address: &str, hostname: &str, cert_pem: &str, purpose: &[&str]) -> Net {
        let net_ref = new_ref();
        Net {
            host_ref: new_ref(),
            host_uuid: new_uuid(),
            hostname: hostname.into(),
            address: address.into(),
            cert_pem: cert_pem.into(),
            networks: vec![(
                net_ref.clone(),
                Network {
                    uuid: new_uuid(),
                    name_label: "Pool-wide network associated with eth0".into(),
                    bridge: "xenbr0".into(),
                    purpose: purpose.iter().map(|p| p.to_string()).collect(),
                },
            )],
            pifs: vec![(
                new_ref(),
                Pif {
                    uuid: new_uuid(),
                    device: "eth0".into(),
                    network: net_ref,
                    ip: address.into(),
                    ipv6: Vec::new(),
                    management: true,
                    currently_attached: true,
                },
            )],
        }
    }

    /// Add a network with one attached PIF (`device`) at `address`: another address the host
    /// is reached at (e.g. a storage network).
    pub fn add_network(&mut self, device: &str, address: &str, purpose: &[&str]) {
        let net_ref = new_ref();
        self.networks.push((
            net_ref.clone(),
            Network {
                uuid: new_uuid(),
                name_label: format!("Pool-wide network associated with {device}"),
                bridge: format!("xenbr{}", self.networks.len()),
                purpose: purpose.iter().map(|p| p.to_string()).collect(),
            },
        ));
        self.pifs.push((
            new_ref(),
            Pif {
                uuid: new_uuid(),
                device: device.into(),
                network: net_ref,
                ip: address.into(),
                ipv6: Vec::new(),
                management: false,
                currently_attached: true,
            },
        ));
    }

    /// Set the purpose of every network (what `xe network-param-set purpose=` does).
    pub fn set_purpose(&mut self, purpose: &[&str]) {
        for (_, n) in &mut self.networks {
            n.purpose = purpose.iter().map(|p| p.to_string()).collect();
        }
    }

    fn network_record(&self, n: &Network, r: &str) -> Value {
        let pifs: Vec<&String> = self
            .pifs
            .iter()
            .filter(|(_, p)| p.network == r)
            .map(|(k, _)| k)
            .collect();
        json!({
            "uuid": n.uuid, "name_label": n.name_label, "name_description": "",
            "bridge": n.bridge, "MTU": "1500", "PIFs": pifs, "VIFs": [],
            "purpose": n.purpose, "managed": true, "other_config": {}, "tags": [],
        })
    }

    fn pif_record(&self, p: &Pif) -> Value {
        json!({
            "uuid": p.uuid, "device": p.device, "network": p.network, "host": self.host_ref,
            "IP": p.ip, "IPv6": p.ipv6, "netmask": "255.0.0.0", "gateway": "",
            "ip_configuration_mode": "Static", "primary_address_type": "IPv4",
            "management": p.management, "currently_attached": p.currently_attached,
            "physical": true, "VLAN": "-1", "MAC": "00:16:3e:00:00:01", "MTU": "1500",
            "other_config": {},
        })
    }

    fn host_record(&self) -> Value {
        let pifs: Vec<&String> = self.pifs.iter().map(|(k, _)| k).collect();
        json!({
            "uuid": self.host_uuid, "name_label": self.hostname, "name_description": "",
            "hostname": self.hostname, "address": self.address, "enabled": true,
            "PIFs": pifs, "API_version_major": "2", "API_version_minor": "21",
            "other_config": {},
        })
    }

    /// The NBD addresses, as `_get_nbd_info` lists them: the attached PIFs' IPv4 then IPv6
    /// addresses (without prefix) on networks with an NBD purpose.
    pub fn nbd_addresses(&self) -> Vec<String> {
        let nbd = |r: &str| {
            self.networks
                .iter()
                .any(|(k, n)| k == r && n.purpose.iter().any(|p| p == "nbd" || p == "insecure_nbd"))
        };
        let mut out = Vec::new();
        for (_, p) in self
            .pifs
            .iter()
            .filter(|(_, p)| p.currently_attached && nbd(&p.network))
        {
            if !p.ip.is_empty() {
                out.push(p.ip.clone());
            }
            out.extend(
                p.ipv6
                    .iter()
                    .filter(|a| !a.is_empty())
                    .map(|a| a.split('/').next().unwrap_or(a).to_string()),
            );
        }
        out
    }

    /// Answer the network, PIF and host calls (`args` after the session); None: not one of
    /// these. `denied`: the session's user may not read them (a limited role).
    pub fn call(
        &self,
        method: &str,
        args: &[Value],
        denied: bool,
    ) -> Option<Result<Value, Failure>> {
        let (class, _) = method.split_once('.')?;
        if !matches!(class, "network" | "PIF" | "host") {
            return None;
        }
        if denied {
            return Some(Err(vec![
                "RBAC_PERMISSION_DENIED".into(),
                method.to_string(),
                "No permission to perform this operation".into(),
            ]));
        }
        let want = |n: usize| -> Result<(), Failure> {
            if args.len() == n {
                Ok(())
            } else {
                Err(vec![
                    "MESSAGE_PARAMETER_COUNT_MISMATCH".into(),
                    method.into(),
                    (n + 1).to_string(),
                    (args.len() + 1).to_string(),
                ])
            }
        };
        let arg = args.first().and_then(Value::as_str).unwrap_or("");
        let invalid = |cls: &str| {
            vec![
                "HANDLE_INVALID".to_string(),
                cls.to_string(),
                arg.to_string(),
            ]
        };
        let network = || {
            self.networks
                .iter()
                .find(|(k, _)| k == arg)
                .map(|(_, n)| n)
                .ok_or_else(|| invalid("network"))
        };
        let pif = || {
            self.pifs
                .iter()
                .find(|(k, _)| k == arg)
                .map(|(_, p)| p)
                .ok_or_else(|| invalid("PIF"))
        };
        let host = || {
            if arg == self.host_ref {
                Ok(())
            } else {
                Err(invalid("host"))
            }
        };
        let r = match method {
            "network.get_all" => {
                want(0).map(|_| json!(self.networks.iter().map(|(k, _)| k).collect::<Vec<_>>()))
            }
            "network.get_all_records" => want(0).map(|_| {
                Value::Object(
                    self.networks
                        .iter()
                        .map(|(k, n)| (k.clone(), self.network_record(n, k)))
                        .collect(),
                )
            }),
            "network.get_record" => want(1)
                .and_then(|_| network())
                .map(|n| self.network_record(n, arg)),
            "network.get_purpose" => want(1).and_then(|_| network()).map(|n| json!(n.purpose)),
            "PIF.get_all" => {
                want(0).map(|_| json!(self.pifs.iter().map(|(k, _)| k).collect::<Vec<_>>()))
            }
            "PIF.get_all_records" => want(0).map(|_| {
                Value::Object(
                    self.pifs
                        .iter()
                        .map(|(k, p)| (k.clone(), self.pif_record(p)))
                        .collect(),
                )
            }),
            "PIF.get_record" => want(1).and_then(|_| pif()).map(|p| self.pif_record(p)),
            "host.get_all" => want(0).map(|_| json!([self.host_ref])),
            "host.get_record" => want(1).and_then(|_| host()).map(|_| self.host_record()),
            "host.get_address" => want(1).and_then(|_| host()).map(|_| json!(self.address)),
            "host.get_server_certificate" => {
                want(1).and_then(|_| host()).map(|_| json!(self.cert_pem))
            }
            _ => Err(vec!["MESSAGE_METHOD_UNKNOWN".into(), method.into()]),
        };
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_addresses_follow_the_purpose_and_attachment() {
        let mut n = Net::new("10.0.0.5", "h", "PEM", &["insecure_nbd"]);
        n.pifs[0].1.ipv6 = vec!["fd00::5/64".into()];
        assert_eq!(n.nbd_addresses(), ["10.0.0.5", "fd00::5"]);
        n.set_purpose(&[]);
        assert!(n.nbd_addresses().is_empty());
        n.set_purpose(&["nbd"]);
        n.pifs[0].1.currently_attached = false;
        assert!(n.nbd_addresses().is_empty());
    }

    #[test]
    fn calls_answer_with_xapi_names_and_errors() {
        let n = Net::new("127.0.0.1", "h", "PEM", &["nbd"]);
        let pifs = n.call("PIF.get_all_records", &[], false).unwrap().unwrap();
        let (_, pif) = pifs.as_object().unwrap().iter().next().unwrap();
        assert_eq!(pif["IP"], "127.0.0.1");
        assert_eq!(pif["host"], json!(n.host_ref));
        let purpose = n
            .call("network.get_purpose", &[pif["network"].clone()], false)
            .unwrap()
            .unwrap();
        assert_eq!(purpose, json!(["nbd"]));
        assert_eq!(
            n.call("network.get_purpose", &[json!("OpaqueRef:x")], false)
                .unwrap(),
            Err(vec![
                "HANDLE_INVALID".into(),
                "network".into(),
                "OpaqueRef:x".into()
            ])
        );
        assert_eq!(
            n.call("host.get_server_certificate", &[json!(n.host_ref)], false)
                .unwrap(),
            Ok(json!("PEM"))
        );
        assert_eq!(
            n.call("PIF.get_all_records", &[], true)
                .unwrap()
                .unwrap_err()[0],
            "RBAC_PERMISSION_DENIED"
        );
        assert!(n.call("VDI.get_record", &[], false).is_none());
    }
}
