//! What the edge proxy's tests run against: a real redis-server, real upstream HTTP and
//! WebSocket servers on loopback, and the proxy itself, all started per test.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stagely_api::route::{ROUTE_CHANNEL, Route, RouteStatus, route_key};
use stagely_edge_proxy::{Config, Listeners};
use stagely_testenv::server::Server;
#[allow(unused_imports)] // not every test binary polls
pub use stagely_testenv::server::eventually;
use tokio::net::{TcpListener, TcpStream};

pub const DOMAIN: &str = "preview.test";

/// A real redis-server (from testenv), with the route writes the operator makes.
pub struct Redis(Server);

impl Redis {
    pub async fn start() -> Self {
        Self(Server::redis().expect("redis-server is installed (scripts/install-deps.sh installs it)"))
    }

    /// One on `port`, where an earlier one was (a Redis restart).
    pub async fn start_on(port: u16) -> Self {
        Self(Server::redis_on(port).expect("redis-server starts"))
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    /// Writes the route of `hash` and publishes the change, as the operator does.
    pub async fn put_route(&self, hash: &str, route: &Route) {
        let mut conn = self.conn().await;
        let json = serde_json::to_string(route).unwrap();
        let _: () = redis::cmd("SET").arg(route_key(hash)).arg(json).query_async(&mut conn).await.unwrap();
        let _: i64 = redis::cmd("PUBLISH").arg(ROUTE_CHANNEL).arg(hash).query_async(&mut conn).await.unwrap();
    }

    pub async fn delete_route(&self, hash: &str) {
        let mut conn = self.conn().await;
        let _: i64 = redis::cmd("DEL").arg(route_key(hash)).query_async(&mut conn).await.unwrap();
        let _: i64 = redis::cmd("PUBLISH").arg(ROUTE_CHANNEL).arg(hash).query_async(&mut conn).await.unwrap();
    }

    /// Number of GET commands Redis has served.
    pub async fn get_calls(&self) -> u64 {
        let mut conn = self.conn().await;
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
        info.lines()
            .find_map(|line| line.strip_prefix("cmdstat_get:calls="))
            .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
            .unwrap_or(0)
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    pub fn stop(&mut self) {
        self.0.stop();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn route(status: RouteStatus, backend: Option<SocketAddr>) -> Route {
    Route {
        status,
        ip: backend.map(|addr| addr.ip().to_string()),
        port: backend.map(|addr| addr.port()),
        project: "shop".into(),
        namespace: "team-a".into(),
        environment: "shop-pr-42".into(),
        pr: 42,
    }
}

/// An upstream app: answers every request with a JSON echo of what it received, tagged with
/// its name; `/bytes/N` streams N bytes; `/count` counts the request body's bytes;
/// `/hold` answers only once the test says so; `/status/N` answers status N with no body.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Connections open now.
    pub open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Requests received so far.
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The paths of the requests received so far.
    pub paths: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &'static str) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (conn_count, open_count, req_count, seen) =
            (connections.clone(), open.clone(), requests.clone(), paths.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                conn_count.fetch_add(1, SeqCst);
                open_count.fetch_add(1, SeqCst);
                let (open_count, req_count, seen) = (open_count.clone(), req_count.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        req_count.fetch_add(1, SeqCst);
                        seen.lock().unwrap().push(req.uri().path().to_owned());
                        upstream_answer(name, req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    open_count.fetch_sub(1, SeqCst);
                });
            }
        });
        Self { addr, connections, open, requests, paths, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream_answer(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(n) = path.strip_prefix("/bytes/") {
        let total: usize = n.parse().unwrap();
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::iter((0..total.div_ceil(chunk.len())).map(move |i| {
            let len = chunk.len().min(total - i * chunk.len());
            Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.slice(..len)))
        }));
        return Ok(Response::new(BodyExt::boxed(http_body_util::StreamBody::new(stream))));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut response = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
        *response.status_mut() = http::StatusCode::from_u16(code.parse().unwrap()).unwrap();
        return Ok(response);
    }
    if path == "/hold" {
        std::future::pending::<()>().await;
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    if path == "/drip" {
        // One chunk, then nothing: only a streaming proxy passes the first chunk on.
        let first = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(b"first chunk")))
        });
        let stream = first.chain(futures_util::stream::pending());
        return Ok(Response::new(BodyExt::boxed(http_body_util::StreamBody::new(stream))));
    }
    if path == "/first-chunk" {
        // Answers as soon as the first chunk of the request body arrives.
        let mut body = req.into_body();
        let first = loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        break data;
                    }
                }
                _ => break Bytes::new(),
            }
        };
        tokio::spawn(async move { while body.frame().await.is_some() {} });
        return Ok(Response::new(Full::new(first).map_err(|never| match never {}).boxed()));
    }
    if path == "/count" {
        let mut body = req.into_body();
        let mut count = 0usize;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                count += data.len();
            }
        }
        return Ok(Response::new(Full::new(Bytes::from(count.to_string())).map_err(|never| match never {}).boxed()));
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), serde_json::Value::String(v.to_str().unwrap_or("").to_owned())))
        .collect();
    let echo = serde_json::json!({
        "upstream": name, "method": req.method().as_str(), "uri": req.uri().to_string(),
        "version": format!("{:?}", req.version()), "headers": headers,
    });
    let mut response = Response::new(Full::new(Bytes::from(echo.to_string())).map_err(|never| match never {}).boxed());
    response.headers_mut().insert("connection", "keep-alive, x-upstream-hop".parse().unwrap());
    response.headers_mut().insert("x-upstream-hop", "dropped".parse().unwrap());
    response.headers_mut().insert("x-upstream-name", name.parse().unwrap());
    Ok(response)
}

/// A WebSocket echo server.
pub async fn websocket_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy under test, shut down on drop.
pub struct Proxy {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub ops: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), stagely_edge_proxy::Error>>>,
}

pub struct ProxyOptions {
    pub rate_limit: u32,
    pub request_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub send_timeout_secs: u64,
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self { rate_limit: 1000, request_timeout_secs: 5, idle_timeout_secs: 30, send_timeout_secs: 30, tls: None }
    }
}

impl Proxy {
    pub async fn start(redis_url: &str, options: ProxyOptions) -> Self {
        let mut args = vec![
            "stagely-edge-proxy".to_owned(),
            "--domain".into(),
            DOMAIN.into(),
            "--redis-url".into(),
            redis_url.into(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--rate-limit".into(),
            options.rate_limit.to_string(),
            "--request-timeout-secs".into(),
            options.request_timeout_secs.to_string(),
            "--idle-timeout-secs".into(),
            options.idle_timeout_secs.to_string(),
            "--send-timeout-secs".into(),
            options.send_timeout_secs.to_string(),
            "--tls-reload-secs".into(),
            "1".into(),
            "--shutdown-grace-secs".into(),
            "2".into(),
        ];
        if let Some((cert, key)) = &options.tls {
            args.extend([
                "--https-addr".into(),
                "127.0.0.1:0".into(),
                "--tls-cert".into(),
                path(cert),
                "--tls-key".into(),
                path(key),
            ]);
        }
        let config = <Config as clap::Parser>::try_parse_from(args).unwrap();
        let listeners = Listeners {
            http: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            https: if options.tls.is_some() { Some(TcpListener::bind("127.0.0.1:0").await.unwrap()) } else { None },
            ops: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let http = listeners.http.as_ref().unwrap().local_addr().unwrap();
        let https = listeners.https.as_ref().map(|l| l.local_addr().unwrap());
        let ops = listeners.ops.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(stagely_edge_proxy::serve(config, listeners, async {
            let _ = stopped.await;
        }));
        Self { http, https, ops, stop: Some(stop), task: Some(task) }
    }

    /// Stops the proxy and waits for it to finish.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().expect("clean shutdown");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// One HTTP/1.1 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

/// GET `path` on host `host` through the proxy, on a new connection; returns status, headers
/// and body.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, http::HeaderMap, String) {
    let mut sender = connect(addr).await;
    let req = Request::get(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

pub fn host(hash: &str) -> String {
    format!("{hash}.{DOMAIN}")
}

/// An HTTP/2 (prior knowledge) connection to `addr`.
pub async fn connect_h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// An upstream that answers every request on a connection with the raw bytes `answer`, then
/// closes the connection: for responses no well-behaved server library would send.
pub async fn scripted_upstream(answer: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(answer).await;
            });
        }
    });
    addr
}

/// An upstream that answers every request on a connection with the raw bytes `answer` and
/// keeps the connection for the next request: for counting how often the proxy reuses a
/// connection after a response no well-behaved server library would send.
pub struct KeptUpstream {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KeptUpstream {
    pub async fn start(answer: &'static [u8]) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // The proxy sends bodiless requests here: each ends with its head.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        Self { addr, connections, task }
    }
}

impl Drop for KeptUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Requests answered so far by each path, `[fast, hyper]`, from the proxy's metrics.
pub async fn served(proxy: &Proxy) -> [u64; 2] {
    let (_, _, metrics) = get(proxy.ops, "ops", "/metrics").await;
    let mut served = [0, 0];
    for line in metrics.lines().filter(|line| line.starts_with("stagely_edge_proxy_requests_total{")) {
        let count: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        if line.contains("path=\"fast\"") {
            served[0] += count;
        } else if line.contains("path=\"hyper\"") {
            served[1] += count;
        } else {
            panic!("a request is counted without the path that served it: {line}");
        }
    }
    served
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads one response from `stream` (bytes read past it stay in `buf`); `None` if the
/// connection ends first. `head` says the request was HEAD (no body follows).
pub async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, head: bool) -> Option<RawResponse> {
    use tokio::io::AsyncReadExt;
    async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }
    let (status, headers, len) = loop {
        let mut parsed = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut parsed);
        if let httparse::Status::Complete(len) = response.parse(buf).expect("a valid response head") {
            let headers: Vec<(String, String)> = response
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            break (response.code.unwrap(), headers, len);
        }
        if !fill(stream, buf).await {
            return None;
        }
    };
    buf.drain(..len);
    let find = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if head || status == 204 || status == 304 {
    } else if find("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        loop {
            let line_end = loop {
                if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                if !fill(stream, buf).await {
                    return None;
                }
            };
            let line = std::str::from_utf8(&buf[..line_end]).unwrap();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..at + 4);
                        break;
                    }
                    if !fill(stream, buf).await {
                        return None;
                    }
                }
                break;
            }
            while buf.len() < line_end + 2 + size + 2 {
                if !fill(stream, buf).await {
                    return None;
                }
            }
            body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
        }
    } else if let Some(length) = find("content-length") {
        let length: usize = length.parse().unwrap();
        while buf.len() < length {
            if !fill(stream, buf).await {
                return None;
            }
        }
        body = buf.drain(..length).collect();
    } else {
        while fill(stream, buf).await {}
        body = std::mem::take(buf);
    }
    Some(RawResponse { status, headers, body })
}
