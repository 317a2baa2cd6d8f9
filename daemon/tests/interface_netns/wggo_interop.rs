//! Interop with wireguard-go 0.0.20220316 (Debian bookworm) and 0.0.20231211
//! (bookworm-backports): ping and 200 MB verified TCP transfers both ways,
//! with either side initiating, over an IPv4 and an IPv6 underlay, and a
//! roaming sender on either side.

use crate::netns::WgGoVersion::{Backports, Stable};
use crate::pair::{basic_scenario, roaming_scenario};
use crate::support::PeerKind::WgGo;

#[test]
fn v20220316_ipv4_underlay_wiremesh_initiates() {
    basic_scenario("wggo_interop::v20220316_ipv4_underlay_wiremesh_initiates", WgGo(Stable), false, true);
}

#[test]
fn v20231211_ipv4_underlay_wiremesh_initiates() {
    basic_scenario("wggo_interop::v20231211_ipv4_underlay_wiremesh_initiates", WgGo(Backports), false, true);
}

#[test]
fn v20220316_ipv6_underlay_wireguard_go_initiates() {
    basic_scenario("wggo_interop::v20220316_ipv6_underlay_wireguard_go_initiates", WgGo(Stable), true, false);
}

#[test]
fn v20231211_ipv6_underlay_wireguard_go_initiates() {
    basic_scenario("wggo_interop::v20231211_ipv6_underlay_wireguard_go_initiates", WgGo(Backports), true, false);
}

#[test]
fn v20220316_roaming_wiremesh_sender_moves() {
    roaming_scenario("wggo_interop::v20220316_roaming_wiremesh_sender_moves", WgGo(Stable), true);
}

#[test]
fn v20231211_roaming_wiremesh_sender_moves() {
    roaming_scenario("wggo_interop::v20231211_roaming_wiremesh_sender_moves", WgGo(Backports), true);
}

#[test]
fn v20220316_roaming_wireguard_go_sender_moves() {
    roaming_scenario("wggo_interop::v20220316_roaming_wireguard_go_sender_moves", WgGo(Stable), false);
}

#[test]
fn v20231211_roaming_wireguard_go_sender_moves() {
    roaming_scenario("wggo_interop::v20231211_roaming_wireguard_go_sender_moves", WgGo(Backports), false);
}
