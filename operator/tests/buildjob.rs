//! The BuildJob controller against the real control plane (testenv), the real agent gateway on
//! loopback (Redis for logs), the `local` provider whose builder VMs are real agent processes,
//! podman, and the real registry: builds that succeed, fail, never start, lose their VM, are
//! cancelled or deleted mid-build, wait for capacity, and survive an operator restart.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/logs.rs"]
mod logs;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_support::{Podman, agent_bin, git};
use k8s_openapi::api::core::v1::{Event, Namespace};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use stagely_api::keys;
use stagely_api::v1alpha1::{BuildJob, BuildJobPhase, BuildJobSpec, CloudProvider, Project, find_condition};
use stagely_operator::controllers::buildjob::{self, Context, Timings};
use stagely_operator::controllers::capacity::Capacity;
use stagely_operator::controllers::vm::{self, AgentSettings};
use stagely_operator::gateway::objects::KubeObjects;
use stagely_operator::gateway::token::SigningKey;
use stagely_operator::gateway::{Gateway, RunningGateway};
use stagely_operator::metrics::Metrics;
use stagely_operator::providers::Role;
use stagely_operator::providers::account::Endpoints;
use stagely_operator::registry::Registry;
use stagely_testenv::server::{Server, eventually};
use stagely_testenv::{ControlPlane, Options};
use tokio::net::TcpListener;

/// Builds take a while on a slow, shared machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Everything else the controller does.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

fn plane() -> &'static ControlPlane {
    stagely_testenv::shared(|| Options { crds: stagely_api::crds(), ..Options::default() })
}

fn redis() -> &'static Server {
    static REDIS: OnceLock<Server> = OnceLock::new();
    REDIS.get_or_init(|| Server::redis().expect("redis-server is installed (make deps)"))
}

fn registry() -> &'static stagely_testenv::registry::Registry {
    static REGISTRY: OnceLock<stagely_testenv::registry::Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        stagely_testenv::registry::Registry::start().expect("the registry starts (testenv/build.sh builds it)")
    })
}

/// A Dockerfile step that writes a file (tiny, fast).
const QUICK: &str = r#"RUN ["/bin/busybox", "sh", "-c", "echo built > /built"]"#;
/// A step that outlives every test that uses it.
const ENDLESS: &str = r#"RUN ["/bin/busybox", "sleep", "3600"]"#;

/// One test's world: its namespace with a Project and a local CloudProvider, podman, a git
/// repository, the gateway and the controller.
struct Harness {
    client: Client,
    namespace: String,
    key: SigningKey,
    gateway: Option<RunningGateway>,
    gateway_addr: SocketAddr,
    controller: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    capacity: Arc<Capacity>,
    metrics: Metrics,
    endpoints: Endpoints,
    repo: PathBuf,
    // Dropped after the agents are gone and before the directory is.
    podman: Podman,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new(namespace: &str, max_instances: i32) -> Self {
        logs::capture();
        let client = plane().client().await.expect("client");
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
        let dir = tempfile::tempdir().unwrap();
        let podman = Podman::new(dir.path());
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::copy("/bin/busybox", repo.join("busybox")).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);

        let mut env: BTreeMap<String, String> = podman.env.iter().cloned().collect();
        env.insert("STAGELY_RECONNECT_INITIAL_MS".into(), "50".into());
        env.insert("STAGELY_RECONNECT_MAX_MS".into(), "500".into());
        let endpoints = Endpoints {
            local_agent_bin: agent_bin(),
            local_state_dir: dir.path().join("instances"),
            local_env: env,
            allow_local: true,
            ..Endpoints::default()
        };

        let projects = Api::<Project>::namespaced(client.clone(), namespace);
        let project: Project = serde_json::from_value(serde_json::json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "Project", "metadata": {"name": "shop"},
            "spec": {
                "repository": "acme/shop", "cloneUrl": format!("file://{}", repo.display()),
                "cloudProviderRef": {"name": "local"}, "previewDomain": "preview.example.com",
                "github": {"credentialsSecretRef": {"name": "gh"}},
            },
        }))
        .unwrap();
        projects.create(&PostParams::default(), &project).await.unwrap();
        let providers = Api::<CloudProvider>::namespaced(client.clone(), namespace);
        let provider: CloudProvider = serde_json::from_value(serde_json::json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider", "metadata": {"name": "local"},
            "spec": {"type": "local", "maxInstances": max_instances, "local": {"engine": "podman"}},
        }))
        .unwrap();
        providers.create(&PostParams::default(), &provider).await.unwrap();
        // The CloudProvider controller's verdict, as its own tests establish it.
        let ready = serde_json::json!({"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "CredentialsAccepted",
            "message": "agents run as processes on the operator's host",
            "lastTransitionTime": Timestamp::now().to_string(),
        }]}});
        providers.patch_status("local", &PatchParams::default(), &Patch::Merge(ready)).await.unwrap();

        let key = SigningKey::from_bytes(vec![7u8; 32]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_addr = listener.local_addr().unwrap();
        let gateway = start_gateway(&client, &key, listener).await;
        Self {
            client,
            namespace: namespace.to_owned(),
            key,
            gateway: Some(gateway),
            gateway_addr,
            controller: None,
            capacity: Arc::new(Capacity::new()),
            metrics: Metrics::default(),
            endpoints,
            repo,
            podman,
            _dir: dir,
        }
    }

    fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("the gateway runs").gateway()
    }

    /// Starts the controller with `timings`; agents connect to `gateway_url` (default: this
    /// harness's gateway).
    fn start_controller(&mut self, timings: Timings, gateway_url: Option<String>) {
        let agents = AgentSettings {
            gateway_url: gateway_url.unwrap_or_else(|| self.gateway.as_ref().unwrap().connect_url()),
            agent_url: "http://unused.invalid/stagely-agent".into(),
            agent_sha256: "0".repeat(64),
            served: Default::default(),
            enrollment_ttl: Duration::from_secs(600),
            gateway_ca_file: None,
        };
        let ctx = Context::new(
            self.client.clone(),
            self.gateway().clone(),
            Some(Registry::anonymous(registry().addr())),
            self.endpoints.clone(),
            agents,
            Arc::clone(&self.capacity),
            self.metrics.clone(),
            timings,
        )
        .namespaced(&self.namespace);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(buildjob::run(Arc::new(ctx), async {
            let _ = stopped.await;
        }));
        self.controller = Some((stop, task));
    }

    async fn stop_controller(&mut self) {
        let (stop, task) = self.controller.take().expect("the controller runs");
        let _ = stop.send(());
        tokio::time::timeout(STEP_TIMEOUT, task).await.expect("the controller stops").unwrap();
    }

    /// Commits a Dockerfile of `steps` after `FROM scratch` and busybox; returns the commit.
    fn commit(&self, steps: &str) -> String {
        std::fs::write(self.repo.join("Dockerfile"), format!("FROM scratch\nCOPY busybox /bin/busybox\n{steps}\n"))
            .unwrap();
        git(&self.repo, &["add", "."]);
        git(
            &self.repo,
            &["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "--allow-empty", "-m", steps],
        );
        git(&self.repo, &["rev-parse", "HEAD"]).trim().to_owned()
    }

    fn jobs(&self) -> Api<BuildJob> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The repository BuildJob `name` pushes to.
    fn repository(&self, name: &str) -> String {
        format!("{}/{}/shop/{name}", registry().addr(), self.namespace)
    }

    /// Creates BuildJob `name` building `commit` of the Project's repository, with `cache` as
    /// its layer cache.
    async fn create_job(&self, name: &str, commit: &str, cache: Option<&str>) -> BuildJob {
        let repository = self.repository(name);
        let spec: BuildJobSpec = serde_json::from_value(serde_json::json!({
            "service": name, "platform": "linux/amd64", "repository": "acme/shop", "commit": commit,
            "timeout": "20m", "image": repository, "cacheFrom": cache.iter().collect::<Vec<_>>(), "cacheTo": cache,
        }))
        .unwrap();
        let mut job = BuildJob::new(name, spec);
        job.metadata.labels = Some(BTreeMap::from([(keys::PROJECT.to_owned(), "shop".to_owned())]));
        self.jobs().create(&PostParams::default(), &job).await.unwrap()
    }

    /// Waits until `name` is in `phase`, and returns it.
    async fn wait_phase(&self, name: &str, phase: BuildJobPhase, timeout: Duration) -> BuildJob {
        let jobs = self.jobs();
        eventually(&format!("BuildJob {name} to be {phase:?}"), timeout, || {
            let jobs = jobs.clone();
            async move {
                let job = jobs.get(name).await.ok()?;
                let now = job.status.as_ref().and_then(|s| s.phase);
                if now.is_some_and(|p| p.is_finished()) && now != Some(phase) {
                    panic!("BuildJob {name} ended {now:?} instead of {phase:?}: {:#?}", job.status);
                }
                (now == Some(phase)).then_some(job)
            }
        })
        .await
    }

    /// Where the local provider keeps this namespace's instances.
    fn state_dir(&self) -> PathBuf {
        self.endpoints.local_state_dir.join(&self.namespace).join("local")
    }

    /// The instance directories there.
    fn instances(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.state_dir()) else { return Vec::new() };
        entries.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect()
    }

    /// The builder agent of `job` once it runs: its pid and its enrollment token.
    async fn builder(&self, job: &BuildJob) -> (u32, String) {
        let name =
            vm::instance_name(Role::Builder, &job.metadata.name.clone().unwrap(), job.metadata.uid.as_deref().unwrap());
        let dir = self.state_dir().join(&name);
        eventually(&format!("builder {name} to run"), STEP_TIMEOUT, || {
            let dir = dir.clone();
            async move {
                let record: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(dir.join("instance.json")).ok()?).ok()?;
                let config: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(dir.join("agent.json")).ok()?).ok()?;
                Some((record["pid"].as_u64()? as u32, config["token"].as_str()?.to_owned()))
            }
        })
        .await
    }

    async fn events(&self) -> Vec<(String, String)> {
        let list =
            Api::<Event>::namespaced(self.client.clone(), &self.namespace).list(&ListParams::default()).await.unwrap();
        list.items.into_iter().map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default())).collect()
    }

    /// Waits for an Event with `reason` whose message contains `text`.
    async fn wait_event(&self, reason: &str, text: &str) {
        eventually(&format!("a {reason} event saying {text:?}"), STEP_TIMEOUT, || async {
            self.events().await.iter().any(|(r, m)| r == reason && m.contains(text)).then_some(())
        })
        .await
    }

    /// Waits until no builder of this namespace is left: no instance directory, no process.
    async fn wait_no_builder(&self, pids: &[u32]) {
        eventually("every builder VM to be gone", STEP_TIMEOUT, || async {
            (self.instances().is_empty() && pids.iter().all(|pid| !alive(*pid))).then_some(())
        })
        .await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A failed test may leave builders running: stop them before their storage goes.
        for name in self.instances() {
            let record = std::fs::read(self.state_dir().join(name).join("instance.json")).unwrap_or_default();
            if let Some(pid) = serde_json::from_slice::<serde_json::Value>(&record).ok().and_then(|r| r["pid"].as_u64())
            {
                kill_tree(pid as u32);
            }
        }
    }
}

async fn start_gateway(client: &Client, key: &SigningKey, listener: TcpListener) -> RunningGateway {
    Gateway::builder()
        .signing_key(key.clone())
        .objects(KubeObjects::new(client.clone()))
        .redis(redis().url())
        .serve(listener)
        .await
        .expect("the gateway starts")
}

/// Whether `pid` runs (a zombie waiting to be reaped does not).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    state.is_some_and(|s| s != "Z" && s != "X")
}

/// `pid` and everything it started, as when a VM dies: stopped first so nothing new is spawned,
/// then killed.
fn kill_tree(pid: u32) {
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().filter_map(Result::ok) {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(parent) && !tree.contains(&child) {
                tree.push(child);
            }
        }
        i += 1;
    }
    let pids: Vec<String> = tree.iter().map(u32::to_string).collect();
    for signal in ["-STOP", "-KILL"] {
        let _ = std::process::Command::new("kill").arg(signal).args(&pids).output();
    }
}

fn condition(job: &BuildJob, type_: &str) -> (String, String) {
    let status = job.status.as_ref().expect("status");
    let c = find_condition(&status.conditions, type_).unwrap_or_else(|| panic!("no {type_}: {status:#?}"));
    (c.status.clone(), c.reason.clone())
}

fn quick_timings() -> Timings {
    Timings { agent_connect: Duration::from_secs(180), vm_check: Duration::from_secs(2), log_tail_lines: 20 }
}

fn vm_id(job: &BuildJob) -> String {
    job.status.as_ref().and_then(|s| s.vm.as_ref()).and_then(|vm| vm.provider_id.clone()).expect("a VM is recorded")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_succeeds_pushes_its_image_and_its_builder_goes() {
    let mut h = Harness::new("bj-success", 2).await;
    h.start_controller(quick_timings(), None);
    let commit = h.commit(QUICK);
    let created = h.create_job("web", &commit, Some(&format!("{}:cache-amd64", h.repository("web")))).await;
    let (pid, token) = h.builder(&created).await;

    let job = h.wait_phase("web", BuildJobPhase::Succeeded, BUILD_TIMEOUT).await;
    let status = job.status.clone().unwrap();
    let digest = status.image_digest.clone().expect("the digest is recorded");
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(status.exit_code, Some(0));
    assert!(status.started_at.is_some() && status.finished_at.is_some(), "{status:#?}");
    assert_eq!(condition(&job, "Built"), ("True".into(), "Built".into()));
    assert_eq!(condition(&job, "AgentConnected"), ("True".into(), "Connected".into()));
    assert_eq!(condition(&job, "VMReady"), ("False".into(), "Terminated".into()));
    let vm = status.vm.as_ref().unwrap();
    assert_eq!(vm.state.as_deref(), Some("terminated"));
    assert_eq!(
        vm.provider_id.as_deref(),
        Some(vm::instance_name(Role::Builder, "web", created.metadata.uid.as_deref().unwrap()).as_str())
    );
    assert_eq!(status.observed_generation, job.metadata.generation);
    let image = format!("{}/bj-success/shop/web:{commit}-amd64", registry().addr());
    assert_eq!(status.message.as_deref(), Some(format!("built and pushed {image}@{digest}").as_str()));

    // The registry holds the tag and the digest.
    let repository = "/v2/bj-success/shop/web";
    assert_eq!(registry().get_status(&format!("{repository}/manifests/{commit}-amd64")), Some(200));
    assert_eq!(registry().get_status(&format!("{repository}/manifests/{digest}")), Some(200));

    // The builder is gone at once: its agent process and its directory.
    h.wait_no_builder(&[pid]).await;
    for (reason, text) in [
        ("VMCreated", "created builder VM"),
        ("AgentConnected", "connected"),
        ("Built", "built and pushed"),
        ("VMTerminated", "terminated builder VM"),
    ] {
        h.wait_event(reason, text).await;
    }
    // The build's duration was observed once, as succeeded.
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("build_duration_seconds", "build", h.metrics.build_duration.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains(r#"build_duration_seconds_count{platform="linux/amd64",result="succeeded"} 1"#), "{text}");
    // The VM's enrollment token went only into its user data.
    let seen = format!("{:?}\n{:?}\n{}", job.status, h.events().await, logs::text());
    assert!(!seen.contains(&token), "the enrollment token leaked into the status, an event or a log");

    // Settled (finished, its VM gone): marked so, out of the controller's watch, its finalizer
    // removed; deleted at once even with no controller running.
    let jobs = h.jobs();
    eventually("the settled job to be marked and its finalizer removed", STEP_TIMEOUT, || {
        let jobs = jobs.clone();
        async move {
            let job = jobs.get("web").await.ok()?;
            let marked = job.metadata.labels.as_ref()?.get(keys::SETTLED).map(String::as_str) == Some("true");
            (marked && job.metadata.finalizers.as_ref().is_none_or(|f| f.is_empty())).then_some(())
        }
    })
    .await;
    h.stop_controller().await;
    jobs.delete("web", &DeleteParams::default()).await.unwrap();
    assert!(jobs.get_opt("web").await.unwrap().is_none(), "a settled BuildJob waits for no finalizer");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_build_reports_its_exit_code_and_log_tail() {
    let mut h = Harness::new("bj-fail", 2).await;
    h.start_controller(quick_timings(), None);
    let commit = h.commit(r#"RUN ["/bin/busybox", "sh", "-c", "echo boom-marker-$((6*7)); exit 3"]"#);
    let created = h.create_job("web", &commit, None).await;
    let (pid, _) = h.builder(&created).await;

    let job = h.wait_phase("web", BuildJobPhase::Failed, BUILD_TIMEOUT).await;
    let status = job.status.clone().unwrap();
    assert_eq!(status.exit_code, Some(3), "{status:#?}");
    let message = status.message.unwrap_or_default();
    assert!(message.starts_with("the build failed: failed to build the image"), "{message}");
    assert!(message.contains("last log lines:") && message.contains("boom-marker-42"), "{message}");
    assert_eq!(condition(&job, "Built"), ("False".into(), "BuildFailed".into()));
    h.wait_no_builder(&[pid]).await;
    h.wait_event("BuildFailed", "boom-marker-42").await;
    h.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_never_connects_fails_the_build() {
    let mut h = Harness::new("bj-noconnect", 2).await;
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let timings = Timings { agent_connect: Duration::from_secs(5), ..quick_timings() };
    h.start_controller(timings, Some(format!("ws://{closed}/v1/agent/connect")));
    let commit = h.commit(QUICK);
    let created = h.create_job("web", &commit, None).await;
    let (pid, _) = h.builder(&created).await;

    let job = h.wait_phase("web", BuildJobPhase::Failed, STEP_TIMEOUT).await;
    let id = vm_id(&job);
    assert_eq!(
        job.status.as_ref().unwrap().message.as_deref(),
        Some(format!("the agent on builder VM {id} did not connect within 5s").as_str())
    );
    assert_eq!(condition(&job, "AgentConnected"), ("False".into(), "ConnectTimeout".into()));
    assert_eq!(condition(&job, "Built"), ("False".into(), "AgentNotConnected".into()));
    h.wait_no_builder(&[pid]).await;
    h.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_killed_mid_build_fails_the_build() {
    let mut h = Harness::new("bj-killed", 2).await;
    h.start_controller(quick_timings(), None);
    let commit = h.commit(ENDLESS);
    let created = h.create_job("web", &commit, None).await;
    let (pid, _) = h.builder(&created).await;
    h.wait_phase("web", BuildJobPhase::Building, STEP_TIMEOUT).await;

    kill_tree(pid);
    let job = h.wait_phase("web", BuildJobPhase::Failed, STEP_TIMEOUT).await;
    let id = vm_id(&job);
    assert_eq!(
        job.status.as_ref().unwrap().message.as_deref(),
        Some(format!("builder VM {id} stopped unexpectedly (state terminated)").as_str())
    );
    assert_eq!(condition(&job, "Built"), ("False".into(), "VMStopped".into()));
    // What is left of the dead VM is cleaned up too.
    h.wait_no_builder(&[pid]).await;
    h.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cancel_annotation_stops_a_build() {
    let mut h = Harness::new("bj-cancel", 2).await;
    h.start_controller(quick_timings(), None);
    let commit = h.commit(ENDLESS);
    let created = h.create_job("web", &commit, None).await;
    let (pid, _) = h.builder(&created).await;
    h.wait_phase("web", BuildJobPhase::Building, STEP_TIMEOUT).await;

    let reason = "cancelled: build api (linux/arm64) failed";
    let patch = serde_json::json!({"metadata": {"annotations": {keys::CANCEL: reason}}});
    h.jobs().patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let job = h.wait_phase("web", BuildJobPhase::Failed, STEP_TIMEOUT).await;
    assert_eq!(job.status.as_ref().unwrap().message.as_deref(), Some(reason));
    assert_eq!(condition(&job, "Built"), ("False".into(), "Cancelled".into()));
    assert!(job.status.as_ref().unwrap().finished_at.is_some());
    h.wait_no_builder(&[pid]).await;
    h.wait_event("Cancelled", reason).await;
    h.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_deleted_mid_build_leaves_no_builder() {
    let mut h = Harness::new("bj-delete", 2).await;
    h.start_controller(quick_timings(), None);
    let commit = h.commit(ENDLESS);
    let created = h.create_job("web", &commit, None).await;
    let (pid, _) = h.builder(&created).await;
    h.wait_phase("web", BuildJobPhase::Building, STEP_TIMEOUT).await;

    h.jobs().delete("web", &DeleteParams::default()).await.unwrap();
    let jobs = h.jobs();
    eventually("the BuildJob to go", STEP_TIMEOUT, || {
        let jobs = jobs.clone();
        async move { jobs.get_opt("web").await.ok()?.is_none().then_some(()) }
    })
    .await;
    // Gone at once: the finalizer waited for the termination.
    assert!(h.instances().is_empty(), "{:?}", h.instances());
    h.wait_no_builder(&[pid]).await;
    h.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_wait_for_a_free_instance_first_come_first_served() {
    let mut h = Harness::new("bj-capacity", 1).await;
    h.start_controller(quick_timings(), None);
    let slow = h.commit(r#"RUN ["/bin/busybox", "sleep", "10"]"#);
    let first = h.create_job("first", &slow, None).await;
    h.builder(&first).await;
    let second = h.create_job("second", &slow, None).await;

    let jobs = h.jobs();
    eventually("the second build to wait for an instance", STEP_TIMEOUT, || {
        let jobs = jobs.clone();
        async move {
            let (first, second) = (jobs.get("first").await.ok()?, jobs.get("second").await.ok()?);
            let waiting = second.status.as_ref()?.message.as_deref() == Some("waiting for an instance: 1 of 1 in use");
            let first_running = first.status.as_ref()?.phase.is_some_and(|p| !p.is_finished());
            (waiting && first_running).then_some(())
        }
    })
    .await;
    let job = jobs.get("second").await.unwrap();
    assert_eq!(job.status.as_ref().unwrap().phase, Some(BuildJobPhase::Queued));
    assert_eq!(condition(&job, "VMReady"), ("False".into(), "WaitingForInstance".into()));
    assert_eq!(h.instances().len(), 1, "only the first build has a VM");

    let first_done = h.wait_phase("first", BuildJobPhase::Succeeded, BUILD_TIMEOUT).await;
    let second_done = h.wait_phase("second", BuildJobPhase::Succeeded, BUILD_TIMEOUT).await;
    let first_finished = first_done.status.as_ref().unwrap().finished_at.clone().unwrap().0;
    let second_started = second_done.status.as_ref().unwrap().started_at.clone().unwrap().0;
    assert!(second_started >= first_finished, "the second VM started only after the first was gone");
    assert_ne!(vm_id(&first_done), vm_id(&second_done), "each build had its own VM");
    assert_eq!(second.metadata.name.as_deref(), Some("second"));
    h.wait_no_builder(&[]).await;
    h.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_operator_finishes_the_build_on_the_same_builder() {
    let mut h = Harness::new("bj-restart", 2).await;
    h.start_controller(quick_timings(), None);
    let commit = h.commit(r#"RUN ["/bin/busybox", "sleep", "15"]"#);
    let created = h.create_job("web", &commit, None).await;
    let (pid, _) = h.builder(&created).await;
    h.wait_phase("web", BuildJobPhase::Building, STEP_TIMEOUT).await;

    // The operator stops: its controller and its gateway.
    h.stop_controller().await;
    h.gateway.take().unwrap().shutdown().await.unwrap();
    assert!(alive(pid), "the builder outlives the operator");
    // It comes back on the same address, with the same signing key, and a fresh memory.
    let listener = TcpListener::bind(h.gateway_addr).await.unwrap();
    h.gateway = Some(start_gateway(&h.client, &h.key, listener).await);
    h.capacity = Arc::new(Capacity::new());
    h.start_controller(quick_timings(), None);
    // The new controller counts the running builder against maxInstances before granting more.
    let capacity = Arc::clone(&h.capacity);
    eventually("the running builder to hold its slot", STEP_TIMEOUT, || {
        let capacity = Arc::clone(&capacity);
        async move { (capacity.in_use("bj-restart/local") == 1).then_some(()) }
    })
    .await;

    let job = h.wait_phase("web", BuildJobPhase::Succeeded, BUILD_TIMEOUT).await;
    assert_eq!(h.capacity.in_use("bj-restart/local"), 0, "the slot is given back");
    assert!(job.status.as_ref().unwrap().image_digest.as_deref().is_some_and(|d| d.starts_with("sha256:")));
    let name = vm_id(&job);
    assert_eq!(name, vm::instance_name(Role::Builder, "web", created.metadata.uid.as_deref().unwrap()));
    let started = logs::text().lines().filter(|l| l.contains("started local agent") && l.contains(&name)).count();
    assert_eq!(started, 1, "exactly one builder VM was ever started for the job");
    h.wait_no_builder(&[pid]).await;
    h.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_commit_never_ships_a_cached_layer_of_an_older_one() {
    // Buildah reuses a `COPY` layer whose files changed when the image starts `FROM scratch`
    // (containers/buildah#6106); podman builders therefore build without a layer cache.
    let mut h = Harness::new("bj-cache", 2).await;
    h.start_controller(quick_timings(), None);
    let cache = format!("{}:cache-amd64", h.repository("web"));
    let first = h.commit(r#"COPY Dockerfile /version"#);
    h.create_job("one", &first, Some(&cache)).await;
    let one = h.wait_phase("one", BuildJobPhase::Succeeded, BUILD_TIMEOUT).await;
    let second = h.commit(
        r#"COPY Dockerfile /version
LABEL changed=yes"#,
    );
    h.create_job("two", &second, Some(&cache)).await;
    let two = h.wait_phase("two", BuildJobPhase::Succeeded, BUILD_TIMEOUT).await;
    // What the second image holds is the second commit's file.
    let digest = two.status.unwrap().image_digest.unwrap();
    let image = format!("{}@{digest}", h.repository("two"));
    h.podman.run(&["pull", "-q", "--tls-verify=false", &image]);
    let version = h.podman.run(&["run", "--rm", "--entrypoint", "/bin/busybox", &image, "cat", "/version"]);
    assert!(version.contains("LABEL changed=yes"), "the second image ships the first commit's file: {version}");
    let _ = one;
    h.wait_no_builder(&[]).await;
    h.stop_controller().await;
}
