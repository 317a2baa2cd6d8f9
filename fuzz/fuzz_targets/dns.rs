//! The node agent's DNS resolver (`daemon/src/node/dns.rs`, included as it
//! is: it depends on `std` only) on arbitrary bytes.
//!
//! `answer` must never panic; when it answers, the reply keeps the query's
//! id, is a response (QR) without TC, fits in 512 bytes, and is itself
//! dropped if fed back (a response is never answered). Each input is tried
//! as it is and behind a fixed well-formed header (one question, with and
//! without an additional record), so the question and OPT parsers are
//! reached at once, and as the first labels of a reverse name under the
//! zone's `in-addr.arpa` and `ip6.arpa` zones (PTR), so the reverse-name
//! parser is reached too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "../../daemon/src/node/dns.rs"]
mod dns;

fn zone() -> &'static dns::Zone {
    static ZONE: OnceLock<dns::Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let host = |name: &str, n: u8| dns::Host {
            name: name.into(),
            ipv4: Ipv4Addr::new(100, 64, 0, n),
            ipv6: Ipv6Addr::new(0xfd01, 2, 3, 0, 0, 0, 0x6440, u16::from(n)),
        };
        dns::Zone::new("wiremesh.internal", [host("alpha", 1), host("beta", 2), host("a", 3)])
    })
}

fn check(query: &[u8]) {
    if let Some(reply) = dns::answer(query, zone()) {
        assert!(reply.len() >= 12 && reply.len() <= 512, "reply of {} bytes", reply.len());
        assert_eq!(&reply[..2], &query[..2], "id");
        assert_eq!(reply[2] & 0x82, 0x80, "QR set, TC clear");
        assert_eq!(dns::answer(&reply, zone()), None, "a response was answered");
    }
}

/// A PTR query for `<data's labels>.<zone>`: `data` split at dots into
/// labels (empty ones dropped, each cut to 63 bytes, the name to 255).
fn reverse_query(data: &[u8], zone: &[&str]) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let mut name = Vec::new();
    let labels = data.split(|&b| b == b'.').filter(|l| !l.is_empty()).map(|l| &l[..l.len().min(63)]);
    for l in labels.chain(zone.iter().map(|z| z.as_bytes())) {
        if name.len() + 1 + l.len() > 254 {
            break;
        }
        name.push(l.len() as u8);
        name.extend_from_slice(l);
    }
    name.push(0);
    q.extend_from_slice(&name);
    q.extend_from_slice(&[0, 12, 0, 1]);
    q
}

fuzz_target!(|data: &[u8]| {
    check(data);
    for arcount in [0u8, 1] {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, arcount];
        q.extend_from_slice(data);
        check(&q);
    }
    check(&reverse_query(data, &["64", "100", "in-addr", "arpa"]));
    check(&reverse_query(data, &["3", "0", "0", "0", "2", "0", "0", "0", "1", "0", "d", "f", "ip6", "arpa"]));
});
