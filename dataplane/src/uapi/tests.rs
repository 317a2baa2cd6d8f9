//! Tests of the whole protocol: parsing, applying, answering, reading.

use std::io::{self, Cursor, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use wiremesh_core::keys::{PrivateKey, PublicKey};

use super::*;

fn hex(bytes: &[u8; 32]) -> String {
    let mut s = String::new();
    super::text::push_hex(&mut s, bytes);
    s
}

/// A private key whose clamping is a no-op, and its public key.
fn device_key() -> (String, PublicKey) {
    let mut bytes = [0x42u8; 32];
    bytes[0] &= 248;
    bytes[31] = (bytes[31] & 127) | 64;
    let public = PrivateKey::from_bytes(bytes).public_key();
    (hex(&bytes), public)
}

fn peer_key(n: u8) -> PublicKey {
    PublicKey([n; 32])
}

fn set(config: &mut DeviceConfig, body: &str) -> Result<(), UapiError> {
    let ops = parse_set(body)?;
    config.apply(&ops)
}

fn get(config: &DeviceConfig) -> String {
    let mut out = String::new();
    config.write_get(&mut out);
    out
}

fn ips(peer: &PeerConfig) -> Vec<String> {
    peer.allowed_ips.iter().map(ToString::to_string).collect()
}

fn err(config: &mut DeviceConfig, body: &str) -> UapiError {
    let before = config.clone();
    let e = set(config, body).expect_err(body);
    assert_eq!(*config, before, "a failed set must change nothing: {body:?}");
    e
}

#[test]
fn every_key_parses() {
    let (sk, _) = device_key();
    let pk = hex(&[7; 32]);
    let psk = hex(&[9; 32]);
    let body = format!(
        "private_key={sk}\nlisten_port=51820\nfwmark=1234\nreplace_peers=true\n\
         public_key={pk}\nupdate_only=true\npreshared_key={psk}\nendpoint=[::1]:51820\n\
         persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.0.0.0/8\n\
         protocol_version=1\nremove=true\n\nignored after the blank line"
    );
    let ops = parse_set(&body).unwrap();
    let keys: Vec<Key> = ops.iter().map(SetOp::key).collect();
    assert_eq!(
        keys,
        [
            Key::PrivateKey,
            Key::ListenPort,
            Key::Fwmark,
            Key::ReplacePeers,
            Key::PublicKey,
            Key::UpdateOnly,
            Key::PresharedKey,
            Key::Endpoint,
            Key::PersistentKeepaliveInterval,
            Key::ReplaceAllowedIps,
            Key::AllowedIp,
            Key::ProtocolVersion,
            Key::Remove,
        ]
    );
    assert!(matches!(ops[1], SetOp::ListenPort(51820)));
    assert!(matches!(ops[2], SetOp::Fwmark(1234)));
    assert!(matches!(ops[4], SetOp::Peer(k) if k == peer_key(7)));
    assert!(matches!(&ops[6], SetOp::PresharedKey(k) if k.to_bytes() == [9; 32]));
    let endpoint: SocketAddr = "[::1]:51820".parse().unwrap();
    assert!(matches!(ops[7], SetOp::Endpoint(e) if e == endpoint));
    assert!(matches!(ops[8], SetOp::PersistentKeepaliveInterval(25)));
    assert!(matches!(ops[10], SetOp::AllowedIp(ip) if ip.to_string() == "10.0.0.0/8"));
    for key in keys {
        assert_eq!(key.to_string(), key.as_str());
    }
}

#[test]
fn crlf_and_keys_in_upper_case_are_accepted() {
    let mut config = DeviceConfig::default();
    let pk = hex(&[0xab; 32]).to_uppercase();
    set(&mut config, &format!("listen_port=1\r\npublic_key={pk}\r\n\r\n")).unwrap();
    assert_eq!(config.listen_port, 1);
    assert_eq!(config.peers[0].public_key, peer_key(0xab));
}

#[test]
fn configure_and_get_in_wireguard_go_order() {
    let (sk, _) = device_key();
    let mut config = DeviceConfig::default();
    let body = format!(
        "private_key={sk}\nlisten_port=51820\nfwmark=7\n\
         public_key={}\npreshared_key={}\nendpoint=192.0.2.1:51820\n\
         persistent_keepalive_interval=25\nallowed_ip=10.0.0.1/32\nallowed_ip=fd00::/64\n\
         public_key={}\nallowed_ip=10.0.1.0/24\n",
        hex(&[1; 32]),
        hex(&[2; 32]),
        hex(&[3; 32]),
    );
    set(&mut config, &body).unwrap();
    config.peers[0].stats =
        PeerStats { last_handshake: Duration::new(1_700_000_000, 123_456_789), rx_bytes: 1000, tx_bytes: 2000 };
    let expected = format!(
        "private_key={sk}\nlisten_port=51820\nfwmark=7\n\
         public_key={}\npreshared_key={}\nprotocol_version=1\nendpoint=192.0.2.1:51820\n\
         last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=123456789\n\
         tx_bytes=2000\nrx_bytes=1000\npersistent_keepalive_interval=25\n\
         allowed_ip=10.0.0.1/32\nallowed_ip=fd00::/64\n\
         public_key={}\npreshared_key={}\nprotocol_version=1\n\
         last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
         tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\nallowed_ip=10.0.1.0/24\n",
        hex(&[1; 32]),
        hex(&[2; 32]),
        hex(&[3; 32]),
        hex(&[0; 32]),
    );
    assert_eq!(get(&config), expected);
    assert_eq!(Response::get(&config).as_bytes(), format!("{expected}errno=0\n\n").as_bytes());

    // Counters survive a later set that touches the peer.
    set(&mut config, &format!("public_key={}\nendpoint=[2001:db8::1]:1\n", hex(&[1; 32]))).unwrap();
    assert_eq!(config.peers[0].stats.rx_bytes, 1000);
    assert_eq!(config.peers[0].endpoint, Some("[2001:db8::1]:1".parse().unwrap()));

    // An empty device prints nothing at all.
    assert_eq!(get(&DeviceConfig::default()), "");
}

#[test]
fn zero_values_are_not_printed_and_zero_key_removes() {
    let (sk, _) = device_key();
    let mut config = DeviceConfig::default();
    set(&mut config, &format!("private_key={sk}\nlisten_port=5\nfwmark=9\n")).unwrap();
    assert!(config.private_key.is_some());
    set(&mut config, &format!("private_key={}\nlisten_port=0\nfwmark=0\n", hex(&[0; 32]))).unwrap();
    assert!(config.private_key.is_none());
    assert_eq!((config.listen_port, config.fwmark), (0, 0));
    assert_eq!(get(&config), "");
}

#[test]
fn private_key_is_clamped() {
    let mut config = DeviceConfig::default();
    set(&mut config, &format!("private_key={}\n", hex(&[0xff; 32]))).unwrap();
    let mut clamped = [0xff; 32];
    clamped[0] = 0xf8;
    clamped[31] = 0x7f;
    assert_eq!(config.private_key.as_ref().unwrap().to_bytes(), clamped);
    assert_eq!(get(&config), format!("private_key={}\n", hex(&clamped)));
}

#[test]
fn own_public_key_is_ignored_and_removed() {
    let (sk, own) = device_key();
    let mut config = DeviceConfig::default();
    // Before the device has a key, a peer with that public key is an ordinary peer.
    set(&mut config, &format!("public_key={}\nallowed_ip=10.0.0.1/32\n", hex(&own.0))).unwrap();
    assert_eq!(config.peers.len(), 1);
    // Setting the private key removes it, with its allowed IPs.
    set(&mut config, &format!("private_key={sk}\n")).unwrap();
    assert!(config.peers.is_empty());
    // And a section for our own key is checked but ignored.
    set(
        &mut config,
        &format!(
            "public_key={}\nallowed_ip=10.0.0.1/32\nendpoint=1.2.3.4:5\npublic_key={}\nallowed_ip=10.0.0.2/32\n",
            hex(&own.0),
            hex(&[5; 32])
        ),
    )
    .unwrap();
    assert_eq!(config.peers.len(), 1);
    assert_eq!(config.peers[0].public_key, peer_key(5));
    let e = err(&mut config, &format!("public_key={}\nallowed_ip=10.0.0.1\n", hex(&own.0)));
    assert!(matches!(e, UapiError::InvalidValue { line: 2, key: Key::AllowedIp, .. }));
}

#[test]
fn replace_peers_and_remove() {
    let mut config = DeviceConfig::default();
    let body: String = (1..=3).map(|n| format!("public_key={}\n", hex(&[n; 32]))).collect();
    set(&mut config, &body).unwrap();
    assert_eq!(config.peers.len(), 3);

    set(&mut config, &format!("public_key={}\nremove=true\nallowed_ip=10.0.0.0/8\n", hex(&[2; 32]))).unwrap();
    let keys: Vec<_> = config.peers.iter().map(|p| p.public_key).collect();
    assert_eq!(keys, [peer_key(1), peer_key(3)]);

    // Removing a peer that does not exist creates nothing.
    set(&mut config, &format!("public_key={}\nremove=true\n", hex(&[9; 32]))).unwrap();
    assert_eq!(config.peers.len(), 2);

    set(&mut config, &format!("replace_peers=true\npublic_key={}\n", hex(&[4; 32]))).unwrap();
    let keys: Vec<_> = config.peers.iter().map(|p| p.public_key).collect();
    assert_eq!(keys, [peer_key(4)]);

    // A peer removed and added again in one request starts afresh at the end.
    config.peers[0].stats.rx_bytes = 5;
    set(
        &mut config,
        &format!(
            "public_key={}\npublic_key={}\nremove=true\npublic_key={}\n",
            hex(&[5; 32]),
            hex(&[4; 32]),
            hex(&[4; 32])
        ),
    )
    .unwrap();
    let keys: Vec<_> = config.peers.iter().map(|p| p.public_key).collect();
    assert_eq!(keys, [peer_key(5), peer_key(4)]);
    assert_eq!(config.peers[1].stats.rx_bytes, 0);
}

#[test]
fn update_only() {
    let mut config = DeviceConfig::default();
    set(&mut config, &format!("public_key={}\nupdate_only=true\nallowed_ip=10.0.0.0/8\n", hex(&[1; 32]))).unwrap();
    assert!(config.peers.is_empty(), "update_only must not create a peer");

    set(&mut config, &format!("public_key={}\n", hex(&[1; 32]))).unwrap();
    set(&mut config, &format!("public_key={}\nupdate_only=true\npersistent_keepalive_interval=5\n", hex(&[1; 32])))
        .unwrap();
    assert_eq!(config.peers[0].persistent_keepalive_interval, 5);

    // update_only after lines that already took a prefix from another peer:
    // the new peer goes, and the prefix with it (as in wireguard-go).
    set(&mut config, &format!("public_key={}\nallowed_ip=10.9.0.0/16\n", hex(&[1; 32]))).unwrap();
    set(&mut config, &format!("public_key={}\nallowed_ip=10.9.0.0/16\nupdate_only=true\n", hex(&[2; 32]))).unwrap();
    assert_eq!(config.peers.len(), 1);
    assert!(config.peers[0].allowed_ips.is_empty());
}

#[test]
fn allowed_ips_are_unique_masked_and_ordered() {
    let mut config = DeviceConfig::default();
    set(
        &mut config,
        &format!(
            "public_key={}\nallowed_ip=10.0.0.7/24\nallowed_ip=10.1.0.0/16\nallowed_ip=::/0\n\
             public_key={}\nallowed_ip=10.1.0.0/16\n",
            hex(&[1; 32]),
            hex(&[2; 32])
        ),
    )
    .unwrap();
    assert_eq!(ips(&config.peers[0]), ["10.0.0.0/24", "::/0"]);
    assert_eq!(ips(&config.peers[1]), ["10.1.0.0/16"]);

    // Re-adding moves a prefix to the end of the list; a duplicate is not doubled.
    set(&mut config, &format!("public_key={}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.0.0.1/24\n", hex(&[1; 32])))
        .unwrap();
    assert_eq!(ips(&config.peers[0]), ["::/0", "10.0.0.0/24"]);

    set(&mut config, &format!("public_key={}\nreplace_allowed_ips=true\nallowed_ip=192.168.0.0/16\n", hex(&[1; 32])))
        .unwrap();
    assert_eq!(ips(&config.peers[0]), ["192.168.0.0/16"]);
    // A prefix freed by replace_allowed_ips can go to another peer.
    set(&mut config, &format!("public_key={}\nallowed_ip=::/0\n", hex(&[2; 32]))).unwrap();
    assert_eq!(ips(&config.peers[1]), ["10.1.0.0/16", "::/0"]);
}

#[test]
fn bad_lines_fail_with_wireguard_go_errno() {
    let mut config = DeviceConfig::default();
    let (sk, _) = device_key();
    set(
        &mut config,
        &format!("private_key={sk}\nlisten_port=1\npublic_key={}\nallowed_ip=10.0.0.0/8\n", hex(&[1; 32])),
    )
    .unwrap();
    let pk = hex(&[1; 32]);
    let device = |line: &str| line.to_string();
    let peer = |line: &str| format!("public_key={pk}\n{line}");
    let cases: Vec<(String, i64)> = vec![
        (device("listen_port"), errno::PROTOCOL),
        (device("nonsense"), errno::PROTOCOL),
        (peer("endpoint"), errno::PROTOCOL),
        (device("foo=bar"), errno::INVALID),
        (device("Private_key=00"), errno::INVALID),
        (device("private_key=00"), errno::INVALID),
        (device(&format!("private_key={}", &sk[..63])), errno::INVALID),
        (device(&format!("private_key={sk}0")), errno::INVALID),
        (device(&format!("private_key=x{}", &sk[1..])), errno::INVALID),
        (device(&format!("private_key= {}", &sk[1..])), errno::INVALID),
        (device("private_key="), errno::INVALID),
        (device("listen_port=65536"), errno::INVALID),
        (device("listen_port=-1"), errno::INVALID),
        (device("listen_port="), errno::INVALID),
        (device("listen_port=5x"), errno::INVALID),
        (device("fwmark=4294967296"), errno::INVALID),
        (device("fwmark=off"), errno::INVALID),
        (device("replace_peers=false"), errno::INVALID),
        (device("replace_peers=True"), errno::INVALID),
        // Peer keys in the device section.
        (device("endpoint=1.2.3.4:5"), errno::INVALID),
        (device("allowed_ip=10.0.0.0/8"), errno::INVALID),
        (device("remove=true"), errno::INVALID),
        (device("protocol_version=1"), errno::INVALID),
        (device("public_key=00"), errno::INVALID),
        (device(&format!("public_key={}", &pk[..62])), errno::INVALID),
        // Device keys in a peer section.
        (peer(&format!("private_key={sk}")), errno::INVALID),
        (peer("listen_port=1"), errno::INVALID),
        (peer("fwmark=1"), errno::INVALID),
        (peer("replace_peers=true"), errno::INVALID),
        (peer("bogus=1"), errno::INVALID),
        (peer("remove=false"), errno::INVALID),
        (peer("update_only=1"), errno::INVALID),
        (peer("preshared_key=1234"), errno::INVALID),
        (peer(&format!("preshared_key={}", "z".repeat(64))), errno::INVALID),
        (peer("endpoint=example.com:51820"), errno::INVALID),
        (peer("endpoint=::1:51820"), errno::INVALID),
        (peer("endpoint=1.2.3.4"), errno::INVALID),
        (peer("endpoint=1.2.3.4:99999"), errno::INVALID),
        (peer("endpoint="), errno::INVALID),
        (peer("persistent_keepalive_interval=65536"), errno::INVALID),
        (peer("persistent_keepalive_interval=off"), errno::INVALID),
        (peer("replace_allowed_ips=yes"), errno::INVALID),
        (peer("allowed_ip=10.0.0.1"), errno::INVALID),
        (peer("allowed_ip=10.0.0.1/33"), errno::INVALID),
        (peer("allowed_ip=fd00::/129"), errno::INVALID),
        (peer("allowed_ip=10.0.0.1/08"), errno::INVALID),
        (peer("allowed_ip=host/32"), errno::INVALID),
        (peer("allowed_ip="), errno::INVALID),
        (peer("protocol_version=2"), errno::INVALID),
        (peer("protocol_version=0"), errno::INVALID),
        (peer("protocol_version=01"), errno::INVALID),
        (peer("protocol_version="), errno::INVALID),
    ];
    for (body, expected) in cases {
        // Put valid changes before the bad line: none of them may stick.
        let body = format!("listen_port=2\nreplace_peers=true\n{body}\n");
        let e = err(&mut config, &body);
        assert_eq!(e.errno(), expected, "{body:?}: {e}");
        assert!(!e.to_string().is_empty());
    }
    assert_eq!(errno::INVALID, -22);
    assert_eq!(errno::PROTOCOL, -71);
    assert_eq!(errno::IO, -5);
    assert_eq!(errno::PORT_IN_USE, -98);
    assert_eq!(errno::UNKNOWN, -55);
}

#[test]
fn errors_name_the_line_and_never_echo_values() {
    let mut config = DeviceConfig::default();
    let secretish = "ab".repeat(31);
    let e = err(&mut config, &format!("listen_port=1\nprivate_key={secretish}\n"));
    assert!(matches!(e, UapiError::InvalidValue { line: 2, key: Key::PrivateKey, .. }));
    assert!(!e.to_string().contains(&secretish));
    let e = err(&mut config, &format!("public_key={}\nprivate_key=00\n", hex(&[1; 32])));
    assert!(matches!(&e, UapiError::UnknownPeerKey { line: 2, key } if key == "private_key"));
    let long_key = "k".repeat(1000);
    let e = err(&mut config, &format!("{long_key}=1\n"));
    assert!(matches!(&e, UapiError::UnknownDeviceKey { line: 1, key } if key.len() == 64));
}

#[test]
fn a_failed_set_changes_nothing() {
    let (sk, _) = device_key();
    let mut config = DeviceConfig::default();
    set(
        &mut config,
        &format!("private_key={sk}\nlisten_port=51820\npublic_key={}\nallowed_ip=10.0.0.0/8\n", hex(&[1; 32])),
    )
    .unwrap();
    config.peers[0].stats.tx_bytes = 77;
    let before = get(&config);
    // Every kind of change, then a bad line at the very end.
    let body = format!(
        "private_key={}\nlisten_port=1\nfwmark=1\nreplace_peers=true\npublic_key={}\n\
         allowed_ip=10.0.0.0/8\npublic_key={}\nremove=true\nallowed_ip=10.0.0.0/33\n",
        hex(&[0; 32]),
        hex(&[2; 32]),
        hex(&[1; 32])
    );
    err(&mut config, &body);
    assert_eq!(get(&config), before);
    assert_eq!(config.peers[0].stats.tx_bytes, 77);
}

#[test]
fn too_many_peers() {
    let mut config = DeviceConfig::default();
    let ops: Vec<SetOp> = (0..MAX_PEERS as u32)
        .map(|n| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&n.to_le_bytes());
            SetOp::Peer(PublicKey(key))
        })
        .collect();
    config.apply(&ops).unwrap();
    assert_eq!(config.peers.len(), MAX_PEERS);
    let before = config.clone();
    let e = set(&mut config, &format!("listen_port=9\npublic_key={}\n", hex(&[0xff; 32]))).unwrap_err();
    assert!(matches!(e, UapiError::TooManyPeers { line: 2 }));
    assert_eq!(e.errno(), errno::INVALID);
    assert!(config == before);
    // Removing one makes room within the same request.
    set(&mut config, &format!("public_key={}\nremove=true\npublic_key={}\n", hex(&[0; 32]), hex(&[0xff; 32]))).unwrap();
    assert_eq!(config.peers.len(), MAX_PEERS);
}

#[test]
fn hand_built_ops_need_a_peer() {
    let mut config = DeviceConfig::default();
    let e = config.apply(&[SetOp::ListenPort(3), SetOp::Remove]).unwrap_err();
    assert!(matches!(e, UapiError::NoPeerSelected { line: 2, key: Key::Remove }));
    assert_eq!(config.listen_port, 0);
}

// ---- reading requests ----

fn read(input: &str) -> Result<Option<Request>, ReadError> {
    read_request(&mut Cursor::new(input.as_bytes()), &Limits::default())
}

#[test]
fn reads_get_and_set() {
    assert!(matches!(read("get=1\n\n"), Ok(Some(Request::Get))));
    assert!(matches!(read(""), Ok(None)));
    let Ok(Some(Request::Set(ops))) = read("set=1\nlisten_port=3\nfwmark=4\n\n") else {
        panic!("set not read");
    };
    assert_eq!(ops.len(), 2);
    // The stream may end without the empty line (wireguard-go accepts it),
    // even in the middle of the last line.
    let Ok(Some(Request::Set(ops))) = read("set=1\nlisten_port=3\nfwmark=4") else {
        panic!("set at EOF not read");
    };
    assert_eq!(ops.len(), 2);
    let Ok(Some(Request::Set(ops))) = read("set=1\n\n") else {
        panic!("empty set not read");
    };
    assert!(ops.is_empty());
}

#[test]
fn unknown_operations_hang_up() {
    for input in [
        "get=2\n\n",
        "set=1\r\nlisten_port=1\n\n",
        "GET=1\n\n",
        "get=1",
        "get=1\n",
        "hello\n",
        "set=1",
        &"x".repeat(100_000),
    ] {
        assert!(matches!(read(input), Err(ReadError::Hangup)), "{input:?}");
    }
}

#[test]
fn get_needs_an_empty_line() {
    let e = read("get=1\nx\n").unwrap_err();
    assert!(matches!(e, ReadError::Invalid { error: UapiError::TrailingGetData, in_sync: false }));
}

#[test]
fn invalid_set_is_read_to_its_end() {
    let mut input = Cursor::new(&b"set=1\nlisten_port=x\nfwmark=1\nfoo\n\nget=1\n\n"[..]);
    let limits = Limits::default();
    match read_request(&mut input, &limits) {
        Err(ReadError::Invalid { error, in_sync: true }) => {
            assert!(matches!(error, UapiError::InvalidValue { line: 1, key: Key::ListenPort, .. }));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(read_request(&mut input, &limits), Ok(Some(Request::Get))));
    assert!(matches!(read_request(&mut input, &limits), Ok(None)));
}

#[test]
fn limits_bound_memory() {
    let limits = Limits { max_line: 100, max_request: 1000 };
    let long_line = format!("set=1\nlisten_port=1\nendpoint={}\n\n", "1".repeat(200));
    match read_request(&mut Cursor::new(long_line.as_bytes()), &limits) {
        Err(ReadError::Invalid { error, in_sync: false }) => {
            assert!(matches!(error, UapiError::LineTooLong { line: 2, limit: 100 }));
            assert_eq!(error.errno(), errno::IO);
        }
        other => panic!("unexpected {other:?}"),
    }
    let many_lines = format!("set=1\n{}\n", "listen_port=1\n".repeat(100));
    match read_request(&mut Cursor::new(many_lines.as_bytes()), &limits) {
        Err(ReadError::Invalid { error, in_sync: false }) => {
            assert!(matches!(error, UapiError::RequestTooLong { limit: 1000 }));
            assert_eq!(error.errno(), errno::IO);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn non_utf8_is_invalid_not_a_panic() {
    let mut input = Cursor::new(&b"set=1\nlisten_port=\xff\xfe\n\xc3=1\n\n"[..]);
    match read_request(&mut input, &Limits::default()) {
        Err(ReadError::Invalid { error, in_sync: true }) => assert_eq!(error.errno(), errno::INVALID),
        other => panic!("unexpected {other:?}"),
    }
}

/// An in-memory connection: reads from `input`, records what is written.
struct Conn {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Dribble a few bytes at a time to exercise line reassembly.
        let n = buf.len().min(3);
        self.input.read(&mut buf[..n])
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn converse(config: &mut DeviceConfig, input: &str) -> String {
    let mut conn = Conn { input: Cursor::new(input.as_bytes().to_vec()), output: Vec::new() };
    handle_connection(&mut conn, &Limits::default(), |request| respond(config, request)).unwrap();
    String::from_utf8(conn.output).unwrap()
}

#[test]
fn a_conversation() {
    let mut config = DeviceConfig::default();
    let pk = hex(&[1; 32]);
    let input = format!(
        "set=1\nlisten_port=51820\npublic_key={pk}\nallowed_ip=10.0.0.1/32\n\n\
         set=1\nlisten_port=1\nbogus=1\n\n\
         set=1\nlisten_port\n\n\
         get=1\n\n\
         bye\nget=1\n\n"
    );
    let output = converse(&mut config, &input);
    let expected = format!(
        "errno=0\n\nerrno=-22\n\nerrno=-71\n\n\
         listen_port=51820\npublic_key={pk}\npreshared_key={}\nprotocol_version=1\n\
         last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
         persistent_keepalive_interval=0\nallowed_ip=10.0.0.1/32\nerrno=0\n\n",
        hex(&[0; 32])
    );
    assert_eq!(output, expected);
    assert_eq!(config.listen_port, 51820);

    // A line past the limit is answered with -EIO and ends the connection.
    let input = format!("set=1\nlisten_port={}\n\nget=1\n\n", "1".repeat(5000));
    assert_eq!(converse(&mut config, &input), "errno=-5\n\n");
}

#[test]
fn response_texts() {
    assert_eq!(Response::set(Ok(())).as_bytes(), b"errno=0\n\n");
    assert_eq!(Response::errno(errno::PORT_IN_USE).as_bytes(), b"errno=-98\n\n");
    let e = UapiError::PortInUse(io::Error::from(io::ErrorKind::AddrInUse));
    assert_eq!(Response::set(Err(e)).as_bytes(), b"errno=-98\n\n");
    assert_eq!(format!("{:?}", Response::errno(0)), "Response(<redacted>)");
}

#[test]
fn debug_output_has_no_secrets() {
    let (sk, _) = device_key();
    let mut config = DeviceConfig::default();
    set(&mut config, &format!("private_key={sk}\npublic_key={}\npreshared_key={}\n", hex(&[1; 32]), hex(&[0x5a; 32])))
        .unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("5a, 5a") && !debug.contains("90, 90") && !debug.contains("66, 66"));
    assert!(debug.contains("redacted"));
}

#[test]
fn socket_paths() {
    assert_eq!(socket_path("wg0").unwrap(), std::path::Path::new("/var/run/wireguard/wg0.sock"));
    for bad in ["", "a/b", "..", ".", "0123456789abcdef", "a b", "a:b"] {
        assert!(socket_path(bad).is_err(), "{bad:?}");
    }
    assert!(socket_path("0123456789abcde").is_ok());
}
