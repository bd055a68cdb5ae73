//! The maps, laid out by `proxy_common`. The loader pins them by name so
//! that a daemon restart finds them again with every flow still tracked.
//! They are BTF-defined (`.maps`): the kernel knows their key and value
//! types, so `bpftool map dump` prints them field by field.
use core::intrinsics::{atomic_or, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{Array, DevMap, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use proxy_common::{
    filter_exact_bit, filter_network_bit, filter_network_port_bit, AffinityKey, AffinityValue, Backend, BackendKey,
    FlowKey, FragmentKey, FragmentPorts, NatEntry, NodeConfig, ServiceCounterKey, ServiceKey, ServiceValue, SocketPeer,
    SourceRange, Stat, BACKEND_HALF, FILTER_HALF_WORDS, FRONTEND_HALF, MAX_AFFINITY, MAX_BACKEND_SLOTS, MAX_CONNTRACK,
    MAX_FRAGMENTS, MAX_SERVICES, MAX_SERVICE_COUNTERS, MAX_SOCKET_PEER_RECORDS, MAX_SOURCE_RANGES, MAX_WIRE_PORTS,
};

// Written only by the daemon, so they need not be preallocated.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map]
pub static BACKENDS: HashMap<BackendKey, Backend, { MAX_BACKEND_SLOTS as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// One shared round-robin cursor per service id: a global counter (not a
/// per-CPU one) is what makes the rotation exact across CPUs.
#[btf_map]
pub static RR_CURSORS: Array<u64, { MAX_SERVICES as usize }> = Array::new();

/// One LRU list for all CPUs: per-CPU lists (`BPF_F_NO_COMMON_LRU`) would
/// give each CPU only its share of the entries, and a CPU taking most new
/// flows would evict live ones long before the map is full.
#[btf_map]
pub static CONNTRACK: LruHashMap<FlowKey, NatEntry, { MAX_CONNTRACK as usize }> = LruHashMap::new();

/// The socket-level balancer's records, by socket cookie: written at
/// `connect()`, removed when the socket is released (`sock_release`), never
/// evicted (an LRU table would drop a long-lived connection's record for
/// newer ones). Preallocated, so that a record costs a free-list pop and
/// push: socket-local storage allocates through the slab and frees through
/// RCU (in profiles of the rate benchmark, the socket hooks took 3.6 us a
/// connection on the client's core with it, 2.4 us with this table).
#[btf_map]
pub static SOCKET_PEERS_BY_COOKIE: HashMap<u64, SocketPeer, { MAX_SOCKET_PEER_RECORDS as usize }> = HashMap::new();

/// Where a record goes while `SOCKET_PEERS_BY_COOKIE` is full: socket-local
/// storage, which holds as many as there are sockets and lives and dies
/// with its socket.
#[btf_map]
pub static SOCKET_PEERS: SkStorage<SocketPeer> = SkStorage::new();

/// The ports of datagrams whose first fragment was translated.
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, { MAX_FRAGMENTS as usize }> = LruHashMap::new();

/// ClientIP affinity: which backend each client of such a frontend got.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { MAX_AFFINITY as usize }> = LruHashMap::new();

/// What became of each frontend's new flows (see `ServiceCounterKey`):
/// per CPU, so counting takes no lock and bounces no cache line between
/// CPUs; LRU, so the counters of backends and services long gone make room
/// by themselves. Only new flows and their refusals and drops are counted,
/// never the packets of established ones: 5-10% of a new flow's cost in
/// the per-packet benchmark.
#[btf_map]
pub static SERVICE_COUNTERS: LruPerCpuHashMap<ServiceCounterKey, u64, { MAX_SERVICE_COUNTERS as usize }> =
    LruPerCpuHashMap::new();

/// Counts a new flow of the service `service_id` sent to `backend`.
#[inline(always)]
pub fn count_new_flow(service_id: u32, backend: &Backend) {
    count_for_service(service_id, backend.addr, backend.port, Stat::NewFlow);
}

/// Counts a new flow of the service `service_id` that ended as `stat` (a
/// refusal, a drop).
#[inline(always)]
pub fn count_service_verdict(service_id: u32, stat: Stat) {
    count_for_service(service_id, 0, 0, stat);
}

/// Out of line: one copy of the counting code, instead of one at each of
/// the dozen places a new flow ends (the common paths' code stays compact).
#[inline(never)]
fn count_for_service(service_id: u32, addr: u32, port: u16, stat: Stat) {
    let key = ServiceCounterKey {
        service_id,
        addr,
        port,
        stat: stat as u16,
    };
    if let Some(counter) = SERVICE_COUNTERS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a live value; only this CPU writes it
        // while we run.
        unsafe { *counter += 1 };
        return;
    }
    // The first on this CPU's view: created with this flow counted (a
    // racing CPU's insert of its own first count may win; one is lost).
    let _ = SERVICE_COUNTERS.insert(&key, &1, BPF_NOEXIST as u64);
}

/// loadBalancerSourceRanges of every service that has them, by service id.
#[btf_map]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

/// One entry: this node's configuration, written by the daemon.
#[btf_map]
pub static NODE: Array<NodeConfig, 1> = Array::new();

/// Whether the node is being handed back (`NODE_DRAINING`): new flows are
/// not kpr's.
#[inline(always)]
pub fn draining() -> bool {
    NODE.get(0).is_some_and(|n| n.flags & proxy_common::NODE_DRAINING != 0)
}

/// The address source-NATed flows leave with; none until the daemon knows.
#[inline(always)]
pub fn snat_addr() -> Option<u32> {
    NODE.get(0).map(|n| n.snat_addr).filter(|&a| a != 0)
}

#[btf_map]
pub static STATS: PerCpuArray<u64, { Stat::CAPACITY as usize }> = PerCpuArray::new();

/// Small enough to stay in cache, unlike the hash tables behind it.
/// Mappable: the data path sets backend bits itself, so the daemon may only
/// change that half with atomic operations on the shared memory.
#[btf_map]
pub static FILTER: Array<u64, { 2 * FILTER_HALF_WORDS as usize }, { BPF_F_MMAPABLE as usize }> = Array::new();

#[inline(always)]
fn filter_has(half: u32, bit: u32) -> bool {
    match FILTER.get(half + (bit >> 6)) {
        Some(word) => *word & (1u64 << (bit & 63)) != 0,
        None => true,
    }
}

/// The small bitmaps' bits first: they are the ones in cache.
#[inline(always)]
fn half_has(half: u32, addr: u32, port: u16, proto: u8) -> bool {
    filter_has(half, filter_network_bit(addr))
        && filter_has(half, filter_network_port_bit(addr, port, proto))
        && filter_has(half, filter_exact_bit(addr, port, proto))
}

/// Whether a service may be addressed by this tuple.
#[inline(always)]
pub fn may_be_frontend(addr: u32, port: u16, proto: u8) -> bool {
    half_has(FRONTEND_HALF, addr, port, proto)
}

/// Whether a backend may answer from this tuple for a translated flow.
#[inline(always)]
pub fn may_be_backend(addr: u32, port: u16, proto: u8) -> bool {
    half_has(BACKEND_HALF, addr, port, proto)
}

/// Records that a backend now answers a translated flow, so its replies are
/// looked up. Only flows this program translates set the bits: replies of
/// connections balanced at the socket, or made straight to a pod, never
/// touch the conntrack table unless their backend also serves such a flow.
#[inline(always)]
pub fn mark_backend(addr: u32, port: u16, proto: u8) {
    // One bit at a time, not a loop over `filter_bits`' array: the array
    // would take stack in the flow-creating functions, whose frames with
    // the NAT port search's are close to the 512-byte limit.
    set_backend_bit(filter_network_bit(addr));
    set_backend_bit(filter_network_port_bit(addr, port, proto));
    set_backend_bit(filter_exact_bit(addr, port, proto));
}

#[inline(always)]
fn set_backend_bit(bit: u32) {
    let Some(word) = FILTER.get_ptr_mut(BACKEND_HALF + (bit >> 6)) else {
        return;
    };
    let mask = 1u64 << (bit & 63);
    // SAFETY: a live array element; read first so that a backend already
    // marked costs no locked write (and no cache line bouncing between
    // CPUs).
    unsafe {
        if *word & mask == 0 {
            atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word, mask);
        }
    }
}

/// The test harness's LAN switch (`kpr_xdp_wire`): member index -> LAN
/// port. Not pinned; the daemon never fills it.
#[btf_map]
pub static WIRE_PORTS: DevMap<{ MAX_WIRE_PORTS as usize }> = DevMap::new();

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
}
