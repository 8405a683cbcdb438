//! The Stagely agent: runs on every builder and preview VM, holds one WebSocket to the operator's gateway, and builds, deploys and terminates with the container engine.
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
#[command(name = "stagely-agent", version, about = "Stagely agent: builds and runs previews on its VM")]
pub struct Config {
    /// Address of the operations endpoints (`/healthz`, `/metrics`).
    #[arg(long, env = "STAGELY_OPS_ADDR", default_value = "127.0.0.1:9101")]
    pub ops_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "STAGELY_LOG_FORMAT", value_enum, default_value_t = ops::LogFormat::Text)]
    pub log_format: ops::LogFormat,
}

/// What can stop the agent.
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

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), Error> {
    let listener =
        TcpListener::bind(config.ops_addr).await.map_err(|source| Error::Listen { addr: config.ops_addr, source })?;
    tracing::info!(addr = %config.ops_addr, version = env!("CARGO_PKG_VERSION"), "stagely-agent started");
    serve(listener, ops::shutdown_signal()).await?;
    tracing::info!("stagely-agent stopped");
    Ok(())
}

/// Serves the operations endpoints on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    let router = ops::router(ops::Metrics::new("stagely_agent", env!("CARGO_PKG_VERSION")));
    ops::serve(listener, router, shutdown).await.map_err(Error::Serve)
}
