//! The operator benchmark (`make bench-operator`, driven by `operator/bench/operator.sh`).
//!
//! `operator-bench run --envs N` starts testenv's control plane (etcd, kube-apiserver,
//! kube-controller-manager) and redis-server, serves a fake cloud, starts the operator (this
//! binary again, as `operator-bench operator`: the release build of the real wiring, with only
//! its cloud swapped) and creates N Environments, as many webhooks at once would. It then waits
//! until every Environment is Ready and prints, last:
//!
//! ```text
//! operator_envs=… operator_until=Ready operator_seconds_to_ready=… operator_rss_mib=… apiserver_429=…
//! ```
//!
//! An operator that has no Ready phase yet (no preview VM, no DEPLOY) is measured to
//! `BuildsSucceeded=True` instead, and says so: `operator_until=BuildsSucceeded
//! operator_seconds_to_built=…` (`--until built` asks for that; `--until auto`, the default,
//! falls back to it when every build succeeded and no Environment turns Ready).
//!
//! What is measured, and how:
//! - seconds from the first Environment created to the last one Ready (or built);
//! - the operator process's peak RSS (`VmHWM` of `/proc/<pid>/status`): the operator alone,
//!   since the simulated agents, the fake cloud and this driver run in the driver process;
//! - HTTP 429s counted by the apiserver itself: `apiserver_request_total{code="429"}` summed
//!   from its `/metrics`, after minus before. The operator runs as a ServiceAccount, as the Helm
//!   chart runs it, so API Priority and Fairness treats it as it would in a cluster
//!   (`workload-low`); the driver's own requests go as cluster-admin (exempt) and are never
//!   rejected.
//!
//! The fake cloud is a bench fake: no real VM can run thousands of builds here, so an
//! "instance" is a simulated agent in the driver process. It speaks the real protocol to the
//! operator's gateway over WebSocket: HELLO with the enrollment token from the instance's
//! cloud-init user data, HEARTBEATs at the interval HELLO_ACK gives, and a final STATUS at once
//! for each command (BUILD: succeeded with an image digest; DEPLOY: succeeded with every service
//! running on a published port; TEST and TERMINATE: succeeded). The operator reaches the fake cloud
//! through a [`ProviderFactory`] under an ordinary `local` CloudProvider: a thin HTTP client,
//! as a real cloud's provider is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde::{Deserialize, Serialize};
use stagely_api::backoff::Backoff;
use stagely_api::protocol::{
    CAPABILITY_TEST, ErrorCode, Heartbeat, Hello, JobState, Message, PortMapping, ServiceStatus, Status, SystemInfo,
};
use stagely_api::v1alpha1::{
    CloudProvider as CloudProviderObject, Environment, EnvironmentPhase, EnvironmentSpec, LocalObjectRef, Platform,
    PullRequest, Size, find_condition,
};
use stagely_operator::providers::account::ProviderFactory;
use stagely_operator::providers::{BoxFuture, CloudProvider, Instance, InstanceSpec, InstanceState, ProviderError};
use stagely_testenv::server::Server;
use stagely_testenv::{ControlPlane, Options};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The environment variable telling `operator-bench operator` where the fake cloud is.
const CLOUD_URL_ENV: &str = "STAGELY_BENCH_CLOUD_URL";
/// What the fake cloud's provider calls itself in errors.
const PROVIDER: &str = "bench";

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

/// How far each Environment must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Until {
    /// Phase Ready.
    Ready,
    /// Condition BuildsSucceeded=True.
    Built,
    /// Ready, or BuildsSucceeded when every build succeeded and nothing turns Ready.
    Auto,
}

#[derive(Subcommand)]
enum Mode {
    /// Start everything, create the Environments, measure, print the result line.
    Run {
        /// Environments to create.
        #[arg(long, default_value_t = 1000)]
        envs: usize,
        /// Environments per namespace (a namespace is a team with its own CloudProvider, whose
        /// `maxInstances` is at most 1,000).
        #[arg(long, default_value_t = 500)]
        per_namespace: usize,
        /// How far each Environment must get.
        #[arg(long, value_enum, default_value_t = Until::Auto)]
        until: Until,
        /// Seconds to wait for the Environments before giving up.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// Environments created at once.
        #[arg(long, default_value_t = 16)]
        creators: usize,
        /// Keep the work directory (operator log, control plane logs) here.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Run the operator with the fake cloud (started by `run`; the rest of the arguments are
    /// the operator's own).
    Operator {
        /// The operator's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The operator's allocator, as its binary has it (`src/main.rs`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Mode::Operator { args } => {
            // The operator binary's own runtime: a worker per core.
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(operator(args))
        }
        Mode::Run { envs, per_namespace, until, timeout, creators, keep } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(run(Plan {
                envs,
                per_namespace: per_namespace.max(1),
                until,
                timeout: Duration::from_secs(timeout),
                creators: creators.max(1),
                keep,
            }))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The operator side: the real wiring, with the fake cloud's provider plugged in.

async fn operator(args: Vec<String>) -> anyhow::Result<()> {
    let config = stagely_operator::Config::parse_from(std::iter::once("stagely-operator".to_owned()).chain(args));
    stagely_api::ops::init_logging(config.log_format);
    let url = std::env::var(CLOUD_URL_ENV).with_context(|| format!("{CLOUD_URL_ENV} is not set"))?;
    let cloud = Arc::new(FakeCloudClient { http: reqwest::Client::new(), url });
    stagely_operator::Operator::new(config).provider_factory(Arc::new(FakeCloudFactory(cloud))).run().await?;
    Ok(())
}

/// Hands every CloudProvider the fake cloud's provider (the bench creates only its own).
#[derive(Debug)]
struct FakeCloudFactory(Arc<FakeCloudClient>);

impl ProviderFactory for FakeCloudFactory {
    fn provider(&self, _object: &CloudProviderObject) -> Option<Arc<dyn CloudProvider>> {
        Some(Arc::clone(&self.0) as Arc<dyn CloudProvider>)
    }
}

/// The provider of the fake cloud, a bench fake: no real VM can run thousands of builds here.
/// Its instances are simulated agents in the driver process, reached over HTTP on loopback like
/// a cloud's API.
#[derive(Debug)]
struct FakeCloudClient {
    http: reqwest::Client,
    url: String,
}

/// A create request to the fake cloud.
#[derive(Serialize, Deserialize)]
struct CreateRequest {
    name: String,
    idempotency_key: String,
    user_data: String,
    tags: BTreeMap<String, String>,
}

/// An instance as the fake cloud reports it.
#[derive(Serialize, Deserialize, Clone)]
struct WireInstance {
    id: String,
    running: bool,
    launched_at_ms: u64,
    tags: BTreeMap<String, String>,
}

impl From<WireInstance> for Instance {
    fn from(wire: WireInstance) -> Self {
        let ip = wire.running.then_some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        Instance {
            id: wire.id,
            state: if wire.running { InstanceState::Running } else { InstanceState::Terminated },
            public_ip: ip,
            private_ip: ip,
            launched_at: Some(UNIX_EPOCH + Duration::from_millis(wire.launched_at_ms)),
            tags: wire.tags,
        }
    }
}

fn transport(err: reqwest::Error) -> ProviderError {
    ProviderError::Transport { provider: PROVIDER, message: err.to_string() }
}

async fn checked(response: reqwest::Response) -> Result<reqwest::Response, ProviderError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let message = response.text().await.unwrap_or_default();
    Err(ProviderError::Api { provider: PROVIDER, code: status.as_u16().to_string(), message })
}

impl FakeCloudClient {
    async fn list_instances(&self, owner: Option<&str>) -> Result<Vec<Instance>, ProviderError> {
        self.list_where(owner.map(|owner| ("owner", owner))).await
    }

    async fn list_where(&self, query: Option<(&str, &str)>) -> Result<Vec<Instance>, ProviderError> {
        let mut request = self.http.get(format!("{}/instances", self.url));
        if let Some(query) = query {
            request = request.query(&[query]);
        }
        let response = checked(request.send().await.map_err(transport)?).await?;
        let wire: Vec<WireInstance> = response.json().await.map_err(transport)?;
        Ok(wire.into_iter().map(Instance::from).collect())
    }
}

impl CloudProvider for FakeCloudClient {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance, ProviderError>> {
        Box::pin(async move {
            let request = CreateRequest {
                name: spec.name.clone(),
                idempotency_key: spec.idempotency_key.clone(),
                user_data: spec.user_data.clone(),
                tags: spec.tags.clone(),
            };
            let response = self.http.post(format!("{}/instances", self.url)).json(&request).send().await;
            let wire: WireInstance = checked(response.map_err(transport)?).await?.json().await.map_err(transport)?;
            Ok(wire.into())
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            let response = self.http.get(format!("{}/instances/{id}", self.url)).send().await.map_err(transport)?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let wire: WireInstance = checked(response).await?.json().await.map_err(transport)?;
            Ok(Some(wire.into()))
        })
    }

    fn terminate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let response = self.http.delete(format!("{}/instances/{id}", self.url)).send().await;
            checked(response.map_err(transport)?).await?;
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(self.list_instances(None))
    }

    fn list_owned<'a>(&'a self, owner_uid: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(self.list_instances(Some(owner_uid)))
    }

    fn list_namespace<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(self.list_where(Some(("namespace", namespace))))
    }

    fn validate_credentials(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            checked(self.http.get(format!("{}/healthz", self.url)).send().await.map_err(transport)?).await?;
            Ok(())
        })
    }

    fn hourly_price(&self, _size: Size, _platform: Platform) -> BoxFuture<'_, Result<Option<f64>, ProviderError>> {
        Box::pin(async { Ok(Some(0.0)) })
    }
}

// ---------------------------------------------------------------------------------------------
// The fake cloud and its simulated agents (driver process).

/// What the simulated agents did.
#[derive(Default)]
struct AgentStats {
    started: AtomicU64,
    connected: AtomicU64,
    retried: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    builds: AtomicU64,
    deploys: AtomicU64,
    terminates: AtomicU64,
    heartbeats: AtomicU64,
}

struct CloudInstance {
    key: String,
    launched_at_ms: u64,
    tags: BTreeMap<String, String>,
    agent: tokio::task::AbortHandle,
}

#[derive(Default)]
struct Cloud {
    instances: Mutex<HashMap<String, CloudInstance>>,
    stats: Arc<AgentStats>,
    creates: AtomicU64,
    terminates: AtomicU64,
    lists: AtomicU64,
    gets: AtomicU64,
}

impl Cloud {
    fn instances(&self) -> std::sync::MutexGuard<'_, HashMap<String, CloudInstance>> {
        self.instances.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn wire(id: &str, instance: &CloudInstance) -> WireInstance {
    // The "VM" runs until it is terminated, whatever its agent does.
    WireInstance {
        id: id.to_owned(),
        running: true,
        launched_at_ms: instance.launched_at_ms,
        tags: instance.tags.clone(),
    }
}

/// What cloud-init would write to the agent's configuration file.
#[derive(Deserialize)]
struct AgentBoot {
    gateway_url: String,
    agent_id: String,
    token: String,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn cloud_router(cloud: Arc<Cloud>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/instances", get(list_instances).post(create_instance))
        .route("/instances/{id}", get(get_instance).delete(delete_instance))
        .with_state(cloud)
}

type Refusal = (StatusCode, String);

async fn create_instance(
    State(cloud): State<Arc<Cloud>>,
    Json(request): Json<CreateRequest>,
) -> Result<Json<WireInstance>, Refusal> {
    cloud.creates.fetch_add(1, Ordering::Relaxed);
    let mut instances = cloud.instances();
    if let Some(existing) = instances.get(&request.name) {
        if existing.key == request.idempotency_key {
            return Ok(Json(wire(&request.name, existing)));
        }
        return Err((StatusCode::CONFLICT, format!("{} exists with another idempotency key", request.name)));
    }
    let config = stagely_operator::providers::local::agent_config(&request.user_data)
        .map_err(|err| (StatusCode::BAD_REQUEST, err.to_string()))?;
    let boot: AgentBoot = serde_json::from_str(&config).map_err(|err| (StatusCode::BAD_REQUEST, err.to_string()))?;
    let agent = tokio::spawn(simulated_agent(Arc::clone(&cloud.stats), boot)).abort_handle();
    let instance = CloudInstance { key: request.idempotency_key, launched_at_ms: now_ms(), tags: request.tags, agent };
    let answer = wire(&request.name, &instance);
    instances.insert(request.name, instance);
    Ok(Json(answer))
}

async fn get_instance(
    State(cloud): State<Arc<Cloud>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<WireInstance>, Refusal> {
    cloud.gets.fetch_add(1, Ordering::Relaxed);
    let instances = cloud.instances();
    let instance = instances.get(&id).ok_or((StatusCode::NOT_FOUND, format!("no instance {id}")))?;
    Ok(Json(wire(&id, instance)))
}

async fn delete_instance(State(cloud): State<Arc<Cloud>>, UrlPath(id): UrlPath<String>) -> StatusCode {
    cloud.terminates.fetch_add(1, Ordering::Relaxed);
    if let Some(instance) = cloud.instances().remove(&id) {
        // The "VM" goes, and its agent's connection with it.
        instance.agent.abort();
    }
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct ListQuery {
    owner: Option<String>,
    namespace: Option<String>,
}

async fn list_instances(State(cloud): State<Arc<Cloud>>, Query(query): Query<ListQuery>) -> Json<Vec<WireInstance>> {
    cloud.lists.fetch_add(1, Ordering::Relaxed);
    let instances = cloud.instances();
    let tagged = |instance: &CloudInstance, tag: &str, value: Option<&str>| {
        value.is_none_or(|value| instance.tags.get(tag).map(String::as_str) == Some(value))
    };
    Json(
        instances
            .iter()
            .filter(|(_, i)| {
                tagged(i, stagely_api::keys::cloud_tags::OWNER_UID, query.owner.as_deref())
                    && tagged(i, stagely_api::keys::cloud_tags::NAMESPACE, query.namespace.as_deref())
            })
            .map(|(id, i)| wire(id, i))
            .collect(),
    )
}

/// How a simulated agent's session ended.
enum Ended {
    /// The gateway closed it, or the agent's work is done.
    Closed,
    /// The gateway refused the HELLO and says a retry may help.
    Retry,
}

/// One simulated agent: connects, says HELLO with its enrollment token, heartbeats, and answers
/// every command at once with a final STATUS. Like the real agent it tries again, with
/// exponential backoff and jitter, when it cannot connect or the gateway asks it to.
async fn simulated_agent(stats: Arc<AgentStats>, boot: AgentBoot) {
    stats.started.fetch_add(1, Ordering::Relaxed);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    for attempt in 0.. {
        match agent_session(&stats, &boot).await {
            Ok(Ended::Closed) => return,
            Ok(Ended::Retry) => {}
            Err(err) if attempt >= 20 => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("simulated agent {} gave up: {err:#}", boot.agent_id);
                return;
            }
            Err(_) => {}
        }
        stats.retried.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn agent_session(stats: &AgentStats, boot: &AgentBoot) -> anyhow::Result<Ended> {
    let authority = boot
        .gateway_url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .context("the gateway URL is not ws://host:port/…")?;
    let tcp = TcpStream::connect(authority).await?;
    tcp.set_nodelay(true)?;
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(boot.gateway_url.as_str(), tcp, Some(config)).await?;
    let hello = Message::Hello(Hello {
        agent_id: boot.agent_id.clone(),
        token: boot.token.as_str().into(),
        version: "bench".into(),
        system_info: SystemInfo {
            os: "linux".into(),
            arch: "amd64".into(),
            hostname: boot.agent_id.clone(),
            cpus: 2,
            memory_mib: 4096,
        },
        jobs: vec![],
        capabilities: vec![CAPABILITY_TEST.into()],
    });
    ws.send(WsMessage::text(serde_json::to_string(&hello)?)).await?;
    let interval = match ws.next().await {
        Some(Ok(WsMessage::Text(text))) => match serde_json::from_str::<Message>(&text)? {
            Message::HelloAck(ack) => Duration::from_secs(u64::from(ack.heartbeat_interval_seconds.max(1))),
            Message::Error(error) if error.code == ErrorCode::Internal => return Ok(Ended::Retry),
            other => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                eprintln!("simulated agent {} refused: {other:?}", boot.agent_id);
                return Ok(Ended::Closed);
            }
        },
        other => anyhow::bail!("no HELLO_ACK: {other:?}"),
    };
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                seq += 1;
                let beat = Message::Heartbeat(Heartbeat { seq, sent_at_ms: now_ms() });
                ws.send(WsMessage::text(serde_json::to_string(&beat)?)).await?;
                stats.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(WsMessage::Text(text))) => text,
                    Some(Ok(WsMessage::Close(_))) | None => return Ok(Ended::Closed),
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => return Err(err.into()),
                };
                let (answer, done) = match serde_json::from_str::<Message>(&text)? {
                    Message::Build(build) => {
                        stats.builds.fetch_add(1, Ordering::Relaxed);
                        let digest = stagely_operator::registry::index::sha256_digest(build.image.as_bytes());
                        (Status { image_digest: Some(digest), ..succeeded(build.job_id, "built (simulated)") }, false)
                    }
                    Message::Deploy(deploy) => {
                        stats.deploys.fetch_add(1, Ordering::Relaxed);
                        let mut names: Vec<String> = deploy.images.keys().cloned().collect();
                        if names.is_empty() {
                            names.push("web".into());
                        }
                        let services = names
                            .into_iter()
                            .map(|name| ServiceStatus {
                                name,
                                state: "running".into(),
                                health: None,
                                ports: vec![PortMapping {
                                    container_port: 8080,
                                    published_port: 8080,
                                    protocol: "tcp".into(),
                                }],
                            })
                            .collect();
                        (Status { services, ..succeeded(deploy.job_id, "deployed (simulated)") }, false)
                    }
                    Message::Test(test) => (succeeded(test.job_id, "tested (simulated)"), false),
                    Message::Terminate(terminate) => {
                        stats.terminates.fetch_add(1, Ordering::Relaxed);
                        (succeeded(terminate.job_id, "terminated (simulated)"), true)
                    }
                    // Heartbeat acks, errors: nothing to answer.
                    _ => continue,
                };
                ws.send(WsMessage::text(serde_json::to_string(&Message::Status(answer))?)).await?;
                if done {
                    let _ = ws.close(None).await;
                    return Ok(Ended::Closed);
                }
            }
        }
    }
}

fn succeeded(job_id: String, message: &str) -> Status {
    Status {
        job_id,
        state: JobState::Succeeded,
        exit_code: Some(0),
        duration_seconds: Some(0.0),
        message: Some(message.into()),
        image_digest: None,
        services: vec![],
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

struct Plan {
    envs: usize,
    per_namespace: usize,
    until: Until,
    timeout: Duration,
    creators: usize,
    keep: Option<PathBuf>,
}

/// How far the Environments got, from a watch.
#[derive(Default)]
struct Progress {
    built: HashSet<String>,
    ready: HashSet<String>,
    failed: HashMap<String, String>,
    all_built_at: Option<Duration>,
    all_ready_at: Option<Duration>,
}

/// The operator process's memory and CPU, from /proc.
struct ProcStats {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_seconds: f64,
}

fn proc_stats(pid: u32) -> anyhow::Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15; after the ')' the first field is 3 (state).
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ProcStats { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:"), cpu_seconds: (ticks(14) + ticks(15)) / 100.0 })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git").arg("-C").arg(dir).args(args).output()?;
    anyhow::ensure!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A repository with one amd64 build and a compose file for the preview. Returns the commit.
fn repository(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("Dockerfile"), "FROM scratch\nCOPY index.html /\n")?;
    std::fs::write(dir.join("index.html"), "hello\n")?;
    std::fs::write(dir.join("stagely.yaml"), "version: 2\nbuilds:\n  web:\n    platform: linux/amd64\n")?;
    std::fs::write(dir.join("docker-compose.yml"), "services:\n  web:\n    build: .\n    ports: [\"8080\"]\n")?;
    git(dir, &["init", "-q", "-b", "main"])?;
    git(dir, &["add", "-A"])?;
    git(dir, &["-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-q", "-m", "app"])?;
    git(dir, &["rev-parse", "HEAD"])
}

/// The totals of the apiserver's `apiserver_request_total`, by (verb, resource, subresource,
/// code).
async fn apiserver_requests(client: &kube::Client) -> anyhow::Result<HashMap<(String, String, String, String), f64>> {
    let request = axum::http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut totals = HashMap::new();
    for line in text.lines().filter(|line| line.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let label = |name: &str| {
            labels
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        let key = (label("verb"), label("resource"), label("subresource"), label("code"));
        *totals.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(totals)
}

/// A kubeconfig like the control plane's, authenticating as the ServiceAccount
/// `stagely-system/stagely-operator` (bound to cluster-admin; APF classifies by the subject).
async fn operator_kubeconfig(plane: &ControlPlane, client: &kube::Client, path: &Path) -> anyhow::Result<()> {
    let pp = PostParams::default();
    let ns = Namespace {
        metadata: ObjectMeta { name: Some("stagely-system".into()), ..Default::default() },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone()).create(&pp, &ns).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "stagely-system");
    let account = ServiceAccount {
        metadata: ObjectMeta { name: Some("stagely-operator".into()), ..Default::default() },
        ..Default::default()
    };
    accounts.create(&pp, &account).await?;
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta { name: Some("stagely-operator-bench".into()), ..Default::default() },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: "cluster-admin".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "stagely-operator".into(),
            namespace: Some("stagely-system".into()),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone()).create(&pp, &binding).await?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(6 * 3600), ..Default::default() }),
        ..Default::default()
    };
    let token = accounts.create_token_request("stagely-operator", &pp, &request).await?;
    let token = token.status.and_then(|s| s.token).context("the TokenRequest has no token")?;
    let mut kubeconfig: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(plane.kubeconfig())?)?;
    kubeconfig["users"][0]["user"]["token"] = serde_yaml::Value::String(token);
    std::fs::write(path, serde_yaml::to_string(&kubeconfig)?)?;
    Ok(())
}

/// Creates namespace `namespace` with a CloudProvider of the fake cloud, a GitHub Secret and a
/// Project reading `repo`.
async fn team(client: &kube::Client, namespace: &str, repo: &Path, max_instances: usize) -> anyhow::Result<()> {
    let pp = PostParams::default();
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&pp, &ns).await?;
    let secret = Secret {
        metadata: ObjectMeta { name: Some("github".into()), ..Default::default() },
        string_data: Some(BTreeMap::from([
            ("token".to_owned(), "ghp_not_used_by_the_git_source".to_owned()),
            ("webhookSecret".to_owned(), "whsec_bench".to_owned()),
        ])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), namespace).create(&pp, &secret).await?;
    let provider: CloudProviderObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider",
        "metadata": {"name": "bench"},
        "spec": {"type": "local", "maxInstances": max_instances},
    }))?;
    Api::<CloudProviderObject>::namespaced(client.clone(), namespace).create(&pp, &provider).await?;
    let project: stagely_api::v1alpha1::Project = serde_json::from_value(serde_json::json!({
        "apiVersion": "stagely.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": "shop"},
        "spec": {
            "repository": "acme/shop",
            "cloneUrl": format!("file://{}", repo.display()),
            "cloudProviderRef": {"name": "bench"},
            "previewDomain": "preview.example.com",
            "github": {"credentialsSecretRef": {"name": "github"}},
        },
    }))?;
    Api::<stagely_api::v1alpha1::Project>::namespaced(client.clone(), namespace).create(&pp, &project).await?;
    Ok(())
}

fn environment(name: &str, pr: i64, sha: &str) -> Environment {
    Environment::new(
        name,
        EnvironmentSpec {
            project_ref: LocalObjectRef::new("shop"),
            pull_request: PullRequest {
                number: pr,
                head_sha: sha.into(),
                head_ref: format!("feature-{pr}"),
                base_ref: "main".into(),
                author: Some("octocat".into()),
                url: None,
            },
            overrides: None,
        },
    )
}

/// Watches every Environment and records how far each got.
fn follow(client: kube::Client, started: Instant, total: usize, progress: Arc<Mutex<Progress>>) {
    tokio::spawn(async move {
        let stream = watcher(Api::<Environment>::all(client), watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream.applied_objects());
        while let Some(event) = stream.next().await {
            let Ok(env) = event else { continue };
            let name = format!(
                "{}/{}",
                env.metadata.namespace.as_deref().unwrap_or_default(),
                env.metadata.name.as_deref().unwrap_or_default()
            );
            let Some(status) = &env.status else { continue };
            let mut p = progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if find_condition(&status.conditions, "BuildsSucceeded").is_some_and(|c| c.status == "True") {
                p.built.insert(name.clone());
                if p.built.len() == total && p.all_built_at.is_none() {
                    p.all_built_at = Some(started.elapsed());
                }
            }
            match status.phase {
                Some(EnvironmentPhase::Ready) => {
                    p.ready.insert(name);
                    if p.ready.len() == total && p.all_ready_at.is_none() {
                        p.all_ready_at = Some(started.elapsed());
                    }
                }
                Some(EnvironmentPhase::Failed) => {
                    let why = status
                        .conditions
                        .iter()
                        .filter(|c| c.status == "False")
                        .map(|c| format!("{}: {}", c.type_, c.message))
                        .collect::<Vec<_>>()
                        .join("; ");
                    p.failed.insert(name, why);
                }
                _ => {}
            }
        }
    });
}

/// The operator's own `/metrics` lines about reconciles.
async fn operator_reconciles(ops: SocketAddr) -> String {
    let Ok(response) = reqwest::get(format!("http://{ops}/metrics")).await else { return String::new() };
    let text = response.text().await.unwrap_or_default();
    text.lines().filter(|line| line.starts_with("stagely_operator_reconciles_total")).collect::<Vec<_>>().join("\n")
}

async fn run(plan: Plan) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("stagely-operator-bench-").tempdir()?;
    let dir = work.path().to_owned();
    let namespaces = plan.envs.div_ceil(plan.per_namespace);
    eprintln!(
        "starting the control plane, redis-server and the fake cloud ({} Environments in {namespaces} namespaces)",
        plan.envs
    );
    let plane = ControlPlane::start(Options {
        controller_manager: true,
        crds: stagely_api::crds(),
        dir: Some(dir.join("control-plane")),
        ..Options::default()
    })
    .await?;
    let client = plane.client().await?;
    let redis = match Server::redis() {
        Ok(redis) => Some(redis),
        Err(err) => {
            eprintln!("no redis-server ({err}): routes are not written (make deps installs it)");
            None
        }
    };
    let sha = repository(&dir.join("repo"))?;

    let cloud = Arc::new(Cloud::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cloud_url = format!("http://{}", listener.local_addr()?);
    let router = cloud_router(Arc::clone(&cloud));
    tokio::spawn(async move { axum::serve(listener, router).await });

    let kubeconfig = dir.join("operator.kubeconfig");
    operator_kubeconfig(&plane, &client, &kubeconfig).await?;
    let gateway_port = free_port()?;
    let ops: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    std::fs::write(dir.join("gateway.key"), b"the operator benchmark's gateway signing key, 32+ bytes")?;
    let log = std::fs::File::create(dir.join("operator.log"))?;
    // `OPERATOR_WRAPPER` (say, `heaptrack -o /tmp/operator`) runs the operator under a profiler;
    // the RSS then read is the wrapper's, so such a run measures nothing but the profile.
    let wrapper = std::env::var("OPERATOR_WRAPPER").unwrap_or_default();
    let mut wrapper = wrapper.split_whitespace();
    let mut command = match wrapper.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(wrapper).arg(std::env::current_exe()?);
            command
        }
        None => Command::new(std::env::current_exe()?),
    };
    command
        .arg("operator")
        .arg("--ops-addr")
        .arg(ops.to_string())
        .arg("--gateway-addr")
        .arg(format!("127.0.0.1:{gateway_port}"))
        .arg("--gateway-signing-key-file")
        .arg(dir.join("gateway.key"))
        .arg("--registry")
        .arg("127.0.0.1:5000")
        .arg("--source-cache-dir")
        .arg(dir.join("source"))
        .arg("--local-state-dir")
        .arg(dir.join("local"))
        // The bench's CloudProviders are `local` ones whose provider the fake cloud supplies.
        .arg("--allow-local-provider")
        .args(["--github-api-url", "off"])
        .env("KUBECONFIG", &kubeconfig)
        .env(CLOUD_URL_ENV, &cloud_url)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(redis) = &redis {
        command.arg("--redis-url").arg(redis.url());
    }
    let mut child = stagely_testenv::spawn_tied(command)?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", gateway_port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the operator did not start; see {}",
            dir.join("operator.log").display()
        );
        anyhow::ensure!(child.try_wait()?.is_none(), "the operator exited; see {}", dir.join("operator.log").display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let max_instances = (2 * plan.per_namespace + 10).min(1000);
    for i in 0..namespaces {
        team(&client, &format!("bench-{i}"), &dir.join("repo"), max_instances).await?;
    }
    for i in 0..namespaces {
        let api: Api<CloudProviderObject> = Api::namespaced(client.clone(), &format!("bench-{i}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let provider = api.get("bench").await?;
            let ready = provider.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready"));
            if ready.is_some_and(|c| c.status == "True") {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "CloudProvider bench-{i}/bench is not Ready: {:?}",
                provider.status
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let idle = proc_stats(pid)?;
    eprintln!("operator idle: RSS {:.1} MiB", idle.rss_kib as f64 / 1024.0);
    let before = apiserver_requests(&client).await?;

    let progress = Arc::new(Mutex::new(Progress::default()));
    let started = Instant::now();
    follow(client.clone(), started, plan.envs, Arc::clone(&progress));
    let (per_namespace, creator, sha) = (plan.per_namespace, client.clone(), sha.clone());
    let creates = futures_util::stream::iter(0..plan.envs)
        .map(move |i| {
            let client = creator.clone();
            let sha = sha.clone();
            let namespace = format!("bench-{}", i / per_namespace);
            async move {
                let api: Api<Environment> = Api::namespaced(client, &namespace);
                api.create(&PostParams::default(), &environment(&format!("shop-pr-{i}"), i as i64 + 1, &sha)).await
            }
        })
        .buffer_unordered(plan.creators)
        .collect::<Vec<_>>();
    let mut peak_rss = 0;
    let creating = tokio::spawn(creates);
    let mut created_in = None;
    let mut last_report = Instant::now();
    let mut all_built_seen: Option<Instant> = None;
    let mut failure = None;
    let until = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(stats) = proc_stats(pid) {
            peak_rss = peak_rss.max(stats.rss_kib);
        }
        if created_in.is_none() && creating.is_finished() {
            created_in = Some(started.elapsed());
        }
        anyhow::ensure!(child.try_wait()?.is_none(), "the operator exited; see {}", dir.join("operator.log").display());
        let p = progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "{:>6.1} s: built {} ready {} failed {} of {}; operator RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                p.built.len(),
                p.ready.len(),
                p.failed.len(),
                plan.envs,
                proc_stats(pid).map_or(0.0, |s| s.rss_kib as f64 / 1024.0)
            );
        }
        if let Some((name, why)) = p.failed.iter().next() {
            failure = Some(format!("Environment {name} failed: {why}"));
            break Until::Built;
        }
        if started.elapsed() > plan.timeout {
            failure = Some(format!(
                "timed out after {:?}: built {} ready {} of {}",
                plan.timeout,
                p.built.len(),
                p.ready.len(),
                plan.envs
            ));
            break Until::Built;
        }
        match plan.until {
            Until::Built if p.all_built_at.is_some() => break Until::Built,
            Until::Ready | Until::Auto if p.all_ready_at.is_some() => break Until::Ready,
            Until::Auto if p.all_built_at.is_some() && p.ready.is_empty() => {
                // An operator without a Ready phase stops at Deploying: give it a moment to show
                // one before falling back.
                let since = *all_built_seen.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(15) {
                    eprintln!(
                        "no Environment turned Ready 15 s after every build succeeded: this operator has no Ready phase yet; measured to BuildsSucceeded=True"
                    );
                    break Until::Built;
                }
            }
            _ => {}
        }
    };
    let (built_at, ready_at) = {
        let p = progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (p.all_built_at, p.all_ready_at)
    };
    let end = proc_stats(pid)?;
    let after = apiserver_requests(&client).await?;
    let reconciles = operator_reconciles(ops).await;
    // Read before the operator is stopped: killing it resets every agent still connected, and
    // each then tries again.
    let retries = cloud.stats.retried.load(Ordering::Relaxed);
    let _ = child.kill();
    let _ = child.wait();

    // What the apiserver served meanwhile (the operator's requests, and the driver's creates and watch).
    let mut delta: Vec<((String, String, String, String), f64)> = after
        .iter()
        .map(|(key, value)| (key.clone(), value - before.get(key).copied().unwrap_or(0.0)))
        .filter(|(_, value)| *value > 0.0)
        .collect();
    delta.sort_by(|a, b| b.1.total_cmp(&a.1));
    let rejected: f64 = delta.iter().filter(|((_, _, _, code), _)| code == "429").map(|(_, v)| v).sum::<f64>() + 0.0;
    let total: f64 = delta.iter().map(|(_, v)| v).sum();
    eprintln!("apiserver requests during the run: {total:.0} (by verb, resource, subresource, code):");
    for ((verb, resource, subresource, code), value) in delta.iter().take(20) {
        let resource = if subresource.is_empty() { resource.clone() } else { format!("{resource}/{subresource}") };
        eprintln!("  {value:>8.0}  {verb} {resource} {code}");
    }
    // Events are most of those requests: which ones.
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone())
        .list(&kube::api::ListParams::default())
        .await
        .context("list the Events")?;
    let mut by_reason: BTreeMap<(String, String), (usize, i32)> = BTreeMap::new();
    for event in &events.items {
        let kind = event.regarding.as_ref().and_then(|r| r.kind.clone()).unwrap_or_default();
        let count = event.series.as_ref().map_or(1, |series| series.count);
        let entry = by_reason.entry((kind, event.reason.clone().unwrap_or_default())).or_default();
        entry.0 += 1;
        entry.1 += count;
    }
    let mut by_reason: Vec<_> = by_reason.into_iter().collect();
    by_reason.sort_by_key(|entry| std::cmp::Reverse(entry.1));
    eprintln!("Events kept at the end: {} (by kind and reason: Events, occurrences):", events.items.len());
    for ((kind, reason), (objects, count)) in by_reason.iter().take(20) {
        eprintln!("  {objects:>8} {count:>8}  {kind} {reason}");
    }
    if !reconciles.is_empty() {
        eprintln!("operator reconciles:\n{reconciles}");
    }
    let agents = &cloud.stats;
    let count = |n: &AtomicU64| n.load(Ordering::Relaxed);
    eprintln!(
        "fake cloud: {} creates, {} gets, {} lists, {} terminates; agents: {} started, {} connected, {} retries, \
         {} refused, {} failed; {} BUILD, {} DEPLOY, {} TERMINATE answered; {} heartbeats",
        count(&cloud.creates),
        count(&cloud.gets),
        count(&cloud.lists),
        count(&cloud.terminates),
        count(&agents.started),
        count(&agents.connected),
        retries,
        count(&agents.refused),
        count(&agents.failed),
        count(&agents.builds),
        count(&agents.deploys),
        count(&agents.terminates),
        count(&agents.heartbeats),
    );
    eprintln!(
        "created {} Environments in {:.1} s; all built at {}; all ready at {}",
        plan.envs,
        created_in.map_or(f64::NAN, |d| d.as_secs_f64()),
        built_at.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        ready_at.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
    );
    eprintln!(
        "operator: CPU {:.1} s during the run; RSS at the end {:.1} MiB, peak sampled {:.1} MiB, VmHWM {:.1} MiB",
        end.cpu_seconds - idle.cpu_seconds,
        end.rss_kib as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        end.hwm_kib as f64 / 1024.0
    );
    if let Some(keep) = &plan.keep {
        drop(plane);
        let _ = std::fs::remove_dir_all(keep);
        std::fs::rename(&dir, keep).or_else(|_| Command::new("cp").arg("-a").arg(&dir).arg(keep).status().map(drop))?;
        eprintln!("kept the work directory in {}", keep.display());
    }
    if let Some(failure) = failure {
        anyhow::bail!(
            "{failure} (operator log: {})",
            plan.keep.as_deref().unwrap_or(&dir).join("operator.log").display()
        );
    }
    let rss_mib = end.hwm_kib as f64 / 1024.0;
    match until {
        Until::Built => println!(
            "operator_envs={} operator_until=BuildsSucceeded operator_seconds_to_built={:.1} operator_rss_mib={rss_mib:.1} apiserver_429={rejected:.0}",
            plan.envs,
            built_at.unwrap_or_default().as_secs_f64()
        ),
        _ => println!(
            "operator_envs={} operator_until=Ready operator_seconds_to_ready={:.1} operator_rss_mib={rss_mib:.1} apiserver_429={rejected:.0}",
            plan.envs,
            ready_at.unwrap_or_default().as_secs_f64()
        ),
    }
    Ok(())
}
