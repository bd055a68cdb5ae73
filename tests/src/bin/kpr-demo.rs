//! The demo, as the tutorials tell it: an nginx Deployment behind a
//! `type: LoadBalancer` Service on a two-node namespace cluster, reached from
//! a host outside the cluster; then `externalTrafficPolicy: Local`, the
//! client's own address at the pods and each node's health check answer.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use anyhow::Result;
use kpr_testbed::{
    cluster::{node_ip, POD_PORT},
    manifests::{exposed_service_with_endpoints, tcp, udp, Endpoint, Exposure},
    netns::Netns,
    pod::{connect, http_get, Datagrams, Reply},
    Cluster, ClusterSpec,
};
use proxy_common::IPPROTO_TCP;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);
/// What MetalLB (or the cloud) would write into the Service's status.
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NODE_PORT: u16 = 30080;
const HEALTH_PORT: u16 = 32000;

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels:
      app: nginx
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:1.27
        ports:
        - name: http
          containerPort: 8080
";

fn step(text: &str) {
    println!("\n==> {text}");
}

/// The Deployment and its LoadBalancer Service over the `ready` nginx pods.
fn manifest(cluster: &Cluster, ready: &[&str], local: bool) -> String {
    let endpoints: Vec<Endpoint> = ready
        .iter()
        .map(|name| {
            let pod = cluster.pod(name);
            Endpoint::ready(pod.ip).on(&format!("node{}", pod.node))
        })
        .collect();
    let exposure = Exposure {
        type_: Some("LoadBalancer"),
        node_ports: &[NODE_PORT, 30053],
        ingress_ips: &[LB_IP],
        local,
        health_check_node_port: local.then_some(HEALTH_PORT),
        ..Exposure::default()
    };
    let objects = exposed_service_with_endpoints(
        "nginx",
        VIP,
        &[tcp("http", 80), udp("dns", 53)],
        &exposure,
        POD_PORT,
        &endpoints,
    );
    format!("{DEPLOYMENT}---\n{objects}")
}

/// Runs a `kpr` subcommand against the node's pins and prints its output indented.
/// The CLI as an operator runs it on node0 (in its namespace, where the
/// daemon names the frontends).
fn show_kpr(cluster: &Cluster, args: &[&str]) -> Result<()> {
    for line in cluster.kpr(args)?.lines() {
        println!("    {line}");
    }
    Ok(())
}

fn print_counts(label: &str, counts: &BTreeMap<String, usize>) {
    let parts: Vec<String> = counts.iter().map(|(pod, n)| format!("{pod}: {n}")).collect();
    println!("    {label:<30} {}", parts.join("   "));
}

/// `n` requests on new TCP connections from `ns` to `to`, kept open so no
/// source port is reused: per pod, how many, and which source addresses
/// the pods saw.
fn round(ns: &Netns, to: SocketAddr, n: usize) -> Result<(BTreeMap<String, usize>, BTreeMap<String, IpAddr>)> {
    let mut counts = BTreeMap::new();
    let mut seen = BTreeMap::new();
    let mut open = Vec::new();
    for _ in 0..n {
        let mut conn = connect(ns, to)?;
        let Reply { pod, peer } = conn.request()?;
        *counts.entry(pod.clone()).or_default() += 1;
        seen.insert(pod, peer.ip());
        open.push(conn);
    }
    Ok((counts, seen))
}

fn show_round(label: &str, ns: &Netns, to: SocketAddr, n: usize) -> Result<()> {
    let (counts, seen) = round(ns, to, n)?;
    print_counts(label, &counts);
    let seen: Vec<String> = seen.iter().map(|(pod, ip)| format!("{pod} saw {ip}")).collect();
    println!("    {:<30} {}", "client address at the pod:", seen.join("   "));
    Ok(())
}

fn show_health(cluster: &Cluster) -> Result<()> {
    for node in 0..2 {
        let to = SocketAddr::from((node_ip(node), HEALTH_PORT));
        let (status, body) = http_get(cluster.outside(), to, "/")?;
        println!("    GET http://{to}/ -> {status} {body}");
    }
    Ok(())
}

fn main() -> Result<()> {
    step("Building a two-node namespace cluster: node0 runs nginx-0 and a client pod, node1 runs nginx-1 and nginx-2, each node runs kpr; an outside host shares their LAN");
    let mut spec = ClusterSpec::pods("nginx", 1).with_node(&["nginx-1", "nginx-2"]);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec)?;
    for node in &cluster.nodes {
        println!("    {} {}", node.name, node.ip);
    }
    for pod in &cluster.pods {
        println!("    pod {:<8} {:<12} on node{}", pod.name, pod.ip.to_string(), pod.node);
    }
    println!("    outside host {}", kpr_testbed::cluster::OUTSIDE_IP);
    let all = ["nginx-0", "nginx-1", "nginx-2"];

    step(&format!(
        "kubectl apply: the nginx Deployment and a `type: LoadBalancer` Service; the load balancer gives it {LB_IP} (status.loadBalancer.ingress) and routes that address to node0, as MetalLB in L2 mode does"
    ));
    cluster.write_manifest("nginx.yaml", &manifest(&cluster, &all, false))?;
    cluster.route_from_outside(LB_IP, 0)?;
    let backends: Vec<SocketAddr> = all
        .iter()
        .map(|p| SocketAddr::from((cluster.pod(p).ip, POD_PORT)))
        .collect();
    for node in 0..2 {
        let frontend = SocketAddr::from((node_ip(node), NODE_PORT));
        cluster.wait_for_backends_on(node, frontend, IPPROTO_TCP, &backends)?;
    }
    println!("    `kpr services` on node0 reads its pinned maps:");
    show_kpr(&cluster, &["services"])?;

    step(&format!(
        "30 requests from the outside host to http://{LB_IP}/ (new connection each)"
    ));
    show_round(
        "requests per pod:",
        cluster.outside(),
        SocketAddr::from((LB_IP, 80)),
        30,
    )?;
    println!("    (externalTrafficPolicy Cluster: pods on node1 see node0, which source-NATs so the answer comes back through it; the pod on node0 itself sees the client)");
    println!("    `kpr services` counts them per backend, no pod logs needed:");
    show_kpr(&cluster, &["services", "--service", &format!("{LB_IP}:80")])?;

    step(&format!(
        "The NodePort answers on every node: 30 requests to {}:{NODE_PORT}",
        node_ip(1)
    ));
    show_round(
        "requests per pod:",
        cluster.outside(),
        SocketAddr::from((node_ip(1), NODE_PORT)),
        30,
    )?;

    step(&format!("Inside the cluster: 30 connections to the ClusterIP {VIP}:80 from a process in the client pod (balanced in connect())"));
    let mut counts = BTreeMap::new();
    for result in cluster.socket_clients(&cluster.pod("client").ns, SocketAddr::from((VIP, 80)), 30)? {
        let (reply, peer) = result.map_err(anyhow::Error::msg)?;
        anyhow::ensure!(peer == SocketAddr::from((VIP, 80)), "getpeername() said {peer}");
        *counts.entry(reply.pod).or_insert(0) += 1;
    }
    print_counts("connections per pod:", &counts);
    let udp = Datagrams::open(&cluster.pod("client").ns)?.request(SocketAddr::from((VIP, 53)))?;
    println!(
        "    a UDP query to {VIP}:53 was answered by {} (from {VIP}:53)",
        udp.pod
    );

    step(&format!(
        "externalTrafficPolicy: Local, healthCheckNodePort: {HEALTH_PORT}"
    ));
    cluster.write_manifest("nginx.yaml", &manifest(&cluster, &all, true))?;
    cluster.wait_until("the health check servers", || {
        Ok(http_get(cluster.outside(), SocketAddr::from((node_ip(1), HEALTH_PORT)), "/").is_ok())
    })?;
    show_round(
        "via node0, requests per pod:",
        cluster.outside(),
        SocketAddr::from((LB_IP, 80)),
        10,
    )?;
    cluster.route_from_outside(LB_IP, 1)?;
    println!("    (the load balancer moves {LB_IP} to node1)");
    show_round(
        "via node1, requests per pod:",
        cluster.outside(),
        SocketAddr::from((LB_IP, 80)),
        10,
    )?;
    println!("    every pod sees the client's own address; each node only uses its own pods");
    println!("    the load balancer's health checks:");
    show_health(&cluster)?;

    step("Scaling nginx to 2 replicas: nginx-0 goes, node0 has no local pod left");
    cluster.write_manifest("nginx.yaml", &manifest(&cluster, &all[1..], true))?;
    cluster.wait_for_backends(SocketAddr::from((VIP, 80)), IPPROTO_TCP, &backends[1..])?;
    show_health(&cluster)?;
    println!("    (node0 answers 503: the load balancer stops sending it traffic, which it would drop)");

    step("Data path counters on node0 (`kpr stats`)");
    show_kpr(&cluster, &["stats"])?;

    step("Cleaning up");
    drop(cluster);
    println!("    done: namespaces, links, pins and the daemons are gone");
    Ok(())
}
