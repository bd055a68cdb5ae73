//! The pure model: Services and EndpointSlices in, the desired dataplane
//! state out. No I/O happens here, so every rule is table-tested.
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
    pub port_name: String,
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

impl DesiredState {
    pub fn endpoint_count(&self) -> usize {
        self.frontends.values().map(|f| f.backends.len()).sum()
    }
}

/// The desired dataplane state for these services and slices. Services are
/// taken in name order, so that a frontend claimed twice goes to the same
/// Service every time.
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
    let mut services: Vec<&ServiceInfo> = services.into_iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));

    let mut state = DesiredState::default();
    for svc in services {
        let slices = slices_by_service
            .get(&(svc.name.namespace.as_str(), svc.name.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (i, port) in svc.ports.iter().enumerate() {
            let backends = backends_for_port(slices, &port.name, port.protocol, svc.policy, node);
            for &ip in &svc.cluster_ips {
                let frontend = Frontend {
                    ip,
                    port: port.port,
                    protocol: port.protocol,
                };
                if let Some(owner) = state.frontends.get(&frontend) {
                    state.conflicts.push(Rejection {
                        kind: "Service",
                        object: svc.name.clone(),
                        field: format!("spec.ports[{i}]"),
                        reason: format!("{frontend} is already served for Service {}", owner.service),
                    });
                    continue;
                }
                state.frontends.insert(
                    frontend,
                    FrontendState {
                        service: svc.name.clone(),
                        port_name: port.name.clone(),
                        backends: backends.clone(),
                        affinity_timeout: svc.affinity_timeout,
                    },
                );
            }
        }
    }
    state
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
