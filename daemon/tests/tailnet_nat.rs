//! Two nodes, each behind its own NAT (a router namespace with nftables
//! masquerade), and the control server with its embedded relay and STUN on
//! the "public" bridge (root only; skipped elsewhere, failing in CI).
//!
//! Neither node can reach the other's private address, and neither NAT lets
//! in what its node did not send out first, so the pair only connects if
//! both learned their reflexive address by STUN from the WireGuard socket,
//! reported it, and probed each other's at the same time (disco): the
//! WireGuard endpoint each ends with is the other's NAT address.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

use netns::{veth_pair, Netns, VethPair};
use std::time::Duration;
use tailnet::*;

/// A node namespace behind a NAT router namespace attached to the bridge.
struct Natted {
    _router: Netns,
    _uplink: VethPair,
    public_ip: String,
    node: Node,
}

fn natted(lab: &mut Lab, name: &str, key: &str, private: u8) -> Natted {
    let router = Netns::new();
    let host = lab.next_host;
    lab.next_host += 1;
    let uplink = Lab::attach(&lab.hub, &router, &lab.subnet.v4_cidr(host));
    let public_ip = lab.subnet.v4(host);
    let ns = Netns::new();
    let inner = veth_pair(&ns, &format!("10.{private}.0.2/24"), Some(&router), &format!("10.{private}.0.1/24"));
    ns.run_ok(&["ip", "route", "add", "default", "via", &format!("10.{private}.0.1")]);
    router.run_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    router.run_ok(&["nft", "add table ip wmnat"]);
    router.run_ok(&["nft", "add chain ip wmnat post { type nat hook postrouting priority 100 ; }"]);
    router.run_ok(&["nft", &format!("add rule ip wmnat post oifname \"{}\" masquerade", uplink.a_if)]);
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
    lab.start_agent(&mut node, name, key);
    Natted { _router: router, _uplink: uplink, public_ip, node }
}

fn wg_endpoints(n: &Node) -> String {
    String::from_utf8_lossy(&n.ns.exec(&["wg", "show", &n.tun, "endpoints"]).stdout).into_owned()
}

#[test]
fn two_nodes_behind_nats_connect_directly() {
    const TEST: &str = "two_nodes_behind_nats_connect_directly";
    if !netns::require_or_skip(TEST) {
        return;
    }
    if !netns::have_command("nft") && !netns::skip_or_fail(TEST, "nft is not installed") {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let a = natted(&mut lab, "alpha", &key, 71);
    let b = natted(&mut lab, "beta", &key, 72);
    let all = [&a.node, &b.node];
    for n in all {
        wait_until(Duration::from_secs(20), "the peer in the map", || peer_count(n) == 1, || logs(&all));
    }
    // Each node learns its NAT's address by STUN and reports it.
    for n in [&a, &b] {
        let want = format!("reflexive address {}:", n.public_ip);
        wait_until(Duration::from_secs(20), "the reflexive address", || n.node.log().contains(&want), || logs(&all));
    }
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    let took = wait_until(Duration::from_secs(30), "alpha -> beta", || a.node.ping(&vb), || logs(&all));
    assert!(b.node.ping(&va), "beta -> alpha\n{}", logs(&all));
    // Direct: each sends to the other's NAT, not to a relay or a private address.
    let (ea, eb) = (wg_endpoints(&a.node), wg_endpoints(&b.node));
    assert!(ea.contains(&format!("\t{}:", b.public_ip)), "alpha's endpoint for beta: {ea:?}");
    assert!(eb.contains(&format!("\t{}:", a.public_ip)), "beta's endpoint for alpha: {eb:?}");
    // Disco chose those paths (not WireGuard's roaming alone).
    let (ka, kb) = (
        a.node.status()["self"]["node_key"].as_str().unwrap().to_string(),
        b.node.status()["self"]["node_key"].as_str().unwrap().to_string(),
    );
    let want = format!("path to {kb}: direct {}:", b.public_ip);
    wait_until(Duration::from_secs(10), "alpha's disco path", || a.node.log().contains(&want), || logs(&all));
    let want = format!("path to {ka}: direct {}:", a.public_ip);
    wait_until(Duration::from_secs(10), "beta's disco path", || b.node.log().contains(&want), || logs(&all));
    eprintln!("{TEST}: direct through both NATs after {took:?}; endpoints: {} / {}", ea.trim(), eb.trim());
    drop(lab.server.take());
}
