//! The socket-level balancer: TCP clients running as processes of the
//! cluster's cgroup (pods and the node itself) connect to services and land
//! on backends with no per-packet translation, and still see the service as
//! their peer.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use kpr_testbed::{
    cluster::{SocketClient, POD_PORT},
    manifests::{ready, service_with_endpoints, tcp},
    Cluster, ClusterSpec,
};
use proxy_common::{map_name, SocketPeer, Stat, IPPROTO_TCP, MAX_SOCKET_PEER_RECORDS};
use proxy_user::dataplane::maps::read_stats;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const FRONTEND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(VIP), 80);

fn cluster_with_web(backends: usize) -> Cluster {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).expect("cluster");
    program_web(&cluster, backends);
    cluster
}

/// `web` served by the first `backends` pods.
fn program_web(cluster: &Cluster, backends: usize) {
    let ips: Vec<Ipv4Addr> = cluster.pods[..backends].iter().map(|p| p.ip).collect();
    let yaml = service_with_endpoints("web", VIP, &[tcp("http", 80)], POD_PORT, &ready(&ips));
    cluster.write_manifest("web.yaml", &yaml).unwrap();
    let want: Vec<SocketAddr> = ips.iter().map(|&ip| SocketAddr::from((ip, POD_PORT))).collect();
    cluster.wait_for_backends(FRONTEND, IPPROTO_TCP, &want).unwrap();
}

fn stat(cluster: &Cluster, which: Stat) -> u64 {
    read_stats(&cluster.pin_dir)
        .unwrap()
        .into_iter()
        .find(|(s, _)| *s == which)
        .map_or(0, |(_, n)| n)
}

/// Per pod, how many connections it answered; panics on any failure or on
/// a peer address other than the service's.
fn tally(results: &[SocketClient], client_ip: Ipv4Addr) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        let (reply, peer) = result.as_ref().expect("connection failed");
        assert_eq!(
            *peer, FRONTEND,
            "getpeername() must report the service, not the backend"
        );
        assert_eq!(
            reply.peer.ip(),
            client_ip,
            "the backend must see the client's own address"
        );
        *counts.entry(reply.pod.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn connections_are_balanced_at_connect_without_per_packet_translation() {
    let cluster = cluster_with_web(3);
    let client = cluster.pod("client");
    let new_flows = stat(&cluster, Stat::NewFlow);
    let results = cluster.socket_clients(&client.ns, FRONTEND, 30).unwrap();
    let counts = tally(&results, client.ip);
    let want: BTreeMap<String, usize> = (0..3).map(|i| (format!("web-{i}"), 10)).collect();
    assert_eq!(counts, want, "exact round-robin over the three backends");
    assert_eq!(stat(&cluster, Stat::SocketConnect), 30);
    assert_eq!(
        stat(&cluster, Stat::NewFlow),
        new_flows,
        "no packet of these connections may need translating"
    );
    let (_, metrics) =
        kpr_testbed::pod::http_get(cluster.node(), "127.0.0.1:10249".parse().unwrap(), "/metrics").unwrap();
    assert!(
        metrics.contains("kpr_socket_connects_total{verdict=\"socket_connect\"} 30"),
        "{metrics}"
    );
}

#[test]
fn a_pod_reaches_itself_through_its_own_service() {
    // Hairpin: per-packet DNAT would send web-0's SYN back to web-0 from its
    // own address; the connection is made to the backend directly instead.
    let cluster = cluster_with_web(1);
    let web0 = cluster.pod("web-0");
    let results = cluster.socket_clients(&web0.ns, FRONTEND, 3).unwrap();
    assert_eq!(tally(&results, web0.ip), BTreeMap::from([("web-0".to_string(), 3)]));
}

#[test]
fn host_network_clients_reach_services() {
    let cluster = cluster_with_web(3);
    let results = cluster.socket_clients(cluster.node(), FRONTEND, 6).unwrap();
    let mut counts = BTreeMap::new();
    for result in &results {
        let (reply, peer) = result.as_ref().expect("connection from the node failed");
        assert_eq!(*peer, FRONTEND);
        *counts.entry(reply.pod.clone()).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = (0..3).map(|i| (format!("web-{i}"), 2)).collect();
    assert_eq!(counts, want);
}

#[test]
fn endpoint_changes_apply_to_the_next_connect() {
    let cluster = cluster_with_web(3);
    let client = cluster.pod("client");
    program_web(&cluster, 1);
    let results = cluster.socket_clients(&client.ns, FRONTEND, 4).unwrap();
    assert_eq!(tally(&results, client.ip), BTreeMap::from([("web-0".to_string(), 4)]));
}

#[test]
fn a_restarted_daemon_keeps_the_hooks_and_one_started_without_them_removes_them() {
    let mut cluster = cluster_with_web(3);
    let client = cluster.pod("client").ip;
    cluster.stop_daemon().unwrap();
    cluster.start_daemon().unwrap();
    let links = std::fs::read_dir(cluster.pin_dir.join("links"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("cgroup_"))
        .count();
    assert_eq!(
        links, 3,
        "the restart reuses the pinned connect4, getpeername4 and sock_release links"
    );
    let results = cluster.socket_clients(&cluster.pod("client").ns, FRONTEND, 3).unwrap();
    assert_eq!(tally(&results, client).values().sum::<usize>(), 3);
    let socket_connects = stat(&cluster, Stat::SocketConnect);
    assert_eq!(socket_connects, 3, "one program, not an old one beside the new");

    // Without the socket-level hooks the TC path translates the same
    // connections per packet. The records of sockets still open are
    // forgotten: no hook would remove them when they close.
    let held = cluster
        .hold_socket_clients(&cluster.pod("client").ns, FRONTEND, 2)
        .unwrap();
    assert_eq!(socket_records(&cluster), 2);
    let socket_connects = stat(&cluster, Stat::SocketConnect);
    cluster.stop_daemon().unwrap();
    cluster.start_daemon_with(&["--no-socket-lb"]).unwrap();
    assert_eq!(
        socket_records(&cluster),
        0,
        "the detached balancer's records are forgotten"
    );
    held.close().unwrap();
    let new_flows = stat(&cluster, Stat::NewFlow);
    let results = cluster.socket_clients(&cluster.pod("client").ns, FRONTEND, 3).unwrap();
    for result in &results {
        let (_, peer) = result.as_ref().expect("connection through the TC path failed");
        assert_eq!(*peer, FRONTEND);
    }
    assert_eq!(stat(&cluster, Stat::SocketConnect), socket_connects);
    assert_eq!(stat(&cluster, Stat::NewFlow), new_flows + 3);
}

/// The socket-level balancer's table of socket records, by cookie.
fn socket_table(cluster: &Cluster) -> aya::maps::HashMap<aya::maps::MapData, u64, SocketPeer> {
    let pin = cluster.pin_dir.join(map_name::SOCKET_PEERS_BY_COOKIE);
    let table = aya::maps::MapData::from_pin(pin).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(table)).unwrap()
}

fn socket_records(cluster: &Cluster) -> usize {
    socket_table(cluster).keys().count()
}

#[test]
fn a_sockets_record_lives_as_long_as_the_socket_and_overflows_into_its_storage() {
    let cluster = cluster_with_web(3);
    let client = cluster.pod("client");
    let held = cluster.hold_socket_clients(&client.ns, FRONTEND, 3).unwrap();
    assert_eq!(tally(&held.results, client.ip).values().sum::<usize>(), 3);
    assert_eq!(socket_records(&cluster), 3, "one record per open socket");
    held.close().unwrap();
    assert_eq!(socket_records(&cluster), 0, "a closed socket's record goes with it");

    // A full table: sockets that connect now keep their records in their
    // own storage, and getpeername still answers the service. The filler
    // keys count down from the top: cookies count up from 1.
    let mut table = socket_table(&cluster);
    for i in 0..u64::from(MAX_SOCKET_PEER_RECORDS) {
        table.insert(u64::MAX - i, SocketPeer::default(), 0).unwrap();
    }
    let held = cluster.hold_socket_clients(&client.ns, FRONTEND, 3).unwrap();
    assert_eq!(tally(&held.results, client.ip).values().sum::<usize>(), 3);
    assert_eq!(
        socket_records(&cluster),
        MAX_SOCKET_PEER_RECORDS as usize,
        "no room: no record of these sockets in the table"
    );
    held.close().unwrap();
}

/// Before the records lived with their sockets they were an LRU table
/// keyed by socket cookie: a node upgraded from such a kpr gets the new
/// kind of map in place of the pinned old one, and getpeername still works.
#[test]
fn an_older_kprs_socket_record_table_is_replaced_at_start() {
    let mut cluster = cluster_with_web(3);
    let client = cluster.pod("client").ip;
    cluster.stop_daemon().unwrap();
    let pin = cluster.pin_dir.join(proxy_common::map_name::SOCKET_PEERS);
    let older = kpr_testbed::bpffs::OlderMap {
        name: "SOCKET_PEERS",
        kind: "lru_hash",
        key_size: 8,
        value_size: 12,
        entries: 262_144,
        flags: 0,
    };
    older.pin(&pin).unwrap();
    cluster.start_daemon().unwrap();
    assert!(
        cluster
            .log()
            .lines()
            .any(|l| l.contains("another layout") && l.contains("SOCKET_PEERS")),
        "the old table is replaced, and the log says so:\n{}",
        cluster.log()
    );
    let kind = aya::maps::MapData::from_pin(&pin)
        .unwrap()
        .info()
        .unwrap()
        .map_type()
        .unwrap();
    assert_eq!(kind, aya::maps::MapType::SkStorage);
    let results = cluster.socket_clients(&cluster.pod("client").ns, FRONTEND, 3).unwrap();
    assert_eq!(tally(&results, client).values().sum::<usize>(), 3);
}

#[test]
fn a_service_without_endpoints_is_refused_at_connect() {
    let cluster = cluster_with_web(0);
    let client = cluster.pod("client");
    let results = cluster.socket_clients(&client.ns, FRONTEND, 1).unwrap();
    let error = results[0].as_ref().expect_err("nothing may answer");
    assert!(error.contains("refused"), "ECONNREFUSED from connect(): {error}");
    assert_eq!(stat(&cluster, Stat::SocketRejected), 1);
    assert_eq!(stat(&cluster, Stat::SocketConnect), 0);
    assert_eq!(stat(&cluster, Stat::Rejected), 0, "no packet was sent");
}
