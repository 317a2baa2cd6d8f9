//! The node agent's local API: one JSON request per line on a Unix socket
//! (root only), one JSON answer per line. The CLI (`wiremesh`) speaks it.

use crate::control::proto::{hex, NetworkMap, NodeInfo};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Where the agent for `tun` listens unless told otherwise.
pub fn default_socket(tun: &str) -> PathBuf {
    Path::new("/var/run/wiremesh").join(format!("{tun}.sock"))
}

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum LocalRequest {
    /// Self and peers with data-plane counters.
    Status,
    /// The node a name (short or full) or address belongs to.
    Resolve {
        /// A name or an address.
        name: String,
    },
    /// The node an address belongs to.
    Whois {
        /// A tailnet address.
        ip: IpAddr,
    },
    /// Connect to the tailnet (again): after `down`, or after `logout` with
    /// an auth key to join with.
    Up {
        /// The auth key to register with; needed after a logout.
        #[serde(default)]
        auth_key: Option<String>,
    },
    /// Disconnect from the tailnet: close the map stream and remove every
    /// peer, keeping the keys and the registration.
    Down,
    /// Leave the tailnet: the control server removes this node, and the
    /// agent forgets its registration (a new node key; an auth key is needed
    /// to join again).
    Logout,
    /// Change the node's preferences (`wiremesh set`): the exit node (an
    /// empty name: none) and LAN access while using it. See docs/routes.md.
    Set {
        /// The exit node's name.
        #[serde(default)]
        exit_node: Option<String>,
        /// Keep the local networks reachable directly.
        #[serde(default)]
        exit_node_allow_lan_access: Option<bool>,
    },
    /// A workload token from the tailnet's identity service (`wiremesh
    /// token`): the agent asks over the tailnet. See docs/identity.md.
    Token {
        /// Who the token is for (one or more).
        audiences: Vec<String>,
        /// Seconds (default: the service's).
        #[serde(default)]
        lifetime: Option<u64>,
    },
}

/// What the agent is doing, as `up`, `down` and `logout` set it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Connected or connecting to the tailnet.
    #[default]
    Up,
    /// Told to stay off the tailnet (`wiremesh down`); keeps its registration.
    Down,
    /// Not a member of the tailnet: needs `wiremesh up --auth-key KEY`.
    LoggedOut,
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentState::Up => "up",
            AgentState::Down => "down",
            AgentState::LoggedOut => "logged out",
        })
    }
}

/// One peer as `wiremesh status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The node as the map describes it.
    pub node: NodeInfo,
    /// The endpoint the data plane uses now.
    pub endpoint: Option<String>,
    /// Unix seconds of the last handshake (0: never).
    pub last_handshake: u64,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// The path discovery chose: `direct ADDR`, `relay`, or absent (none
    /// found, or discovery is off: WireGuard's own endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The round-trip time of a direct path's last probe, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Packets from or for this peer the data plane dropped, by reason
    /// (`filtered`: refused by the packet filter; see docs/policy.md).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// The answer to [`LocalRequest::Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The TUN device.
    pub tun: String,
    /// The control server.
    pub control: String,
    /// Whether the map stream is up now.
    pub connected: bool,
    /// Up, down or logged out.
    #[serde(default)]
    pub state: AgentState,
    /// Why the last attempt to connect failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The node itself, once registered.
    #[serde(rename = "self")]
    pub self_node: Option<NodeInfo>,
    /// The UDP port the data plane listens on.
    pub listen_port: u16,
    /// The peers.
    pub peers: Vec<PeerStatus>,
    /// Every packet the data plane dropped, by reason.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub drops: std::collections::BTreeMap<String, u64>,
    /// The relay connections, by `HOST:PORT` (docs/nat.md).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub relays: std::collections::BTreeMap<String, super::relay::ConnectionState>,
}

/// An answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalResponse {
    /// Status.
    Status(Status),
    /// A node (resolve, whois).
    Node(NodeInfo),
    /// A command (up, down, logout) was carried out: what happened.
    Done(String),
    /// A workload token answer (`access_token`, `token_type`, `expires_in`).
    Token(serde_json::Value),
    /// Failure.
    Error(String),
}

/// Per-peer counters from a wg(8) `get` answer, by hex public key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// `endpoint=`.
    pub endpoint: Option<String>,
    /// `last_handshake_time_sec=`.
    pub last_handshake: u64,
    /// `rx_bytes=`.
    pub rx_bytes: u64,
    /// `tx_bytes=`.
    pub tx_bytes: u64,
}

/// Reads the peers out of a `get=1` answer.
pub fn parse_get(text: &str) -> std::collections::BTreeMap<String, WgPeer> {
    let mut peers = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        if k == "public_key" {
            current = Some(v.to_string());
            peers.insert(v.to_string(), WgPeer::default());
            continue;
        }
        let Some(p) = current.as_ref().and_then(|c| peers.get_mut(c)) else { continue };
        match k {
            "endpoint" => p.endpoint = Some(v.to_string()),
            "last_handshake_time_sec" => p.last_handshake = v.parse().unwrap_or(0),
            "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
            "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    peers
}

/// The node `name` (short name, full name, or address) stands for in `map`.
pub fn resolve<'a>(map: &'a NetworkMap, name: &str) -> Option<&'a NodeInfo> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let ip: Option<IpAddr> = name.parse().ok();
    std::iter::once(&map.self_node).chain(&map.peers).find(|n| {
        n.name == name || n.fqdn == name || ip.is_some_and(|ip| ip == IpAddr::V4(n.ipv4) || ip == IpAddr::V6(n.ipv6))
    })
}

/// What the agent knows of itself besides its map, for [`status`].
#[derive(Debug, Clone)]
pub struct AgentInfo<'a> {
    /// The TUN device.
    pub tun: &'a str,
    /// The control server's URL.
    pub control: &'a str,
    /// Whether the map stream is open.
    pub connected: bool,
    /// Up, down or logged out.
    pub state: AgentState,
    /// The last failure to connect.
    pub last_error: Option<String>,
    /// The data plane's UDP port.
    pub listen_port: u16,
    /// What path discovery knows (`None`: it is off).
    pub disco: Option<wiremesh_dataplane::disco::DiscoStatus>,
    /// The data plane's drop counters.
    pub drops: Option<wiremesh_dataplane::driver::DropReport>,
    /// The relay client's connections, by `HOST:PORT`.
    pub relays: std::collections::BTreeMap<String, super::relay::ConnectionState>,
}

/// Builds the status from the map and a `get=1` answer.
pub fn status(map: Option<&NetworkMap>, get: &str, agent: AgentInfo<'_>) -> Status {
    let wg = parse_get(get);
    let peers = map
        .map(|m| {
            m.peers
                .iter()
                .map(|n| {
                    let key = crate::control::proto::unb64_key(&n.node_key);
                    let w = key.and_then(|k| wg.get(&hex(&k)).cloned()).unwrap_or_default();
                    let found = agent
                        .disco
                        .as_ref()
                        .and_then(|d| d.paths.iter().find(|(pk, _, _)| Some(pk.0) == key))
                        .and_then(|(_, path, rtt)| path.map(|p| (p, *rtt)));
                    let (path, rtt_ms) = match found {
                        Some((wiremesh_core::disco::Path::Direct(a), rtt)) => {
                            (Some(format!("direct {a}")), rtt.map(|r| r.as_secs_f64() * 1000.0))
                        }
                        Some((wiremesh_core::disco::Path::Relay, _)) => (Some("relay".to_string()), None),
                        None => (None, None),
                    };
                    PeerStatus {
                        node: n.clone(),
                        endpoint: w.endpoint,
                        last_handshake: w.last_handshake,
                        rx_bytes: w.rx_bytes,
                        tx_bytes: w.tx_bytes,
                        path,
                        rtt_ms,
                        drops: agent
                            .drops
                            .as_ref()
                            .and_then(|d| d.peers.iter().find(|(pk, _)| Some(pk.0) == key))
                            .map(|(_, d)| d.iter().map(|(r, n)| (r.to_string(), *n)).collect())
                            .unwrap_or_default(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Status {
        tun: agent.tun.into(),
        control: agent.control.into(),
        connected: agent.connected,
        state: agent.state,
        last_error: agent.last_error,
        self_node: map.map(|m| m.self_node.clone()),
        listen_port: agent.listen_port,
        peers,
        drops: agent.drops.map(|d| d.total.into_iter().map(|(r, n)| (r.to_string(), n)).collect()).unwrap_or_default(),
        relays: agent.relays,
    }
}

/// Sends one request to the agent at `socket` (blocking; for the CLI).
pub fn call(socket: &Path, req: &LocalRequest) -> Result<LocalResponse, String> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach the node agent at {}: {e}", socket.display()))?;
    // `up` may wait for a registration and a map; the agent bounds that wait.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(40))).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(|e| e.to_string())?;
    serde_json::from_str(&answer).map_err(|e| format!("bad answer from the node agent: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_answers_parse_into_peer_counters() {
        let text = "private_key=00\nlisten_port=1\npublic_key=aa\nendpoint=192.0.2.1:5\nlast_handshake_time_sec=7\n\
                    rx_bytes=10\ntx_bytes=20\nallowed_ip=100.64.0.2/32\npublic_key=bb\nrx_bytes=3\nerrno=0\n";
        let p = parse_get(text);
        assert_eq!(
            p["aa"],
            WgPeer { endpoint: Some("192.0.2.1:5".into()), last_handshake: 7, rx_bytes: 10, tx_bytes: 20 }
        );
        assert_eq!(p["bb"].rx_bytes, 3);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r: LocalRequest = serde_json::from_str(r#"{"cmd":"resolve","name":"web"}"#).unwrap();
        assert!(matches!(r, LocalRequest::Resolve { name } if name == "web"));
        let r: LocalRequest = serde_json::from_str(r#"{"cmd":"whois","ip":"100.64.0.1"}"#).unwrap();
        assert!(matches!(r, LocalRequest::Whois { .. }));
        assert!(serde_json::from_str::<LocalRequest>(r#"{"cmd":"nope"}"#).is_err());
        let r: LocalRequest = serde_json::from_str(r#"{"cmd":"up"}"#).unwrap();
        assert!(matches!(r, LocalRequest::Up { auth_key: None }));
        let r: LocalRequest = serde_json::from_str(r#"{"cmd":"up","auth_key":"wmkey-x"}"#).unwrap();
        assert!(matches!(r, LocalRequest::Up { auth_key: Some(k) } if k == "wmkey-x"));
        assert!(matches!(serde_json::from_str(r#"{"cmd":"down"}"#).unwrap(), LocalRequest::Down));
        assert!(matches!(serde_json::from_str(r#"{"cmd":"logout"}"#).unwrap(), LocalRequest::Logout));
        // An older agent's status (no state) reads as up.
        let st: Status = serde_json::from_str(
            r#"{"tun":"t","control":"c","connected":true,"self":null,"listen_port":1,"peers":[]}"#,
        )
        .unwrap();
        assert_eq!(st.state, AgentState::Up);
    }
}
