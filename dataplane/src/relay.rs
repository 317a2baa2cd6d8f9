//! The link between the data plane's worker and a relay client task.
//!
//! A peer whose chosen path is the relay has the marker endpoint
//! [`RELAY_ENDPOINT`]; datagrams for it cannot go out on the UDP socket.
//! The worker hands them to a [`RelayLink`] instead (the peer's node key and
//! the bytes), and a relay client task, holding the other end, a
//! [`RelayPort`], sends them as relay frames. Frames the relay delivers go
//! the other way: the task pushes them into the port, which wakes the
//! worker, and the worker drains them with [`RelayLink::try_recv`] and treats
//! each as a datagram from [`RELAY_ENDPOINT`].
//!
//! Both directions are bounded. The worker never waits: an outbound datagram
//! that finds the queue full (or no task at the other end) is dropped and
//! counted, as a full socket buffer drops a UDP datagram. The task may wait
//! for room inbound ([`RelayPort::deliver`]), which slows its reading of the
//! relay's TCP stream instead of losing frames the relay already carried.
//!
//! Nothing here runs unless its owner makes a link; the worker's path for
//! direct peers does not pass through it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use wiremesh_core::keys::PublicKey;

pub use wiremesh_core::disco::RELAY_ENDPOINT;

/// The largest datagram carried in one relay frame (the relay's own limit).
pub const MAX_RELAY_DATAGRAM: usize = 4096;

/// Datagrams queued in each direction before the worker drops outbound
/// ones (and the task waits inbound).
pub const DEFAULT_QUEUE: usize = 1024;

/// One datagram to or from a peer through the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayDatagram {
    /// The peer's node key: the destination outbound, the sender inbound.
    pub peer: PublicKey,
    /// The datagram, 1 to [`MAX_RELAY_DATAGRAM`] bytes.
    pub bytes: Vec<u8>,
}

/// The link's counters, shared by both ends.
#[derive(Debug, Default)]
pub struct RelayLinkStats {
    /// Datagrams the worker queued for the relay.
    pub sent: AtomicU64,
    /// Outbound datagrams dropped: queue full or no task at the other end.
    pub send_dropped: AtomicU64,
    /// Datagrams refused for their length (empty or over the limit).
    pub bad_length: AtomicU64,
    /// Datagrams from the relay handed to the worker.
    pub received: AtomicU64,
}

/// A snapshot of [`RelayLinkStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayLinkCounts {
    /// See [`RelayLinkStats::sent`].
    pub sent: u64,
    /// See [`RelayLinkStats::send_dropped`].
    pub send_dropped: u64,
    /// See [`RelayLinkStats::bad_length`].
    pub bad_length: u64,
    /// See [`RelayLinkStats::received`].
    pub received: u64,
}

impl RelayLinkStats {
    /// The counters now.
    pub fn snapshot(&self) -> RelayLinkCounts {
        RelayLinkCounts {
            sent: self.sent.load(Ordering::Relaxed),
            send_dropped: self.send_dropped.load(Ordering::Relaxed),
            bad_length: self.bad_length.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// The worker's end: never blocks.
pub struct RelayLink {
    out: mpsc::Sender<RelayDatagram>,
    inbound: mpsc::Receiver<RelayDatagram>,
    stats: Arc<RelayLinkStats>,
}

/// The relay client task's end.
pub struct RelayPort {
    out: mpsc::Receiver<RelayDatagram>,
    inbound: mpsc::Sender<RelayDatagram>,
    wake: Arc<dyn Fn() + Send + Sync>,
    stats: Arc<RelayLinkStats>,
}

/// A link with `capacity` datagrams queued each way (at least 1); `wake` is
/// called after each datagram delivered to the worker (the worker's eventfd).
pub fn link(capacity: usize, wake: Arc<dyn Fn() + Send + Sync>) -> (RelayLink, RelayPort) {
    let capacity = capacity.max(1);
    let (out_tx, out_rx) = mpsc::channel(capacity);
    let (in_tx, in_rx) = mpsc::channel(capacity);
    let stats = Arc::new(RelayLinkStats::default());
    (
        RelayLink { out: out_tx, inbound: in_rx, stats: stats.clone() },
        RelayPort { out: out_rx, inbound: in_tx, wake, stats },
    )
}

fn length_ok(len: usize) -> bool {
    (1..=MAX_RELAY_DATAGRAM).contains(&len)
}

impl RelayLink {
    /// Queues `bytes` for `peer` through the relay; `false` (counted) when
    /// the length is out of bounds, the queue is full or the task is gone.
    pub fn send(&self, peer: PublicKey, bytes: &[u8]) -> bool {
        if !length_ok(bytes.len()) {
            self.stats.bad_length.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.out.try_send(RelayDatagram { peer, bytes: bytes.to_vec() }) {
            Ok(()) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.send_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// The next datagram the relay delivered, if any.
    pub fn try_recv(&mut self) -> Option<RelayDatagram> {
        self.inbound.try_recv().ok()
    }

    /// Whether the task at the other end is gone.
    pub fn is_closed(&self) -> bool {
        self.out.is_closed()
    }

    /// The link's counters.
    pub fn stats(&self) -> RelayLinkCounts {
        self.stats.snapshot()
    }
}

impl RelayPort {
    /// The next datagram the worker queued for the relay; `None` once the
    /// worker's end is gone.
    pub async fn next_outbound(&mut self) -> Option<RelayDatagram> {
        self.out.recv().await
    }

    /// Another queued outbound datagram without waiting (to batch frames
    /// before one flush).
    pub fn try_next_outbound(&mut self) -> Option<RelayDatagram> {
        self.out.try_recv().ok()
    }

    /// Hands a datagram from `peer` to the worker, waiting for room, and
    /// wakes it. `false` when the length is out of bounds (counted, nothing
    /// delivered) or the worker's end is gone.
    pub async fn deliver(&self, peer: PublicKey, bytes: &[u8]) -> bool {
        deliver(&self.inbound, &self.wake, &self.stats, peer, bytes).await
    }

    /// A handle that delivers to the worker like [`RelayPort::deliver`],
    /// for a task that reads the relay's stream while another part of it
    /// waits on [`RelayPort::next_outbound`].
    pub fn deliverer(&self) -> RelayDeliverer {
        RelayDeliverer { inbound: self.inbound.clone(), wake: self.wake.clone(), stats: self.stats.clone() }
    }

    /// Whether the worker's end is gone.
    pub fn is_closed(&self) -> bool {
        self.inbound.is_closed()
    }

    /// The link's counters.
    pub fn stats(&self) -> RelayLinkCounts {
        self.stats.snapshot()
    }
}

/// Delivers datagrams from the relay to the worker (see
/// [`RelayPort::deliverer`]).
#[derive(Clone)]
pub struct RelayDeliverer {
    inbound: mpsc::Sender<RelayDatagram>,
    wake: Arc<dyn Fn() + Send + Sync>,
    stats: Arc<RelayLinkStats>,
}

impl RelayDeliverer {
    /// As [`RelayPort::deliver`].
    pub async fn deliver(&self, peer: PublicKey, bytes: &[u8]) -> bool {
        deliver(&self.inbound, &self.wake, &self.stats, peer, bytes).await
    }
}

async fn deliver(
    inbound: &mpsc::Sender<RelayDatagram>,
    wake: &Arc<dyn Fn() + Send + Sync>,
    stats: &RelayLinkStats,
    peer: PublicKey,
    bytes: &[u8],
) -> bool {
    if !length_ok(bytes.len()) {
        stats.bad_length.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if inbound.send(RelayDatagram { peer, bytes: bytes.to_vec() }).await.is_err() {
        return false;
    }
    stats.received.fetch_add(1, Ordering::Relaxed);
    wake();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn counting() -> (Arc<AtomicUsize>, Arc<dyn Fn() + Send + Sync>) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (
            n,
            Arc::new(move || {
                m.fetch_add(1, Ordering::Relaxed);
            }),
        )
    }

    #[tokio::test]
    async fn outbound_is_bounded_and_drops_are_counted() {
        let (_, wake) = counting();
        let (link, mut port) = link(2, wake);
        assert!(link.send(key(1), b"one"));
        assert!(link.send(key(2), b"two"));
        // Full: the worker does not wait, the datagram is dropped.
        assert!(!link.send(key(3), b"three"));
        assert_eq!(link.stats(), RelayLinkCounts { sent: 2, send_dropped: 1, bad_length: 0, received: 0 });
        assert_eq!(port.next_outbound().await, Some(RelayDatagram { peer: key(1), bytes: b"one".to_vec() }));
        assert_eq!(port.try_next_outbound(), Some(RelayDatagram { peer: key(2), bytes: b"two".to_vec() }));
        assert_eq!(port.try_next_outbound(), None);
        // Room again.
        assert!(link.send(key(3), b"three"));
        assert_eq!(port.try_next_outbound().map(|d| d.peer), Some(key(3)));
    }

    #[tokio::test]
    async fn lengths_are_checked_both_ways() {
        let (woken, wake) = counting();
        let (link, mut port) = link(4, wake);
        assert!(!link.send(key(1), &[]));
        assert!(!link.send(key(1), &vec![0u8; MAX_RELAY_DATAGRAM + 1]));
        assert!(link.send(key(1), &vec![7u8; MAX_RELAY_DATAGRAM]));
        assert!(!port.deliver(key(2), &[]).await);
        assert!(!port.deliver(key(2), &vec![0u8; MAX_RELAY_DATAGRAM + 1]).await);
        assert_eq!(woken.load(Ordering::Relaxed), 0);
        let s = port.stats();
        assert_eq!((s.sent, s.bad_length, s.received), (1, 4, 0));
        assert_eq!(port.try_next_outbound().map(|d| d.bytes.len()), Some(MAX_RELAY_DATAGRAM));
    }

    #[tokio::test]
    async fn inbound_wakes_the_worker_and_keeps_order() {
        let (woken, wake) = counting();
        let (mut link, port) = link(4, wake);
        assert_eq!(link.try_recv(), None);
        assert!(port.deliver(key(9), b"a").await);
        assert!(port.deliver(key(8), b"b").await);
        assert_eq!(woken.load(Ordering::Relaxed), 2);
        assert_eq!(link.try_recv(), Some(RelayDatagram { peer: key(9), bytes: b"a".to_vec() }));
        assert_eq!(link.try_recv(), Some(RelayDatagram { peer: key(8), bytes: b"b".to_vec() }));
        assert_eq!(link.try_recv(), None);
        assert_eq!(link.stats().received, 2);
    }

    /// A full inbound queue makes the task wait (no frame lost) until the
    /// worker drains one.
    #[tokio::test]
    async fn a_full_inbound_queue_waits_for_the_worker() {
        let (_, wake) = counting();
        let (mut link, port) = link(1, wake);
        assert!(port.deliver(key(1), b"first").await);
        let port = Arc::new(port);
        let p = port.clone();
        let second = tokio::spawn(async move { p.deliver(key(1), b"second").await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!second.is_finished());
        assert_eq!(link.try_recv().map(|d| d.bytes), Some(b"first".to_vec()));
        assert!(second.await.unwrap());
        assert_eq!(link.try_recv().map(|d| d.bytes), Some(b"second".to_vec()));
    }

    #[tokio::test]
    async fn a_closed_end_is_seen_and_counted() {
        let (_, wake) = counting();
        let (link, port) = super::link(4, wake);
        drop(port);
        assert!(link.is_closed());
        assert!(!link.send(key(1), b"x"));
        assert_eq!(link.stats().send_dropped, 1);
        let (_, wake) = counting();
        let (link, port) = super::link(4, wake);
        drop(link);
        assert!(port.is_closed());
        assert!(!port.deliver(key(1), b"x").await);
    }
}
