//! Bounds-checked header access and the parse stage.
use proxy_common::{FlowKey, FragmentKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_HLEN: usize = 20;
const IPV4_MAX_HLEN: usize = 60;
/// Ports plus, for TCP, enough to reach the flags and checksum.
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Enough linear data for any header this program reads.
pub const MAX_HEADERS: usize = ETH_HLEN + IPV4_MAX_HLEN + TCP_HLEN;

const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;

/// An IPv4 header without options, as the packet holds it (network order).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub struct Ipv4Header {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: u16,
    pub id: u16,
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

/// Why a packet cannot be translated; each becomes a counted verdict.
pub enum ParseError {
    NotIpv4,
    Truncated,
    /// IPv4 but neither TCP, UDP nor ICMP: services cannot match it.
    OtherProtocol,
}

/// Where a packet stands in its datagram's fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: it carries the L4 header, and later ones follow
    /// its translation.
    First,
    /// A later fragment: no L4 header; its ports (0 as parsed) are the
    /// first fragment's, if that one was seen.
    Later,
}

/// What the later stages need of a TCP or UDP over IPv4 packet. Addresses and
/// ports stay in network order.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l4_off: usize,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// The IPv4 identification (network order): which datagram a fragment
    /// belongs to.
    pub ip_id: u16,
}

impl Packet {
    pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
    pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
    pub const IP_DST_OFF: usize = ETH_HLEN + 16;

    pub fn flow_key(&self) -> FlowKey {
        FlowKey::new(self.src, self.sport, self.dst, self.dport, self.proto)
    }

    /// What identifies this packet's datagram among fragments.
    pub fn fragment_key(&self) -> FragmentKey {
        FragmentKey {
            src_addr: self.src,
            dst_addr: self.dst,
            id: self.ip_id,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// A bare TCP SYN: a connection starting (or its SYN retransmitted).
    pub fn is_syn(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    /// What of a connection's end this packet carries (`SEEN_*`).
    pub fn end_flags(&self) -> u8 {
        if self.proto != IPPROTO_TCP {
            return 0;
        }
        let mut seen = 0;
        if self.tcp_flags & TCP_FLAG_FIN != 0 {
            seen |= proxy_common::SEEN_FIN;
        }
        if self.tcp_flags & TCP_FLAG_RST != 0 {
            seen |= proxy_common::SEEN_RST;
        }
        seen
    }

    /// A packet that may open a new connection on a tuple seen before: a
    /// bare TCP SYN, or any UDP datagram.
    pub fn may_open_flow(&self) -> bool {
        self.proto == IPPROTO_UDP || self.is_syn()
    }

    pub fn l4_csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

/// A pointer to a `T` at `offset` in `[data, data_end)`, or `None` when the
/// packet is too short. Every header read goes through here.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    if data + offset + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *const T)
}

#[inline(always)]
pub fn read<T: Copy>(data: usize, data_end: usize, offset: usize) -> Result<T, ParseError> {
    let ptr = ptr_at::<T>(data, data_end, offset).ok_or(ParseError::Truncated)?;
    // SAFETY: in bounds (checked above); packet data has no alignment guarantee.
    Ok(unsafe { ptr.read_unaligned() })
}

/// # Safety
/// `l4` must point at least 4 readable bytes into the packet.
#[inline(always)]
unsafe fn l4_ports(l4: usize, tcp_flags: u8) -> (u16, u16, u8) {
    let sport = unsafe { (l4 as *const u16).read_unaligned() };
    let dport = unsafe { ((l4 + 2) as *const u16).read_unaligned() };
    (sport, dport, tcp_flags)
}

#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Packet, ParseError> {
    let ethertype = u16::from_be(read::<u16>(data, data_end, 12)?);
    if ethertype != ETH_P_IP {
        return Err(ParseError::NotIpv4);
    }
    let version_ihl: u8 = read(data, data_end, ETH_HLEN)?;
    if version_ihl >> 4 != 4 {
        return Err(ParseError::NotIpv4);
    }
    // IP options are legal: skip them by the header length.
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(ParseError::Truncated);
    }
    let total_len = u16::from_be(read::<u16>(data, data_end, ETH_HLEN + 2)?) as usize;
    if total_len < ihl {
        return Err(ParseError::Truncated);
    }
    let ip_id = read::<u16>(data, data_end, ETH_HLEN + 4)?;
    let frag = u16::from_be(read::<u16>(data, data_end, ETH_HLEN + 6)?);
    let proto: u8 = read(data, data_end, ETH_HLEN + 9)?;
    let src = read(data, data_end, Packet::IP_SRC_OFF)?;
    let dst = read(data, data_end, Packet::IP_DST_OFF)?;
    let l4_off = ETH_HLEN + ihl;
    let packet = |sport, dport, tcp_flags, fragment| Packet {
        l4_off,
        proto,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
        fragment,
        ip_id,
    };
    let fragment = if frag & IP_OFFSET_MASK != 0 {
        Fragment::Later
    } else if frag & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::Whole
    };
    if fragment == Fragment::Later {
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Err(ParseError::OtherProtocol);
        }
        return Ok(packet(0, 0, 0, fragment));
    }
    // One pointer to the L4 header, checked once for its whole length: the
    // verifier tracks constant offsets from it, which it cannot do for
    // offsets recomputed from the (variable) IP header length.
    let l4 = data + l4_off;
    let (sport, dport, tcp_flags) = match proto {
        IPPROTO_TCP => {
            if total_len < ihl + TCP_HLEN || l4 + TCP_HLEN > data_end {
                return Err(ParseError::Truncated);
            }
            // SAFETY: [l4, l4 + TCP_HLEN) is inside the packet (checked above).
            unsafe { l4_ports(l4, (*((l4 + 13) as *const u8)) as u8) }
        }
        IPPROTO_UDP => {
            if total_len < ihl + UDP_HLEN || l4 + UDP_HLEN > data_end {
                return Err(ParseError::Truncated);
            }
            // SAFETY: [l4, l4 + UDP_HLEN) is inside the packet (checked above).
            unsafe { l4_ports(l4, 0) }
        }
        // The ICMP stage reads what it needs itself; a fragmented ICMP
        // message is nothing it translates.
        IPPROTO_ICMP if fragment == Fragment::Whole => (0, 0, 0),
        _ => return Err(ParseError::OtherProtocol),
    };
    Ok(packet(sport, dport, tcp_flags, fragment))
}
