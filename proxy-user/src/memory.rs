//! The daemon's own memory.

/// Hands the heap's free pages back to the kernel. A list of every object
/// (the watchers' start) and a whole sync each leave tens of MB freed but
/// still resident at scale, which glibc's allocator keeps in its arenas:
/// the daemon's resident size would stay at its peak for good.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no preconditions; only returns memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}
