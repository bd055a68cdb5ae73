//! The socket-level balancer: a TCP socket connecting to a service is
//! pointed at a backend inside `connect()`, so every packet of the
//! connection travels pod to pod untranslated and conntrack-free (the
//! approach of Cilium's socket LB). `getpeername()` still answers with the
//! service address, as it would behind kube-proxy: the socket's record,
//! written at `connect()`, says which it was, and goes when the socket is
//! released.
//!
//! UDP is left to the TC path: its flows must move when a backend goes away,
//! which a connected UDP socket pointed at that backend could not do.
use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use proxy_common::{SocketPeer, Stat, AFFINITY_NETNS, IPPROTO_TCP, SVC_REJECT};

use crate::{lb, maps};

/// What the kernel expects from a sock_addr hook: 1 lets the call proceed,
/// 0 fails it (with the error set by `bpf_set_retval`).
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn kpr_connect4(ctx: SockAddrContext) -> i32 {
    let Some(stat) = balance_connect(&ctx) else {
        return PROCEED;
    };
    maps::count(stat);
    if stat == Stat::SocketRejected {
        // SAFETY: sets the error the refused connect() returns.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn kpr_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_service_peer(&ctx);
    PROCEED
}

/// A socket is closed: its record, if it has one in the table, goes.
#[cgroup_sock(sock_release)]
pub fn kpr_sock_release(ctx: SockContext) -> i32 {
    forget_socket(&ctx);
    PROCEED
}

/// The socket's cookie: a number no other socket gets while the node runs.
#[inline(always)]
fn cookie_of<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the context of a socket program, which the helper takes.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// lookup service -> select backend -> remember the service -> translate
/// the socket's destination. `None` when the socket is not ours to touch.
#[inline(always)]
fn balance_connect(ctx: &SockAddrContext) -> Option<Stat> {
    // SAFETY: the context pointer is the kernel's, valid for this run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP as u32 {
        return None;
    }
    let addr = sa.user_ip4;
    // The port sits in the low 16 bits, in network order.
    let port = sa.user_port as u16;
    if !maps::may_be_frontend(addr, port, IPPROTO_TCP) {
        return None;
    }
    let svc = lb::lookup_service(addr, port, IPPROTO_TCP)?;
    if maps::draining() {
        return None;
    }
    // The client, for affinity only: a helper call the others need not pay.
    let client = if svc.affinity_timeout != 0 {
        // SAFETY: a sock_addr context is what the cookie helper takes.
        (unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }) | AFFINITY_NETNS
    } else {
        0
    };
    let Some((_, backend)) = lb::select_backend(&svc, false, client) else {
        let stat = if svc.flags & SVC_REJECT != 0 {
            Stat::SocketRejected
        } else {
            Stat::SocketNoBackend
        };
        maps::count_service_verdict(svc.id, stat);
        return Some(stat);
    };
    let peer = SocketPeer {
        service_addr: addr,
        backend_addr: backend.addr,
        service_port: port,
        backend_port: backend.port,
    };
    remember_peer(ctx, &peer);
    sa.user_ip4 = backend.addr;
    sa.user_port = backend.port as u32;
    Some(Stat::SocketConnect)
}

#[inline(always)]
fn restore_service_peer(ctx: &SockAddrContext) {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP as u32 {
        return;
    }
    let Some(peer) = recorded_peer(ctx) else {
        return;
    };
    if sa.user_ip4 == peer.backend_addr && sa.user_port as u16 == peer.backend_port {
        sa.user_ip4 = peer.service_addr;
        sa.user_port = peer.service_port as u32;
    }
}

/// Records which service the socket connected to, at each `connect()` (a
/// socket may connect again after a failed attempt): in the table, or, when
/// it is full, in the socket's own storage. Without either only getpeername
/// would be wrong; connecting the socket matters more.
#[inline(always)]
fn remember_peer(ctx: &SockAddrContext, peer: &SocketPeer) {
    // A socket already in the table is updated in place, even when it is
    // full.
    if maps::SOCKET_PEERS_BY_COOKIE
        .insert(cookie_of(ctx), peer, BPF_ANY as u64)
        .is_ok()
    {
        return;
    }
    // SAFETY: the context's socket, which the helper takes.
    let stored = unsafe { maps::SOCKET_PEERS.get_or_insert_ptr_mut(ctx, None) };
    // SAFETY: this socket's storage, which its connect() owns.
    if let Some(stored) = unsafe { stored.as_mut() } {
        *stored = *peer;
    }
}

/// The socket's record: the table's, written by its latest `connect()`
/// whenever the table had room then, else its own storage's.
#[inline(always)]
fn recorded_peer(ctx: &SockAddrContext) -> Option<SocketPeer> {
    // SAFETY: copied out at once.
    if let Some(peer) = unsafe { maps::SOCKET_PEERS_BY_COOKIE.get(cookie_of(ctx)) } {
        return Some(*peer);
    }
    // SAFETY: the context's socket; copied out at once.
    unsafe { maps::SOCKET_PEERS.get_ptr_mut(ctx).as_ref().copied() }
}

#[inline(always)]
fn forget_socket(ctx: &SockContext) {
    // SAFETY: the context pointer is the kernel's, valid for this run.
    if unsafe { (*ctx.sock).protocol } != IPPROTO_TCP as u32 {
        return;
    }
    let cookie = cookie_of(ctx);
    // Most sockets closed never connected to a service: a lookup, which
    // takes no lock, tells them apart before the removal, which does.
    // SAFETY: only tested for presence.
    if unsafe { maps::SOCKET_PEERS_BY_COOKIE.get(cookie) }.is_some() {
        let _ = maps::SOCKET_PEERS_BY_COOKIE.remove(cookie);
    }
}
