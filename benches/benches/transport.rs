//! Per-core transport and handshake costs: wiremesh (both AEAD providers)
//! against boringtun and against ring's bare ChaCha20-Poly1305.
//!
//! Each transport iteration seals one IP packet on one side and opens it on
//! the other (in place for wiremesh, buffer to buffer for boringtun, whose
//! API copies); throughput counts IP packet bytes. The `batch64` groups do 64
//! packets per iteration, as a driver does per system call. Handshakes are a
//! full exchange (initiation, response, confirming keepalive) between two
//! fresh peers, set up outside the timed part.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use std::net::IpAddr;
use wiremesh_benches::{ipv4_packet, Pair, ADDR_A, KEY_A, KEY_B, MAX_DATAGRAM};
use wiremesh_core::crypto::{CryptoProvider, Portable, Ring};
use wiremesh_core::device::{Encapsulated, Received, HEADROOM, TAILROOM};
use wiremesh_core::messages::padded_len;

const SIZES: [usize; 3] = [64, 512, 1420];
const BATCH: usize = 64;

/// Seals on A and opens on B, in place. The plaintext is back in the buffer
/// after opening, so only the IP header is rewritten (the transport header
/// overwrote nothing of it, but this keeps the loop honest if that changes).
#[inline]
fn wiremesh_round_trip<P: CryptoProvider>(pair: &mut Pair<P>, buf: &mut [u8], packet: &[u8]) -> usize {
    buf[HEADROOM..HEADROOM + 20].copy_from_slice(&packet[..20]);
    let Ok(Encapsulated::Ready(t)) = pair.a.encapsulate(buf, packet.len(), pair.now) else {
        panic!("session is up");
    };
    match pair.b.handle_datagram(ADDR_A, &mut buf[..t.len], pair.now) {
        Ok(Received::Packet { range, .. }) => range.len(),
        other => panic!("packet refused: {other:?}"),
    }
}

fn packet_buffer(packet: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; HEADROOM + packet.len() + TAILROOM];
    buf[HEADROOM..HEADROOM + packet.len()].copy_from_slice(packet);
    buf
}

fn bench_wiremesh<P: CryptoProvider>(c: &mut Criterion) {
    let name = format!("wiremesh-{}", P::NAME);
    for &len in &SIZES {
        let packet = ipv4_packet(len);
        let mut group = c.benchmark_group("transport");
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new(&name, len), |b| {
            let mut pair = Pair::<P>::connected();
            let mut buf = packet_buffer(&packet);
            b.iter(|| black_box(wiremesh_round_trip(&mut pair, &mut buf, &packet)));
        });
        group.finish();

        let mut group = c.benchmark_group("transport-batch64");
        group.throughput(Throughput::Bytes((len * BATCH) as u64));
        group.bench_function(BenchmarkId::new(&name, len), |b| {
            let mut pair = Pair::<P>::connected();
            let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| packet_buffer(&packet)).collect();
            let mut lens = [0usize; BATCH];
            b.iter(|| {
                for (buf, n) in bufs.iter_mut().zip(lens.iter_mut()) {
                    buf[HEADROOM..HEADROOM + 20].copy_from_slice(&packet[..20]);
                    let Ok(Encapsulated::Ready(t)) = pair.a.encapsulate(buf, packet.len(), pair.now) else {
                        panic!("session is up");
                    };
                    *n = t.len;
                }
                let mut total = 0;
                for (buf, &n) in bufs.iter_mut().zip(lens.iter()) {
                    match pair.b.handle_datagram(ADDR_A, &mut buf[..n], pair.now) {
                        Ok(Received::Packet { range, .. }) => total += range.len(),
                        other => panic!("packet refused: {other:?}"),
                    }
                }
                black_box(total)
            });
        });
        group.finish();
    }
}

fn boringtun_pair() -> (Tunn, Tunn) {
    let a_secret = x25519::StaticSecret::from(KEY_A);
    let b_secret = x25519::StaticSecret::from(KEY_B);
    let a_public = x25519::PublicKey::from(&a_secret);
    let b_public = x25519::PublicKey::from(&b_secret);
    let a = Tunn::new(a_secret, b_public, None, None, 1, None);
    let b = Tunn::new(b_secret, a_public, None, None, 2, None);
    (a, b)
}

/// Initiation, response, confirming keepalive: the same exchange as
/// [`Pair::handshake`].
fn boringtun_handshake(a: &mut Tunn, b: &mut Tunn, buf: &mut [u8], out: &mut [u8]) {
    let init = match a.format_handshake_initiation(buf, false) {
        TunnResult::WriteToNetwork(m) => m,
        _ => panic!("no initiation"),
    };
    let response = match b.decapsulate(None, init, out) {
        TunnResult::WriteToNetwork(m) => m,
        _ => panic!("initiation refused"),
    };
    let keepalive = match a.decapsulate(None, response, buf) {
        TunnResult::WriteToNetwork(m) => m,
        _ => panic!("response refused"),
    };
    match b.decapsulate(None, keepalive, out) {
        TunnResult::Done => {}
        _ => panic!("keepalive refused"),
    }
}

fn boringtun_connected() -> (Tunn, Tunn) {
    let (mut a, mut b) = boringtun_pair();
    let (mut buf, mut out) = ([0u8; MAX_DATAGRAM], [0u8; MAX_DATAGRAM]);
    boringtun_handshake(&mut a, &mut b, &mut buf, &mut out);
    (a, b)
}

#[inline]
fn boringtun_round_trip(
    a: &mut Tunn,
    b: &mut Tunn,
    src: IpAddr,
    packet: &[u8],
    wire: &mut [u8],
    out: &mut [u8],
) -> usize {
    let n = match a.encapsulate(packet, wire) {
        TunnResult::WriteToNetwork(d) => d.len(),
        _ => panic!("session is up"),
    };
    match b.decapsulate(Some(src), &wire[..n], out) {
        TunnResult::WriteToTunnelV4(p, _) => p.len(),
        _ => panic!("packet refused"),
    }
}

fn bench_boringtun(c: &mut Criterion) {
    let src = ADDR_A.ip();
    for &len in &SIZES {
        let packet = ipv4_packet(len);
        let mut group = c.benchmark_group("transport");
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new("boringtun", len), |bch| {
            let (mut a, mut b) = boringtun_connected();
            let (mut wire, mut out) = ([0u8; MAX_DATAGRAM], [0u8; MAX_DATAGRAM]);
            bch.iter(|| black_box(boringtun_round_trip(&mut a, &mut b, src, &packet, &mut wire, &mut out)));
        });
        group.finish();

        let mut group = c.benchmark_group("transport-batch64");
        group.throughput(Throughput::Bytes((len * BATCH) as u64));
        group.bench_function(BenchmarkId::new("boringtun", len), |bch| {
            let (mut a, mut b) = boringtun_connected();
            let mut wires = vec![[0u8; MAX_DATAGRAM]; BATCH];
            let mut lens = [0usize; BATCH];
            let mut out = [0u8; MAX_DATAGRAM];
            bch.iter(|| {
                for (wire, n) in wires.iter_mut().zip(lens.iter_mut()) {
                    *n = match a.encapsulate(&packet, wire) {
                        TunnResult::WriteToNetwork(d) => d.len(),
                        _ => panic!("session is up"),
                    };
                }
                let mut total = 0;
                for (wire, &n) in wires.iter().zip(lens.iter()) {
                    match b.decapsulate(Some(src), &wire[..n], &mut out) {
                        TunnResult::WriteToTunnelV4(p, _) => total += p.len(),
                        _ => panic!("packet refused"),
                    }
                }
                black_box(total)
            });
        });
        group.finish();
    }
}

/// ring's ChaCha20-Poly1305 sealing and opening the padded packet in place,
/// nothing else: the ceiling any WireGuard on ring can reach.
fn bench_bare_aead(c: &mut Criterion) {
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("32-byte key"));
    let nonce = |counter: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    };
    for &len in &SIZES {
        let padded = padded_len(len);
        let mut group = c.benchmark_group("transport");
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new("ring-aead", len), |b| {
            let mut buf = vec![0x5au8; padded];
            let mut counter = 0u64;
            b.iter(|| {
                counter += 1;
                let tag = key.seal_in_place_separate_tag(nonce(counter), Aad::empty(), &mut buf).expect("seal");
                let plain =
                    key.open_in_place_separate_tag(nonce(counter), Aad::empty(), tag, &mut buf, 0..).expect("open");
                black_box(plain.len())
            });
        });
        group.finish();
    }
}

fn bench_handshakes(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("wiremesh-fresh", |b| {
        // Returning the pair keeps its drop out of the timed part.
        b.iter_batched(
            Pair::<Ring>::new,
            |mut p| {
                p.handshake();
                p
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("wiremesh-reuse", |b| {
        let mut p = Pair::<Ring>::connected();
        b.iter(|| p.rehandshake());
    });
    group.bench_function("boringtun-fresh", |b| {
        let (mut buf, mut out) = ([0u8; MAX_DATAGRAM], [0u8; MAX_DATAGRAM]);
        b.iter_batched(
            boringtun_pair,
            |(mut ta, mut tb)| {
                boringtun_handshake(&mut ta, &mut tb, &mut buf, &mut out);
                (ta, tb)
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn transport(c: &mut Criterion) {
    bench_wiremesh::<Portable>(c);
    bench_wiremesh::<Ring>(c);
    bench_boringtun(c);
    bench_bare_aead(c);
}

criterion_group!(benches, transport, bench_handshakes);
criterion_main!(benches);
