//! The smoltcp device: IP packets the core decrypted wait in a queue for
//! smoltcp to read; IP packets smoltcp emits are sealed in place by the core
//! straight into a send batch, and batches go out as one UDP GSO `sendmsg`
//! per destination (one `sendto` per datagram where the kernel lacks GSO).
//!
//! With path discovery on, the phy also holds the [`PathAgent`]: received
//! datagrams are classified first (probes and STUN go to the agent, only
//! WireGuard to the core), the agent's probes and STUN requests leave from
//! the same socket, and datagrams the core addresses to [`RELAY_ENDPOINT`]
//! go into the agent's relay link instead of the socket.

use crate::disco::{apply_path, classify, Kind, PathAgent, Relayed};
use crate::driver::{DataplaneStats, Device};
use crate::relay::{RelayLink, RELAY_ENDPOINT};
use crate::udp::{read_gro_cmsg, write_gso_cmsg, UdpSock, CMSG_SPACE};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wiremesh_core::device::{Encapsulated, Received, HEADROOM, TAILROOM};

/// Bytes of one UDP receive (GRO coalesces up to 64 KiB).
const RECV_BUF: usize = 65536;
/// The most UDP payload bytes one GSO send carries.
const GSO_MAX_BYTES: usize = 65000;
/// The most datagrams one GSO send carries (the kernel's limit is 64).
const GSO_MAX_SEGMENTS: usize = 64;
/// Decrypted packets waiting for smoltcp before newer ones are dropped
/// (TCP retransmits them; the queue only bounds memory under a flood).
const RX_QUEUE_MAX: usize = 4096;
/// How long a send waits for room in a full socket buffer before dropping.
const SEND_WAIT_MS: i32 = 5;
/// Datagrams from the relay handled per call of [`Phy::drain_relay`], so the
/// relay cannot starve the socket.
pub(crate) const RELAY_DRAIN_BUDGET: usize = 256;

#[repr(C, align(8))]
struct Cmsg([u8; CMSG_SPACE]);

/// What one UDP receive gave.
pub(crate) enum RecvOutcome {
    /// Datagrams were handled (some may have been handshakes or dropped).
    Some,
    /// Nothing more to read now.
    Empty,
}

/// The netstack's side of the tunnel: the core device, the UDP socket and
/// the queues between them and smoltcp.
pub(crate) struct Phy {
    pub(crate) core: Option<Device>,
    pub(crate) udp: UdpSock,
    /// Sockets replaced by a new listen port (kept so a racing send does not fail).
    pub(crate) retired: Vec<UdpSock>,
    pub(crate) mtu: usize,
    pub(crate) now: wiremesh_core::Instant,
    pub(crate) stats: Arc<DataplaneStats>,
    /// The path agent while discovery is on and the device has a key.
    pub(crate) disco: Option<PathAgent>,
    /// The relay link while there is no agent (the agent holds it otherwise):
    /// nothing is sent through it, and what arrives from it is dropped.
    pub(crate) parked_relay: Option<RelayLink>,
    rx: VecDeque<Vec<u8>>,
    recv_buf: Box<[u8]>,
    /// Sealed datagrams of one destination, back to back, `seg` bytes each
    /// except possibly the last.
    batch: Vec<u8>,
    batch_len: usize,
    batch_count: usize,
    batch_seg: usize,
    batch_dest: Option<SocketAddr>,
    batch_closed: bool,
    ctrl: Box<[u8]>,
}

impl Phy {
    pub(crate) fn new(udp: UdpSock, mtu: usize, stats: Arc<DataplaneStats>) -> Phy {
        Phy {
            core: None,
            udp,
            retired: Vec::new(),
            mtu,
            now: wiremesh_core::Instant::from_duration(std::time::Duration::ZERO),
            stats,
            disco: None,
            parked_relay: None,
            rx: VecDeque::new(),
            recv_buf: vec![0u8; RECV_BUF].into_boxed_slice(),
            batch: vec![0u8; GSO_MAX_BYTES + HEADROOM + 65536 + TAILROOM],
            batch_len: 0,
            batch_count: 0,
            batch_seg: 0,
            batch_dest: None,
            batch_closed: false,
            ctrl: vec![0u8; 65536 + 64].into_boxed_slice(),
        }
    }

    /// Decrypted packets waiting for smoltcp.
    pub(crate) fn rx_queue(&self) -> &VecDeque<Vec<u8>> {
        &self.rx
    }

    /// Reads one (possibly coalesced) UDP receive and hands each datagram
    /// to the core (or, with discovery on, probes and STUN to the agent);
    /// decrypted IP packets join the queue for smoltcp.
    pub(crate) fn recv(&mut self) -> RecvOutcome {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut cmsg = Cmsg([0; CMSG_SPACE]);
        let mut iov = libc::iovec { iov_base: self.recv_buf.as_mut_ptr().cast(), iov_len: RECV_BUF };
        // SAFETY: as above.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = (&mut addr as *mut libc::sockaddr_in6).cast();
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = cmsg.0.as_mut_ptr().cast();
        hdr.msg_controllen = CMSG_SPACE;
        // SAFETY: every pointer in `hdr` points to memory that outlives the call.
        let n = unsafe { libc::recvmsg(self.udp.fd(), &mut hdr, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            }
            return RecvOutcome::Empty;
        }
        let n = n as usize;
        self.stats.udp_recvs.fetch_add(1, Ordering::Relaxed);
        let Some(from) = crate::udp::decode_addr(&addr) else { return RecvOutcome::Some };
        if hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return RecvOutcome::Some;
        }
        // SAFETY: the kernel filled the control buffer `hdr` points to.
        let seg = unsafe { read_gro_cmsg(&hdr) }.unwrap_or(n).max(1);
        let now = self.now;
        let Some(core) = self.core.as_mut() else { return RecvOutcome::Some };
        let mut disco = self.disco.as_mut();
        let mut off = 0;
        while off < n {
            let len = seg.min(n - off);
            self.stats.udp_datagrams.fetch_add(1, Ordering::Relaxed);
            let dg = &mut self.recv_buf[off..off + len];
            off += len;
            if let Some(agent) = disco.as_deref_mut() {
                match classify(dg) {
                    Kind::WireGuard => {}
                    Kind::Probe => {
                        agent.handle_probe(from, dg, now);
                        continue;
                    }
                    Kind::Stun => {
                        agent.handle_stun(from, dg, now);
                        continue;
                    }
                }
            }
            if let Ok(Received::Packet { range, .. }) = core.handle_datagram(from, dg, now) {
                if self.rx.len() < RX_QUEUE_MAX {
                    self.rx.push_back(dg[range].to_vec());
                } else {
                    self.stats.rx_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        RecvOutcome::Some
    }

    /// Hands what the relay delivered to the path agent (probes) and the
    /// core (WireGuard messages, as datagrams from [`RELAY_ENDPOINT`]);
    /// decrypted IP packets join the queue for smoltcp. At most
    /// [`RELAY_DRAIN_BUDGET`] datagrams per call; returns how many.
    pub(crate) fn drain_relay(&mut self) -> usize {
        if let Some(parked) = self.parked_relay.as_mut() {
            // Discovery is off: what comes from the relay is dropped.
            while parked.try_recv().is_some() {}
        }
        let now = self.now;
        let Some(agent) = self.disco.as_mut() else { return 0 };
        let mut handled = 0;
        while handled < RELAY_DRAIN_BUDGET {
            match agent.poll_relayed(now) {
                Relayed::Empty => break,
                Relayed::Handled => handled += 1,
                Relayed::WireGuard(mut dg) => {
                    handled += 1;
                    let Some(core) = self.core.as_mut() else { continue };
                    self.stats.udp_datagrams.fetch_add(1, Ordering::Relaxed);
                    if let Ok(Received::Packet { range, .. }) = core.handle_datagram(RELAY_ENDPOINT, &mut dg.bytes, now)
                    {
                        if self.rx.len() < RX_QUEUE_MAX {
                            // The packet is decrypted in place: keep just it.
                            dg.bytes.truncate(range.end);
                            dg.bytes.drain(..range.start);
                            self.rx.push_back(dg.bytes);
                        } else {
                            self.stats.rx_queue_full.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        handled
    }

    /// Sends what the core queued besides data (handshakes, cookie replies,
    /// keepalives, packets staged during a handshake), after the batch.
    pub(crate) fn flush(&mut self) {
        self.send_batch();
        self.flush_disco();
        let now = self.now;
        loop {
            let Some(core) = self.core.as_mut() else { return };
            match core.poll_transmit(now, &mut self.ctrl) {
                Ok(Some(t)) if t.destination == RELAY_ENDPOINT => {
                    // The peer's path is the relay: into the link, never the socket.
                    relay_send(self.disco.as_mut(), core, t.peer, &self.ctrl[..t.len]);
                }
                Ok(Some(t)) => {
                    let r = send_wait(&self.udp, &self.ctrl[..t.len], t.destination);
                    self.count_send(r);
                }
                Ok(None) => return,
                Err(_) => {
                    self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Applies the agent's path changes to the core and sends its STUN
    /// requests and probes from the WireGuard socket (relay-bound probes go
    /// into the link inside the agent).
    fn flush_disco(&mut self) {
        let now = self.now;
        let Some(agent) = self.disco.as_mut() else { return };
        while let Some(change) = agent.poll_event() {
            if let Some(core) = self.core.as_mut() {
                apply_path(core, change);
            }
        }
        while let Some((to, len)) = agent.poll_transmit(now, &mut self.ctrl) {
            match send_wait(&self.udp, &self.ctrl[..len], to) {
                Ok(_) => self.stats.udp_sends.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.stats.io_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }

    fn count_send(&self, r: io::Result<usize>) {
        match r {
            Ok(_) => self.stats.udp_sends.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.io_errors.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Seals the packet smoltcp wrote at `batch[batch_len + HEADROOM..][..len]`
    /// and adds it to the batch (sending the batch first when it cannot grow).
    fn seal(&mut self, len: usize) {
        let now = self.now;
        let off = self.batch_len;
        let Some(core) = self.core.as_mut() else { return };
        let t = match core.encapsulate(&mut self.batch[off..], len, now) {
            Ok(Encapsulated::Ready(t)) => t,
            // Staged packets leave through `flush`; drops are counted by the core.
            Ok(Encapsulated::Staged { .. }) | Err(_) => return,
        };
        if t.destination == RELAY_ENDPOINT {
            // Into the relay link; the batch slot is reused by the next packet.
            relay_send(self.disco.as_mut(), core, t.peer, &self.batch[off..off + t.len]);
            return;
        }
        self.stats.segments.fetch_add(1, Ordering::Relaxed);
        let fits = self.batch_count > 0
            && self.udp.gso
            && self.batch_dest == Some(t.destination)
            && !self.batch_closed
            && t.len <= self.batch_seg
            && self.batch_count < GSO_MAX_SEGMENTS
            && off + t.len <= GSO_MAX_BYTES;
        if fits {
            self.batch_len += t.len;
            self.batch_count += 1;
            // A shorter datagram can only end a GSO run.
            self.batch_closed = t.len < self.batch_seg;
            return;
        }
        if self.batch_count > 0 {
            self.send_batch();
            self.batch.copy_within(off..off + t.len, 0);
        }
        self.batch_len = t.len;
        self.batch_count = 1;
        self.batch_seg = t.len;
        self.batch_dest = Some(t.destination);
        self.batch_closed = false;
    }

    fn send_batch(&mut self) {
        if self.batch_count == 0 {
            return;
        }
        let dest = self.batch_dest.take().expect("a batch has a destination");
        let (len, seg, count) = (self.batch_len, self.batch_seg, self.batch_count);
        self.batch_len = 0;
        self.batch_count = 0;
        if count > 1 {
            match send_gso(&self.udp, &self.batch[..len], seg as u16, dest) {
                Ok(_) => {
                    self.stats.udp_sends.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // The path cannot segment (EIO): send one by one from now on.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => self.udp.gso = false,
                Err(_) => {
                    self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        for chunk in self.batch[..len].chunks(seg) {
            let r = send_wait(&self.udp, chunk, dest);
            self.count_send(r);
        }
    }
}

/// Queues a sealed datagram for `peer` through the agent's relay link
/// (counted as dropped by the link, or by the agent without one, when it
/// cannot go; without an agent nothing can carry it).
fn relay_send(agent: Option<&mut PathAgent>, core: &Device, peer: Option<wiremesh_core::device::PeerId>, bytes: &[u8]) {
    if let (Some(agent), Some(key)) = (agent, peer.and_then(|id| core.peer_public_key(id))) {
        agent.relay_send(key, bytes);
    }
}

/// Sends one datagram, waiting a little for room when the socket buffer is full.
fn send_wait(udp: &UdpSock, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
    match udp.send_to(buf, to) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            wait_writable(udp);
            udp.send_to(buf, to)
        }
        r => r,
    }
}

fn wait_writable(udp: &UdpSock) {
    let mut pfd = libc::pollfd { fd: udp.fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, SEND_WAIT_MS) };
}

/// One `sendmsg` carrying `buf` as datagrams of `seg` bytes (`UDP_SEGMENT`).
fn send_gso(udp: &UdpSock, buf: &[u8], seg: u16, to: SocketAddr) -> io::Result<usize> {
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let addr_len = udp.encode(to, &mut addr);
    let mut cmsg = Cmsg([0; CMSG_SPACE]);
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: as above.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = (&mut addr as *mut libc::sockaddr_in6).cast();
    hdr.msg_namelen = addr_len;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_controllen = write_gso_cmsg(&mut cmsg.0, seg);
    hdr.msg_control = cmsg.0.as_mut_ptr().cast();
    for attempt in 0..2 {
        // SAFETY: `hdr` points to live memory; the kernel only reads it.
        let n = unsafe { libc::sendmsg(udp.fd(), &hdr, 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock && attempt == 0 {
            wait_writable(udp);
            continue;
        }
        return Err(e);
    }
    Err(io::ErrorKind::WouldBlock.into())
}

/// Hands smoltcp one queued packet.
pub(crate) struct RxToken {
    packet: Vec<u8>,
}

/// Lets smoltcp write one packet into the send batch.
pub(crate) struct TxToken<'a> {
    phy: &'a mut Phy,
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.packet)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let phy = self.phy;
        let off = phy.batch_len;
        let end = off + HEADROOM + len + TAILROOM;
        if phy.batch.len() < end {
            phy.batch.resize(end, 0);
        }
        let r = f(&mut phy.batch[off + HEADROOM..off + HEADROOM + len]);
        phy.seal(len);
        r
    }
}

impl phy::Device for Phy {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken { packet }, TxToken { phy: self }))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        Some(TxToken { phy: self })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // The tunnel authenticates every packet: checksums cannot catch
        // anything the AEAD did not, so smoltcp skips verifying them.
        caps.checksum = phy::ChecksumCapabilities::ignored();
        caps.checksum.ipv4 = phy::Checksum::Tx;
        caps.checksum.tcp = phy::Checksum::Tx;
        caps.checksum.udp = phy::Checksum::Tx;
        caps.checksum.icmpv4 = phy::Checksum::Tx;
        caps.checksum.icmpv6 = phy::Checksum::Tx;
        caps
    }
}
