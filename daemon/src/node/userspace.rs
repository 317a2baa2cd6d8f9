//! The node agent and the standalone interface on the userspace netstack
//! (`--userspace`): no TUN device, no root. The agent reconciles the
//! netstack through the same wg(8) `set` path as the TUN data plane; the
//! tailnet addresses go onto the netstack's interface instead of a TUN
//! device; local programs reach the tailnet through the proxies of
//! [`super::proxy`].
//!
//! Embedding: [`open_config`] starts a node from a `wg setconf` file and its
//! addresses; [`join`] joins a control server with an auth key and follows
//! its map inside the calling process (a service such as the identity
//! service holds its own tailnet address this way). Both give a
//! [`Netstack`] with `listen_tcp`, `connect_tcp`, `bind_udp` and `peer_of`;
//! [`Embedded::node_of`] answers which tailnet node a connection is from.

use super::proxy::{self, Dialer, Proxies};
use super::{lock, Agent, Options};
use crate::control::proto::{self, NodeInfo};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wiremesh_dataplane::driver::{Control, Worker};
use wiremesh_dataplane::netstack::{self, Netstack};
use wiremesh_dataplane::tun::{Options as TunOptions, Tun};
use wiremesh_dataplane::uapi::{parse_set, serve_uapi, DeviceConfig, Limits, UapiSocket};

/// `--userspace` and what comes with it.
#[derive(Debug, Clone, Default)]
pub struct Userspace {
    /// Local proxies and forwards.
    pub proxies: Proxies,
}

/// The data plane an agent drives: the TUN worker or the userspace netstack.
pub(super) enum DataPlane {
    Tun { control: Control, worker: std::thread::JoinHandle<std::io::Result<()>>, wg_socket: UapiSocket, port: u16 },
    Userspace { stack: Netstack, wg_socket: Option<UapiSocket> },
}

/// Serves the wg(8) socket for `ifname` with `control` (the caller keeps the socket).
fn serve_wg_socket(ifname: &str, control: &Control) -> Result<UapiSocket, String> {
    let socket = UapiSocket::bind(ifname).map_err(|e| format!("cannot serve the wg(8) socket: {e}"))?;
    let listener = socket.try_clone_listener().map_err(|e| e.to_string())?;
    let control = control.clone();
    std::thread::Builder::new()
        .name("uapi".into())
        .spawn(move || serve_uapi(listener, Limits::default(), move |req| control.uapi(req)))
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

/// Starts a userspace netstack and, where the process may create it, the
/// wg(8) socket (`/var/run/wireguard` is root's; without it `wg show` does
/// not see the node, and nothing else changes).
fn start_netstack(ifname: &str, config: DeviceConfig, options: netstack::Options) -> Result<DataPlane, String> {
    let stack = Netstack::start(config, options).map_err(|e| format!("cannot start the userspace netstack: {e}"))?;
    let wg_socket = match serve_wg_socket(ifname, &stack.control()) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("wiremeshd: {e} (running without it)");
            None
        }
    };
    Ok(DataPlane::Userspace { stack, wg_socket })
}

impl DataPlane {
    /// The data plane `opts` asks for, configured with `config`.
    pub(super) fn start(opts: &Options, config: DeviceConfig) -> Result<DataPlane, String> {
        if opts.userspace.is_some() {
            // No kernel routes follow the netstack, so no mark is needed
            // (and setting one takes CAP_NET_ADMIN, which --userspace must not).
            let mut config = config;
            config.fwmark = 0;
            let options = netstack::Options { mtu: opts.mtu as usize, ..netstack::Options::default() };
            return start_netstack(&opts.tun, config, options);
        }
        let tun_opts = TunOptions { nonblocking: true, ..TunOptions::with_offloads() };
        let tun = Tun::create(&opts.tun, &tun_opts).map_err(|e| format!("cannot create {}: {e}", opts.tun))?;
        tun.set_mtu(opts.mtu).map_err(|e| format!("cannot set the MTU of {}: {e}", opts.tun))?;
        tun.set_up(true).map_err(|e| format!("cannot bring {} up: {e}", opts.tun))?;
        let (worker, control) = Worker::new(tun, config).map_err(|e| format!("cannot start the data plane: {e}"))?;
        let port = worker.listen_port();
        // The wg(8) socket, so `wg show` sees what the agent configured.
        let wg_socket = serve_wg_socket(&opts.tun, &control)?;
        let worker = std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || worker.run())
            .map_err(|e| e.to_string())?;
        Ok(DataPlane::Tun { control, worker, wg_socket, port })
    }

    /// The wg(8) configuration handle.
    pub(super) fn control(&self) -> Control {
        match self {
            DataPlane::Tun { control, .. } => control.clone(),
            DataPlane::Userspace { stack, .. } => stack.control(),
        }
    }

    /// The WireGuard UDP port.
    pub(super) fn listen_port(&self) -> u16 {
        match self {
            DataPlane::Tun { port, .. } => *port,
            DataPlane::Userspace { stack, .. } => stack.listen_port(),
        }
    }

    /// The netstack, in userspace mode.
    pub(super) fn netstack(&self) -> Option<Netstack> {
        match self {
            DataPlane::Tun { .. } => None,
            DataPlane::Userspace { stack, .. } => Some(stack.clone()),
        }
    }

    /// Stops the data plane; the wg(8) socket goes with it.
    pub(super) fn stop(self) {
        match self {
            DataPlane::Tun { control, worker, wg_socket, .. } => {
                control.stop();
                let _ = worker.join();
                drop(wg_socket);
            }
            DataPlane::Userspace { stack, wg_socket } => {
                stack.shutdown();
                drop(wg_socket);
            }
        }
    }
}

/// Puts the node's tailnet addresses on the netstack (the tailnet's /10
/// and /48, as on a TUN device).
pub(super) fn set_addresses(stack: &Netstack, v4: IpAddr, v6: IpAddr) {
    stack.set_addresses(&[(v4, crate::control::db::IPV4_PREFIX), (v6, 48)]);
}

/// Tailnet names to addresses from the agent's current map: a node's short
/// name or full name (what the MagicDNS resolver answers), IPv4 first.
fn map_resolver(agent: &Arc<Agent>) -> proxy::Resolve {
    let agent = agent.clone();
    Arc::new(move |name: &str| {
        let shared = lock(&agent.shared);
        let node = super::local::resolve(shared.map.as_ref()?, name)?;
        Some(vec![IpAddr::V4(node.ipv4), IpAddr::V6(node.ipv6)])
    })
}

/// Starts the agent's proxies and forwards (userspace mode only).
pub(super) async fn start_proxies(agent: &Arc<Agent>, stack: Netstack) -> Result<(), String> {
    let Some(us) = &agent.opts.userspace else { return Ok(()) };
    let dialer = Dialer { stack, resolve: map_resolver(agent) };
    proxy::start(&us.proxies, dialer).await?;
    for (what, addr) in [("SOCKS5", us.proxies.socks5), ("HTTP", us.proxies.http)] {
        if let Some(a) = addr {
            crate::say!("{what} proxy on {a}");
        }
    }
    Ok(())
}

/// Reads a `wg setconf` file's text into a configuration.
pub fn parse_config(text: &str) -> Result<DeviceConfig, String> {
    let mut config = DeviceConfig::default();
    let body = crate::conf::to_uapi_set(text).map_err(|e| e.to_string())?;
    let ops = parse_set(&body).map_err(|e| e.to_string())?;
    config.apply(&ops).map_err(|e| e.to_string())?;
    Ok(config)
}

/// Opens a userspace node from a `wg setconf` file's text (private key,
/// listen port, peers) holding `addresses`: the embedding entry point
/// without a control server.
pub fn open_config(text: &str, addresses: &[(IpAddr, u8)], mtu: usize) -> Result<Netstack, String> {
    let config = parse_config(text)?;
    let options = netstack::Options { addresses: addresses.to_vec(), mtu, ..netstack::Options::default() };
    Netstack::start(config, options).map_err(|e| format!("cannot start the userspace netstack: {e}"))
}

/// `wiremeshd interface <ifname> --userspace`: what to run.
#[derive(Debug, Clone)]
pub struct Interface {
    /// The addresses the node holds (`--address`), e.g. `100.64.0.5/10`.
    pub addresses: Vec<(IpAddr, u8)>,
    /// The tunnel MTU.
    pub mtu: usize,
    /// Local proxies and forwards (names are IP literals: there is no map).
    pub proxies: Proxies,
}

/// Parses `ADDRESS/PREFIX` (a bare address is a host prefix).
pub fn parse_address(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| format!("{s:?} is no IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("{s:?}: bad prefix length"))?,
        None => max,
    };
    Ok((ip, len))
}

/// Runs `wiremeshd interface <ifname> --userspace` until SIGTERM or SIGINT.
pub fn run_interface(ifname: &str, config: DeviceConfig, us: &Interface, ready: impl FnOnce()) -> Result<(), String> {
    if us.addresses.is_empty() {
        return Err("--userspace needs the node's tailnet address (--address 100.64.0.5/10)".into());
    }
    let options = netstack::Options { addresses: us.addresses.clone(), mtu: us.mtu, ..netstack::Options::default() };
    let dp = start_netstack(ifname, config, options)?;
    let Some(stack) = dp.netstack() else { unreachable!("start_netstack makes a userspace data plane") };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = rt.block_on(async {
        let dialer = Dialer { stack: stack.clone(), resolve: Arc::new(|_: &str| None) };
        proxy::start(&us.proxies, dialer).await?;
        crate::say!("interface {ifname} (userspace) on UDP port {}", stack.listen_port());
        ready();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<(), String>(())
    });
    dp.stop();
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    result
}

/// Options for [`join`]: the control server, an auth key (for the first
/// registration), a host name and a state directory (keys); the rest as
/// `wiremeshd node --userspace` has them by default.
pub fn join_options(
    control: crate::control::client::ControlUrl,
    auth_key: Option<String>,
    hostname: &str,
    state: std::path::PathBuf,
) -> Options {
    Options {
        control,
        control_replicas: Vec::new(),
        auth_key,
        hostname: hostname.to_string(),
        socket: state.join("api.sock"),
        state,
        tun: format!("wm-{}", hostname.chars().take(12).collect::<String>()),
        listen_port: 0,
        mtu: 1280,
        userspace: Some(Userspace::default()),
        accept_dns: false,
        map_version: proto::MAP_VERSION,
        routes: super::routes::RouteOptions::default(),
        federation: None,
    }
}

/// A userspace node running inside this process, following its control
/// server's map (see [`join`]).
pub struct Embedded {
    stack: Netstack,
    agent: Arc<Agent>,
    task: tokio::task::JoinHandle<Result<(), String>>,
    dp: Mutex<Option<DataPlane>>,
}

/// Joins the tailnet from inside this process: registers with `opts.auth_key`
/// if the state directory's machine is unknown, follows the map on the
/// current tokio runtime and keeps the netstack on it. `opts.socket` (the
/// CLI's local API) is not served and the host's DNS is never touched; the
/// proxies in `opts.userspace` are served if any are set.
pub async fn join(mut opts: Options) -> Result<Embedded, String> {
    opts.accept_dns = false;
    if opts.userspace.is_none() {
        opts.userspace = Some(Userspace::default());
    }
    let (agent, dp) =
        tokio::task::spawn_blocking(move || super::start(opts)).await.map_err(|e| format!("cannot start: {e}"))??;
    let Some(stack) = dp.netstack() else { unreachable!("a userspace agent has a netstack") };
    if let Err(e) = start_proxies(&agent, stack.clone()).await {
        dp.stop();
        return Err(e);
    }
    let follower = agent.clone();
    let task = tokio::spawn(async move { follower.follow_forever().await });
    Ok(Embedded { stack, agent, task, dp: Mutex::new(Some(dp)) })
}

impl Embedded {
    /// The node's netstack: listen, connect, bind on its tailnet addresses.
    pub fn netstack(&self) -> &Netstack {
        &self.stack
    }

    /// Waits until the node holds its tailnet addresses (IPv4, IPv6), that
    /// is until its first map arrived.
    pub async fn ready(&self, timeout: Duration) -> Result<(IpAddr, IpAddr), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(addrs) = *lock(&self.agent.addresses) {
                return Ok(addrs);
            }
            if self.task.is_finished() {
                return Err(match lock(&self.agent.shared).last_error.clone() {
                    Some(e) => format!("the node stopped: {e}"),
                    None => "the node stopped".into(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                let why = lock(&self.agent.shared).last_error.clone().unwrap_or_else(|| "no map yet".into());
                return Err(format!("not on the tailnet after {timeout:?}: {why}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The tailnet node that `remote` (a connection's remote address)
    /// belongs to: the peer whose key authenticated the packets, by
    /// cryptokey routing, as the current map describes it.
    pub fn node_of(&self, remote: IpAddr) -> Option<NodeInfo> {
        let peer = self.stack.peer_of(remote)?;
        let key = proto::b64_key(&peer.public_key.0);
        let shared = lock(&self.agent.shared);
        shared.map.as_ref()?.peers.iter().find(|n| n.node_key == key).cloned()
    }

    /// This node as the map describes it (once [`Embedded::ready`]).
    pub fn self_node(&self) -> Option<NodeInfo> {
        lock(&self.agent.shared).map.as_ref().map(|m| m.self_node.clone())
    }

    /// Stops following the map and stops the netstack.
    pub async fn shutdown(&self) {
        self.task.abort();
        let dp = lock(&self.dp).take();
        if let Some(dp) = dp {
            let _ = tokio::task::spawn_blocking(move || dp.stop()).await;
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(dp) = lock(&self.dp).take() {
            dp.stop();
        }
    }
}
