//! The agent gateway: the WebSocket hub every agent holds one connection to.
//!
//! An agent connects to [`CONNECT_PATH`] and sends HELLO with its enrollment token (minted by
//! [`Gateway::mint_enrollment_token`], single use) or, on reconnect, the session token a
//! HELLO_ACK gave it. Controllers send commands with [`Gateway::send`] / [`Gateway::command`]:
//! a command waits for its agent if it is not connected, is resent after a reconnect unless the
//! agent's HELLO lists its job, and resolves on the job's final STATUS, or as failed on an ERROR
//! the agent sends about it. What a connected agent can do beyond the basic commands is in its
//! HELLO's capabilities ([`Gateway::capabilities`]). Each agent has a bounded
//! send queue; one that does not keep up is disconnected, never waited for. HEARTBEATs are
//! echoed back as the ack and recorded on the object's `status.lastHeartbeat`, coalesced to one
//! write per object per interval. On a long connection the gateway sends HELLO_ACK again with a
//! fresh session token before the last one expires. LOG lines are taken only for jobs sent to
//! that agent, masked for the secret values sent to that scope, then stored in Redis and
//! streamed at `GET /v1/jobs/{job_id}/logs` to a bearer of a log-read token
//! ([`Gateway::mint_log_token`]).
//!
//! With a certificate ([`GatewayBuilder::tls`]) it serves `wss://` and rereads the certificate
//! files as they change, so a renewed certificate reaches new connections without a restart.

mod config;
mod connection;
pub mod logs;
pub mod objects;
mod outbox;
mod tls;
pub mod token;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::Utf8Bytes;
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use stagely_api::protocol::{CONNECT_PATH, HEARTBEAT_INTERVAL_SECS, Message, Scope, ScopeKind, Sensitive, Status};
use stagely_api::tls::CertStore;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

pub use self::config::{ConfigError, GatewayConfig};
use self::logs::{LogError, LogStore, Masker};
use self::objects::{HeartbeatRecorder, NoObjects, ScopeObjects};
use self::token::{SigningKey, TokenError, TokenKeys};

/// The path of the job log endpoint; `{job_id}` is the job.
pub const LOGS_PATH: &str = "/v1/jobs/{job_id}/logs";

/// Why a gateway call failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Only BUILD, DEPLOY, TERMINATE and TEST can be sent.
    #[error("failed to send a {0} message: only BUILD, DEPLOY, TERMINATE and TEST are commands")]
    NotACommand(&'static str),
    /// The agent's send queue was full; it was disconnected and the command not queued.
    #[error("failed to send job {job_id} to the agent of {kind:?} {namespace}/{name}: its send queue is full")]
    QueueFull {
        /// The job.
        job_id: String,
        /// The object's kind.
        kind: stagely_api::protocol::ScopeKind,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The job was dropped by [`Gateway::forget`] before it finished.
    #[error("job {0} was forgotten before it finished")]
    Forgotten(String),
    /// A token could not be made.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Log storage failed.
    #[error(transparent)]
    Logs(#[from] LogError),
    /// The command could not be serialized.
    #[error("failed to serialize a command: {0}")]
    Serialize(#[from] serde_json::Error),
    /// Binding or serving failed.
    #[error("failed to serve the agent gateway: {0}")]
    Serve(#[source] std::io::Error),
}

/// The gateway's tunables.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Told to agents in HELLO_ACK.
    pub heartbeat_interval_secs: u32,
    /// At most one `status.lastHeartbeat` write per object per this interval.
    pub heartbeat_write_interval: Duration,
    /// Frames waiting to be written to one agent before it counts as too slow.
    pub queue_capacity: usize,
    /// How long one frame may take to write before the agent is disconnected.
    pub write_timeout: Duration,
    /// How long a new connection has to send HELLO (and, over TLS, to finish its handshake).
    pub hello_timeout: Duration,
    /// Lifetime of the session token in HELLO_ACK.
    pub session_ttl: Duration,
    /// How often a connected agent is sent a fresh session token (at most half the lifetime,
    /// so that an agent connected for longer than the lifetime can still reconnect).
    pub session_renewal: Duration,
    /// Clock skew allowed on token expiry.
    pub token_leeway: Duration,
    /// How long shutdown waits for connections to close.
    pub drain_timeout: Duration,
    /// WebSocket read buffer per connection, in bytes.
    pub read_buffer_size: usize,
    /// Largest message accepted from an agent, in bytes.
    pub max_message_size: usize,
    /// How often the TLS certificate files are checked for a change.
    pub tls_reload_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_interval_secs: HEARTBEAT_INTERVAL_SECS,
            heartbeat_write_interval: Duration::from_secs(300),
            queue_capacity: 64,
            write_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            session_ttl: Duration::from_secs(48 * 3600),
            session_renewal: Duration::from_secs(12 * 3600),
            token_leeway: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            read_buffer_size: 256,
            max_message_size: 1 << 20,
            tls_reload_interval: Duration::from_secs(5),
        }
    }
}

/// Builds a [`Gateway`].
pub struct GatewayBuilder {
    key: Option<SigningKey>,
    objects: Arc<dyn ScopeObjects>,
    redis_url: Option<String>,
    log_max_len: usize,
    log_retention: Duration,
    settings: Settings,
    tls: Option<Arc<CertStore>>,
}

impl std::fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBuilder").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// The token signing key (default: a random one, good for one process only).
    pub fn signing_key(mut self, key: SigningKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Where scopes are checked and heartbeats recorded (default: [`NoObjects`]).
    pub fn objects(mut self, objects: impl ScopeObjects) -> Self {
        self.objects = Arc::new(objects);
        self
    }

    /// Stores LOG lines in the Redis at `url` (default: LOG lines are dropped).
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// Lines kept per job, approximately (Redis `MAXLEN ~`; default 10,000).
    pub fn log_max_len(mut self, max_len: usize) -> Self {
        self.log_max_len = max_len;
        self
    }

    /// How long a job's logs are kept after its last line (default 7 days).
    pub fn log_retention(mut self, retention: Duration) -> Self {
        self.log_retention = retention;
        self
    }

    /// At most one heartbeat status write per object per `interval` (default 60 s).
    pub fn heartbeat_write_interval(mut self, interval: Duration) -> Self {
        self.settings.heartbeat_write_interval = interval;
        self
    }

    /// Every tunable at once.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Serves `wss://` with the certificate in `certificate`, reread every
    /// [`Settings::tls_reload_interval`] (default: plain `ws://`).
    pub fn tls(mut self, certificate: CertStore) -> Self {
        self.tls = Some(Arc::new(certificate));
        self
    }

    /// Connects what needs connecting and starts the background heartbeat writer.
    pub async fn build(self) -> Result<Gateway, GatewayError> {
        let key = match self.key {
            Some(key) => key,
            None => SigningKey::generate()?,
        };
        let logs = match &self.redis_url {
            Some(url) => Some(LogStore::connect(url, self.log_max_len, self.log_retention).await?),
            None => None,
        };
        let (shutdown, _) = watch::channel(false);
        let tls = self.tls.map(|certificate| {
            tokio::spawn(Arc::clone(&certificate).watch(
                self.settings.tls_reload_interval,
                |_| {},
                shutdown.subscribe(),
            ));
            // WebSocket upgrades are HTTP/1.1.
            TlsAcceptor::from(Arc::new(certificate.server_config(&[b"http/1.1"])))
        });
        let inner = Arc::new(Inner {
            tokens: TokenKeys::new(&key, self.settings.token_leeway),
            agents: Mutex::new(HashMap::new()),
            heartbeats: Arc::new(HeartbeatRecorder::default()),
            objects: self.objects,
            logs,
            settings: self.settings,
            shutdown,
            next_connection: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            drained: Notify::new(),
            tls,
            provisioning: OnceLock::new(),
        });
        tokio::spawn(Arc::clone(&inner.heartbeats).run(
            Arc::clone(&inner.objects),
            inner.settings.heartbeat_write_interval,
            inner.shutdown.subscribe(),
        ));
        Ok(Gateway { inner })
    }

    /// Builds the gateway and serves it on `listener` in the background (tests, benchmarks).
    pub async fn serve(self, listener: TcpListener) -> Result<RunningGateway, GatewayError> {
        let gateway = self.build().await?;
        let addr = listener.local_addr().map_err(GatewayError::Serve)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let gateway = gateway.clone();
            async move {
                gateway
                    .serve(listener, async {
                        let _ = stopped.await;
                    })
                    .await
            }
        });
        Ok(RunningGateway { gateway, addr, stop: Some(stop), task })
    }
}

/// A gateway serving in the background; stops when [`RunningGateway::shutdown`] is called or
/// it is dropped.
#[derive(Debug)]
pub struct RunningGateway {
    gateway: Gateway,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), GatewayError>>,
}

impl RunningGateway {
    /// The gateway, for minting tokens and sending commands.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agents' URL, `wss://<addr>/v1/agent/connect` (`ws://` without TLS).
    pub fn connect_url(&self) -> String {
        let scheme = if self.gateway.is_tls() { "wss" } else { "ws" };
        format!("{scheme}://{}{CONNECT_PATH}", self.addr)
    }

    /// Stops accepting, closes every agent connection with a close frame and waits for them.
    pub async fn shutdown(mut self) -> Result<(), GatewayError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(|err| GatewayError::Serve(std::io::Error::other(err)))?
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The agent gateway. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("settings", &self.inner.settings).finish_non_exhaustive()
    }
}

struct Inner {
    tokens: TokenKeys,
    agents: Mutex<HashMap<Arc<Scope>, AgentSlot>>,
    heartbeats: Arc<HeartbeatRecorder>,
    objects: Arc<dyn ScopeObjects>,
    logs: Option<LogStore>,
    settings: Settings,
    shutdown: watch::Sender<bool>,
    next_connection: AtomicU64,
    active: AtomicUsize,
    drained: Notify,
    /// The TLS handshake of `wss://`, with the current certificate; `None` serves `ws://`.
    tls: Option<TlsAcceptor>,
    /// Where each VM's provisioning time goes when its agent enrolls (see
    /// [`Gateway::observe_provisioning`]).
    provisioning: OnceLock<Family<crate::metrics::VmLabels, Histogram>>,
}

impl Settings {
    /// How often a connected agent gets a fresh session token.
    pub fn renewal_interval(&self) -> Duration {
        self.session_renewal.min(self.session_ttl / 2).max(Duration::from_millis(100))
    }
}

/// Jobs remembered per scope for accepting their log lines (the newest; older ones are looked
/// up in Redis).
const SENT_JOBS_KEPT: usize = 256;

/// Everything the gateway holds for one scope.
#[derive(Default)]
struct AgentSlot {
    connection: Option<Connection>,
    /// Commands without a final STATUS yet, by job id.
    pending: HashMap<String, PendingJob>,
    /// Jobs sent to this scope's agent, whose log lines it may send, oldest first: the sequence
    /// number of the last line stored for each (a line resent after a reconnect is stored once).
    /// A scope has a few jobs: a short list is searched faster than a map, and is smaller.
    sent: VecDeque<(Box<str>, Option<u64>)>,
    masker: Arc<RwLock<Masker>>,
}

impl AgentSlot {
    /// Remembers that `job_id` was sent to this scope's agent; whether it is new to this slot.
    fn remember(&mut self, job_id: &str) -> bool {
        if self.last_line(job_id).is_some() {
            return false;
        }
        if self.sent.len() >= SENT_JOBS_KEPT {
            self.sent.pop_front();
        }
        self.sent.push_back((job_id.into(), None));
        true
    }

    /// The sequence number of the last line stored for `job_id`, if it was sent to this scope.
    fn last_line(&mut self, job_id: &str) -> Option<&mut Option<u64>> {
        self.sent.iter_mut().rev().find(|(id, _)| &**id == job_id).map(|(_, last)| last)
    }
}

struct Connection {
    id: u64,
    agent_id: String,
    /// What the agent's HELLO said it can do beyond the basic commands.
    capabilities: Vec<String>,
    queue: outbox::Sender,
}

struct PendingJob {
    frame: Utf8Bytes,
    status: watch::Sender<Option<Status>>,
}

/// A command on its way: its STATUS updates, and its final one.
#[derive(Debug)]
pub struct Job {
    job_id: String,
    status: watch::Receiver<Option<Status>>,
}

impl Job {
    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The latest STATUS the agent sent, if any.
    pub fn latest(&self) -> Option<Status> {
        self.status.borrow().clone()
    }

    /// Waits for the next STATUS (intermediate or final).
    pub async fn next_status(&mut self) -> Result<Status, GatewayError> {
        loop {
            if self.status.changed().await.is_err() {
                return Err(GatewayError::Forgotten(self.job_id.clone()));
            }
            if let Some(status) = self.status.borrow_and_update().clone() {
                return Ok(status);
            }
        }
    }

    /// Waits for the final STATUS (succeeded or failed).
    pub async fn finished(mut self) -> Result<Status, GatewayError> {
        loop {
            if let Some(status) = self.status.borrow_and_update().as_ref().filter(|s| s.state.is_final()) {
                return Ok(status.clone());
            }
            if self.status.changed().await.is_err() {
                return match self.status.borrow().as_ref().filter(|s| s.state.is_final()) {
                    Some(status) => Ok(status.clone()),
                    None => Err(GatewayError::Forgotten(self.job_id)),
                };
            }
        }
    }
}

impl Gateway {
    /// A builder with the defaults.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            key: None,
            objects: Arc::new(NoObjects),
            redis_url: None,
            log_max_len: 10_000,
            log_retention: Duration::from_secs(7 * 86_400),
            settings: Settings::default(),
            tls: None,
        }
    }

    /// Whether it serves `wss://` (else `ws://`).
    pub fn is_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// A single-use enrollment token for the agent `agent_id` working for `scope`, valid for
    /// `ttl` (for the VM's cloud-init).
    pub fn mint_enrollment_token(
        &self,
        scope: &Scope,
        agent_id: &str,
        ttl: Duration,
    ) -> Result<Sensitive, GatewayError> {
        Ok(self.inner.tokens.mint_enrollment(scope, agent_id, ttl)?)
    }

    /// [`Gateway::mint_enrollment_token`] for a VM about to be created through a CloudProvider of
    /// type `provider`: when its agent enrolls, the VM's provisioning time is observed (see
    /// [`Gateway::observe_provisioning`]).
    pub fn mint_vm_enrollment_token(
        &self,
        scope: &Scope,
        agent_id: &str,
        ttl: Duration,
        provider: &str,
    ) -> Result<Sensitive, GatewayError> {
        Ok(self.inner.tokens.mint_vm_enrollment(scope, agent_id, ttl, provider)?)
    }

    /// From now on, observes into `histogram` each VM's provisioning time, once, as its agent
    /// enrolls: from the minting of its enrollment token (just before the VM was created) to the
    /// agent's HELLO, by provider type and role (`builder` or `preview`). A reconnect (with a
    /// session token) is not a provisioning.
    pub fn observe_provisioning(&self, histogram: Family<crate::metrics::VmLabels, Histogram>) {
        let _ = self.inner.provisioning.set(histogram);
    }

    /// The agents connected now: builders (of BuildJobs) and previews (of Environments).
    pub fn connected_agents(&self) -> ConnectedAgents {
        let agents = self.inner.agents();
        let mut connected = ConnectedAgents::default();
        for (scope, _) in agents.iter().filter(|(_, slot)| slot.connection.is_some()) {
            match scope.kind {
                ScopeKind::BuildJob => connected.builders += 1,
                ScopeKind::Environment => connected.previews += 1,
            }
        }
        connected
    }

    /// A bearer token that reads the logs of `job_id` over HTTP, valid for `ttl`.
    pub fn mint_log_token(&self, job_id: &str, ttl: Duration) -> Result<Sensitive, GatewayError> {
        Ok(self.inner.tokens.mint_logs(job_id, ttl)?)
    }

    /// The token keys (tests sign hand-made claims with them).
    pub fn tokens(&self) -> &TokenKeys {
        &self.inner.tokens
    }

    /// Sends a command (BUILD, DEPLOY, TERMINATE or TEST) to `scope`'s agent: now if it is
    /// connected, else when it connects. Sending a job id that is still pending does not send it
    /// twice. The secret values it carries are masked from then on in that scope's logs.
    ///
    /// An agent that predates TEST drops it without an answer: check [`Gateway::capabilities`]
    /// for [`CAPABILITY_TEST`](stagely_api::protocol::CAPABILITY_TEST) first.
    pub fn send(&self, scope: &Scope, command: Message) -> Result<Job, GatewayError> {
        let job_id = match &command {
            Message::Build(_) | Message::Deploy(_) | Message::Terminate(_) | Message::Test(_) => {
                command.job_id().unwrap_or_default().to_owned()
            }
            other => return Err(GatewayError::NotACommand(other.type_name())),
        };
        let frame = Utf8Bytes::from(serde_json::to_string(&command)?);
        let mut agents = self.inner.agents();
        if !agents.contains_key(scope) {
            agents.insert(Arc::new(scope.clone()), AgentSlot::default());
        }
        let Some(slot) = agents.get_mut(scope) else { unreachable!("inserted above") };
        slot.masker.write().unwrap_or_else(|poisoned| poisoned.into_inner()).add_from(&command);
        if slot.remember(&job_id)
            && let Some(logs) = &self.inner.logs
        {
            // Outlives this process: a restarted operator still takes the job's lines.
            let (logs, uid, job) = (logs.clone(), scope.uid.clone(), job_id.clone());
            tokio::spawn(async move {
                if let Err(err) = logs.record_job(&uid, &job).await {
                    tracing::warn!(error = %err, "failed to record a job sent to an agent");
                }
            });
        }
        if let Some(pending) = slot.pending.get(&job_id) {
            return Ok(Job { job_id, status: pending.status.subscribe() });
        }
        if let Some(connection) = &slot.connection {
            match connection.queue.try_send(frame.clone()) {
                Ok(()) => {}
                Err(outbox::SendError::Full) => {
                    tracing::warn!(
                        agent_id = %connection.agent_id, namespace = %scope.namespace, name = %scope.name, job_id,
                        "agent's send queue is full; disconnecting it"
                    );
                    slot.connection = None;
                    return Err(GatewayError::QueueFull {
                        job_id,
                        kind: scope.kind,
                        namespace: scope.namespace.clone(),
                        name: scope.name.clone(),
                    });
                }
                // It is going away; the command is sent when the agent is back.
                Err(outbox::SendError::Closed) => slot.connection = None,
            }
        }
        let (status, receiver) = watch::channel(None);
        slot.pending.insert(job_id.clone(), PendingJob { frame, status });
        Ok(Job { job_id, status: receiver })
    }

    /// Sends a command and waits for its final STATUS.
    pub async fn command(&self, scope: &Scope, command: Message) -> Result<Status, GatewayError> {
        self.send(scope, command)?.finished().await
    }

    /// Whether `scope`'s agent is connected now.
    pub fn is_connected(&self, scope: &Scope) -> bool {
        self.inner.agents().get(scope).is_some_and(|slot| slot.connection.is_some())
    }

    /// The capabilities `scope`'s connected agent listed in its HELLO (empty for an agent that
    /// predates them); `None` while no agent is connected.
    pub fn capabilities(&self, scope: &Scope) -> Option<Vec<String>> {
        let agents = self.inner.agents();
        agents.get(scope)?.connection.as_ref().map(|connection| connection.capabilities.clone())
    }

    /// Drops everything about `scope` (its object is gone): pending jobs fail with
    /// [`GatewayError::Forgotten`], its agent is disconnected.
    pub fn forget(&self, scope: &Scope) {
        self.inner.agents().remove(scope);
    }

    /// The last `lines` lines of `job_id`'s stored log (masked), oldest first; empty without
    /// Redis or when the log cannot be read.
    pub async fn log_tail(&self, job_id: &str, lines: usize) -> Vec<String> {
        let Some(logs) = &self.inner.logs else { return Vec::new() };
        match logs.tail(job_id, lines).await {
            Ok(stored) => stored.into_iter().map(|line| line.data).collect(),
            Err(err) => {
                tracing::warn!(job_id, error = %err, "failed to read a job's log tail");
                Vec::new()
            }
        }
    }

    /// The gateway's HTTP routes: the agent WebSocket and the log endpoint.
    pub fn router(&self) -> Router {
        Router::new()
            .route(CONNECT_PATH, get(connect))
            .route(LOGS_PATH, get(read_logs))
            .with_state(Arc::clone(&self.inner))
    }

    /// Serves on `listener` until `shutdown` completes; then stops accepting, closes every
    /// agent connection with a close frame (1001), and waits up to the drain timeout for them.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        self.serve_with(listener, Router::new(), shutdown).await
    }

    /// Like [`Gateway::serve`], with `extra` routes on the same listener (e.g. the registry's
    /// token endpoint, which builders reach where they reach the gateway).
    pub async fn serve_with(
        &self,
        listener: TcpListener,
        extra: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let inner = Arc::clone(&self.inner);
        let signal = async move {
            shutdown.await;
            inner.shutdown.send_replace(true);
        };
        let app = self.router().merge(extra).into_make_service_with_connect_info::<tls::Peer>();
        match &self.inner.tls {
            None => axum::serve(listener, app).with_graceful_shutdown(signal).await,
            Some(acceptor) => {
                let listener = tls::TlsListener::new(listener, acceptor.clone(), self.inner.settings.hello_timeout)
                    .map_err(GatewayError::Serve)?;
                axum::serve(listener, app).with_graceful_shutdown(signal).await
            }
        }
        .map_err(GatewayError::Serve)?;
        self.inner.shutdown.send_replace(true);
        let drained = async {
            loop {
                let notified = self.inner.drained.notified();
                if self.inner.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(self.inner.settings.drain_timeout, drained).await.is_err() {
            tracing::warn!(
                open = self.inner.active.load(Ordering::Acquire),
                "agent connections still open after the drain timeout"
            );
        }
        Ok(())
    }
}

impl Inner {
    fn agents(&self) -> MutexGuard<'_, HashMap<Arc<Scope>, AgentSlot>> {
        self.agents.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn connect(
    State(inner): State<Arc<Inner>>,
    axum::extract::ConnectInfo(tls::Peer(peer)): axum::extract::ConnectInfo<tls::Peer>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Small buffers: tungstenite's defaults (128 KiB read) would cost more than the rest of a
    // connection put together, at ten thousand mostly idle agents.
    upgrade
        .read_buffer_size(inner.settings.read_buffer_size)
        .write_buffer_size(0)
        .max_message_size(inner.settings.max_message_size)
        .max_frame_size(inner.settings.max_message_size)
        .on_upgrade(move |socket| connection::run(inner, socket, peer))
}

async fn read_logs(State(inner): State<Arc<Inner>>, Path(job_id): Path<String>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(token) = bearer else {
        return (StatusCode::UNAUTHORIZED, "a log-read bearer token is required\n").into_response();
    };
    match inner.tokens.verify_logs(token) {
        Ok(granted) if granted == job_id => {}
        Ok(_) => return (StatusCode::FORBIDDEN, "the token is for another job\n").into_response(),
        Err(err) => return (StatusCode::UNAUTHORIZED, format!("{err}\n")).into_response(),
    }
    let Some(logs) = &inner.logs else {
        return (StatusCode::SERVICE_UNAVAILABLE, "log storage is not configured\n").into_response();
    };
    // Page by page, so a long log is never held whole: the first page is read before
    // answering (a failure is a 503), the rest while the body is written.
    let first = match logs.read_page(&job_id, None, LOG_PAGE).await {
        Ok(page) => page,
        Err(err) => {
            tracing::warn!(error = %err, "failed to read job logs");
            return (StatusCode::SERVICE_UNAVAILABLE, "failed to read the logs\n").into_response();
        }
    };
    let logs = logs.clone();
    let pages = futures_util::stream::unfold(Some(Ok(first)), move |state| {
        let (logs, job_id) = (logs.clone(), job_id.clone());
        async move {
            let (lines, next) = match state? {
                Ok(page) => page,
                Err(err) => {
                    // The status is sent: the body ends early, without its last lines.
                    tracing::warn!(error = %err, "failed to read job logs");
                    return Some((Err(err), None));
                }
            };
            let mut body = String::new();
            for line in &lines {
                // Serializing a plain struct cannot fail.
                body.push_str(&serde_json::to_string(line).unwrap_or_default());
                body.push('\n');
            }
            let next = match next {
                Some(after) => Some(logs.read_page(&job_id, Some(after.as_str()), LOG_PAGE).await),
                None => None,
            };
            Some((Ok::<_, LogError>(body), next))
        }
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(pages)).into_response()
}

/// How many agents are connected, by role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectedAgents {
    /// Builder VMs' agents.
    pub builders: usize,
    /// Preview VMs' agents.
    pub previews: usize,
}

/// Log lines read from Redis at a time by the log endpoint.
const LOG_PAGE: usize = 500;
