//! The real wg(8) against our configuration socket: `wg set`, `wg setconf`,
//! `wg show ... dump` and `wg showconf` must work as they do with
//! wireguard-go. Needs root (for /var/run/wireguard) and /usr/bin/wg
//! (Debian package wireguard-tools); skipped otherwise.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wiremesh_dataplane::uapi::{
    respond, serve_uapi, DeviceConfig, Limits, Request, Response, SetOp, UapiError, UapiSocket,
};

const WG: &str = "/usr/bin/wg";

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new(WG).exists() {
        eprintln!("skipping: needs root and {WG}");
        return false;
    }
    true
}

fn wg(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(WG)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wg");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn wg_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = wg(args, stdin);
    assert!(out.status.success(), "wg {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn base64_decode(s: &str) -> [u8; 32] {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.trim().bytes().take_while(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c).expect("base64") as u32;
        bits = bits << 6 | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
        }
    }
    out.try_into().expect("32 bytes")
}

struct Key {
    private: String,
    public: String,
}

fn genkey() -> Key {
    let private = wg_ok(&["genkey"], None).trim().to_string();
    let public = wg_ok(&["pubkey"], Some(&private)).trim().to_string();
    Key { private, public }
}

#[test]
fn wg_tool_configures_and_shows_our_socket() {
    if !usable() {
        return;
    }
    let name = format!("wmt{}", std::process::id() % 1_000_000);
    let socket = UapiSocket::bind(&name).expect("bind socket");
    let config = Arc::new(Mutex::new(DeviceConfig::default()));
    {
        let config = Arc::clone(&config);
        let listener = socket.try_clone_listener().unwrap();
        std::thread::spawn(move || {
            serve_uapi(listener, Limits::default(), move |request| {
                let mut config = config.lock().unwrap();
                // Pretend port 1 is taken, to see the errno reach wg.
                if let Request::Set(ops) = &request {
                    if ops.iter().any(|op| matches!(op, SetOp::ListenPort(1))) {
                        let e = std::io::Error::from(std::io::ErrorKind::AddrInUse);
                        return Response::set(Err(UapiError::PortInUse(e)));
                    }
                }
                respond(&mut config, request)
            })
        });
    }

    let dir = std::env::temp_dir().join(format!("{name}-keys"));
    std::fs::create_dir_all(&dir).unwrap();
    let device = genkey();
    let peer_a = genkey();
    let peer_b = genkey();
    let psk = wg_ok(&["genpsk"], None).trim().to_string();
    let key_file = dir.join("private");
    let psk_file = dir.join("psk");
    std::fs::write(&key_file, &device.private).unwrap();
    std::fs::write(&psk_file, &psk).unwrap();

    // wg lists us as an interface.
    let interfaces = wg_ok(&["show", "interfaces"], None);
    assert!(interfaces.split_whitespace().any(|i| i == name), "{interfaces}");

    wg_ok(
        &[
            "set",
            &name,
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            "51820",
            "fwmark",
            "0x1234",
            "peer",
            &peer_a.public,
            "preshared-key",
            psk_file.to_str().unwrap(),
            "endpoint",
            "192.0.2.1:51820",
            "persistent-keepalive",
            "25",
            "allowed-ips",
            "10.0.0.1/32,fd00::/64,10.1.2.3/24",
            "peer",
            &peer_b.public,
            "endpoint",
            "[2001:db8::1]:4000",
        ],
        None,
    );
    {
        let mut config = config.lock().unwrap();
        assert_eq!(config.private_key.as_ref().unwrap().to_bytes(), base64_decode(&device.private));
        assert_eq!(config.listen_port, 51820);
        assert_eq!(config.fwmark, 0x1234);
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.peers[0].public_key.0, base64_decode(&peer_a.public));
        assert_eq!(config.peers[0].preshared_key.to_bytes(), base64_decode(&psk));
        let stats = &mut config.peers[0].stats;
        stats.last_handshake = Duration::new(1_700_000_000, 5);
        stats.rx_bytes = 1111;
        stats.tx_bytes = 2222;
    }

    let dump = wg_ok(&["show", &name, "dump"], None);
    let lines: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 3, "{dump}");
    assert_eq!(lines[0], [&*device.private, &*device.public, "51820", "0x1234"]);
    let peer_line = |key: &str| lines.iter().find(|l| l[0] == key).expect("peer in dump").clone();
    assert_eq!(
        peer_line(&peer_a.public),
        [
            &*peer_a.public,
            &*psk,
            "192.0.2.1:51820",
            "10.0.0.1/32,fd00::/64,10.1.2.0/24",
            "1700000000",
            "1111",
            "2222",
            "25"
        ]
    );
    assert_eq!(
        peer_line(&peer_b.public),
        [&*peer_b.public, "(none)", "[2001:db8::1]:4000", "(none)", "0", "0", "0", "off"]
    );
    assert_eq!(wg_ok(&["show", &name, "public-key"], None).trim(), device.public);

    // allowed-ips replaces the list; remove drops the peer.
    wg_ok(
        &["set", &name, "peer", &peer_b.public, "allowed-ips", "10.1.2.0/24", "peer", &peer_a.public, "remove"],
        None,
    );
    let dump = wg_ok(&["show", &name, "dump"], None);
    let lines: Vec<&str> = dump.lines().collect();
    assert_eq!(lines.len(), 2, "{dump}");
    assert!(lines[1].contains("\t10.1.2.0/24\t"), "{dump}");

    // setconf replaces everything; showconf prints it back.
    let conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 4242\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.9.0.0/16\nEndpoint = 198.51.100.7:7\n",
        device.private, peer_a.public
    );
    let conf_file = dir.join("wg.conf");
    std::fs::write(&conf_file, &conf).unwrap();
    wg_ok(&["setconf", &name, conf_file.to_str().unwrap()], None);
    let showconf = wg_ok(&["showconf", &name], None);
    assert!(showconf.contains("ListenPort = 4242"), "{showconf}");
    assert!(showconf.contains(&format!("PublicKey = {}", peer_a.public)), "{showconf}");
    assert!(showconf.contains("AllowedIPs = 10.9.0.0/16"), "{showconf}");
    assert!(showconf.contains("Endpoint = 198.51.100.7:7"), "{showconf}");
    assert!(!showconf.contains(&peer_b.public), "{showconf}");
    assert_eq!(config.lock().unwrap().fwmark, 0, "setconf resets the fwmark");

    // A failing set reaches wg as its errno, and changes nothing.
    let out = wg(&["set", &name, "listen-port", "1"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert_eq!(config.lock().unwrap().listen_port, 4242);

    // A raw client: a bad line gets -EINVAL, and the connection goes on.
    let stream = UnixStream::connect(socket.path()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    (&stream).write_all(b"set=1\nlisten_port=9\nallowed_ip=10.0.0.0/8\n\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "errno=-22\n");
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "\n");
    (&stream).write_all(b"get=1\n\n").unwrap();
    let mut answer = String::new();
    while !answer.ends_with("errno=0\n\n") {
        assert!(reader.read_line(&mut answer).unwrap() > 0, "{answer}");
    }
    assert!(answer.contains("listen_port=4242\n"), "{answer}");

    drop(socket);
    assert!(!Path::new(&format!("/var/run/wireguard/{name}.sock")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}
