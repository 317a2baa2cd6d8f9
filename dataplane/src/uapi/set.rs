//! `set=1`: request lines to operations, and applying them atomically.

use std::collections::HashMap;
use std::net::SocketAddr;

use wiremesh_core::keys::{PresharedKey, PrivateKey, PublicKey};
use zeroize::Zeroize;

use super::config::{AllowedIp, DeviceConfig, PeerConfig, MAX_PEERS};
use super::error::{Key, UapiError};
use super::text::{parse_decimal, parse_endpoint, parse_hex_key};

/// One line of a `set=1` request, parsed. Device operations come first;
/// [`SetOp::Peer`] starts a peer section and the peer operations after it
/// apply to that peer.
#[derive(Clone, Debug)]
pub enum SetOp {
    /// `private_key=`: set the device key (clamped), or remove it (`None`,
    /// sent as 64 zeros). Peers whose public key matches the new key's are
    /// removed, as wireguard-go does.
    PrivateKey(Option<PrivateKey>),
    /// `listen_port=`: the UDP port (0 = random).
    ListenPort(u16),
    /// `fwmark=`: the firewall mark (0 = off).
    Fwmark(u32),
    /// `replace_peers=true`: remove every peer.
    ReplacePeers,
    /// `public_key=`: select this peer, creating it if it does not exist.
    /// A peer with the device's own public key is ignored, with the rest of
    /// its section.
    Peer(PublicKey),
    /// `remove=true`: remove the selected peer; the rest of its section is
    /// checked but ignored.
    Remove,
    /// `update_only=true`: if the selected peer was just created, remove it
    /// again and ignore the rest of its section.
    UpdateOnly,
    /// `preshared_key=`: set (all zeros: clear) the peer's preshared key.
    PresharedKey(PresharedKey),
    /// `endpoint=`: the peer's address.
    Endpoint(SocketAddr),
    /// `persistent_keepalive_interval=`: seconds, 0 = off.
    PersistentKeepaliveInterval(u16),
    /// `replace_allowed_ips=true`: remove the peer's allowed IPs.
    ReplaceAllowedIps,
    /// `allowed_ip=`: route this prefix to the peer, taking it from any other
    /// peer that had it.
    AllowedIp(AllowedIp),
    /// `protocol_version=1`: accepted, changes nothing.
    ProtocolVersion,
}

impl SetOp {
    /// The wire key of this operation.
    pub fn key(&self) -> Key {
        match self {
            SetOp::PrivateKey(_) => Key::PrivateKey,
            SetOp::ListenPort(_) => Key::ListenPort,
            SetOp::Fwmark(_) => Key::Fwmark,
            SetOp::ReplacePeers => Key::ReplacePeers,
            SetOp::Peer(_) => Key::PublicKey,
            SetOp::Remove => Key::Remove,
            SetOp::UpdateOnly => Key::UpdateOnly,
            SetOp::PresharedKey(_) => Key::PresharedKey,
            SetOp::Endpoint(_) => Key::Endpoint,
            SetOp::PersistentKeepaliveInterval(_) => Key::PersistentKeepaliveInterval,
            SetOp::ReplaceAllowedIps => Key::ReplaceAllowedIps,
            SetOp::AllowedIp(_) => Key::AllowedIp,
            SetOp::ProtocolVersion => Key::ProtocolVersion,
        }
    }
}

/// Parses the lines of one `set=1` body in order; which keys are valid
/// depends on whether a `public_key=` line has been seen.
#[derive(Clone, Debug, Default)]
pub struct SetParser {
    line: usize,
    in_peer: bool,
}

impl SetParser {
    /// A parser at the start of a body (device section, line 1 next).
    pub fn new() -> Self {
        SetParser::default()
    }

    /// The number of lines parsed so far.
    pub fn lines(&self) -> usize {
        self.line
    }

    /// Parses one non-empty line (without its `\n`; a trailing `\r` is
    /// dropped as Go's `bufio.ScanLines` does).
    pub fn parse_line(&mut self, line: &str) -> Result<SetOp, UapiError> {
        self.line += 1;
        let line_no = self.line;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let (key, value) = line.split_once('=').ok_or(UapiError::MissingEquals { line: line_no })?;
        let invalid = |key: Key, reason: &'static str| UapiError::InvalidValue { line: line_no, key, reason };
        let is_true = |key: Key| {
            if value == "true" {
                Ok(())
            } else {
                Err(invalid(key, "the only valid value is \"true\""))
            }
        };

        if key == "public_key" {
            let key = parse_hex_key(value).map_err(|r| invalid(Key::PublicKey, r))?;
            self.in_peer = true;
            return Ok(SetOp::Peer(PublicKey(key)));
        }
        if !self.in_peer {
            return match key {
                "private_key" => {
                    let mut bytes = parse_hex_key(value).map_err(|r| invalid(Key::PrivateKey, r))?;
                    let op = if bytes.iter().all(|&b| b == 0) {
                        SetOp::PrivateKey(None)
                    } else {
                        // X25519 clamping, as the kernel and wireguard-go
                        // store the key (so `get` reports it clamped).
                        bytes[0] &= 248;
                        bytes[31] = (bytes[31] & 127) | 64;
                        SetOp::PrivateKey(Some(PrivateKey::from_bytes(bytes)))
                    };
                    bytes.zeroize();
                    Ok(op)
                }
                "listen_port" => parse_decimal(value, u64::from(u16::MAX))
                    .map(|p| SetOp::ListenPort(p as u16))
                    .map_err(|r| invalid(Key::ListenPort, r)),
                "fwmark" => parse_decimal(value, u64::from(u32::MAX))
                    .map(|m| SetOp::Fwmark(m as u32))
                    .map_err(|r| invalid(Key::Fwmark, r)),
                "replace_peers" => is_true(Key::ReplacePeers).map(|()| SetOp::ReplacePeers),
                _ => Err(UapiError::unknown_key(line_no, key, false)),
            };
        }
        match key {
            "update_only" => is_true(Key::UpdateOnly).map(|()| SetOp::UpdateOnly),
            "remove" => is_true(Key::Remove).map(|()| SetOp::Remove),
            "preshared_key" => {
                let mut bytes = parse_hex_key(value).map_err(|r| invalid(Key::PresharedKey, r))?;
                let op = SetOp::PresharedKey(PresharedKey::from_bytes(bytes));
                bytes.zeroize();
                Ok(op)
            }
            "endpoint" => parse_endpoint(value).map(SetOp::Endpoint).map_err(|r| invalid(Key::Endpoint, r)),
            "persistent_keepalive_interval" => parse_decimal(value, u64::from(u16::MAX))
                .map(|s| SetOp::PersistentKeepaliveInterval(s as u16))
                .map_err(|r| invalid(Key::PersistentKeepaliveInterval, r)),
            "replace_allowed_ips" => is_true(Key::ReplaceAllowedIps).map(|()| SetOp::ReplaceAllowedIps),
            "allowed_ip" => value.parse::<AllowedIp>().map(SetOp::AllowedIp).map_err(|e| invalid(Key::AllowedIp, e.0)),
            "protocol_version" => {
                if value == "1" {
                    Ok(SetOp::ProtocolVersion)
                } else {
                    Err(invalid(Key::ProtocolVersion, "the only protocol version is 1"))
                }
            }
            _ => Err(UapiError::unknown_key(line_no, key, true)),
        }
    }
}

/// Parses a whole `set=1` body (the lines after `set=1`), up to the first
/// empty line or the end of `body`.
pub fn parse_set(body: &str) -> Result<Vec<SetOp>, UapiError> {
    let mut parser = SetParser::new();
    let mut ops = Vec::new();
    for line in body.split('\n') {
        if line.is_empty() || line == "\r" {
            break;
        }
        ops.push(parser.parse_line(line)?);
    }
    Ok(ops)
}

impl DeviceConfig {
    /// Applies `ops` (from one `set=1` request) all or nothing: on error the
    /// configuration is unchanged. Peer counters of peers that stay are kept.
    pub fn apply(&mut self, ops: &[SetOp]) -> Result<(), UapiError> {
        let mut work = Working::new(self);
        for (i, op) in ops.iter().enumerate() {
            work.apply(i + 1, op)?;
        }
        work.finish(self);
        Ok(())
    }
}

/// Which peer the peer operations apply to.
#[derive(Clone, Copy)]
enum Cursor {
    /// No `public_key` yet.
    None,
    /// The peer in this slot; `created` if this request created it.
    Peer { slot: usize, created: bool },
    /// A removed, not-created (`update_only`) or self peer: lines are
    /// checked but change nothing.
    Ignored,
}

/// The configuration being changed, indexed for speed: a set with tens of
/// thousands of peers and prefixes stays linear.
struct Working {
    private_key: Option<PrivateKey>,
    public_key: Option<PublicKey>,
    listen_port: u16,
    fwmark: u32,
    /// Peers in order; `None` where one was removed.
    slots: Vec<Option<PeerConfig>>,
    by_key: HashMap<PublicKey, usize>,
    owner: HashMap<AllowedIp, usize>,
    live: usize,
    cursor: Cursor,
}

impl Working {
    fn new(config: &DeviceConfig) -> Self {
        let mut work = Working {
            private_key: config.private_key.clone(),
            public_key: config.public_key(),
            listen_port: config.listen_port,
            fwmark: config.fwmark,
            slots: Vec::with_capacity(config.peers.len()),
            by_key: HashMap::with_capacity(config.peers.len()),
            owner: HashMap::new(),
            live: 0,
            cursor: Cursor::None,
        };
        for peer in &config.peers {
            let slot =
                work.push_peer(PeerConfig { allowed_ips: Vec::with_capacity(peer.allowed_ips.len()), ..peer.clone() });
            for &ip in &peer.allowed_ips {
                work.insert_allowed_ip(slot, ip);
            }
        }
        work
    }

    fn apply(&mut self, line: usize, op: &SetOp) -> Result<(), UapiError> {
        match op {
            SetOp::PrivateKey(key) => {
                self.private_key = key.clone();
                self.public_key = key.as_ref().map(PrivateKey::public_key);
                if let Some(own) = self.public_key {
                    if let Some(&slot) = self.by_key.get(&own) {
                        self.remove_peer(slot);
                    }
                }
            }
            SetOp::ListenPort(port) => self.listen_port = *port,
            SetOp::Fwmark(mark) => self.fwmark = *mark,
            SetOp::ReplacePeers => {
                self.slots.clear();
                self.by_key.clear();
                self.owner.clear();
                self.live = 0;
                self.cursor = Cursor::None;
            }
            SetOp::Peer(key) => {
                self.cursor = if self.public_key == Some(*key) {
                    Cursor::Ignored
                } else if let Some(&slot) = self.by_key.get(key) {
                    Cursor::Peer { slot, created: false }
                } else if self.live >= MAX_PEERS {
                    return Err(UapiError::TooManyPeers { line });
                } else {
                    Cursor::Peer { slot: self.push_peer(PeerConfig::new(*key)), created: true }
                };
            }
            SetOp::UpdateOnly => match self.cursor {
                Cursor::Peer { slot, created: true } => {
                    self.remove_peer(slot);
                    self.cursor = Cursor::Ignored;
                }
                Cursor::None => return Err(no_peer(line, op)),
                _ => {}
            },
            SetOp::Remove => match self.cursor {
                Cursor::Peer { slot, .. } => {
                    self.remove_peer(slot);
                    self.cursor = Cursor::Ignored;
                }
                Cursor::None => return Err(no_peer(line, op)),
                Cursor::Ignored => {}
            },
            SetOp::ReplaceAllowedIps => {
                if let Some(slot) = self.selected(line, op)? {
                    let peer = self.slots[slot].as_mut().expect("selected peer exists");
                    for ip in peer.allowed_ips.drain(..) {
                        self.owner.remove(&ip);
                    }
                }
            }
            SetOp::AllowedIp(ip) => {
                if let Some(slot) = self.selected(line, op)? {
                    self.insert_allowed_ip(slot, *ip);
                }
            }
            SetOp::PresharedKey(_)
            | SetOp::Endpoint(_)
            | SetOp::PersistentKeepaliveInterval(_)
            | SetOp::ProtocolVersion => {
                if let Some(slot) = self.selected(line, op)? {
                    let peer = self.slots[slot].as_mut().expect("selected peer exists");
                    match op {
                        SetOp::PresharedKey(psk) => peer.preshared_key = psk.clone(),
                        SetOp::Endpoint(endpoint) => peer.endpoint = Some(*endpoint),
                        SetOp::PersistentKeepaliveInterval(secs) => {
                            peer.persistent_keepalive_interval = *secs;
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// The slot of the selected peer; `None` when its lines are ignored.
    fn selected(&self, line: usize, op: &SetOp) -> Result<Option<usize>, UapiError> {
        match self.cursor {
            Cursor::Peer { slot, .. } => Ok(Some(slot)),
            Cursor::Ignored => Ok(None),
            Cursor::None => Err(no_peer(line, op)),
        }
    }

    fn push_peer(&mut self, peer: PeerConfig) -> usize {
        let slot = self.slots.len();
        self.by_key.insert(peer.public_key, slot);
        self.slots.push(Some(peer));
        self.live += 1;
        slot
    }

    fn remove_peer(&mut self, slot: usize) {
        if let Some(peer) = self.slots[slot].take() {
            self.by_key.remove(&peer.public_key);
            for ip in &peer.allowed_ips {
                self.owner.remove(ip);
            }
            self.live -= 1;
        }
    }

    /// Routes `ip` to the peer in `slot`. Like wireguard-go's trie, a prefix
    /// belongs to one peer at a time, and re-adding one moves it to the end
    /// of the peer's list.
    fn insert_allowed_ip(&mut self, slot: usize, ip: AllowedIp) {
        if let Some(previous) = self.owner.insert(ip, slot) {
            if let Some(peer) = self.slots[previous].as_mut() {
                peer.allowed_ips.retain(|&other| other != ip);
            }
        }
        if let Some(peer) = self.slots[slot].as_mut() {
            peer.allowed_ips.push(ip);
        }
    }

    fn finish(self, config: &mut DeviceConfig) {
        config.private_key = self.private_key;
        config.listen_port = self.listen_port;
        config.fwmark = self.fwmark;
        config.peers = self.slots.into_iter().flatten().collect();
    }
}

fn no_peer(line: usize, op: &SetOp) -> UapiError {
    UapiError::NoPeerSelected { line, key: op.key() }
}
