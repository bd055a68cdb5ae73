//! The demo: a one-node namespace cluster with three nginx-style pods behind
//! a ClusterIP Service, traffic from a client pod, and what landed where.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
};

use anyhow::Result;
use kpr_testbed::{
    cluster::{kpr_binary, POD_PORT},
    manifests::{ready, service_with_endpoints, tcp, udp},
    pod::{connect, Datagrams},
    Cluster, ClusterSpec,
};
use proxy_common::IPPROTO_TCP;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);

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

fn manifest(cluster: &Cluster, pods: usize) -> String {
    let ips: Vec<Ipv4Addr> = cluster.pods[..pods].iter().map(|p| p.ip).collect();
    let objects = service_with_endpoints("nginx", VIP, &[tcp("http", 80), udp("dns", 53)], POD_PORT, &ready(&ips));
    format!("{DEPLOYMENT}---\n{objects}")
}

/// Runs a `kpr` subcommand against the node's pins and prints its output indented.
fn show_kpr(cluster: &Cluster, subcommand: &str) -> Result<()> {
    let out = Command::new(kpr_binary()?)
        .arg("--pin-dir")
        .arg(&cluster.pin_dir)
        .arg(subcommand)
        .output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    Ok(())
}

fn print_counts(label: &str, counts: &BTreeMap<String, usize>) {
    let parts: Vec<String> = counts.iter().map(|(pod, n)| format!("{pod}: {n}")).collect();
    println!("    {label:<34} {}", parts.join("   "));
}

fn tcp_round(cluster: &Cluster, n: usize) -> Result<BTreeMap<String, usize>> {
    let client = cluster.pod("client");
    let mut counts = BTreeMap::new();
    let mut open = Vec::new();
    for _ in 0..n {
        let mut conn = connect(&client.ns, SocketAddr::from((VIP, 80)))?;
        let reply = conn.request()?;
        anyhow::ensure!(
            reply.peer.ip() == std::net::IpAddr::V4(client.ip),
            "backend saw {} instead of the client",
            reply.peer
        );
        *counts.entry(reply.pod).or_default() += 1;
        open.push(conn);
    }
    Ok(counts)
}

fn main() -> Result<()> {
    step("Building a namespace cluster: node (running kpr), pods nginx-0..2, a client pod, an outside host");
    let mut spec = ClusterSpec::pods("nginx", 3);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec)?;
    for pod in &cluster.pods {
        println!("    pod {:<8} {}", pod.name, pod.ip);
    }
    println!("    daemon pins: {}", cluster.pin_dir.display());

    step(&format!(
        "Writing the nginx Deployment, Service (ClusterIP {VIP}) and its EndpointSlice to {}",
        cluster.manifests.display()
    ));
    cluster.write_manifest("nginx.yaml", &manifest(&cluster, 3))?;
    let all: Vec<SocketAddr> = cluster.pods[..3]
        .iter()
        .map(|p| SocketAddr::from((p.ip, POD_PORT)))
        .collect();
    cluster.wait_for_backends(SocketAddr::from((VIP, 80)), IPPROTO_TCP, &all)?;
    println!("    `kpr services` reads the pinned maps:");
    show_kpr(&cluster, "services")?;

    step("30 new TCP connections to 10.96.0.100:80 from the client pod's network, made by this demo (outside the socket hooks' cgroup: translated per packet by the TC program)");
    print_counts("connections per pod:", &tcp_round(&cluster, 30)?);

    step("30 TCP connections from a process inside the client pod (balanced in connect(): no per-packet NAT)");
    let mut counts = BTreeMap::new();
    for result in cluster.socket_clients(&cluster.pod("client").ns, SocketAddr::from((VIP, 80)), 30)? {
        let (reply, peer) = result.map_err(anyhow::Error::msg)?;
        anyhow::ensure!(peer == SocketAddr::from((VIP, 80)), "getpeername() said {peer}");
        *counts.entry(reply.pod).or_insert(0) += 1;
    }
    print_counts("connections per pod:", &counts);
    println!("    (each socket's getpeername() still reports {VIP}:80)");

    step("30 UDP flows (distinct source ports) to 10.96.0.100:53");
    let client = cluster.pod("client");
    let sockets: Vec<Datagrams> = (0..30).map(|_| Datagrams::open(&client.ns)).collect::<Result<_>>()?;
    let mut counts = BTreeMap::new();
    for s in &sockets {
        *counts.entry(s.request(SocketAddr::from((VIP, 53)))?.pod).or_insert(0) += 1;
    }
    print_counts("flows per pod:", &counts);

    step("Scaling nginx to 2 replicas (editing the EndpointSlice in the manifest directory)");
    cluster.write_manifest("nginx.yaml", &manifest(&cluster, 2))?;
    cluster.wait_for_backends(SocketAddr::from((VIP, 80)), IPPROTO_TCP, &all[..2])?;
    print_counts("20 new connections per pod:", &tcp_round(&cluster, 20)?);

    step("Data path counters (`kpr stats`)");
    show_kpr(&cluster, "stats")?;

    step("Cleaning up");
    drop(cluster);
    println!("    done: namespaces, links, pins and the daemon are gone");
    Ok(())
}
