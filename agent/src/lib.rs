//! The Stagely agent: runs on every builder and preview VM, holds one WebSocket to the operator's
//! gateway, and builds, deploys and terminates with the container engine.
//!
//! For now it parses its configuration, logs with `tracing`, and serves `/healthz` and
//! `/metrics` on its operations address.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use clap::Parser;
use stagely_api::ops;

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

/// This binary's metrics.
pub fn metrics() -> ops::Metrics {
    ops::Metrics::new("stagely_agent", env!("CARGO_PKG_VERSION"))
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), ops::ServeError> {
    tracing::info!(addr = %config.ops_addr, version = env!("CARGO_PKG_VERSION"), "stagely-agent started");
    ops::serve_until_signal(config.ops_addr, metrics()).await?;
    tracing::info!("stagely-agent stopped");
    Ok(())
}
