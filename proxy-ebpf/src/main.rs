//! The TC data path: DNAT to service backends and reverse NAT of replies.
//!
//! Stages, as in Cilium's lb.h: parse -> conntrack -> lookup service ->
//! select backend -> translate (or reverse-translate a reply).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod lb;
mod maps;
mod nat;
mod parse;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{Backend, Stat, NAT_REPLY};

use crate::parse::{Packet, ParseError, MAX_HEADERS};

/// What became of a packet: every packet is counted under exactly one stat.
enum Verdict {
    /// Translated; accepted.
    Translated(Stat),
    /// Not ours: left untouched for whatever comes next on the hook.
    Untouched(Stat),
    Drop(Stat),
}

#[classifier]
pub fn kpr_tc(ctx: TcContext) -> i32 {
    let verdict = process(&ctx);
    let (stat, action) = match verdict {
        Verdict::Translated(s) => (s, TC_ACT_OK as i32),
        Verdict::Untouched(s) => (s, TC_ACT_UNSPEC),
        Verdict::Drop(s) => (s, TC_ACT_SHOT as i32),
    };
    maps::count(stat);
    action
}

/// Does nothing: the floor the benchmarks measure `kpr_tc` against. Never
/// attached by the daemon.
#[classifier]
pub fn kpr_noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
fn process(ctx: &TcContext) -> Verdict {
    let pkt = match parse_packet(ctx) {
        Ok(pkt) => pkt,
        Err(ParseError::NotIpv4) => return Verdict::Untouched(Stat::NotIpv4),
        Err(ParseError::Fragment) => return Verdict::Untouched(Stat::Fragment),
        Err(ParseError::Truncated) => return Verdict::Untouched(Stat::Truncated),
        Err(ParseError::OtherProtocol) => return Verdict::Untouched(Stat::NoMatch),
    };

    // Nothing addressed to a service, nothing from a backend, and no new
    // connection to a backend (which may need stale state cleared): not ours,
    // decided without touching the hash tables.
    let to_service = maps::may_be_frontend(pkt.dst, pkt.dport, pkt.proto);
    let from_backend = maps::may_be_backend(pkt.src, pkt.sport, pkt.proto);
    if !to_service && !from_backend && !(pkt.may_open_flow() && maps::may_be_backend(pkt.dst, pkt.dport, pkt.proto)) {
        return Verdict::Untouched(Stat::NoMatch);
    }

    if let Some(entry) = conntrack::lookup(&pkt.flow_key()) {
        if entry.flags & NAT_REPLY != 0 {
            return applied(nat::translate_src(ctx, &pkt, entry.addr, entry.port), Stat::Reply);
        }
        if !pkt.may_open_flow() || lb::still_selected(&entry) {
            if pkt.is_syn() {
                // A new connection keeping the tracked backend: record both
                // directions again, in case one was evicted or forgotten.
                let backend = Backend {
                    addr: entry.addr,
                    port: entry.port,
                    _pad: 0,
                };
                let _ = conntrack::create(&pkt, entry.service_id, entry.slot, &backend);
            }
            return applied(nat::translate_dst(ctx, &pkt, entry.addr, entry.port), Stat::Established);
        }
        // A new connection on a reused tuple whose backend has gone: choose
        // again below.
    }

    // The pre-filter has already ruled out a service for most untracked
    // packets (replies of direct connections, say).
    let svc = if to_service {
        lb::lookup_service(pkt.dst, pkt.dport, pkt.proto)
    } else {
        None
    };
    let Some(svc) = svc else {
        if pkt.may_open_flow() {
            conntrack::forget_stale_flow(&pkt);
        }
        return Verdict::Untouched(Stat::NoMatch);
    };
    let Some((slot, backend)) = lb::select_backend(&svc) else {
        return Verdict::Drop(Stat::NoBackend);
    };
    if conntrack::create(&pkt, svc.id, slot, &backend).is_err() {
        return Verdict::Drop(Stat::Error);
    }
    applied(nat::translate_dst(ctx, &pkt, backend.addr, backend.port), Stat::NewFlow)
}

/// Parses the headers from the linear part of the skb; only when they run
/// past it are they pulled in. Pulling unconditionally would cost most
/// packets from local sockets a copy: their payload sits in page fragments,
/// their headers (all this reads) in the linear part, and they are clones.
#[inline(always)]
fn parse_packet(ctx: &TcContext) -> Result<Packet, ParseError> {
    let headers = core::cmp::min(ctx.len() as usize, MAX_HEADERS);
    match parse::parse(ctx.data(), ctx.data_end()) {
        Err(ParseError::Truncated) if ctx.data_end() - ctx.data() < headers => {
            // On failure the parse below reports the short headers.
            let _ = ctx.pull_data(headers as u32);
            parse::parse(ctx.data(), ctx.data_end())
        }
        parsed => parsed,
    }
}

#[inline(always)]
fn applied(result: Result<(), i64>, stat: Stat) -> Verdict {
    match result {
        Ok(()) => Verdict::Translated(stat),
        Err(_) => Verdict::Drop(Stat::Error),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
