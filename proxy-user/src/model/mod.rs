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

pub use proxy_common::FrontendKind;

use objects::{Cidr, EndpointInfo, EndpointSliceInfo, ObjectName, Protocol, Rejection, ServiceInfo};
use topology::{Categorized, NodeTopology, Policy};

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
    /// The endpoint runs on this node.
    pub local: bool,
    /// Terminating but still serving: used only while the service (or, for
    /// a Local policy, this node) has no ready endpoint.
    pub terminating: bool,
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
    pub kind: FrontendKind,
    /// Where new flows go: from inside the cluster always, from outside
    /// unless `external_local` says otherwise.
    pub backends: BTreeSet<BackendAddr>,
    /// `externalTrafficPolicy: Local` on an external address: this node's
    /// endpoints, the only ones traffic from outside may use.
    pub external_local: Option<BTreeSet<BackendAddr>>,
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges` of a LoadBalancer IP (empty: any source).
    pub source_ranges: Vec<Cidr>,
    /// No usable endpoint anywhere: new connections are refused (kube-proxy's
    /// REJECT); otherwise an empty set (a Local policy's) drops them.
    pub reject: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// Service ports that could not be programmed because another Service
    /// already claims the same frontend.
    pub conflicts: Vec<Rejection>,
}

/// One frontend a Service asks for, with the field that asks for it (for
/// reporting a conflict, e.g. `spec.ports[0].nodePort`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub frontend: Frontend,
    pub field: String,
    pub state: FrontendState,
}

/// Every frontend one Service asks for, given its slices: the pure rule
/// that both the incremental tracker and a from-scratch computation use.
///
/// - ClusterIPs at each port: cluster endpoints (local ones under
///   internalTrafficPolicy Local).
/// - `nodePort`s on each of the node's NodePort addresses, `externalIPs`
///   and LoadBalancer ingress IPs at each port: cluster endpoints for
///   traffic from inside, and under externalTrafficPolicy Local this node's
///   endpoints for traffic from outside.
pub fn service_frontends(svc: &ServiceInfo, slices: &[&EndpointSliceInfo], node: &NodeTopology) -> Vec<Claim> {
    let mut claims = Vec::new();
    for (i, port) in svc.ports.iter().enumerate() {
        let categorized = categorize_port(slices, &port.name, port.protocol, svc.policy, node);
        let set = |endpoints: Vec<(&EndpointInfo, u16)>| -> BTreeSet<BackendAddr> {
            endpoints
                .into_iter()
                .map(|(e, port)| BackendAddr {
                    ip: e.address,
                    port,
                    local: e.node_name.as_deref() == Some(node.name.as_str()),
                    terminating: !e.ready,
                })
                .collect()
        };
        let state =
            |kind, backends: &BTreeSet<BackendAddr>, external_local: &Option<BTreeSet<BackendAddr>>| FrontendState {
                service: svc.name.clone(),
                kind,
                backends: backends.clone(),
                external_local: external_local.clone(),
                affinity_timeout: svc.affinity_timeout,
                source_ranges: if kind == FrontendKind::LoadBalancer {
                    svc.source_ranges.clone()
                } else {
                    Vec::new()
                },
                reject: !categorized.has_any,
            };
        let mut claim = |ip, at: u16, kind, field: String, backends, external_local| {
            claims.push(Claim {
                frontend: Frontend {
                    ip,
                    port: at,
                    protocol: port.protocol,
                },
                field,
                state: state(kind, backends, external_local),
            });
        };
        let cluster_ip_backends = set(topology::cluster_ip_endpoints(&categorized, svc.policy));
        for &ip in &svc.cluster_ips {
            claim(
                ip,
                port.port,
                FrontendKind::ClusterIp,
                format!("spec.ports[{i}]"),
                &cluster_ip_backends,
                &None,
            );
        }
        if !svc.policy.externally_accessible {
            continue;
        }
        let backends = set(topology::in_cluster_external_endpoints(&categorized));
        let local = topology::external_local_endpoints(&categorized, svc.policy).map(set);
        if let Some(node_port) = port
            .node_port
            .filter(|n| svc.node_ports && node.node_port_range.contains(n))
        {
            for &ip in &node.nodeport_addresses {
                let field = format!("spec.ports[{i}].nodePort");
                claim(ip, node_port, FrontendKind::NodePort, field, &backends, &local);
            }
        }
        for (j, &ip) in svc.external_ips.iter().enumerate() {
            let field = format!("spec.externalIPs[{j}]");
            claim(ip, port.port, FrontendKind::ExternalIp, field, &backends, &local);
        }
        for (j, &ip) in svc.load_balancer_ips.iter().enumerate() {
            let field = format!("status.loadBalancer.ingress[{j}].ip");
            claim(ip, port.port, FrontendKind::LoadBalancer, field, &backends, &local);
        }
    }
    claims
}

/// What of a Service the node cannot serve as asked, given its
/// configuration: `(field, why)`, reported once like any rejection.
pub fn service_notes(svc: &ServiceInfo, node: &NodeTopology) -> Vec<(String, String)> {
    let mut notes = Vec::new();
    if !svc.node_ports {
        return notes;
    }
    for (i, port) in svc.ports.iter().enumerate() {
        if let Some(n) = port.node_port.filter(|n| !node.node_port_range.contains(n)) {
            notes.push((
                format!("spec.ports[{i}].nodePort"),
                format!(
                    "{n} is outside the node port range {}-{}: not served",
                    node.node_port_range.start(),
                    node.node_port_range.end()
                ),
            ));
        }
    }
    notes
}

/// The HTTP health check a Service asks for on each node
/// (`healthCheckNodePort`), with how many endpoints are ready on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectName,
    pub port: u16,
    pub local_endpoints: usize,
}

/// kube-proxy's health check for externalTrafficPolicy Local services:
/// ready endpoints on this node (terminating ones do not count, so a node
/// whose last pod is shutting down stops getting new traffic).
pub fn health_check(svc: &ServiceInfo, slices: &[&EndpointSliceInfo], node: &NodeTopology) -> Option<HealthCheck> {
    let port = svc.health_check_node_port?;
    if !(svc.policy.external_local && svc.policy.externally_accessible) {
        return None;
    }
    let local: BTreeSet<Ipv4Addr> = slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.ready && e.node_name.as_deref() == Some(node.name.as_str()))
        .map(|e| e.address)
        .collect();
    Some(HealthCheck {
        service: svc.name.clone(),
        port,
        local_endpoints: local.len(),
    })
}

/// Ports of a Service whose traffic policy wants this node's endpoints and
/// finds none, although the service has endpoints elsewhere: kube-proxy's
/// `kubeproxy_sync_proxy_rules_no_local_endpoints_total`, whose traffic the
/// node drops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    /// internalTrafficPolicy Local: traffic from inside the cluster.
    pub internal: usize,
    /// externalTrafficPolicy Local: traffic from outside.
    pub external: usize,
}

pub fn no_local_endpoints(svc: &ServiceInfo, slices: &[&EndpointSliceInfo], node: &NodeTopology) -> NoLocalEndpoints {
    let mut counts = NoLocalEndpoints::default();
    let external_local = svc.policy.external_local && svc.policy.externally_accessible;
    if !(svc.policy.internal_local || external_local) {
        return counts;
    }
    for port in &svc.ports {
        let categorized = categorize_port(slices, &port.name, port.protocol, svc.policy, node);
        // No endpoint anywhere is a REJECT, not this.
        if !categorized.has_any || categorized.local.as_ref().is_some_and(|l| !l.is_empty()) {
            continue;
        }
        counts.internal += usize::from(svc.policy.internal_local);
        counts.external += usize::from(external_local);
    }
    counts
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
        tracker.set_service(
            &svc.name,
            svc.created,
            service_frontends(svc, slices, node),
            &mut changed,
        );
    }
    tracker.state()
}

/// Ports are matched by name (and protocol): the same named port may have a
/// different number in each slice, so each endpoint takes its slice's number.
fn categorize_port<'a>(
    slices: &[&'a EndpointSliceInfo],
    port_name: &str,
    protocol: Protocol,
    policy: Policy,
    node: &NodeTopology,
) -> Categorized<(&'a EndpointInfo, u16)> {
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
    topology::categorize(&candidates, |(e, _)| e, policy, node)
}

#[cfg(test)]
mod tests;
