//! The binary serves its own metrics, and its configuration rejects bad input clearly.

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
async fn serves_its_metrics_until_shut_down() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(stagely_edge_proxy::serve(listener, async {
        let _ = stopped.await;
    }));
    let metrics = get(addr, "/metrics").await;
    assert!(
        metrics.contains(concat!("stagely_edge_proxy_build_info{version=\"", env!("CARGO_PKG_VERSION"), "\"} 1")),
        "{metrics}"
    );
    stop.send(()).unwrap();
    server.await.unwrap().expect("clean shutdown");
}

#[test]
fn config_rejects_a_bad_address_with_a_clear_error() {
    use clap::Parser;
    let err =
        stagely_edge_proxy::Config::try_parse_from(["stagely-edge-proxy", "--ops-addr", "not-an-address"]).unwrap_err();
    assert!(err.to_string().contains("invalid value 'not-an-address' for '--ops-addr <OPS_ADDR>'"), "{err}");
    let config = stagely_edge_proxy::Config::try_parse_from(["stagely-edge-proxy"]).unwrap();
    assert_eq!(config.ops_addr.to_string(), "0.0.0.0:9090");
}
