//! The compiled policy as the map carries it ([`proto::FilterRule`],
//! [`proto::CapGrant`]) and back to the core's [`Filter`].

use super::compile::{CapGrant, Node};
use super::model::{parse_ports, parse_prefix};
use crate::control::proto;
use wiremesh_core::filter::{Filter, PortRange, Prefix, Rule};

/// A node of the control server as the compiler sees it: a tagged node is
/// its tags' (any tag `tagOwners` defines counts), an untagged one its owner's.
pub fn node_of(n: &proto::NodeInfo) -> Node {
    Node {
        id: n.id,
        addresses: vec![n.ipv4.into(), n.ipv6.into()],
        tags: n.tags.clone(),
        user: n.tags.is_empty().then(|| n.owner.clone()),
        tagged_by: None,
    }
}

fn prefixes_to_wire(prefixes: &[Prefix]) -> Vec<String> {
    if prefixes == [Prefix::ANY_V4, Prefix::ANY_V6] {
        return vec!["*".into()];
    }
    prefixes.iter().map(Prefix::to_string).collect()
}

fn ports_to_wire(ports: &[PortRange]) -> String {
    if ports == [PortRange::ALL] {
        return "*".into();
    }
    let parts: Vec<String> = ports
        .iter()
        .map(|r| if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) })
        .collect();
    parts.join(",")
}

/// A node's filter rules as the map sends them.
pub fn filter_to_wire(rules: &[Rule]) -> Vec<proto::FilterRule> {
    rules
        .iter()
        .map(|r| proto::FilterRule {
            src: prefixes_to_wire(&r.sources),
            dst: prefixes_to_wire(&r.destinations),
            protocols: r.protocols.clone(),
            ports: ports_to_wire(&r.ports),
        })
        .collect()
}

/// A node's capabilities as the map sends them.
pub fn caps_to_wire(caps: &[CapGrant]) -> Vec<proto::CapGrant> {
    caps.iter()
        .map(|c| proto::CapGrant { src: prefixes_to_wire(&c.sources), name: c.name.clone(), values: c.values.clone() })
        .collect()
}

fn prefixes_from_wire(list: &[String]) -> Result<Vec<Prefix>, String> {
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        if s == "*" {
            out.extend([Prefix::ANY_V4, Prefix::ANY_V6]);
        } else {
            out.push(parse_prefix(s).ok_or_else(|| format!("bad prefix {s:?} in the filter"))?);
        }
    }
    Ok(out)
}

/// The core filter for a map's rules; `None` for the allow-all filter of a
/// tailnet without a policy (the device then tracks no flows at all).
pub fn filter_from_wire(rules: &[proto::FilterRule]) -> Result<Option<Filter>, String> {
    if rules == proto::FilterRule::allow_all() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(rules.len());
    for r in rules {
        let ports = if r.ports.is_empty() {
            Vec::new()
        } else {
            parse_ports(&r.ports).ok_or_else(|| format!("bad ports {:?} in the filter", r.ports))?
        };
        out.push(Rule {
            sources: prefixes_from_wire(&r.src)?,
            destinations: prefixes_from_wire(&r.dst)?,
            protocols: r.protocols.clone(),
            ports,
        });
    }
    Ok(Some(Filter::new(out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremesh_core::filter::PROTO_TCP;

    #[test]
    fn rules_survive_the_wire() {
        let rules = vec![
            Rule {
                sources: vec![Prefix::ANY_V4, Prefix::ANY_V6],
                destinations: vec![Prefix::host("100.64.0.1".parse().unwrap()), parse_prefix("fd7a::/48").unwrap()],
                protocols: vec![PROTO_TCP, 17],
                ports: vec![PortRange::single(22), PortRange { first: 8000, last: 8100 }],
            },
            Rule {
                sources: vec![Prefix::host("100.64.0.2".parse().unwrap())],
                destinations: vec![Prefix::host("100.64.0.1".parse().unwrap())],
                protocols: vec![],
                ports: vec![PortRange::ALL],
            },
        ];
        let wire = filter_to_wire(&rules);
        assert_eq!(wire[0].src, vec!["*"]);
        assert_eq!(wire[0].ports, "22,8000-8100");
        assert_eq!(wire[1].dst, vec!["100.64.0.1/32"]);
        let back = filter_from_wire(&wire).unwrap().unwrap();
        assert_eq!(back.rules(), &rules[..]);
        assert_eq!(filter_from_wire(&proto::FilterRule::allow_all()).unwrap(), None);
        let bad = proto::FilterRule { src: vec!["x".into()], dst: vec![], protocols: vec![], ports: "*".into() };
        assert!(filter_from_wire(&[bad]).is_err());
    }
}
