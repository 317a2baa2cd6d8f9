//! The OIDC provider end to end through the real identity node (root only;
//! skipped elsewhere, failing in CI): a control server with the identity
//! service, a person's node (a key of user alice) whose "browser" (curl)
//! signs in, and a relying party on another node that exchanges the code
//! with its secret and checks the ID token with an independent JOSE library
//! from the JWKS it fetched over the tailnet. A tagged node cannot sign in,
//! and a host off the tailnet reaches nothing.

#[path = "../../testsupport/netns.rs"]
mod netns;
#[path = "support/tailnet.rs"]
mod tailnet;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
use netns::Netns;
use serde_json::Value;
use std::time::Duration;
use tailnet::*;

const REDIRECT: &str = "https://rp.example/callback";

/// curl(1) in `ns`: (HTTP status, headers and body); status 0 when no answer came.
fn curl(ns: &Netns, args: &[&str]) -> (u16, String) {
    let mut full = vec!["curl", "-sS", "-m", "10", "-D", "-", "-o", "-", "-w", "\n%{http_code}"];
    full.extend_from_slice(args);
    let out = ns.exec(&full);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or(response, |(_, b)| b)
}

fn location(response: &str) -> String {
    response
        .lines()
        .find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: ")))
        .unwrap_or("")
        .trim()
        .to_string()
}

fn query_param(url: &str, name: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    let f = wiremesh_daemon::identity::provider::form::Form::parse(q.as_bytes()).ok()?;
    f.get(name).map(str::to_string)
}

fn hidden_fields(html: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in html.split("<input type=\"hidden\" name=\"").skip(1) {
        let Some((name, rest)) = part.split_once('"') else { continue };
        let Some(value) = rest.split_once("value=\"").and_then(|(_, v)| v.split_once('"')).map(|(v, _)| v) else {
            continue;
        };
        let value = value.replace("&quot;", "\"").replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">");
        out.push((name.to_string(), value.replace("&amp;", "&")));
    }
    out
}

fn identity_url(n: &Node) -> Option<String> {
    let s = n.status();
    let id = s["peers"].as_array()?.iter().find(|p| p["node"]["name"] == "identity")?.clone();
    Some(format!("http://{}", id["node"]["ipv4"].as_str()?))
}

fn key_for(lab: &Lab, args: &[&str]) -> String {
    let mut full = vec!["keys", "create"];
    full.extend_from_slice(args);
    let out = lab.admin(&full);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn identity_provider_sign_in_over_the_tailnet() {
    if !netns::require_or_skip("identity_provider_sign_in_over_the_tailnet") {
        return;
    }
    let mut lab = Lab::with_identity();
    let out = lab.admin(&["users", "create", "alice@example.com", "--display-name", "Alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let alice_key = key_for(&lab, &["--user", "alice@example.com"]);
    let tagged_key = key_for(&lab, &["--reusable", "--tags", "tag:rp"]);
    let laptop = lab.spawn_node("laptop", &alice_key);
    let rp = lab.spawn_node("rp", &tagged_key);
    let all = [&laptop, &rp];
    for n in all {
        wait_until(Duration::from_secs(30), "maps with the identity node", || peer_count(n) == 2, || logs(&all));
    }
    let url = identity_url(&laptop).expect("the identity node in the laptop's map");
    wait_until(
        Duration::from_secs(20),
        "the identity service answering",
        || curl(&rp.ns, &[&format!("{url}/.well-known/openid-configuration")]).0 == 200,
        || logs(&all),
    );
    let (_, discovery) = curl(&rp.ns, &[&format!("{url}/.well-known/openid-configuration")]);
    let discovery: Value = serde_json::from_str(body_of(&discovery)).unwrap();
    assert_eq!(discovery["authorization_endpoint"], format!("{url}/oidc/authorize"), "{discovery}");
    assert_eq!(discovery["token_endpoint"], format!("{url}/oidc/token"));
    let issuer = discovery["issuer"].as_str().unwrap().to_string();

    // The administrator registers the relying party.
    let out = lab.admin(&["idp", "clients", "create", "--redirect-uri", REDIRECT, "--name", "RP", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let client_id = created["client"]["client_id"].as_str().unwrap().to_string();
    let secret = created["client_secret"].as_str().unwrap().to_string();

    // The person's browser on the laptop: the authorization request, the
    // confirmation page, Allow.
    let verifier = "a-verifier-of-at-least-forty-three-characters-0123456789";
    let challenge =
        wiremesh_daemon::identity::b64url(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
    let authorize = format!(
        "{url}/oidc/authorize?{}",
        wiremesh_daemon::identity::provider::form::encode([
            ("response_type", "code"),
            ("client_id", client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", "openid email"),
            ("state", "s1"),
            ("nonce", "n1"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
    );
    let (code, page) = curl(&laptop.ns, &[&authorize]);
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("alice@example.com") && page.contains("laptop"), "{page}");
    let mut form = vec![];
    for (k, v) in hidden_fields(body_of(&page)) {
        form.push(format!("{k}={}", wiremesh_daemon::identity::provider::form::escape(&v)));
    }
    form.push("decision=allow".into());
    let data = form.join("&");
    let (status, answer) = curl(&laptop.ns, &["--data", &data, &format!("{url}/oidc/authorize")]);
    assert_eq!(status, 303, "{answer}");
    let redirect = location(&answer);
    assert!(redirect.starts_with(REDIRECT), "{redirect}");
    assert_eq!(query_param(&redirect, "state").as_deref(), Some("s1"));
    let the_code = query_param(&redirect, "code").expect("a code");

    // The relying party, on its own node, exchanges the code with its secret.
    let (status, answer) = curl(
        &rp.ns,
        &[
            "-u",
            &format!("{client_id}:{secret}"),
            "--data-urlencode",
            "grant_type=authorization_code",
            "--data-urlencode",
            &format!("code={the_code}"),
            "--data-urlencode",
            &format!("redirect_uri={REDIRECT}"),
            "--data-urlencode",
            &format!("code_verifier={verifier}"),
            &format!("{url}/oidc/token"),
        ],
    );
    assert_eq!(status, 200, "{answer}");
    let tokens: Value = serde_json::from_str(body_of(&answer)).unwrap();
    let id_token = tokens["id_token"].as_str().unwrap();
    let (_, jwks) = curl(&rp.ns, &[&format!("{url}/.well-known/jwks.json")]);
    let jwks: JwkSet = serde_json::from_str(body_of(&jwks)).unwrap();
    let header = decode_header(id_token).unwrap();
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("the ID token's key in the JWKS");
    let mut v = Validation::new(header.alg);
    v.set_audience(&[&client_id]);
    v.set_issuer(&[&issuer]);
    let claims = decode::<Value>(id_token, &DecodingKey::from_jwk(jwk).unwrap(), &v).unwrap().claims;
    assert_eq!((claims["email"].as_str(), claims["nonce"].as_str()), (Some("alice@example.com"), Some("n1")));
    assert_eq!(claims["name"], "Alice");
    // Userinfo from the relying party's node with the access token.
    let access = tokens["access_token"].as_str().unwrap();
    let (status, info) =
        curl(&rp.ns, &["-H", &format!("Authorization: Bearer {access}"), &format!("{url}/oidc/userinfo")]);
    assert_eq!(status, 200, "{info}");
    assert_eq!(serde_json::from_str::<Value>(body_of(&info)).unwrap()["sub"], claims["sub"]);

    // Figures (printed for docs/identity.md): the confirmation page and
    // refresh rotations over the tailnet, as curl on the nodes sees them.
    let mut page_ms = vec![];
    for _ in 0..20 {
        let out = laptop.ns.exec(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", &authorize]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let t: f64 = text.strip_prefix("200 ").expect("the page").trim().parse().unwrap();
        page_ms.push(t * 1000.0);
    }
    let mut refresh = tokens["refresh_token"].as_str().unwrap().to_string();
    let mut refresh_ms = vec![];
    for _ in 0..20 {
        let (basic, grant) = (format!("{client_id}:{secret}"), format!("refresh_token={refresh}"));
        let endpoint = format!("{url}/oidc/token");
        let out = rp.ns.exec(&[
            "curl",
            "-s",
            "-m",
            "10",
            "-u",
            &basic,
            "--data-urlencode",
            "grant_type=refresh_token",
            "--data-urlencode",
            &grant,
            "-w",
            "\n%{http_code} %{time_total}",
            &endpoint,
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, tail) = text.rsplit_once('\n').unwrap();
        let t: f64 = tail.strip_prefix("200 ").unwrap_or_else(|| panic!("{text}")).trim().parse().unwrap();
        refresh_ms.push(t * 1000.0);
        let t: Value = serde_json::from_str(body).unwrap();
        refresh = t["refresh_token"].as_str().unwrap().to_string();
    }
    for (what, v) in
        [("confirmation page (curl time_total)", &mut page_ms), ("refresh rotation (curl time_total)", &mut refresh_ms)]
    {
        v.sort_by(|a, b| a.total_cmp(b));
        eprintln!("{what} over the tailnet: median {:.2} ms, max {:.2} ms (20 requests)", v[10], v[19]);
    }

    // The tagged node cannot sign in as a person: the error goes back to the client.
    let (status, answer) = curl(&rp.ns, &[&authorize]);
    assert_eq!(status, 303, "{answer}");
    assert_eq!(query_param(&location(&answer), "error").as_deref(), Some("access_denied"));
    // A host off the tailnet reaches nothing.
    let (status, _) = curl(&lab.server_ns, &["-m", "4", &authorize]);
    assert_eq!(status, 0, "a host off the tailnet reached the provider");
}
