//! Cryptokey routing: the allowed-IPs table mapping an IP address to the peer
//! that owns it by longest prefix match (WireGuard paper, section 2).
//!
//! Outbound, the destination of a packet read from the tunnel selects the peer
//! to encrypt it for; inbound, the source of a decrypted packet must map back
//! to the peer whose key opened it.
//!
//! # Data structure
//!
//! Each address family is a trie stored in flat vectors and addressed by
//! `u32` indices, built for lookups that touch little memory:
//!
//! * The root is a direct table over the first 12 bits (4096 slots, 48 KiB,
//!   which stays in cache). Prefixes of up to 12 bits are expanded over its
//!   slots; a slot also names the node that decides the following bits.
//! * Below it, each node decides 4 bits (16-way). Prefixes whose length ends
//!   within those 4 bits live in the node, expanded over the 16 nibble values
//!   (longest wins); a node whose prefixes form one run with a value (most
//!   nodes) keeps it inline, others point at a run-length encoded block.
//! * A node's children sit next to each other, so the child for nibble `x` is
//!   at `child_base + popcount(child_bits below x)`: one dependent load per
//!   level, as in poptrie.
//! * Paths are compressed: a node records its depth and the address bits
//!   above it, so chains of prefix-less single-child nodes are skipped and a
//!   lookup checks the skipped bits with one masked comparison.
//!
//! A lookup reads one root slot and then a few 40-byte (IPv6) or 28-byte
//! (IPv4) nodes, remembering the last match, with no allocation and no
//! hashing. At 100,000 prefixes the whole table is a few MiB. Changes are
//! configuration-time work: each rebuilds one node's values and reallocates
//! at most two small blocks; free blocks are reused by size and the vectors
//! compacted once a quarter of them is free. The authoritative set of
//! prefixes is a `BTreeMap`, which also gives listings a defined order.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::ops::{BitAnd, BitOr, BitXor, Not};

/// A prefix length that is too long for its address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrefixError {
    /// The prefix length exceeds the address width (32 for IPv4, 128 for IPv6).
    TooLong {
        /// The length that was asked for.
        prefix_len: u8,
        /// The width of the address family.
        max: u8,
    },
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefixError::TooLong { prefix_len, max } => {
                write!(f, "prefix length {prefix_len} exceeds the address width of {max} bits")
            }
        }
    }
}

impl core::error::Error for PrefixError {}

/// The allowed-IPs table: IPv4 and IPv6 prefixes, each owned by one value
/// (typically a peer id), looked up by longest prefix match.
#[derive(Clone)]
pub struct AllowedIps<T> {
    v4: Trie<u32, T>,
    v6: Trie<u128, T>,
}

impl<T: Copy + Eq> Default for AllowedIps<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Eq + fmt::Debug> fmt::Debug for AllowedIps<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (addr, len, value) in self.iter() {
            m.entry(&format_args!("{addr}/{len}"), &value);
        }
        m.finish()
    }
}

impl<T: Copy + Eq> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        AllowedIps { v4: Trie::new(), v6: Trie::new() }
    }

    /// Maps `addr/prefix_len` (host bits cleared) to `value`, returning the
    /// previous owner of exactly that prefix.
    pub fn insert(&mut self, addr: IpAddr, prefix_len: u8, value: T) -> Result<Option<T>, PrefixError> {
        match addr {
            IpAddr::V4(a) => {
                check_len(prefix_len, 32)?;
                Ok(self.v4.insert(u32::from(a), prefix_len, value))
            }
            IpAddr::V6(a) => {
                check_len(prefix_len, 128)?;
                Ok(self.v6.insert(u128::from(a), prefix_len, value))
            }
        }
    }

    /// Removes the exact prefix `addr/prefix_len` (host bits ignored) and
    /// returns its owner, if it was present.
    pub fn remove(&mut self, addr: IpAddr, prefix_len: u8) -> Option<T> {
        match addr {
            IpAddr::V4(a) if prefix_len <= 32 => self.v4.remove(u32::from(a), prefix_len),
            IpAddr::V6(a) if prefix_len <= 128 => self.v6.remove(u128::from(a), prefix_len),
            _ => None,
        }
    }

    /// Removes every prefix owned by `value` (a scan of the whole table).
    pub fn remove_value(&mut self, value: T) {
        self.v4.remove_value(value);
        self.v6.remove_value(value);
    }

    /// The owner of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// The owner of the longest IPv4 prefix containing `addr` (network order).
    #[inline]
    pub fn lookup_v4(&self, addr: [u8; 4]) -> Option<T> {
        self.v4.lookup(u32::from_be_bytes(addr))
    }

    /// The owner of the longest IPv6 prefix containing `addr` (network order).
    #[inline]
    pub fn lookup_v6(&self, addr: [u8; 16]) -> Option<T> {
        self.v6.lookup(u128::from_be_bytes(addr))
    }

    /// The prefixes owned by `value`, IPv4 first, each family sorted by address
    /// then length.
    pub fn prefixes_of(&self, value: T) -> impl Iterator<Item = (IpAddr, u8)> + '_ {
        self.iter().filter(move |&(_, _, v)| v == value).map(|(a, l, _)| (a, l))
    }

    /// Every entry as `(address, prefix length, owner)`, IPv4 first, each
    /// family sorted by address then length.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, u8, T)> + '_ {
        let v4 = self.v4.sorted().into_iter().map(|(a, l, v)| (IpAddr::V4(Ipv4Addr::from(a)), l, v));
        let v6 = self.v6.sorted().into_iter().map(|(a, l, v)| (IpAddr::V6(Ipv6Addr::from(a)), l, v));
        v4.chain(v6)
    }

    /// The number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every prefix.
    pub fn clear(&mut self) {
        self.v4 = Trie::new();
        self.v6 = Trie::new();
    }
}

fn check_len(prefix_len: u8, max: u8) -> Result<(), PrefixError> {
    if prefix_len > max {
        Err(PrefixError::TooLong { prefix_len, max })
    } else {
        Ok(())
    }
}

/// Address bits each trie node decides on.
const STRIDE: u32 = 4;

/// An address as an unsigned integer, most significant bit first.
trait Key:
    Copy + Ord + Eq + BitAnd<Output = Self> + BitOr<Output = Self> + BitXor<Output = Self> + Not<Output = Self>
{
    /// Width in bits.
    const BITS: u32;
    /// All bits clear.
    const ZERO: Self;
    /// All bits set.
    const ONES: Self;
    /// The form kept in nodes: IPv6 as two words, so nodes stay 8-byte
    /// aligned (40 bytes rather than 48).
    type Packed: Copy + fmt::Debug;
    fn pack(self) -> Self::Packed;
    fn unpack(p: Self::Packed) -> Self;
    fn checked_shl(self, n: u32) -> Option<Self>;
    fn shr(self, n: u32) -> Self;
    fn low_u32(self) -> u32;
    fn leading_zeros(self) -> u32;

    /// Stride `i` (4 bits), counting from the most significant.
    #[inline(always)]
    fn nibble(self, i: u8) -> u8 {
        self.shr(Self::BITS - STRIDE - STRIDE * u32::from(i)).low_u32() as u8 & 0xf
    }

    /// The root slot of this address: its top [`ROOT_BITS`] bits.
    #[inline(always)]
    fn root_slot(self) -> usize {
        self.shr(Self::BITS - ROOT_BITS).low_u32() as usize
    }

    /// The top `bits` bits set.
    #[inline(always)]
    fn mask(bits: u32) -> Self {
        Self::ONES.checked_shl(Self::BITS - bits).unwrap_or(Self::ZERO)
    }
}

impl Key for u32 {
    const BITS: u32 = 32;
    const ZERO: Self = 0;
    const ONES: Self = u32::MAX;
    type Packed = u32;
    #[inline(always)]
    fn pack(self) -> u32 {
        self
    }
    #[inline(always)]
    fn unpack(p: u32) -> u32 {
        p
    }
    #[inline(always)]
    fn checked_shl(self, n: u32) -> Option<Self> {
        u32::checked_shl(self, n)
    }
    #[inline(always)]
    fn shr(self, n: u32) -> Self {
        self >> n
    }
    #[inline(always)]
    fn low_u32(self) -> u32 {
        self
    }
    #[inline(always)]
    fn leading_zeros(self) -> u32 {
        u32::leading_zeros(self)
    }
}

impl Key for u128 {
    const BITS: u32 = 128;
    const ZERO: Self = 0;
    const ONES: Self = u128::MAX;
    type Packed = [u64; 2];
    #[inline(always)]
    fn pack(self) -> [u64; 2] {
        [(self >> 64) as u64, self as u64]
    }
    #[inline(always)]
    fn unpack(p: [u64; 2]) -> u128 {
        (u128::from(p[0]) << 64) | u128::from(p[1])
    }
    #[inline(always)]
    fn checked_shl(self, n: u32) -> Option<Self> {
        u128::checked_shl(self, n)
    }
    #[inline(always)]
    fn shr(self, n: u32) -> Self {
        self >> n
    }
    #[inline(always)]
    fn low_u32(self) -> u32 {
        self as u32
    }
    #[inline(always)]
    fn leading_zeros(self) -> u32 {
        u128::leading_zeros(self)
    }
}

/// `run_base` of a node whose values fit in its `inline` fields: at most one
/// run holds a value. Run block 0 is a placeholder, so no real block starts here.
const INLINE: u32 = 0;

/// One trie node: 4 address bits' worth of children and prefix values.
#[derive(Clone, Copy, Debug)]
struct Node<P, T> {
    /// The address bits above this node (`STRIDE * depth` of them), the rest zero.
    path: P,
    /// Index of the first child in `Trie::nodes`; children follow in order.
    child_base: u32,
    /// Index of the first run value in `Trie::runs`, or [`INLINE`].
    run_base: u32,
    /// Bit `x` set: a child for nibble value `x`.
    child_bits: u16,
    /// Bit `x` set: a new value run starts at nibble value `x` (bit 0 always
    /// set). Unused with [`INLINE`] runs.
    run_bits: u16,
    /// Which stride of the address this node decides on.
    depth: u8,
    /// With [`INLINE`] runs: nibbles `inline_lo..=inline_hi` map to `inline`
    /// and the others to nothing. Most nodes hold one prefix, and this saves
    /// their lookups a dependent load.
    inline_lo: u8,
    /// See `inline_lo`.
    inline_hi: u8,
    /// See `inline_lo`; `None` when the node holds no prefix.
    inline: Option<T>,
}

impl<P: Copy, T: Copy> Node<P, T> {
    fn new(depth: u8, path: P) -> Self {
        Node {
            path,
            child_base: 0,
            run_base: INLINE,
            child_bits: 0,
            run_bits: 0,
            depth,
            inline_lo: 0,
            inline_hi: 15,
            inline: None,
        }
    }

    /// Whether any prefix lives in this node.
    fn has_prefixes(&self) -> bool {
        self.run_base != INLINE || self.inline.is_some()
    }

    fn has_child(&self, x: u8) -> bool {
        self.child_bits >> x & 1 == 1
    }

    /// Offset of the child for nibble `x` among this node's children.
    #[inline(always)]
    fn child_rank(&self, x: u8) -> u32 {
        popcount16(self.child_bits & ((1u16 << x) - 1))
    }

    /// The value of the longest prefix of this node covering nibble `x`.
    #[inline(always)]
    fn value_at(&self, x: u8, runs: &[Option<T>]) -> Option<T> {
        if self.run_base == INLINE {
            if self.inline_lo <= x && x <= self.inline_hi {
                self.inline
            } else {
                None
            }
        } else {
            let upto = self.run_bits & (u16::MAX >> (15 - x));
            runs[(self.run_base + popcount16(upto) - 1) as usize]
        }
    }
}

/// Set bits in each byte value.
static POPCOUNT8: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (i as u8).count_ones() as u8;
        i += 1;
    }
    t
};

/// `count_ones` by table: the baseline x86_64 target has no POPCNT, and the
/// portable bit trick is a long dependency chain on every trie level.
#[inline(always)]
fn popcount16(v: u16) -> u32 {
    u32::from(POPCOUNT8[usize::from(v & 0xff)]) + u32::from(POPCOUNT8[usize::from(v >> 8)])
}

/// Free blocks of a flat vector, by block length (1..=16).
#[derive(Clone, Debug)]
struct FreeLists {
    by_len: [Vec<u32>; 17],
    /// Total length of the free blocks.
    slots: usize,
}

impl FreeLists {
    fn new() -> Self {
        FreeLists { by_len: Default::default(), slots: 0 }
    }

    /// A block of `len` items; its contents are unspecified (`fill` where new).
    fn take<E: Copy>(&mut self, items: &mut Vec<E>, len: u32, fill: E) -> u32 {
        if let Some(base) = self.by_len[len as usize].pop() {
            self.slots -= len as usize;
            return base;
        }
        let base = u32::try_from(items.len()).expect("allowed-IPs table exceeds 2^32 entries");
        items.resize(items.len() + len as usize, fill);
        base
    }

    fn give(&mut self, base: u32, len: u32) {
        if len > 0 {
            self.by_len[len as usize].push(base);
            self.slots += len as usize;
        }
    }
}

/// Address bits the root decides on at once, through a direct table.
const ROOT_BITS: u32 = 12;
/// Slots in the root table.
const ROOT_SLOTS: usize = 1 << ROOT_BITS;
/// The depth of the shallowest nodes, just below the root.
const ROOT_DEPTH: u8 = (ROOT_BITS / STRIDE) as u8;
/// A root slot without a child.
const NO_CHILD: u32 = u32::MAX;

/// One of the root's slots: the longest prefix of at most [`ROOT_BITS`] bits
/// covering it, and the node (if any) deciding on the following bits.
#[derive(Clone, Copy, Debug)]
struct RootSlot<T> {
    child: u32,
    value: Option<T>,
}

/// The table of one address family.
///
/// The root is a direct table over the first [`ROOT_BITS`] bits, holding the
/// prefixes of up to that length expanded over its slots. Below it hangs a
/// path-compressed trie of 16-way nodes, one per 4 bits. A node's children
/// are one block of `nodes`; the root's children are single-node blocks.
#[derive(Clone, Debug)]
struct Trie<K: Key, T> {
    /// Empty until the first insertion, then [`ROOT_SLOTS`] long.
    root: Vec<RootSlot<T>>,
    /// For each root slot, the length of the prefix behind its value.
    root_lens: Vec<u8>,
    /// Node blocks.
    nodes: Vec<Node<K::Packed, T>>,
    node_free: FreeLists,
    /// Value runs of the nodes that need more than their inline fields.
    runs: Vec<Option<T>>,
    run_free: FreeLists,
    /// Every prefix, keyed by (home depth, address, length); prefixes that
    /// live in the root have home depth 0.
    prefixes: BTreeMap<(u8, K, u8), T>,
}

impl<K: Key, T: Copy + Eq> Trie<K, T> {
    fn new() -> Self {
        Trie {
            root: Vec::new(),
            root_lens: Vec::new(),
            nodes: Vec::new(),
            node_free: FreeLists::new(),
            runs: alloc::vec![None],
            run_free: FreeLists::new(),
            prefixes: BTreeMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.prefixes.len()
    }

    #[inline]
    fn lookup(&self, key: K) -> Option<T> {
        let slot = self.root.get(key.root_slot())?;
        let mut best = slot.value;
        let mut idx = slot.child as usize;
        // A node right below its parent only decides bits the parent's walk
        // matched; one further down (a compressed edge) must check its path.
        let mut next_depth = ROOT_DEPTH;
        while let Some(n) = self.nodes.get(idx) {
            if n.depth != next_depth && (key ^ K::unpack(n.path)) & K::mask(STRIDE * u32::from(n.depth)) != K::ZERO {
                break;
            }
            next_depth = n.depth + 1;
            let x = key.nibble(n.depth);
            if let Some(v) = n.value_at(x, &self.runs) {
                best = Some(v);
            }
            if !n.has_child(x) {
                break;
            }
            idx = (n.child_base + n.child_rank(x)) as usize;
        }
        best
    }

    fn insert(&mut self, key: K, len: u8, value: T) -> Option<T> {
        let key = key & K::mask(u32::from(len));
        let depth = home_depth(len);
        let prev = self.prefixes.insert((depth, key, len), value);
        if prev == Some(value) {
            return prev;
        }
        if self.root.is_empty() {
            self.root = alloc::vec![RootSlot { child: NO_CHILD, value: None }; ROOT_SLOTS];
            self.root_lens = alloc::vec![0; ROOT_SLOTS];
        }
        if depth == 0 {
            for s in root_span(key, len) {
                if self.root_lens[s] <= len {
                    self.root_lens[s] = len;
                    self.root[s].value = Some(value);
                }
            }
        } else {
            let home = self.find_or_create(depth, key);
            self.rebuild_runs(home);
            self.maybe_compact();
        }
        prev
    }

    fn remove(&mut self, key: K, len: u8) -> Option<T> {
        let key = key & K::mask(u32::from(len));
        let depth = home_depth(len);
        let prev = self.prefixes.remove(&(depth, key, len))?;
        if depth == 0 {
            // The slots this prefix won fall back to the longest shorter one.
            let (fallback, fallback_len) = (0..len)
                .rev()
                .find_map(|l| self.prefixes.get(&(0, key & K::mask(u32::from(l)), l)).map(|&v| (Some(v), l)))
                .unwrap_or((None, 0));
            for s in root_span(key, len) {
                if self.root_lens[s] == len {
                    self.root_lens[s] = fallback_len;
                    self.root[s].value = fallback;
                }
            }
            return Some(prev);
        }
        // The home node exists while it holds a prefix; walk to it, noting the way.
        let mut ancestors: Vec<(u32, u8)> = Vec::new();
        let mut idx = self.root[key.root_slot()].child;
        while self.nodes[idx as usize].depth < depth {
            let n = &self.nodes[idx as usize];
            let x = key.nibble(n.depth);
            debug_assert!(n.has_child(x));
            ancestors.push((idx, x));
            idx = n.child_base + n.child_rank(x);
        }
        debug_assert_eq!(self.nodes[idx as usize].depth, depth);
        if !self.rebuild_runs(idx) {
            self.prune(key.root_slot(), idx, ancestors);
        }
        self.maybe_compact();
        Some(prev)
    }

    fn remove_value(&mut self, value: T) {
        let doomed: Vec<(K, u8)> =
            self.prefixes.iter().filter(|(_, &v)| v == value).map(|(&(_, k, l), _)| (k, l)).collect();
        for (k, l) in doomed {
            self.remove(k, l);
        }
    }

    /// Every entry sorted by (address, length).
    fn sorted(&self) -> Vec<(K, u8, T)> {
        let mut out: Vec<(K, u8, T)> = self.prefixes.iter().map(|(&(_, k, l), &v)| (k, l, v)).collect();
        out.sort_unstable_by_key(|&(k, l, _)| (k, l));
        out
    }

    /// The node deciding on stride `depth` (below the root) under the path of
    /// `key`, created (splitting a compressed edge if needed) when missing.
    fn find_or_create(&mut self, depth: u8, key: K) -> u32 {
        debug_assert!(depth >= ROOT_DEPTH);
        let path = key & K::mask(STRIDE * u32::from(depth));
        let slot = key.root_slot();
        let mut c = self.root[slot].child;
        if c == NO_CHILD {
            let node = Node::new(depth, path.pack());
            let c = self.node_free.take(&mut self.nodes, 1, node);
            self.nodes[c as usize] = node;
            self.root[slot].child = c;
            return c;
        }
        loop {
            // `c` is a child on the way to `key`: its first stride matches.
            let child = self.nodes[c as usize];
            let child_path = K::unpack(child.path);
            // Whole strides that the new path and the child's path share.
            let same = ((path ^ child_path).leading_zeros() / STRIDE) as u8;
            let common = same.min(child.depth).min(depth);
            if common < child.depth {
                // The edge to `child` skips stride `common`, where the paths
                // part (or where the new prefix belongs): put a node there.
                let mut mid = Node::new(common, (path & K::mask(STRIDE * u32::from(common))).pack());
                let moved = self.node_free.take(&mut self.nodes, 1, child);
                self.nodes[moved as usize] = child;
                mid.child_bits = 1 << child_path.nibble(common);
                mid.child_base = moved;
                self.nodes[c as usize] = mid;
                if common == depth {
                    return c;
                }
                return self.insert_child(c, key.nibble(common), Node::new(depth, path.pack()));
            }
            if child.depth == depth {
                return c;
            }
            let x = key.nibble(child.depth);
            if !child.has_child(x) {
                return self.insert_child(c, x, Node::new(depth, path.pack()));
            }
            c = child.child_base + child.child_rank(x);
        }
    }

    /// Adds `node` as the child of `parent` for nibble `x`; returns its index.
    fn insert_child(&mut self, parent: u32, x: u8, node: Node<K::Packed, T>) -> u32 {
        let p = self.nodes[parent as usize];
        debug_assert!(!p.has_child(x));
        let count = p.child_bits.count_ones();
        let rank = p.child_rank(x);
        let base = self.node_free.take(&mut self.nodes, count + 1, node);
        for i in 0..rank {
            self.nodes[(base + i) as usize] = self.nodes[(p.child_base + i) as usize];
        }
        self.nodes[(base + rank) as usize] = node;
        for i in rank..count {
            self.nodes[(base + i + 1) as usize] = self.nodes[(p.child_base + i) as usize];
        }
        self.node_free.give(p.child_base, count);
        let pn = &mut self.nodes[parent as usize];
        pn.child_bits |= 1 << x;
        pn.child_base = base;
        base + rank
    }

    /// Removes the (prefix-less, childless) child of `parent` for nibble `x`.
    fn remove_child(&mut self, parent: u32, x: u8) {
        let p = self.nodes[parent as usize];
        debug_assert!(p.has_child(x));
        let count = p.child_bits.count_ones();
        let rank = p.child_rank(x);
        let base = if count == 1 {
            0
        } else {
            let fill = self.nodes[p.child_base as usize];
            let base = self.node_free.take(&mut self.nodes, count - 1, fill);
            for i in 0..rank {
                self.nodes[(base + i) as usize] = self.nodes[(p.child_base + i) as usize];
            }
            for i in rank + 1..count {
                self.nodes[(base + i - 1) as usize] = self.nodes[(p.child_base + i) as usize];
            }
            base
        };
        self.node_free.give(p.child_base, count);
        let pn = &mut self.nodes[parent as usize];
        pn.child_bits &= !(1 << x);
        pn.child_base = base;
    }

    /// Drops nodes that hold no prefix and at most one child, from `idx` up
    /// (`ancestors` lead to it from the root's slot `slot`).
    fn prune(&mut self, slot: usize, mut idx: u32, mut ancestors: Vec<(u32, u8)>) {
        loop {
            let n = self.nodes[idx as usize];
            if n.has_prefixes() {
                return;
            }
            match n.child_bits.count_ones() {
                0 => match ancestors.pop() {
                    Some((parent, x)) => {
                        self.remove_child(parent, x);
                        idx = parent;
                    }
                    None => {
                        self.node_free.give(idx, 1);
                        self.root[slot].child = NO_CHILD;
                        return;
                    }
                },
                1 => {
                    // Let the only child take this node's place; its own path
                    // check covers the stride this node decided on.
                    self.nodes[idx as usize] = self.nodes[n.child_base as usize];
                    self.node_free.give(n.child_base, 1);
                    return;
                }
                _ => return,
            }
        }
    }

    /// Recomputes the values of node `idx` from its prefixes; returns whether
    /// it holds any.
    fn rebuild_runs(&mut self, idx: u32) -> bool {
        let n = self.nodes[idx as usize];
        let d = n.depth;
        let path = K::unpack(n.path);
        let lo = (d, path, 0u8);
        let hi = (d, path | !K::mask(STRIDE * u32::from(d)), u8::MAX);
        // Expand the node's prefixes over the 16 nibble values, longest winning.
        let mut slots: [Option<T>; 16] = [None; 16];
        let mut lens = [0u8; 16];
        for (&(_, k, l), &v) in self.prefixes.range(lo..=hi) {
            let r = l - STRIDE as u8 * d;
            let start = usize::from(k.nibble(d));
            let span = 1usize << (STRIDE as u8 - r);
            for (slot, len) in slots[start..start + span].iter_mut().zip(&mut lens[start..start + span]) {
                if *len <= r {
                    *len = r;
                    *slot = Some(v);
                }
            }
        }
        if n.run_base != INLINE {
            self.run_free.give(n.run_base, n.run_bits.count_ones());
        }
        // Run-length encode: a run starts wherever the value changes.
        let mut run_bits = 0u16;
        let mut values: heapless::Vec<Option<T>, 16> = heapless::Vec::new();
        let mut valued = 0;
        for (i, &slot) in slots.iter().enumerate() {
            if i == 0 || slot != slots[i - 1] {
                run_bits |= 1 << i;
                let _ = values.push(slot);
                valued += usize::from(slot.is_some());
            }
        }
        let mut node = Node { child_bits: n.child_bits, child_base: n.child_base, ..Node::new(d, n.path) };
        if valued == 1 {
            let lo = slots.iter().position(Option::is_some).unwrap_or(0);
            let hi = slots.iter().rposition(Option::is_some).unwrap_or(0);
            node.inline = slots[lo];
            node.inline_lo = lo as u8;
            node.inline_hi = hi as u8;
        } else if valued > 1 {
            let count = values.len() as u32;
            let base = self.run_free.take(&mut self.runs, count, None);
            self.runs[base as usize..(base + count) as usize].copy_from_slice(&values);
            node.run_base = base;
            node.run_bits = run_bits;
        }
        self.nodes[idx as usize] = node;
        valued > 0
    }

    /// Rewrites both vectors without their free blocks, breadth first (which
    /// also keeps the hot top of the trie together), once a quarter is free.
    fn maybe_compact(&mut self) {
        let waste = self.node_free.slots * 4 > self.nodes.len() || self.run_free.slots * 4 > self.runs.len();
        if !waste || self.nodes.len() + self.runs.len() < 256 {
            return;
        }
        let mut nodes = Vec::with_capacity(self.nodes.len() - self.node_free.slots);
        let mut runs = Vec::with_capacity(self.runs.len() - self.run_free.slots);
        runs.push(None);
        for slot in &mut self.root {
            if slot.child != NO_CHILD {
                nodes.push(self.nodes[slot.child as usize]);
                slot.child = (nodes.len() - 1) as u32;
            }
        }
        let mut i = 0;
        while i < nodes.len() {
            let mut n: Node<K::Packed, T> = nodes[i];
            let children = n.child_bits.count_ones() as usize;
            let base = n.child_base as usize;
            n.child_base = if children == 0 { 0 } else { nodes.len() as u32 };
            nodes.extend_from_slice(&self.nodes[base..base + children]);
            if n.run_base != INLINE {
                let count = n.run_bits.count_ones() as usize;
                let base = n.run_base as usize;
                n.run_base = runs.len() as u32;
                runs.extend_from_slice(&self.runs[base..base + count]);
            }
            nodes[i] = n;
            i += 1;
        }
        self.nodes = nodes;
        self.runs = runs;
        self.node_free = FreeLists::new();
        self.run_free = FreeLists::new();
    }
}

/// The root slots a prefix of at most [`ROOT_BITS`] bits covers.
fn root_span<K: Key>(key: K, len: u8) -> core::ops::Range<usize> {
    let start = key.root_slot();
    start..start + (1 << (ROOT_BITS - u32::from(len)))
}

/// The depth of the node a prefix of `len` bits lives in: 0 for the root.
fn home_depth(len: u8) -> u8 {
    if u32::from(len) <= ROOT_BITS {
        0
    } else {
        (len - 1) / STRIDE as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }

    #[test]
    fn longest_match_v4() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(v4([10, 0, 0, 0]), 8, 1u32), Ok(None));
        assert_eq!(t.insert(v4([10, 1, 0, 0]), 16, 2), Ok(None));
        assert_eq!(t.insert(v4([10, 1, 2, 3]), 32, 3), Ok(None));
        assert_eq!(t.insert(v4([10, 1, 2, 0]), 25, 4), Ok(None));
        assert_eq!(t.lookup_v4([10, 9, 9, 9]), Some(1));
        assert_eq!(t.lookup_v4([10, 1, 9, 9]), Some(2));
        assert_eq!(t.lookup_v4([10, 1, 2, 3]), Some(3));
        assert_eq!(t.lookup_v4([10, 1, 2, 4]), Some(4));
        assert_eq!(t.lookup_v4([10, 1, 2, 200]), Some(2));
        assert_eq!(t.lookup_v4([11, 0, 0, 0]), None);
        assert_eq!(t.lookup(v4([10, 1, 2, 3])), Some(3));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn host_bits_are_masked_and_replace_returns_previous() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(v4([192, 168, 7, 99]), 24, 1u32), Ok(None));
        assert_eq!(t.insert(v4([192, 168, 7, 0]), 24, 2), Ok(Some(1)));
        assert_eq!(t.len(), 1);
        assert_eq!(t.prefixes_of(2).collect::<Vec<_>>(), vec![(v4([192, 168, 7, 0]), 24)]);
        assert_eq!(t.remove(v4([192, 168, 7, 1]), 24), Some(2));
        assert!(t.is_empty());
        assert_eq!(t.lookup_v4([192, 168, 7, 1]), None);
    }

    #[test]
    fn default_routes_and_full_length() {
        let mut t = AllowedIps::new();
        t.insert(v4([1, 2, 3, 4]), 0, 7u32).unwrap();
        t.insert(v6("::1"), 0, 8).unwrap();
        t.insert(v6("2001:db8::1"), 128, 9).unwrap();
        assert_eq!(t.lookup_v4([8, 8, 8, 8]), Some(7));
        assert_eq!(t.lookup(v6("2001:db8::2")), Some(8));
        assert_eq!(t.lookup(v6("2001:db8::1")), Some(9));
        assert_eq!(t.prefixes_of(7).collect::<Vec<_>>(), vec![(v4([0, 0, 0, 0]), 0)]);
        assert_eq!(t.remove(v4([0, 0, 0, 0]), 0), Some(7));
        assert_eq!(t.lookup_v4([8, 8, 8, 8]), None);
    }

    #[test]
    fn too_long() {
        let mut t = AllowedIps::new();
        let err = t.insert(v4([1, 2, 3, 4]), 33, 1u32).unwrap_err();
        assert_eq!(err, PrefixError::TooLong { prefix_len: 33, max: 32 });
        assert!(t.insert(v6("::"), 129, 1).is_err());
        assert!(t.insert(v6("::"), 128, 1).is_ok());
        assert_eq!(t.remove(v6("::"), 129), None);
        assert!(!alloc::format!("{err}").is_empty());
    }

    #[test]
    fn remove_value_and_compression() {
        let mut t = AllowedIps::new();
        t.insert(v6("2001:db8:1:2:3:4:5:6"), 128, 1u32).unwrap();
        t.insert(v6("2001:db8:1:2:3:4:5:7"), 128, 2).unwrap();
        t.insert(v6("2001:db8:1:2::"), 64, 1).unwrap();
        t.insert(v6("2001:db8:ff::"), 48, 2).unwrap();
        // The branch where 2001:db8:1 and 2001:db8:ff part, the /48, the /64
        // and the node of the last nibble holding both /128s: the chains of
        // single-child nodes between them are compressed away.
        assert_eq!(t.v6.nodes.len() - t.v6.node_free.slots, 4);
        assert_eq!(t.lookup(v6("2001:db8:1:2:3:4:5:6")), Some(1));
        assert_eq!(t.lookup(v6("2001:db8:1:2:3:4:5:7")), Some(2));
        assert_eq!(t.lookup(v6("2001:db8:1:2:3:4:5:8")), Some(1));
        assert_eq!(t.lookup(v6("2001:db8:ff:1::")), Some(2));
        assert_eq!(t.lookup(v6("2001:db8:fe::")), None);
        assert_eq!(
            t.prefixes_of(1).collect::<Vec<_>>(),
            vec![(v6("2001:db8:1:2::"), 64), (v6("2001:db8:1:2:3:4:5:6"), 128)]
        );
        t.remove_value(1);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(v6("2001:db8:1:2:3:4:5:6")), None);
        assert_eq!(t.lookup(v6("2001:db8:1:2:3:4:5:7")), Some(2));
        check(&t.v6);
        t.remove_value(2);
        assert!(t.is_empty());
        // Everything pruned back to a bare root.
        assert!(t.v6.root.iter().all(|s| s.child == NO_CHILD && s.value.is_none()));
        assert_eq!(t.v6.nodes.len(), t.v6.node_free.slots);
    }

    /// Checks the structural invariants: children extend their parent's path
    /// under the right nibble, and every non-root node holds a prefix or
    /// branches.
    fn check<K: Key + fmt::Debug, T: Copy + Eq>(t: &Trie<K, T>) {
        fn walk<K: Key + fmt::Debug, T: Copy + Eq>(t: &Trie<K, T>, idx: u32) -> usize {
            let n = t.nodes[idx as usize];
            let path = K::unpack(n.path);
            assert_eq!(path & K::mask(STRIDE * u32::from(n.depth)), path, "unmasked path");
            assert!(n.has_prefixes() || n.child_bits.count_ones() >= 2, "useless node {idx}");
            let mut live = 1;
            for x in 0..16u8 {
                if n.has_child(x) {
                    let c = n.child_base + n.child_rank(x);
                    let cn = t.nodes[c as usize];
                    assert!(cn.depth > n.depth);
                    let cpath = K::unpack(cn.path);
                    assert_eq!(cpath & K::mask(STRIDE * u32::from(n.depth)), path, "child path");
                    assert_eq!(cpath.nibble(n.depth), x, "child nibble at node {idx}");
                    live += walk(t, c);
                }
            }
            live
        }
        let mut live = 0;
        for (s, slot) in t.root.iter().enumerate() {
            if slot.child != NO_CHILD {
                let n = t.nodes[slot.child as usize];
                assert!(n.depth >= ROOT_DEPTH);
                assert_eq!(K::unpack(n.path).root_slot(), s, "root child path");
                live += walk(t, slot.child);
            }
        }
        assert_eq!(live + t.node_free.slots, t.nodes.len(), "leaked node slots");
    }

    /// A small deterministic generator; the property tests cover far more.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    fn churn_against_scan<K: Key + fmt::Debug>(
        t: &mut Trie<K, u32>,
        mut random: impl FnMut() -> K,
        bits: u8,
        seed: u64,
    ) {
        let mut next = xorshift(seed);
        let mut model: Vec<(K, u8, u32)> = Vec::new();
        for i in 0..3000u32 {
            let l = (next() % (u64::from(bits) + 1)) as u8;
            let a = random() & K::mask(u32::from(l));
            t.insert(a, l, i);
            model.retain(|&(ma, ml, _)| (ma, ml) != (a, l));
            model.push((a, l, i));
            if i % 3 == 0 {
                let (ra, rl, rv) = model.swap_remove((next() as usize) % model.len());
                assert_eq!(t.remove(ra, rl), Some(rv));
            }
            if i % 100 == 0 {
                check(t);
            }
        }
        check(t);
        assert_eq!(t.len(), model.len());
        for _ in 0..20_000 {
            let q = random();
            let want = model
                .iter()
                .filter(|&&(a, l, _)| q & K::mask(u32::from(l)) == a)
                .max_by_key(|&&(_, l, _)| l)
                .map(|&(_, _, v)| v);
            assert_eq!(t.lookup(q), want, "query {q:?}");
        }
    }

    #[test]
    fn many_prefixes_against_scan_v4() {
        // Clear some bits so that prefixes and queries overlap often.
        let mut next = xorshift(0x1234_5678_9abc_def0);
        churn_against_scan(&mut Trie::new(), move || (next() as u32) & 0xff0f_f3ff, 32, 1);
    }

    #[test]
    fn many_prefixes_against_scan_v6() {
        let mut next = xorshift(0x0fed_cba9_8765_4321);
        let mut random = move || {
            let hi = u128::from(next() & 0xf0f0_00ff_0000_ffff);
            let lo = u128::from(next() & 0x0000_0000_ff00_000f);
            (hi << 64) | lo
        };
        churn_against_scan(&mut Trie::new(), &mut random, 128, 2);
    }

    #[test]
    fn node_sizes() {
        // The sizes the module documentation promises for u32 peer ids.
        assert_eq!(core::mem::size_of::<Node<u32, u32>>(), 28);
        assert_eq!(core::mem::size_of::<Node<[u64; 2], u32>>(), 40);
    }

    #[test]
    fn clear_empties() {
        let mut t = AllowedIps::new();
        t.insert(v4([1, 2, 3, 4]), 32, 1u32).unwrap();
        t.insert(v6("::1"), 128, 1).unwrap();
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.lookup_v4([1, 2, 3, 4]), None);
        assert_eq!(t.lookup(v6("::1")), None);
    }
}
