//! Every wire parser on arbitrary bytes: `messages::classify`, each message's
//! `parse`, `ip::parse_header`. Parsers must never panic, must agree with
//! `classify`, and `emit(parse(x))` must give back `x` byte for byte.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use wiremesh_core::ip::parse_header;
use wiremesh_core::messages::{
    classify, padded_len, CookieReply, Initiation, MessageKind, ParseError, Response, TransportHeader,
    COOKIE_REPLY_LEN, INITIATION_LEN, PADDING_MULTIPLE, RESPONSE_LEN, TRANSPORT_HEADER_LEN, TRANSPORT_MIN_LEN,
    TYPE_COOKIE_REPLY, TYPE_INITIATION, TYPE_RESPONSE, TYPE_TRANSPORT,
};

fuzz_target!(|data: &[u8]| {
    check_classify(data);
    check_messages(data);
    check_ip(data);
    let n = data.len();
    let p = padded_len(n);
    assert!(p >= n && p < n + PADDING_MULTIPLE && p % PADDING_MULTIPLE == 0);
});

/// `classify` against a direct reading of the paper's layouts.
fn check_classify(data: &[u8]) {
    let kind = classify(data);
    if data.len() < 4 || data[1..4] != [0, 0, 0] || !(1..=4).contains(&data[0]) {
        assert_eq!(kind, Err(ParseError::UnknownType));
        return;
    }
    let (expected, ok) = match data[0] {
        TYPE_INITIATION => (MessageKind::Initiation, data.len() == INITIATION_LEN),
        TYPE_RESPONSE => (MessageKind::Response, data.len() == RESPONSE_LEN),
        TYPE_COOKIE_REPLY => (MessageKind::CookieReply, data.len() == COOKIE_REPLY_LEN),
        TYPE_TRANSPORT => (MessageKind::Transport, data.len() >= TRANSPORT_MIN_LEN),
        _ => unreachable!(),
    };
    if ok {
        assert_eq!(kind, Ok(expected));
    } else {
        assert_eq!(kind, Err(ParseError::BadLength { message_type: data[0], len: data.len() }));
    }
}

/// Each parser accepts exactly what `classify` names as its kind, and
/// emitting the parsed value reproduces the input.
fn check_messages(data: &[u8]) {
    let kind = classify(data).ok();
    match Initiation::parse(data) {
        Ok(m) => {
            assert_eq!(kind, Some(MessageKind::Initiation));
            let mut out = [0u8; INITIATION_LEN];
            m.emit(&mut out);
            assert_eq!(&out[..], data);
            assert_eq!(&data[Initiation::MAC1_OFFSET..Initiation::MAC1_OFFSET + 16], &m.mac1);
        }
        Err(_) => assert_ne!(kind, Some(MessageKind::Initiation)),
    }
    match Response::parse(data) {
        Ok(m) => {
            assert_eq!(kind, Some(MessageKind::Response));
            let mut out = [0u8; RESPONSE_LEN];
            m.emit(&mut out);
            assert_eq!(&out[..], data);
            assert_eq!(&data[Response::MAC1_OFFSET..Response::MAC1_OFFSET + 16], &m.mac1);
        }
        Err(_) => assert_ne!(kind, Some(MessageKind::Response)),
    }
    match CookieReply::parse(data) {
        Ok(m) => {
            assert_eq!(kind, Some(MessageKind::CookieReply));
            let mut out = [0u8; COOKIE_REPLY_LEN];
            m.emit(&mut out);
            assert_eq!(&out[..], data);
        }
        Err(_) => assert_ne!(kind, Some(MessageKind::CookieReply)),
    }
    match TransportHeader::parse(data) {
        Ok(h) => {
            assert_eq!(kind, Some(MessageKind::Transport));
            let mut out = [0u8; TRANSPORT_HEADER_LEN];
            h.emit(&mut out);
            assert_eq!(&out[..], &data[..TRANSPORT_HEADER_LEN]);
        }
        Err(_) => assert_ne!(kind, Some(MessageKind::Transport)),
    }
}

/// `parse_header` against the raw header fields.
fn check_ip(data: &[u8]) {
    let Some(h) = parse_header(data) else {
        return;
    };
    assert!(h.total_len <= data.len(), "stated length beyond the bytes present");
    match data[0] >> 4 {
        4 => {
            assert!(data.len() >= 20 && h.total_len >= 20);
            assert_eq!(h.total_len, u16::from_be_bytes([data[2], data[3]]) as usize);
            assert!((data[0] & 0x0f) as usize * 4 <= h.total_len);
            assert_eq!(h.source, IpAddr::from(<[u8; 4]>::try_from(&data[12..16]).unwrap()));
            assert_eq!(h.destination, IpAddr::from(<[u8; 4]>::try_from(&data[16..20]).unwrap()));
        }
        6 => {
            assert!(h.total_len >= 40);
            assert_eq!(h.total_len, 40 + u16::from_be_bytes([data[4], data[5]]) as usize);
            assert_eq!(h.source, IpAddr::from(<[u8; 16]>::try_from(&data[8..24]).unwrap()));
            assert_eq!(h.destination, IpAddr::from(<[u8; 16]>::try_from(&data[24..40]).unwrap()));
        }
        v => panic!("parse_header accepted IP version {v}"),
    }
}
