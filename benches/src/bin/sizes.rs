//! Prints the in-memory size of wiremesh-core's per-peer and per-packet state,
//! for the benchmark report: `cargo run -p wiremesh-benches --bin sizes`.

use core::mem::size_of;
use wiremesh_benches::BenchDevice;
use wiremesh_core::cookie::{CookieChecker, CookieSender, LoadMonitor, RateLimiter};
use wiremesh_core::crypto::{CryptoProvider, Portable, Ring};
use wiremesh_core::device::{PeerStats, Transmit};
use wiremesh_core::messages::{Initiation, Response};
use wiremesh_core::noise::{Handshake, SessionKeys, StaticIdentity};
use wiremesh_core::replay::ReplayWindow;
use wiremesh_core::routing::AllowedIps;
use wiremesh_core::session::{Keypair, Keypairs};
use wiremesh_core::timers::Timers;

type RingKey = <Ring as CryptoProvider>::TransportKey;
type PortableKey = <Portable as CryptoProvider>::TransportKey;

fn main() {
    let rows: &[(&str, usize)] = &[
        ("TransportKey (ring)", size_of::<RingKey>()),
        ("TransportKey (portable)", size_of::<PortableKey>()),
        ("ReplayWindow", size_of::<ReplayWindow>()),
        ("Keypair<ring>", size_of::<Keypair<RingKey>>()),
        ("Keypair<portable>", size_of::<Keypair<PortableKey>>()),
        ("Keypairs<ring> (current, previous, next)", size_of::<Keypairs<RingKey>>()),
        ("Handshake", size_of::<Handshake>()),
        ("SessionKeys", size_of::<SessionKeys>()),
        ("StaticIdentity", size_of::<StaticIdentity>()),
        ("CookieSender", size_of::<CookieSender>()),
        ("CookieChecker", size_of::<CookieChecker>()),
        ("LoadMonitor", size_of::<LoadMonitor>()),
        ("RateLimiter", size_of::<RateLimiter>()),
        ("Timers", size_of::<Timers>()),
        ("PeerStats", size_of::<PeerStats>()),
        ("Initiation", size_of::<Initiation>()),
        ("Response", size_of::<Response>()),
        ("Transmit", size_of::<Transmit>()),
        ("AllowedIps<u32> (empty)", size_of::<AllowedIps<u32>>()),
        ("Device<ChaCha20Rng, Ring>", size_of::<BenchDevice<Ring>>()),
    ];
    println!("| type | bytes |");
    println!("|---|---:|");
    for (name, size) in rows {
        println!("| `{name}` | {size} |");
    }
}
