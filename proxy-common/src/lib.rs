//! Map keys, values, names and sizes shared by the eBPF programs and the
//! userspace daemon. Everything here is `#[repr(C)]` plain data: both sides
//! must agree on the layout byte for byte.
//!
//! Addresses and ports are stored in **network byte order** (the bytes as they
//! sit in the packet), so the data path compares them without swapping.
#![no_std]

pub mod checksum;

use core::net::Ipv4Addr;

/// Names of the maps in the eBPF object; also their file names under the pin
/// directory.
pub mod map_name {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RR_CURSORS: &str = "RR_CURSORS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const STATS: &str = "STATS";
    pub const FILTER: &str = "FILTER";
    pub const SOCKET_PEERS: &str = "SOCKET_PEERS";
    pub const SOCKET_PEERS_BY_COOKIE: &str = "SOCKET_PEERS_BY_COOKIE";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const AFFINITY: &str = "AFFINITY";
    pub const NODE: &str = "NODE";
    pub const SERVICE_COUNTERS: &str = "SERVICE_COUNTERS";

    /// Every map the daemon pins by name: all but the test harness's
    /// `WIRE_PORTS` and the data path's private clock cache.
    pub const PINNED: [&str; 13] = [
        SERVICES,
        BACKENDS,
        RR_CURSORS,
        CONNTRACK,
        STATS,
        FILTER,
        SOCKET_PEERS,
        SOCKET_PEERS_BY_COOKIE,
        FRAGMENTS,
        SOURCE_RANGES,
        AFFINITY,
        NODE,
        SERVICE_COUNTERS,
    ];
}

/// The mark `XDP_PROGRAM` leaves in a frame's metadata (a native-endian
/// `u32` in front of the frame) when it passes a frame it translated, for
/// the TC program behind it: "kpr", then what XDP did. A frame XDP left
/// untouched carries none.
pub const XDP_MARK_TRANSLATED: u32 = 0x6b70_7201;
/// Translated, but the FIB had no neighbour entry for the next hop: the TC
/// program forwards it through the neighbour subsystem.
pub const XDP_MARK_FORWARD: u32 = 0x6b70_7202;

/// Name of the TC classifier in the eBPF object, for the ingress of the
/// node's pod-facing interfaces: traffic from inside the cluster.
pub const TC_PROGRAM: &str = "kpr_tc";
/// The same stages at the ingress of the node's external interfaces:
/// traffic from outside, to which externalTrafficPolicy and
/// loadBalancerSourceRanges apply, and which is source-NATed when its
/// backend is on another node.
pub const TC_EXTERNAL_PROGRAM: &str = "kpr_tc_external";
/// The same stages at the egress of the external interfaces and of `lo`:
/// traffic the node's own processes send (hostNetwork pods, the kubelet)
/// that the socket hooks did not balance (UDP, or every protocol with the
/// hooks off). Its requests are already routed when it sees them, so each
/// translated one is sent out again by a FIB lookup.
pub const TC_HOST_PROGRAM: &str = "kpr_tc_host";
/// The XDP program on the external interfaces: the stages of
/// `TC_EXTERNAL_PROGRAM` for new and established flows from outside, before
/// the kernel builds an skb; what it does not finish (replies, REJECT, ICMP
/// errors, fragments, forwarding without a neighbour entry) it leaves to
/// that program.
pub const XDP_PROGRAM: &str = "kpr_xdp";
/// An XDP program that passes everything: the floor of `XDP_PROGRAM`'s
/// benchmarks, and what a test's far end of a veth runs to take in frames
/// sent by XDP.
pub const XDP_PASS_PROGRAM: &str = "kpr_xdp_pass";
/// A classifier that does nothing, for benchmarks' floor.
pub const NOOP_PROGRAM: &str = "kpr_noop";
/// Test harness only, never attached by the daemon: the XDP switch of a
/// namespace cluster's LAN. On a LAN port, it sends a frame addressed to a
/// member's `WIRE_MAC_PREFIX` address straight to that member's port
/// (`WIRE_PORTS_MAP`, indexed by the address's last byte), so the member
/// receives a bare frame, as from a NIC, instead of an skb its XDP program
/// would first have to copy; anything else goes on to the bridge.
pub const XDP_WIRE_PROGRAM: &str = "kpr_xdp_wire";
pub const WIRE_PORTS_MAP: &str = "WIRE_PORTS";
/// Locally administered, "kpr", 0: a LAN member's address is this and its
/// index in `WIRE_PORTS_MAP`.
pub const WIRE_MAC_PREFIX: [u8; 5] = [0x02, 0x6b, 0x70, 0x72, 0x00];
pub const MAX_WIRE_PORTS: u32 = 16;
/// The socket-level balancer: cgroup `connect4` and `getpeername4` hooks
/// that point a TCP socket at a backend when it connects to a service, so
/// its packets need no per-packet translation; and `sock_release`, which
/// drops the socket's record when it is closed.
pub const CONNECT_PROGRAM: &str = "kpr_connect4";
pub const GETPEERNAME_PROGRAM: &str = "kpr_getpeername4";
pub const SOCK_RELEASE_PROGRAM: &str = "kpr_sock_release";

/// Service frontends (VIP, port, protocol); also the size of `RR_CURSORS`,
/// which service ids index.
pub const MAX_SERVICES: u32 = 262_144;
/// Backend slots over all services.
pub const MAX_BACKEND_SLOTS: u32 = 1 << 20;
/// Tracked flows; each connection takes two entries (one per direction).
pub const MAX_CONNTRACK: u32 = 262_144;
/// Records of sockets the socket-level balancer connected, kept in
/// `SOCKET_PEERS_BY_COOKIE` while their sockets are open; the sockets
/// connected while it is full keep theirs in `SOCKET_PEERS`.
pub const MAX_SOCKET_PEER_RECORDS: u32 = 131_072;
/// Remembered (frontend, client) -> backend choices of ClientIP affinity,
/// least recently used evicted first.
pub const MAX_AFFINITY: u32 = 262_144;
/// Counters of `SERVICE_COUNTERS`; the least recently counted go first
/// when more are needed.
pub const MAX_SERVICE_COUNTERS: u32 = 65_536;

/// Source ranges (loadBalancerSourceRanges) over all services.
pub const MAX_SOURCE_RANGES: u32 = 65_536;

/// Source ports of flows NATed to this node's address (externalTrafficPolicy
/// Cluster with a backend on another node; hairpin): every unprivileged
/// port outside Linux's default ephemeral range (32768-60999) and the
/// NodePort range (30000-32767), so a NATed flow never takes a port the
/// node's own connections draw (listening sockets never see a NATed flow's
/// packets: its replies are translated before the stack). A port is unique
/// per (backend address, backend port, protocol), so each backend can have
/// `NAT_PORT_COUNT` NATed flows from one node at once. As many as possible:
/// a backend keeps a port's tuple in TIME_WAIT for 60 s after a connection
/// it closed, and a new SYN on it is refused there when its timestamp is
/// older (clients offset their timestamps per connection), which costs the
/// client a second. With only 61000-65535, the external benchmark's
/// sustained connections met such a tuple almost every time.
pub const NAT_PORT_RANGES: [(u16, u16); 2] = [(1_024, 29_999), (61_000, 65_535)];
const NAT_PORTS_LOW: u32 = (NAT_PORT_RANGES[0].1 - NAT_PORT_RANGES[0].0) as u32 + 1;
pub const NAT_PORT_COUNT: u32 = NAT_PORTS_LOW + (NAT_PORT_RANGES[1].1 - NAT_PORT_RANGES[1].0) as u32 + 1;

/// The `index`th NAT port, counting through `NAT_PORT_RANGES` in order
/// (`index` below `NAT_PORT_COUNT`).
pub const fn nat_port(index: u32) -> u16 {
    if index < NAT_PORTS_LOW {
        NAT_PORT_RANGES[0].0 + index as u16
    } else {
        NAT_PORT_RANGES[1].0 + (index - NAT_PORTS_LOW) as u16
    }
}

/// Whether `port` is one `nat_port` gives.
pub fn is_nat_port(port: u16) -> bool {
    NAT_PORT_RANGES.iter().any(|&(low, high)| (low..=high).contains(&port))
}

/// How many ports a new flow tries (from a hash of its client, in a stride
/// coprime to `NAT_PORT_COUNT`, so all distinct) before it counts as NAT
/// exhaustion: with 90% of a backend's ports held, 3% of new flows fail
/// (16 tries: 19%).
pub const NAT_PORT_TRIES: u32 = 32;
/// The stride between a flow's tries: a prime that does not divide
/// `NAT_PORT_COUNT`.
pub const NAT_PORT_STRIDE: u32 = 7_919;

/// Where a new flow's NAT port search starts: its client's source port,
/// shifted by a hash of the rest of the tuple (client address, service
/// address and port, all as the packet carries them). Within one client and
/// service this is a one-to-one map of source ports: a client's connections
/// never take each other's first port, and a connection reusing a source
/// port gets the same NAT port again, as netfilter keeps a source port
/// where it can. It matters at the backend: it holds the NATed tuple in
/// TIME_WAIT for 60 s after a connection it closed, and admits a new SYN on
/// that tuple only when its timestamp is newer. Clients offset their
/// timestamps per tuple, so a different client tuple landing there (as a
/// hash of the whole tuple lets it) is refused half the time, and the
/// client waits a second for its retry.
pub const fn nat_port_search_start(src_addr: u32, src_port: u16, dst_addr: u32, dst_port: u16) -> u32 {
    let salt = (src_addr ^ dst_addr.rotate_left(16) ^ dst_port as u32).wrapping_mul(0x9E37_79B1) >> 16;
    (salt + u16::from_be(src_port) as u32) % NAT_PORT_COUNT
}

/// The `turn`th port of a search from `start`.
pub const fn nat_port_try(start: u32, turn: u32) -> u16 {
    nat_port((start + (turn % NAT_PORT_TRIES) * NAT_PORT_STRIDE) % NAT_PORT_COUNT)
}

/// The pre-filter, in u64 words of the `FILTER` array: two halves, one
/// for the tuples services are addressed by (written by the daemon), one
/// for the tuples backends of translated flows answer from (set by the data
/// path as it translates). A packet whose tuples hit neither cannot concern
/// any service and skips every hash lookup; a set bit only means "look".
///
/// Each half is an exact bitmap of 2^FILTER_BITS_LOG2 bits keyed by the
/// whole tuple, then two small ones of 2^PREFIX_BITS_LOG2 bits: one keyed
/// by the address's /24, one by the /24 and the port. The small ones are
/// read first: they stay in cache. The /24 one decides, without a cache
/// miss, a packet to or from a part of the network with no service or
/// marked backend (pod to pod, say); the port one a packet of such a part
/// on another port: a reply to a client that shares its /24 with a node
/// address NodePorts are served on, the packets of a client pod that shares
/// its /24 with a marked backend. Those are keyed by the client's ephemeral
/// port, so the exact bitmap alone would be read at another word for every
/// connection, out of cache.
pub const FILTER_BITS_LOG2: u32 = 20;
pub const PREFIX_BITS_LOG2: u32 = 16;
pub const FILTER_WORDS: u32 = 1 << (FILTER_BITS_LOG2 - 6);
pub const PREFIX_WORDS: u32 = 1 << (PREFIX_BITS_LOG2 - 6);
/// Words of one half: exact bitmap, /24 bitmap, then /24-and-port bitmap.
pub const FILTER_HALF_WORDS: u32 = FILTER_WORDS + 2 * PREFIX_WORDS;
/// First word of the frontend half and of the backend half.
pub const FRONTEND_HALF: u32 = 0;
pub const BACKEND_HALF: u32 = FILTER_HALF_WORDS;

#[inline(always)]
fn spread(x: u64, bits_log2: u32) -> u32 {
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits_log2)) as u32
}

/// The bits an (address, port, protocol) tuple sets within a half, counted
/// from the half's first word, in the order they are best read: its /24
/// bit, its /24-and-port bit, then its exact bit. Address and port in
/// network order as the maps hold them.
#[inline(always)]
pub fn filter_bits(addr: u32, port: u16, proto: u8) -> [u32; 3] {
    [
        filter_network_bit(addr),
        filter_network_port_bit(addr, port, proto),
        filter_exact_bit(addr, port, proto),
    ]
}

/// Each of `filter_bits` on its own, for the data path to compute only
/// the ones it reads.
#[inline(always)]
pub fn filter_network_bit(addr: u32) -> u32 {
    FILTER_WORDS * 64 + spread(network(addr), PREFIX_BITS_LOG2)
}

#[inline(always)]
pub fn filter_network_port_bit(addr: u32, port: u16, proto: u8) -> u32 {
    let key = network(addr) | ((port as u64) << 24) | ((proto as u64) << 40);
    (FILTER_WORDS + PREFIX_WORDS) * 64 + spread(key, PREFIX_BITS_LOG2)
}

#[inline(always)]
pub fn filter_exact_bit(addr: u32, port: u16, proto: u8) -> u32 {
    spread(
        ((addr as u64) << 24) ^ ((port as u64) << 8) ^ proto as u64,
        FILTER_BITS_LOG2,
    )
}

#[inline(always)]
fn network(addr: u32) -> u64 {
    (u32::from_be(addr) >> 8) as u64
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Key of `SERVICES`: one service port as clients address it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// An address as the maps hold it: its packet bytes in a `u32`.
pub fn addr_to_map(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn addr_from_map(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// Address and port accessors for map types that carry both.
macro_rules! addr_port_accessors {
    ($ty:ty) => {
        impl $ty {
            pub fn ip(&self) -> Ipv4Addr {
                addr_from_map(self.addr)
            }

            pub fn port(&self) -> u16 {
                u16::from_be(self.port)
            }
        }
    };
}

impl ServiceKey {
    pub fn new(addr: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            addr: addr_to_map(addr),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }
}
addr_port_accessors!(ServiceKey);

/// What kind of address a frontend is: `ServiceValue::flags & SVC_KIND_MASK`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp = 0,
    /// A node address at a `nodePort`.
    NodePort = 1,
    /// A `status.loadBalancer.ingress[].ip`.
    LoadBalancer = 2,
    /// A `spec.externalIPs[]` address.
    ExternalIp = 3,
}

impl FrontendKind {
    pub fn from_flags(flags: u32) -> Self {
        match flags & SVC_KIND_MASK {
            0 => FrontendKind::ClusterIp,
            1 => FrontendKind::NodePort,
            2 => FrontendKind::LoadBalancer,
            _ => FrontendKind::ExternalIp,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::ExternalIp => "externalIP",
        }
    }
}

pub const SVC_KIND_MASK: u32 = 3;
/// externalTrafficPolicy Local: traffic from outside the node uses slots
/// `0..local_count` (this node's endpoints) and keeps its source address;
/// with none, it is dropped.
pub const SVC_EXTERNAL_LOCAL: u32 = 1 << 2;
/// loadBalancerSourceRanges: traffic from outside is served only from the
/// ranges in `SOURCE_RANGES` under this service's id.
pub const SVC_SOURCE_RANGES: u32 = 1 << 3;
/// No usable endpoint anywhere: a new connection is refused (ICMP port
/// unreachable, ECONNREFUSED at `connect()`), as kube-proxy's REJECT does.
/// Without it an empty endpoint set is a local-only policy's: dropped.
pub const SVC_REJECT: u32 = 1 << 4;

/// Value of `SERVICES`.
///
/// The slots hold up to three groups, so that both endpoint sets of an
/// externalTrafficPolicy Local frontend are ranges of one array: this
/// node's endpoints that the cluster set lacks, those in both, then the
/// cluster set's other ones. Traffic from outside under Local uses
/// `0..local_count`; everything else `cluster_start..backend_count`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Index into `RR_CURSORS` and first half of every `BackendKey` of this
    /// service. Allocated by the daemon; stable while the service exists.
    pub id: u32,
    /// Slots `0..backend_count` of `BACKENDS` are populated.
    pub backend_count: u32,
    /// ClientIP affinity timeout in seconds; 0 means no affinity.
    pub affinity_timeout: u32,
    /// `FrontendKind` and the `SVC_*` bits.
    pub flags: u32,
    /// First slot of the cluster endpoint set.
    pub cluster_start: u32,
    /// Slots `0..local_count`: the local endpoint set (SVC_EXTERNAL_LOCAL).
    pub local_count: u32,
}

impl ServiceValue {
    pub fn kind(&self) -> FrontendKind {
        FrontendKind::from_flags(self.flags)
    }

    /// The slots a new flow may take: `(first, count)`.
    #[inline(always)]
    pub fn slots(&self, from_outside: bool) -> (u32, u32) {
        if from_outside && self.flags & SVC_EXTERNAL_LOCAL != 0 {
            (0, self.local_count)
        } else {
            (
                self.cluster_start,
                self.backend_count.saturating_sub(self.cluster_start),
            )
        }
    }
}

/// Key of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// `Backend::flags`: the endpoint runs on this node, so traffic from
/// outside reaches it without source NAT (the reply passes this node anyway).
pub const BACKEND_LOCAL: u16 = 1;
/// `Backend::flags`: the endpoint is terminating but still serving, used
/// because the service has no ready one (kube-proxy's fallback). The data
/// path treats it as any backend; the flag is there for `kpr services`.
pub const BACKEND_TERMINATING: u16 = 2;

/// Value of `BACKENDS`: where a new flow of that service may be sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    pub flags: u16,
}

impl Backend {
    pub fn new(addr: Ipv4Addr, port: u16, local: bool) -> Self {
        Self {
            addr: addr_to_map(addr),
            port: port.to_be(),
            flags: if local { BACKEND_LOCAL } else { 0 },
        }
    }

    pub fn is_local(&self) -> bool {
        self.flags & BACKEND_LOCAL != 0
    }

    pub fn with_terminating(mut self, terminating: bool) -> Self {
        if terminating {
            self.flags |= BACKEND_TERMINATING;
        }
        self
    }

    pub fn is_terminating(&self) -> bool {
        self.flags & BACKEND_TERMINATING != 0
    }
}
addr_port_accessors!(Backend);

/// Key of `CONNTRACK`: a packet's 5-tuple as it arrives, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    // Three bytes of padding as a byte and a half-word, not `[u8; 3]`:
    // LLVM's BPF backend zeroes an unaligned 3-byte array with a call to
    // `memset` (a subprogram call on every packet's key); these are two
    // aligned stores. Built by `new`, so no one else spells them.
    _pad: u8,
    _pad2: u16,
}

impl FlowKey {
    #[inline(always)]
    pub const fn new(src_addr: u32, src_port: u16, dst_addr: u32, dst_port: u16, proto: u8) -> Self {
        FlowKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// `NatEntry::flags`: the entry rewrites the source of replies (backend back
/// to the service address) rather than the destination of requests.
pub const NAT_REPLY: u8 = 1;
/// The entry also rewrites the other end: a request's source becomes
/// `nat_addr:nat_port` (this node, a NAT port), a reply's destination
/// becomes `nat_addr:nat_port` (the client again).
pub const NAT_SNAT: u8 = 2;
/// After the rewrite the packet is sent out by a FIB lookup instead of
/// through the stack: it carries one of the node's own addresses as its
/// source (a NodePort's reply, a source-NATed request), which the stack
/// would drop as martian on input.
pub const NAT_REDIRECT: u8 = 4;
/// On a request entry: its replies leave by the FIB (`NAT_REDIRECT` on the
/// reply entry), kept here so that a reply entry restored from the request
/// gets it too.
pub const NAT_REPLY_REDIRECT: u8 = 8;

/// `NatEntry::seen`: this direction sent a FIN, or a RST.
pub const SEEN_FIN: u8 = 1;
pub const SEEN_RST: u8 = 2;
/// `NatEntry::seen` of a UDP reply entry: replies came in two different
/// seconds, so the flow is a stream rather than one exchange (netfilter's
/// "assured" UDP flow: still replied to after its first moments).
pub const SEEN_STREAM: u8 = 4;

/// How long a flow is kept without a packet, by protocol and state, as
/// netfilter's timeouts are set; the daemon's sweep removes what expired,
/// and a NAT port of an expired flow is taken over by the next flow that
/// needs it.
///
/// A TCP connection after a FIN in both directions or a RST in either (the
/// backend's side may linger in TIME_WAIT a moment longer, and a new SYN on
/// its tuple is accepted there).
pub const FLOW_TCP_CLOSED_SECS: u32 = 10;
/// A closed TCP connection's NAT port is free for a new flow to take over
/// sooner: a whole second after its last packet (times are whole seconds),
/// by when the final ACK has passed. The port is the scarce thing (33,512
/// per backend per node); a new SYN on the tuple the backend may still hold
/// in TIME_WAIT is accepted there when its sequence or timestamp is newer,
/// as with netfilter's reuse of TIME_WAIT tuples.
pub const FLOW_NAT_TAKEOVER_CLOSED_SECS: u32 = 2;
/// A TCP connection never answered: a SYN to a backend that is gone, a
/// scan (netfilter keeps SYN_SENT 120 s; Cilium 60 s).
pub const FLOW_TCP_UNREPLIED_SECS: u32 = 60;
/// An established TCP connection (netfilter's established timeout: 5 days;
/// connections idle longer are gone from both ends' tables too).
pub const FLOW_TCP_IDLE_SECS: u32 = 432_000;
/// A UDP flow of one exchange or never answered (a DNS query): netfilter's
/// unreplied/unassured UDP timeout.
pub const FLOW_UDP_SECS: u32 = 30;
/// A UDP stream (`SEEN_STREAM`): netfilter's replied UDP timeout.
pub const FLOW_UDP_STREAM_SECS: u32 = 120;

/// Value of `CONNTRACK`: the address and port to write into the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatEntry {
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    pub flags: u8,
    /// `SEEN_*` of this direction's packets.
    pub seen: u8,
    /// Service and slot the backend was chosen from (request direction), so
    /// a new connection reusing the tuple can tell whether the choice still
    /// stands.
    pub service_id: u32,
    pub slot: u32,
    /// With `NAT_SNAT`: the other address and port to write. Network order.
    pub nat_addr: u32,
    pub nat_port: u16,
    pub _pad: u16,
    /// When this direction last carried a packet, in seconds of the kernel's
    /// monotonic clock; 0 for a reply direction that never has (and for
    /// entries of a version that kept no times).
    pub last_seen: u32,
}

impl NatEntry {
    /// The key of the other direction of the flow this entry, keyed by
    /// `key`, belongs to: a request entry's reply tuple (backend to the
    /// source requests leave with), a reply entry's request tuple (client
    /// to the address it dialled).
    pub fn other_direction(&self, key: &FlowKey) -> FlowKey {
        let nated = self.flags & NAT_SNAT != 0;
        let (src_addr, src_port, dst_addr, dst_port) = if self.flags & NAT_REPLY != 0 {
            // Replies come from the backend to the source requests left
            // with: the client, or this node's NAT address and port.
            let (client_addr, client_port) = if nated {
                (self.nat_addr, self.nat_port)
            } else {
                (key.dst_addr, key.dst_port)
            };
            (client_addr, client_port, self.addr, self.port)
        } else {
            let (source_addr, source_port) = if nated {
                (self.nat_addr, self.nat_port)
            } else {
                (key.src_addr, key.src_port)
            };
            (self.addr, self.port, source_addr, source_port)
        };
        FlowKey::new(src_addr, src_port, dst_addr, dst_port, key.proto)
    }

    /// The entry the other direction of this entry's flow (keyed by `key`)
    /// has, and its key: what restores that direction when its entry was
    /// lost. A restored reply entry has the request's time, not 0: the flow
    /// was answered as far as anyone can tell.
    pub fn partner(&self, key: &FlowKey) -> (FlowKey, NatEntry) {
        let other = self.other_direction(key);
        let nated = self.flags & NAT_SNAT != 0;
        let mut entry = NatEntry {
            service_id: self.service_id,
            slot: self.slot,
            last_seen: self.last_seen,
            ..Default::default()
        };
        if self.flags & NAT_REPLY != 0 {
            // The request: to the backend this reply came from, leaving
            // with the source the reply went to.
            entry.addr = key.src_addr;
            entry.port = key.src_port;
            entry.nat_addr = key.dst_addr;
            entry.nat_port = key.dst_port;
            if nated {
                entry.flags |= NAT_SNAT | NAT_REDIRECT;
            }
            if self.flags & NAT_REDIRECT != 0 {
                entry.flags |= NAT_REPLY_REDIRECT;
            }
        } else {
            // The reply: back from the address the client dialled, to the
            // client.
            entry.addr = key.dst_addr;
            entry.port = key.dst_port;
            entry.nat_addr = key.src_addr;
            entry.nat_port = key.src_port;
            entry.flags = NAT_REPLY;
            if nated {
                entry.flags |= NAT_SNAT;
            }
            if self.flags & NAT_REPLY_REDIRECT != 0 {
                entry.flags |= NAT_REDIRECT;
            }
        }
        (other, entry)
    }

    /// Whether the flow with these entries (either may be gone) has expired
    /// by `now` (`FLOW_*`). A flow whose entries carry no times at all
    /// (recorded by a version that kept none) is never judged expired: its
    /// first packet, or the daemon's sweep, gives it one.
    pub fn flow_expired(request: Option<&NatEntry>, reply: Option<&NatEntry>, proto: u8, now: u32) -> bool {
        Self::flow_expired_after(request, reply, proto, now, FLOW_TCP_CLOSED_SECS)
    }

    /// `flow_expired`, with closed TCP connections judged ended `closed_secs`
    /// after their last packet (`FLOW_NAT_TAKEOVER_CLOSED_SECS` for a NAT
    /// port's takeover).
    pub fn flow_expired_after(
        request: Option<&NatEntry>,
        reply: Option<&NatEntry>,
        proto: u8,
        now: u32,
        closed_secs: u32,
    ) -> bool {
        let last = Self::flow_last_seen(request, reply);
        if last == 0 {
            return false;
        }
        now.saturating_sub(last) >= Self::flow_state(request, reply, proto).timeout(closed_secs)
    }

    /// When either direction of the flow last carried a packet; 0 when
    /// neither entry has a time.
    pub fn flow_last_seen(request: Option<&NatEntry>, reply: Option<&NatEntry>) -> u32 {
        let last_seen = |e: Option<&NatEntry>| e.map_or(0, |e| e.last_seen);
        core::cmp::max(last_seen(request), last_seen(reply))
    }

    /// Where the flow with these entries (either may be gone) stands, which
    /// decides its timeout.
    pub fn flow_state(request: Option<&NatEntry>, reply: Option<&NatEntry>, proto: u8) -> FlowState {
        // A direction whose entry is gone (evicted) says nothing: the flow
        // is judged by the one left, as a live one, since the next packet
        // of a live flow restores the other (its reply might yet be).
        let replied = reply.is_none_or(|r| r.last_seen != 0);
        let seen = |e: Option<&NatEntry>| e.map_or(0, |e| e.seen);
        if proto == IPPROTO_UDP {
            return if seen(reply) & SEEN_STREAM != 0 {
                FlowState::Stream
            } else if replied {
                FlowState::Answered
            } else {
                FlowState::UdpUnanswered
            };
        }
        let (back, forth) = (seen(reply), seen(request));
        if (back | forth) & SEEN_RST != 0 || back & forth & SEEN_FIN != 0 {
            FlowState::Closed
        } else if !replied {
            FlowState::TcpUnanswered
        } else {
            FlowState::Established
        }
    }
}

/// Where a tracked flow stands (`NatEntry::flow_state`), as netfilter's
/// states decide its timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// TCP, no packet came back yet (a SYN to a backend that is gone, a
    /// scan).
    TcpUnanswered,
    /// TCP, answered and not closed.
    Established,
    /// TCP, after a FIN each way or a RST either way.
    Closed,
    /// UDP, no packet came back yet.
    UdpUnanswered,
    /// UDP, answered within one second: one exchange (a DNS query).
    Answered,
    /// UDP, answered in two different seconds (`SEEN_STREAM`).
    Stream,
}

impl FlowState {
    /// Seconds without a packet after which a flow in this state is gone;
    /// a closed TCP connection after `closed_secs`.
    pub fn timeout(self, closed_secs: u32) -> u32 {
        match self {
            FlowState::Closed => closed_secs,
            FlowState::TcpUnanswered => FLOW_TCP_UNREPLIED_SECS,
            FlowState::Established => FLOW_TCP_IDLE_SECS,
            FlowState::UdpUnanswered | FlowState::Answered => FLOW_UDP_SECS,
            FlowState::Stream => FLOW_UDP_STREAM_SECS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FlowState::TcpUnanswered | FlowState::UdpUnanswered => "unanswered",
            FlowState::Established => "established",
            FlowState::Closed => "closed",
            FlowState::Answered => "answered",
            FlowState::Stream => "stream",
        }
    }
}

/// Datagrams whose first fragment was translated, for their later
/// fragments (which carry no ports) to follow it; least recent evicted.
pub const MAX_FRAGMENTS: u32 = 8_192;

/// Key of `FRAGMENTS`: what identifies a datagram's fragments (RFC 791),
/// as they arrive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    /// The IPv4 identification, network order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `FRAGMENTS`: the ports the first fragment carried (network
/// order), which find the datagram's flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentPorts {
    pub src_port: u16,
    pub dst_port: u16,
}

/// Data of a `SOURCE_RANGES` key (an LPM trie): the service id, matched
/// whole, then the client address, matched by the range's prefix. The
/// prefix length counts both: 32 + the range's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    pub service_id: u32,
    /// Network order.
    pub addr: u32,
}

/// Key of `AFFINITY`: a client of a frontend with sessionAffinity ClientIP.
/// The client is its IPv4 address (network order) on the per-packet path;
/// on the socket path, where `connect()` has no source address yet, its
/// network namespace cookie with `AFFINITY_NETNS` set (a pod is one
/// namespace and one address, as Cilium's socket balancer also keys it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub _pad: u32,
    pub client: u64,
}

pub const AFFINITY_NETNS: u64 = 1 << 63;

/// Value of `AFFINITY`: the backend the client got, from which slot, and
/// when it last opened a flow (seconds of the kernel's monotonic clock).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend: Backend,
    pub slot: u32,
    pub last_used: u32,
}

/// Key of `SERVICE_COUNTERS`, whose per-CPU values count what happened to
/// new flows of one frontend (service id): `stat` `Stat::NewFlow` with a
/// backend's address and port counts the flows (TCP connections, UDP
/// flows) sent to that backend, on either path — the "is my traffic spread
/// over all my pods?" of `kpr services`; any other `stat` (a refusal, a
/// drop), with address and port 0, counts the flows it ended. A backend is
/// keyed by address, not slot, so its count follows it when the endpoints
/// are renumbered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceCounterKey {
    pub service_id: u32,
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// A `Stat`.
    pub stat: u16,
}

/// Value of the one-entry `NODE` array: what the data path must know of
/// the node it runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The address source-NATed flows leave with (the node's primary
    /// address); 0 until the daemon knows it, and then nothing is NATed.
    pub snat_addr: u32,
    /// `NODE_*` bits.
    pub flags: u32,
}

/// `NodeConfig::flags`: draining — flows kpr tracks keep being translated,
/// new ones are left to whatever comes after kpr (kube-proxy's rules, when
/// handing a node back to it), at `connect()` and per packet alike.
pub const NODE_DRAINING: u32 = 1;

/// Value of `SOCKET_PEERS_BY_COOKIE` (keyed by socket cookie) and of
/// `SOCKET_PEERS` (stored with the socket itself): the service a
/// socket connected to and the backend it was sent to instead. `getpeername`
/// answers with the service only while the socket is still connected to
/// that backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketPeer {
    /// Network order.
    pub service_addr: u32,
    /// Network order.
    pub backend_addr: u32,
    /// Network order.
    pub service_port: u16,
    /// Network order.
    pub backend_port: u16,
}

/// Indices into the per-CPU `STATS` array: what happened to each packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A new flow to a service: backend chosen, destination translated.
    NewFlow = 0,
    /// A request packet of a tracked flow, translated.
    Established = 1,
    /// A reply from a backend, source translated back to the service.
    Reply = 2,
    /// IPv4 packet to no service: passed untouched.
    NoMatch = 3,
    /// Not IPv4 (ARP, IPv6, ...): passed untouched.
    NotIpv4 = 4,
    /// A later fragment (no L4 header) of no datagram this program
    /// translated, or whose first fragment it has not seen: passed untouched.
    Fragment = 5,
    /// Headers shorter than they claim: passed untouched for the kernel to drop.
    Truncated = 6,
    /// A service with no usable backend: dropped.
    NoBackend = 7,
    /// Conntrack insert or packet rewrite failed: dropped.
    Error = 8,
    /// A TCP socket connecting to a service, sent to a backend by the
    /// socket-level balancer (counted per connection, not per packet).
    SocketConnect = 9,
    /// A TCP socket connecting to a service with no usable backend: left
    /// addressed to the service, whose packets the TC path then drops.
    SocketNoBackend = 10,
    /// From outside a service's loadBalancerSourceRanges: dropped.
    SourceDenied = 11,
    /// externalTrafficPolicy Local and no endpoint on this node: dropped,
    /// as kube-proxy does, so the load balancer's health check steers away.
    NoLocalBackend = 12,
    /// Every NAT port tried for a new source-NATed flow was taken: dropped.
    NatExhausted = 13,
    /// A service without any endpoint: answered with ICMP port unreachable.
    Rejected = 14,
    /// A socket connecting to a service without any endpoint: refused at
    /// `connect()` (ECONNREFUSED).
    SocketRejected = 15,
    /// A TCP packet to a service that is not a SYN, of no tracked flow (its
    /// entry lost): dropped, never sent to a backend chosen anew, which
    /// could only reset the connection.
    NoFlow = 16,
    /// An ICMP error about a tracked flow (port unreachable, fragmentation
    /// needed, time exceeded, parameter problem): translated as the flow's
    /// packets are, the packet it quotes included.
    IcmpError = 17,
}

impl Stat {
    pub const COUNT: u32 = 18;
    /// Slots of the `STATS` array: room for stats to come, so that adding
    /// one does not change the pinned map's layout.
    pub const CAPACITY: u32 = 32;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::NewFlow,
        Stat::Established,
        Stat::Reply,
        Stat::NoMatch,
        Stat::NotIpv4,
        Stat::Fragment,
        Stat::Truncated,
        Stat::NoBackend,
        Stat::Error,
        Stat::SocketConnect,
        Stat::SocketNoBackend,
        Stat::SourceDenied,
        Stat::NoLocalBackend,
        Stat::NatExhausted,
        Stat::Rejected,
        Stat::SocketRejected,
        Stat::NoFlow,
        Stat::IcmpError,
    ];

    /// The stat with this value, as a map holds it.
    pub fn from_index(index: u32) -> Option<Stat> {
        Self::ALL.get(index as usize).copied()
    }

    /// Whether the stat counts connections made through the socket-level
    /// balancer rather than packets of the TC path.
    pub fn is_socket(self) -> bool {
        matches!(self, Stat::SocketConnect | Stat::SocketNoBackend | Stat::SocketRejected)
    }

    pub fn name(self) -> &'static str {
        match self {
            Stat::NewFlow => "new_flow",
            Stat::Established => "established",
            Stat::Reply => "reply",
            Stat::NoMatch => "no_match",
            Stat::NotIpv4 => "not_ipv4",
            Stat::Fragment => "fragment",
            Stat::Truncated => "truncated",
            Stat::NoBackend => "no_backend",
            Stat::Error => "error",
            Stat::SocketConnect => "socket_connect",
            Stat::SocketNoBackend => "socket_no_backend",
            Stat::SourceDenied => "source_denied",
            Stat::NoLocalBackend => "no_local_backend",
            Stat::NatExhausted => "nat_exhausted",
            Stat::Rejected => "rejected",
            Stat::SocketRejected => "socket_rejected",
            Stat::NoFlow => "no_flow",
            Stat::IcmpError => "icmp_error",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] integers with explicit padding
    // fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for ServiceCounterKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for SocketPeer {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentPorts {}
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn a_stat_read_back_from_a_map_is_the_one_written() {
        for (index, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, index, "Stat::ALL is in value order");
            assert_eq!(Stat::from_index(index as u32), Some(*stat));
        }
        assert_eq!(Stat::from_index(Stat::COUNT), None);
    }

    fn entry(seen: u8, last_seen: u32) -> NatEntry {
        NatEntry {
            seen,
            last_seen,
            ..Default::default()
        }
    }

    #[test]
    fn when_a_flow_expires() {
        let now = 1_000_000;
        let closed = FLOW_TCP_CLOSED_SECS;
        let (tcp, udp) = (IPPROTO_TCP, IPPROTO_UDP);
        // (request, reply, protocol, expired)
        let cases = [
            ("open, active", Some(entry(0, now)), Some(entry(0, now)), tcp, false),
            (
                "FIN one way",
                Some(entry(0, now - closed)),
                Some(entry(SEEN_FIN, now - closed)),
                tcp,
                false,
            ),
            (
                "FIN both ways",
                Some(entry(SEEN_FIN, now - closed)),
                Some(entry(SEEN_FIN, now - closed)),
                tcp,
                true,
            ),
            (
                "FIN both ways, a packet since",
                Some(entry(SEEN_FIN, now - 1)),
                Some(entry(SEEN_FIN, now - closed)),
                tcp,
                false,
            ),
            (
                "RST back",
                Some(entry(0, now - closed)),
                Some(entry(SEEN_RST, now - closed)),
                tcp,
                true,
            ),
            (
                "RST forth",
                Some(entry(SEEN_RST, now - closed)),
                Some(entry(0, now - closed)),
                tcp,
                true,
            ),
            (
                "RST, too recent",
                Some(entry(SEEN_RST, now - closed + 1)),
                Some(entry(0, now - closed)),
                tcp,
                false,
            ),
            (
                "never answered",
                Some(entry(0, now - FLOW_TCP_UNREPLIED_SECS)),
                Some(entry(0, 0)),
                tcp,
                true,
            ),
            (
                "answered, idle as long",
                Some(entry(0, now - FLOW_TCP_UNREPLIED_SECS)),
                Some(entry(0, now - FLOW_TCP_UNREPLIED_SECS)),
                tcp,
                false,
            ),
            (
                "established, idle too long",
                Some(entry(0, now - FLOW_TCP_IDLE_SECS)),
                Some(entry(0, now - FLOW_TCP_IDLE_SECS)),
                tcp,
                true,
            ),
            (
                "reply entry evicted: judged as live",
                Some(entry(0, now - FLOW_TCP_UNREPLIED_SECS)),
                None,
                tcp,
                false,
            ),
            (
                "request entry evicted, reply reset",
                None,
                Some(entry(SEEN_RST, now - closed)),
                tcp,
                true,
            ),
            ("kept no times", Some(entry(0, 0)), Some(entry(0, 0)), tcp, false),
            (
                "UDP exchange, fresh",
                Some(entry(0, now - FLOW_UDP_SECS + 1)),
                Some(entry(0, now - FLOW_UDP_SECS)),
                udp,
                false,
            ),
            (
                "UDP exchange, idle",
                Some(entry(0, now - FLOW_UDP_SECS)),
                Some(entry(0, now - FLOW_UDP_SECS)),
                udp,
                true,
            ),
            (
                "UDP never answered",
                Some(entry(0, now - FLOW_UDP_SECS)),
                Some(entry(0, 0)),
                udp,
                true,
            ),
            (
                "UDP stream, idle as long",
                Some(entry(0, now - FLOW_UDP_SECS)),
                Some(entry(SEEN_STREAM, now - FLOW_UDP_SECS)),
                udp,
                false,
            ),
            (
                "UDP stream, idle",
                Some(entry(0, now - FLOW_UDP_STREAM_SECS)),
                Some(entry(SEEN_STREAM, now - FLOW_UDP_STREAM_SECS)),
                udp,
                true,
            ),
        ];
        for (name, request, reply, proto, expired) in cases {
            assert_eq!(
                NatEntry::flow_expired(request.as_ref(), reply.as_ref(), proto, now),
                expired,
                "{name}"
            );
        }
    }

    #[test]
    fn nat_ports_count_through_both_ranges_and_every_try_is_distinct() {
        assert_eq!(nat_port(0), 1_024);
        assert_eq!(nat_port(NAT_PORTS_LOW - 1), 29_999);
        assert_eq!(nat_port(NAT_PORTS_LOW), 61_000);
        assert_eq!(nat_port(NAT_PORT_COUNT - 1), 65_535);
        assert_eq!(NAT_PORT_COUNT, 33_512);
        for index in [0, 1, NAT_PORTS_LOW - 1, NAT_PORTS_LOW, NAT_PORT_COUNT - 1] {
            assert!(is_nat_port(nat_port(index)));
        }
        for port in [1_023, 30_000, 32_768, 60_999] {
            assert!(!is_nat_port(port), "{port}");
        }
        // The stride is coprime to the count: any seed's tries are distinct.
        let gcd = |mut a: u32, mut b: u32| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        assert_eq!(gcd(NAT_PORT_STRIDE, NAT_PORT_COUNT), 1);
        let mut tries = [0u32; NAT_PORT_TRIES as usize];
        for (i, t) in tries.iter_mut().enumerate() {
            *t = (12_345 + i as u32 * NAT_PORT_STRIDE) % NAT_PORT_COUNT;
        }
        tries.sort_unstable();
        assert!(tries.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn a_clients_source_ports_start_their_nat_port_searches_apart() {
        let client = addr_to_map(Ipv4Addr::new(192, 0, 2, 100));
        let node = addr_to_map(Ipv4Addr::new(192, 0, 2, 10));
        let start = |addr: u32, port: u16| nat_port_search_start(addr, port.to_be(), node, 30080u16.to_be());
        // Linux's whole ephemeral range, from one client to one service:
        // every connection's first port is its own.
        let mut firsts: Vec<u16> = (32_768..=60_999).map(|p| nat_port_try(start(client, p), 0)).collect();
        let drawn = firsts.len();
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), drawn);
        // The same tuple again: the same port (its TIME_WAIT at the backend
        // has this client's timestamps).
        assert_eq!(start(client, 40_000), start(client, 40_000));
        // Another client's ports are shifted elsewhere.
        let other = addr_to_map(Ipv4Addr::new(192, 0, 2, 101));
        assert_ne!(start(client, 40_000), start(other, 40_000));
        // Every try is a NAT port, and a search's tries are distinct.
        for start in [0, 1, NAT_PORT_COUNT - 1, start(client, 65_535)] {
            let mut tries: Vec<u16> = (0..NAT_PORT_TRIES).map(|t| nat_port_try(start, t)).collect();
            assert!(tries.iter().all(|&p| is_nat_port(p)));
            tries.sort_unstable();
            tries.dedup();
            assert_eq!(tries.len(), NAT_PORT_TRIES as usize);
        }
    }

    #[test]
    fn a_closed_connections_nat_port_is_taken_over_sooner() {
        let now = 1_000_000;
        let takeover = FLOW_NAT_TAKEOVER_CLOSED_SECS;
        let judged = |seen: u8, last: u32, closed_secs| {
            let request = entry(seen, last);
            let reply = entry(seen, last);
            NatEntry::flow_expired_after(Some(&request), Some(&reply), IPPROTO_TCP, now, closed_secs)
        };
        // Closed, last packet `takeover` seconds ago: the port is free, the
        // entries are not swept yet.
        assert!(judged(SEEN_FIN, now - takeover, takeover));
        assert!(!judged(SEEN_FIN, now - takeover, FLOW_TCP_CLOSED_SECS));
        // Closed in the current or the previous whole second: held.
        assert!(!judged(SEEN_FIN, now - takeover + 1, takeover));
        assert!(!judged(SEEN_RST, now, takeover));
        // Open: held as long as ever.
        assert!(!judged(0, now - takeover, takeover));
    }

    #[test]
    fn each_direction_finds_the_other() {
        let (client, service, backend, node) = (
            (addr_to_map(Ipv4Addr::new(10, 0, 0, 1)), 40000u16.to_be()),
            (addr_to_map(Ipv4Addr::new(10, 96, 0, 1)), 80u16.to_be()),
            (addr_to_map(Ipv4Addr::new(10, 1, 0, 5)), 8080u16.to_be()),
            (addr_to_map(Ipv4Addr::new(192, 168, 0, 2)), 61000u16.to_be()),
        );
        let key = |src: (u32, u16), dst: (u32, u16)| FlowKey::new(src.0, src.1, dst.0, dst.1, IPPROTO_TCP);
        let to = |at: (u32, u16), flags: u8, nat: (u32, u16)| NatEntry {
            addr: at.0,
            port: at.1,
            flags,
            nat_addr: nat.0,
            nat_port: nat.1,
            ..Default::default()
        };
        // Keeping the client's source.
        let request = to(backend, 0, (0, 0));
        let reply = to(service, NAT_REPLY, (0, 0));
        assert_eq!(request.other_direction(&key(client, service)), key(backend, client));
        assert_eq!(reply.other_direction(&key(backend, client)), key(client, service));
        // Source-NATed to the node.
        let request = to(backend, NAT_SNAT, node);
        let reply = to(service, NAT_REPLY | NAT_SNAT, client);
        assert_eq!(request.other_direction(&key(client, service)), key(backend, node));
        assert_eq!(reply.other_direction(&key(backend, node)), key(client, service));
    }

    /// What each direction restores of the other is what the data path
    /// records for it (flags, addresses, ports), for flows that keep their
    /// source and flows source-NATed with replies sent by the FIB.
    #[test]
    fn each_direction_restores_the_other() {
        let (client, service, backend, node) = ((1, 40000), (2, 80), (3, 8080), (4, 61000));
        let key = |src: (u32, u16), dst: (u32, u16)| FlowKey::new(src.0, src.1, dst.0, dst.1, IPPROTO_UDP);
        let entry = |at: (u32, u16), flags: u8, nat: (u32, u16)| NatEntry {
            addr: at.0,
            port: at.1,
            flags,
            nat_addr: nat.0,
            nat_port: nat.1,
            service_id: 7,
            slot: 2,
            last_seen: 99,
            ..Default::default()
        };
        let flows = [
            (
                (key(client, service), entry(backend, 0, client)),
                (key(backend, client), entry(service, NAT_REPLY, client)),
            ),
            (
                (
                    key(client, service),
                    entry(backend, NAT_SNAT | NAT_REDIRECT | NAT_REPLY_REDIRECT, node),
                ),
                (
                    key(backend, node),
                    entry(service, NAT_REPLY | NAT_SNAT | NAT_REDIRECT, client),
                ),
            ),
        ];
        for ((request_key, request), (reply_key, reply)) in flows {
            assert_eq!(request.partner(&request_key), (reply_key, reply));
            assert_eq!(reply.partner(&reply_key), (request_key, request));
        }
    }

    /// Each bit in its own bitmap of the half; and what the /24-and-port
    /// bitmap is for: a backend's tuple marked, the ephemeral ports of its
    /// /24's other pods still ruled out by the small bitmaps, almost all.
    #[test]
    fn filter_bits_fall_in_their_bitmaps_and_rule_out_a_backends_neighbours() {
        let addr = |last: u8| u32::from_ne_bytes([10, 244, 1, last]);
        let [network, network_port, exact] = filter_bits(addr(7), 8080u16.to_be(), IPPROTO_TCP);
        assert!(exact < FILTER_WORDS * 64, "exact bit {exact}");
        assert!((FILTER_WORDS * 64..(FILTER_WORDS + PREFIX_WORDS) * 64).contains(&network));
        assert!(((FILTER_WORDS + PREFIX_WORDS) * 64..FILTER_HALF_WORDS * 64).contains(&network_port));
        // One /24, one bit in the /24 bitmap, whatever the port.
        assert_eq!(filter_bits(addr(200), 40_000u16.to_be(), IPPROTO_TCP)[0], network);

        let marked = [network_port];
        let neighbours: Vec<[u32; 3]> = (32_768u16..61_000)
            .step_by(7)
            .map(|port| filter_bits(addr(9), port.to_be(), IPPROTO_TCP))
            .collect();
        let passed = neighbours.iter().filter(|bits| marked.contains(&bits[1])).count();
        assert!(
            passed * 1_000 < neighbours.len(),
            "{passed} of {} passed",
            neighbours.len()
        );
        // The other protocol on the backend's own port is another bit.
        assert_ne!(filter_bits(addr(7), 8080u16.to_be(), IPPROTO_UDP)[1], network_port);
    }
}
