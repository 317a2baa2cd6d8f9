//! MAC1, MAC2 and cookie replies on arbitrary bytes and times.
//!
//! `CookieChecker::check_mac1`, `check_mac2` and `create_reply`, and
//! `CookieSender::consume_reply`, must never panic on any complete handshake
//! message (32 bytes or more: the two MACs); forged replies must be refused;
//! and a reply the checker makes for a stamped message must be accepted by
//! the sender, whose next message then carries a MAC2 the checker accepts
//! exactly while both the cookie and the checker's secret are fresh.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use wiremesh_core::consts::{COOKIE_REFRESH_TIME, COOKIE_SECRET_MAX_AGE};
use wiremesh_core::cookie::{CookieChecker, CookieError, CookieSender};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::messages::{CookieReply, COOKIE_REPLY_LEN, INITIATION_LEN, RESPONSE_LEN, TYPE_COOKIE_REPLY};
use wiremesh_core::Instant;

/// The receiving device's static key (the same as device B in the other targets).
const SERVER_KEY: [u8; 32] = [0x42; 32];
const MAC_LEN: usize = 16;

#[derive(Arbitrary, Debug)]
enum Shape {
    Initiation,
    Response,
    /// Any length of at least 32 bytes (shorter ones are no handshake message).
    Any,
}

#[derive(Arbitrary, Debug)]
struct Addr {
    v6: bool,
    ip: [u8; 16],
    port: u16,
}

impl Addr {
    fn socket(&self) -> SocketAddr {
        let ip = if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.ip))
        } else {
            IpAddr::V4(Ipv4Addr::new(self.ip[0], self.ip[1], self.ip[2], self.ip[3]))
        };
        SocketAddr::new(ip, self.port)
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    seed: u64,
    shape: Shape,
    msg: Vec<u8>,
    /// A second message sent after the cookie arrived (resized like `msg`).
    msg2: Vec<u8>,
    forged_reply: [u8; COOKIE_REPLY_LEN],
    src: Addr,
    other_src: Addr,
    start_ms: u32,
    /// From the reply's creation to its arrival at the sender.
    reply_delay_ms: u32,
    /// From the reply's arrival to the next message.
    next_msg_ms: u32,
    /// A byte of the stamped message to flip: (position, xor).
    flip: Option<(u16, u8)>,
}

fn shape(bytes: &[u8], shape: &Shape) -> Vec<u8> {
    let mut m = bytes.to_vec();
    match shape {
        Shape::Initiation => m.resize(INITIATION_LEN, 0),
        Shape::Response => m.resize(RESPONSE_LEN, 0),
        Shape::Any => {
            if m.len() < 2 * MAC_LEN {
                m.resize(2 * MAC_LEN, 0);
            }
        }
    }
    m
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(v.into())
}

fuzz_target!(|input: Input| {
    let server = PrivateKey::from_bytes(SERVER_KEY).public_key();
    let mut rng = ChaCha20Rng::seed_from_u64(input.seed);
    let mut checker = CookieChecker::new(&server);
    let mut sender = CookieSender::new(&server);
    let src = input.src.socket();
    let other = input.other_src.socket();
    let t0 = Instant::ZERO + ms(input.start_ms);

    // Arbitrary messages: no panic, and no MAC2 can be valid before any secret exists.
    let mut msg = shape(&input.msg, &input.shape);
    let _ = checker.check_mac1(&msg);
    assert!(!checker.check_mac2(&msg, src, t0), "MAC2 accepted with no cookie secret");

    // A reply to nothing is refused.
    let mut forged = input.forged_reply;
    forged[0] = TYPE_COOKIE_REPLY;
    forged[1..4].fill(0);
    let forged = CookieReply::parse(&forged).expect("64 bytes with type 3 is a cookie reply");
    assert_eq!(sender.consume_reply(&forged, t0), Err(CookieError::Unsolicited));

    // A stamped message passes MAC1; any flipped byte before MAC2 breaks it.
    sender.stamp(&mut msg, t0);
    assert!(checker.check_mac1(&msg), "MAC1 of a stamped message refused");
    let mac2_at = msg.len() - MAC_LEN;
    assert_eq!(&msg[mac2_at..], &[0u8; MAC_LEN], "MAC2 set without a cookie");
    if let Some((pos, xor)) = input.flip {
        let pos = pos as usize % msg.len();
        if xor != 0 {
            let mut flipped = msg.clone();
            flipped[pos] ^= xor;
            assert_eq!(checker.check_mac1(&flipped), pos >= mac2_at, "MAC1 verdict after flipping byte {pos}");
        }
    }

    // A forged reply to a stamped message does not authenticate.
    assert_eq!(sender.consume_reply(&forged, t0), Err(CookieError::Decrypt));

    // The checker's reply is accepted once.
    let index = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
    let reply = checker.create_reply(&msg, index, src, t0, &mut rng).expect("messages here are at least 32 bytes");
    assert_eq!(reply.receiver, index);
    let mut wire = [0u8; COOKIE_REPLY_LEN];
    reply.emit(&mut wire);
    let reparsed = CookieReply::parse(&wire).expect("an emitted reply parses");
    let t1 = t0 + ms(input.reply_delay_ms);
    assert_eq!(sender.consume_reply(&reparsed, t1), Ok(()), "the checker's own reply refused");
    assert_eq!(sender.consume_reply(&reparsed, t1), Err(CookieError::Unsolicited), "a reply accepted twice");

    // The next message carries MAC2 while the cookie is fresh; the checker
    // accepts it while its secret is too, and only from the same address.
    let mut msg2 = shape(&input.msg2, &input.shape);
    let t2 = t1 + ms(input.next_msg_ms);
    sender.stamp(&mut msg2, t2);
    let cookie_fresh = t2.saturating_duration_since(t1) < COOKIE_REFRESH_TIME;
    let secret_fresh = t2.saturating_duration_since(t0) < COOKIE_SECRET_MAX_AGE;
    assert_eq!(checker.check_mac2(&msg2, src, t2), cookie_fresh && secret_fresh, "MAC2 verdict");
    if other != src {
        assert!(!checker.check_mac2(&msg2, other, t2), "MAC2 accepted from another address");
    }
    assert!(checker.check_mac1(&msg2));

    // Replies to arbitrary messages at any later time: no panic, and the
    // secret rotates so an old cookie stops working.
    if let Some(late) = checker.create_reply(&msg2, 0, other, t2, &mut rng) {
        let _ = sender.consume_reply(&late, t2);
    }
});
