//! Signing keys and their rotation.
//!
//! A [`SigningKey`] is an ES256 or EdDSA key pair (ring), stored as PKCS#8
//! and named by its RFC 7638 JWK thumbprint. A [`KeySet`] is what the
//! issuer keeps: the `current` key signs; the `next` key is already
//! published, so verifiers holding a cached JWKS know it before the first
//! token it signs; `retired` keys stay published for a while after they
//! stop signing, so tokens they signed verify until those expire.
//! [`KeySet::rotate`] moves each one step; [`KeySet::prune`] drops retired
//! keys once no token they signed can still be valid.

use super::{b64url, unb64url, IdentityError};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};

/// A JWS signature algorithm we sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256, signature as r || s (RFC 7518 section 3.4).
    ES256,
    /// Ed25519 (RFC 8037).
    EdDSA,
}

impl Algorithm {
    /// The `alg` value.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::ES256 => "ES256",
            Algorithm::EdDSA => "EdDSA",
        }
    }
}

enum Pair {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// PKCS#8 bytes, wiped when dropped and never printed.
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// One signing key.
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    jwk: Jwk,
    created_at: i64,
    pkcs8: Secret,
    pair: Pair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// A key as the store keeps it. Holds the private key: keep it as secret
/// as the store (its `Debug` does not show it, and it is wiped on drop).
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredKey {
    /// The algorithm.
    pub alg: Algorithm,
    /// The key id (the public key's JWK thumbprint).
    pub kid: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The private key, PKCS#8 DER in base64url.
    pub pkcs8: String,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl Drop for StoredKey {
    fn drop(&mut self) {
        // SAFETY: zero bytes are valid UTF-8.
        unsafe { self.pkcs8.as_bytes_mut() }.fill(0);
        std::hint::black_box(&self.pkcs8);
    }
}

/// A public key as a JWK (RFC 7517), the form the JWKS publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `EC` or `OKP`.
    pub kty: String,
    /// `P-256` or `Ed25519`.
    pub crv: String,
    /// The x coordinate (EC) or the public key (OKP), base64url.
    pub x: String,
    /// The y coordinate (EC only), base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// The key id.
    pub kid: String,
    /// The algorithm it verifies.
    pub alg: String,
    /// `sig`.
    #[serde(rename = "use")]
    pub use_: String,
}

impl Jwk {
    /// The RFC 7638 thumbprint: SHA-256 over the required members in
    /// lexicographic order with no whitespace, base64url.
    pub fn thumbprint(&self) -> String {
        // The member values are base64url and fixed names: no JSON escaping needed.
        let canonical = match &self.y {
            Some(y) => format!(r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#, self.crv, self.kty, self.x, y),
            None => format!(r#"{{"crv":"{}","kty":"{}","x":"{}"}}"#, self.crv, self.kty, self.x),
        };
        b64url(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }
}

fn public_jwk(alg: Algorithm, public: &[u8]) -> Result<Jwk, IdentityError> {
    let (kty, crv, x, y) = match alg {
        // Uncompressed point: 0x04 || x || y.
        Algorithm::ES256 if public.len() == 65 && public[0] == 4 => {
            ("EC", "P-256", b64url(&public[1..33]), Some(b64url(&public[33..])))
        }
        Algorithm::EdDSA if public.len() == 32 => ("OKP", "Ed25519", b64url(public), None),
        _ => {
            return Err(IdentityError::BadKey(format!(
                "unexpected {} public key of {} bytes",
                alg.name(),
                public.len()
            )))
        }
    };
    let mut jwk =
        Jwk { kty: kty.into(), crv: crv.into(), x, y, kid: String::new(), alg: alg.name().into(), use_: "sig".into() };
    jwk.kid = jwk.thumbprint();
    Ok(jwk)
}

impl SigningKey {
    /// A fresh key.
    pub fn generate(alg: Algorithm, now: i64) -> Result<SigningKey, IdentityError> {
        let rng = SystemRandom::new();
        let pkcs8 = match alg {
            Algorithm::ES256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
            Algorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng),
        }
        .map_err(|_| IdentityError::Randomness)?;
        Self::from_pkcs8(alg, Secret(pkcs8.as_ref().to_vec()), now)
    }

    fn from_pkcs8(alg: Algorithm, pkcs8: Secret, created_at: i64) -> Result<SigningKey, IdentityError> {
        let pair = match alg {
            Algorithm::ES256 => {
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8.0, &SystemRandom::new())
                    .map(Pair::Ecdsa)
            }
            Algorithm::EdDSA => Ed25519KeyPair::from_pkcs8(&pkcs8.0).map(Pair::Ed25519),
        }
        .map_err(|e| IdentityError::BadKey(format!("not a PKCS#8 {} key: {e}", alg.name())))?;
        let public = match &pair {
            Pair::Ecdsa(p) => p.public_key().as_ref().to_vec(),
            Pair::Ed25519(p) => p.public_key().as_ref().to_vec(),
        };
        let jwk = public_jwk(alg, &public)?;
        Ok(SigningKey { alg, kid: jwk.kid.clone(), jwk, created_at, pkcs8, pair })
    }

    /// The key back from its stored form; its `kid` must match the key.
    pub fn from_stored(stored: &StoredKey) -> Result<SigningKey, IdentityError> {
        let der = unb64url(&stored.pkcs8).ok_or_else(|| IdentityError::BadKey("pkcs8 is not base64url".into()))?;
        let key = Self::from_pkcs8(stored.alg, Secret(der), stored.created_at)?;
        if key.kid != stored.kid {
            return Err(IdentityError::BadKey(format!("kid {:?} does not match the key ({})", stored.kid, key.kid)));
        }
        Ok(key)
    }

    /// What the store keeps (the private key included).
    pub fn to_stored(&self) -> StoredKey {
        StoredKey { alg: self.alg, kid: self.kid.clone(), created_at: self.created_at, pkcs8: b64url(&self.pkcs8.0) }
    }

    /// The algorithm.
    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Unix seconds of creation.
    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    /// The public key as a JWK.
    pub fn public_jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// Signs `message`: r || s (64 bytes) for ES256, 64 bytes for EdDSA.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, IdentityError> {
        match &self.pair {
            Pair::Ecdsa(p) => {
                p.sign(&SystemRandom::new(), message).map(|s| s.as_ref().to_vec()).map_err(|_| IdentityError::Signing)
            }
            Pair::Ed25519(p) => Ok(p.sign(message).as_ref().to_vec()),
        }
    }
}

/// A retired key and when it stopped signing.
#[derive(Debug)]
pub struct Retired {
    /// The key.
    pub key: SigningKey,
    /// Unix seconds when it stopped signing.
    pub retired_at: i64,
}

/// The issuer's keys: one signs, one waits, some are retired.
#[derive(Debug)]
pub struct KeySet {
    current: SigningKey,
    next: SigningKey,
    retired: Vec<Retired>,
}

/// A [`KeySet`] as the store keeps it (private keys included).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredKeySet {
    /// The key that signs.
    pub current: StoredKey,
    /// The key that signs after the next rotation.
    pub next: StoredKey,
    /// Retired keys, oldest first, with the Unix second each was retired.
    pub retired: Vec<(StoredKey, i64)>,
}

impl KeySet {
    /// A fresh set of `alg` keys.
    pub fn generate(alg: Algorithm, now: i64) -> Result<KeySet, IdentityError> {
        Ok(KeySet { current: SigningKey::generate(alg, now)?, next: SigningKey::generate(alg, now)?, retired: vec![] })
    }

    /// The key that signs now.
    pub fn current(&self) -> &SigningKey {
        &self.current
    }

    /// The key that signs after the next rotation (already published).
    pub fn next(&self) -> &SigningKey {
        &self.next
    }

    /// The retired keys still published, oldest first.
    pub fn retired(&self) -> &[Retired] {
        &self.retired
    }

    /// Rotates: `next` starts signing, `current` retires (still published),
    /// and a fresh `next` of `alg` is made (the algorithm may change here).
    pub fn rotate(&mut self, alg: Algorithm, now: i64) -> Result<(), IdentityError> {
        let fresh = SigningKey::generate(alg, now)?;
        let next = std::mem::replace(&mut self.next, fresh);
        let old = std::mem::replace(&mut self.current, next);
        self.retired.push(Retired { key: old, retired_at: now });
        Ok(())
    }

    /// Drops retired keys that stopped signing at least `keep_secs` ago.
    /// `keep_secs` must be at least the longest lifetime of a token (plus
    /// the clock skew verifiers allow), so no valid token loses its key.
    pub fn prune(&mut self, now: i64, keep_secs: i64) {
        self.retired.retain(|r| r.retired_at.saturating_add(keep_secs) > now);
    }

    /// Every published key: current, next, then retired, newest first.
    pub fn published(&self) -> impl Iterator<Item = &SigningKey> {
        [&self.current, &self.next].into_iter().chain(self.retired.iter().rev().map(|r| &r.key))
    }

    /// What the store keeps.
    pub fn to_stored(&self) -> StoredKeySet {
        StoredKeySet {
            current: self.current.to_stored(),
            next: self.next.to_stored(),
            retired: self.retired.iter().map(|r| (r.key.to_stored(), r.retired_at)).collect(),
        }
    }

    /// The set back from the store.
    pub fn from_stored(stored: &StoredKeySet) -> Result<KeySet, IdentityError> {
        let retired = stored
            .retired
            .iter()
            .map(|(k, at)| Ok(Retired { key: SigningKey::from_stored(k)?, retired_at: *at }))
            .collect::<Result<_, IdentityError>>()?;
        Ok(KeySet {
            current: SigningKey::from_stored(&stored.current)?,
            next: SigningKey::from_stored(&stored.next)?,
            retired,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kid_is_the_rfc7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of the Ed25519 example key.
        let jwk = Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
            y: None,
            kid: String::new(),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        };
        assert_eq!(jwk.thumbprint(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        // RFC 8037 A.1's private key gives that public key, so a stored key
        // built from it gets that kid.
        let seed = unb64url("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap();
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        assert_eq!(b64url(pair.public_key().as_ref()), jwk.x);
    }

    #[test]
    fn keys_round_trip_through_storage_and_refuse_mismatches() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA] {
            let k = SigningKey::generate(alg, 100).unwrap();
            let stored = k.to_stored();
            let json = serde_json::to_string(&stored).unwrap();
            let back = SigningKey::from_stored(&serde_json::from_str(&json).unwrap()).unwrap();
            assert_eq!((back.kid(), back.alg(), back.created_at()), (k.kid(), alg, 100));
            assert_eq!(back.public_jwk(), k.public_jwk());
            assert_eq!(k.public_jwk().kid, k.kid());
            assert_eq!(k.public_jwk().thumbprint(), k.kid());
            // The secret is in the stored form but never in Debug output.
            assert!(json.contains(&stored.pkcs8));
            for dbg in [format!("{k:?}"), format!("{stored:?}")] {
                assert!(!dbg.contains(&stored.pkcs8[..20]), "{dbg}");
            }
            // A wrong kid, garbage, or the other algorithm's key: errors.
            let mut wrong = stored.clone();
            wrong.kid = "x".into();
            assert!(matches!(SigningKey::from_stored(&wrong), Err(IdentityError::BadKey(_))));
            let mut garbage = stored.clone();
            garbage.pkcs8 = "AAAA".into();
            assert!(SigningKey::from_stored(&garbage).is_err());
            garbage.pkcs8 = "not base64!".into();
            assert!(SigningKey::from_stored(&garbage).is_err());
            let mut other = stored.clone();
            other.alg = if alg == Algorithm::ES256 { Algorithm::EdDSA } else { Algorithm::ES256 };
            assert!(SigningKey::from_stored(&other).is_err());
        }
        // Distinct keys, distinct kids.
        let a = SigningKey::generate(Algorithm::EdDSA, 0).unwrap();
        let b = SigningKey::generate(Algorithm::EdDSA, 0).unwrap();
        assert_ne!(a.kid(), b.kid());
    }

    #[test]
    fn rotation_publishes_the_next_key_first_and_keeps_retired_ones_until_pruned() {
        let mut set = KeySet::generate(Algorithm::ES256, 0).unwrap();
        let (first, second) = (set.current().kid().to_string(), set.next().kid().to_string());
        let kids = |s: &KeySet| s.published().map(|k| k.kid().to_string()).collect::<Vec<_>>();
        assert_eq!(kids(&set), [first.clone(), second.clone()]);
        set.rotate(Algorithm::EdDSA, 1000).unwrap();
        assert_eq!(set.current().kid(), second);
        assert_eq!(set.next().alg(), Algorithm::EdDSA);
        let third = set.next().kid().to_string();
        assert_eq!(kids(&set), [second.clone(), third.clone(), first.clone()]);
        set.rotate(Algorithm::EdDSA, 2000).unwrap();
        assert_eq!(kids(&set)[2..], [second.clone(), first.clone()]);
        // Kept for 1500 s after retiring: at 2499 both stay; at 2500 the
        // first (retired at 1000) goes, the second (retired at 2000) stays.
        set.prune(2499, 1500);
        assert_eq!(set.retired().len(), 2);
        set.prune(2500, 1500);
        assert_eq!(set.retired().len(), 1);
        assert_eq!(set.retired()[0].key.kid(), second);
        // Stored and back: the same keys in the same roles.
        let stored = set.to_stored();
        let back =
            KeySet::from_stored(&serde_json::from_str(&serde_json::to_string(&stored).unwrap()).unwrap()).unwrap();
        assert_eq!(kids(&back), kids(&set));
        assert_eq!(back.retired()[0].retired_at, 2000);
        set.prune(3500, 1500);
        assert!(set.retired().is_empty());
    }
}
