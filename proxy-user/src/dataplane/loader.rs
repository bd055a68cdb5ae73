//! Loads the programs with their maps pinned under the pin directory and
//! attaches the classifier through pinned TCX links, so that a restarted
//! daemon atomically replaces the running program and reuses every map:
//! established flows never notice.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::MapData,
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        LinkOrder, Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use aya_obj::generated::BPF_F_MMAPABLE;
use proxy_common::{map_name, TC_EXTERNAL_PROGRAM, TC_HOST_PROGRAM, TC_PROGRAM, XDP_PROGRAM};

use super::{bpffs, ethtool, EBPF_OBJECT};

pub(crate) const LINK_DIR: &str = "links";
/// Which classifier an interface gets, and where: what traffic it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Ingress of a pod-facing interface: traffic from inside the cluster
    /// (`kpr_tc`).
    Pods,
    /// Ingress of an external interface: traffic from outside
    /// (`kpr_tc_external`), to which externalTrafficPolicy and
    /// loadBalancerSourceRanges apply.
    External,
    /// Egress of an external interface or `lo`: the node's own traffic
    /// (`kpr_tc_host`).
    Host,
}

impl Role {
    fn program(self) -> &'static str {
        match self {
            Role::Pods => TC_PROGRAM,
            Role::External => TC_EXTERNAL_PROGRAM,
            Role::Host => TC_HOST_PROGRAM,
        }
    }

    pub fn is_egress(self) -> bool {
        self == Role::Host
    }

    fn direction(self) -> &'static str {
        if self.is_egress() {
            "egress"
        } else {
            "ingress"
        }
    }
}

const DIRECTIONS: [&str; 2] = ["ingress", "egress"];

/// Loads the object with its maps at `pin_dir/<MAP>` (created, or reused
/// from an earlier run) and the classifiers loaded and pinned. The XDP
/// program is loaded when an interface first gets it (`load_xdp`): most
/// nodes' interfaces never do, and each program costs the start its
/// verification.
pub fn load(pin_dir: &Path) -> Result<Ebpf> {
    bpffs::ensure_pin_dir(pin_dir)?;
    unpin_incompatible_maps(pin_dir)?;
    let mut loader = EbpfLoader::new();
    // BTF-defined maps carry no pinning of their own: each is pinned (or
    // its pin reused) here, by name.
    for name in map_name::PINNED {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .with_context(|| format!("loading the eBPF object with maps pinned in {}", pin_dir.display()))?;
    load_programs(&mut ebpf)?;
    for role in [Role::Pods, Role::External, Role::Host] {
        let program = classifier(&mut ebpf, role)?;
        let pin = pin_dir.join(format!("prog_{}", role.program()));
        let _ = std::fs::remove_file(&pin);
        program
            .pin(&pin)
            .with_context(|| format!("pinning the classifier at {}", pin.display()))?;
    }
    Ok(ebpf)
}

/// The classifiers, each verified on a thread of its own: verification is
/// most of a start (a quarter to a third of a second per program here),
/// and the kernel verifies programs in parallel.
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    const PROGRAMS: [&str; 3] = [TC_PROGRAM, TC_EXTERNAL_PROGRAM, TC_HOST_PROGRAM];
    let programs: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| PROGRAMS.contains(name))
        .collect();
    for name in PROGRAMS {
        if !programs.iter().any(|(n, _)| *n == name) {
            bail!("the eBPF object has no program {name}");
        }
    }
    std::thread::scope(|scope| {
        let loads: Vec<_> = programs
            .into_iter()
            .map(|(name, program)| {
                let load = scope.spawn(move || {
                    let started = std::time::Instant::now();
                    let loaded = match program {
                        Program::SchedClassifier(p) => p.load(),
                        _ => Err(ProgramError::UnexpectedProgramType),
                    };
                    tracing::debug!(program = name, took = ?started.elapsed(), "verified");
                    loaded
                });
                (name, load)
            })
            .collect();
        for (name, load) in loads {
            load.join()
                .map_err(|_| anyhow!("loading {name} panicked"))?
                .with_context(|| format!("loading the program {name} (the verifier rejected it?)"))?;
        }
        Ok(())
    })
}

/// Where the XDP program runs on the external interfaces (`--xdp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpSetting {
    /// In the driver where the driver supports it, except on veths; the TC
    /// program alone elsewhere. A veth hands XDP the skbs its peer sent,
    /// which it must first copy into XDP buffers (a NIC hands XDP its own
    /// receive buffers): there XDP costs more than it saves.
    Auto,
    /// In the driver where it supports XDP (veth does), before any skb is
    /// built; in the stack (generic XDP) where it does not.
    Native,
    /// In the stack, on the skb: every driver, little of the gain.
    Generic,
    /// Not at all: the TC program alone.
    Off,
}

impl std::str::FromStr for XdpSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?}: expected auto, native, generic or off")),
        }
    }
}

fn xdp_link_path(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(LINK_DIR).join(format!("xdp_{iface}"))
}

/// Attaches the XDP program to `iface` as `setting` says, through a pinned
/// link: one pinned by an earlier run is updated in place (the program is
/// swapped atomically); otherwise native mode is tried first, then generic.
/// Returns the mode it runs in: "native", "generic", "kept" (an earlier
/// run's link), or, where `Auto` leaves the interface to the TC program,
/// "off" and why.
pub fn attach_xdp(ebpf: &mut Ebpf, pin_dir: &Path, iface: &str, setting: XdpSetting) -> Result<&'static str> {
    let path = xdp_link_path(pin_dir, iface);
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    if setting == XdpSetting::Auto && ethtool::driver(iface).is_ok_and(|d| d == "veth") {
        detach_xdp(pin_dir, iface);
        return Ok(AUTO_OFF_VETH);
    }
    let program = load_xdp(ebpf)?;
    let attempts: &[(XdpMode, &'static str)] = match setting {
        // Generic XDP runs on the skb, after the kernel built it: on a
        // driver without native XDP, the TC program alone is as fast.
        XdpSetting::Auto => &[(XdpMode::Driver, "native")],
        XdpSetting::Native => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        XdpSetting::Generic => &[(XdpMode::Skb, "generic")],
        XdpSetting::Off => {
            detach_xdp(pin_dir, iface);
            return Ok("off");
        }
    };
    if let Ok(old) = PinnedLink::from_pin(&path) {
        let link = XdpLink::try_from(FdLink::from(old))?;
        match program.attach_to_link(link) {
            Ok(id) => {
                let link = program.take_link(id)?;
                let fd_link: FdLink = link.try_into().context("XDP link expected")?;
                let _ = std::fs::remove_file(&path);
                fd_link.pin(&path)?;
                return Ok("kept");
            }
            Err(e) => {
                tracing::debug!(%iface, error = %e, "stale XDP link pin, attaching anew");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let mut last_error = None;
    for &(mode, name) in attempts {
        match program.attach(iface, mode) {
            Ok(id) => {
                let link = program.take_link(id)?;
                let fd_link: FdLink = link.try_into().context("XDP link expected (kernel >= 5.9)")?;
                fd_link
                    .pin(&path)
                    .with_context(|| format!("pinning the link at {}", path.display()))?;
                return Ok(name);
            }
            Err(e) => last_error = Some(e),
        }
    }
    if setting == XdpSetting::Auto {
        tracing::debug!(%iface, error = ?last_error, "no native XDP");
        return Ok(AUTO_OFF_NO_DRIVER_SUPPORT);
    }
    Err(last_error.expect("at least one mode tried")).with_context(|| format!("attaching XDP to {iface}"))
}

/// The XDP program, loaded (verified) on first use.
pub fn load_xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .with_context(|| format!("the eBPF object has no program {XDP_PROGRAM}"))?
        .try_into()?;
    if program.fd().is_err() {
        program
            .load()
            .with_context(|| format!("loading the XDP program {XDP_PROGRAM} (the verifier rejected it?)"))?;
    }
    Ok(program)
}

/// What `attach_xdp` answers where `XdpSetting::Auto` leaves an interface
/// to the TC program.
pub const AUTO_OFF_VETH: &str = "off: a veth (XDP would copy every packet; --xdp native forces it)";
pub const AUTO_OFF_NO_DRIVER_SUPPORT: &str = "off: the driver has no native XDP";

/// Whether `attach_xdp`'s answer means the program runs there.
pub fn xdp_runs(mode: &str) -> bool {
    mode != AUTO_OFF_VETH && mode != AUTO_OFF_NO_DRIVER_SUPPORT
}

/// Unpins (and so detaches) the XDP link of an interface.
pub fn detach_xdp(pin_dir: &Path, iface: &str) {
    let _ = std::fs::remove_file(xdp_link_path(pin_dir, iface));
}

/// Unpins every map an earlier build pinned with another layout (size,
/// key, value or mappability), so that the load creates it anew instead of
/// handing this build's programs a map they cannot use. The programs still
/// running keep theirs until they are replaced.
fn unpin_incompatible_maps(pin_dir: &Path) -> Result<()> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")?;
    for (name, wanted) in &object.maps {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = MapData::from_pin(&path).and_then(|m| m.info());
        let compatible = pinned.is_ok_and(|p| {
            p.map_type().is_ok_and(|t| t as u32 == wanted.map_type())
                && p.key_size() == wanted.key_size()
                && p.value_size() == wanted.value_size()
                && p.max_entries() == wanted.max_entries()
                && p.map_flags() & BPF_F_MMAPABLE == wanted.map_flags() & BPF_F_MMAPABLE
        });
        if !compatible {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            tracing::warn!(map = %name, "the pinned map has another layout (an older kpr?): created anew");
        }
    }
    Ok(())
}

fn classifier(ebpf: &mut Ebpf, role: Role) -> Result<&mut SchedClassifier> {
    let name = role.program();
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?;
    Ok(program.try_into()?)
}

fn link_path(pin_dir: &Path, iface: &str, direction: &str) -> PathBuf {
    pin_dir.join(LINK_DIR).join(format!("tc_{direction}_{iface}"))
}

/// Attaches the classifier of `role` at the ingress of `iface`. A link
/// pinned by an earlier run is updated in place (no moment without a
/// program, also when the interface changes role); otherwise a new TCX link
/// is created and pinned.
pub fn attach(ebpf: &mut Ebpf, pin_dir: &Path, iface: &str, role: Role) -> Result<()> {
    let path = link_path(pin_dir, iface, role.direction());
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let program = classifier(ebpf, role)?;
    let link_id = match PinnedLink::from_pin(&path) {
        Ok(old) => {
            let link = SchedClassifierLink::try_from(FdLink::from(old))?;
            match program.attach_to_link(link) {
                Ok(id) => id,
                Err(e) => {
                    // The interface the old link belonged to is gone (a
                    // pod's veth recreated under the same name): start over.
                    tracing::debug!(%iface, error = %e, "stale link pin, attaching anew");
                    std::fs::remove_file(&path)?;
                    return attach(ebpf, pin_dir, iface, role);
                }
            }
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. })) if io_error.kind() == io::ErrorKind::NotFound => {
            let attach_type = if role.is_egress() {
                TcAttachType::Egress
            } else {
                TcAttachType::Ingress
            };
            program
                .attach_with_options(iface, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .with_context(|| format!("attaching to the {} of {iface}", role.direction()))?
        }
        Err(e) => return Err(e).with_context(|| format!("opening the pinned link {}", path.display())),
    };
    let link = program.take_link(link_id)?;
    let fd_link: FdLink = link.try_into().context("TCX link expected (kernel >= 6.6)")?;
    let _ = std::fs::remove_file(&path);
    fd_link
        .pin(&path)
        .with_context(|| format!("pinning the link at {}", path.display()))?;
    Ok(())
}

/// Unpins the links of an interface that went away.
pub fn forget(pin_dir: &Path, iface: &str) {
    for direction in DIRECTIONS {
        let _ = std::fs::remove_file(link_path(pin_dir, iface, direction));
    }
    detach_xdp(pin_dir, iface);
}

/// Unpins (and so detaches) the egress link of an interface that is no
/// longer external.
pub fn detach_egress(pin_dir: &Path, iface: &str) {
    let _ = std::fs::remove_file(link_path(pin_dir, iface, Role::Host.direction()));
}

/// What kpr runs on packets arriving on `iface`: the classifier at its
/// ingress, known by the program its pinned link holds (none: kpr is not
/// attached there), and whether the XDP program runs before it.
pub fn ingress_hooks(pin_dir: &Path, iface: &str) -> Result<(Option<Role>, bool)> {
    let xdp = xdp_link_path(pin_dir, iface).exists();
    let path = link_path(pin_dir, iface, Role::Pods.direction());
    if !path.exists() {
        return Ok((None, xdp));
    }
    let link = FdLink::from(PinnedLink::from_pin(&path).with_context(|| format!("opening {}", path.display()))?);
    let program_id = link.info()?.program_id();
    let role = [Role::Pods, Role::External].into_iter().find(|role| {
        aya::programs::ProgramInfo::from_pin(pin_dir.join(format!("prog_{}", role.program())))
            .is_ok_and(|p| p.id() == program_id)
    });
    Ok((role, xdp))
}

/// Interfaces with a pinned link from this or an earlier run.
pub fn attached_interfaces(pin_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(pin_dir.join(LINK_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            DIRECTIONS
                .iter()
                .find_map(|d| name.strip_prefix(&format!("tc_{d}_")).map(str::to_owned))
                .or_else(|| name.strip_prefix("xdp_").map(str::to_owned))
        })
        .collect()
}

/// Lets `lo` accept packets carrying one of the node's addresses as their
/// source: the data path sends the reply to the node's own connection to
/// one of its NodePorts back in through `lo` (both ends are node addresses,
/// which the stack otherwise drops as martian). Packets enter `lo` only
/// from the node itself, so this admits nothing from elsewhere.
///
/// Already on is enough: an unprivileged container cannot write /proc/sys
/// (the DaemonSet's privileged init step sets it).
pub fn accept_local_on_lo() -> Result<()> {
    let path = "/proc/sys/net/ipv4/conf/lo/accept_local";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1").with_context(|| {
        format!("writing 1 to {path} (in a container, set net.ipv4.conf.lo.accept_local=1 from a privileged init step)")
    })
}

/// The interfaces of the current network namespace, loopback excepted.
pub fn interfaces() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned();
            if name != "lo" {
                names.push(name);
            }
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

/// The IPv4 addresses of the current network namespace's interfaces,
/// loopback excepted.
pub fn interface_addresses() -> Vec<(String, std::net::Ipv4Addr)> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that freeifaddrs releases below; each
    // entry's address, when present, is a sockaddr of its family.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut entry = list;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() && (*addr).sa_family as i32 == libc::AF_INET {
                let sin = &*(addr as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let name = CStr::from_ptr((*entry).ifa_name).to_string_lossy().into_owned();
                if !ip.is_loopback() {
                    out.push((name, ip));
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// The link type of an interface (`/sys/class/net/<iface>/type`):
/// `ARPHRD_ETHER` (1) for Ethernet and veth; tun, WireGuard and IPIP
/// devices carry no Ethernet header.
pub fn link_type(iface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/type"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub const ARPHRD_ETHER: u32 = 1;

/// Removes every pin (links first, which detaches the programs); the maps
/// and programs go away with their last reference.
pub fn uninstall(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        // A node kpr never ran on (or already uninstalled): nothing to do.
        println!("nothing pinned at {}", pin_dir.display());
        return Ok(());
    }
    let links = pin_dir.join(LINK_DIR);
    if links.exists() {
        std::fs::remove_dir_all(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for entry in std::fs::read_dir(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}
