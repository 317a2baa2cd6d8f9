//! What the node agent changes on the host for subnet routes and exit nodes
//! (docs/routes.md):
//!
//! * as a router (`--advertise-routes`, `--advertise-exit-node`): IP
//!   forwarding on (the old sysctl values restored at exit) and, unless
//!   `--snat-subnet-routes=false`, an nftables table `inet wiremesh-<tun>`
//!   masquerading what leaves the host from the tunnel;
//! * as a user of routes: a kernel route per prefix its map routes through a
//!   peer (`ip route replace P dev <tun>`, in the main table);
//! * with an exit node: the default routes in table [`EXIT_TABLE`], used by
//!   every packet not carrying the data plane's fwmark ([`FWMARK`], set on
//!   its UDP socket), so the tunnel's own packets do not loop, with the
//!   control server's addresses kept on the main table; with LAN access the
//!   main table is consulted first for everything but its default route.
//!
//! Everything is removed at exit, and what a killed agent left behind is
//! removed at start.

use crate::control::proto::NetworkMap;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The routing table holding the exit node's default routes.
pub const EXIT_TABLE: u32 = 52_180;
/// The fwmark of the data plane's UDP socket (its packets skip the exit table).
pub const FWMARK: u32 = 0x776d;
/// `ip rule` priorities: the control server on main, LAN access, the exit table.
const PRIO_CONTROL: u32 = 5210;
const PRIO_LAN: u32 = 5230;
const PRIO_EXIT: u32 = 5250;

/// What the node offers and how (`wiremeshd node` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteOptions {
    /// Prefixes to offer (`--advertise-routes`), as given.
    pub advertise: Vec<String>,
    /// Offer `0.0.0.0/0` and `::/0` (`--advertise-exit-node`).
    pub exit_node: bool,
    /// Masquerade forwarded traffic (`--snat-subnet-routes`, on by default).
    pub snat: bool,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions { advertise: Vec::new(), exit_node: false, snat: true }
    }
}

impl RouteOptions {
    /// The routes to report in the map request.
    pub fn reported(&self) -> Vec<String> {
        let mut r = self.advertise.clone();
        if self.exit_node {
            r.extend(["0.0.0.0/0".to_string(), "::/0".to_string()]);
        }
        r
    }

    /// Whether the node forwards for others.
    pub fn is_router(&self) -> bool {
        self.exit_node || !self.advertise.is_empty()
    }
}

/// What `wiremesh set` chose, kept in the state directory (`prefs.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prefs {
    /// The exit node's name.
    #[serde(default)]
    pub exit_node: Option<String>,
    /// Keep the local networks reachable directly while using an exit node.
    #[serde(default)]
    pub exit_node_allow_lan_access: bool,
}

impl Prefs {
    /// Reads `dir/prefs.json` (defaults when absent).
    pub fn load(dir: &Path) -> Result<Prefs, String> {
        let path = dir.join("prefs.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Prefs::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes `dir/prefs.json`.
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join("prefs.json");
        let tmp = dir.join("prefs.json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// What is installed now.
#[derive(Debug, Default)]
struct Installed {
    /// Subnet prefixes routed into the TUN.
    subnets: BTreeSet<String>,
    /// Prefixes the map routes but the host already routes itself (left alone).
    kept: BTreeSet<String>,
    /// Exit routing per family (v4, v6): (lan access, control addresses).
    exit: [Option<(bool, Vec<IpAddr>)>; 2],
}

/// The host state the agent manages for routes.
pub struct HostRoutes {
    tun: String,
    opts: RouteOptions,
    /// sysctl path and old value, restored at exit.
    forwarding: Mutex<Vec<(PathBuf, String)>>,
    installed: Mutex<Installed>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out =
        Command::new(cmd).args(args).stdin(Stdio::null()).output().map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Runs `ip` for one family (`-4` or `-6`).
fn ip(family: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec![family];
    all.extend_from_slice(args);
    run("ip", &all)
}

fn nft_table(tun: &str) -> String {
    format!("wiremesh-{tun}")
}

impl HostRoutes {
    /// The host's route state for `tun` (nothing changed yet).
    pub fn new(tun: &str, opts: RouteOptions) -> HostRoutes {
        HostRoutes {
            tun: tun.into(),
            opts,
            forwarding: Mutex::new(Vec::new()),
            installed: Mutex::new(Installed::default()),
        }
    }

    /// Removes what an agent killed before left behind (exit rules and
    /// table, the masquerade table). Only for a TUN agent: a `--userspace`
    /// one must not touch the host's routing.
    pub fn remove_leftovers(&self) {
        self.remove_exit_routing(0);
        self.remove_exit_routing(1);
        let _ = run("nft", &["delete", "table", "inet", &nft_table(&self.tun)]);
    }

    /// The options the agent was started with.
    pub fn options(&self) -> &RouteOptions {
        &self.opts
    }

    /// On a router: IP forwarding on and, with SNAT, the masquerade table.
    pub fn start_router(&self) -> Result<(), String> {
        if !self.opts.is_router() {
            return Ok(());
        }
        let mut saved = lock(&self.forwarding);
        for path in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
            let old = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            std::fs::write(path, "1\n").map_err(|e| format!("cannot enable forwarding ({path}): {e}"))?;
            saved.push((PathBuf::from(path), old));
        }
        if self.opts.snat {
            let t = nft_table(&self.tun);
            // One table of our own, so cleaning up is deleting it.
            let script = format!(
                "table inet {t} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
                 iifname \"{tun}\" oifname != \"{tun}\" masquerade\n  }}\n}}\n",
                tun = self.tun
            );
            let mut child = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run nft (needed for --snat-subnet-routes): {e}"))?;
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                stdin.write_all(script.as_bytes()).map_err(|e| format!("nft: {e}"))?;
            }
            let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
            if !out.status.success() {
                return Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
        }
        Ok(())
    }

    /// Brings the kernel routes to `map`'s routes: subnet prefixes into the
    /// TUN, and exit routing when the map gives exit routes. `control` are
    /// the control server's addresses (kept off the exit node).
    pub fn apply(&self, map: &NetworkMap, prefs: &Prefs, control: &[IpAddr]) -> Result<(), String> {
        let mut want = BTreeSet::new();
        let mut exit = [false, false];
        for r in &map.routes {
            for p in &r.prefixes {
                match p.as_str() {
                    "0.0.0.0/0" => exit[0] = true,
                    "::/0" => exit[1] = true,
                    _ => {
                        want.insert(p.clone());
                    }
                }
            }
        }
        let mut inst = lock(&self.installed);
        let mut errors = Vec::new();
        let gone: Vec<String> = inst.subnets.difference(&want).cloned().collect();
        for p in gone {
            let fam = if p.contains(':') { "-6" } else { "-4" };
            if let Err(e) = ip(fam, &["route", "del", &p, "dev", &self.tun]) {
                errors.push(e);
            }
            inst.subnets.remove(&p);
        }
        for p in want.difference(&inst.subnets.clone()) {
            let fam = if p.contains(':') { "-6" } else { "-4" };
            // `add`, not `replace`: a route the host has for the same prefix
            // (the network is directly attached) wins over the tunnel.
            match ip(fam, &["route", "add", p, "dev", &self.tun]) {
                Ok(()) => {
                    inst.subnets.insert(p.clone());
                }
                Err(e) if e.contains("File exists") => {
                    if inst.kept.insert(p.clone()) {
                        crate::say!("routes: {p} is already routed on this host; keeping the host's route");
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        inst.kept.retain(|p| want.contains(p));
        for (f, wanted) in exit.into_iter().enumerate() {
            let addrs: Vec<IpAddr> = control.iter().copied().filter(|a| a.is_ipv6() == (f == 1)).collect();
            let target = wanted.then_some((prefs.exit_node_allow_lan_access, addrs));
            if inst.exit[f] == target {
                continue;
            }
            self.remove_exit_routing(f);
            if let Some((lan, addrs)) = &target {
                if let Err(e) = self.add_exit_routing(f, *lan, addrs) {
                    errors.push(e);
                    self.remove_exit_routing(f);
                    inst.exit[f] = None;
                    continue;
                }
            }
            inst.exit[f] = target;
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn add_exit_routing(&self, f: usize, lan: bool, control: &[IpAddr]) -> Result<(), String> {
        let fam = if f == 0 { "-4" } else { "-6" };
        let (table, mark) = (EXIT_TABLE.to_string(), FWMARK.to_string());
        ip(fam, &["route", "replace", "default", "dev", &self.tun, "table", &table])?;
        let prio = PRIO_CONTROL.to_string();
        for a in control {
            let a = a.to_string();
            ip(fam, &["rule", "add", "to", &a, "lookup", "main", "priority", &prio])?;
        }
        if lan {
            // Every main-table route but its default: the LAN (and the tailnet) stay direct.
            let prio = PRIO_LAN.to_string();
            ip(fam, &["rule", "add", "lookup", "main", "suppress_prefixlength", "0", "priority", &prio])?;
        }
        let prio = PRIO_EXIT.to_string();
        ip(fam, &["rule", "add", "not", "fwmark", &mark, "lookup", &table, "priority", &prio])
    }

    /// Removes this agent's exit rules and table for family `f` (0: v4, 1: v6).
    fn remove_exit_routing(&self, f: usize) {
        let fam = if f == 0 { "-4" } else { "-6" };
        for prio in [PRIO_CONTROL, PRIO_LAN, PRIO_EXIT] {
            let prio = prio.to_string();
            // Each rule at our priorities, until none is left.
            for _ in 0..64 {
                if ip(fam, &["rule", "del", "priority", &prio]).is_err() {
                    break;
                }
            }
        }
        let _ = ip(fam, &["route", "flush", "table", &EXIT_TABLE.to_string()]);
    }

    /// Removes the routes (the TUN's own go with it anyway) and the exit routing.
    pub fn clear(&self) {
        let mut inst = lock(&self.installed);
        for p in std::mem::take(&mut inst.subnets) {
            let fam = if p.contains(':') { "-6" } else { "-4" };
            let _ = ip(fam, &["route", "del", &p, "dev", &self.tun]);
        }
        for f in 0..2 {
            if inst.exit[f].take().is_some() {
                self.remove_exit_routing(f);
            }
        }
    }

    /// Undoes everything: routes, exit routing, masquerade, forwarding.
    pub fn cleanup(&self) {
        self.clear();
        if self.opts.is_router() && self.opts.snat {
            let _ = run("nft", &["delete", "table", "inet", &nft_table(&self.tun)]);
        }
        for (path, old) in lock(&self.forwarding).drain(..) {
            if let Err(e) = std::fs::write(&path, old) {
                eprintln!("wiremeshd node: cannot restore {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_report_exit_routes_and_prefs_round_trip() {
        let o = RouteOptions { advertise: vec!["10.1.0.0/24".into()], exit_node: true, snat: false };
        assert_eq!(o.reported(), vec!["10.1.0.0/24", "0.0.0.0/0", "::/0"]);
        assert!(o.is_router() && !RouteOptions::default().is_router());
        let dir = std::env::temp_dir().join(format!("wiremesh-prefs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Prefs::load(&dir).unwrap(), Prefs::default());
        let p = Prefs { exit_node: Some("exit1".into()), exit_node_allow_lan_access: true };
        p.save(&dir).unwrap();
        assert_eq!(Prefs::load(&dir).unwrap(), p);
        std::fs::write(dir.join("prefs.json"), b"{nope").unwrap();
        assert!(Prefs::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
