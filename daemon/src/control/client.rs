//! An HTTPS client for the control API, trusting only the pinned server
//! certificate. One connection per request keeps it simple; the map stream is
//! one long request.

use super::proto::{self, ErrorBody};
use super::tls;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::str::FromStr;
use std::time::Duration;

/// How long connecting and the TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an ordinary (not streaming) request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `https://host:port#sha256=<hex>`: where the server is and which certificate it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// SHA-256 of the server's DER certificate.
    pub fingerprint: [u8; 32],
}

impl FromStr for ControlUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("https://").ok_or("the control URL must start with https://")?;
        let (authority, fragment) =
            rest.split_once('#').ok_or("the control URL needs the certificate pin: https://host:port#sha256=<hex>")?;
        let authority = authority.trim_end_matches('/');
        let hex = fragment.strip_prefix("sha256=").ok_or("the pin must be #sha256=<64 hex digits>")?;
        let fingerprint = proto::unhex::<32>(hex).ok_or("the pin must be #sha256=<64 hex digits>")?;
        let (host, port) = authority.rsplit_once(':').ok_or("the control URL needs a port")?;
        let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err("the control URL needs a host".into());
        }
        Ok(ControlUrl { host, port, fingerprint })
    }
}

impl std::fmt::Display for ControlUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}#sha256={}", self.host, self.port, proto::hex(&self.fingerprint))
        } else {
            write!(f, "https://{}:{}#sha256={}", self.host, self.port, proto::hex(&self.fingerprint))
        }
    }
}

/// Why a request failed.
#[derive(Debug)]
pub enum ClientError {
    /// The server could not be reached or the connection broke (retry later).
    Transport(String),
    /// The server answered with an error status.
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Transport(e) => write!(f, "cannot reach the control server: {e}"),
            ClientError::Api { status, body } => write!(f, "{} ({}, HTTP {status})", body.error, body.code),
        }
    }
}

impl std::error::Error for ClientError {}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// Parses `--control` values, each one URL or a comma-separated list: the
/// replicas of one control server, so all must pin the same certificate.
pub fn parse_replicas<S: AsRef<str>>(values: &[S]) -> Result<Vec<ControlUrl>, String> {
    let mut urls: Vec<ControlUrl> = Vec::new();
    for item in values.iter().flat_map(|v| v.as_ref().split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        let url: ControlUrl = item.parse()?;
        if urls.first().is_some_and(|first| first.fingerprint != url.fingerprint) {
            return Err("replicas of one control server share its certificate: every URL needs the same pin".into());
        }
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    if urls.is_empty() {
        return Err("no control URL given".into());
    }
    Ok(urls)
}

/// A client for one control server, possibly reached through several
/// replicas (same certificate): requests go to the active one; when it
/// cannot be reached the others are tried in order, and the first that
/// answers becomes the active one.
#[derive(Clone)]
pub struct Client {
    urls: std::sync::Arc<[ControlUrl]>,
    active: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tls: tokio_rustls::TlsConnector,
}

impl Client {
    /// A client for `url`.
    pub fn new(url: ControlUrl) -> Self {
        Self::with_replicas(url, Vec::new())
    }

    /// A client for `first`, falling back to `others` (replicas sharing
    /// `first`'s certificate; only its pin is trusted).
    pub fn with_replicas(first: ControlUrl, others: Vec<ControlUrl>) -> Self {
        let tls = tokio_rustls::TlsConnector::from(tls::pinned_client(first.fingerprint));
        let urls: Vec<ControlUrl> = std::iter::once(first).chain(others).collect();
        Client { urls: urls.into(), active: Default::default(), tls }
    }

    /// The URL of the server in use (the active replica).
    pub fn url(&self) -> &ControlUrl {
        &self.urls[self.active.load(std::sync::atomic::Ordering::Relaxed) % self.urls.len()]
    }

    /// Makes the next replica the active one (the map stream from this one
    /// broke); with one URL it stays.
    pub fn next_replica(&self) {
        let n = self.urls.len();
        let _ =
            self.active.fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |i| {
                Some((i + 1) % n)
            });
    }

    /// A TLS connection to the active replica, else to the first of the
    /// others (in order) that answers, which becomes the active one.
    async fn connect(
        &self,
    ) -> Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, &ControlUrl), ClientError> {
        let start = self.active.load(std::sync::atomic::Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..self.urls.len() {
            let idx = (start + i) % self.urls.len();
            let url = &self.urls[idx];
            let connect = async {
                let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await.map_err(transport)?;
                let _ = tcp.set_nodelay(true);
                self.tls.connect(tls::server_name(), tcp).await.map_err(transport)
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(stream)) => {
                    self.active.store(idx, std::sync::atomic::Ordering::Relaxed);
                    return Ok((stream, url));
                }
                Ok(Err(ClientError::Transport(e))) => failures.push(e),
                Ok(Err(e)) => return Err(e),
                Err(_) => failures.push("connect timed out".into()),
            }
        }
        if self.urls.len() == 1 {
            return Err(transport(failures.remove(0)));
        }
        let all: Vec<String> =
            self.urls.iter().zip(&failures).map(|(u, e)| format!("{}:{}: {e}", u.host, u.port)).collect();
        Err(transport(format!("no replica answers ({})", all.join("; "))))
    }

    /// Sends one request and returns the response with its body unread.
    pub async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
        bearer: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let (stream, url) = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(transport)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{host}:{}", url.port))
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(token) = bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(transport)?;
        sender.send_request(req).await.map_err(transport)
    }

    /// Sends `body` (raw bytes) and returns the status and the whole answer.
    pub async fn raw(
        &self,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
        bearer: Option<&str>,
    ) -> Result<(u16, Bytes), ClientError> {
        let fut = async {
            let resp = self.send(method, path, body, bearer).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map_err(transport)?.to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut).await.map_err(|_| transport("request timed out"))?
    }

    /// Sends `body` as JSON and decodes a JSON answer, or the error body.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&impl Serialize>,
        bearer: Option<&str>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(transport)?,
            None => Vec::new(),
        };
        let (status, answer) = self.raw(method, path, bytes, bearer).await?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &answer));
        }
        serde_json::from_slice(&answer).map_err(|e| transport(format!("bad answer from the server: {e}")))
    }

    /// `POST /logout`: asks the server to remove this machine's node. `sign`
    /// makes the machine key's signature (hex) of the bytes it is given.
    pub async fn logout(
        &self,
        machine_key: String,
        node_key: String,
        sign: impl FnOnce(&[u8]) -> String,
    ) -> Result<serde_json::Value, ClientError> {
        let challenge = self.challenge().await?;
        let mut req =
            proto::LogoutRequest { machine_key, node_key, challenge: proto::hex(&challenge), signature: String::new() };
        req.signature = sign(&proto::logout_message(&challenge, &self.url().fingerprint, &req));
        self.json(hyper::Method::POST, &format!("{}/logout", proto::API), Some(&req), None).await
    }

    /// A fresh challenge for the machine key to sign.
    pub async fn challenge(&self) -> Result<[u8; 32], ClientError> {
        let c: proto::Challenge =
            self.json(hyper::Method::POST, &format!("{}/challenge", proto::API), None::<&()>, None).await?;
        proto::unhex::<32>(&c.challenge).ok_or_else(|| transport("bad challenge from the server"))
    }
}

/// The error of a non-2xx answer.
pub fn api_error(status: u16, body: &[u8]) -> ClientError {
    let body = serde_json::from_slice::<ErrorBody>(body).unwrap_or_else(|_| ErrorBody {
        code: "unknown".into(),
        error: String::from_utf8_lossy(body).chars().take(200).collect(),
    });
    ClientError::Api { status, body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls_parse_with_pins() {
        let pin = "ab".repeat(32);
        let u: ControlUrl = format!("https://10.0.0.1:8443#sha256={pin}").parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.fingerprint), ("10.0.0.1", 8443, [0xab; 32]));
        assert_eq!(u.to_string().parse::<ControlUrl>().unwrap(), u);
        let v: ControlUrl = format!("https://[fd00::1]:443/#sha256={pin}").parse().unwrap();
        assert_eq!(v.host, "fd00::1");
        assert_eq!(v.to_string().parse::<ControlUrl>().unwrap(), v);
        assert!("http://a:1#sha256=00".parse::<ControlUrl>().is_err());
        assert!("https://a:1".parse::<ControlUrl>().is_err());
        assert!(format!("https://a#sha256={pin}").parse::<ControlUrl>().is_err());
        assert!("https://a:1#sha256=abc".parse::<ControlUrl>().is_err());
    }

    #[test]
    fn replica_lists_parse_in_order_with_one_pin() {
        let (pin, other) = ("ab".repeat(32), "cd".repeat(32));
        let urls = parse_replicas(&[
            format!("https://10.0.0.1:8443#sha256={pin}, https://10.0.0.2:8443#sha256={pin}"),
            format!("https://10.0.0.3:8443#sha256={pin}"),
            format!("https://10.0.0.1:8443#sha256={pin}"),
        ])
        .unwrap();
        let hosts: Vec<&str> = urls.iter().map(|u| u.host.as_str()).collect();
        assert_eq!(hosts, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let mixed = [format!("https://a:1#sha256={pin},https://b:1#sha256={other}")];
        assert!(parse_replicas(&mixed).unwrap_err().contains("same pin"));
        assert!(parse_replicas(&[",", ""]).is_err());
        assert!(parse_replicas(&["https://a:1"]).is_err());
        let c = Client::with_replicas(urls[0].clone(), urls[1..].to_vec());
        assert_eq!(c.url().host, "10.0.0.1");
        c.next_replica();
        c.next_replica();
        assert_eq!(c.url().host, "10.0.0.3");
        c.next_replica();
        assert_eq!(c.url().host, "10.0.0.1");
        let single = Client::new(urls[1].clone());
        single.next_replica();
        assert_eq!(single.url().host, "10.0.0.2");
    }
}
