//! The Project controller: reports, as the `Ready` condition, whether what a Project refers to is
//! there (its CloudProvider, and Ready; its GitHub credentials Secret, with the keys it needs;
//! every `secretRefs` Secret), and counts the Project's Environments.
//!
//! Everything it reads comes from watches, each feeding a store and waking the Projects that
//! refer to what changed, so a fix (creating the missing Secret, the CloudProvider turning
//! Ready) shows within a moment and nothing polls. Secrets are watched by their metadata only, so
//! no Secret's data comes to the controller from the watch; the key names of a Project's GitHub
//! credentials Secret are read with a targeted GET when that Secret changed, and only the names
//! are kept. No Secret value reaches a log line, an event or the status. When the operator talks
//! to GitHub, whether GitHub accepts the credentials for the Project's repository is part of
//! Ready too: checked when the Secret or the repository changes, and again every
//! [`RECHECK`] (GitHub revokes and users uninstall without telling the cluster).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, applier, trigger_self, trigger_with};
use kube::runtime::events::{EventType, Reporter};

use crate::controllers::Listed;
use crate::controllers::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use stagely_api::backoff::Backoff;
use stagely_api::keys::MANAGER_OPERATOR;
use stagely_api::v1alpha1::{CloudProvider, Environment, LocalObjectRef, Project, ProjectStatus};
use stagely_api::webhook_secrets::SecretLocation;

use crate::controllers::conditions::set_condition;
use crate::controllers::webhook_secrets::Mirror;
use crate::github::{Credentials, GitHub, GitHubError};
use crate::metrics::Metrics;

/// The controller's name, as events report it.
pub const CONTROLLER: &str = "stagely-project-controller";

/// Ready=True: everything the Project refers to is there.
pub const REFERENCES_FOUND: &str = "ReferencesFound";
/// The CloudProvider named by `spec.cloudProviderRef` does not exist.
pub const CLOUD_PROVIDER_NOT_FOUND: &str = "CloudProviderNotFound";
/// The CloudProvider exists but is not Ready (or not checked yet).
pub const CLOUD_PROVIDER_NOT_READY: &str = "CloudProviderNotReady";
/// The Secret named by `spec.github.credentialsSecretRef` does not exist.
pub const GITHUB_SECRET_NOT_FOUND: &str = "GitHubSecretNotFound";
/// The GitHub credentials Secret lacks `webhookSecret`, or both a token and an App's keys.
pub const GITHUB_SECRET_INCOMPLETE: &str = "GitHubSecretIncomplete";
/// One or more `secretRefs` Secrets do not exist.
pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
/// The GitHub credentials Secret's keys cannot be used (a private key that is not one).
pub const GITHUB_SECRET_INVALID: &str = "GitHubSecretInvalid";
/// GitHub refused the credentials.
pub const GITHUB_CREDENTIALS_REJECTED: &str = "GitHubCredentialsRejected";
/// GitHub accepted the credentials but shows them no such repository.
pub const GITHUB_REPOSITORY_NOT_ACCESSIBLE: &str = "GitHubRepositoryNotAccessible";

/// How often accepted credentials are checked again.
pub const RECHECK: Duration = Duration::from_secs(600);
/// How soon a check GitHub could not answer is tried again.
const RECHECK_UNANSWERED: Duration = Duration::from_secs(60);

/// What the GitHub credentials Secret must hold, as messages say it.
const GITHUB_KEYS_NEEDED: &str = "it needs webhookSecret, and either token or appId, installationId and privateKey";
const APP_KEYS: [&str; 3] = ["appId", "installationId", "privateKey"];

/// Backoff after a failed reconcile: growing with each failure in a row, up to the maximum.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// What the reconciler needs.
pub struct Context {
    /// The cluster.
    pub client: Client,
    /// Where reconciles are counted.
    pub metrics: Metrics,
    recorder: Recorder,
    github: Option<Arc<GitHub>>,
    webhook_secrets: Option<Arc<Mirror>>,
}

impl Context {
    /// A context for `client`, counting into `metrics`.
    pub fn new(client: Client, metrics: Metrics) -> Self {
        let reporter = Reporter { controller: CONTROLLER.into(), instance: std::env::var("POD_NAME").ok() };
        Self { recorder: Recorder::new(client.clone(), reporter), client, metrics, github: None, webhook_secrets: None }
    }

    /// Keeps every referenced credentials Secret's `webhookSecret` in the Secret at `location`,
    /// for the webhook receiver (see [`crate::controllers::webhook_secrets`]).
    pub fn with_webhook_secrets(mut self, location: Option<SecretLocation>) -> Self {
        self.webhook_secrets = location.map(|location| Arc::new(Mirror::new(location)));
        self
    }

    /// Checks with `github` that it accepts each Project's credentials for its repository.
    pub fn with_github(mut self, github: Option<Arc<GitHub>>) -> Self {
        self.github = github;
        self
    }
}

/// Why a reconcile failed (and will be retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the status failed.
    #[error("failed to update the status of Project {namespace}/{name}: {source}")]
    Status {
        /// The Project's namespace.
        namespace: String,
        /// The Project.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Reading the GitHub credentials Secret's key names failed.
    #[error("failed to read Secret {namespace}/{secret} of Project {namespace}/{name}: {source}")]
    Secret {
        /// The Project's namespace.
        namespace: String,
        /// The Project.
        name: String,
        /// The Secret.
        secret: String,
        /// The API error.
        source: kube::Error,
    },
    /// A watch the controller reads from stopped, so what it knows cannot be trusted.
    #[error("failed to read the objects Project {namespace}/{name} refers to: a watch stopped")]
    WatchStopped {
        /// The Project's namespace.
        namespace: String,
        /// The Project.
        name: String,
    },
}

impl Error {
    /// The metric outcome of this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Status { .. } => "StatusFailed",
            Self::Secret { .. } => "SecretReadFailed",
            Self::WatchStopped { .. } => "WatchStopped",
        }
    }
}

/// An Environment as the Project controller knows it: its metadata and the Project it belongs to,
/// the rest of each watched Environment left unread. A store of whole Environments would hold a
/// copy of each (a kilobyte in place, before its status) only to count them.
#[derive(Clone, Debug, serde::Deserialize)]
struct Member {
    metadata: kube::api::ObjectMeta,
    spec: MemberSpec,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct MemberSpec {
    project_ref: LocalObjectRef,
}

impl Resource for Member {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        Environment::kind(dt)
    }

    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        Environment::group(dt)
    }

    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        Environment::version(dt)
    }

    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        Environment::plural(dt)
    }

    fn meta(&self) -> &kube::api::ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
        &mut self.metadata
    }
}

/// The stores the controller reads, what it last reported and its retry bookkeeping.
struct State {
    ctx: Arc<Context>,
    projects: Store<Project>,
    providers: Store<CloudProvider>,
    secrets: Store<PartialObjectMeta<Secret>>,
    /// The key names of each GitHub credentials Secret read: read again only when the watch
    /// shows another version.
    key_names: Mutex<HashMap<ObjectRef<Secret>, KeyNames>>,
    /// What GitHub last said of each Project's credentials.
    checks: Mutex<HashMap<ObjectRef<Project>, Check>>,
    environments: Store<Member>,
    /// Whether the three caches above have listed their objects (see [`Listed`]).
    listed: [Listed; 3],
    /// The Ready condition last written for each Project (by UID). The store may not show it yet
    /// when the next reconcile comes, and the transition must not be announced twice.
    reported: Mutex<HashMap<ObjectRef<Project>, (String, Condition)>>,
    failures: Mutex<HashMap<ObjectRef<Project>, Backoff>>,
}

/// The names of a Secret's keys with a value, and the GitHub credentials they make, as read at
/// one `resourceVersion`.
struct KeyNames {
    version: String,
    keys: Vec<String>,
    credentials: Result<Option<Credentials>, String>,
}

/// What GitHub said of a Project's credentials, and for what.
struct Check {
    /// The credentials' identity, the repository and the Secret's version checked.
    subject: (String, String, String),
    at: std::time::Instant,
    outcome: GitHubCheck,
}

/// Whether GitHub accepts a Project's credentials for its repository.
#[derive(Clone, Debug, PartialEq, Eq)]
enum GitHubCheck {
    /// Not asked: the operator has no GitHub client, or the Secret holds no credentials.
    NotChecked,
    /// The credentials read the repository.
    Accepted,
    /// The Secret's keys are not usable credentials.
    Invalid(String),
    /// GitHub refused the credentials.
    Rejected(String),
    /// GitHub accepted them but shows them no such repository.
    NoAccess,
    /// GitHub could not be asked (down, rate limited); the Project stays as it was.
    Unanswered(String),
}

/// What the controller found about one Project's references.
struct Observed<'a> {
    provider: Option<&'a CloudProvider>,
    /// The keys of the GitHub credentials Secret with a non-empty value, if it exists.
    github_keys: Option<Vec<&'a str>>,
    /// `secretRefs` names without a Secret.
    missing_secrets: Vec<&'a str>,
    /// What GitHub said of the credentials.
    github: GitHubCheck,
}

/// The Ready condition to report.
#[derive(Debug, PartialEq, Eq)]
struct Readiness {
    ready: bool,
    reason: &'static str,
    message: String,
}

/// Decides Ready from what was observed. Each problem is reported; the first one's reason names
/// the condition.
fn readiness(project: &Project, observed: &Observed) -> Readiness {
    let namespace = project.namespace().unwrap_or_default();
    let spec = &project.spec;
    let mut problems: Vec<(&'static str, String)> = Vec::new();

    let provider_name = &spec.cloud_provider_ref.name;
    match observed.provider {
        None => problems.push((
            CLOUD_PROVIDER_NOT_FOUND,
            format!("CloudProvider {namespace}/{provider_name} (spec.cloudProviderRef) not found"),
        )),
        Some(provider) => {
            let ready = provider.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
            match ready {
                Some(c) if c.status == "True" => {}
                Some(c) => problems.push((
                    CLOUD_PROVIDER_NOT_READY,
                    format!("CloudProvider {namespace}/{provider_name} is not ready: {}", c.message),
                )),
                None => problems.push((
                    CLOUD_PROVIDER_NOT_READY,
                    format!("CloudProvider {namespace}/{provider_name} has not been checked yet"),
                )),
            }
        }
    }

    let github_name = &spec.github.credentials_secret_ref.name;
    let mut credentials = "";
    match &observed.github_keys {
        None => problems.push((
            GITHUB_SECRET_NOT_FOUND,
            format!(
                "Secret {namespace}/{github_name} (spec.github.credentialsSecretRef) not found; {GITHUB_KEYS_NEEDED}"
            ),
        )),
        Some(keys) => {
            let has = |key: &str| keys.contains(&key);
            let mut missing: Vec<String> = Vec::new();
            if !has("webhookSecret") {
                missing.push("webhookSecret".into());
            }
            if has("token") {
                credentials = "a token";
            } else if APP_KEYS.iter().any(|k| has(k)) {
                missing.extend(APP_KEYS.iter().filter(|k| !has(k)).map(|k| (*k).to_owned()));
                credentials = "GitHub App credentials";
            } else {
                missing.push("token (or appId, installationId and privateKey)".into());
            }
            if !missing.is_empty() {
                problems.push((
                    GITHUB_SECRET_INCOMPLETE,
                    format!(
                        "Secret {namespace}/{github_name} (spec.github.credentialsSecretRef) has no {}; \
                         {GITHUB_KEYS_NEEDED}",
                        join(&missing)
                    ),
                ));
            }
        }
    }

    let repository = &spec.repository;
    // A Secret with keys missing is reported once, as incomplete, not as invalid too.
    let incomplete = problems.iter().any(|(reason, _)| *reason == GITHUB_SECRET_INCOMPLETE);
    match &observed.github {
        GitHubCheck::Invalid(_) if incomplete => {}
        GitHubCheck::Invalid(problem) => problems.push((
            GITHUB_SECRET_INVALID,
            format!("Secret {namespace}/{github_name} (spec.github.credentialsSecretRef): {problem}"),
        )),
        GitHubCheck::Rejected(message) => problems.push((
            GITHUB_CREDENTIALS_REJECTED,
            format!("GitHub refused the credentials in Secret {namespace}/{github_name} ({message}); replace them"),
        )),
        GitHubCheck::NoAccess => problems.push((
            GITHUB_REPOSITORY_NOT_ACCESSIBLE,
            format!(
                "GitHub shows the credentials in Secret {namespace}/{github_name} no repository {repository}: \
                 install the App on it, or give the token read access to it"
            ),
        )),
        GitHubCheck::NotChecked | GitHubCheck::Accepted | GitHubCheck::Unanswered(_) => {}
    }

    if !observed.missing_secrets.is_empty() {
        let names: Vec<String> = observed.missing_secrets.iter().map(|n| format!("{namespace}/{n}")).collect();
        let noun = if names.len() == 1 { "Secret" } else { "Secrets" };
        problems.push((SECRET_NOT_FOUND, format!("{noun} {} (spec.secretRefs) not found", join(&names))));
    }

    if let Some((reason, _)) = problems.first() {
        let message = problems.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ");
        return Readiness { ready: false, reason, message };
    }
    let secrets = match spec.secret_refs.len() {
        0 => String::new(),
        1 => ", and its secretRefs Secret exists".into(),
        n => format!(", and its {n} secretRefs Secrets exist"),
    };
    let checked = match &observed.github {
        GitHubCheck::Accepted => format!("GitHub accepts the credentials for {repository}"),
        GitHubCheck::Unanswered(why) => {
            format!("GitHub could not be asked about the credentials ({why}); asking again")
        }
        _ => "whether GitHub accepts the credentials is not checked".to_owned(),
    };
    Readiness {
        ready: true,
        reason: REFERENCES_FOUND,
        message: format!(
            "CloudProvider {provider_name} is ready, Secret {github_name} holds {credentials} and a webhook \
             secret{secrets}; {checked}"
        ),
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Checks one Project's references, counts its Environments and writes what changed.
async fn reconcile(project: Arc<Project>, state: Arc<State>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = apply(&project, &state).await;
    let key = ObjectRef::from_obj(&*project);
    let outcome = match &result {
        Ok(_) => {
            state.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            "ok"
        }
        Err(err) => err.reason(),
    };
    state.ctx.metrics.reconciled_after("project", outcome, started);
    result
}

async fn apply(project: &Project, state: &State) -> Result<Action, Error> {
    let ctx = &state.ctx;
    let name = project.name_any();
    let namespace = project.namespace().unwrap_or_default();
    let stopped = || Error::WatchStopped { namespace: namespace.clone(), name: name.clone() };
    // Until every store has listed its objects, a missing object may only not be seen yet.
    for listed in &state.listed {
        if !listed.wait().await {
            return Err(stopped());
        }
    }

    let spec = &project.spec;
    let provider = state.providers.get(&ObjectRef::new(&spec.cloud_provider_ref.name).within(&namespace));
    let secret = |name: &str| state.secrets.get(&ObjectRef::new(name).within(&namespace));
    let github_name = &spec.github.credentials_secret_ref.name;
    let github = match secret(github_name) {
        Some(meta) => github_key_names(state, &namespace, github_name, &meta).await.map_err(|source| {
            Error::Secret { namespace: namespace.clone(), name: name.clone(), secret: github_name.clone(), source }
        })?,
        None => None,
    };
    let check = match &github {
        Some((version, _, credentials)) => check_github(state, project, version, credentials).await,
        None => GitHubCheck::NotChecked,
    };
    let observed = Observed {
        provider: provider.as_deref(),
        github_keys: github.as_ref().map(|(_, keys, _)| keys.iter().map(String::as_str).collect()),
        missing_secrets: spec.secret_refs.iter().map(|r| r.name.as_str()).filter(|n| secret(n).is_none()).collect(),
        github: check.clone(),
    };
    let found = readiness(project, &observed);
    let environments = state
        .environments
        .state()
        .iter()
        .filter(|e| e.metadata.namespace.as_deref() == Some(&namespace) && e.spec.project_ref.name == name)
        .count();

    let key = ObjectRef::from_obj(project);
    let uid = project.uid().unwrap_or_default();
    let mut conditions = project.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let reported = state.reported.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
    if let Some((reported_uid, condition)) = reported
        && reported_uid == uid
    {
        conditions.retain(|c| c.type_ != "Ready");
        conditions.push(condition);
    }
    let status = if found.ready { "True" } else { "False" };
    let previous = conditions.iter().find(|c| c.type_ == "Ready");
    let transition = previous.is_none_or(|c| c.status != status || c.reason != found.reason);
    let (generation, now) = (project.metadata.generation, k8s_openapi::jiff::Timestamp::now());
    set_condition(&mut conditions, "Ready", found.ready, found.reason, &found.message, generation, now);
    let ready = conditions.iter().find(|c| c.type_ == "Ready").cloned().expect("Ready was just set");
    let new_status = ProjectStatus {
        observed_generation: project.metadata.generation,
        conditions,
        environments: Some(i32::try_from(environments).unwrap_or(i32::MAX)),
    };

    if project.status.as_ref() != Some(&new_status) {
        // Only the fields this controller owns: other writers' conditions stay theirs.
        let patch = json!({
            "apiVersion": "stagely.dev/v1alpha1",
            "kind": "Project",
            "status": {
                "observedGeneration": new_status.observed_generation,
                "conditions": [ready],
                "environments": new_status.environments,
            },
        });
        let api: Api<Project> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch_status(&name, &PatchParams::apply(MANAGER_OPERATOR).force(), &Patch::Apply(patch))
            .await
            .map_err(|source| Error::Status { namespace: namespace.clone(), name: name.clone(), source })?;
    }
    {
        let mut reported = state.reported.lock().unwrap_or_else(|e| e.into_inner());
        reported.insert(key, (uid, ready));
        // Forget deleted Projects.
        reported.retain(|key, _| state.projects.get(key).is_some());
    }

    if transition {
        tracing::info!(%namespace, %name, ready = found.ready, reason = found.reason, message = %found.message, "project readiness changed");
        let type_ = if found.ready { EventType::Normal } else { EventType::Warning };
        ctx.recorder.record(&project.object_ref(&()), type_, "CheckReferences", found.reason, found.message).await;
    }
    // Everything else that can change the outcome is watched; GitHub is asked again in a while.
    Ok(match check {
        GitHubCheck::NotChecked | GitHubCheck::Invalid(_) => Action::await_change(),
        GitHubCheck::Unanswered(_) => Action::requeue(RECHECK_UNANSWERED),
        GitHubCheck::Accepted | GitHubCheck::Rejected(_) | GitHubCheck::NoAccess => Action::requeue(RECHECK),
    })
}

/// What GitHub says of `credentials` for the Project's repository: remembered per Project for
/// [`RECHECK`] (a minute when GitHub did not answer), asked again sooner when the Secret or the
/// repository changes.
async fn check_github(
    state: &State,
    project: &Project,
    version: &str,
    credentials: &Result<Option<Credentials>, String>,
) -> GitHubCheck {
    // With GitHub off, nothing uses the credentials: they are not judged.
    let Some(github) = &state.ctx.github else { return GitHubCheck::NotChecked };
    let credentials = match credentials {
        Err(problem) => return GitHubCheck::Invalid(problem.clone()),
        Ok(None) => return GitHubCheck::NotChecked,
        Ok(Some(credentials)) => credentials,
    };
    let key = ObjectRef::from_obj(project);
    let subject = (credentials.identity(), project.spec.repository.clone(), version.to_owned());
    if let Some(known) = state.checks.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        let valid_for = if matches!(known.outcome, GitHubCheck::Unanswered(_)) { RECHECK_UNANSWERED } else { RECHECK };
        if known.subject == subject && known.at.elapsed() < valid_for {
            return known.outcome.clone();
        }
    }
    let outcome = match github.can_read(credentials, crate::github::Repository(&project.spec.repository)).await {
        Ok(true) => GitHubCheck::Accepted,
        Ok(false) => GitHubCheck::NoAccess,
        Err(GitHubError::Unauthorized { message, .. }) => GitHubCheck::Rejected(message),
        Err(GitHubError::Credentials(problem)) => GitHubCheck::Invalid(problem),
        Err(GitHubError::Forbidden { message, .. }) => GitHubCheck::Rejected(message),
        Err(other) => GitHubCheck::Unanswered(other.to_string()),
    };
    let mut checks = state.checks.lock().unwrap_or_else(|e| e.into_inner());
    checks.insert(key, Check { subject, at: std::time::Instant::now(), outcome: outcome.clone() });
    checks.retain(|key, _| state.projects.get(key).is_some());
    outcome
}

fn error_policy(project: Arc<Project>, err: &Error, state: Arc<State>) -> Action {
    let mut failures = state.failures.lock().unwrap_or_else(|e| e.into_inner());
    let backoff =
        failures.entry(ObjectRef::from_obj(&*project)).or_insert_with(|| Backoff::new(RETRY_FIRST, RETRY_MAX));
    let delay = backoff.next_delay();
    tracing::warn!(namespace = ?project.namespace(), name = %project.name_any(), error = %err, retry_in = ?delay, "project reconcile failed");
    Action::requeue(delay)
}

/// The names of the keys with a value of the Secret `meta` describes: remembered from the last
/// read of the same `resourceVersion`, else read with a GET (the values are dropped at once).
/// `None` if the Secret is gone.
#[allow(clippy::type_complexity)]
async fn github_key_names(
    state: &State,
    namespace: &str,
    name: &str,
    meta: &PartialObjectMeta<Secret>,
) -> Result<Option<(String, Vec<String>, Result<Option<Credentials>, String>)>, kube::Error> {
    let key = ObjectRef::new(name).within(namespace);
    let version = meta.metadata.resource_version.clone().unwrap_or_default();
    if let Some(known) = state.key_names.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
        && known.version == version
    {
        return Ok(Some((known.version.clone(), known.keys.clone(), known.credentials.clone())));
    }
    let mirror = state.ctx.webhook_secrets.as_deref();
    let Some(secret) = Api::<Secret>::namespaced(state.ctx.client.clone(), namespace).get_opt(name).await? else {
        state.key_names.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        if let Some(mirror) = mirror {
            mirror.record((namespace.to_owned(), name.to_owned()), None);
        }
        return Ok(None);
    };
    let version = secret.metadata.resource_version.clone().unwrap_or_default();
    let data = secret.data.unwrap_or_default();
    if let Some(mirror) = mirror {
        let webhook_secret =
            data.get("webhookSecret").and_then(|v| stagely_api::webhook_secrets::webhook_secret(&v.0)).map(Arc::from);
        mirror.record((namespace.to_owned(), name.to_owned()), Some(webhook_secret));
    }
    let credentials = Credentials::from_secret_data(&data);
    let keys = key_names(data);
    let known = KeyNames { version: version.clone(), keys: keys.clone(), credentials: credentials.clone() };
    state.key_names.lock().unwrap_or_else(|e| e.into_inner()).insert(key, known);
    Ok(Some((version, keys, credentials)))
}

/// The names of a Secret's keys with a value; the values are dropped.
fn key_names(data: std::collections::BTreeMap<String, k8s_openapi::ByteString>) -> Vec<String> {
    data.into_iter().filter(|(_, v)| !v.0.is_empty()).map(|(k, _)| k).collect()
}

/// Keeps what the Secrets store needs of a Secret's metadata: its name and version.
fn strip_secret(secret: &mut PartialObjectMeta<Secret>) {
    secret.metadata.annotations = None;
    secret.metadata.labels = None;
    secret.metadata.managed_fields = None;
}

/// The Environments that appeared, started going or went: all that changes a Project's count.
/// Their other changes (status writes, heartbeats: most of the traffic) wake no Project; at
/// thousands of Environments they woke every Project many times a second.
fn arrivals_and_departures(
    events: impl futures_util::Stream<Item = Result<watcher::Event<Member>, watcher::Error>>,
) -> impl futures_util::Stream<Item = Result<Member, watcher::Error>> {
    // Whether each known Environment (by UID) is being deleted.
    let mut known: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    events.filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(env) | watcher::Event::InitApply(env)) => {
                let going = env.metadata.deletion_timestamp.is_some();
                let before = known.insert(env.uid().unwrap_or_default(), going);
                (before != Some(going)).then_some(Ok(env))
            }
            Ok(watcher::Event::Delete(env)) => {
                known.remove(&env.uid().unwrap_or_default());
                Some(Ok(env))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(err) => Some(Err(err)),
        };
        std::future::ready(changed)
    })
}

/// The Projects in `namespace` for which `refers` holds.
fn projects_referring(
    projects: &Store<Project>,
    namespace: Option<String>,
    refers: impl Fn(&Project) -> bool,
) -> Vec<ObjectRef<Project>> {
    projects
        .state()
        .into_iter()
        .filter(|p| p.namespace() == namespace && refers(p))
        .map(|p| ObjectRef::from_obj(&*p))
        .collect()
}

/// Runs the controller until `shutdown` resolves: every Project, checked again when its
/// CloudProvider, one of its Secrets or one of its Environments changes.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let config = watcher::Config::default();
    let (projects, projects_writer) = reflector::store::<Project>();
    let (providers, providers_writer) = reflector::store::<CloudProvider>();
    let (secrets, secrets_writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let (environments, environments_writer) = reflector::store::<Member>();

    // One watch per kind feeds both its store and the triggers, so a reconcile always sees at
    // least the change that woke it. The Projects' store is awaited by the applier: whether it
    // has listed is told by its watch's events too, since the store wakes one waiter only.
    let (projects_listed_tx, projects_listed) = tokio::sync::watch::channel(false);
    let own = trigger_self(
        reflector(
            projects_writer,
            watcher(Api::<Project>::all(client.clone()), config.clone())
                .modify(|p: &mut Project| p.metadata.managed_fields = None)
                .default_backoff(),
        )
        .inspect({
            let mirror = ctx.webhook_secrets.clone();
            move |event| {
                if matches!(event, Ok(watcher::Event::InitDone)) {
                    projects_listed_tx.send_replace(true);
                }
                mirror.iter().for_each(|m| m.wake());
            }
        })
        .applied_objects(),
        (),
    );
    let by_provider = {
        let projects = projects.clone();
        let stream = reflector(
            providers_writer,
            watcher(Api::<CloudProvider>::all(client.clone()), config.clone())
                .modify(|p: &mut CloudProvider| {
                    p.metadata.managed_fields = None;
                    p.metadata.annotations = None;
                })
                .default_backoff(),
        );
        trigger_with(stream.touched_objects(), move |provider: CloudProvider| {
            let name = provider.name_any();
            projects_referring(&projects, provider.namespace(), |p| p.spec.cloud_provider_ref.name == name)
        })
    };
    let by_secret = {
        let projects = projects.clone();
        let stream = reflector(
            secrets_writer,
            watcher(Api::<PartialObjectMeta<Secret>>::all(client.clone()), config.clone())
                .modify(strip_secret)
                .default_backoff(),
        )
        .inspect({
            let mirror = ctx.webhook_secrets.clone();
            move |_| mirror.iter().for_each(|m| m.wake())
        });
        trigger_with(stream.touched_objects(), move |secret: PartialObjectMeta<Secret>| {
            let name = secret.name_any();
            projects_referring(&projects, secret.namespace(), |p| {
                p.spec.github.credentials_secret_ref.name == name || p.spec.secret_refs.iter().any(|r| r.name == name)
            })
        })
    };
    let by_environment = {
        let projects = projects.clone();
        let stream = reflector(
            environments_writer,
            watcher(Api::<Member>::all(client.clone()), config)
                .modify(|e: &mut Member| {
                    // Counted by Project: only the namespace, the UID and spec.projectRef are read.
                    e.metadata = kube::api::ObjectMeta {
                        name: e.metadata.name.take(),
                        namespace: e.metadata.namespace.take(),
                        uid: e.metadata.uid.take(),
                        resource_version: e.metadata.resource_version.take(),
                        deletion_timestamp: e.metadata.deletion_timestamp.take(),
                        ..Default::default()
                    };
                })
                .default_backoff(),
        );
        trigger_with(arrivals_and_departures(stream), move |environment: Member| {
            let project = ObjectRef::new(&environment.spec.project_ref.name).within(&environment.namespace()?);
            projects.get(&project).is_some().then_some(project)
        })
    };
    let queue = stream::select(own, stream::select(by_provider, stream::select(by_secret, by_environment)))
        .take_until(shutdown);

    let listed = [Listed::of(&providers), Listed::of(&secrets), Listed::of(&environments)];
    let state = Arc::new(State {
        ctx,
        listed,
        projects: projects.clone(),
        providers,
        secrets,
        key_names: Mutex::default(),
        checks: Mutex::default(),
        environments,
        reported: Mutex::default(),
        failures: Mutex::default(),
    });
    let mirror = keep_webhook_secrets(state.clone(), projects_listed);
    let run = applier(
        |project, state| Box::pin(reconcile(project, state)),
        error_policy,
        state,
        projects,
        queue,
        controller::Config::default().concurrency(crate::controllers::MAX_CONCURRENT_RECONCILES),
    )
    .for_each(|result| async move { crate::controllers::log_run("project", result) });
    // The mirror stops with the controller (whose queue ends on shutdown).
    tokio::select! {
        () = run => {}
        () = mirror => {}
    }
}

/// Keeps the webhook secrets Secret, if the operator keeps one, once the Projects and Secrets
/// have listed: a key for each credentials Secret a Project references and that exists.
async fn keep_webhook_secrets(state: Arc<State>, mut projects_listed: tokio::sync::watch::Receiver<bool>) {
    let Some(mirror) = state.ctx.webhook_secrets.clone() else {
        return std::future::pending().await;
    };
    if projects_listed.wait_for(|listed| *listed).await.is_err() || !state.listed[1].wait().await {
        return std::future::pending().await;
    }
    let referenced = || {
        state
            .projects
            .state()
            .iter()
            .filter_map(|project| {
                let namespace = project.namespace()?;
                let name = &project.spec.github.credentials_secret_ref.name;
                state.secrets.get(&ObjectRef::new(name).within(&namespace)).map(|_| (namespace, name.clone()))
            })
            .collect()
    };
    mirror.keep(state.ctx.client.clone(), referenced).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(secret_refs: &[&str]) -> Project {
        let refs: Vec<_> = secret_refs.iter().map(|n| json!({"name": n})).collect();
        let spec = serde_json::from_value(json!({
            "repository": "acme/shop",
            "cloudProviderRef": {"name": "aws"},
            "previewDomain": "preview.example.com",
            "github": {"credentialsSecretRef": {"name": "gh"}},
            "secretRefs": refs,
        }))
        .unwrap();
        let mut project = Project::new("shop", spec);
        project.metadata.namespace = Some("team".into());
        project
    }

    fn provider(ready: Option<(&str, &str)>) -> CloudProvider {
        let conditions: Vec<_> = ready
            .map(|(status, message)| {
                json!({"type": "Ready", "status": status, "reason": "R", "message": message,
                       "lastTransitionTime": "2025-01-01T00:00:00Z"})
            })
            .into_iter()
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider",
            "metadata": {"name": "aws", "namespace": "team"},
            "spec": {"type": "local"},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn each_problem_has_its_reason_and_says_what_to_fix() {
        let ready = provider(Some(("True", "")));
        let rejected = provider(Some(("False", "AWS rejected the credentials: AuthFailure")));
        let unchecked = provider(None);
        let cases: Vec<(Observed, &str, &str)> = vec![
            (
                Observed {
                    provider: None,
                    github_keys: Some(vec!["token", "webhookSecret"]),
                    missing_secrets: vec![],
                    github: GitHubCheck::NotChecked,
                },
                CLOUD_PROVIDER_NOT_FOUND,
                "CloudProvider team/aws (spec.cloudProviderRef) not found",
            ),
            (
                Observed {
                    provider: Some(&rejected),
                    github_keys: Some(vec!["token", "webhookSecret"]),
                    missing_secrets: vec![],
                    github: GitHubCheck::NotChecked,
                },
                CLOUD_PROVIDER_NOT_READY,
                "CloudProvider team/aws is not ready: AWS rejected the credentials: AuthFailure",
            ),
            (
                Observed {
                    provider: Some(&unchecked),
                    github_keys: Some(vec!["token", "webhookSecret"]),
                    missing_secrets: vec![],
                    github: GitHubCheck::NotChecked,
                },
                CLOUD_PROVIDER_NOT_READY,
                "CloudProvider team/aws has not been checked yet",
            ),
            (
                Observed {
                    provider: Some(&ready),
                    github_keys: None,
                    missing_secrets: vec![],
                    github: GitHubCheck::NotChecked,
                },
                GITHUB_SECRET_NOT_FOUND,
                "Secret team/gh (spec.github.credentialsSecretRef) not found; it needs webhookSecret, and either \
                 token or appId, installationId and privateKey",
            ),
            (
                Observed {
                    provider: Some(&ready),
                    github_keys: Some(vec!["token"]),
                    missing_secrets: vec![],
                    github: GitHubCheck::NotChecked,
                },
                GITHUB_SECRET_INCOMPLETE,
                "Secret team/gh (spec.github.credentialsSecretRef) has no webhookSecret; it needs webhookSecret, \
                 and either token or appId, installationId and privateKey",
            ),
            (
                Observed {
                    provider: Some(&ready),
                    github_keys: Some(vec!["appId"]),
                    missing_secrets: vec![],
                    github: GitHubCheck::NotChecked,
                },
                GITHUB_SECRET_INCOMPLETE,
                "Secret team/gh (spec.github.credentialsSecretRef) has no webhookSecret, installationId and \
                 privateKey; it needs webhookSecret, and either token or appId, installationId and privateKey",
            ),
            (
                Observed {
                    provider: Some(&ready),
                    github_keys: Some(vec!["webhookSecret"]),
                    missing_secrets: vec![],
                    github: GitHubCheck::NotChecked,
                },
                GITHUB_SECRET_INCOMPLETE,
                "Secret team/gh (spec.github.credentialsSecretRef) has no token (or appId, installationId and \
                 privateKey); it needs webhookSecret, and either token or appId, installationId and privateKey",
            ),
            (
                Observed {
                    provider: Some(&ready),
                    github_keys: Some(vec!["token", "webhookSecret"]),
                    missing_secrets: vec!["db", "api"],
                    github: GitHubCheck::NotChecked,
                },
                SECRET_NOT_FOUND,
                "Secrets team/db and team/api (spec.secretRefs) not found",
            ),
            (
                Observed {
                    provider: None,
                    github_keys: None,
                    missing_secrets: vec!["db"],
                    github: GitHubCheck::NotChecked,
                },
                CLOUD_PROVIDER_NOT_FOUND,
                "CloudProvider team/aws (spec.cloudProviderRef) not found; Secret team/gh \
                 (spec.github.credentialsSecretRef) not found; it needs webhookSecret, and either token or appId, \
                 installationId and privateKey; Secret team/db (spec.secretRefs) not found",
            ),
        ];
        let project = project(&["db", "api"]);
        for (observed, reason, message) in cases {
            let found = readiness(&project, &observed);
            assert_eq!((found.ready, found.reason, found.message.as_str()), (false, reason, message));
        }
    }

    #[test]
    fn githubs_answer_about_the_credentials_is_part_of_ready() {
        let ready = provider(Some(("True", "")));
        let observed = |github| Observed {
            provider: Some(&ready),
            github_keys: Some(vec!["token", "webhookSecret"]),
            missing_secrets: vec![],
            github,
        };
        let project = project(&[]);
        let repository = &project.spec.repository;
        let cases = [
            (GitHubCheck::Accepted, true, REFERENCES_FOUND, format!("GitHub accepts the credentials for {repository}")),
            (
                GitHubCheck::Unanswered("GitHub answered GET /repos/a/b with 502: x".into()),
                true,
                REFERENCES_FOUND,
                "GitHub could not be asked about the credentials (GitHub answered GET /repos/a/b with 502: x); asking again"
                    .into(),
            ),
            (
                GitHubCheck::Rejected("Bad credentials".into()),
                false,
                GITHUB_CREDENTIALS_REJECTED,
                "GitHub refused the credentials in Secret team/gh (Bad credentials); replace them".into(),
            ),
            (
                GitHubCheck::NoAccess,
                false,
                GITHUB_REPOSITORY_NOT_ACCESSIBLE,
                format!(
                    "GitHub shows the credentials in Secret team/gh no repository {repository}: install the App on \
                     it, or give the token read access to it"
                ),
            ),
            (
                GitHubCheck::Invalid("privateKey is not an RSA private key in PEM (as GitHub gives it)".into()),
                false,
                GITHUB_SECRET_INVALID,
                "Secret team/gh (spec.github.credentialsSecretRef): privateKey is not an RSA private key in PEM (as \
                 GitHub gives it)"
                    .into(),
            ),
        ];
        for (check, is_ready, reason, message) in cases {
            let found = readiness(&project, &observed(check));
            assert_eq!((found.ready, found.reason), (is_ready, reason));
            assert!(found.message.ends_with(&message), "{} does not end with {message}", found.message);
        }
    }

    #[test]
    fn ready_says_what_was_found_and_what_was_not_checked() {
        let ready = provider(Some(("True", "")));
        let app = Observed {
            provider: Some(&ready),
            github_keys: Some(vec!["appId", "installationId", "privateKey", "webhookSecret"]),
            missing_secrets: vec![],
            github: GitHubCheck::NotChecked,
        };
        let found = readiness(&project(&["db", "api"]), &app);
        assert_eq!(found.reason, REFERENCES_FOUND);
        assert_eq!(
            found.message,
            "CloudProvider aws is ready, Secret gh holds GitHub App credentials and a webhook secret, and its 2 \
             secretRefs Secrets exist; whether GitHub accepts the credentials is not checked"
        );
        let token = Observed { github_keys: Some(vec!["token", "webhookSecret"]), ..app };
        assert_eq!(
            readiness(&project(&[]), &token).message,
            "CloudProvider aws is ready, Secret gh holds a token and a webhook secret; whether GitHub accepts the \
             credentials is not checked"
        );
    }

    #[test]
    fn only_the_names_of_keys_with_a_value_are_kept() {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "gh"},
            "data": {"token": "czNjcmV0", "empty": "", "webhookSecret": "d2g="},
        }))
        .unwrap();
        assert_eq!(key_names(secret.data.unwrap()), ["token", "webhookSecret"]);
    }

    #[test]
    fn lists_read_as_prose() {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(join(&s(&["a"])), "a");
        assert_eq!(join(&s(&["a", "b"])), "a and b");
        assert_eq!(join(&s(&["a", "b", "c"])), "a, b and c");
    }
}
