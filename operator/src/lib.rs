//! The Stagely operator: the kube-rs controllers (Project, CloudProvider, Environment, BuildJob), the
//! cloud providers, the agent gateway and the reaper.
//!
//! For now it parses its configuration, logs with `tracing`, and serves `/healthz` and
//! `/metrics` on its operations address.

#![forbid(unsafe_code)]

pub mod controllers;
pub mod gateway;
pub mod providers;

use std::net::SocketAddr;

use clap::Parser;
use stagely_api::ops;

/// Command-line and environment configuration.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "stagely-operator",
    version,
    about = "Stagely operator: controllers, cloud providers and the agent gateway"
)]
pub struct Config {
    /// Address of the operations endpoints (`/healthz`, `/metrics`).
    #[arg(long, env = "STAGELY_OPS_ADDR", default_value = "0.0.0.0:8080")]
    pub ops_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "STAGELY_LOG_FORMAT", value_enum, default_value_t = ops::LogFormat::Text)]
    pub log_format: ops::LogFormat,
}

/// This binary's metrics.
pub fn metrics() -> ops::Metrics {
    ops::Metrics::new("stagely_operator", env!("CARGO_PKG_VERSION"))
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), ops::ServeError> {
    tracing::info!(addr = %config.ops_addr, version = env!("CARGO_PKG_VERSION"), "stagely-operator started");
    ops::serve_until_signal(config.ops_addr, metrics()).await?;
    tracing::info!("stagely-operator stopped");
    Ok(())
}
