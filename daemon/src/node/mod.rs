//! `wiremeshd node`: the node agent. It keeps its keys in its state
//! directory, registers once, holds its map stream open, and reconciles the
//! data plane with wg(8) `set` requests through [`Control::uapi`], the same
//! path `wg set` takes. When the control server is away it keeps the data
//! plane as the last map left it and reconnects with backoff.

pub mod dns;
pub mod keys;
pub mod local;
pub mod proxy;
pub mod reconcile;
pub mod relay;
pub mod routes;
pub mod userspace;

use crate::control::client::{Client, ClientError, ControlUrl};
use crate::control::proto::{self, MapRequest, NetworkMap, RegisterRequest, StreamMessageV2};
use crate::control::server::KEEPALIVE;
use http_body_util::BodyExt;
use local::{AgentState, LocalRequest, LocalResponse};
use reconcile::Reconciler;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use wiremesh_dataplane::driver::Control;
use wiremesh_dataplane::uapi::{parse_set, DeviceConfig, Request};

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// First wait after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(250);

/// What `wiremeshd node` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The control server.
    pub control: ControlUrl,
    /// Further replicas of it (same certificate), tried in order when the
    /// one in use cannot be reached or its map stream breaks.
    pub control_replicas: Vec<ControlUrl>,
    /// The auth key, needed for the first registration only.
    pub auth_key: Option<String>,
    /// The host name to ask for.
    pub hostname: String,
    /// State directory (keys).
    pub state: PathBuf,
    /// TUN device name.
    pub tun: String,
    /// UDP listen port (0: any).
    pub listen_port: u16,
    /// TUN MTU.
    pub mtu: u32,
    /// Local API socket.
    pub socket: PathBuf,
    /// Run on the userspace netstack instead of TUN (`--userspace`).
    pub userspace: Option<userspace::Userspace>,
    /// Point the host's /etc/resolv.conf at the resolver while on the
    /// tailnet, restoring the original after (`--accept-dns`).
    pub accept_dns: bool,
    /// The map-stream version to ask for: [`proto::MAP_VERSION`] (deltas),
    /// or 1 (full maps only) (`--map-version`).
    pub map_version: u32,
    /// Subnet routes and exit node offered (`--advertise-routes`,
    /// `--advertise-exit-node`, `--snat-subnet-routes`).
    pub routes: routes::RouteOptions,
    /// Register with an outside issuer's ID token instead of an auth key
    /// (`--client-id`, `--id-token`/`--id-token-file`, `--advertise-tags`).
    pub federation: Option<FederatedLogin>,
}

/// How a node registers through a trust credential (docs/identity.md, Federation).
#[derive(Clone)]
pub struct FederatedLogin {
    /// The credential's client ID.
    pub client_id: String,
    /// The ID token, or the file it is read from at each registration (so
    /// a short-lived token refreshed in place by its issuer's tooling works).
    pub id_token: IdTokenSource,
    /// The tags asked for.
    pub tags: Vec<String>,
}

/// Where the ID token comes from.
#[derive(Clone)]
pub enum IdTokenSource {
    /// Given on the command line.
    Value(String),
    /// Read from this file (trailing white space dropped).
    File(PathBuf),
}

impl std::fmt::Debug for FederatedLogin {
    /// Never the token itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = match &self.id_token {
            IdTokenSource::Value(_) => "<token>".to_string(),
            IdTokenSource::File(p) => p.display().to_string(),
        };
        write!(f, "FederatedLogin {{ client_id: {:?}, id_token: {token}, tags: {:?} }}", self.client_id, self.tags)
    }
}

impl IdTokenSource {
    fn read(&self) -> Result<String, String> {
        match self {
            IdTokenSource::Value(t) => Ok(t.clone()),
            IdTokenSource::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("--id-token-file {}: {e}", p.display())),
        }
    }
}

/// What the local API reads.
struct Shared {
    map: Option<NetworkMap>,
    connected: bool,
    /// Why the last attempt to connect failed (cleared by a map).
    last_error: Option<String>,
}

/// Marks, in the state directory, a node told `down`, so it stays down
/// across a restart until `up`.
const DOWN_MARK: &str = "down";

/// How often the agent looks for a new reflexive address to report.
const REFLEXIVE_CHECK: Duration = Duration::from_secs(1);

struct Agent {
    opts: Options,
    client: Client,
    machine: keys::MachineKey,
    /// The WireGuard public key, base64 (replaced at logout).
    node_key: Mutex<String>,
    /// The auth key to register with, if any (forgotten at logout).
    auth_key: Mutex<Option<String>>,
    /// Whether `auth_key` came from `wiremesh up` (a refusal then logs the
    /// node out again instead of ending the agent).
    key_from_cli: std::sync::atomic::AtomicBool,
    /// What the node was told to be (`up`, `down`, `logout`).
    want: tokio::sync::watch::Sender<AgentState>,
    /// What the map follower has carried out (peers removed for `down`...).
    reached: tokio::sync::watch::Sender<AgentState>,
    /// One `up`/`down`/`logout` at a time.
    commands: tokio::sync::Mutex<()>,
    /// Start handshakes with the online peers after the next map: set when
    /// the data plane starts afresh (agent start, `up` after `down`), since
    /// peers may still hold sessions with this node that it no longer has,
    /// and would otherwise only notice after WireGuard's 15 s of silence.
    nudge: std::sync::atomic::AtomicBool,
    listen_port: u16,
    control: Control,
    shared: Mutex<Shared>,
    reconciler: Mutex<Reconciler>,
    addresses: Mutex<Option<(IpAddr, IpAddr)>>,
    dns: Arc<dns::Resolver>,
    /// `--accept-dns`: the host's resolv.conf, pointed at the resolver.
    host_dns: Option<dns::HostDns>,
    /// The userspace netstack (`--userspace`): it holds the addresses, no TUN.
    netstack: Option<wiremesh_dataplane::netstack::Netstack>,
    /// Kernel routes, forwarding and masquerade for subnet routes and exit nodes.
    host_routes: routes::HostRoutes,
    /// `wiremesh set`'s choices (exit node), kept in the state directory.
    prefs: Mutex<routes::Prefs>,
    /// Reopens the map stream (the exit node choice travels in its request).
    reopen: tokio::sync::Notify,
    /// The control server's addresses, kept off the exit node.
    control_addrs: Vec<IpAddr>,
    /// Path discovery's settings as last given to the data plane, and the
    /// endpoints the open map stream reported (docs/nat.md).
    disco: Mutex<Option<wiremesh_dataplane::disco::DiscoSettings>>,
    reported: Mutex<Vec<String>>,
    /// The relay client task and the relay it serves (docs/nat.md).
    relay: Mutex<Option<RelayRun>>,
    /// The relay client's connections, for `wiremesh status`.
    relay_connections: relay::Connections,
}

/// The running relay client: its home relay, the node key it proves, the
/// peers' relays it follows, and the task.
struct RelayRun {
    home: relay::RelayTarget,
    node_key: wiremesh_core::keys::PublicKey,
    via: tokio::sync::watch::Sender<std::collections::BTreeMap<wiremesh_core::keys::PublicKey, relay::RelayTarget>>,
    task: tokio::task::AbortHandle,
}

/// Why following the map stopped.
enum Stop {
    /// Try again after a pause.
    Retry(String),
    /// Give up: the process exits with this error.
    Fatal(String),
    /// The auth key was refused.
    Refused(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The machine's host name.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Everything before following the map: the state directory and keys, the
/// data plane and the agent (shared by [`run`] and [`userspace::join`]).
fn start(opts: Options) -> Result<(Arc<Agent>, userspace::DataPlane), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.state)
        .map_err(|e| format!("{}: {e}", opts.state.display()))?;
    let host_dns = opts.accept_dns.then(|| dns::HostDns::new("/etc/resolv.conf", opts.state.join("resolv.conf.orig")));
    if let Some(h) = &host_dns {
        // A backup left by an agent that was killed.
        h.restore().map_err(|e| format!("cannot restore the host's resolv.conf: {e}"))?;
    }
    let machine = keys::MachineKey::load_or_create(&opts.state.join("machine.key"))?;
    let node_private = keys::load_or_create_node_key(&opts.state.join("node.key"))?;
    let node_key = proto::b64_key(&node_private.public_key().0);

    let mut config = DeviceConfig::default();
    // The fwmark lets the tunnel's own packets skip an exit node's routes.
    let setup = format!(
        "private_key={}\nlisten_port={}\nfwmark={}\n",
        proto::hex(&node_private.to_bytes()),
        opts.listen_port,
        routes::FWMARK
    );
    config.apply(&parse_set(&setup).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    drop(setup);
    // The TUN worker, or the userspace netstack; either serves the wg(8) socket.
    let dp = userspace::DataPlane::start(&opts, config)?;
    let (control, listen_port) = (dp.control(), dp.listen_port());

    let initial = if opts.state.join(DOWN_MARK).exists() { AgentState::Down } else { AgentState::Up };
    let prefs = routes::Prefs::load(&opts.state)?;
    let host_routes = routes::HostRoutes::new(&opts.tun, opts.routes.clone());
    if dp.netstack().is_none() {
        host_routes.remove_leftovers();
        if let Err(e) = host_routes.start_router() {
            host_routes.cleanup();
            dp.stop();
            return Err(format!("cannot set up routing: {e}"));
        }
    }
    let control_addrs: Vec<IpAddr> = {
        use std::net::ToSocketAddrs;
        std::iter::once(&opts.control)
            .chain(&opts.control_replicas)
            .flat_map(|c| (c.host.as_str(), c.port).to_socket_addrs().into_iter().flatten().map(|s| s.ip()))
            .collect()
    };
    let agent = Arc::new(Agent {
        host_dns,
        client: Client::with_replicas(opts.control.clone(), opts.control_replicas.clone()),
        auth_key: Mutex::new(opts.auth_key.clone()),
        key_from_cli: false.into(),
        want: tokio::sync::watch::channel(initial).0,
        reached: tokio::sync::watch::channel(initial).0,
        commands: tokio::sync::Mutex::new(()),
        nudge: true.into(),
        opts,
        machine,
        node_key: Mutex::new(node_key),
        listen_port,
        control: control.clone(),
        shared: Mutex::new(Shared { map: None, connected: false, last_error: None }),
        reconciler: Mutex::new(Reconciler::default()),
        addresses: Mutex::new(None),
        dns: Arc::default(),
        netstack: dp.netstack(),
        host_routes,
        prefs: Mutex::new(prefs),
        reopen: tokio::sync::Notify::new(),
        control_addrs,
        disco: Mutex::new(None),
        reported: Mutex::new(Vec::new()),
        relay: Mutex::new(None),
        relay_connections: relay::Connections::default(),
    });
    Ok((agent, dp))
}

/// Runs the agent until SIGTERM or SIGINT, or until it cannot go on.
pub fn run(opts: Options) -> Result<(), String> {
    let (agent, dp) = start(opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let proxies = match dp.netstack() {
        Some(stack) => rt.block_on(userspace::start_proxies(&agent, stack)),
        None => Ok(()),
    };
    let result = proxies.and_then(|()| rt.block_on(agent.clone().main()));
    let _ = std::fs::remove_file(&agent.opts.socket);
    if agent.netstack.is_none() {
        agent.host_routes.cleanup();
    }
    if let Some(Err(e)) = agent.host_dns.as_ref().map(dns::HostDns::restore) {
        eprintln!("wiremeshd node: cannot restore the host's resolv.conf: {e}");
    }
    dp.stop();
    result
}

impl Agent {
    async fn main(self: Arc<Self>) -> Result<(), String> {
        if let Some(dir) = self.opts.socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&self.opts.socket);
        let local = tokio::net::UnixListener::bind(&self.opts.socket)
            .map_err(|e| format!("cannot serve {}: {e}", self.opts.socket.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.opts.socket, std::fs::Permissions::from_mode(0o600));
        }
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = local.accept().await {
                let me = me.clone();
                tokio::spawn(async move { me.serve_local(stream).await });
            }
        });
        crate::say!(
            "node agent on {} (port {}), local API {}",
            self.opts.tun,
            self.listen_port,
            self.opts.socket.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
        tokio::select! {
            r = self.follow_forever() => r,
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    }

    /// Follows the map while the node is wanted up; carries out `down` and
    /// `logout` (it alone applies maps, so no map can land after them).
    async fn follow_forever(&self) -> Result<(), String> {
        let mut want = self.want.subscribe();
        let mut backoff = MIN_BACKOFF;
        loop {
            let wanted = *want.borrow_and_update();
            if wanted != AgentState::Up {
                if *self.reached.borrow() != wanted {
                    self.disconnect(wanted);
                    self.reached.send_replace(wanted);
                }
                if want.changed().await.is_err() {
                    return Ok(());
                }
                backoff = MIN_BACKOFF;
                continue;
            }
            self.reached.send_replace(AgentState::Up);
            let mut got_map = false;
            // `biased`: a `down` or `logout` wins over whatever the stream
            // brings (such as the `node_removed` a logout causes).
            let stop = tokio::select! {
                biased;
                _ = want.wait_for(|w| *w != AgentState::Up) => None,
                // `wiremesh set` changed what the map request carries.
                _ = self.reopen.notified() => None,
                stop = self.follow(&mut got_map) => Some(stop),
            };
            lock(&self.shared).connected = false;
            let why = match stop {
                None => continue,
                Some(Stop::Fatal(e)) => return Err(e),
                Some(Stop::Refused(e)) if self.key_from_cli.load(std::sync::atomic::Ordering::SeqCst) => {
                    // A key given by `wiremesh up` was refused: logged out
                    // again, waiting for another; the agent runs on.
                    eprintln!("wiremeshd node: {e}");
                    lock(&self.shared).last_error = Some(e);
                    self.forget_auth_key();
                    self.want.send_replace(AgentState::LoggedOut);
                    continue;
                }
                Some(Stop::Refused(e)) => return Err(e),
                Some(Stop::Retry(e)) => {
                    // Next time, the next replica first (if there are several).
                    self.client.next_replica();
                    e
                }
            };
            eprintln!("wiremeshd node: {why}; retrying in {backoff:?}");
            lock(&self.shared).last_error = Some(why);
            if got_map {
                backoff = MIN_BACKOFF;
            }
            // A little jitter so nodes do not all come back in the same instant.
            let jitter = Duration::from_millis(u64::from(std::process::id() % 97));
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = want.wait_for(|w| *w != AgentState::Up) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Takes the node off the tailnet (the stream is already closed): every
    /// peer removed and the resolver emptied; for a logout also the
    /// addresses, since they are no longer the node's.
    fn disconnect(&self, to: AgentState) {
        if let Err(e) = self.apply_none() {
            eprintln!("wiremeshd node: cannot remove the peers: {e}");
        }
        self.host_routes.clear();
        if let Some(Err(e)) = self.host_dns.as_ref().map(dns::HostDns::restore) {
            eprintln!("wiremeshd node: cannot restore the host's resolv.conf: {e}");
        }
        self.nudge.store(true, std::sync::atomic::Ordering::SeqCst);
        if to == AgentState::LoggedOut {
            if let Err(e) = run_ip(&["addr", "flush", "dev", &self.opts.tun]) {
                eprintln!("wiremeshd node: {e}");
            }
            *lock(&self.addresses) = None;
        }
        crate::say!("{to}: peers removed, map stream closed");
    }

    /// Opens the map stream (registering first if the server does not know
    /// this machine) and applies each map until the stream ends.
    async fn follow(&self, got_map: &mut bool) -> Stop {
        let mut endpoints = local_endpoints(self.listen_port, &self.opts.tun);
        // The reflexive address STUN found, first: the one peers behind
        // other NATs can reach.
        let reflexive = self.control.disco_status().and_then(|s| s.reflexive);
        if let Some(r) = reflexive.map(|r| r.to_string()).filter(|r| !endpoints.contains(r)) {
            endpoints.insert(0, r);
        }
        lock(&self.reported).clone_from(&endpoints);
        let resp = match self.open_map(&endpoints).await {
            // Unknown to the server, or its node key expired: (re-)register
            // with the auth key, which keeps this machine's addresses.
            Err(ClientError::Api { status: 401, body })
                if body.code == "unknown_machine" || body.code == "node_expired" =>
            {
                let registered = if let Some(fed) = &self.opts.federation {
                    let token = match fed.id_token.read() {
                        Ok(t) => t,
                        Err(e) => return Stop::Retry(e),
                    };
                    self.register_federated(fed, token, &endpoints).await
                } else {
                    let Some(auth_key) = lock(&self.auth_key).clone() else {
                        return Stop::Refused("this machine is not registered and no --auth-key was given".into());
                    };
                    self.register(auth_key, &endpoints).await
                };
                match registered {
                    Ok(node) => crate::say!("registered as {} ({}, {})", node.fqdn, node.ipv4, node.ipv6),
                    Err(ClientError::Api { status, body }) if status != 401 || body.code != "bad_challenge" => {
                        return Stop::Refused(format!("registration refused: {} ({})", body.error, body.code));
                    }
                    Err(e) => return Stop::Retry(e.to_string()),
                }
                match self.open_map(&endpoints).await {
                    Ok(r) => r,
                    Err(e) => return Stop::Retry(e.to_string()),
                }
            }
            Err(e) => return Stop::Retry(e.to_string()),
            Ok(r) => r,
        };
        // The server names the stream's version; one that only speaks
        // version 1 (no header) sends full maps only.
        let version = resp
            .headers()
            .get(proto::MAP_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1);
        let from = self.client.url();
        crate::say!("map stream open (version {version}) from {}:{}", from.host, from.port);
        lock(&self.shared).connected = true;
        // The map deltas apply to: the last full map with every delta since.
        let mut current: Option<NetworkMap> = None;
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let mut silent_until = tokio::time::Instant::now() + KEEPALIVE * 3;
        let mut check = tokio::time::interval(REFLEXIVE_CHECK);
        let mut paths_seen = std::collections::BTreeMap::new();
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout_at(silent_until, body.frame()) => f,
                _ = check.tick() => {
                    // A reflexive address not reported yet (the node is
                    // behind a NAT) is reported by reopening the stream:
                    // endpoints travel in the map request.
                    let status = self.control.disco_status();
                    let now = status.as_ref().and_then(|s| s.reflexive).map(|r| r.to_string());
                    if let Some(r) = now.filter(|r| !lock(&self.reported).contains(r)) {
                        crate::say!("reflexive address {r}: reporting it");
                        self.reopen.notify_one();
                    }
                    // Each peer's chosen path, logged when it changes.
                    for (key, path, rtt) in status.map(|s| s.paths).unwrap_or_default() {
                        if paths_seen.get(&key) != Some(&path) {
                            let b64 = proto::b64_key(&key.0);
                            match path {
                                Some(wiremesh_core::disco::Path::Direct(a)) => {
                                    crate::say!("path to {b64}: direct {a} (rtt {rtt:?})")
                                }
                                Some(wiremesh_core::disco::Path::Relay) => crate::say!("path to {b64}: relay"),
                                None => crate::say!("path to {b64}: none found (WireGuard's own endpoint)"),
                            }
                            paths_seen.insert(key, path);
                        }
                    }
                    continue;
                }
            };
            silent_until = tokio::time::Instant::now() + KEEPALIVE * 3;
            let frame = match frame {
                Err(_) => return Stop::Retry("map stream silent for too long".into()),
                Ok(None) => return Stop::Retry("map stream ended".into()),
                Ok(Some(Err(e))) => return Stop::Retry(format!("map stream broke: {e}")),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            buf.extend_from_slice(&data);
            if buf.len() > 64 << 20 {
                return Stop::Retry("map line too long".into());
            }
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                // Version 1 lines are a subset of version 2's.
                let (map, kind) = match serde_json::from_slice::<StreamMessageV2>(&line) {
                    Ok(StreamMessageV2::Map(map)) => (current.insert(*map), "map"),
                    Ok(StreamMessageV2::Delta(d)) => match current.as_mut() {
                        Some(map) if version >= 2 => {
                            map.apply(*d);
                            (map, "delta")
                        }
                        Some(_) => return Stop::Retry("a delta on a version 1 map stream".into()),
                        None => return Stop::Retry("a delta before the full map".into()),
                    },
                    Ok(StreamMessageV2::Keepalive) => continue,
                    Ok(StreamMessageV2::Error(e)) if e.code == "node_removed" => {
                        let _ = self.apply_none();
                        return Stop::Fatal(format!("{} ({})", e.error, e.code));
                    }
                    Ok(StreamMessageV2::Error(e)) => return Stop::Retry(format!("{} ({})", e.error, e.code)),
                    Err(e) => return Stop::Retry(format!("bad map line: {e}")),
                };
                *got_map = true;
                lock(&self.shared).last_error = None;
                if let Err(e) = self.apply(map.clone(), kind) {
                    eprintln!("wiremeshd node: cannot apply the map: {e}");
                }
            }
        }
    }

    async fn open_map(&self, endpoints: &[String]) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let challenge = self.client.challenge().await?;
        let request = MapRequest {
            machine_key: self.machine.public_hex(),
            node_key: lock(&self.node_key).clone(),
            endpoints: endpoints.to_vec(),
            challenge: proto::hex(&challenge),
            signature: String::new(),
        };
        let mut req = proto::RoutedMapRequest {
            request,
            routes: self.opts.routes.reported(),
            exit_node: lock(&self.prefs).exit_node.clone(),
        };
        let fp = &self.opts.control.fingerprint;
        req.request.signature = self.machine.sign_hex(&proto::map_message_with_routes(&challenge, fp, &req));
        let body = serde_json::to_vec(&req).map_err(|e| ClientError::Transport(e.to_string()))?;
        let path = format!("{}/map?version={}", proto::API, self.opts.map_version);
        let resp = self.client.send(hyper::Method::POST, &path, body, None).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        Err(crate::control::client::api_error(status, &bytes))
    }

    async fn register(&self, auth_key: String, endpoints: &[String]) -> Result<proto::NodeInfo, ClientError> {
        let challenge = self.client.challenge().await?;
        let mut req = RegisterRequest {
            auth_key,
            machine_key: self.machine.public_hex(),
            node_key: lock(&self.node_key).clone(),
            hostname: self.opts.hostname.clone(),
            endpoints: endpoints.to_vec(),
            challenge: proto::hex(&challenge),
            signature: String::new(),
        };
        req.signature =
            self.machine.sign_hex(&proto::register_message(&challenge, &self.opts.control.fingerprint, &req));
        self.client.json(hyper::Method::POST, &format!("{}/register", proto::API), Some(&req), None).await
    }

    /// Registers with an outside issuer's ID token through a trust credential.
    async fn register_federated(
        &self,
        fed: &FederatedLogin,
        id_token: String,
        endpoints: &[String],
    ) -> Result<proto::NodeInfo, ClientError> {
        let challenge = self.client.challenge().await?;
        let mut req = proto::FederatedRegisterRequest {
            request: RegisterRequest {
                auth_key: String::new(),
                machine_key: self.machine.public_hex(),
                node_key: lock(&self.node_key).clone(),
                hostname: self.opts.hostname.clone(),
                endpoints: endpoints.to_vec(),
                challenge: proto::hex(&challenge),
                signature: String::new(),
            },
            client_id: fed.client_id.clone(),
            id_token,
            tags: fed.tags.clone(),
        };
        req.request.signature =
            self.machine.sign_hex(&proto::federated_register_message(&challenge, &self.opts.control.fingerprint, &req));
        let path = format!("{}/register/federated", proto::API);
        self.client.json(hyper::Method::POST, &path, Some(&req), None).await
    }

    fn uapi_set(&self, body: &str) -> Result<(), String> {
        let ops = parse_set(body).map_err(|e| format!("bad set request: {e}"))?;
        let resp = self.control.uapi(Request::Set(ops));
        let text = String::from_utf8_lossy(resp.as_bytes());
        if text.starts_with("errno=0") {
            Ok(())
        } else {
            Err(format!("the data plane refused the change: {}", text.trim()))
        }
    }

    /// Brings the data plane and the resolver to `map` (which came whole
    /// or was rebuilt from a delta: `kind`, for the log).
    fn apply(&self, map: NetworkMap, kind: &str) -> Result<(), String> {
        let addrs = (IpAddr::V4(map.self_node.ipv4), IpAddr::V6(map.self_node.ipv6));
        if *lock(&self.addresses) != Some(addrs) {
            self.set_addresses(addrs)?;
            *lock(&self.addresses) = Some(addrs);
            // The resolver's /32 goes on the TUN (set_addresses flushed it).
            // (Userspace: no TUN to serve it on; the proxies resolve from the map.)
            let resolver = format!("{}/32", dns::RESOLVER_V4);
            if self.netstack.is_none() {
                if let Err(e) =
                    run_ip(&["addr", "add", &resolver, "dev", &self.opts.tun]).and_then(|()| self.dns.serve())
                {
                    eprintln!("wiremeshd node: no DNS resolver: {e}");
                }
            }
        }
        let hosts = std::iter::once(&map.self_node).chain(&map.peers);
        self.dns.set_zone(dns::Zone::new(
            &map.domain,
            hosts.map(|n| dns::Host { name: n.name.clone(), ipv4: n.ipv4, ipv6: n.ipv6 }),
        ));
        // Only a resolver that answers is worth pointing the host at.
        if let Some(h) = self.host_dns.as_ref().filter(|_| self.dns.serving()) {
            if let Err(e) = h.point(&map.domain) {
                eprintln!("wiremeshd node: --accept-dns: {e}");
            }
        }
        {
            let mut rec = lock(&self.reconciler);
            // The filter first, so that new peers never meet an old, wider one.
            if let Some(change) = rec.filter_change(&map) {
                if !self.control.set_filter(change.filter.clone()) {
                    return Err("the data plane is gone: cannot set the packet filter".into());
                }
                crate::say!("{kind} {}: packet filter of {} rules", map.version, change.rules.len());
                rec.commit_filter(change);
            }
            let plan = rec.plan(Some(&map));
            if !plan.body.is_empty() {
                self.uapi_set(&plan.body)?;
                let (a, c, r) = plan.counts;
                crate::say!("{kind} {}: {} peers ({a} added, {c} changed, {r} removed)", map.version, plan.next.len());
            }
            rec.commit(plan);
        }
        self.update_disco(&map);
        if self.netstack.is_none() {
            let prefs = lock(&self.prefs).clone();
            if let Err(e) = self.host_routes.apply(&map, &prefs, &self.control_addrs) {
                eprintln!("wiremeshd node: routes: {e}");
            }
        }
        if self.nudge.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.nudge_peers(&map);
        }
        lock(&self.shared).map = Some(map);
        Ok(())
    }

    /// Starts a handshake with every online peer: switching a persistent
    /// keepalive on sends a keepalive at once (so a handshake first), and it
    /// is switched off again at once. wg(8) has no other way to ask for one.
    fn nudge_peers(&self, map: &NetworkMap) {
        let keys: Vec<String> = map
            .peers
            .iter()
            .filter(|p| p.online)
            .filter_map(|p| proto::unb64_key(&p.node_key))
            .map(|k| proto::hex(&k))
            .collect();
        if keys.is_empty() {
            return;
        }
        for interval in [25, 0] {
            let body: String =
                keys.iter().map(|k| format!("public_key={k}\npersistent_keepalive_interval={interval}\n")).collect();
            if let Err(e) = self.uapi_set(&body) {
                eprintln!("wiremeshd node: cannot start handshakes: {e}");
                return;
            }
        }
    }

    /// Gives path discovery the map's peers, endpoints and STUN server
    /// when they changed (the TUN worker and the userspace netstack both run it).
    fn update_disco(&self, map: &NetworkMap) {
        let local = local_endpoints(self.listen_port, &self.opts.tun).iter().filter_map(|e| e.parse().ok()).collect();
        let settings = reconcile::disco_settings(map, local, &self.client.url().host, |host, port| {
            use std::net::ToSocketAddrs;
            let mut addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().ok()?.collect();
            addrs.sort_by_key(|a| !a.is_ipv4());
            addrs.into_iter().next()
        });
        let mut last = lock(&self.disco);
        if last.as_ref() != Some(&settings) && self.control.set_disco(Some(settings.clone())) {
            *last = Some(settings);
        }
        drop(last);
        self.update_relay(map);
    }

    /// Runs the relay client for the map's relays (restarted when the home
    /// relay or this node's key changes; the peers' relays are updated in
    /// place), or stops it when the map names none.
    fn update_relay(&self, map: &NetworkMap) {
        let node_key = proto::unb64_key(&lock(&self.node_key)).map(wiremesh_core::keys::PublicKey);
        let url = self.client.url();
        // The TUN worker and the userspace netstack both carry relay paths.
        let want = node_key.and_then(|k| relay::plan(map, &url.host, url.fingerprint).map(|p| (p, k)));
        let mut current = lock(&self.relay);
        let Some((plan, node_key)) = want else {
            if let Some(run) = current.take() {
                run.task.abort();
                self.control.clear_relay();
                crate::say!("relay: none in the map; relay client stopped");
            }
            return;
        };
        if let Some(run) = current.as_ref().filter(|r| r.home == plan.home && r.node_key == node_key) {
            run.via.send_if_modified(|via| {
                let changed = *via != plan.via;
                if changed {
                    via.clone_from(&plan.via);
                }
                changed
            });
            return;
        }
        let key = match keys::load_or_create_node_key(&self.opts.state.join("node.key")) {
            Ok(k) if k.public_key() == node_key => k,
            Ok(_) => return, // the key is being replaced (logout); the next map brings it
            Err(e) => {
                eprintln!("wiremeshd node: relay: {e}");
                return;
            }
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        // The new link replaces the old one in the worker before the old
        // task goes, so the worker never holds a link nobody serves.
        let Some(port) = self.control.relay_link(wiremesh_dataplane::relay::DEFAULT_QUEUE) else { return };
        let (via, via_rx) = tokio::sync::watch::channel(plan.via.clone());
        // A relay connection reset by the way often means a NAT on it
        // changed: the reflexive address is asked for again at once.
        let control = self.control.clone();
        let on_lost: relay::OnLost = std::sync::Arc::new(move || {
            control.stun_now();
        });
        let task = rt
            .spawn(relay::run(plan.home.clone(), key, port, via_rx, self.relay_connections.clone(), on_lost))
            .abort_handle();
        if let Some(old) = current.replace(RelayRun { home: plan.home, node_key, via, task }) {
            old.task.abort();
        }
    }

    fn stop_relay(&self) {
        if let Some(run) = lock(&self.relay).take() {
            run.task.abort();
            self.control.clear_relay();
        }
    }

    fn apply_none(&self) -> Result<(), String> {
        let mut rec = lock(&self.reconciler);
        let plan = rec.plan(None);
        if !plan.body.is_empty() {
            self.uapi_set(&plan.body)?;
        }
        rec.commit(plan);
        if lock(&self.disco).take().is_some() {
            self.control.set_disco(None);
        }
        self.stop_relay();
        self.dns.set_zone(dns::Zone::default());
        lock(&self.shared).map = None;
        Ok(())
    }

    fn set_addresses(&self, (v4, v6): (IpAddr, IpAddr)) -> Result<(), String> {
        if let Some(stack) = &self.netstack {
            userspace::set_addresses(stack, v4, v6);
            return Ok(());
        }
        let tun = self.opts.tun.as_str();
        run_ip(&["addr", "flush", "dev", tun])?;
        run_ip(&["addr", "add", &format!("{v4}/{}", crate::control::db::IPV4_PREFIX), "dev", tun])?;
        // The tailnet's /48 routes through the tunnel; nodad: usable at once.
        run_ip(&["-6", "addr", "add", &format!("{v6}/48"), "dev", tun, "nodad"])?;
        run_ip(&["link", "set", "dev", tun, "up"])
    }

    async fn serve_local(&self, stream: tokio::net::UnixStream) {
        let (r, mut w) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(r.take(64 * 1024)).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let answer = match serde_json::from_str::<LocalRequest>(&line) {
                Ok(req) => self.answer(req).await,
                Err(e) => LocalResponse::Error(format!("bad request: {e}")),
            };
            let mut out = serde_json::to_vec(&answer).unwrap_or_default();
            out.push(b'\n');
            if w.write_all(&out).await.is_err() {
                break;
            }
        }
    }

    /// Asks the identity service the map names for a workload token, over
    /// the tailnet (through the TUN device, or the netstack in userspace mode).
    async fn workload_token(
        &self,
        map: Option<&NetworkMap>,
        audiences: &[String],
        lifetime: Option<u64>,
    ) -> Result<serde_json::Value, String> {
        let id = map
            .and_then(|m| m.identity.clone())
            .ok_or("the tailnet has no identity service (or the node has no map yet)")?;
        let to = std::net::SocketAddr::new(IpAddr::V4(id.ipv4), crate::identity::service::PORT);
        let host = id.ipv4.to_string();
        let connect = async {
            match &self.netstack {
                Some(stack) => {
                    let s = stack
                        .connect_tcp(to)
                        .await
                        .map_err(|e| format!("cannot reach the identity service at {to}: {e}"))?;
                    crate::identity::client::request_token(s, &host, audiences, lifetime).await
                }
                None => {
                    let s = tokio::net::TcpStream::connect(to)
                        .await
                        .map_err(|e| format!("cannot reach the identity service at {to}: {e}"))?;
                    crate::identity::client::request_token(s, &host, audiences, lifetime).await
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), connect)
            .await
            .map_err(|_| format!("the identity service at {to} did not answer"))?
    }

    async fn answer(&self, req: LocalRequest) -> LocalResponse {
        let (map, connected, last_error) = {
            let s = lock(&self.shared);
            (s.map.clone(), s.connected, s.last_error.clone())
        };
        match req {
            LocalRequest::Status => {
                let control = self.control.clone();
                let get = tokio::task::spawn_blocking(move || {
                    String::from_utf8_lossy(control.uapi(Request::Get).as_bytes()).into_owned()
                })
                .await
                .unwrap_or_default();
                let control = self.client.url().to_string();
                let dp = self.control.clone();
                let (disco, drops) =
                    tokio::task::spawn_blocking(move || (dp.disco_status(), dp.drops())).await.unwrap_or_default();
                let agent = local::AgentInfo {
                    tun: &self.opts.tun,
                    control: &control,
                    connected,
                    state: *self.reached.borrow(),
                    last_error,
                    listen_port: self.listen_port,
                    disco,
                    drops,
                    relays: lock(&self.relay_connections).clone(),
                };
                LocalResponse::Status(local::status(map.as_ref(), &get, agent))
            }
            LocalRequest::Token { audiences, lifetime } => {
                match self.workload_token(map.as_ref(), &audiences, lifetime).await {
                    Ok(v) => LocalResponse::Token(v),
                    Err(e) => LocalResponse::Error(e),
                }
            }
            LocalRequest::Resolve { name } => match map.as_ref().and_then(|m| local::resolve(m, &name)) {
                Some(n) => LocalResponse::Node(n.clone()),
                None => LocalResponse::Error(format!("no node named {name:?} in the tailnet")),
            },
            LocalRequest::Whois { ip } => match map.as_ref().and_then(|m| local::resolve(m, &ip.to_string())) {
                Some(n) => LocalResponse::Node(n.clone()),
                None => LocalResponse::Error(format!("no node has address {ip}")),
            },
            LocalRequest::Up { auth_key } => match self.up(auth_key).await {
                Ok(m) => LocalResponse::Done(m),
                Err(e) => LocalResponse::Error(e),
            },
            LocalRequest::Down => match self.down().await {
                Ok(m) => LocalResponse::Done(m),
                Err(e) => LocalResponse::Error(e),
            },
            LocalRequest::Logout => match self.logout().await {
                Ok(m) => LocalResponse::Done(m),
                Err(e) => LocalResponse::Error(e),
            },
            LocalRequest::Set { exit_node, exit_node_allow_lan_access } => {
                match self.set_prefs(exit_node, exit_node_allow_lan_access) {
                    Ok(m) => LocalResponse::Done(m),
                    Err(e) => LocalResponse::Error(e),
                }
            }
        }
    }

    /// `wiremesh set`: the exit node (an empty name clears it) and LAN
    /// access; saved, then the map stream reopens to carry the choice.
    fn set_prefs(&self, exit_node: Option<String>, allow_lan: Option<bool>) -> Result<String, String> {
        if self.netstack.is_some() && exit_node.as_deref().is_some_and(|e| !e.is_empty()) {
            return Err("exit nodes need a TUN device (not --userspace)".into());
        }
        let mut prefs = lock(&self.prefs).clone();
        if let Some(e) = exit_node {
            let e = e.trim().to_ascii_lowercase();
            let me = lock(&self.shared).map.as_ref().map(|m| m.self_node.name.clone());
            if me.as_deref() == Some(e.as_str()) {
                return Err("a node cannot be its own exit node".into());
            }
            prefs.exit_node = (!e.is_empty()).then_some(e);
        }
        if let Some(lan) = allow_lan {
            prefs.exit_node_allow_lan_access = lan;
        }
        prefs.save(&self.opts.state)?;
        *lock(&self.prefs) = prefs.clone();
        self.reopen.notify_one();
        Ok(match &prefs.exit_node {
            Some(e) => {
                format!("exit node {e} (LAN access {})", if prefs.exit_node_allow_lan_access { "on" } else { "off" })
            }
            None => "no exit node".into(),
        })
    }

    /// Drops the auth key, wiping its bytes.
    fn forget_auth_key(&self) {
        wipe(lock(&self.auth_key).take());
    }

    /// Asks the map follower for `to` and waits until it got there.
    async fn switch(&self, to: AgentState) {
        self.want.send_replace(to);
        let mut reached = self.reached.subscribe();
        let _ = reached.wait_for(|r| *r == to).await;
    }

    /// `wiremesh up`: connects again after `down`, or joins with `auth_key`
    /// after a logout; answers once the node has its map (or cannot get it).
    async fn up(&self, auth_key: Option<String>) -> Result<String, String> {
        let _one = self.commands.lock().await;
        let state = *self.want.borrow();
        if let Some(key) = auth_key {
            wipe(lock(&self.auth_key).replace(key));
            self.key_from_cli.store(true, std::sync::atomic::Ordering::SeqCst);
        } else if state == AgentState::LoggedOut {
            return Err("logged out: give an auth key to join again (wiremesh up --auth-key KEY)".into());
        }
        match std::fs::remove_file(self.opts.state.join(DOWN_MARK)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("cannot clear the down mark in {}: {e}", self.opts.state.display()))
            }
            _ => {}
        }
        lock(&self.shared).last_error = None;
        self.switch(AgentState::Up).await;
        // Wait for a map, a refused key, or time.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            {
                let s = lock(&self.shared);
                if s.connected && s.map.is_some() {
                    let me = s.map.as_ref().map(|m| m.self_node.fqdn.clone()).unwrap_or_default();
                    return Ok(format!("up: connected as {me}"));
                }
                if *self.want.borrow() == AgentState::LoggedOut {
                    return Err(s.last_error.clone().unwrap_or_else(|| "the auth key was refused".into()));
                }
                if tokio::time::Instant::now() >= deadline {
                    let why = s.last_error.clone().unwrap_or_else(|| "no map yet".into());
                    return Ok(format!("up: still connecting ({why})"));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `wiremesh down`: closes the map stream and removes every peer; keys
    /// and registration stay, and the node stays down across restarts.
    async fn down(&self) -> Result<String, String> {
        let _one = self.commands.lock().await;
        if *self.want.borrow() == AgentState::LoggedOut {
            return Err("logged out already".into());
        }
        std::fs::write(self.opts.state.join(DOWN_MARK), b"")
            .map_err(|e| format!("cannot mark {} down: {e}", self.opts.state.display()))?;
        self.switch(AgentState::Down).await;
        Ok("down: peers removed, map stream closed; `wiremesh up` reconnects".into())
    }

    /// `wiremesh logout`: disconnects, has the control server remove this
    /// node (a request signed by the machine key), then forgets the
    /// registration: the auth key is dropped and the node key replaced, so
    /// the next join (with an auth key) is a new node with a new WireGuard
    /// key; the machine key stays.
    async fn logout(&self) -> Result<String, String> {
        let _one = self.commands.lock().await;
        if *self.want.borrow() == AgentState::LoggedOut {
            return Err("logged out already".into());
        }
        let was = *self.want.borrow();
        self.switch(AgentState::Down).await;
        let node_key = lock(&self.node_key).clone();
        if let Err(e) = self.client.logout(self.machine.public_hex(), node_key, |m| self.machine.sign_hex(m)).await {
            // Still registered: back to what it was.
            if was == AgentState::Up {
                self.switch(AgentState::Up).await;
            }
            return Err(format!("logout failed: {e}"));
        }
        self.forget_auth_key();
        self.key_from_cli.store(false, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::remove_file(self.opts.state.join(DOWN_MARK));
        let path = self.opts.state.join("node.key");
        let fresh = std::fs::remove_file(&path)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|()| keys::load_or_create_node_key(&path))?;
        let mut set = format!("private_key={}\n", proto::hex(&fresh.to_bytes())).into_bytes();
        let applied = self.uapi_set(std::str::from_utf8(&set).unwrap_or_default());
        set.fill(0);
        std::hint::black_box(&set);
        applied?;
        *lock(&self.node_key) = proto::b64_key(&fresh.public_key().0);
        self.switch(AgentState::LoggedOut).await;
        Ok("logged out: the control server removed this node; `wiremesh up --auth-key KEY` joins again".into())
    }
}

use tokio::io::AsyncReadExt as _;

/// Overwrites a secret string's bytes before it is freed.
fn wipe(secret: Option<String>) {
    if let Some(s) = secret {
        let mut bytes = s.into_bytes();
        bytes.fill(0);
        std::hint::black_box(&bytes);
    }
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The `ip:port` endpoints to report: every address on an interface that is
/// up, except loopback, IPv6 link-local, the tailnet's own ranges and `tun`.
pub fn local_endpoints(port: u16, tun: &str) -> Vec<String> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Vec::new();
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if name == tun {
            continue;
        }
        // SAFETY: the family says which sockaddr type ifa_addr points to.
        let ip: IpAddr = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sa.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        match ip {
            IpAddr::V4(a) if !a.is_loopback() && !a.is_unspecified() && (u32::from(a) >> 22) != (100 << 2 | 1) => {
                v4.push(SocketAddr::new(ip, port).to_string())
            }
            IpAddr::V6(a) if !a.is_loopback() && !a.is_unspecified() && (a.segments()[0] & 0xffc0) != 0xfe80 => {
                v6.push(SocketAddr::new(ip, port).to_string())
            }
            _ => {}
        }
    }
    // SAFETY: freeing the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(ifap) };
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    v4.extend(v6);
    v4.truncate(16);
    v4
}
