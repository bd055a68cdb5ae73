//! Translation: rewrite one address and port of the packet and fix the IPv4
//! and L4 checksums incrementally; the L4 one with the kernel's helpers
//! (which also handle CHECKSUM_PARTIAL skbs, as veth traffic from pods
//! usually is).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{checksum, IPPROTO_UDP};

use crate::parse::{self, Packet};

/// -EFAULT: the IPv4 header parsed before is no longer in the linear data
/// (it cannot be; the verifier wants the check).
const HEADERS_GONE: i64 = -14;

/// Forward translation: the service address becomes the backend's.
#[inline(always)]
pub fn translate_dst(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(ctx, pkt, Side::Destination, addr, port)
}

/// Reverse translation: a backend's reply gets the service address back.
#[inline(always)]
pub fn translate_src(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(ctx, pkt, Side::Source, addr, port)
}

enum Side {
    Source,
    Destination,
}

/// The IPv4 header from its checksum to its destination address, as the
/// packet holds them: one store writes the translated address and the
/// header's new checksum together.
#[repr(C, packed)]
struct ChecksumAndAddresses {
    check: u16,
    src: u32,
    dst: u32,
}

#[inline(always)]
fn rewrite(ctx: &TcContext, pkt: &Packet, side: Side, new_addr: u32, new_port: u16) -> Result<(), i64> {
    let (old_addr, old_port, port_off, src, dst) = match side {
        Side::Source => (pkt.src, pkt.sport, pkt.l4_off, new_addr, pkt.dst),
        Side::Destination => (pkt.dst, pkt.dport, pkt.l4_off + 2, pkt.src, new_addr),
    };
    // Helper calls are most of this path's cost (~80 ns each here), so the
    // IPv4 header's checksum is updated here and stored with the address.
    // Direct packet writes would save the rest, but a program that makes
    // any gets an unclone check (a helper call) before every packet, and
    // most packets here come from local TCP sockets, as clones.
    let old_check = parse::read(ctx.data(), ctx.data_end(), Packet::IP_CSUM_OFF).map_err(|_| HEADERS_GONE)?;
    let check = checksum::replace4(old_check, old_addr, new_addr);
    ctx.store(Packet::IP_CSUM_OFF, &ChecksumAndAddresses { check, src, dst }, 0)?;
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
    ctx.l4_csum_replace(
        csum,
        old_addr as u64,
        new_addr as u64,
        BPF_F_PSEUDO_HDR as u64 | mangled | 4,
    )?;
    // Many services keep their port (80 to 80): two calls fewer.
    if old_port != new_port {
        ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, mangled | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}
