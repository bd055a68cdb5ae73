//! Translation: rewrite the addresses and ports of the packet and fix the
//! IPv4 and L4 checksums incrementally; the L4 one with the kernel's helpers
//! (which also handle CHECKSUM_PARTIAL skbs, as veth traffic from pods
//! usually is). Then, for packets the stack must not see (they carry one of
//! the node's own addresses as source), the forward stage.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_INGRESS,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{checksum, IPPROTO_UDP};

use crate::parse::{self, Fragment, Packet};

/// -EFAULT: the IPv4 header parsed before is no longer in the linear data
/// (it cannot be; the verifier wants the check).
const HEADERS_GONE: i64 = -14;
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
pub struct ChecksumAndAddresses {
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

/// Gives the packet this source and destination. What stays the same costs
/// nothing: most translations change one address, many keep the port too.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, src: Endpoint, dst: Endpoint) -> Result<(), i64> {
    let (src_changes, dst_changes) = (src.addr != pkt.src, dst.addr != pkt.dst);
    // Helper calls are most of this path's cost (~80 ns each here), so the
    // IPv4 header's checksum is updated here and stored with the addresses.
    // Direct packet writes would save the rest, but a program that makes
    // any gets an unclone check (a helper call) before every packet, and
    // most packets here come from local TCP sockets, as clones.
    let mut check = parse::read(ctx.data(), ctx.data_end(), Packet::IP_CSUM_OFF).map_err(|_| HEADERS_GONE)?;
    if src_changes {
        check = checksum::replace4(check, pkt.src, src.addr);
    }
    if dst_changes {
        check = checksum::replace4(check, pkt.dst, dst.addr);
    }
    ctx.store(
        Packet::IP_CSUM_OFF,
        &ChecksumAndAddresses {
            check,
            src: src.addr,
            dst: dst.addr,
        },
        0,
    )?;
    // A later fragment has no L4 header: its datagram's checksum was
    // updated in the first fragment.
    if pkt.fragment == Fragment::Later {
        return Ok(());
    }
    // A UDP checksum of zero means "none" and must stay zero.
    let mangled = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    // The L4 checksum through the kernel: only it knows whether the skb
    // holds a partial checksum (the pseudo-header's, as packets from local
    // sockets do) or a full one, which the same rewrite changes in opposite
    // directions.
    let csum = pkt.l4_csum_off();
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    if src_changes {
        ctx.l4_csum_replace(csum, pkt.src as u64, src.addr as u64, pseudo)?;
    }
    if dst_changes {
        ctx.l4_csum_replace(csum, pkt.dst as u64, dst.addr as u64, pseudo)?;
    }
    if src.port != pkt.sport {
        ctx.l4_csum_replace(csum, pkt.sport as u64, src.port as u64, mangled | 2)?;
        ctx.store(pkt.l4_off, &src.port, 0)?;
    }
    if dst.port != pkt.dport {
        ctx.l4_csum_replace(csum, pkt.dport as u64, dst.port as u64, mangled | 2)?;
        ctx.store(pkt.l4_off + 2, &dst.port, 0)?;
    }
    Ok(())
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
    // SAFETY: plain data; zero is a valid value of every field.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: the context is the kernel's skb for this run.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
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
