//! Project tasks: `cargo xtask <setup|build-ebpf|test|demo|bench|kind-test>`.
mod kind;
mod toolchain;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent: skips what is present).
    Setup,
    /// Build the eBPF programs (proxy-ebpf) for bpfel-unknown-none, with BTF.
    BuildEbpf,
    /// Set up, build, check formatting and lints, and run every test (what CI runs).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        skip_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Set up, build, and show the proxy forwarding a ClusterIP on a small namespace cluster.
    Demo,
    /// Set up, build (release) and run the benchmarks; writes docs/benchmarks.md.
    Bench {
        /// Arguments for the benchmark (`--smoke`, `--requests N`, `--rounds N`, `--sizes N,N`,
        /// `--only datapath|packets|control`, `--skip-rule-loads`, `--out PATH`).
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// kpr on a kind cluster: build and load the image, deploy `deploy/kind`,
    /// check ClusterIP, NodePort, LoadBalancer, affinity, externalTrafficPolicy
    /// Local and a restart under load (and upstream conformance where
    /// `e2e.test` is installed). Without Docker and kind it says so and exits 0.
    KindTest {
        /// Load this image instead of building deploy/Dockerfile.
        #[arg(long)]
        image: Option<String>,
        /// Keep the cluster afterwards.
        #[arg(long)]
        keep: bool,
    },
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, echoing it, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} creates network namespaces and loads BPF programs: run it as root (e.g. `sudo -E cargo xtask ...`)"
        );
    }
    Ok(())
}

fn build_user_space() -> Result<()> {
    run(cargo().args(["build", "--workspace", "--bins"]))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => toolchain::setup(),
        Task::BuildEbpf => toolchain::build_ebpf(),
        Task::Test { skip_lint, cargo_args } => {
            require_root("the test suite")?;
            toolchain::setup()?;
            toolchain::build_ebpf()?;
            if !skip_lint {
                run(cargo().args(["fmt", "--all", "--", "--check"]))?;
                run(cargo().args(["fmt", "--manifest-path", "proxy-ebpf/Cargo.toml", "--", "--check"]))?;
                run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
            }
            build_user_space()?;
            toolchain::remove_stale_test_leftovers();
            run(cargo().args(["test", "--workspace"]).args(&cargo_args))
        }
        Task::Bench { bench_args } => {
            require_root("the benchmark")?;
            toolchain::setup()?;
            toolchain::build_ebpf()?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            toolchain::remove_stale_test_leftovers();
            run(Command::new(root().join("target/release/kpr-bench")).args(&bench_args))
        }
        Task::KindTest { image, keep } => kind::run(kind::Options { image, keep }),
        Task::Demo => {
            require_root("the demo")?;
            toolchain::setup()?;
            toolchain::build_ebpf()?;
            build_user_space()?;
            run(&mut Command::new(root().join("target/debug/kpr-demo")))
        }
    }
}
