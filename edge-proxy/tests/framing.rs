//! Message framing on both paths: which path served a request.

mod support;

use std::time::Duration;

use stagely_api::route::RouteStatus;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Which path a request is meant for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Fast,
    Hyper,
}

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
