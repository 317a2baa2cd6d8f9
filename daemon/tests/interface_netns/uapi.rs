//! The wg(8) configuration protocol on /var/run/wireguard/<if>.sock:
//! `wg show all dump` parsed and checked after traffic, the raw `get=1`
//! answer compared with wireguard-go's for the same configuration, invalid
//! `set` requests rejected with wireguard-go's errno and no change, and
//! `wg setconf` / `syncconf` / `addconf` / `showconf`.

use crate::netns::{self, Netns, WgGoVersion, WireguardGo};
use crate::pair::{Pair, PORT_A, PORT_B};
use crate::support::Wiremeshd;
use crate::support::{self, endpoint, key_hex, temp_file, uapi_errno, uapi_raw, Dump, PeerKind, RemoveOnDrop, WgDev};

fn genpsk() -> String {
    let out = netns::host_run_ok(&["wg", "genpsk"]);
    out.trim().to_string()
}

/// After traffic with wireguard-go, with fwmark, a preshared key and a
/// persistent keepalive set, `wg show all dump` lists wiremeshd's interface
/// with every field right, and the single-field `wg show` forms agree.
#[test]
fn show_all_dump_fields_after_traffic() {
    const TEST: &str = "uapi::show_all_dump_fields_after_traffic";
    let _timer = support::Timer::new(TEST);
    let peer = PeerKind::WgGo(WgGoVersion::Backports);
    if !peer.require(TEST) {
        return;
    }
    let p = Pair::new(peer, false, true, true);
    let psk = genpsk();
    let psk_file = temp_file(&format!("{}-psk", p.a.ifname), &format!("{psk}\n"));
    let _g = RemoveOnDrop(psk_file.clone());
    let psk_path = psk_file.to_str().expect("utf-8 path");
    // B first: A's keepalive starts a handshake at once, which must already use the key on both sides.
    p.b.wg_set(&["peer", &p.a.public_key, "preshared-key", psk_path]);
    p.a.wg_set(&[
        "fwmark",
        "0x1234",
        "peer",
        p.b.public_key(),
        "preshared-key",
        psk_path,
        "persistent-keepalive",
        "25",
    ]);
    p.first_ping_from_a();
    support::ping_ok(TEST, &p.a_ns, &p.b_in4, 3, &p.devs());

    // `wg show all` also lists other tests' userspace interfaces (the socket
    // directory is shared), some possibly just going away: do not insist on
    // its exit status, only on our lines.
    let out = p.a_ns.exec(&["wg", "show", "all", "dump"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let dump = Dump::parse(&text, Some(&p.a.ifname))
        .unwrap_or_else(|e| panic!("`wg show all dump`: {e}\n{text}\n{}", support::output_text(&out)));
    let now = support::unix_now();
    let ours: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{}\t", p.a.ifname))).collect();
    eprintln!("{TEST}: wg show all dump (wiremeshd lines, keys elided):");
    for l in &ours {
        let fields: Vec<&str> =
            l.split('\t').map(|f| if f.len() == 44 && f.ends_with('=') { "<key>" } else { f }).collect();
        eprintln!("  {}", fields.join("\t"));
    }
    assert_eq!(ours.len(), 2, "one interface line and one peer line:\n{text}");
    assert_eq!(dump.iface.private_key, p.a.private_key);
    assert_eq!(dump.iface.public_key, p.a.public_key);
    assert_eq!(dump.iface.listen_port, PORT_A);
    assert_eq!(dump.iface.fwmark, "0x1234");
    assert_eq!(dump.peers.len(), 1);
    let peer = &dump.peers[0];
    assert_eq!(peer.public_key, p.b.public_key());
    assert_eq!(peer.preshared_key, psk);
    assert_eq!(peer.endpoint, endpoint(&p.veth.b_ip, PORT_B));
    let mut allowed = peer.allowed_ips.clone();
    allowed.sort();
    let mut want = vec![format!("{}/32", p.b_in4), format!("{}/128", p.b_in6)];
    want.sort();
    assert_eq!(allowed, want);
    assert!(
        peer.latest_handshake > 0 && peer.latest_handshake <= now + 5 && peer.latest_handshake + 60 >= now,
        "latest handshake {} vs now {now}",
        peer.latest_handshake
    );
    assert!(peer.rx_bytes >= 4 * 84 && peer.tx_bytes >= 4 * 84, "{peer:?}");
    assert_eq!(peer.keepalive, "25");
    // wireguard-go's own line for the same link has the same shape, and saw the same traffic.
    let dump_b = Dump::parse(&text, Some(p.b.ifname())).expect("wireguard-go's lines in `wg show all dump`");
    let pb = dump_b.peer(&p.a.public_key);
    assert_eq!(pb.preshared_key, psk);
    assert!(pb.rx_bytes > 0 && pb.tx_bytes > 0 && pb.latest_handshake > 0, "{pb:?}");

    // The single-field forms.
    let show = |what: &str| p.a.wg(&["show", &p.a.ifname, what]);
    assert_eq!(show("private-key").trim(), p.a.private_key);
    assert_eq!(show("public-key").trim(), p.a.public_key);
    assert_eq!(show("listen-port").trim(), PORT_A.to_string());
    assert_eq!(show("fwmark").trim(), "0x1234");
    assert_eq!(show("peers").trim(), p.b.public_key());
    assert_eq!(show("endpoints").trim(), format!("{}\t{}", p.b.public_key(), endpoint(&p.veth.b_ip, PORT_B)));
    assert_eq!(show("persistent-keepalive").trim(), format!("{}\t25", p.b.public_key()));
    assert_eq!(show("preshared-keys").trim(), format!("{}\t{psk}", p.b.public_key()));
    let human = p.a.wg(&["show", &p.a.ifname]);
    for want in ["fwmark: 0x1234", "preshared key: (hidden)", "latest handshake:", "transfer:", "every 25 seconds"] {
        assert!(human.contains(want), "`wg show` lacks {want:?}:\n{human}");
    }
    // The mark is on the UDP socket (wg-quick's policy routing relies on it).
    let ss = p.a_ns.exec(&["ss", "-u", "-a", "-n", "-e", "-p"]);
    let ss_text = support::output_text(&ss);
    if ss.status.success() {
        let lines: Vec<&str> = ss_text.lines().filter(|l| l.contains(&format!(":{PORT_A}"))).collect();
        assert!(!lines.is_empty(), "no UDP socket on port {PORT_A}:\n{ss_text}");
        assert!(lines.iter().all(|l| l.contains("fwmark:0x1234")), "UDP sockets without the fwmark:\n{ss_text}");
    } else {
        eprintln!("{TEST}: `ss` unavailable, fwmark on the socket not checked: {ss_text}");
    }
}

/// Splits a `get=1` answer into the interface lines and one sorted list of
/// lines per peer (sorted by public key), so answers compare regardless of
/// the order of peers and allowed IPs.
fn normalize_get(answer: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut iface = Vec::new();
    let mut peers: Vec<Vec<String>> = Vec::new();
    for line in answer.lines().filter(|l| !l.is_empty()) {
        if line.starts_with("public_key=") {
            peers.push(vec![line.to_string()]);
        } else if let Some(p) = peers.last_mut() {
            p.push(line.to_string());
        } else {
            iface.push(line.to_string());
        }
    }
    // errno=0 ends the last peer section; move it to the interface part.
    if let Some(p) = peers.last_mut() {
        if let Some(i) = p.iter().position(|l| l.starts_with("errno=")) {
            iface.push(p.remove(i));
        }
    }
    for p in &mut peers {
        p[1..].sort();
    }
    peers.sort();
    (iface, peers)
}

/// The raw `get=1` answer of wiremeshd equals wireguard-go's (both
/// versions) for the same `wg setconf` file, up to the order of peers and of
/// lines within a peer.
#[test]
fn get_answer_matches_wireguard_go() {
    const TEST: &str = "uapi::get_answer_matches_wireguard_go";
    let _timer = support::Timer::new(TEST);
    if !support::require_wg_go(TEST, WgGoVersion::Stable) || !support::require_wg_go(TEST, WgGoVersion::Backports) {
        return;
    }
    let ns_w = Netns::new();
    let ns_s = Netns::new();
    let ns_b = Netns::new();
    let w = Wiremeshd::start(&ns_w, 40001);
    let stable = WireguardGo::start(&ns_s, WgGoVersion::Stable, 40001);
    let backports = WireguardGo::start(&ns_b, WgGoVersion::Backports, 40001);
    let (priv_key, _) = netns::wg_genkey();
    let (_, peer1) = netns::wg_genkey();
    let (_, peer2) = netns::wg_genkey();
    let (_, peer3) = netns::wg_genkey();
    let psk = genpsk();
    let conf = format!(
        "[Interface]\nPrivateKey = {priv_key}\nListenPort = 40002\nFwMark = 0x51\n\n\
         [Peer]\nPublicKey = {peer1}\nPresharedKey = {psk}\nAllowedIPs = 10.1.0.0/16, 10.2.3.4/32, fd00:1::/48\n\
         Endpoint = 192.0.2.10:51820\n\n\
         [Peer]\nPublicKey = {peer2}\nAllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = [2001:db8::7]:4500\n\n\
         [Peer]\nPublicKey = {peer3}\nPersistentKeepalive = 17\n"
    );
    let path = temp_file(&format!("{}-getconf", w.ifname), &conf);
    let _g = RemoveOnDrop(path.clone());
    let path_s = path.to_str().expect("utf-8 path");
    for d in [&w as &dyn WgDev, &stable, &backports] {
        d.wg(&["setconf", d.ifname(), path_s]);
    }
    let get = |d: &dyn WgDev| uapi_raw(d.ifname(), "get=1\n\n").unwrap_or_else(|e| panic!("{}: {e}", d.label()));
    let ans_w = get(&w);
    eprintln!("{TEST}: wiremeshd get=1 answer (keys elided):");
    for l in ans_w.lines() {
        let shown = match l.split_once('=') {
            Some((k, v)) if v.len() == 64 => format!("{k}=<hex key>"),
            _ => l.to_string(),
        };
        eprintln!("  {shown}");
    }
    assert!(ans_w.ends_with("errno=0\n\n"), "answer must end with errno=0 and an empty line: {ans_w:?}");
    assert!(ans_w.contains(&format!("private_key={}\n", key_hex(&priv_key))));
    let norm_w = normalize_get(&ans_w);
    for d in [&stable, &backports] {
        let ans = get(d);
        let norm = normalize_get(&ans);
        assert_eq!(
            norm_w,
            norm,
            "wiremeshd's get=1 answer differs from {}'s\n--- wiremeshd ---\n{ans_w}--- {} ---\n{ans}",
            d.label(),
            d.label()
        );
    }
    // The interface lines come in wireguard-go's order too.
    let first_lines: Vec<&str> = ans_w.lines().take(3).map(|l| l.split('=').next().unwrap_or("")).collect();
    assert_eq!(first_lines, ["private_key", "listen_port", "fwmark"]);
}

/// One invalid `set` request: what it is and its body.
struct BadSet {
    what: &'static str,
    body: String,
}

/// Invalid `set=1` requests get the same negative errno wireguard-go returns
/// (-22, EINVAL, for all of these), and leave wiremeshd's configuration
/// exactly as it was, even when valid lines came before the bad one. Also
/// `wg set` with a malformed key fails in wg itself, changing nothing.
#[test]
fn invalid_set_rejected_with_errno_and_no_change() {
    const TEST: &str = "uapi::invalid_set_rejected_with_errno_and_no_change";
    let _timer = support::Timer::new(TEST);
    if !support::require_wg_go(TEST, WgGoVersion::Backports) || !support::require_wg_go(TEST, WgGoVersion::Stable) {
        return;
    }
    let ns = Netns::new();
    let ns_g = Netns::new();
    let ns_s = Netns::new();
    let w = Wiremeshd::start(&ns, 41000);
    let g = WireguardGo::start(&ns_g, WgGoVersion::Backports, 41000);
    let s = WireguardGo::start(&ns_s, WgGoVersion::Stable, 41000);
    let (_, peer) = netns::wg_genkey();
    let (_, newpeer) = netns::wg_genkey();
    let psk = genpsk();
    let psk_file = temp_file(&format!("{}-psk", w.ifname), &format!("{psk}\n"));
    let _g = RemoveOnDrop(psk_file.clone());
    let psk_path = psk_file.to_str().expect("utf-8 path");
    let setup = ["fwmark", "7", "peer", &peer, "allowed-ips", "10.5.0.0/16,fd05::/64", "endpoint", "192.0.2.1:1234"];
    w.wg_set(&setup);
    w.wg_set(&["peer", &peer, "preshared-key", psk_path, "persistent-keepalive", "9"]);
    let before = w.dump_text();
    let before_raw = uapi_raw(&w.ifname, "get=1\n\n").expect("get");

    let peer_hex = key_hex(&peer);
    let new_hex = key_hex(&newpeer);
    let bad = |what: &'static str, lines: &str| BadSet { what, body: format!("set=1\n{lines}\n\n") };
    let cases = vec![
        bad("listen_port not a number", "listen_port=abc"),
        bad("listen_port out of range", "listen_port=70000"),
        bad("fwmark not a number", "fwmark=xyz"),
        bad("private_key not hex", "private_key=zz"),
        bad("private_key too short", &format!("private_key={}", &new_hex[..62])),
        bad("public_key not hex", "public_key=nothex"),
        bad("unknown device key", "frobnicate=1"),
        bad("peer key before any public_key", "allowed_ip=10.0.0.0/8"),
        bad("replace_peers not a boolean", "replace_peers=maybe"),
        bad("allowed_ip prefix too long", &format!("public_key={peer_hex}\nallowed_ip=10.0.0.0/33")),
        bad("allowed_ip garbage", &format!("public_key={peer_hex}\nallowed_ip=banana")),
        bad("endpoint garbage", &format!("public_key={peer_hex}\nendpoint=notanendpoint")),
        bad("keepalive not a number", &format!("public_key={peer_hex}\npersistent_keepalive_interval=abc")),
        bad("protocol_version 2", &format!("public_key={peer_hex}\nprotocol_version=2")),
        bad("preshared_key not hex", &format!("public_key={peer_hex}\npreshared_key=xyz")),
        bad("remove not a boolean", &format!("public_key={peer_hex}\nremove=perhaps")),
        bad("unknown peer key", &format!("public_key={peer_hex}\nfrobnicate=1")),
        bad(
            "valid changes, then a bad line (must be atomic)",
            &format!(
                "listen_port=41999\nfwmark=99\npublic_key={peer_hex}\nreplace_allowed_ips=true\n\
                 allowed_ip=10.9.0.0/16\npublic_key={new_hex}\nallowed_ip=10.8.0.0/16\nallowed_ip=bogus"
            ),
        ),
        bad(
            "replace_peers then a bad line (must be atomic)",
            &format!("replace_peers=true\npublic_key={new_hex}\nendpoint=1.2.3.4:99999"),
        ),
    ];
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        let ans_w = uapi_raw(&w.ifname, &case.body).unwrap_or_else(|e| panic!("{}: {e}", case.what));
        let ans_g = uapi_raw(&g.ifname, &case.body).unwrap_or_else(|e| panic!("wireguard-go, {}: {e}", case.what));
        let ans_s = uapi_raw(&s.ifname, &case.body).unwrap_or_else(|e| panic!("wireguard-go, {}: {e}", case.what));
        let (ew, eg, es) = (uapi_errno(&ans_w), uapi_errno(&ans_g), uapi_errno(&ans_s));
        table.push(format!("{:<50} wiremeshd {ew:?}, wireguard-go 20231211 {eg:?}, 20220316 {es:?}", case.what));
        if ew != eg || ew != es || ew != Some(-22) {
            failures.push(format!("{}: wiremeshd answered {ans_w:?}, wireguard-go {ans_g:?} / {ans_s:?}", case.what));
        }
        let now = w.dump_text();
        if now != before {
            failures
                .push(format!("{}: configuration changed:\n--- before ---\n{before}--- after ---\n{now}", case.what));
            // Restore, so the next cases are judged on their own.
            let restore = format!("set=1\nreplace_peers=true\n{}", before_raw.replace("errno=0\n", ""));
            let _ = uapi_raw(&w.ifname, &restore);
        }
    }
    eprintln!("{TEST}: errno per invalid request:\n  {}", table.join("\n  "));
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert_eq!(uapi_raw(&w.ifname, "get=1\n\n").expect("get"), before_raw, "raw get answer changed");

    // wg(8) itself refuses a malformed key; nothing reaches the daemon.
    let out = ns.exec(&["wg", "set", &w.ifname, "peer", "not-a-key", "allowed-ips", "10.0.0.0/8"]);
    assert!(!out.status.success(), "wg set with a bad key succeeded");
    let err = support::output_text(&out);
    assert!(err.contains("Key is not the correct length or format"), "wg's message: {err}");
    assert_eq!(w.dump_text(), before, "`wg set … peer <badkey>` changed the configuration");
    // And the socket still serves valid requests afterwards.
    w.wg_set(&["listen-port", "41001"]);
    assert_eq!(w.dump().iface.listen_port, 41001);
    let ans = uapi_raw(&w.ifname, "set=1\nlisten_port=41002\n\n").expect("valid set");
    assert_eq!(uapi_errno(&ans), Some(0), "{ans:?}");
    assert_eq!(w.dump().iface.listen_port, 41002);
}

/// `wg setconf`, `wg syncconf` (which must keep a live session with a peer it
/// does not change), `wg addconf` and a `wg showconf` round trip.
#[test]
fn setconf_syncconf_addconf_showconf() {
    const TEST: &str = "uapi::setconf_syncconf_addconf_showconf";
    let _timer = support::Timer::new(TEST);
    let peer = PeerKind::WgGo(WgGoVersion::Backports);
    if !peer.require(TEST) {
        return;
    }
    let p = Pair::new(peer, false, true, false);
    let a = &p.a;
    let (_, x_pub) = netns::wg_genkey();
    let (_, y_pub) = netns::wg_genkey();
    let (_, z_pub) = netns::wg_genkey();
    let b_pub = p.b.public_key().to_string();
    let b_ep = endpoint(&p.veth.b_ip, PORT_B);
    let iface = format!("[Interface]\nPrivateKey = {}\nListenPort = {PORT_A}\n", a.private_key);
    let b_section =
        format!("[Peer]\nPublicKey = {b_pub}\nAllowedIPs = {}/32, {}/128\nEndpoint = {b_ep}\n", p.b_in4, p.b_in6);
    let write = |name: &str, text: &str| {
        let path = temp_file(&format!("{}-{name}", a.ifname), text);
        (path.to_str().expect("utf-8 path").to_string(), RemoveOnDrop(path))
    };

    // setconf: three peers.
    let conf1 = format!(
        "{iface}FwMark = 0x77\n\n{b_section}\n[Peer]\nPublicKey = {x_pub}\nAllowedIPs = 10.99.0.0/16\nEndpoint = 192.0.2.7:999\n\n\
         [Peer]\nPublicKey = {y_pub}\nAllowedIPs = fd99::/64\n"
    );
    let (f1, _g1) = write("conf1", &conf1);
    a.wg(&["setconf", &a.ifname, &f1]);
    let d = a.dump();
    assert_eq!(d.iface.fwmark, "0x77");
    assert_eq!(d.peers.len(), 3, "{d:#?}");
    assert_eq!(d.peer(&x_pub).endpoint, "192.0.2.7:999");
    assert_eq!(d.peer(&x_pub).allowed_ips, ["10.99.0.0/16"]);
    assert_eq!(d.peer(&y_pub).allowed_ips, ["fd99::/64"]);
    p.first_ping_from_a();
    let hs = a.dump().peer(&b_pub).latest_handshake;
    assert!(hs > 0);

    // syncconf: X removed, Y changed, Z added, B untouched; fwmark dropped from the file.
    let conf2 = format!(
        "{iface}\n{b_section}\n[Peer]\nPublicKey = {y_pub}\nAllowedIPs = fd98::/64, 10.98.0.0/24\nPersistentKeepalive = 15\n\n\
         [Peer]\nPublicKey = {z_pub}\nAllowedIPs = 10.97.0.0/16\n"
    );
    let (f2, _g2) = write("conf2", &conf2);
    a.wg(&["syncconf", &a.ifname, &f2]);
    let d = a.dump();
    let mut keys: Vec<&str> = d.peers.iter().map(|p| p.public_key.as_str()).collect();
    keys.sort();
    let mut want = vec![b_pub.as_str(), y_pub.as_str(), z_pub.as_str()];
    want.sort();
    assert_eq!(keys, want, "peers after syncconf");
    let mut y_ips = d.peer(&y_pub).allowed_ips.clone();
    y_ips.sort();
    assert_eq!(y_ips, ["10.98.0.0/24", "fd98::/64"]);
    assert_eq!(d.peer(&y_pub).keepalive, "15");
    assert_eq!(d.peer(&z_pub).allowed_ips, ["10.97.0.0/16"]);
    assert_eq!(d.iface.fwmark, "off", "syncconf without FwMark turns it off (as with wireguard-go)");
    // The unchanged peer keeps its session: no new handshake needed for traffic.
    support::ping_ok(&format!("{TEST}: after syncconf"), &p.a_ns, &p.b_in4, 3, &p.devs());
    let hs2 = a.dump().peer(&b_pub).latest_handshake;
    assert_eq!(hs2, hs, "syncconf with an unchanged peer restarted its session (handshake {hs} -> {hs2})");

    // addconf adds without removing.
    let (_, w_pub) = netns::wg_genkey();
    let (f3, _g3) = write("conf3", &format!("[Peer]\nPublicKey = {w_pub}\nAllowedIPs = 10.96.0.0/16\n"));
    a.wg(&["addconf", &a.ifname, &f3]);
    assert_eq!(a.dump().peers.len(), 4);

    // showconf -> setconf round trip keeps the configuration.
    let shown = a.wg(&["showconf", &a.ifname]);
    assert!(shown.contains(&format!("PrivateKey = {}", a.private_key)), "{shown}");
    let config_of = |d: Dump| {
        let mut peers: Vec<_> = d
            .peers
            .into_iter()
            .map(|mut p| {
                p.allowed_ips.sort();
                (p.public_key, p.preshared_key, p.endpoint, p.allowed_ips, p.keepalive)
            })
            .collect();
        peers.sort();
        (d.iface, peers)
    };
    let before = config_of(a.dump());
    let (f4, _g4) = write("shown", &shown);
    a.wg(&["setconf", &a.ifname, &f4]);
    let after = config_of(a.dump());
    assert_eq!(before, after, "showconf | setconf changed the configuration");
    // Traffic still flows after setconf (which replaces all peers).
    support::ping_ok(&format!("{TEST}: after showconf|setconf"), &p.a_ns, &p.b_in4, 3, &p.devs());
    eprintln!("{TEST}: setconf, syncconf (session kept, handshake {hs}), addconf and showconf round trip ok");
}
