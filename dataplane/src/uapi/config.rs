//! The configuration model that `set=1` changes and `get=1` reports.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use wiremesh_core::keys::{PresharedKey, PrivateKey, PublicKey};

use super::text::parse_decimal;

/// The most peers one device holds; adding one more fails with `-EINVAL`
/// (wireguard-go's `MaxPeers`).
pub const MAX_PEERS: usize = 1 << 16;

/// An IP prefix routed to a peer, kept masked (`10.1.2.3/24` is stored and
/// printed as `10.1.2.0/24`, as wireguard-go's allowed-IPs trie does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowedIp {
    addr: IpAddr,
    cidr: u8,
}

/// A prefix that does not parse or whose length does not fit its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidPrefix(pub &'static str);

impl fmt::Display for InvalidPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid prefix: {}", self.0)
    }
}

impl std::error::Error for InvalidPrefix {}

impl AllowedIp {
    /// The prefix `addr/cidr` with the host bits cleared; `cidr` must be at
    /// most 32 for IPv4 and 128 for IPv6.
    pub fn new(addr: IpAddr, cidr: u8) -> Result<Self, InvalidPrefix> {
        let addr = match addr {
            IpAddr::V4(a) if cidr <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(cidr)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if cidr <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(cidr)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return Err(InvalidPrefix("prefix length out of range")),
        };
        Ok(AllowedIp { addr, cidr })
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn cidr(&self) -> u8 {
        self.cidr
    }

    /// Whether `ip` falls inside this prefix (an IPv4 address never matches
    /// an IPv6 prefix, IPv4-mapped or not, as in WireGuard's routing).
    pub fn contains(&self, ip: IpAddr) -> bool {
        AllowedIp::new(ip, self.cidr).is_ok_and(|masked| masked.addr == self.addr)
    }
}

impl fmt::Display for AllowedIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.cidr)
    }
}

impl FromStr for AllowedIp {
    type Err = InvalidPrefix;

    /// Parses `addr/bits` as Go's `netip.ParsePrefix`: the `/` is required,
    /// no IPv6 zone, and the length is plain decimal without sign or leading
    /// zeros.
    fn from_str(s: &str) -> Result<Self, InvalidPrefix> {
        let (addr, bits) = s.rsplit_once('/').ok_or(InvalidPrefix("no '/'"))?;
        if addr.contains('%') {
            return Err(InvalidPrefix("IPv6 zones cannot be present in a prefix"));
        }
        let addr: IpAddr = addr.parse().map_err(|_| InvalidPrefix("not an IP address"))?;
        if bits.len() > 1 && bits.starts_with('0') {
            return Err(InvalidPrefix("bad bits after slash"));
        }
        let bits = parse_decimal(bits, 255).map_err(|_| InvalidPrefix("bad bits after slash"))?;
        AllowedIp::new(addr, bits as u8)
    }
}

/// Per-peer state that `get=1` reports and `set=1` never changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Wall-clock time of the last completed handshake since the UNIX epoch;
    /// zero means never.
    pub last_handshake: Duration,
    /// Bytes received from the peer (transport packets, as `wg show` counts).
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

/// One peer's configuration and counters.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The peer's static public key, its identity.
    pub public_key: PublicKey,
    /// The preshared key; all zeros when none is set.
    pub preshared_key: PresharedKey,
    /// Where to send to the peer, if known.
    pub endpoint: Option<SocketAddr>,
    /// Seconds between keepalives sent regardless of traffic; 0 is off.
    pub persistent_keepalive_interval: u16,
    /// Prefixes routed to this peer, in the order they were added.
    pub allowed_ips: Vec<AllowedIp>,
    /// The protocol version; 1 is the only one there is.
    pub protocol_version: u32,
    /// Counters reported by `get=1`.
    pub stats: PeerStats,
}

impl PeerConfig {
    /// A peer with nothing but its public key set.
    pub fn new(public_key: PublicKey) -> Self {
        PeerConfig {
            public_key,
            preshared_key: PresharedKey::default(),
            endpoint: None,
            persistent_keepalive_interval: 0,
            allowed_ips: Vec::new(),
            protocol_version: 1,
            stats: PeerStats::default(),
        }
    }
}

impl PartialEq for PeerConfig {
    fn eq(&self, other: &Self) -> bool {
        self.public_key == other.public_key
            && self.preshared_key.to_bytes() == other.preshared_key.to_bytes()
            && self.endpoint == other.endpoint
            && self.persistent_keepalive_interval == other.persistent_keepalive_interval
            && self.allowed_ips == other.allowed_ips
            && self.protocol_version == other.protocol_version
            && self.stats == other.stats
    }
}

impl Eq for PeerConfig {}

/// A device's configuration: what `wg showconf` prints, plus peer counters.
#[derive(Clone, Debug, Default)]
pub struct DeviceConfig {
    /// The device's static private key (stored clamped), if any.
    pub private_key: Option<PrivateKey>,
    /// The UDP port to listen on; 0 picks one at random. A driver that binds
    /// writes the port it got back here, so `get=1` reports it.
    pub listen_port: u16,
    /// The firewall mark for outgoing packets; 0 is off.
    pub fwmark: u32,
    /// The peers, in the order they were added.
    pub peers: Vec<PeerConfig>,
}

impl DeviceConfig {
    /// The public key matching the private key, if one is set.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.private_key.as_ref().map(PrivateKey::public_key)
    }

    /// The peer with this public key.
    pub fn peer(&self, public_key: &PublicKey) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.public_key == *public_key)
    }

    /// The peer with this public key, for updating its counters.
    pub fn peer_mut(&mut self, public_key: &PublicKey) -> Option<&mut PeerConfig> {
        self.peers.iter_mut().find(|p| p.public_key == *public_key)
    }
}

impl PartialEq for DeviceConfig {
    fn eq(&self, other: &Self) -> bool {
        let key = |k: &Option<PrivateKey>| k.as_ref().map(PrivateKey::to_bytes);
        key(&self.private_key) == key(&other.private_key)
            && self.listen_port == other.listen_port
            && self.fwmark == other.fwmark
            && self.peers == other.peers
    }
}

impl Eq for DeviceConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(s: &str) -> Result<String, InvalidPrefix> {
        s.parse::<AllowedIp>().map(|p| p.to_string())
    }

    #[test]
    fn prefixes_parse_and_mask() {
        assert_eq!(prefix("10.0.0.1/32").unwrap(), "10.0.0.1/32");
        assert_eq!(prefix("10.1.2.3/24").unwrap(), "10.1.2.0/24");
        assert_eq!(prefix("10.1.2.3/0").unwrap(), "0.0.0.0/0");
        assert_eq!(prefix("255.255.255.255/1").unwrap(), "128.0.0.0/1");
        assert_eq!(prefix("::/0").unwrap(), "::/0");
        assert_eq!(prefix("fd00:1:2:3:4:5:6:7/64").unwrap(), "fd00:1:2:3::/64");
        assert_eq!(prefix("FD00::1/128").unwrap(), "fd00::1/128");
        assert_eq!(prefix("::ffff:10.0.0.1/128").unwrap(), "::ffff:10.0.0.1/128");
        assert_eq!(prefix("2001:db8::1/127").unwrap(), "2001:db8::/127");
    }

    #[test]
    fn prefixes_refused() {
        for bad in [
            "10.0.0.1",
            "10.0.0.1/",
            "10.0.0.1/33",
            "::/129",
            "10.0.0.1/08",
            "10.0.0.1/+8",
            "10.0.0.1/-1",
            "10.0.0.1/ 8",
            "10.0.0.1/8 ",
            "/8",
            "10.0.0/8",
            "010.0.0.1/8",
            "fe80::1%1/64",
            "example.com/32",
            "10.0.0.1/8/8",
            "10.0.0.1/256",
        ] {
            assert!(bad.parse::<AllowedIp>().is_err(), "{bad:?} should be refused");
        }
        assert_eq!(prefix("10.0.0.1/00"), Err(InvalidPrefix("bad bits after slash")));
    }

    #[test]
    fn contains() {
        let p: AllowedIp = "10.1.0.0/16".parse().unwrap();
        assert!(p.contains("10.1.255.3".parse().unwrap()));
        assert!(!p.contains("10.2.0.0".parse().unwrap()));
        assert!(!p.contains("::ffff:10.1.0.1".parse().unwrap()));
        let all: AllowedIp = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert!(!all.contains("1.2.3.4".parse().unwrap()));
    }
}
