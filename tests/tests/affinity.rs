//! sessionAffinity ClientIP, as kube-proxy means it: every new connection
//! (TCP) or flow (UDP) from one client to a frontend goes to the backend it
//! got first, until `timeoutSeconds` pass without a new one; a remembered
//! backend that leaves is replaced at once. On the per-packet path (the
//! test's own sockets, the outside client) and the socket-level path
//! (processes of the node's cgroup) alike.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use kpr_testbed::{
    cluster::{node_ip, POD_PORT},
    manifests::{web, Endpoint, Exposure},
    netns::Netns,
    pod::{connect, Conn, Datagrams},
    Cluster, ClusterSpec,
};
use proxy_common::IPPROTO_TCP;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
const NODE_PORT: u16 = 30080;

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn cluster() -> Cluster {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.extend(["client-a".into(), "client-b".into()]);
    Cluster::start(spec).expect("cluster")
}

/// `web` (NodePort) over the named pods, with affinity when `timeout` is set.
fn program(cluster: &Cluster, pods: &[&str], timeout: Option<u32>) {
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint::ready(cluster.pod(p).ip).on("node0"))
        .collect();
    let exposure = Exposure {
        type_: Some("NodePort"),
        node_ports: &[NODE_PORT, 30053],
        affinity_timeout: timeout,
        ..Exposure::default()
    };
    let yaml = web(VIP, &exposure, &endpoints);
    cluster.write_manifest("web.yaml", &yaml).unwrap();
    let want: Vec<SocketAddr> = pods.iter().map(|p| at(cluster.pod(p).ip, POD_PORT)).collect();
    cluster.wait_for_backends(at(VIP, 80), IPPROTO_TCP, &want).unwrap();
    cluster
        .wait_until("the affinity setting to reach the maps", || {
            let maps = proxy_user::dataplane::maps::ServiceMaps::open(&cluster.pin_dir)?;
            let key = proxy_common::ServiceKey::new(VIP, 80, IPPROTO_TCP);
            Ok(maps
                .service(&key)?
                .is_some_and(|v| v.affinity_timeout == timeout.unwrap_or(0)))
        })
        .unwrap();
}

/// The pods that answered `n` new TCP connections from `ns` to `to` (kept
/// open until the end, so no source port is reused).
fn tcp_pods(ns: &Netns, to: SocketAddr, n: usize) -> Vec<String> {
    let mut keep: Vec<Conn> = Vec::new();
    (0..n)
        .map(|_| {
            let mut conn = connect(ns, to).unwrap();
            let pod = conn.request().unwrap().pod;
            keep.push(conn);
            pod
        })
        .collect()
}

fn one(pods: &[String]) -> String {
    let distinct: BTreeSet<&String> = pods.iter().collect();
    assert_eq!(distinct.len(), 1, "one backend for every new connection: {pods:?}");
    pods[0].clone()
}

#[test]
fn clients_stick_to_their_first_backend_on_every_path() {
    let cluster = cluster();
    program(&cluster, &["web-0", "web-1", "web-2"], Some(600));
    let (a, b) = (&cluster.pod("client-a").ns, &cluster.pod("client-b").ns);
    // Per packet.
    let first_a = one(&tcp_pods(a, at(VIP, 80), 5));
    let first_b = one(&tcp_pods(b, at(VIP, 80), 5));
    assert_ne!(first_a, first_b, "a new client is balanced as usual");
    let udp: Vec<String> = (0..5)
        .map(|_| Datagrams::open(a).unwrap().request(at(VIP, 53)).unwrap().pod)
        .collect();
    one(&udp);
    // From outside, through the NodePort.
    one(&tcp_pods(cluster.outside(), at(node_ip(0), NODE_PORT), 5));
    // At connect(), from processes of the pod.
    let socket: Vec<String> = cluster
        .socket_clients(a, at(VIP, 80), 5)
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().0.pod)
        .collect();
    one(&socket);
}

#[test]
fn affinity_ends_when_the_timeout_passes_without_a_new_connection() {
    let cluster = cluster();
    program(&cluster, &["web-0", "web-1", "web-2"], Some(3));
    let a = &cluster.pod("client-a").ns;
    let first = one(&tcp_pods(a, at(VIP, 80), 2));
    // Each new connection within the timeout renews it (seconds are whole:
    // a second's gap reads as at most two, well inside three).
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(one(&tcp_pods(a, at(VIP, 80), 1)), first, "within the timeout");
    }
    std::thread::sleep(Duration::from_millis(4500));
    // Chosen afresh: the rotation has moved on since the first choice.
    let after = one(&tcp_pods(a, at(VIP, 80), 3));
    assert_ne!(after, first, "the timeout passed: balanced afresh");
}

#[test]
fn a_remembered_backend_that_leaves_is_replaced_at_once_and_the_new_one_sticks() {
    let cluster = cluster();
    let all = ["web-0", "web-1", "web-2"];
    program(&cluster, &all, Some(600));
    let a = &cluster.pod("client-a").ns;
    let first = one(&tcp_pods(a, at(VIP, 80), 3));
    let udp_socket = Datagrams::open(a).unwrap();
    let udp_first = udp_socket.request(at(VIP, 53)).unwrap().pod;
    let rest: Vec<&str> = all.iter().copied().filter(|p| *p != first && *p != udp_first).collect();
    program(&cluster, &rest, Some(600));
    let next = one(&tcp_pods(a, at(VIP, 80), 4));
    assert!(rest.contains(&next.as_str()), "{next} is not a current backend");
    let udp_next = udp_socket.request(at(VIP, 53)).unwrap().pod;
    assert!(rest.contains(&udp_next.as_str()), "UDP flow still on {udp_next}");
    assert_eq!(udp_socket.request(at(VIP, 53)).unwrap().pod, udp_next);
}

#[test]
fn turning_affinity_off_and_on_takes_effect_live() {
    let cluster = cluster();
    let all = ["web-0", "web-1", "web-2"];
    program(&cluster, &all, Some(600));
    let a = &cluster.pod("client-a").ns;
    one(&tcp_pods(a, at(VIP, 80), 4));
    program(&cluster, &all, None);
    let rotating: BTreeSet<String> = tcp_pods(a, at(VIP, 80), 3).into_iter().collect();
    assert_eq!(rotating.len(), 3, "without affinity: round-robin again");
    program(&cluster, &all, Some(600));
    one(&tcp_pods(a, at(VIP, 80), 4));
}
