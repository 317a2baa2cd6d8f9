//! Known-answer tests of the cryptographic primitives as WireGuard uses them
//! (`wiremesh_core::crypto`). Each published vector names its source; where
//! no published vector fits our construction, the primitive is checked
//! against an independent implementation instead.

use blake2::digest::consts::{U20, U28, U32};
use blake2::digest::{Mac, Update, VariableOutput};
use blake2::{Blake2s256, Blake2sMac, Blake2sVar};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wiremesh_core::consts::{CONSTRUCTION, IDENTIFIER};
use wiremesh_core::crypto::{
    aead_open, aead_seal, counter_nonce, dh, hash, hmac, kdf, mac, public_key, xaead_open, xaead_seal, CryptoProvider,
    Portable, TransportKey, KEY_LEN, TAG_LEN,
};
use x25519_dalek::StaticSecret;

/// Decodes a hex string (whitespace allowed) of exactly `N` bytes.
fn h<const N: usize>(s: &str) -> [u8; N] {
    let v = hv(s);
    v.as_slice().try_into().unwrap_or_else(|_| panic!("expected {N} bytes, got {}", v.len()))
}

/// Decodes a hex string (whitespace allowed).
fn hv(s: &str) -> Vec<u8> {
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(clean).expect("valid hex")
}

// ---------------------------------------------------------------------------
// X25519
// ---------------------------------------------------------------------------

/// RFC 7748 section 5.2, the two single scalar multiplications. The second
/// u-coordinate has its top bit set, which X25519 must ignore.
#[test]
fn x25519_rfc7748_5_2() {
    let cases = [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ];
    for (scalar, u, out) in cases {
        let secret = StaticSecret::from(h::<32>(scalar));
        assert_eq!(dh(&secret, &h(u)), Some(h(out)), "scalar {scalar}");
    }
}

/// RFC 7748 section 5.2, the iterated test: k = u = 9, then repeatedly
/// k, u = X25519(k, u), k. Checked after 1 and 1,000 iterations (the
/// 1,000,000-iteration value is left out: it takes minutes).
#[test]
fn x25519_rfc7748_5_2_iterated() {
    let mut k = [0u8; 32];
    k[0] = 9;
    let mut u = k;
    for i in 1..=1000 {
        let next = dh(&StaticSecret::from(k), &u).expect("contributory");
        u = k;
        k = next;
        if i == 1 {
            assert_eq!(k, h("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"));
        }
    }
    assert_eq!(k, h("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"));
}

/// RFC 7748 section 6.1, the Diffie-Hellman example between Alice and Bob.
#[test]
fn x25519_rfc7748_6_1() {
    let alice = StaticSecret::from(h::<32>("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
    let alice_pub: [u8; 32] = h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    let bob = StaticSecret::from(h::<32>("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"));
    let bob_pub: [u8; 32] = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
    let shared: [u8; 32] = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    assert_eq!(public_key(&alice), alice_pub);
    assert_eq!(public_key(&bob), bob_pub);
    assert_eq!(dh(&alice, &bob_pub), Some(shared));
    assert_eq!(dh(&bob, &alice_pub), Some(shared));
}

/// WireGuard refuses a DH result of all zeros (paper 5.4.2 via the Noise
/// spec); u = 0 and u = 1 are low-order points that give it for any scalar.
#[test]
fn x25519_low_order_points_refused() {
    let secret = StaticSecret::from([0x42u8; 32]);
    let mut one = [0u8; 32];
    one[0] = 1;
    assert_eq!(dh(&secret, &[0u8; 32]), None);
    assert_eq!(dh(&secret, &one), None);
}

// ---------------------------------------------------------------------------
// ChaCha20-Poly1305 and XChaCha20-Poly1305
// ---------------------------------------------------------------------------

/// RFC 8439 appendix A.5: its nonce, 00000000 || 0102030405060708, has the
/// WireGuard form (4 zero bytes, then a little-endian 64-bit counter), so it
/// goes through `aead_seal`/`aead_open` with counter 0x0807060504030201.
#[test]
fn aead_rfc8439_a5() {
    let key: [u8; 32] = h("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0");
    let counter = u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(counter_nonce(counter), h::<12>("000000000102030405060708"));
    let aad = hv("f33388860000000000004e91");
    let plaintext = hv("
        496e7465726e65742d4472616674732061726520647261667420646f63756d65
        6e74732076616c696420666f722061206d6178696d756d206f6620736978206d
        6f6e74687320616e64206d617920626520757064617465642c207265706c6163
        65642c206f72206f62736f6c65746564206279206f7468657220646f63756d65
        6e747320617420616e792074696d652e20497420697320696e617070726f7072
        6961746520746f2075736520496e7465726e65742d4472616674732061732072
        65666572656e6365206d6174657269616c206f7220746f206369746520746865
        6d206f74686572207468616e206173202fe2809c776f726b20696e2070726f67
        726573732e2fe2809d");
    let ciphertext = hv("
        64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2
        4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf
        332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855
        9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4
        b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e
        af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a
        0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10
        49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29
        a6ad5cb4022b02709b");
    let tag: [u8; 16] = h("eead9d67890cbb22392336fea1851f38");

    let mut buf = plaintext.clone();
    assert_eq!(aead_seal(&key, counter, &aad, &mut buf), tag);
    assert_eq!(buf, ciphertext);
    assert_eq!(aead_open(&key, counter, &aad, &mut buf, &tag), Ok(()));
    assert_eq!(buf, plaintext);

    // Wrong counter, wrong associated data, wrong tag: all refused.
    let mut buf = ciphertext.clone();
    assert!(aead_open(&key, counter + 1, &aad, &mut buf, &tag).is_err());
    let mut buf = ciphertext.clone();
    assert!(aead_open(&key, counter, &aad[1..], &mut buf, &tag).is_err());
    let mut bad_tag = tag;
    bad_tag[15] ^= 0x80;
    let mut buf = ciphertext;
    assert!(aead_open(&key, counter, &aad, &mut buf, &bad_tag).is_err());
}

/// RFC 8439 section 2.8.2. Its nonce (07000000 || 4041424344454647) is not of
/// the WireGuard form, so it checks the `chacha20poly1305` crate itself with
/// an explicit nonce; the tests below then hold our constructions to that crate.
#[test]
fn chacha20poly1305_crate_rfc8439_2_8_2() {
    let key: [u8; 32] = h("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    let nonce: [u8; 12] = h("070000004041424344454647");
    let aad = hv("50515253c0c1c2c3c4c5c6c7");
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let ciphertext = hv("
        d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
        3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
        92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
        3ff4def08e4b7a9de576d26586cec64b6116");
    let tag: [u8; 16] = h("1ae10b594f09e26a7e902ecbd0600691");

    let cipher = ChaCha20Poly1305::new(&key.into());
    let mut buf = plaintext.to_vec();
    let got = cipher.encrypt_in_place_detached(&nonce.into(), &aad, &mut buf).expect("seal");
    assert_eq!(buf, ciphertext);
    assert_eq!(got.as_slice(), tag);
}

/// draft-irtf-cfrg-xchacha-03 appendix A.3.1, through `xaead_seal`/`xaead_open`
/// (cookie replies, paper 5.4.7).
#[test]
fn xaead_draft_xchacha_03_a_3_1() {
    let key: [u8; 32] = h("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    let nonce: [u8; 24] = h("404142434445464748494a4b4c4d4e4f5051525354555657");
    let aad = hv("50515253c0c1c2c3c4c5c6c7");
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let ciphertext = hv("
        bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb
        731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452
        2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9
        21f9664c97637da9768812f615c68b13b52e");
    let tag: [u8; 16] = h("c0875924c1c7987947deafd8780acf49");

    let mut buf = plaintext.to_vec();
    assert_eq!(xaead_seal(&key, &nonce, &aad, &mut buf), tag);
    assert_eq!(buf, ciphertext);
    assert_eq!(xaead_open(&key, &nonce, &aad, &mut buf, &tag), Ok(()));
    assert_eq!(buf, plaintext);

    let mut other_nonce = nonce;
    other_nonce[23] ^= 1;
    let mut buf = ciphertext;
    assert!(xaead_open(&key, &other_nonce, &aad, &mut buf, &tag).is_err());
}

/// `aead_seal` (handshake fields, with associated data) against the
/// `chacha20poly1305` crate driven with the explicit WireGuard nonce.
#[test]
fn aead_matches_crate_with_explicit_nonce() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xaead);
    for len in 0..200 {
        let key: [u8; 32] = rng.gen();
        let counter = if len % 3 == 0 { rng.gen_range(0..4) } else { rng.gen() };
        let aad: Vec<u8> = (0..rng.gen_range(0..80)).map(|_| rng.gen()).collect();
        let plaintext: Vec<u8> = (0..len).map(|_| rng.gen()).collect();

        let mut ours = plaintext.clone();
        let tag = aead_seal(&key, counter, &aad, &mut ours);

        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_le_bytes());
        let mut theirs = plaintext.clone();
        let their_tag = ChaCha20Poly1305::new(&key.into())
            .encrypt_in_place_detached(&nonce.into(), &aad, &mut theirs)
            .expect("seal");
        assert_eq!(ours, theirs, "len {len}");
        assert_eq!(tag.as_slice(), their_tag.as_slice(), "len {len}");

        assert_eq!(aead_open(&key, counter, &aad, &mut ours, &tag), Ok(()));
        assert_eq!(ours, plaintext);
    }
}

// ---------------------------------------------------------------------------
// Transport providers
// ---------------------------------------------------------------------------

/// Seals with the `chacha20poly1305` crate directly: nonce 4 zero bytes then
/// the counter little-endian, no associated data (paper 5.4.6).
fn reference_seal(key: &[u8; KEY_LEN], counter: u64, buf: &mut [u8]) -> [u8; TAG_LEN] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    let tag = ChaCha20Poly1305::new(key.into()).encrypt_in_place_detached(&nonce.into(), &[], buf).expect("seal");
    tag.into()
}

/// A counter for test `i`: small, at the edges, or random.
fn counter_for(i: usize, rng: &mut ChaCha8Rng) -> u64 {
    match i % 5 {
        0 => i as u64,
        1 => u64::MAX - (i as u64),
        2 => 1 << (i % 64),
        _ => rng.gen(),
    }
}

fn check_provider_against_reference<P: CryptoProvider>() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x7a5e);
    for len in 0..=1500 {
        let key: [u8; 32] = rng.gen();
        let counter = counter_for(len, &mut rng);
        let mut plaintext = vec![0u8; len];
        rng.fill_bytes(&mut plaintext);

        let mut want = plaintext.clone();
        let want_tag = reference_seal(&key, counter, &mut want);

        let k = P::transport_key(&key);
        let mut got = plaintext.clone();
        let tag = k.seal_in_place(counter, &mut got);
        assert_eq!(got, want, "{} len {len}", P::NAME);
        assert_eq!(tag, want_tag, "{} len {len}", P::NAME);

        assert_eq!(k.open_in_place(counter, &mut got, &tag), Ok(()));
        assert_eq!(got, plaintext, "{} len {len}", P::NAME);

        let mut again = want.clone();
        assert!(k.open_in_place(counter.wrapping_add(1), &mut again, &tag).is_err(), "{} len {len}", P::NAME);
    }
}

/// Flipping any bit of any byte of ciphertext or tag makes opening fail.
fn check_provider_rejects_tampering<P: CryptoProvider>() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xbad);
    for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 200, 1420, 1500] {
        let key: [u8; 32] = rng.gen();
        let counter: u64 = rng.gen();
        let k = P::transport_key(&key);
        let mut sealed = vec![0u8; len];
        rng.fill_bytes(&mut sealed);
        let tag = k.seal_in_place(counter, &mut sealed);
        for i in 0..len + TAG_LEN {
            let bit = 1u8 << (i % 8);
            let mut buf = sealed.clone();
            let mut t = tag;
            if i < len {
                buf[i] ^= bit;
            } else {
                t[i - len] ^= bit;
            }
            assert!(k.open_in_place(counter, &mut buf, &t).is_err(), "{} len {len} byte {i}", P::NAME);
        }
    }
}

#[test]
fn portable_matches_reference() {
    check_provider_against_reference::<Portable>();
}

#[test]
fn portable_rejects_tampering() {
    check_provider_rejects_tampering::<Portable>();
}

#[cfg(feature = "ring")]
mod ring_provider {
    use super::*;
    use wiremesh_core::crypto::Ring;

    #[test]
    fn ring_matches_reference() {
        check_provider_against_reference::<Ring>();
    }

    #[test]
    fn ring_rejects_tampering() {
        check_provider_rejects_tampering::<Ring>();
    }

    /// Either provider opens what the other sealed, for every length up to
    /// a full 1500-byte packet.
    #[test]
    fn portable_and_ring_interoperate() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x2219);
        for len in 0..=1500 {
            let key: [u8; 32] = rng.gen();
            let counter = counter_for(len, &mut rng);
            let (p, r) = (Portable::transport_key(&key), Ring::transport_key(&key));
            let mut plaintext = vec![0u8; len];
            rng.fill_bytes(&mut plaintext);

            let mut a = plaintext.clone();
            let ta = p.seal_in_place(counter, &mut a);
            let mut b = plaintext.clone();
            let tb = r.seal_in_place(counter, &mut b);
            assert_eq!((&a, ta), (&b, tb), "len {len}");

            assert_eq!(r.open_in_place(counter, &mut a, &ta), Ok(()));
            assert_eq!(p.open_in_place(counter, &mut b, &tb), Ok(()));
            assert_eq!(a, plaintext);
            assert_eq!(b, plaintext);
        }
    }
}

// ---------------------------------------------------------------------------
// BLAKE2s: HASH and MAC
// ---------------------------------------------------------------------------

/// RFC 7693 appendix B: BLAKE2s-256("abc"), also fed in pieces.
#[test]
fn hash_rfc7693_appendix_b() {
    let want: [u8; 32] = h("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982");
    assert_eq!(hash(&[b"abc"]), want);
    assert_eq!(hash(&[b"a", b"", b"bc"]), want);
}

/// WireGuard's initial chaining key and hash, Ci = HASH(CONSTRUCTION) and
/// Hi = HASH(Ci || IDENTIFIER) (paper 5.4.2); the values are the INITIAL_CK
/// and INITIAL_HS constants of the WireGuard project's Rust implementation
/// (wireguard-rs, src/wireguard/handshake/noise.rs).
#[test]
fn hash_wireguard_initial_chain() {
    let ck = hash(&[CONSTRUCTION]);
    assert_eq!(ck, h("60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"));
    assert_eq!(hash(&[&ck, IDENTIFIER]), h("2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"));
}

/// The deterministic input generator of RFC 7693 appendix E (a Fibonacci
/// sequence seeded with the length, top byte of each term).
fn selftest_seq(len: usize) -> Vec<u8> {
    let mut a = 0xDEAD_4BADu32.wrapping_mul(len as u32);
    let mut b = 1u32;
    (0..len)
        .map(|_| {
            let t = a.wrapping_add(b);
            a = b;
            b = t;
            (t >> 24) as u8
        })
        .collect()
}

fn blake2s_var(outlen: usize, input: &[u8]) -> Vec<u8> {
    let mut hasher = Blake2sVar::new(outlen).expect("valid output length");
    hasher.update(input);
    let mut out = vec![0u8; outlen];
    hasher.finalize_variable(&mut out).expect("matching length");
    out
}

fn blake2s_keyed(key: &[u8], input: &[u8]) -> Vec<u8> {
    fn run<M: Mac + KeyInit>(key: &[u8], input: &[u8]) -> Vec<u8> {
        let mut m = <M as KeyInit>::new_from_slice(key).expect("key length");
        Mac::update(&mut m, input);
        m.finalize().into_bytes().to_vec()
    }
    match key.len() {
        // Our MAC (paper 5.4.4): keyed BLAKE2s with a 16-byte output.
        16 => mac(key, &[input]).to_vec(),
        20 => run::<Blake2sMac<U20>>(key, input),
        28 => run::<Blake2sMac<U28>>(key, input),
        32 => run::<Blake2sMac<U32>>(key, input),
        n => panic!("no keyed BLAKE2s of {n} bytes in the self-test"),
    }
}

/// RFC 7693 appendix E: the BLAKE2s self-test. Unkeyed and keyed hashes of
/// output lengths 16, 20, 28 and 32 over inputs of 0 to 1024 bytes, all
/// hashed together; the 16-byte keyed hashes (key of 16 bytes) are our `mac`,
/// the grand hash is our `hash`.
#[test]
fn mac_rfc7693_appendix_e_selftest() {
    let mut results: Vec<Vec<u8>> = Vec::new();
    for outlen in [16usize, 20, 28, 32] {
        for inlen in [0usize, 3, 64, 65, 255, 1024] {
            let input = selftest_seq(inlen);
            results.push(blake2s_var(outlen, &input));
            let key = selftest_seq(outlen);
            results.push(blake2s_keyed(&key, &input));
        }
    }
    let parts: Vec<&[u8]> = results.iter().map(Vec::as_slice).collect();
    assert_eq!(hash(&parts), h("6a411f08ce25adcdfb02aba641451cec53c598b24f4fc787fbdc88797f4c1dfe"));
}

/// MAC with a 32-byte key (MAC1's HASH(LABEL_MAC1 || Spub)) against the
/// `blake2` crate's keyed BLAKE2s-128, for inputs in one piece or several.
#[test]
fn mac_matches_blake2_crate() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x3ac1);
    for len in 0..300 {
        let key: [u8; 32] = rng.gen();
        let input: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let mut m = <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(&key).expect("key");
        Mac::update(&mut m, &input);
        let want: [u8; 16] = m.finalize().into_bytes().into();
        assert_eq!(mac(&key, &[&input]), want, "len {len}");
        let cut = rng.gen_range(0..=len);
        assert_eq!(mac(&key, &[&input[..cut], &input[cut..]]), want, "len {len} cut {cut}");
    }
}

// ---------------------------------------------------------------------------
// HMAC-BLAKE2s and the KDF
// ---------------------------------------------------------------------------

/// HMAC-BLAKE2s from the `hmac` crate (RFC 2104 over a 64-byte block).
fn reference_hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key).expect("any key length");
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// KDF_3 of the paper (section 5.4.2), which is HKDF (RFC 5869) with
/// HMAC-BLAKE2s, the chaining key as salt and an empty info string:
/// T1 = HMAC(PRK, 0x1), T2 = HMAC(PRK, T1 || 0x2), T3 = HMAC(PRK, T2 || 0x3).
fn reference_kdf(key: &[u8; 32], input: &[u8]) -> [[u8; 32]; 3] {
    let prk = reference_hmac(key, &[input]);
    let t1 = reference_hmac(&prk, &[&[1]]);
    let t2 = reference_hmac(&prk, &[&t1, &[2]]);
    let t3 = reference_hmac(&prk, &[&t2, &[3]]);
    [t1, t2, t3]
}

#[test]
fn hmac_matches_hmac_crate() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x4a4c);
    for len in 0..300 {
        let key: [u8; 32] = rng.gen();
        let input: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let cut = rng.gen_range(0..=len);
        let want = reference_hmac(&key, &[&input]);
        assert_eq!(hmac(&key, &[&input]), want, "len {len}");
        assert_eq!(hmac(&key, &[&input[..cut], &input[cut..]]), want, "len {len} cut {cut}");
    }
}

#[test]
fn kdf_matches_reference_hkdf() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x4bdf);
    for len in [0usize, 1, 16, 32, 33, 64, 65, 100, 200] {
        let key: [u8; 32] = rng.gen();
        let input: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let want = reference_kdf(&key, &input);
        assert_eq!(kdf::<1>(&key, &input), [want[0]], "len {len}");
        assert_eq!(kdf::<2>(&key, &input), [want[0], want[1]], "len {len}");
        assert_eq!(kdf::<3>(&key, &input), want, "len {len}");
    }
}

/// A chain of KDF steps shaped like the handshake's: Ci = KDF1(Ci, Epub),
/// (Ci, k) = KDF2(Ci, DH), (Ci, t, k) = KDF3(Ci, Q), starting from WireGuard's
/// initial chaining key; ours and the reference must stay in lock step.
#[test]
fn kdf_handshake_shaped_chain() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xc4a1);
    let mut ours = hash(&[CONSTRUCTION]);
    let mut theirs = ours;
    for step in 0..60 {
        let input: [u8; 32] = rng.gen();
        match step % 3 {
            0 => {
                let [c] = kdf::<1>(&ours, &input);
                ours = c;
            }
            1 => {
                let [c, k] = kdf::<2>(&ours, &input);
                ours = c;
                assert_eq!(k, reference_kdf(&theirs, &input)[1]);
            }
            _ => {
                let [c, t, k] = kdf::<3>(&ours, &input);
                ours = c;
                let r = reference_kdf(&theirs, &input);
                assert_eq!((t, k), (r[1], r[2]));
            }
        }
        theirs = reference_kdf(&theirs, &input)[0];
        assert_eq!(ours, theirs, "step {step}");
    }
}
