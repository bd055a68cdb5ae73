//! Nodes made of network namespaces, each running the daemon with its own
//! pin directory and cgroup, with pods behind it on routed veths (as Calico
//! lays them out); an L2 segment (a bridge in its own namespace) joins the
//! nodes and an outside client that is not a pod. Nodes route each other's
//! pod CIDRs as a host-gw CNI does.
//!
//! ```text
//!                  lan (bridge br0)
//!   outside (192.0.2.100) ─┤├─ node0 (192.0.2.10) ──vpodN── pods 10.244.0.1N/32
//!                          └── node1 (192.0.2.11) ──vpodN── pods 10.244.1.1N/32
//! ```
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use proxy_common::ServiceKey;
use proxy_user::dataplane::maps::ServiceMaps;

use crate::{
    apiserver::ApiServer,
    bpffs::BpffsMount,
    cgroup::TestCgroup,
    manifests::{self, Endpoint, Exposure},
    netns::Netns,
    pod::PodServer,
    pod::Reply,
    sh,
};

/// The first node's address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// The gateway every pod routes through; it answers with the node-side
/// veth's MAC, which is the same on every veth.
const POD_GATEWAY: &str = "169.254.1.1";
const VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
pub const POD_PORT: u16 = 8080;

/// The outside host's index among the LAN's members (its MAC's last byte).
const OUTSIDE_MEMBER: u8 = 0;

fn node_member(i: usize) -> u8 {
    i as u8 + 1
}

/// Node `i`'s address on the LAN.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// Node `i`'s name in the API and in its Node manifest.
pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

pub struct ClusterSpec {
    /// The first node's pods.
    pub pods: Vec<String>,
    /// The pods of each further node.
    pub more_nodes: Vec<Vec<String>>,
    /// Run a test API server in the node and point the daemon at it;
    /// otherwise the daemon runs standalone on the manifest directory.
    pub api_server: bool,
    /// Start the daemon with the cluster (benchmarks start it themselves, or
    /// use another dataplane).
    pub daemon: bool,
    /// Run the daemon with short test timings (fast resync, coarse
    /// coalescing) rather than its defaults.
    pub test_timings: bool,
}

impl ClusterSpec {
    /// `n` pods named `<prefix>-0` .. `<prefix>-{n-1}` on one node.
    pub fn pods(prefix: &str, n: usize) -> Self {
        ClusterSpec {
            pods: (0..n).map(|i| format!("{prefix}-{i}")).collect(),
            more_nodes: Vec::new(),
            api_server: false,
            daemon: true,
            test_timings: true,
        }
    }

    /// Another node with these pods.
    pub fn with_node(mut self, pods: &[&str]) -> Self {
        self.more_nodes.push(pods.iter().map(|p| p.to_string()).collect());
        self
    }

    pub fn with_api_server(mut self) -> Self {
        self.api_server = true;
        self
    }

    pub fn without_daemon(mut self) -> Self {
        self.daemon = false;
        self
    }

    /// The daemon runs with its default timings (for benchmarks).
    pub fn with_default_timings(mut self) -> Self {
        self.test_timings = false;
        self
    }
}

/// The first node's name in the API.
pub const NODE_NAME: &str = "node0";

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
    /// Index of the node it runs on.
    pub node: usize,
    server: Option<PodServer>,
}

/// One simulated node: its namespace, its daemon, its pins and its cgroup.
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
    pub pin_dir: PathBuf,
    /// Where this node's socket-level balancer acts; processes started for
    /// this node (its pods, its host) run in it, and no other node's do.
    pub cgroup: TestCgroup,
    daemon: Option<Child>,
    log: PathBuf,
}

impl Node {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub struct Cluster {
    pub id: String,
    /// The first node's pin directory.
    pub pin_dir: PathBuf,
    pub manifests: PathBuf,
    pub pods: Vec<Pod>,
    pub outside: Option<Netns>,
    pub nodes: Vec<Node>,
    /// The XDP program that lets the LAN's ends of the nodes' veths take in
    /// frames XDP sends (`take_in_xdp_frames_on_the_lan`); before `lan`, so
    /// it is detached before the LAN goes.
    lan_xdp: Option<aya::Ebpf>,
    lan: Option<Netns>,
    pub api: Option<ApiServer>,
    kubeconfig: PathBuf,
    test_timings: bool,
    /// A command the daemon is started through (`setpriv ...`), after
    /// `ip netns exec`.
    pub daemon_wrapper: Vec<String>,
    /// Holds the test's directory too; dropped last.
    bpffs: Option<BpffsMount>,
}

impl Cluster {
    /// Builds the namespaces and starts the daemon in each node.
    pub fn start(spec: ClusterSpec) -> Result<Self> {
        // The bpffs lives outside /sys: `ip netns exec` remounts /sys, so
        // pins there would be invisible to the daemon.
        let bpffs = BpffsMount::new()?;
        let id = bpffs.id.clone();
        std::fs::create_dir_all(bpffs.dir.join("manifests"))?;
        let mut cluster = Cluster {
            pin_dir: bpffs.path.join("node0"),
            manifests: bpffs.dir.join("manifests"),
            id: id.clone(),
            pods: Vec::new(),
            outside: None,
            nodes: Vec::new(),
            lan_xdp: None,
            lan: None,
            api: None,
            kubeconfig: bpffs.dir.join("kubeconfig"),
            test_timings: spec.test_timings,
            daemon_wrapper: Vec::new(),
            bpffs: None,
        };
        let lan = Netns::new(&format!("{id}-lan"))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        cluster.lan = Some(lan);
        let node_count = 1 + spec.more_nodes.len();
        for i in 0..node_count {
            let node = cluster.add_node(i, node_count, &bpffs)?;
            cluster.nodes.push(node);
        }
        cluster.bpffs = Some(bpffs);

        let outside = Netns::new(&format!("{id}-out"))?;
        cluster.join_lan(&outside, "out", OUTSIDE_MEMBER, OUTSIDE_IP)?;
        cluster.outside = Some(outside);

        let pods_by_node = std::iter::once(&spec.pods).chain(&spec.more_nodes);
        for (node, names) in pods_by_node.enumerate() {
            for (i, name) in names.iter().enumerate() {
                let pod = cluster.add_pod(node, i, name)?;
                cluster.pods.push(pod);
            }
        }
        if spec.api_server {
            let api = ApiServer::start(cluster.node())?;
            api.write_kubeconfig(&cluster.kubeconfig)?;
            api.apply(&node_yaml(0))?;
            cluster.api = Some(api);
        } else {
            let nodes: String = (0..node_count).map(node_yaml).collect::<Vec<_>>().join("---\n");
            cluster.write_manifest("nodes.yaml", &nodes)?;
        }
        if spec.daemon {
            cluster.start_daemon()?;
        }
        Ok(cluster)
    }

    /// A copy of the object for the test bed's own XDP programs (one set
    /// per LAN), with maps of its own: loaded without pins, they are not the
    /// nodes'.
    fn load_lan_programs(&self) -> Result<aya::Ebpf> {
        if self.lan_xdp.is_some() {
            bail!("the LAN already has its XDP programs");
        }
        Ok(aya::EbpfLoader::new().load(proxy_user::dataplane::EBPF_OBJECT)?)
    }

    /// A veth hands a frame sent by native XDP (`XDP_TX`, a redirect) to
    /// its peer only if an XDP program runs there, as on a real NIC's wire
    /// nothing is needed: attaches one that passes everything to the LAN's
    /// end of every node's and the outside host's veth.
    pub fn take_in_xdp_frames_on_the_lan(&mut self) -> Result<()> {
        let mut ebpf = self.load_lan_programs()?;
        let lan = self.lan.as_ref().context("no LAN")?;
        let program: &mut aya::programs::Xdp = ebpf
            .program_mut(proxy_common::XDP_PASS_PROGRAM)
            .context("no XDP pass program")?
            .try_into()?;
        program.load()?;
        let peers: Vec<String> = (0..self.nodes.len())
            .map(|i| format!("n{i}"))
            .chain(["out".to_string()])
            .collect();
        for peer in &peers {
            lan.run(|| program.attach(peer, aya::programs::XdpMode::Driver))?
                .with_context(|| format!("XDP on the LAN's {peer}"))?;
        }
        self.lan_xdp = Some(ebpf);
        Ok(())
    }

    /// Makes the LAN a switch like a NIC-to-NIC wire for frames between
    /// its members (`proxy_common::XDP_WIRE_PROGRAM` on every LAN port):
    /// a member receives a bare frame, which its XDP program runs on where
    /// it lies, as on a NIC, instead of an skb that a veth first copies
    /// into an XDP buffer (the copy costs more than a whole XDP program).
    /// A member's `eth0` takes such frames in only with an XDP program of
    /// its own: the nodes in `own_xdp` get theirs from their daemon, every
    /// other member one that passes everything (so every dataplane meets
    /// the same wire).
    pub fn switch_lan_by_xdp(&mut self, own_xdp: &[usize]) -> Result<()> {
        let mut ebpf = self.load_lan_programs()?;
        let lan = self.lan.as_ref().context("no LAN")?;
        let mut members: Vec<(&Netns, String, u8)> = vec![(self.outside(), "out".into(), OUTSIDE_MEMBER)];
        for (i, node) in self.nodes.iter().enumerate() {
            members.push((&node.ns, format!("n{i}"), node_member(i)));
        }
        let mut ports: aya::maps::DevMap<_> = ebpf
            .take_map(proxy_common::WIRE_PORTS_MAP)
            .context("no wire ports map")?
            .try_into()?;
        for (_, port, member) in &members {
            let name = std::ffi::CString::new(port.as_str())?;
            // SAFETY: a NUL-terminated name; returns 0 when there is none.
            let index = lan.run(|| unsafe { libc::if_nametoindex(name.as_ptr()) })?;
            if index == 0 {
                bail!("no LAN port {port}");
            }
            // The kernel looks the index up in the updating thread's
            // namespace.
            lan.run(|| ports.set(*member as u32, index, None, 0))??;
        }
        let wire: &mut aya::programs::Xdp = ebpf
            .program_mut(proxy_common::XDP_WIRE_PROGRAM)
            .context("no XDP wire program")?
            .try_into()?;
        wire.load()?;
        for (_, port, _) in &members {
            lan.run(|| wire.attach(port, aya::programs::XdpMode::Driver))?
                .with_context(|| format!("XDP wire on the LAN's {port}"))?;
        }
        let pass: &mut aya::programs::Xdp = ebpf
            .program_mut(proxy_common::XDP_PASS_PROGRAM)
            .context("no XDP pass program")?
            .try_into()?;
        pass.load()?;
        for (i, (ns, _, _)) in members.iter().enumerate() {
            // A frame sent on as it lies keeps no note that its checksum
            // is the NIC's to finish (a node forwards its pods' packets
            // so): the kernel must finish it before the wire, as it does
            // for a NIC without checksum offload.
            ns.send_full_checksums("eth0")?;
            // Member 0 is the outside host; node i is member i + 1.
            if i > 0 && own_xdp.contains(&(i - 1)) {
                continue;
            }
            ns.run(|| pass.attach("eth0", aya::programs::XdpMode::Driver))?
                .with_context(|| format!("XDP pass on {}'s eth0", ns.name))?;
        }
        // The map lives as long as the programs using it do.
        drop(ports);
        self.lan_xdp = Some(ebpf);
        Ok(())
    }

    /// Plugs `ns` into the LAN through a veth (`eth0` inside, `peer` on the
    /// bridge), with the address of LAN member `member` (see
    /// `switch_lan_by_xdp`).
    fn join_lan(&self, ns: &Netns, peer: &str, member: u8, ip: Ipv4Addr) -> Result<()> {
        let lan = self.lan.as_ref().expect("the LAN is built first");
        sh(
            "ip",
            &[
                "link", "add", "name", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", peer, "netns",
                &lan.name,
            ],
        )?;
        lan.ip(&["link", "set", peer, "master", "br0"])?;
        lan.ip(&["link", "set", peer, "up"])?;
        let [a, b, c, d, e] = proxy_common::WIRE_MAC_PREFIX;
        let mac = format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{member:02x}");
        ns.ip(&["link", "set", "eth0", "address", &mac])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn add_node(&self, i: usize, count: usize, bpffs: &BpffsMount) -> Result<Node> {
        let ns = Netns::new(&format!("{}-n{i}", self.id))?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ns.sysctl(key, value)?;
        }
        self.join_lan(&ns, &format!("n{i}"), node_member(i), node_ip(i))?;
        // host-gw: every other node's pod CIDR through that node.
        for other in (0..count).filter(|&o| o != i) {
            ns.ip(&[
                "route",
                "add",
                &format!("10.244.{other}.0/24"),
                "via",
                &node_ip(other).to_string(),
            ])?;
        }
        // As every real node has one: a host process's packets to a service
        // address must be routed somewhere before they can be translated.
        ns.ip(&["route", "add", "default", "via", &OUTSIDE_IP.to_string()])?;
        let dir = bpffs.dir.join(node_name(i));
        std::fs::create_dir_all(&dir)?;
        Ok(Node {
            name: node_name(i),
            ip: node_ip(i),
            ns,
            pin_dir: bpffs.path.join(node_name(i)),
            cgroup: TestCgroup::new(&dir, &format!("{}-n{i}", self.id))?,
            daemon: None,
            log: dir.join("daemon.log"),
        })
    }

    /// The test's own directory (logs, manifests, scratch files), removed
    /// with the cluster.
    pub fn dir(&self) -> PathBuf {
        self.manifests
            .parent()
            .expect("manifests live in the test's directory")
            .to_path_buf()
    }

    pub fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("the cluster was started with_api_server()")
    }

    pub fn api_mut(&mut self) -> &mut ApiServer {
        self.api.as_mut().expect("the cluster was started with_api_server()")
    }

    /// The first node's namespace.
    pub fn node(&self) -> &Netns {
        &self.nodes[0].ns
    }

    /// The LAN's namespace: the bridge and the LAN's ends of the members'
    /// veths (`out`, and `n<i>` for node i).
    pub fn lan(&self) -> &Netns {
        self.lan.as_ref().expect("the LAN exists while the cluster does")
    }

    pub fn outside(&self) -> &Netns {
        self.outside.as_ref().expect("outside exists while the cluster does")
    }

    /// Makes the outside client send traffic for `ip` to node `i`, as an
    /// external load balancer (MetalLB's L2 or BGP mode) makes the network do.
    pub fn route_from_outside(&self, ip: Ipv4Addr, node: usize) -> Result<()> {
        self.outside()
            .ip(&[
                "route",
                "replace",
                &format!("{ip}/32"),
                "via",
                &node_ip(node).to_string(),
            ])
            .map(|_| ())
    }

    fn add_pod(&self, node: usize, index: usize, name: &str) -> Result<Pod> {
        let ip = Ipv4Addr::new(10, 244, node as u8, 10 + index as u8);
        let ns = Netns::new(&format!("{}-n{node}p{index}", self.id))?;
        let host_if = format!("vpod{index}");
        let node_ns = &self.nodes[node].ns;
        sh(
            "ip",
            &[
                "link",
                "add",
                "name",
                &host_if,
                "address",
                VETH_MAC,
                "netns",
                &node_ns.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ],
        )?;
        node_ns.ip(&["link", "set", &host_if, "up"])?;
        node_ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if, "scope", "link"])?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"])?;
        ns.ip(&[
            "neigh",
            "add",
            POD_GATEWAY,
            "lladdr",
            VETH_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        let server = PodServer::start(&ns, name, POD_PORT)?;
        Ok(Pod {
            name: name.to_owned(),
            ip,
            ns,
            node,
            server: Some(server),
        })
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The first node's cgroup.
    pub fn cgroup(&self) -> &TestCgroup {
        &self.nodes[0].cgroup
    }

    /// `program` in a namespace (a pod's, or a node's for a host-network
    /// client), as a process of that node's cgroup: its TCP connections to
    /// services go through that node's socket-level balancer (the test
    /// process's own connections, through the TC path). In the outside
    /// client's namespace it joins no node's cgroup: it is not on a node.
    pub fn in_netns(&self, ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns.name]).arg(program);
        let node = self
            .nodes
            .iter()
            .position(|n| n.ns.name == ns.name)
            .or_else(|| self.pods.iter().find(|p| p.ns.name == ns.name).map(|p| p.node));
        if let Some(node) = node {
            self.nodes[node].cgroup.enter(&mut command);
        }
        command
    }

    /// `count` TCP connections from a process in `ns` to `to`, all kept
    /// open until the last: (what each server answered, what
    /// `getpeername()` said), or the error of each that failed.
    pub fn socket_clients(&self, ns: &Netns, to: SocketAddr, count: usize) -> Result<Vec<SocketClient>> {
        let out = self
            .in_netns(ns, sibling_binary("kpr-client")?)
            .args([to.to_string(), count.to_string()])
            .output()
            .context("running kpr-client")?;
        anyhow::ensure!(
            out.status.success(),
            "kpr-client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(parse_socket_client)
            .collect()
    }

    /// As `socket_clients`, but the connections stay open until the
    /// returned `HeldClients` is closed.
    pub fn hold_socket_clients(&self, ns: &Netns, to: SocketAddr, count: usize) -> Result<HeldClients> {
        let mut child = self
            .in_netns(ns, sibling_binary("kpr-client")?)
            .args([to.to_string(), count.to_string(), "hold".into()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("running kpr-client")?;
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        // Owned from here: the client is ended even if its output is wrong.
        let mut held = HeldClients {
            child,
            results: Vec::new(),
        };
        for line in std::io::BufRead::lines(stdout).take(count) {
            held.results.push(parse_socket_client(&line?)?);
        }
        anyhow::ensure!(held.results.len() == count, "kpr-client ended early");
        Ok(held)
    }

    pub fn pod_ips(&self) -> Vec<Ipv4Addr> {
        self.pods.iter().map(|p| p.ip).collect()
    }

    pub fn start_daemon(&mut self) -> Result<()> {
        self.start_daemon_with(&[])
    }

    /// Starts every node's daemon with extra `run` flags.
    pub fn start_daemon_with(&mut self, extra: &[&str]) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.start_daemon_on(i, extra)?;
        }
        Ok(())
    }

    /// Starts node `i`'s daemon with extra `run` flags.
    pub fn start_daemon_on(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let node = &self.nodes[i];
        let synced_before = node.log().matches("synced").count();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.ns.name])
            .args(&self.daemon_wrapper)
            .arg(kpr_binary()?)
            .arg("--pin-dir")
            .arg(&node.pin_dir)
            .args(["run", "--interfaces", "eth0,vpod*", "--node-name", &node.name])
            .args(extra);
        // The node's cgroup, never the default (the machine's root).
        if !extra.contains(&"--no-socket-lb") {
            command.arg("--socket-lb-cgroup").arg(&node.cgroup.path);
        }
        if self.test_timings {
            command.args([
                "--min-sync-interval-ms",
                "20",
                "--sync-period-s",
                "5",
                "--flow-sweep-interval-s",
                "1",
            ]);
        }
        if self.api.is_some() {
            command.arg("--kubeconfig").arg(&self.kubeconfig);
        } else {
            command.args(["--poll-ms", "100", "--manifests"]).arg(&self.manifests);
        }
        let child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the daemon")?;
        self.nodes[i].daemon = Some(child);
        // Ready once its maps are pinned and it has synced once (the log
        // holds earlier runs' lines too).
        let node = &self.nodes[i];
        self.wait_until(&format!("{}'s daemon to start", node.name), || {
            Ok(node.log().matches("synced").count() > synced_before)
        })
    }

    /// The first node's daemon's pid (`ip netns exec` execs it, so the
    /// child is the daemon).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.nodes[0].daemon.as_ref().map(Child::id)
    }

    /// Stops every daemon (SIGTERM) and waits for them; pins stay.
    pub fn stop_daemon(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if let Some(mut child) = node.daemon.take() {
                // SAFETY: plain kill(2) on our child's pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                child.wait()?;
            }
        }
        Ok(())
    }

    /// Kills every daemon (SIGKILL: no chance to clean up) and waits for
    /// them; pins stay.
    pub fn kill_daemon(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if let Some(mut child) = node.daemon.take() {
                child.kill()?;
                child.wait()?;
            }
        }
        Ok(())
    }

    /// Every daemon's log (with a header per node when there are several).
    pub fn log(&self) -> String {
        if self.nodes.len() == 1 {
            return self.nodes[0].log();
        }
        self.nodes
            .iter()
            .map(|n| format!("---- {} ----\n{}", n.name, n.log()))
            .collect()
    }

    /// Writes a manifest file atomically, as an editor or `kubectl` would.
    /// Serves the tests' usual `web` Service (`manifests::web`) at `vip`
    /// over the named pods of the first node, exposed as `exposure`, and
    /// waits until the first node programs its TCP backends: those.
    pub fn serve_web(&self, vip: Ipv4Addr, exposure: &Exposure, pods: &[&str]) -> Result<Vec<SocketAddr>> {
        self.write_web(vip, exposure, pods)?;
        let backends: Vec<SocketAddr> = pods
            .iter()
            .map(|p| SocketAddr::from((self.pod(p).ip, POD_PORT)))
            .collect();
        self.wait_for_backends(SocketAddr::from((vip, 80)), proxy_common::IPPROTO_TCP, &backends)?;
        Ok(backends)
    }

    /// The manifest `serve_web` writes, without waiting for a daemon to
    /// program it (one may not run yet).
    pub fn write_web(&self, vip: Ipv4Addr, exposure: &Exposure, pods: &[&str]) -> Result<()> {
        let endpoints: Vec<Endpoint> = pods
            .iter()
            .map(|p| Endpoint::ready(self.pod(p).ip).on("node0"))
            .collect();
        self.write_manifest("web.yaml", &manifests::web(vip, exposure, &endpoints))
    }

    /// A Service `name` at `vip` (80/TCP) without any endpoint: new
    /// connections to it are refused. Waits until it is programmed.
    pub fn serve_nothing(&self, name: &str, vip: Ipv4Addr) -> Result<()> {
        let yaml = manifests::exposed_service_with_endpoints(
            name,
            vip,
            &[manifests::tcp("http", 80)],
            &Exposure::default(),
            POD_PORT,
            &[],
        );
        self.write_manifest(&format!("{name}.yaml"), &yaml)?;
        self.wait_for_backends(SocketAddr::from((vip, 80)), proxy_common::IPPROTO_TCP, &[])
    }

    /// The `kpr` CLI on the first node's pins, inside that node's namespace,
    /// as an operator runs it on the node: what acts on its interfaces or
    /// netfilter rules acts there, and `kpr services` finds the daemon's
    /// metrics address (which names the frontends) on the node's loopback.
    /// Its stdout.
    pub fn kpr(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["--pin-dir", self.pin_dir.to_str().context("utf-8 pin dir")?];
        all.extend_from_slice(args);
        self.node()
            .exec(kpr_binary()?.to_str().context("utf-8 path")?, &all, "")
    }

    /// `kpr -o json ...`, parsed.
    pub fn kpr_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.kpr(&all)?;
        serde_json::from_str(&text).with_context(|| format!("kpr {args:?} printed no JSON: {text}"))
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        Ok(std::fs::remove_file(self.manifests.join(file))?)
    }

    /// The backends programmed for a frontend on the first node, `None`
    /// when it is absent.
    pub fn programmed(&self, frontend: SocketAddr, proto: u8) -> Result<Option<Vec<SocketAddr>>> {
        self.programmed_on(0, frontend, proto)
    }

    /// The backends programmed for a frontend on node `i`.
    pub fn programmed_on(&self, i: usize, frontend: SocketAddr, proto: u8) -> Result<Option<Vec<SocketAddr>>> {
        let SocketAddr::V4(v4) = frontend else {
            bail!("IPv4 only")
        };
        let key = ServiceKey::new(*v4.ip(), v4.port(), proto);
        let maps = ServiceMaps::open(&self.nodes[i].pin_dir)?;
        Ok(maps
            .frontends()?
            .into_iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, backends)| backends.iter().map(|b| SocketAddr::from((b.ip(), b.port()))).collect()))
    }

    /// Waits until the frontend has exactly these backends (in any order)
    /// on the first node.
    pub fn wait_for_backends(&self, frontend: SocketAddr, proto: u8, want: &[SocketAddr]) -> Result<()> {
        self.wait_for_backends_on(0, frontend, proto, want)
    }

    /// The same on node `i`.
    pub fn wait_for_backends_on(&self, i: usize, frontend: SocketAddr, proto: u8, want: &[SocketAddr]) -> Result<()> {
        let mut want = want.to_vec();
        want.sort();
        self.wait_until(&format!("{frontend} to have backends {want:?} on node{i}"), || {
            Ok(self.programmed_on(i, frontend, proto)?.is_some_and(|mut got| {
                got.sort();
                got == want
            }))
        })
    }

    pub fn wait_until(&self, what: &str, done: impl FnMut() -> Result<bool>) -> Result<()> {
        self.wait_until_within(what, Duration::from_secs(10), done)
    }

    pub fn wait_until_within(&self, what: &str, limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut last_err = None;
        while Instant::now() < deadline {
            match done() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "timed out waiting for {what} (last error: {last_err:?}); daemon log:\n{}",
            self.log()
        )
    }
}

/// One connection of `kpr-client`: the server's answer and the peer
/// address the client's socket reported, or why it failed.
pub type SocketClient = std::result::Result<(Reply, SocketAddr), String>;

fn parse_socket_client(line: &str) -> Result<SocketClient> {
    match line.strip_prefix("error ") {
        Some(e) => Ok(Err(e.to_owned())),
        None => {
            let (answer, peer) = line.rsplit_once(' ').context("unexpected kpr-client line")?;
            Ok(Ok((Reply::parse(answer)?, peer.parse()?)))
        }
    }
}

/// Connections a `kpr-client` keeps open (see `Cluster::hold_socket_clients`);
/// closed, its process ended, when this is closed or dropped.
pub struct HeldClients {
    child: Child,
    pub results: Vec<SocketClient>,
}

impl HeldClients {
    /// Closes the connections: returns once the client has exited.
    pub fn close(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "kpr-client failed: {status}");
        Ok(())
    }
}

impl Drop for HeldClients {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The daemon binary: `KPR_BIN`, or `kpr` next to (or one level above) the
/// running executable, as cargo lays out `target/<profile>/`.
pub fn kpr_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KPR_BIN") {
        return Ok(path.into());
    }
    sibling_binary("kpr")
}

/// A binary of the workspace, next to (or one level above) the running
/// executable, as cargo lays out `target/<profile>/`.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has a directory")?;
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "`{name}` is not built next to {}: run `cargo build --workspace --bins` (or `cargo xtask test`)",
        exe.display()
    )
}

/// A Node object with the node's InternalIP, as the kubelet registers it.
fn node_yaml(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n",
        node_name(i),
        node_ip(i)
    )
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop_daemon();
        if std::thread::panicking() {
            eprintln!("---- daemon log of cluster {} ----\n{}", self.id, self.log());
        }
        self.api.take();
        for pod in &mut self.pods {
            pod.server.take();
        }
        self.pods.clear();
        self.outside.take();
        self.nodes.clear();
        self.lan.take();
        self.bpffs.take();
    }
}
