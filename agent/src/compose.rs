//! DEPLOY and TERMINATE: the app runs with compose from the repository's compose file plus
//! `docker-compose.stagely.yml`, an override that sets the built images and mounts the secrets.
//! Secret values never enter the override: environment secrets go to a 0600 env file per
//! service, file secrets to files with their modes, both under the project's `secrets/`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stagely_api::protocol::{Deploy, GLOBAL_SCOPE, PortMapping, SecretKind, SecretValue, ServiceStatus, Terminate};

use crate::config::Engine;
use crate::executor::{Context, JobError, JobLog, Outcome, check_name, registry_of, relative, run};

/// The override's file name, next to the repository's compose file.
pub const OVERRIDE_FILE: &str = "docker-compose.stagely.yml";

/// Where file secrets go in the container when the secret names no directory.
pub const DEFAULT_SECRET_DIR: &str = "/run/secrets";

/// How long services may take to start and become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// What TERMINATE needs to find a deployment: written next to it.
#[derive(Serialize, Deserialize, Debug)]
struct Deployment {
    project: String,
    files: Vec<PathBuf>,
}

/// The service names of a compose file.
pub fn services_of(compose_yaml: &str) -> Result<Vec<String>, JobError> {
    let value: serde_yaml::Value = serde_yaml::from_str(compose_yaml)
        .map_err(|err| JobError::Invalid(format!("the compose file is not valid YAML: {err}")))?;
    let services = value
        .get("services")
        .and_then(|s| s.as_mapping())
        .ok_or_else(|| JobError::Invalid("the compose file has no `services`".into()))?;
    Ok(services.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect())
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
}

/// The override's YAML. It holds paths and image references, never a secret value.
pub fn override_yaml(overrides: &BTreeMap<String, ServiceOverride>) -> String {
    use serde_yaml::{Mapping, Value};
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

/// An env file for `secrets`. Docker compose unquotes values; podman passes the line as is, so
/// it cannot hold a value with a line break.
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
            Engine::Podman if value.contains('\n') => {
                return Err(JobError::Invalid(format!(
                    "environment secret `{key}` has a line break, which podman's env files cannot hold; make it a file secret"
                )));
            }
            Engine::Podman => format!("{key}={value}"),
            Engine::Docker if !value.contains('\'') && !value.contains('\n') => format!("{key}='{value}'"),
            Engine::Docker => {
                let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                format!("{key}=\"{escaped}\"")
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// The services of a project from `podman ps -a --format json`.
pub fn parse_podman_ps(json: &str) -> Result<Vec<ServiceStatus>, JobError> {
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
    struct Container {
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        state: String,
        #[serde(default)]
        status: String,
        #[serde(default)]
        ports: Option<Vec<Port>>,
    }
    let containers: Vec<Container> = serde_json::from_str(json.trim())
        .map_err(|err| JobError::Invalid(format!("failed to parse `podman ps` output: {err}")))?;
    let mut services: Vec<ServiceStatus> = containers
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
            Some(ServiceStatus { name, state: c.state.to_lowercase(), health, ports })
        })
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(services)
}

/// The services from `docker compose ps --format json`: one JSON object per line (compose
/// v2.21 and later) or one array (earlier).
pub fn parse_compose_ps(text: &str) -> Result<Vec<ServiceStatus>, JobError> {
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
        service: String,
        state: String,
        #[serde(default)]
        health: String,
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
    let mut services: Vec<ServiceStatus> = entries
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
            ServiceStatus {
                name: e.service,
                state: e.state.to_lowercase(),
                health: (!e.health.is_empty()).then_some(e.health),
                ports,
            }
        })
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(services)
}

/// Whether every service has settled: running (and healthy, where it has a health check).
fn ready(services: &[ServiceStatus]) -> bool {
    !services.is_empty()
        && services.iter().all(|s| s.state == "running" && s.health.as_deref().is_none_or(|h| h == "healthy"))
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

/// The state of each service of `project`.
pub async fn service_statuses(ctx: &Context, project: &str, files: &[PathBuf]) -> Result<Vec<ServiceStatus>, JobError> {
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
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(JobError::io("write", path))?;
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(JobError::io("write", path))?;
    // The mode is set after the write, so a wider mode never shows a half-written file.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(JobError::io("chmod", path))
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
        if !dir.starts_with('/') || dir.contains(':') || dir.split('/').any(|c| c == "..") {
            return Err(JobError::Invalid(format!("file secret `{}`: `{dir}` must be an absolute path", secret.key)));
        }
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

/// Deploys: clone, write secrets and the override, pull, up, hooks, and report the services.
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
    let compose_path = src.join(&compose_file);
    let yaml = std::fs::read_to_string(&compose_path).map_err(JobError::io("read the compose file", &compose_path))?;
    let services = services_of(&yaml)?;
    for hook in &deploy.lifecycle.on_start {
        if !services.contains(&hook.service) {
            return Err(JobError::Invalid(format!(
                "an on_start hook names service `{}`, which the compose file does not define",
                hook.service
            )));
        }
    }
    let overrides = write_secrets(ctx.engine, deploy, &services, &dir.join("secrets"))?;
    let override_path = compose_path.parent().unwrap_or(&src).join(OVERRIDE_FILE);
    std::fs::write(&override_path, override_yaml(&overrides)).map_err(JobError::io("write", &override_path))?;
    let files = vec![compose_path, override_path];
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
    if ctx.engine == Engine::Docker {
        up.arg("--remove-orphans");
    }
    run(log, "start the services", up, None).await?;
    let services = wait_ready(ctx, &deploy.project, &files).await?;
    for hook in &deploy.lifecycle.on_start {
        let mut exec = ctx.compose(&base);
        exec.args(["exec", "-T", &hook.service, "sh", "-c", &hook.command]);
        run(log, &format!("run the on_start hook in {}", hook.service), exec, None).await?;
    }
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

async fn wait_ready(ctx: &Context, project: &str, files: &[PathBuf]) -> Result<Vec<ServiceStatus>, JobError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let services = service_statuses(ctx, project, files).await?;
        if ready(&services) {
            return Ok(services);
        }
        if services
            .iter()
            .any(|s| s.health.as_deref() == Some("unhealthy") || matches!(s.state.as_str(), "exited" | "dead"))
            || Instant::now() > deadline
        {
            let summary: Vec<String> = services
                .iter()
                .map(|s| {
                    format!(
                        "{} is {}{}",
                        s.name,
                        s.state,
                        s.health.as_deref().map(|h| format!(" ({h})")).unwrap_or_default()
                    )
                })
                .collect();
            return Err(JobError::Unhealthy(format!("the services did not become healthy: {}", summary.join(", "))));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
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
        assert_eq!(env_file(Engine::Docker, &[&a, &b]).unwrap(), "A='x y$Z'\nB=\"it's\\nmulti\"\n");
        assert_eq!(env_file(Engine::Podman, &[&a]).unwrap(), "A=x y$Z\n");
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
        let json = r#"[{"Labels":{"com.docker.compose.service":"web","com.docker.compose.project":"p"},
            "State":"running","Status":"Up 3 seconds ago (healthy)",
            "Ports":[{"host_ip":"","container_port":8080,"host_port":18080,"range":1,"protocol":"tcp"}]},
            {"Labels":{"com.docker.compose.service":"db"},"State":"exited","Status":"Exited (1)","Ports":null}]"#;
        let services = parse_podman_ps(json).unwrap();
        assert_eq!(services[0].name, "db");
        assert_eq!(services[0].state, "exited");
        assert_eq!(services[1].health.as_deref(), Some("healthy"));
        assert_eq!(
            services[1].ports,
            [PortMapping { container_port: 8080, published_port: 18080, protocol: "tcp".into() }]
        );
        assert!(!ready(&services));
        assert!(ready(&services[1..]));
    }

    #[test]
    fn docker_compose_ps_json_both_formats() {
        let line = r#"{"Service":"web","State":"running","Health":"","Publishers":[{"URL":"0.0.0.0","TargetPort":80,"PublishedPort":8080,"Protocol":"tcp"},{"URL":"::","TargetPort":80,"PublishedPort":8080,"Protocol":"tcp"},{"URL":"","TargetPort":9000,"PublishedPort":0,"Protocol":"tcp"}]}"#;
        let ndjson =
            format!("{line}\n{}\n", r#"{"Service":"db","State":"running","Health":"starting","Publishers":null}"#);
        let services = parse_compose_ps(&ndjson).unwrap();
        assert_eq!(
            services[1].ports,
            [PortMapping { container_port: 80, published_port: 8080, protocol: "tcp".into() }]
        );
        assert_eq!(services[0].health.as_deref(), Some("starting"));
        assert!(!ready(&services));
        assert_eq!(parse_compose_ps(&format!("[{line}]")).unwrap().len(), 1);
        assert!(parse_compose_ps("not json").is_err());
    }
}
