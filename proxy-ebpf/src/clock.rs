//! Time as the data path keeps it: whole seconds of the kernel's monotonic
//! clock (the coarse one: a tick's precision is plenty for timeouts in
//! seconds), which userspace reads as CLOCK_MONOTONIC_COARSE.
//!
//! Every tracked packet asks for the time, and a helper call is a good
//! part of the established path's cost. The coarse clock only moves at a
//! tick, when jiffies move too, and the kernel reads jiffies inline (no
//! call): so each CPU keeps the seconds it last read with the jiffies they
//! were read at, and calls the helper again only once jiffies have moved,
//! at most once a tick instead of once a packet.
use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::btf_map,
};

/// The seconds last read on this CPU, and the jiffies when they were.
#[repr(C)]
#[derive(Clone, Copy)]
struct ClockCache {
    jiffies: u64,
    secs: u32,
    _pad: u32,
}

/// Never pinned: a cache, right from empty (jiffies are never 0 at run
/// time: they start just below 2^32).
#[btf_map]
static CLOCK_CACHE: PerCpuArray<ClockCache, 1> = PerCpuArray::new();

#[inline(always)]
pub fn now_secs() -> u32 {
    // SAFETY: no arguments, no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK_CACHE.get_ptr_mut(0) else {
        return coarse_secs();
    };
    // SAFETY: this CPU's slot. A program interleaved on this CPU can at
    // worst pair newer jiffies with the seconds of the tick before: the
    // seconds then lag by one tick until the next.
    unsafe {
        if (*cache).jiffies == jiffies {
            return (*cache).secs;
        }
        let secs = coarse_secs();
        (*cache).secs = secs;
        (*cache).jiffies = jiffies;
        secs
    }
}

#[inline(always)]
fn coarse_secs() -> u32 {
    // SAFETY: no arguments, no preconditions.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}
