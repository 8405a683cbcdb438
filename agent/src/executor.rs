//! Runs the gateway's commands: one job per job id, never twice, one at a time, with every
//! command's output streamed back as masked LOG lines and the job's progress as STATUS.
//!
//! Everything is bounded: BUILD, DEPLOY and TERMINATE each have a deadline; TERMINATE does not
//! wait behind a hung job but cancels every other job (killing its commands) and runs at once;
//! a log line is cut at [`LINE_MAX`] bytes with a marker saying so, and a job's command output
//! stops being sent after [`JOB_OUTPUT_MAX`] bytes.

use std::collections::{HashMap, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stagely_api::protocol::{JobState, JobSummary, Log, LogStream, Message, Status};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::config::{AgentConfig, Engine};
use crate::mask::Masker;
pub use crate::outbox::Outbox;

/// Longest log line sent, in bytes; a longer one is cut there and ends with a marker, so that no
/// line comes near the gateway's frame limit.
pub const LINE_MAX: usize = 16 << 10;

/// Command output a job sends at most, in bytes; past it, lines are no longer sent (the
/// failure message's tail still has the last ones).
pub const JOB_OUTPUT_MAX: usize = 32 << 20;

/// Standard output kept for a command's caller to parse, at most, in bytes (the end is kept).
const KEPT_MAX: usize = 4 << 20;

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
    /// it to exist; docker's names the user's plugin directory too).
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
        if self.engine == Engine::Docker
            && let Some(plugins) = &self.config.docker_plugin_dir
        {
            self.add_docker_plugin_dir(plugins)?;
        }
        Ok(())
    }

    /// Names `plugins` in the agent's docker configuration (`cliPluginsExtraDirs`), keeping the
    /// credentials `docker login` wrote there: docker looks for plugins in its configuration
    /// directory and its system directories, and the agent's own configuration directory
    /// would otherwise hide a `docker compose` installed for the user.
    fn add_docker_plugin_dir(&self, plugins: &Path) -> Result<(), JobError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.work_dir.join("docker");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(JobError::io("create", &dir))?;
        let path = dir.join("config.json");
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
                .map_err(|err| JobError::Invalid(format!("failed to parse {}: {err}", path.display())))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
            Err(source) => return Err(JobError::Io { what: "read", path, source }),
        };
        let dirs = serde_json::json!([plugins]);
        if config.get("cliPluginsExtraDirs") == Some(&dirs) {
            return Ok(());
        }
        config.insert("cliPluginsExtraDirs".into(), dirs);
        // Written aside and renamed: the file holds the registry credentials.
        let staged = dir.join("config.json.new");
        let _ = std::fs::remove_file(&staged);
        create_file(&staged, &serde_json::to_string_pretty(&config).expect("JSON serializes"), 0o600)?;
        std::fs::rename(&staged, &path).map_err(JobError::io("replace", &path))
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

/// A job's log: numbered, masked LOG messages, each line at most [`LINE_MAX`] bytes.
#[derive(Clone, Debug)]
pub struct JobLog {
    job_id: String,
    seq: Arc<AtomicU64>,
    /// Command output sent so far, in bytes.
    output_bytes: Arc<AtomicUsize>,
    capped: Arc<AtomicBool>,
    masker: Masker,
    outbox: Outbox,
}

impl JobLog {
    /// The log of `job_id`.
    pub fn new(job_id: &str, ctx: &Context) -> Self {
        Self {
            job_id: job_id.to_owned(),
            seq: Arc::new(AtomicU64::new(0)),
            output_bytes: Arc::default(),
            capped: Arc::default(),
            masker: ctx.masker.clone(),
            outbox: ctx.outbox.clone(),
        }
    }

    /// Sends one line, masked.
    pub fn line(&self, stream: LogStream, data: &str) {
        self.send_masked(stream, self.masker.mask(data), data.len());
    }

    /// Sends one line of a command's output (`data`, masked, of a line `original` bytes long),
    /// unless the job has sent [`JOB_OUTPUT_MAX`] bytes of output already.
    fn output(&self, stream: LogStream, data: String, original: usize) {
        let sent = self.output_bytes.fetch_add(data.len(), Ordering::Relaxed);
        if sent.saturating_add(data.len()) <= JOB_OUTPUT_MAX {
            self.send_masked(stream, data, original);
        } else if !self.capped.swap(true, Ordering::Relaxed) {
            self.system(&format!("this job's output passed {} MiB; further lines are not sent", JOB_OUTPUT_MAX >> 20));
        }
    }

    fn send_masked(&self, stream: LogStream, data: String, original: usize) {
        let data = cap_line(data, original);
        tracing::debug!(job_id = %self.job_id, ?stream, "{data}");
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.outbox.send(Message::Log(Log { job_id: self.job_id.clone(), stream, seq, timestamp_ms: now_ms(), data }));
    }

    /// Sends the agent's own account of what it does.
    pub fn system(&self, data: &str) {
        self.line(LogStream::System, data);
    }
}

/// `line` (masked; the line it came from was `original` bytes long) cut to [`LINE_MAX`] bytes at
/// a character boundary, with a marker saying how long it was, when either is longer.
pub fn cap_line(mut line: String, original: usize) -> String {
    if line.len() <= LINE_MAX && original <= LINE_MAX {
        return line;
    }
    let mut end = LINE_MAX.min(line.len());
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line.truncate(end);
    line.push_str(&format!(" [… line cut: it had {} bytes]", original.max(end)));
    line
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
    let mut reader = BufReader::new(reader);
    let mut kept = String::new();
    let mut raw = Vec::new();
    // A secret across the cut is masked whole before the cut, so it must be read whole.
    let read_max = LINE_MAX + log.masker.longest();
    while let Ok(Some(original)) = read_line_capped(&mut reader, read_max, &mut raw).await {
        let line = String::from_utf8_lossy(&raw);
        let masked = log.masker.mask(&line);
        {
            let mut tail = tail.lock().expect("tail lock");
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(shorten(&masked));
        }
        log.output(stream, masked, original);
        if keep {
            if kept.len() > 2 * KEPT_MAX {
                // The end is what callers read.
                let mut cut = kept.len() - KEPT_MAX;
                while !kept.is_char_boundary(cut) {
                    cut += 1;
                }
                let cut = kept[cut..].find('\n').map_or(cut, |i| cut + i + 1);
                kept.drain(..cut);
            }
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    kept
}

/// Reads one line from `reader` into `line` (without its line ending), keeping at most `max`
/// bytes of it and skipping the rest; returns the line's whole length, or `None` at the end.
pub async fn read_line_capped(
    reader: &mut (impl AsyncBufRead + Unpin),
    max: usize,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<usize>> {
    line.clear();
    let mut length = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok((length > 0).then_some(length));
        }
        let newline = available.iter().position(|b| *b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        length += chunk.len();
        let used = newline.map_or(chunk.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            if length <= max && line.last() == Some(&b'\r') {
                line.pop();
                length -= 1;
            }
            return Ok(Some(length));
        }
    }
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
    /// The tasks of the jobs not finished, by job id, for TERMINATE to cancel.
    running: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
}

impl Executor {
    /// An executor with `ctx`.
    pub fn new(ctx: Context) -> Self {
        Self { ctx, jobs: Arc::default(), queue: Arc::default(), running: Arc::default() }
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
        self.ctx.masker.add_from(&message);
        {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            if let Some(status) = jobs.get(&job_id) {
                tracing::info!(%job_id, state = ?status.state, "job already known; not running it again");
                self.ctx.outbox.send(Message::Status(status.clone()));
                return None;
            }
            jobs.insert(job_id.clone(), status_of(&job_id, JobState::Accepted));
        }
        self.send(status_of(&job_id, JobState::Accepted));
        let this = self.clone();
        // Held until the task is registered, so that it cannot unregister first.
        let mut running = self.running.lock().expect("running lock");
        let task = tokio::spawn(async move {
            if matches!(message, Message::Terminate(_)) {
                // A hung job must not keep the VM from being torn down.
                this.cancel_all_but(&message);
            }
            let turn = this.queue.lock().await;
            this.run_job(message).await;
            drop(turn);
        });
        running.insert(job_id, task.abort_handle());
        Some(task)
    }

    /// Runs one job to its end and reports it.
    async fn run_job(&self, message: Message) {
        let job_id = message.job_id().unwrap_or_default().to_owned();
        let started = Instant::now();
        self.update(status_of(&job_id, JobState::Running));
        let log = JobLog::new(&job_id, &self.ctx);
        log.system(&format!("{} {job_id} started", message.type_name()));
        let mut ctx = self.ctx.clone();
        let result = match ctx.prepare() {
            Err(err) => Err(err),
            Ok(()) => self.dispatch(&mut ctx, &log, message).await,
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
        self.finish(status);
    }

    /// Cancels every job but `terminate`'s: their tasks are aborted (which kills their
    /// commands) and they are reported failed.
    fn cancel_all_but(&self, terminate: &Message) {
        let own = terminate.job_id().unwrap_or_default();
        let others: Vec<(String, tokio::task::AbortHandle)> = {
            let mut running = self.running.lock().expect("running lock");
            let ids: Vec<String> = running.keys().filter(|id| *id != own).cloned().collect();
            ids.into_iter().filter_map(|id| running.remove_entry(&id)).collect()
        };
        for (job_id, task) in others {
            task.abort();
            let mut status = status_of(&job_id, JobState::Failed);
            status.message = Some(format!("cancelled: {} {own} stops every job on this VM", terminate.type_name()));
            if self.finish(status) {
                tracing::warn!(%job_id, "job cancelled by TERMINATE");
                JobLog::new(&job_id, &self.ctx).system("cancelled by TERMINATE");
            }
        }
    }

    async fn dispatch(&self, ctx: &mut Context, log: &JobLog, message: Message) -> Result<Outcome, JobError> {
        let deadline = |seconds: u64| Duration::from_secs(seconds.max(1));
        match message {
            Message::Build(build) => {
                let limit = deadline(build.timeout_seconds);
                tokio::time::timeout(limit, crate::build::build(ctx, log, &build))
                    .await
                    .unwrap_or(Err(JobError::Timeout(limit.as_secs())))
            }
            Message::Deploy(deploy) => {
                let limit = ctx.config.deploy_timeout;
                tokio::time::timeout(limit, crate::compose::deploy(ctx, log, &deploy))
                    .await
                    .unwrap_or(Err(JobError::Timeout(limit.as_secs())))
            }
            Message::Terminate(terminate) => {
                let limit =
                    ctx.config.terminate_timeout + Duration::from_secs(u64::from(terminate.grace_period_seconds));
                match tokio::time::timeout(limit, crate::compose::terminate(ctx, log, &terminate)).await {
                    Ok(result) => result,
                    Err(_) => {
                        // Whatever the engine does, the secrets do not outlive TERMINATE.
                        crate::compose::remove_secrets(ctx, log);
                        Err(JobError::Timeout(limit.as_secs()))
                    }
                }
            }
            // TEST keeps its own deadline: it has containers to remove when time runs out.
            Message::Test(test) => crate::testrun::test(ctx, log, &test).await,
            other => Err(JobError::Invalid(format!("{} is not a command", other.type_name()))),
        }
    }

    /// Records an intermediate status, unless the job has ended (it was cancelled).
    fn update(&self, status: Status) {
        {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            if jobs.get(&status.job_id).is_some_and(|s| s.state.is_final()) {
                return;
            }
            jobs.insert(status.job_id.clone(), status.clone());
        }
        self.send(status);
    }

    /// Records a final status unless the job already has one (a job cancelled while it was
    /// finishing keeps the first); returns whether it was recorded.
    fn finish(&self, status: Status) -> bool {
        {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            if jobs.get(&status.job_id).is_some_and(|s| s.state.is_final()) {
                return false;
            }
            jobs.insert(status.job_id.clone(), status.clone());
        }
        self.running.lock().expect("running lock").remove(&status.job_id);
        self.send(status);
        true
    }

    fn send(&self, status: Status) {
        self.ctx.outbox.send(Message::Status(status));
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

/// `path`, which should lie inside `root` (the clone), with every symlink followed: fails
/// unless it exists and what it leads to is inside `root` too. A repository can hold a symlink
/// to anywhere on the VM.
pub fn resolve_inside(what: &str, root: &Path, path: &Path) -> Result<PathBuf, JobError> {
    let shown = path.strip_prefix(root).unwrap_or(path).display().to_string();
    let root = root.canonicalize().map_err(JobError::io("resolve", root))?;
    let resolved = path
        .canonicalize()
        .map_err(|_| JobError::Invalid(format!("{what} `{shown}` does not exist in the repository")))?;
    if resolved.starts_with(&root) {
        Ok(resolved)
    } else {
        Err(JobError::Invalid(format!("{what} `{shown}` leads outside the repository (through a symlink)")))
    }
}

/// Writes `contents` to a new file at `path`, replacing whatever is there without following
/// it: a symlink the repository placed at that name is removed, not written through.
pub fn write_new_file(path: &Path, contents: &str) -> Result<(), JobError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(JobError::Invalid(format!("{} is a directory in the repository", path.display())));
        }
        Ok(_) => std::fs::remove_file(path).map_err(JobError::io("replace", path))?,
        Err(_) => {}
    }
    create_file(path, contents, 0o644)
}

/// Writes `contents` to a file at `path` that must not exist yet, with `mode`. `create_new`
/// (O_EXCL) never follows a symlink, even one that appeared since the caller looked.
pub fn create_file(path: &Path, contents: &str, mode: u32) -> Result<(), JobError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(JobError::io("write", path))?;
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(JobError::io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_clone_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("src"), dir.path().join("outside"));
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink("app", root.join("inner")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("app/up")).unwrap();
        assert!(resolve_inside("context", &root, &root.join("inner")).is_ok());
        for hostile in ["escape", "app/up", "app/../../outside", "missing"] {
            let err = resolve_inside("context", &root, &root.join(hostile)).unwrap_err().to_string();
            assert!(err.contains(&format!("context `{hostile}`")), "{err}");
        }

        let target = outside.join("victim");
        std::fs::write(&target, "untouched").unwrap();
        std::os::unix::fs::symlink(&target, root.join("override.yml")).unwrap();
        write_new_file(&root.join("override.yml"), "written").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(std::fs::read_to_string(root.join("override.yml")).unwrap(), "written");
        assert!(!std::fs::symlink_metadata(root.join("override.yml")).unwrap().is_symlink());
    }

    #[test]
    fn dockers_configuration_names_the_users_plugins_and_keeps_the_logins() {
        let dir = tempfile::tempdir().unwrap();
        let env = [
            ("STAGELY_GATEWAY_URL", "ws://a".to_owned()),
            ("STAGELY_INSECURE", "1".to_owned()),
            ("STAGELY_AGENT_ID", "a".to_owned()),
            ("STAGELY_AGENT_TOKEN", "t".to_owned()),
            ("STAGELY_WORK_DIR", dir.path().join("work").to_string_lossy().into_owned()),
            ("HOME", "/home/stagely".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v));
        let config = Arc::new(AgentConfig::load_with(None, &env.into_iter().collect()).unwrap());
        let ctx = Context::new(config, Outbox::default());
        let path = dir.path().join("work/docker/config.json");
        let read = || serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&path).unwrap()).unwrap();
        ctx.prepare().unwrap();
        assert_eq!(read(), serde_json::json!({"cliPluginsExtraDirs": ["/home/stagely/.docker/cli-plugins"]}));

        // What `docker login` wrote stays.
        std::fs::write(&path, r#"{"auths":{"r:5000":{"auth":"dTpw"}}}"#).unwrap();
        ctx.prepare().unwrap();
        assert_eq!(
            read(),
            serde_json::json!({"auths": {"r:5000": {"auth": "dTpw"}}, "cliPluginsExtraDirs": ["/home/stagely/.docker/cli-plugins"]})
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, "{not json").unwrap();
        assert!(ctx.prepare().unwrap_err().to_string().contains("config.json"));
    }

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
    fn long_lines_are_cut_with_a_marker() {
        assert_eq!(cap_line("short".into(), 5), "short");
        let cut = cap_line("é".repeat(LINE_MAX), 2 * LINE_MAX);
        assert!(cut.len() <= LINE_MAX + 40, "{}", cut.len());
        assert!(cut.ends_with(&format!(" [… line cut: it had {} bytes]", 2 * LINE_MAX)), "{cut}");
        // Masked to a short line, but read from a longer one: still marked.
        assert!(cap_line("***".into(), LINE_MAX + 1).starts_with("*** [… line cut"));
    }

    #[test]
    fn a_jobs_output_stops_being_sent_past_its_cap() {
        let env = [("STAGELY_GATEWAY_URL", "wss://a"), ("STAGELY_AGENT_ID", "a"), ("STAGELY_AGENT_TOKEN", "t")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Arc::new(AgentConfig::load_with(None, &env.into_iter().collect()).unwrap());
        let outbox = Outbox::new(usize::MAX);
        let log = JobLog::new("j", &Context::new(config, outbox.clone()));
        let (mut output, mut system) = (0, Vec::new());
        for _ in 0..(JOB_OUTPUT_MAX / LINE_MAX + 100) {
            log.output(LogStream::Stdout, "x".repeat(LINE_MAX), LINE_MAX);
            while let Some(message) = outbox.try_recv() {
                match message {
                    Message::Log(line) if line.stream == LogStream::Stdout => output += line.data.len(),
                    Message::Log(line) => system.push(line.data),
                    _ => {}
                }
            }
        }
        assert_eq!(output, JOB_OUTPUT_MAX);
        assert_eq!(system, ["this job's output passed 32 MiB; further lines are not sent"]);
    }

    #[tokio::test]
    async fn reading_a_line_keeps_at_most_its_limit() {
        let input = format!("{}\nshort\r\n\nlast", "x".repeat(100_000));
        let mut reader = BufReader::with_capacity(64, input.as_bytes());
        let mut line = Vec::new();
        assert_eq!(read_line_capped(&mut reader, 1000, &mut line).await.unwrap(), Some(100_000));
        assert_eq!(line.len(), 1000);
        assert_eq!(read_line_capped(&mut reader, 1000, &mut line).await.unwrap(), Some(5));
        assert_eq!(line, b"short");
        assert_eq!(read_line_capped(&mut reader, 1000, &mut line).await.unwrap(), Some(0));
        assert_eq!(read_line_capped(&mut reader, 1000, &mut line).await.unwrap(), Some(4));
        assert_eq!(line, b"last");
        assert_eq!(read_line_capped(&mut reader, 1000, &mut line).await.unwrap(), None);
    }

    #[test]
    fn names_are_plain() {
        assert!(check_name("project", "shop-pr-42").is_ok());
        for bad in ["", "..", "a/b", "a b", "-x", "x;rm"] {
            assert!(check_name("project", bad).is_err(), "{bad}");
        }
    }
}
