//! Listeners: accept connections (plain or TLS), serve HTTP/1.1 and HTTP/2 on them, and drain
//! them on shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::Either;
use http::uri::Scheme;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::proxy::Proxy;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection settings shared by the listeners.
#[derive(Clone)]
pub struct Listener {
    /// The proxy answering requests.
    pub proxy: Arc<Proxy>,
    /// Close a client connection idle this long.
    pub idle_timeout: Duration,
}

impl Listener {
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The header read timeout runs from the moment a connection waits for its next request,
        // so it is also the keep-alive idle timeout.
        builder.http1().timer(TokioTimer::new()).header_read_timeout(self.idle_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(self.idle_timeout / 2))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }

    /// Accepts connections on `listener` until `shutdown` turns true; connections are
    /// registered with `graceful` so the caller can drain them.
    pub async fn run(
        self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        graceful: &GracefulShutdown,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let builder = Arc::new(self.builder());
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(%err, "failed to accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = crate::stopped(&mut shutdown) => return,
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.proxy.clone();
            let builder = builder.clone();
            let watcher = graceful.watcher();
            let tls = tls.clone();
            let idle_timeout = self.idle_timeout;
            tokio::spawn(async move {
                let scheme = if tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP };
                let started = Arc::new(AtomicBool::new(false));
                let service = {
                    let started = started.clone();
                    service_fn(move |req| {
                        started.store(true, Ordering::Relaxed);
                        let proxy = proxy.clone();
                        let scheme = scheme.clone();
                        async move { Ok::<_, Infallible>(proxy.handle(req, peer, &scheme).await) }
                    })
                };
                let conn = match tls {
                    None => Either::Left(
                        watcher
                            .watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned()),
                    ),
                    Some(acceptor) => {
                        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(err)) => return tracing::debug!(%err, %peer, "TLS handshake failed"),
                            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                        };
                        Either::Right(
                            watcher.watch(
                                builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned(),
                            ),
                        )
                    }
                };
                // Until the first request, hyper is still sniffing the protocol and no timeout of
                // its own runs: a connection that says nothing is closed after the idle timeout.
                tokio::pin!(conn);
                tokio::select! {
                    _ = &mut conn => return,
                    _ = tokio::time::sleep(idle_timeout) => {}
                }
                if started.load(Ordering::Relaxed) {
                    let _ = conn.await;
                }
            });
        }
    }
}
