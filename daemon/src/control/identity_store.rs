//! The identity service's state in the control store (migration 10): the
//! issuer's signing key set, and the identity node's own keys with the lease
//! that lets one replica at a time run it (docs/identity.md).
//!
//! The key set is one row of JSON (private keys included): the store is
//! already where every secret of the tailnet lives (readable by the server
//! only: `state.db` in a 0700 directory, or the PostgreSQL role's tables).

use super::db::{unix_now, Db, Registration};
use super::proto::NodeInfo;
use super::server::App;
use super::store::{params, Conn, Dialect};
use super::ApiError;
use crate::identity::keys::{Algorithm, KeySet, StoredKeySet};
use std::sync::Arc;

/// The schema step: see [`super::db`]'s list, where it is version 10.
pub const MIGRATION: &str = "CREATE TABLE identity_keys (
        id {int} PRIMARY KEY CHECK (id = 1),
        key_set TEXT NOT NULL,
        rotated_at {int} NOT NULL
    );
    CREATE TABLE identity_node (
        id {int} PRIMARY KEY CHECK (id = 1),
        node_id {int} NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        machine_key {blob} NOT NULL,
        node_key {blob} NOT NULL,
        holder TEXT,
        lease_until {int} NOT NULL DEFAULT 0
    );";

/// The identity node's private keys as stored: the PKCS#8 Ed25519 machine
/// key and the X25519 node key. Wiped when dropped.
pub struct IdentityNodeKeys {
    /// The node's id.
    pub node_id: i64,
    /// PKCS#8 of the Ed25519 machine key.
    pub machine_pkcs8: Vec<u8>,
    /// The WireGuard private key.
    pub node_private: [u8; 32],
}

impl Drop for IdentityNodeKeys {
    fn drop(&mut self) {
        self.machine_pkcs8.iter_mut().for_each(|b| *b = 0);
        self.node_private = [0; 32];
        std::hint::black_box(&self.machine_pkcs8);
        std::hint::black_box(&self.node_private);
    }
}

impl std::fmt::Debug for IdentityNodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityNodeKeys").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// Fresh identity node keys: machine PKCS#8, machine public key, node
/// private key, node public key.
pub type NewNodeKeys = (Vec<u8>, [u8; 32], [u8; 32], [u8; 32]);

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("identity store: {e}"))
}

/// Overwrites a string that held key material (`into_bytes` keeps the buffer).
fn wipe(s: String) {
    let mut bytes = s.into_bytes();
    bytes.iter_mut().for_each(|b| *b = 0);
    std::hint::black_box(&bytes);
}

fn parse_set(json: &str) -> Result<KeySet, ApiError> {
    let stored: StoredKeySet = serde_json::from_str(json).map_err(internal)?;
    KeySet::from_stored(&stored).map_err(internal)
}

fn encode_set(set: &KeySet) -> Result<String, ApiError> {
    serde_json::to_string(&set.to_stored()).map_err(internal)
}

impl Db {
    /// The signing key set, made at first start (under the migration lock,
    /// so replicas starting together make one). Returns it with the Unix
    /// second of its last rotation.
    pub fn identity_keys(&mut self, alg: Algorithm) -> Result<(KeySet, i64), ApiError> {
        self.conn().with_migration_lock(|c| {
            if let Some(r) = c.query_opt("SELECT key_set, rotated_at FROM identity_keys WHERE id = 1", &[])? {
                let json = r.text(0)?;
                let set = parse_set(&json);
                wipe(json);
                return Ok((set?, r.int(1)?));
            }
            let now = unix_now();
            let set = KeySet::generate(alg, now).map_err(internal)?;
            let json = encode_set(&set)?;
            let r = c.transaction(None, |c| {
                c.execute("INSERT INTO identity_keys (id, key_set, rotated_at) VALUES (1, $1, $2)", params![&json, now])
            });
            wipe(json);
            r?;
            Ok((set, now))
        })
    }

    /// Rotates the key set if `force` or its last rotation is at least
    /// `every_secs` old, dropping retired keys older than `keep_secs`; in
    /// one transaction holding the row, so two replicas never both rotate.
    /// Returns the set as stored afterwards, its rotation time, and whether
    /// this call rotated.
    pub fn rotate_identity_keys(
        &mut self,
        alg: Algorithm,
        every_secs: i64,
        keep_secs: i64,
        force: bool,
    ) -> Result<(KeySet, i64, bool), ApiError> {
        let lock = self.dialect().for_update();
        // No change notification: keys are not in any map, and every replica
        // reloads them on its own schedule.
        self.conn().transaction(None, |c| {
            let r = c
                .query_opt(&format!("SELECT key_set, rotated_at FROM identity_keys WHERE id = 1{lock}"), &[])?
                .ok_or_else(|| ApiError::internal("identity store: no key set".into()))?;
            let json = r.text(0)?;
            let set = parse_set(&json);
            wipe(json);
            let mut set = set?;
            let rotated_at = r.int(1)?;
            let now = unix_now();
            if !force && now < rotated_at.saturating_add(every_secs) {
                return Ok((set, rotated_at, false));
            }
            set.rotate(alg, now).map_err(internal)?;
            set.prune(now, keep_secs);
            let json = encode_set(&set)?;
            let w =
                c.execute("UPDATE identity_keys SET key_set = $1, rotated_at = $2 WHERE id = 1", params![&json, now]);
            wipe(json);
            w?;
            Ok((set, now, true))
        })
    }

    /// The identity node's keys, registering the node (name `hostname`,
    /// tag `tag:identity`) on first use with a one-off key spent at once.
    /// A node removed by an administrator is registered afresh.
    pub fn identity_node(
        &mut self,
        hostname: &str,
        make: impl FnOnce() -> Result<NewNodeKeys, String>,
    ) -> Result<(IdentityNodeKeys, NodeInfo), ApiError> {
        if let Some(found) = self.stored_identity_node()? {
            return Ok(found);
        }
        let (machine_pkcs8, machine_public, node_private, node_public) = make().map_err(internal)?;
        let (auth_key, _) = self.create_auth_key(false, false, &["tag:identity".to_string()], Some(600), None)?;
        let node = self.register(&Registration {
            auth_key,
            machine_key: machine_public,
            node_key: node_public,
            hostname: hostname.to_string(),
            endpoints: Vec::new(),
        })?;
        let keys = IdentityNodeKeys { node_id: node.id, machine_pkcs8, node_private };
        // Replicas starting together may both get here: the first row wins
        // and the others remove the node they made.
        let inserted = self.write(|c: &mut Conn| {
            c.execute(
                "INSERT INTO identity_node (id, node_id, machine_key, node_key) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO NOTHING",
                params![node.id, &keys.machine_pkcs8[..], &keys.node_private[..]],
            )
        })?;
        if inserted == 1 {
            return Ok((keys, node));
        }
        self.remove_node(&node.id.to_string())?;
        self.stored_identity_node()?.ok_or_else(|| internal("the identity node vanished"))
    }

    /// The registered identity node (its row goes with the node when an
    /// administrator removes it: `ON DELETE CASCADE`).
    fn stored_identity_node(&mut self) -> Result<Option<(IdentityNodeKeys, NodeInfo)>, ApiError> {
        let found = self
            .conn()
            .query_opt("SELECT node_id, machine_key, node_key FROM identity_node WHERE id = 1", &[])?
            .map(|r| -> Result<_, ApiError> {
                let node_private: [u8; 32] = r.blob(2)?.try_into().map_err(|_| internal("bad stored node key"))?;
                Ok(IdentityNodeKeys { node_id: r.int(0)?, machine_pkcs8: r.blob(1)?, node_private })
            })
            .transpose()?;
        let Some(keys) = found else { return Ok(None) };
        match self.node(keys.node_id)? {
            Some(node) => Ok(Some((keys, node))),
            None => {
                // A row without its node (a store without foreign keys enforced): start afresh.
                self.write(|c| c.execute("DELETE FROM identity_node WHERE id = 1", &[]))?;
                Ok(None)
            }
        }
    }

    /// Takes or renews the lease on running the identity node for `secs`:
    /// true when this replica holds it (free, expired, or already its own).
    pub fn identity_lease(&mut self, secs: i64) -> Result<bool, ApiError> {
        let replica = self.replica().to_string();
        let now = unix_now();
        // One process serves a SQLite store: a lease left by its earlier life is stale.
        let free_before = if self.dialect() == Dialect::Sqlite { i64::MAX } else { now };
        // Renewed every few seconds: no change notification for it.
        let n = self.conn().transaction(None, |c| {
            c.execute(
                "UPDATE identity_node SET holder = $1, lease_until = $2
                 WHERE id = 1 AND (holder IS NULL OR holder = $1 OR lease_until < $3)",
                params![&replica, now + secs, free_before],
            )
        })?;
        Ok(n == 1)
    }

    /// Gives the lease up (at a clean exit), so another replica may take it at once.
    pub fn release_identity_lease(&mut self) -> Result<(), ApiError> {
        let replica = self.replica().to_string();
        self.write(|c| {
            c.execute(
                "UPDATE identity_node SET holder = NULL, lease_until = 0 WHERE id = 1 AND holder = $1",
                params![&replica],
            )
        })?;
        Ok(())
    }
}

impl App {
    /// Runs `f` on the store off the async workers (the identity service's access).
    pub async fn identity_db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Db) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.with_db(f).await
    }

    /// The person owning a user-owned node, by login: display name from
    /// the store, groups from the policy.
    pub async fn identity_user(self: &Arc<Self>, login: String) -> Result<crate::identity::caller::User, ApiError> {
        self.with_db(move |db| {
            let display = db.user_by_login(&login)?.map(|u| u.display_name);
            let policy = db.policy()?.and_then(|(text, _)| crate::policy::parse(&text).ok());
            Ok(crate::identity::service::user_of(&login, display, policy.as_ref()))
        })
        .await
    }
}
