//! Previews end to end, everything real: the operator binary, a preview VM that is a real agent
//! process deploying with podman-compose, the Project's secrets from Kubernetes Secrets, routes in
//! redis-server and the edge proxy serving `<hash>.<domain>`, and GitHub feedback to the GitHub
//! fake behind Prism (a Deployment per run and one comment on the pull request). Each test works
//! in a namespace of its own.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/github_fake.rs"]
mod fake;
#[path = "support/prism.rs"]
mod prism;
#[path = "support/stack.rs"]
mod stack;

use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use stack::{
    BUILD_TIMEOUT, EdgeProxy, InstanceWatch, Operator, STEP_TIMEOUT, Stack, condition, environment, jobs_of, phase,
    set_head, wait_env,
};
use stagely_api::v1alpha1::{BuildJob, Environment, EnvironmentPhase};
use stagely_testenv::server::eventually;

const DOMAIN: &str = "preview.example.com";

/// The GitHub fake behind Prism, knowing the Projects' repository `acme/shop`, the token their
/// credentials Secret holds (see `Stack::namespace`), and pull request #1.
fn github() -> &'static (fake::GitHubFake, prism::Prism) {
    static GITHUB: OnceLock<(fake::GitHubFake, prism::Prism)> = OnceLock::new();
    GITHUB.get_or_init(|| {
        let fake = fake::GitHubFake::default();
        fake.add_repo("acme/shop");
        fake.add_personal_token("ghp_not_used_by_the_git_source", "stagely-bot");
        fake.open_pull("acme/shop", fake::Pull::new(1, "feature", &"f".repeat(40)));
        let prism = prism::Prism::start(
            "node_modules/@octokit/openapi/generated/api.github.com.json",
            &prism::serve(fake.router()),
        );
        fake.set_base_url(&prism.url);
        (fake, prism)
    })
}

fn stack() -> (&'static Stack, &'static EdgeProxy) {
    let stack = Stack::shared();
    static OPERATOR: OnceLock<Operator> = OnceLock::new();
    static PROXY: OnceLock<EdgeProxy> = OnceLock::new();
    OPERATOR.get_or_init(|| stack.operator_with_github(&github().1.url));
    (stack, PROXY.get_or_init(|| stack.edge_proxy(DOMAIN)))
}

/// The states of the GitHub Deployments of `sha`, in order, each with its URL.
fn deployment_states(sha: &str) -> Vec<(String, Option<String>)> {
    github()
        .0
        .deployments("acme/shop")
        .into_iter()
        .filter(|d| d.sha == sha)
        .flat_map(|d| d.statuses.into_iter().map(|s| (s.state, s.environment_url)))
        .collect()
}

/// The body of Environment `namespace/name`'s comment on pull request #1, if there is exactly one.
fn comment_of(namespace: &str, name: &str) -> Option<String> {
    let marker = format!("<!-- stagely:preview {namespace}/{name} -->");
    let ours: Vec<_> =
        github().0.comments("acme/shop", 1).into_iter().filter(|c| c.body.starts_with(&marker)).collect();
    (ours.len() == 1).then(|| ours[0].body.clone())
}

/// Waits for the Environment to be Ready or Failed; fails on Failed with its status.
async fn ready(api: &Api<Environment>, name: &str) -> Environment {
    let env = wait_env(api, name, "Ready", BUILD_TIMEOUT, |e| {
        matches!(phase(e), Some(EnvironmentPhase::Ready | EnvironmentPhase::Failed))
    })
    .await;
    assert_eq!(phase(&env), Some(EnvironmentPhase::Ready), "{:#?}", env.status);
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_request_becomes_a_preview_url_then_follows_commits_and_secrets_and_goes_without_a_trace() {
    let (stack, proxy) = stack();
    let ns = "preview";
    let (repo, sha) = stack.web_app_namespace(ns, "hello from a secret").await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let client = stack.client().await;
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    let jobs_api: Api<BuildJob> = Api::namespaced(client.clone(), ns);
    envs.create(&PostParams::default(), &environment("shop-pr-1", 1, &sha)).await.unwrap();

    // Before Ready, the URL shows the Building page.
    let env = wait_env(&envs, "shop-pr-1", "a URL", STEP_TIMEOUT, |e| {
        e.status.as_ref().is_some_and(|s| s.subdomain_hash.is_some())
    })
    .await;
    let hash = env.status.unwrap().subdomain_hash.unwrap();
    let host = format!("{hash}.{DOMAIN}");
    let (code, _, page) = eventually("the Building page", STEP_TIMEOUT, || async {
        proxy.get(&host, "/").filter(|(code, _, _)| *code == 503)
    })
    .await;
    assert_eq!(code, 503);
    assert!(page.contains("Building") || page.contains("building"), "{page}");

    // Ready: the app answers through the proxy, with the X-Stagely headers and the secret.
    let env = ready(&envs, "shop-pr-1").await;
    let status = env.status.clone().unwrap();
    assert_eq!(condition(&env, "Deployed").unwrap().0, "True");
    assert_eq!(condition(&env, "Routed").unwrap().0, "True");
    assert_eq!(condition(&env, "VMReady").unwrap().0, "True");
    let vm = status.vm.clone().unwrap();
    assert_eq!(vm.ip.as_deref(), Some("127.0.0.1"));
    let (code, _, body) = proxy.get(&host, "/").unwrap();
    assert_eq!((code, body.as_str()), (200, "version one\n"));
    let (code, _, body) = proxy.get(&host, "/cgi-bin/env").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body.trim(), "project=shop pr=1 greeting=hello from a secret");
    assert!(status.expires_at.is_some(), "expiresAt is kept for the reaper");

    // GitHub was told: a Deployment in progress then live at the URL, and one comment saying so.
    let url = status.url.clone().unwrap();
    eventually("the Deployment's success", STEP_TIMEOUT, || async {
        let states = deployment_states(&sha);
        (states.last() == Some(&("success".to_owned(), Some(url.clone())))).then_some(())
    })
    .await;
    assert_eq!(deployment_states(&sha)[0].0, "in_progress");
    let comment = eventually("the comment", STEP_TIMEOUT, || async {
        comment_of(ns, "shop-pr-1").filter(|body| body.contains("Preview ready"))
    })
    .await;
    assert!(comment.contains(&url) && comment.contains(&sha[..12]), "{comment}");
    let env = eventually("the GitHubFeedback condition", STEP_TIMEOUT, || async {
        let env = envs.get("shop-pr-1").await.ok()?;
        (condition(&env, "GitHubFeedback")?.0 == "True").then_some(env)
    })
    .await;
    assert_eq!(condition(&env, "Deployed").unwrap().0, "True", "the Environment controller's conditions stay");

    // Redis loses its data (here only the route and the operator's mark, not to disturb the other
    // test's logs): the proxy serves on from its cache, and the operator writes the route back.
    let mut conn = redis::Client::open(stack.redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let lost = std::time::Instant::now();
    redis::cmd("DEL")
        .arg(format!("route:{hash}"))
        .arg(stagely_operator::routes::EPOCH_KEY)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let (code, _, body) = proxy.get(&host, "/").unwrap();
    assert_eq!((code, body.as_str()), (200, "version one\n"), "served from the proxy's cache");
    let restored =
        eventually("the route written back", STEP_TIMEOUT, || async { stack::route(stack, &hash).await }).await;
    eprintln!("e2e_route_restored_ms={}", lost.elapsed().as_millis());
    assert_eq!(restored["status"], "ready", "{restored}");

    // A new commit is served from the same preview VM.
    std::fs::write(repo.join("www/index.html"), "version two\n").unwrap();
    let second = stack::commit(&repo, "version two");
    set_head(&envs, "shop-pr-1", &second).await;
    let deadline = std::time::Instant::now() + BUILD_TIMEOUT;
    loop {
        let answer = proxy.get(&host, "/");
        if answer.as_ref().is_some_and(|(code, _, body)| *code == 200 && body == "version two\n") {
            break;
        }
        if std::time::Instant::now() > deadline {
            let env = envs.get("shop-pr-1").await.unwrap();
            panic!(
                "the new version was not served: {answer:?}\nroute: {:?}\nstatus: {:#?}",
                stack::route(stack, &hash).await,
                env.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let env = ready(&envs, "shop-pr-1").await;
    assert_eq!(env.status.as_ref().unwrap().vm.as_ref().unwrap().provider_id, vm.provider_id, "the same preview VM");

    // A changed Secret is deployed without a build.
    let jobs_before: Vec<_> = jobs_of(&jobs_api, "shop-pr-1").await.iter().map(ResourceExt::name_any).collect();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for i in 0..5 {
        let patch = serde_json::json!({"stringData": {"GREETING": format!("edit {i}")}});
        secrets.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    eventually("the new secret value", BUILD_TIMEOUT, || async {
        proxy.get(&host, "/cgi-bin/env").filter(|(_, _, body)| body.trim().ends_with("greeting=edit 4"))
    })
    .await;
    let jobs_after: Vec<_> = jobs_of(&jobs_api, "shop-pr-1").await.iter().map(ResourceExt::name_any).collect();
    assert_eq!(jobs_after, jobs_before, "no BuildJob for a Secret change");
    // The preview agent got three DEPLOYs: the first commit, the second, the settled secrets.
    let received = stack::instances(&stack.local_dir(ns))
        .into_iter()
        .filter(|i| i.role == "preview")
        .map(|i| {
            let log = std::fs::read_to_string(stack.local_dir(ns).join("local").join(&i.instance).join("agent.log"));
            log.unwrap().lines().filter(|l| l.contains("command received") && l.contains("DEPLOY")).count()
        })
        .sum::<usize>();
    assert_eq!(received, 3, "five quick Secret edits make one redeploy");

    // Deleted: 404 at once, and nothing left.
    envs.delete("shop-pr-1", &DeleteParams::default()).await.unwrap();
    eventually("the Environment to go", STEP_TIMEOUT, || async {
        envs.get_opt("shop-pr-1").await.unwrap().is_none().then_some(())
    })
    .await;
    let (code, _, _) = proxy.get(&host, "/").unwrap();
    assert_eq!(code, 404);
    assert!(jobs_of(&jobs_api, "shop-pr-1").await.is_empty(), "no BuildJob left");
    assert_eq!(
        deployment_states(&second).last().map(|s| s.0.as_str()),
        Some("inactive"),
        "{:?}",
        deployment_states(&second)
    );
    let comment = comment_of(ns, "shop-pr-1").expect("still one comment");
    assert!(comment.contains("Preview torn down"), "{comment}");
    stack::assert_nothing_left(&stack.local_dir(ns), &watch.seen());
    let containers = stack.podman.run(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(!containers.contains("shop-pr-1"), "containers left: {containers}");
    for tag in [format!("{sha}-amd64"), format!("{second}-amd64")] {
        assert_eq!(stack::registry_status(stack, &format!("{ns}/shop/web"), &tag).await, 404, "tag {tag} left");
    }
}

/// Pushes a busybox image for test commands to the registry as `<registry>/tools/tester:1`,
/// with a push credential the operator's key signs.
fn push_tester(stack: &Stack) -> String {
    use stagely_operator::registry::{Registry, SigningKey, TokenIssuer};
    let dir = stack.dir.path().join("tester");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .unwrap();
    let key = SigningKey::from_pem(
        &std::fs::read(stack.dir.path().join("registry-token.key")).unwrap(),
        &std::fs::read(stack.dir.path().join("registry-token.crt")).unwrap(),
    )
    .unwrap();
    let registry = Registry::new(
        stack.registry.addr(),
        stack.registry.url(),
        Some(TokenIssuer::new(key, "stagely", "stagely-registry")),
    );
    let auth = registry.push_credential("tools/tester", Duration::from_secs(600)).unwrap().unwrap();
    let image = format!("{}/tools/tester:1", stack.registry.addr());
    let podman = &stack.podman;
    podman.run(&["build", "-q", "--layers=false", "-t", &image, dir.to_str().unwrap()]);
    let mut login = podman.command();
    login.args(["login", "--tls-verify=false", "-u", &auth.username, "--password-stdin", &auth.server]);
    login.stdin(std::process::Stdio::piped());
    let mut child = login.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), auth.password.expose().as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "podman login to the test registry");
    podman.run(&["push", "-q", "--tls-verify=false", &image]);
    image
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_test_stage_leaves_the_preview_up_and_a_service_that_exits_fails_naming_it() {
    let (stack, proxy) = stack();
    let ns = "stages";
    let (repo, _) = stack.web_app_namespace(ns, "hi").await;
    let tester = push_tester(stack);
    std::fs::write(
        repo.join("stagely.yaml"),
        format!(
            "version: 2\nbuilds:\n  web:\n    platform: linux/amd64\ntest:\n  image: {tester}\n  commands:\n    - \"wget -q -O- $STAGELY_PREVIEW_URL | grep -q 'version one'\"\n    - \"wget -q -O- $STAGELY_PREVIEW_URL | grep -q 'version nine'\"\n"
        ),
    )
    .unwrap();
    let sha = stack::commit(&repo, "tests");
    let envs: Api<Environment> = Api::namespaced(stack.client().await, ns);
    envs.create(&PostParams::default(), &environment("shop-pr-2", 2, &sha)).await.unwrap();

    let env = wait_env(&envs, "shop-pr-2", "the test stage to end", BUILD_TIMEOUT, |e| {
        condition(e, "Tested").is_some_and(|c| c.1 != "Running" && c.1 != "Waiting")
            || phase(e) == Some(EnvironmentPhase::Failed)
    })
    .await;
    let (status, reason, message) = condition(&env, "Tested").unwrap_or_else(|| panic!("{:#?}", env.status));
    assert_eq!((status.as_str(), reason.as_str()), ("False", "TestFailed"), "{message}");
    assert!(message.contains("test command 2"), "the failing command is named: {message}");
    assert!(message.contains("version nine"), "{message}");
    assert_eq!(phase(&env), Some(EnvironmentPhase::Ready), "a failing test leaves the preview up");
    let hash = env.status.as_ref().unwrap().subdomain_hash.clone().unwrap();
    let (code, _, body) = proxy.get(&format!("{hash}.{DOMAIN}"), "/").unwrap();
    assert_eq!((code, body.as_str()), (200, "version one\n"));

    // A commit whose service exits: the deployment fails naming it, with its log tail.
    std::fs::write(
        repo.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\nCMD [\"sh\", \"-c\", \"echo the app gave up; exit 3\"]\n",
    )
    .unwrap();
    let broken = stack::commit(&repo, "crash");
    set_head(&envs, "shop-pr-2", &broken).await;
    let env = wait_env(&envs, "shop-pr-2", "the deployment to fail", BUILD_TIMEOUT, |e| {
        e.status.as_ref().and_then(|s| s.deployment.as_ref()).is_some_and(|d| d.commit == broken)
            && phase(e) == Some(EnvironmentPhase::Failed)
    })
    .await;
    let (status, reason, message) = condition(&env, "Deployed").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "DeployFailed"), "{message}");
    assert!(message.contains("web"), "the service is named: {message}");
    assert!(message.contains("the app gave up"), "its log tail is there: {message}");
    envs.delete("shop-pr-2", &DeleteParams::default()).await.unwrap();
}
