//! `wiremeshd interface` in network namespaces the tests create: interop with
//! wireguard-go 0.0.20220316 and 0.0.20231211, wiremesh to wiremesh, the wg(8)
//! configuration protocol, shutdown and daemonizing, and one long test across
//! a time-based rekey.
//!
//! Everything is in one test binary on purpose: libtest runs its tests two at
//! a time here, so the long rekey test (135 s, mostly idle; it sorts first)
//! overlaps with all the others instead of adding to the total.
//!
//! Needs root, `ip`, `/dev/net/tun`, `wg`, `wg-quick` and both wireguard-go
//! builds (`ci/install-deps.sh`). Outside CI each test skips, saying why,
//! when it cannot run; with `CI` set it fails instead. Run with
//! `--nocapture` to see the interop figures.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "interface_netns/support.rs"]
mod support;

#[path = "interface_netns/mesh.rs"]
mod mesh;
#[path = "interface_netns/pair.rs"]
mod pair;
#[path = "interface_netns/shutdown.rs"]
mod shutdown;
#[path = "interface_netns/uapi.rs"]
mod uapi;
#[path = "interface_netns/wggo_interop.rs"]
mod wggo_interop;

use core::sync::atomic::AtomicU64;
use core::time::Duration;
use netns::WgGoVersion;
use pair::Pair;
use std::sync::Arc;
use std::time::Instant;
use support::{PeerKind, TransferOpts, WgDev};

/// wiremesh initiates to wireguard-go 0.0.20231211 and keeps a ping every
/// 0.5 s and a slow TCP stream going for 135 s, across REKEY_AFTER_TIME
/// (120 s, the real constant): at most one ping lost, the TCP stream intact,
/// and a new handshake (initiated by wiremesh, since wireguard-go is the
/// responder and only initiators rekey after time) visible in `wg show`.
#[test]
fn long_rekey_after_time_keeps_traffic() {
    const TEST: &str = "long_rekey_after_time_keeps_traffic";
    let _timer = support::Timer::new(TEST);
    if !support::require_wg_go(TEST, WgGoVersion::Backports) {
        return;
    }
    // Only wiremesh knows the other's endpoint, so every handshake is its own.
    let p = Pair::new(PeerKind::WgGo(WgGoVersion::Backports), false, true, false);
    p.first_ping_from_a();
    let b_pub = p.b.public_key().to_string();
    let a_pub = p.a.public_key.clone();
    let hs_a0 = p.a.dump().peer(&b_pub).latest_handshake;
    let hs_b0 = p.b.dump().peer(&a_pub).latest_handshake;
    assert!(hs_a0 > 0 && hs_b0 > 0, "no handshake after the first ping\n{}", p.logs());
    let started = Instant::now();
    const PINGS: u32 = 270; // 135 s at 0.5 s
    const PACED: usize = 16 * 1024; // bytes per 100 ms: 1.3 Mbit/s
    let stream_bytes = (PACED * 10 * 134) as u64;
    let (ping_out, transfer, samples) = std::thread::scope(|s| {
        let ping = s.spawn(|| {
            let count = PINGS.to_string();
            p.a_ns
                .exec_timeout(&["ping", "-n", "-c", &count, "-i", "0.5", "-W", "2", &p.b_in4], Duration::from_secs(180))
        });
        let transfer = s.spawn(|| {
            let opts =
                TransferOpts { progress: Some(Arc::new(AtomicU64::new(0))), bytes_per_100ms: Some(PACED), stall: None };
            support::tcp_transfer(&p.b_ns, &p.b_in4, &p.a_ns, stream_bytes, 7, Duration::from_secs(170), opts)
        });
        // Sample the handshake time every 5 s, for the record.
        let mut samples = Vec::new();
        while !ping.is_finished() {
            std::thread::sleep(Duration::from_secs(5));
            let hs = p.a.dump().peer(&b_pub).latest_handshake;
            samples.push((started.elapsed().as_secs(), hs));
        }
        (ping.join().expect("ping thread"), transfer.join().expect("transfer thread"), samples)
    });
    let text = support::output_text(&ping_out);
    let summary = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or("").to_string();
    let nums: Vec<u32> = summary.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect();
    let (sent, received) = (nums.first().copied().unwrap_or(0), nums.get(1).copied().unwrap_or(0));
    let dump_a = p.a.dump();
    let dump_b = p.b.dump();
    let hs_a1 = dump_a.peer(&b_pub).latest_handshake;
    let hs_b1 = dump_b.peer(&a_pub).latest_handshake;
    let changes: Vec<String> = samples
        .windows(2)
        .filter(|w| w[0].1 != w[1].1)
        .map(|w| format!("handshake changed between t={}s and t={}s ({} -> {})", w[0].0, w[1].0, w[0].1, w[1].1))
        .collect();
    eprintln!(
        "{TEST}: {summary}\n{TEST}: wiremesh handshake {hs_a0} -> {hs_a1}, wireguard-go {hs_b0} -> {hs_b1}; {}",
        changes.join("; ")
    );
    assert_eq!(sent, PINGS, "ping did not send every packet:\n{text}\n{}", p.logs());
    assert!(received + 1 >= sent, "more than one ping lost across the rekey: {summary}\n{text}\n{}", p.logs());
    match transfer {
        Ok(r) => eprintln!("{TEST}: slow TCP stream across the rekey: {r}"),
        Err(e) => panic!("the TCP connection did not survive the rekey: {e}\n{}", p.logs()),
    }
    assert!(
        hs_a1 >= hs_a0 + 110,
        "wiremesh's latest handshake did not move on across REKEY_AFTER_TIME: {hs_a0} -> {hs_a1} \
         (samples {samples:?})\n{}",
        p.logs()
    );
    assert!(
        hs_b1 >= hs_b0 + 110,
        "wireguard-go did not see a new handshake across REKEY_AFTER_TIME: {hs_b0} -> {hs_b1}\n{}",
        p.logs()
    );
}
