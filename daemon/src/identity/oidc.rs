//! The documents verifiers fetch: the JWKS (RFC 7517 section 5) and the
//! OpenID Connect discovery document (OpenID Connect Discovery 1.0 section
//! 3, also RFC 8414's metadata).

use super::keys::{Jwk, KeySet};
use super::IdentityError;
use serde::{Deserialize, Serialize};

/// `{"keys": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// Every published public key.
    pub keys: Vec<Jwk>,
}

/// The JWKS of `set`: the current, next and retired keys.
pub fn jwks(set: &KeySet) -> JwkSet {
    JwkSet { keys: set.published().map(|k| k.public_jwk().clone()).collect() }
}

/// Where the JWKS lives under an issuer.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Where the discovery document lives under an issuer.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// The OpenID provider metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// The issuer, exactly as tokens' `iss`.
    pub issuer: String,
    /// The JWKS URL.
    pub jwks_uri: String,
    /// The authorization endpoint (for people signing in), when served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_endpoint: Option<String>,
    /// The token endpoint, when served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
    /// The userinfo endpoint, when served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userinfo_endpoint: Option<String>,
    /// `code` (authorization code flow) and `id_token`.
    pub response_types_supported: Vec<String>,
    /// `public`: a node's subject is the same for every client.
    pub subject_types_supported: Vec<String>,
    /// The algorithms of the published keys.
    pub id_token_signing_alg_values_supported: Vec<String>,
    /// `S256` only (PKCE, RFC 7636).
    pub code_challenge_methods_supported: Vec<String>,
    /// The scopes.
    pub scopes_supported: Vec<String>,
}

/// Checks an issuer identifier: an `https` URL with a host and no query or
/// fragment (OpenID Connect Core section 2); a trailing slash is dropped, so
/// paths join cleanly.
pub fn check_issuer(issuer: &str) -> Result<String, IdentityError> {
    let bad = |why: &str| IdentityError::BadDocument(format!("issuer {issuer:?}: {why}"));
    let rest = issuer.strip_prefix("https://").ok_or_else(|| bad("must be an https:// URL"))?;
    if issuer.contains(['?', '#']) || issuer.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("no query, fragment or spaces"));
    }
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') || host.contains('@') {
        return Err(bad("needs a host"));
    }
    Ok(issuer.trim_end_matches('/').to_string())
}

impl Discovery {
    /// The document for `issuer` publishing `set`'s keys; the endpoints for
    /// signing people in are left out until they are served.
    pub fn new(issuer: &str, set: &KeySet) -> Result<Discovery, IdentityError> {
        let issuer = check_issuer(issuer)?;
        let mut algs: Vec<String> = Vec::new();
        for k in set.published() {
            let a = k.alg().name().to_string();
            if !algs.contains(&a) {
                algs.push(a);
            }
        }
        Ok(Discovery {
            jwks_uri: format!("{issuer}{JWKS_PATH}"),
            issuer,
            authorization_endpoint: None,
            token_endpoint: None,
            userinfo_endpoint: None,
            response_types_supported: vec!["code".into(), "id_token".into()],
            subject_types_supported: vec!["public".into()],
            id_token_signing_alg_values_supported: algs,
            code_challenge_methods_supported: vec!["S256".into()],
            scopes_supported: vec!["openid".into()],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::keys::Algorithm;

    #[test]
    fn jwks_lists_every_published_key_in_rfc_form() {
        let mut set = KeySet::generate(Algorithm::ES256, 0).unwrap();
        set.rotate(Algorithm::EdDSA, 10).unwrap();
        set.rotate(Algorithm::RS256, 20).unwrap();
        let doc = serde_json::to_value(jwks(&set)).unwrap();
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 4);
        let kids: Vec<&str> = keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
        let ours: Vec<&str> = set.published().map(|k| k.kid()).collect();
        assert_eq!(kids, ours);
        for k in keys {
            assert_eq!(k["use"], "sig");
            match k["kty"].as_str().unwrap() {
                "EC" => {
                    assert_eq!((&k["crv"], &k["alg"]), (&"P-256".into(), &"ES256".into()));
                    assert_eq!(k["x"].as_str().unwrap().len(), 43);
                    assert_eq!(k["y"].as_str().unwrap().len(), 43);
                }
                "OKP" => {
                    assert_eq!((&k["crv"], &k["alg"]), (&"Ed25519".into(), &"EdDSA".into()));
                    assert_eq!(k["x"].as_str().unwrap().len(), 43);
                    assert!(k.get("y").is_none());
                }
                "RSA" => {
                    assert_eq!((&k["alg"], &k["e"]), (&"RS256".into(), &"AQAB".into()));
                    // 256 bytes of modulus, base64url without padding.
                    assert_eq!(k["n"].as_str().unwrap().len(), 342);
                    assert!(k.get("crv").is_none() && k.get("x").is_none());
                }
                other => panic!("kty {other}"),
            }
            // Public keys only.
            for private in ["d", "p", "q", "dp", "dq", "qi"] {
                assert!(k.get(private).is_none());
            }
        }
    }

    #[test]
    fn discovery_names_the_issuer_jwks_and_algorithms() {
        let mut set = KeySet::generate(Algorithm::ES256, 0).unwrap();
        let d = Discovery::new("https://control.example:8443/", &set).unwrap();
        assert_eq!(d.issuer, "https://control.example:8443");
        assert_eq!(d.jwks_uri, "https://control.example:8443/.well-known/jwks.json");
        assert_eq!(d.id_token_signing_alg_values_supported, ["ES256"]);
        set.rotate(Algorithm::EdDSA, 1).unwrap();
        let d = Discovery::new("https://control.example/tailnet", &set).unwrap();
        assert_eq!(d.jwks_uri, "https://control.example/tailnet/.well-known/jwks.json");
        assert_eq!(d.id_token_signing_alg_values_supported, ["ES256", "EdDSA"]);
        // Switched to RS256: listed once its key is published, and ES256
        // stays while an ES256 key does.
        set.rotate(Algorithm::RS256, 2).unwrap();
        let d = Discovery::new("https://control.example", &set).unwrap();
        assert_eq!(d.id_token_signing_alg_values_supported, ["EdDSA", "RS256", "ES256"]);
        let json = serde_json::to_value(&d).unwrap();
        assert!(json.get("token_endpoint").is_none());
        assert_eq!(json["subject_types_supported"][0], "public");
        for bad in [
            "http://control.example",
            "https://",
            "https:///path",
            "https://:443",
            "https://a.example?x=1",
            "https://a.example#f",
            "https://user@a.example",
            "https://a.example/ x",
            "control.example",
        ] {
            assert!(matches!(Discovery::new(bad, &set), Err(IdentityError::BadDocument(_))), "{bad}");
        }
    }
}
