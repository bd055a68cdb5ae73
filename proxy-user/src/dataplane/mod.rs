//! Everything that touches BPF: the filesystem the pins live on, loading and
//! attaching the programs, and typed access to the maps.
pub mod bpffs;
pub mod ethtool;
pub mod loader;
pub mod maps;
pub mod netfilter;
pub mod socket_lb;
pub mod sweep;
mod sys;
pub mod trace;

/// The eBPF object built by `cargo xtask build-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KPR_EBPF_OBJECT_PATH"));

/// The kernel's coarse monotonic clock in whole seconds: the clock the data
/// path stamps flows and affinities with.
pub fn monotonic_secs() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}
