//! The node agent's DNS resolver (`daemon/src/node/dns.rs`, included as it
//! is: it depends on `std` only) on arbitrary bytes.
//!
//! `answer` must never panic; when it answers, the reply keeps the query's
//! id, is a response (QR) without TC, fits in 512 bytes, and is itself
//! dropped if fed back (a response is never answered). Each input is tried
//! as it is and behind a fixed well-formed header (one question, with and
//! without an additional record), so the question and OPT parsers are
//! reached at once.

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

fuzz_target!(|data: &[u8]| {
    check(data);
    for arcount in [0u8, 1] {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, arcount];
        q.extend_from_slice(data);
        check(&q);
    }
});
