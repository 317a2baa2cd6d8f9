//! Nothing acknowledged is lost: a real `wiremeshd control` on loopback is
//! killed with SIGKILL while many registrations are in flight, restarted on
//! the same state (a directory, or a PostgreSQL database), and must still hold every node it answered for,
//! with the address and name it answered with, and no address or name twice.
//! No root needed.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};
use wiremesh_daemon::control::client::{Client, ClientError};
use wiremesh_daemon::control::proto::{self, NodeInfo, RegisterRequest};
use wiremesh_daemon::node::keys::MachineKey;

/// Registrations fired in all.
const NODES: usize = 200;
/// Registrations in flight at once.
const CONCURRENCY: usize = 16;
/// The server is killed once this many have been acknowledged.
const KILL_AFTER: usize = 60;

#[path = "support/control.rs"]
mod control_server;

use control_server::Store;

/// These tests are about the control API and its store: without the
/// identity service's own node and key, which would show in their counts.
const NO_IDENTITY: &[&str] = &["--identity", "off"];

/// One registration the way the node agent makes it: a challenge, then a
/// signed `POST /register`.
async fn register(c: &Client, machine: &MachineKey, n: usize, auth_key: &str) -> Result<NodeInfo, ClientError> {
    let challenge = c.challenge().await?;
    let mut node_key = [0u8; 32];
    node_key[..8].copy_from_slice(&(n as u64 + 1).to_be_bytes());
    let mut req = RegisterRequest {
        auth_key: auth_key.into(),
        machine_key: machine.public_hex(),
        node_key: proto::b64_key(&node_key),
        // Every host asks for one of a few names, so the suffixing on
        // collision is exercised under concurrency too.
        hostname: format!("host{}", n % 5),
        endpoints: vec![format!("192.0.2.{}:41641", n % 250 + 1)],
        challenge: proto::hex(&challenge),
        signature: String::new(),
    };
    req.signature = machine.sign_hex(&proto::register_message(&challenge, &c.url().fingerprint, &req));
    c.json(hyper::Method::POST, "/api/v1/register", Some(&req), None).await
}

#[test]
fn tailnet_durability_every_acknowledged_registration_survives_sigkill() {
    every_acknowledged_registration_survives_sigkill(&Store::sqlite("durability"));
}

/// The same with the state in PostgreSQL: the server process is killed, the
/// database stays up, and what was committed before each answer is there.
#[test]
fn tailnet_durability_on_postgres_every_acknowledged_registration_survives_sigkill() {
    if let Some(store) = Store::postgres("tailnet_durability_on_postgres") {
        every_acknowledged_registration_survives_sigkill(&store);
    }
}

fn every_acknowledged_registration_survives_sigkill(store: &Store) {
    let t_start = Instant::now();
    let mut server = store.start_with(NO_IDENTITY);
    let token = server.token.clone().expect("first start prints the admin token");
    let c = Client::new(server.url.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let machines: Vec<MachineKey> = (0..NODES).map(|_| MachineKey::generate().unwrap().0).collect();
    let machine_hex: Vec<String> = machines.iter().map(|m| m.public_hex()).collect();

    let (acked, in_flight_at_kill, attempted) = rt.block_on(async {
        let req = proto::CreateKeyRequest { reusable: true, ..Default::default() };
        let key: proto::CreatedKey =
            c.json(hyper::Method::POST, "/api/v1/admin/keys", Some(&req), Some(&token)).await.unwrap();
        let key = Rc::new(key.key);
        let machines = Rc::new(machines);
        // (index, answer) of every acknowledged registration; how many were started.
        let acked: Rc<std::cell::RefCell<Vec<(usize, NodeInfo)>>> = Rc::default();
        let started = Rc::new(std::cell::Cell::new(0usize));
        let next = Rc::new(std::cell::Cell::new(0usize));
        let local = tokio::task::LocalSet::new();
        let mut workers = Vec::new();
        for _ in 0..CONCURRENCY {
            let (c, key, machines, acked, started, next) =
                (c.clone(), key.clone(), machines.clone(), acked.clone(), started.clone(), next.clone());
            workers.push(local.spawn_local(async move {
                loop {
                    let n = next.get();
                    if n >= NODES {
                        return;
                    }
                    next.set(n + 1);
                    started.set(started.get() + 1);
                    match register(&c, &machines[n], n, &key).await {
                        Ok(node) => acked.borrow_mut().push((n, node)),
                        // Refused or cut off by the kill: not acknowledged.
                        Err(ClientError::Transport(_)) => {}
                        Err(e) => panic!("registration {n} refused: {e}"),
                    }
                }
            }));
        }
        local
            .run_until(async {
                let deadline = Instant::now() + Duration::from_secs(15);
                while acked.borrow().len() < KILL_AFTER {
                    assert!(Instant::now() < deadline, "only {} registrations in 15 s", acked.borrow().len());
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // std's Child::kill is SIGKILL on Unix: no chance to flush anything.
                server.child.kill().unwrap();
                let done_at_kill = acked.borrow().len();
                let started_at_kill = started.get();
                server.child.wait().unwrap();
                for w in workers {
                    tokio::time::timeout(Duration::from_secs(20), w).await.expect("workers finish").unwrap();
                }
                let acked = std::mem::take(&mut *acked.borrow_mut());
                (acked, started_at_kill - done_at_kill, started.get())
            })
            .await
    });
    eprintln!(
        "{} of {attempted} registrations acknowledged before/around the SIGKILL, \
         {in_flight_at_kill} in flight when it hit",
        acked.len()
    );
    assert!(acked.len() >= KILL_AFTER);
    assert!(acked.len() < NODES, "the kill came after every registration: nothing tested");
    assert!(in_flight_at_kill > 0, "nothing was in flight when the server was killed");

    // Restart on the same state: every acknowledged node is there as answered.
    let server = store.start_with(NO_IDENTITY);
    assert!(server.token.is_none(), "the restarted server kept its admin token");
    let c = Client::new(server.url.clone());
    let nodes: Vec<NodeInfo> = rt.block_on(async {
        c.json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(&token)).await.unwrap()
    });
    let by_machine: HashMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.machine_key.as_str(), n)).collect();
    assert_eq!(by_machine.len(), nodes.len(), "a machine key twice");
    for (i, answered) in &acked {
        let stored = by_machine
            .get(machine_hex[*i].as_str())
            .unwrap_or_else(|| panic!("acknowledged node {i} ({}) lost after SIGKILL", answered.name));
        assert_eq!(*stored, answered, "node {i} changed across the restart");
    }
    // Committed but unanswered ones may be there too; nothing else.
    for n in &nodes {
        assert!(machine_hex.contains(&n.machine_key), "a node nobody registered: {n:?}");
    }
    let names: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let v4: HashSet<_> = nodes.iter().map(|n| n.ipv4).collect();
    let v6: HashSet<_> = nodes.iter().map(|n| n.ipv6).collect();
    let ids: HashSet<_> = nodes.iter().map(|n| n.id).collect();
    assert_eq!((names.len(), v4.len(), v6.len(), ids.len()), (nodes.len(), nodes.len(), nodes.len(), nodes.len()));
    eprintln!("after restart: {} nodes stored, all {} acknowledged ones intact", nodes.len(), acked.len());

    // The store keeps working: the unregistered machines join now with fresh
    // addresses and names.
    rt.block_on(async {
        let req = proto::CreateKeyRequest { reusable: true, ..Default::default() };
        let key: proto::CreatedKey =
            c.json(hyper::Method::POST, "/api/v1/admin/keys", Some(&req), Some(&token)).await.unwrap();
        for i in 0..10 {
            let m = MachineKey::generate().unwrap().0;
            register(&c, &m, NODES + i, &key.key).await.unwrap();
        }
        let after: Vec<NodeInfo> =
            c.json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(&token)).await.unwrap();
        let names: HashSet<&str> = after.iter().map(|n| n.name.as_str()).collect();
        let v4: HashSet<_> = after.iter().map(|n| n.ipv4).collect();
        assert_eq!(after.len(), nodes.len() + 10);
        assert_eq!((names.len(), v4.len()), (after.len(), after.len()), "an address or name twice");
    });
    drop(server);
    let took = t_start.elapsed();
    eprintln!("durability test on {} took {took:?}", store.name());
    assert!(took < Duration::from_secs(60));
}
