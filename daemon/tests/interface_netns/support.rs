//! Helpers for the `wiremeshd interface` network-namespace tests: a
//! `wiremeshd` process in a namespace, one trait over it and wireguard-go,
//! `wg show … dump` parsing, raw UAPI requests and a verified TCP transfer
//! between two namespaces (run from threads that `setns` into them).
#![allow(dead_code)]

use crate::netns::{self, run_timeout, Netns, WgGoVersion, WireguardGo, COMMAND_TIMEOUT, WG_SOCKET_DIR};
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::Instant;

/// Path of the `wiremeshd` binary built for these tests.
pub fn wiremeshd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_wiremeshd")
}

/// `true` when namespace tests with TUN and `wg` can run; otherwise skips
/// (outside CI) or panics (in CI).
pub fn require_tun_and_wg(test: &str) -> bool {
    if !netns::require_or_skip(test) {
        return false;
    }
    if !netns::have_command("wg") {
        return netns::skip_or_fail(test, "`wg` (wireguard-tools) not found; run ci/install-deps.sh");
    }
    if !Path::new("/dev/net/tun").exists() {
        return netns::skip_or_fail(test, "/dev/net/tun does not exist");
    }
    true
}

/// Like [`require_tun_and_wg`] and also needs wireguard-go `version`.
pub fn require_wg_go(test: &str, version: WgGoVersion) -> bool {
    require_tun_and_wg(test) && netns::require_wireguard_go_or_skip(test, version).is_some()
}

/// Prints how long a test took when dropped (also when it fails).
pub struct Timer {
    test: String,
    start: Instant,
}

impl Timer {
    pub fn new(test: &str) -> Timer {
        Timer { test: test.to_string(), start: Instant::now() }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() { "FAILED" } else { "ok" };
        eprintln!("TIME {} {outcome} {:.1} s", self.test, self.start.elapsed().as_secs_f64());
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ip:port`, with brackets for IPv6.
pub fn endpoint(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Text of a command's stdout and stderr.
pub fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs `args` in the namespace called `ns_name`, bounded by [`COMMAND_TIMEOUT`].
pub fn ns_exec(ns_name: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns_name]).args(args);
    run_timeout(&mut cmd, COMMAND_TIMEOUT).unwrap_or_else(|e| panic!("[{ns_name}] {e}"))
}

/// Whether link `ifname` exists in namespace `ns`.
pub fn link_exists(ns: &Netns, ifname: &str) -> bool {
    ns.exec(&["ip", "link", "show", "dev", ifname]).status.success()
}

/// `/var/run/wireguard/<ifname>.sock`
pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new(WG_SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// Whether process `pid` exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat.rsplit(')').next().and_then(|s| s.split_whitespace().next()).unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Sends `signal` (e.g. "TERM") to `pid` with kill(1).
pub fn kill(signal: &str, pid: u32) {
    let sig = format!("-{signal}");
    let pid = pid.to_string();
    let _ = run_timeout(Command::new("kill").args([sig.as_str(), pid.as_str()]), COMMAND_TIMEOUT);
}

/// Writes `contents` to a fresh mode-0600 file in the temp directory.
pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let p = std::env::temp_dir().join(format!("wiremesh-test-{}-{name}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .expect("create temp file");
    f.write_all(contents.as_bytes()).expect("write temp file");
    p
}

/// Removes a path when dropped.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------
// One trait over wiremeshd and wireguard-go
// ---------------------------------------------------------------------------

/// A userspace WireGuard interface in a namespace, configured with wg(8).
/// Method names differ from [`WireguardGo`]'s inherent ones on purpose.
pub trait WgDev {
    fn ifname(&self) -> &str;
    fn ns_name(&self) -> &str;
    fn public_key(&self) -> &str;
    fn private_key(&self) -> &str;
    fn port(&self) -> u16;
    /// What the implementation logged so far.
    fn log_text(&self) -> String;
    /// "wiremeshd" or "wireguard-go 0.0.2022…".
    fn label(&self) -> String;

    /// Runs `wg <args>` in the namespace; panics (with the log) unless it succeeds.
    fn wg(&self, args: &[&str]) -> String {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        let out = ns_exec(self.ns_name(), &full);
        if !out.status.success() {
            panic!(
                "[{}] `{}` failed: {}\n{}\n--- {} log ---\n{}",
                self.ns_name(),
                full.join(" "),
                out.status,
                output_text(&out),
                self.label(),
                self.log_text()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `wg set <if> <args…>`
    fn wg_set(&self, args: &[&str]) {
        let mut full = vec!["set", self.ifname()];
        full.extend_from_slice(args);
        self.wg(&full);
    }

    /// `wg set <if> peer PUB allowed-ips ALLOWED [endpoint EP] [persistent-keepalive N]`
    fn peer_add(&self, public_key: &str, allowed_ips: &str, endpoint: Option<&str>, keepalive: Option<u16>) {
        let keepalive = keepalive.map(|k| k.to_string());
        let mut args = vec!["peer", public_key, "allowed-ips", allowed_ips];
        if let Some(ep) = endpoint {
            args.extend(["endpoint", ep]);
        }
        if let Some(k) = keepalive.as_deref() {
            args.extend(["persistent-keepalive", k]);
        }
        self.wg_set(&args);
    }

    /// Adds `cidrs`, sets MTU 1420 and brings the interface up.
    fn ip_up(&self, cidrs: &[&str]) {
        for cidr in cidrs {
            let mut args = vec!["ip", "addr", "add", cidr, "dev", self.ifname()];
            if cidr.contains(':') {
                args.push("nodad");
            }
            ns_run_ok(self.ns_name(), &args);
        }
        ns_run_ok(self.ns_name(), &["ip", "link", "set", "dev", self.ifname(), "mtu", "1420"]);
        ns_run_ok(self.ns_name(), &["ip", "link", "set", "dev", self.ifname(), "up"]);
    }

    /// `wg show <if> dump`, raw.
    fn dump_text(&self) -> String {
        self.wg(&["show", self.ifname(), "dump"])
    }

    /// `wg show <if> dump`, parsed (panics with the text if malformed).
    fn dump(&self) -> Dump {
        let text = self.dump_text();
        Dump::parse(&text, None).unwrap_or_else(|e| panic!("{}: bad `wg show dump` output: {e}\n{text}", self.label()))
    }
}

/// Runs `args` in namespace `ns_name`, panicking unless it succeeds; returns stdout.
pub fn ns_run_ok(ns_name: &str, args: &[&str]) -> String {
    let out = ns_exec(ns_name, args);
    if !out.status.success() {
        panic!("[{ns_name}] `{}` failed: {}\n{}", args.join(" "), out.status, output_text(&out));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl WgDev for WireguardGo {
    fn ifname(&self) -> &str {
        &self.ifname
    }
    fn ns_name(&self) -> &str {
        self.netns_name()
    }
    fn public_key(&self) -> &str {
        &self.public_key
    }
    fn private_key(&self) -> &str {
        &self.private_key
    }
    fn port(&self) -> u16 {
        self.listen_port
    }
    fn log_text(&self) -> String {
        self.log()
    }
    fn label(&self) -> String {
        format!("wireguard-go {} ({})", self.version.version(), self.ifname)
    }
}

/// Which implementation the other end of a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    WgGo(WgGoVersion),
    Wiremesh,
}

impl PeerKind {
    /// Starts this implementation in `ns` with a fresh key and `port`.
    pub fn start(self, ns: &Netns, port: u16) -> Box<dyn WgDev> {
        match self {
            PeerKind::WgGo(v) => Box::new(WireguardGo::start(ns, v, port)),
            PeerKind::Wiremesh => Box::new(Wiremeshd::start(ns, port)),
        }
    }

    /// Skips or fails unless this implementation can run here.
    pub fn require(self, test: &str) -> bool {
        match self {
            PeerKind::WgGo(v) => require_wg_go(test, v),
            PeerKind::Wiremesh => require_tun_and_wg(test),
        }
    }
}

// ---------------------------------------------------------------------------
// wiremeshd
// ---------------------------------------------------------------------------

/// A `wiremeshd interface <ifname> --foreground` process in a namespace.
/// Dropping it sends SIGTERM (SIGKILL after 3 s) and removes a left-over
/// socket; its log is printed if the test is panicking.
#[derive(Debug)]
pub struct Wiremeshd {
    pub ifname: String,
    pub private_key: String,
    pub public_key: String,
    pub listen_port: u16,
    ns_name: String,
    child: Child,
    log_path: PathBuf,
}

impl Wiremeshd {
    /// Starts `wiremeshd interface <fresh name> --foreground` in `ns`, waits
    /// for its socket and sets a fresh private key and `listen_port`.
    pub fn start(ns: &Netns, listen_port: u16) -> Wiremeshd {
        let mut w = Wiremeshd::spawn(ns, &netns::unique_ifname("wmw"), &[]);
        w.wait_ready();
        let key = temp_file(&format!("{}-key", w.ifname), &format!("{}\n", w.private_key));
        let _guard = RemoveOnDrop(key.clone());
        let key = key.to_str().expect("utf-8 path").to_string();
        let port = listen_port.to_string();
        w.listen_port = listen_port;
        w.wg_set(&["private-key", &key, "listen-port", &port]);
        w
    }

    /// Starts `wiremeshd interface <ifname> --foreground <extra…>` in `ns`
    /// without waiting for anything. A fresh key pair is generated (but not
    /// set) for the caller's convenience.
    pub fn spawn(ns: &Netns, ifname: &str, extra: &[&str]) -> Wiremeshd {
        let log_path = std::env::temp_dir().join(format!("wiremesh-{ifname}.log"));
        let log = std::fs::File::create(&log_path).expect("create wiremeshd log file");
        let log2 = log.try_clone().expect("clone log file");
        let mut args = vec![wiremeshd_bin(), "interface", ifname, "--foreground"];
        args.extend_from_slice(extra);
        let child = ns
            .command(&args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?}: {e}"));
        let (private_key, public_key) = netns::wg_genkey();
        Wiremeshd {
            ifname: ifname.to_string(),
            private_key,
            public_key,
            listen_port: 0,
            ns_name: ns.name().to_string(),
            child,
            log_path,
        }
    }

    /// Waits (10 s) until the socket answers and the TUN device exists.
    pub fn wait_ready(&mut self) {
        let sock = socket_path(&self.ifname);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("wiremeshd {} exited early ({st}); log:\n{}", self.ifname, self.log_text());
            }
            if sock.exists()
                && std::os::unix::net::UnixStream::connect(&sock).is_ok()
                && ns_exec(&self.ns_name, &["ip", "link", "show", "dev", &self.ifname]).status.success()
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!("wiremeshd did not serve {} within 10 s; log:\n{}", sock.display(), self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` and waits up to `timeout` for the exit.
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            kill(signal, self.pid());
        }
        self.wait_exit(timeout)
    }
}

impl WgDev for Wiremeshd {
    fn ifname(&self) -> &str {
        &self.ifname
    }
    fn ns_name(&self) -> &str {
        &self.ns_name
    }
    fn public_key(&self) -> &str {
        &self.public_key
    }
    fn private_key(&self) -> &str {
        &self.private_key
    }
    fn port(&self) -> u16 {
        self.listen_port
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
    fn label(&self) -> String {
        format!("wiremeshd ({})", self.ifname)
    }
}

impl Drop for Wiremeshd {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            kill("TERM", self.pid());
            if self.wait_exit(Duration::from_secs(3)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // After a clean SIGTERM this is already gone; after SIGKILL it is stale.
        let _ = std::fs::remove_file(socket_path(&self.ifname));
        if std::thread::panicking() {
            eprintln!("--- wiremeshd {} log, {} ---\n{}", self.ifname, self.log_path.display(), self.log_text());
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

// ---------------------------------------------------------------------------
// `wg show … dump`
// ---------------------------------------------------------------------------

/// The interface line of `wg show <if> dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceDump {
    pub private_key: String,
    pub public_key: String,
    pub listen_port: u16,
    /// "off" or "0x…".
    pub fwmark: String,
}

/// A peer line of `wg show <if> dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDump {
    pub public_key: String,
    /// "(none)" or a base64 key.
    pub preshared_key: String,
    /// "(none)" or `ip:port` / `[ip]:port`.
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    /// Unix seconds, 0 when never.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// "off" or seconds.
    pub keepalive: String,
}

/// A parsed `wg show <if> dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    pub iface: IfaceDump,
    pub peers: Vec<PeerDump>,
}

fn check_key(what: &str, s: &str) -> Result<String, String> {
    netns::b64_decode_32(s).map_err(|e| format!("{what} {s:?}: {e}"))?;
    Ok(s.to_string())
}

fn check_cidr(s: &str) -> Result<(), String> {
    let (ip, len) = s.split_once('/').ok_or_else(|| format!("allowed ip {s:?} has no /prefix"))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("allowed ip {s:?}: bad address"))?;
    let len: u8 = len.parse().map_err(|_| format!("allowed ip {s:?}: bad prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("allowed ip {s:?}: prefix longer than {max}"));
    }
    Ok(())
}

impl Dump {
    /// Parses `wg show <if> dump` (`ifname` `None`), or the lines of `wg show
    /// all dump` that belong to `ifname` (each prefixed with the name).
    pub fn parse(text: &str, ifname: Option<&str>) -> Result<Dump, String> {
        let mut iface = None;
        let mut peers = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let mut fields: Vec<&str> = line.split('\t').collect();
            if let Some(name) = ifname {
                if fields[0] != name {
                    continue;
                }
                fields.remove(0);
            }
            if iface.is_none() {
                if fields.len() != 4 {
                    return Err(format!("interface line has {} fields, want 4: {line:?}", fields.len()));
                }
                let fwmark = fields[3].to_string();
                if fwmark != "off" && !(fwmark.starts_with("0x") && u32::from_str_radix(&fwmark[2..], 16).is_ok()) {
                    return Err(format!("fwmark {fwmark:?} is neither off nor 0x…"));
                }
                iface = Some(IfaceDump {
                    private_key: check_key("private key", fields[0])?,
                    public_key: check_key("public key", fields[1])?,
                    listen_port: fields[2].parse().map_err(|_| format!("listen port {:?}", fields[2]))?,
                    fwmark,
                });
                continue;
            }
            if fields.len() != 8 {
                return Err(format!("peer line has {} fields, want 8: {line:?}", fields.len()));
            }
            let preshared_key =
                if fields[1] == "(none)" { fields[1].to_string() } else { check_key("preshared key", fields[1])? };
            let endpoint = fields[2].to_string();
            if endpoint != "(none)" {
                endpoint.parse::<std::net::SocketAddr>().map_err(|_| format!("endpoint {endpoint:?}"))?;
            }
            let allowed_ips: Vec<String> =
                if fields[3] == "(none)" { Vec::new() } else { fields[3].split(',').map(str::to_string).collect() };
            for a in &allowed_ips {
                check_cidr(a)?;
            }
            let num = |i: usize, what: &str| -> Result<u64, String> {
                fields[i].parse().map_err(|_| format!("{what} {:?} is not a number", fields[i]))
            };
            let keepalive = fields[7].to_string();
            if keepalive != "off" && keepalive.parse::<u16>().is_err() {
                return Err(format!("persistent keepalive {keepalive:?}"));
            }
            peers.push(PeerDump {
                public_key: check_key("peer public key", fields[0])?,
                preshared_key,
                endpoint,
                allowed_ips,
                latest_handshake: num(4, "latest handshake")?,
                rx_bytes: num(5, "rx bytes")?,
                tx_bytes: num(6, "tx bytes")?,
                keepalive,
            });
        }
        let iface = iface.ok_or("no interface line")?;
        Ok(Dump { iface, peers })
    }

    /// The peer with `public_key`, panicking if absent.
    pub fn peer(&self, public_key: &str) -> &PeerDump {
        self.peers
            .iter()
            .find(|p| p.public_key == public_key)
            .unwrap_or_else(|| panic!("no peer {public_key} in dump {self:#?}"))
    }
}

/// Seconds since the Unix epoch (wall clock).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Raw UAPI requests
// ---------------------------------------------------------------------------

/// Sends `request` (complete, including the final empty line) to the UAPI
/// socket of `ifname` and returns the answer up to and including the
/// `errno=N` line and the empty line after it.
pub fn uapi_raw(ifname: &str, request: &str) -> Result<String, String> {
    let path = socket_path(ifname);
    let mut s =
        std::os::unix::net::UnixStream::connect(&path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some(i) = text.find("errno=") {
            if text[i..].contains("\n\n") {
                return Ok(text.into_owned());
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read after {:?}: {e}", String::from_utf8_lossy(&got))),
        }
    }
}

/// The `errno=` value of a UAPI answer.
pub fn uapi_errno(answer: &str) -> Option<i64> {
    answer.lines().find_map(|l| l.strip_prefix("errno=")).and_then(|v| v.trim().parse().ok())
}

/// Lowercase hex of a base64 key (the UAPI form).
pub fn key_hex(b64: &str) -> String {
    netns::b64_decode_32(b64).expect("base64 key").iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Verified TCP transfer between namespaces
// ---------------------------------------------------------------------------

/// Moves the calling thread into the network namespace `ns_name`.
pub fn enter_netns(ns_name: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns_name}");
    let f = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(format!("setns({path}): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Period of the test stream: a prime, so a segment shifted, dropped or
/// duplicated by anything but a multiple of it cannot go unnoticed.
const PATTERN_LEN: usize = 1_048_573;

/// A deterministic pseudo-random byte stream: byte `i` is
/// `pattern[i % PATTERN_LEN]`, the pattern drawn from splitmix64(seed).
#[derive(Clone)]
pub struct TestStream {
    pattern: Arc<Vec<u8>>,
}

impl TestStream {
    pub fn new(seed: u64) -> TestStream {
        let mut state = seed;
        let mut pattern = Vec::with_capacity(PATTERN_LEN + 8);
        while pattern.len() < PATTERN_LEN {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            pattern.extend_from_slice(&z.to_le_bytes());
        }
        pattern.truncate(PATTERN_LEN);
        TestStream { pattern: Arc::new(pattern) }
    }

    /// The longest contiguous slice of the stream starting at `offset`, at most `max` bytes.
    fn slice_at(&self, offset: u64, max: usize) -> &[u8] {
        let start = (offset % PATTERN_LEN as u64) as usize;
        let end = (start + max).min(PATTERN_LEN);
        &self.pattern[start..end]
    }

    /// Checks `data` against the stream at `offset`; the first differing offset if any.
    fn check(&self, offset: u64, data: &[u8]) -> Option<u64> {
        let mut done = 0usize;
        while done < data.len() {
            let want = self.slice_at(offset + done as u64, data.len() - done);
            let got = &data[done..done + want.len()];
            if got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                return Some(offset + (done + i) as u64);
            }
            done += want.len();
        }
        None
    }

    /// FNV-1a-64 over the 8-byte words of one pattern period, mixed with the
    /// length: a short name for "the stream of this seed and length".
    pub fn digest(&self, len: u64) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ len;
        for w in self.pattern.chunks_exact(8) {
            h ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// The result of a verified transfer.
#[derive(Debug, Clone)]
pub struct TransferReport {
    pub bytes: u64,
    pub elapsed: Duration,
    /// [`TestStream::digest`] of what was sent, equal to the receiver's.
    pub digest: u64,
}

impl TransferReport {
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

impl core::fmt::Display for TransferReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} bytes in {:.2} s ({:.0} Mbit/s), verified byte for byte, stream digest {:016x}",
            self.bytes,
            self.elapsed.as_secs_f64(),
            self.mbit_per_s(),
            self.digest
        )
    }
}

/// How a transfer is paced and observed.
#[derive(Clone, Default)]
pub struct TransferOpts {
    /// Bytes received so far, updated as they arrive.
    pub progress: Option<Arc<AtomicU64>>,
    /// Send at most this many bytes per 100 ms (unpaced when `None`).
    pub bytes_per_100ms: Option<usize>,
    /// Longest a read or write may block (default [`STALL`]).
    pub stall: Option<Duration>,
}

/// Longest time a blocked read or write may take before the transfer fails.
const STALL: Duration = Duration::from_secs(20);

/// Sends `bytes` bytes of [`TestStream`] `seed` over TCP from namespace `tx`
/// to `rx_ip` (an address in namespace `rx`, on an ephemeral port), and
/// checks every received byte against the stream and the total length. The
/// whole transfer must end within `timeout`.
pub fn tcp_transfer(
    rx: &Netns,
    rx_ip: &str,
    tx: &Netns,
    bytes: u64,
    seed: u64,
    timeout: Duration,
    opts: TransferOpts,
) -> Result<TransferReport, String> {
    let stream = TestStream::new(seed);
    let ip: std::net::IpAddr = rx_ip.parse().map_err(|_| format!("bad address {rx_ip}"))?;
    let start = Instant::now();
    let deadline = start + timeout;
    let (port_tx, port_rx) = std::sync::mpsc::channel::<Result<u16, String>>();
    let rx_name = rx.name().to_string();
    let rx_stream = stream.clone();
    let progress = opts.progress.clone();
    let stall = opts.stall.unwrap_or(STALL);
    let receiver = std::thread::spawn(move || -> Result<u64, String> {
        let setup = (|| -> Result<std::net::TcpListener, String> {
            enter_netns(&rx_name)?;
            let l = std::net::TcpListener::bind((ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok(l)
        })();
        let listener = match setup {
            Ok(l) => {
                let port = l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())?;
                let _ = port_tx.send(Ok(port));
                l
            }
            Err(e) => {
                let _ = port_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err("receiver: no connection before the deadline".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        conn.set_nonblocking(false).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(stall)).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got: u64 = 0;
        loop {
            let n = match conn.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("receiver: read after {got} of {bytes} bytes: {e}")),
            };
            if n == 0 {
                break;
            }
            if let Some(at) = rx_stream.check(got, &buf[..n]) {
                return Err(format!("receiver: data differs from the sent stream at byte {at}"));
            }
            got += n as u64;
            if let Some(p) = &progress {
                p.store(got, Ordering::Relaxed);
            }
            if got > bytes {
                return Err(format!("receiver: got {got} bytes, more than the {bytes} sent"));
            }
            if Instant::now() >= deadline {
                return Err(format!("receiver: deadline passed after {got} of {bytes} bytes"));
            }
        }
        // Tell the sender everything arrived (it waits for this).
        conn.write_all(&got.to_le_bytes()).map_err(|e| format!("receiver: reply: {e}"))?;
        Ok(got)
    });
    let port = match port_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let _ = receiver.join();
            return Err(e);
        }
        Err(_) => return Err("receiver did not start".into()),
    };
    let tx_name = tx.name().to_string();
    let tx_stream = stream.clone();
    let pace = opts.bytes_per_100ms;
    let sender = std::thread::spawn(move || -> Result<u64, String> {
        enter_netns(&tx_name)?;
        let addr = std::net::SocketAddr::new(ip, port);
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("sender: connect {addr}: {e}"))?;
        conn.set_write_timeout(Some(stall)).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(stall)).map_err(|e| e.to_string())?;
        let mut sent: u64 = 0;
        let chunk = pace.unwrap_or(256 * 1024);
        let mut next_tick = Instant::now();
        while sent < bytes {
            let max = chunk.min((bytes - sent) as usize);
            let mut in_tick = 0;
            while in_tick < max {
                let s = tx_stream.slice_at(sent, max - in_tick);
                conn.write_all(s).map_err(|e| format!("sender: write after {sent} of {bytes} bytes: {e}"))?;
                sent += s.len() as u64;
                in_tick += s.len();
            }
            if Instant::now() >= deadline {
                return Err(format!("sender: deadline passed after {sent} of {bytes} bytes"));
            }
            if pace.is_some() {
                next_tick += Duration::from_millis(100);
                if let Some(d) = next_tick.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        }
        conn.shutdown(std::net::Shutdown::Write).map_err(|e| format!("sender: shutdown: {e}"))?;
        let mut ack = [0u8; 8];
        conn.read_exact(&mut ack).map_err(|e| format!("sender: no final count from the receiver: {e}"))?;
        Ok(u64::from_le_bytes(ack))
    });
    let sent = sender.join().map_err(|_| "sender thread panicked".to_string());
    let received = receiver.join().map_err(|_| "receiver thread panicked".to_string());
    let elapsed = start.elapsed();
    match (sent, received) {
        (Ok(Ok(acked)), Ok(Ok(got))) => {
            if got != bytes || acked != bytes {
                return Err(format!("sent {bytes} bytes, receiver counted {got} (acknowledged {acked})"));
            }
            Ok(TransferReport { bytes, elapsed, digest: stream.digest(bytes) })
        }
        (s, r) => Err(format!("transfer of {bytes} bytes failed: sender {s:?}; receiver {r:?}")),
    }
}

/// [`tcp_transfer`] that panics (with both implementations' logs) on failure.
pub fn transfer_ok(
    what: &str,
    rx: &Netns,
    rx_ip: &str,
    tx: &Netns,
    bytes: u64,
    seed: u64,
    devs: &[&dyn WgDev],
) -> TransferReport {
    match tcp_transfer(rx, rx_ip, tx, bytes, seed, Duration::from_secs(45), TransferOpts::default()) {
        Ok(r) => {
            eprintln!("{what}: {r}");
            r
        }
        Err(e) => panic!("{what}: {e}\n{}", logs(devs)),
    }
}

/// Dumps and logs of `devs`, for failure messages.
pub fn logs(devs: &[&dyn WgDev]) -> String {
    let mut s = String::new();
    for d in devs {
        let dump = ns_exec(d.ns_name(), &["wg", "show", d.ifname(), "dump"]);
        s.push_str(&format!(
            "--- {} in {}: wg show dump ---\n{}--- {} log (tail) ---\n{}\n",
            d.label(),
            d.ns_name(),
            output_text(&dump),
            d.label(),
            tail(&d.log_text(), 40)
        ));
    }
    s
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Pings `dst` from `ns` `count` times and panics (with logs) unless every
/// reply comes back; returns ping's summary lines.
pub fn ping_ok(what: &str, ns: &Netns, dst: &str, count: u32, devs: &[&dyn WgDev]) -> String {
    let (ok, text) = netns::ping(ns, dst, count);
    if !ok || !text.contains(" 0% packet loss") {
        panic!("{what}: ping {dst} from {} lost packets:\n{text}\n{}", ns.name(), logs(devs));
    }
    let summary: Vec<&str> = text.lines().filter(|l| l.contains("packet loss") || l.starts_with("rtt")).collect();
    let s = summary.join("; ");
    eprintln!("{what}: {s}");
    s
}
