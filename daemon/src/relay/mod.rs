//! The relay: forwards frames between nodes that cannot reach each other
//! directly, addressed by node key, over TCP with TLS (so it works where
//! only outbound HTTPS does), and answers STUN binding requests on UDP.
//!
//! It never sees plaintext: what it forwards is WireGuard ciphertext and
//! sealed disco probes. See docs/nat.md for the protocol and its limits.
//!
//! ## Protocol (inside TLS 1.3, the control server's pinned certificate)
//!
//! 1. Relay: `WMRELAY1` (8), its X25519 public key (32), a fresh nonce (32).
//! 2. Client: its node public key (32), the proof
//!    [`wiremesh_core::disco::relay_proof`] (32) that it holds the private key.
//! 3. Relay: one byte, 0 (accepted); a wrong proof closes the connection.
//! 4. Frames both ways: type (1), node key (32), length (2, big-endian),
//!    payload (at most [`MAX_PAYLOAD`]). A client sends type 1 (the key
//!    names the destination); the relay sends type 2 (the key names the
//!    source). Anything else, or an empty or longer payload, closes the
//!    connection. The byte layouts are in [`wire`].

pub mod client;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use wiremesh_core::keys::{PrivateKey, PublicKey};

pub use wire::{
    WireError, AUTH_ACCEPTED, AUTH_LEN, FRAME_HEADER_LEN, FRAME_RECV, FRAME_SEND, HELLO_LEN, HELLO_MAGIC, MAX_PAYLOAD,
};
/// How long a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-client limits, so that one node cannot starve the others.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of payload per second a client may send (token bucket rate).
    pub rate_bytes_per_sec: u64,
    /// Bytes a client may send in one burst (token bucket depth).
    pub burst_bytes: u64,
    /// Frames queued towards one client before further frames are dropped.
    pub queue_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { rate_bytes_per_sec: 64 << 20, burst_bytes: 4 << 20, queue_frames: 1024 }
    }
}

/// Counters of what the relay did and refused.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections that completed the key proof.
    pub accepted: AtomicU64,
    /// Connections that failed the TLS handshake or the key proof.
    pub auth_failed: AtomicU64,
    /// Connections closed for a malformed or oversized frame.
    pub malformed: AtomicU64,
    /// Frames forwarded.
    pub forwarded: AtomicU64,
    /// Payload bytes forwarded.
    pub forwarded_bytes: AtomicU64,
    /// Frames for a key with no connection.
    pub no_peer: AtomicU64,
    /// Frames over the sender's rate.
    pub rate_limited: AtomicU64,
    /// Frames dropped because the receiver's queue was full.
    pub queue_full: AtomicU64,
    /// STUN binding requests answered.
    pub stun_answered: AtomicU64,
}

impl Stats {
    /// A plain copy of the counters, for reports and tests.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            accepted: g(&self.accepted),
            auth_failed: g(&self.auth_failed),
            malformed: g(&self.malformed),
            forwarded: g(&self.forwarded),
            forwarded_bytes: g(&self.forwarded_bytes),
            no_peer: g(&self.no_peer),
            rate_limited: g(&self.rate_limited),
            queue_full: g(&self.queue_full),
            stun_answered: g(&self.stun_answered),
        }
    }
}

/// The values of [`Stats`] at one moment (field names as in the admin API's
/// `GET /api/v1/admin/relay`).
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub auth_failed: u64,
    pub malformed: u64,
    pub forwarded: u64,
    pub forwarded_bytes: u64,
    pub no_peer: u64,
    pub rate_limited: u64,
    pub queue_full: u64,
    pub stun_answered: u64,
}

/// What `GET /api/v1/admin/relay` answers: where the relay listens, how many
/// clients are connected, and its counters (flattened beside them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The bound address (TLS on TCP, STUN on UDP), `ADDR:PORT`.
    pub listen: SocketAddr,
    /// Clients connected now.
    pub clients: usize,
    /// The counters since the relay started.
    #[serde(flatten)]
    pub stats: StatsSnapshot,
}

/// A frame on its way to a client: the source key and the payload.
type Outbound = (PublicKey, Vec<u8>);

struct Client {
    conn: u64,
    tx: mpsc::Sender<Outbound>,
}

/// The relay's shared state: its key, the connected clients, limits, counters.
pub struct Relay {
    key: PrivateKey,
    clients: RwLock<HashMap<PublicKey, Client>>,
    next_conn: Mutex<u64>,
    limits: Limits,
    /// Counters.
    pub stats: Stats,
}

impl Relay {
    /// A relay with a fresh X25519 key (clients learn it inside TLS, so it
    /// need not survive a restart).
    pub fn new(limits: Limits) -> Arc<Relay> {
        Arc::new(Relay {
            key: PrivateKey::from_bytes(random32()),
            clients: RwLock::new(HashMap::new()),
            next_conn: Mutex::new(0),
            limits,
            stats: Stats::default(),
        })
    }

    /// How many clients are connected.
    pub fn clients(&self) -> usize {
        self.clients.read().map(|c| c.len()).unwrap_or(0)
    }

    /// The counters and the client count, as the admin API reports them.
    pub fn report(&self, listen: SocketAddr) -> Report {
        Report { listen, clients: self.clients(), stats: self.stats.snapshot() }
    }

    /// Accepts TLS connections on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    eprintln!("wiremeshd relay: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let relay = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => relay.client(stream).await,
                    _ => {
                        relay.stats.auth_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }

    /// Answers STUN binding requests on `socket` until the task is dropped.
    pub async fn serve_stun(self: Arc<Self>, socket: UdpSocket) {
        use wiremesh_core::stun;
        let mut buf = [0u8; 1500];
        let mut out = [0u8; stun::MAX_BINDING_RESPONSE_LEN];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
            let Ok(m) = stun::parse(&buf[..n]) else { continue };
            if m.class != stun::Class::Request {
                continue;
            }
            if let Ok(len) = stun::encode_binding_response(&m.transaction_id, from, &mut out) {
                if socket.send_to(&out[..len], from).await.is_ok() {
                    self.stats.stun_answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn client<S>(self: Arc<Self>, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::with_capacity(client::WRITE_BUFFER, wr);
        let Ok(Ok(key)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.authenticate(&mut rd, &mut wr)).await else {
            self.stats.auth_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Outbound>(self.limits.queue_frames.max(1));
        let conn = {
            let mut n = self.next_conn.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        // A newer connection for the same key replaces an older one.
        self.clients.write().unwrap_or_else(|e| e.into_inner()).insert(key, Client { conn, tx });
        let writer = tokio::spawn(async move {
            while let Some((src, payload)) = rx.recv().await {
                // Only frames that parsed as 1..=MAX_PAYLOAD bytes are queued.
                let Ok(header) = wire::FrameHeader::recv(src.0, payload.len()) else { continue };
                if wr.write_all(&header.encode()).await.is_err() || wr.write_all(&payload).await.is_err() {
                    break;
                }
                if rx.is_empty() && wr.flush().await.is_err() {
                    break;
                }
            }
        });
        self.forward_from(key, &mut rd).await;
        {
            let mut clients = self.clients.write().unwrap_or_else(|e| e.into_inner());
            if clients.get(&key).is_some_and(|c| c.conn == conn) {
                clients.remove(&key);
            }
        }
        writer.abort();
    }

    /// Runs the key proof; returns the client's proven key.
    async fn authenticate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<PublicKey, ()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let nonce = random32();
        let hello = wire::Hello { relay_key: self.key.public_key().0, nonce };
        wr.write_all(&hello.encode()).await.map_err(|_| ())?;
        wr.flush().await.map_err(|_| ())?;
        let mut bytes = [0u8; AUTH_LEN];
        rd.read_exact(&mut bytes).await.map_err(|_| ())?;
        let auth = wire::Auth::parse(&bytes).map_err(|_| ())?;
        let claimed = PublicKey(auth.key);
        let expected = wiremesh_core::disco::relay_proof(&self.key, &claimed, &claimed, &nonce).map_err(|_| ())?;
        if !wiremesh_core::crypto::ct_eq(&expected, &auth.proof) {
            return Err(());
        }
        wr.write_all(&[AUTH_ACCEPTED]).await.map_err(|_| ())?;
        wr.flush().await.map_err(|_| ())?;
        Ok(claimed)
    }

    /// Reads the client's frames and forwards them until it disconnects or
    /// sends something malformed.
    async fn forward_from<R: tokio::io::AsyncRead + Unpin>(&self, src: PublicKey, rd: &mut R) {
        let mut bucket = TokenBucket::new(self.limits.rate_bytes_per_sec, self.limits.burst_bytes);
        let mut header = [0u8; FRAME_HEADER_LEN];
        loop {
            if rd.read_exact(&mut header).await.is_err() {
                return;
            }
            let Ok(frame) = wire::FrameHeader::parse(&header, FRAME_SEND) else {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let len = frame.payload_len();
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                return;
            }
            if !bucket.take(len as u64, Instant::now()) {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let dst = PublicKey(frame.key());
            let tx = self.clients.read().unwrap_or_else(|e| e.into_inner()).get(&dst).map(|c| c.tx.clone());
            let Some(tx) = tx else {
                self.stats.no_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match tx.try_send((src, payload)) {
                Ok(()) => {
                    self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    self.stats.forwarded_bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.stats.no_peer.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A token bucket over bytes.
struct TokenBucket {
    rate: u64,
    depth: u64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u64, depth: u64) -> Self {
        TokenBucket { rate, depth, tokens: depth as f64, at: Instant::now() }
    }

    fn take(&mut self, n: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.depth as f64);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

fn random32() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).expect("the system RNG works");
    b
}

/// What `wiremeshd relay` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// TCP address for TLS clients; STUN is served on the same UDP port.
    pub listen: SocketAddr,
    /// Directory holding the TLS certificate (made at first start).
    pub state: std::path::PathBuf,
    /// Per-client limits.
    pub limits: Limits,
    /// Print the counters to stdout this often (`relay stats: ...` lines);
    /// none when `None` (the standalone relay has no admin API).
    pub stats_interval: Option<Duration>,
}

/// Binds the relay's TCP listener and the STUN socket on the same address
/// and serves both in the current runtime. Returns the bound address.
pub async fn start(
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
) -> Result<(Arc<Relay>, SocketAddr), String> {
    let listener = TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let udp = UdpSocket::bind(addr).await.map_err(|e| format!("cannot bind STUN on udp {addr}: {e}"))?;
    let relay = Relay::new(limits);
    tokio::spawn(relay.clone().serve(listener, tls));
    tokio::spawn(relay.clone().serve_stun(udp));
    Ok((relay, addr))
}

/// The counters as one `name=value` line, for `--stats-interval`.
pub fn stats_line(clients: usize, s: &StatsSnapshot) -> String {
    format!(
        "clients={clients} accepted={} auth_failed={} malformed={} forwarded={} forwarded_bytes={} no_peer={} \
         rate_limited={} queue_full={} stun_answered={}",
        s.accepted,
        s.auth_failed,
        s.malformed,
        s.forwarded,
        s.forwarded_bytes,
        s.no_peer,
        s.rate_limited,
        s.queue_full,
        s.stun_answered
    )
}

/// `wiremeshd relay`: serves until SIGTERM or Ctrl-C.
pub fn run(opts: &Options) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.state)
        .map_err(|e| format!("{}: {e}", opts.state.display()))?;
    let identity = crate::control::tls::load_or_create(&opts.state)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let (relay, addr) = start(opts.listen, identity.config.clone(), opts.limits).await?;
        {
            let mut out = std::io::stdout().lock();
            let fp = crate::control::proto::hex(&identity.fingerprint);
            let _ = writeln!(out, "relay listening on {addr} (tcp, TLS) and {addr} (udp, STUN)");
            let _ = writeln!(out, "relay URL: relay://{addr}#sha256={fp}");
            let _ = out.flush();
        }
        if let Some(every) = opts.stats_interval.filter(|d| !d.is_zero()) {
            let relay = relay.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    crate::say!("relay stats: {}", stats_line(relay.clients(), &relay.stats.snapshot()));
                }
            });
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        Ok(())
    })
}
