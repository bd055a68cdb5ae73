//! The socket-level balancer's attachment: the `connect4` and `getpeername4`
//! programs on a cgroup v2 directory (by default the hierarchy's root, so
//! every pod and host process on the node), through pinned links that a
//! restarted daemon updates in place, as it does the TC links.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{CgroupAttachMode, FdLink},
        CgroupSockAddr,
    },
    Ebpf,
};
use proxy_common::{CONNECT_PROGRAM, GETPEERNAME_PROGRAM};

use super::sys as raw;

const PROGRAMS: [&str; 2] = [CONNECT_PROGRAM, GETPEERNAME_PROGRAM];

fn link_path(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join(super::loader::LINK_DIR).join(format!("cgroup_{program}"))
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a unified
/// host, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|line| {
            // mountinfo: "<id> <parent> <dev> <root> <mount point> <opts> ... - <fstype> ..."
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 hierarchy is mounted (the socket-level balancer needs one; or pass --no-socket-lb)")
}

/// Attaches both programs to `cgroup`. Links pinned by an earlier run on the
/// same cgroup get the new programs atomically; links on another cgroup are
/// replaced.
pub fn attach(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path) -> Result<()> {
    let cgroup_file =
        std::fs::File::open(cgroup).with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    let cgroup_id = cgroup_file.metadata()?.ino();
    for name in PROGRAMS {
        let path = link_path(pin_dir, name);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading {name} (the verifier rejected it?)"))?;
        let program_fd = program.fd()?.as_fd().as_raw_fd();
        if let Ok(old) = raw::open_pinned(&path) {
            if link_cgroup_id(old.as_fd()) == Some(cgroup_id) {
                raw::update_link(old.as_fd(), program_fd)
                    .with_context(|| format!("replacing the program of the pinned link {}", path.display()))?;
                continue;
            }
            tracing::info!(link = %path.display(), "pinned socket link belongs to another cgroup, replacing it");
        }
        let _ = std::fs::remove_file(&path);
        let link_id = program
            // A link attachment coexists with other programs on the cgroup
            // whatever the mode; the kernel takes no flags for it.
            .attach(&cgroup_file, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to the cgroup {}", cgroup.display()))?;
        let link: FdLink = program
            .take_link(link_id)?
            .try_into()
            .context("a cgroup link expected (kernel >= 5.7)")?;
        link.pin(&path)
            .with_context(|| format!("pinning the link at {}", path.display()))?;
    }
    Ok(())
}

/// Detaches the socket-level balancer (a daemon started without it must
/// not leave an earlier run's hooks behind).
pub fn detach(pin_dir: &Path) -> Result<()> {
    for name in PROGRAMS {
        let path = link_path(pin_dir, name);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(link = %path.display(), "socket-level balancer detached"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {}: {e}", path.display()),
        }
    }
    Ok(())
}

fn link_cgroup_id(link: BorrowedFd<'_>) -> Option<u64> {
    raw::link_info(link).ok().map(|info| info.cgroup_id)
}
