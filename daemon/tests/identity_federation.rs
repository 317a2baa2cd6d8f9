//! Federation end to end, no root needed: a test issuer (its keys generated
//! here; discovery and JWKS served by this test over HTTPS on loopback with
//! a certificate from a test CA the control server trusts through
//! `--federation-ca`) and a real `wiremeshd control`. Tokens are signed by
//! the `jsonwebtoken` crate (ES256 and EdDSA) and by our own
//! `identity::jwt` (a wiremesh issuer's workload-token format). Each bad
//! token is refused with the check it failed and stores nothing; a good one
//! registers a tagged node over the API, and the real node agent
//! (`wiremeshd node --userspace --client-id … --id-token-file …`) joins
//! with one and is shown online with its tags.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wiremesh_daemon::control::client::{Client, ClientError};
use wiremesh_daemon::control::federation::CredentialInfo;
use wiremesh_daemon::control::proto::{self, FederatedRegisterRequest, NodeInfo, RegisterRequest};
use wiremesh_daemon::node::keys::MachineKey;

#[path = "support/control.rs"]
mod control_server;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A signing key of the test issuer, with its public JWK.
struct TestKey {
    enc: EncodingKey,
    alg: Algorithm,
    jwk: Jwk,
}

impl TestKey {
    fn es256(kid: &str) -> TestKey {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
        Self::with(EncodingKey::from_ec_der(pkcs8.as_ref()), Algorithm::ES256, kid)
    }

    fn eddsa(kid: &str) -> TestKey {
        // A PKCS#8 v1 Ed25519 key (RFC 8410): the fixed prefix and a random seed.
        let mut der =
            vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut seed).unwrap();
        der.extend_from_slice(&seed);
        Self::with(EncodingKey::from_ed_der(&der), Algorithm::EdDSA, kid)
    }

    fn with(enc: EncodingKey, alg: Algorithm, kid: &str) -> TestKey {
        let mut jwk = Jwk::from_encoding_key(&enc, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        TestKey { enc, alg, jwk }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = self.jwk.common.key_id.clone();
        encode(&h, claims, &self.enc).unwrap()
    }
}

/// The test issuer: discovery and JWKS over HTTPS, the JWKS replaceable,
/// its fetches counted.
struct Issuer {
    url: String,
    jwks: Arc<Mutex<Value>>,
    jwks_fetches: Arc<Mutex<u64>>,
    ca_pem: String,
}

async fn start_issuer(rt: &tokio::runtime::Handle) -> Issuer {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair as RcKey};
    let ca_key = RcKey::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "wiremesh federation test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = RcKey::generate().unwrap();
    let leaf =
        CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let url = format!("https://{addr}");
    let jwks = Arc::new(Mutex::new(json!({"keys": []})));
    let jwks_fetches = Arc::new(Mutex::new(0u64));
    let (j, f, u) = (jwks.clone(), jwks_fetches.clone(), url.clone());
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (acceptor, j, f, u) = (acceptor.clone(), j.clone(), f.clone(), u.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = match req.uri().path() {
                        "/.well-known/openid-configuration" => {
                            Some(json!({"issuer": u, "jwks_uri": format!("{u}/.well-known/jwks.json")}))
                        }
                        "/.well-known/jwks.json" => {
                            *f.lock().unwrap() += 1;
                            Some(j.lock().unwrap().clone())
                        }
                        _ => None,
                    };
                    let resp = match body {
                        Some(b) => hyper::Response::new(Full::new(Bytes::from(b.to_string()))),
                        None => {
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                            r
                        }
                    };
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    Issuer { url, jwks, jwks_fetches, ca_pem: ca.pem() }
}

impl Issuer {
    fn publish(&self, keys: &[&Jwk]) {
        let set = JwkSet { keys: keys.iter().map(|k| (*k).clone()).collect() };
        *self.jwks.lock().unwrap() = serde_json::to_value(set).unwrap();
    }

    fn fetches(&self) -> u64 {
        *self.jwks_fetches.lock().unwrap()
    }
}

async fn register(c: &Client, n: u8, client_id: &str, token: &str, tags: &[&str]) -> Result<NodeInfo, ClientError> {
    let machine = MachineKey::generate().unwrap().0;
    let challenge = c.challenge().await.unwrap();
    let mut req = FederatedRegisterRequest {
        request: RegisterRequest {
            auth_key: String::new(),
            machine_key: machine.public_hex(),
            node_key: proto::b64_key(&[n; 32]),
            hostname: format!("runner-{n}"),
            endpoints: vec!["192.0.2.1:41641".into()],
            challenge: proto::hex(&challenge),
            signature: String::new(),
        },
        client_id: client_id.into(),
        id_token: token.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    };
    req.request.signature =
        machine.sign_hex(&proto::federated_register_message(&challenge, &c.url().fingerprint, &req));
    c.json(hyper::Method::POST, "/api/v1/register/federated", Some(&req), None).await
}

fn refused(r: Result<NodeInfo, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api { status, body }) => (status, body.code, body.error),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn nodes(c: &Client, token: &str) -> Vec<NodeInfo> {
    c.json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(token)).await.unwrap()
}

fn cli(server: &control_server::Server, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wiremesh"))
        .args(args)
        .args(["--control", &server.url.to_string(), "--admin-token", server.token.as_deref().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn outside_issuer_registers_tagged_nodes_and_every_bad_token_is_refused_with_its_reason() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let issuer = rt.block_on(start_issuer(rt.handle()));
    let es = TestKey::es256("es-1");
    let ed = TestKey::eddsa("ed-1");
    issuer.publish(&[&es.jwk, &ed.jwk]);

    let state = control_server::state_dir("federation");
    std::fs::create_dir_all(&state).unwrap();
    let ca_file = state.with_extension("ca.pem");
    std::fs::write(&ca_file, &issuer.ca_pem).unwrap();
    let server = control_server::start_with(
        &state,
        &["--relay", "off", "--identity", "off", "--federation-ca", ca_file.to_str().unwrap()],
    );
    let admin = server.token.clone().unwrap();
    let c = Client::new(server.url.clone());

    // The credential, through the CLI: --output json names the client ID and audience.
    let out = cli(
        &server,
        &[
            "federation",
            "create",
            "--issuer",
            &issuer.url,
            "--subject",
            "ws-1/*",
            "--tags",
            "tag:ci,tag:web",
            "--output",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cred: CredentialInfo = serde_json::from_slice(&out.stdout).unwrap();
    let client_id = cred.credential.client_id.clone();
    assert_eq!(cred.audience, format!("{}/{client_id}", server.url.to_string().split('#').next().unwrap()));
    assert_eq!((cred.credential.issuer.as_str(), cred.credential.ephemeral), (issuer.url.as_str(), false));
    let out = cli(&server, &["federation", "list", "--output", "json"]);
    let list: Vec<CredentialInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list, vec![cred.clone()]);
    // Bad credentials are refused.
    for bad in [
        vec!["--issuer", "http://127.0.0.1:1", "--subject", "x", "--tags", "tag:a"],
        vec!["--issuer", &issuer.url, "--subject", "x", "--tags", "ci"],
        vec!["--issuer", &issuer.url, "--subject", "a b", "--tags", "tag:a"],
    ] {
        let mut args = vec!["federation", "create"];
        args.extend(bad.iter().copied());
        let out = cli(&server, &args);
        assert!(!out.status.success(), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("bad_request"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let t = now();
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut v = json!({"iss": issuer.url, "sub": "ws-1/job-42", "aud": cred.audience, "iat": t, "nbf": t,
                           "exp": t + 300, "jti": format!("jti-{}", rand_u64())});
        f(&mut v);
        v
    };

    rt.block_on(async {
        // Each bad token, refused with its reason; nothing registered.
        let wrong_iss = es.sign(&claims(&|v| v["iss"] = "https://other.example".into()));
        let other_aud = format!("{}/wmfed-00", cred.audience.rsplit_once('/').unwrap().0);
        // (what, token, client ID, tags, status, code)
        type Case<'a> = (&'a str, String, &'a str, Vec<&'a str>, u16, &'a str);
        let cases: Vec<Case> = vec![
            ("unknown client id", es.sign(&claims(&|_| {})), "wmfed-nope", vec!["tag:ci"], 401, "unknown_client_id"),
            ("wrong issuer", wrong_iss, &client_id, vec!["tag:ci"], 401, "wrong_issuer"),
            (
                "wrong audience",
                es.sign(&claims(&|v| v["aud"] = other_aud.clone().into())),
                &client_id,
                vec!["tag:ci"],
                401,
                "wrong_audience",
            ),
            (
                "subject",
                es.sign(&claims(&|v| v["sub"] = "ws-2/job".into())),
                &client_id,
                vec!["tag:ci"],
                403,
                "subject_mismatch",
            ),
            ("expired", es.sign(&claims(&|v| v["exp"] = (t - 120).into())), &client_id, vec!["tag:ci"], 401, "expired"),
            (
                "not yet valid",
                ed.sign(&claims(&|v| v["nbf"] = (t + 600).into())),
                &client_id,
                vec!["tag:ci"],
                401,
                "not_yet_valid",
            ),
            (
                "too old",
                ed.sign(&claims(&|v| v["iat"] = (t - 7200).into())),
                &client_id,
                vec!["tag:ci"],
                401,
                "token_too_old",
            ),
            (
                "tags not allowed",
                ed.sign(&claims(&|_| {})),
                &client_id,
                vec!["tag:ci", "tag:prod"],
                403,
                "tags_not_allowed",
            ),
            ("no tags", ed.sign(&claims(&|_| {})), &client_id, vec![], 403, "tags_not_allowed"),
        ];
        for (what, token, cid, tags, status, code) in &cases {
            let (s, got, msg) = refused(register(&c, 1, cid, token, tags).await);
            assert_eq!((s, got.as_str()), (*status, *code), "{what}: {msg}");
        }
        // A changed signature; a changed payload under the old signature; alg none.
        let good = es.sign(&claims(&|_| {}));
        let parts: Vec<&str> = good.split('.').collect();
        let mut sig = wiremesh_daemon::identity::unb64url(parts[2]).unwrap();
        sig[5] ^= 1;
        let bad_sig = format!("{}.{}.{}", parts[0], parts[1], wiremesh_daemon::identity::b64url(&sig));
        let forged = claims(&|v| v["sub"] = "ws-1/admin".into());
        let forged =
            format!("{}.{}.{}", parts[0], wiremesh_daemon::identity::b64url(forged.to_string().as_bytes()), parts[2]);
        // The ES256 key's kid under an EdDSA header: the key decides the algorithm.
        let swapped = format!(
            "{}.{}.{}",
            wiremesh_daemon::identity::b64url(br#"{"alg":"EdDSA","kid":"es-1"}"#),
            parts[1],
            parts[2]
        );
        let none = format!(
            "{}.{}.",
            wiremesh_daemon::identity::b64url(br#"{"alg":"none","typ":"JWT"}"#),
            wiremesh_daemon::identity::b64url(claims(&|_| {}).to_string().as_bytes())
        );
        for (what, token, code) in [
            ("bad signature", &bad_sig, "bad_signature"),
            ("forged payload", &forged, "bad_signature"),
            ("alg none", &none, "alg_refused"),
            ("alg swapped", &swapped, "alg_mismatch"),
        ] {
            let (s, got, msg) = refused(register(&c, 1, &client_id, token, &["tag:ci"]).await);
            assert_eq!((s, got.as_str()), (401, code), "{what}: {msg}");
        }
        assert!(nodes(&c, &admin).await.is_empty(), "nothing refused registered a node");

        // A good token registers a tagged node (pre-authorized, no auth key).
        let node = register(&c, 1, &client_id, &good, &["tag:ci"]).await.unwrap();
        assert_eq!(
            (node.tags.clone(), node.owner.as_str(), node.ephemeral),
            (vec!["tag:ci".to_string()], "tagged-devices", false)
        );
        // The same token again: its jti is spent.
        let (s, code, msg) = refused(register(&c, 2, &client_id, &good, &["tag:ci"]).await);
        assert_eq!((s, code.as_str()), (401, "jti_reused"), "{msg}");
        // EdDSA works too, with both tags.
        let n2 = register(&c, 3, &client_id, &ed.sign(&claims(&|_| {})), &["tag:web", "tag:ci"]).await.unwrap();
        assert_eq!(n2.tags, ["tag:web", "tag:ci"]);

        // An unknown key: refused after a refetch of the JWKS...
        let es2 = TestKey::es256("es-2");
        let before = issuer.fetches();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let (s, code, msg) = refused(register(&c, 4, &client_id, &es2.sign(&claims(&|_| {})), &["tag:ci"]).await);
        assert_eq!((s, code.as_str()), (401, "unknown_key"), "{msg}");
        assert_eq!(issuer.fetches(), before + 1, "the unknown kid refetched the JWKS once");
        // ...and a second unknown kid at once does not fetch again (rate limit).
        let (_, code, _) = refused(register(&c, 4, &client_id, &es2.sign(&claims(&|_| {})), &["tag:ci"]).await);
        assert_eq!(code, "unknown_key");
        assert_eq!(issuer.fetches(), before + 1, "rate-limited");
        // The issuer rotates in the new key: the next unknown kid refetches and it verifies.
        issuer.publish(&[&es.jwk, &ed.jwk, &es2.jwk]);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let n3 = register(&c, 4, &client_id, &es2.sign(&claims(&|_| {})), &["tag:web"]).await.unwrap();
        assert_eq!(n3.tags, ["tag:web"]);
        // Known keys come from the cache.
        let fetched = issuer.fetches();
        register(&c, 5, &client_id, &es.sign(&claims(&|_| {})), &["tag:ci"]).await.unwrap();
        assert_eq!(issuer.fetches(), fetched);

        // A wiremesh issuer's token (our identity::jwt, its workload-token
        // claims) is verified the same way, from that issuer's JWKS.
        let set =
            wiremesh_daemon::identity::keys::KeySet::generate(wiremesh_daemon::identity::keys::Algorithm::EdDSA, t)
                .unwrap();
        let ours: Vec<Jwk> = serde_json::from_value(
            serde_json::to_value(wiremesh_daemon::identity::oidc::jwks(&set)).unwrap()["keys"].clone(),
        )
        .unwrap();
        let mut published = vec![&es.jwk, &ed.jwk, &es2.jwk];
        published.extend(ours.iter());
        issuer.publish(&published);
        let mut wc =
            wiremesh_daemon::identity::jwt::Claims::new(&issuer.url, "ws-1/node-7", &cred.audience, t, 600).unwrap();
        wc.extra.insert("tags".into(), json!(["tag:build"]));
        let workload = wiremesh_daemon::identity::jwt::sign(set.current(), &wc).unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let n4 = register(&c, 6, &client_id, &workload, &["tag:ci"]).await.unwrap();
        assert_eq!(n4.tags, ["tag:ci"]);
        assert_eq!(nodes(&c, &admin).await.len(), 5);
    });

    // The real node agent joins with a token from a file (userspace: no root, no TUN).
    let token_file = state.with_extension("token");
    std::fs::write(&token_file, es.sign(&claims(&|_| {}))).unwrap();
    let agent_state = state.with_extension("agent");
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_wiremeshd"))
        .args(["node", "--userspace", "--control", &server.url.to_string(), "--client-id", &client_id])
        .args(["--id-token-file", token_file.to_str().unwrap(), "--advertise-tags", "tag:web"])
        .args(["--hostname", "fed-agent", "--tun", "wmfed0", "--state"])
        .arg(&agent_state)
        .arg("--socket")
        .arg(agent_state.join("api.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let list = rt.block_on(nodes(&c, &admin));
        if let Some(n) = list.iter().find(|n| n.name == "fed-agent" && n.online) {
            break Some(n.clone());
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = agent.kill();
    let _ = agent.wait();
    let seen = seen.expect("the agent registered with its ID token and opened its map stream");
    assert_eq!(seen.tags, ["tag:web"]);

    // Removing the credential: its client ID no longer registers anything.
    let out = cli(&server, &["federation", "remove", &cred.credential.id.to_string(), "--output", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (s, code, _) = refused(rt.block_on(register(&c, 9, &client_id, &es.sign(&claims(&|_| {})), &["tag:ci"])));
    assert_eq!((s, code.as_str()), (401, "unknown_client_id"));
    let out = cli(&server, &["federation", "remove", &cred.credential.id.to_string()]);
    assert!(!out.status.success());

    for p in [&ca_file, &token_file] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir_all(&agent_state);
    let _ = std::fs::remove_dir_all(&state);
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// The same store code on PostgreSQL: a credential made over the admin API,
/// a node registered, and after a restart of the control server on the same
/// database the credential still registers and the spent `jti` is still spent.
#[test]
fn federation_state_lives_in_postgresql_across_a_restart() {
    let Some(store) = control_server::Store::postgres("identity_federation_postgres") else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let issuer = rt.block_on(start_issuer(rt.handle()));
    let es = TestKey::es256("pg-1");
    issuer.publish(&[&es.jwk]);
    let ca_file = std::env::temp_dir().join(format!("wiremesh-federation-pg-{}.ca.pem", std::process::id()));
    std::fs::write(&ca_file, &issuer.ca_pem).unwrap();
    // A fixed public URL, so the audience survives the restart on another port.
    let args = [
        "--relay",
        "off",
        "--identity",
        "off",
        "--identity-issuer",
        "https://control.test",
        "--federation-ca",
        ca_file.to_str().unwrap(),
    ];
    let server = store.start_with(&args);
    let admin = server.token.clone().unwrap();
    let c = Client::new(server.url.clone());
    let req = wiremesh_daemon::control::federation::CreateCredentialRequest {
        issuer: issuer.url.clone(),
        subject: "repo:wiremesh/*".into(),
        tags: vec!["tag:ci".into()],
        ephemeral: true,
    };
    let cred: CredentialInfo =
        rt.block_on(c.json(hyper::Method::POST, "/api/v1/admin/federation", Some(&req), Some(&admin))).unwrap();
    let t = now();
    let token = |jti: &str| {
        es.sign(&json!({"iss": issuer.url, "sub": "repo:wiremesh/main", "aud": cred.audience, "iat": t,
                        "exp": t + 300, "jti": jti}))
    };
    let first = token("pg-jti-1");
    let node = rt.block_on(register(&c, 1, &cred.credential.client_id, &first, &["tag:ci"])).unwrap();
    assert_eq!((node.tags.clone(), node.ephemeral), (vec!["tag:ci".to_string()], true));
    drop(server);

    let server = store.start_with(&args);
    let c = Client::new(server.url.clone());
    let (s, code, _) = refused(rt.block_on(register(&c, 2, &cred.credential.client_id, &first, &["tag:ci"])));
    assert_eq!((s, code.as_str()), (401, "jti_reused"), "the spent jti is in the database");
    let n2 = rt.block_on(register(&c, 2, &cred.credential.client_id, &token("pg-jti-2"), &["tag:ci"])).unwrap();
    assert!(n2.ephemeral);
    let list: Vec<CredentialInfo> =
        rt.block_on(c.json(hyper::Method::GET, "/api/v1/admin/federation", None::<&()>, Some(&admin))).unwrap();
    assert_eq!(list.len(), 1);
    let _ = std::fs::remove_file(&ca_file);
}
