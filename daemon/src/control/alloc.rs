//! Adding a node to the tailnet: its IPv4 address (the IPv6 one is derived
//! from it, [`super::db::Tailnet::ipv6_for`]) and its unique DNS name. One
//! allocator serves every way a node joins: an auth key
//! ([`Db::register`]) and a federated ID token ([`Db::register_federated`]).
//!
//! - IPv4: the first free address at or after the tailnet's cursor
//!   (`tailnet.next_ipv4`, one past the address handed out last, so a removed
//!   node's address is not given to the next node at once), scanning on from
//!   the start of the range when the end is reached or the cursor lies
//!   outside the range; the resolver address is never handed out. A run of
//!   taken addresses is skipped with one query, not one query per address.
//! - Name: the host name's first label made DNS-safe ([`dns_label`]), then
//!   `-2`, `-3`, … until one is free ([`unique_name`]).
//!
//! Both are chosen and stored in the write transaction that inserts the
//! node, after [`lock_registrations`]: on PostgreSQL the tailnet row is
//! locked `FOR UPDATE`, so replicas register one node at a time; on SQLite
//! the write transaction (`BEGIN IMMEDIATE`) holds the database lock. What
//! is picked is therefore still free when the node is stored; the `UNIQUE`
//! constraints on `nodes.name` and `nodes.ipv4` back this up.

use super::db::{Registration, IPV4_BASE, IPV4_PREFIX, IPV4_RESOLVER};
use super::store::{params, Conn};
use super::ApiError;
use std::collections::HashSet;
use std::net::Ipv4Addr;

#[cfg(doc)]
use super::db::Db;

/// The addresses nodes are given: an inclusive range of IPv4 addresses (as
/// `u32`) inside the tailnet's 100.64.0.0/10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Range {
    /// The first address handed out.
    pub first: u32,
    /// The last address handed out.
    pub last: u32,
}

impl Ipv4Range {
    /// The whole tailnet range but its network and broadcast addresses:
    /// 100.64.0.1 to 100.127.255.254.
    pub const TAILNET: Ipv4Range = Ipv4Range { first: IPV4_BASE + 1, last: IPV4_BASE + (1 << (32 - IPV4_PREFIX)) - 2 };

    /// A part of [`Self::TAILNET`] (a small one lets tests fill it).
    pub fn new(first: Ipv4Addr, last: Ipv4Addr) -> Result<Ipv4Range, ApiError> {
        let (first, last) = (u32::from(first), u32::from(last));
        if first > last || !Self::TAILNET.contains(first) || !Self::TAILNET.contains(last) {
            return Err(ApiError::bad_request(format!(
                "address range {}-{} is not an ordered part of {}-{}",
                Ipv4Addr::from(first),
                Ipv4Addr::from(last),
                Ipv4Addr::from(Self::TAILNET.first),
                Ipv4Addr::from(Self::TAILNET.last)
            )));
        }
        Ok(Ipv4Range { first, last })
    }

    /// Whether `a` is in the range.
    pub fn contains(self, a: u32) -> bool {
        (self.first..=self.last).contains(&a)
    }

    /// The address after `a`, wrapping to the first after the last.
    fn after(self, a: u32) -> u32 {
        if a >= self.last {
            self.first
        } else {
            a + 1
        }
    }
}

/// A DNS label made from a host name: lowercase letters, digits and inner
/// hyphens, at most 63 characters (RFC 1035 §2.3.1), `node` when nothing is left.
pub fn dns_label(hostname: &str) -> String {
    let first = hostname.split('.').next().unwrap_or("");
    let mut s = String::with_capacity(first.len());
    for c in first.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            s.push(c);
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    let mut s: String = s.trim_matches('-').chars().take(63).collect();
    while s.ends_with('-') {
        s.pop();
    }
    if s.is_empty() {
        "node".into()
    } else {
        s
    }
}

/// `base`, or `base-2`, `base-3`, … : the first that `taken` says is free,
/// kept within 63 characters (the base is shortened to make room).
pub fn unique_name(base: &str, mut taken: impl FnMut(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    let mut n = 2u64;
    loop {
        let suffix = format!("-{n}");
        let keep = 63usize.saturating_sub(suffix.len()).min(base.len());
        let candidate = format!("{}{suffix}", base[..keep].trim_end_matches('-'));
        if !taken(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

/// Every candidate [`unique_name`] makes from a base starts with the base's
/// first 40 characters: a suffix `-<u64>` is at most 21 characters, which
/// leaves at least 42 of the base, 41 once a trailing hyphen is trimmed
/// ([`dns_label`] never leaves two hyphens in a row).
const NAME_PREFIX: usize = 40;

/// Takes the lock every registration holds until its transaction ends (the
/// tailnet row, `FOR UPDATE` on PostgreSQL; SQLite's write transaction is
/// exclusive already). The first statement of each registration path, so
/// the checks it makes (one-off key, `jti`, machine key) and the node it
/// inserts are one step for every other registration on any replica.
pub(super) fn lock_registrations(c: &mut Conn) -> Result<(), ApiError> {
    let lock = c.dialect().for_update();
    c.query_one(&format!("SELECT next_ipv4 FROM tailnet WHERE id = 1{lock}"), &[])?;
    Ok(())
}

/// A node about to be stored: what the registration asked for and what its
/// credential gives it.
pub(super) struct NewNode<'a> {
    /// The checked request.
    pub reg: &'a Registration,
    /// The reported endpoints, as JSON.
    pub endpoints: &'a str,
    /// The node's tags, as JSON.
    pub tags: &'a str,
    /// Whether it is removed soon after it goes offline.
    pub ephemeral: bool,
    /// The auth key it registered with.
    pub auth_key_id: Option<i64>,
    /// The user who owns it (untagged nodes only).
    pub user_id: Option<i64>,
    /// The trust credential that accepted its ID token.
    pub federation_id: Option<i64>,
    /// Unix seconds: its creation and first sighting.
    pub now: i64,
}

/// Stores a new node with a free address from `range` and a unique name,
/// and moves the address cursor past it. Runs inside the registration's
/// write transaction (after [`lock_registrations`]), so a failure anywhere
/// later rolls the cursor back with the node. Returns the node's id.
pub(super) fn insert_node(c: &mut Conn, node: &NewNode, range: Ipv4Range) -> Result<i64, ApiError> {
    let reg = node.reg;
    if c.query_opt("SELECT id FROM nodes WHERE node_key = $1", params![&reg.node_key[..]])?.is_some() {
        return Err(ApiError::conflict("node key already belongs to another node".into()));
    }
    let ipv4 = allocate_ipv4(c, range)?;
    let name = allocate_name(c, &reg.hostname)?;
    let id = c
        .query_one(
            "INSERT INTO nodes (machine_key, node_key, hostname, name, ipv4, endpoints, tags, ephemeral,
                                auth_key_id, user_id, federation_id, created_at, last_seen)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) RETURNING id",
            params![
                &reg.machine_key[..],
                &reg.node_key[..],
                &reg.hostname,
                &name,
                ipv4,
                node.endpoints,
                node.tags,
                node.ephemeral,
                node.auth_key_id,
                node.user_id,
                node.federation_id,
                node.now
            ],
        )?
        .int(0)?;
    // Addresses are not handed out again soon after a node is removed.
    c.execute("UPDATE tailnet SET next_ipv4 = $1 WHERE id = 1", params![range.after(ipv4)])?;
    Ok(id)
}

/// The first free address of `range` at or after the cursor, else the first
/// free one from the start of the range; 507 when every one is taken.
fn allocate_ipv4(c: &mut Conn, range: Ipv4Range) -> Result<u32, ApiError> {
    let cursor = c.query_one("SELECT next_ipv4 FROM tailnet WHERE id = 1", &[])?.int(0)?;
    let start = u32::try_from(cursor).ok().filter(|&a| range.contains(a)).unwrap_or(range.first);
    if let Some(a) = first_free(c, start, range.last)? {
        return Ok(a);
    }
    if start > range.first {
        if let Some(a) = first_free(c, range.first, start - 1)? {
            return Ok(a);
        }
    }
    Err(ApiError::new(507, "address_space_full", "no free tailnet address"))
}

/// The lowest address in `from..=to` that no node has, other than the
/// resolver's.
fn first_free(c: &mut Conn, mut from: u32, to: u32) -> Result<Option<u32>, ApiError> {
    while from <= to {
        if from == IPV4_RESOLVER {
            from += 1;
            continue;
        }
        if c.query_opt("SELECT id FROM nodes WHERE ipv4 = $1", params![from])?.is_none() {
            return Ok(Some(from));
        }
        // `from` is taken: jump past the run of taken addresses it starts
        // (the first taken address below `to` whose successor is free).
        let gap = c.query_opt(
            "SELECT n.ipv4 + 1 FROM nodes n
             WHERE n.ipv4 >= $1 AND n.ipv4 < $2
               AND NOT EXISTS (SELECT 1 FROM nodes m WHERE m.ipv4 = n.ipv4 + 1)
             ORDER BY n.ipv4 LIMIT 1",
            params![from, to],
        )?;
        match gap {
            None => return Ok(None),
            Some(r) => {
                from = u32::try_from(r.int(0)?)
                    .map_err(|_| ApiError::internal("state store: a node's address is out of range".into()))?;
            }
        }
    }
    Ok(None)
}

/// The node's DNS name: its host name's label, suffixed when another node
/// has it.
fn allocate_name(c: &mut Conn, hostname: &str) -> Result<String, ApiError> {
    let base = dns_label(hostname);
    if c.query_opt("SELECT id FROM nodes WHERE name = $1", params![&base])?.is_none() {
        return Ok(base);
    }
    // One query for every name a candidate could clash with. A label holds
    // only `a-z 0-9 -`, none of them special to LIKE.
    let pattern = format!("{}%", &base[..base.len().min(NAME_PREFIX)]);
    let taken: HashSet<String> = c
        .query("SELECT name FROM nodes WHERE name LIKE $1", params![pattern])?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_, _>>()?;
    Ok(unique_name(&base, |n| taken.contains(n)))
}

/// A registration for tests: node `n`'s machine key is `[n; 32]`, its node
/// key `[n + 100; 32]` (wrapping).
#[cfg(test)]
pub(super) fn test_registration(auth_key: &str, n: u8, hostname: &str) -> Registration {
    Registration {
        auth_key: auth_key.into(),
        machine_key: [n; 32],
        node_key: [n.wrapping_add(100); 32],
        hostname: hostname.into(),
        endpoints: vec!["192.0.2.1:41641".into()],
    }
}

/// The private PostgreSQL cluster the integration tests use, so the
/// allocator's SQL is proven on both stores.
#[cfg(test)]
#[path = "../../tests/support/postgres.rs"]
pub(super) mod pg_cluster;

#[cfg(test)]
mod tests {
    use super::super::db::Db;
    use super::super::federation_store::{TrustCredential, Verified};
    use super::super::proto::NodeInfo;
    use super::*;

    fn ip(a: u32) -> Ipv4Addr {
        Ipv4Addr::from(a)
    }

    fn v4(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 64, 0, d)
    }

    /// Registers nodes through both paths on one store: `n` makes the
    /// machine and node keys (and the ID token's `jti`) unique.
    struct Joiner {
        key: String,
        credential: TrustCredential,
    }

    impl Joiner {
        fn new(db: &mut Db) -> Joiner {
            let (key, _) = db.create_auth_key(true, false, &[], None, None).unwrap();
            let credential = db.create_credential("https://ci.example", "ws/*", &["tag:ci".into()], false).unwrap();
            Joiner { key, credential }
        }

        fn reg(n: u8, hostname: &str, auth_key: &str) -> Registration {
            assert!(n < 150, "keys must stay distinct");
            test_registration(auth_key, n, hostname)
        }

        fn by_key(&self, db: &mut Db, n: u8, hostname: &str) -> Result<NodeInfo, ApiError> {
            db.register(&Self::reg(n, hostname, &self.key))
        }

        fn by_token(&self, db: &mut Db, n: u8, hostname: &str) -> Result<NodeInfo, ApiError> {
            let v = Verified {
                credential: self.credential.clone(),
                tags: vec!["tag:ci".into()],
                jti: format!("jti-{n}"),
                jti_until: super::super::db::unix_now() + 600,
            };
            db.register_federated(&Self::reg(n, hostname, ""), &v)
        }

        /// Node `n` through the auth-key path when `n` is odd, the federation
        /// path when it is even.
        fn either(&self, db: &mut Db, n: u8, hostname: &str) -> Result<NodeInfo, ApiError> {
            if n % 2 == 1 {
                self.by_key(db, n, hostname)
            } else {
                self.by_token(db, n, hostname)
            }
        }
    }

    fn set_cursor(db: &mut Db, a: u32) {
        db.conn().execute("UPDATE tailnet SET next_ipv4 = $1 WHERE id = 1", params![a]).unwrap();
    }

    fn cursor(db: &mut Db) -> u32 {
        let c = db.conn().query_one("SELECT next_ipv4 FROM tailnet WHERE id = 1", &[]).unwrap().int(0).unwrap();
        u32::try_from(c).unwrap()
    }

    fn full(r: Result<NodeInfo, ApiError>) {
        let e = r.unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (507, "address_space_full"), "{e}");
    }

    /// An auth-key node and a federated node asking for the same host name
    /// get distinct names, suffixed the same way, and distinct addresses from
    /// one sequence.
    fn both_paths_share_one_sequence(db: &mut Db) {
        let j = Joiner::new(db);
        let a = j.by_key(db, 1, "host").unwrap();
        let b = j.by_token(db, 2, "host").unwrap();
        let c = j.by_key(db, 3, "HOST.example.com").unwrap();
        let d = j.by_token(db, 4, "Host").unwrap();
        let nodes = [&a, &b, &c, &d];
        assert_eq!(nodes.map(|n| n.name.as_str()), ["host", "host-2", "host-3", "host-4"]);
        assert_eq!(nodes.map(|n| n.ipv4), [v4(1), v4(2), v4(3), v4(4)]);
        let v6: HashSet<_> = nodes.iter().map(|n| n.ipv6).collect();
        assert_eq!(v6.len(), 4);
        assert_eq!((a.owner.as_str(), b.tags.as_slice()), ("admin", &["tag:ci".to_string()][..]));

        // Long names are cut to make room for the suffix, on both paths.
        let long = "x".repeat(70);
        assert_eq!(j.by_token(db, 5, &long).unwrap().name, "x".repeat(63));
        assert_eq!(j.by_key(db, 6, &long).unwrap().name, format!("{}-2", "x".repeat(61)));

        // A taken suffixed name (here by a rename) is skipped by both.
        assert_eq!(db.rename_node("host", "web-2").unwrap(), Some(a.id));
        assert_eq!(j.by_token(db, 7, "web").unwrap().name, "web");
        assert_eq!(j.by_key(db, 8, "web").unwrap().name, "web-3");
        assert_eq!(j.by_token(db, 9, "host").unwrap().name, "host", "a renamed node's name is free again");

        // A refused registration (node key taken) moves no cursor.
        let before = cursor(db);
        let mut clash = Joiner::reg(10, "clash", "");
        clash.node_key = [101; 32];
        let v = Verified {
            credential: j.credential.clone(),
            tags: vec!["tag:ci".into()],
            jti: "jti-clash".into(),
            jti_until: super::super::db::unix_now() + 600,
        };
        assert_eq!(db.register_federated(&clash, &v).unwrap_err().status, 409);
        let mut clash = Joiner::reg(11, "clash", &j.key);
        clash.node_key = [102; 32];
        assert_eq!(db.register(&clash).unwrap_err().status, 409);
        assert_eq!(cursor(db), before);
        assert_eq!(j.either(db, 12, "next").unwrap().ipv4, ip(before));

        let all = db.nodes().unwrap();
        assert_eq!(all.iter().map(|n| n.ipv4).collect::<HashSet<_>>().len(), all.len());
        assert_eq!(all.iter().map(|n| n.name.as_str()).collect::<HashSet<_>>().len(), all.len());
    }

    /// A range of four: filled through both paths, then full for both (and
    /// nothing stored), then a freed address found again by scanning from the
    /// cursor and, past the end, from the start of the range.
    fn a_small_range_fills_and_wraps(db: &mut Db) {
        let j = Joiner::new(db);
        db.set_ipv4_range(Ipv4Range::new(v4(1), v4(4)).unwrap());
        let got: Vec<_> = (1..=4).map(|n| j.either(db, n, "n").unwrap().ipv4).collect();
        assert_eq!(got, [v4(1), v4(2), v4(3), v4(4)]);
        assert_eq!(cursor(db), u32::from(v4(1)), "the cursor wraps past the end");
        full(j.by_key(db, 5, "n"));
        full(j.by_token(db, 6, "n"));
        assert_eq!(db.nodes().unwrap().len(), 4, "a refused registration stores nothing");
        assert_eq!(db.jti_count().unwrap(), 2, "nor records its jti");
        let uses = db.auth_keys().unwrap().iter().map(|k| k.uses).sum::<i64>();
        assert_eq!(uses, 2, "nor spends its key");

        // Cursor at .3: .3 and .4 are taken, so the scan goes on from .1.
        db.remove_node("n-2").unwrap().unwrap(); // 100.64.0.2
        set_cursor(db, u32::from(v4(3)));
        assert_eq!(j.by_token(db, 6, "n").unwrap().ipv4, v4(2));
        assert_eq!(cursor(db), u32::from(v4(3)));
        db.remove_node("n").unwrap().unwrap(); // 100.64.0.1
        assert_eq!(j.by_key(db, 7, "n").unwrap().ipv4, v4(1));
        full(j.by_token(db, 8, "n"));

        // A cursor outside the range starts at its first address, and a run
        // of taken addresses is skipped.
        db.set_ipv4_range(Ipv4Range::new(v4(1), v4(6)).unwrap());
        set_cursor(db, 0);
        assert_eq!(j.by_token(db, 8, "n").unwrap().ipv4, v4(5));
        assert_eq!(j.by_key(db, 9, "n").unwrap().ipv4, v4(6));
        full(j.by_token(db, 10, "n"));
    }

    /// Twenty addresses around the resolver's: it is never handed out, not
    /// even when a run of taken addresses ends just below it.
    fn the_resolver_address_is_skipped(db: &mut Db) {
        let j = Joiner::new(db);
        let base = IPV4_RESOLVER - 10;
        db.set_ipv4_range(Ipv4Range::new(ip(base), ip(IPV4_RESOLVER + 10)).unwrap());
        let mut got = Vec::new();
        for n in 1..=20 {
            got.push(u32::from(j.either(db, n, "r").unwrap().ipv4));
        }
        let want: Vec<u32> = (base..=IPV4_RESOLVER + 10).filter(|&a| a != IPV4_RESOLVER).collect();
        assert_eq!(got, want);
        full(j.by_key(db, 21, "r"));
        // .95 freed, cursor at .90: one jump over the run finds it.
        db.remove_node("r-6").unwrap().unwrap();
        set_cursor(db, base);
        assert_eq!(u32::from(j.by_token(db, 22, "r").unwrap().ipv4), base + 5);
        // .101 freed, cursor at .96: the run ends below the resolver.
        db.remove_node("r-11").unwrap().unwrap();
        set_cursor(db, IPV4_RESOLVER - 4);
        assert_eq!(u32::from(j.by_key(db, 23, "r").unwrap().ipv4), IPV4_RESOLVER + 1);
    }

    /// The whole tailnet range: after its last address comes its first.
    fn the_tailnet_range_wraps(db: &mut Db) {
        let j = Joiner::new(db);
        let last = Ipv4Range::TAILNET.last;
        assert_eq!(ip(last), Ipv4Addr::new(100, 127, 255, 254));
        assert_eq!(j.by_key(db, 1, "a").unwrap().ipv4, v4(1));
        set_cursor(db, last - 1);
        assert_eq!(u32::from(j.by_token(db, 2, "b").unwrap().ipv4), last - 1);
        assert_eq!(u32::from(j.by_key(db, 3, "c").unwrap().ipv4), last);
        assert_eq!(cursor(db), Ipv4Range::TAILNET.first);
        assert_eq!(j.by_token(db, 4, "d").unwrap().ipv4, v4(2), "100.64.0.1 is taken");
    }

    /// A named check run on each store.
    type Scenario = (&'static str, fn(&mut Db));

    const SCENARIOS: &[Scenario] = &[
        ("both_paths", both_paths_share_one_sequence),
        ("small_range", a_small_range_fills_and_wraps),
        ("resolver", the_resolver_address_is_skipped),
        ("tailnet_range", the_tailnet_range_wraps),
    ];

    fn on_sqlite(name: &str) {
        let (_, f) = SCENARIOS.iter().find(|s| s.0 == name).unwrap();
        f(&mut Db::open_in_memory().unwrap().0);
    }

    #[test]
    fn auth_key_and_federated_nodes_get_distinct_names_and_addresses() {
        on_sqlite("both_paths");
    }

    #[test]
    fn a_full_range_refuses_both_paths_and_a_freed_address_is_found_from_the_start() {
        on_sqlite("small_range");
    }

    #[test]
    fn the_resolver_address_is_never_handed_out() {
        on_sqlite("resolver");
    }

    #[test]
    fn the_cursor_wraps_at_the_end_of_the_tailnet_range() {
        on_sqlite("tailnet_range");
    }

    /// Every scenario again on PostgreSQL (a private cluster; skipped
    /// outside CI when PostgreSQL is not installed).
    #[test]
    fn the_same_allocation_on_postgres() {
        let Some(cluster) = pg_cluster::Cluster::start_or_skip("alloc::the_same_allocation_on_postgres") else {
            return;
        };
        for (name, f) in SCENARIOS {
            let url = cluster.create_db(&format!("alloc_{name}"));
            let (mut db, _) = Db::open_postgres(&url).unwrap();
            f(&mut db);
        }
    }

    #[test]
    fn ranges_must_lie_in_the_tailnet() {
        assert!(Ipv4Range::new(v4(1), v4(4)).is_ok());
        assert_eq!(Ipv4Range::new(v4(4), v4(1)).unwrap_err().status, 400);
        assert!(Ipv4Range::new(Ipv4Addr::new(100, 64, 0, 0), v4(4)).is_err());
        assert!(Ipv4Range::new(v4(1), Ipv4Addr::new(100, 128, 0, 1)).is_err());
        assert_eq!(Ipv4Range::TAILNET.after(Ipv4Range::TAILNET.last), Ipv4Range::TAILNET.first);
    }

    #[test]
    fn names_are_dns_safe_and_unique() {
        assert_eq!(dns_label("My_Laptop.local"), "my-laptop");
        assert_eq!(dns_label("--web--01--"), "web-01");
        assert_eq!(dns_label("ÄÖÜ"), "node");
        assert_eq!(dns_label(&"a".repeat(100)).len(), 63);
        let taken = ["web", "web-2"];
        assert_eq!(unique_name("web", |n| taken.contains(&n)), "web-3");
        assert_eq!(unique_name("db", |n| taken.contains(&n)), "db");
        let long = "b".repeat(63);
        let got = unique_name(&long, |n| n == long);
        assert_eq!(got.len(), 63);
        assert!(got.ends_with("-2"));
        // Every candidate keeps the prefix the name query matches on.
        let hyphens = format!("{}-{}", "c".repeat(40), "d".repeat(22));
        let mut seen = 0;
        unique_name(&hyphens, |n| {
            assert!(n.starts_with(&hyphens[..NAME_PREFIX]), "{n}");
            seen += 1;
            seen < 1000
        });
    }
}
