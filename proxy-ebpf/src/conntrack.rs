//! Connection tracking: both directions of a translated flow, keyed by the
//! tuple each direction's packets carry on arrival; and the allocation of
//! NAT ports for flows whose source is translated too.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use proxy_common::{
    FlowKey, NatEntry, NAT_PORT_MAX, NAT_PORT_MIN, NAT_PORT_TRIES, NAT_REDIRECT, NAT_REPLY, NAT_SNAT, SEEN_FIN,
    SEEN_RST,
};

use crate::{
    clock::now_secs,
    maps::{self, CONNTRACK},
    nat::Endpoint,
    parse::Packet,
};

/// `NatEntry::flags` of a request entry: its replies leave by the FIB
/// (kept on the request so that a flow re-created from it keeps it too).
pub const NAT_REPLY_REDIRECT: u8 = 8;

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<NatEntry> {
    // SAFETY: copied out at once.
    unsafe { CONNTRACK.get(key).copied() }
}

/// Records what a packet of a tracked flow says of its lifetime in its
/// entry for this direction (`key`): whether it ends the connection (TCP
/// FIN or RST), and, for a source-NATed flow (`timed`), when it was seen,
/// so that its NAT port is freed once the flow is over. Written only when
/// it changes, so most packets only read the entry, and packets of other
/// flows that end nothing do not touch it at all.
#[inline(always)]
pub fn note_packet(key: &FlowKey, pkt: &Packet, timed: bool) {
    let end = pkt.end_flags();
    if !timed && end == 0 {
        return;
    }
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a live map value; a racing update of these two plain fields
    // from another CPU leaves either value, both of which are right.
    unsafe {
        if timed {
            let now = now_secs();
            if (*entry).last_seen != now {
                (*entry).last_seen = now;
            }
        }
        if (*entry).seen & end != end {
            (*entry).seen |= end;
        }
    }
}

/// Whether the TCP connection a request entry tracks has ended (a FIN
/// each way, or a RST either way), so that a SYN on its tuple opens a new
/// connection, balanced afresh, as netfilter does.
#[inline(always)]
pub fn connection_closed(pkt: &Packet, request: &NatEntry) -> bool {
    let reply_key = flow_key(rewritten_to(request), other_end(request, pkt.source()), pkt.proto);
    // A reply entry lost (evicted) says nothing: a SYN then is taken for a
    // retransmission of the same connection, which keeps its backend.
    let back = lookup(&reply_key).map_or(0, |r| r.seen);
    let forth = request.seen;
    (back | forth) & SEEN_RST != 0 || back & forth & SEEN_FIN != 0
}

/// A NAT port held by a flow that has ended is taken over: its entries are
/// removed so that the new flow's reply entry can claim the port.
#[inline(always)]
fn reclaim_if_ended(reply_key: &FlowKey, proto: u8) -> bool {
    let Some(reply) = lookup(reply_key) else {
        // Evicted meanwhile: free.
        return true;
    };
    // Only a NATed flow keeps the times to judge by; any other flow on the
    // tuple (the node's own, from a port in the range) is left alone.
    if reply.flags & NAT_SNAT == 0 {
        return false;
    }
    // Reply entries of NATed flows always carry the client.
    let client = other_end(&reply, Endpoint { addr: 0, port: 0 });
    let request_key = flow_key(client, rewritten_to(&reply), proto);
    let request = lookup(&request_key);
    if !NatEntry::flow_ended(&reply, request.as_ref(), proto, now_secs()) {
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
    FlowKey {
        src_addr: src.addr,
        dst_addr: dst.addr,
        src_port: src.port,
        dst_port: dst.port,
        proto,
        _pad: [0; 3],
    }
}

/// Records the reply direction of `flow` (`flags`: `BPF_NOEXIST` to claim a
/// NAT port, which fails when another flow holds it).
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
        last_seen: if snat { now_secs() } else { 0 },
    };
    CONNTRACK.insert(&flow_key(flow.backend, flow.source, pkt.proto), &to_client, flags)?;
    maps::mark_backend(flow.backend.addr, flow.backend.port, pkt.proto);
    Ok(())
}

#[inline(always)]
fn insert_request(pkt: &Packet, flow: &Flow) -> Result<(), i32> {
    let mut flags = 0;
    let snat = flow.source_nated(pkt);
    if snat {
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
        last_seen: if snat { now_secs() } else { 0 },
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
/// ended is taken over). The search starts at a hash of the client's
/// tuple, so clients spread over the range.
#[inline(always)]
pub fn create_nated(pkt: &Packet, flow: &mut Flow, node_addr: u32) -> Result<(), NatError> {
    let range = (NAT_PORT_MAX - NAT_PORT_MIN) as u32 + 1;
    let seed = (pkt.src ^ ((pkt.sport as u32) << 16) ^ pkt.dst ^ pkt.dport as u32).wrapping_mul(0x9E37_79B1);
    let mut claimed = false;
    for i in 0..NAT_PORT_TRIES {
        let port = NAT_PORT_MIN + ((seed >> 16).wrapping_add(i.wrapping_mul(7919)) % range) as u16;
        flow.source = Endpoint {
            addr: node_addr,
            port: port.to_be(),
        };
        if insert_reply(pkt, flow, BPF_NOEXIST as u64).is_ok() {
            claimed = true;
            break;
        }
        let reply_key = flow_key(flow.backend, flow.source, pkt.proto);
        if reclaim_if_ended(&reply_key, pkt.proto) && insert_reply(pkt, flow, BPF_NOEXIST as u64).is_ok() {
            claimed = true;
            break;
        }
    }
    if !claimed {
        return Err(NatError::Exhausted);
    }
    insert_request(pkt, flow).map_err(|_| NatError::Map)
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
    // The request as the client sent it.
    let client = other_end(&stale, pkt.source());
    let _ = CONNTRACK.remove(&flow_key(client, rewritten_to(&stale), pkt.proto));
}
