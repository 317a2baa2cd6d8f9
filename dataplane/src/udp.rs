//! The UDP side of the data plane: a dual-stack socket with the kernel's UDP
//! segmentation offloads probed at start (GSO for sending many datagrams in
//! one call, GRO for receiving many in one), and the control-message
//! plumbing both need.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::mem::size_of;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// `UDP_SEGMENT`: the GSO segment size of a send (linux/udp.h).
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO`: receive coalesced datagrams with their segment size (linux/udp.h).
const UDP_GRO: libc::c_int = 104;

/// Space for the control messages of one send or receive: one `u16` segment
/// size (send) or one `int` (receive), with room to spare.
pub const CMSG_SPACE: usize = 64;

/// A bound dual-stack UDP socket and the offloads it accepted.
#[derive(Debug)]
pub struct UdpSock {
    socket: Socket,
    /// Whether sends may carry `UDP_SEGMENT` (turned off after an EIO).
    pub gso: bool,
    /// Whether receives may return coalesced datagrams.
    pub gro: bool,
    /// Whether the socket is IPv6 (dual-stack) rather than IPv4 only.
    pub ipv6: bool,
    port: u16,
}

impl UdpSock {
    /// Binds port `port` (0: any) on all addresses, dual-stack where IPv6
    /// exists, non-blocking, with `fwmark` (0: none), and probes GSO and GRO.
    pub fn bind(port: u16, fwmark: u32) -> io::Result<UdpSock> {
        let (socket, ipv6) = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
            Ok(s) => {
                s.set_only_v6(false)?;
                s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
                (s, true)
            }
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
                (s, false)
            }
            Err(e) => return Err(e),
        };
        socket.set_nonblocking(true)?;
        // Deep buffers: the data plane sends and receives in large batches.
        let _ = socket.set_send_buffer_size(8 << 20);
        let _ = socket.set_recv_buffer_size(8 << 20);
        if fwmark != 0 {
            socket.set_mark(fwmark)?;
        }
        let port = socket.local_addr()?.as_socket().map(|a| a.port()).unwrap_or(port);
        let fd = socket.as_raw_fd();
        let gro = setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 1).is_ok();
        // A zero segment size is accepted by kernels that know UDP_SEGMENT.
        let gso = setsockopt_int(fd, libc::SOL_UDP, UDP_SEGMENT, 0).is_ok();
        Ok(UdpSock { socket, gso, gro, ipv6, port })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sets the firewall mark of outgoing packets (0 clears it).
    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.socket.set_mark(mark)
    }

    /// The raw descriptor, for io_uring.
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Encodes `addr` for this socket's family (IPv4 as mapped on a dual-stack socket).
    pub fn encode(&self, addr: SocketAddr, out: &mut libc::sockaddr_in6) -> libc::socklen_t {
        encode_addr(addr, self.ipv6, out)
    }

    /// Sends one datagram now (outside io_uring), for fallbacks.
    pub fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        let to = if self.ipv6 { SocketAddr::V6(to_v6(to)) } else { to };
        self.socket.send_to(buf, &to.into())
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), size_of::<libc::c_int>() as u32)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn to_v6(addr: SocketAddr) -> SocketAddrV6 {
    match addr {
        SocketAddr::V6(a) => a,
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
    }
}

/// Writes `addr` as a `sockaddr_in6` (or `sockaddr_in` in its first bytes
/// when `ipv6` is false) and returns its length.
pub fn encode_addr(addr: SocketAddr, ipv6: bool, out: &mut libc::sockaddr_in6) -> libc::socklen_t {
    if ipv6 {
        let a = to_v6(addr);
        out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        out.sin6_port = a.port().to_be();
        out.sin6_flowinfo = 0;
        out.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
        out.sin6_scope_id = a.scope_id();
        size_of::<libc::sockaddr_in6>() as libc::socklen_t
    } else {
        let SocketAddr::V4(a) = addr else {
            // An IPv6 destination on an IPv4-only socket: unreachable, the
            // kernel will refuse the empty family.
            out.sin6_family = 0;
            return size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in is smaller than sockaddr_in6 and both are plain data.
        unsafe { std::ptr::write((out as *mut libc::sockaddr_in6).cast::<libc::sockaddr_in>(), sin) };
        size_of::<libc::sockaddr_in>() as libc::socklen_t
    }
}

/// Reads a received `sockaddr` back into a `SocketAddr`, unmapping IPv4.
pub fn decode_addr(raw: &libc::sockaddr_in6) -> Option<SocketAddr> {
    match i32::from(raw.sin6_family) {
        libc::AF_INET6 => {
            let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
            let port = u16::from_be(raw.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, raw.sin6_scope_id)),
            })
        }
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in at the start of the storage.
            let sin = unsafe { &*(raw as *const libc::sockaddr_in6).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                sin.sin_addr.s_addr.to_ne_bytes().into(),
                u16::from_be(sin.sin_port),
            )))
        }
        _ => None,
    }
}

/// Writes a `UDP_SEGMENT` control message for `segment` into `buf` and
/// returns the control length to put in the `msghdr`.
pub fn write_gso_cmsg(buf: &mut [u8; CMSG_SPACE], segment: u16) -> usize {
    buf.fill(0);
    // SAFETY: CMSG_SPACE(2) is far below 64 bytes; the header is written
    // through the libc macros into a buffer that is large and aligned enough
    // (the caller's buffer is 8-aligned, see `Aligned`).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        msg.msg_controllen
    }
}

/// The GRO segment size in a received message's control data, if any.
///
/// # Safety
/// `msg` must describe control data the kernel filled in (its
/// `msg_control` pointing to at least `msg_controllen` readable bytes).
pub unsafe fn read_gro_cmsg(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: per the function's contract, the control buffer is valid.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}
