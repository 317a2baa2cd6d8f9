//! STUN binding requests and responses (RFC 5389), the part a node needs to
//! learn its reflexive (public) address and a relay needs to tell it.
//!
//! Only the Binding method is spoken. A request carries a FINGERPRINT; a
//! success response carries XOR-MAPPED-ADDRESS (section 15.2) and a
//! FINGERPRINT (section 15.5). Parsing accepts any well-formed message,
//! checks every length against the buffer, verifies a FINGERPRINT when one
//! is present and reads XOR-MAPPED-ADDRESS or, from old servers,
//! MAPPED-ADDRESS. Nothing here allocates.
//!
//! STUN shares the UDP socket with WireGuard and disco probes; the three are
//! told apart by their first bytes (see [`is_stun`]): a STUN message starts
//! with two zero bits and carries the magic cookie at bytes 4..8, while a
//! WireGuard message starts with a type byte 1 to 4 followed by three zeros,
//! which no Binding message type (0x0001, 0x0101, 0x0111) matches.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie every RFC 5389 message carries (section 6).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// Length of a transaction ID.
pub const TRANSACTION_ID_LEN: usize = 12;
/// Length of a binding request as [`encode_binding_request`] writes it.
pub const BINDING_REQUEST_LEN: usize = HEADER_LEN + FINGERPRINT_ATTR_LEN;
/// The largest binding response [`encode_binding_response`] writes (IPv6).
pub const MAX_BINDING_RESPONSE_LEN: usize = HEADER_LEN + 4 + 20 + FINGERPRINT_ATTR_LEN;

const TYPE_BINDING_REQUEST: u16 = 0x0001;
const TYPE_BINDING_SUCCESS: u16 = 0x0101;
const TYPE_BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_ATTR_LEN: usize = 8;
/// XORed into the CRC-32 of a FINGERPRINT (section 15.5).
const FINGERPRINT_XOR: u32 = 0x5354_554e;
const FAMILY_V4: u8 = 0x01;
const FAMILY_V6: u8 = 0x02;

/// A STUN transaction ID: random, chosen by the requester, echoed by the server.
pub type TransactionId = [u8; TRANSACTION_ID_LEN];

/// Why bytes are not a usable STUN message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StunError {
    /// Shorter than the header, or the header's length runs past the buffer.
    Truncated,
    /// Not a STUN message: bad leading bits, magic cookie or unaligned length.
    NotStun,
    /// A STUN message of a method or class other than Binding request/response.
    UnsupportedType(u16),
    /// An attribute's length runs past the message.
    BadAttribute,
    /// An address attribute with an unknown family or the wrong length.
    BadAddress,
    /// The FINGERPRINT does not match the message.
    BadFingerprint,
    /// The caller's buffer is too small; `needed` bytes are required.
    BufferTooSmall {
        /// Bytes required.
        needed: usize,
    },
}

impl core::fmt::Display for StunError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StunError::Truncated => f.write_str("truncated STUN message"),
            StunError::NotStun => f.write_str("not a STUN message"),
            StunError::UnsupportedType(t) => write!(f, "unsupported STUN message type {t:#06x}"),
            StunError::BadAttribute => f.write_str("STUN attribute runs past the message"),
            StunError::BadAddress => f.write_str("malformed STUN address attribute"),
            StunError::BadFingerprint => f.write_str("STUN fingerprint mismatch"),
            StunError::BufferTooSmall { needed } => {
                write!(f, "buffer too small for STUN message: {needed} bytes needed")
            }
        }
    }
}

impl core::error::Error for StunError {}

/// The class of a Binding message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A Binding request.
    Request,
    /// A Binding success response.
    Success,
    /// A Binding error response.
    Error,
}

/// A parsed Binding message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// Request, success or error.
    pub class: Class,
    /// The transaction the message belongs to.
    pub transaction_id: TransactionId,
    /// The reflexive address a success response reports.
    pub mapped: Option<SocketAddr>,
    /// Whether a FINGERPRINT was present (and, being present, matched).
    pub fingerprint: bool,
}

/// Whether `buf` looks like a STUN Binding message (type and magic cookie),
/// the cheap test a driver makes before [`parse`]. No WireGuard message
/// passes it, whatever its index bytes.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN
        && matches!(be16(&buf[0..2]), TYPE_BINDING_REQUEST | TYPE_BINDING_SUCCESS | TYPE_BINDING_ERROR)
        && be32(&buf[4..8]) == MAGIC_COOKIE
}

/// Writes a Binding request with `transaction_id` and a FINGERPRINT into `buf`
/// and returns its length ([`BINDING_REQUEST_LEN`]).
pub fn encode_binding_request(transaction_id: &TransactionId, buf: &mut [u8]) -> Result<usize, StunError> {
    if buf.len() < BINDING_REQUEST_LEN {
        return Err(StunError::BufferTooSmall { needed: BINDING_REQUEST_LEN });
    }
    write_header(buf, TYPE_BINDING_REQUEST, 0, transaction_id);
    Ok(append_fingerprint(buf, HEADER_LEN))
}

/// Writes a Binding success response telling the requester its address
/// `mapped` (as XOR-MAPPED-ADDRESS) with a FINGERPRINT; returns its length.
pub fn encode_binding_response(
    transaction_id: &TransactionId,
    mapped: SocketAddr,
    buf: &mut [u8],
) -> Result<usize, StunError> {
    let addr_len = match mapped {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    };
    let needed = HEADER_LEN + 4 + addr_len + FINGERPRINT_ATTR_LEN;
    if buf.len() < needed {
        return Err(StunError::BufferTooSmall { needed });
    }
    write_header(buf, TYPE_BINDING_SUCCESS, 0, transaction_id);
    let a = &mut buf[HEADER_LEN..HEADER_LEN + 4 + addr_len];
    a[0..2].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    a[2..4].copy_from_slice(&(addr_len as u16).to_be_bytes());
    a[4] = 0;
    a[6..8].copy_from_slice(&(mapped.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match mapped.ip() {
        IpAddr::V4(ip) => {
            a[5] = FAMILY_V4;
            a[8..12].copy_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            a[5] = FAMILY_V6;
            let mask = xor_mask(transaction_id);
            for (i, b) in ip.octets().iter().enumerate() {
                a[8 + i] = b ^ mask[i];
            }
        }
    }
    Ok(append_fingerprint(buf, HEADER_LEN + 4 + addr_len))
}

/// Parses a Binding message, checking every length against `buf`.
pub fn parse(buf: &[u8]) -> Result<Message, StunError> {
    if buf.len() < HEADER_LEN {
        return Err(StunError::Truncated);
    }
    let msg_type = be16(&buf[0..2]);
    let body_len = usize::from(be16(&buf[2..4]));
    if buf[0] & 0xc0 != 0 || be32(&buf[4..8]) != MAGIC_COOKIE || body_len % 4 != 0 {
        return Err(StunError::NotStun);
    }
    if buf.len() < HEADER_LEN + body_len {
        return Err(StunError::Truncated);
    }
    let class = match msg_type {
        TYPE_BINDING_REQUEST => Class::Request,
        TYPE_BINDING_SUCCESS => Class::Success,
        TYPE_BINDING_ERROR => Class::Error,
        other => return Err(StunError::UnsupportedType(other)),
    };
    let mut transaction_id = [0u8; TRANSACTION_ID_LEN];
    transaction_id.copy_from_slice(&buf[8..HEADER_LEN]);
    let msg = &buf[..HEADER_LEN + body_len];
    let mut xor_mapped = None;
    let mut mapped = None;
    let mut fingerprint = false;
    let mut at = HEADER_LEN;
    while at < msg.len() {
        if msg.len() - at < 4 {
            return Err(StunError::BadAttribute);
        }
        let attr = be16(&msg[at..at + 2]);
        let len = usize::from(be16(&msg[at + 2..at + 4]));
        let padded = (len + 3) & !3;
        if msg.len() - at - 4 < padded {
            return Err(StunError::BadAttribute);
        }
        let value = &msg[at + 4..at + 4 + len];
        match attr {
            ATTR_XOR_MAPPED_ADDRESS if xor_mapped.is_none() => {
                xor_mapped = Some(parse_address(value, Some(&transaction_id))?)
            }
            ATTR_MAPPED_ADDRESS if mapped.is_none() => mapped = Some(parse_address(value, None)?),
            ATTR_FINGERPRINT => {
                // The FINGERPRINT is the last attribute (section 15.5).
                if len != 4 || at + FINGERPRINT_ATTR_LEN != msg.len() {
                    return Err(StunError::BadAttribute);
                }
                if crc32(&msg[..at]) ^ FINGERPRINT_XOR != be32(value) {
                    return Err(StunError::BadFingerprint);
                }
                fingerprint = true;
            }
            _ => {}
        }
        at += 4 + padded;
    }
    Ok(Message { class, transaction_id, mapped: xor_mapped.or(mapped), fingerprint })
}

fn parse_address(value: &[u8], xor_with: Option<&TransactionId>) -> Result<SocketAddr, StunError> {
    if value.len() < 4 {
        return Err(StunError::BadAddress);
    }
    let mut port = be16(&value[2..4]);
    if xor_with.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match (value[1], value.len()) {
        (FAMILY_V4, 8) => {
            let mut v = be32(&value[4..8]);
            if xor_with.is_some() {
                v ^= MAGIC_COOKIE;
            }
            IpAddr::V4(Ipv4Addr::from(v))
        }
        (FAMILY_V6, 20) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&value[4..20]);
            if let Some(tx) = xor_with {
                let mask = xor_mask(tx);
                for (b, m) in o.iter_mut().zip(mask) {
                    *b ^= m;
                }
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(StunError::BadAddress),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The magic cookie followed by the transaction ID: what an IPv6
/// XOR-MAPPED-ADDRESS is XORed with (section 15.2).
fn xor_mask(tx: &TransactionId) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[4..].copy_from_slice(tx);
    m
}

fn write_header(buf: &mut [u8], msg_type: u16, body_len: u16, tx: &TransactionId) {
    buf[0..2].copy_from_slice(&msg_type.to_be_bytes());
    buf[2..4].copy_from_slice(&body_len.to_be_bytes());
    buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    buf[8..HEADER_LEN].copy_from_slice(tx);
}

/// Appends a FINGERPRINT after `buf[..len]`, fixing up the header length to
/// include it first as the RFC requires; returns the new length.
fn append_fingerprint(buf: &mut [u8], len: usize) -> usize {
    let body = (len - HEADER_LEN + FINGERPRINT_ATTR_LEN) as u16;
    buf[2..4].copy_from_slice(&body.to_be_bytes());
    let crc = crc32(&buf[..len]) ^ FINGERPRINT_XOR;
    buf[len..len + 2].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    buf[len + 2..len + 4].copy_from_slice(&4u16.to_be_bytes());
    buf[len + 4..len + 8].copy_from_slice(&crc.to_be_bytes());
    len + FINGERPRINT_ATTR_LEN
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// CRC-32 (ISO 3309, the polynomial STUN's FINGERPRINT names).
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    /// RFC 5769 section 2.2: a sample IPv4 response (with SOFTWARE and
    /// MESSAGE-INTEGRITY, which are skipped) whose XOR-MAPPED-ADDRESS is
    /// 192.0.2.1:32853 and whose FINGERPRINT must verify.
    #[test]
    fn rfc5769_ipv4_response() {
        let msg: [u8; 80] = [
            0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87,
            0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72, 0x20,
            0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91,
            0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7,
            0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
        ];
        let m = parse(&msg).unwrap();
        assert_eq!(m.class, Class::Success);
        assert!(m.fingerprint);
        assert_eq!(m.mapped, Some("192.0.2.1:32853".parse().unwrap()));
        let mut bad = msg;
        bad[30] ^= 1;
        assert_eq!(parse(&bad), Err(StunError::BadFingerprint));
    }

    /// RFC 5769 section 2.3: the IPv6 sample response.
    #[test]
    fn rfc5769_ipv6_response() {
        let msg: [u8; 92] = [
            0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87,
            0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72, 0x20,
            0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25,
            0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9, 0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1,
            0x17, 0x84, 0xc9, 0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
            0x0b, 0x4c,
        ];
        let m = parse(&msg).unwrap();
        assert!(m.fingerprint);
        assert_eq!(m.mapped, Some("[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap()));
    }

    #[test]
    fn request_and_response_round_trip() {
        let tx = [7u8; 12];
        let mut buf = [0u8; 64];
        let n = encode_binding_request(&tx, &mut buf).unwrap();
        assert_eq!(n, BINDING_REQUEST_LEN);
        assert!(is_stun(&buf[..n]));
        let m = parse(&buf[..n]).unwrap();
        assert_eq!((m.class, m.transaction_id, m.mapped, m.fingerprint), (Class::Request, tx, None, true));
        for addr in ["203.0.113.9:4242", "[2001:db8::1]:65535"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let n = encode_binding_response(&tx, addr, &mut buf).unwrap();
            let m = parse(&buf[..n]).unwrap();
            assert_eq!((m.class, m.mapped, m.fingerprint), (Class::Success, Some(addr), true));
        }
    }

    #[test]
    fn lengths_checked() {
        let tx = [1u8; 12];
        let mut small = [0u8; 27];
        assert_eq!(encode_binding_request(&tx, &mut small), Err(StunError::BufferTooSmall { needed: 28 }));
        let mut buf = [0u8; 64];
        let n = encode_binding_response(&tx, "[::1]:1".parse().unwrap(), &mut buf).unwrap();
        for cut in 0..n {
            assert!(parse(&buf[..cut]).is_err(), "cut at {cut}");
        }
        // An attribute length running past the message.
        let mut b = [0u8; 64];
        let n = encode_binding_request(&tx, &mut b).unwrap();
        b[HEADER_LEN + 3] = 200;
        assert_eq!(parse(&b[..n]), Err(StunError::BadAttribute));
    }

    #[test]
    fn wireguard_is_not_stun() {
        for t in 1u8..=4 {
            let mut m = [0u8; 148];
            m[0] = t;
            m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            // Type 1..4 followed by zeros never matches a Binding type.
            assert!(!is_stun(&m));
            assert!(parse(&m).is_err());
        }
    }
}
