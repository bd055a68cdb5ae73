//! Named network namespaces, and running code inside one.
use std::{fs::File, os::fd::AsRawFd};

use anyhow::{Context, Result};

use crate::sh;

/// A named network namespace (`ip netns`), deleted on drop.
pub struct Netns {
    pub name: String,
    /// Deleted on drop; a handle to one someone else owns is not.
    owned: bool,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        sh("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle to a namespace another value owns (for a thread that
    /// outlives a borrow of it); dropping it deletes nothing.
    pub fn handle(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            owned: false,
        }
    }

    /// Runs `program` in the namespace with `input` on its stdin: its
    /// stdout, or an error with its stderr.
    pub fn exec(&self, program: &str, args: &[&str], input: &str) -> Result<String> {
        use std::io::Write;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!(
                "{program} {args:?} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Makes `iface` put full L4 checksums in the frames it sends, as a
    /// frame on a real wire carries, instead of handing its peer the
    /// partial checksums of local sockets (TX checksum offload off, as
    /// `ethtool -K IFACE tx off` does; SIOCETHTOOL, ETHTOOL_STXCSUM).
    pub fn send_full_checksums(&self, iface: &str) -> Result<()> {
        let name = iface.to_owned();
        self.run(move || proxy_user::dataplane::ethtool::send_full_checksums(&name))?
            .with_context(|| format!("TX checksum offload off on {iface} in {}", self.name))
    }

    /// Runs `iface`'s NAPI polling (the receive processing of what it is
    /// handed by XDP) in kernel threads of its own, instead of on the
    /// sending CPU; returns their thread ids, for pinning.
    pub fn thread_napi(&self, iface: &str) -> Result<Vec<i32>> {
        let before = napi_threads()?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sh",
                "-c",
                &format!("echo 1 > /sys/class/net/{iface}/threaded"),
            ],
        )
        .with_context(|| format!("threaded NAPI on {iface} in {}", self.name))?;
        Ok(napi_threads()?.into_iter().filter(|t| !before.contains(t)).collect())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        sh(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-qw", &format!("{key}={value}")],
        )
        .map(|_| ())
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// creates live in the namespace for their whole life.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: a valid namespace fd; only this thread switches.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        anyhow::bail!("setns into {path}: {}", std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// Every NAPI kernel thread on the machine.
fn napi_threads() -> Result<Vec<i32>> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with("napi/") {
            threads.push(pid);
        }
    }
    Ok(threads)
}
