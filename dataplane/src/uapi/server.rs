//! A small blocking server for the configuration socket.

use std::fmt::Write as _;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use zeroize::Zeroizing;

use super::config::DeviceConfig;
use super::error::{errno, UapiError};
use super::reader::{read_request, Limits, ReadError, Request};

/// Where wg(8) looks for userspace implementations' sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// The socket path for interface `ifname`: `/var/run/wireguard/<ifname>.sock`.
/// Refuses names that are not valid interface names (empty, longer than 15
/// bytes, or containing `/`, whitespace or NUL), so the path stays inside
/// [`SOCKET_DIR`].
pub fn socket_path(ifname: &str) -> io::Result<PathBuf> {
    let valid = !ifname.is_empty()
        && ifname.len() < libc::IFNAMSIZ
        && ifname != "."
        && ifname != ".."
        && !ifname.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace() || b == b':');
    if !valid {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid interface name {ifname:?}")));
    }
    Ok(Path::new(SOCKET_DIR).join(format!("{ifname}.sock")))
}

/// The bytes answering one request: `key=value` lines for `get`, then
/// `errno=N` and an empty line. Wiped on drop (a `get` answer holds the
/// private key).
pub struct Response {
    text: Zeroizing<String>,
}

impl Response {
    /// The answer to `get=1` for `config`.
    pub fn get(config: &DeviceConfig) -> Self {
        // Reserve up front so growing never leaves key bytes behind in freed
        // memory.
        let ips: usize = config.peers.iter().map(|p| p.allowed_ips.len()).sum();
        let mut text = Zeroizing::new(String::with_capacity(256 + config.peers.len() * 448 + ips * 56));
        config.write_get(&mut text);
        text.push_str("errno=0\n\n");
        Response { text }
    }

    /// The answer to `set=1`: `errno=0`, or the error's errno.
    pub fn set(result: Result<(), UapiError>) -> Self {
        match result {
            Ok(()) => Response::errno(errno::OK),
            Err(e) => Response::error(&e),
        }
    }

    /// The answer for a failed request.
    pub fn error(error: &UapiError) -> Self {
        Response::errno(error.errno())
    }

    /// `errno=n` and an empty line, nothing else.
    pub fn errno(n: i64) -> Self {
        let mut text = Zeroizing::new(String::with_capacity(16));
        let _ = write!(text, "errno={n}\n\n");
        Response { text }
    }

    /// The bytes to write to the client.
    pub fn as_bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Response(<redacted>)")
    }
}

/// Answers `request` from and onto `config`: the whole protocol for a driver
/// that keeps its configuration in a [`DeviceConfig`].
pub fn respond(config: &mut DeviceConfig, request: Request) -> Response {
    match request {
        Request::Get => Response::get(config),
        Request::Set(ops) => Response::set(config.apply(&ops)),
    }
}

/// Serves one client connection: reads requests and writes the handler's
/// answers until the client hangs up or sends something that is not a
/// request (which, as in wireguard-go, closes the connection).
pub fn handle_connection<S: Read + Write>(
    stream: S,
    limits: &Limits,
    mut handler: impl FnMut(Request) -> Response,
) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        match read_request(&mut reader, limits) {
            Ok(None) | Err(ReadError::Hangup) => return Ok(()),
            Ok(Some(request)) => {
                let response = handler(request);
                reader.get_mut().write_all(response.as_bytes())?;
            }
            Err(ReadError::Invalid { error, in_sync }) => {
                reader.get_mut().write_all(Response::error(&error).as_bytes())?;
                if !in_sync {
                    return Ok(());
                }
            }
        }
    }
}

/// Accepts connections on `listener` forever, serving each on its own
/// thread; calls to `handler` are serialized (as wireguard-go's IPC mutex
/// does). Returns only when accepting fails.
pub fn serve_uapi<H>(listener: UnixListener, limits: Limits, handler: H) -> io::Result<()>
where
    H: FnMut(Request) -> Response + Send + 'static,
{
    let handler = Arc::new(Mutex::new(handler));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
            Err(e) => return Err(e),
        };
        let handler = Arc::clone(&handler);
        std::thread::Builder::new().name("uapi-conn".into()).spawn(move || {
            // A client that vanishes mid-answer is not our error.
            let _ = handle_connection(stream, &limits, |request| {
                let mut handler = handler.lock().unwrap_or_else(PoisonError::into_inner);
                handler(request)
            });
        })?;
    }
}

/// A listening configuration socket that is removed when dropped.
#[derive(Debug)]
pub struct UapiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl UapiSocket {
    /// Listens on `/var/run/wireguard/<ifname>.sock` (see [`UapiSocket::bind_path`]).
    pub fn bind(ifname: &str) -> io::Result<Self> {
        UapiSocket::bind_path(socket_path(ifname)?)
    }

    /// Listens on `path`, creating its directory (mode 0755) if needed and
    /// making the socket 0600. A stale socket file that nobody answers on is
    /// replaced; one that is in use is an `AddrInUse` error, as in
    /// wireguard-go.
    pub fn bind_path(path: PathBuf) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
        }
        let listener = match UnixListener::bind(&path) {
            Ok(listener) => listener,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by another process", path.display()),
                    ));
                }
                std::fs::remove_file(&path)?;
                UnixListener::bind(&path)?
            }
            Err(e) => return Err(e),
        };
        // Only root may configure the interface. (wireguard-go sets a umask
        // around bind instead; that is process-wide, so we chmod right after.)
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(UapiSocket { listener, path })
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Another handle to the listening socket, for [`serve_uapi`] on a
    /// thread while this value keeps ownership of the path.
    pub fn try_clone_listener(&self) -> io::Result<UnixListener> {
        self.listener.try_clone()
    }

    /// Where the socket lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
