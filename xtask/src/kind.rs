//! `cargo xtask kind-test`: kpr on a real Kubernetes cluster. Where Docker,
//! kind and kubectl exist it creates a kind cluster without kube-proxy from
//! `deploy/kind/cluster.yaml`, builds and loads the image, deploys
//! `deploy/kind`, then checks what users rely on against what the pods
//! report (`tests/kind/workload.yaml`): a ClusterIP from a pod, a NodePort
//! and a LoadBalancer IP from the host, ClientIP affinity, the client's
//! address under externalTrafficPolicy Local, and a daemon restart under
//! load; and, where the upstream `e2e.test` binary is on PATH, its
//! sig-network Service conformance tests. Where something is missing it
//! says so and exits 0 without claiming anything was tested.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{describe, root};

const NAMESPACE: &str = "kpr-kind-test";
const NODE_PORT: u16 = 30080;
const LOCAL_NODE_PORT: u16 = 30081;

/// One check against the running cluster: what it saw, or why it failed.
type Check = fn(&KindCluster) -> Result<String>;

pub struct Options {
    /// A prebuilt image to load instead of building `deploy/Dockerfile`.
    pub image: Option<String>,
    /// Leave the cluster up afterwards (for a look around).
    pub keep: bool,
}

/// What is missing to run for real, if anything.
fn missing_prerequisites() -> Option<String> {
    let mut missing = Vec::new();
    for tool in ["docker", "kind", "kubectl"] {
        if which(tool).is_none() {
            missing.push(format!("`{tool}` is not on PATH"));
        }
    }
    if which("docker").is_some() {
        let daemon = Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !daemon.is_ok_and(|s| s.success()) {
            missing.push("the Docker daemon does not answer (`docker info` fails)".into());
        }
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}

pub fn run(options: Options) -> Result<()> {
    if let Some(why) = missing_prerequisites() {
        println!("kind-test: SKIPPED, nothing was tested: {why}.");
        println!("It needs Docker with a running daemon, kind and kubectl (and, for the upstream conformance tests, `e2e.test`).");
        return Ok(());
    }
    let cluster = KindCluster::create(options.keep)?;
    let image = match options.image {
        Some(image) => image,
        None => {
            let image = "kpr:kind-test".to_string();
            crate::run(Command::new("docker").args(["build", "-f", "deploy/Dockerfile", "-t", &image, "."]))?;
            image
        }
    };
    crate::run(Command::new("kind").args(["load", "docker-image", &image, "--name", &cluster.name]))?;
    cluster.deploy_kpr(&image)?;
    cluster.kubectl(&[
        "apply",
        "-f",
        root().join("tests/kind/workload.yaml").to_str().context("utf-8 path")?,
    ])?;
    cluster.kubectl(&["-n", NAMESPACE, "rollout", "status", "deploy/web", "--timeout=180s"])?;
    cluster.kubectl(&[
        "-n",
        NAMESPACE,
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=180s",
    ])?;

    let checks: Vec<(&str, Check)> = vec![
        ("ClusterIP from a pod, by DNS name", cluster_ip_from_a_pod),
        ("NodePort from the host, on every node", node_port_from_the_host),
        ("LoadBalancer IP from the host", load_balancer_from_the_host),
        ("sessionAffinity ClientIP", session_affinity),
        (
            "externalTrafficPolicy Local keeps the client's address",
            external_local_source_ip,
        ),
        ("a daemon restart under load drops nothing", restart_under_load),
        (
            "upstream sig-network Service conformance (e2e.test)",
            upstream_conformance,
        ),
    ];
    let mut failed = Vec::new();
    for (name, check) in checks {
        match check(&cluster) {
            Ok(said) => println!("kind-test: PASS {name}: {said}"),
            Err(e) => {
                println!("kind-test: FAIL {name}: {e:#}");
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        println!(
            "{}",
            cluster.kubectl(&["-n", "kube-system", "logs", "-l", "k8s-app=kpr", "--tail=50"])?
        );
        bail!(
            "kind-test: {} of the checks failed: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// A kind cluster of this run, deleted when dropped (unless kept), with the
/// host routes the checks added.
struct KindCluster {
    name: String,
    kubeconfig: PathBuf,
    keep: bool,
    routes: std::sync::Mutex<Vec<String>>,
}

impl KindCluster {
    fn create(keep: bool) -> Result<Self> {
        let name = format!("kpr-{}", std::process::id());
        let kubeconfig = std::env::temp_dir().join(format!("{name}.kubeconfig"));
        let cluster = KindCluster {
            name,
            kubeconfig,
            keep,
            routes: Default::default(),
        };
        // Not `--wait`: without kube-proxy, CoreDNS and everything reaching the
        // API server by its ClusterIP waits for kpr.
        crate::run(Command::new("kind").args([
            "create",
            "cluster",
            "--name",
            &cluster.name,
            "--config",
            "deploy/kind/cluster.yaml",
            "--kubeconfig",
            cluster.kubeconfig.to_str().context("utf-8 path")?,
        ]))?;
        Ok(cluster)
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_input(args, None)
    }

    fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        output(&mut cmd, input)
    }

    /// `deploy/kind` as rendered, pointed at this cluster's control plane
    /// and this run's image.
    fn deploy_kpr(&self, image: &str) -> Result<()> {
        let rendered = self.kubectl(&["kustomize", root().join("deploy/kind").to_str().context("utf-8 path")?])?;
        let manifest = rendered
            .replace("kind-control-plane", &format!("{}-control-plane", self.name))
            .replace("image: kpr:dev", &format!("image: {image}"));
        if !manifest.contains(&format!("image: {image}")) {
            bail!("deploy/kind renders no `image: kpr:dev` to replace:\n{rendered}");
        }
        self.kubectl_with_input(&["apply", "-f", "-"], Some(&manifest))?;
        self.kubectl(&["-n", "kube-system", "rollout", "status", "ds/kpr", "--timeout=300s"])?;
        self.kubectl(&["wait", "--for=condition=Ready", "nodes", "--all", "--timeout=300s"])?;
        self.kubectl(&[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deploy/coredns",
            "--timeout=300s",
        ])?;
        Ok(())
    }

    /// Node name -> InternalIP.
    fn nodes(&self) -> Result<BTreeMap<String, Ipv4Addr>> {
        let text = self.kubectl(&[
            "get",
            "nodes",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}"#,
        ])?;
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(name, ip)| {
                let ip = ip.split_whitespace().find_map(|a| a.parse().ok());
                Ok((
                    name.to_string(),
                    ip.with_context(|| format!("node {name} has no IPv4 InternalIP"))?,
                ))
            })
            .collect()
    }

    /// Node name -> the web pods on it.
    fn web_pods_by_node(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let text = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            r#"jsonpath={range .items[*]}{.spec.nodeName} {.metadata.name}{"\n"}{end}"#,
        ])?;
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (node, pod) in text.lines().filter_map(|l| l.split_once(' ')) {
            by_node.entry(node.into()).or_default().push(pod.into());
        }
        Ok(by_node)
    }

    fn exec_in_client(&self, script: &str) -> Result<String> {
        self.kubectl(&["-n", NAMESPACE, "exec", "client", "--", "sh", "-c", script])
    }

    /// `n` GETs of `path` from the client pod, a new connection each: the
    /// answers, one per line.
    fn get_from_client(&self, host: &str, path: &str, n: usize) -> Result<Vec<String>> {
        let script =
            format!("for i in $(seq {n}); do curl -s --max-time 3 http://{host}{path} || echo FAILED; echo; done");
        Ok(self
            .exec_in_client(&script)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }
}

impl Drop for KindCluster {
    fn drop(&mut self) {
        for route in self.routes.lock().expect("routes lock").drain(..) {
            let _ = Command::new("ip").args(["route", "del", &route]).status();
        }
        if self.keep {
            eprintln!(
                "kind-test: cluster {} kept (kubeconfig {}); remove it with `kind delete cluster --name {}`",
                self.name,
                self.kubeconfig.display(),
                self.name
            );
            return;
        }
        let _ = Command::new("kind")
            .args(["delete", "cluster", "--name", &self.name])
            .status();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn output(cmd: &mut Command, input: Option<&str>) -> Result<String> {
    let what = describe(cmd);
    let mut child = cmd
        .current_dir(root())
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what}"))?;
    if let Some(input) = input {
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("`{what}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One GET over a new connection: the body.
fn http_get(to: SocketAddr, path: &str) -> Result<String> {
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path} from {to}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.trim().to_string())
}

fn tally<'a>(answers: impl IntoIterator<Item = &'a String>) -> BTreeMap<&'a str, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.as_str()).or_default() += 1;
    }
    counts
}

/// Every web pod answers a ClusterIP Service reached by its DNS name (so
/// CoreDNS, itself behind a ClusterIP, works too), and nothing fails.
fn cluster_ip_from_a_pod(cluster: &KindCluster) -> Result<String> {
    let answers = cluster.get_from_client("web", "/hostname", 30)?;
    let counts = tally(&answers);
    let pods: usize = cluster.web_pods_by_node()?.values().map(Vec::len).sum();
    if counts.contains_key("FAILED") || answers.len() != 30 || counts.len() != pods {
        bail!("30 requests, answered by {counts:?}; want all {pods} pods and no failure");
    }
    Ok(format!("answers per pod {counts:?}"))
}

/// Every node answers the NodePort, whichever node the pods are on.
fn node_port_from_the_host(cluster: &KindCluster) -> Result<String> {
    let mut said = Vec::new();
    for (node, ip) in cluster.nodes()? {
        let answers: Vec<String> = (0..9)
            .map(|_| http_get(SocketAddr::from((ip, NODE_PORT)), "/hostname"))
            .collect::<Result<_>>()
            .with_context(|| format!("via {node}"))?;
        said.push(format!("{node}: {:?}", tally(&answers)));
    }
    Ok(said.join("; "))
}

/// The LoadBalancer Service's address, from the host. With
/// `cloud-provider-kind` on PATH, it assigns the address as a cloud
/// would; otherwise the test writes one into the Service's status (as
/// MetalLB would) and routes it from the host to a node (as MetalLB's L2
/// mode would attract it).
fn load_balancer_from_the_host(cluster: &KindCluster) -> Result<String> {
    let (nodes, how) = (cluster.nodes()?, which("cloud-provider-kind"));
    let mut provider = None;
    let lb_ip: Ipv4Addr = if let Some(binary) = how {
        provider = Some(
            Command::new(binary)
                .env("KUBECONFIG", &cluster.kubeconfig)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_for(Duration::from_secs(120), || {
            let ip = cluster.kubectl(&[
                "-n",
                NAMESPACE,
                "get",
                "svc",
                "web-lb",
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ])?;
            Ok(ip.trim().parse().ok())
        })
        .context("cloud-provider-kind assigned no address")?
    } else {
        let (_, first) = nodes.iter().next().context("no node")?;
        // A documentation address (TEST-NET-3): routed to a node, so no
        // container needs to hold it.
        let ip = Ipv4Addr::new(203, 0, 113, 80);
        let status = format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{ip}"}}]}}}}}}"#);
        cluster.kubectl(&[
            "-n",
            NAMESPACE,
            "patch",
            "svc",
            "web-lb",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ])?;
        let route = format!("{ip}/32");
        crate::run(Command::new("ip").args(["route", "replace", &route, "via", &first.to_string()]))?;
        cluster.routes.lock().expect("routes lock").push(route);
        ip
    };
    let result = wait_for(Duration::from_secs(30), || {
        Ok(http_get(SocketAddr::from((lb_ip, 80)), "/hostname").ok())
    })
    .and_then(|_| {
        let answers: Vec<String> = (0..9)
            .map(|_| http_get(SocketAddr::from((lb_ip, 80)), "/hostname"))
            .collect::<Result<_>>()?;
        Ok(format!("{lb_ip}:80 answered by {:?}", tally(&answers)))
    });
    if let Some(mut p) = provider {
        let _ = p.kill();
    }
    result
}

/// Every new connection from one client goes to the pod its first one got.
fn session_affinity(cluster: &KindCluster) -> Result<String> {
    let answers = cluster.get_from_client("web-sticky", "/hostname", 20)?;
    let counts = tally(&answers);
    if counts.len() != 1 || counts.contains_key("FAILED") {
        bail!("20 requests from one client answered by {counts:?}; want one pod");
    }
    Ok(format!("{counts:?}"))
}

/// Through a node with a local pod, the pod sees the host's own address;
/// a node without one drops the traffic (as kube-proxy), it is not sent on.
fn external_local_source_ip(cluster: &KindCluster) -> Result<String> {
    let nodes = cluster.nodes()?;
    let pods = cluster.web_pods_by_node()?;
    let mut said = Vec::new();
    for (node, ip) in &nodes {
        let to = SocketAddr::from((*ip, LOCAL_NODE_PORT));
        match (pods.get(node), http_get(to, "/clientip")) {
            (Some(_), Ok(seen)) => {
                let seen_ip: Ipv4Addr = seen.rsplit_once(':').map_or(seen.as_str(), |(ip, _)| ip).parse()?;
                // The host's address towards that node: where the request came from.
                let host = source_address_towards(*ip)?;
                if seen_ip != host {
                    bail!("via {node}, the pod saw {seen_ip}, not the client's {host}");
                }
                said.push(format!("{node}: the pod saw {seen_ip}"));
            }
            (Some(_), Err(e)) => bail!("via {node}, which has a local pod: {e:#}"),
            (None, Ok(seen)) => bail!("via {node}, which has no local pod, a pod answered (saw {seen})"),
            (None, Err(_)) => said.push(format!("{node}: no local pod, dropped")),
        }
    }
    Ok(said.join("; "))
}

fn source_address_towards(ip: Ipv4Addr) -> Result<Ipv4Addr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect((ip, 9))?;
    match probe.local_addr()? {
        SocketAddr::V4(a) => Ok(*a.ip()),
        other => bail!("an IPv6 source {other} towards {ip}"),
    }
}

/// While the host opens connection after connection to a NodePort, the kpr
/// pod of that node is deleted and its DaemonSet starts a new one: not one
/// request fails (the programs and maps stay pinned across the restart).
fn restart_under_load(cluster: &KindCluster) -> Result<String> {
    let nodes = cluster.nodes()?;
    let pods = cluster.web_pods_by_node()?;
    let (node, ip) = nodes
        .iter()
        .find(|(n, _)| pods.contains_key(*n))
        .context("no node runs a web pod")?;
    let to = SocketAddr::from((*ip, NODE_PORT));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                if http_get(to, "/hostname").is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let selector = format!("spec.nodeName={node}");
    let result = cluster
        .kubectl(&[
            "-n",
            "kube-system",
            "delete",
            "pod",
            "-l",
            "k8s-app=kpr",
            "--field-selector",
            &selector,
            "--wait=true",
        ])
        .and_then(|_| cluster.kubectl(&["-n", "kube-system", "rollout", "status", "ds/kpr", "--timeout=180s"]));
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    result?;
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    if failed > 0 {
        bail!("{failed} of {sent} requests to {to} failed across the restart on {node}");
    }
    Ok(format!(
        "{sent} requests to {to}, none failed, across the restart on {node}"
    ))
}

/// Kubernetes' own Service conformance tests, where their binary is
/// installed; said plainly when it is not.
fn upstream_conformance(cluster: &KindCluster) -> Result<String> {
    let Some(e2e) = which("e2e.test") else {
        return Ok("not run: `e2e.test` is not on PATH (it ships in kubernetes-test-linux-amd64.tar.gz)".into());
    };
    let started = Instant::now();
    crate::run(Command::new(e2e).arg("--kubeconfig").arg(&cluster.kubeconfig).args([
        "--provider=skeleton",
        r"--ginkgo.focus=\[sig-network\] Services.*\[Conformance\]",
        r"--ginkgo.skip=\[Serial\]|\[Disruptive\]",
    ]))?;
    Ok(format!("passed in {:.0?}", started.elapsed()))
}

fn wait_for<T>(limit: Duration, mut ready: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = ready()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("not within {limit:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
