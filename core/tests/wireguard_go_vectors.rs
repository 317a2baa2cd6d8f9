//! Known-answer tests from an independent implementation: a handshake
//! initiation captured from wireguard-go 0.0.20231211 (Debian
//! bookworm-backports), configured with fixed keys, and public keys computed
//! by `wg pubkey` (wireguard-tools). They pin MAC1, the Noise chain up to the
//! timestamp, and X25519 key derivation to what the reference tools produce.

use blake2::digest::{consts::U16, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use wiremesh_core::cookie::CookieChecker;
use wiremesh_core::keys::{PresharedKey, PrivateKey, PublicKey};
use wiremesh_core::messages::{classify, Initiation, MessageKind};
use wiremesh_core::noise::{begin_initiation, Handshake, StaticIdentity};
use wiremesh_core::Instant;

/// wireguard-go's private key: bytes 1..=32.
fn go_private() -> [u8; 32] {
    core::array::from_fn(|i| i as u8 + 1)
}

/// Our (the responder's) private key: bytes 101..=132.
fn our_private() -> [u8; 32] {
    core::array::from_fn(|i| i as u8 + 101)
}

/// `wg pubkey` of the two private keys above (base64 decoded).
const GO_PUBLIC_B64: &str = "B6N8vBQgk8i3VdwbEOhstCY3StFqqFPtC9/AsrhtHHw=";
const OUR_PUBLIC_B64: &str = "VxR2nRFr92Q2rnS8eT0sMK0ZA8WaxSc4BcfiaYtBDDY=";

/// The first datagram wireguard-go sent to our peer entry (`ping` through its
/// tunnel), as captured on a UDP socket.
const INITIATION_HEX: &str = "010000006186b6dfa1ebd88b371d20508c7aa6d7b42777a0cb1f15fa1d73a1b17c818d27e86b4019d9c98dd18d1045887a8c7be68e758a7ee5075353fa6afa8332f99c2c700a03499bfb1974e44c328e6108ffb65a0f15aacc3ae0265656132d9715149986ac40810d0f3ae0da4185b2782e72c5cdf97a274d020b14f02e1482071157e900000000000000000000000000000000";

fn b64(s: &str) -> [u8; 32] {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        bits = (bits << 6) | alphabet.iter().position(|&a| a == c).unwrap() as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out.try_into().unwrap()
}

#[test]
fn public_keys_match_wg_pubkey() {
    assert_eq!(PrivateKey::from_bytes(go_private()).public_key(), PublicKey(b64(GO_PUBLIC_B64)));
    assert_eq!(PrivateKey::from_bytes(our_private()).public_key(), PublicKey(b64(OUR_PUBLIC_B64)));
}

#[test]
fn wireguard_go_initiation_mac1_and_noise_chain() {
    let msg = hex::decode(INITIATION_HEX).unwrap();
    assert_eq!(msg.len(), 148);
    assert_eq!(classify(&msg), Ok(MessageKind::Initiation));
    let our_public = PublicKey(b64(OUR_PUBLIC_B64));

    // MAC1 = MAC(HASH("mac1----" || responder public key), msg[..116]),
    // recomputed with the blake2 crate directly.
    let key: [u8; 32] = Blake2s256::new().chain_update(b"mac1----").chain_update(our_public.0).finalize().into();
    let mut m = <Blake2sMac<U16> as Mac>::new_from_slice(&key).unwrap();
    Mac::update(&mut m, &msg[..116]);
    assert_eq!(&m.finalize().into_bytes()[..], &msg[116..132]);
    assert!(CookieChecker::new(&our_public).check_mac1(&msg));
    assert_eq!(&msg[132..148], &[0u8; 16], "no cookie: MAC2 is zero");

    // The Noise chain: our identity recovers wireguard-go's static key, and
    // the timestamp authenticates under the static-static key.
    let me = StaticIdentity::new(PrivateKey::from_bytes(our_private()));
    let init = Initiation::parse(&msg).unwrap();
    let pending = begin_initiation(&me, &init).unwrap();
    assert_eq!(pending.remote_static, PublicKey(b64(GO_PUBLIC_B64)));
    let mut hs = Handshake::new(&me, pending.remote_static, PresharedKey::default());
    hs.finish_initiation(pending, Instant::from_nanos(1)).unwrap();

    // A flipped bit anywhere in the sealed fields is refused.
    for at in [8usize, 40, 87, 88, 115] {
        let mut bad = msg.clone();
        bad[at] ^= 0x01;
        let init = Initiation::parse(&bad).unwrap();
        let ok = begin_initiation(&me, &init).and_then(|p| {
            let mut hs = Handshake::new(&me, p.remote_static, PresharedKey::default());
            hs.finish_initiation(p, Instant::from_nanos(1))
        });
        assert!(ok.is_err(), "bit flip at {at} accepted");
    }
    // Replaying the same initiation to the same state is a stale timestamp.
    let pending = begin_initiation(&me, &init).unwrap();
    assert!(hs.finish_initiation(pending, Instant::from_nanos(1_000_000_000)).is_err());
}
