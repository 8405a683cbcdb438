//! The Stagely webhook receiver: verifies GitHub webhooks and turns pull request events into
//! Environment objects.
//!
//! A delivery is answered at once ([`server`]): verified against the webhook secrets of the
//! Projects bound to its repository ([`cache`], kept by watches and reads of the referenced
//! Secrets), deduplicated ([`deliveries`]), decided ([`plan`]) and queued ([`queue`]). Workers
//! then write the Environments ([`writer`]), with retries, in the background. `/healthz`,
//! `/readyz` and `/metrics` are served on the operations address.

#![forbid(unsafe_code)]

pub mod cache;
pub mod deliveries;
pub mod github;
pub mod metrics;
pub mod plan;
pub mod queue;
pub mod server;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use stagely_api::ops;
use tokio::net::TcpListener;

use crate::cache::{Cache, SecretSource};
use crate::deliveries::Deliveries;
use crate::metrics::WebhookMetrics;
use crate::queue::Queue;
use crate::server::Receiver;
use crate::writer::{Writer, WriterSettings};

/// Command-line and environment configuration.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "stagely-webhook-receiver",
    version,
    about = "Stagely webhook receiver: GitHub webhooks to Environments"
)]
pub struct Config {
    /// Address GitHub's webhooks are received on (`POST /v1/webhooks/github`).
    #[arg(long, env = "STAGELY_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// Address of the operations endpoints (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "STAGELY_OPS_ADDR", default_value = "0.0.0.0:9090")]
    pub ops_addr: SocketAddr,

    /// The largest webhook body accepted, in bytes; a larger one gets 413 (GitHub caps
    /// payloads at 25 MB, and pull request payloads are tens of KiB).
    #[arg(long, env = "STAGELY_MAX_BODY_BYTES", default_value_t = 5 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Workers writing Environments after the answer, each on one pull request at a time.
    #[arg(long, env = "STAGELY_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Pull requests whose Environment may wait to be written; past that a new one's delivery
    /// gets 503 with Retry-After.
    #[arg(long, env = "STAGELY_QUEUE_CAPACITY", default_value_t = 10_000)]
    pub queue_capacity: usize,

    /// Delivery ids remembered to answer redeliveries without doing the work twice (the
    /// Environment also records the delivery that last applied it).
    #[arg(long, env = "STAGELY_DELIVERIES_REMEMBERED", default_value_t = 50_000)]
    pub deliveries_remembered: usize,

    /// Least milliseconds between two writes of one pull request's Environment; deliveries
    /// meanwhile coalesce into the newest. Each wait is up to a quarter longer, at random, so
    /// that pull requests written together once are not written together ever after.
    #[arg(long, env = "STAGELY_MIN_WRITE_INTERVAL_MS", default_value_t = 1000)]
    pub min_write_interval_ms: u64,

    /// Seconds each apiserver call of a worker may take before it is retried.
    #[arg(long, env = "STAGELY_CALL_TIMEOUT_SECS", default_value_t = 10)]
    pub call_timeout_secs: u64,

    /// Seconds a failing write is retried (with backoff) before it is dropped; a redelivery from
    /// GitHub then tries again.
    #[arg(long, env = "STAGELY_GIVE_UP_AFTER_SECS", default_value_t = 900)]
    pub give_up_after_secs: u64,

    /// Seconds queued writes get to finish on shutdown, once no delivery is accepted any more.
    #[arg(long, env = "STAGELY_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,

    /// `<namespace>/<name>` of the Secret the operator keeps every Project's webhook secret in
    /// (the operator's `--webhook-secrets`): the receiver then reads that Secret alone. Unset: it
    /// reads the Projects' credentials Secrets itself, which needs a grant to read every Secret
    /// in the teams' namespaces.
    #[arg(long, env = "STAGELY_WEBHOOK_SECRETS")]
    pub webhook_secrets: Option<stagely_api::webhook_secrets::SecretLocation>,

    /// Log format.
    #[arg(long, env = "STAGELY_LOG_FORMAT", value_enum, default_value_t = ops::LogFormat::Text)]
    pub log_format: ops::LogFormat,
}

/// What can stop the receiver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Kubernetes client.
    #[error("failed to create a Kubernetes client: {0}")]
    Kube(#[source] kube::Error),
    /// An address could not be bound.
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("failed to serve: {0}")]
    Serve(#[source] std::io::Error),
}

/// The sockets the receiver serves on.
pub struct Listeners {
    /// Webhooks.
    pub webhooks: TcpListener,
    /// `/healthz`, `/readyz` and `/metrics`.
    pub ops: TcpListener,
}

impl Listeners {
    /// Binds the addresses `config` names.
    pub async fn bind(config: &Config) -> Result<Self, Error> {
        async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
            TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })
        }
        Ok(Self { webhooks: bind(config.listen_addr).await?, ops: bind(config.ops_addr).await? })
    }
}

/// This binary's metrics: the registry and the receiver's own metrics in it.
pub fn metrics() -> (ops::Metrics, WebhookMetrics) {
    let metrics = WebhookMetrics::default();
    let registry =
        ops::Metrics::with("stagely_webhook", env!("CARGO_PKG_VERSION"), |registry| metrics.register(registry));
    (registry, metrics)
}

/// Runs the webhook receiver until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), Error> {
    // kube's rustls needs a process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await.map_err(Error::Kube)?;
    let listeners = Listeners::bind(&config).await?;
    serve(config, client, listeners, ops::shutdown_signal()).await
}

/// Serves on `listeners` with `client` until `shutdown` completes, then gives queued writes up
/// to the shutdown grace period to finish.
pub async fn serve(
    config: Config,
    client: kube::Client,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (registry, metrics) = metrics();
    let source = match config.webhook_secrets.clone() {
        Some(location) => SecretSource::Mirror(location),
        None => SecretSource::Direct,
    };
    let (cache, watches) = Cache::start(client.clone(), source);
    let queue = Arc::new(Queue::new(config.queue_capacity));
    let deliveries = Arc::new(Deliveries::new(config.deliveries_remembered));
    let writer = Writer::new(
        client,
        queue.clone(),
        deliveries.clone(),
        metrics.clone(),
        WriterSettings {
            workers: config.workers,
            call_timeout: Duration::from_secs(config.call_timeout_secs.max(1)),
            give_up_after: Duration::from_secs(config.give_up_after_secs),
            min_interval: Duration::from_millis(config.min_write_interval_ms),
        },
    );
    let receiver = Arc::new(Receiver {
        cache: cache.clone(),
        deliveries,
        queue: queue.clone(),
        metrics,
        max_body_bytes: config.max_body_bytes,
    });
    let mut background = tokio::task::JoinSet::new();
    background.spawn(watches);
    background.spawn(writer.run());

    let ops_router = ops::router_with(
        registry,
        ops::Readiness::when(move || {
            if cache.is_ready() { Ok(()) } else { Err("the Project and Secret caches are not ready yet".to_owned()) }
        }),
    );
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stopping = stopping.clone();
        async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    tracing::info!(
        addr = %config.listen_addr,
        ops_addr = %config.ops_addr,
        version = env!("CARGO_PKG_VERSION"),
        "stagely-webhook-receiver started"
    );
    let webhooks = ops::serve(listeners.webhooks, server::router(receiver), stopped());
    let ops = ops::serve(listeners.ops, ops_router, stopped());
    tokio::try_join!(webhooks, ops).map_err(Error::Serve)?;

    let grace = Duration::from_secs(config.shutdown_grace_secs);
    if tokio::time::timeout(grace, queue.drained()).await.is_err() {
        tracing::warn!(
            pending = queue.len(),
            "stopped with writes still queued after {grace:?}; their deliveries are lost unless redelivered"
        );
    }
    background.shutdown().await;
    tracing::info!("stagely-webhook-receiver stopped");
    Ok(())
}
