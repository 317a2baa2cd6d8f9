//! The OpenID Connect provider for people: the authorization code flow
//! with PKCE (S256 only), refresh tokens with rotation, userinfo,
//! introspection (RFC 7662), revocation (RFC 7009), token exchange
//! (RFC 8693, off unless a grant allows it), dynamic client registration
//! (RFC 7591, where a grant allows it) and a page for administering
//! clients. See docs/identity.md, section "OIDC provider".
//!
//! The person signing in is the owner of the node the request comes from
//! ([`Caller::user`]); the identity service resolved it from the tailnet
//! before calling [`Provider::handle`]. Access and refresh tokens are
//! opaque (32 random bytes, stored hashed, so they can be revoked and
//! introspected); ID tokens are JWTs signed with the identity key set.

// The helpers' `Err` is the finished error response, returned once per
// request straight to the client: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

pub mod form;

use crate::control::db::hash_secret;
use crate::control::proto::hex;
use crate::control::provider_store::{
    CodeUse, IdpClient, RefreshUse, StoredClient, StoredCode, StoredToken, TokenKind,
};
use crate::control::server::App;
use crate::control::ApiError;
use crate::identity::caller::Caller;
use crate::identity::jwt::{self, Claims};
use crate::identity::keys::KeySet;
use crate::identity::{b64url, oidc};
use bytes::Bytes;
use form::Form;
use http::{header, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The grant capability that configures the provider for a caller:
/// `extraClaims` (an object merged into ID tokens and userinfo),
/// `allowAdminUI`, `allowDynamicRegistration`, `allowTokenExchange`.
pub const CAP_IDP: &str = "wiremesh.dev/cap/idp";
/// Where the provider's endpoints live under the service's base URL.
pub const PREFIX: &str = "/oidc";
/// RFC 8693's grant type.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693's token type for access tokens.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// How long a code lives (RFC 6749 section 4.1.2 recommends at most 10 minutes).
pub const CODE_SECS: i64 = 60;
/// How long an access token (and an ID token) lives.
pub const ACCESS_SECS: i64 = 3600;
/// How long a refresh token lives (each rotation starts a new one).
pub const REFRESH_SECS: i64 = 30 * 24 * 3600;
/// How long a consent or admin form stays valid.
const FORM_SECS: i64 = 600;
/// Claims `extraClaims` may not replace.
const RESERVED_CLAIMS: &[&str] =
    &["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "nonce", "auth_time", "azp", "at_hash", "c_hash", "act"];

/// Where the provider gets the identity key set that signs ID tokens: the
/// service's current set, read at every signing (it rotates); `None` once
/// the service is gone (the provider then issues nothing).
pub type KeySource = Arc<dyn Fn() -> Option<Arc<KeySet>> + Send + Sync>;

/// The OIDC provider.
pub struct Provider {
    app: Arc<App>,
    keys: KeySource,
    issuer: String,
    base_url: String,
    form_key: ring::hmac::Key,
}

/// A sign-in, as codes and tokens carry it in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignIn {
    /// The person's stable id.
    sub: String,
    /// `email`, `name`, `preferred_username`, `groups` and extra claims.
    claims: Map<String, Value>,
    /// The granted scopes, space-separated.
    scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    /// When the person signed in (Unix seconds).
    auth_time: i64,
    /// For exchanged tokens: the client that exchanged (RFC 8693 `act`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    act: Option<String>,
}

/// An endpoint's answer before it is a response.
type Answer = Response<Bytes>;

fn now() -> i64 {
    crate::control::db::unix_now()
}

fn random_token(prefix: &str) -> Result<String, Answer> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "no randomness"))?;
    Ok(format!("{prefix}{}", hex(&b)))
}

fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_str(content_type).unwrap_or(header::HeaderValue::from_static("text/plain")),
    );
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, header::HeaderValue::from_static("no-cache"));
    r
}

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    response(status, "application/json", serde_json::to_vec(body).unwrap_or_default())
}

/// An OAuth error body (RFC 6749 section 5.2), with the project's `code`
/// beside it.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Answer {
    json_answer(status, &json!({ "error": error, "error_description": description, "code": error }))
}

/// 401 `invalid_client` with the challenge RFC 6749 section 5.2 asks for.
fn invalid_client(description: &str) -> Answer {
    let mut r = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"wiremesh\""));
    r
}

fn bad(error: &str, description: &str) -> Answer {
    oauth_error(StatusCode::BAD_REQUEST, error, description)
}

fn store_error(e: ApiError) -> Answer {
    oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &e.message)
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Answer {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{t}</title><style>body{{font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em}}\
         button{{font-size:1em;margin-right:1em}}td,th{{text-align:left;padding:.2em .6em}}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    );
    let mut r = response(status, "text/html; charset=utf-8", html);
    // The pages carry forms: never framed (clickjacking).
    r.headers_mut().insert("x-frame-options", header::HeaderValue::from_static("DENY"));
    r.headers_mut().insert(
        "content-security-policy",
        header::HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' http: https:; frame-ancestors 'none'",
        ),
    );
    r
}

fn error_page(description: &str) -> Answer {
    page(StatusCode::BAD_REQUEST, "Sign-in refused", &format!("<p>{}</p>", esc(description)))
}

/// A redirect to `uri` with `params` added to its query.
fn redirect(uri: &str, params: &[(&str, &str)]) -> Answer {
    let sep = if uri.contains('?') { '&' } else { '?' };
    let target = format!("{uri}{sep}{}", form::encode(params.iter().copied()));
    let mut r = response(StatusCode::SEE_OTHER, "text/plain", Bytes::new());
    match header::HeaderValue::from_str(&target) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            r
        }
        Err(_) => error_page("the redirect URI cannot be used"),
    }
}

/// Whether `s` is a PKCE verifier (RFC 7636 section 4.1) or an S256
/// challenge's shape (43 characters of base64url).
fn pkce_chars(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

fn s256(verifier: &str) -> String {
    b64url(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Checks a redirect URI for registration: an absolute `http` or `https`
/// URL with a host, no fragment, no user info, at most 2000 bytes.
pub fn check_redirect_uri(uri: &str) -> Result<(), String> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))
        .ok_or_else(|| format!("redirect URI {uri:?} must be an http:// or https:// URL"))?;
    let host = rest.split(['/', '?']).next().unwrap_or("");
    if uri.len() > 2000
        || uri.contains('#')
        || host.is_empty()
        || host.contains('@')
        || uri.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("redirect URI {uri:?} needs a host, and no fragment, user info or spaces"));
    }
    Ok(())
}

/// What a new client is: its stored form and its secret (shown once).
pub struct NewClient {
    /// The client.
    pub client: IdpClient,
    /// The secret of a confidential client.
    pub secret: Option<String>,
}

/// Registers a client (admin API, admin page, dynamic registration).
pub async fn create_client(
    app: &Arc<App>,
    name: &str,
    redirect_uris: Vec<String>,
    public: bool,
    created_by: &str,
) -> Result<NewClient, ApiError> {
    if redirect_uris.is_empty() || redirect_uris.len() > 16 {
        return Err(ApiError::new(400, "invalid_redirect_uri", "give 1 to 16 redirect URIs"));
    }
    for u in &redirect_uris {
        check_redirect_uri(u).map_err(|e| ApiError::new(400, "invalid_redirect_uri", &e))?;
    }
    if name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::new(400, "invalid_client_metadata", "the client name must be at most 100 characters"));
    }
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| ApiError::internal("no randomness".into()))?;
    let client_id = format!("wmc_{}", hex(&id));
    let secret = if public {
        None
    } else {
        let mut s = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
            .map_err(|_| ApiError::internal("no randomness".into()))?;
        Some(format!("wmcs_{}", hex(&s)))
    };
    let hash = secret.as_deref().map(hash_secret);
    let (name, created_by) = (name.to_string(), created_by.to_string());
    let client = app
        .idp_store(move |db| db.idp_create_client(&client_id, &name, &redirect_uris, hash, &created_by, now()))
        .await?;
    Ok(NewClient { client, secret })
}

/// The authorization request's parameters (RFC 6749 section 4.1.1, RFC
/// 7636 section 4.3, OpenID Connect Core section 3.1.2.1).
const AUTHORIZE_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
];

impl Provider {
    /// A provider issuing ID tokens as `issuer` with `keys`, whose endpoints
    /// live under `base_url` (the identity service's tailnet URL).
    pub fn new(app: Arc<App>, keys: KeySource, issuer: &str, base_url: &str) -> Result<Provider, ApiError> {
        let issuer = oidc::check_issuer(issuer).map_err(|e| ApiError::internal(e.to_string()))?;
        let form_key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .map_err(|_| ApiError::internal("no randomness".into()))?;
        Ok(Provider { app, keys, issuer, base_url: base_url.trim_end_matches('/').to_string(), form_key })
    }

    /// The discovery fields the provider adds to the identity service's
    /// OpenID configuration (endpoints, grant types, client authentication).
    pub fn discovery_fields(&self) -> Map<String, Value> {
        let b = format!("{}{PREFIX}", self.base_url);
        let v = json!({
            "authorization_endpoint": format!("{b}/authorize"),
            "token_endpoint": format!("{b}/token"),
            "userinfo_endpoint": format!("{b}/userinfo"),
            "introspection_endpoint": format!("{b}/introspect"),
            "revocation_endpoint": format!("{b}/revoke"),
            "registration_endpoint": format!("{b}/register"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token", TOKEN_EXCHANGE],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "profile", "email", "groups", "offline_access"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "email", "name", "preferred_username", "groups"],
            "authorization_response_iss_parameter_supported": true,
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// Answers `req` when its path is the provider's (`/oidc/…`); `None`
    /// otherwise, for the service's router to answer.
    pub async fn handle(&self, caller: &Caller, req: Request<Bytes>) -> Option<Response<Bytes>> {
        let path = req.uri().path().strip_prefix(PREFIX)?.to_string();
        let m = req.method().clone();
        Some(match (path.as_str(), m) {
            ("/authorize", Method::GET) => {
                let form = match Form::parse(req.uri().query().unwrap_or("").as_bytes()) {
                    Ok(f) => f,
                    Err(e) => return Some(error_page(&e.to_string())),
                };
                self.authorize(caller, &form, None).await
            }
            ("/authorize", Method::POST) => match self.post_form(&req, true) {
                Ok(form) => {
                    let decision = form.get("decision").map(str::to_string);
                    self.authorize(caller, &form, Some(decision)).await
                }
                Err(a) => a,
            },
            ("/token", Method::POST) => self.token(caller, &req).await,
            ("/userinfo", Method::GET | Method::POST) => self.userinfo(&req).await,
            ("/introspect", Method::POST) => self.introspect(&req).await,
            ("/revoke", Method::POST) => self.revoke(&req).await,
            ("/register", Method::POST) => self.register(caller, &req).await,
            ("/admin", Method::GET) => self.admin_page(caller, None).await,
            ("/admin", Method::POST) => self.admin_post(caller, &req).await,
            ("/authorize" | "/token" | "/userinfo" | "/introspect" | "/revoke" | "/register" | "/admin", _) => {
                oauth_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", "method not allowed")
            }
            _ => return None,
        })
    }

    /// A form body, refusing other content types. For the pages' own forms
    /// (`page_form`), a browser's post from anywhere but the service's own
    /// origin is refused as well (`Origin`, including `null`, and
    /// `Sec-Fetch-Site`), on top of the CSRF token those forms carry.
    fn post_form(&self, req: &Request<Bytes>, page_form: bool) -> Result<Form, Answer> {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(bad("invalid_request", "the body must be application/x-www-form-urlencoded"));
        }
        if page_form {
            let cross = |why: &str| oauth_error(StatusCode::FORBIDDEN, "access_denied", why);
            if let Some(origin) = req.headers().get(header::ORIGIN) {
                if origin.as_bytes() != self.origin().as_bytes() {
                    return Err(cross("a form post from another origin is refused"));
                }
            }
            if let Some(site) = req.headers().get("sec-fetch-site") {
                if site.as_bytes() != b"same-origin" && site.as_bytes() != b"none" {
                    return Err(cross("a form post from another site is refused"));
                }
            }
        }
        Form::parse(req.body()).map_err(|e| bad("invalid_request", &e.to_string()))
    }

    /// The service's origin (`scheme://host[:port]` of the base URL).
    fn origin(&self) -> &str {
        let after = self.base_url.find("://").map_or(0, |i| i + 3);
        let end = self.base_url[after..].find('/').map_or(self.base_url.len(), |i| after + i);
        &self.base_url[..end]
    }

    /// A form token binding `payload` to the caller's node for a while:
    /// `time || HMAC(node, purpose, time, payload)`, base64url.
    fn form_token(&self, caller: &Caller, purpose: &str, payload: &str, at: i64) -> String {
        let msg = format!("{}\0{purpose}\0{at}\0{payload}", caller.node.id);
        let tag = ring::hmac::sign(&self.form_key, msg.as_bytes());
        let mut raw = at.to_be_bytes().to_vec();
        raw.extend_from_slice(tag.as_ref());
        b64url(&raw)
    }

    fn check_form_token(&self, caller: &Caller, purpose: &str, payload: &str, token: Option<&str>) -> bool {
        let Some(raw) = token.and_then(crate::identity::unb64url) else { return false };
        if raw.len() != 8 + 32 {
            return false;
        }
        let at = i64::from_be_bytes(raw[..8].try_into().unwrap_or([0; 8]));
        let t = now();
        if at > t + 5 || t - at > FORM_SECS {
            return false;
        }
        let want = self.form_token(caller, purpose, payload, at);
        ct_eq(want.as_bytes(), b64url(&raw).as_bytes())
    }

    async fn client(&self, client_id: &str) -> Result<Option<StoredClient>, Answer> {
        let id = client_id.to_string();
        self.app.idp_store(move |db| db.idp_client(&id)).await.map_err(store_error)
    }

    /// `/authorize`: validates the request, then shows the consent page
    /// (GET) or, on the page's post, issues a code (`decision` = `allow`).
    async fn authorize(&self, caller: &Caller, form: &Form, decision: Option<Option<String>>) -> Answer {
        // Until the client and its redirect URI are known good, errors are
        // shown here, never redirected (RFC 6749 section 4.1.2.1).
        let Some(client_id) = form.get("client_id") else { return error_page("client_id is missing") };
        let client = match self.client(client_id).await {
            Ok(Some(c)) => c,
            Ok(None) => return error_page("no such client"),
            Err(a) => return a,
        };
        let Some(redirect_uri) = form.get("redirect_uri") else { return error_page("redirect_uri is missing") };
        if !client.info.redirect_uris.iter().any(|u| u == redirect_uri) {
            return error_page("the redirect_uri is not registered for this client");
        }
        let state = form.get("state");
        let iss = self.issuer.as_str();
        let fail = |error: &str, description: &str| {
            let mut p = vec![("error", error), ("error_description", description), ("iss", iss)];
            if let Some(s) = state {
                p.push(("state", s));
            }
            redirect(redirect_uri, &p)
        };
        if form.get("response_type") != Some("code") {
            return fail("unsupported_response_type", "only response_type=code is supported");
        }
        let Some(challenge) = form.get("code_challenge") else {
            return fail("invalid_request", "PKCE is required: code_challenge is missing");
        };
        if form.get("code_challenge_method") != Some("S256") {
            return fail("invalid_request", "PKCE code_challenge_method must be S256 (plain is refused)");
        }
        if challenge.len() != 43 || !pkce_chars(challenge) {
            return fail("invalid_request", "code_challenge must be 43 base64url characters (S256)");
        }
        let scope = form.get("scope").unwrap_or("");
        if !scope.split(' ').any(|s| s == "openid") {
            return fail("invalid_scope", "the scope must include openid");
        }
        if form.get("nonce").is_some_and(|n| n.len() > 512) || state.is_some_and(|s| s.len() > 1024) {
            return fail("invalid_request", "state or nonce is too long");
        }
        let Some(user) = &caller.user else {
            return fail("access_denied", "tagged nodes cannot sign in as a person");
        };
        let payload =
            form::encode(AUTHORIZE_PARAMS.iter().filter_map(|&k| form.get(k).map(|v| (k, v))).collect::<Vec<_>>());
        let Some(decision) = decision else {
            return self.consent_page(caller, &client.info, user, form, &payload);
        };
        if !self.check_form_token(caller, "consent", &payload, form.get("csrf")) {
            return error_page("this confirmation form is stale or was not ours; start the sign-in again");
        }
        if decision.as_deref() != Some("allow") {
            return fail("access_denied", "the person declined");
        }
        let sign_in = match self.sign_in(caller, scope, form.get("nonce")).await {
            Ok(s) => s,
            Err(a) => return a,
        };
        let (code, family) = match (random_token("wmac_"), random_token("")) {
            (Ok(c), Ok(f)) => (c, f),
            (Err(a), _) | (_, Err(a)) => return a,
        };
        let stored = StoredCode {
            client_id: client.info.client_id.clone(),
            redirect_uri: redirect_uri.to_string(),
            code_challenge: challenge.to_string(),
            grant: serde_json::to_string(&sign_in).unwrap_or_default(),
            family,
            expires_at: now() + CODE_SECS,
        };
        let hash = hash_secret(&code);
        if let Err(e) = self.app.idp_store(move |db| db.idp_put_code(&hash, &stored, now())).await {
            return store_error(e);
        }
        let mut p = vec![("code", code.as_str()), ("iss", iss)];
        if let Some(s) = state {
            p.push(("state", s));
        }
        redirect(redirect_uri, &p)
    }

    fn consent_page(
        &self,
        caller: &Caller,
        client: &IdpClient,
        user: &crate::identity::caller::User,
        form: &Form,
        payload: &str,
    ) -> Answer {
        let csrf = self.form_token(caller, "consent", payload, now());
        let mut hidden = String::new();
        for &k in AUTHORIZE_PARAMS {
            if let Some(v) = form.get(k) {
                hidden.push_str(&format!("<input type=\"hidden\" name=\"{k}\" value=\"{}\">", esc(v)));
            }
        }
        let body = format!(
            "<p><b>{client}</b> asks to sign you in as <b>{login}</b> ({name}), from node <b>{node}</b>.</p>\
             <p>It will see your e-mail address, name and groups.</p>\
             <form method=\"post\" action=\"{PREFIX}/authorize\">{hidden}\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
            client = esc(if client.name.is_empty() { &client.client_id } else { &client.name }),
            login = esc(&user.login),
            name = esc(&user.display_name),
            node = esc(&caller.node.name),
        );
        page(StatusCode::OK, "Sign in", &body)
    }

    /// The sign-in of the caller's owner: the stable id and the claims.
    async fn sign_in(&self, caller: &Caller, scope: &str, nonce: Option<&str>) -> Result<SignIn, Answer> {
        let Some(user) = &caller.user else {
            return Err(bad("access_denied", "tagged nodes cannot sign in as a person"));
        };
        let login = user.login.clone();
        let stored = self.app.idp_store(move |db| db.user_by_login(&login)).await.map_err(store_error)?;
        // The user's row id is stable across renames of the display name; a
        // node owned by the tailnet's admin (no user row) is `admin`.
        let sub = stored.map_or_else(|| user.login.clone(), |u| u.id.to_string());
        let mut claims = Map::new();
        if user.login.contains('@') {
            claims.insert("email".into(), json!(user.login));
        }
        let name = if user.display_name.is_empty() { &user.login } else { &user.display_name };
        claims.insert("name".into(), json!(name));
        claims.insert("preferred_username".into(), json!(user.login));
        claims.insert("groups".into(), json!(user.groups));
        for v in caller.capability(CAP_IDP) {
            if let Some(Value::Object(extra)) = v.get("extraClaims") {
                for (k, v) in extra {
                    if !RESERVED_CLAIMS.contains(&k.as_str()) {
                        claims.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        Ok(SignIn { sub, claims, scope: scope.into(), nonce: nonce.map(str::to_string), auth_time: now(), act: None })
    }

    /// Authenticates the client of a token, introspection or revocation
    /// request (RFC 6749 section 2.3): Basic, or the secret in the body,
    /// or a public client's id alone.
    async fn authenticate(&self, req: &Request<Bytes>, form: &Form) -> Result<StoredClient, Answer> {
        let basic = match req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            Some(h) => Some(form::basic_credentials(h).ok_or_else(|| invalid_client("malformed Basic credentials"))?),
            None => None,
        };
        let (id, secret) = match (basic, form.get("client_secret")) {
            (Some(_), Some(_)) => return Err(bad("invalid_request", "use one client authentication method, not two")),
            (Some((id, secret)), None) => {
                if form.get("client_id").is_some_and(|c| c != id) {
                    return Err(bad("invalid_request", "client_id differs from the Basic credentials"));
                }
                (id, Some(secret))
            }
            (None, secret) => match form.get("client_id") {
                Some(id) => (id.to_string(), secret.map(str::to_string)),
                None => return Err(invalid_client("client authentication is missing")),
            },
        };
        // Wiped when dropped, whatever the outcome.
        let secret = secret.map(zeroize::Zeroizing::new);
        let client = self.client(&id).await?.ok_or_else(|| invalid_client("unknown client"))?;
        match (&client.secret_hash, secret) {
            (None, None) => Ok(client),
            (None, Some(_)) => Err(invalid_client("a public client has no secret")),
            (Some(_), None) => Err(invalid_client("this client must authenticate with its secret")),
            (Some(want), Some(got)) => {
                if ct_eq(want, &hash_secret(got.as_str())) {
                    Ok(client)
                } else {
                    Err(invalid_client("wrong client secret"))
                }
            }
        }
    }

    /// A POSTed form from an authenticated client: how the token,
    /// introspection and revocation endpoints start.
    async fn client_form(&self, req: &Request<Bytes>) -> Result<(Form, StoredClient), Answer> {
        let form = self.post_form(req, false)?;
        let client = self.authenticate(req, &form).await?;
        Ok((form, client))
    }

    async fn token(&self, caller: &Caller, req: &Request<Bytes>) -> Answer {
        let (form, client) = match self.client_form(req).await {
            Ok(fc) => fc,
            Err(a) => return a,
        };
        let r = match form.get("grant_type") {
            None => Err(bad("invalid_request", "grant_type is missing")),
            Some("authorization_code") => self.code_grant(&client, &form).await,
            Some("refresh_token") => self.refresh_grant(&client, &form).await,
            Some(TOKEN_EXCHANGE) => self.exchange_grant(caller, &client, &form).await,
            Some(_) => Err(bad(
                "unsupported_grant_type",
                "grant_type must be authorization_code, refresh_token or token exchange",
            )),
        };
        r.unwrap_or_else(|a| a)
    }

    async fn code_grant(&self, client: &StoredClient, form: &Form) -> Result<Answer, Answer> {
        let (Some(code), Some(redirect_uri), Some(verifier)) =
            (form.get("code"), form.get("redirect_uri"), form.get("code_verifier"))
        else {
            return Err(bad("invalid_request", "code, redirect_uri and code_verifier are required"));
        };
        if !(43..=128).contains(&verifier.len()) || !pkce_chars(verifier) {
            return Err(bad("invalid_request", "code_verifier must be 43-128 unreserved characters"));
        }
        let hash = hash_secret(code);
        let t = now();
        let code = match self.app.idp_store(move |db| db.idp_take_code(&hash, t)).await.map_err(store_error)? {
            CodeUse::Fresh(c) => c,
            CodeUse::Unknown => return Err(bad("invalid_grant", "unknown authorization code")),
            CodeUse::Reused => {
                return Err(bad("invalid_grant", "the code was already used; the tokens issued from it are revoked"))
            }
        };
        if code.client_id != client.info.client_id {
            return Err(bad("invalid_grant", "the code was issued to another client"));
        }
        if t > code.expires_at {
            return Err(bad("invalid_grant", "the code has expired"));
        }
        if code.redirect_uri != redirect_uri {
            return Err(bad("invalid_grant", "redirect_uri differs from the authorization request's"));
        }
        if !ct_eq(s256(verifier).as_bytes(), code.code_challenge.as_bytes()) {
            return Err(bad("invalid_grant", "PKCE verification failed"));
        }
        let sign_in: SignIn = serde_json::from_str(&code.grant)
            .map_err(|e| oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &e.to_string()))?;
        self.issue(client, &sign_in, &code.family, true).await
    }

    async fn refresh_grant(&self, client: &StoredClient, form: &Form) -> Result<Answer, Answer> {
        let Some(token) = form.get("refresh_token") else {
            return Err(bad("invalid_request", "refresh_token is missing"));
        };
        let hash = hash_secret(token);
        let t = now();
        let old = match self.app.idp_store(move |db| db.idp_use_refresh(&hash, t)).await.map_err(store_error)? {
            RefreshUse::Fresh(old) => old,
            RefreshUse::Unknown => return Err(bad("invalid_grant", "unknown refresh token")),
            RefreshUse::Reused => {
                return Err(bad(
                    "invalid_grant",
                    "the refresh token was already used or revoked; its family is revoked",
                ))
            }
        };
        if old.client_id != client.info.client_id {
            return Err(bad("invalid_grant", "the refresh token was issued to another client"));
        }
        if t > old.expires_at {
            return Err(bad("invalid_grant", "the refresh token has expired"));
        }
        let mut sign_in: SignIn = serde_json::from_str(&old.grant)
            .map_err(|e| oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &e.to_string()))?;
        if let Some(scope) = form.get("scope") {
            let granted: Vec<&str> = sign_in.scope.split(' ').collect();
            if !scope.split(' ').all(|s| granted.contains(&s)) {
                return Err(bad("invalid_scope", "a refresh may only narrow the granted scope"));
            }
            sign_in.scope = scope.to_string();
        }
        // A refreshed ID token carries no nonce (OpenID Connect Core 12.2).
        sign_in.nonce = None;
        self.issue(client, &sign_in, &old.family, true).await
    }

    async fn exchange_grant(&self, caller: &Caller, client: &StoredClient, form: &Form) -> Result<Answer, Answer> {
        if !allowed(caller, "allowTokenExchange") {
            return Err(bad(
                "unauthorized_client",
                "token exchange is not allowed for this caller (grant wiremesh.dev/cap/idp allowTokenExchange)",
            ));
        }
        let (Some(subject), Some(kind), Some(audience)) =
            (form.get("subject_token"), form.get("subject_token_type"), form.get("audience"))
        else {
            return Err(bad("invalid_request", "subject_token, subject_token_type and audience are required"));
        };
        if kind != ACCESS_TOKEN_TYPE || form.get("requested_token_type").is_some_and(|t| t != ACCESS_TOKEN_TYPE) {
            return Err(bad("invalid_request", "only access tokens are exchanged, for access tokens"));
        }
        if form.get("actor_token").is_some() {
            return Err(bad("invalid_request", "actor tokens are not supported; the client is the actor"));
        }
        if self.client(audience).await?.is_none() {
            return Err(bad("invalid_target", "the audience is not a registered client"));
        }
        let hash = hash_secret(subject);
        let t = now();
        let st = self.app.idp_store(move |db| db.idp_token(&hash)).await.map_err(store_error)?;
        let Some(st) = st.filter(|s| live(s, t) && s.kind == TokenKind::Access) else {
            return Err(bad("invalid_grant", "the subject token is not a live access token"));
        };
        if st.audience != client.info.client_id {
            return Err(bad("invalid_grant", "the subject token was not issued to this client"));
        }
        let mut sign_in: SignIn = serde_json::from_str(&st.grant)
            .map_err(|e| oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &e.to_string()))?;
        sign_in.act = Some(client.info.client_id.clone());
        sign_in.nonce = None;
        let access = random_token("wmat_")?;
        let stored = StoredToken {
            kind: TokenKind::Access,
            client_id: client.info.client_id.clone(),
            family: st.family.clone(),
            grant: serde_json::to_string(&sign_in).unwrap_or_default(),
            audience: audience.to_string(),
            issued_at: t,
            expires_at: t.saturating_add(ACCESS_SECS).min(st.expires_at),
            revoked: false,
        };
        let expires_in = stored.expires_at - t;
        let hash = hash_secret(&access);
        self.app.idp_store(move |db| db.idp_put_tokens(&[(hash, stored)], t)).await.map_err(store_error)?;
        Ok(json_answer(
            StatusCode::OK,
            &json!({ "access_token": access, "issued_token_type": ACCESS_TOKEN_TYPE, "token_type": "Bearer", "expires_in": expires_in }),
        ))
    }

    /// Issues an access token, a refresh token and an ID token.
    async fn issue(
        &self,
        client: &StoredClient,
        sign_in: &SignIn,
        family: &str,
        refresh: bool,
    ) -> Result<Answer, Answer> {
        let t = now();
        let grant = serde_json::to_string(sign_in).unwrap_or_default();
        let access = random_token("wmat_")?;
        let refresh_token = if refresh { Some(random_token("wmrt_")?) } else { None };
        let mut tokens = vec![(
            hash_secret(&access),
            StoredToken {
                kind: TokenKind::Access,
                client_id: client.info.client_id.clone(),
                family: family.into(),
                grant: grant.clone(),
                audience: client.info.client_id.clone(),
                issued_at: t,
                expires_at: t + ACCESS_SECS,
                revoked: false,
            },
        )];
        if let Some(r) = &refresh_token {
            tokens.push((
                hash_secret(r),
                StoredToken {
                    kind: TokenKind::Refresh,
                    client_id: client.info.client_id.clone(),
                    family: family.into(),
                    grant,
                    audience: client.info.client_id.clone(),
                    issued_at: t,
                    expires_at: t + REFRESH_SECS,
                    revoked: false,
                },
            ));
        }
        let id_token = self.id_token(&client.info.client_id, sign_in, t)?;
        self.app.idp_store(move |db| db.idp_put_tokens(&tokens, t)).await.map_err(store_error)?;
        let mut body = json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ACCESS_SECS,
            "id_token": id_token,
            "scope": sign_in.scope,
        });
        if let Some(r) = refresh_token {
            body["refresh_token"] = json!(r);
        }
        Ok(json_answer(StatusCode::OK, &body))
    }

    fn id_token(&self, client_id: &str, sign_in: &SignIn, t: i64) -> Result<String, Answer> {
        let server = |e: crate::identity::IdentityError| {
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &e.to_string())
        };
        let mut claims = Claims::new(&self.issuer, &sign_in.sub, client_id, t, ACCESS_SECS).map_err(server)?;
        claims.extra = sign_in.claims.clone();
        claims.extra.insert("auth_time".into(), json!(sign_in.auth_time));
        claims.extra.insert("azp".into(), json!(client_id));
        if let Some(n) = &sign_in.nonce {
            claims.extra.insert("nonce".into(), json!(n));
        }
        let Some(keys) = (self.keys)() else {
            return Err(oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "no signing keys"));
        };
        jwt::sign(keys.current(), &claims).map_err(server)
    }

    async fn bearer_token(&self, req: &Request<Bytes>) -> Result<StoredToken, Answer> {
        let challenge = |error: Option<&str>, description: &str| {
            let mut r = oauth_error(StatusCode::UNAUTHORIZED, error.unwrap_or("invalid_token"), description);
            let v = match error {
                Some(e) => format!("Bearer realm=\"wiremesh\", error=\"{e}\", error_description=\"{description}\""),
                None => "Bearer realm=\"wiremesh\"".to_string(),
            };
            if let Ok(v) = header::HeaderValue::from_str(&v) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            r
        };
        let h = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        let Some(token) = h.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty()) else {
            return Err(challenge(None, "a Bearer access token is required"));
        };
        let hash = hash_secret(token);
        let t = now();
        match self.app.idp_store(move |db| db.idp_token(&hash)).await.map_err(store_error)? {
            Some(s) if s.kind == TokenKind::Access && live(&s, t) => Ok(s),
            _ => Err(challenge(Some("invalid_token"), "the access token is unknown, expired or revoked")),
        }
    }

    async fn userinfo(&self, req: &Request<Bytes>) -> Answer {
        let token = match self.bearer_token(req).await {
            Ok(t) => t,
            Err(a) => return a,
        };
        let Ok(sign_in) = serde_json::from_str::<SignIn>(&token.grant) else {
            return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "stored grant unreadable");
        };
        let mut body = sign_in.claims;
        body.insert("sub".into(), json!(sign_in.sub));
        json_answer(StatusCode::OK, &Value::Object(body))
    }

    async fn introspect(&self, req: &Request<Bytes>) -> Answer {
        let (form, client) = match self.client_form(req).await {
            Ok(fc) => fc,
            Err(a) => return a,
        };
        let Some(token) = form.get("token") else { return bad("invalid_request", "token is missing") };
        let hash = hash_secret(token);
        let t = now();
        let st = match self.app.idp_store(move |db| db.idp_token(&hash)).await {
            Ok(s) => s,
            Err(e) => return store_error(e),
        };
        let me = &client.info.client_id;
        // A client learns only about tokens issued to it or meant for it.
        let Some(st) = st.filter(|s| live(s, t) && (&s.client_id == me || &s.audience == me)) else {
            return json_answer(StatusCode::OK, &json!({ "active": false }));
        };
        let Ok(sign_in) = serde_json::from_str::<SignIn>(&st.grant) else {
            return json_answer(StatusCode::OK, &json!({ "active": false }));
        };
        let mut body = json!({
            "active": true,
            "scope": sign_in.scope,
            "client_id": st.client_id,
            "username": sign_in.claims.get("preferred_username").cloned().unwrap_or(Value::Null),
            "token_type": match st.kind { TokenKind::Access => "Bearer", TokenKind::Refresh => "refresh_token" },
            "exp": st.expires_at,
            "iat": st.issued_at,
            "sub": sign_in.sub,
            "aud": st.audience,
            "iss": self.issuer,
        });
        if let Some(a) = sign_in.act {
            body["act"] = json!({ "sub": a });
        }
        json_answer(StatusCode::OK, &body)
    }

    async fn revoke(&self, req: &Request<Bytes>) -> Answer {
        let (form, client) = match self.client_form(req).await {
            Ok(fc) => fc,
            Err(a) => return a,
        };
        let Some(token) = form.get("token") else { return bad("invalid_request", "token is missing") };
        let hash = hash_secret(token);
        let me = client.info.client_id.clone();
        let r = self
            .app
            .idp_store(move |db| match db.idp_token(&hash)? {
                // Only the client a token was issued to may revoke it; for
                // anything else the answer is the same 200 (section 2.2).
                Some(t) if t.client_id == me => db.idp_revoke_token(&hash, now()).map(|_| ()),
                _ => Ok(()),
            })
            .await;
        match r {
            Ok(()) => response(StatusCode::OK, "application/json", "{}"),
            Err(e) => store_error(e),
        }
    }

    async fn register(&self, caller: &Caller, req: &Request<Bytes>) -> Answer {
        if !allowed(caller, "allowDynamicRegistration") {
            return oauth_error(
                StatusCode::FORBIDDEN,
                "access_denied",
                "dynamic client registration is not allowed for this caller (grant wiremesh.dev/cap/idp allowDynamicRegistration)",
            );
        }
        #[derive(Deserialize)]
        struct Metadata {
            #[serde(default)]
            redirect_uris: Vec<String>,
            #[serde(default)]
            client_name: Option<String>,
            #[serde(default)]
            token_endpoint_auth_method: Option<String>,
            #[serde(default)]
            grant_types: Option<Vec<String>>,
            #[serde(default)]
            response_types: Option<Vec<String>>,
        }
        if req.body().len() > form::MAX_FORM {
            return bad("invalid_client_metadata", "the metadata is too large");
        }
        let m: Metadata = match serde_json::from_slice(req.body()) {
            Ok(m) => m,
            Err(e) => return bad("invalid_client_metadata", &format!("malformed JSON: {e}")),
        };
        let method = m.token_endpoint_auth_method.as_deref().unwrap_or("client_secret_basic");
        if !["none", "client_secret_basic", "client_secret_post"].contains(&method) {
            return bad(
                "invalid_client_metadata",
                "token_endpoint_auth_method must be none, client_secret_basic or client_secret_post",
            );
        }
        let grants = m.grant_types.unwrap_or_else(|| vec!["authorization_code".into()]);
        if grants.iter().any(|g| g != "authorization_code" && g != "refresh_token") {
            return bad("invalid_client_metadata", "grant_types may be authorization_code and refresh_token");
        }
        let responses = m.response_types.unwrap_or_else(|| vec!["code".into()]);
        if responses.iter().any(|r| r != "code") {
            return bad("invalid_client_metadata", "response_types may only be code");
        }
        let name = m.client_name.unwrap_or_default();
        let by = format!("node:{}", caller.node.name);
        match create_client(&self.app, &name, m.redirect_uris, method == "none", &by).await {
            Ok(n) => {
                let mut body = json!({
                    "client_id": n.client.client_id,
                    "client_id_issued_at": n.client.created_at,
                    "redirect_uris": n.client.redirect_uris,
                    "client_name": n.client.name,
                    "token_endpoint_auth_method": method,
                    "grant_types": grants,
                    "response_types": responses,
                });
                if let Some(s) = n.secret {
                    body["client_secret"] = json!(s);
                    body["client_secret_expires_at"] = json!(0);
                }
                json_answer(StatusCode::CREATED, &body)
            }
            Err(e) if e.status == 400 => bad(&e.code, &e.message),
            Err(e) => store_error(e),
        }
    }

    async fn admin_page(&self, caller: &Caller, notice: Option<String>) -> Answer {
        if !allowed(caller, "allowAdminUI") {
            return page(
                StatusCode::FORBIDDEN,
                "Not allowed",
                "<p>Administering clients needs a grant of wiremesh.dev/cap/idp with allowAdminUI.</p>",
            );
        }
        let clients = match self.app.idp_store(|db| db.idp_clients()).await {
            Ok(c) => c,
            Err(e) => return store_error(e),
        };
        let csrf = self.form_token(caller, "admin", "", now());
        let mut rows = String::new();
        for c in &clients {
            rows.push_str(&format!(
                "<tr><td>{id}</td><td>{name}</td><td>{uris}</td><td>{kind}</td><td>{by}</td><td>\
                 <form method=\"post\" action=\"{PREFIX}/admin\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"hidden\" name=\"action\" value=\"remove\"><input type=\"hidden\" name=\"client_id\" value=\"{id}\">\
                 <button type=\"submit\">Remove</button></form></td></tr>",
                id = esc(&c.client_id),
                name = esc(&c.name),
                uris = esc(&c.redirect_uris.join(" ")),
                kind = if c.public { "public" } else { "confidential" },
                by = esc(&c.created_by),
            ));
        }
        let body = format!(
            "{notice}<table><tr><th>Client id</th><th>Name</th><th>Redirect URIs</th><th>Type</th><th>Created by</th><th></th></tr>{rows}</table>\
             <h2>New client</h2><form method=\"post\" action=\"{PREFIX}/admin\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"action\" value=\"create\">\
             <p><label>Name <input name=\"name\"></label></p>\
             <p><label>Redirect URIs (one a line)<br><textarea name=\"redirect_uris\" rows=\"3\" cols=\"60\"></textarea></label></p>\
             <p><label><input type=\"checkbox\" name=\"public\" value=\"on\"> Public client (no secret; PKCE only)</label></p>\
             <button type=\"submit\">Create</button></form>",
            notice = notice.unwrap_or_default(),
        );
        page(StatusCode::OK, "OIDC clients", &body)
    }

    async fn admin_post(&self, caller: &Caller, req: &Request<Bytes>) -> Answer {
        if !allowed(caller, "allowAdminUI") {
            return page(
                StatusCode::FORBIDDEN,
                "Not allowed",
                "<p>Administering clients needs a grant of wiremesh.dev/cap/idp with allowAdminUI.</p>",
            );
        }
        let form = match self.post_form(req, true) {
            Ok(f) => f,
            Err(a) => return a,
        };
        if !self.check_form_token(caller, "admin", "", form.get("csrf")) {
            return page(
                StatusCode::FORBIDDEN,
                "Refused",
                "<p>This form is stale or was not ours; reload the page.</p>",
            );
        }
        match form.get("action") {
            Some("create") => {
                let uris: Vec<String> = form
                    .get("redirect_uris")
                    .unwrap_or("")
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect();
                let by = format!("node:{}", caller.node.name);
                match create_client(
                    &self.app,
                    form.get("name").unwrap_or(""),
                    uris,
                    form.get("public") == Some("on"),
                    &by,
                )
                .await
                {
                    Ok(n) => {
                        let secret = n.secret.map_or(String::new(), |s| {
                            format!(" Its secret, shown this once: <code>{}</code>", esc(&s))
                        });
                        let notice =
                            format!("<p>Created client <code>{}</code>.{secret}</p>", esc(&n.client.client_id));
                        self.admin_page(caller, Some(notice)).await
                    }
                    Err(e) if e.status == 400 => {
                        page(StatusCode::BAD_REQUEST, "Refused", &format!("<p>{}</p>", esc(&e.message)))
                    }
                    Err(e) => store_error(e),
                }
            }
            Some("remove") => {
                let Some(id) = form.get("client_id").map(str::to_string) else {
                    return page(StatusCode::BAD_REQUEST, "Refused", "<p>client_id is missing</p>");
                };
                match self.app.idp_store(move |db| db.idp_remove_client(&id)).await {
                    Ok(true) => self.admin_page(caller, Some("<p>Removed.</p>".into())).await,
                    Ok(false) => page(StatusCode::NOT_FOUND, "Refused", "<p>No such client.</p>"),
                    Err(e) => store_error(e),
                }
            }
            _ => page(StatusCode::BAD_REQUEST, "Refused", "<p>action must be create or remove</p>"),
        }
    }
}

fn live(t: &StoredToken, now: i64) -> bool {
    !t.revoked && now <= t.expires_at
}

/// Whether a grant of [`CAP_IDP`] to the caller sets `flag` to true.
fn allowed(caller: &Caller, flag: &str) -> bool {
    caller.capability(CAP_IDP).iter().any(|v| v.get(flag) == Some(&Value::Bool(true)))
}
