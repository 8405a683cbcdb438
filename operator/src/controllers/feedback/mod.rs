//! GitHub feedback: tells each Environment's pull request how its preview is doing, through a
//! GitHub Deployment per run (environment `preview/pr-<n>`, transient, not production; statuses
//! in_progress → success with the URL, or failure, then inactive on teardown) and one sticky
//! comment, found by its hidden marker and edited in place whenever its text changes.
//!
//! It is a controller of its own beside the Environment controller, which never waits for it: a
//! GitHub outage delays feedback, never a preview. What it did is kept in `status.github` and its
//! state in the `GitHubFeedback` condition, both written with a field manager of its own so that
//! the Environment controller's status writes leave them alone. Its finalizer marks the
//! Deployment inactive and the comment "torn down" before an Environment goes; if GitHub keeps
//! failing for [`TEARDOWN_DEADLINE`], the finalizer is released anyway and an Event says what was
//! left as it was.
//!
//! Environments of Projects whose Secret holds no GitHub credentials get no feedback, and the
//! condition says so.

pub mod plan;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use stagely_api::backoff::Backoff;
use stagely_api::keys;
use stagely_api::v1alpha1::{Environment, GITHUB_FEEDBACK_CONDITION, GitHubDeployment, GitHubFeedbackStatus, Project};

use crate::controllers::conditions::set_condition;
use crate::controllers::events::Recorder;
use crate::github::auth::read_credentials;
use crate::github::{Credentials, GitHub, GitHubError, Repository};

/// The controller's name, as events report it.
pub const CONTROLLER: &str = "stagely-github-feedback";

/// How long teardown keeps trying to tell GitHub before it lets the Environment go.
pub const TEARDOWN_DEADLINE: Duration = Duration::from_secs(600);

/// Condition reason: the pull request shows the Environment's current state.
pub const REPORTED: &str = "Reported";
/// Condition reason: the Project has no GitHub credentials, so nothing is reported.
pub const NO_CREDENTIALS: &str = "NoGitHubCredentials";

/// Backoff after GitHub failed.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// What the reconciler needs.
pub struct Context {
    client: Client,
    github: Arc<GitHub>,
    recorder: Recorder,
    failures: Mutex<HashMap<ObjectRef<Environment>, Backoff>>,
    metrics: crate::metrics::Metrics,
}

impl Context {
    /// A context reporting through `github`.
    pub fn new(client: Client, github: Arc<GitHub>) -> Self {
        let reporter = Reporter { controller: CONTROLLER.into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            github,
            failures: Mutex::default(),
            metrics: crate::metrics::Metrics::default(),
        }
    }

    /// Counts and times its reconciles in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }
}

/// Why a reconcile failed (and will be retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster could not be read or written.
    #[error("failed to {action} for Environment {namespace}/{name}: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// The Environment's namespace.
        namespace: String,
        /// The Environment.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// GitHub did not take the feedback; the condition says so.
    #[error("failed to tell GitHub about Environment {namespace}/{name}: {source}")]
    GitHub {
        /// The Environment's namespace.
        namespace: String,
        /// The Environment.
        name: String,
        /// GitHub's answer.
        source: GitHubError,
    },
    /// The finalizer could not be managed.
    #[error("failed to manage the GitHub feedback finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// The reconcile outcome this error is counted as.
    fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "ApiError",
            Error::GitHub { source, .. } => source.reason(),
            Error::Finalizer(_) => "FinalizerError",
        }
    }
}

/// What of an Environment the feedback depends on: its deletion, finalizers and pull request, and
/// the phase, URL, run and pipeline conditions of its status. Heartbeats and this controller's
/// own writes wake nothing.
fn told(env: &Environment) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let meta = &env.metadata;
    (meta.deletion_timestamp.is_some(), &meta.finalizers, env.spec.pull_request.number).hash(&mut hasher);
    let status = env.status.clone().unwrap_or_default();
    let conditions: Vec<_> = status.conditions.iter().filter(|c| c.type_ != GITHUB_FEEDBACK_CONDITION).collect();
    serde_json::to_string(&(status.phase, &status.url, &status.run, conditions)).ok()?.hash(&mut hasher);
    Some(hasher.finish())
}

/// Runs the controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let (store, writer) = reflector::store::<Environment>();
    let events = watcher(Api::<Environment>::all(ctx.client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(crate::controllers::strip)
        .reflect(writer)
        .touched_objects()
        .predicate_filter(told, Default::default());
    Controller::for_stream(events, store)
        .with_config(kube::runtime::controller::Config::default().concurrency(8))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move { crate::controllers::log_run("feedback", result) })
        .await;
}

/// Where one Environment's feedback goes.
struct Target {
    credentials: Credentials,
    repository: String,
    number: i64,
}

/// Reconciles one Environment's feedback, counted and timed.
async fn reconcile(env: Arc<Environment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = feedback(env, &ctx).await;
    ctx.metrics.reconciled_after("feedback", result.as_ref().map_or_else(Error::reason, |_| "ok"), started);
    result
}

async fn feedback(env: Arc<Environment>, ctx: &Context) -> Result<Action, Error> {
    let namespace = env.namespace().unwrap_or_default();
    let name = env.name_any();
    let target = target(&env, ctx).await;
    let has_finalizer = env.finalizers().iter().any(|f| f == keys::GITHUB_FEEDBACK_FINALIZER);
    let target = match target {
        Ok(Some(target)) => target,
        Ok(None) | Err(_) if env.metadata.deletion_timestamp.is_some() => {
            // Nothing to tell, or no way to: let it go.
            if has_finalizer {
                release(&env, ctx).await?;
            }
            return Ok(Action::await_change());
        }
        Ok(None) => {
            let message = "the Project's GitHub credentials Secret holds no token or App keys: the pull request \
                           gets no Deployment and no comment";
            write_condition(&env, ctx, false, NO_CREDENTIALS, message, None).await?;
            return Ok(Action::await_change());
        }
        Err(err) => {
            write_condition(&env, ctx, false, err.reason(), &err.to_string(), None).await?;
            return Err(Error::GitHub { namespace, name, source: err });
        }
    };
    let api = Api::<Environment>::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, keys::GITHUB_FEEDBACK_FINALIZER, env, |event| async {
        match event {
            finalizer::Event::Apply(env) => report(&env, &target, ctx).await,
            finalizer::Event::Cleanup(env) => tear_down(&env, &target, ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err,
        other => Error::Finalizer(Box::new(other)),
    });
    if result.is_ok() {
        ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&ObjectRef::new(&name).within(&namespace));
    }
    result
}

fn error_policy(env: Arc<Environment>, err: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let backoff = failures.entry(ObjectRef::from_obj(&*env)).or_insert_with(|| Backoff::new(RETRY_FIRST, RETRY_MAX));
    let mut delay = backoff.next_delay();
    if let Error::GitHub { source, .. } = err
        && let Some(wait) = source.retry_after()
    {
        delay = delay.max(wait);
    }
    tracing::warn!(namespace = ?env.namespace(), name = %env.name_any(), error = %err, retry_in = ?delay, "GitHub feedback failed");
    Action::requeue(delay)
}

/// The Environment's pull request on GitHub and the credentials to reach it: `None` when its
/// Project has none (or is gone).
async fn target(env: &Environment, ctx: &Context) -> Result<Option<Target>, GitHubError> {
    let namespace = env.namespace().unwrap_or_default();
    let project = Api::<Project>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&env.spec.project_ref.name)
        .await
        .map_err(|err| GitHubError::Credentials(format!("failed to read the Project: {err}")))?;
    let Some(project) = project else { return Ok(None) };
    let secret = &project.spec.github.credentials_secret_ref.name;
    let Some(credentials) = read_credentials(&ctx.client, &namespace, secret).await? else { return Ok(None) };
    Ok(Some(Target { credentials, repository: project.spec.repository.clone(), number: env.spec.pull_request.number }))
}

/// Brings the Deployment and the comment up to date with the Environment.
async fn report(env: &Environment, target: &Target, ctx: &Context) -> Result<Action, Error> {
    let mut feedback = env.status.as_ref().and_then(|s| s.github.clone()).unwrap_or_default();
    let before = feedback.clone();
    let outcome = tell(env, target, ctx, &mut feedback).await;
    let (ok, reason, message) = match &outcome {
        Ok(()) => (true, REPORTED, "the pull request shows this Environment's state".to_owned()),
        Err(err) => (false, err.reason(), format!("{err}; retrying (the preview does not wait for GitHub)")),
    };
    let changed = (feedback != before).then_some(&feedback);
    write_condition(env, ctx, ok, reason, &message, changed).await?;
    match outcome {
        Ok(()) => Ok(Action::await_change()),
        Err(source) => {
            Err(Error::GitHub { namespace: env.namespace().unwrap_or_default(), name: env.name_any(), source })
        }
    }
}

/// Tells GitHub what changed since `feedback`, recording each step in it as it is taken, so that
/// an error half way keeps what was done.
async fn tell(
    env: &Environment,
    target: &Target,
    ctx: &Context,
    feedback: &mut GitHubFeedbackStatus,
) -> Result<(), GitHubError> {
    let github = &ctx.github;
    let repository = Repository(&target.repository);
    if let Some((state, url, description)) = plan::deployment(env) {
        let sha = env.status.as_ref().and_then(|s| s.run.as_ref()).map(|r| r.sha.clone()).unwrap_or_default();
        if feedback.deployment.as_ref().is_none_or(|d| d.sha != sha) {
            let environment = plan::environment_name(target.number);
            // One created before a crash kept its id from the status is taken up, not doubled.
            let existing = github.deployments(&target.credentials, repository, &sha, &environment).await?;
            let id = match existing.first() {
                Some(id) => *id,
                None => {
                    github
                        .create_deployment(&target.credentials, repository, &sha, &environment, "Stagely preview")
                        .await?
                }
            };
            feedback.deployment = Some(GitHubDeployment { id: id as i64, sha, state: None });
        }
        let deployment = feedback.deployment.as_mut().expect("set above");
        if deployment.state.as_deref() != Some(state.as_str()) {
            let found = github
                .create_deployment_status(
                    &target.credentials,
                    repository,
                    deployment.id as u64,
                    state,
                    url.as_deref(),
                    &description,
                )
                .await?;
            if found {
                deployment.state = Some(state.as_str().to_owned());
            } else {
                // Deleted on GitHub: the next pass creates another.
                feedback.deployment = None;
            }
        }
    }
    let text = plan::comment(env);
    let digest = plan::digest(&text);
    if feedback.comment_digest.as_deref() != Some(digest.as_str()) || feedback.comment_id.is_none() {
        let id = write_comment(env, target, ctx, feedback.comment_id, &text).await?;
        feedback.comment_id = Some(id as i64);
        feedback.comment_digest = Some(digest);
    }
    Ok(())
}

/// Edits comment `known` to `text`, or the comment carrying the Environment's marker, or posts a
/// new one (the first time, or after a user deleted it); returns its id.
async fn write_comment(
    env: &Environment,
    target: &Target,
    ctx: &Context,
    known: Option<i64>,
    text: &str,
) -> Result<u64, GitHubError> {
    let github = &ctx.github;
    let repository = Repository(&target.repository);
    let known = match known {
        Some(id) => Some(id as u64),
        // Posted before a crash kept its id from the status: find it by its marker.
        None => {
            let (namespace, name) = (env.namespace().unwrap_or_default(), env.name_any());
            let comments = github.comments(&target.credentials, repository, target.number).await?;
            comments
                .iter()
                .find(|c| c.body.as_deref().is_some_and(|body| plan::is_ours(body, &namespace, &name)))
                .map(|c| c.id)
        }
    };
    if let Some(id) = known
        && github.update_comment(&target.credentials, repository, id, text).await?
    {
        return Ok(id);
    }
    github.create_comment(&target.credentials, repository, target.number, text).await
}

/// Marks the Deployment inactive and the comment torn down, then lets the Environment go; after
/// [`TEARDOWN_DEADLINE`] of failures it lets it go anyway, saying what was left.
async fn tear_down(env: &Environment, target: &Target, ctx: &Context) -> Result<Action, Error> {
    let mut feedback = env.status.as_ref().and_then(|s| s.github.clone()).unwrap_or_default();
    match tell(env, target, ctx, &mut feedback).await {
        Ok(()) => Ok(Action::await_change()),
        Err(err) => {
            if let Some(why) = crate::controllers::cleanup::give_up(&env.metadata, TEARDOWN_DEADLINE, Timestamp::now())
            {
                let note = format!(
                    "gave up telling GitHub the preview is gone ({why}): {err}; the pull request's Deployment and \
                     comment may still show it"
                );
                event(ctx, env, EventType::Warning, "GitHubFeedbackAbandoned", note).await;
                return Ok(Action::await_change());
            }
            Err(Error::GitHub { namespace: env.namespace().unwrap_or_default(), name: env.name_any(), source: err })
        }
    }
}

/// Removes this controller's finalizer (nothing to tell GitHub).
async fn release(env: &Environment, ctx: &Context) -> Result<(), Error> {
    let namespace = env.namespace().unwrap_or_default();
    let name = env.name_any();
    let finalizers: Vec<&String> = env.finalizers().iter().filter(|f| *f != keys::GITHUB_FEEDBACK_FINALIZER).collect();
    let patch = json!({"metadata": {"resourceVersion": env.resource_version(), "finalizers": finalizers}});
    Api::<Environment>::namespaced(ctx.client.clone(), &namespace)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Kube { action: "remove the GitHub feedback finalizer", namespace, name, source })?;
    Ok(())
}

/// Writes the `GitHubFeedback` condition (and `status.github` when `feedback` is given) when
/// they change, with this controller's own field manager.
async fn write_condition(
    env: &Environment,
    ctx: &Context,
    ok: bool,
    reason: &str,
    message: &str,
    feedback: Option<&GitHubFeedbackStatus>,
) -> Result<(), Error> {
    let status = env.status.clone().unwrap_or_default();
    let current = status.conditions.iter().find(|c| c.type_ == GITHUB_FEEDBACK_CONDITION);
    let unchanged = current
        .is_some_and(|c| c.status == if ok { "True" } else { "False" } && c.reason == reason && c.message == message);
    if unchanged && feedback.is_none() {
        return Ok(());
    }
    let mut conditions: Vec<Condition> = current.cloned().into_iter().collect();
    set_condition(
        &mut conditions,
        GITHUB_FEEDBACK_CONDITION,
        ok,
        reason,
        message,
        env.metadata.generation,
        Timestamp::now(),
    );
    let github = feedback.cloned().or(status.github);
    let mut patch = json!({
        "apiVersion": "stagely.dev/v1alpha1",
        "kind": "Environment",
        "status": {"conditions": conditions},
    });
    if let Some(github) = github {
        patch["status"]["github"] = serde_json::to_value(github).unwrap_or_default();
    }
    let namespace = env.namespace().unwrap_or_default();
    let name = env.name_any();
    Api::<Environment>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(&name, &PatchParams::apply(keys::MANAGER_GITHUB_FEEDBACK).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Kube { action: "write the GitHub feedback status", namespace, name, source })?;
    if !unchanged {
        let type_ = if ok { EventType::Normal } else { EventType::Warning };
        event(ctx, env, type_, reason, format!("{GITHUB_FEEDBACK_CONDITION}: {message}")).await;
    }
    Ok(())
}

async fn event(ctx: &Context, env: &Environment, type_: EventType, reason: &str, note: String) {
    ctx.recorder.record(&env.object_ref(&()), type_, "ReportToGitHub", reason, note).await;
}
