//! What the policy says about routes beyond the tailnet (subnet routes and
//! exit nodes): which nodes may send to which outside prefixes (rules whose
//! destination is a prefix, `*` or `autogroup:internet`), and which nodes
//! `autoApprovers` approves as routers. The control server's route logic
//! (`control/routes.rs`) combines these with the routes nodes advertise.

use super::{Bits, Tailnet};
use crate::policy::model::{Alias, Policy};
use crate::policy::Node;
use wiremesh_core::filter::{PortRange, Prefix};

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

/// The rules of `policy` with a destination beyond the nodes: a prefix,
/// `*` (every address, so every route and the Internet) or `autogroup:internet`.
pub fn route_rules(policy: &Policy, nodes: &[Node]) -> Vec<RouteRule> {
    let n = nodes.len();

    let net = Tailnet::new(policy, nodes);
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
        let mut src = Bits::new(n);
        let mut raw = Vec::new();
        for t in &rule.src {
            let (b, p) = net.expand(&t.alias);
            src.or(&b);
            if matches!(t.alias, Alias::Any) {
                raw.extend([Prefix::ANY_V4, Prefix::ANY_V6]);
            }
            raw.extend(p);
        }
        let source_prefixes = net.prefixes(&src, &raw);
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
    let net = Tailnet::new(policy, nodes);
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
