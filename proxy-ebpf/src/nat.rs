//! Translation: rewrite the addresses and ports of the packet and fix the
//! IPv4 and L4 checksums incrementally (the L4 one as the frame knows how:
//! the kernel's helpers on TC, which also handle CHECKSUM_PARTIAL skbs as
//! veth traffic from pods usually is; in software on XDP). Then, for packets
//! the stack must not see (they carry one of the node's own addresses as
//! source), the forward stage.
use aya_ebpf::{
    bindings::xdp_action::XDP_TX,
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_INGRESS,
        TC_ACT_UNSPEC,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use proxy_common::checksum;

use crate::{
    frame::{Frame, HEADERS_GONE},
    parse::{self, Fragment, Packet},
};

const AF_INET: u8 = 2;
/// `lo` has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// An address and port as the packet holds them (network order).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
}

impl Packet {
    pub fn source(&self) -> Endpoint {
        Endpoint {
            addr: self.src,
            port: self.sport,
        }
    }

    pub fn destination(&self) -> Endpoint {
        Endpoint {
            addr: self.dst,
            port: self.dport,
        }
    }
}

/// The IPv4 header from its checksum to its destination address, as the
/// packet holds them: one store writes the translated addresses and the
/// header's new checksum together.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct ChecksumAndAddresses {
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

/// Gives the packet this source and destination. What stays the same costs
/// nothing: most translations change one address, many keep the port too.
#[inline(always)]
pub fn rewrite<F: Frame>(frame: &F, pkt: &Packet, src: Endpoint, dst: Endpoint) -> Result<(), i64> {
    let (src_changes, dst_changes) = (src.addr != pkt.src, dst.addr != pkt.dst);
    // Helper calls are most of the TC path's cost (~80 ns each here), so
    // the IPv4 header's checksum is updated here and written with the
    // addresses in one store.
    let mut check = parse::read(frame.start(), frame.end(), Packet::IP_CSUM_OFF).map_err(|_| HEADERS_GONE)?;
    if src_changes {
        check = checksum::replace4(check, pkt.src, src.addr);
    }
    if dst_changes {
        check = checksum::replace4(check, pkt.dst, dst.addr);
    }
    let addresses = ChecksumAndAddresses {
        check,
        src: src.addr,
        dst: dst.addr,
    };
    frame.write(Packet::IP_CSUM_OFF, &addresses)?;
    // A later fragment has no L4 header: its datagram's checksum was
    // updated in the first fragment.
    if pkt.fragment == Fragment::Later {
        return Ok(());
    }
    if src_changes {
        frame.update_l4_checksum(pkt, pkt.src, src.addr, 4, true)?;
    }
    if dst_changes {
        frame.update_l4_checksum(pkt, pkt.dst, dst.addr, 4, true)?;
    }
    if src.port != pkt.sport {
        frame.update_l4_checksum(pkt, pkt.sport as u32, src.port as u32, 2, false)?;
        frame.write(pkt.l4_off, &src.port)?;
    }
    if dst.port != pkt.dport {
        frame.update_l4_checksum(pkt, pkt.dport as u32, dst.port as u32, 2, false)?;
        frame.write(pkt.l4_off + 2, &dst.port)?;
    }
    Ok(())
}

/// A FIB lookup's parameters: IPv4 from `src` to `dst`, arriving on
/// `ifindex`; every other field zero.
///
/// Built as its eight words: zeroing the struct (`mem::zeroed`) becomes a
/// call to the BPF build's `memset`, a byte-at-a-time loop that was 8% of
/// the TC program's time on NodePort replies in a profile.
#[inline(always)]
fn fib_query(src: u32, dst: u32, ifindex: u32) -> bpf_fib_lookup {
    // family, l4_protocol, sport, dport, tot_len | ifindex, tos |
    // ipv4_src | (rest of ipv6_src) | ipv4_dst | (rest of ipv6_dst) |
    // vlan, mark | macs: little-endian, so each field sits in its word's
    // low bytes.
    // A zero the compiler cannot see, or it would merge the zero words
    // into a `memset` call again.
    let zero = core::hint::black_box(0u64);
    let words: [u64; 8] = [
        AF_INET as u64,
        ifindex as u64,
        src as u64,
        zero,
        dst as u64,
        zero,
        zero,
        zero,
    ];
    // SAFETY: the same size (asserted at compile time by `transmute`), and
    // every bit pattern is a valid value of every field.
    unsafe { core::mem::transmute::<[u64; 8], bpf_fib_lookup>(words) }
}

/// Hands a frame already addressed to lo's MAC (all zeros) to the node
/// itself, through lo's ingress: the verdict to return.
#[inline(always)]
pub fn into_node_through_lo() -> i32 {
    // SAFETY: a plain redirect to an interface that always exists.
    unsafe { bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS as u64) as i32 }
}

/// Sends a rewritten packet out of the interface the FIB routes its new
/// destination through, the neighbour subsystem filling in the Ethernet
/// header: the stack would drop a packet arriving with one of the node's
/// own addresses as its source. One for the node itself (the reply to its
/// own connection to a NodePort, which has a node address at both ends)
/// enters again through `lo`, whose `accept_local` the daemon turns on for
/// exactly this.
#[inline(always)]
pub fn forward_by_fib(ctx: &TcContext, src: u32, dst: u32) -> i32 {
    // SAFETY: the context is the kernel's skb for this run.
    let mut params = fib_query(src, dst, unsafe { (*ctx.skb.skb).ifindex });
    // SAFETY: params is a live, correctly sized struct.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found == BPF_FIB_LKUP_RET_NOT_FWDED as i64 {
        // Addressed to lo's MAC (all zeros), or lo takes it for another
        // host's frame and the stack drops it.
        if ctx.store(0, &[0u8; 6], 0).is_err() {
            return TC_ACT_UNSPEC;
        }
        return into_node_through_lo();
    }
    if found != BPF_FIB_LKUP_RET_SUCCESS as i64 && found != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: no neighbour parameters: the helper resolves the next hop.
    unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Sends a translated frame on from XDP, before the kernel builds an skb
/// for it: the FIB gives the interface and the next hop's MAC address, and
/// the frame leaves by the interface it came in by (`XDP_TX`) or another.
/// `None` when the FIB cannot say (no neighbour entry yet, a local
/// destination): the TC path forwards it then, through the neighbour
/// subsystem.
#[inline(always)]
pub fn forward_from_xdp(ctx: &XdpContext, src: u32, dst: u32) -> Option<u32> {
    let arrived_on = ctx.ingress_ifindex() as u32;
    let mut params = fib_query(src, dst, arrived_on);
    // SAFETY: params is a live, correctly sized struct.
    let found = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    ctx.write(0, &params.dmac).ok()?;
    ctx.write(6, &params.smac).ok()?;
    if params.ifindex == arrived_on {
        return Some(XDP_TX);
    }
    // SAFETY: a plain redirect to the interface the FIB chose.
    Some(unsafe { bpf_redirect(params.ifindex, 0) } as u32)
}
