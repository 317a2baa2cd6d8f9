//! Asking the identity service for a workload token over the tailnet, as
//! the node agent does for `wiremesh token` (plain HTTP/1.1 on a connection
//! the caller opened: a TCP socket through the TUN device, or a netstack
//! stream in userspace mode).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use std::time::Duration;

/// The form body of a token request: `audience=…` for each, and `lifetime`.
pub fn token_form(audiences: &[String], lifetime: Option<u64>) -> String {
    let mut out = String::new();
    for a in audiences {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str("audience=");
        out.push_str(&form_encode(a));
    }
    if let Some(l) = lifetime {
        out.push_str(&format!("&lifetime={l}"));
    }
    out
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Sends `POST /token` on `io` to `host` and returns the JSON answer, or
/// the service's error (`code: error`).
pub async fn request_token<S>(io: S, host: &str, audiences: &[String], lifetime: Option<u64>) -> Result<Value, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("identity service: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::post("/token")
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("x-wiremesh-token", "1")
        .body(Full::new(Bytes::from(token_form(audiences, lifetime))))
        .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(15), async {
        let resp = send.send_request(req).await.map_err(|e| format!("identity service: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| format!("identity service: {e}"))?
            .to_bytes();
        let v: Value =
            serde_json::from_slice(&body).map_err(|_| format!("identity service: HTTP {status}, not JSON"))?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(format!(
                "identity service: {} ({}, HTTP {})",
                v["error"].as_str().unwrap_or("refused"),
                v["code"].as_str().unwrap_or("?"),
                status.as_u16()
            ))
        }
    })
    .await
    .map_err(|_| "identity service: no answer in 15 s".to_string())?;
    driver.abort();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_encode_what_the_service_decodes() {
        let auds = vec!["https://vault.example/a b".to_string(), "é&=+".to_string()];
        let body = token_form(&auds, Some(60));
        let form = crate::identity::tokens::parse_form(body.as_bytes()).unwrap();
        let req = crate::identity::tokens::token_request(&form, Default::default()).unwrap();
        assert_eq!((req.audiences, req.lifetime), (auds, 60));
    }
}
