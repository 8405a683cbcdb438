//! BUILD, DEPLOY, TERMINATE and TEST through the executor, for real, once on each engine the
//! agent drives (podman with podman-compose; Docker with the compose plugin, as production VMs
//! run it): a `FROM scratch` image built from a local git repository at a commit, pushed to the
//! distribution registry, run with compose, served over HTTP, and torn down; two previews of one
//! compose file on one host with ephemeral host ports, tested by commands in a busybox image; and
//! deployments that fail, named by their service. Each test is `podman::<name>` and
//! `docker::<name>`.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use stagely_agent::config::AgentConfig;
use stagely_agent::executor::{Context, Executor};
use stagely_agent::outbox::Outbox;
use stagely_api::protocol::{
    Build, Deploy, GLOBAL_SCOPE, Hook, JobState, Lifecycle, Message, RegistryAuth, SecretKind, SecretValue, Status,
    Terminate, TestRun,
};
use stagely_api::v1alpha1::Platform;
use stagely_testenv::registry::Registry;
use support::{Engine, app_repo, build_and_push, busybox_context, commit_file, free_port, http_get, wait_for};

/// Each test below, as `podman::<test>` and `docker::<test>`.
macro_rules! on_each_engine {
    ($($test:ident),* $(,)?) => {
        mod podman {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(super::Engine::podman).await;
                }
            )*
        }
        mod docker {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(super::Engine::docker).await;
                }
            )*
        }
    };
}

on_each_engine!(
    build_push_deploy_serve_and_terminate,
    two_previews_of_one_compose_file_share_the_host_on_ephemeral_ports_and_are_tested,
    a_service_that_exits_and_a_failing_hook_fail_the_deploy_by_name_with_their_output,
);

/// Starts a test's engine with its files in a directory.
type Start = fn(&std::path::Path) -> Engine;

const GIT_TOKEN: &str = "ghs_git-token-value-1234";
const GLOBAL_SECRET: &str = "global-secret-value-5678";
const WEB_SECRET: &str = "web-only-secret-value-9012";
const FILE_SECRET: &str = "-----BEGIN KEY-----\nfile-secret-line-3456\n-----END KEY-----\n";
/// An environment secret that an env file could garble: it must reach the container as is,
/// nothing in it interpolated or unquoted.
const QUOTED_SECRET: &str = r#"p@ss $HOME ${APP_TOKEN} $$ 'single' "double" back\slash \n \\ #not-a-comment trailing\"#;

fn executor(work: &std::path::Path, engine: &Engine) -> (Executor, Outbox) {
    executor_with(work, engine, &[])
}

/// An executor as an agent on `engine` configured with `extra` environment variables would have.
fn executor_with(work: &std::path::Path, engine: &Engine, extra: &[(&str, &str)]) -> (Executor, Outbox) {
    let mut env = engine.agent_env(work);
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let config = Arc::new(AgentConfig::load_with(None, &env).unwrap());
    let messages = Outbox::default();
    let mut ctx = Context::new(config, messages.clone());
    ctx.env.extend(engine.env().iter().cloned());
    (Executor::new(ctx), messages)
}

fn drain(messages: &mut Outbox, into: &mut Vec<Message>) {
    while let Some(message) = messages.try_recv() {
        into.push(message);
    }
}

fn final_status(messages: &[Message], job_id: &str) -> Status {
    messages
        .iter()
        .rev()
        .find_map(|m| match m {
            Message::Status(s) if s.job_id == job_id && s.state.is_final() => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no final status for {job_id}"))
}

fn logs(messages: &[Message], job_id: &str) -> String {
    messages
        .iter()
        .filter_map(|m| match m {
            Message::Log(l) if l.job_id == job_id => Some(format!("[{:?}] {}\n", l.stream, l.data)),
            _ => None,
        })
        .collect()
}

async fn build_push_deploy_serve_and_terminate(start: Start) {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path());
    let registry = Registry::start().expect("the registry starts (testenv/build.sh builds it)");
    let port = free_port();
    let repo = dir.path().join("repo");
    let commit = app_repo(&repo, port);
    // A later commit, so the agent must check out the one it is asked for.
    std::fs::write(repo.join("www/index.html"), "not this commit\n").unwrap();
    support::git(&repo, &["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "later"]);
    let work = dir.path().join("work");
    let (executor, mut outbox) = executor(&work, &engine);
    let mut messages = Vec::new();

    // BUILD
    let image = format!("{}/shop/web:pr-1", registry.addr());
    let build = Build {
        job_id: "build-1".into(),
        clone_url: format!("file://{}", repo.display()),
        git_token: Some(GIT_TOKEN.into()),
        commit: commit.clone(),
        context: ".".into(),
        dockerfile: "Dockerfile".into(),
        platform: Platform::LinuxAmd64,
        build_args: BTreeMap::from([("UNUSED".into(), "1".into())]),
        cache_from: Vec::new(),
        cache_to: None,
        image: image.clone(),
        registry_auth: None,
        timeout_seconds: 600,
    };
    let task = executor.handle(Message::Build(build.clone())).expect("a new job starts");
    task.await.unwrap();
    drain(&mut outbox, &mut messages);
    let status = final_status(&messages, "build-1");
    assert_eq!(status.state, JobState::Succeeded, "{status:?}\n{}", logs(&messages, "build-1"));
    let digest = status.image_digest.clone().unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    // The digest reported is the one the registry serves for the tag pushed.
    assert_eq!(registry.manifest_digest("shop/web", "pr-1").as_deref(), Some(digest.as_str()));
    assert_eq!(registry.get_status(&format!("/v2/shop/web/manifests/{digest}")), Some(200));

    // The same BUILD again: not run twice, its status re-reported.
    assert!(executor.handle(Message::Build(build)).is_none(), "a known job id must not run again");
    drain(&mut outbox, &mut messages);
    let Some(Message::Status(resent)) = messages.last() else { panic!("the known job's status is re-reported") };
    assert_eq!((resent.job_id.as_str(), resent.state), ("build-1", JobState::Succeeded));

    // Only the registry has the image now: DEPLOY must pull it.
    engine.run(&["rmi", "-f", &image]);

    // DEPLOY
    let pinned = format!("{}/shop/web@{digest}", registry.addr());
    let deploy = Deploy {
        job_id: "deploy-1".into(),
        project: "shop-pr-1".into(),
        clone_url: repo.to_string_lossy().into_owned(),
        git_token: None,
        commit: commit.clone(),
        compose_file: "docker-compose.yml".into(),
        images: BTreeMap::from([("web".into(), pinned.clone()), ("worker".into(), pinned.clone())]),
        secrets: vec![
            SecretValue {
                key: "APP_TOKEN".into(),
                value: GLOBAL_SECRET.into(),
                scope: GLOBAL_SCOPE.into(),
                kind: SecretKind::Env,
                path: None,
                mode: None,
            },
            SecretValue {
                key: "QUOTED".into(),
                value: QUOTED_SECRET.into(),
                scope: GLOBAL_SCOPE.into(),
                kind: SecretKind::Env,
                path: None,
                mode: None,
            },
            SecretValue {
                key: "WEB_ONLY".into(),
                value: WEB_SECRET.into(),
                scope: "web".into(),
                kind: SecretKind::Env,
                path: None,
                mode: None,
            },
            SecretValue {
                key: "key.pem".into(),
                value: FILE_SECRET.into(),
                scope: "web".into(),
                kind: SecretKind::File,
                path: Some("/run/secrets".into()),
                mode: Some(0o440),
            },
        ],
        lifecycle: Lifecycle {
            on_start: vec![Hook {
                service: "web".into(),
                command: "echo \"hook sees $APP_TOKEN\"; echo hook-ran > /www/hook.txt".into(),
            }],
        },
        registry_auth: None,
    };
    executor.handle(Message::Deploy(deploy)).expect("a new job starts").await.unwrap();
    drain(&mut outbox, &mut messages);
    let status = final_status(&messages, "deploy-1");
    assert_eq!(status.state, JobState::Succeeded, "{status:?}\n{}", logs(&messages, "deploy-1"));
    let web = status.services.iter().find(|s| s.name == "web").expect("web is reported");
    assert_eq!(web.state, "running");
    assert_eq!(web.ports.len(), 1, "{web:?}");
    assert_eq!((web.ports[0].container_port, web.ports[0].published_port), (8080, port));
    assert!(status.services.iter().any(|s| s.name == "worker" && s.state == "running"), "{status:?}");

    // The app answers, from the requested commit, and the hook ran in its container.
    let (code, body) = wait_for("the app to answer", Duration::from_secs(30), || http_get(port, "/"));
    assert_eq!((code, body.as_str()), (200, "hello from stagely\n"));
    assert_eq!(http_get(port, "/hook.txt").map(|(_, b)| b), Some("hook-ran\n".into()));

    // The secrets are in the containers, scoped, with their modes.
    let container = |service: &str| {
        engine
            .run(&[
                "ps",
                "-q",
                "--filter",
                "label=com.docker.compose.project=shop-pr-1",
                "--filter",
                &format!("label=com.docker.compose.service={service}"),
            ])
            .trim()
            .to_owned()
    };
    let (web_id, worker_id) = (container("web"), container("worker"));
    let in_web = engine.run(&[
        "exec",
        &web_id,
        "sh",
        "-c",
        "echo \"$APP_TOKEN|$WEB_ONLY\"; stat -c %a /run/secrets/key.pem; cat /run/secrets/key.pem",
    ]);
    assert_eq!(in_web, format!("{GLOBAL_SECRET}|{WEB_SECRET}\n440\n{FILE_SECRET}"));
    assert_eq!(engine.run(&["exec", &web_id, "sh", "-c", "printf %s \"$QUOTED\""]), QUOTED_SECRET);
    let in_worker =
        engine.run(&["exec", &worker_id, "sh", "-c", "echo \"$APP_TOKEN|$WEB_ONLY\"; ls /run/secrets 2>&1 || true"]);
    assert!(in_worker.starts_with(&format!("{GLOBAL_SECRET}|\n")), "{in_worker}");
    assert!(!in_worker.contains("key.pem"), "{in_worker}");

    // Secret files on the VM: 0700 directory; none of the values in the compose override.
    let project_dir = work.join("deploy/shop-pr-1");
    let secrets_dir = project_dir.join("secrets");
    assert_eq!(std::fs::metadata(&secrets_dir).unwrap().permissions().mode() & 0o777, 0o700);
    let override_yaml = std::fs::read_to_string(project_dir.join("src/docker-compose.stagely.yml")).unwrap();
    for secret in [GLOBAL_SECRET, WEB_SECRET, "file-secret-line-3456"] {
        assert!(!override_yaml.contains(secret), "{override_yaml}");
    }

    // TERMINATE
    let terminate = Terminate { job_id: "terminate-1".into(), reason: "pr_closed".into(), grace_period_seconds: 1 };
    executor.handle(Message::Terminate(terminate)).expect("a new job starts").await.unwrap();
    drain(&mut outbox, &mut messages);
    let status = final_status(&messages, "terminate-1");
    assert_eq!(status.state, JobState::Succeeded, "{status:?}\n{}", logs(&messages, "terminate-1"));
    let left = engine.run(&["ps", "-a", "-q", "--filter", "label=com.docker.compose.project=shop-pr-1"]);
    assert_eq!(left.trim(), "", "containers are left after TERMINATE");
    assert!(!secrets_dir.exists() && !project_dir.exists(), "secret files are left after TERMINATE");

    // No LOG line carries a secret, and the hook's echo of one was masked.
    let all_logs: String = ["build-1", "deploy-1", "terminate-1"].iter().map(|job| logs(&messages, job)).collect();
    for secret in [GIT_TOKEN, GLOBAL_SECRET, WEB_SECRET, QUOTED_SECRET, "file-secret-line-3456"] {
        assert!(!all_logs.contains(secret), "a LOG line leaks {secret}:\n{all_logs}");
    }
    assert!(all_logs.contains("hook sees ***"), "{all_logs}");
    let built = format!("{} build --platform linux/amd64", engine.program());
    assert!(all_logs.contains(&built), "commands are logged:\n{all_logs}");
}

/// Runs `message` on `executor` to its end and returns the messages it sent.
async fn run_job(executor: &Executor, outbox: &mut Outbox, message: Message) -> (Status, Vec<Message>) {
    let job_id = message.job_id().unwrap().to_owned();
    executor.handle(message).expect("a new job starts").await.unwrap();
    let mut messages = Vec::new();
    drain(outbox, &mut messages);
    (final_status(&messages, &job_id), messages)
}

fn deploy_of(job_id: &str, project: &str, repo: &std::path::Path, commit: &str, image: &str) -> Deploy {
    Deploy {
        job_id: job_id.into(),
        project: project.into(),
        clone_url: format!("file://{}", repo.display()),
        git_token: None,
        commit: commit.into(),
        compose_file: "docker-compose.yml".into(),
        images: BTreeMap::from([("web".into(), image.into()), ("worker".into(), image.into())]),
        secrets: Vec::new(),
        lifecycle: Lifecycle::default(),
        registry_auth: None,
    }
}

fn test_run(job_id: &str, image: &str, commands: &[&str], preview_url: &str, timeout_seconds: u64) -> TestRun {
    TestRun {
        job_id: job_id.into(),
        image: image.into(),
        commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        preview_url: preview_url.into(),
        timeout_seconds,
        registry_auth: None,
    }
}

async fn two_previews_of_one_compose_file_share_the_host_on_ephemeral_ports_and_are_tested(start: Start) {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path());
    let registry = Registry::start().expect("the registry starts (testenv/build.sh builds it)");
    // The compose file publishes web on this fixed port, which something else holds: only an
    // ephemeral port lets either preview start.
    let fixed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fixed_port = fixed.local_addr().unwrap().port();
    let repo = dir.path().join("repo");
    let commit = app_repo(&repo, fixed_port);
    let app = format!("{}/shop/web:1", registry.addr());
    build_and_push(&engine, &repo, &app);
    let e2e = format!("{}/shop/e2e:1", registry.addr());
    build_and_push(&engine, &busybox_context(&dir.path().join("e2e")), &e2e);
    engine.run(&["rmi", "-f", &app, &e2e]);

    // Two agents on one host, as the local provider runs them, deploying at the same time.
    let ephemeral = [("STAGELY_EPHEMERAL_PORTS", "1")];
    let (first, mut first_outbox) = executor_with(&dir.path().join("work-1"), &engine, &ephemeral);
    let (second, mut second_outbox) = executor_with(&dir.path().join("work-2"), &engine, &ephemeral);
    let ((one, one_messages), (two, two_messages)) = tokio::join!(
        run_job(&first, &mut first_outbox, Message::Deploy(deploy_of("deploy-1", "preview-a", &repo, &commit, &app))),
        run_job(&second, &mut second_outbox, Message::Deploy(deploy_of("deploy-2", "preview-b", &repo, &commit, &app))),
    );
    assert_eq!(one.state, JobState::Succeeded, "{one:?}\n{}", logs(&one_messages, "deploy-1"));
    assert_eq!(two.state, JobState::Succeeded, "{two:?}\n{}", logs(&two_messages, "deploy-2"));
    let web_port = |status: &Status| {
        let web = status.services.iter().find(|s| s.name == "web").expect("web is reported");
        assert_eq!(web.ports.len(), 1, "{web:?}");
        assert_eq!(web.ports[0].container_port, 8080, "{web:?}");
        web.ports[0].published_port
    };
    let (port_1, port_2) = (web_port(&one), web_port(&two));
    assert!(port_1 != fixed_port && port_2 != fixed_port && port_1 != port_2, "{port_1} {port_2} {fixed_port}");
    for port in [port_1, port_2] {
        let (code, body) = wait_for("a preview to answer", Duration::from_secs(30), || http_get(port, "/"));
        assert_eq!((code, body.as_str()), (200, "hello from stagely\n"), "port {port}");
    }
    drop(fixed);

    // TEST against the first preview: every command passes; the registry login's password
    // never shows.
    let url = format!("http://127.0.0.1:{port_1}");
    let mut passing = test_run(
        "test-1",
        &e2e,
        &["wget -q -O- $STAGELY_PREVIEW_URL", "wget -q -O- $STAGELY_PREVIEW_URL/index.html | grep -q stagely"],
        &url,
        120,
    );
    let password = "e2e-pull-password-4821";
    passing.registry_auth =
        Some(RegistryAuth { server: registry.addr(), username: "pull".into(), password: password.into() });
    let (status, messages) = run_job(&first, &mut first_outbox, Message::Test(passing)).await;
    let log = logs(&messages, "test-1");
    assert_eq!(status.state, JobState::Succeeded, "{status:?}\n{log}");
    assert_eq!(status.message.as_deref(), Some("2 test commands passed"));
    assert!(log.contains("hello from stagely"), "the command's output is streamed:\n{log}");
    assert!(log.contains("--network host") && log.contains(&format!("STAGELY_PREVIEW_URL={url}")), "{log}");
    assert!(!log.contains(password), "{log}");

    // The second command fails: the job fails, naming it, with its output's last lines; the
    // third never runs.
    let failing = test_run(
        "test-2",
        &e2e,
        &[
            "echo checking $STAGELY_PREVIEW_URL",
            "echo fetching; wget -q -O- $STAGELY_PREVIEW_URL/missing.html",
            "touch /never",
        ],
        &url,
        120,
    );
    let (status, messages) = run_job(&first, &mut first_outbox, Message::Test(failing)).await;
    let message = status.message.clone().unwrap_or_default();
    assert_eq!(status.state, JobState::Failed, "{status:?}\n{}", logs(&messages, "test-2"));
    assert_eq!(status.exit_code, Some(1));
    let (headline, tail) = message.split_once('\n').unwrap_or_default();
    assert_eq!(
        headline,
        "test command 2 `echo fetching; wget -q -O- $STAGELY_PREVIEW_URL/missing.html` failed with exit code 1; \
         the last 2 lines of its output:"
    );
    // Standard output and error are read apart, so their lines may come in either order.
    let mut tail: Vec<&str> = tail.lines().collect();
    tail.sort_unstable();
    assert_eq!(tail, ["fetching", "wget: server returned error: HTTP/1.1 404 Not Found"], "{message}");
    assert!(!logs(&messages, "test-2").contains("touch /never\n"), "the third command must not run");

    // Out of time: the running command's container is killed and removed.
    let slow = test_run("test-3", &e2e, &["echo started; sleep 300"], &url, 5);
    let (status, messages) = run_job(&first, &mut first_outbox, Message::Test(slow)).await;
    assert_eq!(status.state, JobState::Failed, "{status:?}\n{}", logs(&messages, "test-3"));
    assert_eq!(
        status.message.as_deref(),
        Some("timed out after 5 seconds while test command 1 `echo started; sleep 300` ran; it was killed")
    );
    let left = engine.run(&["ps", "-a", "-q", "--filter", "name=stagely-test-test-3"]);
    assert_eq!(left.trim(), "", "the killed test's container is left");

    // The same TEST again is answered with its status, not run again.
    let again = test_run("test-3", &e2e, &["true"], &url, 5);
    assert!(first.handle(Message::Test(again)).is_none(), "a known job id must not run again");
}

async fn a_service_that_exits_and_a_failing_hook_fail_the_deploy_by_name_with_their_output(start: Start) {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path());
    let registry = Registry::start().expect("the registry starts (testenv/build.sh builds it)");
    let repo = dir.path().join("repo");
    app_repo(&repo, free_port());
    let image = format!("{}/shop/web:1", registry.addr());
    build_and_push(&engine, &repo, &image);
    let work = dir.path().join("work");
    let (executor, mut outbox) = executor_with(&work, &engine, &[("STAGELY_EPHEMERAL_PORTS", "1")]);

    // `worker` exits at once; `web` is fine.
    let crashing = commit_file(
        &repo,
        "docker-compose.yml",
        "services:\n  web:\n    build: .\n    ports: [\"8080\"]\n  worker:\n    build: .\n    \
         entrypoint: [\"/bin/busybox\", \"sh\", \"-c\"]\n    \
         command: [\"echo reading /etc/worker.toml; echo 'worker.toml: no such file' >&2; exit 3\"]\n",
    );
    let deploy = deploy_of("deploy-crash", "crash", &repo, &crashing, &image);
    let (status, messages) = run_job(&executor, &mut outbox, Message::Deploy(deploy)).await;
    let message = status.message.clone().unwrap_or_default();
    assert_eq!(status.state, JobState::Failed, "{status:?}\n{}", logs(&messages, "deploy-crash"));
    assert_eq!(status.exit_code, Some(3));
    let (headline, tail) = message.split_once('\n').unwrap_or_default();
    assert_eq!(headline, "service `worker` exited with code 3; the last 2 lines of its log:", "{message}");
    // The engine's log keeps the order it read the two outputs in, which may not be the order written.
    let mut tail: Vec<&str> = tail.lines().collect();
    tail.sort_unstable();
    assert_eq!(tail, ["reading /etc/worker.toml", "worker.toml: no such file"], "{message}");
    assert!(logs(&messages, "deploy-crash").contains("worker.toml: no such file"), "the tail is in the job's log");

    // Everything starts, and the on_start hook fails.
    let fine = commit_file(
        &repo,
        "docker-compose.yml",
        "services:\n  web:\n    build: .\n    ports: [\"8080\"]\n  worker:\n    build: .\n",
    );
    let mut deploy = deploy_of("deploy-hook", "hook", &repo, &fine, &image);
    let hook = "echo migrating; echo 'relation \"users\" does not exist' >&2; exit 4";
    deploy.lifecycle.on_start = vec![Hook { service: "web".into(), command: hook.into() }];
    let (status, messages) = run_job(&executor, &mut outbox, Message::Deploy(deploy)).await;
    assert_eq!(status.state, JobState::Failed, "{status:?}\n{}", logs(&messages, "deploy-hook"));
    assert_eq!(status.exit_code, Some(4));
    let message = status.message.clone().unwrap_or_default();
    let (headline, tail) = message.split_once('\n').unwrap_or_default();
    assert_eq!(
        headline,
        "on_start hook `echo migrating; echo 'relation \"users\" does not exist' >&2; exit 4` in service `web` \
         failed with exit code 4; the last 2 lines of its output:"
    );
    let mut tail: Vec<&str> = tail.lines().collect();
    tail.sort_unstable();
    assert_eq!(tail, ["migrating", "relation \"users\" does not exist"], "{message}");
}
