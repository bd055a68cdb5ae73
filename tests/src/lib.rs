//! A small Kubernetes-like cluster made of network namespaces and veth
//! pairs, with the real daemon running in each node, for end-to-end tests
//! and the demo. Everything it creates has a unique name and is removed when
//! the value that created it is dropped, also when a test panics.
pub mod apiserver;
pub mod bench;
pub mod bpffs;
pub mod cgroup;
pub mod cluster;
pub mod dataplane;
pub mod manifests;
pub mod netns;
pub use proxy_user::packet;
pub mod pod;

pub use cluster::{Cluster, ClusterSpec};

/// A name no other test (in this or another process) uses: `kpr<pid>x<n>`.
pub fn unique_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("kpr{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command, failing with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "`{program} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
