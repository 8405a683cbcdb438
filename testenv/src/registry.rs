//! The CNCF distribution registry (built from its Go module by `testenv/build.sh`), started on
//! a free loopback port with filesystem storage in a temporary directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result, binaries, free_port};

/// A running registry; stopped when dropped.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    addr: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Registry {
    /// Starts a registry and waits until `GET /v2/` answers 200.
    pub fn start() -> Result<Self> {
        let bin = binaries()?.join("registry");
        let dir = tempfile::Builder::new()
            .prefix("stagely-registry-")
            .tempdir()
            .map_err(|source| Error::Io { path: std::env::temp_dir(), source })?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let text = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        std::fs::write(&config, text).map_err(|source| Error::Io { path: config.clone(), source })?;
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).map_err(|source| Error::Io { path: log_path.clone(), source })?;
        let err = log.try_clone().map_err(|source| Error::Io { path: log_path.clone(), source })?;
        let mut command = Command::new(&bin);
        command.arg("serve").arg(&config).stdin(Stdio::null()).stdout(log).stderr(err);
        let child = crate::spawn::spawn(command, false).map_err(|source| Error::Spawn { name: "registry", source })?;
        let mut registry = Self { child, dir, addr };
        registry.wait_ready(&log_path)?;
        Ok(registry)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let not_ready = |reason: String| Error::NotReady {
            name: "registry",
            reason,
            log: log.to_owned(),
            tail: std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n"),
        };
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(not_ready(format!("exited with {status}")));
            }
            if self.get_status("/v2/").is_some_and(|status| status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(not_ready("GET /v2/ did not answer 200 within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The HTTP status of `GET path` (accepting image manifests), if the registry answered.
    pub fn get_status(&self, path: &str) -> Option<u16> {
        let mut stream = TcpStream::connect(&self.addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        // Manifests are served only to clients that accept their media type.
        let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json";
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: {accept}\r\n\r\n", self.addr).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    /// `127.0.0.1:<port>`: the registry's host as image references name it.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where its data, configuration and log live.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
