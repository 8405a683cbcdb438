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

    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

    stop.send(()).unwrap();
    server.await.unwrap().expect("clean shutdown");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening after shutdown");
}
