//! Everything that touches BPF: the filesystem the pins live on, loading and
//! attaching the programs, and typed access to the maps.
pub mod bpffs;
pub mod loader;
pub mod maps;
pub mod socket_lb;
mod sys;

/// The eBPF object built by `cargo xtask build-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KPR_EBPF_OBJECT_PATH"));
