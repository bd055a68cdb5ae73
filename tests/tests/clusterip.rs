//! ClusterIP traffic through the real dataplane, from pods of a namespace
//! cluster, asserted on what real clients receive.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
};

use kpr_testbed::{
    cluster::POD_PORT,
    dataplane::monotonic_secs,
    manifests::{ready, service_with_endpoints, tcp, udp},
    netns::Netns,
    pod::{connect, Conn, Datagrams, Reply},
    Cluster, ClusterSpec,
};
use proxy_common::{
    addr_to_map, FlowKey, NatEntry, FLOW_TCP_CLOSED_SECS, FLOW_UDP_STREAM_SECS, IPPROTO_TCP, IPPROTO_UDP, SEEN_FIN,
};
use proxy_user::dataplane::maps::{read_stats, FlowMaps};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((VIP, port))
}

/// Three `web` backends and one `client` pod; `web` has a TCP and a UDP port.
fn web_cluster() -> Cluster {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).expect("cluster");
    let backends: Vec<Ipv4Addr> = cluster.pods[..3].iter().map(|p| p.ip).collect();
    write_web(&cluster, &backends);
    cluster
}

fn write_web(cluster: &Cluster, backends: &[Ipv4Addr]) {
    let yaml = service_with_endpoints(
        "web",
        VIP,
        &[tcp("http", 80), udp("dns", 53)],
        POD_PORT,
        &ready(backends),
    );
    cluster.write_manifest("web.yaml", &yaml).unwrap();
    let want: Vec<SocketAddr> = backends.iter().map(|&ip| SocketAddr::from((ip, POD_PORT))).collect();
    cluster.wait_for_backends(vip(80), IPPROTO_TCP, &want).unwrap();
    cluster.wait_for_backends(vip(53), IPPROTO_UDP, &want).unwrap();
}

/// `n` new connections to vip:80, one request each; they stay open in
/// `keep` so that no source port is reused.
fn new_connections(ns: &Netns, n: usize, keep: &mut Vec<Conn>) -> Vec<Reply> {
    (0..n)
        .map(|_| {
            let mut c = connect(ns, vip(80)).unwrap();
            let r = c.request().unwrap();
            keep.push(c);
            r
        })
        .collect()
}

fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in replies {
        *counts.entry(r.pod.clone()).or_default() += 1;
    }
    counts
}

fn even(n: usize) -> BTreeMap<String, usize> {
    (0..3).map(|i| (format!("web-{i}"), n)).collect()
}

#[test]
fn tcp_connections_rotate_exactly_and_keep_the_client_address() {
    let cluster = web_cluster();
    let client = cluster.pod("client");
    // Each connection stays open until the end, so no source port is reused.
    let mut conns = Vec::new();
    let mut replies = Vec::new();
    for _ in 0..30 {
        let mut conn = connect(&client.ns, vip(80)).unwrap();
        let reply = conn.request().unwrap();
        assert_eq!(
            reply.peer,
            conn.local_addr(),
            "the backend must see the client pod's own address (no SNAT)"
        );
        assert_eq!(reply.peer.ip(), std::net::IpAddr::V4(client.ip));
        replies.push(reply);
        conns.push(conn);
    }
    assert_eq!(tally(&replies), even(10));
    // Sequential connections follow the rotation exactly.
    for window in replies.windows(2) {
        assert_ne!(
            window[0].pod, window[1].pod,
            "consecutive connections must reach different pods"
        );
    }
    // And it was our program that did it.
    let stats: BTreeMap<&str, u64> = read_stats(&cluster.pin_dir)
        .unwrap()
        .into_iter()
        .map(|(s, n)| (s.name(), n))
        .collect();
    assert_eq!(stats["new_flow"], 30, "{stats:?}");
    assert!(stats["reply"] >= 60 && stats["established"] >= 60, "{stats:?}");
}

#[test]
fn udp_flows_rotate_exactly_and_replies_come_from_the_service() {
    let cluster = web_cluster();
    let client = cluster.pod("client");
    let sockets: Vec<Datagrams> = (0..30).map(|_| Datagrams::open(&client.ns).unwrap()).collect();
    let replies: Vec<Reply> = sockets.iter().map(|s| s.request(vip(53)).unwrap()).collect();
    assert_eq!(tally(&replies), even(10));
    // Every later datagram of a flow goes to the backend its first one did.
    for (socket, first) in sockets.iter().zip(&replies) {
        assert_eq!(socket.request(vip(53)).unwrap().pod, first.pod);
    }
}

#[test]
fn a_long_lived_connection_keeps_its_backend_while_others_rotate() {
    let cluster = web_cluster();
    let client = cluster.pod("client");
    let mut long = connect(&client.ns, vip(80)).unwrap();
    let pinned = long.request().unwrap().pod;
    let mut others = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..9 {
        let mut conn = connect(&client.ns, vip(80)).unwrap();
        others.push(conn.request().unwrap());
        keep.push(conn);
        assert_eq!(
            long.request().unwrap().pod,
            pinned,
            "the long-lived connection changed backend"
        );
    }
    assert_eq!(
        tally(&others).len(),
        3,
        "short connections must reach every pod: {:?}",
        tally(&others)
    );
}

#[test]
fn manifest_edits_apply_live_without_breaking_surviving_connections() {
    let cluster = web_cluster();
    let client = cluster.pod("client");
    let ips = cluster.pod_ips();
    // One open connection to each backend.
    let mut conns: Vec<_> = (0..3).map(|_| connect(&client.ns, vip(80)).unwrap()).collect();
    let owners: Vec<String> = conns.iter_mut().map(|c| c.request().unwrap().pod).collect();
    assert_eq!(
        tally(
            &owners
                .iter()
                .map(|p| Reply {
                    pod: p.clone(),
                    peer: vip(0)
                })
                .collect::<Vec<_>>()
        )
        .len(),
        3
    );

    // Remove web-2.
    write_web(&cluster, &ips[..2]);
    for (conn, owner) in conns.iter_mut().zip(&owners) {
        if owner != "web-2" {
            assert_eq!(
                &conn.request().unwrap().pod,
                owner,
                "a connection to a surviving backend broke"
            );
        }
    }
    let mut keep = Vec::new();
    let fresh = new_connections(&client.ns, 6, &mut keep);
    assert_eq!(
        tally(&fresh),
        [("web-0".to_string(), 3), ("web-1".to_string(), 3)].into()
    );

    // Add it back: new connections use all three again; old ones survive.
    write_web(&cluster, &ips[..3]);
    for (conn, owner) in conns.iter_mut().zip(&owners) {
        if owner != "web-2" {
            assert_eq!(&conn.request().unwrap().pod, owner);
        }
    }
    let fresh = new_connections(&client.ns, 9, &mut keep);
    assert_eq!(tally(&fresh), even(3));
}

#[test]
fn traffic_to_no_service_passes_untouched() {
    let cluster = web_cluster();
    let client = cluster.pod("client");
    // Straight to a pod IP: no translation, the pod answers as itself.
    let target = SocketAddr::from((cluster.pod("web-1").ip, POD_PORT));
    let mut conn = connect(&client.ns, target).unwrap();
    assert_eq!(conn.request().unwrap().pod, "web-1");
    let udp = Datagrams::open(&client.ns).unwrap();
    assert_eq!(udp.request(target).unwrap().pod, "web-1");
}

#[test]
fn a_daemon_restart_keeps_established_flows_and_the_programming() {
    let mut cluster = web_cluster();
    let client_ns = &cluster.pod("client").ns;
    let mut conns: Vec<_> = (0..3).map(|_| connect(client_ns, vip(80)).unwrap()).collect();
    let owners: Vec<String> = conns.iter_mut().map(|c| c.request().unwrap().pod).collect();

    cluster.stop_daemon().unwrap();
    // Nothing runs in userspace now: the pinned programs keep forwarding.
    for (conn, owner) in conns.iter_mut().zip(&owners) {
        assert_eq!(
            &conn.request().unwrap().pod,
            owner,
            "flow broke while the daemon was down"
        );
    }
    let mut fresh = connect(&cluster.pod("client").ns, vip(80)).unwrap();
    fresh.request().unwrap();

    cluster.start_daemon().unwrap();
    for (conn, owner) in conns.iter_mut().zip(&owners) {
        assert_eq!(&conn.request().unwrap().pod, owner, "flow broke across the restart");
    }
    assert!(
        cluster.log().contains("frontends=2"),
        "the new daemon took over the maps:\n{}",
        cluster.log()
    );
    // And it keeps applying edits.
    write_web(&cluster, &cluster.pod_ips()[..1]);
    let mut c = connect(&cluster.pod("client").ns, vip(80)).unwrap();
    assert_eq!(c.request().unwrap().pod, "web-0");
}

#[test]
fn a_malformed_manifest_is_reported_and_everything_else_keeps_forwarding() {
    let cluster = web_cluster();
    let client = cluster.pod("client");
    let other_vip = Ipv4Addr::new(10, 96, 0, 20);
    let api = |port: u16| {
        service_with_endpoints(
            "api",
            other_vip,
            &[tcp("http", port)],
            POD_PORT,
            &ready(&[cluster.pod("web-0").ip]),
        )
    };
    cluster.write_manifest("api.yaml", &api(8000)).unwrap();
    cluster
        .wait_for_backends(
            SocketAddr::from((other_vip, 8000)),
            IPPROTO_TCP,
            &[SocketAddr::from((cluster.pod("web-0").ip, POD_PORT))],
        )
        .unwrap();

    // An impossible port in one file, garbage in another.
    cluster
        .write_manifest("api.yaml", &api(8000).replace("port: 8000", "port: 70000"))
        .unwrap();
    cluster
        .write_manifest("junk.yaml", "kind: Service\nmetadata: [unclosed\n")
        .unwrap();
    cluster
        .wait_until("the rejection to be logged", || {
            let log = cluster.log();
            Ok(
                log.contains("api.yaml: Service default/api: spec.ports[0].port: port 70000 is out of range 1-65535")
                    && log.contains("junk.yaml: not valid YAML"),
            )
        })
        .unwrap();
    // Both services keep forwarding: web untouched, api on its last valid version.
    assert!(connect(&client.ns, vip(80)).unwrap().request().is_ok());
    assert_eq!(
        connect(&client.ns, SocketAddr::from((other_vip, 8000)))
            .unwrap()
            .request()
            .unwrap()
            .pod,
        "web-0"
    );
}

/// A translated packet goes on through the hook (TC_ACT_UNSPEC), so a
/// program attached after kpr's (a CNI's network policy, say) still sees
/// it: here a second, empty dataplane of its own, counting what reaches it.
#[test]
fn a_translated_packet_goes_on_to_the_next_program_on_the_hook() {
    use proxy_common::Stat;
    use proxy_user::dataplane::loader;
    let cluster = web_cluster();
    let client = cluster.pod("client");
    let veth = format!("vpod{}", cluster.pods.iter().position(|p| p.name == "client").unwrap());
    let second = cluster.pin_dir.parent().unwrap().join("second");
    let mut ebpf = loader::load(&second).unwrap();
    cluster
        .node()
        .run(|| loader::attach(&mut ebpf, &second, &veth, loader::Role::Pods))
        .unwrap()
        .unwrap();
    let seen = || {
        read_stats(&second)
            .unwrap()
            .into_iter()
            .find(|(s, _)| *s == Stat::NoMatch)
            .map_or(0, |(_, n)| n)
    };
    let before = seen();
    let mut conn = connect(&client.ns, vip(80)).unwrap();
    for _ in 0..3 {
        conn.request().unwrap();
    }
    let reached = seen() - before;
    loader::uninstall(&second).unwrap();
    assert!(
        reached >= 4,
        "the SYN, the handshake's ACK and the requests, translated, reach the next program: {reached}"
    );
}

/// One request on a new connection from `ns` to `to`, from local port
/// `port`, closed with a RST (SO_LINGER 0) so that the tuple is free for
/// the next connection at once: the pod that answered.
fn request_from_port(ns: &Netns, port: u16, to: SocketAddr) -> String {
    use std::io::{BufRead, BufReader, Write};
    ns.run(|| -> anyhow::Result<String> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        socket.connect_timeout(&to.into(), std::time::Duration::from_secs(3))?;
        socket.set_linger(Some(std::time::Duration::ZERO))?;
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        stream.write_all(b"hello\n")?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok(Reply::parse(&line)?.pod)
    })
    .unwrap()
    .unwrap()
}

/// A client reusing a few source ports for thousands of sequential
/// connections (as a load tool cycling through its ports does): each new
/// connection on a closed connection's tuple is balanced afresh, so a pod
/// added by a scale-up gets its share at once.
#[test]
fn connections_reusing_closed_tuples_are_balanced_afresh() {
    let mut spec = ClusterSpec::pods("web", 4);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).expect("cluster");
    let ips = cluster.pod_ips();
    write_web(&cluster, &ips[..3]);
    let client = &cluster.pod("client").ns;
    let ports = [41001, 41002, 41003, 41004];
    let mut before = BTreeMap::new();
    for i in 0..60 {
        *before
            .entry(request_from_port(client, ports[i % 4], vip(80)))
            .or_insert(0) += 1;
    }
    assert_eq!(before, even(20), "exact round-robin over three pods");
    write_web(&cluster, &ips[..4]);
    let mut after: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..200 {
        *after
            .entry(request_from_port(client, ports[i % 4], vip(80)))
            .or_insert(0) += 1;
    }
    for pod in ["web-0", "web-1", "web-2", "web-3"] {
        let share = after.get(pod).copied().unwrap_or(0);
        assert!(
            (40..=60).contains(&share),
            "{pod} got {share} of 200 after the scale-up: {after:?}"
        );
    }
}

/// The daemon sweeps the flow table: a closed connection's entries and an
/// answered UDP query's go once their timeouts have passed (simulated by
/// ageing every entry of the client past the longest of those timeouts),
/// while an open connection idle as long stays, and keeps working.
#[test]
fn the_daemon_sweeps_expired_flows_and_keeps_open_connections() {
    let cluster = web_cluster();
    let client = cluster.pod("client");
    let mut open = connect(&client.ns, vip(80)).unwrap();
    let pod = open.request().unwrap().pod;
    let mut closed = connect(&client.ns, vip(80)).unwrap();
    closed.request().unwrap();
    let closed_port = closed.local_addr().port();
    drop(closed);
    let query = Datagrams::open(&client.ns).unwrap();
    query.request(vip(53)).unwrap();
    let query_port = query.local_addr().port();

    let client_ip = addr_to_map(client.ip);
    let ports_of_client = |flows: &FlowMaps| -> Vec<(u16, FlowKey, NatEntry)> {
        flows
            .entries()
            .unwrap()
            .into_iter()
            .filter_map(|(k, e)| match (k.src_addr == client_ip, k.dst_addr == client_ip) {
                (true, _) => Some((u16::from_be(k.src_port), k, e)),
                (_, true) => Some((u16::from_be(k.dst_port), k, e)),
                _ => None,
            })
            .collect()
    };
    let mut flows = FlowMaps::open(&cluster.pin_dir).unwrap();
    // The closed connection's FINs have been seen both ways.
    cluster
        .wait_until("the closed connection's FINs", || {
            Ok(ports_of_client(&flows)
                .iter()
                .filter(|(port, _, e)| *port == closed_port && e.seen & SEEN_FIN != 0)
                .count()
                == 2)
        })
        .unwrap();
    // Past every timeout but an established connection's, and not before
    // boot: the clock counts from it, and a fresh machine is minutes old.
    let aged = FLOW_TCP_CLOSED_SECS.max(FLOW_UDP_STREAM_SECS) + 60;
    let long_ago = monotonic_secs().saturating_sub(aged).max(1);
    for (_, key, entry) in ports_of_client(&flows) {
        if entry.last_seen != 0 {
            flows
                .insert(
                    &key,
                    &NatEntry {
                        last_seen: long_ago,
                        ..entry
                    },
                )
                .unwrap();
        }
    }
    let open_port = open.local_addr().port();
    cluster
        .wait_until("the sweep", || {
            let ports: BTreeSet<u16> = ports_of_client(&flows).iter().map(|(p, _, _)| *p).collect();
            anyhow::ensure!(ports.contains(&open_port), "the open connection's flow was swept");
            Ok(!ports.contains(&closed_port) && !ports.contains(&query_port))
        })
        .unwrap();
    assert_eq!(open.request().unwrap().pod, pod, "the open connection kept its backend");
}

/// A backend's ICMP port unreachable about a translated datagram reaches
/// the client's socket translated back (about the service it sent to), so
/// a connected UDP socket learns at once that nothing listens there. Left
/// untranslated, it would quote the backend's address, which the client's
/// kernel matches to no socket: the client would wait for its timeout.
#[test]
fn a_udp_client_is_told_when_nothing_listens_behind_the_service() {
    let cluster = web_cluster();
    let silent = Ipv4Addr::new(10, 96, 0, 20);
    let backend = cluster.pods[0].ip;
    // Nothing listens on port 9 in the pods.
    let yaml = service_with_endpoints("silent", silent, &[udp("dns", 53)], 9, &ready(&[backend]));
    cluster.write_manifest("silent.yaml", &yaml).unwrap();
    cluster
        .wait_for_backends(
            SocketAddr::from((silent, 53)),
            IPPROTO_UDP,
            &[SocketAddr::from((backend, 9))],
        )
        .unwrap();
    let client = cluster.pod("client");
    let datagrams = Datagrams::open(&client.ns).unwrap();
    let socket = datagrams.socket();
    socket.connect((silent, 53)).unwrap();
    socket.send(b"anyone?").unwrap();
    let error = socket.recv(&mut [0u8; 64]).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused, "{error}");
    let errors = read_stats(&cluster.pin_dir)
        .unwrap()
        .into_iter()
        .find(|(s, _)| s.name() == "icmp_error")
        .unwrap()
        .1;
    assert!(errors >= 1, "counted as a translated ICMP error");
}

/// A datagram larger than the pods' MTU leaves the client in fragments:
/// the first carries the ports and is translated; the later ones follow
/// it to the same backend, which reassembles the datagram and answers.
#[test]
fn a_fragmented_datagram_reaches_its_backend_whole() {
    let cluster = web_cluster();
    let client = cluster.pod("client");
    let datagrams = Datagrams::open(&client.ns).unwrap();
    let socket = datagrams.socket();
    for i in 0..3 {
        socket.send_to(&[b'x'; 4000], vip(53)).unwrap();
        let mut answer = [0u8; 512];
        let (n, from) = socket
            .recv_from(&mut answer)
            .unwrap_or_else(|e| panic!("datagram {i}: no answer: {e}"));
        assert_eq!(from, vip(53), "answered by the service");
        Reply::parse(&String::from_utf8_lossy(&answer[..n])).unwrap();
    }
    let stats: BTreeMap<&str, u64> = read_stats(&cluster.pin_dir)
        .unwrap()
        .into_iter()
        .map(|(s, n)| (s.name(), n))
        .collect();
    assert_eq!(stats["fragment"], 0, "no fragment was left untranslated");
}
