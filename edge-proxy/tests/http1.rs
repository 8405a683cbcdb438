//! The HTTP/1.1 fast path on raw client connections: framing both ways, pipelining, hop-by-hop
//! headers, handing a connection over to hyper, and apps that misbehave.

mod support;

use std::sync::atomic::Ordering;

use stagely_api::route::RouteStatus;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn echo(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|err| panic!("not an upstream echo ({err}): {body:?}"))
}

async fn ready(redis: &Redis, hash: &str, upstream: std::net::SocketAddr) {
    redis.put_route(hash, &route(RouteStatus::Ready, Some(upstream))).await;
}

/// Sends one request through the hyper path (it has a body), so the route is cached for the
/// fast path; whatever the answer.
async fn warm(proxy: &Proxy, hash: &str) {
    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let request = format!("POST /warm HTTP/1.1\r\nHost: {}\r\nContent-Length: 1\r\n\r\nx", host(hash));
    client.write_all(request.as_bytes()).await.unwrap();
    let _ = read_response(&mut client, &mut Vec::new(), false).await;
}

#[tokio::test]
async fn headers_are_rewritten_and_hop_by_hop_ones_dropped_both_ways() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    ready(&redis, "fast1", upstream.addr).await;
    warm(&proxy, "fast1").await;

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let request = format!(
        "GET /items?x=1 HTTP/1.1\r\nHost: {}\r\nX-Forwarded-For: 6.6.6.6\r\nX-Stagely-PR: 7\r\n\
         Connection: keep-alive, X-Client-Hop\r\nX-Client-Hop: secret\r\nKeep-Alive: timeout=5\r\n\
         TE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-App-Header: kept\r\n\r\n",
        host("fast1")
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let response = read_response(&mut client, &mut buf, false).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-upstream-name"), Some("app"));
    assert_eq!(response.header("x-upstream-hop"), None, "a header the upstream's Connection names is dropped");
    assert_eq!(response.header("connection"), None);
    assert!(response.header("date").is_some());
    let seen = echo(&response.body);
    let headers = &seen["headers"];
    assert_eq!(seen["uri"], "/items?x=1");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(headers["host"], host("fast1"));
    assert_eq!(headers["x-forwarded-host"], host("fast1"));
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "the client's claim is replaced");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-stagely-pr"], "42");
    assert_eq!(headers["x-stagely-project"], "shop");
    assert_eq!(headers["x-stagely-environment"], "team-a/shop-pr-42");
    assert_eq!(headers["x-app-header"], "kept");
    for gone in ["x-client-hop", "keep-alive", "te", "proxy-authorization", "connection"] {
        assert!(headers.get(gone).is_none(), "{gone} reached the app: {headers}");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_upstream_connection() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    ready(&redis, "pipe1", upstream.addr).await;
    warm(&proxy, "pipe1").await;
    let before = upstream.connections.load(Ordering::SeqCst);

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let one = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", host("pipe1"));
    client.write_all(format!("{}{}{}", one("/first"), one("/second"), one("/third")).as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for path in ["/first", "/second", "/third"] {
        let response = read_response(&mut client, &mut buf, false).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(echo(&response.body)["uri"], path);
    }
    assert!(upstream.connections.load(Ordering::SeqCst) - before <= 1, "one pooled upstream connection at most");
}

#[tokio::test]
async fn head_204_and_304_have_no_body_and_the_connection_goes_on() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    ready(&redis, "nobody1", upstream.addr).await;
    warm(&proxy, "nobody1").await;

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    for (method, path, status) in
        [("HEAD", "/", 200), ("GET", "/status/204", 204), ("GET", "/status/304", 304), ("GET", "/last", 200)]
    {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n\r\n", host("nobody1"));
        client.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut client, &mut buf, method == "HEAD").await.unwrap();
        assert_eq!(response.status, status, "{method} {path}");
        if method == "HEAD" {
            assert!(response.header("content-length").is_some(), "HEAD keeps the length of what GET would send");
        }
        if status == 200 && method == "GET" {
            assert_eq!(echo(&response.body)["uri"], "/last");
        } else {
            assert!(response.body.is_empty());
        }
    }
    assert!(buf.is_empty(), "no stray body bytes: {buf:?}");
}

#[tokio::test]
async fn a_request_with_a_body_hands_the_connection_to_hyper_mid_stream() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    ready(&redis, "hand1", upstream.addr).await;
    warm(&proxy, "hand1").await;

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let host = host("hand1");
    // A fast GET, then a chunked upload pipelined behind another GET: hyper takes over with
    // the bytes already read and answers all of them.
    client.write_all(format!("GET /fast HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let response = read_response(&mut client, &mut buf, false).await.unwrap();
    assert_eq!(echo(&response.body)["uri"], "/fast");
    let upload = format!(
        "POST /count HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
         GET /after HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    client.write_all(upload.as_bytes()).await.unwrap();
    let counted = read_response(&mut client, &mut buf, false).await.unwrap();
    assert_eq!((counted.status, counted.body.as_slice()), (200, &b"11"[..]));
    let after = read_response(&mut client, &mut buf, false).await.unwrap();
    assert_eq!(echo(&after.body)["uri"], "/after");
}

#[tokio::test]
async fn chunked_and_close_delimited_responses_reach_the_client_chunked() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let chunked = scripted_upstream(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n\
          HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n",
    )
    .await;
    let until_close = scripted_upstream(b"HTTP/1.1 200 OK\r\nX-Kind: until-close\r\n\r\nall of it").await;
    ready(&redis, "chunk1", chunked).await;
    ready(&redis, "close1", until_close).await;
    assert_eq!(get(proxy.http, &host("chunk1"), "/").await.2, "hello, world", "through hyper");
    assert_eq!(get(proxy.http, &host("close1"), "/").await.2, "all of it", "through hyper");

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    for (hash, body) in [("chunk1", "hello, world"), ("close1", "all of it"), ("chunk1", "hello, world")] {
        client.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host(hash)).as_bytes()).await.unwrap();
        let response = read_response(&mut client, &mut buf, false).await.unwrap();
        assert_eq!(response.status, 200, "the 103 is dropped");
        assert_eq!(response.header("transfer-encoding"), Some("chunked"));
        assert_eq!(String::from_utf8_lossy(&response.body), body, "{hash}");
    }
}

#[tokio::test]
async fn an_app_that_fails_before_answering_is_a_502_and_one_that_fails_mid_body_truncates() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let silent = scripted_upstream(b"").await;
    let short = scripted_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this").await;
    let garbage = scripted_upstream(b"this is not HTTP\r\n\r\n").await;
    ready(&redis, "silent1", silent).await;
    ready(&redis, "short1", short).await;
    ready(&redis, "garbage1", garbage).await;
    for hash in ["silent1", "short1", "garbage1"] {
        warm(&proxy, hash).await;
    }

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    for hash in ["silent1", "garbage1", "silent1"] {
        client.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host(hash)).as_bytes()).await.unwrap();
        let response = read_response(&mut client, &mut buf, false).await.unwrap();
        assert_eq!(response.status, 502, "{hash}");
        assert!(String::from_utf8_lossy(&response.body).contains("shop-pr-42"), "the 502 page");
    }
    client.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host("short1")).as_bytes()).await.unwrap();
    assert!(
        read_response(&mut client, &mut buf, false).await.is_none(),
        "a body cut short ends the client connection before its length"
    );
}

#[tokio::test]
async fn connection_close_from_the_client_is_honoured() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    ready(&redis, "bye1", upstream.addr).await;
    warm(&proxy, "bye1").await;

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let request = format!("GET /bye HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", host("bye1"));
    client.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let response = read_response(&mut client, &mut buf, false).await.unwrap();
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(echo(&response.body)["uri"], "/bye");
    assert!(read_response(&mut client, &mut buf, false).await.is_none(), "closed after the response");
}

#[tokio::test]
async fn the_rate_limit_answers_429_and_keeps_the_connection() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions { rate_limit: 5, ..Default::default() }).await;
    let upstream = Upstream::start("app").await;
    ready(&redis, "limit1", upstream.addr).await;
    warm(&proxy, "limit1").await;

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..30 {
        client.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host("limit1")).as_bytes()).await.unwrap();
        let response = read_response(&mut client, &mut buf, false).await.unwrap();
        if response.status == 429 {
            assert_eq!(response.header("retry-after"), Some("1"));
            assert_eq!(response.body, b"too many requests for this preview\n");
        }
        statuses.push(response.status);
    }
    assert!(statuses.iter().filter(|&&s| s == 429).count() >= 20, "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    let (_, _, metrics) = get(proxy.ops, "ops", "/metrics").await;
    assert!(metrics.contains("stagely_edge_proxy_requests_total{code=\"429\",path=\"fast\"}"), "{metrics}");
}
