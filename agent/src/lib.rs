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

    /// Instead of connecting, stop every deployment in the work directory and delete its
    /// secrets (what TERMINATE does), then exit: the `local` provider's "VM" is the agent
    /// process, and its containers would outlive it.
    #[arg(long)]
    pub teardown: bool,
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
    /// `--teardown` left deployments running.
    #[error("teardown failed: {0}")]
    Teardown(#[source] executor::JobError),
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

/// `--teardown`: stops every deployment under the work directory and deletes its secrets, as
/// TERMINATE does, with the job's lines on standard error. Without a gateway: what terminating a
/// `local` instance runs after the agent process has stopped.
pub async fn teardown(cli: Cli) -> Result<(), RunError> {
    let config = Arc::new(config::AgentConfig::load(cli.config.as_deref())?);
    let outbox = outbox::Outbox::default();
    let ctx = executor::Context::new(config, outbox.clone());
    let log = executor::JobLog::new("teardown", &ctx);
    let terminate = stagely_api::protocol::Terminate {
        job_id: "teardown".into(),
        reason: "instance terminated".into(),
        // As a VM's shutdown: the services get a moment to stop, not the preview's grace period
        // (the operator's TERMINATE gave them that, if the agent was there to get it).
        grace_period_seconds: TEARDOWN_GRACE_SECS,
    };
    let done = compose::terminate(&ctx, &log, &terminate).await;
    while let Some(message) = outbox.try_recv() {
        if let stagely_api::protocol::Message::Log(line) = message {
            eprintln!("{}", line.data);
        }
    }
    done.map(|_| ()).map_err(RunError::Teardown)
}

/// Seconds the services get to stop in `--teardown`.
const TEARDOWN_GRACE_SECS: u32 = 5;
