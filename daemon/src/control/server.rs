//! `wiremeshd control`: the HTTPS API, the map streams, and presence.
//!
//! Every change (registration, removal, a node's endpoints, a stream opening
//! or closing) rebuilds one in-memory snapshot of the tailnet from the store
//! and publishes it on a `tokio::sync::watch` channel; each open map stream
//! wakes, computes its node's map from the snapshot and sends it if it
//! differs from the last one sent.

use super::db::{self, Db, Registration, Tailnet};
use super::proto::{self, NodeInfo, StreamMessage};
use super::{tls, ApiError};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// How long a challenge may be used.
const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Outstanding challenges kept at most (a bound against floods).
const MAX_CHALLENGES: usize = 100_000;
/// A keepalive line after this much silence on a map stream; clients
/// reconnect after three missed ones.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Endpoints a node may report.
const MAX_ENDPOINTS: usize = 16;

/// What `wiremeshd control` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// State directory (SQLite database, certificate) or PostgreSQL URL.
    pub state: db::Location,
    /// How long an ephemeral node may stay offline before it is removed.
    pub ephemeral_grace: Duration,
    /// A replica whose heartbeat is this old is taken for dead: its nodes go
    /// offline (it beats every third of this).
    pub presence_timeout: Duration,
    /// Where the embedded relay (TLS on TCP, STUN on UDP, the same port)
    /// listens; `None`: no relay. See docs/nat.md.
    pub relay: Option<SocketAddr>,
    /// Where other replicas' nodes reach the embedded relay (`HOST:PORT`);
    /// `None`: its bound address, or the listen address's host when it
    /// binds every address.
    pub relay_advertise: Option<String>,
    /// Per-client limits of the embedded relay (`--relay-rate-limit`,
    /// `--relay-burst`, `--relay-queue`).
    pub relay_limits: crate::relay::Limits,
    /// Relays run elsewhere (`wiremeshd relay`), named in every map after
    /// the embedded one (`--relay-url`).
    pub relays: Vec<proto::RelayInfo>,
    /// Extra trusted roots (PEM) for fetching federated issuers' keys, besides the system's.
    pub federation_ca: Option<std::path::PathBuf>,
    /// The identity service (`--identity on`, the default): its settings;
    /// `None`: off. See docs/identity.md.
    pub identity: Option<crate::identity::service::Settings>,
    /// The token issuer (`iss`); `None`: `https://<listen address>`.
    pub identity_issuer: Option<String>,
}

/// The default for [`Options::presence_timeout`].
pub const PRESENCE_TIMEOUT: Duration = Duration::from_secs(15);

/// The tailnet as of one change.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Grows with each change.
    pub version: u64,
    /// Every node, with presence filled in.
    pub nodes: Vec<NodeInfo>,
    /// Each node serialized once, so a map is built by copying bytes
    /// rather than serializing every peer again for every node.
    pub json: Vec<Arc<str>>,
    /// Key expiry (Unix seconds) of the nodes that have one.
    pub key_expiries: HashMap<i64, i64>,
    /// The nodes whose key had expired when the snapshot was taken: in no
    /// peer list, and their own streams end with `node_expired`.
    pub expired: HashSet<i64>,
    /// What the policy gives each node (in the order of `nodes`); `None`
    /// when no policy is set and every node sees and reaches every other.
    pub grants: Option<Arc<Vec<NodeGrants>>>,
    /// Subnet routes and exit nodes: primaries and each node's routes (control/routes.rs).
    pub routing: Arc<super::routes::Routing>,
    /// The relays maps name (this replica's first, then other live
    /// replicas' with an address), JSON; empty: none.
    pub relays: Arc<str>,
    /// Each node's index in `nodes`, by id.
    pub index: HashMap<i64, usize>,
    /// What the last [`RECENT_CHANGES`] versions changed, oldest first: the
    /// version and the ids of the nodes whose JSON changed, that appeared
    /// or that went; `None` for a version that may have changed who sees
    /// whom (a recompiled policy, a key that expired or was renewed). A
    /// stream one or a few versions behind sends its delta from these ids
    /// alone; one further behind walks every node.
    pub recent: Vec<(u64, Option<Arc<[i64]>>)>,
}

/// Change lists a snapshot keeps (see [`Snapshot::recent`]).
const RECENT_CHANGES: usize = 32;

/// What the policy gives one node, serialized once per policy and tailnet.
#[derive(Debug, Clone)]
pub struct NodeGrants {
    /// Its packet filter, JSON.
    pub filter: Arc<str>,
    /// Its capabilities, JSON (`[]` for none).
    pub capabilities: Arc<str>,
    /// The ids of the peers it may see.
    pub peers: HashSet<i64>,
}

/// The allow-all filter of a tailnet without a policy, JSON.
fn allow_all_json() -> Arc<str> {
    Arc::from(serde_json::to_string(&proto::FilterRule::allow_all()).unwrap_or_default())
}

/// Compiles the stored policy for the nodes. A stored policy that no longer
/// parses (it was checked when set) denies everything rather than nothing.
fn compile_grants(
    text: &str,
    nodes: &[NodeInfo],
    routers: &std::collections::BTreeMap<i64, Vec<wiremesh_core::filter::Prefix>>,
    tailnet: &Tailnet,
) -> Vec<NodeGrants> {
    let policy = crate::policy::parse(text).unwrap_or_else(|e| {
        eprintln!("wiremeshd control: the stored policy does not parse ({e}); denying all traffic");
        crate::policy::Policy::default()
    });
    // A source `*` is the tailnet's ranges plus the approved subnet routes;
    // the approved routes also extend their routers' filters.
    let network = crate::policy::compile::Network {
        ranges: crate::policy::compile::Network::tailnet_ranges_of_ula(tailnet.ula_prefix),
        routes: routers.clone(),
    };
    let policy_nodes: Vec<_> = nodes.iter().map(crate::policy::wire::node_of).collect();
    let compiled = crate::policy::compile::compile_in(&policy, &policy_nodes, &network);
    compiled
        .into_iter()
        .map(|c| NodeGrants {
            filter: Arc::from(
                serde_json::to_string(&crate::policy::wire::filter_to_wire(&c.filter)).unwrap_or_default(),
            ),
            capabilities: Arc::from(
                serde_json::to_string(&crate::policy::wire::caps_to_wire(&c.capabilities)).unwrap_or_default(),
            ),
            peers: c.peers.into_iter().collect(),
        })
        .collect()
}

/// What a compiled policy depends on: its version, who each node is, and
/// which routes each router serves.
type GrantsKey = (
    i64,
    Vec<(i64, std::net::Ipv4Addr, std::net::Ipv6Addr, Vec<String>, String)>,
    std::collections::BTreeMap<i64, Vec<wiremesh_core::filter::Prefix>>,
);

impl Snapshot {
    /// The ids of the nodes changed since version `since` (sorted, each
    /// once), or `None` when some version since then may have changed who
    /// sees whom or is no longer kept: then only a walk over every node
    /// tells what changed.
    fn changed_since(&self, since: u64) -> Option<Vec<i64>> {
        if since >= self.version {
            return Some(Vec::new());
        }
        let first = self.recent.iter().position(|(v, _)| *v > since)?;
        if self.recent[first].0 != since + 1 {
            return None;
        }
        let mut ids = Vec::new();
        for (_, changed) in &self.recent[first..] {
            ids.extend_from_slice(changed.as_deref()?);
        }
        ids.sort_unstable();
        ids.dedup();
        Some(ids)
    }

    /// Whether node index `me` gets node index `i` in its peer list.
    fn visible(&self, me: usize, i: usize) -> bool {
        i != me
            && !self.expired.contains(&self.nodes[i].id)
            && self.grants.as_ref().is_none_or(|g| g[me].peers.contains(&self.nodes[i].id))
    }

    /// Node index `me`'s filter and capabilities, JSON.
    fn grants_json(&self, me: usize) -> (Arc<str>, Arc<str>) {
        match &self.grants {
            Some(g) => (g[me].filter.clone(), g[me].capabilities.clone()),
            None => (allow_all_json(), Arc::from("[]")),
        }
    }

    /// The admin API's view of node `n`.
    fn admin_node(&self, n: &NodeInfo) -> proto::AdminNode {
        proto::AdminNode {
            node: n.clone(),
            key_expires_at: self.key_expiries.get(&n.id).copied(),
            expired: self.expired.contains(&n.id),
        }
    }
}

/// The server's shared state.
pub struct App {
    db: Mutex<Db>,
    tailnet: Tailnet,
    fingerprint: [u8; 32],
    challenges: Mutex<HashMap<[u8; 32], Instant>>,
    presence: Mutex<HashMap<i64, usize>>,
    publish_lock: Mutex<()>,
    /// Wakes the publisher task ([`App::request_publish`]); `publisher`
    /// says whether one runs.
    publish_wanted: tokio::sync::Notify,
    publisher: std::sync::atomic::AtomicBool,
    version: AtomicU64,
    snapshot: watch::Sender<Arc<Snapshot>>,
    ephemeral_grace: Duration,
    presence_timeout: Duration,
    /// The last compiled policy, reused while neither it nor the nodes change.
    grants_cache: Mutex<Option<(GrantsKey, Arc<Vec<NodeGrants>>)>>,
    /// The relays every map names, as JSON (unset: none).
    /// Outside issuers' tokens register nodes (control/federation.rs).
    pub federation: super::federation::Federation,
    /// This replica's embedded relay port (unset: no relay).
    own_relay: std::sync::OnceLock<u16>,
    /// Relays run elsewhere, named in every map (`--relay-url`).
    other_relays: std::sync::OnceLock<Vec<proto::RelayInfo>>,
    /// The identity service every map names, as JSON (unset: none).
    identity_json: std::sync::OnceLock<String>,
    /// The identity service (`--identity on`): discovery and JWKS on this listener too.
    pub(crate) identity: std::sync::OnceLock<Arc<crate::identity::service::Service>>,
    /// The embedded relay and its bound address, for `GET /admin/relay` (unset: relay off).
    relay: std::sync::OnceLock<(Arc<crate::relay::Relay>, SocketAddr)>,
}

pub(super) type Body = BoxBody<Bytes, Infallible>;

/// Runs `f`, which may block on the store, off the async workers' duty: the
/// synchronous PostgreSQL client must not run on a runtime worker as is.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a lock must not take the server down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    /// Wraps an open store.
    pub fn new(db: Db, fingerprint: [u8; 32], ephemeral_grace: Duration) -> Arc<App> {
        Self::with_presence_timeout(db, fingerprint, ephemeral_grace, PRESENCE_TIMEOUT)
    }

    /// Wraps an open store, taking replicas silent for `presence_timeout` for dead.
    pub fn with_presence_timeout(
        db: Db,
        fingerprint: [u8; 32],
        ephemeral_grace: Duration,
        presence_timeout: Duration,
    ) -> Arc<App> {
        let tailnet = db.tailnet().clone();
        // Versions start at the clock so they keep growing across restarts.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        let app = Arc::new(App {
            db: Mutex::new(db),
            tailnet,
            fingerprint,
            challenges: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            publish_lock: Mutex::new(()),
            publish_wanted: tokio::sync::Notify::new(),
            publisher: std::sync::atomic::AtomicBool::new(false),
            version: AtomicU64::new(start),
            snapshot,
            ephemeral_grace,
            presence_timeout,
            grants_cache: Mutex::new(None),
            federation: Default::default(),
            own_relay: std::sync::OnceLock::new(),
            other_relays: std::sync::OnceLock::new(),
            identity_json: std::sync::OnceLock::new(),
            identity: std::sync::OnceLock::new(),
            relay: std::sync::OnceLock::new(),
        });
        app.publish();
        app
    }

    /// Names the identity service every map carries from now on (set once, at start).
    pub fn set_identity(&self, info: &proto::IdentityInfo) {
        if let Ok(j) = serde_json::to_string(info) {
            let _ = self.identity_json.set(j);
        }
    }

    /// Keeps the embedded relay, so administrators can read its counters
    /// (set once, at start).
    pub fn set_embedded_relay(&self, relay: Arc<crate::relay::Relay>, listen: SocketAddr) {
        let _ = self.relay.set((relay, listen));
    }

    /// Records this replica's embedded relay (set once, at start): its
    /// port, and `advertised`, the `HOST:PORT` other replicas' nodes reach it
    /// at (`None`: only this replica's nodes use it, at the host they reach
    /// the control server by). Maps name it from the next snapshot on.
    pub fn set_relay(&self, port: u16, advertised: Option<String>) -> Result<(), ApiError> {
        let _ = self.own_relay.set(port);
        let row = advertised.unwrap_or_else(|| format!(":{port}"));
        blocking(|| lock(&self.db).set_replica_relay(Some(row)))?;
        // The snapshot maps are built from must name it before any node
        // gets a map, or that node's first home relay would be another's.
        self.request_publish();
        Ok(())
    }

    /// Names relays run elsewhere in every map from the next snapshot on
    /// (set once, at start).
    pub fn set_other_relays(&self, relays: Vec<proto::RelayInfo>) {
        let _ = self.other_relays.set(relays);
        self.request_publish();
    }

    /// The relays maps name: this replica's own first (the home relay of
    /// its nodes), then the relays run elsewhere (`--relay-url`; the first
    /// is the home relay when this replica runs none), then every other
    /// live replica's that has an address.
    fn relays_json(&self, own_replica: &str, relays: &[(String, String)]) -> Arc<str> {
        let mut list: Vec<proto::RelayInfo> = Vec::new();
        if let Some(&port) = self.own_relay.get() {
            list.push(proto::RelayInfo { id: Some(own_replica.to_string()), host: None, port, fingerprint: None });
        }
        list.extend(self.other_relays.get().into_iter().flatten().cloned());
        for (id, at) in relays.iter().filter(|(id, _)| id != own_replica) {
            let parsed = match at.parse::<SocketAddr>() {
                Ok(a) => Some((a.ip().to_string(), a.port())),
                Err(_) => at.rsplit_once(':').and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?))),
            };
            if let Some((host, port)) = parsed.filter(|(h, _)| !h.is_empty()) {
                list.push(proto::RelayInfo { id: Some(id.clone()), host: Some(host), port, fingerprint: None });
            }
        }
        if list.is_empty() {
            return Arc::from("");
        }
        Arc::from(serde_json::to_string(&list).unwrap_or_default())
    }

    /// Sweeps once the grace period after ephemeral node `id` went offline
    /// has passed (last seen is kept in whole seconds, hence the extra
    /// second). The periodic sweep in [`heartbeat`] catches the rest, such as
    /// the nodes of a replica that died. Needs a Tokio runtime.
    fn expire_if_offline(self: &Arc<Self>, id: i64) {
        let app = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(app.ephemeral_grace + Duration::from_millis(1100)).await;
            let (timeout, grace) = (app.presence_timeout, app.ephemeral_grace);
            match app.with_db(move |db| db.sweep(timeout, grace)).await {
                Ok(swept) if swept != db::Swept::default() => app.request_publish(),
                Ok(_) => {}
                Err(e) => eprintln!("wiremeshd control: cannot remove ephemeral node {id}: {e}"),
            }
        });
    }

    /// Rebuilds the snapshot from the store (nodes, key expiries, and which
    /// nodes stream from a live replica) and wakes every map stream.
    pub fn publish(&self) {
        let _order = lock(&self.publish_lock);
        let read = blocking(|| {
            let mut db = lock(&self.db);
            let nodes = db.nodes()?;
            let routes = super::routes::load(&mut db)?;
            let relays = db.relays(self.presence_timeout)?;
            let own = db.replica().to_string();
            Ok::<_, ApiError>((
                nodes,
                db.node_key_expiries()?,
                db.online(self.presence_timeout)?,
                db.policy()?,
                routes,
                (own, relays),
            ))
        });
        let (mut nodes, key_expiries, online, policy, routes, (own_replica, (relays, homes))) = match read {
            Ok(n) => n,
            Err(e) => {
                eprintln!("wiremeshd control: cannot read nodes: {e}");
                return;
            }
        };
        for n in &mut nodes {
            n.online = online.contains(&n.id);
            n.relay = homes.get(&n.id).cloned();
        }
        let relays = self.relays_json(&own_replica, &relays);
        // A node whose JSON did not change keeps the previous snapshot's Arc,
        // so streams tell unchanged peers apart by pointer, not by content.
        let previous = self.snapshot();
        let mut old: HashMap<i64, &Arc<str>> = previous.nodes.iter().map(|n| n.id).zip(&previous.json).collect();
        let mut changed = Vec::new();
        let json = nodes
            .iter()
            .map(|n| {
                let j = serde_json::to_string(n).unwrap_or_default();
                match old.remove(&n.id) {
                    Some(o) if **o == *j => Arc::clone(o),
                    _ => {
                        changed.push(n.id);
                        Arc::from(j)
                    }
                }
            })
            .collect();
        // Whatever is left of the old ones went.
        changed.extend(old.keys());
        let now = db::unix_now();
        let expired: HashSet<i64> = key_expiries.iter().filter(|(_, &at)| at <= now).map(|(&id, _)| id).collect();
        // Routes need the parsed policy (autoApprovers, who may use them) only when there are any.
        let parsed = match (&policy, routes.routes.is_empty()) {
            (Some((text, _)), false) => Some(crate::policy::parse(text).unwrap_or_default()),
            _ => None,
        };
        let routing =
            Arc::new(super::routes::compute(&nodes, &expired, &routes, parsed.as_ref(), &previous.routing.primaries));
        let grants = policy.map(|(text, policy_version)| {
            let key: GrantsKey = (
                policy_version,
                nodes.iter().map(|n| (n.id, n.ipv4, n.ipv6, n.tags.clone(), n.owner.clone())).collect(),
                routing.routers.clone(),
            );
            let mut cache = lock(&self.grants_cache);
            match cache.as_ref() {
                Some((k, g)) if *k == key => g.clone(),
                _ => {
                    let g = Arc::new(compile_grants(&text, &nodes, &routing.routers, &self.tailnet));
                    *cache = Some((key, g.clone()));
                    g
                }
            }
        });
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        // Who sees whom depends on the compiled policy and on which keys
        // expired; while both stay, only the changed nodes need a look.
        let same_sight = expired == previous.expired
            && match (&grants, &previous.grants) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
        let mut recent = previous.recent.clone();
        if previous.version + 1 != version {
            // Versions are taken before the snapshot that carries them is
            // sent, so a list with a gap would be wrong: start again.
            recent.clear();
        }
        recent.push((version, same_sight.then(|| Arc::from(changed))));
        if recent.len() > RECENT_CHANGES {
            recent.drain(..recent.len() - RECENT_CHANGES);
        }
        let index = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        self.snapshot.send_replace(Arc::new(Snapshot {
            version,
            nodes,
            json,
            key_expiries,
            expired,
            grants,
            routing,
            relays,
            index,
            recent,
        }));
    }

    /// Stores a new policy text (already checked) and publishes a snapshot
    /// built with it; returns the policy's new version.
    pub async fn set_policy(self: &Arc<Self>, text: String) -> Result<i64, ApiError> {
        let version = self.with_db(move |db| db.set_policy(&text)).await?;
        self.publish();
        Ok(version)
    }

    /// Asks for a snapshot to be published soon. Requests made while one is
    /// being built are served by one more build, so a burst of changes (many
    /// streams opening, notifications from other replicas) costs a few
    /// rebuilds, not one each. Without a publisher task, publishes at once.
    pub fn request_publish(&self) {
        if self.publisher.load(Ordering::SeqCst) {
            self.publish_wanted.notify_one();
        } else {
            self.publish();
        }
    }

    /// Runs the publisher task that serves [`App::request_publish`].
    fn start_publisher(self: &Arc<Self>) {
        let app = self.clone();
        app.publisher.store(true, Ordering::SeqCst);
        tokio::spawn(async move {
            loop {
                app.publish_wanted.notified().await;
                let a = app.clone();
                if tokio::task::spawn_blocking(move || a.publish()).await.is_err() {
                    eprintln!("wiremeshd control: publishing a snapshot failed");
                }
            }
        });
    }

    /// Runs `f` on the store at once (tests).
    #[cfg(test)]
    pub(super) fn with_db_blocking(&self, f: &mut dyn FnMut(&mut Db)) {
        f(&mut lock(&self.db))
    }

    /// The tailnet's settings.
    pub(super) fn tailnet(&self) -> &Tailnet {
        &self.tailnet
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    pub(super) async fn with_db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Db) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&app.db)))
            .await
            .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
    }

    fn new_challenge(&self) -> Result<[u8; 32], ApiError> {
        let mut c = [0u8; 32];
        SystemRandom::new().fill(&mut c).map_err(|_| ApiError::internal("no randomness".into()))?;
        let now = Instant::now();
        let mut map = lock(&self.challenges);
        if map.len() >= MAX_CHALLENGES {
            map.retain(|_, expiry| *expiry > now);
            if map.len() >= MAX_CHALLENGES {
                return Err(ApiError::new(503, "busy", "too many outstanding challenges"));
            }
        }
        map.insert(c, now + CHALLENGE_TTL);
        Ok(c)
    }

    /// Takes a challenge out (each is good once) and checks it is current.
    fn consume_challenge(&self, hex: &str) -> Result<[u8; 32], ApiError> {
        let c =
            proto::unhex::<32>(hex).ok_or_else(|| ApiError::bad_request("challenge must be 64 hex digits".into()))?;
        match lock(&self.challenges).remove(&c) {
            Some(expiry) if expiry > Instant::now() => Ok(c),
            _ => Err(ApiError::new(401, "bad_challenge", "unknown, used or expired challenge")),
        }
    }

    /// The JSON of node `id`'s map without its version (what decides whether
    /// it changed), or `None` if the node is gone.
    pub fn map_body(&self, snap: &Snapshot, id: i64) -> Option<String> {
        let &me = snap.index.get(&id)?;
        let domain = serde_json::to_string(&self.tailnet.domain).unwrap_or_default();
        let (filter, capabilities) = snap.grants_json(me);
        let size: usize = snap.json.iter().map(|j| j.len() + 1).sum();
        let mut s = String::with_capacity(size + domain.len() + filter.len() + 64);
        s.push_str("\"domain\":");
        s.push_str(&domain);
        s.push_str(",\"self\":");
        s.push_str(&snap.json[me]);
        s.push_str(",\"peers\":[");
        let mut first = true;
        for (i, j) in snap.json.iter().enumerate() {
            if snap.visible(me, i) {
                if !first {
                    s.push(',');
                }
                first = false;
                s.push_str(j);
            }
        }
        s.push_str("],\"filter\":");
        s.push_str(&filter);
        if &*capabilities != "[]" {
            s.push_str(",\"capabilities\":");
            s.push_str(&capabilities);
        }
        let routes = snap.routing.json_of(me);
        if &*routes != "[]" {
            s.push_str(",\"routes\":");
            s.push_str(&routes);
        }
        if !snap.relays.is_empty() {
            s.push_str(",\"relays\":");
            s.push_str(&snap.relays);
        }
        if let Some(identity) = self.identity_json.get() {
            s.push_str(",\"identity\":");
            s.push_str(identity);
        }
        Some(s)
    }
}

/// Publishes a new snapshot whenever a node's key expiry passes, so its
/// peers drop it and its own stream ends within a second of that time.
async fn expiry_timer(app: Arc<App>) {
    let mut changes = app.snapshot.subscribe();
    loop {
        let snap = changes.borrow_and_update().clone();
        let pending = snap.key_expiries.iter().filter(|(id, _)| !snap.expired.contains(id)).map(|(_, &at)| at).min();
        let wait = match pending {
            Some(at) => {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                // Expired means `at <= unix_now()`, true from the start of second `at`.
                Duration::from_millis(at.saturating_mul(1000).saturating_sub(now_ms).clamp(0, 60_000) as u64)
            }
            None => Duration::from_secs(60),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                if pending.is_some_and(|at| at <= db::unix_now()) {
                    app.publish();
                    if app.snapshot().version == snap.version {
                        // The store could not be read: no busy loop.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// Beats this replica's heartbeat every third of the presence timeout and
/// sweeps: dead replicas' nodes go offline, ephemeral nodes offline past
/// their grace go. Any replica may sweep; the SQL is idempotent.
async fn heartbeat(app: Arc<App>) {
    let period = (app.presence_timeout / 3).clamp(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let (timeout, grace) = (app.presence_timeout, app.ephemeral_grace);
        let a = app.clone();
        let r = app
            .with_db(move |db| {
                let known = db.heartbeat()?;
                if !known {
                    // Taken for dead meanwhile: our presence was dropped; write it again.
                    let ids: Vec<i64> = lock(&a.presence).keys().copied().collect();
                    for id in ids {
                        let streams = lock(&a.presence).get(&id).copied().unwrap_or(0);
                        db.set_presence(id, streams)?;
                    }
                }
                Ok((known, db.sweep(timeout, grace)?))
            })
            .await;
        match r {
            Ok((true, swept)) if swept == db::Swept::default() => {}
            Ok(_) => app.request_publish(),
            Err(e) => eprintln!("wiremeshd control: heartbeat: {e}"),
        }
        tokio::time::sleep(period).await;
    }
}

/// Listens (PostgreSQL) for changes committed by other replicas and publishes
/// a snapshot rebuilt from the store for each burst of them. A lost
/// connection is opened again with backoff, followed by a full reload, since
/// notifications sent meanwhile are lost.
fn listen_for_changes(app: Arc<App>, url: String, replica: String) {
    let spawned = std::thread::Builder::new().name("wiremesh-listen".into()).spawn(move || {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            if let Err(e) = listen(&app, &url, &replica) {
                eprintln!("wiremeshd control: change notifications: {e}; listening again");
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    if let Err(e) = spawned {
        eprintln!("wiremeshd control: cannot start the change listener: {e}");
    }
}

fn listen(app: &App, url: &str, replica: &str) -> Result<(), String> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut client = super::store::connect_postgres(url, super::store::LISTENER_NAME).map_err(|e| e.to_string())?;
    client
        .batch_execute(&format!("LISTEN {}", super::store::CHANGES_CHANNEL))
        .map_err(|e| super::store::describe_postgres_error(&e))?;
    // Whatever was committed while not listening.
    app.request_publish();
    loop {
        let first = client
            .notifications()
            .timeout_iter(Duration::from_secs(10))
            .next()
            .map_err(|e| super::store::describe_postgres_error(&e))?;
        let Some(first) = first else {
            // Quiet for a while: make sure the connection is still there.
            client.simple_query("SELECT 1").map_err(|e| super::store::describe_postgres_error(&e))?;
            continue;
        };
        let mut others = first.payload() != replica;
        let mut notes = client.notifications();
        let mut pending = notes.iter();
        while let Some(n) = pending.next().map_err(|e| super::store::describe_postgres_error(&e))? {
            others |= n.payload() != replica;
        }
        // This replica published its own changes when it made them.
        if others {
            app.request_publish();
        }
    }
}

/// The server identity from DER certificate and PKCS#8 key (kept in the
/// PostgreSQL store, shared by the replicas).
fn identity_from_der(cert: Vec<u8>, key: Vec<u8>) -> Result<tls::ServerIdentity, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let fingerprint = tls::fingerprint(&cert);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert)], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
        .map_err(|e| format!("bad certificate or key in the store: {e}"))?;
    Ok(tls::ServerIdentity { config: Arc::new(config), fingerprint })
}

/// One stream line carrying a map: `{"map":{"version":V,<body>}}`.
fn map_line(version: u64, body: &str) -> Bytes {
    Bytes::from(format!("{{\"map\":{{\"version\":{version},{body}}}}}\n"))
}

/// Runs the server until SIGTERM or SIGINT.
pub fn run(opts: &Options) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(serve(opts))
}

async fn serve(opts: &Options) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    let state = opts.state.clone();
    // The store is opened off the async workers: the PostgreSQL client blocks.
    let (db, token, identity) = tokio::task::spawn_blocking(move || {
        let (mut db, token, identity) = match &state {
            db::Location::Dir(dir) => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
                let identity = tls::load_or_create(dir)?;
                let (db, token) = Db::open(dir).map_err(|e| e.to_string())?;
                (db, token, identity)
            }
            db::Location::Postgres(url) => {
                let (mut db, token) = Db::open_postgres(url).map_err(|e| format!("{state}: {e}"))?;
                // Every replica serves the same certificate, so a node's pin holds on any of them.
                let (cert, key) = db
                    .server_identity(|| {
                        let ck = rcgen::generate_simple_self_signed(vec![tls::SERVER_NAME.to_string()])
                            .map_err(|e| format!("cannot make a certificate: {e}"))?;
                        Ok((ck.cert.der().to_vec(), ck.key_pair.serialize_der()))
                    })
                    .map_err(|e| e.to_string())?;
                (db, token, identity_from_der(cert, key)?)
            }
        };
        // Beat first so this replica's presence rows have their row to hang from.
        db.heartbeat().map_err(|e| e.to_string())?;
        Ok::<_, String>((db, token, identity))
    })
    .await
    .map_err(|e| e.to_string())??;
    let replica = db.replica().to_string();
    let replica_id = replica.clone();
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let fp = proto::hex(&identity.fingerprint);
    if let db::Location::Dir(dir) = &opts.state {
        std::fs::write(dir.join("cert.sha256"), format!("{fp}\n")).map_err(|e| e.to_string())?;
    }
    let app = App::with_presence_timeout(db, identity.fingerprint, opts.ephemeral_grace, opts.presence_timeout);
    // Federated tokens name `<control URL>/<client ID>` as audience: the
    // issuer URL of our own tokens (`--identity-issuer`, else https://<listen address>).
    app.federation.set_control_url(&opts.identity_issuer.clone().unwrap_or_else(|| format!("https://{addr}")));
    if let Some(ca) = &opts.federation_ca {
        app.federation.set_extra_roots(super::federation::load_ca(ca)?);
    }
    // The embedded relay shares the control channel's certificate, so the
    // nodes' pin covers it; a port it cannot bind disables it, not the server.
    let relay_addr = match opts.relay {
        Some(at) => match crate::relay::start(at, identity.config.clone(), opts.relay_limits).await {
            Ok((relay, bound)) => {
                app.set_embedded_relay(relay, bound);
                // Other replicas' nodes reach it at its own address, or at
                // the control listener's when it listens on every address.
                let ip = if bound.ip().is_unspecified() { addr.ip() } else { bound.ip() };
                let advertised = opts
                    .relay_advertise
                    .clone()
                    .or_else(|| (!ip.is_unspecified()).then(|| SocketAddr::new(ip, bound.port()).to_string()));
                if advertised.is_none() && matches!(opts.state, db::Location::Postgres(_)) {
                    eprintln!(
                        "wiremeshd control: warning: the embedded relay on {bound} has no address that other \
                         replicas' nodes can reach (both it and --listen bind every address): only this \
                         replica's nodes will use it; set --relay-advertise HOST:PORT"
                    );
                }
                if let Err(e) = app.set_relay(bound.port(), advertised) {
                    eprintln!("wiremeshd control: cannot record the relay: {e}");
                }
                Some(bound)
            }
            Err(e) => {
                eprintln!("wiremeshd control: relay disabled: {e}");
                None
            }
        },
        None => None,
    };
    // Replicas that stopped (this one's earlier life, after a restart) and
    // ephemeral nodes left offline go on the first sweep.
    app.set_other_relays(opts.relays.clone());
    app.start_publisher();
    tokio::spawn(heartbeat(app.clone()));
    if let db::Location::Postgres(url) = &opts.state {
        listen_for_changes(app.clone(), url.clone(), replica);
    }
    {
        let mut out = std::io::stdout().lock();
        if let Some(token) = token {
            let _ = writeln!(out, "admin token (shown once, stored hashed): {token}");
        }
        let _ = writeln!(out, "listening on {addr}");
        if let Some(r) = relay_addr {
            let _ = writeln!(out, "relay listening on {r} (tcp, TLS) and {r} (udp, STUN)");
        }
        let _ = writeln!(out, "control URL: https://{addr}#sha256={fp}");
        let _ = out.flush();
    }
    tokio::spawn(expiry_timer(app.clone()));
    // The identity service: keys now, its tailnet node once this listener
    // answers (the node joins through it like any node).
    let identity_running = match &opts.identity {
        Some(settings) => {
            let issuer = opts.identity_issuer.clone().unwrap_or_else(|| format!("https://{addr}"));
            let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
            let control = super::client::ControlUrl { host, port: addr.port(), fingerprint: identity.fingerprint };
            let node_state = match &opts.state {
                db::Location::Dir(dir) => dir.join("identity-node"),
                db::Location::Postgres(_) => std::env::temp_dir().join(format!("wiremesh-identity-{}", replica_id)),
            };
            let running = crate::identity::service::start(app.clone(), &issuer, settings.clone(), control, node_state)
                .await
                .map_err(|e| format!("identity service: {e}"))?;
            crate::say!("identity issuer: {}", running.service.issuer());
            Some(running)
        }
        None => None,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.config);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
    loop {
        let (tcp, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    eprintln!("wiremeshd control: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let app = app.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            // Unacknowledged data this long ends the connection, so a peer
            // that vanished (no FIN, no RST) is noticed at its next keepalive.
            super::routes::set_user_timeout(&tcp, super::routes::ROUTER_KEEPALIVE * 10);
            let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| handle(app.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    if identity_running.is_some() {
        // Another replica may run the identity node at once.
        drop(identity_running);
        let _ = app.identity_db(|db| db.release_identity_lease()).await;
    }
    Ok(())
}

/// Answers one request; every failure becomes a JSON error, never a panic.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    Ok(match route(app, req).await {
        Ok(r) => r,
        Err(e) => json_response(e.status, &e.body()),
    })
}

pub(super) fn json_response(status: u16, body: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

pub(super) async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(413, "too_large", &format!("cannot read the body (at most {MAX_BODY} bytes): {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

/// A UTF-8 request body of at most `max` bytes.
async fn read_text(req: Request<Incoming>, max: usize) -> Result<String, ApiError> {
    let body = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| ApiError::new(413, "too_large", &format!("cannot read the body (at most {max} bytes): {e}")))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| ApiError::bad_request("the body is not UTF-8".into()))
}

async fn require_admin(app: &Arc<App>, req: &Request<Incoming>) -> Result<(), ApiError> {
    let header = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(token) = header.strip_prefix("Bearer ") else {
        return Err(ApiError::unauthorized("admin token required (Authorization: Bearer <token>)"));
    };
    let token = token.trim().to_string();
    if app.with_db(move |db| db.check_admin(&token)).await? {
        Ok(())
    } else {
        Err(ApiError::unauthorized("wrong admin token"))
    }
}

async fn route(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    if let Some(identity) = app.identity.get() {
        // The issuer's discovery document and JWKS, for verifiers outside the tailnet.
        if let Some(r) = identity.public(req.method(), &path) {
            return Ok(r.map(|b| Full::new(b).boxed()));
        }
    }
    let Some(rest) = path.strip_prefix(proto::API) else {
        return Err(ApiError::not_found("no such endpoint"));
    };
    let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (segments.as_slice(), &method) {
        (["health"], &Method::GET) => Ok(json_response(200, &serde_json::json!({ "ok": true }))),
        (["challenge"], &Method::POST) => {
            let c = app.new_challenge()?;
            Ok(json_response(200, &proto::Challenge { challenge: proto::hex(&c) }))
        }
        (["register"], &Method::POST) => register(app, read_json(req).await?).await,
        (["register", "federated"], &Method::POST) => register_federated(app, read_json(req).await?).await,
        (["logout"], &Method::POST) => logout(app, read_json(req).await?).await,
        (["map"], &Method::POST) => {
            let version = map_version(req.uri().query())?;
            map_stream(app, read_json(req).await?, version).await
        }
        (["admin", ..], _) => {
            require_admin(&app, &req).await?;
            admin(app, &segments[1..], req).await
        }
        (["health" | "challenge" | "register" | "map" | "logout"], _) => {
            Err(ApiError::new(405, "method_not_allowed", "method not allowed"))
        }
        _ => Err(ApiError::not_found("no such endpoint")),
    }
}

async fn admin(app: Arc<App>, segments: &[&str], req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    match (segments, &method) {
        (["tailnet"], &Method::GET) => {
            let fp = proto::hex(&app.fingerprint);
            let tailnet = app.tailnet.clone();
            let v = app.with_db(|db| db.schema_version()).await?;
            Ok(json_response(
                200,
                &proto::TailnetInfo {
                    domain: tailnet.domain.clone(),
                    ipv4_range: format!("{}/{}", std::net::Ipv4Addr::from(db::IPV4_BASE), db::IPV4_PREFIX),
                    ipv6_range: tailnet.ipv6_range(),
                    cert_sha256: fp,
                    schema_version: v,
                },
            ))
        }
        (["keys"], &Method::GET) => Ok(json_response(200, &app.with_db(|db| db.auth_keys()).await?)),
        (["keys"], &Method::POST) => {
            let r: proto::CreateKeyRequest = read_json(req).await?;
            let (key, info) = app
                .with_db(move |db| {
                    let user = match &r.user {
                        Some(login) => Some(
                            db.user_by_login(login)?
                                .ok_or_else(|| ApiError::not_found(&format!("no user {login:?}")))?
                                .id,
                        ),
                        None => None,
                    };
                    if r.node_key_expiry_secs.is_some_and(|s| s == 0 || s > 10 * 365 * 86400) {
                        return Err(ApiError::bad_request("key expiry must be between 1 second and 10 years".into()));
                    }
                    let (key, info) = db.create_auth_key(r.reusable, r.ephemeral, &r.tags, r.expiry_secs, user)?;
                    match r.node_key_expiry_secs {
                        // The key is not shown to anyone yet, so a second step is safe.
                        Some(s) => Ok((key, db.set_auth_key_node_key_expiry(info.id, Some(s))?)),
                        None => Ok((key, info)),
                    }
                })
                .await?;
            Ok(json_response(200, &proto::CreatedKey { key, info }))
        }
        (["keys", id], &Method::DELETE) => {
            let id: i64 = id.parse().map_err(|_| ApiError::bad_request("key id must be a number".into()))?;
            if app.with_db(move |db| db.revoke_auth_key(id)).await? {
                Ok(json_response(200, &serde_json::json!({ "revoked": id })))
            } else {
                Err(ApiError::not_found("no such key"))
            }
        }
        (["nodes"], &Method::GET) => {
            let snap = app.snapshot();
            let nodes: Vec<proto::AdminNode> = snap.nodes.iter().map(|n| snap.admin_node(n)).collect();
            Ok(json_response(200, &nodes))
        }
        (["nodes", which, "expiry"], &Method::POST) => {
            let which = which.to_string();
            let r: proto::NodeExpiryRequest = read_json(req).await?;
            if r.expiry_secs.is_some_and(|s| s > 10 * 365 * 86400) {
                return Err(ApiError::bad_request("expiry_secs must be at most 10 years".into()));
            }
            let at = r.expiry_secs.map(|s| db::unix_now() + s as i64);
            let Some(id) = app.with_db(move |db| db.set_node_key_expiry(&which, at)).await? else {
                return Err(ApiError::not_found("no such node"));
            };
            app.publish();
            let snap = app.snapshot();
            let node = snap.nodes.iter().find(|n| n.id == id).ok_or_else(|| ApiError::not_found("no such node"))?;
            Ok(json_response(200, &snap.admin_node(node)))
        }
        (["nodes", which, "name"], &Method::POST) => {
            let which = which.to_string();
            let r: proto::RenameNodeRequest = read_json(req).await?;
            let Some(id) = app.with_db(move |db| db.rename_node(&which, &r.name)).await? else {
                return Err(ApiError::not_found("no such node"));
            };
            app.publish();
            let snap = app.snapshot();
            let node = snap.nodes.iter().find(|n| n.id == id).ok_or_else(|| ApiError::not_found("no such node"))?;
            Ok(json_response(200, &snap.admin_node(node)))
        }
        (["nodes", which], &Method::DELETE) => {
            let which = which.to_string();
            match app.with_db(move |db| db.remove_node(&which)).await? {
                Some(id) => {
                    app.publish();
                    Ok(json_response(200, &serde_json::json!({ "removed": id })))
                }
                None => Err(ApiError::not_found("no such node")),
            }
        }
        (["users"], &Method::GET) => Ok(json_response(200, &app.with_db(|db| db.users()).await?)),
        (["users"], &Method::POST) => {
            let r: proto::CreateUserRequest = read_json(req).await?;
            let user = app.with_db(move |db| db.create_user(&r.login, r.display_name.as_deref().unwrap_or(""))).await?;
            Ok(json_response(200, &user))
        }
        (["users", login], &Method::DELETE) => {
            let login = percent_decode(login)?;
            match app.with_db(move |db| db.remove_user(&login)).await? {
                Some(id) => Ok(json_response(200, &serde_json::json!({ "removed": id }))),
                None => Err(ApiError::not_found("no such user")),
            }
        }
        (["identity", "rotate-keys"], &Method::POST) => {
            let service = app.identity.get().ok_or_else(|| ApiError::not_found("the identity service is off"))?.clone();
            let kid = service.rotate_now().await?;
            Ok(json_response(200, &serde_json::json!({ "kid": kid })))
        }
        (["policy"], &Method::GET) => {
            let p = app.with_db(|db| db.policy()).await?;
            let (policy, version) = p.map_or((None, 0), |(t, v)| (Some(t), v));
            Ok(json_response(200, &proto::PolicyInfo { policy, version }))
        }
        (["policy"], &Method::PUT) => {
            let text = read_text(req, crate::policy::MAX_POLICY_BYTES).await?;
            // Checked and tested before anything changes: a refused policy changes nothing.
            crate::policy::check(&text).map_err(|e| ApiError::new(400, e.kind.code(), &e.to_string()))?;
            let version = app.set_policy(text.clone()).await?;
            Ok(json_response(200, &proto::PolicyInfo { policy: Some(text), version }))
        }
        (["relay"], &Method::GET) => {
            let (relay, listen) =
                app.relay.get().ok_or_else(|| ApiError::new(404, "no_relay", "this control server runs no relay"))?;
            Ok(json_response(200, &relay.report(*listen)))
        }
        (["routes", ..], _) => super::routes::admin(&app, &segments[1..], req).await,
        (["idp", ..], _) => super::provider_store::admin(&app, &segments[1..], req).await,
        (["federation", ..], _) => super::federation::admin(&app, &segments[1..], req).await,
        (["tailnet" | "keys" | "nodes" | "users" | "policy" | "relay", ..], _) => {
            Err(ApiError::new(405, "method_not_allowed", "method not allowed"))
        }
        _ => Err(ApiError::not_found("no such endpoint")),
    }
}

/// A path segment with its `%XX` escapes decoded (a login may be an e-mail
/// address, which clients may send as `alice%40example.com`).
fn percent_decode(segment: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request("malformed percent-escape in the path".into());
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn parse_machine_key(s: &str) -> Result<[u8; 32], ApiError> {
    proto::unhex::<32>(s).ok_or_else(|| ApiError::bad_request("machine_key must be 64 hex digits".into()))
}

fn parse_node_key(s: &str) -> Result<[u8; 32], ApiError> {
    proto::unb64_key(s).ok_or_else(|| ApiError::bad_request("node_key must be a base64 32-byte key".into()))
}

fn check_endpoints(endpoints: &[String]) -> Result<(), ApiError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(ApiError::bad_request(format!("at most {MAX_ENDPOINTS} endpoints")));
    }
    for e in endpoints {
        e.parse::<SocketAddr>().map_err(|_| ApiError::bad_request(format!("endpoint {e:?} is not ip:port")))?;
    }
    Ok(())
}

fn verify(machine_key: &[u8; 32], message: &[u8], signature_hex: &str) -> Result<(), ApiError> {
    let sig = proto::unhex::<64>(signature_hex)
        .ok_or_else(|| ApiError::bad_request("signature must be 128 hex digits".into()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, machine_key)
        .verify(message, &sig)
        .map_err(|_| ApiError::new(401, "bad_signature", "the machine key signature does not verify"))
}

async fn register(app: Arc<App>, r: proto::RegisterRequest) -> Result<Response<Body>, ApiError> {
    let machine_key = parse_machine_key(&r.machine_key)?;
    let node_key = parse_node_key(&r.node_key)?;
    if r.hostname.len() > 255 || r.auth_key.len() > 256 {
        return Err(ApiError::bad_request("hostname or auth_key too long".into()));
    }
    check_endpoints(&r.endpoints)?;
    let challenge = app.consume_challenge(&r.challenge)?;
    verify(&machine_key, &proto::register_message(&challenge, &app.fingerprint, &r), &r.signature)?;
    let reg =
        Registration { auth_key: r.auth_key, machine_key, node_key, hostname: r.hostname, endpoints: r.endpoints };
    let node = app.with_db(move |db| db.register(&reg)).await?;
    app.publish();
    Ok(json_response(200, &node))
}

/// `POST /api/v1/register/federated`: as [`register`], with an outside
/// issuer's ID token in place of the auth key (control/federation.rs).
async fn register_federated(app: Arc<App>, r: proto::FederatedRegisterRequest) -> Result<Response<Body>, ApiError> {
    let machine_key = parse_machine_key(&r.request.machine_key)?;
    let node_key = parse_node_key(&r.request.node_key)?;
    if r.request.hostname.len() > 255 || r.client_id.len() > 128 || r.id_token.len() > super::federation::MAX_TOKEN {
        return Err(ApiError::bad_request("hostname, client_id or id_token too long".into()));
    }
    if r.tags.len() > 64 {
        return Err(ApiError::bad_request("at most 64 tags".into()));
    }
    check_endpoints(&r.request.endpoints)?;
    let challenge = app.consume_challenge(&r.request.challenge)?;
    verify(&machine_key, &proto::federated_register_message(&challenge, &app.fingerprint, &r), &r.request.signature)?;
    let client_id = r.client_id.clone();
    let cred = app
        .with_db(move |db| db.credential_by_client_id(&client_id))
        .await?
        .ok_or_else(|| ApiError::new(401, "unknown_client_id", "client_id: no trust credential has this client ID"))?;
    let verified = app.federation.verify(&cred, &r.id_token, &r.tags, db::unix_now()).await?;
    let req = r.request;
    let reg = Registration {
        auth_key: String::new(),
        machine_key,
        node_key,
        hostname: req.hostname,
        endpoints: req.endpoints,
    };
    let node = app.with_db(move |db| db.register_federated(&reg, &verified)).await?;
    app.publish();
    Ok(json_response(200, &node))
}

/// A node leaves the tailnet: proven by its machine key as for `/map`, it
/// is removed as an admin's removal would (its other streams end with
/// `node_removed`, its peers drop it).
async fn logout(app: Arc<App>, r: proto::LogoutRequest) -> Result<Response<Body>, ApiError> {
    let machine_key = parse_machine_key(&r.machine_key)?;
    parse_node_key(&r.node_key)?;
    let challenge = app.consume_challenge(&r.challenge)?;
    verify(&machine_key, &proto::logout_message(&challenge, &app.fingerprint, &r), &r.signature)?;
    let id = app
        .with_db(move |db| {
            let node = db
                .node_by_machine_key(&machine_key)?
                .ok_or_else(|| ApiError::new(401, "unknown_machine", "this machine is not registered"))?;
            db.remove_node(&node.id.to_string())?;
            Ok(node.id)
        })
        .await?;
    app.publish();
    Ok(json_response(200, &serde_json::json!({ "removed": id })))
}

/// Counts a node online while one of its streams is open: a count per node
/// in this process, written to the store's presence table (per replica) so
/// other replicas see it too.
struct Presence {
    app: Arc<App>,
    id: i64,
}

impl Presence {
    async fn start(app: Arc<App>, id: i64) -> Result<Self, ApiError> {
        *lock(&app.presence).entry(id).or_insert(0) += 1;
        // Owned from here, so a failed write below still counts down.
        let presence = Presence { app: app.clone(), id };
        app.write_presence(id).await?;
        app.request_publish();
        Ok(presence)
    }
}

impl App {
    /// Writes this process's current stream count of node `id` to the store.
    /// The count is read under the store lock, so of writes racing for one
    /// node the last one written carries the latest count.
    async fn write_presence(self: &Arc<Self>, id: i64) -> Result<(), ApiError> {
        let app = self.clone();
        self.with_db(move |db| {
            let streams = lock(&app.presence).get(&id).copied().unwrap_or(0);
            db.set_presence(id, streams)
        })
        .await
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        let offline = {
            let mut p = lock(&self.app.presence);
            match p.get_mut(&self.id) {
                Some(c) if *c > 1 => {
                    *c -= 1;
                    false
                }
                _ => {
                    p.remove(&self.id);
                    true
                }
            }
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (app, id) = (self.app.clone(), self.id);
        rt.spawn(async move {
            if let Err(e) = app.write_presence(id).await {
                eprintln!("wiremeshd control: cannot record node {id} offline: {e}");
            }
            app.request_publish();
            let ephemeral = app.snapshot().nodes.iter().any(|n| n.id == id && n.ephemeral);
            if offline && ephemeral {
                app.expire_if_offline(id);
            }
        });
    }
}

/// A response body fed line by line from a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn line(msg: &StreamMessage) -> Bytes {
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// The answer to an expired node: register again with an auth key.
fn node_expired() -> ApiError {
    ApiError::new(
        401,
        "node_expired",
        "this node's key has expired: re-authenticate by registering again with a valid auth key",
    )
}

/// The map-stream version asked for with `?version=N` (1 without it), as
/// far as this server speaks it.
fn map_version(query: Option<&str>) -> Result<u32, ApiError> {
    let asked = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("version="))
        .map(|v| v.parse::<u32>().map_err(|_| ApiError::bad_request("version must be a number".into())))
        .transpose()?
        .unwrap_or(1);
    Ok(asked.clamp(1, proto::MAP_VERSION))
}

/// What a version 2 stream last sent: the snapshot its map was last brought
/// to (whose peers, as this node saw them then, are what the node holds;
/// shared with every other stream at that version, so a stream costs the
/// same memory whatever the tailnet's size), and its own entry, filter,
/// capabilities and routes.
struct Sent {
    /// This node's id.
    id: i64,
    last: Arc<Snapshot>,
    me: Arc<str>,
    filter: Arc<str>,
    capabilities: Arc<str>,
    routes: Arc<str>,
}

impl Sent {
    /// Records the full map just sent for node index `me`.
    fn full(snap: &Arc<Snapshot>, me: usize) -> Sent {
        let (filter, capabilities) = snap.grants_json(me);
        Sent {
            id: snap.nodes[me].id,
            last: snap.clone(),
            me: snap.json[me].clone(),
            filter,
            capabilities,
            routes: snap.routing.json_of(me),
        }
    }

    /// The JSON of node `id` as the node last got it, if it was a peer.
    fn sent_json(&self, id: i64) -> Option<&Arc<str>> {
        let last = &self.last;
        let &me = last.index.get(&self.id)?;
        let &i = last.index.get(&id)?;
        last.visible(me, i).then(|| &last.json[i])
    }

    /// What `snap` changes among the nodes `ids` (sorted): the JSON to
    /// upsert (comma-separated) and the ids to remove.
    fn diff_of(&self, snap: &Snapshot, me: usize, ids: &[i64]) -> (String, Vec<i64>) {
        let mut upsert = String::new();
        let mut remove = Vec::new();
        for &id in ids {
            let now = snap.index.get(&id).filter(|&&i| snap.visible(me, i)).map(|&i| &snap.json[i]);
            match (self.sent_json(id), now) {
                (Some(old), Some(j)) if Arc::ptr_eq(old, j) || old == j => {}
                (_, Some(j)) => {
                    if !upsert.is_empty() {
                        upsert.push(',');
                    }
                    upsert.push_str(j);
                }
                (Some(_), None) => remove.push(id),
                (None, None) => {}
            }
        }
        (upsert, remove)
    }

    /// What `snap` changes, found by walking every node of it and of the
    /// snapshot last sent (as [`Sent::diff_of`]).
    fn diff_all(&self, snap: &Snapshot, me: usize) -> (String, Vec<i64>) {
        let mut upsert = String::new();
        for (i, (n, j)) in snap.nodes.iter().zip(&snap.json).enumerate() {
            if !snap.visible(me, i) {
                continue;
            }
            // Unchanged nodes keep their Arc across snapshots: a pointer compare.
            if self.sent_json(n.id).is_some_and(|old| Arc::ptr_eq(old, j) || old == j) {
                continue;
            }
            if !upsert.is_empty() {
                upsert.push(',');
            }
            upsert.push_str(j);
        }
        let mut remove = Vec::new();
        let last = &self.last;
        if let Some(&was_me) = last.index.get(&self.id) {
            for (o, n) in last.nodes.iter().enumerate() {
                if last.visible(was_me, o) && !snap.index.get(&n.id).is_some_and(|&i| snap.visible(me, i)) {
                    remove.push(n.id);
                }
            }
        }
        remove.sort_unstable();
        (upsert, remove)
    }

    /// The delta line bringing the last map to `snap`'s, or `None` if nothing
    /// changed; updates what was sent. A stream a few versions behind looks
    /// only at the nodes those versions changed (O(changes)); one further
    /// behind, or past a change of who sees whom, walks every node.
    fn delta(&mut self, snap: &Arc<Snapshot>, me: usize) -> Option<Bytes> {
        let (upsert, remove) = match snap.changed_since(self.last.version) {
            Some(ids) => self.diff_of(snap, me, &ids),
            None => self.diff_all(snap, me),
        };
        self.last = snap.clone();
        self.line(snap, me, upsert, remove)
    }

    /// The delta line for the peers found changed, and for this node's own
    /// entry, filter, capabilities and routes when they changed.
    fn line(&mut self, snap: &Snapshot, me: usize, upsert: String, remove: Vec<i64>) -> Option<Bytes> {
        let self_changed = self.me != snap.json[me];
        let (filter, capabilities) = snap.grants_json(me);
        let filter_changed = self.filter != filter;
        let capabilities_changed = self.capabilities != capabilities;
        let routes = snap.routing.json_of(me);
        let routes_changed = self.routes != routes;
        if !self_changed
            && upsert.is_empty()
            && remove.is_empty()
            && !filter_changed
            && !capabilities_changed
            && !routes_changed
        {
            return None;
        }
        let mut out = format!("{{\"delta\":{{\"version\":{}", snap.version);
        if self_changed {
            self.me = snap.json[me].clone();
            out.push_str(",\"self\":");
            out.push_str(&self.me);
        }
        if !upsert.is_empty() {
            out.push_str(",\"upsert\":[");
            out.push_str(&upsert);
            out.push(']');
        }
        if !remove.is_empty() {
            out.push_str(",\"remove\":");
            out.push_str(&serde_json::to_string(&remove).unwrap_or_default());
        }
        if filter_changed {
            out.push_str(",\"filter\":");
            out.push_str(&filter);
            self.filter = filter;
        }
        if capabilities_changed {
            out.push_str(",\"capabilities\":");
            out.push_str(&capabilities);
            self.capabilities = capabilities;
        }
        if routes_changed {
            out.push_str(",\"routes\":");
            out.push_str(&routes);
            self.routes = routes;
        }
        out.push_str("}}\n");
        Some(Bytes::from(out))
    }
}

async fn map_stream(app: Arc<App>, rr: proto::RoutedMapRequest, version: u32) -> Result<Response<Body>, ApiError> {
    let r = &rr.request;
    let machine_key = parse_machine_key(&r.machine_key)?;
    let node_key = parse_node_key(&r.node_key)?;
    check_endpoints(&r.endpoints)?;
    let advertised = super::routes::parse_routes(&rr.routes, &app.tailnet)?;
    if rr.exit_node.as_ref().is_some_and(|e| e.is_empty() || e.len() > 255) {
        return Err(ApiError::bad_request("exit_node must be a node name".into()));
    }
    let challenge = app.consume_challenge(&r.challenge)?;
    verify(&machine_key, &proto::map_message_with_routes(&challenge, &app.fingerprint, &rr), &r.signature)?;
    let endpoints = r.endpoints.clone();
    let exit_node = rr.exit_node.clone();
    // A router's stream is written to every second, so a router that dies
    // is seen offline (a failed write) within seconds and its routes fail over.
    let keepalive = if advertised.is_empty() { KEEPALIVE } else { super::routes::ROUTER_KEEPALIVE };
    let id = app
        .with_db(move |db| {
            let node = db
                .node_by_machine_key(&machine_key)?
                .ok_or_else(|| ApiError::new(401, "unknown_machine", "this machine is not registered"))?;
            if db.node_key_expiry(node.id)?.is_some_and(|at| at <= db::unix_now()) {
                return Err(node_expired());
            }
            db.update_node(node.id, &node_key, &endpoints)?;
            super::routes::set_advertised(db, node.id, &advertised, exit_node.as_deref())?;
            Ok(node.id)
        })
        .await?;
    let presence = Presence::start(app.clone(), id).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let mut changes = app.snapshot.subscribe();
    tokio::spawn(async move {
        let _presence = presence;
        let mut last: Option<String> = None;
        let mut sent: Option<Sent> = None;
        loop {
            let snap = changes.borrow_and_update().clone();
            if snap.expired.contains(&id) {
                let _ = tx.send(line(&StreamMessage::Error(node_expired().body()))).await;
                break;
            }
            if version >= 2 {
                let Some(&me) = snap.index.get(&id) else {
                    let err = ApiError::new(410, "node_removed", "this node was removed from the tailnet");
                    let _ = tx.send(line(&StreamMessage::Error(err.body()))).await;
                    break;
                };
                let out = match sent.as_mut() {
                    Some(s) => s.delta(&snap, me),
                    None => {
                        let body = app.map_body(&snap, id).unwrap_or_default();
                        sent = Some(Sent::full(&snap, me));
                        Some(map_line(snap.version, &body))
                    }
                };
                if let Some(out) = out {
                    if tx.send(out).await.is_err() {
                        break;
                    }
                }
            } else {
                match app.map_body(&snap, id) {
                    None => {
                        let err = ApiError::new(410, "node_removed", "this node was removed from the tailnet");
                        let _ = tx.send(line(&StreamMessage::Error(err.body()))).await;
                        break;
                    }
                    Some(body) => {
                        if last.as_deref() != Some(body.as_str()) {
                            if tx.send(map_line(snap.version, &body)).await.is_err() {
                                break;
                            }
                            last = Some(body);
                        }
                    }
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = tokio::time::sleep(keepalive) => {
                    if tx.send(line(&StreamMessage::Keepalive)).await.is_err() {
                        break;
                    }
                }
                _ = tx.closed() => break,
            }
        }
    });
    Response::builder()
        .status(200)
        .header(hyper::header::CONTENT_TYPE, "application/x-ndjson")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .header(proto::MAP_VERSION_HEADER, version.to_string())
        .body(BodyExt::boxed(ChannelBody(rx)))
        .map_err(|e| ApiError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto::NetworkMap;

    #[test]
    fn hand_built_map_lines_decode_to_the_maps() {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let (key, _) = db.create_auth_key(true, false, &["tag:x".into()], None, None).unwrap();
        for n in 1..=3u8 {
            let reg = Registration {
                auth_key: key.clone(),
                machine_key: [n; 32],
                node_key: [n + 10; 32],
                hostname: format!("h\"{n}"),
                endpoints: vec![format!("192.0.2.{n}:1")],
            };
            db.register(&reg).unwrap();
        }
        let app = App::new(db, [0; 32], Duration::from_secs(1));
        let snap = app.snapshot();
        for node in &snap.nodes {
            let line = map_line(snap.version, &app.map_body(&snap, node.id).unwrap());
            let StreamMessage::Map(map) = serde_json::from_slice(&line).unwrap() else { panic!("not a map") };
            let want = NetworkMap {
                version: snap.version,
                domain: "wiremesh.internal".into(),
                self_node: node.clone(),
                peers: snap.nodes.iter().filter(|n| n.id != node.id).cloned().collect(),
                filter: proto::FilterRule::allow_all(),
                capabilities: Vec::new(),
                routes: Vec::new(),
                relays: Vec::new(),
                identity: None,
            };
            assert_eq!(*map, want);
        }
        assert!(app.map_body(&snap, 99).is_none());
    }

    fn full_map(app: &App, snap: &Snapshot, id: i64) -> NetworkMap {
        let line = map_line(snap.version, &app.map_body(snap, id).unwrap());
        let StreamMessage::Map(map) = serde_json::from_slice(&line).unwrap() else { panic!("not a map") };
        *map
    }

    /// Node `n`'s registration with `key`: host `h{n}`, endpoint 192.0.2.n:1.
    fn registration(key: &str, n: u8) -> Registration {
        Registration {
            auth_key: key.to_string(),
            machine_key: [n; 32],
            node_key: [n + 100; 32],
            hostname: format!("h{n}"),
            endpoints: vec![format!("192.0.2.{n}:1")],
        }
    }

    /// A server on an in-memory store with nodes h1 to h`count` registered,
    /// and the reusable auth key they used.
    fn app_with_nodes(count: u8) -> (Arc<App>, String) {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let (key, _) = db.create_auth_key(true, false, &[], None, None).unwrap();
        for n in 1..=count {
            db.register(&registration(&key, n)).unwrap();
        }
        (App::new(db, [0; 32], Duration::from_secs(1)), key)
    }

    #[test]
    fn deltas_rebuild_the_full_maps_and_are_small() {
        let (app, key) = app_with_nodes(20);
        let reg = |n: u8| registration(&key, n);
        let me_id = app.snapshot().nodes[0].id;
        let snap = app.snapshot();
        let mut map = full_map(&app, &snap, me_id);
        let full_len = map_line(snap.version, &app.map_body(&snap, me_id).unwrap()).len();
        let mut sent = Sent::full(&snap, 0);
        assert!(sent.delta(&snap, 0).is_none(), "no change, no line");
        let step = |map: &mut NetworkMap, sent: &mut Sent| -> usize {
            let snap = app.snapshot();
            let me = snap.nodes.iter().position(|n| n.id == me_id).unwrap();
            let line = sent.delta(&snap, me).expect("a delta");
            let msg: proto::StreamMessageV2 = serde_json::from_slice(&line).unwrap();
            let proto::StreamMessageV2::Delta(d) = msg else { panic!("not a delta") };
            map.apply(*d);
            assert_eq!(*map, full_map(&app, &snap, me_id));
            line.len()
        };
        // A new node, an endpoint change, a removal, an expiry, and self changing.
        lock(&app.db).register(&reg(30)).unwrap();
        app.publish();
        let added = step(&mut map, &mut sent);
        let id5 = app.snapshot().nodes[5].id;
        lock(&app.db).update_node(id5, &[200; 32], &["198.51.100.1:2".into()]).unwrap();
        app.publish();
        step(&mut map, &mut sent);
        lock(&app.db).remove_node("h3").unwrap();
        app.publish();
        let removed = step(&mut map, &mut sent);
        lock(&app.db).set_node_key_expiry("h4", Some(1)).unwrap();
        app.publish();
        step(&mut map, &mut sent);
        lock(&app.db).update_node(me_id, &[201; 32], &["198.51.100.2:2".into()]).unwrap();
        lock(&app.db).set_node_key_expiry("h4", None).unwrap();
        app.publish();
        step(&mut map, &mut sent);
        assert_eq!(map.peers.len(), 19);
        assert!(added * 5 < full_len && removed * 20 < full_len, "full {full_len}, delta {added}/{removed}");
    }

    /// Streams one, a few and many versions behind, across endpoint
    /// changes, registrations, removals, expiries and a policy: each delta
    /// rebuilds the full map, whether it came from the change lists or
    /// from a walk over every node.
    #[test]
    fn change_lists_give_the_deltas_a_walk_gives() {
        let (app, key) = app_with_nodes(12);
        let reg = |n: u8| registration(&key, n);
        let snap = app.snapshot();
        let me_id = snap.nodes[0].id;
        // (map, what was sent, publishes between its deltas)
        let mut streams: Vec<(NetworkMap, Sent, usize)> = [1, 3, RECENT_CHANGES + 5]
            .into_iter()
            .map(|every| (full_map(&app, &snap, me_id), Sent::full(&snap, 0), every))
            .collect();
        let catch_up = |map: &mut NetworkMap, sent: &mut Sent| {
            let snap = app.snapshot();
            let me = snap.index[&me_id];
            match sent.delta(&snap, me) {
                Some(line) => {
                    let proto::StreamMessageV2::Delta(d) = serde_json::from_slice(&line).unwrap() else { panic!() };
                    map.apply(*d);
                }
                // Nothing to send: the map the node holds is this version's.
                None => map.version = snap.version,
            }
            assert_eq!(*map, full_map(&app, &snap, me_id), "at version {}", snap.version);
        };
        let mut fast = 0;
        for round in 0..(2 * RECENT_CHANGES + 12) {
            let n = (round % 11 + 2) as u8;
            {
                let mut db = lock(&app.db);
                match round % 7 {
                    0..=2 => {
                        let id = db.nodes().unwrap().iter().find(|x| x.name == format!("h{n}")).map(|x| x.id);
                        if let Some(id) = id {
                            db.update_node(id, &[n + 100; 32], &[format!("198.51.100.{round}:9")]).unwrap();
                        }
                    }
                    3 => {
                        let _ = db.remove_node(&format!("h{n}"));
                    }
                    4 => {
                        let _ = db.register(&reg(n));
                    }
                    5 => {
                        let _ = db.set_node_key_expiry(&format!("h{n}"), if round % 2 == 0 { Some(1) } else { None });
                    }
                    _ => {
                        let text = if round % 2 == 0 {
                            format!(r#"{{"acls": [{{"action": "accept", "src": ["*"], "dst": ["h{n}:*"]}}]}}"#)
                        } else {
                            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#.to_string()
                        };
                        db.set_policy(&text).unwrap();
                    }
                }
            }
            app.publish();
            let snap = app.snapshot();
            for (map, sent, every) in &mut streams {
                if round % *every == 0 {
                    fast += usize::from(snap.changed_since(sent.last.version).is_some());
                    catch_up(map, sent);
                }
            }
        }
        assert!(fast > RECENT_CHANGES, "the change lists served {fast} deltas");
        // Too far behind, or past a policy change: a walk.
        let snap = app.snapshot();
        assert!(snap.changed_since(snap.version - RECENT_CHANGES as u64 - 1).is_none());
        assert_eq!(snap.changed_since(snap.version), Some(vec![]));
        lock(&app.db).set_policy(r#"{"acls": []}"#).unwrap();
        app.publish();
        let after = app.snapshot();
        assert!(after.changed_since(snap.version).is_none());
        let id = after.nodes[3].id;
        lock(&app.db).update_node(id, &[1; 32], &["203.0.113.1:1".into()]).unwrap();
        app.publish();
        assert_eq!(app.snapshot().changed_since(after.version), Some(vec![id]));
    }

    #[test]
    fn policy_maps_and_deltas_carry_filters_peers_and_capabilities() {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let (plain, _) = db.create_auth_key(true, false, &[], None, None).unwrap();
        let (tagged, _) = db.create_auth_key(true, false, &["tag:srv".into()], None, None).unwrap();
        let reg = |key: &str, n: u8| Registration {
            auth_key: key.into(),
            machine_key: [n; 32],
            node_key: [n + 100; 32],
            hostname: format!("p{n}"),
            endpoints: vec![format!("192.0.2.{n}:1")],
        };
        for n in 1..=3u8 {
            db.register(&reg(&plain, n)).unwrap();
        }
        db.register(&reg(&tagged, 4)).unwrap();
        let app = App::new(db, [0; 32], Duration::from_secs(1));
        let snap = app.snapshot();
        let ids: Vec<i64> = snap.nodes.iter().map(|n| n.id).collect();
        let (me, srv) = (ids[0], ids[3]);
        let mut map = full_map(&app, &snap, me);
        assert_eq!(map.peers.len(), 3, "no policy: everyone");
        assert_eq!(map.filter, proto::FilterRule::allow_all());
        let mut sent = Sent::full(&snap, 0);
        let step = |map: &mut NetworkMap, sent: &mut Sent| {
            let snap = app.snapshot();
            let line = sent.delta(&snap, 0).expect("a delta");
            let proto::StreamMessageV2::Delta(d) = serde_json::from_slice(&line).unwrap() else { panic!() };
            map.apply(*d);
            assert_eq!(*map, full_map(&app, &snap, me));
        };
        // Untagged nodes (owned by admin) may reach tag:srv on 22, with a capability.
        let text = r#"{"tagOwners": {"tag:srv": []},
            "acls": [{"action": "accept", "src": ["admin@"], "dst": ["tag:srv:22"]}],
            "grants": [{"src": ["admin@"], "dst": ["tag:srv"], "app": {"example.com/cap/x": [{"y": 1}]}}]}"#;
        lock(&app.db).set_policy(text).unwrap();
        app.publish();
        step(&mut map, &mut sent);
        assert_eq!(map.peers.iter().map(|p| p.id).collect::<Vec<_>>(), vec![srv]);
        assert!(map.filter.is_empty(), "nothing may reach an untagged node");
        let snap = app.snapshot();
        let server_map = full_map(&app, &snap, srv);
        assert_eq!(server_map.peers.len(), 3);
        assert_eq!(server_map.filter.len(), 1);
        assert_eq!(server_map.filter[0].ports, "22");
        assert_eq!(server_map.capabilities.len(), 1);
        assert_eq!(server_map.capabilities[0].src.len(), 6, "three callers, two addresses each");
        // Denying everything empties the peer list; the filter stays empty.
        lock(&app.db).set_policy(r#"{"acls": []}"#).unwrap();
        app.publish();
        step(&mut map, &mut sent);
        assert!(map.peers.is_empty());
        assert!(sent.delta(&app.snapshot(), 0).is_none());
    }
}
