//! Two namespaces joined by veth, wiremeshd in one (side A) and wiremeshd
//! or wireguard-go in the other (side B), peered with each other; and the
//! scenarios both the interop and the wiremesh-to-wiremesh tests run on it.

use crate::netns::{veth_pair, Netns, Subnet, VethPair};
use crate::support::{self, endpoint, PeerKind, TransferOpts, WgDev, Wiremeshd};
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;
use std::sync::Arc;

/// Listen ports (each side has its own namespace).
pub const PORT_A: u16 = 51820;
pub const PORT_B: u16 = 51821;

/// 200 MB, the size of the bulk transfers.
pub const BULK: u64 = 200_000_000;

/// A peered pair. Fields drop in order: the processes first, then the link
/// and the namespaces.
pub struct Pair {
    pub a: Wiremeshd,
    pub b: Box<dyn WgDev>,
    pub veth: VethPair,
    pub a_ns: Netns,
    pub b_ns: Netns,
    pub under: Subnet,
    /// Tunnel addresses.
    pub a_in4: String,
    pub b_in4: String,
    pub a_in6: String,
    pub b_in6: String,
}

impl Pair {
    /// Builds the pair: underlay IPv6 when `outer_v6` (the veth then has no
    /// IPv4 address at all) else IPv4; tunnel addresses 10.77.X.{1,2}/24 and
    /// fd00:776d:X::{1,2}/64 on both. Each side is told the other's endpoint
    /// only when `a_knows_b` / `b_knows_a`, which decides who can initiate.
    pub fn new(peer: PeerKind, outer_v6: bool, a_knows_b: bool, b_knows_a: bool) -> Pair {
        let a_ns = Netns::new();
        let b_ns = Netns::new();
        let under = Subnet::next();
        let inner = Subnet::next();
        let (a_cidr, b_cidr) =
            if outer_v6 { (under.v6_cidr(1), under.v6_cidr(2)) } else { (under.v4_cidr(1), under.v4_cidr(2)) };
        let veth = veth_pair(&a_ns, &a_cidr, Some(&b_ns), &b_cidr);
        let a = Wiremeshd::start(&a_ns, PORT_A);
        let b = peer.start(&b_ns, PORT_B);
        let a_in4 = format!("10.77.{}.1", inner.x);
        let b_in4 = format!("10.77.{}.2", inner.x);
        let (a_in6, b_in6) = (inner.v6(1), inner.v6(2));
        let b_ep = endpoint(&veth.b_ip, PORT_B);
        let a_ep = endpoint(&veth.a_ip, PORT_A);
        a.peer_add(b.public_key(), &format!("{b_in4}/32,{b_in6}/128"), a_knows_b.then_some(b_ep.as_str()), None);
        b.peer_add(&a.public_key, &format!("{a_in4}/32,{a_in6}/128"), b_knows_a.then_some(a_ep.as_str()), None);
        a.ip_up(&[&format!("{a_in4}/24"), &format!("{a_in6}/64")]);
        b.ip_up(&[&format!("{b_in4}/24"), &format!("{b_in6}/64")]);
        Pair { a, b, veth, a_ns, b_ns, under, a_in4, b_in4, a_in6, b_in6 }
    }

    pub fn devs(&self) -> [&dyn WgDev; 2] {
        [&self.a, self.b.as_ref()]
    }

    pub fn logs(&self) -> String {
        support::logs(&self.devs())
    }

    /// The very first packet from A (which starts the handshake) must be
    /// answered: both implementations queue packets during a handshake.
    pub fn first_ping_from_a(&self) {
        first_ping(&self.a_ns, &self.b_in4, &self.devs());
    }

    pub fn first_ping_from_b(&self) {
        first_ping(&self.b_ns, &self.a_in4, &self.devs());
    }

    /// Pings over both tunnel families in both directions, all replies required.
    pub fn ping_all(&self, what: &str) {
        let devs = self.devs();
        support::ping_ok(&format!("{what}: A->B v4"), &self.a_ns, &self.b_in4, 5, &devs);
        support::ping_ok(&format!("{what}: A->B v6"), &self.a_ns, &self.b_in6, 5, &devs);
        support::ping_ok(&format!("{what}: B->A v4"), &self.b_ns, &self.a_in4, 5, &devs);
        support::ping_ok(&format!("{what}: B->A v6"), &self.b_ns, &self.a_in6, 5, &devs);
    }
}

/// `ping -c 1 -W 5`: the first packet, which waits for the handshake.
pub fn first_ping(ns: &Netns, dst: &str, devs: &[&dyn WgDev]) {
    let out = ns.exec(&["ping", "-n", "-c", "1", "-W", "5", dst]);
    if !out.status.success() {
        panic!(
            "the first ping to {dst} (the one that starts the handshake) got no reply within 5 s:\n{}\n{}",
            support::output_text(&out),
            support::logs(devs)
        );
    }
}

/// Ping both ways over both tunnel families, then a verified 200 MB TCP
/// transfer each way (over the tunnel family matching the underlay), then
/// check both sides' `wg show dump`. `a_initiates` picks who gets the
/// other's endpoint, so the handshake goes that way.
pub fn basic_scenario(test: &str, peer: PeerKind, outer_v6: bool, a_initiates: bool) {
    let _timer = support::Timer::new(test);
    if !peer.require(test) {
        return;
    }
    let p = Pair::new(peer, outer_v6, a_initiates, !a_initiates);
    let (b_label, a_label) = (p.b.label(), p.a.label());
    eprintln!(
        "{test}: {a_label} <-> {b_label}, underlay {}, {} initiates",
        if outer_v6 { "IPv6" } else { "IPv4" },
        if a_initiates { "wiremeshd" } else { "the peer" }
    );
    if a_initiates {
        p.first_ping_from_a();
    } else {
        p.first_ping_from_b();
    }
    p.ping_all(test);
    let (a_ip, b_ip, fam) = if outer_v6 { (&p.a_in6, &p.b_in6, "v6") } else { (&p.a_in4, &p.b_in4, "v4") };
    let devs = p.devs();
    support::transfer_ok(&format!("{test}: TCP{fam} A->B"), &p.b_ns, b_ip, &p.a_ns, BULK, 1, &devs);
    support::transfer_ok(&format!("{test}: TCP{fam} B->A"), &p.a_ns, a_ip, &p.b_ns, BULK, 2, &devs);

    // Both ends account the traffic, and the responder learned the initiator's endpoint.
    let now = support::unix_now();
    let da = p.a.dump();
    let db = p.b.dump();
    let pa = da.peer(p.b.public_key());
    let pb = db.peer(&p.a.public_key);
    for (who, peer, ep) in
        [("wiremeshd", pa, endpoint(&p.veth.b_ip, PORT_B)), (b_label.as_str(), pb, endpoint(&p.veth.a_ip, PORT_A))]
    {
        assert!(
            peer.latest_handshake > 0 && peer.latest_handshake + 120 >= now && peer.latest_handshake <= now + 5,
            "{who}: latest handshake {} is not recent (now {now})\n{}",
            peer.latest_handshake,
            p.logs()
        );
        assert!(
            peer.rx_bytes > BULK && peer.tx_bytes > BULK,
            "{who}: rx/tx counters too small: {peer:?}\n{}",
            p.logs()
        );
        assert_eq!(peer.endpoint, ep, "{who}: endpoint\n{}", p.logs());
    }
    eprintln!(
        "{test}: wiremeshd peer: handshake {} rx {} tx {}; {b_label} peer: rx {} tx {}",
        pa.latest_handshake, pa.rx_bytes, pa.tx_bytes, pb.rx_bytes, pb.tx_bytes
    );
}

/// A verified TCP transfer from the roaming side to the other while the
/// roaming side's underlay address changes (169.254.X.{1,2} -> .3) at about a
/// quarter of the way. The transfer must complete, the other side's `wg show
/// dump` must show the new endpoint, and pings must work afterwards.
/// Both sides start out knowing each other's (old) endpoint.
pub fn roaming_scenario(test: &str, peer: PeerKind, a_roams: bool) {
    let _timer = support::Timer::new(test);
    if !peer.require(test) {
        return;
    }
    const BYTES: u64 = 64_000_000;
    let p = Pair::new(peer, false, true, true);
    let devs = p.devs();
    let (roam_ns, roam_if, old_ip, roam_port, obs_ns, obs_ip, obs): (
        &Netns,
        &str,
        &str,
        u16,
        &Netns,
        &str,
        &dyn WgDev,
    ) = if a_roams {
        (&p.a_ns, &p.veth.a_if, &p.veth.a_ip, PORT_A, &p.b_ns, &p.b_in4, p.b.as_ref())
    } else {
        (&p.b_ns, &p.veth.b_if, &p.veth.b_ip, PORT_B, &p.a_ns, &p.a_in4, &p.a)
    };
    let roamer_pub = if a_roams { p.a.public_key.clone() } else { p.b.public_key().to_string() };
    let new_ip = p.under.v4(3);
    first_ping(roam_ns, obs_ip, &devs);
    let before = obs.dump().peer(&roamer_pub).endpoint.clone();
    assert_eq!(before, endpoint(old_ip, roam_port), "endpoint before roaming\n{}", p.logs());

    let progress = Arc::new(AtomicU64::new(0));
    let opts = TransferOpts { progress: Some(progress.clone()), bytes_per_100ms: None, stall: None };
    // wireguard-go 0.0.20220316 keeps sending from its removed address (its
    // sticky source; sendmsg fails with ENETUNREACH) until its handshake retry
    // 15 s later, and TCP's backoff then adds up to as much again (the same
    // happens between two wireguard-go 0.0.20220316). Re-setting the endpoint
    // it has for wiremesh (the same address) drops that cached source at
    // once; wiremesh still has to notice the new source address by itself.
    let unstick_wg_go = !a_roams && peer == PeerKind::WgGo(crate::netns::WgGoVersion::Stable);
    let a_ep = endpoint(&p.veth.a_ip, PORT_A);
    let (result, roamed_at) = std::thread::scope(|s| {
        let t = s.spawn(|| support::tcp_transfer(obs_ns, obs_ip, roam_ns, BYTES, 3, Duration::from_secs(60), opts));
        let started = support::wait_until(Duration::from_secs(60), || {
            progress.load(Ordering::Relaxed) >= BYTES / 4 || t.is_finished()
        });
        let at = progress.load(Ordering::Relaxed);
        // Make before break: the new address first (promoted to primary when
        // the old one goes, so the subnet route never disappears), then the old
        // one removed; sockets keep their port and now send from the new address.
        let script = format!(
            "sysctl -q -w net.ipv4.conf.{roam_if}.promote_secondaries=1 && \
             ip addr add {new_ip}/24 dev {roam_if} && ip addr del {old_ip}/24 dev {roam_if}"
        );
        roam_ns.run_ok(&["sh", "-c", &script]);
        if unstick_wg_go {
            p.b.wg_set(&["peer", &p.a.public_key, "endpoint", &a_ep]);
        }
        assert!(started, "the transfer made no progress before the roam");
        (t.join().expect("transfer thread"), at)
    });
    assert!(roamed_at < BYTES, "the transfer finished before the address changed; make it larger");
    match result {
        Ok(r) => eprintln!("{test}: {r}; the sender's address moved {old_ip} -> {new_ip} after {roamed_at} bytes"),
        Err(e) => panic!("{test}: transfer across the address change failed: {e}\n{}", p.logs()),
    }
    let after = obs.dump().peer(&roamer_pub).endpoint.clone();
    let want = endpoint(&new_ip, roam_port);
    assert_eq!(after, want, "{}: endpoint after roaming (was {before})\n{}", obs.label(), p.logs());
    eprintln!("{test}: {} now shows endpoint {after} (was {before})", obs.label());
    // Both directions still work after the move.
    let roam_in = if a_roams { &p.a_in4 } else { &p.b_in4 };
    support::ping_ok(&format!("{test}: after roaming, to the roamer"), obs_ns, roam_in, 3, &devs);
    support::ping_ok(&format!("{test}: after roaming, from the roamer"), roam_ns, obs_ip, 3, &devs);
}
