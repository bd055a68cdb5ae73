//! What the shared stages need of a packet's context, for TC's skb and
//! XDP's frame alike: its bytes, a parse, writes, and the L4 checksum fix.
//! Only these differ between the two; every decision is made once.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use proxy_common::{checksum, IPPROTO_UDP};

use crate::parse::{self, Packet, ParseError, MAX_HEADERS};

/// -EFAULT: a header parsed before is out of the packet's bounds (it
/// cannot be; the verifier wants the check).
pub const HEADERS_GONE: i64 = -14;

pub trait Frame {
    /// The packet's first byte (its Ethernet header) and its end, as far as
    /// the data can be read directly.
    fn start(&self) -> usize;
    fn end(&self) -> usize;

    fn parse(&self) -> Result<Packet, ParseError>;

    /// Writes `value` at `offset`.
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64>;

    /// Fixes `pkt`'s L4 checksum for a `size`-byte field (2 or 4) that
    /// changed from `from` to `to`; `pseudo` when the field is one the
    /// checksum covers through the pseudo-header (an address).
    fn update_l4_checksum(&self, pkt: &Packet, from: u32, to: u32, size: u8, pseudo: bool) -> Result<(), i64>;

    /// The skb, where this is TC: the complete path, which also answers
    /// (REJECT), reverse-translates replies, translates ICMP errors and
    /// later fragments, and forwards through the neighbour subsystem. XDP
    /// leaves all of that to it.
    fn tc(&self) -> Option<&TcContext>;
}

/// `start` and `end` from the context's own `data` and `data_end`, which
/// both contexts have under those names.
macro_rules! data_bounds {
    () => {
        fn start(&self) -> usize {
            self.data()
        }

        fn end(&self) -> usize {
            self.data_end()
        }
    };
}

impl Frame for TcContext {
    data_bounds!();

    /// Parses the headers from the linear part of the skb; only when they
    /// run past it are they pulled in. Pulling unconditionally would cost
    /// most packets from local sockets a copy: their payload sits in page
    /// fragments, their headers (all this reads) in the linear part, and
    /// they are clones.
    #[inline(always)]
    fn parse(&self) -> Result<Packet, ParseError> {
        let headers = core::cmp::min(self.len() as usize, MAX_HEADERS);
        match parse::parse(self.data(), self.data_end()) {
            Err(ParseError::Truncated) if self.data_end() - self.data() < headers => {
                // On failure the parse below reports the short headers.
                let _ = self.pull_data(headers as u32);
                parse::parse(self.data(), self.data_end())
            }
            parsed => parsed,
        }
    }

    /// Through the helper: a program that writes packet data directly gets
    /// an unclone check (a helper call) before every packet, and most
    /// packets here come from local TCP sockets, as clones.
    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64> {
        self.store(offset, value, 0)
    }

    /// Through the kernel: only it knows whether the skb holds a partial
    /// checksum (the pseudo-header's, as packets from local sockets do) or a
    /// full one, which the same rewrite changes in opposite directions.
    #[inline(always)]
    fn update_l4_checksum(&self, pkt: &Packet, from: u32, to: u32, size: u8, pseudo: bool) -> Result<(), i64> {
        let mut flags = size as u64;
        if pseudo {
            flags |= BPF_F_PSEUDO_HDR as u64;
        }
        // A UDP checksum of zero means "none" and must stay zero.
        if pkt.proto == IPPROTO_UDP {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        self.l4_csum_replace(pkt.l4_csum_off(), from as u64, to as u64, flags)
    }

    fn tc(&self) -> Option<&TcContext> {
        Some(self)
    }
}

impl Frame for XdpContext {
    data_bounds!();

    /// A frame from the wire: its headers are in the linear data.
    #[inline(always)]
    fn parse(&self) -> Result<Packet, ParseError> {
        parse::parse(self.data(), self.data_end())
    }

    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64> {
        let at = parse::ptr_at::<T>(self.data(), self.data_end(), offset).ok_or(HEADERS_GONE)? as *mut T;
        // SAFETY: in bounds (checked above); no alignment guarantee.
        unsafe { at.write_unaligned(*value) };
        Ok(())
    }

    /// In software: a frame from the wire carries its full checksum, never
    /// a partial one, so the incremental update is the same whether the
    /// field is in the pseudo-header or not.
    #[inline(always)]
    fn update_l4_checksum(&self, pkt: &Packet, from: u32, to: u32, size: u8, _pseudo: bool) -> Result<(), i64> {
        let at = pkt.l4_csum_off();
        let old: u16 = parse::read(self.data(), self.data_end(), at).map_err(|_| HEADERS_GONE)?;
        let udp = pkt.proto == IPPROTO_UDP;
        // A UDP checksum of zero means "none" and must stay zero.
        if udp && old == 0 {
            return Ok(());
        }
        let mut new = if size == 4 {
            checksum::replace4(old, from, to)
        } else {
            checksum::replace2(old, from as u16, to as u16)
        };
        // A computed zero is sent as all ones (zero would mean "none").
        if udp && new == 0 {
            new = 0xffff;
        }
        self.write(at, &new)
    }

    fn tc(&self) -> Option<&TcContext> {
        None
    }
}
