//! XDP's share of the path from outside: it runs the same stages on the
//! frame before the kernel has built an skb, translates (and, for a backend
//! on another node, forwards) what it can, drops what must be dropped, and
//! leaves everything else to the TC program behind it, the complete path.
//!
//! A frame XDP translated must not be taken by TC for a new connection
//! straight to a backend (it would clear the flow's reply state), so XDP
//! leaves a mark in the frame's metadata, which the skb keeps: TC then
//! passes the frame, or forwards it through the neighbour subsystem when
//! XDP could not (no neighbour entry yet).
use aya_ebpf::{
    bindings::{xdp_md, TC_ACT_UNSPEC},
    helpers::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
};

use crate::{nat, parse::Packet};

const TRANSLATED: u32 = proxy_common::XDP_MARK_TRANSLATED;
const FORWARD: u32 = proxy_common::XDP_MARK_FORWARD;
const MARK_LEN: usize = core::mem::size_of::<u32>();

pub enum Mark {
    /// Not translated by XDP (or no XDP program ran).
    None,
    /// Translated, for the stack to take on.
    Translated,
    /// Translated, to be forwarded by the FIB.
    Forward,
}

/// Makes room for the mark in front of the frame, before anything else:
/// without it, XDP must leave the frame alone. The room is left unmarked.
#[inline(always)]
pub fn reserve_mark(ctx: &XdpContext) -> bool {
    // SAFETY: the context is the kernel's xdp_md for this run.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx as *mut xdp_md, -(MARK_LEN as i32)) } != 0 {
        return false;
    }
    write_mark(ctx, 0)
}

/// Marks a frame whose room `reserve_mark` made.
#[inline(always)]
pub fn set_mark(ctx: &XdpContext, mark: Mark) {
    let value = match mark {
        Mark::None => 0,
        Mark::Translated => TRANSLATED,
        Mark::Forward => FORWARD,
    };
    write_mark(ctx, value);
}

#[inline(always)]
fn write_mark(ctx: &XdpContext, value: u32) -> bool {
    let meta = ctx.metadata();
    if meta + MARK_LEN > ctx.data() {
        return false;
    }
    // SAFETY: the metadata area is at least MARK_LEN long (checked above).
    unsafe { (meta as *mut u32).write_unaligned(value) };
    true
}

/// What XDP left in front of this skb's data.
#[inline(always)]
pub fn mark(ctx: &TcContext) -> Mark {
    // SAFETY: the context is the kernel's skb for this run.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    if meta + MARK_LEN > data {
        return Mark::None;
    }
    // SAFETY: MARK_LEN bytes of metadata (checked above).
    match unsafe { (meta as *const u32).read_unaligned() } {
        TRANSLATED => Mark::Translated,
        FORWARD => Mark::Forward,
        _ => Mark::None,
    }
}

/// Forwards a frame XDP translated but could not send on itself.
#[inline(always)]
pub fn forward_here(ctx: &TcContext) -> i32 {
    let addresses = (
        crate::parse::read::<u32>(ctx.data(), ctx.data_end(), Packet::IP_SRC_OFF),
        crate::parse::read::<u32>(ctx.data(), ctx.data_end(), Packet::IP_DST_OFF),
    );
    match addresses {
        (Ok(src), Ok(dst)) => nat::forward_by_fib(ctx, src, dst),
        _ => TC_ACT_UNSPEC,
    }
}
