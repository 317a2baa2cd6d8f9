//! The OIDC provider over real HTTP on loopback, driven by an independent
//! relying party (the `openidconnect` crate): discovery, the code flow with
//! PKCE, ID tokens verified from the JWKS fetched over HTTP (and again by
//! `jsonwebtoken`), refresh rotation and reuse detection, introspection,
//! revocation, token exchange, dynamic registration and the admin page as
//! grants allow them, every bad input refused with its standard error and
//! nothing issued, and a restart of the store losing nothing. The admin CLI
//! (`wiremesh idp clients …`) runs against a real `wiremeshd control`.
//!
//! The provider is served here by the test with a `Caller` it sets itself
//! (the identity service resolves the caller from the tailnet, and its own
//! tests check that); everything below the caller is the real thing.

#[path = "support/control.rs"]
mod control;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, Scope, TokenResponse,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wiremesh_daemon::control::db::{hash_secret, unix_now, Db, Location};
use wiremesh_daemon::control::provider_store::StoredCode;
use wiremesh_daemon::control::server::App;
use wiremesh_daemon::identity::caller::{Caller, User};
use wiremesh_daemon::identity::keys::{Algorithm, KeySet};
use wiremesh_daemon::identity::oidc::{self, Discovery};
use wiremesh_daemon::identity::provider::{self, Provider};

const ISS: &str = "https://control.test:8443";
const REDIRECT: &str = "https://app.test/callback";
const LOGIN: &str = "alice@example.com";

struct Idp {
    port: u16,
    app: Arc<App>,
    caller: Arc<Mutex<Caller>>,
    keys: Arc<KeySet>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn node(id: i64, name: &str, tags: &[&str], owner: &str) -> wiremesh_daemon::control::proto::NodeInfo {
    serde_json::from_value(json!({
        "id": id, "name": name, "fqdn": format!("{name}.tailnet.test"), "node_key": "AAAA", "machine_key": "00",
        "ipv4": format!("100.64.0.{id}"), "ipv6": format!("fd7a:115c:a1e0::{id}"), "endpoints": [], "allowed_ips": [],
        "tags": tags, "ephemeral": false, "online": true, "owner": owner, "created_at": 0
    }))
    .unwrap()
}

fn person() -> Caller {
    Caller {
        node: node(2, "laptop", &[], LOGIN),
        user: Some(User {
            login: LOGIN.into(),
            display_name: "Alice Liddell".into(),
            groups: vec!["group:eng".into()],
        }),
        capabilities: BTreeMap::new(),
        policy_set: true,
    }
}

fn tagged() -> Caller {
    Caller {
        node: node(3, "ci", &["tag:ci"], "tagged-devices"),
        user: None,
        capabilities: BTreeMap::new(),
        policy_set: true,
    }
}

fn with_cap(mut c: Caller, v: Value) -> Caller {
    c.capabilities.insert(provider::CAP_IDP.into(), vec![v]);
    c
}

/// Opens the store, makes sure the user exists, and serves the provider
/// (with discovery and JWKS, as the identity service will) on loopback.
async fn start(location: &Location, keys: Arc<KeySet>) -> Idp {
    // The PostgreSQL client is synchronous: off the async workers, as the server runs it.
    let location = location.clone();
    let db = tokio::task::spawn_blocking(move || {
        let (mut db, _) = Db::open_at(&location).unwrap();
        if db.user_by_login(LOGIN).unwrap().is_none() {
            db.create_user(LOGIN, "Alice Liddell").unwrap();
        }
        db
    })
    .await
    .unwrap();
    let app = App::new(db, [0; 32], Duration::from_secs(60));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let k = keys.clone();
    let p = Arc::new(Provider::new(app.clone(), Arc::new(move || Some(k.clone())), ISS, &base).unwrap());
    let caller = Arc::new(Mutex::new(person()));
    let (c2, k2) = (caller.clone(), keys.clone());
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (p, c, k) = (p.clone(), c2.clone(), k2.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (p, c, k) = (p.clone(), c.clone(), k.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let req = http::Request::from_parts(parts, body);
                        let path = req.uri().path().to_string();
                        let caller = c.lock().unwrap().clone();
                        let resp = match p.handle(&caller, req).await {
                            Some(r) => r,
                            None if path == oidc::DISCOVERY_PATH => {
                                let set = &*k;
                                let mut d = serde_json::to_value(Discovery::new(ISS, set).unwrap()).unwrap();
                                d.as_object_mut().unwrap().extend(p.discovery_fields());
                                // The JWKS is served here too (the issuer's host is this listener).
                                d["jwks_uri"] = json!(format!("{ISS}{}", oidc::JWKS_PATH));
                                http::Response::new(Bytes::from(d.to_string()))
                            }
                            None if path == oidc::JWKS_PATH => {
                                let set = &*k;
                                http::Response::new(Bytes::from(serde_json::to_string(&oidc::jwks(set)).unwrap()))
                            }
                            None => {
                                let mut r = http::Response::new(Bytes::from_static(b"{}"));
                                *r.status_mut() = http::StatusCode::NOT_FOUND;
                                r
                            }
                        };
                        Ok::<_, std::convert::Infallible>(resp.map(Full::new))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Idp { port, app, caller, keys, server }
}

fn sqlite(dir: &Path) -> Location {
    std::fs::create_dir_all(dir).unwrap();
    Location::Dir(dir.to_path_buf())
}

fn new_keys() -> Arc<KeySet> {
    Arc::new(KeySet::generate(Algorithm::ES256, unix_now()).unwrap())
}

/// One HTTP/1.1 request to the listener, whatever host the URL names (the
/// issuer's https URL is this listener, in plain HTTP).
async fn send(port: u16, req: http::Request<Vec<u8>>) -> http::Response<Vec<u8>> {
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    parts.uri = pq.parse().unwrap();
    parts.headers.insert(http::header::HOST, http::HeaderValue::from_static("127.0.0.1"));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(http::Request::from_parts(parts, Full::new(Bytes::from(body)))).await.unwrap();
    let (parts, body) = resp.into_parts();
    http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes().to_vec())
}

/// The `openidconnect` crate's HTTP client: our loopback listener.
fn rp_http(
    port: u16,
) -> impl Fn(
    openidconnect::HttpRequest,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<openidconnect::HttpResponse, std::io::Error>>>> {
    move |req| Box::pin(async move { Ok(send(port, req).await) })
}

async fn get(port: u16, path_query: &str, bearer: Option<&str>) -> http::Response<Vec<u8>> {
    let mut b = http::Request::get(path_query);
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(port, b.body(Vec::new()).unwrap()).await
}

async fn post(
    port: u16,
    path: &str,
    params: &[(&str, &str)],
    basic: Option<(&str, &str)>,
    headers: &[(&str, &str)],
) -> http::Response<Vec<u8>> {
    let body = provider::form::encode(params.iter().copied());
    let mut b = http::Request::post(path).header("content-type", "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        let raw = format!("{}:{}", provider::form::escape(id), provider::form::escape(secret));
        b = b.header("authorization", format!("Basic {}", std_b64(raw.as_bytes())));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(port, b.body(body.into_bytes()).unwrap()).await
}

fn std_b64(b: &[u8]) -> String {
    let url = wiremesh_daemon::identity::b64url(b).replace('-', "+").replace('_', "/");
    let pad = (4 - url.len() % 4) % 4;
    format!("{url}{}", "=".repeat(pad))
}

fn json_of(r: &http::Response<Vec<u8>>) -> Value {
    serde_json::from_slice(r.body()).unwrap_or(Value::Null)
}

/// Asserts an RFC 6749 section 5.2 error.
fn oauth_err(r: &http::Response<Vec<u8>>, status: u16, error: &str) {
    assert_eq!(r.status().as_u16(), status, "{}", String::from_utf8_lossy(r.body()));
    let j = json_of(r);
    assert_eq!(j["error"], error, "{j}");
    assert!(j["error_description"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(j.get("access_token").is_none() && j.get("id_token").is_none());
}

fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

async fn tok(port: u16, m: BTreeMap<&str, String>, basic: Option<(&str, &str)>) -> http::Response<Vec<u8>> {
    let p: Vec<(&str, &str)> = m.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post(port, "/oidc/token", &p, basic, &[]).await
}

fn unescape_html(s: &str) -> String {
    s.replace("&quot;", "\"").replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

/// The hidden fields of the consent page's form.
fn hidden_fields(html: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in html.split("<input type=\"hidden\" name=\"").skip(1) {
        let (name, rest) = part.split_once('"').unwrap();
        let value = rest.split_once("value=\"").unwrap().1.split_once('"').unwrap().0;
        out.push((name.to_string(), unescape_html(value)));
    }
    out
}

fn location_query(r: &http::Response<Vec<u8>>) -> (String, BTreeMap<String, String>) {
    assert_eq!(r.status().as_u16(), 303, "{}", String::from_utf8_lossy(r.body()));
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let (base, q) = loc.split_once('?').unwrap();
    let f = provider::form::Form::parse(q.as_bytes()).unwrap();
    (base.to_string(), f.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

/// The person's browser: opens the authorization URL, reads the consent
/// page, and answers it; returns the redirect's query.
async fn consent(port: u16, auth_url: &str, decision: &str) -> BTreeMap<String, String> {
    let page = get(port, auth_url, None).await;
    assert_eq!(page.status().as_u16(), 200, "{}", String::from_utf8_lossy(page.body()));
    let html = String::from_utf8(page.body().clone()).unwrap();
    assert!(html.contains("Alice Liddell") && html.contains("laptop"), "{html}");
    let mut fields = hidden_fields(&html);
    fields.push(("decision".into(), decision.into()));
    let params: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (base, q) = location_query(&post(port, "/oidc/authorize", &params, None, &[]).await);
    assert_eq!(base, REDIRECT);
    q
}

fn token_rows(dir: &Path) -> i64 {
    let c = rusqlite::Connection::open(dir.join("state.db")).unwrap();
    c.query_row("SELECT COUNT(*) FROM idp_tokens", [], |r| r.get(0)).unwrap()
}

/// Verifies an ID token the way an outside verifier would, with
/// jsonwebtoken and the JWKS fetched over HTTP.
async fn verify_jwt(port: u16, token: &str, aud: &str) -> Result<Value, String> {
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_slice(get(port, oidc::JWKS_PATH, None).await.body()).unwrap();
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let jwk = jwks.find(header.kid.as_deref().ok_or("no kid")?).ok_or("unknown kid")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_audience(&[aud]);
    v.set_issuer(&[ISS]);
    jsonwebtoken::decode::<Value>(token, &key, &v).map(|d| d.claims).map_err(|e| e.to_string())
}

async fn rp_client(
    port: u16,
    client_id: &str,
    secret: Option<&str>,
) -> openidconnect::core::CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
> {
    let meta = CoreProviderMetadata::discover_async(IssuerUrl::new(ISS.into()).unwrap(), &rp_http(port)).await.unwrap();
    CoreClient::from_provider_metadata(
        meta,
        ClientId::new(client_id.into()),
        secret.map(|s| ClientSecret::new(s.into())),
    )
    .set_redirect_uri(RedirectUrl::new(REDIRECT.into()).unwrap())
}

async fn admin_client(app: &Arc<App>, public: bool) -> (String, Option<String>) {
    let n = provider::create_client(app, "Example app", vec![REDIRECT.into()], public, "admin").await.unwrap();
    (n.client.client_id, n.secret)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn code_flow_with_pkce_by_an_independent_rp_then_refresh_introspect_revoke() {
    let dir = control::state_dir("idp-flow");
    rt().block_on(async {
        let idp = start(&sqlite(&dir), new_keys()).await;
        *idp.caller.lock().unwrap() =
            with_cap(person(), json!({ "extraClaims": { "team": "platform", "sub": "forged" } }));
        let (id, secret) = admin_client(&idp.app, false).await;
        let client = rp_client(idp.port, &id, secret.as_deref()).await;
        let http = rp_http(idp.port);

        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
            .add_scope(Scope::new("email".into()))
            .set_pkce_challenge(challenge)
            .url();
        let q = consent(idp.port, url.as_str(), "allow").await;
        assert_eq!(q["state"], *state.secret());
        assert_eq!(q["iss"], ISS);
        let code = q["code"].clone();

        let tokens = client
            .exchange_code(AuthorizationCode::new(code.clone()))
            .unwrap()
            .set_pkce_verifier(verifier)
            .request_async(&http)
            .await
            .unwrap();
        // openidconnect checks the signature from the JWKS it fetched, iss, aud, exp and the nonce.
        let id_token = tokens.id_token().expect("an ID token");
        let claims = id_token.claims(&client.id_token_verifier(), &nonce).unwrap();
        let alice = idp.app.idp_store(|db| db.user_by_login(LOGIN)).await.unwrap().unwrap();
        assert_eq!(claims.subject().as_str(), alice.id.to_string());
        assert_eq!(claims.email().map(|e| e.as_str()), Some(LOGIN));
        assert_eq!(claims.preferred_username().map(|u| u.as_str()), Some(LOGIN));
        assert!(claims.auth_time().is_some());
        // jsonwebtoken, from the JWKS over HTTP, sees the rest.
        let raw = verify_jwt(idp.port, &id_token.to_string(), &id).await.unwrap();
        assert_eq!(raw["groups"], json!(["group:eng"]));
        assert_eq!(raw["name"], "Alice Liddell");
        assert_eq!(raw["team"], "platform", "extraClaims from the grant");
        assert_eq!(raw["sub"], alice.id.to_string(), "extraClaims cannot replace sub");
        assert_eq!(raw["nonce"], *nonce.secret());
        // A tampered ID token fails both verifiers.
        let t = id_token.to_string();
        let parts: Vec<&str> = t.split('.').collect();
        let mut payload = raw.clone();
        payload["sub"] = json!("999");
        let forged =
            format!("{}.{}.{}", parts[0], wiremesh_daemon::identity::b64url(payload.to_string().as_bytes()), parts[2]);
        assert!(verify_jwt(idp.port, &forged, &id).await.is_err());
        let forged: openidconnect::core::CoreIdToken = serde_json::from_value(json!(forged)).unwrap();
        assert!(forged.claims(&client.id_token_verifier(), &nonce).is_err());

        // The code is single-use: a second exchange fails and revokes what the first issued.
        let access = tokens.access_token().secret().clone();
        let refresh = tokens.refresh_token().unwrap().secret().clone();
        let info = get(idp.port, "/oidc/userinfo", Some(&access)).await;
        assert_eq!(info.status(), 200);
        assert_eq!(json_of(&info)["email"], LOGIN);
        assert_eq!(json_of(&info)["team"], "platform");

        // Refresh rotates: a new refresh token, and the old one is spent.
        let refreshed = client
            .exchange_refresh_token(&RefreshToken::new(refresh.clone()))
            .unwrap()
            .request_async(&http)
            .await
            .unwrap();
        let refresh2 = refreshed.refresh_token().unwrap().secret().clone();
        assert_ne!(refresh2, refresh);
        let access2 = refreshed.access_token().secret().clone();
        assert!(verify_jwt(idp.port, &refreshed.id_token().unwrap().to_string(), &id).await.is_ok());
        let auth = Some((id.as_str(), secret.as_deref().unwrap()));
        let intro = post(idp.port, "/oidc/introspect", &[("token", &access2)], auth, &[]).await;
        let j = json_of(&intro);
        assert_eq!(
            (j["active"].clone(), j["client_id"].clone(), j["iss"].clone()),
            (json!(true), json!(id), json!(ISS))
        );
        assert_eq!(j["username"], LOGIN);
        assert!(j["scope"].as_str().unwrap().contains("email"));
        // Reusing the spent refresh token revokes the whole family.
        let reuse =
            post(idp.port, "/oidc/token", &[("grant_type", "refresh_token"), ("refresh_token", &refresh)], auth, &[])
                .await;
        oauth_err(&reuse, 400, "invalid_grant");
        for t in [&access, &access2, &refresh2] {
            let j = json_of(&post(idp.port, "/oidc/introspect", &[("token", t)], auth, &[]).await);
            assert_eq!(j, json!({ "active": false }), "the family is revoked");
        }
        let r =
            post(idp.port, "/oidc/token", &[("grant_type", "refresh_token"), ("refresh_token", &refresh2)], auth, &[])
                .await;
        oauth_err(&r, 400, "invalid_grant");
        let denied = get(idp.port, "/oidc/userinfo", Some(&access2)).await;
        assert_eq!(denied.status(), 401);
        assert!(denied.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));

        // A public client runs the same flow with PKCE alone.
        let (pid, none) = admin_client(&idp.app, true).await;
        assert!(none.is_none());
        let public = rp_client(idp.port, &pid, None).await;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, _, nonce) = public
            .authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
            .set_pkce_challenge(challenge)
            .url();
        let q = consent(idp.port, url.as_str(), "allow").await;
        let tokens = public
            .exchange_code(AuthorizationCode::new(q["code"].clone()))
            .unwrap()
            .set_pkce_verifier(verifier)
            .request_async(&http)
            .await
            .unwrap();
        assert!(tokens.id_token().unwrap().claims(&public.id_token_verifier(), &nonce).is_ok());
        // Revocation (RFC 7009): the refresh token takes its access token with it.
        let (pa, pr) = (tokens.access_token().secret().clone(), tokens.refresh_token().unwrap().secret().clone());
        let r = post(idp.port, "/oidc/revoke", &[("token", &pr), ("client_id", &pid)], None, &[]).await;
        assert_eq!(r.status(), 200);
        let j = json_of(&post(idp.port, "/oidc/introspect", &[("token", &pa), ("client_id", &pid)], None, &[]).await);
        assert_eq!(j["active"], false);
        // Another client learns nothing about these tokens, even live ones.
        let (aid, _) = (access.clone(), ());
        let j = json_of(&post(idp.port, "/oidc/introspect", &[("token", &aid), ("client_id", &pid)], None, &[]).await);
        assert_eq!(j["active"], false);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_bad_input_gets_the_standard_error_and_issues_nothing() {
    let dir = control::state_dir("idp-bad");
    rt().block_on(async {
        let idp = start(&sqlite(&dir), new_keys()).await;
        let port = idp.port;
        let (id, secret) = admin_client(&idp.app, false).await;
        let secret = secret.unwrap();
        let auth = Some((id.as_str(), secret.as_str()));
        let verifier = "v".repeat(50);
        let challenge = wiremesh_daemon::identity::b64url(
            ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref(),
        );
        let good = |over: &[(&str, &str)]| {
            let mut m: BTreeMap<&str, String> = [
                ("response_type", "code"),
                ("client_id", id.as_str()),
                ("redirect_uri", REDIRECT),
                ("scope", "openid email"),
                ("state", "st8"),
                ("nonce", "n0nce"),
                ("code_challenge", challenge.as_str()),
                ("code_challenge_method", "S256"),
            ]
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
            for (k, v) in over {
                m.insert(k, v.to_string());
            }
            format!("/oidc/authorize?{}", provider::form::encode(m.iter().map(|(k, v)| (*k, v.as_str()))))
        };

        // Errors shown to the person, never redirected: no valid client or redirect URI.
        for (over, why) in [
            (&[("client_id", "")][..], "missing client"),
            (&[("client_id", "wmc_nope")][..], "unknown client"),
            (&[("redirect_uri", "")][..], "missing redirect URI"),
            (&[("redirect_uri", "https://app.test/callback/")][..], "redirect URI not exactly registered"),
            (&[("redirect_uri", "https://evil.test/callback")][..], "foreign redirect URI"),
        ] {
            let r = get(port, &good(over), None).await;
            assert_eq!(r.status(), 400, "{why}");
            assert!(r.headers().get("location").is_none(), "{why}");
        }
        assert_eq!(get(port, "/oidc/authorize?a=1&a=2", None).await.status(), 400);
        // Errors redirected to the client (RFC 6749 section 4.1.2.1), with state.
        for (over, error) in [
            (&[("response_type", "token")][..], "unsupported_response_type"),
            (&[("code_challenge", "")][..], "invalid_request"),
            (&[("code_challenge_method", "plain")][..], "invalid_request"),
            (&[("code_challenge_method", "")][..], "invalid_request"),
            (&[("code_challenge", "short")][..], "invalid_request"),
            (&[("scope", "email")][..], "invalid_scope"),
        ] {
            let r = get(port, &good(over), None).await;
            assert_eq!(r.status(), 303);
            let (base, q) = location_query(&r);
            assert_eq!((base.as_str(), q["error"].as_str(), q["state"].as_str()), (REDIRECT, error, "st8"), "{over:?}");
            assert!(!q.contains_key("code"));
        }
        // A tagged node cannot sign in as a person.
        *idp.caller.lock().unwrap() = tagged();
        let (_, q) = location_query(&get(port, &good(&[]), None).await);
        assert_eq!(q["error"], "access_denied");
        *idp.caller.lock().unwrap() = person();

        // The consent form: a forged or missing CSRF token, another node's
        // token, a cross-site post, and "deny" issue no code.
        let html = String::from_utf8(get(port, &good(&[]), None).await.body().clone()).unwrap();
        let fields = hidden_fields(&html);
        let with = |extra: &[(&str, &str)], drop_csrf: bool| {
            let mut v: Vec<(String, String)> =
                fields.iter().filter(|(k, _)| !(drop_csrf && k == "csrf")).cloned().collect();
            v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            v
        };
        let v = with(&[("decision", "allow")], true);
        assert_eq!(post(port, "/oidc/authorize", &pairs(&v), None, &[]).await.status(), 400);
        let v =
            with(&[("decision", "allow"), ("csrf", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")], true);
        assert_eq!(post(port, "/oidc/authorize", &pairs(&v), None, &[]).await.status(), 400);
        // The token is bound to the request: changing a parameter voids it.
        let mut v = with(&[("decision", "allow")], false);
        v.iter_mut().find(|(k, _)| k == "nonce").unwrap().1 = "other".into();
        assert_eq!(post(port, "/oidc/authorize", &pairs(&v), None, &[]).await.status(), 400);
        let v = with(&[("decision", "allow")], false);
        *idp.caller.lock().unwrap() = with_cap(person(), json!({}));
        idp.caller.lock().unwrap().node = node(9, "other-laptop", &[], LOGIN);
        assert_eq!(post(port, "/oidc/authorize", &pairs(&v), None, &[]).await.status(), 400, "another node's form");
        *idp.caller.lock().unwrap() = person();
        let r = post(port, "/oidc/authorize", &pairs(&v), None, &[("origin", "https://evil.test")]).await;
        assert_eq!(r.status(), 403);
        let r = post(port, "/oidc/authorize", &pairs(&v), None, &[("sec-fetch-site", "cross-site")]).await;
        assert_eq!(r.status(), 403);
        let base = format!("http://127.0.0.1:{port}");
        // A sandboxed frame posts with Origin null; a longer port shares the prefix.
        for origin in ["null", &base[..base.len() - 1], &format!("{base}0")] {
            let r = post(port, "/oidc/authorize", &pairs(&v), None, &[("origin", origin)]).await;
            assert_eq!(r.status(), 403, "{origin}");
        }
        let r = post(port, "/oidc/authorize", &pairs(&v), None, &[("sec-fetch-site", "same-site")]).await;
        assert_eq!(r.status(), 403);
        // The service's own origin (a browser's same-origin post) is let through: Deny redirects.
        let deny = with(&[("decision", "deny")], false);
        let own = [("origin", base.as_str()), ("sec-fetch-site", "same-origin")];
        assert_eq!(post(port, "/oidc/authorize", &pairs(&deny), None, &own).await.status(), 303);
        let (_, q) = location_query(
            &post(port, "/oidc/authorize", &pairs(&with(&[("decision", "deny")], false)), None, &[]).await,
        );
        assert_eq!((q["error"].as_str(), q.contains_key("code")), ("access_denied", false));
        let empty = idp.app.idp_store(|db| Ok(db.idp_clients()?.len())).await.unwrap();
        assert_eq!(empty, 1);
        // Now a real code, for the token endpoint's refusals.
        let (_, q) = location_query(
            &post(port, "/oidc/authorize", &pairs(&with(&[("decision", "allow")], false)), None, &[]).await,
        );
        let code = q["code"].clone();
        let exchange = |over: &[(&'static str, String)]| {
            let mut m: BTreeMap<&str, String> = [
                ("grant_type", "authorization_code".to_string()),
                ("code", code.clone()),
                ("redirect_uri", REDIRECT.to_string()),
                ("code_verifier", verifier.clone()),
            ]
            .into_iter()
            .collect();
            for (k, v) in over {
                m.insert(k, v.clone());
            }
            m
        };
        // Client authentication (these do not touch the code).
        let r = tok(port, exchange(&[]), Some((id.as_str(), "wmcs_wrong"))).await;
        oauth_err(&r, 401, "invalid_client");
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"));
        oauth_err(&tok(port, exchange(&[]), Some(("wmc_nope", secret.as_str()))).await, 401, "invalid_client");
        oauth_err(&tok(port, exchange(&[]), None).await, 401, "invalid_client");
        oauth_err(&tok(port, exchange(&[("client_id", id.clone())]), None).await, 401, "invalid_client");
        oauth_err(&tok(port, exchange(&[("client_secret", secret.clone())]), auth).await, 400, "invalid_request");
        oauth_err(
            &tok(port, exchange(&[("client_secret", "x".into()), ("client_id", id.clone())]), None).await,
            401,
            "invalid_client",
        );
        // Grant types and missing parameters (the code is not spent by these).
        oauth_err(
            &tok(port, exchange(&[("grant_type", "password".into())]), auth).await,
            400,
            "unsupported_grant_type",
        );
        oauth_err(&tok(port, exchange(&[("grant_type", String::new())]), auth).await, 400, "invalid_request");
        oauth_err(&tok(port, exchange(&[("code_verifier", String::new())]), auth).await, 400, "invalid_request");
        oauth_err(&tok(port, exchange(&[("code_verifier", "short".into())]), auth).await, 400, "invalid_request");
        oauth_err(&tok(port, exchange(&[("redirect_uri", String::new())]), auth).await, 400, "invalid_request");
        let mut tampered = code.clone();
        tampered.replace_range(10..11, if &code[10..11] == "a" { "b" } else { "a" });
        oauth_err(&tok(port, exchange(&[("code", tampered)]), auth).await, 400, "invalid_grant");
        let r = send(
            port,
            http::Request::post("/oidc/token").header("content-type", "application/json").body(b"{}".to_vec()).unwrap(),
        )
        .await;
        oauth_err(&r, 400, "invalid_request");
        let r = send(
            port,
            http::Request::post("/oidc/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(b"grant_type=a&grant_type=b".to_vec())
                .unwrap(),
        )
        .await;
        oauth_err(&r, 400, "invalid_request");
        assert_eq!(token_rows(&dir), 0, "nothing issued so far");
        // PKCE mismatch spends the code; its reuse is then refused too.
        oauth_err(&tok(port, exchange(&[("code_verifier", "w".repeat(50))]), auth).await, 400, "invalid_grant");
        oauth_err(&tok(port, exchange(&[]), auth).await, 400, "invalid_grant");
        assert_eq!(token_rows(&dir), 0);

        // Redirect URI mismatch at the token endpoint, and an expired code.
        let fresh = |p: u16| async move {
            let html = String::from_utf8(get(p, &good(&[]), None).await.body().clone()).unwrap();
            let mut v = hidden_fields(&html);
            v.push(("decision".into(), "allow".into()));
            let pv: Vec<(&str, &str)> = v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            location_query(&post(p, "/oidc/authorize", &pv, None, &[]).await).1["code"].clone()
        };
        let c2 = fresh(port).await;
        let mut m = exchange(&[("redirect_uri", "https://app.test/other".into())]);
        m.insert("code", c2);
        oauth_err(&tok(port, m, auth).await, 400, "invalid_grant");
        let expired = "wmac_expired_code_for_the_test";
        let h = hash_secret(expired);
        let stored = StoredCode {
            client_id: id.clone(),
            redirect_uri: REDIRECT.into(),
            code_challenge: challenge.clone(),
            grant: json!({ "sub": "1", "claims": {}, "scope": "openid", "auth_time": 0 }).to_string(),
            family: "fam-expired".into(),
            expires_at: unix_now() - 1,
        };
        idp.app.idp_store(move |db| db.idp_put_code(&h, &stored, unix_now())).await.unwrap();
        oauth_err(&tok(port, exchange(&[("code", expired.into())]), auth).await, 400, "invalid_grant");
        assert_eq!(token_rows(&dir), 0, "no refusal issued anything");

        // A good exchange, then its code replayed: refused, and what it issued is revoked.
        let c3 = fresh(port).await;
        let ok = tok(port, exchange(&[("code", c3.clone())]), auth).await;
        assert_eq!(ok.status(), 200, "{}", String::from_utf8_lossy(ok.body()));
        let access = json_of(&ok)["access_token"].as_str().unwrap().to_string();
        assert_eq!(get(port, "/oidc/userinfo", Some(&access)).await.status(), 200);
        oauth_err(&tok(port, exchange(&[("code", c3)]), auth).await, 400, "invalid_grant");
        assert_eq!(get(port, "/oidc/userinfo", Some(&access)).await.status(), 401);
        // Tampered and missing bearer tokens.
        let mut bad = access.clone();
        bad.push('0');
        assert_eq!(get(port, "/oidc/userinfo", Some(&bad)).await.status(), 401);
        let r = get(port, "/oidc/userinfo", None).await;
        assert_eq!(r.status(), 401);
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        // Introspection and revocation need client authentication and a token.
        oauth_err(&post(port, "/oidc/introspect", &[("token", &access)], None, &[]).await, 401, "invalid_client");
        oauth_err(&post(port, "/oidc/introspect", &[], auth, &[]).await, 400, "invalid_request");
        oauth_err(
            &post(port, "/oidc/revoke", &[("token", &access)], Some((id.as_str(), "nope")), &[]).await,
            401,
            "invalid_client",
        );
        oauth_err(&post(port, "/oidc/revoke", &[], auth, &[]).await, 400, "invalid_request");
        assert_eq!(post(port, "/oidc/revoke", &[("token", "unknown")], auth, &[]).await.status(), 200);
        // Wrong methods.
        assert_eq!(get(port, "/oidc/token", None).await.status(), 405);
        // Token exchange is off without the grant.
        let r = post(
            port,
            "/oidc/token",
            &[
                ("grant_type", provider::TOKEN_EXCHANGE),
                ("subject_token", &access),
                ("subject_token_type", provider::ACCESS_TOKEN_TYPE),
                ("audience", &id),
            ],
            auth,
            &[],
        )
        .await;
        oauth_err(&r, 400, "unauthorized_client");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn grants_decide_token_exchange_registration_and_the_admin_page() {
    let dir = control::state_dir("idp-grants");
    rt().block_on(async {
        let idp = start(&sqlite(&dir), new_keys()).await;
        let port = idp.port;
        let (front, front_secret) = admin_client(&idp.app, false).await;
        let (back, _) = admin_client(&idp.app, false).await;
        let fs = front_secret.unwrap();
        let auth = Some((front.as_str(), fs.as_str()));
        // A sign-in at the front service.
        let verifier = "x".repeat(64);
        let challenge = wiremesh_daemon::identity::b64url(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
        let url = format!(
            "/oidc/authorize?{}",
            provider::form::encode([
                ("response_type", "code"),
                ("client_id", front.as_str()),
                ("redirect_uri", REDIRECT),
                ("scope", "openid"),
                ("code_challenge", challenge.as_str()),
                ("code_challenge_method", "S256"),
            ])
        );
        let code = consent(port, &url, "allow").await["code"].clone();
        let r = post(
            port,
            "/oidc/token",
            &[("grant_type", "authorization_code"), ("code", &code), ("redirect_uri", REDIRECT), ("code_verifier", &verifier)],
            auth,
            &[],
        )
        .await;
        let access = json_of(&r)["access_token"].as_str().unwrap().to_string();

        // Token exchange with the grant: the front service gets a token for the back one.
        *idp.caller.lock().unwrap() = with_cap(tagged(), json!({ "allowTokenExchange": true }));
        let (f2, s2) = (front.clone(), fs.clone());
        let ex = |audience: String, subject: String| {
            let (f, s) = (f2.clone(), s2.clone());
            async move {
            post(
                port,
                "/oidc/token",
                &[
                    ("grant_type", provider::TOKEN_EXCHANGE),
                    ("subject_token", &subject),
                    ("subject_token_type", provider::ACCESS_TOKEN_TYPE),
                    ("audience", &audience),
                ],
                Some((f.as_str(), s.as_str())),
                &[],
            )
            .await
            }
        };
        let r = ex(back.clone(), access.clone()).await;
        assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
        let j = json_of(&r);
        assert_eq!(j["issued_token_type"], provider::ACCESS_TOKEN_TYPE);
        let exchanged = j["access_token"].as_str().unwrap().to_string();
        let intro = json_of(&post(port, "/oidc/introspect", &[("token", &exchanged)], auth, &[]).await);
        assert_eq!((intro["active"].clone(), intro["aud"].clone(), intro["act"]["sub"].clone()), (json!(true), json!(back), json!(front)));
        oauth_err(&ex("wmc_unknown".into(), access.clone()).await, 400, "invalid_target");
        oauth_err(&ex(back.clone(), "wmat_forged".into()).await, 400, "invalid_grant");
        // An exchanged token cannot be exchanged again by the front (it is the back's).
        oauth_err(&ex(back.clone(), exchanged).await, 400, "invalid_grant");

        // Dynamic registration: refused without the grant, allowed with it.
        let reg = |body: Value| async move {
            send(port, http::Request::post("/oidc/register").header("content-type", "application/json").body(body.to_string().into_bytes()).unwrap()).await
        };
        *idp.caller.lock().unwrap() = person();
        let meta = json!({ "redirect_uris": ["https://dyn.test/cb"], "client_name": "Dyn", "token_endpoint_auth_method": "none" });
        oauth_err(&reg(meta.clone()).await, 403, "access_denied");
        *idp.caller.lock().unwrap() = with_cap(person(), json!({ "allowDynamicRegistration": true }));
        let r = reg(meta).await;
        assert_eq!(r.status(), 201, "{}", String::from_utf8_lossy(r.body()));
        let j = json_of(&r);
        assert!(j["client_id"].as_str().unwrap().starts_with("wmc_") && j.get("client_secret").is_none());
        let r = reg(json!({ "redirect_uris": ["https://dyn.test/cb2"] })).await;
        assert!(json_of(&r)["client_secret"].as_str().unwrap().starts_with("wmcs_"));
        oauth_err(&reg(json!({ "redirect_uris": [] })).await, 400, "invalid_redirect_uri");
        oauth_err(&reg(json!({ "redirect_uris": ["https://dyn.test/#frag"] })).await, 400, "invalid_redirect_uri");
        oauth_err(&reg(json!({ "redirect_uris": ["javascript:alert(1)"] })).await, 400, "invalid_redirect_uri");
        oauth_err(&reg(json!({ "redirect_uris": ["https://a.test/"], "grant_types": ["implicit"] })).await, 400, "invalid_client_metadata");
        oauth_err(&reg(json!({ "redirect_uris": ["https://a.test/"], "token_endpoint_auth_method": "private_key_jwt" })).await, 400, "invalid_client_metadata");
        oauth_err(&reg(json!("not an object")).await, 400, "invalid_client_metadata");
        let clients = idp.app.idp_store(|db| db.idp_clients()).await.unwrap();
        assert_eq!(clients.len(), 4);
        assert_eq!(clients[2].created_by, "node:laptop");

        // The admin page: refused without the grant; with it, lists, creates and removes.
        *idp.caller.lock().unwrap() = person();
        assert_eq!(get(port, "/oidc/admin", None).await.status(), 403);
        *idp.caller.lock().unwrap() = with_cap(person(), json!({ "allowAdminUI": true }));
        let page = get(port, "/oidc/admin", None).await;
        assert_eq!(page.status(), 200);
        let html = String::from_utf8(page.body().clone()).unwrap();
        assert!(html.contains(&front) && html.contains("https://dyn.test/cb"));
        let csrf = hidden_fields(&html).into_iter().find(|(k, _)| k == "csrf").unwrap().1;
        let r = post(port, "/oidc/admin", &[("csrf", "bogus"), ("action", "create"), ("redirect_uris", "https://n.test/cb")], None, &[]).await;
        assert_eq!(r.status(), 403);
        let r = post(port, "/oidc/admin", &[("csrf", &csrf), ("action", "create"), ("name", "New"), ("redirect_uris", "https://n.test/cb\r\nhttps://n.test/cb2")], None, &[]).await;
        assert_eq!(r.status(), 200);
        assert!(String::from_utf8_lossy(r.body()).contains("wmcs_"), "the secret is shown once");
        let clients = idp.app.idp_store(|db| db.idp_clients()).await.unwrap();
        assert_eq!(clients.last().unwrap().redirect_uris, ["https://n.test/cb", "https://n.test/cb2"]);
        let r = post(port, "/oidc/admin", &[("csrf", &csrf), ("action", "remove"), ("client_id", &back)], None, &[]).await;
        assert_eq!(r.status(), 200);
        assert!(idp.app.idp_store(move |db| db.idp_client(&back)).await.unwrap().is_none());
        let r = post(port, "/oidc/admin", &[("csrf", &csrf), ("action", "create"), ("redirect_uris", "ftp://x")], None, &[]).await;
        assert_eq!(r.status(), 400);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// Clients made with the CLI on a real control server, and a sign-in's
/// tokens, survive a restart: nobody is signed out and no client breaks.
#[test]
fn cli_clients_and_tokens_survive_a_restart() {
    let store = control::Store::sqlite("idp-restart");
    let control::Store::Dir(dir) = &store else { unreachable!() };
    let server = store.start();
    let url = server.url.to_string();
    let token = server.token.clone().unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wiremesh"))
            .args(args)
            .args(["--control", &url, "--admin-token", &token])
            .output()
            .unwrap()
    };
    let out = cli(&["idp", "clients", "create", "--redirect-uri", REDIRECT, "--name", "CLI app", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["client"]["client_id"].as_str().unwrap().to_string();
    let secret = created["client_secret"].as_str().unwrap().to_string();
    let out = cli(&["idp", "clients", "create", "--redirect-uri", "not a url"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redirect URI"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["idp", "clients", "create", "--redirect-uri", "https://pub.test/cb", "--public"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("public client"));
    let list = String::from_utf8(cli(&["idp", "clients", "list"]).stdout).unwrap();
    assert!(list.contains(&id) && list.contains("confidential") && list.contains("public"), "{list}");
    let pub_id = list.lines().find(|l| l.contains("public")).unwrap().split_whitespace().next().unwrap().to_string();
    assert!(cli(&["idp", "clients", "remove", &pub_id]).status.success());
    assert!(!cli(&["idp", "clients", "remove", &pub_id]).status.success(), "removing twice is refused");
    drop(server);

    let keys = new_keys();
    let location = Location::Dir(dir.clone());
    let (refresh, access) = rt().block_on(async {
        let idp = start(&location, keys.clone()).await;
        let client = rp_client(idp.port, &id, Some(&secret)).await;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, _, _) = client
            .authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
            .set_pkce_challenge(challenge)
            .url();
        let code = consent(idp.port, url.as_str(), "allow").await["code"].clone();
        let t = client
            .exchange_code(AuthorizationCode::new(code))
            .unwrap()
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.secret().clone()))
            .request_async(&rp_http(idp.port))
            .await
            .unwrap();
        (t.refresh_token().unwrap().secret().clone(), t.access_token().secret().clone())
    });
    // The store reopened by a new process-worth of state: same client, same tokens.
    rt().block_on(async {
        let idp = start(&location, keys.clone()).await;
        assert_eq!(get(idp.port, "/oidc/userinfo", Some(&access)).await.status(), 200);
        let client = rp_client(idp.port, &id, Some(&secret)).await;
        let t = client
            .exchange_refresh_token(&RefreshToken::new(refresh))
            .unwrap()
            .request_async(&rp_http(idp.port))
            .await
            .unwrap();
        assert!(t.refresh_token().is_some());
        let _ = &idp.keys;
    });
}

/// The same store on PostgreSQL (`--state postgres://…`): the flow, code
/// reuse revoking what the code issued, refresh rotation and reuse
/// detection, and everything kept across a reopen. Skips outside CI when
/// PostgreSQL is not installed.
#[test]
fn postgresql_store_runs_the_flow_and_keeps_it_across_a_restart() {
    let Some(store) = control::Store::postgres("identity_provider_postgres") else { return };
    let location: Location = store.arg().to_str().unwrap().parse().unwrap();
    let keys = new_keys();
    // The synchronous PostgreSQL client must not be dropped inside the
    // runtime: the runtime goes first (with every task holding the
    // provider), then the store, on this thread.
    let runtime = rt();
    let ((id, secret, refresh, access), idp) = runtime.block_on(async {
        let idp = start(&location, keys.clone()).await;
        let (id, secret) = admin_client(&idp.app, false).await;
        let secret = secret.unwrap();
        let client = rp_client(idp.port, &id, Some(&secret)).await;
        let mut out = Vec::new();
        for _ in 0..2 {
            let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
            let (url, _, nonce) = client
                .authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
                .set_pkce_challenge(challenge)
                .url();
            let code = consent(idp.port, url.as_str(), "allow").await["code"].clone();
            let t = client
                .exchange_code(AuthorizationCode::new(code.clone()))
                .unwrap()
                .set_pkce_verifier(verifier)
                .request_async(&rp_http(idp.port))
                .await
                .unwrap();
            assert!(t.id_token().unwrap().claims(&client.id_token_verifier(), &nonce).is_ok());
            out.push((code, t.access_token().secret().clone(), t.refresh_token().unwrap().secret().clone()));
        }
        // The first code replayed: refused, and its tokens revoked; the second sign-in is untouched.
        let auth = Some((id.as_str(), secret.as_str()));
        let v = "z".repeat(43);
        let r = post(
            idp.port,
            "/oidc/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", &out[0].0),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &v),
            ],
            auth,
            &[],
        )
        .await;
        oauth_err(&r, 400, "invalid_grant");
        assert_eq!(get(idp.port, "/oidc/userinfo", Some(&out[0].1)).await.status(), 401);
        assert_eq!(get(idp.port, "/oidc/userinfo", Some(&out[1].1)).await.status(), 200);
        ((id, secret, out[1].2.clone(), out[1].1.clone()), idp)
    });
    drop(runtime);
    drop(idp);
    let runtime = rt();
    let idp = runtime.block_on(async {
        let idp = start(&location, keys).await;
        assert_eq!(get(idp.port, "/oidc/userinfo", Some(&access)).await.status(), 200);
        let client = rp_client(idp.port, &id, Some(&secret)).await;
        let t = client
            .exchange_refresh_token(&RefreshToken::new(refresh.clone()))
            .unwrap()
            .request_async(&rp_http(idp.port))
            .await
            .unwrap();
        let access2 = t.access_token().secret().clone();
        assert_eq!(get(idp.port, "/oidc/userinfo", Some(&access2)).await.status(), 200);
        let auth = Some((id.as_str(), secret.as_str()));
        let r =
            post(idp.port, "/oidc/token", &[("grant_type", "refresh_token"), ("refresh_token", &refresh)], auth, &[])
                .await;
        oauth_err(&r, 400, "invalid_grant");
        assert_eq!(get(idp.port, "/oidc/userinfo", Some(&access2)).await.status(), 401, "the family is revoked");
        let gone = id.clone();
        assert!(idp.app.idp_store(move |db| db.idp_remove_client(&gone)).await.unwrap());
        oauth_err(&post(idp.port, "/oidc/introspect", &[("token", &access)], auth, &[]).await, 401, "invalid_client");
        idp
    });
    drop(runtime);
    drop(idp);
}
