//! The identity service: a tailnet node of its own inside `wiremeshd
//! control` (`--identity on`), on the userspace netstack, serving plain
//! HTTP/1.1 on its tailnet address port 80 (the tunnel already encrypts and
//! authenticates every packet).
//!
//! * The control server registers the node itself (name `identity`, tag
//!   `tag:identity`) and keeps its keys in the store
//!   ([`crate::control::identity_store`]); the node then follows its map like
//!   any node (peers: the nodes the policy lets see it), embedded in the
//!   server's process.
//! * Every accepted connection is resolved to a [`Caller`] from the server's
//!   current snapshot: the node holding the remote tailnet address, whose
//!   node key must be the key that authenticated the packets (the netstack's
//!   `peer_of`) and which must be online; anything else is refused before a
//!   request is read. Endpoints take the `Caller` and never see addresses.
//! * The issuer's signing keys live in the store, made at first start and
//!   rotated on a schedule and on demand; every replica reloads them.
//!
//! See docs/identity.md.

use super::caller::{Caller, User};
use super::keys::{Algorithm, KeySet};
use super::oidc::{self, Discovery, DISCOVERY_PATH, JWKS_PATH};
use super::tokens::{self, Lifetimes};
use crate::control::proto::{self, CapGrant, NodeInfo};
use crate::control::server::App;
use crate::control::ApiError;
use bytes::Bytes;
use http::{header, Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The host name (and so the node name) the identity node asks for.
pub const HOSTNAME: &str = "identity";
/// The tag the identity node carries.
pub const TAG: &str = "tag:identity";
/// The port the service answers on, on its tailnet addresses.
pub const PORT: u16 = 80;
/// How often every replica reloads the key set (and the lease holder renews).
const RELOAD: Duration = Duration::from_secs(10);
/// How long a replica's lease on running the identity node lasts unrenewed.
const LEASE_SECS: i64 = 30;
/// Clock skew verifiers may allow, kept on top of the longest lifetime
/// before a retired key leaves the JWKS.
const SKEW_SECS: i64 = 300;

/// `wiremeshd control --identity …` settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The signing algorithm of new keys.
    pub alg: Algorithm,
    /// How often the signing key rotates.
    pub rotation: Duration,
    /// Token lifetimes.
    pub lifetimes: Lifetimes,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { alg: Algorithm::ES256, rotation: Duration::from_secs(24 * 3600), lifetimes: Lifetimes::default() }
    }
}

/// Parses a duration: a whole number with `s`, `m`, `h` or `d` (`24h`, `90s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: a duration is a number and s, m, h or d (e.g. 24h)");
    let unit = s.chars().last().ok_or_else(bad)?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return Err(bad()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    n.checked_mul(mult).filter(|&v| v > 0 && v <= 10 * 365 * 86400).map(Duration::from_secs).ok_or_else(bad)
}

/// The service's settings from `wiremeshd control`'s flags (`None`: `--identity off`).
pub fn settings_from_flags(
    on: &str,
    rotation: Duration,
    alg: &str,
    lifetime: Duration,
    max_lifetime: Duration,
) -> Result<Option<Settings>, String> {
    if on == "off" {
        return Ok(None);
    }
    let alg =
        Algorithm::from_name(alg).ok_or_else(|| format!("--identity-alg: {alg:?} is not ES256, EdDSA or RS256"))?;
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let lifetimes = Lifetimes { default: secs(lifetime), max: secs(max_lifetime) };
    if lifetimes.default > lifetimes.max {
        return Err("--identity-token-lifetime must not exceed --identity-max-token-lifetime".into());
    }
    if rotation < Duration::from_secs(60) {
        return Err("--identity-key-rotation must be at least 1m".into());
    }
    Ok(Some(Settings { alg, rotation, lifetimes }))
}

/// The running service: the issuer, its keys, and the server it belongs to.
pub struct Service {
    issuer: String,
    settings: Settings,
    keys: RwLock<Arc<KeySet>>,
    app: Arc<App>,
    /// The identity node's id, once registered.
    node_id: Mutex<Option<i64>>,
    /// The OIDC provider for people, handed every path the service does
    /// not answer itself (set at start, once the tailnet URL is known).
    provider: std::sync::OnceLock<super::provider::Provider>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

/// A JSON response.
pub fn json(status: u16, body: &impl serde::Serialize) -> Response<Bytes> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Bytes::from(bytes))
        .unwrap_or_else(|_| Response::new(Bytes::new()))
}

/// The project's JSON error body for `e`.
pub fn error(e: &ApiError) -> Response<Bytes> {
    json(e.status, &e.body())
}

/// Whether `ip` is in `prefix` (`*`, or an address with an optional `/len`).
fn in_prefix(ip: IpAddr, prefix: &str) -> bool {
    if prefix == "*" {
        return true;
    }
    let (addr, len) = match prefix.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()),
        None => (prefix, None),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else { return false };
    match (ip, addr) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

impl Service {
    /// The service for `app` issuing as `issuer`, with the store's key set
    /// (made now on first start).
    pub async fn open(app: Arc<App>, issuer: &str, settings: Settings) -> Result<Arc<Service>, String> {
        let issuer = oidc::check_issuer(issuer).map_err(|e| e.to_string())?;
        let alg = settings.alg;
        let (keys, _) = app.identity_db(move |db| db.identity_keys(alg)).await.map_err(|e| e.to_string())?;
        Ok(Arc::new(Service {
            issuer,
            settings,
            keys: RwLock::new(Arc::new(keys)),
            app,
            node_id: Mutex::new(None),
            provider: std::sync::OnceLock::new(),
        }))
    }

    /// The issuer (`iss` of every token).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The current key set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_keys(&self, set: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }

    /// How long a retired key stays published: the longest token lifetime
    /// plus clock skew.
    fn keep_secs(&self) -> i64 {
        self.settings.lifetimes.max.saturating_add(SKEW_SECS)
    }

    /// Rotates the signing key now (`wiremesh idp rotate-keys`); returns the
    /// new current key's id.
    pub async fn rotate_now(&self) -> Result<String, ApiError> {
        let (alg, keep) = (self.settings.alg, self.keep_secs());
        let (set, _, _) = self.app.identity_db(move |db| db.rotate_identity_keys(alg, 0, keep, true)).await?;
        let kid = set.current().kid().to_string();
        self.set_keys(set);
        Ok(kid)
    }

    /// One step of the schedule: rotates if due (one replica does, under the
    /// row lock) and otherwise takes what the store has (another replica's
    /// rotation).
    pub async fn tick(&self) -> Result<bool, ApiError> {
        let (alg, keep) = (self.settings.alg, self.keep_secs());
        let every = i64::try_from(self.settings.rotation.as_secs()).unwrap_or(i64::MAX).max(1);
        let (set, _, rotated) =
            self.app.identity_db(move |db| db.rotate_identity_keys(alg, every, keep, false)).await?;
        self.set_keys(set);
        Ok(rotated)
    }

    /// The discovery document and JWKS on the control server's public
    /// listener; `None` for every other path.
    pub fn public(&self, method: &Method, path: &str) -> Option<Response<Bytes>> {
        if path != DISCOVERY_PATH && path != JWKS_PATH {
            return None;
        }
        if method != Method::GET && method != Method::HEAD {
            return Some(error(&ApiError::new(405, "method_not_allowed", "method not allowed")));
        }
        let keys = self.keys();
        Some(if path == JWKS_PATH {
            json(200, &oidc::jwks(&keys))
        } else {
            match Discovery::new(&self.issuer, &keys).map(|d| serde_json::to_value(d).unwrap_or_default()) {
                Ok(mut d) => {
                    // The provider's endpoints, when it runs.
                    if let (Some(p), Some(obj)) = (self.provider.get(), d.as_object_mut()) {
                        obj.extend(p.discovery_fields());
                    }
                    json(200, &d)
                }
                Err(e) => error(&ApiError::internal(e.to_string())),
            }
        })
    }

    /// Answers one request from `caller` on the tailnet.
    pub async fn handle(&self, caller: &Caller, req: Request<Bytes>) -> Response<Bytes> {
        if let Some(r) = self.public(req.method(), req.uri().path()) {
            return r;
        }
        match req.uri().path() {
            "/token" => match self.token(caller, &req) {
                Ok(r) => r,
                Err(e) => error(&e),
            },
            "/whoami" if req.method() == Method::GET => json(
                200,
                &serde_json::json!({
                    "node": caller.node.name,
                    "sub": tokens::subject(caller.node.id),
                    "tags": caller.node.tags,
                    "user": caller.user.as_ref().map(|u| &u.login),
                }),
            ),
            _ => match self.provider.get() {
                Some(p) => match p.handle(caller, req).await {
                    Some(r) => r,
                    None => error(&ApiError::not_found("no such endpoint")),
                },
                None => error(&ApiError::not_found("no such endpoint")),
            },
        }
    }

    /// `POST /token`: a workload token for the calling node.
    fn token(&self, caller: &Caller, req: &Request<Bytes>) -> Result<Response<Bytes>, ApiError> {
        if req.method() != Method::POST {
            return Err(ApiError::new(405, "method_not_allowed", "POST /token"));
        }
        let h = req.headers();
        // A browser adds these to every cross-site request, and a page
        // cannot remove them: a page the node displays gets no token.
        if h.contains_key(header::ORIGIN) || h.keys().any(|k| k.as_str().starts_with("sec-fetch-")) {
            return Err(ApiError::new(
                403,
                "browser_request",
                "requests from a browser (Origin, Sec-Fetch-*) get no token",
            ));
        }
        // A non-simple header: a cross-site page cannot send it without a
        // CORS preflight, which this service never approves.
        if h.get("x-wiremesh-token").map(|v| v.as_bytes()) != Some(b"1") {
            return Err(ApiError::new(403, "missing_header", "the header X-Wiremesh-Token: 1 is required"));
        }
        let ct = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let media = ct.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(ApiError::new(
                415,
                "unsupported_media_type",
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let form = tokens::parse_form(req.body())?;
        let request = tokens::token_request(&form, self.settings.lifetimes)?;
        let keys = self.keys();
        let body = tokens::issue(keys.current(), &self.issuer, caller, &request, crate::control::db::unix_now())?;
        Ok(json(200, &body))
    }

    /// Who is behind a connection from `remote` whose packets `peer_key`
    /// (the netstack's cryptokey routing answer) authenticated: a known,
    /// online node holding that address with that key, seen by the
    /// identity node; refused otherwise.
    pub async fn resolve(&self, remote: IpAddr, peer_key: Option<[u8; 32]>) -> Result<Caller, ApiError> {
        let refused = |why: &str| ApiError::new(403, "not_a_tailnet_node", why);
        let peer_key = peer_key.ok_or_else(|| refused("no tailnet peer holds this address"))?;
        let snap = self.app.snapshot();
        let i = snap
            .nodes
            .iter()
            .position(|n| IpAddr::V4(n.ipv4) == remote || IpAddr::V6(n.ipv6) == remote)
            .ok_or_else(|| refused("no tailnet node holds this address"))?;
        let node: &NodeInfo = &snap.nodes[i];
        let key_ok = proto::unb64_key(&node.node_key).is_some_and(|k| ring_eq(&k, &peer_key));
        if !key_ok {
            return Err(refused("the address does not belong to the key that sent the packets"));
        }
        if !node.online || snap.expired.contains(&node.id) {
            return Err(refused("the node is not online"));
        }
        let me = lock(&self.node_id).and_then(|id| snap.nodes.iter().position(|n| n.id == id));
        let mut capabilities = std::collections::BTreeMap::<String, Vec<serde_json::Value>>::new();
        if let (Some(grants), Some(me)) = (&snap.grants, me) {
            if !grants[me].peers.contains(&node.id) {
                return Err(refused("the policy does not let this node reach the identity service"));
            }
            let caps: Vec<CapGrant> = serde_json::from_str(&grants[me].capabilities).unwrap_or_default();
            for c in caps {
                if c.src.iter().any(|p| in_prefix(remote, p)) {
                    capabilities.entry(c.name).or_default().extend(c.values);
                }
            }
        }
        let node = node.clone();
        let policy_set = snap.grants.is_some();
        let user = if node.tags.is_empty() {
            let login = node.owner.clone();
            Some(self.app.identity_user(login).await?)
        } else {
            None
        };
        Ok(Caller { node, user, capabilities, policy_set })
    }

    /// Serves the tailnet side on `stack` until it stops.
    pub async fn serve_tailnet(self: Arc<Self>, stack: wiremesh_dataplane::netstack::Netstack) -> Result<(), String> {
        let listener = stack.listen_tcp(PORT).map_err(|e| format!("cannot listen on the tailnet: {e}"))?;
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    if stack.is_stopped() {
                        return Ok(());
                    }
                    eprintln!("wiremeshd control: identity: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = self.clone();
            let key = stack.peer_of(from.ip()).map(|p| p.public_key.0);
            tokio::spawn(async move {
                let caller = match service.resolve(from.ip(), key).await {
                    Ok(c) => Arc::new(c),
                    Err(_) => {
                        // Refused before a byte is read: not a known, online tailnet node.
                        stream.abort();
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (service, caller) = (service.clone(), caller.clone());
                    async move { Ok::<_, std::convert::Infallible>(service.serve_one(&caller, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .max_buf_size(64 * 1024)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    async fn serve_one(&self, caller: &Caller, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let r = match Limited::new(body, tokens::MAX_BODY).collect().await {
            Ok(b) => self.handle(caller, Request::from_parts(parts, b.to_bytes())).await,
            Err(_) => error(&ApiError::new(413, "too_large", "the request body is too large")),
        };
        r.map(Full::new)
    }
}

fn lock<T: Copy>(m: &Mutex<T>) -> T {
    *m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Constant-time equality of two keys.
fn ring_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The node's [`User`] from its owner's login (display name from the store,
/// groups from the policy).
pub(crate) fn user_of(login: &str, display_name: Option<String>, policy: Option<&crate::policy::Policy>) -> User {
    let groups = policy
        .map(|p| {
            p.groups.iter().filter(|(_, members)| members.iter().any(|m| m == login)).map(|(g, _)| g.clone()).collect()
        })
        .unwrap_or_default();
    User { login: login.to_string(), display_name: display_name.unwrap_or_else(|| login.to_string()), groups }
}

/// What [`start`] runs: the service, the embedded identity node and the
/// key schedule.
pub struct Running {
    /// The service.
    pub service: Arc<Service>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the identity service for `app`: keys, the schedule, and (where
/// this replica holds the lease) the identity node on the tailnet, joined
/// through `control` (this server's own URL with its pin). `state` is a
/// private directory for the node's key files (0700, files 0600).
pub async fn start(
    app: Arc<App>,
    issuer: &str,
    settings: Settings,
    control: crate::control::client::ControlUrl,
    state: std::path::PathBuf,
) -> Result<Running, String> {
    let service = Service::open(app.clone(), issuer, settings).await?;
    let _ = app.identity.set(service.clone());
    // Register (first start) and name the node in every map before any
    // node connects.
    let (keys, node) =
        app.identity_db(|db| db.identity_node(HOSTNAME, make_node_keys)).await.map_err(|e| e.to_string())?;
    *service.node_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(node.id);
    app.set_identity(&proto::IdentityInfo {
        url: format!("http://{}", node.ipv4),
        ipv4: node.ipv4,
        ipv6: node.ipv6,
        issuer: service.issuer.clone(),
    });
    app.request_publish();
    // The OIDC provider (people), under the service's tailnet URL; it signs
    // with the service's current keys for as long as the service lives.
    let weak = Arc::downgrade(&service);
    let keys_of: super::provider::KeySource = Arc::new(move || weak.upgrade().map(|s| s.keys()));
    let provider =
        super::provider::Provider::new(app.clone(), keys_of, &service.issuer, &format!("http://{}", node.ipv4))
            .map_err(|e| e.to_string())?;
    let _ = service.provider.set(provider);
    write_node_keys(&state, &keys)?;
    drop(keys);
    let s = service.clone();
    let task = tokio::spawn(async move { run_node(s, control, state).await });
    Ok(Running { service, task })
}

fn make_node_keys() -> Result<crate::control::identity_store::NewNodeKeys, String> {
    use ring::signature::KeyPair;
    let (_, pkcs8) = crate::node::keys::MachineKey::generate()?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| "bad generated key")?;
    let machine_public: [u8; 32] = pair.public_key().as_ref().try_into().map_err(|_| "bad public key")?;
    let mut private = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut private).map_err(|_| "no randomness")?;
    let public = wiremesh_core::keys::PrivateKey::from_bytes(private).public_key().0;
    Ok((pkcs8, machine_public, private, public))
}

fn write_node_keys(
    state: &std::path::Path,
    keys: &crate::control::identity_store::IdentityNodeKeys,
) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .map_err(|e| format!("{}: {e}", state.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        crate::control::tls::write_private(&state.join(name), bytes).map_err(|e| format!("{}: {e}", state.display()))
    };
    write("machine.key", &keys.machine_pkcs8)?;
    let mut b64 = proto::b64_key(&keys.node_private);
    let r = write("node.key", b64.as_bytes());
    // SAFETY-free wipe of the encoded key (ASCII stays valid UTF-8).
    b64.replace_range(.., &"A".repeat(b64.len()));
    std::hint::black_box(&b64);
    r
}

/// Keeps the keys fresh and, while this replica holds the lease, the
/// identity node on the tailnet.
async fn run_node(service: Arc<Service>, control: crate::control::client::ControlUrl, state: std::path::PathBuf) {
    let mut node: Option<(crate::node::userspace::Embedded, tokio::task::JoinHandle<Result<(), String>>)> = None;
    loop {
        if let Err(e) = service.tick().await {
            eprintln!("wiremeshd control: identity: keys: {e}");
        }
        let held = service.app.identity_db(|db| db.identity_lease(LEASE_SECS)).await.unwrap_or(false);
        match (held, node.is_some()) {
            (true, false) => {
                let opts = crate::node::userspace::join_options(control.clone(), None, HOSTNAME, state.clone());
                match crate::node::userspace::join(opts).await {
                    Ok(e) => match e.ready(Duration::from_secs(30)).await {
                        Ok((v4, _)) => {
                            crate::say!("identity service on http://{v4}:{PORT}");
                            let serve = tokio::spawn(service.clone().serve_tailnet(e.netstack().clone()));
                            node = Some((e, serve));
                        }
                        Err(why) => {
                            eprintln!("wiremeshd control: identity: {why}");
                            e.shutdown().await;
                        }
                    },
                    Err(why) => eprintln!("wiremeshd control: identity: cannot start the node: {why}"),
                }
            }
            (false, true) => {
                eprintln!("wiremeshd control: identity: lease lost; stopping the identity node");
                if let Some((e, serve)) = node.take() {
                    serve.abort();
                    e.shutdown().await;
                }
            }
            _ => {}
        }
        tokio::time::sleep(RELOAD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_addresses() {
        let v4: IpAddr = "100.64.0.7".parse().unwrap();
        let v6: IpAddr = "fd7a::7".parse().unwrap();
        assert!(in_prefix(v4, "*") && in_prefix(v6, "*"));
        assert!(in_prefix(v4, "100.64.0.7/32") && in_prefix(v4, "100.64.0.7") && in_prefix(v4, "100.64.0.0/10"));
        assert!(!in_prefix(v4, "100.64.0.8/32") && !in_prefix(v4, "fd7a::7/128") && !in_prefix(v4, "junk"));
        assert!(in_prefix(v6, "fd7a::/16") && !in_prefix(v6, "fd7b::/16") && in_prefix(v6, "::/0"));
    }
}
