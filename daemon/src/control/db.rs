//! The control server's state, in SQLite (a directory: WAL mode with
//! `synchronous=FULL`, so a write is on disk before the server answers) or
//! PostgreSQL (`postgres://…`, shared by several control replicas), through
//! one SQL layer ([`super::store`]) and one list of versioned migrations
//! applied at open. Secrets (admin tokens, auth keys) are stored only as
//! SHA-256 hashes: they are 32 random bytes, so a plain hash cannot be
//! brute-forced and a slow password hash would buy nothing.

use super::alloc::{self, dns_label, Ipv4Range, NewNode};
use super::proto::{hex, AuthKeyInfo, NodeInfo, UserInfo};
use super::store::{params, Conn, Dialect, Row};
use super::ApiError;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// The schema, one step per version, with the dialect's types filled in for
/// `{id}`, `{int}` and `{blob}` ([`Dialect::schema`]). Never edit a released
/// step; add one.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE tailnet (
            id {int} PRIMARY KEY CHECK (id = 1),
            domain TEXT NOT NULL,
            ula_prefix {blob} NOT NULL,
            next_ipv4 {int} NOT NULL,
            created_at {int} NOT NULL
        );
        CREATE TABLE admin_tokens (
            id {id},
            token_hash {blob} NOT NULL UNIQUE,
            created_at {int} NOT NULL
        );
        CREATE TABLE auth_keys (
            id {id},
            key_hash {blob} NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            reusable {int} NOT NULL,
            ephemeral {int} NOT NULL,
            tags TEXT NOT NULL,
            created_at {int} NOT NULL,
            expires_at {int},
            uses {int} NOT NULL DEFAULT 0,
            revoked_at {int}
        );
        CREATE TABLE nodes (
            id {id},
            machine_key {blob} NOT NULL UNIQUE,
            node_key {blob} NOT NULL UNIQUE,
            hostname TEXT NOT NULL,
            name TEXT NOT NULL UNIQUE,
            ipv4 {int} NOT NULL UNIQUE,
            endpoints TEXT NOT NULL,
            tags TEXT NOT NULL,
            ephemeral {int} NOT NULL,
            auth_key_id {int} REFERENCES auth_keys(id) ON DELETE SET NULL,
            created_at {int} NOT NULL,
            last_seen {int} NOT NULL
        );",
    ),
    // Node key expiry: after this Unix second the node must re-authenticate.
    (2, "ALTER TABLE nodes ADD COLUMN key_expires_at {int};"),
    // Users own the untagged nodes registered with their keys; the policy
    // (huJSON text) is one row whose version grows with every change.
    (
        3,
        "CREATE TABLE users (
            id {id},
            login TEXT NOT NULL UNIQUE,
            display_name TEXT NOT NULL,
            created_at {int} NOT NULL
        );
        ALTER TABLE auth_keys ADD COLUMN user_id {int} REFERENCES users(id) ON DELETE SET NULL;
        ALTER TABLE nodes ADD COLUMN user_id {int} REFERENCES users(id) ON DELETE SET NULL;
        CREATE TABLE policy (
            id {int} PRIMARY KEY CHECK (id = 1),
            policy_text TEXT NOT NULL,
            version {int} NOT NULL,
            updated_at {int} NOT NULL
        );",
    ),
    // Presence shared by replicas: each control process (replica) beats
    // its row; a node is online while a live replica holds a stream of it.
    // The TLS identity every replica serves (PostgreSQL; a state directory
    // keeps it in files).
    (
        4,
        "CREATE TABLE replicas (
            id TEXT PRIMARY KEY,
            heartbeat_ms {int} NOT NULL
        );
        CREATE TABLE presence (
            node_id {int} NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
            replica TEXT NOT NULL REFERENCES replicas(id) ON DELETE CASCADE,
            streams {int} NOT NULL,
            PRIMARY KEY (node_id, replica)
        );
        CREATE TABLE server_identity (
            id {int} PRIMARY KEY CHECK (id = 1),
            cert_der {blob} NOT NULL,
            key_der {blob} NOT NULL
        );",
    ),
    // Auth keys may give the nodes registered with them a node key expiry
    // (seconds after registration; NULL: never). Added by the node-agent/CLI
    // work (`wiremesh keys create --key-expiry`).
    (5, "ALTER TABLE auth_keys ADD COLUMN node_key_expiry_secs {int};"),
    // Subnet routes and exit nodes (control/routes.rs, docs/routes.md):
    // what each node offers and what an administrator approved, and the
    // exit node each node chose.
    (
        6,
        "CREATE TABLE routes (
            node_id {int} NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
            prefix TEXT NOT NULL,
            advertised {int} NOT NULL,
            approved {int} NOT NULL,
            PRIMARY KEY (node_id, prefix)
        );
        ALTER TABLE nodes ADD COLUMN exit_node TEXT;",
    ),
    // The identity service (control/identity_store.rs): the signing key
    // set, and the identity node's keys and the lease to run it.
    (10, super::identity_store::MIGRATION),
    // Federation (control/federation.rs): trust credentials for outside
    // issuers, the ID tokens (issuer and jti) already used, until they
    // expire, and the credential each node registered with.
    (
        11,
        "CREATE TABLE federation_credentials (
            id {id},
            client_id TEXT NOT NULL UNIQUE,
            issuer TEXT NOT NULL,
            subject TEXT NOT NULL,
            tags TEXT NOT NULL,
            ephemeral {int} NOT NULL,
            created_at {int} NOT NULL
        );
        CREATE TABLE federation_jtis (
            token TEXT PRIMARY KEY,
            expires_at {int} NOT NULL
        );
        ALTER TABLE nodes ADD COLUMN federation_id {int} REFERENCES federation_credentials(id) ON DELETE SET NULL;",
    ),
    // The OIDC provider (control/provider_store.rs): its clients, codes
    // and tokens, secrets as hashes.
    (12, super::provider_store::MIGRATION),
    // Each replica's embedded relay (`HOST:PORT`; an empty host when it has
    // no address other replicas' nodes could use; NULL: no relay), so maps
    // name every replica's relay and each node's home relay (docs/nat.md).
    (13, "ALTER TABLE replicas ADD COLUMN relay TEXT;"),
    // When each replica's presence of a node began (Unix ms): a node's home
    // relay is the one of the replica it streamed from last, not of one
    // that died holding its old stream (see [`Db::relays`]).
    (14, "ALTER TABLE presence ADD COLUMN since_ms {int} NOT NULL DEFAULT 0;"),
];

/// Where the state lives: `--state DIR` or `--state postgres://…`.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory: `state.db` (SQLite) and the TLS identity in files.
    Dir(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl std::str::FromStr for Location {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<postgres::Config>().map_err(|e| format!("bad PostgreSQL URL: {e}"))?;
            Ok(Location::Postgres(s.to_string()))
        } else if s.contains("://") {
            Err("--state is a directory or a postgres:// URL".into())
        } else if s.is_empty() {
            Err("--state must not be empty".into())
        } else {
            Ok(Location::Dir(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for Location {
    /// The directory, or the PostgreSQL URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Dir(d) => write!(f, "{}", d.display()),
            Location::Postgres(url) => {
                let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
                match rest.rsplit_once('@') {
                    Some((userinfo, host)) => {
                        let user = userinfo.split(':').next().unwrap_or("");
                        write!(f, "{scheme}://{user}@{host}")
                    }
                    None => write!(f, "{scheme}://{rest}"),
                }
            }
        }
    }
}

/// The IPv4 range nodes get addresses from (RFC 6598 shared address space).
pub const IPV4_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// Prefix length of [`IPV4_BASE`].
pub const IPV4_PREFIX: u8 = 10;
/// Kept free for a tailnet resolver (MagicDNS-style).
pub const IPV4_RESOLVER: u32 = u32::from_be_bytes([100, 100, 100, 100]);

/// The tailnet's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tailnet {
    /// DNS domain.
    pub domain: String,
    /// The 48-bit ULA prefix (starts with 0xfd).
    pub ula_prefix: [u8; 6],
}

impl Tailnet {
    /// The IPv6 address paired with a tailnet IPv4 address: the ULA /48, zeros,
    /// and the IPv4 address in the low 32 bits, so it is as stable and unique as the IPv4 one.
    pub fn ipv6_for(&self, ipv4: Ipv4Addr) -> Ipv6Addr {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.ula_prefix);
        b[12..].copy_from_slice(&ipv4.octets());
        Ipv6Addr::from(b)
    }

    /// The ULA /48 in CIDR form.
    pub fn ipv6_range(&self) -> String {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.ula_prefix);
        format!("{}/48", Ipv6Addr::from(b))
    }
}

/// What a node registration asks for, already checked for shape.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The presented auth key (the secret).
    pub auth_key: String,
    /// Ed25519 public key.
    pub machine_key: [u8; 32],
    /// WireGuard public key.
    pub node_key: [u8; 32],
    /// The host name asked for.
    pub hostname: String,
    /// Reported endpoints.
    pub endpoints: Vec<String>,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("state store: {e}"))
}

/// SHA-256 of a secret token: what is stored in place of the token.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A fresh secret token: `prefix` and 32 random bytes in hex.
pub fn new_secret(prefix: &str) -> String {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).expect("the OS random number generator failed");
    format!("{prefix}{}", hex(&b))
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The owner of nodes that have tags.
pub const OWNER_TAGGED: &str = "tagged-devices";
/// The owner of untagged nodes whose key has no user.
pub const OWNER_ADMIN: &str = "admin";

/// A login as stored: lowercase; 1-64 letters, digits and `.` `_` `-` `+` `@`,
/// starting with a letter or digit; not one of the reserved owner names.
pub fn check_login(login: &str) -> Result<String, ApiError> {
    let l = login.to_ascii_lowercase();
    let ok = !l.is_empty()
        && l.len() <= 64
        && l.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b));
    if !ok {
        return Err(ApiError::bad_request(format!(
            "login {login:?} must be 1-64 letters, digits, '.', '_', '-', '+' or '@', starting with a letter or digit"
        )));
    }
    if l == OWNER_ADMIN || l == OWNER_TAGGED {
        return Err(ApiError::bad_request(format!("login {l:?} is reserved")));
    }
    Ok(l)
}

pub(super) fn check_tag(tag: &str) -> Result<(), ApiError> {
    let name =
        tag.strip_prefix("tag:").ok_or_else(|| ApiError::bad_request(format!("tag {tag:?} must start with tag:")))?;
    if name.is_empty() || name.len() > 63 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::bad_request(format!("tag {tag:?} must be tag: and 1-63 letters, digits, - or _")));
    }
    Ok(())
}

/// The state store.
pub struct Db {
    conn: Conn,
    tailnet: Tailnet,
    replica: String,
    /// Where new nodes' addresses come from ([`Ipv4Range::TAILNET`]; tests narrow it).
    ipv4_range: Ipv4Range,
    /// This replica's relay as its row records it (see migration 13).
    relay: Option<String>,
}

/// Live replicas' relays (replica id, `HOST:PORT` as recorded), and each
/// streaming node's home replica (see [`Db::relays`]).
pub type ReplicaRelays = (Vec<(String, String)>, HashMap<i64, String>);

/// What [`Db::sweep`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Replicas whose heartbeat stopped, forgotten with their presence.
    pub dead_replicas: u64,
    /// Ephemeral nodes removed after the grace period offline.
    pub ephemeral_removed: u64,
}

/// Now, in Unix milliseconds (replica heartbeats).
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Db {
    /// Opens the store at `location`: see [`Db::open`] and [`Db::open_postgres`].
    pub fn open_at(location: &Location) -> Result<(Db, Option<String>), ApiError> {
        match location {
            Location::Dir(dir) => Self::open(dir),
            Location::Postgres(url) => Self::open_postgres(url),
        }
    }

    /// Opens (creating if needed) `dir/state.db`, applies migrations, and
    /// creates the tailnet on first start. Returns the admin token when it was
    /// just created: the only time it is ever shown.
    pub fn open(dir: &Path) -> Result<(Db, Option<String>), ApiError> {
        let conn = rusqlite::Connection::open(dir.join("state.db")).map_err(internal)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(internal)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ApiError::internal(format!("state store: cannot enable WAL (journal_mode={mode})")));
        }
        Self::setup_sqlite(conn)
    }

    /// An in-memory SQLite store (tests).
    pub fn open_in_memory() -> Result<(Db, Option<String>), ApiError> {
        Self::setup_sqlite(rusqlite::Connection::open_in_memory().map_err(internal)?)
    }

    fn setup_sqlite(conn: rusqlite::Connection) -> Result<(Db, Option<String>), ApiError> {
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;")
            .map_err(internal)?;
        let (mut db, token) = Self::setup(Conn::sqlite(conn))?;
        // One process serves a state directory: presence left by its earlier
        // life is stale, so nodes are not shown online until they stream again.
        db.write(|c| c.execute("DELETE FROM replicas", &[]))?;
        Ok((db, token))
    }

    /// Connects to PostgreSQL, applies migrations and creates the tailnet on
    /// first start, holding an advisory lock so replicas starting together on
    /// an empty database do it once (one admin token, printed by one of them).
    pub fn open_postgres(url: &str) -> Result<(Db, Option<String>), ApiError> {
        let mut conn = Conn::postgres(url)?;
        // Commits wait for the WAL flush (the default; said here because it is what
        // "nothing acknowledged is lost" rests on).
        conn.batch("SET synchronous_commit = on")?;
        Self::setup(conn)
    }

    fn setup(mut conn: Conn) -> Result<(Db, Option<String>), ApiError> {
        let mut replica = [0u8; 8];
        SystemRandom::new().fill(&mut replica).map_err(|_| ApiError::internal("no randomness".into()))?;
        let replica = hex(&replica);
        let (tailnet, token) = conn.with_migration_lock(|conn| {
            migrate(conn)?;
            conn.transaction(None, create_tailnet)
        })?;
        Ok((Db { conn, tailnet, replica, ipv4_range: Ipv4Range::TAILNET, relay: None }, token))
    }

    /// The tailnet's settings.
    pub fn tailnet(&self) -> &Tailnet {
        &self.tailnet
    }

    /// Which store this is.
    pub fn dialect(&self) -> Dialect {
        self.conn.dialect()
    }

    /// This process's replica id: its presence rows and change notifications carry it.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Runs a write transaction that announces itself to other replicas.
    pub(super) fn write<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let replica = self.replica.clone();
        self.conn.transaction(Some(&replica), f)
    }

    /// The connection, for reads by the control modules' own queries (routes).
    pub(super) fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// Where new nodes' addresses come from.
    pub(super) fn ipv4_range(&self) -> Ipv4Range {
        self.ipv4_range
    }

    /// Narrows where new nodes' addresses come from (tests fill a small range).
    #[cfg(test)]
    pub(super) fn set_ipv4_range(&mut self, range: Ipv4Range) {
        self.ipv4_range = range;
    }

    /// The schema version in force.
    pub fn schema_version(&mut self) -> Result<i64, ApiError> {
        schema_version(&mut self.conn)
    }

    /// Whether `token` is a valid admin token.
    pub fn check_admin(&mut self, token: &str) -> Result<bool, ApiError> {
        let hash = hash_secret(token);
        let n = self.conn.query_one("SELECT COUNT(*) FROM admin_tokens WHERE token_hash = $1", params![&hash[..]])?;
        Ok(n.int(0)? > 0)
    }

    /// Creates an auth key; returns the secret (shown once) and its
    /// description. `user` owns the untagged nodes registered with it.
    pub fn create_auth_key(
        &mut self,
        reusable: bool,
        ephemeral: bool,
        tags: &[String],
        expiry_secs: Option<u64>,
        user: Option<i64>,
    ) -> Result<(String, AuthKeyInfo), ApiError> {
        for t in tags {
            check_tag(t)?;
        }
        if expiry_secs == Some(0) || expiry_secs.is_some_and(|s| s > 10 * 365 * 86400) {
            return Err(ApiError::bad_request("expiry must be between 1 second and 10 years".into()));
        }
        let key = new_secret("wmkey-");
        let now = unix_now();
        let expires_at = expiry_secs.map(|s| now + s as i64);
        let tags_json = serde_json::to_string(tags).map_err(internal)?;
        let id = self.write(|c| {
            if let Some(u) = user {
                if c.query_opt("SELECT id FROM users WHERE id = $1", params![u])?.is_none() {
                    return Err(ApiError::not_found("no such user"));
                }
            }
            c.query_one(
                "INSERT INTO auth_keys (key_hash, prefix, reusable, ephemeral, tags, created_at, expires_at, user_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                params![&hash_secret(&key)[..], &key[..14], reusable, ephemeral, tags_json, now, expires_at, user],
            )?
            .int(0)
        })?;
        let info = self.auth_key(id)?.ok_or_else(|| ApiError::internal("key vanished".into()))?;
        Ok((key, info))
    }

    fn auth_key(&mut self, id: i64) -> Result<Option<AuthKeyInfo>, ApiError> {
        self.conn.query_opt(&format!("{KEY_SELECT} WHERE k.id = $1"), params![id])?.map(|r| key_row(&r)).transpose()
    }

    /// Every auth key, by id.
    pub fn auth_keys(&mut self) -> Result<Vec<AuthKeyInfo>, ApiError> {
        self.conn.query(&format!("{KEY_SELECT} ORDER BY k.id"), &[])?.iter().map(key_row).collect()
    }

    /// Sets the node key expiry (seconds after registration; `None`: never)
    /// that key `id` gives the nodes it registers from now on.
    pub fn set_auth_key_node_key_expiry(&mut self, id: i64, secs: Option<u64>) -> Result<AuthKeyInfo, ApiError> {
        if secs.is_some_and(|s| s == 0 || s > 10 * 365 * 86400) {
            return Err(ApiError::bad_request("key expiry must be between 1 second and 10 years".into()));
        }
        let secs = secs.map(|s| s as i64);
        let n = self
            .write(|c| c.execute("UPDATE auth_keys SET node_key_expiry_secs = $2 WHERE id = $1", params![id, secs]))?;
        if n == 0 {
            return Err(ApiError::not_found("no such key"));
        }
        self.auth_key(id)?.ok_or_else(|| ApiError::not_found("no such key"))
    }

    /// Revokes a key; false if there is no such key.
    pub fn revoke_auth_key(&mut self, id: i64) -> Result<bool, ApiError> {
        let n = self.write(|c| {
            c.execute(
                "UPDATE auth_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                params![id, unix_now()],
            )
        })?;
        Ok(n > 0 || self.auth_key(id)?.is_some())
    }

    /// Registers a node, or updates it when its machine key is already known
    /// (then the auth key is not needed: the machine-key signature, checked by
    /// the caller, proves who it is). The key is checked and, if one-off,
    /// spent in the same transaction that stores the node.
    pub fn register(&mut self, reg: &Registration) -> Result<NodeInfo, ApiError> {
        let now = unix_now();
        let endpoints = serde_json::to_string(&reg.endpoints).map_err(internal)?;
        let range = self.ipv4_range();
        let id = self.write(|c| {
            // Registrations go one at a time across replicas: the lock
            // guards the address cursor, name choice and the one-off key.
            alloc::lock_registrations(c)?;
            let known = c
                .query_opt(
                    "SELECT id, key_expires_at FROM nodes WHERE machine_key = $1",
                    params![&reg.machine_key[..]],
                )?
                .map(|r| Ok::<_, ApiError>((r.int(0)?, r.opt_int(1)?)))
                .transpose()?;
            match known {
                Some((id, expires_at)) => {
                    if expires_at.is_some_and(|e| e <= now) {
                        // Re-authentication: a valid auth key is spent, the
                        // expiry cleared; addresses, name and tags stay.
                        let key = check_auth_key(c, &reg.auth_key, now)?;
                        // The new key's node key expiry, if it has one.
                        c.execute(
                            "UPDATE nodes SET key_expires_at =
                               (SELECT $2 + node_key_expiry_secs FROM auth_keys WHERE id = $3) WHERE id = $1",
                            params![id, now, key.id],
                        )?;
                        c.execute("UPDATE auth_keys SET uses = uses + 1 WHERE id = $1", params![key.id])?;
                    }
                    update_node_key(c, id, &reg.node_key)?;
                    c.execute(
                        "UPDATE nodes SET endpoints = $2, last_seen = $3 WHERE id = $1",
                        params![id, &endpoints, now],
                    )?;
                    Ok(id)
                }
                None => {
                    let id = insert_node(c, reg, &endpoints, now, range)?;
                    // The key's node key expiry, if it has one.
                    c.execute(
                        "UPDATE nodes SET key_expires_at = (SELECT $2 + k.node_key_expiry_secs FROM auth_keys k
                           WHERE k.id = nodes.auth_key_id) WHERE id = $1",
                        params![id, now],
                    )?;
                    Ok(id)
                }
            }
        })?;
        self.node(id)?.ok_or_else(|| ApiError::internal("node vanished".into()))
    }

    /// Updates what a node reports when it opens its map stream. Returns
    /// whether anything changed.
    pub fn update_node(&mut self, id: i64, node_key: &[u8; 32], endpoints: &[String]) -> Result<bool, ApiError> {
        let endpoints = serde_json::to_string(endpoints).map_err(internal)?;
        self.write(|c| {
            let r = c.query_one("SELECT node_key, endpoints FROM nodes WHERE id = $1", params![id])?;
            let (old_key, old_endpoints) = (r.blob(0)?, r.text(1)?);
            let changed = old_key != node_key[..] || old_endpoints != endpoints;
            if old_key != node_key[..] {
                update_node_key(c, id, node_key)?;
            }
            c.execute(
                "UPDATE nodes SET endpoints = $2, last_seen = $3 WHERE id = $1",
                params![id, &endpoints, unix_now()],
            )?;
            Ok(changed)
        })
    }

    /// The node with this machine key.
    pub fn node_by_machine_key(&mut self, machine_key: &[u8; 32]) -> Result<Option<NodeInfo>, ApiError> {
        let tailnet = &self.tailnet;
        self.conn
            .query_opt(&format!("{NODE_SELECT} WHERE n.machine_key = $1"), params![&machine_key[..]])?
            .map(|r| node_row(&r, tailnet))
            .transpose()
    }

    /// The node with this id.
    pub fn node(&mut self, id: i64) -> Result<Option<NodeInfo>, ApiError> {
        let tailnet = &self.tailnet;
        self.conn
            .query_opt(&format!("{NODE_SELECT} WHERE n.id = $1"), params![id])?
            .map(|r| node_row(&r, tailnet))
            .transpose()
    }

    /// Every node, by id (all `online: false`; the server adds presence).
    pub fn nodes(&mut self) -> Result<Vec<NodeInfo>, ApiError> {
        let tailnet = &self.tailnet;
        self.conn.query(&format!("{NODE_SELECT} ORDER BY n.id"), &[])?.iter().map(|r| node_row(r, tailnet)).collect()
    }

    pub(super) fn node_id(&mut self, id_or_name: &str) -> Result<Option<i64>, ApiError> {
        match id_or_name.parse::<i64>() {
            Ok(id) => Ok(Some(id)),
            Err(_) => self
                .conn
                .query_opt("SELECT id FROM nodes WHERE name = $1", params![id_or_name])?
                .map(|r| r.int(0))
                .transpose(),
        }
    }

    /// Renames a node (its DNS label, so its full name too). Returns its id,
    /// or `None` if there is no such node. A name that is not a DNS label is
    /// refused (400), one another node has is refused (409).
    pub fn rename_node(&mut self, id_or_name: &str, name: &str) -> Result<Option<i64>, ApiError> {
        if name.is_empty() || name.len() > 63 || dns_label(name) != name {
            return Err(ApiError::bad_request(format!(
                "{name:?} is not a DNS label (lowercase letters, digits and inner hyphens, at most 63)"
            )));
        }
        let Some(id) = self.node_id(id_or_name)? else { return Ok(None) };
        let name = name.to_string();
        self.write(|c| {
            if c.query_opt("SELECT id FROM nodes WHERE name = $1 AND id <> $2", params![name.clone(), id])?.is_some() {
                return Err(ApiError::conflict(format!("another node is named {name:?}")));
            }
            Ok(c.execute("UPDATE nodes SET name = $2 WHERE id = $1", params![id, name])? > 0)
        })
        .map(|changed| changed.then_some(id))
    }

    /// Sets when a node's key expires (Unix seconds; `None`: never). Returns
    /// its id, or `None` if there is no such node.
    pub fn set_node_key_expiry(&mut self, id_or_name: &str, expires_at: Option<i64>) -> Result<Option<i64>, ApiError> {
        let Some(id) = self.node_id(id_or_name)? else { return Ok(None) };
        let n =
            self.write(|c| c.execute("UPDATE nodes SET key_expires_at = $2 WHERE id = $1", params![id, expires_at]))?;
        Ok((n > 0).then_some(id))
    }

    /// When node `id`'s key expires, if it does.
    pub fn node_key_expiry(&mut self, id: i64) -> Result<Option<i64>, ApiError> {
        match self.conn.query_opt("SELECT key_expires_at FROM nodes WHERE id = $1", params![id])? {
            Some(r) => r.opt_int(0),
            None => Ok(None),
        }
    }

    /// Every node's key expiry, for the nodes that have one.
    pub fn node_key_expiries(&mut self) -> Result<HashMap<i64, i64>, ApiError> {
        self.conn
            .query("SELECT id, key_expires_at FROM nodes WHERE key_expires_at IS NOT NULL", &[])?
            .iter()
            .map(|r| Ok((r.int(0)?, r.int(1)?)))
            .collect()
    }

    /// Removes a node by id or name; returns its id, or `None` if there was none.
    pub fn remove_node(&mut self, id_or_name: &str) -> Result<Option<i64>, ApiError> {
        let Some(id) = self.node_id(id_or_name)? else { return Ok(None) };
        let n = self.write(|c| c.execute("DELETE FROM nodes WHERE id = $1", params![id]))?;
        Ok((n > 0).then_some(id))
    }

    /// Creates a user; 409 if the login is taken.
    pub fn create_user(&mut self, login: &str, display_name: &str) -> Result<UserInfo, ApiError> {
        let login = check_login(login)?;
        let display_name = check_display_name(display_name, &login)?;
        let r = self.write(|c| {
            if c.query_opt("SELECT id FROM users WHERE login = $1", params![&login])?.is_some() {
                return Err(ApiError::conflict(format!("user {login:?} exists")));
            }
            c.query_one(
                &format!(
                    "INSERT INTO users (login, display_name, created_at) VALUES ($1, $2, $3) RETURNING {USER_COLUMNS}"
                ),
                params![&login, &display_name, unix_now()],
            )
        })?;
        user_row(&r)
    }

    /// The user with this id.
    pub fn user(&mut self, id: i64) -> Result<Option<UserInfo>, ApiError> {
        self.conn
            .query_opt(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"), params![id])?
            .map(|r| user_row(&r))
            .transpose()
    }

    /// The user with this login (compared in lowercase).
    pub fn user_by_login(&mut self, login: &str) -> Result<Option<UserInfo>, ApiError> {
        self.conn
            .query_opt(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE login = $1"),
                params![login.to_ascii_lowercase()],
            )?
            .map(|r| user_row(&r))
            .transpose()
    }

    /// Every user, by id.
    pub fn users(&mut self) -> Result<Vec<UserInfo>, ApiError> {
        self.conn.query(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY id"), &[])?.iter().map(user_row).collect()
    }

    /// Removes a user by login, revoking the keys that would make nodes for
    /// it; returns its id, `None` if there is none, 409 while it owns nodes.
    pub fn remove_user(&mut self, login: &str) -> Result<Option<i64>, ApiError> {
        let login = login.to_ascii_lowercase();
        let lock = self.dialect().for_update();
        self.write(|c| {
            let Some(r) = c.query_opt(&format!("SELECT id FROM users WHERE login = $1{lock}"), params![&login])? else {
                return Ok(None);
            };
            let id = r.int(0)?;
            let owned = c.query_one("SELECT COUNT(*) FROM nodes WHERE user_id = $1", params![id])?.int(0)?;
            if owned > 0 {
                return Err(ApiError::conflict(format!("the user owns {owned} node(s): remove them first")));
            }
            c.execute(
                "UPDATE auth_keys SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL",
                params![id, unix_now()],
            )?;
            c.execute("DELETE FROM users WHERE id = $1", params![id])?;
            Ok(Some(id))
        })
    }

    /// The policy (huJSON text) and its version, if one was ever set.
    pub fn policy(&mut self) -> Result<Option<(String, i64)>, ApiError> {
        self.conn
            .query_opt("SELECT policy_text, version FROM policy WHERE id = 1", &[])?
            .map(|r| Ok((r.text(0)?, r.int(1)?)))
            .transpose()
    }

    /// Replaces the policy text (checked by the caller) in one transaction;
    /// returns the new version (1 for the first, then one more each time).
    pub fn set_policy(&mut self, text: &str) -> Result<i64, ApiError> {
        self.write(|c| {
            c.query_one(
                "INSERT INTO policy (id, policy_text, version, updated_at) VALUES (1, $1, 1, $2)
                 ON CONFLICT (id) DO UPDATE SET policy_text = excluded.policy_text, version = policy.version + 1,
                     updated_at = excluded.updated_at
                 RETURNING version",
                params![text, unix_now()],
            )?
            .int(0)
        })
    }

    /// Beats this replica's heartbeat. Returns `false` when its row was gone
    /// (other replicas took it for dead and dropped its presence), so the
    /// caller writes its presence again.
    pub fn heartbeat(&mut self) -> Result<bool, ApiError> {
        let (replica, now) = (self.replica.clone(), unix_now_ms());
        let n = self.conn.execute("UPDATE replicas SET heartbeat_ms = $2 WHERE id = $1", params![&replica, now])?;
        if n > 0 {
            return Ok(true);
        }
        let relay = self.relay.clone();
        self.write(|c| {
            c.execute(
                "INSERT INTO replicas (id, heartbeat_ms, relay) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms, relay = excluded.relay",
                params![&replica, now, relay.clone()],
            )
        })?;
        Ok(false)
    }

    /// Records this replica's embedded relay (`HOST:PORT`, the host empty
    /// when other replicas' nodes have no address for it; `None`: no relay)
    /// in its row, announced to the other replicas.
    pub fn set_replica_relay(&mut self, relay: Option<String>) -> Result<(), ApiError> {
        self.relay = relay;
        let (replica, now, relay) = (self.replica.clone(), unix_now_ms(), self.relay.clone());
        self.write(|c| {
            c.execute(
                "INSERT INTO replicas (id, heartbeat_ms, relay) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms, relay = excluded.relay",
                params![&replica, now, relay.clone()],
            )
            .map(drop)
        })
    }

    /// The relays of live replicas (replica id, `HOST:PORT` as recorded),
    /// and for each node streaming from one of them, that replica's id: the
    /// node's home relay. A node present on two live replicas (it moved,
    /// and the old one has not yet noticed, or died and is not yet taken
    /// for dead) is at home on the one it came to last.
    pub fn relays(&mut self, timeout: std::time::Duration) -> Result<ReplicaRelays, ApiError> {
        let live_after = unix_now_ms() - timeout.as_millis() as i64;
        let relays = self
            .conn
            .query(
                "SELECT id, relay FROM replicas WHERE heartbeat_ms >= $1 AND relay IS NOT NULL ORDER BY id",
                params![live_after],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, r.text(1)?)))
            .collect::<Result<_, ApiError>>()?;
        let mut homes = HashMap::new();
        for r in self.conn.query(
            "SELECT p.node_id, p.replica FROM presence p JOIN replicas r ON r.id = p.replica
             WHERE r.heartbeat_ms >= $1 AND p.streams > 0 AND r.relay IS NOT NULL
             ORDER BY p.node_id, p.since_ms DESC, p.replica",
            params![live_after],
        )? {
            homes.entry(r.int(0)?).or_insert(r.text(1)?);
        }
        Ok((relays, homes))
    }

    /// Records that this replica holds `streams` map streams of node `id`
    /// (0: none, and the node was last seen now). Announced to the other replicas.
    pub fn set_presence(&mut self, id: i64, streams: usize) -> Result<(), ApiError> {
        let (replica, now_ms, relay) = (self.replica.clone(), unix_now_ms(), self.relay.clone());
        self.write(|c| {
            c.execute(
                "INSERT INTO replicas (id, heartbeat_ms, relay) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms, relay = excluded.relay",
                params![&replica, now_ms, relay.clone()],
            )?;
            if streams > 0 {
                // Nothing to record for a node removed meanwhile.
                c.execute(
                    "INSERT INTO presence (node_id, replica, streams, since_ms)
                     SELECT id, CAST($2 AS TEXT), CAST($3 AS BIGINT), CAST($4 AS BIGINT) FROM nodes WHERE id = $1
                     ON CONFLICT (node_id, replica) DO UPDATE SET streams = excluded.streams",
                    params![id, &replica, streams as i64, now_ms],
                )?;
            } else {
                c.execute("DELETE FROM presence WHERE node_id = $1 AND replica = $2", params![id, &replica])?;
                c.execute("UPDATE nodes SET last_seen = $2 WHERE id = $1", params![id, now_ms / 1000])?;
            }
            Ok(())
        })
    }

    /// The nodes with a map stream open on a replica whose heartbeat is at
    /// most `timeout` old.
    pub fn online(&mut self, timeout: std::time::Duration) -> Result<HashSet<i64>, ApiError> {
        let live_after = unix_now_ms() - timeout.as_millis() as i64;
        self.conn
            .query(
                "SELECT DISTINCT p.node_id FROM presence p JOIN replicas r ON r.id = p.replica
                 WHERE r.heartbeat_ms >= $1 AND p.streams > 0",
                params![live_after],
            )?
            .iter()
            .map(|r| r.int(0))
            .collect()
    }

    /// What any replica may do at any time, idempotently: forgets replicas
    /// whose heartbeat is older than `timeout` (their nodes go offline, last
    /// seen now), and removes ephemeral nodes offline for longer than `grace`.
    pub fn sweep(&mut self, timeout: std::time::Duration, grace: std::time::Duration) -> Result<Swept, ApiError> {
        let now_ms = unix_now_ms();
        let dead_before = now_ms - timeout.as_millis() as i64;
        let seen_before = now_ms / 1000 - grace.as_secs() as i64;
        let mut swept = Swept::default();
        // Cheap reads first, so an idle sweep writes (and notifies) nothing.
        let dead =
            self.conn.query_one("SELECT COUNT(*) FROM replicas WHERE heartbeat_ms < $1", params![dead_before])?;
        if dead.int(0)? > 0 {
            swept.dead_replicas = self.write(|c| {
                c.execute(
                    "UPDATE nodes SET last_seen = $2 WHERE id IN (SELECT p.node_id FROM presence p
                     JOIN replicas r ON r.id = p.replica WHERE r.heartbeat_ms < $1)",
                    params![dead_before, now_ms / 1000],
                )?;
                c.execute("DELETE FROM replicas WHERE heartbeat_ms < $1", params![dead_before])
            })?;
        }
        const GONE: &str = "FROM nodes WHERE ephemeral = 1 AND last_seen < $1
            AND NOT EXISTS (SELECT 1 FROM presence p WHERE p.node_id = nodes.id AND p.streams > 0)";
        let gone = self.conn.query_one(&format!("SELECT COUNT(*) {GONE}"), params![seen_before])?;
        if gone.int(0)? > 0 {
            swept.ephemeral_removed = self.write(|c| c.execute(&format!("DELETE {GONE}"), params![seen_before]))?;
        }
        Ok(swept)
    }

    /// The TLS certificate and key every replica serves, made by the first
    /// (under the migration lock, so replicas starting together agree).
    pub fn server_identity(
        &mut self,
        make: impl FnOnce() -> Result<(Vec<u8>, Vec<u8>), String>,
    ) -> Result<(Vec<u8>, Vec<u8>), ApiError> {
        self.conn.with_migration_lock(|c| {
            if let Some(r) = c.query_opt("SELECT cert_der, key_der FROM server_identity WHERE id = 1", &[])? {
                return Ok((r.blob(0)?, r.blob(1)?));
            }
            let (cert, key) = make().map_err(ApiError::internal)?;
            c.transaction(None, |c| {
                c.execute(
                    "INSERT INTO server_identity (id, cert_der, key_der) VALUES (1, $1, $2)",
                    params![&cert[..], &key[..]],
                )
            })?;
            Ok((cert, key))
        })
    }
}

/// Creates the tailnet and the first admin token if there is no tailnet yet.
fn create_tailnet(c: &mut Conn) -> Result<(Tailnet, Option<String>), ApiError> {
    if let Some(r) = c.query_opt("SELECT domain, ula_prefix FROM tailnet WHERE id = 1", &[])? {
        let ula_prefix: [u8; 6] =
            r.blob(1)?.try_into().map_err(|_| ApiError::internal("state store: bad ULA prefix".into()))?;
        return Ok((Tailnet { domain: r.text(0)?, ula_prefix }, None));
    }
    // RFC 4193 §3.2: fd00::/8 and a random 40-bit global ID.
    let mut ula_prefix = [0u8; 6];
    ula_prefix[0] = 0xfd;
    SystemRandom::new().fill(&mut ula_prefix[1..]).map_err(|_| ApiError::internal("no randomness".into()))?;
    let tailnet = Tailnet { domain: "wiremesh.internal".into(), ula_prefix };
    c.execute(
        "INSERT INTO tailnet (id, domain, ula_prefix, next_ipv4, created_at) VALUES (1, $1, $2, $3, $4)",
        params![&tailnet.domain, &ula_prefix[..], Ipv4Range::TAILNET.first, unix_now()],
    )?;
    let token = new_secret("wmadmin-");
    c.execute(
        "INSERT INTO admin_tokens (token_hash, created_at) VALUES ($1, $2)",
        params![&hash_secret(&token)[..], unix_now()],
    )?;
    Ok((tailnet, Some(token)))
}

/// A display name as stored: the login when empty; at most 128 characters, no control characters.
fn check_display_name(name: &str, login: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("display_name must be at most 128 characters, none a control".into()));
    }
    Ok(if name.is_empty() { login.to_string() } else { name.to_string() })
}

const USER_COLUMNS: &str = "id, login, display_name, created_at";

fn user_row(r: &Row) -> Result<UserInfo, ApiError> {
    Ok(UserInfo { id: r.int(0)?, login: r.text(1)?, display_name: r.text(2)?, created_at: r.int(3)? })
}

const KEY_SELECT: &str = "SELECT k.id, k.prefix, k.reusable, k.ephemeral, k.tags, k.created_at, k.expires_at, k.uses,
    k.revoked_at, u.login, k.node_key_expiry_secs FROM auth_keys k LEFT JOIN users u ON u.id = k.user_id";

fn key_row(r: &Row) -> Result<AuthKeyInfo, ApiError> {
    let reusable = r.bool(2)?;
    let uses = r.int(7)?;
    Ok(AuthKeyInfo {
        id: r.int(0)?,
        prefix: r.text(1)?,
        reusable,
        ephemeral: r.bool(3)?,
        tags: serde_json::from_str(&r.text(4)?).unwrap_or_default(),
        created_at: r.int(5)?,
        expires_at: r.opt_int(6)?,
        uses,
        spent: !reusable && uses > 0,
        revoked: r.opt_int(8)?.is_some(),
        user: r.opt_text(9)?,
        node_key_expiry_secs: r.opt_int(10)?.and_then(|s| u64::try_from(s).ok()),
    })
}

const NODE_SELECT: &str = "SELECT n.id, n.name, n.node_key, n.machine_key, n.ipv4, n.endpoints, n.tags, n.ephemeral,
    n.created_at, u.login FROM nodes n LEFT JOIN users u ON u.id = n.user_id";

fn node_row(r: &Row, tailnet: &Tailnet) -> Result<NodeInfo, ApiError> {
    let name = r.text(1)?;
    let ipv4 = Ipv4Addr::from(u32::try_from(r.int(4)?).map_err(internal)?);
    let ipv6 = tailnet.ipv6_for(ipv4);
    let tags: Vec<String> = serde_json::from_str(&r.text(6)?).unwrap_or_default();
    let node_key: [u8; 32] = r.blob(2)?.try_into().unwrap_or([0; 32]);
    Ok(NodeInfo {
        id: r.int(0)?,
        fqdn: format!("{name}.{}", tailnet.domain),
        name,
        node_key: super::proto::b64_key(&node_key),
        machine_key: hex(&r.blob(3)?),
        ipv4,
        ipv6,
        endpoints: serde_json::from_str(&r.text(5)?).unwrap_or_default(),
        allowed_ips: vec![format!("{ipv4}/32"), format!("{ipv6}/128")],
        owner: match r.opt_text(9)? {
            _ if !tags.is_empty() => OWNER_TAGGED.into(),
            Some(login) => login,
            None => OWNER_ADMIN.into(),
        },
        tags,
        ephemeral: r.bool(7)?,
        online: false,
        created_at: r.int(8)?,
        relay: None,
    })
}

fn update_node_key(c: &mut Conn, id: i64, node_key: &[u8; 32]) -> Result<(), ApiError> {
    let other = c.query_opt("SELECT id FROM nodes WHERE node_key = $1 AND id != $2", params![&node_key[..], id])?;
    if other.is_some() {
        return Err(ApiError::conflict("node key already belongs to another node".into()));
    }
    c.execute("UPDATE nodes SET node_key = $2 WHERE id = $1", params![id, &node_key[..]])?;
    Ok(())
}

/// An auth key that may be used now.
struct UsableKey {
    id: i64,
    ephemeral: bool,
    tags: String,
    user: Option<i64>,
}

/// Checks an auth key inside the registration's transaction (the caller
/// spends it), locking its row so two replicas cannot both spend a one-off key.
fn check_auth_key(c: &mut Conn, auth_key: &str, now: i64) -> Result<UsableKey, ApiError> {
    let hash = hash_secret(auth_key);
    let lock = c.dialect().for_update();
    let key = c.query_opt(
        &format!(
            "SELECT id, reusable, ephemeral, tags, expires_at, uses, revoked_at, user_id FROM auth_keys
             WHERE key_hash = $1{lock}"
        ),
        params![&hash[..]],
    )?;
    let Some(k) = key else {
        return Err(ApiError::new(401, "invalid_auth_key", "unknown auth key"));
    };
    if k.opt_int(6)?.is_some() {
        return Err(ApiError::new(401, "key_revoked", "auth key was revoked"));
    }
    if k.opt_int(4)?.is_some_and(|e| e <= now) {
        return Err(ApiError::new(401, "key_expired", "auth key has expired"));
    }
    if !k.bool(1)? && k.int(5)? > 0 {
        return Err(ApiError::new(401, "key_spent", "one-off auth key was already used"));
    }
    Ok(UsableKey { id: k.int(0)?, ephemeral: k.bool(2)?, tags: k.text(3)?, user: k.opt_int(7)? })
}

fn insert_node(c: &mut Conn, reg: &Registration, endpoints: &str, now: i64, range: Ipv4Range) -> Result<i64, ApiError> {
    let UsableKey { id: key_id, ephemeral, tags, user } = check_auth_key(c, &reg.auth_key, now)?;
    // A key with tags makes tagged nodes, owned by no user.
    let user = if tags == "[]" { user } else { None };
    let node = NewNode {
        reg,
        endpoints,
        tags: &tags,
        ephemeral,
        auth_key_id: Some(key_id),
        user_id: user,
        federation_id: None,
        now,
    };
    let id = alloc::insert_node(c, &node, range)?;
    c.execute("UPDATE auth_keys SET uses = uses + 1 WHERE id = $1", params![key_id])?;
    Ok(id)
}

fn schema_version(c: &mut Conn) -> Result<i64, ApiError> {
    c.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])?.int(0)
}

/// Applies the migrations newer than the store, each in its own transaction.
/// Returns how many were applied. The caller holds the migration lock.
fn migrate(c: &mut Conn) -> Result<usize, ApiError> {
    c.batch(&c.dialect().schema(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version {int} PRIMARY KEY, applied_at {int} NOT NULL)",
    ))?;
    let current = schema_version(c)?;
    let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if current > latest {
        return Err(ApiError::internal(format!(
            "state store has schema version {current}, newer than this server knows ({latest})"
        )));
    }
    let mut applied = 0;
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let sql = c.dialect().schema(sql);
        c.transaction(None, |c| {
            c.batch(&sql)?;
            c.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                params![*version, unix_now()],
            )
        })?;
        applied += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::alloc::test_registration as reg;

    #[test]
    fn secrets_are_stored_hashed() {
        let (mut db, admin) = Db::open_in_memory().unwrap();
        let admin = admin.expect("first start makes an admin token");
        assert!(admin.starts_with("wmadmin-") && admin.len() == 8 + 64);
        assert!(db.check_admin(&admin).unwrap());
        assert!(!db.check_admin("wmadmin-00").unwrap());
        let (key, _) = db.create_auth_key(false, false, &[], None, None).unwrap();
        assert_eq!(hash_secret("abc"), hash_secret("abc"));
        assert_ne!(hash_secret("abc"), hash_secret("abd"));
        // Neither secret appears anywhere in the store; their hashes do.
        let dump: Vec<Vec<u8>> = db
            .conn
            .query("SELECT key_hash FROM auth_keys UNION ALL SELECT token_hash FROM admin_tokens", &[])
            .unwrap()
            .iter()
            .map(|r| r.blob(0).unwrap())
            .collect();
        assert!(dump.contains(&hash_secret(&key).to_vec()));
        assert!(dump.contains(&hash_secret(&admin).to_vec()));
        let text = db
            .conn
            .query_one(
                "SELECT COUNT(*) FROM auth_keys WHERE prefix = $1 OR prefix LIKE $2",
                params![&key, format!("{}%", &key[..20])],
            )
            .unwrap()
            .int(0)
            .unwrap();
        assert_eq!(text, 0, "the prefix column holds only the first 14 characters");
    }

    #[test]
    fn one_off_keys_are_spent_and_names_suffixed() {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let (one, _) = db.create_auth_key(false, false, &[], None, None).unwrap();
        let (many, _) = db.create_auth_key(true, false, &["tag:web".into()], None, None).unwrap();
        let a = db.register(&reg(&one, 1, "host")).unwrap();
        assert_eq!(a.name, "host");
        assert_eq!(a.ipv4, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(a.ipv6.segments()[0] & 0xff00, 0xfd00);
        assert_eq!(a.allowed_ips, vec!["100.64.0.1/32".to_string(), format!("{}/128", a.ipv6)]);
        let e = db.register(&reg(&one, 2, "host")).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (401, "key_spent"));
        // Re-registering the same machine needs no valid key and keeps its address.
        let again = db.register(&reg("wrong", 1, "other")).unwrap();
        assert_eq!((again.id, again.ipv4, again.name.as_str()), (a.id, a.ipv4, "host"));
        let b = db.register(&reg(&many, 3, "host")).unwrap();
        let c = db.register(&reg(&many, 4, "HOST")).unwrap();
        assert_eq!((b.name.as_str(), c.name.as_str()), ("host-2", "host-3"));
        assert_eq!(b.tags, vec!["tag:web".to_string()]);
        assert_eq!(b.owner, "tagged-devices");
        assert_eq!(c.ipv4, Ipv4Addr::new(100, 64, 0, 3));
        // Removed addresses are not reused at once.
        assert_eq!(db.remove_node("host-3").unwrap(), Some(c.id));
        let d = db.register(&reg(&many, 5, "x")).unwrap();
        assert_eq!(d.ipv4, Ipv4Addr::new(100, 64, 0, 4));
        assert_eq!(db.nodes().unwrap().len(), 3);
        let keys = db.auth_keys().unwrap();
        assert!(keys[0].spent && keys[1].uses == 3 && !keys[1].spent);
    }

    #[test]
    fn an_expired_node_re_authenticates_with_a_valid_key_and_keeps_its_addresses() {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let (one_off, _) = db.create_auth_key(false, false, &[], None, None).unwrap();
        let a = db.register(&reg(&one_off, 1, "a")).unwrap();
        // Not expired: the machine key is its credential, no auth key needed.
        assert_eq!(db.register(&reg("", 1, "a")).unwrap(), a);
        assert_eq!(db.set_node_key_expiry("a", Some(unix_now() + 3600)).unwrap(), Some(a.id));
        assert_eq!(db.register(&reg("", 1, "a")).unwrap(), a);
        assert_eq!(db.set_node_key_expiry("nope", Some(1)).unwrap(), None);
        db.set_node_key_expiry("a", Some(1)).unwrap();
        assert_eq!(db.node_key_expiries().unwrap(), HashMap::from([(a.id, 1)]));
        // Expired: an auth key is needed, and a spent one does not do.
        assert_eq!(db.register(&reg("", 1, "a")).unwrap_err().code, "invalid_auth_key");
        assert_eq!(db.register(&reg(&one_off, 1, "a")).unwrap_err().code, "key_spent");
        assert_eq!(db.node_key_expiry(a.id).unwrap(), Some(1));
        let (fresh, _) = db.create_auth_key(false, false, &[], None, None).unwrap();
        assert_eq!(db.register(&reg(&fresh, 1, "a")).unwrap(), a, "same id, name and addresses");
        assert_eq!(db.node_key_expiry(a.id).unwrap(), None);
        assert!(db.auth_keys().unwrap().iter().all(|k| k.spent), "the re-authentication spent the key");
    }

    #[test]
    fn users_own_their_keys_untagged_nodes_and_the_policy_versions_grow() {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let alice = db.create_user("Alice@Example.com", "Alice A.").unwrap();
        assert_eq!((alice.login.as_str(), alice.display_name.as_str()), ("alice@example.com", "Alice A."));
        assert_eq!(db.create_user("ALICE@example.com", "").unwrap_err().status, 409);
        assert_eq!(db.create_user("admin", "").unwrap_err().status, 400);
        assert_eq!(db.create_user("-x", "").unwrap_err().status, 400);
        assert_eq!(db.create_user("bob", "b\nb").unwrap_err().status, 400);
        let bob = db.create_user("bob", "").unwrap();
        assert_eq!(bob.display_name, "bob");
        assert_eq!(db.users().unwrap(), vec![alice.clone(), bob.clone()]);
        assert_eq!(db.user_by_login("ALICE@EXAMPLE.COM").unwrap(), Some(alice.clone()));
        assert_eq!(db.create_auth_key(true, false, &[], None, Some(999)).unwrap_err().status, 404);
        let (k, info) = db.create_auth_key(true, false, &[], None, Some(alice.id)).unwrap();
        assert_eq!(info.user.as_deref(), Some("alice@example.com"));
        let (tagged, _) = db.create_auth_key(true, false, &["tag:ci".into()], None, Some(alice.id)).unwrap();
        let (plain, _) = db.create_auth_key(true, false, &[], None, None).unwrap();
        assert_eq!(db.register(&reg(&k, 1, "a")).unwrap().owner, "alice@example.com");
        assert_eq!(db.register(&reg(&tagged, 2, "b")).unwrap().owner, OWNER_TAGGED);
        assert_eq!(db.register(&reg(&plain, 3, "c")).unwrap().owner, OWNER_ADMIN);
        // A user who owns nodes stays; once they are gone, removal revokes its keys.
        assert_eq!(db.remove_user("alice@example.com").unwrap_err().status, 409);
        db.remove_node("a").unwrap();
        assert_eq!(db.remove_user("Alice@example.com").unwrap(), Some(alice.id));
        assert_eq!(db.remove_user("alice@example.com").unwrap(), None);
        assert_eq!(db.register(&reg(&k, 4, "d")).unwrap_err().code, "key_revoked");
        assert_eq!(db.users().unwrap(), vec![bob]);
        // The tagged node made with alice's key is unaffected.
        assert_eq!(
            db.nodes().unwrap().iter().map(|n| n.owner.as_str()).collect::<Vec<_>>(),
            [OWNER_TAGGED, OWNER_ADMIN]
        );

        assert_eq!(db.policy().unwrap(), None);
        assert_eq!(db.set_policy("{\"acls\": []}").unwrap(), 1);
        assert_eq!(db.set_policy("// v2\n{}").unwrap(), 2);
        assert_eq!(db.policy().unwrap(), Some(("// v2\n{}".to_string(), 2)));
    }

    #[test]
    fn expired_and_revoked_keys_are_refused() {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let (k, info) = db.create_auth_key(true, false, &[], Some(3600), None).unwrap();
        db.conn.execute("UPDATE auth_keys SET expires_at = 1 WHERE id = $1", params![info.id]).unwrap();
        assert_eq!(db.register(&reg(&k, 1, "a")).unwrap_err().code, "key_expired");
        let (k, info) = db.create_auth_key(true, false, &[], None, None).unwrap();
        assert!(db.revoke_auth_key(info.id).unwrap());
        assert_eq!(db.register(&reg(&k, 1, "a")).unwrap_err().code, "key_revoked");
        assert_eq!(db.register(&reg("wmkey-nope", 1, "a")).unwrap_err().code, "invalid_auth_key");
        assert!(db.nodes().unwrap().is_empty());
        assert!(db.create_auth_key(false, false, &["web".into()], None, None).is_err());
        assert!(db.create_auth_key(false, false, &[], Some(0), None).is_err());
    }

    #[test]
    fn migrations_apply_once_and_state_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("wiremesh-db-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (mut db, token) = Db::open(&dir).unwrap();
        let token = token.unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.last().unwrap().0);
        let (key, _) = db.create_auth_key(true, false, &[], None, None).unwrap();
        let node = db.register(&reg(&key, 9, "keep")).unwrap();
        let tailnet = db.tailnet().clone();
        let mode = db.conn.query_one("PRAGMA journal_mode", &[]).unwrap().text(0).unwrap();
        assert_eq!(mode, "wal");
        drop(db);
        let (mut db, again) = Db::open(&dir).unwrap();
        assert!(again.is_none(), "the admin token is made only at first start");
        assert!(db.check_admin(&token).unwrap());
        assert_eq!(db.tailnet(), &tailnet);
        assert_eq!(db.nodes().unwrap(), vec![node]);
        assert_eq!(migrate(&mut db.conn).unwrap(), 0);
        let rows = db.conn.query_one("SELECT COUNT(*) FROM schema_migrations", &[]).unwrap().int(0).unwrap();
        assert_eq!(rows, MIGRATIONS.len() as i64);
        // A store from a newer server is refused rather than misread.
        db.conn.execute("INSERT INTO schema_migrations VALUES (999, 0)", &[]).unwrap();
        drop(db);
        assert!(Db::open(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_nodes_home_relay_is_on_the_replica_it_came_to_last() {
        let dir = std::env::temp_dir().join(format!("wiremesh-db-homes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (mut one, _) = Db::open(&dir).unwrap();
        let (mut two, _) = Db::open(&dir).unwrap();
        one.set_replica_relay(Some("192.0.2.1:8444".into())).unwrap();
        two.set_replica_relay(Some("192.0.2.2:8444".into())).unwrap();
        let (r1, r2) = (one.replica().to_string(), two.replica().to_string());
        let (key, _) = one.create_auth_key(true, false, &[], None, None).unwrap();
        let id = one.register(&reg(&key, 5, "mover")).unwrap().id;
        let timeout = std::time::Duration::from_secs(60);
        let home = |db: &mut Db| db.relays(timeout).unwrap().1.get(&id).cloned();
        let later = || std::thread::sleep(std::time::Duration::from_millis(3));
        let (relays, homes) = one.relays(timeout).unwrap();
        let mut want = vec![(r1.clone(), "192.0.2.1:8444".to_string()), (r2.clone(), "192.0.2.2:8444".to_string())];
        want.sort();
        assert_eq!(relays, want);
        assert!(homes.is_empty(), "no node streams yet");
        one.set_presence(id, 1).unwrap();
        assert_eq!(home(&mut two), Some(r1.clone()));
        // It moves to two while one still holds its old stream (or died
        // holding it): two is home, whichever id sorts first.
        later();
        two.set_presence(id, 1).unwrap();
        assert_eq!(home(&mut one), Some(r2.clone()));
        assert_eq!(home(&mut two), Some(r2.clone()));
        // More streams on one are not a move.
        later();
        one.set_presence(id, 2).unwrap();
        assert_eq!(home(&mut one), Some(r2.clone()));
        // Its stream on two ends: one is home again.
        two.set_presence(id, 0).unwrap();
        assert_eq!(home(&mut two), Some(r1.clone()));
        // And the same moves the other way round (so neither replica wins
        // by its id).
        one.set_presence(id, 0).unwrap();
        two.set_presence(id, 1).unwrap();
        assert_eq!(home(&mut one), Some(r2.clone()));
        later();
        one.set_presence(id, 1).unwrap();
        assert_eq!(home(&mut two), Some(r1.clone()));
        assert_eq!(home(&mut one), Some(r1));
        drop((one, two));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_locations_parse_and_never_show_the_password() {
        let l: Location = "postgres://wm:s3cr@t@db.example:5432/wiremesh".parse().unwrap();
        assert_eq!(l, Location::Postgres("postgres://wm:s3cr@t@db.example:5432/wiremesh".into()));
        assert_eq!(l.to_string(), "postgres://wm@db.example:5432/wiremesh");
        assert!(!format!("{l:?}").contains("s3cr"));
        assert_eq!("postgresql://h/db".parse::<Location>().unwrap().to_string(), "postgresql://h/db");
        assert_eq!("/var/lib/wm".parse::<Location>().unwrap(), Location::Dir("/var/lib/wm".into()));
        assert_eq!("state".parse::<Location>().unwrap(), Location::Dir("state".into()));
        assert!("mysql://h/db".parse::<Location>().is_err());
        assert!("".parse::<Location>().is_err());
        assert!("postgres://h:port/db".parse::<Location>().is_err());
    }
}
