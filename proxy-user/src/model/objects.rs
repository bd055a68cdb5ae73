//! Validated, dataplane-relevant views of Services and EndpointSlices.
//!
//! Every Kubernetes object enters the model through here: whatever the source
//! (a manifest directory or the API server), an object that cannot be
//! programmed is rejected with the field at fault, and nothing else is
//! affected by it.
use std::{fmt, net::Ipv4Addr, str::FromStr};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
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

    /// Kubernetes' protocol field: absent means TCP.
    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Err("SCTP is not supported by this dataplane yet".into()),
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
    pub ports: Vec<ServicePortInfo>,
    /// ClientIP affinity timeout in seconds, when affinity is on.
    pub affinity_timeout: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
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
    pub ports: Vec<EndpointPortInfo>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPortInfo {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Never empty; like kube-proxy, only the first is used.
    pub addresses: Vec<Ipv4Addr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

/// What became of a Service that is valid but not ours to program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skipped {
    Headless,
    ExternalName,
    OtherProxy(String),
    NoIpv4ClusterIp,
}

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectName {
    ObjectName {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

fn port_number(
    value: Option<i32>,
    field: &str,
    reject: &impl Fn(String, String) -> Rejection,
) -> Result<u16, Rejection> {
    match value {
        Some(p @ 1..=65535) => Ok(p as u16),
        Some(p) => Err(reject(field.into(), format!("port {p} is out of range 1-65535"))),
        None => Err(reject(field.into(), "port is missing".into())),
    }
}

impl ServiceInfo {
    /// `Ok(Err(_))`: valid, but nothing for this proxy to program.
    pub fn from_k8s(svc: &Service) -> Result<Result<Self, Skipped>, Rejection> {
        let name = object_name(&svc.metadata);
        let reject = |field: String, reason: String| Rejection {
            kind: "Service",
            object: name.clone(),
            field,
            reason,
        };
        if name.name.is_empty() {
            return Err(reject("metadata.name".into(), "name is missing".into()));
        }
        if let Some(owner) = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
        {
            return Ok(Err(Skipped::OtherProxy(owner.clone())));
        }
        let spec = svc
            .spec
            .as_ref()
            .ok_or_else(|| reject("spec".into(), "spec is missing".into()))?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return Ok(Err(Skipped::ExternalName));
        }
        let ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
            (_, Some(ip)) => vec![ip],
            _ => vec![],
        };
        if ips.iter().any(|ip| ip.as_str() == "None") {
            return Ok(Err(Skipped::Headless));
        }
        let mut cluster_ips = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            match std::net::IpAddr::from_str(ip) {
                Ok(std::net::IpAddr::V4(v4)) => cluster_ips.push(v4),
                Ok(std::net::IpAddr::V6(_)) => {}
                Err(_) => {
                    let field = if spec.cluster_ips.is_some() {
                        format!("spec.clusterIPs[{i}]")
                    } else {
                        "spec.clusterIP".into()
                    };
                    return Err(reject(field, format!("{ip:?} is not an IP address")));
                }
            }
        }
        if cluster_ips.is_empty() {
            return Ok(Err(Skipped::NoIpv4ClusterIp));
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| service_port(i, p, &reject))
            .collect::<Result<Vec<_>, _>>()?;
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
                        return Err(reject(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                            format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT}"),
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(reject(
                    "spec.sessionAffinity".into(),
                    format!("unknown session affinity {other:?} (expected None or ClientIP)"),
                ))
            }
        };
        Ok(Ok(ServiceInfo {
            name,
            cluster_ips,
            ports,
            affinity_timeout,
        }))
    }
}

fn service_port(
    i: usize,
    p: &ServicePort,
    reject: &impl Fn(String, String) -> Rejection,
) -> Result<ServicePortInfo, Rejection> {
    let field = |f: &str| format!("spec.ports[{i}].{f}");
    Ok(ServicePortInfo {
        name: p.name.clone().unwrap_or_default(),
        port: port_number(Some(p.port), &field("port"), reject)?,
        protocol: Protocol::parse(p.protocol.as_deref()).map_err(|e| reject(field("protocol"), e))?,
    })
}

impl EndpointSliceInfo {
    /// `Ok(None)`: a valid slice of another address family or FQDNs, which
    /// this dataplane does not program.
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Option<Self>, Rejection> {
        let name = object_name(&slice.metadata);
        let reject = |field: String, reason: String| Rejection {
            kind: "EndpointSlice",
            object: name.clone(),
            field,
            reason,
        };
        if name.name.is_empty() {
            return Err(reject("metadata.name".into(), "name is missing".into()));
        }
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .ok_or_else(|| {
                reject(
                    format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
                    "the label naming the slice's Service is missing".into(),
                )
            })?;
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => return Ok(None),
            other => {
                return Err(reject("addressType".into(), format!("unknown address type {other:?}")));
            }
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| endpoint_port(i, p, &reject))
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, e)| endpoint(i, e, &reject))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(EndpointSliceInfo {
            name,
            service,
            ports,
            endpoints,
        }))
    }
}

fn endpoint_port(
    i: usize,
    p: &EndpointPort,
    reject: &impl Fn(String, String) -> Rejection,
) -> Result<EndpointPortInfo, Rejection> {
    let field = |f: &str| format!("ports[{i}].{f}");
    Ok(EndpointPortInfo {
        name: p.name.clone().unwrap_or_default(),
        port: port_number(p.port, &field("port"), reject)?,
        protocol: Protocol::parse(p.protocol.as_deref()).map_err(|e| reject(field("protocol"), e))?,
    })
}

fn endpoint(i: usize, e: &Endpoint, reject: &impl Fn(String, String) -> Rejection) -> Result<EndpointInfo, Rejection> {
    let addresses = e
        .addresses
        .iter()
        .enumerate()
        .map(|(j, a)| {
            Ipv4Addr::from_str(a).map_err(|_| {
                reject(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IPv4 address"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addresses.is_empty() {
        return Err(reject(
            format!("endpoints[{i}].addresses"),
            "an endpoint needs an address".into(),
        ));
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
    })
}
