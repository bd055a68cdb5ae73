//! The control plane at scale: a cold start of many Services with many
//! endpoints each, the latency of single EndpointSlice changes while they
//! are programmed, and the daemon's memory — against the time kube-proxy's
//! two backends take to load the same rules.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use proxy_common::{BackendKey, ServiceKey, IPPROTO_TCP};
use serde_json::json;

use super::{datapath::load_rules, median, percentile, quiet, rules, service_vip, BenchConfig};
use crate::{netns::Netns, unique_id, Cluster, ClusterSpec};

#[derive(Debug, Default)]
pub struct Results {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Daemon start to every frontend and backend in the maps, one per
    /// cold start (each on a node with nothing pinned).
    pub cold_starts_s: Vec<f64>,
    /// Time the daemon spent in syncs until then (its own accounting),
    /// median over the cold starts.
    pub cold_sync_s: f64,
    pub iptables_restore_s: f64,
    pub nft_s: f64,
    pub changes: usize,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
    /// The daemon's own view: change observed to maps written, mean.
    pub change_daemon_mean_ms: f64,
    /// The daemon's own sync time per change (from its log).
    pub change_sync_p50_us: f64,
    pub change_sync_p99_us: f64,
    pub rss_mb: f64,
    pub maps_mb: f64,
}

fn endpoint_ip(service: usize, endpoint: usize) -> Ipv4Addr {
    let n = (service * 16 + endpoint) as u32;
    Ipv4Addr::from(u32::from_be_bytes([10, 128, 0, 0]) + n)
}

fn service_json(i: usize) -> serde_json::Value {
    let vip = service_vip(i).to_string();
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

fn slice_json(i: usize, endpoints: &[Ipv4Addr]) -> serde_json::Value {
    let eps: Vec<_> = endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": eps})
}

/// Sum of `took_us` of the daemon's sync log lines.
fn sync_times_us(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("synced"))
        .filter_map(sync_time_us)
        .collect()
}

/// The time a "synced" log line says the sync took.
fn sync_time_us(line: &str) -> Option<f64> {
    line.split("took_us=").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// (sum in seconds, count) of the daemon's network programming latency.
fn programming_latency(cluster: &Cluster) -> Result<(f64, f64)> {
    let (_, text) = crate::pod::http_get(cluster.node(), "127.0.0.1:10249".parse()?, "/metrics")?;
    let value = |name: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .with_context(|| format!("no {name} in the daemon's metrics"))
    };
    Ok((
        value("kpr_change_programming_duration_seconds_sum")?,
        value("kpr_change_programming_duration_seconds_count")?,
    ))
}

fn status_kb(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

/// Memory the kernel charges for the BPF maps the process holds.
fn maps_bytes(pid: u32) -> Result<f64> {
    let mut total = 0.0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(fd?.path()).unwrap_or_default();
        if info.contains("map_type:") {
            if let Some(v) = info.lines().find_map(|l| l.strip_prefix("memlock:")) {
                total += v.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(total)
}

pub fn run(cfg: &BenchConfig, progress: &dyn Fn(&str)) -> Result<Results> {
    let (n, per) = (cfg.cp_services, cfg.cp_endpoints);
    let mut results = Results {
        services: n,
        endpoints_per_service: per,
        changes: cfg.cp_changes,
        ..Default::default()
    };
    if !cfg.skip_rule_loads {
        progress(&format!(
            "control plane: loading {n} services x {per} endpoints into iptables and nftables"
        ));
        load_kube_proxy_rules(n, per, &mut results)?;
    }
    cold_start_and_changes(cfg, progress, results)
}

fn load_kube_proxy_rules(n: usize, per: usize, results: &mut Results) -> Result<()> {
    let scratch = Netns::new(&format!("{}-rules", unique_id()))?;
    let tmp = std::env::temp_dir().join(unique_id());
    std::fs::create_dir_all(&tmp)?;
    let rule_services: Vec<rules::RuleService> = (0..n)
        .map(|i| {
            rules::RuleService::cluster_ip(
                format!("svc-{i}"),
                service_vip(i),
                80,
                (0..per).map(|e| (endpoint_ip(i, e), 8080)).collect(),
            )
        })
        .collect();
    results.iptables_restore_s = load_rules(
        &scratch.name,
        "iptables-restore",
        &[],
        &rules::iptables_restore(&rule_services),
        &tmp,
    )?;
    results.nft_s = load_rules(&scratch.name, "nft", &["-f"], &rules::nft_script(&rule_services), &tmp)?;
    drop(scratch);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn cold_start_and_changes(cfg: &BenchConfig, progress: &dyn Fn(&str), mut results: Results) -> Result<Results> {
    let (n, per) = (cfg.cp_services, cfg.cp_endpoints);
    progress(&format!(
        "control plane: cold start of the daemon on {n} services x {per} endpoints"
    ));
    let mut cluster = Cluster::start(
        ClusterSpec::pods("p", 1)
            .with_api_server()
            .without_daemon()
            .with_default_timings(),
    )?;
    for i in 0..n {
        cluster.api().apply_json(service_json(i))?;
        let eps: Vec<Ipv4Addr> = (0..per).map(|e| endpoint_ip(i, e)).collect();
        cluster.api().apply_json(slice_json(i, &eps))?;
    }
    let want = format!("endpoints={}", n * per);
    let mut syncs_s = Vec::with_capacity(cfg.cold_starts);
    for start in 0..cfg.cold_starts {
        // Each start finds a node with nothing pinned: maps created, programs
        // verified, everything written afresh, as on a new node.
        if start > 0 {
            cluster.stop_daemon()?;
            cluster.kpr(&["uninstall"])?;
        }
        let synced_before = cluster.log().lines().filter(|l| l.contains("synced")).count();
        quiet::settle(progress);
        let started = Instant::now();
        cluster.start_daemon()?;
        loop {
            let log = cluster.log();
            let this_start = log.lines().filter(|l| l.contains("synced")).skip(synced_before);
            if this_start.clone().any(|l| l.contains(&want)) {
                results.cold_starts_s.push(started.elapsed().as_secs_f64());
                syncs_s.push(this_start.filter_map(sync_time_us).sum::<f64>() / 1e6);
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("the daemon did not program {n} services in 120 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    results.cold_sync_s = median(syncs_s);

    progress(&format!("control plane: {} single endpoint changes", cfg.cp_changes));
    let maps = proxy_user::dataplane::maps::ServiceMaps::open(&cluster.pin_dir)?;
    let syncs_before = sync_times_us(&cluster.log()).len();
    let programming_before = programming_latency(&cluster)?;
    let mut latencies = Vec::with_capacity(cfg.cp_changes);
    for k in 0..cfg.cp_changes {
        let i = (k * 7919) % n;
        let fresh = Ipv4Addr::from(u32::from_be_bytes([10, 160, 0, 0]) + k as u32);
        let mut eps: Vec<Ipv4Addr> = (1..per).map(|e| endpoint_ip(i, e)).collect();
        eps.push(fresh);
        let id = maps
            .service(&ServiceKey::new(service_vip(i), 80, IPPROTO_TCP))?
            .context("service not programmed")?
            .id;
        let t0 = Instant::now();
        cluster.api().apply_json(slice_json(i, &eps))?;
        loop {
            let done = (0..per as u32).any(|slot| {
                maps.backend(&BackendKey { service_id: id, slot })
                    .ok()
                    .flatten()
                    .is_some_and(|b| b.ip() == fresh)
            });
            if done {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("change {k} not programmed after 10 s");
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
        // Space changes past the daemon's minimum sync interval, so that each
        // is measured alone rather than coalesced with the next.
        std::thread::sleep(Duration::from_millis(cfg.change_spacing_ms));
    }
    results.change_p50_ms = median(latencies.clone());
    results.change_p99_ms = percentile(latencies.clone(), 0.99);
    results.change_max_ms = latencies.iter().copied().fold(0.0, f64::max);
    let syncs: Vec<f64> = sync_times_us(&cluster.log()).into_iter().skip(syncs_before).collect();
    let programming_after = programming_latency(&cluster)?;
    let observed = programming_after.1 - programming_before.1;
    if observed > 0.0 {
        results.change_daemon_mean_ms = (programming_after.0 - programming_before.0) / observed * 1e3;
    }
    results.change_sync_p50_us = median(syncs.clone());
    results.change_sync_p99_us = percentile(syncs, 0.99);
    let pid = cluster.daemon_pid().context("daemon pid")?;
    results.rss_mb = status_kb(pid, "VmRSS:")? / 1024.0;
    results.maps_mb = maps_bytes(pid)? / (1024.0 * 1024.0);
    if std::env::var_os("KPR_BENCH_SHOW_LOG").is_some() {
        eprintln!("{}", cluster.log());
    }
    Ok(results)
}
