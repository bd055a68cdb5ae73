//! One node namespace running the daemon, pods behind it on routed veths
//! (as Calico lays them out), and an outside client on the node's external
//! interface.
//!
//! ```text
//!  outside (192.0.2.100) --eth0/eth0-- node (192.0.2.10) --vpodN/eth0-- podN (10.244.0.1N/32)
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
    apiserver::ApiServer, bpffs::BpffsMount, cgroup::TestCgroup, netns::Netns, pod::PodServer, pod::Reply, sh,
};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// The gateway every pod routes through; it answers with the node-side
/// veth's MAC, which is the same on every veth.
const POD_GATEWAY: &str = "169.254.1.1";
const VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
pub const POD_PORT: u16 = 8080;

pub struct ClusterSpec {
    pub pods: Vec<String>,
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
    /// `n` pods named `<prefix>-0` .. `<prefix>-{n-1}`.
    pub fn pods(prefix: &str, n: usize) -> Self {
        ClusterSpec {
            pods: (0..n).map(|i| format!("{prefix}-{i}")).collect(),
            api_server: false,
            daemon: true,
            test_timings: true,
        }
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

/// The node's name in the API.
pub const NODE_NAME: &str = "node0";

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
    server: Option<PodServer>,
}

pub struct Cluster {
    pub id: String,
    pub pin_dir: PathBuf,
    pub manifests: PathBuf,
    daemon: Option<Child>,
    log: PathBuf,
    pub pods: Vec<Pod>,
    pub outside: Option<Netns>,
    pub node: Option<Netns>,
    pub api: Option<ApiServer>,
    kubeconfig: PathBuf,
    test_timings: bool,
    /// Where the daemon's socket-level balancer acts; processes started by
    /// `in_pod` run in it.
    pub cgroup: Option<TestCgroup>,
    /// Holds the test's directory too; dropped last.
    bpffs: Option<BpffsMount>,
}

impl Cluster {
    /// Builds the namespaces and starts the daemon in the node.
    pub fn start(spec: ClusterSpec) -> Result<Self> {
        // The bpffs lives outside /sys: `ip netns exec` remounts /sys, so
        // pins there would be invisible to the daemon.
        let bpffs = BpffsMount::new()?;
        let id = bpffs.id.clone();
        std::fs::create_dir_all(bpffs.dir.join("manifests"))?;
        let mut cluster = Cluster {
            pin_dir: bpffs.path.join("node0"),
            manifests: bpffs.dir.join("manifests"),
            log: bpffs.dir.join("daemon.log"),
            id: id.clone(),
            daemon: None,
            pods: Vec::new(),
            outside: None,
            node: None,
            api: None,
            kubeconfig: bpffs.dir.join("kubeconfig"),
            test_timings: spec.test_timings,
            cgroup: None,
            bpffs: None,
        };
        cluster.cgroup = Some(TestCgroup::new(&bpffs.dir, &id)?);
        cluster.bpffs = Some(bpffs);

        let node = Netns::new(&format!("{id}-node"))?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            node.sysctl(key, value)?;
        }
        let outside = Netns::new(&format!("{id}-out"))?;
        sh(
            "ip",
            &[
                "link",
                "add",
                "name",
                "eth0",
                "netns",
                &node.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &outside.name,
            ],
        )?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        node.ip(&["link", "set", "eth0", "up"])?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"])?;
        outside.ip(&["link", "set", "eth0", "up"])?;
        outside.ip(&["route", "add", "default", "via", &NODE_IP.to_string()])?;
        cluster.node = Some(node);
        cluster.outside = Some(outside);

        for (i, name) in spec.pods.iter().enumerate() {
            let pod = cluster.add_pod(i, name)?;
            cluster.pods.push(pod);
        }
        if spec.api_server {
            let api = ApiServer::start(cluster.node())?;
            api.write_kubeconfig(&cluster.kubeconfig)?;
            api.apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {NODE_IP}\n"
            ))?;
            cluster.api = Some(api);
        }
        if spec.daemon {
            cluster.start_daemon()?;
        }
        Ok(cluster)
    }

    pub fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("the cluster was started with_api_server()")
    }

    pub fn api_mut(&mut self) -> &mut ApiServer {
        self.api.as_mut().expect("the cluster was started with_api_server()")
    }

    pub fn node(&self) -> &Netns {
        self.node.as_ref().expect("node exists while the cluster does")
    }

    pub fn outside(&self) -> &Netns {
        self.outside.as_ref().expect("outside exists while the cluster does")
    }

    fn add_pod(&self, index: usize, name: &str) -> Result<Pod> {
        let ip = Ipv4Addr::new(10, 244, 0, 10 + index as u8);
        let ns = Netns::new(&format!("{}-p{index}", self.id))?;
        let host_if = format!("vpod{index}");
        let node = self.node();
        sh(
            "ip",
            &[
                "link", "add", "name", &host_if, "address", VETH_MAC, "netns", &node.name, "type", "veth", "peer",
                "name", "eth0", "netns", &ns.name,
            ],
        )?;
        node.ip(&["link", "set", &host_if, "up"])?;
        node.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if, "scope", "link"])?;
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
            server: Some(server),
        })
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn cgroup(&self) -> &TestCgroup {
        self.cgroup.as_ref().expect("cluster is running")
    }

    /// `program` in a namespace (a pod's, or the node's for a host-network
    /// client), as a process of the cluster's cgroup: its TCP connections to
    /// services go through the socket-level balancer (the test process's
    /// own connections, through the TC path).
    pub fn in_netns(&self, ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns.name]).arg(program);
        self.cgroup().enter(&mut command);
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
            .map(|line| match line.strip_prefix("error ") {
                Some(e) => Ok(Err(e.to_owned())),
                None => {
                    let (answer, peer) = line.rsplit_once(' ').context("unexpected kpr-client line")?;
                    Ok(Ok((Reply::parse(answer)?, peer.parse()?)))
                }
            })
            .collect()
    }

    pub fn pod_ips(&self) -> Vec<Ipv4Addr> {
        self.pods.iter().map(|p| p.ip).collect()
    }

    pub fn start_daemon(&mut self) -> Result<()> {
        self.start_daemon_with(&[])
    }

    /// Starts the daemon with extra `run` flags.
    pub fn start_daemon_with(&mut self, extra: &[&str]) -> Result<()> {
        let synced_before = self.log().matches("synced").count();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.node().name])
            .arg(kpr_binary()?)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["run", "--interfaces", "eth0,vpod*", "--node-name", NODE_NAME])
            .args(extra);
        // The cluster's cgroup, never the default (the machine's root).
        if !extra.contains(&"--no-socket-lb") {
            command.arg("--socket-lb-cgroup").arg(&self.cgroup().path);
        }
        if self.test_timings {
            command.args(["--min-sync-interval-ms", "20", "--sync-period-s", "5"]);
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
        self.daemon = Some(child);
        // Ready once its maps are pinned and it has synced once (the log
        // holds earlier runs' lines too).
        self.wait_until("the daemon to start", || {
            Ok(self.log().matches("synced").count() > synced_before)
        })
    }

    /// The daemon's pid (`ip netns exec` execs it, so the child is the daemon).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Stops the daemon (SIGTERM) and waits for it; pins stay.
    pub fn stop_daemon(&mut self) -> Result<()> {
        if let Some(mut child) = self.daemon.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes a manifest file atomically, as an editor or `kubectl` would.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        Ok(std::fs::remove_file(self.manifests.join(file))?)
    }

    /// The backends programmed for a frontend, `None` when it is absent.
    pub fn programmed(&self, frontend: SocketAddr, proto: u8) -> Result<Option<Vec<SocketAddr>>> {
        let SocketAddr::V4(v4) = frontend else {
            bail!("IPv4 only")
        };
        let key = ServiceKey::new(*v4.ip(), v4.port(), proto);
        let maps = ServiceMaps::open(&self.pin_dir)?;
        Ok(maps
            .frontends()?
            .into_iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, backends)| backends.iter().map(|b| SocketAddr::from((b.ip(), b.port()))).collect()))
    }

    /// Waits until the frontend has exactly these backends (in any order).
    pub fn wait_for_backends(&self, frontend: SocketAddr, proto: u8, want: &[SocketAddr]) -> Result<()> {
        let mut want = want.to_vec();
        want.sort();
        self.wait_until(&format!("{frontend} to have backends {want:?}"), || {
            Ok(self.programmed(frontend, proto)?.is_some_and(|mut got| {
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
        self.node.take();
        self.cgroup.take();
        self.bpffs.take();
    }
}
