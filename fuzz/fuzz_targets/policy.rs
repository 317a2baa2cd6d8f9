//! The tailnet policy's huJSON reader, checks, tests evaluator and compiler
//! (`daemon/src/policy/`, included as they are: they depend on `std`,
//! `serde_json` and `wiremesh-core` only) on arbitrary text.
//!
//! Nothing may panic; every error names a place inside the text; a parsed
//! document printed as plain JSON parses again to the same value; a policy
//! that reads compiles for a small fixed tailnet into filters that only name
//! each node's own addresses as destinations, and peers that see each other
//! both ways and never themselves.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

// At the crate root, where the modules' `super::` finds its siblings.
#[allow(dead_code)]
#[path = "../../daemon/src/policy/compile.rs"]
mod compile;
#[allow(dead_code)]
#[path = "../../daemon/src/policy/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../daemon/src/policy/hujson.rs"]
mod hujson;
#[allow(dead_code)]
#[path = "../../daemon/src/policy/model.rs"]
mod model;
pub use error::{ErrorKind, PolicyError};
/// What the compiler's route module names through `crate::policy`.
#[allow(dead_code)]
mod policy {
    pub use super::compile::Node;
    pub(crate) use super::model;
}

fn nodes() -> Vec<compile::Node> {
    let users =
        [Some("alice@example.com"), Some("alice@example.com"), Some("bob@example.com"), None, None, Some("admin")];
    let tags: [&[&str]; 6] = [&[], &[], &[], &["tag:server"], &["tag:db", "tag:x"], &[]];
    (0..6)
        .map(|i| compile::Node {
            id: i as i64,
            addresses: vec![
                IpAddr::from([100, 64, 0, i as u8 + 1]),
                format!("fd7a:115c:a1e0::{}", i + 1).parse().unwrap(),
            ],
            tags: tags[i].iter().map(|t| t.to_string()).collect(),
            user: users[i].map(str::to_string),
            tagged_by: (i == 4).then(|| "bob@example.com".to_string()),
        })
        .collect()
}

fn check_pos(text: &str, pos: hujson::Pos) {
    let lines = text.split('\n').count() as u32;
    assert!(pos.line >= 1 && pos.line <= lines, "line {} of {lines}", pos.line);
    assert!(pos.col >= 1);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let doc = match hujson::parse(text) {
        Ok(d) => d,
        Err(e) => return check_pos(text, e.pos),
    };
    let json = serde_json::to_string(&doc.to_json()).unwrap();
    let again = hujson::parse(&json).expect("plain JSON is huJSON");
    assert_eq!(again.to_json(), doc.to_json());
    let p = match model::from_value(&doc) {
        Ok(p) => p,
        Err(e) => return check_pos(text, e.pos.expect("model errors have a place")),
    };
    if let Err(e) = compile::run_tests(&p) {
        assert_eq!(e.kind, ErrorKind::TestFailed);
        check_pos(text, e.pos.expect("a failed test has a place"));
    }
    let nodes = nodes();
    let out = compile::compile(&p, &nodes);
    assert_eq!(out.len(), nodes.len());
    for (i, n) in out.iter().enumerate() {
        for r in &n.filter {
            assert!(r.destinations.iter().all(|d| nodes[i].addresses.contains(&d.addr()) && d.len() >= 32));
        }
        for peer in &n.peers {
            assert_ne!(*peer, nodes[i].id);
            assert!(out[*peer as usize].peers.contains(&nodes[i].id), "visibility is mutual");
        }
        for c in &n.capabilities {
            assert!(!c.sources.is_empty());
        }
    }
});
