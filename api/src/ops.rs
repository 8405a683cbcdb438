//! What every Stagely binary does the same way: operations endpoints (`/healthz`, `/readyz`,
//! `/metrics`), logging setup and the shutdown signal.
//!
//! Behind the `ops` feature, so that the API types stay free of I/O for whoever needs only
//! them (the CRD generator, tests); each binary enables it.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global `tracing` subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The Prometheus registry and the metrics registered in it.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
}

impl Metrics {
    /// A registry under `prefix`, holding `<prefix>_build_info{version}` = 1.
    pub fn new(prefix: &str, version: &str) -> Self {
        Self::with(prefix, version, |_| {})
    }

    /// Like [`Metrics::new`], with the component's own metrics added by `register`.
    pub fn with(prefix: &str, version: &str, register: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        register(&mut registry);
        let build_info = Family::<Vec<(String, String)>, Gauge>::default();
        build_info.get_or_create(&vec![("version".to_owned(), version.to_owned())]).set(1);
        registry.register("build_info", "Build information; always 1", build_info);
        Self { registry: Arc::new(registry) }
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Whether a binary should get traffic now, as `/readyz` tells Kubernetes: `/healthz` says the
/// process lives, `/readyz` that a Service may route to it (the webhook receiver once its caches
/// have listed, the operator while it holds the leader Lease). Cheap to clone; asked on every
/// `/readyz`, so the check must not block.
#[derive(Clone)]
pub struct Readiness(Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl Readiness {
    /// Always ready: for binaries that can take traffic as soon as they serve.
    pub fn always() -> Self {
        Self(Arc::new(|| Ok(())))
    }

    /// Ready when `check` says so; its `Err` is the 503's body, saying why not.
    pub fn when(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(check))
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        (self.0)()
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Readiness").field(&self.check()).finish()
    }
}

/// `/healthz`, `/readyz` (always ready) and `/metrics`.
pub fn router(metrics: Metrics) -> Router {
    router_with(metrics, Readiness::always())
}

/// `/healthz`, `/readyz` answering from `readiness` (200, or 503 with the reason) and `/metrics`.
pub fn router_with(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(move || serve_readiness(readiness.clone())))
        .route("/metrics", get(serve_metrics))
        .with_state(metrics)
}

async fn serve_readiness(readiness: Readiness) -> impl IntoResponse {
    match readiness.check() {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn serve_metrics(State(metrics): State<Metrics>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes in-flight requests.
///
/// Every connection gets `TCP_NODELAY`: an answer goes out when written, not held back by
/// Nagle's algorithm until the client acknowledges the previous one (up to its delayed-ACK
/// timeout, 40 ms on Linux) — the webhook receiver's ack latency tail.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|connection| {
        if let Err(error) = connection.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Why a binary's operations server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("failed to serve: {0}")]
    Serve(#[source] std::io::Error),
}

/// Binds `addr` and serves `router` (see [`router`] and [`router_with`]) until SIGTERM or Ctrl-C.
pub async fn serve_until_signal(addr: std::net::SocketAddr, router: Router) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr, source })?;
    serve(listener, router, shutdown_signal()).await.map_err(ServeError::Serve)
}
