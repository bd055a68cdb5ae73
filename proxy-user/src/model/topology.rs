//! Which endpoints of a service port this node may send new connections to:
//! the one place where endpoint-selection rules live (kube-proxy's
//! `CategorizeEndpoints`, pkg/proxy/topology.go).
//!
//! - Cluster endpoints: ready ones, narrowed by topology hints when every
//!   ready endpoint carries them and some are for this node (PreferSameNode)
//!   or its zone (PreferSameZone); when none is ready anywhere, the serving
//!   and terminating ones.
//! - Local endpoints (for a Local traffic policy): this node's ready ones,
//!   else this node's serving and terminating ones. Topology does not apply.
use super::objects::EndpointInfo;

/// Which endpoint sets a service port uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// Has a NodePort, LoadBalancer or external IP.
    pub externally_accessible: bool,
}

impl Policy {
    /// Even under `externalTrafficPolicy: Local`, traffic from inside the
    /// cluster to an external address is short-circuited to cluster endpoints.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || self.externally_accessible
    }

    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.externally_accessible && self.external_local)
    }
}

/// Where this proxy runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTopology {
    pub name: String,
    /// The node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// The addresses NodePorts answer on (`--nodeport-addresses`, resolved).
    pub nodeport_addresses: Vec<std::net::Ipv4Addr>,
    /// `--service-node-port-range`: a nodePort outside it is not served.
    pub node_port_range: std::ops::RangeInclusive<u16>,
}

/// `--nodeport-addresses`: which of the node's addresses NodePorts answer on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The Node object's InternalIP(s) (kube-proxy's `primary`, the default
    /// it recommends); the interfaces' addresses until the Node is known.
    #[default]
    Primary,
    /// The node's interface addresses within these ranges.
    Cidrs(Vec<super::objects::Cidr>),
}

impl NodePortAddresses {
    /// `primary`, or a comma-separated list of CIDRs.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "primary" {
            return Ok(NodePortAddresses::Primary);
        }
        let mut cidrs = Vec::new();
        for part in text.split(',') {
            if let Some(cidr) = super::objects::parse_cidr(part)? {
                cidrs.push(cidr);
            }
        }
        if cidrs.is_empty() {
            return Err(format!("{text:?}: no IPv4 CIDR (or `primary`)"));
        }
        Ok(NodePortAddresses::Cidrs(cidrs))
    }

    /// The addresses, given the Node's InternalIPs and the addresses of the
    /// node's interfaces.
    pub fn resolve(
        &self,
        internal_ips: &[std::net::Ipv4Addr],
        interfaces: &[std::net::Ipv4Addr],
    ) -> Vec<std::net::Ipv4Addr> {
        let mut addrs: Vec<std::net::Ipv4Addr> = match self {
            NodePortAddresses::Primary if !internal_ips.is_empty() => internal_ips.to_vec(),
            NodePortAddresses::Primary => interfaces.to_vec(),
            NodePortAddresses::Cidrs(cidrs) => interfaces
                .iter()
                .copied()
                .filter(|ip| cidrs.iter().any(|c| c.contains(*ip)))
                .collect(),
        };
        addrs.sort();
        addrs.dedup();
        addrs
    }
}

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

impl Default for NodeTopology {
    fn default() -> Self {
        NodeTopology {
            name: String::new(),
            zone: None,
            nodeport_addresses: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Categorized<T> {
    /// `None` when the port never uses cluster endpoints.
    pub cluster: Option<Vec<T>>,
    /// `None` when the port never uses local endpoints.
    pub local: Option<Vec<T>>,
    /// Whether any endpoint anywhere could serve (even if none is reachable
    /// from here): tells "drop" from "reject" when a set is empty.
    pub has_any: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    All,
    SameNode,
    SameZone,
}

/// `info` tells the conditions of each candidate.
pub fn categorize<'e, T: Copy>(
    candidates: &[T],
    info: impl Fn(T) -> &'e EndpointInfo,
    policy: Policy,
    node: &NodeTopology,
) -> Categorized<T> {
    let mut out = Categorized {
        cluster: None,
        local: None,
        has_any: false,
    };
    if candidates.is_empty() {
        if policy.uses_cluster_endpoints() {
            out.cluster = Some(Vec::new());
        }
        if policy.uses_local_endpoints() {
            out.local = Some(Vec::new());
        }
        return out;
    }
    let filter = |keep: &dyn Fn(&EndpointInfo) -> bool| -> Vec<T> {
        candidates.iter().copied().filter(|&c| keep(info(c))).collect()
    };
    let serving_terminating = |e: &EndpointInfo| e.serving && e.terminating;
    let is_local = |e: &EndpointInfo| e.node_name.as_deref() == Some(node.name.as_str());

    if policy.uses_cluster_endpoints() {
        let mode = topology_mode(candidates.iter().map(|&c| info(c)), node);
        let mut cluster = filter(&|e| e.ready && available(e, mode, node));
        if cluster.is_empty() {
            cluster = filter(&serving_terminating);
        }
        out.has_any = !cluster.is_empty();
        out.cluster = Some(cluster);
    }
    if policy.uses_local_endpoints() {
        let any_usable = candidates.iter().any(|&c| {
            let e = info(c);
            e.ready || serving_terminating(e)
        });
        out.has_any |= any_usable;
        let mut local = filter(&|e| is_local(e) && e.ready);
        if local.is_empty() {
            local = filter(&|e| is_local(e) && serving_terminating(e));
        }
        out.local = Some(local);
    }
    out
}

fn topology_mode<'e>(endpoints: impl Iterator<Item = &'e EndpointInfo>, node: &NodeTopology) -> TopologyMode {
    let ready: Vec<&EndpointInfo> = endpoints.filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::All;
    }
    if ready.iter().all(|e| !e.node_hints.is_empty()) && ready.iter().any(|e| e.node_hints.contains(&node.name)) {
        return TopologyMode::SameNode;
    }
    if let Some(zone) = &node.zone {
        if ready.iter().all(|e| !e.zone_hints.is_empty()) && ready.iter().any(|e| e.zone_hints.contains(zone)) {
            return TopologyMode::SameZone;
        }
    }
    TopologyMode::All
}

fn available(e: &EndpointInfo, mode: TopologyMode, node: &NodeTopology) -> bool {
    match mode {
        TopologyMode::All => true,
        TopologyMode::SameNode => e.node_hints.contains(&node.name),
        TopologyMode::SameZone => node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
    }
}

/// The endpoints traffic from inside the cluster to an external address
/// (NodePort, LoadBalancer IP, external IP) uses: the cluster ones, even
/// under `externalTrafficPolicy: Local` (kube-proxy's short-circuit for
/// in-cluster clients).
pub fn in_cluster_external_endpoints<T: Copy>(categorized: &Categorized<T>) -> Vec<T> {
    categorized.cluster.clone().unwrap_or_default()
}

/// The endpoints traffic from outside uses under `externalTrafficPolicy:
/// Local`; `None` under Cluster (it uses the cluster ones).
pub fn external_local_endpoints<T: Copy>(categorized: &Categorized<T>, policy: Policy) -> Option<Vec<T>> {
    (policy.externally_accessible && policy.external_local).then(|| categorized.local.clone().unwrap_or_default())
}

/// The endpoints a ClusterIP frontend uses: local ones under
/// `internalTrafficPolicy: Local`, cluster ones otherwise.
pub fn cluster_ip_endpoints<T: Copy>(categorized: &Categorized<T>, policy: Policy) -> Vec<T> {
    let set = if policy.internal_local {
        &categorized.local
    } else {
        &categorized.cluster
    };
    set.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// An endpoint 10.0.0.<id> with its conditions, locality and hints.
    #[derive(Clone)]
    struct Ep {
        id: u8,
        ready: bool,
        serving: bool,
        terminating: bool,
        local: bool,
        zones: &'static [&'static str],
        nodes: &'static [&'static str],
    }

    fn ready(id: u8) -> Ep {
        Ep {
            id,
            ready: true,
            serving: true,
            terminating: false,
            local: false,
            zones: &[],
            nodes: &[],
        }
    }

    impl Ep {
        fn local(mut self) -> Self {
            self.local = true;
            self
        }
        fn not_ready(mut self) -> Self {
            self.ready = false;
            self.serving = false;
            self
        }
        fn terminating(mut self) -> Self {
            self.ready = false;
            self.serving = true;
            self.terminating = true;
            self
        }
        fn zones(mut self, zones: &'static [&'static str]) -> Self {
            self.zones = zones;
            self
        }
        fn nodes(mut self, nodes: &'static [&'static str]) -> Self {
            self.nodes = nodes;
            self
        }
        fn info(&self) -> EndpointInfo {
            EndpointInfo {
                address: Ipv4Addr::new(10, 0, 0, self.id),
                ready: self.ready,
                serving: self.serving,
                terminating: self.terminating,
                node_name: Some(if self.local { "node-a" } else { "node-b" }.to_string()),
                zone_hints: self.zones.iter().map(|z| z.to_string()).collect(),
                node_hints: self.nodes.iter().map(|n| n.to_string()).collect(),
            }
        }
    }

    const CLUSTER: Policy = Policy {
        internal_local: false,
        external_local: false,
        externally_accessible: false,
    };
    const ITP_LOCAL: Policy = Policy {
        internal_local: true,
        external_local: false,
        externally_accessible: false,
    };

    fn external(internal_local: bool, external_local: bool) -> Policy {
        Policy {
            internal_local,
            external_local,
            externally_accessible: true,
        }
    }

    struct Case {
        name: &'static str,
        zone: Option<&'static str>,
        policy: Policy,
        endpoints: Vec<Ep>,
        cluster: Option<Vec<u8>>,
        local: Option<Vec<u8>>,
        has_any: bool,
    }

    /// kube-proxy's TestCategorizeEndpoints cases, with today's semantics
    /// (hints used whenever present, terminating fallback always on).
    #[test]
    fn categorize_endpoints_like_kube_proxy() {
        let abca = || {
            vec![
                ready(3).zones(&["zone-a"]),
                ready(4).zones(&["zone-b"]),
                ready(5).zones(&["zone-c"]),
                ready(6).zones(&["zone-a"]),
            ]
        };
        let cases = vec![
            Case {
                name: "zone hints: only this zone's endpoints",
                zone: Some("zone-a"),
                policy: CLUSTER,
                endpoints: abca(),
                cluster: Some(vec![3, 6]),
                local: None,
                has_any: true,
            },
            Case {
                name: "eTP Local: topology ignored for local endpoints",
                zone: Some("zone-a"),
                policy: external(false, true),
                endpoints: vec![
                    ready(3).zones(&["zone-a"]).local(),
                    ready(4).zones(&["zone-b"]).local(),
                    ready(5).zones(&["zone-c"]),
                    ready(6).zones(&["zone-a"]),
                ],
                cluster: Some(vec![3, 6]),
                local: Some(vec![3, 4]),
                has_any: true,
            },
            Case {
                name: "iTP Local with a NodePort: topology ignored for local endpoints",
                zone: Some("zone-a"),
                policy: external(true, false),
                endpoints: vec![
                    ready(3).zones(&["zone-a"]).local(),
                    ready(4).zones(&["zone-b"]).local(),
                    ready(5).zones(&["zone-c"]),
                    ready(6).zones(&["zone-a"]),
                ],
                cluster: Some(vec![3, 6]),
                local: Some(vec![3, 4]),
                has_any: true,
            },
            Case {
                name: "node without a zone label: no filtering",
                zone: None,
                policy: CLUSTER,
                endpoints: vec![ready(3).zones(&["zone-a"])],
                cluster: Some(vec![3]),
                local: None,
                has_any: true,
            },
            Case {
                name: "empty zone label: no filtering",
                zone: Some(""),
                policy: CLUSTER,
                endpoints: vec![ready(3).zones(&["zone-a"])],
                cluster: Some(vec![3]),
                local: None,
                has_any: true,
            },
            Case {
                name: "node in a zone no endpoint is hinted for: no filtering",
                zone: Some("zone-b"),
                policy: CLUSTER,
                endpoints: vec![ready(3).zones(&["zone-a"])],
                cluster: Some(vec![3]),
                local: None,
                has_any: true,
            },
            Case {
                name: "unready endpoint left out",
                zone: Some("zone-a"),
                policy: CLUSTER,
                endpoints: vec![
                    ready(3).zones(&["zone-a"]),
                    ready(4).zones(&["zone-b"]),
                    ready(5).zones(&["zone-c"]),
                    ready(6).zones(&["zone-a"]).not_ready(),
                ],
                cluster: Some(vec![3]),
                local: None,
                has_any: true,
            },
            Case {
                name: "only unready endpoints in this zone: no filtering",
                zone: Some("zone-a"),
                policy: CLUSTER,
                endpoints: vec![
                    ready(3).zones(&["zone-a"]).not_ready(),
                    ready(4).zones(&["zone-b"]),
                    ready(5).zones(&["zone-c"]),
                    ready(6).zones(&["zone-a"]).not_ready(),
                ],
                cluster: Some(vec![4, 5]),
                local: None,
                has_any: true,
            },
            Case {
                name: "an endpoint without hints: no filtering",
                zone: Some("zone-a"),
                policy: CLUSTER,
                endpoints: vec![
                    ready(3).zones(&["zone-a"]),
                    ready(4).zones(&["zone-b"]),
                    ready(5),
                    ready(6).zones(&["zone-a"]),
                ],
                cluster: Some(vec![3, 4, 5, 6]),
                local: None,
                has_any: true,
            },
            Case {
                name: "several hints per endpoint: any that includes this zone",
                zone: Some("zone-c"),
                policy: CLUSTER,
                endpoints: vec![
                    ready(3).zones(&["zone-a", "zone-b", "zone-c"]),
                    ready(4).zones(&["zone-b", "zone-c"]),
                    ready(5).zones(&["zone-b", "zone-d"]),
                    ready(6).zones(&["zone-c"]),
                ],
                cluster: Some(vec![3, 4, 6]),
                local: None,
                has_any: true,
            },
            Case {
                name: "node hints (PreferSameNode) win over zone hints",
                zone: Some("zone-a"),
                policy: CLUSTER,
                endpoints: vec![
                    ready(3).zones(&["zone-a"]).nodes(&["node-a"]),
                    ready(4).zones(&["zone-a"]).nodes(&["node-b"]),
                ],
                cluster: Some(vec![3]),
                local: None,
                has_any: true,
            },
            Case {
                name: "conflicting topology and localness",
                zone: Some("zone-a"),
                policy: external(false, true),
                endpoints: vec![
                    ready(0).zones(&["zone-a"]).local(),
                    ready(1).zones(&["zone-b"]).local(),
                    ready(2).zones(&["zone-a"]),
                    ready(3).zones(&["zone-b"]),
                ],
                cluster: Some(vec![0, 2]),
                local: Some(vec![0, 1]),
                has_any: true,
            },
            Case {
                name: "iTP Local, no endpoints",
                zone: None,
                policy: ITP_LOCAL,
                endpoints: vec![],
                cluster: None,
                local: Some(vec![]),
                has_any: false,
            },
            Case {
                name: "iTP Local, all endpoints remote",
                zone: None,
                policy: ITP_LOCAL,
                endpoints: vec![ready(0), ready(1)],
                cluster: None,
                local: Some(vec![]),
                has_any: true,
            },
            Case {
                name: "iTP Local, all endpoints local",
                zone: None,
                policy: ITP_LOCAL,
                endpoints: vec![ready(0).local(), ready(1).local()],
                cluster: None,
                local: Some(vec![0, 1]),
                has_any: true,
            },
            Case {
                name: "iTP Local, some endpoints local",
                zone: None,
                policy: ITP_LOCAL,
                endpoints: vec![ready(0).local(), ready(1)],
                cluster: None,
                local: Some(vec![0]),
                has_any: true,
            },
            Case {
                name: "Cluster, no endpoint ready",
                zone: None,
                policy: CLUSTER,
                endpoints: vec![ready(0).not_ready(), ready(1).not_ready()],
                cluster: Some(vec![]),
                local: None,
                has_any: false,
            },
            Case {
                name: "Cluster, some endpoints ready",
                zone: None,
                policy: CLUSTER,
                endpoints: vec![ready(0).not_ready(), ready(1)],
                cluster: Some(vec![1]),
                local: None,
                has_any: true,
            },
            Case {
                name: "Cluster, all endpoints terminating",
                zone: None,
                policy: CLUSTER,
                endpoints: vec![ready(0).terminating().local(), ready(1).terminating()],
                cluster: Some(vec![0, 1]),
                local: None,
                has_any: true,
            },
            Case {
                name: "iTP Local, eTP Cluster, some local",
                zone: None,
                policy: external(true, false),
                endpoints: vec![ready(0).local(), ready(1)],
                cluster: Some(vec![0, 1]),
                local: Some(vec![0]),
                has_any: true,
            },
            Case {
                name: "iTP Cluster, eTP Local, some local",
                zone: None,
                policy: external(false, true),
                endpoints: vec![ready(0).local(), ready(1)],
                cluster: Some(vec![0, 1]),
                local: Some(vec![0]),
                has_any: true,
            },
            Case {
                name: "iTP Local, eTP Local, some local",
                zone: None,
                policy: external(true, true),
                endpoints: vec![ready(0).local(), ready(1)],
                cluster: Some(vec![0, 1]),
                local: Some(vec![0]),
                has_any: true,
            },
            Case {
                name: "iTP Local, eTP Local, all remote",
                zone: None,
                policy: external(true, true),
                endpoints: vec![ready(0), ready(1)],
                cluster: Some(vec![0, 1]),
                local: Some(vec![]),
                has_any: true,
            },
            Case {
                name: "iTP Local, eTP Local, all remote and terminating",
                zone: None,
                policy: external(true, true),
                endpoints: vec![ready(0).terminating(), ready(1).terminating()],
                cluster: Some(vec![0, 1]),
                local: Some(vec![]),
                has_any: true,
            },
            Case {
                name: "iTP Cluster, eTP Local, terminating endpoints",
                zone: None,
                policy: external(false, true),
                endpoints: vec![
                    ready(0),
                    ready(1).not_ready().local(),
                    ready(2).terminating().local(),
                    ready(3).terminating(),
                ],
                cluster: Some(vec![0]),
                local: Some(vec![2]),
                has_any: true,
            },
            Case {
                name: "eTP Local ignored without external access",
                zone: None,
                policy: Policy {
                    internal_local: false,
                    external_local: true,
                    externally_accessible: false,
                },
                endpoints: vec![ready(0), ready(1).local()],
                cluster: Some(vec![0, 1]),
                local: None,
                has_any: true,
            },
            Case {
                name: "no cluster endpoints for an iTP Local internal-only service",
                zone: None,
                policy: ITP_LOCAL,
                endpoints: vec![ready(0), ready(1).local()],
                cluster: None,
                local: Some(vec![1]),
                has_any: true,
            },
        ];
        for case in cases {
            let infos: Vec<EndpointInfo> = case.endpoints.iter().map(Ep::info).collect();
            let refs: Vec<&EndpointInfo> = infos.iter().collect();
            let node = NodeTopology {
                name: "node-a".into(),
                zone: case.zone.map(str::to_string),
                ..Default::default()
            };
            let got = categorize(&refs, |e| e, case.policy, &node);
            let ids = |set: Option<Vec<&EndpointInfo>>| {
                set.map(|v| v.iter().map(|e| e.address.octets()[3]).collect::<Vec<u8>>())
            };
            assert_eq!(ids(got.cluster), case.cluster, "{}: cluster endpoints", case.name);
            assert_eq!(ids(got.local), case.local, "{}: local endpoints", case.name);
            assert_eq!(got.has_any, case.has_any, "{}: has_any", case.name);
        }
    }
}
