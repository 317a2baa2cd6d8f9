//! A relay client: connects over TLS to a pinned certificate, proves its
//! node key, then sends frames to node keys and receives frames from them.

use super::wire::{Auth, FrameHeader, Hello, WireError};
use super::{AUTH_ACCEPTED, FRAME_HEADER_LEN, FRAME_RECV, HELLO_LEN, MAX_PAYLOAD};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use wiremesh_core::keys::{PrivateKey, PublicKey};

/// Why talking to the relay failed.
#[derive(Debug)]
pub enum RelayError {
    /// The connection or TLS failed.
    Io(std::io::Error),
    /// The relay spoke something other than the relay protocol.
    Protocol(&'static str),
    /// The relay refused our key proof (it closed the connection).
    Refused,
    /// A payload over [`MAX_PAYLOAD`] bytes, or empty.
    BadLength(usize),
    /// The relay sent a frame header it never sends (another type, an empty
    /// or oversized payload).
    Frame(WireError),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::Io(e) => write!(f, "relay connection: {e}"),
            RelayError::Protocol(what) => write!(f, "relay protocol: {what}"),
            RelayError::Refused => f.write_str("the relay refused the node key proof"),
            RelayError::BadLength(n) => write!(f, "relay payload of {n} bytes (1 to {MAX_PAYLOAD} allowed)"),
            RelayError::Frame(e) => write!(f, "bad frame from the relay: {e}"),
        }
    }
}

impl std::error::Error for RelayError {}

impl From<std::io::Error> for RelayError {
    fn from(e: std::io::Error) -> Self {
        RelayError::Io(e)
    }
}

/// Bytes of frames gathered before they go to TLS: every write to the TLS
/// stream becomes at least one record (its own AEAD pass and 22 bytes), so
/// frames written one by one cost two records each; gathered, a batch costs
/// one record per 16 KiB.
pub(crate) const WRITE_BUFFER: usize = 16 * 1024;

/// The sending half of a relay connection.
pub struct RelaySender {
    wr: BufWriter<WriteHalf<TlsStream<TcpStream>>>,
}

/// The receiving half of a relay connection.
pub struct RelayReceiver {
    rd: ReadHalf<TlsStream<TcpStream>>,
}

/// Connects to the relay at `addr` whose certificate has SHA-256
/// `fingerprint`, and proves that this node holds `key`.
pub async fn connect(
    addr: SocketAddr,
    fingerprint: [u8; 32],
    key: &PrivateKey,
) -> Result<(RelaySender, RelayReceiver), RelayError> {
    connect_claiming(addr, fingerprint, key, key.public_key()).await
}

/// Like [`connect`] but claiming `claimed` as the node key while proving with
/// `key`: what an impostor does. Public for the tests that show it fails.
pub async fn connect_claiming(
    addr: SocketAddr,
    fingerprint: [u8; 32],
    key: &PrivateKey,
    claimed: PublicKey,
) -> Result<(RelaySender, RelayReceiver), RelayError> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| RelayError::Protocol("connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(crate::control::tls::pinned_client(fingerprint));
    let mut tls = connector.connect(crate::control::tls::server_name(), tcp).await?;
    let mut hello = [0u8; HELLO_LEN];
    tls.read_exact(&mut hello).await?;
    let hello = Hello::parse(&hello).map_err(|_| RelayError::Protocol("bad hello"))?;
    let proof = wiremesh_core::disco::relay_proof(key, &PublicKey(hello.relay_key), &claimed, &hello.nonce)
        .map_err(|_| RelayError::Protocol("unusable relay key"))?;
    tls.write_all(&Auth { key: claimed.0, proof }.encode()).await?;
    tls.flush().await?;
    let mut ok = [0u8; 1];
    match tls.read_exact(&mut ok).await {
        Ok(_) if ok[0] == AUTH_ACCEPTED => {}
        Ok(_) => return Err(RelayError::Protocol("bad handshake status")),
        Err(_) => return Err(RelayError::Refused),
    }
    let (rd, wr) = tokio::io::split(tls);
    Ok((RelaySender { wr: BufWriter::with_capacity(WRITE_BUFFER, wr) }, RelayReceiver { rd }))
}

impl RelaySender {
    /// Sends `payload` to the node with key `to` and flushes.
    pub async fn send(&mut self, to: &PublicKey, payload: &[u8]) -> Result<(), RelayError> {
        self.queue(to, payload).await?;
        self.flush().await
    }

    /// Writes a frame without flushing (batch several, then [`RelaySender::flush`]).
    pub async fn queue(&mut self, to: &PublicKey, payload: &[u8]) -> Result<(), RelayError> {
        let header = FrameHeader::send(to.0, payload.len()).map_err(|_| RelayError::BadLength(payload.len()))?;
        self.wr.write_all(&header.encode()).await?;
        self.wr.write_all(payload).await?;
        Ok(())
    }

    /// Flushes queued frames.
    pub async fn flush(&mut self) -> Result<(), RelayError> {
        Ok(self.wr.flush().await?)
    }

    /// Writes raw bytes (for tests of the relay's refusal of bad frames).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        self.wr.write_all(bytes).await?;
        Ok(self.wr.flush().await?)
    }
}

impl RelayReceiver {
    /// Receives the next frame into `buf` (at least [`MAX_PAYLOAD`] bytes):
    /// the sender's key and the payload length (1 or more: an empty frame,
    /// like any header the relay would not send, is a protocol error).
    /// `Ok(None)` when the relay closed the connection.
    pub async fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(PublicKey, usize)>, RelayError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        match self.rd.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let frame = FrameHeader::parse(&header, FRAME_RECV).map_err(RelayError::Frame)?;
        let len = frame.payload_len();
        if len > buf.len() {
            return Err(RelayError::Protocol("frame longer than the receive buffer"));
        }
        self.rd.read_exact(&mut buf[..len]).await?;
        Ok(Some((PublicKey(frame.key()), len)))
    }
}
