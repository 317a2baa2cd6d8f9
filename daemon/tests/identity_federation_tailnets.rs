//! Tailnet to tailnet federation end to end, no root needed: two real
//! `wiremeshd control` servers on loopback. A runs the identity service and
//! serves its discovery document and JWKS on its public listener; its
//! certificate (made here, for `wiremesh-control` and 127.0.0.1, and put in
//! A's state directory before its first start) is what B trusts through
//! `--federation-ca`. B holds a trust credential whose issuer is A's
//! issuer URL. A userspace node of A gets workload tokens from A's identity
//! service (`wiremesh token`); a userspace node agent registers with B with
//! one (`--client-id … --id-token-file …`) and is shown online, tagged; the
//! same token again is refused (`jti_reused`), and so is a token of A for
//! another audience (`wrong_audience`).

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use wiremesh_daemon::control::client::{Client, ClientError};
use wiremesh_daemon::control::federation::CredentialInfo;
use wiremesh_daemon::control::proto::{self, FederatedRegisterRequest, NodeInfo, RegisterRequest};
use wiremesh_daemon::node::keys::MachineKey;

#[path = "support/control.rs"]
mod control_server;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test's directory, removed however the test ends.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cli(server: &control_server::Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wiremesh"))
        .args(args)
        .args(["--control", &server.url.to_string(), "--admin-token", server.token.as_deref().unwrap()])
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A userspace node agent on `server`'s tailnet; `args` say how it registers.
fn agent(server: &control_server::Server, dir: &std::path::Path, name: &str, args: &[&str]) -> Agent {
    let state = dir.join(name);
    Agent(
        Command::new(env!("CARGO_BIN_EXE_wiremeshd"))
            .args(["node", "--userspace", "--control", &server.url.to_string(), "--hostname", name])
            .args(["--tun", &format!("wm{name}0"), "--state"])
            .arg(&state)
            .arg("--socket")
            .arg(dir.join(format!("{name}.sock")))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// `wiremesh token --audience aud` through the agent at `sock`.
fn token(sock: &std::path::Path, aud: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wiremesh"))
        .arg("--socket")
        .arg(sock)
        .args(["token", "--audience", aud])
        .output()
        .unwrap()
}

/// Polls `f` until it answers `Ok`; on timeout, fails with its last `Err`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {last}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn register(c: &Client, client_id: &str, token: &str, tags: &[&str]) -> Result<NodeInfo, ClientError> {
    let machine = MachineKey::generate().unwrap().0;
    let challenge = c.challenge().await.unwrap();
    let mut req = FederatedRegisterRequest {
        request: RegisterRequest {
            auth_key: String::new(),
            machine_key: machine.public_hex(),
            node_key: proto::b64_key(&[9; 32]),
            hostname: "replay".into(),
            endpoints: vec!["192.0.2.1:41641".into()],
            challenge: proto::hex(&challenge),
            signature: String::new(),
        },
        client_id: client_id.into(),
        id_token: token.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    };
    req.request.signature =
        machine.sign_hex(&proto::federated_register_message(&challenge, &c.url().fingerprint, &req));
    c.json(hyper::Method::POST, "/api/v1/register/federated", Some(&req), None).await
}

fn refused_code(r: Result<NodeInfo, ClientError>) -> String {
    match r {
        Err(ClientError::Api { body, .. }) => body.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_workload_token_of_tailnet_a_registers_a_tagged_node_with_tailnet_b() {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let guard = Dir(control_server::state_dir("fed-tailnets"));
    let dir = guard.0.clone();
    let (a_state, b_state) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a_state).unwrap();
    std::fs::create_dir_all(&b_state).unwrap();

    // A's certificate, for the name nodes verify by pin and for the address
    // in its issuer URL (https://127.0.0.1:<port>), which B verifies.
    let ck = rcgen::generate_simple_self_signed(vec!["wiremesh-control".to_string(), "127.0.0.1".to_string()]).unwrap();
    std::fs::write(a_state.join("cert.der"), ck.cert.der()).unwrap();
    std::fs::write(a_state.join("key.der"), ck.key_pair.serialize_der()).unwrap();
    let ca = dir.join("a-cert.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();

    // A configures its identity service without naming `--identity`: the
    // test harness keeps the service on (the server's default) for that.
    let a = control_server::start_with(&a_state, &["--relay", "off", "--identity-token-lifetime", "5m"]);
    let b = control_server::start_with(
        &b_state,
        &["--relay", "off", "--identity", "off", "--federation-ca", ca.to_str().unwrap()],
    );
    let a_issuer = format!("https://127.0.0.1:{}", a.url.port);

    // B trusts A's issuer for A's nodes (their subject is node:<id>), tag:fed only.
    let out = cli(
        &b,
        &[
            "federation",
            "create",
            "--issuer",
            &a_issuer,
            "--subject",
            "node:*",
            "--tags",
            "tag:fed",
            "--output",
            "json",
        ],
    );
    let cred: CredentialInfo = serde_json::from_str(&ok(&out)).unwrap();
    let client_id = cred.credential.client_id.clone();
    assert_eq!(cred.audience, format!("{}/{client_id}", b.url.to_string().split('#').next().unwrap()));

    // A node of A, and its workload tokens from A's identity service.
    let key = ok(&cli(&a, &["keys", "create"]));
    let _alpha = agent(&a, &dir, "alpha", &["--auth-key", &key]);
    let sock = dir.join("alpha.sock");
    let fed_token = wait_for("a workload token from A's identity service", Duration::from_secs(15), || {
        let out = token(&sock, &cred.audience);
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    });
    let payload = fed_token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value =
        serde_json::from_slice(&wiremesh_daemon::identity::unb64url(payload).unwrap()).unwrap();
    assert_eq!(
        (claims["iss"].as_str(), claims["aud"].as_str()),
        (Some(a_issuer.as_str()), Some(cred.audience.as_str()))
    );
    assert!(claims["sub"].as_str().unwrap().starts_with("node:"), "{claims}");
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 300, "A's --identity-token-lifetime");
    let other = token(&sock, "https://vault.example");
    let other_token = ok(&other);

    // A token for another audience: refused by B, nothing registered.
    let code = rt.block_on(register(&Client::new(b.url.clone()), &client_id, &other_token, &["tag:fed"]));
    assert_eq!(refused_code(code), "wrong_audience");

    // B's node agent registers with A's token and joins, tagged.
    let token_file = dir.join("fed.token");
    std::fs::write(&token_file, &fed_token).unwrap();
    let _fed = agent(
        &b,
        &dir,
        "fed",
        &["--client-id", &client_id, "--id-token-file", token_file.to_str().unwrap(), "--advertise-tags", "tag:fed"],
    );
    let c = Client::new(b.url.clone());
    let admin = b.token.clone().unwrap();
    let seen = wait_for("the federated node online on B", Duration::from_secs(15), || {
        let list: Vec<NodeInfo> =
            rt.block_on(c.json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(&admin))).unwrap();
        list.iter().find(|n| n.name == "fed" && n.online).cloned().ok_or_else(|| format!("{list:?}"))
    });
    assert_eq!(seen.tags, ["tag:fed"]);

    // The same token once more: spent.
    let code = rt.block_on(register(&c, &client_id, &fed_token, &["tag:fed"]));
    assert_eq!(refused_code(code), "jti_reused");
    let list: Vec<NodeInfo> =
        rt.block_on(c.json(hyper::Method::GET, "/api/v1/admin/nodes", None::<&()>, Some(&admin))).unwrap();
    assert_eq!(list.len(), 1, "only the federated node is on B: {list:?}");

    eprintln!("tailnet to tailnet federation in {:?}", started.elapsed());
    // The processes first, then their directory.
    drop((_fed, _alpha, a, b));
    drop(guard);
}
