//! REJECT, as kube-proxy's rules answer a connection to a service without
//! any endpoint (`-j REJECT`, ICMP port unreachable for TCP and UDP alike):
//! the client's packet itself is turned into the ICMP error addressed back
//! to it, so its `connect()` fails at once with ECONNREFUSED instead of
//! hanging until it times out.
//!
//! The packet becomes: its Ethernet header (addresses swapped), a new IPv4
//! header from the service address to the client, an ICMP destination
//! unreachable / port unreachable header, and the client's original IPv4
//! header and L4 header: RFC 792 asks for at least 8 bytes of it; TCP's is
//! quoted whole (20 bytes), since a packet from a local socket still carries
//! a partial checksum there that the kernel will not let us cut.
use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{checksum, IPPROTO_ICMP, IPPROTO_TCP};

use crate::{
    nat,
    parse::{Ipv4Header, Packet, ETH_HLEN},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// The new IPv4 header and the ICMP header, inserted before the quote.
const ADDED: usize = 20 + 8;
/// What of the client's L4 header is quoted, by protocol.
const QUOTED_UDP: usize = 8;
const QUOTED_TCP: usize = 20;

/// The headers written in front of the quote, as the packet holds them.
#[repr(C, packed)]
struct Headers {
    ip: Ipv4Header,
    icmp_type: u8,
    icmp_code: u8,
    icmp_check: u16,
    unused: u32,
}

impl Headers {
    /// The headers' bytes as 32-bit values, for the checksums.
    fn words(&self) -> [u32; 7] {
        // SAFETY: a packed struct of 28 plain bytes read as seven u32.
        unsafe { core::mem::transmute_copy(self) }
    }
}

/// Turns `pkt` into the ICMP error for its sender and returns the verdict
/// that sends it back: out of the interface it came in by, or, for the
/// node's own packet (`to_host`), into the node through `lo`. `Err` when the
/// packet could not be rewritten (the caller drops it).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, pkt: &Packet, to_host: bool) -> Result<i32, i64> {
    let ihl = pkt.l4_off - ETH_HLEN;
    // The words of the quote: the client's IPv4 header sums to 0xffff (its
    // checksum is right), which adds nothing in one's complement, so only
    // the L4 header counts.
    let mut l4 = [0u32; 5];
    let quoted = if pkt.proto == IPPROTO_TCP {
        l4 = ctx.load(pkt.l4_off)?;
        QUOTED_TCP
    } else {
        let udp: [u32; 2] = ctx.load(pkt.l4_off)?;
        l4[..2].copy_from_slice(&udp);
        QUOTED_UDP
    };
    let mac: [u8; 12] = ctx.load(0)?;

    // SAFETY: the context is the kernel's skb for this run.
    let trimmed = unsafe { bpf_skb_change_tail(ctx.skb.skb, (pkt.l4_off + quoted) as u32, 0) };
    if trimmed != 0 {
        return Err(trimmed);
    }
    ctx.adjust_room(ADDED as i32, BPF_ADJ_ROOM_MAC, 0)?;

    let mut headers = Headers {
        ip: Ipv4Header {
            version_ihl: 0x45,
            total_len: ((ADDED + ihl + quoted) as u16).to_be(),
            ttl: 64,
            proto: IPPROTO_ICMP,
            src: pkt.dst,
            dst: pkt.src,
            ..Default::default()
        },
        icmp_type: ICMP_DEST_UNREACH,
        icmp_code: ICMP_PORT_UNREACH,
        icmp_check: 0,
        unused: 0,
    };
    let words = headers.words();
    headers.ip.check = checksum::of_words(&words[..5]);
    headers.icmp_check = checksum::of_words(&[words[5], words[6], l4[0], l4[1], l4[2], l4[3], l4[4]]);
    ctx.store(ETH_HLEN, &headers, 0)?;

    let mut swapped = [0u8; 12];
    if !to_host {
        swapped[..6].copy_from_slice(&mac[6..]);
        swapped[6..].copy_from_slice(&mac[..6]);
    }
    // For the node itself the frame enters through lo, whose address
    // (all zeros) it must carry to be taken in.
    ctx.store(0, &swapped, 0)?;
    if to_host {
        return Ok(nat::into_node_through_lo());
    }
    // SAFETY: the context is the kernel's skb for this run; a plain
    // redirect to the egress of the interface the packet came in by.
    Ok(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) } as i32)
}
