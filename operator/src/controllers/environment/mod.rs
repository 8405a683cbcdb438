//! The Environment controller: the heart of the pipeline. Each reconcile reads as dereference
//! (Project, CloudProvider, stagely.yaml at the head commit, the owned BuildJobs) → plan (the
//! pure decision in [`plan`]) → apply (the calls in [`apply`]) → status (one write, only when
//! something changed).
//!
//! Fan-in is watch-driven: the controller owns the BuildJobs, so a BuildJob's status change wakes
//! its Environment; nothing polls. A stagely.yaml that cannot be used is reported on
//! `ConfigValid` and waits for a new commit; an unreachable repository is retried with backoff.

pub mod apply;
pub mod plan;
pub mod preview;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use stagely_api::keys;
use stagely_api::v1alpha1::{
    BuildJob, BuildJobPhase, CloudProvider, Environment, EnvironmentPhase, EnvironmentStatus,
    GITHUB_FEEDBACK_CONDITION, Project,
};

use self::plan::{CLEANED_UP, ConfigState, Observed};
use crate::controllers::cleanup;
use crate::controllers::conditions::set_condition;
use crate::controllers::events::Recorder;
use crate::controllers::{Listed, MAX_CONCURRENT_RECONCILES, Written, cached, strip};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::routes::Routes;
use crate::source::{ConfigLoader, Repo};

/// The controller's name, as events report it.
pub const CONTROLLER: &str = "stagely-environment-controller";

/// How soon a transient problem (an unreachable repository, Redis down, a registry error) is
/// looked at again.
const RETRY: Duration = Duration::from_secs(15);
/// How often an Environment is looked at without news, as a safety net behind the watches: a
/// requeue while it is on its way, the resync sweep once it is Ready.
const RESYNC: Duration = Duration::from_secs(600);
/// How long deletion keeps trying before it releases the Environment and reports what is left.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(600);

/// What the reconciler needs.
pub struct Context {
    /// The cluster.
    pub client: Client,
    recorder: Recorder,
    loader: Arc<ConfigLoader>,
    registry: Option<Registry>,
    routes: Option<Arc<Routes>>,
    metrics: Metrics,
    jobs: Option<Store<BuildJob>>,
    /// Whether `jobs` has listed the BuildJobs (see [`Listed`]).
    jobs_listed: Option<Listed>,
    preview: Option<preview::Preview>,
    wake: tokio::sync::mpsc::UnboundedSender<ObjectRef<Environment>>,
    woken: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Environment>>>>,
    projects: Option<Store<Project>>,
    providers: Option<Store<CloudProvider>>,
    /// Statuses written that the watch cache may not show yet (without `lastHeartbeat`).
    written: Written<EnvironmentStatus>,
    /// GitHub: where stagely.yaml and the clone token of GitHub repositories come from.
    github: Option<Arc<crate::github::GitHub>>,
}

impl Context {
    /// A context reading stagely.yaml through `loader`, pushing images to `registry` and writing
    /// routes to `routes` (each optional: without a registry nothing is built, without Redis no
    /// route is written).
    pub fn new(
        client: Client,
        loader: Arc<ConfigLoader>,
        registry: Option<Registry>,
        routes: Option<Arc<Routes>>,
        metrics: Metrics,
    ) -> Self {
        let reporter = Reporter { controller: CONTROLLER.into(), instance: std::env::var("POD_NAME").ok() };
        let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            loader,
            registry,
            routes,
            metrics,
            jobs: None,
            jobs_listed: None,
            preview: None,
            wake,
            woken: std::sync::Mutex::new(Some(woken)),
            projects: None,
            providers: None,
            written: Written::default(),
            github: None,
        }
    }

    /// Reads GitHub repositories through `github` (the contents API, clone tokens).
    pub fn with_github(mut self, github: Option<Arc<crate::github::GitHub>>) -> Self {
        self.github = github;
        self
    }

    /// Runs previews too: a preview VM per Environment started through `endpoints` (holding a
    /// slot of `capacity`, shared with the BuildJob controller), DEPLOY through `gateway`.
    pub fn with_previews(
        mut self,
        gateway: crate::gateway::Gateway,
        endpoints: crate::providers::account::Endpoints,
        agents: crate::controllers::vm::AgentSettings,
        capacity: Arc<crate::controllers::capacity::Capacity>,
        agent_connect: Duration,
    ) -> Self {
        let followed = self.metrics.followed("environment");
        self.preview = Some(preview::Preview::new(
            gateway,
            endpoints,
            agents,
            capacity,
            agent_connect,
            self.wake.clone(),
            followed,
        ));
        self
    }
}

/// Records an Event on `env` (failures to record are logged, never fatal).
pub(crate) async fn event(ctx: &Context, env: &Environment, warning: bool, reason: &str, note: String) {
    let type_ = if warning { EventType::Warning } else { EventType::Normal };
    ctx.recorder.record(&env.object_ref(&()), type_, "Reconcile", reason, note).await;
}

/// Why a reconcile failed (and will be retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An apiserver call failed.
    #[error("failed to {action} for Environment {namespace}/{name}: {source}")]
    Kube {
        /// What was attempted.
        action: &'static str,
        /// The Environment's namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The cause.
        source: kube::Error,
    },
    /// Deletion is waiting for something to go.
    #[error("Environment {namespace}/{name} is waiting for {what}")]
    Waiting {
        /// The Environment's namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What is still there.
        what: String,
    },
    /// A command could not be queued for the preview agent.
    #[error("failed to send a command to the preview agent of Environment {namespace}/{name}: {message}")]
    Gateway {
        /// The Environment's namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What the gateway said.
        message: String,
    },
    /// The finalizer machinery failed.
    #[error("failed to run the finalizer of an Environment: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "ApiError",
            Error::Waiting { .. } => "Waiting",
            Error::Gateway { .. } => "GatewayError",
            Error::Finalizer(_) => "FinalizerError",
        }
    }
}

/// A fresh subdomain hash: 12 lowercase alphanumeric characters (a NanoID over that alphabet).
pub fn new_subdomain_hash() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut hash = String::with_capacity(12);
    while hash.len() < 12 {
        let mut bytes = [0u8; 16];
        // The OS random source does not fail on Linux once booted.
        getrandom::fill(&mut bytes).expect("the OS random source works");
        // 252 = 7 × 36: bytes above it would bias the alphabet.
        hash.extend(bytes.iter().filter(|b| **b < 252).map(|b| ALPHABET[usize::from(*b) % 36] as char));
    }
    hash.truncate(12);
    hash
}

/// Reconciles one Environment, in a span naming it and the webhook delivery that last applied
/// it, so that every log line of the reconcile carries both.
pub async fn reconcile(env: Arc<Environment>, ctx: Arc<Context>) -> Result<Action, Error> {
    use tracing::Instrument;
    let started = std::time::Instant::now();
    let namespace = env.namespace().unwrap_or_default();
    let delivery = env.annotations().get(keys::GITHUB_DELIVERY).map_or("", String::as_str);
    let span = tracing::info_span!("reconcile_environment", %namespace, environment = %env.name_any(), delivery);
    let api: Api<Environment> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, keys::ENVIRONMENT_FINALIZER, env, |event| async {
        match event {
            Finalizer::Apply(env) => run_pipeline(&latest(env, &ctx), &ctx).await,
            Finalizer::Cleanup(env) => {
                ctx.written.forget(&env.uid().unwrap_or_default());
                cleanup(&env, &ctx).await
            }
        }
    })
    .instrument(span)
    .await
    .map_err(|err| match err {
        kube::runtime::finalizer::Error::ApplyFailed(err) | kube::runtime::finalizer::Error::CleanupFailed(err) => err,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled_after("environment", result.as_ref().map_or_else(Error::reason, |_| "ok"), started);
    result
}

/// Keeps of a BuildJob what this controller reads (its commit, service, platform and image; its
/// phase, digest and message; its owner, deletion and cancel annotation): the BuildJob
/// controller's own cache has the rest, and this one holds every BuildJob of the cluster.
fn slim_job(job: &mut BuildJob) {
    strip(job);
    job.metadata.labels = None;
    if let Some(annotations) = &mut job.metadata.annotations {
        annotations.retain(|key, _| key == keys::CANCEL);
    }
    job.metadata.finalizers = None;
    job.metadata.creation_timestamp = None;
    let spec = &mut job.spec;
    spec.build_args = Default::default();
    spec.cache_from = Vec::new();
    spec.cache_to = None;
    spec.context = String::new();
    spec.dockerfile = String::new();
    spec.repository = String::new();
    spec.timeout = String::new();
    if let Some(status) = &mut job.status {
        status.conditions = Vec::new();
        status.vm = None;
        // The message is read only to say why a build failed or waits.
        if !matches!(status.phase, Some(BuildJobPhase::Failed | BuildJobPhase::Queued)) {
            status.message = None;
        }
    }
}

/// The part of a status this controller writes: all but the gateway's `lastHeartbeat` and the
/// GitHub feedback's `github` and `GitHubFeedback` condition, which are other writers' own.
fn own_part(status: &EnvironmentStatus) -> EnvironmentStatus {
    let mut own = status.clone();
    own.last_heartbeat = None;
    own.github = None;
    own.conditions.retain(|c| c.type_ != GITHUB_FEEDBACK_CONDITION);
    own
}

/// `own` with the other writers' fields of `from` put back.
fn with_others(mut own: EnvironmentStatus, from: &EnvironmentStatus) -> EnvironmentStatus {
    own.last_heartbeat = from.last_heartbeat.clone();
    own.github = from.github.clone();
    own.conditions.retain(|c| c.type_ != GITHUB_FEEDBACK_CONDITION);
    own.conditions.extend(from.conditions.iter().filter(|c| c.type_ == GITHUB_FEEDBACK_CONDITION).cloned());
    own
}

/// What of an Environment a reconcile acts on: all but the other writers' fields (see
/// [`own_part`]). The gateway writes `lastHeartbeat` about once a minute for every preview agent
/// and it changes no decision: at thousands of Environments those writes would otherwise wake
/// dozens of reconciles a second; nor does what GitHub was told.
fn beyond_heartbeat(env: &Environment) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let meta = &env.metadata;
    (meta.generation, meta.deletion_timestamp.is_some(), &meta.finalizers, &meta.labels, &meta.annotations)
        .hash(&mut hasher);
    let status = own_part(&env.status.clone().unwrap_or_default());
    serde_json::to_string(&status).ok()?.hash(&mut hasher);
    Some(hasher.finish())
}

/// `env` with the status this controller last wrote, while the watch cache shows an older one.
fn latest(env: Arc<Environment>, ctx: &Context) -> Arc<Environment> {
    let cached = env.status.clone().unwrap_or_default();
    match ctx.written.newer(&env.uid().unwrap_or_default(), &own_part(&cached)) {
        Some(newer) => {
            let mut env = Environment::clone(&env);
            env.status = Some(with_others(newer, &cached));
            Arc::new(env)
        }
        None => env,
    }
}

/// The owned BuildJobs of `env`, from the reflector.
fn owned_jobs(env: &Environment, ctx: &Context) -> Vec<BuildJob> {
    let uid = env.uid().unwrap_or_default();
    let namespace = env.namespace();
    let Some(store) = &ctx.jobs else { return Vec::new() };
    let mut jobs: Vec<BuildJob> = store
        .state()
        .into_iter()
        .filter(|job| job.namespace() == namespace && job.owner_references().iter().any(|owner| owner.uid == uid))
        .map(|job| (*job).clone())
        .collect();
    jobs.sort_by_key(ResourceExt::name_any);
    jobs
}

async fn run_pipeline(env: &Environment, ctx: &Context) -> Result<Action, Error> {
    let namespace = env.namespace().unwrap_or_default();
    let name = env.name_any();
    let kube_error = |action: &'static str| {
        let (namespace, name) = (namespace.clone(), name.clone());
        move |source| Error::Kube { action, namespace, name, source }
    };
    if let Some(listed) = &ctx.jobs_listed {
        // The first reconciles must not mistake an unsynced cache for "no BuildJobs yet".
        listed.wait().await;
    }

    // Dereference, from the watches' caches.
    let project = cached(ctx.projects.as_ref(), &ctx.client, &namespace, &env.spec.project_ref.name)
        .await
        .map_err(kube_error("read the Project"))?;
    let provider = match &project {
        Some(project) => cached(ctx.providers.as_ref(), &ctx.client, &namespace, &project.spec.cloud_provider_ref.name)
            .await
            .map_err(kube_error("read the CloudProvider"))?,
        None => None,
    };
    let sha = env.spec.pull_request.head_sha.clone();
    let loaded = match &project {
        Some(project) => {
            let github = crate::controllers::github_repo(project, ctx.github.as_deref());
            let repo = Repo { clone_url: project.spec.clone_url(), token: None, github };
            Some(ctx.loader.load(&repo, &sha).await)
        }
        None => None,
    };
    let problem_message = match &loaded {
        Some(Err(problem)) => problem.to_string(),
        _ => String::new(),
    };
    let config = loaded.as_ref().map(|result| match result {
        Ok(config) => ConfigState::Loaded(config),
        Err(problem) => ConfigState::Problem {
            reason: problem.reason(),
            message: &problem_message,
            permanent: problem.is_permanent(),
        },
    });
    let jobs = owned_jobs(env, ctx);

    // Plan.
    let hash = new_subdomain_hash();
    let decided = plan::plan(&Observed {
        environment: env,
        project: project.as_deref(),
        provider: provider.as_deref(),
        config,
        jobs: &jobs,
        registry: ctx.registry.as_ref().map(Registry::host),
        new_hash: &hash,
        now: Timestamp::now(),
    });

    // Apply.
    let mut status = decided.status;
    let outcome = apply::apply(env, &decided.actions, &mut status, ctx).await?;

    // Preview: once every image is known, the VM, DEPLOY and the route.
    let mut requeue = None;
    let images_known = status.run.as_ref().is_some_and(|run| {
        let services: std::collections::BTreeSet<&str> = run.builds.iter().map(|b| b.service.as_str()).collect();
        services.iter().all(|s| run.images.contains_key(*s))
    });
    if status.phase == Some(EnvironmentPhase::Deploying)
        && images_known
        && let (Some(project), Some(Ok(config))) = (&project, &loaded)
    {
        let inputs = preview::Inputs { project, provider: provider.as_deref(), config: config.as_ref() };
        requeue = preview::advance(env, &mut status, &inputs, ctx).await?.requeue;
    }

    // Status.
    // Server-side apply of the whole status: a field this controller no longer sets (the
    // images of a superseded run) is removed, which a merge patch would leave behind. The
    // gateway's `lastHeartbeat` is its own and never part of it.
    let previous = env.status.clone().unwrap_or_default();
    let applied = own_part(&status);
    if own_part(&previous) != applied {
        let patch = json!({
            "apiVersion": "stagely.dev/v1alpha1",
            "kind": "Environment",
            "status": applied,
        });
        Api::<Environment>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(&name, &PatchParams::apply(keys::MANAGER_OPERATOR).force(), &Patch::Apply(&patch))
            .await
            .map_err(kube_error("write the status"))?;
        ctx.written.wrote(&env.uid().unwrap_or_default(), &applied);
    }
    if let Some(waited) = crate::metrics::webhook_to_ready(env, &previous, &status) {
        tracing::info!(seconds = waited.as_secs_f64(), "ready, counted from the webhook that started the run");
        ctx.metrics.ready_after_webhook(waited);
    }
    record_transitions(env, &previous, &status, ctx).await;

    let retry = decided.retry || outcome.retry;
    Ok(match status.phase {
        _ if retry => Action::requeue(RETRY),
        _ if requeue.is_some() => Action::requeue(requeue.unwrap_or(RETRY)),
        // A run that cannot go on waits for a change; it is not retried in a loop.
        Some(EnvironmentPhase::Failed) => Action::await_change(),
        // The resync sweep looks at it again.
        Some(EnvironmentPhase::Ready) => Action::await_change(),
        _ => Action::requeue(RESYNC),
    })
}

/// Events when the phase or a condition's status changes: a warning each, and the rest of one
/// status write as one Event (see [`transitions`]).
async fn record_transitions(
    env: &Environment,
    previous: &EnvironmentStatus,
    status: &EnvironmentStatus,
    ctx: &Context,
) {
    let delivery = env.annotations().get(keys::GITHUB_DELIVERY).map(String::as_str);
    let (warnings, normal) = transitions(previous, status, delivery);
    // A stuck run failed instead of hanging is the reaper's kind of action: counted as one.
    for (reason, _) in &warnings {
        if matches!(reason.as_str(), plan::BUILD_STUCK | preview::DEPLOY_STUCK_REASON) {
            ctx.metrics.reap(reason);
        }
    }
    for (reason, note) in warnings {
        event(ctx, env, true, &reason, note).await;
    }
    if let Some((reason, note)) = normal {
        event(ctx, env, false, &reason, note).await;
    }
}

/// An Event's reason and note.
type Change = (String, String);

/// Reasons of a condition that is `False` because its step has not finished yet (or waits on an
/// earlier one): told in the Normal Event of the write, never as a warning.
const IN_PROGRESS: &[&str] = &[
    "Building",
    "ConfigNotValid",
    "NotServing",
    "Booting",
    "Waiting",
    "WaitingForCapacity",
    "Deploying",
    "Running",
    "CleaningUp",
];

/// What changed from `previous` to `status`, as Events' reasons and notes: each warning (the
/// phase `Failed`, a condition turned `False` for a failure) on its own, and every other change
/// together as one, named by the new phase or else by the first change, its note listing them
/// all, a new run first (its commit, and the webhook `delivery` that last applied the
/// Environment, if one did). (An Event per change cost the apiserver about ten writes per
/// Environment on its way to Ready, most of its requests at scale: `make bench-operator`.)
fn transitions(
    previous: &EnvironmentStatus,
    status: &EnvironmentStatus,
    delivery: Option<&str>,
) -> (Vec<Change>, Option<Change>) {
    let (mut warnings, mut changes) = (Vec::new(), Vec::new());
    if previous.phase != status.phase
        && let Some(phase) = status.phase
    {
        let note = format!("phase {phase:?}{}", status.url.as_ref().map(|u| format!(" ({u})")).unwrap_or_default());
        let list = if phase == EnvironmentPhase::Failed { &mut warnings } else { &mut changes };
        list.push((format!("{phase:?}"), note));
    }
    for condition in &status.conditions {
        let before = previous.conditions.iter().find(|c| c.type_ == condition.type_);
        if before.is_none_or(|b| b.status != condition.status || b.reason != condition.reason) {
            let warning = condition.status == "False" && !IN_PROGRESS.contains(&condition.reason.as_str());
            let list = if warning { &mut warnings } else { &mut changes };
            list.push((condition.reason.clone(), format!("{}: {}", condition.type_, condition.message)));
        }
    }
    let reason = changes.first().map(|(reason, _)| reason.clone());
    if let Some(run) = &status.run
        && previous.run.as_ref().is_none_or(|before| before.sha != run.sha)
    {
        let short = &run.sha[..run.sha.len().min(12)];
        let from = delivery.map(|id| format!(" (webhook delivery {id})")).unwrap_or_default();
        changes.insert(0, ("RunStarted".to_owned(), format!("run of commit {short} started{from}")));
    }
    let normal = reason
        .or_else(|| changes.first().map(|(reason, _)| reason.clone()))
        .map(|reason| (reason, changes.iter().map(|(_, note)| note.as_str()).collect::<Vec<_>>().join("; ")));
    (warnings, normal)
}

/// Tears an Environment down: its BuildJobs (whose finalizers stop their VMs) and its route.
async fn cleanup(env: &Environment, ctx: &Context) -> Result<Action, Error> {
    let namespace = env.namespace().unwrap_or_default();
    let name = env.name_any();
    let kube_error = |action: &'static str| {
        let (namespace, name) = (namespace.clone(), name.clone());
        move |source| Error::Kube { action, namespace, name, source }
    };
    let api: Api<Environment> = Api::namespaced(ctx.client.clone(), &namespace);
    if env.status.as_ref().and_then(|s| s.phase) != Some(EnvironmentPhase::Terminating) {
        api.patch_status(
            &name,
            &PatchParams::apply(keys::MANAGER_OPERATOR),
            &Patch::Merge(json!({ "status": { "phase": EnvironmentPhase::Terminating } })),
        )
        .await
        .map_err(kube_error("mark as Terminating"))?;
        let note = "tearing down: the route goes first (the URL answers 404), then the app, its VM, the builds and \
                    the images";
        event(ctx, env, false, "Terminating", note.to_owned()).await;
    }
    let mut leftovers = Vec::new();
    if let (Some(routes), Some(hash)) = (&ctx.routes, env.status.as_ref().and_then(|s| s.subdomain_hash.as_deref())) {
        // Users stop reaching a dying app first; the proxy answers 404 from now on. Redis down
        // holds the finalizer (and counts toward its deadline), not the rest: the VM still goes.
        if let Err(err) = routes.delete(hash).await {
            tracing::warn!(%namespace, %name, error = %err, "cannot delete the route yet");
            leftovers.push(format!("its route to be deleted ({err})"));
        }
    }
    // The preview: TERMINATE to its agent, its VM, its registry tags.
    let provider = match cached(ctx.projects.as_ref(), &ctx.client, &namespace, &env.spec.project_ref.name)
        .await
        .map_err(kube_error("read the Project"))?
    {
        Some(project) => cached(ctx.providers.as_ref(), &ctx.client, &namespace, &project.spec.cloud_provider_ref.name)
            .await
            .map_err(kube_error("read the CloudProvider"))?,
        // The Project went first (as when a namespace is deleted whole): with one CloudProvider
        // in the namespace, the VM can only be there; with several, the orphan sweep finds it.
        None => {
            let providers = Api::<stagely_api::v1alpha1::CloudProvider>::namespaced(ctx.client.clone(), &namespace)
                .list(&kube::api::ListParams::default())
                .await
                .map_err(kube_error("list the CloudProviders"))?;
            match <[_; 1]>::try_from(providers.items) {
                Ok([only]) => Some(Arc::new(only)),
                Err(_) => None,
            }
        }
    };
    leftovers.extend(preview::teardown(env, ctx, provider.as_deref()).await);

    // The BuildJobs, whose finalizers stop their builder VMs.
    let jobs_api: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let jobs = owned_jobs(env, ctx);
    for job in &jobs {
        if job.metadata.deletion_timestamp.is_none() {
            apply::delete_job(&jobs_api, &job.name_any()).await.map_err(kube_error("delete a BuildJob"))?;
        }
    }
    if !jobs.is_empty() {
        let names: Vec<_> = jobs.iter().map(ResourceExt::name_any).collect();
        leftovers.push(format!("BuildJobs {} (stopping their VMs)", names.join(", ")));
    }
    if !leftovers.is_empty() {
        let what = leftovers.join("; ");
        let Some(why) = cleanup::give_up(&env.metadata, CLEANUP_DEADLINE, Timestamp::now()) else {
            report_cleanup(env, &what, ctx).await;
            return Err(Error::Waiting { namespace, name, what });
        };
        // Past the deadline (or told to by an admin) the Environment goes; what is left is said,
        // and the orphan sweep (which finds VMs by their owner tag) keeps trying.
        let note = format!("gave up cleaning up ({why}); left: {what}");
        tracing::warn!(%namespace, %name, %note, "releasing the finalizer");
        event(ctx, env, true, "CleanupAbandoned", note).await;
    } else {
        event(ctx, env, false, "TornDown", "torn down: its route, VM, builds and images are gone".to_owned()).await;
    }
    tracing::info!(%namespace, %name, "environment torn down");
    Ok(Action::await_change())
}

/// Says in the status (condition `CleanedUp`, False) what the teardown still waits for, once per
/// change, with an Event: `kubectl describe env` shows why a deletion takes its time.
async fn report_cleanup(env: &Environment, what: &str, ctx: &Context) {
    let status = env.status.clone().unwrap_or_default();
    let message = format!("waiting for {what}");
    if status.conditions.iter().any(|c| c.type_ == CLEANED_UP && c.message == message) {
        return;
    }
    let mut conditions = status.conditions;
    set_condition(
        &mut conditions,
        CLEANED_UP,
        false,
        "CleaningUp",
        &message,
        env.metadata.generation,
        Timestamp::now(),
    );
    let api: Api<Environment> = Api::namespaced(ctx.client.clone(), &env.namespace().unwrap_or_default());
    let patch = json!({ "status": { "conditions": conditions } });
    if let Err(err) =
        api.patch_status(&env.name_any(), &PatchParams::apply(keys::MANAGER_OPERATOR), &Patch::Merge(&patch)).await
    {
        tracing::debug!(name = %env.name_any(), error = %err, "cannot report the cleanup yet");
    }
    event(ctx, env, false, "CleaningUp", message).await;
}

fn error_policy(env: Arc<Environment>, err: &Error, _ctx: Arc<Context>) -> Action {
    match err {
        Error::Waiting { .. } => {
            tracing::debug!(name = %env.name_any(), error = %err, "waiting");
            Action::requeue(cleanup::retry_after(&env.metadata, Timestamp::now()))
        }
        _ => {
            tracing::warn!(namespace = ?env.namespace(), name = %env.name_any(), error = %err, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// Every Ready Environment, again once per `period`, spread evenly over it; the first look a
/// period after the start. One sweep stands in for a timer per Ready Environment: each such timer
/// keeps a copy of its object's reference in the controller's scheduler, and thousands of
/// long-lived previews add up to megabytes. Between two looks only names are held.
fn resync_sweep(
    store: Store<Environment>,
    period: Duration,
) -> impl futures_util::Stream<Item = ObjectRef<Environment>> + Send {
    struct Sweep {
        store: Store<Environment>,
        /// Namespace and name of those still to look at this round, the next last.
        due: Vec<(Box<str>, Box<str>)>,
        gap: Duration,
        started: bool,
    }
    let sweep = Sweep { store, due: Vec::new(), gap: period, started: false };
    futures_util::stream::unfold(sweep, move |mut sweep| async move {
        loop {
            if let Some((namespace, name)) = sweep.due.pop() {
                tokio::time::sleep(sweep.gap).await;
                return Some((ObjectRef::new(&name).within(&namespace), sweep));
            }
            if !sweep.started {
                sweep.started = true;
                tokio::time::sleep(period).await;
            }
            sweep.due = sweep
                .store
                .state()
                .iter()
                .filter(|env| env.status.as_ref().and_then(|s| s.phase) == Some(EnvironmentPhase::Ready))
                .map(|env| (env.namespace().unwrap_or_default().into(), env.name_any().into()))
                .collect();
            if sweep.due.is_empty() {
                tokio::time::sleep(period).await;
                continue;
            }
            sweep.gap = period / u32::try_from(sweep.due.len()).unwrap_or(u32::MAX);
        }
    })
}

/// Runs the controller until `shutdown` resolves: every Environment, woken by its BuildJobs and
/// by changes to its Project's spec. Projects and CloudProviders are read from watch caches.
pub async fn run(mut ctx: Context, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (jobs, jobs_writer) = reflector::store::<BuildJob>();
    ctx.jobs_listed = Some(Listed::of(&jobs));
    ctx.jobs = Some(jobs);
    let job_events = watcher(Api::<BuildJob>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(slim_job)
        .reflect(jobs_writer)
        .touched_objects();
    let (projects, projects_writer) = reflector::store::<Project>();
    ctx.projects = Some(projects.clone());
    let project_events = watcher(Api::<Project>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(projects_writer)
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default());
    let (providers, providers_writer) = reflector::store::<CloudProvider>();
    ctx.metrics.count_cloud_providers(providers.clone());
    ctx.providers = Some(providers);
    // Only keeps the cache current: a CloudProvider's change wakes no Environment.
    let provider_events = watcher(Api::<CloudProvider>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(providers_writer)
        .touched_objects();
    // Secret changes redeploy the Environments of the Projects that reference them; only the
    // metadata is watched, so no secret value is held here.
    let secret_events = watcher(
        Api::<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    let (environments, environments_writer) = reflector::store::<Environment>();
    ctx.metrics.count_environments(environments.clone());
    let environment_events = watcher(Api::<Environment>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(environments_writer)
        .touched_objects()
        .predicate_filter(beyond_heartbeat, Default::default());
    let controller = Controller::for_stream(environment_events, environments.clone())
        .with_config(controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES));
    let of_project = {
        let environments = environments.clone();
        move |namespace: Option<String>, name: String| {
            environments
                .state()
                .into_iter()
                .filter(|env| env.namespace() == namespace && env.spec.project_ref.name == name)
                .map(|env| ObjectRef::from_obj(&*env))
                .collect::<Vec<_>>()
        }
    };
    let by_project = of_project.clone();
    let by_secret = move |secret: kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>| {
        let namespace = secret.namespace();
        let name = secret.name_any();
        projects
            .state()
            .into_iter()
            .filter(|p| p.namespace() == namespace && p.spec.secret_refs.iter().any(|r| r.name == name))
            .flat_map(|p| of_project(namespace.clone(), p.name_any()))
            .collect::<Vec<_>>()
    };
    // DEPLOY's STATUS updates, and capacity slots freed for a waiting preview VM.
    let woken = ctx.woken.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    let deploys = futures_util::stream::unfold(woken, |woken| async move {
        let mut woken = woken?;
        let next = woken.recv().await?;
        Some((next, Some(woken)))
    });
    let slots = match &ctx.preview {
        Some(preview) => {
            let environments = environments.clone();
            futures_util::stream::unfold(Some(preview.capacity.subscribe()), |wakes| async move {
                let mut wakes = wakes?;
                loop {
                    match wakes.recv().await {
                        Ok(uid) => return Some((uid, Some(wakes))),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            })
            .filter_map(move |uid| {
                let found = environments.state().into_iter().find(|env| env.uid().as_deref() == Some(uid.as_str()));
                std::future::ready(found.map(|env| ObjectRef::from_obj(&*env)))
            })
            .boxed()
        }
        None => futures_util::stream::empty().boxed(),
    };
    let sweep = resync_sweep(environments.clone(), RESYNC);
    controller
        .owns_stream(job_events)
        .watches_stream(provider_events, |_: CloudProvider| std::iter::empty::<ObjectRef<Environment>>())
        .watches_stream(project_events, move |project: Project| by_project(project.namespace(), project.name_any()))
        .watches_stream(secret_events, by_secret)
        .reconcile_on(deploys)
        .reconcile_on(slots)
        .reconcile_on(sweep)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move { crate::controllers::log_run("environment", result) })
        .await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use futures_util::StreamExt;
    use kube::runtime::watcher;

    use super::*;

    fn env(name: &str, phase: EnvironmentPhase) -> Environment {
        serde_json::from_value(json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "Environment",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {
                "projectRef": {"name": "shop"},
                "pullRequest": {"number": 1, "headSha": "abc", "headRef": "feature", "baseRef": "main"},
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_resync_sweep_looks_at_each_ready_environment_once_a_period_spread_over_it() {
        let (store, mut writer) = reflector::store::<Environment>();
        for (name, phase) in [
            ("a", EnvironmentPhase::Ready),
            ("b", EnvironmentPhase::Failed),
            ("c", EnvironmentPhase::Ready),
            ("d", EnvironmentPhase::Building),
            ("e", EnvironmentPhase::Ready),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(env(name, phase)));
        }
        let period = Duration::from_secs(60);
        let start = tokio::time::Instant::now();
        let sweep = resync_sweep(store, period);
        futures_util::pin_mut!(sweep);
        let mut rounds = Vec::new();
        for _ in 0..2 {
            let mut round = BTreeSet::new();
            for _ in 0..3 {
                let next = sweep.next().await.unwrap();
                assert_eq!(next.namespace.as_deref(), Some("team"));
                round.insert((next.name.clone(), start.elapsed()));
            }
            rounds.push(round);
        }
        for (i, round) in rounds.iter().enumerate() {
            let names: BTreeSet<&str> = round.iter().map(|(name, _)| name.as_str()).collect();
            assert_eq!(names, BTreeSet::from(["a", "c", "e"]), "only the Ready ones, each once a round");
            // Round i spans ((i + 1) * period, (i + 2) * period], a third of it between two looks.
            let mut times: Vec<Duration> = round.iter().map(|(_, at)| *at).collect();
            times.sort();
            assert!(times[0] > period * (i as u32 + 1) && times[2] <= period * (i as u32 + 2), "{times:?}");
            assert_eq!(times[1] - times[0], period / 3, "{times:?}");
        }
    }
}

#[cfg(test)]
mod transition_tests {
    use super::*;

    fn status(value: serde_json::Value) -> EnvironmentStatus {
        serde_json::from_value(value).unwrap()
    }

    fn condition(type_: &str, status: &str, reason: &str) -> serde_json::Value {
        json!({"type": type_, "status": status, "reason": reason, "message": format!("{type_} is {reason}"),
               "lastTransitionTime": "2026-12-03T00:00:00Z"})
    }

    #[test]
    fn the_changes_of_one_status_write_are_one_event_and_each_failure_one_more() {
        let before = status(json!({"phase": "Deploying", "conditions": [
            condition("VMReady", "False", "Provisioning"), condition("Routed", "False", "NotServing"),
        ]}));
        let after = status(json!({"phase": "Ready", "url": "https://h.preview.test", "conditions": [
            condition("VMReady", "True", "Running"), condition("Routed", "True", "Serving"),
        ]}));
        let (warnings, normal) = transitions(&before, &after, None);
        assert!(warnings.is_empty(), "{warnings:?}");
        let (reason, note) = normal.expect("one Event for the write");
        assert_eq!(reason, "Ready", "named by the new phase");
        assert_eq!(
            note,
            "phase Ready (https://h.preview.test); VMReady: VMReady is Running; Routed: Routed is Serving"
        );

        let failed = status(json!({"phase": "Failed", "conditions": [
            condition("VMReady", "True", "Running"), condition("Deployed", "False", "ServiceExited"),
            condition("Routed", "False", "NotServing"),
        ]}));
        let (warnings, normal) = transitions(&after, &failed, None);
        let reasons: Vec<&str> = warnings.iter().map(|(reason, _)| reason.as_str()).collect();
        assert_eq!(reasons, ["Failed", "ServiceExited"], "each failure is a warning of its own");
        assert_eq!(normal.map(|(reason, _)| reason).as_deref(), Some("NotServing"), "named by the first change");

        assert_eq!(transitions(&failed, &failed, None), (Vec::new(), None), "nothing changed, no Event");
    }

    #[test]
    fn steps_in_progress_are_normal_events_not_warnings() {
        let before = status(json!({"phase": "Building"}));
        for reason in ["Booting", "WaitingForCapacity", "Waiting", "Deploying", "Running", "NotServing"] {
            let after = status(json!({"phase": "Deploying", "conditions": [condition("Step", "False", reason)]}));
            let (warnings, normal) = transitions(&before, &after, None);
            assert!(warnings.is_empty(), "{reason} is progress, not a warning: {warnings:?}");
            assert_eq!(normal.unwrap().0, "Deploying");
        }
        let after = status(json!({"phase": "Deploying"}));
        let stuck = status(json!({"phase": "Deploying", "conditions": [
            condition("AgentConnected", "False", "AgentNeverConnected"),
        ]}));
        let (warnings, _) = transitions(&after, &stuck, None);
        assert_eq!(warnings.len(), 1, "a failure still is: {warnings:?}");
    }

    #[test]
    fn a_new_run_is_told_first_with_its_commit_and_the_delivery_that_asked_for_it() {
        let ready = status(json!({"phase": "Ready", "run": {"sha": "a".repeat(40)}, "conditions": [
            condition("BuildsSucceeded", "True", "Built"),
        ]}));
        let building = status(json!({"phase": "Building", "run": {"sha": "b".repeat(40)}, "conditions": [
            condition("BuildsSucceeded", "False", "Building"),
        ]}));
        let (warnings, normal) = transitions(&ready, &building, Some("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        assert!(warnings.is_empty(), "{warnings:?}");
        let (reason, note) = normal.unwrap();
        assert_eq!(reason, "Building", "still named by the new phase");
        assert_eq!(
            note,
            "run of commit bbbbbbbbbbbb started (webhook delivery 72d3162e-cc78-11e3-81ab-4c9367dc0958); \
             phase Building; BuildsSucceeded: BuildsSucceeded is Building"
        );
        let first = status(json!({"run": {"sha": "c".repeat(40)}}));
        let (_, normal) = transitions(&EnvironmentStatus::default(), &first, None);
        assert_eq!(normal.unwrap(), ("RunStarted".to_owned(), "run of commit cccccccccccc started".to_owned()));
        assert_eq!(transitions(&building, &building, Some("d")), (Vec::new(), None), "the same run: nothing");
    }
}
