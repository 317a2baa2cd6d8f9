//! # wiremesh-core
//!
//! A sans-IO implementation of the WireGuard protocol: the Noise_IKpsk2
//! handshake, cookie replies under load, transport encryption with replay
//! protection, every protocol timer, and cryptokey routing over many peers.
//! It interoperates byte for byte with the Linux kernel and wireguard-go.
//!
//! ## Calling contract
//!
//! This crate performs no IO, reads no clock, spawns nothing, takes no lock
//! and draws no randomness of its own:
//!
//! * Time comes in as values: a monotonic [`time::Instant`] on every call that
//!   can start, advance or expire state, and a wall-clock [`time::WallTime`]
//!   where the protocol needs one (TAI64N timestamps, reporting).
//! * Randomness comes in as a `rand_core::CryptoRngCore` on the calls that
//!   need it (ephemeral keys, receiver indices, cookie secrets, jitter).
//! * Packets live in caller-owned buffers and are encrypted and decrypted in
//!   place. Outbound, the caller leaves [`device::HEADROOM`] bytes before the
//!   IP packet and [`device::TAILROOM`] after it; a buffer that is too small is
//!   an error carrying the size needed, never a panic.
//!
//! ## Run loop
//!
//! A driver owns one [`device::Device`] and loops:
//!
//! 1. Hand it every datagram received on the UDP socket with
//!    [`device::Device::handle_datagram`], and every IP packet read from the
//!    tunnel with [`device::Device::encapsulate`].
//! 2. After any input, drain [`device::Device::poll_transmit`] (handshake
//!    messages, cookie replies, keepalives and packets that were queued
//!    waiting for a session) until it returns `None`, and
//!    [`device::Device::poll_event`] likewise.
//! 3. Sleep until the next IO or [`device::Device::poll_timeout`], whichever
//!    comes first; at the deadline call [`device::Device::handle_timeout`] and
//!    go back to step 2.
//!
//! ## Features
//!
//! * `alloc`: the multi-peer [`device`], the [`routing`] table and the
//!   inbound packet [`filter`] (set with [`device::Device::set_filter`]; a
//!   device without one lets every decrypted packet through), and the
//!   path state machine [`disco::Disco`] (probe formats and [`stun`] need
//!   no allocation).
//! * `std` (default): implies `alloc`.
//! * `ring` (default): the fast transport AEAD provider [`crypto::Ring`].
//!
//! Without default features the crate is `no_std` and allocation-free: the
//! primitives, message formats, handshake, cookies, sessions, replay window
//! and timers are all available for a driver that manages its own peers.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// no_std that cannot break by accident: the library itself names core and alloc.
#![warn(clippy::std_instead_of_core, clippy::alloc_instead_of_core)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod consts;
pub mod cookie;
pub mod crypto;
#[cfg(feature = "alloc")]
pub mod device;
pub mod disco;
#[cfg(feature = "alloc")]
pub mod filter;
pub mod ip;
pub mod keys;
pub mod messages;
pub mod noise;
pub mod replay;
#[cfg(feature = "alloc")]
pub mod routing;
pub mod session;
pub mod stun;
pub mod time;
pub mod timers;

pub use time::{Instant, WallTime};
