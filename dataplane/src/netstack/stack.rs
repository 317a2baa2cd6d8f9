//! The state one netstack shares between its worker thread and the async
//! tasks using its sockets, and the worker's loop.
//!
//! Everything lives behind one mutex: the smoltcp interface and sockets,
//! the core device and the UDP socket. The worker thread holds it to read
//! datagrams, run timers and answer wg(8) requests; a task holds it to move
//! bytes in or out of its socket and then pushes what smoltcp can send at
//! once ([`Inner::pump`]), so a writer does not wait for the worker to wake.
//!
//! Path discovery and the relay run here as in the TUN worker: the path
//! agent lives in the [`Phy`] (probes and STUN on the same UDP socket, the
//! relay link for peers whose path is the relay), its timers count in the
//! worker's sleep, and the relay link's wake-ups arrive on the same eventfd
//! as the control requests.

use super::phy::{Phy, RecvOutcome, RELAY_DRAIN_BUDGET};
use super::Options;
use crate::disco::{DiscoSettings, PathAgent};
use crate::driver::{next_config, reconcile_device, sync_stats, ControlInbox, ControlMsg, DataplaneStats, Worker};
use crate::uapi::{DeviceConfig, Request, Response, UapiError};
use crate::udp::UdpSock;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;
use wiremesh_core::filter::Filter;

/// Datagram receives handled before smoltcp and the timers get a turn.
const RECV_BATCH: usize = 16;
/// Segments smoltcp may emit per pump before the lock is let go.
const EGRESS_BUDGET: usize = 1024;
/// Idle listening sockets kept per listener beyond those SYNs need.
const SPARE_LISTENERS: usize = 2;
/// The most connections one listener holds half-open or unaccepted.
pub(crate) const MAX_BACKLOG: usize = 4096;
/// How long a closed-but-unacknowledged connection lingers before it is dropped.
const LINGER: Duration = Duration::from_secs(30);
/// The longest the worker sleeps.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// Ephemeral ports for outbound connections (RFC 6335).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// One `listen_tcp` port: idle and half-open sockets, and those ready to accept.
pub(crate) struct Listener {
    pub(crate) backlog: Vec<SocketHandle>,
    pub(crate) ready: VecDeque<SocketHandle>,
    pub(crate) waker: Option<Waker>,
}

/// Everything behind the netstack's lock.
pub(crate) struct Inner {
    pub(crate) iface: Interface,
    pub(crate) sockets: SocketSet<'static>,
    pub(crate) phy: Phy,
    pub(crate) config: DeviceConfig,
    pub(crate) listeners: BTreeMap<u16, Listener>,
    /// Closed streams whose sockets finish their close in the background.
    /// (socket, since when, the outbound port to free with it).
    pub(crate) lingering: Vec<(SocketHandle, std::time::Instant, Option<u16>)>,
    /// Local ports of outbound connections.
    pub(crate) ports: BTreeSet<u16>,
    next_port: u16,
    pub(crate) options: Options,
    /// The inbound packet filter (`Control::set_filter`), kept for a device
    /// re-created for a new key.
    filter: Option<Filter>,
    /// Path discovery's settings while it is on (the agent is in the phy
    /// while the device also has a key).
    disco_settings: Option<DiscoSettings>,
    clock: std::time::Instant,
    /// When the worker will look at the timers next.
    pub(crate) next_wake: std::time::Instant,
}

/// The netstack as its handles share it.
pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    pub(crate) eventfd: Arc<OwnedFd>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) stats: Arc<DataplaneStats>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the worker (new requests, an earlier deadline, or stop).
    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Whether the netstack was shut down.
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Runs `f` on the locked state, pushes out what it made smoltcp want to
    /// send, and wakes the worker if a timer now falls before its wakeup.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut inner = self.lock();
        let r = f(&mut inner);
        inner.pump();
        let deadline = inner.deadline();
        let wake = deadline < inner.next_wake;
        if wake {
            inner.next_wake = deadline;
        }
        drop(inner);
        if wake {
            self.wake();
        }
        r
    }
}

impl Inner {
    pub(crate) fn new(udp: UdpSock, options: Options, stats: Arc<DataplaneStats>) -> Inner {
        let clock = std::time::Instant::now();
        let mut phy = Phy::new(udp, options.mtu, stats);
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = rand::random();
        let iface = Interface::new(cfg, &mut phy, smoltcp::time::Instant::from_micros(0));
        let mut inner = Inner {
            iface,
            sockets: SocketSet::new(Vec::new()),
            phy,
            config: DeviceConfig::default(),
            listeners: BTreeMap::new(),
            lingering: Vec::new(),
            ports: BTreeSet::new(),
            next_port: *EPHEMERAL.start() + (rand::random::<u16>() % 16384),
            options,
            filter: None,
            disco_settings: None,
            clock,
            next_wake: clock,
        };
        let addrs = inner.options.addresses.clone();
        inner.set_addresses(&addrs);
        inner
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.clock.elapsed().as_micros() as i64)
    }

    fn core_now(&self) -> wiremesh_core::Instant {
        wiremesh_core::Instant::from_duration(self.clock.elapsed())
    }

    /// Gives the interface these addresses (at most one IPv4 and one IPv6
    /// are used), and routes everything else through the tunnel too.
    pub(crate) fn set_addresses(&mut self, addrs: &[(IpAddr, u8)]) {
        let v4 = addrs.iter().find(|(a, _)| a.is_ipv4()).copied();
        let v6 = addrs.iter().find(|(a, _)| a.is_ipv6()).copied();
        self.iface.update_ip_addrs(|ips| {
            ips.clear();
            for (a, len) in v4.into_iter().chain(v6) {
                let _ = ips.push(IpCidr::new(IpAddress::from(a), len));
            }
        });
        // With an IP medium the gateway is never contacted: default routes
        // only tell smoltcp that every destination is reachable, and the
        // core's allowed IPs decide which peer (if any) gets the packet.
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        routes.remove_default_ipv6_route();
        if let Some((IpAddr::V4(a), _)) = v4 {
            let _ = routes.add_default_ipv4_route(a);
        }
        if let Some((IpAddr::V6(a), _)) = v6 {
            let _ = routes.add_default_ipv6_route(a);
        }
        self.options.addresses = addrs.to_vec();
    }

    /// A new TCP socket with the configured buffers and tuning.
    pub(crate) fn tcp_socket(&self) -> tcp::Socket<'static> {
        let rx = tcp::SocketBuffer::new(vec![0u8; self.options.tcp_rx_buffer]);
        let tx = tcp::SocketBuffer::new(vec![0u8; self.options.tcp_tx_buffer]);
        let mut s = tcp::Socket::new(rx, tx);
        s.set_nagle_enabled(false);
        s.set_ack_delay(self.options.tcp_ack_delay.map(duration));
        s
    }

    /// A free local port for an outbound connection.
    pub(crate) fn ephemeral_port(&mut self) -> Option<u16> {
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        for _ in 0..span {
            let p = self.next_port;
            self.next_port = if p == *EPHEMERAL.end() { *EPHEMERAL.start() } else { p + 1 };
            if !self.ports.contains(&p) && !self.listeners.contains_key(&p) {
                self.ports.insert(p);
                return Some(p);
            }
        }
        None
    }

    /// Lets smoltcp process what arrived and send what it can.
    pub(crate) fn pump(&mut self) {
        let now = self.smol_now();
        self.phy.now = self.core_now();
        self.prepare_listeners();
        self.iface.poll(now, &mut self.phy, &mut self.sockets);
        // One `poll` sends at most one segment per socket: go on while any
        // socket has more (a full window of a bulk transfer).
        for _ in 0..EGRESS_BUDGET {
            if self.iface.poll_egress(now, &mut self.phy, &mut self.sockets) == smoltcp::iface::PollResult::None {
                break;
            }
        }
        self.phy.flush();
        self.tend_listeners();
    }

    /// The earliest time the worker must act.
    pub(crate) fn deadline(&mut self) -> std::time::Instant {
        let now = self.smol_now();
        let smol = self.iface.poll_delay(now, &self.sockets).map(|d| Duration::from_micros(d.total_micros()));
        let core_now = self.core_now();
        let core = self.phy.core.as_ref().and_then(|c| c.poll_timeout()).map(|t| t.saturating_duration_since(core_now));
        let disco =
            self.phy.disco.as_ref().and_then(PathAgent::poll_timeout).map(|t| t.saturating_duration_since(core_now));
        let wait = [smol, core, disco].into_iter().flatten().min().unwrap_or(MAX_SLEEP).min(MAX_SLEEP);
        std::time::Instant::now() + wait
    }

    /// Makes sure each listener has an idle socket for every SYN about to be
    /// processed (smoltcp answers a SYN no socket listens for with a RST).
    fn prepare_listeners(&mut self) {
        if self.listeners.is_empty() {
            return;
        }
        let mut syns: BTreeMap<u16, usize> = BTreeMap::new();
        for p in self.phy.rx_queue() {
            if let Some(port) = syn_port(p) {
                *syns.entry(port).or_default() += 1;
            }
        }
        for (port, n) in syns {
            self.ensure_idle(port, n + SPARE_LISTENERS);
        }
    }

    fn ensure_idle(&mut self, port: u16, want: usize) {
        let Some(l) = self.listeners.get(&port) else { return };
        let idle =
            l.backlog.iter().filter(|h| self.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Listen).count();
        let room = MAX_BACKLOG.saturating_sub(l.backlog.len() + l.ready.len());
        for _ in 0..want.saturating_sub(idle).min(room) {
            let mut s = self.tcp_socket();
            if s.listen(IpListenEndpoint { addr: None, port }).is_err() {
                return;
            }
            let h = self.sockets.add(s);
            if let Some(l) = self.listeners.get_mut(&port) {
                l.backlog.push(h);
            }
        }
    }

    /// Moves established connections to their listener's accept queue and
    /// re-arms sockets whose half-open connection died.
    fn tend_listeners(&mut self) {
        let ports: Vec<u16> = self.listeners.keys().copied().collect();
        for port in ports {
            let Some(l) = self.listeners.get_mut(&port) else { continue };
            let mut woke = false;
            let mut i = 0;
            while i < l.backlog.len() {
                let h = l.backlog[i];
                let s = self.sockets.get_mut::<tcp::Socket>(h);
                match s.state() {
                    tcp::State::Listen | tcp::State::SynReceived => i += 1,
                    tcp::State::Closed => {
                        let _ = s.listen(IpListenEndpoint { addr: None, port });
                        i += 1;
                    }
                    _ => {
                        l.backlog.swap_remove(i);
                        l.ready.push_back(h);
                        woke = true;
                    }
                }
            }
            if woke {
                if let Some(w) = l.waker.take() {
                    w.wake();
                }
            }
            self.ensure_idle(port, SPARE_LISTENERS);
        }
    }

    /// Drops sockets of closed streams once their close completed (or lingered too long).
    fn reap(&mut self) {
        let now = std::time::Instant::now();
        let mut i = 0;
        while i < self.lingering.len() {
            let (h, since, port) = self.lingering[i];
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            let done = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if done || now.duration_since(since) > LINGER {
                if let Some(port) = port {
                    self.ports.remove(&port);
                }
                self.sockets.remove(h);
                self.lingering.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Resets every connection, closes every UDP socket and listener, and
    /// wakes the tasks waiting on them (the netstack is shutting down).
    pub(crate) fn close_all(&mut self) {
        for (_, s) in self.sockets.iter_mut() {
            match s {
                smoltcp::socket::Socket::Tcp(t) => t.abort(),
                smoltcp::socket::Socket::Udp(u) => u.close(),
            }
        }
        for (_, l) in std::mem::take(&mut self.listeners) {
            if let Some(w) = l.waker {
                w.wake();
            }
        }
    }

    /// Releases a stream's socket: closed gracefully, removed once done.
    /// `port` is the local port to free with it (outbound connections).
    pub(crate) fn release(&mut self, h: SocketHandle, port: Option<u16>) {
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        if s.state() == tcp::State::Closed {
            self.sockets.remove(h);
            if let Some(port) = port {
                self.ports.remove(&port);
            }
            return;
        }
        s.close();
        self.lingering.push((h, std::time::Instant::now(), port));
    }

    fn uapi(&mut self, request: Request) -> Response {
        match request {
            Request::Get => {
                sync_stats(self.phy.core.as_ref(), &mut self.config);
                Response::get(&self.config)
            }
            Request::Set(ops) => {
                sync_stats(self.phy.core.as_ref(), &mut self.config);
                match next_config(&self.config, &ops) {
                    Ok(next) => Response::set(self.reconcile(next)),
                    Err(e) => Response::error(&e),
                }
            }
        }
    }

    /// Makes the UDP socket and the core device match `next`; on failure nothing changes.
    pub(crate) fn reconcile(&mut self, mut next: DeviceConfig) -> Result<(), UapiError> {
        let now = self.core_now();
        if next.listen_port != self.config.listen_port && !(next.listen_port == 0 && self.config.listen_port != 0) {
            let udp = UdpSock::bind(next.listen_port, next.fwmark).map_err(UapiError::PortInUse)?;
            let old = std::mem::replace(&mut self.phy.udp, udp);
            self.phy.retired.push(old);
            if self.phy.retired.len() > 4 {
                self.phy.retired.remove(0);
            }
        }
        next.listen_port = self.phy.udp.port();
        if next.fwmark != self.config.fwmark {
            self.phy.udp.set_fwmark(next.fwmark).map_err(UapiError::PortInUse)?;
        }
        reconcile_device(&mut self.phy.core, &mut self.config, &next, self.phy.mtu, now);
        if let Some(core) = self.phy.core.as_mut().filter(|c| c.filter() != self.filter.as_ref()) {
            // A device made for a new key starts without one.
            core.set_filter(self.filter.clone());
        }
        self.config = next;
        if self.disco_settings.is_some() {
            self.refresh_disco();
        }
        self.phy.now = now;
        self.phy.flush();
        Ok(())
    }

    /// Makes, updates or drops the path agent after a change of settings or
    /// of the device key, and puts its chosen paths on the device.
    fn refresh_disco(&mut self) {
        let now = self.core_now();
        crate::disco::refresh_agent(
            &mut self.phy.disco,
            &mut self.phy.parked_relay,
            self.disco_settings.as_ref(),
            self.config.private_key.clone(),
            Worker::wall(),
            self.phy.core.as_mut(),
            now,
        );
    }

    /// One turn of the worker: requests, datagrams, timers. Returns how long
    /// it may sleep.
    fn turn(&mut self, inbox: &ControlInbox) -> Duration {
        while let Ok(msg) = inbox.rx.try_recv() {
            match msg {
                ControlMsg::Uapi(request, reply) => {
                    let response = self.uapi(request);
                    let _ = reply.send(response);
                }
                ControlMsg::Filter(filter) => {
                    if let Some(core) = self.phy.core.as_mut() {
                        core.set_filter(filter.clone());
                    }
                    self.filter = filter;
                }
                ControlMsg::Disco(settings) => {
                    self.disco_settings = settings;
                    self.refresh_disco();
                    self.pump();
                }
                ControlMsg::DiscoStatus(reply) => {
                    let _ = reply.send(self.phy.disco.as_ref().map(PathAgent::status));
                }
                ControlMsg::Drops(reply) => {
                    let _ = reply.send(self.phy.core.as_ref().map(crate::driver::DropReport::of));
                }
                ControlMsg::StunNow => {
                    if let Some(agent) = self.phy.disco.as_mut() {
                        agent.stun_now();
                    }
                }
                ControlMsg::Relay(link) => {
                    let now = self.core_now();
                    crate::disco::set_relay_link(&mut self.phy.disco, &mut self.phy.parked_relay, link, now);
                    self.pump();
                }
            }
        }
        let mut busy = false;
        for _ in 0..RECV_BATCH {
            self.phy.now = self.core_now();
            match self.phy.recv() {
                RecvOutcome::Empty => break,
                RecvOutcome::Some => {
                    busy = true;
                    self.pump();
                }
            }
        }
        // What the relay delivered (its wake-ups come on the eventfd).
        self.phy.now = self.core_now();
        let relayed = self.phy.drain_relay();
        if relayed > 0 {
            self.pump();
        }
        let now = self.core_now();
        if let Some(core) = self.phy.core.as_mut() {
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
            }
        }
        if let Some(agent) = self.phy.disco.as_mut() {
            // Its probes and STUN requests leave in the pump below.
            agent.handle_timeout(now);
        }
        self.pump();
        self.reap();
        if busy && !self.phy.rx_queue().is_empty() {
            return Duration::ZERO;
        }
        let deadline = self.deadline();
        self.next_wake = deadline;
        if busy || relayed == RELAY_DRAIN_BUDGET {
            // More datagrams may be waiting: look again without sleeping.
            return Duration::ZERO;
        }
        deadline.saturating_duration_since(std::time::Instant::now())
    }
}

fn duration(d: Duration) -> smoltcp::time::Duration {
    smoltcp::time::Duration::from_micros(d.as_micros() as u64)
}

/// The destination port of a TCP SYN (without ACK) in an IP packet.
fn syn_port(p: &[u8]) -> Option<u16> {
    let tcp = match p.first()? >> 4 {
        4 => {
            if *p.get(9)? != 6 {
                return None;
            }
            // Only first fragments carry the TCP header.
            if u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x1fff != 0 {
                return None;
            }
            p.get(usize::from(p[0] & 0x0f) * 4..)?
        }
        6 => {
            if *p.get(6)? != 6 {
                return None;
            }
            p.get(40..)?
        }
        _ => return None,
    };
    let flags = *tcp.get(13)?;
    if flags & 0x02 != 0 && flags & 0x10 == 0 {
        Some(u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]))
    } else {
        None
    }
}

/// The worker thread's loop: runs until the stop flag is set.
pub(crate) fn run(shared: Arc<Shared>, inbox: ControlInbox) {
    let efd = shared.eventfd.as_raw_fd();
    while !inbox.stop.load(Ordering::Relaxed) {
        let (wait, fd) = {
            let mut inner = shared.lock();
            let wait = inner.turn(&inbox);
            (wait, inner.phy.udp.fd())
        };
        if wait.is_zero() {
            continue;
        }
        let mut fds = [
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: efd, events: libc::POLLIN, revents: 0 },
        ];
        let ts =
            libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos() as libc::c_long };
        // SAFETY: two valid pollfds and a timespec, all alive for the call.
        unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if fds[1].revents & libc::POLLIN != 0 {
            let mut v: u64 = 0;
            // SAFETY: reading 8 bytes into a live u64 from our eventfd.
            unsafe { libc::read(efd, (&mut v as *mut u64).cast(), 8) };
        }
    }
    if std::env::var_os("WIREMESH_STATS").is_some() {
        eprintln!("wiremesh netstack counters: {}", shared.stats.summary());
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Netstack, Options};
    use crate::disco::DiscoSettings;
    use crate::uapi::{parse_set, DeviceConfig, Request};
    use std::net::{SocketAddr, UdpSocket};
    use std::time::{Duration, Instant};
    use wiremesh_core::device::DropReason;
    use wiremesh_core::disco::{Path, HEADER_LEN, MAGIC, RELAY_ENDPOINT};
    use wiremesh_core::keys::{PrivateKey, PublicKey};
    use wiremesh_core::stun;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn start(key: &PrivateKey, peer: &PublicKey) -> Netstack {
        let mut config = DeviceConfig::default();
        let body =
            format!("private_key={}\npublic_key={}\nallowed_ip=10.0.0.2/32\n", hex(&key.to_bytes()), hex(&peer.0));
        config.apply(&parse_set(&body).unwrap()).unwrap();
        Netstack::start(config, Options::default()).unwrap()
    }

    fn settings(peer: &PublicKey) -> DiscoSettings {
        DiscoSettings { stun_server: None, local_endpoints: vec![], peers: vec![(*peer, vec![])] }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// With discovery on, a probe and a STUN message on the WireGuard
    /// socket reach the agent (which counts them) and never the device;
    /// with it off, the same datagrams go to the device (which drops them
    /// as malformed).
    #[test]
    fn probes_and_stun_go_to_the_agent_not_the_device_while_discovery_is_on() {
        let key = PrivateKey::from_bytes([0x51; 32]);
        let peer = PrivateKey::from_bytes([0x52; 32]).public_key();
        let node = start(&key, &peer);
        let control = node.control();
        // Off by default.
        assert_eq!(control.disco_status(), None);
        let drops = || node.shared.lock().phy.core.as_ref().map(|c| c.drops()).unwrap();

        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to: SocketAddr = format!("127.0.0.1:{}", node.listen_port()).parse().unwrap();
        // A probe from an unknown sender (all-zero key, tag and body).
        let mut probe = vec![0u8; HEADER_LEN + 1 + wiremesh_core::crypto::TAG_LEN + 16];
        probe[..MAGIC.len()].copy_from_slice(&MAGIC);
        assert_eq!(crate::disco::classify(&probe), crate::disco::Kind::Probe);
        // An unsolicited STUN answer.
        let mut answer = [0u8; 64];
        let n = stun::encode_binding_response(&[9; 12], sock.local_addr().unwrap(), &mut answer).unwrap();
        let answer = &answer[..n];

        assert!(control.set_disco(Some(settings(&peer))));
        assert!(control.disco_status().is_some());
        let before = drops();
        sock.send_to(&probe, to).unwrap();
        sock.send_to(answer, to).unwrap();
        wait_for("the agent to count both", || {
            let s = control.disco_status().unwrap();
            let refused = s.stats.malformed + s.stats.unknown_peer + s.stats.forged;
            refused == 1 && s.stun_refused == 1
        });
        let s = control.disco_status().unwrap();
        assert_eq!((s.stats.received, s.stun_answers), (0, 0));
        assert_eq!(drops(), before, "the device saw neither");

        // Off: no agent, and the device judges every datagram again.
        assert!(control.set_disco(None));
        assert_eq!(control.disco_status(), None);
        sock.send_to(&probe, to).unwrap();
        sock.send_to(answer, to).unwrap();
        wait_for("the device to drop both", || drops().total() == before.total() + 2);
        assert_eq!(drops().get(DropReason::Malformed), before.get(DropReason::Malformed) + 2);
        node.shutdown();
    }

    /// The relay link waits (parked) while discovery is off, goes to the
    /// agent when it is turned on, follows it to a new agent when the key
    /// changes, and is parked again when discovery is turned off.
    #[test]
    fn the_relay_link_is_parked_and_moves_with_the_agent() {
        let key = PrivateKey::from_bytes([0x61; 32]);
        let peer = PrivateKey::from_bytes([0x62; 32]).public_key();
        let node = start(&key, &peer);
        let control = node.control();
        let endpoint = || {
            let inner = node.shared.lock();
            let core = inner.phy.core.as_ref().unwrap();
            core.peer_endpoint(core.peer_by_key(&peer).unwrap())
        };
        let port = control.relay_link(8).unwrap();
        assert_eq!(control.disco_status(), None);
        assert!(!port.is_closed());
        assert!(control.set_disco(Some(settings(&peer))));
        let s = control.disco_status().unwrap();
        assert!(s.relay.is_some(), "the agent took the parked link");
        // With a link, the relay is a path at once, and the device sends there.
        assert_eq!(s.paths, vec![(peer, Some(Path::Relay), None)]);
        assert_eq!(endpoint(), Some(RELAY_ENDPOINT));

        // A new device key: a new agent, with the same link.
        let new_key = PrivateKey::from_bytes([0x63; 32]);
        let resp =
            control.uapi(Request::Set(parse_set(&format!("private_key={}\n", hex(&new_key.to_bytes()))).unwrap()));
        assert!(String::from_utf8_lossy(resp.as_bytes()).starts_with("errno=0"));
        let s = control.disco_status().unwrap();
        assert!(s.relay.is_some(), "the link moved to the new agent");
        assert_eq!(s.paths, vec![(peer, Some(Path::Relay), None)]);
        assert_eq!(endpoint(), Some(RELAY_ENDPOINT), "the new device got the agent's path");
        assert!(!port.is_closed());

        // Off: the peer is handed back to WireGuard, without the relay marker.
        assert!(control.set_disco(None));
        assert_eq!(control.disco_status(), None);
        assert_eq!(endpoint(), None);
        assert!(!port.is_closed(), "parked, not dropped");
        assert!(control.set_disco(Some(settings(&peer))));
        assert!(control.disco_status().unwrap().relay.is_some());
        assert!(control.clear_relay());
        assert_eq!(control.disco_status().unwrap().relay, None);
        wait_for("the worker to drop the link", || port.is_closed());
        node.shutdown();
    }
}
