//! Workload tokens: what `POST /token` on the identity service reads (an
//! `application/x-www-form-urlencoded` body) and the JWT it signs for the
//! calling node. See docs/identity.md, "Workload tokens".

use super::caller::Caller;
use super::jwt;
use super::keys::SigningKey;
use super::provider::form::FormError;
use crate::control::ApiError;
use serde_json::{json, Map, Value};

/// The policy capability naming the audiences a node may ask tokens for:
/// `{"audiences": ["https://vault.example", ...]}` (`"*"`: any).
pub const CAPABILITY: &str = "wiremesh.dev/cap/workload-token";

/// The most `name=value` pairs a form may have.
pub const MAX_PAIRS: usize = 64;
/// The most audiences one token may carry.
pub const MAX_AUDIENCES: usize = 16;
/// The longest audience accepted, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 512;
/// The largest form body accepted, in bytes.
pub const MAX_BODY: usize = 16 * 1024;

/// Token lifetimes, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// When the request names none (default 600: ten minutes).
    pub default: i64,
    /// The most a request may ask for (default 3600: one hour).
    pub max: i64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes { default: 600, max: 3600 }
    }
}

/// Decodes an `application/x-www-form-urlencoded` body (the WHATWG URL
/// standard's parser, strictly: `+` is a space, `%XX` a byte, the result must
/// be UTF-8, and a `%` not followed by two hex digits is refused rather than
/// kept). Empty pairs (`a&&b`) are skipped; a pair without `=` has an empty value.
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in body.split(|&b| b == b'&') {
        if pair.is_empty() {
            continue;
        }
        if out.len() == MAX_PAIRS {
            return Err(ApiError::bad_request(format!("more than {MAX_PAIRS} form fields")));
        }
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        out.push((decode_component(name)?, decode_component(value)?));
    }
    Ok(out)
}

fn decode_component(s: &[u8]) -> Result<String, ApiError> {
    super::provider::form::decode(s).map_err(|e| match e {
        FormError::NotUtf8 => ApiError::bad_request("the form is not UTF-8".into()),
        _ => ApiError::bad_request("bad percent-encoding in the form".into()),
    })
}

/// What a `POST /token` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The audiences, in request order, without repeats.
    pub audiences: Vec<String>,
    /// The lifetime in seconds.
    pub lifetime: i64,
}

/// Reads a token request from the form: `audience` (one or more, required)
/// and `lifetime` (seconds, 1 to `limits.max`; absent: `limits.default`).
/// Unknown fields are refused, so a typo is not silently ignored.
pub fn token_request(form: &[(String, String)], limits: Lifetimes) -> Result<TokenRequest, ApiError> {
    let mut audiences: Vec<String> = Vec::new();
    let mut lifetime = None;
    for (name, value) in form {
        match name.as_str() {
            "audience" => {
                if value.is_empty() || value.len() > MAX_AUDIENCE_LEN || value.chars().any(char::is_control) {
                    return Err(ApiError::new(
                        400,
                        "invalid_audience",
                        &format!("an audience must be 1 to {MAX_AUDIENCE_LEN} bytes without control characters"),
                    ));
                }
                if !audiences.contains(value) {
                    audiences.push(value.clone());
                }
                if audiences.len() > MAX_AUDIENCES {
                    return Err(ApiError::new(400, "invalid_audience", &format!("at most {MAX_AUDIENCES} audiences")));
                }
            }
            "lifetime" => {
                if lifetime.is_some() {
                    return Err(ApiError::new(400, "invalid_lifetime", "lifetime given twice"));
                }
                let secs = value
                    .parse::<i64>()
                    .ok()
                    .filter(|s| (1..=limits.max).contains(s) && !value.starts_with('+'))
                    .ok_or_else(|| {
                        ApiError::new(
                            400,
                            "invalid_lifetime",
                            &format!("lifetime must be a whole number of seconds from 1 to {}", limits.max),
                        )
                    })?;
                lifetime = Some(secs);
            }
            other => {
                let shown: String = other.chars().take(40).collect();
                return Err(ApiError::bad_request(format!("unknown form field {shown:?}")));
            }
        }
    }
    if audiences.is_empty() {
        return Err(ApiError::new(400, "invalid_audience", "audience is required (audience=<who the token is for>)"));
    }
    Ok(TokenRequest { audiences, lifetime: lifetime.unwrap_or(limits.default) })
}

/// Whether the policy lets `caller` ask for `audience`: with no policy, any;
/// with one, only audiences a `wiremesh.dev/cap/workload-token` grant to the
/// caller on the identity node lists (`"*"` lists them all).
pub fn audience_allowed(caller: &Caller, audience: &str) -> bool {
    if !caller.policy_set {
        return true;
    }
    caller.capability(CAPABILITY).iter().any(|v| {
        v.get("audiences")
            .and_then(Value::as_array)
            .is_some_and(|list| list.iter().any(|a| a.as_str().is_some_and(|a| a == "*" || a == audience)))
    })
}

/// The claims of a workload token for `caller`.
pub fn claims(issuer: &str, caller: &Caller, req: &TokenRequest, now: i64, jti: &str) -> Map<String, Value> {
    let n = &caller.node;
    let mut c = Map::new();
    c.insert("iss".into(), json!(issuer));
    c.insert("sub".into(), json!(subject(n.id)));
    c.insert("aud".into(), if req.audiences.len() == 1 { json!(req.audiences[0]) } else { json!(req.audiences) });
    c.insert("iat".into(), json!(now));
    c.insert("nbf".into(), json!(now));
    c.insert("exp".into(), json!(now.saturating_add(req.lifetime)));
    c.insert("jti".into(), json!(jti));
    c.insert("name".into(), json!(n.name));
    c.insert("fqdn".into(), json!(n.fqdn));
    c.insert("addresses".into(), json!([n.ipv4.to_string(), n.ipv6.to_string()]));
    c.insert("tags".into(), json!(n.tags));
    if let Some(user) = &caller.user {
        c.insert("owner".into(), json!(user.login));
    }
    c
}

/// A node's token subject: its stable id, as `node:<id>`.
pub fn subject(id: i64) -> String {
    format!("node:{id}")
}

/// A fresh random token id (128 bits, base64url).
pub fn new_jti() -> Result<String, ApiError> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| ApiError::internal("no randomness".into()))?;
    Ok(super::b64url(&b))
}

/// The token response body.
pub fn issue(key: &SigningKey, issuer: &str, caller: &Caller, req: &TokenRequest, now: i64) -> Result<Value, ApiError> {
    if let Some(denied) = req.audiences.iter().find(|a| !audience_allowed(caller, a)) {
        let shown: String = denied.chars().take(80).collect();
        return Err(ApiError::new(
            403,
            "audience_not_allowed",
            &format!("the policy grants this node no workload token for audience {shown:?} ({CAPABILITY})"),
        ));
    }
    let token = jwt::sign(key, &claims(issuer, caller, req, now, &new_jti()?))
        .map_err(|e| ApiError::internal(format!("cannot sign: {e}")))?;
    Ok(json!({ "access_token": token, "token_type": "Bearer", "expires_in": req.lifetime }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto::NodeInfo;
    use crate::identity::caller::User;
    use crate::identity::keys::{Algorithm, KeySet};
    use crate::identity::oidc::jwks;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
    use std::collections::BTreeMap;

    fn form(s: &str) -> Vec<(String, String)> {
        parse_form(s.as_bytes()).unwrap()
    }

    pub(crate) fn caller(tags: &[&str], owner: Option<&str>) -> Caller {
        Caller {
            node: NodeInfo {
                id: 7,
                name: "web".into(),
                fqdn: "web.wiremesh.internal".into(),
                node_key: String::new(),
                machine_key: String::new(),
                ipv4: "100.64.0.7".parse().unwrap(),
                ipv6: "fd00::7".parse().unwrap(),
                endpoints: vec![],
                allowed_ips: vec![],
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ephemeral: false,
                online: true,
                owner: owner.unwrap_or("tagged-devices").into(),
                created_at: 0,
                relay: None,
            },
            user: owner.map(|o| User { login: o.into(), display_name: o.into(), groups: vec![] }),
            capabilities: BTreeMap::new(),
            policy_set: false,
        }
    }

    #[test]
    fn forms_decode_like_browsers_encode_them() {
        assert_eq!(
            form("audience=https%3A%2F%2Fvault.example&audience=a+b&&lifetime=60&flag"),
            vec![
                ("audience".into(), "https://vault.example".into()),
                ("audience".into(), "a b".into()),
                ("lifetime".into(), "60".into()),
                ("flag".into(), String::new()),
            ]
        );
        assert_eq!(form("%C3%A9=%e2%82%AC"), vec![("é".into(), "€".into())]);
        assert!(form("").is_empty());
        for bad in ["a=%", "a=%4", "a=%zz", "a=%ff", "%80=b"] {
            assert_eq!(parse_form(bad.as_bytes()).unwrap_err().status, 400, "{bad}");
        }
        let many = vec!["a=b"; MAX_PAIRS + 1].join("&");
        assert!(parse_form(many.as_bytes()).is_err());
        assert_eq!(parse_form(vec!["a=b"; MAX_PAIRS].join("&").as_bytes()).unwrap().len(), MAX_PAIRS);
    }

    proptest::proptest! {
        /// Any bytes: an answer or a 400, never a panic; every decoded pair
        /// is UTF-8 and the count within the limit.
        #[test]
        fn the_form_parser_takes_any_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            match parse_form(&body) {
                Ok(pairs) => proptest::prop_assert!(pairs.len() <= MAX_PAIRS),
                Err(e) => proptest::prop_assert_eq!(e.status, 400),
            }
            if let Ok(pairs) = parse_form(&body) {
                let _ = token_request(&pairs, Lifetimes::default());
            }
        }

        /// What the client encodes, the service decodes to the same values.
        #[test]
        fn encoded_forms_round_trip(values in proptest::collection::vec(".{1,40}", 1..8)) {
            let body: Vec<String> = values
                .iter()
                .map(|v| format!("audience={}", crate::identity::client::form_encode(v)))
                .collect();
            let pairs = parse_form(body.join("&").as_bytes()).unwrap();
            let got: Vec<String> = pairs.into_iter().map(|(_, v)| v).collect();
            proptest::prop_assert_eq!(got, values);
        }
    }

    #[test]
    fn token_requests_need_an_audience_and_a_sane_lifetime() {
        let l = Lifetimes::default();
        let r = token_request(&form("audience=x&audience=y&audience=x"), l).unwrap();
        assert_eq!(r, TokenRequest { audiences: vec!["x".into(), "y".into()], lifetime: 600 });
        assert_eq!(token_request(&form("audience=x&lifetime=3600"), l).unwrap().lifetime, 3600);
        for (bad, code) in [
            ("", "invalid_audience"),
            ("lifetime=60", "invalid_audience"),
            ("audience=", "invalid_audience"),
            ("audience=%0A", "invalid_audience"),
            ("audience=x&lifetime=0", "invalid_lifetime"),
            ("audience=x&lifetime=3601", "invalid_lifetime"),
            ("audience=x&lifetime=-5", "invalid_lifetime"),
            ("audience=x&lifetime=%2B5", "invalid_lifetime"),
            ("audience=x&lifetime=1e3", "invalid_lifetime"),
            ("audience=x&lifetime=99999999999999999999", "invalid_lifetime"),
            ("audience=x&lifetime=5&lifetime=6", "invalid_lifetime"),
            ("audience=x&audiance=y", "bad_request"),
        ] {
            let e = token_request(&form(bad), l).unwrap_err();
            assert_eq!((e.status, e.code.as_str()), (400, code), "{bad}");
        }
        let long = format!("audience={}", "a".repeat(MAX_AUDIENCE_LEN + 1));
        assert!(token_request(&form(&long), l).is_err());
        let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| format!("audience=a{i}")).collect();
        assert!(token_request(&form(&many.join("&")), l).is_err());
    }

    #[test]
    fn the_policy_capability_decides_audiences() {
        let mut c = caller(&["tag:web"], None);
        assert!(audience_allowed(&c, "anything"), "no policy: any audience");
        c.policy_set = true;
        assert!(!audience_allowed(&c, "vault"), "a policy without the grant: none");
        c.capabilities.insert(CAPABILITY.into(), vec![json!({"audiences": ["vault", "s3"]}), json!({"other": 1})]);
        assert!(audience_allowed(&c, "vault") && audience_allowed(&c, "s3"));
        assert!(!audience_allowed(&c, "vaultx"));
        c.capabilities.insert(CAPABILITY.into(), vec![json!({"audiences": ["*"]})]);
        assert!(audience_allowed(&c, "vaultx"));
    }

    #[test]
    fn tokens_verify_independently_with_every_claim() {
        let set = KeySet::generate(Algorithm::ES256, 0).unwrap();
        let keys: JwkSet = serde_json::from_value(serde_json::to_value(jwks(&set)).unwrap()).unwrap();
        let now = crate::control::db::unix_now();
        let req = TokenRequest { audiences: vec!["vault".into()], lifetime: 120 };
        let c = caller(&[], Some("alice@example.com"));
        let body = issue(set.current(), "https://control.example:8443", &c, &req, now).unwrap();
        assert_eq!((body["token_type"].as_str(), body["expires_in"].as_i64()), (Some("Bearer"), Some(120)));
        let token = body["access_token"].as_str().unwrap();
        let kid = decode_header(token).unwrap().kid.unwrap();
        let jwk = keys.find(&kid).unwrap();
        let mut v = Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&["vault"]);
        v.set_issuer(&["https://control.example:8443"]);
        v.set_required_spec_claims(&["exp", "nbf", "iat", "aud", "iss", "sub"]);
        let claims = decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v).unwrap().claims;
        assert_eq!(claims["sub"], "node:7");
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 120);
        assert_eq!(claims["addresses"], json!(["100.64.0.7", "fd00::7"]));
        assert_eq!((claims["name"].as_str(), claims["owner"].as_str()), (Some("web"), Some("alice@example.com")));
        assert_eq!(claims["tags"], json!([]));
        assert_eq!(claims["jti"].as_str().unwrap().len(), 22);
        // Another audience is refused by the verifier; two audiences make an array.
        v.set_audience(&["other"]);
        assert!(decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v).is_err());
        let two = TokenRequest { audiences: vec!["a".into(), "b".into()], lifetime: 60 };
        let body = issue(set.current(), "https://c.example", &caller(&["tag:x"], None), &two, now).unwrap();
        v.set_audience(&["b"]);
        v.set_issuer(&["https://c.example"]);
        let claims = decode::<Value>(body["access_token"].as_str().unwrap(), &DecodingKey::from_jwk(jwk).unwrap(), &v)
            .unwrap()
            .claims;
        assert_eq!(claims["aud"], json!(["a", "b"]));
        assert!(claims.get("owner").is_none(), "tagged nodes have no owner claim");
        // Not granted by the policy: refused, nothing signed.
        let mut denied = caller(&["tag:x"], None);
        denied.policy_set = true;
        let e = issue(set.current(), "https://c.example", &denied, &two, now).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (403, "audience_not_allowed"));
    }
}
