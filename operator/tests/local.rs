//! The local provider: instances are real `stagely-agent` processes started with the
//! configuration their cloud-init user data carries; and the operator binary refuses it unless
//! started with `--allow-local-provider`.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/stack.rs"]
mod stack;

use std::time::{Duration, Instant};

use agent_support::agent_bin;
use kube::api::{Api, PostParams};
use stack::{InstanceWatch, STEP_TIMEOUT, Stack, condition, wait_env};
use stagely_api::v1alpha1::{
    BuildJob, BuildJobPhase, CloudProvider as CloudProviderObject, ContainerEngine, Environment, find_condition,
};
use stagely_operator::providers::local::{Local, LocalSettings};
use stagely_operator::providers::{CloudProvider, InstanceSpec, InstanceState, Role};

/// A preview VM of `team-a` owned by `key` (also its idempotency key).
fn spec(name: &str, key: &str) -> InstanceSpec {
    stack::unreachable_vm(name, key, key, "team-a", Role::Preview)
}

fn pid_of(dir: &std::path::Path, name: &str) -> u32 {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(name).join("instance.json")).unwrap()).unwrap();
    record["pid"].as_u64().unwrap() as u32
}

#[tokio::test]
async fn instances_are_agent_processes_from_the_user_data() {
    let state = tempfile::tempdir().unwrap();
    let local = Local::new(LocalSettings {
        agent_bin: agent_bin(),
        state_dir: state.path().to_owned(),
        engine: ContainerEngine::Podman,
        env: [("STAGELY_RECONNECT_MAX_MS".to_owned(), "200".to_owned())].into(),
    });
    local.validate_credentials().await.unwrap();

    let created = local.create(&spec("env-1", "uid-1")).await.unwrap();
    assert_eq!(created.id, "env-1");
    assert!(created.ready(), "{created:?}");
    assert_eq!(created.public_ip.unwrap().to_string(), "127.0.0.1");
    let pid = pid_of(state.path(), "env-1");
    assert!(std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap().contains("stagely-agent"));
    // Previews on one host must not fight over the compose files' host ports.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.split(|b| *b == 0).any(|var| var == b"STAGELY_EPHEMERAL_PORTS=1"), "ephemeral ports are on");
    // Its gateway is on this host: the provider, and only it, allows the plain ws:// one.
    assert!(environ.split(|b| *b == 0).any(|var| var == b"STAGELY_INSECURE=1"), "a plain gateway is allowed");

    // The agent got the configuration from the user data, privately.
    let config_path = state.path().join("env-1/agent.json");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    assert_eq!(config["agent_id"], "env-1");
    assert_eq!(config["token"], "enrollment-token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&config_path).unwrap().permissions().mode() & 0o777, 0o600);

    // It is up and trying to reach its gateway.
    let log = state.path().join("env-1/agent.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("127.0.0.1:9") {
        assert!(Instant::now() < deadline, "the agent never tried its gateway: {:?}", std::fs::read_to_string(&log));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A retried create adopts the running agent rather than starting a second one.
    let again = local.create(&spec("env-1", "uid-1")).await.unwrap();
    assert_eq!(again.id, "env-1");
    assert_eq!(pid_of(state.path(), "env-1"), pid, "the same process");

    let listed = local.list().await.unwrap();
    assert_eq!(listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["env-1"]);
    assert_eq!(listed[0].tags["stagely-owner-uid"], "uid-1");

    local.terminate("env-1").await.unwrap();
    // Gone, or exited and waiting to be reaped by the provider's waiter.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z "), "agent {pid} still runs: {stat}");
    assert_eq!(local.get("env-1").await.unwrap(), None);
    local.terminate("env-1").await.expect("terminating twice succeeds");
    assert!(local.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_missing_agent_binary_is_reported_and_bad_user_data_refused() {
    let state = tempfile::tempdir().unwrap();
    let local = Local::new(LocalSettings {
        agent_bin: state.path().join("no-such-agent"),
        state_dir: state.path().to_owned(),
        engine: ContainerEngine::Docker,
        env: Default::default(),
    });
    let err = local.validate_credentials().await.unwrap_err();
    assert!(err.to_string().contains("no-such-agent is missing or not executable"), "{err}");

    let mut bad = spec("env-2", "uid-2");
    bad.user_data = "#cloud-config\npackages: [git]\n".into();
    let err = local.create(&bad).await.unwrap_err();
    assert_eq!(err.to_string(), "the local provider cannot use this user data: no write_files");
    let mut evil = spec("../escape", "uid-3");
    evil.name = "../escape".into();
    assert!(local.create(&evil).await.unwrap_err().to_string().contains("not a valid local instance name"));
}

#[tokio::test]
async fn an_agent_without_its_gateway_stops_itself_not_the_host() {
    let state = tempfile::tempdir().unwrap();
    let local = Local::new(LocalSettings {
        agent_bin: agent_bin(),
        state_dir: state.path().to_owned(),
        engine: ContainerEngine::Podman,
        env: [
            ("STAGELY_DISCONNECT_SHUTDOWN_SECONDS".to_owned(), "1".to_owned()),
            ("STAGELY_RECONNECT_MAX_MS".to_owned(), "200".to_owned()),
        ]
        .into(),
    });
    local.create(&spec("env-3", "uid-3")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let instance = local.get("env-3").await.unwrap().expect("still recorded");
        if instance.state == InstanceState::Terminated {
            break;
        }
        assert!(Instant::now() < deadline, "the agent kept running without its gateway");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(local.list().await.unwrap().is_empty(), "a stopped agent is not a running instance");
    local.terminate("env-3").await.unwrap();
}

/// The operator binary started without `--allow-local-provider` (the default): a `local`
/// CloudProvider is not Ready and names the flag, and an Environment on it gets no VM and says why.
#[tokio::test]
async fn the_operator_refuses_the_local_provider_unless_started_with_the_flag() {
    const FLAG: &str = "--allow-local-provider";
    let stack = Stack::shared();
    let _operator = stack.operator_with(false);
    let ns = "local-refused";
    let repo = stack.dir.path().join("repos").join(ns);
    let sha = stack::single_repo(&repo, "FROM scratch\nCOPY busybox /bin/busybox\n");
    let watch = InstanceWatch::start(stack.local_dir(ns));
    stack.namespace(ns, &repo, 2).await;
    let client = stack.client().await;

    let providers = Api::<CloudProviderObject>::namespaced(client.clone(), ns);
    let ready =
        stagely_testenv::server::eventually("the local CloudProvider's Ready condition", STEP_TIMEOUT, || async {
            let provider = providers.get("local").await.ok()?;
            find_condition(&provider.status?.conditions, "Ready").cloned()
        })
        .await;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "LocalProviderNotAllowed"), "{ready:?}");
    assert!(ready.message.contains(FLAG), "{}", ready.message);

    let envs = Api::<Environment>::namespaced(client.clone(), ns);
    envs.create(&PostParams::default(), &stack::environment("pr-1", 1, &sha)).await.unwrap();
    let env = wait_env(&envs, "pr-1", "the Environment to say why its build waits", STEP_TIMEOUT, |env| {
        condition(env, "BuildsSucceeded").is_some_and(|(_, _, message)| message.contains(FLAG))
    })
    .await;
    let (status, _, message) = condition(&env, "BuildsSucceeded").unwrap();
    assert_eq!(status, "False", "{message}");
    let jobs = stack::jobs_of(&Api::<BuildJob>::namespaced(client, ns), "pr-1").await;
    assert!(!jobs.is_empty());
    for job in &jobs {
        let status = job.status.clone().unwrap_or_default();
        assert_eq!(status.phase, Some(BuildJobPhase::Queued), "{status:?}");
        assert!(status.message.as_deref().is_some_and(|m| m.contains(FLAG)), "{status:?}");
        assert!(status.vm.is_none(), "{status:?}");
    }
    assert!(watch.seen().is_empty(), "a VM was started: {:?}", watch.seen());
    assert!(stack::instances(&stack.local_dir(ns)).is_empty());
}
