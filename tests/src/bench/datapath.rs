//! Connection rate and latency: identical namespace clusters (three nginx
//! pods and clients each), one per dataplane — none (direct to a pod IP),
//! kpr, kube-proxy's iptables layout, kube-proxy's nftables layout — so that
//! each keeps its rules loaded while the runs alternate between them. kpr
//! has two: one whose pods reach services only through the socket-level
//! balancer, and one whose backends also serve connections the TC program
//! translates (clients the socket hooks do not see), since replies from
//! such a backend are looked up in conntrack.
use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context, Result};
use aya::{
    programs::{tc::SchedClassifierLinkId, SchedClassifier, TcAttachType},
    Ebpf,
};
use proxy_common::{NOOP_PROGRAM, TC_PROGRAM};
use proxy_user::{
    dataplane::{loader, maps::ServiceMaps, socket_lb},
    model::Frontend,
    sync::Syncer,
};

use super::{
    ab, median, median_ci, nginx::Nginx, nginx::HTTP_PORT, quiet, range, rules, service_vip, services_desired,
    BenchConfig,
};
use crate::{sh, Cluster, ClusterSpec};

/// A cluster with nginx in its three backend pods.
struct Node {
    cluster: Cluster,
    _nginx: Vec<Nginx>,
}

impl Node {
    fn start() -> Result<Self> {
        let mut spec = ClusterSpec::pods("nginx", 3).without_daemon();
        // One client per configuration: connections of two configurations
        // reaching the same nginx from the same client address could reuse a
        // tuple still in nginx's TIME_WAIT with other TCP timestamps (they are
        // offset per destination), get PAWS-rejected and wait out a 1 s SYN
        // retransmit: an artifact of the benchmark, not of any dataplane.
        spec.pods.extend(CLIENTS.iter().map(|c| c.to_string()));
        let cluster = Cluster::start(spec)?;
        let dir = cluster.dir();
        let nginx = (0..3)
            .map(|i| Nginx::start(&cluster.pods[i].ns, &cluster.pods[i].name, &dir))
            .collect::<Result<Vec<_>>>()?;
        Ok(Node { cluster, _nginx: nginx })
    }

    fn backends(&self) -> Vec<(Ipv4Addr, u16)> {
        self.cluster.pods[..3].iter().map(|p| (p.ip, HTTP_PORT)).collect()
    }

    /// `ab` from a client pod; `in_cgroup` makes it a process of the
    /// cluster's cgroup, where kpr's socket-level balancer (if attached)
    /// acts.
    fn ab(&self, client: &str, in_cgroup: bool, target: Ipv4Addr, cfg: &BenchConfig) -> Result<ab::AbResult> {
        let url = format!("http://{target}:{HTTP_PORT}/");
        let cgroup = in_cgroup.then(|| self.cluster.cgroup());
        ab::run(
            &self.cluster.pod(client).ns,
            cgroup,
            &url,
            cfg.requests,
            cfg.concurrency,
        )
    }

    fn interfaces(&self) -> Result<Vec<String>> {
        self.cluster.node().run(loader::interfaces)
    }
}

/// One client pod per configuration of a cluster (see `Config::client`).
const CLIENTS: [&str; 7] = [
    "client-0", "client-1", "client-2", "client-3", "client-4", "client-5", "client-6",
];

/// kpr's programs loaded and attached to a node, and its maps.
struct Kpr {
    ebpf: Ebpf,
    maps: ServiceMaps,
    syncer: Syncer,
}

impl Kpr {
    fn attach(node: &Node) -> Result<Self> {
        let pin_dir = node.cluster.pin_dir.clone();
        let mut ebpf = loader::load(&pin_dir)?;
        let ifaces = node.interfaces()?;
        node.cluster.node().run(|| {
            ifaces
                .iter()
                .try_for_each(|i| loader::attach(&mut ebpf, &pin_dir, i, loader::Role::Pods))
        })??;
        socket_lb::attach(&mut ebpf, &pin_dir, &node.cluster.cgroup().path)?;
        let mut maps = ServiceMaps::open(&pin_dir)?;
        let syncer = Syncer::recover(&mut maps)?;
        Ok(Kpr { ebpf, maps, syncer })
    }

    fn program(&mut self, n: usize, backends: &[(Ipv4Addr, u16)]) -> Result<()> {
        let mut desired = services_desired(n, backends);
        // The single-endpoint service: `services_desired` shifted to its address.
        let (frontend, mut state) = services_desired(1, &backends[1..2])
            .frontends
            .pop_first()
            .context("one service")?;
        state.service.name = "svc-one".into();
        desired.frontends.insert(
            Frontend {
                ip: one_endpoint_vip(n),
                ..frontend
            },
            state,
        );
        let report = self.syncer.sync(&desired, &mut self.maps);
        anyhow::ensure!(report.failures.is_empty(), "{:?}", report.failures);
        Ok(())
    }

    /// (run time, run count) the kernel accounted to a program so far.
    fn kernel_stats(&self, program: &str) -> Result<(u64, u64)> {
        let info = self.ebpf.program(program).context("program")?.info()?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }

    fn noop(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(NOOP_PROGRAM)
            .context("no noop program")?
            .try_into()?)
    }
}

/// The service with a single endpoint (the pod the direct runs hit), after
/// the `n` others: last in kube-proxy's iptables chain.
fn one_endpoint_vip(n: usize) -> Ipv4Addr {
    service_vip(n)
}

fn rule_services(n: usize, backends: &[(Ipv4Addr, u16)]) -> Vec<rules::RuleService> {
    let mut services: Vec<rules::RuleService> = (0..n)
        .map(|i| rules::RuleService::cluster_ip(format!("svc-{i}"), service_vip(i), HTTP_PORT, backends.to_vec()))
        .collect();
    services.push(rules::RuleService::cluster_ip(
        "svc-one".into(),
        one_endpoint_vip(n),
        HTTP_PORT,
        backends[1..2].to_vec(),
    ));
    services
}

/// Loads a ruleset into a node's namespace, returning the seconds it took.
pub fn load_rules(ns: &str, tool: &str, args: &[&str], script: &str, dir: &std::path::Path) -> Result<f64> {
    let file = dir.join(format!("{tool}.rules"));
    std::fs::write(&file, script)?;
    let started = Instant::now();
    let file = file.to_str().context("utf-8 path")?;
    let mut all = vec!["netns", "exec", ns, tool];
    all.extend_from_slice(args);
    all.push(file);
    sh("ip", &all)?;
    Ok(started.elapsed().as_secs_f64())
}

#[derive(Clone, Debug)]
pub struct Row {
    pub services: usize,
    pub config: String,
    pub requests_per_s: f64,
    /// Median over rounds of (this run / the mean of the direct runs just
    /// before and just after it).
    pub ratio: f64,
    /// Lowest and highest ratio over the rounds.
    pub ratio_range: (f64, f64),
    /// The median ratio's 95% confidence interval (`median_ci`).
    pub ratio_ci: (f64, f64),
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: u64,
    pub load_tool_cpu: f64,
    /// Kernel-accounted ns per program run during these runs (kpr and the floor).
    pub ns_per_packet: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Results {
    pub rows: Vec<Row>,
    /// (services, iptables-restore seconds, nft -f seconds) for the runs' rulesets.
    pub rule_loads: Vec<(usize, f64, f64)>,
}

impl Results {
    /// The row with the lowest rate ratio among configurations whose label
    /// starts with one of `prefixes`.
    pub fn worst(&self, prefixes: &[&str]) -> Option<&Row> {
        self.rows
            .iter()
            .filter(|r| prefixes.iter().any(|p| r.config.starts_with(p)))
            .min_by(|a, b| a.ratio.total_cmp(&b.ratio))
    }
}

/// One run of one configuration.
#[derive(Clone)]
struct Sample {
    ab: ab::AbResult,
    /// Rate over the mean rate of the direct runs on either side.
    ratio: f64,
    per_packet: Option<f64>,
}

/// The baseline's row.
pub const DIRECT_LABEL: &str = "direct to pod IP (no proxy)";

#[derive(Clone, Copy, PartialEq)]
enum Config {
    /// The baseline, run before the first configuration of a round and
    /// after every configuration: each is compared with the direct runs on
    /// either side of it, so that the machine's drift over a round (this
    /// VM's shared cores) cancels out.
    Direct,
    Floor,
    KprSocketOne,
    KprSocketFirst,
    KprSocketLast,
    KprSocketMixed,
    KprOne,
    KprFirst,
    KprLast,
    KprPodIp,
    IptOne,
    IptFirst,
    IptLast,
    IptPodIp,
    NftOne,
    NftFirst,
    NftLast,
}

/// Which service (or pod) a configuration's client connects to.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    /// The single-endpoint service; its endpoint is the pod the direct runs hit.
    OneEndpoint,
    First,
    Last,
    PodIp,
}

impl Config {
    /// What runs between the direct runs, in this order in even rounds and
    /// reversed in odd ones.
    const COMPARED: [Config; 16] = [
        Config::Floor,
        Config::KprSocketOne,
        Config::KprSocketFirst,
        Config::KprSocketLast,
        Config::KprSocketMixed,
        Config::KprOne,
        Config::KprFirst,
        Config::KprLast,
        Config::KprPodIp,
        Config::IptOne,
        Config::IptFirst,
        Config::IptLast,
        Config::IptPodIp,
        Config::NftOne,
        Config::NftFirst,
        Config::NftLast,
    ];

    fn label(self) -> &'static str {
        match self {
            Config::Direct => DIRECT_LABEL,
            Config::Floor => "direct, empty TC program attached",
            Config::KprSocketOne => "kpr, one-endpoint service",
            Config::KprSocketFirst => "kpr, first service",
            Config::KprSocketLast => "kpr, last service",
            Config::KprSocketMixed => "kpr mixed node, one-endpoint service (its backend also serves TC-path flows)",
            Config::KprOne => "kpr TC path only, one-endpoint service",
            Config::KprFirst => "kpr TC path only, first service",
            Config::KprLast => "kpr TC path only, last service",
            Config::KprPodIp => "kpr, to a pod IP (no service)",
            Config::IptOne => "iptables, one-endpoint service",
            Config::IptFirst => "iptables, first service",
            Config::IptLast => "iptables, last service",
            Config::IptPodIp => "iptables, to a pod IP (no service)",
            Config::NftOne => "nftables, one-endpoint service",
            Config::NftFirst => "nftables, first service",
            Config::NftLast => "nftables, last service",
        }
    }

    fn target(self) -> Target {
        match self {
            Config::KprSocketOne | Config::KprSocketMixed | Config::KprOne | Config::IptOne | Config::NftOne => {
                Target::OneEndpoint
            }
            Config::KprSocketFirst | Config::KprFirst | Config::IptFirst | Config::NftFirst => Target::First,
            Config::KprSocketLast | Config::KprLast | Config::IptLast | Config::NftLast => Target::Last,
            Config::Direct | Config::Floor | Config::KprPodIp | Config::IptPodIp => Target::PodIp,
        }
    }

    fn is_kpr(self) -> bool {
        self.label().starts_with("kpr")
    }

    /// Whether the client runs in the cgroup of kpr's socket-level hooks.
    fn socket_lb(self) -> bool {
        matches!(
            self,
            Config::KprSocketOne | Config::KprSocketFirst | Config::KprSocketLast | Config::KprSocketMixed
        )
    }

    /// Whether it runs on the kpr cluster whose backends also serve flows
    /// the TC program translates.
    fn on_tc_cluster(self) -> bool {
        matches!(
            self,
            Config::KprOne | Config::KprFirst | Config::KprLast | Config::KprSocketMixed
        )
    }

    /// A client pod of its own within its cluster: connections of two
    /// configurations from one client to one nginx could reuse a tuple
    /// still in TIME_WAIT (see `Node::start`).
    fn client(self) -> &'static str {
        let index = match (self.target(), self.socket_lb()) {
            (Target::PodIp, _) => 0,
            (Target::OneEndpoint, false) => 1,
            (Target::First, false) => 2,
            (Target::Last, false) => 3,
            (Target::OneEndpoint, true) => 4,
            (Target::First, true) => 5,
            (Target::Last, true) => 6,
        };
        CLIENTS[index]
    }
}

pub fn run(cfg: &BenchConfig, progress: &dyn Fn(&str)) -> Result<Results> {
    progress("connection rate: building five namespace clusters with nginx pods");
    let direct = Node::start()?;
    let kpr_node = Node::start()?;
    let kpr_tc_node = Node::start()?;
    let ipt = Node::start()?;
    let nft = Node::start()?;
    let mut kpr = Kpr::attach(&kpr_node)?;
    let mut kpr_tc = Kpr::attach(&kpr_tc_node)?;
    let scratch = kpr_node.cluster.dir();
    let direct_ifaces = direct.interfaces()?;
    kpr.noop()?.load()?;

    let mut results = Results::default();
    let mut sizes: Vec<usize> = cfg.compared_services.clone();
    sizes.extend(cfg.kpr_only_services.iter().copied());
    for &n in &sizes {
        let compared = cfg.compared_services.contains(&n);
        progress(&format!("connection rate: programming {n} services"));
        kpr.program(n, &kpr_node.backends())?;
        kpr_tc.program(n, &kpr_tc_node.backends())?;
        if compared {
            let ipt_s = load_rules(
                &ipt.cluster.node().name,
                "iptables-restore",
                &[],
                &rules::iptables_restore(&rule_services(n, &ipt.backends())),
                &scratch,
            )?;
            sh(
                "ip",
                &["netns", "exec", &nft.cluster.node().name, "nft", "flush", "ruleset"],
            )?;
            let nft_s = load_rules(
                &nft.cluster.node().name,
                "nft",
                &["-f"],
                &rules::nft_script(&rule_services(n, &nft.backends())),
                &scratch,
            )?;
            results.rule_loads.push((n, ipt_s, nft_s));
        }
        let configs: Vec<Config> = std::iter::once(Config::Direct)
            .chain(Config::COMPARED.into_iter().filter(|c| compared || c.is_kpr()))
            .collect();
        let mut runs: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
        // Loading rules and maps for this size leaves work behind.
        quiet::settle(progress);
        for round in 0..cfg.rounds {
            progress(&format!(
                "connection rate: {n} services, round {}/{}",
                round + 1,
                cfg.rounds
            ));
            // The kernel's run-time accounting costs two clock reads per
            // program run, which only the rows with a program would pay: it
            // is on (while the fd is open; no global sysctl) in the last
            // round only, which alone gives ns/packet.
            let _stats = (round + 1 == cfg.rounds)
                .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
                .transpose()
                .context("enabling BPF run-time stats")?;
            let mut order: Vec<usize> = (1..configs.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            let mut measure = |config: Config| -> Result<(ab::AbResult, Option<f64>)> {
                let node = match config {
                    Config::Direct | Config::Floor => &direct,
                    c if c.on_tc_cluster() => &kpr_tc_node,
                    c if c.is_kpr() => &kpr_node,
                    Config::IptOne | Config::IptFirst | Config::IptLast | Config::IptPodIp => &ipt,
                    _ => &nft,
                };
                let target = match config.target() {
                    Target::OneEndpoint => one_endpoint_vip(n),
                    Target::First => service_vip(0),
                    Target::Last => service_vip(n - 1),
                    Target::PodIp => node.cluster.pods[1].ip,
                };
                let mut links: Vec<SchedClassifierLinkId> = Vec::new();
                if config == Config::Floor {
                    let noop = kpr.noop()?;
                    links = direct.cluster.node().run(|| {
                        direct_ifaces
                            .iter()
                            .map(|i| noop.attach(i, TcAttachType::Ingress))
                            .collect::<Result<Vec<_>, _>>()
                    })??;
                }
                let program = match config {
                    Config::Floor => Some(NOOP_PROGRAM),
                    c if c.is_kpr() => Some(TC_PROGRAM),
                    _ => None,
                };
                let accounted = if config.on_tc_cluster() { &kpr_tc } else { &kpr };
                let before = program.map(|p| accounted.kernel_stats(p)).transpose()?;
                // Every run from an empty flow table: no connection finds a
                // backend chosen in an earlier run.
                if config.is_kpr() {
                    super::empty_kpr_flow_table(&node.cluster.pin_dir)?;
                } else if config != Config::Direct && config != Config::Floor {
                    super::empty_netfilter_flow_table(&node.cluster.node().name)?;
                }
                let result = {
                    let _profile = super::Profile::start(&format!("clusterip-{n}-round{round}-{}", config.label()))?;
                    node.ab(config.client(), config.socket_lb(), target, cfg)?
                };
                let per_packet = match (program, before) {
                    (Some(p), Some((t0, c0))) => {
                        let (t1, c1) = accounted.kernel_stats(p)?;
                        (c1 > c0).then(|| (t1 - t0) as f64 / (c1 - c0) as f64)
                    }
                    _ => None,
                };
                for link in links {
                    kpr.noop()?.detach(link)?;
                }
                Ok((result, per_packet))
            };
            let mut directs = vec![measure(Config::Direct)?.0];
            let mut measured = Vec::with_capacity(order.len());
            for &c in &order {
                measured.push((c, measure(configs[c])?));
                directs.push(measure(Config::Direct)?.0);
            }
            let around = |i: usize| (directs[i].requests_per_s + directs[i + 1].requests_per_s) / 2.0;
            for (i, (c, (result, per_packet))) in measured.into_iter().enumerate() {
                runs[c].push(Sample {
                    ratio: result.requests_per_s / around(i),
                    ab: result,
                    per_packet,
                });
            }
            // The baseline against its own neighbours: the noise floor.
            for i in 1..directs.len() - 1 {
                runs[0].push(Sample {
                    ratio: directs[i].requests_per_s
                        / ((directs[i - 1].requests_per_s + directs[i + 1].requests_per_s) / 2.0),
                    ab: directs[i],
                    per_packet: None,
                });
            }
        }
        for (c, config) in configs.iter().enumerate() {
            let r = &runs[c];
            let pick = |f: &dyn Fn(&Sample) -> f64| median(r.iter().map(f).collect());
            let per_packet: Vec<f64> = r.iter().filter_map(|x| x.per_packet).collect();
            results.rows.push(Row {
                services: n,
                config: config.label().to_string(),
                requests_per_s: pick(&|x| x.ab.requests_per_s),
                ratio: pick(&|x| x.ratio),
                ratio_range: range(r.iter().map(|x| x.ratio)),
                ratio_ci: median_ci(&r.iter().map(|x| x.ratio).collect::<Vec<_>>()),
                mean_ms: pick(&|x| x.ab.mean_ms),
                p50_ms: pick(&|x| x.ab.p50_ms),
                p99_ms: pick(&|x| x.ab.p99_ms),
                failed: r.iter().map(|x| x.ab.failed).sum(),
                load_tool_cpu: pick(&|x| x.ab.load_tool_cpu),
                ns_per_packet: (!per_packet.is_empty()).then(|| median(per_packet)),
            });
        }
    }
    Ok(results)
}
