//! UDP over the netstack.

use super::{Netstack, PeerInfo};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp::{self, RecvError, SendError};
use smoltcp::wire::IpEndpoint;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};

/// A UDP socket bound to one port of the node's tailnet addresses.
pub struct UdpSocket {
    stack: Netstack,
    handle: SocketHandle,
    port: u16,
    /// Whether the port was drawn from the ephemeral range (freed on drop).
    ephemeral: bool,
}

impl UdpSocket {
    pub(crate) fn bind(stack: &Netstack, port: u16) -> io::Result<UdpSocket> {
        if stack.is_stopped() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "the netstack was shut down"));
        }
        let handle = stack.shared.with(|inner| {
            let port = match port {
                0 => inner
                    .ephemeral_port()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "no free local port"))?,
                p => p,
            };
            let taken = inner.sockets.iter().any(|(_, s)| match s {
                smoltcp::socket::Socket::Udp(u) => u.endpoint().port == port,
                _ => false,
            });
            if taken {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("UDP port {port} is in use")));
            }
            let o = &inner.options;
            let rx = udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; o.udp_buffer_packets],
                vec![0u8; o.udp_buffer_bytes],
            );
            let tx = udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; o.udp_buffer_packets],
                vec![0u8; o.udp_buffer_bytes],
            );
            let mut s = udp::Socket::new(rx, tx);
            s.bind(port).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            Ok((inner.sockets.add(s), port))
        })?;
        Ok(UdpSocket { stack: stack.clone(), handle: handle.0, port: handle.1, ephemeral: port == 0 })
    }

    /// The port bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Receives one datagram into `buf` (truncated if it is longer).
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        poll_fn(|cx| self.poll_recv_from(cx, buf)).await
    }

    /// Polls for one datagram.
    pub fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>> {
        let mut inner = self.stack.shared.lock();
        if self.stack.shared.stopped() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "the netstack was shut down")));
        }
        let s = inner.sockets.get_mut::<udp::Socket>(self.handle);
        match s.recv_slice(buf) {
            Ok((n, meta)) => Poll::Ready(Ok((n, SocketAddr::new(meta.endpoint.addr.into(), meta.endpoint.port)))),
            Err(RecvError::Exhausted) => {
                s.register_recv_waker(cx.waker());
                Poll::Pending
            }
            Err(RecvError::Truncated) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the datagram is larger than the buffer (dropped)",
            ))),
        }
    }

    /// Sends one datagram to `to`.
    pub async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        poll_fn(|cx| self.poll_send_to(cx, data, to)).await
    }

    /// Polls to send one datagram.
    pub fn poll_send_to(&self, cx: &mut Context<'_>, data: &[u8], to: SocketAddr) -> Poll<io::Result<usize>> {
        if self.stack.shared.stopped() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "the netstack was shut down")));
        }
        self.stack.shared.with(|inner| {
            let s = inner.sockets.get_mut::<udp::Socket>(self.handle);
            match s.send_slice(data, IpEndpoint::new(to.ip().into(), to.port())) {
                Ok(()) => Poll::Ready(Ok(data.len())),
                Err(SendError::BufferFull) if data.len() <= s.payload_send_capacity() => {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
                Err(SendError::BufferFull) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the datagram is larger than the send buffer",
                ))),
                Err(SendError::Unaddressable) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("cannot send to {to}: no tailnet address of that family"),
                ))),
            }
        })
    }

    /// Which peer an address belongs to (see [`Netstack::peer_of`]).
    pub fn peer_of(&self, from: SocketAddr) -> Option<PeerInfo> {
        self.stack.peer_of(from.ip())
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        let (h, port, ephemeral) = (self.handle, self.port, self.ephemeral);
        self.stack.shared.with(|inner| {
            inner.sockets.remove(h);
            if ephemeral {
                inner.ports.remove(&port);
            }
        });
    }
}

impl std::fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSocket").field("port", &self.port).finish()
    }
}
