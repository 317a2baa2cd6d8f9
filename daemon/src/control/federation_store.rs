//! The store side of federation (see [`super::federation`]): trust
//! credentials, the `jti`s of the ID tokens already used (kept until they
//! expire), and registering a node with a verified token: the `jti` is
//! recorded in the same transaction that stores the node, so a token
//! registers one node at most, on any replica.

use super::alloc::{self, NewNode};
use super::db::{self, Db, Registration};
use super::proto::NodeInfo;
use super::store::{params, Row};
use super::ApiError;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// A trust credential: tokens from `issuer` whose subject matches `subject`
/// and whose audience is `<control URL>/<client_id>` may register nodes with
/// some of `tags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustCredential {
    /// The credential's number.
    pub id: i64,
    /// The generated client ID (the last part of the audience).
    pub client_id: String,
    /// The issuer URL, exactly as tokens' `iss`.
    pub issuer: String,
    /// The subject pattern (`*` matches any run of characters).
    pub subject: String,
    /// The tags a node may ask for.
    pub tags: Vec<String>,
    /// Whether its nodes are ephemeral.
    pub ephemeral: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// Longest issuer URL or subject pattern accepted.
pub const MAX_FIELD: usize = 512;

/// Checks a subject pattern: 1-512 printable characters, no spaces.
pub fn check_subject_pattern(p: &str) -> Result<(), ApiError> {
    if p.is_empty() || p.len() > MAX_FIELD || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::bad_request(format!(
            "subject pattern {p:?} must be 1-{MAX_FIELD} characters without spaces"
        )));
    }
    Ok(())
}

fn credential_row(r: &Row) -> Result<TrustCredential, ApiError> {
    Ok(TrustCredential {
        id: r.int(0)?,
        client_id: r.text(1)?,
        issuer: r.text(2)?,
        subject: r.text(3)?,
        tags: serde_json::from_str(&r.text(4)?).unwrap_or_default(),
        ephemeral: r.bool(5)?,
        created_at: r.int(6)?,
    })
}

const CREDENTIAL_SELECT: &str =
    "SELECT id, client_id, issuer, subject, tags, ephemeral, created_at FROM federation_credentials";

/// A fresh client ID: `wmfed-` and 16 random bytes in hex (not a secret:
/// it is part of the audience every token names).
fn new_client_id() -> Result<String, ApiError> {
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).map_err(|_| ApiError::internal("no randomness".into()))?;
    Ok(format!("wmfed-{}", super::proto::hex(&b)))
}

/// What the verified token lets a registration do.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The credential that accepted the token.
    pub credential: TrustCredential,
    /// The tags the node gets (a subset of the credential's).
    pub tags: Vec<String>,
    /// The token's issuer and `jti`, recorded as used.
    pub jti: String,
    /// Until when the `jti` must be remembered (the token's `exp` plus skew).
    pub jti_until: i64,
}

impl Db {
    /// Creates a trust credential; the issuer is checked by the caller.
    pub fn create_credential(
        &mut self,
        issuer: &str,
        subject: &str,
        tags: &[String],
        ephemeral: bool,
    ) -> Result<TrustCredential, ApiError> {
        check_subject_pattern(subject)?;
        if tags.is_empty() {
            return Err(ApiError::bad_request("a trust credential needs at least one tag".into()));
        }
        for t in tags {
            db::check_tag(t)?;
        }
        let tags_json = serde_json::to_string(tags).map_err(|e| ApiError::internal(e.to_string()))?;
        let client_id = new_client_id()?;
        let now = db::unix_now();
        let id = self.write(|c| {
            c.query_one(
                "INSERT INTO federation_credentials (client_id, issuer, subject, tags, ephemeral, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                params![&client_id, issuer, subject, &tags_json, ephemeral, now],
            )?
            .int(0)
        })?;
        self.credential(id)?.ok_or_else(|| ApiError::internal("credential vanished".into()))
    }

    /// One credential by number.
    pub fn credential(&mut self, id: i64) -> Result<Option<TrustCredential>, ApiError> {
        self.conn()
            .query_opt(&format!("{CREDENTIAL_SELECT} WHERE id = $1"), params![id])?
            .map(|r| credential_row(&r))
            .transpose()
    }

    /// One credential by client ID.
    pub fn credential_by_client_id(&mut self, client_id: &str) -> Result<Option<TrustCredential>, ApiError> {
        self.conn()
            .query_opt(&format!("{CREDENTIAL_SELECT} WHERE client_id = $1"), params![client_id])?
            .map(|r| credential_row(&r))
            .transpose()
    }

    /// Every credential.
    pub fn credentials(&mut self) -> Result<Vec<TrustCredential>, ApiError> {
        self.conn().query(&format!("{CREDENTIAL_SELECT} ORDER BY id"), &[])?.iter().map(credential_row).collect()
    }

    /// Removes a credential (its nodes stay); whether it existed.
    pub fn remove_credential(&mut self, id: i64) -> Result<bool, ApiError> {
        let n = self.write(|c| c.execute("DELETE FROM federation_credentials WHERE id = $1", params![id]))?;
        Ok(n > 0)
    }

    /// Forgets the `jti`s of tokens that expired before `now`.
    pub fn prune_jtis(&mut self, now: i64) -> Result<u64, ApiError> {
        self.write(|c| c.execute("DELETE FROM federation_jtis WHERE expires_at < $1", params![now]))
    }

    /// How many `jti`s are remembered (tests, metrics).
    pub fn jti_count(&mut self) -> Result<i64, ApiError> {
        self.conn().query_one("SELECT COUNT(*) FROM federation_jtis", &[])?.int(0)
    }

    /// Registers (or, for a known machine, updates) a node with a verified
    /// token: the `jti` is recorded in the same transaction, and a `jti`
    /// seen before refuses the whole registration (`jti_reused`).
    pub fn register_federated(&mut self, reg: &Registration, v: &Verified) -> Result<NodeInfo, ApiError> {
        let now = db::unix_now();
        let endpoints = serde_json::to_string(&reg.endpoints).map_err(|e| ApiError::internal(e.to_string()))?;
        let tags = serde_json::to_string(&v.tags).map_err(|e| ApiError::internal(e.to_string()))?;
        let range = self.ipv4_range();
        let id = self.write(|c| {
            // One registration at a time across replicas, as db::register.
            alloc::lock_registrations(c)?;
            c.execute("DELETE FROM federation_jtis WHERE expires_at < $1", params![now])?;
            let key = format!("{}\n{}", v.credential.issuer, v.jti);
            if c.query_opt("SELECT expires_at FROM federation_jtis WHERE token = $1", params![&key])?.is_some() {
                return Err(ApiError::new(
                    401,
                    "jti_reused",
                    "jti: this ID token (its jti) was already used to register a node",
                ));
            }
            c.execute("INSERT INTO federation_jtis (token, expires_at) VALUES ($1, $2)", params![&key, v.jti_until])?;
            let known = c.query_opt("SELECT id FROM nodes WHERE machine_key = $1", params![&reg.machine_key[..]])?;
            if let Some(r) = known {
                // A machine already registered: the token re-authenticates
                // it; its tags become the ones asked for now.
                let id = r.int(0)?;
                if c.query_opt("SELECT id FROM nodes WHERE node_key = $1 AND id != $2", params![&reg.node_key[..], id])?
                    .is_some()
                {
                    return Err(ApiError::conflict("node key already belongs to another node".into()));
                }
                c.execute(
                    "UPDATE nodes SET node_key = $2, endpoints = $3, last_seen = $4, tags = $5,
                       key_expires_at = NULL, user_id = NULL WHERE id = $1",
                    params![id, &reg.node_key[..], &endpoints, now, &tags],
                )?;
                return Ok(id);
            }
            let node = NewNode {
                reg,
                endpoints: &endpoints,
                tags: &tags,
                ephemeral: v.credential.ephemeral,
                auth_key_id: None,
                user_id: None,
                federation_id: Some(v.credential.id),
                now,
            };
            alloc::insert_node(c, &node, range)
        })?;
        self.node(id)?.ok_or_else(|| ApiError::internal("node vanished".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(n: u8, hostname: &str) -> Registration {
        alloc::test_registration("", n, hostname)
    }

    #[test]
    fn credentials_round_trip_and_a_jti_registers_once() {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let tags = vec!["tag:ci".to_string(), "tag:web".to_string()];
        let c = db.create_credential("https://issuer.example", "ws-1/*", &tags, true).unwrap();
        assert!(c.client_id.starts_with("wmfed-") && c.client_id.len() == 38);
        assert_eq!(db.credentials().unwrap(), vec![c.clone()]);
        assert_eq!(db.credential_by_client_id(&c.client_id).unwrap(), Some(c.clone()));
        assert!(db.create_credential("https://i.example", "x", &[], false).is_err());
        assert!(db.create_credential("https://i.example", "x", &["web".into()], false).is_err());
        assert!(db.create_credential("https://i.example", "a b", &tags, false).is_err());

        let now = db::unix_now();
        let v = Verified { credential: c.clone(), tags: vec!["tag:ci".into()], jti: "j1".into(), jti_until: now + 60 };
        let node = db.register_federated(&reg(1, "runner"), &v).unwrap();
        assert_eq!(
            (node.tags.clone(), node.ephemeral, node.owner.as_str()),
            (vec!["tag:ci".into()], true, "tagged-devices")
        );
        let again = db.register_federated(&reg(2, "runner"), &v).unwrap_err();
        assert_eq!((again.status, again.code.as_str()), (401, "jti_reused"));
        assert_eq!(db.nodes().unwrap().len(), 1, "a refused registration stores nothing");
        // The same jti from another issuer is another token.
        let mut other = v.clone();
        other.credential.issuer = "https://other.example".into();
        assert_eq!(db.register_federated(&reg(2, "runner"), &other).unwrap().name, "runner-2");
        // Expired jtis are pruned.
        let old = Verified { jti: "j-old".into(), jti_until: now - 10, ..v.clone() };
        db.register_federated(&reg(3, "old"), &old).unwrap();
        assert_eq!(db.jti_count().unwrap(), 3);
        assert_eq!(db.prune_jtis(now).unwrap(), 1);
        assert!(db.remove_credential(c.id).unwrap());
        assert!(!db.remove_credential(c.id).unwrap());
        assert_eq!(db.nodes().unwrap().len(), 3, "nodes outlive their credential");
    }
}
