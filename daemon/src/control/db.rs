//! The control server's state: SQLite in WAL mode with `synchronous=FULL`,
//! so a write is on disk before the server answers, and versioned migrations
//! applied at open. Secrets (admin tokens, auth keys) are stored only as
//! SHA-256 hashes: they are 32 random bytes, so a plain hash cannot be
//! brute-forced and a slow password hash would buy nothing.

use super::proto::{hex, AuthKeyInfo, NodeInfo, UserInfo};
use super::ApiError;
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// The schema, one step per version. Never edit a released step; add one.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE tailnet (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            domain TEXT NOT NULL,
            ula_prefix BLOB NOT NULL,
            next_ipv4 INTEGER NOT NULL,
            created_at INTEGER NOT NULL
        );
        CREATE TABLE admin_tokens (
            id INTEGER PRIMARY KEY,
            token_hash BLOB NOT NULL UNIQUE,
            created_at INTEGER NOT NULL
        );
        CREATE TABLE auth_keys (
            id INTEGER PRIMARY KEY,
            key_hash BLOB NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            reusable INTEGER NOT NULL,
            ephemeral INTEGER NOT NULL,
            tags TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER,
            uses INTEGER NOT NULL DEFAULT 0,
            revoked_at INTEGER
        );
        CREATE TABLE nodes (
            id INTEGER PRIMARY KEY,
            machine_key BLOB NOT NULL UNIQUE,
            node_key BLOB NOT NULL UNIQUE,
            hostname TEXT NOT NULL,
            name TEXT NOT NULL UNIQUE,
            ipv4 INTEGER NOT NULL UNIQUE,
            endpoints TEXT NOT NULL,
            tags TEXT NOT NULL,
            ephemeral INTEGER NOT NULL,
            auth_key_id INTEGER REFERENCES auth_keys(id) ON DELETE SET NULL,
            created_at INTEGER NOT NULL,
            last_seen INTEGER NOT NULL
        );",
    ),
    // Node key expiry: after this Unix second the node must re-authenticate.
    (2, "ALTER TABLE nodes ADD COLUMN key_expires_at INTEGER;"),
    // Users own the untagged nodes registered with their keys; the policy
    // (huJSON text) is one row whose version grows with every change.
    (
        3,
        "CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            login TEXT NOT NULL UNIQUE,
            display_name TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );
        ALTER TABLE auth_keys ADD COLUMN user_id INTEGER REFERENCES users(id) ON DELETE SET NULL;
        ALTER TABLE nodes ADD COLUMN user_id INTEGER REFERENCES users(id) ON DELETE SET NULL;
        CREATE TABLE policy (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            text TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );",
    ),
];

/// The IPv4 range nodes get addresses from (RFC 6598 shared address space).
pub const IPV4_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// Prefix length of [`IPV4_BASE`].
pub const IPV4_PREFIX: u8 = 10;
/// Kept free for a tailnet resolver (MagicDNS-style).
pub const IPV4_RESOLVER: u32 = u32::from_be_bytes([100, 100, 100, 100]);
const IPV4_FIRST: u32 = IPV4_BASE + 1;
const IPV4_LAST: u32 = IPV4_BASE + (1 << (32 - IPV4_PREFIX)) - 2;

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

/// The state store.
pub struct Db {
    conn: Connection,
    tailnet: Tailnet,
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

/// A DNS label made from a host name: lowercase letters, digits and inner
/// hyphens, at most 63 characters (RFC 1035 §2.3.1), `node` when nothing is left.
pub fn dns_label(hostname: &str) -> String {
    let first = hostname.split('.').next().unwrap_or("");
    let mut s = String::with_capacity(first.len());
    for c in first.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            s.push(c);
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    let mut s: String = s.trim_matches('-').chars().take(63).collect();
    while s.ends_with('-') {
        s.pop();
    }
    if s.is_empty() {
        "node".into()
    } else {
        s
    }
}

/// `base`, or `base-2`, `base-3`, … : the first that `taken` says is free,
/// kept within 63 characters.
pub fn unique_name(base: &str, mut taken: impl FnMut(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    let mut n = 2u64;
    loop {
        let suffix = format!("-{n}");
        let keep = 63usize.saturating_sub(suffix.len()).min(base.len());
        let candidate = format!("{}{suffix}", base[..keep].trim_end_matches('-'));
        if !taken(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

/// The first free IPv4 (as u32) at or after `next`, wrapping once around the
/// range and skipping the resolver address; `None` when the range is full.
pub fn pick_ipv4(next: u32, mut used: impl FnMut(u32) -> bool) -> Option<u32> {
    let start = if (IPV4_FIRST..=IPV4_LAST).contains(&next) { next } else { IPV4_FIRST };
    let mut a = start;
    loop {
        if a != IPV4_RESOLVER && !used(a) {
            return Some(a);
        }
        a = if a == IPV4_LAST { IPV4_FIRST } else { a + 1 };
        if a == start {
            return None;
        }
    }
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

fn check_tag(tag: &str) -> Result<(), ApiError> {
    let name =
        tag.strip_prefix("tag:").ok_or_else(|| ApiError::bad_request(format!("tag {tag:?} must start with tag:")))?;
    if name.is_empty() || name.len() > 63 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::bad_request(format!("tag {tag:?} must be tag: and 1-63 letters, digits, - or _")));
    }
    Ok(())
}

impl Db {
    /// Opens (creating if needed) `dir/state.db`, applies migrations, and
    /// creates the tailnet on first start. Returns the admin token when it was
    /// just created: the only time it is ever shown.
    pub fn open(dir: &Path) -> Result<(Db, Option<String>), ApiError> {
        let conn = Connection::open(dir.join("state.db")).map_err(internal)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(internal)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ApiError::internal(format!("state store: cannot enable WAL (journal_mode={mode})")));
        }
        Self::setup(conn)
    }

    /// An in-memory store (tests).
    pub fn open_in_memory() -> Result<(Db, Option<String>), ApiError> {
        Self::setup(Connection::open_in_memory().map_err(internal)?)
    }

    fn setup(mut conn: Connection) -> Result<(Db, Option<String>), ApiError> {
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;")
            .map_err(internal)?;
        migrate(&mut conn)?;
        let tx = conn.transaction().map_err(internal)?;
        let existing = tx
            .query_row("SELECT domain, ula_prefix FROM tailnet WHERE id = 1", [], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()
            .map_err(internal)?;
        let (tailnet, token) = match existing {
            Some((domain, ula)) => {
                let ula_prefix: [u8; 6] =
                    ula.try_into().map_err(|_| ApiError::internal("state store: bad ULA prefix".into()))?;
                (Tailnet { domain, ula_prefix }, None)
            }
            None => {
                // RFC 4193 §3.2: fd00::/8 and a random 40-bit global ID.
                let mut ula_prefix = [0u8; 6];
                ula_prefix[0] = 0xfd;
                SystemRandom::new()
                    .fill(&mut ula_prefix[1..])
                    .map_err(|_| ApiError::internal("no randomness".into()))?;
                let tailnet = Tailnet { domain: "wiremesh.internal".into(), ula_prefix };
                tx.execute(
                    "INSERT INTO tailnet (id, domain, ula_prefix, next_ipv4, created_at) VALUES (1, ?1, ?2, ?3, ?4)",
                    params![tailnet.domain, &ula_prefix[..], IPV4_FIRST, unix_now()],
                )
                .map_err(internal)?;
                let token = new_secret("wmadmin-");
                tx.execute(
                    "INSERT INTO admin_tokens (token_hash, created_at) VALUES (?1, ?2)",
                    params![&hash_secret(&token)[..], unix_now()],
                )
                .map_err(internal)?;
                (tailnet, Some(token))
            }
        };
        tx.commit().map_err(internal)?;
        Ok((Db { conn, tailnet }, token))
    }

    /// The tailnet's settings.
    pub fn tailnet(&self) -> &Tailnet {
        &self.tailnet
    }

    /// The schema version in force.
    pub fn schema_version(&self) -> Result<i64, ApiError> {
        schema_version(&self.conn)
    }

    /// Whether `token` is a valid admin token.
    pub fn check_admin(&self, token: &str) -> Result<bool, ApiError> {
        let hash = hash_secret(token);
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM admin_tokens WHERE token_hash = ?1", [&hash[..]], |r| r.get(0))
            .map_err(internal)?;
        Ok(n > 0)
    }

    /// Creates an auth key; returns the secret (shown once) and its description.
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
        if let Some(u) = user {
            if self.user(u)?.is_none() {
                return Err(ApiError::not_found("no such user"));
            }
        }
        self.conn
            .execute(
                "INSERT INTO auth_keys (key_hash, prefix, reusable, ephemeral, tags, created_at, expires_at, user_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![&hash_secret(&key)[..], &key[..14], reusable, ephemeral, tags_json, now, expires_at, user],
            )
            .map_err(internal)?;
        let id = self.conn.last_insert_rowid();
        let info = self.auth_key(id)?.ok_or_else(|| ApiError::internal("key vanished".into()))?;
        Ok((key, info))
    }

    fn auth_key(&self, id: i64) -> Result<Option<AuthKeyInfo>, ApiError> {
        self.conn.query_row(&format!("{KEY_SELECT} WHERE k.id = ?1"), [id], key_row).optional().map_err(internal)
    }

    /// Every auth key, by id.
    pub fn auth_keys(&self) -> Result<Vec<AuthKeyInfo>, ApiError> {
        let mut st = self.conn.prepare(&format!("{KEY_SELECT} ORDER BY k.id")).map_err(internal)?;
        let rows = st.query_map([], key_row).map_err(internal)?;
        rows.collect::<Result<_, _>>().map_err(internal)
    }

    /// Revokes a key; false if there is no such key.
    pub fn revoke_auth_key(&mut self, id: i64) -> Result<bool, ApiError> {
        let n = self
            .conn
            .execute(
                "UPDATE auth_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, unix_now()],
            )
            .map_err(internal)?;
        Ok(n > 0 || self.auth_key(id)?.is_some())
    }

    /// Registers a node, or updates it when its machine key is already known
    /// (then the auth key is not needed: the machine-key signature, checked by
    /// the caller, proves who it is). The key is checked and, if one-off,
    /// spent in the same transaction that stores the node.
    pub fn register(&mut self, reg: &Registration) -> Result<NodeInfo, ApiError> {
        let now = unix_now();
        let endpoints = serde_json::to_string(&reg.endpoints).map_err(internal)?;
        let tx = self.conn.transaction().map_err(internal)?;
        let known: Option<(i64, Option<i64>)> = tx
            .query_row("SELECT id, key_expires_at FROM nodes WHERE machine_key = ?1", [&reg.machine_key[..]], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(internal)?;
        let id = match known {
            Some((id, expires_at)) => {
                if expires_at.is_some_and(|e| e <= now) {
                    // Re-authentication: a valid auth key is spent, the
                    // expiry cleared; addresses, name and tags stay.
                    let key = check_auth_key(&tx, &reg.auth_key, now)?;
                    tx.execute("UPDATE nodes SET key_expires_at = NULL WHERE id = ?1", [id]).map_err(internal)?;
                    tx.execute("UPDATE auth_keys SET uses = uses + 1 WHERE id = ?1", [key.id]).map_err(internal)?;
                }
                update_node_key(&tx, id, &reg.node_key)?;
                tx.execute(
                    "UPDATE nodes SET endpoints = ?2, last_seen = ?3 WHERE id = ?1",
                    params![id, endpoints, now],
                )
                .map_err(internal)?;
                id
            }
            None => insert_node(&tx, reg, &endpoints, now)?,
        };
        tx.commit().map_err(internal)?;
        self.node(id)?.ok_or_else(|| ApiError::internal("node vanished".into()))
    }

    /// Updates what a node reports when it opens its map stream. Returns
    /// whether anything changed.
    pub fn update_node(&mut self, id: i64, node_key: &[u8; 32], endpoints: &[String]) -> Result<bool, ApiError> {
        let endpoints = serde_json::to_string(endpoints).map_err(internal)?;
        let tx = self.conn.transaction().map_err(internal)?;
        let (old_key, old_endpoints): (Vec<u8>, String) = tx
            .query_row("SELECT node_key, endpoints FROM nodes WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(internal)?;
        let changed = old_key != node_key[..] || old_endpoints != endpoints;
        if old_key != node_key[..] {
            update_node_key(&tx, id, node_key)?;
        }
        tx.execute("UPDATE nodes SET endpoints = ?2, last_seen = ?3 WHERE id = ?1", params![id, endpoints, unix_now()])
            .map_err(internal)?;
        tx.commit().map_err(internal)?;
        Ok(changed)
    }

    /// The node with this machine key.
    pub fn node_by_machine_key(&self, machine_key: &[u8; 32]) -> Result<Option<NodeInfo>, ApiError> {
        self.conn
            .query_row(&format!("{NODE_SELECT} WHERE n.machine_key = ?1"), [&machine_key[..]], |r| {
                node_row(r, &self.tailnet)
            })
            .optional()
            .map_err(internal)
    }

    /// The node with this id.
    pub fn node(&self, id: i64) -> Result<Option<NodeInfo>, ApiError> {
        self.conn
            .query_row(&format!("{NODE_SELECT} WHERE n.id = ?1"), [id], |r| node_row(r, &self.tailnet))
            .optional()
            .map_err(internal)
    }

    /// Every node, by id (all `online: false`; the server adds presence).
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, ApiError> {
        let mut st = self.conn.prepare(&format!("{NODE_SELECT} ORDER BY n.id")).map_err(internal)?;
        let rows = st.query_map([], |r| node_row(r, &self.tailnet)).map_err(internal)?;
        rows.collect::<Result<_, _>>().map_err(internal)
    }

    fn node_id(&self, id_or_name: &str) -> Result<Option<i64>, ApiError> {
        match id_or_name.parse::<i64>() {
            Ok(id) => Ok(Some(id)),
            Err(_) => self
                .conn
                .query_row("SELECT id FROM nodes WHERE name = ?1", [id_or_name], |r| r.get(0))
                .optional()
                .map_err(internal),
        }
    }

    /// Sets when a node's key expires (Unix seconds; `None`: never). Returns
    /// its id, or `None` if there is no such node.
    pub fn set_node_key_expiry(&mut self, id_or_name: &str, expires_at: Option<i64>) -> Result<Option<i64>, ApiError> {
        let Some(id) = self.node_id(id_or_name)? else { return Ok(None) };
        let n = self
            .conn
            .execute("UPDATE nodes SET key_expires_at = ?2 WHERE id = ?1", params![id, expires_at])
            .map_err(internal)?;
        Ok((n > 0).then_some(id))
    }

    /// When node `id`'s key expires, if it does.
    pub fn node_key_expiry(&self, id: i64) -> Result<Option<i64>, ApiError> {
        self.conn
            .query_row("SELECT key_expires_at FROM nodes WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map(Option::flatten)
            .map_err(internal)
    }

    /// Every node's key expiry, for the nodes that have one.
    pub fn node_key_expiries(&self) -> Result<HashMap<i64, i64>, ApiError> {
        let mut st = self
            .conn
            .prepare("SELECT id, key_expires_at FROM nodes WHERE key_expires_at IS NOT NULL")
            .map_err(internal)?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(internal)?;
        rows.collect::<Result<_, _>>().map_err(internal)
    }

    /// Removes a node by id or name; returns its id, or `None` if there was none.
    pub fn remove_node(&mut self, id_or_name: &str) -> Result<Option<i64>, ApiError> {
        let Some(id) = self.node_id(id_or_name)? else { return Ok(None) };
        let n = self.conn.execute("DELETE FROM nodes WHERE id = ?1", [id]).map_err(internal)?;
        Ok((n > 0).then_some(id))
    }

    /// Creates a user; 409 if the login is taken.
    pub fn create_user(&mut self, login: &str, display_name: &str) -> Result<UserInfo, ApiError> {
        let login = check_login(login)?;
        let display_name = check_display_name(display_name, &login)?;
        let tx = self.conn.transaction().map_err(internal)?;
        let taken: i64 =
            tx.query_row("SELECT COUNT(*) FROM users WHERE login = ?1", [&login], |r| r.get(0)).map_err(internal)?;
        if taken > 0 {
            return Err(ApiError::conflict(format!("user {login:?} exists")));
        }
        tx.execute(
            "INSERT INTO users (login, display_name, created_at) VALUES (?1, ?2, ?3)",
            params![login, display_name, unix_now()],
        )
        .map_err(internal)?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(internal)?;
        self.user(id)?.ok_or_else(|| ApiError::internal("user vanished".into()))
    }

    /// The user with this id.
    pub fn user(&self, id: i64) -> Result<Option<UserInfo>, ApiError> {
        self.conn.query_row(&format!("{USER_SELECT} WHERE id = ?1"), [id], user_row).optional().map_err(internal)
    }

    /// The user with this login (compared in lowercase).
    pub fn user_by_login(&self, login: &str) -> Result<Option<UserInfo>, ApiError> {
        self.conn
            .query_row(&format!("{USER_SELECT} WHERE login = ?1"), [login.to_ascii_lowercase()], user_row)
            .optional()
            .map_err(internal)
    }

    /// Every user, by id.
    pub fn users(&self) -> Result<Vec<UserInfo>, ApiError> {
        let mut st = self.conn.prepare(&format!("{USER_SELECT} ORDER BY id")).map_err(internal)?;
        let rows = st.query_map([], user_row).map_err(internal)?;
        rows.collect::<Result<_, _>>().map_err(internal)
    }

    /// Removes a user by login, revoking the keys that would make nodes for
    /// it; returns its id, `None` if there is none, 409 while it owns nodes.
    pub fn remove_user(&mut self, login: &str) -> Result<Option<i64>, ApiError> {
        let tx = self.conn.transaction().map_err(internal)?;
        let id: Option<i64> = tx
            .query_row("SELECT id FROM users WHERE login = ?1", [login.to_ascii_lowercase()], |r| r.get(0))
            .optional()
            .map_err(internal)?;
        let Some(id) = id else { return Ok(None) };
        let owned: i64 =
            tx.query_row("SELECT COUNT(*) FROM nodes WHERE user_id = ?1", [id], |r| r.get(0)).map_err(internal)?;
        if owned > 0 {
            return Err(ApiError::conflict(format!("the user owns {owned} node(s): remove them first")));
        }
        tx.execute(
            "UPDATE auth_keys SET revoked_at = ?2 WHERE user_id = ?1 AND revoked_at IS NULL",
            params![id, unix_now()],
        )
        .map_err(internal)?;
        tx.execute("DELETE FROM users WHERE id = ?1", [id]).map_err(internal)?;
        tx.commit().map_err(internal)?;
        Ok(Some(id))
    }

    /// The policy (huJSON text) and its version, if one was ever set.
    pub fn policy(&self) -> Result<Option<(String, i64)>, ApiError> {
        self.conn
            .query_row("SELECT text, version FROM policy WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(internal)
    }

    /// Replaces the policy text (checked by the caller) in one transaction;
    /// returns the new version (1 for the first, then one more each time).
    pub fn set_policy(&mut self, text: &str) -> Result<i64, ApiError> {
        let tx = self.conn.transaction().map_err(internal)?;
        let version: i64 = tx
            .query_row(
                "INSERT INTO policy (id, text, version, updated_at) VALUES (1, ?1, 1, ?2)
                 ON CONFLICT (id) DO UPDATE SET text = excluded.text, version = policy.version + 1,
                     updated_at = excluded.updated_at
                 RETURNING version",
                params![text, unix_now()],
                |r| r.get(0),
            )
            .map_err(internal)?;
        tx.commit().map_err(internal)?;
        Ok(version)
    }
}

/// A display name as stored: the login when empty; at most 128 characters, no control characters.
fn check_display_name(name: &str, login: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("display_name must be at most 128 characters, none a control".into()));
    }
    Ok(if name.is_empty() { login.to_string() } else { name.to_string() })
}

const USER_SELECT: &str = "SELECT id, login, display_name, created_at FROM users";

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserInfo> {
    Ok(UserInfo { id: r.get(0)?, login: r.get(1)?, display_name: r.get(2)?, created_at: r.get(3)? })
}

const KEY_SELECT: &str = "SELECT k.id, k.prefix, k.reusable, k.ephemeral, k.tags, k.created_at, k.expires_at, k.uses,
    k.revoked_at, u.login FROM auth_keys k LEFT JOIN users u ON u.id = k.user_id";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuthKeyInfo> {
    let reusable: bool = r.get(2)?;
    let uses: i64 = r.get(7)?;
    let tags: String = r.get(4)?;
    Ok(AuthKeyInfo {
        id: r.get(0)?,
        prefix: r.get(1)?,
        reusable,
        ephemeral: r.get(3)?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
        uses,
        spent: !reusable && uses > 0,
        revoked: r.get::<_, Option<i64>>(8)?.is_some(),
        user: r.get(9)?,
    })
}

const NODE_SELECT: &str = "SELECT n.id, n.name, n.node_key, n.machine_key, n.ipv4, n.endpoints, n.tags, n.ephemeral,
    n.created_at, u.login FROM nodes n LEFT JOIN users u ON u.id = n.user_id";

fn node_row(r: &rusqlite::Row<'_>, tailnet: &Tailnet) -> rusqlite::Result<NodeInfo> {
    let name: String = r.get(1)?;
    let node_key: Vec<u8> = r.get(2)?;
    let machine_key: Vec<u8> = r.get(3)?;
    let ipv4 = Ipv4Addr::from(r.get::<_, u32>(4)?);
    let ipv6 = tailnet.ipv6_for(ipv4);
    let endpoints: String = r.get(5)?;
    let tags: Vec<String> = serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default();
    let node_key: [u8; 32] = node_key.try_into().unwrap_or([0; 32]);
    Ok(NodeInfo {
        id: r.get(0)?,
        fqdn: format!("{name}.{}", tailnet.domain),
        name,
        node_key: super::proto::b64_key(&node_key),
        machine_key: hex(&machine_key),
        ipv4,
        ipv6,
        endpoints: serde_json::from_str(&endpoints).unwrap_or_default(),
        allowed_ips: vec![format!("{ipv4}/32"), format!("{ipv6}/128")],
        owner: match r.get::<_, Option<String>>(9)? {
            _ if !tags.is_empty() => OWNER_TAGGED.into(),
            Some(login) => login,
            None => OWNER_ADMIN.into(),
        },
        tags,
        ephemeral: r.get(7)?,
        online: false,
        created_at: r.get(8)?,
    })
}

fn update_node_key(tx: &Transaction<'_>, id: i64, node_key: &[u8; 32]) -> Result<(), ApiError> {
    let other: Option<i64> = tx
        .query_row("SELECT id FROM nodes WHERE node_key = ?1 AND id != ?2", params![&node_key[..], id], |r| r.get(0))
        .optional()
        .map_err(internal)?;
    if other.is_some() {
        return Err(ApiError::conflict("node key already belongs to another node".into()));
    }
    tx.execute("UPDATE nodes SET node_key = ?2 WHERE id = ?1", params![id, &node_key[..]]).map_err(internal)?;
    Ok(())
}

/// An auth key that may be used now.
struct UsableKey {
    id: i64,
    ephemeral: bool,
    tags: String,
    user: Option<i64>,
}

/// Checks an auth key inside the registration's transaction (the caller spends it).
fn check_auth_key(tx: &Transaction<'_>, auth_key: &str, now: i64) -> Result<UsableKey, ApiError> {
    let hash = hash_secret(auth_key);
    type KeyRow = (i64, bool, bool, String, Option<i64>, i64, Option<i64>, Option<i64>);
    let key: Option<KeyRow> = tx
        .query_row(
            "SELECT id, reusable, ephemeral, tags, expires_at, uses, revoked_at, user_id FROM auth_keys
             WHERE key_hash = ?1",
            [&hash[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?)),
        )
        .optional()
        .map_err(internal)?;
    let Some((key_id, reusable, ephemeral, tags, expires_at, uses, revoked_at, user)) = key else {
        return Err(ApiError::new(401, "invalid_auth_key", "unknown auth key"));
    };
    if revoked_at.is_some() {
        return Err(ApiError::new(401, "key_revoked", "auth key was revoked"));
    }
    if expires_at.is_some_and(|e| e <= now) {
        return Err(ApiError::new(401, "key_expired", "auth key has expired"));
    }
    if !reusable && uses > 0 {
        return Err(ApiError::new(401, "key_spent", "one-off auth key was already used"));
    }
    Ok(UsableKey { id: key_id, ephemeral, tags, user })
}

fn insert_node(tx: &Transaction<'_>, reg: &Registration, endpoints: &str, now: i64) -> Result<i64, ApiError> {
    let UsableKey { id: key_id, ephemeral, tags, user } = check_auth_key(tx, &reg.auth_key, now)?;
    // A key with tags makes tagged nodes, owned by no user.
    let user = if tags == "[]" { user } else { None };
    let node_key_taken: bool = tx
        .query_row("SELECT COUNT(*) FROM nodes WHERE node_key = ?1", [&reg.node_key[..]], |r| r.get::<_, i64>(0))
        .map_err(internal)?
        > 0;
    if node_key_taken {
        return Err(ApiError::conflict("node key already belongs to another node".into()));
    }
    let next: u32 = tx.query_row("SELECT next_ipv4 FROM tailnet WHERE id = 1", [], |r| r.get(0)).map_err(internal)?;
    let mut used = tx.prepare("SELECT COUNT(*) FROM nodes WHERE ipv4 = ?1").map_err(internal)?;
    let mut err = None;
    let ipv4 = pick_ipv4(next, |a| {
        used.query_row([a], |r| r.get::<_, i64>(0)).map(|n| n > 0).unwrap_or_else(|e| {
            err = Some(e);
            false
        })
    });
    drop(used);
    if let Some(e) = err {
        return Err(internal(e));
    }
    let ipv4 = ipv4.ok_or_else(|| ApiError::new(507, "address_space_full", "no free tailnet address"))?;
    let mut taken = tx.prepare("SELECT COUNT(*) FROM nodes WHERE name = ?1").map_err(internal)?;
    let name = unique_name(&dns_label(&reg.hostname), |n| {
        taken.query_row([n], |r| r.get::<_, i64>(0)).map(|c| c > 0).unwrap_or(true)
    });
    drop(taken);
    tx.execute(
        "INSERT INTO nodes (machine_key, node_key, hostname, name, ipv4, endpoints, tags, ephemeral, auth_key_id,
                            created_at, last_seen, user_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11)",
        params![
            &reg.machine_key[..],
            &reg.node_key[..],
            reg.hostname,
            name,
            ipv4,
            endpoints,
            tags,
            ephemeral,
            key_id,
            now,
            user
        ],
    )
    .map_err(internal)?;
    let id = tx.last_insert_rowid();
    // Addresses are not handed out again soon after a node is removed.
    let next = if ipv4 == IPV4_LAST { IPV4_FIRST } else { ipv4 + 1 };
    tx.execute("UPDATE tailnet SET next_ipv4 = ?1 WHERE id = 1", [next]).map_err(internal)?;
    tx.execute("UPDATE auth_keys SET uses = uses + 1 WHERE id = ?1", [key_id]).map_err(internal)?;
    Ok(id)
}

fn schema_version(conn: &Connection) -> Result<i64, ApiError> {
    conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0)).map_err(internal)
}

/// Applies the migrations newer than the store, each in its own transaction.
/// Returns how many were applied.
fn migrate(conn: &mut Connection) -> Result<usize, ApiError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .map_err(internal)?;
    let current = schema_version(conn)?;
    let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if current > latest {
        return Err(ApiError::internal(format!(
            "state store has schema version {current}, newer than this server knows ({latest})"
        )));
    }
    let mut applied = 0;
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction().map_err(internal)?;
        tx.execute_batch(sql).map_err(internal)?;
        tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)", params![version, unix_now()])
            .map_err(internal)?;
        tx.commit().map_err(internal)?;
        applied += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(key: &str, n: u8, hostname: &str) -> Registration {
        Registration {
            auth_key: key.into(),
            machine_key: [n; 32],
            node_key: [n.wrapping_add(100); 32],
            hostname: hostname.into(),
            endpoints: vec!["192.0.2.1:41641".into()],
        }
    }

    #[test]
    fn ipv4_allocation_skips_used_and_resolver_and_wraps() {
        assert_eq!(pick_ipv4(0, |_| false), Some(IPV4_FIRST));
        assert_eq!(Ipv4Addr::from(IPV4_FIRST), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(Ipv4Addr::from(IPV4_LAST), Ipv4Addr::new(100, 127, 255, 254));
        assert_eq!(pick_ipv4(IPV4_FIRST, |a| a < IPV4_FIRST + 3), Some(IPV4_FIRST + 3));
        assert_eq!(pick_ipv4(IPV4_RESOLVER, |_| false), Some(IPV4_RESOLVER + 1));
        assert_eq!(pick_ipv4(IPV4_LAST, |a| a == IPV4_LAST), Some(IPV4_FIRST));
        assert_eq!(pick_ipv4(IPV4_FIRST + 10, |_| true), None);
    }

    #[test]
    fn names_are_dns_safe_and_unique() {
        assert_eq!(dns_label("My_Laptop.local"), "my-laptop");
        assert_eq!(dns_label("--web--01--"), "web-01");
        assert_eq!(dns_label("ÄÖÜ"), "node");
        assert_eq!(dns_label(&"a".repeat(100)).len(), 63);
        let taken = ["web", "web-2"];
        assert_eq!(unique_name("web", |n| taken.contains(&n)), "web-3");
        assert_eq!(unique_name("db", |n| taken.contains(&n)), "db");
        let long = "b".repeat(63);
        let got = unique_name(&long, |n| n == long);
        assert_eq!(got.len(), 63);
        assert!(got.ends_with("-2"));
    }

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
        let dump: Vec<Vec<u8>> = {
            let mut st = db
                .conn
                .prepare("SELECT key_hash FROM auth_keys UNION ALL SELECT token_hash FROM admin_tokens")
                .unwrap();
            st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
        };
        assert!(dump.contains(&hash_secret(&key).to_vec()));
        assert!(dump.contains(&hash_secret(&admin).to_vec()));
        let text: i64 = db
            .conn
            .query_row(
                "SELECT COUNT(*) FROM auth_keys WHERE prefix = ?1 OR prefix LIKE ?2",
                params![key, format!("{}%", &key[..20])],
                |r| r.get(0),
            )
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
        db.conn.execute("UPDATE auth_keys SET expires_at = 1 WHERE id = ?1", [info.id]).unwrap();
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
        let mode: String = db.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        drop(db);
        let (mut db, again) = Db::open(&dir).unwrap();
        assert!(again.is_none(), "the admin token is made only at first start");
        assert!(db.check_admin(&token).unwrap());
        assert_eq!(db.tailnet(), &tailnet);
        assert_eq!(db.nodes().unwrap(), vec![node]);
        assert_eq!(migrate(&mut db.conn).unwrap(), 0);
        let rows: i64 = db.conn.query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, MIGRATIONS.len() as i64);
        // A store from a newer server is refused rather than misread.
        db.conn.execute("INSERT INTO schema_migrations VALUES (999, 0)", []).unwrap();
        drop(db);
        assert!(Db::open(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
