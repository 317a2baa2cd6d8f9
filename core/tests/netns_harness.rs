//! Self-test of the network-namespace harness in `testsupport/netns.rs`:
//! two real wireguard-go instances in two namespaces joined by veth, peered
//! with each other, pinging across the tunnel.
//!
//! Needs root, iproute2, wireguard-tools, /dev/net/tun and wireguard-go
//! (`ci/install-deps.sh`). Where those are missing the tests skip, except
//! under CI (`CI=true`), where they fail.

#[path = "../../testsupport/netns.rs"]
mod netns;

use netns::{ping, veth_pair, Netns, Subnet, WgGoVersion, WireguardGo};

#[test]
fn base64_keys_round_trip() {
    let zero_to_31: [u8; 32] = core::array::from_fn(|i| i as u8);
    let down: [u8; 32] = core::array::from_fn(|i| 255 - i as u8);
    let cases = [
        (zero_to_31, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="),
        (down, "//79/Pv6+fj39vX08/Lx8O/u7ezr6uno5+bl5OPi4eA="),
    ];
    for (bytes, text) in cases {
        assert_eq!(netns::b64_encode_32(&bytes), text);
        assert_eq!(netns::b64_decode_32(text).unwrap(), bytes);
    }
    assert!(netns::b64_decode_32("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh=").is_err());
    assert!(netns::b64_decode_32("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh!=").is_err());
    // Trailing bits set: not a canonical encoding of 32 bytes.
    assert!(netns::b64_decode_32("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh9=").is_err());
}

#[test]
fn unique_names_fit_interface_limit() {
    for _ in 0..100 {
        assert!(netns::unique_ifname("wmg").len() <= 15);
    }
}

/// Starts wireguard-go `va` in one namespace and `vb` in another, joined by a
/// veth link on `underlay` (IPv4 or IPv6), peers them, and pings across the
/// tunnel on both IPv4 and IPv6 tunnel addresses.
fn two_peers_ping(test: &str, va: WgGoVersion, vb: WgGoVersion, ipv6_underlay: bool) {
    for v in [va, vb] {
        if netns::require_wireguard_go_or_skip(test, v).is_none() {
            return;
        }
    }
    let a = Netns::new();
    let b = Netns::new();
    let under = Subnet::next();
    let (a_under, b_under) =
        if ipv6_underlay { (under.v6_cidr(1), under.v6_cidr(2)) } else { (under.v4_cidr(1), under.v4_cidr(2)) };
    let link = veth_pair(&a, &a_under, Some(&b), &b_under);

    // The underlay works before WireGuard is involved.
    let (ok, out) = ping(&a, &link.b_ip, 1);
    assert!(ok, "underlay ping failed:\n{out}");

    let wa = WireguardGo::start(&a, va, 51820);
    let wb = WireguardGo::start(&b, vb, 51821);
    let tun = Subnet::next();
    let endpoint = |ip: &str, port: u16| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    // a configured with `wg set`, b with `wg setconf`: both paths exercised.
    wa.add_peer(
        &wb.public_key,
        &format!("{}/32,{}/128", tun.v4(2), tun.v6(2)),
        Some(&endpoint(&link.b_ip, wb.listen_port)),
        None,
    );
    wb.setconf(&format!(
        "{}\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32, {}/128\nEndpoint = {}\n",
        wb.interface_section(),
        wa.public_key,
        tun.v4(1),
        tun.v6(1),
        endpoint(&link.a_ip, wa.listen_port),
    ));
    wa.up(&tun.v4_cidr(1));
    wa.add_address(&tun.v6_cidr(1));
    wb.up(&tun.v4_cidr(2));
    wb.add_address(&tun.v6_cidr(2));

    let (ok, out) = ping(&a, &tun.v4(2), 3);
    assert!(ok, "ping a -> b over the tunnel failed:\n{out}\n{}\n{}", wa.show(), wb.show());
    let (ok, out) = ping(&b, &tun.v6(1), 3);
    assert!(ok, "ping6 b -> a over the tunnel failed:\n{out}\n{}\n{}", wa.show(), wb.show());

    // Both sides saw a handshake and counted traffic (wg show dump: peer lines
    // are pubkey psk endpoint allowed-ips latest-handshake rx tx keepalive).
    for (w, peer) in [(&wa, &wb), (&wb, &wa)] {
        let dump = w.dump();
        let line = dump
            .lines()
            .find(|l| l.starts_with(&peer.public_key))
            .unwrap_or_else(|| panic!("peer missing from dump:\n{dump}"));
        let f: Vec<&str> = line.split('\t').collect();
        assert!(f[4].parse::<u64>().unwrap() > 0, "no handshake: {line}");
        assert!(f[5].parse::<u64>().unwrap() > 0, "nothing received: {line}");
        assert!(f[6].parse::<u64>().unwrap() > 0, "nothing sent: {line}");
    }
    // Keys as wg prints them decode to 32 bytes.
    netns::b64_decode_32(&wa.public_key).unwrap();

    // Cleanup: processes, sockets and namespaces go away on drop.
    let sockets = [wa.socket_path(), wb.socket_path()];
    let names = [a.name().to_string(), b.name().to_string()];
    drop((wa, wb, link, a, b));
    for s in &sockets {
        assert!(!s.exists(), "{} left behind", s.display());
    }
    let list = netns::host_run_ok(&["ip", "netns", "list"]);
    for n in &names {
        assert!(!list.split_whitespace().any(|w| w == n), "namespace {n} left behind:\n{list}");
    }
}

#[test]
fn wireguard_go_stable_pair_pings_over_tunnel() {
    two_peers_ping("wireguard_go_stable_pair_pings_over_tunnel", WgGoVersion::Stable, WgGoVersion::Stable, false);
}

#[test]
fn wireguard_go_stable_and_backports_ping_over_ipv6_underlay() {
    two_peers_ping(
        "wireguard_go_stable_and_backports_ping_over_ipv6_underlay",
        WgGoVersion::Stable,
        WgGoVersion::Backports,
        true,
    );
}
