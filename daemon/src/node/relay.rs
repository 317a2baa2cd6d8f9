//! The node agent's relay client: keeps a connection to this node's home
//! relay (the first relay of the map: the one of the control replica it
//! follows) and, on demand, to the home relays of peers that follow another
//! replica, and moves datagrams between them and the data plane's relay
//! link (`wiremesh_dataplane::relay`), so that a peer with no direct path
//! is reached through the relay it listens on (docs/nat.md).
//!
//! Each relay connection is a task of its own with a bounded queue. When
//! a connection that stood for a while breaks it reconnects at once;
//! otherwise it tries again after a growing pause (1 s to 30 s). In
//! between, datagrams queued for it are discarded and counted, as a lost
//! UDP datagram would be, so no stale handshake waits in a queue.

use crate::control::proto::{self, NetworkMap, RelayInfo};
use crate::relay::client::{self, RelayReceiver, RelaySender};
use crate::relay::MAX_PAYLOAD;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use wiremesh_core::keys::{PrivateKey, PublicKey};
use wiremesh_dataplane::relay::{RelayDatagram, RelayDeliverer, RelayPort};

/// The first pause before reconnecting, and the longest.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Frames written before one flush.
const BATCH: usize = 64;
/// Datagrams queued for one relay connection.
const CONN_QUEUE: usize = 512;

/// One relay: where it is and the certificate it must present.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayTarget {
    /// Host as the map names it (or the control server's).
    pub host: String,
    /// The port of its TLS listener.
    pub port: u16,
    /// SHA-256 of its certificate.
    pub fingerprint: [u8; 32],
}

impl std::fmt::Display for RelayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// One relay connection as `wiremesh status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionState {
    /// Whether it is this node's home relay (where peers reach it).
    pub home: bool,
    /// Whether the connection is up now.
    pub connected: bool,
    /// Why the last attempt failed or the connection broke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Called when an established relay connection breaks: a reset is often
/// a NAT on the way that changed (the node agent has STUN asked again).
pub type OnLost = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The relay connections of a running client, by `HOST:PORT`.
pub type Connections = std::sync::Arc<std::sync::Mutex<BTreeMap<String, ConnectionState>>>;

/// Removes a connection's entry when its task ends (or is dropped).
struct Listed {
    connections: Connections,
    name: String,
}

impl Listed {
    fn set(&self, f: impl FnOnce(&mut ConnectionState)) {
        if let Some(c) = self.connections.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&self.name) {
            f(c);
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.name);
    }
}

/// Which relays this node uses: its home relay (where its peers reach it)
/// and, for each peer whose home relay is another one, that relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayPlan {
    /// The home relay: the map's first.
    pub home: RelayTarget,
    /// Peers reached through a relay other than the home one.
    pub via: BTreeMap<PublicKey, RelayTarget>,
}

fn target_of(r: &RelayInfo, control_host: &str, control_pin: [u8; 32]) -> Option<RelayTarget> {
    let fingerprint = match &r.fingerprint {
        Some(hex) => proto::unhex::<32>(hex)?,
        None => control_pin,
    };
    Some(RelayTarget { host: r.host.clone().unwrap_or_else(|| control_host.to_string()), port: r.port, fingerprint })
}

/// The relays `map` gives this node: the first relay as home (on its own
/// host or `control_host`, pinned to its own fingerprint or
/// `control_pin`), and each peer's home relay when the map names one other
/// than ours that it lists. `None` when the map names no usable relay.
pub fn plan(map: &NetworkMap, control_host: &str, control_pin: [u8; 32]) -> Option<RelayPlan> {
    let first = map.relays.first()?;
    let home = target_of(first, control_host, control_pin)?;
    let mut via = BTreeMap::new();
    for peer in &map.peers {
        let Some(id) = peer.relay.as_deref() else { continue };
        if first.id.as_deref() == Some(id) {
            continue;
        }
        let Some(key) = proto::unb64_key(&peer.node_key) else { continue };
        if let Some(t) = map
            .relays
            .iter()
            .find(|r| r.id.as_deref() == Some(id))
            .and_then(|r| target_of(r, control_host, control_pin))
        {
            via.insert(PublicKey(key), t);
        }
    }
    Some(RelayPlan { home, via })
}

/// Runs the relay client: connects to `home` at once (peers reach us
/// there), and sends each datagram the worker queues to the relay `via`
/// names for its peer, else home. Runs until the worker's end of `port` is
/// gone, `via`'s sender is dropped, or the task is aborted.
pub async fn run(
    home: RelayTarget,
    key: PrivateKey,
    mut port: RelayPort,
    mut via: watch::Receiver<BTreeMap<PublicKey, RelayTarget>>,
    connections: Connections,
    on_lost: OnLost,
) {
    let deliver = port.deliverer();
    let mut conns: HashMap<RelayTarget, mpsc::Sender<RelayDatagram>> = HashMap::new();
    let spawn = |target: RelayTarget| {
        let listed = Listed { connections: connections.clone(), name: target.to_string() };
        connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(listed.name.clone(), ConnectionState { home: target == home, ..Default::default() });
        spawn_conn(target, key.clone(), deliver.clone(), listed, on_lost.clone())
    };
    conns.insert(home.clone(), spawn(home.clone()));
    loop {
        tokio::select! {
            d = port.next_outbound() => {
                let Some(d) = d else { return };
                let target = via.borrow().get(&d.peer).cloned().unwrap_or_else(|| home.clone());
                let tx = conns.entry(target.clone()).or_insert_with(|| spawn(target));
                // A full queue drops, as a full socket buffer would.
                let _ = tx.try_send(d);
            }
            changed = via.changed() => {
                if changed.is_err() {
                    return;
                }
                // Connections no peer needs any more are closed.
                let used: Vec<RelayTarget> = via.borrow().values().cloned().collect();
                conns.retain(|t, _| *t == home || used.contains(t));
            }
        }
    }
}

/// Starts the task that keeps one relay connection; it ends when the
/// returned sender is dropped.
fn spawn_conn(
    target: RelayTarget,
    key: PrivateKey,
    deliver: RelayDeliverer,
    listed: Listed,
    on_lost: OnLost,
) -> mpsc::Sender<RelayDatagram> {
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    tokio::spawn(conn(target, key, rx, deliver, listed, on_lost));
    tx
}

async fn conn(
    target: RelayTarget,
    key: PrivateKey,
    mut queue: mpsc::Receiver<RelayDatagram>,
    deliver: RelayDeliverer,
    listed: Listed,
    on_lost: OnLost,
) {
    let mut backoff = BACKOFF_MIN;
    let mut discarded: u64 = 0;
    loop {
        // A connection that was up and broke is tried again at once; one
        // that cannot be made waits a growing pause.
        let pause = match connect(&target, &key).await {
            Ok((tx, rx)) => {
                crate::say!("relay: connected to {target}");
                listed.set(|c| {
                    c.connected = true;
                    c.last_error = None;
                });
                let since = tokio::time::Instant::now();
                match carry(tx, rx, &mut queue, deliver.clone()).await {
                    Ok(()) => return,
                    Err(e) => {
                        crate::say!("relay: connection to {target} lost: {e}; reconnecting");
                        listed.set(|c| {
                            c.connected = false;
                            c.last_error = Some(e);
                        });
                        on_lost();
                    }
                }
                if since.elapsed() >= BACKOFF_MIN {
                    backoff = BACKOFF_MIN;
                    Duration::ZERO
                } else {
                    // Closed as soon as made: not at once again.
                    let pause = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    pause
                }
            }
            Err(e) => {
                eprintln!("relay: cannot connect to {target}: {e}");
                listed.set(|c| c.last_error = Some(e));
                let pause = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                pause
            }
        };
        // Until the next attempt, what is queued cannot go anywhere.
        let until = tokio::time::Instant::now() + pause;
        loop {
            match tokio::time::timeout_at(until, queue.recv()).await {
                Err(_) => break,
                Ok(None) => return,
                Ok(Some(_)) => discarded += 1,
            }
        }
        if discarded > 0 {
            crate::say!("relay: {discarded} datagrams discarded while disconnected from {target}");
            discarded = 0;
        }
    }
}

async fn connect(target: &RelayTarget, key: &PrivateKey) -> Result<(RelaySender, RelayReceiver), String> {
    let addr = resolve(&target.host, target.port).await?;
    client::connect(addr, target.fingerprint, key).await.map_err(|e| e.to_string())
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let mut addrs: Vec<SocketAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|e| format!("{host}: {e}"))?.collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs.into_iter().next().ok_or_else(|| format!("{host}: no address"))
}

/// Moves datagrams both ways until the connection fails (`Err`) or the
/// queue's sender is gone (`Ok`). Reading and writing run side by side in
/// this one task; when either stops, the other is dropped with the
/// connection.
async fn carry(
    mut tx: RelaySender,
    mut rx: RelayReceiver,
    queue: &mut mpsc::Receiver<RelayDatagram>,
    deliver: RelayDeliverer,
) -> Result<(), String> {
    let reader = read_loop(&mut rx, deliver);
    let writer = async {
        while let Some(first) = queue.recv().await {
            tx.queue(&first.peer, &first.bytes).await.map_err(|e| e.to_string())?;
            for _ in 1..BATCH {
                let Ok(d) = queue.try_recv() else { break };
                tx.queue(&d.peer, &d.bytes).await.map_err(|e| e.to_string())?;
            }
            tx.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    tokio::select! {
        r = reader => r,
        w = writer => w,
    }
}

async fn read_loop(rx: &mut RelayReceiver, deliver: RelayDeliverer) -> Result<(), String> {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        match rx.recv(&mut buf).await.map_err(|e| e.to_string())? {
            None => return Err("closed by the relay".into()),
            Some((from, len)) => {
                if !deliver.deliver(from, &buf[..len]).await {
                    // The worker's end is gone: nothing more to carry.
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_with(relays: Vec<RelayInfo>) -> NetworkMap {
        let node = crate::control::proto::NodeInfo {
            id: 1,
            name: "n1".into(),
            fqdn: "n1.wiremesh.internal".into(),
            node_key: proto::b64_key(&[1; 32]),
            machine_key: proto::hex(&[1; 32]),
            ipv4: "100.64.0.1".parse().unwrap(),
            ipv6: "fd01:2:3::1".parse().unwrap(),
            endpoints: vec![],
            allowed_ips: vec![],
            tags: vec![],
            ephemeral: false,
            online: true,
            owner: "admin".into(),
            created_at: 0,
            relay: None,
        };
        let mut m: NetworkMap = serde_json::from_value(serde_json::json!({
            "version": 1,
            "domain": "wiremesh.internal",
            "self": node,
            "peers": [],
            "filter": crate::control::proto::FilterRule::allow_all(),
        }))
        .expect("a map");
        m.relays = relays;
        m
    }

    fn relay(id: &str, host: Option<&str>, port: u16, fingerprint: Option<String>) -> RelayInfo {
        RelayInfo { id: Some(id.into()), host: host.map(Into::into), port, fingerprint }
    }

    #[test]
    fn the_plan_comes_from_the_relays_and_each_peers_home() {
        let pin = [9u8; 32];
        assert_eq!(plan(&map_with(vec![]), "ctl", pin), None, "no relay in the map");
        let p = plan(&map_with(vec![relay("r1", None, 8444, None)]), "ctl", pin).unwrap();
        assert_eq!(p.home, RelayTarget { host: "ctl".into(), port: 8444, fingerprint: pin });
        assert!(p.via.is_empty());
        let hex = "ab".repeat(32);
        let mut m = map_with(vec![
            relay("r1", Some("relay.example"), 443, Some(hex)),
            relay("r2", Some("198.51.100.2"), 8444, None),
            relay("r3", None, 1, Some("zz".into())),
        ]);
        let peer = |n: u8, home: Option<&str>| {
            let mut p = m.self_node.clone();
            p.node_key = proto::b64_key(&[n; 32]);
            p.relay = home.map(Into::into);
            p
        };
        m.peers =
            vec![peer(2, Some("r1")), peer(3, Some("r2")), peer(4, None), peer(5, Some("gone")), peer(6, Some("r3"))];
        let p = plan(&m, "ctl", pin).unwrap();
        assert_eq!((p.home.host.as_str(), p.home.port, p.home.fingerprint), ("relay.example", 443, [0xab; 32]));
        // Only the peer at home on r2 goes another way; unknown homes and a
        // relay with a bad fingerprint fall back to ours.
        let want: BTreeMap<_, _> =
            [(PublicKey([3; 32]), RelayTarget { host: "198.51.100.2".into(), port: 8444, fingerprint: pin })].into();
        assert_eq!(p.via, want);
        // A first relay whose fingerprint is not 32 bytes of hex: no plan.
        assert_eq!(plan(&map_with(vec![relay("r3", None, 1, Some("zz".into()))]), "ctl", pin), None);
    }
}
