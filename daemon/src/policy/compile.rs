//! Compiles a policy against the tailnet's nodes: for each node, the rules of
//! its inbound packet filter, the peers it may see (traffic is allowed in at
//! least one direction) and the application capabilities granted to it.

use super::hujson::Pos;
use super::model::{Alias, Policy, Target};
use super::{ErrorKind, PolicyError};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use wiremesh_core::filter::{Filter, Prefix, Rule as FilterRule, PROTO_ICMP, PROTO_ICMPV6};

// Named by path so the fuzz target, which includes this file by path, finds it too.
#[path = "compile/routes.rs"]
pub mod routes;

/// How deep tag ownership may chain through tags owning tags.
const MAX_TAG_OWNER_DEPTH: usize = 8;

/// A node as the compiler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The server's id.
    pub id: i64,
    /// Its tailnet addresses.
    pub addresses: Vec<IpAddr>,
    /// The tags it was registered with (none: it belongs to its user).
    pub tags: Vec<String>,
    /// The login of the user that owns it (untagged nodes).
    pub user: Option<String>,
    /// The login of the user whose key applied its tags, when known: the tags
    /// count only if `tagOwners` lets that user apply them.
    pub tagged_by: Option<String>,
}

/// An application capability granted to a node, keyed by who may use it.
#[derive(Debug, Clone, PartialEq)]
pub struct CapGrant {
    /// The callers the capability is for (only those with a network path to the node).
    pub sources: Vec<Prefix>,
    /// The capability name.
    pub name: String,
    /// Its values, as the policy wrote them.
    pub values: Vec<serde_json::Value>,
}

/// What one node gets from the policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePolicy {
    /// Its inbound packet filter.
    pub filter: Vec<FilterRule>,
    /// The ids of the nodes it may see, ascending.
    pub peers: Vec<i64>,
    /// Application capabilities granted to it.
    pub capabilities: Vec<CapGrant>,
}

/// What the compiler knows of the tailnet beyond its nodes: the address
/// ranges a source `*` stands for, and the routes routers serve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    /// The tailnet's own ranges ([`Network::tailnet_ranges`]); a source `*`
    /// is these plus every approved subnet route, as Tailscale writes it.
    /// Empty: `*` is every address (a policy's `tests`, which run on a
    /// tailnet of their own).
    pub ranges: Vec<Prefix>,
    /// Each router's approved routes (exit routes included), by node id:
    /// a rule whose destination reaches one gives that router a rule.
    pub routes: BTreeMap<i64, Vec<Prefix>>,
}

impl Network {
    /// The ranges of a tailnet whose IPv6 addresses are in `ula` (a /48):
    /// 100.64.0.0/10 without 100.115.92.0/23 (Tailscale keeps that block
    /// out of `*`), and `ula`.
    pub fn tailnet_ranges(ula: Prefix) -> Vec<Prefix> {
        let mut out = Vec::new();
        v4_without(u32::from_be_bytes([100, 64, 0, 0]), 10, u32::from_be_bytes([100, 115, 92, 0]), 23, &mut out);
        out.push(ula);
        out
    }

    /// The ranges of a tailnet whose ULA prefix is the six bytes `ula`.
    pub fn tailnet_ranges_of_ula(ula: [u8; 6]) -> Vec<Prefix> {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&ula);
        Network::tailnet_ranges(Prefix::new(IpAddr::V6(Ipv6Addr::from(b)), 48).unwrap_or(Prefix::ANY_V6))
    }

    /// What a source `*` stands for: every address without ranges, else the
    /// ranges and the approved subnet routes (not exit routes: the Internet
    /// is not a source).
    fn any_sources(&self) -> Vec<Prefix> {
        if self.ranges.is_empty() {
            return vec![Prefix::ANY_V4, Prefix::ANY_V6];
        }
        let mut out = self.ranges.clone();
        out.extend(self.routes.values().flatten().filter(|p| !p.is_empty()));
        out.sort();
        out.dedup();
        out
    }
}

/// Appends `base/len` without `hole/hole_len` (IPv4) as prefixes.
fn v4_without(base: u32, len: u8, hole: u32, hole_len: u8, out: &mut Vec<Prefix>) {
    let mask = |l: u8| if l == 0 { 0 } else { u32::MAX << (32 - l) };
    let inside = len <= hole_len && hole & mask(len) == base;
    let covered = hole_len <= len && base & mask(hole_len) == hole;
    if covered {
        return;
    }
    if !inside {
        out.extend(Prefix::new(IpAddr::V4(Ipv4Addr::from(base)), len));
        return;
    }
    v4_without(base, len + 1, hole, hole_len, out);
    v4_without(base | 1 << (31 - len), len + 1, hole, hole_len, out);
}

/// A set of node indices.
#[derive(Clone)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn or(&mut self, o: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a |= b;
        }
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(w, &bits)| (0..64).filter(move |b| bits >> b & 1 == 1).map(move |b| w * 64 + b))
    }
    fn any(&self) -> bool {
        self.0.iter().any(|w| *w != 0)
    }
}

/// Who a node is for the policy.
struct Identity<'a> {
    /// Tags that count (defined in tagOwners and applied by an owner).
    tags: Vec<&'a str>,
    /// Registered with tags at all (a tagged node has no user).
    tagged: bool,
    user: Option<&'a str>,
}

fn may_apply(policy: &Policy, tag: &str, login: &str, depth: usize) -> bool {
    if depth > MAX_TAG_OWNER_DEPTH {
        return false;
    }
    policy.tag_owners.get(tag).is_some_and(|owners| {
        owners.iter().any(|o| match &o.alias {
            Alias::User(u) => u == login,
            Alias::Group(g) => policy.groups.get(g).is_some_and(|m| m.iter().any(|u| u == login)),
            Alias::Tag(t) => may_apply(policy, t, login, depth + 1),
            _ => false,
        })
    })
}

fn identity<'a>(policy: &Policy, n: &'a Node) -> Identity<'a> {
    let tags = n
        .tags
        .iter()
        .map(String::as_str)
        .filter(|t| {
            policy.tag_owners.contains_key(*t)
                && n.tagged_by.as_deref().is_none_or(|login| may_apply(policy, t, login, 0))
        })
        .collect();
    let tagged = !n.tags.is_empty();
    Identity { tags, tagged, user: if tagged { None } else { n.user.as_deref() } }
}

struct Tailnet<'a> {
    policy: &'a Policy,
    nodes: &'a [Node],
    ids: Vec<Identity<'a>>,
    /// What a source `*` stands for.
    any: Vec<Prefix>,
    /// Aliases already expanded.
    cache: RefCell<HashMap<String, (Bits, Option<Prefix>)>>,
}

impl<'a> Tailnet<'a> {
    /// The tailnet of `nodes` under `policy` (also what `routes` builds on).
    fn new(policy: &'a Policy, nodes: &'a [Node], network: &Network) -> Tailnet<'a> {
        Tailnet {
            policy,
            nodes,
            ids: nodes.iter().map(|x| identity(policy, x)).collect(),
            any: network.any_sources(),
            cache: Default::default(),
        }
    }
}

impl Tailnet<'_> {
    /// The nodes an alias names, and the prefixes it names beyond nodes
    /// (worked out once per alias: rules name the same groups, tags and
    /// users often).
    fn expand(&self, alias: &Alias) -> (Bits, Option<Prefix>) {
        let key = format!("{alias:?}");
        if let Some(hit) = self.cache.borrow().get(&key) {
            return hit.clone();
        }
        let out = self.expand_uncached(alias);
        self.cache.borrow_mut().insert(key, out.clone());
        out
    }

    fn expand_uncached(&self, alias: &Alias) -> (Bits, Option<Prefix>) {
        let mut bits = Bits::new(self.nodes.len());
        let mut raw = None;
        for (i, (n, id)) in self.nodes.iter().zip(&self.ids).enumerate() {
            let hit = match alias {
                Alias::Any => true,
                Alias::User(u) => !id.tagged && id.user == Some(u.as_str()),
                Alias::Group(g) => {
                    !id.tagged
                        && id.user.is_some_and(|u| self.policy.groups.get(g).is_some_and(|m| m.iter().any(|x| x == u)))
                }
                Alias::Tag(t) => id.tags.contains(&t.as_str()),
                Alias::Prefix(p) => n.addresses.iter().any(|a| p.contains(*a)),
                Alias::Member => !id.tagged && id.user.is_some(),
                Alias::Tagged => id.tagged,
                Alias::SelfUser | Alias::Internet => false,
            };
            if hit {
                bits.set(i);
            }
        }
        if let Alias::Prefix(p) = alias {
            raw = Some(*p);
        }
        (bits, raw)
    }

    /// A rule's source nodes and source prefixes (shared by the compiler
    /// and the route rules, so `*` means the same to both).
    /// An address or prefix names the nodes it covers (they see the
    /// destination) but lets in only itself: a node's other address is not
    /// a source, as Tailscale writes it (ACL-AH02).
    fn sources(&self, src: &[Target]) -> (Bits, Vec<Prefix>) {
        let mut bits = Bits::new(self.nodes.len());
        let mut listed = Bits::new(self.nodes.len());
        let mut raw = Vec::new();
        for t in src {
            let (b, p) = self.expand(&t.alias);
            bits.or(&b);
            match t.alias {
                Alias::Any => {
                    raw.extend(self.any.iter().copied());
                    listed.or(&b);
                }
                Alias::Prefix(_) => {}
                _ => listed.or(&b),
            }
            raw.extend(p);
        }
        let prefixes = self.prefixes(&listed, &raw);
        (bits, prefixes)
    }

    /// Source prefixes: the raw prefixes, plus the addresses of the nodes they do not cover.
    fn prefixes(&self, nodes: &Bits, raw: &[Prefix]) -> Vec<Prefix> {
        let mut out = raw.to_vec();
        for i in nodes.iter() {
            for a in &self.nodes[i].addresses {
                if !raw.iter().any(|p| p.contains(*a)) {
                    out.push(Prefix::host(*a));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// A capability waiting for its node's filter: sources, name, values.
type Pending<'a> = (Vec<Prefix>, &'a str, &'a [serde_json::Value]);

/// Compiles `policy` for `nodes` knowing nothing of the tailnet beyond them
/// (a source `*` is every address, no routes); the result is in the order
/// of `nodes`.
pub fn compile(policy: &Policy, nodes: &[Node]) -> Vec<NodePolicy> {
    compile_in(policy, nodes, &Network::default())
}

/// Compiles `policy` for `nodes` of `network` (its ranges and approved
/// routes); the result is in the order of `nodes`.
pub fn compile_in(policy: &Policy, nodes: &[Node], network: &Network) -> Vec<NodePolicy> {
    let n = nodes.len();
    let net = Tailnet::new(policy, nodes, network);
    let mut filters: Vec<Vec<FilterRule>> = vec![Vec::new(); n];
    let mut peers: Vec<Bits> = vec![Bits::new(n); n];
    // Capabilities wait until every filter is known.
    let mut pending: Vec<Vec<Pending>> = vec![Vec::new(); n];
    for rule in &policy.rules {
        let (src, src_prefixes) = net.sources(&rule.src);
        for dst in &rule.dst {
            // Each destination node with the source nodes that may reach it.
            let mut sources_of: Vec<(usize, Bits)> = Vec::new();
            match &dst.target.alias {
                Alias::Internet => continue,
                Alias::SelfUser => {
                    for (d, id) in net.ids.iter().enumerate() {
                        let Some(user) = id.user.filter(|_| !id.tagged) else { continue };
                        let mut same = Bits::new(n);
                        for s in src.iter() {
                            // The destination itself counts (as Tailscale computes it:
                            // a user's only device still gets the rule).
                            if !net.ids[s].tagged && net.ids[s].user == Some(user) {
                                same.set(s);
                            }
                        }
                        if !same.any() {
                            continue;
                        }
                        let dests: Vec<Prefix> = nodes[d].addresses.iter().map(|a| Prefix::host(*a)).collect();
                        let prefixes = net.prefixes(&same, &[]);
                        sources_of.push((d, same));
                        for ip in &dst.ip {
                            filters[d].push(FilterRule {
                                sources: prefixes.clone(),
                                destinations: dests.clone(),
                                protocols: ip.protocols.clone(),
                                ports: ip.ports.clone(),
                            });
                        }
                        for (name, values) in &rule.app {
                            pending[d].push((prefixes.clone(), name, values));
                        }
                    }
                }
                alias => {
                    let (dset, within) = net.expand(alias);
                    for d in dset.iter() {
                        let dests: Vec<Prefix> = nodes[d]
                            .addresses
                            .iter()
                            .filter(|a| within.is_none_or(|p| p.contains(**a)))
                            .map(|a| Prefix::host(*a))
                            .collect();
                        for ip in &dst.ip {
                            filters[d].push(FilterRule {
                                sources: src_prefixes.clone(),
                                destinations: dests.clone(),
                                protocols: ip.protocols.clone(),
                                ports: ip.ports.clone(),
                            });
                        }
                        for (name, values) in &rule.app {
                            pending[d].push((src_prefixes.clone(), name, values));
                        }
                        sources_of.push((d, src.clone()));
                    }
                }
            }
            // Network rules make peers visible both ways; capabilities alone do not.
            if dst.ip.is_empty() {
                continue;
            }
            for (d, s) in &sources_of {
                peers[*d].or(s);
                for i in s.iter() {
                    peers[i].set(*d);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(n);
    for (d, (filter, mut seen)) in filters.into_iter().zip(peers).enumerate() {
        seen.clear(d);
        let mut capabilities = Vec::new();
        // A capability opens no path: keep only callers the filter lets in.
        // (Host prefixes looked up in a set, the rest covered by a scan.)
        let mut hosts = HashSet::new();
        let mut nets = Vec::new();
        if !pending[d].is_empty() {
            for s in filter.iter().flat_map(|r| &r.sources) {
                if *s == Prefix::host(s.addr()) {
                    hosts.insert(*s);
                } else {
                    nets.push(*s);
                }
            }
            nets.sort();
            nets.dedup();
        }
        for (sources, name, values) in &pending[d] {
            let reachable: Vec<Prefix> =
                sources.iter().filter(|p| hosts.contains(*p) || nets.iter().any(|s| s.covers(p))).copied().collect();
            if !reachable.is_empty() {
                capabilities.push(CapGrant { sources: reachable, name: (*name).into(), values: values.to_vec() });
            }
        }
        let mut filter = filter;
        dedup(&mut filter);
        out.push(NodePolicy { filter, peers: seen.iter().map(|i| nodes[i].id).collect(), capabilities });
    }
    routes::extend_for_routers(&net, &network.routes, &mut out);
    out
}

/// Drops exact repeats (several rules often compile to the same line).
/// Rules are hashed in place (no copy of their long source lists); equal
/// hashes are confirmed by comparing with the rules kept.
fn dedup(rules: &mut Vec<FilterRule>) {
    use std::hash::BuildHasher;
    let hasher = std::collections::hash_map::RandomState::new();
    let mut kept: Vec<FilterRule> = Vec::with_capacity(rules.len());
    let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::with_capacity(rules.len());
    for r in rules.drain(..) {
        let same = by_hash.entry(hasher.hash_one(&r)).or_default();
        if !same.iter().any(|&i| kept[i] == r) {
            same.push(kept.len());
            kept.push(r);
        }
    }
    *rules = kept;
}

/// The tailnet a policy's tests run against: one node per user, tag, host or
/// address the tests name, with addresses from 240.0.0.0/4 (reserved, so no
/// rule names them by accident) unless the test names an address.
struct TestNet {
    nodes: Vec<Node>,
    by_text: BTreeMap<String, usize>,
}

impl TestNet {
    fn node(&mut self, role: &str, t: &Target) -> usize {
        let key = format!("{role} {}", t.text);
        if let Some(&i) = self.by_text.get(&key) {
            return i;
        }
        let i = self.nodes.len();
        let synthetic = IpAddr::V4(Ipv4Addr::from(0xf000_0000u32 + i as u32 + 1));
        let (addresses, tags, user) = match &t.alias {
            Alias::User(u) => (vec![synthetic], vec![], Some(u.clone())),
            Alias::Tag(tag) => (vec![synthetic], vec![tag.clone()], None),
            Alias::Prefix(p) => (vec![p.addr()], vec![], None),
            _ => (vec![synthetic], vec![], None),
        };
        self.nodes.push(Node { id: i as i64, addresses, tags, user, tagged_by: None });
        self.by_text.insert(key, i);
        i
    }
}

/// Runs the policy's `tests`; the first that fails is the error, at its line.
pub fn run_tests(policy: &Policy) -> Result<(), PolicyError> {
    if policy.tests.is_empty() {
        return Ok(());
    }
    let mut net = TestNet { nodes: Vec::new(), by_text: BTreeMap::new() };
    let mut cases = Vec::new();
    for t in &policy.tests {
        let s = net.node("src", &t.src);
        for (want, list) in [(true, &t.accept), (false, &t.deny)] {
            for d in list {
                cases.push((t, s, net.node("dst", &d.target), d, want));
            }
        }
    }
    let compiled = compile(policy, &net.nodes);
    let filters: Vec<Filter> = compiled.into_iter().map(|p| Filter::new(p.filter)).collect();
    for (t, s, d, dst, want) in cases {
        let src = net.nodes[s].addresses[0];
        let to = net.nodes[d].addresses[0];
        let proto = if t.protocol == PROTO_ICMP && to.is_ipv6() { PROTO_ICMPV6 } else { t.protocol };
        let got = filters[d].accepts(src, to, proto, dst.port);
        if got != want {
            return Err(test_failure(t.pos, dst.target.pos, &t.src.text, &dst.target.text, dst.port, t.protocol, want));
        }
    }
    Ok(())
}

fn test_failure(test: Pos, at: Pos, src: &str, dst: &str, port: u16, proto: u8, want: bool) -> PolicyError {
    let (expected, got) = if want { ("accept", "denied") } else { ("deny", "accepted") };
    PolicyError {
        pos: Some(at),
        kind: ErrorKind::TestFailed,
        message: format!(
            "test at line {} failed: {src} -> {dst}:{port} (protocol {proto}) is {got}, the test expects {expected}",
            test.line
        ),
    }
}
