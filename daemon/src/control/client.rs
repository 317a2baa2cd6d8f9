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

/// A client for one control server.
#[derive(Clone)]
pub struct Client {
    url: ControlUrl,
    tls: tokio_rustls::TlsConnector,
}

impl Client {
    /// A client for `url`.
    pub fn new(url: ControlUrl) -> Self {
        let tls = tokio_rustls::TlsConnector::from(tls::pinned_client(url.fingerprint));
        Client { url, tls }
    }

    /// The server's URL.
    pub fn url(&self) -> &ControlUrl {
        &self.url
    }

    /// Sends one request and returns the response with its body unread.
    pub async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
        bearer: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let connect = async {
            let tcp =
                tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port)).await.map_err(transport)?;
            let _ = tcp.set_nodelay(true);
            self.tls.connect(tls::server_name(), tcp).await.map_err(transport)
        };
        let stream =
            tokio::time::timeout(CONNECT_TIMEOUT, connect).await.map_err(|_| transport("connect timed out"))??;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(transport)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = if self.url.host.contains(':') { format!("[{}]", self.url.host) } else { self.url.host.clone() };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{host}:{}", self.url.port))
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
        req.signature = sign(&proto::logout_message(&challenge, &self.url.fingerprint, &req));
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
}
