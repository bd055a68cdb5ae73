use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use proxy_user::{
    daemon,
    dataplane::{loader, maps},
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

#[derive(Subcommand)]
enum Command {
    /// Run the proxy daemon.
    Run {
        /// Standalone mode: a directory of Service and EndpointSlice YAML, watched for changes.
        #[arg(long)]
        manifests: PathBuf,
        /// Interfaces to attach to (comma separated; `veth*` matches a prefix). Default: all but lo.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        interfaces: Vec<String>,
        /// How often the manifest directory is checked, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Command::Run {
            manifests,
            interfaces,
            poll_ms,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(daemon::Config {
                pin_dir: cli.pin_dir,
                manifests,
                interfaces,
                poll_interval: Duration::from_millis(poll_ms),
            }))
        }
        Command::Services => {
            let maps = maps::ServiceMaps::open(&cli.pin_dir)?;
            println!(
                "{:<24} {:<5} {:>4} {:>8}  BACKENDS",
                "FRONTEND", "PROTO", "ID", "AFFINITY"
            );
            for (key, value, backends) in maps.frontends()? {
                let proto = sync::frontend(&key).map_or_else(|| key.proto.to_string(), |f| f.protocol.to_string());
                let backends: Vec<String> = backends.iter().map(|b| format!("{}:{}", b.ip(), b.port())).collect();
                let affinity = match value.affinity_timeout {
                    0 => "-".to_string(),
                    t => format!("{t}s"),
                };
                let backends = if backends.is_empty() {
                    "(none: traffic dropped)".to_string()
                } else {
                    backends.join(", ")
                };
                println!(
                    "{:<24} {:<5} {:>4} {:>8}  {}",
                    format!("{}:{}", key.ip(), key.port()),
                    proto,
                    value.id,
                    affinity,
                    backends
                );
            }
            Ok(())
        }
        Command::Stats => {
            for (stat, n) in maps::read_stats(&cli.pin_dir)? {
                println!("{:<12} {n}", stat.name());
            }
            Ok(())
        }
        Command::Uninstall => loader::uninstall(&cli.pin_dir),
    }
}
