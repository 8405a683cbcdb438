//! The Stagely webhook receiver: verifies GitHub webhooks and turns pull request events into Environment objects.
//!
//! For now it parses its configuration, logs with `tracing`, and serves `/healthz` and
//! `/metrics` on its operations address.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use clap::Parser;
use stagely_api::ops;
use tokio::net::TcpListener;

/// Command-line and environment configuration.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "stagely-webhook-receiver",
    version,
    about = "Stagely webhook receiver: GitHub webhooks to Environments"
)]
pub struct Config {
    /// Address of the operations endpoints (`/healthz`, `/metrics`).
    #[arg(long, env = "STAGELY_OPS_ADDR", default_value = "0.0.0.0:9090")]
    pub ops_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "STAGELY_LOG_FORMAT", value_enum, default_value_t = ops::LogFormat::Text)]
    pub log_format: ops::LogFormat,
}

/// What can stop the webhook receiver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operations address could not be bound.
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

/// Runs the webhook receiver until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), Error> {
    let listener =
        TcpListener::bind(config.ops_addr).await.map_err(|source| Error::Listen { addr: config.ops_addr, source })?;
    tracing::info!(addr = %config.ops_addr, version = env!("CARGO_PKG_VERSION"), "stagely-webhook-receiver started");
    serve(listener, ops::shutdown_signal()).await?;
    tracing::info!("stagely-webhook-receiver stopped");
    Ok(())
}

/// Serves the operations endpoints on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    let router = ops::router(ops::Metrics::new("stagely_webhook", env!("CARGO_PKG_VERSION")));
    ops::serve(listener, router, shutdown).await.map_err(Error::Serve)
}
