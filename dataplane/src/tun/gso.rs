//! Splitting what TUN hands us with offloads on: a TCP (TSO) or UDP (USO)
//! super-packet becomes wire-sized IP packets, and a partial checksum
//! (`F_NEEDS_CSUM`) is completed. The segments land in caller-provided
//! buffers after `headroom` bytes (16 for the WireGuard data header), so the
//! next step encrypts them in place without another copy.
//!
//! Segmentation follows Linux's `tcp_gso_segment` / `__udp_gso_segment`:
//! every segment gets the full headers; the IPv4 total length, ID (+1 per
//! segment) and header checksum, or the IPv6 payload length, are rewritten;
//! TCP sequence numbers advance by the payload sent, FIN and PSH stay only on
//! the last segment and CWR only on the first; UDP lengths are rewritten; and
//! every L4 checksum is computed afresh over its own segment.

use std::fmt;

use super::checksum;
use super::virtio::VirtioNetHdr;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const IPV6_HEADER_LEN: usize = 40;
const UDP_HEADER_LEN: usize = 8;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// Why a packet from TUN could not be split or completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GsoError {
    /// An output buffer is too small; `needed` is the size it must have,
    /// headroom included.
    BufferTooSmall {
        /// Bytes needed in that buffer.
        needed: usize,
    },
    /// Fewer output buffers than segments; `needed` is the segment count.
    TooFewBuffers {
        /// Buffers needed.
        needed: usize,
    },
    /// The headers contradict the virtio-net header or are cut short.
    Malformed(&'static str),
    /// A `gso_type` we do not split (UFO, which we never enable).
    Unsupported {
        /// The `gso_type` byte.
        gso_type: u8,
    },
}

impl fmt::Display for GsoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GsoError::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
            GsoError::TooFewBuffers { needed } => {
                write!(f, "too few output buffers: {needed} needed")
            }
            GsoError::Malformed(why) => write!(f, "malformed offload packet: {why}"),
            GsoError::Unsupported { gso_type } => write!(f, "unsupported gso_type {gso_type}"),
        }
    }
}

impl std::error::Error for GsoError {}

/// The layout of a super-packet, checked against its virtio-net header.
#[derive(Clone, Copy, Debug)]
struct Layout {
    ipv4: bool,
    /// Offset of the TCP or UDP header (`csum_start`).
    l4_start: usize,
    /// Offset of the payload: all headers end here.
    payload_start: usize,
    protocol: u8,
    /// Payload bytes per segment.
    segment_payload: usize,
    segments: usize,
}

impl Layout {
    fn of(hdr: &VirtioNetHdr, packet: &[u8]) -> Result<Self, GsoError> {
        let gso = hdr.gso_type & !VirtioNetHdr::GSO_ECN;
        let protocol = match gso {
            VirtioNetHdr::GSO_TCPV4 | VirtioNetHdr::GSO_TCPV6 => PROTO_TCP,
            VirtioNetHdr::GSO_UDP_L4 => PROTO_UDP,
            _ => return Err(GsoError::Unsupported { gso_type: hdr.gso_type }),
        };
        let version = packet.first().ok_or(GsoError::Malformed("empty packet"))? >> 4;
        let (ipv4, ip_header_len) = match version {
            4 => {
                let ihl = usize::from(packet[0] & 0x0f) * 4;
                if ihl < 20 || packet.len() < ihl {
                    return Err(GsoError::Malformed("bad IPv4 header length"));
                }
                if packet[9] != protocol {
                    return Err(GsoError::Malformed("IPv4 protocol does not match gso_type"));
                }
                (true, ihl)
            }
            6 => (false, IPV6_HEADER_LEN),
            _ => return Err(GsoError::Malformed("not IPv4 or IPv6")),
        };
        match (gso, ipv4) {
            (VirtioNetHdr::GSO_TCPV4, false) | (VirtioNetHdr::GSO_TCPV6, true) => {
                return Err(GsoError::Malformed("IP version does not match gso_type"));
            }
            _ => {}
        }
        let l4_start = usize::from(hdr.csum_start);
        if l4_start < ip_header_len {
            return Err(GsoError::Malformed("csum_start inside the IP header"));
        }
        let l4_header_len = if protocol == PROTO_TCP {
            let offset_byte = *packet.get(l4_start + 12).ok_or(GsoError::Malformed("TCP header cut short"))?;
            let len = usize::from(offset_byte >> 4) * 4;
            if len < 20 {
                return Err(GsoError::Malformed("bad TCP data offset"));
            }
            len
        } else {
            UDP_HEADER_LEN
        };
        let payload_start = l4_start + l4_header_len;
        if payload_start > packet.len() {
            return Err(GsoError::Malformed("L4 header cut short"));
        }
        let segment_payload = usize::from(hdr.gso_size);
        if segment_payload == 0 {
            return Err(GsoError::Malformed("gso_size is zero"));
        }
        let payload = packet.len() - payload_start;
        let segments = payload.div_ceil(segment_payload).max(1);
        Ok(Layout { ipv4, l4_start, payload_start, protocol, segment_payload, segments })
    }
}

/// How many IP packets [`split`] will produce for this packet (1 unless it
/// is a GSO super-packet).
pub fn segment_count(hdr: &VirtioNetHdr, packet: &[u8]) -> Result<usize, GsoError> {
    if hdr.is_gso() {
        Layout::of(hdr, packet).map(|l| l.segments)
    } else {
        Ok(1)
    }
}

/// Completes a partial L4 checksum in place, for a packet that is not a GSO
/// super-packet but has `F_NEEDS_CSUM` set: the checksum field holds the
/// pseudo-header sum, and the sum from `csum_start` to the end goes there.
/// Does nothing if the flag is not set.
pub fn complete_checksum(hdr: &VirtioNetHdr, packet: &mut [u8]) -> Result<(), GsoError> {
    if !hdr.needs_csum() {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > packet.len() {
        return Err(GsoError::Malformed("checksum field beyond the packet"));
    }
    let mut sum = !checksum::fold(checksum::add(0, &packet[start..]));
    // UDP sends a computed zero as 0xffff (zero means "no checksum"); for
    // TCP the two are the same value in one's complement.
    if sum == 0 && is_udp_at(packet, start) {
        sum = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

fn is_udp_at(packet: &[u8], l4_start: usize) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9) == Some(&PROTO_UDP),
        Some(6) => l4_start == IPV6_HEADER_LEN && packet.get(6) == Some(&PROTO_UDP),
        _ => false,
    }
}

/// Splits `packet` (read from TUN, after its virtio-net header `hdr`) into IP
/// packets, writing packet `i` to `out[i][headroom..headroom + sizes[i]]`,
/// and returns how many there are. Bytes outside those ranges are not
/// touched. A packet that is not a GSO super-packet is copied as the single
/// segment, its checksum completed if `F_NEEDS_CSUM` is set.
///
/// `out` and `sizes` need [`segment_count`] entries; each buffer needs
/// `headroom` plus its segment's length (at most the headers plus
/// `gso_size`).
pub fn split<B: AsMut<[u8]>>(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    headroom: usize,
    out: &mut [B],
    sizes: &mut [usize],
) -> Result<usize, GsoError> {
    if !hdr.is_gso() {
        check_room(1, out.len(), sizes.len())?;
        let dst = segment_buffer(out[0].as_mut(), headroom, packet.len())?;
        dst.copy_from_slice(packet);
        complete_checksum(hdr, dst)?;
        sizes[0] = packet.len();
        return Ok(1);
    }
    let layout = Layout::of(hdr, packet)?;
    check_room(layout.segments, out.len(), sizes.len())?;
    let headers = &packet[..layout.payload_start];
    let payload = &packet[layout.payload_start..];
    // Everything that can fail is checked before anything is written.
    for (i, buf) in out.iter_mut().take(layout.segments).enumerate() {
        let len = headers.len() + segment_payload_len(&layout, payload.len(), i);
        segment_buffer(buf.as_mut(), headroom, len)?;
        if len > usize::from(u16::MAX) {
            return Err(GsoError::Malformed("segment longer than 65535 bytes"));
        }
    }
    for (i, (buf, size)) in out.iter_mut().zip(sizes.iter_mut()).take(layout.segments).enumerate() {
        let chunk_start = i * layout.segment_payload;
        let chunk = &payload[chunk_start..chunk_start + segment_payload_len(&layout, payload.len(), i)];
        let len = headers.len() + chunk.len();
        let seg = &mut buf.as_mut()[headroom..headroom + len];
        seg[..headers.len()].copy_from_slice(headers);
        seg[headers.len()..].copy_from_slice(chunk);
        fix_segment(&layout, seg, i, chunk_start);
        *size = len;
    }
    Ok(layout.segments)
}

fn segment_payload_len(layout: &Layout, payload_len: usize, i: usize) -> usize {
    let start = i * layout.segment_payload;
    layout.segment_payload.min(payload_len - start)
}

fn check_room(needed: usize, buffers: usize, sizes: usize) -> Result<(), GsoError> {
    if buffers < needed || sizes < needed {
        Err(GsoError::TooFewBuffers { needed })
    } else {
        Ok(())
    }
}

fn segment_buffer(buf: &mut [u8], headroom: usize, len: usize) -> Result<&mut [u8], GsoError> {
    let needed = headroom + len;
    buf.get_mut(headroom..needed).ok_or(GsoError::BufferTooSmall { needed })
}

/// Rewrites the copied headers of segment `i`, whose payload starts
/// `payload_offset` bytes into the super-packet's payload.
fn fix_segment(layout: &Layout, seg: &mut [u8], i: usize, payload_offset: usize) {
    let len = seg.len();
    let l4 = layout.l4_start;
    let l4_len = len - l4;
    if layout.ipv4 {
        let ihl = usize::from(seg[0] & 0x0f) * 4;
        seg[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let id = u16::from_be_bytes([seg[4], seg[5]]).wrapping_add(i as u16);
        seg[4..6].copy_from_slice(&id.to_be_bytes());
        seg[10..12].fill(0);
        let sum = checksum::internet_checksum(&seg[..ihl]);
        seg[10..12].copy_from_slice(&sum.to_be_bytes());
    } else {
        let payload_len = (len - IPV6_HEADER_LEN) as u16;
        seg[4..6].copy_from_slice(&payload_len.to_be_bytes());
    }

    let checksum_field = if layout.protocol == PROTO_TCP {
        let seq = u32::from_be_bytes([seg[l4 + 4], seg[l4 + 5], seg[l4 + 6], seg[l4 + 7]])
            .wrapping_add(payload_offset as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = seg[l4 + 13];
        if i + 1 < layout.segments {
            flags &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
        }
        if i > 0 {
            flags &= !TCP_FLAG_CWR;
        }
        seg[l4 + 13] = flags;
        l4 + 16
    } else {
        seg[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        l4 + 6
    };

    seg[checksum_field..checksum_field + 2].fill(0);
    let (src, dst) = if layout.ipv4 { (&seg[12..16], &seg[16..20]) } else { (&seg[8..24], &seg[24..40]) };
    let pseudo = checksum::pseudo_header(src, dst, layout.protocol, l4_len as u32);
    let mut sum = !checksum::fold(checksum::add(pseudo, &seg[l4..]));
    if sum == 0 && layout.protocol == PROTO_UDP {
        sum = 0xffff;
    }
    seg[checksum_field..checksum_field + 2].copy_from_slice(&sum.to_be_bytes());
}
