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

    /// The agent gateway.
    #[command(flatten)]
    pub gateway: gateway::GatewayConfig,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The operations server failed.
    #[error(transparent)]
    Ops(#[from] ops::ServeError),
    /// No Kubernetes client.
    #[error("failed to create a Kubernetes client: {0}")]
    Kube(#[source] kube::Error),
    /// The agent gateway could not start or failed.
    #[error(transparent)]
    Gateway(#[from] gateway::ConfigError),
    /// The agent gateway's address could not be bound.
    #[error("failed to listen on {addr} for the agent gateway: {source}")]
    GatewayListen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// This binary's metrics.
pub fn metrics() -> ops::Metrics {
    ops::Metrics::new("stagely_operator", env!("CARGO_PKG_VERSION"))
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), RunError> {
    // kube's rustls needs a process-wide provider; the AWS SDK compiles in a second one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await.map_err(RunError::Kube)?;
    let gateway = config.gateway.build(client).await?;
    let addr = config.gateway.gateway_addr;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::GatewayListen { addr, source })?;
    tracing::info!(addr = %config.ops_addr, gateway_addr = %addr, version = env!("CARGO_PKG_VERSION"), "stagely-operator started");
    let serve_gateway =
        async { gateway.serve(listener, ops::shutdown_signal()).await.map_err(|err| RunError::Gateway(err.into())) };
    let serve_ops = async { ops::serve_until_signal(config.ops_addr, metrics()).await.map_err(RunError::from) };
    tokio::try_join!(serve_ops, serve_gateway)?;
    tracing::info!("stagely-operator stopped");
    Ok(())
}
