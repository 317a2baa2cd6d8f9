//! The node agent's resolver (MagicDNS-style, at 100.100.100.100) as
//! ordinary programs use it (root only; skipped elsewhere, failing in CI):
//! a control server and nodes in network namespaces as in
//! `tailnet_mesh.rs`, each namespace given a resolv.conf naming the
//! resolver (`ip netns exec` bind-mounts `/etc/netns/<ns>/resolv.conf`),
//! then getent(1) and ping(8) by name.

#[path = "../../testsupport/netns.rs"]
mod netns;
#[path = "support/tailnet.rs"]
mod tailnet;

use netns::Netns;
use std::path::PathBuf;
use std::time::Duration;
use tailnet::*;

/// `/etc/netns/<ns>/resolv.conf` for the life of the test.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn write(ns: &Netns, text: &str) -> ResolvConf {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `getent DATABASE NAME` in `n`'s namespace: (success, stdout).
fn getent(n: &Node, db: &str, name: &str) -> (bool, String) {
    let out = n.ns.exec(&["getent", db, name]);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn tailnet_names_resolve_through_the_agents_resolver() {
    if !netns::require_or_skip("tailnet_names_resolve_through_the_agents_resolver") {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let nodes: Vec<Node> = ["alpha", "beta", "gamma"].iter().map(|n| lab.spawn_node(n, &key)).collect();
    let all: Vec<&Node> = nodes.iter().collect();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "three-node maps", || peer_count(n) == 2, || logs(&all));
    }
    let (alpha, beta, gamma) = (&nodes[0], &nodes[1], &nodes[2]);
    // alpha searches the tailnet domain; beta has no search list, so its
    // short-name queries reach the resolver as single labels.
    let _alpha_conf = ResolvConf::write(
        &alpha.ns,
        "nameserver 100.100.100.100\nsearch wiremesh.internal\noptions timeout:1 attempts:2\n",
    );
    let _beta_conf = ResolvConf::write(&beta.ns, "nameserver 100.100.100.100\noptions timeout:1 attempts:2\n");
    let (beta4, beta6) = (beta.ipv4(), beta.ipv6());
    let (gamma4, gamma6) = (gamma.ipv4(), gamma.ipv6());

    // Short and full names, A and AAAA, self included.
    let (ok, text) = getent(alpha, "ahosts", "beta.wiremesh.internal");
    assert!(ok && text.contains(&beta4) && text.contains(&beta6), "{text}\n{}", alpha.log());
    let (ok, text) = getent(alpha, "hosts", "beta");
    assert!(ok && (text.contains(&beta4) || text.contains(&beta6)), "{text}");
    let (ok, text) = getent(alpha, "ahostsv4", "gamma");
    assert!(ok && text.contains(&gamma4), "{text}");
    let (ok, text) = getent(alpha, "ahosts", "gamma");
    assert!(ok && text.contains(&gamma6), "{text}");
    let (ok, text) = getent(alpha, "ahostsv4", "alpha");
    assert!(ok && text.contains(&alpha.ipv4()), "{text}");
    let (ok, text) = getent(beta, "ahosts", "gamma");
    assert!(ok && text.contains(&gamma4) && text.contains(&gamma6), "{text}\n{}", beta.log());
    let (ok, text) = getent(beta, "ahostsv4", "ALPHA.wiremesh.internal");
    assert!(ok && text.contains(&alpha.ipv4()), "{text}");

    // Unknown names fail: in the domain (NXDOMAIN), short, and outside it
    // (REFUSED: there is no forwarding).
    for name in ["nosuch", "nosuch.wiremesh.internal", "example.com"] {
        for n in [alpha, beta] {
            let (ok, text) = getent(n, "ahosts", name);
            assert!(!ok, "{name} resolved in {}: {text}", n.tun);
        }
    }

    // ping(8) by name, over the tunnel.
    wait_until(Duration::from_secs(10), "ping beta by name", || alpha.ping("beta"), || logs(&all));
    let out = alpha.ns.exec(&["ping", "-c", "1", "-W", "2", "gamma.wiremesh.internal"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && (text.contains(&gamma4) || text.contains(&gamma6)), "{text}");
    let out = alpha.ns.exec(&["ping", "-4", "-c", "1", "-W", "2", "gamma"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&gamma4), "{text}");
    let out = beta.ns.exec(&["ping", "-6", "-c", "1", "-W", "2", "gamma"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Garbage to the resolver is dropped and counted; it keeps answering.
    let out = alpha.ns.exec(&["bash", "-c", "printf 'garbage' > /dev/udp/100.100.100.100/53"]);
    assert!(out.status.success());
    let log = alpha.proc.as_ref().unwrap().out.clone();
    log.wait_for("wiremeshd node: dns: dropped a malformed message", Duration::from_secs(5));
    assert!(getent(alpha, "ahostsv4", "beta").0);

    // A node that joins later is resolvable once the maps name it.
    let delta = lab.spawn_node("delta", &key);
    wait_until(Duration::from_secs(20), "delta's map", || peer_count(&delta) == 3, || delta.log());
    let delta4 = delta.ipv4();
    wait_until(
        Duration::from_secs(5),
        "delta resolvable",
        || getent(alpha, "ahostsv4", "delta").1.contains(&delta4),
        || logs(&[alpha, &delta]),
    );
    drop(lab.server.take());
}
