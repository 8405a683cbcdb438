//! What the agent's integration tests share: an isolated podman (its own containers.conf and
//! storage in the test's tempdir) or a private dockerd, a local git repository holding the test
//! app, and small HTTP and waiting helpers.

#![allow(dead_code)]

mod docker;

pub use docker::Docker;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stagely_testenv::at_exit;

/// Podman confined to one test: `CONTAINERS_CONF` (cgroupfs, runc, ulimits this machine needs;
/// its own libpod tmp dir and network configurations) and `CONTAINERS_STORAGE_CONF` (images and
/// containers under the tempdir). Without their own tmp dir, tests running side by side share
/// libpod's `alive` file, and one test's `system reset` makes the next podman of another take
/// the machine for rebooted and reset its running containers to `created`.
pub struct Podman {
    /// Environment for every podman, podman-compose and agent process of the test.
    pub env: Vec<(String, String)>,
    root: PathBuf,
}

impl Podman {
    /// Writes the configuration under `dir`. Fails loudly when podman is missing: these tests
    /// are part of the suite, and `scripts/install-deps.sh` installs it.
    pub fn new(dir: &Path) -> Self {
        assert_installed(&["podman", "podman-compose", "runc", "git"]);
        let root = dir.join("podman");
        std::fs::create_dir_all(&root).unwrap();
        let conf = root.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\ntmp_dir = \"{}\"\n\n\
                 [network]\nnetwork_config_dir = \"{}\"\n",
                root.join("tmp").display(),
                root.join("networks").display()
            ),
        )
        .unwrap();
        let storage = root.join("storage.conf");
        std::fs::write(
            &storage,
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                root.join("graph").display(),
                root.join("run").display()
            ),
        )
        .unwrap();
        let env = vec![
            ("CONTAINERS_CONF".to_owned(), conf.to_string_lossy().into_owned()),
            ("CONTAINERS_STORAGE_CONF".to_owned(), storage.to_string_lossy().into_owned()),
        ];
        // What Drop does, again once the test process has exited: a Podman in a static (a test
        // binary's shared stack) is never dropped. Only while the configuration is there, since
        // podman without it would act on the host's own storage.
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={}", at_exit::quote(v))).collect();
        let podman = format!("{} podman", vars.join(" "));
        at_exit::run_at_exit(&format!(
            "if [ -f {storage} ]; then {podman} rm -af -t 0; {podman} system reset -f; fi; rm -rf {root}",
            storage = at_exit::quote(&storage.to_string_lossy()),
            root = at_exit::quote(&root.to_string_lossy()),
        ));
        Self { env, root }
    }

    /// A podman command in this test's storage.
    pub fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs podman with `args` and returns its standard output; panics on failure.
    pub fn run(&self, args: &[&str]) -> String {
        output_of(self.command(), args)
    }
}

/// Runs `command` with `args` and returns its standard output; panics on failure, naming it.
fn output_of(mut command: Command, args: &[&str]) -> String {
    let output = command.args(args).output().unwrap();
    let program = command.get_program().to_string_lossy().into_owned();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers a failed test left behind, then the storage (overlay mounts first).
        let _ = self.command().args(["rm", "-af", "-t", "0"]).output();
        let _ = self.command().args(["system", "reset", "-f"]).output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Fails unless each of `tools` is on the PATH and `/bin/busybox` is statically linked (the test
/// images are built `FROM scratch` around it), naming what to install.
fn assert_installed(tools: &[&str]) {
    for tool in tools {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap().status.success();
        assert!(found, "{tool} is not installed: run scripts/install-deps.sh (make deps)");
    }
    let file = std::fs::read("/bin/busybox").expect("/bin/busybox is missing: install busybox-static (make deps)");
    assert!(
        // A dynamically linked ELF names its loader in an `.interp` section.
        !file.windows(b".interp".len()).any(|w| w == b".interp"),
        "/bin/busybox is dynamically linked: install busybox-static (make deps)"
    );
}

/// A container engine confined to one test, as the agent drives it.
pub enum Engine {
    /// podman with podman-compose.
    Podman(Podman),
    /// Docker with the compose plugin.
    Docker(Docker),
}

impl Engine {
    /// Podman confined to `dir`.
    pub fn podman(dir: &Path) -> Self {
        Self::Podman(Podman::new(dir))
    }

    /// A private dockerd with its files under `dir`.
    pub fn docker(dir: &Path) -> Self {
        Self::Docker(Docker::new(dir))
    }

    /// The engine's command, as the agent calls it and `STAGELY_ENGINE` names it.
    pub fn program(&self) -> &'static str {
        match self {
            Self::Podman(_) => "podman",
            Self::Docker(_) => "docker",
        }
    }

    /// Environment for every engine and compose command the agent runs.
    pub fn env(&self) -> &[(String, String)] {
        match self {
            Self::Podman(podman) => &podman.env,
            Self::Docker(docker) => &docker.env,
        }
    }

    /// The environment an executor's configuration is loaded from: [`agent_env`] with this
    /// engine, and for docker the user's `DOCKER_CONFIG`, where the compose plugin is.
    pub fn agent_env(&self, work: &Path) -> std::collections::BTreeMap<String, String> {
        let mut env = agent_env(work);
        env.insert("STAGELY_ENGINE".into(), self.program().into());
        if let Self::Docker(docker) = self {
            env.insert("DOCKER_CONFIG".into(), docker.config_dir.to_string_lossy().into_owned());
        }
        env
    }

    /// An engine command in this test's storage.
    pub fn command(&self) -> Command {
        match self {
            Self::Podman(podman) => podman.command(),
            Self::Docker(docker) => docker.command(),
        }
    }

    /// Runs the engine with `args` and returns its standard output; panics on failure.
    pub fn run(&self, args: &[&str]) -> String {
        output_of(self.command(), args)
    }
}

/// The test app's repository: a `FROM scratch` image with busybox serving `/www` on 8080, and
/// a compose file with `web` (published on `port`) and `worker`. Returns the commit.
pub fn app_repo(dir: &Path, port: u16) -> String {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(dir.join("www/index.html"), "hello from stagely\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCOPY www /www\nENTRYPOINT [\"/bin/busybox\"]\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("docker-compose.yml"),
        format!(
            "services:\n  web:\n    build: .\n    ports:\n      - \"127.0.0.1:{port}:8080\"\n  worker:\n    build: .\n    command: [\"httpd\", \"-f\", \"-p\", \"8081\", \"-h\", \"/www\"]\n"
        ),
    )
    .unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "."]);
    git(dir, &["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "app"]);
    git(dir, &["rev-parse", "HEAD"]).trim().to_owned()
}

/// A later commit of the repository at `dir` with `path` written as `contents`; returns it.
pub fn commit_file(dir: &Path, path: &str, contents: &str) -> String {
    std::fs::write(dir.join(path), contents).unwrap();
    git(dir, &["add", path]);
    git(dir, &["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", path]);
    git(dir, &["rev-parse", "HEAD"]).trim().to_owned()
}

/// Builds the image in `context` with `engine` and pushes it as `image` to a plain-HTTP
/// registry on loopback.
pub fn build_and_push(engine: &Engine, context: &Path, image: &str) {
    engine.run(&["build", "-q", "-t", image, &context.to_string_lossy()]);
    match engine {
        Engine::Podman(podman) => podman.run(&["push", "-q", "--tls-verify=false", image]),
        // Docker reaches registries on loopback over plain HTTP unasked.
        Engine::Docker(docker) => docker.run(&["push", "-q", image]),
    };
}

/// A build context for a `FROM scratch` image holding only a static busybox (as `sh`, `wget`
/// and the rest), with no entrypoint: what end-to-end test commands run in.
pub fn busybox_context(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .unwrap();
    dir.to_owned()
}

/// Runs git in `dir`; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git").arg("-C").arg(dir).args(args).output().unwrap();
    assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on 127.0.0.1:`port`: status and body, if anything answered.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent `bin` started as on a VM: `dir/agent.json` written as cloud-init writes it (mode
/// 0600) for agent `agent-1` of the plain `ws://` `gateway_url` on loopback (so `insecure`) with
/// `token`, podman as the engine, its work directory under `dir`, no fixed ops port, and quick
/// reconnects.
pub fn agent_command(bin: &Path, dir: &Path, gateway_url: &str, token: &str) -> Command {
    let json = serde_json::json!({"gateway_url": gateway_url, "agent_id": "agent-1", "token": token,
        "role": "preview", "insecure": true});
    agent_command_with(bin, dir, &json.to_string())
}

/// Like [`agent_command`], with `config` as the whole of `dir/agent.json`.
pub fn agent_command_with(bin: &Path, dir: &Path, config_json: &str) -> Command {
    use std::os::unix::fs::PermissionsExt;
    let config = dir.join("agent.json");
    std::fs::write(&config, config_json).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut command = Command::new(bin);
    command
        .arg("--config")
        .arg(&config)
        .env("STAGELY_OPS_ADDR", "127.0.0.1:0")
        .env("STAGELY_WORK_DIR", dir.join("work"))
        .env("STAGELY_ENGINE", "podman")
        .env("STAGELY_RECONNECT_INITIAL_MS", "50");
    command
}

/// The environment an executor's configuration is loaded from in tests: agent `agent-test` of
/// a plain gateway on loopback that no one serves, podman as the engine, `work` as the work
/// directory.
pub fn agent_env(work: &Path) -> std::collections::BTreeMap<String, String> {
    [
        ("STAGELY_GATEWAY_URL", "ws://127.0.0.1:9/v1/agent/connect".to_owned()),
        ("STAGELY_INSECURE", "1".to_owned()),
        ("STAGELY_AGENT_ID", "agent-test".to_owned()),
        ("STAGELY_AGENT_TOKEN", "enrollment".to_owned()),
        ("STAGELY_ENGINE", "podman".to_owned()),
        ("STAGELY_WORK_DIR", work.to_string_lossy().into_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The `stagely-agent` binary, for tests of other packages (which have no `CARGO_BIN_EXE_` for
/// it): built if needed, found beside the test executable's `deps/` directory.
pub fn agent_bin() -> PathBuf {
    let status = Command::new(env!("CARGO")).args(["build", "-q", "-p", "stagely-agent"]).status().unwrap();
    assert!(status.success(), "building stagely-agent failed");
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("stagely-agent")
}
