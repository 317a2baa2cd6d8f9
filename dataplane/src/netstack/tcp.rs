//! TCP over the netstack: listeners and streams for tokio.

use super::stack::Shared;
use super::{Netstack, PeerInfo};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, RecvError, State};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A TCP listener on one port of the node's tailnet addresses.
pub struct TcpListener {
    stack: Netstack,
    port: u16,
}

/// A TCP connection through the tunnel. Dropping it closes it gracefully
/// (FIN); [`TcpStream::abort`] resets it (RST).
pub struct TcpStream {
    stack: Netstack,
    handle: Option<SocketHandle>,
    local: SocketAddr,
    remote: SocketAddr,
    /// The local port to free on release (outbound connections only).
    own_port: Option<u16>,
}

fn unspecified(like: std::net::IpAddr) -> std::net::IpAddr {
    match like {
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

fn endpoint(ep: IpEndpoint) -> SocketAddr {
    SocketAddr::new(ep.addr.into(), ep.port)
}

impl TcpListener {
    pub(crate) fn bind(stack: &Netstack, port: u16) -> io::Result<TcpListener> {
        if stack.is_stopped() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "the netstack was shut down"));
        }
        if port == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "listen_tcp needs a port"));
        }
        stack.shared.with(|inner| {
            if inner.listeners.contains_key(&port) || inner.ports.contains(&port) {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("TCP port {port} is in use")));
            }
            inner
                .listeners
                .insert(port, super::stack::Listener { backlog: Vec::new(), ready: Default::default(), waker: None });
            Ok(())
        })?;
        Ok(TcpListener { stack: stack.clone(), port })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next connection.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        let shared = &self.stack.shared;
        let mut inner = shared.lock();
        if shared.stopped() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "the netstack was shut down")));
        }
        let inner = &mut *inner;
        if !inner.listeners.contains_key(&self.port) {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        }
        while let Some(h) = inner.listeners.get_mut(&self.port).and_then(|l| l.ready.pop_front()) {
            let s = inner.sockets.get::<tcp::Socket>(h);
            match (s.local_endpoint(), s.remote_endpoint()) {
                (Some(local), Some(remote)) => {
                    let stream = TcpStream {
                        stack: self.stack.clone(),
                        handle: Some(h),
                        local: endpoint(local),
                        remote: endpoint(remote),
                        own_port: None,
                    };
                    return Poll::Ready(Ok((stream, endpoint(remote))));
                }
                // Reset before it was accepted: nothing to hand out.
                _ => inner.release(h, None),
            }
        }
        let Some(l) = inner.listeners.get_mut(&self.port) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        l.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        self.stack.shared.with(|inner| {
            if let Some(l) = inner.listeners.remove(&self.port) {
                let handles: Vec<_> = l.backlog.into_iter().chain(l.ready).collect();
                for &h in &handles {
                    inner.sockets.get_mut::<tcp::Socket>(h).abort();
                }
                inner.pump();
                for h in handles {
                    inner.release(h, None);
                }
            }
        });
    }
}

impl TcpStream {
    pub(crate) async fn connect(stack: &Netstack, remote: SocketAddr) -> io::Result<TcpStream> {
        if stack.is_stopped() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "the netstack was shut down"));
        }
        let (handle, port) = stack.shared.with(|inner| {
            let port = inner
                .ephemeral_port()
                .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "no free local port"))?;
            let mut s = inner.tcp_socket();
            let cx = inner.iface.context();
            let remote_ep = IpEndpoint::new(remote.ip().into(), remote.port());
            if let Err(e) = s.connect(cx, remote_ep, IpListenEndpoint { addr: None, port }) {
                inner.ports.remove(&port);
                let kind = match e {
                    tcp::ConnectError::Unaddressable => io::ErrorKind::AddrNotAvailable,
                    tcp::ConnectError::InvalidState => io::ErrorKind::InvalidInput,
                };
                return Err(io::Error::new(kind, format!("cannot connect to {remote}: {e}")));
            }
            Ok((inner.sockets.add(s), port))
        })?;
        let mut stream = TcpStream {
            stack: stack.clone(),
            handle: Some(handle),
            // The source address is smoltcp's choice, known once connected.
            local: SocketAddr::new(unspecified(remote.ip()), port),
            remote,
            own_port: Some(port),
        };
        let local = poll_fn(|cx| {
            let mut inner = stack.shared.lock();
            let s = inner.sockets.get_mut::<tcp::Socket>(handle);
            match s.state() {
                State::SynSent | State::SynReceived => {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
                // The peer answered with RST (nothing listens) or the SYN timed out.
                State::Closed => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("connection to {remote} refused"),
                ))),
                _ => Poll::Ready(Ok(s.local_endpoint())),
            }
        })
        .await?;
        if let Some(l) = local {
            stream.local = endpoint(l);
        }
        Ok(stream)
    }

    /// The local address and port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The remote address and port.
    pub fn peer_addr(&self) -> SocketAddr {
        self.remote
    }

    /// Which peer (WireGuard key, and the address seen) the connection is
    /// with, by cryptokey routing of its remote address.
    pub fn peer(&self) -> Option<PeerInfo> {
        self.stack.peer_of(self.remote.ip())
    }

    /// Resets the connection (RST) instead of closing it.
    pub fn abort(mut self) {
        if let Some(h) = self.handle.take() {
            let own = self.own_port;
            self.stack.shared.with(|inner| {
                inner.sockets.get_mut::<tcp::Socket>(h).abort();
                // The RST leaves now, before the socket is forgotten.
                inner.pump();
                inner.release(h, own);
            });
        }
    }

    fn handle(&self) -> io::Result<SocketHandle> {
        self.handle.ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

fn shared(s: &TcpStream) -> &Arc<Shared> {
    &s.stack.shared
}

impl AsyncRead for TcpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let h = self.handle()?;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let r = {
            let mut inner = shared(&self).lock();
            let s = inner.sockets.get_mut::<tcp::Socket>(h);
            match s.recv_slice(buf.initialize_unfilled()) {
                Ok(0) => {
                    s.register_recv_waker(cx.waker());
                    return Poll::Pending;
                }
                Ok(n) => Ok(n),
                Err(RecvError::Finished) => Ok(0),
                Err(RecvError::InvalidState) if s.state() == State::Closed => {
                    Err(io::Error::new(io::ErrorKind::ConnectionReset, "connection reset by peer"))
                }
                Err(RecvError::InvalidState) => {
                    s.register_recv_waker(cx.waker());
                    return Poll::Pending;
                }
            }
        };
        match r {
            Ok(n) => {
                buf.advance(n);
                // The window opened: tell the sender (at once if it was shut).
                shared(&self).with(|_| ());
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let h = self.handle()?;
        shared(&self).with(|inner| {
            let s = inner.sockets.get_mut::<tcp::Socket>(h);
            if !s.may_send() {
                return match s.state() {
                    State::SynSent | State::SynReceived => {
                        s.register_send_waker(cx.waker());
                        Poll::Pending
                    }
                    State::Closed => {
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "connection reset by peer")))
                    }
                    _ => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the connection is closed"))),
                };
            }
            match s.send_slice(data) {
                Ok(0) => {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
                Ok(n) => Poll::Ready(Ok(n)),
                Err(_) => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the connection is closed"))),
            }
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already in smoltcp's send buffer, as with a kernel socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let h = self.handle()?;
        shared(&self).with(|inner| inner.sockets.get_mut::<tcp::Socket>(h).close());
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let own = self.own_port;
            self.stack.shared.with(|inner| inner.release(h, own));
        }
    }
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream").field("local", &self.local).field("remote", &self.remote).finish()
    }
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener").field("port", &self.port).finish()
    }
}
