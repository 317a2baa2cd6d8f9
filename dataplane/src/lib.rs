//! The Linux data plane driving `wiremesh-core`.
//!
//! * [`uapi`]: the wg(8) cross-platform configuration protocol (`get=1`,
//!   `set=1`) as pure logic over a configuration model, plus a small blocking
//!   Unix-socket server for `/var/run/wireguard/<ifname>.sock`.
//! * [`disco`]: path discovery on the WireGuard socket (STUN, probes), off
//!   unless asked for.
//! * [`relay`]: the bounded link between the worker and a relay client
//!   task, for peers whose path is the relay (not wired to the worker yet).
//! * [`tun`]: Linux TUN devices with virtio-net offloads, and the splitting of
//!   TCP segmentation offload super-packets into wire-sized IP packets.
//! * [`netstack`]: the userspace data plane on smoltcp, for processes
//!   without TUN or root, with tokio TCP and UDP sockets on the tailnet.
#![warn(missing_docs)]

pub mod disco;
pub mod driver;
pub mod gro;
pub mod netstack;
pub mod relay;
pub mod tun;
pub mod uapi;
pub mod udp;
