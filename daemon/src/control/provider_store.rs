//! The OIDC provider's state in the control store (migration 12): its
//! clients, authorization codes, and access and refresh tokens, so a restart
//! of the control server signs nobody out and breaks no client.
//!
//! Every secret (client secret, code, token) is 32 random bytes and stored
//! only as its SHA-256 hash, as admin tokens and auth keys are
//! ([`super::db`] says why a plain hash suffices). Lookups go by hash, so
//! no stored value can be used as a credential.
//!
//! Tokens belong to a *family*: the refresh tokens (and the access tokens
//! issued beside them) descending from one authorization code. Presenting a
//! refresh token rotates it (the used one is revoked); presenting a revoked
//! one, or a used code, revokes the whole family (RFC 6749 section 10.4 and
//! section 4.1.2: a stolen token is then worth nothing to either party).

use super::db::Db;
use super::proto::{hex, unhex};
use super::server::App;
use super::store::{params, Row};
use super::ApiError;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A registered OAuth client (RFC 6749 section 2) as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdpClient {
    /// The public identifier.
    pub client_id: String,
    /// A name for people (shown on the consent page).
    pub name: String,
    /// The redirect URIs, matched exactly.
    pub redirect_uris: Vec<String>,
    /// Public client (no secret; PKCE alone) or confidential.
    pub public: bool,
    /// `admin` (the admin API) or `node:<name>` (dynamic registration).
    pub created_by: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A client with the hash of its secret, for authenticating it.
#[derive(Clone)]
pub struct StoredClient {
    /// What is shown.
    pub info: IdpClient,
    /// SHA-256 of the secret; `None` for public clients.
    pub secret_hash: Option<[u8; 32]>,
}

/// An authorization code's binding (RFC 6749 section 4.1.3 and RFC 7636).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCode {
    /// The client it was issued to.
    pub client_id: String,
    /// The redirect URI of the authorization request.
    pub redirect_uri: String,
    /// The PKCE S256 challenge.
    pub code_challenge: String,
    /// The sign-in (subject, claims, scope, nonce, auth_time) as JSON.
    pub grant: String,
    /// The token family the code starts.
    pub family: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// What presenting a code found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeUse {
    /// First use of a live code: it is now spent.
    Fresh(StoredCode),
    /// No such code.
    Unknown,
    /// The code was used before: its family has been revoked.
    Reused,
}

/// Access or refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An opaque access token (Bearer, RFC 6750).
    Access,
    /// A refresh token.
    Refresh,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Access => "access",
            TokenKind::Refresh => "refresh",
        }
    }
}

/// An issued token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// Access or refresh.
    pub kind: TokenKind,
    /// The client it was issued to.
    pub client_id: String,
    /// Its family.
    pub family: String,
    /// The sign-in it carries, as JSON.
    pub grant: String,
    /// Who may accept it: the client, or a token exchange's audience.
    pub audience: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Revoked (rotated, revoked by the client, or its family revoked).
    pub revoked: bool,
}

/// What presenting a refresh token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshUse {
    /// A live refresh token, now revoked (rotated).
    Fresh(StoredToken),
    /// No such refresh token.
    Unknown,
    /// Revoked before: its family has been revoked too.
    Reused,
}

const CLIENT_COLUMNS: &str = "client_id, name, redirect_uris, secret_hash, created_by, created_at";

fn client_row(r: &Row) -> Result<StoredClient, ApiError> {
    let uris: Vec<String> = serde_json::from_str(&r.text(2)?)
        .map_err(|e| ApiError::internal(format!("state store: redirect_uris: {e}")))?;
    let secret_hash = match r.opt_text(3)? {
        Some(h) => Some(
            unhex::<32>(&h)
                .ok_or_else(|| ApiError::internal("state store: a client secret hash is not 32 bytes".into()))?,
        ),
        None => None,
    };
    Ok(StoredClient {
        info: IdpClient {
            client_id: r.text(0)?,
            name: r.text(1)?,
            redirect_uris: uris,
            public: secret_hash.is_none(),
            created_by: r.text(4)?,
            created_at: r.int(5)?,
        },
        secret_hash,
    })
}

const TOKEN_COLUMNS: &str = "kind, client_id, family, grant_json, audience, issued_at, expires_at, revoked_at";

fn token_row(r: &Row) -> Result<StoredToken, ApiError> {
    let kind = match r.text(0)?.as_str() {
        "access" => TokenKind::Access,
        "refresh" => TokenKind::Refresh,
        other => return Err(ApiError::internal(format!("state store: token kind {other:?}"))),
    };
    Ok(StoredToken {
        kind,
        client_id: r.text(1)?,
        family: r.text(2)?,
        grant: r.text(3)?,
        audience: r.text(4)?,
        issued_at: r.int(5)?,
        expires_at: r.int(6)?,
        revoked: r.opt_int(7)?.is_some(),
    })
}

/// How long spent codes and dead tokens are kept before they are swept
/// (long enough to recognise a replayed code and revoke its family).
const KEEP_DEAD_SECS: i64 = 24 * 3600;

impl Db {
    /// Registers a client; `secret_hash` `None` makes it public.
    pub fn idp_create_client(
        &mut self,
        client_id: &str,
        name: &str,
        redirect_uris: &[String],
        secret_hash: Option<[u8; 32]>,
        created_by: &str,
        now: i64,
    ) -> Result<IdpClient, ApiError> {
        let uris = serde_json::to_string(redirect_uris).map_err(|e| ApiError::internal(e.to_string()))?;
        let n = self.conn().execute(
            "INSERT INTO idp_clients (client_id, name, redirect_uris, secret_hash, created_by, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client_id) DO NOTHING",
            params![client_id, name, uris, secret_hash.as_ref().map(|h| hex(h)), created_by, now],
        )?;
        if n == 0 {
            return Err(ApiError::conflict(format!("client {client_id:?} exists")));
        }
        Ok(IdpClient {
            client_id: client_id.into(),
            name: name.into(),
            redirect_uris: redirect_uris.to_vec(),
            public: secret_hash.is_none(),
            created_by: created_by.into(),
            created_at: now,
        })
    }

    /// Every client, oldest first.
    pub fn idp_clients(&mut self) -> Result<Vec<IdpClient>, ApiError> {
        self.conn()
            .query(&format!("SELECT {CLIENT_COLUMNS} FROM idp_clients ORDER BY id"), &[])?
            .iter()
            .map(|r| client_row(r).map(|c| c.info))
            .collect()
    }

    /// One client with its secret's hash.
    pub fn idp_client(&mut self, client_id: &str) -> Result<Option<StoredClient>, ApiError> {
        self.conn()
            .query_opt(&format!("SELECT {CLIENT_COLUMNS} FROM idp_clients WHERE client_id = $1"), params![client_id])?
            .map(|r| client_row(&r))
            .transpose()
    }

    /// Removes a client with its codes and tokens; false when there was none.
    pub fn idp_remove_client(&mut self, client_id: &str) -> Result<bool, ApiError> {
        self.conn().transaction(None, |c| {
            c.execute("DELETE FROM idp_codes WHERE client_id = $1", params![client_id])?;
            c.execute("DELETE FROM idp_tokens WHERE client_id = $1", params![client_id])?;
            Ok(c.execute("DELETE FROM idp_clients WHERE client_id = $1", params![client_id])? > 0)
        })
    }

    /// Stores a fresh code under its hash, sweeping long-dead codes.
    pub fn idp_put_code(&mut self, code_hash: &[u8; 32], code: &StoredCode, now: i64) -> Result<(), ApiError> {
        self.conn().transaction(None, |c| {
            c.execute("DELETE FROM idp_codes WHERE expires_at < $1", params![now - KEEP_DEAD_SECS])?;
            c.execute(
                "INSERT INTO idp_codes (code_hash, client_id, redirect_uri, code_challenge, grant_json, family, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                params![
                    &code_hash[..],
                    &code.client_id,
                    &code.redirect_uri,
                    &code.code_challenge,
                    &code.grant,
                    &code.family,
                    code.expires_at
                ],
            )?;
            Ok(())
        })
    }

    /// Spends a code: the first presentation gets it (expired or not: the
    /// caller checks), any later one revokes every token of its family.
    pub fn idp_take_code(&mut self, code_hash: &[u8; 32], now: i64) -> Result<CodeUse, ApiError> {
        self.conn().transaction(None, |c| {
            let spent = c.execute(
                "UPDATE idp_codes SET used_at = $2 WHERE code_hash = $1 AND used_at IS NULL",
                params![&code_hash[..], now],
            )?;
            let Some(r) = c.query_opt(
                "SELECT client_id, redirect_uri, code_challenge, grant_json, family, expires_at
                 FROM idp_codes WHERE code_hash = $1",
                params![&code_hash[..]],
            )?
            else {
                return Ok(CodeUse::Unknown);
            };
            let code = StoredCode {
                client_id: r.text(0)?,
                redirect_uri: r.text(1)?,
                code_challenge: r.text(2)?,
                grant: r.text(3)?,
                family: r.text(4)?,
                expires_at: r.int(5)?,
            };
            if spent == 1 {
                Ok(CodeUse::Fresh(code))
            } else {
                c.execute(
                    "UPDATE idp_tokens SET revoked_at = $2 WHERE family = $1 AND revoked_at IS NULL",
                    params![&code.family, now],
                )?;
                Ok(CodeUse::Reused)
            }
        })
    }

    /// Stores issued tokens under their hashes, in one transaction (a
    /// response's access and refresh tokens exist together or not at all),
    /// sweeping long-dead tokens.
    pub fn idp_put_tokens(&mut self, tokens: &[([u8; 32], StoredToken)], now: i64) -> Result<(), ApiError> {
        self.conn().transaction(None, |c| {
            c.execute("DELETE FROM idp_tokens WHERE expires_at < $1", params![now - KEEP_DEAD_SECS])?;
            for (hash, t) in tokens {
                c.execute(
                    "INSERT INTO idp_tokens (token_hash, kind, client_id, family, grant_json, audience, issued_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    params![
                        &hash[..],
                        t.kind.as_str(),
                        &t.client_id,
                        &t.family,
                        &t.grant,
                        &t.audience,
                        t.issued_at,
                        t.expires_at
                    ],
                )?;
            }
            Ok(())
        })
    }

    /// A token by its hash (revoked or not).
    pub fn idp_token(&mut self, token_hash: &[u8; 32]) -> Result<Option<StoredToken>, ApiError> {
        self.conn()
            .query_opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM idp_tokens WHERE token_hash = $1"),
                params![&token_hash[..]],
            )?
            .map(|r| token_row(&r))
            .transpose()
    }

    /// Rotates a refresh token: a live one is revoked and returned; a
    /// revoked one revokes its whole family.
    pub fn idp_use_refresh(&mut self, token_hash: &[u8; 32], now: i64) -> Result<RefreshUse, ApiError> {
        self.conn().transaction(None, |c| {
            let used = c.execute(
                "UPDATE idp_tokens SET revoked_at = $2 WHERE token_hash = $1 AND kind = 'refresh' AND revoked_at IS NULL",
                params![&token_hash[..], now],
            )?;
            let Some(r) = c.query_opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM idp_tokens WHERE token_hash = $1 AND kind = 'refresh'"),
                params![&token_hash[..]],
            )?
            else {
                return Ok(RefreshUse::Unknown);
            };
            let t = token_row(&r)?;
            if used == 1 {
                Ok(RefreshUse::Fresh(t))
            } else {
                c.execute(
                    "UPDATE idp_tokens SET revoked_at = $2 WHERE family = $1 AND revoked_at IS NULL",
                    params![&t.family, now],
                )?;
                Ok(RefreshUse::Reused)
            }
        })
    }

    /// Revokes one token (RFC 7009); a refresh token takes its family with
    /// it (section 2.1: the access tokens issued with it). Returns whether
    /// anything was revoked.
    pub fn idp_revoke_token(&mut self, token_hash: &[u8; 32], now: i64) -> Result<bool, ApiError> {
        self.conn().transaction(None, |c| {
            let Some(r) = c.query_opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM idp_tokens WHERE token_hash = $1"),
                params![&token_hash[..]],
            )?
            else {
                return Ok(false);
            };
            let t = token_row(&r)?;
            let n = match t.kind {
                TokenKind::Refresh => c.execute(
                    "UPDATE idp_tokens SET revoked_at = $2 WHERE family = $1 AND revoked_at IS NULL",
                    params![&t.family, now],
                )?,
                TokenKind::Access => c.execute(
                    "UPDATE idp_tokens SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL",
                    params![&token_hash[..], now],
                )?,
            };
            Ok(n > 0)
        })
    }
}

impl App {
    /// Runs `f` on the store off the async workers (the OIDC provider's
    /// queries, which live outside the control module).
    pub async fn idp_store<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Db) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.with_db(f).await
    }
}

/// Schema step 12 (appended to [`super::db`]'s list).
pub(super) const MIGRATION: &str = "CREATE TABLE idp_clients (
        id {id},
        client_id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        redirect_uris TEXT NOT NULL,
        secret_hash TEXT,
        created_by TEXT NOT NULL,
        created_at {int} NOT NULL
    );
    CREATE TABLE idp_codes (
        code_hash {blob} PRIMARY KEY,
        client_id TEXT NOT NULL,
        redirect_uri TEXT NOT NULL,
        code_challenge TEXT NOT NULL,
        grant_json TEXT NOT NULL,
        family TEXT NOT NULL,
        expires_at {int} NOT NULL,
        used_at {int}
    );
    CREATE TABLE idp_tokens (
        token_hash {blob} PRIMARY KEY,
        kind TEXT NOT NULL,
        client_id TEXT NOT NULL,
        family TEXT NOT NULL,
        grant_json TEXT NOT NULL,
        audience TEXT NOT NULL,
        issued_at {int} NOT NULL,
        expires_at {int} NOT NULL,
        revoked_at {int}
    );
    CREATE INDEX idp_tokens_family ON idp_tokens (family);
    CREATE INDEX idp_tokens_client ON idp_tokens (client_id);
    CREATE INDEX idp_codes_client ON idp_codes (client_id);";

/// `POST /v1/admin/idp/clients`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateClientRequest {
    /// A name for people.
    #[serde(default)]
    pub name: String,
    /// Redirect URIs, matched exactly.
    pub redirect_uris: Vec<String>,
    /// A public client (no secret; PKCE alone).
    #[serde(default)]
    pub public: bool,
}

/// The answer to [`CreateClientRequest`]: the secret is shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedClient {
    /// The client.
    pub client: IdpClient,
    /// A confidential client's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

/// The admin API's `idp/…` routes (the admin token is already checked).
pub(super) async fn admin(
    app: &Arc<App>,
    segments: &[&str],
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<super::server::Body>, ApiError> {
    use super::server::{json_response, read_json};
    use hyper::Method;
    let method = req.method().clone();
    match (segments, &method) {
        (["clients"], &Method::GET) => Ok(json_response(200, &app.idp_store(|db| db.idp_clients()).await?)),
        (["clients"], &Method::POST) => {
            let r: CreateClientRequest = read_json(req).await?;
            let n = crate::identity::provider::create_client(app, &r.name, r.redirect_uris, r.public, "admin").await?;
            Ok(json_response(200, &CreatedClient { client: n.client, client_secret: n.secret }))
        }
        (["clients", id], &Method::DELETE) => {
            let id = id.to_string();
            let shown = id.clone();
            if app.idp_store(move |db| db.idp_remove_client(&id)).await? {
                Ok(json_response(200, &serde_json::json!({ "removed": shown })))
            } else {
                Err(ApiError::not_found("no such client"))
            }
        }
        (["clients", ..], _) => Err(ApiError::new(405, "method_not_allowed", "method not allowed")),
        _ => Err(ApiError::not_found("no such endpoint")),
    }
}
