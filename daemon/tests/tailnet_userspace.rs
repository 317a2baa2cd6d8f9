//! A userspace node (`wiremeshd node --userspace`: no TUN device) on a
//! tailnet with a TUN node, each in its own network namespace (root only;
//! skipped elsewhere, failing in CI): both directions of traffic, the SOCKS5
//! and HTTP proxies used by curl to fetch a page served on the TUN node by
//! name, and a tailnet port forwarded to a local service.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

use netns::Netns;
use std::os::fd::AsRawFd;
use std::time::Duration;
use tailnet::*;

/// Like `Lab::spawn_node`, for `wiremeshd node --userspace` with `extra`
/// flags, run as `nobody`: the userspace node needs no privilege at all.
fn spawn_userspace(lab: &mut Lab, name: &str, key: &str, extra: &[&str]) -> Node {
    let ns = Netns::new();
    let host = lab.next_host;
    lab.next_host += 1;
    let link = Lab::attach(&lab.hub, &ns, &lab.subnet.v4_cidr(host));
    let tun = netns::unique_ifname("wmu");
    let state = tmpdir(name);
    let socket = state.join("api.sock");
    let mut args = vec![
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        WIREMESHD,
        "node",
        "--control",
        &lab.url,
        "--auth-key",
        key,
        "--hostname",
        name,
        "--state",
        state.to_str().unwrap(),
        "--tun",
        &tun,
        "--socket",
        socket.to_str().unwrap(),
        "--userspace",
    ];
    args.extend_from_slice(extra);
    let mut child = ns.spawn(&args);
    let out = Output::attach(&mut child);
    Node { ns, _link: link, tun, state, socket, proc: Some(Proc { child, out }) }
}

#[test]
fn tailnet_userspace_node_talks_with_a_tun_node_and_proxies_by_name() {
    let test = "tailnet_userspace_node_talks_with_a_tun_node_and_proxies_by_name";
    if !netns::require_or_skip(test) {
        return;
    }
    if !netns::have_command("curl") {
        // Skips outside CI, fails in CI.
        netns::skip_or_fail(test, "curl is not installed");
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let beta = lab.spawn_node("beta", &key);
    let alpha = spawn_userspace(
        &mut lab,
        "alpha",
        &key,
        &["--socks5", "127.0.0.1:1055", "--http-proxy", "127.0.0.1:8080", "--forward", "tcp:8081=127.0.0.1:3000"],
    );
    let all = [&alpha, &beta];
    for n in all {
        wait_until(Duration::from_secs(20), "maps", || peer_count(n) == 1, || logs(&all));
    }
    // The userspace node made no TUN device, and runs as nobody.
    let links = alpha.ns.run_ok(&["ip", "-o", "link"]);
    assert!(!links.contains(&alpha.tun), "{links}");
    let pid = alpha.proc.as_ref().unwrap().child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
    assert!(uid.split_whitespace().skip(1).all(|u| u == "65534"), "{uid}");
    let _beta_web = WebServer::start(&beta.ns, "[::]:8000", "hello from beta", 0);
    let _alpha_app = WebServer::start(&alpha.ns, "127.0.0.1:3000", "alpha's local app", 0);
    let (alpha4, alpha6) = (alpha.ipv4(), alpha.ipv6());
    let (beta4, beta6) = (beta.ipv4(), beta.ipv6());

    // TUN -> userspace: smoltcp answers pings on the node's addresses.
    wait_until(Duration::from_secs(10), "beta pings alpha", || beta.ping(&alpha4), || logs(&all));
    assert!(beta.ping(&alpha6), "{}", logs(&all));

    // Userspace -> TUN through SOCKS5, by short and by full name, the name
    // resolved through the tailnet map (curl --socks5-hostname sends it as is).
    for url in ["http://beta:8000/page", "http://beta.wiremesh.internal:8000/full"] {
        let (ok, body, err) = curl(&alpha.ns, &["--socks5-hostname", "127.0.0.1:1055", url]);
        assert!(ok, "{url}: {err}\n{}", logs(&all));
        assert_eq!(body, format!("hello from beta {}\n", &url[url.rfind('/').unwrap()..]), "{url}");
    }
    // By address, both families.
    for url in [format!("http://{beta4}:8000/v4"), format!("http://[{beta6}]:8000/v6")] {
        let (ok, body, err) = curl(&alpha.ns, &["--socks5-hostname", "127.0.0.1:1055", &url]);
        assert!(ok && body.starts_with("hello from beta /v"), "{url}: {body} {err}");
    }
    // A name outside the tailnet is refused, not looked up elsewhere.
    let (ok, _, err) = curl(&alpha.ns, &["--socks5-hostname", "127.0.0.1:1055", "http://nowhere:8000/"]);
    assert!(!ok, "{err}");
    // A port nothing listens on: the proxy reports the refusal (SOCKS5
    // reply 5, "connection refused", which curl prints as "(5)").
    let (ok, _, err) = curl(&alpha.ns, &["--socks5-hostname", "127.0.0.1:1055", "http://beta:8009/"]);
    assert!(!ok && err.contains("(5)"), "{err}");

    // The HTTP proxy: an absolute URI forwarded, and a CONNECT tunnel.
    let (ok, body, err) = curl(&alpha.ns, &["--proxy", "http://127.0.0.1:8080", "http://beta:8000/plain"]);
    assert!(ok && body == "hello from beta /plain\n", "{body} {err}");
    let (ok, body, err) =
        curl(&alpha.ns, &["--proxy", "http://127.0.0.1:8080", "--proxytunnel", "http://beta:8000/tunnel"]);
    assert!(ok && body == "hello from beta /tunnel\n", "{body} {err}");
    // Errors are 4xx/5xx with the JSON error body.
    let (_, body, _) = curl(
        &alpha.ns,
        &["--proxy", "http://127.0.0.1:8080", "-w", "\n%{http_code}", "http://nowhere.wiremesh.internal/"],
    );
    let (json, code) = body.rsplit_once('\n').unwrap();
    assert_eq!(code, "502", "{body}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["code"], "unknown_host", "{v}");
    assert!(v["error"].as_str().unwrap().contains("nowhere"));

    // TUN -> userspace: alpha's tailnet port 8081 is its local app.
    for url in [format!("http://{alpha4}:8081/fwd4"), format!("http://[{alpha6}]:8081/fwd6")] {
        let (ok, body, err) = curl(&beta.ns, &[&url]);
        assert!(ok, "{url}: {err}\n{}", logs(&all));
        assert!(body.starts_with("alpha's local app /fwd"), "{body}");
    }
    // A tailnet port nothing serves on the userspace node is refused (RST).
    // curl's exit 7 ("couldn't connect") at once, not after its 10 s timeout.
    let t0 = std::time::Instant::now();
    let (ok, _, err) = curl(&beta.ns, &[&format!("http://{alpha4}:9999/")]);
    assert!(!ok && err.contains("(7)") && t0.elapsed() < Duration::from_secs(5), "{err}");

    // The status of the userspace node shows the session with beta.
    let st = alpha.status();
    let peer = &st["peers"][0];
    assert_eq!(peer["node"]["name"], "beta", "{st}");
    assert!(peer["rx_bytes"].as_u64().unwrap() > 0 && peer["tx_bytes"].as_u64().unwrap() > 0, "{st}");
}

/// What the embedded node saw, sent back to the test thread.
#[derive(Debug)]
struct Seen {
    /// The name and node key `node_of` gave for beta's connection.
    caller: Option<(String, String)>,
    /// The page fetched from beta through the embedded netstack.
    fetched: String,
    /// The node key `peer_of` gave for beta's address.
    beta_key: Option<String>,
}

#[test]
fn tailnet_embedded_node_joins_with_an_auth_key_and_knows_its_callers() {
    let test = "tailnet_embedded_node_joins_with_an_auth_key_and_knows_its_callers";
    if !netns::require_or_skip(test) {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let beta = lab.spawn_node("beta", &key);
    let _beta_web = WebServer::start(&beta.ns, "[::]:8000", "hello from beta", 0);
    // The embedded node lives in this test process, on a thread moved into
    // a namespace on the lab's bridge.
    let gamma_ns = Netns::new();
    let host = lab.next_host;
    lab.next_host += 1;
    let _gamma_link = Lab::attach(&lab.hub, &gamma_ns, &lab.subnet.v4_cidr(host));
    let state = tmpdir("gamma");
    let mut opts = wiremesh_daemon::node::userspace::join_options(
        lab.url.parse().unwrap(),
        Some(key.clone()),
        "gamma",
        state.clone(),
    );
    opts.tun = netns::unique_ifname("wme");
    let ns_path = format!("/run/netns/{}", gamma_ns.name());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let beta_v4: std::net::IpAddr = {
        wait_until(Duration::from_secs(20), "beta registered", || !beta.status()["self"].is_null(), || beta.log());
        beta.ipv4().parse().unwrap()
    };
    let worker = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns_path).unwrap();
        // SAFETY: setns on a namespace file we hold open; it moves only this
        // thread, and the runtime's threads are made here after it.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let node = wiremesh_daemon::node::userspace::join(opts).await.expect("join");
            let addrs = node.ready(Duration::from_secs(20)).await.expect("ready");
            let listener = node.netstack().listen_tcp(80).unwrap();
            addr_tx.send(addrs).unwrap();
            // A caller, known by the key its packets came with, named by the map.
            let (mut conn, from) = listener.accept().await.unwrap();
            let caller = node.node_of(from.ip()).map(|n| (n.name, n.node_key));
            let mut buf = vec![0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
            let body = format!("{caller:?}\n");
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            conn.write_all(resp.as_bytes()).await.unwrap();
            conn.shutdown().await.unwrap();
            // And out: a page from beta's web server over the netstack.
            let mut s = node.netstack().connect_tcp((beta_v4, 8000).into()).await.unwrap();
            s.write_all(b"GET /embedded HTTP/1.1\r\nhost: beta\r\n\r\n").await.unwrap();
            let mut fetched = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut fetched)).await.unwrap().unwrap();
            let beta_key =
                node.netstack().peer_of(beta_v4).map(|p| wiremesh_daemon::control::proto::b64_key(&p.public_key.0));
            let fetched = String::from_utf8_lossy(&fetched).into_owned();
            seen_tx.send(Seen { caller, fetched, beta_key }).unwrap();
            node.shutdown().await;
        });
    });
    let (gamma4, gamma6) = addr_rx.recv_timeout(Duration::from_secs(40)).expect("the embedded node joined");
    assert!(gamma4.is_ipv4() && gamma6.is_ipv6());
    // beta's map lists gamma, with the addresses the embedded node holds.
    wait_until(Duration::from_secs(20), "beta sees gamma", || peer_count(&beta) == 1, || beta.log());
    let st = beta.status();
    assert_eq!(st["peers"][0]["node"]["name"], "gamma", "{st}");
    assert_eq!(st["peers"][0]["node"]["ipv4"], gamma4.to_string(), "{st}");
    let beta_key = st["self"]["node_key"].as_str().unwrap().to_string();
    let (ok, body, err) = curl(&beta.ns, &[&format!("http://{gamma4}/")]);
    assert!(ok, "{err}\n{}", beta.log());
    let seen = seen_rx.recv_timeout(Duration::from_secs(30)).expect("the embedded node's report");
    worker.join().unwrap();
    assert_eq!(seen.caller, Some(("beta".to_string(), beta_key.clone())), "{body}");
    assert_eq!(body, format!("{:?}\n", seen.caller));
    assert_eq!(seen.beta_key.as_deref(), Some(beta_key.as_str()));
    assert!(seen.fetched.ends_with("hello from beta /embedded\n"), "{}", seen.fetched);
    let _ = std::fs::remove_dir_all(&state);
}
