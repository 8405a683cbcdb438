//! The agent's configuration: the JSON file cloud-init writes to `/etc/stagely/agent.json`,
//! overridden field by field by `STAGELY_*` environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use stagely_api::protocol::{DISCONNECT_SHUTDOWN_SECS, Sensitive};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read the agent configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not the expected JSON.
    #[error("failed to parse the agent configuration {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A field is missing or has a bad value.
    #[error("invalid agent configuration: {0}")]
    Invalid(String),
}

/// The container engine the agent drives.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Docker with the compose plugin (`docker compose`): production VMs.
    #[default]
    Docker,
    /// Podman with `podman-compose`: the `local` provider and the tests.
    Podman,
}

impl Engine {
    /// The engine's command.
    pub fn program(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    fn parse(value: &str) -> Result<Self, ConfigError> {
        match value {
            "docker" => Ok(Engine::Docker),
            "podman" => Ok(Engine::Podman),
            other => Err(ConfigError::Invalid(format!("engine must be `docker` or `podman`, not `{other}`"))),
        }
    }
}

/// What the VM is for.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Builds images.
    Builder,
    /// Runs a preview.
    #[default]
    Preview,
}

/// The file as written by cloud-init, with every optional field.
/// Unknown fields are ignored, so an operator newer than the agent can add some.
#[derive(Deserialize, Default)]
struct FileConfig {
    gateway_url: Option<String>,
    agent_id: Option<String>,
    token: Option<Sensitive>,
    role: Option<Role>,
    engine: Option<Engine>,
    compose_command: Option<Vec<String>>,
    work_dir: Option<PathBuf>,
    shutdown_command: Option<String>,
    disconnect_shutdown_seconds: Option<u64>,
    insecure_registries: Option<Vec<String>>,
    reconnect_initial_ms: Option<u64>,
    reconnect_max_ms: Option<u64>,
    ca_file: Option<PathBuf>,
    ca_pem: Option<String>,
    insecure: Option<bool>,
    ops_addr: Option<SocketAddr>,
    ephemeral_ports: Option<bool>,
    session_file: Option<PathBuf>,
    deploy_timeout_seconds: Option<u64>,
    terminate_timeout_seconds: Option<u64>,
}

/// The agent's settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// WebSocket URL of the gateway, including the connect path: `wss://`, or `ws://` only when
    /// [`AgentConfig::insecure`] says so.
    pub gateway_url: String,
    /// This agent's id.
    pub agent_id: String,
    /// The single-use enrollment token.
    pub token: Sensitive,
    /// Builder or preview.
    pub role: Role,
    /// The container engine.
    pub engine: Engine,
    /// The compose command: `docker compose` for docker, `podman-compose` for podman.
    pub compose_command: Vec<String>,
    /// Where clones, compose overrides and secret files live.
    pub work_dir: PathBuf,
    /// Shell command run (`sh -c`) when the gateway has been unreachable for
    /// [`AgentConfig::disconnect_shutdown`].
    pub shutdown_command: String,
    /// How long without the gateway before the VM shuts down.
    pub disconnect_shutdown: Duration,
    /// Registries (host:port) reached over plain HTTP or with unverified TLS; loopback
    /// registries always are.
    pub insecure_registries: Vec<String>,
    /// First reconnect delay.
    pub reconnect_initial: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// The CA certificates a `wss://` gateway's certificate must chain to, from `ca_pem` (which
    /// cloud-init writes) or `ca_file`: when given, they are the only ones trusted (the gateway
    /// is pinned to them); without them, the system's root certificates are.
    pub gateway_ca: Option<Vec<CertificateDer<'static>>>,
    /// Whether a plain `ws://` gateway is allowed: only the `local` provider and tests, whose
    /// gateway is on loopback, set it. It never relaxes the checks of a `wss://` gateway.
    pub insecure: bool,
    /// Address of `/healthz` and `/metrics`.
    pub ops_addr: SocketAddr,
    /// Publish every port a compose file publishes on 127.0.0.1 and a port the engine picks,
    /// instead of the written host port: where several previews share one host (the `local`
    /// provider), written host ports would clash. STATUS reports the ports picked.
    pub ephemeral_ports: bool,
    /// Where the session credential from HELLO_ACK is kept across restarts (mode 0600): by
    /// default `session.json` beside the configuration file, or in the work directory when
    /// there is no file.
    pub session_file: PathBuf,
    /// How long a DEPLOY may take (clone, pulls, start, health, hooks); default 30 minutes.
    pub deploy_timeout: Duration,
    /// How long a TERMINATE may take beyond the grace period it gives the services; default 5
    /// minutes. The secrets are removed even when it runs out.
    pub terminate_timeout: Duration,
    /// The CLI plugin directory (`docker compose`) of the user the agent runs as:
    /// `$DOCKER_CONFIG/cli-plugins`, else `$HOME/.docker/cli-plugins`. The agent's docker commands
    /// keep their registry credentials in a configuration directory of the agent's own, which
    /// would hide it from docker; the agent names it there as an extra plugin directory.
    pub docker_plugin_dir: Option<PathBuf>,
}

/// The environment variables that override the file, by field (`STAGELY_OPS_ADDR` and
/// `STAGELY_AGENT_CONFIG` are read with the command line).
pub const ENV_VARS: [(&str, &str); 18] = [
    ("STAGELY_GATEWAY_URL", "gateway_url"),
    ("STAGELY_AGENT_ID", "agent_id"),
    ("STAGELY_AGENT_TOKEN", "token"),
    ("STAGELY_ROLE", "role"),
    ("STAGELY_ENGINE", "engine"),
    ("STAGELY_COMPOSE_COMMAND", "compose_command"),
    ("STAGELY_WORK_DIR", "work_dir"),
    ("STAGELY_SHUTDOWN_COMMAND", "shutdown_command"),
    ("STAGELY_DISCONNECT_SHUTDOWN_SECONDS", "disconnect_shutdown_seconds"),
    ("STAGELY_INSECURE_REGISTRIES", "insecure_registries"),
    ("STAGELY_RECONNECT_INITIAL_MS", "reconnect_initial_ms"),
    ("STAGELY_RECONNECT_MAX_MS", "reconnect_max_ms"),
    ("STAGELY_CA_FILE", "ca_file"),
    ("STAGELY_INSECURE", "insecure"),
    ("STAGELY_EPHEMERAL_PORTS", "ephemeral_ports"),
    ("STAGELY_SESSION_FILE", "session_file"),
    ("STAGELY_DEPLOY_TIMEOUT_SECONDS", "deploy_timeout_seconds"),
    ("STAGELY_TERMINATE_TIMEOUT_SECONDS", "terminate_timeout_seconds"),
];

/// The environment variables docker reads that tell where its plugins are, by which
/// [`AgentConfig::docker_plugin_dir`] is found.
pub const DOCKER_ENV_VARS: [&str; 2] = ["DOCKER_CONFIG", "HOME"];

/// The session credential's file name, beside the configuration file.
pub const SESSION_FILE: &str = "session.json";

impl AgentConfig {
    /// Loads `path` (if given) and applies the process's environment variables over it.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = ENV_VARS
            .iter()
            .map(|(var, _)| *var)
            .chain(DOCKER_ENV_VARS)
            .filter_map(|var| std::env::var(var).ok().map(|v| (var.to_owned(), v)))
            .collect();
        Self::load_with(path, &env)
    }

    /// Loads `path` (if given) and applies `env` (variable name → value: [`ENV_VARS`] and
    /// [`DOCKER_ENV_VARS`]) over it.
    pub fn load_with(path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                serde_json::from_str::<FileConfig>(&text)
                    .map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?
            }
            None => FileConfig::default(),
        };
        let get = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
        let number = |name: &str| -> Result<Option<u64>, ConfigError> {
            get(name)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| ConfigError::Invalid(format!("{name} must be a number, not `{v}`")))
                })
                .transpose()
        };
        if let Some(v) = get("STAGELY_GATEWAY_URL") {
            file.gateway_url = Some(v);
        }
        if let Some(v) = get("STAGELY_AGENT_ID") {
            file.agent_id = Some(v);
        }
        if let Some(v) = get("STAGELY_AGENT_TOKEN") {
            file.token = Some(Sensitive(v));
        }
        if let Some(v) = get("STAGELY_ROLE") {
            file.role = Some(match v.as_str() {
                "builder" => Role::Builder,
                "preview" => Role::Preview,
                other => {
                    return Err(ConfigError::Invalid(format!("role must be `builder` or `preview`, not `{other}`")));
                }
            });
        }
        if let Some(v) = get("STAGELY_ENGINE") {
            file.engine = Some(Engine::parse(&v)?);
        }
        if let Some(v) = get("STAGELY_COMPOSE_COMMAND") {
            file.compose_command = Some(v.split_whitespace().map(str::to_owned).collect());
        }
        if let Some(v) = get("STAGELY_WORK_DIR") {
            file.work_dir = Some(v.into());
        }
        if let Some(v) = get("STAGELY_SHUTDOWN_COMMAND") {
            file.shutdown_command = Some(v);
        }
        if let Some(v) = number("STAGELY_DISCONNECT_SHUTDOWN_SECONDS")? {
            file.disconnect_shutdown_seconds = Some(v);
        }
        if let Some(v) = get("STAGELY_INSECURE_REGISTRIES") {
            file.insecure_registries =
                Some(v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect());
        }
        if let Some(v) = number("STAGELY_RECONNECT_INITIAL_MS")? {
            file.reconnect_initial_ms = Some(v);
        }
        if let Some(v) = number("STAGELY_RECONNECT_MAX_MS")? {
            file.reconnect_max_ms = Some(v);
        }
        let flag = |name: &str| -> Result<Option<bool>, ConfigError> {
            get(name)
                .map(|v| match v.as_str() {
                    "1" | "true" | "yes" => Ok(true),
                    "0" | "false" | "no" => Ok(false),
                    other => Err(ConfigError::Invalid(format!("{name} must be 1 or 0 (true or false), not `{other}`"))),
                })
                .transpose()
        };
        if let Some(v) = get("STAGELY_CA_FILE") {
            // Replaces whichever CA the file names.
            file.ca_file = Some(v.into());
            file.ca_pem = None;
        }
        if let Some(v) = flag("STAGELY_INSECURE")? {
            file.insecure = Some(v);
        }
        if let Some(v) = flag("STAGELY_EPHEMERAL_PORTS")? {
            file.ephemeral_ports = Some(v);
        }
        if let Some(v) = number("STAGELY_DEPLOY_TIMEOUT_SECONDS")? {
            file.deploy_timeout_seconds = Some(v);
        }
        if let Some(v) = number("STAGELY_TERMINATE_TIMEOUT_SECONDS")? {
            file.terminate_timeout_seconds = Some(v);
        }
        if let Some(v) = get("STAGELY_SESSION_FILE") {
            file.session_file = Some(v.into());
        }
        let beside_config = path.map(|p| p.parent().unwrap_or(Path::new(".")).join(SESSION_FILE));
        let docker_config = get("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| get("HOME").map(|home| Path::new(&home).join(".docker")));
        let mut config = Self::from_file(file, beside_config)?;
        config.docker_plugin_dir = docker_config.map(|dir| dir.join("cli-plugins"));
        Ok(config)
    }

    fn from_file(file: FileConfig, beside_config: Option<PathBuf>) -> Result<Self, ConfigError> {
        let missing = |field: &str, var: &str| {
            ConfigError::Invalid(format!("`{field}` is required (in the config file, or {var})"))
        };
        let gateway_url = file.gateway_url.ok_or_else(|| missing("gateway_url", "STAGELY_GATEWAY_URL"))?;
        let insecure = file.insecure.unwrap_or(false);
        if gateway_url.starts_with("ws://") {
            if !insecure {
                return Err(ConfigError::Invalid(format!(
                    "gateway_url `{gateway_url}` is plain ws://, which is refused: use wss://, or set \
                     `insecure: true` (STAGELY_INSECURE=1) for a gateway on loopback"
                )));
            }
        } else if !gateway_url.starts_with("wss://") {
            return Err(ConfigError::Invalid(format!(
                "gateway_url must start with wss:// (or ws://), not `{gateway_url}`"
            )));
        }
        let gateway_ca = gateway_ca(file.ca_pem, file.ca_file)?;
        let agent_id = file.agent_id.ok_or_else(|| missing("agent_id", "STAGELY_AGENT_ID"))?;
        let token = file.token.ok_or_else(|| missing("token", "STAGELY_AGENT_TOKEN"))?;
        let engine = file.engine.unwrap_or_default();
        let compose_command = match file.compose_command {
            Some(command) if !command.is_empty() => command,
            Some(_) => return Err(ConfigError::Invalid("compose_command must not be empty".into())),
            None => match engine {
                Engine::Docker => vec!["docker".into(), "compose".into()],
                Engine::Podman => vec!["podman-compose".into()],
            },
        };
        let reconnect_initial = Duration::from_millis(file.reconnect_initial_ms.unwrap_or(500).max(1));
        let reconnect_max = Duration::from_millis(file.reconnect_max_ms.unwrap_or(30_000)).max(reconnect_initial);
        let work_dir: PathBuf = file.work_dir.unwrap_or_else(|| "/var/lib/stagely".into());
        let session_file = file.session_file.or(beside_config).unwrap_or_else(|| work_dir.join(SESSION_FILE));
        Ok(Self {
            gateway_url,
            agent_id,
            token,
            role: file.role.unwrap_or_default(),
            engine,
            compose_command,
            work_dir,
            shutdown_command: file.shutdown_command.unwrap_or_else(|| "shutdown -h now".into()),
            disconnect_shutdown: Duration::from_secs(
                file.disconnect_shutdown_seconds.unwrap_or(u64::from(DISCONNECT_SHUTDOWN_SECS)),
            ),
            insecure_registries: file.insecure_registries.unwrap_or_default(),
            reconnect_initial,
            reconnect_max,
            gateway_ca,
            insecure,
            ops_addr: file.ops_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9101))),
            ephemeral_ports: file.ephemeral_ports.unwrap_or(false),
            session_file,
            deploy_timeout: Duration::from_secs(file.deploy_timeout_seconds.unwrap_or(30 * 60).max(1)),
            terminate_timeout: Duration::from_secs(file.terminate_timeout_seconds.unwrap_or(5 * 60).max(1)),
            docker_plugin_dir: None,
        })
    }

    /// Whether `server` (host or host:port) is reached without TLS verification.
    pub fn is_insecure_registry(&self, server: &str) -> bool {
        let host = server
            .rsplit_once(':')
            .map_or(server, |(host, port)| if port.chars().all(|c| c.is_ascii_digit()) { host } else { server });
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || self.insecure_registries.iter().any(|r| r == server || r == host)
    }
}

/// The CA certificates the gateway is pinned to: those of `ca_pem`, or of the file `ca_file`.
fn gateway_ca(
    ca_pem: Option<String>,
    ca_file: Option<PathBuf>,
) -> Result<Option<Vec<CertificateDer<'static>>>, ConfigError> {
    let (pem, from) = match (ca_pem, ca_file) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ConfigError::Invalid("give the gateway's CA as ca_pem or as ca_file, not both".into()));
        }
        (Some(pem), None) => (pem.into_bytes(), "ca_pem".to_owned()),
        (None, Some(path)) => {
            let pem = std::fs::read(&path)
                .map_err(|err| ConfigError::Invalid(format!("failed to read ca_file {}: {err}", path.display())))?;
            (pem, format!("ca_file {}", path.display()))
        }
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| ConfigError::Invalid(format!("{from} is not PEM certificates: {err}")))?;
    if certs.is_empty() {
        return Err(ConfigError::Invalid(format!("{from} holds no CERTIFICATE block")));
    }
    Ok(Some(certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn reads_the_file_cloud_init_writes() {
        let file = write(
            r#"{"gateway_url":"wss://agents.example.com/v1/agent/connect","agent_id":"vm-1","token":"eyJ.x.y","role":"builder"}"#,
        );
        let config = AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).unwrap();
        assert_eq!(config.gateway_url, "wss://agents.example.com/v1/agent/connect");
        assert_eq!(config.agent_id, "vm-1");
        assert_eq!(config.token.expose(), "eyJ.x.y");
        assert_eq!(config.role, Role::Builder);
        assert_eq!(config.engine, Engine::Docker);
        assert_eq!(config.compose_command, ["docker", "compose"]);
        assert_eq!(config.disconnect_shutdown, Duration::from_secs(15 * 60));
        assert_eq!(config.shutdown_command, "shutdown -h now");
        assert_eq!(
            (config.deploy_timeout, config.terminate_timeout),
            (Duration::from_secs(1800), Duration::from_secs(300))
        );
        assert!(!format!("{config:?}").contains("eyJ.x.y"));
        assert!(!config.ephemeral_ports, "host ports are the written ones unless asked");
        assert_eq!(config.session_file, file.path().parent().unwrap().join("session.json"), "beside the config");
        let env = BTreeMap::from([
            ("STAGELY_GATEWAY_URL".to_owned(), "ws://a".to_owned()),
            ("STAGELY_INSECURE".to_owned(), "1".to_owned()),
            ("STAGELY_AGENT_ID".to_owned(), "a".to_owned()),
            ("STAGELY_AGENT_TOKEN".to_owned(), "t".to_owned()),
            ("STAGELY_WORK_DIR".to_owned(), "/w".to_owned()),
        ]);
        let config = AgentConfig::load_with(None, &env).unwrap();
        assert_eq!(config.session_file, Path::new("/w/session.json"), "no file: in the work directory");
    }

    #[test]
    fn dockers_plugins_are_where_the_users_docker_finds_them() {
        let file = write(r#"{"gateway_url":"ws://a","agent_id":"a","token":"t","insecure":true}"#);
        let load = |vars: &[(&str, &str)]| {
            let env = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            AgentConfig::load_with(Some(file.path()), &env).unwrap().docker_plugin_dir
        };
        assert_eq!(load(&[("HOME", "/root")]), Some("/root/.docker/cli-plugins".into()));
        assert_eq!(
            load(&[("HOME", "/root"), ("DOCKER_CONFIG", "/etc/docker-cli")]),
            Some("/etc/docker-cli/cli-plugins".into())
        );
        assert_eq!(load(&[]), None);
    }

    #[test]
    fn ephemeral_ports_are_switched_on_by_the_file_or_the_environment() {
        let file = write(r#"{"gateway_url":"wss://a","agent_id":"a","token":"t","ephemeral_ports":true}"#);
        assert!(AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).unwrap().ephemeral_ports);
        let file = write(r#"{"gateway_url":"wss://a","agent_id":"a","token":"t"}"#);
        for (value, expected) in [("1", true), ("true", true), ("0", false), ("false", false)] {
            let env = BTreeMap::from([("STAGELY_EPHEMERAL_PORTS".to_owned(), value.to_owned())]);
            assert_eq!(AgentConfig::load_with(Some(file.path()), &env).unwrap().ephemeral_ports, expected, "{value}");
        }
        let env = BTreeMap::from([("STAGELY_EPHEMERAL_PORTS".to_owned(), "maybe".to_owned())]);
        let err = AgentConfig::load_with(Some(file.path()), &env).unwrap_err().to_string();
        assert!(err.contains("STAGELY_EPHEMERAL_PORTS") && err.contains("maybe"), "{err}");
    }

    #[test]
    fn environment_variables_override_the_file() {
        let file =
            write(r#"{"gateway_url":"wss://a/v1/agent/connect","agent_id":"vm-1","token":"t","role":"preview"}"#);
        let env = BTreeMap::from([
            ("STAGELY_ENGINE".to_owned(), "podman".to_owned()),
            ("STAGELY_AGENT_ID".to_owned(), "vm-2".to_owned()),
            ("STAGELY_SHUTDOWN_COMMAND".to_owned(), "touch /tmp/x".to_owned()),
            ("STAGELY_DISCONNECT_SHUTDOWN_SECONDS".to_owned(), "2".to_owned()),
            ("STAGELY_INSECURE_REGISTRIES".to_owned(), "reg:5000, other".to_owned()),
        ]);
        let config = AgentConfig::load_with(Some(file.path()), &env).unwrap();
        assert_eq!(config.agent_id, "vm-2");
        assert_eq!(config.engine, Engine::Podman);
        assert_eq!(config.compose_command, ["podman-compose"]);
        assert_eq!(config.shutdown_command, "touch /tmp/x");
        assert_eq!(config.disconnect_shutdown, Duration::from_secs(2));
        assert!(config.is_insecure_registry("reg:5000"));
        assert!(config.is_insecure_registry("other:443"));
        assert!(config.is_insecure_registry("127.0.0.1:5000"));
        assert!(config.is_insecure_registry("localhost:5000"));
        assert!(!config.is_insecure_registry("registry.example.com"));
    }

    #[test]
    fn missing_and_bad_fields_are_named() {
        let file = write(r#"{"gateway_url":"wss://a","token":"t","role":"preview"}"#);
        let err = AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("agent_id"), "{err}");
        let file = write(r#"{"gateway_url":"http://a","agent_id":"a","token":"t"}"#);
        let err = AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("wss://"), "{err}");
        let file = write(r#"{"gateway_url":"wss://a","agent_id":"a","token":"t","added_later":true}"#);
        assert!(AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).is_ok());
        let env = BTreeMap::from([("STAGELY_ENGINE".to_owned(), "lxc".to_owned())]);
        let err = AgentConfig::load_with(Some(file.path()), &env).unwrap_err().to_string();
        assert!(err.contains("lxc"), "{err}");
    }

    #[test]
    fn a_plain_ws_gateway_is_refused_unless_the_config_says_insecure() {
        let plain = r#""gateway_url":"ws://10.0.0.5:8443/v1/agent/connect","agent_id":"a","token":"t""#;
        let file = write(&format!("{{{plain}}}"));
        let err = AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("plain ws://") && err.contains("`insecure: true`"), "{err}");

        let file = write(&format!(r#"{{{plain},"insecure":true}}"#));
        assert!(AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).unwrap().insecure);
        let env = |value: &str| BTreeMap::from([("STAGELY_INSECURE".to_owned(), value.to_owned())]);
        let config = AgentConfig::load_with(Some(file.path()), &env("0"));
        assert!(config.unwrap_err().to_string().contains("plain ws://"), "the environment overrides the file");
        let file = write(&format!("{{{plain}}}"));
        assert!(AgentConfig::load_with(Some(file.path()), &env("1")).unwrap().insecure);
        let err = AgentConfig::load_with(Some(file.path()), &env("sure")).unwrap_err().to_string();
        assert!(err.contains("STAGELY_INSECURE") && err.contains("sure"), "{err}");

        let file = write(r#"{"gateway_url":"wss://gw.example.com","agent_id":"a","token":"t"}"#);
        let config = AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).unwrap();
        assert!(!config.insecure && config.gateway_ca.is_none(), "wss:// needs neither");
    }

    fn ca_pem(name: &str) -> (String, Vec<u8>) {
        let ca = stagely_testenv::pki::TestCa::new(name).unwrap();
        (ca.pem(), ca.der().to_vec())
    }

    #[test]
    fn the_ca_cloud_init_writes_is_the_one_the_gateway_is_pinned_to() {
        let (pem, der) = ca_pem("gateway CA");
        let config =
            serde_json::json!({"gateway_url": "wss://gw.example.com", "agent_id": "a", "token": "t", "ca_pem": pem});
        let file = write(&config.to_string());
        let config = AgentConfig::load_with(Some(file.path()), &BTreeMap::new()).unwrap();
        let pinned: Vec<&[u8]> = config.gateway_ca.as_deref().unwrap().iter().map(|c| c.as_ref()).collect();
        assert_eq!(pinned, [der.as_slice()]);

        // The same from a file, which the environment can name instead of the file's CA.
        let (other_pem, other_der) = ca_pem("another CA");
        let ca_file = write(&other_pem);
        let env = BTreeMap::from([("STAGELY_CA_FILE".to_owned(), ca_file.path().to_string_lossy().into_owned())]);
        let config = AgentConfig::load_with(Some(file.path()), &env).unwrap();
        assert_eq!(config.gateway_ca.unwrap()[0].as_ref(), other_der.as_slice());

        let both = serde_json::json!({"gateway_url": "wss://gw", "agent_id": "a", "token": "t", "ca_pem": pem,
            "ca_file": ca_file.path()});
        let err = AgentConfig::load_with(Some(write(&both.to_string()).path()), &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let garbage = serde_json::json!({"gateway_url": "wss://gw", "agent_id": "a", "token": "t", "ca_pem": "nope"});
        let err = AgentConfig::load_with(Some(write(&garbage.to_string()).path()), &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("ca_pem holds no CERTIFICATE block"), "{err}");
        let env = BTreeMap::from([("STAGELY_CA_FILE".to_owned(), "/nonexistent/ca.pem".to_owned())]);
        let err = AgentConfig::load_with(Some(file.path()), &env).unwrap_err().to_string();
        assert!(err.contains("failed to read ca_file /nonexistent/ca.pem"), "{err}");
    }
}
