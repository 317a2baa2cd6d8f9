//! Policy files as people write them for Tailscale, through the parser, the
//! checks, the compiler, the tests evaluator and the core packet filter.

use super::*;
use std::net::IpAddr;
use wiremesh_core::filter::{Filter, Prefix, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

/// The conformance tailnet: (name, user, tags, tagged_by); node `i` has
/// 100.64.0.(i+1) and fd7a:115c:a1e0::(i+1).
type NodeRow = (&'static str, Option<&'static str>, &'static [&'static str], Option<&'static str>);

const NODES: &[NodeRow] = &[
    ("alice1", Some("alice@example.com"), &[], None),
    ("alice2", Some("alice@example.com"), &[], None),
    ("bob1", Some("bob@example.com"), &[], None),
    ("carol1", Some("carol@example.com"), &[], None),
    ("server", None, &["tag:server"], None),
    ("db", None, &["tag:db"], None),
    ("web", None, &["tag:web"], None),
    // Applied with bob's key, and bob may not apply tag:ci.
    ("ci", None, &["tag:ci"], Some("bob@example.com")),
    ("admin1", Some("admin"), &[], None),
];

fn nodes() -> Vec<Node> {
    NODES
        .iter()
        .enumerate()
        .map(|(i, (_, user, tags, by))| Node {
            id: i as i64 + 100,
            addresses: vec![
                IpAddr::from([100, 64, 0, i as u8 + 1]),
                format!("fd7a:115c:a1e0::{}", i + 1).parse().unwrap(),
            ],
            tags: tags.iter().map(|t| t.to_string()).collect(),
            user: user.map(str::to_string),
            tagged_by: by.map(str::to_string),
        })
        .collect()
}

fn index(name: &str) -> usize {
    NODES.iter().position(|n| n.0 == name).unwrap_or_else(|| panic!("no node {name}"))
}

/// A policy in the style of Tailscale's documentation (every policy below
/// ends its top-level object with a trailing comma, so tests can be appended).
const P1: &str = r#"// The example tailnet.
{
  "groups": {
    "group:eng": ["alice@example.com", "Bob@Example.com"],
  },
  /* Who may apply which tag. */
  "tagOwners": {
    "tag:server": ["group:eng"],
    "tag:db": ["alice@example.com"],
    "tag:web": ["tag:server"],
    "tag:ci": ["alice@example.com"],
  },
  "hosts": {
    "websrv": "100.64.0.7",
    "lab": "100.64.0.0/30",
  },
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:server:22,443"]},
    {"action": "accept", "src": ["alice@example.com"], "dst": ["tag:db:5432"], "proto": "tcp"},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["tag:server"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["*"], "dst": ["websrv:80"]},
    {"action": "accept", "src": ["bob@example.com"], "dst": ["tag:server:53"], "proto": "udp"},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:server:*"], "proto": "icmp"},
    {"action": "accept", "src": ["lab"], "dst": ["carol@example.com:3000-3010"]},
  ],
  "grants": [
    {"src": ["tag:ci"], "dst": ["tag:server"], "ip": ["*"]},
    {
      "src": ["carol@example.com"],
      "dst": ["tag:db"],
      "ip": ["tcp:8000-8100"],
      "app": {"example.com/cap/db": [{"role": "reader"}]},
    },
    {"src": ["bob@example.com"], "dst": ["tag:db"], "app": {"example.com/cap/db": [{"role": "admin"}]}},
    {"src": ["carol@example.com"], "dst": ["tag:web"], "app": {"example.com/cap/web": [{"all": true}]}},
    {"src": ["admin@"], "dst": ["tag:server"], "ip": ["6:2222", "17:9000-9001"]},
  ],
}"#;

const P_EMPTY: &str = r#"{"acls": [], "grants": [],}"#;
const P_ALL: &str = r#"{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}],}"#;
const P_TAGGED: &str = r#"{
  "tagOwners": {"tag:server": []},
  "acls": [{"action": "accept", "src": ["autogroup:tagged"], "dst": ["autogroup:member:22"]}],
}"#;

struct Case {
    policy: &'static str,
    src: &'static str,
    /// How a `tests` entry names the source (`None`: not expressible there).
    src_alias: Option<&'static str>,
    dst: &'static str,
    dst_alias: &'static str,
    port: u16,
    proto: u8,
    accept: bool,
}

#[allow(clippy::too_many_arguments)] // one table row, read positionally
const fn case(
    policy: &'static str,
    src: &'static str,
    src_alias: Option<&'static str>,
    dst: &'static str,
    dst_alias: &'static str,
    port: u16,
    proto: u8,
    accept: bool,
) -> Case {
    Case { policy, src, src_alias, dst, dst_alias, port, proto, accept }
}

const ALICE: Option<&str> = Some("alice@example.com");
const BOB: Option<&str> = Some("bob@example.com");
const CAROL: Option<&str> = Some("carol@example.com");
const SERVER: Option<&str> = Some("tag:server");
const DB: Option<&str> = Some("tag:db");
const ADMIN: Option<&str> = Some("admin@");

/// The conformance table, written from the semantics Tailscale's policy
/// documentation describes (ACLs and grants only allow, their union is what
/// a node accepts; no `proto` means TCP, UDP and ICMP; ICMP has no ports;
/// `autogroup:self` is the source user's own untagged devices; tagged nodes
/// are not members; tags count only as `tagOwners` allows; a capability is
/// no network path). None is taken from headscale's recorded results: the
/// search tool that reads them was not available to this work.
const TABLE: &[Case] = &[
    case(P1, "alice1", ALICE, "server", "tag:server", 22, PROTO_TCP, true),
    case(P1, "alice1", ALICE, "server", "tag:server", 443, PROTO_TCP, true),
    case(P1, "alice1", ALICE, "server", "tag:server", 80, PROTO_TCP, false),
    case(P1, "bob1", BOB, "server", "tag:server", 22, PROTO_TCP, true),
    case(P1, "carol1", CAROL, "server", "tag:server", 22, PROTO_TCP, false),
    case(P1, "alice1", ALICE, "server", "tag:server", 22, PROTO_UDP, true),
    case(P1, "alice1", ALICE, "db", "tag:db", 5432, PROTO_TCP, true),
    case(P1, "alice1", ALICE, "db", "tag:db", 5432, PROTO_UDP, false),
    case(P1, "bob1", BOB, "db", "tag:db", 5432, PROTO_TCP, false),
    case(P1, "server", SERVER, "db", "tag:db", 5432, PROTO_TCP, true),
    case(P1, "db", DB, "server", "tag:server", 22, PROTO_TCP, false),
    case(P1, "alice1", ALICE, "alice2", "alice@example.com", 22, PROTO_TCP, true),
    case(P1, "alice1", ALICE, "alice2", "alice@example.com", 9999, PROTO_UDP, true),
    case(P1, "alice1", ALICE, "bob1", "bob@example.com", 22, PROTO_TCP, false),
    case(P1, "bob1", BOB, "alice1", "alice@example.com", 22, PROTO_TCP, false),
    case(P1, "server", SERVER, "alice1", "alice@example.com", 22, PROTO_TCP, false),
    case(P1, "carol1", CAROL, "web", "websrv", 80, PROTO_TCP, true),
    case(P1, "server", SERVER, "web", "websrv", 80, PROTO_TCP, true),
    case(P1, "carol1", CAROL, "web", "websrv", 443, PROTO_TCP, false),
    case(P1, "bob1", BOB, "server", "tag:server", 53, PROTO_UDP, true),
    case(P1, "bob1", BOB, "server", "tag:server", 53, PROTO_TCP, false),
    case(P1, "alice1", ALICE, "server", "tag:server", 53, PROTO_UDP, false),
    case(P1, "carol1", CAROL, "server", "tag:server", 0, PROTO_ICMP, true),
    // No proto: ICMP is among the protocols, and ICMP has no ports.
    case(P1, "server", SERVER, "db", "tag:db", 0, PROTO_ICMP, true),
    case(P1, "web", Some("tag:web"), "server", "tag:server", 0, PROTO_ICMP, false),
    case(P1, "alice1", Some("100.64.0.1"), "carol1", "carol@example.com", 3005, PROTO_TCP, true),
    case(P1, "bob1", Some("100.64.0.3"), "carol1", "carol@example.com", 3000, PROTO_TCP, true),
    case(P1, "alice1", Some("100.64.0.1"), "carol1", "carol@example.com", 3011, PROTO_TCP, false),
    case(P1, "server", Some("100.64.0.5"), "carol1", "carol@example.com", 3005, PROTO_TCP, false),
    // tag:ci was applied by a user tagOwners does not name: it counts for nothing.
    case(P1, "ci", None, "server", "tag:server", 22, PROTO_TCP, false),
    case(P1, "carol1", CAROL, "db", "tag:db", 8050, PROTO_TCP, true),
    case(P1, "carol1", CAROL, "db", "tag:db", 8050, PROTO_UDP, false),
    case(P1, "carol1", CAROL, "db", "tag:db", 8101, PROTO_TCP, false),
    case(P1, "admin1", ADMIN, "server", "tag:server", 2222, PROTO_TCP, true),
    case(P1, "admin1", ADMIN, "server", "tag:server", 9001, PROTO_UDP, true),
    case(P1, "admin1", ADMIN, "server", "tag:server", 9002, PROTO_UDP, false),
    case(P1, "admin1", ADMIN, "server", "tag:server", 2222, PROTO_UDP, false),
    case(P1, "admin1", ADMIN, "alice1", "alice@example.com", 22, PROTO_TCP, false),
    case(P1, "db", DB, "web", "websrv", 80, PROTO_TCP, true),
    case(P1, "alice2", ALICE, "server", "tag:server", 443, PROTO_TCP, true),
    case(P_EMPTY, "alice1", ALICE, "alice2", "alice@example.com", 22, PROTO_TCP, false),
    case(P_EMPTY, "carol1", CAROL, "web", "100.64.0.7", 80, PROTO_TCP, false),
    case(P_ALL, "server", Some("100.64.0.5"), "alice1", "alice@example.com", 5, PROTO_TCP, true),
    case(P_ALL, "carol1", CAROL, "db", "100.64.0.6", 1, PROTO_SCTP, true),
    case(P_TAGGED, "server", SERVER, "alice1", "alice@example.com", 22, PROTO_TCP, true),
    case(P_TAGGED, "alice1", ALICE, "server", "tag:server", 22, PROTO_TCP, false),
    // A tag tagOwners does not define still makes the node tagged, not a member.
    case(P_TAGGED, "db", None, "bob1", "bob@example.com", 22, PROTO_TCP, true),
    case(P_TAGGED, "alice1", ALICE, "bob1", "bob@example.com", 22, PROTO_TCP, false),
    case(P_TAGGED, "server", SERVER, "alice1", "alice@example.com", 80, PROTO_TCP, false),
];

#[test]
fn the_conformance_table_through_the_compiler_and_the_core_filter() {
    assert!(TABLE.len() >= 40);
    let nodes = nodes();
    for (i, c) in TABLE.iter().enumerate() {
        let policy = check(c.policy).unwrap_or_else(|e| panic!("case {i}: {e}"));
        let compiled = compile(&policy, &nodes);
        let (s, d) = (index(c.src), index(c.dst));
        let filter = Filter::new(compiled[d].filter.clone());
        // Rules naming IPv4 hosts and prefixes say nothing of IPv6.
        let families =
            if c.dst_alias == "websrv" || c.src_alias.is_some_and(|a| a.starts_with("100.")) { 1 } else { 2 };
        for family in 0..families {
            let (src, dst) = (nodes[s].addresses[family], nodes[d].addresses[family]);
            let proto = if c.proto == PROTO_ICMP && family == 1 { PROTO_ICMPV6 } else { c.proto };
            assert_eq!(
                filter.accepts(src, dst, proto, c.port),
                c.accept,
                "case {i}: {} -> {}:{} proto {proto}",
                c.src,
                c.dst,
                c.port
            );
        }
        // Allowed means both see each other.
        if c.accept {
            assert!(compiled[d].peers.contains(&nodes[s].id), "case {i}: {} sees {}", c.dst, c.src);
            assert!(compiled[s].peers.contains(&nodes[d].id), "case {i}: {} sees {}", c.src, c.dst);
        }
    }
}

fn with_tests(policy: &str, tests: &str) -> String {
    let body = policy.trim_end().strip_suffix('}').expect("policy ends with }");
    format!("{body}\n  \"tests\": [{tests}],\n}}")
}

#[test]
fn the_conformance_table_through_the_tests_evaluator() {
    let mut ran = 0;
    for (i, c) in TABLE.iter().enumerate() {
        let Some(src) = c.src_alias else { continue };
        let proto = match c.proto {
            PROTO_TCP => "tcp".to_string(),
            PROTO_UDP => "udp".to_string(),
            PROTO_ICMP => "icmp".to_string(),
            n => n.to_string(),
        };
        let entry =
            |key: &str| format!(r#"{{"src": "{src}", "proto": "{proto}", "{key}": ["{}:{}"]}}"#, c.dst_alias, c.port);
        let (right, wrong) = if c.accept { (entry("accept"), entry("deny")) } else { (entry("deny"), entry("accept")) };
        check(&with_tests(c.policy, &right)).unwrap_or_else(|e| panic!("case {i}: {e}"));
        let e = check(&with_tests(c.policy, &wrong)).expect_err(&format!("case {i} flipped must fail"));
        assert_eq!(e.kind, ErrorKind::TestFailed, "case {i}: {e}");
        ran += 1;
    }
    assert!(ran >= 40, "{ran}");
}

#[test]
fn a_failing_test_is_refused_at_its_line() {
    let text = with_tests(
        P1,
        r#"
    {"src": "alice@example.com", "accept": ["tag:server:22"]},
    {"src": "carol@example.com", "accept": ["tag:server:22"], "deny": ["tag:db:5432"]},"#,
    );
    let e = check(&text).unwrap_err();
    let line = text.lines().position(|l| l.contains("carol@example.com\", \"accept")).unwrap() as u32 + 1;
    assert_eq!(e.kind, ErrorKind::TestFailed);
    assert_eq!(e.pos.unwrap().line, line, "{e}");
    assert!(e.message.contains(&format!("test at line {line} failed")), "{e}");
    assert!(e.message.contains("carol@example.com -> tag:server:22"), "{e}");
    // parse() alone does not run tests.
    assert!(parse(&text).is_ok());
}

#[test]
fn capabilities_go_only_where_a_network_path_exists() {
    let nodes = nodes();
    let compiled = compile(&check(P1).unwrap(), &nodes);
    let db = &compiled[index("db")];
    let carol = Prefix::host(nodes[index("carol1")].addresses[0]);
    let bob = Prefix::host(nodes[index("bob1")].addresses[0]);
    let caps: Vec<_> = db.capabilities.iter().filter(|c| c.name == "example.com/cap/db").collect();
    assert_eq!(caps.len(), 1, "bob's grant has no network path to db: {caps:?}");
    assert!(caps[0].sources.contains(&carol) && !caps[0].sources.contains(&bob));
    assert_eq!(caps[0].values, vec![serde_json::json!({"role": "reader"})]);
    // carol reaches web through "*" -> websrv:80, so her capability there holds.
    let web = &compiled[index("web")];
    assert!(web.capabilities.iter().any(|c| c.name == "example.com/cap/web" && c.sources.contains(&carol)));
    // An app-only grant makes no peer visible.
    assert!(!compiled[index("bob1")].peers.contains(&nodes[index("db")].id));
}

#[test]
fn peers_are_visible_only_where_traffic_is_allowed() {
    let nodes = nodes();
    let compiled = compile(&check(P1).unwrap(), &nodes);
    let ids = |names: &[&str]| -> Vec<i64> {
        let mut v: Vec<i64> = names.iter().map(|n| nodes[index(n)].id).collect();
        v.sort();
        v
    };
    // carol1: web (everyone -> websrv), server (icmp), db (grant), lab members to her.
    assert_eq!(compiled[index("carol1")].peers, ids(&["alice1", "alice2", "bob1", "server", "db", "web"]));
    // ci's tag does not count: only "*" -> websrv makes it see web.
    assert_eq!(compiled[index("ci")].peers, ids(&["web"]));
    let empty = compile(&check(P_EMPTY).unwrap(), &nodes);
    assert!(empty.iter().all(|p| p.peers.is_empty() && p.filter.is_empty()));
    let all = compile(&check(P_ALL).unwrap(), &nodes);
    assert!(all.iter().all(|p| p.peers.len() == nodes.len() - 1));
    assert_eq!(all[0].filter[0].sources, vec![Prefix::ANY_V4, Prefix::ANY_V6]);
}

#[test]
fn the_tailnet_ranges_are_cgnat_without_100_115_92_0_23_and_the_ula() {
    let ula = model::parse_prefix("fd7a:115c:a1e0::/48").unwrap();
    let ranges = compile::Network::tailnet_ranges(ula);
    assert_eq!(ranges.last(), Some(&ula));
    let v4: Vec<Prefix> = ranges.iter().copied().filter(|p| !p.addr().is_ipv6()).collect();
    // Disjoint, inside 100.64.0.0/10, and all of it but the /23.
    let cgnat = model::parse_prefix("100.64.0.0/10").unwrap();
    let hole = model::parse_prefix("100.115.92.0/23").unwrap();
    let size: u64 = v4.iter().map(|p| 1u64 << (32 - p.len())).sum();
    assert_eq!(size, (1 << 22) - (1 << 9), "{v4:?}");
    for (i, p) in v4.iter().enumerate() {
        assert!(cgnat.covers(p) && !p.covers(&hole) && !hole.covers(p), "{p}");
        assert!(v4[i + 1..].iter().all(|q| !q.covers(p) && !p.covers(q)), "{p}");
    }
    let inside = |a: &str| ranges.iter().any(|p| p.contains(a.parse().unwrap()));
    for a in ["100.64.0.0", "100.115.91.255", "100.115.94.0", "100.127.255.255", "fd7a:115c:a1e0:ffff::1"] {
        assert!(inside(a), "{a}");
    }
    for a in ["100.63.255.255", "100.115.92.0", "100.115.93.255", "100.128.0.0", "fd7a:115c:a1e1::", "10.0.0.1"] {
        assert!(!inside(a), "{a}");
    }
}

/// A source `*` is the tailnet's ranges plus the approved subnet routes
/// (not exit routes) when the compiler knows them; a node outside the ranges
/// still counts by its own address; routers get rules for their routes.
#[test]
fn source_any_is_the_tailnet_and_its_subnet_routes() {
    let mut nodes = nodes();
    // A node whose address is in the block `*` leaves out still counts.
    nodes[index("carol1")].addresses[0] = "100.115.92.9".parse().unwrap();
    let p = |s: &str| model::parse_prefix(s).unwrap();
    let network = compile::Network {
        ranges: compile::Network::tailnet_ranges(p("fd7a:115c:a1e0::/48")),
        routes: [
            (nodes[index("server")].id, vec![p("10.1.0.0/24")]),
            (nodes[index("db")].id, vec![Prefix::ANY_V4, Prefix::ANY_V6]),
        ]
        .into_iter()
        .collect(),
    };
    let policy = check(
        r#"{"tagOwners": {"tag:web": [], "tag:server": [], "tag:db": []},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:web:80", "10.1.0.0/16:22"]}]}"#,
    )
    .unwrap();
    let compiled = compile::compile_in(&policy, &nodes, &network);
    let web = Filter::new(compiled[index("web")].filter.clone());
    let to = nodes[index("web")].addresses[0];
    let to6 = nodes[index("web")].addresses[1];
    for (src, want) in [
        ("100.64.0.1", true),
        ("100.127.1.1", true),
        ("10.1.0.5", true),
        ("100.115.92.9", true),
        ("100.115.92.8", false),
        ("10.1.1.5", false),
        ("8.8.8.8", false),
        ("100.128.0.1", false),
    ] {
        assert_eq!(web.accepts(src.parse().unwrap(), to, PROTO_TCP, 80), want, "{src}");
    }
    assert!(web.accepts("fd7a:115c:a1e0::99".parse().unwrap(), to6, PROTO_TCP, 80));
    assert!(!web.accepts("fd7a:115c:a1e1::99".parse().unwrap(), to6, PROTO_TCP, 80));
    // The router of 10.1.0.0/24 takes the rule to 10.1.0.0/16, narrowed to its route,
    // and sees every source node; the exit node gets nothing from it.
    let router = &compiled[index("server")];
    let rf = Filter::new(router.filter.clone());
    assert!(rf.accepts("100.64.0.1".parse().unwrap(), "10.1.0.7".parse().unwrap(), PROTO_TCP, 22));
    assert!(!rf.accepts("100.64.0.1".parse().unwrap(), "10.1.1.7".parse().unwrap(), PROTO_TCP, 22));
    assert!(!rf.accepts("8.8.8.8".parse().unwrap(), "10.1.0.7".parse().unwrap(), PROTO_TCP, 22));
    assert!(router.peers.contains(&nodes[index("alice1")].id));
    assert!(compiled[index("db")].filter.is_empty());
    // Without the network (a policy's tests), `*` is every address.
    let plain = compile(&policy, &nodes);
    let web = Filter::new(plain[index("web")].filter.clone());
    assert!(web.accepts("8.8.8.8".parse().unwrap(), to, PROTO_TCP, 80));
}

#[test]
fn tag_owners_decide_which_tags_count() {
    let text = r#"{
      "groups": {"group:ops": ["dave@example.com"]},
      "tagOwners": {"tag:a": ["group:ops"], "tag:b": ["tag:a"], "tag:c": ["erin@example.com"]},
      "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:a:1", "tag:b:2", "tag:c:3"]}],
    }"#;
    let policy = check(text).unwrap();
    let node = |tags: &[&str], by: &str| Node {
        id: 1,
        addresses: vec![IpAddr::from([100, 64, 1, 1])],
        tags: tags.iter().map(|t| t.to_string()).collect(),
        user: None,
        tagged_by: Some(by.into()),
    };
    let peer =
        Node { id: 2, addresses: vec![IpAddr::from([100, 64, 1, 2])], tags: vec![], user: None, tagged_by: None };
    let ports = |n: Node| -> Vec<u16> {
        let c = compile(&policy, &[n, peer.clone()]);
        let f = Filter::new(c[0].filter.clone());
        (1..=3).filter(|p| f.accepts(peer.addresses[0], IpAddr::from([100, 64, 1, 1]), PROTO_TCP, *p)).collect()
    };
    assert_eq!(ports(node(&["tag:a", "tag:b", "tag:c"], "dave@example.com")), vec![1, 2]);
    assert_eq!(ports(node(&["tag:a", "tag:c"], "erin@example.com")), vec![3]);
    assert_eq!(ports(node(&["tag:a"], "mallory@example.com")), Vec::<u16>::new());
}

#[test]
fn autogroup_self_is_per_user_and_excludes_tagged_nodes() {
    let text = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["autogroup:self:22"]}],}"#;
    let nodes = nodes();
    let compiled = compile(&check(text).unwrap(), &nodes);
    let f = |n: &str| Filter::new(compiled[index(n)].filter.clone());
    let a = |n: &str| nodes[index(n)].addresses[0];
    assert!(f("alice2").accepts(a("alice1"), a("alice2"), PROTO_TCP, 22));
    assert!(!f("alice2").accepts(a("bob1"), a("alice2"), PROTO_TCP, 22));
    assert!(!f("alice2").accepts(a("server"), a("alice2"), PROTO_TCP, 22));
    assert!(f("server").rules().is_empty());
    // A user's only device is reached from itself alone (Tailscale's
    // recorded filters include the destination among the sources).
    assert!(f("bob1").accepts(a("bob1"), a("bob1"), PROTO_TCP, 22));
    assert!(!f("bob1").accepts(a("alice1"), a("bob1"), PROTO_TCP, 22));
}

#[test]
fn every_section_and_form_is_read() {
    let text = r#"{
      "groups": {"group:a": ["x@y.z", "plain@"]},
      "tagOwners": {"tag:t": ["group:a", "x@y.z"], "tag:u": ["tag:t"]},
      "hosts": {"h4": "10.0.0.1", "n4": "10.1.0.0/16", "h6": "fd00::1", "n6": "fd00:1::/64"},
      "acls": [
        {"action": "accept", "src": ["group:a", "tag:t", "h4", "n6", "192.0.2.0/24", "autogroup:member", "autogroup:tagged"],
         "dst": ["*:*", "h6:1,2,3", "fd00::2:80", "n4:1000-2000,3000", "autogroup:internet:*", "plain@:22"], "proto": "tcp"},
        {"action": "accept", "src": ["*"], "dst": ["tag:u:*"], "proto": "47"},
        {"action": "accept", "src": ["*"], "dst": ["tag:u:*"], "proto": "ipv6-icmp"},
      ],
      "grants": [{"src": ["*"], "dst": ["tag:t"], "ip": ["*", "443", "tcp:443", "udp:53", "tcp:8000-8100", "icmp:*", "132:7", "50:*"],
                  "app": {"example.com/cap/x": [{"a": [1, 2]}, {}]}}],
      "tests": [{"src": "10.9.9.9", "accept": ["tag:t:443"], "deny": ["tag:u:22"]}],
    }"#;
    let p = check(text).unwrap();
    assert_eq!(p.groups["group:a"], vec!["x@y.z".to_string(), "plain".to_string()]);
    assert_eq!(p.hosts["n6"], model::parse_prefix("fd00:1::/64").unwrap());
    assert_eq!(p.rules.len(), 4);
    assert_eq!(p.rules[0].dst.len(), 6);
    assert_eq!(p.rules[0].dst[3].ip[0].ports.len(), 2);
    assert_eq!(p.rules[1].dst[0].ip[0].protocols, vec![47]);
    assert_eq!(p.rules[3].dst[0].ip.len(), 8);
    assert_eq!(p.rules[3].app["example.com/cap/x"].len(), 2);
    assert_eq!(p.tests.len(), 1);
}

#[test]
fn everything_wrong_is_refused_by_name_and_place() {
    // Each error is expected where `token` first appears.
    let cases: &[(&str, ErrorKind, &str, &str)] = &[
        ("{\n  \"ssh\": []}", ErrorKind::Unsupported, "\"ssh\"", "section \"ssh\" is not supported"),
        ("{\"nodeAttrs\": []}", ErrorKind::Unsupported, "\"nodeAttrs\"", "\"nodeAttrs\""),
        ("{\"ipsets\": {}}", ErrorKind::Unsupported, "\"ipsets\"", "\"ipsets\""),
        ("{\"aclz\": []}", ErrorKind::Unsupported, "\"aclz\"", "unknown section \"aclz\""),
        ("[]", ErrorKind::Invalid, "[", "must be an object"),
        ("{\"acls\": {}}", ErrorKind::Invalid, "{}", "must be an array"),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"users\": []}]}",
            ErrorKind::Unsupported,
            "\"users\"",
            "field \"users\" is not supported",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"color\": 1}]}",
            ErrorKind::Unsupported,
            "\"color\"",
            "unknown field \"color\"",
        ),
        (
            "{\"acls\": [{\"action\": \"drop\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}",
            ErrorKind::Invalid,
            "\"drop\"",
            "only ACL action",
        ),
        ("{\"acls\": [{\"src\": [\"*\"], \"dst\": [\"*:*\"]}]}", ErrorKind::Invalid, "{\"src\"", "needs \"action\""),
        (
            "{\"acls\": [{\"action\": \"accept\", \"dst\": [\"*:*\"]}]}",
            ErrorKind::Invalid,
            "{\"action\"",
            "needs \"src\"",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"]}]}",
            ErrorKind::Invalid,
            "{\"action\"",
            "needs \"dst\"",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"autogroup:admin\"], \"dst\": [\"*:*\"]}]}",
            ErrorKind::Unsupported,
            "\"autogroup:admin\"",
            "autogroup:admin is not supported",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"autogroup:self\"], \"dst\": [\"*:*\"]}]}",
            ErrorKind::Invalid,
            "\"autogroup:self\"",
            "only be a destination",
        ),
        (
            "{\"tagOwners\": {\"tag:ci\": []}, \"acls\": [{\"action\": \"accept\", \"src\": [\"alice@\", \"tag:ci\"], \"dst\": [\"autogroup:self:*\"]}]}",
            ErrorKind::Invalid,
            "\"tag:ci\"]",
            "a rule to autogroup:self takes only users",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"group:nope\"], \"dst\": [\"*:*\"]}]}",
            ErrorKind::Invalid,
            "\"group:nope\"",
            "group \"nope\" is not defined",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"tag:nope\"], \"dst\": [\"*:*\"]}]}",
            ErrorKind::Invalid,
            "\"tag:nope\"",
            "not defined in tagOwners",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"nohost\"], \"dst\": [\"*:*\"]}]}",
            ErrorKind::Invalid,
            "\"nohost\"",
            "is no user",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"ipset:x\"], \"dst\": [\"*:*\"]}]}",
            ErrorKind::Unsupported,
            "\"ipset:x\"",
            "ipsets are not supported",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"10.0.0.1/8\"], \"dst\": [\"*:*\"]}]}",
            ErrorKind::Invalid,
            "\"10.0.0.1/8\"",
            "is no user",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*\"]}]}",
            ErrorKind::Invalid,
            "\"*\"]}",
            "needs ports",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:70000\"]}]}",
            ErrorKind::Invalid,
            "\"*:70000\"",
            "bad ports",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:9-3\"]}]}",
            ErrorKind::Invalid,
            "\"*:9-3\"",
            "bad ports",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:22\"], \"proto\": \"icmp\"}]}",
            ErrorKind::Invalid,
            "\"*:22\"",
            "only tcp, udp and sctp have ports",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"proto\": \"quic\"}]}",
            ErrorKind::Invalid,
            "\"quic\"",
            "unknown protocol",
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"proto\": \"256\"}]}",
            ErrorKind::Invalid,
            "\"256\"",
            "unknown protocol",
        ),
        (
            "{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"]}]}",
            ErrorKind::Invalid,
            "{\"src\"",
            "needs \"ip\" or \"app\"",
        ),
        (
            "{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"ip\": [\"icmp:80\"]}]}",
            ErrorKind::Invalid,
            "\"icmp:80\"",
            "only tcp, udp and sctp",
        ),
        (
            "{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"ip\": [\"tcp:\"]}]}",
            ErrorKind::Invalid,
            "\"tcp:\"",
            "bad ports",
        ),
        (
            "{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"ip\": [\"*\"], \"via\": []}]}",
            ErrorKind::Unsupported,
            "\"via\"",
            "\"via\" is not supported",
        ),
        (
            "{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"app\": {\"x\": [1]}}]}",
            ErrorKind::Invalid,
            "1]",
            "must be an object",
        ),
        ("{\"groups\": {\"eng\": []}}", ErrorKind::Invalid, "\"eng\"", "must be group:<name>"),
        ("{\"groups\": {\"group:a\": [\"group:b\"]}}", ErrorKind::Invalid, "\"group:b\"", "cannot contain groups"),
        ("{\"groups\": {\"group:a\": [\"bob\"]}}", ErrorKind::Invalid, "\"bob\"", "holds user logins"),
        ("{\"tagOwners\": {\"server\": []}}", ErrorKind::Invalid, "\"server\"", "must be tag:<name>"),
        ("{\"tagOwners\": {\"tag:a\": [\"*\"]}}", ErrorKind::Invalid, "\"*\"", "tag owners are users"),
        ("{\"hosts\": {\"h\": \"nope\"}}", ErrorKind::Invalid, "\"nope\"", "is no address"),
        ("{\"hosts\": {\"10.0.0.1\": \"10.0.0.1\"}}", ErrorKind::Invalid, "\"10.0.0.1\"", "host name"),
        (
            "{\"tests\": [{\"src\": \"*\", \"accept\": [\"*:1\"]}]}",
            ErrorKind::Invalid,
            "\"*\"",
            "one user, tag, host or address",
        ),
        ("{\"tests\": [{\"src\": \"a@b\", \"accept\": [\"a@b:1-2\"]}]}", ErrorKind::Invalid, "\"a@b:1-2\"", "one port"),
        ("{\"tests\": [{\"src\": \"a@b\"}]}", ErrorKind::Invalid, "{\"src\"", "needs \"accept\" or \"deny\""),
        (
            "{\"tests\": [{\"src\": \"a@b\", \"accept\": [\"a@b:1\"], \"srcPostureAttrs\": {}}]}",
            ErrorKind::Unsupported,
            "\"srcPostureAttrs\"",
            "not supported",
        ),
        ("{\"acls\": [}", ErrorKind::Syntax, "}", "a value was expected"),
    ];
    for (text, kind, token, what) in cases {
        let e = check(text).expect_err(text);
        assert_eq!(e.kind, *kind, "{text}: {e}");
        let pos = e.pos.unwrap();
        let at = text.find(token).unwrap();
        let line = text[..at].matches('\n').count() as u32 + 1;
        let col = (at - text[..at].rfind('\n').map_or(0, |n| n + 1)) as u32 + 1;
        assert_eq!((pos.line, pos.col), (line, col), "{text}: {e}");
        assert!(e.message.contains(what), "{text}: {e}");
    }
    let big = format!("{{\"hosts\": {{}}, {}}}", " ".repeat(MAX_POLICY_BYTES));
    assert!(check(&big).unwrap_err().message.contains("larger than"));
}

#[test]
fn arbitrary_text_never_panics() {
    // A cheap deterministic sweep of mutations of a real policy (the fuzz
    // target explores further).
    let base = P1.as_bytes();
    let mut x: u64 = 0x1234_5678;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut b = base.to_vec();
        let at = (x as usize) % b.len();
        match x % 3 {
            0 => b[at] = (x >> 8) as u8,
            1 => b.truncate(at),
            _ => b.insert(at, b"{}[],:\"/*"[(x >> 16) as usize % 9]),
        }
        if let Ok(text) = std::str::from_utf8(&b) {
            if let Ok(p) = check(text) {
                let _ = compile(&p, &nodes());
            }
        }
    }
}
