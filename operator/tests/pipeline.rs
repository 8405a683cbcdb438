//! The pipeline end to end, everything real: the `stagely-operator` binary against testenv's
//! control plane, stagely.yaml read from a git repository, builder VMs as real agent processes
//! of the `local` provider building with podman, images pushed to the distribution registry with
//! token auth, routes in redis-server. Each test works in a namespace of its own.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/stack.rs"]
mod stack;

use std::sync::OnceLock;
use std::time::Instant;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use stack::{
    BUILD_TIMEOUT, InstanceWatch, Operator, STEP_TIMEOUT, Stack, assert_no_builder_left, commit, condition,
    environment, jobs_of, multi_arch_repo, phase, set_head, single_repo, slow_dockerfile, wait_env,
};
use stagely_api::keys;
use stagely_api::v1alpha1::{BuildJob, BuildJobPhase, Environment, EnvironmentPhase, Platform};
use stagely_testenv::server::eventually;

fn stack() -> &'static Stack {
    let stack = Stack::shared();
    static OPERATOR: OnceLock<Operator> = OnceLock::new();
    OPERATOR.get_or_init(|| stack.operator());
    stack
}

async fn registry_get(stack: &Stack, repository: &str, path: &str, accept: &str) -> reqwest::Response {
    stack::registry_get(stack, repository, path, accept).await
}

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFESTS: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_arch_run_builds_every_platform_and_merges_one_image_index() {
    let stack = stack();
    let ns = "multiarch";
    let repo = stack.dir.path().join("repos").join(ns);
    let sha = multi_arch_repo(&repo);
    stack.namespace(ns, &repo, 10).await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client, ns);

    let started = Instant::now();
    envs.create(&PostParams::default(), &environment("shop-pr-1", 1, &sha)).await.unwrap();

    // The URL shows the Building page from the first seconds.
    let env =
        wait_env(&envs, "shop-pr-1", "a URL", STEP_TIMEOUT, |e| e.status.as_ref().is_some_and(|s| s.url.is_some()))
            .await;
    let status = env.status.clone().unwrap();
    let hash = status.subdomain_hash.clone().unwrap();
    assert!(hash.len() == 12 && hash.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{hash}");
    assert_eq!(status.url.as_deref(), Some(format!("https://{hash}.preview.example.com").as_str()));
    let record = eventually("the building route", STEP_TIMEOUT, || stack::route(stack, &hash)).await;
    assert_eq!(record["status"], "building", "{record}");
    assert_eq!(
        (record["namespace"].as_str(), record["environment"].as_str(), record["pr"].as_u64()),
        (Some(ns), Some("shop-pr-1"), Some(1))
    );

    // One BuildJob per build × platform, with the right specs.
    let jobs = eventually("three BuildJobs", STEP_TIMEOUT, || async {
        let jobs = jobs_of(&jobs_api, "shop-pr-1").await;
        (jobs.len() == 3).then_some(jobs)
    })
    .await;
    let short = &sha[..7];
    let mut names: Vec<_> = jobs.iter().map(ResourceExt::name_any).collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("shop-pr-1-api-amd64-{short}"),
            format!("shop-pr-1-web-amd64-{short}"),
            format!("shop-pr-1-web-arm64-{short}")
        ]
    );
    let registry = stack.registry.addr();
    for job in &jobs {
        assert_eq!(job.spec.commit, sha);
        assert_eq!(job.spec.repository, "acme/shop");
        assert_eq!(job.spec.context, job.spec.service);
        assert_eq!(job.spec.image.as_deref(), Some(format!("{registry}/{ns}/shop/{}", job.spec.service).as_str()));
        assert_eq!(job.labels()[keys::ENVIRONMENT], "shop-pr-1");
        assert_eq!(job.labels()[keys::ARCH], job.spec.platform.arch());
        assert_eq!(job.owner_references()[0].uid, env.uid().unwrap());
    }

    // Fan-in: every build succeeds, and the web images become one index.
    let env = wait_env(&envs, "shop-pr-1", "every build to succeed", BUILD_TIMEOUT, |e| {
        condition(e, "BuildsSucceeded").is_some_and(|c| c.0 == "True") || phase(e) == Some(EnvironmentPhase::Failed)
    })
    .await;
    let built = started.elapsed();
    println!("pipeline_multiarch_seconds_apply_to_built={:.1}", built.as_secs_f64());
    assert_eq!(condition(&env, "BuildsSucceeded").unwrap().0, "True", "{:#?}", env.status);
    let run = env.status.as_ref().unwrap().run.clone().unwrap();
    assert_eq!(run.sha, sha);
    assert!(run.builds.iter().all(|b| b.phase == Some(BuildJobPhase::Succeeded)), "{run:?}");
    let web = run.images["web"].clone();
    let api = run.images["api"].clone();
    assert!(web.starts_with(&format!("{registry}/{ns}/shop/web@sha256:")), "{web}");
    assert!(api.starts_with(&format!("{registry}/{ns}/shop/api@sha256:")), "{api}");

    let repository = format!("{ns}/shop/web");
    let response = registry_get(stack, &repository, &format!("manifests/{sha}"), INDEX).await;
    assert_eq!(response.status(), 200);
    let digest = response.headers()["docker-content-digest"].to_str().unwrap().to_owned();
    assert_eq!(web.split_once('@').unwrap().1, digest, "the run's web image is the index");
    let index: serde_json::Value = response.json().await.unwrap();
    assert_eq!(index["mediaType"], INDEX);
    let manifests = index["manifests"].as_array().unwrap();
    let mut platforms: Vec<_> = manifests
        .iter()
        .map(|m| {
            format!("{}/{}", m["platform"]["os"].as_str().unwrap(), m["platform"]["architecture"].as_str().unwrap())
        })
        .collect();
    platforms.sort();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    for job in jobs.iter().filter(|j| j.spec.service == "web") {
        let job = jobs_api.get(&job.name_any()).await.unwrap();
        let digest = job.status.unwrap().image_digest.unwrap();
        let entry = manifests.iter().find(|m| m["digest"] == digest.as_str()).expect("the job's image is in the index");
        assert_eq!(entry["platform"]["architecture"], job.spec.platform.arch());
    }
    // The arm64 image is a real arm64 image.
    let arm = manifests.iter().find(|m| m["platform"]["architecture"] == "arm64").unwrap();
    let manifest: serde_json::Value =
        registry_get(stack, &repository, &format!("manifests/{}", arm["digest"].as_str().unwrap()), MANIFESTS)
            .await
            .json()
            .await
            .unwrap();
    let config: serde_json::Value =
        registry_get(stack, &repository, &format!("blobs/{}", manifest["config"]["digest"].as_str().unwrap()), "*/*")
            .await
            .json()
            .await
            .unwrap();
    assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("arm64"), Some("linux")));

    // No builder is left, and each BuildJob had exactly one.
    eventually("the builders to go", STEP_TIMEOUT, || async {
        stack::builders(&stack.local_dir(ns)).is_empty().then_some(())
    })
    .await;
    let seen = watch.seen();
    assert_no_builder_left(&stack.local_dir(ns), &seen);
    let uids: std::collections::BTreeSet<_> = jobs.iter().map(|j| j.uid().unwrap()).collect();
    let owners: Vec<_> = seen.iter().filter(|s| s.role == "builder").map(|s| s.owner.clone()).collect();
    assert_eq!(owners.len(), 3, "one builder per BuildJob: {seen:?}");
    assert_eq!(owners.into_iter().collect::<std::collections::BTreeSet<_>>(), uids);
    for job in jobs_of(&jobs_api, "shop-pr-1").await {
        assert_eq!(job.status.unwrap().vm.unwrap().state.as_deref(), Some("terminated"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_build_fails_the_run_with_its_log_tail_and_cancels_the_others() {
    let stack = stack();
    let ns = "failing";
    let repo = stack.dir.path().join("repos").join(ns);
    std::fs::create_dir_all(repo.join("web")).unwrap();
    std::fs::create_dir_all(repo.join("slow")).unwrap();
    std::fs::copy("/bin/busybox", repo.join("slow/busybox")).unwrap();
    std::fs::write(repo.join("web/Dockerfile"), "FROM scratch\nCOPY no-such-file /app\n").unwrap();
    std::fs::write(repo.join("slow/Dockerfile"), slow_dockerfile(300)).unwrap();
    std::fs::write(
        repo.join("stagely.yaml"),
        "version: 2\nbuilds:\n  web:\n    context: web\n  slow:\n    context: slow\n",
    )
    .unwrap();
    agent_support::git(&repo, &["init", "-q", "-b", "main"]);
    let sha = commit(&repo, "broken");
    stack.namespace(ns, &repo, 10).await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client, ns);
    envs.create(&PostParams::default(), &environment("shop-pr-2", 2, &sha)).await.unwrap();

    let env =
        wait_env(&envs, "shop-pr-2", "the run to fail", BUILD_TIMEOUT, |e| phase(e) == Some(EnvironmentPhase::Failed))
            .await;
    let (status, reason, message) = condition(&env, "BuildsSucceeded").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "BuildFailed"));
    let job = format!("shop-pr-2-web-amd64-{}", &sha[..7]);
    assert!(message.starts_with(&format!("build web (linux/amd64) failed in BuildJob {job}:")), "{message}");
    assert!(message.contains("no-such-file"), "the log tail says what went wrong: {message}");

    // The sibling is cancelled and its builder stopped.
    let slow = format!("shop-pr-2-slow-amd64-{}", &sha[..7]);
    let cancelled = eventually("the sibling to be cancelled", STEP_TIMEOUT, || async {
        let job = jobs_api.get(&slow).await.ok()?;
        (job.status.as_ref()?.phase == Some(BuildJobPhase::Failed)).then_some(job)
    })
    .await;
    assert_eq!(cancelled.annotations()[keys::CANCEL], "cancelled: build web (linux/amd64) failed");
    assert!(cancelled.status.unwrap().message.unwrap().starts_with("cancelled"));
    let hash = env.status.as_ref().unwrap().subdomain_hash.clone().unwrap();
    assert_eq!(stack::route(stack, &hash).await.unwrap()["status"], "failed");
    eventually("the builders to go", STEP_TIMEOUT, || async {
        stack::builders(&stack.local_dir(ns)).is_empty().then_some(())
    })
    .await;
    assert_no_builder_left(&stack.local_dir(ns), &watch.seen());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_stagely_yaml_lists_its_fields_builds_nothing_and_a_fixing_commit_proceeds() {
    let stack = stack();
    let ns = "invalid";
    let repo = stack.dir.path().join("repos").join(ns);
    let good = single_repo(&repo, "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n");
    std::fs::write(
        repo.join("stagely.yaml"),
        "version: 3\nbuilds:\n  web:\n    context: \"\"\n    cache_from: [\"\"]\n",
    )
    .unwrap();
    let bad = commit(&repo, "break stagely.yaml");
    stack.namespace(ns, &repo, 10).await;
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client, ns);
    envs.create(&PostParams::default(), &environment("shop-pr-3", 3, &bad)).await.unwrap();

    let env = wait_env(&envs, "shop-pr-3", "ConfigValid=False", STEP_TIMEOUT, |e| {
        condition(e, "ConfigValid").is_some_and(|c| c.0 == "False")
    })
    .await;
    let (_, reason, message) = condition(&env, "ConfigValid").unwrap();
    assert_eq!(reason, "ConfigInvalid", "{message}");
    for field in ["version", "builds.web.context", "builds.web.cache_from[0]"] {
        assert!(message.contains(field), "{field} is named: {message}");
    }
    assert_eq!(phase(&env), Some(EnvironmentPhase::Failed));
    assert!(jobs_of(&jobs_api, "shop-pr-3").await.is_empty(), "nothing is built from an invalid file");

    // A new commit that fixes it proceeds (and `good` is an older commit: any commit works).
    let _ = good;
    std::fs::write(repo.join("stagely.yaml"), "version: 2\nbuilds:\n  web:\n    platform: linux/amd64\n").unwrap();
    let fixed = commit(&repo, "fix stagely.yaml");
    set_head(&envs, "shop-pr-3", &fixed).await;
    let env = wait_env(&envs, "shop-pr-3", "the fixed commit to build", BUILD_TIMEOUT, |e| {
        e.status.as_ref().and_then(|s| s.run.as_ref()).is_some_and(|r| r.sha == fixed)
            && (condition(e, "BuildsSucceeded").is_some_and(|c| c.0 == "True")
                || phase(e) == Some(EnvironmentPhase::Failed))
    })
    .await;
    assert_eq!(condition(&env, "ConfigValid").unwrap().0, "True");
    assert_eq!(condition(&env, "BuildsSucceeded").unwrap().0, "True", "{:#?}", env.status);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_head_sha_mid_build_replaces_the_run_and_its_builders() {
    let stack = stack();
    let ns = "newsha";
    let repo = stack.dir.path().join("repos").join(ns);
    let first = single_repo(&repo, &slow_dockerfile(300));
    stack.namespace(ns, &repo, 10).await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client, ns);
    envs.create(&PostParams::default(), &environment("shop-pr-4", 4, &first)).await.unwrap();
    let old = format!("shop-pr-4-web-amd64-{}", &first[..7]);
    eventually("the first build to run", BUILD_TIMEOUT, || async {
        let job = jobs_api.get(&old).await.ok()?;
        (job.status?.phase == Some(BuildJobPhase::Building)).then_some(())
    })
    .await;

    std::fs::write(repo.join("Dockerfile"), "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n")
        .unwrap();
    let second = commit(&repo, "faster");
    set_head(&envs, "shop-pr-4", &second).await;
    let env = wait_env(&envs, "shop-pr-4", "the new run to build", BUILD_TIMEOUT, |e| {
        e.status.as_ref().and_then(|s| s.run.as_ref()).is_some_and(|r| r.sha == second)
            && (condition(e, "BuildsSucceeded").is_some_and(|c| c.0 == "True")
                || phase(e) == Some(EnvironmentPhase::Failed))
    })
    .await;
    assert_eq!(condition(&env, "BuildsSucceeded").unwrap().0, "True", "{:#?}", env.status);
    let run = env.status.unwrap().run.unwrap();
    assert_eq!(run.builds.len(), 1);
    assert_eq!(
        run.builds[0].build_job,
        format!("shop-pr-4-web-amd64-{}", &second[..7]),
        "nothing of the old run remains"
    );
    eventually("the old BuildJob to go", STEP_TIMEOUT, || async {
        jobs_api.get_opt(&old).await.unwrap().is_none().then_some(())
    })
    .await;
    eventually("the builders to go", STEP_TIMEOUT, || async {
        stack::builders(&stack.local_dir(ns)).is_empty().then_some(())
    })
    .await;
    assert_no_builder_left(&stack.local_dir(ns), &watch.seen());
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_environment_mid_build_leaves_nothing() {
    let stack = stack();
    let ns = "deleted";
    let repo = stack.dir.path().join("repos").join(ns);
    let sha = single_repo(&repo, &slow_dockerfile(300));
    stack.namespace(ns, &repo, 10).await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client, ns);
    envs.create(&PostParams::default(), &environment("shop-pr-5", 5, &sha)).await.unwrap();
    let job = format!("shop-pr-5-web-amd64-{}", &sha[..7]);
    eventually("the build to run", BUILD_TIMEOUT, || async {
        let job = jobs_api.get(&job).await.ok()?;
        (job.status?.phase == Some(BuildJobPhase::Building)).then_some(())
    })
    .await;
    let hash = envs.get("shop-pr-5").await.unwrap().status.unwrap().subdomain_hash.unwrap();
    assert!(stack::route(stack, &hash).await.is_some());

    envs.delete("shop-pr-5", &DeleteParams::default()).await.unwrap();
    eventually("the Environment to go", STEP_TIMEOUT, || async {
        envs.get_opt("shop-pr-5").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(jobs_of(&jobs_api, "shop-pr-5").await.is_empty(), "no BuildJob left");
    assert!(stack::route(stack, &hash).await.is_none(), "no route left");
    stack::assert_nothing_left(&stack.local_dir(ns), &watch.seen());
    assert!(!watch.seen().is_empty(), "the builder was seen while it ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_instances_one_serializes_two_environments_and_both_finish() {
    let stack = stack();
    let ns = "capacity";
    let repo = stack.dir.path().join("repos").join(ns);
    let sha = single_repo(&repo, &slow_dockerfile(3));
    stack.namespace(ns, &repo, 1).await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client, ns);
    envs.create(&PostParams::default(), &environment("shop-pr-6", 6, &sha)).await.unwrap();
    envs.create(&PostParams::default(), &environment("shop-pr-7", 7, &sha)).await.unwrap();

    // One of them waits, and says why.
    let waiting = eventually("a build to wait for an instance", BUILD_TIMEOUT, || async {
        for name in ["shop-pr-6", "shop-pr-7"] {
            let env = envs.get(name).await.ok()?;
            if let Some((_, _, message)) = condition(&env, "BuildsSucceeded")
                && message.contains("waiting for an instance: 1 of 1 in use")
            {
                return Some(message);
            }
        }
        None
    })
    .await;
    assert!(waiting.starts_with("0 of 1 builds done; web (linux/amd64): waiting for an instance"), "{waiting}");
    // The first to build then holds the one instance with its preview VM, for as long as it
    // lives; deleting it lets the other go on.
    let first = eventually("one of them to build", BUILD_TIMEOUT, || async {
        for name in ["shop-pr-6", "shop-pr-7"] {
            let env = envs.get(name).await.ok()?;
            if condition(&env, "BuildsSucceeded").is_some_and(|c| c.0 == "True") {
                return Some(name);
            }
        }
        None
    })
    .await;
    let second = if first == "shop-pr-6" { "shop-pr-7" } else { "shop-pr-6" };
    envs.delete(first, &DeleteParams::default()).await.unwrap();
    let env = wait_env(&envs, second, "the other to build", BUILD_TIMEOUT, |e| {
        condition(e, "BuildsSucceeded").is_some_and(|c| c.0 == "True") || phase(e) == Some(EnvironmentPhase::Failed)
    })
    .await;
    assert_eq!(condition(&env, "BuildsSucceeded").unwrap().0, "True", "{:#?}", env.status);
    assert_eq!(watch.max_running(), 1, "never two VMs at once: {:?}", watch.seen());
    let builders = watch.seen().into_iter().filter(|s| s.role == "builder").count();
    assert_eq!(builders, 2);
    let _ = jobs_api;
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_use_the_registry_with_token_auth_and_leave_per_arch_tags() {
    // Every build above pushed through the token endpoint; here the tags themselves.
    let stack = stack();
    let ns = "tags";
    let repo = stack.dir.path().join("repos").join(ns);
    let sha = single_repo(&repo, "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n");
    stack.namespace(ns, &repo, 10).await;
    let envs: Api<Environment> = Api::namespaced(stack.client().await, ns);
    envs.create(&PostParams::default(), &environment("shop-pr-8", 8, &sha)).await.unwrap();
    let env = wait_env(&envs, "shop-pr-8", "the build", BUILD_TIMEOUT, |e| {
        condition(e, "BuildsSucceeded").is_some_and(|c| c.0 == "True") || phase(e) == Some(EnvironmentPhase::Failed)
    })
    .await;
    assert_eq!(condition(&env, "BuildsSucceeded").unwrap().0, "True", "{:#?}", env.status);
    let repository = format!("{ns}/shop/web");
    let tags: serde_json::Value =
        registry_get(stack, &repository, "tags/list", "application/json").await.json().await.unwrap();
    let tags: Vec<_> = tags["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
    assert!(tags.contains(&format!("{sha}-amd64")), "{tags:?}");
    let image = &env.status.unwrap().run.unwrap().images["web"];
    let response = registry_get(stack, &repository, &format!("manifests/{sha}-amd64"), MANIFESTS).await;
    assert_eq!(response.status(), 200);
    assert_eq!(image.split_once('@').unwrap().1, response.headers()["docker-content-digest"].to_str().unwrap());
    // Without a token the registry refuses.
    let anonymous = reqwest::get(format!("http://{}/v2/{repository}/tags/list", stack.registry.addr())).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let _ = Platform::LinuxAmd64;
}
