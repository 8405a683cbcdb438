//! Listeners: accept connections (plain or TLS), serve HTTP/1.1 and HTTP/2 on them, and drain
//! them on shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::Either;
use http::uri::Scheme;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::fast::{self, Prefixed};
use crate::headers::MAX_REQUEST_HEAD;
use crate::proxy::Proxy;
use crate::send_timeout::SendTimeout;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long client connections may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Close a client connection idle this long.
    pub idle: Duration,
    /// Close a client connection that has accepted none of a response for this long.
    pub send: Duration,
    /// On shutdown, close connections still open after this long.
    pub grace: Duration,
}

/// Serves the listeners on `threads` threads, each with a single-threaded runtime of its own
/// and its own upstream connection pool (as nginx's workers do): a request, its upstream
/// connection and its response never cross threads. Returns once every worker has stopped
/// accepting (on `shutdown`) and drained its connections for up to `timeouts.grace`.
pub fn spawn_workers(
    threads: usize,
    listeners: Vec<(std::net::TcpListener, Option<TlsAcceptor>)>,
    make_proxy: impl Fn() -> Proxy + Send + Sync + 'static,
    timeouts: Timeouts,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let make_proxy = Arc::new(make_proxy);
    let counts: Arc<[AtomicUsize]> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
    let mut workers = Vec::with_capacity(threads);
    for index in 0..threads {
        let mut own = Vec::with_capacity(listeners.len());
        for (listener, tls) in &listeners {
            own.push((listener.try_clone()?, tls.clone()));
        }
        let make_proxy = make_proxy.clone();
        let shutdown = shutdown.clone();
        let load = Load { counts: counts.clone(), index };
        let worker = std::thread::Builder::new().name(format!("proxy-worker-{index}")).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(err) => return tracing::error!(%err, "failed to start a proxy worker"),
            };
            runtime.block_on(async move {
                let proxy = Arc::new(make_proxy());
                let sweeper = tokio::spawn({
                    let proxy = proxy.clone();
                    async move {
                        let mut every = tokio::time::interval(Duration::from_secs(30));
                        loop {
                            every.tick().await;
                            proxy.upstreams.sweep();
                        }
                    }
                });
                // Every connection task holds a sender: once all are gone, the worker is drained.
                let (open, mut drained) = mpsc::channel::<()>(1);
                let listener = Listener { proxy, timeouts };
                let graceful = GracefulShutdown::new();
                let mut accepting = Vec::new();
                for (socket, tls) in own {
                    match TcpListener::from_std(socket) {
                        Ok(socket) => accepting.push(listener.clone().run(
                            socket,
                            tls,
                            &graceful,
                            open.clone(),
                            load.clone(),
                            shutdown.clone(),
                        )),
                        Err(err) => tracing::error!(%err, "failed to register a listener"),
                    }
                }
                drop(open);
                futures_util::future::join_all(accepting).await;
                let drain = async {
                    graceful.shutdown().await;
                    let _ = drained.recv().await;
                };
                if tokio::time::timeout(timeouts.grace, drain).await.is_err() {
                    tracing::warn!("connections still open after the grace period; closing them");
                }
                sweeper.abort();
            });
        })?;
        workers.push(worker);
    }
    Ok(workers)
}

/// Open connections per worker. All workers wait on the same listening sockets, and one that
/// is awake when a burst of clients connects would otherwise accept them all and serve them
/// alone while the others idle (nginx avoids this with `EPOLLEXCLUSIVE`, accepting one at a
/// time): a worker with more than one connection over the least busy leaves new ones to it.
#[derive(Clone)]
pub struct Load {
    counts: Arc<[AtomicUsize]>,
    index: usize,
}

impl Load {
    fn busier_than_the_rest(&self) -> bool {
        let mine = self.counts[self.index].load(Ordering::Relaxed);
        let least = self.counts.iter().map(|count| count.load(Ordering::Relaxed)).min().unwrap_or(0);
        mine > least + 1
    }

    fn opened(&self) -> Opened {
        self.counts[self.index].fetch_add(1, Ordering::Relaxed);
        Opened(self.clone())
    }
}

/// One open connection, counted in its worker's [`Load`] until dropped.
struct Opened(Load);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.counts[self.0.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connection settings shared by the listeners.
#[derive(Clone)]
pub struct Listener {
    /// The proxy answering requests.
    pub proxy: Arc<Proxy>,
    /// How long client connections may take.
    pub timeouts: Timeouts,
}

impl Listener {
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let idle_timeout = self.timeouts.idle;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The header read timeout runs from the moment a connection waits for its next request,
        // so it is also the keep-alive idle timeout. The read buffer need not hold more than the
        // longest head the proxy takes (hyper answers 431 to a head it has not whole by then).
        builder.http1().timer(TokioTimer::new()).header_read_timeout(idle_timeout).max_buf_size(MAX_REQUEST_HEAD);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(idle_timeout / 2))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }

    /// Accepts connections on `listener` until `shutdown` turns true; connections are
    /// registered with `graceful` so the caller can drain them, and each holds a clone of `open`
    /// and counts in `load` until it ends. Connections are served on the calling runtime;
    /// plain-HTTP ones start on the [`fast`] path, which hands them to hyper when a request
    /// needs it.
    pub async fn run(
        self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        graceful: &GracefulShutdown,
        open: mpsc::Sender<()>,
        load: Load,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let builder = Arc::new(self.builder());
        loop {
            while load.busier_than_the_rest() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                    _ = crate::stopped(&mut shutdown) => return,
                }
            }
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
            let Timeouts { idle: idle_timeout, send: send_timeout, .. } = self.timeouts;
            let open = (open.clone(), load.opened());
            let mut stopping = shutdown.clone();
            tokio::spawn(async move {
                let _open = open;
                let scheme = if tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP };
                let client = crate::proxy::Client::new(peer, scheme);
                let mut stream = SendTimeout::new(stream, send_timeout);
                let prefix = match tls {
                    None => match fast::serve(&proxy, &mut stream, &client, idle_timeout, &mut stopping).await {
                        fast::Handoff::Closed => return,
                        fast::Handoff::Hyper(prefix) => prefix,
                    },
                    Some(_) => Vec::new(),
                };
                let started = Arc::new(AtomicBool::new(!prefix.is_empty()));
                let service = {
                    let started = started.clone();
                    service_fn(move |req| {
                        started.store(true, Ordering::Relaxed);
                        let proxy = proxy.clone();
                        let client = client.clone();
                        async move { Ok::<_, Infallible>(proxy.handle(req, &client).await) }
                    })
                };
                let conn = match tls {
                    None => Either::Left(
                        watcher.watch(
                            builder
                                .serve_connection_with_upgrades(TokioIo::new(Prefixed::new(prefix, stream)), service)
                                .into_owned(),
                        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_more_than_one_connection_ahead_leaves_new_ones_to_the_others() {
        let counts: Arc<[AtomicUsize]> = (0..2).map(|_| AtomicUsize::new(0)).collect();
        let (first, second) = (Load { counts: counts.clone(), index: 0 }, Load { counts, index: 1 });
        let a = first.opened();
        assert!(!first.busier_than_the_rest(), "one ahead still accepts");
        let b = first.opened();
        assert!(first.busier_than_the_rest());
        assert!(!second.busier_than_the_rest());
        let c = second.opened();
        assert!(!first.busier_than_the_rest());
        drop((a, b, c));
        assert!(!first.busier_than_the_rest() && !second.busier_than_the_rest());
    }
}
