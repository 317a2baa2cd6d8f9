//! The userspace node's local proxies (`daemon/src/node/proxy/wire.rs`,
//! included as it is): SOCKS5 greetings, requests, replies and UDP
//! ASSOCIATE datagrams, and HTTP proxy request heads, all bytes that local
//! clients send.
//!
//! Nothing may panic; a parser never claims more bytes than it was given,
//! and asks for more only while no prefix of the input is a whole message;
//! what parses re-encodes to the bytes it came from (SOCKS5; the HTTP head
//! to a head that parses the same); a forwarded HTTP head is itself a
//! valid head, in origin form, with no line break but CRLF and no control
//! character, no hop-by-hop header but its own `connection: close`, and
//! every other header the client sent, in order.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../daemon/src/node/proxy/wire.rs"]
mod wire;

use wire::{
    head_end, host_port, Greeting, Parsed, ProxyRequest, Reply, Request, RequestHead, SocksError, Target, UdpDatagram,
};

/// Checks one incremental SOCKS5 parser on `data`: the bytes it uses lie
/// within the input and re-encode to exactly those bytes (with the
/// `reserved` ones, which parsers ignore, as zero); when it wants
/// more, every prefix wants more too; the answer on a whole message does
/// not change when more bytes follow it.
fn socks<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    reserved: &[usize],
    parse: impl Fn(&[u8]) -> Parsed<T, SocksError>,
    emit: impl Fn(&T, &mut Vec<u8>) -> Result<(), SocksError>,
) {
    match parse(data) {
        Ok(Some((m, used))) => {
            assert!(used <= data.len() && used > 0, "used {used} of {}", data.len());
            let mut out = Vec::new();
            emit(&m, &mut out).expect("a parsed message encodes");
            let mut expected = data[..used].to_vec();
            for &i in reserved {
                expected[i] = 0;
            }
            assert_eq!(out, expected, "re-encoding {m:?}");
            let (again, n) = parse(&data[..used]).expect("its own bytes parse").expect("and are whole");
            assert_eq!((again, n), (m, used));
        }
        Ok(None) => {
            for cut in 0..data.len() {
                assert!(matches!(parse(&data[..cut]), Ok(None)), "a prefix of an incomplete message is not");
            }
        }
        // Refused: no longer input makes it whole (the fault lies in the bytes seen).
        Err(e) => {
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0; 300]);
            assert_eq!(parse(&longer).err(), Some(e));
            let _ = (e.reply(), e.to_string());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    socks(data, &[], Greeting::parse, Greeting::emit);
    socks(data, &[2], Request::parse, Request::emit);
    socks(data, &[2], Reply::parse, Reply::emit);
    socks(data, &[], Target::parse, Target::emit);
    if let Ok(d) = UdpDatagram::parse(data) {
        let mut out = Vec::new();
        d.emit(&mut out).expect("a parsed datagram encodes");
        assert_eq!(&out[2..], &data[2..]);
        assert_eq!(UdpDatagram::parse(&out).as_ref(), Ok(&d));
    }

    // HTTP: the head as the proxy finds it, and the whole input as a head.
    match head_end(data) {
        Ok(Some(end)) => {
            assert!((4..=data.len()).contains(&end) && data[..end].ends_with(b"\r\n\r\n"));
            http(&data[..end]);
        }
        Ok(None) => assert!(data.len() < wire::MAX_HEAD),
        Err(e) => assert_eq!(e.status, 431),
    }
    http(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((host, _)) = host_port(text, Some(80)) {
            assert!(!host.is_empty() && text.contains(host.as_str()));
        }
    }
});

fn http(head: &[u8]) {
    let Ok(h) = RequestHead::parse(head) else { return };
    let mut out = Vec::new();
    h.emit(None, &mut out);
    assert_eq!(RequestHead::parse(&out).as_ref(), Ok(&h), "re-encoded head {:?}", String::from_utf8_lossy(&out));
    assert_eq!(head_end(&out), Ok(Some(out.len())), "one head, ending once");
    match ProxyRequest::from_head(&h) {
        Ok(ProxyRequest::Connect { host, .. }) => assert!(!host.is_empty()),
        Ok(ProxyRequest::Forward { host, head: sent, .. }) => {
            assert!(!host.is_empty());
            assert_eq!(head_end(&sent), Ok(Some(sent.len())), "the forwarded head is one head");
            // No line break but CRLF, and no control character a server
            // behind might read as one: nothing can smuggle extra lines.
            for (i, &b) in sent.iter().enumerate() {
                match b {
                    b'\n' => assert!(i > 0 && sent[i - 1] == b'\r', "bare LF at {i}"),
                    b'\r' => assert_eq!(sent.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                    b'\t' => {}
                    _ => assert!(!b.is_ascii_control() && b != 0x7f, "control byte {b:#x} at {i}"),
                }
            }
            let f = RequestHead::parse(&sent).expect("the forwarded head parses");
            assert_eq!((f.method, f.version), (h.method, h.version));
            assert!(f.target.starts_with('/'), "origin form: {}", f.target);
            let hop = ["proxy-connection", "proxy-authorization", "keep-alive"];
            assert!(f.headers.iter().all(|(n, _)| !hop.iter().any(|x| n.eq_ignore_ascii_case(x))));
            let conn: Vec<_> = f.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("connection")).collect();
            assert_eq!(conn, [&("connection", "close")]);
            // Every header the client sent that is not hop-by-hop goes on, in order.
            let kept: Vec<_> = h
                .headers
                .iter()
                .filter(|(n, _)| !hop.iter().chain(&["connection"]).any(|x| n.eq_ignore_ascii_case(x)))
                .collect();
            assert_eq!(kept, f.headers[..f.headers.len() - 1].iter().collect::<Vec<_>>());
        }
        Err(e) => assert_eq!(e.status, 400),
    }
}
