//! Turning a network map into wg(8) `set` requests: only the peers that were
//! added, changed or removed are named (`replace_peers` is never used), so
//! the sessions of the others are left alone. The map's packet filter goes
//! to the data plane's core device whenever it changes.

use crate::control::proto::{self, NetworkMap};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use wiremesh_core::filter::Filter;

/// What the data plane was told about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    /// The endpoint set, if any.
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs in CIDR form.
    pub allowed_ips: Vec<String>,
}

/// The peers as last applied, by node key.
#[derive(Debug, Default, Clone)]
pub struct Reconciler {
    applied: BTreeMap<[u8; 32], PeerState>,
    /// The filter rules as last applied (none yet: `None`).
    filter: Option<Vec<proto::FilterRule>>,
}

/// A new packet filter for the data plane.
#[derive(Debug)]
pub struct FilterChange {
    /// The map's rules.
    pub rules: Vec<proto::FilterRule>,
    /// The core filter (`None`: the allow-all filter of a tailnet without a policy).
    pub filter: Option<Filter>,
}

/// One reconciliation step.
#[derive(Debug)]
pub struct Plan {
    /// The lines after `set=1` (empty when nothing changes).
    pub body: String,
    /// The peers once the body is applied.
    pub next: BTreeMap<[u8; 32], PeerState>,
    /// Peers added, changed and removed.
    pub counts: (usize, usize, usize),
}

impl Reconciler {
    /// The peers as last applied.
    pub fn applied(&self) -> &BTreeMap<[u8; 32], PeerState> {
        &self.applied
    }

    /// The `set` body that takes the data plane from what was applied to
    /// `map` (or to no peers at all with `None`).
    pub fn plan(&self, map: Option<&NetworkMap>) -> Plan {
        let mut next = BTreeMap::new();
        if let Some(map) = map {
            for p in &map.peers {
                let Some(key) = proto::unb64_key(&p.node_key) else { continue };
                if p.node_key == map.self_node.node_key {
                    continue;
                }
                let endpoint = p.endpoints.iter().find_map(|e| e.parse::<SocketAddr>().ok());
                let mut allowed_ips = p.allowed_ips.clone();
                // Prefixes the map routes through this peer (docs/routes.md).
                for r in map.routes.iter().filter(|r| r.peer == p.id) {
                    allowed_ips.extend(r.prefixes.iter().cloned());
                }
                next.insert(key, PeerState { endpoint, allowed_ips });
            }
        }
        let mut body = String::new();
        let (mut added, mut changed, mut removed) = (0, 0, 0);
        for key in self.applied.keys().filter(|k| !next.contains_key(*k)) {
            let _ = write!(body, "public_key={}\nremove=true\n", proto::hex(key));
            removed += 1;
        }
        for (key, want) in &next {
            let old = self.applied.get(key);
            if old == Some(want) {
                continue;
            }
            if old.is_some() {
                changed += 1;
            } else {
                added += 1;
            }
            let _ = writeln!(body, "public_key={}", proto::hex(key));
            // An unchanged endpoint is not re-sent: the data plane may have
            // learned a better one from the peer's packets (roaming).
            if let Some(ep) = want.endpoint.filter(|ep| old.and_then(|o| o.endpoint) != Some(*ep)) {
                let _ = writeln!(body, "endpoint={ep}");
            }
            body.push_str("replace_allowed_ips=true\n");
            for ip in &want.allowed_ips {
                let _ = writeln!(body, "allowed_ip={ip}");
            }
        }
        Plan { body, next, counts: (added, changed, removed) }
    }

    /// Records that a plan was applied.
    pub fn commit(&mut self, plan: Plan) {
        self.applied = plan.next;
    }

    /// The filter to set if `map`'s differs from the one applied. Rules the
    /// core cannot read make a filter that denies everything (fail closed).
    pub fn filter_change(&self, map: &NetworkMap) -> Option<FilterChange> {
        if self.filter.as_ref() == Some(&map.filter) {
            return None;
        }
        let filter = crate::policy::wire::filter_from_wire(&map.filter).unwrap_or_else(|e| {
            eprintln!("wiremeshd node: {e}; denying all inbound traffic until the next map");
            Some(Filter::default())
        });
        Some(FilterChange { rules: map.filter.clone(), filter })
    }

    /// Records that a filter was set.
    pub fn commit_filter(&mut self, change: FilterChange) {
        self.filter = Some(change.rules);
    }
}

/// What path discovery needs from `map` (docs/nat.md): every peer's
/// reported endpoints as candidates, the node's own `local` endpoints, and
/// the first relay's STUN port (on the relay's host, or `control_host` when
/// the map names none) resolved with `resolve`. A candidate inside a prefix
/// the map routes through a peer (a subnet router's LAN) is left out: the
/// kernel would send probes to it through the tunnel itself, a path that
/// dies with the router. Default routes (exit nodes) do not count: the data
/// plane's socket is kept off them by its fwmark.
pub fn disco_settings(
    map: &NetworkMap,
    local: Vec<SocketAddr>,
    control_host: &str,
    resolve: impl Fn(&str, u16) -> Option<SocketAddr>,
) -> wiremesh_dataplane::disco::DiscoSettings {
    let routed: Vec<(std::net::IpAddr, u8)> = map
        .routes
        .iter()
        .flat_map(|r| r.prefixes.iter())
        .filter_map(|p| {
            let (ip, len) = p.split_once('/')?;
            Some((ip.parse().ok()?, len.parse().ok()?))
        })
        .filter(|&(_, len)| len > 0)
        .collect();
    let peers = map
        .peers
        .iter()
        .filter(|p| p.node_key != map.self_node.node_key)
        .filter_map(|p| {
            let key = proto::unb64_key(&p.node_key)?;
            let endpoints = p
                .endpoints
                .iter()
                .filter_map(|e| e.parse::<SocketAddr>().ok())
                .filter(|e| !routed.iter().any(|&(net, len)| in_prefix(e.ip(), net, len)))
                .collect();
            Some((wiremesh_core::keys::PublicKey(key), endpoints))
        })
        .collect();
    let stun_server = map.relays.first().and_then(|r| resolve(r.host.as_deref().unwrap_or(control_host), r.port));
    wiremesh_dataplane::disco::DiscoSettings { stun_server, local_endpoints: local, peers }
}

fn in_prefix(ip: std::net::IpAddr, net: std::net::IpAddr, len: u8) -> bool {
    use std::net::IpAddr;
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto::{FilterRule, NodeInfo};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn node(id: u8, endpoint: &str) -> NodeInfo {
        let ipv4 = Ipv4Addr::new(100, 64, 0, id);
        let ipv6: Ipv6Addr = format!("fd01:2:3::{id}").parse().unwrap();
        NodeInfo {
            id: id.into(),
            name: format!("n{id}"),
            fqdn: format!("n{id}.wiremesh.internal"),
            node_key: proto::b64_key(&[id; 32]),
            machine_key: proto::hex(&[id; 32]),
            ipv4,
            ipv6,
            endpoints: vec![endpoint.into()],
            allowed_ips: vec![format!("{ipv4}/32"), format!("{ipv6}/128")],
            tags: vec![],
            ephemeral: false,
            online: true,
            owner: "admin".into(),
            created_at: 0,
            relay: None,
        }
    }

    /// A map as the server sends it (through JSON, so fields the map grows
    /// with defaults need no change here).
    fn map(peers: Vec<NodeInfo>) -> NetworkMap {
        serde_json::from_value(serde_json::json!({
            "version": 1,
            "domain": "wiremesh.internal",
            "self": node(1, "192.0.2.1:1"),
            "peers": peers,
            "filter": FilterRule::allow_all(),
        }))
        .expect("a map")
    }

    #[test]
    fn adds_changes_and_removes_only_what_differs() {
        let mut r = Reconciler::default();
        let m = map(vec![node(2, "192.0.2.2:2"), node(3, "192.0.2.3:3")]);
        let p = r.plan(Some(&m));
        assert_eq!(p.counts, (2, 0, 0));
        assert!(p.body.contains(&format!("public_key={}\nendpoint=192.0.2.2:2\nreplace_allowed_ips=true\nallowed_ip=100.64.0.2/32\nallowed_ip=fd01:2:3::2/128\n", proto::hex(&[2; 32]))));
        wiremesh_dataplane::uapi::parse_set(&p.body).expect("a valid set body");
        r.commit(p);
        assert!(r.plan(Some(&m)).body.is_empty(), "nothing changed, nothing sent");
        // Peer 3 moves, peer 2 goes, peer 4 comes.
        let m2 = map(vec![node(3, "192.0.2.33:3"), node(4, "[2001:db8::4]:4")]);
        let p = r.plan(Some(&m2));
        assert_eq!(p.counts, (1, 1, 1));
        assert!(p.body.starts_with(&format!("public_key={}\nremove=true\n", proto::hex(&[2; 32]))));
        assert!(p.body.contains("endpoint=192.0.2.33:3\n"));
        assert!(p.body.contains("endpoint=[2001:db8::4]:4\n"));
        assert!(!p.body.contains("replace_peers"));
        wiremesh_dataplane::uapi::parse_set(&p.body).expect("a valid set body");
        r.commit(p);
        let p = r.plan(None);
        assert_eq!(p.counts, (0, 0, 2));
        r.commit(p);
        assert!(r.applied().is_empty());
    }

    #[test]
    fn disco_settings_come_from_the_map() {
        let mut m = map(vec![node(2, "192.0.2.2:2"), node(3, "not an endpoint")]);
        let local: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let resolve = |h: &str, p: u16| format!("{h}:{p}").parse().ok();
        let s = disco_settings(&m, vec![local], "198.51.100.7", resolve);
        assert_eq!(s.stun_server, None, "no relay, no STUN");
        assert_eq!(s.local_endpoints, vec![local]);
        assert_eq!(
            s.peers,
            vec![
                (wiremesh_core::keys::PublicKey([2; 32]), vec!["192.0.2.2:2".parse().unwrap()]),
                (wiremesh_core::keys::PublicKey([3; 32]), vec![]),
            ]
        );
        m.relays = vec![proto::RelayInfo { id: None, host: None, port: 8443, fingerprint: None }];
        let s = disco_settings(&m, vec![], "198.51.100.7", resolve);
        assert_eq!(s.stun_server, Some("198.51.100.7:8443".parse().unwrap()));
        // A candidate behind a routed prefix is left out; a default route is not.
        m.routes = vec![proto::PeerRoutes { peer: 3, prefixes: vec!["0.0.0.0/0".into(), "::/0".into()] }];
        assert_eq!(disco_settings(&m, vec![], "h", resolve).peers[0].1.len(), 1);
        m.routes.push(proto::PeerRoutes { peer: 3, prefixes: vec!["192.0.2.0/24".into()] });
        assert!(disco_settings(&m, vec![], "h", resolve).peers[0].1.is_empty());
        m.routes.clear();
        m.relays[0].host = Some("203.0.113.9".into());
        let s = disco_settings(&m, vec![], "198.51.100.7", resolve);
        assert_eq!(s.stun_server, Some("203.0.113.9:8443".parse().unwrap()));
    }

    #[test]
    fn the_filter_is_set_when_it_changes_and_bad_rules_deny_all() {
        let mut r = Reconciler::default();
        let mut m = map(vec![node(2, "192.0.2.2:2")]);
        let c = r.filter_change(&m).expect("first map sets the filter");
        assert!(c.filter.is_none(), "allow-all: no filter in the core");
        r.commit_filter(c);
        assert!(r.filter_change(&m).is_none());
        m.filter = vec![FilterRule {
            src: vec!["100.64.0.2/32".into()],
            dst: vec!["100.64.0.1/32".into()],
            protocols: vec![6],
            ports: "22".into(),
        }];
        let c = r.filter_change(&m).expect("changed");
        let f = c.filter.clone().expect("a filter");
        let (b, a) = ("100.64.0.2".parse().unwrap(), "100.64.0.1".parse().unwrap());
        assert!(f.accepts(b, a, 6, 22) && !f.accepts(b, a, 6, 80));
        r.commit_filter(c);
        m.filter[0].ports = "22-".into();
        let c = r.filter_change(&m).expect("changed");
        assert_eq!(c.filter, Some(Filter::default()), "unreadable rules deny all");
    }
}
