use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use proxy_user::{
    daemon,
    dataplane::{
        self,
        loader::{self, XdpSetting},
        maps, socket_lb, trace,
    },
    inspect::{self, AddrFilter, Filters},
    model::topology::NodePortAddresses,
    packet, telemetry,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum TraceProtocol {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
enum TraceOrigin {
    Pod,
    Outside,
    Host,
}

#[derive(Clone, Copy, ValueEnum)]
enum TcpFlag {
    Syn,
    Ack,
    Fin,
    Rst,
}

/// kpr: a kube-proxy replacement on eBPF.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Directory for the pinned maps, programs and links; on a bpffs (one is
    /// mounted when missing).
    #[arg(long, global = true, env = "KPR_PIN_DIR", default_value = "/sys/fs/bpf/kpr")]
    pin_dir: PathBuf,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    /// How the inspection commands print: a table, or JSON (one document).
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the proxy daemon: against the Kubernetes API, or standalone with `--manifests`.
    Run {
        /// Standalone mode: a directory of Service and EndpointSlice YAML, watched for changes.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubeconfig for the API server (default: KUBECONFIG, ~/.kube/config, then in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name, as the API server knows it (the DaemonSet sets NODE_NAME).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Interfaces to attach to (comma separated; `veth*` matches a prefix). Default: all but lo.
        /// Interfaces without an Ethernet header (tun, WireGuard, IPIP) are left alone.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        interfaces: Vec<String>,
        /// Of those, the ones traffic from outside the cluster arrives on (comma
        /// separated, `*` prefix patterns), besides those holding one of the
        /// node's addresses, which always are. Every other one is pod-facing.
        #[arg(long, value_delimiter = ',')]
        external_interfaces: Vec<String>,
        /// Which addresses NodePorts answer on: `primary` (the Node's
        /// InternalIPs; kube-proxy's recommended setting) or comma-separated
        /// CIDRs (the node's interface addresses within them).
        #[arg(long, default_value = "primary")]
        nodeport_addresses: String,
        /// The API server's --service-node-port-range: a nodePort outside it
        /// is reported and not served.
        #[arg(long, default_value = "30000-32767")]
        service_node_port_range: String,
        /// How often the manifest directory is checked, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
        /// Minimum time between syncs, in milliseconds: changes within it are
        /// coalesced into one sync, and none waits longer.
        #[arg(long, default_value_t = 10)]
        min_sync_interval_ms: u64,
        /// Period of the full resync that repairs drift between the maps and
        /// the desired state, in seconds (health turns bad when a change has
        /// waited twice this long).
        #[arg(long, default_value_t = 120)]
        sync_period_s: u64,
        /// How often flows past their timeout (TCP closed: 10 s, never
        /// answered: 60 s, idle: 5 days; UDP: 30 s, streams 120 s) are
        /// swept from the flow table, in seconds.
        #[arg(long, default_value_t = 10)]
        flow_sweep_interval_s: u64,
        /// The XDP program on the external interfaces: `auto` (in the
        /// driver where it supports XDP, except on veths, where it costs
        /// more than it saves; the log says which), `native` (in the driver
        /// where it supports XDP, veths included; generic where it does
        /// not), `generic` (on the skb), or `off` (the TC program alone).
        #[arg(long, default_value = "auto")]
        xdp: XdpSetting,
        /// Where /healthz and /livez are served (nothing else: it listens on
        /// every interface); "" to disable.
        #[arg(long, default_value = "0.0.0.0:10256")]
        healthz_bind_address: String,
        /// Where /metrics, /frontends (for `kpr services`), /healthz and
        /// /livez are served; "" to disable.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_bind_address: String,
        /// Replacing kube-proxy on a running node: once the first sync has
        /// programmed every Service and taken over the connections
        /// kube-proxy's rules translated, remove those rules (as `kpr
        /// cleanup-kube-proxy`), so that no connection is dropped.
        #[arg(long)]
        cleanup_kube_proxy: bool,
        /// Also export new flows per backend (`kpr_backend_new_flows_total`):
        /// one series per endpoint of every service, hence off by default.
        #[arg(long)]
        metrics_per_backend: bool,
        /// The cgroup v2 directory whose processes get the socket-level
        /// balancer (a TCP connect to a service goes straight to a backend,
        /// with no per-packet translation). Default: the hierarchy's root,
        /// i.e. every pod and host process on the node.
        #[arg(long)]
        socket_lb_cgroup: Option<PathBuf>,
        /// Translate TCP per packet in the TC path only, without the
        /// socket-level hooks (removes them if an earlier run attached them).
        #[arg(long, conflicts_with = "socket_lb_cgroup")]
        no_socket_lb: bool,
    },
    /// Print the programmed frontends and their backends, from the pinned
    /// maps, named after their Service (asked of the daemon).
    Services {
        /// Only the Services of this name (in every namespace, unless
        /// --namespace is given too).
        name: Option<String>,
        /// Only the Services of this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Only this frontend (address, or address:port).
        #[arg(long)]
        service: Option<AddrFilter>,
        /// Where the daemon serves /metrics (its --metrics-bind-address):
        /// it names the frontends, as the maps hold only service ids.
        #[arg(long, default_value = "127.0.0.1:10249")]
        daemon_address: std::net::SocketAddr,
    },
    /// Print the tracked flows (both directions paired): client, frontend,
    /// backend, source NAT, state, idle time and expiry.
    Conntrack {
        /// Only flows to this frontend (address, or address:port).
        #[arg(long)]
        service: Option<AddrFilter>,
        /// Only flows from this client address.
        #[arg(long)]
        client: Option<Ipv4Addr>,
        /// Only flows to this backend (address, or address:port).
        #[arg(long)]
        backend: Option<AddrFilter>,
    },
    /// Print the remembered sessionAffinity ClientIP choices: client ->
    /// backend, with expiry and whether the next connection would follow it.
    Affinity {
        /// Only the service with this frontend (address, or address:port).
        #[arg(long)]
        service: Option<AddrFilter>,
        /// Only this client (its address).
        #[arg(long)]
        client: Option<Ipv4Addr>,
    },
    /// Run one packet through the data path as it stands and say what
    /// happens to it and why: which frontend, which backend and how it was
    /// chosen, the rewritten addresses. It runs on a snapshot of the live
    /// maps (BPF_PROG_TEST_RUN): nothing is sent, and no flow, cursor or
    /// counter of the live data path changes.
    Trace {
        /// The packet's source, address:port.
        #[arg(long)]
        src: SocketAddrV4,
        /// Its destination, address:port.
        #[arg(long)]
        dst: SocketAddrV4,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: TraceProtocol,
        /// Who sends it: a pod, a host outside the node (arriving on an
        /// external interface), or the node itself.
        #[arg(long, value_enum, default_value = "pod")]
        from: TraceOrigin,
        /// TCP flags, comma separated (default: a SYN, a new connection).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "syn")]
        flags: Vec<TcpFlag>,
        /// Through the XDP program first, as on an external interface that
        /// runs it (with --from outside).
        #[arg(long)]
        xdp: bool,
        /// The interface it arrives on: the programs kpr runs there decide
        /// (instead of --from and --xdp).
        #[arg(long, conflicts_with_all = ["from", "xdp"])]
        interface: Option<String>,
    },
    /// Print the data path's packet counters.
    Stats,
    /// Detach the programs and remove every pin.
    Uninstall,
    /// Hand the node over to what comes after kpr (kube-proxy's rules):
    /// flows kpr tracks keep being translated until they end, new ones
    /// (per packet and at connect()) are left alone. `--undo` takes new
    /// flows back.
    Drain {
        #[arg(long)]
        undo: bool,
    },
    /// Remove what kube-proxy left in this node's netfilter rules (its
    /// iptables chains and the jumps to them, its nftables table), as
    /// `kube-proxy --cleanup` does; nothing else is touched.
    CleanupKubeProxy,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // kube-client logs every failed request as an error; the watchers
        // already report an outage once, with what it means for traffic.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn bind_address(value: &str, flag: &str) -> Result<Option<SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("{flag} {value:?} is not an address:port"))
}

/// kube-proxy's fallback node name: the hostname, lowercased.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_lowercase())
}

/// `30000-32767`
fn port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>> {
    let parse = || -> Option<std::ops::RangeInclusive<u16>> {
        let (low, high) = text.split_once('-')?;
        let (low, high): (u16, u16) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
        (low >= 1 && low <= high).then_some(low..=high)
    };
    parse().with_context(|| format!("--service-node-port-range {text:?}: expected LOW-HIGH within 1-65535"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Command::Run {
            manifests,
            kubeconfig,
            node_name,
            interfaces,
            poll_ms,
            min_sync_interval_ms,
            sync_period_s,
            flow_sweep_interval_s,
            xdp,
            healthz_bind_address,
            metrics_bind_address,
            metrics_per_backend,
            cleanup_kube_proxy,
            socket_lb_cgroup,
            no_socket_lb,
            external_interfaces,
            nodeport_addresses,
            service_node_port_range,
        } => {
            let source = match manifests {
                Some(dir) => daemon::SourceConfig::Manifests {
                    dir,
                    poll: Duration::from_millis(poll_ms),
                },
                None => daemon::SourceConfig::Kube { kubeconfig },
            };
            let config = daemon::Config {
                pin_dir: cli.pin_dir,
                source,
                node_name: node_name.unwrap_or_else(hostname),
                interfaces,
                external_interfaces,
                nodeport_addresses: NodePortAddresses::parse(&nodeport_addresses)
                    .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?,
                node_port_range: port_range(&service_node_port_range)?,
                min_sync_interval: Duration::from_millis(min_sync_interval_ms),
                sync_period: Duration::from_secs(sync_period_s.max(1)),
                flow_sweep_interval: Duration::from_secs(flow_sweep_interval_s.max(1)),
                xdp,
                healthz_addr: bind_address(&healthz_bind_address, "--healthz-bind-address")?,
                metrics_addr: bind_address(&metrics_bind_address, "--metrics-bind-address")?,
                metrics_per_backend,
                cleanup_kube_proxy,
                socket_lb: match (no_socket_lb, socket_lb_cgroup) {
                    (true, _) => None,
                    (false, Some(cgroup)) => Some(cgroup),
                    (false, None) => Some(socket_lb::cgroup2_root()?),
                },
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(config))
        }
        Command::Services {
            name,
            namespace,
            service,
            daemon_address,
        } => {
            let maps = maps::ServiceMaps::open(&cli.pin_dir)?;
            let counts = maps::FlowMaps::open(&cli.pin_dir)?.service_counters()?;
            let by_name = name.is_some() || namespace.is_some();
            let names = match telemetry::fetch_frontend_names(daemon_address) {
                Ok(names) => names,
                Err(e) if by_name => anyhow::bail!(
                    "cannot filter by Service: the maps hold only service ids and the daemon, which names them, did not answer at {daemon_address}: {e:#} (is --daemon-address its --metrics-bind-address?)"
                ),
                Err(e) => {
                    eprintln!("note: Service names unknown: the daemon did not answer at {daemon_address}: {e:#}");
                    Vec::new()
                }
            };
            let wanted = |view: &inspect::ServiceView| {
                let Some((ns, n)) = view.service.as_deref().and_then(|s| s.split_once('/')) else {
                    return !by_name;
                };
                namespace.as_deref().is_none_or(|want| want == ns) && name.as_deref().is_none_or(|want| want == n)
            };
            let views: Vec<inspect::ServiceView> = inspect::services(&maps.frontends()?, &counts, &names)
                .into_iter()
                .filter(|v| service.is_none_or(|f| f.matches(v.frontend)))
                .filter(wanted)
                .collect();
            print_views(cli.output, &views, print_services)
        }
        Command::Conntrack {
            service,
            client,
            backend,
        } => {
            let flows = maps::FlowMaps::open(&cli.pin_dir)?;
            let entries = flows.entries()?.into_iter().collect();
            let filters = Filters {
                service,
                client,
                backend,
            };
            let views: Vec<inspect::FlowView> = inspect::flows(&entries, dataplane::monotonic_secs())
                .into_iter()
                .filter(|v| filters.keep_flow(v))
                .collect();
            print_views(cli.output, &views, print_flows)
        }
        Command::Affinity { service, client } => {
            let services = maps::ServiceMaps::open(&cli.pin_dir)?;
            let flows = maps::FlowMaps::open(&cli.pin_dir)?;
            let mut frontends = Vec::new();
            let mut backends = std::collections::HashMap::new();
            for (key, value, slots) in services.frontends()? {
                for (slot, backend) in (0u32..).zip(slots) {
                    backends.insert(
                        proxy_common::BackendKey {
                            service_id: value.id,
                            slot,
                        },
                        backend,
                    );
                }
                frontends.push((key, value));
            }
            // The service a frontend filter names, by its id.
            let ids: Option<Vec<u32>> = service.map(|f| {
                frontends
                    .iter()
                    .filter(|(k, _)| f.matches(std::net::SocketAddrV4::new(k.ip(), k.port())))
                    .map(|(_, v)| v.id)
                    .collect()
            });
            let views: Vec<inspect::AffinityView> =
                inspect::affinities(&flows.affinities()?, &frontends, &backends, dataplane::monotonic_secs())
                    .into_iter()
                    .filter(|v| ids.as_ref().is_none_or(|ids| ids.contains(&v.service_id)))
                    .filter(|v| client.is_none_or(|c| v.client == c.to_string()))
                    .collect();
            print_views(cli.output, &views, print_affinities)
        }
        Command::Trace {
            src,
            dst,
            proto,
            from,
            flags,
            xdp,
            interface,
        } => {
            let (origin, xdp) = match interface {
                None => (
                    match from {
                        TraceOrigin::Pod => trace::Origin::Pod,
                        TraceOrigin::Outside => trace::Origin::Outside,
                        TraceOrigin::Host => trace::Origin::Host,
                    },
                    xdp,
                ),
                Some(iface) => match loader::ingress_hooks(&cli.pin_dir, &iface)? {
                    (Some(loader::Role::Pods), xdp) => (trace::Origin::Pod, xdp),
                    (Some(_), xdp) => (trace::Origin::Outside, xdp),
                    (None, _) => anyhow::bail!(
                        "kpr runs no program at the ingress of {iface} (it is attached to: {})",
                        loader::attached_interfaces(&cli.pin_dir)
                            .into_iter()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
            };
            let probe = trace::Probe {
                origin,
                proto: match proto {
                    TraceProtocol::Tcp => proxy_common::IPPROTO_TCP,
                    TraceProtocol::Udp => proxy_common::IPPROTO_UDP,
                },
                src,
                dst,
                tcp_flags: flags
                    .iter()
                    .map(|f| match f {
                        TcpFlag::Syn => packet::TCP_SYN,
                        TcpFlag::Ack => packet::TCP_ACK,
                        TcpFlag::Fin => packet::TCP_FIN,
                        TcpFlag::Rst => packet::TCP_RST,
                    })
                    .fold(0, |all, f| all | f),
                xdp,
            };
            let snapshot = trace::Snapshot::take(&cli.pin_dir)?;
            let traced = snapshot.trace(&probe)?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&traced)?);
            } else {
                print_trace(&traced);
            }
            Ok(())
        }
        Command::Stats => {
            let stats: std::collections::BTreeMap<&str, u64> = maps::read_stats(&cli.pin_dir)?
                .into_iter()
                .map(|(stat, n)| (stat.name(), n))
                .collect();
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                for (name, n) in stats {
                    println!("{name:<18} {n}");
                }
            }
            Ok(())
        }
        Command::Uninstall => loader::uninstall(&cli.pin_dir),
        Command::Drain { undo } => {
            let mut maps = maps::ServiceMaps::open(&cli.pin_dir)?;
            maps.set_draining(!undo)?;
            if undo {
                println!("new flows are kpr's again");
            } else {
                let tracked = maps::FlowMaps::open(&cli.pin_dir)?
                    .entries()?
                    .iter()
                    .filter(|(_, e)| e.flags & proxy_common::NAT_REPLY == 0)
                    .count();
                println!(
                    "draining: new flows are left to what follows kpr; {tracked} tracked flows still translated \
                     (`kpr conntrack` lists them; `kpr uninstall` once they are gone)"
                );
            }
            Ok(())
        }
        Command::CleanupKubeProxy => {
            let report = proxy_user::cleanup::cleanup_kube_proxy()?;
            println!(
                "removed {} iptables chains of kube-proxy; nftables tables: {}",
                report.iptables_chains,
                if report.nftables_tables.is_empty() {
                    "none".to_string()
                } else {
                    report.nftables_tables.join(", ")
                }
            );
            Ok(())
        }
    }
}

fn print_trace(t: &trace::Trace) {
    println!(
        "packet    {} {} -> {} (from {})",
        t.protocol, t.before.src, t.before.dst, t.origin
    );
    for stage in &t.stages {
        let verdict = stage.verdict.map_or(String::new(), |v| format!(" [{v}]"));
        println!("program   {}: {}{verdict}", stage.program, stage.action);
    }
    match t.after {
        Some(a) if a == t.before => println!("leaves    unchanged"),
        Some(a) => println!("leaves    {} -> {}", a.src, a.dst),
        None => println!("leaves    (dropped)"),
    }
    for (i, line) in t.because.iter().enumerate() {
        println!("{}{line}", if i == 0 { "because   " } else { "          " });
    }
    if !t.same_programs_as_live {
        println!("note      the daemon runs another build than this kpr: traced with this one's programs");
    }
}

fn print_views<T: serde::Serialize>(output: Output, views: &[T], table: fn(&[T])) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(views)?),
        Output::Table => table(views),
    }
    Ok(())
}

/// Seconds as an operator reads them: `42s`, `9m05s`, `3h20m`, `5d0h`.
fn duration(secs: u32) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    match secs {
        0..100 => format!("{secs}s"),
        100..6_000 => format!("{m}m{:02}s", secs % 60),
        6_000..172_800 => format!("{h}h{:02}m", m % 60),
        _ => format!("{d}d{}h", h % 24),
    }
}

fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn print_services(views: &[inspect::ServiceView]) {
    println!(
        "{:<24} {:<24} {:<5} {:<25} {:>4} {:>8}  BACKENDS",
        "SERVICE", "FRONTEND", "PROTO", "KIND", "ID", "AFFINITY"
    );
    for view in views {
        let mut kind = view.kind.to_string();
        if view.external_local {
            kind.push_str(",eTP=Local");
        }
        if view.source_ranges {
            kind.push_str(",ranges");
        }
        let backends: Vec<String> = view
            .backends
            .iter()
            .map(|b| {
                let notes: Vec<&str> = [
                    b.local.then_some("this node"),
                    (b.state != "ready").then_some(b.state),
                    b.set,
                ]
                .into_iter()
                .flatten()
                .collect();
                if notes.is_empty() {
                    format!("{} [{}]", b.address, b.new_flows)
                } else {
                    format!("{} ({}) [{}]", b.address, notes.join(", "), b.new_flows)
                }
            })
            .collect();
        let mut backends = match (backends.is_empty(), view.rejecting) {
            (true, true) => "(none: new connections refused)".to_string(),
            (true, false) => "(none here: traffic dropped)".to_string(),
            (false, _) => backends.join(", "),
        };
        if !view.refused_or_dropped.is_empty() {
            let ended: Vec<String> = view
                .refused_or_dropped
                .iter()
                .map(|(v, n)| format!("{v}={n}"))
                .collect();
            backends.push_str(&format!("; refused/dropped: {}", ended.join(", ")));
        }
        println!(
            "{:<24} {:<24} {:<5} {:<25} {:>4} {:>8}  {}",
            view.service.as_deref().unwrap_or("-"),
            view.frontend,
            view.protocol,
            kind,
            view.id,
            or_dash(view.affinity_timeout_secs.map(duration)),
            backends
        );
    }
}

fn print_flows(views: &[inspect::FlowView]) {
    println!(
        "{:<5} {:<21} {:<21} {:<21} {:<21} {:<11} {:>7} {:>8}",
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SOURCE NAT", "STATE", "IDLE", "EXPIRES"
    );
    for view in views {
        let mut state = view.state.to_string();
        if let Some(missing) = view.missing {
            state.push_str(&format!(" ({missing} entry lost)"));
        }
        println!(
            "{:<5} {:<21} {:<21} {:<21} {:<21} {:<11} {:>7} {:>8}",
            view.protocol,
            view.client,
            view.frontend,
            view.backend,
            or_dash(view.source_nat),
            state,
            or_dash(view.idle_secs.map(duration)),
            or_dash(view.expires_in_secs.map(duration)),
        );
    }
}

fn print_affinities(views: &[inspect::AffinityView]) {
    println!(
        "{:>4} {:<26} {:<21} {:<21} {:>7} {:>8}  IN FORCE",
        "ID", "FRONTENDS", "CLIENT", "BACKEND", "IDLE", "EXPIRES"
    );
    for view in views {
        println!(
            "{:>4} {:<26} {:<21} {:<21} {:>7} {:>8}  {}",
            view.service_id,
            view.frontends.join(","),
            view.client,
            view.backend,
            duration(view.idle_secs),
            or_dash(view.expires_in_secs.map(duration)),
            if view.in_force {
                "yes"
            } else {
                "no (next connection balanced afresh)"
            }
        );
    }
}
