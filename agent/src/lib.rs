//! The Stagely agent: runs on every builder and preview VM, holds one WebSocket to the operator's
//! gateway, and builds, deploys and terminates with the container engine.
//!
//! [`config`] reads `/etc/stagely/agent.json`; [`connection`] speaks the protocol and
//! reconnects, with the session credential [`session`] keeps across restarts; [`executor`] runs
//! each job once, streaming masked output ([`mask`]) through the bounded [`outbox`]; [`build`],
//! [`compose`], [`testrun`] and [`git`] are the jobs themselves.

#![forbid(unsafe_code)]

pub mod build;
pub mod compose;
pub mod config;
pub mod connection;
pub mod executor;
pub mod git;
pub mod mask;
pub mod outbox;
pub mod session;
pub mod testrun;

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use stagely_api::ops;

/// Command-line configuration; the rest is in the file and the environment (see
/// [`config::ENV_VARS`]).
#[derive(Parser, Debug, Clone)]
#[command(name = "stagely-agent", version, about = "Stagely agent: builds and runs previews on its VM")]
pub struct Cli {
    /// The configuration file cloud-init writes (`/etc/stagely/agent.json`).
    #[arg(long, env = "STAGELY_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address of the operations endpoints (`/healthz`, `/metrics`); overrides `ops_addr` in
    /// the file (default `127.0.0.1:9101`).
    #[arg(long, env = "STAGELY_OPS_ADDR")]
    pub ops_addr: Option<SocketAddr>,

    /// Log format.
    #[arg(long, env = "STAGELY_LOG_FORMAT", value_enum, default_value_t = ops::LogFormat::Text)]
    pub log_format: ops::LogFormat,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The work directory could not be created.
    #[error("failed to create the work directory {path}: {source}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The operations server failed.
    #[error(transparent)]
    Serve(#[from] ops::ServeError),
    /// The connection cannot be made at all.
    #[error(transparent)]
    Connection(#[from] connection::ConnectionError),
}

/// This binary's metrics.
pub fn metrics() -> ops::Metrics {
    ops::Metrics::new("stagely_agent", env!("CARGO_PKG_VERSION"))
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(cli: Cli) -> Result<(), RunError> {
    let config = Arc::new(config::AgentConfig::load(cli.config.as_deref())?);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.work_dir)
        .map_err(|source| RunError::WorkDir { path: config.work_dir.clone(), source })?;
    tracing::info!(
        agent_id = %config.agent_id,
        gateway = %config.gateway_url,
        engine = config.engine.program(),
        role = ?config.role,
        version = env!("CARGO_PKG_VERSION"),
        "stagely-agent started"
    );
    let outbox = outbox::Outbox::default();
    let executor = executor::Executor::new(executor::Context::new(config.clone(), outbox.clone()));
    let (connected, connected_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(connection::shutdown_watchdog(
        connected_rx,
        config.disconnect_shutdown,
        config.shutdown_command.clone(),
    ));
    let connection = connection::Connection::new(config.clone(), executor, outbox, connected);
    tokio::select! {
        served = ops::serve_until_signal(cli.ops_addr.unwrap_or(config.ops_addr), ops::router(metrics())) => served?,
        connected = connection.run() => connected?,
    }
    tracing::info!("stagely-agent stopped");
    Ok(())
}
