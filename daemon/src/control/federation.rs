//! Federation: nodes register with an outside issuer's ID token instead of
//! an auth key, so no long-lived secret is stored anywhere (a CI system, a
//! cloud's workload identity, or another tailnet's workload tokens).
//!
//! An administrator creates a trust credential (issuer URL, subject
//! pattern, allowed tags, ephemeral or not; the server generates a client
//! ID, and tokens must name `<control URL>/<client ID>` as audience). A node
//! then sends `POST /api/v1/register/federated` with the client ID, the
//! token and the tags it wants, signed with its machine key as an ordinary
//! registration. The server checks, in this order, each refusal naming its
//! check (docs/identity.md, Federation):
//!
//! 1. the client ID names a credential (`unknown_client_id`);
//! 2. the token is a compact JWS with a JSON header and claims
//!    (`malformed_token`), its `alg` is ES256, RS256 or EdDSA (`alg_refused`;
//!    `none` and everything else);
//! 3. `iss` is the credential's issuer (`wrong_issuer`), checked before any
//!    key is fetched, so a token cannot make the server fetch from anywhere;
//! 4. the key: the issuer's discovery document (`<iss>/.well-known/openid-configuration`)
//!    names the JWKS, fetched over HTTPS and cached; an unknown `kid` refetches
//!    it (at most once per [`MIN_REFETCH`]) and is then `unknown_key`; the JWK's
//!    algorithm must be the header's (`alg_mismatch`);
//! 5. the signature (`bad_signature`), verified with ring from the JWK's
//!    public key (P-256 point, Ed25519 key, RSA modulus of 2048 bits or more);
//! 6. `aud` contains `<control URL>/<client ID>` (`wrong_audience`);
//! 7. `exp` (`expired`), `nbf` and `iat` (`not_yet_valid`) with [`SKEW`], and
//!    `iat` at most [`MAX_TOKEN_AGE`] ago (`token_too_old`);
//! 8. `sub` matches the pattern (`subject_mismatch`, 403);
//! 9. the tags asked for are a non-empty subset of the allowed ones
//!    (`tags_not_allowed`, 403);
//! 10. the `jti` was never used (`jti_reused`), recorded in the transaction
//!     that stores the node ([`Db::register_federated`](super::db::Db)).

use super::federation_store::{TrustCredential, Verified, MAX_FIELD};
use super::ApiError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const SKEW: i64 = 60;
/// A token issued longer ago than this is refused even if it has not
/// expired: registration wants a fresh token.
pub const MAX_TOKEN_AGE: i64 = 3600;
/// An unknown `kid` refetches the issuer's JWKS at most this often.
pub const MIN_REFETCH: Duration = Duration::from_secs(2);
/// A cached JWKS is fetched again after this long even when its keys are known.
pub const JWKS_TTL: Duration = Duration::from_secs(3600);
/// Longest ID token accepted.
pub const MAX_TOKEN: usize = 16 * 1024;
/// Largest discovery document or JWKS read.
const MAX_DOCUMENT: usize = 256 * 1024;
/// Time allowed for one fetch from an issuer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Where system trust roots are looked for (the first that exists is read).
const SYSTEM_ROOTS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn refuse(status: u16, code: &str, message: String) -> ApiError {
    ApiError { status, code: code.into(), message }
}

/// Whether `subject` matches `pattern`, where `*` matches any run of
/// characters (also none, also `/`) and everything else itself.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), subject.as_bytes());
    let (mut pi, mut si) = (0, 0);
    // The last star seen, and where in the subject it started matching.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// Ed25519.
    EdDSA,
}

impl Alg {
    fn parse(s: &str) -> Option<Alg> {
        match s {
            "ES256" => Some(Alg::ES256),
            "RS256" => Some(Alg::RS256),
            "EdDSA" => Some(Alg::EdDSA),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Alg::ES256 => "ES256",
            Alg::RS256 => "RS256",
            Alg::EdDSA => "EdDSA",
        }
    }
}

/// A parsed (not yet verified) ID token.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// The header's algorithm.
    pub alg: Alg,
    /// The header's key id.
    pub kid: Option<String>,
    /// `iss`.
    pub iss: String,
    /// `sub`.
    pub sub: String,
    /// `aud` (a string is a list of one).
    pub aud: Vec<String>,
    /// `exp`, Unix seconds.
    pub exp: i64,
    /// `nbf`, when present.
    pub nbf: Option<i64>,
    /// `iat`.
    pub iat: i64,
    /// `jti`.
    pub jti: String,
    /// `header.payload`, what the signature covers.
    pub signing_input: String,
    /// The signature, base64url as in the token.
    pub signature: String,
}

fn malformed(why: &str) -> ApiError {
    refuse(401, "malformed_token", format!("token: {why}"))
}

fn claim_str(claims: &serde_json::Map<String, Value>, name: &str) -> Result<String, ApiError> {
    match claims.get(name) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_FIELD => Ok(s.clone()),
        Some(_) => Err(malformed(&format!("claim {name} must be a string of 1-{MAX_FIELD} characters"))),
        None => Err(malformed(&format!("claim {name} is missing"))),
    }
}

/// A NumericDate (RFC 7519 section 2): a JSON number of seconds; fractions
/// are cut off.
fn claim_time(claims: &serde_json::Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                return Ok(Some(i));
            }
            match n.as_f64() {
                Some(f) if f.is_finite() && f.abs() < 1e15 => Ok(Some(f.trunc() as i64)),
                _ => Err(malformed(&format!("claim {name} is out of range"))),
            }
        }
        Some(_) => Err(malformed(&format!("claim {name} must be a number of seconds"))),
    }
}

fn json_part(part: &str, what: &str) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = crate::identity::unb64url(part).ok_or_else(|| malformed(&format!("the {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(malformed(&format!("the {what} is not a JSON object"))),
    }
}

/// Splits and decodes a compact JWS: the header (which must name an
/// accepted `alg` and may not carry `crit`) and the claims every ID token
/// must have. Nothing is verified.
pub fn parse(token: &str) -> Result<Token, ApiError> {
    if token.len() > MAX_TOKEN {
        return Err(malformed(&format!("longer than {MAX_TOKEN} bytes")));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed("not a compact JWS (header.payload.signature)"));
    };
    let header = json_part(h, "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        _ => return Err(malformed("the header has no alg")),
    };
    let alg = Alg::parse(alg).ok_or_else(|| {
        refuse(401, "alg_refused", format!("alg: {alg:?} is not accepted (ES256, RS256 or EdDSA; never none)"))
    })?;
    if header.contains_key("crit") {
        return Err(malformed("the header has crit extensions, which are not understood"));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) if k.len() <= MAX_FIELD => Some(k.clone()),
        Some(_) => return Err(malformed("kid must be a string")),
    };
    if s.is_empty() || s.len() > 1024 {
        return Err(malformed("no signature"));
    }
    let claims = json_part(p, "payload")?;
    let aud = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) if !list.is_empty() && list.len() <= 32 => list
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| malformed("aud must be a string or a list of strings"))?,
        Some(_) => return Err(malformed("aud must be a string or a list of strings")),
        None => return Err(malformed("claim aud is missing")),
    };
    Ok(Token {
        alg,
        kid,
        iss: claim_str(&claims, "iss")?,
        sub: claim_str(&claims, "sub")?,
        aud,
        exp: claim_time(&claims, "exp")?.ok_or_else(|| malformed("claim exp is missing"))?,
        nbf: claim_time(&claims, "nbf")?,
        iat: claim_time(&claims, "iat")?.ok_or_else(|| malformed("claim iat is missing"))?,
        jti: claim_str(&claims, "jti")?,
        signing_input: format!("{h}.{p}"),
        signature: s.to_string(),
    })
}

/// The checks after the signature: audience, time, subject, tags.
pub fn check_claims(
    t: &Token,
    cred: &TrustCredential,
    audience: &str,
    tags: &[String],
    now: i64,
) -> Result<Vec<String>, ApiError> {
    if !t.aud.iter().any(|a| a == audience) {
        return Err(refuse(
            401,
            "wrong_audience",
            format!("aud: the token is for {:?}, not {audience:?}", t.aud.join(" ")),
        ));
    }
    if t.exp.saturating_add(SKEW) <= now {
        return Err(refuse(401, "expired", format!("exp: the token expired at {} (now {now})", t.exp)));
    }
    if let Some(nbf) = t.nbf {
        if nbf.saturating_sub(SKEW) > now {
            return Err(refuse(401, "not_yet_valid", format!("nbf: the token is not valid before {nbf} (now {now})")));
        }
    }
    if t.iat.saturating_sub(SKEW) > now {
        return Err(refuse(401, "not_yet_valid", format!("iat: the token is issued in the future ({})", t.iat)));
    }
    if now.saturating_sub(t.iat) > MAX_TOKEN_AGE {
        return Err(refuse(401, "token_too_old", format!("iat: the token was issued more than {MAX_TOKEN_AGE} s ago")));
    }
    if !subject_matches(&cred.subject, &t.sub) {
        return Err(refuse(
            403,
            "subject_mismatch",
            format!("sub: {:?} does not match the credential's pattern {:?}", t.sub, cred.subject),
        ));
    }
    if tags.is_empty() {
        return Err(refuse(
            403,
            "tags_not_allowed",
            format!("tags: ask for at least one of the credential's tags ({})", cred.tags.join(",")),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for tag in tags {
        if !cred.tags.contains(tag) {
            return Err(refuse(
                403,
                "tags_not_allowed",
                format!("tags: {tag} is not allowed by this credential ({})", cred.tags.join(",")),
            ));
        }
        if !out.contains(tag) {
            out.push(tag.clone());
        }
    }
    Ok(out)
}

/// A public key from an issuer's JWKS (RFC 7517, 7518 section 6, RFC 8037).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// `kid`.
    pub kid: Option<String>,
    /// The one algorithm it verifies: its `alg`, or what its type implies.
    pub alg: Alg,
    key: KeyBytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyBytes {
    /// An uncompressed P-256 point (0x04 || x || y).
    P256(Vec<u8>),
    /// An Ed25519 public key.
    Ed25519(Vec<u8>),
    /// An RSA modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// Reads one JWK: EC P-256, OKP Ed25519 or RSA (2048 bits or more), for
/// signatures; `None` for anything else (skipped, as if not published).
pub fn parse_jwk(v: &Value) -> Option<PublicKey> {
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let bytes = |k: &str| field(k).and_then(crate::identity::unb64url);
    if field("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let (implied, key) = match (field("kty")?, field("crv")) {
        ("EC", Some("P-256")) => {
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (Alg::ES256, KeyBytes::P256(point))
        }
        ("OKP", Some("Ed25519")) => {
            let x = bytes("x")?;
            if x.len() != 32 {
                return None;
            }
            (Alg::EdDSA, KeyBytes::Ed25519(x))
        }
        ("RSA", _) => {
            let n = bytes("n")?;
            let e = bytes("e")?;
            let n: Vec<u8> = n.into_iter().skip_while(|&b| b == 0).collect();
            if n.len() < 256 || n.len() > 1024 || e.is_empty() || e.len() > 8 {
                return None;
            }
            (Alg::RS256, KeyBytes::Rsa { n, e })
        }
        _ => return None,
    };
    let alg = match field("alg") {
        None => implied,
        Some(a) if Alg::parse(a) == Some(implied) => implied,
        Some(_) => return None,
    };
    let kid = match v.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return None,
    };
    Some(PublicKey { kid, alg, key })
}

/// Verifies the signature of `t` with `key`.
fn check_signature(t: &Token, key: &PublicKey) -> Result<(), ApiError> {
    use ring::signature::{self as sig, UnparsedPublicKey};
    let kid = t.kid.as_deref().unwrap_or("");
    if key.alg != t.alg {
        return Err(refuse(
            401,
            "alg_mismatch",
            format!("alg: the token says {} but key {kid:?} is a {} key", t.alg.name(), key.alg.name()),
        ));
    }
    let bad = || refuse(401, "bad_signature", format!("signature: does not verify with key {kid:?}"));
    let signature = crate::identity::unb64url(&t.signature).ok_or_else(bad)?;
    let message = t.signing_input.as_bytes();
    let ok = match &key.key {
        KeyBytes::P256(point) => {
            UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point).verify(message, &signature).is_ok()
        }
        KeyBytes::Ed25519(x) => UnparsedPublicKey::new(&sig::ED25519, x).verify(message, &signature).is_ok(),
        KeyBytes::Rsa { n, e } => {
            sig::RsaPublicKeyComponents { n, e }.verify(&sig::RSA_PKCS1_2048_8192_SHA256, message, &signature).is_ok()
        }
    };
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// One issuer's keys as last fetched.
struct IssuerKeys {
    keys: Vec<PublicKey>,
    fetched: Instant,
    fetches: u64,
}

/// The verifier: the control server's URL (audiences are under it), the
/// TLS roots issuers are checked against, and the issuers' cached keys.
pub struct Federation {
    control_url: Mutex<String>,
    tls: Mutex<Arc<rustls::ClientConfig>>,
    cache: tokio::sync::Mutex<HashMap<String, IssuerKeys>>,
}

impl Default for Federation {
    fn default() -> Self {
        Federation {
            control_url: Mutex::new(String::new()),
            tls: Mutex::new(client_config(Vec::new()).0),
            cache: tokio::sync::Mutex::new(HashMap::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A TLS client trusting the system roots and `extra`; also how many
/// system roots were loaded.
fn client_config(extra: Vec<CertificateDer<'static>>) -> (Arc<rustls::ClientConfig>, usize) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut system = 0;
    let env = std::env::var("SSL_CERT_FILE").ok();
    let files = env.iter().map(String::as_str).chain(SYSTEM_ROOTS.iter().copied());
    for f in files {
        let Ok(iter) = CertificateDer::pem_file_iter(f) else { continue };
        for cert in iter.flatten() {
            if roots.add(cert).is_ok() {
                system += 1;
            }
        }
        if system > 0 {
            break;
        }
    }
    for cert in extra {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 with ring")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
    (Arc::new(config), system)
}

/// Reads the PEM certificates in `path` (`--federation-ca`).
pub fn load_ca(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// `https://host[:port]/path` split for a request; only https.
fn split_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| format!("{url:?} is not an https:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') || url.contains('#') {
        return Err(format!("{url:?}: no user info or fragment"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: bad IPv6 host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port"))?,
            None if after.is_empty() => 443,
            None => return Err(format!("{url:?}: bad host")),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("{url:?}: bad port"))?),
            None => (authority.to_string(), 443),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok((host, port, path.to_string()))
}

/// GETs `url` over HTTPS (verified against `tls`'s roots) and parses JSON.
async fn fetch_json(tls: Arc<rustls::ClientConfig>, url: &str) -> Result<Value, String> {
    let (host, port, path) = split_url(url)?;
    let name = ServerName::try_from(host.clone()).map_err(|_| format!("{url:?}: bad host name"))?;
    let fut = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("{url}: {e}"))?;
        let stream =
            tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("{url}: TLS: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{url}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let req = hyper::Request::get(path.as_str())
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| format!("{url}: cannot read the body (at most {MAX_DOCUMENT} bytes): {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
    };
    tokio::time::timeout(FETCH_TIMEOUT, fut).await.map_err(|_| format!("{url}: timed out"))?
}

impl Federation {
    /// Sets the control server's public URL (`https://host:port`): audiences are `<url>/<client ID>`.
    pub fn set_control_url(&self, url: &str) {
        *lock(&self.control_url) = url.trim_end_matches('/').to_string();
    }

    /// The audience tokens for `client_id` must carry.
    pub fn audience(&self, client_id: &str) -> String {
        format!("{}/{client_id}", lock(&self.control_url))
    }

    /// Trusts `extra` roots besides the system's (`--federation-ca`);
    /// returns how many system roots were found.
    pub fn set_extra_roots(&self, extra: Vec<CertificateDer<'static>>) -> usize {
        let (config, system) = client_config(extra);
        *lock(&self.tls) = config;
        system
    }

    /// How many times `issuer`'s JWKS was fetched (tests).
    pub async fn fetches(&self, issuer: &str) -> u64 {
        self.cache.lock().await.get(issuer).map_or(0, |k| k.fetches)
    }

    async fn fetch_keys(&self, issuer: &str) -> Result<Vec<PublicKey>, ApiError> {
        let tls = lock(&self.tls).clone();
        let fail = |why: String| refuse(401, "issuer_unavailable", format!("issuer: cannot fetch its keys: {why}"));
        let discovery = fetch_json(tls.clone(), &format!("{issuer}{}", crate::identity::oidc::DISCOVERY_PATH))
            .await
            .map_err(fail)?;
        if discovery.get("issuer").and_then(Value::as_str).map(|s| s.trim_end_matches('/'))
            != Some(issuer.trim_end_matches('/'))
        {
            return Err(fail("its discovery document names another issuer".into()));
        }
        let jwks_uri = discovery
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("its discovery document has no jwks_uri".into()))?;
        let jwks = fetch_json(tls, jwks_uri).await.map_err(fail)?;
        let keys = jwks.get("keys").and_then(Value::as_array).ok_or_else(|| fail("the JWKS has no keys".into()))?;
        // Keys of types we do not know are skipped, not fatal.
        Ok(keys.iter().take(64).filter_map(parse_jwk).collect())
    }

    /// The key `kid` of `issuer`: from the cache, else after a (rate-limited) refetch.
    async fn key(&self, issuer: &str, kid: Option<&str>) -> Result<PublicKey, ApiError> {
        let mut cache = self.cache.lock().await;
        let find = |keys: &[PublicKey]| -> Option<PublicKey> {
            match kid {
                Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
                // No kid: only an issuer with exactly one key can be understood.
                None if keys.len() == 1 => keys.first().cloned(),
                None => None,
            }
        };
        if let Some(c) = cache.get(issuer) {
            if c.fetched.elapsed() < JWKS_TTL {
                if let Some(k) = find(&c.keys) {
                    return Ok(k);
                }
                if c.fetched.elapsed() < MIN_REFETCH {
                    return Err(unknown_key(kid, "the JWKS was fetched moments ago, not again yet"));
                }
            }
        }
        let keys = self.fetch_keys(issuer).await?;
        let fetches = cache.get(issuer).map_or(0, |c| c.fetches) + 1;
        let found = find(&keys);
        cache.insert(issuer.to_string(), IssuerKeys { keys, fetched: Instant::now(), fetches });
        found.ok_or_else(|| unknown_key(kid, "not in the issuer's JWKS, fetched again just now"))
    }

    /// Every check on `token` but the `jti`'s freshness (which the store
    /// checks as it registers): what the registration may do.
    pub async fn verify(
        &self,
        cred: &TrustCredential,
        token: &str,
        tags: &[String],
        now: i64,
    ) -> Result<Verified, ApiError> {
        let t = parse(token)?;
        if t.iss.trim_end_matches('/') != cred.issuer {
            return Err(refuse(
                401,
                "wrong_issuer",
                format!("iss: {:?} is not this credential's issuer {:?}", t.iss, cred.issuer),
            ));
        }
        let jwk = self.key(&cred.issuer, t.kid.as_deref()).await?;
        check_signature(&t, &jwk)?;
        let tags = check_claims(&t, cred, &self.audience(&cred.client_id), tags, now)?;
        Ok(Verified { credential: cred.clone(), tags, jti: t.jti, jti_until: t.exp.saturating_add(SKEW) })
    }
}

fn unknown_key(kid: Option<&str>, why: &str) -> ApiError {
    match kid {
        Some(kid) => refuse(401, "unknown_key", format!("kid: key {kid:?} is unknown: {why}")),
        None => refuse(401, "unknown_key", "kid: the token names no key and the issuer has several".into()),
    }
}

/// `POST /api/v1/admin/federation`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateCredentialRequest {
    /// The issuer URL (https).
    pub issuer: String,
    /// The subject pattern.
    pub subject: String,
    /// The tags nodes may ask for.
    pub tags: Vec<String>,
    /// Whether the nodes are ephemeral.
    #[serde(default)]
    pub ephemeral: bool,
}

/// What the admin API answers for a credential: it and the audience tokens must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialInfo {
    /// The credential.
    #[serde(flatten)]
    pub credential: TrustCredential,
    /// `<control URL>/<client ID>`.
    pub audience: String,
}

impl Federation {
    /// The admin view of `c`.
    pub fn info(&self, c: TrustCredential) -> CredentialInfo {
        CredentialInfo { audience: self.audience(&c.client_id), credential: c }
    }
}

/// Checks a credential request's issuer: an https URL (see
/// [`crate::identity::oidc::check_issuer`]) of at most [`MAX_FIELD`] bytes.
pub fn check_issuer(issuer: &str) -> Result<String, ApiError> {
    if issuer.len() > MAX_FIELD {
        return Err(ApiError::bad_request(format!("the issuer URL is longer than {MAX_FIELD} bytes")));
    }
    crate::identity::oidc::check_issuer(issuer).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `/api/v1/admin/federation`: `GET` lists the credentials, `POST` creates
/// one ([`CreateCredentialRequest`]), `DELETE …/ID` removes one.
pub(super) async fn admin(
    app: &Arc<super::server::App>,
    segments: &[&str],
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<super::server::Body>, ApiError> {
    use super::server::{json_response, read_json};
    let method = req.method().clone();
    match (segments, &method) {
        ([], &hyper::Method::GET) => {
            let list = app.with_db(|db| db.credentials()).await?;
            let out: Vec<CredentialInfo> = list.into_iter().map(|c| app.federation.info(c)).collect();
            Ok(json_response(200, &out))
        }
        ([], &hyper::Method::POST) => {
            let r: CreateCredentialRequest = read_json(req).await?;
            let issuer = check_issuer(&r.issuer)?;
            if r.tags.len() > 64 {
                return Err(ApiError::bad_request("at most 64 tags".into()));
            }
            let c = app.with_db(move |db| db.create_credential(&issuer, &r.subject, &r.tags, r.ephemeral)).await?;
            Ok(json_response(200, &app.federation.info(c)))
        }
        ([id], &hyper::Method::DELETE) => {
            let id: i64 = id.parse().map_err(|_| ApiError::bad_request(format!("{id:?} is not a credential ID")))?;
            if app.with_db(move |db| db.remove_credential(id)).await? {
                Ok(json_response(200, &serde_json::json!({ "removed": id })))
            } else {
                Err(ApiError::not_found("no such trust credential"))
            }
        }
        ([] | [_], _) => Err(ApiError::new(405, "method_not_allowed", "method not allowed")),
        _ => Err(ApiError::not_found("no such endpoint")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::b64url;
    use proptest::prelude::*;
    use serde_json::json;

    fn cred() -> TrustCredential {
        TrustCredential {
            id: 1,
            client_id: "wmfed-1".into(),
            issuer: "https://issuer.example".into(),
            subject: "ws-1/*".into(),
            tags: vec!["tag:ci".into(), "tag:web".into()],
            ephemeral: false,
            created_at: 0,
        }
    }

    fn token(header: &Value, claims: &Value) -> String {
        format!(
            "{}.{}.{}",
            b64url(&serde_json::to_vec(header).unwrap()),
            b64url(&serde_json::to_vec(claims).unwrap()),
            b64url(&[7; 64])
        )
    }

    fn claims(now: i64) -> Value {
        serde_json::json!({"iss": "https://issuer.example", "sub": "ws-1/job-7", "aud": "https://c.example/wmfed-1",
            "iat": now, "nbf": now, "exp": now + 300, "jti": "abc"})
    }

    #[test]
    fn globs_match_as_documented() {
        for (p, s, want) in [
            ("ws-1/*", "ws-1/job", true),
            ("ws-1/*", "ws-1/", true),
            ("ws-1/*", "ws-1/a/b", true),
            ("ws-1/*", "ws-2/a", false),
            ("ws-1/*", "ws-1", false),
            ("*", "", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*-prod", "repo:x-prod", true),
            ("**", "x", true),
        ] {
            assert_eq!(subject_matches(p, s), want, "{p} {s}");
        }
    }

    #[test]
    fn parse_reads_headers_and_claims_and_names_what_is_wrong() {
        let now = 1_800_000_000;
        let t = parse(&token(&serde_json::json!({"alg": "ES256", "kid": "k1"}), &claims(now))).unwrap();
        assert_eq!(
            (t.alg, t.kid.as_deref(), t.aud.clone(), t.exp),
            (Alg::ES256, Some("k1"), vec!["https://c.example/wmfed-1".to_string()], now + 300)
        );
        let code = |h: Value, c: Value| parse(&token(&h, &c)).unwrap_err().code;
        assert_eq!(code(serde_json::json!({"alg": "none"}), claims(now)), "alg_refused");
        assert_eq!(code(serde_json::json!({"alg": "HS256"}), claims(now)), "alg_refused");
        assert_eq!(code(serde_json::json!({"kid": "x"}), claims(now)), "malformed_token");
        assert_eq!(code(serde_json::json!({"alg": "EdDSA", "crit": ["x"]}), claims(now)), "malformed_token");
        let mut c = claims(now);
        c.as_object_mut().unwrap().remove("jti");
        assert_eq!(code(serde_json::json!({"alg": "EdDSA"}), c), "malformed_token");
        let mut c = claims(now);
        c["aud"] = serde_json::json!(["a", "https://c.example/wmfed-1"]);
        c["exp"] = serde_json::json!(1.9e9);
        let t = parse(&token(&serde_json::json!({"alg": "RS256"}), &c)).unwrap();
        assert_eq!((t.aud.len(), t.exp), (2, 1_900_000_000));
        for bad in ["", "a.b", "a.b.c.d", "!!.e30.AA", "e30.e30.AA", &format!("{}.e30", "A".repeat(MAX_TOKEN))] {
            assert_eq!(parse(bad).unwrap_err().code, "malformed_token", "{bad}");
        }
    }

    #[test]
    fn claims_checks_in_order_with_skew() {
        let now = 1_800_000_000;
        let c = cred();
        let aud = "https://c.example/wmfed-1";
        let tags = vec!["tag:ci".to_string()];
        let t = |f: &dyn Fn(&mut Value)| {
            let mut v = claims(now);
            f(&mut v);
            parse(&token(&serde_json::json!({"alg": "EdDSA"}), &v)).unwrap()
        };
        let check = |t: &Token, tags: &[String]| check_claims(t, &c, aud, tags, now).map_err(|e| e.code);
        assert_eq!(check(&t(&|_| {}), &tags).unwrap(), tags);
        assert_eq!(check(&t(&|v| v["aud"] = "https://c.example/wmfed-2".into()), &tags).unwrap_err(), "wrong_audience");
        assert_eq!(check(&t(&|v| v["exp"] = (now - 61).into()), &tags).unwrap_err(), "expired");
        assert!(check(&t(&|v| v["exp"] = (now - 59).into()), &tags).is_ok(), "within the skew");
        assert_eq!(check(&t(&|v| v["nbf"] = (now + 61).into()), &tags).unwrap_err(), "not_yet_valid");
        assert!(check(&t(&|v| v["nbf"] = (now + 59).into()), &tags).is_ok());
        assert_eq!(check(&t(&|v| v["iat"] = (now + 120).into()), &tags).unwrap_err(), "not_yet_valid");
        assert_eq!(check(&t(&|v| v["iat"] = (now - 3601).into()), &tags).unwrap_err(), "token_too_old");
        assert_eq!(check(&t(&|v| v["sub"] = "ws-2/job".into()), &tags).unwrap_err(), "subject_mismatch");
        assert_eq!(check(&t(&|_| {}), &["tag:prod".into()]).unwrap_err(), "tags_not_allowed");
        assert_eq!(check(&t(&|_| {}), &[]).unwrap_err(), "tags_not_allowed");
        assert_eq!(check(&t(&|_| {}), &["tag:web".into(), "tag:web".into()]).unwrap(), ["tag:web"]);
    }

    #[test]
    fn jwks_keys_are_read_and_odd_ones_skipped() {
        let x = b64url(&[1; 32]);
        let ok = [
            (json!({"kty": "EC", "crv": "P-256", "x": x, "y": x, "kid": "a"}), Alg::ES256),
            (json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA", "use": "sig"}), Alg::EdDSA),
            (json!({"kty": "RSA", "n": b64url(&[0xc5; 256]), "e": "AQAB"}), Alg::RS256),
        ];
        for (k, alg) in ok {
            assert_eq!(parse_jwk(&k).map(|p| p.alg), Some(alg), "{k}");
        }
        for bad in [
            json!({"kty": "EC", "crv": "P-384", "x": x, "y": x}),
            json!({"kty": "EC", "crv": "P-256", "x": x}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(&[1; 31])}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "ES256"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": x, "use": "enc"}),
            json!({"kty": "RSA", "n": b64url(&[0xc5; 128]), "e": "AQAB"}),
            json!({"kty": "oct", "k": x}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": 5}),
        ] {
            assert_eq!(parse_jwk(&bad), None, "{bad}");
        }
    }

    #[test]
    fn urls_split_for_requests() {
        assert_eq!(split_url("https://a.example/x/y").unwrap(), ("a.example".into(), 443, "/x/y".into()));
        assert_eq!(split_url("https://127.0.0.1:8443").unwrap(), ("127.0.0.1".into(), 8443, "/".into()));
        assert_eq!(split_url("https://[::1]:9/j").unwrap(), ("::1".into(), 9, "/j".into()));
        for bad in ["http://a.example", "https://", "https://u@a.example/", "https://a.example:x/", "https://[::1"] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the bytes, parsing answers (no panic) and only ever
        /// refuses with one of its own codes.
        #[test]
        fn parse_never_panics(s in "[A-Za-z0-9_.=-]{0,300}") {
            if let Err(e) = parse(&s) {
                prop_assert!(e.code == "malformed_token" || e.code == "alg_refused");
            }
        }

        /// Arbitrary JSON headers and claims, properly encoded.
        #[test]
        fn parse_any_json(alg in prop::sample::select(vec!["ES256", "RS256", "EdDSA", "none", "HS256", ""]),
                          kid in proptest::option::of("[a-z0-9]{0,8}"),
                          exp in proptest::option::of(any::<i64>()),
                          iat in proptest::option::of(any::<f64>()),
                          aud in prop::collection::vec("[a-z]{0,4}", 0..3),
                          sub in "\\PC{0,8}") {
            let mut h = serde_json::json!({"alg": alg});
            if let Some(k) = &kid { h["kid"] = k.clone().into(); }
            let mut c = serde_json::json!({"iss": "https://i", "sub": sub, "aud": aud, "jti": "j"});
            if let Some(e) = exp { c["exp"] = e.into(); }
            if let Some(i) = iat { if let Some(n) = serde_json::Number::from_f64(i) { c["iat"] = Value::Number(n); } }
            match parse(&token(&h, &c)) {
                Ok(t) => {
                    prop_assert!(["ES256", "RS256", "EdDSA"].contains(&alg));
                    prop_assert_eq!(t.kid, kid);
                    prop_assert_eq!(Some(t.exp), exp);
                    prop_assert!(!t.aud.is_empty());
                }
                Err(e) => prop_assert!(e.code == "malformed_token" || e.code == "alg_refused"),
            }
        }
    }
}
