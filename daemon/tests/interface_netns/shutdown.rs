//! Starting and stopping `wiremeshd interface`: SIGTERM/SIGINT clean up the
//! device and the socket, a taken name is refused (same or another
//! namespace, foreground or detached) without harming the first instance,
//! daemonizing returns once the interface is up, a stale socket is replaced,
//! a deleted link stops the daemon, `--config` is applied or refused, and
//! missing TUN or privilege are refused with a clear message.

use crate::netns::{self, Netns};
use crate::support::{self, kill, link_exists, socket_path, uapi_errno, uapi_raw, RemoveOnDrop, WgDev, Wiremeshd};
use core::time::Duration;
use std::process::Output;
use std::time::Instant;

/// Runs `wiremeshd <args…>` in `ns`, bounded by 15 s.
fn run_wiremeshd(ns: &Netns, args: &[&str]) -> Output {
    let mut full = vec![support::wiremeshd_bin()];
    full.extend_from_slice(args);
    ns.exec_timeout(&full, Duration::from_secs(15))
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The first instance still answers `get=1` and still has its device.
fn assert_still_serving(first: &mut Wiremeshd, ns: &Netns) {
    assert!(first.try_wait().is_none(), "the first instance exited:\n{}", first.log_text());
    let ans = uapi_raw(&first.ifname, "get=1\n\n").unwrap_or_else(|e| panic!("first instance's socket: {e}"));
    assert_eq!(uapi_errno(&ans), Some(0), "{ans:?}");
    assert!(ans.contains(&format!("listen_port={}", first.listen_port)), "{ans:?}");
    assert!(link_exists(ns, &first.ifname), "the first instance's device is gone");
}

fn signal_cleans_up(test: &str, signal: &str) {
    let _timer = support::Timer::new(test);
    if !support::require_tun_and_wg(test) {
        return;
    }
    let ns = Netns::new();
    let mut w = Wiremeshd::start(&ns, 42000);
    let (_, peer) = netns::wg_genkey();
    w.peer_add(&peer, "10.1.0.0/16", Some("192.0.2.1:51820"), Some(5));
    w.ip_up(&["10.0.0.1/24"]);
    assert!(socket_path(&w.ifname).exists() && link_exists(&ns, &w.ifname));
    let t = Instant::now();
    let status = w.signal_and_wait(signal, Duration::from_secs(5));
    let took = t.elapsed();
    let status = status.unwrap_or_else(|| panic!("wiremeshd still running 5 s after SIG{signal}:\n{}", w.log_text()));
    assert!(status.success(), "exit status after SIG{signal}: {status}\n{}", w.log_text());
    assert!(!socket_path(&w.ifname).exists(), "socket left behind after SIG{signal}");
    assert!(!link_exists(&ns, &w.ifname), "device left behind after SIG{signal}");
    eprintln!("{test}: SIG{signal} -> exit {status} after {took:?}; device and socket removed");
}

#[test]
fn sigterm_removes_device_and_socket() {
    signal_cleans_up("shutdown::sigterm_removes_device_and_socket", "TERM");
}

#[test]
fn sigint_removes_device_and_socket() {
    signal_cleans_up("shutdown::sigint_removes_device_and_socket", "INT");
}

/// A second `wiremeshd interface <same name> --foreground` in the same
/// namespace exits non-zero with a message naming the interface.
#[test]
fn second_instance_same_namespace_refuses() {
    const TEST: &str = "shutdown::second_instance_same_namespace_refuses";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    let ns = Netns::new();
    let mut first = Wiremeshd::start(&ns, 42001);
    for detached in [false, true] {
        let mut args = vec!["interface", first.ifname.as_str()];
        if !detached {
            args.push("--foreground");
        }
        let out = run_wiremeshd(&ns, &args);
        let err = stderr_of(&out);
        eprintln!(
            "{TEST}: second instance ({}) -> {}: {}",
            if detached { "detached" } else { "foreground" },
            out.status,
            err.trim()
        );
        assert!(!out.status.success(), "the second instance succeeded");
        assert!(err.contains(&first.ifname), "message does not name the interface: {err:?}");
        assert!(
            err.contains("already exists") || err.contains("in use"),
            "message does not say the name is taken: {err:?}"
        );
        assert_still_serving(&mut first, &ns);
    }
}

/// The same name in another namespace: the TUN device could be created
/// there, but the socket path is machine-wide, so the second instance must
/// refuse, remove what it created, and leave the first one's socket alone.
#[test]
fn second_instance_other_namespace_refuses_and_first_survives() {
    const TEST: &str = "shutdown::second_instance_other_namespace_refuses_and_first_survives";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    let ns = Netns::new();
    let ns2 = Netns::new();
    let mut first = Wiremeshd::start(&ns, 42002);
    for detached in [false, true] {
        let mut args = vec!["interface", first.ifname.as_str()];
        if !detached {
            args.push("--foreground");
        }
        let out = run_wiremeshd(&ns2, &args);
        let err = stderr_of(&out);
        eprintln!(
            "{TEST}: other namespace ({}) -> {}: {}",
            if detached { "detached" } else { "foreground" },
            out.status,
            err.trim()
        );
        assert!(!out.status.success(), "the second instance succeeded");
        assert!(err.contains(&first.ifname) && err.contains("in use"), "unclear message: {err:?}");
        assert!(!link_exists(&ns2, &first.ifname), "the refused instance left its device behind");
        assert!(ns2.pids().is_empty(), "the refused instance is still running: {:?}", ns2.pids());
        assert_still_serving(&mut first, &ns);
    }
}

/// Without --foreground the command returns 0 once the interface is up,
/// leaving a detached daemon (own session) that SIGTERM stops cleanly.
#[test]
fn detached_returns_zero_and_keeps_running() {
    const TEST: &str = "shutdown::detached_returns_zero_and_keeps_running";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    let ns = Netns::new();
    let ifname = netns::unique_ifname("wmd");
    let _sock = RemoveOnDrop(socket_path(&ifname));
    let t = Instant::now();
    let out = run_wiremeshd(&ns, &["interface", &ifname]);
    let took = t.elapsed();
    assert!(out.status.success(), "detached start failed: {}\n{}", out.status, support::output_text(&out));
    assert!(took < Duration::from_secs(10), "the parent took {took:?} to return");
    // Up when the parent returns, not some time later.
    assert!(link_exists(&ns, &ifname), "device missing right after the parent returned");
    let ans = uapi_raw(&ifname, "get=1\n\n").unwrap_or_else(|e| panic!("socket right after the parent returned: {e}"));
    assert_eq!(uapi_errno(&ans), Some(0));
    let pids = ns.pids();
    assert_eq!(pids.len(), 1, "expected one detached wiremeshd, found {pids:?}");
    let pid = pids[0];
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ");
    assert!(cmdline.contains("interface") && cmdline.contains(&ifname), "unexpected process: {cmdline:?}");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // fields[0] is the state; [3] the session id.
    assert_eq!(fields.get(3).copied(), Some(pid.to_string().as_str()), "daemon is not a session leader: {stat}");
    // Still working a while later, and configurable.
    std::thread::sleep(Duration::from_millis(500));
    assert!(support::process_alive(pid));
    let out = ns.exec(&["wg", "set", &ifname, "listen-port", "42003"]);
    assert!(out.status.success(), "{}", support::output_text(&out));
    eprintln!("{TEST}: parent returned 0 after {took:?}; daemon pid {pid} ({cmdline}) serving");
    kill("TERM", pid);
    let stopped = support::wait_until(Duration::from_secs(5), || !support::process_alive(pid));
    assert!(stopped, "detached daemon did not stop on SIGTERM");
    assert!(!socket_path(&ifname).exists(), "socket left after SIGTERM");
    assert!(!link_exists(&ns, &ifname), "device left after SIGTERM");
}

/// A socket file left behind by a killed instance (nobody listening) does
/// not block a new instance: like wireguard-go, it is replaced.
#[test]
fn stale_socket_is_replaced() {
    const TEST: &str = "shutdown::stale_socket_is_replaced";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    let ns = Netns::new();
    let ifname = netns::unique_ifname("wms");
    let path = socket_path(&ifname);
    let _ = std::fs::create_dir_all(netns::WG_SOCKET_DIR);
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind a soon-stale socket"));
    assert!(path.exists());
    let mut w = Wiremeshd::spawn(&ns, &ifname, &[]);
    if let Some(st) = w.wait_exit(Duration::from_secs(2)) {
        panic!("wiremeshd refused a stale socket (exit {st}):\n{}", w.log_text());
    }
    w.wait_ready();
    let ans = uapi_raw(&ifname, "get=1\n\n").expect("get");
    assert_eq!(uapi_errno(&ans), Some(0));
}

/// Deleting the link (what `wg-quick down` does) stops the daemon, which
/// removes its socket, as wireguard-go does.
#[test]
fn link_deleted_stops_daemon() {
    const TEST: &str = "shutdown::link_deleted_stops_daemon";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    let ns = Netns::new();
    let mut w = Wiremeshd::start(&ns, 42004);
    w.ip_up(&["10.0.0.1/24"]);
    ns.run_ok(&["ip", "link", "del", "dev", &w.ifname]);
    let status = w.wait_exit(Duration::from_secs(5));
    assert!(status.is_some(), "wiremeshd still running 5 s after its link was deleted:\n{}", w.log_text());
    let gone = support::wait_until(Duration::from_secs(2), || !socket_path(&w.ifname).exists());
    assert!(gone, "socket left after the link was deleted");
    eprintln!("{TEST}: exit {:?} after link deletion; socket removed", status);
}

/// `--config FILE` applies a `wg setconf` file at start; a bad file is
/// refused before anything is created, with a message naming file and line.
#[test]
fn config_file_applied_and_bad_config_refused() {
    const TEST: &str = "shutdown::config_file_applied_and_bad_config_refused";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    let ns = Netns::new();
    let (private, public) = netns::wg_genkey();
    let (_, peer) = netns::wg_genkey();
    let psk = netns::host_run_ok(&["wg", "genpsk"]).trim().to_string();
    let ifname = netns::unique_ifname("wmc");
    let conf = format!(
        "# a comment\n[Interface]\nPrivateKey = {private}\nListenPort = 42005\nFwMark = 0x42\n\n\
         [Peer]\nPublicKey = {peer}\nPresharedKey = {psk}\nAllowedIPs = 10.3.0.0/16, fd03::/64\n\
         Endpoint = 192.0.2.3:51820\nPersistentKeepalive = 21\n"
    );
    let path = support::temp_file(&format!("{ifname}.conf"), &conf);
    let _g = RemoveOnDrop(path.clone());
    let path_s = path.to_str().expect("utf-8 path");
    let mut w = Wiremeshd::spawn(&ns, &ifname, &["--config", path_s]);
    w.wait_ready();
    let d = w.dump();
    assert_eq!(d.iface.private_key, private);
    assert_eq!(d.iface.public_key, public);
    assert_eq!(d.iface.listen_port, 42005);
    assert_eq!(d.iface.fwmark, "0x42");
    assert_eq!(d.peers.len(), 1);
    let p = &d.peers[0];
    assert_eq!((p.public_key.as_str(), p.preshared_key.as_str()), (peer.as_str(), psk.as_str()));
    let mut ips = p.allowed_ips.clone();
    ips.sort();
    assert_eq!(ips, ["10.3.0.0/16", "fd03::/64"]);
    assert_eq!((p.endpoint.as_str(), p.keepalive.as_str()), ("192.0.2.3:51820", "21"));
    drop(w);

    for (name, bad) in [
        ("bad key", format!("[Interface]\nPrivateKey = {}\n", &private[..40])),
        ("unknown key", "[Interface]\nListenPort = 1\nColour = blue\n".to_string()),
        ("bad port", "[Interface]\nListenPort = 99999\n".to_string()),
    ] {
        let ifname = netns::unique_ifname("wmc");
        let path = support::temp_file(&format!("{ifname}.conf"), &bad);
        let _g = RemoveOnDrop(path.clone());
        let path_s = path.to_str().expect("utf-8 path");
        let out = run_wiremeshd(&ns, &["interface", &ifname, "--foreground", "--config", path_s]);
        let err = stderr_of(&out);
        eprintln!("{TEST}: {name}: {} {}", out.status, err.trim());
        assert!(!out.status.success(), "{name}: accepted");
        assert!(err.contains(path_s) && err.contains("line"), "{name}: message names neither file nor line: {err:?}");
        assert!(!link_exists(&ns, &ifname), "{name}: device created anyway");
        assert!(!socket_path(&ifname).exists(), "{name}: socket created anyway");
    }
}

/// Without CAP_NET_ADMIN (as `nobody`) wiremeshd refuses with a message
/// about permission, leaving nothing behind.
#[test]
fn unprivileged_refuses_with_message() {
    const TEST: &str = "shutdown::unprivileged_refuses_with_message";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    if !netns::have_command("setpriv") {
        netns::skip_or_fail(TEST, "setpriv (util-linux) not found");
        return;
    }
    let ns = Netns::new();
    // A copy `nobody` can execute whatever the target directory's permissions.
    let dir = std::env::temp_dir().join(format!("wiremesh-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let _g = RemoveOnDrop(dir.clone());
    let bin = dir.join("wiremeshd");
    std::fs::copy(support::wiremeshd_bin(), &bin).expect("copy wiremeshd");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let ifname = netns::unique_ifname("wmu");
    let bin_s = bin.to_str().expect("utf-8 path");
    let out = ns.exec_timeout(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            bin_s,
            "interface",
            &ifname,
            "--foreground",
        ],
        Duration::from_secs(15),
    );
    let err = stderr_of(&out);
    eprintln!("{TEST}: {} {}", out.status, err.trim());
    assert!(!out.status.success(), "wiremeshd ran without privilege");
    assert!(!err.contains("setpriv:"), "setpriv itself failed: {err}");
    let lower = err.to_lowercase();
    assert!(lower.contains("permi") || lower.contains("privilege"), "message does not mention permission: {err:?}");
    assert!(!link_exists(&ns, &ifname) && !socket_path(&ifname).exists(), "left something behind");
}

/// Without /dev/net/tun (hidden by an empty tmpfs in a private mount
/// namespace) wiremeshd refuses with a message about TUN.
#[test]
fn missing_tun_refuses_with_message() {
    const TEST: &str = "shutdown::missing_tun_refuses_with_message";
    let _timer = support::Timer::new(TEST);
    if !support::require_tun_and_wg(TEST) {
        return;
    }
    if !netns::have_command("unshare") {
        netns::skip_or_fail(TEST, "unshare (util-linux) not found");
        return;
    }
    let ns = Netns::new();
    let ifname = netns::unique_ifname("wmt");
    let script =
        format!("mount -t tmpfs tmpfs /dev/net && exec '{}' interface {ifname} --foreground", support::wiremeshd_bin());
    let out = ns.exec_timeout(
        &["unshare", "--mount", "--propagation", "private", "sh", "-c", &script],
        Duration::from_secs(15),
    );
    let err = stderr_of(&out);
    eprintln!("{TEST}: {} {}", out.status, err.trim());
    assert!(!out.status.success(), "wiremeshd ran without /dev/net/tun");
    assert!(err.contains("/dev/net/tun") || err.contains("TUN"), "message does not mention TUN: {err:?}");
    assert!(!socket_path(&ifname).exists(), "socket left behind");
}
