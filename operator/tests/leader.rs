//! Leader election end to end: operator replicas (real processes) share a Lease on the real
//! control plane; only the holder acts and is ready, agents reach it through a forwarder that
//! routes by readiness as a Service would, and a SIGKILLed leader's follower takes over the
//! pipeline it left mid-build without a second VM. The tests take turns: a replica that leads
//! acts on every namespace.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/forwarder.rs"]
mod forwarder;
#[path = "support/stack.rs"]
mod stack;

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use forwarder::{Backend, Forwarder};
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use stack::{BUILD_TIMEOUT, InstanceWatch, Operator, STEP_TIMEOUT, Stack, environment, jobs_of, phase};
use stagely_api::v1alpha1::{BuildJob, BuildJobPhase, Environment, EnvironmentPhase};
use stagely_testenv::server::eventually;

/// The operator's default Lease duration: a killed leader's Lease is free this long after its
/// last renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// The forwarder on the stack's gateway port, where agents and the registry's token realm point.
fn forwarder() -> &'static Forwarder {
    static FORWARDER: OnceLock<Forwarder> = OnceLock::new();
    FORWARDER.get_or_init(|| Forwarder::start(Stack::shared().gateway_port))
}

/// One test at a time: each test's leader would act on the other's namespace too.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn backend(operator: &Operator) -> Backend {
    Backend { ops_port: operator.ops_port(), gateway_port: operator.gateway_port }
}

fn status_of(operator: &Operator) -> Option<u16> {
    operator.readyz().map(|(status, _)| status)
}

/// Whether something listens on loopback `port`. Binding, not connecting: a connect can reach a
/// container's published port through the engine's NAT rules, or the connecting socket itself.
fn listens(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
}

/// Deletes Environment `name` and waits until its finalizer has let it go: the leader has torn
/// it down, leaving the next test nothing to act on.
async fn delete(envs: &Api<Environment>, name: &str) {
    envs.delete(name, &DeleteParams::default()).await.unwrap();
    eventually("the Environment to go", STEP_TIMEOUT, || async {
        envs.get_opt(name).await.unwrap().is_none().then_some(())
    })
    .await;
}

/// The holder of Lease `name` in `default`.
async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get(name).await.ok()?.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leaders_follower_takes_over_mid_build_and_the_preview_comes_up_with_one_vm_per_owner() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::shared();
    let forwarder = forwarder();
    let ns = "takeover";
    let lease = "stagely-takeover";
    let repo = stack.dir.path().join("repos").join(ns);
    stack::web_app_repo(&repo, "version one");
    // A build slow enough to be caught mid-way.
    let dockerfile = std::fs::read_to_string(repo.join("Dockerfile")).unwrap();
    std::fs::write(
        repo.join("Dockerfile"),
        dockerfile.replacen("COPY www", "RUN [\"/bin/busybox\", \"sleep\", \"8\"]\nCOPY www", 1),
    )
    .unwrap();
    let sha = stack::commit(&repo, "slow build");
    stack.namespace(ns, &repo, 10).await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(client, "default");

    // Replica a starts first and takes the free Lease; b, started next, follows.
    let a = stack.replica(lease, "replica-a");
    forwarder.add(backend(&a));
    eventually("replica-a to lead", STEP_TIMEOUT, || async { (status_of(&a) == Some(200)).then_some(()) }).await;
    let b = stack.replica(lease, "replica-b");
    forwarder.add(backend(&b));
    assert_eq!(holder(&leases, lease).await.as_deref(), Some("replica-a"));
    let (status, body) = b.readyz().unwrap();
    assert_eq!(status, 503, "a follower is not ready: {body}");
    assert!(body.contains(&format!("default/{lease}")), "{body}");
    assert_eq!(a.metric("stagely_operator_leader").await, Some(1.0));
    assert_eq!(b.metric("stagely_operator_leader").await, Some(0.0));
    assert!(!listens(b.gateway_port), "a follower serves no agent");

    // The leader provisions a builder; it is killed while the build runs.
    envs.create(&PostParams::default(), &environment("shop-pr-1", 1, &sha)).await.unwrap();
    eventually("the build to run on a builder VM", BUILD_TIMEOUT, || async {
        let jobs = jobs_of(&jobs_api, "shop-pr-1").await;
        let building = jobs.iter().any(|j| j.status.as_ref().and_then(|s| s.phase) == Some(BuildJobPhase::Building));
        (building && !stack::builders(&stack.local_dir(ns)).is_empty()).then_some(())
    })
    .await;
    assert!(forwarder.forwarded_to(a.gateway_port) > 0, "the builder's agent reached replica-a");
    let killed = Instant::now();
    a.kill();

    // b takes the Lease over once it expires, becomes ready, and agents reach it.
    eventually("replica-b to take the Lease over", LEASE_DURATION + STEP_TIMEOUT, || async {
        let holder = holder(&leases, lease).await?;
        (holder == "replica-b" && status_of(&b) == Some(200)).then_some(())
    })
    .await;
    eprintln!("e2e_leader_takeover_ms={}", killed.elapsed().as_millis());
    assert_eq!(b.metric("stagely_operator_leader").await, Some(1.0));
    let env = stack::wait_env(&envs, "shop-pr-1", "Ready under the new leader", 2 * BUILD_TIMEOUT, |e| {
        matches!(phase(e), Some(EnvironmentPhase::Ready | EnvironmentPhase::Failed))
    })
    .await;
    assert_eq!(phase(&env), Some(EnvironmentPhase::Ready), "{:#?}", env.status);
    assert!(forwarder.forwarded_to(b.gateway_port) > 0, "agents reconnected to replica-b");

    // One VM per owner: the builder the killed leader started finished the build; no second one.
    let seen = watch.seen();
    let instances_of = |owner: &str, role: &str| -> BTreeSet<String> {
        seen.iter().filter(|s| s.owner == owner && s.role == role).map(|s| s.instance.clone()).collect()
    };
    let jobs = jobs_of(&jobs_api, "shop-pr-1").await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    for job in &jobs {
        assert_eq!(
            instances_of(&job.uid().unwrap(), "builder").len(),
            1,
            "one builder for {}: {seen:?}",
            job.name_any()
        );
    }
    assert_eq!(instances_of(&env.uid().unwrap(), "preview").len(), 1, "one preview VM: {seen:?}");
    let owners: BTreeSet<_> = seen.iter().map(|s| (s.owner.clone(), s.role.clone())).collect();
    for (owner, role) in &owners {
        assert_eq!(instances_of(owner, role).len(), 1, "one {role} instance for owner {owner}: {seen:?}");
    }

    // The new leader tears the preview down.
    delete(&envs, "shop-pr-1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_reconciles_nothing_and_is_not_ready_until_the_lease_is_released() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::shared();
    let ns = "follower";
    let lease = "stagely-held-elsewhere";
    let client = stack.client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    // Another replica holds the Lease, for an hour.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    let held = Lease {
        metadata: ObjectMeta { name: Some(lease.into()), ..Default::default() },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("another-replica".into()),
            lease_duration_seconds: Some(3600),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..Default::default()
        }),
    };
    leases.create(&PostParams::default(), &held).await.unwrap();

    let follower = stack.replica(lease, "replica-f");
    let (status, body) = follower.readyz().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("default/{lease}")), "{body}");
    assert_eq!(follower.metric("stagely_operator_leader").await, Some(0.0));

    // A repository without stagely.yaml: a leader would write a status at once, and start no VM.
    let repo = stack.dir.path().join("repos").join(ns);
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("README.md"), "no stagely.yaml here\n").unwrap();
    agent_support::git(&repo, &["init", "-q", "-b", "main"]);
    let sha = stack::commit(&repo, "readme");
    stack.namespace(ns, &repo, 10).await;
    let envs: Api<Environment> = Api::namespaced(client, ns);
    let log = stack.replica_log("replica-f");
    let looks = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("another replica holds the Lease; looking again")
            .count()
    };
    let before = looks();
    envs.create(&PostParams::default(), &environment("shop-pr-2", 2, &sha)).await.unwrap();

    // The follower has looked at the Lease twice since: time enough to have acted, had it acted.
    eventually("the follower to look at the Lease twice more", STEP_TIMEOUT, || async {
        (looks() >= before + 2).then_some(())
    })
    .await;
    let env = envs.get("shop-pr-2").await.unwrap();
    assert!(env.status.is_none(), "a follower wrote a status: {:#?}", env.status);
    assert!(env.finalizers().is_empty(), "a follower added finalizers: {:?}", env.finalizers());
    assert_eq!(follower.readyz().map(|(status, _)| status), Some(503));
    assert!(!listens(follower.gateway_port), "a follower serves no agent");

    // The holder releases the Lease (as a leader does on SIGTERM): the follower takes it, and acts.
    let release = serde_json::json!({"spec": {"holderIdentity": null, "acquireTime": null, "renewTime": null, "leaseDurationSeconds": null}});
    leases.patch(lease, &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();
    eventually("the follower to lead", STEP_TIMEOUT, || async {
        (holder(&leases, lease).await.as_deref() == Some("replica-f") && status_of(&follower) == Some(200))
            .then_some(())
    })
    .await;
    assert_eq!(follower.metric("stagely_operator_leader").await, Some(1.0));
    stack::wait_env(&envs, "shop-pr-2", "a status from the new leader", STEP_TIMEOUT, |e| e.status.is_some()).await;
    delete(&envs, "shop-pr-2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_stopped_with_sigterm_releases_the_lease_to_its_follower() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::shared();
    let lease = "stagely-handover";
    let leases: Api<Lease> = Api::namespaced(stack.client().await, "default");
    let c = stack.replica(lease, "replica-c");
    eventually("replica-c to lead", STEP_TIMEOUT, || async { (status_of(&c) == Some(200)).then_some(()) }).await;
    let d = stack.replica(lease, "replica-d");
    assert_eq!(status_of(&d), Some(503));

    let exit = c.terminate();
    assert!(exit.success(), "a leader stops cleanly on SIGTERM: {exit:?}");
    // Released before the process exited: without the release, replica-c would hold the Lease
    // for its whole duration.
    assert_ne!(holder(&leases, lease).await.as_deref(), Some("replica-c"), "the Lease was released");
    eventually("replica-d to lead", STEP_TIMEOUT, || async {
        (holder(&leases, lease).await.as_deref() == Some("replica-d") && status_of(&d) == Some(200)).then_some(())
    })
    .await;
}
