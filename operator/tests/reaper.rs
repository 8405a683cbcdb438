//! The reaper and the orphan sweep end to end, on the real operator binary with short periods:
//! a preview whose agent died is deleted (`HeartbeatLost`) while a live one with an old
//! `lastHeartbeat` is not; an Environment past its TTL is deleted (`Expired`) with its pull
//! request's removal recorded; a VM whose owner is gone is terminated; a CloudProvider being
//! deleted waits for the VMs still in use, and lets go when they are gone or an admin says so.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/stack.rs"]
mod stack;

use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use stack::{InstanceWatch, Operator, STEP_TIMEOUT, Stack, environment, events, phase, wait_env};
use stagely_api::keys;
use stagely_api::v1alpha1::{CloudProvider, Environment, EnvironmentPhase, Project};
use stagely_operator::providers::local::{Local, LocalSettings};
use stagely_operator::providers::{CloudProvider as _, InstanceSpec, Role};
use stagely_testenv::server::eventually;

/// The reaper's heartbeat timeout here: far shorter than the gateway's time between two
/// `lastHeartbeat` writes (`HEARTBEAT_WRITE_INTERVAL_SECS`), so a connected agent with an old
/// `lastHeartbeat` is seen too.
const HEARTBEAT_TIMEOUT_SECS: u64 = 8;

/// Seconds between two `lastHeartbeat` writes here (300 by default): the first is written soon
/// after the agent's first heartbeat.
const HEARTBEAT_WRITE_INTERVAL_SECS: &str = "20";

/// Generous: builds and the agents' first heartbeats (30 s after they connect) share two cores
/// with the other tests of this file.
const WAIT: std::time::Duration = std::time::Duration::from_secs(300);

fn stack() -> (&'static Stack, &'static Operator) {
    let stack = Stack::shared();
    static OPERATOR: OnceLock<Operator> = OnceLock::new();
    let operator = OPERATOR.get_or_init(|| {
        stack.operator_custom(
            true,
            &[
                ("--heartbeat-timeout-secs", &HEARTBEAT_TIMEOUT_SECS.to_string()),
                ("--heartbeat-write-interval-secs", HEARTBEAT_WRITE_INTERVAL_SECS),
                ("--reap-interval-secs", "1"),
                ("--sweep-interval-secs", "1"),
                ("--orphan-grace-secs", "0"),
            ],
            &[],
        )
    });
    (stack, operator)
}

/// The `local` provider as the operator runs it for CloudProvider `name` of `namespace` (same
/// state directory), to start VMs behind its back.
fn local(stack: &Stack, namespace: &str, name: &str) -> Local {
    Local::new(LocalSettings {
        agent_bin: agent_support::agent_bin(),
        state_dir: stack.local_dir(namespace).join(name),
        engine: Default::default(),
        env: Default::default(),
    })
}

/// A builder VM owned by `owner` in `namespace`.
fn spec(name: &str, owner: &str, namespace: &str) -> InstanceSpec {
    stack::unreachable_vm(name, name, owner, namespace, Role::Builder)
}

async fn running(local: &Local) -> Vec<String> {
    local.list().await.unwrap().into_iter().map(|i| i.id).collect()
}

/// An Environment of a Project that does not exist: it does nothing, but it is a live owner.
async fn idle_owner(api: &Api<Environment>, name: &str) -> String {
    let mut env = environment(name, 99, &"a".repeat(40));
    env.spec.project_ref.name = "no-such-project".into();
    api.create(&PostParams::default(), &env).await.unwrap().uid().unwrap()
}

async fn gone<K>(api: &Api<K>, name: &str, what: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(what, WAIT, || async { api.get_opt(name).await.unwrap().is_none().then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preview_whose_agent_died_is_reaped_and_an_expired_one_goes_with_its_removal_recorded() {
    let (stack, operator) = stack();
    let ns = "reap";
    let repo = stack.dir.path().join("repos").join(ns);
    let sha = stack::web_app_repo(&repo, "version one");
    stack.namespace(ns, &repo, 10).await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);

    // A live preview: Ready, and left alone while its agent is connected, even when its
    // lastHeartbeat is older than the timeout (the gateway writes it every 20 s here).
    envs.create(&PostParams::default(), &environment("shop-pr-1", 1, &sha)).await.unwrap();
    let env = wait_env(&envs, "shop-pr-1", "Ready", WAIT, |e| {
        matches!(phase(e), Some(EnvironmentPhase::Ready | EnvironmentPhase::Failed))
    })
    .await;
    assert_eq!(phase(&env), Some(EnvironmentPhase::Ready), "{:#?}", env.status);
    let uid = env.uid().unwrap();
    eventually("a live preview with an old lastHeartbeat, not reaped", WAIT, || async {
        let env = envs.get("shop-pr-1").await.ok()?;
        let heard = env.status.as_ref()?.last_heartbeat.as_ref()?.0;
        let silent = Timestamp::now().duration_since(heard).as_secs() > HEARTBEAT_TIMEOUT_SECS as i64 + 2;
        (silent && env.metadata.deletion_timestamp.is_none()).then_some(())
    })
    .await;

    // Its agent dies (as a VM that vanished would): the reaper deletes the Environment, and
    // terminating the local "VM" stops the containers the agent left running.
    let compose = format!("{ns}-shop-pr-1");
    assert!(!containers(stack, &compose).is_empty(), "the preview runs containers of compose project {compose}");
    let preview = watch.seen().into_iter().find(|s| s.owner == uid && s.role == "preview").expect("a preview VM");
    let pid = rustix::process::Pid::from_raw(preview.pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    gone(&envs, "shop-pr-1", "the silent preview reaped").await;
    eventually("a HeartbeatLost Event", STEP_TIMEOUT, || async {
        let notes = events(&client, ns, "shop-pr-1", "HeartbeatLost").await;
        notes.iter().any(|n| n.starts_with("no heartbeat from the preview's agent since")).then_some(())
    })
    .await;
    let reaped = r#"stagely_operator_reaped_total{reason="HeartbeatLost"}"#;
    assert!(operator.metric(reaped).await.unwrap_or_default() >= 1.0, "{reaped}");

    // An Environment past its TTL goes, whatever its phase; its pull request's state at the last
    // apply is recorded as removed, so neither the resync nor a redelivery brings it back.
    let mut expiring = environment("shop-pr-2", 2, &sha);
    expiring.spec.overrides = Some(serde_json::from_value(serde_json::json!({"ttl": "5s"})).unwrap());
    let updated_at = "2026-11-30T10:00:00Z";
    expiring.metadata.annotations = Some([(keys::GITHUB_UPDATED_AT.to_owned(), updated_at.to_owned())].into());
    envs.create(&PostParams::default(), &expiring).await.unwrap();
    gone(&envs, "shop-pr-2", "the expired Environment deleted").await;
    eventually("an Expired Event naming the TTL", STEP_TIMEOUT, || async {
        let notes = events(&client, ns, "shop-pr-2", "Expired").await;
        notes.iter().any(|n| n.starts_with("the preview expired at") && n.contains("(TTL 5s)")).then_some(())
    })
    .await;
    let project = Api::<Project>::namespaced(client.clone(), ns).get("shop").await.unwrap();
    let removed = project.annotations().get(&keys::pull_request_removed(2)).map(String::as_str);
    assert_eq!(removed, Some(updated_at), "the removal is recorded at the pull request's last state");
    let expired = r#"stagely_operator_reaped_total{reason="Expired"}"#;
    assert!(operator.metric(expired).await.unwrap_or_default() >= 1.0, "{expired}");

    // Nothing of either is left: VMs, agents, routes.
    eventually("every VM of the reaped Environments gone", STEP_TIMEOUT, || async {
        stack::instances(&stack.local_dir(ns)).is_empty().then_some(())
    })
    .await;
    stack::assert_nothing_left(&stack.local_dir(ns), &watch.seen());
    assert_eq!(containers(stack, &compose), Vec::<String>::new(), "the reaped preview's containers");
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_terminated_and_a_cloudprovider_waits_for_the_vms_still_in_use() {
    let (stack, operator) = stack();
    let ns = "sweep";
    let repo = stack.dir.path().join("repos").join(ns);
    stack::web_app_repo(&repo, "version one");
    stack.namespace(ns, &repo, 10).await;
    let client = stack.client().await;
    let providers: Api<CloudProvider> = Api::namespaced(client.clone(), ns);
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    eventually("the CloudProvider Ready", STEP_TIMEOUT, || async {
        let cp = providers.get("local").await.ok()?;
        let ready = cp.status?.conditions.into_iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;

    // Two VMs behind the operator's back: one whose owner never existed, one owned by a live
    // Environment. The sweep terminates the first and keeps the second.
    let cloud = local(stack, ns, "local");
    let owner = idle_owner(&envs, "held").await;
    cloud.create(&spec("held-vm", &owner, ns)).await.unwrap();
    cloud.create(&spec("orphan-vm", "00000000-0000-0000-0000-000000000000", ns)).await.unwrap();
    eventually("the orphan terminated", STEP_TIMEOUT, || async {
        (running(&cloud).await == ["held-vm"]).then_some(())
    })
    .await;
    eventually("an OrphanTerminated Event on the CloudProvider", STEP_TIMEOUT, || async {
        let notes = events(&client, ns, "local", "OrphanTerminated").await;
        notes.iter().any(|n| n.starts_with("terminated VM orphan-vm: its owner")).then_some(())
    })
    .await;
    let terminated = r#"stagely_operator_orphans_terminated_total{provider="local"}"#;
    assert!(operator.metric(terminated).await.unwrap_or_default() >= 1.0, "{terminated}");

    // Deleting the CloudProvider: it stays while the VM is in use, and says so.
    providers.delete("local", &DeleteParams::default()).await.unwrap();
    let cp = eventually("the CloudProvider says what it waits for", STEP_TIMEOUT, || async {
        let cp = providers.get("local").await.ok()?;
        let ready = cp.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
        (ready.reason == "Deleting").then_some(ready)
    })
    .await;
    assert!(cp.message.contains("1 VM still in use: held-vm (owner UID"), "{}", cp.message);
    assert_eq!(running(&cloud).await, ["held-vm"], "a VM in use is not touched");
    // Its owner goes: the VM is an orphan now, terminated, and the CloudProvider goes with it.
    envs.delete("held", &DeleteParams::default()).await.unwrap();
    gone(&providers, "local", "the CloudProvider deleted once its VMs are gone").await;
    assert!(running(&cloud).await.is_empty(), "the last VM terminated before the CloudProvider went");

    // A CloudProvider kept by a VM in use lets go when an admin says so; the Event names the VM.
    let second: CloudProvider = serde_json::from_value(serde_json::json!({
        "apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider",
        "metadata": {"name": "second", "namespace": ns},
        "spec": {"type": "local", "local": {"engine": "podman"}, "maxInstances": 2},
    }))
    .unwrap();
    providers.create(&PostParams::default(), &second).await.unwrap();
    let cloud = local(stack, ns, "second");
    let owner = idle_owner(&envs, "held-two").await;
    cloud.create(&spec("kept-vm", &owner, ns)).await.unwrap();
    eventually("the second CloudProvider's finalizer", STEP_TIMEOUT, || async {
        let cp = providers.get("second").await.ok()?;
        cp.finalizers().iter().any(|f| f == keys::CLOUDPROVIDER_FINALIZER).then_some(())
    })
    .await;
    providers.delete("second", &DeleteParams::default()).await.unwrap();
    eventually("the second CloudProvider waits", STEP_TIMEOUT, || async {
        let cp = providers.get("second").await.ok()?;
        cp.status?.conditions.iter().any(|c| c.reason == "Deleting").then_some(())
    })
    .await;
    let patch = serde_json::json!({"metadata": {"annotations": {keys::ABANDON_CLEANUP: "true"}}});
    providers.patch("second", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    gone(&providers, "second", "the CloudProvider released by the admin's annotation").await;
    eventually("a CleanupAbandoned Event naming the VM left", STEP_TIMEOUT, || async {
        let notes = events(&client, ns, "second", "CleanupAbandoned").await;
        notes
            .iter()
            .any(|n| n.contains("an admin set stagely.dev/abandon-cleanup") && n.contains("kept-vm"))
            .then_some(())
    })
    .await;
    assert_eq!(running(&cloud).await, ["kept-vm"], "what the admin left is left");
    cloud.terminate("kept-vm").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_deleted_all_at_once_still_stops_its_vms_with_the_credentials_it_kept() {
    let (stack, _operator) = stack();
    let ns = "whole";
    let repo = stack.dir.path().join("repos").join(ns);
    let sha = stack::single_repo(&repo, &stack::slow_dockerfile(300));
    stack.namespace(ns, &repo, 10).await;
    let client = stack.client().await;
    let pp = PostParams::default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let providers: Api<CloudProvider> = Api::namespaced(client.clone(), ns);
    let projects: Api<Project> = Api::namespaced(client.clone(), ns);
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);

    // The CloudProvider's credentials Secret is kept for it while it lives.
    let creds = Secret {
        metadata: kube::api::ObjectMeta { name: Some("creds".into()), ..Default::default() },
        string_data: Some([("token".to_owned(), "unused-by-local".to_owned())].into()),
        ..Default::default()
    };
    secrets.create(&pp, &creds).await.unwrap();
    let patch = serde_json::json!({"spec": {"credentialsSecretRef": {"name": "creds"}}});
    providers.patch("local", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("the credentials Secret protected", STEP_TIMEOUT, || async {
        let secret = secrets.get("creds").await.ok()?;
        secret.finalizers().iter().any(|f| f == keys::CREDENTIALS_FINALIZER).then_some(())
    })
    .await;

    // A build in progress: its builder VM runs.
    let watch = InstanceWatch::start(stack.local_dir(ns));
    envs.create(&pp, &environment("shop-pr-3", 3, &sha)).await.unwrap();
    eventually("a builder VM running", WAIT, || async {
        (!stack::builders(&stack.local_dir(ns)).is_empty()).then_some(())
    })
    .await;

    // Everything deleted at once, the Secret and the Project first, as the namespace controller
    // does (testenv runs none): the Secret stays while the CloudProvider needs it.
    let dp = DeleteParams::default();
    secrets.delete("creds", &dp).await.unwrap();
    projects.delete("shop", &dp).await.unwrap();
    envs.delete("shop-pr-3", &dp).await.unwrap();
    providers.delete("local", &dp).await.unwrap();
    let kept = secrets.get("creds").await.expect("the Secret is kept while its CloudProvider cleans up");
    assert!(kept.metadata.deletion_timestamp.is_some());
    gone(&envs, "shop-pr-3", "the Environment torn down without its Project").await;
    gone(&providers, "local", "the CloudProvider gone once its VMs are").await;
    gone(&secrets, "creds", "the Secret gone after its last CloudProvider").await;
    stack::assert_nothing_left(&stack.local_dir(ns), &watch.seen());
}

/// The containers of compose `project` in the stack's podman, running or not.
fn containers(stack: &Stack, project: &str) -> Vec<String> {
    let label = format!("label=io.podman.compose.project={project}");
    let names = stack.podman.run(&["ps", "-a", "--filter", &label, "--format", "{{.Names}}"]);
    names.lines().map(str::to_owned).collect()
}
