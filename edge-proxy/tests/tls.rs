//! HTTPS with a generated wildcard certificate, and its reload without dropping connections.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use stagely_api::route::RouteStatus;
use stagely_testenv::pki::TestCa;
use support::*;

struct Ca(TestCa);

impl Ca {
    fn new() -> Self {
        Self(TestCa::new("test CA").unwrap())
    }

    /// A wildcard certificate for `*.{DOMAIN}` with a fresh key, both PEM.
    fn wildcard(&self) -> (String, String) {
        self.0.serving(&[&format!("*.{DOMAIN}")]).unwrap()
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(self.0.der().to_vec())).unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2-over-TLS connection for `hash`, and the certificate the server presented.
async fn connect_tls(ca: &Ca, addr: std::net::SocketAddr, hash: &str) -> (H2, CertificateDer<'static>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(host(hash)).unwrap();
    let tls = ca.connector().connect(name, tcp).await.expect("TLS handshake with the wildcard certificate");
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    (sender, presented)
}

async fn get_h2(sender: &mut H2, hash: &str) -> serde_json::Value {
    let req = Request::get(format!("https://{}/", host(hash))).body(Full::new(Bytes::new())).unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn serves_https_and_reloads_the_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let ca = Ca::new();
    let (cert, key) = ca.wildcard();
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();

    let redis = Redis::start().await;
    let proxy = Proxy::start(
        &redis.url(),
        ProxyOptions { tls: Some((cert_path.clone(), key_path.clone())), ..Default::default() },
    )
    .await;
    let https = proxy.https.unwrap();
    let upstream = Upstream::start("app").await;
    redis.put_route("secure1", &route(RouteStatus::Ready, Some(upstream.addr))).await;

    let (mut old_conn, first_cert) = connect_tls(&ca, https, "secure1").await;
    let echo = get_h2(&mut old_conn, "secure1").await;
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    assert_eq!(echo["headers"]["host"], host("secure1"));

    // A broken file is not taken: the current certificate stays.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    eventually("the broken certificate to be tried and counted", Duration::from_secs(20), || async {
        let (_, _, metrics) = get(proxy.ops, "ops", "/metrics").await;
        (!metrics.contains("stagely_edge_proxy_tls_reload_errors_total 0")).then_some(())
    })
    .await;
    let (mut during, cert_during) = connect_tls(&ca, https, "secure1").await;
    assert_eq!(cert_during, first_cert);
    get_h2(&mut during, "secure1").await;

    // A new certificate (as a Secret update writes it) is served to new connections…
    let (cert, key) = ca.wildcard();
    std::fs::write(&key_path, &key).unwrap();
    std::fs::write(&cert_path, &cert).unwrap();
    let (mut new_conn, _) =
        eventually("new handshakes to get the new certificate", Duration::from_secs(20), || async {
            let (conn, presented) = connect_tls(&ca, https, "secure1").await;
            (presented != first_cert).then_some((conn, presented))
        })
        .await;
    get_h2(&mut new_conn, "secure1").await;
    // …while the connection opened before keeps working.
    get_h2(&mut old_conn, "secure1").await;
}

#[tokio::test]
async fn a_missing_certificate_stops_startup_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = <stagely_edge_proxy::Config as clap::Parser>::try_parse_from([
        "stagely-edge-proxy",
        "--domain",
        DOMAIN,
        "--https-addr",
        "127.0.0.1:0",
        "--tls-cert",
        dir.path().join("missing.crt").to_str().unwrap(),
        "--tls-key",
        dir.path().join("missing.key").to_str().unwrap(),
        "--ops-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    let listeners = stagely_edge_proxy::Listeners::bind(&config).await.unwrap();
    let err = stagely_edge_proxy::serve(config, listeners, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().starts_with("failed to read ") && err.to_string().contains("missing.crt"), "{err}");

    let err = <stagely_edge_proxy::Config as clap::Parser>::try_parse_from([
        "stagely-edge-proxy",
        "--domain",
        DOMAIN,
        "--https-addr",
        "127.0.0.1:0",
    ])
    .unwrap_err();
    assert!(err.to_string().contains("--tls-cert"), "{err}");
}
