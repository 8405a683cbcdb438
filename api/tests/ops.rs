//! The shared operations endpoints answer over real HTTP, and the server stops on its shutdown signal.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn readyz_answers_503_with_the_reason_until_the_check_passes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&ready);
    let readiness = stagely_api::ops::Readiness::when(move || {
        if flag.load(std::sync::atomic::Ordering::Relaxed) { Ok(()) } else { Err("not yet: warming up".to_owned()) }
    });
    let router = stagely_api::ops::router_with(stagely_api::ops::Metrics::new("stagely_test", "1.2.3"), readiness);
    tokio::spawn(stagely_api::ops::serve(listener, router, std::future::pending()));

    let answer = get(addr, "/readyz").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nnot yet: warming up"), "{answer}");
    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"), "live while not ready");

    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let answer = get(addr, "/readyz").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nready"), "{answer}");
}

#[tokio::test]
async fn healthz_and_metrics_answer_and_shutdown_stops_the_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(stagely_api::ops::serve(
        listener,
        stagely_api::ops::router(stagely_api::ops::Metrics::new("stagely_test", "1.2.3")),
        async {
            let _ = stopped.await;
        },
    ));

    let health = get(addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("\r\n\r\nok"), "{health}");

    let metrics = get(addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let want = "stagely_test_build_info{version=\"1.2.3\"} 1";
    assert!(metrics.contains(want), "{metrics}");

    let ready = get(addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

    stop.send(()).unwrap();
    server.await.unwrap().expect("clean shutdown");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening after shutdown");
}
