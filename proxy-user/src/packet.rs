//! Crafting Ethernet/IPv4/TCP/UDP frames with correct checksums (for
//! `kpr trace`, and the tests' packet fixtures), and reading back what the
//! programs wrote.
use std::net::Ipv4Addr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const IP_MF: u16 = 0x2000;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: Vec<u8>,
    },
    /// `no_checksum`: the sender left the optional UDP checksum at zero.
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        no_checksum: bool,
    },
    /// Any other protocol number with its raw payload.
    Raw { proto: u8, payload: Vec<u8> },
}

#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Flags and fragment offset, host order.
    pub frag: u16,
    /// IP options, padded by the caller to a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub l4: L4,
}

pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Ipv4 {
    Ipv4 {
        src: src.0,
        dst: dst.0,
        frag: 0,
        options: vec![],
        l4: L4::Tcp {
            sport: src.1,
            dport: dst.1,
            flags,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        },
    }
}

pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Ipv4 {
    Ipv4 {
        src: src.0,
        dst: dst.0,
        frag: 0,
        options: vec![],
        l4: L4::Udp {
            sport: src.1,
            dport: dst.1,
            payload: b"query".to_vec(),
            no_checksum: false,
        },
    }
}

/// The flow table's key for packets from `src` to `dst`.
pub fn flow_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> proxy_common::FlowKey {
    proxy_common::FlowKey::new(
        proxy_common::addr_to_map(src.0),
        src.1.to_be(),
        proxy_common::addr_to_map(dst.0),
        dst.1.to_be(),
        proto,
    )
}

/// Internet checksum (RFC 1071) of `data`, starting from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    pseudo.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum()
}

pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

impl Ipv4 {
    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Raw { proto, .. } => proto,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                payload,
            } => {
                let mut h = Vec::new();
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&1000u32.to_be_bytes()); // seq
                h.extend_from_slice(&(if flags & TCP_ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
                h.extend_from_slice(&[5 << 4, *flags]);
                h.extend_from_slice(&64240u16.to_be_bytes()); // window
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                h.extend_from_slice(payload);
                h
            }
            L4::Udp {
                sport, dport, payload, ..
            } => {
                let mut h = Vec::new();
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(payload);
                h
            }
            L4::Raw { payload, .. } => return payload.clone(),
        };
        let csum_at = match &self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { no_checksum: false, .. } => Some(6),
            _ => None,
        };
        if let Some(at) = csum_at {
            let mut c = checksum(&l4, pseudo_header_sum(self.src, self.dst, self.proto(), l4.len()));
            if c == 0 && at == 6 {
                c = 0xffff; // UDP sends a computed zero as all ones
            }
            l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    /// The IPv4 packet (header with correct checksum, then L4).
    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let ihl = 20 + self.options.len();
        assert!(
            ihl.is_multiple_of(4) && ihl <= 60,
            "options must pad the header to 4-byte words"
        );
        let mut h = Vec::with_capacity(ihl + l4.len());
        h.push(0x40 | (ihl / 4) as u8);
        h.push(0);
        h.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        h.extend_from_slice(&0x1234u16.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.extend_from_slice(&[64, self.proto(), 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(&l4);
        h
    }

    pub fn frame(&self) -> Vec<u8> {
        ethernet(ETH_P_IP, &self.bytes())
    }

    /// The same packet from another address and port.
    pub fn with_src(mut self, (ip, port): (Ipv4Addr, u16)) -> Self {
        self.src = ip;
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            L4::Raw { .. } => panic!("no ports in a raw packet"),
        }
        self
    }

    /// The same packet to another address and port.
    pub fn with_dst(mut self, (ip, port): (Ipv4Addr, u16)) -> Self {
        self.dst = ip;
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            L4::Raw { .. } => panic!("no ports in a raw packet"),
        }
        self
    }
}

/// The ICMP port unreachable kpr answers `request` with, from `request`'s
/// destination to its source, Ethernet addresses swapped: the request's
/// IPv4 header and L4 header quoted (RFC 792 asks for 8 bytes or more; a
/// TCP header is quoted whole), in an IPv4 header with identification 0.
pub fn port_unreachable(request: &Ipv4) -> Vec<u8> {
    let l4 = if request.proto() == 6 { 20 } else { 8 };
    let quoted = 20 + request.options.len() + l4;
    let mut ip = icmp_error(request.dst, request.src, ICMP_PORT_UNREACHABLE, 0, request, quoted).bytes();
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&ip[..20], 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = ethernet(ETH_P_IP, &ip);
    let (dst, src) = frame.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    frame
}

/// An ICMP error (`kind`: type and code; `rest`: the 4 bytes after the
/// checksum, the next-hop MTU of a fragmentation needed) from `from` to
/// `to` about `about`, quoting its first `quoted` bytes (header included;
/// Linux quotes as much as fits in 576 bytes, RFC 792 asks for the header
/// and 8 bytes).
pub fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, kind: (u8, u8), rest: u32, about: &Ipv4, quoted: usize) -> Ipv4 {
    let original = about.bytes();
    let mut icmp = vec![kind.0, kind.1, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(&original[..quoted.min(original.len())]);
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Ipv4 {
        src: from,
        dst: to,
        frag: 0,
        options: vec![],
        l4: L4::Raw {
            proto: 1,
            payload: icmp,
        },
    }
}

pub const ICMP_PORT_UNREACHABLE: (u8, u8) = (3, 3);
pub const ICMP_FRAGMENTATION_NEEDED: (u8, u8) = (3, 4);
pub const ICMP_TTL_EXCEEDED: (u8, u8) = (11, 0);

impl Ipv4 {
    /// The datagram in two fragments, the first carrying `first` bytes of
    /// its L4 part (a multiple of 8), the L4 checksum over the whole.
    pub fn fragmented(&self, first: usize) -> [Ipv4; 2] {
        assert!(first.is_multiple_of(8), "fragments split at 8-byte boundaries");
        let l4 = self.l4_bytes();
        let part = |payload: &[u8], frag: u16| Ipv4 {
            src: self.src,
            dst: self.dst,
            frag,
            options: self.options.clone(),
            l4: L4::Raw {
                proto: self.proto(),
                payload: payload.to_vec(),
            },
        };
        [part(&l4[..first], IP_MF), part(&l4[first..], (first / 8) as u16)]
    }
}

/// Source and destination (address, port) of a TCP or UDP frame.
pub fn endpoints_of(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let l4 = 14 + ihl;
    let addr = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    ((addr(26), port(l4)), (addr(30), port(l4 + 2)))
}

/// Bytes as hex, for comparing frames with a readable difference.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}
