//! The `wg setconf` configuration file format (`[Interface]` and `[Peer]`
//! sections of `Key = Value` lines), turned into the same `set=1` request
//! `wg setconf` sends, so a file and the socket take one code path.

use std::fmt::Write as _;
use std::net::ToSocketAddrs;

/// A configuration file error, naming the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ConfError {}

fn err(line: usize, message: impl Into<String>) -> ConfError {
    ConfError { line, message: message.into() }
}

/// Decodes a base64 key of 32 bytes into lowercase hex.
fn key_hex(line: usize, what: &str, value: &str) -> Result<String, ConfError> {
    let bytes = crate::control::proto::unb64_key(value)
        .ok_or_else(|| err(line, format!("{what} is not a base64 32-byte key")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Translates a `wg setconf` file into a `set=1` request body (without the
/// `set=1` line and the final empty line). Like `wg setconf`, it replaces all
/// peers. Hostnames in `Endpoint` are resolved here.
pub fn to_uapi_set(text: &str) -> Result<String, ConfError> {
    #[derive(PartialEq)]
    enum Section {
        None,
        Interface,
        Peer,
    }
    let mut out = String::from("replace_peers=true\n");
    let mut section = Section::None;
    let mut peer_has_key = false;
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if content.starts_with('[') {
            match content.to_ascii_lowercase().as_str() {
                "[interface]" => section = Section::Interface,
                "[peer]" => {
                    section = Section::Peer;
                    peer_has_key = false;
                }
                _ => return Err(err(line, format!("unknown section {content}"))),
            }
            continue;
        }
        let Some((key, value)) = content.split_once('=') else {
            return Err(err(line, "expected Key = Value"));
        };
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
        match (&section, key.as_str()) {
            (Section::None, _) => return Err(err(line, "key outside of a section")),
            (Section::Interface, "privatekey") => {
                let _ = writeln!(out, "private_key={}", key_hex(line, "PrivateKey", value)?);
            }
            (Section::Interface, "listenport") => {
                let port: u16 = value.parse().map_err(|_| err(line, "ListenPort must be a number 0-65535"))?;
                let _ = writeln!(out, "listen_port={port}");
            }
            (Section::Interface, "fwmark") => {
                let mark = if value == "off" {
                    0
                } else if let Some(hex) = value.strip_prefix("0x") {
                    u32::from_str_radix(hex, 16).map_err(|_| err(line, "FwMark must be a number or off"))?
                } else {
                    value.parse().map_err(|_| err(line, "FwMark must be a number or off"))?
                };
                let _ = writeln!(out, "fwmark={mark}");
            }
            (Section::Peer, "publickey") => {
                let _ = writeln!(out, "public_key={}", key_hex(line, "PublicKey", value)?);
                peer_has_key = true;
            }
            (Section::Peer, _) if !peer_has_key => return Err(err(line, "PublicKey must come first in a [Peer]")),
            (Section::Peer, "presharedkey") => {
                let _ = writeln!(out, "preshared_key={}", key_hex(line, "PresharedKey", value)?);
            }
            (Section::Peer, "allowedips") => {
                let _ = writeln!(out, "replace_allowed_ips=true");
                for ip in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let prefixed = if ip.contains('/') {
                        ip.to_string()
                    } else if ip.contains(':') {
                        format!("{ip}/128")
                    } else {
                        format!("{ip}/32")
                    };
                    let _ = writeln!(out, "allowed_ip={prefixed}");
                }
            }
            (Section::Peer, "endpoint") => {
                let addr = value
                    .to_socket_addrs()
                    .map_err(|e| err(line, format!("Endpoint {value}: {e}")))?
                    .next()
                    .ok_or_else(|| err(line, format!("Endpoint {value} resolves to nothing")))?;
                let _ = writeln!(out, "endpoint={addr}");
            }
            (Section::Peer, "persistentkeepalive") => {
                let k: u16 = if value == "off" {
                    0
                } else {
                    value.parse().map_err(|_| err(line, "PersistentKeepalive must be a number 0-65535 or off"))?
                };
                let _ = writeln!(out, "persistent_keepalive_interval={k}");
            }
            (_, other) => return Err(err(line, format!("unknown key {other}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_a_full_file() {
        let text = "[Interface]\nPrivateKey = AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\nListenPort = 51820\nFwMark = 0x10\n\n\
                    [Peer] # a comment\nPublicKey = AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n\
                    AllowedIPs = 10.0.0.2/32, fd00::2\nEndpoint = 127.0.0.1:51821\nPersistentKeepalive = 25\n";
        let set = to_uapi_set(text).unwrap();
        let hex: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            set,
            format!(
                "replace_peers=true\nprivate_key={hex}\nlisten_port=51820\nfwmark=16\npublic_key={hex}\n\
                 replace_allowed_ips=true\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\nendpoint=127.0.0.1:51821\n\
                 persistent_keepalive_interval=25\n"
            )
        );
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(to_uapi_set("[Interface]\nListenPort = x\n").unwrap_err().line, 2);
        assert_eq!(to_uapi_set("[Peer]\nAllowedIPs = 10.0.0.0/8\n").unwrap_err().line, 2);
        assert_eq!(to_uapi_set("\n\nPrivateKey = x\n").unwrap_err().line, 3);
        assert_eq!(to_uapi_set("[Interface]\nPrivateKey = short\n").unwrap_err().line, 2);
        assert_eq!(to_uapi_set("[Wat]\n").unwrap_err().line, 1);
        assert_eq!(to_uapi_set("[Interface]\nBogus = 1\n").unwrap_err().line, 2);
    }
}
