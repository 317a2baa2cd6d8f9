//! Routes through the control server's API against a real `wiremeshd
//! control` on loopback (no root needed), on SQLite and PostgreSQL: routes
//! advertised in signed map requests, admin approval, the maps that follow,
//! and bad input refused with the right status and nothing stored.

use http_body_util::BodyExt;
use std::time::Duration;
use wiremesh_daemon::control::client::{Client, ClientError};
use wiremesh_daemon::control::proto::{self, MapRequest, RouteInfo, RoutedMapRequest};

#[path = "support/control.rs"]
mod control_server;

use control_server::{Store, TestNode};

impl TestNode {
    /// A signed map request with routes and an exit node.
    async fn map_req(&self, c: &Client, routes: &[&str], exit_node: Option<&str>) -> RoutedMapRequest {
        let challenge = c.challenge().await.unwrap();
        let request = MapRequest {
            machine_key: self.machine.public_hex(),
            node_key: self.node_key.clone(),
            endpoints: vec![],
            challenge: proto::hex(&challenge),
            signature: String::new(),
        };
        let mut req = RoutedMapRequest {
            request,
            routes: routes.iter().map(|r| r.to_string()).collect(),
            exit_node: exit_node.map(str::to_string),
        };
        req.request.signature =
            self.machine.sign_hex(&proto::map_message_with_routes(&challenge, &c.url().fingerprint, &req));
        req
    }
}

/// Opens a version 2 map stream; returns the status, and the first map when 200.
async fn open(c: &Client, req: &RoutedMapRequest) -> (u16, Option<proto::NetworkMap>, Option<hyper::body::Incoming>) {
    let body = serde_json::to_vec(req).unwrap();
    let resp = c.send(hyper::Method::POST, "/api/v1/map?version=2", body, None).await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if status != 200 {
        let bytes = body.collect().await.unwrap().to_bytes();
        let e: proto::ErrorBody = serde_json::from_slice(&bytes).expect("a JSON error body");
        assert!(!e.error.is_empty());
        return (status, None, None);
    }
    let mut buf = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.unwrap().unwrap().unwrap();
        buf.extend_from_slice(&frame.into_data().unwrap_or_default());
        if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let Ok(proto::StreamMessageV2::Map(m)) = serde_json::from_slice(&buf[..nl]) else { panic!("not a map") };
            return (status, Some(*m), Some(body));
        }
    }
}

/// The next delta's routes on an open stream (skipping keepalives and deltas without routes).
async fn next_routes(body: &mut hyper::body::Incoming) -> Vec<proto::PeerRoutes> {
    let mut buf = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.unwrap().unwrap().unwrap();
        buf.extend_from_slice(&frame.into_data().unwrap_or_default());
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if let Ok(proto::StreamMessageV2::Delta(d)) = serde_json::from_slice(&line) {
                if let Some(r) = d.routes {
                    return r;
                }
            }
        }
    }
}

async fn admin_status(c: &Client, token: &str, method: hyper::Method, path: &str, body: &str) -> (u16, String) {
    let resp = c.send(method, path, body.as_bytes().to_vec(), Some(token)).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn routes(c: &Client, token: &str) -> Vec<RouteInfo> {
    c.json(hyper::Method::GET, "/api/v1/admin/routes", None::<&()>, Some(token)).await.unwrap()
}

fn run_on(store: &Store) {
    let server = store.start();
    let token = server.token.clone().expect("a first start prints the admin token");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = Client::new(server.url.clone());
        let req = proto::CreateKeyRequest { reusable: true, ..Default::default() };
        let key: proto::CreatedKey =
            c.json(hyper::Method::POST, "/api/v1/admin/keys", Some(&req), Some(&token)).await.unwrap();
        let (client, router) = (TestNode::new(1), TestNode::new(2));
        let client_info = client.register_at(&c, &key.key, "client", &[]).await.unwrap();
        let router_info = router.register_at(&c, &key.key, "router", &[]).await.unwrap();

        // Bad routes: 400 bad_route, nothing stored.
        for bad in [&["10.1.0.1/24"][..], &["100.64.1.0/24"], &["10.1.0.0/40"], &["nonsense"], &["127.0.0.0/8"]] {
            let req = router.map_req(&c, bad, None).await;
            assert_eq!(open(&c, &req).await.0, 400, "{bad:?}");
        }
        let too_many: Vec<String> = (0..65).map(|i| format!("10.{i}.0.0/16")).collect();
        let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
        assert_eq!(open(&c, &router.map_req(&c, &refs, None).await).await.0, 400);
        assert!(routes(&c, &token).await.is_empty());
        // Routes changed after signing: the signature no longer verifies.
        let mut forged = router.map_req(&c, &["10.1.0.0/24"], None).await;
        forged.routes.push("10.9.0.0/16".into());
        assert_eq!(open(&c, &forged).await.0, 401);
        let mut forged = client.map_req(&c, &[], Some("router")).await;
        forged.exit_node = Some("other".into());
        assert_eq!(open(&c, &forged).await.0, 401);
        assert!(routes(&c, &token).await.is_empty());

        // Advertised (and exit routes): listed, not approved, in no map.
        let (status, _, router_stream) =
            open(&c, &router.map_req(&c, &["10.1.0.0/24", "0.0.0.0/0", "::/0"], None).await).await;
        assert_eq!(status, 200);
        let (status, first, client_stream) = open(&c, &client.map_req(&c, &[], Some("router")).await).await;
        assert_eq!(status, 200);
        let mut client_stream = client_stream.unwrap();
        assert!(first.unwrap().routes.is_empty(), "nothing approved yet");
        let listed = routes(&c, &token).await;
        assert_eq!(listed.len(), 3);
        assert!(listed.iter().all(|r| r.advertised && !r.approved && !r.primary && r.node == "router"));

        // Admin bad input: JSON errors with the right status, nothing changed.
        let path = format!("/api/v1/admin/routes/{}/approve", router_info.name);
        for (body, want) in [
            (r#"{"prefixes": ["10.1.0.1/24"]}"#, 400),
            (r#"{"prefixes": []}"#, 400),
            (r#"{"prefixes": "10.1.0.0/24"}"#, 400),
            (r#"{"prefixes": ["10.1.0.0/24"], "more": 1}"#, 400),
            ("not json", 400),
        ] {
            let (status, text) = admin_status(&c, &token, hyper::Method::POST, &path, body).await;
            assert_eq!(status, want, "{body}: {text}");
            let e: proto::ErrorBody = serde_json::from_str(&text).unwrap();
            assert!(!e.code.is_empty());
        }
        let (status, _) = admin_status(
            &c,
            &token,
            hyper::Method::POST,
            "/api/v1/admin/routes/nobody/approve",
            r#"{"prefixes": ["10.1.0.0/24"]}"#,
        )
        .await;
        assert_eq!(status, 404);
        let (status, _) = admin_status(&c, &token, hyper::Method::GET, &path, "").await;
        assert_eq!(status, 405);
        let (status, _) = admin_status(&c, "wmadmin-wrong", hyper::Method::GET, "/api/v1/admin/routes", "").await;
        assert_eq!(status, 401);
        assert!(routes(&c, &token).await.iter().all(|r| !r.approved));

        // Approved: the client's map routes the prefix through the router, by
        // id, and the exit routes, since it chose that exit node.
        let r: Result<Vec<RouteInfo>, ClientError> = c
            .json(
                hyper::Method::POST,
                &path,
                Some(&proto::RoutesRequest { prefixes: vec!["10.1.0.0/24".into(), "exit".into()] }),
                Some(&token),
            )
            .await;
        let approved = r.unwrap();
        assert!(approved.iter().all(|r| r.approved && r.primary && r.online), "{approved:?}");
        let got = next_routes(&mut client_stream).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].peer, router_info.id);
        assert_eq!(got[0].prefixes, vec!["0.0.0.0/0", "10.1.0.0/24", "::/0"]);
        // The router goes: its stream ends, it is offline, the routes stay with it
        // (no other router), listed as offline.
        drop(router_stream);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(routes(&c, &token).await.iter().all(|r| !r.online));
        // Unapproved: the client's routes go.
        let path = format!("/api/v1/admin/routes/{}/unapprove", router_info.id);
        let _: Vec<RouteInfo> = c
            .json(
                hyper::Method::POST,
                &path,
                Some(&proto::RoutesRequest { prefixes: vec!["10.1.0.0/24".into(), "exit".into()] }),
                Some(&token),
            )
            .await
            .unwrap();
        assert!(next_routes(&mut client_stream).await.is_empty());
        let _ = client_info;
    });
}

#[test]
fn tailnet_routes_api_advertise_approve_and_refuse_bad_input_sqlite() {
    run_on(&Store::sqlite("routes-api"));
}

#[test]
fn tailnet_routes_api_advertise_approve_and_refuse_bad_input_postgres() {
    if let Some(store) = Store::postgres("tailnet_routes_api_advertise_approve_and_refuse_bad_input_postgres") {
        run_on(&store);
    }
}
