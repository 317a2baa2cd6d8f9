//! The four WireGuard message formats (paper 5.4.2 to 5.4.7), apart from any
//! protocol state: fixed layouts, little-endian integers, a 4-byte type field
//! whose upper three bytes must be zero.

use crate::crypto::{KEY_LEN, MAC_LEN, TAG_LEN, XNONCE_LEN};

/// Type field of a handshake initiation.
pub const TYPE_INITIATION: u8 = 1;
/// Type field of a handshake response.
pub const TYPE_RESPONSE: u8 = 2;
/// Type field of a cookie reply.
pub const TYPE_COOKIE_REPLY: u8 = 3;
/// Type field of a transport data message.
pub const TYPE_TRANSPORT: u8 = 4;

/// Size of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Size of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Size of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Size of a transport message's header (type, receiver, counter).
pub const TRANSPORT_HEADER_LEN: usize = 16;
/// Size of the smallest transport message (a keepalive: header and tag).
pub const TRANSPORT_MIN_LEN: usize = TRANSPORT_HEADER_LEN + TAG_LEN;
/// Transport plaintext is padded to a multiple of this (paper 5.4.6).
pub const PADDING_MULTIPLE: usize = 16;

/// Extra bytes a transport message adds to a plaintext packet, besides padding.
pub const TRANSPORT_OVERHEAD: usize = TRANSPORT_HEADER_LEN + TAG_LEN;

/// Why a datagram could not be parsed as a WireGuard message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// The datagram is shorter than four bytes or its type is unknown, or the
    /// reserved bytes are not zero.
    UnknownType,
    /// The length does not match the message type's layout.
    BadLength {
        /// The message type named by the first byte.
        message_type: u8,
        /// The datagram's length.
        len: usize,
    },
}

impl core::fmt::Display for ParseError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ParseError::UnknownType => f.write_str("unknown message type"),
            ParseError::BadLength { message_type, len } => {
                write!(f, "message type {message_type} with invalid length {len}")
            }
        }
    }
}

impl core::error::Error for ParseError {}

/// A datagram classified by its type and checked for its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// A 148-byte handshake initiation.
    Initiation,
    /// A 92-byte handshake response.
    Response,
    /// A 64-byte cookie reply.
    CookieReply,
    /// A transport message of at least 32 bytes.
    Transport,
}

/// Classifies a datagram by its 4-byte type field and checks its length.
pub fn classify(datagram: &[u8]) -> Result<MessageKind, ParseError> {
    if datagram.len() < 4 || datagram[1..4] != [0, 0, 0] {
        return Err(ParseError::UnknownType);
    }
    let t = datagram[0];
    let (kind, ok) = match t {
        TYPE_INITIATION => (MessageKind::Initiation, datagram.len() == INITIATION_LEN),
        TYPE_RESPONSE => (MessageKind::Response, datagram.len() == RESPONSE_LEN),
        TYPE_COOKIE_REPLY => (MessageKind::CookieReply, datagram.len() == COOKIE_REPLY_LEN),
        TYPE_TRANSPORT => (MessageKind::Transport, datagram.len() >= TRANSPORT_MIN_LEN),
        _ => return Err(ParseError::UnknownType),
    };
    if ok {
        Ok(kind)
    } else {
        Err(ParseError::BadLength { message_type: t, len: datagram.len() })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

fn header(out: &mut [u8], t: u8) {
    out[0] = t;
    out[1..4].fill(0);
}

/// A handshake initiation (paper 5.4.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Initiation {
    /// The initiator's receiver index for this handshake.
    pub sender: u32,
    /// The initiator's ephemeral public key.
    pub ephemeral: [u8; KEY_LEN],
    /// The initiator's static public key, sealed.
    pub encrypted_static: [u8; KEY_LEN + TAG_LEN],
    /// The TAI64N timestamp, sealed.
    pub encrypted_timestamp: [u8; 12 + TAG_LEN],
    /// MAC1 over the bytes before it.
    pub mac1: [u8; MAC_LEN],
    /// MAC2 (a cookie MAC) or zeros.
    pub mac2: [u8; MAC_LEN],
}

impl Initiation {
    /// Offset of MAC1: the bytes MAC1 covers.
    pub const MAC1_OFFSET: usize = INITIATION_LEN - 2 * MAC_LEN;

    /// Parses a 148-byte initiation.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        if classify(b)? != MessageKind::Initiation {
            return Err(ParseError::UnknownType);
        }
        Ok(Initiation {
            sender: u32_at(b, 4),
            ephemeral: array_at(b, 8),
            encrypted_static: array_at(b, 40),
            encrypted_timestamp: array_at(b, 88),
            mac1: array_at(b, 116),
            mac2: array_at(b, 132),
        })
    }

    /// Writes the 148-byte initiation into `out[..148]`.
    pub fn emit(&self, out: &mut [u8; INITIATION_LEN]) {
        header(out, TYPE_INITIATION);
        out[4..8].copy_from_slice(&self.sender.to_le_bytes());
        out[8..40].copy_from_slice(&self.ephemeral);
        out[40..88].copy_from_slice(&self.encrypted_static);
        out[88..116].copy_from_slice(&self.encrypted_timestamp);
        out[116..132].copy_from_slice(&self.mac1);
        out[132..148].copy_from_slice(&self.mac2);
    }
}

/// A handshake response (paper 5.4.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The responder's receiver index.
    pub sender: u32,
    /// The initiator's index this answers.
    pub receiver: u32,
    /// The responder's ephemeral public key.
    pub ephemeral: [u8; KEY_LEN],
    /// An empty plaintext, sealed: proves knowledge of the keys.
    pub encrypted_nothing: [u8; TAG_LEN],
    /// MAC1 over the bytes before it.
    pub mac1: [u8; MAC_LEN],
    /// MAC2 or zeros.
    pub mac2: [u8; MAC_LEN],
}

impl Response {
    /// Offset of MAC1.
    pub const MAC1_OFFSET: usize = RESPONSE_LEN - 2 * MAC_LEN;

    /// Parses a 92-byte response.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        if classify(b)? != MessageKind::Response {
            return Err(ParseError::UnknownType);
        }
        Ok(Response {
            sender: u32_at(b, 4),
            receiver: u32_at(b, 8),
            ephemeral: array_at(b, 12),
            encrypted_nothing: array_at(b, 44),
            mac1: array_at(b, 60),
            mac2: array_at(b, 76),
        })
    }

    /// Writes the 92-byte response.
    pub fn emit(&self, out: &mut [u8; RESPONSE_LEN]) {
        header(out, TYPE_RESPONSE);
        out[4..8].copy_from_slice(&self.sender.to_le_bytes());
        out[8..12].copy_from_slice(&self.receiver.to_le_bytes());
        out[12..44].copy_from_slice(&self.ephemeral);
        out[44..60].copy_from_slice(&self.encrypted_nothing);
        out[60..76].copy_from_slice(&self.mac1);
        out[76..92].copy_from_slice(&self.mac2);
    }
}

/// A cookie reply (paper 5.4.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieReply {
    /// The index of the handshake message this answers (its sender field).
    pub receiver: u32,
    /// A random nonce.
    pub nonce: [u8; XNONCE_LEN],
    /// The 16-byte cookie, sealed.
    pub encrypted_cookie: [u8; MAC_LEN + TAG_LEN],
}

impl CookieReply {
    /// Parses a 64-byte cookie reply.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        if classify(b)? != MessageKind::CookieReply {
            return Err(ParseError::UnknownType);
        }
        Ok(CookieReply { receiver: u32_at(b, 4), nonce: array_at(b, 8), encrypted_cookie: array_at(b, 32) })
    }

    /// Writes the 64-byte cookie reply.
    pub fn emit(&self, out: &mut [u8; COOKIE_REPLY_LEN]) {
        header(out, TYPE_COOKIE_REPLY);
        out[4..8].copy_from_slice(&self.receiver.to_le_bytes());
        out[8..32].copy_from_slice(&self.nonce);
        out[32..64].copy_from_slice(&self.encrypted_cookie);
    }
}

/// The header of a transport message (paper 5.4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportHeader {
    /// The receiver's index of the keypair that sealed the packet.
    pub receiver: u32,
    /// The nonce counter.
    pub counter: u64,
}

impl TransportHeader {
    /// Parses the header of a transport message of at least 32 bytes.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        if classify(b)? != MessageKind::Transport {
            return Err(ParseError::UnknownType);
        }
        Ok(TransportHeader { receiver: u32_at(b, 4), counter: u64::from_le_bytes(array_at(b, 8)) })
    }

    /// Writes the 16-byte header into `out[..16]`.
    pub fn emit(&self, out: &mut [u8]) {
        header(out, TYPE_TRANSPORT);
        out[4..8].copy_from_slice(&self.receiver.to_le_bytes());
        out[8..16].copy_from_slice(&self.counter.to_le_bytes());
    }
}

/// The padded length of a plaintext of `len` bytes.
pub const fn padded_len(len: usize) -> usize {
    len.div_ceil(PADDING_MULTIPLE) * PADDING_MULTIPLE
}
