//! Traffic from outside the node on a two-node namespace cluster: NodePort,
//! LoadBalancer IPs and external IPs, externalTrafficPolicy Cluster (source
//! NAT to the node for a backend on the other node) and Local (client
//! address kept, health checks), loadBalancerSourceRanges, and the same
//! frontends from pods and from the node itself. Asserted on what real
//! clients receive and what address each backend saw.
//!
//! node0 runs web-0 and a client pod; node1 runs web-1 and web-2.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use kpr_testbed::{
    cluster::{node_ip, OUTSIDE_IP, POD_PORT},
    dataplane::{hold_nat_ports, monotonic_secs},
    manifests::{exposed_service_with_endpoints, tcp, udp, web, Endpoint, Exposure},
    netns::Netns,
    pod::{connect, http_get, Datagrams, Reply},
    Cluster, ClusterSpec,
};
use proxy_common::{FLOW_NAT_TAKEOVER_CLOSED_SECS, IPPROTO_TCP, IPPROTO_UDP};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const HTTP_NODE_PORT: u16 = 30080;
const DNS_NODE_PORT: u16 = 30053;
const HEALTH_PORT: u16 = 32100;

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn two_nodes() -> Cluster {
    let mut spec = ClusterSpec::pods("web", 1).with_node(&["web-1", "web-2"]);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).expect("cluster");
    cluster.route_from_outside(LB_IP, 1).unwrap();
    cluster.route_from_outside(EXTERNAL_IP, 0).unwrap();
    cluster
}

/// `web` as a LoadBalancer (LB_IP in its status, EXTERNAL_IP as an external
/// IP) with http 80/TCP and dns 53/UDP, over the `ready` web pods; waits
/// until both nodes programmed its NodePorts.
fn expose(cluster: &Cluster, exposure: Exposure, ready: &[&str]) {
    let endpoints: Vec<Endpoint> = ["web-0", "web-1", "web-2"]
        .iter()
        .map(|name| {
            let pod = cluster.pod(name);
            let endpoint = Endpoint::ready(pod.ip).on(&format!("node{}", pod.node));
            if ready.contains(name) {
                endpoint
            } else {
                endpoint.not_ready()
            }
        })
        .collect();
    let exposure = Exposure {
        type_: Some("LoadBalancer"),
        node_ports: &[HTTP_NODE_PORT, DNS_NODE_PORT],
        external_ips: &[EXTERNAL_IP],
        ingress_ips: &[LB_IP],
        ..exposure
    };
    let yaml = web(VIP, &exposure, &endpoints);
    cluster.write_manifest("web.yaml", &yaml).unwrap();
    for node in 0..2 {
        // Inside the cluster a NodePort uses every ready endpoint.
        let want: Vec<SocketAddr> = ready.iter().map(|p| at(cluster.pod(p).ip, POD_PORT)).collect();
        let frontend = at(node_ip(node), HTTP_NODE_PORT);
        cluster
            .wait_for_backends_on(node, frontend, IPPROTO_TCP, &want)
            .unwrap();
        cluster
            .wait_for_backends_on(node, at(node_ip(node), DNS_NODE_PORT), IPPROTO_UDP, &want)
            .unwrap();
    }
}

/// `n` TCP connections and `n` UDP flows from `ns` to `to_tcp` / `to_udp`:
/// every answer. Sockets stay open until the end, so that no source port is
/// reused: a UDP flow on a tuple seen before is the same flow (netfilter's
/// meaning), which keeps its backend and would skew the rotation.
fn requests(ns: &Netns, to_tcp: SocketAddr, to_udp: SocketAddr, n: usize) -> Vec<Reply> {
    let mut connections = Vec::new();
    let mut sockets = Vec::new();
    let mut replies = Vec::new();
    for _ in 0..n {
        let mut conn = connect(ns, to_tcp).unwrap();
        replies.push(conn.request().unwrap());
        connections.push(conn);
    }
    for _ in 0..n {
        let socket = Datagrams::open(ns).unwrap();
        // `request` checks the answer comes from the address dialled.
        replies.push(socket.request(to_udp).unwrap());
        sockets.push(socket);
    }
    replies
}

fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in replies {
        *counts.entry(r.pod.clone()).or_default() += 1;
    }
    counts
}

fn spread(pods: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pods.iter().map(|(p, n)| (p.to_string(), *n)).collect()
}

/// `n` TCP connections and `n` UDP flows from outside to each node's
/// NodePorts: spread evenly over the three pods, and each backend sees the
/// client if it runs on the receiving node, that node otherwise.
fn assert_node_ports_spread(cluster: &Cluster, n: usize, label: &str) {
    let each = 2 * n / 3;
    for node in 0..2 {
        let replies = requests(
            cluster.outside(),
            at(node_ip(node), HTTP_NODE_PORT),
            at(node_ip(node), DNS_NODE_PORT),
            n,
        );
        assert_eq!(
            tally(&replies),
            spread(&[("web-0", each), ("web-1", each), ("web-2", each)]),
            "{label}through node{node}"
        );
        for reply in &replies {
            let on_this_node = cluster.pod(&reply.pod).node == node;
            // kube-proxy would masquerade all of them; a backend on the
            // receiving node sees the client itself.
            let want = if on_this_node { OUTSIDE_IP } else { node_ip(node) };
            assert_eq!(
                reply.peer.ip(),
                IpAddr::V4(want),
                "{label}{} through node{node} saw the wrong source",
                reply.pod
            );
        }
    }
}

#[test]
fn node_ports_spread_over_every_pod_and_remote_backends_see_the_node() {
    let cluster = two_nodes();
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    assert_node_ports_spread(&cluster, 30, "");
}

#[test]
fn load_balancer_and_external_ips_answer_from_the_address_dialled() {
    let cluster = two_nodes();
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    for ip in [LB_IP, EXTERNAL_IP] {
        let replies = requests(cluster.outside(), at(ip, 80), at(ip, 53), 6);
        assert_eq!(
            tally(&replies),
            spread(&[("web-0", 4), ("web-1", 4), ("web-2", 4)]),
            "{ip}"
        );
    }
    // A long-lived connection through the source NAT keeps working.
    let mut conn = connect(cluster.outside(), at(LB_IP, 80)).unwrap();
    let first = conn.request().unwrap();
    for _ in 0..5 {
        assert_eq!(conn.request().unwrap(), first);
    }
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_reports_health() {
    let cluster = two_nodes();
    let local = || Exposure {
        local: true,
        health_check_node_port: Some(HEALTH_PORT),
        ..Exposure::default()
    };
    expose(&cluster, local(), &["web-0", "web-1", "web-2"]);
    let through = |node: usize, n| {
        requests(
            cluster.outside(),
            at(node_ip(node), HTTP_NODE_PORT),
            at(node_ip(node), DNS_NODE_PORT),
            n,
        )
    };
    let replies = through(0, 4);
    assert_eq!(tally(&replies), spread(&[("web-0", 8)]), "node0 has web-0 only");
    let replies = replies.into_iter().chain(through(1, 4)).collect::<Vec<_>>();
    assert_eq!(
        tally(&replies[8..]),
        spread(&[("web-1", 4), ("web-2", 4)]),
        "node1 uses its own two"
    );
    for reply in &replies {
        assert_eq!(
            reply.peer.ip(),
            IpAddr::V4(OUTSIDE_IP),
            "Local keeps the client's address"
        );
    }
    let health = |node: usize| http_get(cluster.outside(), at(node_ip(node), HEALTH_PORT), "/").unwrap();
    let body = |n: usize| {
        format!(
            r#"{{"service":{{"namespace":"default","name":"web"}},"localEndpoints":{n},"serviceProxyHealthy":true}}"#
        )
    };
    assert_eq!(health(0), (200, body(1)));
    assert_eq!(health(1), (200, body(2)));

    // web-0 is no longer ready: node0 has no local endpoint.
    expose(&cluster, local(), &["web-1", "web-2"]);
    assert_eq!(health(0), (503, body(0)));
    assert!(
        connect(cluster.outside(), at(node_ip(0), HTTP_NODE_PORT)).is_err(),
        "node0 drops traffic from outside (the load balancer's health check steers away)"
    );
    // Pods are not restricted to their node's endpoints (kube-proxy's short-circuit).
    let client = &cluster.pod("client").ns;
    for to in [at(LB_IP, 80), at(node_ip(0), HTTP_NODE_PORT)] {
        let reply = connect(client, to).unwrap().request().unwrap();
        assert!(["web-1", "web-2"].contains(&reply.pod.as_str()), "{to}: {reply:?}");
    }

    // Back to Cluster: the health check server goes away.
    expose(&cluster, Exposure::default(), &["web-1", "web-2"]);
    cluster
        .wait_until("the health check server to stop", || {
            Ok(http_get(cluster.outside(), at(node_ip(0), HEALTH_PORT), "/").is_err())
        })
        .unwrap();
}

#[test]
fn source_ranges_admit_only_their_clients_and_change_live() {
    let cluster = two_nodes();
    let ranges = |r: &'static [&'static str]| Exposure {
        source_ranges: r,
        ..Exposure::default()
    };
    expose(
        &cluster,
        ranges(&["192.0.2.100/32", "10.0.0.0/8"]),
        &["web-0", "web-1", "web-2"],
    );
    assert!(connect(cluster.outside(), at(LB_IP, 80)).unwrap().request().is_ok());
    assert!(Datagrams::open(cluster.outside())
        .unwrap()
        .request(at(LB_IP, 53))
        .is_ok());

    expose(&cluster, ranges(&["10.0.0.0/8"]), &["web-0", "web-1", "web-2"]);
    cluster
        .wait_until("the outside client to be refused", || {
            Ok(connect(cluster.outside(), at(LB_IP, 80)).is_err())
        })
        .unwrap();
    assert!(
        Datagrams::open(cluster.outside())
            .unwrap()
            .request(at(LB_IP, 53))
            .is_err(),
        "UDP from outside the ranges is dropped too"
    );
    // The NodePort is not a LoadBalancer IP: ranges do not apply there.
    assert!(connect(cluster.outside(), at(node_ip(1), HTTP_NODE_PORT)).is_ok());

    expose(&cluster, ranges(&["192.0.2.0/24"]), &["web-0", "web-1", "web-2"]);
    cluster
        .wait_until("the outside client to be served again", || {
            Ok(connect(cluster.outside(), at(LB_IP, 80))
                .and_then(|mut c| c.request())
                .is_ok())
        })
        .unwrap();
}

/// Pods and the node itself reach every external frontend, with the socket
/// hooks (TCP balanced at connect) and without them (per packet).
#[test]
fn pods_and_the_node_reach_external_frontends_on_both_paths() {
    let mut cluster = two_nodes();
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    let targets = [
        at(node_ip(0), HTTP_NODE_PORT),
        at(node_ip(1), HTTP_NODE_PORT),
        at(LB_IP, 80),
        at(EXTERNAL_IP, 80),
    ];
    // Processes of node0's pods and of node0 itself (socket-level balancer).
    for ns in [&cluster.pod("client").ns, cluster.node()] {
        for to in targets {
            let results = cluster.socket_clients(ns, to, 3).unwrap();
            for result in results {
                let (reply, peer) = result.unwrap_or_else(|e| panic!("{to} from {}: {e}", ns.name));
                assert_eq!(peer, to, "getpeername() reports the address dialled");
                assert!(reply.pod.starts_with("web-"));
            }
        }
    }
    // Per packet: the test's own sockets in the client pod, then without the hooks.
    let check_per_packet = |cluster: &Cluster| {
        let client = &cluster.pod("client").ns;
        for to in targets {
            let replies = requests(
                client,
                to,
                SocketAddr::new(to.ip(), if to.port() == 80 { 53 } else { DNS_NODE_PORT }),
                3,
            );
            assert_eq!(tally(&replies).len(), 3, "{to}: {replies:?}");
        }
    };
    check_per_packet(&cluster);
    cluster.stop_daemon().unwrap();
    cluster.start_daemon_with(&["--no-socket-lb"]).unwrap();
    check_per_packet(&cluster);
    for to in targets {
        let results = cluster.socket_clients(&cluster.pod("client").ns, to, 3).unwrap();
        assert!(results.iter().all(Result::is_ok), "{to} without the hooks: {results:?}");
    }
}

#[test]
fn a_pod_reaching_itself_through_its_service_gets_its_answers() {
    let mut cluster = two_nodes();
    let self_vip = Ipv4Addr::new(10, 96, 0, 60);
    let web0 = cluster.pod("web-0").ip;
    let yaml = exposed_service_with_endpoints(
        "self",
        self_vip,
        &[tcp("http", 80), udp("dns", 53)],
        &Exposure::default(),
        POD_PORT,
        &[Endpoint::ready(web0).on("node0")],
    );
    cluster.write_manifest("self.yaml", &yaml).unwrap();
    cluster
        .wait_for_backends(at(self_vip, 53), IPPROTO_UDP, &[at(web0, POD_PORT)])
        .unwrap();
    let check = |cluster: &Cluster| {
        let ns = &cluster.pod("web-0").ns;
        // Per packet (the test's own sockets): the pod sees the node as its
        // peer, as kube-proxy's masquerade makes it.
        let answer = Datagrams::open(ns).unwrap().request(at(self_vip, 53)).unwrap();
        assert_eq!(
            (answer.pod.as_str(), answer.peer.ip()),
            ("web-0", IpAddr::V4(node_ip(0)))
        );
        let answer = connect(ns, at(self_vip, 80)).unwrap().request().unwrap();
        assert_eq!(
            (answer.pod.as_str(), answer.peer.ip()),
            ("web-0", IpAddr::V4(node_ip(0)))
        );
        // A process of the pod (socket hooks, when attached).
        for result in cluster.socket_clients(ns, at(self_vip, 80), 2).unwrap() {
            let (answer, peer) = result.unwrap();
            assert_eq!((answer.pod.as_str(), peer), ("web-0", at(self_vip, 80)));
        }
    };
    check(&cluster);
    cluster.stop_daemon().unwrap();
    cluster.start_daemon_with(&["--no-socket-lb"]).unwrap();
    check(&cluster);
}

#[test]
fn type_changes_conflicts_and_bad_node_ports_take_effect_live_and_are_reported() {
    let cluster = two_nodes();
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    let web0 = cluster.pod("web-0").ip;
    let node_port_service = |name: &str, node_port: u16| {
        exposed_service_with_endpoints(
            name,
            Ipv4Addr::new(10, 96, 0, 70 + name.len() as u8),
            &[tcp("http", 80)],
            &Exposure {
                type_: Some("NodePort"),
                node_ports: &[node_port],
                ..Exposure::default()
            },
            POD_PORT,
            &[Endpoint::ready(web0).on("node0")],
        )
    };
    // A later Service claiming web's nodePort is rejected; web keeps it.
    cluster
        .write_manifest("zz.yaml", &node_port_service("zz", HTTP_NODE_PORT))
        .unwrap();
    // A nodePort outside the node port range is reported and not served.
    cluster
        .write_manifest("low.yaml", &node_port_service("low", 8081))
        .unwrap();
    cluster
        .wait_until("both to be reported", || {
            let log = cluster.log();
            Ok(log.contains(
                "rejected: Service default/zz: spec.ports[0].nodePort: 192.0.2.10:30080/TCP is already served for Service default/web",
            ) && log.contains(
                "not served: Service default/low: spec.ports[0].nodePort: 8081 is outside the node port range 30000-32767",
            ))
        })
        .unwrap();
    let replies = requests(
        cluster.outside(),
        at(node_ip(0), HTTP_NODE_PORT),
        at(node_ip(0), DNS_NODE_PORT),
        3,
    );
    assert_eq!(tally(&replies).len(), 3, "web still owns its nodePort: {replies:?}");
    assert!(cluster.programmed(at(node_ip(0), 8081), IPPROTO_TCP).unwrap().is_none());
    cluster.remove_manifest("zz.yaml").unwrap();

    // LoadBalancer -> ClusterIP: the nodePorts, the LB IP and the external IP stop answering.
    let yaml = exposed_service_with_endpoints(
        "web",
        VIP,
        &[tcp("http", 80), udp("dns", 53)],
        &Exposure {
            node_ports: &[HTTP_NODE_PORT, DNS_NODE_PORT],
            ..Exposure::default()
        },
        POD_PORT,
        &[Endpoint::ready(web0).on("node0")],
    );
    cluster.write_manifest("web.yaml", &yaml).unwrap();
    cluster
        .wait_until("the nodePort to be released", || {
            Ok((0..2).all(|n| {
                cluster
                    .programmed_on(n, at(node_ip(n), HTTP_NODE_PORT), IPPROTO_TCP)
                    .is_ok_and(|p| p.is_none())
            }) && cluster.programmed(at(LB_IP, 80), IPPROTO_TCP).unwrap().is_none())
        })
        .unwrap();
    assert!(connect(cluster.outside(), at(node_ip(1), HTTP_NODE_PORT)).is_err());
    // ... and back to LoadBalancer.
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    assert!(connect(cluster.outside(), at(LB_IP, 80)).unwrap().request().is_ok());
}

#[test]
fn node_ports_follow_the_node_addresses() {
    let cluster = two_nodes();
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    let second = Ipv4Addr::new(192, 0, 2, 50);
    cluster
        .node()
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "eth0"])
        .unwrap();
    let nodes = (0..2)
        .map(|i| {
            let extra = if i == 0 { format!("\n  - type: InternalIP\n    address: {second}") } else { String::new() };
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: node{i}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}{extra}\n",
                node_ip(i)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n");
    cluster.write_manifest("nodes.yaml", &nodes).unwrap();
    let everyone: Vec<SocketAddr> = ["web-0", "web-1", "web-2"]
        .iter()
        .map(|p| at(cluster.pod(p).ip, POD_PORT))
        .collect();
    cluster
        .wait_for_backends(at(second, HTTP_NODE_PORT), IPPROTO_TCP, &everyone)
        .unwrap();
    let replies = requests(
        cluster.outside(),
        at(second, HTTP_NODE_PORT),
        at(second, DNS_NODE_PORT),
        3,
    );
    assert_eq!(tally(&replies).len(), 3, "{replies:?}");
}

#[test]
fn interfaces_without_an_ethernet_header_are_left_alone() {
    let cluster = two_nodes();
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    // Matches the daemon's `vpod*` pattern, as a CNI's tunnel device might.
    cluster
        .node()
        .ip(&["tuntap", "add", "mode", "tun", "name", "vpodtun0"])
        .unwrap();
    cluster.node().ip(&["link", "set", "vpodtun0", "up"]).unwrap();
    cluster
        .wait_until("the tun device to be noticed", || {
            Ok(cluster.nodes[0]
                .log()
                .lines()
                .any(|l| l.contains("not attached: no Ethernet header") && l.contains("vpodtun0")))
        })
        .unwrap();
    assert!(
        !cluster.pin_dir.join("links/tc_ingress_vpodtun0").exists(),
        "no program on an interface whose packets it would misparse"
    );
    assert!(connect(cluster.outside(), at(LB_IP, 80)).unwrap().request().is_ok());
}

/// The node's own processes (hostNetwork pods, the kubelet) reach every
/// frontend over UDP and TCP, and every answer comes from the address they
/// sent to; with the socket hooks on (UDP per packet, TCP at connect) and off.
#[test]
fn the_node_itself_reaches_every_frontend_over_udp_and_tcp() {
    let mut cluster = two_nodes();
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    let targets = [
        (at(VIP, 80), at(VIP, 53)),
        (at(node_ip(0), HTTP_NODE_PORT), at(node_ip(0), DNS_NODE_PORT)),
        (at(node_ip(1), HTTP_NODE_PORT), at(node_ip(1), DNS_NODE_PORT)),
        (at(LB_IP, 80), at(LB_IP, 53)),
        (at(EXTERNAL_IP, 80), at(EXTERNAL_IP, 53)),
    ];
    let check = |cluster: &Cluster| {
        for (tcp_to, udp_to) in targets {
            // The test's own sockets in the node's namespace: outside every
            // cgroup with hooks, so per packet, as with the hooks off.
            let replies = requests(cluster.node(), tcp_to, udp_to, 3);
            assert_eq!(tally(&replies).len(), 3, "{tcp_to} / {udp_to}: {replies:?}");
            // A process of the node (balanced at connect when the hooks are on).
            for result in cluster.socket_clients(cluster.node(), tcp_to, 3).unwrap() {
                let (reply, peer) = result.unwrap_or_else(|e| panic!("{tcp_to}: {e}"));
                assert_eq!(peer, tcp_to);
                assert!(reply.pod.starts_with("web-"));
            }
        }
    };
    check(&cluster);
    cluster.stop_daemon().unwrap();
    cluster.start_daemon_with(&["--no-socket-lb"]).unwrap();
    check(&cluster);
}

/// A UDP flow (DNS through a ClusterIP, say) whose backend is deleted moves
/// to a live backend at once, from the node itself as from a pod.
#[test]
fn a_udp_flow_whose_backend_goes_moves_to_a_live_one() {
    let cluster = two_nodes();
    expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    for ns in [cluster.node(), &cluster.pod("client").ns] {
        let socket = Datagrams::open(ns).unwrap();
        let first = socket.request(at(VIP, 53)).unwrap().pod;
        assert_eq!(
            socket.request(at(VIP, 53)).unwrap().pod,
            first,
            "a flow keeps its backend"
        );
        let rest: Vec<&str> = ["web-0", "web-1", "web-2"]
            .into_iter()
            .filter(|p| *p != first)
            .collect();
        expose(&cluster, Exposure::default(), &rest);
        let moved = socket.request(at(VIP, 53)).unwrap().pod;
        assert!(rest.contains(&moved.as_str()), "still sent to {first}, which is gone");
        assert_eq!(
            socket.request(at(VIP, 53)).unwrap().pod,
            moved,
            "and sticks to the new one"
        );
        expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
    }
}

/// A NodePort (30099) on node0 whose one backend, web-1, is on node1: every
/// flow through it is source-NATed to node0.
fn expose_far(cluster: &Cluster) -> SocketAddr {
    let remote = cluster.pod("web-1").ip;
    let yaml = exposed_service_with_endpoints(
        "far",
        Ipv4Addr::new(10, 96, 0, 80),
        &[tcp("http", 80)],
        &Exposure {
            type_: Some("NodePort"),
            node_ports: &[30099],
            ..Exposure::default()
        },
        POD_PORT,
        &[Endpoint::ready(remote).on("node1")],
    );
    cluster.write_manifest("far.yaml", &yaml).unwrap();
    let frontend = at(node_ip(0), 30099);
    cluster
        .wait_for_backends(frontend, IPPROTO_TCP, &[at(remote, POD_PORT)])
        .unwrap();
    frontend
}

/// SYNs `ns` has sent again (the kernel's TCPSynRetrans): a first one that
/// went unanswered or was refused.
fn syn_retransmits(ns: &Netns) -> u64 {
    let netstat = ns.exec("cat", &["/proc/net/netstat"], "").unwrap();
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let at = names.split_whitespace().position(|n| n == "TCPSynRetrans").unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// A backend holds each source-NATed tuple in TIME_WAIT for a minute after
/// it closed the connection, and admits a new SYN on it only when that
/// SYN's timestamp is newer; clients offset their timestamps per
/// connection tuple, so a different client connection given that NAT port
/// is refused half the time, and waits a second for its retry. Two passes
/// over the same source ports, the second in reverse order once kpr may
/// take the first pass's closed ports over: every connection gets its
/// answer at once.
#[test]
fn source_nat_gives_a_backends_waiting_tuple_only_to_the_connection_that_left_it() {
    let cluster = two_nodes();
    let frontend = expose_far(&cluster);
    let outside = cluster.outside();
    // 1,500 distinct ports drawn across Linux's ephemeral range, as a busy
    // client's connections are.
    let mut ports: Vec<u16> = (0..1_500u32).map(|i| 32_768 + (i * 7_759 % 28_232) as u16).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 1_500);
    let pass = |ports: &mut dyn Iterator<Item = &u16>| {
        for &port in ports {
            let conn = kpr_testbed::pod::connect_from(outside, port, frontend).unwrap();
            let reply = conn.last_request().unwrap();
            assert_eq!(reply.peer.ip(), IpAddr::V4(node_ip(0)), "source NAT to node0");
        }
    };
    let retransmits = syn_retransmits(outside);
    pass(&mut ports.iter());
    std::thread::sleep(std::time::Duration::from_secs(FLOW_NAT_TAKEOVER_CLOSED_SECS as u64 + 2));
    pass(&mut ports.iter().rev());
    assert_eq!(
        syn_retransmits(outside) - retransmits,
        0,
        "SYNs refused at the backend's TIME_WAIT"
    );
}

#[test]
fn running_out_of_nat_ports_is_counted_and_logged() {
    let cluster = two_nodes();
    let remote = cluster.pod("web-1").ip;
    let frontend = expose_far(&cluster);
    assert!(connect(cluster.outside(), frontend).unwrap().request().is_ok());
    // Every NAT port of node0 towards web-1 is held by a live flow.
    hold_nat_ports(
        &cluster.pin_dir,
        (remote, POD_PORT),
        node_ip(0),
        monotonic_secs(),
        0,
        true,
    )
    .unwrap();
    assert!(connect(cluster.outside(), frontend).is_err(), "no port: dropped");
    cluster
        .wait_until("the exhaustion to be logged", || {
            Ok(cluster.nodes[0]
                .log()
                .contains("new flows dropped: every NAT port tried"))
        })
        .unwrap();
    let (_, metrics) = http_get(cluster.node(), "127.0.0.1:10249".parse().unwrap(), "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kpr_datapath_packets_total{verdict=\"nat_exhausted\"}") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// With the XDP program on the nodes' external interfaces, in the stack
/// (generic) and in the driver (native, the veth's own XDP; on skbs from
/// the LAN's bridge, and on bare frames from a LAN switched by XDP, as from
/// a NIC), traffic from outside ends as it does through TC alone:
/// NodePorts on both nodes and a LoadBalancer IP spread over every pod,
/// remote backends see the node, local ones the client, TCP and UDP.
/// Restarted with the default (`auto`), the daemon leaves the veths to the
/// TC program, says so, and takes the earlier run's XDP off.
#[test]
fn external_traffic_through_xdp_ends_as_through_tc() {
    for lan in ["generic", "native", "native, bare frames"] {
        let mode = lan.split(',').next().unwrap_or(lan);
        let mut cluster = two_nodes();
        // Frames from a wire carry full checksums, which XDP updates in
        // software; a veth from a local socket would hand over partial ones.
        cluster.outside().send_full_checksums("eth0").unwrap();
        let bare_frames = lan.ends_with("bare frames");
        if bare_frames {
            cluster.switch_lan_by_xdp(&[0, 1]).unwrap();
        } else if mode == "native" {
            cluster.take_in_xdp_frames_on_the_lan().unwrap();
        }
        cluster.stop_daemon().unwrap();
        cluster.start_daemon_with(&["--xdp", mode]).unwrap();
        for node in &cluster.nodes {
            // `ip` names the mode after the MTU: "xdp" (native), "xdpgeneric".
            let link = node.ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
            let shown = if mode == "generic" { "xdpgeneric" } else { "xdp" };
            let first_line = link.lines().next().unwrap_or_default();
            assert!(
                first_line.split_whitespace().any(|w| w == shown) && link.contains("name kpr_xdp"),
                "{mode}: kpr_xdp on {}'s eth0:\n{link}",
                node.name
            );
        }
        expose(&cluster, Exposure::default(), &["web-0", "web-1", "web-2"]);
        assert_node_ports_spread(&cluster, 15, &format!("{lan}: "));
        let replies = requests(cluster.outside(), at(LB_IP, 80), at(LB_IP, 53), 3);
        assert_eq!(
            tally(&replies),
            spread(&[("web-0", 2), ("web-1", 2), ("web-2", 2)]),
            "{lan}: the LoadBalancer IP"
        );
        if bare_frames {
            // Switched by XDP, the LAN reaches a node only through an XDP
            // program there.
            continue;
        }
        // The logs are appended to: only what this start says counts.
        let said_before: Vec<usize> = cluster.nodes.iter().map(|n| n.log().len()).collect();
        cluster.stop_daemon().unwrap();
        cluster.start_daemon().unwrap();
        for (node, said_before) in cluster.nodes.iter().zip(said_before) {
            let link = node.ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
            assert!(!link.contains("kpr_xdp"), "{mode}: XDP left on {}:\n{link}", node.name);
            cluster
                .wait_until("the daemon to say why XDP is off", || {
                    Ok(node.log().get(said_before..).is_some_and(|l| l.contains("off: a veth")))
                })
                .unwrap();
        }
        assert_node_ports_spread(&cluster, 3, &format!("{mode}, then auto: "));
    }
}
