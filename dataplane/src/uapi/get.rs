//! `get=1`: the configuration and counters as `key=value` lines.

use std::fmt::Write as _;

use super::config::DeviceConfig;
use super::text::push_hex;

impl DeviceConfig {
    /// Appends the `get=1` answer lines (without the final `errno=0` and empty
    /// line) in wireguard-go's order: `private_key` (if set), `listen_port`
    /// (if not 0), `fwmark` (if not 0), then for each peer `public_key`,
    /// `preshared_key`, `protocol_version`, `endpoint` (if known),
    /// `last_handshake_time_sec`, `last_handshake_time_nsec`, `tx_bytes`,
    /// `rx_bytes`, `persistent_keepalive_interval` and one `allowed_ip` per
    /// prefix. `out` receives the private key: wipe it after use.
    pub fn write_get(&self, out: &mut String) {
        if let Some(key) = &self.private_key {
            let mut bytes = key.to_bytes();
            if bytes.iter().any(|&b| b != 0) {
                push_key_line(out, "private_key", &bytes);
            }
            zeroize::Zeroize::zeroize(&mut bytes);
        }
        // `write!` into a String cannot fail.
        if self.listen_port != 0 {
            let _ = writeln!(out, "listen_port={}", self.listen_port);
        }
        if self.fwmark != 0 {
            let _ = writeln!(out, "fwmark={}", self.fwmark);
        }
        for peer in &self.peers {
            push_key_line(out, "public_key", &peer.public_key.0);
            let mut psk = peer.preshared_key.to_bytes();
            push_key_line(out, "preshared_key", &psk);
            zeroize::Zeroize::zeroize(&mut psk);
            let _ = writeln!(out, "protocol_version={}", peer.protocol_version);
            if let Some(endpoint) = peer.endpoint {
                let _ = writeln!(out, "endpoint={endpoint}");
            }
            let handshake = peer.stats.last_handshake;
            let _ = writeln!(out, "last_handshake_time_sec={}", handshake.as_secs());
            let _ = writeln!(out, "last_handshake_time_nsec={}", handshake.subsec_nanos());
            let _ = writeln!(out, "tx_bytes={}", peer.stats.tx_bytes);
            let _ = writeln!(out, "rx_bytes={}", peer.stats.rx_bytes);
            let _ = writeln!(out, "persistent_keepalive_interval={}", peer.persistent_keepalive_interval);
            for ip in &peer.allowed_ips {
                let _ = writeln!(out, "allowed_ip={ip}");
            }
        }
    }
}

fn push_key_line(out: &mut String, key: &str, bytes: &[u8; 32]) {
    out.push_str(key);
    out.push('=');
    push_hex(out, bytes);
    out.push('\n');
}
