//! A tiny HTTP/1.1 client for ferryd's control socket: one request per
//! connection (`Connection: close`), the answer read to EOF and parsed with
//! httparse.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ErrorBody;

/// Where ferryd's control socket is unless `--socket` / `FERRY_SOCKET` say otherwise.
pub const SOCKET_DEFAULT: &str = "/var/lib/ferry/ferryd.sock";
/// Deadline for each read and write. `GET /vms` asks every idle VMM for
/// stats (2 s each at worst), so this is generous.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Cap on an answer: 256 migrations with their round logs stay far below.
pub const RESPONSE_BYTES_MAX: u64 = 64 << 20;
/// Headers an answer may carry (tiny_http sends about five).
const HEADERS_MAX: usize = 32;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// ferryd's socket could not be reached (not running, no permission).
    #[error("cannot reach ferryd at {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-call.
    #[error("lost the connection to ferryd at {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP or not the JSON expected.
    #[error("ferryd sent an invalid answer: {0}")]
    Protocol(String),
    /// ferryd refused the request.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// ferryd's sentence.
        message: String,
    },
}

/// A client of one ferryd.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client of the ferryd listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Client {
            path: socket.to_path_buf(),
        }
    }

    /// Sends one request; returns the status and body of the answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let p = self.path.display().to_string();
        let io = |source| ClientError::Io {
            path: p.clone(),
            source,
        };
        let mut sock = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: p.clone(),
            source,
        })?;
        sock.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        sock.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: ferryd\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes())
            .and_then(|()| sock.write_all(body))
            .map_err(io)?;
        let mut answer = Vec::new();
        sock.take(RESPONSE_BYTES_MAX + 1)
            .read_to_end(&mut answer)
            .map_err(io)?;
        if answer.len() as u64 > RESPONSE_BYTES_MAX {
            return Err(ClientError::Protocol(format!(
                "answer over the {RESPONSE_BYTES_MAX}-byte cap"
            )));
        }
        parse_response(&answer)
    }

    /// Sends a request with an optional JSON body; decodes a 2xx answer as
    /// `T`, turns any other into [`ClientError::Api`].
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(format!("cannot encode the request: {e}")))?;
        let (status, bytes) = self.request(method, path, body.as_deref())?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("ferryd answered HTTP {status}"));
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!("unexpected JSON from {method} {path}: {e}"))
        })
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None::<&()>)
    }
}

/// Parses a full HTTP/1.1 answer (read to EOF) into status and body.
pub fn parse_response(answer: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(answer) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Protocol(
                "the answer ended inside its headers".into(),
            ))
        }
        Err(e) => return Err(ClientError::Protocol(format!("not an HTTP answer: {e}"))),
    };
    let status = resp
        .code
        .ok_or_else(|| ClientError::Protocol("no status code".into()))?;
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if header("Transfer-Encoding").is_some_and(|v| !v.eq_ignore_ascii_case("identity")) {
        return Err(ClientError::Protocol(
            "chunked answers are not supported".into(),
        ));
    }
    let rest = &answer[head_len..];
    let body = match header("Content-Length") {
        Some(v) => {
            let len: usize = v
                .parse()
                .map_err(|_| ClientError::Protocol(format!("bad Content-Length {v:?}")))?;
            rest.get(..len).ok_or_else(|| {
                ClientError::Protocol(format!("the answer ended {} bytes short", len - rest.len()))
            })?
        }
        None => rest,
    };
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let a = b"HTTP/1.1 404 Not Found\r\nContent-Length: 15\r\n\r\n{\"error\":\"no\"}\nEXTRA";
        assert_eq!(
            parse_response(a).unwrap(),
            (404, b"{\"error\":\"no\"}\n".to_vec())
        );
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}";
        assert!(matches!(
            parse_response(short),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(
            parse_response(b"garbage\r\n\r\n"),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\n"),
            Err(ClientError::Protocol(_))
        ));
    }
}
