//! The WireGuard cross-platform userspace configuration protocol: what `wg`
//! speaks over `/var/run/wireguard/<ifname>.sock` to wireguard-go, and what
//! `wiremeshd interface` answers in its place.
//!
//! The protocol is line based. A client sends `get=1\n\n` or `set=1\n`
//! followed by `key=value` lines and an empty line; the server answers with
//! `key=value` lines (for `get`) and then `errno=N` and an empty line, where
//! `N` is 0 or a negative errno value. See
//! <https://www.wireguard.com/xplatform/#configuration-protocol>.
//!
//! Everything here follows wireguard-go's `device/uapi.go` key for key and
//! errno for errno, with one deliberate difference: a `set` is atomic. The
//! whole request is parsed into [`SetOp`]s first, then applied to a copy of
//! the [`DeviceConfig`]; if any line is invalid nothing changes (wireguard-go
//! applies the lines before the bad one).
//!
//! The layers, each usable on its own:
//!
//! * [`DeviceConfig`] and [`PeerConfig`]: the configuration model, with the
//!   per-peer counters that `wg show` reports.
//! * [`SetParser`] / [`parse_set`]: request lines to [`SetOp`]s;
//!   [`DeviceConfig::apply`] applies them atomically.
//! * [`DeviceConfig::write_get`]: the `get=1` answer.
//! * [`read_request`]: reads one request from a byte stream with bounded
//!   memory ([`Limits`]).
//! * [`handle_connection`], [`serve_uapi`] and [`UapiSocket`]: a small
//!   blocking server for the Unix socket.

mod config;
mod error;
mod get;
mod reader;
mod server;
mod set;
mod text;

pub use config::{AllowedIp, DeviceConfig, InvalidPrefix, PeerConfig, PeerStats, MAX_PEERS};
pub use error::{errno, Key, UapiError};
pub use reader::{read_request, Limits, ReadError, Request};
pub use server::{handle_connection, respond, serve_uapi, socket_path, Response, UapiSocket, SOCKET_DIR};
pub use set::{parse_set, SetOp, SetParser};

#[cfg(test)]
mod tests;
