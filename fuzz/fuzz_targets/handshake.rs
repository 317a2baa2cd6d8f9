//! The Noise_IKpsk2 handshake on arbitrary and on mutated messages.
//!
//! The first input byte picks a mode; the rest is the message or a list of
//! (position, xor) mutations:
//!
//! * 0: the rest is an initiation to the fixed responder B, fed to
//!   `noise::begin_initiation` (and, if that accepts it, to the rest of the
//!   responder side);
//! * 1: the rest is a response to initiator A's initiation in flight, fed to
//!   `Handshake::consume_response`;
//! * 2: a genuine initiation from A, mutated: the responder must accept it
//!   exactly when no Noise-covered byte changed;
//! * 3: a genuine response from B, mutated: likewise for the initiator, and
//!   a refused response must leave the genuine one acceptable.
//!
//! Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::ops::Range;
use std::time::Duration;
use wiremesh_core::keys::{PresharedKey, PrivateKey};
use wiremesh_core::messages::{Initiation, Response, INITIATION_LEN, RESPONSE_LEN, TYPE_INITIATION, TYPE_RESPONSE};
use wiremesh_core::noise::{begin_initiation, Handshake, HandshakeError, StaticIdentity};
use wiremesh_core::{Instant, WallTime};

/// The same static keys as devices A and B in the `device` target.
const KEY_A: [u8; 32] = [0x41; 32];
const KEY_B: [u8; 32] = [0x42; 32];
/// A's receiver index and randomness for its initiation in modes 1 and 3,
/// fixed so that hand-made seeds can answer it.
const A_INDEX: u32 = 0x0a0a_0a0a;
const A_RNG_SEED: u64 = 0xa;
const B_INDEX: u32 = 0x0b0b_0b0b;
const B_RNG_SEED: u64 = 0xb;
const WALL: WallTime = WallTime::new(1_700_000_000, 0);

/// Bytes of an initiation that the Noise handshake authenticates
/// (ephemeral, encrypted static, encrypted timestamp).
const INITIATION_COVERED: Range<usize> = 8..116;
/// Bytes of a response that the initiator checks (receiver index,
/// ephemeral, encrypted nothing).
const RESPONSE_CHECKED: Range<usize> = 8..60;

struct Parties {
    a: StaticIdentity,
    b: StaticIdentity,
    /// A's state for peer B.
    a_hs: Handshake,
    /// B's state for peer A.
    b_hs: Handshake,
}

fn parties() -> Parties {
    let a = StaticIdentity::new(PrivateKey::from_bytes(KEY_A));
    let b = StaticIdentity::new(PrivateKey::from_bytes(KEY_B));
    let a_hs = Handshake::new(&a, *b.public_key(), PresharedKey::default());
    let b_hs = Handshake::new(&b, *a.public_key(), PresharedKey::default());
    Parties { a, b, a_hs, b_hs }
}

fn framed<const N: usize>(rest: &[u8], message_type: u8) -> [u8; N] {
    let mut m = [0u8; N];
    let n = rest.len().min(N);
    m[..n].copy_from_slice(&rest[..n]);
    m[0] = message_type;
    m[1..4].fill(0);
    m
}

/// Applies (position, xor) pairs; returns which positions changed.
fn mutate(msg: &mut [u8], pairs: &[u8]) -> Vec<usize> {
    let len = msg.len();
    let original = msg.to_vec();
    for p in pairs.chunks_exact(2) {
        msg[p[0] as usize % len] ^= p[1];
    }
    (0..len).filter(|&i| msg[i] != original[i]).collect()
}

fn now() -> Instant {
    Instant::ZERO + Duration::from_secs(1)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut p = parties();
    let mut a_rng = ChaCha20Rng::seed_from_u64(A_RNG_SEED);
    let mut b_rng = ChaCha20Rng::seed_from_u64(B_RNG_SEED);
    match mode % 4 {
        0 => {
            let bytes: [u8; INITIATION_LEN] = framed(rest, TYPE_INITIATION);
            let msg = Initiation::parse(&bytes).expect("framed initiation parses");
            let Ok(pending) = begin_initiation(&p.b, &msg) else {
                return;
            };
            // Only a holder of a static key can get here; continue as B would
            // if that key were a configured peer.
            let mut hs = Handshake::new(&p.b, pending.remote_static, PresharedKey::default());
            if hs.finish_initiation(pending, now()).is_ok() {
                let (response, keys) =
                    hs.create_response(B_INDEX, &mut b_rng).expect("response to an accepted initiation");
                assert_eq!(response.receiver, msg.sender);
                assert_eq!(keys.remote_index, msg.sender);
                // The same initiation again is a replay.
                let again = begin_initiation(&p.b, &msg).expect("it was accepted once");
                assert_eq!(
                    hs.finish_initiation(again, now() + Duration::from_secs(1)),
                    Err(HandshakeError::StaleTimestamp)
                );
            }
        }
        1 => {
            p.a_hs.create_initiation(&p.a, A_INDEX, WALL, &mut a_rng).expect("initiation");
            let bytes: [u8; RESPONSE_LEN] = framed(rest, TYPE_RESPONSE);
            let msg = Response::parse(&bytes).expect("framed response parses");
            if let Ok(keys) = p.a_hs.consume_response(&p.a, &msg) {
                assert_eq!(msg.receiver, A_INDEX);
                assert_eq!(keys.local_index, A_INDEX);
                assert!(keys.initiator);
                // The handshake is over: the same response is now unexpected.
                assert_eq!(p.a_hs.consume_response(&p.a, &msg).err(), Some(HandshakeError::UnexpectedResponse));
            } else {
                assert_eq!(p.a_hs.pending_local_index(), Some(A_INDEX), "a refused response cancelled the initiation");
            }
        }
        2 => {
            let init = p.a_hs.create_initiation(&p.a, A_INDEX, WALL, &mut a_rng).expect("initiation");
            let mut bytes = [0u8; INITIATION_LEN];
            init.emit(&mut bytes);
            let changed = mutate(&mut bytes, rest);
            let Ok(msg) = Initiation::parse(&bytes) else {
                assert!(changed.iter().any(|&i| i < 4), "an initiation with a good header failed to parse");
                return;
            };
            let covered = changed.iter().any(|i| INITIATION_COVERED.contains(i));
            let accepted = begin_initiation(&p.b, &msg).and_then(|pending| {
                assert_eq!(pending.remote_static, *p.a.public_key(), "a different static key authenticated");
                p.b_hs.finish_initiation(pending, now())
            });
            assert_eq!(accepted.is_ok(), !covered, "mutated bytes {changed:?}: {accepted:?}");
            if accepted.is_ok() {
                let (response, b_keys) = p.b_hs.create_response(B_INDEX, &mut b_rng).expect("response");
                assert_eq!(response.receiver, msg.sender);
                let a_result = p.a_hs.consume_response(&p.a, &response);
                if msg.sender == A_INDEX {
                    let a_keys = a_result.expect("the response to an accepted initiation");
                    assert_eq!(a_keys.send, b_keys.receive);
                    assert_eq!(a_keys.receive, b_keys.send);
                } else {
                    assert_eq!(a_result.err(), Some(HandshakeError::UnexpectedResponse));
                }
            }
        }
        _ => {
            let init = p.a_hs.create_initiation(&p.a, A_INDEX, WALL, &mut a_rng).expect("initiation");
            let pending = begin_initiation(&p.b, &init).expect("genuine initiation");
            p.b_hs.finish_initiation(pending, now()).expect("genuine initiation");
            let (response, b_keys) = p.b_hs.create_response(B_INDEX, &mut b_rng).expect("response");
            let mut bytes = [0u8; RESPONSE_LEN];
            response.emit(&mut bytes);
            let changed = mutate(&mut bytes, rest);
            if let Ok(msg) = Response::parse(&bytes) {
                let checked = changed.iter().any(|i| RESPONSE_CHECKED.contains(i));
                match p.a_hs.consume_response(&p.a, &msg) {
                    Ok(keys) => {
                        assert!(!checked, "mutated bytes {changed:?} accepted");
                        assert_eq!(keys.send, b_keys.receive);
                        assert_eq!(keys.remote_index, msg.sender);
                        return;
                    }
                    Err(e) => assert!(checked, "unmutated checked bytes refused: {e:?}"),
                }
            } else {
                assert!(changed.iter().any(|&i| i < 4), "a response with a good header failed to parse");
            }
            // A refused response leaves the initiation in flight.
            let keys = p.a_hs.consume_response(&p.a, &response).expect("the genuine response after a forged one");
            assert_eq!(keys.send, b_keys.receive);
        }
    }
});
