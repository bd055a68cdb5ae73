//! Validated, dataplane-relevant views of Services and EndpointSlices.
//!
//! Every Kubernetes object enters the model through here: whatever the source
//! (a manifest directory or the API server), an object that cannot be
//! programmed is rejected with the field at fault, and nothing else is
//! affected by it.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use super::topology::Policy;
use k8s_openapi::{
    api::{
        core::v1::Service,
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// Label that joins an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// kube-proxy's default and maximum ClientIP affinity timeouts.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::IPPROTO_TCP,
            Protocol::Udp => proxy_common::IPPROTO_UDP,
        }
    }

    pub fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            proxy_common::IPPROTO_TCP => Some(Protocol::Tcp),
            proxy_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Kubernetes' protocol field: absent means TCP. `Ok(None)`: valid
    /// (SCTP) but not supported by this dataplane.
    fn parse(value: Option<&str>) -> Result<Option<Self>, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Some(Protocol::Tcp)),
            "UDP" => Ok(Some(Protocol::Udp)),
            "SCTP" => Ok(None),
            other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why an object cannot be programmed: which object, which field, and what
/// is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct Rejection {
    pub kind: &'static str,
    pub object: ObjectName,
    pub field: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: ObjectName,
    /// The IPv4 cluster IPs; IPv6 ones are not programmed yet.
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<PortInfo>,
    /// Ports this dataplane cannot serve (SCTP), as `spec.ports[i]`; the
    /// other ports are programmed.
    pub unsupported_ports: Vec<String>,
    /// ClientIP affinity timeout in seconds, when affinity is on.
    pub affinity_timeout: Option<u32>,
    pub policy: Policy,
}

/// A named port, of a Service or of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Empty when the service has a single unnamed port.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub name: ObjectName,
    /// The Service this slice belongs to, in the slice's namespace.
    pub service: String,
    pub ports: Vec<PortInfo>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Never empty; like kube-proxy, only the first is used.
    pub addresses: Vec<Ipv4Addr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// Topology hints: the zones and nodes this endpoint is meant for.
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// What became of a Service that is valid but not ours to program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skipped {
    Headless,
    ExternalName,
    OtherProxy(String),
    NoIpv4ClusterIp,
}

/// Builds the rejections of one object.
struct Reject {
    kind: &'static str,
    object: ObjectName,
}

impl Reject {
    fn at(&self, field: impl Into<String>, reason: impl Into<String>) -> Rejection {
        Rejection {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A port of a Service (`spec.ports[i]`) or an EndpointSlice (`ports[i]`);
/// `Ok(None)` for a valid port of an unsupported protocol.
fn port_info(
    reject: &Reject,
    field: &str,
    name: Option<&String>,
    port: Option<i32>,
    protocol: Option<&str>,
) -> Result<Option<PortInfo>, Rejection> {
    let port = match port {
        Some(p @ 1..=65535) => p as u16,
        Some(p) => return Err(reject.at(format!("{field}.port"), format!("port {p} is out of range 1-65535"))),
        None => return Err(reject.at(format!("{field}.port"), "port is missing")),
    };
    let protocol = Protocol::parse(protocol).map_err(|e| reject.at(format!("{field}.protocol"), e))?;
    Ok(protocol.map(|protocol| PortInfo {
        name: name.cloned().unwrap_or_default(),
        port,
        protocol,
    }))
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.labels.as_ref().and_then(|l| l.get(key))
}

impl ServiceInfo {
    /// One line per port this dataplane does not serve.
    pub fn unsupported_notes(&self) -> Vec<String> {
        self.unsupported_ports
            .iter()
            .map(|p| {
                format!(
                    "Service {}: {p}: SCTP is not supported by this dataplane yet; the other ports are programmed",
                    self.name
                )
            })
            .collect()
    }

    /// `Ok(Err(_))`: valid, but nothing for this proxy to program.
    pub fn from_k8s(svc: &Service) -> Result<Result<Self, Skipped>, Rejection> {
        let reject = Reject {
            kind: "Service",
            object: crate::source::state::object_name(&svc.metadata),
        };
        if reject.object.name.is_empty() {
            return Err(reject.at("metadata.name", "name is missing"));
        }
        if let Some(owner) = label(&svc.metadata, SERVICE_PROXY_NAME_LABEL) {
            return Ok(Err(Skipped::OtherProxy(owner.clone())));
        }
        let spec = svc.spec.as_ref().ok_or_else(|| reject.at("spec", "spec is missing"))?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return Ok(Err(Skipped::ExternalName));
        }
        let (ips, field): (Vec<&String>, &str) = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => (ips.iter().collect(), "spec.clusterIPs"),
            (_, Some(ip)) => (vec![ip], "spec.clusterIP"),
            _ => (vec![], ""),
        };
        if ips.iter().any(|ip| ip.as_str() == "None") {
            return Ok(Err(Skipped::Headless));
        }
        let mut cluster_ips = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            match IpAddr::from_str(ip) {
                Ok(IpAddr::V4(v4)) => cluster_ips.push(v4),
                Ok(IpAddr::V6(_)) => {}
                Err(_) => {
                    let at = if ips.len() > 1 || field == "spec.clusterIPs" {
                        format!("{field}[{i}]")
                    } else {
                        field.into()
                    };
                    return Err(reject.at(at, format!("{ip:?} is not an IP address")));
                }
            }
        }
        if cluster_ips.is_empty() {
            return Ok(Err(Skipped::NoIpv4ClusterIp));
        }
        let mut ports = Vec::new();
        let mut unsupported_ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{i}]");
            match port_info(&reject, &field, p.name.as_ref(), Some(p.port), p.protocol.as_deref())? {
                Some(port) => ports.push(port),
                None => unsupported_ports.push(field),
            }
        }
        let affinity_timeout = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                match timeout {
                    None => Some(DEFAULT_AFFINITY_TIMEOUT),
                    Some(t) if t > 0 && t as u32 <= MAX_AFFINITY_TIMEOUT => Some(t as u32),
                    Some(t) => {
                        return Err(reject.at(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT}"),
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(reject.at(
                    "spec.sessionAffinity",
                    format!("unknown session affinity {other:?} (expected None or ClientIP)"),
                ))
            }
        };
        Ok(Ok(ServiceInfo {
            name: reject.object,
            cluster_ips,
            ports,
            unsupported_ports,
            affinity_timeout,
            policy: Policy {
                internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                externally_accessible: spec
                    .type_
                    .as_deref()
                    .is_some_and(|t| t == "NodePort" || t == "LoadBalancer")
                    || spec.external_ips.as_ref().is_some_and(|ips| !ips.is_empty()),
            },
        }))
    }
}

impl EndpointSliceInfo {
    /// `Ok(None)`: a valid slice of another address family or FQDNs, which
    /// this dataplane does not program.
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Option<Self>, Rejection> {
        let reject = Reject {
            kind: "EndpointSlice",
            object: crate::source::state::object_name(&slice.metadata),
        };
        if reject.object.name.is_empty() {
            return Err(reject.at("metadata.name", "name is missing"));
        }
        let service = label(&slice.metadata, SERVICE_NAME_LABEL).cloned().ok_or_else(|| {
            reject.at(
                format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
                "the label naming the slice's Service is missing",
            )
        })?;
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => return Ok(None),
            other => return Err(reject.at("addressType", format!("unknown address type {other:?}"))),
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                port_info(
                    &reject,
                    &format!("ports[{i}]"),
                    p.name.as_ref(),
                    p.port,
                    p.protocol.as_deref(),
                )
            })
            // SCTP slice ports only serve SCTP service ports, skipped too.
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, e)| endpoint(&reject, i, e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(EndpointSliceInfo {
            name: reject.object,
            service,
            ports,
            endpoints,
        }))
    }
}

fn endpoint(reject: &Reject, i: usize, e: &Endpoint) -> Result<EndpointInfo, Rejection> {
    let addresses = e
        .addresses
        .iter()
        .enumerate()
        .map(|(j, a)| {
            Ipv4Addr::from_str(a).map_err(|_| {
                reject.at(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IPv4 address"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addresses.is_empty() {
        return Err(reject.at(format!("endpoints[{i}].addresses"), "an endpoint needs an address"));
    }
    let c = e.conditions.as_ref();
    // kube-proxy's reading of the conditions: nil ready and nil serving mean
    // true, nil terminating means false.
    Ok(EndpointInfo {
        addresses,
        ready: c.and_then(|c| c.ready).unwrap_or(true),
        serving: c.and_then(|c| c.serving).unwrap_or(true),
        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        node_name: e.node_name.clone(),
        zone_hints: e
            .hints
            .iter()
            .flat_map(|h| h.for_zones.iter().flatten())
            .map(|z| z.name.clone())
            .collect(),
        node_hints: e
            .hints
            .iter()
            .flat_map(|h| h.for_nodes.iter().flatten())
            .map(|n| n.name.clone())
            .collect(),
    })
}
