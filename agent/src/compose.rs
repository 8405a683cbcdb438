//! DEPLOY and TERMINATE: the app runs with compose from the repository's compose file plus
//! `docker-compose.stagely.yml`, an override that sets the built images and mounts the secrets.
//! Secret values never enter the override: environment secrets go to a 0600 env file per
//! service, file secrets to files with their modes, both under the project's `secrets/`.
//!
//! With ephemeral host ports (the agent's `ephemeral_ports`), every port the compose file
//! publishes is published on 127.0.0.1 and a port the engine picks instead, so that previews
//! sharing a host never clash; STATUS reports the ports picked. Docker compose v2 takes the new
//! list from the override (`ports: !override`, compose 2.24.4 and later); podman-compose merges
//! lists across files and knows no `!override`, so for podman the agent writes a copy of the
//! compose file with its ports replaced, `docker-compose.stagely.base.yml`, beside the original
//! (relative paths in it mean the same) and runs that instead.
//!
//! After `up`, DEPLOY waits until every service runs (and is healthy, where it has a health
//! check) and stays so for a moment; a service that exited, never started or turned unhealthy
//! fails the deployment with a message naming it, its exit code and its log's last lines.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_yaml::value::{Tag, TaggedValue};
use serde_yaml::{Mapping, Value};
use stagely_api::protocol::{Deploy, GLOBAL_SCOPE, PortMapping, SecretKind, SecretValue, ServiceStatus, Terminate};

use crate::config::Engine;
use crate::executor::{
    Context, JobError, JobLog, Outcome, TAIL_LINES, check_name, create_file, execute, registry_of, relative,
    resolve_inside, run, with_tail, write_new_file,
};

/// The override's file name, next to the repository's compose file.
pub const OVERRIDE_FILE: &str = "docker-compose.stagely.yml";

/// With ephemeral ports on podman: the compose file with its ports replaced, next to it.
pub const BASE_FILE: &str = "docker-compose.stagely.base.yml";

/// Where ephemeral ports are published: the preview's host reaches them, nothing else.
pub const EPHEMERAL_HOST_IP: &str = "127.0.0.1";

/// Where file secrets go in the container when the secret names no directory.
pub const DEFAULT_SECRET_DIR: &str = "/run/secrets";

/// How long services may take to start and become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// How long every service must stay up before the deployment counts as up: a service that
/// crashes right after it starts is caught instead of reported as running.
const SETTLE: Duration = Duration::from_secs(2);

/// Between looks at the services' state.
const POLL: Duration = Duration::from_millis(500);

/// What TERMINATE needs to find a deployment: written next to it.
#[derive(Serialize, Deserialize, Debug)]
struct Deployment {
    project: String,
    files: Vec<PathBuf>,
}

/// A compose file as a YAML value, its `<<` merge keys applied.
pub fn parse_compose(compose_yaml: &str) -> Result<Value, JobError> {
    let mut value: Value = serde_yaml::from_str(compose_yaml)
        .map_err(|err| JobError::Invalid(format!("the compose file is not valid YAML: {err}")))?;
    value.apply_merge().map_err(|err| JobError::Invalid(format!("the compose file's `<<` merge keys: {err}")))?;
    Ok(value)
}

fn services_mapping(compose: &Value) -> Result<&Mapping, JobError> {
    compose
        .get("services")
        .and_then(Value::as_mapping)
        .ok_or_else(|| JobError::Invalid("the compose file has no `services`".into()))
}

/// The service names of a compose file.
pub fn services_of(compose_yaml: &str) -> Result<Vec<String>, JobError> {
    services_in(&parse_compose(compose_yaml)?)
}

/// The service names of a parsed compose file.
pub fn services_in(compose: &Value) -> Result<Vec<String>, JobError> {
    Ok(services_mapping(compose)?.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect())
}

/// The services `up` starts a container for: not those behind a profile, nor those scaled to 0.
pub fn started_services(compose: &Value) -> Result<Vec<String>, JobError> {
    let zero = |v: Option<&Value>| v.is_some_and(|v| v.as_u64() == Some(0) || v.as_str() == Some("0"));
    Ok(services_mapping(compose)?
        .iter()
        .filter(|(_, service)| {
            let profiled = service.get("profiles").and_then(Value::as_sequence).is_some_and(|p| !p.is_empty());
            let replicas = service.get("deploy").and_then(|d| d.get("replicas"));
            !profiled && !zero(replicas) && !zero(service.get("scale"))
        })
        .filter_map(|(name, _)| name.as_str().map(str::to_owned))
        .collect())
}

/// Each service's published ports moved to [`EPHEMERAL_HOST_IP`] and a port the engine picks,
/// in compose's short syntax (`127.0.0.1::8080/udp`), for the services that publish any.
pub fn ephemeral_ports(compose: &Value) -> Result<BTreeMap<String, Vec<String>>, JobError> {
    let mut moved = BTreeMap::new();
    for (name, service) in services_mapping(compose)? {
        let Some(name) = name.as_str() else { continue };
        let entries = match service.get("ports") {
            None | Some(Value::Null) => continue,
            Some(Value::Sequence(entries)) => entries.clone(),
            // podman-compose takes a lone string as a list of one.
            Some(one @ Value::String(_)) => vec![one.clone()],
            Some(_) => return Err(JobError::Invalid(format!("service `{name}`: `ports` must be a list"))),
        };
        let ports = entries
            .iter()
            .map(|entry| ephemeral_port(entry).map_err(|why| JobError::Invalid(format!("service `{name}`: {why}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if !ports.is_empty() {
            moved.insert(name.to_owned(), ports);
        }
    }
    Ok(moved)
}

/// One `ports` entry (short or long syntax) as `127.0.0.1::<container port>[/<protocol>]`.
fn ephemeral_port(entry: &Value) -> Result<String, String> {
    let (target, protocol) = match entry {
        Value::Number(port) => (port.to_string(), None),
        Value::String(spec) => {
            let (rest, protocol) = match spec.rsplit_once('/') {
                Some((rest, protocol)) if !protocol.is_empty() && protocol.chars().all(|c| c.is_ascii_alphabetic()) => {
                    (rest, Some(protocol.to_owned()))
                }
                _ => (spec.as_str(), None),
            };
            // `[::1]:8080:80`: the address's colons are not separators.
            let rest = match rest.strip_prefix('[') {
                Some(bracketed) => bracketed.split_once("]:").map_or(rest, |(_, after)| after),
                None => rest,
            };
            let target = split_outside_variables(rest).pop().unwrap_or_default();
            (target.to_owned(), protocol)
        }
        Value::Mapping(long) => {
            let target = match long.get("target") {
                Some(Value::Number(port)) => port.to_string(),
                Some(Value::String(port)) => port.clone(),
                _ => return Err(format!("the port {} has no `target`", describe(entry))),
            };
            let protocol = long.get("protocol").and_then(Value::as_str).map(str::to_owned);
            (target, protocol)
        }
        _ => return Err(format!("cannot read the port {}", describe(entry))),
    };
    if target.trim().is_empty() {
        return Err(format!("the port {} names no container port", describe(entry)));
    }
    let protocol = protocol.filter(|p| p != "tcp").map(|p| format!("/{p}")).unwrap_or_default();
    Ok(format!("{EPHEMERAL_HOST_IP}::{target}{protocol}"))
}

/// `text` split at `:`, except inside `${…}` (where `${PORT:-80}` has one of its own).
fn split_outside_variables(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    let bytes = text.as_bytes();
    for (i, byte) in bytes.iter().enumerate() {
        match byte {
            b'{' if i > 0 && bytes[i - 1] == b'$' => depth += 1,
            b'}' if depth > 0 => depth -= 1,
            b':' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn describe(value: &Value) -> String {
    serde_yaml::to_string(value).map_or_else(|_| "?".into(), |text| format!("`{}`", text.trim().replace('\n', ", ")))
}

/// `compose` with each service in `ports` publishing those ports and no others (the base file
/// podman-compose runs with ephemeral ports).
pub fn with_ports(compose: &Value, ports: &BTreeMap<String, Vec<String>>) -> Value {
    let mut compose = compose.clone();
    if let Some(services) = compose.get_mut("services").and_then(Value::as_mapping_mut) {
        for (name, list) in ports {
            if let Some(service) = services.get_mut(name.as_str()).and_then(Value::as_mapping_mut) {
                let list = list.iter().map(|p| Value::String(p.clone())).collect();
                service.insert("ports".into(), Value::Sequence(list));
            }
        }
    }
    compose
}

/// What the override sets for one service.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct ServiceOverride {
    /// The image to run.
    pub image: Option<String>,
    /// The env file holding its environment secrets.
    pub env_file: Option<PathBuf>,
    /// File secrets: host file → path in the container.
    pub files: Vec<(PathBuf, String)>,
    /// The ports to publish instead of the compose file's (docker compose's `!override`).
    pub ports: Option<Vec<String>>,
}

/// The override's YAML. It holds paths, image references and ports, never a secret value.
pub fn override_yaml(overrides: &BTreeMap<String, ServiceOverride>) -> String {
    let mut services = Mapping::new();
    for (name, o) in overrides {
        let mut service = Mapping::new();
        if let Some(image) = &o.image {
            service.insert("image".into(), image.clone().into());
        }
        if let Some(env_file) = &o.env_file {
            service.insert("env_file".into(), Value::Sequence(vec![env_file.to_string_lossy().into_owned().into()]));
        }
        if !o.files.is_empty() {
            let volumes =
                o.files.iter().map(|(host, target)| format!("{}:{target}:ro", host.display()).into()).collect();
            service.insert("volumes".into(), Value::Sequence(volumes));
        }
        if let Some(ports) = &o.ports {
            // Without the tag compose would add these to the file's ports, not replace them.
            let ports = ports.iter().map(|p| Value::String(p.clone())).collect();
            let tagged = TaggedValue { tag: Tag::new("override"), value: Value::Sequence(ports) };
            service.insert("ports".into(), Value::Tagged(Box::new(tagged)));
        }
        if !service.is_empty() {
            services.insert(name.clone().into(), Value::Mapping(service));
        }
    }
    let mut root = Mapping::new();
    root.insert("services".into(), Value::Mapping(services));
    format!(
        "# Written by the Stagely agent: images and secret mounts for this preview.\n{}",
        serde_yaml::to_string(&Value::Mapping(root)).expect("YAML serializes")
    )
}

/// An env file for `secrets` that gives each value to the container byte for byte.
///
/// Docker compose reads env files as dotenv: it unquotes values and interpolates `$` outside
/// single quotes, and in single quotes still takes a backslash before the closing quote as an
/// escape. So every value is double-quoted with `\`, `"`, `$` and line breaks escaped, which
/// compose turns back into exactly those bytes. Podman passes what follows the `=` as is, so a
/// value needs no quoting, and cannot hold a line break.
pub fn env_file(engine: Engine, secrets: &[&SecretValue]) -> Result<String, JobError> {
    let mut out = String::new();
    for secret in secrets {
        let key = &secret.key;
        let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(JobError::Invalid(format!("secret `{key}` is not a valid environment variable name")));
        }
        let value = secret.value.expose();
        let line = match engine {
            Engine::Podman if value.contains(['\n', '\r']) => {
                return Err(JobError::Invalid(format!(
                    "environment secret `{key}` has a line break, which podman's env files cannot hold; make it a file secret"
                )));
            }
            Engine::Podman => format!("{key}={value}"),
            Engine::Docker => format!("{key}=\"{}\"", dotenv_escape(value)),
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// `value` escaped for a double-quoted dotenv value, as compose's parser unescapes it.
fn dotenv_escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '$' => escaped.push_str("\\$"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// One container of a deployment, as the engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    /// The container's id.
    pub id: String,
    /// Its service, state, health and published ports, as STATUS reports them.
    pub service: ServiceStatus,
    /// How it exited, once it has.
    pub exit_code: Option<i32>,
}

/// The containers of a project from `podman ps -a --format json`.
pub fn parse_podman_ps(json: &str) -> Result<Vec<Container>, JobError> {
    #[derive(Deserialize)]
    struct Port {
        container_port: u16,
        host_port: u16,
        #[serde(default)]
        range: Option<u16>,
        protocol: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        #[serde(default)]
        id: String,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        state: String,
        #[serde(default)]
        status: String,
        #[serde(default)]
        exit_code: Option<i32>,
        #[serde(default)]
        exited: bool,
        #[serde(default)]
        ports: Option<Vec<Port>>,
    }
    let entries: Vec<Entry> = serde_json::from_str(json.trim())
        .map_err(|err| JobError::Invalid(format!("failed to parse `podman ps` output: {err}")))?;
    let mut containers: Vec<Container> = entries
        .into_iter()
        .filter_map(|c| {
            let name = c.labels?.get("com.docker.compose.service")?.clone();
            let health = ["healthy", "unhealthy", "starting"]
                .into_iter()
                .find(|h| c.status.contains(&format!("({h})")))
                .map(str::to_owned);
            let mut ports = Vec::new();
            for port in c.ports.unwrap_or_default() {
                for i in 0..port.range.unwrap_or(1).max(1) {
                    ports.push(PortMapping {
                        container_port: port.container_port + i,
                        published_port: port.host_port + i,
                        protocol: port.protocol.clone(),
                    });
                }
            }
            let state = c.state.to_lowercase();
            // podman reports 0 for a container that has not exited.
            let exit_code =
                (c.exited || matches!(state.as_str(), "exited" | "stopped")).then_some(c.exit_code).flatten();
            Some(Container { id: c.id, service: ServiceStatus { name, state, health, ports }, exit_code })
        })
        .collect();
    containers.sort_by(|a, b| a.service.name.cmp(&b.service.name));
    Ok(containers)
}

/// The containers from `docker compose ps --format json`: one JSON object per line (compose
/// v2.21 and later) or one array (earlier).
pub fn parse_compose_ps(text: &str) -> Result<Vec<Container>, JobError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Publisher {
        #[serde(default)]
        target_port: u16,
        #[serde(default)]
        published_port: u16,
        #[serde(default)]
        protocol: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        #[serde(default, rename = "ID")]
        id: String,
        service: String,
        state: String,
        #[serde(default)]
        health: String,
        #[serde(default)]
        exit_code: Option<i32>,
        #[serde(default)]
        publishers: Option<Vec<Publisher>>,
    }
    let bad = |err: serde_json::Error| JobError::Invalid(format!("failed to parse `compose ps` output: {err}"));
    let text = text.trim();
    let entries: Vec<Entry> = if text.starts_with('[') {
        serde_json::from_str(text).map_err(bad)?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(bad))
            .collect::<Result<_, _>>()?
    };
    let mut containers: Vec<Container> = entries
        .into_iter()
        .map(|e| {
            let mut ports: Vec<PortMapping> = e
                .publishers
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.published_port != 0)
                .map(|p| PortMapping {
                    container_port: p.target_port,
                    published_port: p.published_port,
                    protocol: p.protocol,
                })
                .collect();
            // Docker lists a port once per address family.
            ports.dedup();
            let state = e.state.to_lowercase();
            let exit_code = matches!(state.as_str(), "exited" | "dead").then_some(e.exit_code).flatten();
            Container {
                id: e.id,
                service: ServiceStatus {
                    name: e.service,
                    state,
                    health: (!e.health.is_empty()).then_some(e.health),
                    ports,
                },
                exit_code,
            }
        })
        .collect();
    containers.sort_by(|a, b| a.service.name.cmp(&b.service.name));
    Ok(containers)
}

/// Whether every container runs (and is healthy, where it has a health check).
fn ready(containers: &[Container]) -> bool {
    !containers.is_empty()
        && containers
            .iter()
            .all(|c| c.service.state == "running" && c.service.health.as_deref().is_none_or(|h| h == "healthy"))
}

/// What is wrong with a deployment right after `up`.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// The container stopped (`exited`, or `dead`).
    Stopped {
        /// The service.
        service: String,
        /// The container.
        id: String,
        /// The state it is in.
        state: String,
        /// Its exit code, if the engine knows it.
        code: Option<i32>,
    },
    /// The container was created and never started (podman-compose goes on past a failed
    /// start, e.g. a host port in use).
    NotStarted {
        /// The service.
        service: String,
    },
    /// Its health check fails.
    Unhealthy {
        /// The service.
        service: String,
        /// The container.
        id: String,
    },
    /// `up` created no container for it.
    Missing {
        /// The service.
        service: String,
    },
}

/// The problems of `containers`, which should include one for each of `expected`.
pub fn problems(containers: &[Container], expected: &[String]) -> Vec<Problem> {
    let mut problems: Vec<Problem> = containers
        .iter()
        .filter_map(|c| {
            let service = c.service.name.clone();
            match c.service.state.as_str() {
                "exited" | "dead" | "stopped" => Some(Problem::Stopped {
                    service,
                    id: c.id.clone(),
                    state: c.service.state.clone(),
                    code: c.exit_code,
                }),
                "created" | "configured" => Some(Problem::NotStarted { service }),
                _ if c.service.health.as_deref() == Some("unhealthy") => {
                    Some(Problem::Unhealthy { service, id: c.id.clone() })
                }
                _ => None,
            }
        })
        .collect();
    for service in expected {
        if !containers.iter().any(|c| &c.service.name == service) {
            problems.push(Problem::Missing { service: service.clone() });
        }
    }
    problems
}

/// Runs `command` without logging its output (status polls), returning its standard output.
async fn capture(mut command: tokio::process::Command) -> Result<String, JobError> {
    let program = command.as_std().get_program().to_string_lossy().into_owned();
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|source| JobError::Spawn { program: program.clone(), source })?;
    if !output.status.success() {
        return Err(JobError::Failed {
            what: "read the services' state".into(),
            program,
            code: output.status.code().unwrap_or(-1),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn project_args(project: &str, files: &[PathBuf]) -> Vec<String> {
    let mut args = vec!["-p".to_owned(), project.to_owned()];
    for file in files {
        args.push("-f".into());
        args.push(file.to_string_lossy().into_owned());
    }
    args
}

/// The containers of `project`.
pub async fn containers(ctx: &Context, project: &str, files: &[PathBuf]) -> Result<Vec<Container>, JobError> {
    match ctx.engine {
        Engine::Podman => {
            let mut command = ctx.engine_command();
            command
                .args(["ps", "-a", "--format", "json", "--filter"])
                .arg(format!("label=com.docker.compose.project={project}"));
            parse_podman_ps(&capture(command).await?)
        }
        Engine::Docker => {
            let mut command = ctx.compose(&project_args(project, files));
            command.args(["ps", "-a", "--format", "json"]);
            parse_compose_ps(&capture(command).await?)
        }
    }
}

fn create_private_dir(path: &Path) -> Result<(), JobError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(JobError::io("create", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(JobError::io("restrict", path))
}

fn write_secret_file(path: &Path, contents: &str, mode: u32) -> Result<(), JobError> {
    let _ = std::fs::remove_file(path);
    create_file(path, contents, 0o600)?;
    // The mode is set after the write, so a wider mode never shows a half-written file.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(JobError::io("chmod", path))
}

/// Fails unless `dir`, where file secret `key` goes in the container, is an absolute path of
/// plain names: it ends up in a volume specification (`host:target:ro`), where a `:` or `,`
/// would add options and `..` would climb out.
pub fn check_container_dir(key: &str, dir: &str) -> Result<(), JobError> {
    let plain = |c: &str| {
        !c.is_empty()
            && c != "."
            && c != ".."
            && c.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let trimmed = dir.trim_end_matches('/');
    let ok = dir.starts_with('/') && dir.len() <= 256 && trimmed.split('/').skip(1).all(plain);
    if ok {
        Ok(())
    } else {
        Err(JobError::Invalid(format!(
            "file secret `{key}`: `{dir}` must be an absolute path of plain names ([A-Za-z0-9._-])"
        )))
    }
}

/// Writes every secret of `deploy` under `secrets_dir` and returns what the override sets
/// for each service (the images included).
pub fn write_secrets(
    engine: Engine,
    deploy: &Deploy,
    services: &[String],
    secrets_dir: &Path,
) -> Result<BTreeMap<String, ServiceOverride>, JobError> {
    let known: BTreeSet<&str> = services.iter().map(String::as_str).collect();
    for secret in &deploy.secrets {
        if secret.scope != GLOBAL_SCOPE && !known.contains(secret.scope.as_str()) {
            return Err(JobError::Invalid(format!(
                "secret `{}` is scoped to service `{}`, which the compose file does not define",
                secret.key, secret.scope
            )));
        }
    }
    for service in deploy.images.keys() {
        if !known.contains(service.as_str()) {
            return Err(JobError::Invalid(format!(
                "an image is given for service `{service}`, which the compose file does not define"
            )));
        }
    }
    if secrets_dir.exists() {
        std::fs::remove_dir_all(secrets_dir).map_err(JobError::io("remove", secrets_dir))?;
    }
    create_private_dir(secrets_dir)?;
    // File secrets: one host file per secret, mounted into each service it applies to.
    let mut files: Vec<(&SecretValue, PathBuf, String)> = Vec::new();
    for secret in deploy.secrets.iter().filter(|s| s.kind == SecretKind::File) {
        check_name("file secret", &secret.key)?;
        let dir = secret.path.as_deref().unwrap_or(DEFAULT_SECRET_DIR);
        check_container_dir(&secret.key, dir)?;
        let scope_dir = secrets_dir.join("files").join(&secret.scope);
        create_private_dir(&scope_dir)?;
        let host = scope_dir.join(&secret.key);
        write_secret_file(&host, secret.value.expose(), secret.mode.unwrap_or(0o600))?;
        files.push((secret, host, format!("{}/{}", dir.trim_end_matches('/'), secret.key)));
    }
    let mut overrides = BTreeMap::new();
    for service in services {
        let mut o = ServiceOverride { image: deploy.images.get(service).cloned(), ..Default::default() };
        let env: Vec<&SecretValue> =
            deploy.secrets.iter().filter(|s| s.kind == SecretKind::Env && s.applies_to(service)).collect();
        if !env.is_empty() {
            let path = secrets_dir.join(format!("{service}.env"));
            write_secret_file(&path, &env_file(engine, &env)?, 0o600)?;
            o.env_file = Some(path);
        }
        o.files =
            files.iter().filter(|(s, _, _)| s.applies_to(service)).map(|(_, h, t)| (h.clone(), t.clone())).collect();
        overrides.insert(service.clone(), o);
    }
    Ok(overrides)
}

/// Deploys: clone, write secrets and the override, pull, up, wait for the services, hooks, and
/// report the services.
pub async fn deploy(ctx: &mut Context, log: &JobLog, deploy: &Deploy) -> Result<Outcome, JobError> {
    check_name("project", &deploy.project)?;
    if deploy.project.chars().any(|c| c.is_ascii_uppercase() || c == '.') {
        return Err(JobError::Invalid(format!(
            "project `{}` must be lowercase letters, digits, - and _",
            deploy.project
        )));
    }
    let compose_file = relative("compose file", &deploy.compose_file)?;
    let mut servers: Vec<String> = deploy.images.values().filter_map(|i| registry_of(i)).collect();
    servers.extend(deploy.registry_auth.iter().map(|a| a.server.clone()));
    ctx.allow_insecure(&servers)?;

    let dir = ctx.work_dir.join("deploy").join(&deploy.project);
    let src = dir.join("src");
    crate::git::checkout(ctx, log, &deploy.clone_url, deploy.git_token.as_ref(), &deploy.commit, &src).await?;
    // The repository decides where these lead: they must stay in the clone, and so must the
    // directory the override is written to.
    let compose_path = src.join(&compose_file);
    let resolved = resolve_inside("compose file", &src, &compose_path)?;
    let compose_dir = resolve_inside("compose file's directory", &src, compose_path.parent().unwrap_or(&src))?;
    let yaml = std::fs::read_to_string(&resolved).map_err(JobError::io("read the compose file", &compose_path))?;
    let document = parse_compose(&yaml)?;
    let services = services_in(&document)?;
    for service in &services {
        // Service names become file names (`secrets/<service>.env`).
        check_name("compose service", service)?;
    }
    for hook in &deploy.lifecycle.on_start {
        if !services.contains(&hook.service) {
            return Err(JobError::Invalid(format!(
                "an on_start hook names service `{}`, which the compose file does not define",
                hook.service
            )));
        }
    }
    let mut overrides = write_secrets(ctx.engine, deploy, &services, &dir.join("secrets"))?;
    let mut base = compose_path.clone();
    if ctx.config.ephemeral_ports {
        let ports = ephemeral_ports(&document)?;
        for (service, list) in &ports {
            log.system(&format!("service {service} publishes {} on ephemeral host ports", list.join(" ")));
        }
        match ctx.engine {
            Engine::Docker => {
                for (service, list) in ports {
                    overrides.entry(service).or_default().ports = Some(list);
                }
            }
            Engine::Podman if !ports.is_empty() => {
                base = compose_dir.join(BASE_FILE);
                let text = format!(
                    "# Written by the Stagely agent: {} with each published port on an ephemeral host port.\n{}",
                    compose_file.display(),
                    serde_yaml::to_string(&with_ports(&document, &ports)).expect("YAML serializes")
                );
                write_new_file(&base, &text)?;
            }
            Engine::Podman => {}
        }
    }
    let override_path = compose_dir.join(OVERRIDE_FILE);
    write_new_file(&override_path, &override_yaml(&overrides))?;
    let files = vec![base, override_path];
    let record = serde_json::to_string(&Deployment { project: deploy.project.clone(), files: files.clone() })
        .expect("deployment serializes");
    let record_path = dir.join("deployment.json");
    std::fs::write(&record_path, record).map_err(JobError::io("write", &record_path))?;

    if let Some(auth) = &deploy.registry_auth {
        crate::build::login(ctx, log, auth).await?;
    }
    let base = project_args(&deploy.project, &files);
    let mut pull = ctx.compose(&base);
    pull.arg("pull");
    run(log, "pull the images", pull, None).await?;
    let mut up = ctx.compose(&base);
    up.args(["up", "-d", "--no-build"]);
    match ctx.engine {
        Engine::Docker => {
            up.arg("--remove-orphans");
        }
        // podman-compose cannot tell a changed service from an unchanged one, and would keep
        // running the old container of a redeployed service: recreate them all.
        Engine::Podman => {
            up.arg("--force-recreate");
        }
    }
    let program = up.as_std().get_program().to_string_lossy().into_owned();
    let started = execute(log, up, None).await?;
    if !started.status.success() {
        return Err(JobError::Step {
            message: with_tail(
                &format!("failed to start the services: `{program}` exited with {}", started.code()),
                "its output",
                &started.tail,
            ),
            code: Some(started.code()),
        });
    }
    let expected = started_services(&document)?;
    let containers = wait_ready(ctx, log, &deploy.project, &files, &expected, &started.tail).await?;
    for hook in &deploy.lifecycle.on_start {
        run_hook(ctx, log, &containers, &hook.service, &hook.command).await?;
    }
    let services: Vec<ServiceStatus> = containers.into_iter().map(|c| c.service).collect();
    for service in &services {
        let ports: Vec<String> = service
            .ports
            .iter()
            .map(|p| format!("{}->{}/{}", p.published_port, p.container_port, p.protocol))
            .collect();
        log.system(&format!(
            "service {}: {} {} {}",
            service.name,
            service.state,
            service.health.as_deref().unwrap_or(""),
            ports.join(" ")
        ));
    }
    Ok(Outcome { message: Some(format!("{} services running", services.len())), image_digest: None, services })
}

/// Runs an on_start hook in its service's container; a failure names the service and the
/// command and carries the command's output's last lines.
async fn run_hook(
    ctx: &Context,
    log: &JobLog,
    containers: &[Container],
    service: &str,
    command: &str,
) -> Result<(), JobError> {
    let container = containers.iter().find(|c| c.service.name == service).ok_or_else(|| JobError::Step {
        message: format!("on_start hook `{command}` in service `{service}`: the service has no container"),
        code: None,
    })?;
    log.system(&format!("on_start hook in service {service}: {command}"));
    let mut exec = ctx.engine_command();
    // The engine's own exec: podman-compose's ends with 0 whatever the command did.
    exec.arg("exec").arg(&container.id).args(["sh", "-c", command]);
    let finished = execute(log, exec, None).await?;
    if finished.status.success() {
        return Ok(());
    }
    let headline =
        format!("on_start hook `{command}` in service `{service}` failed with exit code {}", finished.code());
    Err(JobError::Step { message: with_tail(&headline, "its output", &finished.tail), code: Some(finished.code()) })
}

/// Waits until every container runs (and is healthy, where it has a health check) and has
/// stayed so for [`SETTLE`]. Fails at once when a service stopped, never started, turned
/// unhealthy or has no container, naming each with its log's last lines (or, for one that never
/// ran, `up`'s output, `up_tail`).
async fn wait_ready(
    ctx: &Context,
    log: &JobLog,
    project: &str,
    files: &[PathBuf],
    expected: &[String],
    up_tail: &[String],
) -> Result<Vec<Container>, JobError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut up_since: Option<Instant> = None;
    loop {
        let containers = containers(ctx, project, files).await?;
        let problems = problems(&containers, expected);
        if !problems.is_empty() {
            return Err(describe_problems(ctx, log, &problems, up_tail).await);
        }
        if ready(&containers) {
            let since = *up_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= SETTLE {
                return Ok(containers);
            }
        } else {
            up_since = None;
        }
        if Instant::now() > deadline {
            let waiting: Vec<String> = containers
                .iter()
                .filter(|c| c.service.state != "running" || c.service.health.as_deref().is_some_and(|h| h != "healthy"))
                .map(|c| {
                    let health = c.service.health.as_deref().map(|h| format!(" ({h})")).unwrap_or_default();
                    format!("{} is {}{health}", c.service.name, c.service.state)
                })
                .collect();
            return Err(JobError::Unhealthy(format!(
                "the services were not ready within {} seconds: {}",
                READY_TIMEOUT.as_secs(),
                waiting.join(", ")
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The failure for `problems`: one paragraph per service, naming it, with its log's last
/// lines, which also go to the job's log.
async fn describe_problems(ctx: &Context, log: &JobLog, problems: &[Problem], up_tail: &[String]) -> JobError {
    let mut paragraphs = Vec::new();
    let mut code = None;
    for problem in problems {
        let paragraph = match problem {
            Problem::Stopped { service, id, state, code: exit_code } => {
                code = code.or(*exit_code);
                let headline = match (state.as_str(), exit_code) {
                    ("exited", Some(exit_code)) => format!("service `{service}` exited with code {exit_code}"),
                    (_, Some(exit_code)) => format!("service `{service}` is {state} (exit code {exit_code})"),
                    (_, None) => format!("service `{service}` is {state}"),
                };
                let tail = container_log_tail(ctx, log, service, id).await;
                with_tail(&headline, "its log", &tail)
            }
            Problem::Unhealthy { service, id } => {
                let tail = container_log_tail(ctx, log, service, id).await;
                with_tail(&format!("service `{service}` is unhealthy"), "its log", &tail)
            }
            Problem::NotStarted { service } => {
                with_tail(&format!("service `{service}` was created but did not start"), "`up`'s output", up_tail)
            }
            Problem::Missing { service } => {
                with_tail(&format!("service `{service}` has no container"), "`up`'s output", up_tail)
            }
        };
        paragraphs.push(paragraph);
    }
    JobError::Step { message: paragraphs.join("\n\n"), code }
}

/// The last [`TAIL_LINES`] lines of a container's log (standard output and error in the order
/// written), masked, also sent to the job's log; empty when the engine cannot say.
async fn container_log_tail(ctx: &Context, log: &JobLog, service: &str, id: &str) -> Vec<String> {
    let lines = match read_container_log(ctx, id).await {
        Ok(text) => text.lines().map(|line| ctx.masker.mask(line)).collect::<Vec<_>>(),
        Err(err) => {
            log.system(&format!("failed to read the log of service {service}: {err}"));
            return Vec::new();
        }
    };
    let tail: Vec<String> = lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec();
    log.system(&format!("the last lines of service {service}'s log:"));
    for line in &tail {
        log.line(stagely_api::protocol::LogStream::Stdout, line);
    }
    tail
}

/// `<engine> logs --tail N <id>`, its two outputs through one pipe so their lines keep their
/// order.
async fn read_container_log(ctx: &Context, id: &str) -> std::io::Result<String> {
    let (mut reader, writer) = std::io::pipe()?;
    let mut command = ctx.engine_command();
    command.args(["logs", "--tail", &TAIL_LINES.to_string(), id]);
    command.stdout(writer.try_clone()?).stderr(writer);
    let mut child = command.spawn()?;
    // The command holds the pipe's write ends until dropped; the read ends at the child's exit.
    drop(command);
    let read = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut reader, &mut text).map(|_| text)
    });
    let text = match tokio::time::timeout(Duration::from_secs(30), read).await {
        Ok(joined) => joined.map_err(std::io::Error::other)??,
        Err(_) => return Err(std::io::Error::other("the engine did not answer within 30 seconds")),
    };
    child.wait().await?;
    Ok(text)
}

/// Deletes the secrets of every deployment on this VM (what TERMINATE does whatever else
/// fails); failures are logged.
pub fn remove_secrets(ctx: &Context, log: &JobLog) {
    let Ok(entries) = std::fs::read_dir(ctx.work_dir.join("deploy")) else { return };
    for secrets in entries.filter_map(Result::ok).map(|e| e.path().join("secrets")) {
        if let Err(err) = std::fs::remove_dir_all(&secrets)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            log.system(&format!("failed to remove {}: {err}", secrets.display()));
        }
    }
}

/// Stops every deployment on this VM and deletes its secrets and files.
pub async fn terminate(ctx: &Context, log: &JobLog, terminate: &Terminate) -> Result<Outcome, JobError> {
    log.system(&format!("terminating: {}", terminate.reason));
    let root = ctx.work_dir.join("deploy");
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(JobError::Io { what: "list", path: root, source }),
    };
    let mut stopped = 0;
    let mut first_error = None;
    for dir in entries {
        let record_path = dir.join("deployment.json");
        if let Ok(text) = std::fs::read_to_string(&record_path)
            && let Ok(record) = serde_json::from_str::<Deployment>(&text)
        {
            let mut down = ctx.compose(&project_args(&record.project, &record.files));
            down.args(["down", "-v", "-t", &terminate.grace_period_seconds.to_string()]);
            match run(log, "stop the services", down, None).await {
                Ok(_) => stopped += 1,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        // The secrets go whatever compose said.
        let secrets = dir.join("secrets");
        if secrets.exists() {
            std::fs::remove_dir_all(&secrets).map_err(JobError::io("remove", &secrets))?;
        }
        if first_error.is_none() {
            std::fs::remove_dir_all(&dir).map_err(JobError::io("remove", &dir))?;
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(Outcome { message: Some(format!("stopped {stopped} deployment(s)")), ..Default::default() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(key: &str, value: &str, scope: &str, kind: SecretKind, mode: Option<u32>) -> SecretValue {
        SecretValue { key: key.into(), value: value.into(), scope: scope.into(), kind, path: None, mode }
    }

    #[test]
    fn services_come_from_the_compose_file() {
        let yaml = "services:\n  web:\n    image: a\n  db:\n    image: b\n";
        assert_eq!(services_of(yaml).unwrap(), ["web", "db"]);
        assert!(services_of("version: '3'").is_err());
    }

    #[test]
    fn env_files_quote_for_each_engine() {
        let a = secret("A", "x y$Z", GLOBAL_SCOPE, SecretKind::Env, None);
        let b = secret("B", "it's\nmulti", GLOBAL_SCOPE, SecretKind::Env, None);
        let c = secret("C", r#"${HOME} $$ "q" \n \"#, GLOBAL_SCOPE, SecretKind::Env, None);
        assert_eq!(
            env_file(Engine::Docker, &[&a, &b, &c]).unwrap(),
            r#"A="x y\$Z"
B="it's\nmulti"
C="\${HOME} \$\$ \"q\" \\n \\"
"#
        );
        assert_eq!(env_file(Engine::Podman, &[&a, &c]).unwrap(), "A=x y$Z\nC=${HOME} $$ \"q\" \\n \\\n");
        assert!(env_file(Engine::Podman, &[&b]).unwrap_err().to_string().contains("file secret"));
        let bad = secret("1-A", "v", GLOBAL_SCOPE, SecretKind::Env, None);
        assert!(env_file(Engine::Docker, &[&bad]).is_err());
    }

    #[test]
    fn secrets_are_scoped_and_stay_out_of_the_override() {
        let dir = tempfile::tempdir().unwrap();
        let deploy = Deploy {
            job_id: "d".into(),
            project: "p".into(),
            clone_url: "file:///x".into(),
            git_token: None,
            commit: "a".repeat(40),
            compose_file: "docker-compose.yml".into(),
            images: BTreeMap::from([("web".into(), "r:5000/web@sha256:00".into())]),
            secrets: vec![
                secret("GLOBAL_TOKEN", "g-secret-value", GLOBAL_SCOPE, SecretKind::Env, None),
                secret("WEB_ONLY", "w-secret-value", "web", SecretKind::Env, None),
                secret("key.pem", "f-secret-value", "web", SecretKind::File, Some(0o440)),
            ],
            lifecycle: Default::default(),
            registry_auth: None,
        };
        let services = vec!["web".to_owned(), "worker".to_owned()];
        let secrets_dir = dir.path().join("secrets");
        let overrides = write_secrets(Engine::Docker, &deploy, &services, &secrets_dir).unwrap();
        let web_env = std::fs::read_to_string(overrides["web"].env_file.as_ref().unwrap()).unwrap();
        let worker_env = std::fs::read_to_string(overrides["worker"].env_file.as_ref().unwrap()).unwrap();
        assert!(web_env.contains("GLOBAL_TOKEN") && web_env.contains("WEB_ONLY"));
        assert!(worker_env.contains("GLOBAL_TOKEN") && !worker_env.contains("WEB_ONLY"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(overrides["web"].env_file.as_ref().unwrap()), 0o600);
        assert_eq!(mode(&secrets_dir), 0o700);
        let (host, target) = &overrides["web"].files[0];
        assert_eq!(target, "/run/secrets/key.pem");
        assert_eq!(mode(host), 0o440);
        assert!(overrides["worker"].files.is_empty());
        let yaml = override_yaml(&overrides);
        assert!(yaml.contains("r:5000/web@sha256:00"), "{yaml}");
        for value in ["g-secret-value", "w-secret-value", "f-secret-value"] {
            assert!(!yaml.contains(value), "{yaml}");
        }

        let mut wrong = deploy.clone();
        wrong.secrets[1].scope = "api".into();
        let err = write_secrets(Engine::Docker, &wrong, &services, &secrets_dir).unwrap_err().to_string();
        assert!(err.contains("`api`"), "{err}");
    }

    #[test]
    fn podman_ps_json() {
        let json = r#"[{"Id":"c1","Labels":{"com.docker.compose.service":"web","com.docker.compose.project":"p"},
            "State":"running","Status":"Up 3 seconds ago (healthy)","ExitCode":0,"Exited":false,
            "Ports":[{"host_ip":"127.0.0.1","container_port":8080,"host_port":41234,"range":1,"protocol":"tcp"}]},
            {"Id":"c2","Labels":{"com.docker.compose.service":"db"},"State":"exited","Status":"Exited (3)",
             "ExitCode":3,"Exited":true,"Ports":null}]"#;
        let containers = parse_podman_ps(json).unwrap();
        assert_eq!((containers[0].service.name.as_str(), containers[0].id.as_str()), ("db", "c2"));
        assert_eq!((containers[0].service.state.as_str(), containers[0].exit_code), ("exited", Some(3)));
        assert_eq!(containers[1].service.health.as_deref(), Some("healthy"));
        assert_eq!(containers[1].exit_code, None, "a running container has no exit code");
        assert_eq!(
            containers[1].service.ports,
            [PortMapping { container_port: 8080, published_port: 41234, protocol: "tcp".into() }]
        );
        assert!(!ready(&containers));
        assert!(ready(&containers[1..]));
    }

    #[test]
    fn docker_compose_ps_json_both_formats() {
        let line = r#"{"ID":"abc","Service":"web","State":"running","Health":"","ExitCode":0,"Publishers":[{"URL":"0.0.0.0","TargetPort":80,"PublishedPort":8080,"Protocol":"tcp"},{"URL":"::","TargetPort":80,"PublishedPort":8080,"Protocol":"tcp"},{"URL":"","TargetPort":9000,"PublishedPort":0,"Protocol":"tcp"}]}"#;
        let ndjson = format!(
            "{line}\n{}\n{}\n",
            r#"{"ID":"def","Service":"db","State":"running","Health":"starting","Publishers":null}"#,
            r#"{"ID":"ghi","Service":"migrate","State":"exited","ExitCode":2,"Publishers":[]}"#
        );
        let containers = parse_compose_ps(&ndjson).unwrap();
        let web = &containers[2];
        assert_eq!(web.id, "abc");
        assert_eq!(
            web.service.ports,
            [PortMapping { container_port: 80, published_port: 8080, protocol: "tcp".into() }]
        );
        assert_eq!(containers[0].service.health.as_deref(), Some("starting"));
        assert_eq!((containers[1].service.name.as_str(), containers[1].exit_code), ("migrate", Some(2)));
        assert!(!ready(&containers));
        assert_eq!(parse_compose_ps(&format!("[{line}]")).unwrap().len(), 1);
        assert!(parse_compose_ps("not json").is_err());
    }

    /// A compose file publishing ports in each syntax compose reads.
    const PUBLISHING: &str = r#"
x-ports: &published
  ports: ["9000:9000"]
services:
  web:
    image: web
    ports:
      - "8080:80"
      - "127.0.0.1:8443:443/tcp"
      - "[::1]:5353:53/udp"
      - "${WEB_PORT:-3000}:3000"
      - 9090
      - target: 6000
        published: "6000"
        host_ip: 0.0.0.0
        protocol: udp
  worker:
    image: worker
  admin:
    <<: *published
    image: admin
  db:
    image: postgres
    ports: []
"#;

    #[test]
    fn published_ports_move_to_loopback_and_an_engine_picked_port() {
        let compose = parse_compose(PUBLISHING).unwrap();
        let ports = ephemeral_ports(&compose).unwrap();
        assert_eq!(
            ports,
            BTreeMap::from([
                ("admin".to_owned(), vec!["127.0.0.1::9000".to_owned()]),
                (
                    "web".to_owned(),
                    [
                        "127.0.0.1::80",
                        "127.0.0.1::443",
                        "127.0.0.1::53/udp",
                        "127.0.0.1::3000",
                        "127.0.0.1::9090",
                        "127.0.0.1::6000/udp",
                    ]
                    .map(str::to_owned)
                    .to_vec()
                ),
            ])
        );

        let bad = parse_compose("services:\n  web:\n    ports:\n      - published: 80\n").unwrap();
        let err = ephemeral_ports(&bad).unwrap_err().to_string();
        assert!(err.contains("service `web`") && err.contains("no `target`"), "{err}");
        let bad = parse_compose("services:\n  web:\n    ports: {a: 1}\n").unwrap();
        assert!(ephemeral_ports(&bad).unwrap_err().to_string().contains("must be a list"));
    }

    #[test]
    fn docker_compose_gets_the_ports_through_an_override_tag() {
        let compose = parse_compose(PUBLISHING).unwrap();
        let mut overrides: BTreeMap<String, ServiceOverride> = BTreeMap::new();
        overrides.insert(
            "worker".into(),
            ServiceOverride { image: Some("r/worker@sha256:00".into()), ..Default::default() },
        );
        for (service, ports) in ephemeral_ports(&compose).unwrap() {
            overrides.entry(service).or_default().ports = Some(ports);
        }
        let yaml = override_yaml(&overrides);
        assert_eq!(
            yaml,
            "# Written by the Stagely agent: images and secret mounts for this preview.
services:
  admin:
    ports: !override
    - 127.0.0.1::9000
  web:
    ports: !override
    - 127.0.0.1::80
    - 127.0.0.1::443
    - 127.0.0.1::53/udp
    - 127.0.0.1::3000
    - 127.0.0.1::9090
    - 127.0.0.1::6000/udp
  worker:
    image: r/worker@sha256:00
"
        );
        // The tag survives a reading: compose sees `!override`, not a plain list.
        let back: Value = serde_yaml::from_str(&yaml).unwrap();
        let Value::Tagged(tagged) = &back["services"]["web"]["ports"] else { panic!("tagged: {back:?}") };
        assert_eq!(tagged.tag, Tag::new("override"));
    }

    #[test]
    fn podman_gets_a_copy_of_the_compose_file_with_its_ports_replaced() {
        let compose = parse_compose(PUBLISHING).unwrap();
        let rewritten = with_ports(&compose, &ephemeral_ports(&compose).unwrap());
        let text = serde_yaml::to_string(&rewritten).unwrap();
        let again = parse_compose(&text).unwrap();
        assert_eq!(again["services"]["web"]["ports"][0], "127.0.0.1::80");
        assert_eq!(again["services"]["web"]["ports"].as_sequence().unwrap().len(), 6);
        // The merge key was applied, so the merged-in port is replaced too.
        assert_eq!(again["services"]["admin"]["ports"], Value::Sequence(vec!["127.0.0.1::9000".into()]));
        assert_eq!(again["services"]["admin"]["image"], "admin");
        // Everything else is as written.
        assert_eq!(again["services"]["worker"], compose["services"]["worker"]);
        assert_eq!(again["services"]["db"]["ports"], Value::Sequence(vec![]));
        assert!(!text.contains("8080") && !text.contains("8443"), "{text}");
    }

    #[test]
    fn started_services_leave_out_profiles_and_zero_replicas() {
        let compose = parse_compose(
            "services:\n  web: {}\n  debug:\n    profiles: [debug]\n  off:\n    deploy:\n      replicas: 0\n  \
             one:\n    deploy:\n      replicas: 1\n",
        )
        .unwrap();
        assert_eq!(started_services(&compose).unwrap(), ["web", "one"]);
    }

    fn container(service: &str, state: &str, health: Option<&str>, exit_code: Option<i32>) -> Container {
        Container {
            id: format!("id-{service}"),
            service: ServiceStatus {
                name: service.into(),
                state: state.into(),
                health: health.map(str::to_owned),
                ports: vec![],
            },
            exit_code,
        }
    }

    #[test]
    fn problems_name_each_failed_service() {
        let containers = [
            container("web", "running", None, None),
            container("api", "exited", None, Some(3)),
            container("db", "running", Some("unhealthy"), None),
            container("cache", "created", None, None),
            container("queue", "running", Some("starting"), None),
        ];
        let expected = ["web", "api", "db", "cache", "queue", "mail"].map(str::to_owned);
        assert_eq!(
            problems(&containers, &expected),
            [
                Problem::Stopped { service: "api".into(), id: "id-api".into(), state: "exited".into(), code: Some(3) },
                Problem::Unhealthy { service: "db".into(), id: "id-db".into() },
                Problem::NotStarted { service: "cache".into() },
                Problem::Missing { service: "mail".into() },
            ]
        );
        assert!(problems(&containers[..1], &expected[..1]).is_empty());
    }
}
