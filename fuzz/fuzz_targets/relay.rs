//! The relay protocol's byte layouts (`daemon/src/relay/wire.rs`, included
//! as it is): the relay's hello, the client's key proof and frame headers,
//! the bytes a relay reads from any client that completes TLS and a client
//! reads from its relay.
//!
//! Nothing may panic; each parser accepts exactly what a plain reference
//! reading of the layout accepts, and what it accepts re-encodes to the
//! same bytes; a frame header that parses has the type of its side and a
//! payload of 1 to 4096 bytes; a header built from any length exists only
//! for 1 to 4096. A stream split into frames the way the relay (and the
//! client) read a connection never reads past the input, ends at the first
//! bad header, and its frames re-encode to the bytes they were read from.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../daemon/src/relay/wire.rs"]
mod wire;

use wire::{
    Auth, FrameHeader, Hello, WireError, AUTH_LEN, FRAME_HEADER_LEN, FRAME_RECV, FRAME_SEND, HELLO_LEN, HELLO_MAGIC,
    MAX_PAYLOAD,
};

fuzz_target!(|data: &[u8]| {
    // Each parser on the input as it is, and on a window of its own length
    // (the hello's behind the magic too) so the fixed-length parsers see
    // their own sizes from every input.
    hello(data);
    auth(data);
    for kind in [FRAME_SEND, FRAME_RECV, data.first().copied().unwrap_or(0)] {
        header(data, kind);
    }
    if let Some(w) = data.get(..HELLO_LEN) {
        hello(w);
    }
    if let Some(w) = data.get(..HELLO_LEN - HELLO_MAGIC.len()) {
        hello(&[&HELLO_MAGIC[..], w].concat());
    }
    if let Some(w) = data.get(..AUTH_LEN) {
        auth(w);
    }
    if let Some(w) = data.get(..FRAME_HEADER_LEN) {
        for kind in [FRAME_SEND, FRAME_RECV, w[0]] {
            header(w, kind);
        }
    }

    // Headers built from any length and key.
    if data.len() >= 4 {
        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let key = [data[0]; 32];
        for (built, kind) in [(FrameHeader::send(key, len), FRAME_SEND), (FrameHeader::recv(key, len), FRAME_RECV)] {
            match built {
                Ok(h) => {
                    assert!((1..=MAX_PAYLOAD).contains(&len), "built a header for {len} bytes");
                    assert_eq!((h.kind(), h.key(), h.payload_len()), (kind, key, len));
                    assert_eq!(FrameHeader::parse(&h.encode(), kind), Ok(h));
                }
                Err(e) => {
                    assert!(len == 0 || len > MAX_PAYLOAD, "refused {len} bytes");
                    assert_eq!(e, WireError::PayloadLength(len));
                }
            }
        }
    }

    // A connection as the relay reads it (frames after the client's proof)
    // and a stream of frames as each side reads them.
    if let Some(rest) = data.get(AUTH_LEN..) {
        assert!(Auth::parse(&data[..AUTH_LEN]).is_ok());
        frames(rest, FRAME_SEND);
    }
    frames(data, FRAME_SEND);
    frames(data, FRAME_RECV);
});

/// `Hello::parse` accepts exactly 72 bytes starting with the magic, and
/// gives back those bytes.
fn hello(bytes: &[u8]) {
    let reference = bytes.len() == HELLO_LEN && bytes.starts_with(HELLO_MAGIC);
    match Hello::parse(bytes) {
        Ok(h) => {
            assert!(reference, "accepted a hello of {} bytes", bytes.len());
            assert_eq!(&h.encode()[..], bytes);
            assert_eq!((&h.relay_key[..], &h.nonce[..]), (&bytes[8..40], &bytes[40..]));
        }
        Err(e) => {
            assert!(!reference, "refused a valid hello: {e}");
            let expected = if bytes.len() != HELLO_LEN {
                WireError::Length { expected: HELLO_LEN, got: bytes.len() }
            } else {
                WireError::Magic
            };
            assert_eq!(e, expected);
            let _ = e.to_string();
        }
    }
}

/// `Auth::parse` accepts any 64 bytes, and gives back those bytes.
fn auth(bytes: &[u8]) {
    match Auth::parse(bytes) {
        Ok(a) => {
            assert_eq!(bytes.len(), AUTH_LEN);
            assert_eq!(&a.encode()[..], bytes);
            assert_eq!((&a.key[..], &a.proof[..]), (&bytes[..32], &bytes[32..]));
        }
        Err(e) => assert_eq!(e, WireError::Length { expected: AUTH_LEN, got: bytes.len() }),
    }
}

/// `FrameHeader::parse` for a side that accepts `kind` accepts exactly 35
/// bytes of a frame type (1 or 2) equal to `kind` with a length of 1 to
/// 4096, and gives back those bytes.
fn header(bytes: &[u8], kind: u8) {
    let reference = bytes.len() == FRAME_HEADER_LEN
        && (kind == FRAME_SEND || kind == FRAME_RECV)
        && bytes[0] == kind
        && (1..=MAX_PAYLOAD).contains(&(usize::from(bytes[33]) << 8 | usize::from(bytes[34])));
    match FrameHeader::parse(bytes, kind) {
        Ok(h) => {
            assert!(reference, "accepted {bytes:?} as type {kind}");
            assert_eq!(h.kind(), kind);
            assert!((1..=MAX_PAYLOAD).contains(&h.payload_len()));
            assert_eq!(&h.encode()[..], bytes);
            assert_eq!(&h.key()[..], &bytes[1..33]);
        }
        Err(e) => {
            assert!(!reference, "refused a valid header of type {kind}: {e}");
            let _ = e.to_string();
        }
    }
}

/// Reads `stream` the way `Relay::forward_from` (kind 1) and
/// `RelayReceiver::recv` (kind 2) read a connection: a header, then as many
/// payload bytes as it says; stops at the end of the input, inside a
/// header or a payload, or at the first bad header.
fn frames(stream: &[u8], kind: u8) {
    let mut at = 0;
    let mut rebuilt = Vec::new();
    let mut bad_header = false;
    while let Some(raw) = stream.get(at..at + FRAME_HEADER_LEN) {
        let Ok(h) = FrameHeader::parse(raw, kind) else {
            bad_header = true;
            break;
        };
        let start = at + FRAME_HEADER_LEN;
        let Some(payload) = stream.get(start..start + h.payload_len()) else { break };
        assert!(!payload.is_empty() && payload.len() <= MAX_PAYLOAD);
        rebuilt.extend_from_slice(&h.encode());
        rebuilt.extend_from_slice(payload);
        at = start + payload.len();
    }
    assert!(at <= stream.len());
    // Every whole frame read re-encodes to the bytes it came from.
    assert_eq!(&rebuilt[..], &stream[..at]);
    if bad_header {
        // The loop stopped at a header it refused, and nothing past it was read.
        assert!(FrameHeader::parse(&stream[at..at + FRAME_HEADER_LEN], kind).is_err());
    } else {
        // It stopped because the input ran out: what is left is less than a
        // header, or a good header with less than its payload.
        let left = &stream[at..];
        if left.len() >= FRAME_HEADER_LEN {
            let h = FrameHeader::parse(&left[..FRAME_HEADER_LEN], kind).expect("stopped on a good header");
            assert!(left.len() < FRAME_HEADER_LEN + h.payload_len());
        }
    }
}
