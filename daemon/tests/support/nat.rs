//! What the NAT tests share: a node namespace behind a NAT router namespace
//! on the lab's bridge ([`natted`], [`Natted`]), the two kinds of NAT they
//! make ([`Nat`]), and readings of a node's paths and of a relay's counters.
//! Included by `tailnet_nat.rs` and `tailnet_nat_replicas.rs` (each test
//! crate declares `netns` and `tailnet`).
#![allow(dead_code)]

use crate::netns::{self, veth_pair, Netns, VethPair};
use crate::tailnet::*;
use std::time::Duration;

/// The endpoint WireGuard shows for a peer reached through the relay.
pub const RELAY_MARKER: &str = "127.3.3.40:0";

/// How a router namespace translates its node's outbound traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent mapping (masquerade keeps the source port),
    /// inbound `ct state new` dropped: a port-restricted cone.
    PortRestrictedCone,
    /// Address-and-port-dependent mapping (`masquerade random`: a random
    /// public port per destination), inbound `ct state new` dropped.
    RandomPorts,
}

impl Nat {
    fn masquerade(self) -> &'static str {
        match self {
            Nat::PortRestrictedCone => "masquerade",
            Nat::RandomPorts => "masquerade random",
        }
    }
}

/// A node namespace behind a NAT router namespace attached to the bridge.
pub struct Natted {
    pub router: Netns,
    pub uplink: VethPair,
    pub public_ip: String,
    pub private_ip: String,
    pub node: Node,
}

impl Natted {
    /// Replaces the router's NAT rule by `nat`'s and forgets every mapping
    /// it made (so no old random mapping outlives the change). The node's TCP
    /// connection to the relay crosses this NAT too and is reset by it (the
    /// relay sees the next segment from another port), so the agent must
    /// reconnect: a harsher change than a firewall rule lifted alone.
    pub fn set_nat(&self, nat: Nat) {
        self.router.run_ok(&["nft", "flush chain ip wmnat post"]);
        self.router
            .run_ok(&["nft", &format!("add rule ip wmnat post oifname \"{}\" {}", self.uplink.a_if, nat.masquerade())]);
        // conntrack -F exits 0 and reports how many entries went on stderr.
        self.router.run_ok(&["conntrack", "-F"]);
    }

    /// The public port the router mapped the node's UDP `sport` to, for each
    /// destination address and port it has a mapping towards (from its
    /// conntrack table).
    pub fn udp_mappings(&self, sport: u16) -> Vec<(String, u16)> {
        let out = self.router.exec(&["conntrack", "-L", "-p", "udp", "-s", &self.private_ip]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut found = Vec::new();
        for line in text.lines() {
            // Original direction first, then the reply direction:
            // src= dst= sport= dport= ... src= dst= sport= dport=
            let field = |key: &str| -> Vec<&str> {
                line.split_whitespace().filter_map(|w| w.strip_prefix(key)).collect::<Vec<_>>()
            };
            let (dst, sports, dports) = (field("dst="), field("sport="), field("dport="));
            if dst.len() != 2 || sports.len() != 2 || dports.len() != 2 {
                continue;
            }
            if sports[0].parse::<u16>().ok() != Some(sport) {
                continue;
            }
            let (Ok(public_port), Ok(dport)) = (dports[1].parse::<u16>(), dports[0].parse::<u16>()) else {
                continue;
            };
            found.push((format!("{}:{dport}", dst[0]), public_port));
        }
        found.sort();
        found
    }
}

/// A node behind a `nat` router on the lab's bridge (its private network
/// 10.`private`.0.0/24), its agent following the lab's control server.
pub fn natted(lab: &mut Lab, name: &str, key: &str, private: u8, nat: Nat) -> Natted {
    let control = lab.url.clone();
    natted_on(lab, &control, name, key, private, nat)
}

/// [`natted`] with the agent given `--control control` (one URL or several).
pub fn natted_on(lab: &mut Lab, control: &str, name: &str, key: &str, private: u8, nat: Nat) -> Natted {
    natted_with(lab, control, name, key, private, nat, &[])
}

/// `wg show TUN endpoints`: one `KEY\tENDPOINT` line per peer.
pub fn wg_endpoints(n: &Node) -> String {
    String::from_utf8_lossy(&n.ns.exec(&["wg", "show", &n.tun, "endpoints"]).stdout).into_owned()
}

pub fn wg_listen_port(n: &Node) -> u16 {
    let out = n.ns.run_ok(&["wg", "show", &n.tun, "listen-port"]);
    out.trim().parse().unwrap_or_else(|_| panic!("listen port of {}: {out:?}", n.tun))
}

pub fn node_key(n: &Node) -> String {
    n.status()["self"]["node_key"].as_str().expect("registered").to_string()
}

/// The path `wiremesh status --json` shows for the node's one peer
/// (`relay`, `direct ADDR`, or empty when there is none).
pub fn status_path(n: &Node) -> String {
    n.status()["peers"][0]["path"].as_str().unwrap_or_default().to_string()
}

/// Frames the lab's control server's embedded relay has forwarded so far.
pub fn relay_forwarded(lab: &Lab) -> u64 {
    relay_forwarded_on(lab, &lab.url)
}

/// Frames the embedded relay of the control server at `control` has
/// forwarded so far.
pub fn relay_forwarded_on(lab: &Lab, control: &str) -> u64 {
    relay_counter(&relay_stats_on(lab, control), "forwarded")
}

/// The embedded relay's report at the control server `control`
/// (`wiremesh relay stats --json` from the server namespace, with the lab's
/// admin token).
pub fn relay_stats_on(lab: &Lab, control: &str) -> serde_json::Value {
    let admin = ["--control", control, "--admin-token", &lab.token];
    let out = lab.server_ns.exec(&[&[WIREMESH, "relay", "stats", "--json"][..], &admin[..]].concat());
    assert!(out.status.success(), "wiremesh relay stats: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("relay stats --json: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// One counter of a relay report.
pub fn relay_counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name].as_u64().unwrap_or_else(|| panic!("no {name} counter in {stats}"))
}

/// Sends `n` pings 50 ms apart and returns how many were answered.
pub fn pings(from: &Node, to: &str, n: u32) -> u32 {
    let count = n.to_string();
    let out = from.ns.exec(&["ping", "-q", "-n", "-c", &count, "-i", "0.05", "-W", "1", to]);
    let text = String::from_utf8_lossy(&out.stdout);
    // "N packets transmitted, M received, ..."
    text.split(',')
        .find_map(|part| part.trim().strip_suffix(" received").and_then(|m| m.trim().parse().ok()))
        .unwrap_or_else(|| panic!("ping summary not found in {text:?}"))
}

/// Whether the tools a test needs are here (skipping, or failing in CI, if not).
pub fn have_tools(test: &str, tools: &[&str]) -> bool {
    if !netns::require_or_skip(test) {
        return false;
    }
    for tool in tools {
        if !netns::have_command(tool) {
            return netns::skip_or_fail(test, &format!("{tool} is not installed (ci/install-deps.sh installs it)"));
        }
    }
    true
}

/// Waits until `n` has logged `line` after the first `from` bytes of its log.
pub fn wait_logged(n: &Node, from: usize, line: &str, timeout: Duration, all: &[&Node]) -> Duration {
    wait_until(timeout, line, || n.log().get(from..).is_some_and(|l| l.contains(line)), || logs(all))
}

/// [`natted_on`] with `extra` flags for the agent (`--userspace` and its
/// proxies, for one).
pub fn natted_with(
    lab: &mut Lab,
    control: &str,
    name: &str,
    key: &str,
    private: u8,
    nat: Nat,
    extra: &[&str],
) -> Natted {
    let router = Netns::new();
    let host = lab.next_host;
    lab.next_host += 1;
    let uplink = Lab::attach(&lab.hub, &router, &lab.subnet.v4_cidr(host));
    let public_ip = lab.subnet.v4(host);
    let ns = Netns::new();
    let private_ip = format!("10.{private}.0.2");
    let inner = veth_pair(&ns, &format!("{private_ip}/24"), Some(&router), &format!("10.{private}.0.1/24"));
    ns.run_ok(&["ip", "route", "add", "default", "via", &format!("10.{private}.0.1")]);
    router.run_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    router.run_ok(&["nft", "add table ip wmnat"]);
    router.run_ok(&["nft", "add chain ip wmnat post { type nat hook postrouting priority 100 ; }"]);
    router.run_ok(&["nft", &format!("add rule ip wmnat post oifname \"{}\" {}", uplink.a_if, nat.masquerade())]);
    // Like a home router's firewall: nothing new comes in from outside.
    // (Dropped before conntrack confirms it, so a peer's early probe leaves
    // no entry that would later clash with the node's own mapping and make
    // masquerade pick another port.)
    router.run_ok(&["nft", "add chain ip wmnat in { type filter hook input priority 0 ; }"]);
    router.run_ok(&["nft", &format!("add rule ip wmnat in iifname \"{}\" ct state new drop", uplink.a_if)]);
    let tun = netns::unique_ifname("wmn");
    let state = tmpdir(name);
    let socket = state.join("api.sock");
    let mut node = Node { ns, _link: inner, tun, state, socket, proc: None };
    lab.start_agent_on(&mut node, control, name, key, extra);
    Natted { router, uplink, public_ip, private_ip, node }
}

/// A standalone `wiremeshd relay` in its own namespace on the lab's bridge,
/// printing its counters every second (`--stats-interval 1s`).
pub struct StandaloneRelay {
    pub ns: Netns,
    pub _link: VethPair,
    pub state: std::path::PathBuf,
    pub proc: Proc,
    /// `IP:PORT` on the bridge.
    pub addr: String,
    /// The `relay://IP:PORT#sha256=…` URL it printed.
    pub url: String,
}

impl StandaloneRelay {
    /// Starts the relay on a new bridge address, port `port`.
    pub fn start(lab: &mut Lab, port: u16) -> StandaloneRelay {
        let ns = Netns::new();
        let host = lab.next_host;
        lab.next_host += 1;
        let link = Lab::attach(&lab.hub, &ns, &lab.subnet.v4_cidr(host));
        let addr = format!("{}:{port}", lab.subnet.v4(host));
        let state = tmpdir("relay");
        let mut child = ns.spawn(&[
            WIREMESHD,
            "relay",
            "--listen",
            &addr,
            "--state",
            state.to_str().unwrap(),
            "--stats-interval",
            "1s",
        ]);
        let out = Output::attach(&mut child);
        let url = format!("relay://{}", out.wait_for("relay URL: relay://", Duration::from_secs(20)));
        StandaloneRelay { ns, _link: link, state, proc: Proc { child, out }, addr, url }
    }

    /// The counters of the first `relay stats:` line the relay prints after
    /// this call (so they include everything done before it).
    pub fn next_stats(&self) -> std::collections::BTreeMap<String, u64> {
        const PREFIX: &str = "relay stats: ";
        let from = self.proc.out.0.lock().unwrap().len();
        let mut line = String::new();
        wait_until(
            Duration::from_secs(5),
            "a relay stats line",
            || {
                let lines = self.proc.out.0.lock().unwrap();
                let new = lines.get(from..).unwrap_or_default();
                new.iter().find(|l| l.starts_with(PREFIX)).map(|l| line = l.clone()).is_some()
            },
            || self.proc.out.text(),
        );
        line[PREFIX.len()..]
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("relay stats: {line:?}"));
                (k.to_string(), v.parse().unwrap_or_else(|_| panic!("relay stats: {line:?}")))
            })
            .collect()
    }
}

impl Drop for StandaloneRelay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Waits until `a` and `b` ping each other and both are on the relay path:
/// each logged it, WireGuard's endpoint is the relay marker, and the status
/// says `relay`. Returns the time to the first ping, both node keys and
/// both `wg show` endpoint lists.
pub fn wait_relayed(a: &Natted, b: &Natted) -> (Duration, String, String, String, String) {
    let all = [&a.node, &b.node];
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    let took = wait_until(Duration::from_secs(20), "alpha -> beta", || a.node.ping(&vb), || logs(&all));
    assert!(b.node.ping(&va), "beta -> alpha\n{}", logs(&all));
    let (ka, kb) = (node_key(&a.node), node_key(&b.node));
    wait_logged(&a.node, 0, &format!("path to {kb}: relay"), Duration::from_secs(10), &all);
    wait_logged(&b.node, 0, &format!("path to {ka}: relay"), Duration::from_secs(10), &all);
    let (ea, eb) = (wg_endpoints(&a.node), wg_endpoints(&b.node));
    assert!(ea.contains(&format!("{kb}\t{RELAY_MARKER}")), "alpha's endpoint for beta: {ea:?}");
    assert!(eb.contains(&format!("{ka}\t{RELAY_MARKER}")), "beta's endpoint for alpha: {eb:?}");
    for n in all {
        assert_eq!(status_path(n), "relay", "{}'s status path", n.tun);
    }
    (took, ka, kb, ea, eb)
}
