//! Property tests of the allowed-IPs table against a reference model: a list
//! of (prefix, length, owner) searched linearly for the longest match.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::HashMap;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wiremesh_core::routing::{AllowedIps, PrefixError};

/// Clears the host bits of `addr` beyond `len`.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

fn width(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// The obviously correct table.
#[derive(Default)]
struct Model {
    entries: Vec<(IpAddr, u8, u32)>,
}

impl Model {
    fn insert(&mut self, addr: IpAddr, len: u8, value: u32) -> Option<u32> {
        let addr = mask(addr, len);
        let prev = self.remove(addr, len);
        self.entries.push((addr, len, value));
        prev
    }

    fn remove(&mut self, addr: IpAddr, len: u8) -> Option<u32> {
        let addr = mask(addr, len);
        let i = self.entries.iter().position(|&(a, l, _)| a == addr && l == len)?;
        Some(self.entries.swap_remove(i).2)
    }

    fn remove_value(&mut self, value: u32) {
        self.entries.retain(|&(_, _, v)| v != value);
    }

    fn lookup(&self, addr: IpAddr) -> Option<u32> {
        self.entries
            .iter()
            .filter(|&&(a, l, _)| a.is_ipv4() == addr.is_ipv4() && mask(addr, l) == a)
            .max_by_key(|&&(_, l, _)| l)
            .map(|&(_, _, v)| v)
    }

    fn prefixes_of(&self, value: u32) -> Vec<(IpAddr, u8)> {
        let mut out: Vec<(IpAddr, u8)> =
            self.entries.iter().filter(|&&(_, _, v)| v == value).map(|&(a, l, _)| (a, l)).collect();
        // IPv4 before IPv6, then by address and length, as the table lists them.
        out.sort_by_key(|&(a, l)| (a.is_ipv6(), a, l));
        out
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(IpAddr, u8, u32),
    Remove(IpAddr, u8),
    RemoveValue(u32),
    Lookup(IpAddr),
}

/// IPv4 addresses that often share leading bits: a few bases with random
/// low bits, and now and then a fully random address.
fn v4_addr() -> impl Strategy<Value = IpAddr> {
    const BASES: [u32; 5] = [0x0a00_0000u32, 0x6440_0000, 0xc0a8_0100, 0xffff_ff00, 0x0000_0000];
    prop_oneof![
        4 => (prop::sample::select(&BASES[..]), 0u32..=32, any::<u32>())
            .prop_map(|(b, bits, r)| b ^ (r & u32::MAX.checked_shr(32 - bits).unwrap_or(0))),
        1 => any::<u32>(),
    ]
    .prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)))
}

fn v6_addr() -> impl Strategy<Value = IpAddr> {
    const BASES6: [u128; 5] = [
        0xfd7a_115c_a1e0_0000_0000_0000_0000_0000u128,
        0x2001_0db8_0000_0000_0000_0000_0000_0000,
        0xfe80_0000_0000_0000_0000_0000_0000_0001,
        0,
        u128::MAX,
    ];
    prop_oneof![
        4 => (prop::sample::select(&BASES6[..]), 0u32..=128, any::<u128>())
            .prop_map(|(b, bits, r)| b ^ (r & u128::MAX.checked_shr(128 - bits).unwrap_or(0))),
        1 => any::<u128>(),
    ]
    .prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![v4_addr(), v6_addr()]
}

/// A prefix length for `addr`, with the extremes (0 and full length) common.
fn prefix(addr: IpAddr) -> impl Strategy<Value = (IpAddr, u8)> {
    let w = width(addr);
    prop_oneof![1 => Just(0u8), 1 => Just(w), 4 => 0..=w].prop_map(move |l| (addr, l))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (addr().prop_flat_map(prefix), 0u32..8).prop_map(|((a, l), v)| Op::Insert(a, l, v)),
        2 => addr().prop_flat_map(prefix).prop_map(|(a, l)| Op::Remove(a, l)),
        1 => (0u32..8).prop_map(Op::RemoveValue),
        6 => addr().prop_map(Op::Lookup),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn matches_reference_model(ops in prop::collection::vec(op(), 1..300)) {
        let mut table = AllowedIps::new();
        let mut model = Model::default();
        let mut inserted: Vec<IpAddr> = Vec::new();
        for op in &ops {
            match *op {
                Op::Insert(a, l, v) => {
                    prop_assert_eq!(table.insert(a, l, v), Ok(model.insert(a, l, v)), "{:?}", op);
                    inserted.push(a);
                }
                Op::Remove(a, l) => prop_assert_eq!(table.remove(a, l), model.remove(a, l), "{:?}", op),
                Op::RemoveValue(v) => {
                    table.remove_value(v);
                    model.remove_value(v);
                }
                Op::Lookup(a) => prop_assert_eq!(table.lookup(a), model.lookup(a), "{:?}", op),
            }
            prop_assert_eq!(table.len(), model.entries.len());
            prop_assert_eq!(table.is_empty(), model.entries.is_empty());
        }
        // Every address that was inserted, and its neighbours, after all changes.
        for (i, &a) in inserted.iter().enumerate() {
            for probe in neighbours(a, i) {
                let want = model.lookup(probe);
                prop_assert_eq!(table.lookup(probe), want, "{}", probe);
                match probe {
                    IpAddr::V4(v4) => prop_assert_eq!(table.lookup_v4(v4.octets()), want),
                    IpAddr::V6(v6) => prop_assert_eq!(table.lookup_v6(v6.octets()), want),
                }
            }
        }
        for v in 0..8 {
            prop_assert_eq!(table.prefixes_of(v).collect::<Vec<_>>(), model.prefixes_of(v));
        }
        table.clear();
        prop_assert!(table.is_empty());
        prop_assert_eq!(table.lookup(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), None);
    }

    #[test]
    fn rejects_overlong_prefixes(a in addr(), extra in 1u8..=127) {
        let len = width(a).saturating_add(extra);
        let mut table = AllowedIps::new();
        prop_assert_eq!(
            table.insert(a, len, 1u32),
            Err(PrefixError::TooLong { prefix_len: len, max: width(a) })
        );
        prop_assert_eq!(table.remove(a, len), None);
        prop_assert!(table.is_empty());
    }
}

/// `addr`, the addresses one below and above it, and `addr` with one of
/// three bits (chosen by `salt`) flipped: addresses that share all but a few
/// bits with a prefix are the ones that catch a wrong match.
fn neighbours(addr: IpAddr, salt: usize) -> [IpAddr; 6] {
    let flips = [salt, salt * 5 + 3, salt * 11 + 7];
    match addr {
        IpAddr::V4(a) => {
            let a = u32::from(a);
            let f = flips.map(|k| a ^ (1 << (k % 32)));
            [a, a.wrapping_sub(1), a.wrapping_add(1), f[0], f[1], f[2]].map(|x| IpAddr::V4(Ipv4Addr::from(x)))
        }
        IpAddr::V6(a) => {
            let a = u128::from(a);
            let f = flips.map(|k| a ^ (1 << (k % 128)));
            [a, a.wrapping_sub(1), a.wrapping_add(1), f[0], f[1], f[2]].map(|x| IpAddr::V6(Ipv6Addr::from(x)))
        }
    }
}

/// The longest match by probing every length in a hash map of the prefixes:
/// independent of the table's structure and fast enough for 100,000 entries.
fn probe_lookup(map: &HashMap<(IpAddr, u8), u32>, addr: IpAddr) -> Option<u32> {
    (0..=width(addr)).rev().find_map(|l| map.get(&(mask(addr, l), l)).copied())
}

#[test]
fn hundred_thousand_prefixes() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_a110_ed19);
    let mut table = AllowedIps::new();
    let mut map: HashMap<(IpAddr, u8), u32> = HashMap::new();
    let mut addrs = Vec::new();
    for i in 0..100_000u32 {
        let (a, l) = match i % 4 {
            // Random IPv4 prefixes of every length.
            0 => (IpAddr::V4(Ipv4Addr::from(rng.gen::<u32>())), rng.gen_range(0..=32)),
            // Tailnet-style host routes, dense in 100.64.0.0/10.
            1 => (IpAddr::V4(Ipv4Addr::from(0x6440_0000 | (rng.gen::<u32>() & 0x003f_ffff))), 32),
            // Random IPv6 prefixes of every length.
            2 => (IpAddr::V6(Ipv6Addr::from(rng.gen::<u128>())), rng.gen_range(0..=128)),
            // Host routes in one ULA /48.
            _ => {
                let a = 0xfd7a_115c_a1e0_0000_0000_0000_0000_0000u128 | (rng.gen::<u128>() >> 48);
                (IpAddr::V6(Ipv6Addr::from(a)), 128)
            }
        };
        let value = rng.gen_range(0..1000);
        let prev = map.insert((mask(a, l), l), value);
        assert_eq!(table.insert(a, l, value), Ok(prev));
        addrs.push(a);
    }
    assert_eq!(table.len(), map.len());

    let check = |table: &AllowedIps<u32>, map: &HashMap<(IpAddr, u8), u32>, rng: &mut ChaCha8Rng| {
        for (i, &a) in addrs.iter().enumerate().step_by(3) {
            for probe in neighbours(a, i) {
                assert_eq!(table.lookup(probe), probe_lookup(map, probe), "{probe}");
            }
        }
        for _ in 0..20_000 {
            let probe = if rng.gen() {
                IpAddr::V4(Ipv4Addr::from(rng.gen::<u32>()))
            } else {
                IpAddr::V6(Ipv6Addr::from(rng.gen::<u128>()))
            };
            assert_eq!(table.lookup(probe), probe_lookup(map, probe), "{probe}");
        }
    };
    check(&table, &map, &mut rng);

    // Remove about half, by prefix and by owner, and check again.
    for &a in addrs.iter().step_by(2) {
        let l = rng.gen_range(0..=width(a));
        assert_eq!(table.remove(a, l), map.remove(&(mask(a, l), l)));
        for l in [width(a), 24, 64] {
            if l <= width(a) {
                assert_eq!(table.remove(a, l), map.remove(&(mask(a, l), l)));
            }
        }
    }
    for v in (0..1000).step_by(7) {
        table.remove_value(v);
        map.retain(|_, &mut owner| owner != v);
    }
    assert_eq!(table.len(), map.len());
    check(&table, &map, &mut rng);

    let mut listed: Vec<(IpAddr, u8)> = table.prefixes_of(1).collect();
    let mut want: Vec<(IpAddr, u8)> = map.iter().filter(|&(_, &v)| v == 1).map(|(&k, _)| k).collect();
    want.sort_by_key(|&(a, l)| (a.is_ipv6(), a, l));
    assert_eq!(listed, want);
    listed.dedup();
    assert_eq!(listed.len(), want.len());
}
