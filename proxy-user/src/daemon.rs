//! The daemon: a source keeps the cluster state; the sync loop turns it into
//! map contents; the attacher keeps the programs on the node's interfaces.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use aya::Ebpf;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::{
    dataplane::{
        loader::{self, Role, XdpSetting},
        maps::{FlowMaps, ServiceMaps},
        socket_lb,
    },
    healthcheck::HealthCheckServers,
    model::topology::NodePortAddresses,
    model::{Frontend, FrontendState},
    source::{self, manifests::ManifestDir, state::ClusterState},
    sync::{SyncReport, Syncer},
    telemetry::{self, labels, FrontendLabels, Telemetry},
};

pub enum SourceConfig {
    /// Standalone: a directory of manifests, checked every `poll`.
    Manifests { dir: PathBuf, poll: Duration },
    /// The Kubernetes API.
    Kube { kubeconfig: Option<PathBuf> },
}

pub struct Config {
    pub pin_dir: PathBuf,
    pub source: SourceConfig,
    pub node_name: String,
    /// Interface names to attach to; a trailing `*` matches a prefix.
    pub interfaces: Vec<String>,
    /// Of those, the ones traffic from outside arrives on, besides the ones
    /// that hold one of the node's addresses.
    pub external_interfaces: Vec<String>,
    pub nodeport_addresses: NodePortAddresses,
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// Syncs are at least this far apart; a burst of changes within it
    /// becomes one sync, and no change waits longer than this.
    pub min_sync_interval: Duration,
    /// A full resync (maps re-read and repaired) runs this often.
    pub sync_period: Duration,
    pub healthz_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// Per-backend new-flow counters on /metrics too.
    pub metrics_per_backend: bool,
    /// The cgroup the socket-level balancer is attached to; none: TC only.
    pub socket_lb: Option<PathBuf>,
    /// How often expired flows are swept from the flow table.
    pub flow_sweep_interval: Duration,
    /// Where the XDP program runs on the external interfaces.
    pub xdp: XdpSetting,
    /// Remove kube-proxy's rules once the first sync has programmed every
    /// Service and taken over the connections they translated.
    pub cleanup_kube_proxy: bool,
}

fn matches(patterns: &[String], iface: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => iface.starts_with(prefix),
        None => p == iface,
    })
}

/// Keeps the classifiers attached to every matching interface, including
/// pods' veths that appear after start: the external one where traffic
/// from outside arrives (an interface holding one of the node's addresses,
/// or named by `--external-interfaces`), the pod one everywhere else, and
/// the host one at the egress of the external interfaces and `lo`.
struct Attacher {
    patterns: Vec<String>,
    external: Vec<String>,
    /// By interface and direction (egress or not).
    attached: BTreeMap<(String, bool), Role>,
    /// Interfaces left alone because they carry no Ethernet header (the
    /// programs parse one), reported once.
    not_ethernet: BTreeSet<String>,
    /// Where the XDP program goes on the external interfaces.
    xdp: XdpSetting,
    /// External interfaces with the XDP program, and its mode there.
    xdp_attached: BTreeMap<String, &'static str>,
}

impl Attacher {
    /// `addresses`: the interfaces' IPv4 addresses; `node_addrs`: the node's own.
    fn refresh(&mut self, ebpf: &mut Ebpf, pin_dir: &Path, addresses: &[(String, Ipv4Addr)], node_addrs: &[Ipv4Addr]) {
        let present: BTreeSet<String> = loader::interfaces()
            .into_iter()
            .filter(|i| matches(&self.patterns, i))
            .collect();
        let mut wanted = vec![("lo".to_string(), Role::Host)];
        for iface in &present {
            if self.not_ethernet.contains(iface) {
                continue;
            }
            // A link type never changes: read once, for an interface not
            // attached yet.
            let known = self.attached.contains_key(&(iface.clone(), false));
            if !known && loader::link_type(iface) != Some(loader::ARPHRD_ETHER) {
                tracing::info!(
                    %iface,
                    link_type = ?loader::link_type(iface),
                    "not attached: no Ethernet header (tun, WireGuard, IPIP); its traffic is handled where it enters or leaves as Ethernet"
                );
                self.not_ethernet.insert(iface.clone());
                continue;
            }
            let holds_node_addr = addresses.iter().any(|(i, a)| i == iface && node_addrs.contains(a));
            if holds_node_addr || matches(&self.external, iface) {
                wanted.push((iface.clone(), Role::External));
                wanted.push((iface.clone(), Role::Host));
            } else {
                wanted.push((iface.clone(), Role::Pods));
            }
        }
        self.not_ethernet.retain(|i| present.contains(i));
        self.refresh_xdp(ebpf, pin_dir, &wanted);
        for (iface, role) in &wanted {
            let key = (iface.clone(), role.is_egress());
            if self.attached.get(&key) == Some(role) {
                continue;
            }
            match loader::attach(ebpf, pin_dir, iface, *role) {
                Ok(()) => {
                    tracing::info!(%iface, ?role, "attached");
                    self.attached.insert(key, *role);
                }
                Err(e) => tracing::warn!(%iface, ?role, error = format!("{e:#}"), "cannot attach; will retry"),
            }
        }
        let wanted: BTreeSet<(String, bool)> = wanted.into_iter().map(|(i, r)| (i, r.is_egress())).collect();
        for key in self
            .attached
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect::<Vec<_>>()
        {
            let (iface, egress) = &key;
            if !present.contains(iface) {
                loader::forget(pin_dir, iface);
                tracing::info!(%iface, "interface gone");
            } else if *egress {
                loader::detach_egress(pin_dir, iface);
                tracing::info!(%iface, "no longer external: host program detached");
            }
            self.attached.remove(&key);
        }
    }

    /// The XDP program on every external interface (`wanted` with the
    /// External role), and on no other.
    fn refresh_xdp(&mut self, ebpf: &mut Ebpf, pin_dir: &Path, wanted: &[(String, Role)]) {
        let external: BTreeSet<&String> = wanted
            .iter()
            .filter(|(_, r)| *r == Role::External)
            .map(|(i, _)| i)
            .collect();
        if self.xdp != XdpSetting::Off {
            for iface in &external {
                if self.xdp_attached.contains_key(*iface) {
                    continue;
                }
                match loader::attach_xdp(ebpf, pin_dir, iface, self.xdp) {
                    Ok(mode) => {
                        if loader::xdp_runs(mode) {
                            tracing::info!(%iface, mode, "XDP attached");
                        } else {
                            tracing::info!(%iface, mode, "XDP not used; the TC program serves alone");
                        }
                        // Either way, not asked again while external.
                        self.xdp_attached.insert((*iface).clone(), mode);
                    }
                    Err(e) => {
                        tracing::warn!(%iface, error = format!("{e:#}"), "cannot attach XDP; the TC program serves alone")
                    }
                }
            }
        }
        let stale: Vec<String> = self
            .xdp_attached
            .keys()
            .filter(|i| !external.contains(i))
            .cloned()
            .collect();
        for iface in stale {
            loader::detach_xdp(pin_dir, &iface);
            self.xdp_attached.remove(&iface);
        }
    }
}

pub async fn run(config: Config) -> Result<()> {
    // kube-proxy's health timeout: twice the sync period.
    let telemetry = Telemetry::new(
        config.pin_dir.clone(),
        config.sync_period * 2,
        config.metrics_per_backend,
    );
    // The watchers list the cluster (most of a cold start at scale) on the
    // runtime's workers while the dataplane is loaded here; nothing is
    // programmed before the sync loop starts below.
    let mut initial = ClusterState::with_node_settings(
        config.node_name.clone(),
        config.nodeport_addresses.clone(),
        config.node_port_range.clone(),
    );
    let addresses = loader::interface_addresses();
    initial.set_interface_addresses(addresses.iter().map(|(_, a)| *a).collect());
    let state = Arc::new(Mutex::new(initial));
    let (changed, changes) = unbounded_channel();
    match &config.source {
        SourceConfig::Manifests { dir, poll } => {
            tokio::spawn(watch_manifests(ManifestDir::new(dir), *poll, state.clone(), changed));
        }
        SourceConfig::Kube { kubeconfig } => {
            let client = source::kube::client(kubeconfig.as_deref()).await?;
            source::kube::spawn_watchers(client, state.clone(), changed, telemetry.clone());
        }
    }

    let mut ebpf = loader::load(&config.pin_dir)?;
    // The pre-filter before any program is attached: one the load had to
    // create anew (an older layout) must already pass every programmed
    // service and tracked flow when the new programs see their first packet.
    let mut maps = ServiceMaps::open(&config.pin_dir)?;
    let flows = FlowMaps::open(&config.pin_dir)?;
    maps.rebuild_filter(&flows)
        .context("rebuilding the data path's pre-filter")?;
    // Links pinned by a previous run on interfaces that still exist are
    // taken over by `attach`; the others are stale.
    let existing: BTreeSet<String> = loader::interfaces().into_iter().collect();
    for iface in loader::attached_interfaces(&config.pin_dir) {
        let kept = iface == "lo" || (existing.contains(&iface) && matches(&config.interfaces, &iface));
        if !kept {
            loader::forget(&config.pin_dir, &iface);
        }
        // An earlier run's XDP link stays attached until unpinned: with XDP
        // off now, it goes (with it on, `refresh_xdp` takes it over).
        if config.xdp == XdpSetting::Off {
            loader::detach_xdp(&config.pin_dir, &iface);
        }
    }
    loader::accept_local_on_lo()?;
    let mut attacher = Attacher {
        patterns: config.interfaces.clone(),
        external: config.external_interfaces.clone(),
        attached: BTreeMap::new(),
        not_ethernet: BTreeSet::new(),
        xdp: config.xdp,
        xdp_attached: BTreeMap::new(),
    };
    let node_addrs = state.lock().expect("state lock").node_addresses();
    attacher.refresh(&mut ebpf, &config.pin_dir, &addresses, &node_addrs);
    match &config.socket_lb {
        Some(cgroup) => {
            socket_lb::attach(&mut ebpf, &config.pin_dir, cgroup)?;
            tracing::info!(cgroup = %cgroup.display(), "socket-level balancer attached for TCP");
        }
        None => socket_lb::detach(&config.pin_dir)?,
    }
    // Flows the programs replaced just now created since the rebuild.
    maps.mark_tracked_backends(&flows)
        .context("marking the backends of tracked flows")?;

    let syncer = Syncer::recover(&mut maps).context("reading the maps left by a previous run")?;
    tracing::info!(
        frontends = syncer.frontend_count(),
        pin_dir = %config.pin_dir.display(),
        node = %config.node_name,
        "dataplane loaded"
    );

    // One address for both: one server with everything.
    let health_only = config.healthz_addr.filter(|a| Some(*a) != config.metrics_addr);
    let servers = [(health_only, false), (config.metrics_addr, true)];
    for (addr, everything) in servers.into_iter().filter_map(|(a, e)| Some((a?, e))) {
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve(addr, telemetry, everything).await {
                tracing::error!("{e:#}");
            }
        });
    }

    spawn_flow_sweeper(&config, telemetry.clone())?;
    spawn_netfilter_adopter(&config)?;

    let mut sync = SyncLoop {
        maps,
        flows,
        syncer,
        state,
        health_checks: HealthCheckServers::new(telemetry.clone()),
        telemetry,
        snat_addr: None,
        nat_exhausted: 0,
        adopt_until: Instant::now() + NETFILTER_ADOPTION,
        cleanup_kube_proxy: config.cleanup_kube_proxy,
    };
    sync.run(&config, changes, &mut attacher, &mut ebpf).await?;
    // Pins stay: the dataplane keeps forwarding until the next daemon
    // takes over (or `kpr uninstall` removes it).
    tracing::info!("stopping; the dataplane stays pinned");
    Ok(())
}

async fn watch_manifests(
    mut dir: ManifestDir,
    poll: Duration,
    state: Arc<Mutex<ClusterState>>,
    changed: UnboundedSender<Instant>,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let observed = Instant::now();
        match dir.scan() {
            Ok(Some(scan)) => {
                for problem in &scan.new_problems {
                    tracing::warn!("rejected: {problem}");
                }
                state.lock().expect("state lock").replace_snapshot(scan.snapshot);
                if changed.send(observed).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the manifest directory; keeping the current state"),
        }
    }
}

struct SyncLoop {
    maps: ServiceMaps,
    flows: FlowMaps,
    syncer: Syncer,
    state: Arc<Mutex<ClusterState>>,
    telemetry: Arc<Telemetry>,
    health_checks: HealthCheckServers,
    /// What the data path was last told to source-NAT to.
    snat_addr: Option<Option<Ipv4Addr>>,
    /// New flows dropped for want of a NAT port, as last reported.
    nat_exhausted: u64,
    /// Until when netfilter's translated connections are taken over (see
    /// `adopt_netfilter_connections`): the first moments after a start,
    /// while kube-proxy's rules may still be making them.
    adopt_until: Instant,
    /// kube-proxy's rules are still to be removed (`--cleanup-kube-proxy`).
    cleanup_kube_proxy: bool,
}

/// How long after a start netfilter's connections are adopted: kube-proxy's
/// rules may still be there for a moment (a migration removes them after
/// kpr is up), making connections kpr must leave to netfilter.
const NETFILTER_ADOPTION: Duration = Duration::from_secs(30);

/// Sweeps expired flows from the flow table every `flow_sweep_interval`,
/// on a thread of its own: a full table takes a while to read, and syncs
/// must not wait for it.
fn spawn_flow_sweeper(config: &Config, telemetry: Arc<Telemetry>) -> Result<()> {
    let mut flows = FlowMaps::open(&config.pin_dir)?;
    let interval = config.flow_sweep_interval;
    std::thread::Builder::new()
        .name("flow-sweeper".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            match flows.sweep(crate::dataplane::monotonic_secs()) {
                Ok(report) => {
                    let metrics = &telemetry.metrics;
                    metrics.flow_entries.set(report.entries as i64);
                    metrics.flows_expired.inc_by(report.removed as u64);
                    if report.removed > 0 || report.stamped > 0 {
                        tracing::debug!(?report, "flow table swept");
                    }
                }
                Err(e) => tracing::warn!(error = format!("{e:#}"), "sweeping the flow table"),
            }
        })
        .context("starting the flow sweeper")?;
    Ok(())
}

/// For the first `NETFILTER_ADOPTION` after a start, takes over once a
/// second the connections netfilter translated to frontends programmed
/// since the first sync (which took over those of the frontends it wrote),
/// on a thread of its own so that syncs never wait for netfilter's table.
/// It only adds flows and ORs filter bits, as the data path does, so it
/// may run beside the syncs.
fn spawn_netfilter_adopter(config: &Config) -> Result<()> {
    let pin_dir = config.pin_dir.clone();
    let until = Instant::now() + NETFILTER_ADOPTION;
    std::thread::Builder::new()
        .name("netfilter-adopter".into())
        .spawn(move || {
            while Instant::now() < until {
                std::thread::sleep(Duration::from_secs(1));
                // Opened each time, not held: a few syscalls beside the read
                // of netfilter's table.
                let opened = ServiceMaps::open(&pin_dir).and_then(|m| Ok((m, FlowMaps::open(&pin_dir)?)));
                match opened {
                    Ok((mut maps, mut flows)) => adopt_netfilter_connections(&mut maps, &mut flows),
                    Err(e) => tracing::warn!(error = format!("{e:#}"), "netfilter adopter: opening the maps"),
                }
            }
        })
        .context("starting the netfilter adopter")?;
    Ok(())
}

const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

impl SyncLoop {
    /// Running out of NAT ports drops new flows: the metric counts them
    /// (`kpr_datapath_packets_total{verdict="nat_exhausted"}`), and the log
    /// says so within a second, once per burst.
    fn report_nat_exhaustion(&mut self, pin_dir: &Path) {
        let Ok(stats) = crate::dataplane::maps::read_stats(pin_dir) else {
            return;
        };
        let now = stats
            .iter()
            .find(|(s, _)| *s == proxy_common::Stat::NatExhausted)
            .map_or(0, |(_, n)| *n);
        if now > self.nat_exhausted {
            tracing::warn!(
                dropped = now - self.nat_exhausted,
                total = now,
                "new flows dropped: every NAT port tried towards their backend is held by a live flow \
                 ({} ports per backend: {:?}; see kpr_datapath_packets_total{{verdict=\"nat_exhausted\"}})",
                proxy_common::NAT_PORT_COUNT,
                proxy_common::NAT_PORT_RANGES
            );
        }
        self.nat_exhausted = now;
    }

    async fn run(
        &mut self,
        config: &Config,
        mut changes: UnboundedReceiver<Instant>,
        attacher: &mut Attacher,
        ebpf: &mut Ebpf,
    ) -> Result<()> {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + config.sync_period, config.sync_period);
        let mut attach = tokio::time::interval(Duration::from_secs(1));
        let mut pending: Vec<Instant> = Vec::new();
        let mut full = false;
        // The first sync writes the whole desired state: whatever the maps
        // kept from before (a Service deleted, a port changed, an endpoint
        // removed while no daemon ran) goes as soon as the daemon is ready,
        // not at the first periodic resync. The maps were just read.
        let mut complete = true;
        let mut retry: Option<tokio::time::Instant> = None;
        let mut last_sync: Option<Instant> = None;
        loop {
            tokio::select! {
                Some(at) = changes.recv() => pending.push(at),
                _ = resync.tick() => full = true,
                _ = attach.tick() => {
                    // The node's addresses decide the NodePorts' addresses
                    // and which interfaces are external.
                    let addresses = loader::interface_addresses();
                    let (moved, node_addrs) = {
                        let mut state = self.state.lock().expect("state lock");
                        let before = state.nodeport_addresses().to_vec();
                        state.set_interface_addresses(addresses.iter().map(|(_, a)| *a).collect());
                        (state.nodeport_addresses() != before, state.node_addresses())
                    };
                    attacher.refresh(ebpf, &config.pin_dir, &addresses, &node_addrs);
                    self.report_nat_exhaustion(&config.pin_dir);
                    if !moved {
                        continue;
                    }
                    tracing::info!(addresses = ?node_addrs, "the node's addresses changed");
                    pending.push(Instant::now());
                }
                _ = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)), if retry.is_some() => retry = None,
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
            }
            if pending.is_empty() && !full {
                continue;
            }
            if let Some(oldest) = pending.iter().min() {
                self.telemetry.health.lock().expect("health lock").queued(*oldest);
            }
            // Rate limit: one sync per interval; what arrives meanwhile joins it.
            if let Some(last) = last_sync {
                let ready = last + config.min_sync_interval;
                if Instant::now() < ready {
                    tokio::time::sleep_until(ready.into()).await;
                }
            }
            while let Ok(at) = changes.try_recv() {
                pending.push(at);
            }
            let ok = self.sync(full, complete, &pending);
            last_sync = Some(Instant::now());
            if ok {
                pending.clear();
                full = false;
                complete = false;
            } else {
                // Keep the changes pending (health goes stale if this lasts)
                // and try again with a full resync.
                full = true;
                retry = Some(tokio::time::Instant::now() + RETRY_AFTER_FAILURE);
            }
        }
    }

    /// One sync: only what changed since the last one, or, when `full`,
    /// everything after re-reading the maps, so that drift (entries changed
    /// behind our back) is repaired; when `complete`, everything against the
    /// maps as last read. `false` when a write failed.
    fn sync(&mut self, full: bool, complete: bool, pending: &[Instant]) -> bool {
        let started = Instant::now();
        let metrics = &self.telemetry.metrics;
        // Re-reading every map takes a while at scale: done before taking
        // the state lock, so the watchers keep applying events meanwhile.
        if full {
            match Syncer::recover(&mut self.maps) {
                Ok(syncer) => self.syncer = syncer,
                Err(e) => {
                    tracing::error!(error = %e, "resync: cannot read the maps");
                    metrics.sync_errors.inc();
                    return false;
                }
            }
        }
        let mut state = self.state.lock().expect("state lock");
        let changes = if full || complete {
            state.take_changes_for_whole_sync()
        } else {
            state.take_changes()
        };
        for conflict in &changes.conflicts {
            tracing::warn!("rejected: {conflict}");
        }
        for note in &changes.notes {
            tracing::warn!("not served: {note}");
        }
        let report = if full || complete {
            let desired = state.desired();
            let report = self.syncer.sync(&desired, &mut self.maps);
            self.label_frontends(true, desired.frontends.iter(), &report);
            report
        } else {
            let frontends: Vec<_> = changes.frontends.iter().map(|(f, s)| (*f, s.as_ref())).collect();
            let report = self.syncer.sync_changes(&frontends, &mut self.maps);
            let changed = changes.frontends.iter().filter_map(|(f, s)| Some((f, s.as_ref()?)));
            self.label_frontends(false, changed, &report);
            report
        };
        let (services, frontends, endpoints) = state.counts();
        let (rejected, ignored, unsupported) = (
            state.rejected_count(),
            state.ignored_slices(),
            state.unsupported_ports(),
        );
        let (snat_addr, health_checks) = (state.snat_addr(), state.health_checks());
        let (service_changes, endpoint_changes) = state.pending_changes();
        let no_local = state.no_local_endpoints();
        let node_eligible = state.node_eligible();
        drop(state);
        metrics.service_changes_pending.set(service_changes as i64);
        metrics.endpoint_changes_pending.set(endpoint_changes as i64);
        for (policy, n) in [("internal", no_local.internal), ("external", no_local.external)] {
            metrics
                .no_local_endpoints
                .get_or_create(&labels(&[("traffic_policy", policy)]))
                .set(n as i64);
        }
        {
            let mut health = self.telemetry.health.lock().expect("health lock");
            if health.node_eligible != node_eligible {
                tracing::info!(
                    node_eligible,
                    "node eligibility for new traffic changed: /healthz answers {}",
                    if node_eligible {
                        "200 again"
                    } else {
                        "503 (the node is being deleted)"
                    }
                );
                health.node_eligible = node_eligible;
            }
        }
        self.health_checks.update(health_checks);
        if self.snat_addr != Some(snat_addr) {
            match self.maps.set_snat_addr(snat_addr) {
                Ok(()) => {
                    tracing::info!(address = ?snat_addr, "source NAT address");
                    self.snat_addr = Some(snat_addr);
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "cannot set the source NAT address");
                    metrics.sync_errors.inc();
                    return false;
                }
            }
        }
        // The whole state, just written (the start's first sync): whatever
        // netfilter translated to it is taken over before the daemon says
        // it is ready. Later syncs leave it to the adopter thread: reading
        // netfilter's table takes ~12 ms here even when it is empty (the
        // kernel walks every bucket of its hash), which no endpoint change
        // should wait for.
        if (full || complete) && Instant::now() < self.adopt_until {
            adopt_netfilter_connections(&mut self.maps, &mut self.flows);
        }
        // Only now, with every frontend programmed and the connections
        // kube-proxy's rules translated taken over: removing the rules
        // earlier (an init container) would strip those connections' NAT
        // with nobody to carry them on.
        if self.cleanup_kube_proxy && report.failures.is_empty() {
            self.cleanup_kube_proxy = false;
            match crate::cleanup::cleanup_kube_proxy() {
                Ok(removed) => tracing::info!(
                    iptables_chains = removed.iptables_chains,
                    nftables_tables = ?removed.nftables_tables,
                    "removed kube-proxy's rules (--cleanup-kube-proxy); its connections are kpr's"
                ),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "--cleanup-kube-proxy: cannot remove kube-proxy's rules; `kpr cleanup-kube-proxy` does it by hand"
                ),
            }
        }
        let removed_ids = report.removed_ids.iter().copied().collect();
        if let Err(e) = self.flows.forget_services(&removed_ids) {
            tracing::warn!(error = %e, "cannot clear the flows of removed services");
        }
        let took = started.elapsed();
        metrics.sync_duration.observe(took.as_secs_f64());
        for failure in &report.failures {
            tracing::error!("sync: {failure}");
        }
        metrics.services.set(services as i64);
        metrics.frontends.set(frontends as i64);
        metrics.endpoints.set(endpoints as i64);
        metrics.rejected_objects.set(rejected as i64);
        for (kind, n) in ignored {
            metrics
                .ignored_slices
                .get_or_create(&labels(&[("address_type", &kind)]))
                .set(n as i64);
        }
        metrics
            .unsupported_ports
            .get_or_create(&labels(&[("protocol", "SCTP")]))
            .set(unsupported as i64);
        if !report.failures.is_empty() {
            metrics.sync_errors.inc();
            return false;
        }
        let now = Instant::now();
        for at in pending {
            metrics
                .change_programming
                .observe(now.duration_since(*at).as_secs_f64());
        }
        let wall_now = SystemTime::now();
        for triggered in &changes.trigger_times {
            // A trigger time ahead of this node's clock (skew) says nothing.
            if let Ok(took) = wall_now.duration_since(*triggered) {
                metrics.network_programming.observe(took.as_secs_f64());
            }
        }
        metrics.last_sync.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        self.telemetry.health.lock().expect("health lock").updated();
        {
            tracing::info!(
                frontends,
                endpoints,
                added = report.added,
                updated = report.updated,
                removed = report.removed,
                full,
                took_us = took.as_micros() as u64,
                "synced"
            );
        }
        if full || complete {
            crate::memory::release_freed_memory();
        }
        true
    }
}

/// Takes over the connections netfilter translated to frontends kpr now
/// serves (kube-proxy's, from before kpr): see
/// `ServiceMaps::adopt_netfilter`.
fn adopt_netfilter_connections(maps: &mut ServiceMaps, flows: &mut FlowMaps) {
    let adopted = crate::dataplane::netfilter::connections()
        .map_err(anyhow::Error::from)
        .and_then(|c| maps.adopt_netfilter(flows, &c, crate::dataplane::monotonic_secs()));
    match adopted {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            connections = n,
            "took over connections netfilter translated (kube-proxy's rules), each keeping its backend"
        ),
        Err(e) => tracing::warn!(error = format!("{e:#}"), "reading netfilter's connections"),
    }
}

impl SyncLoop {
    /// Keeps the per-service metrics' labels in step with the ids the sync
    /// gave frontends: `frontends` are those programmed (all of them when
    /// `whole`), the report's removed ids are gone.
    fn label_frontends<'a>(
        &self,
        whole: bool,
        frontends: impl Iterator<Item = (&'a Frontend, &'a FrontendState)>,
        report: &SyncReport,
    ) {
        let mut labels = self.telemetry.frontends.lock().expect("frontends lock");
        if whole {
            labels.clear();
        }
        for id in &report.removed_ids {
            labels.remove(id);
        }
        for (frontend, state) in frontends {
            if let Some(id) = self.syncer.id_of(frontend) {
                labels.insert(
                    id,
                    FrontendLabels {
                        service: state.service.to_string(),
                        frontend: frontend.to_string(),
                        kind: state.kind.name().to_string(),
                    },
                );
            }
        }
    }
}
