//! The external path: a client outside the cluster reaching NodePorts and a
//! load balancer IP of a two-node namespace cluster, one cluster per
//! dataplane — none (the client routed to the pod through the node), kpr
//! with XDP, kpr with its TC program only, kube-proxy's iptables layout and
//! its nftables layout — so that each keeps its state while the runs
//! alternate between them. kpr is the release daemon (`kpr run`), fed the
//! Services as manifests, as users run it.
//!
//! Measured: the connection rate (`ab`) to an externalTrafficPolicy Local
//! NodePort whose three endpoints are on the receiving node, and to a
//! Cluster NodePort whose endpoint is on the other node (source NAT), each
//! against direct access to the same pods; the rate of small UDP packets a
//! packet generator (`trafgen`) gets delivered to the pods through a UDP
//! NodePort; and the rate at which packets from a source outside a load
//! balancer's `loadBalancerSourceRanges` are dropped.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use proxy_common::{Stat, IPPROTO_TCP};
use proxy_user::dataplane::maps::read_stats;

use super::{
    ab,
    datapath::load_rules,
    median, median_ci,
    nginx::{Nginx, HTTP_PORT},
    pin_thread, quiet, range, rules, service_vip, BenchConfig, Cpu,
};
use crate::{
    cluster::{node_ip, node_name, OUTSIDE_IP},
    manifests::{self, Endpoint, Exposure},
    netns::Netns,
    sh, Cluster, ClusterSpec,
};

/// externalTrafficPolicy Local; its three endpoints on the receiving node.
const LOCAL_NODE_PORT: u16 = 30080;
/// externalTrafficPolicy Cluster; its endpoint on the other node.
const REMOTE_NODE_PORT: u16 = 30081;
/// UDP, externalTrafficPolicy Local, to the pods' discard port.
const UDP_NODE_PORT: u16 = 30053;
/// UDP, externalTrafficPolicy Cluster, to the other node's pod: what the
/// node forwards (with source NAT) rather than delivers.
const UDP_REMOTE_NODE_PORT: u16 = 30054;
const DISCARD_PORT: u16 = 9;
/// The UDP service's load balancer IP, admitting only `ADMITTED_RANGE`
/// (the outside client is not in it).
const DENIED_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const ADMITTED_RANGE: &str = "203.0.113.0/24";
/// The outside host's second address, for a kpr cluster's runs to a pod IP.
const POD_IP_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 101);
/// Distinct flows of the packet-rate runs (source ports counted up).
pub const FLOW_COUNTS: [u32; 2] = [1, 1000];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dataplane {
    Direct,
    KprXdp,
    KprTc,
    Iptables,
    Nftables,
}

impl Dataplane {
    pub const ALL: [Dataplane; 5] = [
        Dataplane::Direct,
        Dataplane::KprXdp,
        Dataplane::KprTc,
        Dataplane::Iptables,
        Dataplane::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Dataplane::Direct => "direct to the pod (routed through the node, no proxy)",
            Dataplane::KprXdp => "kpr, XDP",
            Dataplane::KprTc => "kpr, TC only",
            Dataplane::Iptables => "iptables",
            Dataplane::Nftables => "nftables",
        }
    }

    fn is_kpr(self) -> bool {
        matches!(self, Dataplane::KprXdp | Dataplane::KprTc)
    }
}

/// Which pods a run reaches, and so which direct runs it is compared with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reach {
    /// The receiving node's pods.
    Local,
    /// The other node's pod.
    Remote,
}

/// One cluster with its dataplane, its servers and its sinks.
struct Site {
    dataplane: Dataplane,
    cluster: Cluster,
    scratch: PathBuf,
    _nginx: Vec<Nginx>,
    /// Bound, never read: datagrams to the discard port are taken in (and
    /// dropped when the buffer is full) rather than answered with ICMP.
    _sinks: Vec<UdpSocket>,
    daemon_started: bool,
}

/// The pods on the receiving node and the one on the other node.
const LOCAL_PODS: usize = 3;

impl Site {
    fn start(dataplane: Dataplane) -> Result<Self> {
        // The daemon's own timings, as users run it.
        let spec = ClusterSpec::pods("web", LOCAL_PODS)
            .with_node(&["remote-0"])
            .without_daemon()
            .with_default_timings();
        let mut cluster = Cluster::start(spec)?;
        let scratch = cluster.dir();
        let nginx = cluster
            .pods
            .iter()
            .map(|p| Nginx::start(&p.ns, &p.name, &scratch))
            .collect::<Result<Vec<_>>>()?;
        let sinks = cluster
            .pods
            .iter()
            .map(|p| -> Result<UdpSocket> { Ok(p.ns.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, DISCARD_PORT)))??) })
            .collect::<Result<Vec<_>>>()?;
        // The direct runs reach the pods through the receiving node, as the
        // proxied ones do; so does the load balancer IP.
        cluster.route_from_outside(cluster.pods[1].ip, 0)?;
        if dataplane.is_kpr() {
            // This cluster's runs to the pod IP come from an address of
            // their own: with a Local policy the pods see the NodePort
            // runs' clients as they are, and the two runs' source ports,
            // drawn for different destinations, would meet in the pods'
            // TIME_WAIT (a refused SYN costs the client a retry): an
            // artifact of the benchmark, not of any dataplane.
            cluster
                .outside()
                .ip(&["addr", "add", &format!("{POD_IP_CLIENT}/24"), "dev", "eth0"])?;
            let pod = cluster.pods[1].ip.to_string();
            let via = node_ip(0).to_string();
            let src = POD_IP_CLIENT.to_string();
            cluster
                .outside()
                .ip(&["route", "replace", &pod, "via", &via, "src", &src])?;
        }
        cluster.route_from_outside(cluster.pods[LOCAL_PODS].ip, 0)?;
        cluster.route_from_outside(DENIED_LB_IP, 0)?;
        // The outside host fills in its checksums, as a NIC's wire carries
        // them (a veth passes partial ones, which XDP cannot fix up); in
        // every configuration alike.
        cluster.outside().send_full_checksums("eth0")?;
        // The LAN hands the nodes bare frames, as a NIC does, for every
        // dataplane alike: a veth would hand an XDP program an skb to copy
        // first, a cost of the test bed that no NIC has (and, paid on the
        // LAN's ports too, one that fell on the XDP configuration alone).
        let own_xdp: &[usize] = if dataplane == Dataplane::KprXdp { &[0] } else { &[] };
        cluster.switch_lan_by_xdp(own_xdp)?;
        let mut site = Site {
            dataplane,
            cluster,
            scratch,
            _nginx: nginx,
            _sinks: sinks,
            daemon_started: false,
        };
        site.program(0)?;
        match dataplane {
            Dataplane::KprXdp => site.cluster.start_daemon_on(0, &["--xdp", "native"])?,
            Dataplane::KprTc => site.cluster.start_daemon_on(0, &["--xdp", "off"])?,
            _ => {}
        }
        site.daemon_started = dataplane.is_kpr();
        // The receiving node gets a core of its own, as a machine of its
        // own would: what its interface takes in is processed in NAPI
        // threads on the servers' core; what it sends onto the LAN (and so
        // the LAN, the other node and the outside host) is processed on the
        // client's. Its core's busy time is then the node's cost alone.
        for (ns, iface, cpu) in [
            (site.cluster.node(), "eth0", Cpu::Servers),
            (site.cluster.lan(), "n0", Cpu::Client),
        ] {
            for tid in ns.thread_napi(iface)? {
                pin_thread(tid, cpu)?;
            }
        }
        Ok(site)
    }

    fn local_pods(&self) -> Vec<Ipv4Addr> {
        self.cluster.pods[..LOCAL_PODS].iter().map(|p| p.ip).collect()
    }

    fn remote_pod(&self) -> Ipv4Addr {
        self.cluster.pods[LOCAL_PODS].ip
    }

    /// `n` ClusterIP services (three endpoints each, on the receiving node)
    /// besides the measured ones, in the dataplane's own form.
    fn program(&mut self, n: usize) -> Result<()> {
        let local: Vec<(Ipv4Addr, u16)> = self.local_pods().into_iter().map(|ip| (ip, HTTP_PORT)).collect();
        let remote = vec![(self.remote_pod(), HTTP_PORT)];
        let discard: Vec<(Ipv4Addr, u16)> = self.local_pods().into_iter().map(|ip| (ip, DISCARD_PORT)).collect();
        match self.dataplane {
            Dataplane::Direct => Ok(()),
            Dataplane::KprXdp | Dataplane::KprTc => self.write_manifests(n),
            Dataplane::Iptables | Dataplane::Nftables => {
                let mut services: Vec<rules::RuleService> = (0..n)
                    .map(|i| {
                        rules::RuleService::cluster_ip(format!("svc-{i}"), service_vip(i), HTTP_PORT, local.clone())
                    })
                    .collect();
                let ext = |name: &str, vip, port, protocol, endpoints: &[(Ipv4Addr, u16)], node_port, local: bool| {
                    let mut svc = rules::RuleService::cluster_ip(name.into(), vip, port, endpoints.to_vec());
                    svc.protocol = protocol;
                    svc.node_port = Some(node_port);
                    svc.local_endpoints = local.then(|| endpoints.to_vec());
                    svc
                };
                services.push(ext(
                    "ext-local",
                    service_vip(n),
                    HTTP_PORT,
                    "tcp",
                    &local,
                    LOCAL_NODE_PORT,
                    true,
                ));
                services.push(ext(
                    "ext-remote",
                    service_vip(n + 1),
                    HTTP_PORT,
                    "tcp",
                    &remote,
                    REMOTE_NODE_PORT,
                    false,
                ));
                let mut udp = ext(
                    "ext-udp",
                    service_vip(n + 2),
                    DISCARD_PORT,
                    "udp",
                    &discard,
                    UDP_NODE_PORT,
                    true,
                );
                udp.load_balancer_ip = Some(DENIED_LB_IP);
                udp.source_ranges = vec![ADMITTED_RANGE.into()];
                services.push(udp);
                services.push(ext(
                    "ext-udp-remote",
                    service_vip(n + 3),
                    DISCARD_PORT,
                    "udp",
                    &[(self.remote_pod(), DISCARD_PORT)],
                    UDP_REMOTE_NODE_PORT,
                    false,
                ));
                let node = self.cluster.node().name.clone();
                if self.dataplane == Dataplane::Iptables {
                    load_rules(
                        &node,
                        "iptables-restore",
                        &[],
                        &rules::iptables_restore(&services),
                        &self.scratch,
                    )?;
                } else {
                    sh("ip", &["netns", "exec", &node, "nft", "flush", "ruleset"])?;
                    load_rules(&node, "nft", &["-f"], &rules::nft_script(&services), &self.scratch)?;
                }
                Ok(())
            }
        }
    }

    /// The same services as manifests for kpr's daemon, which it picks up
    /// on its own; returns once the last of them is in its maps.
    fn write_manifests(&self, n: usize) -> Result<()> {
        let on_node = |ips: &[Ipv4Addr], node: usize| -> Vec<Endpoint> {
            ips.iter().map(|&ip| Endpoint::ready(ip).on(&node_name(node))).collect()
        };
        let local = on_node(&self.local_pods(), 0);
        let http = [manifests::tcp("http", HTTP_PORT)];
        let mut yaml = String::with_capacity(n * 1200);
        for i in 0..n {
            yaml.push_str(&manifests::service_with_endpoints(
                &format!("svc-{i}"),
                service_vip(i),
                &http,
                HTTP_PORT,
                &local,
            ));
            yaml.push_str("---\n");
        }
        let exposed =
            |name: &str, vip, ports: &[manifests::Port], exposure: &Exposure, target, endpoints: &[Endpoint]| {
                manifests::exposed_service_with_endpoints(name, vip, ports, exposure, target, endpoints)
            };
        yaml.push_str(&exposed(
            "ext-local",
            service_vip(n),
            &http,
            &Exposure {
                type_: Some("NodePort"),
                node_ports: &[LOCAL_NODE_PORT],
                local: true,
                ..Default::default()
            },
            HTTP_PORT,
            &local,
        ));
        yaml.push_str("---\n");
        yaml.push_str(&exposed(
            "ext-remote",
            service_vip(n + 1),
            &http,
            &Exposure {
                type_: Some("NodePort"),
                node_ports: &[REMOTE_NODE_PORT],
                ..Default::default()
            },
            HTTP_PORT,
            &on_node(&[self.remote_pod()], 1),
        ));
        yaml.push_str("---\n");
        yaml.push_str(&exposed(
            "ext-udp",
            service_vip(n + 2),
            &[manifests::udp("discard", DISCARD_PORT)],
            &Exposure {
                type_: Some("LoadBalancer"),
                node_ports: &[UDP_NODE_PORT],
                local: true,
                ingress_ips: &[DENIED_LB_IP],
                source_ranges: &[ADMITTED_RANGE],
                ..Default::default()
            },
            DISCARD_PORT,
            &local,
        ));
        yaml.push_str("---\n");
        yaml.push_str(&exposed(
            "ext-udp-remote",
            service_vip(n + 3),
            &[manifests::udp("discard", DISCARD_PORT)],
            &Exposure {
                type_: Some("NodePort"),
                node_ports: &[UDP_REMOTE_NODE_PORT],
                ..Default::default()
            },
            DISCARD_PORT,
            &on_node(&[self.remote_pod()], 1),
        ));
        // Whole or not at all: the daemon polls the directory.
        let staged = self.scratch.join("services.yaml.staged");
        std::fs::write(&staged, yaml)?;
        std::fs::rename(&staged, self.cluster.manifests.join("services.yaml"))?;
        if !self.daemon_started {
            return Ok(());
        }
        let last = SocketAddr::from((service_vip(n + 1), HTTP_PORT));
        let want = [SocketAddr::from((self.remote_pod(), HTTP_PORT))];
        self.cluster.wait_until_within(
            &format!("kpr to program {n} services"),
            Duration::from_secs(900),
            || Ok(self.cluster.programmed_on(0, last, IPPROTO_TCP)?.as_deref() == Some(&want[..])),
        )
    }

    /// Forgets every tracked flow, so that a run's connections all start
    /// from an empty table (netfilter's for kube-proxy's layouts).
    fn empty_flow_table(&self) -> Result<()> {
        if self.dataplane.is_kpr() {
            super::empty_kpr_flow_table(&self.cluster.nodes[0].pin_dir)?;
        } else if matches!(self.dataplane, Dataplane::Iptables | Dataplane::Nftables) {
            super::empty_netfilter_flow_table(&self.cluster.node().name)?;
        }
        Ok(())
    }

    /// `run` names the run (for `super::Profile`).
    fn ab(&self, target: SocketAddr, cfg: &BenchConfig, run: &str) -> Result<ab::AbResult> {
        self.empty_flow_table()?;
        let url = format!("http://{target}/");
        let _profile = super::Profile::start(run)?;
        ab::run(
            self.cluster.outside(),
            None,
            &url,
            cfg.external_requests,
            cfg.concurrency,
        )
    }
}

/// A configuration of the connection-rate runs.
#[derive(Clone, Copy)]
struct Run {
    site: usize,
    reach: Reach,
    /// To the pod's own address (through the node's hooks), not a NodePort.
    pod_ip: bool,
}

impl Run {
    fn label(self, sites: &[Site]) -> String {
        let dataplane = sites[self.site].dataplane;
        if dataplane == Dataplane::Direct {
            return format!(
                "{} {}",
                dataplane.label(),
                match self.reach {
                    Reach::Local => "on the receiving node",
                    Reach::Remote => "on the other node",
                }
            );
        }
        let what = match (self.reach, self.pod_ip) {
            (Reach::Local, false) => "NodePort, Local policy, 3 endpoints on the receiving node",
            (Reach::Remote, false) => "NodePort, Cluster policy, endpoint on the other node (SNAT)",
            (_, true) => "to the pod IP (no service: the hooks' own cost)",
        };
        format!("{}: {what}", dataplane.label())
    }

    fn target(self, sites: &[Site]) -> SocketAddr {
        let site = &sites[self.site];
        match (site.dataplane, self.reach, self.pod_ip) {
            (Dataplane::Direct, Reach::Local, _) | (_, Reach::Local, true) => (site.local_pods()[1], HTTP_PORT).into(),
            (Dataplane::Direct, Reach::Remote, _) | (_, Reach::Remote, true) => (site.remote_pod(), HTTP_PORT).into(),
            (_, Reach::Local, false) => (node_ip(0), LOCAL_NODE_PORT).into(),
            (_, Reach::Remote, false) => (node_ip(0), REMOTE_NODE_PORT).into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RateRow {
    pub services: usize,
    pub config: String,
    pub dataplane: &'static str,
    pub remote: bool,
    pub pod_ip: bool,
    pub requests_per_s: f64,
    pub ratio: f64,
    pub ratio_range: (f64, f64),
    /// The median ratio's 95% confidence interval (`median_ci`).
    pub ratio_ci: (f64, f64),
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: u64,
}

#[derive(Clone, Debug)]
pub struct PacketRow {
    pub dataplane: &'static str,
    /// To the other node's pod (forwarded, source NAT), not the receiving
    /// node's.
    pub remote: bool,
    pub flows: u32,
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub cost: Cost,
    pub ratio: f64,
    pub ratio_range: (f64, f64),
}

#[derive(Clone, Debug)]
pub struct DropRow {
    pub dataplane: &'static str,
    pub offered_pps: f64,
    pub dropped_pps: f64,
    pub cost: Cost,
    pub dropped_range: (f64, f64),
}

#[derive(Debug, Default)]
pub struct Results {
    pub rates: Vec<RateRow>,
    /// At this many services.
    pub packet_services: usize,
    pub packets: Vec<PacketRow>,
    pub drops: Vec<DropRow>,
}

impl Results {
    pub fn rate(&self, services: usize, dataplane: Dataplane, remote: bool) -> Option<&RateRow> {
        self.rates
            .iter()
            .find(|r| r.services == services && r.dataplane == dataplane.label() && r.remote == remote && !r.pod_ip)
    }
}

pub fn run(cfg: &BenchConfig, progress: &dyn Fn(&str)) -> Result<Results> {
    progress("external path: building a two-node cluster per dataplane");
    let mut sites = Dataplane::ALL
        .into_iter()
        .map(Site::start)
        .collect::<Result<Vec<_>>>()?;
    let mut results = Results::default();
    let mut sizes: Vec<usize> = cfg.compared_services.clone();
    sizes.extend(cfg.kpr_only_services.iter().copied());
    for &n in &sizes {
        let compared = cfg.compared_services.contains(&n);
        progress(&format!("external path: programming {n} services"));
        for site in sites.iter_mut().filter(|s| compared || s.dataplane.is_kpr()) {
            site.program(n)?;
        }
        quiet::settle(progress);
        for reach in [Reach::Local, Reach::Remote] {
            let direct = Run {
                site: 0,
                reach,
                pod_ip: false,
            };
            let mut runs: Vec<Run> = Vec::new();
            for (i, site) in sites.iter().enumerate().skip(1) {
                if !compared && !site.dataplane.is_kpr() {
                    continue;
                }
                runs.push(Run {
                    site: i,
                    reach,
                    pod_ip: false,
                });
                if site.dataplane.is_kpr() && reach == Reach::Local {
                    runs.push(Run {
                        site: i,
                        reach,
                        pod_ip: true,
                    });
                }
            }
            let rows = alternate(&sites, direct, &runs, cfg, progress, n)?;
            results.rates.extend(rows);
        }
    }
    let last = *cfg.compared_services.last().context("no size")?;
    if sizes.last() != Some(&last) {
        for site in &mut sites {
            site.program(last)?;
        }
    }
    results.packet_services = last;
    packet_rates(&sites, cfg, progress, &mut results)?;
    Ok(results)
}

/// Rounds of `runs`, each between two runs of `direct`: every ratio is
/// against the mean of the direct runs just before and after it, and the
/// order reverses every other round, so the machine's drift cancels.
fn alternate(
    sites: &[Site],
    direct: Run,
    runs: &[Run],
    cfg: &BenchConfig,
    progress: &dyn Fn(&str),
    n: usize,
) -> Result<Vec<RateRow>> {
    let mut samples: Vec<Vec<(ab::AbResult, f64)>> = vec![Vec::new(); runs.len() + 1];
    for round in 0..cfg.external_rounds {
        let measure = |run: Run| {
            let name = format!("external-{n}-round{round}-{}", run.label(sites));
            sites[run.site].ab(run.target(sites), cfg, &name)
        };
        progress(&format!(
            "external path: {n} services, {} round {}/{}",
            direct.label(sites),
            round + 1,
            cfg.external_rounds
        ));
        let mut order: Vec<usize> = (0..runs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut directs = vec![measure(direct)?];
        let mut measured = Vec::new();
        for &i in &order {
            measured.push((i, measure(runs[i])?));
            directs.push(measure(direct)?);
        }
        let around = |i: usize| (directs[i].requests_per_s + directs[i + 1].requests_per_s) / 2.0;
        for (k, (i, result)) in measured.into_iter().enumerate() {
            samples[i + 1].push((result, result.requests_per_s / around(k)));
        }
        for k in 1..directs.len() - 1 {
            let neighbours = (directs[k - 1].requests_per_s + directs[k + 1].requests_per_s) / 2.0;
            samples[0].push((directs[k], directs[k].requests_per_s / neighbours));
        }
    }
    let all = std::iter::once(direct).chain(runs.iter().copied());
    Ok(all
        .zip(samples)
        .filter(|(_, s)| !s.is_empty())
        .map(|(run, s)| {
            let pick = |f: &dyn Fn(&(ab::AbResult, f64)) -> f64| median(s.iter().map(f).collect());
            let ratios = s.iter().map(|x| x.1);
            RateRow {
                services: n,
                config: run.label(sites),
                dataplane: sites[run.site].dataplane.label(),
                remote: run.reach == Reach::Remote,
                pod_ip: run.pod_ip,
                requests_per_s: pick(&|x| x.0.requests_per_s),
                ratio: pick(&|x| x.1),
                ratio_ci: median_ci(&ratios.clone().collect::<Vec<_>>()),
                ratio_range: range(ratios),
                p50_ms: pick(&|x| x.0.p50_ms),
                p99_ms: pick(&|x| x.0.p99_ms),
                failed: s.iter().map(|x| x.0.failed).sum(),
            }
        })
        .collect())
}

/// An interface's packet counters inside `ns`: (received, sent).
fn packet_counters(ns: &Netns, iface: &str) -> Result<(u64, u64)> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", iface])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let stats = &json[0]["stats64"];
    let count = |dir: &str| stats[dir]["packets"].as_u64().context("no packet counter");
    Ok((count("rx")?, count("tx")?))
}

fn mac(ns: &Netns, iface: &str) -> Result<String> {
    let out = ns.ip(&["-j", "link", "show", "dev", iface])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    Ok(json[0]["address"].as_str().context("no MAC")?.to_string())
}

/// `trafgen` sending minimal UDP datagrams from the outside host to `to`
/// as fast as one CPU can, from `flows` source ports in turn.
struct Generator {
    child: Child,
}

impl Generator {
    fn start(site: &Site, to: SocketAddr, flows: u32) -> Result<Self> {
        let outside = site.cluster.outside();
        let source_port = if flows == 1 {
            "10000".to_string()
        } else {
            format!("dinc(10000, {})", 10000 + flows - 1)
        };
        // Every destination is reached through the receiving node.
        let conf = format!(
            "{{\n  eth(da={}, sa={}, type=0x0800),\n  ipv4(sa={OUTSIDE_IP}, da={}, ttl=64),\n  udp(sp={source_port}, dp={}, csum=0),\n  fill(0x00, 18),\n}}\n",
            mac(site.cluster.node(), "eth0")?,
            mac(outside, "eth0")?,
            to.ip(),
            to.port()
        );
        let file = site.scratch.join(format!("trafgen-{}-{flows}.cfg", to.port()));
        std::fs::write(&file, conf)?;
        let mut command = Command::new("ip");
        super::pin(&mut command, super::Cpu::Client);
        // A process group of its own: trafgen forks its sender, and both
        // must stop.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        // Leave the machine's socket memory limits and IRQ
        // affinities alone.
        let child = command
            .args([
                "netns",
                "exec",
                &outside.name,
                "trafgen",
                "--dev",
                "eth0",
                "--cpus",
                "1",
                "--no-sock-mem",
                "--notouch-irq",
                "-C",
            ])
            .arg("--conf")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running trafgen (is netsniff-ng installed? `cargo xtask setup`)")?;
        Ok(Generator { child })
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: signals to our own child's process group.
        unsafe { libc::kill(group, libc::SIGINT) };
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Busy CPU time so far (every kind of work but idle and iowait), in
/// seconds: the whole machine's, and the receiving node's core's.
#[derive(Clone, Copy)]
struct Busy {
    machine: f64,
    node: f64,
}

fn busy_cpu_seconds() -> Result<Busy> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let busy = |line: &str| -> f64 {
        // user nice system idle iowait irq softirq steal
        line.split_whitespace()
            .skip(1)
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, v)| v.parse::<f64>().unwrap_or(0.0))
            .sum::<f64>()
            / ticks
    };
    let line = |name: &str| stat.lines().find(|l| l.split_whitespace().next() == Some(name));
    let machine = busy(line("cpu").context("no cpu line in /proc/stat")?);
    // With one CPU, the node shares it with the generator.
    let node = line(&format!("cpu{}", Cpu::Servers.index())).map_or(machine, busy);
    Ok(Busy { machine, node })
}

/// What the packets of a window cost the machine and the receiving node.
#[derive(Clone, Copy, Debug)]
pub struct Cost {
    /// The whole machine's busy CPU time per datagram sent, in ns (the
    /// generator's share included).
    pub cpu_ns_per_packet: f64,
    /// The receiving node's core's busy time per datagram counted, in ns:
    /// what the node spends on each, however fast the generator is.
    pub node_ns_per_packet: f64,
    /// How busy the node's core was (1.0: saturated, and the count is the
    /// node's limit rather than the generator's).
    pub node_busy: f64,
}

impl Cost {
    /// The median of each figure over `costs`.
    fn median<'a>(costs: impl Iterator<Item = &'a Cost> + Clone) -> Cost {
        Cost {
            cpu_ns_per_packet: median(costs.clone().map(|c| c.cpu_ns_per_packet).collect()),
            node_ns_per_packet: median(costs.clone().map(|c| c.node_ns_per_packet).collect()),
            node_busy: median(costs.map(|c| c.node_busy).collect()),
        }
    }
}

/// What one window of a generator's run measured.
#[derive(Clone, Copy)]
struct Window {
    /// Datagrams sent per second.
    offered: f64,
    /// What the caller counts (delivered, dropped), per second.
    counted: f64,
    cost: Cost,
}

/// One window of a generator's run, after a short warm-up.
fn window(site: &Site, to: SocketAddr, flows: u32, seconds: f64, counted: &dyn Fn() -> Result<u64>) -> Result<Window> {
    let outside = site.cluster.outside();
    let generator = Generator::start(site, to, flows)?;
    // trafgen takes a moment to start sending, longer on a loaded machine:
    // the window opens once it has (or fails below if it never does).
    let (_, launched) = packet_counters(outside, "eth0")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while packet_counters(outside, "eth0")?.1 == launched && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, sent_before) = packet_counters(outside, "eth0")?;
    let counted_before = counted()?;
    let busy_before = busy_cpu_seconds()?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let busy_after = busy_cpu_seconds()?;
    let (_, sent_after) = packet_counters(outside, "eth0")?;
    let counted_after = counted()?;
    let elapsed = started.elapsed().as_secs_f64();
    drop(generator);
    if sent_after == sent_before {
        bail!("trafgen sent nothing to {to}");
    }
    let sent = (sent_after - sent_before) as f64;
    let counted = counted_after.saturating_sub(counted_before) as f64;
    let node = busy_after.node - busy_before.node;
    Ok(Window {
        offered: sent / elapsed,
        counted: counted / elapsed,
        cost: Cost {
            cpu_ns_per_packet: (busy_after.machine - busy_before.machine) * 1e9 / sent,
            node_ns_per_packet: if counted > 0.0 { node * 1e9 / counted } else { 0.0 },
            node_busy: node / elapsed,
        },
    })
}

/// Datagrams that reached the pods `reach` names, at their interfaces.
fn delivered_to_pods(site: &Site, reach: Reach) -> Result<u64> {
    let pods = match reach {
        Reach::Local => &site.cluster.pods[..LOCAL_PODS],
        Reach::Remote => &site.cluster.pods[LOCAL_PODS..],
    };
    pods.iter()
        .map(|p| packet_counters(&p.ns, "eth0").map(|(rx, _)| rx))
        .sum()
}

/// Packets the dataplane dropped for their source: kpr's own counter, the
/// iptables firewall rule's.
fn dropped_for_source(site: &Site) -> Result<u64> {
    if site.dataplane.is_kpr() {
        let stats = read_stats(&site.cluster.nodes[0].pin_dir)?;
        return Ok(stats
            .iter()
            .find(|(s, _)| *s == Stat::SourceDenied)
            .map_or(0, |(_, n)| *n));
    }
    let out = site.cluster.node().run(|| {
        Command::new("iptables")
            .args(["-t", "filter", "-nvxL", "KUBE-PROXY-FIREWALL"])
            .output()
    })??;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

fn packet_rates(sites: &[Site], cfg: &BenchConfig, progress: &dyn Fn(&str), results: &mut Results) -> Result<()> {
    let seconds = cfg.packet_rate_seconds;
    for (reach, flows) in [Reach::Local, Reach::Remote]
        .into_iter()
        .flat_map(|r| FLOW_COUNTS.map(|f| (r, f)))
    {
        // (window, delivered over the direct windows around it)
        let mut samples: Vec<Vec<(Window, f64)>> = vec![Vec::new(); sites.len()];
        for round in 0..cfg.packet_rate_rounds {
            progress(&format!(
                "external path: UDP packet rate, {reach:?} backends, {flows} flows, round {}/{}",
                round + 1,
                cfg.packet_rate_rounds
            ));
            let (direct_pod, node_port) = match reach {
                Reach::Local => (sites[0].local_pods()[1], UDP_NODE_PORT),
                Reach::Remote => (sites[0].remote_pod(), UDP_REMOTE_NODE_PORT),
            };
            let direct_to = SocketAddr::from((direct_pod, DISCARD_PORT));
            let direct = || {
                window(&sites[0], direct_to, flows, seconds, &|| {
                    delivered_to_pods(&sites[0], reach)
                })
            };
            let mut before = direct()?;
            for site in sites.iter().skip(1) {
                let to = SocketAddr::from((node_ip(0), node_port));
                site.empty_flow_table()?;
                let measured = window(site, to, flows, seconds, &|| delivered_to_pods(site, reach))?;
                let after = direct()?;
                let i = sites.iter().position(|s| s.dataplane == site.dataplane).unwrap_or(0);
                let ratio = measured.counted / ((before.counted + after.counted) / 2.0);
                samples[i].push((measured, ratio));
                samples[0].push((before, 1.0));
                before = after;
            }
        }
        for (site, s) in sites.iter().zip(samples) {
            if s.is_empty() {
                continue;
            }
            let ratios = s.iter().map(|x| x.1);
            results.packets.push(PacketRow {
                dataplane: site.dataplane.label(),
                remote: reach == Reach::Remote,
                flows,
                offered_pps: median(s.iter().map(|x| x.0.offered).collect()),
                delivered_pps: median(s.iter().map(|x| x.0.counted).collect()),
                cost: Cost::median(s.iter().map(|x| &x.0.cost)),
                ratio: median(ratios.clone().collect()),
                ratio_range: range(ratios),
            });
        }
    }
    // Denied sources: dropped where each dataplane decides.
    let droppers: Vec<&Site> = sites
        .iter()
        .filter(|s| matches!(s.dataplane, Dataplane::KprXdp | Dataplane::KprTc | Dataplane::Iptables))
        .collect();
    let mut samples: Vec<Vec<Window>> = vec![Vec::new(); droppers.len()];
    for round in 0..cfg.packet_rate_rounds {
        progress(&format!(
            "external path: denied-source drops, round {}/{}",
            round + 1,
            cfg.packet_rate_rounds
        ));
        for (i, site) in droppers.iter().enumerate() {
            let to = SocketAddr::from((DENIED_LB_IP, DISCARD_PORT));
            let measured = window(site, to, FLOW_COUNTS[1], seconds, &|| dropped_for_source(site))?;
            if measured.counted == 0.0 {
                bail!("{}: nothing dropped for a denied source", site.dataplane.label());
            }
            samples[i].push(measured);
        }
    }
    for (site, s) in droppers.iter().zip(samples) {
        let dropped: Vec<f64> = s.iter().map(|x| x.counted).collect();
        results.drops.push(DropRow {
            dataplane: site.dataplane.label(),
            offered_pps: median(s.iter().map(|x| x.offered).collect()),
            dropped_pps: median(dropped.clone()),
            cost: Cost::median(s.iter().map(|x| &x.cost)),
            dropped_range: range(dropped.iter().copied()),
        });
    }
    Ok(())
}
