//! Linux TUN devices, opened with our own ioctls, with virtio-net offloads.
//!
//! With [`Options::vnet_hdr`] every packet read from the device starts with a
//! [`VirtioNetHdr`], and so must every packet written to it. Offloads turned
//! on with `TUNSETOFFLOAD` let the kernel hand us TCP (and UDP) super-packets
//! of up to 64 KiB with partial checksums, one read for up to ~45 wire
//! packets; [`split`] turns them into wire-sized packets. Which offloads a
//! kernel accepts is probed at [`Tun::create`], falling back step by step
//! (USO needs Linux 6.2).

mod checksum;
mod gso;
mod virtio;

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub use checksum::internet_checksum;
pub use gso::{complete_checksum, segment_count, split, GsoError};
pub use virtio::{HeaderTooShort, VirtioNetHdr};

const TUN_PATH: &CStr = c"/dev/net/tun";

/// A set of `TUNSETOFFLOAD` features.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Offloads(u32);

impl Offloads {
    /// No offloads: every packet arrives complete, with a valid checksum.
    pub const NONE: Offloads = Offloads(0);
    /// Partial checksums (`TUN_F_CSUM`); the others need it.
    pub const CSUM: Offloads = Offloads(libc::TUN_F_CSUM);
    /// IPv4 TCP segmentation offload (`TUN_F_TSO4`).
    pub const TSO4: Offloads = Offloads(libc::TUN_F_TSO4);
    /// IPv6 TCP segmentation offload (`TUN_F_TSO6`).
    pub const TSO6: Offloads = Offloads(libc::TUN_F_TSO6);
    /// IPv4 UDP segmentation offload (`TUN_F_USO4`, Linux 6.2+).
    pub const USO4: Offloads = Offloads(libc::TUN_F_USO4);
    /// IPv6 UDP segmentation offload (`TUN_F_USO6`, Linux 6.2+).
    pub const USO6: Offloads = Offloads(libc::TUN_F_USO6);
    /// Everything [`split`] handles.
    pub const ALL: Offloads =
        Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_USO4 | libc::TUN_F_USO6);

    /// The raw `TUN_F_*` bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether every feature in `other` is in `self`.
    pub fn contains(self, other: Offloads) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` without the features in `other`.
    pub fn without(self, other: Offloads) -> Offloads {
        Offloads(self.0 & !other.0)
    }

    /// The probe order: what was asked for, then without USO, then checksum
    /// only, then nothing. Segmentation is only asked for with checksums,
    /// which the kernel requires.
    fn fallbacks(self) -> impl Iterator<Item = Offloads> {
        let segmentation = Offloads::TSO4 | Offloads::TSO6 | Offloads::USO4 | Offloads::USO6;
        let asked = if self.0 & segmentation.0 != 0 { self | Offloads::CSUM } else { self };
        let candidates =
            [asked, asked.without(Offloads::USO4 | Offloads::USO6), asked.without(segmentation), Offloads::NONE];
        let mut seen = Vec::with_capacity(candidates.len());
        candidates.into_iter().filter(move |c| {
            let new = !seen.contains(c);
            seen.push(*c);
            new
        })
    }
}

impl BitOr for Offloads {
    type Output = Offloads;
    fn bitor(self, rhs: Offloads) -> Offloads {
        Offloads(self.0 | rhs.0)
    }
}

impl BitOrAssign for Offloads {
    fn bitor_assign(&mut self, rhs: Offloads) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for Offloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Offloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Offloads::CSUM, "csum"),
            (Offloads::TSO4, "tso4"),
            (Offloads::TSO6, "tso6"),
            (Offloads::USO4, "uso4"),
            (Offloads::USO6, "uso6"),
        ];
        let mut first = true;
        for (flag, name) in names {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// How to open a TUN device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Prefix every packet with a [`VirtioNetHdr`] (`IFF_VNET_HDR`); needed
    /// for any offload.
    pub vnet_hdr: bool,
    /// Offloads to ask for (ignored without `vnet_hdr`); the kernel may grant
    /// fewer, see [`Tun::offloads`].
    pub offloads: Offloads,
    /// Allow more queues (`IFF_MULTI_QUEUE`), one per worker, opened with
    /// [`Tun::open_queue`].
    pub multi_queue: bool,
    /// Open the file descriptor non-blocking (`O_NONBLOCK`).
    pub nonblocking: bool,
}

impl Options {
    /// Virtio-net headers with every offload [`split`] handles.
    pub fn with_offloads() -> Self {
        Options { vnet_hdr: true, offloads: Offloads::ALL, ..Options::default() }
    }
}

/// Why a TUN device could not be opened or configured.
#[derive(Debug)]
#[non_exhaustive]
pub enum TunError {
    /// The name is not a valid interface name.
    InvalidName(String),
    /// Another device (a TUN device in use, or another kind) has the name.
    Exists(String),
    /// `/dev/net/tun` cannot be opened: no TUN driver, or no device node.
    Missing(io::Error),
    /// The caller lacks `CAP_NET_ADMIN`.
    NeedsCapNetAdmin(String, io::Error),
    /// Another failure of the named operation.
    Io {
        /// What we were doing.
        op: &'static str,
        /// The system's error.
        source: io::Error,
    },
}

impl fmt::Display for TunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunError::InvalidName(name) => write!(f, "invalid interface name {name:?}"),
            TunError::Exists(name) => write!(f, "interface {name} already exists"),
            TunError::Missing(e) => write!(f, "TUN is missing: cannot open /dev/net/tun: {e}"),
            TunError::NeedsCapNetAdmin(name, e) => {
                write!(f, "creating TUN device {name} needs CAP_NET_ADMIN: {e}")
            }
            TunError::Io { op, source } => write!(f, "{op}: {source}"),
        }
    }
}

impl std::error::Error for TunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TunError::Missing(e) | TunError::NeedsCapNetAdmin(_, e) | TunError::Io { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

/// One queue of a TUN device; the device goes away when the last queue of a
/// non-persistent device is closed.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    flags: libc::c_int,
    nonblocking: bool,
    offloads: Offloads,
}

impl Tun {
    /// Creates the TUN device `name` (or attaches to a persistent one that
    /// no process holds, as wireguard-go does) and probes the offloads.
    /// `name` may be empty or hold `%d` for the kernel to pick.
    pub fn create(name: &str, options: &Options) -> Result<Tun, TunError> {
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if options.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        if options.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut tun = Tun::attach(name, flags, options.nonblocking)?;
        if options.vnet_hdr {
            let size = VirtioNetHdr::LEN as libc::c_int;
            // SAFETY: the fd is a TUN fd we own; TUNSETVNETHDRSZ reads one
            // c_int through the pointer, which is valid for the call.
            let rc = unsafe { libc::ioctl(tun.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) };
            if rc < 0 {
                return Err(io_error("TUNSETVNETHDRSZ"));
            }
            tun.offloads = tun.probe_offloads(options.offloads)?;
        }
        Ok(tun)
    }

    /// Opens one more queue of this multi-queue device, for another worker.
    pub fn open_queue(&self) -> Result<Tun, TunError> {
        let mut queue = Tun::attach(&self.name, self.flags, self.nonblocking)?;
        // Offloads and the header size belong to the device, not the queue.
        queue.offloads = self.offloads;
        Ok(queue)
    }

    fn attach(name: &str, flags: libc::c_int, nonblocking: bool) -> Result<Tun, TunError> {
        let mut req = ifreq(name)?;
        let mut open_flags = libc::O_RDWR | libc::O_CLOEXEC;
        if nonblocking {
            open_flags |= libc::O_NONBLOCK;
        }
        // SAFETY: TUN_PATH is a NUL-terminated string; open has no other
        // preconditions.
        let raw = unsafe { libc::open(TUN_PATH.as_ptr(), open_flags) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TunError::NeedsCapNetAdmin(name.to_string(), e),
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TunError::Missing(e),
                _ => TunError::Io { op: "open /dev/net/tun", source: e },
            });
        }
        // SAFETY: `raw` is a file descriptor we just opened and own alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
        // is, valid for the duration of the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TunError::Exists(name.to_string()),
                Some(libc::EPERM | libc::EACCES) => TunError::NeedsCapNetAdmin(name.to_string(), e),
                // EINVAL also means the name belongs to a non-TUN device
                // (or a TUN device with other queue flags).
                Some(libc::EINVAL) if interface_index(name).is_ok() => TunError::Exists(name.to_string()),
                _ => TunError::Io { op: "TUNSETIFF", source: e },
            });
        }
        Ok(Tun { fd, name: ifreq_name(&req), flags, nonblocking, offloads: Offloads::NONE })
    }

    fn probe_offloads(&self, wanted: Offloads) -> Result<Offloads, TunError> {
        let mut last = None;
        for candidate in wanted.fallbacks() {
            // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
            // passed.
            let rc = unsafe {
                libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD as _, libc::c_ulong::from(candidate.bits()))
            };
            if rc == 0 {
                return Ok(candidate);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(TunError::Io { op: "TUNSETOFFLOAD", source: e });
            }
            last = Some(e);
        }
        Err(TunError::Io {
            op: "TUNSETOFFLOAD",
            source: last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
        })
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether packets carry a [`VirtioNetHdr`].
    pub fn vnet_hdr(&self) -> bool {
        self.flags & libc::IFF_VNET_HDR != 0
    }

    /// The offloads the kernel accepted.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// The interface index.
    pub fn index(&self) -> io::Result<u32> {
        interface_index(&self.name)
    }

    /// The MTU.
    pub fn mtu(&self) -> io::Result<u32> {
        let mut req = ifreq(&self.name).map_err(tun_to_io)?;
        control_ioctl(libc::SIOCGIFMTU as _, &mut req)?;
        // SAFETY: SIOCGIFMTU filled in the `ifru_mtu` member.
        Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
    }

    /// Sets the MTU (the largest IP packet the kernel will hand us, GSO aside).
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let mut req = ifreq(&self.name).map_err(tun_to_io)?;
        req.ifr_ifru.ifru_mtu =
            libc::c_int::try_from(mtu).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "MTU out of range"))?;
        control_ioctl(libc::SIOCSIFMTU as _, &mut req)
    }

    /// Brings the interface up or down.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        let mut req = ifreq(&self.name).map_err(tun_to_io)?;
        control_ioctl(libc::SIOCGIFFLAGS as _, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled in the `ifru_flags` member.
        let mut flags = unsafe { req.ifr_ifru.ifru_flags };
        if up {
            flags |= libc::IFF_UP as libc::c_short;
        } else {
            flags &= !(libc::IFF_UP as libc::c_short);
        }
        req.ifr_ifru.ifru_flags = flags;
        control_ioctl(libc::SIOCSIFFLAGS as _, &mut req)
    }

    /// Switches the descriptor between blocking and non-blocking.
    pub fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if nonblocking { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.nonblocking = nonblocking;
        Ok(())
    }

    /// Reads one packet (with its [`VirtioNetHdr`] first if [`Tun::vnet_hdr`]);
    /// give room for 64 KiB plus the header when offloads are on.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet (with its [`VirtioNetHdr`] first if [`Tun::vnet_hdr`]).
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        // SAFETY: `packet` is valid for reads of `packet.len()` bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Tun> for OwnedFd {
    fn from(tun: Tun) -> OwnedFd {
        tun.fd
    }
}

/// The index of interface `name`.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let mut req = ifreq(name).map_err(tun_to_io)?;
    control_ioctl(libc::SIOCGIFINDEX as _, &mut req)?;
    // SAFETY: SIOCGIFINDEX filled in the `ifru_ifindex` member.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex } as u32)
}

/// A zeroed `struct ifreq` carrying `name`, which must be a valid interface
/// name (or empty, or a `%d` pattern, for TUNSETIFF).
fn ifreq(name: &str) -> Result<libc::ifreq, TunError> {
    let bytes = name.as_bytes();
    let valid = bytes.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !bytes.iter().any(|&b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace());
    if !valid {
        return Err(TunError::InvalidName(name.to_string()));
    }
    // SAFETY: `ifreq` is plain old data for which all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs an interface ioctl (`SIOC*IF*`) on a throwaway datagram socket.
fn control_ioctl(request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: socket has no memory preconditions.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and own alone.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: every request passed here reads and/or writes one `struct
    // ifreq`, which `req` points to for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn io_error(op: &'static str) -> TunError {
    TunError::Io { op, source: io::Error::last_os_error() }
}

fn tun_to_io(e: TunError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

#[cfg(test)]
mod tests;
