//! A frontend without any endpoint refuses new connections at once, as
//! kube-proxy's REJECT does (ICMP port unreachable for TCP and UDP; at
//! `connect()` on the socket path), from pods, the outside and the node
//! itself; a local-only policy without a local endpoint drops instead, as
//! kube-proxy does. When endpoints appear, the same clients are served.
use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use kpr_testbed::{
    cluster::{node_ip, POD_PORT},
    manifests::{web, Endpoint, Exposure},
    netns::Netns,
    Cluster, ClusterSpec,
};
use proxy_common::IPPROTO_TCP;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 95);
const NODE_PORT: u16 = 30095;

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// `web` (NodePort) over these endpoints, with extra spec lines.
fn program(cluster: &Cluster, endpoints: &[Endpoint], extra: &str) {
    let exposure = Exposure {
        type_: Some("NodePort"),
        node_ports: &[NODE_PORT, 30096],
        ..Exposure::default()
    };
    let yaml = web(VIP, &exposure, endpoints).replace("  ports:\n", &format!("{extra}  ports:\n"));
    cluster.write_manifest("web.yaml", &yaml).unwrap();
    let want: Vec<SocketAddr> = endpoints
        .iter()
        .filter(|e| e.node.as_deref() == Some("node0"))
        .map(|e| at(e.ip, POD_PORT))
        .collect();
    cluster.wait_for_backends(at(VIP, 80), IPPROTO_TCP, &want).unwrap();
}

/// How a TCP connect from `ns` to `to` ends.
fn tcp_connect(ns: &Netns, to: SocketAddr) -> Result<(), ErrorKind> {
    ns.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap()
        .map(|_| ())
        .map_err(|e| e.kind())
}

/// A connected UDP socket in `ns`: one query, how it ends.
fn udp_query(socket: &UdpSocket) -> Result<String, ErrorKind> {
    socket.send(b"hello\n").map_err(|e| e.kind())?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).map_err(|e| e.kind())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn connected_udp(ns: &Netns, to: SocketAddr) -> UdpSocket {
    let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    socket.connect(to).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    socket
}

#[test]
fn a_service_without_endpoints_refuses_at_once_and_serves_when_they_come() {
    let mut spec = ClusterSpec::pods("web", 1);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).unwrap();
    program(&cluster, &[], "");
    let client = &cluster.pod("client").ns;
    let refused = Err(ErrorKind::ConnectionRefused);
    let udp_refused: Result<String, ErrorKind> = Err(ErrorKind::ConnectionRefused);
    // Per packet: a pod, the outside, the node itself.
    assert_eq!(tcp_connect(client, at(VIP, 80)), refused, "from a pod");
    assert_eq!(
        tcp_connect(cluster.outside(), at(node_ip(0), NODE_PORT)),
        refused,
        "from outside"
    );
    assert_eq!(tcp_connect(cluster.node(), at(VIP, 80)), refused, "from the node");
    let pod_udp = connected_udp(client, at(VIP, 53));
    assert_eq!(udp_query(&pod_udp), udp_refused, "UDP from a pod");
    let node_udp = connected_udp(cluster.node(), at(VIP, 53));
    assert_eq!(udp_query(&node_udp), udp_refused, "UDP from the node");
    // At connect(): a process of the pod.
    let results = cluster.socket_clients(client, at(VIP, 80), 1).unwrap();
    let error = results[0].as_ref().expect_err("connect() must fail");
    assert!(error.contains("refused"), "{error}");

    // Endpoints appear: the same UDP sockets, and new connections, are served.
    program(&cluster, &[Endpoint::ready(cluster.pod("web-0").ip).on("node0")], "");
    assert!(udp_query(&pod_udp).unwrap().starts_with("web-0"));
    assert!(udp_query(&node_udp).unwrap().starts_with("web-0"));
    assert_eq!(tcp_connect(client, at(VIP, 80)), Ok(()));
    assert!(cluster.socket_clients(client, at(VIP, 80), 1).unwrap()[0].is_ok());
}

#[test]
fn a_local_policy_without_a_local_endpoint_drops_as_kube_proxy_does() {
    let mut spec = ClusterSpec::pods("web", 1);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).unwrap();
    // The only endpoint is on another node: internalTrafficPolicy Local has
    // none here, so the ClusterIP drops; it is not refused.
    let elsewhere = Endpoint::ready(Ipv4Addr::new(10, 244, 9, 10)).on("node9");
    program(&cluster, &[elsewhere], "  internalTrafficPolicy: Local\n");
    let client = &cluster.pod("client").ns;
    assert_eq!(tcp_connect(client, at(VIP, 80)), Err(ErrorKind::TimedOut));
    let results = cluster.socket_clients(client, at(VIP, 80), 1).unwrap();
    let error = results[0].as_ref().expect_err("nothing answers");
    assert!(!error.contains("refused"), "dropped, not refused: {error}");
}
