//! The userspace netstack: a node that holds its tailnet addresses inside
//! one process, with no TUN device and no root.
//!
//! A [`smoltcp`] interface takes the place of the TUN device. IP packets
//! the `wiremesh-core` device decrypts go into the interface; packets the
//! interface emits are sealed in place by the core and leave through the
//! same dual-stack UDP socket as in the TUN data plane (GSO batches per
//! destination, GRO on receive). One worker thread reads datagrams and runs
//! the timers; the async tasks using the sockets move bytes under the same
//! lock and push out what smoltcp can send at once.
//!
//! Path discovery and the relay run as in the TUN worker: with
//! [`Control::set_disco`] probes and STUN share the UDP socket with
//! WireGuard, and with [`Control::relay_link`] a peer whose path is the
//! relay is reached through the link (see `crate::disco`, `crate::relay`).
//!
//! Configuration takes the wg(8) `set` path of the TUN driver:
//! [`Netstack::control`] returns the same [`Control`] handle, so
//! `Control::uapi` (and a UAPI socket served with it) configures keys,
//! peers, endpoints and allowed IPs exactly as for `wiremeshd interface`.
//!
//! Embedding (with tokio):
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use wiremesh_dataplane::netstack::{Netstack, Options};
//! use wiremesh_dataplane::uapi::DeviceConfig;
//! let config = DeviceConfig::default(); // private key and peers, e.g. from `wg setconf` text
//! let opts = Options { addresses: vec![("100.64.0.1".parse().unwrap(), 10)], ..Options::default() };
//! let node = Netstack::start(config, opts)?;
//! let listener = node.listen_tcp(80)?;
//! let (stream, from) = listener.accept().await?;
//! let who = node.peer_of(from.ip()); // the WireGuard key the packets came with
//! # Ok(()) }
//! ```
//!
//! Buffer sizes ([`Options`]): every TCP socket gets `tcp_rx_buffer` bytes
//! to receive into (65535 by default, also the most: see
//! [`MAX_TCP_RX_BUFFER`]), which is the window advertised to the peer, and
//! `tcp_tx_buffer` bytes to send from (512 KiB: a larger send buffer lets a
//! peer with a wider window, such as a Linux kernel, take more at once).
//! Buffers are allocated zeroed, so their pages are touched only as data
//! passes. Nagle is off and delayed ACKs wait 1 ms (smoltcp's default of
//! 10 ms holds back a sender whose window is full). docs/userspace.md has
//! the measured effect.

mod phy;
mod stack;
mod tcp;
mod udp;

pub use tcp::{TcpListener, TcpStream};
pub use udp::UdpSocket;

use crate::driver::Control;
use crate::uapi::DeviceConfig;
use crate::udp::UdpSock;
use stack::{Inner, Shared};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wiremesh_core::keys::PublicKey;

/// The largest TCP receive buffer (and so window) a socket may have.
///
/// Above 64 KiB smoltcp scales its window (RFC 7323) and rounds the
/// advertised window down to the scale, which can move the window's right
/// edge back by up to 2^scale - 1 bytes between two ACKs; a segment the
/// peer sent into the older, larger window then makes smoltcp 0.12 (and
/// 0.14) panic in `last_scaled_window` ("subtract sequence numbers with
/// underflow"). With a window of at most 65535 bytes the scale is 0, the
/// right edge never moves back, and the panic cannot happen.
pub const MAX_TCP_RX_BUFFER: usize = 65535;

/// How a netstack is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node's tailnet addresses with their prefix lengths (one IPv4
    /// and one IPv6 are used); they may also be set later.
    pub addresses: Vec<(IpAddr, u8)>,
    /// The tunnel MTU: the largest IP packet smoltcp emits.
    pub mtu: usize,
    /// Receive buffer per TCP socket (the advertised window), in bytes.
    pub tcp_rx_buffer: usize,
    /// Send buffer per TCP socket, in bytes.
    pub tcp_tx_buffer: usize,
    /// Delayed-ACK timeout (`None`: acknowledge every segment at once).
    pub tcp_ack_delay: Option<Duration>,
    /// Datagrams queued per UDP socket and direction.
    pub udp_buffer_packets: usize,
    /// Payload bytes queued per UDP socket and direction.
    pub udp_buffer_bytes: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            addresses: Vec::new(),
            mtu: 1420,
            tcp_rx_buffer: MAX_TCP_RX_BUFFER,
            tcp_tx_buffer: 512 * 1024,
            tcp_ack_delay: Some(Duration::from_millis(1)),
            udp_buffer_packets: 256,
            udp_buffer_bytes: 256 * 1024,
        }
    }
}

/// Which peer a remote address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's WireGuard public key (its node key on a tailnet).
    pub public_key: PublicKey,
    /// The remote address asked about.
    pub address: IpAddr,
}

/// A running userspace netstack; cheap to clone, every clone the same node.
/// [`Netstack::shutdown`] stops it (dropping the handles does not).
#[derive(Clone)]
pub struct Netstack {
    shared: Arc<Shared>,
    control: Control,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Netstack {
    /// Binds the UDP socket for `config` (its listen port, 0: any),
    /// applies the configuration and starts the worker thread.
    pub fn start(config: DeviceConfig, options: Options) -> io::Result<Netstack> {
        if !(1280..=65535).contains(&options.mtu) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the MTU must be within 1280..=65535"));
        }
        if options.tcp_rx_buffer < 4096 || options.tcp_tx_buffer < 4096 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "TCP buffers must hold at least 4096 bytes"));
        }
        if options.tcp_rx_buffer > MAX_TCP_RX_BUFFER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the TCP receive buffer cannot exceed {MAX_TCP_RX_BUFFER} bytes (see MAX_TCP_RX_BUFFER)"),
            ));
        }
        let (control, inbox) = Control::pair()?;
        let udp = UdpSock::bind(config.listen_port, config.fwmark)?;
        let mut inner = Inner::new(udp, options, control.stats.clone());
        inner.config.listen_port = inner.phy.udp.port();
        inner.config.fwmark = config.fwmark;
        inner.reconcile(config).map_err(|e| io::Error::other(e.to_string()))?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            eventfd: inbox.eventfd.clone(),
            stop: inbox.stop.clone(),
            stats: control.stats.clone(),
        });
        let worker_shared = shared.clone();
        let thread =
            std::thread::Builder::new().name("netstack".into()).spawn(move || stack::run(worker_shared, inbox))?;
        Ok(Netstack { shared, control, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// The wg(8) configuration handle, the same as the TUN driver's.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// The UDP port WireGuard listens on.
    pub fn listen_port(&self) -> u16 {
        self.shared.lock().phy.udp.port()
    }

    /// Replaces the node's tailnet addresses (at most one IPv4 and one IPv6).
    pub fn set_addresses(&self, addresses: &[(IpAddr, u8)]) {
        self.shared.with(|inner| inner.set_addresses(addresses));
    }

    /// The node's tailnet addresses.
    pub fn addresses(&self) -> Vec<(IpAddr, u8)> {
        self.shared.lock().options.addresses.clone()
    }

    /// Listens for TCP connections on `port` of every tailnet address.
    pub fn listen_tcp(&self, port: u16) -> io::Result<TcpListener> {
        TcpListener::bind(self, port)
    }

    /// Opens a TCP connection through the tunnel; refused (RST) connections
    /// fail with [`io::ErrorKind::ConnectionRefused`]. There is no timeout
    /// of its own: wrap it in `tokio::time::timeout`.
    pub async fn connect_tcp(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        TcpStream::connect(self, addr).await
    }

    /// Binds a UDP socket on `port` (0: an ephemeral port).
    pub fn bind_udp(&self, port: u16) -> io::Result<UdpSocket> {
        UdpSocket::bind(self, port)
    }

    /// Which peer `remote` belongs to by cryptokey routing (the peer whose
    /// allowed IPs hold it): for a connection, the peer whose key
    /// authenticated its packets, since the core drops any decrypted packet
    /// whose source is outside the sending peer's allowed IPs.
    pub fn peer_of(&self, remote: IpAddr) -> Option<PeerInfo> {
        let inner = self.shared.lock();
        let core = inner.phy.core.as_ref()?;
        let id = core.route(remote)?;
        Some(PeerInfo { public_key: core.peer_public_key(id)?, address: remote })
    }

    /// The data-plane counters (UDP sends and receives, IO errors).
    pub fn stats(&self) -> Arc<crate::driver::DataplaneStats> {
        self.shared.stats.clone()
    }

    /// Resets every connection (their reads and writes then fail with
    /// `ConnectionReset`), ends every listener and UDP socket (`NotConnected`),
    /// stops the worker and waits for it.
    pub fn shutdown(&self) {
        // Stopped first, so a task woken by the close sees it; the RSTs
        // leave from here, through the socket the worker no longer reads.
        if !self.shared.stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.shared.with(|inner| inner.close_all());
        }
        self.control.stop();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Whether [`Netstack::shutdown`] (or [`Control::stop`]) was called.
    pub fn is_stopped(&self) -> bool {
        self.shared.stop.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Netstack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netstack").field("addresses", &self.addresses()).finish()
    }
}
