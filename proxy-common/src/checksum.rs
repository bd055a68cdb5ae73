//! Incremental update of the IPv4 header checksum (RFC 1624), for the data
//! path to rewrite an address with plain stores instead of a helper call.
//!
//! Values are the bytes as they sit in the packet, loaded as integers in the
//! machine's order: the one's complement sum is the same in either byte
//! order, so nothing is swapped.

/// The checksum `check` after a 32-bit field it covers changes from `old` to
/// `new`: HC' = ~(~HC + ~m + m').
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check) + words(!old) + words(new);
    !fold(sum)
}

/// The checksum `check` after a 16-bit field it covers changes from `old`
/// to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(sum)
}

/// The Internet checksum of data given as 32-bit values (the packet's bytes
/// loaded in the machine's order), for headers the data path writes whole.
/// At most a few dozen values: two folds absorb their carries.
#[inline(always)]
pub fn of_words(values: &[u32]) -> u16 {
    let mut sum = 0u32;
    for &v in values {
        sum += words(v);
    }
    !fold(sum)
}

#[inline(always)]
fn words(value: u32) -> u32 {
    (value >> 16) + (value & 0xffff)
}

/// Folds the carries back in, as one's complement addition does; twice is
/// enough for a sum of a few 16-bit words.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum >> 16) + (sum & 0xffff);
    ((sum >> 16) + (sum & 0xffff)) as u16
}

#[cfg(test)]
mod tests {
    #[test]
    fn of_words_agrees_with_a_known_header() {
        // RFC 1071's example IPv4 header, checksum field zeroed: 0xb861.
        let header: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00,
            0xc7,
        ];
        let mut values = [0u32; 5];
        for (v, c) in values.iter_mut().zip(header.chunks(4)) {
            *v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        assert_eq!(u16::from_be_bytes(super::of_words(&values).to_ne_bytes()), 0xb861);
    }

    use super::*;

    /// The checksum of a header from scratch (its checksum field zeroed),
    /// words loaded in the machine's order as the data path loads them.
    fn full(header: &[u8; 20]) -> u16 {
        let mut sum = 0u32;
        for (i, pair) in header.chunks(2).enumerate() {
            if i != 5 {
                sum += u32::from(u16::from_ne_bytes([pair[0], pair[1]]));
            }
        }
        !fold(sum)
    }

    fn header(src: [u8; 4], dst: [u8; 4], ttl: u8, id: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&60u16.to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[8] = ttl;
        h[9] = 6;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let check = full(&h);
        h[10..12].copy_from_slice(&check.to_ne_bytes());
        h
    }

    fn field(h: &[u8; 20], at: usize) -> u32 {
        u32::from_ne_bytes(h[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn a_known_header_checks_out() {
        // The example header of Wikipedia's IPv4 checksum article: 0xb861.
        let h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(u16::from_be(full(&h)), 0xb861);
    }

    #[test]
    fn rewriting_an_address_matches_a_full_recompute() {
        let cases = [
            ([10, 0, 0, 1], [10, 96, 0, 10], [10, 244, 1, 7], 64, 1),
            ([192, 168, 1, 1], [255, 255, 255, 255], [0, 0, 0, 0], 1, 0xffff),
            ([0, 0, 0, 0], [0, 0, 0, 0], [255, 255, 255, 255], 255, 0),
            ([172, 16, 5, 4], [10, 96, 200, 3], [10, 96, 200, 3], 17, 0x1234),
            ([1, 2, 3, 4], [254, 1, 0, 255], [0, 255, 1, 0], 128, 0x8000),
        ];
        for (src, dst, new_dst, ttl, id) in cases {
            let before = header(src, dst, ttl, id);
            let expected = header(src, new_dst, ttl, id);
            let check = u16::from_ne_bytes([before[10], before[11]]);
            let updated = replace4(check, field(&before, 16), field(&expected, 16));
            assert_eq!(
                updated.to_ne_bytes(),
                [expected[10], expected[11]],
                "{src:?} -> {dst:?} rewritten to {new_dst:?}"
            );
        }
    }

    #[test]
    fn rewriting_a_16_bit_field_matches_a_full_recompute() {
        for (old, new) in [(1u16, 0xffff), (0x1234, 0x4321), (0, 0), (0xffff, 0), (80, 8080)] {
            let before = header([10, 1, 2, 3], [10, 96, 0, 1], 64, old);
            let expected = header([10, 1, 2, 3], [10, 96, 0, 1], 64, new);
            let check = u16::from_ne_bytes([before[10], before[11]]);
            let updated = replace2(
                check,
                u16::from_ne_bytes([before[4], before[5]]),
                u16::from_ne_bytes([expected[4], expected[5]]),
            );
            assert_eq!(updated.to_ne_bytes(), [expected[10], expected[11]], "id {old} -> {new}");
        }
    }

    #[test]
    fn every_single_byte_change_of_an_address_matches_a_full_recompute() {
        let before = header([10, 1, 2, 3], [10, 96, 0, 1], 64, 7);
        let check = u16::from_ne_bytes([before[10], before[11]]);
        for byte in 0..4 {
            for value in 0..=255u8 {
                let mut new_src = [10, 1, 2, 3];
                new_src[byte] = value;
                let expected = header(new_src, [10, 96, 0, 1], 64, 7);
                let updated = replace4(check, field(&before, 12), field(&expected, 12));
                assert_eq!(updated.to_ne_bytes(), [expected[10], expected[11]], "{new_src:?}");
            }
        }
    }
}
