//! The CNCF distribution registry (built from its Go module by `testenv/build.sh`), started on
//! a free loopback port with filesystem storage in a temporary directory, without authentication
//! or with distribution's `token` auth; or, for `make demo`, detached on a given port with its
//! files in a given directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::server::Server;
use crate::{Error, Result, binaries, free_port};

/// A running registry; stopped when dropped.
#[derive(Debug)]
pub struct Registry(Server);

/// What a registry started with [`Registry::start_with_token_auth`] trusts: its config's
/// `auth.token` section.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    /// The token endpoint clients are sent to (`auth.token.realm`).
    pub realm: String,
    /// The audience tokens must name (`auth.token.service`).
    pub service: String,
    /// The issuer tokens must name (`auth.token.issuer`).
    pub issuer: String,
    /// PEM certificate(s) whose keys may sign tokens (`auth.token.rootcertbundle`).
    pub root_cert_pem: String,
}

/// A token signing key and its self-signed certificate (ECDSA P-256), fresh on each call: what
/// a registry with token auth trusts and the operator signs with, for tests and the demo.
#[derive(Clone)]
pub struct TokenKey {
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The self-signed certificate for it, PEM.
    pub cert_pem: String,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Generates a key and a self-signed certificate for it.
    pub fn generate() -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "stagely registry token signer");
        let cert = params.self_signed(&key)?;
        Ok(Self { key_pem: key.serialize_pem(), cert_pem: cert.pem() })
    }
}

impl Registry {
    /// Starts a registry without authentication and waits until `GET /v2/` answers 200.
    pub fn start() -> Result<Self> {
        Self::start_with(None, free_port()?, None)
    }

    /// Starts a registry that requires tokens signed by a key `auth.root_cert_pem` certifies,
    /// and waits until `GET /v2/` answers 401.
    pub fn start_with_token_auth(auth: &TokenAuth) -> Result<Self> {
        Self::start_with(Some(auth), free_port()?, None)
    }

    /// Starts a registry with token auth on `port` that outlives this process, its config, data
    /// and log in `dir` (for `make demo`; `stagely-testenv down` stops it by its
    /// [`Registry::pid`]).
    pub fn start_detached(auth: &TokenAuth, port: u16, dir: &Path) -> Result<Self> {
        Self::start_with(Some(auth), port, Some(dir))
    }

    fn start_with(auth: Option<&TokenAuth>, port: u16, dir: Option<&Path>) -> Result<Self> {
        let bin = binaries()?.join("registry");
        let prepare = |dir: &std::path::Path| {
            let mut config = serde_json::json!({
                "version": "0.1",
                "log": {"level": "info", "accesslog": {"disabled": true}},
                "storage": {"filesystem": {"rootdirectory": dir.join("data")}, "delete": {"enabled": true}},
                "http": {"addr": format!("127.0.0.1:{port}")},
            });
            if let Some(auth) = auth {
                let bundle = dir.join("token-roots.pem");
                std::fs::write(&bundle, &auth.root_cert_pem)
                    .map_err(|source| Error::Io { path: bundle.clone(), source })?;
                config["auth"] = serde_json::json!({"token": {
                    "realm": auth.realm,
                    "service": auth.service,
                    "issuer": auth.issuer,
                    "rootcertbundle": bundle,
                }});
            }
            let path = dir.join("config.yml");
            let text = serde_yaml::to_string(&config).expect("the registry config serializes");
            std::fs::write(&path, text).map_err(|source| Error::Io { path: path.clone(), source })?;
            let mut command = Command::new(&bin);
            command.arg("serve").arg(&path);
            Ok(command)
        };
        let ready = if auth.is_some() { 401 } else { 200 };
        let server =
            Server::start_in("registry", "http", port, dir, prepare, |port| get_status(port, "/v2/") == Some(ready))?;
        Ok(Self(server))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// The directory holding its configuration, its log and, under `data/`, its storage (blobs:
    /// image configs and layers; manifests).
    pub fn dir(&self) -> &std::path::Path {
        self.0.dir()
    }

    /// The HTTP status of `GET path` (accepting image manifests), if the registry answered.
    pub fn get_status(&self, path: &str) -> Option<u16> {
        get_status(self.0.port(), path)
    }

    /// The digest of the manifest the registry serves for `repository` at `reference` (a tag
    /// or digest): its `Docker-Content-Digest`, if it has that manifest.
    pub fn manifest_digest(&self, repository: &str, reference: &str) -> Option<String> {
        let (status, head) = get(self.0.port(), &format!("/v2/{repository}/manifests/{reference}"))?;
        if status != 200 {
            return None;
        }
        head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("docker-content-digest").then(|| value.trim().to_owned())
        })
    }

    /// `127.0.0.1:<port>`: the registry's host as image references name it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.0.port())
    }

    /// `http://127.0.0.1:<port>`: the base URL of its HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }
}

pub(crate) fn get_status(port: u16, path: &str) -> Option<u16> {
    get(port, path).map(|(status, _)| status)
}

/// `GET path` accepting image manifests and indexes: the status and the response's head.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // Manifests are served only to clients that accept their media type.
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                  application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json";
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let head = response.split_once("\r\n\r\n").map_or(response.as_str(), |(head, _)| head);
    Some((status, head.to_owned()))
}
