//! Identity: the signing keys the control server will issue tokens with, the
//! JWTs it signs, and the documents verifiers fetch (JWKS, OIDC discovery).
//!
//! Nothing here is wired to the server yet: these are the pieces, tested on
//! their own, with every token checked by an independent JOSE library from
//! the JWKS we publish.
//!
//! * [`keys`]: ES256 (ECDSA P-256 with SHA-256) and EdDSA (Ed25519) signing
//!   keys made with ring; each has a `kid` that is its RFC 7638 JWK
//!   thumbprint; a [`keys::KeySet`] holds the key that signs, the next one
//!   (published before it signs, so verifiers that cache the JWKS already
//!   know it) and retired ones (published until every token they signed has
//!   expired), and is stored as JSON.
//! * [`jwt`]: compact JWS (RFC 7515) of JSON claims (RFC 7519).
//! * [`oidc`]: the JWKS document (RFC 7517) and the OpenID Connect discovery
//!   document.

mod b64;
pub mod caller;
pub mod client;
pub mod jwt;
pub mod keys;
pub mod oidc;
pub mod provider;
pub mod service;
pub mod tokens;

/// Why an identity operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    /// The system's random generator failed.
    Randomness,
    /// Stored key material did not parse or does not match its algorithm.
    BadKey(String),
    /// Signing failed.
    Signing,
    /// Claims could not be serialized.
    Claims(String),
    /// An issuer URL or another document field is not acceptable.
    BadDocument(String),
}

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityError::Randomness => f.write_str("the system random generator failed"),
            IdentityError::BadKey(why) => write!(f, "bad signing key: {why}"),
            IdentityError::Signing => f.write_str("signing failed"),
            IdentityError::Claims(why) => write!(f, "claims cannot be encoded: {why}"),
            IdentityError::BadDocument(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for IdentityError {}

pub use b64::{b64url, unb64url};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips_and_refuses_garbage() {
        // RFC 4648 section 10 vectors, in the URL alphabet without padding.
        for (plain, enc) in
            [("", ""), ("f", "Zg"), ("fo", "Zm8"), ("foo", "Zm9v"), ("foob", "Zm9vYg"), ("fooba", "Zm9vYmE")]
        {
            assert_eq!(b64url(plain.as_bytes()), enc);
            assert_eq!(unb64url(enc).unwrap(), plain.as_bytes());
        }
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        for n in 0..70u8 {
            let v: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            assert_eq!(unb64url(&b64url(&v)).unwrap(), v);
        }
        for bad in ["Zg=", "Z", "Zh", "Zm9v+", "Zm9v/", "a b"] {
            assert_eq!(unb64url(bad), None, "{bad}");
        }
    }
}
