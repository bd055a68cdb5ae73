//! `/healthz` and `/metrics`: what an operator (and the DaemonSet's probes)
//! see of the daemon. Metric names follow kube-proxy's where the meaning is
//! the same, so existing dashboards keep working.
use std::{
    collections::{BTreeMap, HashMap},
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use proxy_common::{addr_from_map, ServiceCounterKey, Stat};

use crate::dataplane::maps;

type Labels = Vec<(String, String)>;

/// kube-proxy's buckets for network programming latency, in seconds:
/// 0.25 and 0.5, every second to 59, every 5 to 115, every 30 to 300.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..=59).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    /// kube-proxy's network programming latency: from the cluster's
    /// change (the EndpointSlice's trigger time) to the maps holding it.
    pub network_programming: Histogram,
    /// From kpr observing a change (any: Services, slices, Nodes, the
    /// node's addresses) to the maps holding it.
    pub change_programming: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub services: Gauge,
    pub frontends: Gauge,
    pub endpoints: Gauge,
    pub sync_errors: Counter,
    pub rejections: Family<Labels, Counter>,
    pub rejected_objects: Gauge,
    pub ignored_slices: Family<Labels, Gauge>,
    pub unsupported_ports: Family<Labels, Gauge>,
    pub watch_errors: Family<Labels, Counter>,
    pub flow_entries: Gauge,
    pub flows_expired: Counter,
    /// kube-proxy's change trackers: Services with a Service (or endpoint)
    /// change not yet synced, and every change seen.
    pub service_changes_pending: Gauge,
    pub endpoint_changes_pending: Gauge,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    /// Service ports whose Local traffic policy finds no endpoint on this
    /// node, by `traffic_policy` (`internal`, `external`).
    pub no_local_endpoints: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        // 0.1 ms .. ~6.5 s: syncs and programming latencies from one map
        // write to a cold start of a large cluster.
        let buckets = || prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 17);
        let m = Metrics {
            sync_duration: Histogram::new(buckets()),
            network_programming: Histogram::new(network_programming_buckets()),
            change_programming: Histogram::new(buckets()),
            last_sync: Gauge::default(),
            services: Gauge::default(),
            frontends: Gauge::default(),
            endpoints: Gauge::default(),
            sync_errors: Counter::default(),
            rejections: Family::default(),
            rejected_objects: Gauge::default(),
            ignored_slices: Family::default(),
            unsupported_ports: Family::default(),
            watch_errors: Family::default(),
            flow_entries: Gauge::default(),
            flows_expired: Counter::default(),
            service_changes_pending: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time one sync of the dataplane maps took",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "Time from the change in the cluster (an EndpointSlice's last-change-trigger-time) to the maps holding it, for changes that reach the data path",
            m.network_programming.clone(),
        );
        registry.register(
            "kpr_change_programming_duration_seconds",
            "Time from kpr observing a change (Service, EndpointSlice, Node, the node's addresses) to the maps holding it",
            m.change_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the maps were last synced successfully (unix seconds)",
            m.last_sync.clone(),
        );
        registry.register(
            "kpr_programmed_services",
            "Services with at least one programmed frontend",
            m.services.clone(),
        );
        registry.register(
            "kpr_programmed_frontends",
            "Programmed service frontends (IP, port, protocol)",
            m.frontends.clone(),
        );
        registry.register(
            "kpr_programmed_endpoints",
            "Programmed backends over all frontends",
            m.endpoints.clone(),
        );
        registry.register(
            "kpr_sync_errors",
            "Syncs that could not write every change",
            m.sync_errors.clone(),
        );
        registry.register(
            "kpr_object_rejections",
            "Objects rejected, by kind and the field at fault",
            m.rejections.clone(),
        );
        registry.register(
            "kpr_rejected_objects",
            "Objects currently rejected",
            m.rejected_objects.clone(),
        );
        registry.register(
            "kpr_ignored_endpointslices",
            "EndpointSlices not programmed, by address type (IPv6 and FQDN are not supported)",
            m.ignored_slices.clone(),
        );
        registry.register(
            "kpr_unsupported_service_ports",
            "Service ports not programmed, by protocol",
            m.unsupported_ports.clone(),
        );
        registry.register(
            "kpr_watch_errors",
            "Failed lists and watches of the API server, by resource",
            m.watch_errors.clone(),
        );
        registry.register(
            "kpr_conntrack_entries",
            "Entries in the flow table (two per flow) after the last sweep",
            m.flow_entries.clone(),
        );
        registry.register(
            "kpr_conntrack_expired_entries",
            "Flow table entries removed by the sweep because their flow expired",
            m.flows_expired.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Services whose Service object changed since the last sync",
            m.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Services whose EndpointSlices changed since the last sync",
            m.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Service objects added, changed or deleted",
            m.service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "EndpointSlices added, changed or deleted",
            m.endpoint_changes.clone(),
        );
        // kube-proxy's name, although a gauge: the count as of the last sync.
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Service ports whose Local traffic policy finds no endpoint on this node (their traffic is dropped here), by traffic_policy",
            m.no_local_endpoints.clone(),
        );
        Metrics { registry, ..m }
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// kube-proxy's health: healthy unless a change has waited for the
/// dataplane longer than the health timeout (a sync failing or stuck).
pub struct Health {
    timeout: Duration,
    oldest_pending: Option<Instant>,
    last_updated: Option<SystemTime>,
    /// kube-proxy's node eligibility: `false` while the node is being
    /// deleted, so that `/healthz` (not `/livez`) turns load balancers away.
    pub node_eligible: bool,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        // Until the first sync, starting up counts as the pending change.
        Health {
            timeout,
            oldest_pending: Some(Instant::now()),
            last_updated: None,
            node_eligible: true,
        }
    }

    pub fn queued(&mut self, at: Instant) {
        self.oldest_pending.get_or_insert(at);
    }

    pub fn updated(&mut self) {
        self.oldest_pending = None;
        self.last_updated = Some(SystemTime::now());
    }

    pub fn healthy(&self) -> bool {
        self.oldest_pending.is_none_or(|t| t.elapsed() < self.timeout)
    }
}

pub struct Telemetry {
    pub metrics: Metrics,
    pub health: Mutex<Health>,
    pub pin_dir: PathBuf,
    /// What the per-service counters are labelled with, by service id
    /// (kept by the daemon as it programs frontends).
    pub frontends: Mutex<HashMap<u32, FrontendLabels>>,
    /// Per-backend counters too (one series per endpoint: off by default,
    /// for the cardinality).
    pub per_backend: bool,
}

/// A frontend as the per-service metrics (and `kpr services`) name it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrontendLabels {
    /// `namespace/name`
    pub service: String,
    /// `address:port/protocol`
    pub frontend: String,
    /// ClusterIP, NodePort, LoadBalancer, externalIP.
    pub kind: String,
}

impl Telemetry {
    pub fn new(pin_dir: PathBuf, health_timeout: Duration, per_backend: bool) -> Arc<Self> {
        Arc::new(Telemetry {
            metrics: Metrics::default(),
            health: Mutex::new(Health::new(health_timeout)),
            pin_dir,
            frontends: Mutex::new(HashMap::new()),
            per_backend,
        })
    }

    fn render_metrics(&self) -> String {
        let mut out = String::new();
        encode_registry(&mut out, &self.metrics.registry).expect("writing to a String");
        // The data path's own counters, read from the map at scrape time.
        if let Ok(stats) = maps::read_stats(&self.pin_dir) {
            out.push_str("# HELP kpr_datapath_packets Packets seen by the TC data path, by verdict.\n");
            out.push_str("# TYPE kpr_datapath_packets counter\n");
            for (stat, n) in stats.iter().filter(|(s, _)| !s.is_socket()) {
                out.push_str(&format!(
                    "kpr_datapath_packets_total{{verdict=\"{}\"}} {n}\n",
                    stat.name()
                ));
            }
            out.push_str(
                "# HELP kpr_socket_connects TCP connects to a service seen by the socket-level balancer, by verdict.\n",
            );
            out.push_str("# TYPE kpr_socket_connects counter\n");
            for (stat, n) in stats.iter().filter(|(s, _)| s.is_socket()) {
                out.push_str(&format!(
                    "kpr_socket_connects_total{{verdict=\"{}\"}} {n}\n",
                    stat.name()
                ));
            }
        }
        if let Ok(counters) = maps::FlowMaps::open(&self.pin_dir).and_then(|f| f.service_counters()) {
            let frontends = self.frontends.lock().expect("frontends lock");
            out.push_str(&render_service_counters(&counters, &frontends, self.per_backend));
        }
        encode_eof(&mut out).expect("writing to a String");
        out
    }
}

/// The per-service counters (see `ServiceCounterKey`): new flows, and new
/// flows refused or dropped by verdict; new flows per backend when asked.
/// Counters of ids no frontend has (a service just removed) are left out.
fn render_service_counters(
    counters: &HashMap<ServiceCounterKey, u64>,
    frontends: &HashMap<u32, FrontendLabels>,
    per_backend: bool,
) -> String {
    let mut new_flows: BTreeMap<u32, u64> = BTreeMap::new();
    let mut ended: BTreeMap<(u32, &str), u64> = BTreeMap::new();
    let mut backends: BTreeMap<(u32, SocketAddrV4), u64> = BTreeMap::new();
    for (key, n) in counters {
        if !frontends.contains_key(&key.service_id) {
            continue;
        }
        match Stat::from_index(key.stat as u32) {
            Some(Stat::NewFlow) => {
                *new_flows.entry(key.service_id).or_default() += n;
                let backend = SocketAddrV4::new(addr_from_map(key.addr), u16::from_be(key.port));
                *backends.entry((key.service_id, backend)).or_default() += n;
            }
            Some(stat) => *ended.entry((key.service_id, stat.name())).or_default() += n,
            None => {}
        }
    }
    let series = |id: &u32| {
        let f = &frontends[id];
        format!(
            "service=\"{}\",frontend=\"{}\",kind=\"{}\"",
            f.service, f.frontend, f.kind
        )
    };
    let mut out = String::new();
    out.push_str("# HELP kpr_service_new_flows New flows (TCP connections, UDP flows) sent to a backend, per service frontend.\n");
    out.push_str("# TYPE kpr_service_new_flows counter\n");
    for (id, n) in &new_flows {
        out.push_str(&format!("kpr_service_new_flows_total{{{}}} {n}\n", series(id)));
    }
    out.push_str("# HELP kpr_service_refused_or_dropped New flows of a service frontend refused (REJECT) or dropped, by verdict.\n");
    out.push_str("# TYPE kpr_service_refused_or_dropped counter\n");
    for ((id, verdict), n) in &ended {
        out.push_str(&format!(
            "kpr_service_refused_or_dropped_total{{{},verdict=\"{verdict}\"}} {n}\n",
            series(id)
        ));
    }
    if per_backend {
        out.push_str("# HELP kpr_backend_new_flows New flows sent to each backend of a service frontend.\n");
        out.push_str("# TYPE kpr_backend_new_flows counter\n");
        for ((id, backend), n) in &backends {
            out.push_str(&format!(
                "kpr_backend_new_flows_total{{{},backend=\"{backend}\"}} {n}\n",
                series(id)
            ));
        }
    }
    out
}

/// kube-proxy's `/healthz`: healthy while changes reach the data path in
/// time and the node is not being deleted (`nodeEligible`), so that a load
/// balancer checking it stops sending new connections to a node on its way
/// out.
async fn healthz(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    health_answer(&t, true)
}

/// kube-proxy's `/livez`: whether the daemon is alive, for a liveness
/// probe: `/healthz` less the node's eligibility (a node being deleted is
/// no reason to restart its proxy).
async fn livez(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    health_answer(&t, false)
}

fn health_answer(t: &Telemetry, with_eligibility: bool) -> impl IntoResponse {
    let (healthy, last_updated, eligible) = {
        let health = t.health.lock().expect("health lock");
        (health.healthy(), health.last_updated, health.node_eligible)
    };
    let eligibility = if with_eligibility {
        format!(",\"nodeEligible\":{eligible}")
    } else {
        String::new()
    };
    let body = format!(
        "{{\"lastUpdated\":{},\"currentTime\":\"{}\"{eligibility}}}\n",
        last_updated.map_or("null".to_string(), |u| format!("\"{}\"", rfc3339(u))),
        rfc3339(SystemTime::now())
    );
    let status = if healthy && (eligible || !with_eligibility) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [("content-type", "application/json")], body)
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        t.render_metrics(),
    )
}

/// Where the daemon tells which Service each programmed frontend belongs
/// to: the maps hold only service ids, so `kpr services` asks here to show
/// and filter by namespace and name.
pub const FRONTENDS_PATH: &str = "/frontends";

/// One programmed frontend, named: an element of `/frontends`' JSON array.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedFrontend {
    /// The service id the maps key it by.
    pub id: u32,
    #[serde(flatten)]
    pub labels: FrontendLabels,
}

async fn frontends(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    let mut named: Vec<NamedFrontend> = t
        .frontends
        .lock()
        .expect("frontends lock")
        .iter()
        .map(|(&id, labels)| NamedFrontend {
            id,
            labels: labels.clone(),
        })
        .collect();
    named.sort_by_key(|n| n.id);
    let body = serde_json::to_string(&named).expect("serializing strings and numbers");
    ([("content-type", "application/json")], body)
}

/// Asks the daemon serving `addr` (its `--metrics-bind-address`) which
/// Service each frontend belongs to.
pub fn fetch_frontend_names(addr: SocketAddr) -> anyhow::Result<Vec<NamedFrontend>> {
    let timeout = Duration::from_secs(2);
    let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    let (status, body) = http_get(stream, addr, FRONTENDS_PATH, timeout)?;
    if status != 200 {
        anyhow::bail!(
            "GET {FRONTENDS_PATH} answered {status} (a kpr daemon older than this CLI, or its health address?)"
        );
    }
    Ok(serde_json::from_str(&body)?)
}

/// A plain HTTP/1.0 GET of `path` over `stream`, connected to `to` (so a
/// caller may connect from wherever it must, another network namespace
/// say): the status code and the body.
pub fn http_get(
    mut stream: std::net::TcpStream,
    to: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response from {to}: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Serves `/healthz` and `/livez` on `addr` until the process ends; with
/// `everything`, also `/metrics` and `/frontends`. The health address is
/// bound on every interface by default, for load balancers' checks, so it
/// serves health alone, as kube-proxy's does: the counters and Service
/// names stay on the metrics address (loopback by default).
pub async fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>, everything: bool) -> anyhow::Result<()> {
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez));
    if everything {
        app = app
            .route("/metrics", get(metrics))
            .route(FRONTENDS_PATH, get(frontends));
    }
    let app = app.with_state(telemetry);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the health/metrics server to {addr}: {e}"))?;
    let served = if everything {
        format!("/healthz, /livez, /metrics and {FRONTENDS_PATH}")
    } else {
        "/healthz and /livez".to_string()
    };
    tracing::info!(%addr, "serving {served}");
    axum::serve(listener, app).await?;
    Ok(())
}

/// `2026-11-22T22:01:05Z`
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_384_865)),
            "2026-11-22T22:01:05Z"
        );
    }

    #[test]
    fn health_follows_pending_changes() {
        let mut h = Health::new(Duration::from_millis(50));
        assert!(h.healthy(), "starting up is healthy within the timeout");
        h.updated();
        assert!(h.healthy());
        h.queued(Instant::now() - Duration::from_millis(100));
        assert!(!h.healthy(), "a change waiting past the timeout is unhealthy");
        h.updated();
        assert!(h.healthy());
    }

    #[test]
    fn service_counters_are_labelled_by_service_and_summed_per_frontend() {
        let backend = |last: u8| {
            (
                proxy_common::addr_to_map(std::net::Ipv4Addr::new(10, 1, 0, last)),
                8080u16.to_be(),
            )
        };
        let key = |id: u32, (addr, port): (u32, u16), stat: Stat| ServiceCounterKey {
            service_id: id,
            addr,
            port,
            stat: stat as u16,
        };
        let counters: HashMap<ServiceCounterKey, u64> = [
            (key(1, backend(5), Stat::NewFlow), 3),
            (key(1, backend(6), Stat::NewFlow), 2),
            (key(1, (0, 0), Stat::Rejected), 4),
            (key(1, (0, 0), Stat::SocketRejected), 1),
            // An id no frontend has any more: left out.
            (key(9, backend(7), Stat::NewFlow), 8),
        ]
        .into();
        let frontends: HashMap<u32, FrontendLabels> = [(
            1,
            FrontendLabels {
                service: "default/web".into(),
                frontend: "10.96.0.1:80/TCP".into(),
                kind: "ClusterIP".into(),
            },
        )]
        .into();
        let series = "service=\"default/web\",frontend=\"10.96.0.1:80/TCP\",kind=\"ClusterIP\"";
        let text = render_service_counters(&counters, &frontends, false);
        assert!(
            text.contains(&format!("kpr_service_new_flows_total{{{series}}} 5\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "kpr_service_refused_or_dropped_total{{{series},verdict=\"rejected\"}} 4\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "kpr_service_refused_or_dropped_total{{{series},verdict=\"socket_rejected\"}} 1\n"
            )),
            "{text}"
        );
        assert!(
            !text.contains("kpr_backend_new_flows") && !text.contains(" 8\n"),
            "{text}"
        );
        let text = render_service_counters(&counters, &frontends, true);
        assert!(
            text.contains(&format!(
                "kpr_backend_new_flows_total{{{series},backend=\"10.1.0.5:8080\"}} 3\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "kpr_backend_new_flows_total{{{series},backend=\"10.1.0.6:8080\"}} 2\n"
            )),
            "{text}"
        );
    }

    #[test]
    fn metrics_use_kube_proxy_names() {
        let t = Telemetry::new("/nonexistent".into(), Duration::from_secs(1), false);
        t.metrics.sync_duration.observe(0.002);
        t.metrics
            .rejections
            .get_or_create(&labels(&[("kind", "Service"), ("field", "spec.ports[].port")]))
            .inc();
        let text = t.render_metrics();
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("kpr_object_rejections_total{kind=\"Service\",field=\"spec.ports[].port\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
