//! Runs the gateway's commands: one job per job id, never twice, one at a time, with every
//! command's output streamed back as masked LOG lines and the job's progress as STATUS.

use std::collections::{HashMap, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stagely_api::protocol::{JobState, JobSummary, Log, LogStream, Message, Status};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::config::{AgentConfig, Engine};
use crate::mask::Masker;

/// Where the agent's messages to the gateway go; the connection drains it, and holds what it
/// could not send until the next connection.
pub type Outbox = mpsc::UnboundedSender<Message>;

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A command could not be started.
    #[error("failed to start `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("failed to {what}: `{program}` exited with {code}")]
    Failed {
        /// What the command was for, e.g. "push the image".
        what: String,
        /// The program.
        program: String,
        /// Its exit code (-1 when killed by a signal).
        code: i32,
    },
    /// A file could not be written or read.
    #[error("failed to {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The command's parameters are unusable.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The job took longer than allowed.
    #[error("timed out after {0} seconds")]
    Timeout(u64),
    /// The services did not become healthy.
    #[error("{0}")]
    Unhealthy(String),
    /// A step failed: the message names it (the service, hook or test command) and ends with
    /// the last lines of its output.
    #[error("{message}")]
    Step {
        /// What failed, and its output's last lines.
        message: String,
        /// The exit code, where there is one.
        code: Option<i32>,
    },
}

impl JobError {
    /// The exit code to report, if a command failed.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            JobError::Failed { code, .. } => Some(*code),
            JobError::Step { code, .. } => *code,
            _ => None,
        }
    }

    /// An I/O error on `path`.
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JobError + use<> {
        let path = path.to_owned();
        move |source| JobError::Io { what, path, source }
    }
}

/// What the jobs share: settings, the masker, and where messages go.
#[derive(Clone, Debug)]
pub struct Context {
    /// The container engine.
    pub engine: Engine,
    /// The compose command.
    pub compose_command: Vec<String>,
    /// Where clones, overrides and secrets live.
    pub work_dir: PathBuf,
    /// The agent's settings (registries).
    pub config: Arc<AgentConfig>,
    /// Known secret values.
    pub masker: Masker,
    /// Environment variables set on every engine, compose and git command (tests point podman
    /// at their own storage with these).
    pub env: Vec<(String, String)>,
    /// Where messages go.
    pub outbox: Outbox,
}

impl Context {
    /// A context for `config`, sending to `outbox`.
    pub fn new(config: Arc<AgentConfig>, outbox: Outbox) -> Self {
        let mut env = Vec::new();
        // The agent's own registry credentials, apart from the VM user's.
        match config.engine {
            Engine::Podman => env.push((
                "REGISTRY_AUTH_FILE".to_owned(),
                config.work_dir.join("auth.json").to_string_lossy().into_owned(),
            )),
            Engine::Docker => {
                env.push(("DOCKER_CONFIG".to_owned(), config.work_dir.join("docker").to_string_lossy().into_owned()))
            }
        }
        Self {
            engine: config.engine,
            compose_command: config.compose_command.clone(),
            work_dir: config.work_dir.clone(),
            config,
            masker: Masker::new(),
            env,
            outbox,
        }
    }

    /// Creates the work directory and the agent's registry credentials file (podman wants
    /// it to exist).
    pub fn prepare(&self) -> Result<(), JobError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.work_dir)
            .map_err(JobError::io("create", &self.work_dir))?;
        if self.engine == Engine::Podman {
            let path = self.work_dir.join("auth.json");
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(mut file) => {
                    std::io::Write::write_all(&mut file, b"{\"auths\":{}}\n").map_err(JobError::io("write", &path))?
                }
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(JobError::Io { what: "write", path, source: err }),
            }
        }
        Ok(())
    }

    /// A command for `program` with the context's environment.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.envs(self.env.iter().map(|(k, v)| (k, v))).kill_on_drop(true).stdin(Stdio::null());
        command
    }

    /// The container engine's command.
    pub fn engine_command(&self) -> Command {
        self.command(self.engine.program())
    }

    /// The compose command with `args` before the subcommand (project, files).
    pub fn compose(&self, args: &[String]) -> Command {
        let mut command = self.command(&self.compose_command[0]);
        command.args(&self.compose_command[1..]).args(args);
        command
    }

    /// Makes registries that the configuration calls insecure reachable by podman, which has
    /// no per-command switch for `podman-compose pull`: a registries.conf naming them.
    pub fn allow_insecure(&mut self, servers: &[String]) -> Result<(), JobError> {
        if self.engine != Engine::Podman {
            // Docker treats loopback registries as insecure; others are daemon configuration.
            return Ok(());
        }
        let mut insecure: Vec<&String> = servers.iter().filter(|s| self.config.is_insecure_registry(s)).collect();
        insecure.sort();
        insecure.dedup();
        if insecure.is_empty() {
            return Ok(());
        }
        let mut text = String::from("unqualified-search-registries = [\"docker.io\"]\n");
        for server in insecure {
            text.push_str(&format!("\n[[registry]]\nlocation = \"{server}\"\ninsecure = true\n"));
        }
        std::fs::create_dir_all(&self.work_dir).map_err(JobError::io("create", &self.work_dir))?;
        let path = self.work_dir.join("registries.conf");
        std::fs::write(&path, text).map_err(JobError::io("write", &path))?;
        self.env.retain(|(k, _)| k != "CONTAINERS_REGISTRIES_CONF");
        self.env.push(("CONTAINERS_REGISTRIES_CONF".to_owned(), path.to_string_lossy().into_owned()));
        Ok(())
    }
}

/// The registry host of an image reference (`host[:port]/path[:tag][@digest]`), if it names one.
pub fn registry_of(image: &str) -> Option<String> {
    let (first, _) = image.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then(|| first.to_owned())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A job's log: numbered, masked LOG messages.
#[derive(Clone, Debug)]
pub struct JobLog {
    job_id: String,
    seq: Arc<AtomicU64>,
    masker: Masker,
    outbox: Outbox,
}

impl JobLog {
    /// The log of `job_id`.
    pub fn new(job_id: &str, ctx: &Context) -> Self {
        Self {
            job_id: job_id.to_owned(),
            seq: Arc::new(AtomicU64::new(0)),
            masker: ctx.masker.clone(),
            outbox: ctx.outbox.clone(),
        }
    }

    /// Sends one line, masked.
    pub fn line(&self, stream: LogStream, data: &str) {
        self.send_masked(stream, self.masker.mask(data));
    }

    fn send_masked(&self, stream: LogStream, data: String) {
        tracing::debug!(job_id = %self.job_id, ?stream, "{data}");
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let _ = self.outbox.send(Message::Log(Log {
            job_id: self.job_id.clone(),
            stream,
            seq,
            timestamp_ms: now_ms(),
            data,
        }));
    }

    /// Sends the agent's own account of what it does.
    pub fn system(&self, data: &str) {
        self.line(LogStream::System, data);
    }
}

/// Lines of output a failure message carries.
pub const TAIL_LINES: usize = 20;

/// Longest line a failure message carries; longer ones are cut.
const TAIL_LINE_MAX: usize = 500;

/// A command that ran to its end.
#[derive(Debug)]
pub struct Finished {
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output (not masked: callers parse it).
    pub stdout: String,
    /// The last [`TAIL_LINES`] lines of its standard output and error together, in the order
    /// they arrived, masked.
    pub tail: Vec<String>,
}

impl Finished {
    /// The exit code (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// Runs `command` to its end, streaming its output to `log`; `stdin` is written to its standard
/// input. Fails only when it cannot be run at all.
pub async fn execute(log: &JobLog, mut command: Command, stdin: Option<&str>) -> Result<Finished, JobError> {
    let std = command.as_std();
    let program = std.get_program().to_string_lossy().into_owned();
    let argv: Vec<String> =
        std::iter::once(program.clone()).chain(std.get_args().map(|a| a.to_string_lossy().into_owned())).collect();
    log.system(&format!("$ {}", argv.join(" ")));
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().map_err(|source| JobError::Spawn { program: program.clone(), source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(input.as_bytes()).await;
        drop(pipe);
    }
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let tail = Mutex::new(VecDeque::with_capacity(TAIL_LINES));
    let (stdout, _) = tokio::join!(
        forward(stdout, log, LogStream::Stdout, &tail, true),
        forward(stderr, log, LogStream::Stderr, &tail, false)
    );
    let status = child.wait().await.map_err(|source| JobError::Spawn { program, source })?;
    let tail = tail.into_inner().expect("tail lock").into();
    Ok(Finished { status, stdout, tail })
}

/// Runs `command`, streaming its output to `log`; `stdin` is written to its standard input.
/// Returns its standard output; fails when it exits unsuccessfully.
pub async fn run(log: &JobLog, what: &str, command: Command, stdin: Option<&str>) -> Result<String, JobError> {
    let program = command.as_std().get_program().to_string_lossy().into_owned();
    let finished = execute(log, command, stdin).await?;
    if finished.status.success() {
        Ok(finished.stdout)
    } else {
        Err(JobError::Failed { what: what.to_owned(), program, code: finished.code() })
    }
}

async fn forward(
    reader: impl AsyncRead + Unpin,
    log: &JobLog,
    stream: LogStream,
    tail: &Mutex<VecDeque<String>>,
    keep: bool,
) -> String {
    let mut lines = BufReader::new(reader).lines();
    let mut kept = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        let masked = log.masker.mask(&line);
        {
            let mut tail = tail.lock().expect("tail lock");
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(shorten(&masked));
        }
        log.send_masked(stream, masked);
        if keep {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    kept
}

/// `line` cut to [`TAIL_LINE_MAX`] bytes (at a character boundary).
fn shorten(line: &str) -> String {
    if line.len() <= TAIL_LINE_MAX {
        return line.to_owned();
    }
    let mut end = TAIL_LINE_MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// A failure message: `headline`, then `tail` (the last lines of `source`) when there are any.
pub fn with_tail(headline: &str, source: &str, tail: &[String]) -> String {
    match tail.len() {
        0 => headline.to_owned(),
        1 => format!("{headline}; the last line of {source}:\n{}", tail[0]),
        n => format!("{headline}; the last {n} lines of {source}:\n{}", tail.join("\n")),
    }
}

/// What a job ended with.
#[derive(Debug, Default)]
pub struct Outcome {
    /// A summary.
    pub message: Option<String>,
    /// BUILD: the pushed image's digest.
    pub image_digest: Option<String>,
    /// DEPLOY: the services.
    pub services: Vec<stagely_api::protocol::ServiceStatus>,
}

/// The agent's jobs, by id: each command runs once, and a resent one is answered with its
/// status.
#[derive(Clone)]
pub struct Executor {
    ctx: Context,
    jobs: Arc<Mutex<HashMap<String, Status>>>,
    /// Jobs run one at a time, in the order received.
    queue: Arc<tokio::sync::Mutex<()>>,
}

impl Executor {
    /// An executor with `ctx`.
    pub fn new(ctx: Context) -> Self {
        Self { ctx, jobs: Arc::default(), queue: Arc::default() }
    }

    /// The shared context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Every known job and where it is, for HELLO.
    pub fn summaries(&self) -> Vec<JobSummary> {
        let jobs = self.jobs.lock().expect("jobs lock");
        let mut summaries: Vec<_> =
            jobs.values().map(|s| JobSummary { job_id: s.job_id.clone(), state: s.state }).collect();
        summaries.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        summaries
    }

    /// The latest status of every job, resent after a reconnect.
    pub fn statuses(&self) -> Vec<Status> {
        self.jobs.lock().expect("jobs lock").values().cloned().collect()
    }

    /// The latest status of `job_id`.
    pub fn status(&self, job_id: &str) -> Option<Status> {
        self.jobs.lock().expect("jobs lock").get(job_id).cloned()
    }

    /// Takes a command from the gateway. A command whose job id is known is not run again: its
    /// status is sent instead. Returns the job's task, if one was started.
    pub fn handle(&self, message: Message) -> Option<tokio::task::JoinHandle<()>> {
        let job_id = message.job_id()?.to_owned();
        if !matches!(message, Message::Build(_) | Message::Deploy(_) | Message::Terminate(_) | Message::Test(_)) {
            return None;
        }
        // Secrets are masked from the moment they arrive.
        match &message {
            Message::Build(build) => {
                if let Some(token) = &build.git_token {
                    self.ctx.masker.add(token.expose());
                }
                if let Some(auth) = &build.registry_auth {
                    self.ctx.masker.add(auth.password.expose());
                }
            }
            Message::Deploy(deploy) => {
                if let Some(token) = &deploy.git_token {
                    self.ctx.masker.add(token.expose());
                }
                if let Some(auth) = &deploy.registry_auth {
                    self.ctx.masker.add(auth.password.expose());
                }
                for secret in &deploy.secrets {
                    self.ctx.masker.add(secret.value.expose());
                }
            }
            Message::Test(test) => {
                if let Some(auth) = &test.registry_auth {
                    self.ctx.masker.add(auth.password.expose());
                }
            }
            _ => {}
        }
        {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            if let Some(status) = jobs.get(&job_id) {
                tracing::info!(%job_id, state = ?status.state, "job already known; not running it again");
                let _ = self.ctx.outbox.send(Message::Status(status.clone()));
                return None;
            }
            jobs.insert(job_id.clone(), status_of(&job_id, JobState::Accepted));
        }
        self.send(status_of(&job_id, JobState::Accepted));
        let this = self.clone();
        Some(tokio::spawn(async move {
            let _turn = this.queue.lock().await;
            let started = Instant::now();
            this.update(status_of(&job_id, JobState::Running));
            let log = JobLog::new(&job_id, &this.ctx);
            log.system(&format!("{} {job_id} started", message.type_name()));
            let mut ctx = this.ctx.clone();
            let result = match ctx.prepare() {
                Err(err) => Err(err),
                Ok(()) => this.dispatch(&mut ctx, &log, message).await,
            };

            let mut status = status_of(&job_id, JobState::Succeeded);
            status.duration_seconds = Some(started.elapsed().as_secs_f64());
            match result {
                Ok(outcome) => {
                    status.exit_code = Some(0);
                    status.message = outcome.message;
                    status.image_digest = outcome.image_digest;
                    status.services = outcome.services;
                    log.system(&format!("job {job_id} succeeded"));
                }
                Err(err) => {
                    status.state = JobState::Failed;
                    status.exit_code = err.exit_code();
                    let message = ctx.masker.mask(&err.to_string());
                    log.system(&format!("job {job_id} failed: {message}"));
                    status.message = Some(message);
                }
            }
            tracing::info!(%job_id, state = ?status.state, message = status.message.as_deref().unwrap_or(""), "job finished");
            this.update(status);
        }))
    }

    async fn dispatch(&self, ctx: &mut Context, log: &JobLog, message: Message) -> Result<Outcome, JobError> {
        match message {
            Message::Build(build) => {
                let limit = build.timeout_seconds.max(1);
                match tokio::time::timeout(Duration::from_secs(limit), crate::build::build(ctx, log, &build)).await {
                    Ok(result) => result,
                    Err(_) => Err(JobError::Timeout(limit)),
                }
            }
            Message::Deploy(deploy) => crate::compose::deploy(ctx, log, &deploy).await,
            Message::Terminate(terminate) => crate::compose::terminate(ctx, log, &terminate).await,
            // TEST keeps its own deadline: it has containers to remove when time runs out.
            Message::Test(test) => crate::testrun::test(ctx, log, &test).await,
            other => Err(JobError::Invalid(format!("{} is not a command", other.type_name()))),
        }
    }

    fn update(&self, status: Status) {
        self.jobs.lock().expect("jobs lock").insert(status.job_id.clone(), status.clone());
        self.send(status);
    }

    fn send(&self, status: Status) {
        let _ = self.ctx.outbox.send(Message::Status(status));
    }
}

fn status_of(job_id: &str, state: JobState) -> Status {
    Status {
        job_id: job_id.to_owned(),
        state,
        exit_code: None,
        duration_seconds: None,
        message: None,
        image_digest: None,
        services: Vec::new(),
    }
}

/// Fails unless `name` is a plain name usable as a file or project name.
pub fn check_name(what: &str, name: &str) -> Result<(), JobError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(JobError::Invalid(format!("{what} `{name}` must be a plain name ([A-Za-z0-9._-])"))) }
}

/// `path` as a relative path that stays inside the repository.
pub fn relative(what: &str, path: &str) -> Result<PathBuf, JobError> {
    let path = Path::new(if path.is_empty() { "." } else { path });
    if path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        Ok(path.to_owned())
    } else {
        Err(JobError::Invalid(format!("{what} `{}` must be a path inside the repository", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts_of_image_references() {
        assert_eq!(registry_of("127.0.0.1:5000/shop/api:1").as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(registry_of("registry.example.com/a@sha256:00").as_deref(), Some("registry.example.com"));
        assert_eq!(registry_of("localhost/a").as_deref(), Some("localhost"));
        assert_eq!(registry_of("library/nginx"), None);
        assert_eq!(registry_of("nginx"), None);
    }

    #[test]
    fn paths_stay_inside_the_repository() {
        assert!(relative("context", "./api").is_ok());
        assert!(relative("context", "").is_ok());
        assert!(relative("context", "../etc").is_err());
        assert!(relative("dockerfile", "/etc/passwd").is_err());
    }

    #[test]
    fn failure_messages_end_with_the_output_tail() {
        assert_eq!(with_tail("it failed", "its output", &[]), "it failed");
        assert_eq!(with_tail("it failed", "its log", &["boom".into()]), "it failed; the last line of its log:\nboom");
        assert_eq!(
            with_tail("it failed", "its output", &["a".into(), "b".into()]),
            "it failed; the last 2 lines of its output:\na\nb"
        );
        assert_eq!(shorten("short"), "short");
        let long = "é".repeat(TAIL_LINE_MAX);
        let cut = shorten(&long);
        assert!(cut.len() <= TAIL_LINE_MAX + "…".len() && cut.ends_with('…'), "{}", cut.len());
    }

    #[test]
    fn names_are_plain() {
        assert!(check_name("project", "shop-pr-42").is_ok());
        for bad in ["", "..", "a/b", "a b", "-x", "x;rm"] {
            assert!(check_name("project", bad).is_err(), "{bad}");
        }
    }
}
