//! Connection tracking: both directions of a translated flow, keyed by the
//! tuple each direction's packets carry on arrival.
use proxy_common::{Backend, FlowKey, NatEntry, NAT_REPLY};

use crate::{
    maps::{self, CONNTRACK},
    parse::Packet,
};

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<NatEntry> {
    // SAFETY: copied out at once.
    unsafe { CONNTRACK.get(key).copied() }
}

/// Records a new flow from `pkt` to `backend` (chosen from `slot` of
/// `service_id`): requests are sent to the backend, and the backend's replies
/// are given the service address back.
#[inline(always)]
pub fn create(pkt: &Packet, service_id: u32, slot: u32, backend: &Backend) -> Result<(), i32> {
    let request = pkt.flow_key();
    let reply = FlowKey {
        src_addr: backend.addr,
        dst_addr: pkt.src,
        src_port: backend.port,
        dst_port: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let to_backend = NatEntry {
        addr: backend.addr,
        port: backend.port,
        flags: 0,
        _pad: 0,
        service_id,
        slot,
    };
    let to_service = NatEntry {
        addr: pkt.dst,
        port: pkt.dport,
        flags: NAT_REPLY,
        _pad: 0,
        service_id,
        slot,
    };
    // Reply entry and its filter bit first: a reply can never arrive before
    // the request it answers, so this order leaves no window in which it is
    // missed.
    CONNTRACK.insert(&reply, &to_service, 0)?;
    maps::mark_backend(backend.addr, backend.port, pkt.proto);
    CONNTRACK.insert(&request, &to_backend, 0)
}

/// A new connection straight to an address that once answered for a
/// service, from a port such a flow used: the old flow's reply entry would
/// turn this connection's replies into the service's. Forget that flow, both
/// directions, so a later connection to the service starts afresh.
#[inline(always)]
pub fn forget_stale_flow(pkt: &Packet) {
    let reply = FlowKey {
        src_addr: pkt.dst,
        dst_addr: pkt.src,
        src_port: pkt.dport,
        dst_port: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let Some(stale) = lookup(&reply) else { return };
    if stale.flags & NAT_REPLY == 0 {
        return;
    }
    let _ = CONNTRACK.remove(&reply);
    let request = FlowKey {
        src_addr: pkt.src,
        dst_addr: stale.addr,
        src_port: pkt.sport,
        dst_port: stale.port,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let _ = CONNTRACK.remove(&request);
}
