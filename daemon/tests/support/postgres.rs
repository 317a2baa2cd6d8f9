//! A private, throwaway PostgreSQL cluster for tests: `initdb` into a fresh
//! temporary directory, `postgres` on a free 127.0.0.1 port (and a Unix
//! socket in that directory only), trust authentication for the `postgres`
//! role, stopped (fast shutdown) and deleted on drop.
//!
//! Include it with `#[path = "support/postgres.rs"] mod postgres_support;`
//! and start with [`Cluster::start_or_skip`]: outside CI a test skips
//! (printing why) when PostgreSQL is not installed; with `CI` set (anything
//! but empty, `0`, `false`, `no`) it panics instead, so CI never passes by
//! skipping. `ci/install-deps.sh` installs Debian's `postgresql`.
//!
//! PostgreSQL refuses to run as root: as root, `initdb` and `postgres` run
//! as the `postgres` system user (through `setpriv`, which execs, so the
//! child process is the postmaster itself and signals reach it).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when running under CI (`CI` set to anything but empty, `0`, `false`, `no`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !(v.is_empty() || v == "0" || v == "false" || v == "no")
    })
}

fn skip_or_fail(test: &str, why: &str) -> Option<Cluster> {
    if in_ci() {
        panic!("{test}: cannot run in CI (CI is set, so this fails instead of skipping): {why}");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

/// The directory holding `initdb` and `postgres`: the newest
/// `/usr/lib/postgresql/<major>/bin` (Debian), else wherever `PATH` has them.
pub fn bin_dir() -> Option<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("postgres").is_file() && p.join("initdb").is_file())
        .collect();
    majors.sort();
    if let Some((_, p)) = majors.pop() {
        return Some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(PathBuf::from)
        .find(|d| d.join("postgres").is_file() && d.join("initdb").is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// A command run as the cluster's owner: `postgres` when we are root.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A running private cluster.
pub struct Cluster {
    dir: PathBuf,
    child: Child,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
}

impl Cluster {
    /// Starts a cluster, or skips (returns `None`) outside CI when PostgreSQL
    /// cannot run here; panics in CI.
    pub fn start_or_skip(test: &str) -> Option<Cluster> {
        let Some(bin) = bin_dir() else {
            return skip_or_fail(test, "PostgreSQL is not installed (no initdb/postgres; apt-get install postgresql)");
        };
        if is_root() && Command::new("id").arg("postgres").stdout(Stdio::null()).status().map_or(true, |s| !s.success())
        {
            return skip_or_fail(test, "running as root and there is no postgres user to run PostgreSQL as");
        }
        Some(Cluster::start(&bin))
    }

    fn start(bin: &Path) -> Cluster {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wiremesh-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        if is_root() {
            let ok = Command::new("chown").arg("postgres:").arg(&dir).status().is_ok_and(|s| s.success());
            assert!(ok, "chown postgres {}", dir.display());
        }
        let data = dir.join("data");
        let out = as_owner(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let log = std::fs::File::create(dir.join("postgres.log")).expect("postgres.log");
        if is_root() {
            let _ = Command::new("chown").arg("postgres:").arg(dir.join("postgres.log")).status();
        }
        let child = as_owner(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", dir.display()))
            // Small and quick: tests open a few dozen connections at most.
            .args(["-c", "max_connections=200", "-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let mut cluster = Cluster { dir, child, port };
        cluster.wait_ready();
        cluster
    }

    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("postgres exited ({status}); log:\n{}", self.log());
            }
            match postgres::Client::connect(&self.url("postgres"), postgres::NoTls) {
                Ok(_) => return,
                Err(e) if t0.elapsed() > Duration::from_secs(30) => {
                    panic!("postgres not ready after 30 s: {e}; log:\n{}", self.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// The URL of database `db` as the `postgres` role.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of database `db` through the cluster's Unix socket, which
    /// processes in other network namespaces reach too.
    pub fn socket_url(&self, db: &str) -> String {
        format!("postgres://postgres@/{db}?host={}&port={}", self.dir.display(), self.port)
    }

    /// Creates an empty database and returns its URL.
    pub fn create_db(&self, name: &str) -> String {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).expect("connect");
        c.batch_execute(&format!("CREATE DATABASE {name}")).expect("create database");
        self.url(name)
    }

    /// A client connection to database `db`, for checks behind the server's back.
    pub fn client(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(db), postgres::NoTls).expect("connect")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGINT: fast shutdown (open connections are ended).
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
