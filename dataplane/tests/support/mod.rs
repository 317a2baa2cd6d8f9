//! Helpers shared by the data plane's integration tests: the wg(8) text of
//! a worker, disco settings, a stand-in for the relay between two relay
//! links, and the checks that a pair runs over the relay or directly.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::net::SocketAddr;
use wiremesh_core::disco::{Path, RELAY_ENDPOINT};
use wiremesh_core::keys::PublicKey;
use wiremesh_dataplane::disco::DiscoSettings;
use wiremesh_dataplane::driver::Control;
use wiremesh_dataplane::relay::{RelayDeliverer, RelayPort};
use wiremesh_dataplane::uapi::Request;

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The worker's `get=1` answer.
pub fn get(control: &Control) -> String {
    String::from_utf8(control.uapi(Request::Get).as_bytes().to_vec()).unwrap()
}

/// The first `name=` value in a `get=1` answer.
pub fn field(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_owned))
}

/// The first peer's `rx_bytes` in a `get=1` answer (0 when absent).
pub fn rx_bytes(text: &str) -> u64 {
    field(text, "rx_bytes").and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Disco with one peer, `peer`, at the one candidate `candidate`; `own` is
/// the endpoint this side reports.
pub fn settings(peer: &PublicKey, candidate: SocketAddr, own: SocketAddr, stun: Option<SocketAddr>) -> DiscoSettings {
    DiscoSettings { stun_server: stun, local_endpoints: vec![own], peers: vec![(*peer, vec![candidate])] }
}

/// Carries what one relay link sends to the other, tagged with the sender's
/// key, as the relay does (its TLS transport is tested in the daemon's relay
/// and namespace tests); spawn it on a runtime.
pub async fn shuttle(mut from: RelayPort, from_key: PublicKey, to: RelayDeliverer, to_key: PublicKey) {
    while let Some(d) = from.next_outbound().await {
        // Only frames addressed to the other side are carried.
        if d.peer == to_key && !to.deliver(from_key, &d.bytes).await {
            break;
        }
    }
}

/// Whether `a` and `b` run a session over the relay: both chose the relay
/// path, WireGuard's endpoint is the relay marker, both received bytes and
/// both links carried some. `Ok` with A's last handshake time, else what
/// is missing.
pub fn relayed_session(a: &Control, b: &Control) -> Result<String, String> {
    let (sa, sb) = (a.disco_status().unwrap(), b.disco_status().unwrap());
    let (ta, tb) = (get(a), get(b));
    let relay = RELAY_ENDPOINT.to_string();
    let links = |s: &wiremesh_dataplane::disco::DiscoStatus| s.relay.is_some_and(|l| l.sent > 0 && l.received > 0);
    match field(&ta, "last_handshake_time_sec").filter(|s| s != "0") {
        Some(hs)
            if sa.paths[0].1 == Some(Path::Relay)
                && sb.paths[0].1 == Some(Path::Relay)
                && field(&ta, "endpoint").as_deref() == Some(relay.as_str())
                && field(&tb, "endpoint").as_deref() == Some(relay.as_str())
                && rx_bytes(&ta) > 0
                && rx_bytes(&tb) > 0
                && links(&sa)
                && links(&sb) =>
        {
            Ok(hs)
        }
        _ => Err(format!(
            "no session over the relay: a={sa:?} b={sb:?} get(a)={}",
            ta.lines().filter(|l| !l.starts_with("private_key")).collect::<Vec<_>>().join(" ")
        )),
    }
}

/// Whether `a` (at `addr_a`) and `b` (at `addr_b`) both chose the direct
/// path to each other and pinned it as WireGuard's endpoint; `Err` says
/// where they are.
pub fn direct_session(a: &Control, b: &Control, addr_a: SocketAddr, addr_b: SocketAddr) -> Result<(), String> {
    let (sa, sb) = (a.disco_status().unwrap(), b.disco_status().unwrap());
    let (ta, tb) = (get(a), get(b));
    if sa.paths[0].1 == Some(Path::Direct(addr_b))
        && sb.paths[0].1 == Some(Path::Direct(addr_a))
        && field(&ta, "endpoint").as_deref() == Some(&addr_b.to_string())
        && field(&tb, "endpoint").as_deref() == Some(&addr_a.to_string())
    {
        Ok(())
    } else {
        Err(format!("no move to direct: a={sa:?} b={sb:?}"))
    }
}
