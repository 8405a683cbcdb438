//! The Stagely operator: the kube-rs controllers (Project, CloudProvider, Environment, BuildJob), the
//! cloud providers, the agent gateway and the reaper.
//!
//! It serves `/healthz`, `/readyz` and `/metrics` on its operations address; the replica that
//! holds the leader Lease ([`leader`]) runs the controllers and the agent gateway, and is the one
//! ready.

#![forbid(unsafe_code)]

pub mod agents;
pub mod controllers;
pub mod gateway;
pub mod github;
pub mod leader;
pub mod metrics;
pub mod providers;
pub mod reaper;
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
    /// Address of the operations endpoints (`/healthz`, `/readyz`, `/metrics`).
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

    /// The image registry.
    #[command(flatten)]
    pub registry: registry::RegistryConfig,

    /// How the pipeline reaches code and VMs.
    #[command(flatten)]
    pub pipeline: PipelineConfig,

    /// GitHub.
    #[command(flatten)]
    pub github: GitHubConfig,

    /// The reaper and the orphan sweep.
    #[command(flatten)]
    pub reaper: reaper::ReaperConfig,

    /// Which replica acts.
    #[command(flatten)]
    pub leader: leader::LeaderConfig,
}

/// How the operator reaches GitHub.
#[derive(clap::Args, Debug, Clone)]
pub struct GitHubConfig {
    /// GitHub's REST API: `https://api.github.com`, or a GitHub Enterprise Server's
    /// `https://<host>/api/v3`. Projects without `spec.cloneUrl` read stagely.yaml through it and
    /// get feedback (Deployments, one comment) on their pull requests. `off`: the operator never
    /// calls GitHub (code is read with git, pull requests get no feedback, credentials are not
    /// checked), as in the demo.
    #[arg(long, env = "STAGELY_GITHUB_API_URL", default_value = github::DEFAULT_API_URL)]
    pub github_api_url: String,

    /// Seconds between two resyncs of a Project's open pull requests with its Environments
    /// (webhooks are the fast path; the resync finds what lost webhooks missed).
    #[arg(long, env = "STAGELY_GITHUB_RESYNC_SECS", default_value_t = 300)]
    pub github_resync_secs: u64,

    /// `<namespace>/<name>` of a Secret the operator keeps every Project's webhook secret in
    /// (one key per credentials Secret, `<namespace>_<name>`), so that the webhook receiver,
    /// given the same flag, reads that Secret alone and needs no grant on the teams' Secrets.
    /// Unset: none is kept, and the receiver reads the credentials Secrets itself.
    #[arg(long, env = "STAGELY_WEBHOOK_SECRETS")]
    pub webhook_secrets: Option<stagely_api::webhook_secrets::SecretLocation>,
}

impl GitHubConfig {
    /// The GitHub client, unless GitHub is `off`.
    pub fn client(&self, metrics: github::GitHubMetrics) -> Option<std::sync::Arc<github::GitHub>> {
        let url = self.github_api_url.trim();
        if url.is_empty() || url.eq_ignore_ascii_case("off") {
            tracing::info!("GitHub is off (--github-api-url off): no pull request feedback, code read with git");
            return None;
        }
        Some(std::sync::Arc::new(github::GitHub::new(url, metrics)))
    }
}

/// How the pipeline reads code and starts agents.
#[derive(clap::Args, Debug, Clone)]
pub struct PipelineConfig {
    /// The WebSocket URL new VMs' agents connect to, e.g. `wss://agents.stagely.example.com/v1/agent/connect`
    /// (default: the gateway address on loopback, `wss://` when it serves TLS, right only for
    /// the `local` provider). Cloud VMs' agents refuse a plain `ws://` URL.
    #[arg(long, env = "STAGELY_AGENT_GATEWAY_URL")]
    pub agent_gateway_url: Option<String>,

    /// PEM file of the CA certificate(s) the gateway's certificate chains to (e.g. a mounted
    /// cert-manager Secret's `ca.crt`): handed to every new VM in its cloud-init, and its agent then
    /// trusts no other CA. Read again for each VM. Without it, agents trust their system's roots.
    #[arg(long, env = "STAGELY_AGENT_GATEWAY_CA_FILE")]
    pub agent_gateway_ca_file: Option<std::path::PathBuf>,

    /// The agent binaries the operator carries and serves to VMs over the gateway's address
    /// (`/v1/agent/download/linux-amd64`, with its SHA-256): `stagely-agent-linux-amd64` and
    /// `stagely-agent-linux-arm64`. The operator image carries both.
    #[arg(long, env = "STAGELY_AGENT_BIN_DIR", default_value = "/usr/local/lib/stagely/agents")]
    pub agent_bin_dir: std::path::PathBuf,

    /// Where cloud VMs download the agent binary instead (one URL for every platform); empty:
    /// from the gateway, the binaries of `--agent-bin-dir`.
    #[arg(long, env = "STAGELY_AGENT_DOWNLOAD_URL", default_value = "")]
    pub agent_download_url: String,

    /// The SHA-256 (hex) of the binary at `--agent-download-url`, checked on the VM before it runs.
    #[arg(long, env = "STAGELY_AGENT_SHA256", default_value = "")]
    pub agent_sha256: String,

    /// Seconds a new VM's agent has to connect before its job fails.
    #[arg(long, env = "STAGELY_AGENT_CONNECT_TIMEOUT_SECS", default_value_t = 600)]
    pub agent_connect_timeout_secs: u64,

    /// Seconds between checks that a running builder VM is still there.
    #[arg(long, env = "STAGELY_VM_CHECK_INTERVAL_SECS", default_value_t = 30)]
    pub vm_check_interval_secs: u64,

    /// Where the git source keeps its partial clones (one per repository; a cache).
    #[arg(long, env = "STAGELY_SOURCE_CACHE_DIR", default_value = "/var/cache/stagely/source")]
    pub source_cache_dir: std::path::PathBuf,

    /// Seconds reading stagely.yaml from a repository may take.
    #[arg(long, env = "STAGELY_SOURCE_TIMEOUT_SECS", default_value_t = 60)]
    pub source_timeout_secs: u64,
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

    /// The agent binary `local` CloudProviders start (default: the one for this host's
    /// architecture in `--agent-bin-dir`, the binary cloud VMs download).
    #[arg(long, env = "STAGELY_LOCAL_AGENT_BIN")]
    pub local_agent_bin: Option<std::path::PathBuf>,

    /// Where `local` CloudProviders keep their agents' state.
    #[arg(long, env = "STAGELY_LOCAL_STATE_DIR", default_value = "/var/lib/stagely/local")]
    pub local_state_dir: std::path::PathBuf,

    /// Allows `local` CloudProviders, whose "VMs" are processes on the operator's host: for demos
    /// and tests only. Off, a `local` CloudProvider is not Ready and no VM is started through it.
    #[arg(long, env = "STAGELY_ALLOW_LOCAL_PROVIDER")]
    pub allow_local_provider: bool,
}

impl Config {
    /// The agent binary `local` CloudProviders start: `--local-agent-bin`, else this host's
    /// architecture's binary in `--agent-bin-dir`.
    pub fn local_agent_bin(&self) -> std::path::PathBuf {
        self.clouds.local_agent_bin.clone().unwrap_or_else(|| {
            let arch = if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" };
            self.pipeline.agent_bin_dir.join(format!("stagely-agent-linux-{arch}"))
        })
    }

    /// How new VMs find their agent and the gateway: the gateway URL (by default the gateway's
    /// own address on loopback, `wss://` when it serves TLS), the agent binaries served over it,
    /// and its CA, checked now so that a bad file stops the operator at startup rather than
    /// failing every VM.
    pub fn agent_settings(&self) -> Result<controllers::vm::AgentSettings, RunError> {
        let pipeline = &self.pipeline;
        let served = agents::AgentBinaries::load(&pipeline.agent_bin_dir)?;
        if served.platforms().is_empty() && pipeline.agent_download_url.is_empty() {
            tracing::warn!(
                dir = %pipeline.agent_bin_dir.display(),
                "no agent binaries in --agent-bin-dir and no --agent-download-url: only local VMs can start"
            );
        }
        if let Some(path) = &pipeline.agent_gateway_ca_file {
            providers::cloudinit::read_gateway_ca(path)?;
        }
        let scheme = if self.gateway.gateway_tls_cert.is_some() { "wss" } else { "ws" };
        let port = self.gateway.gateway_addr.port();
        Ok(controllers::vm::AgentSettings {
            gateway_url: pipeline
                .agent_gateway_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://127.0.0.1:{port}{}", stagely_api::protocol::CONNECT_PATH)),
            agent_url: pipeline.agent_download_url.clone(),
            agent_sha256: pipeline.agent_sha256.clone(),
            served: std::sync::Arc::new(served),
            enrollment_ttl: std::time::Duration::from_secs(pipeline.agent_connect_timeout_secs.max(60)),
            gateway_ca_file: pipeline.agent_gateway_ca_file.clone(),
        })
    }
}

impl CloudsConfig {
    /// The endpoints the controllers use.
    pub fn endpoints(&self) -> providers::account::Endpoints {
        providers::account::Endpoints {
            aws: self.aws_endpoint.clone(),
            digitalocean: self.digitalocean_endpoint.clone(),
            hetzner: self.hetzner_endpoint.clone(),
            local_agent_bin: self.local_agent_bin.clone().unwrap_or_default(),
            local_state_dir: self.local_state_dir.clone(),
            local_env: Default::default(),
            allow_local: self.allow_local_provider,
            factory: None,
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
    /// The registry configuration is unusable.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// Redis could not be reached for routes.
    #[error(transparent)]
    Routes(#[from] routes::RouteError),
    /// The agent binaries could not be read.
    #[error(transparent)]
    AgentBinaries(#[from] agents::AgentBinariesError),
    /// The CA handed to agents is unusable.
    #[error(transparent)]
    GatewayCa(#[from] providers::cloudinit::GatewayCaError),
    /// Leader election failed, or this replica stopped leading.
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    /// The agent gateway's address could not be bound.
    #[error("failed to listen on {addr} for the agent gateway: {source}")]
    GatewayListen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), RunError> {
    Operator::new(config).run().await
}

/// The operator's wiring: the gateway, the registry, Redis and the four controllers, started
/// from a [`Config`]. The binary runs it through [`run`]; the operator benchmark runs the same
/// wiring with a [`ProviderFactory`](providers::account::ProviderFactory) plugged in.
#[derive(Debug)]
pub struct Operator {
    config: Config,
    factory: Option<std::sync::Arc<dyn providers::account::ProviderFactory>>,
}

impl Operator {
    /// The operator `config` describes.
    pub fn new(config: Config) -> Self {
        Self { config, factory: None }
    }

    /// Test and benchmark seam: CloudProviders get their provider from `factory` when it makes
    /// one (see [`ProviderFactory`](providers::account::ProviderFactory)).
    pub fn provider_factory(mut self, factory: std::sync::Arc<dyn providers::account::ProviderFactory>) -> Self {
        self.factory = Some(factory);
        self
    }

    /// Runs until SIGTERM or Ctrl-C.
    pub async fn run(self) -> Result<(), RunError> {
        run_operator(self.config, self.factory).await
    }
}

/// What the operator checks and builds before it knows whether it leads: a bad configuration
/// stops every replica at startup, a follower included.
struct Prepared {
    config: Config,
    factory: Option<std::sync::Arc<dyn providers::account::ProviderFactory>>,
    agents: controllers::vm::AgentSettings,
    client: kube::Client,
    gateway: gateway::Gateway,
    registry: Option<registry::Registry>,
    metrics: metrics::Metrics,
}

async fn run_operator(
    config: Config,
    factory: Option<std::sync::Arc<dyn providers::account::ProviderFactory>>,
) -> Result<(), RunError> {
    // kube's rustls needs a process-wide provider; the AWS SDK compiles in a second one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let agents = config.agent_settings()?;
    let client = kube::Client::try_default().await.map_err(RunError::Kube)?;
    let gateway = config.gateway.build(client.clone()).await?;
    let registry = config.registry.build()?;
    let metrics = metrics::Metrics::default();
    metrics.count_agents(&gateway);
    let election = leader::Election::new(&config.leader, metrics.leader.clone()).await?;
    let ops_router = ops::router_with(metrics.register(env!("CARGO_PKG_VERSION")), election.readiness());
    let ops_addr = config.ops_addr;
    tracing::info!(
        addr = %ops_addr,
        gateway_addr = %config.gateway.gateway_addr,
        version = env!("CARGO_PKG_VERSION"),
        "stagely-operator started"
    );
    let serve_ops = async { ops::serve_until_signal(ops_addr, ops_router).await.map_err(RunError::from) };
    let prepared = Prepared { config, factory, agents, client, gateway, registry, metrics };
    let lead = async {
        let Some(leadership) = election.acquire(ops::shutdown_signal()).await else { return Ok(()) };
        let addr = prepared.config.gateway.gateway_addr;
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::GatewayListen { addr, source })?;
        leadership.serving();
        // Losing the Lease drops the work mid-flight: see `Leadership::lost`.
        tokio::select! {
            done = act(prepared, listener) => {
                leadership.release().await;
                done
            }
            lost = leadership.lost() => Err(RunError::Leader(lost)),
        }
    };
    tokio::try_join!(serve_ops, lead)?;
    tracing::info!("stagely-operator stopped");
    Ok(())
}

/// The leader's work: the agent gateway on `listener`, Redis routes and every controller, until
/// SIGTERM or Ctrl-C.
async fn act(prepared: Prepared, listener: tokio::net::TcpListener) -> Result<(), RunError> {
    use std::sync::Arc;
    use std::time::Duration;

    let Prepared { config, factory, agents, client, gateway, registry, metrics } = prepared;
    let served_agents = Arc::clone(&agents.served);
    let routes = match &config.gateway.redis_url {
        Some(url) => Some(Arc::new(routes::Routes::connect(url.expose()).await?)),
        None => {
            tracing::warn!("no Redis configured (--redis-url): routes are not written, previews are not served");
            None
        }
    };
    if registry.is_none() {
        tracing::warn!("no image registry configured (--registry): Environments fail with NoRegistry");
    }
    let addr = config.gateway.gateway_addr;
    let endpoints = providers::account::Endpoints {
        factory,
        local_agent_bin: config.local_agent_bin(),
        ..config.clouds.endpoints()
    };
    let pipeline = &config.pipeline;
    let timings = controllers::buildjob::Timings {
        agent_connect: Duration::from_secs(pipeline.agent_connect_timeout_secs),
        vm_check: Duration::from_secs(pipeline.vm_check_interval_secs.max(1)),
        ..Default::default()
    };
    let github = config.github.client(metrics.github.clone());
    let source_timeout = Duration::from_secs(pipeline.source_timeout_secs);
    let git: Arc<dyn source::RepositorySource> =
        Arc::new(source::git::GitSource::new(&pipeline.source_cache_dir, source_timeout));
    let source = match &github {
        Some(github) => {
            Arc::new(source::github::GitHubSource::new(Arc::clone(github), client.clone(), git, source_timeout))
        }
        None => git,
    };
    let loader = Arc::new(source::ConfigLoader::new(source));

    let cloud_providers =
        controllers::cloudprovider::Context::new(client.clone(), endpoints.clone()).with_metrics(metrics.clone());
    let reaper = Arc::new(reaper::Reaper::new(
        client.clone(),
        Some(gateway.clone()),
        endpoints.clone(),
        metrics.clone(),
        config.reaper.clone(),
    ));
    let projects = controllers::project::Context::new(client.clone(), metrics.clone())
        .with_github(github.clone())
        .with_webhook_secrets(config.github.webhook_secrets.clone());
    let capacity = Arc::new(controllers::capacity::Capacity::new());
    let watched_routes = routes.clone();
    let environments =
        controllers::environment::Context::new(client.clone(), loader, registry.clone(), routes, metrics.clone())
            .with_previews(
                gateway.clone(),
                endpoints.clone(),
                agents.clone(),
                Arc::clone(&capacity),
                Duration::from_secs(pipeline.agent_connect_timeout_secs),
            )
            .with_github(github.clone());
    let feedback = github.clone().map(|github| {
        Arc::new(controllers::feedback::Context::new(client.clone(), github).with_metrics(metrics.clone()))
    });
    let (resync, resync_client) = (github.clone(), client.clone());
    let build_jobs = controllers::buildjob::Context::new(
        client,
        gateway.clone(),
        registry.clone(),
        endpoints,
        agents,
        capacity,
        metrics.clone(),
        timings,
    )
    .with_github(github.clone());
    // Builders fetch registry tokens where they reach the operator already: the gateway.
    // VMs download their agent there too.
    let extra = registry.as_ref().map(registry::Registry::router).unwrap_or_default().merge(served_agents.router());
    if !gateway.is_tls() {
        tracing::warn!("the agent gateway serves plain ws:// (no --gateway-tls-cert): only local agents accept it");
    }
    tracing::info!(gateway_addr = %addr, gateway_tls = gateway.is_tls(), "serving agents and running the controllers");
    let serve_gateway = async {
        gateway.serve_with(listener, extra, ops::shutdown_signal()).await.map_err(|err| RunError::Gateway(err.into()))
    };
    let run_controllers = async {
        tokio::join!(
            controllers::cloudprovider::run(Arc::new(cloud_providers), ops::shutdown_signal()),
            controllers::project::run(Arc::new(projects), ops::shutdown_signal()),
            controllers::environment::run(environments, ops::shutdown_signal()),
            controllers::buildjob::run(Arc::new(build_jobs), ops::shutdown_signal()),
            async {
                if let Some(github) = feedback {
                    controllers::feedback::run(github, ops::shutdown_signal()).await;
                }
            },
            reaper.run(ops::shutdown_signal()),
            async {
                if let Some(routes) = watched_routes {
                    routes.watch(routes::CHECK_EVERY, ops::shutdown_signal()).await;
                }
            },
            async {
                if let Some(github) = resync {
                    let period = Duration::from_secs(config.github.github_resync_secs.max(1));
                    controllers::resync::run(resync_client, github, period, ops::shutdown_signal()).await;
                }
            },
        );
        Ok(())
    };
    tokio::try_join!(serve_gateway, run_controllers)?;
    Ok(())
}
