//! The control server's HTTPS API against a real `wiremeshd control` on
//! loopback (no root needed): registration with machine-key proof, map
//! streams and how fast a change reaches them, and bad input refused with
//! the right status and nothing stored.

use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use wiremesh_daemon::control::client::{Client, ClientError};
use wiremesh_daemon::control::proto::{self, NodeInfo, StreamMessage};

#[path = "support/control.rs"]
mod control_server;

use control_server::{stream_lines, Store, TestNode, TEST_ENDPOINT};

/// These tests are about the control API and its store: without the
/// identity service's own node and key, which would show in their counts.
const NO_IDENTITY: &[&str] = &["--identity", "off"];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn admin_nodes(c: &Client, token: &str) -> Vec<NodeInfo> {
    c.json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(token)).await.unwrap()
}

async fn new_key(c: &Client, token: &str, reusable: bool) -> String {
    let req = proto::CreateKeyRequest { reusable, ..Default::default() };
    let k: proto::CreatedKey =
        c.json(hyper::Method::POST, "/api/v1/admin/keys", Some(&req), Some(token)).await.unwrap();
    k.key
}

fn assert_json_error(status: u16, body: &[u8], want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "body: {}", String::from_utf8_lossy(body));
    let e: proto::ErrorBody = serde_json::from_slice(body).expect("a JSON error body");
    assert_eq!(e.code, want_code, "{e:?}");
    assert!(!e.error.is_empty());
}

async fn next_map(rx: &mut tokio::sync::mpsc::UnboundedReceiver<StreamMessage>) -> proto::NetworkMap {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a map within 5s") {
            Some(StreamMessage::Map(m)) => return *m,
            Some(StreamMessage::Keepalive) => continue,
            other => panic!("unexpected stream message {other:?}"),
        }
    }
}

#[test]
fn tailnet_api_maps_stream_changes_within_a_second_and_survive_restart() {
    maps_stream_changes_within_a_second_and_survive_restart(&Store::sqlite("api-stream"));
}

#[test]
fn tailnet_api_on_postgres_maps_stream_changes_within_a_second_and_survive_restart() {
    if let Some(store) =
        Store::postgres("tailnet_api_maps_stream_changes_within_a_second_and_survive_restart_on_postgres")
    {
        maps_stream_changes_within_a_second_and_survive_restart(&store);
    }
}

fn maps_stream_changes_within_a_second_and_survive_restart(store: &Store) {
    let server = store.start_with(NO_IDENTITY);
    let token = server.token.clone().expect("first start prints the admin token");
    let c = Client::new(server.url.clone());
    let rt = rt();
    rt.block_on(async {
        let key = new_key(&c, &token, true).await;
        let a = TestNode::new(1);
        let na = a.register(&c, &key, "Alpha Host").await.unwrap();
        assert_eq!(na.name, "alpha-host");
        assert_eq!(na.ipv4.octets()[..2], [100, 64]);
        let resp =
            c.send(hyper::Method::POST, "/api/v1/map", serde_json::to_vec(&a.signed_map_req(&c).await).unwrap(), None);
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut rx = stream_lines(resp.into_body());
        let m = next_map(&mut rx).await;
        assert_eq!(m.self_node.id, na.id);
        assert!(m.peers.is_empty());
        assert_eq!(m.filter, proto::FilterRule::allow_all());
        // Online state of self arrives with the stream.
        let m = if m.self_node.online { m } else { next_map(&mut rx).await };
        assert!(m.self_node.online);

        let b = TestNode::new(2);
        let t0 = Instant::now();
        let nb = b.register(&c, &key, "alpha-host").await.unwrap();
        assert_eq!(nb.name, "alpha-host-2", "names are suffixed on collision");
        let m = next_map(&mut rx).await;
        let took = t0.elapsed();
        assert_eq!(m.peers.len(), 1);
        let p = &m.peers[0];
        assert_eq!((p.id, p.node_key.as_str(), p.online), (nb.id, nb.node_key.as_str(), false));
        assert_eq!(p.allowed_ips, vec![format!("{}/32", nb.ipv4), format!("{}/128", nb.ipv6)]);
        assert_eq!(p.endpoints, vec!["192.0.2.1:41641".to_string()]);
        // Pushed, not polled: the figure is printed; the bound only catches a
        // change that waited for some periodic refresh (speed is measured by
        // benchmarks, not asserted on a shared machine).
        assert!(took < Duration::from_secs(5), "change took {took:?}");
        eprintln!("registration to map update: {took:?}");

        // Removal reaches the stream too.
        let t0 = Instant::now();
        let _: serde_json::Value = c
            .json(hyper::Method::DELETE, &format!("/api/v1/admin/nodes/{}", nb.name), None::<&()>, Some(&token))
            .await
            .unwrap();
        let m = next_map(&mut rx).await;
        assert!(m.peers.is_empty());
        let took = t0.elapsed();
        eprintln!("removal to map update: {took:?}");
        assert!(took < Duration::from_secs(5), "removal took {took:?}");
    });
    drop(server);
    // Everything acknowledged is there after a restart; no new admin token.
    let server = store.start_with(NO_IDENTITY);
    assert!(server.token.is_none());
    let c = Client::new(server.url.clone());
    rt.block_on(async {
        let nodes = admin_nodes(&c, &token).await;
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].name, "alpha-host");
    });
    drop(server);
}

#[test]
fn tailnet_api_bad_input_is_refused_and_nothing_stored() {
    bad_input_is_refused_and_nothing_stored(&Store::sqlite("api-bad"));
}

#[test]
fn tailnet_api_on_postgres_bad_input_is_refused_and_nothing_stored() {
    if let Some(store) = Store::postgres("tailnet_api_bad_input_is_refused_and_nothing_stored_on_postgres") {
        bad_input_is_refused_and_nothing_stored(&store);
    }
}

fn bad_input_is_refused_and_nothing_stored(store: &Store) {
    let server = store.start_with(NO_IDENTITY);
    let token = server.token.clone().unwrap();
    let c = Client::new(server.url.clone());
    rt().block_on(async {
        let post = |path: &'static str, body: &'static [u8], bearer: Option<String>| {
            let c = c.clone();
            async move { c.raw(hyper::Method::POST, path, body.to_vec(), bearer.as_deref()).await.unwrap() }
        };
        // Malformed JSON, wrong shapes.
        let (s, b) = post("/api/v1/register", b"{not json", None).await;
        assert_json_error(s, &b, 400, "bad_request");
        let (s, b) = post("/api/v1/register", br#"{"auth_key": 5}"#, None).await;
        assert_json_error(s, &b, 400, "bad_request");
        let (s, b) = post("/api/v1/map", b"[]", None).await;
        assert_json_error(s, &b, 400, "bad_request");
        let big: &'static [u8] = Box::leak(vec![b' '; 100 * 1024].into_boxed_slice());
        let (s, b) = post("/api/v1/register", big, None).await;
        assert_json_error(s, &b, 413, "too_large");
        let (s, b) = c.raw(hyper::Method::GET, "/api/v1/nope", vec![], None).await.unwrap();
        assert_json_error(s, &b, 404, "not_found");
        let (s, b) = c.raw(hyper::Method::GET, "/api/v1/register", vec![], None).await.unwrap();
        assert_json_error(s, &b, 405, "method_not_allowed");

        // Admin calls without or with a wrong token.
        let (s, b) = post("/api/v1/admin/keys", b"{}", None).await;
        assert_json_error(s, &b, 401, "unauthorized");
        let (s, b) = post("/api/v1/admin/keys", b"{}", Some("wmadmin-wrong".into())).await;
        assert_json_error(s, &b, 401, "unauthorized");
        let (s, b) = post("/api/v1/admin/keys", b"{\"reusable\": \"yes\"}", Some(token.clone())).await;
        assert_json_error(s, &b, 400, "bad_request");
        let (s, b) = post("/api/v1/admin/keys", b"{\"tags\": [\"web\"]}", Some(token.clone())).await;
        assert_json_error(s, &b, 400, "bad_request");
        let keys: Vec<proto::AuthKeyInfo> =
            c.json(hyper::Method::GET, "/api/v1/admin/keys", None::<&()>, Some(&token)).await.unwrap();
        assert!(keys.is_empty(), "refused key requests stored nothing");

        // A one-off key registers once.
        let key = new_key(&c, &token, false).await;
        let a = TestNode::new(1);
        a.register(&c, &key, "a").await.unwrap();
        let b = TestNode::new(2);
        match b.register(&c, &key, "b").await {
            Err(ClientError::Api { status: 401, body }) => assert_eq!(body.code, "key_spent"),
            other => panic!("spent key accepted: {other:?}"),
        }
        // Unknown key.
        match b.register(&c, "wmkey-00", "b").await {
            Err(ClientError::Api { status: 401, body }) => assert_eq!(body.code, "invalid_auth_key"),
            other => panic!("unknown key accepted: {other:?}"),
        }

        let key = new_key(&c, &token, true).await;
        // A forged registration: signed by another machine key.
        let mut req = b.register_req(&c, &key, "b", &[TEST_ENDPOINT]).await;
        req.machine_key = TestNode::new(3).machine.public_hex();
        let (s, body) =
            c.raw(hyper::Method::POST, "/api/v1/register", serde_json::to_vec(&req).unwrap(), None).await.unwrap();
        assert_json_error(s, &body, 401, "bad_signature");
        // A replayed one: the challenge is good once.
        let req = b.register_req(&c, &key, "b", &[TEST_ENDPOINT]).await;
        let bytes = serde_json::to_vec(&req).unwrap();
        let (s, _) = c.raw(hyper::Method::POST, "/api/v1/register", bytes.clone(), None).await.unwrap();
        assert_eq!(s, 200);
        let _: serde_json::Value =
            c.json(hyper::Method::DELETE, "/api/v1/admin/nodes/b", None::<&()>, Some(&token)).await.unwrap();
        let (s, body) = c.raw(hyper::Method::POST, "/api/v1/register", bytes, None).await.unwrap();
        assert_json_error(s, &body, 401, "bad_challenge");
        // A challenge someone made up.
        let mut req = b.register_req(&c, &key, "b", &[TEST_ENDPOINT]).await;
        req.challenge = proto::hex(&[0u8; 32]);
        let (s, body) =
            c.raw(hyper::Method::POST, "/api/v1/register", serde_json::to_vec(&req).unwrap(), None).await.unwrap();
        assert_json_error(s, &body, 401, "bad_challenge");
        // A map stream for a machine the server does not know.
        let req = TestNode::new(4).signed_map_req(&c).await;
        let (s, body) =
            c.raw(hyper::Method::POST, "/api/v1/map", serde_json::to_vec(&req).unwrap(), None).await.unwrap();
        assert_json_error(s, &body, 401, "unknown_machine");

        let nodes = admin_nodes(&c, &token).await;
        assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), vec!["a"], "only the good registration");
        // The server still serves after all that.
        let (s, _) = c.raw(hyper::Method::GET, "/api/v1/health", vec![], None).await.unwrap();
        assert_eq!(s, 200);
    });
    drop(server);
}

#[test]
fn tailnet_api_client_refuses_a_server_with_another_certificate() {
    client_refuses_a_server_with_another_certificate(&Store::sqlite("api-pin"));
}

#[test]
fn tailnet_api_on_postgres_client_refuses_a_server_with_another_certificate() {
    if let Some(store) = Store::postgres("tailnet_api_client_refuses_a_server_with_another_certificate_on_postgres") {
        client_refuses_a_server_with_another_certificate(&store);
    }
}

fn client_refuses_a_server_with_another_certificate(store: &Store) {
    let server = store.start_with(NO_IDENTITY);
    let mut wrong = server.url.clone();
    wrong.fingerprint[0] ^= 1;
    let c = Client::new(wrong);
    rt().block_on(async {
        match c.challenge().await {
            Err(ClientError::Transport(e)) => assert!(e.contains("certificate") || e.contains("Certificate"), "{e}"),
            other => panic!("connected to an unpinned server: {other:?}"),
        }
    });
    drop(server);
}

#[test]
fn tailnet_api_ephemeral_nodes_go_soon_after_they_go_offline() {
    ephemeral_nodes_go_soon_after_they_go_offline(&Store::sqlite("api-ephemeral"));
}

#[test]
fn tailnet_api_on_postgres_ephemeral_nodes_go_soon_after_they_go_offline() {
    if let Some(store) = Store::postgres("tailnet_api_ephemeral_nodes_go_soon_after_they_go_offline_on_postgres") {
        ephemeral_nodes_go_soon_after_they_go_offline(&store);
    }
}

fn ephemeral_nodes_go_soon_after_they_go_offline(store: &Store) {
    let server = store.start_with(&["--ephemeral-grace-secs", "1", "--identity", "off"]);
    let token = server.token.clone().unwrap();
    let c = Client::new(server.url.clone());
    rt().block_on(async {
        let req = proto::CreateKeyRequest { ephemeral: true, ..Default::default() };
        let k: proto::CreatedKey =
            c.json(hyper::Method::POST, "/api/v1/admin/keys", Some(&req), Some(&token)).await.unwrap();
        assert!(k.info.ephemeral);
        let e = TestNode::new(1);
        let ne = e.register(&c, &k.key, "eph").await.unwrap();
        assert!(ne.ephemeral);
        let keep = TestNode::new(2);
        keep.register(&c, &new_key(&c, &token, false).await, "keep").await.unwrap();
        let req = serde_json::to_vec(&e.signed_map_req(&c).await).unwrap();
        let resp = c.send(hyper::Method::POST, "/api/v1/map", req, None).await.unwrap();
        let mut body = resp.into_body();
        assert!(body.frame().await.is_some());
        // Online for longer than the grace period: kept.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let nodes = admin_nodes(&c, &token).await;
        assert_eq!(nodes.len(), 2);
        assert!(nodes.iter().any(|n| n.id == ne.id && n.online));
        // Offline: removed after the grace period; the other node stays.
        drop(body);
        let t0 = Instant::now();
        loop {
            let nodes = admin_nodes(&c, &token).await;
            if nodes.len() == 1 {
                assert_eq!(nodes[0].name, "keep");
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "ephemeral node still there: {nodes:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("ephemeral node removed {:?} after its stream closed (grace 1s)", t0.elapsed());
    });
    drop(server);
}

async fn open_map(c: &Client, n: &TestNode) -> tokio::sync::mpsc::UnboundedReceiver<StreamMessage> {
    let resp =
        c.send(hyper::Method::POST, "/api/v1/map", serde_json::to_vec(&n.signed_map_req(c).await).unwrap(), None);
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    stream_lines(resp.into_body())
}

/// Reads maps until one satisfies `want`.
async fn map_until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<StreamMessage>,
    want: impl Fn(&proto::NetworkMap) -> bool,
) -> proto::NetworkMap {
    loop {
        let m = next_map(rx).await;
        if want(&m) {
            return m;
        }
    }
}

async fn set_expiry(c: &Client, token: &str, node: &str, body: &[u8]) -> (u16, bytes::Bytes) {
    let path = format!("/api/v1/admin/nodes/{node}/expiry");
    c.raw(hyper::Method::POST, &path, body.to_vec(), Some(token)).await.unwrap()
}

#[test]
fn tailnet_api_expired_node_key_leaves_every_map_until_it_re_authenticates() {
    expired_node_key_leaves_every_map_until_it_re_authenticates(&Store::sqlite("api-expiry"));
}

#[test]
fn tailnet_api_on_postgres_expired_node_key_leaves_every_map_until_it_re_authenticates() {
    if let Some(store) =
        Store::postgres("tailnet_api_expired_node_key_leaves_every_map_until_it_re_authenticates_on_postgres")
    {
        expired_node_key_leaves_every_map_until_it_re_authenticates(&store);
    }
}

fn expired_node_key_leaves_every_map_until_it_re_authenticates(store: &Store) {
    let server = store.start_with(NO_IDENTITY);
    let token = server.token.clone().unwrap();
    let c = Client::new(server.url.clone());
    rt().block_on(async {
        let key = new_key(&c, &token, true).await;
        let (a, b) = (TestNode::new(1), TestNode::new(2));
        let na = a.register(&c, &key, "a").await.unwrap();
        let nb = b.register(&c, &key, "b").await.unwrap();
        let mut ra = open_map(&c, &a).await;
        let mut rb = open_map(&c, &b).await;
        map_until(&mut ra, |m| m.peers.iter().any(|p| p.id == nb.id && p.online)).await;
        map_until(&mut rb, |m| m.peers.iter().any(|p| p.id == na.id)).await;

        // Bad expiry calls are refused.
        let (s, body) = set_expiry(&c, &token, "nope", b"{\"expiry_secs\": 1}").await;
        assert_json_error(s, &body, 404, "not_found");
        let (s, body) = set_expiry(&c, &token, "b", b"{\"expiry_secs\": -1}").await;
        assert_json_error(s, &body, 400, "bad_request");
        let (s, body) = set_expiry(&c, "wmadmin-wrong", "b", b"{}").await;
        assert_json_error(s, &body, 401, "unauthorized");

        // b's key expires in a second: the server's timer drops it from a's
        // map and ends b's stream asking for re-authentication.
        let (s, body) = set_expiry(&c, &token, "b", b"{\"expiry_secs\": 1}").await;
        assert_eq!(s, 200);
        let info: proto::AdminNode = serde_json::from_slice(&body).unwrap();
        assert_eq!(info.node.id, nb.id);
        assert!(!info.expired && info.key_expires_at.is_some());
        let t0 = Instant::now();
        let m = map_until(&mut ra, |m| m.peers.is_empty()).await;
        let took = t0.elapsed();
        assert_eq!(m.self_node.id, na.id);
        // The server's own timer acts at the expiry (1 s ahead), not a sweep.
        assert!(took < Duration::from_secs(6), "expiry took {took:?} to reach the peer");
        eprintln!("expiry (set to 1 s ahead) left the peer's map after {took:?}");
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rb.recv()).await.expect("b's stream ends") {
                Some(StreamMessage::Error(e)) => {
                    assert_eq!(e.code, "node_expired");
                    assert!(e.error.contains("re-authenticate"), "{}", e.error);
                    break;
                }
                Some(StreamMessage::Map(m)) => assert!(t0.elapsed() < Duration::from_secs(8), "{m:?}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(rb.recv().await.is_none(), "the stream ends after the error");
        let nodes: Vec<proto::AdminNode> =
            c.json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(&token)).await.unwrap();
        let eb = nodes.iter().find(|n| n.node.id == nb.id).expect("an expired node stays listed");
        assert!(eb.expired);
        assert!(nodes.iter().any(|n| n.node.id == na.id && !n.expired && n.key_expires_at.is_none()));

        // An expired node cannot open a stream or refresh itself without a key.
        let req = b.signed_map_req(&c).await;
        let (s, body) =
            c.raw(hyper::Method::POST, "/api/v1/map", serde_json::to_vec(&req).unwrap(), None).await.unwrap();
        assert_json_error(s, &body, 401, "node_expired");
        match b.register(&c, "", "b").await {
            Err(ClientError::Api { status: 401, body }) => assert_eq!(body.code, "invalid_auth_key"),
            other => panic!("expired node refreshed without a key: {other:?}"),
        }
        let revoked = new_key(&c, &token, false).await;
        let keys: Vec<proto::AuthKeyInfo> =
            c.json(hyper::Method::GET, "/api/v1/admin/keys", None::<&()>, Some(&token)).await.unwrap();
        let id = keys.last().unwrap().id;
        let _: serde_json::Value = c
            .json(hyper::Method::DELETE, &format!("/api/v1/admin/keys/{id}"), None::<&()>, Some(&token))
            .await
            .unwrap();
        match b.register(&c, &revoked, "b").await {
            Err(ClientError::Api { status: 401, body }) => assert_eq!(body.code, "key_revoked"),
            other => panic!("expired node refreshed with a revoked key: {other:?}"),
        }

        // Re-authentication with a valid (one-off) key: same node, same
        // addresses and name, back in a's map; the key is spent.
        let fresh = new_key(&c, &token, false).await;
        let again = b.register(&c, &fresh, "b").await.unwrap();
        assert_eq!(
            (again.id, again.ipv4, again.ipv6, again.name.as_str()),
            (nb.id, nb.ipv4, nb.ipv6, nb.name.as_str())
        );
        let mut rb = open_map(&c, &b).await;
        let m = map_until(&mut rb, |m| m.peers.iter().any(|p| p.id == na.id)).await;
        assert_eq!(m.self_node.ipv4, nb.ipv4);
        map_until(&mut ra, |m| m.peers.iter().any(|p| p.id == nb.id && p.online)).await;
        let keys: Vec<proto::AuthKeyInfo> =
            c.json(hyper::Method::GET, "/api/v1/admin/keys", None::<&()>, Some(&token)).await.unwrap();
        assert!(keys.last().unwrap().spent);

        // Expiry 0 is immediate; `null` clears a pending one.
        let (s, _) = set_expiry(&c, &token, &nb.id.to_string(), b"{\"expiry_secs\": 3600}").await;
        assert_eq!(s, 200);
        let (s, body) = set_expiry(&c, &token, "b", b"{\"expiry_secs\": null}").await;
        assert_eq!(s, 200);
        let info: proto::AdminNode = serde_json::from_slice(&body).unwrap();
        assert_eq!((info.key_expires_at, info.expired), (None, false));
        let (s, body) = set_expiry(&c, &token, "a", b"{\"expiry_secs\": 0}").await;
        assert_eq!(s, 200);
        let info: proto::AdminNode = serde_json::from_slice(&body).unwrap();
        assert!(info.expired);
        map_until(&mut rb, |m| m.peers.is_empty()).await;
    });
    drop(server);
}

/// The next line of a version 2 stream and its length in bytes.
async fn next_v2(v2: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) -> (proto::StreamMessageV2, usize) {
    let line = tokio::time::timeout(Duration::from_secs(5), v2.recv()).await.expect("a line within 5s").unwrap();
    (serde_json::from_slice(&line).unwrap(), line.len())
}

#[test]
fn tailnet_api_version_2_streams_send_deltas_that_rebuild_the_full_maps() {
    version_2_streams_send_deltas_that_rebuild_the_full_maps(&Store::sqlite("api-delta"));
}

#[test]
fn tailnet_api_on_postgres_version_2_streams_send_deltas_that_rebuild_the_full_maps() {
    if let Some(store) =
        Store::postgres("tailnet_api_version_2_streams_send_deltas_that_rebuild_the_full_maps_on_postgres")
    {
        version_2_streams_send_deltas_that_rebuild_the_full_maps(&store);
    }
}

fn version_2_streams_send_deltas_that_rebuild_the_full_maps(store: &Store) {
    let server = store.start_with(NO_IDENTITY);
    let token = server.token.clone().unwrap();
    let c = Client::new(server.url.clone());
    rt().block_on(async {
        let key = new_key(&c, &token, true).await;
        let a = TestNode::new(1);
        let na = a.register(&c, &key, "a").await.unwrap();
        for n in 10..30u8 {
            TestNode::new(n).register(&c, &key, &format!("n{n}")).await.unwrap();
        }
        // An old node's stream (no version) and a version 2 one, both for a.
        let mut v1 = open_map(&c, &a).await;
        let body = serde_json::to_vec(&a.signed_map_req(&c).await).unwrap();
        let resp = c.send(hyper::Method::POST, "/api/v1/map?version=9", body, None).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[proto::MAP_VERSION_HEADER], "2", "the server speaks at most version 2");
        let mut body = resp.into_body();
        let (tx, mut v2) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(d) = frame.into_data() {
                    buf.extend_from_slice(&d);
                }
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    if tx.send(buf.drain(..=nl).collect()).is_err() {
                        return;
                    }
                }
            }
        });
        let (first, full_len) = next_v2(&mut v2).await;
        let proto::StreamMessageV2::Map(mut map) = first else { panic!("the first line is a full map") };
        assert_eq!(map.self_node.id, na.id);
        // Follow both through each change (b registers, b goes) until both
        // show it; the rebuilt map must then equal the old stream's full map.
        // (The version may differ: a stream skips snapshots that change
        // nothing for it, and each may have seen a different one last.)
        let mut want = next_map(&mut v1).await;
        let mut delta_bytes = Vec::new();
        let b = TestNode::new(2);
        for step in 0..3 {
            let done = |m: &proto::NetworkMap| match step {
                0 => m.peers.len() == 20 && m.self_node.online,
                1 => m.peers.iter().any(|p| p.name == "b"),
                _ => !m.peers.iter().any(|p| p.name == "b") && m.peers.len() == 20,
            };
            while !done(&want) {
                want = next_map(&mut v1).await;
            }
            while !done(&map) {
                match next_v2(&mut v2).await {
                    (proto::StreamMessageV2::Delta(d), len) => {
                        delta_bytes.push(len);
                        map.apply(*d);
                    }
                    (proto::StreamMessageV2::Keepalive, _) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            want.version = map.version;
            assert_eq!(*map, want, "step {step}");
            match step {
                0 => {
                    b.register(&c, &key, "b").await.unwrap();
                }
                1 => {
                    let _: serde_json::Value = c
                        .json(hyper::Method::DELETE, "/api/v1/admin/nodes/b", None::<&()>, Some(&token))
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
        let biggest = delta_bytes.iter().max().copied().unwrap_or(0);
        eprintln!("21-node tailnet: full map {full_len} bytes, deltas {delta_bytes:?} bytes");
        assert!(biggest * 5 < full_len, "deltas are not smaller: {delta_bytes:?} vs {full_len}");

        // A version that is not a number is refused.
        let body = serde_json::to_vec(&a.signed_map_req(&c).await).unwrap();
        let (s, body) = c.raw(hyper::Method::POST, "/api/v1/map?version=x", body, None).await.unwrap();
        assert_json_error(s, &body, 400, "bad_request");
    });
    drop(server);
}

#[test]
fn tailnet_api_users_own_the_untagged_nodes_of_their_keys() {
    users_own_the_untagged_nodes_of_their_keys(&Store::sqlite("api-users"));
}

#[test]
fn tailnet_api_on_postgres_users_own_the_untagged_nodes_of_their_keys() {
    if let Some(store) = Store::postgres("tailnet_api_users_own_the_untagged_nodes_of_their_keys_on_postgres") {
        users_own_the_untagged_nodes_of_their_keys(&store);
    }
}

fn users_own_the_untagged_nodes_of_their_keys(store: &Store) {
    let server = store.start_with(NO_IDENTITY);
    let token = server.token.clone().unwrap();
    let c = Client::new(server.url.clone());
    rt().block_on(async {
        let users = "/api/v1/admin/users";
        let req = proto::CreateUserRequest { login: "Alice@Example.com".into(), display_name: Some("Alice".into()) };
        let alice: proto::UserInfo = c.json(hyper::Method::POST, users, Some(&req), Some(&token)).await.unwrap();
        assert_eq!((alice.login.as_str(), alice.display_name.as_str()), ("alice@example.com", "Alice"));
        // Taken, malformed and reserved logins; bad shape; no credential.
        for (body, status, code) in [
            (&br#"{"login":"ALICE@example.com"}"#[..], 409, "conflict"),
            (br#"{"login":"bad login"}"#, 400, "bad_request"),
            (br#"{"login":"tagged-devices"}"#, 400, "bad_request"),
            (br#"{"login":5}"#, 400, "bad_request"),
        ] {
            let (s, b) = c.raw(hyper::Method::POST, users, body.to_vec(), Some(&token)).await.unwrap();
            assert_json_error(s, &b, status, code);
        }
        let (s, b) = c.raw(hyper::Method::GET, users, vec![], Some("wmadmin-wrong")).await.unwrap();
        assert_json_error(s, &b, 401, "unauthorized");
        let listed: Vec<proto::UserInfo> = c.json(hyper::Method::GET, users, None::<&()>, Some(&token)).await.unwrap();
        assert_eq!(listed, vec![alice.clone()]);

        // A key for alice makes nodes she owns; with tags, tagged nodes.
        let key_for = |user: &str, tags: Vec<String>| proto::CreateKeyRequest {
            reusable: true,
            tags,
            user: Some(user.into()),
            ..Default::default()
        };
        let k: proto::CreatedKey = c
            .json(hyper::Method::POST, "/api/v1/admin/keys", Some(&key_for("alice@example.com", vec![])), Some(&token))
            .await
            .unwrap();
        assert_eq!(k.info.user.as_deref(), Some("alice@example.com"));
        let body = serde_json::to_vec(&key_for("nobody", vec![])).unwrap();
        let (s, b) = c.raw(hyper::Method::POST, "/api/v1/admin/keys", body, Some(&token)).await.unwrap();
        assert_json_error(s, &b, 404, "not_found");
        let tagged: proto::CreatedKey = c
            .json(
                hyper::Method::POST,
                "/api/v1/admin/keys",
                Some(&key_for("alice@example.com", vec!["tag:ci".into()])),
                Some(&token),
            )
            .await
            .unwrap();
        let a = TestNode::new(1).register(&c, &k.key, "laptop").await.unwrap();
        let t = TestNode::new(2).register(&c, &tagged.key, "runner").await.unwrap();
        let plain = new_key(&c, &token, true).await;
        let p = TestNode::new(3).register(&c, &plain, "server").await.unwrap();
        assert_eq!((a.owner.as_str(), t.owner.as_str(), p.owner.as_str()), ("alice@example.com", "tagged-devices", "admin"));
        let owners: Vec<(i64, String)> = admin_nodes(&c, &token).await.into_iter().map(|n| (n.id, n.owner)).collect();
        assert!(owners.contains(&(a.id, "alice@example.com".into())), "{owners:?}");

        // Removal: refused while she owns a node, then it revokes her keys.
        let del = |login: &'static str| {
            let c = c.clone();
            let token = token.clone();
            async move { c.raw(hyper::Method::DELETE, &format!("{users}/{login}"), vec![], Some(&token)).await.unwrap() }
        };
        let (s, b) = del("alice%40example.com").await;
        assert_json_error(s, &b, 409, "conflict");
        let (s, _) =
            c.raw(hyper::Method::DELETE, &format!("/api/v1/admin/nodes/{}", a.id), vec![], Some(&token)).await.unwrap();
        assert_eq!(s, 200);
        let (s, b) = del("alice%40example.com").await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        let (s, b) = del("alice@example.com").await;
        assert_json_error(s, &b, 404, "not_found");
        let (s, b) = del("bad%zz").await;
        assert_json_error(s, &b, 400, "bad_request");
        let e = TestNode::new(4).register(&c, &k.key, "late").await.unwrap_err();
        assert!(e.to_string().contains("key_revoked"), "{e}");
        let listed: Vec<proto::UserInfo> = c.json(hyper::Method::GET, users, None::<&()>, Some(&token)).await.unwrap();
        assert!(listed.is_empty());
    });
    drop(server);
}
