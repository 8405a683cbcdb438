//! The CNCF distribution registry (built from its Go module by `testenv/build.sh`), started on
//! a free loopback port with filesystem storage in a temporary directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::server::Server;
use crate::{Error, Result, binaries, free_port};

/// A running registry; stopped when dropped.
#[derive(Debug)]
pub struct Registry(Server);

impl Registry {
    /// Starts a registry and waits until `GET /v2/` answers 200.
    pub fn start() -> Result<Self> {
        let bin = binaries()?.join("registry");
        let port = free_port()?;
        let prepare = |dir: &std::path::Path| {
            let config = dir.join("config.yml");
            let text = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            );
            std::fs::write(&config, text).map_err(|source| Error::Io { path: config.clone(), source })?;
            let mut command = Command::new(&bin);
            command.arg("serve").arg(&config);
            Ok(command)
        };
        let server = Server::start("registry", "http", port, prepare, |port| get_status(port, "/v2/") == Some(200))?;
        Ok(Self(server))
    }

    /// The HTTP status of `GET path` (accepting image manifests), if the registry answered.
    pub fn get_status(&self, path: &str) -> Option<u16> {
        get_status(self.0.port(), path)
    }

    /// `127.0.0.1:<port>`: the registry's host as image references name it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.0.port())
    }
}

fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // Manifests are served only to clients that accept their media type.
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                  application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json";
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}
