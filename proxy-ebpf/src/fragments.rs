//! Fragmented datagrams of translated flows: only the first fragment
//! carries the ports that find the flow, so its ports are remembered under
//! what identifies the datagram (addresses, protocol, IPv4 id), and the
//! later fragments look them up to be translated the same way (their
//! addresses only: they hold no L4 header). A later fragment that arrives
//! before its first one is left untouched, as Cilium does.
use proxy_common::FragmentPorts;

use crate::{maps::FRAGMENTS, parse::Packet};

/// After the first fragment of a datagram was translated.
#[inline(always)]
pub fn remember(pkt: &Packet) {
    let ports = FragmentPorts {
        src_port: pkt.sport,
        dst_port: pkt.dport,
    };
    let _ = FRAGMENTS.insert(&pkt.fragment_key(), &ports, 0);
}

/// Gives a later fragment the ports its first fragment carried; `false`
/// when that one was not seen (or not translated).
#[inline(always)]
pub fn follow_first(pkt: &mut Packet) -> bool {
    // SAFETY: copied out at once.
    let Some(ports) = (unsafe { FRAGMENTS.get(&pkt.fragment_key()) }).copied() else {
        return false;
    };
    pkt.sport = ports.src_port;
    pkt.dport = ports.dst_port;
    true
}
