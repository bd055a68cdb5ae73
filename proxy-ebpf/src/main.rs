//! The TC data path: DNAT to service backends, source NAT where the reply
//! would not come back otherwise, and reverse translation of replies.
//!
//! Stages, as in Cilium's lb.h and nodeport.h: parse -> conntrack -> lookup
//! service -> source ranges -> select backend -> source NAT (port
//! allocation) -> translate (or reverse-translate a reply) -> forward by
//! the FIB where the stack must not see the packet. Beside them: ICMP
//! errors about tracked flows translated back (`icmp`), later fragments of a
//! translated datagram following its first (`fragments`), and REJECT
//! (`reject`). Three entry points, one per origin of the packets they see,
//! share every stage.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod clock;
mod conntrack;
mod fragments;
mod frame;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod sock;
mod xdp;

// Rare branches are marked cold so that LLVM lays their code out after the
// common paths': a packet meets the program with a cold instruction cache
// more often than not, and every cache line the common path spans counts.
use core::hint::cold_path;

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    FrontendKind, NatEntry, ServiceValue, Stat, IPPROTO_ICMP, IPPROTO_TCP, NAT_REDIRECT, NAT_REPLY, SVC_EXTERNAL_LOCAL,
    SVC_REJECT, SVC_SOURCE_RANGES,
};

use crate::{
    conntrack::{Flow, NatError},
    frame::Frame,
    nat::Endpoint,
    parse::{Fragment, Packet, ParseError},
};

/// Where the packets a program sees come from (its attachment).
mod origin {
    /// Ingress of a pod-facing interface: a pod.
    pub const POD: u8 = 0;
    /// Ingress of an external interface: outside the node.
    pub const OUTSIDE: u8 = 1;
    /// Egress of an external interface or of `lo`: the node's own processes.
    pub const HOST: u8 = 2;
}

/// What became of a packet: every packet is counted under exactly one
/// stat, and leaves with a TC action, or by the FIB.
///
/// A struct whose every field is always set, not an enum with payloads:
/// LLVM leaves the fields a variant lacks undefined, and may then spill and
/// reload such a value on the way to the join, which the verifier rejects
/// as a read of an uninitialised register.
struct Verdict {
    stat: Stat,
    /// The TC action, or `BY_FIB`.
    action: i32,
    /// With `BY_FIB`: the addresses the FIB lookup is for.
    src: u32,
    dst: u32,
}

/// Not a TC action: the packet is sent out by `nat::forward_by_fib`.
const BY_FIB: i32 = i32::MIN;
/// Not a TC action: the packet was left as it was, for what comes next
/// (TC_ACT_UNSPEC on TC; on XDP, the TC program).
const UNTOUCHED: i32 = i32::MIN + 1;
const DROP: i32 = TC_ACT_SHOT as i32;

impl Verdict {
    fn with(stat: Stat, action: i32) -> Self {
        Verdict {
            stat,
            action,
            src: 0,
            dst: 0,
        }
    }

    /// A new flow of `svc` ended here (refused, dropped): counted for the
    /// service too.
    fn counted_for(self, svc: &ServiceValue) -> Self {
        maps::count_service_verdict(svc.id, self.stat);
        self
    }

    /// Translated; on to the next program on the hook, then the stack.
    fn translated(stat: Stat) -> Self {
        Self::with(stat, TC_ACT_UNSPEC)
    }

    /// Translated, to be sent out by the FIB (new source `src`, new
    /// destination `dst`), bypassing the stack.
    fn redirected(stat: Stat, src: u32, dst: u32) -> Self {
        Verdict {
            stat,
            action: BY_FIB,
            src,
            dst,
        }
    }

    /// Turned into an answer to its sender, sent with this action.
    fn answered(stat: Stat, action: i32) -> Self {
        Self::with(stat, action)
    }

    /// Not ours (or, on XDP, not its to finish): left untouched for
    /// whatever comes next.
    fn untouched(stat: Stat) -> Self {
        Self::with(stat, UNTOUCHED)
    }

    fn drop(stat: Stat) -> Self {
        Self::with(stat, DROP)
    }
}

/// Ingress of the node's pod-facing interfaces: traffic from inside.
#[classifier]
pub fn kpr_tc(ctx: TcContext) -> i32 {
    run::<{ origin::POD }>(&ctx)
}

/// Ingress of the node's external interfaces: traffic from outside.
#[classifier]
pub fn kpr_tc_external(ctx: TcContext) -> i32 {
    run::<{ origin::OUTSIDE }>(&ctx)
}

/// Egress of the node's external interfaces and `lo`: traffic of the node's
/// own processes.
#[classifier]
pub fn kpr_tc_host(ctx: TcContext) -> i32 {
    run::<{ origin::HOST }>(&ctx)
}

#[inline(always)]
fn run<const ORIGIN: u8>(ctx: &TcContext) -> i32 {
    // Translated by XDP already (see `xdp`): only its forwarding may be
    // left to do.
    if ORIGIN == origin::OUTSIDE {
        match xdp::mark(ctx) {
            xdp::Mark::Translated => return TC_ACT_UNSPEC,
            xdp::Mark::Forward => return xdp::forward_here(ctx),
            xdp::Mark::None => {}
        }
    }
    let verdict = process::<TcContext, ORIGIN>(ctx);
    // A translated packet goes on through the hook (TC_ACT_UNSPEC: the next
    // program, a CNI's network policy say, still sees it; with none, it
    // passes), as an untouched one does.
    let action = match verdict.action {
        BY_FIB => nat::forward_by_fib(ctx, verdict.src, verdict.dst),
        UNTOUCHED => TC_ACT_UNSPEC,
        action => action,
    };
    maps::count(verdict.stat);
    action
}

/// The external interfaces' XDP hook: traffic from outside, before the
/// kernel builds an skb. A frame it leaves untouched is not counted here:
/// the TC program sees it next and counts it.
#[xdp]
pub fn kpr_xdp(ctx: XdpContext) -> u32 {
    if !xdp::reserve_mark(&ctx) {
        return XDP_PASS;
    }
    let verdict = process::<XdpContext, { origin::OUTSIDE }>(&ctx);
    let action = match verdict.action {
        UNTOUCHED => return XDP_PASS,
        BY_FIB => match nat::forward_from_xdp(&ctx, verdict.src, verdict.dst) {
            Some(action) => action,
            None => {
                xdp::set_mark(&ctx, xdp::Mark::Forward);
                XDP_PASS
            }
        },
        DROP => XDP_DROP,
        _ => {
            xdp::set_mark(&ctx, xdp::Mark::Translated);
            XDP_PASS
        }
    };
    maps::count(verdict.stat);
    action
}

/// Does nothing: the floor the benchmarks measure `kpr_xdp` against, and
/// what a test's far end of a veth runs so that frames sent by XDP are
/// taken in. Never attached by the daemon.
#[xdp]
pub fn kpr_xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The test harness's LAN switch (see `proxy_common::XDP_WIRE_PROGRAM`).
/// Never attached by the daemon.
#[xdp]
pub fn kpr_xdp_wire(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let Ok(dst) = parse::read::<[u8; 6]>(data, end, 0) else {
        return XDP_PASS;
    };
    if dst[..5] != proxy_common::WIRE_MAC_PREFIX {
        return XDP_PASS;
    }
    // A member without a port passes (flags: the action when no entry).
    match maps::WIRE_PORTS.redirect(dst[5] as u32, XDP_PASS as u64) {
        Ok(action) | Err(action) => action,
    }
}

/// Does nothing: the floor the benchmarks measure `kpr_tc` against. Never
/// attached by the daemon.
#[classifier]
pub fn kpr_noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Every stage, for either kind of frame; what only TC does (REJECT,
/// replies, ICMP errors, later fragments, stale-state cleanup) is left to
/// it by XDP: untouched there, the packet meets the TC program next.
#[inline(always)]
fn process<F: Frame, const ORIGIN: u8>(frame: &F) -> Verdict {
    let mut pkt = match frame.parse() {
        Ok(pkt) => pkt,
        Err(ParseError::NotIpv4) => return Verdict::untouched(Stat::NotIpv4),
        Err(ParseError::Truncated) => return Verdict::untouched(Stat::Truncated),
        Err(ParseError::OtherProtocol) => return Verdict::untouched(Stat::NoMatch),
    };
    if pkt.proto == IPPROTO_ICMP {
        cold_path();
        return match frame.tc() {
            Some(ctx) => icmp_error::<ORIGIN>(ctx, &pkt),
            None => Verdict::untouched(Stat::NoMatch),
        };
    }
    if pkt.fragment == Fragment::Later {
        cold_path();
        return match frame.tc() {
            Some(ctx) => later_fragment::<ORIGIN>(ctx, &mut pkt),
            None => Verdict::untouched(Stat::Fragment),
        };
    }

    // Nothing addressed to a service, nothing from a backend, and no new
    // connection to a backend (which may need stale state cleared): not ours,
    // decided without touching the hash tables. A packet to a service skips
    // the backend probes, whose answer it does not need: keyed by its
    // client's port, they read other filter words for every connection
    // (out of cache, the exact one was the costliest load of the TC path in
    // a profile of real traffic).
    let to_service = maps::may_be_frontend(pkt.dst, pkt.dport, pkt.proto);
    if !to_service
        && !maps::may_be_backend(pkt.src, pkt.sport, pkt.proto)
        && !(pkt.may_open_flow() && maps::may_be_backend(pkt.dst, pkt.dport, pkt.proto))
    {
        return Verdict::untouched(Stat::NoMatch);
    }

    let key = pkt.flow_key();
    if let Some(tracked) = conntrack::lookup_mut(&key) {
        // SAFETY: a live map value, copied before the packet is noted in it.
        let entry = unsafe { *tracked };
        if entry.flags & NAT_REPLY != 0 {
            let Some(ctx) = frame.tc() else {
                return Verdict::untouched(Stat::Reply);
            };
            conntrack::note_packet(&key, &pkt, tracked, &entry);
            return reverse_translate(ctx, &pkt, &entry);
        }
        conntrack::note_packet(&key, &pkt, tracked, &entry);
        // A SYN on the tuple of a connection that has closed opens a new
        // one: balanced afresh, not pinned to where the old one went.
        let reopened = pkt.is_syn() && conntrack::connection_closed(&pkt, &entry);
        if !pkt.may_open_flow() || (lb::still_selected(&entry) && !reopened) {
            let flow = Flow::of_entry(&pkt, &entry);
            if pkt.is_syn() {
                // A new connection keeping the tracked backend: record both
                // directions again, in case one was evicted or forgotten.
                let _ = conntrack::create(&pkt, &flow);
            }
            return translate::<F, ORIGIN>(frame, &pkt, &flow, Stat::Established);
        }
        // A new connection on a reused tuple whose connection closed or
        // whose backend has gone: choose again below.
    }

    // The pre-filter has already ruled out a service for most untracked
    // packets (replies of direct connections, say).
    let svc = if to_service {
        lb::lookup_service(pkt.dst, pkt.dport, pkt.proto)
    } else {
        None
    };
    let Some(svc) = svc else {
        // Not at the host's egress: every request this path translates and
        // sends out again by the FIB passes there, looking just like such a
        // new direct connection.
        if pkt.may_open_flow() && ORIGIN != origin::HOST && frame.tc().is_some() {
            conntrack::forget_stale_flow(&pkt);
        }
        return Verdict::untouched(Stat::NoMatch);
    };
    open_flow::<F, ORIGIN>(frame, &pkt, &svc)
}

/// A fragment after the first of a datagram: it follows the first one's
/// translation, if that one was translated; it never opens a flow (it has
/// no L4 header to choose by).
///
/// Rare paths (this, ICMP errors) are functions of their own: out of line,
/// they keep the common path's code together.
#[inline(never)]
fn later_fragment<const ORIGIN: u8>(ctx: &TcContext, pkt: &mut Packet) -> Verdict {
    if !fragments::follow_first(pkt) {
        return Verdict::untouched(Stat::Fragment);
    }
    let Some(entry) = conntrack::lookup(&pkt.flow_key()) else {
        return Verdict::untouched(Stat::Fragment);
    };
    if entry.flags & NAT_REPLY != 0 {
        return reverse_translate(ctx, pkt, &entry);
    }
    translate::<TcContext, ORIGIN>(ctx, pkt, &Flow::of_entry(pkt, &entry), Stat::Established)
}

/// An ICMP error: translated as a packet of the flow it is about, going
/// the same way, would be.
#[inline(never)]
fn icmp_error<const ORIGIN: u8>(ctx: &TcContext, pkt: &Packet) -> Verdict {
    let mut error = icmp::Translated::default();
    match icmp::translate_error(ctx, pkt, &mut error) {
        icmp::Outcome::Translated => {
            let request = error.entry_flags & NAT_REPLY == 0;
            if error.entry_flags & NAT_REDIRECT != 0 || (request && ORIGIN == origin::HOST) {
                Verdict::redirected(Stat::IcmpError, error.src, error.dst)
            } else {
                Verdict::translated(Stat::IcmpError)
            }
        }
        icmp::Outcome::NotOurs => Verdict::untouched(Stat::NoMatch),
        icmp::Outcome::Failed => Verdict::drop(Stat::Error),
    }
}

/// The first packet of a flow to a service: who may, which backend, whether
/// the source must be translated too; then the flow is recorded and its
/// first packet translated.
#[inline(always)]
fn open_flow<F: Frame, const ORIGIN: u8>(frame: &F, pkt: &Packet, svc: &ServiceValue) -> Verdict {
    // Handing the node back: new flows go on untouched, to whatever follows
    // kpr on the hook (kube-proxy's rules).
    if maps::draining() {
        cold_path();
        return Verdict::untouched(Stat::NoMatch);
    }
    // Only a SYN opens a TCP connection. Any other TCP packet here belongs
    // to a connection whose entry is gone: a backend chosen now would not
    // know it and could only reset it.
    if pkt.proto == IPPROTO_TCP && !pkt.is_syn() {
        return Verdict::drop(Stat::NoFlow).counted_for(svc);
    }
    let from_outside = ORIGIN == origin::OUTSIDE;
    if from_outside && svc.flags & SVC_SOURCE_RANGES != 0 && !lb::source_allowed(svc.id, pkt.src) {
        return Verdict::drop(Stat::SourceDenied).counted_for(svc);
    }
    let Some((slot, backend)) = lb::select_backend(svc, from_outside, pkt.src as u64) else {
        // No endpoint anywhere: refused. An empty local-only set (a Local
        // traffic policy) is dropped, as kube-proxy does.
        cold_path();
        if svc.flags & SVC_REJECT != 0 {
            let Some(ctx) = frame.tc() else {
                return Verdict::untouched(Stat::Rejected);
            };
            let verdict = match reject::port_unreachable(ctx, pkt, ORIGIN == origin::HOST) {
                Ok(action) => Verdict::answered(Stat::Rejected, action),
                Err(_) => Verdict::drop(Stat::Error),
            };
            return verdict.counted_for(svc);
        }
        if from_outside && svc.flags & SVC_EXTERNAL_LOCAL != 0 {
            return Verdict::drop(Stat::NoLocalBackend).counted_for(svc);
        }
        return Verdict::drop(Stat::NoBackend).counted_for(svc);
    };
    let mut flow = Flow {
        service_id: svc.id,
        slot,
        backend: Endpoint {
            addr: backend.addr,
            port: backend.port,
        },
        source: pkt.source(),
        redirect_replies: svc.kind() == FrontendKind::NodePort,
    };
    // From outside to a backend on another node, the reply would go
    // straight back to the client from there, with the wrong source: send
    // it from this node instead (kube-proxy masquerades all such traffic;
    // a local backend keeps the client's address). A pod reaching itself
    // through its service would answer itself without ever leaving: send
    // it from this node too (hairpin).
    let needs_snat = (from_outside && !backend.is_local()) || backend.addr == pkt.src;
    if needs_snat {
        flow.redirect_replies = true;
        let Some(node) = maps::snat_addr() else {
            return Verdict::drop(Stat::Error).counted_for(svc);
        };
        match conntrack::create_nated(pkt, &mut flow, node) {
            Ok(()) => {}
            Err(NatError::Exhausted) => return Verdict::drop(Stat::NatExhausted).counted_for(svc),
            Err(NatError::Map) => return Verdict::drop(Stat::Error).counted_for(svc),
        }
    } else {
        match conntrack::create_new(pkt, &mut flow) {
            Ok(()) => {}
            Err(NatError::Exhausted) => return Verdict::drop(Stat::NatExhausted).counted_for(svc),
            Err(NatError::Map) => return Verdict::drop(Stat::Error).counted_for(svc),
        }
    }
    translate::<F, ORIGIN>(frame, pkt, &flow, Stat::NewFlow)
}

/// A request of a tracked (or just created) flow: to its backend, from the
/// source the flow leaves with. A request of the node's own was routed
/// towards the service address already: it is routed again.
#[inline(always)]
fn translate<F: Frame, const ORIGIN: u8>(frame: &F, pkt: &Packet, flow: &Flow, stat: Stat) -> Verdict {
    if nat::rewrite(frame, pkt, flow.source, flow.backend).is_err() {
        cold_path();
        return Verdict::drop(Stat::Error);
    }
    if pkt.fragment == Fragment::First {
        cold_path();
        fragments::remember(pkt);
    }
    if ORIGIN == origin::HOST || flow.source_nated(pkt) {
        return Verdict::redirected(stat, flow.source.addr, flow.backend.addr);
    }
    Verdict::translated(stat)
}

/// A backend's reply: from the address the client dialled, to the client.
#[inline(always)]
fn reverse_translate(ctx: &TcContext, pkt: &Packet, entry: &NatEntry) -> Verdict {
    let service = conntrack::rewritten_to(entry);
    let client = conntrack::other_end(entry, pkt.destination());
    if nat::rewrite(ctx, pkt, service, client).is_err() {
        cold_path();
        return Verdict::drop(Stat::Error);
    }
    if pkt.fragment == Fragment::First {
        cold_path();
        fragments::remember(pkt);
    }
    if entry.flags & NAT_REDIRECT != 0 {
        return Verdict::redirected(Stat::Reply, service.addr, client.addr);
    }
    Verdict::translated(Stat::Reply)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
