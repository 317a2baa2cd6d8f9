//! `wiremesh`: the CLI. Talks to the local node agent (status, ping, whois)
//! or, with an admin token, to the control server (keys, nodes).

use clap::{Parser, Subcommand};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use wiremesh_daemon::control::client::{Client, ControlUrl};
use wiremesh_daemon::control::proto::{self, AuthKeyInfo, CreateKeyRequest, CreatedKey};
use wiremesh_daemon::node::local::{self, LocalRequest, LocalResponse};

#[allow(dead_code)]
#[path = "common/user_dirs.rs"]
mod user_dirs;

/// The agent's socket unless `--socket` names one: root's agent for `tun`;
/// for anyone else, the socket a `wiremeshd node --userspace` of the same
/// user makes by default when it is there (else root's, when that is there:
/// a TUN node's agent the user may be allowed to reach).
fn default_socket(tun: &str) -> PathBuf {
    let system = local::default_socket(tun);
    if user_dirs::is_root() {
        return system;
    }
    match user_dirs::UserDirs::current(None) {
        Ok(user) if user.socket.exists() || !system.exists() => user.socket,
        _ => system,
    }
}

#[derive(Parser)]
#[command(name = "wiremesh", version, about = "wiremesh command-line client")]
struct Cli {
    /// The node agent's local API socket (default /var/run/wiremesh/<tun>.sock;
    /// not as root, the user's $XDG_RUNTIME_DIR/wiremesh/api.sock or
    /// ~/.local/state/wiremesh/api.sock when there).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The node agent's TUN device, to find its socket.
    #[arg(long, global = true, default_value = "wiremesh0")]
    tun: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Admin {
    /// The control server: https://host:port#sha256=<fingerprint>.
    #[arg(long)]
    control: String,
    /// The admin token printed at the server's first start.
    #[arg(long)]
    admin_token: Option<String>,
    /// A file holding the admin token.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// This node and its peers: names, addresses, online, handshakes, traffic.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pings a node by name or address through the tunnel.
    Ping {
        /// Short name, full name or tailnet address.
        target: String,
        /// Echo requests to send.
        #[arg(short, long, default_value_t = 3)]
        count: u32,
    },
    /// Which node an address belongs to.
    Whois {
        /// A tailnet address.
        ip: IpAddr,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Connects this node to the tailnet again (after `down`), or joins it
    /// with an auth key (after `logout`), through the running node agent.
    Up {
        /// The auth key to join with (needed after `logout`).
        #[arg(long)]
        auth_key: Option<String>,
        /// A file holding the auth key.
        #[arg(long, conflicts_with = "auth_key")]
        auth_key_file: Option<PathBuf>,
    },
    /// Disconnects this node from the tailnet: closes the map stream and
    /// removes every peer; the agent keeps running and keeps its keys.
    Down,
    /// Leaves the tailnet: the control server removes this node and the
    /// agent forgets its registration (joining again needs an auth key).
    Logout,
    /// Auth keys (admin).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Nodes (admin).
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// The tailnet's settings (admin).
    Tailnet {
        #[command(subcommand)]
        command: TailnetCommand,
    },
    /// Users, who own the untagged nodes made with their keys (admin).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// The tailnet policy file (huJSON ACLs and grants; docs/policy.md).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Subnet routes and exit nodes (admin; docs/routes.md).
    Routes {
        #[command(subcommand)]
        command: RoutesCommand,
    },
    /// A workload token for this node from the tailnet's identity service,
    /// through the agent (docs/identity.md).
    Token {
        /// Who the token is for (repeat for several).
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        /// Lifetime in seconds (default: the service's, 10 minutes).
        #[arg(long)]
        lifetime: Option<u64>,
        /// Print the whole answer as JSON, not just the token.
        #[arg(long)]
        json: bool,
    },
    /// The OIDC identity provider (admin; docs/identity.md).
    Idp {
        #[command(subcommand)]
        command: IdpCommand,
    },
    /// Trust credentials: outside issuers whose ID tokens register nodes (admin; docs/identity.md).
    Federation {
        #[command(subcommand)]
        command: FederationCommand,
    },
    /// The control server's embedded relay (admin; docs/nat.md).
    Relay {
        #[command(subcommand)]
        command: RelayCommand,
    },
    /// Changes this node's preferences through the running agent.
    Set {
        /// Send Internet traffic through this exit node (a node name; "" for none).
        #[arg(long)]
        exit_node: Option<String>,
        /// While using an exit node, keep the local networks reachable directly.
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        exit_node_allow_lan_access: Option<bool>,
    },
}

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// For people.
    Text,
    /// Machine-readable.
    Json,
}

#[derive(Subcommand)]
enum FederationCommand {
    /// Creates a trust credential and prints its client ID and the audience tokens must carry.
    Create {
        #[command(flatten)]
        admin: Admin,
        /// The issuer URL (https), exactly as its tokens' iss.
        #[arg(long)]
        issuer: String,
        /// The subject pattern; `*` matches any run of characters (e.g. 'ws-1/*').
        #[arg(long)]
        subject: String,
        /// The tags nodes may ask for: tag:a,tag:b.
        #[arg(long, value_delimiter = ',', required = true)]
        tags: Vec<String>,
        /// Nodes registered through it are ephemeral.
        #[arg(long)]
        ephemeral: bool,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Lists trust credentials.
    List {
        #[command(flatten)]
        admin: Admin,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Removes a trust credential (the nodes it registered stay).
    Remove {
        #[command(flatten)]
        admin: Admin,
        /// The credential's ID (a number, from list).
        id: i64,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// Lists every advertised or approved route, with its router and state.
    List {
        #[command(flatten)]
        admin: Admin,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Approves routes of a node (`exit` for both exit routes).
    Approve {
        #[command(flatten)]
        admin: Admin,
        /// The node's id or name.
        node: String,
        /// Prefixes, e.g. 10.1.0.0/24, or `exit`.
        #[arg(required = true)]
        prefixes: Vec<String>,
    },
    /// Withdraws the approval of routes of a node.
    Unapprove {
        #[command(flatten)]
        admin: Admin,
        /// The node's id or name.
        node: String,
        /// Prefixes, e.g. 10.1.0.0/24, or `exit`.
        #[arg(required = true)]
        prefixes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Prints the policy in force (admin).
    Get {
        #[command(flatten)]
        admin: Admin,
    },
    /// Sets the policy from FILE (admin): checked and tested by the server
    /// first; a refused policy changes nothing.
    Set {
        #[command(flatten)]
        admin: Admin,
        /// The policy file.
        file: PathBuf,
    },
    /// Parses, checks and runs the tests of FILE here, without a server.
    Check {
        /// The policy file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum IdpCommand {
    /// Rotates the identity service's signing key now (the previous one
    /// stays published until the tokens it signed expire).
    RotateKeys {
        #[command(flatten)]
        admin: Admin,
    },
    /// The OAuth clients people sign in to.
    Clients {
        #[command(subcommand)]
        command: IdpClientsCommand,
    },
}

#[derive(Subcommand)]
enum IdpClientsCommand {
    /// Registers a client and prints its id (and secret, the only time it is shown).
    Create {
        #[command(flatten)]
        admin: Admin,
        /// A redirect URI, matched exactly (repeat for several).
        #[arg(long = "redirect-uri", required = true)]
        redirect_uris: Vec<String>,
        /// A public client: no secret, PKCE alone.
        #[arg(long)]
        public: bool,
        /// A name for people (shown on the consent page).
        #[arg(long, default_value = "")]
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Lists clients.
    List {
        #[command(flatten)]
        admin: Admin,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Removes a client with its codes and tokens.
    Remove {
        #[command(flatten)]
        admin: Admin,
        /// The client id.
        client_id: String,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Creates a user.
    Create {
        #[command(flatten)]
        admin: Admin,
        /// Unique login (a name or an e-mail address).
        login: String,
        /// Name for people (default: the login).
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Lists users.
    List {
        #[command(flatten)]
        admin: Admin,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Removes a user (refused while it owns nodes; revokes its keys).
    Remove {
        #[command(flatten)]
        admin: Admin,
        /// The user's login.
        login: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Creates an auth key and prints it (the only time it is shown).
    Create {
        #[command(flatten)]
        admin: Admin,
        /// The key may register any number of nodes.
        #[arg(long)]
        reusable: bool,
        /// Nodes registered with it are ephemeral.
        #[arg(long)]
        ephemeral: bool,
        /// Tags for its nodes: tag:a,tag:b.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Lifetime, e.g. 90s, 30m, 1h, 7d.
        #[arg(long)]
        expiry: Option<String>,
        /// The user (login) its untagged nodes belong to.
        #[arg(long)]
        user: Option<String>,
        /// Nodes registered with the key must re-authenticate this long
        /// after registering, e.g. 30d (default: never).
        #[arg(long)]
        key_expiry: Option<String>,
        /// Print the key and its description as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lists auth keys (never the keys themselves).
    List {
        #[command(flatten)]
        admin: Admin,
    },
    /// Revokes an auth key.
    Revoke {
        #[command(flatten)]
        admin: Admin,
        /// The key's id.
        id: i64,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    /// Lists nodes.
    List {
        #[command(flatten)]
        admin: Admin,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Sets when a node's key expires (after that it must re-authenticate
    /// with an auth key): `--in 1h`, `--now` or `--never`.
    #[command(group(clap::ArgGroup::new("when").required(true).args(["in_", "now", "never"])))]
    Expire {
        #[command(flatten)]
        admin: Admin,
        /// The node's id or name.
        node: String,
        /// Expire it after this long: 90s, 30m, 1h, 7d.
        #[arg(long = "in", id = "in_", value_name = "DURATION")]
        in_: Option<String>,
        /// Expire it now: it leaves every map at once.
        #[arg(long)]
        now: bool,
        /// Never expire it.
        #[arg(long)]
        never: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Removes a node from the tailnet.
    Remove {
        #[command(flatten)]
        admin: Admin,
        /// The node's id or name.
        node: String,
    },
    /// Renames a node: its DNS label, and so its full name, change for every peer.
    Rename {
        #[command(flatten)]
        admin: Admin,
        /// The node's id or name.
        node: String,
        /// The new name (a DNS label).
        name: String,
    },
}

#[derive(Subcommand)]
enum RelayCommand {
    /// The relay's address, connected clients and counters since it started.
    Stats {
        #[command(flatten)]
        admin: Admin,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TailnetCommand {
    /// The tailnet's settings: DNS domain, address ranges, certificate, schema.
    Show {
        #[command(flatten)]
        admin: Admin,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(|| default_socket(&cli.tun));
    let result = match cli.command {
        Command::Status { json } => status(&socket, json),
        Command::Ping { target, count } => ping(&socket, &target, count),
        Command::Whois { ip, json } => whois(&socket, ip, json),
        Command::Up { auth_key, auth_key_file } => up(&socket, auth_key, auth_key_file),
        Command::Down => done(&socket, &LocalRequest::Down),
        Command::Logout => done(&socket, &LocalRequest::Logout),
        Command::Keys { command } => keys(command),
        Command::Nodes { command } => nodes(command),
        Command::Users { command } => users(command),
        Command::Tailnet { command: TailnetCommand::Show { admin, json } } => tailnet_show(&admin, json),
        Command::Relay { command: RelayCommand::Stats { admin, json } } => relay_stats(&admin, json),
        Command::Policy { command } => policy(command),
        Command::Routes { command } => routes(command),
        Command::Federation { command } => federation(command),
        Command::Idp { command: IdpCommand::Clients { command } } => idp_clients(command),
        Command::Idp { command: IdpCommand::RotateKeys { admin } } => idp_rotate_keys(&admin),
        Command::Token { audiences, lifetime, json } => token(&socket, audiences, lifetime, json),
        Command::Set { exit_node, exit_node_allow_lan_access } => {
            if exit_node.is_none() && exit_node_allow_lan_access.is_none() {
                Err("nothing to set: give --exit-node NAME and/or --exit-node-allow-lan-access".into())
            } else {
                done(&socket, &LocalRequest::Set { exit_node, exit_node_allow_lan_access })
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wiremesh: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ask(socket: &std::path::Path, req: &LocalRequest) -> Result<LocalResponse, String> {
    match local::call(socket, req)? {
        LocalResponse::Error(e) => Err(e),
        r => Ok(r),
    }
}

fn ago(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{}s ago", now.saturating_sub(unix))
}

fn status(socket: &std::path::Path, json: bool) -> Result<ExitCode, String> {
    let LocalResponse::Status(s) = ask(socket, &LocalRequest::Status)? else {
        return Err("unexpected answer".into());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
        return Ok(ExitCode::SUCCESS);
    }
    let conn = match (s.state, s.connected) {
        (local::AgentState::Up, true) => "connected".to_string(),
        (local::AgentState::Up, false) => "not connected".to_string(),
        (state, _) => state.to_string(),
    };
    match &s.self_node {
        Some(n) => println!("{}  {}  {}  (self, {}, control {conn})", n.ipv4, n.ipv6, n.fqdn, s.tun),
        None => println!("not registered yet ({}, control {conn})", s.tun),
    }
    if !s.drops.is_empty() {
        println!("dropped: {}", drops_line(&s.drops));
    }
    for (relay, c) in &s.relays {
        println!(
            "relay {relay}{}: {}{}",
            if c.home { " (home)" } else { "" },
            if c.connected { "connected" } else { "not connected" },
            c.last_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default(),
        );
    }
    for p in &s.peers {
        println!(
            "{}  {}  {}  {}  handshake {}  rx {} tx {}  endpoint {}{}",
            p.node.ipv4,
            p.node.ipv6,
            p.node.fqdn,
            if p.node.online { "online" } else { "offline" },
            ago(p.last_handshake),
            p.rx_bytes,
            p.tx_bytes,
            p.endpoint.as_deref().unwrap_or("-"),
            match (&p.path, p.rtt_ms) {
                (Some(path), Some(ms)) => format!("  path {path} ({ms:.1} ms)"),
                (Some(path), None) => format!("  path {path}"),
                _ => String::new(),
            },
        );
        if !p.drops.is_empty() {
            println!("    dropped: {}", drops_line(&p.drops));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `filtered 3, replay 1`.
fn drops_line(drops: &std::collections::BTreeMap<String, u64>) -> String {
    drops.iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", ")
}

fn done(socket: &std::path::Path, req: &LocalRequest) -> Result<ExitCode, String> {
    let LocalResponse::Done(what) = ask(socket, req)? else {
        return Err("unexpected answer".into());
    };
    println!("{what}");
    Ok(ExitCode::SUCCESS)
}

fn up(socket: &std::path::Path, auth_key: Option<String>, file: Option<PathBuf>) -> Result<ExitCode, String> {
    let auth_key = match (auth_key, file) {
        (Some(k), _) => Some(k),
        (None, Some(f)) => {
            Some(std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?.trim().to_string())
        }
        (None, None) => None,
    };
    if !socket.exists() {
        return Err(format!(
            "no node agent at {}: start one with `wiremeshd node --control URL --auth-key KEY`",
            socket.display()
        ));
    }
    done(socket, &LocalRequest::Up { auth_key })
}

fn ping(socket: &std::path::Path, target: &str, count: u32) -> Result<ExitCode, String> {
    let LocalResponse::Node(n) = ask(socket, &LocalRequest::Resolve { name: target.into() })? else {
        return Err("unexpected answer".into());
    };
    let ip = match target.parse::<IpAddr>() {
        Ok(ip @ IpAddr::V6(_)) => ip,
        _ => IpAddr::V4(n.ipv4),
    };
    // The path: which peer and endpoint the tunnel uses for it.
    let via = match ask(socket, &LocalRequest::Status)? {
        LocalResponse::Status(s) => s
            .peers
            .iter()
            .find(|p| p.node.id == n.id)
            .map(|p| format!("via {}", p.endpoint.clone().unwrap_or_else(|| "no endpoint yet".into())))
            .unwrap_or_else(|| "this node".into()),
        _ => String::new(),
    };
    println!("pinging {} ({ip}) {via}", n.fqdn);
    let status = std::process::Command::new("ping")
        .args(["-c", &count.to_string(), "-W", "2", &ip.to_string()])
        .status()
        .map_err(|e| format!("cannot run ping: {e}"))?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn whois(socket: &std::path::Path, ip: IpAddr, json: bool) -> Result<ExitCode, String> {
    let LocalResponse::Node(n) = ask(socket, &LocalRequest::Whois { ip })? else {
        return Err("unexpected answer".into());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&n).map_err(|e| e.to_string())?);
    } else {
        println!("{}  id {}  {} {}  owner {}  tags [{}]", n.fqdn, n.id, n.ipv4, n.ipv6, n.owner, n.tags.join(","));
    }
    Ok(ExitCode::SUCCESS)
}

/// `90s`, `30m`, `1h`, `7d`, or plain seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mul = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("bad duration unit in {s:?} (s, m, h, d)")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("duration {s:?} too long"))
}

fn admin_client(a: &Admin) -> Result<(Client, String), String> {
    let url: ControlUrl = a.control.parse()?;
    let token = match (&a.admin_token, &a.admin_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?.trim().to_string(),
        (None, None) => std::env::var("WIREMESH_ADMIN_TOKEN")
            .map_err(|_| "give --admin-token, --admin-token-file or WIREMESH_ADMIN_TOKEN".to_string())?,
    };
    Ok((Client::new(url), token))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    Ok(rt.block_on(f))
}

/// One admin API call to `admin`'s server with its token: the answer decoded
/// as `T`, or the server's error as a message.
fn admin_call<T: serde::de::DeserializeOwned>(
    admin: &Admin,
    method: hyper::Method,
    path: &str,
    body: Option<&impl serde::Serialize>,
) -> Result<T, String> {
    let (client, token) = admin_client(admin)?;
    block_on(client.json(method, path, body, Some(&token)))?.map_err(|e| e.to_string())
}

fn print_routes(list: &[proto::RouteInfo], json: bool) -> Result<(), String> {
    if json {
        println!("{}", serde_json::to_string_pretty(list).map_err(|e| e.to_string())?);
        return Ok(());
    }
    for r in list {
        let approval = match (r.approved, r.auto_approved) {
            (true, _) => "approved",
            (false, true) => "auto-approved",
            (false, false) => "not approved",
        };
        println!(
            "{}  {} (id {})  {}  {}  {}{}",
            r.prefix,
            r.node,
            r.node_id,
            if r.advertised { "advertised" } else { "not advertised" },
            approval,
            if r.online { "online" } else { "offline" },
            if r.primary { "  primary" } else { "" },
        );
    }
    Ok(())
}

/// `POST /admin/routes/<node>/<action>`, printing the node's routes after.
fn approve(admin: &Admin, node: &str, prefixes: Vec<String>, action: &str) -> Result<(), String> {
    let path = format!("{}/admin/routes/{node}/{action}", proto::API);
    let req = proto::RoutesRequest { prefixes };
    let list: Vec<proto::RouteInfo> = admin_call(admin, hyper::Method::POST, &path, Some(&req))?;
    print_routes(&list, false)
}

fn routes(cmd: RoutesCommand) -> Result<ExitCode, String> {
    let path = format!("{}/admin/routes", proto::API);
    match cmd {
        RoutesCommand::List { admin, json } => {
            let list: Vec<proto::RouteInfo> = admin_call(&admin, hyper::Method::GET, &path, None::<&()>)?;
            print_routes(&list, json)?;
        }
        RoutesCommand::Approve { admin, node, prefixes } => approve(&admin, &node, prefixes, "approve")?,
        RoutesCommand::Unapprove { admin, node, prefixes } => approve(&admin, &node, prefixes, "unapprove")?,
    }
    Ok(ExitCode::SUCCESS)
}

fn federation(cmd: FederationCommand) -> Result<ExitCode, String> {
    use wiremesh_daemon::control::federation::{CreateCredentialRequest, CredentialInfo};
    let path = format!("{}/admin/federation", proto::API);
    let line = |c: &CredentialInfo| {
        let c2 = &c.credential;
        format!(
            "{}  client-id={}  issuer={}  subject={}  tags=[{}]  ephemeral={}  audience={}",
            c2.id,
            c2.client_id,
            c2.issuer,
            c2.subject,
            c2.tags.join(","),
            c2.ephemeral,
            c.audience
        )
    };
    match cmd {
        FederationCommand::Create { admin, issuer, subject, tags, ephemeral, output } => {
            let req = CreateCredentialRequest { issuer, subject, tags, ephemeral };
            let c: CredentialInfo = admin_call(&admin, hyper::Method::POST, &path, Some(&req))?;
            match output {
                Output::Json => println!("{}", pretty(&c)?),
                Output::Text => println!("{}", line(&c)),
            }
        }
        FederationCommand::List { admin, output } => {
            let list: Vec<CredentialInfo> = admin_call(&admin, hyper::Method::GET, &path, None::<&()>)?;
            match output {
                Output::Json => println!("{}", pretty(&list)?),
                Output::Text => list.iter().for_each(|c| println!("{}", line(c))),
            }
        }
        FederationCommand::Remove { admin, id, output } => {
            let r: serde_json::Value = admin_call(&admin, hyper::Method::DELETE, &format!("{path}/{id}"), None::<&()>)?;
            match output {
                Output::Json => println!("{}", pretty(&r)?),
                Output::Text => println!("removed trust credential {id}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn token(
    socket: &std::path::Path,
    audiences: Vec<String>,
    lifetime: Option<u64>,
    json: bool,
) -> Result<ExitCode, String> {
    let LocalResponse::Token(v) = ask(socket, &LocalRequest::Token { audiences, lifetime })? else {
        return Err("unexpected answer".into());
    };
    if json {
        println!("{v}");
    } else {
        println!("{}", v["access_token"].as_str().ok_or("the answer has no access_token")?);
    }
    Ok(ExitCode::SUCCESS)
}

fn idp_rotate_keys(admin: &Admin) -> Result<ExitCode, String> {
    let path = format!("{}/admin/identity/rotate-keys", proto::API);
    let r: serde_json::Value = admin_call(admin, hyper::Method::POST, &path, None::<&()>)?;
    println!("signing key rotated: now {}", r["kid"].as_str().unwrap_or("?"));
    Ok(ExitCode::SUCCESS)
}

fn pretty(v: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(v).map_err(|e| e.to_string())
}

fn keys(cmd: KeysCommand) -> Result<ExitCode, String> {
    let path = format!("{}/admin/keys", proto::API);
    match cmd {
        KeysCommand::Create { admin, reusable, ephemeral, tags, expiry, user, key_expiry, json } => {
            let expiry_secs = expiry.as_deref().map(parse_duration).transpose()?;
            let node_key_expiry_secs = key_expiry.as_deref().map(parse_duration).transpose()?;
            let req = CreateKeyRequest { reusable, ephemeral, tags, expiry_secs, user, node_key_expiry_secs };
            let k: CreatedKey = admin_call(&admin, hyper::Method::POST, &path, Some(&req))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&k).map_err(|e| e.to_string())?);
            } else {
                println!("{}", k.key);
            }
        }
        KeysCommand::List { admin } => {
            let keys: Vec<AuthKeyInfo> = admin_call(&admin, hyper::Method::GET, &path, None::<&()>)?;
            for k in keys {
                let node_expiry = k.node_key_expiry_secs.map(|s| format!(" key-expiry={s}s")).unwrap_or_default();
                println!(
                    "{}  {}…  reusable={} ephemeral={} uses={} spent={} revoked={} tags=[{}]{node_expiry}",
                    k.id,
                    k.prefix,
                    k.reusable,
                    k.ephemeral,
                    k.uses,
                    k.spent,
                    k.revoked,
                    k.tags.join(",")
                );
            }
        }
        KeysCommand::Revoke { admin, id } => {
            let _: serde_json::Value = admin_call(&admin, hyper::Method::DELETE, &format!("{path}/{id}"), None::<&()>)?;
            println!("revoked key {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn policy(cmd: PolicyCommand) -> Result<ExitCode, String> {
    use wiremesh_daemon::control::client;
    let path = format!("{}/admin/policy", proto::API);
    let read = |f: &PathBuf| std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()));
    match cmd {
        PolicyCommand::Get { admin } => {
            let p: proto::PolicyInfo = admin_call(&admin, hyper::Method::GET, &path, None::<&()>)?;
            match p.policy {
                Some(text) => print!("{text}{}", if text.ends_with('\n') { "" } else { "\n" }),
                None => eprintln!("no policy is set: every node may reach every other"),
            }
        }
        PolicyCommand::Set { admin, file } => {
            let text = read(&file)?;
            let (client, token) = admin_client(&admin)?;
            let (status, body) = block_on(client.raw(hyper::Method::PUT, &path, text.into_bytes(), Some(&token)))?
                .map_err(|e| e.to_string())?;
            if !(200..300).contains(&status) {
                return Err(format!("{}: {}", file.display(), client::api_error(status, &body)));
            }
            let p: proto::PolicyInfo =
                serde_json::from_slice(&body).map_err(|e| format!("bad answer from the server: {e}"))?;
            println!("policy version {} set", p.version);
        }
        PolicyCommand::Check { file } => {
            let text = read(&file)?;
            let p = wiremesh_daemon::policy::check(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            let tests: usize = p.tests.iter().map(|t| t.accept.len() + t.deny.len()).sum();
            println!("{}: ok ({} rules, {} test assertions passed)", file.display(), p.rules.len(), tests);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn idp_clients(cmd: IdpClientsCommand) -> Result<ExitCode, String> {
    use wiremesh_daemon::control::provider_store::{CreateClientRequest, CreatedClient, IdpClient};
    let path = format!("{}/admin/idp/clients", proto::API);
    match cmd {
        IdpClientsCommand::Create { admin, redirect_uris, public, name, json } => {
            let req = CreateClientRequest { name, redirect_uris, public };
            let c: CreatedClient = admin_call(&admin, hyper::Method::POST, &path, Some(&req))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c).map_err(|e| e.to_string())?);
            } else {
                println!("client_id: {}", c.client.client_id);
                match c.client_secret {
                    Some(s) => println!("client_secret: {s}  (shown once)"),
                    None => println!("public client: no secret, PKCE required"),
                }
            }
        }
        IdpClientsCommand::List { admin, json } => {
            let clients: Vec<IdpClient> = admin_call(&admin, hyper::Method::GET, &path, None::<&()>)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&clients).map_err(|e| e.to_string())?);
            } else {
                for c in clients {
                    let kind = if c.public { "public" } else { "confidential" };
                    println!(
                        "{}  {kind}  {:?}  {}  by {}",
                        c.client_id,
                        c.name,
                        c.redirect_uris.join(" "),
                        c.created_by
                    );
                }
            }
        }
        IdpClientsCommand::Remove { admin, client_id } => {
            let _: serde_json::Value =
                admin_call(&admin, hyper::Method::DELETE, &format!("{path}/{client_id}"), None::<&()>)?;
            println!("removed client {client_id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn users(cmd: UsersCommand) -> Result<ExitCode, String> {
    let path = format!("{}/admin/users", proto::API);
    match cmd {
        UsersCommand::Create { admin, login, display_name } => {
            let req = proto::CreateUserRequest { login, display_name };
            let u: proto::UserInfo = admin_call(&admin, hyper::Method::POST, &path, Some(&req))?;
            println!("created user {} ({}), id {}", u.login, u.display_name, u.id);
        }
        UsersCommand::List { admin, json } => {
            let users: Vec<proto::UserInfo> = admin_call(&admin, hyper::Method::GET, &path, None::<&()>)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users).map_err(|e| e.to_string())?);
            } else {
                for u in users {
                    println!("{}  {}  {}", u.id, u.login, u.display_name);
                }
            }
        }
        UsersCommand::Remove { admin, login } => {
            let _: serde_json::Value =
                admin_call(&admin, hyper::Method::DELETE, &format!("{path}/{login}"), None::<&()>)?;
            println!("removed user {login}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn tailnet_show(admin: &Admin, json: bool) -> Result<ExitCode, String> {
    let t: proto::TailnetInfo =
        admin_call(admin, hyper::Method::GET, &format!("{}/admin/tailnet", proto::API), None::<&()>)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&t).map_err(|e| e.to_string())?);
    } else {
        println!("domain:         {}", t.domain);
        println!("IPv4 range:     {}", t.ipv4_range);
        println!("IPv6 range:     {}", t.ipv6_range);
        println!("certificate:    sha256 {}", t.cert_sha256);
        println!("schema version: {}", t.schema_version);
    }
    Ok(ExitCode::SUCCESS)
}

fn relay_stats(admin: &Admin, json: bool) -> Result<ExitCode, String> {
    let r: wiremesh_daemon::relay::Report =
        admin_call(admin, hyper::Method::GET, &format!("{}/admin/relay", proto::API), None::<&()>)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?);
    } else {
        let s = &r.stats;
        println!("listen:          {}", r.listen);
        println!("clients:         {}", r.clients);
        println!("accepted:        {}", s.accepted);
        println!("auth_failed:     {}", s.auth_failed);
        println!("malformed:       {}", s.malformed);
        println!("forwarded:       {}", s.forwarded);
        println!("forwarded_bytes: {}", s.forwarded_bytes);
        println!("no_peer:         {}", s.no_peer);
        println!("rate_limited:    {}", s.rate_limited);
        println!("queue_full:      {}", s.queue_full);
        println!("stun_answered:   {}", s.stun_answered);
    }
    Ok(ExitCode::SUCCESS)
}

fn nodes(cmd: NodesCommand) -> Result<ExitCode, String> {
    let path = format!("{}/admin/nodes", proto::API);
    match cmd {
        NodesCommand::List { admin, json } => {
            let nodes: Vec<proto::AdminNode> = admin_call(&admin, hyper::Method::GET, &path, None::<&()>)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes).map_err(|e| e.to_string())?);
            } else {
                for a in nodes {
                    let n = &a.node;
                    let online = if n.online { "online" } else { "offline" };
                    let expiry = match (a.expired, a.key_expires_at) {
                        (true, _) => "  key expired".to_string(),
                        (false, Some(at)) => format!("  key expires at {at}"),
                        (false, None) => String::new(),
                    };
                    println!("{}  {}  {}  {}  {online}{expiry}", n.id, n.fqdn, n.ipv4, n.ipv6);
                }
            }
        }
        NodesCommand::Remove { admin, node } => {
            let _: serde_json::Value =
                admin_call(&admin, hyper::Method::DELETE, &format!("{path}/{node}"), None::<&()>)?;
            println!("removed {node}");
        }
        NodesCommand::Rename { admin, node, name } => {
            let req = proto::RenameNodeRequest { name };
            let n: proto::AdminNode =
                admin_call(&admin, hyper::Method::POST, &format!("{path}/{node}/name"), Some(&req))?;
            println!("{node} is now {}", n.node.fqdn);
        }
        NodesCommand::Expire { admin, node, in_, now, never, json } => {
            let expiry_secs = match (in_, now, never) {
                (Some(d), _, _) => Some(parse_duration(&d)?),
                (None, true, _) => Some(0),
                _ => None,
            };
            let req = proto::NodeExpiryRequest { expiry_secs };
            let n: proto::AdminNode =
                admin_call(&admin, hyper::Method::POST, &format!("{path}/{node}/expiry"), Some(&req))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&n).map_err(|e| e.to_string())?);
            } else {
                match (n.key_expires_at, n.expired) {
                    (_, true) => println!("{}: key expired", n.node.fqdn),
                    (Some(at), false) => println!("{}: key expires at {at} (Unix seconds)", n.node.fqdn),
                    (None, _) => println!("{}: key never expires", n.node.fqdn),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
