//! The real agent process against the real gateway on loopback: enrollment with a minted token,
//! heartbeats landing, reconnection with the session token after the gateway restarts, a
//! resent command answered without running it twice, an agent killed and started again as
//! systemd would (let back in with the session it kept, renewed while it was connected),
//! BUILD → DEPLOY → HTTP 200 → TEST with podman and the distribution registry, and `wss://`: an
//! agent pinned by its cloud-init to the gateway's generated CA is admitted, one pinned to another
//! CA is not.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_support::{Podman, agent_bin, agent_command, agent_command_with, app_repo, free_port, http_get, wait_for};
use k8s_openapi::jiff::Timestamp;
use stagely_api::protocol::{Build, CAPABILITY_TEST, Deploy, JobState, Message, Scope, ScopeKind, Terminate, TestRun};
use stagely_api::tls::CertStore;
use stagely_api::v1alpha1::Platform;
use stagely_operator::gateway::objects::{BoxFuture, ObjectsError, ScopeObjects};
use stagely_operator::gateway::token::{SigningKey, TokenError};
use stagely_operator::gateway::{Gateway, RunningGateway, Settings};
use stagely_operator::providers::cloudinit::{self, AgentBootstrap};
use stagely_operator::providers::{Role, local};
use stagely_testenv::pki::TestCa;
use stagely_testenv::registry::Registry;
use tokio::net::TcpListener;

/// Records heartbeats instead of writing them to an apiserver (the gateway's own tests cover
/// the Kubernetes write); every scope is current.
#[derive(Clone, Default)]
struct Heartbeats(Arc<Mutex<Vec<Scope>>>);

impl ScopeObjects for Heartbeats {
    fn is_current<'a>(&'a self, _scope: &'a Scope) -> BoxFuture<'a, Result<bool, ObjectsError>> {
        Box::pin(async { Ok(true) })
    }

    fn record_heartbeat<'a>(&'a self, scope: &'a Scope, _at: Timestamp) -> BoxFuture<'a, Result<(), ObjectsError>> {
        self.0.lock().unwrap().push(scope.clone());
        Box::pin(async { Ok(()) })
    }
}

async fn gateway(listener: TcpListener, key: &SigningKey, heartbeats: &Heartbeats) -> RunningGateway {
    gateway_with(listener, key, heartbeats, Settings::default()).await
}

async fn gateway_with(
    listener: TcpListener,
    key: &SigningKey,
    heartbeats: &Heartbeats,
    settings: Settings,
) -> RunningGateway {
    Gateway::builder()
        .signing_key(key.clone())
        .objects(heartbeats.clone())
        .settings(Settings {
            heartbeat_interval_secs: 1,
            heartbeat_write_interval: Duration::from_millis(10),
            ..settings
        })
        .serve(listener)
        .await
        .expect("the gateway starts")
}

fn scope() -> Scope {
    Scope { kind: ScopeKind::Environment, namespace: "team-a".into(), name: "shop-pr-1".into(), uid: "uid-1".into() }
}

/// The agent process, started from the file cloud-init writes; killed when dropped.
struct Agent(Child);

impl Agent {
    fn start(dir: &Path, url: &str, token: &str, env: &[(String, String)]) -> Self {
        let child = agent_command(&agent_bin(), dir, url, token)
            .env("STAGELY_RECONNECT_MAX_MS", "500")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// Started from `config` (the whole of `dir/agent.json`), logging to `dir/agent.log`.
    fn from_config(dir: &Path, config: &str) -> Self {
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = agent_command_with(&agent_bin(), dir, config)
            .env("STAGELY_RECONNECT_MAX_MS", "500")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_connected(gateway: &Gateway, scope: &Scope) {
    wait_until("the agent to connect", || gateway.is_connected(scope)).await;
}

/// Polls `done` until it holds, or panics naming `what` after 30 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after 30 s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends TERMINATE `t-1` to `scope`'s agent and asserts it succeeds within two minutes.
async fn terminate(gateway: &Gateway, scope: &Scope, reason: &str) {
    let terminate =
        Message::Terminate(Terminate { job_id: "t-1".into(), reason: reason.into(), grace_period_seconds: 1 });
    let done = tokio::time::timeout(Duration::from_secs(120), gateway.command(scope, terminate))
        .await
        .expect("TERMINATE finishes")
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
}

/// The session token the agent keeps in `dir` (beside its config file), if any.
fn kept_session(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("session.json")).ok()?;
    let stored: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(stored["session_token"].as_str()?.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_and_restarted_is_let_back_in_with_the_session_it_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let heartbeats = Heartbeats::default();
    let running =
        gateway(TcpListener::bind("127.0.0.1:0").await.unwrap(), &SigningKey::generate().unwrap(), &heartbeats).await;
    let scope = scope();
    let token = running.gateway().mint_enrollment_token(&scope, "agent-1", Duration::from_secs(600)).unwrap();
    let agent = Agent::start(dir.path(), &running.connect_url(), token.expose(), &[]);
    wait_connected(running.gateway(), &scope).await;
    wait_until("the session credential to be kept", || kept_session(dir.path()).is_some()).await;
    let mode = std::fs::metadata(dir.path().join("session.json")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the session credential is private");
    assert_ne!(kept_session(dir.path()).unwrap(), token.expose(), "the session token, not the enrollment one");

    // SIGKILL, then started again from the same files, as systemd's Restart=always does. The
    // enrollment token is spent: only the kept session can let the agent back in.
    drop(agent);
    wait_until("the gateway to see the agent gone", || !running.gateway().is_connected(&scope)).await;
    let _agent = Agent::start(dir.path(), &running.connect_url(), token.expose(), &[]);
    wait_connected(running.gateway(), &scope).await;

    // And it works: a job runs.
    terminate(running.gateway(), &scope, "test").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_connection_renews_the_session_so_a_restart_after_its_lifetime_gets_back_in() {
    let dir = tempfile::tempdir().unwrap();
    let heartbeats = Heartbeats::default();
    let settings = Settings {
        session_ttl: Duration::from_secs(6),
        session_renewal: Duration::from_millis(500),
        token_leeway: Duration::ZERO,
        ..Settings::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = gateway_with(listener, &SigningKey::generate().unwrap(), &heartbeats, settings).await;
    let scope = scope();
    let token = running.gateway().mint_enrollment_token(&scope, "agent-1", Duration::from_secs(600)).unwrap();
    let agent = Agent::start(dir.path(), &running.connect_url(), token.expose(), &[]);
    wait_connected(running.gateway(), &scope).await;
    wait_until("the session credential to be kept", || kept_session(dir.path()).is_some()).await;
    let first = kept_session(dir.path()).unwrap();

    // Connected past the first session token's lifetime, with the renewals kept as they come.
    wait_until("the first session token to expire", || {
        matches!(running.gateway().tokens().verify_agent(&first, "agent-1"), Err(TokenError::Expired))
    })
    .await;
    assert!(running.gateway().is_connected(&scope), "the open connection is not cut by the expiry");
    let kept = kept_session(dir.path()).unwrap();
    assert_ne!(kept, first, "renewed while connected");

    drop(agent);
    wait_until("the gateway to see the agent gone", || !running.gateway().is_connected(&scope)).await;
    let _agent = Agent::start(dir.path(), &running.connect_url(), token.expose(), &[]);
    wait_connected(running.gateway(), &scope).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_enrolls_heartbeats_survives_a_gateway_restart_and_runs_a_resent_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let heartbeats = Heartbeats::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let running = gateway(listener, &key, &heartbeats).await;
    let scope = scope();
    let token = running.gateway().mint_enrollment_token(&scope, "agent-1", Duration::from_secs(600)).unwrap();
    let _agent = Agent::start(dir.path(), &running.connect_url(), token.expose(), &[]);

    wait_connected(running.gateway(), &scope).await;
    // The operator can tell this agent takes TEST.
    assert_eq!(running.gateway().capabilities(&scope), Some(vec![CAPABILITY_TEST.to_owned()]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !heartbeats.0.lock().unwrap().contains(&scope) {
        assert!(tokio::time::Instant::now() < deadline, "no heartbeat was recorded within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let terminate =
        Message::Terminate(Terminate { job_id: "t-1".into(), reason: "test".into(), grace_period_seconds: 1 });
    let first = tokio::time::timeout(Duration::from_secs(60), running.gateway().command(&scope, terminate.clone()))
        .await
        .expect("TERMINATE finishes")
        .unwrap();
    assert_eq!(first.state, JobState::Succeeded, "{first:?}");

    // The gateway restarts on the same address with the same key: the enrollment token is
    // spent, so only the session token can bring the agent back.
    running.shutdown().await.unwrap();
    let listener = TcpListener::bind(addr).await.unwrap();
    let running = gateway(listener, &key, &heartbeats).await;
    let job = running.gateway().send(&scope, terminate).unwrap();
    wait_connected(running.gateway(), &scope).await;
    let again = tokio::time::timeout(Duration::from_secs(60), job.finished()).await.expect("answered").unwrap();
    // The same record, not a second run: a rerun would have its own duration.
    assert_eq!(again, first, "a resent job must be answered with its status, not run again");
    assert!(running.gateway().is_connected(&scope));
}

#[tokio::test(flavor = "multi_thread")]
async fn build_then_deploy_through_the_gateway_serves_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let podman = Podman::new(dir.path());
    let registry = Registry::start().expect("the registry starts (testenv/build.sh builds it)");
    let port = free_port();
    let repo = dir.path().join("repo");
    let commit = app_repo(&repo, port);

    let key = SigningKey::generate().unwrap();
    let heartbeats = Heartbeats::default();
    let running = gateway(TcpListener::bind("127.0.0.1:0").await.unwrap(), &key, &heartbeats).await;
    let scope = scope();
    let token = running.gateway().mint_enrollment_token(&scope, "agent-1", Duration::from_secs(600)).unwrap();
    let _agent = Agent::start(dir.path(), &running.connect_url(), token.expose(), &podman.env);

    let image = format!("{}/shop/web:pr-1", registry.addr());
    let build = Message::Build(Build {
        job_id: "build-1".into(),
        clone_url: format!("file://{}", repo.display()),
        git_token: None,
        commit: commit.clone(),
        context: ".".into(),
        dockerfile: "Dockerfile".into(),
        platform: Platform::LinuxAmd64,
        build_args: BTreeMap::new(),
        cache_from: Vec::new(),
        cache_to: None,
        image: image.clone(),
        registry_auth: None,
        timeout_seconds: 600,
    });
    let built = tokio::time::timeout(Duration::from_secs(300), running.gateway().command(&scope, build))
        .await
        .expect("BUILD finishes")
        .unwrap();
    assert_eq!(built.state, JobState::Succeeded, "{built:?}");
    let digest = built.image_digest.expect("BUILD reports the digest");

    let pinned = format!("{}/shop/web@{digest}", registry.addr());
    let deploy = Message::Deploy(Deploy {
        job_id: "deploy-1".into(),
        project: "shop-pr-1".into(),
        clone_url: format!("file://{}", repo.display()),
        git_token: None,
        commit,
        compose_file: "docker-compose.yml".into(),
        images: BTreeMap::from([("web".into(), pinned.clone()), ("worker".into(), pinned.clone())]),
        secrets: Vec::new(),
        lifecycle: Default::default(),
        registry_auth: None,
    });
    let deployed = tokio::time::timeout(Duration::from_secs(300), running.gateway().command(&scope, deploy))
        .await
        .expect("DEPLOY finishes")
        .unwrap();
    assert_eq!(deployed.state, JobState::Succeeded, "{deployed:?}");
    let web = deployed.services.iter().find(|s| s.name == "web").expect("web is reported");
    assert_eq!(web.ports[0].published_port, port);
    let (code, body) = wait_for("the app to answer", Duration::from_secs(30), || http_get(port, "/"));
    assert_eq!((code, body.as_str()), (200, "hello from stagely\n"));

    // TEST, in the app's own image (busybox is its entrypoint): the command reaches the preview.
    let test = Message::Test(TestRun {
        job_id: "test-1".into(),
        image: pinned,
        commands: vec!["wget -q -O- $STAGELY_PREVIEW_URL | grep -q 'hello from stagely'".into()],
        preview_url: format!("http://127.0.0.1:{port}"),
        timeout_seconds: 120,
        registry_auth: None,
    });
    let tested = tokio::time::timeout(Duration::from_secs(180), running.gateway().command(&scope, test))
        .await
        .expect("TEST finishes")
        .unwrap();
    assert_eq!(tested.state, JobState::Succeeded, "{tested:?}");

    terminate(running.gateway(), &scope, "pr_closed").await;
    assert!(http_get(port, "/").is_none(), "the app still answers after TERMINATE");
}

/// The agent configuration a VM's cloud-init writes, for agent `agent_id` of the gateway at
/// `url` with `token`, pinned to the CA in `ca_file`: rendered as the operator renders it, and
/// read out of the user data as the `local` provider reads it.
fn cloud_init_config(url: &str, agent_id: &str, token: &str, ca_file: &Path) -> String {
    let ca = cloudinit::read_gateway_ca(ca_file).unwrap();
    let bootstrap = AgentBootstrap::new(url, agent_id, token, Role::Preview, "https://unused.invalid", &"0".repeat(64))
        .with_gateway_ca(Some(ca));
    local::agent_config(&cloudinit::render(&bootstrap)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_pinned_to_the_gateways_ca_by_cloud_init_is_admitted_over_wss_and_one_of_another_ca_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (gateway_ca, other_ca) = (TestCa::new("gateway CA").unwrap(), TestCa::new("another CA").unwrap());
    let (cert, key) = gateway_ca.serving(&["127.0.0.1"]).unwrap();
    let file = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (cert, key) = (file("tls.crt", cert), file("tls.key", key));
    let (gateway_ca_file, other_ca_file) =
        (file("gateway-ca.crt", gateway_ca.pem()), file("other-ca.crt", other_ca.pem()));
    let running = Gateway::builder()
        .signing_key(SigningKey::generate().unwrap())
        .objects(Heartbeats::default())
        .settings(Settings { heartbeat_interval_secs: 1, ..Settings::default() })
        .tls(CertStore::load(&cert, &key).unwrap())
        .serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .await
        .expect("the gateway starts");
    let url = running.connect_url();
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");

    let scope = scope();
    let token = running.gateway().mint_enrollment_token(&scope, "agent-1", Duration::from_secs(600)).unwrap();
    let pinned = dir.path().join("pinned");
    std::fs::create_dir(&pinned).unwrap();
    let _pinned = Agent::from_config(&pinned, &cloud_init_config(&url, "agent-1", token.expose(), &gateway_ca_file));
    wait_connected(running.gateway(), &scope).await;
    terminate(running.gateway(), &scope, "test").await;

    let other = Scope { name: "shop-pr-2".into(), uid: "uid-2".into(), ..scope.clone() };
    let token = running.gateway().mint_enrollment_token(&other, "agent-2", Duration::from_secs(600)).unwrap();
    let refused = dir.path().join("refused");
    std::fs::create_dir(&refused).unwrap();
    let _refused = Agent::from_config(&refused, &cloud_init_config(&url, "agent-2", token.expose(), &other_ca_file));
    let log = refused.join("agent.log");
    wait_until("the agent to log why it refused the gateway", || {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        log.contains("failed the TLS handshake with the gateway, trusting only the CA in the agent's configuration")
            && log.contains("invalid peer certificate")
            && log.contains("UnknownIssuer")
    })
    .await;
    assert!(!running.gateway().is_connected(&other), "an agent of another CA got in");
}
