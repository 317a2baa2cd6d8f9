//! What the policy says about routes beyond the tailnet (subnet routes and
//! exit nodes): which nodes may send to which outside prefixes (rules whose
//! destination is a prefix, `*` or `autogroup:internet`), and which nodes
//! `autoApprovers` approves as routers, and what approved routes add to
//! routers' filters. The control server's route logic (`control/routes.rs`)
//! combines these with the routes nodes advertise.

use super::{Bits, Network, NodePolicy, Tailnet};
use crate::policy::model::{Alias, Policy};
use crate::policy::Node;
use std::collections::BTreeMap;
use wiremesh_core::filter::{PortRange, Prefix, Rule as FilterRule};

/// A rule that reaches beyond the tailnet's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// The source nodes, as indices into the compiled node list.
    pub sources: Vec<usize>,
    /// The source prefixes (nodes' addresses plus raw prefixes), for the router's filter.
    pub source_prefixes: Vec<Prefix>,
    /// The destination prefix; `None` is `autogroup:internet` (exit nodes).
    pub destination: Option<Prefix>,
    /// Protocols (empty: all) and ports, one entry per `ip` spec.
    pub ip: Vec<(Vec<u8>, Vec<PortRange>)>,
}

impl RouteRule {
    /// Whether the rule lets traffic to route `p` through: an exit route
    /// (`0.0.0.0/0`, `::/0`) by `autogroup:internet` or a destination equal
    /// to it (`*`), a subnet route by a destination that overlaps it.
    pub fn reaches(&self, p: &Prefix) -> bool {
        match (&self.destination, p.is_empty()) {
            (None, exit) => exit,
            (Some(d), true) => d == p,
            (Some(d), false) => d.covers(p) || p.covers(d),
        }
    }
}

/// The rules of `policy` with a destination beyond the nodes: a prefix,
/// `*` (every address, so every route and the Internet) or `autogroup:internet`.
/// (Their source prefixes take a source `*` as every address; the compiler's
/// own use, [`extend_for_routers`], knows the tailnet's ranges.)
pub fn route_rules(policy: &Policy, nodes: &[Node]) -> Vec<RouteRule> {
    rules_beyond(&Tailnet::new(policy, nodes, &Network::default()))
}

fn rules_beyond(net: &Tailnet) -> Vec<RouteRule> {
    let policy = net.policy;
    let mut out = Vec::new();
    for rule in &policy.rules {
        let mut dsts: Vec<(Option<Prefix>, &[crate::policy::model::IpSpec])> = Vec::new();
        for d in &rule.dst {
            if d.ip.is_empty() {
                continue;
            }
            match &d.target.alias {
                Alias::Prefix(p) => dsts.push((Some(*p), &d.ip)),
                Alias::Internet => dsts.push((None, &d.ip)),
                Alias::Any => {
                    dsts.push((Some(Prefix::ANY_V4), &d.ip));
                    dsts.push((Some(Prefix::ANY_V6), &d.ip));
                }
                _ => {}
            }
        }
        if dsts.is_empty() {
            continue;
        }
        let (src, source_prefixes) = net.sources(&rule.src);
        let sources: Vec<usize> = src.iter().collect();
        for (destination, ip) in dsts {
            out.push(RouteRule {
                sources: sources.clone(),
                source_prefixes: source_prefixes.clone(),
                destination,
                ip: ip.iter().map(|s| (s.protocols.clone(), s.ports.clone())).collect(),
            });
        }
    }
    out
}

/// What approved routes add to the compiled policy: each router's filter
/// accepts what the policy lets sources send to its approved prefixes (the
/// rule's destination narrowed to the route: a router accepts only traffic
/// for networks it serves), and those sources and the router see each other.
/// `compiled` is in the order of `net`'s nodes.
pub(super) fn extend_for_routers(net: &Tailnet, routers: &BTreeMap<i64, Vec<Prefix>>, compiled: &mut [NodePolicy]) {
    if routers.is_empty() {
        return;
    }
    let nodes = net.nodes;
    let rules = rules_beyond(net);
    for (r, node) in nodes.iter().enumerate() {
        let Some(prefixes) = routers.get(&node.id) else { continue };
        for rule in &rules {
            let reached: Vec<Prefix> = prefixes
                .iter()
                .filter(|p| rule.reaches(p))
                .map(|p| match rule.destination {
                    // The narrower of the rule's destination and the route.
                    Some(d) if p.covers(&d) => d,
                    _ => *p,
                })
                .collect();
            if reached.is_empty() {
                continue;
            }
            for (protocols, ports) in &rule.ip {
                compiled[r].filter.push(FilterRule {
                    sources: rule.source_prefixes.clone(),
                    destinations: reached.clone(),
                    protocols: protocols.clone(),
                    ports: ports.clone(),
                });
            }
            for &s in rule.sources.iter().filter(|&&s| s != r) {
                if !compiled[r].peers.contains(&nodes[s].id) {
                    compiled[r].peers.push(nodes[s].id);
                }
                if !compiled[s].peers.contains(&node.id) {
                    compiled[s].peers.push(node.id);
                }
            }
        }
    }
    for c in compiled.iter_mut() {
        c.peers.sort_unstable();
        c.peers.dedup();
    }
}

/// What `autoApprovers` lets one node route without an administrator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoApproval {
    /// Advertised prefixes inside one of these are approved.
    pub routes: Vec<Prefix>,
    /// Its exit routes are approved.
    pub exit_node: bool,
}

/// For each node (in the order of `nodes`), what `autoApprovers` approves.
pub fn auto_approvals(policy: &Policy, nodes: &[Node]) -> Vec<AutoApproval> {
    let net = Tailnet::new(policy, nodes, &Network::default());
    let mut out = vec![AutoApproval::default(); nodes.len()];
    let approvers = |list: &[crate::policy::model::Target]| {
        let mut b = Bits::new(nodes.len());
        for t in list {
            b.or(&net.expand(&t.alias).0);
        }
        b
    };
    for (prefix, who) in &policy.auto_approvers.routes {
        for i in approvers(who).iter() {
            out[i].routes.push(*prefix);
        }
    }
    for i in approvers(&policy.auto_approvers.exit_node).iter() {
        out[i].exit_node = true;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn node(id: i64, ip: &str, tags: &[&str], user: &str) -> Node {
        Node {
            id,
            addresses: vec![ip.parse::<IpAddr>().unwrap()],
            tags: tags.iter().map(|t| t.to_string()).collect(),
            user: Some(user.into()),
            tagged_by: None,
        }
    }

    #[test]
    fn route_rules_and_auto_approvals_follow_the_policy() {
        let policy = crate::policy::parse(
            r#"{"tagOwners": {"tag:router": [], "tag:exit": []},
                "groups": {"group:ops": ["bob@"]},
                "acls": [
                    {"action": "accept", "src": ["alice@"], "dst": ["10.1.0.0/16:22"]},
                    {"action": "accept", "src": ["group:ops"], "dst": ["autogroup:internet:*"]},
                    {"action": "accept", "src": ["tag:router"], "dst": ["tag:exit:*"]},
                ],
                "autoApprovers": {"routes": {"10.1.0.0/16": ["tag:router"]}, "exitNode": ["tag:exit"]}}"#,
        )
        .unwrap();
        let nodes = [
            node(1, "100.64.0.1", &[], "alice"),
            node(2, "100.64.0.2", &[], "bob"),
            node(3, "100.64.0.3", &["tag:router"], "x"),
            node(4, "100.64.0.4", &["tag:exit"], "x"),
        ];
        let rules = route_rules(&policy, &nodes);
        assert_eq!(rules.len(), 2, "{rules:?}");
        assert_eq!(rules[0].sources, vec![0]);
        assert_eq!(rules[0].destination, crate::policy::model::parse_prefix("10.1.0.0/16"));
        assert_eq!(rules[0].ip[0].1, vec![PortRange::single(22)]);
        assert_eq!(rules[1].sources, vec![1]);
        assert_eq!(rules[1].destination, None);
        let auto = auto_approvals(&policy, &nodes);
        assert_eq!(auto[2].routes, vec![crate::policy::model::parse_prefix("10.1.0.0/16").unwrap()]);
        assert!(!auto[2].exit_node && auto[3].exit_node && auto[0] == AutoApproval::default());
        // Approvers must name nodes, not addresses; unknown keys are refused.
        for bad in [
            r#"{"autoApprovers": {"routes": {"10.1.0.0/16": ["*"]}}}"#,
            r#"{"autoApprovers": {"routes": {"10.1.0.1/16": []}}}"#,
            r#"{"autoApprovers": {"services": {}}}"#,
            r#"{"autoApprovers": {"exitNode": ["tag:nope"]}}"#,
        ] {
            assert!(crate::policy::parse(bad).is_err(), "{bad}");
        }
    }
}
