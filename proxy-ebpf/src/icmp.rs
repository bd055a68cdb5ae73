//! ICMP errors about translated flows: destination unreachable (a port
//! unreachable, the fragmentation needed of path-MTU discovery), time
//! exceeded, parameter problem. Each quotes the packet it is about, as that
//! packet looked where the error arose: translated. It is translated back
//! like a packet of the flow travelling the same way, the quote included
//! (addresses, ports and their checksums), so the socket it is meant for
//! recognises its own packet and sees the error: a UDP client gets its
//! ECONNREFUSED, a TCP sender its path MTU.
//!
//! The quoted packet went from `s` to `d`; the error goes back towards `s`,
//! so it is a packet of the flow's direction `d -> s`, whose entry says what
//! `d` and `s` become. Netfilter translates related ICMP errors the same way.
use aya_ebpf::programs::TcContext;
use proxy_common::{checksum, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NAT_REPLY};

use crate::{
    conntrack,
    nat::{ChecksumAndAddresses, Endpoint},
    parse::{Ipv4Header, Packet},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Type, code, checksum, and the 4 bytes before the quote (the MTU of a
/// fragmentation needed).
const ICMP_HLEN: usize = 8;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Where the quote sits in the packet.
#[derive(Default)]
struct Quote {
    header: Ipv4Header,
    /// Offset of the quoted IPv4 header, and of its L4 header.
    ip_off: usize,
    l4_off: usize,
    /// The quoted packet's source and destination.
    src: Endpoint,
    dst: Endpoint,
}

/// What became of an ICMP message. (Results are written to the caller's
/// zeroed struct rather than returned in an `Option`: LLVM leaves a `None`'s
/// fields undefined, which the verifier may then see read.)
pub enum Outcome {
    /// Not an error about a tracked flow: left untouched.
    NotOurs,
    Translated,
    /// Could not be rewritten.
    Failed,
}

/// An error translated: the flags of the entry of the flow it was about,
/// and the outer addresses it now carries.
#[derive(Default)]
pub struct Translated {
    pub entry_flags: u8,
    pub src: u32,
    pub dst: u32,
}

/// Reads the quote of an ICMP error; `false` for any other ICMP message, or
/// a quote that is no first (or only) fragment of TCP or UDP over IPv4.
#[inline(always)]
fn read_quote(ctx: &TcContext, pkt: &Packet, quote: &mut Quote) -> bool {
    let Ok(kind) = ctx.load::<u8>(pkt.l4_off) else {
        return false;
    };
    if !matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
        return false;
    }
    quote.ip_off = pkt.l4_off + ICMP_HLEN;
    let Ok(header) = ctx.load::<Ipv4Header>(quote.ip_off) else {
        return false;
    };
    let ihl = ((header.version_ihl & 0x0f) as usize) * 4;
    let fragment_offset = u16::from_be(header.frag) & IP_OFFSET_MASK;
    if header.version_ihl >> 4 != 4 || ihl < 20 || fragment_offset != 0 {
        return false;
    }
    if header.proto != IPPROTO_TCP && header.proto != IPPROTO_UDP {
        return false;
    }
    quote.l4_off = quote.ip_off + ihl;
    let Ok(ports) = ctx.load::<[u16; 2]>(quote.l4_off) else {
        return false;
    };
    quote.header = header;
    quote.src = Endpoint {
        addr: header.src,
        port: ports[0],
    };
    quote.dst = Endpoint {
        addr: header.dst,
        port: ports[1],
    };
    true
}

/// Translates an ICMP error about a tracked flow in place, telling `out`
/// how.
#[inline(always)]
pub fn translate_error(ctx: &TcContext, pkt: &Packet, out: &mut Translated) -> Outcome {
    let mut quote = Quote::default();
    if !read_quote(ctx, pkt, &mut quote) {
        return Outcome::NotOurs;
    }
    let (s, d) = (quote.src, quote.dst);
    // The error goes to the quoted packet's sender.
    if pkt.dst != s.addr {
        return Outcome::NotOurs;
    }
    let key = FlowKey::new(d.addr, d.port, s.addr, s.port, quote.header.proto);
    let Some(entry) = conntrack::lookup(&key) else {
        return Outcome::NotOurs;
    };
    // What a packet from d to s becomes.
    let (new_d, new_s) = if entry.flags & NAT_REPLY != 0 {
        (conntrack::rewritten_to(&entry), conntrack::other_end(&entry, s))
    } else {
        (conntrack::other_end(&entry, d), conntrack::rewritten_to(&entry))
    };
    // Sent by the far end itself (a backend's port unreachable), it comes
    // from what that end becomes; sent by a router on the way, from the
    // router still.
    let outer_src = if pkt.src == d.addr { new_d.addr } else { pkt.src };
    if rewrite(ctx, pkt, &quote, new_s, new_d, outer_src).is_err() {
        return Outcome::Failed;
    }
    out.entry_flags = entry.flags;
    out.src = outer_src;
    out.dst = new_s.addr;
    Outcome::Translated
}

/// The two ports as one 32-bit word, as they sit in the packet.
#[inline(always)]
fn ports_word(src: u16, dst: u16) -> u32 {
    u32::from_ne_bytes({
        let (a, b) = (src.to_ne_bytes(), dst.to_ne_bytes());
        [a[0], a[1], b[0], b[1]]
    })
}

/// Writes the quote as `new_s -> new_d` and the outer header as
/// `outer_src -> new_s`, keeping every checksum right: the quoted IPv4
/// header's, the quoted L4 header's if it was quoted far enough to hold it,
/// and the ICMP one over all of that. The ICMP message's bytes sum as
/// before, so the skb's own checksum state stays valid.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    quote: &Quote,
    new_s: Endpoint,
    new_d: Endpoint,
    outer_src: u32,
) -> Result<(), i64> {
    let (s, d) = (quote.src, quote.dst);
    let old_ports = ports_word(s.port, d.port);
    let new_ports = ports_word(new_s.port, new_d.port);
    let addresses = |check: u16| checksum::replace4(checksum::replace4(check, s.addr, new_s.addr), d.addr, new_d.addr);

    let quoted_check = addresses(quote.header.check);
    let icmp_check_off = pkt.l4_off + 2;
    let mut icmp_check: u16 = ctx.load(icmp_check_off)?;
    icmp_check = addresses(icmp_check);
    icmp_check = checksum::replace2(icmp_check, quote.header.check, quoted_check);
    icmp_check = checksum::replace4(icmp_check, old_ports, new_ports);

    let udp = quote.header.proto == IPPROTO_UDP;
    let l4_check_off = quote.l4_off + if udp { 6 } else { 16 };
    if ctx.len() as usize >= l4_check_off + 2 {
        let old: u16 = ctx.load(l4_check_off)?;
        // A UDP checksum of zero means none, and stays none.
        if !(udp && old == 0) {
            let mut new = checksum::replace4(addresses(old), old_ports, new_ports);
            if udp && new == 0 {
                new = 0xffff;
            }
            icmp_check = checksum::replace2(icmp_check, old, new);
            ctx.store(l4_check_off, &new, 0)?;
        }
    }
    let quoted = ChecksumAndAddresses {
        check: quoted_check,
        src: new_s.addr,
        dst: new_d.addr,
    };
    ctx.store(quote.ip_off + 10, &quoted, 0)?;
    ctx.store(quote.l4_off, &[new_s.port, new_d.port], 0)?;
    ctx.store(icmp_check_off, &icmp_check, 0)?;

    let mut check: u16 = ctx.load(Packet::IP_CSUM_OFF)?;
    check = checksum::replace4(check, pkt.src, outer_src);
    check = checksum::replace4(check, pkt.dst, new_s.addr);
    let outer = ChecksumAndAddresses {
        check,
        src: outer_src,
        dst: new_s.addr,
    };
    ctx.store(Packet::IP_CSUM_OFF, &outer, 0)
}
