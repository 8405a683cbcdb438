//! The `local` provider: an "instance" is an agent process on the operator's host, started with
//! the configuration its cloud-init user data carries. It backs `make demo` and the end-to-end
//! tests, where no cloud can be reached.
//!
//! Each instance lives in `<state_dir>/<name>/`: `agent.json` (the agent's configuration, mode
//! 0600, taken from the user data), `instance.json` (pid, tags, launch time) and `agent.log`.
//! Everything the provider knows is on disk, so an operator restarted while agents run still
//! finds, lists and stops them. Terminating an instance stops its agent, then runs
//! `stagely-agent --teardown` on its work directory: a cloud VM's containers go with the VM, a
//! local instance's would outlive the agent (a dead one included) and keep their host ports.
//!
//! Every agent shares the host, so each publishes its preview's ports on 127.0.0.1 and ports the
//! engine picks (`STAGELY_EPHEMERAL_PORTS=1`), never the compose file's: two previews of one
//! repository would otherwise clash. The agent's DEPLOY STATUS says which ports it got.
//!
//! The agents reach the gateway on loopback, so they are the ones allowed a plain `ws://`
//! gateway (`STAGELY_INSECURE=1`); a `wss://` gateway is still verified.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use stagely_api::keys::cloud_tags;
use stagely_api::v1alpha1::{ContainerEngine, Platform, Size};

use super::cloudinit::AGENT_CONFIG_PATH;
use super::{BoxFuture, CloudProvider, Instance, InstanceSpec, InstanceState, ProviderError};

const PROVIDER: &str = "local";

/// How long stopping an instance's containers may take.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(120);

/// How the local provider starts agents.
#[derive(Clone, Debug)]
pub struct LocalSettings {
    /// The `stagely-agent` binary.
    pub agent_bin: PathBuf,
    /// Where instance directories are kept.
    pub state_dir: PathBuf,
    /// The container engine the agents drive.
    pub engine: ContainerEngine,
    /// Extra environment for the agents (e.g. `CONTAINERS_CONF` for podman).
    pub env: BTreeMap<String, String>,
}

/// Agent processes on this host.
#[derive(Debug)]
pub struct Local {
    settings: LocalSettings,
}

/// What is kept on disk about one instance.
#[derive(Serialize, Deserialize, Debug)]
struct Record {
    pid: u32,
    launched_at: SystemTime,
    tags: BTreeMap<String, String>,
    idempotency_key: String,
}

impl Local {
    /// A provider starting agents as `settings` say.
    pub fn new(settings: LocalSettings) -> Self {
        Self { settings }
    }

    fn dir(&self, name: &str) -> Result<PathBuf, ProviderError> {
        let valid = !name.is_empty()
            && name.len() <= 128
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            && !name.starts_with('.');
        if !valid {
            return Err(ProviderError::Unsupported(format!("{name:?} is not a valid local instance name")));
        }
        Ok(self.settings.state_dir.join(name))
    }

    fn read(&self, dir: &Path) -> Option<Record> {
        serde_json::from_slice(&std::fs::read(dir.join("instance.json")).ok()?).ok()
    }

    fn instance(&self, name: &str, dir: &Path, record: &Record) -> Instance {
        let alive = agent_running(record.pid, &dir.join("agent.json"));
        Instance {
            id: name.to_owned(),
            state: if alive { InstanceState::Running } else { InstanceState::Terminated },
            public_ip: alive.then_some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            private_ip: alive.then_some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            launched_at: Some(record.launched_at),
            tags: record.tags.clone(),
        }
    }

    /// The agent of the instance in `dir`, as it runs there.
    fn agent_command(&self, dir: &Path) -> tokio::process::Command {
        let engine = match self.settings.engine {
            ContainerEngine::Docker => "docker",
            ContainerEngine::Podman => "podman",
        };
        let mut command = tokio::process::Command::new(&self.settings.agent_bin);
        command
            .arg("--config")
            .arg(dir.join("agent.json"))
            .env("STAGELY_ENGINE", engine)
            .env("STAGELY_WORK_DIR", dir.join("work"))
            // Nothing else listens for the agent's ops endpoints on a shared host.
            .env("STAGELY_OPS_ADDR", "127.0.0.1:0")
            // The "VM" is the agent: after too long without the gateway it stops itself, never
            // the host.
            .env("STAGELY_SHUTDOWN_COMMAND", "kill -TERM $PPID")
            // Previews share the host's ports: each gets its own, which STATUS reports.
            .env("STAGELY_EPHEMERAL_PORTS", "1")
            // The gateway is on this host: plain ws:// is allowed (wss:// is still verified).
            .env("STAGELY_INSECURE", "1")
            .envs(&self.settings.env);
        command
    }

    /// Stops the containers of the instance in `dir` with `stagely-agent --teardown`: a cloud
    /// VM's containers go with the VM, a local instance's would outlive its agent, holding
    /// their ports on the host.
    async fn teardown(&self, dir: &Path) -> Result<(), ProviderError> {
        if !dir.join("work").join("deploy").exists() {
            return Ok(());
        }
        let mut command = self.agent_command(dir);
        command.arg("--teardown").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        command.kill_on_drop(true);
        let failed = |message: String| ProviderError::Transport { provider: PROVIDER, message };
        let output = tokio::time::timeout(TEARDOWN_TIMEOUT, command.output())
            .await
            .map_err(|_| {
                failed(format!("stopping the containers of {} took over {TEARDOWN_TIMEOUT:?}", dir.display()))
            })?
            .map_err(|err| failed(format!("cannot start {}: {err}", self.settings.agent_bin.display())))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(failed(format!(
            "stopping the containers of {} failed ({}): {}",
            dir.display(),
            output.status,
            tail.join(" / ")
        )))
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        let dir = self.dir(&spec.name)?;
        if let Some(record) = self.read(&dir) {
            let instance = self.instance(&spec.name, &dir, &record);
            if record.idempotency_key == spec.idempotency_key && instance.state == InstanceState::Running {
                return Ok(instance);
            }
        }
        let config = agent_config(&spec.user_data)?;
        let io = |err: std::io::Error| ProviderError::Transport {
            provider: PROVIDER,
            message: format!("cannot prepare {}: {err}", dir.display()),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let config_path = dir.join("agent.json");
        let _ = std::fs::remove_file(&config_path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&config_path)
            .and_then(|mut file| file.write_all(config.as_bytes()))
            .map_err(io)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(dir.join("agent.log"));
        let log = log.map_err(io)?;
        let mut command = self.agent_command(&dir);
        command.stdin(Stdio::null()).stdout(log.try_clone().map_err(io)?).stderr(log).kill_on_drop(false);
        let mut child = command.spawn().map_err(|err| ProviderError::Transport {
            provider: PROVIDER,
            message: format!("cannot start {}: {err}", self.settings.agent_bin.display()),
        })?;
        let pid = child.id().unwrap_or_default();
        // Until it has exec'd, the child still shows this process's command line; wait for the
        // agent's own, so the instance reads as running from the first answer on.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !agent_running(pid, &config_path) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ProviderError::Transport {
                    provider: PROVIDER,
                    message: format!("the agent exited at once ({status}); see {}", dir.join("agent.log").display()),
                });
            }
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Reap it when it exits, so no zombie is left behind.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let record = Record {
            pid,
            launched_at: SystemTime::now(),
            tags: spec.tags.clone(),
            idempotency_key: spec.idempotency_key.clone(),
        };
        std::fs::write(dir.join("instance.json"), serde_json::to_vec(&record).expect("record serializes"))
            .map_err(io)?;
        tracing::info!(name = %spec.name, pid, "started local agent");
        Ok(self.instance(&spec.name, &dir, &record))
    }

    async fn terminate_instance(&self, id: &str) -> Result<(), ProviderError> {
        let dir = self.dir(id)?;
        let Some(record) = self.read(&dir) else {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(());
        };
        let config = dir.join("agent.json");
        if agent_running(record.pid, &config) {
            signal(record.pid, rustix::process::Signal::TERM);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while agent_running(record.pid, &config) {
                if tokio::time::Instant::now() > deadline {
                    signal(record.pid, rustix::process::Signal::KILL);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if dir.join("agent.json").exists() {
            self.teardown(&dir).await?;
        }
        std::fs::remove_dir_all(&dir).or_else(ignore_not_found).map_err(|err| ProviderError::Transport {
            provider: PROVIDER,
            message: format!("cannot remove {}: {err}", dir.display()),
        })
    }

    fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        let entries = match std::fs::read_dir(&self.settings.state_dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => {
                return Err(ProviderError::Transport {
                    provider: PROVIDER,
                    message: format!("cannot read {}: {err}", self.settings.state_dir.display()),
                });
            }
        };
        let mut instances: Vec<Instance> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let record = self.read(&entry.path())?;
                Some(self.instance(&name, &entry.path(), &record))
            })
            .filter(|i| i.tags.get(cloud_tags::MANAGED_BY).map(String::as_str) == Some("stagely"))
            .filter(|i| i.state != InstanceState::Terminated)
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(instances)
    }
}

fn ignore_not_found(err: std::io::Error) -> std::io::Result<()> {
    if err.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(err) }
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Whether `pid` is a live agent started with `config` (not a process that reused the pid).
fn agent_running(pid: u32, config: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie (state Z) has exited; it only waits to be reaped.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    let config = config.as_os_str().as_encoded_bytes();
    state != Some("Z") && cmdline.split(|b| *b == 0).any(|arg| arg == config)
}

/// The agent configuration the cloud-init document writes to [`AGENT_CONFIG_PATH`].
pub fn agent_config(user_data: &str) -> Result<String, ProviderError> {
    let invalid =
        |why: &str| ProviderError::Unsupported(format!("the local provider cannot use this user data: {why}"));
    let doc: serde_yaml::Value = serde_yaml::from_str(user_data).map_err(|_| invalid("it is not YAML"))?;
    let files = doc.get("write_files").and_then(|f| f.as_sequence()).ok_or_else(|| invalid("no write_files"))?;
    let file = files
        .iter()
        .find(|f| f.get("path").and_then(|p| p.as_str()) == Some(AGENT_CONFIG_PATH))
        .ok_or_else(|| invalid(&format!("no {AGENT_CONFIG_PATH} in write_files")))?;
    let content = file.get("content").and_then(|c| c.as_str()).ok_or_else(|| invalid("the agent config is empty"))?;
    Ok(content.trim().to_owned())
}

impl CloudProvider for Local {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance, ProviderError>> {
        Box::pin(self.create_instance(spec))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            let dir = self.dir(id)?;
            Ok(self.read(&dir).map(|record| self.instance(id, &dir, &record)))
        })
    }

    fn terminate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.terminate_instance(id))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move { self.list_instances() })
    }

    fn validate_credentials(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            let bin = &self.settings.agent_bin;
            let executable = std::fs::metadata(bin).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if !executable.unwrap_or(false) {
                return Err(ProviderError::Unsupported(format!(
                    "the agent binary {} is missing or not executable (set --local-agent-bin)",
                    bin.display()
                )));
            }
            Ok(())
        })
    }

    fn hourly_price(&self, _size: Size, _platform: Platform) -> BoxFuture<'_, Result<Option<f64>, ProviderError>> {
        Box::pin(async { Ok(Some(0.0)) })
    }
}
