//! Workload tokens end to end (root only; skipped elsewhere, failing in CI):
//! a control server running the identity service (`--identity on`) and
//! nodes in network namespaces as in `tailnet_mesh.rs`. A node gets tokens
//! over the tailnet (`wiremesh token` through its agent, and curl(1)); a
//! verifier on another node fetches the JWKS and the discovery document over
//! HTTP and checks every token with an independent JOSE library
//! (`jsonwebtoken`); an address that is not the caller's own (a spoofed
//! tailnet source sent through the caller's tunnel) and the underlay get
//! nothing; browser headers, bad input and audiences the policy does not
//! grant are refused with JSON errors; tokens signed before a key rotation
//! and before a server restart still verify; restarted with
//! `--identity-alg RS256`, two rotations later RS256 tokens verify from the
//! published RSA key and the earlier ES256 ones still do.

#[path = "../../testsupport/netns.rs"]
mod netns;
#[path = "support/tailnet.rs"]
mod tailnet;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use netns::Netns;
use serde_json::Value;
use std::time::Duration;
use tailnet::*;

/// curl(1) in `ns`: (HTTP status, body); status 0 when no answer came.
fn curl(ns: &Netns, args: &[&str]) -> (u16, String) {
    let mut full = vec!["curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}"];
    full.extend_from_slice(args);
    let out = ns.exec(&full);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A token request from `ns` with the required header, plus `extra` args.
fn token_request(ns: &Netns, url: &str, form: &[&str], extra: &[&str]) -> (u16, Value) {
    let mut args = vec!["-X", "POST", "-H", "X-Wiremesh-Token: 1"];
    for f in form {
        args.extend_from_slice(&["--data-urlencode", f]);
    }
    args.extend_from_slice(extra);
    let endpoint = format!("{url}/token");
    args.push(&endpoint);
    let (code, body) = curl(ns, &args);
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn identity_url(n: &Node) -> Option<String> {
    let s = n.status();
    let peers = s["peers"].as_array()?;
    let id = peers.iter().find(|p| p["node"]["name"] == "identity")?;
    Some(format!("http://{}", id["node"]["ipv4"].as_str()?))
}

/// Verifies `token` with the keys in `jwks` for `aud`; the claims. ES256
/// (the default) and RS256 (`--identity-alg RS256`) are accepted.
fn verify(token: &str, jwks: &JwkSet, issuer: &str, aud: &str) -> Result<Value, String> {
    let header = decode_header(token).map_err(|e| e.to_string())?;
    if !matches!(header.alg, Algorithm::ES256 | Algorithm::RS256) {
        return Err(format!("alg {:?} refused", header.alg));
    }
    let kid = header.kid.ok_or("no kid")?;
    let jwk = jwks.find(&kid).ok_or_else(|| format!("kid {kid} not in the JWKS"))?;
    let mut v = Validation::new(header.alg);
    v.set_audience(&[aud]);
    v.set_issuer(&[issuer]);
    v.set_required_spec_claims(&["exp", "nbf", "iat", "aud", "iss", "sub"]);
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    decode::<Value>(token, &key, &v).map(|d| d.claims).map_err(|e| e.to_string())
}

fn fetch_jwks(ns: &Netns, url: &str) -> JwkSet {
    let (code, body) = curl(ns, &[&format!("{url}/.well-known/jwks.json")]);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("a JWKS")
}

#[test]
fn identity_workload_tokens_over_the_tailnet() {
    if !netns::require_or_skip("identity_workload_tokens_over_the_tailnet") {
        return;
    }
    let mut lab = Lab::with_identity();
    let key = lab.new_key(true);
    let alpha = lab.spawn_node("alpha", &key);
    let beta = lab.spawn_node("beta", &key);
    let all = [&alpha, &beta];
    for n in all {
        // The other node and the identity node.
        wait_until(Duration::from_secs(30), "maps with the identity node", || peer_count(n) == 2, || logs(&all));
    }
    let url = identity_url(&alpha).expect("the identity node in alpha's map");
    let alpha_id = alpha.status()["self"]["id"].as_i64().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the identity service answering",
        || curl(&alpha.ns, &[&format!("{url}/.well-known/openid-configuration")]).0 == 200,
        || logs(&all),
    );

    // The verifier, on beta: discovery and keys over plain HTTP on the tailnet.
    let (code, body) = curl(&beta.ns, &[&format!("{url}/.well-known/openid-configuration")]);
    assert_eq!(code, 200, "{body}");
    let discovery: Value = serde_json::from_str(&body).unwrap();
    eprintln!("discovery: {body}");
    let issuer = discovery["issuer"].as_str().unwrap().to_string();
    assert!(issuer.starts_with("https://"), "{issuer}");
    assert_eq!(discovery["jwks_uri"], format!("{issuer}/.well-known/jwks.json"));
    let jwks = fetch_jwks(&beta.ns, &url);
    assert!(jwks.keys.len() >= 2, "current and next keys published");
    // Paths the service does not own reach the OIDC provider, whose
    // endpoints the discovery document lists.
    assert_eq!(discovery["authorization_endpoint"], format!("{url}/oidc/authorize"), "{discovery}");
    let (code, body) = curl(&alpha.ns, &[&format!("{url}/oidc/userinfo")]);
    assert_eq!(code, 401, "the provider answers /oidc/userinfo without a token: {body}");

    // The same documents on the control server's public listener.
    let public = issuer.trim_start_matches("https://").to_string();
    let (code, body) = curl(&lab.server_ns, &["-k", &format!("https://{public}/.well-known/jwks.json")]);
    assert_eq!(code, 200, "{body}");
    let public_jwks: JwkSet = serde_json::from_str(&body).unwrap();
    assert_eq!(public_jwks.keys.len(), jwks.keys.len());

    // `wiremesh token` through alpha's agent.
    let out = alpha.cli(&["token", "--audience", "https://vault.example", "--json"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), alpha.log());
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("wiremesh token --json: {answer}");
    assert_eq!((answer["token_type"].as_str(), answer["expires_in"].as_i64()), (Some("Bearer"), Some(600)));
    let cli_token = answer["access_token"].as_str().unwrap().to_string();
    let claims = verify(&cli_token, &jwks, &issuer, "https://vault.example").unwrap();
    assert_eq!(claims["sub"], format!("node:{alpha_id}"));
    assert_eq!(claims["name"], "alpha");
    assert_eq!(claims["addresses"][0], alpha.ipv4());
    assert_eq!(claims["addresses"][1], alpha.ipv6());
    assert_eq!(claims["owner"], "admin", "keys made without a user: owner admin");
    assert_eq!(claims["tags"], serde_json::json!([]));
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 600);
    assert!(verify(&cli_token, &jwks, &issuer, "https://other.example").is_err(), "audience checked");

    // The library-free way: curl on the node, two audiences, a lifetime.
    let (code, body) = token_request(&alpha.ns, &url, &["audience=db", "audience=s3", "lifetime=120"], &[]);
    assert_eq!(code, 200, "{body}");
    let curl_token = body["access_token"].as_str().unwrap().to_string();
    let claims = verify(&curl_token, &jwks, &issuer, "s3").unwrap();
    assert_eq!(claims["aud"], serde_json::json!(["db", "s3"]));
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 120);
    // beta's token names beta.
    let (code, body) = token_request(&beta.ns, &url, &["audience=db"], &[]);
    assert_eq!(code, 200, "{body}");
    let claims = verify(body["access_token"].as_str().unwrap(), &jwks, &issuer, "db").unwrap();
    assert_eq!(claims["name"], "beta");

    // A userspace node (no TUN): `wiremesh token` through its agent (the
    // netstack connects), and curl through the agent's HTTP proxy.
    let mut gamma = lab.new_node("gamma");
    lab.start_agent_with(&mut gamma, "gamma", &key, &["--userspace", "--http-proxy", "127.0.0.1:1055"]);
    wait_until(Duration::from_secs(30), "gamma's map", || peer_count(&gamma) == 3, || gamma.log());
    let out = gamma.cli(&["token", "--audience", "db"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), gamma.log());
    let claims = verify(String::from_utf8_lossy(&out.stdout).trim(), &jwks, &issuer, "db").unwrap();
    assert_eq!(claims["name"], "gamma");
    let (code, body) = token_request(&gamma.ns, &url, &["audience=db"], &["--proxy", "http://127.0.0.1:1055"]);
    assert_eq!(code, 200, "{body}");
    let claims = verify(body["access_token"].as_str().unwrap(), &jwks, &issuer, "db").unwrap();
    assert_eq!(claims["name"], "gamma");
    drop(gamma);

    // Latency of a token request over the tailnet, as curl on alpha sees it
    // (printed for docs/identity.md; 20 requests on one kept-alive connection
    // and 20 on fresh connections).
    for (what, fresh) in [("kept-alive connection", false), ("fresh connections", true)] {
        let endpoint = format!("{url}/token");
        let mut args = vec!["curl", "-s"];
        for i in 0..20 {
            if i > 0 {
                args.push("--next");
            }
            args.extend_from_slice(&["-o", "/dev/null", "-w", "%{http_code} %{time_total}\n", "-X", "POST"]);
            args.extend_from_slice(&["-H", "X-Wiremesh-Token: 1", "--data", "audience=db"]);
            if fresh {
                args.extend_from_slice(&["-H", "Connection: close"]);
            }
            args.push(&endpoint);
        }
        let out = alpha.ns.exec(&args);
        let mut times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("200 ")?.trim().parse().ok())
            .collect();
        assert_eq!(times.len(), 20, "{}", String::from_utf8_lossy(&out.stderr));
        times.sort_by(|a, b| a.total_cmp(b));
        eprintln!(
            "token request over the tailnet ({what}): median {:.2} ms, max {:.2} ms",
            times[10] * 1000.0,
            times[19] * 1000.0
        );
    }

    // A spoofed source: alpha sends from beta's tailnet address through its
    // own tunnel. The packets are authenticated by alpha's key, which does
    // not own that address: nothing answers, no token.
    let beta4 = beta.ipv4();
    alpha.ns.run_ok(&["ip", "addr", "add", &format!("{beta4}/32"), "dev", &alpha.tun]);
    let (code, body) = token_request(&alpha.ns, &url, &["audience=db"], &["--interface", &beta4, "-m", "4"]);
    assert_eq!(code, 0, "a spoofed source got an answer: {body}");
    alpha.ns.run_ok(&["ip", "addr", "del", &format!("{beta4}/32"), "dev", &alpha.tun]);
    // The underlay: the server's own address has no identity service; and
    // a machine off the tailnet cannot reach the tailnet address at all.
    let server_addr = lab.subnet.v4(1);
    let (code, _) = token_request(&alpha.ns, &format!("http://{server_addr}"), &["audience=db"], &["-m", "4"]);
    assert_eq!(code, 0, "the underlay answered");
    let (code, _) = token_request(&lab.server_ns, &url, &["audience=db"], &["-m", "4"]);
    assert_eq!(code, 0, "a host off the tailnet reached the identity service");

    // Browser headers and a missing header: refused, JSON errors.
    for (extra, want) in [
        (vec!["-H", "Origin: https://evil.example"], "browser_request"),
        (vec!["-H", "Sec-Fetch-Site: cross-site"], "browser_request"),
        (vec!["-H", "Sec-Fetch-Mode: no-cors"], "browser_request"),
    ] {
        let (code, body) = token_request(&alpha.ns, &url, &["audience=db"], &extra);
        assert_eq!((code, body["code"].as_str()), (403, Some(want)), "{body}");
        assert!(body["error"].is_string() && body.get("access_token").is_none());
    }
    let (code, body) = curl(&alpha.ns, &["-X", "POST", "--data", "audience=db", &format!("{url}/token")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("missing_header"), "{body}");

    // Bad input: 4xx with the JSON error body.
    let big = format!("audience={}", "a".repeat(100_000));
    let big_file = tmpdir("bigform");
    std::fs::write(&big_file, &big).unwrap();
    let big_arg = format!("@{}", big_file.display());
    for (args, status, code_want) in [
        (vec!["-X", "POST", "-H", "X-Wiremesh-Token: 1", "--data", "lifetime=60"], 400, "invalid_audience"),
        (
            vec!["-X", "POST", "-H", "X-Wiremesh-Token: 1", "--data", "audience=x&lifetime=7200"],
            400,
            "invalid_lifetime",
        ),
        (vec!["-X", "POST", "-H", "X-Wiremesh-Token: 1", "--data", "audience=x&lifetime=ten"], 400, "invalid_lifetime"),
        (vec!["-X", "POST", "-H", "X-Wiremesh-Token: 1", "--data", "audience=%zz"], 400, "bad_request"),
        (vec!["-H", "X-Wiremesh-Token: 1"], 405, "method_not_allowed"),
        (vec!["-X", "POST", "-H", "X-Wiremesh-Token: 1", "--data-binary", &big_arg], 413, "too_large"),
        (
            vec!["-X", "POST", "-H", "X-Wiremesh-Token: 1", "-H", "Content-Type: application/json", "--data", "{}"],
            415,
            "unsupported_media_type",
        ),
    ] {
        let mut a = args.clone();
        let endpoint = format!("{url}/token");
        a.push(&endpoint);
        let (code, body) = curl(&alpha.ns, &a);
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!((code, v["code"].as_str()), (status, Some(code_want)), "{args:?}: {body}");
    }
    let _ = std::fs::remove_file(&big_file);
    let (code, body) = curl(&alpha.ns, &[&format!("{url}/nothing-here")]);
    assert_eq!(code, 404, "{body}");

    // Key rotation: a new key signs; earlier tokens still verify with the
    // JWKS fetched afterwards.
    let old_kid = decode_header(&cli_token).unwrap().kid.unwrap();
    let out = lab.admin(&["idp", "rotate-keys"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, body) = token_request(&alpha.ns, &url, &["audience=db"], &[]);
    assert_eq!(code, 200, "{body}");
    let new_token = body["access_token"].as_str().unwrap().to_string();
    assert_ne!(decode_header(&new_token).unwrap().kid.unwrap(), old_kid, "a new key signs after rotation");
    let jwks = fetch_jwks(&beta.ns, &url);
    verify(&cli_token, &jwks, &issuer, "https://vault.example").expect("a token from before the rotation verifies");
    verify(&new_token, &jwks, &issuer, "db").unwrap();

    // A restart keeps the keys and the identity node: earlier tokens verify.
    // It restarts with `--identity-alg RS256`: the stored ES256 set stays
    // until rotations switch it over.
    lab.server.take();
    let listen = format!("{}:8443", lab.subnet.v4(1));
    let state = lab.server_state.to_str().unwrap().to_string();
    let mut child = lab.server_ns.spawn(&[
        WIREMESHD,
        "control",
        "--listen",
        &listen,
        "--state",
        &state,
        "--identity",
        "on",
        "--identity-alg",
        "RS256",
    ]);
    let out = Output::attach(&mut child);
    out.wait_for("control URL: ", Duration::from_secs(30));
    lab.server = Some(Proc { child, out });
    wait_until(
        Duration::from_secs(40),
        "the identity service back after the restart",
        || token_request(&alpha.ns, &url, &["audience=db"], &["-m", "3"]).0 == 200,
        || logs(&all),
    );
    let jwks = fetch_jwks(&beta.ns, &url);
    verify(&cli_token, &jwks, &issuer, "https://vault.example").expect("verifies after the restart");
    verify(&new_token, &jwks, &issuer, "db").expect("verifies after the restart");

    // RS256: two rotations switch the set over (the already-published
    // ES256 `next` key signs first), with no gap for verifiers.
    let rs256_started = std::time::Instant::now();
    for _ in 0..2 {
        let out = lab.admin(&["idp", "rotate-keys"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (code, body) = token_request(&alpha.ns, &url, &["audience=db"], &[]);
    assert_eq!(code, 200, "{body}");
    let rs_token = body["access_token"].as_str().unwrap().to_string();
    let rs_header = decode_header(&rs_token).unwrap();
    assert_eq!(rs_header.alg, Algorithm::RS256, "RS256 signs after two rotations");
    let jwks = fetch_jwks(&beta.ns, &url);
    let rs_jwk = serde_json::to_value(jwks.find(rs_header.kid.as_deref().unwrap()).unwrap()).unwrap();
    assert_eq!((rs_jwk["kty"].as_str(), rs_jwk["e"].as_str()), (Some("RSA"), Some("AQAB")), "{rs_jwk}");
    let claims = verify(&rs_token, &jwks, &issuer, "db").unwrap();
    assert_eq!((claims["name"].as_str(), claims["sub"].as_str()), (Some("alpha"), Some(&*format!("node:{alpha_id}"))));
    verify(&new_token, &jwks, &issuer, "db").expect("an ES256 token from before the switch still verifies");
    let (code, body) = curl(&beta.ns, &[&format!("{url}/.well-known/openid-configuration")]);
    assert_eq!(code, 200, "{body}");
    let algs: Value = serde_json::from_str::<Value>(&body).unwrap()["id_token_signing_alg_values_supported"].clone();
    assert!(algs.as_array().unwrap().iter().any(|a| a == "RS256") && algs.to_string().contains("ES256"), "{algs}");
    // Tampered: another subject under the RS256 signature is refused.
    let parts: Vec<&str> = rs_token.split('.').collect();
    let mut forged: Value = serde_json::from_slice(&wiremesh_daemon::identity::unb64url(parts[1]).unwrap()).unwrap();
    forged["sub"] = "node:0".into();
    let forged = wiremesh_daemon::identity::b64url(&serde_json::to_vec(&forged).unwrap());
    let err = verify(&format!("{}.{forged}.{}", parts[0], parts[2]), &jwks, &issuer, "db").unwrap_err();
    assert!(err.contains("InvalidSignature"), "{err}");
    eprintln!("RS256 switch-over (two rotations, checks): {:.1} s", rs256_started.elapsed().as_secs_f64());

    // A policy: audiences come from the workload-token capability.
    let policy = r#"{
        "tagOwners": {"tag:identity": []},
        "grants": [
            {"src": ["*"], "dst": ["*"], "ip": ["*"]},
            {"src": ["*"], "dst": ["tag:identity"], "app": {"wiremesh.dev/cap/workload-token": [{"audiences": ["vault"]}]}},
        ],
    }"#;
    let file = tmpdir("policy");
    std::fs::write(&file, policy).unwrap();
    let out = lab.admin(&["policy", "set", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_file(&file);
    wait_until(
        Duration::from_secs(20),
        "the policy in force",
        || token_request(&alpha.ns, &url, &["audience=db"], &[]).0 == 403,
        || logs(&all),
    );
    let (code, body) = token_request(&alpha.ns, &url, &["audience=db"], &[]);
    assert_eq!((code, body["code"].as_str()), (403, Some("audience_not_allowed")), "{body}");
    let (code, body) = token_request(&alpha.ns, &url, &["audience=vault"], &[]);
    assert_eq!(code, 200, "{body}");
    verify(body["access_token"].as_str().unwrap(), &jwks, &issuer, "vault").unwrap();
}
