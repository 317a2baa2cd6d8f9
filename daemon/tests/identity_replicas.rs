//! The identity service with several control replicas on one PostgreSQL
//! database (loopback, no root; skipped outside CI where PostgreSQL is not
//! installed): the replicas serve one key set (the same JWKS and issuer
//! documents on each public listener), exactly one identity node exists and
//! one replica holds the lease to run it, a rotation on one replica reaches
//! the other's JWKS, and a restart of both keeps the keys.

#[path = "support/control.rs"]
mod control_server;

use control_server::{Server, Store};
use serde_json::Value;
use std::time::{Duration, Instant};
use wiremesh_daemon::control::client::Client;
use wiremesh_daemon::control::proto;

async fn get(s: &Server, path: &str, bearer: Option<&str>) -> Value {
    Client::new(s.url.clone()).json(hyper::Method::GET, path, None::<&()>, bearer).await.unwrap()
}

fn kids(jwks: &Value) -> Vec<String> {
    let mut k: Vec<String> =
        jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_string()).collect();
    k.sort();
    k
}

#[test]
fn identity_replicas_share_one_key_set_and_one_identity_node() {
    // The PostgreSQL helpers block: set up outside the runtime.
    let Some(store) = Store::postgres("identity_replicas_share_one_key_set_and_one_identity_node") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(replicas(&store));
}

async fn replicas(store: &Store) {
    let a = store.start_with(&["--identity", "on"]);
    let token = a.token.clone().expect("the first replica prints the admin token");
    let b = store.start_with(&["--identity", "on"]);

    let (ja, jb) = (get(&a, "/.well-known/jwks.json", None).await, get(&b, "/.well-known/jwks.json", None).await);
    assert_eq!(kids(&ja), kids(&jb), "one key set for every replica");
    assert_eq!(kids(&ja).len(), 2, "current and next");
    let (da, db) = (
        get(&a, "/.well-known/openid-configuration", None).await,
        get(&b, "/.well-known/openid-configuration", None).await,
    );
    assert!(da["issuer"].as_str().unwrap().starts_with("https://127.0.0.1:"), "{da}");
    assert_eq!(da["jwks_uri"], format!("{}/.well-known/jwks.json", da["issuer"].as_str().unwrap()));
    assert_eq!(db["id_token_signing_alg_values_supported"], serde_json::json!(["ES256"]));

    // One identity node, registered once, tagged, and one lease holder.
    let nodes: Vec<proto::AdminNode> = Client::new(a.url.clone())
        .json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(&token))
        .await
        .unwrap();
    let ids: Vec<&proto::AdminNode> = nodes.iter().filter(|n| n.node.tags == ["tag:identity"]).collect();
    assert_eq!(ids.len(), 1, "{nodes:?}");
    assert_eq!(ids[0].node.name, "identity");
    let Store::Postgres { cluster, .. } = store else { unreachable!("a PostgreSQL store") };
    // The synchronous client runs its own runtime: off this one's workers.
    let holders: Vec<Option<String>> = std::thread::scope(|s| {
        s.spawn(|| {
            let mut pgc: postgres::Client = cluster.client("wiremesh");
            pgc.query("SELECT holder FROM identity_node", &[]).unwrap().iter().map(|r| r.get(0)).collect()
        })
        .join()
        .unwrap()
    });
    assert_eq!(holders.len(), 1);
    assert!(holders[0].is_some(), "a replica holds the lease");

    // Rotation on a: the new key signs there at once and b publishes it
    // after its next reload (every 10 s); the old current key stays.
    let before = kids(&ja);
    let r: Value = Client::new(a.url.clone())
        .json(hyper::Method::POST, "/api/v1/admin/identity/rotate-keys", None::<&()>, Some(&token))
        .await
        .unwrap();
    let new_kid = r["kid"].as_str().unwrap().to_string();
    assert!(before.contains(&new_kid), "the next key, already published, signs now");
    let ja = get(&a, "/.well-known/jwks.json", None).await;
    assert_eq!(kids(&ja).len(), 3, "current, next and the retired key");
    let start = Instant::now();
    loop {
        let jb = get(&b, "/.well-known/jwks.json", None).await;
        if kids(&jb) == kids(&ja) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "b never took the rotated set: {jb}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for k in &before {
        assert!(kids(&ja).contains(k), "a key published before the rotation left the JWKS");
    }

    // Both restart: the same keys.
    drop((a, b));
    let c = store.start_with(&["--identity", "on"]);
    assert_eq!(kids(&get(&c, "/.well-known/jwks.json", None).await), kids(&ja));
    let nodes: Vec<proto::AdminNode> = Client::new(c.url.clone())
        .json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(&token))
        .await
        .unwrap();
    assert_eq!(nodes.iter().filter(|n| n.node.tags == ["tag:identity"]).count(), 1, "the node is not registered again");
}
