//! wiremesh to wiremesh: the interop basics, a hub with three spokes on one
//! interface (cryptokey routing by distinct allowed IPs, longest prefix
//! match, the source check), and `wg-quick up`/`down` driving wiremeshd.

use crate::netns::{self, veth_pair, Netns, Subnet};
use crate::pair::{basic_scenario, first_ping, roaming_scenario, PORT_A, PORT_B};
use crate::support::{self, endpoint, PeerKind, RemoveOnDrop, WgDev, Wiremeshd};
use core::time::Duration;

#[test]
fn ipv4_underlay_ping_and_transfers() {
    basic_scenario("mesh::ipv4_underlay_ping_and_transfers", PeerKind::Wiremesh, false, true);
}

#[test]
fn ipv6_underlay_ping_and_transfers() {
    basic_scenario("mesh::ipv6_underlay_ping_and_transfers", PeerKind::Wiremesh, true, false);
}

#[test]
fn roaming_sender_moves() {
    roaming_scenario("mesh::roaming_sender_moves", PeerKind::Wiremesh, true);
}

/// TX packet count of `ifname` in `ns` (`/sys/class/net/<if>/statistics`).
fn link_stat(ns: &Netns, ifname: &str, stat: &str) -> u64 {
    let path = format!("/sys/class/net/{ifname}/statistics/{stat}");
    ns.run_ok(&["cat", &path]).trim().parse().expect("a counter")
}

/// A hub wiremeshd with three spokes (wiremeshd each, own namespace and
/// veth). The hub routes 10.78.i.0/24 and fd00:78:i::/48 to spoke i, and
/// 10.79.0.0/16 to spoke 1 but 10.79.2.0/24 to spoke 2 (longest prefix
/// wins). Spokes send everything in 10.78.0.0/16 and fd00:78::/32 to the
/// hub, which forwards between them.
#[test]
fn hub_with_three_spokes_routes_by_allowed_ips() {
    const TEST: &str = "mesh::hub_with_three_spokes_routes_by_allowed_ips";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    let hub_ns = Netns::new();
    hub_ns.run_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    hub_ns.run_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
    let hub = Wiremeshd::start(&hub_ns, PORT_A);
    let mut spokes = Vec::new();
    for i in 1..=3u8 {
        let ns = Netns::new();
        let under = Subnet::next();
        let veth = veth_pair(&hub_ns, &under.v4_cidr(1), Some(&ns), &under.v4_cidr(2));
        let dev = Wiremeshd::start(&ns, PORT_B);
        let mut allowed = format!("10.78.{i}.0/24,fd00:78:{i}::/48");
        if i == 1 {
            allowed.push_str(",10.79.0.0/16");
        }
        if i == 2 {
            allowed.push_str(",10.79.2.0/24");
        }
        hub.peer_add(&dev.public_key, &allowed, None, None);
        dev.peer_add(&hub.public_key, "10.78.0.0/16,fd00:78::/32", Some(&endpoint(&veth.a_ip, PORT_A)), Some(25));
        dev.ip_up(&[&format!("10.78.{i}.1/16"), &format!("fd00:78:{i}::1/32")]);
        let extra = if i == 2 { "10.79.2.1/32" } else { "10.79.5.1/32" };
        if i != 3 {
            ns.run_ok(&["ip", "addr", "add", extra, "dev", &dev.ifname]);
        }
        spokes.push((dev, veth, ns));
    }
    hub.ip_up(&["10.78.0.1/16", "fd00:78::1/32"]);
    hub_ns.run_ok(&["ip", "route", "add", "10.79.0.0/16", "dev", &hub.ifname]);
    let mut devs: Vec<&dyn WgDev> = vec![&hub];
    devs.extend(spokes.iter().map(|(d, _, _)| d as &dyn WgDev));

    // Each spoke reaches the hub (its persistent keepalive may have started the handshake already).
    for (i, (_, _, ns)) in spokes.iter().enumerate() {
        first_ping(ns, "10.78.0.1", &devs);
        support::ping_ok(&format!("{TEST}: spoke {} -> hub", i + 1), ns, "10.78.0.1", 3, &devs);
    }
    // The hub reaches each spoke by its own prefixes, v4 and v6, and only that spoke carries the packets.
    for i in 0..spokes.len() {
        let n = i + 1;
        let before: Vec<u64> = spokes.iter().map(|(d, _, _)| hub.dump().peer(&d.public_key).tx_bytes).collect();
        support::ping_ok(&format!("{TEST}: hub -> spoke {n} v4"), &hub_ns, &format!("10.78.{n}.1"), 3, &devs);
        support::ping_ok(&format!("{TEST}: hub -> spoke {n} v6"), &hub_ns, &format!("fd00:78:{n}::1"), 3, &devs);
        let dump = hub.dump();
        let after: Vec<u64> = spokes.iter().map(|(d, _, _)| dump.peer(&d.public_key).tx_bytes).collect();
        for (j, (b, a)) in before.iter().zip(&after).enumerate() {
            // 6 echo requests of 84/104 bytes plus 32 bytes of WireGuard overhead, padded; keepalives are 32.
            if j == i {
                assert!(a - b >= 6 * 100, "hub: peer {n} carried only {} bytes for 6 pings\n{dump:#?}", a - b);
            } else {
                assert!(
                    a - b <= 64,
                    "hub: pings to spoke {n} also went to spoke {} ({} bytes)\n{dump:#?}",
                    j + 1,
                    a - b
                );
            }
        }
    }
    // Longest prefix match: 10.79.2.1 goes to spoke 2 (/24), 10.79.5.1 to spoke 1 (/16).
    support::ping_ok(&format!("{TEST}: hub -> 10.79.2.1 (spoke 2, /24)"), &hub_ns, "10.79.2.1", 3, &devs);
    support::ping_ok(&format!("{TEST}: hub -> 10.79.5.1 (spoke 1, /16)"), &hub_ns, "10.79.5.1", 3, &devs);
    // Spoke to spoke through the hub.
    support::ping_ok(&format!("{TEST}: spoke 1 -> spoke 3 via hub"), &spokes[0].2, "10.78.3.1", 3, &devs);
    support::ping_ok(&format!("{TEST}: spoke 3 -> spoke 2 v6 via hub"), &spokes[2].2, "fd00:78:2::1", 3, &devs);

    // Source check: spoke 1 sending from an address in spoke 2's prefix is
    // dropped by the hub, never written to its TUN device.
    let (s1, _, s1_ns) = &spokes[0];
    s1_ns.run_ok(&["ip", "addr", "add", "10.78.2.99/32", "dev", &s1.ifname]);
    let rx_before = link_stat(&hub_ns, &hub.ifname, "rx_packets");
    let out = s1_ns.exec(&["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-I", "10.78.2.99", "10.78.0.1"]);
    let rx_spoofed = link_stat(&hub_ns, &hub.ifname, "rx_packets") - rx_before;
    let peer1_rx = hub.dump().peer(&s1.public_key).rx_bytes;
    assert!(!out.status.success(), "spoofed pings got replies:\n{}", support::output_text(&out));
    assert_eq!(
        rx_spoofed,
        0,
        "the hub delivered {rx_spoofed} packets from spoke 1 with a source in spoke 2's prefix to its TUN device\n{}",
        support::logs(&devs)
    );
    // ...while spoke 1 from its own address still gets through (the counter works).
    support::ping_ok(&format!("{TEST}: spoke 1 -> hub after the spoof"), s1_ns, "10.78.0.1", 3, &devs);
    let rx_legit = link_stat(&hub_ns, &hub.ifname, "rx_packets") - rx_before;
    assert!(rx_legit >= 3, "TUN rx counter did not count legitimate pings ({rx_legit})");
    eprintln!("{TEST}: spoofed source dropped (hub TUN rx +0, peer 1 rx bytes {peer1_rx}); legitimate +{rx_legit}");
}

/// `wg-quick up <conf>` with WG_QUICK_USERSPACE_IMPLEMENTATION pointing at
/// wiremeshd (through a wrapper adding the `interface` subcommand), against
/// another wiremeshd; ping through it; `wg-quick down` removes the interface
/// and the socket and the daemon exits.
#[test]
fn wg_quick_up_and_down() {
    const TEST: &str = "mesh::wg_quick_up_and_down";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    if !netns::have_command("wg-quick") {
        netns::skip_or_fail(TEST, "wg-quick not found; run ci/install-deps.sh");
        return;
    }
    let a_ns = Netns::new();
    let b_ns = Netns::new();
    let under = Subnet::next();
    let inner = Subnet::next();
    let veth = veth_pair(&a_ns, &under.v4_cidr(1), Some(&b_ns), &under.v4_cidr(2));
    let a = Wiremeshd::start(&a_ns, PORT_A);
    let (b_priv, b_pub) = netns::wg_genkey();
    let (a_in4, b_in4) = (format!("10.77.{}.1", inner.x), format!("10.77.{}.2", inner.x));
    let (a_in6, b_in6) = (inner.v6(1), inner.v6(2));
    a.peer_add(&b_pub, &format!("{b_in4}/32,{b_in6}/128"), None, None);
    a.ip_up(&[&format!("{a_in4}/24"), &format!("{a_in6}/64")]);

    let ifname = netns::unique_ifname("wmq");
    let dir = std::env::temp_dir().join(format!("wiremesh-wgquick-{ifname}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let _dir_guard = RemoveOnDrop(dir.clone());
    let sock_guard = RemoveOnDrop(support::socket_path(&ifname));
    let wrapper = dir.join("wiremeshd-wrapper");
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec '{}' interface \"$@\"\n", support::wiremeshd_bin()))
        .expect("write wrapper");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    }
    let conf = dir.join(format!("{ifname}.conf"));
    let conf_text = format!(
        "[Interface]\nPrivateKey = {b_priv}\nListenPort = {PORT_B}\nAddress = {b_in4}/24, {b_in6}/64\nMTU = 1420\n\n\
         [Peer]\nPublicKey = {}\nAllowedIPs = {a_in4}/32, {a_in6}/128\nEndpoint = {}\nPersistentKeepalive = 25\n",
        a.public_key,
        endpoint(&veth.a_ip, PORT_A)
    );
    std::fs::write(&conf, conf_text).expect("write wg-quick config");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).expect("chmod config");
    }
    let conf_s = conf.to_str().expect("utf-8 path");
    let wrapper_s = wrapper.to_str().expect("utf-8 path");
    // wg-quick falls back to the userspace implementation only when `ip link
    // add … type wireguard` fails and /sys/module/wireguard does not exist.
    // Without the kernel module (as here) that is the case by itself; with
    // it, hide /sys/module in a private mount namespace and put an `ip` shim
    // refusing that one command first on PATH.
    let up_cmd = if std::path::Path::new("/sys/module/wireguard").exists() {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("shim dir");
        let real_ip = netns::host_run_ok(&["sh", "-c", "command -v ip"]).trim().to_string();
        let shim = bin.join("ip");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\nif [ \"$1 $2 $4 $5\" = \"link add type wireguard\" ]; then\n  \
                 echo 'Error: Unknown device type. (test shim)' >&2; exit 2\nfi\nexec '{real_ip}' \"$@\"\n"
            ),
        )
        .expect("write ip shim");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).expect("chmod shim");
        let script = format!(
            "mount -t tmpfs tmpfs /sys/module && PATH='{}':\"$PATH\" exec wg-quick up '{conf_s}'",
            bin.display()
        );
        vec![
            "unshare".to_string(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            script,
        ]
    } else {
        vec!["wg-quick".to_string(), "up".into(), conf_s.to_string()]
    };
    let up_args: Vec<&str> = up_cmd.iter().map(String::as_str).collect();
    let up = netns::run_timeout(
        b_ns.command(&up_args).env("WG_QUICK_USERSPACE_IMPLEMENTATION", wrapper_s),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let up_text = support::output_text(&up);
    eprintln!("{TEST}: wg-quick up:\n{}", up_text.trim_end());
    assert!(up.status.success(), "wg-quick up failed ({}):\n{up_text}\n{}", up.status, support::logs(&[&a]));
    assert!(up_text.contains(wrapper_s), "wg-quick did not run the userspace implementation:\n{up_text}");
    let pids = b_ns.pids();
    assert_eq!(pids.len(), 1, "expected exactly the detached wiremeshd in the namespace, found {pids:?}");
    let daemon_pid = pids[0];
    let cmdline = std::fs::read_to_string(format!("/proc/{daemon_pid}/cmdline")).unwrap_or_default().replace('\0', " ");
    assert!(cmdline.contains("interface") && cmdline.contains(&ifname), "unexpected process {cmdline:?}");

    let devs: [&dyn WgDev; 1] = [&a];
    first_ping(&b_ns, &a_in4, &devs);
    support::ping_ok(&format!("{TEST}: through wg-quick's interface, v4"), &b_ns, &a_in4, 3, &devs);
    support::ping_ok(&format!("{TEST}: to wg-quick's interface, v4"), &a_ns, &b_in4, 3, &devs);
    // wg-quick adds IPv6 addresses without nodad; wait for DAD if the device does it.
    let v6_ok = support::wait_until(Duration::from_secs(5), || netns::ping(&b_ns, &a_in6, 1).0);
    assert!(v6_ok, "IPv6 through wg-quick's interface never worked\n{}", support::logs(&devs));
    support::ping_ok(&format!("{TEST}: through wg-quick's interface, v6"), &b_ns, &a_in6, 3, &devs);
    let show = b_ns.run_ok(&["wg", "show", &ifname]);
    assert!(show.contains(&a.public_key) && show.contains("persistent keepalive: every 25 seconds"), "{show}");
    let mtu = b_ns.run_ok(&["cat", &format!("/sys/class/net/{ifname}/mtu")]);
    assert_eq!(mtu.trim(), "1420", "MTU from the config");

    let down = netns::run_timeout(
        b_ns.command(&["wg-quick", "down", conf_s]).env("WG_QUICK_USERSPACE_IMPLEMENTATION", wrapper_s),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let down_text = support::output_text(&down);
    eprintln!("{TEST}: wg-quick down:\n{}", down_text.trim_end());
    assert!(down.status.success(), "wg-quick down failed ({}):\n{down_text}", down.status);
    assert!(!support::link_exists(&b_ns, &ifname), "{ifname} still exists after wg-quick down");
    let gone = support::wait_until(Duration::from_secs(5), || {
        !support::socket_path(&ifname).exists() && !support::process_alive(daemon_pid)
    });
    assert!(
        gone,
        "after wg-quick down (which deletes the link): socket exists {}, wiremeshd (pid {daemon_pid}) alive {}",
        support::socket_path(&ifname).exists(),
        support::process_alive(daemon_pid)
    );
    drop(sock_guard);
}
