//! The other real servers tests run against: `redis-server` and moto's server (EC2 and IAM), on
//! free loopback ports with their files in a temporary directory. Like the control plane they
//! stop when dropped and die with the test process, unless started detached in a directory of
//! their own (for `make demo`), when they outlive it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result, free_port};

/// A running server; stopped when dropped.
pub struct Server {
    name: &'static str,
    scheme: &'static str,
    port: u16,
    child: Child,
    /// Where its files and log are.
    dir: PathBuf,
    /// The temporary directory, unless the server runs detached in a directory of its own.
    _dir: Option<tempfile::TempDir>,
    /// Left running when dropped (set once it is ready: one that failed to start is stopped).
    detached: bool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("name", &self.name).field("port", &self.port).finish_non_exhaustive()
    }
}

impl Server {
    /// A redis-server without persistence on a free port.
    pub fn redis() -> Result<Self> {
        Self::redis_on(free_port()?)
    }

    /// A redis-server on `port` (to bring one back where an earlier one was).
    pub fn redis_on(port: u16) -> Result<Self> {
        Self::redis_in(port, None)
    }

    /// A redis-server on `port` that outlives this process, its log in `dir` (for `make demo`;
    /// `stagely-testenv down` stops it by its [`Server::pid`]).
    pub fn redis_detached(port: u16, dir: &Path) -> Result<Self> {
        Self::redis_in(port, Some(dir))
    }

    fn redis_in(port: u16, dir: Option<&Path>) -> Result<Self> {
        let command = |_: &Path| {
            let mut command = Command::new("redis-server");
            command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
            Ok(command)
        };
        Self::start_in("redis-server", "redis", port, dir, command, |port| answers(port, b"PING\r\n", b"+PONG\r\n"))
    }

    /// moto's server with `env` (e.g. `INITIAL_NO_AUTH_ACTION_COUNT`) on a free port.
    pub fn moto(env: &[(&str, &str)]) -> Result<Self> {
        let port = free_port()?;
        let command = |_: &Path| {
            let mut command = Command::new("moto_server");
            command.args(["-H", "127.0.0.1", "-p", &port.to_string()]).envs(env.iter().copied());
            Ok(command)
        };
        Self::start("moto_server", "http", port, command, |port| {
            answers(port, b"GET /moto-api/ HTTP/1.0\r\n\r\n", b"HTTP/1.")
        })
    }

    /// Runs the command `prepare` makes in a fresh directory (which it may fill first), with
    /// its output in a log file there, and waits until `ready(port)`.
    pub(crate) fn start(
        name: &'static str,
        scheme: &'static str,
        port: u16,
        prepare: impl FnOnce(&Path) -> Result<Command>,
        ready: impl Fn(u16) -> bool,
    ) -> Result<Self> {
        Self::start_in(name, scheme, port, None, prepare, ready)
    }

    /// Like [`Server::start`], but with `dir` (created if missing) instead of a temporary
    /// directory, the server detached: it outlives this process once ready.
    pub(crate) fn start_in(
        name: &'static str,
        scheme: &'static str,
        port: u16,
        dir: Option<&Path>,
        prepare: impl FnOnce(&Path) -> Result<Command>,
        ready: impl Fn(u16) -> bool,
    ) -> Result<Self> {
        let (path, tempdir): (PathBuf, _) = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
                (dir.to_owned(), None)
            }
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix(&format!("stagely-{name}-"))
                    .tempdir()
                    .map_err(|source| Error::Io { path: std::env::temp_dir(), source })?;
                // A server in a static is never dropped, nor is its directory.
                crate::at_exit::remove_at_exit(tmp.path());
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let mut command = prepare(&path)?;
        let log_path = path.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(|source| Error::Io { path: log_path.clone(), source })?;
        let err = log.try_clone().map_err(|source| Error::Io { path: log_path.clone(), source })?;
        command.current_dir(&path).stdin(Stdio::null()).stdout(log).stderr(err);
        let detach = dir.is_some();
        let child = crate::spawn::spawn(command, detach).map_err(|source| Error::Spawn { name, source })?;
        let mut server = Self { name, scheme, port, child, dir: path.clone(), _dir: tempdir, detached: false };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reason = match server.child.try_wait() {
                Ok(Some(status)) => format!("exited with {status}"),
                _ if ready(port) => {
                    server.detached = detach;
                    return Ok(server);
                }
                _ if Instant::now() > deadline => "not ready within 30 s".to_owned(),
                _ => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail = tail.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            return Err(Error::NotReady { name, reason, log: log_path, tail });
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory holding its files and its log (`<name>.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>` or `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Stops it now (a test of what happens when it goes away).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.detached {
            self.stop();
        }
    }
}

/// Whether a connection to `port` that sends `question` gets an answer starting with `answer`.
fn answers(port: u16, question: &[u8], answer: &[u8]) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut got = vec![0u8; answer.len()];
    stream.write_all(question).is_ok() && stream.read_exact(&mut got).is_ok() && got == answer
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
