//! Live migration from kube-proxy: on a node running kube-proxy's rules (its
//! iptables layout, and its nftables layout), with TCP connections and a UDP
//! flow open through its NAT, kpr starts and removes kube-proxy's rules
//! (`--cleanup-kube-proxy`); every established connection keeps working,
//! with its backend, while new connections go through kpr.
use std::net::{Ipv4Addr, SocketAddr};

use kpr_testbed::{
    bench::rules::{iptables_restore, nft_script, RuleService},
    cluster::POD_PORT,
    manifests::Exposure,
    netns::Netns,
    pod::{connect, Conn, Datagrams},
    Cluster, ClusterSpec,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 97);

fn in_node(cluster: &Cluster, program: &str, args: &[&str], input: &str) -> String {
    cluster.node().exec(program, args, input).unwrap()
}

fn kpr_json(cluster: &Cluster, args: &[&str]) -> Value {
    cluster.kpr_json(args).unwrap()
}

fn kpr(cluster: &Cluster, args: &[&str]) -> String {
    cluster.kpr(args).unwrap()
}

/// `n` connections from `client` to the Service, each answered once: the
/// connection, open, and the pod that answered it.
fn answered_connections(client: &Netns, n: usize) -> Vec<(Conn, String)> {
    (0..n)
        .map(|_| {
            let mut conn = connect(client, SocketAddr::from((VIP, 80))).unwrap();
            let pod = conn.request().unwrap().pod;
            (conn, pod)
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Layout {
    Iptables,
    Nftables,
}

#[test]
fn connections_through_kube_proxys_iptables_rules_survive_the_switch_to_kpr() {
    switch_from_kube_proxy(Layout::Iptables);
}

#[test]
fn connections_through_kube_proxys_nftables_rules_survive_the_switch_to_kpr() {
    switch_from_kube_proxy(Layout::Nftables);
}

fn switch_from_kube_proxy(layout: Layout) {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.push("client".into());
    spec.daemon = false;
    let mut cluster = Cluster::start(spec).unwrap();
    let pods = ["web-0", "web-1", "web-2"];
    let backends: Vec<(Ipv4Addr, u16)> = pods.iter().map(|p| (cluster.pod(p).ip, POD_PORT)).collect();

    // kube-proxy's layout for the Service, TCP and UDP.
    let mut udp = RuleService::cluster_ip("web-dns".into(), VIP, 53, backends.clone());
    udp.protocol = "udp";
    let services = [RuleService::cluster_ip("web".into(), VIP, 80, backends.clone()), udp];
    match layout {
        Layout::Iptables => in_node(&cluster, "iptables-restore", &[], &iptables_restore(&services)),
        Layout::Nftables => in_node(&cluster, "nft", &["-f", "-"], &nft_script(&services)),
    };

    // Connections through kube-proxy's NAT: each answered by its backend.
    let client = &cluster.pod("client").ns.handle();
    let mut old = answered_connections(client, 6);
    let datagrams = Datagrams::open(client).unwrap();
    let udp_pod = datagrams.request(SocketAddr::from((VIP, 53))).unwrap().pod;

    // kpr starts, serving the same Service (as deploy/replace-kube-proxy
    // runs it): its first sync takes the connections over, then it removes
    // kube-proxy's rules.
    cluster.write_web(VIP, &Exposure::default(), &pods).unwrap();
    cluster.start_daemon_on(0, &["--cleanup-kube-proxy"]).unwrap();
    cluster
        .wait_until("kube-proxy's rules to go", || {
            let left = in_node(&cluster, "nft", &["list", "ruleset"], "");
            Ok(!left.contains("KUBE-SVC-") && !left.contains("kube-proxy"))
        })
        .unwrap();
    assert!(
        cluster.nodes[0].log().contains("removed kube-proxy's rules"),
        "{}",
        cluster.nodes[0].log()
    );

    // Every established connection keeps talking, to its backend.
    for (conn, pod) in &mut old {
        let again = conn
            .request()
            .unwrap_or_else(|e| panic!("a connection to {pod} broke: {e}"));
        assert_eq!(&again.pod, pod);
    }
    assert_eq!(
        datagrams.request(SocketAddr::from((VIP, 53))).unwrap().pod,
        udp_pod,
        "the UDP flow keeps its backend"
    );
    // kpr tracks them now, each with the backend netfilter had chosen.
    let flows = kpr_json(&cluster, &["conntrack", "--service", "10.96.0.97:80"]);
    for (conn, pod) in &old {
        let tuple = conn.local_addr().to_string();
        let flow = flows.as_array().unwrap().iter().find(|f| f["client"] == tuple.as_str());
        let backend = SocketAddr::from((cluster.pod(pod).ip, POD_PORT)).to_string();
        assert_eq!(
            flow.map(|f| f["backend"].clone()),
            Some(Value::from(backend)),
            "{flows:#}"
        );
    }

    // New connections are kpr's: balanced and tracked by it.
    let mut fresh = connect(client, SocketAddr::from((VIP, 80))).unwrap();
    fresh.request().unwrap();
    let tuple = fresh.local_addr().to_string();
    let flows = kpr_json(&cluster, &["conntrack", "--service", "10.96.0.97:80"]);
    let mine = flows.as_array().unwrap().iter().find(|f| f["client"] == tuple.as_str());
    assert_eq!(
        mine.map(|f| f["state"].clone()),
        Some(Value::from("established")),
        "{flows:#}"
    );
    assert!(
        cluster.nodes[0]
            .log()
            .contains("took over connections netfilter translated"),
        "{}",
        cluster.nodes[0].log()
    );
}

/// And back: kube-proxy's rules return, `kpr drain` leaves new connections
/// to them while kpr keeps translating its own until they end, then kpr
/// goes.
#[test]
fn draining_hands_a_node_back_to_kube_proxy_without_dropping_a_connection() {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.push("client".into());
    let mut cluster = Cluster::start(spec).unwrap();
    let pods = ["web-0", "web-1", "web-2"];
    let backends: Vec<(Ipv4Addr, u16)> = pods.iter().map(|p| (cluster.pod(p).ip, POD_PORT)).collect();
    cluster.serve_web(VIP, &Exposure::default(), &pods).unwrap();
    let client = &cluster.pod("client").ns.handle();
    let mut kprs = answered_connections(client, 4);

    // kube-proxy's rules come back; kpr drains.
    let services = [RuleService::cluster_ip("web".into(), VIP, 80, backends.clone())];
    in_node(&cluster, "iptables-restore", &[], &iptables_restore(&services));
    let said = kpr(&cluster, &["drain"]);
    assert!(said.contains("4 tracked flows"), "{said}");

    // kpr's connections keep their backends; new ones are netfilter's.
    for (conn, pod) in &mut kprs {
        assert_eq!(&conn.request().unwrap().pod, pod);
    }
    let mut fresh = connect(client, SocketAddr::from((VIP, 80))).unwrap();
    fresh.request().unwrap();
    let port = fresh.local_addr().port().to_string();
    let netfilters = in_node(
        &cluster,
        "conntrack",
        &["-L", "-p", "tcp", "--orig-port-src", &port],
        "",
    );
    assert!(
        netfilters.contains("dst=10.96.0.97"),
        "kube-proxy's rules translated it: {netfilters}"
    );
    let flows = kpr_json(&cluster, &["conntrack", "--service", "10.96.0.97:80"]);
    assert_eq!(flows.as_array().unwrap().len(), 4, "only kpr's own: {flows:#}");
    // At connect() too: the socket-level balancer leaves new sockets alone.
    let socket = cluster.socket_clients(client, SocketAddr::from((VIP, 80)), 2).unwrap();
    assert!(socket.iter().all(|r| r.is_ok()), "{socket:?}");

    // Its connections over, kpr goes; kube-proxy serves alone.
    drop(kprs);
    cluster.stop_daemon().unwrap();
    kpr(&cluster, &["uninstall"]);
    fresh.request().unwrap();
    let mut after = connect(client, SocketAddr::from((VIP, 80))).unwrap();
    after.request().unwrap();
}
