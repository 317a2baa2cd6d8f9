//! Segmentation tests. Checksums are verified with a deliberately naive
//! byte-at-a-time implementation written here, independent of `checksum.rs`.

use super::*;

const HEADROOM: usize = 16;
const FILL: u8 = 0xaa;

/// The one's complement sum of `data` as 16-bit big-endian words, one byte
/// at a time.
fn naive_sum(data: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in data.iter().enumerate() {
        sum += if i % 2 == 0 { u32::from(b) << 8 } else { u32::from(b) };
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Whether bytes including their checksum field sum to all ones.
fn checksum_ok(data: &[u8]) -> bool {
    naive_sum(data) == 0xffff
}

/// The L4 checksum check with an explicitly built pseudo-header.
fn l4_checksum_ok(packet: &[u8], l4_start: usize, protocol: u8) -> bool {
    let l4 = &packet[l4_start..];
    let mut pseudo = Vec::new();
    if packet[0] >> 4 == 4 {
        pseudo.extend_from_slice(&packet[12..20]);
        pseudo.extend_from_slice(&[0, protocol]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    } else {
        pseudo.extend_from_slice(&packet[8..40]);
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, protocol]);
    }
    pseudo.extend_from_slice(l4);
    checksum_ok(&pseudo)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn ipv4_header(protocol: u8, total: usize) -> Vec<u8> {
    let mut h = vec![0x45, 0x00];
    h.extend_from_slice(&(total.min(65535) as u16).to_be_bytes());
    h.extend_from_slice(&[0xff, 0xfe, 0x40, 0x00, 64, protocol, 0xde, 0xad]);
    h.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    h
}

fn ipv6_header(next_header: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0x01, 0x23, 0x45];
    h.extend_from_slice(&(payload_len.min(65535) as u16).to_be_bytes());
    h.extend_from_slice(&[next_header, 64]);
    h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h
}

const TCP_SEQ: u32 = 0xffff_f000;
const TCP_FLAGS: u8 = 0x10 | 0x08 | 0x01 | 0x80; // ACK PSH FIN CWR

/// A 32-byte TCP header (with a timestamp option) and a junk checksum.
fn tcp_header() -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&40000u16.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h.extend_from_slice(&TCP_SEQ.to_be_bytes());
    h.extend_from_slice(&5u32.to_be_bytes());
    h.extend_from_slice(&[8 << 4, TCP_FLAGS, 0xff, 0xff, 0x12, 0x34, 0, 0]);
    h.extend_from_slice(&[1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8]);
    h
}

fn udp_header() -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&5353u16.to_be_bytes());
    h.extend_from_slice(&51820u16.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    h
}

/// The pseudo-header sum the kernel leaves in a partial checksum field.
fn partial_checksum(packet: &mut [u8], l4_start: usize, field: usize, protocol: u8) {
    let l4_len = packet.len() - l4_start;
    let mut pseudo = Vec::new();
    if packet[0] >> 4 == 4 {
        pseudo.extend_from_slice(&packet[12..20]);
    } else {
        pseudo.extend_from_slice(&packet[8..40]);
    }
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(l4_len as u32).to_be_bytes());
    let sum = naive_sum(&pseudo) as u16;
    packet[l4_start + field..l4_start + field + 2].copy_from_slice(&sum.to_be_bytes());
}

struct Super {
    hdr: VirtioNetHdr,
    packet: Vec<u8>,
    l4_start: usize,
    headers: usize,
    payload: Vec<u8>,
}

fn tcp_super(ipv6: bool, extension: bool, payload_len: usize, mss: u16) -> Super {
    let tcp = tcp_header();
    let data = payload(payload_len);
    let ext: &[u8] = if extension { &[6, 0, 1, 4, 0, 0, 0, 0] } else { &[] };
    let mut packet = if ipv6 {
        let next = if extension { 0 } else { 6 };
        ipv6_header(next, ext.len() + tcp.len() + data.len())
    } else {
        ipv4_header(6, 20 + tcp.len() + data.len())
    };
    packet.extend_from_slice(ext);
    let l4_start = packet.len();
    packet.extend_from_slice(&tcp);
    let headers = packet.len();
    packet.extend_from_slice(&data);
    partial_checksum(&mut packet, l4_start, 16, 6);
    let hdr = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: if ipv6 { VirtioNetHdr::GSO_TCPV6 } else { VirtioNetHdr::GSO_TCPV4 },
        hdr_len: headers as u16,
        gso_size: mss,
        csum_start: l4_start as u16,
        csum_offset: 16,
    };
    Super { hdr, packet, l4_start, headers, payload: data }
}

fn udp_super(ipv6: bool, payload_len: usize, size: u16) -> Super {
    let data = payload(payload_len);
    let mut packet = if ipv6 { ipv6_header(17, 8 + data.len()) } else { ipv4_header(17, 28 + data.len()) };
    let l4_start = packet.len();
    packet.extend_from_slice(&udp_header());
    let headers = packet.len();
    packet.extend_from_slice(&data);
    let udp_len = (packet.len() - l4_start).min(65535) as u16;
    packet[l4_start + 4..l4_start + 6].copy_from_slice(&udp_len.to_be_bytes());
    partial_checksum(&mut packet, l4_start, 6, 17);
    let hdr = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_UDP_L4,
        hdr_len: headers as u16,
        gso_size: size,
        csum_start: l4_start as u16,
        csum_offset: 6,
    };
    Super { hdr, packet, l4_start, headers, payload: data }
}

fn buffers(n: usize) -> Vec<Vec<u8>> {
    vec![vec![FILL; HEADROOM + 1600]; n]
}

/// Splits and checks everything that holds for every segment; returns them.
fn split_and_check(s: &Super) -> Vec<Vec<u8>> {
    let expected = segment_count(&s.hdr, &s.packet).unwrap();
    let mut out = buffers(expected + 2);
    let mut sizes = vec![0; expected + 2];
    let n = split(&s.hdr, &s.packet, HEADROOM, &mut out, &mut sizes).unwrap();
    assert_eq!(n, expected);
    let mss = usize::from(s.hdr.gso_size);
    let mut rebuilt = Vec::new();
    let mut segments = Vec::new();
    for (i, (buf, &size)) in out.iter().zip(&sizes).take(n).enumerate() {
        assert!(buf[..HEADROOM].iter().all(|&b| b == FILL), "headroom touched");
        assert!(buf[HEADROOM + size..].iter().all(|&b| b == FILL), "tail touched");
        let seg = buf[HEADROOM..HEADROOM + size].to_vec();
        let data = &seg[s.headers..];
        assert!(data.len() <= mss);
        if i + 1 < n {
            assert_eq!(data.len(), mss);
        }
        rebuilt.extend_from_slice(data);
        // Headers other than the rewritten fields are copied verbatim.
        assert_eq!(seg[s.l4_start..s.l4_start + 4], s.packet[s.l4_start..s.l4_start + 4]);
        if seg[0] >> 4 == 4 {
            assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), size);
            let id = u16::from_be_bytes([seg[4], seg[5]]);
            assert_eq!(id, 0xfffeu16.wrapping_add(i as u16), "IPv4 ID");
            assert!(checksum_ok(&seg[..20]), "IPv4 header checksum");
            assert_eq!(seg[6..10], s.packet[6..10]);
            assert_eq!(seg[12..20], s.packet[12..20]);
        } else {
            assert_eq!(usize::from(u16::from_be_bytes([seg[4], seg[5]])), size - 40);
            assert_eq!(seg[..4], s.packet[..4]);
            assert_eq!(seg[6..s.l4_start], s.packet[6..s.l4_start]);
        }
        segments.push(seg);
    }
    assert_eq!(rebuilt, s.payload, "payload reassembles");
    assert_eq!(sizes[n..], [0, 0], "extra sizes untouched");
    segments
}

fn check_tcp(s: &Super, segments: &[Vec<u8>]) {
    let mss = u32::from(s.hdr.gso_size);
    let n = segments.len();
    for (i, seg) in segments.iter().enumerate() {
        let t = &seg[s.l4_start..];
        let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        assert_eq!(seq, TCP_SEQ.wrapping_add(i as u32 * mss), "sequence number of {i}");
        let flags = t[13];
        assert_eq!(flags & 0x10, 0x10, "ACK everywhere");
        assert_eq!(flags & 0x09 != 0, i + 1 == n, "FIN/PSH only last ({i})");
        if i + 1 == n {
            assert_eq!(flags & 0x09, 0x09);
        }
        assert_eq!(flags & 0x80 != 0, i == 0, "CWR only first ({i})");
        // Ports, ack, offset, window, urgent pointer and options unchanged.
        assert_eq!(t[8..13], s.packet[s.l4_start + 8..s.l4_start + 13]);
        assert_eq!(t[14..16], s.packet[s.l4_start + 14..s.l4_start + 16]);
        assert_eq!(t[18..32], s.packet[s.l4_start + 18..s.l4_start + 32]);
        assert!(l4_checksum_ok(seg, s.l4_start, 6), "TCP checksum of {i}");
    }
}

fn check_udp(s: &Super, segments: &[Vec<u8>]) {
    for (i, seg) in segments.iter().enumerate() {
        let u = &seg[s.l4_start..];
        assert_eq!(usize::from(u16::from_be_bytes([u[4], u[5]])), u.len(), "UDP length");
        assert_eq!(u[..4], s.packet[s.l4_start..s.l4_start + 4]);
        assert_ne!(u[6..8], [0, 0], "a computed UDP checksum is never 0");
        assert!(l4_checksum_ok(seg, s.l4_start, 17), "UDP checksum of {i}");
    }
}

#[test]
fn tso_ipv4() {
    let s = tcp_super(false, false, 10_000, 1448);
    let segments = split_and_check(&s);
    assert_eq!(segments.len(), 7);
    assert_eq!(segments[6].len(), 20 + 32 + 10_000 - 6 * 1448);
    check_tcp(&s, &segments);
}

#[test]
fn tso_ipv6_with_and_without_extension_header() {
    for extension in [false, true] {
        let s = tcp_super(true, extension, 65_000, 1220);
        let segments = split_and_check(&s);
        assert_eq!(segments.len(), 65_000usize.div_ceil(1220));
        check_tcp(&s, &segments);
    }
}

#[test]
fn tso_exact_multiple_small_and_empty() {
    let s = tcp_super(false, false, 2 * 1000, 1000);
    let segments = split_and_check(&s);
    assert_eq!(segments.len(), 2);
    check_tcp(&s, &segments);

    let s = tcp_super(true, false, 10, 1000);
    let segments = split_and_check(&s);
    assert_eq!(segments.len(), 1);
    check_tcp(&s, &segments);

    // Headers only: one segment, which keeps FIN, PSH and CWR.
    let s = tcp_super(false, false, 0, 1000);
    let segments = split_and_check(&s);
    assert_eq!(segments.len(), 1);
    check_tcp(&s, &segments);
}

#[test]
fn tso_ecn_flag_is_accepted() {
    let mut s = tcp_super(false, false, 5000, 1400);
    s.hdr.gso_type |= VirtioNetHdr::GSO_ECN;
    let segments = split_and_check(&s);
    check_tcp(&s, &segments);
}

#[test]
fn uso_ipv4_and_ipv6() {
    for ipv6 in [false, true] {
        let s = udp_super(ipv6, 3000, 1200);
        let segments = split_and_check(&s);
        assert_eq!(segments.len(), 3);
        assert_eq!(segments[2].len(), s.headers + 600);
        check_udp(&s, &segments);
    }
}

#[test]
fn non_gso_partial_checksums_are_completed() {
    // TCP over IPv4, completed in place.
    let mut s = tcp_super(false, false, 777, 0);
    s.hdr.gso_type = VirtioNetHdr::GSO_NONE;
    let mut packet = s.packet.clone();
    complete_checksum(&s.hdr, &mut packet).unwrap();
    assert!(l4_checksum_ok(&packet, s.l4_start, 6));
    assert_eq!(packet[..s.l4_start + 16], s.packet[..s.l4_start + 16]);
    assert_eq!(packet[s.l4_start + 18..], s.packet[s.l4_start + 18..]);

    // And through `split`, which copies it after the headroom.
    let mut out = buffers(1);
    let mut sizes = [0];
    assert_eq!(split(&s.hdr, &s.packet, HEADROOM, &mut out, &mut sizes), Ok(1));
    assert_eq!(out[0][HEADROOM..HEADROOM + sizes[0]], packet);

    // UDP over IPv6.
    let mut s = udp_super(true, 100, 0);
    s.hdr.gso_type = VirtioNetHdr::GSO_NONE;
    let mut packet = s.packet.clone();
    complete_checksum(&s.hdr, &mut packet).unwrap();
    assert!(l4_checksum_ok(&packet, s.l4_start, 17));

    // Without F_NEEDS_CSUM nothing changes.
    let mut untouched = s.packet.clone();
    complete_checksum(&VirtioNetHdr::NONE, &mut untouched).unwrap();
    assert_eq!(untouched, s.packet);
    assert_eq!(segment_count(&VirtioNetHdr::NONE, &s.packet), Ok(1));
}

#[test]
fn a_zero_udp_checksum_is_sent_as_ffff() {
    // Find a payload whose UDP checksum computes to zero, then check both
    // paths send 0xffff.
    let mut s = udp_super(false, 2, 0);
    s.hdr.gso_type = VirtioNetHdr::GSO_NONE;
    let n = s.packet.len();
    for word in 0..=u16::MAX {
        let mut packet = s.packet.clone();
        packet[n - 2..].copy_from_slice(&word.to_be_bytes());
        partial_checksum(&mut packet, s.l4_start, 6, 17);
        complete_checksum(&s.hdr, &mut packet).unwrap();
        if packet[s.l4_start + 6..s.l4_start + 8] == [0xff, 0xff] {
            assert!(l4_checksum_ok(&packet, s.l4_start, 17));
            let mut gso = s.hdr;
            gso.gso_type = VirtioNetHdr::GSO_UDP_L4;
            gso.gso_size = 100;
            let mut out = buffers(1);
            let mut sizes = [0];
            split(&gso, &packet, 0, &mut out, &mut sizes).unwrap();
            assert_eq!(out[0][s.l4_start + 6..s.l4_start + 8], [0xff, 0xff]);
            return;
        }
    }
    panic!("no payload gives a zero checksum");
}

#[test]
fn small_outputs_are_errors_and_write_nothing() {
    let s = tcp_super(false, false, 10_000, 1448);
    let mut out = buffers(6);
    let mut sizes = [0; 7];
    assert_eq!(split(&s.hdr, &s.packet, HEADROOM, &mut out, &mut sizes), Err(GsoError::TooFewBuffers { needed: 7 }));
    let mut out = buffers(7);
    out[3].truncate(HEADROOM + 1000);
    assert_eq!(
        split(&s.hdr, &s.packet, HEADROOM, &mut out, &mut sizes),
        Err(GsoError::BufferTooSmall { needed: HEADROOM + 52 + 1448 })
    );
    assert!(out.iter().all(|b| b.iter().all(|&x| x == FILL)), "nothing written");
    assert_eq!(sizes, [0; 7]);

    let mut small = [vec![0u8; 10]];
    assert_eq!(
        split(&VirtioNetHdr::NONE, &s.packet, 4, &mut small, &mut sizes),
        Err(GsoError::BufferTooSmall { needed: 4 + s.packet.len() })
    );
    assert!(GsoError::BufferTooSmall { needed: 3 }.to_string().contains('3'));
}

#[test]
fn malformed_packets_are_refused() {
    let s = tcp_super(false, false, 3000, 1000);
    let mut out = buffers(4);
    let mut sizes = [0; 4];
    let mut attempt = |hdr: VirtioNetHdr, packet: &[u8]| split(&hdr, packet, 0, &mut out, &mut sizes);

    let with = |f: &dyn Fn(&mut VirtioNetHdr)| {
        let mut h = s.hdr;
        f(&mut h);
        h
    };
    let malformed = |r: Result<usize, GsoError>| matches!(r, Err(GsoError::Malformed(_)));
    assert!(malformed(attempt(with(&|h| h.gso_size = 0), &s.packet)));
    assert!(malformed(attempt(with(&|h| h.csum_start = 10), &s.packet)));
    assert!(malformed(attempt(with(&|h| h.csum_start = 60_000), &s.packet)));
    assert!(malformed(attempt(with(&|h| h.gso_type = VirtioNetHdr::GSO_TCPV6), &s.packet)));
    assert!(malformed(attempt(with(&|h| h.gso_type = VirtioNetHdr::GSO_UDP_L4), &s.packet)));
    assert_eq!(
        attempt(with(&|h| h.gso_type = VirtioNetHdr::GSO_UDP), &s.packet),
        Err(GsoError::Unsupported { gso_type: VirtioNetHdr::GSO_UDP })
    );
    assert!(malformed(attempt(s.hdr, &[])));
    assert!(malformed(attempt(s.hdr, &s.packet[..30])));
    let mut bad = s.packet.clone();
    bad[20 + 12] = 4 << 4; // TCP data offset 16 bytes
    assert!(malformed(attempt(s.hdr, &bad)));
    let mut bad = s.packet.clone();
    bad[0] = 0x44; // IHL 16 bytes
    assert!(malformed(attempt(s.hdr, &bad)));
    let mut bad = s.packet.clone();
    bad[0] = 0x55; // version 5
    assert!(malformed(attempt(s.hdr, &bad)));
    let mut no_csum = s.hdr;
    no_csum.gso_type = VirtioNetHdr::GSO_NONE;
    no_csum.csum_offset = 60_000;
    let mut packet = s.packet.clone();
    assert!(malformed(complete_checksum(&no_csum, &mut packet).map(|()| 0)));
}

#[test]
fn offload_fallbacks() {
    let order: Vec<Offloads> = Offloads::ALL.fallbacks().collect();
    assert_eq!(
        order,
        [Offloads::ALL, Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6, Offloads::CSUM, Offloads::NONE]
    );
    // Segmentation alone gets the checksum offload it depends on.
    let order: Vec<Offloads> = Offloads::TSO4.fallbacks().collect();
    assert_eq!(order, [Offloads::CSUM | Offloads::TSO4, Offloads::CSUM, Offloads::NONE]);
    assert_eq!(Offloads::NONE.fallbacks().collect::<Vec<_>>(), [Offloads::NONE]);
    assert_eq!(Offloads::ALL.to_string(), "csum|tso4|tso6|uso4|uso6");
    assert_eq!(Offloads::NONE.to_string(), "none");
}

#[test]
fn names_are_checked() {
    for bad in ["0123456789abcdef", "a/b", "a b", "a:b", "..", "a\0b"] {
        assert!(matches!(Tun::create(bad, &Options::default()), Err(TunError::InvalidName(_))));
    }
    assert_eq!(TunError::Exists("wg0".into()).to_string(), "interface wg0 already exists");
    let missing = TunError::Missing(io::Error::from_raw_os_error(libc::ENOENT));
    assert!(missing.to_string().starts_with("TUN is missing"));
    let eperm = TunError::NeedsCapNetAdmin("wg0".into(), io::Error::from_raw_os_error(libc::EPERM));
    assert!(eperm.to_string().contains("needs CAP_NET_ADMIN"));
}
