//! `cargo xtask bench`: kpr against direct pod access and kube-proxy's
//! iptables and nftables rule layouts, measured in one run on this machine,
//! reported as ratios to a baseline from the same run.
pub mod ab;
pub mod baseline;
pub mod control;
pub mod datapath;
pub mod external;
pub mod nginx;
pub mod packets;
pub mod quiet;
pub mod rules;

use std::{fmt::Write, net::Ipv4Addr};

use anyhow::{Context, Result};
use proxy_user::model::{
    objects::{ObjectName, Protocol},
    BackendAddr, DesiredState, Frontend, FrontendKind, FrontendState,
};

pub struct BenchConfig {
    pub requests: u32,
    pub concurrency: u32,
    pub rounds: usize,
    /// Sizes measured for every dataplane.
    pub compared_services: Vec<usize>,
    /// Sizes measured for kpr only (kube-proxy's rules take minutes to load).
    pub kpr_only_services: Vec<usize>,
    pub packet_services: Vec<usize>,
    pub packet_samples: usize,
    pub cp_services: usize,
    pub cp_endpoints: usize,
    pub cp_changes: usize,
    pub change_spacing_ms: u64,
    /// Cold starts of the daemon, each on a node with nothing pinned.
    pub cold_starts: usize,
    /// Run only these parts ("datapath", "packets", "control"); all when empty.
    pub only: Vec<String>,
    /// Skip loading kube-proxy's rulesets in the control-plane part (nft
    /// takes minutes at 10,000 services).
    pub skip_rule_loads: bool,
    /// An earlier build's eBPF object, whose per-packet cost is sampled
    /// beside this build's, packet for packet (`baseline`).
    pub baseline_object: Option<std::path::PathBuf>,
    /// Rounds of the external path's connection-rate runs, and requests
    /// per run.
    pub external_rounds: usize,
    pub external_requests: u32,
    /// Rounds and length of the external path's packet-rate windows.
    pub packet_rate_rounds: usize,
    pub packet_rate_seconds: f64,
}

impl BenchConfig {
    pub fn full() -> Self {
        BenchConfig {
            // One direct run strays from the two around it by -36% to +49%
            // on this kind of shared VM, in bursts: many short paired rounds
            // resolve a few percent better than a few long ones in the same
            // time (7 x 20,000 requests put kpr at 0.92-1.00x over runs).
            requests: 5_000,
            concurrency: 8,
            rounds: 25,
            compared_services: vec![1, 1_000, 10_000],
            kpr_only_services: vec![100_000],
            packet_services: vec![1, 10_000, 100_000],
            packet_samples: 5_000,
            cp_services: 10_000,
            cp_endpoints: 10,
            cp_changes: 1_000,
            change_spacing_ms: 15,
            // Nine: the median's 95% interval is then the 2nd to the 8th.
            cold_starts: 9,
            only: Vec::new(),
            skip_rule_loads: false,
            baseline_object: None,
            // Twice the rounds of half the length of the first full run's
            // (8 x 5,000): eight rounds put no pair of order statistics
            // inside the whole range at 95%, sixteen put the 4th and 13th.
            external_rounds: 16,
            external_requests: 2_500,
            packet_rate_rounds: 5,
            packet_rate_seconds: 2.0,
        }
    }

    /// Tiny sizes, for the test suite: every part runs, nothing is measured.
    pub fn smoke() -> Self {
        BenchConfig {
            requests: 200,
            concurrency: 4,
            rounds: 1,
            compared_services: vec![1, 20],
            kpr_only_services: vec![50],
            packet_services: vec![1, 20],
            packet_samples: 20,
            cp_services: 20,
            cp_endpoints: 3,
            cp_changes: 5,
            change_spacing_ms: 15,
            cold_starts: 2,
            only: Vec::new(),
            skip_rule_loads: false,
            baseline_object: None,
            external_rounds: 1,
            external_requests: 200,
            packet_rate_rounds: 1,
            packet_rate_seconds: 0.3,
        }
    }
}

impl Report {
    fn external_markdown(&self, cfg: &BenchConfig, md: &mut String) {
        let e = &self.external;
        if e.rates.is_empty() {
            return;
        }
        let _ = writeln!(md, "\n## The external path\n\nA two-node namespace cluster per dataplane (nginx in three pods on the receiving node and one on the other; a client host outside the cluster on their LAN): none (the client routed to the pod through the receiving node), kpr with XDP (`kpr run --xdp native`), kpr with its TC program only (`--xdp off`), kube-proxy's iptables layout and its nftables layout, NodePorts included, as kube-proxy writes them (KUBE-NODEPORTS after every ClusterIP rule; the `service-nodeports` map). kpr is the release daemon, reading the Services as manifests. Besides the measured Services, each size adds that many ClusterIP Services (three endpoints each). `ab -n {} -c {}` from the outside host, a new TCP connection per request; {} rounds; every run is preceded and followed by a direct run to the same pods, *vs direct* is the median over rounds of the run's rate over the mean of those two, and the order reverses every other round. *median's 95% CI* is that median's confidence interval, taken from the rounds' order statistics (no assumption about the noise's distribution): a target's verdict is firm where the interval stays on one side of it. Every run starts from an empty flow table: kpr's conntrack map and netfilter's conntrack (`conntrack -F`) are emptied before it, so every connection chooses a backend. The direct row compares each direct run with the two around it: the spread of that row is the noise floor. The *to the pod IP* rows reach the pod directly through a node running kpr: the cost of the hooks merely being there. The LAN hands the nodes bare frames, as NICs do, and the receiving node's interface is processed on the second CPU (see *Packet rate* below), with the nginx pods; `ab` is on the first.\n", cfg.external_requests, cfg.concurrency, cfg.external_rounds);
        let _ = writeln!(md, "| services | configuration | req/s | vs direct | median's 95% CI | rounds' range | p50 ms | p99 ms | failed |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &e.rates {
            table_row(
                md,
                &[
                    r.services.to_string(),
                    r.config.clone(),
                    format!("{:.0}", r.requests_per_s),
                    format!("{:.2}x", r.ratio),
                    format!("{:.2}–{:.2}", r.ratio_ci.0, r.ratio_ci.1),
                    format!("{:.2}–{:.2}", r.ratio_range.0, r.ratio_range.1),
                    format!("{:.0}", r.p50_ms),
                    format!("{:.0}", r.p99_ms),
                    r.failed.to_string(),
                ],
            );
        }
        let _ = writeln!(md, "\n### Packet rate\n\n`trafgen` (netsniff-ng) on the outside host, pinned to the first CPU, sends minimal UDP datagrams as fast as it can to a UDP NodePort, from one source port or from 1,000 in turn: one with a Local policy and three endpoints on the receiving node (*delivered*), one with a Cluster policy and its endpoint on the other node (*forwarded*, with source NAT); direct: to one of those pods, routed through the node. *delivered pps* counts the datagrams reaching the pods' interfaces, over {:.1} s windows, {} rounds, at {} services; each kpr or kube-proxy window is compared with the direct windows on either side of it.\n\nThe LAN is a switch built of XDP redirects (`kpr_xdp_wire`, test harness only): a node receives bare frames, as from a NIC, not skbs that a veth would first copy into XDP buffers — a cost no NIC has, which before this switch fell on the XDP configuration alone. Every node interface runs an XDP program (kpr's, or one that passes everything), so every dataplane meets the same wire. The receiving node has a core of its own: its interface's receive processing runs in NAPI threads on the second CPU; the generator, the LAN, the other node and the outside host share the first. *node core busy* is how busy the second CPU was, and *node ns/packet* its busy time per datagram counted: the receiving node's cost per packet, whatever the generator manages. Two shared cores cannot show a node's limit: the first CPU saturates first (the generator alone reaches ~400,000 packets/s, and the forwarded rows' other node runs there too), so wall-clock rates mostly measure that CPU, and the targets compare *packets per node core-second* (10^9 / node ns per packet). Below saturation that figure counts the node thread's wake-ups too, so it understates whichever dataplane leaves its core idlest. *machine CPU ns/packet* is the whole machine's busy time per datagram sent.\n\n", cfg.packet_rate_seconds, cfg.packet_rate_rounds, e.packet_services);
        let _ = writeln!(md, "| configuration | backend | flows | offered pps | delivered pps | vs direct | rounds' range | node core busy | node ns/packet | packets per node core-second | machine CPU ns/packet |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &e.packets {
            let backend = if r.remote {
                "other node (forwarded)"
            } else {
                "receiving node"
            };
            let mut cells = vec![
                r.dataplane.to_string(),
                backend.to_string(),
                r.flows.to_string(),
                format!("{:.0}", r.offered_pps),
                format!("{:.0}", r.delivered_pps),
                format!("{:.2}x", r.ratio),
                format!("{:.2}–{:.2}", r.ratio_range.0, r.ratio_range.1),
            ];
            cells.extend(cost_cells(&r.cost));
            table_row(md, &cells);
        }
        let _ = writeln!(md, "\nThe same generator, 1,000 flows, to the Service's load balancer IP, whose `loadBalancerSourceRanges` leave the outside host out: datagrams dropped per second, as counted by the dropper (kpr's `source_denied` counter; the iptables firewall rule's counter).\n");
        let _ = writeln!(md, "| configuration | offered pps | dropped pps | rounds' range | node core busy | node ns/packet | packets per node core-second | machine CPU ns/packet |\n|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &e.drops {
            let mut cells = vec![
                r.dataplane.to_string(),
                format!("{:.0}", r.offered_pps),
                format!("{:.0}", r.dropped_pps),
                format!("{:.0}–{:.0}", r.dropped_range.0, r.dropped_range.1),
            ];
            cells.extend(cost_cells(&r.cost));
            table_row(md, &cells);
        }
    }
}

/// The packet-rate tables' last four columns.
fn cost_cells(cost: &external::Cost) -> [String; 4] {
    [
        format!("{:.0}%", cost.node_busy * 100.0),
        format!("{:.0}", cost.node_ns_per_packet),
        format!("{:.0}", per_core_second(cost.node_ns_per_packet)),
        format!("{:.0}", cost.cpu_ns_per_packet),
    ]
}

/// Forgets every flow kpr tracks on the node pinned at `pin_dir`, so that a
/// measured run's connections all choose a backend.
pub fn empty_kpr_flow_table(pin_dir: &std::path::Path) -> Result<()> {
    let mut flows = proxy_user::dataplane::maps::FlowMaps::open(pin_dir)?;
    for (key, _) in flows.entries()? {
        flows.remove(&key)?;
    }
    Ok(())
}

/// The same for netfilter's conntrack in the network namespace `ns`
/// (kube-proxy's layouts).
pub fn empty_netfilter_flow_table(ns: &str) -> Result<()> {
    // `conntrack -F` exits non-zero when the table is empty already.
    let _ = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "conntrack", "-F"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    Ok(())
}

/// Packets a core handles per second of its time, at `ns` each.
fn per_core_second(ns: f64) -> f64 {
    if ns > 0.0 {
        1e9 / ns
    } else {
        0.0
    }
}

/// One row of a Markdown table.
fn table_row(md: &mut String, cells: &[String]) {
    let _ = writeln!(md, "| {} |", cells.join(" | "));
}

/// Which CPU a benchmark process is kept on.
#[derive(Clone, Copy)]
pub enum Cpu {
    /// The load tool.
    Client,
    /// The web servers.
    Servers,
}

impl Cpu {
    pub fn index(self) -> usize {
        match self {
            Cpu::Client => 0,
            Cpu::Servers => 1,
        }
    }
}

/// A system-wide `perf record` while it lives, when `KPR_BENCH_PROFILE`
/// names a directory: one profile per measured run, named after it, to
/// compare where the CPUs' time goes between configurations. Off unless
/// asked for: perf's sampling costs every configuration alike, but it
/// costs.
pub struct Profile(Option<std::process::Child>);

impl Profile {
    pub fn start(run: &str) -> Result<Self> {
        let Some(dir) = std::env::var_os("KPR_BENCH_PROFILE") else {
            return Ok(Profile(None));
        };
        let name: String = run
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
            .collect();
        let out = std::path::Path::new(&dir).join(format!("{name}.data"));
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-a", "-g", "-F", "2000", "-o"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting perf record (KPR_BENCH_PROFILE is set)")?;
        // perf needs a moment before its first sample.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Profile(Some(child)))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// Keeps a running thread (a kernel thread, say) on `cpu`, as `pin` does
/// a process.
pub fn pin_thread(tid: i32, cpu: Cpu) -> Result<()> {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Ok(());
    }
    // SAFETY: a set built on the stack, for a thread id.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu.index(), &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("pinning thread {tid}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Keeps the process `command` starts (and its children) on one CPU when
/// the machine has two or more: the load tool on the first, the servers on
/// the second, in every configuration alike, so that the scheduler moving
/// them around does not add to the run-to-run spread.
pub fn pin(command: &mut std::process::Command, cpu: Cpu) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return command;
    }
    let index = cpu.index();
    // SAFETY: sched_setaffinity on the child itself, between fork and exec,
    // on a set built on the stack: async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(index, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Service `i`'s cluster IP: 10.96.0.1 and up, inside the service CIDR.
pub fn service_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes([10, 96, 0, 0]) + 1 + i as u32)
}

/// `n` ClusterIP services on port 80 over the same backends.
pub fn services_desired(n: usize, backends: &[(Ipv4Addr, u16)]) -> DesiredState {
    let backends = backends
        .iter()
        .map(|&(ip, port)| BackendAddr {
            ip,
            port,
            local: true,
            terminating: false,
        })
        .collect();
    DesiredState {
        frontends: (0..n)
            .map(|i| {
                (
                    Frontend {
                        ip: service_vip(i),
                        port: 80,
                        protocol: Protocol::Tcp,
                    },
                    FrontendState {
                        service: ObjectName {
                            namespace: "default".into(),
                            name: format!("svc-{i}"),
                        },
                        kind: FrontendKind::ClusterIp,
                        backends: std::collections::BTreeSet::clone(&backends),
                        external_local: None,
                        affinity_timeout: None,
                        source_ranges: Vec::new(),
                        reject: false,
                    },
                )
            })
            .collect(),
        conflicts: vec![],
    }
}

pub fn median(values: Vec<f64>) -> f64 {
    percentile(values, 0.5)
}

/// The lowest and highest of `values`.
pub fn range(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    values
        .into_iter()
        .fold((f64::INFINITY, 0.0), |(low, high), v| (low.min(v), high.max(v)))
}

/// A 95% confidence interval of the median of `values`, free of any
/// assumption about their distribution (this machine's noise comes in
/// bursts, far from normal): the `k`th lowest and the `k`th highest value,
/// `k` the largest for which a binomial(n, 1/2) count falls below `k` with
/// at most 2.5% chance. Below six values no pair reaches 95%: the whole
/// range.
pub fn median_ci(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    // P(count <= i) for binomial(n, 1/2), accumulated term by term.
    let mut term = 0.5f64.powi(n as i32);
    let mut below = 0.0;
    let mut k = 1;
    for i in 0..n {
        below += term;
        if below > 0.025 {
            break;
        }
        k = i + 1;
        term *= (n - i) as f64 / (i + 1) as f64;
    }
    let k = k.min(n.div_ceil(2));
    (sorted[k - 1], sorted[n - k])
}

pub fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((values.len() - 1) as f64 * p).round() as usize;
    values[rank]
}

pub struct Report {
    pub datapath: datapath::Results,
    pub packets: Vec<packets::Row>,
    pub control: control::Results,
    pub external: external::Results,
}

pub fn run(cfg: &BenchConfig, progress: &dyn Fn(&str)) -> Result<Report> {
    let wanted = |part: &str| cfg.only.is_empty() || cfg.only.iter().any(|p| p == part);
    let packets = if wanted("packets") {
        packets::run(cfg, progress)?
    } else {
        Vec::new()
    };
    let control = if wanted("control") {
        control::run(cfg, progress)?
    } else {
        control::Results::default()
    };
    let datapath = if wanted("datapath") {
        datapath::run(cfg, progress)?
    } else {
        datapath::Results::default()
    };
    let external = if wanted("external") {
        external::run(cfg, progress)?
    } else {
        external::Results::default()
    };
    Ok(Report {
        datapath,
        packets,
        control,
        external,
    })
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    format!(
        "{cores} cores ({cpu}), {:.0} GiB RAM, Linux {}",
        mem_kb / 1048576.0,
        read("/proc/sys/kernel/osrelease").trim()
    )
}

/// A rate target's worst row: its median ratio, that median's 95%
/// confidence interval (the verdict reproduces where the interval stays on
/// one side of the target), and where it was measured.
fn worst_rate(ratio: f64, ci: (f64, f64), at: &str) -> String {
    format!("worst {ratio:.2}x (95% CI {:.2}–{:.2}; {at})", ci.0, ci.1)
}

/// How far the direct runs' median against their neighbours may be from
/// 1.00x, at 95% confidence, for a rate verdict to be worth reading.
const NOISE_TOLERANCE: f64 = 0.05;

/// The noise row of a rate table: of `cis` (the direct row's median
/// interval at each size, with the size), the one furthest from 1.00x.
fn noise_target(what: &str, cis: impl Iterator<Item = ((f64, f64), usize)>) -> Option<(String, String, bool)> {
    let off = |ci: (f64, f64)| (1.0 - ci.0).max(ci.1 - 1.0);
    let (ci, n) = cis.max_by(|a, b| off(a.0).total_cmp(&off(b.0)))?;
    Some((
        format!(
            "{what}: direct runs against the direct runs around them, the median's 95% CI within ±{:.0}% at every size",
            NOISE_TOLERANCE * 100.0
        ),
        format!("widest {:.2}–{:.2} ({n} services)", ci.0, ci.1),
        off(ci) <= NOISE_TOLERANCE,
    ))
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

impl Report {
    /// The targets of the issue, as (description, measured, met).
    pub fn targets(&self) -> Vec<(String, String, bool)> {
        let mut out = Vec::new();
        if let Some(worst) = self.datapath.worst(&["kpr, one-endpoint"]) {
            out.push((
                "connection rate through kpr >= 0.95x direct to the same pod, at every size".into(),
                worst_rate(worst.ratio, worst.ratio_ci, &format!("{} services", worst.services)),
                worst.ratio >= 0.95,
            ));
        }
        if let Some(worst) = self.datapath.worst(&["kpr, first", "kpr, last"]) {
            out.push((
                "the same through kpr to a three-endpoint service (against direct to one of its pods), at every size"
                    .into(),
                worst_rate(
                    worst.ratio,
                    worst.ratio_ci,
                    &format!("{}, {} services", worst.config, worst.services),
                ),
                worst.ratio >= 0.95,
            ));
        }
        out.extend(noise_target(
            "connection rate",
            self.datapath
                .rows
                .iter()
                .filter(|r| r.config == datapath::DIRECT_LABEL)
                .map(|r| (r.ratio_ci, r.services)),
        ));
        let sizes: Vec<usize> = self.packets.iter().map(|r| r.services).collect();
        if let (Some(&small), Some(&large)) = (sizes.iter().min(), sizes.iter().max()) {
            let at = |n: usize, path: &str| {
                self.packets
                    .iter()
                    .find(|r| r.services == n && r.path == path)
                    .map(|r| r.trimmed_mean_ns)
            };
            let mut worst: Option<(f64, &str)> = None;
            for path in packets::PATHS
                .into_iter()
                .filter(|&p| p != packets::FLOOR && p != packets::XDP_FLOOR)
            {
                if let (Some(a), Some(b)) = (at(small, path), at(large, path)) {
                    let growth = b / a;
                    if worst.is_none_or(|(w, _)| growth > w) {
                        worst = Some((growth, path));
                    }
                }
            }
            if let Some((growth, path)) = worst {
                out.push((
                    format!("per-packet cost at {large} services within 10% of {small}, every path"),
                    format!("worst {growth:.2}x ({path})"),
                    growth <= 1.10,
                ));
            }
            // Against the baseline build, where one was sampled beside.
            for &(baseline, path) in packets::BASELINE_PATHS
                .iter()
                .filter(|(_, p)| *p == packets::ESTABLISHED || *p == packets::REPLY)
            {
                let ratios = sizes.iter().filter_map(|&n| Some((at(n, path)? / at(n, baseline)?, n)));
                if let Some((ratio, n)) = ratios.max_by(|a, b| a.0.total_cmp(&b.0)) {
                    out.push((
                        format!("{path} within 10% of the baseline build's, every size"),
                        format!("worst {ratio:.2}x ({n} services)"),
                        ratio <= 1.10,
                    ));
                }
            }
            for (label, path) in [
                ("no-match packets (later packets of a connection)", packets::NO_MATCH),
                (
                    "no-match first packets of a connection (filter words not cached)",
                    packets::NO_MATCH_SYN,
                ),
            ] {
                let ratios = sizes
                    .iter()
                    .filter_map(|&n| Some((at(n, path)? / at(n, packets::FLOOR)?, n)));
                if let Some((ratio, n)) = ratios.max_by(|a, b| a.0.total_cmp(&b.0)) {
                    out.push((
                        format!("{label} within 1.5x of the empty program, every size"),
                        format!("worst {ratio:.2}x ({n} services)"),
                        ratio <= 1.5,
                    ));
                }
            }
        }
        self.external_targets(&mut out);
        let c = &self.control;
        // Not run (`--only` another part): no row, rather than zeros that
        // read as targets met.
        if c.services == 0 {
            return out;
        }
        let cold_start = median(c.cold_starts_s.clone());
        let (low, high) = median_ci(&c.cold_starts_s);
        out.push((
            format!(
                "cold start of {} services x {} endpoints under 1 s (median of {} starts)",
                c.services,
                c.endpoints_per_service,
                c.cold_starts_s.len()
            ),
            format!("{cold_start:.2} s (95% CI {low:.2}–{high:.2})"),
            cold_start < 1.0,
        ));
        out.push((
            "one endpoint change to maps, p99 under 5 ms".into(),
            format!("{:.2} ms", c.change_p99_ms),
            c.change_p99_ms < 5.0,
        ));
        out.push((
            "daemon RSS under 100 MB at that scale".into(),
            format!("{:.1} MB", c.rss_mb),
            c.rss_mb < 100.0,
        ));
        out
    }

    /// The external path's targets (issue 12), where that part ran.
    fn external_targets(&self, out: &mut Vec<(String, String, bool)>) {
        use external::{Dataplane, FLOW_COUNTS};
        let e = &self.external;
        let worst = |dataplane: Dataplane, remote: bool| {
            e.rates
                .iter()
                .filter(|r| r.dataplane == dataplane.label() && r.remote == remote && !r.pod_ip)
                .min_by(|a, b| a.ratio.total_cmp(&b.ratio))
        };
        out.extend(noise_target(
            "from outside",
            e.rates
                .iter()
                .filter(|r| r.dataplane == Dataplane::Direct.label())
                .map(|r| (r.ratio_ci, r.services)),
        ));
        if let Some(r) = worst(Dataplane::KprXdp, false) {
            out.push((
                "from outside to a NodePort (Local policy, local endpoints), kpr with XDP >= 0.95x direct, every size"
                    .into(),
                worst_rate(r.ratio, r.ratio_ci, &format!("{} services", r.services)),
                r.ratio >= 0.95,
            ));
        }
        for (label, dataplane) in [("TC only", Dataplane::KprTc)] {
            if let Some(r) = worst(dataplane, false) {
                out.push((
                    format!("from outside to that NodePort, kpr {label} >= 0.95x direct, every size"),
                    worst_rate(r.ratio, r.ratio_ci, &format!("{} services", r.services)),
                    r.ratio >= 0.95,
                ));
            }
        }
        if let Some(r) = self.datapath.worst(&["kpr TC path only"]) {
            out.push((
                "to a ClusterIP, kpr's TC path (clients the socket hooks cannot see) >= 0.95x direct, every size"
                    .into(),
                worst_rate(r.ratio, r.ratio_ci, &format!("{}, {} services", r.config, r.services)),
                r.ratio >= 0.95,
            ));
        }
        let largest = e
            .rates
            .iter()
            .filter(|r| r.dataplane == Dataplane::Iptables.label())
            .map(|r| r.services)
            .max();
        if let Some(n) = largest {
            let rate = |d: Dataplane| e.rate(n, d, false).map(|r| r.requests_per_s);
            if let (Some(kpr), Some(nft), Some(ipt)) = (
                rate(Dataplane::KprXdp),
                rate(Dataplane::Nftables),
                rate(Dataplane::Iptables),
            ) {
                out.push((
                    format!("that NodePort at {n} services: kpr (XDP) >= the nftables layout"),
                    format!("{:.2}x", kpr / nft),
                    kpr >= nft,
                ));
                out.push((
                    format!("that NodePort at {n} services: kpr (XDP) >= 3x the iptables layout"),
                    format!("{:.2}x", kpr / ipt),
                    kpr >= 3.0 * ipt,
                ));
            }
        }
        // The generator shares the machine and may not saturate the node:
        // packets per second of the node's core is its capacity, wall-clock
        // packets per second what this machine delivered.
        let packet_row = |d: Dataplane, remote: bool, flows: u32| {
            e.packets
                .iter()
                .find(|r| r.dataplane == d.label() && r.remote == remote && r.flows == flows)
        };
        // Forwarded, as the target (and Cilium's XDP figures) mean: a
        // frame delivered to a local pod costs the node the skb and the
        // socket either way, which XDP cannot save.
        let ratios: Vec<(f64, f64, u32)> = FLOW_COUNTS
            .iter()
            .filter_map(|&flows| {
                let xdp = packet_row(Dataplane::KprXdp, true, flows)?;
                let tc = packet_row(Dataplane::KprTc, true, flows)?;
                Some((
                    tc.cost.node_ns_per_packet / xdp.cost.node_ns_per_packet,
                    xdp.delivered_pps / tc.delivered_pps,
                    flows,
                ))
            })
            .collect();
        if let Some(&(capacity, wall, flows)) = ratios.iter().min_by(|a, b| a.0.total_cmp(&b.0)) {
            out.push((
                "UDP packets forwarded (to the other node's pod) per second of the node's core: XDP >= 1.5x kpr's TC path".into(),
                format!("worst {capacity:.2}x ({flows} flows; per second of wall clock {wall:.2}x)"),
                capacity >= 1.5,
            ));
        }
        let dropper = |d: Dataplane| e.drops.iter().find(|r| r.dataplane == d.label());
        if let (Some(xdp), Some(ipt)) = (dropper(Dataplane::KprXdp), dropper(Dataplane::Iptables)) {
            let capacity = ipt.cost.node_ns_per_packet / xdp.cost.node_ns_per_packet;
            out.push((
                "packets from a denied source dropped per second of the node's core: XDP >= 3x iptables".into(),
                format!(
                    "{capacity:.2}x (per second of wall clock {:.2}x)",
                    xdp.dropped_pps / ipt.dropped_pps
                ),
                capacity >= 3.0,
            ));
        }
    }

    pub fn to_markdown(&self, cfg: &BenchConfig, command: &str, date: &str) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Benchmarks\n\nMeasured {date} on {}.\nReproduce (as root): `{command}`\n",
            machine()
        );
        let _ = writeln!(md, "Every figure comes from one run of that command: each dataplane is compared with a baseline measured in the same run, on the same machine, alternating between configurations.\n");
        let _ = writeln!(md, "## Targets\n\n| target | measured | |\n|---|---|---|");
        for (what, measured, ok) in self.targets() {
            let _ = writeln!(md, "| {what} | {measured} | {} |", verdict(ok));
        }
        self.datapath_markdown(cfg, &mut md);
        self.packets_markdown(cfg, &mut md);
        self.external_markdown(cfg, &mut md);
        self.control_markdown(cfg, &mut md);
        md
    }

    /// The ClusterIP connection-rate part, where it ran.
    fn datapath_markdown(&self, cfg: &BenchConfig, md: &mut String) {
        if self.datapath.rows.is_empty() {
            return;
        }
        let worst = |prefixes: &[&str]| {
            self.datapath.worst(prefixes).map_or("not measured".to_string(), |r| {
                format!("{:.2}x ({}, {} services)", r.ratio, r.config, r.services)
            })
        };
        let _ = writeln!(
            md,
            "\nThe rate target compares like with like: a Service whose one endpoint is the pod the direct runs connect to. Services spreading connections over three nginx pods are measured too (worst, kpr: {}; iptables: {}; nftables: {}); against direct access to *one* pod they carry the cost of keeping three nginx processes busy on two cores, which no dataplane avoids.\n\nkpr balances TCP connections of the node's processes (pods and host) when they connect, so their packets travel untranslated. Connections the socket hooks do not see (from outside the node, or with `--no-socket-lb`) are translated per packet by the TC program; that path's worst: {}. Packets of socket-balanced connections are left alone by the TC program unless their backend also serves connections it translated (then each reply is looked up in conntrack): the rate target is measured on a node where it does not, and the *kpr mixed node* rows show the other case: {}.",
            worst(&["kpr, first", "kpr, last"]),
            worst(&["iptables, first", "iptables, last"]),
            worst(&["nftables, first", "nftables, last"]),
            worst(&["kpr TC path only"]),
            worst(&["kpr mixed node"]),
        );
        let _ = writeln!(
            md,
            "\n## Connection rate and latency\n\nA namespace cluster per dataplane (two for kpr, see below), each with three nginx pods and client pods; `ab -n {} -c {}` from the client, a new TCP connection per request; {} rounds alternating between configurations, medians reported. Every run is preceded and followed by a direct run (to the pod, no proxy), and *vs direct* is the median over rounds of the run's rate divided by the mean of those two: the machine's drift over a round cancels out. The order of configurations is reversed every other round. Every run starts from an empty flow table (kpr's conntrack map, emptied through its pin; netfilter's, with `conntrack -F`), so every connection it translates chooses a backend. *median's 95% CI* is that median's confidence interval, taken from the rounds' order statistics (no assumption about the noise's distribution): a target's verdict is firm where the interval stays on one side of it. *rounds' range* is the lowest and highest of those per-round ratios; for the direct row itself it compares each direct run with the two around it. The load tool is kept on the first CPU and the nginx processes on the second, in every configuration. *ab CPU* is the load tool's CPU time over wall time: near 1.0 it saturated a core and the rate is the tool's ceiling. *ns/packet* is the kernel's own accounting (`BPF_ENABLE_STATS`) of the TC program during the run, every packet of every direction included; that accounting costs two clock reads per program run, so it is on in the last round only, and only that round gives this column.\n\n*kpr* is the dataplane as the daemon runs it: the client is a process of the cgroup the socket-level hooks are attached to (on a node, the root: every pod), so its TCP connections to a service are sent to a backend inside `connect()`; the TC program still sees every packet. *kpr TC path only* is the same dataplane with the client outside that cgroup, so every packet of the connection is translated by the TC program (with conntrack), as for clients the hooks cannot see; it runs on a second kpr cluster, with the *kpr mixed node* row: a socket-balanced client there, whose backend also serves those translated flows.\n",
            cfg.requests, cfg.concurrency, cfg.rounds
        );
        let _ = writeln!(md, "| services | configuration | req/s | vs direct | median's 95% CI | rounds' range | mean ms | p50 ms | p99 ms | failed | ab CPU | ns/packet |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.datapath.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.2}x | {:.2}–{:.2} | {:.2}–{:.2} | {:.3} | {:.0} | {:.0} | {} | {:.2} | {} |",
                r.services,
                r.config,
                r.requests_per_s,
                r.ratio,
                r.ratio_ci.0,
                r.ratio_ci.1,
                r.ratio_range.0,
                r.ratio_range.1,
                r.mean_ms,
                r.p50_ms,
                r.p99_ms,
                r.failed,
                r.load_tool_cpu,
                r.ns_per_packet.map_or("".into(), |n| format!("{n:.0}"))
            );
        }
        let _ = writeln!(md, "\nThe *empty TC program* row measures nothing but attaching a program that does nothing, and the *direct* row the baseline against itself: how far they stray from 1.00x, and the rounds' ranges, are this machine's run-to-run noise (two shared cores, the load tool saturating one of them); differences smaller than that spread are not significant.");
        let _ = writeln!(md, "\nLoading those rulesets (three endpoints per service):\n\n| services | iptables-restore | nft -f |\n|---:|---:|---:|");
        for (n, ipt, nft) in &self.datapath.rule_loads {
            let _ = writeln!(md, "| {n} | {ipt:.2} s | {nft:.2} s |");
        }
    }

    /// The per-packet part, where it ran.
    fn packets_markdown(&self, cfg: &BenchConfig, md: &mut String) {
        if self.packets.is_empty() {
            return;
        }
        let _ = writeln!(md, "\n## Per-packet cost by path\n\n`BPF_PROG_TEST_RUN` on crafted packets, {} samples per path, each a single run (repeat = 1) on its own packet, since the program rewrites what it is given; kernel-measured ns per run. The clock advances in steps of about 10 ns here, so the ratios compare trimmed means (the middle 80% of samples), which resolve below a step; medians are shown too. Tuples are fresh for every sample, so *new flow* really creates a flow and *established* really finds one. Each size has its own dataplane, programmed before any sample is taken; samples are taken in {} rounds that visit every size in turn, after a warm-up round that is not counted, so that drift of the machine over the run is shared by all sizes. The pre-filter is a whole-tuple bitmap behind two small ones, keyed by the address's /24 and by the /24 and the port: a packet to and from /24s holding no service address and no backend that serves translated flows is decided by the first, which stays in cache (the *no match* rows; their clients are outside the backends' /24). One from a backend's /24, on a port no marked backend there answers from, is decided by the second, also small: the *from a backend's /24* row (before that bitmap, each such packet read the whole-tuple bitmap, out of cache for a tuple not seen lately). The *XDP* rows run the XDP program of the external interfaces on TCP from clients outside the cluster to the same service (backends on this node: translated and passed up, marked for the TC program), against an XDP program that passes everything; the *TC external* rows run the TC program of those interfaces on the same kind of packets, as a node without XDP does. With `--baseline-object FILE`, the *baseline build* rows are an earlier build's `kpr_tc` (and empty program), loaded beside this one and run on the same packets right after this build's, so that the machine's drift cannot come between them.\n", cfg.packet_samples, packets::ROUNDS);
        let _ = writeln!(
            md,
            "| services | path | median ns | trimmed mean ns | p90 ns | vs same path at {} |\n|---:|---|---:|---:|---:|---:|",
            self.packets.first().map_or(0, |r| r.services)
        );
        for r in &self.packets {
            let base = self
                .packets
                .iter()
                .find(|b| b.path == r.path)
                .map_or(r.trimmed_mean_ns, |b| b.trimmed_mean_ns);
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.1} | {:.0} | {:.2}x |",
                r.services,
                r.path,
                r.median_ns,
                r.trimmed_mean_ns,
                r.p90_ns,
                r.trimmed_mean_ns / base
            );
        }
    }

    /// The control-plane part, where it ran.
    fn control_markdown(&self, cfg: &BenchConfig, md: &mut String) {
        let c = &self.control;
        if c.services == 0 {
            return;
        }
        let _ = writeln!(md, "\n## Control plane\n\n{} Services x {} endpoints, served by the in-tree test API server (real list/watch over HTTP) to the release-built daemon.\n", c.services, c.endpoints_per_service);
        let _ = writeln!(md, "| measurement | value |\n|---|---:|");
        let cold_starts = c
            .cold_starts_s
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
            + " s";
        let rows = [
            (
                "cold start: daemon launched to every frontend and backend in the maps, median",
                format!("{:.3} s", median(c.cold_starts_s.clone())),
            ),
            ("  each start, in order", cold_starts),
            (
                "  of which the daemon's syncs (map writes), median",
                format!("{:.3} s", c.cold_sync_s),
            ),
            (
                "same rules (iptables layout) with iptables-restore",
                format!("{:.3} s", c.iptables_restore_s),
            ),
            ("same rules (nftables layout) with nft -f", format!("{:.3} s", c.nft_s)),
            (
                "one EndpointSlice change, API write to maps updated, p50",
                format!("{:.2} ms", c.change_p50_ms),
            ),
            ("  p99", format!("{:.2} ms", c.change_p99_ms)),
            ("  max", format!("{:.2} ms", c.change_max_ms)),
            (
                "  the daemon's own view (change observed to maps written), mean",
                format!("{:.2} ms", c.change_daemon_mean_ms),
            ),
            (
                "  the daemon's sync per change, p50",
                format!("{:.0} us", c.change_sync_p50_us),
            ),
            ("  p99", format!("{:.0} us", c.change_sync_p99_us)),
            ("daemon resident memory (VmRSS)", format!("{:.1} MB", c.rss_mb)),
            (
                "BPF maps held (kernel memlock accounting)",
                format!("{:.1} MB", c.maps_mb),
            ),
        ];
        for (what, value) in rows {
            let _ = writeln!(md, "| {what} | {value} |");
        }
        let _ = writeln!(md, "\nEach cold start begins on a node with nothing pinned (`kpr uninstall` after the previous one), once the machine is idle: maps created, programs verified and attached, the cluster listed and modelled, every frontend and backend written. The 95% interval of the target row is the median's, from the starts' order statistics.");
        let _ = writeln!(md, "\n{} changes, each to one endpoint of one Service, spaced {} ms apart (past the daemon's minimum sync interval, so each is measured alone). The latency is measured end to end by the benchmark: from writing the EndpointSlice to the API server until the new backend is readable in the pinned BACKENDS map; it includes the watch delivery and the polling granularity (20 us).", c.changes, cfg.change_spacing_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::median_ci;

    #[test]
    fn the_medians_interval_is_the_order_statistics_a_binomial_allows() {
        let values = |n: usize| -> Vec<f64> { (1..=n).rev().map(|v| v as f64).collect() };
        // (samples, k): the k-th lowest and highest, from binomial tables.
        for (n, k) in [
            (1, 1),
            (5, 1),
            (6, 1),
            (8, 1),
            (9, 2),
            (16, 4),
            (25, 8),
            (40, 14),
            (100, 40),
        ] {
            assert_eq!(median_ci(&values(n)), (k as f64, (n + 1 - k) as f64), "{n} samples");
        }
        assert_eq!(median_ci(&[]), (0.0, 0.0));
    }
}
