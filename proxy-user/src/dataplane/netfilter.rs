//! Netfilter's connection tracking, read through ctnetlink: the flows
//! kube-proxy's rules translated before kpr took over a node, which kpr
//! takes over with the backend netfilter chose (`ServiceMaps::
//! adopt_netfilter`), so a live migration drops no connection. Not left to
//! netfilter: it strips the NAT of every tracked connection when its NAT
//! hooks are re-registered, as removing kube-proxy's rules does.
use std::{io, mem::size_of, net::Ipv4Addr};

/// One direction of a tracked connection, as netfilter records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

/// A connection: as its first packet came (`original`) and as its replies
/// come (`reply`). Its destination was translated (DNAT, as kube-proxy's
/// rules do) when the reply does not come from the original destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    pub original: Tuple,
    pub reply: Tuple,
}

impl Connection {
    pub fn destination_translated(&self) -> bool {
        (self.reply.src, self.reply.src_port) != (self.original.dst, self.original.dst_port)
    }
}

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// nlmsghdr, then nfgenmsg.
const HEADERS: usize = 16 + 4;

/// The netlink attributes in `data`: (type, payload).
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((kind, payload))
    })
}

fn find(data: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(data).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

fn tuple(data: &[u8]) -> Option<Tuple> {
    let ip = find(data, CTA_TUPLE_IP)?;
    let proto = find(data, CTA_TUPLE_PROTO)?;
    let addr = |kind| -> Option<Ipv4Addr> { Some(Ipv4Addr::from(<[u8; 4]>::try_from(find(ip, kind)?).ok()?)) };
    let port = |kind| -> Option<u16> { Some(u16::from_be_bytes(find(proto, kind)?.try_into().ok()?)) };
    Some(Tuple {
        src: addr(CTA_IP_V4_SRC)?,
        dst: addr(CTA_IP_V4_DST)?,
        proto: *find(proto, CTA_PROTO_NUM)?.first()?,
        src_port: port(CTA_PROTO_SRC_PORT)?,
        dst_port: port(CTA_PROTO_DST_PORT)?,
    })
}

/// The connections in one ctnetlink message's attributes (after its
/// headers); none for a connection without ports (ICMP) or IPv6.
pub fn connection(attrs: &[u8]) -> Option<Connection> {
    Some(Connection {
        original: tuple(find(attrs, CTA_TUPLE_ORIG)?)?,
        reply: tuple(find(attrs, CTA_TUPLE_REPLY)?)?,
    })
}

/// Every IPv4 TCP and UDP connection netfilter tracks in the current
/// network namespace (a ctnetlink dump; needs CAP_NET_ADMIN).
pub fn connections() -> io::Result<Vec<Connection>> {
    // SAFETY: plain socket call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor of ours.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut request = Vec::with_capacity(HEADERS);
    request.extend_from_slice(&(HEADERS as u32).to_ne_bytes());
    request.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    request.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]); // nfgenmsg: family, version 0, res_id
                                                                // SAFETY: sending our own buffer.
    if unsafe { libc::send(raw, request.as_ptr().cast(), request.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receiving into our own buffer.
        let n = unsafe { libc::recv(raw, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut data = &buffer[..n as usize];
        while data.len() >= size_of::<u32>() * 4 {
            let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            if len < 16 || len > data.len() {
                return Err(io::Error::other("a truncated netlink message"));
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(data[16..20].try_into().expect("4 bytes"));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                }
                _ if len >= HEADERS => found.extend(connection(&data[HEADERS..len])),
                _ => {}
            }
            data = &data[len.next_multiple_of(4).min(data.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn tuple_attr(kind: u16, t: &Tuple) -> Vec<u8> {
        nested(
            kind,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[
                        attr(CTA_IP_V4_SRC, &t.src.octets()),
                        attr(CTA_IP_V4_DST, &t.dst.octets()),
                    ],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[t.proto]),
                        attr(CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn a_connection_is_read_from_its_attributes() {
        let original = Tuple {
            src: Ipv4Addr::new(10, 244, 0, 9),
            dst: Ipv4Addr::new(10, 96, 0, 10),
            src_port: 40000,
            dst_port: 80,
            proto: 6,
        };
        let reply = Tuple {
            src: Ipv4Addr::new(10, 244, 1, 5),
            dst: Ipv4Addr::new(10, 244, 0, 9),
            src_port: 8080,
            dst_port: 40000,
            proto: 6,
        };
        // Another attribute before them (status), as the kernel sends.
        let attrs = [
            attr(3, &0x188u32.to_be_bytes()),
            tuple_attr(CTA_TUPLE_ORIG, &original),
            tuple_attr(CTA_TUPLE_REPLY, &reply),
        ]
        .concat();
        let read = connection(&attrs).unwrap();
        assert_eq!(read, Connection { original, reply });
        assert!(read.destination_translated());
        let direct = Connection {
            original,
            reply: Tuple {
                src: original.dst,
                src_port: original.dst_port,
                ..reply
            },
        };
        assert!(!direct.destination_translated());
        // Cut short: no connection, no panic.
        assert_eq!(connection(&attrs[..attrs.len() - 6]), None);
    }
}
