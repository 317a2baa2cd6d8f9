//! The tailnet policy's costs.
//!
//! * `filter/*`: one inbound packet through the core's firewall
//!   ([`wiremesh_core::filter::Firewall::inbound`]) with 10, 100 and 1,000
//!   rules, each rule naming three sources, the node's two addresses, TCP,
//!   UDP and ICMP and two port ranges (what an ACL line compiles to). Each
//!   iteration evaluates 256 packets, so the time per element is the time
//!   per packet: `accept_last` is accepted by the last rule (every rule
//!   before it read), `deny` by none (every rule read), `reply` answers a
//!   flow the node opened (one flow-table lookup, no rule read).
//! * `compile/500_rules_10000_nodes`: the control server compiling a policy
//!   of 500 rules for 10,000 nodes (1,000 users with 8 nodes each, 2,000
//!   tagged nodes); the map size per node is printed once.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant as StdInstant};
use wiremesh_core::filter::{
    Filter, Firewall, PortRange, Prefix, Rule, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use wiremesh_core::Instant;
use wiremesh_daemon::policy::{self, Node};

const PACKETS: usize = 256;
const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[3] = 40;
    p[8] = 64;
    p[9] = PROTO_TCP;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p
}

fn source(rule: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x6440_0000u32 + 16 + (rule * 3 + k) as u32)
}

fn rules(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| Rule {
            sources: (0..3).map(|k| Prefix::host(source(i, k).into())).collect(),
            destinations: vec![Prefix::host(ME.into()), Prefix::host("fd7a:115c:a1e0::1".parse().unwrap())],
            protocols: vec![PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6],
            ports: vec![PortRange::single(22), PortRange { first: 8000, last: 8100 }],
        })
        .collect()
}

fn filter(c: &mut Criterion) {
    let mut g = c.benchmark_group("filter");
    g.throughput(Throughput::Elements(PACKETS as u64));
    for n in [10, 100, 1000] {
        let mut fw = Firewall::new(Filter::new(rules(n)), 1);
        let last = source(n - 1, 2);
        let accept: Vec<Vec<u8>> = (0..PACKETS).map(|i| tcp(last, ME, 40000 + i as u16, 22)).collect();
        let deny: Vec<Vec<u8>> =
            (0..PACKETS).map(|i| tcp(Ipv4Addr::new(100, 100, 1, 1), ME, 40000 + i as u16, 22)).collect();
        let now = Instant::ZERO;
        let remote = Ipv4Addr::new(100, 100, 2, 2);
        for i in 0..PACKETS {
            fw.outbound(&tcp(ME, remote, 50000 + i as u16, 443), now);
        }
        let reply: Vec<Vec<u8>> = (0..PACKETS).map(|i| tcp(remote, ME, 443, 50000 + i as u16)).collect();
        for (name, packets, want) in [("accept_last", &accept, true), ("deny", &deny, false), ("reply", &reply, true)] {
            assert!(packets.iter().all(|p| fw.inbound(p, now).is_some() == want));
            g.bench_with_input(BenchmarkId::new(name, n), packets, |b, packets| {
                b.iter(|| {
                    let mut passed = 0;
                    for p in packets {
                        passed += usize::from(fw.inbound(black_box(p), now).is_some());
                    }
                    passed
                })
            });
        }
    }
    g.finish();
}

/// 1,000 users with 8 nodes each, 2,000 nodes tagged with one of 20 tags.
fn tailnet() -> (String, Vec<Node>) {
    let mut nodes = Vec::new();
    for i in 0..10_000u32 {
        let v4 = Ipv4Addr::from(0x6440_0000u32 + 1 + i);
        let v6: IpAddr = format!("fd7a:115c:a1e0::{:x}", i + 1).parse().unwrap();
        let (tags, user) = if i < 8000 {
            (vec![], Some(format!("u{}@example.com", i / 8)))
        } else {
            (vec![format!("tag:t{}", i % 20)], None)
        };
        nodes.push(Node { id: i64::from(i), addresses: vec![v4.into(), v6], tags, user, tagged_by: None });
    }
    let mut text = String::from("{\n\"groups\": {\n");
    for g in 0..50 {
        let members: Vec<String> = (0..20).map(|k| format!("\"u{}@example.com\"", g * 20 + k)).collect();
        let _ = writeln!(text, "  \"group:g{g}\": [{}],", members.join(", "));
    }
    text.push_str("},\n\"tagOwners\": {\n");
    for t in 0..20 {
        let _ = writeln!(text, "  \"tag:t{t}\": [\"group:g{}\"],", t % 50);
    }
    text.push_str("},\n\"acls\": [\n");
    for r in 0..400 {
        let line = match r % 4 {
            0 => format!(r#"{{"action": "accept", "src": ["group:g{}"], "dst": ["tag:t{}:22,443"]}}"#, r % 50, r % 20),
            1 => format!(
                r#"{{"action": "accept", "src": ["u{}@example.com"], "dst": ["u{}@example.com:8000-8100"]}}"#,
                r % 1000,
                (r * 7) % 1000
            ),
            2 => format!(
                r#"{{"action": "accept", "src": ["tag:t{}"], "dst": ["tag:t{}:5432"], "proto": "tcp"}}"#,
                r % 20,
                (r + 1) % 20
            ),
            _ => {
                format!(r#"{{"action": "accept", "src": ["group:g{}"], "dst": ["group:g{}:*"]}}"#, r % 50, (r + 3) % 50)
            }
        };
        let _ = writeln!(text, "  {line},");
    }
    text.push_str("],\n\"grants\": [\n");
    for r in 0..100 {
        let _ = writeln!(
            text,
            r#"  {{"src": ["group:g{}"], "dst": ["tag:t{}"], "ip": ["tcp:443", "udp:53"], "app": {{"example.com/cap/r{r}": [{{"role": "reader"}}]}}}},"#,
            r % 50,
            r % 20
        );
    }
    // huJSON: the trailing commas stay.
    text.push_str("],\n}\n");
    (text, nodes)
}

/// This thread's CPU time (user and system), which a busy machine inflates
/// less than the wall clock; `None` where /proc does not say.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // The kernel reports clock ticks, USER_HZ = 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

fn compile(c: &mut Criterion) {
    let (text, nodes) = tailnet();
    let p = policy::check(&text).expect("the generated policy is valid");
    assert_eq!(p.rules.len(), 500);
    let (t0, cpu0) = (StdInstant::now(), thread_cpu());
    let out = policy::compile(&p, &nodes);
    let (once, cpu) = (t0.elapsed(), thread_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a)));
    let filter_bytes: usize =
        out.iter().map(|n| serde_json::to_string(&policy::wire::filter_to_wire(&n.filter)).unwrap().len()).sum();
    let caps_bytes: usize =
        out.iter().map(|n| serde_json::to_string(&policy::wire::caps_to_wire(&n.capabilities)).unwrap().len()).sum();
    let peers: usize = out.iter().map(|n| n.peers.len()).sum();
    let rules: usize = out.iter().map(|n| n.filter.len()).sum();
    let n = nodes.len();
    eprintln!(
        "compile 500 rules x {n} nodes: {once:?} once ({cpu:?} of this thread's CPU time); per node on average {} filter rules, {} bytes of filter JSON, {} bytes of capabilities JSON, {} visible peers",
        rules / n,
        filter_bytes / n,
        caps_bytes / n,
        peers / n
    );
    let mut g = c.benchmark_group("compile");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("500_rules_10000_nodes", |b| b.iter(|| policy::compile(black_box(&p), black_box(&nodes))));
    g.finish();
}

criterion_group!(benches, filter, compile);
criterion_main!(benches);
