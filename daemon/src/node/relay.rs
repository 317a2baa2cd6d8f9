//! The node agent's relay client: keeps one connection to the map's relay
//! and moves datagrams between it and the data plane's relay link
//! (`wiremesh_dataplane::relay`), so that a peer with no direct path is
//! reached through the relay (docs/nat.md).
//!
//! The task owns the link's port for as long as the relay stays the same.
//! When the connection breaks it reconnects with a growing pause (1 s to
//! 30 s); in between, datagrams the worker queues for the relay are
//! discarded and counted, as a lost UDP datagram would be, so the worker's
//! queue never holds stale handshakes.

use crate::control::proto::{self, NetworkMap, RelayInfo};
use crate::relay::client::{self, RelayReceiver, RelaySender};
use crate::relay::MAX_PAYLOAD;
use std::net::SocketAddr;
use std::time::Duration;
use wiremesh_core::keys::{PrivateKey, PublicKey};
use wiremesh_dataplane::relay::{RelayDeliverer, RelayPort};

/// The first pause before reconnecting, and the longest.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Frames written before one flush.
const BATCH: usize = 64;

/// Which relay to use and as whom: a change of any part restarts the task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayTarget {
    /// Host and port as the map names them (for messages).
    pub host: String,
    /// The port of its TLS listener.
    pub port: u16,
    /// SHA-256 of its certificate.
    pub fingerprint: [u8; 32],
    /// This node's public key (the key the relay must see proven).
    pub node_key: PublicKey,
}

/// The relay `map` names for this node: the first relay, on its own host
/// or `control_host`, pinned to its own fingerprint or `control_pin`.
/// `None` when the map names no relay or its fingerprint is not 64 hex
/// digits.
pub fn target(map: &NetworkMap, control_host: &str, control_pin: [u8; 32], node_key: PublicKey) -> Option<RelayTarget> {
    let r: &RelayInfo = map.relays.first()?;
    let fingerprint = match &r.fingerprint {
        Some(hex) => proto::unhex::<32>(hex)?,
        None => control_pin,
    };
    Some(RelayTarget {
        host: r.host.clone().unwrap_or_else(|| control_host.to_string()),
        port: r.port,
        fingerprint,
        node_key,
    })
}

/// Runs the relay client for `target` with `key` (whose public key is
/// `target.node_key`) until the worker's end of `port` is gone or the task
/// is aborted.
pub async fn run(target: RelayTarget, key: PrivateKey, mut port: RelayPort) {
    let name = format!("{}:{}", target.host, target.port);
    let mut backoff = BACKOFF_MIN;
    let mut discarded: u64 = 0;
    loop {
        match connect(&target, &key).await {
            Ok((tx, rx)) => {
                println!("relay: connected to {name}");
                backoff = BACKOFF_MIN;
                match carry(tx, rx, &mut port).await {
                    Ok(()) => return,
                    Err(e) => println!("relay: connection to {name} lost: {e}; reconnecting"),
                }
            }
            Err(e) => eprintln!("relay: cannot connect to {name}: {e}"),
        }
        // Until the next attempt, what the worker queues cannot go anywhere.
        let until = tokio::time::Instant::now() + backoff;
        loop {
            match tokio::time::timeout_at(until, port.next_outbound()).await {
                Err(_) => break,
                Ok(None) => return,
                Ok(Some(_)) => discarded += 1,
            }
        }
        if discarded > 0 {
            println!("relay: {discarded} datagrams discarded while disconnected from {name}");
            discarded = 0;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
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
/// worker's end is gone (`Ok`). Reading and writing run side by side in
/// this one task; when either stops, the other is dropped with the
/// connection.
async fn carry(mut tx: RelaySender, mut rx: RelayReceiver, port: &mut RelayPort) -> Result<(), String> {
    let deliver = port.deliverer();
    let reader = read_loop(&mut rx, deliver);
    let writer = async {
        while let Some(first) = port.next_outbound().await {
            tx.queue(&first.peer, &first.bytes).await.map_err(|e| e.to_string())?;
            for _ in 1..BATCH {
                let Some(d) = port.try_next_outbound() else { break };
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

    #[test]
    fn the_target_comes_from_the_first_relay_with_the_control_defaults() {
        let key = PublicKey([7; 32]);
        let pin = [9u8; 32];
        assert_eq!(target(&map_with(vec![]), "ctl", pin, key), None, "no relay in the map");
        let t = target(&map_with(vec![RelayInfo { host: None, port: 8444, fingerprint: None }]), "ctl", pin, key);
        assert_eq!(t, Some(RelayTarget { host: "ctl".into(), port: 8444, fingerprint: pin, node_key: key }));
        let hex = "ab".repeat(32);
        let t = target(
            &map_with(vec![
                RelayInfo { host: Some("relay.example".into()), port: 443, fingerprint: Some(hex) },
                RelayInfo { host: None, port: 1, fingerprint: None },
            ]),
            "ctl",
            pin,
            key,
        )
        .unwrap();
        assert_eq!((t.host.as_str(), t.port, t.fingerprint), ("relay.example", 443, [0xab; 32]));
        // A fingerprint that is not 32 bytes of hex names no usable relay.
        let bad = RelayInfo { host: None, port: 1, fingerprint: Some("zz".into()) };
        assert_eq!(target(&map_with(vec![bad]), "ctl", pin, key), None);
    }
}
