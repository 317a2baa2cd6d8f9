//! Reading one request from a byte stream with bounded memory.

use std::io::{self, BufRead};

use zeroize::Zeroizing;

use super::error::UapiError;
use super::set::{SetOp, SetParser};

/// Bounds on what one request may make us read and keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The longest body line in bytes; a longer one is answered with `-EIO`
    /// (wireguard-go's line scanner fails the same way past 64 KiB). Real
    /// lines are under 100 bytes.
    pub max_line: usize,
    /// The longest `set=1` body in bytes, answered with `-EIO` past it. The
    /// default leaves room for [`super::MAX_PEERS`] peers with a few allowed
    /// IPs each.
    pub max_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_line: 4096, max_request: 64 << 20 }
    }
}

/// A request read from the socket.
#[derive(Debug)]
pub enum Request {
    /// `get=1`: report the configuration.
    Get,
    /// `set=1`: change the configuration with these operations, atomically.
    Set(Vec<SetOp>),
}

/// Why no request could be returned.
#[derive(Debug)]
pub enum ReadError {
    /// The first line was not `get=1` or `set=1`, or the stream ended within
    /// the request's first two lines: close the connection without answering,
    /// as wireguard-go does.
    Hangup,
    /// The request was invalid: answer `errno={error.errno()}`. If `in_sync`,
    /// the whole request was consumed and the next one may follow; if not,
    /// close the connection after answering.
    Invalid {
        /// What was wrong.
        error: UapiError,
        /// Whether the stream is at the start of the next request.
        in_sync: bool,
    },
}

/// The first line is short; anything longer is not an operation we know.
const MAX_OPERATION_LINE: usize = 16;

/// Reads one request: its first line (`get=1` or `set=1`), then for `get` the
/// empty line after it, for `set` the body up to an empty line (or the end of
/// the stream, which wireguard-go also accepts). `Ok(None)` means the stream
/// ended cleanly before a request. A `set` body is read to its end even when a
/// line is invalid, so the connection stays usable.
pub fn read_request<R: BufRead>(reader: &mut R, limits: &Limits) -> Result<Option<Request>, ReadError> {
    // Key lines pass through this buffer: wipe it when done.
    let mut line = Zeroizing::new(Vec::with_capacity(limits.max_line.min(64 << 10) + 1));
    match read_line(reader, &mut line, MAX_OPERATION_LINE) {
        Ok(LineEnd::Newline) => {}
        Ok(LineEnd::Eof) if line.is_empty() => return Ok(None),
        Ok(LineEnd::Eof) | Err(_) => return Err(ReadError::Hangup),
    }
    match line.as_slice() {
        b"get=1" => read_get_terminator(reader).map(|()| Some(Request::Get)),
        b"set=1" => read_set_body(reader, limits, &mut line).map(|ops| Some(Request::Set(ops))),
        _ => Err(ReadError::Hangup),
    }
}

fn read_get_terminator<R: BufRead>(reader: &mut R) -> Result<(), ReadError> {
    let next = loop {
        match reader.fill_buf() {
            Ok([]) => return Err(ReadError::Hangup),
            Ok(buf) => break buf[0],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(ReadError::Hangup),
        }
    };
    reader.consume(1);
    if next == b'\n' {
        Ok(())
    } else {
        Err(ReadError::Invalid { error: UapiError::TrailingGetData, in_sync: false })
    }
}

fn read_set_body<R: BufRead>(reader: &mut R, limits: &Limits, line: &mut Vec<u8>) -> Result<Vec<SetOp>, ReadError> {
    let mut parser = SetParser::new();
    let mut ops = Vec::new();
    // The first invalid line's error; later lines are read but not parsed.
    let mut first_error = None;
    let mut total = 0usize;
    let mut line_no = 0;
    loop {
        line_no += 1;
        let end = read_line(reader, line, limits.max_line).map_err(|e| {
            let error = match e {
                LineError::TooLong => UapiError::LineTooLong { line: line_no, limit: limits.max_line },
                LineError::Io(e) => UapiError::Io(e),
            };
            ReadError::Invalid { error, in_sync: false }
        })?;
        total = total.saturating_add(line.len() + 1);
        if total > limits.max_request {
            return Err(ReadError::Invalid {
                error: UapiError::RequestTooLong { limit: limits.max_request },
                in_sync: false,
            });
        }
        if line.is_empty() || line.as_slice() == b"\r" {
            break;
        }
        if first_error.is_none() {
            match parser.parse_line(&String::from_utf8_lossy(line)) {
                Ok(op) => ops.push(op),
                Err(e) => {
                    ops.clear();
                    first_error = Some(e);
                }
            }
        }
        if let LineEnd::Eof = end {
            break;
        }
    }
    match first_error {
        None => Ok(ops),
        Some(error) => Err(ReadError::Invalid { error, in_sync: true }),
    }
}

enum LineEnd {
    Newline,
    Eof,
}

enum LineError {
    TooLong,
    Io(io::Error),
}

/// Reads up to `\n` (not stored) into `line`, refusing more than `max` bytes.
fn read_line<R: BufRead>(reader: &mut R, line: &mut Vec<u8>, max: usize) -> Result<LineEnd, LineError> {
    line.clear();
    loop {
        let available = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if available.is_empty() {
            return Ok(LineEnd::Eof);
        }
        let (take, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if line.len() + take > max {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take + usize::from(found));
        if found {
            return Ok(LineEnd::Newline);
        }
    }
}
