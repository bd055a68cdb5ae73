//! The external classifier (and the pod-facing one where they meet) on
//! crafted packets through BPF_PROG_TEST_RUN: NodePort and LoadBalancer
//! translations, source NAT for a backend on another node and its reverse,
//! externalTrafficPolicy Local, loadBalancerSourceRanges and hairpin. Each
//! output frame is compared byte for byte with one built from scratch.
//!
//! The programs look routes up in the caller's network namespace, so each
//! test runs its packets in a namespace with a node's routes: pods of this
//! node on `pod0`, other nodes' pods and the outside world via `ext0`.
use std::net::Ipv4Addr;

use kpr_testbed::{
    dataplane::{
        hold_nat_ports, monotonic_secs, Loaded, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS,
        XDP_REDIRECT, XDP_TX,
    },
    netns::Netns,
    packet::{self, endpoints_of, hex, icmp_error, Ipv4, ICMP_FRAGMENTATION_NEEDED, TCP_ACK, TCP_SYN},
    sh, unique_id,
};
use proxy_common::{
    Stat, FLOW_NAT_TAKEOVER_CLOSED_SECS, SEEN_RST, TC_EXTERNAL_PROGRAM, TC_HOST_PROGRAM, TC_PROGRAM, XDP_MARK_FORWARD,
    XDP_MARK_TRANSLATED, XDP_PROGRAM,
};
use proxy_user::model::{
    objects::{Cidr, ObjectName, Protocol},
    BackendAddr, DesiredState, Frontend, FrontendKind, FrontendState,
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 6);
const DENIED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 50);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

const LOCAL: BackendAddr = BackendAddr {
    ip: Ipv4Addr::new(10, 244, 0, 10),
    port: 8080,
    local: true,
    terminating: false,
};
const REMOTE: BackendAddr = BackendAddr {
    ip: Ipv4Addr::new(10, 244, 1, 10),
    port: 8080,
    local: false,
    terminating: false,
};

/// Frontends: NodePort 30090 to REMOTE only, 30091 to LOCAL only, 30081
/// both with externalTrafficPolicy Local (LOCAL for outside), 30082 REMOTE
/// under Local (none for outside); LB_IP:80 to LOCAL with a source range;
/// VIP:53/UDP to LOCAL (hairpin); EMPTY:80/TCP, EMPTY:53/UDP and
/// NODE:30093/TCP without any endpoint (refused).
fn frontends() -> DesiredState {
    let state = |kind, backends: &[BackendAddr], local: Option<&[BackendAddr]>, ranges: Vec<Cidr>| FrontendState {
        service: ObjectName {
            namespace: "default".into(),
            name: "web".into(),
        },
        kind,
        backends: backends.iter().copied().collect(),
        external_local: local.map(|l| l.iter().copied().collect()),
        affinity_timeout: None,
        source_ranges: ranges,
        reject: false,
    };
    let at = |ip, port, protocol| Frontend { ip, port, protocol };
    let mut frontends = vec![
        (
            at(LB_IP, 80, Protocol::Tcp),
            state(
                FrontendKind::LoadBalancer,
                &[LOCAL],
                None,
                vec![Cidr {
                    addr: Ipv4Addr::new(198, 51, 100, 0),
                    prefix: 24,
                }],
            ),
        ),
        (
            at(VIP, 53, Protocol::Udp),
            state(FrontendKind::ClusterIp, &[LOCAL], None, vec![]),
        ),
    ];
    for (frontend, kind) in [
        (at(EMPTY, 80, Protocol::Tcp), FrontendKind::ClusterIp),
        (at(EMPTY, 53, Protocol::Udp), FrontendKind::ClusterIp),
        (at(NODE, 30093, Protocol::Tcp), FrontendKind::NodePort),
    ] {
        let mut refused = state(kind, &[], None, vec![]);
        refused.reject = true;
        frontends.push((frontend, refused));
    }
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        frontends.extend([
            (
                at(NODE, 30090, protocol),
                state(FrontendKind::NodePort, &[REMOTE], None, vec![]),
            ),
            (
                at(NODE, 30091, protocol),
                state(FrontendKind::NodePort, &[LOCAL], None, vec![]),
            ),
            (
                at(NODE, 30081, protocol),
                state(FrontendKind::NodePort, &[LOCAL, REMOTE], Some(&[LOCAL]), vec![]),
            ),
            (
                at(NODE, 30082, protocol),
                state(FrontendKind::NodePort, &[REMOTE], Some(&[]), vec![]),
            ),
        ]);
    }
    DesiredState {
        frontends: frontends.into_iter().collect(),
        conflicts: vec![],
    }
}

/// A node's routes: its pods on pod0, everything else through ext0.
fn node_netns() -> Netns {
    let ns = Netns::new(&format!("{}-fib", unique_id())).unwrap();
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    for (a, b) in [("ext0", "ext1"), ("pod0", "pod1")] {
        sh(
            "ip",
            &["-n", &ns.name, "link", "add", a, "type", "veth", "peer", "name", b],
        )
        .unwrap();
        ns.ip(&["link", "set", a, "up"]).unwrap();
        ns.ip(&["link", "set", b, "up"]).unwrap();
    }
    ns.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "ext0"]).unwrap();
    ns.ip(&["route", "add", "10.244.0.0/24", "dev", "pod0"]).unwrap();
    ns.ip(&["route", "add", "10.244.1.0/24", "via", "192.0.2.11", "dev", "ext0"])
        .unwrap();
    ns.ip(&["route", "add", "default", "via", "192.0.2.1", "dev", "ext0"])
        .unwrap();
    ns
}

struct Node {
    dp: Loaded,
    ns: Netns,
}

impl Node {
    fn new() -> Self {
        let mut dp = Loaded::new().expect("load the programs");
        dp.program(&frontends()).unwrap();
        dp.set_snat_addr(NODE).unwrap();
        Node { dp, ns: node_netns() }
    }

    /// (verdict, output frame) of `program` on `input`, run in the node's namespace.
    fn run(&self, program: &str, input: &Ipv4) -> (i32, Vec<u8>) {
        let frame = input.frame();
        let out = self
            .ns
            .run(|| self.dp.run_program(program, &frame, 1))
            .unwrap()
            .unwrap();
        (out.verdict, out.frame)
    }

    fn expect(&self, program: &str, name: &str, input: &Ipv4, verdict: i32, output: &Ipv4, stat: Stat) {
        self.expect_frame(program, name, input, verdict, &output.frame(), stat);
    }

    fn expect_frame(&self, program: &str, name: &str, input: &Ipv4, verdict: i32, output: &[u8], stat: Stat) {
        let input = input.frame();
        self.ns
            .run(|| self.dp.expect_from(program, name, &input, verdict, output, stat))
            .unwrap();
    }

    fn expect_outside(&self, name: &str, input: &Ipv4, verdict: i32, output: &Ipv4, stat: Stat) {
        self.expect(TC_EXTERNAL_PROGRAM, name, input, verdict, output, stat);
    }
}

fn request(protocol: Protocol, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Ipv4 {
    match protocol {
        Protocol::Tcp => packet::tcp(src, dst, flags),
        Protocol::Udp => packet::udp(src, dst),
    }
}

fn nat_port(frame: &[u8]) -> u16 {
    let ((src, port), _) = endpoints_of(frame);
    assert_eq!(src, NODE, "source-NATed to the node's address");
    assert!(
        proxy_common::is_nat_port(port),
        "NAT port {port} outside the documented range"
    );
    port
}

#[test]
fn a_remote_backend_is_reached_from_the_node_and_answers_through_it() {
    let node = Node::new();
    let remote = (REMOTE.ip, REMOTE.port);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let first = request(protocol, (CLIENT, 40000), (NODE, 30090), TCP_SYN);
        let (verdict, out) = node.run(TC_EXTERNAL_PROGRAM, &first);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{protocol}: sent out by the FIB");
        let port = nat_port(&out);
        let expected = first.clone().with_src((NODE, port)).with_dst(remote).frame();
        assert_eq!(
            hex(&out),
            hex(&expected),
            "{protocol}: first packet, both ends translated"
        );

        let later = request(protocol, (CLIENT, 40000), (NODE, 30090), TCP_ACK);
        let translated = later.clone().with_src((NODE, port)).with_dst(remote);
        node.expect_outside("later packet", &later, TC_ACT_REDIRECT, &translated, Stat::Established);

        let reply = request(protocol, remote, (NODE, port), TCP_SYN | TCP_ACK);
        let restored = reply.clone().with_src((NODE, 30090)).with_dst((CLIENT, 40000));
        node.expect_outside("reply", &reply, TC_ACT_REDIRECT, &restored, Stat::Reply);

        // Another client with the same source port at the same time gets its own NAT port.
        let other = request(protocol, (OTHER_CLIENT, 40000), (NODE, 30090), TCP_SYN);
        let (_, out) = node.run(TC_EXTERNAL_PROGRAM, &other);
        let other_port = nat_port(&out);
        assert_ne!(other_port, port, "{protocol}: two flows share a NAT port");
        let reply = request(protocol, remote, (NODE, other_port), TCP_ACK);
        let restored = reply.clone().with_src((NODE, 30090)).with_dst((OTHER_CLIENT, 40000));
        node.expect_outside(
            "the other client's reply",
            &reply,
            TC_ACT_REDIRECT,
            &restored,
            Stat::Reply,
        );
    }
}

#[test]
fn a_local_backend_sees_the_client_and_its_reply_leaves_by_the_fib() {
    let node = Node::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let first = request(protocol, (CLIENT, 40001), (NODE, 30091), TCP_SYN);
        let translated = first.clone().with_dst((LOCAL.ip, LOCAL.port));
        node.expect_outside("request", &first, TC_ACT_UNSPEC, &translated, Stat::NewFlow);
        // The reply arrives from the pod with the node's address to restore:
        // the stack would drop it as martian, so the FIB sends it.
        let reply = request(protocol, (LOCAL.ip, LOCAL.port), (CLIENT, 40001), TCP_SYN | TCP_ACK);
        let restored = reply.clone().with_src((NODE, 30091));
        node.expect(TC_PROGRAM, "reply", &reply, TC_ACT_REDIRECT, &restored, Stat::Reply);
    }
}

#[test]
fn external_traffic_policy_local_keeps_outside_traffic_on_this_node() {
    let node = Node::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for sport in 41000..41004 {
            let from_outside = request(protocol, (CLIENT, sport), (NODE, 30081), TCP_SYN);
            let translated = from_outside.clone().with_dst((LOCAL.ip, LOCAL.port));
            node.expect_outside(
                "outside, Local",
                &from_outside,
                TC_ACT_UNSPEC,
                &translated,
                Stat::NewFlow,
            );
        }
        // From a pod: every endpoint of the cluster (kube-proxy's short-circuit).
        let chosen: std::collections::BTreeSet<Ipv4Addr> = (42000..42004)
            .map(|sport| {
                let (verdict, out) = node.run(
                    TC_PROGRAM,
                    &request(protocol, (POD_CLIENT, sport), (NODE, 30081), TCP_SYN),
                );
                assert_eq!(verdict, TC_ACT_UNSPEC);
                endpoints_of(&out).1 .0
            })
            .collect();
        assert_eq!(
            chosen,
            [LOCAL.ip, REMOTE.ip].into(),
            "{protocol}: pods use cluster endpoints"
        );

        let none_here = request(protocol, (CLIENT, 43000), (NODE, 30082), TCP_SYN);
        node.expect_outside(
            "outside, Local, none on this node",
            &none_here,
            TC_ACT_SHOT,
            &none_here,
            Stat::NoLocalBackend,
        );
        let from_pod = request(protocol, (POD_CLIENT, 43000), (NODE, 30082), TCP_SYN);
        let translated = from_pod.clone().with_dst((REMOTE.ip, REMOTE.port));
        node.expect(
            TC_PROGRAM,
            "pod, Local, none on this node",
            &from_pod,
            TC_ACT_UNSPEC,
            &translated,
            Stat::NewFlow,
        );
    }
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients_from_outside() {
    let node = Node::new();
    let allowed = packet::tcp((CLIENT, 44000), (LB_IP, 80), TCP_SYN);
    let translated = allowed.clone().with_dst((LOCAL.ip, LOCAL.port));
    node.expect_outside("inside the range", &allowed, TC_ACT_UNSPEC, &translated, Stat::NewFlow);
    let denied = packet::tcp((DENIED, 44000), (LB_IP, 80), TCP_SYN);
    node.expect_outside("outside the range", &denied, TC_ACT_SHOT, &denied, Stat::SourceDenied);
    let pod = packet::tcp((POD_CLIENT, 44000), (LB_IP, 80), TCP_SYN);
    let translated = pod.clone().with_dst((LOCAL.ip, LOCAL.port));
    node.expect(
        TC_PROGRAM,
        "from a pod",
        &pod,
        TC_ACT_UNSPEC,
        &translated,
        Stat::NewFlow,
    );
}

#[test]
fn a_pod_reaching_itself_through_its_service_gets_its_answers() {
    let node = Node::new();
    let query = packet::udp((LOCAL.ip, 5000), (VIP, 53));
    let (verdict, out) = node.run(TC_PROGRAM, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT, "hairpin: sent back to the pod by the FIB");
    let port = nat_port(&out);
    let expected = query
        .clone()
        .with_src((NODE, port))
        .with_dst((LOCAL.ip, LOCAL.port))
        .frame();
    assert_eq!(hex(&out), hex(&expected), "the pod sees the node as its peer");
    let answer = packet::udp((LOCAL.ip, LOCAL.port), (NODE, port));
    let restored = answer.clone().with_src((VIP, 53)).with_dst((LOCAL.ip, 5000));
    node.expect(TC_PROGRAM, "answer", &answer, TC_ACT_REDIRECT, &restored, Stat::Reply);
}

/// Every NAT port towards REMOTE held by another flow.
fn hold_every_nat_port(node: &Node, last_seen: u32, seen: u8) {
    hold_nat_ports(&node.dp.pin_dir, (REMOTE.ip, REMOTE.port), NODE, last_seen, seen, true).unwrap();
}

#[test]
fn running_out_of_nat_ports_is_counted_and_dropped() {
    let node = Node::new();
    hold_every_nat_port(&node, monotonic_secs(), 0);
    let syn = packet::tcp((CLIENT, 45000), (NODE, 30090), TCP_SYN);
    node.expect_outside("no NAT port left", &syn, TC_ACT_SHOT, &syn, Stat::NatExhausted);
}

/// A flow's NAT port is the first of its search, which starts where its
/// source port maps (`nat_port_search_start`), on TC and on XDP: a reused
/// client tuple gets its port back, so the backend's TIME_WAIT tuple goes
/// to the connection that left it.
#[test]
fn a_new_flows_nat_port_is_where_its_source_port_maps() {
    let start = |client_port: u16| {
        proxy_common::nat_port_search_start(
            proxy_common::addr_to_map(CLIENT),
            client_port.to_be(),
            proxy_common::addr_to_map(NODE),
            30090u16.to_be(),
        )
    };
    for (program, client_port) in [(TC_EXTERNAL_PROGRAM, 41000), (XDP_PROGRAM, 41001)] {
        let node = Node::new();
        let syn = packet::tcp((CLIENT, client_port), (NODE, 30090), TCP_SYN);
        let out = if program == XDP_PROGRAM {
            let (_, out, by_xdp) = node.through_xdp_then_tc(&syn);
            assert!(by_xdp, "XDP translates a new flow to a remote backend itself");
            out
        } else {
            node.run(program, &syn).1
        };
        let port = proxy_common::nat_port_try(start(client_port), 0);
        let expected = syn.clone().with_src((NODE, port)).with_dst((REMOTE.ip, REMOTE.port));
        // XDP forwards the frame with its addresses rewritten; only the
        // network and transport headers are compared.
        assert_eq!(
            hex(&out[14..]),
            hex(&expected.frame()[14..]),
            "{program}: source-NATed to the port the client's source port maps to"
        );
    }
}

#[test]
fn the_nat_port_of_a_flow_that_ended_is_taken_over() {
    let node = Node::new();
    // Reset, and quiet for longer than the takeover's grace period (though
    // not yet swept).
    hold_every_nat_port(&node, monotonic_secs() - FLOW_NAT_TAKEOVER_CLOSED_SECS, SEEN_RST);
    let syn = packet::tcp((CLIENT, 45000), (NODE, 30090), TCP_SYN);
    let (verdict, out) = node.run(TC_EXTERNAL_PROGRAM, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let port = nat_port(&out);
    let reply = packet::tcp((REMOTE.ip, REMOTE.port), (NODE, port), TCP_SYN | TCP_ACK);
    let restored = reply.clone().with_src((NODE, 30090)).with_dst((CLIENT, 45000));
    node.expect_outside(
        "reply through the taken-over port",
        &reply,
        TC_ACT_REDIRECT,
        &restored,
        Stat::Reply,
    );

    // Closed just now: still in its grace period, the ports stay taken.
    let node = Node::new();
    hold_every_nat_port(&node, monotonic_secs(), SEEN_RST);
    node.expect_outside("closed a moment ago", &syn, TC_ACT_SHOT, &syn, Stat::NatExhausted);

    // Flows that are not source-NATed (the node's own, from ports in the
    // range) keep no times to judge by: never taken over.
    let node = Node::new();
    hold_nat_ports(&node.dp.pin_dir, (REMOTE.ip, REMOTE.port), NODE, 0, SEEN_RST, false).unwrap();
    node.expect_outside("the node's own flows", &syn, TC_ACT_SHOT, &syn, Stat::NatExhausted);
}

#[test]
fn the_nodes_own_requests_are_translated_at_egress_and_routed_again() {
    let node = Node::new();
    // To a ClusterIP: translated where it leaves, then sent by the FIB
    // towards the backend instead of where the service address is routed.
    let query = packet::udp((NODE, 5353), (VIP, 53));
    let translated = query.clone().with_dst((LOCAL.ip, LOCAL.port));
    node.expect(
        TC_HOST_PROGRAM,
        "request",
        &query,
        TC_ACT_REDIRECT,
        &translated,
        Stat::NewFlow,
    );
    // The reply goes up the stack to the node's socket: its source is the
    // service address, which is not the node's.
    let answer = packet::udp((LOCAL.ip, LOCAL.port), (NODE, 5353));
    let restored = answer.clone().with_src((VIP, 53));
    node.expect(TC_PROGRAM, "reply", &answer, TC_ACT_UNSPEC, &restored, Stat::Reply);

    // To one of its own NodePorts (through lo): the reply has the node's
    // address at both ends, so it goes back in through lo, addressed to
    // lo's MAC (all zeros).
    let request = packet::udp((NODE, 5354), (NODE, 30091));
    let translated = request.clone().with_dst((LOCAL.ip, LOCAL.port));
    node.expect(
        TC_HOST_PROGRAM,
        "to its NodePort",
        &request,
        TC_ACT_REDIRECT,
        &translated,
        Stat::NewFlow,
    );
    let answer = packet::udp((LOCAL.ip, LOCAL.port), (NODE, 5354));
    let mut restored = answer.clone().with_src((NODE, 30091)).frame();
    restored[..6].fill(0);
    let before = node.dp.stats().unwrap();
    let (verdict, out) = node.run(TC_PROGRAM, &answer);
    assert_eq!(
        (verdict, hex(&out)),
        (TC_ACT_REDIRECT, hex(&restored)),
        "back in through lo"
    );
    assert_ne!(before, node.dp.stats().unwrap());
}

#[test]
fn a_service_without_any_endpoint_answers_port_unreachable() {
    let node = Node::new();
    let cases = [
        (TC_PROGRAM, packet::tcp((POD_CLIENT, 47000), (EMPTY, 80), TCP_SYN)),
        (TC_PROGRAM, packet::udp((POD_CLIENT, 47001), (EMPTY, 53))),
        (
            TC_EXTERNAL_PROGRAM,
            packet::tcp((CLIENT, 47002), (NODE, 30093), TCP_SYN),
        ),
    ];
    for (program, request) in cases {
        // Back out of the interface it came in by.
        let answer = packet::port_unreachable(&request);
        node.expect_frame(program, program, &request, TC_ACT_REDIRECT, &answer, Stat::Rejected);
    }
    // The node's own: into the node through lo, addressed to lo's MAC.
    let request = packet::udp((NODE, 47003), (EMPTY, 53));
    let mut answer = packet::port_unreachable(&request);
    answer[..12].fill(0);
    node.expect_frame(
        TC_HOST_PROGRAM,
        "the node's own",
        &request,
        TC_ACT_REDIRECT,
        &answer,
        Stat::Rejected,
    );
}

/// A router between this node and a remote backend cannot forward a
/// source-NATed packet whole: its fragmentation needed comes to the node
/// about the packet as the node sent it, and goes on to the client about
/// the packet as the client sent it (path-MTU discovery keeps working
/// through the NodePort), sent out by the FIB like the flow's replies.
#[test]
fn a_routers_fragmentation_needed_reaches_a_source_nated_client() {
    let node = Node::new();
    let router = Ipv4Addr::new(192, 0, 2, 1);
    let syn = packet::tcp((CLIENT, 40100), (NODE, 30090), TCP_SYN);
    let (_, out) = node.run(TC_EXTERNAL_PROGRAM, &syn);
    let port = nat_port(&out);
    let sent = syn.clone().with_src((NODE, port)).with_dst((REMOTE.ip, REMOTE.port));
    let error = icmp_error(router, NODE, ICMP_FRAGMENTATION_NEEDED, 1400, &sent, 576);
    let restored = icmp_error(router, CLIENT, ICMP_FRAGMENTATION_NEEDED, 1400, &syn, 576);
    node.expect_outside(
        "fragmentation needed",
        &error,
        TC_ACT_REDIRECT,
        &restored,
        Stat::IcmpError,
    );
}

/// What a frame came to after the programs on a node's external interface.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// On into the stack (or on through the hook).
    Passed,
    /// Sent out again: forwarded, or answered.
    SentOut,
    Dropped,
}

fn tc_outcome(verdict: i32) -> Outcome {
    match verdict {
        TC_ACT_UNSPEC => Outcome::Passed,
        TC_ACT_REDIRECT => Outcome::SentOut,
        TC_ACT_SHOT => Outcome::Dropped,
        other => panic!("unexpected TC verdict {other}"),
    }
}

impl Node {
    /// The frame through the XDP program and then, as on the interface, the
    /// TC program: a frame XDP marked translated is passed by TC as it is
    /// (one marked to forward, sent out by the FIB); an unmarked one is
    /// processed by TC. The flag: whether XDP finished with the frame.
    fn through_xdp_then_tc(&self, input: &Ipv4) -> (Outcome, Vec<u8>, bool) {
        let frame = input.frame();
        let out = self.ns.run(|| self.dp.run_xdp(XDP_PROGRAM, &frame)).unwrap().unwrap();
        match out.action {
            XDP_DROP => (Outcome::Dropped, frame, true),
            XDP_TX | XDP_REDIRECT => (Outcome::SentOut, out.frame, true),
            XDP_PASS => {
                let (mark, passed) = if out.frame.len() == frame.len() + 4 {
                    let mark = u32::from_ne_bytes(out.frame[..4].try_into().unwrap());
                    (mark, out.frame[4..].to_vec())
                } else {
                    (0, out.frame)
                };
                match mark {
                    XDP_MARK_TRANSLATED => (Outcome::Passed, passed, true),
                    XDP_MARK_FORWARD => (Outcome::SentOut, passed, true),
                    0 => {
                        assert_eq!(passed, frame, "XDP passes an unmarked frame untouched");
                        let tc = self.ns.run(|| self.dp.run_program(TC_EXTERNAL_PROGRAM, &passed, 1));
                        let tc = tc.unwrap().unwrap();
                        (tc_outcome(tc.verdict), tc.frame, false)
                    }
                    other => panic!("unknown XDP mark {other:#x}"),
                }
            }
            other => panic!("unexpected XDP action {other}"),
        }
    }

    fn through_tc(&self, input: &Ipv4) -> (Outcome, Vec<u8>) {
        let (verdict, frame) = self.run(TC_EXTERNAL_PROGRAM, input);
        (tc_outcome(verdict), frame)
    }
}

/// The same corpus through XDP-then-TC on one node and through TC alone on
/// another programmed alike: every frame ends the same way, byte for byte,
/// and the nodes count the same verdicts. Covers new flows and later
/// packets to local and remote (source-NATed) backends, TCP and UDP,
/// replies both ways, externalTrafficPolicy Local with and without a local
/// endpoint, an allowed and a denied source, REJECT, a TCP packet of no
/// flow, an ICMP error, a later fragment, and frames XDP must leave alone.
#[test]
fn xdp_then_tc_ends_every_frame_as_tc_alone_does() {
    let (with_xdp, tc_only) = (Node::new(), Node::new());
    let remote = (REMOTE.ip, REMOTE.port);
    let local = (LOCAL.ip, LOCAL.port);
    let mut corpus: Vec<(String, Ipv4)> = Vec::new();
    let mut add = |name: &str, p: Ipv4| corpus.push((name.to_string(), p));
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let to = |port| (NODE, port);
        for (port, backend, nated) in [(30090, remote, true), (30091, local, false), (30081, local, false)] {
            let c = (CLIENT, 41000 + port % 100);
            add(
                &format!("{protocol} {port} first"),
                request(protocol, c, to(port), TCP_SYN),
            );
            add(
                &format!("{protocol} {port} later"),
                request(protocol, c, to(port), TCP_ACK),
            );
            // The reply as it arrives: to the NAT port the differential run
            // picks (the same on both nodes: a hash of the client's tuple),
            // found by running the first packet through TC on a scratch node.
            let reply_to = if nated {
                let scratch = Node::new();
                let (_, out) = scratch.run(TC_EXTERNAL_PROGRAM, &request(protocol, c, to(port), TCP_SYN));
                endpoints_of(&out).0
            } else {
                c
            };
            add(
                &format!("{protocol} {port} reply"),
                request(protocol, backend, reply_to, TCP_SYN | TCP_ACK),
            );
        }
        add(
            &format!("{protocol} Local without a local endpoint"),
            request(protocol, (CLIENT, 41100), to(30082), TCP_SYN),
        );
    }
    add("allowed source", packet::tcp((CLIENT, 41200), (LB_IP, 80), TCP_SYN));
    add("denied source", packet::tcp((DENIED, 41201), (LB_IP, 80), TCP_SYN));
    add(
        "no endpoint: REJECT",
        packet::tcp((CLIENT, 41202), (NODE, 30093), TCP_SYN),
    );
    add("TCP of no flow", packet::tcp((CLIENT, 41203), (NODE, 30091), TCP_ACK));
    add(
        "ICMP error about a flow",
        icmp_error(
            Ipv4Addr::new(192, 0, 2, 1),
            NODE,
            ICMP_FRAGMENTATION_NEEDED,
            1400,
            &packet::tcp((NODE, 61000), remote, TCP_SYN),
            28,
        ),
    );
    let mut later = packet::udp((CLIENT, 41300), (NODE, 30091));
    later.frag = 185;
    add("a trailing fragment", later);
    add("to no service", packet::tcp((CLIENT, 41301), (NODE, 22), TCP_SYN));

    // XDP finishes requests of flows from outside, and their drops; the
    // rest is TC's.
    let xdp_finishes = |name: &str| {
        ["first", "later", "Local without", "allowed", "denied", "of no flow"]
            .iter()
            .any(|part| name.contains(part))
    };
    for (name, input) in &corpus {
        let (xdp_outcome, xdp_frame, finished) = with_xdp.through_xdp_then_tc(input);
        let (tc_outcome, tc_frame) = tc_only.through_tc(input);
        assert_eq!(xdp_outcome, tc_outcome, "{name}: outcome");
        assert_eq!(hex(&xdp_frame), hex(&tc_frame), "{name}: frame");
        assert_eq!(finished, xdp_finishes(name), "{name}: finished by XDP");
    }
    assert_eq!(
        with_xdp.dp.stats().unwrap(),
        tc_only.dp.stats().unwrap(),
        "both nodes counted the same verdicts"
    );
}

/// A fragmented datagram from outside to a backend on another node: the
/// first fragment is source-NATed and sent out by the FIB; the later one
/// follows it, both addresses translated, sent out the same way.
#[test]
fn fragments_of_a_source_nated_datagram_follow_the_first() {
    let node = Node::new();
    let mut query = packet::udp((CLIENT, 40200), (NODE, 30090));
    if let packet::L4::Udp { payload, .. } = &mut query.l4 {
        *payload = vec![5; 64];
    }
    let [first, later] = query.fragmented(16);
    let (verdict, out) = node.run(TC_EXTERNAL_PROGRAM, &first);
    assert_eq!(verdict, TC_ACT_REDIRECT, "the first fragment: sent out by the FIB");
    let port = nat_port(&out);
    let sent = query.clone().with_src((NODE, port)).with_dst((REMOTE.ip, REMOTE.port));
    let [first_sent, later_sent] = sent.fragmented(16);
    assert_eq!(hex(&out), hex(&first_sent.frame()), "the first fragment");
    node.expect_outside(
        "the later fragment",
        &later,
        TC_ACT_REDIRECT,
        &later_sent,
        Stat::Established,
    );
}

/// The test bed's LAN switch (`kpr_xdp_wire`, never attached by the
/// daemon): a frame to a member's address goes to that member's port
/// untouched; one to a member without a port, or to any other address
/// (broadcast, say), goes on to the bridge.
#[test]
fn the_test_beds_lan_switch_sends_a_members_frames_to_its_port_and_the_rest_to_the_bridge() {
    let ns = Netns::new(&format!("{}-wire", unique_id())).unwrap();
    let mut dp = Loaded::new().unwrap();
    dp.load_extra_xdp(proxy_common::XDP_WIRE_PROGRAM).unwrap();
    let mut ports: aya::maps::DevMap<_> = dp
        .ebpf
        .map_mut(proxy_common::WIRE_PORTS_MAP)
        .unwrap()
        .try_into()
        .unwrap();
    // Member 1's port: the namespace's `lo` (index 1 in every namespace).
    ns.run(|| ports.set(1, 1, None, 0)).unwrap().unwrap();
    let payload = request(Protocol::Udp, (CLIENT, 40000), (NODE, 30090), 0).frame()[14..].to_vec();
    let to = |mac: [u8; 6]| {
        let mut frame = packet::ethernet(0x0800, &payload);
        frame[..6].copy_from_slice(&mac);
        frame
    };
    let [a, b, c, d, e] = proxy_common::WIRE_MAC_PREFIX;
    for (what, frame, action) in [
        ("member 1", to([a, b, c, d, e, 1]), XDP_REDIRECT),
        ("member 2, no port", to([a, b, c, d, e, 2]), XDP_PASS),
        ("broadcast", to([0xff; 6]), XDP_PASS),
        ("another address", to([0x02, 0, 0, 0, 0, 1]), XDP_PASS),
    ] {
        let out = ns
            .run(|| dp.run_xdp(proxy_common::XDP_WIRE_PROGRAM, &frame))
            .unwrap()
            .unwrap();
        assert_eq!(out.action, action, "{what}");
        assert_eq!(hex(&out.frame), hex(&frame), "{what}: the frame is left as it is");
    }
}
