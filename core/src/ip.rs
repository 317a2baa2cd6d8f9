//! The few IP header fields cryptokey routing reads: version, source,
//! destination and total length. Every length is checked before use.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Source, destination and length of an IPv4 or IPv6 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpHeader {
    /// The source address.
    pub source: IpAddr,
    /// The destination address.
    pub destination: IpAddr,
    /// The packet's length as its header states (header included).
    pub total_len: usize,
}

/// Reads the addresses and length of the IP packet at the start of `packet`.
/// Returns `None` if it is not a well-formed IPv4 or IPv6 header, or if the
/// stated length exceeds the bytes present.
#[inline]
pub fn parse_header(packet: &[u8]) -> Option<IpHeader> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let total_len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
            let ihl = (packet[0] & 0x0f) as usize * 4;
            if total_len < 20 || ihl < 20 || ihl > total_len || total_len > packet.len() {
                return None;
            }
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some(IpHeader {
                source: IpAddr::V4(Ipv4Addr::from(src)),
                destination: IpAddr::V4(Ipv4Addr::from(dst)),
                total_len,
            })
        }
        6 if packet.len() >= 40 => {
            let total_len = 40 + u16::from_be_bytes([packet[4], packet[5]]) as usize;
            if total_len > packet.len() {
                return None;
            }
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some(IpHeader {
                source: IpAddr::V6(Ipv6Addr::from(src)),
                destination: IpAddr::V6(Ipv6Addr::from(dst)),
                total_len,
            })
        }
        _ => None,
    }
}
