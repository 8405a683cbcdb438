//! The edge proxy against a real redis-server and real upstream servers on loopback.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use stagely_api::route::RouteStatus;
use support::*;
use tokio::io::AsyncReadExt;

fn echo(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|err| panic!("not an upstream echo ({err}): {body}"))
}

#[tokio::test]
async fn every_route_state_gets_its_page() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions { request_timeout_secs: 1, ..Default::default() }).await;
    let upstream = Upstream::start("app").await;
    redis.put_route("building1", &route(RouteStatus::Building, None)).await;
    redis.put_route("deploying1", &route(RouteStatus::Deploying, Some(upstream.addr))).await;
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // closed again at once
    redis.put_route("refused1", &route(RouteStatus::Ready, Some(refused))).await;
    redis.put_route("slow1", &route(RouteStatus::Ready, Some(upstream.addr))).await;

    let (status, headers, body) = get(proxy.http, &host("building1"), "/").await;
    assert_eq!(status, 503);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    for want in ["Building your environment…", "shop", "#42", "Building images", "http-equiv=\"refresh\""] {
        assert!(body.contains(want), "building page lacks {want:?}: {body}");
    }
    let (status, _, body) = get(proxy.http, &host("deploying1"), "/").await;
    assert_eq!(status, 503);
    assert!(body.contains("Deploying") && body.contains("#42"), "{body}");

    let (status, _, body) = get(proxy.http, &host("unknown1"), "/").await;
    assert_eq!(status, 404);
    assert!(body.contains("No preview here"), "{body}");

    let (status, _, body) = get(proxy.http, &host("refused1"), "/").await;
    assert_eq!(status, 502);
    assert!(body.contains("shop-pr-42"), "502 page names the environment: {body}");
    let (status, _, body) = get(proxy.http, &host("slow1"), "/hold").await;
    assert_eq!(status, 502, "a timed-out upstream is a 502");
    assert!(body.contains("shop-pr-42"), "{body}");

    for plain in [DOMAIN, "127.0.0.1", "a.b.preview.test", "example.com"] {
        let (status, _, body) = get(proxy.http, plain, "/").await;
        assert_eq!((status, body.as_str()), (404, "404 page not found\n"), "host {plain}");
    }
    let (status, _, _) = get(proxy.http, &format!("{}:8080", host("building1")), "/").await;
    assert_eq!(status, 503, "the port in Host is ignored");
}

#[tokio::test]
async fn proxied_requests_carry_the_stagely_headers_and_lose_hop_by_hop_ones() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    redis.put_route("ready1", &route(RouteStatus::Ready, Some(upstream.addr))).await;

    let mut sender = connect(proxy.http).await;
    let req = Request::post("/api/items?x=1")
        .header("host", host("ready1"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "secret-hop")
        .header("x-app-header", "kept")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-upstream-name"], "app");
    assert!(response.headers().get("x-upstream-hop").is_none(), "a header the upstream's Connection names is dropped");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen = echo(&String::from_utf8_lossy(&body));
    let headers = &seen["headers"];
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["uri"], "/api/items?x=1");
    assert_eq!(headers["host"], host("ready1"));
    assert_eq!(headers["x-forwarded-host"], host("ready1"));
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "the client's claim is replaced");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-stagely-project"], "shop");
    assert_eq!(headers["x-stagely-pr"], "42");
    assert_eq!(headers["x-stagely-environment"], "team-a/shop-pr-42");
    assert_eq!(headers["x-app-header"], "kept");
    assert!(headers.get("x-client-hop").is_none(), "{headers}");

    // HTTP/2 from the client, HTTP/1.1 to the app, same headers.
    let mut h2 = connect_h2(proxy.http).await;
    let req = Request::get(format!("http://{}/h2", host("ready1"))).body(Full::new(Bytes::new())).unwrap();
    let response = h2.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let echo = echo(&String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes()));
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["headers"]["host"], host("ready1"));
    assert_eq!(echo["headers"]["x-stagely-pr"], "42");
}

#[tokio::test]
async fn keep_alive_on_both_sides() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    redis.put_route("ready2", &route(RouteStatus::Ready, Some(upstream.addr))).await;
    let mut sender = connect(proxy.http).await;
    for i in 0..20 {
        let req = Request::get(format!("/{i}")).header("host", host("ready2")).body(Full::new(Bytes::new())).unwrap();
        let response = sender.send_request(req).await.expect("the client connection stays open");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 20);
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        1,
        "sequential requests reuse one pooled upstream connection"
    );
}

#[tokio::test]
async fn websockets_pass_through() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let echo_server = websocket_echo().await;
    redis.put_route("ws1", &route(RouteStatus::Ready, Some(echo_server))).await;

    let stream = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("ws://{}/socket", host("ws1")), stream)
        .await
        .expect("upgrade through the proxy");
    assert_eq!(response.status(), 101);
    for text in ["hello", "through", "the proxy"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().len(), 100_000);
}

#[tokio::test]
async fn bodies_stream_both_ways_and_are_never_buffered_whole() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    redis.put_route("big1", &route(RouteStatus::Ready, Some(upstream.addr))).await;
    let mut sender = connect(proxy.http).await;

    // 64 MiB down.
    let req = Request::get("/bytes/67108864").header("host", host("big1")).body(Full::new(Bytes::new())).unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(received, 64 << 20);

    // 64 MiB up, on a connection of its own (the body type differs).
    let stream = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (mut up, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let chunks = futures_util::stream::iter(
        (0..1024).map(|_| Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![1u8; 64 * 1024])))),
    );
    let req = Request::post("/count").header("host", host("big1")).body(StreamBody::new(chunks)).unwrap();
    let counted = up.send_request(req).await.unwrap().into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counted, (64usize << 20).to_string());

    // The first chunk of an endless response arrives: the proxy does not wait for the end.
    let req = Request::get("/drip").header("host", host("big1")).body(Full::new(Bytes::new())).unwrap();
    let mut sender = connect(proxy.http).await;
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("first chunk streamed");
    assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "first chunk");

    // An upload whose end never comes still reaches the app chunk by chunk.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>();
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"hello")))).unwrap();
    let stream = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (mut up, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::post("/first-chunk")
        .header("host", host("big1"))
        .body(StreamBody::new(tokio_stream_shim(rx)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), up.send_request(req))
        .await
        .expect("answered before the upload ended")
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "hello");
    drop(tx);
}

#[tokio::test]
async fn route_changes_are_seen_without_a_restart_and_steady_state_skips_redis() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    redis.put_route("move1", &route(RouteStatus::Ready, Some(a.addr))).await;
    assert_eq!(echo(&get(proxy.http, &host("move1"), "/").await.2)["upstream"], "a");

    let gets_before = redis.get_calls().await;
    for _ in 0..50 {
        assert_eq!(get(proxy.http, &host("move1"), "/").await.0, 200);
    }
    assert_eq!(redis.get_calls().await, gets_before, "cached routes need no Redis round trip");

    redis.put_route("move1", &route(RouteStatus::Ready, Some(b.addr))).await;
    eventually("the proxy to follow the route to b", Duration::from_secs(10), || async {
        (echo(&get(proxy.http, &host("move1"), "/").await.2)["upstream"] == "b").then_some(())
    })
    .await;

    redis.delete_route("move1").await;
    eventually("the deleted route to 404", Duration::from_secs(10), || async {
        (get(proxy.http, &host("move1"), "/").await.0 == 404).then_some(())
    })
    .await;

    let (_, _, metrics) = get(proxy.ops, "ops", "/metrics").await;
    for want in [
        "stagely_edge_proxy_requests_total{code=\"200\",path=\"hyper\"}",
        "stagely_edge_proxy_route_cache_hits_total",
        "stagely_edge_proxy_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(want), "metrics lack {want}: {metrics}");
    }
    assert_eq!(get(proxy.ops, "ops", "/healthz").await.2, "ok");
}

#[tokio::test]
async fn cached_routes_keep_serving_while_redis_is_down_and_the_proxy_recovers() {
    let mut redis = Redis::start().await;
    let port = redis.port();
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    redis.put_route("sturdy1", &route(RouteStatus::Ready, Some(a.addr))).await;
    assert_eq!(get(proxy.http, &host("sturdy1"), "/").await.0, 200);

    redis.stop();
    for _ in 0..20 {
        let (status, _, body) = get(proxy.http, &host("sturdy1"), "/").await;
        assert_eq!(
            (status, echo(&body)["upstream"].as_str()),
            (200, Some("a")),
            "served from the cache while Redis is down"
        );
    }
    let (status, _, _) = get(proxy.http, &host("neverseen1"), "/").await;
    assert_eq!(status, 503, "an uncached route cannot be looked up while Redis is down");

    let redis = Redis::start_on(port).await;
    redis.put_route("sturdy1", &route(RouteStatus::Ready, Some(b.addr))).await;
    eventually("the proxy to reconnect and see the new route", Duration::from_secs(20), || async {
        (echo(&get(proxy.http, &host("sturdy1"), "/").await.2)["upstream"] == "b").then_some(())
    })
    .await;
}

#[tokio::test]
async fn each_environment_is_rate_limited_on_its_own() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions { rate_limit: 5, ..Default::default() }).await;
    let upstream = Upstream::start("app").await;
    redis.put_route("busy1", &route(RouteStatus::Ready, Some(upstream.addr))).await;
    redis.put_route("calm1", &route(RouteStatus::Ready, Some(upstream.addr))).await;
    let mut statuses = Vec::new();
    let mut sender = connect(proxy.http).await;
    for _ in 0..30 {
        let req = Request::get("/").header("host", host("busy1")).body(Full::new(Bytes::new())).unwrap();
        let response = sender.send_request(req).await.unwrap();
        if response.status() == 429 {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        statuses.push(response.status().as_u16());
        response.into_body().collect().await.unwrap();
    }
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert!(limited >= 20, "at 5 req/s, most of 30 back-to-back requests are refused: {statuses:?}");
    assert!(statuses.iter().take(5).all(|&s| s == 200), "the burst is allowed: {statuses:?}");
    assert_eq!(get(proxy.http, &host("calm1"), "/").await.0, 200, "another environment is not affected");
}

#[tokio::test]
async fn idle_client_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions { idle_timeout_secs: 1, ..Default::default() }).await;
    redis.put_route("idle1", &route(RouteStatus::Building, None)).await;
    let closed = |mut stream: tokio::net::TcpStream| async move {
        let mut buf = vec![0u8; 64 * 1024];
        // Read (and drop) whatever the proxy sent until it closes the connection.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    };
    // A connection that never sends a request.
    let silent = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    assert!(closed(silent).await, "a silent connection is closed after the idle timeout");
    // A keep-alive connection after its request.
    let mut used = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host("idle1"));
    used.write_all(request.as_bytes()).await.unwrap();
    assert!(closed(used).await, "an idle keep-alive connection is closed after the idle timeout");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    redis.put_route("drain1", &route(RouteStatus::Ready, Some(upstream.addr))).await;
    let addr = proxy.http;
    let in_flight = tokio::spawn(async move { get(addr, &host("drain1"), "/delay/500").await });
    eventually("the request to reach the app", Duration::from_secs(10), || async {
        (upstream.requests.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    proxy.shutdown().await;
    let (status, _, _) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the in-flight request completed");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer listening");
}

/// An unbounded receiver as a stream of body frames.
fn tokio_stream_shim<T>(mut rx: tokio::sync::mpsc::UnboundedReceiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
