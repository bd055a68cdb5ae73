//! Service and EndpointSlice YAML as `kubectl get -o yaml` prints it.
use std::{fmt::Write, net::Ipv4Addr};

pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    pub protocol: &'a str,
}

pub fn tcp<'a>(name: &'a str, port: u16) -> Port<'a> {
    Port {
        name,
        port,
        protocol: "TCP",
    }
}

pub fn udp<'a>(name: &'a str, port: u16) -> Port<'a> {
    Port {
        name,
        port,
        protocol: "UDP",
    }
}

pub fn service(name: &str, cluster_ip: Ipv4Addr, ports: &[Port]) -> String {
    exposed_service(name, cluster_ip, ports, &Exposure::default())
}

/// How a Service is reached (from outside the cluster too) and balanced.
#[derive(Default)]
pub struct Exposure<'a> {
    /// `NodePort` or `LoadBalancer` (default: `ClusterIP`).
    pub type_: Option<&'a str>,
    /// One per port, in order.
    pub node_ports: &'a [u16],
    pub external_ips: &'a [Ipv4Addr],
    /// `status.loadBalancer.ingress[].ip`.
    pub ingress_ips: &'a [Ipv4Addr],
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    pub health_check_node_port: Option<u16>,
    pub source_ranges: &'a [&'a str],
    /// `sessionAffinity: ClientIP` with this timeout in seconds.
    pub affinity_timeout: Option<u32>,
}

pub fn exposed_service(name: &str, cluster_ip: Ipv4Addr, ports: &[Port], exposure: &Exposure) -> String {
    let type_ = exposure.type_.unwrap_or("ClusterIP");
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {type_}\n  clusterIP: {cluster_ip}\n  clusterIPs:\n  - {cluster_ip}\n  selector:\n    app: {name}\n  ports:\n"
    );
    for (i, p) in ports.iter().enumerate() {
        let _ = write!(
            yaml,
            "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {}\n",
            p.name, p.port, p.protocol, p.name
        );
        if let Some(node_port) = exposure.node_ports.get(i) {
            let _ = writeln!(yaml, "    nodePort: {node_port}");
        }
    }
    let list = |items: Vec<String>| format!("[{}]", items.join(", "));
    if !exposure.external_ips.is_empty() {
        let ips = exposure.external_ips.iter().map(|ip| ip.to_string()).collect();
        let _ = writeln!(yaml, "  externalIPs: {}", list(ips));
    }
    if exposure.local {
        yaml.push_str("  externalTrafficPolicy: Local\n");
    }
    if let Some(port) = exposure.health_check_node_port {
        let _ = writeln!(yaml, "  healthCheckNodePort: {port}");
    }
    if let Some(timeout) = exposure.affinity_timeout {
        let _ = writeln!(
            yaml,
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {timeout}"
        );
    }
    if !exposure.source_ranges.is_empty() {
        let ranges = exposure.source_ranges.iter().map(|r| format!("'{r}'")).collect();
        let _ = writeln!(yaml, "  loadBalancerSourceRanges: {}", list(ranges));
    }
    if !exposure.ingress_ips.is_empty() {
        yaml.push_str("status:\n  loadBalancer:\n    ingress:\n");
        for ip in exposure.ingress_ips {
            let _ = writeln!(yaml, "    - ip: {ip}");
        }
    }
    yaml
}

/// An endpoint: its address, whether it is ready, its node and its zone hint.
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub ready: bool,
    /// Shutting down: not ready, still serving.
    pub terminating: bool,
    pub node: Option<String>,
    pub zone_hint: Option<String>,
}

impl Endpoint {
    pub fn ready(ip: Ipv4Addr) -> Self {
        Endpoint {
            ip,
            ready: true,
            terminating: false,
            node: None,
            zone_hint: None,
        }
    }

    /// A pod shutting down: not ready, still serving what it has.
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.terminating = true;
        self
    }

    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }

    pub fn on(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }

    pub fn for_zone(mut self, zone: &str) -> Self {
        self.zone_hint = Some(zone.into());
        self
    }
}

pub fn ready(ips: &[Ipv4Addr]) -> Vec<Endpoint> {
    ips.iter().map(|&ip| Endpoint::ready(ip)).collect()
}

pub fn endpoint_slice(name: &str, service: &str, ports: &[Port], endpoints: &[Endpoint]) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{}\"\nports:\n",
        // As the EndpointSlice controller stamps it: the change is now.
        k8s_openapi::jiff::Timestamp::now()
    );
    for p in ports {
        let _ = write!(
            yaml,
            "- name: {}\n  port: {}\n  protocol: {}\n",
            p.name, p.port, p.protocol
        );
    }
    yaml.push_str("endpoints:\n");
    for e in endpoints {
        let _ = write!(
            yaml,
            "- addresses:\n  - {}\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: {}\n",
            e.ip,
            e.ready,
            e.ready || e.terminating,
            e.terminating
        );
        if let Some(node) = &e.node {
            let _ = writeln!(yaml, "  nodeName: {node}");
        }
        if let Some(zone) = &e.zone_hint {
            let _ = writeln!(yaml, "  hints:\n    forZones:\n    - name: {zone}");
        }
    }
    yaml
}

/// A Service and the one EndpointSlice the EndpointSlice controller would
/// write for it (`<name>-abc12`): every port targets `target_port`.
pub fn service_with_endpoints(
    name: &str,
    vip: Ipv4Addr,
    ports: &[Port],
    target_port: u16,
    endpoints: &[Endpoint],
) -> String {
    exposed_service_with_endpoints(name, vip, ports, &Exposure::default(), target_port, endpoints)
}

/// The same for a Service reached from outside.
pub fn exposed_service_with_endpoints(
    name: &str,
    vip: Ipv4Addr,
    ports: &[Port],
    exposure: &Exposure,
    target_port: u16,
    endpoints: &[Endpoint],
) -> String {
    let slice_ports: Vec<Port> = ports
        .iter()
        .map(|p| Port {
            name: p.name,
            port: target_port,
            protocol: p.protocol,
        })
        .collect();
    format!(
        "{}---\n{}",
        exposed_service(name, vip, ports, exposure),
        endpoint_slice(&format!("{name}-abc12"), name, &slice_ports, endpoints)
    )
}

/// The tests' usual Service: `web` with `http` 80/TCP and `dns` 53/UDP,
/// both targeting the pods' server port, exposed as `exposure` says.
pub fn web(vip: Ipv4Addr, exposure: &Exposure, endpoints: &[Endpoint]) -> String {
    exposed_service_with_endpoints(
        "web",
        vip,
        &[tcp("http", 80), udp("dns", 53)],
        exposure,
        crate::cluster::POD_PORT,
        endpoints,
    )
}
