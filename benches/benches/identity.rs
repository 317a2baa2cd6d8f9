//! The identity service's signing cost: one workload token (the claims a
//! node's token carries, serialized and signed as a compact JWS) per
//! iteration, on one core, with ES256 (ECDSA P-256) and EdDSA (Ed25519)
//! keys. Tokens per second per core is the reciprocal of the time per
//! iteration. The latency of a whole request over the tailnet is measured
//! by `daemon/tests/identity_workload.rs` (docs/identity.md).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use std::collections::BTreeMap;
use wiremesh_daemon::control::proto::NodeInfo;
use wiremesh_daemon::identity::caller::Caller;
use wiremesh_daemon::identity::keys::{Algorithm, KeySet};
use wiremesh_daemon::identity::tokens::{issue, TokenRequest};

fn caller() -> Caller {
    Caller {
        node: NodeInfo {
            id: 42,
            name: "web-1".into(),
            fqdn: "web-1.wiremesh.internal".into(),
            node_key: String::new(),
            machine_key: String::new(),
            ipv4: "100.64.0.42".parse().unwrap(),
            ipv6: "fd7a:115c:a1e0::2a".parse().unwrap(),
            endpoints: vec![],
            allowed_ips: vec![],
            tags: vec!["tag:web".into(), "tag:prod".into()],
            ephemeral: false,
            online: true,
            owner: "tagged-devices".into(),
            created_at: 0,
            relay: None,
        },
        user: None,
        capabilities: BTreeMap::new(),
        policy_set: false,
    }
}

fn signing(c: &mut Criterion) {
    let who = caller();
    let req = TokenRequest { audiences: vec!["https://vault.example.com".into()], lifetime: 600 };
    let mut g = c.benchmark_group("workload_token");
    g.throughput(Throughput::Elements(1));
    for (name, alg) in [("ES256", Algorithm::ES256), ("EdDSA", Algorithm::EdDSA)] {
        let set = KeySet::generate(alg, 0).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let body = issue(set.current(), "https://control.example:8443", &who, &req, 1_700_000_000).unwrap();
                black_box(body)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
