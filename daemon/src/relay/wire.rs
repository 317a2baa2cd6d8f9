//! The relay protocol's byte layouts, apart from any IO: the relay's hello,
//! the client's key proof and the frame header, each with a `parse` that
//! checks every length and value and an `encode` that is its exact inverse.
//!
//! Both the relay ([`super`]) and its client ([`super::client`]) go through
//! these, and the `relay` fuzz target includes this file as it is, so it
//! uses nothing outside the standard library.

use core::fmt;

/// The first bytes the relay sends.
pub const HELLO_MAGIC: &[u8; 8] = b"WMRELAY1";
/// Length of the relay's hello: magic, relay key, nonce.
pub const HELLO_LEN: usize = 8 + 32 + 32;
/// Length of the client's answer: claimed node key, proof.
pub const AUTH_LEN: usize = 32 + 32;
/// Length of a frame header: type, node key, payload length.
pub const FRAME_HEADER_LEN: usize = 1 + 32 + 2;
/// The largest payload a frame may carry: a WireGuard message for an MTU
/// far above any the agent sets, or a probe.
pub const MAX_PAYLOAD: usize = 4096;
/// Frame type: client to relay, "send to this key".
pub const FRAME_SEND: u8 = 1;
/// Frame type: relay to client, "from this key".
pub const FRAME_RECV: u8 = 2;
/// The relay's one-byte answer to a valid key proof.
pub const AUTH_ACCEPTED: u8 = 0;

/// Why bytes are not a valid relay message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The message has a fixed length and these bytes are not it.
    Length {
        /// The length the message has.
        expected: usize,
        /// The number of bytes given.
        got: usize,
    },
    /// The hello does not start with [`HELLO_MAGIC`].
    Magic,
    /// A frame type other than the one this side accepts.
    FrameType {
        /// The type this side accepts.
        expected: u8,
        /// The type in the header.
        got: u8,
    },
    /// A payload length outside 1..=[`MAX_PAYLOAD`].
    PayloadLength(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Length { expected, got } => write!(f, "{got} bytes where the message has {expected}"),
            WireError::Magic => f.write_str("not a relay hello"),
            WireError::FrameType { expected, got } => write!(f, "frame type {got} (only {expected} allowed)"),
            WireError::PayloadLength(n) => write!(f, "payload of {n} bytes (1 to {MAX_PAYLOAD} allowed)"),
        }
    }
}

impl std::error::Error for WireError {}

/// The relay's first message: its X25519 public key and a fresh nonce that
/// the client's proof must cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The relay's X25519 public key.
    pub relay_key: [u8; 32],
    /// The single-use nonce.
    pub nonce: [u8; 32],
}

impl Hello {
    /// Reads a hello of exactly [`HELLO_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Result<Hello, WireError> {
        let bytes: &[u8; HELLO_LEN] = exact(bytes)?;
        if &bytes[..8] != HELLO_MAGIC {
            return Err(WireError::Magic);
        }
        Ok(Hello { relay_key: array(&bytes[8..40]), nonce: array(&bytes[40..]) })
    }

    /// The hello's bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..8].copy_from_slice(HELLO_MAGIC);
        out[8..40].copy_from_slice(&self.relay_key);
        out[40..].copy_from_slice(&self.nonce);
        out
    }
}

/// The client's answer to the hello: the node key it claims and the proof
/// that it holds the private key (checked by the relay, in constant time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    /// The claimed node public key.
    pub key: [u8; 32],
    /// `disco::relay_proof` over the hello's relay key and nonce.
    pub proof: [u8; 32],
}

impl Auth {
    /// Reads an answer of exactly [`AUTH_LEN`] bytes (any values: only the
    /// proof check can tell a good one).
    pub fn parse(bytes: &[u8]) -> Result<Auth, WireError> {
        let bytes: &[u8; AUTH_LEN] = exact(bytes)?;
        Ok(Auth { key: array(&bytes[..32]), proof: array(&bytes[32..]) })
    }

    /// The answer's bytes.
    pub fn encode(&self) -> [u8; AUTH_LEN] {
        let mut out = [0u8; AUTH_LEN];
        out[..32].copy_from_slice(&self.key);
        out[32..].copy_from_slice(&self.proof);
        out
    }
}

/// A frame header whose type is [`FRAME_SEND`] or [`FRAME_RECV`] and whose
/// payload length lies in 1..=[`MAX_PAYLOAD`]: no value of this type can
/// hold anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    kind: u8,
    key: [u8; 32],
    len: u16,
}

impl FrameHeader {
    /// A client's frame: send `len` bytes to the node `to`.
    pub fn send(to: [u8; 32], len: usize) -> Result<FrameHeader, WireError> {
        Self::new(FRAME_SEND, to, len)
    }

    /// The relay's frame: `len` bytes from the node `from`.
    pub fn recv(from: [u8; 32], len: usize) -> Result<FrameHeader, WireError> {
        Self::new(FRAME_RECV, from, len)
    }

    fn new(kind: u8, key: [u8; 32], len: usize) -> Result<FrameHeader, WireError> {
        match u16::try_from(len) {
            Ok(n) if (1..=MAX_PAYLOAD).contains(&len) => Ok(FrameHeader { kind, key, len: n }),
            _ => Err(WireError::PayloadLength(len)),
        }
    }

    /// Reads a header of exactly [`FRAME_HEADER_LEN`] bytes that must have
    /// type `kind` ([`FRAME_SEND`] on the relay, [`FRAME_RECV`] on a client)
    /// and a payload length in 1..=[`MAX_PAYLOAD`]; the relay closes the
    /// connection on anything else, and so does the client.
    pub fn parse(bytes: &[u8], kind: u8) -> Result<FrameHeader, WireError> {
        let bytes: &[u8; FRAME_HEADER_LEN] = exact(bytes)?;
        if bytes[0] != kind || !(kind == FRAME_SEND || kind == FRAME_RECV) {
            return Err(WireError::FrameType { expected: kind, got: bytes[0] });
        }
        let len = usize::from(u16::from_be_bytes([bytes[33], bytes[34]]));
        Self::new(kind, array(&bytes[1..33]), len)
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0] = self.kind;
        out[1..33].copy_from_slice(&self.key);
        out[33..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The frame type, [`FRAME_SEND`] or [`FRAME_RECV`].
    pub fn kind(&self) -> u8 {
        self.kind
    }

    /// The node key: the destination in a send frame, the source in a
    /// receive frame.
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// The payload length, 1..=[`MAX_PAYLOAD`].
    pub fn payload_len(&self) -> usize {
        usize::from(self.len)
    }
}

/// `bytes` as an array of exactly `N` bytes.
fn exact<const N: usize>(bytes: &[u8]) -> Result<&[u8; N], WireError> {
    bytes.try_into().map_err(|_| WireError::Length { expected: N, got: bytes.len() })
}

/// A 32-byte field (the caller slices exactly 32 bytes).
fn array(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_refuses_other_magic_or_length() {
        let h = Hello { relay_key: [7; 32], nonce: [9; 32] };
        let bytes = h.encode();
        assert_eq!(&bytes[..8], b"WMRELAY1");
        assert_eq!(Hello::parse(&bytes), Ok(h));
        let mut bad = bytes;
        bad[7] = b'2';
        assert_eq!(Hello::parse(&bad), Err(WireError::Magic));
        assert_eq!(Hello::parse(&bytes[..HELLO_LEN - 1]), Err(WireError::Length { expected: HELLO_LEN, got: 71 }));
        assert_eq!(Hello::parse(&[bytes.as_slice(), &[0]].concat()), Err(WireError::Length { expected: 72, got: 73 }));
    }

    #[test]
    fn auth_round_trips_and_checks_length() {
        let a = Auth { key: [1; 32], proof: [2; 32] };
        assert_eq!(Auth::parse(&a.encode()), Ok(a));
        assert_eq!(Auth::parse(&[0; 63]), Err(WireError::Length { expected: AUTH_LEN, got: 63 }));
        assert_eq!(Auth::parse(&[]), Err(WireError::Length { expected: AUTH_LEN, got: 0 }));
    }

    #[test]
    fn frame_header_accepts_one_type_per_side_and_lengths_1_to_4096() {
        let key = [5; 32];
        for len in [1, 2, 1500, MAX_PAYLOAD] {
            let h = FrameHeader::send(key, len).unwrap();
            let bytes = h.encode();
            assert_eq!(bytes[0], FRAME_SEND);
            assert_eq!(u16::from_be_bytes([bytes[33], bytes[34]]) as usize, len);
            assert_eq!(FrameHeader::parse(&bytes, FRAME_SEND), Ok(h));
            assert_eq!((h.kind(), h.key(), h.payload_len()), (FRAME_SEND, key, len));
            // The client refuses a send frame, the relay a receive frame.
            assert_eq!(
                FrameHeader::parse(&bytes, FRAME_RECV),
                Err(WireError::FrameType { expected: FRAME_RECV, got: FRAME_SEND })
            );
            let r = FrameHeader::recv(key, len).unwrap();
            assert_eq!(FrameHeader::parse(&r.encode(), FRAME_RECV), Ok(r));
            assert!(FrameHeader::parse(&r.encode(), FRAME_SEND).is_err());
        }
        for len in [0, MAX_PAYLOAD + 1, 65535, 65536, usize::MAX] {
            assert_eq!(FrameHeader::send(key, len), Err(WireError::PayloadLength(len)));
            assert_eq!(FrameHeader::recv(key, len), Err(WireError::PayloadLength(len)));
        }
        for len in [0u16, 4097, 65535] {
            for kind in [FRAME_SEND, FRAME_RECV] {
                let bytes = [&[kind][..], &key, &len.to_be_bytes()].concat();
                assert_eq!(FrameHeader::parse(&bytes, kind), Err(WireError::PayloadLength(len.into())));
            }
        }
        let mut other = FrameHeader::send(key, 4).unwrap().encode();
        for t in [0u8, 3, 255] {
            other[0] = t;
            assert!(
                matches!(FrameHeader::parse(&other, FRAME_SEND), Err(WireError::FrameType { got, .. }) if got == t)
            );
            // A side that asks for a type that is no frame type accepts nothing.
            assert!(FrameHeader::parse(&other, t).is_err());
        }
        assert_eq!(FrameHeader::parse(&other[..34], FRAME_SEND), Err(WireError::Length { expected: 35, got: 34 }));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(WireError::PayloadLength(0).to_string(), "payload of 0 bytes (1 to 4096 allowed)");
        assert_eq!(WireError::FrameType { expected: 1, got: 2 }.to_string(), "frame type 2 (only 1 allowed)");
        assert_eq!(WireError::Length { expected: 72, got: 3 }.to_string(), "3 bytes where the message has 72");
    }
}
