//! Table tests of the model: YAML in, desired frontends out.
use std::net::Ipv4Addr;

use super::{
    desired_state,
    objects::{EndpointSliceInfo, Protocol, Rejection, ServiceInfo, Skipped},
    topology::NodeTopology,
    DesiredState, Frontend,
};
use crate::source::manifests::{parse_documents, Document};

/// Every valid Service and EndpointSlice of the YAML; panics on invalid ones.
fn objects(yaml: &str) -> (Vec<ServiceInfo>, Vec<EndpointSliceInfo>) {
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for doc in parse_documents(yaml).unwrap() {
        match doc.unwrap() {
            Document::Service(s) => {
                if let Ok(info) = ServiceInfo::from_k8s(&s).unwrap() {
                    services.push(info);
                }
            }
            Document::EndpointSlice(s) => slices.extend(EndpointSliceInfo::from_k8s(&s).unwrap()),
            Document::Node(_) | Document::Other(_) => {}
        }
    }
    (services, slices)
}

fn state(yaml: &str) -> DesiredState {
    let (services, slices) = objects(yaml);
    desired_state(
        &services,
        &slices,
        &NodeTopology {
            name: "node-a".into(),
            zone: Some("zone-a".into()),
            nodeport_addresses: vec![Ipv4Addr::new(192, 0, 2, 1)],
            ..Default::default()
        },
    )
}

/// Frontend "ip:port/PROTO" -> sorted "ip:port" backends.
fn table(state: &DesiredState) -> Vec<(String, Vec<String>)> {
    state
        .frontends
        .iter()
        .map(|(f, s)| (f.to_string(), s.backends.iter().map(|b| b.to_string()).collect()))
        .collect()
}

fn svc(name: &str, ip: &str, ports: &str) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports:\n{ports}")
}

fn slice(name: &str, service: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\nports:\n{ports}endpoints:\n{endpoints}"
    )
}

fn ep(ip: &str, conditions: &str) -> String {
    format!("- addresses: [{ip}]\n  conditions: {{{conditions}}}\n")
}

const HTTP: &str = "  - {name: http, port: 80, protocol: TCP}\n";
const SLICE_HTTP_8080: &str = "- {name: http, port: 8080, protocol: TCP}\n";

fn row(frontend: &str, backends: &[&str]) -> (String, Vec<String>) {
    (frontend.into(), backends.iter().map(|s| s.to_string()).collect())
}

#[test]
fn desired_state_table() {
    struct Case {
        name: &'static str,
        yaml: String,
        want: Vec<(String, Vec<String>)>,
    }
    let cases = vec![
        Case {
            name: "one service, one slice",
            yaml: svc("web", "10.96.0.1", HTTP) + &slice("web-a", "web", SLICE_HTTP_8080, &(ep("10.0.0.1", "") + &ep("10.0.0.2", "ready: true"))),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.1:8080", "10.0.0.2:8080"])],
        },
        Case {
            name: "no slices: a frontend without backends",
            yaml: svc("web", "10.96.0.1", HTTP),
            want: vec![row("10.96.0.1:80/TCP", &[])],
        },
        Case {
            name: "named port resolves to a different number in each slice",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice("web-a", "web", SLICE_HTTP_8080, &ep("10.0.0.1", ""))
                + &slice("web-b", "web", "- {name: http, port: 9090, protocol: TCP}\n", &ep("10.0.0.2", "")),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.1:8080", "10.0.0.2:9090"])],
        },
        Case {
            name: "several slices merged, duplicates removed",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice("web-a", "web", SLICE_HTTP_8080, &(ep("10.0.0.1", "") + &ep("10.0.0.2", "")))
                + &slice("web-b", "web", SLICE_HTTP_8080, &(ep("10.0.0.2", "") + &ep("10.0.0.3", ""))),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])],
        },
        Case {
            name: "multi-port service: each port takes the slice port of its name",
            yaml: svc("web", "10.96.0.1", "  - {name: http, port: 80}\n  - {name: metrics, port: 9100}\n  - {name: dns, port: 53, protocol: UDP}\n")
                + &slice(
                    "web-a",
                    "web",
                    "- {name: metrics, port: 19100}\n- {name: http, port: 8080}\n- {name: dns, port: 5353, protocol: UDP}\n",
                    &ep("10.0.0.1", ""),
                ),
            want: vec![
                row("10.96.0.1:53/UDP", &["10.0.0.1:5353"]),
                row("10.96.0.1:80/TCP", &["10.0.0.1:8080"]),
                row("10.96.0.1:9100/TCP", &["10.0.0.1:19100"]),
            ],
        },
        Case {
            name: "same name, other protocol: no match",
            yaml: svc("web", "10.96.0.1", HTTP) + &slice("web-a", "web", "- {name: http, port: 8080, protocol: UDP}\n", &ep("10.0.0.1", "")),
            want: vec![row("10.96.0.1:80/TCP", &[])],
        },
        Case {
            name: "unnamed single port matches the unnamed slice port",
            yaml: svc("web", "10.96.0.1", "  - {port: 80}\n") + &slice("web-a", "web", "- {port: 8080}\n", &ep("10.0.0.1", "")),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.1:8080"])],
        },
        Case {
            name: "not-ready endpoints are left out while others are ready",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice("web-a", "web", SLICE_HTTP_8080, &(ep("10.0.0.1", "ready: false, serving: true, terminating: true") + &ep("10.0.0.2", "ready: true"))),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.2:8080"])],
        },
        Case {
            name: "none ready: serving and terminating endpoints are used",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice(
                    "web-a",
                    "web",
                    SLICE_HTTP_8080,
                    &(ep("10.0.0.1", "ready: false, serving: true, terminating: true") + &ep("10.0.0.2", "ready: false, serving: false, terminating: true")),
                ),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.1:8080"])],
        },
        Case {
            name: "slices join their service only in their own namespace",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice("web-a", "web", SLICE_HTTP_8080, &ep("10.0.0.1", "")).replace("namespace: default", "namespace: other"),
            want: vec![row("10.96.0.1:80/TCP", &[])],
        },
        Case {
            name: "slices of other address families are ignored",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice("web-a", "web", SLICE_HTTP_8080, "- addresses: [fd00::1]\n").replace("IPv4", "IPv6"),
            want: vec![row("10.96.0.1:80/TCP", &[])],
        },
        Case {
            name: "headless, ExternalName and other proxies' services are not programmed",
            yaml: svc("headless", "None", HTTP)
                + "---\napiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: example.com}\n"
                + &svc("theirs", "10.96.0.9", HTTP).replace(
                    "namespace: default}",
                    "namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}",
                ),
            want: vec![],
        },
        Case {
            name: "internalTrafficPolicy Local: only this node's endpoints",
            yaml: svc("web", "10.96.0.1", HTTP).replace("  ports:", "  internalTrafficPolicy: Local\n  ports:")
                + &slice(
                    "web-a",
                    "web",
                    SLICE_HTTP_8080,
                    "- addresses: [10.0.0.1]\n  nodeName: node-a\n- addresses: [10.0.0.2]\n  nodeName: node-b\n- addresses: [10.0.0.3]\n  nodeName: node-a\n",
                ),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.1:8080", "10.0.0.3:8080"])],
        },
        Case {
            name: "internalTrafficPolicy Local, no endpoint on this node: none (traffic dropped)",
            yaml: svc("web", "10.96.0.1", HTTP).replace("  ports:", "  internalTrafficPolicy: Local\n  ports:")
                + &slice("web-a", "web", SLICE_HTTP_8080, "- addresses: [10.0.0.2]\n  nodeName: node-b\n"),
            want: vec![row("10.96.0.1:80/TCP", &[])],
        },
        Case {
            name: "topology hints: endpoints hinted for this node's zone",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice(
                    "web-a",
                    "web",
                    SLICE_HTTP_8080,
                    "- addresses: [10.0.0.1]\n  hints: {forZones: [{name: zone-a}]}\n- addresses: [10.0.0.2]\n  hints: {forZones: [{name: zone-b}]}\n",
                ),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.1:8080"])],
        },
        Case {
            name: "dual-stack service: the IPv4 cluster IP is programmed",
            yaml: svc("web", "10.96.0.1", HTTP).replace("clusterIP: 10.96.0.1", "clusterIP: 10.96.0.1\n  clusterIPs: [10.96.0.1, 'fd00::1']"),
            want: vec![row("10.96.0.1:80/TCP", &[])],
        },
    ];
    for case in cases {
        assert_eq!(table(&state(&case.yaml)), case.want, "case: {}", case.name);
    }
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_first_service_by_name() {
    let s = state(&(svc("b-web", "10.96.0.1", HTTP) + &svc("a-web", "10.96.0.1", HTTP)));
    let f = Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 1),
        port: 80,
        protocol: Protocol::Tcp,
    };
    assert_eq!(s.frontends[&f].service.name, "a-web");
    assert_eq!(s.conflicts.len(), 1);
    assert!(
        s.conflicts[0]
            .to_string()
            .contains("Service default/b-web: spec.ports[0]: 10.96.0.1:80/TCP is already served"),
        "{}",
        s.conflicts[0]
    );
}

#[test]
fn affinity_is_carried_with_kube_proxy_defaults() {
    let yaml = svc("web", "10.96.0.1", HTTP) + "  sessionAffinity: ClientIP\n";
    assert_eq!(
        state(&yaml).frontends.values().next().unwrap().affinity_timeout,
        Some(10_800)
    );
    let yaml = yaml + "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n";
    assert_eq!(
        state(&yaml).frontends.values().next().unwrap().affinity_timeout,
        Some(60)
    );
}

fn service_rejection(yaml: &str) -> Rejection {
    match &parse_documents(yaml).unwrap()[0] {
        Ok(Document::Service(s)) => ServiceInfo::from_k8s(s).expect_err("must be rejected"),
        other => panic!("not a service: {other:?}"),
    }
}

fn slice_rejection(yaml: &str) -> Rejection {
    match &parse_documents(yaml).unwrap()[0] {
        Ok(Document::EndpointSlice(s)) => EndpointSliceInfo::from_k8s(s).expect_err("must be rejected"),
        other => panic!("not a slice: {other:?}"),
    }
}

#[test]
fn invalid_objects_are_rejected_naming_the_field() {
    let cases: Vec<(Rejection, &str)> = vec![
        (
            service_rejection(&svc("web", "10.96.0.1", "  - {name: http, port: 0}\n")),
            "Service default/web: spec.ports[0].port: port 0 is out of range 1-65535",
        ),
        (
            service_rejection(&svc(
                "web",
                "10.96.0.1",
                "  - {name: a, port: 80}\n  - {name: b, port: 70000}\n",
            )),
            "Service default/web: spec.ports[1].port: port 70000 is out of range 1-65535",
        ),
        (
            service_rejection(&svc("web", "10.96.0.300", HTTP)),
            "Service default/web: spec.clusterIP: \"10.96.0.300\" is not an IP address",
        ),
        (
            service_rejection(&svc("web", "10.96.0.1", "  - {name: http, port: 80, protocol: HTTP}\n")),
            "Service default/web: spec.ports[0].protocol: unknown protocol \"HTTP\" (expected TCP, UDP or SCTP)",
        ),
        (
            service_rejection(
                &(svc("web", "10.96.0.1", HTTP)
                    + "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}\n"),
            ),
            "Service default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 90000 is out of range 1-86400",
        ),
        (
            slice_rejection(&slice(
                "web-a",
                "web",
                "- {name: http, port: 65536}\n",
                &ep("10.0.0.1", ""),
            )),
            "EndpointSlice default/web-a: ports[0].port: port 65536 is out of range 1-65535",
        ),
        (
            slice_rejection(&slice("web-a", "web", SLICE_HTTP_8080, &ep("10.0.0.256", ""))),
            "EndpointSlice default/web-a: endpoints[0].addresses[0]: \"10.0.0.256\" is not an IPv4 address",
        ),
        (
            // Only the first address is used, but every one must be valid.
            slice_rejection(&slice(
                "web-a",
                "web",
                SLICE_HTTP_8080,
                "- addresses: [10.0.0.1, 10.0.0.256]\n",
            )),
            "EndpointSlice default/web-a: endpoints[0].addresses[1]: \"10.0.0.256\" is not an IPv4 address",
        ),
        (
            service_rejection(
                &(svc("web", "10.96.0.1", HTTP)
                    + "  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/8, 192.168.1.0/33]\n"),
            ),
            "Service default/web: spec.loadBalancerSourceRanges[1]: \"192.168.1.0/33\": prefix length 33 is over 32",
        ),
        (
            service_rejection(&(svc("web", "10.96.0.1", HTTP) + "  loadBalancerSourceRanges: [everyone]\n")),
            "Service default/web: spec.loadBalancerSourceRanges[0]: \"everyone\" is not a CIDR (address/prefix)",
        ),
        (
            service_rejection(&(svc("web", "10.96.0.1", HTTP) + "  externalIPs: [203.0.113.300]\n")),
            "Service default/web: spec.externalIPs[0]: \"203.0.113.300\" is not an IP address",
        ),
        (
            service_rejection(
                &svc("web", "10.96.0.1", "  - {name: http, port: 80, nodePort: 70000}\n")
                    .replace("spec:\n", "spec:\n  type: NodePort\n"),
            ),
            "Service default/web: spec.ports[0].nodePort: port 70000 is out of range 1-65535",
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got.to_string(), want);
    }
}

#[test]
fn sctp_ports_are_skipped_and_named_while_the_others_are_programmed() {
    let yaml = svc(
        "web",
        "10.96.0.1",
        "  - {name: http, port: 80}\n  - {name: sig, port: 3868, protocol: SCTP}\n",
    ) + &slice(
        "web-a",
        "web",
        "- {name: http, port: 8080}\n- {name: sig, port: 3868, protocol: SCTP}\n",
        &ep("10.0.0.1", ""),
    );
    let (services, _) = objects(&yaml);
    assert_eq!(services[0].unsupported_ports, vec!["spec.ports[1]".to_string()]);
    assert_eq!(table(&state(&yaml)), vec![row("10.96.0.1:80/TCP", &["10.0.0.1:8080"])]);
}

#[test]
fn skipped_services_say_why() {
    let skipped = |yaml: &str| match &parse_documents(yaml).unwrap()[0] {
        Ok(Document::Service(s)) => ServiceInfo::from_k8s(s).unwrap().unwrap_err(),
        _ => unreachable!(),
    };
    assert_eq!(skipped(&svc("h", "None", HTTP)), Skipped::Headless);
    assert_eq!(skipped(&svc("v6", "fd00::1", HTTP)), Skipped::NoIpv4ClusterIp);
}

/// A Service of `type` with nodePort 30080 on port 80, its slice's
/// endpoints on node-a (10.0.0.1, 10.0.0.2) and node-b (10.0.0.3).
fn external(extra_spec: &str, status: &str) -> String {
    svc("web", "10.96.0.1", "  - {name: http, port: 80, nodePort: 30080}\n")
        .replace("spec:\n", &format!("spec:\n{extra_spec}"))
        + status
        + &slice(
            "web-a",
            "web",
            SLICE_HTTP_8080,
            "- addresses: [10.0.0.1]\n  nodeName: node-a\n- addresses: [10.0.0.2]\n  nodeName: node-a\n- addresses: [10.0.0.3]\n  nodeName: node-b\n",
        )
}

/// Frontend -> (kind, backends for inside, backends for outside).
fn external_table(state: &DesiredState) -> Vec<(String, &'static str, Vec<String>, Vec<String>)> {
    let names =
        |set: &std::collections::BTreeSet<super::BackendAddr>| set.iter().map(|b| b.to_string()).collect::<Vec<_>>();
    state
        .frontends
        .iter()
        .map(|(f, s)| {
            let outside = s.external_local.as_ref().unwrap_or(&s.backends);
            (f.to_string(), s.kind.name(), names(&s.backends), names(outside))
        })
        .collect()
}

#[test]
fn external_frontends_table() {
    let all = || {
        vec![
            "10.0.0.1:8080".to_string(),
            "10.0.0.2:8080".into(),
            "10.0.0.3:8080".into(),
        ]
    };
    let local = || vec!["10.0.0.1:8080".to_string(), "10.0.0.2:8080".into()];
    let lb_status = "status:\n  loadBalancer:\n    ingress:\n    - ip: 203.0.113.10\n    - hostname: lb.example.com\n    - ip: 203.0.113.11\n      ipMode: Proxy\n";
    struct Case {
        name: &'static str,
        yaml: String,
        want: Vec<(String, &'static str, Vec<String>, Vec<String>)>,
    }
    let cases = vec![
        Case {
            name: "ClusterIP type: the nodePort field is not served",
            yaml: external("", ""),
            want: vec![("10.96.0.1:80/TCP".into(), "ClusterIP", all(), all())],
        },
        Case {
            name: "NodePort: on each node address, cluster endpoints from everywhere",
            yaml: external("  type: NodePort\n", ""),
            want: vec![
                ("10.96.0.1:80/TCP".into(), "ClusterIP", all(), all()),
                ("192.0.2.1:30080/TCP".into(), "NodePort", all(), all()),
            ],
        },
        Case {
            name: "LoadBalancer: ingress IPs (not hostname-only, not ipMode Proxy) at the service port",
            yaml: external("  type: LoadBalancer\n", lb_status),
            want: vec![
                ("10.96.0.1:80/TCP".into(), "ClusterIP", all(), all()),
                ("192.0.2.1:30080/TCP".into(), "NodePort", all(), all()),
                ("203.0.113.10:80/TCP".into(), "LoadBalancer", all(), all()),
            ],
        },
        Case {
            name: "allocateLoadBalancerNodePorts false: no nodePort, no NodePort frontend",
            yaml: external(
                "  type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n",
                lb_status,
            )
            .replace(", nodePort: 30080", ""),
            want: vec![
                ("10.96.0.1:80/TCP".into(), "ClusterIP", all(), all()),
                ("203.0.113.10:80/TCP".into(), "LoadBalancer", all(), all()),
            ],
        },
        Case {
            name: "externalIPs on a ClusterIP service",
            yaml: external("  externalIPs: [198.51.100.7]\n", ""),
            want: vec![
                ("10.96.0.1:80/TCP".into(), "ClusterIP", all(), all()),
                ("198.51.100.7:80/TCP".into(), "externalIP", all(), all()),
            ],
        },
        Case {
            name: "externalTrafficPolicy Local: outside uses this node's endpoints, inside all of them",
            yaml: external("  type: LoadBalancer\n  externalTrafficPolicy: Local\n", lb_status),
            want: vec![
                ("10.96.0.1:80/TCP".into(), "ClusterIP", all(), all()),
                ("192.0.2.1:30080/TCP".into(), "NodePort", all(), local()),
                ("203.0.113.10:80/TCP".into(), "LoadBalancer", all(), local()),
            ],
        },
        Case {
            name: "internalTrafficPolicy Local: the ClusterIP is local, external addresses are not",
            yaml: external("  type: NodePort\n  internalTrafficPolicy: Local\n", ""),
            want: vec![
                ("10.96.0.1:80/TCP".into(), "ClusterIP", local(), local()),
                ("192.0.2.1:30080/TCP".into(), "NodePort", all(), all()),
            ],
        },
        Case {
            name: "a nodePort outside the node port range is not served",
            yaml: external("  type: NodePort\n", "").replace("nodePort: 30080", "nodePort: 8080"),
            want: vec![("10.96.0.1:80/TCP".into(), "ClusterIP", all(), all())],
        },
    ];
    for case in cases {
        assert_eq!(external_table(&state(&case.yaml)), case.want, "case: {}", case.name);
    }
}

#[test]
fn external_frontends_know_their_locality_and_source_ranges() {
    let yaml = external(
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [' 198.51.100.0/24 ', 10.1.2.3/8]\n",
        "status:\n  loadBalancer:\n    ingress:\n    - ip: 203.0.113.10\n",
    );
    let state = state(&yaml);
    let lb = state
        .frontends
        .values()
        .find(|s| s.kind == super::FrontendKind::LoadBalancer)
        .unwrap();
    let ranges: Vec<String> = lb.source_ranges.iter().map(|c| c.to_string()).collect();
    assert_eq!(ranges, ["198.51.100.0/24", "10.0.0.0/8"], "trimmed, as networks");
    let local: Vec<bool> = lb.backends.iter().map(|b| b.local).collect();
    assert_eq!(local, [true, true, false], "10.0.0.1 and .2 run on node-a");
    let node_port = state
        .frontends
        .values()
        .find(|s| s.kind == super::FrontendKind::NodePort)
        .unwrap();
    assert!(
        node_port.source_ranges.is_empty(),
        "source ranges apply to LoadBalancer IPs only"
    );
}

#[test]
fn what_a_node_cannot_serve_is_noted_once_per_field() {
    let (services, _) = objects(
        &(external(
            "  type: LoadBalancer\n",
            "status:\n  loadBalancer:\n    ingress:\n    - hostname: lb.example.com\n",
        )
        .replace("nodePort: 30080", "nodePort: 8080")),
    );
    let node = NodeTopology::default();
    assert_eq!(
        super::service_notes(&services[0], &node),
        vec![(
            "spec.ports[0].nodePort".to_string(),
            "8080 is outside the node port range 30000-32767: not served".to_string()
        )]
    );
    assert_eq!(
        services[0].unsupported_notes(),
        vec!["Service default/web: status.loadBalancer.ingress[0]: hostname \"lb.example.com\" without an ip: nothing to program (the load balancer resolves it itself)".to_string()]
    );
}

#[test]
fn health_checks_count_ready_local_endpoints() {
    let yaml = external(
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
        "",
    )
    .replace(
        "- addresses: [10.0.0.2]\n  nodeName: node-a\n",
        "- addresses: [10.0.0.2]\n  nodeName: node-a\n  conditions: {ready: false, serving: true, terminating: true}\n",
    );
    let (services, slices) = objects(&yaml);
    let slices: Vec<&EndpointSliceInfo> = slices.iter().collect();
    let on = |name: &str| NodeTopology {
        name: name.into(),
        ..Default::default()
    };
    let check = super::health_check(&services[0], &slices, &on("node-a")).unwrap();
    assert_eq!(
        (check.port, check.local_endpoints),
        (32000, 1),
        "the terminating one does not count"
    );
    assert_eq!(
        super::health_check(&services[0], &slices, &on("node-b"))
            .unwrap()
            .local_endpoints,
        1
    );
    assert_eq!(
        super::health_check(&services[0], &slices, &on("node-c"))
            .unwrap()
            .local_endpoints,
        0
    );
    let cluster = yaml.replace("  externalTrafficPolicy: Local\n", "");
    let (services, _) = objects(&cluster);
    assert!(
        super::health_check(&services[0], &slices, &on("node-a")).is_none(),
        "Cluster policy: no health check"
    );
}

/// kube-proxy's `serviceNoLocalEndpointsTotal{Internal,External}`: ports
/// whose Local policy finds no endpoint on this node while the service has
/// some elsewhere (without any, it is a REJECT and not counted).
#[test]
fn ports_without_local_endpoints_are_counted_per_policy() {
    let on = |name: &str| NodeTopology {
        name: name.into(),
        ..Default::default()
    };
    let count = |yaml: &str, node: &str| {
        let (services, slices) = objects(yaml);
        let slices: Vec<&EndpointSliceInfo> = slices.iter().collect();
        let n = super::no_local_endpoints(&services[0], &slices, &on(node));
        (n.internal, n.external)
    };
    let etp_local = external("  type: NodePort\n  externalTrafficPolicy: Local\n", "");
    let itp_local = external("  type: NodePort\n  internalTrafficPolicy: Local\n", "");
    let both = external(
        "  type: NodePort\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n",
        "",
    );
    let cases: Vec<(&str, &str, &str, (usize, usize))> = vec![
        ("eTP Local, local endpoints", &etp_local, "node-a", (0, 0)),
        ("eTP Local, endpoints only elsewhere", &etp_local, "node-c", (0, 1)),
        ("iTP Local, endpoints only elsewhere", &itp_local, "node-c", (1, 0)),
        ("both Local, endpoints only elsewhere", &both, "node-c", (1, 1)),
        ("both Local, a local endpoint", &both, "node-b", (0, 0)),
    ];
    for (name, yaml, node, want) in cases {
        assert_eq!(count(yaml, node), want, "{name}");
    }
    let cluster = external("  type: NodePort\n", "");
    assert_eq!(
        count(&cluster, "node-c"),
        (0, 0),
        "Cluster policies want no local endpoint"
    );
    let clusterip_etp = svc("web", "10.96.0.1", "  - {name: http, port: 80}\n")
        .replace("spec:\n", "spec:\n  externalTrafficPolicy: Local\n")
        + &slice(
            "web-a",
            "web",
            SLICE_HTTP_8080,
            "- addresses: [10.0.0.3]\n  nodeName: node-b\n",
        );
    assert_eq!(
        count(&clusterip_etp, "node-c"),
        (0, 0),
        "eTP only matters for a service reachable from outside"
    );
    let no_endpoints = svc("web", "10.96.0.1", "  - {name: http, port: 80, nodePort: 30080}\n")
        .replace("spec:\n", "spec:\n  type: NodePort\n  externalTrafficPolicy: Local\n");
    assert_eq!(
        count(&no_endpoints, "node-c"),
        (0, 0),
        "no endpoint anywhere is a REJECT"
    );
}

/// kube-proxy's endpointslicecache.go: what it skips is skipped, not the
/// whole slice; what it ignores is ignored, not rejected.
#[test]
fn slices_are_read_as_kube_proxy_reads_them() {
    struct Case {
        name: &'static str,
        yaml: String,
        want: Vec<(String, Vec<String>)>,
    }
    let cases = vec![
        Case {
            name: "a slice port without a number is skipped, the others serve",
            yaml: svc(
                "web",
                "10.96.0.1",
                "  - {name: http, port: 80}\n  - {name: alt, port: 81}\n",
            ) + &slice(
                "web-a",
                "web",
                "- {name: http, port: 8080}\n- {name: alt}\n- {name: alt, port: 0}\n",
                &ep("10.0.0.1", ""),
            ),
            want: vec![
                row("10.96.0.1:80/TCP", &["10.0.0.1:8080"]),
                row("10.96.0.1:81/TCP", &[]),
            ],
        },
        Case {
            name: "an endpoint without addresses is skipped, the others serve",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice(
                    "web-a",
                    "web",
                    SLICE_HTTP_8080,
                    &(String::from("- addresses: []\n") + &ep("10.0.0.2", "")),
                ),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.2:8080"])],
        },
        Case {
            name: "a slice without the service-name label belongs to no Service: ignored",
            yaml: svc("web", "10.96.0.1", HTTP)
                + &slice("web-a", "web", SLICE_HTTP_8080, &ep("10.0.0.1", ""))
                    .replace("  labels: {kubernetes.io/service-name: web}\n", ""),
            want: vec![row("10.96.0.1:80/TCP", &[])],
        },
        Case {
            name: "addresses with leading zeros are read as kube-proxy reads them",
            yaml: svc("web", "010.096.000.001", HTTP)
                + &slice("web-a", "web", SLICE_HTTP_8080, &ep("010.000.000.007", "")),
            want: vec![row("10.96.0.1:80/TCP", &["10.0.0.7:8080"])],
        },
    ];
    for case in cases {
        assert_eq!(table(&state(&case.yaml)), case.want, "case: {}", case.name);
    }
}

#[test]
fn of_two_services_claiming_a_frontend_the_one_created_first_keeps_it() {
    let created = |name: &str, at: &str| {
        svc(name, "10.96.0.1", HTTP).replace(
            &format!("metadata: {{name: {name}, namespace: default}}"),
            &format!("metadata: {{name: {name}, namespace: default, creationTimestamp: '{at}'}}"),
        )
    };
    let s = state(&(created("a-web", "2026-11-30T10:00:00Z") + &created("b-web", "2026-11-29T10:00:00Z")));
    let f = Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 1),
        port: 80,
        protocol: Protocol::Tcp,
    };
    assert_eq!(s.frontends[&f].service.name, "b-web", "created a day earlier");
    assert_eq!(
        s.conflicts[0].to_string(),
        "Service default/a-web: spec.ports[0]: 10.96.0.1:80/TCP is already served for Service default/b-web"
    );
}
