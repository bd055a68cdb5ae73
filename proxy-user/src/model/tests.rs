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
            Document::Other(_) => {}
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
        (service_rejection(&svc("web", "10.96.0.1", "  - {name: http, port: 0}\n")), "Service default/web: spec.ports[0].port: port 0 is out of range 1-65535"),
        (
            service_rejection(&svc("web", "10.96.0.1", "  - {name: a, port: 80}\n  - {name: b, port: 70000}\n")),
            "Service default/web: spec.ports[1].port: port 70000 is out of range 1-65535",
        ),
        (service_rejection(&svc("web", "10.96.0.300", HTTP)), "Service default/web: spec.clusterIP: \"10.96.0.300\" is not an IP address"),
        (
            service_rejection(&svc("web", "10.96.0.1", "  - {name: http, port: 80, protocol: HTTP}\n")),
            "Service default/web: spec.ports[0].protocol: unknown protocol \"HTTP\" (expected TCP, UDP or SCTP)",
        ),
        (
            service_rejection(&(svc("web", "10.96.0.1", HTTP) + "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}\n")),
            "Service default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 90000 is out of range 1-86400",
        ),
        (
            slice_rejection(&slice("web-a", "web", "- {name: http, port: 65536}\n", &ep("10.0.0.1", ""))),
            "EndpointSlice default/web-a: ports[0].port: port 65536 is out of range 1-65535",
        ),
        (
            slice_rejection(&slice("web-a", "web", SLICE_HTTP_8080, &ep("10.0.0.256", ""))),
            "EndpointSlice default/web-a: endpoints[0].addresses[0]: \"10.0.0.256\" is not an IPv4 address",
        ),
        (
            slice_rejection(&slice("web-a", "web", SLICE_HTTP_8080, &ep("10.0.0.1", "")).replace("  labels: {kubernetes.io/service-name: web}\n", "")),
            "EndpointSlice default/web-a: metadata.labels[\"kubernetes.io/service-name\"]: the label naming the slice's Service is missing",
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
