//! The operator SIGKILLed mid-run and started again, against the same real stack as
//! `pipeline.rs` (its own test binary, so it owns its operator): the run finishes, and each
//! BuildJob had exactly one builder VM.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/stack.rs"]
mod stack;

use kube::ResourceExt;
use kube::api::{Api, PostParams};
use stack::{BUILD_TIMEOUT, InstanceWatch, STEP_TIMEOUT, Stack, assert_no_builder_left, environment, jobs_of};
use stagely_api::v1alpha1::{BuildJob, BuildJobPhase, Environment, EnvironmentPhase, find_condition};
use stagely_testenv::server::eventually;

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_mid_run_finishes_it_with_one_builder_per_build_job() {
    let stack = Stack::shared();
    let ns = "restart";
    let repo = stack.dir.path().join("repos").join(ns);
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy("/bin/busybox", repo.join("busybox")).unwrap();
    std::fs::write(repo.join("Dockerfile"), stack::slow_dockerfile(8)).unwrap();
    std::fs::write(
        repo.join("stagely.yaml"),
        "version: 2\nbuilds:\n  web:\n    platform: linux/amd64\n  api:\n    platform: linux/amd64\n",
    )
    .unwrap();
    agent_support::git(&repo, &["init", "-q", "-b", "main"]);
    let sha = stack::commit(&repo, "app");
    stack.namespace(ns, &repo, 10).await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client, ns);

    let operator = stack.operator();
    envs.create(&PostParams::default(), &environment("shop-pr-9", 9, &sha)).await.unwrap();
    eventually("both builds to run", BUILD_TIMEOUT, || async {
        let jobs = jobs_of(&jobs_api, "shop-pr-9").await;
        let building = jobs.iter().filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(BuildJobPhase::Building));
        (building.count() == 2).then_some(())
    })
    .await;
    operator.kill();

    let operator = stack.operator();
    let env = eventually("the run to finish after the restart", BUILD_TIMEOUT, || async {
        let env = envs.get("shop-pr-9").await.ok()?;
        let status = env.status.as_ref()?;
        let done = find_condition(&status.conditions, "BuildsSucceeded").is_some_and(|c| c.status == "True")
            || status.phase == Some(EnvironmentPhase::Failed);
        done.then_some(env)
    })
    .await;
    let status = env.status.unwrap();
    assert_eq!(find_condition(&status.conditions, "BuildsSucceeded").unwrap().status, "True", "{status:#?}");

    eventually("the builders to go", STEP_TIMEOUT, || async {
        stack::builders(&stack.local_dir(ns)).is_empty().then_some(())
    })
    .await;
    let seen = watch.seen();
    assert_no_builder_left(&stack.local_dir(ns), &seen);
    let jobs = jobs_of(&jobs_api, "shop-pr-9").await;
    assert_eq!(jobs.len(), 2);
    for job in jobs {
        let uid = job.uid().unwrap();
        let builders: Vec<_> = seen.iter().filter(|s| s.owner == uid && s.role == "builder").collect();
        assert_eq!(builders.len(), 1, "exactly one builder VM for {}: {seen:?}", job.name_any());
    }

    // Once the preview's deployment has ended, nothing is followed any more: no job's task or
    // last STATUS is kept for the preview's life.
    // (This repository has no compose file: the deployment ends failed, which is enough here.)
    eventually("the preview's deployment to end", BUILD_TIMEOUT, || async {
        let env = envs.get("shop-pr-9").await.ok()?;
        let state = env.status.as_ref()?.deployment.as_ref()?.state.clone()?;
        (state != "running").then_some(())
    })
    .await;
    for controller in ["environment", "buildjob"] {
        let sample = format!("stagely_operator_followed_jobs{{controller=\"{controller}\"}}");
        eventually(&format!("the {controller} controller to follow no job"), STEP_TIMEOUT, || async {
            (operator.metric(&sample).await == Some(0.0)).then_some(())
        })
        .await;
    }
}
