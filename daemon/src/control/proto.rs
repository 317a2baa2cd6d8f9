//! The control protocol's messages (JSON over HTTPS), the bytes a machine key
//! signs, and the small encodings (hex, base64) they use.

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The prefix of every API path.
pub const API: &str = "/api/v1";

/// Domain separation for every machine-key signature.
const SIGNATURE_CONTEXT: &[u8] = b"wiremesh-control-v1\0";

/// A fresh single-use challenge, to be signed by the machine key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Challenge {
    /// 32 random bytes, hex.
    pub challenge: String,
}

/// `POST /api/v1/register`: a node joins the tailnet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The auth key an administrator created (ignored when the machine is already registered).
    pub auth_key: String,
    /// The Ed25519 machine public key, hex.
    pub machine_key: String,
    /// The WireGuard (X25519) node public key, base64 as `wg` prints it.
    pub node_key: String,
    /// The host name the node asks for (made DNS-safe and unique by the server).
    pub hostname: String,
    /// `ip:port` endpoints where the node listens.
    pub endpoints: Vec<String>,
    /// A challenge from `POST /api/v1/challenge`, hex.
    pub challenge: String,
    /// Ed25519 signature over [`register_message`], hex.
    pub signature: String,
}

/// `POST /api/v1/map`: a node opens its map stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapRequest {
    /// The Ed25519 machine public key, hex.
    pub machine_key: String,
    /// The node key the node currently uses, base64.
    pub node_key: String,
    /// `ip:port` endpoints where the node listens now.
    pub endpoints: Vec<String>,
    /// A challenge from `POST /api/v1/challenge`, hex.
    pub challenge: String,
    /// Ed25519 signature over [`map_message`], hex.
    pub signature: String,
}

/// `POST /api/v1/map` from a node that routes: a [`MapRequest`] plus what
/// it offers and uses (a plain `MapRequest` is this with neither). The
/// signature covers both ([`map_message_with_routes`]). See docs/routes.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutedMapRequest {
    /// The ordinary map request.
    #[serde(flatten)]
    pub request: MapRequest,
    /// Prefixes the node offers to route (`--advertise-routes`; `0.0.0.0/0`
    /// and `::/0` for `--advertise-exit-node`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// The exit node (name) the node sends its Internet traffic through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_node: Option<String>,
}

/// `POST /api/v1/logout`: a node leaves the tailnet (the server removes it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogoutRequest {
    /// The Ed25519 machine public key, hex.
    pub machine_key: String,
    /// The node key the node currently uses, base64.
    pub node_key: String,
    /// A challenge from `POST /api/v1/challenge`, hex.
    pub challenge: String,
    /// Ed25519 signature over [`logout_message`], hex.
    pub signature: String,
}

/// One node as the maps and the admin API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The server's stable identifier.
    pub id: i64,
    /// The unique DNS label.
    pub name: String,
    /// `name.domain`.
    pub fqdn: String,
    /// The WireGuard public key, base64.
    pub node_key: String,
    /// The machine public key, hex.
    pub machine_key: String,
    /// The tailnet IPv4 address (in 100.64.0.0/10).
    pub ipv4: Ipv4Addr,
    /// The tailnet IPv6 address (in the tailnet's ULA /48).
    pub ipv6: Ipv6Addr,
    /// The endpoints the node reported.
    pub endpoints: Vec<String>,
    /// What the node may send from: its /32 and /128.
    pub allowed_ips: Vec<String>,
    /// Tags from the auth key.
    pub tags: Vec<String>,
    /// Whether the node was registered with an ephemeral key.
    pub ephemeral: bool,
    /// Whether the node holds a map stream open now.
    pub online: bool,
    /// Who the node belongs to: `tagged-devices` for tagged nodes, else its
    /// auth key's user's login, or `admin` for a key without a user.
    pub owner: String,
    /// Unix seconds of registration.
    pub created_at: i64,
    /// The id of the node's home relay ([`RelayInfo::id`]): the relay of the
    /// control replica it streams its map from, where its peers reach it
    /// when no direct path works. Absent: offline, or no relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

/// A node as the admin API lists it: the map's view plus its key expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminNode {
    /// What maps show.
    #[serde(flatten)]
    pub node: NodeInfo,
    /// Unix seconds after which the node must re-authenticate (none: never).
    #[serde(default)]
    pub key_expires_at: Option<i64>,
    /// Whether that time has passed: the node is in no map and its stream is refused.
    #[serde(default)]
    pub expired: bool,
}

/// `POST /api/v1/admin/nodes/<id or name>/expiry`: when the node's key expires.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeExpiryRequest {
    /// Seconds from now; 0 expires it at once; none (or absent) means never.
    #[serde(default)]
    pub expiry_secs: Option<u64>,
}

/// `POST /api/v1/admin/nodes/<id or name>/name`: the node's new DNS label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameNodeRequest {
    /// A DNS label: lowercase letters, digits and inner hyphens, 1 to 63 characters.
    pub name: String,
}

/// One rule of a node's inbound packet filter (see docs/policy.md): packets
/// from `src` to `dst` of one of `protocols` (to one of `ports`, for TCP,
/// UDP and SCTP) are accepted. A tailnet without a policy sends the single
/// [`FilterRule::allow_all`] rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    /// Source prefixes (`*` for any).
    pub src: Vec<String>,
    /// Destination prefixes (`*` for any).
    pub dst: Vec<String>,
    /// IANA protocol numbers (empty: every protocol).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<u8>,
    /// Destination ports: `*`, or ports and ranges such as `22,8000-8100`.
    pub ports: String,
}

impl FilterRule {
    /// The filter of a tailnet without a policy: everything is accepted.
    pub fn allow_all() -> Vec<FilterRule> {
        vec![FilterRule { src: vec!["*".into()], dst: vec!["*".into()], protocols: Vec::new(), ports: "*".into() }]
    }
}

/// An application capability granted to a node: callers from `src` may use
/// capability `name` with these `values` (as the policy's grant wrote them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapGrant {
    /// Caller prefixes.
    pub src: Vec<String>,
    /// The capability name (for example `example.com/cap/db`).
    pub name: String,
    /// Its values.
    pub values: Vec<serde_json::Value>,
}

/// `GET /api/v1/admin/policy` (and the answer to a `PUT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// The policy file as set (none: no policy, everything is allowed).
    pub policy: Option<String>,
    /// Grows with each set (0: never set).
    pub version: i64,
}

/// A node's whole view of the tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMap {
    /// Grows with every change of the tailnet.
    pub version: u64,
    /// The tailnet's DNS domain.
    pub domain: String,
    /// The node itself.
    #[serde(rename = "self")]
    pub self_node: NodeInfo,
    /// Every other node, by id.
    pub peers: Vec<NodeInfo>,
    /// The node's inbound packet filter.
    pub filter: Vec<FilterRule>,
    /// Application capabilities granted to the node, by caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<CapGrant>,
    /// Prefixes beyond the tailnet this node sends through a peer (subnet
    /// routes of each prefix's primary router, and its exit node's default
    /// routes), by peer. See docs/routes.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<PeerRoutes>,
    /// Relays (each also a STUN server) the node may use when no direct
    /// path to a peer works. See docs/nat.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelayInfo>,
    /// Where the tailnet's identity service answers (workload tokens,
    /// OIDC), when the control server runs one. See docs/identity.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityInfo>,
}

/// The identity service as maps name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    /// Its base URL on the tailnet (`http://<IPv4>`).
    pub url: String,
    /// Its tailnet IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its tailnet IPv6 address.
    pub ipv6: Ipv6Addr,
    /// The token issuer (`iss`), whose discovery document and JWKS the
    /// control server also serves on its public listener.
    pub issuer: String,
}

/// A relay and STUN server nodes may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// Which relay this is (the id of the control replica that runs it),
    /// as peers' [`NodeInfo::relay`] name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Host to connect to; absent: the control server's own host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP port of its TLS listener; STUN answers on the same UDP port.
    pub port: u16,
    /// SHA-256 of its certificate in hex; absent: the control server's pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl RelayInfo {
    /// Parses `relay://HOST:PORT#sha256=HEX`, the URL `wiremeshd relay`
    /// prints (HOST a name, an IPv4 address or a bracketed IPv6 address).
    /// The relay's id is `HOST:PORT`.
    pub fn from_url(url: &str) -> Result<RelayInfo, String> {
        let rest = url.strip_prefix("relay://").ok_or_else(|| format!("{url}: not a relay:// URL"))?;
        let (at, fp) = rest.split_once("#sha256=").ok_or_else(|| format!("{url}: no #sha256=<fingerprint>"))?;
        if unhex::<32>(fp).is_none() {
            return Err(format!("{url}: the fingerprint is not 64 hex digits"));
        }
        let (host, port) = at.rsplit_once(':').ok_or_else(|| format!("{url}: no port"))?;
        let port: u16 = port.parse().map_err(|_| format!("{url}: bad port {port:?}"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let bad = host.is_empty()
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified())
            || !host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c));
        if bad || port == 0 {
            return Err(format!("{url}: needs a host and port nodes can reach"));
        }
        Ok(RelayInfo {
            id: Some(at.to_string()),
            host: Some(host.to_string()),
            port,
            fingerprint: Some(fp.to_ascii_lowercase()),
        })
    }
}

/// Prefixes a node routes through one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoutes {
    /// The peer's node id.
    pub peer: i64,
    /// Canonical prefixes, sorted.
    pub prefixes: Vec<String>,
}

/// A route as the admin API lists it (`GET /api/v1/admin/routes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The router's node id.
    pub node_id: i64,
    /// The router's name.
    pub node: String,
    /// The canonical prefix.
    pub prefix: String,
    /// The node offers it now.
    pub advertised: bool,
    /// An administrator approved it.
    pub approved: bool,
    /// The policy's `autoApprovers` approve it.
    pub auto_approved: bool,
    /// Whether the router is online.
    pub online: bool,
    /// The router is the one its peers use for this prefix (exit routes:
    /// whenever approved and advertised, since each node picks its own).
    pub primary: bool,
}

/// `POST /api/v1/admin/routes/<node>/approve` and `.../unapprove`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesRequest {
    /// Prefixes (`exit` stands for `0.0.0.0/0` and `::/0`).
    pub prefixes: Vec<String>,
}

/// One line of the map stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamMessage {
    /// The full map.
    Map(Box<NetworkMap>),
    /// Nothing changed; the connection is alive.
    Keepalive,
    /// The stream ends for this reason (for example the node was removed).
    Error(ErrorBody),
}

/// The map-stream protocol a node asks for with `POST /api/v1/map?version=N`.
/// Version 1 (no query, what older nodes send): every change is a full map
/// ([`StreamMessage`]). Version 2: a full map first, then only what changed
/// ([`StreamMessageV2::Delta`]). The server answers with the version it speaks
/// in the [`MAP_VERSION_HEADER`] response header (the lower of the two).
pub const MAP_VERSION: u32 = 2;
/// The response header naming the map-stream version in use.
pub const MAP_VERSION_HEADER: &str = "wiremesh-map-version";

/// What changed in a node's map since the last line (map-stream version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDelta {
    /// The tailnet's version this delta brings the map to.
    pub version: u64,
    /// The node itself, when it changed.
    #[serde(rename = "self", default, skip_serializing_if = "Option::is_none")]
    pub self_node: Option<NodeInfo>,
    /// Peers new or changed, whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<NodeInfo>,
    /// Ids of peers gone (removed, key expired, or no longer visible under the policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<i64>,
    /// The node's whole new packet filter, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Vec<FilterRule>>,
    /// The node's whole new capabilities, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<CapGrant>>,
    /// The node's whole new routes through peers, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<PeerRoutes>>,
}

/// One line of a version 2 map stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamMessageV2 {
    /// The full map (always the first line).
    Map(Box<NetworkMap>),
    /// Changes to apply to the last map.
    Delta(Box<MapDelta>),
    /// Nothing changed; the connection is alive.
    Keepalive,
    /// The stream ends for this reason.
    Error(ErrorBody),
}

impl NetworkMap {
    /// Applies a delta: peers stay ordered by id, as in a full map.
    pub fn apply(&mut self, d: MapDelta) {
        self.version = d.version;
        if let Some(me) = d.self_node {
            self.self_node = me;
        }
        if let Some(f) = d.filter {
            self.filter = f;
        }
        if let Some(c) = d.capabilities {
            self.capabilities = c;
        }
        if let Some(r) = d.routes {
            self.routes = r;
        }
        self.peers.retain(|p| !d.remove.contains(&p.id));
        for n in d.upsert {
            match self.peers.binary_search_by_key(&n.id, |p| p.id) {
                Ok(i) => self.peers[i] = n,
                Err(i) => self.peers.insert(i, n),
            }
        }
    }
}

/// The body of every 4xx and 5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable reason, e.g. `bad_request`, `unauthorized`, `key_spent`.
    pub code: String,
    /// A sentence for people.
    pub error: String,
}

/// `POST /api/v1/admin/keys`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// The key may register any number of nodes.
    #[serde(default)]
    pub reusable: bool,
    /// Nodes registered with it are ephemeral.
    #[serde(default)]
    pub ephemeral: bool,
    /// Tags given to nodes registered with it (`tag:name`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Seconds until the key expires (none: never).
    #[serde(default)]
    pub expiry_secs: Option<u64>,
    /// The login of the user its (untagged) nodes belong to (none: `admin`).
    #[serde(default)]
    pub user: Option<String>,
    /// Nodes registered with it get a node key expiring this many seconds
    /// after registration (none: never).
    #[serde(default)]
    pub node_key_expiry_secs: Option<u64>,
}

/// An auth key as the admin API lists it (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthKeyInfo {
    /// The key's identifier.
    pub id: i64,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    /// May register many nodes.
    pub reusable: bool,
    /// Registers ephemeral nodes.
    pub ephemeral: bool,
    /// Tags given to its nodes.
    pub tags: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, if it expires.
    pub expires_at: Option<i64>,
    /// Nodes registered with it.
    pub uses: i64,
    /// Whether a one-off key was used.
    pub spent: bool,
    /// Whether an admin revoked it.
    pub revoked: bool,
    /// The login of the user its untagged nodes belong to.
    #[serde(default)]
    pub user: Option<String>,
    /// The node key expiry its nodes get, in seconds after registration.
    #[serde(default)]
    pub node_key_expiry_secs: Option<u64>,
}

/// A user of the tailnet: owns the untagged nodes registered with its keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The server's stable identifier.
    pub id: i64,
    /// Unique login (a name or an e-mail address, lowercase).
    pub login: String,
    /// Name for people.
    pub display_name: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// `POST /api/v1/admin/users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateUserRequest {
    /// Unique login.
    pub login: String,
    /// Name for people (defaults to the login).
    #[serde(default)]
    pub display_name: Option<String>,
}

/// The answer to `POST /api/v1/admin/keys`: the only time the key is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    /// The secret key.
    pub key: String,
    /// What the key is.
    pub info: AuthKeyInfo,
}

/// `GET /api/v1/admin/tailnet`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TailnetInfo {
    /// DNS domain of the tailnet.
    pub domain: String,
    /// The IPv4 range nodes get addresses from.
    pub ipv4_range: String,
    /// The tailnet's ULA /48.
    pub ipv6_range: String,
    /// SHA-256 of the server certificate, hex.
    pub cert_sha256: String,
    /// Schema version of the state store.
    pub schema_version: i64,
}

/// The bytes a machine key signs to register. The server certificate's
/// fingerprint is included so a signature made for one server is useless at another.
pub fn register_message(challenge: &[u8; 32], cert_sha256: &[u8; 32], req: &RegisterRequest) -> Vec<u8> {
    let endpoints = req.endpoints.join(",");
    signed_message(
        "register",
        challenge,
        cert_sha256,
        &[&req.auth_key, &req.machine_key, &req.node_key, &req.hostname, &endpoints],
    )
}

/// `POST /api/v1/register/federated`: a node registers with an outside
/// issuer's ID token instead of an auth key (see docs/identity.md,
/// Federation). `request.auth_key` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederatedRegisterRequest {
    /// The ordinary registration (machine key, node key, host name, endpoints, challenge).
    #[serde(flatten)]
    pub request: RegisterRequest,
    /// The trust credential's client ID.
    pub client_id: String,
    /// The issuer's ID token (a JWT).
    pub id_token: String,
    /// The tags asked for (a subset of the credential's).
    pub tags: Vec<String>,
}

/// The bytes a machine key signs to register with an ID token: the
/// registration's fields, then the client ID, the token and the tags.
pub fn federated_register_message(
    challenge: &[u8; 32],
    cert_sha256: &[u8; 32],
    req: &FederatedRegisterRequest,
) -> Vec<u8> {
    let r = &req.request;
    let endpoints = r.endpoints.join(",");
    let tags = req.tags.join(",");
    signed_message(
        "register-federated",
        challenge,
        cert_sha256,
        &[&r.machine_key, &r.node_key, &r.hostname, &endpoints, &req.client_id, &req.id_token, &tags],
    )
}

/// The bytes a machine key signs to open its map stream.
pub fn map_message(challenge: &[u8; 32], cert_sha256: &[u8; 32], req: &MapRequest) -> Vec<u8> {
    let endpoints = req.endpoints.join(",");
    signed_message("map", challenge, cert_sha256, &[&req.machine_key, &req.node_key, &endpoints])
}

/// The bytes a machine key signs to open its map stream with routes: without
/// routes and exit node, exactly [`map_message`]; with them, two more fields.
pub fn map_message_with_routes(challenge: &[u8; 32], cert_sha256: &[u8; 32], req: &RoutedMapRequest) -> Vec<u8> {
    let r = &req.request;
    let endpoints = r.endpoints.join(",");
    if req.routes.is_empty() && req.exit_node.is_none() {
        return map_message(challenge, cert_sha256, r);
    }
    let routes = req.routes.join(",");
    let exit = req.exit_node.as_ref().map(|e| format!("exit:{e}")).unwrap_or_default();
    signed_message("map", challenge, cert_sha256, &[&r.machine_key, &r.node_key, &endpoints, &routes, &exit])
}

/// The bytes a machine key signs to log its node out.
pub fn logout_message(challenge: &[u8; 32], cert_sha256: &[u8; 32], req: &LogoutRequest) -> Vec<u8> {
    signed_message("logout", challenge, cert_sha256, &[&req.machine_key, &req.node_key])
}

fn signed_message(purpose: &str, challenge: &[u8; 32], cert_sha256: &[u8; 32], fields: &[&str]) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(purpose.as_bytes());
    m.push(0);
    m.extend_from_slice(challenge);
    m.extend_from_slice(cert_sha256);
    // Length-prefixed, so no two field lists give the same bytes.
    for f in fields {
        m.extend_from_slice(&(f.len() as u32).to_be_bytes());
        m.extend_from_slice(f.as_bytes());
    }
    m
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Decodes hex of exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding of a 32-byte key (the form `wg` prints).
pub fn b64_key(key: &[u8; 32]) -> String {
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

/// Decodes a base64 32-byte key (44 characters ending in one `=`).
pub fn unb64_key(s: &str) -> Option<[u8; 32]> {
    let s = s.trim().as_bytes();
    if s.len() != 44 || s[43] != b'=' || s[..43].contains(&b'=') {
        return None;
    }
    let mut bits: u64 = 0;
    let mut nbits = 0;
    let mut out = [0u8; 32];
    let mut o = 0;
    for &c in &s[..43] {
        let v = B64.iter().position(|&b| b == c)? as u64;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            if o < 32 {
                out[o] = (bits >> nbits) as u8;
            }
            o += 1;
            bits &= (1 << nbits) - 1;
        }
    }
    // 43 characters carry 258 bits: 32 bytes and 2 bits that must be zero.
    (o == 32 && bits == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex::<4>("0001abff"), Some(b));
        assert_eq!(unhex::<4>("0001abf"), None);
        assert_eq!(unhex::<4>("0001abfg"), None);
    }

    #[test]
    fn base64_keys_round_trip_and_reject_garbage() {
        for seed in 0..=255u8 {
            let k: [u8; 32] = core::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(seed));
            let s = b64_key(&k);
            assert_eq!(s.len(), 44);
            assert_eq!(unb64_key(&s), Some(k));
        }
        assert_eq!(unb64_key("AAAA"), None);
        // The last character before '=' may only carry zero low bits.
        assert_eq!(unb64_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB="), None);
        assert_eq!(unb64_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="), Some([0; 32]));
    }

    #[test]
    fn relay_urls_parse_as_wiremeshd_relay_prints_them() {
        let fp = "AB".repeat(32);
        let r = RelayInfo::from_url(&format!("relay://relay.example:3340#sha256={fp}")).unwrap();
        assert_eq!(r.id.as_deref(), Some("relay.example:3340"));
        assert_eq!((r.host.as_deref(), r.port), (Some("relay.example"), 3340));
        assert_eq!(r.fingerprint, Some("ab".repeat(32)));
        let r = RelayInfo::from_url(&format!("relay://[2001:db8::1]:443#sha256={fp}")).unwrap();
        assert_eq!((r.host.as_deref(), r.port), (Some("2001:db8::1"), 443));
        for bad in [
            format!("https://relay.example:3340#sha256={fp}"),
            "relay://relay.example:3340".to_string(),
            "relay://relay.example:3340#sha256=abcd".to_string(),
            format!("relay://relay.example#sha256={fp}"),
            format!("relay://relay.example:0#sha256={fp}"),
            format!("relay://relay.example:99999#sha256={fp}"),
            format!("relay://0.0.0.0:3340#sha256={fp}"),
            format!("relay://:3340#sha256={fp}"),
            format!("relay://a/b:3340#sha256={fp}"),
        ] {
            assert!(RelayInfo::from_url(&bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn signed_messages_differ_by_purpose_and_field_boundaries() {
        let c = [7u8; 32];
        let f = [9u8; 32];
        let a = signed_message("map", &c, &f, &["ab", "c"]);
        let b = signed_message("map", &c, &f, &["a", "bc"]);
        let r = signed_message("register", &c, &f, &["ab", "c"]);
        assert_ne!(a, b);
        assert_ne!(a, r);
    }
}
