//! The node agent's resolver (MagicDNS-style, at 100.100.100.100) as
//! ordinary programs use it (root only; skipped elsewhere, failing in CI):
//! a control server and nodes in network namespaces as in
//! `tailnet_mesh.rs`, each namespace given a resolv.conf naming the
//! resolver (`ip netns exec` bind-mounts `/etc/netns/<ns>/resolv.conf`),
//! then getent(1) and ping(8) by name, getent(1) by address (PTR), glibc
//! over TCP (`options use-vc`), and pipelined queries over one TCP
//! connection from a thread in a node's namespace.

#[path = "../../testsupport/netns.rs"]
mod netns;
#[path = "support/tailnet.rs"]
mod tailnet;

use netns::Netns;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
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

/// A DNS query for `name` of type `qtype`, id `id`.
fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, qtype as u8, 0, 1]);
    q
}

/// Sends `queries` to 100.100.100.100:53 over one TCP connection, in one
/// write (RFC 7766 length prefixes), from a thread that enters `ns`'s
/// network namespace; returns the answers in the order they came.
fn tcp_queries(ns: &Netns, queries: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let path = PathBuf::from("/var/run/netns").join(ns.name());
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: this thread alone moves to the namespace, and ends with it.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let addr = "100.100.100.100:53".parse().unwrap();
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut out = Vec::new();
            for q in queries {
                out.extend_from_slice(&(q.len() as u16).to_be_bytes());
                out.extend_from_slice(q);
            }
            c.write_all(&out).unwrap();
            queries
                .iter()
                .map(|_| {
                    let mut len = [0u8; 2];
                    c.read_exact(&mut len).unwrap();
                    let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    c.read_exact(&mut r).unwrap();
                    r
                })
                .collect()
        })
        .join()
        .unwrap()
    })
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

    // Reverse lookups: getent by address asks for the PTR record.
    for (ip, name) in [(&beta4, "beta.wiremesh.internal"), (&beta6, "beta.wiremesh.internal"), (&gamma4, "gamma")] {
        let (ok, text) = getent(alpha, "hosts", ip);
        assert!(ok && text.contains(name), "{ip}: {text}\n{}", alpha.log());
    }
    let (ok, text) = getent(beta, "hosts", &alpha.ipv4());
    assert!(ok && text.contains("alpha.wiremesh.internal"), "{text}");
    let (ok, text) = getent(alpha, "hosts", "100.64.200.200");
    assert!(!ok, "an address no node has resolved: {text}");

    // glibc over TCP (use-vc): forward and reverse.
    let _gamma_conf = ResolvConf::write(&gamma.ns, "nameserver 100.100.100.100\noptions use-vc timeout:1 attempts:2\n");
    let (ok, text) = getent(gamma, "ahostsv4", "alpha.wiremesh.internal");
    assert!(ok && text.contains(&alpha.ipv4()), "{text}\n{}", gamma.log());
    let (ok, text) = getent(gamma, "hosts", &beta4);
    assert!(ok && text.contains("beta.wiremesh.internal"), "{text}");

    // Pipelined queries on one TCP connection, answered in order.
    let b4: Vec<u8> = beta4.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec();
    let o: Vec<String> = gamma4.split('.').rev().map(str::to_string).collect();
    let ptr = format!("{}.in-addr.arpa", o.join("."));
    let qs = [dns_query(1, "beta", 1), dns_query(2, &ptr, 12), dns_query(3, "nosuch.wiremesh.internal", 1)];
    let answers = tcp_queries(&gamma.ns, &qs);
    assert_eq!(answers.iter().map(|a| u16::from_be_bytes([a[0], a[1]])).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(answers[0][3] & 15 == 0 && answers[0].ends_with(&b4), "{:?}", answers[0]);
    let gamma_wire: Vec<u8> = [&[5u8][..], b"gamma", &[8], b"wiremesh", &[8], b"internal", &[0]].concat();
    assert!(answers[1][3] & 15 == 0 && answers[1].ends_with(&gamma_wire), "{:?}", answers[1]);
    assert_eq!(answers[2][3] & 15, 3, "NXDOMAIN");

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

/// What `cat /etc/resolv.conf` shows in `n`'s namespace.
fn resolv_conf(n: &Node) -> String {
    String::from_utf8_lossy(&n.ns.exec(&["cat", "/etc/resolv.conf"]).stdout).into_owned()
}

#[test]
fn tailnet_accept_dns_points_the_node_at_the_resolver_and_restores_the_original() {
    if !netns::require_or_skip("tailnet_accept_dns_points_the_node_at_the_resolver_and_restores_the_original") {
        return;
    }
    let host_conf = std::fs::read("/etc/resolv.conf").ok();
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let alpha = lab.spawn_node("alpha", &key);
    // beta's namespace gets its own resolv.conf (bind-mounted over
    // /etc/resolv.conf by `ip netns exec`) before its agent starts, so the
    // agent rewrites that one and never the host's.
    let mut beta = lab.new_node("beta");
    let original = "# beta's own\nnameserver 192.0.2.53\n";
    let _conf = ResolvConf::write(&beta.ns, original);
    assert_eq!(resolv_conf(&beta), original, "the namespace's resolv.conf is its own");
    lab.start_agent_with(&mut beta, "beta", &key, &["--accept-dns"]);
    let pointed = |n: &Node| resolv_conf(n).contains("nameserver 100.100.100.100\nsearch wiremesh.internal\n");
    wait_until(Duration::from_secs(20), "beta's map", || peer_count(&beta) == 1, || beta.log());
    wait_until(Duration::from_secs(5), "resolv.conf pointed", || pointed(&beta), || beta.log());
    // Ordinary programs in beta's namespace now resolve tailnet names with
    // nothing else configured.
    let alpha4 = alpha.ipv4();
    let (ok, text) = getent(&beta, "ahostsv4", "alpha");
    assert!(ok && text.contains(&alpha4), "{text}\n{}", beta.log());

    // down restores the original, up points it again.
    assert!(beta.cli(&["down"]).status.success());
    assert_eq!(resolv_conf(&beta), original);
    assert!(beta.cli(&["up"]).status.success());
    wait_until(Duration::from_secs(5), "pointed again", || pointed(&beta), || beta.log());
    // A clean exit restores it and leaves no backup.
    drop(beta.proc.take());
    assert_eq!(resolv_conf(&beta), original);
    assert!(!beta.state.join("resolv.conf.orig").exists());

    // A killed agent cannot restore it; the next one does, from its backup.
    lab.start_agent_with(&mut beta, "beta", &key, &["--accept-dns"]);
    wait_until(Duration::from_secs(10), "pointed after restart", || pointed(&beta), || beta.log());
    beta.proc.as_mut().unwrap().kill9();
    assert!(pointed(&beta) && beta.state.join("resolv.conf.orig").exists());
    // (The killed agent's TUN device goes away a moment after it.)
    let tun_gone = || !beta.ns.exec(&["ip", "link", "show", &beta.tun]).status.success();
    wait_until(Duration::from_secs(5), "the old TUN device gone", tun_gone, String::new);
    lab.start_agent_with(&mut beta, "beta", &key, &["--accept-dns"]);
    wait_until(Duration::from_secs(10), "connected again", || beta.status()["connected"] == true, || beta.log());
    drop(beta.proc.take());
    assert_eq!(resolv_conf(&beta), original);
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_conf, "the host's resolv.conf is untouched");
    drop(lab.server.take());
}
