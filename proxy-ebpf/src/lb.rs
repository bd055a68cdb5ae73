//! Service lookup and backend selection.
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{AffinityKey, AffinityValue, Backend, BackendKey, NatEntry, ServiceKey, ServiceValue, SourceRange};

use crate::{
    clock::now_secs,
    maps::{count_new_flow, AFFINITY, BACKENDS, RR_CURSORS, SERVICES, SOURCE_RANGES},
};

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

/// Whether a client may reach a service with loadBalancerSourceRanges: an
/// LPM lookup under the service's id, not a scan of its ranges.
#[inline(always)]
pub fn source_allowed(service_id: u32, client: u32) -> bool {
    let key = Key::new(
        64,
        SourceRange {
            service_id,
            addr: client,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// The backend for a new flow of `client` (see `AffinityKey`): with
/// sessionAffinity ClientIP, the one this client got before while it still
/// stands (in its slot, within the endpoint set this origin uses) and the
/// timeout has not passed since the client's last new flow; otherwise the
/// next in round-robin, remembered for the client.
/// Each choice is counted for its backend (`maps::count_new_flow`).
#[inline(always)]
pub fn select_backend(svc: &ServiceValue, from_outside: bool, client: u64) -> Option<(u32, Backend)> {
    let chosen = choose_backend(svc, from_outside, client);
    if let Some((_, backend)) = &chosen {
        count_new_flow(svc.id, backend);
    }
    chosen
}

#[inline(always)]
fn choose_backend(svc: &ServiceValue, from_outside: bool, client: u64) -> Option<(u32, Backend)> {
    if svc.affinity_timeout == 0 {
        return round_robin(svc, from_outside);
    }
    let key = AffinityKey {
        service_id: svc.id,
        _pad: 0,
        client,
    };
    let now = now_secs();
    if let Some(remembered) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a live map value, read once here.
        let seen = unsafe { *remembered };
        let (first, count) = svc.slots(from_outside);
        let in_set = seen.slot >= first && seen.slot - first < count;
        // Whole seconds: "not more than the timeout" keeps a client for at
        // least the timeout, whatever the clock's phase (and at most a
        // second longer).
        let fresh = now.wrapping_sub(seen.last_used) <= svc.affinity_timeout;
        if in_set && fresh && backend_at(svc.id, seen.slot) == Some(seen.backend) {
            if seen.last_used != now {
                // SAFETY: as above; a racing writer stores a time as good.
                unsafe { (*remembered).last_used = now };
            }
            return Some((seen.slot, seen.backend));
        }
    }
    let (slot, backend) = round_robin(svc, from_outside)?;
    let chosen = AffinityValue {
        backend,
        slot,
        last_used: now,
    };
    // Without the record the client is only balanced afresh next time.
    let _ = AFFINITY.insert(&key, &chosen, 0);
    Some((slot, backend))
}

/// Exact round-robin: every new flow of the service takes the next slot of
/// the endpoint set its origin uses (see `ServiceValue::slots`).
#[inline(always)]
fn round_robin(svc: &ServiceValue, from_outside: bool) -> Option<(u32, Backend)> {
    let (first, count) = svc.slots(from_outside);
    if count == 0 {
        return None;
    }
    let cursor = RR_CURSORS.get_ptr_mut(svc.id)?;
    // SeqCst, not Relaxed: with LLVM 22 a relaxed add on BPF does not fetch
    // the old value (see docs/toolchain notes), which would pin every flow
    // to one slot.
    // SAFETY: the pointer is a live array element; the add is atomic.
    let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, 1) };
    let slot = first + (turn % count as u64) as u32;
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
