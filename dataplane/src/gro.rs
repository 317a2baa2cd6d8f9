//! Receive-side coalescing for the TUN device: consecutive TCP segments of
//! one flow, decrypted from one batch of datagrams, are handed to the kernel
//! as one super-packet (a virtio-net header with `GSO_TCPV4`/`GSO_TCPV6`),
//! so the stack above sees one large packet instead of dozens. The segments
//! stay where they were decrypted: the first one's headers are rewritten in
//! place and the others contribute only their payload to a `writev`.
//!
//! The rules follow what the kernel's own GRO merges: same addresses,
//! ports, header lengths and options, contiguous sequence numbers, the same
//! ACK and window, only ACK (and PSH on the last) set, every segment but the
//! last of full size, and at most 64 KiB in total.

use crate::tun::VirtioNetHdr;

/// One decrypted IP packet in the receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Offset of the IP header.
    pub start: usize,
    /// Length of the IP packet.
    pub len: usize,
}

/// A run of packets to write as one: `count` packets from index `first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// Index of the first packet.
    pub first: usize,
    /// Packets in the run (1: write as is).
    pub count: usize,
    /// The virtio-net header to write before the first packet.
    pub hdr: VirtioNetHdr,
    /// Length of the IP and TCP headers (what later packets skip).
    pub headers: usize,
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// What identifies a coalescible TCP segment.
#[derive(Clone, Copy)]
struct Seg {
    v6: bool,
    ip_len: usize,
    tcp_len: usize,
    payload: usize,
    seq: u32,
    flags: u8,
}

fn parse(p: &[u8]) -> Option<Seg> {
    let (v6, ip_len) = match p.first()? >> 4 {
        4 => {
            // No IP options, not a fragment, TCP, and the length as stated.
            if p.len() < 20 || p[0] != 0x45 || p[9] != 6 || u16::from_be_bytes([p[2], p[3]]) as usize != p.len() {
                return None;
            }
            if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
                return None;
            }
            (false, 20)
        }
        6 => {
            if p.len() < 40 || p[6] != 6 || u16::from_be_bytes([p[4], p[5]]) as usize + 40 != p.len() {
                return None;
            }
            (true, 40)
        }
        _ => return None,
    };
    let tcp = p.get(ip_len..)?;
    if tcp.len() < 20 {
        return None;
    }
    let tcp_len = usize::from(tcp[12] >> 4) * 4;
    if tcp_len < 20 || tcp_len > tcp.len() {
        return None;
    }
    Some(Seg {
        v6,
        ip_len,
        tcp_len,
        payload: tcp.len() - tcp_len,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags: tcp[13],
    })
}

/// Whether `b` may follow `a` (the run's last packet) in a run started by `first`.
fn can_follow(buf: &[u8], first: &Packet, f: &Seg, a: &Seg, b_pkt: &Packet, b: &Seg, mss: usize) -> bool {
    if b.v6 != f.v6 || b.ip_len != f.ip_len || b.tcp_len != f.tcp_len || b.payload == 0 || b.payload > mss {
        return false;
    }
    // The run's last packet must be full-sized and carry no PSH.
    if a.payload != mss || a.flags & TCP_PSH != 0 {
        return false;
    }
    if b.seq != a.seq.wrapping_add(a.payload as u32) || b.flags & !(TCP_PSH) != TCP_ACK {
        return false;
    }
    let p = &buf[first.start..first.start + first.len];
    let q = &buf[b_pkt.start..b_pkt.start + b_pkt.len];
    let same_ip = if f.v6 {
        // Version, traffic class, flow label; addresses; hop limit.
        p[..4] == q[..4] && p[7] == q[7] && p[8..40] == q[8..40]
    } else {
        // TOS, flags (DF), TTL, protocol, addresses.
        p[1] == q[1] && p[6] & 0xe0 == q[6] & 0xe0 && p[8] == q[8] && p[12..20] == q[12..20]
    };
    let (tp, tq) = (&p[f.ip_len..], &q[f.ip_len..]);
    // Ports; ACK number; data offset, window; options.
    same_ip
        && tp[..4] == tq[..4]
        && tp[8..12] == tq[8..12]
        && tp[12] == tq[12]
        && tp[14..16] == tq[14..16]
        && tp[20..f.tcp_len] == tq[20..f.tcp_len]
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Groups `packets` (in arrival order) into runs and rewrites the first
/// packet of each run of two or more into the super-packet's headers.
/// Packets outside any run come out as runs of one.
pub fn coalesce(buf: &mut [u8], packets: &[Packet], out: &mut Vec<Group>) {
    out.clear();
    let mut i = 0;
    while i < packets.len() {
        let first = packets[i];
        let Some(f) = parse(&buf[first.start..first.start + first.len]) else {
            out.push(Group { first: i, count: 1, hdr: VirtioNetHdr::NONE, headers: 0 });
            i += 1;
            continue;
        };
        let mss = f.payload;
        let mut last = f;
        let mut total = f.payload;
        let mut j = i + 1;
        if f.flags & !(TCP_PSH) == TCP_ACK && f.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
            while j < packets.len() {
                let Some(s) = parse(&buf[packets[j].start..packets[j].start + packets[j].len]) else { break };
                if !can_follow(buf, &first, &f, &last, &packets[j], &s, mss)
                    || f.ip_len + f.tcp_len + total + s.payload > 65535
                {
                    break;
                }
                total += s.payload;
                last = s;
                j += 1;
            }
        }
        let count = j - i;
        if count == 1 {
            out.push(Group { first: i, count: 1, hdr: VirtioNetHdr::NONE, headers: 0 });
            i += 1;
            continue;
        }
        // Rewrite the first packet's headers for the whole run.
        let p = &mut buf[first.start..first.start + f.ip_len + f.tcp_len];
        let tcp_total = f.tcp_len + total;
        let pseudo = if f.v6 {
            p[4..6].copy_from_slice(&(tcp_total as u16).to_be_bytes());
            let acc = sum16(&p[8..40], 0);
            acc + tcp_total as u32 + 6
        } else {
            p[2..4].copy_from_slice(&((20 + tcp_total) as u16).to_be_bytes());
            p[10..12].fill(0);
            let c = !fold(sum16(&p[..20], 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
            sum16(&p[12..20], 0) + tcp_total as u32 + 6
        };
        let tcp = &mut p[f.ip_len..];
        tcp[13] |= last.flags & TCP_PSH;
        // With NEEDS_CSUM the checksum field holds the pseudo-header sum and
        // the kernel adds the rest.
        tcp[16..18].copy_from_slice(&fold(pseudo).to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: if f.v6 { VirtioNetHdr::GSO_TCPV6 } else { VirtioNetHdr::GSO_TCPV4 },
            hdr_len: (f.ip_len + f.tcp_len) as u16,
            gso_size: mss as u16,
            csum_start: f.ip_len as u16,
            csum_offset: 16,
        };
        out.push(Group { first: i, count, hdr, headers: f.ip_len + f.tcp_len });
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let total = 20 + 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&5000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&1000u16.to_be_bytes());
        t[20..].copy_from_slice(payload);
        p
    }

    fn layout(pkts: &[Vec<u8>]) -> (Vec<u8>, Vec<Packet>) {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for p in pkts {
            buf.extend_from_slice(&[0u8; 32]); // room like a transport header
            out.push(Packet { start: buf.len(), len: p.len() });
            buf.extend_from_slice(p);
            buf.extend_from_slice(&[0u8; 16]);
        }
        (buf, out)
    }

    /// Full TCP checksum of the super-packet as the kernel would complete it.
    fn full_checksum(ip: &[u8], payload_total: usize, payloads: &[&[u8]]) -> u16 {
        let mut acc = sum16(&ip[12..20], 0) + 6 + (20 + payload_total) as u32;
        let mut tcp = ip[20..40].to_vec();
        tcp[16..18].fill(0);
        acc = sum16(&tcp, acc);
        let all: Vec<u8> = payloads.concat();
        acc = sum16(&all, acc);
        !fold(acc)
    }

    #[test]
    fn merges_a_bulk_run_and_splits_at_psh_and_gaps() {
        let a = [1u8; 100];
        let pkts = vec![
            tcp4(1000, &a, TCP_ACK),
            tcp4(1100, &a, TCP_ACK),
            tcp4(1200, &a[..50], TCP_ACK | TCP_PSH),
            tcp4(5000, &a, TCP_ACK), // a gap: new run
            tcp4(5100, &a, TCP_ACK | TCP_FIN),
        ];
        let (mut buf, packets) = layout(&pkts);
        let mut groups = Vec::new();
        coalesce(&mut buf, &packets, &mut groups);
        assert_eq!(groups.len(), 3);
        assert_eq!((groups[0].first, groups[0].count), (0, 3));
        assert_eq!(groups[0].hdr.gso_size, 100);
        assert_eq!(groups[0].hdr.gso_type, VirtioNetHdr::GSO_TCPV4);
        assert_eq!((groups[1].first, groups[1].count), (3, 1));
        assert_eq!((groups[2].first, groups[2].count), (4, 1));
        let ip = &buf[packets[0].start..packets[0].start + 40];
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40 + 250);
        assert_eq!(crate::tun::internet_checksum(&ip[..20]), 0, "IPv4 header checksum valid");
        assert_eq!(ip[33] & TCP_PSH, TCP_PSH, "PSH of the last segment kept");
        // Completing the partial checksum over the merged payload gives the
        // true checksum of the super-packet.
        let partial = u16::from_be_bytes([ip[36], ip[37]]);
        let mut tcp = ip[20..40].to_vec();
        tcp[16..18].fill(0);
        let payload: Vec<u8> = [&a[..], &a[..], &a[..50]].concat();
        let completed = !fold(sum16(&payload, sum16(&tcp, u32::from(partial))));
        assert_eq!(completed, full_checksum(ip, 250, &[&payload]));
    }

    #[test]
    fn leaves_other_traffic_alone() {
        let a = [2u8; 64];
        let mut udp = tcp4(1, &a, TCP_ACK);
        udp[9] = 17;
        let pkts = vec![tcp4(1, &a, TCP_SYN), udp, tcp4(65, &a, TCP_ACK)];
        let (mut buf, packets) = layout(&pkts);
        let before = buf.clone();
        let mut groups = Vec::new();
        coalesce(&mut buf, &packets, &mut groups);
        assert!(groups.iter().all(|g| g.count == 1));
        assert_eq!(buf, before);
    }

    #[test]
    fn short_segment_ends_a_run() {
        let a = [3u8; 100];
        let pkts = vec![tcp4(0, &a[..60], TCP_ACK), tcp4(60, &a, TCP_ACK)];
        let (mut buf, packets) = layout(&pkts);
        let mut groups = Vec::new();
        coalesce(&mut buf, &packets, &mut groups);
        // The second is larger than the first (the would-be segment size).
        assert_eq!(groups.len(), 2);
    }
}
