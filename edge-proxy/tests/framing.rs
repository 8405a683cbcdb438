//! Message framing on both paths: which path served a request, responses whose framing the
//! client could read differently from the app, request smuggling, and clients that stop
//! reading.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use stagely_api::route::RouteStatus;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which path a request is meant for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Fast,
    Hyper,
}

const BOTH: [Via; 2] = [Via::Fast, Via::Hyper];

/// A GET of `target` that `via` serves: the fast path takes origin-form targets on cached
/// routes, and hands absolute-form ones to hyper.
fn get_via(via: Via, hash: &str, target: &str) -> String {
    let host = host(hash);
    match via {
        Via::Fast => format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        Via::Hyper => format!("GET http://{host}{target} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    }
}

/// Routes `hash` to `upstream`, and has hyper look it up until the fast path finds it cached:
/// the invalidation the route's write publishes may reach the proxy after a lookup.
async fn ready(proxy: &Proxy, redis: &Redis, hash: &str, upstream: std::net::SocketAddr) {
    redis.put_route(hash, &route(RouteStatus::Ready, Some(upstream))).await;
    eventually("the fast path to find the route cached", Duration::from_secs(10), || async {
        send(proxy, Via::Hyper, hash, "/warm").await;
        (send(proxy, Via::Fast, hash, "/probe").await == Via::Fast).then_some(())
    })
    .await;
}

/// Sends a GET meant for `via` on a new connection, and returns the path that served it
/// (whatever the answer, which is left unread).
async fn send(proxy: &Proxy, via: Via, hash: &str, target: &str) -> Via {
    let before = served(proxy).await;
    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    client.write_all(get_via(via, hash, target).as_bytes()).await.unwrap();
    eventually("the request to be answered", Duration::from_secs(10), || async {
        let after = served(proxy).await;
        if after[0] > before[0] {
            Some(Via::Fast)
        } else if after[1] > before[1] {
            Some(Via::Hyper)
        } else {
            None
        }
    })
    .await
}

/// `future`, or a failure once it has taken far longer than it should.
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future).await.expect("the proxy answered in time")
}

/// Checks that the requests made since `before` (from [`served`]) were `count` on `via`'s path
/// and none on the other.
async fn assert_served(proxy: &Proxy, before: [u64; 2], via: Via, count: u64) {
    let after = served(proxy).await;
    let delta = [after[0] - before[0], after[1] - before[1]];
    let want = match via {
        Via::Fast => [count, 0],
        Via::Hyper => [0, count],
    };
    assert_eq!(delta, want, "[fast, hyper] requests served, meant for {via:?}");
}

#[tokio::test]
async fn each_request_is_counted_under_the_path_that_served_it() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    ready(&proxy, &redis, "paths1", upstream.addr).await;

    let mut buf = Vec::new();
    for via in [Via::Fast, Via::Hyper, Via::Fast] {
        // A new connection each time: once hyper has a connection, it keeps it.
        let mut client = TcpStream::connect(proxy.http).await.unwrap();
        let before = served(&proxy).await;
        client.write_all(get_via(via, "paths1", "/which").as_bytes()).await.unwrap();
        assert_eq!(within(read_response(&mut client, &mut buf, false)).await.unwrap().status, 200);
        assert_served(&proxy, before, via, 1).await;
    }

    // A request with a body goes to hyper, and so does the rest of its connection.
    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let before = served(&proxy).await;
    let host = host("paths1");
    let requests = format!(
        "POST /count HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabcGET /after HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    client.write_all(requests.as_bytes()).await.unwrap();
    for _ in 0..2 {
        assert_eq!(within(read_response(&mut client, &mut buf, false)).await.unwrap().status, 200);
    }
    assert_served(&proxy, before, Via::Hyper, 2).await;
}

/// An app that answers every request with the same raw response, routed and ready.
struct App {
    upstream: KeptUpstream,
    hash: String,
    /// What the test tries, for its failure messages.
    what: String,
    /// Connections the app had accepted once ready.
    warmed: usize,
}

impl App {
    /// Answer `index` of a test `name`, for requests meant for `via`.
    async fn start(proxy: &Proxy, redis: &Redis, via: Via, name: &str, index: usize, answer: &'static [u8]) -> Self {
        let upstream = KeptUpstream::start(answer).await;
        let hash = format!("{name}{index}{via:?}").to_lowercase();
        ready(proxy, redis, &hash, upstream.addr).await;
        let what = format!("{via:?}, answer {index}: {}", String::from_utf8_lossy(answer).escape_debug());
        let warmed = upstream.connections.load(Ordering::SeqCst);
        Self { upstream, hash, what, warmed }
    }
}

#[tokio::test]
async fn a_response_framed_two_ways_is_a_502_and_its_upstream_connection_is_not_reused() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let answers: [&'static [u8]; 5] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    ];
    for via in BOTH {
        for (index, answer) in answers.into_iter().enumerate() {
            let App { upstream, hash, what, warmed } = App::start(&proxy, &redis, via, "twoway", index, answer).await;

            let mut client = TcpStream::connect(proxy.http).await.unwrap();
            let mut buf = Vec::new();
            let before = served(&proxy).await;
            for _ in 0..2 {
                client.write_all(get_via(via, &hash, "/").as_bytes()).await.unwrap();
                let response = within(read_response(&mut client, &mut buf, false)).await;
                assert_eq!(response.map(|response| response.status), Some(502), "{what}");
            }
            assert_served(&proxy, before, via, 2).await;
            assert_eq!(
                upstream.connections.load(Ordering::SeqCst) - warmed,
                2,
                "each request had an upstream connection of its own: {what}"
            );
        }
    }
}

/// What a client got for a response whose body the app framed badly.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A whole 502 page.
    BadGateway,
    /// Something else, then the proxy closed the connection before the client had a whole
    /// response.
    Cut,
}

/// Reads until `client` holds a whole 502 page or the proxy closes the connection.
async fn outcome(client: &mut TcpStream) -> Outcome {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = response.parse(&bytes)
            && response.code == Some(502)
        {
            let length = response.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"));
            let length: usize =
                std::str::from_utf8(length.expect("the 502 page has a length").value).unwrap().parse().unwrap();
            if bytes.len() >= len + length {
                return Outcome::BadGateway;
            }
        }
        match within(client.read(&mut chunk)).await {
            Ok(0) | Err(_) => return Outcome::Cut,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn a_malformed_chunk_size_from_the_app_never_reaches_the_client_as_a_whole_response() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let answers: [&'static [u8]; 6] = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 6\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
    ];
    for via in BOTH {
        for (index, answer) in answers.into_iter().enumerate() {
            let App { upstream, hash, what, warmed } = App::start(&proxy, &redis, via, "badchunk", index, answer).await;

            for _ in 0..2 {
                let mut client = TcpStream::connect(proxy.http).await.unwrap();
                let before = served(&proxy).await;
                client.write_all(get_via(via, &hash, "/").as_bytes()).await.unwrap();
                // A 502 when nothing has reached the client yet; once the head has, all the
                // proxy can do is close the connection before the response ends.
                let outcome = outcome(&mut client).await;
                assert!(matches!(outcome, Outcome::BadGateway | Outcome::Cut), "{what}");
                assert_served(&proxy, before, via, 1).await;
            }
            assert_eq!(upstream.connections.load(Ordering::SeqCst) - warmed, 2, "never reused: {what}");
        }
    }
}

/// Reads responses off `client` until the proxy closes it; fails if it does not.
async fn responses_until_closed(client: &mut TcpStream, what: &str) -> Vec<u16> {
    let mut buf = Vec::new();
    let mut statuses = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), read_response(client, &mut buf, false)).await {
            Ok(Some(response)) => statuses.push(response.status),
            Ok(None) => return statuses,
            Err(_) => panic!("{what}: the connection is still open after {statuses:?}"),
        }
    }
}

#[tokio::test]
async fn request_smuggling_attempts_are_refused_on_both_paths() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    ready(&proxy, &redis, "smuggle1", upstream.addr).await;
    let host = host("smuggle1");
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let chunked = |size: &str| {
        format!(
            "POST /count HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
        )
    };
    // What the client may see before the proxy closes the connection: a refusal, or (RFC 9112
    // §6.1) the answer to the request as Transfer-Encoding frames it, or a 502 once the body
    // it sent on turns out malformed.
    const REFUSED: &[&[u16]] = &[&[400]];
    const TE_WINS: &[&[u16]] = &[&[400], &[200]];
    const BODY_BROKEN: &[&[u16]] = &[&[400], &[502]];
    const TOO_LARGE: &[&[u16]] = &[&[431]];
    let attempts = [
        (
            "content-length and transfer-encoding",
            format!(
                "POST /count HTTP/1.1\r\nHost: {host}\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            TE_WINS,
        ),
        (
            "transfer-encoding and content-length",
            format!(
                "POST /count HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n"
            ),
            TE_WINS,
        ),
        (
            "two content-lengths",
            format!("POST /count HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nhello"),
            REFUSED,
        ),
        (
            "a transfer coding other than chunked",
            format!(
                "POST /count HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello"
            ),
            REFUSED,
        ),
        (
            "transfer-encoding in HTTP/1.0",
            format!("POST /count HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            REFUSED,
        ),
        (
            "an obs-folded transfer-encoding",
            format!(
                "POST /count HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 0\r\n\r\n"
            ),
            REFUSED,
        ),
        ("an obs-folded header", format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Folded: a\r\n b\r\n\r\n"), REFUSED),
        ("a chunk size with a 0x prefix", chunked("0x5"), BODY_BROKEN),
        ("a chunk size with a plus sign", chunked("+5"), BODY_BROKEN),
        ("a negative chunk size", chunked("-5"), BODY_BROKEN),
        ("a chunk size with a space inside", chunked("5 6"), BODY_BROKEN),
        ("a chunk size past 64 bits", chunked("10000000000000005"), BODY_BROKEN),
        (
            "an oversized head",
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n", "b".repeat(70 * 1024)),
            TOO_LARGE,
        ),
    ];
    for via in BOTH {
        for (name, attempt, allowed) in &attempts {
            let mut client = TcpStream::connect(proxy.http).await.unwrap();
            let mut buf = Vec::new();
            if via == Via::Hyper {
                // Hyper serves this connection from its first request on.
                let before = served(&proxy).await;
                client.write_all(get_via(Via::Hyper, "smuggle1", "/first").as_bytes()).await.unwrap();
                assert_eq!(within(read_response(&mut client, &mut buf, false)).await.unwrap().status, 200);
                assert_served(&proxy, before, Via::Hyper, 1).await;
            }
            client.write_all(format!("{attempt}{smuggled}").as_bytes()).await.unwrap();
            let what = format!("{name} via {via:?}");
            let statuses = responses_until_closed(&mut client, &what).await;
            assert!(allowed.contains(&statuses.as_slice()), "{what}: got {statuses:?}, then the connection closed");
        }
    }
    let paths = upstream.paths.lock().unwrap().clone();
    assert!(!paths.iter().any(|path| path == "/smuggled"), "a smuggled request reached the app: {paths:?}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_timed_out_and_its_upstream_connection_closed() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions { send_timeout_secs: 1, ..Default::default() }).await;
    for via in BOTH {
        let upstream = Upstream::start("app").await;
        let hash = format!("stall{via:?}").to_lowercase();
        ready(&proxy, &redis, &hash, upstream.addr).await;
        let warmed = upstream.requests.load(Ordering::SeqCst);

        let before = served(&proxy).await;
        let mut client = TcpStream::connect(proxy.http).await.unwrap();
        // Far more than the socket buffers between the app and the client hold.
        let total = 1usize << 30;
        client.write_all(get_via(via, &hash, &format!("/bytes/{total}")).as_bytes()).await.unwrap();
        eventually("the request to reach the app", Duration::from_secs(10), || async {
            (upstream.requests.load(Ordering::SeqCst) > warmed).then_some(())
        })
        .await;
        // The connection serving it stays open until the proxy lets it go; any other one is
        // idle in a pool.
        let open = upstream.open.load(Ordering::SeqCst);
        eventually("the app's connection to be closed", Duration::from_secs(20), || async {
            (upstream.open.load(Ordering::SeqCst) < open).then_some(())
        })
        .await;
        assert_served(&proxy, before, via, 1).await;

        let mut received = 0;
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            match within(client.read(&mut chunk)).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
        assert!(received < total, "{via:?}: the connection closed before the response ended");
    }
}

#[tokio::test]
async fn a_connection_that_waited_long_enough_for_its_buffers_to_shrink_serves_on() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis.url(), ProxyOptions::default()).await;
    let upstream = Upstream::start("app").await;
    ready(&proxy, &redis, "shrink1", upstream.addr).await;

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    let before = served(&proxy).await;
    for round in 0..2 {
        // A large body grows the connection's buffers; two pipelined requests and a pause
        // longer than the proxy waits before shrinking them follow.
        let requests =
            [get_via(Via::Fast, "shrink1", "/bytes/300000"), get_via(Via::Fast, "shrink1", "/after")].concat();
        client.write_all(requests.as_bytes()).await.unwrap();
        let large = within(read_response(&mut client, &mut buf, false)).await.unwrap();
        assert_eq!(large.body.len(), 300_000, "round {round}");
        let after = within(read_response(&mut client, &mut buf, false)).await.unwrap();
        assert_eq!(after.status, 200, "round {round}");
        // Not synchronisation: the idle time is what is being tested.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_served(&proxy, before, Via::Fast, 4).await;
}
