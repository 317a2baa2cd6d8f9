//! `wiremeshd`: the long-running wiremesh roles.

use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

#[path = "common/user_dirs.rs"]
mod user_dirs;

#[derive(Parser)]
#[command(name = "wiremeshd", version, about = "wiremesh daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A standalone WireGuard interface: creates TUN device IFNAME and serves
    /// /var/run/wireguard/IFNAME.sock for wg(8), like wireguard-go.
    Interface {
        /// Interface name.
        ifname: String,
        /// Stay in the foreground (otherwise detach once the interface is up).
        #[arg(short, long)]
        foreground: bool,
        /// A `wg setconf` configuration file to apply at start.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data-plane worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[command(flatten)]
        userspace: UserspaceArgs,
        /// With --userspace: an address the node holds (ADDRESS/PREFIX), at most one IPv4 and one IPv6.
        #[arg(long = "address", requires = "userspace")]
        addresses: Vec<String>,
    },
    /// The coordination server: registers nodes and streams their network maps.
    Control {
        /// Address to listen on (HTTPS).
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// State: a directory (SQLite database, TLS certificate) or a
        /// postgres://user@host/db URL (shared by several replicas).
        #[arg(long)]
        state: wiremesh_daemon::control::db::Location,
        /// Seconds an ephemeral node may stay offline before it is removed.
        #[arg(long, default_value_t = 30)]
        ephemeral_grace_secs: u64,
        /// Seconds after which a silent replica is taken for dead and its nodes go offline.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
        presence_timeout_secs: u64,
        /// The embedded relay and STUN server (TCP+UDP, one port): ADDR,
        /// `auto` (the listen address, port + 1; port 0 stays 0) or `off`.
        #[arg(long, default_value = "auto")]
        relay: String,
        /// HOST:PORT where other replicas' nodes reach the embedded relay
        /// (default: its bound address, or the listen address's host).
        #[arg(long, value_parser = host_port)]
        relay_advertise: Option<String>,
        /// Payload bytes per second one client may send through the
        /// embedded relay (as `wiremeshd relay --rate-limit`).
        #[arg(long, default_value_t = 64 << 20)]
        relay_rate_limit: u64,
        /// Payload bytes one client may send through the embedded relay in a burst.
        #[arg(long, default_value_t = 4 << 20)]
        relay_burst: u64,
        /// Frames the embedded relay queues towards one client before more are dropped.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
        relay_queue: u64,
        /// A relay run elsewhere (`wiremeshd relay` prints its URL:
        /// relay://HOST:PORT#sha256=HEX), named in every map; repeatable.
        #[arg(long = "relay-url", value_parser = wiremesh_daemon::control::proto::RelayInfo::from_url)]
        relay_urls: Vec<wiremesh_daemon::control::proto::RelayInfo>,
        /// The identity service (workload tokens, OIDC) as a tailnet node
        /// of its own: `on` or `off`. See docs/identity.md.
        #[arg(long, default_value = "on", value_parser = ["on", "off"])]
        identity: String,
        /// How often the identity service's signing key rotates (e.g. 24h, 30m, 90s, 7d).
        #[arg(long, default_value = "24h", value_parser = wiremesh_daemon::identity::service::parse_duration)]
        identity_key_rotation: std::time::Duration,
        /// The signing algorithm of new identity keys: ES256, EdDSA or RS256.
        #[arg(long, default_value = "ES256", value_parser = ["ES256", "EdDSA", "RS256"])]
        identity_alg: String,
        /// Workload token lifetime when a request names none.
        #[arg(long, default_value = "10m", value_parser = wiremesh_daemon::identity::service::parse_duration)]
        identity_token_lifetime: std::time::Duration,
        /// The longest workload token lifetime a request may ask for.
        #[arg(long, default_value = "1h", value_parser = wiremesh_daemon::identity::service::parse_duration)]
        identity_max_token_lifetime: std::time::Duration,
        /// The tokens' issuer URL (default: https://<listen address>).
        #[arg(long)]
        identity_issuer: Option<String>,
        /// Extra trusted CA certificates (PEM) for fetching federated
        /// issuers' discovery documents and keys, besides the system roots.
        #[arg(long)]
        federation_ca: Option<PathBuf>,
    },
    /// A relay: forwards WireGuard and probe frames between nodes by node
    /// key over TLS, and answers STUN on the same UDP port (docs/nat.md).
    Relay {
        /// Address to listen on (TLS on TCP, STUN on UDP).
        #[arg(long, default_value = "0.0.0.0:3340")]
        listen: std::net::SocketAddr,
        /// Directory for the TLS certificate (made at first start; its
        /// fingerprint is printed).
        #[arg(long, default_value = "/var/lib/wiremesh-relay")]
        state: PathBuf,
        /// Payload bytes per second one client may send.
        #[arg(long, default_value_t = 64 << 20)]
        rate_limit: u64,
        /// Payload bytes one client may send in a burst.
        #[arg(long, default_value_t = 4 << 20)]
        burst: u64,
        /// Frames queued towards one client before more are dropped.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
        queue: u64,
        /// Print the relay's counters to stdout this often (e.g. 5s, 1m):
        /// a `relay stats: clients=N ... forwarded=N ...` line each time.
        #[arg(long, value_parser = wiremesh_daemon::identity::service::parse_duration)]
        stats_interval: Option<std::time::Duration>,
    },
    /// The node agent: joins the tailnet and keeps the data plane on its map.
    Node {
        /// The control server: https://host:port#sha256=<certificate fingerprint>;
        /// several replicas of it (one certificate) comma-separated or repeated,
        /// tried in order when the one in use fails.
        #[arg(long, required = true)]
        control: Vec<String>,
        /// An auth key (needed for the first registration only).
        #[arg(long)]
        auth_key: Option<String>,
        /// Host name to ask for (default: the system's).
        #[arg(long)]
        hostname: Option<String>,
        /// State directory (machine and node keys); default /var/lib/wiremesh,
        /// or with --userspace and not root $XDG_STATE_HOME/wiremesh
        /// (else ~/.local/state/wiremesh).
        #[arg(long)]
        state: Option<PathBuf>,
        /// TUN device name.
        #[arg(long, default_value = "wiremesh0")]
        tun: String,
        /// UDP port for WireGuard (0: any).
        #[arg(long, default_value_t = 0)]
        listen_port: u16,
        /// TUN MTU (1280-1420).
        #[arg(long, default_value_t = 1280, value_parser = clap::value_parser!(u32).range(1280..=1420))]
        mtu: u32,
        /// Local API socket for the CLI (default /var/run/wiremesh/<tun>.sock,
        /// or with --userspace and not root $XDG_RUNTIME_DIR/wiremesh/api.sock,
        /// else api.sock in the state directory).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Point /etc/resolv.conf at the tailnet's resolver (100.100.100.100,
        /// searching the tailnet domain) while connected; the original is
        /// restored on down, logout and exit.
        #[arg(long)]
        accept_dns: bool,
        /// The map-stream version to ask for: 2 (a full map, then deltas) or
        /// 1 (a full map on every change).
        #[arg(long, default_value_t = wiremesh_daemon::control::proto::MAP_VERSION,
              value_parser = clap::value_parser!(u32).range(1..=2))]
        map_version: u32,
        #[command(flatten)]
        routes: RouteArgs,
        #[command(flatten)]
        userspace: UserspaceArgs,
        #[command(flatten)]
        federation: FederationArgs,
    },
}

/// Registering with an outside issuer's ID token (docs/identity.md, Federation).
#[derive(clap::Args)]
struct FederationArgs {
    /// The trust credential's client ID (`wiremesh federation create` prints it).
    #[arg(long, requires = "advertise_tags", conflicts_with = "auth_key")]
    client_id: Option<String>,
    /// The issuer's ID token (its audience: <control URL>/<client ID>).
    #[arg(long, requires = "client_id", conflicts_with = "id_token_file")]
    id_token: Option<String>,
    /// A file holding the ID token, read at each registration.
    #[arg(long, requires = "client_id")]
    id_token_file: Option<PathBuf>,
    /// The tags to register with (a subset of the credential's).
    #[arg(long, value_delimiter = ',', requires = "client_id")]
    advertise_tags: Vec<String>,
}

/// Subnet routes and exit nodes offered by the node (docs/routes.md).
#[derive(clap::Args)]
struct RouteArgs {
    /// Offer routes to these prefixes (e.g. 10.1.0.0/24,192.168.0.0/16); an admin or autoApprovers approves them.
    #[arg(long, value_delimiter = ',', conflicts_with = "userspace")]
    advertise_routes: Vec<String>,
    /// Offer to be an exit node (0.0.0.0/0 and ::/0).
    #[arg(long, conflicts_with = "userspace")]
    advertise_exit_node: bool,
    /// Masquerade traffic forwarded to routed networks (false keeps the tailnet source addresses).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    snat_subnet_routes: bool,
}

/// `--userspace` and the local ways into the tailnet it offers.
#[derive(clap::Args)]
struct UserspaceArgs {
    /// Run on the userspace netstack: no TUN device, no root.
    #[arg(long)]
    userspace: bool,
    /// With --userspace: a SOCKS5 proxy into the tailnet (CONNECT, no auth), e.g. 127.0.0.1:1055.
    #[arg(long, requires = "userspace")]
    socks5: Option<std::net::SocketAddr>,
    /// With --userspace: an HTTP proxy into the tailnet (CONNECT and http:// URIs), e.g. 127.0.0.1:8080.
    #[arg(long, requires = "userspace")]
    http_proxy: Option<std::net::SocketAddr>,
    /// With --userspace: forward a tailnet TCP port to a local address, tcp:PORT=ADDRESS:PORT (repeatable).
    #[arg(long, requires = "userspace")]
    forward: Vec<wiremesh_daemon::node::proxy::Forward>,
}

impl UserspaceArgs {
    fn proxies(&self) -> wiremesh_daemon::node::proxy::Proxies {
        wiremesh_daemon::node::proxy::Proxies {
            socks5: self.socks5,
            http: self.http_proxy,
            forwards: self.forward.clone(),
        }
    }
}

/// The node agent's state directory and socket: as given, else root's
/// places, else (with --userspace, not root) the user's XDG places, whose
/// new directories are created private to the user.
fn node_places(
    userspace: bool,
    state: Option<PathBuf>,
    socket: Option<PathBuf>,
    tun: &str,
) -> Result<(PathBuf, PathBuf), String> {
    if let (Some(state), Some(socket)) = (&state, &socket) {
        return Ok((state.clone(), socket.clone()));
    }
    if !userspace || user_dirs::is_root() {
        return Ok((
            state.unwrap_or_else(|| PathBuf::from("/var/lib/wiremesh")),
            socket.unwrap_or_else(|| wiremesh_daemon::node::local::default_socket(tun)),
        ));
    }
    let dirs = user_dirs::UserDirs::current(state.as_deref())?;
    user_dirs::create_private(&dirs.state)?;
    let socket = match socket {
        Some(s) => s,
        None => {
            if let Some(dir) = dirs.socket.parent() {
                user_dirs::create_private(dir)?;
            }
            dirs.socket
        }
    };
    Ok((dirs.state, socket))
}

/// `HOST:PORT` with a host and a non-zero port (`[v6]:PORT` for IPv6).
fn host_port(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(s.to_string()),
        _ => Err(format!("{s}: expected HOST:PORT")),
    }
}

/// Environment variable carrying the readiness pipe to a detached child.
const READY_FD_ENV: &str = "WIREMESHD_READY_FD";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Control {
            listen,
            state,
            ephemeral_grace_secs,
            presence_timeout_secs,
            relay,
            relay_advertise,
            relay_rate_limit,
            relay_burst,
            relay_queue,
            relay_urls,
            identity,
            identity_key_rotation,
            identity_alg,
            identity_token_lifetime,
            identity_max_token_lifetime,
            identity_issuer,
            federation_ca,
        } => {
            let identity = match wiremesh_daemon::identity::service::settings_from_flags(
                &identity,
                identity_key_rotation,
                &identity_alg,
                identity_token_lifetime,
                identity_max_token_lifetime,
            ) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("wiremeshd: {e}");
                    return ExitCode::from(2);
                }
            };
            let ephemeral_grace = std::time::Duration::from_secs(ephemeral_grace_secs);
            let presence_timeout = std::time::Duration::from_secs(presence_timeout_secs);
            let relay = match relay.as_str() {
                "off" => None,
                "auto" => {
                    let port = if listen.port() == 0 { 0 } else { listen.port().checked_add(1).unwrap_or(0) };
                    Some(std::net::SocketAddr::new(listen.ip(), port))
                }
                other => match other.parse() {
                    Ok(a) => Some(a),
                    Err(e) => {
                        eprintln!("wiremeshd: --relay: {other}: {e} (ADDR:PORT, auto or off)");
                        return ExitCode::from(2);
                    }
                },
            };
            let opts = wiremesh_daemon::control::server::Options {
                listen,
                state,
                ephemeral_grace,
                presence_timeout,
                relay,
                relay_advertise,
                relay_limits: wiremesh_daemon::relay::Limits {
                    rate_bytes_per_sec: relay_rate_limit,
                    burst_bytes: relay_burst,
                    queue_frames: relay_queue as usize,
                },
                relays: relay_urls,
                federation_ca,
                identity,
                identity_issuer,
            };
            exit(wiremesh_daemon::control::server::run(&opts))
        }
        Command::Relay { listen, state, rate_limit, burst, queue, stats_interval } => {
            let limits = wiremesh_daemon::relay::Limits {
                rate_bytes_per_sec: rate_limit,
                burst_bytes: burst,
                queue_frames: queue as usize,
            };
            exit(wiremesh_daemon::relay::run(&wiremesh_daemon::relay::Options {
                listen,
                state,
                limits,
                stats_interval,
            }))
        }
        Command::Node {
            control,
            auth_key,
            hostname,
            state,
            tun,
            listen_port,
            mtu,
            socket,
            accept_dns,
            map_version,
            routes,
            userspace,
            federation,
        } => {
            let mut control = match wiremesh_daemon::control::client::parse_replicas(&control) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("wiremeshd: --control: {e}");
                    return ExitCode::from(2);
                }
            };
            let control_replicas = control.split_off(1);
            let control = control.remove(0);
            let federation = match (federation.client_id, federation.id_token, federation.id_token_file) {
                (None, _, _) => None,
                (Some(client_id), token, file) => {
                    use wiremesh_daemon::node::IdTokenSource;
                    let id_token = match (token, file) {
                        (Some(t), None) => IdTokenSource::Value(t),
                        (None, Some(f)) => IdTokenSource::File(f),
                        _ => {
                            eprintln!("wiremeshd: --client-id needs --id-token or --id-token-file");
                            return ExitCode::from(2);
                        }
                    };
                    Some(wiremesh_daemon::node::FederatedLogin { client_id, id_token, tags: federation.advertise_tags })
                }
            };
            let (state, socket) = match node_places(userspace.userspace, state, socket, &tun) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("wiremeshd node: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = wiremesh_daemon::node::Options {
                federation,
                control,
                control_replicas,
                auth_key,
                hostname: hostname.unwrap_or_else(wiremesh_daemon::node::system_hostname),
                state,
                socket,
                tun,
                listen_port,
                mtu,
                userspace: userspace
                    .userspace
                    .then(|| wiremesh_daemon::node::userspace::Userspace { proxies: userspace.proxies() }),
                accept_dns,
                map_version,
                routes: wiremesh_daemon::node::routes::RouteOptions {
                    advertise: routes.advertise_routes,
                    exit_node: routes.advertise_exit_node,
                    snat: routes.snat_subnet_routes,
                },
            };
            exit(wiremesh_daemon::node::run(opts))
        }
        Command::Interface { ifname, foreground, config, threads, userspace, addresses } => {
            let addresses: Result<Vec<_>, _> =
                addresses.iter().map(|a| wiremesh_daemon::node::userspace::parse_address(a)).collect();
            let addresses = match addresses {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("wiremeshd: --address: {e}");
                    return ExitCode::from(2);
                }
            };
            let userspace = userspace.userspace.then(|| wiremesh_daemon::node::userspace::Interface {
                addresses,
                mtu: 1420,
                proxies: userspace.proxies(),
            });
            let opts = wiremesh_daemon::interface::Options { ifname, config, threads, userspace };
            let ready_fd: Option<i32> = std::env::var(READY_FD_ENV).ok().and_then(|v| v.parse().ok());
            if !foreground && ready_fd.is_none() {
                return detach();
            }
            let ready = move || {
                if let Some(fd) = ready_fd {
                    // SAFETY: the parent passed us the write end of a pipe.
                    unsafe {
                        libc::write(fd, b"ok".as_ptr().cast(), 2);
                        libc::close(fd);
                    }
                }
            };
            match wiremesh_daemon::interface::run(&opts, ready) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wiremeshd: {e}");
                    if let Some(fd) = ready_fd {
                        let msg = e.into_bytes();
                        // SAFETY: writing our own bytes to the readiness pipe.
                        unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wiremeshd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Re-runs this command detached (new session, no terminal) and waits until
/// the child reports the interface up, or its error, as wireguard-go does.
fn detach() -> ExitCode {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        eprintln!("wiremeshd: pipe: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    let (r, w) = (fds[0], fds[1]);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wiremeshd: cannot find own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, w.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; the closure runs in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::close(r);
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn();
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(w) };
    if let Err(e) = child {
        eprintln!("wiremeshd: cannot start: {e}");
        return ExitCode::FAILURE;
    }
    // SAFETY: `r` is the read end we own.
    let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(r) };
    let mut msg = String::new();
    let _ = pipe.read_to_string(&mut msg);
    if msg == "ok" {
        ExitCode::SUCCESS
    } else {
        let msg = if msg.is_empty() { "the interface process exited before it was ready".into() } else { msg };
        let _ = writeln!(std::io::stderr(), "wiremeshd: {msg}");
        ExitCode::FAILURE
    }
}
