//! The data-plane worker: one thread that owns a `wiremesh-core` device, the
//! TUN device and the UDP socket, and drives all IO through one io_uring.
//!
//! Outbound, each TUN read may be a TCP super-packet (TSO through
//! `IFF_VNET_HDR`); it is split into segments laid out back to back in one
//! buffer, each sealed in place by the core, and the whole run goes out in
//! one `sendmsg` with `UDP_SEGMENT` (GSO). Inbound, one `recvmsg` may carry
//! many coalesced datagrams (`UDP_GRO`); each is opened in place and written
//! to the TUN device from the same buffer. Nothing is copied on the data
//! path except by the segmentation itself.
//!
//! Buffers are owned by slots that never move; a slot's memory is handed to
//! the kernel with its operation and taken back only at the operation's
//! completion (counted per slot), which is the invariant every `unsafe`
//! push below relies on.
//!
//! Configuration arrives from the UAPI thread as messages, with an eventfd
//! read in the ring to wake the worker; the worker applies each `set` to a
//! copy of the configuration and to the device, so a failed `set` changes
//! nothing.

use crate::disco::{apply_path, classify, DiscoSettings, DiscoStatus, Kind, PathAgent, Relayed};
use crate::gro::{coalesce, Group, Packet};
use crate::relay::{RelayLink, RelayPort, RELAY_ENDPOINT};
use crate::tun::split;
use crate::tun::{Tun, VirtioNetHdr};
use crate::uapi::{DeviceConfig, Request, Response, SetOp, UapiError};
use crate::udp::{decode_addr, read_gro_cmsg, write_gso_cmsg, UdpSock, CMSG_SPACE};
use io_uring::{opcode, types, IoUring};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wiremesh_core::crypto::DefaultProvider;
use wiremesh_core::device::{DeviceConfig as CoreConfig, Encapsulated, PeerConfig as CorePeer, Received, HEADROOM};
use wiremesh_core::filter::Filter;
use wiremesh_core::{Instant, WallTime};

/// The protocol core as both data planes (TUN and the userspace netstack) drive it.
pub(crate) type Device = wiremesh_core::device::Device<StdRng, DefaultProvider>;

/// TUN reads in flight.
const TUN_SLOTS: usize = 8;
/// Bytes of one TUN read: a virtio header and a 64 KiB super-packet.
const TUN_BUF: usize = VirtioNetHdr::LEN + 65535;
/// Bytes for the sealed segments of one super-packet.
const TX_BUF: usize = 256 * 1024;
/// Most `sendmsg` calls one super-packet may need.
const MSGS_PER_SLOT: usize = 8;
/// Most segments one super-packet may split into.
const MAX_SEGMENTS: usize = 1024;
/// UDP receives in flight.
const RECV_SLOTS: usize = 32;
/// Bytes of one UDP receive (GRO coalesces up to 64 KiB).
const RECV_BUF: usize = 65536;
/// Packets one receive may decrypt (UDP GRO merges at most 64 datagrams).
const MAX_RECV_PACKETS: usize = 128;
/// Sends of handshakes, keepalives and staged packets in flight.
const CTRL_SLOTS: usize = 32;
/// Datagrams from the relay handled per turn of the loop.
const RELAY_DRAIN_BUDGET: usize = 256;
const CTRL_BUF: usize = 65536 + 64;
/// The largest UDP payload one GSO send may carry in total.
const GSO_MAX_BYTES: usize = 65000;
/// How often the TUN MTU is re-read.
const MTU_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Completions handled per wakeup before timers and control get a turn.
const CQE_BATCH: usize = 256;

const KIND_TUN_READ: u64 = 1;
const KIND_UDP_SEND: u64 = 2;
const KIND_UDP_RECV: u64 = 3;
const KIND_TUN_WRITE: u64 = 4;
const KIND_CTRL_SEND: u64 = 5;
const KIND_EVENTFD: u64 = 6;
const KIND_CANCEL: u64 = 7;
/// How long a stopping worker waits for its cancelled operations.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
const KIND_TUN_POLL: u64 = 8;

/// How the worker reads and writes the TUN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunIo {
    /// Reads and writes are io_uring operations (the default).
    Uring,
    /// An io_uring poll says when the device is readable; reads, writes and
    /// `writev`s are plain system calls. Kept to measure against `Uring`
    /// (see docs/performance.md); select with `WIREMESH_TUN_IO=sync`.
    Sync,
}

fn user_data(kind: u64, slot: usize, sub: usize) -> u64 {
    (kind << 56) | ((slot as u64) << 16) | sub as u64
}

fn decode_user_data(u: u64) -> (u64, usize, usize) {
    (u >> 56, ((u >> 16) & 0xff_ffff_ffff) as usize, (u & 0xffff) as usize)
}

/// A `msghdr` with everything it points to, kept at a fixed address.
struct MsgState {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_in6,
    cmsg: Aligned,
}

// SAFETY: the raw pointers in a MsgState point only into buffers owned by
// the same Worker (boxed, so their addresses survive moving the Worker to its
// thread); the Worker is used by one thread at a time.
unsafe impl Send for MsgState {}

#[repr(C, align(8))]
struct Aligned([u8; CMSG_SPACE]);

impl MsgState {
    fn new() -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        unsafe { std::mem::zeroed() }
    }

    /// Points the header at `buf[..len]` for sending to `to` with an optional
    /// GSO segment size.
    fn prepare_send(&mut self, udp: &UdpSock, buf: *mut u8, len: usize, to: SocketAddr, segment: Option<u16>) {
        self.iov = libc::iovec { iov_base: buf.cast(), iov_len: len };
        let addr_len = udp.encode(to, &mut self.addr);
        self.hdr = MsgState::new().hdr;
        self.hdr.msg_name = (&mut self.addr as *mut libc::sockaddr_in6).cast();
        self.hdr.msg_namelen = addr_len;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        if let Some(seg) = segment {
            self.hdr.msg_controllen = write_gso_cmsg(&mut self.cmsg.0, seg);
            self.hdr.msg_control = self.cmsg.0.as_mut_ptr().cast();
        }
    }

    fn prepare_recv(&mut self, buf: *mut u8, len: usize) {
        self.iov = libc::iovec { iov_base: buf.cast(), iov_len: len };
        self.hdr = MsgState::new().hdr;
        self.hdr.msg_name = (&mut self.addr as *mut libc::sockaddr_in6).cast();
        self.hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = self.cmsg.0.as_mut_ptr().cast();
        self.hdr.msg_controllen = CMSG_SPACE;
    }
}

/// One write of decrypted packets to the TUN device, pointing into a
/// receive slot's buffer: a single packet, or a coalesced run as vectors.
#[derive(Clone, Copy)]
enum TunWrite {
    One(*const u8, usize),
    Vectored(*const libc::iovec, usize),
}

struct TunSlot {
    read: Box<[u8]>,
    tx: Box<[u8]>,
    msgs: Box<[MsgState]>,
    sizes: Box<[usize]>,
    /// Sends in flight from `tx`; the read is re-armed when it drops to zero.
    pending: usize,
    /// GSO groups of the last super-packet, for resending without GSO: (offset, len, stride, destination).
    groups: Vec<(usize, usize, usize, SocketAddr)>,
}

struct RecvSlot {
    buf: Box<[u8]>,
    msg: MsgState,
    /// Decrypted packets of the last receive, and how they coalesce.
    packets: Vec<Packet>,
    groups: Vec<Group>,
    /// Vectors of the coalesced writes; the kernel reads them until completion.
    iovs: Box<[libc::iovec]>,
    /// TUN writes in flight from `buf`.
    pending: usize,
    armed: bool,
}

// SAFETY: the iovecs point only into the slot's own boxed buffer, which
// moves with it; one thread uses the Worker at a time.
unsafe impl Send for RecvSlot {}

struct CtrlSlot {
    buf: Box<[u8]>,
    msg: MsgState,
    busy: bool,
}

/// Counters of the data plane itself (the core counts protocol events).
#[derive(Debug, Default)]
pub struct DataplaneStats {
    /// TUN reads completed.
    pub tun_reads: AtomicU64,
    /// Segments produced from TUN reads.
    pub segments: AtomicU64,
    /// `sendmsg` calls on the UDP socket.
    pub udp_sends: AtomicU64,
    /// Datagrams received.
    pub udp_datagrams: AtomicU64,
    /// `recvmsg` completions.
    pub udp_recvs: AtomicU64,
    /// Packets written to TUN.
    pub tun_writes: AtomicU64,
    /// Errors of any IO operation.
    pub io_errors: AtomicU64,
    /// Super-packets that could not be segmented.
    pub bad_tun_packets: AtomicU64,
    /// Decrypted packets dropped because the userspace netstack's queue
    /// towards smoltcp was full.
    pub rx_queue_full: AtomicU64,
}

impl DataplaneStats {
    /// One line with every counter and the batching they imply.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let per = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        format!(
            "tun_reads={} segments={} ({:.1}/read) udp_sends={} ({:.1} segments/send) udp_recvs={} udp_datagrams={} ({:.1}/recv) tun_writes={} ({:.1} datagrams/write) io_errors={} bad_tun_packets={} rx_queue_full={}",
            g(&self.tun_reads),
            g(&self.segments),
            per(g(&self.segments), g(&self.tun_reads)),
            g(&self.udp_sends),
            per(g(&self.segments), g(&self.udp_sends)),
            g(&self.udp_recvs),
            g(&self.udp_datagrams),
            per(g(&self.udp_datagrams), g(&self.udp_recvs)),
            g(&self.tun_writes),
            per(g(&self.udp_datagrams), g(&self.tun_writes)),
            g(&self.io_errors),
            g(&self.bad_tun_packets),
            g(&self.rx_queue_full),
        )
    }
}

pub(crate) enum ControlMsg {
    Uapi(Request, mpsc::SyncSender<Response>),
    /// The inbound packet filter (`None`: let every packet in).
    Filter(Option<Filter>),
    /// Path discovery on with these settings, or off (`None`).
    Disco(Option<DiscoSettings>),
    /// What path discovery knows (`None`: it is off or unsupported).
    DiscoStatus(mpsc::SyncSender<Option<DiscoStatus>>),
    /// The link to a relay client task, or none.
    Relay(Option<RelayLink>),
    /// The device's drop counters (`None`: no device yet).
    Drops(mpsc::SyncSender<Option<DropReport>>),
    /// Ask STUN for the reflexive address now.
    StunNow,
}

/// Packets the device dropped, by reason (only reasons with drops), in all
/// and per peer: what `wiremesh status` shows, the packet filter's
/// `filtered` drops among them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropReport {
    /// Every drop, by reason.
    pub total: Vec<(&'static str, u64)>,
    /// Each peer's drops, by reason (peers without drops left out).
    pub peers: Vec<(wiremesh_core::keys::PublicKey, Vec<(&'static str, u64)>)>,
}

impl DropReport {
    /// The counters of `device` now.
    pub(crate) fn of(device: &Device) -> DropReport {
        use wiremesh_core::device::{DropCounts, DropReason};
        let named = |c: DropCounts| -> Vec<(&'static str, u64)> {
            DropReason::ALL.iter().map(|r| (r.name(), c.get(*r))).filter(|(_, n)| *n > 0).collect()
        };
        let peers = device
            .peer_ids()
            .filter_map(|id| Some((device.peer_public_key(id)?, named(device.peer_stats(id)?.drops))))
            .filter(|(_, d)| !d.is_empty())
            .collect();
        DropReport { total: named(device.drops()), peers }
    }
}

/// The handle other threads use to configure and stop a running worker.
#[derive(Clone)]
pub struct Control {
    tx: mpsc::Sender<ControlMsg>,
    eventfd: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    /// The worker's counters.
    pub stats: Arc<DataplaneStats>,
}

/// The worker's end of a [`Control`]: requests, the eventfd that signals
/// them, and the stop flag.
pub(crate) struct ControlInbox {
    pub(crate) rx: mpsc::Receiver<ControlMsg>,
    pub(crate) eventfd: Arc<OwnedFd>,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Control {
    /// A handle and the inbox a worker (TUN or userspace) serves it from.
    pub(crate) fn pair() -> io::Result<(Control, ControlInbox)> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor we own.
        let eventfd = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(DataplaneStats::default());
        let inbox = ControlInbox { rx, eventfd: eventfd.clone(), stop: stop.clone() };
        Ok((Control { tx, eventfd, stop, stats }, inbox))
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Answers one UAPI request through the worker (blocking until it has).
    pub fn uapi(&self, request: Request) -> Response {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.tx.send(ControlMsg::Uapi(request, tx)).is_err() {
            return Response::errno(crate::uapi::errno::IO);
        }
        self.wake();
        rx.recv().unwrap_or_else(|_| Response::errno(crate::uapi::errno::IO))
    }

    /// Sets the inbound packet filter of the worker's device (kept when the
    /// device is re-created for a new key); `None` lets every packet in.
    /// Returns `false` if the worker is gone.
    pub fn set_filter(&self, filter: Option<Filter>) -> bool {
        let sent = self.tx.send(ControlMsg::Filter(filter)).is_ok();
        self.wake();
        sent
    }

    /// Turns path discovery on with `settings` (or updates them), or off
    /// with `None`: STUN and disco probes on the WireGuard socket, and the
    /// chosen direct path applied to each peer (see [`crate::disco`]).
    /// Off by default. Returns `false` if the worker is gone.
    pub fn set_disco(&self, settings: Option<DiscoSettings>) -> bool {
        let sent = self.tx.send(ControlMsg::Disco(settings)).is_ok();
        self.wake();
        sent
    }

    /// Makes a link to a relay client and gives the worker its end: from
    /// then on every peer is reachable through the relay (while discovery
    /// is on), traffic for a peer whose path is the relay goes into the
    /// link, and what the task delivers wakes the worker. Returns the
    /// task's end (`None` if the worker is gone). A new link replaces the
    /// old one; see [`crate::relay`].
    pub fn relay_link(&self, capacity: usize) -> Option<RelayPort> {
        let efd = self.eventfd.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to an eventfd.
            unsafe { libc::write(efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        });
        let (link, port) = crate::relay::link(capacity, wake);
        self.tx.send(ControlMsg::Relay(Some(link))).ok()?;
        self.wake();
        Some(port)
    }

    /// Removes the relay link: peers on the relay path lose it (their
    /// probes go on, and a direct path is still taken when one answers).
    /// Returns `false` if the worker is gone.
    pub fn clear_relay(&self) -> bool {
        let sent = self.tx.send(ControlMsg::Relay(None)).is_ok();
        self.wake();
        sent
    }

    /// What path discovery knows: the reflexive address, each peer's path,
    /// the counters. `None` if it is off, unsupported or the worker is gone.
    pub fn disco_status(&self) -> Option<DiscoStatus> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx.send(ControlMsg::DiscoStatus(tx)).ok()?;
        self.wake();
        rx.recv().ok().flatten()
    }

    /// Packets the device dropped, by reason. `None` before the device has
    /// a key, or if the worker is gone.
    pub fn drops(&self) -> Option<DropReport> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx.send(ControlMsg::Drops(tx)).ok()?;
        self.wake();
        rx.recv().ok().flatten()
    }

    /// Has path discovery ask STUN for the reflexive address now, not at its
    /// next refresh: the owner saw a sign that the NAT changed (a relay
    /// connection reset by it). Returns `false` if the worker is gone.
    pub fn stun_now(&self) -> bool {
        let sent = self.tx.send(ControlMsg::StunNow).is_ok();
        self.wake();
        sent
    }

    /// Asks the worker to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// The worker: run it on its own thread with [`Worker::run`].
pub struct Worker {
    ring: IoUring,
    tun: Tun,
    vnet: bool,
    udp: UdpSock,
    /// Sockets replaced by a new listen port, kept until their operations end.
    retired: Vec<UdpSock>,
    device: Option<Device>,
    config: DeviceConfig,
    mtu: usize,
    clock: std::time::Instant,
    tun_slots: Box<[TunSlot]>,
    recv_slots: Box<[RecvSlot]>,
    ctrl_slots: Box<[CtrlSlot]>,
    eventfd: Arc<OwnedFd>,
    eventfd_buf: Box<u64>,
    rx: mpsc::Receiver<ControlMsg>,
    stop: Arc<AtomicBool>,
    stats: Arc<DataplaneStats>,
    /// Ring entries not yet submitted.
    queued: usize,
    /// Operations submitted (or queued) whose completion is not reaped yet,
    /// cancellations not counted. At exit they are cancelled and reaped, so
    /// no request still holds the TUN file or points into our buffers when
    /// the ring goes away (the kernel would otherwise release the TUN
    /// device only later, from the ring's asynchronous teardown).
    in_flight: usize,
    tun_io: TunIo,
    /// With `TunIo::Sync`: slots free to read into, and whether a poll is armed.
    free_tun: Vec<usize>,
    tun_poll_armed: bool,
    reading_tun: bool,
    /// When the TUN device's MTU was last read (it may be changed at any time
    /// with `ip link set mtu`, and padding must never exceed it).
    mtu_checked: std::time::Instant,
    /// Why the worker stopped by itself (the interface was deleted).
    exit_reason: Option<String>,
    /// The inbound packet filter, applied to every device this worker makes.
    filter: Option<Filter>,
    /// Path discovery's settings while it is on, and its agent while the
    /// device has a key.
    disco_settings: Option<DiscoSettings>,
    disco: Option<PathAgent>,
    /// The relay link while path discovery is off (the agent holds it
    /// while on).
    parked_relay: Option<RelayLink>,
}

impl Worker {
    /// A worker for `tun`, binding the UDP socket for `config`.
    pub fn new(tun: Tun, config: DeviceConfig) -> io::Result<(Worker, Control)> {
        let ring = IoUring::new(1024)?;
        let udp = UdpSock::bind(config.listen_port, config.fwmark)?;
        let (control, ControlInbox { rx, eventfd, stop }) = Control::pair()?;
        let stats = control.stats.clone();
        let mtu = tun.mtu().map(|m| m as usize).unwrap_or(1420);
        let vnet = tun.vnet_hdr();
        let tun_slots = (0..TUN_SLOTS)
            .map(|_| TunSlot {
                read: vec![0u8; TUN_BUF].into_boxed_slice(),
                tx: vec![0u8; TX_BUF].into_boxed_slice(),
                msgs: (0..MSGS_PER_SLOT).map(|_| MsgState::new()).collect(),
                sizes: vec![0usize; MAX_SEGMENTS].into_boxed_slice(),
                pending: 0,
                groups: Vec::with_capacity(MSGS_PER_SLOT),
            })
            .collect();
        let recv_slots = (0..RECV_SLOTS)
            .map(|_| RecvSlot {
                buf: vec![0u8; RECV_BUF].into_boxed_slice(),
                msg: MsgState::new(),
                packets: Vec::with_capacity(MAX_RECV_PACKETS),
                groups: Vec::with_capacity(MAX_RECV_PACKETS),
                iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_RECV_PACKETS]
                    .into_boxed_slice(),
                pending: 0,
                armed: false,
            })
            .collect();
        let ctrl_slots = (0..CTRL_SLOTS)
            .map(|_| CtrlSlot { buf: vec![0u8; CTRL_BUF].into_boxed_slice(), msg: MsgState::new(), busy: false })
            .collect();
        let mut config = config;
        config.listen_port = udp.port();
        let mut w = Worker {
            ring,
            tun,
            vnet,
            udp,
            retired: Vec::new(),
            device: None,
            config: DeviceConfig::default(),
            mtu,
            clock: std::time::Instant::now(),
            tun_slots,
            recv_slots,
            ctrl_slots,
            eventfd: eventfd.clone(),
            eventfd_buf: Box::new(0),
            rx,
            stop: stop.clone(),
            stats: stats.clone(),
            queued: 0,
            in_flight: 0,
            tun_io: match std::env::var("WIREMESH_TUN_IO").as_deref() {
                Ok("sync") => TunIo::Sync,
                _ => TunIo::Uring,
            },
            free_tun: Vec::with_capacity(TUN_SLOTS),
            tun_poll_armed: false,
            reading_tun: false,
            mtu_checked: std::time::Instant::now(),
            exit_reason: None,
            filter: None,
            disco_settings: None,
            disco: None,
            parked_relay: None,
        };
        w.config.listen_port = config.listen_port;
        w.config.fwmark = config.fwmark;
        w.reconcile(config).map_err(|e| io::Error::other(e.to_string()))?;
        Ok((w, control))
    }

    /// The UDP port bound.
    pub fn listen_port(&self) -> u16 {
        self.udp.port()
    }

    fn now(&self) -> Instant {
        Instant::from_duration(self.clock.elapsed())
    }

    pub(crate) fn wall() -> WallTime {
        WallTime::from_unix(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default())
    }

    /// Runs until [`Control::stop`].
    pub fn run(mut self) -> io::Result<()> {
        for i in 0..TUN_SLOTS {
            self.arm_tun_read(i);
        }
        for i in 0..RECV_SLOTS {
            self.arm_recv(i);
        }
        self.arm_eventfd();
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(CQE_BATCH);
        while !self.stop.load(Ordering::Relaxed) {
            if self.mtu_checked.elapsed() >= MTU_CHECK_INTERVAL {
                self.refresh_mtu();
            }
            self.drain_relay();
            let now = self.now();
            if let Some(dev) = self.device.as_mut() {
                if dev.poll_timeout().is_some_and(|t| t <= now) {
                    dev.handle_timeout(now);
                }
            }
            if let Some(agent) = self.disco.as_mut() {
                agent.handle_timeout(now);
            }
            self.flush_control_output();
            let disco_due = self.disco.as_ref().and_then(PathAgent::poll_timeout);
            let wait = self
                .device
                .as_ref()
                .and_then(|d| d.poll_timeout())
                .map_or(disco_due, |t| Some(disco_due.map_or(t, |d| d.min(t))))
                .map(|t| t.saturating_duration_since(self.now()))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let ts = types::Timespec::new().sec(wait.as_secs()).nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            self.queued = 0;
            while !self.stop.load(Ordering::Relaxed) {
                cqes.clear();
                cqes.extend(self.ring.completion().take(CQE_BATCH).map(|c| (c.user_data(), c.result(), c.flags())));
                if cqes.is_empty() {
                    break;
                }
                for &(ud, res, _flags) in &cqes {
                    if decode_user_data(ud).0 != KIND_CANCEL {
                        self.in_flight -= 1;
                    }
                    self.complete(ud, res);
                }
                // Submit what the completions queued, so the kernel works while we continue.
                if self.queued > 0 {
                    self.ring.submit()?;
                    self.queued = 0;
                }
            }
        }
        self.cancel_in_flight();
        if let Some(reason) = &self.exit_reason {
            eprintln!("wiremeshd: {reason}; exiting");
        }
        if std::env::var_os("WIREMESH_STATS").is_some() {
            eprintln!("wiremeshd: data plane counters: {}", self.stats.summary());
        }
        Ok(())
    }

    /// Cancels every operation still in the ring and reaps the completions
    /// (without acting on them), for at most [`DRAIN_LIMIT`].
    fn cancel_in_flight(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        let cancel =
            opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(user_data(KIND_CANCEL, 0, 0));
        // SAFETY: a cancel request points to no memory.
        unsafe { self.push(cancel) };
        let deadline = std::time::Instant::now() + DRAIN_LIMIT;
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(_) => break,
            }
            for cqe in self.ring.completion() {
                if decode_user_data(cqe.user_data()).0 != KIND_CANCEL {
                    self.in_flight = self.in_flight.saturating_sub(1);
                }
            }
        }
    }

    /// Re-reads the TUN MTU; a vanished device stops the worker.
    fn refresh_mtu(&mut self) {
        self.mtu_checked = std::time::Instant::now();
        match self.tun.mtu() {
            Ok(m) => {
                let m = m as usize;
                if m != self.mtu {
                    self.mtu = m;
                    if let Some(dev) = self.device.as_mut() {
                        dev.set_mtu(Some(m));
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => self.interface_gone(),
            Err(_) => {}
        }
    }

    /// The TUN device was deleted under us: stop, as wireguard-go does.
    fn interface_gone(&mut self) {
        if self.exit_reason.is_none() {
            self.exit_reason = Some(format!("interface {} was deleted", self.tun.name()));
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Pushes one entry, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points to must stay valid and untouched until
    /// its completion is reaped.
    unsafe fn push(&mut self, entry: io_uring::squeue::Entry) {
        // SAFETY: forwarded from the caller.
        unsafe {
            while self.ring.submission().push(&entry).is_err() {
                let _ = self.ring.submit();
            }
        }
        if decode_user_data(entry.get_user_data()).0 != KIND_CANCEL {
            self.in_flight += 1;
        }
        self.queued += 1;
    }

    fn arm_tun_read(&mut self, i: usize) {
        if self.tun_io == TunIo::Sync {
            self.free_tun.push(i);
            if !self.reading_tun {
                self.arm_tun_poll();
            }
            return;
        }
        let fd = self.tun.as_raw_fd();
        let slot = &mut self.tun_slots[i];
        let e = opcode::Read::new(types::Fd(fd), slot.read.as_mut_ptr(), TUN_BUF as u32).build().user_data(user_data(
            KIND_TUN_READ,
            i,
            0,
        ));
        // SAFETY: slot i's read buffer is not touched until this read completes
        // (the slot has no other operation in flight: pending == 0).
        unsafe { self.push(e) };
    }

    fn arm_tun_poll(&mut self) {
        if self.tun_poll_armed {
            return;
        }
        self.tun_poll_armed = true;
        let fd = self.tun.as_raw_fd();
        let e =
            opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(user_data(KIND_TUN_POLL, 0, 0));
        // SAFETY: a poll points to no memory.
        unsafe { self.push(e) };
    }

    /// `TunIo::Sync`: reads with plain system calls into free slots until the
    /// device is drained (or a budget is spent), then re-arms the poll.
    fn read_tun_sync(&mut self) {
        let fd = self.tun.as_raw_fd();
        self.reading_tun = true;
        let mut budget = 256;
        while budget > 0 {
            let Some(i) = self.free_tun.pop() else { break };
            budget -= 1;
            let buf = &mut self.tun_slots[i].read;
            // SAFETY: reading into the slot's own buffer, which no operation uses.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), TUN_BUF) };
            if n < 0 {
                self.free_tun.push(i);
                let err = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if err != libc::EAGAIN && err != libc::EINTR {
                    self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    if err == libc::EBADFD || err == libc::EBADF {
                        self.interface_gone();
                    } else {
                        self.refresh_mtu();
                    }
                    self.reading_tun = false;
                    return;
                }
                break;
            }
            self.on_tun_read(i, n as i32);
        }
        self.reading_tun = false;
        if !self.free_tun.is_empty() {
            self.arm_tun_poll();
        }
    }

    fn arm_recv(&mut self, i: usize) {
        let fd = self.udp.fd();
        let slot = &mut self.recv_slots[i];
        let ptr = slot.buf.as_mut_ptr();
        slot.msg.prepare_recv(ptr, RECV_BUF);
        slot.armed = true;
        let e =
            opcode::RecvMsg::new(types::Fd(fd), &mut slot.msg.hdr).build().user_data(user_data(KIND_UDP_RECV, i, 0));
        // SAFETY: the slot's buffer and msghdr live in a boxed slice that never
        // moves and are not touched until the completion.
        unsafe { self.push(e) };
    }

    fn arm_eventfd(&mut self) {
        let fd = self.eventfd.as_raw_fd();
        let ptr = (&mut *self.eventfd_buf as *mut u64).cast::<u8>();
        let e = opcode::Read::new(types::Fd(fd), ptr, 8).build().user_data(user_data(KIND_EVENTFD, 0, 0));
        // SAFETY: the boxed u64 lives as long as the worker.
        unsafe { self.push(e) };
    }

    fn complete(&mut self, ud: u64, res: i32) {
        let (kind, slot, sub) = decode_user_data(ud);
        match kind {
            KIND_TUN_READ => self.on_tun_read(slot, res),
            KIND_UDP_SEND => self.on_udp_send(slot, sub, res),
            KIND_UDP_RECV => self.on_recv(slot, res),
            KIND_TUN_WRITE => {
                if res < 0 {
                    self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                }
                let s = &mut self.recv_slots[slot];
                s.pending -= 1;
                if s.pending == 0 {
                    self.arm_recv(slot);
                }
            }
            KIND_CTRL_SEND => {
                if res < 0 {
                    self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                }
                self.ctrl_slots[slot].busy = false;
                self.flush_control_output();
            }
            KIND_TUN_POLL => {
                self.tun_poll_armed = false;
                self.read_tun_sync();
            }
            KIND_EVENTFD => {
                self.drain_control();
                self.drain_relay();
                self.arm_eventfd();
            }
            _ => {}
        }
    }

    fn on_tun_read(&mut self, i: usize, res: i32) {
        if res < 0 {
            if res != -libc::EAGAIN && res != -libc::EINTR {
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            }
            // A detached TUN file answers EBADFD: the link was deleted.
            if res == -libc::EBADFD || res == -libc::EBADF {
                self.interface_gone();
                return;
            }
            if res != -libc::EAGAIN && res != -libc::EINTR {
                // Find out whether the device is still there before re-arming.
                self.refresh_mtu();
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            self.arm_tun_read(i);
            return;
        }
        self.stats.tun_reads.fetch_add(1, Ordering::Relaxed);
        let n = res as usize;
        let now = self.now();
        let mtu = self.mtu;
        let Some(device) = self.device.as_mut() else {
            self.arm_tun_read(i);
            return;
        };
        let mut agent = self.disco.as_mut();
        let slot = &mut self.tun_slots[i];
        let (hdr, packet) = if self.vnet {
            match VirtioNetHdr::parse(&slot.read[..n]) {
                Ok(h) => (h, &slot.read[VirtioNetHdr::LEN..n]),
                Err(_) => {
                    self.stats.bad_tun_packets.fetch_add(1, Ordering::Relaxed);
                    self.arm_tun_read(i);
                    return;
                }
            }
        } else {
            (VirtioNetHdr::NONE, &slot.read[..n])
        };
        let Some(first) = first_segment_len(&hdr, packet) else {
            self.stats.bad_tun_packets.fetch_add(1, Ordering::Relaxed);
            self.arm_tun_read(i);
            return;
        };
        let stride = HEADROOM + transport_padded_len(first, mtu) + wiremesh_core::crypto::TAG_LEN;
        let max_chunks = (TX_BUF / stride).min(MAX_SEGMENTS);
        let mut chunks: Vec<&mut [u8]> = slot.tx.chunks_mut(stride).take(max_chunks).collect();
        let count = match split(&hdr, packet, HEADROOM, &mut chunks, &mut slot.sizes) {
            Ok(c) => c,
            Err(_) => {
                self.stats.bad_tun_packets.fetch_add(1, Ordering::Relaxed);
                self.arm_tun_read(i);
                return;
            }
        };
        self.stats.segments.fetch_add(count as u64, Ordering::Relaxed);
        // Seal each segment in place, then group runs for one GSO send each.
        slot.groups.clear();
        let gso = self.udp.gso;
        let mut run: Option<(usize, usize, usize, SocketAddr)> = None; // (first chunk, count, last len, dest)
        let mut groups: [(usize, usize, usize, SocketAddr); MSGS_PER_SLOT] =
            [(0, 0, 0, SocketAddr::from(([0, 0, 0, 0], 0))); MSGS_PER_SLOT];
        let mut ngroups = 0;
        let mut overflow = Vec::new();
        for (k, chunk) in chunks.iter_mut().enumerate().take(count) {
            let len = slot.sizes[k];
            match device.encapsulate(chunk, len, now) {
                Ok(Encapsulated::Ready(t)) if t.destination == RELAY_ENDPOINT => {
                    // The peer's path is the relay: into the link, never the socket.
                    send_relayed(agent.as_deref_mut(), device, t.peer, &chunk[..t.len]);
                }
                Ok(Encapsulated::Ready(t)) => {
                    let extend = match run {
                        Some((start, cnt, last_len, dest)) => {
                            gso && dest == t.destination
                                && start + cnt == k
                                && last_len == stride
                                && (cnt + 1) * stride <= GSO_MAX_BYTES
                                && cnt < 64
                        }
                        None => false,
                    };
                    if extend {
                        let r = run.as_mut().expect("run exists");
                        r.1 += 1;
                        r.2 = t.len;
                    } else {
                        if let Some(r) = run.take() {
                            if ngroups < MSGS_PER_SLOT {
                                groups[ngroups] = r;
                                ngroups += 1;
                            } else {
                                overflow.push(r);
                            }
                        }
                        run = Some((k, 1, t.len, t.destination));
                    }
                }
                Ok(Encapsulated::Staged { .. }) | Err(_) => {}
            }
        }
        if let Some(r) = run.take() {
            if ngroups < MSGS_PER_SLOT {
                groups[ngroups] = r;
                ngroups += 1;
            } else {
                overflow.push(r);
            }
        }
        // Rare: more runs than message slots; send those synchronously.
        for (start, cnt, last_len, dest) in overflow {
            for c in 0..cnt {
                let off = (start + c) * stride;
                let len = if c + 1 == cnt { last_len } else { stride };
                let _ = self.udp.send_to(&slot.tx[off..off + len], dest);
            }
        }
        let fd = self.udp.fd();
        for (g, &(start, cnt, last_len, dest)) in groups.iter().enumerate().take(ngroups) {
            let off = start * stride;
            let total = (cnt - 1) * stride + last_len;
            let seg = (cnt > 1).then_some(stride as u16);
            let ptr = slot.tx[off..].as_mut_ptr();
            slot.msgs[g].prepare_send(&self.udp, ptr, total, dest, seg);
            slot.groups.push((off, total, stride, dest));
            let e = opcode::SendMsg::new(types::Fd(fd), &slot.msgs[g].hdr).build().user_data(user_data(
                KIND_UDP_SEND,
                i,
                g,
            ));
            slot.pending += 1;
            self.stats.udp_sends.fetch_add(1, Ordering::Relaxed);
            // SAFETY: tx and msgs of slot i stay untouched until every send of
            // the slot completed (pending counts them; the slot's next read is
            // armed only at zero).
            unsafe {
                while self.ring.submission().push(&e).is_err() {
                    let _ = self.ring.submit();
                }
            }
            self.in_flight += 1;
            self.queued += 1;
        }
        let pending = self.tun_slots[i].pending;
        if pending == 0 {
            self.arm_tun_read(i);
        }
        self.flush_control_output();
    }

    fn on_udp_send(&mut self, i: usize, g: usize, res: i32) {
        if res < 0 {
            self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            if res == -libc::EIO && self.udp.gso {
                // The route's device cannot segment: stop using GSO and resend
                // this run one datagram at a time.
                self.udp.gso = false;
                let slot = &self.tun_slots[i];
                if let Some(&(off, total, stride, dest)) = slot.groups.get(g) {
                    let mut o = 0;
                    while o < total {
                        let len = stride.min(total - o);
                        let _ = self.udp.send_to(&slot.tx[off + o..off + o + len], dest);
                        o += len;
                    }
                }
            }
        }
        let slot = &mut self.tun_slots[i];
        slot.pending -= 1;
        if slot.pending == 0 {
            self.arm_tun_read(i);
        }
    }

    fn on_recv(&mut self, i: usize, res: i32) {
        self.recv_slots[i].armed = false;
        if res < 0 {
            if res != -libc::ECANCELED && res != -libc::EAGAIN && res != -libc::EINTR {
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            }
            self.arm_recv(i);
            return;
        }
        self.stats.udp_recvs.fetch_add(1, Ordering::Relaxed);
        let n = res as usize;
        let now = self.now();
        let vnet = self.vnet;
        let tun_fd = self.tun.as_raw_fd();
        let slot = &mut self.recv_slots[i];
        let Some(from) = decode_addr(&slot.msg.addr) else {
            self.arm_recv(i);
            return;
        };
        let truncated = slot.msg.hdr.msg_flags & libc::MSG_TRUNC != 0;
        // SAFETY: the kernel filled the control buffer this msghdr points to.
        let seg = unsafe { read_gro_cmsg(&slot.msg.hdr) }.unwrap_or(n).max(1);
        let Some(device) = self.device.as_mut() else {
            self.arm_recv(i);
            return;
        };
        let mut disco = self.disco.as_mut();
        if truncated {
            self.arm_recv(i);
            return;
        }
        slot.packets.clear();
        let mut off = 0;
        let mut datagrams = 0u64;
        while off < n {
            let len = seg.min(n - off);
            datagrams += 1;
            let dg = &mut slot.buf[off..off + len];
            if let Some(agent) = disco.as_deref_mut() {
                match classify(dg) {
                    Kind::WireGuard => {}
                    Kind::Probe => {
                        agent.handle_probe(from, dg, now);
                        off += len;
                        continue;
                    }
                    Kind::Stun => {
                        agent.handle_stun(from, dg, now);
                        off += len;
                        continue;
                    }
                }
            }
            if let Ok(Received::Packet { range, .. }) = device.handle_datagram(from, dg, now) {
                let packet = Packet { start: off + range.start, len: range.len() };
                if slot.packets.len() < MAX_RECV_PACKETS {
                    slot.packets.push(packet);
                } else {
                    // Beyond what one receive can hold in practice: write it now.
                    let (ws, wl) = if vnet {
                        (packet.start - VirtioNetHdr::LEN, packet.len + VirtioNetHdr::LEN)
                    } else {
                        (packet.start, packet.len)
                    };
                    if vnet {
                        slot.buf[ws..packet.start].copy_from_slice(&VirtioNetHdr::NONE.to_bytes());
                    }
                    // SAFETY: writing initialized bytes of our own buffer.
                    unsafe { libc::write(tun_fd, slot.buf[ws..].as_ptr().cast(), wl) };
                }
            }
            off += len;
        }
        self.stats.udp_datagrams.fetch_add(datagrams, Ordering::Relaxed);
        if vnet {
            coalesce(&mut slot.buf, &slot.packets, &mut slot.groups);
        } else {
            slot.groups.clear();
            slot.groups.extend((0..slot.packets.len()).map(|k| Group {
                first: k,
                count: 1,
                hdr: VirtioNetHdr::NONE,
                headers: 0,
            }));
        }
        let nw = slot.groups.len();
        slot.pending = nw;
        let base = slot.buf.as_mut_ptr();
        let mut writes = [TunWrite::One(std::ptr::null(), 0); MAX_RECV_PACKETS];
        let mut iov_next = 0;
        for (g, group) in slot.groups.iter().enumerate() {
            let first = slot.packets[group.first];
            let (wstart, wlen) = if vnet {
                let h = group.hdr.to_bytes();
                slot.buf[first.start - VirtioNetHdr::LEN..first.start].copy_from_slice(&h);
                (first.start - VirtioNetHdr::LEN, first.len + VirtioNetHdr::LEN)
            } else {
                (first.start, first.len)
            };
            if group.count == 1 {
                // SAFETY: `base` points into slot i's boxed buffer, which is not
                // re-armed for receiving until all its writes completed.
                writes[g] = TunWrite::One(unsafe { base.add(wstart) }, wlen);
            } else {
                let iov0 = iov_next;
                // SAFETY: as above, every vector points into slot i's buffer.
                slot.iovs[iov_next] = libc::iovec { iov_base: unsafe { base.add(wstart) }.cast(), iov_len: wlen };
                iov_next += 1;
                for p in &slot.packets[group.first + 1..group.first + group.count] {
                    slot.iovs[iov_next] = libc::iovec {
                        // SAFETY: as above.
                        iov_base: unsafe { base.add(p.start + group.headers) }.cast(),
                        iov_len: p.len - group.headers,
                    };
                    iov_next += 1;
                }
                writes[g] = TunWrite::Vectored(slot.iovs[iov0..].as_ptr(), group.count);
            }
        }
        let ud = user_data(KIND_TUN_WRITE, i, 0);
        if self.tun_io == TunIo::Sync {
            // The same writes as plain system calls, done now.
            for w in &writes[..nw] {
                // SAFETY: each write names initialized bytes (or vectors over
                // them) of slot i's buffer, untouched during the call.
                let r = unsafe {
                    match *w {
                        TunWrite::One(ptr, len) => libc::write(tun_fd, ptr.cast(), len),
                        TunWrite::Vectored(iov, n) => libc::writev(tun_fd, iov, n as i32),
                    }
                };
                if r < 0 {
                    self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.recv_slots[i].pending = 0;
            self.stats.tun_writes.fetch_add(nw as u64, Ordering::Relaxed);
            self.arm_recv(i);
            self.flush_control_output();
            return;
        }
        for w in &writes[..nw] {
            let e = match *w {
                TunWrite::One(ptr, len) => opcode::Write::new(types::Fd(tun_fd), ptr, len as u32).build(),
                TunWrite::Vectored(iov, n) => opcode::Writev::new(types::Fd(tun_fd), iov, n as u32).build(),
            };
            // SAFETY: the buffer and vectors of slot i stay untouched until
            // its writes complete (counted in `pending`).
            unsafe { self.push(e.user_data(ud)) };
        }
        self.stats.tun_writes.fetch_add(nw as u64, Ordering::Relaxed);
        if nw == 0 {
            self.arm_recv(i);
        }
        self.flush_control_output();
    }

    /// Moves handshakes, keepalives and staged packets from the core into free
    /// control slots and queues their sends.
    fn flush_control_output(&mut self) {
        let now = self.now();
        let fd = self.udp.fd();
        self.flush_disco(now);
        loop {
            let Some(device) = self.device.as_mut() else { return };
            let Some(i) = self.ctrl_slots.iter().position(|s| !s.busy) else { return };
            let slot = &mut self.ctrl_slots[i];
            let t = match device.poll_transmit(now, &mut slot.buf) {
                Ok(Some(t)) => t,
                Ok(None) => return,
                Err(_) => {
                    self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            if t.destination == RELAY_ENDPOINT {
                send_relayed(self.disco.as_mut(), device, t.peer, &slot.buf[..t.len]);
                continue;
            }
            let ptr = slot.buf.as_mut_ptr();
            slot.msg.prepare_send(&self.udp, ptr, t.len, t.destination, None);
            slot.busy = true;
            let e =
                opcode::SendMsg::new(types::Fd(fd), &slot.msg.hdr).build().user_data(user_data(KIND_CTRL_SEND, i, 0));
            // SAFETY: the slot is busy (untouched) until this send completes.
            unsafe { self.push(e) };
        }
    }

    /// Applies path changes to the device and queues STUN requests and
    /// probes in free control slots.
    fn flush_disco(&mut self, now: Instant) {
        let Some(agent) = self.disco.as_mut() else { return };
        while let Some(change) = agent.poll_event() {
            if let Some(device) = self.device.as_mut() {
                apply_path(device, change);
            }
        }
        let fd = self.udp.fd();
        loop {
            let Some(agent) = self.disco.as_mut() else { return };
            let Some(i) = self.ctrl_slots.iter().position(|s| !s.busy) else { return };
            let slot = &mut self.ctrl_slots[i];
            let Some((to, len)) = agent.poll_transmit(now, &mut slot.buf) else { return };
            let ptr = slot.buf.as_mut_ptr();
            slot.msg.prepare_send(&self.udp, ptr, len, to, None);
            slot.busy = true;
            let e =
                opcode::SendMsg::new(types::Fd(fd), &slot.msg.hdr).build().user_data(user_data(KIND_CTRL_SEND, i, 0));
            // SAFETY: the slot is busy (untouched) until this send completes.
            unsafe { self.push(e) };
        }
    }

    /// Makes, updates or drops the path agent after a change of settings or
    /// of the device key, and puts its chosen paths on the device.
    fn refresh_disco(&mut self) {
        let now = self.now();
        crate::disco::refresh_agent(
            &mut self.disco,
            &mut self.parked_relay,
            self.disco_settings.as_ref(),
            self.config.private_key.clone(),
            Self::wall(),
            self.device.as_mut(),
            now,
        );
    }

    fn drain_control(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                ControlMsg::Uapi(request, reply) => {
                    let response = self.uapi(request);
                    let _ = reply.send(response);
                }
                ControlMsg::Filter(filter) => {
                    if let Some(dev) = self.device.as_mut() {
                        dev.set_filter(filter.clone());
                    }
                    self.filter = filter;
                }
                ControlMsg::Disco(settings) => {
                    self.disco_settings = settings;
                    self.refresh_disco();
                    self.flush_control_output();
                }
                ControlMsg::DiscoStatus(reply) => {
                    let _ = reply.send(self.disco.as_ref().map(PathAgent::status));
                }
                ControlMsg::Drops(reply) => {
                    let _ = reply.send(self.device.as_ref().map(DropReport::of));
                }
                ControlMsg::StunNow => {
                    if let Some(agent) = self.disco.as_mut() {
                        agent.stun_now();
                    }
                    self.flush_control_output();
                }
                ControlMsg::Relay(link) => {
                    let now = self.now();
                    crate::disco::set_relay_link(&mut self.disco, &mut self.parked_relay, link, now);
                    self.flush_control_output();
                }
            }
        }
    }

    /// Hands what the relay delivered to the path agent (probes) and the
    /// device (WireGuard messages, as datagrams from [`RELAY_ENDPOINT`]),
    /// writing decrypted packets to the TUN device. At most
    /// [`RELAY_DRAIN_BUDGET`] per call, so the relay cannot starve the
    /// socket; the loop calls it again on its next turn.
    fn drain_relay(&mut self) {
        if let Some(parked) = self.parked_relay.as_mut() {
            // Discovery is off: nothing is sent through the relay, and what
            // comes from it is dropped.
            while parked.try_recv().is_some() {}
        }
        if self.disco.is_none() {
            return;
        }
        let now = self.now();
        let vnet = self.vnet;
        let tun_fd = self.tun.as_raw_fd();
        let mut handled = 0;
        for _ in 0..RELAY_DRAIN_BUDGET {
            let Some(agent) = self.disco.as_mut() else { break };
            match agent.poll_relayed(now) {
                Relayed::Empty => break,
                Relayed::Handled => handled += 1,
                Relayed::WireGuard(mut dg) => {
                    handled += 1;
                    let Some(device) = self.device.as_mut() else { continue };
                    self.stats.udp_datagrams.fetch_add(1, Ordering::Relaxed);
                    let Ok(Received::Packet { range, .. }) = device.handle_datagram(RELAY_ENDPOINT, &mut dg.bytes, now)
                    else {
                        continue;
                    };
                    // A transport message's 16-byte header precedes the
                    // packet, so the virtio header fits in front of it.
                    let (ws, wl) = if vnet && range.start >= VirtioNetHdr::LEN {
                        dg.bytes[range.start - VirtioNetHdr::LEN..range.start]
                            .copy_from_slice(&VirtioNetHdr::NONE.to_bytes());
                        (range.start - VirtioNetHdr::LEN, range.len() + VirtioNetHdr::LEN)
                    } else if vnet {
                        self.stats.bad_tun_packets.fetch_add(1, Ordering::Relaxed);
                        continue;
                    } else {
                        (range.start, range.len())
                    };
                    // SAFETY: writing initialized bytes of our own buffer.
                    let r = unsafe { libc::write(tun_fd, dg.bytes[ws..].as_ptr().cast(), wl) };
                    if r < 0 {
                        self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats.tun_writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if handled > 0 {
            self.flush_control_output();
        }
    }

    fn uapi(&mut self, request: Request) -> Response {
        match request {
            Request::Get => {
                self.sync_stats();
                Response::get(&self.config)
            }
            Request::Set(ops) => {
                self.sync_stats();
                match next_config(&self.config, &ops) {
                    Ok(next) => Response::set(self.reconcile(next)),
                    Err(e) => Response::error(&e),
                }
            }
        }
    }

    /// Copies counters and roamed endpoints from the device into the config.
    fn sync_stats(&mut self) {
        sync_stats(self.device.as_ref(), &mut self.config);
    }

    /// Makes the socket and the device match `next`; on failure nothing changes.
    fn reconcile(&mut self, mut next: DeviceConfig) -> Result<(), UapiError> {
        let now = self.now();
        // The socket first: it is the step that can fail.
        if next.listen_port != self.config.listen_port && !(next.listen_port == 0 && self.config.listen_port != 0) {
            let udp = UdpSock::bind(next.listen_port, next.fwmark).map_err(UapiError::PortInUse)?;
            let old = std::mem::replace(&mut self.udp, udp);
            // Cancel receives on the old socket; their completions re-arm on the new one.
            for i in 0..RECV_SLOTS {
                if self.recv_slots[i].armed {
                    let e = opcode::AsyncCancel::new(user_data(KIND_UDP_RECV, i, 0)).build().user_data(user_data(
                        KIND_CANCEL,
                        i,
                        0,
                    ));
                    // SAFETY: a cancel request points to no memory.
                    unsafe { self.push(e) };
                }
            }
            self.retired.push(old);
            if self.retired.len() > 4 {
                self.retired.remove(0);
            }
        }
        next.listen_port = self.udp.port();
        if next.fwmark != self.config.fwmark {
            self.udp.set_fwmark(next.fwmark).map_err(UapiError::PortInUse)?;
        }
        reconcile_device(&mut self.device, &mut self.config, &next, self.mtu, now);
        if let Some(dev) = self.device.as_mut().filter(|d| d.filter() != self.filter.as_ref()) {
            // A device made for a new key starts without one.
            dev.set_filter(self.filter.clone());
        }
        self.config = next;
        if self.disco_settings.is_some() {
            self.refresh_disco();
        }
        self.flush_control_output();
        Ok(())
    }
}

/// Queues a sealed datagram for `peer` through the relay link (counted as
/// dropped by the agent when it cannot go).
fn send_relayed(
    agent: Option<&mut PathAgent>,
    device: &Device,
    peer: Option<wiremesh_core::device::PeerId>,
    bytes: &[u8],
) {
    if let (Some(agent), Some(key)) = (agent, peer.and_then(|id| device.peer_public_key(id))) {
        agent.relay_send(key, bytes);
    }
}

/// `current` with the `set` `ops` applied, keeping for each peer whose
/// section named no endpoint what roaming taught the device.
pub(crate) fn next_config(current: &DeviceConfig, ops: &[SetOp]) -> Result<DeviceConfig, UapiError> {
    let mut next = current.clone();
    next.apply(ops)?;
    let named: Vec<_> = named_endpoints(ops);
    for p in &mut next.peers {
        if !named.contains(&p.public_key.0) {
            if let Some(old) = current.peer(&p.public_key) {
                p.endpoint = old.endpoint;
            }
        }
    }
    Ok(next)
}

/// Copies counters and roamed endpoints from the device into the config.
pub(crate) fn sync_stats(device: Option<&Device>, config: &mut DeviceConfig) {
    let Some(dev) = device else { return };
    for p in &mut config.peers {
        if let Some(id) = dev.peer_by_key(&p.public_key) {
            if let Some(st) = dev.peer_stats(id) {
                p.stats.rx_bytes = st.rx_bytes;
                p.stats.tx_bytes = st.tx_bytes;
                p.stats.last_handshake = st.last_handshake.map(|w| Duration::new(w.secs, w.nanos)).unwrap_or_default();
            }
            if let Some(ep) = dev.peer_endpoint(id) {
                p.endpoint = Some(ep);
            }
        }
    }
}

/// Makes the core device match `next` (key, peers, endpoints, keys, allowed
/// IPs), touching only what changed since `current`; `current` must then be
/// replaced by `next`. `mtu` is the tunnel MTU for a device created here.
pub(crate) fn reconcile_device(
    device: &mut Option<Device>,
    current: &mut DeviceConfig,
    next: &DeviceConfig,
    mtu: usize,
    now: Instant,
) {
    let key_changed =
        next.private_key.as_ref().map(|k| k.to_bytes()) != current.private_key.as_ref().map(|k| k.to_bytes());
    if key_changed {
        match (&next.private_key, device.as_mut()) {
            (None, _) => *device = None,
            (Some(k), Some(dev)) => dev.set_private_key(k.clone()),
            (Some(k), None) => {
                let cfg = CoreConfig { mtu: Some(mtu), ..CoreConfig::default() };
                *device = Some(Device::new(k.clone(), StdRng::from_entropy(), cfg, now, Worker::wall()));
                // Every configured peer is new to this device.
                current.peers.clear();
            }
        }
    }
    if let Some(dev) = device.as_mut() {
        for old in &current.peers {
            if next.peer(&old.public_key).is_none() {
                if let Some(id) = dev.peer_by_key(&old.public_key) {
                    let _ = dev.remove_peer(id);
                }
            }
        }
        for p in &next.peers {
            let old = current.peer(&p.public_key);
            let id = match dev.peer_by_key(&p.public_key) {
                Some(id) => id,
                None => {
                    let mut c = CorePeer::new(p.public_key);
                    c.preshared_key = Some(p.preshared_key.clone());
                    c.endpoint = p.endpoint;
                    c.persistent_keepalive = Some(p.persistent_keepalive_interval);
                    c.allowed_ips = p.allowed_ips.iter().map(|a| (a.addr(), a.cidr())).collect();
                    match dev.add_peer(c, now) {
                        Ok(_) => {}
                        Err(_) => continue, // our own key: ignored, as wireguard-go does
                    }
                    continue;
                }
            };
            let old_ep = old.and_then(|o| o.endpoint);
            if p.endpoint != old_ep {
                let _ = dev.set_peer_endpoint(id, p.endpoint);
            }
            if old.is_none_or(|o| o.preshared_key.to_bytes() != p.preshared_key.to_bytes()) {
                let _ = dev.set_peer_preshared_key(id, Some(p.preshared_key.clone()));
            }
            if old.is_none_or(|o| o.persistent_keepalive_interval != p.persistent_keepalive_interval) {
                let _ = dev.set_peer_persistent_keepalive(id, Some(p.persistent_keepalive_interval), now);
            }
            if old.is_none_or(|o| o.allowed_ips != p.allowed_ips) {
                let _ = dev.clear_allowed_ips(id);
                for a in &p.allowed_ips {
                    let _ = dev.add_allowed_ip(id, a.addr(), a.cidr());
                }
            }
        }
        // Allowed IPs moved between peers are re-asserted in config order.
        for p in &next.peers {
            if let Some(id) = dev.peer_by_key(&p.public_key) {
                for a in &p.allowed_ips {
                    if dev.route(a.addr()) != Some(id) {
                        let _ = dev.add_allowed_ip(id, a.addr(), a.cidr());
                    }
                }
            }
        }
    }
}

/// The public keys whose section of a `set` named an endpoint.
fn named_endpoints(ops: &[SetOp]) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    let mut current = None;
    for op in ops {
        match op {
            SetOp::Peer(k) => current = Some(k.0),
            SetOp::Endpoint(_) => {
                if let Some(k) = current {
                    out.push(k);
                }
            }
            _ => {}
        }
    }
    out
}

/// The length of the first segment a TUN read splits into.
fn first_segment_len(hdr: &VirtioNetHdr, packet: &[u8]) -> Option<usize> {
    if packet.is_empty() {
        return None;
    }
    if !hdr.is_gso() {
        return Some(packet.len());
    }
    let l4 = usize::from(hdr.csum_start);
    let l4_len = match hdr.gso_type & !VirtioNetHdr::GSO_ECN {
        VirtioNetHdr::GSO_UDP_L4 => 8,
        VirtioNetHdr::GSO_TCPV4 | VirtioNetHdr::GSO_TCPV6 => usize::from(packet.get(l4 + 12)? >> 4) * 4,
        _ => return None,
    };
    Some((l4 + l4_len + usize::from(hdr.gso_size)).min(packet.len()))
}

/// The padded plaintext length the core produces for a packet of `len`
/// bytes with tunnel MTU `mtu` (padding never grows a packet past the MTU).
fn transport_padded_len(len: usize, mtu: usize) -> usize {
    let padded = len.div_ceil(16) * 16;
    if len <= mtu {
        padded.min(mtu)
    } else {
        padded
    }
}
