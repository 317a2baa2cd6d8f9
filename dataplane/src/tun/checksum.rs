//! The Internet checksum (RFC 1071): the 16-bit one's complement of the one's
//! complement sum of 16-bit big-endian words.

/// Adds `data` to a running one's complement sum (unfolded). An odd final
/// byte counts as the high byte of a word padded with zero, so `data` must
/// be the last piece unless its length is even.
pub(crate) fn add(mut acc: u64, data: &[u8]) -> u64 {
    // 32-bit words folded at the end give the same 16-bit result, since
    // 2^16 = 1 modulo 0xffff; a u64 cannot overflow below 2^32 words.
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a running sum to 16 bits (not inverted).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The sum of the TCP/UDP pseudo-header (RFC 793, RFC 8200 section 8.1):
/// addresses, protocol and upper-layer length.
pub(crate) fn pseudo_header(src: &[u8], dst: &[u8], protocol: u8, length: u32) -> u64 {
    let acc = add(add(0, src), dst);
    acc + u64::from(protocol) + u64::from(length >> 16) + u64::from(length & 0xffff)
}

/// The checksum of `data`: the value to store in a header whose checksum
/// field was zero while summing.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(add(0, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add(0, &data)), 0xddf2);
        assert_eq!(internet_checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_lengths_and_all_alignments() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        for len in 0..data.len() {
            let d = &data[..len];
            let mut naive: u32 = 0;
            for (i, &b) in d.iter().enumerate() {
                naive += if i % 2 == 0 { u32::from(b) << 8 } else { u32::from(b) };
            }
            while naive >> 16 != 0 {
                naive = (naive & 0xffff) + (naive >> 16);
            }
            assert_eq!(fold(add(0, d)), naive as u16, "length {len}");
        }
    }

    #[test]
    fn ipv4_header() {
        // A textbook IPv4 header whose checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(internet_checksum(&h), 0);
    }
}
