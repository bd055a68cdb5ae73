use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use proxy_user::{
    daemon,
    dataplane::{
        loader::{self, XdpSetting},
        maps, socket_lb,
    },
    model::topology::NodePortAddresses,
    sync,
};

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
        /// Where /healthz (and /metrics) are served; "" to disable.
        #[arg(long, default_value = "0.0.0.0:10256")]
        healthz_bind_address: String,
        /// Where /metrics (and /healthz) are served; "" to disable.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_bind_address: String,
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
    /// Print the programmed frontends and their backends, from the pinned maps.
    Services,
    /// Print the data path's packet counters.
    Stats,
    /// Detach the programs and remove every pin.
    Uninstall,
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
        Command::Services => {
            let maps = maps::ServiceMaps::open(&cli.pin_dir)?;
            println!(
                "{:<24} {:<5} {:<25} {:>4} {:>8}  BACKENDS",
                "FRONTEND", "PROTO", "KIND", "ID", "AFFINITY"
            );
            for (key, value, backends) in maps.frontends()? {
                let proto = sync::frontend(&key).map_or_else(|| key.proto.to_string(), |f| f.protocol.to_string());
                let local_only = value.flags & proxy_common::SVC_EXTERNAL_LOCAL != 0;
                let backends: Vec<String> = backends
                    .iter()
                    .enumerate()
                    .map(|(slot, b)| {
                        // Under externalTrafficPolicy Local: which set each is in.
                        let set = match (local_only, slot as u32) {
                            (false, _) => "",
                            (true, s) if s < value.cluster_start => " (outside only)",
                            (true, s) if s < value.local_count => " (local)",
                            (true, _) => " (inside only)",
                        };
                        format!("{}:{}{set}", b.ip(), b.port())
                    })
                    .collect();
                let mut kind = value.kind().name().to_string();
                if local_only {
                    kind.push_str(",eTP=Local");
                }
                if value.flags & proxy_common::SVC_SOURCE_RANGES != 0 {
                    kind.push_str(",ranges");
                }
                let affinity = match value.affinity_timeout {
                    0 => "-".to_string(),
                    t => format!("{t}s"),
                };
                let backends = if backends.is_empty() && value.flags & proxy_common::SVC_REJECT != 0 {
                    "(none: new connections refused)".to_string()
                } else if backends.is_empty() {
                    "(none here: traffic dropped)".to_string()
                } else {
                    backends.join(", ")
                };
                println!(
                    "{:<24} {:<5} {:<25} {:>4} {:>8}  {}",
                    format!("{}:{}", key.ip(), key.port()),
                    proto,
                    kind,
                    value.id,
                    affinity,
                    backends
                );
            }
            Ok(())
        }
        Command::Stats => {
            for (stat, n) in maps::read_stats(&cli.pin_dir)? {
                println!("{:<18} {n}", stat.name());
            }
            Ok(())
        }
        Command::Uninstall => loader::uninstall(&cli.pin_dir),
    }
}
