//! Allowed-IPs lookups in a table of 100,000 random prefixes (60% IPv4, 40%
//! IPv6, lengths weighted the way tailnets and site routes look: mostly host
//! routes, then /24s and /64s, a tail of shorter site prefixes).
//!
//! Half of the looked-up addresses fall inside a stored prefix (a random
//! host within it), half are uniformly random; each iteration looks up
//! 1024 of them, so criterion's time per element is the time per lookup.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use wiremesh_core::routing::AllowedIps;

const PREFIXES: usize = 100_000;
const LOOKUPS: usize = 1024;

fn pick<T: Copy>(rng: &mut ChaCha20Rng, weighted: &[(u32, T)]) -> T {
    let total: u32 = weighted.iter().map(|w| w.0).sum();
    let mut r = rng.next_u32() % total;
    for &(w, v) in weighted {
        if r < w {
            return v;
        }
        r -= w;
    }
    unreachable!("weights sum to total")
}

fn range(rng: &mut ChaCha20Rng, lo: u8, hi: u8) -> u8 {
    lo + (rng.next_u32() % u32::from(hi - lo + 1)) as u8
}

fn random_prefix(rng: &mut ChaCha20Rng) -> (IpAddr, u8) {
    if rng.next_u32() % 10 < 6 {
        let len = match pick(rng, &[(40, 0), (25, 1), (25, 2), (10, 3)]) {
            0 => 32,
            1 => 24,
            2 => range(rng, 16, 31),
            _ => range(rng, 8, 15),
        };
        (IpAddr::V4(Ipv4Addr::from(rng.next_u32())), len)
    } else {
        let len = match pick(rng, &[(40, 0), (30, 1), (15, 2), (10, 3), (5, 4)]) {
            0 => 128,
            1 => 64,
            2 => 48,
            3 => 56,
            _ => range(rng, 32, 47),
        };
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        (IpAddr::V6(Ipv6Addr::from(b)), len)
    }
}

/// A random address inside `prefix/len`.
fn host_in(rng: &mut ChaCha20Rng, prefix: IpAddr, len: u8) -> IpAddr {
    match prefix {
        IpAddr::V4(p) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from((u32::from(p) & mask) | (rng.next_u32() & !mask)))
        }
        IpAddr::V6(p) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            let r = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
            IpAddr::V6(Ipv6Addr::from((u128::from(p) & mask) | (r & !mask)))
        }
    }
}

fn table(rng: &mut ChaCha20Rng) -> (AllowedIps<u32>, Vec<(IpAddr, u8)>) {
    let mut t = AllowedIps::new();
    let mut prefixes = Vec::with_capacity(PREFIXES);
    for i in 0..PREFIXES {
        let (addr, len) = random_prefix(rng);
        t.insert(addr, len, i as u32 % 1000).expect("valid prefix length");
        prefixes.push((addr, len));
    }
    (t, prefixes)
}

fn lookups(rng: &mut ChaCha20Rng, prefixes: &[(IpAddr, u8)], family: Option<bool>) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(LOOKUPS);
    while out.len() < LOOKUPS {
        let addr = if rng.next_u32() % 2 == 0 {
            let (p, l) = prefixes[rng.next_u32() as usize % prefixes.len()];
            host_in(rng, p, l)
        } else {
            random_prefix(rng).0
        };
        if family.is_none_or(|v6| addr.is_ipv6() == v6) {
            out.push(addr);
        }
    }
    out
}

fn bench_routing(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let (t, prefixes) = table(&mut rng);
    let mut group = c.benchmark_group("allowed_ips");
    group.throughput(Throughput::Elements(LOOKUPS as u64));
    for (name, family) in [("lookup-mixed", None), ("lookup-v4", Some(false)), ("lookup-v6", Some(true))] {
        let addrs = lookups(&mut rng, &prefixes, family);
        let hits = addrs.iter().filter(|a| t.lookup(**a).is_some()).count();
        eprintln!("allowed_ips/{name}: {} prefixes, {hits}/{LOOKUPS} lookups hit", t.len());
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut found = 0u32;
                for &a in &addrs {
                    if let Some(v) = t.lookup(black_box(a)) {
                        found = found.wrapping_add(v);
                    }
                }
                black_box(found)
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("allowed_ips");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PREFIXES as u64));
    group.bench_function("insert-100k", |b| {
        b.iter(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(42);
            black_box(table(&mut rng).0.len())
        });
    });
    group.finish();
}

criterion_group!(benches, bench_routing);
criterion_main!(benches);
