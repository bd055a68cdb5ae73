//! The socket-level balancer: a TCP socket connecting to a service is
//! pointed at a backend inside `connect()`, so every packet of the
//! connection travels pod to pod untranslated and conntrack-free (the
//! approach of Cilium's socket LB). `getpeername()` still answers with the
//! service address, as it would behind kube-proxy.
//!
//! UDP is left to the TC path: its flows must move when a backend goes away,
//! which a connected UDP socket pointed at that backend could not do.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
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
    // Created empty at the socket's first connect() and written at each (a
    // socket may connect again after a failed attempt). Without it only
    // getpeername would be wrong; connecting the socket matters more.
    // SAFETY: the context's socket, which the helper takes.
    let stored = unsafe { maps::SOCKET_PEERS.get_or_insert_ptr_mut(ctx, None) };
    // SAFETY: this socket's storage, which its connect() owns.
    if let Some(stored) = unsafe { stored.as_mut() } {
        *stored = peer;
    }
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
    // SAFETY: the context's socket; copied out at once.
    let Some(peer) = (unsafe { maps::SOCKET_PEERS.get_ptr_mut(ctx).as_ref().copied() }) else {
        return;
    };
    if sa.user_ip4 == peer.backend_addr && sa.user_port as u16 == peer.backend_port {
        sa.user_ip4 = peer.service_addr;
        sa.user_port = peer.service_port as u32;
    }
}
