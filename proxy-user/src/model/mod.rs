//! The pure model: Services and EndpointSlices in, the desired dataplane
//! state out. No I/O happens here, so every rule is table-tested.
pub mod desired;
pub mod objects;
pub mod topology;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use objects::{EndpointInfo, EndpointSliceInfo, ObjectName, Protocol, Rejection, ServiceInfo};
use topology::{NodeTopology, Policy};

/// One service port as clients address it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    pub service: ObjectName,
    pub backends: BTreeSet<BackendAddr>,
    pub affinity_timeout: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// Service ports that could not be programmed because another Service
    /// already claims the same frontend.
    pub conflicts: Vec<Rejection>,
}

/// One frontend a Service asks for, with the index of its port (for
/// reporting a conflict on `spec.ports[i]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub frontend: Frontend,
    pub port_index: usize,
    pub state: FrontendState,
}

/// Every frontend one Service asks for, given its slices: the pure rule
/// that both the incremental tracker and a from-scratch computation use.
pub fn service_frontends(svc: &ServiceInfo, slices: &[&EndpointSliceInfo], node: &NodeTopology) -> Vec<Claim> {
    let mut claims = Vec::new();
    for (i, port) in svc.ports.iter().enumerate() {
        let backends = backends_for_port(slices, &port.name, port.protocol, svc.policy, node);
        for &ip in &svc.cluster_ips {
            claims.push(Claim {
                frontend: Frontend {
                    ip,
                    port: port.port,
                    protocol: port.protocol,
                },
                port_index: i,
                state: FrontendState {
                    service: svc.name.clone(),
                    backends: backends.clone(),
                    affinity_timeout: svc.affinity_timeout,
                },
            });
        }
    }
    claims
}

/// The desired dataplane state for these services and slices, from scratch.
pub fn desired_state<'a>(
    services: impl IntoIterator<Item = &'a ServiceInfo>,
    slices: impl IntoIterator<Item = &'a EndpointSliceInfo>,
    node: &NodeTopology,
) -> DesiredState {
    let mut slices_by_service: BTreeMap<(&str, &str), Vec<&EndpointSliceInfo>> = BTreeMap::new();
    for slice in slices {
        slices_by_service
            .entry((slice.name.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    let mut tracker = desired::DesiredTracker::default();
    let mut changed = BTreeSet::new();
    for svc in services {
        let slices = slices_by_service
            .get(&(svc.name.namespace.as_str(), svc.name.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        tracker.set_service(&svc.name, service_frontends(svc, slices, node), &mut changed);
    }
    tracker.state()
}

/// Ports are matched by name (and protocol): the same named port may have a
/// different number in each slice, so each endpoint takes its slice's number.
fn backends_for_port(
    slices: &[&EndpointSliceInfo],
    port_name: &str,
    protocol: Protocol,
    policy: Policy,
    node: &NodeTopology,
) -> BTreeSet<BackendAddr> {
    let candidates: Vec<(&EndpointInfo, u16)> = slices
        .iter()
        .flat_map(|slice| {
            slice
                .ports
                .iter()
                .filter(|p| p.name == port_name && p.protocol == protocol)
                .flat_map(move |p| slice.endpoints.iter().map(move |e| (e, p.port)))
        })
        .collect();
    let categorized = topology::categorize(&candidates, |(e, _)| e, policy, node);
    topology::cluster_ip_endpoints(&categorized, policy)
        .into_iter()
        .map(|(e, port)| BackendAddr {
            ip: e.addresses[0],
            port,
        })
        .collect()
}

#[cfg(test)]
mod tests;
