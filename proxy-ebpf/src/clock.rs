//! Time as the data path keeps it: whole seconds of the kernel's monotonic
//! clock (the coarse one: a tick's precision is plenty for timeouts in
//! seconds, and it is cheaper), which userspace reads as CLOCK_MONOTONIC_COARSE.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

#[inline(always)]
pub fn now_secs() -> u32 {
    // SAFETY: no arguments, no preconditions.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}
