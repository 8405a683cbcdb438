//! Stagely's whole stack for end-to-end tests, every part real and on loopback: testenv's
//! control plane, redis-server, the distribution registry with token auth (its realm on the
//! operator's gateway), and the `stagely-operator` binary itself, whose `local` CloudProviders
//! start real agent processes that build with podman.
//!
//! Tests work in namespaces of their own: [`Stack::namespace`] creates one with a local
//! CloudProvider, a GitHub credentials Secret and a Project reading a git repository on disk.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use stagely_api::v1alpha1::{
    BuildJob, CloudProvider, Environment, EnvironmentSpec, LocalObjectRef, Platform, Project, PullRequest, Size,
};
use stagely_operator::providers::cloudinit::{self, AgentBootstrap};
use stagely_operator::providers::{InstanceSpec, Role, stagely_tags};
use stagely_testenv::registry::{Registry, TokenAuth, TokenKey};
use stagely_testenv::server::Server;
use stagely_testenv::{ControlPlane, Options};

use crate::agent_support::{Podman, agent_bin, free_port, git};

/// Generous bounds: builds share two cores with everything else.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(120);
/// Anything that is not a build.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The registry's token service and issuer, as the operator is told too.
const SERVICE: &str = "stagely-registry";
const ISSUER: &str = "stagely";

/// Everything but the operator, which tests start (and may kill) through [`Stack::operator`].
pub struct Stack {
    pub plane: &'static ControlPlane,
    pub redis: Server,
    pub registry: Registry,
    pub podman: Podman,
    pub dir: tempfile::TempDir,
    pub gateway_port: u16,
    key_file: PathBuf,
    cert_file: PathBuf,
    signing_key_file: PathBuf,
}

impl Stack {
    /// The stack every test of this test binary shares, started on first use. Its processes die
    /// with the test process.
    pub fn shared() -> &'static Stack {
        static SHARED: std::sync::OnceLock<Stack> = std::sync::OnceLock::new();
        SHARED.get_or_init(Stack::start)
    }

    /// Starts the control plane, Redis and the registry; the operator's ports are chosen now,
    /// since the registry's token realm names the gateway.
    fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("stagely-e2e-").tempdir().unwrap();
        // The shared stack is a static, never dropped: when the process ends, the agents the
        // local provider started under it are killed, then podman removes their containers,
        // then its directory goes.
        let path = dir.path().to_string_lossy().into_owned();
        stagely_testenv::at_exit::run_at_exit(&format!("pkill -KILL -f {}", stagely_testenv::at_exit::quote(&path)));
        let podman = Podman::new(dir.path());
        stagely_testenv::at_exit::remove_at_exit(dir.path());
        let plane = stagely_testenv::shared(|| Options { crds: stagely_api::crds(), ..Options::default() });
        let redis = Server::redis().expect("redis-server is installed (make deps)");
        let gateway_port = free_port();
        let key = TokenKey::generate().unwrap();
        let key_file = dir.path().join("registry-token.key");
        let cert_file = dir.path().join("registry-token.crt");
        std::fs::write(&key_file, &key.key_pem).unwrap();
        std::fs::write(&cert_file, &key.cert_pem).unwrap();
        let registry = Registry::start_with_token_auth(&TokenAuth {
            realm: format!("http://127.0.0.1:{gateway_port}/v1/registry/token"),
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_cert_pem: key.cert_pem.clone(),
        })
        .expect("the registry starts (testenv/build.sh builds it)");
        let signing_key_file = dir.path().join("gateway.key");
        std::fs::write(&signing_key_file, b"a test gateway signing key of at least 32 bytes").unwrap();
        Self { plane, redis, registry, podman, dir, gateway_port, key_file, cert_file, signing_key_file }
    }

    /// A client of the control plane.
    pub async fn client(&self) -> Client {
        self.plane.client().await.unwrap()
    }

    /// Where `local` CloudProviders of `namespace` keep their instances.
    pub fn local_dir(&self, namespace: &str) -> PathBuf {
        self.dir.path().join("local").join(namespace)
    }

    /// The operator's log.
    pub fn operator_log(&self) -> PathBuf {
        self.dir.path().join("operator.log")
    }

    /// Starts the operator binary against this stack, `local` CloudProviders allowed; it dies
    /// with the test process.
    pub fn operator(&self) -> Operator {
        self.operator_with(true)
    }

    /// Starts the operator binary against this stack, with `--allow-local-provider` or without;
    /// GitHub is off.
    pub fn operator_with(&self, allow_local: bool) -> Operator {
        self.operator_opts(allow_local, "off")
    }

    /// Starts the operator binary against this stack, `local` CloudProviders allowed, calling
    /// GitHub at `github_api_url`.
    pub fn operator_with_github(&self, github_api_url: &str) -> Operator {
        self.operator_opts(true, github_api_url)
    }

    fn operator_opts(&self, allow_local: bool, github_api_url: &str) -> Operator {
        self.operator_custom(allow_local, &[("--github-api-url", github_api_url)], &[])
    }

    /// Starts the operator binary against this stack, `local` CloudProviders allowed or not,
    /// with `flags` (name, value) in place of the stack's value of the same flag or added to them,
    /// and `env` over the stack's environment. GitHub is off unless `flags` says otherwise. It
    /// gets a Lease of its own, free, so it leads at once (a killed predecessor's Lease would
    /// hold it back for the Lease's duration).
    pub fn operator_custom(&self, allow_local: bool, flags: &[(&str, &str)], env: &[(&str, &str)]) -> Operator {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let lease = format!(
            "stagely-operator-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut flags = flags.to_vec();
        if allow_local {
            flags.push(("--allow-local-provider", ""));
        }
        if !flags.iter().any(|(flag, _)| *flag == "--lease-name") {
            flags.push(("--lease-name", &lease));
        }
        // A port found free can be taken before the operator binds it (as the local end of any
        // connection, e.g. the gateway's, whose port stays the same across restarts): an operator
        // that exits as it starts is started again. Ready (the Lease held, the gateway bound)
        // means both its listeners are bound (a bare connect could even reach a socket connected
        // to itself).
        let deadline = std::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let (mut child, ops_port) = self.spawn_operator(&self.operator_log(), self.gateway_port, &flags, env);
            let started = crate::agent_support::wait_for("the operator to lead or exit", STEP_TIMEOUT, || {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(Err(status));
                }
                crate::agent_support::http_get(ops_port, "/readyz").filter(|(status, _)| *status == 200).map(|_| Ok(()))
            });
            match started {
                Ok(()) => return Operator { child, ops_port, gateway_port: self.gateway_port },
                Err(status) => assert!(
                    std::time::Instant::now() < deadline,
                    "the operator keeps exiting as it starts ({status}); its log: {}",
                    self.operator_log().display()
                ),
            }
        }
    }

    /// Starts one of several operator replicas electing their leader through Lease `lease` (in
    /// namespace `default`) as `holder`, with its gateway on a port of its own, logging to
    /// [`Stack::replica_log`]; its agents are given the stack's gateway port, where a
    /// `Forwarder` (support/forwarder.rs) passes them on to whichever replica is ready. Returns
    /// once it is live (`/healthz`), leader or not. `local` CloudProviders allowed, GitHub off.
    pub fn replica(&self, lease: &str, holder: &str) -> Operator {
        let gateway_port = free_port();
        let url = format!("ws://127.0.0.1:{}{}", self.gateway_port, stagely_api::protocol::CONNECT_PATH);
        let flags = [
            ("--lease-name", lease),
            ("--lease-namespace", "default"),
            ("--lease-holder", holder),
            ("--agent-gateway-url", url.as_str()),
            ("--allow-local-provider", ""),
        ];
        // Inherited by the agents: they look for the leader again within 2 s, not 30.
        let env = [("STAGELY_RECONNECT_MAX_MS", "2000")];
        let (child, ops_port) = self.spawn_operator(&self.replica_log(holder), gateway_port, &flags, &env);
        crate::agent_support::wait_for(&format!("{holder} to be live"), STEP_TIMEOUT, || {
            crate::agent_support::http_get(ops_port, "/healthz").filter(|(status, _)| *status == 200)
        });
        Operator { child, ops_port, gateway_port }
    }

    /// A directory holding the built agent as the operator's binary for linux/amd64.
    fn agent_bin_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("agents");
        let link = dir.join("stagely-agent-linux-amd64");
        if !link.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            let _ = std::os::unix::fs::symlink(built_agent(), &link);
        }
        dir
    }

    /// The log of replica `holder`.
    pub fn replica_log(&self, holder: &str) -> PathBuf {
        self.dir.path().join(format!("operator-{holder}.log"))
    }

    /// Spawns the operator binary against this stack, its gateway on `gateway_port`, logging to
    /// `log`, with `flags` (an empty value: a flag without one) over the stack's and `env`; and the
    /// free port its ops endpoints get.
    fn spawn_operator(
        &self,
        log: &Path,
        gateway_port: u16,
        flags: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> (Child, u16) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let ops_port = free_port();
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut args: Vec<(&str, String)> = vec![
            ("--ops-addr", format!("127.0.0.1:{ops_port}")),
            ("--gateway-addr", format!("127.0.0.1:{gateway_port}")),
            ("--gateway-signing-key-file", path(&self.signing_key_file)),
            ("--redis-url", self.redis.url()),
            ("--registry", self.registry.addr().to_string()),
            ("--registry-token-key-file", path(&self.key_file)),
            ("--registry-token-cert-file", path(&self.cert_file)),
            ("--registry-token-issuer", ISSUER.to_owned()),
            ("--registry-token-service", SERVICE.to_owned()),
            ("--local-agent-bin", path(built_agent())),
            // What cloud VMs download from the gateway: the same binary.
            ("--agent-bin-dir", path(&self.agent_bin_dir())),
            ("--local-state-dir", path(&self.dir.path().join("local"))),
            ("--source-cache-dir", path(&self.dir.path().join("source"))),
            ("--vm-check-interval-secs", "2".to_owned()),
            ("--agent-connect-timeout-secs", "180".to_owned()),
            ("--github-api-url", "off".to_owned()),
            // The tests apply Environments themselves; the resync (tested in tests/github.rs)
            // would apply the fake GitHub's pull requests over them.
            ("--github-resync-secs", "86400".to_owned()),
        ];
        for (flag, value) in flags {
            match args.iter_mut().find(|(name, _)| name == flag) {
                Some(arg) => arg.1 = (*value).to_owned(),
                None => args.push((flag, (*value).to_owned())),
            }
        }
        let mut command = Command::new(env!("CARGO_BIN_EXE_stagely-operator"));
        command
            .env("KUBECONFIG", self.plane.kubeconfig())
            .env("RUST_LOG", "info,stagely_operator=debug")
            // Inherited by the local provider's agents: when the test process (and with it the
            // operator) is gone, the previews a test left stop within a minute, not fifteen.
            .env("STAGELY_DISCONNECT_SHUTDOWN_SECONDS", "60")
            .envs(self.podman.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (flag, value) in &args {
            command.arg(flag);
            if !value.is_empty() {
                command.arg(value);
            }
        }
        (stagely_testenv::spawn_tied(command).expect("the operator starts"), ops_port)
    }

    /// Creates `namespace` as [`Stack::namespace`] does (10 instances at most), reading a new
    /// repository holding the web app ([`web_app_repo`], version one), whose Project reads a
    /// Secret `app` holding `GREETING` into every service's environment. Returns the repository
    /// and its head commit.
    pub async fn web_app_namespace(&self, namespace: &str, greeting: &str) -> (PathBuf, String) {
        let repo = self.dir.path().join("repos").join(namespace);
        let sha = web_app_repo(&repo, "version one");
        self.namespace(namespace, &repo, 10).await;
        let client = self.client().await;
        let secret = Secret {
            metadata: ObjectMeta { name: Some("app".into()), ..Default::default() },
            string_data: Some(BTreeMap::from([("GREETING".to_owned(), greeting.to_owned())])),
            ..Default::default()
        };
        Api::<Secret>::namespaced(client.clone(), namespace).create(&PostParams::default(), &secret).await.unwrap();
        let patch = serde_json::json!({"spec": {"secretRefs": [{"name": "app", "type": "env"}]}});
        Api::<Project>::namespaced(client, namespace)
            .patch("shop", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        (repo, sha)
    }

    /// Creates `namespace` with a local CloudProvider (podman, `max_instances`), a GitHub
    /// credentials Secret and a Project `shop` reading the repository at `repo`.
    pub async fn namespace(&self, namespace: &str, repo: &Path, max_instances: i32) {
        let client = self.client().await;
        let pp = PostParams::default();
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone()).create(&pp, &ns).await.unwrap();
        let provider: CloudProvider = serde_json::from_value(serde_json::json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider",
            "metadata": {"name": "local", "namespace": namespace},
            "spec": {"type": "local", "local": {"engine": "podman"}, "maxInstances": max_instances},
        }))
        .unwrap();
        Api::<CloudProvider>::namespaced(client.clone(), namespace).create(&pp, &provider).await.unwrap();
        let secret = Secret {
            metadata: ObjectMeta { name: Some("github".into()), ..Default::default() },
            string_data: Some(BTreeMap::from([
                ("token".to_owned(), "ghp_not_used_by_the_git_source".to_owned()),
                ("webhookSecret".to_owned(), "whsec_test".to_owned()),
            ])),
            ..Default::default()
        };
        Api::<Secret>::namespaced(client.clone(), namespace).create(&pp, &secret).await.unwrap();
        let project: Project = serde_json::from_value(serde_json::json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "Project",
            "metadata": {"name": "shop", "namespace": namespace},
            "spec": {
                "repository": "acme/shop",
                "cloneUrl": format!("file://{}", repo.display()),
                "cloudProviderRef": {"name": "local"},
                "previewDomain": "preview.example.com",
                "github": {"credentialsSecretRef": {"name": "github"}},
            },
        }))
        .unwrap();
        Api::<Project>::namespaced(client, namespace).create(&pp, &project).await.unwrap();
    }
}

/// The agent binary, built once per test process (an operator restarted many times would build
/// it, or at least ask cargo, at each start).
fn built_agent() -> &'static Path {
    static AGENT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    AGENT.get_or_init(agent_bin)
}

/// The operator process; SIGKILLed when dropped or [`Operator::kill`]ed.
pub struct Operator {
    child: Child,
    ops_port: u16,
    /// Where its agent gateway listens (while it leads).
    pub gateway_port: u16,
}

impl Operator {
    /// Its operations port (`/healthz`, `/readyz`, `/metrics`).
    pub fn ops_port(&self) -> u16 {
        self.ops_port
    }

    /// Its `/readyz`: status and body, if it answered.
    pub fn readyz(&self) -> Option<(u16, String)> {
        crate::agent_support::http_get(self.ops_port, "/readyz")
    }

    /// SIGKILL, as a crashed node or an OOM kill would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes stops a pod; waits for the process to exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -TERM failed");
        self.child.wait().unwrap()
    }

    /// The value of the operator's metric sample `sample` (name and labels, as exposed), if
    /// it shows.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.ops_port);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An Environment `name` for pull request `pr` of Project `shop` at `sha`.
pub fn environment(name: &str, pr: i64, sha: &str) -> Environment {
    Environment::new(
        name,
        EnvironmentSpec {
            project_ref: LocalObjectRef::new("shop"),
            pull_request: PullRequest {
                number: pr,
                head_sha: sha.into(),
                head_ref: format!("feature-{pr}"),
                base_ref: "main".into(),
                author: Some("octocat".into()),
                url: None,
            },
            overrides: None,
        },
    )
}

/// Points the Environment `name` at `sha`, as the webhook receiver does on `synchronize`.
pub async fn set_head(api: &Api<Environment>, name: &str, sha: &str) {
    let patch = serde_json::json!({"spec": {"pullRequest": {"headSha": sha}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

/// The arm64 busybox `scripts/install-deps.sh` unpacks into the cache.
pub fn arm64_busybox() -> PathBuf {
    let cache = std::env::var_os("STAGELY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/stagely"));
    let path = cache.join("busybox-arm64/bin/busybox");
    assert!(path.exists(), "{} is missing: run scripts/install-deps.sh (make deps)", path.display());
    path
}

/// A repository with a web app built for amd64 and arm64 (`FROM scratch` around the platform's
/// busybox, chosen by `TARGETARCH`; no `RUN`, so arm64 needs no emulation) and an api built for
/// amd64, plus `stagely.yaml`. Returns the commit.
pub fn multi_arch_repo(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join("web/www")).unwrap();
    std::fs::create_dir_all(dir.join("api")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("web/busybox-amd64")).unwrap();
    std::fs::copy(arm64_busybox(), dir.join("web/busybox-arm64")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("api/busybox")).unwrap();
    std::fs::write(dir.join("web/www/index.html"), "hello from stagely\n").unwrap();
    std::fs::write(
        dir.join("web/Dockerfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY busybox-${TARGETARCH} /bin/busybox\nCOPY www /www\nENTRYPOINT [\"/bin/busybox\"]\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("api/Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\nCMD [\"httpd\", \"-f\", \"-p\", \"9090\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("stagely.yaml"),
        "version: 2\nbuilds:\n  web:\n    context: web\n    platforms: [linux/amd64, linux/arm64]\n  api:\n    context: api\n    platform: linux/amd64\n",
    )
    .unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    commit(dir, "app")
}

/// A repository with one amd64 build whose Dockerfile is `dockerfile` (the context holds
/// busybox). Returns the commit.
pub fn single_repo(dir: &Path, dockerfile: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(dir.join("stagely.yaml"), "version: 2\nbuilds:\n  web:\n    platform: linux/amd64\n").unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    commit(dir, "app")
}

/// Commits everything in `dir`; returns the commit.
pub fn commit(dir: &Path, message: &str) -> String {
    git(dir, &["add", "-A"]);
    git(dir, &["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "--allow-empty", "-m", message]);
    git(dir, &["rev-parse", "HEAD"]).trim().to_owned()
}

/// A Dockerfile that builds (slowly, so a test can act mid-build) a tiny amd64 image.
pub fn slow_dockerfile(seconds: u32) -> String {
    format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sleep\", \"{seconds}\"]\nENTRYPOINT [\"/bin/busybox\"]\nCMD [\"true\"]\n"
    )
}

/// One builder "VM" of the local provider as seen on disk.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seen {
    /// The instance (directory) name.
    pub instance: String,
    /// Its owner's UID tag.
    pub owner: String,
    /// `builder` or `preview`.
    pub role: String,
    /// The agent's process id.
    pub pid: u32,
}

/// Watches a namespace's local instances from a background thread, recording every agent
/// process ever started and the most running at once (observation only: nothing waits on it).
pub struct InstanceWatch {
    seen: Arc<Mutex<(BTreeSet<Seen>, usize)>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl InstanceWatch {
    /// Starts watching `dir` (a namespace's local state directory).
    pub fn start(dir: PathBuf) -> Self {
        let seen = Arc::new(Mutex::new((BTreeSet::new(), 0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let now = instances(&dir);
                let running = now.iter().filter(|i| stagely_testenv::process_running(i.pid)).count();
                let mut guard = s.lock().unwrap();
                guard.0.extend(now);
                guard.1 = guard.1.max(running);
                drop(guard);
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        Self { seen, stop }
    }

    /// Every agent process seen.
    pub fn seen(&self) -> BTreeSet<Seen> {
        self.seen.lock().unwrap().0.clone()
    }

    /// The most agents seen running at once.
    pub fn max_running(&self) -> usize {
        self.seen.lock().unwrap().1
    }
}

impl Drop for InstanceWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The local instances under `dir` (any CloudProvider), from their `instance.json`.
pub fn instances(dir: &Path) -> Vec<Seen> {
    let mut found = Vec::new();
    let Ok(providers) = std::fs::read_dir(dir) else { return found };
    for provider in providers.flatten() {
        let Ok(entries) = std::fs::read_dir(provider.path()) else { continue };
        for entry in entries.flatten() {
            let Ok(bytes) = std::fs::read(entry.path().join("instance.json")) else { continue };
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            found.push(Seen {
                instance: entry.file_name().to_string_lossy().into_owned(),
                owner: record["tags"][stagely_api::keys::cloud_tags::OWNER_UID].as_str().unwrap_or_default().to_owned(),
                role: record["tags"][stagely_api::keys::cloud_tags::ROLE].as_str().unwrap_or_default().to_owned(),
                pid: record["pid"].as_u64().unwrap_or_default() as u32,
            });
        }
    }
    found
}

/// The builder instances under `dir`.
pub fn builders(dir: &Path) -> Vec<Seen> {
    instances(dir).into_iter().filter(|i| i.role == "builder").collect()
}

/// Fails unless no builder is left in `dir`: no builder instance directory, no builder agent
/// process alive among `seen`.
pub fn assert_no_builder_left(dir: &Path, seen: &BTreeSet<Seen>) {
    let left = builders(dir);
    assert!(left.is_empty(), "builder state left behind: {left:?}");
    let alive: Vec<_> =
        seen.iter().filter(|s| s.role == "builder" && stagely_testenv::process_running(s.pid)).collect();
    assert!(alive.is_empty(), "builder agents left running: {alive:?}");
}

/// Fails unless nothing is left in `dir`: no instance directory of any kind, no agent process
/// alive among `seen`.
pub fn assert_nothing_left(dir: &Path, seen: &BTreeSet<Seen>) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .map(|providers| {
            providers
                .flatten()
                .flat_map(|p| {
                    std::fs::read_dir(p.path())
                        .map(|e| e.flatten().map(|e| e.path()).collect::<Vec<_>>())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "instance state left behind: {left:?}");
    let alive: Vec<_> = seen.iter().filter(|s| stagely_testenv::process_running(s.pid)).collect();
    assert!(alive.is_empty(), "agent processes left running: {alive:?}");
}

/// The BuildJobs of Environment `name`.
pub async fn jobs_of(api: &Api<BuildJob>, name: &str) -> Vec<BuildJob> {
    let params = kube::api::ListParams::default().labels(&format!("{}={name}", stagely_api::keys::ENVIRONMENT));
    api.list(&params).await.unwrap().items
}

/// The edge proxy on a loopback port for `domain`, reading routes from the stack's Redis; it
/// dies with the test process.
pub struct EdgeProxy {
    child: Child,
    /// Its plain-HTTP port.
    pub port: u16,
    /// Its operations port (`/healthz`, `/readyz`, `/metrics`).
    pub ops_port: u16,
}

impl Drop for EdgeProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Stack {
    /// Starts the edge proxy for `domain`.
    pub fn edge_proxy(&self, domain: &str) -> EdgeProxy {
        let bin = workspace_bin("stagely-edge-proxy");
        let (port, ops_port) = (free_port(), free_port());
        let log = std::fs::File::create(self.dir.path().join("edge-proxy.log")).unwrap();
        let mut command = Command::new(bin);
        command
            .args(["--domain", domain, "--redis-url", &self.redis.url()])
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--ops-addr")
            .arg(format!("127.0.0.1:{ops_port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = stagely_testenv::spawn_tied(command).expect("the edge proxy starts");
        crate::agent_support::wait_for("the edge proxy to listen", STEP_TIMEOUT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        EdgeProxy { child, port, ops_port }
    }
}

/// The binary of the workspace's package `package` (named as it is), built now if it is not
/// up to date: a binary of another package than the operator, which its tests cannot name.
fn workspace_bin(package: &str) -> PathBuf {
    let status = Command::new(env!("CARGO")).args(["build", "-q", "-p", package]).status().unwrap();
    assert!(status.success(), "building {package} failed");
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(package)
}

/// The webhook receiver on loopback ports; it dies with the test process.
pub struct WebhookReceiver {
    child: Child,
    /// Where it takes webhooks (`POST /v1/webhooks/github`).
    pub port: u16,
    /// Its operations port (`/healthz`, `/readyz`, `/metrics`).
    pub ops_port: u16,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Stack {
    /// The webhook receiver's log.
    pub fn webhook_receiver_log(&self) -> PathBuf {
        self.dir.path().join("webhook-receiver.log")
    }

    /// Starts the webhook receiver against this stack's control plane and waits until it is
    /// ready (its caches listed).
    pub fn webhook_receiver(&self) -> WebhookReceiver {
        self.webhook_receiver_as(self.plane.kubeconfig())
    }

    /// [`Stack::webhook_receiver`] with the credentials of `kubeconfig` (e.g. a ServiceAccount's
    /// token) instead of the control plane's administrator's.
    pub fn webhook_receiver_as(&self, kubeconfig: &Path) -> WebhookReceiver {
        self.webhook_receiver_with(kubeconfig, &[])
    }

    /// [`Stack::webhook_receiver_as`] with the further arguments `args`.
    pub fn webhook_receiver_with(&self, kubeconfig: &Path, args: &[&str]) -> WebhookReceiver {
        let bin = workspace_bin("stagely-webhook-receiver");
        let (port, ops_port) = (free_port(), free_port());
        let log = std::fs::File::create(self.webhook_receiver_log()).unwrap();
        let mut command = Command::new(bin);
        command
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,stagely_webhook_receiver=debug")
            .arg("--listen-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--ops-addr")
            .arg(format!("127.0.0.1:{ops_port}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = stagely_testenv::spawn_tied(command).expect("the webhook receiver starts");
        crate::agent_support::wait_for("the webhook receiver to be ready", STEP_TIMEOUT, || {
            crate::agent_support::http_get(ops_port, "/readyz").filter(|(code, _)| *code == 200)
        });
        WebhookReceiver { child, port, ops_port }
    }
}

impl WebhookReceiver {
    /// Posts `body` as GitHub delivers an `event` webhook, signed with `secret`: the answer's
    /// status and body.
    pub fn deliver(&self, event: &str, delivery: &str, secret: &[u8], body: &[u8]) -> Option<(u16, String)> {
        use hmac::{Hmac, KeyInit, Mac};
        use std::io::{Read, Write};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
        mac.update(body);
        let signature: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            stream,
            "POST /v1/webhooks/github HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             X-GitHub-Event: {event}\r\nX-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: sha256={signature}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .ok()?;
        stream.write_all(body).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, response.split_once("\r\n\r\n")?.1.to_owned()))
    }
}

/// Keeps every file an instance of the local provider has at its top level (`agent.json`, the
/// agent configuration from its cloud-init user data; `agent.log`; `instance.json`) after the
/// instance is gone: a background thread hard-links each into `into` as soon as it appears, so
/// the link sees everything written to the file later, and keeps it when the instance's
/// directory is removed. Observation only: nothing waits on it.
pub struct InstanceFiles {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl InstanceFiles {
    /// Starts keeping the files of the instances under `dir` (a namespace's local state
    /// directory) in `into`, as `<instance>.<file>`.
    pub fn start(dir: PathBuf, into: PathBuf) -> Self {
        std::fs::create_dir_all(&into).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let providers = std::fs::read_dir(&dir).into_iter().flatten().flatten();
                for instance in providers.flat_map(|p| std::fs::read_dir(p.path()).into_iter().flatten().flatten()) {
                    for file in std::fs::read_dir(instance.path()).into_iter().flatten().flatten() {
                        if !file.file_type().is_ok_and(|t| t.is_file()) {
                            continue;
                        }
                        let name = format!(
                            "{}.{}",
                            instance.file_name().to_string_lossy(),
                            file.file_name().to_string_lossy()
                        );
                        let link = into.join(name);
                        if !link.exists() {
                            let _ = std::fs::hard_link(file.path(), link);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { stop }
    }
}

impl Drop for InstanceFiles {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl EdgeProxy {
    /// `GET path` for `host` through the proxy: status, headers (lowercase names) and body.
    pub fn get(&self, host: &str, path: &str) -> Option<(u16, String, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        Some((status, head.to_lowercase(), body.to_owned()))
    }
}

/// A web app repository: a `FROM scratch` busybox httpd serving `version` at `/` and, through a
/// CGI script, the `X-Stagely-*` headers it received and the `GREETING` environment variable at
/// `/cgi-bin/env`; a compose file publishing container port 8080 on an ephemeral host port; a
/// stagely.yaml. Returns the commit.
pub fn web_app_repo(dir: &Path, version: &str) -> String {
    std::fs::create_dir_all(dir.join("www/cgi-bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(dir.join("www/index.html"), format!("{version}\n")).unwrap();
    let script = dir.join("www/cgi-bin/env");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"project=$HTTP_X_STAGELY_PROJECT pr=$HTTP_X_STAGELY_PR greeting=$GREETING\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCOPY www /www\nENTRYPOINT [\"/bin/busybox\"]\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("docker-compose.yml"), "services:\n  web:\n    build: .\n    ports:\n      - \"8080\"\n")
        .unwrap();
    std::fs::write(dir.join("stagely.yaml"), "version: 2\nbuilds:\n  web:\n    platform: linux/amd64\n").unwrap();
    if !dir.join(".git").exists() {
        git(dir, &["init", "-q", "-b", "main"]);
    }
    commit(dir, version)
}

/// The notes of the Events with `reason` about object `name` in `namespace`.
pub async fn events(client: &Client, namespace: &str, name: &str, reason: &str) -> Vec<String> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&Default::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}

/// GET on the registry's API with a pull token for `repository`.
pub async fn registry_get(stack: &Stack, repository: &str, path: &str, accept: &str) -> reqwest::Response {
    use stagely_operator::registry::token::{Access, SigningKey, TokenIssuer};
    let key = SigningKey::from_pem(&std::fs::read(&stack.key_file).unwrap(), &std::fs::read(&stack.cert_file).unwrap())
        .unwrap();
    let issuer = TokenIssuer::new(key, ISSUER, SERVICE);
    let expires = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 300;
    let token = issuer.token("test", vec![Access::repository(repository, &["pull"])], expires).unwrap();
    reqwest::Client::new()
        .get(format!("http://{}/v2/{repository}/{path}", stack.registry.addr()))
        .header("Accept", accept)
        .bearer_auth(token.token.expose())
        .send()
        .await
        .unwrap()
}

/// The HTTP status of the manifest `tag` of `repository` in the registry.
pub async fn registry_status(stack: &Stack, repository: &str, tag: &str) -> u16 {
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.oci.image.index.v1+json";
    registry_get(stack, repository, &format!("manifests/{tag}"), accept).await.status().as_u16()
}

/// The route record of `hash` in Redis, as JSON.
pub async fn route(stack: &Stack, hash: &str) -> Option<serde_json::Value> {
    let client = redis::Client::open(stack.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let value: Option<String> = redis::cmd("GET").arg(format!("route:{hash}")).query_async(&mut conn).await.unwrap();
    value.map(|v| serde_json::from_str(&v).unwrap())
}

/// The condition `type_` of `env`: (status, reason, message).
pub fn condition(env: &Environment, type_: &str) -> Option<(String, String, String)> {
    let conditions = &env.status.as_ref()?.conditions;
    stagely_api::v1alpha1::find_condition(conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The phase of `env`.
pub fn phase(env: &Environment) -> Option<stagely_api::v1alpha1::EnvironmentPhase> {
    env.status.as_ref()?.phase
}

/// Waits until Environment `name` satisfies `check`; panics with `what` after `timeout`.
pub async fn wait_env(
    api: &Api<Environment>,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Environment) -> bool,
) -> Environment {
    stagely_testenv::server::eventually(what, timeout, || async {
        let env = api.get(name).await.ok()?;
        check(&env).then_some(env)
    })
    .await
}

/// A local VM `name` (idempotency key `key`) tagged as owned by `owner` in `namespace` with
/// `role`, whose agent never reaches a gateway: nobody listens on port 9, so it keeps trying,
/// which is all a test of the provider or of the sweep needs.
pub fn unreachable_vm(name: &str, key: &str, owner: &str, namespace: &str, role: Role) -> InstanceSpec {
    let bootstrap = AgentBootstrap::new(
        "ws://127.0.0.1:9/v1/agent/connect",
        name,
        "enrollment-token",
        role,
        "http://unused",
        &"0".repeat(64),
    );
    InstanceSpec {
        name: name.into(),
        size: Size::Small,
        platform: Platform::LinuxAmd64,
        region: "local".into(),
        user_data: cloudinit::render(&bootstrap),
        tags: stagely_tags(owner, namespace, role),
        spot: false,
        idempotency_key: key.into(),
    }
}
