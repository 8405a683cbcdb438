//! A small HTTP/1.1 client over a raw socket: it sends exactly the bytes a test means
//! (truncated bodies, lying Content-Length, chunks that never end), which a full client would
//! refuse to, and reads one response.

#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Response {
    /// The header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("the answer is not JSON ({err}): {}", self.body))
    }
}

/// The head of a `POST` of `body_len` bytes (chunked when `None`) to `path` with `headers`
/// (JSON unless they say otherwise).
pub fn post_head(path: &str, headers: &[(&str, &str)], body_len: Option<usize>) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: receiver\r\n");
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match body_len {
        Some(len) => head.push_str(&format!("Content-Length: {len}\r\n")),
        None => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("Connection: close\r\n\r\n");
    head.into_bytes()
}

/// Sends `POST path` with `headers` and `body`, and reads the response.
pub async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut request = post_head(path, headers, Some(body.len()));
    request.extend_from_slice(body);
    exchange(addr, &request, false).await.expect("a response")
}

/// Sends `request` as it is (then closes the sending side if `half_close`), and reads the
/// response; `None` if nothing listens or the server closed the connection without one.
pub async fn exchange(addr: SocketAddr, request: &[u8], half_close: bool) -> Option<Response> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    // The server may answer and close before it read everything (413): a failed write is fine.
    let _ = stream.write_all(request).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    read_response(&mut stream).await
}

/// Reads one response from `stream` (to the end of the connection).
pub async fn read_response(stream: &mut TcpStream) -> Option<Response> {
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    parse(&raw)
}

/// Parses a whole response (`Content-Length` framed or read to the end).
pub fn parse(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = &raw[end + 4..];
    let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok());
    let body = &body[..length.unwrap_or(body.len()).min(body.len())];
    Some(Response { status, headers, body: String::from_utf8_lossy(body).into_owned() })
}

/// A kept-alive connection sending one request at a time (for the benchmark).
pub struct Connection {
    stream: tokio::io::BufReader<TcpStream>,
    head: Vec<u8>,
}

impl Connection {
    /// Connects to `addr`.
    pub async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self { stream: tokio::io::BufReader::new(stream), head: Vec::new() })
    }

    /// Sends `request` (which must not ask to close the connection) and returns the response's
    /// status once its body was read.
    pub async fn send(&mut self, request: &[u8]) -> std::io::Result<u16> {
        use tokio::io::AsyncBufReadExt;
        self.stream.get_mut().write_all(request).await?;
        self.head.clear();
        while !self.head.ends_with(b"\r\n\r\n") {
            if self.stream.read_until(b'\n', &mut self.head).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "a malformed response");
        let head = std::str::from_utf8(&self.head).map_err(|_| invalid())?;
        let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).ok_or_else(invalid)?;
        let length: u64 = head
            .lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, value)| value.trim().parse().ok())
            .ok_or_else(invalid)?;
        tokio::io::copy(&mut (&mut self.stream).take(length), &mut tokio::io::sink()).await?;
        Ok(status)
    }
}
