//! The `wiremesh` CLI's admin verbs, run as a real binary against a real
//! `wiremeshd control` on loopback (no root needed), and the node-side
//! `POST /api/v1/logout` the agent's `wiremesh logout` uses; each test on
//! SQLite and on PostgreSQL (a private cluster, skipped outside CI when
//! PostgreSQL is not installed).

use std::process::{Command, Output};
use std::time::Duration;
use wiremesh_daemon::control::client::{Client, ClientError};
use wiremesh_daemon::control::proto::{self, AdminNode, LogoutRequest, NodeInfo, RegisterRequest};
use wiremesh_daemon::node::keys::MachineKey;

#[path = "support/control.rs"]
mod control_server;

use control_server::{Server, Store};

const WIREMESH: &str = env!("CARGO_BIN_EXE_wiremesh");

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// `wiremesh ARGS --control URL --admin-token TOKEN`.
fn admin(server: &Server, args: &[&str]) -> Output {
    let url = server.url.to_string();
    Command::new(WIREMESH)
        .args(args)
        .args(["--control", &url, "--admin-token", server.token.as_deref().unwrap()])
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn listed(server: &Server) -> Vec<AdminNode> {
    serde_json::from_str(&ok(&admin(server, &["nodes", "list", "--json"]))).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn register(c: &Client, machine: &MachineKey, node_key: &str, auth_key: &str, host: &str) -> NodeInfo {
    let challenge = c.challenge().await.unwrap();
    let mut req = RegisterRequest {
        auth_key: auth_key.into(),
        machine_key: machine.public_hex(),
        node_key: node_key.into(),
        hostname: host.into(),
        endpoints: vec!["192.0.2.1:41641".into()],
        challenge: proto::hex(&challenge),
        signature: String::new(),
    };
    req.signature = machine.sign_hex(&proto::register_message(&challenge, &c.url().fingerprint, &req));
    c.json(hyper::Method::POST, "/api/v1/register", Some(&req), None).await.unwrap()
}

fn nodes_expire_sets_clears_and_expires_node_keys(store: &Store) {
    let server = store.start();
    let key = ok(&admin(&server, &["keys", "create", "--reusable"])).trim().to_string();
    let client = Client::new(server.url.clone());
    let rt = rt();
    for (n, host) in [(1u8, "web"), (2, "db")] {
        let machine = MachineKey::generate().unwrap().0;
        rt.block_on(register(&client, &machine, &proto::b64_key(&[n; 32]), &key, host));
    }
    let web = |s: &Server| listed(s).into_iter().find(|n| n.node.name == "web").unwrap();
    assert_eq!((web(&server).key_expires_at, web(&server).expired), (None, false));

    // --in: an expiry that far ahead, by name or by id.
    let t0 = now();
    let text = ok(&admin(&server, &["nodes", "expire", "web", "--in", "1h"]));
    assert!(text.starts_with("web.wiremesh.internal: key expires at "), "{text}");
    let at = web(&server).key_expires_at.unwrap();
    assert!((t0 + 3600..=now() + 3600).contains(&at), "{at} vs {t0}");
    assert!(!web(&server).expired);
    let id = web(&server).node.id.to_string();
    let json = ok(&admin(&server, &["nodes", "expire", &id, "--in", "2d", "--json"]));
    let n: AdminNode = serde_json::from_str(&json).unwrap();
    assert!(n.key_expires_at.unwrap() >= t0 + 2 * 86400 && !n.expired, "{json}");

    // --now: expired at once; the other node is untouched.
    let text = ok(&admin(&server, &["nodes", "expire", "web", "--now"]));
    assert_eq!(text.trim(), "web.wiremesh.internal: key expired");
    assert!(web(&server).expired);
    let db = listed(&server).into_iter().find(|n| n.node.name == "db").unwrap();
    assert_eq!((db.key_expires_at, db.expired), (None, false));

    // --never: cleared, the node is back.
    let text = ok(&admin(&server, &["nodes", "expire", "web", "--never"]));
    assert_eq!(text.trim(), "web.wiremesh.internal: key never expires");
    assert_eq!((web(&server).key_expires_at, web(&server).expired), (None, false));

    // Bad use: no choice, two choices, a bad duration, an unknown node, a
    // wrong admin token; nothing changes.
    assert!(err(&admin(&server, &["nodes", "expire", "web"])).contains("--in"));
    assert!(err(&admin(&server, &["nodes", "expire", "web", "--now", "--never"])).contains("cannot be used with"));
    assert!(err(&admin(&server, &["nodes", "expire", "web", "--in", "1y"])).contains("bad duration unit"));
    assert!(err(&admin(&server, &["nodes", "expire", "web", "--in", "soon"])).contains("bad duration"));
    assert!(err(&admin(&server, &["nodes", "expire", "nosuch", "--now"])).contains("no such node"));
    let url = server.url.to_string();
    let out = Command::new(WIREMESH)
        .args(["nodes", "expire", "web", "--now", "--control", &url, "--admin-token", "wmadmin-wrong"])
        .output()
        .unwrap();
    assert!(err(&out).contains("unauthorized"));
    assert_eq!((web(&server).key_expires_at, web(&server).expired), (None, false));
    drop(server);
}

async fn logout_req(c: &Client, machine: &MachineKey, node_key: &str) -> LogoutRequest {
    let challenge = c.challenge().await.unwrap();
    let mut req = LogoutRequest {
        machine_key: machine.public_hex(),
        node_key: node_key.into(),
        challenge: proto::hex(&challenge),
        signature: String::new(),
    };
    req.signature = machine.sign_hex(&proto::logout_message(&challenge, &c.url().fingerprint, &req));
    req
}

fn api_code(r: Result<serde_json::Value, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, body }) => (status, body.code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn logout_removes_only_the_signing_machine(store: &Store) {
    let server = store.start();
    let key = ok(&admin(&server, &["keys", "create", "--reusable"])).trim().to_string();
    let c = Client::new(server.url.clone());
    let rt = rt();
    let (a, b) = (MachineKey::generate().unwrap().0, MachineKey::generate().unwrap().0);
    let (ka, kb) = (proto::b64_key(&[1; 32]), proto::b64_key(&[2; 32]));
    rt.block_on(async {
        register(&c, &a, &ka, &key, "a").await;
        register(&c, &b, &kb, &key, "b").await;
        let path = "/api/v1/logout";
        let post = |req: &LogoutRequest| {
            let req = req.clone();
            let c = c.clone();
            async move { c.json::<serde_json::Value>(hyper::Method::POST, path, Some(&req), None).await }
        };
        // Forged: a's request signed by b.
        let mut forged = logout_req(&c, &b, &ka).await;
        forged.machine_key = a.public_hex();
        assert_eq!(api_code(post(&forged).await), (401, "bad_signature".into()));
        // A signature over other fields (the node key changed after signing).
        let mut changed = logout_req(&c, &a, &ka).await;
        changed.node_key = kb.clone();
        assert_eq!(api_code(post(&changed).await), (401, "bad_signature".into()));
        // An unknown machine.
        let stranger = MachineKey::generate().unwrap().0;
        assert_eq!(api_code(post(&logout_req(&c, &stranger, &ka).await).await), (401, "unknown_machine".into()));
        // Malformed: not JSON, bad key, bad challenge.
        let (status, _) = c.raw(hyper::Method::POST, path, b"{".to_vec(), None).await.unwrap();
        assert_eq!(status, 400);
        let mut bad = logout_req(&c, &a, &ka).await;
        bad.machine_key = "xyz".into();
        assert_eq!(api_code(post(&bad).await), (400, "bad_request".into()));
        let (status, _) = c.raw(hyper::Method::GET, path, Vec::new(), None).await.unwrap();
        assert_eq!(status, 405);
        // Nothing was removed so far.
        assert_eq!(listed(&server).len(), 2);

        // The real one: a is removed, b stays; the same request replayed is refused.
        let good = logout_req(&c, &a, &ka).await;
        let answer = post(&good).await.unwrap();
        assert!(answer["removed"].as_i64().is_some(), "{answer}");
        let names: Vec<String> = listed(&server).into_iter().map(|n| n.node.name).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(api_code(post(&good).await), (401, "bad_challenge".into()));
        // Logged out: a needs an auth key again, and gets a fresh node.
        assert_eq!(api_code(post(&logout_req(&c, &a, &ka).await).await), (401, "unknown_machine".into()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let again = register(&c, &a, &ka, &key, "a").await;
        assert_eq!(again.name, "a");
    });
    drop(server);
}

fn keys_with_a_key_expiry_give_their_nodes_one(store: &Store) {
    let server = store.start();
    let json = ok(&admin(&server, &["keys", "create", "--reusable", "--key-expiry", "30d", "--json"]));
    let created: proto::CreatedKey = serde_json::from_str(&json).unwrap();
    assert_eq!(created.info.node_key_expiry_secs, Some(30 * 86400), "{json}");
    let plain = ok(&admin(&server, &["keys", "create", "--reusable"])).trim().to_string();
    let listing = ok(&admin(&server, &["keys", "list"]));
    assert_eq!(listing.matches("key-expiry=2592000s").count(), 1, "{listing}");
    // Out of range: refused, and no key made.
    assert!(err(&admin(&server, &["keys", "create", "--key-expiry", "0"])).contains("bad_request"));
    assert!(err(&admin(&server, &["keys", "create", "--key-expiry", "4000d"])).contains("bad_request"));
    assert_eq!(ok(&admin(&server, &["keys", "list"])).lines().count(), 2);

    let c = Client::new(server.url.clone());
    let rt = rt();
    let (m1, m2) = (MachineKey::generate().unwrap().0, MachineKey::generate().unwrap().0);
    let t0 = now();
    rt.block_on(register(&c, &m1, &proto::b64_key(&[1; 32]), &created.key, "web"));
    rt.block_on(register(&c, &m2, &proto::b64_key(&[2; 32]), &plain, "db"));
    let node = |name: &str| listed(&server).into_iter().find(|n| n.node.name == name).unwrap();
    let at = node("web").key_expires_at.expect("an expiry from the key");
    assert!((t0 + 30 * 86400..=now() + 30 * 86400).contains(&at), "{at}");
    assert_eq!(node("db").key_expires_at, None);

    // Re-authentication takes the new key's expiry: none with a plain key,
    // the key's with a key that has one.
    ok(&admin(&server, &["nodes", "expire", "web", "--now"]));
    assert!(node("web").expired);
    rt.block_on(register(&c, &m1, &proto::b64_key(&[1; 32]), &plain, "web"));
    assert_eq!((node("web").key_expires_at, node("web").expired), (None, false));
    ok(&admin(&server, &["nodes", "expire", "db", "--now"]));
    let t1 = now();
    rt.block_on(register(&c, &m2, &proto::b64_key(&[2; 32]), &created.key, "db"));
    let at = node("db").key_expires_at.expect("the key's expiry");
    assert!((t1 + 30 * 86400..=now() + 30 * 86400).contains(&at) && !node("db").expired, "{at}");
    drop(server);
}

#[test]
fn tailnet_cli_nodes_expire_sets_clears_and_expires_node_keys() {
    nodes_expire_sets_clears_and_expires_node_keys(&Store::sqlite("cli-nodes-expire-sets-clears"));
}

#[test]
fn tailnet_cli_nodes_expire_sets_clears_and_expires_node_keys_on_postgres() {
    if let Some(store) = Store::postgres("tailnet_cli_nodes_expire_sets_clears_and_expires_node_keys_on_postgres") {
        nodes_expire_sets_clears_and_expires_node_keys(&store);
    }
}

#[test]
fn tailnet_cli_logout_removes_only_the_signing_machine() {
    logout_removes_only_the_signing_machine(&Store::sqlite("cli-logout-removes-only-the-"));
}

#[test]
fn tailnet_cli_logout_removes_only_the_signing_machine_on_postgres() {
    if let Some(store) = Store::postgres("tailnet_cli_logout_removes_only_the_signing_machine_on_postgres") {
        logout_removes_only_the_signing_machine(&store);
    }
}

#[test]
fn tailnet_cli_keys_with_a_key_expiry_give_their_nodes_one() {
    keys_with_a_key_expiry_give_their_nodes_one(&Store::sqlite("cli-keys-with-a-key-expiry-g"));
}

#[test]
fn tailnet_cli_keys_with_a_key_expiry_give_their_nodes_one_on_postgres() {
    if let Some(store) = Store::postgres("tailnet_cli_keys_with_a_key_expiry_give_their_nodes_one_on_postgres") {
        keys_with_a_key_expiry_give_their_nodes_one(&store);
    }
}

fn nodes_rename_and_tailnet_show(store: &Store) {
    let server = store.start();
    let key = ok(&admin(&server, &["keys", "create", "--reusable"])).trim().to_string();
    let client = Client::new(server.url.clone());
    let rt = rt();
    for (n, host) in [(1u8, "web"), (2, "db")] {
        let machine = MachineKey::generate().unwrap().0;
        rt.block_on(register(&client, &machine, &proto::b64_key(&[n; 32]), &key, host));
    }
    let names = |s: &Server| {
        let mut v: Vec<(String, String)> = listed(s).into_iter().map(|n| (n.node.name, n.node.fqdn)).collect();
        v.sort();
        v
    };

    // Renamed by name, then by id; the full name follows.
    let text = ok(&admin(&server, &["nodes", "rename", "web", "frontend"]));
    assert_eq!(text.trim(), "web is now frontend.wiremesh.internal");
    let id = listed(&server).into_iter().find(|n| n.node.name == "frontend").unwrap().node.id.to_string();
    ok(&admin(&server, &["nodes", "rename", &id, "frontend-2"]));
    assert_eq!(
        names(&server),
        vec![
            ("db".to_string(), "db.wiremesh.internal".to_string()),
            ("frontend-2".to_string(), "frontend-2.wiremesh.internal".to_string()),
        ]
    );

    // Refused, and nothing changes: a name another node has, names that are
    // not DNS labels, a node that does not exist.
    let before = names(&server);
    assert!(err(&admin(&server, &["nodes", "rename", "db", "frontend-2"])).contains("another node is named"));
    for bad in ["Front_End", "x-", "a.b", &"x".repeat(64)] {
        assert!(err(&admin(&server, &["nodes", "rename", "db", bad])).contains("is not a DNS label"), "{bad}");
    }
    assert!(err(&admin(&server, &["nodes", "rename", "nosuch", "x"])).contains("no such node"));
    assert_eq!(names(&server), before);

    // The tailnet's settings.
    let t: proto::TailnetInfo = serde_json::from_str(&ok(&admin(&server, &["tailnet", "show", "--json"]))).unwrap();
    assert_eq!(t.domain, "wiremesh.internal");
    assert_eq!(t.ipv4_range, "100.64.0.0/10");
    assert!(t.ipv6_range.starts_with("fd") && t.ipv6_range.ends_with("::/48"), "{}", t.ipv6_range);
    assert_eq!(t.cert_sha256, proto::hex(&server.url.fingerprint));
    let text = ok(&admin(&server, &["tailnet", "show"]));
    assert!(text.contains("domain:         wiremesh.internal") && text.contains(&t.cert_sha256), "{text}");
    drop(server);
}

#[test]
fn tailnet_cli_nodes_rename_and_tailnet_show() {
    nodes_rename_and_tailnet_show(&Store::sqlite("cli-nodes-rename-and-tailnet"));
}

#[test]
fn tailnet_cli_nodes_rename_and_tailnet_show_on_postgres() {
    if let Some(store) = Store::postgres("tailnet_cli_nodes_rename_and_tailnet_show_on_postgres") {
        nodes_rename_and_tailnet_show(&store);
    }
}
