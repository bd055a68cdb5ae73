//! Connection tracking: both directions of a translated flow, keyed by the
//! tuple each direction's packets carry on arrival; and the allocation of
//! NAT ports for flows whose source is translated too.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::bpf_loop,
};
use proxy_common::{
    nat_port_search_start, nat_port_try, FlowKey, NatEntry, FLOW_NAT_TAKEOVER_CLOSED_SECS, IPPROTO_UDP, NAT_PORT_TRIES,
    NAT_REDIRECT, NAT_REPLY, NAT_REPLY_REDIRECT, NAT_SNAT, SEEN_FIN, SEEN_RST, SEEN_STREAM,
};

use crate::{
    clock::now_secs,
    maps::{self, CONNTRACK},
    nat::Endpoint,
    parse::Packet,
};

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<NatEntry> {
    // SAFETY: copied out at once.
    unsafe { CONNTRACK.get(key).copied() }
}

/// The entry itself, for `note_packet` to update in place.
#[inline(always)]
pub fn lookup_mut(key: &FlowKey) -> Option<*mut NatEntry> {
    CONNTRACK.get_ptr_mut(key)
}

/// Records what a packet of a tracked flow says of its lifetime in its
/// entry for this direction (`key`): when it was seen, and whether it ends
/// the connection (TCP FIN or RST). Written only when it changes (a TCP
/// end, a new second), so most packets only read the entry.
///
/// Once a second per direction of a UDP flow, the other direction is looked
/// at too: restored if it was lost (evicted, say), and kept from being the
/// least recently used while its own direction is quiet (a one-way stream's
/// replies). TCP talks both ways (every segment is acknowledged), so both
/// of its entries stay in use; one lost anyway is restored by the daemon's
/// sweep. That keeps the lookup off the path of most packets.
#[inline(always)]
pub fn note_packet(key: &FlowKey, pkt: &Packet, tracked: *mut NatEntry, entry: &NatEntry) {
    let now = now_secs();
    let mut seen = entry.seen | pkt.end_flags();
    let new_second = entry.last_seen != now;
    let udp = pkt.proto == IPPROTO_UDP;
    // Replies in two different seconds: a UDP stream, kept longer.
    let replied_before = entry.flags & NAT_REPLY != 0 && entry.last_seen != 0;
    if new_second && udp && replied_before {
        seen |= SEEN_STREAM;
    }
    // SAFETY: a live map value; a racing update of these plain fields from
    // another CPU leaves either value, each of which is right.
    unsafe {
        if seen != entry.seen {
            (*tracked).seen = seen;
        }
        if !new_second {
            return;
        }
        (*tracked).last_seen = now;
    }
    // A first reply: its request entry was recorded a moment ago.
    let first_reply = entry.flags & NAT_REPLY != 0 && entry.last_seen == 0;
    if udp && !first_reply {
        keep_other_direction(key, entry);
    }
}

/// Restores the other direction of the flow `entry` (keyed by `key`)
/// belongs to if it is gone: a UDP flow whose reply entry was evicted would
/// have its answers pass untranslated.
///
/// A function of its own for the verifier: inlined, each of its outcomes
/// would go on as a path of its own through every later stage.
#[inline(never)]
fn keep_other_direction(key: &FlowKey, entry: &NatEntry) {
    let (other, restored) = entry.partner(key);
    // SAFETY: only tested for presence.
    if unsafe { CONNTRACK.get(&other) }.is_some() {
        return;
    }
    // Claimed only if still free: a flow that took the tuple meanwhile
    // keeps it.
    if CONNTRACK.insert(&other, &restored, BPF_NOEXIST as u64).is_ok() && restored.flags & NAT_REPLY != 0 {
        maps::mark_backend(other.src_addr, other.src_port, other.proto);
    }
}

/// Whether the TCP connection a request entry tracks has ended (a FIN
/// each way, or a RST either way), so that a SYN on its tuple opens a new
/// connection, balanced afresh, as netfilter does.
#[inline(always)]
pub fn connection_closed(pkt: &Packet, request: &NatEntry) -> bool {
    // A reply entry lost (evicted) says nothing: a SYN then is taken for a
    // retransmission of the same connection, which keeps its backend.
    let back = lookup(&request.other_direction(&pkt.flow_key())).map_or(0, |r| r.seen);
    let forth = request.seen;
    (back | forth) & SEEN_RST != 0 || back & forth & SEEN_FIN != 0
}

/// A NAT port held by a flow that has expired is taken over: its entries
/// are removed so that the new flow's reply entry can claim the port.
/// Not inlined, for the verifier: it runs in the port search's loop.
#[inline(never)]
fn reclaim_if_ended(reply_key: &FlowKey, proto: u8) -> bool {
    let Some(reply) = lookup(reply_key) else {
        // Evicted meanwhile: free.
        return true;
    };
    // Only a NATed flow is taken over; any other flow on the tuple (the
    // node's own, from a port in the range) is left alone.
    if reply.flags & NAT_SNAT == 0 {
        return false;
    }
    let request_key = reply.other_direction(reply_key);
    let request = lookup(&request_key);
    let now = now_secs();
    if !NatEntry::flow_expired_after(
        request.as_ref(),
        Some(&reply),
        proto,
        now,
        FLOW_NAT_TAKEOVER_CLOSED_SECS,
    ) {
        return false;
    }
    let _ = CONNTRACK.remove(&request_key);
    let _ = CONNTRACK.remove(reply_key);
    true
}

/// The address and port an entry writes over the one it is keyed by: the
/// backend for requests, the service for replies.
#[inline(always)]
pub fn rewritten_to(entry: &NatEntry) -> Endpoint {
    Endpoint {
        addr: entry.addr,
        port: entry.port,
    }
}

/// The other end of a source-NATed entry (the node's NAT address for a
/// request, the client for a reply); `unchanged` for any other entry.
#[inline(always)]
pub fn other_end(entry: &NatEntry, unchanged: Endpoint) -> Endpoint {
    if entry.flags & NAT_SNAT != 0 {
        Endpoint {
            addr: entry.nat_addr,
            port: entry.nat_port,
        }
    } else {
        unchanged
    }
}

/// A flow's translation: where its requests go, with which source, and
/// where the choice came from.
#[derive(Clone, Copy)]
pub struct Flow {
    pub service_id: u32,
    pub slot: u32,
    pub backend: Endpoint,
    /// The source requests leave with: the client's own, or this node's
    /// address and a NAT port.
    pub source: Endpoint,
    /// Replies must leave by the FIB: their new source is one of this
    /// node's addresses (a NodePort), or the request's was.
    pub redirect_replies: bool,
}

impl Flow {
    /// The flow an existing request entry describes.
    pub fn of_entry(pkt: &Packet, entry: &NatEntry) -> Self {
        Flow {
            service_id: entry.service_id,
            slot: entry.slot,
            backend: rewritten_to(entry),
            source: other_end(entry, pkt.source()),
            redirect_replies: entry.flags & NAT_REPLY_REDIRECT != 0,
        }
    }

    pub fn source_nated(&self, pkt: &Packet) -> bool {
        self.source != pkt.source()
    }
}

fn flow_key(src: Endpoint, dst: Endpoint, proto: u8) -> FlowKey {
    FlowKey::new(src.addr, src.port, dst.addr, dst.port, proto)
}

/// Records the reply direction of `flow` (`flags`: `BPF_NOEXIST` to claim a
/// NAT port, which fails when another flow holds it). It has seen no
/// packet yet (`last_seen` 0): a flow never answered expires sooner.
#[inline(always)]
fn insert_reply(pkt: &Packet, flow: &Flow, flags: u64) -> Result<(), i32> {
    let snat = flow.source_nated(pkt);
    let mut nat_flags = NAT_REPLY;
    if snat {
        nat_flags |= NAT_SNAT;
    }
    if flow.redirect_replies {
        nat_flags |= NAT_REDIRECT;
    }
    let to_client = NatEntry {
        addr: pkt.dst,
        port: pkt.dport,
        flags: nat_flags,
        seen: 0,
        service_id: flow.service_id,
        slot: flow.slot,
        nat_addr: pkt.src,
        nat_port: pkt.sport,
        _pad: 0,
        last_seen: 0,
    };
    CONNTRACK.insert(&flow_key(flow.backend, flow.source, pkt.proto), &to_client, flags)?;
    maps::mark_backend(flow.backend.addr, flow.backend.port, pkt.proto);
    Ok(())
}

/// Records the request direction of `flow`, as `pkt` opens it: keyed by
/// the tuple as the client sends it.
#[inline(always)]
fn insert_request(pkt: &Packet, flow: &Flow) -> Result<(), i32> {
    let mut flags = 0;
    if flow.source_nated(pkt) {
        flags |= NAT_SNAT | NAT_REDIRECT;
    }
    if flow.redirect_replies {
        flags |= NAT_REPLY_REDIRECT;
    }
    let to_backend = NatEntry {
        addr: flow.backend.addr,
        port: flow.backend.port,
        flags,
        seen: pkt.end_flags(),
        service_id: flow.service_id,
        slot: flow.slot,
        nat_addr: flow.source.addr,
        nat_port: flow.source.port,
        _pad: 0,
        last_seen: now_secs(),
    };
    CONNTRACK.insert(&pkt.flow_key(), &to_backend, BPF_ANY as u64)
}

/// Records both directions of `flow`, which keeps the source it has.
/// Reply entry and its filter bit first: a reply can never arrive before
/// the request it answers, so this order leaves no window in which it is
/// missed.
#[inline(always)]
pub fn create(pkt: &Packet, flow: &Flow) -> Result<(), i32> {
    insert_reply(pkt, flow, BPF_ANY as u64)?;
    insert_request(pkt, flow)
}

/// Records a new flow that keeps its source, unless another flow's replies
/// already come back on the same tuple (one client port reaching two
/// services that share a backend address and port): then its source port
/// is translated too, as netfilter remaps it, so that neither flow's
/// replies are taken for the other's. This client's own earlier flow to
/// the same frontend on the tuple (a reused tuple) is simply replaced.
#[inline(always)]
pub fn create_new(pkt: &Packet, flow: &mut Flow) -> Result<(), NatError> {
    if insert_reply(pkt, flow, BPF_NOEXIST as u64).is_ok() {
        return insert_request(pkt, flow).map_err(|_| NatError::Map);
    }
    let reply_key = flow_key(flow.backend, flow.source, pkt.proto);
    let ours = lookup(&reply_key)
        .is_none_or(|held| rewritten_to(&held) == pkt.destination() && other_end(&held, pkt.source()) == pkt.source());
    if ours {
        return create(pkt, flow).map_err(|_| NatError::Map);
    }
    create_nated(pkt, flow, pkt.src)
}

/// Why a source-NATed flow could not be recorded.
pub enum NatError {
    /// Every port tried is held by another flow to the same backend.
    Exhausted,
    Map,
}

/// Records `flow` with its source translated to `node_addr` and a free NAT
/// port: one whose reply tuple (backend -> node:port) no live flow holds,
/// claimed atomically by the reply entry's insert (a port whose flow has
/// ended is taken over). The search starts where the client's source port
/// maps (`nat_port_search_start`): one client's connections start apart,
/// and a reused tuple gets its port back.
///
/// The search runs in `bpf_loop` (as an open loop of `NAT_PORT_TRIES`
/// turns the verifier checked it turn by turn, at every place a flow is
/// source-NATed), inside a global function (see `kpr_search_nat_port`).
#[inline(always)]
pub fn create_nated(pkt: &Packet, flow: &mut Flow, node_addr: u32) -> Result<(), NatError> {
    let mut search = PortSearch {
        pkt: *pkt,
        flow: *flow,
        start: nat_port_search_start(pkt.src, pkt.sport, pkt.dst, pkt.dport),
        node_addr,
        claimed: 0,
    };
    if kpr_search_nat_port(&mut search) == 0 {
        return Err(NatError::Exhausted);
    }
    flow.source = search.flow.source;
    insert_request(pkt, flow).map_err(|_| NatError::Map)
}

/// What the NAT port search works on: copies, not pointers, since the
/// verifier accepts a pointer argument of a global function only to a
/// struct of plain values.
#[repr(C)]
pub struct PortSearch {
    pkt: Packet,
    /// The flow; its source is the claimed port once one is.
    flow: Flow,
    start: u32,
    node_addr: u32,
    /// Set (1) by the turn that claimed a port.
    claimed: u32,
}

/// The NAT port search: 1 if a port was claimed (left in the search's
/// flow), 0 if every port tried is held.
///
/// A global function, so the verifier checks it once, on its own, from
/// what its argument's type says; the callers then only see a number come
/// back. A static one (or the loop's callback called directly) is checked
/// again for each state a caller reaches it in: about 60 times a program,
/// half of all the verifier walked, and so of the daemon's start.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kpr_search_nat_port(search: *mut PortSearch) -> u32 {
    // The verifier cannot know the caller passes a live search.
    if search.is_null() {
        return 0;
    }
    // `bpf_loop` takes its callback's context only on this stack: the
    // search is reached through it.
    let mut turns = SearchTurns { search };
    // SAFETY: a callback of the signature `bpf_loop` calls, and a context
    // that outlives the call; the search is the caller's, alive as long.
    unsafe {
        bpf_loop(
            NAT_PORT_TRIES,
            try_nat_port as *const () as *mut c_void,
            &mut turns as *mut SearchTurns as *mut c_void,
            0,
        );
        (*search).claimed
    }
}

/// The context of the search's turns.
#[repr(C)]
struct SearchTurns {
    search: *mut PortSearch,
}

/// One turn of the NAT port search: the `turn`th port from the start, if no
/// live flow holds it. Returns 1 (stop) once a port is claimed.
#[inline(never)]
extern "C" fn try_nat_port(turn: u64, search: *mut c_void) -> i64 {
    // SAFETY: `kpr_search_nat_port`'s context and search, alive for the
    // whole loop.
    let search = unsafe { &mut *(*(search as *mut SearchTurns)).search };
    let (pkt, flow) = (&search.pkt, &mut search.flow);
    let candidate = Flow {
        source: Endpoint {
            addr: search.node_addr,
            port: nat_port_try(search.start, turn as u32).to_be(),
        },
        ..*flow
    };
    let claimed = insert_reply(pkt, &candidate, BPF_NOEXIST as u64).is_ok()
        || (reclaim_if_ended(&flow_key(candidate.backend, candidate.source, pkt.proto), pkt.proto)
            && insert_reply(pkt, &candidate, BPF_NOEXIST as u64).is_ok());
    if !claimed {
        return 0;
    }
    // Only a claimed port is written back: a search that claims none
    // leaves the caller's flow as it was.
    flow.source = candidate.source;
    search.claimed = 1;
    1
}

/// A new connection straight to an address that once answered for a
/// service, from a port such a flow used: the old flow's reply entry would
/// turn this connection's replies into the service's. Forget that flow, both
/// directions, so a later connection to the service starts afresh.
#[inline(always)]
pub fn forget_stale_flow(pkt: &Packet) {
    let reply = flow_key(pkt.destination(), pkt.source(), pkt.proto);
    let Some(stale) = lookup(&reply) else { return };
    if stale.flags & NAT_REPLY == 0 {
        return;
    }
    let _ = CONNTRACK.remove(&reply);
    let _ = CONNTRACK.remove(&stale.other_direction(&reply));
}
