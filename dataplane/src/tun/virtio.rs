//! `struct virtio_net_hdr` (virtio 1.x section 5.1.6, `linux/virtio_net.h`):
//! the 10 bytes a TUN device opened with `IFF_VNET_HDR` puts before every
//! packet it hands us, and expects before every packet we write.

use std::fmt;

/// The header, in host terms. On the wire each 16-bit field is in the host's
/// byte order (little-endian on x86 and arm64), which is what TUN uses unless
/// `TUNSETVNETBE`/`TUNSETVNETLE` says otherwise; we never set those.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VirtioNetHdr {
    /// [`VirtioNetHdr::F_NEEDS_CSUM`] and/or [`VirtioNetHdr::F_DATA_VALID`].
    pub flags: u8,
    /// One of the `GSO_*` constants, possibly with [`VirtioNetHdr::GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers before the payload (a hint; we compute our own).
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Where checksumming starts: the offset of the TCP or UDP header.
    pub csum_start: u16,
    /// Where the checksum goes, counted from `csum_start` (16 for TCP, 6 for UDP).
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// The size of the header on the wire (`TUNSETVNETHDRSZ` is set to this).
    pub const LEN: usize = 10;
    /// The L4 checksum is partial: complete it from `csum_start` to the end.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// The checksum was verified (packets written to TUN).
    pub const F_DATA_VALID: u8 = 2;
    /// Not a GSO packet.
    pub const GSO_NONE: u8 = 0;
    /// IPv4 TCP segmentation offload.
    pub const GSO_TCPV4: u8 = 1;
    /// IPv4/IPv6 UDP fragmentation offload (UFO; never enabled by us).
    pub const GSO_UDP: u8 = 3;
    /// IPv6 TCP segmentation offload.
    pub const GSO_TCPV6: u8 = 4;
    /// UDP segmentation offload (USO), IPv4 or IPv6.
    pub const GSO_UDP_L4: u8 = 5;
    /// Flag bit in `gso_type`: the TCP packet had ECN CWR set.
    pub const GSO_ECN: u8 = 0x80;

    /// A header for a plain packet: no checksum work, no segmentation.
    pub const NONE: VirtioNetHdr =
        VirtioNetHdr { flags: 0, gso_type: 0, hdr_len: 0, gso_size: 0, csum_start: 0, csum_offset: 0 };

    /// Reads the header from the first [`VirtioNetHdr::LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderTooShort> {
        let b: &[u8; Self::LEN] =
            bytes.get(..Self::LEN).and_then(|b| b.try_into().ok()).ok_or(HeaderTooShort { len: bytes.len() })?;
        Ok(Self::from_bytes(b))
    }

    /// Decodes the 10 header bytes.
    pub fn from_bytes(b: &[u8; Self::LEN]) -> Self {
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// Writes the header into the first [`VirtioNetHdr::LEN`] bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) -> Result<(), HeaderTooShort> {
        let len = out.len();
        out.get_mut(..Self::LEN).ok_or(HeaderTooShort { len })?.copy_from_slice(&self.to_bytes());
        Ok(())
    }

    /// Whether the packet is a GSO super-packet that must be split.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !Self::GSO_ECN != Self::GSO_NONE
    }

    /// Whether the L4 checksum is partial and must be completed.
    pub fn needs_csum(&self) -> bool {
        self.flags & Self::F_NEEDS_CSUM != 0
    }
}

/// A buffer shorter than the 10-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderTooShort {
    /// The length that was given.
    pub len: usize,
}

impl fmt::Display for HeaderTooShort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes is too short for a virtio-net header ({} needed)", self.len, VirtioNetHdr::LEN)
    }
}

impl std::error::Error for HeaderTooShort {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_TCPV4 | VirtioNetHdr::GSO_ECN,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        let bytes = hdr.to_bytes();
        if cfg!(target_endian = "little") {
            assert_eq!(bytes, [1, 0x81, 2, 1, 4, 3, 6, 5, 8, 7]);
        }
        assert_eq!(VirtioNetHdr::parse(&bytes).unwrap(), hdr);
        let mut out = [0xffu8; 12];
        hdr.emit(&mut out).unwrap();
        assert_eq!(out[..10], bytes);
        assert_eq!(out[10..], [0xff, 0xff]);
        assert!(hdr.is_gso() && hdr.needs_csum());
        assert!(!VirtioNetHdr::NONE.is_gso() && !VirtioNetHdr::NONE.needs_csum());
        assert_eq!(VirtioNetHdr::NONE.to_bytes(), [0; 10]);
    }

    #[test]
    fn short_buffers_are_errors() {
        assert_eq!(VirtioNetHdr::parse(&[0; 9]), Err(HeaderTooShort { len: 9 }));
        assert_eq!(VirtioNetHdr::NONE.emit(&mut [0; 3]), Err(HeaderTooShort { len: 3 }));
        assert!(HeaderTooShort { len: 3 }.to_string().contains("10 needed"));
    }
}
