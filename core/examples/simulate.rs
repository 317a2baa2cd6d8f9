//! A small tailnet of WireGuard peers over a lossy virtual network: shows the
//! handshakes, rekeys, drops and counters of `wiremesh-core` over ten minutes
//! of protocol time, in a fraction of a second of real time.
//!
//! `cargo run --release -p wiremesh-core --example simulate [seed]`

#[path = "../tests/sim/mod.rs"]
mod sim;

use sim::{NetConfig, Sim};
use std::time::Duration;
use wiremesh_core::crypto::DefaultProvider;
use wiremesh_core::device::{DropReason, Event};

fn main() {
    let seed = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(7);
    let net = NetConfig {
        loss: 0.05,
        duplicate: 0.02,
        reorder: 0.05,
        jitter: Duration::from_millis(15),
        ..NetConfig::default()
    };
    let mut s = Sim::<DefaultProvider>::new(seed, net);
    let n = 4;
    for _ in 0..n {
        s.add_node();
    }
    for a in 0..n {
        for b in a + 1..n {
            s.connect(a, b);
        }
    }
    println!("{n} peers, full mesh, 5% loss, 2% duplication, 5% reordering, seed {seed}");
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    for second in 0..600u32 {
        for a in 0..n {
            let b = (a + 1 + (second as usize % (n - 1))) % n;
            let dst = s.nodes[b].tunnel_ip;
            let _ = s.send_ip(a, dst, &second.to_be_bytes());
            sent += 1;
        }
        s.run_for(Duration::from_secs(1));
    }
    s.run_for(Duration::from_secs(5));
    let delivered: usize = s.nodes.iter().map(|n| n.delivered.len()).sum();
    println!("virtual time 605 s simulated in {:.0?}", start.elapsed());
    println!("packets sent {sent}, delivered {delivered} (losses on the wire are not retransmitted: WireGuard is a datagram tunnel)");
    for (i, node) in s.nodes.iter().enumerate() {
        let handshakes = node.events.iter().filter(|e| matches!(e, Event::HandshakeCompleted { .. })).count();
        let drops = node.device.drops();
        let list: Vec<String> = DropReason::ALL
            .iter()
            .filter(|r| drops.get(**r) > 0)
            .map(|r| format!("{}={}", r.name(), drops.get(*r)))
            .collect();
        println!(
            "node {i} {}: {} handshakes completed, {} packets in, drops: {}",
            node.tunnel_ip,
            handshakes,
            node.delivered.len(),
            if list.is_empty() { "none".to_string() } else { list.join(" ") }
        );
    }
}
