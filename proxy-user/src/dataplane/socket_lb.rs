//! The socket-level balancer's attachment: the `connect4`, `getpeername4`
//! and `sock_release` programs on a cgroup v2 directory (by default the
//! hierarchy's root, so every pod and host process on the node), through
//! pinned links that a restarted daemon updates in place, as it does the TC
//! links.
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{
        links::{CgroupAttachMode, FdLink},
        CgroupSock, CgroupSockAddr, Program,
    },
    Ebpf,
};
use proxy_common::{map_name, SocketPeer, CONNECT_PROGRAM, GETPEERNAME_PROGRAM, SOCK_RELEASE_PROGRAM};

use super::sys as raw;

const PROGRAMS: [&str; 3] = [CONNECT_PROGRAM, GETPEERNAME_PROGRAM, SOCK_RELEASE_PROGRAM];

/// What attaching needs of a cgroup program, whichever kind it is
/// (`sock_addr` hooks, or the `sock` one of `sock_release`).
trait CgroupProgram {
    /// Loads it; its descriptor.
    fn load_fd(&mut self) -> Result<RawFd>;
    /// Attaches it to `cgroup` through a new link.
    fn attach_link(&mut self, cgroup: &File) -> Result<FdLink>;
}

macro_rules! cgroup_program {
    ($kind:ty) => {
        impl CgroupProgram for $kind {
            fn load_fd(&mut self) -> Result<RawFd> {
                self.load()?;
                Ok(self.fd()?.as_fd().as_raw_fd())
            }

            fn attach_link(&mut self, cgroup: &File) -> Result<FdLink> {
                // A link attachment coexists with other programs on the
                // cgroup whatever the mode; the kernel takes no flags for it.
                let link_id = self.attach(cgroup, CgroupAttachMode::Single)?;
                self.take_link(link_id)?
                    .try_into()
                    .context("a cgroup link expected (kernel >= 5.7)")
            }
        }
    };
}

cgroup_program!(CgroupSockAddr);
cgroup_program!(CgroupSock);

fn cgroup_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut dyn CgroupProgram> {
    match ebpf.program_mut(name) {
        Some(Program::CgroupSockAddr(program)) => Ok(program),
        Some(Program::CgroupSock(program)) => Ok(program),
        Some(_) => bail!("the eBPF object's {name} is not a cgroup socket program"),
        None => bail!("the eBPF object has no program {name}"),
    }
}

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

/// Attaches the programs to `cgroup`. Links pinned by an earlier run on the
/// same cgroup get the new programs atomically; links on another cgroup are
/// replaced.
pub fn attach(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path) -> Result<()> {
    let cgroup_file =
        std::fs::File::open(cgroup).with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    let cgroup_id = cgroup_file.metadata()?.ino();
    for name in PROGRAMS {
        let path = link_path(pin_dir, name);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let program = cgroup_program(ebpf, name)?;
        let program_fd = program
            .load_fd()
            .with_context(|| format!("loading {name} (the verifier rejected it?)"))?;
        if let Ok(old) = raw::open_pinned(&path) {
            if link_cgroup_id(old.as_fd()) == Some(cgroup_id) {
                raw::update_link(old.as_fd(), program_fd)
                    .with_context(|| format!("replacing the program of the pinned link {}", path.display()))?;
                continue;
            }
            tracing::info!(link = %path.display(), "pinned socket link belongs to another cgroup, replacing it");
        }
        let _ = std::fs::remove_file(&path);
        let link = program
            .attach_link(&cgroup_file)
            .with_context(|| format!("attaching {name} to the cgroup {}", cgroup.display()))?;
        link.pin(&path)
            .with_context(|| format!("pinning the link at {}", path.display()))?;
    }
    Ok(())
}

/// Detaches the socket-level balancer (a daemon started without it must
/// not leave an earlier run's hooks behind), and empties its table of
/// socket records: with the hooks gone nothing reads it, and the records of
/// the sockets open now would stay when they close, with no hook to remove
/// them.
pub fn detach(pin_dir: &Path) -> Result<()> {
    for name in PROGRAMS {
        let path = link_path(pin_dir, name);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(link = %path.display(), "socket-level balancer detached"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {}: {e}", path.display()),
        }
    }
    forget_socket_records(pin_dir)
}

fn forget_socket_records(pin_dir: &Path) -> Result<()> {
    if !pin_dir.join(map_name::SOCKET_PEERS_BY_COOKIE).exists() {
        return Ok(());
    }
    let table = super::maps::open(pin_dir, map_name::SOCKET_PEERS_BY_COOKIE)?;
    let mut table: HashMap<MapData, u64, SocketPeer> = HashMap::try_from(Map::HashMap(table))?;
    let cookies = table.keys().collect::<Result<Vec<_>, _>>()?;
    for cookie in &cookies {
        // Gone meanwhile (its socket closed while the hook still ran): fine.
        let _ = table.remove(cookie);
    }
    if !cookies.is_empty() {
        tracing::info!(
            records = cookies.len(),
            "socket records of the detached balancer forgotten"
        );
    }
    Ok(())
}

fn link_cgroup_id(link: BorrowedFd<'_>) -> Option<u64> {
    raw::link_info(link).ok().map(|info| info.cgroup_id)
}
