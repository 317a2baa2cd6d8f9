//! Subnet routers and exit nodes end to end, in network namespaces (root
//! only; skipped elsewhere, failing in CI): a control server and node agents
//! with TUN devices; networks that run no wiremesh (a LAN behind two
//! routers, an "Internet" behind an exit node) are namespaces of their own,
//! where nftables counters show which source addresses arrive.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

use netns::{veth_pair, Netns, VethPair};
use std::process::Child;
use std::time::{Duration, Instant};
use tailnet::*;

/// A process in a namespace, stopped when dropped.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf_server(ns: &Netns, port: u16) -> Bg {
    Bg(ns.spawn(&["sh", "-c", &format!("exec iperf3 -s -p {port} >/dev/null 2>&1")]))
}

/// Whether a short TCP transfer from `ns` to `ip:port` works.
fn tcp_works(ns: &Netns, ip: &str, port: u16) -> bool {
    let out = ns.exec_timeout(
        &["iperf3", "-c", ip, "-p", &port.to_string(), "-n", "64K", "--connect-timeout", "1500"],
        Duration::from_secs(15),
    );
    out.status.success()
}

fn ping(ns: &Netns, ip: &str) -> bool {
    ns.exec(&["ping", "-c", "1", "-W", "1", ip]).status.success()
}

/// Counts, in `ns`, packets arriving from each of `sources` (nftables
/// counters in a table of the test's own).
fn watch_sources(ns: &Netns, sources: &[&str]) {
    let mut script =
        String::from("table inet obs {\n chain in {\n  type filter hook input priority 0; policy accept;\n");
    for s in sources {
        script.push_str(&format!("  ip saddr {s} counter comment \"{s}\"\n"));
    }
    script.push_str(" }\n}\n");
    let _ = ns.exec(&["nft", "delete", "table", "inet", "obs"]);
    let out = ns.exec(&["nft", &script]);
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
}

/// Packets counted from `source` by [`watch_sources`].
fn seen_from(ns: &Netns, source: &str) -> u64 {
    let out = ns.exec(&["nft", "list", "table", "inet", "obs"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains(&format!("comment \"{source}\"")))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The allowed IPs `n`'s data plane has for the peer named `peer`.
fn allowed_ips_of(n: &Node, peer: &str) -> Vec<String> {
    let st = n.status();
    let Some(key) = st["peers"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["node"]["name"] == peer))
        .and_then(|p| p["node"]["node_key"].as_str().map(str::to_string))
    else {
        return Vec::new();
    };
    let out = n.ns.exec(&["wg", "show", &n.tun, "allowed-ips"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&key))
        .map(|l| l.split_whitespace().skip(1).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether `n` has every other node of `names` among its peers (other
/// nodes, such as a service the server runs, may be there too).
fn sees(n: &Node, names: &[&str]) -> bool {
    let st = n.status();
    let me = st["self"]["name"].as_str().unwrap_or_default().to_string();
    let peers: Vec<String> = st["peers"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["node"]["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    !me.is_empty() && names.iter().filter(|x| **x != me).all(|x| peers.iter().any(|p| p == x))
}

fn admin_ok(lab: &Lab, args: &[&str]) -> String {
    let out = lab.admin(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kernel_route(ns: &Netns, prefix: &str) -> String {
    String::from_utf8_lossy(&ns.exec(&["ip", "route", "show", prefix]).stdout).trim().to_string()
}

/// Whether test `name` can run here: network namespaces, and a word on
/// iperf3 and nft when they are missing (as the netns harness decides).
fn lab_can_run(name: &str) -> bool {
    if !netns::require_or_skip(name) {
        return false;
    }
    for cmd in ["iperf3", "nft"] {
        if !netns::have_command(cmd) {
            // Skips outside CI (false), fails in CI.
            return netns::skip_or_fail(name, &format!("{cmd} is not installed"));
        }
    }
    true
}

const LAN: &str = "10.77.0.0/24";
const TARGET: &str = "10.77.0.100";

#[test]
fn tailnet_routes_subnet_router_approval_snat_and_failover() {
    const NAME: &str = "tailnet_routes_subnet_router_approval_snat_and_failover";
    if !lab_can_run(NAME) {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let client = lab.spawn_node("client", &key);
    // The LAN: a bridge in its own namespace holding the target address,
    // with both routers on it. Nothing there runs wiremesh.
    let lan = Netns::new();
    lan.run_ok(&["ip", "link", "add", "br1", "type", "bridge"]);
    lan.run_ok(&["ip", "link", "set", "br1", "up"]);
    lan.run_ok(&["ip", "addr", "add", &format!("{TARGET}/24"), "dev", "br1"]);
    let mut r1 = lab.new_node("r1");
    let mut r2 = lab.new_node("r2");
    let mut links: Vec<VethPair> = Vec::new();
    for (n, ip) in [(&r1, "10.77.0.1/24"), (&r2, "10.77.0.2/24")] {
        let l = veth_pair(&n.ns, ip, Some(&lan), "");
        lan.run_ok(&["ip", "link", "set", &l.b_if, "master", "br1"]);
        links.push(l);
    }
    // r1 keeps the tailnet sources (the LAN routes the tailnet back to it); r2 masquerades.
    lan.run_ok(&["ip", "route", "add", "100.64.0.0/10", "via", "10.77.0.1"]);
    lab.start_agent_with(&mut r1, "r1", &key, &["--advertise-routes", LAN, "--snat-subnet-routes=false"]);
    lab.start_agent_with(&mut r2, "r2", &key, &["--advertise-routes", LAN]);
    let all = [&client, &r1, &r2];
    let log = || logs(&all) + &format!("--- control ---\n{}", lab.server.as_ref().unwrap().out.text());
    for n in all {
        wait_until(Duration::from_secs(20), "three-node maps", || sees(n, &["client", "r1", "r2"]), log);
    }
    let _iperf = iperf_server(&lan, 5201);
    let me = client.ipv4();
    watch_sources(&lan, &[&me, "10.77.0.2"]);

    // Advertised, not approved: listed, but nobody routes the prefix.
    let listed = admin_ok(&lab, &["routes", "list"]);
    assert_eq!(listed.matches("10.77.0.0/24").count(), 2, "{listed}");
    assert!(listed.contains("not approved") && !listed.contains("primary"), "{listed}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!allowed_ips_of(&client, "r1").contains(&LAN.to_string()));
    assert!(!allowed_ips_of(&client, "r2").contains(&LAN.to_string()));
    assert!(kernel_route(&client.ns, LAN).is_empty());
    assert!(!ping(&client.ns, TARGET), "an unapproved route must not be used");
    // Bad input is refused with a JSON error and changes nothing.
    for bad in [["r1", "10.77.0.1/24"], ["r1", "100.64.0.0/10"], ["nobody", LAN]] {
        let out = lab.admin(&["routes", "approve", bad[0], bad[1]]);
        assert!(!out.status.success(), "{bad:?} accepted");
    }

    // r1 approved: the client routes the LAN through it; sources are kept.
    admin_ok(&lab, &["routes", "approve", "r1", LAN]);
    let t = wait_until(
        Duration::from_secs(10),
        "the LAN through r1",
        || allowed_ips_of(&client, "r1").contains(&LAN.to_string()) && ping(&client.ns, TARGET),
        log,
    );
    println!("approval to a working route: {t:?}");
    assert!(kernel_route(&client.ns, LAN).contains(&client.tun), "{}", kernel_route(&client.ns, LAN));
    assert!(tcp_works(&client.ns, TARGET, 5201), "TCP through the subnet router\n{}", log());
    assert!(seen_from(&lan, &me) > 0, "without SNAT the LAN sees the client's tailnet address");
    assert_eq!(seen_from(&lan, "10.77.0.2"), 0);

    // r2 approved as well: r1 stays primary (no flapping).
    admin_ok(&lab, &["routes", "approve", "r2", LAN]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(allowed_ips_of(&client, "r1").contains(&LAN.to_string()));
    assert!(!allowed_ips_of(&client, "r2").contains(&LAN.to_string()));
    let listed = admin_ok(&lab, &["routes", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let primaries: Vec<&str> =
        v.as_array().unwrap().iter().filter(|r| r["primary"] == true).map(|r| r["node"].as_str().unwrap()).collect();
    assert_eq!(primaries, vec!["r1"], "{listed}");

    // r1 dies: the control server fails over to r2 and traffic follows.
    watch_sources(&lan, &[&me, "10.77.0.2"]);
    let r1_pid = r1.proc.as_ref().unwrap().child.id() as i32;
    let killed = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(r1_pid, libc::SIGKILL) };
    let diag = || {
        let mut d = log();
        for (ns, what) in [(&r2.ns, "r2"), (&client.ns, "client"), (&lan, "lan")] {
            for cmd in
                [&["nft", "list", "ruleset"][..], &["wg", "show"], &["ip", "route"], &["sysctl", "net.ipv4.ip_forward"]]
            {
                let o = ns.exec(cmd);
                d += &format!(
                    "\n--- {what} {cmd:?}\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        d
    };
    wait_until(Duration::from_secs(10), "the LAN through r2 after r1 died", || ping(&client.ns, TARGET), diag);
    let failover = killed.elapsed();
    println!("failover: r1 killed to a ping through r2 in {failover:?}");
    assert!(allowed_ips_of(&client, "r2").contains(&LAN.to_string()));
    assert!(tcp_works(&client.ns, TARGET, 5201), "TCP through r2\n{}", log());
    assert!(seen_from(&lan, "10.77.0.2") > 0, "with SNAT the LAN sees r2's address");
    assert_eq!(seen_from(&lan, &me), 0, "with SNAT the client's address does not reach the LAN");

    // Approvals withdrawn (r1's too: an offline router's approved route is
    // still handed out when no other router has it): the route is gone from
    // the data plane and the kernel.
    admin_ok(&lab, &["routes", "unapprove", "r1", LAN]);
    admin_ok(&lab, &["routes", "unapprove", "r2", LAN]);
    wait_until(
        Duration::from_secs(10),
        "the route to go",
        || !allowed_ips_of(&client, "r2").contains(&LAN.to_string()) && kernel_route(&client.ns, LAN).is_empty(),
        log,
    );
    assert!(!ping(&client.ns, TARGET));

    // A router stopped cleanly takes its masquerade table away and restores forwarding.
    assert!(r2.ns.exec(&["nft", "list", "table", "inet", &format!("wiremesh-{}", r2.tun)]).status.success());
    r2.proc.take();
    let gone = !r2.ns.exec(&["nft", "list", "table", "inet", &format!("wiremesh-{}", r2.tun)]).status.success();
    assert!(gone, "masquerade table left behind");
    assert_eq!(r2.ns.run_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(), "0");
    drop(links);
}

#[test]
fn tailnet_routes_exit_node_carries_the_default_route() {
    const NAME: &str = "tailnet_routes_exit_node_carries_the_default_route";
    if !lab_can_run(NAME) {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let client = lab.spawn_node("client", &key);
    // A host on the client's LAN (the bridge) that runs no wiremesh.
    let printer = Netns::new();
    let printer_ip = lab.subnet.v4(200);
    let _printer_link = Lab::attach(&lab.hub, &printer, &lab.subnet.v4_cidr(200));
    // "The Internet": 198.51.100.1, reachable only through the exit node's uplink.
    let internet = Netns::new();
    let mut exit = lab.new_node("exit");
    let _uplink = veth_pair(&exit.ns, "203.0.113.2/24", Some(&internet), "203.0.113.1/24");
    internet.run_ok(&["ip", "addr", "add", "198.51.100.1/32", "dev", "lo"]);
    exit.ns.run_ok(&["ip", "route", "add", "default", "via", "203.0.113.1"]);
    // And over IPv6: 2001:db8:ff::1 behind the same uplink.
    netns::add_address(Some(&exit.ns), &_uplink.a_if, "2001:db8:1::2/64");
    netns::add_address(Some(&internet), &_uplink.b_if, "2001:db8:1::1/64");
    netns::add_address(Some(&internet), "lo", "2001:db8:ff::1/128");
    exit.ns.run_ok(&["ip", "-6", "route", "add", "default", "via", "2001:db8:1::1"]);
    lab.start_agent_with(&mut exit, "exit", &key, &["--advertise-exit-node"]);
    let all = [&client, &exit];
    let log = || logs(&all) + &format!("--- control ---\n{}", lab.server.as_ref().unwrap().out.text());
    for n in all {
        wait_until(Duration::from_secs(20), "two-node maps", || sees(n, &["client", "exit"]), log);
    }
    let _iperf = iperf_server(&internet, 5202);
    let client_lan = client._link.a_ip.clone();
    let exit_lan = exit._link.a_ip.clone();
    watch_sources(&internet, &["203.0.113.2"]);
    watch_sources(&printer, &[&client_lan, &exit_lan]);
    assert!(!ping(&client.ns, "198.51.100.1"), "the Internet is not reachable without the exit node");
    assert!(!ping(&client.ns, "2001:db8:ff::1"));

    // Approved, but the client has not chosen it: nothing changes for it.
    let out = admin_ok(&lab, &["routes", "approve", "exit", "exit"]);
    assert!(out.contains("0.0.0.0/0") && out.contains("::/0"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!allowed_ips_of(&client, "exit").contains(&"0.0.0.0/0".to_string()));
    assert!(!ping(&client.ns, "198.51.100.1"));

    // Chosen: the default route goes through the exit node, which masquerades.
    let out = client.cli(&["set", "--exit-node", "exit"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = wait_until(
        Duration::from_secs(10),
        "the Internet through the exit node",
        || ping(&client.ns, "198.51.100.1"),
        log,
    );
    println!("exit node chosen to a working default route: {t:?}");
    assert!(allowed_ips_of(&client, "exit").contains(&"0.0.0.0/0".to_string()));
    assert!(tcp_works(&client.ns, "198.51.100.1", 5202), "TCP through the exit node\n{}", log());
    assert!(seen_from(&internet, "203.0.113.2") > 0, "the Internet sees the exit node's address");
    assert!(ping(&client.ns, "2001:db8:ff::1"), "IPv6 through the exit node (::/0)\n{}", log());
    let rules6 = client.ns.run_ok(&["ip", "-6", "rule", "show"]);
    assert!(rules6.contains("lookup 52180"), "{rules6}");
    let rules = client.ns.run_ok(&["ip", "rule", "show"]);
    assert!(rules.contains("lookup 52180") && rules.contains("not from all fwmark"), "{rules}");
    // The control connection stays off the tunnel: the node stays connected
    // and follows changes (an approval withdrawn and given again).
    assert_eq!(client.status()["connected"], true, "{}", log());
    // Without LAN access, the LAN is reached through the exit node too.
    assert!(ping(&client.ns, &printer_ip));
    assert!(seen_from(&printer, &exit_lan) > 0 && seen_from(&printer, &client_lan) == 0);
    // With LAN access, directly.
    let out = client.cli(&["set", "--exit-node-allow-lan-access"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until(
        Duration::from_secs(10),
        "the LAN rule",
        || client.ns.run_ok(&["ip", "rule", "show"]).contains("suppress_prefixlength 0"),
        log,
    );
    watch_sources(&printer, &[&client_lan, &exit_lan]);
    assert!(ping(&client.ns, &printer_ip));
    assert!(seen_from(&printer, &client_lan) > 0 && seen_from(&printer, &exit_lan) == 0);
    assert!(ping(&client.ns, "198.51.100.1"), "the Internet still goes through the exit node");

    // A policy without autogroup:internet for the client takes the route away.
    let file = lab.server_state.with_file_name("routes-policy.hujson");
    std::fs::write(&file, r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["100.64.0.0/10:*"]}]}"#).unwrap();
    admin_ok(&lab, &["policy", "set", file.to_str().unwrap()]);
    wait_until(Duration::from_secs(10), "the exit route to go", || !ping(&client.ns, "198.51.100.1"), log);
    assert!(!allowed_ips_of(&client, "exit").contains(&"0.0.0.0/0".to_string()));
    std::fs::write(
        &file,
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["autogroup:internet:*", "100.64.0.0/10:*"]}]}"#,
    )
    .unwrap();
    admin_ok(&lab, &["policy", "set", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    wait_until(Duration::from_secs(10), "the exit route back", || ping(&client.ns, "198.51.100.1"), log);

    // No exit node any more: rules and table gone, the Internet unreachable.
    let out = client.cli(&["set", "--exit-node", ""]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until(
        Duration::from_secs(10),
        "exit routing to go",
        || !client.ns.run_ok(&["ip", "rule", "show"]).contains("52180"),
        log,
    );
    assert!(!ping(&client.ns, "198.51.100.1"));
    assert!(ping(&client.ns, &printer_ip), "the LAN is direct again");
    // Chosen again, then the agent stops: it leaves no rule behind.
    let out = client.cli(&["set", "--exit-node", "exit"]);
    assert!(out.status.success());
    wait_until(Duration::from_secs(10), "exit routing again", || ping(&client.ns, "198.51.100.1"), log);
    let mut client = client;
    client.proc.take();
    let rules = client.ns.run_ok(&["ip", "rule", "show"]);
    assert!(!rules.contains("52180") && !rules.contains("suppress_prefixlength"), "{rules}");
    let rules6 = client.ns.run_ok(&["ip", "-6", "rule", "show"]);
    assert!(!rules6.contains("52180") && !rules6.contains("suppress_prefixlength"), "{rules6}");
    assert!(client.ns.run_ok(&["ip", "route", "show", "table", "52180"]).trim().is_empty());
}
