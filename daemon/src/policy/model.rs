//! The policy file's model: the sections wiremesh implements, read from a
//! parsed huJSON document and checked (every name referenced is defined,
//! every port and protocol is well formed). Anything else the file holds is
//! refused by name, with its position.

use super::hujson::{Key, Kind, Pos, Value};
use super::{ErrorKind, PolicyError};
use std::collections::BTreeMap;
use std::net::IpAddr;
use wiremesh_core::filter::{has_ports, PortRange, Prefix, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// The protocols a rule without `proto` (or an `ip` entry without one) covers,
/// as Tailscale does: TCP, UDP and ICMP (v4 and v6).
pub const DEFAULT_PROTOCOLS: [u8; 4] = [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6];

/// Top-level sections of Tailscale policy files wiremesh does not implement.
const UNSUPPORTED_SECTIONS: &[&str] = &[
    "ssh",
    "nodeAttrs",
    "postures",
    "derpMap",
    "disableIPv4",
    "OneCIDRPerLine",
    "randomizeClientPort",
    "attrConfig",
    "defaultSrcPosture",
    "ipsets",
];

/// Protocol names accepted in `proto` and `ip` (IANA numbers are accepted too).
const PROTOCOL_NAMES: &[(&str, &[u8])] = &[
    ("tcp", &[PROTO_TCP]),
    ("udp", &[PROTO_UDP]),
    ("icmp", &[PROTO_ICMP, PROTO_ICMPV6]),
    ("ipv6-icmp", &[PROTO_ICMPV6]),
    ("sctp", &[132]),
    ("igmp", &[2]),
    ("ipv4", &[4]),
    ("ip-in-ip", &[4]),
    ("egp", &[8]),
    ("igp", &[9]),
    ("gre", &[47]),
    ("esp", &[50]),
    ("ah", &[51]),
];

/// Whom or what a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alias {
    /// `*`: every node and every address.
    Any,
    /// A user by login (`alice@example.com`; `alice@` for a login without a domain).
    User(String),
    /// `group:name`.
    Group(String),
    /// `tag:name`.
    Tag(String),
    /// An address or prefix, written out or through a `hosts` name.
    Prefix(Prefix),
    /// `autogroup:member`: every node owned by a user (not tagged).
    Member,
    /// `autogroup:tagged`: every tagged node.
    Tagged,
    /// `autogroup:self`: the source's own user's nodes (destinations only).
    SelfUser,
    /// `autogroup:internet`: accepted for exit-node rules; matches no node yet.
    Internet,
}

/// An alias with where the file names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where it is written.
    pub pos: Pos,
    /// As written.
    pub text: String,
    /// What it names.
    pub alias: Alias,
}

/// Protocols and ports, one entry of a grant's `ip` (or an ACL's `proto` with
/// a destination's ports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSpec {
    /// Protocol numbers (empty: every protocol).
    pub protocols: Vec<u8>,
    /// Ports, for the protocols that have them.
    pub ports: Vec<PortRange>,
}

/// One destination of a rule with what it may be reached on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Who.
    pub target: Target,
    /// On what.
    pub ip: Vec<IpSpec>,
}

/// An ACL or a grant: sources may reach destinations (and hold capabilities on them).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Where the rule starts in the file.
    pub pos: Pos,
    /// Who may connect.
    pub src: Vec<Target>,
    /// To whom, on what.
    pub dst: Vec<Destination>,
    /// Application capabilities granted to the sources on the destinations.
    pub app: BTreeMap<String, Vec<serde_json::Value>>,
}

/// One destination of a test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestTarget {
    /// The destination.
    pub target: Target,
    /// The port.
    pub port: u16,
}

/// An entry of `tests`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Test {
    /// Where the test starts.
    pub pos: Pos,
    /// The source (one user, tag, host or address).
    pub src: Target,
    /// The protocol the test checks (TCP unless `proto` says otherwise).
    pub protocol: u8,
    /// Must be accepted.
    pub accept: Vec<TestTarget>,
    /// Must be denied.
    pub deny: Vec<TestTarget>,
}

/// A parsed and checked policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// `group:name` to user logins.
    pub groups: BTreeMap<String, Vec<String>>,
    /// `tag:name` to who may apply it (user logins, groups, tags).
    pub tag_owners: BTreeMap<String, Vec<Target>>,
    /// Host names to prefixes.
    pub hosts: BTreeMap<String, Prefix>,
    /// The ACLs and the grants, in file order (both only allow).
    pub rules: Vec<Rule>,
    /// The tests.
    pub tests: Vec<Test>,
    /// `autoApprovers`: who may have routes approved without an administrator.
    pub auto_approvers: AutoApprovers,
}

/// `autoApprovers`: routes a node advertises are approved when the node is
/// one of the approvers of a prefix covering them (`routes`), and its exit
/// routes when it is one of `exitNode`. See docs/routes.md.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoApprovers {
    /// Prefixes with who may route them (users, groups, tags, autogroups).
    pub routes: Vec<(Prefix, Vec<Target>)>,
    /// Who may be an exit node.
    pub exit_node: Vec<Target>,
}

fn err(pos: Pos, kind: ErrorKind, message: String) -> PolicyError {
    PolicyError { pos: Some(pos), kind, message }
}

/// `autogroup:self` means the sources' own users' devices, so a rule with
/// it takes only sources that are users' devices: users, groups,
/// `autogroup:member` or `*` (a tag, a host or an address has no user; as
/// Tailscale refuses it, headscale's ACL-ERR08 and ERR09).
fn check_self_sources(rule: &Rule) -> Result<(), PolicyError> {
    if !rule.dst.iter().any(|d| d.target.alias == Alias::SelfUser) {
        return Ok(());
    }
    for s in &rule.src {
        if !matches!(s.alias, Alias::User(_) | Alias::Group(_) | Alias::Member | Alias::Any) {
            return Err(invalid(
                s.pos,
                format!(
                    "{:?}: a rule to autogroup:self takes only users, groups, autogroup:member or * as sources",
                    s.text
                ),
            ));
        }
    }
    Ok(())
}

fn invalid(pos: Pos, message: String) -> PolicyError {
    err(pos, ErrorKind::Invalid, message)
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a [(Key, Value)], PolicyError> {
    match &v.kind {
        Kind::Object(m) => Ok(m),
        _ => Err(invalid(v.pos, format!("{what} must be an object, not {}", v.kind_name()))),
    }
}

fn array<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], PolicyError> {
    match &v.kind {
        Kind::Array(a) => Ok(a),
        _ => Err(invalid(v.pos, format!("{what} must be an array, not {}", v.kind_name()))),
    }
}

fn string<'a>(v: &'a Value, what: &str) -> Result<&'a str, PolicyError> {
    match &v.kind {
        Kind::String(s) => Ok(s),
        _ => Err(invalid(v.pos, format!("{what} must be a string, not {}", v.kind_name()))),
    }
}

fn strings<'a>(v: &'a Value, what: &str) -> Result<Vec<(Pos, &'a str)>, PolicyError> {
    array(v, what)?.iter().map(|s| Ok((s.pos, string(s, &format!("each entry of {what}"))?))).collect()
}

/// The members of an object that must have only `known` fields: an unknown
/// one is refused by name.
fn fields<'a>(
    v: &'a Value,
    what: &str,
    known: &[&str],
    unsupported: &[&str],
) -> Result<BTreeMap<&'a str, &'a Value>, PolicyError> {
    let mut out = BTreeMap::new();
    for (k, val) in object(v, what)? {
        if unsupported.contains(&k.name.as_str()) {
            return Err(err(
                k.pos,
                ErrorKind::Unsupported,
                format!("{what}: field {:?} is not supported by wiremesh", k.name),
            ));
        }
        if !known.contains(&k.name.as_str()) {
            return Err(err(
                k.pos,
                ErrorKind::Unsupported,
                format!("{what}: unknown field {:?} (known: {})", k.name, known.join(", ")),
            ));
        }
        out.insert(k.name.as_str(), val);
    }
    Ok(out)
}

/// A user login as policies write it: lowercase, `alice@` for plain `alice`.
pub fn user_login(s: &str) -> Option<String> {
    let (local, domain) = s.split_once('@')?;
    if local.is_empty() || s.chars().any(|c| c.is_whitespace() || c == ':') {
        return None;
    }
    let login = if domain.is_empty() { local.to_string() } else { s.to_string() };
    Some(login.to_ascii_lowercase())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses `1.2.3.4`, `1.2.3.0/24`, `fd7a::1`, `fd7a::/48`.
pub fn parse_prefix(s: &str) -> Option<Prefix> {
    match s.split_once('/') {
        Some((a, l)) => {
            let addr: IpAddr = a.parse().ok()?;
            if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let p = Prefix::new(addr, l.parse().ok()?)?;
            // A prefix with host bits set is a typo more often than intent.
            (p.addr() == addr).then_some(p)
        }
        None => Some(Prefix::host(s.parse().ok()?)),
    }
}

/// Parses `*`, `22`, `22,80`, `8000-8100` and lists of them.
pub fn parse_ports(s: &str) -> Option<Vec<PortRange>> {
    if s == "*" {
        return Some(vec![PortRange::ALL]);
    }
    s.split(',')
        .map(|part| {
            let num = |t: &str| -> Option<u16> {
                (!t.is_empty() && t.len() <= 5 && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok())?
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (first, last) = (num(a)?, num(b)?);
                    (first <= last).then_some(PortRange { first, last })
                }
                None => num(part).map(PortRange::single),
            }
        })
        .collect()
}

/// Parses a protocol name or IANA number.
pub fn parse_protocol(s: &str) -> Option<Vec<u8>> {
    let lower = s.to_ascii_lowercase();
    if let Some((_, p)) = PROTOCOL_NAMES.iter().find(|(n, _)| *n == lower) {
        return Some(p.to_vec());
    }
    if !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u8>().ok().map(|n| vec![n]);
    }
    None
}

/// Whether these ports may go with these protocols: only TCP, UDP and SCTP
/// have ports, so any other protocol takes `*` alone.
fn ports_fit(protocols: &[u8], ports: &[PortRange]) -> bool {
    ports == [PortRange::ALL] || (!protocols.is_empty() && protocols.iter().all(|p| has_ports(*p)))
}

struct Reader {
    groups: BTreeMap<String, Vec<String>>,
    tag_names: Vec<String>,
    hosts: BTreeMap<String, Prefix>,
}

impl Reader {
    /// Reads an alias; `dst` says whether destination-only autogroups may appear.
    fn alias(&self, pos: Pos, text: &str, dst: bool) -> Result<Target, PolicyError> {
        let alias = if text == "*" {
            Alias::Any
        } else if let Some(name) = text.strip_prefix("group:") {
            if !self.groups.contains_key(text) {
                return Err(invalid(pos, format!("group {name:?} is not defined in groups")));
            }
            Alias::Group(text.into())
        } else if text.starts_with("tag:") {
            if !self.tag_names.iter().any(|t| t == text) {
                return Err(invalid(pos, format!("{text:?} is not defined in tagOwners")));
            }
            Alias::Tag(text.into())
        } else if let Some(a) = text.strip_prefix("autogroup:") {
            match a {
                "member" => Alias::Member,
                "tagged" => Alias::Tagged,
                "self" if dst => Alias::SelfUser,
                "internet" if dst => Alias::Internet,
                "self" | "internet" => {
                    return Err(invalid(pos, format!("{text} may only be a destination")));
                }
                _ => {
                    return Err(err(pos, ErrorKind::Unsupported, format!("{text} is not supported by wiremesh")));
                }
            }
        } else if let Some(p) = text.strip_prefix("ipset:") {
            return Err(err(pos, ErrorKind::Unsupported, format!("ipset {p:?}: ipsets are not supported by wiremesh")));
        } else if text.contains('@') {
            Alias::User(user_login(text).ok_or_else(|| invalid(pos, format!("{text:?} is not a user login")))?)
        } else if let Some(p) = self.hosts.get(text) {
            Alias::Prefix(*p)
        } else if let Some(p) = parse_prefix(text) {
            Alias::Prefix(p)
        } else {
            return Err(invalid(
                pos,
                format!("{text:?} is no user (user@domain), group:, tag:, autogroup:, host name, address or prefix"),
            ));
        };
        Ok(Target { pos, text: text.into(), alias })
    }

    fn targets(&self, v: &Value, what: &str, dst: bool) -> Result<Vec<Target>, PolicyError> {
        strings(v, what)?.into_iter().map(|(pos, s)| self.alias(pos, s, dst)).collect()
    }

    /// Splits `target:ports` at the last colon (IPv6 addresses hold colons too).
    fn target_ports(&self, pos: Pos, s: &str) -> Result<(Target, Vec<PortRange>), PolicyError> {
        let Some((t, ports)) = s.rsplit_once(':') else {
            return Err(invalid(
                pos,
                format!("destination {s:?} needs ports (target:ports, for example host:22 or *:*)"),
            ));
        };
        let ports =
            parse_ports(ports).ok_or_else(|| invalid(pos, format!("destination {s:?}: bad ports {ports:?}")))?;
        Ok((self.alias(pos, t, true)?, ports))
    }

    fn ip_spec(&self, pos: Pos, s: &str) -> Result<IpSpec, PolicyError> {
        if s == "*" {
            return Ok(IpSpec { protocols: Vec::new(), ports: vec![PortRange::ALL] });
        }
        let (protocols, ports) = match s.split_once(':') {
            Some((proto, ports)) => (
                parse_protocol(proto).ok_or_else(|| invalid(pos, format!("ip {s:?}: unknown protocol {proto:?}")))?,
                ports,
            ),
            None => (DEFAULT_PROTOCOLS.to_vec(), s),
        };
        let ports = parse_ports(ports).ok_or_else(|| invalid(pos, format!("ip {s:?}: bad ports {ports:?}")))?;
        if !ports_fit(&protocols, &ports) && protocols != DEFAULT_PROTOCOLS {
            return Err(invalid(pos, format!("ip {s:?}: only tcp, udp and sctp have ports; use proto:*")));
        }
        Ok(IpSpec { protocols, ports })
    }

    /// Reads `autoApprovers` (`routes`: prefix to approvers; `exitNode`: approvers).
    fn auto_approvers(&self, v: &Value) -> Result<AutoApprovers, PolicyError> {
        let mut out = AutoApprovers::default();
        for (k, v) in object(v, "autoApprovers")? {
            match k.name.as_str() {
                "routes" => {
                    for (p, who) in object(v, "autoApprovers.routes")? {
                        let prefix = parse_prefix(&p.name).filter(|_| p.name.contains('/')).ok_or_else(|| {
                            invalid(p.pos, format!("{:?} is no canonical prefix (a.b.c.d/n)", p.name))
                        })?;
                        out.routes.push((prefix, self.approvers(who, &p.name)?));
                    }
                }
                "exitNode" => out.exit_node = self.approvers(v, "exitNode")?,
                other => {
                    return Err(err(
                        k.pos,
                        ErrorKind::Unsupported,
                        format!("autoApprovers.{other} is not supported (wiremesh reads routes and exitNode)"),
                    ))
                }
            }
        }
        Ok(out)
    }

    fn approvers(&self, v: &Value, what: &str) -> Result<Vec<Target>, PolicyError> {
        let list = self.targets(v, what, false)?;
        if let Some(t) = list.iter().find(|t| matches!(t.alias, Alias::Any | Alias::Prefix(_))) {
            return Err(invalid(t.pos, format!("{:?}: approvers are users, groups, tags or autogroups", t.text)));
        }
        Ok(list)
    }

    fn acl(&self, v: &Value) -> Result<Rule, PolicyError> {
        let f = fields(v, "an ACL", &["action", "src", "dst", "proto"], &["users", "ports", "srcPosture"])?;
        let action = f.get("action").ok_or_else(|| invalid(v.pos, "an ACL needs \"action\"".into()))?;
        if string(action, "action")? != "accept" {
            return Err(invalid(action.pos, "the only ACL action is \"accept\" (everything else is denied)".into()));
        }
        let protocols = match f.get("proto") {
            None => DEFAULT_PROTOCOLS.to_vec(),
            Some(p) => {
                let s = string(p, "proto")?;
                parse_protocol(s).ok_or_else(|| invalid(p.pos, format!("unknown protocol {s:?}")))?
            }
        };
        let src =
            self.targets(f.get("src").ok_or_else(|| invalid(v.pos, "an ACL needs \"src\"".into()))?, "src", false)?;
        let dst_v = f.get("dst").ok_or_else(|| invalid(v.pos, "an ACL needs \"dst\"".into()))?;
        let mut dst = Vec::new();
        for (pos, s) in strings(dst_v, "dst")? {
            let (target, ports) = self.target_ports(pos, s)?;
            if f.contains_key("proto") && !ports_fit(&protocols, &ports) {
                return Err(invalid(pos, format!("{s:?}: only tcp, udp and sctp have ports; use :*")));
            }
            dst.push(Destination { target, ip: vec![IpSpec { protocols: protocols.clone(), ports }] });
        }
        Ok(Rule { pos: v.pos, src, dst, app: BTreeMap::new() })
    }

    fn grant(&self, v: &Value) -> Result<Rule, PolicyError> {
        let f = fields(v, "a grant", &["src", "dst", "ip", "app"], &["via", "srcPosture"])?;
        let src =
            self.targets(f.get("src").ok_or_else(|| invalid(v.pos, "a grant needs \"src\"".into()))?, "src", false)?;
        let targets =
            self.targets(f.get("dst").ok_or_else(|| invalid(v.pos, "a grant needs \"dst\"".into()))?, "dst", true)?;
        let ip = match f.get("ip") {
            None => Vec::new(),
            Some(ip) => {
                strings(ip, "ip")?.into_iter().map(|(pos, s)| self.ip_spec(pos, s)).collect::<Result<_, _>>()?
            }
        };
        let mut app = BTreeMap::new();
        if let Some(a) = f.get("app") {
            for (k, caps) in object(a, "app")? {
                if k.name.is_empty() || k.name.len() > 256 {
                    return Err(invalid(k.pos, "a capability name must have 1 to 256 characters".into()));
                }
                let values = array(caps, "a capability's value")?;
                for c in values {
                    object(c, "each value of a capability")?;
                }
                app.insert(k.name.clone(), values.iter().map(Value::to_json).collect());
            }
        }
        if ip.is_empty() && app.is_empty() {
            return Err(invalid(v.pos, "a grant needs \"ip\" or \"app\"".into()));
        }
        let dst = targets.into_iter().map(|target| Destination { target, ip: ip.clone() }).collect();
        Ok(Rule { pos: v.pos, src, dst, app })
    }

    fn test(&self, v: &Value) -> Result<Test, PolicyError> {
        let f = fields(v, "a test", &["src", "proto", "accept", "deny"], &["srcPostureAttrs"])?;
        let src_v = f.get("src").ok_or_else(|| invalid(v.pos, "a test needs \"src\"".into()))?;
        let src = self.alias(src_v.pos, string(src_v, "src")?, false)?;
        if !matches!(src.alias, Alias::User(_) | Alias::Tag(_) | Alias::Prefix(_)) {
            return Err(invalid(src_v.pos, "a test's src is one user, tag, host or address".into()));
        }
        if let Alias::Prefix(p) = src.alias {
            if p != Prefix::host(p.addr()) {
                return Err(invalid(src_v.pos, "a test's src is one address, not a prefix".into()));
            }
        }
        let protocol = match f.get("proto") {
            None => PROTO_TCP,
            Some(p) => {
                let s = string(p, "proto")?;
                parse_protocol(s).ok_or_else(|| invalid(p.pos, format!("unknown protocol {s:?}")))?[0]
            }
        };
        let dsts = |key: &str| -> Result<Vec<TestTarget>, PolicyError> {
            let Some(list) = f.get(key) else { return Ok(Vec::new()) };
            strings(list, key)?
                .into_iter()
                .map(|(pos, s)| {
                    let (target, ports) = self.target_ports(pos, s)?;
                    if !matches!(target.alias, Alias::User(_) | Alias::Tag(_) | Alias::Prefix(_)) {
                        return Err(invalid(pos, "a test's destination is one user, tag, host or address".into()));
                    }
                    match ports[..] {
                        [PortRange { first, last }] if first == last => Ok(TestTarget { target, port: first }),
                        _ => Err(invalid(pos, format!("{s:?}: a test names one port"))),
                    }
                })
                .collect()
        };
        let (accept, deny) = (dsts("accept")?, dsts("deny")?);
        if accept.is_empty() && deny.is_empty() {
            return Err(invalid(v.pos, "a test needs \"accept\" or \"deny\"".into()));
        }
        Ok(Test { pos: v.pos, src, protocol, accept, deny })
    }
}

/// Reads a policy from a parsed huJSON document.
pub fn from_value(doc: &Value) -> Result<Policy, PolicyError> {
    let top = object(doc, "the policy")?;
    const KNOWN: &[&str] = &["groups", "tagOwners", "hosts", "acls", "grants", "tests", "autoApprovers"];
    let mut sections = BTreeMap::new();
    for (k, v) in top {
        if UNSUPPORTED_SECTIONS.contains(&k.name.as_str()) {
            return Err(err(
                k.pos,
                ErrorKind::Unsupported,
                format!("section {:?} is not supported by wiremesh", k.name),
            ));
        }
        if !KNOWN.contains(&k.name.as_str()) {
            return Err(err(
                k.pos,
                ErrorKind::Unsupported,
                format!("unknown section {:?} (wiremesh reads {})", k.name, KNOWN.join(", ")),
            ));
        }
        sections.insert(k.name.as_str(), v);
    }
    let mut groups = BTreeMap::new();
    if let Some(g) = sections.get("groups") {
        for (k, members) in object(g, "groups")? {
            let Some(name) = k.name.strip_prefix("group:").filter(|n| valid_name(n)) else {
                return Err(invalid(k.pos, format!("group name {:?} must be group:<name>", k.name)));
            };
            let mut logins = Vec::new();
            for (pos, m) in strings(members, &format!("group:{name}"))? {
                if m.starts_with("group:") {
                    return Err(invalid(pos, format!("{m:?}: groups cannot contain groups")));
                }
                logins.push(
                    user_login(m)
                        .ok_or_else(|| invalid(pos, format!("{m:?}: a group holds user logins (user@domain)")))?,
                );
            }
            groups.insert(k.name.clone(), logins);
        }
    }
    let mut tag_names = Vec::new();
    if let Some(t) = sections.get("tagOwners") {
        for (k, _) in object(t, "tagOwners")? {
            if !k.name.strip_prefix("tag:").is_some_and(valid_name) {
                return Err(invalid(k.pos, format!("tag name {:?} must be tag:<name>", k.name)));
            }
            if tag_names.contains(&k.name) {
                return Err(invalid(k.pos, format!("{:?} given twice", k.name)));
            }
            tag_names.push(k.name.clone());
        }
    }
    let mut hosts = BTreeMap::new();
    if let Some(h) = sections.get("hosts") {
        for (k, v) in object(h, "hosts")? {
            if !valid_name(&k.name) || k.name.contains('@') || parse_prefix(&k.name).is_some() {
                return Err(invalid(k.pos, format!("host name {:?} must be letters, digits, '-', '_' or '.'", k.name)));
            }
            let s = string(v, "a host")?;
            let p = parse_prefix(s)
                .ok_or_else(|| invalid(v.pos, format!("host {:?}: {s:?} is no address or prefix", k.name)))?;
            hosts.insert(k.name.clone(), p);
        }
    }
    let r = Reader { groups, tag_names, hosts };
    let mut tag_owners = BTreeMap::new();
    if let Some(t) = sections.get("tagOwners") {
        for (k, owners) in object(t, "tagOwners")? {
            let mut list = Vec::new();
            for (pos, o) in strings(owners, &k.name)? {
                let t = r.alias(pos, o, false)?;
                if !matches!(t.alias, Alias::User(_) | Alias::Group(_) | Alias::Tag(_)) {
                    return Err(invalid(pos, format!("{o:?}: tag owners are users, groups or tags")));
                }
                list.push(t);
            }
            tag_owners.insert(k.name.clone(), list);
        }
    }
    let mut rules = Vec::new();
    if let Some(a) = sections.get("acls") {
        for v in array(a, "acls")? {
            rules.push(r.acl(v)?);
        }
    }
    if let Some(g) = sections.get("grants") {
        for v in array(g, "grants")? {
            rules.push(r.grant(v)?);
        }
    }
    for rule in &rules {
        check_self_sources(rule)?;
    }
    let mut tests = Vec::new();
    if let Some(t) = sections.get("tests") {
        for v in array(t, "tests")? {
            tests.push(r.test(v)?);
        }
    }
    let auto_approvers = match sections.get("autoApprovers") {
        Some(a) => r.auto_approvers(a)?,
        None => AutoApprovers::default(),
    };
    Ok(Policy { groups: r.groups, tag_owners, hosts: r.hosts, rules, tests, auto_approvers })
}
