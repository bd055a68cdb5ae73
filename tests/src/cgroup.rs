//! A cgroup v2 directory of one test cluster: the daemon attaches its
//! socket-level balancer there (not to the root, which would reach every
//! process of the machine), and the cluster's client processes are started
//! inside it. The hierarchy is mounted under the test's directory because
//! `ip netns exec` remounts /sys, hiding /sys/fs/cgroup from the daemon.
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::sh;

pub struct TestCgroup {
    mount: PathBuf,
    /// The cluster's cgroup, as the daemon and spawned processes see it.
    pub path: PathBuf,
}

impl TestCgroup {
    /// Mounts the hierarchy at `dir/cgroup` and creates the cgroup `name`.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let mount = dir.join("cgroup");
        std::fs::create_dir_all(&mount)?;
        sh(
            "mount",
            &["-t", "cgroup2", "none", mount.to_str().context("utf-8 path")?],
        )
        .context("mounting the cgroup v2 hierarchy (the socket-level balancer needs it)")?;
        let path = mount.join(name);
        let cgroup = TestCgroup { mount, path };
        std::fs::create_dir(&cgroup.path).with_context(|| format!("creating the cgroup {}", cgroup.path.display()))?;
        Ok(cgroup)
    }

    /// Makes `command`'s process (and so everything it starts) a member.
    pub fn enter<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        let procs = std::ffi::CString::new(self.path.join("cgroup.procs").to_str().expect("utf-8 path"))
            .expect("no NUL in the path");
        // SAFETY: the closure only calls open/write/close, which are
        // async-signal-safe, on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }

    fn is_empty(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.procs")).map_or(true, |p| p.trim().is_empty())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Whatever a test left running in it goes; a cgroup with members
        // cannot be removed.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir(&self.path);
        let _ = sh("umount", &[self.mount.to_str().expect("utf-8 path")]);
    }
}
