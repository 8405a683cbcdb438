//! The executor against what it must not trust or wait for forever: repositories whose paths
//! lead out of the clone (symlinked build contexts, Dockerfiles and compose directories, a
//! symlink where the override goes, service names and secret paths that climb out), engines
//! that hang (DEPLOY and TERMINATE run out of time, TERMINATE cancels a hung job instead of
//! waiting behind it) and output with a line far longer than a frame.
//!
//! The container engine here is a stand-in script on `PATH` (`podman`, `podman-compose`) that
//! records each call and then fails, hangs or prints a huge line: what is tested is that the
//! agent refuses before running the engine, or stops waiting for it. git is real.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stagely_agent::config::AgentConfig;
use stagely_agent::executor::{Context, Executor, LINE_MAX};
use stagely_agent::outbox::Outbox;
use stagely_api::protocol::{
    Build, Deploy, GLOBAL_SCOPE, JobState, Lifecycle, Message, SecretKind, SecretValue, Status, Terminate, TestRun,
};
use stagely_api::v1alpha1::Platform;

/// What the stand-in engine does after recording its call.
#[derive(Clone, Copy)]
enum Engine {
    /// Exits 1.
    Fail,
    /// Never exits.
    Hang,
    /// Prints a 3,000,000-byte line, then `after`, and exits 1.
    LongLine,
}

/// A test's directory, stand-in engine, executor and the messages it sent.
struct Fixture {
    dir: tempfile::TempDir,
    executor: Executor,
    outbox: Outbox,
    sent: Vec<Message>,
}

impl Fixture {
    fn new(engine: Engine, extra: &[(&str, &str)]) -> Self {
        for tool in ["git", "sh", "sleep", "head", "tr"] {
            let found = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .unwrap()
                .status
                .success();
            assert!(found, "{tool} is not installed: run scripts/install-deps.sh (make deps)");
        }
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let behaviour = match engine {
            Engine::Fail => "exit 1",
            Engine::Hang => "exec sleep 600",
            Engine::LongLine => "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo after; exit 1",
        };
        for name in ["podman", "podman-compose"] {
            let script = format!("#!/bin/sh\necho \"$(basename \"$0\") $*\" >> \"$FAKE_ENGINE_CALLS\"\n{behaviour}\n");
            std::fs::write(bin.join(name), script).unwrap();
            std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut env = support::agent_env(&dir.path().join("work"));
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let config = Arc::new(AgentConfig::load_with(None, &env).unwrap());
        let outbox = Outbox::default();
        let mut ctx = Context::new(config, outbox.clone());
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        ctx.env.push(("PATH".to_owned(), path));
        ctx.env.push(("FAKE_ENGINE_CALLS".to_owned(), dir.path().join("calls").to_string_lossy().into_owned()));
        Self { dir, executor: Executor::new(ctx), outbox, sent: Vec::new() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The engine's calls so far, one a line.
    fn engine_calls(&self) -> String {
        std::fs::read_to_string(self.path("calls")).unwrap_or_default()
    }

    /// Takes `message` and waits (up to a minute) for its job's final status.
    async fn run(&mut self, message: Message) -> Status {
        let job_id = message.job_id().unwrap().to_owned();
        let _task = self.executor.handle(message).expect("a new job starts");
        self.finished(&job_id).await
    }

    /// Waits (up to a minute) for `job_id`'s final status.
    async fn finished(&mut self, job_id: &str) -> Status {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            self.sent.extend(std::iter::from_fn(|| self.outbox.try_recv()));
            if let Some(status) = self.executor.status(job_id).filter(|s| s.state.is_final()) {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "job {job_id} did not finish within a minute");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A git repository at `dir` with `files` and `links` (path → target) committed; its commit.
fn repository(dir: &Path, files: &[(&str, &str)], links: &[(&str, &Path)]) -> String {
    for (path, contents) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
    for (path, target) in links {
        std::os::unix::fs::symlink(target, dir.join(path)).unwrap();
    }
    support::git(dir, &["init", "-q", "-b", "main"]);
    support::git(dir, &["add", "-A"]);
    support::git(dir, &["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "hostile"]);
    support::git(dir, &["rev-parse", "HEAD"]).trim().to_owned()
}

fn build(job_id: &str, repo: &Path, commit: &str, context: &str, dockerfile: &str) -> Message {
    Message::Build(Build {
        job_id: job_id.into(),
        clone_url: format!("file://{}", repo.display()),
        git_token: None,
        commit: commit.into(),
        context: context.into(),
        dockerfile: dockerfile.into(),
        platform: Platform::LinuxAmd64,
        build_args: BTreeMap::new(),
        cache_from: Vec::new(),
        cache_to: None,
        image: "127.0.0.1:5000/shop/web:1".into(),
        registry_auth: None,
        timeout_seconds: 600,
    })
}

fn deploy(job_id: &str, repo: &Path, commit: &str, compose_file: &str, secrets: Vec<SecretValue>) -> Message {
    Message::Deploy(Deploy {
        job_id: job_id.into(),
        project: "shop-pr-1".into(),
        clone_url: format!("file://{}", repo.display()),
        git_token: None,
        commit: commit.into(),
        compose_file: compose_file.into(),
        images: BTreeMap::new(),
        secrets,
        lifecycle: Lifecycle::default(),
        registry_auth: None,
    })
}

/// A TEST whose one command never gets to run (the image's pull comes first).
fn test_job(job_id: &str, timeout_seconds: u64) -> Message {
    Message::Test(TestRun {
        job_id: job_id.into(),
        image: "127.0.0.1:5000/shop/e2e:1".into(),
        commands: vec!["true".into()],
        preview_url: "http://127.0.0.1:1".into(),
        timeout_seconds,
        registry_auth: None,
    })
}

fn secret(key: &str, kind: SecretKind, path: Option<&str>) -> SecretValue {
    SecretValue {
        key: key.into(),
        value: "s3cret-value-for-tests".into(),
        scope: GLOBAL_SCOPE.into(),
        kind,
        path: path.map(str::to_owned),
        mode: None,
    }
}

fn message(status: &Status) -> &str {
    status.message.as_deref().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_context_or_dockerfile_that_leads_out_of_the_clone_is_refused_before_the_engine_runs() {
    let mut fixture = Fixture::new(Engine::Fail, &[]);
    let outside = fixture.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("Dockerfile"), "FROM scratch\n").unwrap();
    let repo = fixture.path("repo");
    let commit = repository(
        &repo,
        &[("Dockerfile", "FROM scratch\n"), ("app/Dockerfile", "FROM scratch\n")],
        &[
            ("context", outside.as_path()),
            ("Dockerfile.outside", outside.join("Dockerfile").as_path()),
            ("app/up", Path::new("..")),
        ],
    );

    for (job, context, dockerfile) in
        [("b-1", "context", "Dockerfile"), ("b-2", ".", "Dockerfile.outside"), ("b-3", "app/up/context", "Dockerfile")]
    {
        let status = fixture.run(build(job, &repo, &commit, context, dockerfile)).await;
        assert_eq!(status.state, JobState::Failed, "{status:?}");
        assert!(message(&status).contains("leads outside the repository"), "{job}: {status:?}");
    }
    assert_eq!(fixture.engine_calls(), "", "the engine never ran");

    // A context inside the clone through an inner symlink is fine: the build goes on.
    let status = fixture.run(build("b-4", &repo, &commit, "app/up/app", "Dockerfile")).await;
    assert!(fixture.engine_calls().starts_with("podman build"), "{status:?}: {}", fixture.engine_calls());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_writes_nothing_where_the_repository_points_it() {
    let mut fixture = Fixture::new(Engine::Fail, &[]);
    let outside = fixture.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let victim = outside.join("victim");
    std::fs::write(&victim, "untouched\n").unwrap();
    std::fs::write(outside.join("docker-compose.yml"), "services:\n  web:\n    image: x\n").unwrap();
    let compose = "services:\n  web:\n    image: x\n";
    let repo = fixture.path("repo");
    let commit = repository(
        &repo,
        &[
            ("docker-compose.yml", compose),
            ("climb/docker-compose.yml", "services:\n  ../../../escape:\n    image: x\n"),
        ],
        &[("docker-compose.stagely.yml", victim.as_path()), ("linked", outside.as_path())],
    );

    // The override's name holds a symlink to a file outside: it is replaced, not written through.
    let status = fixture.run(deploy("d-1", &repo, &commit, "docker-compose.yml", vec![])).await;
    assert!(message(&status).contains("pull the images"), "it got as far as the engine: {status:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
    let written = fixture.path("work/deploy/shop-pr-1/src/docker-compose.stagely.yml");
    assert!(!std::fs::symlink_metadata(&written).unwrap().is_symlink(), "the override is a file of its own");

    // A compose file in a directory that is a symlink out of the clone.
    let status = fixture.run(deploy("d-2", &repo, &commit, "linked/docker-compose.yml", vec![])).await;
    assert_eq!(status.state, JobState::Failed);
    assert!(message(&status).contains("leads outside the repository"), "{status:?}");
    assert!(!outside.join("docker-compose.stagely.yml").exists(), "nothing is written outside");

    // A service name that would climb out of the secrets directory.
    let env = secret("TOKEN", SecretKind::Env, None);
    let status = fixture.run(deploy("d-3", &repo, &commit, "climb/docker-compose.yml", vec![env])).await;
    assert_eq!(status.state, JobState::Failed);
    assert!(message(&status).contains("compose service `../../../escape` must be a plain name"), "{status:?}");
    let escaped: Vec<_> = walk(fixture.dir.path()).into_iter().filter(|p| p.ends_with("escape.env")).collect();
    assert!(escaped.is_empty(), "{escaped:?}");

    // File secret directories that would add volume options or are not plain paths.
    for (job, path) in [("d-4", "/run/secrets,rw"), ("d-5", "/run/sec rets"), ("d-6", "/run//x/./y")] {
        let file = secret("key.pem", SecretKind::File, Some(path));
        let status = fixture.run(deploy(job, &repo, &commit, "docker-compose.yml", vec![file])).await;
        assert_eq!(status.state, JobState::Failed);
        assert!(message(&status).contains("must be an absolute path of plain names"), "{path}: {status:?}");
    }
    let calls = fixture.engine_calls();
    assert_eq!(calls.lines().count(), 1, "only the first deploy reached the engine:\n{calls}");
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_engine_times_deploy_and_terminate_out_and_terminate_cancels_a_hung_job() {
    let timeouts = [("STAGELY_DEPLOY_TIMEOUT_SECONDS", "2"), ("STAGELY_TERMINATE_TIMEOUT_SECONDS", "2")];
    let mut fixture = Fixture::new(Engine::Hang, &timeouts);
    let repo = fixture.path("repo");
    let commit = repository(&repo, &[("docker-compose.yml", "services:\n  web:\n    image: x\n")], &[]);

    // DEPLOY hangs in `pull`, with its secrets written: it runs out of time.
    let env = secret("TOKEN", SecretKind::Env, None);
    let status = fixture.run(deploy("d-1", &repo, &commit, "docker-compose.yml", vec![env])).await;
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(message(&status), "timed out after 2 seconds");
    let secrets = fixture.path("work/deploy/shop-pr-1/secrets");
    assert!(secrets.exists(), "the deployment's secrets were written");

    // A TEST with an hour to go hangs pulling its image; TERMINATE does not wait behind it.
    let test = test_job("test-1", 3600);
    let _hung = fixture.executor.handle(test).expect("a new job starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !fixture.engine_calls().contains("podman pull") {
        assert!(tokio::time::Instant::now() < deadline, "the TEST never reached its pull");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let terminate = Terminate { job_id: "t-1".into(), reason: "pr_closed".into(), grace_period_seconds: 0 };
    let status = fixture.run(Message::Terminate(terminate)).await;
    // Its `down` hangs too: out of time, but the secrets are gone regardless.
    assert_eq!((status.state, message(&status)), (JobState::Failed, "timed out after 2 seconds"), "{status:?}");
    assert!(!secrets.exists(), "TERMINATE removes the secrets even when the engine hangs");
    let cancelled = fixture.finished("test-1").await;
    assert_eq!(cancelled.state, JobState::Failed);
    assert!(message(&cancelled).starts_with("cancelled: TERMINATE t-1"), "{cancelled:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_longer_than_a_frame_is_cut_with_a_marker_and_the_next_lines_still_come() {
    let mut fixture = Fixture::new(Engine::LongLine, &[]);
    let test = test_job("test-1", 600);
    let status = fixture.run(test).await;
    assert_eq!(status.state, JobState::Failed);
    let lines: Vec<String> = fixture
        .sent
        .iter()
        .filter_map(|m| match m {
            Message::Log(log) if log.job_id == "test-1" => Some(log.data.clone()),
            _ => None,
        })
        .collect();
    for message in &fixture.sent {
        let frame = serde_json::to_string(message).unwrap();
        assert!(frame.len() < 2 * LINE_MAX, "a frame of {} bytes", frame.len());
    }
    let cut = lines.iter().find(|l| l.starts_with("xxxx")).expect("the long line is sent");
    assert!(cut.ends_with(" [… line cut: it had 3000000 bytes]"), "a line of {} bytes", cut.len());
    assert!(lines.iter().any(|l| l == "after"), "the line after it is sent too: {lines:?}");
}
