//! Value syntax of the protocol, as wireguard-go parses it: hex keys
//! (`encoding/hex`), decimal numbers (`strconv.ParseUint(v, 10, n)`) and
//! endpoints (`netip.ParseAddrPort`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Parses exactly 32 bytes of hex. Upper case is accepted, as Go's
/// `hex.DecodeString` does; output is always lower case.
pub(crate) fn parse_hex_key(value: &str) -> Result<[u8; 32], &'static str> {
    let digits = value.as_bytes();
    if digits.len() != 64 {
        return Err("a key is 64 hex digits");
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        match (hex_value(pair[0]), hex_value(pair[1])) {
            (Some(hi), Some(lo)) => *byte = hi << 4 | lo,
            _ => {
                zeroize::Zeroize::zeroize(&mut key);
                return Err("not a hex digit");
            }
        }
    }
    Ok(key)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Appends `bytes` as lower-case hex.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(HEX_DIGITS[usize::from(b >> 4)] as char);
        out.push(HEX_DIGITS[usize::from(b & 0xf)] as char);
    }
}

/// Parses an unsigned decimal no greater than `max`: digits only (no sign, no
/// space, no underscore), leading zeros allowed, as `strconv.ParseUint(v, 10, n)`.
pub(crate) fn parse_decimal(value: &str, max: u64) -> Result<u64, &'static str> {
    if value.is_empty() {
        return Err("empty number");
    }
    let mut n: u64 = 0;
    for &d in value.as_bytes() {
        if !d.is_ascii_digit() {
            return Err("not a decimal number");
        }
        n = n.checked_mul(10).and_then(|n| n.checked_add(u64::from(d - b'0'))).ok_or("number out of range")?;
    }
    if n > max {
        return Err("number out of range");
    }
    Ok(n)
}

/// Parses `a.b.c.d:port` or `[v6]:port`, as Go's `netip.ParseAddrPort`:
/// IPv6 needs brackets, IPv4 must not have them, no host names. A zone on an
/// IPv6 address must be numeric (it becomes the scope id); interface names as
/// zones are refused here, where Go would keep the name.
pub(crate) fn parse_endpoint(value: &str) -> Result<SocketAddr, &'static str> {
    let (host, port) = value.rsplit_once(':').ok_or("not an ip:port")?;
    if host.is_empty() {
        return Err("no IP address");
    }
    if port.is_empty() {
        return Err("no port");
    }
    let port = parse_decimal(port, u64::from(u16::MAX)).map_err(|_| "invalid port")? as u16;
    if let Some(bracketed) = host.strip_prefix('[') {
        let inner = bracketed.strip_suffix(']').ok_or("missing ]")?;
        let (addr, zone) = match inner.split_once('%') {
            Some((addr, zone)) => (addr, Some(zone)),
            None => (inner, None),
        };
        let ip: Ipv6Addr = addr.parse().map_err(|_| {
            if addr.parse::<Ipv4Addr>().is_ok() {
                "square brackets can only be used with IPv6 addresses"
            } else {
                "not an IPv6 address"
            }
        })?;
        let scope_id = match zone {
            None => 0,
            Some("") => return Err("empty IPv6 zone"),
            Some(zone) => parse_decimal(zone, u64::from(u32::MAX)).map_err(|_| "IPv6 zone is not numeric")? as u32,
        };
        Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope_id)))
    } else {
        let ip: Ipv4Addr = host.parse().map_err(|_| {
            if host.contains(':') {
                "IPv6 addresses must be surrounded by square brackets"
            } else {
                "not an IP address (host names are not resolved)"
            }
        })?;
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys() {
        let lower = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let key = parse_hex_key(lower).unwrap();
        assert_eq!(key[1], 0x11);
        assert_eq!(key[31], 0xff);
        assert_eq!(parse_hex_key(&lower.to_uppercase()).unwrap(), key);
        let mut out = String::new();
        push_hex(&mut out, &key);
        assert_eq!(out, lower);

        assert!(parse_hex_key(&lower[..62]).is_err());
        assert!(parse_hex_key(&format!("{lower}00")).is_err());
        assert!(parse_hex_key(&lower[..63]).is_err());
        assert!(parse_hex_key(&format!("g{}", &lower[1..])).is_err());
        assert!(parse_hex_key(&format!(" {}", &lower[1..])).is_err());
        assert!(parse_hex_key("").is_err());
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal("0", 10), Ok(0));
        assert_eq!(parse_decimal("010", 10), Ok(10));
        assert_eq!(parse_decimal("65535", 65535), Ok(65535));
        assert!(parse_decimal("65536", 65535).is_err());
        assert!(parse_decimal("", 10).is_err());
        assert!(parse_decimal("+1", 10).is_err());
        assert!(parse_decimal("-1", 10).is_err());
        assert!(parse_decimal("1_0", 10).is_err());
        assert!(parse_decimal(" 1", 10).is_err());
        assert!(parse_decimal("99999999999999999999999", u64::MAX).is_err());
        assert_eq!(parse_decimal("18446744073709551615", u64::MAX), Ok(u64::MAX));
    }

    #[test]
    fn endpoints() {
        let ok = |s: &str| parse_endpoint(s).unwrap().to_string();
        assert_eq!(ok("1.2.3.4:51820"), "1.2.3.4:51820");
        assert_eq!(ok("[::1]:51820"), "[::1]:51820");
        assert_eq!(ok("[2001:DB8::1]:1"), "[2001:db8::1]:1");
        assert_eq!(ok("[::ffff:1.2.3.4]:5"), "[::ffff:1.2.3.4]:5");
        assert_eq!(ok("[fe80::1%3]:51820"), "[fe80::1%3]:51820");
        assert_eq!(ok("1.2.3.4:0"), "1.2.3.4:0");
        assert_eq!(ok("1.2.3.4:051820"), "1.2.3.4:51820");

        for bad in [
            "",
            "1.2.3.4",
            "1.2.3.4:",
            ":51820",
            "1.2.3.4:65536",
            "1.2.3.4:+1",
            "1.2.3.4:-1",
            "1.2.3.4: 1",
            "::1:51820",
            "[::1:51820",
            "[1.2.3.4]:51820",
            "[::1]]:51820",
            "[fe80::1%]:51820",
            "[fe80::1%eth0]:51820",
            "example.com:51820",
            "localhost:51820",
            "01.2.3.4:51820",
            "1.2.3:51820",
            "1.2.3.4.5:51820",
            "256.1.1.1:51820",
            " 1.2.3.4:51820",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
