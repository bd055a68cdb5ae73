//! Service lookup and backend selection.
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use proxy_common::{Backend, BackendKey, NatEntry, ServiceKey, ServiceValue};

use crate::maps::{BACKENDS, RR_CURSORS, SERVICES};

/// The service addressed by (address, port, protocol), all as the packet
/// or socket holds them (network order).
#[inline(always)]
pub fn lookup_service(addr: u32, port: u16, proto: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out before any other map call.
    unsafe { SERVICES.get(&key).copied() }
}

/// Exact round-robin: every new flow of the service takes the next slot.
#[inline(always)]
pub fn select_backend(svc: &ServiceValue) -> Option<(u32, Backend)> {
    if svc.backend_count == 0 {
        return None;
    }
    let cursor = RR_CURSORS.get_ptr_mut(svc.id)?;
    // SeqCst, not Relaxed: with LLVM 22 a relaxed add on BPF does not fetch
    // the old value (see docs/toolchain notes), which would pin every flow
    // to one slot.
    // SAFETY: the pointer is a live array element; the add is atomic.
    let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, 1) };
    let slot = (turn % svc.backend_count as u64) as u32;
    backend_at(svc.id, slot).map(|backend| (slot, backend))
}

#[inline(always)]
fn backend_at(service_id: u32, slot: u32) -> Option<Backend> {
    let key = BackendKey { service_id, slot };
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(&key).copied() }
}

/// Whether a tracked flow's backend is still the one in its slot, so that a
/// new connection reusing the tuple may keep it.
#[inline(always)]
pub fn still_selected(entry: &NatEntry) -> bool {
    match backend_at(entry.service_id, entry.slot) {
        Some(b) => b.addr == entry.addr && b.port == entry.port,
        None => false,
    }
}
