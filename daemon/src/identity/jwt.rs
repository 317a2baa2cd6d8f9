//! JSON Web Tokens (RFC 7519) as compact JWS (RFC 7515): a header naming
//! the algorithm and the key id, the claims, and the signature of the two.

use super::keys::SigningKey;
use super::{b64url, IdentityError};
use serde::Serialize;

/// The registered claims a workload or ID token carries, plus any others.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Claims {
    /// Issuer: the control server's issuer URL.
    pub iss: String,
    /// Subject: the node (or person) the token names.
    pub sub: String,
    /// Audience: who the token is for.
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds.
    pub nbf: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// A unique token id.
    pub jti: String,
    /// Further claims (addresses, tags…), at the top level of the payload.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// Claims for `sub` at `aud`, valid from `now` for `lifetime_secs`, with
    /// a random `jti`.
    pub fn new(iss: &str, sub: &str, aud: &str, now: i64, lifetime_secs: i64) -> Result<Claims, IdentityError> {
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
            .map_err(|_| IdentityError::Randomness)?;
        Ok(Claims {
            iss: iss.into(),
            sub: sub.into(),
            aud: aud.into(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(lifetime_secs),
            jti: b64url(&jti),
            extra: serde_json::Map::new(),
        })
    }
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
}

/// Signs `claims` (any JSON object) with `key`: `header.payload.signature`.
pub fn sign(key: &SigningKey, claims: &impl Serialize) -> Result<String, IdentityError> {
    let payload = serde_json::to_value(claims).map_err(|e| IdentityError::Claims(e.to_string()))?;
    if !payload.is_object() {
        return Err(IdentityError::Claims("the claims must be a JSON object".into()));
    }
    let header = Header { alg: key.alg().name(), typ: "JWT", kid: key.kid() };
    let header = serde_json::to_vec(&header).map_err(|e| IdentityError::Claims(e.to_string()))?;
    let payload = serde_json::to_vec(&payload).map_err(|e| IdentityError::Claims(e.to_string()))?;
    let mut token = format!("{}.{}", b64url(&header), b64url(&payload));
    let signature = key.sign(token.as_bytes())?;
    token.push('.');
    token.push_str(&b64url(&signature));
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::keys::{Algorithm, KeySet};
    use crate::identity::oidc::jwks;
    use crate::identity::unb64url;
    use jsonwebtoken::jwk::{JwkSet, ThumbprintHash};
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};

    const ISS: &str = "https://control.example:8443";

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn their_alg(alg: Algorithm) -> jsonwebtoken::Algorithm {
        match alg {
            Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
            Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
            Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        }
    }

    /// Verifies `token` the way an outside verifier would: the JWKS as JSON
    /// text, the key picked by the header's kid, jsonwebtoken's checks.
    fn verify(jwks_json: &str, token: &str, aud: &str) -> Result<serde_json::Value, String> {
        let set: JwkSet = serde_json::from_str(jwks_json).map_err(|e| e.to_string())?;
        let header = decode_header(token).map_err(|e| e.to_string())?;
        let kid = header.kid.ok_or("no kid")?;
        let jwk = set.find(&kid).ok_or("kid not in the JWKS")?;
        assert_eq!(jwk.thumbprint(ThumbprintHash::SHA256).unwrap(), kid, "our kid is their thumbprint");
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut v = Validation::new(header.alg);
        v.set_audience(&[aud]);
        v.set_issuer(&[ISS]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "sub", "aud"]);
        v.validate_nbf = true;
        decode::<serde_json::Value>(token, &key, &v).map(|d| d.claims).map_err(|e| e.to_string())
    }

    fn jwks_text(set: &KeySet) -> String {
        serde_json::to_string(&jwks(set)).unwrap()
    }

    #[test]
    fn an_independent_library_verifies_our_tokens_from_our_jwks() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256] {
            let set = KeySet::generate(alg, now()).unwrap();
            let mut claims = Claims::new(ISS, "node:web1", "https://app.example", now(), 300).unwrap();
            claims.extra.insert("tags".into(), serde_json::json!(["tag:web"]));
            claims.extra.insert("addresses".into(), serde_json::json!(["100.64.0.1", "fd7a::1"]));
            let token = sign(set.current(), &claims).unwrap();
            let header = decode_header(&token).unwrap();
            assert_eq!((header.alg, header.kid.as_deref()), (their_alg(alg), Some(set.current().kid())));
            assert_eq!(header.typ.as_deref(), Some("JWT"));
            let got = verify(&jwks_text(&set), &token, "https://app.example").unwrap();
            assert_eq!(got, serde_json::to_value(&claims).unwrap(), "{alg:?}");
            assert_eq!(got["tags"][0], "tag:web");
            // ES256 signatures are r || s, 64 bytes, as JWS wants (not DER);
            // RS256 ones as long as the 2048-bit modulus.
            let sig = unb64url(token.rsplit('.').next().unwrap()).unwrap();
            assert_eq!(sig.len(), if alg == Algorithm::RS256 { 256 } else { 64 }, "{alg:?}");

            // What must fail: another audience, a changed payload, a changed
            // signature, an expired token, a token from another issuer's key
            // under a kid we do not publish, and alg "none".
            assert!(verify(&jwks_text(&set), &token, "https://other.example").is_err());
            let parts: Vec<&str> = token.split('.').collect();
            let mut forged = claims.clone();
            forged.sub = "node:admin".into();
            let forged_payload = b64url(&serde_json::to_vec(&forged).unwrap());
            let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
            assert!(verify(&jwks_text(&set), &tampered, "https://app.example").is_err());
            let mut sig = sig.clone();
            sig[10] ^= 1;
            let bad_sig = format!("{}.{}.{}", parts[0], parts[1], b64url(&sig));
            assert!(verify(&jwks_text(&set), &bad_sig, "https://app.example").is_err());
            let old = Claims::new(ISS, "node:web1", "https://app.example", now() - 1000, 300).unwrap();
            let expired = sign(set.current(), &old).unwrap();
            assert!(verify(&jwks_text(&set), &expired, "https://app.example").unwrap_err().contains("Expired"));
            let stranger = KeySet::generate(alg, now()).unwrap();
            let foreign = sign(stranger.current(), &claims).unwrap();
            assert_eq!(verify(&jwks_text(&set), &foreign, "https://app.example").unwrap_err(), "kid not in the JWKS");
            let none = format!("{}.{}.", b64url(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
            assert!(verify(&jwks_text(&set), &none, "https://app.example").is_err());
        }
    }

    #[test]
    fn tokens_verify_across_a_rotation_until_their_key_is_pruned() {
        let t = now();
        let mut set = KeySet::generate(Algorithm::ES256, t).unwrap();
        let claims = Claims::new(ISS, "node:db", "aud", t, 600).unwrap();
        let before = sign(set.current(), &claims).unwrap();
        // A verifier that fetched the JWKS before the rotation already has
        // the key that signs after it.
        let cached = jwks_text(&set);
        set.rotate(Algorithm::EdDSA, t).unwrap();
        let after = sign(set.current(), &claims).unwrap();
        assert_eq!(decode_header(&after).unwrap().alg, jsonwebtoken::Algorithm::ES256);
        assert!(verify(&cached, &after, "aud").is_ok(), "the next key was published before it signed");
        // The fresh JWKS still verifies the token signed before.
        assert!(verify(&jwks_text(&set), &before, "aud").is_ok());
        // Kept as long as a token lives: pruning before that keeps it...
        set.prune(t + 599, 600);
        assert!(verify(&jwks_text(&set), &before, "aud").is_ok());
        // ...and after that the old key is no longer published.
        set.prune(t + 600, 600);
        assert_eq!(verify(&jwks_text(&set), &before, "aud").unwrap_err(), "kid not in the JWKS");
        // Two rotations on, the EdDSA key signs.
        set.rotate(Algorithm::EdDSA, t).unwrap();
        let ed = sign(set.current(), &claims).unwrap();
        assert_eq!(decode_header(&ed).unwrap().alg, jsonwebtoken::Algorithm::EdDSA);
        assert!(verify(&jwks_text(&set), &ed, "aud").is_ok());
    }

    #[test]
    fn rs256_tokens_verify_across_rotations_and_an_algorithm_switch() {
        let t = now();
        let mut set = KeySet::generate(Algorithm::ES256, t).unwrap();
        let claims = Claims::new(ISS, "node:db", "aud", t, 600).unwrap();
        let es = sign(set.current(), &claims).unwrap();
        // Switching to RS256: the next key (already published) signs ES256
        // once more, then the RS256 key made at the first rotation signs.
        set.rotate(Algorithm::RS256, t).unwrap();
        assert_eq!(set.next().alg(), Algorithm::RS256);
        let cached = jwks_text(&set);
        set.rotate(Algorithm::RS256, t + 1).unwrap();
        let rs = sign(set.current(), &claims).unwrap();
        assert_eq!(decode_header(&rs).unwrap().alg, jsonwebtoken::Algorithm::RS256);
        // A verifier holding the JWKS from before this rotation knows the key.
        assert!(verify(&cached, &rs, "aud").is_ok());
        // Another rotation: the RS256 token and the ES256 one from before
        // the switch both still verify from the fresh JWKS.
        set.rotate(Algorithm::RS256, t + 2).unwrap();
        assert_ne!(set.current().kid(), decode_header(&rs).unwrap().kid.unwrap());
        let jwks = jwks_text(&set);
        assert_eq!(verify(&jwks, &rs, "aud").unwrap()["sub"], "node:db");
        assert!(verify(&jwks, &es, "aud").is_ok());
        // A tampered RS256 token is refused: payload, signature, or the
        // header's alg swapped to HS256 with the public key as the secret.
        let parts: Vec<&str> = rs.split('.').collect();
        let mut forged = claims.clone();
        forged.aud = "other".into();
        let forged = format!("{}.{}.{}", parts[0], b64url(&serde_json::to_vec(&forged).unwrap()), parts[2]);
        assert!(verify(&jwks, &forged, "other").unwrap_err().contains("InvalidSignature"));
        let mut sig = unb64url(parts[2]).unwrap();
        sig[0] ^= 0x80;
        let bad_sig = format!("{}.{}.{}", parts[0], parts[1], b64url(&sig));
        assert!(verify(&jwks, &bad_sig, "aud").is_err());
        let kid = decode_header(&rs).unwrap().kid.unwrap();
        let hs_header = b64url(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#).as_bytes());
        let hs_input = format!("{hs_header}.{}", parts[1]);
        let n = set.published().find(|k| k.kid() == kid).unwrap().public_jwk().n.clone().unwrap();
        let mac = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, n.as_bytes()), hs_input.as_bytes());
        assert!(verify(&jwks, &format!("{hs_input}.{}", b64url(mac.as_ref())), "aud").is_err());
        // Its key retired at t + 2: kept for a token's lifetime after that,
        // then no longer published.
        set.prune(t + 2 + 599, 600);
        assert!(verify(&jwks_text(&set), &rs, "aud").is_ok());
        set.prune(t + 2 + 600, 600);
        assert_eq!(verify(&jwks_text(&set), &rs, "aud").unwrap_err(), "kid not in the JWKS");
    }

    #[test]
    fn claims_must_be_an_object() {
        let set = KeySet::generate(Algorithm::EdDSA, 0).unwrap();
        assert!(matches!(sign(set.current(), &"just a string"), Err(IdentityError::Claims(_))));
        assert!(sign(set.current(), &serde_json::json!({"sub": "x"})).is_ok());
    }
}
