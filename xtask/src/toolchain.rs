//! Installing and driving the eBPF toolchain.
//!
//! Two ways to build Rust for bpfel-unknown-none:
//! - Debian's `rustc-web` with `libstd-rust-web-dev-bpf`, a prebuilt `core`
//!   for the BPF targets (no build-std needed), and bpf-linker built against
//!   Debian's LLVM 22. This is what `setup` installs on Debian.
//! - a rustup nightly with `rust-src` (`-Z build-std=core`), the usual path
//!   on a developer laptop that has one and no rustc-web.
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{root, run};

const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "bpftool",
    // The benchmarks (and their smoke test): a load tool, real web servers,
    // and kube-proxy's two dataplanes to compare with.
    "apache2-utils",
    "nginx-light",
    "iptables",
    "nftables",
    // The external path's packet generator (trafgen), and emptying
    // netfilter's flow table between runs.
    "netsniff-ng",
    "conntrack",
];
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// What the eBPF build is handed: BTF for typed map dumps, and BPF v3 for
/// the atomic fetch-add the round-robin cursor needs.
const EBPF_RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf -C target-cpu=v3";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Toolchain {
    Debian,
    Nightly,
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn debian_toolchain_present() -> bool {
    Path::new(DEBIAN_RUSTC).is_file() && Path::new(DEBIAN_CARGO).is_file() && Path::new(DEBIAN_BPF_CORE).is_dir()
}

fn nightly_with_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.starts_with("rust-src"))
        })
}

fn detect() -> Option<Toolchain> {
    if debian_toolchain_present() && Path::new(LLVM_PREFIX).is_dir() {
        Some(Toolchain::Debian)
    } else if nightly_with_rust_src() {
        Some(Toolchain::Nightly)
    } else {
        None
    }
}

fn bpf_linker_works() -> bool {
    succeeds(Command::new("bpf-linker").arg("--version"))
}

/// Installs what is missing; prints what it skips.
pub fn setup() -> Result<()> {
    let has_apt = succeeds(Command::new("apt-get").arg("--version"));
    if has_apt {
        let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !deb_installed(p)).collect();
        if missing.is_empty() {
            eprintln!("setup: Debian packages present");
        } else if detect() == Some(Toolchain::Nightly)
            && missing.iter().all(|p| p.contains("rust") || p.contains("llvm"))
        {
            eprintln!("setup: using the rustup nightly with rust-src; not installing {missing:?}");
        } else {
            let apt = |args: &[&str]| {
                let mut cmd = Command::new("apt-get");
                cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
                run(&mut cmd)
            };
            apt(&["update", "-q"])?;
            // Packages with daemons (nginx) must not start them on the host.
            let policy = Path::new("/usr/sbin/policy-rc.d");
            let own_policy = !policy.exists() && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok();
            if own_policy {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755));
            }
            let installed = apt(&[&["install", "-y", "-q"], missing.as_slice()].concat());
            if own_policy {
                let _ = std::fs::remove_file(policy);
            }
            if let Err(e) = installed {
                if detect().is_none() {
                    return Err(e).context(format!("installing {missing:?}"));
                }
                eprintln!("setup: {e:#}; continuing with the toolchain that is present");
            }
        }
    }
    let Some(toolchain) = detect() else {
        bail!(
            "no way to build Rust for bpfel-unknown-none here. Either:\n\
             - Debian with the security suite: apt-get install {} (`cargo xtask setup` does this where apt-get exists), or\n\
             - rustup: `rustup toolchain install nightly --component rust-src`.\n\
             Found: {DEBIAN_RUSTC} {}, {DEBIAN_BPF_CORE} {}, {LLVM_PREFIX} {}, nightly rust-src {}",
            APT_PACKAGES.join(" "),
            present(Path::new(DEBIAN_RUSTC).is_file()),
            present(Path::new(DEBIAN_BPF_CORE).is_dir()),
            present(Path::new(LLVM_PREFIX).is_dir()),
            present(nightly_with_rust_src()),
        );
    };
    eprintln!("setup: eBPF toolchain: {toolchain:?}");
    if bpf_linker_works() {
        eprintln!("setup: bpf-linker present");
    } else {
        let mut install = Command::new("cargo");
        install.args(["install", "bpf-linker", "--locked"]);
        if toolchain == Toolchain::Debian {
            // Against Debian's LLVM 22, linked dynamically; /usr/bin/llvm-config is an older LLVM.
            install
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX);
        }
        run(&mut install)?;
    }
    Ok(())
}

fn present(yes: bool) -> &'static str {
    if yes {
        "present"
    } else {
        "missing"
    }
}

pub fn ebpf_object() -> std::path::PathBuf {
    root().join("target/bpf/bpfel-unknown-none/release/proxy-ebpf")
}

pub fn build_ebpf() -> Result<()> {
    let toolchain = detect().context("no eBPF toolchain: run `cargo xtask setup`")?;
    let mut cmd = match toolchain {
        Toolchain::Debian => {
            let mut cmd = Command::new(DEBIAN_CARGO);
            // Debian's cargo would otherwise pick rustup's rustc from PATH.
            cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
            cmd
        }
        Toolchain::Nightly => {
            let mut cmd = Command::new("cargo");
            cmd.arg("+nightly").env_remove("RUSTC");
            cmd
        }
    };
    cmd.arg("build").args(["--release", "--target", "bpfel-unknown-none"]);
    if toolchain == Toolchain::Nightly {
        cmd.args(["-Z", "build-std=core"]);
    }
    cmd.current_dir(root().join("proxy-ebpf"))
        .env("CARGO_TARGET_DIR", root().join("target/bpf"))
        .env("RUSTFLAGS", EBPF_RUSTFLAGS)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER");
    eprintln!("+ (in proxy-ebpf) {cmd:?}");
    let status = cmd.status().context("running the eBPF build")?;
    if !status.success() {
        bail!("building proxy-ebpf failed ({status})");
    }
    let object = ebpf_object();
    if !object.is_file() {
        bail!("the eBPF build succeeded but {} is missing", object.display());
    }
    eprintln!("built {}", object.display());
    Ok(())
}

/// Namespaces, bpffs and cgroup mounts (and cgroups) of test processes that died without
/// cleaning up (killed by a signal): named `kpr<pid>x<n>`, removed when
/// that pid is gone, so reruns start clean and live runs are left alone.
pub fn remove_stale_test_leftovers() {
    let dead = |name: &str| {
        name.strip_prefix("kpr")
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if dead(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let base = Path::new("/run/kpr-test");
    for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let cgroup = entry.path().join("cgroup");
            let _ = std::fs::write(cgroup.join(&name).join("cgroup.kill"), "1");
            std::thread::sleep(std::time::Duration::from_millis(100));
            let _ = std::fs::remove_dir(cgroup.join(&name));
            let _ = Command::new("umount").arg(&cgroup).status();
            let _ = Command::new("umount").arg(entry.path().join("bpf")).status();
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
