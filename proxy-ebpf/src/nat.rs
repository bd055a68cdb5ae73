//! Translation: rewrite one address and port of the packet and fix the IPv4
//! and L4 checksums incrementally with the kernel's helpers (which also
//! handle CHECKSUM_PARTIAL skbs, as veth traffic from pods usually is).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::IPPROTO_UDP;

use crate::parse::Packet;

/// Forward translation: the service address becomes the backend's.
#[inline(always)]
pub fn translate_dst(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(
        ctx,
        pkt,
        Packet::IP_DST_OFF,
        pkt.dst,
        addr,
        pkt.l4_off + 2,
        pkt.dport,
        port,
    )
}

/// Reverse translation: a backend's reply gets the service address back.
#[inline(always)]
pub fn translate_src(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(ctx, pkt, Packet::IP_SRC_OFF, pkt.src, addr, pkt.l4_off, pkt.sport, port)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    // A UDP checksum of zero means "none" and must stay zero.
    let mangled = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum = pkt.l4_csum_off();
    ctx.l4_csum_replace(
        csum,
        old_addr as u64,
        new_addr as u64,
        BPF_F_PSEUDO_HDR as u64 | mangled | 4,
    )?;
    ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, mangled | 2)?;
    ctx.l3_csum_replace(Packet::IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
    ctx.store(addr_off, &new_addr, 0)?;
    ctx.store(port_off, &new_port, 0)?;
    Ok(())
}
