//! The operator's GitHub client, its contents-API source, its feedback controller and its resync,
//! against the stateful GitHub fake behind Prism (which checks every request and answer against
//! GitHub's OpenAPI description, `@octokit/openapi`), and testenv's real apiserver for the
//! Kubernetes side.

#[path = "support/github_fake.rs"]
mod fake;
#[path = "support/logs.rs"]
mod logs;
#[path = "support/prism.rs"]
mod prism;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fake::{Fault, GitHubFake, Pull, RateSubject};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use prism::Prism;
use serde_json::json;
use stagely_api::v1alpha1::{Environment, GITHUB_FEEDBACK_CONDITION, Project};
use stagely_operator::controllers::{feedback, resync};
use stagely_operator::github::{
    Credentials, DeploymentState, FileAnswer, GitHub, GitHubError, GitHubMetrics, Repository,
};
use stagely_operator::source::{ConfigLoader, ConfigProblem, GitHubRepo, Repo, RepositorySource, SourceError};
use stagely_testenv::{ControlPlane, Options};

const APP_ID: u64 = 5151;
const SPEC: &str = "node_modules/@octokit/openapi/generated/api.github.com.json";
const STEP: Duration = Duration::from_secs(60);

struct Stack {
    fake: GitHubFake,
    prism: Prism,
    /// The App's private key, PEM (PKCS#1, as GitHub gives it).
    key: String,
}

fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let (key, public) = fake::rsa_key_pair();
        let fake = GitHubFake::default();
        fake.set_app(APP_ID, "stagely", &public);
        let direct = prism::serve(fake.router());
        let prism = Prism::start(SPEC, &direct);
        fake.set_base_url(&prism.url);
        Stack { fake, prism, key }
    })
}

fn plane() -> &'static ControlPlane {
    stagely_testenv::shared(|| Options { crds: stagely_api::crds(), ..Options::default() })
}

fn github() -> GitHub {
    GitHub::new(&stack().prism.url, GitHubMetrics::default())
}

fn credentials(data: &[(&str, &str)]) -> Credentials {
    let data = data.iter().map(|(k, v)| ((*k).to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec()))).collect();
    Credentials::from_secret_data(&data).unwrap().expect("credentials")
}

/// An App installation on `repos`, and its credentials.
fn app(installation: u64, repos: &[&str]) -> Credentials {
    stack().fake.add_installation(installation, repos);
    credentials(&[
        ("appId", &APP_ID.to_string()),
        ("installationId", &installation.to_string()),
        ("privateKey", &stack().key),
    ])
}

/// A personal token reaching every repository, and its credentials.
fn token(value: &str) -> Credentials {
    stack().fake.add_personal_token(value, "octocat");
    credentials(&[("token", value)])
}

fn sha(c: char) -> String {
    c.to_string().repeat(40)
}

async fn namespace(client: &Client, name: &str) {
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
}

async fn secret(client: &Client, namespace: &str, name: &str, data: &[(&str, &str)]) {
    let secret = Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        string_data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), namespace).create(&PostParams::default(), &secret).await.unwrap();
}

async fn project(client: &Client, namespace: &str, repository: &str, trigger: serde_json::Value) -> Project {
    let project: Project = serde_json::from_value(json!({
        "apiVersion": "stagely.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": "shop", "namespace": namespace},
        "spec": {
            "repository": repository, "cloudProviderRef": {"name": "cloud"}, "previewDomain": "preview.example.com",
            "github": {"credentialsSecretRef": {"name": "gh"}}, "trigger": trigger,
        },
    }))
    .unwrap();
    Api::<Project>::namespaced(client.clone(), namespace).create(&PostParams::default(), &project).await.unwrap()
}

/// Polls `check` until it returns `Some`, failing after [`STEP`].
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_installation_token_is_minted_once_reused_and_minted_again_when_github_refuses_it() {
    let fake = &stack().fake;
    fake.add_repo("acme/tokens");
    let credentials = app(101, &["acme/tokens"]);
    let github = github();
    for _ in 0..3 {
        assert!(github.can_read(&credentials, Repository("acme/tokens")).await.unwrap());
    }
    assert_eq!(fake.tokens_minted(101), 1, "one token for three calls");
    // Revoked on GitHub's side: the next call is refused, a new token is minted, and it goes through.
    fake.expire_tokens(101);
    assert!(github.can_read(&credentials, Repository("acme/tokens")).await.unwrap());
    assert_eq!(fake.tokens_minted(101), 2);
    // A token with less than ten minutes left is not used for new work.
    fake.set_token_lifetime(101, Duration::from_secs(300));
    fake.expire_tokens(101);
    github.can_read(&credentials, Repository("acme/tokens")).await.unwrap();
    github.can_read(&credentials, Repository("acme/tokens")).await.unwrap();
    assert_eq!(fake.tokens_minted(101), 4, "a short-lived token is renewed on each use");
}

#[tokio::test]
async fn refused_credentials_and_an_unreachable_repository_are_told_apart() {
    let fake = &stack().fake;
    fake.add_repo("acme/private-one");
    fake.set_private("acme/private-one", true);
    let github = github();
    let refused = credentials(&[("token", "ghp_never_registered")]);
    let err = github.can_read(&refused, Repository("acme/private-one")).await.unwrap_err();
    assert!(matches!(&err, GitHubError::Unauthorized { message, .. } if message == "Bad credentials"), "{err:?}");
    assert_eq!(err.reason(), "GitHubCredentialsRejected");
    assert!(!err.to_string().contains("ghp_never_registered"), "the token is never in a message: {err}");
    // An installation on another repository: GitHub hides the private one from it.
    let elsewhere = app(102, &["acme/tokens"]);
    assert!(!github.can_read(&elsewhere, Repository("acme/private-one")).await.unwrap());
}

#[tokio::test]
async fn a_clone_token_reaches_one_repository_with_contents_read_only() {
    let fake = &stack().fake;
    fake.add_repo("acme/clone-me");
    fake.add_repo("acme/other");
    let credentials = app(103, &["acme/clone-me", "acme/other"]);
    let (minted_token, expires) = github().clone_token(&credentials, Repository("acme/clone-me")).await.unwrap();
    assert!(expires.is_some(), "an installation token expires");
    let minted =
        fake.minted_tokens().into_iter().find(|m| m.token == minted_token.expose()).expect("minted by the fake");
    assert_eq!(minted.repositories.as_deref(), Some(&["acme/clone-me".to_owned()][..]));
    assert_eq!(minted.permissions, BTreeMap::from([("contents".to_owned(), "read".to_owned())]));
    // A personal token is handed over as it is.
    let personal = token("ghp_clone_personal");
    let (handed, expires) = github().clone_token(&personal, Repository("acme/clone-me")).await.unwrap();
    assert_eq!((handed.expose(), expires), ("ghp_clone_personal", None));
}

#[tokio::test]
async fn stagely_yaml_is_read_through_the_contents_api_with_the_projects_credentials() {
    logs::capture();
    let fake = &stack().fake;
    fake.add_repo("acme/contents");
    fake.set_private("acme/contents", true);
    fake.add_file("acme/contents", &sha('c'), "stagely.yaml", "version: 2\nbuilds:\n  web:\n    context: .\n");
    fake.add_file("acme/contents", &sha('d'), "stagely.yaml/readme", "a directory, not a file");
    fake.add_file("acme/contents", &sha('e'), "README.md", "no config here");
    fake.add_installation(104, &["acme/contents"]);
    let client = plane().client().await.unwrap();
    namespace(&client, "gh-contents").await;
    let key = stack().key.clone();
    secret(
        &client,
        "gh-contents",
        "gh",
        &[("appId", &APP_ID.to_string()), ("installationId", "104"), ("privateKey", &key), ("webhookSecret", "w")],
    )
    .await;

    /// The git fallback must not be used for a repository on GitHub with credentials.
    struct NoGit;
    impl RepositorySource for NoGit {
        fn read_file<'a>(
            &'a self,
            repo: &'a Repo,
            _: &'a str,
            _: &'a str,
            _: u64,
        ) -> stagely_operator::source::BoxFuture<'a, Result<Vec<u8>, SourceError>> {
            Box::pin(async move {
                Err(SourceError::Unreachable { url: repo.clone_url.clone(), detail: "git was used".into() })
            })
        }
    }
    let source = stagely_operator::source::github::GitHubSource::new(
        Arc::new(github()),
        client.clone(),
        Arc::new(NoGit),
        Duration::from_secs(30),
    );
    let loader = ConfigLoader::new(Arc::new(source));
    let repo = Repo {
        clone_url: "https://github.com/acme/contents.git".into(),
        token: None,
        github: Some(GitHubRepo {
            repository: "acme/contents".into(),
            namespace: "gh-contents".into(),
            secret: "gh".into(),
        }),
    };
    let config = loader.load(&repo, &sha('c')).await.expect("read through the contents API");
    assert!(config.builds.contains_key("web"), "{config:?}");
    assert!(matches!(loader.load(&repo, &sha('d')).await, Err(ConfigProblem::NotAFile { kind: "directory", .. })));
    assert!(matches!(loader.load(&repo, &sha('e')).await, Err(ConfigProblem::FileNotFound { .. })));
    assert!(matches!(loader.load(&repo, &sha('f')).await, Err(ConfigProblem::CommitNotFound { .. })));
    // A repository the App is not installed on: GitHub's 404 looks like a missing file, but it is
    // not the commit's problem for good.
    fake.add_repo("acme/not-installed");
    fake.add_file("acme/not-installed", &sha('c'), "stagely.yaml", "version: 2\nbuilds:\n  web:\n    context: .\n");
    let elsewhere = Repo {
        clone_url: "https://github.com/acme/not-installed.git".into(),
        github: Some(GitHubRepo { repository: "acme/not-installed".into(), ..repo.github.clone().unwrap() }),
        ..repo.clone()
    };
    let problem = loader.load(&elsewhere, &sha('c')).await.unwrap_err();
    assert!(
        matches!(&problem, ConfigProblem::Unreachable { detail, .. } if detail.contains("installed")),
        "{problem:?}"
    );
    assert!(!problem.is_permanent(), "{problem}");
    // GitHub down: a transient problem, tried again on the next load.
    fake.fail_next("GET", "/repos/acme/contents/contents", 1, Fault::BadGateway);
    let repo_g = Repo { clone_url: "https://github.com/acme/contents.git#g".into(), ..repo.clone() };
    fake.add_file("acme/contents", &sha('a'), "stagely.yaml", "version: 2\nbuilds:\n  api:\n    context: .\n");
    let problem = loader.load(&repo_g, &sha('a')).await.unwrap_err();
    assert!(!problem.is_permanent(), "{problem}");
    assert!(loader.load(&repo_g, &sha('a')).await.is_ok());
    assert!(fake.tokens_minted(104) >= 1);
    let logs = logs::text();
    let minted = fake.minted_tokens().into_iter().filter(|m| m.installation == 104).map(|m| m.token);
    for secret in minted.chain(["PRIVATE KEY".to_owned()]) {
        assert!(!logs.contains(&secret), "a credential is in the logs");
    }
}

#[tokio::test]
async fn open_pull_requests_come_page_by_page_and_a_second_look_costs_no_rate_limit() {
    let fake = &stack().fake;
    fake.add_repo("acme/many");
    for number in 1..=150 {
        fake.open_pull("acme/many", Pull::new(number, &format!("b{number}"), &sha('a')));
    }
    let credentials = token("ghp_many");
    fake.set_rate_limit(RateSubject::Token("ghp_many".into()), 5000, 5000);
    let github = github();
    let first = github.open_pull_requests(&credentials, Repository("acme/many")).await.unwrap();
    assert_eq!(first.len(), 150);
    let spent = 5000 - fake.rate_remaining(&RateSubject::Token("ghp_many".into()));
    assert_eq!(spent, 2, "two pages of 100");
    let second = github.open_pull_requests(&credentials, Repository("acme/many")).await.unwrap();
    assert_eq!(second, first);
    assert_eq!(5000 - fake.rate_remaining(&RateSubject::Token("ghp_many".into())), 2, "304s are free");
    fake.close_pull("acme/many", 150);
    let third = github.open_pull_requests(&credentials, Repository("acme/many")).await.unwrap();
    assert_eq!(third.len(), 149, "a change is seen");
}

#[tokio::test]
async fn an_error_an_html_page_or_an_empty_page_is_never_an_empty_list() {
    let fake = &stack().fake;
    fake.add_repo("acme/faulty");
    for number in 1..=120 {
        fake.open_pull("acme/faulty", Pull::new(number, "f", &sha('b')));
    }
    let credentials = token("ghp_faulty");
    let github = github();
    for fault in [Fault::ServerError, Fault::BadGateway, Fault::EmptyPage] {
        fake.fail_next("GET", "/repos/acme/faulty/pulls", 1, fault.clone());
        let err = github.open_pull_requests(&credentials, Repository("acme/faulty")).await.unwrap_err();
        assert_eq!(err.reason(), "GitHubUnavailable", "{fault:?}: {err}");
    }
    assert_eq!(github.open_pull_requests(&credentials, Repository("acme/faulty")).await.unwrap().len(), 120);
}

#[tokio::test]
async fn an_exhausted_rate_limit_stops_calls_and_a_short_secondary_limit_is_waited_out() {
    let fake = &stack().fake;
    fake.add_repo("acme/limited");
    let credentials = token("ghp_limited");
    let github = github();
    fake.fail_next("GET", "/repos/acme/limited", 1, Fault::SecondaryRateLimit { retry_after: 1 });
    assert!(github.can_read(&credentials, Repository("acme/limited")).await.unwrap(), "waited out, then answered");

    fake.set_rate_limit(RateSubject::Token("ghp_limited".into()), 60, 0);
    let err = github.can_read(&credentials, Repository("acme/limited")).await.unwrap_err();
    assert!(matches!(err, GitHubError::RateLimited { .. }), "{err:?}");
    assert!(err.retry_after().is_some());
    let calls = fake.count("GET", "/repos/acme/limited");
    let err = github.can_read(&credentials, Repository("acme/limited")).await.unwrap_err();
    assert!(matches!(err, GitHubError::RateLimited { .. }), "{err:?}");
    assert_eq!(fake.count("GET", "/repos/acme/limited"), calls, "refused without asking GitHub until the reset");
}

/// Starts the feedback controller once, in-process, against the shared control plane and the fake.
async fn feedback_controller() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let (started, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let client = plane().client().await.expect("client");
                let ctx = Arc::new(feedback::Context::new(client, Arc::new(github())));
                started.send(()).unwrap();
                feedback::run(ctx, std::future::pending()).await;
            });
        });
        ready.recv().expect("the controller starts");
    });
}

/// Sets an Environment's status as the Environment controller would (another field manager).
async fn set_status(api: &Api<Environment>, name: &str, status: serde_json::Value) {
    let patch = json!({"apiVersion": "stagely.dev/v1alpha1", "kind": "Environment", "status": status});
    api.patch_status(name, &PatchParams::apply("stagely-operator").force(), &Patch::Apply(&patch)).await.unwrap();
}

fn run_status(phase: &str, sha: &str, conditions: serde_json::Value) -> serde_json::Value {
    json!({
        "phase": phase,
        "url": "https://k3xz9q2m.preview.example.com",
        "run": {"sha": sha, "builds": [{"buildJob": "b", "service": "web", "platform": "linux/amd64",
            "phase": if phase == "Building" { "Building" } else { "Succeeded" },
            "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:42Z"}]},
        "conditions": conditions,
    })
}

#[tokio::test]
async fn a_runs_deployment_and_its_one_comment_follow_it_through_success_failure_and_teardown() {
    logs::capture();
    let fake = &stack().fake;
    let repo = "acme/feedback";
    fake.add_repo(repo);
    fake.open_pull(repo, Pull::new(7, "feature", &sha('a')));
    fake.add_personal_token("ghp_feedback", "stagely-bot");
    let client = plane().client().await.unwrap();
    namespace(&client, "gh-feedback").await;
    secret(&client, "gh-feedback", "gh", &[("token", "ghp_feedback"), ("webhookSecret", "w")]).await;
    project(&client, "gh-feedback", repo, json!({})).await;
    feedback_controller().await;

    let api: Api<Environment> = Api::namespaced(client.clone(), "gh-feedback");
    let pr = stagely_api::v1alpha1::PullRequest {
        number: 7,
        head_sha: sha('a'),
        head_ref: "feature".into(),
        base_ref: "main".into(),
        author: None,
        url: None,
    };
    let env =
        stagely_api::pull_request::environment("gh-feedback", "shop", &pr, "d-1", k8s_openapi::jiff::Timestamp::now());
    let name = env.metadata.name.clone().unwrap();
    api.create(&PostParams::default(), &env).await.unwrap();
    set_status(&api, &name, run_status("Building", &sha('a'), json!([]))).await;

    let comment_says = |text: &'static str| {
        move || async move {
            let comments = stack().fake.comments("acme/feedback", 7);
            (comments.len() == 1 && comments[0].body.contains(text)).then(|| comments[0].clone())
        }
    };
    let building = eventually("a comment saying it builds", comment_says("Building the preview")).await;
    let deployments = fake.deployments(repo);
    assert_eq!(deployments.len(), 1);
    let first = &deployments[0];
    assert_eq!((first.sha.as_str(), first.environment.as_str()), (sha('a').as_str(), "preview/pr-7"));
    assert_eq!((first.transient_environment, first.production_environment), (Some(true), Some(false)));

    set_status(&api, &name, run_status("Ready", &sha('a'), json!([]))).await;
    let ready = eventually("the comment to say ready", comment_says("Preview ready")).await;
    assert_eq!(ready.id, building.id, "edited in place");
    assert!(
        ready.body.contains("https://k3xz9q2m.preview.example.com") && ready.body.contains("42s"),
        "{}",
        ready.body
    );
    let states =
        |deployment: &fake::Deployment| deployment.statuses.iter().map(|s| s.state.clone()).collect::<Vec<_>>();
    let deployment = eventually("success", || async {
        let deployments = stack().fake.deployments("acme/feedback");
        (states(&deployments[0]) == ["in_progress", "success"]).then(|| deployments[0].clone())
    })
    .await;
    assert_eq!(deployment.statuses[1].environment_url.as_deref(), Some("https://k3xz9q2m.preview.example.com"));
    let condition = eventually("the GitHubFeedback condition", || async {
        let env = Api::<Environment>::namespaced(plane().client().await.unwrap(), "gh-feedback")
            .get("shop-pr-7")
            .await
            .ok()?;
        let status = env.status?;
        status.conditions.into_iter().find(|c| c.type_ == GITHUB_FEEDBACK_CONDITION && c.status == "True")
    })
    .await;
    assert_eq!(condition.reason, "Reported");

    // A user deletes the comment; GitHub breaks for a while: the condition says so, nothing else waits.
    let direct = reqwest::Client::new();
    let deleted = direct
        .delete(format!("{}/repos/acme/feedback/issues/comments/{}", stack().prism.url, ready.id))
        .bearer_auth("ghp_feedback")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    // The next run's Deployment was created just before a crash lost its id: it is taken up.
    let credentials = credentials(&[("token", "ghp_feedback")]);
    github()
        .create_deployment(&credentials, Repository(repo), &sha('b'), "preview/pr-7", "Stagely preview")
        .await
        .unwrap();
    fake.fail_next("POST", "/repos/acme/feedback/deployments", 2, Fault::ServerError);
    let failed_conditions = json!([{"type": "BuildsSucceeded", "status": "False", "reason": "BuildFailed",
        "message": "build web (linux/amd64) failed: exit status 1", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
    set_status(&api, &name, run_status("Failed", &sha('b'), failed_conditions)).await;
    eventually("the condition to report GitHub's failure", || async {
        let env = Api::<Environment>::namespaced(plane().client().await.unwrap(), "gh-feedback")
            .get("shop-pr-7")
            .await
            .ok()?;
        env.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == GITHUB_FEEDBACK_CONDITION && c.reason == "GitHubUnavailable")
    })
    .await;
    let failed = eventually("a new comment saying it failed", comment_says("Preview failed")).await;
    assert_ne!(failed.id, ready.id, "the deleted comment was recreated");
    assert!(failed.body.contains("BuildsSucceeded: build web (linux/amd64) failed: exit status 1"), "{}", failed.body);
    let second = eventually("the second run's failure", || async {
        let deployments = stack().fake.deployments("acme/feedback");
        // Straight to failure: the run had failed by the time GitHub answered; two Deployments,
        // not three (the one created before the "crash" was taken up).
        (deployments.len() == 2 && states(&deployments[1]) == ["failure"]).then(|| deployments[1].clone())
    })
    .await;
    assert_eq!(second.sha, sha('b'));

    // Teardown: the deployment goes inactive, the comment says so, then the Environment goes.
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    eventually("the comment to say torn down", comment_says("Preview torn down")).await;
    eventually("the Environment to go", || async { api.get_opt(&name).await.unwrap().is_none().then_some(()) }).await;
    let deployments = fake.deployments(repo);
    assert_eq!(states(&deployments[1]), ["failure", "inactive"]);
    assert_eq!(fake.comments(repo, 7).len(), 1, "one comment, always");
    assert!(!logs::text().contains("ghp_feedback"), "the token is in no log line");
}

#[tokio::test]
async fn resync_creates_moves_and_deletes_only_what_github_confirms() {
    logs::capture();
    let fake = &stack().fake;
    let repo = "acme/resync";
    fake.add_repo(repo);
    fake.open_pull(repo, Pull::new(1, "one", &sha('1')));
    fake.open_pull(repo, Pull { draft: true, ..Pull::new(2, "two", &sha('2')) });
    fake.open_pull(repo, Pull { head_repo: Some("mallory/resync".into()), ..Pull::new(3, "fork", &sha('3')) });
    fake.open_pull(repo, Pull::new(4, "four", &sha('4')));
    fake.add_personal_token("ghp_resync", "stagely-bot");
    let client = plane().client().await.unwrap();
    namespace(&client, "gh-resync").await;
    secret(&client, "gh-resync", "gh", &[("token", "ghp_resync"), ("webhookSecret", "w")]).await;
    let project = project(&client, "gh-resync", repo, json!({"drafts": false})).await;
    let github = github();
    let api: Api<Environment> = Api::namespaced(client.clone(), "gh-resync");
    let numbers = || async {
        let mut numbers: Vec<(i64, String)> = api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            // Deleted is deletion requested: the GitHub feedback's finalizer may hold it a moment.
            .filter(|env| env.metadata.deletion_timestamp.is_none())
            .map(|env| (env.spec.pull_request.number, env.spec.pull_request.head_sha))
            .collect();
        numbers.sort();
        numbers
    };

    // A failing list changes nothing.
    for fault in [Fault::ServerError, Fault::BadGateway] {
        fake.fail_next("GET", "/repos/acme/resync/pulls", 1, fault);
        assert!(resync::resync_project(&client, &github, &project).await.is_err());
        assert_eq!(numbers().await, []);
    }
    let summary = resync::resync_project(&client, &github, &project).await.unwrap();
    assert_eq!(summary.created, 2, "the draft and the fork are not previewed: {summary:?}");
    assert_eq!(numbers().await, [(1, sha('1')), (4, sha('4'))]);

    // A new commit and a closed pull request whose webhooks were lost.
    fake.push_pull(repo, 1, &sha('5'));
    fake.close_pull(repo, 4);
    // GitHub cannot confirm the close (an error on the pull request itself): kept.
    fake.fail_next("GET", "/repos/acme/resync/pulls/4", 1, Fault::ServerError);
    let summary = resync::resync_project(&client, &github, &project).await.unwrap();
    assert_eq!((summary.updated, summary.deleted, summary.unconfirmed), (1, 0, 1), "{summary:?}");
    assert_eq!(numbers().await, [(1, sha('5')), (4, sha('4'))]);
    let summary = resync::resync_project(&client, &github, &project).await.unwrap();
    assert_eq!(summary.deleted, 1, "{summary:?}");
    assert_eq!(numbers().await, [(1, sha('5'))]);
    let project = Api::<Project>::namespaced(client.clone(), "gh-resync").get("shop").await.unwrap();
    let recorded = project.metadata.annotations.clone().unwrap_or_default();
    assert!(
        recorded.contains_key(&stagely_api::keys::pull_request_removed(4)),
        "the removal is recorded: {recorded:?}"
    );

    // A webhook told of a newer state than the list shows: the resync does not roll it back.
    let mut newer = api.get("shop-pr-1").await.unwrap();
    newer.metadata.annotations.get_or_insert_default().insert(
        stagely_api::keys::GITHUB_UPDATED_AT.into(),
        (k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(1)).to_string(),
    );
    newer.spec.pull_request.head_sha = sha('6');
    api.replace("shop-pr-1", &PostParams::default(), &newer).await.unwrap();
    resync::resync_project(&client, &github, &project).await.unwrap();
    assert_eq!(numbers().await, [(1, sha('6'))]);
}

#[tokio::test]
async fn deployment_states_and_comments_are_written_as_github_documents_them() {
    let fake = &stack().fake;
    let repo = "acme/calls";
    fake.add_repo(repo);
    fake.open_pull(repo, Pull::new(9, "nine", &sha('9')));
    let credentials = token("ghp_calls");
    let github = github();
    let id = github
        .create_deployment(&credentials, Repository(repo), &sha('9'), "preview/pr-9", "Stagely preview")
        .await
        .unwrap();
    for state in [DeploymentState::InProgress, DeploymentState::Success, DeploymentState::Inactive] {
        let url = (state == DeploymentState::Success).then_some("https://x.preview.example.com");
        assert!(
            github
                .create_deployment_status(&credentials, Repository(repo), id, state, url, &"d".repeat(200))
                .await
                .unwrap()
        );
    }
    assert!(
        !github
            .create_deployment_status(&credentials, Repository(repo), 999_999, DeploymentState::Success, None, "x")
            .await
            .unwrap()
    );
    let comment = github.create_comment(&credentials, Repository(repo), 9, "hello").await.unwrap();
    assert!(github.update_comment(&credentials, Repository(repo), comment, "hello again").await.unwrap());
    assert_eq!(
        github.comments(&credentials, Repository(repo), 9).await.unwrap()[0].body.as_deref(),
        Some("hello again")
    );
    assert!(!github.update_comment(&credentials, Repository(repo), 999_999, "x").await.unwrap(), "a deleted comment");
    assert!(matches!(
        github.file(&credentials, Repository(repo), &sha('9'), "stagely.yaml", 10).await,
        Ok(FileAnswer::CommitNotFound | FileAnswer::FileNotFound)
    ));
}

#[tokio::test]
async fn a_projects_ready_says_whether_github_accepts_its_credentials_for_its_repository() {
    use stagely_operator::controllers::project;
    logs::capture();
    let fake = &stack().fake;
    fake.add_repo("acme/checked");
    fake.add_repo("acme/elsewhere");
    fake.set_private("acme/checked", true);
    fake.add_installation(105, &["acme/elsewhere"]);
    fake.add_personal_token("ghp_checked", "octocat");
    let client = plane().client().await.unwrap();
    std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = plane().client().await.expect("client");
            let ctx = project::Context::new(client, stagely_operator::metrics::Metrics::default())
                .with_github(Some(Arc::new(github())));
            project::run(Arc::new(ctx), std::future::pending()).await;
        });
    });
    let key = stack().key.clone();
    let cases = [
        (
            "gh-check-ok",
            vec![("token", "ghp_checked")],
            "True",
            "ReferencesFound",
            "GitHub accepts the credentials for acme/checked",
        ),
        (
            "gh-check-401",
            vec![("token", "ghp_revoked")],
            "False",
            "GitHubCredentialsRejected",
            "GitHub refused the credentials in Secret gh-check-401/gh (Bad credentials)",
        ),
        (
            "gh-check-404",
            vec![("appId", "5151"), ("installationId", "105"), ("privateKey", key.as_str())],
            "False",
            "GitHubRepositoryNotAccessible",
            "GitHub shows the credentials in Secret gh-check-404/gh no repository acme/checked",
        ),
    ];
    for (ns, keys, status, reason, message) in cases {
        namespace(&client, ns).await;
        let mut keys = keys.clone();
        keys.push(("webhookSecret", "w"));
        secret(&client, ns, "gh", &keys).await;
        let provider: stagely_api::v1alpha1::CloudProvider = serde_json::from_value(json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider",
            "metadata": {"name": "cloud", "namespace": ns},
            "spec": {"type": "local", "local": {"engine": "podman"}},
        }))
        .unwrap();
        let providers: Api<stagely_api::v1alpha1::CloudProvider> = Api::namespaced(client.clone(), ns);
        providers.create(&PostParams::default(), &provider).await.unwrap();
        let ready = json!({"apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider", "status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "CredentialsValid", "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        providers.patch_status("cloud", &PatchParams::apply("test").force(), &Patch::Apply(&ready)).await.unwrap();
        project(&client, ns, "acme/checked", json!({})).await;
        let projects: Api<Project> = Api::namespaced(client.clone(), ns);
        let condition = eventually(&format!("{ns}: Ready={status} {reason}"), || async {
            let project = projects.get("shop").await.ok()?;
            let ready = project.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
            (ready.status == status && ready.reason == reason).then_some(ready)
        })
        .await;
        assert!(condition.message.contains(message), "{ns}: {}", condition.message);
    }
    assert!(!logs::text().contains("ghp_revoked"), "a token is in no log line");
}
