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
        core::v1::{Node, Service},
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

impl ObjectName {
    /// An object's namespace (`default` when unset, as manifests often
    /// leave it) and name.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        ObjectName {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
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
    /// `metadata.creationTimestamp` in seconds: of two Services claiming
    /// one frontend, the earlier keeps it.
    pub created: Option<i64>,
    /// The IPv4 cluster IPs; IPv6 ones are not programmed yet.
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<PortInfo>,
    /// Ports this dataplane cannot serve (SCTP), as `spec.ports[i]`; the
    /// other ports are programmed.
    pub unsupported_ports: Vec<String>,
    /// ClientIP affinity timeout in seconds, when affinity is on.
    pub affinity_timeout: Option<u32>,
    pub policy: Policy,
    /// Whether `ports[].nodePort` are served (type NodePort or LoadBalancer).
    pub node_ports: bool,
    /// `spec.externalIPs`, IPv4 ones.
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`, IPv4 ones, without those whose
    /// `ipMode` is `Proxy` (the load balancer delivers to the node itself).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `spec.loadBalancerSourceRanges`, IPv4 ones; empty: every source.
    pub source_ranges: Vec<Cidr>,
    /// `spec.healthCheckNodePort`, for an externalTrafficPolicy Local
    /// LoadBalancer.
    pub health_check_node_port: Option<u16>,
    /// Parts of a usable object that are not programmed, each once per
    /// report: `(field, why)`.
    pub notes: Vec<(String, String)>,
}

/// A named port, of a Service or of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Empty when the service has a single unnamed port.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// A Service port's `nodePort`, when it has one.
    pub node_port: Option<u16>,
}

/// An IPv4 range, as `loadBalancerSourceRanges` and `--nodeport-addresses`
/// give them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }

    /// The network's first address: what an LPM key holds.
    pub fn network(&self) -> Ipv4Addr {
        let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
        Ipv4Addr::from(u32::from(self.addr) & mask)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A CIDR as Kubernetes writes one (surrounding spaces tolerated, as
/// kube-proxy does), as its network (`10.0.0.1/8` is `10.0.0.0/8`);
/// `Ok(None)` for a valid IPv6 one.
pub fn parse_cidr(text: &str) -> Result<Option<Cidr>, String> {
    let text = text.trim();
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| format!("{text:?}: the prefix length is not a number"))?;
    match parse_ip(addr) {
        Some(IpAddr::V4(addr)) if prefix <= 32 => Ok(Some(Cidr {
            addr: Cidr { addr, prefix }.network(),
            prefix,
        })),
        Some(IpAddr::V4(_)) => Err(format!("{text:?}: prefix length {prefix} is over 32")),
        Some(IpAddr::V6(_)) if prefix <= 128 => Ok(None),
        _ => Err(format!("{text:?} is not a CIDR (address/prefix)")),
    }
}

/// An IP address as kube-proxy reads one: leniently, so an IPv4 address
/// with leading zeros in a part (`010.0.0.1`, which the API server's legacy
/// validation lets through) is read as decimal, as Go's old parser did.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = IpAddr::from_str(text) {
        return Some(ip);
    }
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (octet, part) in octets.iter_mut().zip(&parts) {
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
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
    /// The first of the endpoint's addresses: like kube-proxy, the only
    /// one used (all are validated). One address, not the list: 100,000
    /// endpoints would hold 100,000 small allocations for nothing.
    pub address: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// Topology hints: the zones and nodes this endpoint is meant for.
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// What the proxy reads of a Node: its zone (topology hints), its
/// InternalIPs (`--nodeport-addresses primary`, the SNAT address) and
/// whether it is on its way out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    pub internal_ips: Vec<Ipv4Addr>,
    /// Being deleted (a deletionTimestamp), or about to be (the cluster
    /// autoscaler's `ToBeDeletedByClusterAutoscaler` taint): kube-proxy's
    /// `/healthz` then says the node should get no new traffic.
    pub leaving: bool,
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The node label topology hints refer to.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl NodeInfo {
    /// Addresses that do not parse are skipped: a Node is never rejected.
    pub fn from_k8s(node: &Node) -> Self {
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: label(&node.metadata, ZONE_LABEL).cloned(),
            internal_ips: node
                .status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| match parse_ip(&a.address) {
                    Some(IpAddr::V4(v4)) => Some(v4),
                    _ => None,
                })
                .collect(),
            leaving: node.metadata.deletion_timestamp.is_some()
                || node
                    .spec
                    .iter()
                    .flat_map(|s| s.taints.iter().flatten())
                    .any(|t| t.key == TO_BE_DELETED_TAINT),
        }
    }
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
        node_port: None,
    }))
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.labels.as_ref().and_then(|l| l.get(key))
}

impl ServiceInfo {
    /// One line per part of the Service this dataplane does not program.
    pub fn unsupported_notes(&self) -> Vec<String> {
        self.unsupported_ports
            .iter()
            .map(|p| {
                format!(
                    "Service {}: {p}: SCTP is not supported by this dataplane yet; the other ports are programmed",
                    self.name
                )
            })
            .chain(
                self.notes
                    .iter()
                    .map(|(field, why)| format!("Service {}: {field}: {why}", self.name)),
            )
            .collect()
    }

    /// `Ok(Err(_))`: valid, but nothing for this proxy to program.
    pub fn from_k8s(svc: &Service) -> Result<Result<Self, Skipped>, Rejection> {
        let reject = Reject {
            kind: "Service",
            object: ObjectName::of(&svc.metadata),
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
            match parse_ip(ip) {
                Some(IpAddr::V4(v4)) => cluster_ips.push(v4),
                Some(IpAddr::V6(_)) => {}
                None => {
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
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        let node_ports = type_ == "NodePort" || type_ == "LoadBalancer";
        let mut ports = Vec::new();
        let mut unsupported_ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{i}]");
            match port_info(&reject, &field, p.name.as_ref(), Some(p.port), p.protocol.as_deref())? {
                Some(mut port) => {
                    port.node_port = match p.node_port {
                        None | Some(0) => None,
                        Some(n @ 1..=65535) => Some(n as u16),
                        Some(n) => {
                            return Err(
                                reject.at(format!("{field}.nodePort"), format!("port {n} is out of range 1-65535"))
                            )
                        }
                    };
                    ports.push(port)
                }
                None => unsupported_ports.push(field),
            }
        }
        let mut notes = Vec::new();
        let mut external_ips = Vec::new();
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            match parse_ip(ip) {
                Some(IpAddr::V4(v4)) => external_ips.push(v4),
                Some(IpAddr::V6(_)) => {}
                None => return Err(reject.at(format!("spec.externalIPs[{i}]"), format!("{ip:?} is not an IP address"))),
            }
        }
        let mut load_balancer_ips = Vec::new();
        if type_ == "LoadBalancer" {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for (i, ingress) in ingress.into_iter().flatten().enumerate() {
                let field = format!("status.loadBalancer.ingress[{i}]");
                let Some(ip) = &ingress.ip else {
                    if let Some(host) = &ingress.hostname {
                        notes.push((
                            field,
                            format!("hostname {host:?} without an ip: nothing to program (the load balancer resolves it itself)"),
                        ));
                    }
                    continue;
                };
                if ingress.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                match parse_ip(ip) {
                    Some(IpAddr::V4(v4)) => load_balancer_ips.push(v4),
                    Some(IpAddr::V6(_)) => {}
                    None => return Err(reject.at(format!("{field}.ip"), format!("{ip:?} is not an IP address"))),
                }
            }
        }
        let mut source_ranges = Vec::new();
        for (i, range) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
            match parse_cidr(range) {
                Ok(Some(cidr)) => source_ranges.push(cidr),
                Ok(None) => {}
                Err(e) => return Err(reject.at(format!("spec.loadBalancerSourceRanges[{i}]"), e)),
            }
        }
        let health_check_node_port = match spec.health_check_node_port {
            None | Some(0) => None,
            Some(n @ 1..=65535) => Some(n as u16),
            Some(n) => return Err(reject.at("spec.healthCheckNodePort", format!("port {n} is out of range 1-65535"))),
        };
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
            created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
            cluster_ips,
            ports,
            unsupported_ports,
            affinity_timeout,
            policy: Policy {
                internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                externally_accessible: node_ports || !external_ips.is_empty(),
            },
            node_ports,
            external_ips,
            load_balancer_ips,
            source_ranges,
            health_check_node_port,
            notes,
        }))
    }
}

impl EndpointSliceInfo {
    /// `Ok(None)`: a slice this dataplane does not program: another address
    /// family, FQDNs, or no `kubernetes.io/service-name` label (kube-proxy
    /// ignores such a slice: it belongs to no Service).
    ///
    /// Read as kube-proxy reads slices (endpointslicecache.go): a port
    /// without a number and an endpoint without addresses are skipped, not
    /// the whole slice.
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Option<Self>, Rejection> {
        let reject = Reject {
            kind: "EndpointSlice",
            object: ObjectName::of(&slice.metadata),
        };
        if reject.object.name.is_empty() {
            return Err(reject.at("metadata.name", "name is missing"));
        }
        let Some(service) = label(&slice.metadata, SERVICE_NAME_LABEL).cloned() else {
            return Ok(None);
        };
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
            .filter(|(_, p)| p.port.is_some_and(|n| n != 0))
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
            .filter(|(_, e)| !e.addresses.is_empty())
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
    let mut addresses = e.addresses.iter().enumerate().map(|(j, a)| match parse_ip(a) {
        Some(IpAddr::V4(v4)) => Ok(v4),
        _ => Err(reject.at(
            format!("endpoints[{i}].addresses[{j}]"),
            format!("{a:?} is not an IPv4 address"),
        )),
    });
    // The caller skips endpoints without addresses, as kube-proxy does.
    let Some(address) = addresses.next() else {
        return Err(reject.at(format!("endpoints[{i}].addresses"), "no address"));
    };
    let address = address?;
    for later in addresses {
        later?;
    }
    let c = e.conditions.as_ref();
    // kube-proxy's reading of the conditions: nil ready and nil serving mean
    // true, nil terminating means false.
    Ok(EndpointInfo {
        address,
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
