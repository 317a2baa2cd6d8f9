//! Errors of the configuration protocol and the errno values they answer with.

use std::fmt;

/// The `errno=` values wireguard-go answers with (`ipc/uapi_unix.go`): negated
/// Linux errno numbers, printed in decimal.
pub mod errno {
    /// Success.
    pub const OK: i64 = 0;
    /// Reading the request failed, or a line was too long (`-EIO`, -5).
    pub const IO: i64 = -(libc::EIO as i64);
    /// A line without `=` (`-EPROTO`, -71).
    pub const PROTOCOL: i64 = -(libc::EPROTO as i64);
    /// An unknown key or a value that does not parse (`-EINVAL`, -22).
    pub const INVALID: i64 = -(libc::EINVAL as i64);
    /// The listen port could not be bound or the fwmark set (`-EADDRINUSE`, -98).
    pub const PORT_IN_USE: i64 = -(libc::EADDRINUSE as i64);
    /// Any other failure (-55, `ENOANO` on Linux; wireguard-go hardcodes it).
    pub const UNKNOWN: i64 = -55;
}

/// A key of the `set=1` request, named as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// `private_key`
    PrivateKey,
    /// `listen_port`
    ListenPort,
    /// `fwmark`
    Fwmark,
    /// `replace_peers`
    ReplacePeers,
    /// `public_key`
    PublicKey,
    /// `remove`
    Remove,
    /// `update_only`
    UpdateOnly,
    /// `preshared_key`
    PresharedKey,
    /// `endpoint`
    Endpoint,
    /// `persistent_keepalive_interval`
    PersistentKeepaliveInterval,
    /// `replace_allowed_ips`
    ReplaceAllowedIps,
    /// `allowed_ip`
    AllowedIp,
    /// `protocol_version`
    ProtocolVersion,
}

impl Key {
    /// The key as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Key::PrivateKey => "private_key",
            Key::ListenPort => "listen_port",
            Key::Fwmark => "fwmark",
            Key::ReplacePeers => "replace_peers",
            Key::PublicKey => "public_key",
            Key::Remove => "remove",
            Key::UpdateOnly => "update_only",
            Key::PresharedKey => "preshared_key",
            Key::Endpoint => "endpoint",
            Key::PersistentKeepaliveInterval => "persistent_keepalive_interval",
            Key::ReplaceAllowedIps => "replace_allowed_ips",
            Key::AllowedIp => "allowed_ip",
            Key::ProtocolVersion => "protocol_version",
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request failed; [`UapiError::errno`] gives the number to answer with.
///
/// Line numbers count the lines of the `set=1` body from 1. Errors never quote
/// a value: it may be a key.
#[derive(Debug)]
#[non_exhaustive]
pub enum UapiError {
    /// Reading the request failed.
    Io(std::io::Error),
    /// A line was longer than [`super::Limits::max_line`].
    LineTooLong {
        /// The line's number.
        line: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The request was longer than [`super::Limits::max_request`].
    RequestTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// A line without `=`.
    MissingEquals {
        /// The line's number.
        line: usize,
    },
    /// A key that is not valid before the first `public_key=`.
    UnknownDeviceKey {
        /// The line's number.
        line: usize,
        /// The key as sent (shortened to 64 characters).
        key: String,
    },
    /// A key that is not valid in a peer section.
    UnknownPeerKey {
        /// The line's number.
        line: usize,
        /// The key as sent (shortened to 64 characters).
        key: String,
    },
    /// A known key with a value that does not parse.
    InvalidValue {
        /// The line's number.
        line: usize,
        /// The key.
        key: Key,
        /// What is wrong with the value.
        reason: &'static str,
    },
    /// `get=1` was not followed by an empty line.
    TrailingGetData,
    /// Adding the peer would exceed [`super::MAX_PEERS`].
    TooManyPeers {
        /// The line's number.
        line: usize,
    },
    /// A peer key appeared in operations that do not start with `public_key`
    /// (only possible for hand-built [`super::SetOp`] lists).
    NoPeerSelected {
        /// The line's number.
        line: usize,
        /// The key.
        key: Key,
    },
    /// Binding the new listen port or setting the fwmark failed (reported by
    /// the driver that applies the configuration, not by this module).
    PortInUse(std::io::Error),
}

impl UapiError {
    /// The `errno=` value wireguard-go answers this error with.
    pub fn errno(&self) -> i64 {
        match self {
            UapiError::Io(_) | UapiError::LineTooLong { .. } | UapiError::RequestTooLong { .. } => errno::IO,
            UapiError::MissingEquals { .. } => errno::PROTOCOL,
            UapiError::UnknownDeviceKey { .. }
            | UapiError::UnknownPeerKey { .. }
            | UapiError::InvalidValue { .. }
            | UapiError::TrailingGetData
            | UapiError::TooManyPeers { .. }
            | UapiError::NoPeerSelected { .. } => errno::INVALID,
            UapiError::PortInUse(_) => errno::PORT_IN_USE,
        }
    }

    /// An unknown-key error for `key`, shortened so a hostile line cannot
    /// make the error (and the log line printing it) large.
    pub(crate) fn unknown_key(line: usize, key: &str, in_peer: bool) -> Self {
        let key: String = key.chars().take(64).collect();
        if in_peer {
            UapiError::UnknownPeerKey { line, key }
        } else {
            UapiError::UnknownDeviceKey { line, key }
        }
    }
}

impl fmt::Display for UapiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UapiError::Io(e) => write!(f, "failed to read request: {e}"),
            UapiError::LineTooLong { line, limit } => {
                write!(f, "line {line} is longer than {limit} bytes")
            }
            UapiError::RequestTooLong { limit } => {
                write!(f, "request is longer than {limit} bytes")
            }
            UapiError::MissingEquals { line } => write!(f, "line {line} has no '='"),
            UapiError::UnknownDeviceKey { line, key } => {
                write!(f, "line {line}: invalid device key {key:?}")
            }
            UapiError::UnknownPeerKey { line, key } => {
                write!(f, "line {line}: invalid peer key {key:?}")
            }
            UapiError::InvalidValue { line, key, reason } => {
                write!(f, "line {line}: invalid {key}: {reason}")
            }
            UapiError::TrailingGetData => f.write_str("get=1 not followed by an empty line"),
            UapiError::TooManyPeers { line } => {
                write!(f, "line {line}: too many peers (at most {})", super::MAX_PEERS)
            }
            UapiError::NoPeerSelected { line, key } => {
                write!(f, "line {line}: {key} before any public_key")
            }
            UapiError::PortInUse(e) => write!(f, "failed to bind listen port: {e}"),
        }
    }
}

impl std::error::Error for UapiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UapiError::Io(e) | UapiError::PortInUse(e) => Some(e),
            _ => None,
        }
    }
}
