//! The Stagely edge proxy: serves `<hash>.<preview-domain>` from the Redis route table.
//!
//! A request's host names an environment; its route record (cached in process, invalidated
//! through Redis) says whether to show the "Building…" page or to proxy to the preview VM.
//! See [`proxy`] for the per-request path, [`fast`] for its lean HTTP/1.1 form, [`routes`] for
//! the cache; certificates are served and reloaded by [`stagely_api::tls`].

#![forbid(unsafe_code)]

pub mod fast;
mod headers;
pub mod metrics;
pub mod pages;
pub mod proxy;
pub mod ratelimit;
pub mod routes;
pub mod send_timeout;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use stagely_api::ops;
use stagely_api::tls::{self, CertStore};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::ProxyMetrics;
use crate::routes::{RouteTable, RouteTableConfig};

/// Command-line and environment configuration.
#[derive(Parser, Debug, Clone)]
#[command(name = "stagely-edge-proxy", version, about = "Stagely edge proxy: preview URLs to preview VMs")]
pub struct Config {
    /// The preview domain: requests for `<hash>.<domain>` are routed.
    #[arg(long, env = "STAGELY_PREVIEW_DOMAIN")]
    pub domain: String,

    /// Redis holding the route table.
    #[arg(long, env = "STAGELY_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Plain-HTTP listener (omit to serve HTTPS only).
    #[arg(long, env = "STAGELY_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// HTTPS listener; needs `--tls-cert` and `--tls-key`.
    #[arg(long, env = "STAGELY_HTTPS_ADDR", requires_all = ["tls_cert", "tls_key"])]
    pub https_addr: Option<SocketAddr>,

    /// PEM certificate chain for `*.<domain>`; reread when it changes.
    #[arg(long, env = "STAGELY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the certificate.
    #[arg(long, env = "STAGELY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Seconds between checks of the certificate files.
    #[arg(long, env = "STAGELY_TLS_RELOAD_SECS", default_value_t = 5)]
    pub tls_reload_secs: u64,

    /// Address of the operations endpoints (`/healthz`, `/metrics`).
    #[arg(long, env = "STAGELY_OPS_ADDR", default_value = "0.0.0.0:9090")]
    pub ops_addr: SocketAddr,

    /// Requests per second allowed per environment before 429 (0: unlimited).
    #[arg(long, env = "STAGELY_RATE_LIMIT", default_value_t = 1000)]
    pub rate_limit: u32,

    /// Seconds an app has to send response headers before the request gets 502.
    #[arg(long, env = "STAGELY_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,

    /// Seconds to connect to an app.
    #[arg(long, env = "STAGELY_CONNECT_TIMEOUT_SECS", default_value_t = 5)]
    pub connect_timeout_secs: u64,

    /// Seconds a client connection may stay idle.
    #[arg(long, env = "STAGELY_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    pub idle_timeout_secs: u64,

    /// Seconds a client may take to accept more of a response before its connection (and the
    /// app's behind it) is closed.
    #[arg(long, env = "STAGELY_SEND_TIMEOUT_SECS", default_value_t = 60)]
    pub send_timeout_secs: u64,

    /// Seconds a cached route lives without an invalidation (a backstop).
    #[arg(long, env = "STAGELY_ROUTE_TTL_SECS", default_value_t = 60)]
    pub route_ttl_secs: u64,

    /// Worker threads serving requests (0: one per CPU).
    #[arg(long, env = "STAGELY_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Seconds in-flight requests get to finish on shutdown.
    #[arg(long, env = "STAGELY_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,

    /// Log format.
    #[arg(long, env = "STAGELY_LOG_FORMAT", value_enum, default_value_t = ops::LogFormat::Text)]
    pub log_format: ops::LogFormat,
}

/// What can stop the edge proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither listener was configured.
    #[error("nothing to serve: give --http-addr, or --https-addr with --tls-cert and --tls-key")]
    NoListener,
    /// An address could not be bound.
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The Redis URL is malformed.
    #[error("invalid --redis-url: {0}")]
    RedisUrl(#[source] redis::RedisError),
    /// The certificate could not be loaded at startup.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Serving failed.
    #[error("failed to serve: {0}")]
    Serve(#[source] std::io::Error),
}

/// The sockets the proxy serves on.
pub struct Listeners {
    /// Plain HTTP.
    pub http: Option<TcpListener>,
    /// HTTPS.
    pub https: Option<TcpListener>,
    /// `/healthz` and `/metrics`.
    pub ops: TcpListener,
}

impl Listeners {
    /// Binds the addresses `config` names.
    pub async fn bind(config: &Config) -> Result<Self, Error> {
        async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
            TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })
        }
        let http = match config.http_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let https = match config.https_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Self { http, https, ops: bind(config.ops_addr).await? })
    }
}

/// Runs the proxy until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), Error> {
    let listeners = Listeners::bind(&config).await?;
    serve(config, listeners, ops::shutdown_signal()).await
}

/// Serves on `listeners` until `shutdown` completes, then drains connections for up to the
/// configured grace period.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    if listeners.http.is_none() && listeners.https.is_none() {
        return Err(Error::NoListener);
    }
    let metrics = ProxyMetrics::default();
    let registry =
        ops::Metrics::with("stagely_edge_proxy", env!("CARGO_PKG_VERSION"), |registry| metrics.register(registry));
    let (stop, stopping) = watch::channel(false);

    let redis = redis::Client::open(config.redis_url.as_str()).map_err(Error::RedisUrl)?;
    let routes = Arc::new(RouteTable::new(
        redis,
        RouteTableConfig {
            ttl: Duration::from_secs(config.route_ttl_secs),
            negative_ttl: Duration::from_secs(config.route_ttl_secs.min(5)),
            rate_limit: config.rate_limit,
            redis_timeout: Duration::from_millis(500),
        },
        metrics.clone(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(routes.clone().follow_invalidations(stopping.clone()));

    let make_proxy = {
        let (domain, metrics) = (config.domain.clone(), metrics.clone());
        let connect_timeout = Duration::from_secs(config.connect_timeout_secs);
        let request_timeout = Duration::from_secs(config.request_timeout_secs);
        move || proxy::Proxy::new(&domain, routes.clone(), connect_timeout, request_timeout, metrics.clone())
    };
    let mut sockets = Vec::new();
    if let Some(http) = listeners.http {
        tracing::info!(addr = ?http.local_addr().ok(), "serving HTTP");
        sockets.push((http.into_std().map_err(Error::Serve)?, None));
    }
    if let Some(https) = listeners.https {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else { return Err(Error::NoListener) };
        let store = Arc::new(CertStore::load(cert, key)?);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(store.clone().server_config(&[b"h2", b"http/1.1"])));
        let reload_errors = metrics.tls_reload_errors.clone();
        let failed = move |_: &tls::TlsError| {
            reload_errors.inc();
        };
        tasks.spawn(store.watch(Duration::from_secs(config.tls_reload_secs.max(1)), failed, stopping.clone()));
        tracing::info!(addr = ?https.local_addr().ok(), "serving HTTPS");
        sockets.push((https.into_std().map_err(Error::Serve)?, Some(acceptor)));
    }
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let timeouts = server::Timeouts {
        idle: Duration::from_secs(config.idle_timeout_secs),
        send: Duration::from_secs(config.send_timeout_secs),
        grace: Duration::from_secs(config.shutdown_grace_secs),
    };
    let workers =
        server::spawn_workers(threads, sockets, make_proxy, timeouts, stopping.clone()).map_err(Error::Serve)?;
    let mut ops_stopping = stopping.clone();
    let ops_server = tokio::spawn(ops::serve(listeners.ops, ops::router(registry), async move {
        stopped(&mut ops_stopping).await;
    }));

    tracing::info!(domain = %config.domain, version = env!("CARGO_PKG_VERSION"), "stagely-edge-proxy started");
    shutdown.await;
    let _ = stop.send(true);
    // Workers stop accepting, then let in-flight requests finish.
    for worker in workers {
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }
    while tasks.join_next().await.is_some() {}
    ops_server.await.map_err(|err| Error::Serve(std::io::Error::other(err)))?.map_err(Error::Serve)?;
    tracing::info!("stagely-edge-proxy stopped");
    Ok(())
}

/// Completes once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
