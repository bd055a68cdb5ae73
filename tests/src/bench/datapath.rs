//! Connection rate and latency: four identical namespace clusters (three
//! nginx pods and a client each), one per dataplane — none (direct to a pod
//! IP), kpr, kube-proxy's iptables layout, kube-proxy's nftables layout — so
//! that each keeps its rules loaded while the runs alternate between them.
use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context, Result};
use aya::{
    programs::{tc::SchedClassifierLinkId, SchedClassifier, TcAttachType},
    Ebpf,
};
use proxy_common::{NOOP_PROGRAM, TC_PROGRAM};
use proxy_user::{
    dataplane::{loader, maps::ServiceMaps, socket_lb},
    sync::Syncer,
};

use super::{ab, median, nginx::Nginx, nginx::HTTP_PORT, rules, service_vip, services_desired, BenchConfig};
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
        let dir = cluster
            .pin_dir
            .parent()
            .and_then(|p| p.parent())
            .context("cluster dir")?
            .to_path_buf();
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
        ab::run(&self.cluster.pod(client).ns, cgroup, &url, cfg.requests, cfg.concurrency)
    }

    fn interfaces(&self) -> Result<Vec<String>> {
        self.cluster.node().run(loader::interfaces)
    }
}

const CLIENTS: [&str; 5] = [
    "client-first",
    "client-last",
    "client-podip",
    "client-socket-first",
    "client-socket-last",
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
        node.cluster
            .node()
            .run(|| ifaces.iter().try_for_each(|i| loader::attach(&mut ebpf, &pin_dir, i)))??;
        socket_lb::attach(&mut ebpf, &pin_dir, &node.cluster.cgroup().path)?;
        let mut maps = ServiceMaps::open(&pin_dir)?;
        let syncer = Syncer::recover(&mut maps)?;
        Ok(Kpr { ebpf, maps, syncer })
    }

    fn program(&mut self, n: usize, backends: &[(Ipv4Addr, u16)]) -> Result<()> {
        let report = self.syncer.sync(&services_desired(n, backends), &mut self.maps);
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

fn rule_services(n: usize, backends: &[(Ipv4Addr, u16)]) -> Vec<rules::RuleService> {
    (0..n)
        .map(|i| rules::RuleService {
            name: format!("svc-{i}"),
            vip: service_vip(i),
            port: HTTP_PORT,
            endpoints: backends.to_vec(),
        })
        .collect()
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
    /// Median over rounds of (this run / the direct run of the same round).
    pub ratio: f64,
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

/// One run of one configuration.
#[derive(Clone)]
struct Sample {
    ab: ab::AbResult,
    /// Rate over the direct run's rate in the same round.
    ratio: f64,
    per_packet: Option<f64>,
}

#[derive(Clone, Copy, PartialEq)]
enum Config {
    Direct,
    Floor,
    KprSocketFirst,
    KprSocketLast,
    KprFirst,
    KprLast,
    KprPodIp,
    IptFirst,
    IptLast,
    IptPodIp,
    NftFirst,
    NftLast,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Direct => "direct to pod IP (no proxy)",
            Config::Floor => "direct, empty TC program attached",
            Config::KprSocketFirst => "kpr, first service",
            Config::KprSocketLast => "kpr, last service",
            Config::KprFirst => "kpr TC path only, first service",
            Config::KprLast => "kpr TC path only, last service",
            Config::KprPodIp => "kpr, to a pod IP (no service)",
            Config::IptFirst => "iptables, first service",
            Config::IptLast => "iptables, last service",
            Config::IptPodIp => "iptables, to a pod IP (no service)",
            Config::NftFirst => "nftables, first service",
            Config::NftLast => "nftables, last service",
        }
    }
}

pub fn run(cfg: &BenchConfig, progress: &dyn Fn(&str)) -> Result<Results> {
    progress("connection rate: building four namespace clusters with nginx pods");
    let direct = Node::start()?;
    let kpr_node = Node::start()?;
    let ipt = Node::start()?;
    let nft = Node::start()?;
    let mut kpr = Kpr::attach(&kpr_node)?;
    let scratch = kpr_node
        .cluster
        .pin_dir
        .parent()
        .and_then(|p| p.parent())
        .context("dir")?
        .to_path_buf();
    // Kernel run-time accounting while the fd is open (no global sysctl).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time stats")?;
    let direct_ifaces = direct.interfaces()?;
    kpr.noop()?.load()?;

    let mut results = Results::default();
    let mut sizes: Vec<usize> = cfg.compared_services.clone();
    sizes.extend(cfg.kpr_only_services.iter().copied());
    for &n in &sizes {
        let compared = cfg.compared_services.contains(&n);
        progress(&format!("connection rate: programming {n} services"));
        kpr.program(n, &kpr_node.backends())?;
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
        let configs: Vec<Config> = if compared {
            vec![
                Config::Direct,
                Config::Floor,
                Config::KprSocketFirst,
                Config::KprSocketLast,
                Config::KprFirst,
                Config::KprLast,
                Config::KprPodIp,
                Config::IptFirst,
                Config::IptLast,
                Config::IptPodIp,
                Config::NftFirst,
                Config::NftLast,
            ]
        } else {
            vec![
                Config::Direct,
                Config::KprSocketFirst,
                Config::KprSocketLast,
                Config::KprFirst,
                Config::KprLast,
                Config::KprPodIp,
            ]
        };
        let mut runs: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
        for round in 0..cfg.rounds {
            progress(&format!(
                "connection rate: {n} services, round {}/{}",
                round + 1,
                cfg.rounds
            ));
            let mut direct_rps = 0.0;
            for (c, &config) in configs.iter().enumerate() {
                let (node, target) = match config {
                    Config::Direct | Config::Floor => (&direct, direct.cluster.pods[1].ip),
                    Config::KprFirst | Config::KprSocketFirst => (&kpr_node, service_vip(0)),
                    Config::KprLast | Config::KprSocketLast => (&kpr_node, service_vip(n - 1)),
                    Config::KprPodIp => (&kpr_node, kpr_node.cluster.pods[1].ip),
                    Config::IptFirst => (&ipt, service_vip(0)),
                    Config::IptLast => (&ipt, service_vip(n - 1)),
                    Config::IptPodIp => (&ipt, ipt.cluster.pods[1].ip),
                    Config::NftFirst => (&nft, service_vip(0)),
                    Config::NftLast => (&nft, service_vip(n - 1)),
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
                    Config::KprFirst
                    | Config::KprLast
                    | Config::KprPodIp
                    | Config::KprSocketFirst
                    | Config::KprSocketLast => Some(TC_PROGRAM),
                    _ => None,
                };
                let before = program.map(|p| kpr.kernel_stats(p)).transpose()?;
                let client = match config {
                    Config::KprLast | Config::IptLast | Config::NftLast => CLIENTS[1],
                    Config::KprPodIp | Config::IptPodIp => CLIENTS[2],
                    Config::KprSocketFirst => CLIENTS[3],
                    Config::KprSocketLast => CLIENTS[4],
                    _ => CLIENTS[0],
                };
                let in_cgroup = matches!(config, Config::KprSocketFirst | Config::KprSocketLast);
                let result = node.ab(client, in_cgroup, target, cfg)?;
                let per_packet = match (program, before) {
                    (Some(p), Some((t0, c0))) => {
                        let (t1, c1) = kpr.kernel_stats(p)?;
                        (c1 > c0).then(|| (t1 - t0) as f64 / (c1 - c0) as f64)
                    }
                    _ => None,
                };
                for link in links {
                    kpr.noop()?.detach(link)?;
                }
                if config == Config::Direct {
                    direct_rps = result.requests_per_s;
                }
                let ratio = if direct_rps > 0.0 {
                    result.requests_per_s / direct_rps
                } else {
                    0.0
                };
                runs[c].push(Sample {
                    ab: result,
                    ratio,
                    per_packet,
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
