//! The Stagely operator: the kube-rs controllers (Project, CloudProvider, Environment, BuildJob), the
//! cloud providers, the agent gateway and the reaper.
//!
//! It runs the CloudProvider controller and the agent gateway, and serves `/healthz` and
//! `/metrics` on its operations address.

#![forbid(unsafe_code)]

pub mod controllers;
pub mod gateway;
pub mod metrics;
pub mod providers;
pub mod registry;
pub mod routes;
pub mod source;

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

    /// Where the clouds are, and how local agents run.
    #[command(flatten)]
    pub clouds: CloudsConfig,
}

/// Cloud endpoints and the `local` provider's settings.
#[derive(clap::Args, Debug, Clone)]
pub struct CloudsConfig {
    /// Another EC2 endpoint, for API-compatible services (tests use moto).
    #[arg(long, env = "STAGELY_AWS_ENDPOINT")]
    pub aws_endpoint: Option<String>,

    /// Another DigitalOcean API base URL.
    #[arg(long, env = "STAGELY_DIGITALOCEAN_ENDPOINT")]
    pub digitalocean_endpoint: Option<String>,

    /// Another Hetzner Cloud API base URL.
    #[arg(long, env = "STAGELY_HETZNER_ENDPOINT")]
    pub hetzner_endpoint: Option<String>,

    /// The agent binary `local` CloudProviders start.
    #[arg(long, env = "STAGELY_LOCAL_AGENT_BIN", default_value = "/usr/local/bin/stagely-agent")]
    pub local_agent_bin: std::path::PathBuf,

    /// Where `local` CloudProviders keep their agents' state.
    #[arg(long, env = "STAGELY_LOCAL_STATE_DIR", default_value = "/var/lib/stagely/local")]
    pub local_state_dir: std::path::PathBuf,
}

impl CloudsConfig {
    /// The endpoints the controllers use.
    pub fn endpoints(&self) -> providers::account::Endpoints {
        providers::account::Endpoints {
            aws: self.aws_endpoint.clone(),
            digitalocean: self.digitalocean_endpoint.clone(),
            hetzner: self.hetzner_endpoint.clone(),
            local_agent_bin: self.local_agent_bin.clone(),
            local_state_dir: self.local_state_dir.clone(),
            local_env: Default::default(),
        }
    }
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
    let gateway = config.gateway.build(client.clone()).await?;
    let cloud_providers = controllers::cloudprovider::Context::new(client, config.clouds.endpoints());
    let addr = config.gateway.gateway_addr;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::GatewayListen { addr, source })?;
    tracing::info!(addr = %config.ops_addr, gateway_addr = %addr, version = env!("CARGO_PKG_VERSION"), "stagely-operator started");
    let serve_gateway =
        async { gateway.serve(listener, ops::shutdown_signal()).await.map_err(|err| RunError::Gateway(err.into())) };
    let serve_ops = async { ops::serve_until_signal(config.ops_addr, metrics()).await.map_err(RunError::from) };
    let run_controllers = async {
        controllers::cloudprovider::run(std::sync::Arc::new(cloud_providers), ops::shutdown_signal()).await;
        Ok(())
    };
    tokio::try_join!(serve_ops, serve_gateway, run_controllers)?;
    tracing::info!("stagely-operator stopped");
    Ok(())
}
