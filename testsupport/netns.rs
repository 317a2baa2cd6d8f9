//! Network-namespace test harness for wiremesh integration tests (std only).
//!
//! Include it from an integration test with
//!
//! ```ignore
//! #[path = "../../testsupport/netns.rs"]
//! mod netns;
//! ```
//!
//! and start every test that needs it with
//!
//! ```ignore
//! if !netns::require_or_skip("my_test") { return; }
//! ```
//!
//! Outside CI a test skips (printing why) when it cannot run here: not root,
//! no `ip`, no network namespaces. With `CI` set (anything but empty, `0` or
//! `false`) it panics instead, so CI never passes by skipping.
//!
//! What it gives:
//! * [`Netns`]: a named network namespace (`wmt-<pid>-<n>`), `lo` up, deleted on
//!   drop together with every process still running in it.
//! * [`veth_pair`]: a veth link between two namespaces, addressed and up.
//! * [`Subnet`]: fresh, non-overlapping test subnets (169.254.X.0/24 and
//!   fd00:776d:X::/64) so tests never touch real address ranges.
//! * [`WireguardGo`]: a real wireguard-go (Debian's 0.0.20220316 or the
//!   bookworm-backports 0.0.20231211 that `ci/install-deps.sh` puts under
//!   `/usr/local/lib/wiremesh-ci/`) in a namespace, configured with `wg(8)`.
//! * [`wg_genkey`], [`b64_decode_32`], [`b64_encode_32`] for keys.
//!
//! Quirks worth knowing:
//! * The wg(8) UAPI socket lives at `/var/run/wireguard/<ifname>.sock`, on the
//!   file system, which network namespaces share: interface names must be
//!   unique machine-wide (not only per namespace), and `wg show` in any
//!   namespace lists every userspace interface of every namespace. This
//!   harness names them `wmg<pid>x<n>` and removes the socket on drop.
//! * wireguard-go prints a banner ("Running wireguard-go is not required...")
//!   when the kernel has WireGuard; `WG_PROCESS_FOREGROUND=1` silences it. It
//!   needs no `WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD` (that was only for
//!   2019-era versions). It needs `/dev/net/tun`.
//! * The 0.0.20231211 binary reports "v0.0.20230223" in `--version` (upstream
//!   did not bump its version string); tell them apart by path.
#![allow(dead_code)]

use core::sync::atomic::{AtomicU32, Ordering};
use core::time::Duration;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// Default bound for one command run through this harness.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Directory where `ci/install-deps.sh` puts the side-by-side wireguard-go binaries.
pub const WG_GO_CI_DIR: &str = "/usr/local/lib/wiremesh-ci";

/// Where wireguard-go and wiremeshd put their wg(8) UAPI sockets.
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A name `<prefix><pid>x<n>` unique on this machine while this process lives,
/// short enough for a Linux interface name (at most 15 bytes).
pub fn unique_ifname(prefix: &str) -> String {
    let n = next_id();
    let pid = std::process::id();
    let name = format!("{prefix}{pid}x{n}");
    if name.len() <= 15 {
        return name;
    }
    // Fold the pid down; still unique within this process thanks to `n`.
    let name = format!("{prefix}{}x{n}", pid % 10_000);
    assert!(name.len() <= 15, "interface name {name:?} too long; use a shorter prefix");
    name
}

// ---------------------------------------------------------------------------
// Can we run here?
// ---------------------------------------------------------------------------

/// True when running under CI (`CI` set to anything but empty, `0`, `false`).
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => {
            let v = v.trim().to_ascii_lowercase();
            !(v.is_empty() || v == "0" || v == "false" || v == "no")
        }
        Err(_) => false,
    }
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Uid: real effective saved fs
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `cmd` can be started (found on PATH and executable).
pub fn have_command(cmd: &str) -> bool {
    Command::new(cmd).arg("-V").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Checks that network-namespace tests can run here: root, `ip` present, and a
/// namespace can actually be created. The answer is computed once per process.
pub fn can_run() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT.get_or_init(probe).clone()
}

fn probe() -> Result<(), String> {
    match effective_uid() {
        Some(0) => {}
        Some(uid) => return Err(format!("not root (euid {uid}); netns tests need root")),
        None => return Err("cannot read euid from /proc/self/status".into()),
    }
    if !have_command("ip") {
        return Err("`ip` (iproute2) not found; run ci/install-deps.sh".into());
    }
    let name = format!("wmt-{}-probe{}", std::process::id(), next_id());
    let out = run_timeout(Command::new("ip").args(["netns", "add", &name]), COMMAND_TIMEOUT)
        .map_err(|e| format!("cannot run `ip netns add`: {e}"))?;
    if !out.status.success() {
        return Err(format!("cannot create a network namespace: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let _ = run_timeout(Command::new("ip").args(["netns", "del", &name]), COMMAND_TIMEOUT);
    Ok(())
}

/// Report that `test` cannot run because of `why`: returns `false` (the test
/// should return early, i.e. skip) outside CI, and panics in CI.
pub fn skip_or_fail(test: &str, why: &str) -> bool {
    if in_ci() {
        panic!("{test}: cannot run in CI (CI is set, so this fails instead of skipping): {why}");
    }
    // Straight to fd 2, past the test harness's output capture, so the
    // skip shows up in a normal `cargo test` run.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

/// `true` if netns tests can run here. Otherwise skip (print why, return
/// `false`) outside CI, panic in CI.
pub fn require_or_skip(test: &str) -> bool {
    match can_run() {
        Ok(()) => true,
        Err(why) => skip_or_fail(test, &why),
    }
}

/// Like [`require_or_skip`], and also needs `wg`, `/dev/net/tun` and the
/// wireguard-go binary of `version`; returns its path.
pub fn require_wireguard_go_or_skip(test: &str, version: WgGoVersion) -> Option<PathBuf> {
    if !require_or_skip(test) {
        return None;
    }
    if !have_command("wg") {
        skip_or_fail(test, "`wg` (wireguard-tools) not found; run ci/install-deps.sh");
        return None;
    }
    if !Path::new("/dev/net/tun").exists() {
        skip_or_fail(test, "/dev/net/tun does not exist");
        return None;
    }
    match wireguard_go_path(version) {
        Some(p) => Some(p),
        None => {
            skip_or_fail(
                test,
                &format!(
                    "wireguard-go {} not found (looked in {WG_GO_CI_DIR} and /usr/bin); run ci/install-deps.sh",
                    version.version()
                ),
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Running commands with a bound
// ---------------------------------------------------------------------------

/// Runs `cmd` (stdin null, stdout and stderr captured), killing it after `timeout`.
/// A timed-out command is reported as an error that includes its output so far.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {desc}: {e}"))?;
    let out_reader = reader_thread(child.stdout.take());
    let err_reader = reader_thread(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(format!(
                    "{desc} timed out after {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {desc}: {e}")),
        }
    };
    Ok(Output { status, stdout: out_reader.join().unwrap_or_default(), stderr: err_reader.join().unwrap_or_default() })
}

fn reader_thread<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs a command in the current (root) namespace, bounded by [`COMMAND_TIMEOUT`].
pub fn host_exec(args: &[&str]) -> Output {
    let (prog, rest) = args.split_first().expect("empty command");
    run_timeout(Command::new(prog).args(rest), COMMAND_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`host_exec`] but panics (with stdout and stderr) unless the command
/// succeeds; returns its stdout.
pub fn host_run_ok(args: &[&str]) -> String {
    check_ok("host", args, host_exec(args))
}

fn check_ok(where_: &str, args: &[&str], out: Output) -> String {
    if !out.status.success() {
        panic!(
            "[{where_}] `{}` failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------

/// A network namespace for one test, named `wmt-<pid>-<n>`, with `lo` up.
/// Dropping it kills every process still in it and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace. Panics if that fails (call
    /// [`require_or_skip`] first).
    pub fn new() -> Netns {
        let name = format!("wmt-{}-{}", std::process::id(), next_id());
        host_run_ok(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.run_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `args` inside this namespace (`ip netns exec`).
    /// `ip netns exec` execs the program, so the child's pid is the program's.
    pub fn command(&self, args: &[&str]) -> Command {
        assert!(!args.is_empty(), "empty command");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs `args` inside this namespace and returns its output (never
    /// panics on a non-zero exit; panics if it cannot start or runs longer
    /// than [`COMMAND_TIMEOUT`]).
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_timeout(args, COMMAND_TIMEOUT)
    }

    pub fn exec_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        run_timeout(&mut self.command(args), timeout).unwrap_or_else(|e| panic!("[{}] {e}", self.name))
    }

    /// Runs `args` inside this namespace, panicking with its stdout and stderr
    /// unless it succeeds. Returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        check_ok(&self.name, args, self.exec(args))
    }

    /// Starts `args` inside this namespace in the background: stdin null,
    /// stdout and stderr piped (read them, or use `wait_with_output`, so a
    /// chatty program does not block on a full pipe). It is killed when the
    /// namespace is dropped, if still running.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("[{}] cannot start {args:?}: {e}", self.name))
    }

    /// Pids of the processes in this namespace.
    pub fn pids(&self) -> Vec<u32> {
        let out = host_exec(&["ip", "netns", "pids", &self.name]);
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Equivalent of `ip netns pids NAME | xargs kill -9`, then delete.
        for _ in 0..3 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            let mut args = vec!["kill".to_string(), "-9".to_string()];
            args.extend(pids.iter().map(|p| p.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = run_timeout(Command::new(args[0]).args(&args[1..]), COMMAND_TIMEOUT);
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = run_timeout(Command::new("ip").args(["netns", "del", &self.name]), COMMAND_TIMEOUT);
    }
}

// ---------------------------------------------------------------------------
// Addresses and links
// ---------------------------------------------------------------------------

/// A test subnet: 169.254.X.0/24 and fd00:776d:X::/64 ("wm"), X unique within
/// this process (1..=168, so never 169.254.169.254's /24). Inside namespaces
/// these never clash with the machine's own addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub x: u8,
}

impl Subnet {
    /// The next unused subnet of this process.
    pub fn next() -> Subnet {
        static SUBNETS: AtomicU32 = AtomicU32::new(0);
        let n = SUBNETS.fetch_add(1, Ordering::Relaxed);
        assert!(n < 168, "out of test subnets");
        Subnet { x: (n + 1) as u8 }
    }

    /// `169.254.X.host`
    pub fn v4(&self, host: u8) -> String {
        format!("169.254.{}.{host}", self.x)
    }

    /// `169.254.X.host/24`
    pub fn v4_cidr(&self, host: u8) -> String {
        format!("{}/24", self.v4(host))
    }

    /// `fd00:776d:X::host` (host in hex)
    pub fn v6(&self, host: u16) -> String {
        format!("fd00:776d:{:x}::{host:x}", self.x)
    }

    /// `fd00:776d:X::host/64`
    pub fn v6_cidr(&self, host: u16) -> String {
        format!("{}/64", self.v6(host))
    }
}

/// Strips a `/prefix` from an address.
pub fn addr_only(cidr: &str) -> &str {
    cidr.split('/').next().unwrap_or(cidr)
}

/// Adds `cidr` to `ifname` in namespace `ns` (root namespace when `None`).
/// IPv6 addresses get `nodad`, so they are usable at once.
pub fn add_address(ns: Option<&Netns>, ifname: &str, cidr: &str) {
    let mut args = vec!["ip", "addr", "add", cidr, "dev", ifname];
    if cidr.contains(':') {
        args.push("nodad");
    }
    match ns {
        Some(ns) => {
            ns.run_ok(&args);
        }
        None => {
            host_run_ok(&args);
        }
    }
}

/// A veth pair made by [`veth_pair`].
#[derive(Debug)]
pub struct VethPair {
    /// Interface name of the end in `a`.
    pub a_if: String,
    /// Interface name of the other end.
    pub b_if: String,
    /// `a_addr` without its prefix length.
    pub a_ip: String,
    /// `b_addr` without its prefix length.
    pub b_ip: String,
    a_ns: String,
    b_ns: Option<String>,
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end deletes both. Links inside a namespace also vanish
        // with it; a root-namespace end must be removed explicitly.
        let _ = run_timeout(Command::new("ip").args(["-n", &self.a_ns, "link", "del", &self.a_if]), COMMAND_TIMEOUT);
        if self.b_ns.is_none() {
            let _ = run_timeout(Command::new("ip").args(["link", "del", &self.b_if]), COMMAND_TIMEOUT);
        }
    }
}

/// Creates a veth pair with one end in `a` (address `a_addr`, e.g.
/// `169.254.1.1/24` or `fd00:776d:1::1/64`) and the other in `b`, or in the
/// current (root) namespace when `b` is `None` (prefer namespaces for both).
/// Both ends and `lo` are brought up. Addresses may be empty to skip them.
///
/// The ends are created directly inside their namespaces, so names only need
/// to be unique within them; a root-namespace end gets a machine-unique name.
pub fn veth_pair(a: &Netns, a_addr: &str, b: Option<&Netns>, b_addr: &str) -> VethPair {
    let a_if = unique_ifname("wva");
    let b_if = unique_ifname("wvb");
    let mut args = vec!["ip", "link", "add", "name", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if];
    if let Some(b) = b {
        args.extend(["netns", b.name.as_str()]);
    }
    host_run_ok(&args);
    let pair = VethPair {
        a_if: a_if.clone(),
        b_if: b_if.clone(),
        a_ip: addr_only(a_addr).to_string(),
        b_ip: addr_only(b_addr).to_string(),
        a_ns: a.name.clone(),
        b_ns: b.map(|b| b.name.clone()),
    };
    if !a_addr.is_empty() {
        add_address(Some(a), &a_if, a_addr);
    }
    a.run_ok(&["ip", "link", "set", &a_if, "up"]);
    a.run_ok(&["ip", "link", "set", "lo", "up"]);
    if !b_addr.is_empty() {
        add_address(b, &b_if, b_addr);
    }
    match b {
        Some(b) => {
            b.run_ok(&["ip", "link", "set", &b_if, "up"]);
            b.run_ok(&["ip", "link", "set", "lo", "up"]);
        }
        None => {
            host_run_ok(&["ip", "link", "set", &b_if, "up"]);
        }
    }
    pair
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A fresh key pair from `wg genkey` / `wg pubkey`: (private, public), base64.
pub fn wg_genkey() -> (String, String) {
    let out = host_exec(&["wg", "genkey"]);
    let private = check_ok("host", &["wg", "genkey"], out).trim().to_string();
    (private.clone(), wg_pubkey(&private))
}

/// The public key of a base64 private key, via `wg pubkey`.
pub fn wg_pubkey(private_b64: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start `wg pubkey`");
    child.stdin.take().expect("stdin").write_all(format!("{private_b64}\n").as_bytes()).expect("write to `wg pubkey`");
    let out = child.wait_with_output().expect("wait for `wg pubkey`");
    check_ok("host", &["wg", "pubkey"], out).trim().to_string()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_value(c: u8) -> Option<u32> {
    B64.iter().position(|&b| b == c).map(|p| p as u32)
}

/// Decodes standard base64 (with padding, as wg prints keys) of exactly 32 bytes.
pub fn b64_decode_32(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim().as_bytes();
    if s.len() != 44 || s[43] != b'=' || s[42] == b'=' {
        return Err(format!("a 32-byte key is 44 base64 characters ending in one '=', got {} characters", s.len()));
    }
    if s[..43].contains(&b'=') {
        return Err("'=' before the end of a base64 key".into());
    }
    let mut out = [0u8; 32];
    let mut o = 0;
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        let mut n = 0;
        for &c in chunk {
            if c == b'=' {
                break;
            }
            let v = b64_value(c).ok_or_else(|| format!("invalid base64 character {:?}", c as char))?;
            acc = (acc << 6) | v;
            n += 1;
        }
        // n == 4 -> 3 bytes; n == 3 (last chunk) -> 2 bytes.
        let bytes = n * 6 / 8;
        acc <<= 6 * (4 - n);
        for i in 0..bytes {
            out[o] = (acc >> (16 - 8 * i)) as u8;
            o += 1;
        }
        if n == 3 && acc & 0xff != 0 {
            return Err("non-canonical base64 (trailing bits set)".into());
        }
    }
    debug_assert_eq!(o, 32);
    Ok(out)
}

/// Encodes 32 bytes as standard base64 with padding (the form wg uses).
pub fn b64_encode_32(key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(44);
    for chunk in key.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let acc = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(B64[((acc >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

// ---------------------------------------------------------------------------
// wireguard-go
// ---------------------------------------------------------------------------

/// The wireguard-go versions the interop tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgGoVersion {
    /// Debian bookworm's 0.0.20220316 (`/usr/bin/wireguard-go`).
    Stable,
    /// bookworm-backports' 0.0.20231211, extracted side by side by ci/install-deps.sh.
    Backports,
}

impl WgGoVersion {
    pub fn version(self) -> &'static str {
        match self {
            WgGoVersion::Stable => "0.0.20220316",
            WgGoVersion::Backports => "0.0.20231211",
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Path of the wireguard-go binary of `version`, if installed.
/// An env var `WIREMESH_WG_GO_STABLE` / `WIREMESH_WG_GO_BACKPORTS` overrides it.
pub fn wireguard_go_path(version: WgGoVersion) -> Option<PathBuf> {
    let env = match version {
        WgGoVersion::Stable => "WIREMESH_WG_GO_STABLE",
        WgGoVersion::Backports => "WIREMESH_WG_GO_BACKPORTS",
    };
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return is_executable(&p).then_some(p);
    }
    let side_by_side = Path::new(WG_GO_CI_DIR).join(format!("wireguard-go-{}", version.version()));
    if is_executable(&side_by_side) {
        return Some(side_by_side);
    }
    if version == WgGoVersion::Stable {
        // Debian's own package, if it is that version (it prints "wireguard-go v0.0.20220316").
        let sys = PathBuf::from("/usr/bin/wireguard-go");
        if is_executable(&sys) {
            let out = run_timeout(Command::new(&sys).arg("--version"), COMMAND_TIMEOUT).ok()?;
            if String::from_utf8_lossy(&out.stdout).contains(version.version()) {
                return Some(sys);
            }
        }
    }
    None
}

/// A wireguard-go process serving one interface inside a [`Netns`], with a
/// fresh key pair and its listen port set. Killed (and its UAPI socket
/// removed) on drop. Configure peers with [`WireguardGo::set`],
/// [`WireguardGo::add_peer`] or [`WireguardGo::setconf`], then
/// [`WireguardGo::up`].
#[derive(Debug)]
pub struct WireguardGo {
    /// Interface name, machine-unique (`wmg<pid>x<n>`).
    pub ifname: String,
    pub version: WgGoVersion,
    pub binary: PathBuf,
    /// Base64 private key.
    pub private_key: String,
    /// Base64 public key.
    pub public_key: String,
    pub listen_port: u16,
    ns_name: String,
    child: Child,
    log_path: PathBuf,
}

impl WireguardGo {
    /// Starts wireguard-go `version` in `ns` as `wireguard-go -f <ifname>`,
    /// waits for its UAPI socket, and sets a fresh private key and
    /// `listen_port`. Panics (with wireguard-go's log) if it does not come up
    /// within 10 s.
    pub fn start(ns: &Netns, version: WgGoVersion, listen_port: u16) -> WireguardGo {
        let binary = wireguard_go_path(version)
            .unwrap_or_else(|| panic!("wireguard-go {} not installed; run ci/install-deps.sh", version.version()));
        Self::start_binary(ns, version, &binary, listen_port)
    }

    /// Like [`WireguardGo::start`] with an explicit binary.
    pub fn start_binary(ns: &Netns, version: WgGoVersion, binary: &Path, listen_port: u16) -> WireguardGo {
        let ifname = unique_ifname("wmg");
        let socket = Path::new(WG_SOCKET_DIR).join(format!("{ifname}.sock"));
        let _ = std::fs::remove_file(&socket);
        let log_path = std::env::temp_dir().join(format!("wiremesh-{ifname}.log"));
        let log = std::fs::File::create(&log_path).expect("create wireguard-go log file");
        let log2 = log.try_clone().expect("clone log file");
        let bin = binary.to_str().expect("utf-8 path");
        let child = ns
            .command(&[bin, "-f", &ifname])
            .env("WG_PROCESS_FOREGROUND", "1") // no "not required" banner
            .env("LOG_LEVEL", "verbose")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let (private_key, public_key) = wg_genkey();
        let mut wg = WireguardGo {
            ifname,
            version,
            binary: binary.to_path_buf(),
            private_key,
            public_key,
            listen_port,
            ns_name: ns.name.clone(),
            child,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(st)) = wg.child.try_wait() {
                panic!("wireguard-go exited early ({st}); log:\n{}", wg.log());
            }
            if Instant::now() >= deadline {
                panic!("wireguard-go did not create {} within 10 s; log:\n{}", socket.display(), wg.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let key_file = wg.write_temp("key", &format!("{}\n", wg.private_key));
        let port = listen_port.to_string();
        let key_path = key_file.to_str().expect("utf-8 path").to_string();
        wg.set(&["private-key", &key_path, "listen-port", &port]);
        let _ = std::fs::remove_file(&key_file);
        wg
    }

    /// Namespace name it runs in.
    pub fn netns_name(&self) -> &str {
        &self.ns_name
    }

    /// `/var/run/wireguard/<ifname>.sock`
    pub fn socket_path(&self) -> PathBuf {
        Path::new(WG_SOCKET_DIR).join(format!("{}.sock", self.ifname))
    }

    /// Process id of wireguard-go.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What wireguard-go printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn write_temp(&self, what: &str, contents: &str) -> PathBuf {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = std::env::temp_dir().join(format!("wiremesh-{}-{what}-{}", self.ifname, next_id()));
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

    fn ns_run_ok(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns_name]).args(args);
        let out = run_timeout(&mut cmd, COMMAND_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        if !out.status.success() {
            panic!(
                "[{}] `{}` failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- wireguard-go log ---\n{}",
                self.ns_name,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `wg set <ifname> <args...>` inside the namespace.
    pub fn set(&self, args: &[&str]) {
        let mut full = vec!["wg", "set", &self.ifname];
        full.extend_from_slice(args);
        self.ns_run_ok(&full);
    }

    /// Adds a peer: `wg set <if> peer PUB allowed-ips ALLOWED [endpoint EP]
    /// [persistent-keepalive N]`.
    pub fn add_peer(&self, public_key: &str, allowed_ips: &str, endpoint: Option<&str>, keepalive: Option<u16>) {
        let keepalive = keepalive.map(|k| k.to_string());
        let mut args = vec!["peer", public_key, "allowed-ips", allowed_ips];
        if let Some(ep) = endpoint {
            args.extend(["endpoint", ep]);
        }
        if let Some(k) = keepalive.as_deref() {
            args.extend(["persistent-keepalive", k]);
        }
        self.set(&args);
    }

    /// `wg setconf <ifname> FILE` with `conf` (wg(8) config format). It
    /// replaces the whole configuration, so include `PrivateKey` and
    /// `ListenPort` (see [`WireguardGo::interface_section`]).
    pub fn setconf(&self, conf: &str) {
        let p = self.write_temp("conf", conf);
        let path = p.to_str().expect("utf-8 path").to_string();
        let _guard = RemoveOnDrop(p);
        self.ns_run_ok(&["wg", "setconf", &self.ifname, &path]);
    }

    /// `[Interface]` section with this instance's key and port, for [`WireguardGo::setconf`].
    pub fn interface_section(&self) -> String {
        format!("[Interface]\nPrivateKey = {}\nListenPort = {}\n", self.private_key, self.listen_port)
    }

    /// Assigns `cidr` to the interface, sets MTU 1420 and brings it up.
    pub fn up(&self, cidr: &str) {
        let mut args = vec!["ip", "addr", "add", cidr, "dev", &self.ifname];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ns_run_ok(&args);
        self.ns_run_ok(&["ip", "link", "set", "dev", &self.ifname, "mtu", "1420"]);
        self.ns_run_ok(&["ip", "link", "set", "dev", &self.ifname, "up"]);
    }

    /// Adds another address (no MTU/up changes).
    pub fn add_address(&self, cidr: &str) {
        let mut args = vec!["ip", "addr", "add", cidr, "dev", &self.ifname];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ns_run_ok(&args);
    }

    /// `wg show <ifname>` (human-readable).
    pub fn show(&self) -> String {
        self.ns_run_ok(&["wg", "show", &self.ifname])
    }

    /// `wg show <ifname> dump` (tab-separated, for parsing).
    pub fn dump(&self) -> String {
        self.ns_run_ok(&["wg", "show", &self.ifname, "dump"])
    }

    /// Stops wireguard-go (SIGTERM, then SIGKILL after 2 s) and removes its socket.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = self.child.id().to_string();
            let _ = run_timeout(Command::new("kill").args(["-TERM", &pid]), COMMAND_TIMEOUT);
            let deadline = Instant::now() + Duration::from_secs(2);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() >= deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_file(self.socket_path());
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- wireguard-go {} ({}) log, {} ---\n{}",
                self.ifname,
                self.version.version(),
                self.log_path.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Pings `dst` from `ns` (`ping -c count -W 2 -i 0.2`); returns the output,
/// and whether all replies came back.
pub fn ping(ns: &Netns, dst: &str, count: u32) -> (bool, String) {
    let c = count.to_string();
    let out = ns.exec(&["ping", "-n", "-c", &c, "-W", "2", "-i", "0.2", dst]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}
