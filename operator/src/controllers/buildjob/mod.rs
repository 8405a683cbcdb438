//! The BuildJob controller: one image build on its own builder VM, which is terminated as soon as
//! the build ends.
//!
//! A reconcile reads as a pipeline: dereference (the Project named by the job's
//! `stagely.dev/project` label, its CloudProvider, a connected provider) → observe (the VM, the
//! agent's latest STATUS) → [`plan::plan`], a pure function giving the status and the next step
//! → the step (a capacity slot, the VM, BUILD, the VM's termination), whose outcome is observed
//! and planned again → the status written with server-side apply when it changed → Events,
//! the build-duration metric and, once the job has ended, its capacity slot released and its
//! gateway scope forgotten.
//!
//! Nothing polls the gateway: one task per job follows its BUILD's STATUS updates and wakes the
//! job's reconcile, as the capacity ledger does when a slot frees. kube's
//! `Controller::reconcile_on` needs an unstable feature, so [`run`] feeds those wake-ups, and the
//! watches of BuildJobs, CloudProviders and Projects, to kube's `applier` itself.

pub mod plan;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, ReconcileReason, ReconcileRequest, applier, trigger_self, trigger_with};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::CancelableJoinHandle;
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use stagely_api::keys;
use stagely_api::protocol::{Build, JobState, Message, RegistryAuth, Scope, ScopeKind};
use stagely_api::v1alpha1::{BuildJob, BuildJobPhase, BuildJobStatus, CloudProvider, Project};
use tokio::sync::mpsc;
use tracing::Instrument;

pub use self::plan::Timings;
use self::plan::{CreateFailure, Observed, ProviderView, Step, VmView, live_vm};
use crate::controllers::capacity::Capacity;
use crate::controllers::cleanup;
use crate::controllers::events::Recorder;
use crate::controllers::vm::{self, AgentSettings, VmError};
use crate::controllers::{MAX_CONCURRENT_RECONCILES, Written, cached, strip};
use crate::gateway::{Gateway, GatewayError};
use crate::metrics::{BuildLabels, Metrics};
use crate::providers::account::{self, AccountError, Endpoints};
use crate::providers::{self, ProviderError, Role};
use crate::registry::{Registry, RegistryError};

/// The controller's name, as events report it.
pub const CONTROLLER: &str = "stagely-buildjob-controller";

/// Lifetime of the registry credential a BUILD carries (the registry caps it at one hour).
const PUSH_CREDENTIAL_TTL: Duration = Duration::from_secs(3600);
/// Steps one reconcile takes at most (a slot, the VM, BUILD, termination).
const MAX_STEPS: usize = 6;
/// How long cleanup keeps trying a CloudProvider it cannot use before leaving the VM to the
/// orphan sweep.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(600);
/// Retry delay after a failed reconcile.
const RETRY: Duration = Duration::from_secs(10);
/// Longest Event note (the API's limit is 1 KiB).
const MAX_NOTE: usize = 1000;

/// What the reconciler needs.
pub struct Context {
    client: Client,
    gateway: Gateway,
    registry: Option<Registry>,
    endpoints: Endpoints,
    agents: AgentSettings,
    capacity: Arc<Capacity>,
    metrics: Metrics,
    timings: Timings,
    namespace: Option<String>,
    recorder: Recorder,
    followers: crate::controllers::follow::Followers<BuildJob>,
    woken: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<BuildJob>>>>,
    /// The watch caches of Projects and CloudProviders, once [`run`] started them.
    caches: Mutex<Option<Caches>>,
    /// Statuses written that the watch cache may not show yet (without `lastHeartbeat`).
    written: Written<BuildJobStatus>,
    /// GitHub, for clone tokens.
    github: Option<Arc<crate::github::GitHub>>,
}

/// The watch caches the reconcile reads Projects and CloudProviders from.
#[derive(Clone)]
struct Caches {
    projects: Store<Project>,
    providers: Store<CloudProvider>,
}

impl Context {
    /// A context for the controller: builder VMs are started through `endpoints` with agents
    /// configured by `agents`, BUILD goes through `gateway`, images are pushed to `registry`
    /// (or wherever `spec.image` says), and VMs hold slots of `capacity`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        gateway: Gateway,
        registry: Option<Registry>,
        endpoints: Endpoints,
        agents: AgentSettings,
        capacity: Arc<Capacity>,
        metrics: Metrics,
        timings: Timings,
    ) -> Self {
        let reporter = Reporter { controller: CONTROLLER.into(), instance: std::env::var("POD_NAME").ok() };
        let (wake, woken) = mpsc::unbounded_channel();
        let followed = metrics.followed("buildjob");
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            gateway,
            registry,
            endpoints,
            agents,
            capacity,
            metrics,
            timings,
            namespace: None,
            followers: crate::controllers::follow::Followers::new(wake, followed),
            woken: Mutex::new(Some(woken)),
            caches: Mutex::new(None),
            written: Written::default(),
            github: None,
        }
    }

    /// Clones GitHub repositories with short-lived tokens minted through `github`.
    pub fn with_github(mut self, github: Option<Arc<crate::github::GitHub>>) -> Self {
        self.github = github;
        self
    }

    /// Watches only `namespace` (a namespace-scoped install, or a test sharing a cluster).
    pub fn namespaced(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        }
    }
}

/// Why a reconcile failed (and will be retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading an object failed.
    #[error("failed to read {what} for BuildJob {job}: {source}")]
    Read {
        /// What was read.
        what: String,
        /// `<namespace>/<name>`.
        job: String,
        /// The API error.
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("failed to write the status of BuildJob {job}: {source}")]
    Status {
        /// `<namespace>/<name>`.
        job: String,
        /// The API error.
        source: kube::Error,
    },
    /// Marking a settled job and removing its finalizer failed.
    #[error("failed to mark BuildJob {job} settled: {source}")]
    Settle {
        /// `<namespace>/<name>`.
        job: String,
        /// The API error.
        source: kube::Error,
    },
    /// The CloudProvider's credentials could not be read.
    #[error("failed to connect CloudProvider {provider} for BuildJob {job}: {source}")]
    Account {
        /// `<namespace>/<name>` of the CloudProvider.
        provider: String,
        /// `<namespace>/<name>`.
        job: String,
        /// The cause.
        source: Box<AccountError>,
    },
    /// A push credential could not be issued.
    #[error("failed to issue a push credential for BuildJob {job}: {source}")]
    Registry {
        /// `<namespace>/<name>`.
        job: String,
        /// The cause.
        source: RegistryError,
    },
    /// BUILD could not be handed to the gateway.
    #[error("failed to send BUILD for BuildJob {job}: {source}")]
    Gateway {
        /// `<namespace>/<name>`.
        job: String,
        /// The cause.
        source: GatewayError,
    },
    /// GitHub gave no clone token.
    #[error("failed to get a GitHub clone token for BuildJob {job}: {source}")]
    GitHub {
        /// `<namespace>/<name>`.
        job: String,
        /// GitHub's answer.
        source: crate::github::GitHubError,
    },
    /// BUILD needs what is missing.
    #[error("failed to send BUILD for BuildJob {job}: {why}")]
    NotSendable {
        /// `<namespace>/<name>`.
        job: String,
        /// What is missing.
        why: String,
    },
    /// The builder VM could not be terminated.
    #[error("failed to terminate the builder VM of BuildJob {job}: {source}")]
    Terminate {
        /// `<namespace>/<name>`.
        job: String,
        /// The provider's answer.
        source: ProviderError,
    },
    /// No provider to terminate the builder VM with.
    #[error("failed to terminate the builder VM of BuildJob {job}: {why}")]
    NoProvider {
        /// `<namespace>/<name>`.
        job: String,
        /// Why the provider cannot be used.
        why: String,
    },
    /// Adding or removing the finalizer failed.
    #[error("failed to manage the finalizer of a BuildJob: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// The outcome label of the reconcile metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Read { .. } => "ReadFailed",
            Error::Status { .. } => "StatusFailed",
            Error::Settle { .. } => "SettleFailed",
            Error::GitHub { source, .. } => source.reason(),
            Error::Account { .. } => "AccountFailed",
            Error::Registry { .. } => "RegistryFailed",
            Error::Gateway { .. } | Error::NotSendable { .. } => "SendFailed",
            Error::Terminate { .. } | Error::NoProvider { .. } => "TerminateFailed",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err.reason(),
                _ => "FinalizerFailed",
            },
        }
    }
}

/// The gateway scope of `job`'s builder agent.
pub fn scope(job: &BuildJob) -> Scope {
    Scope {
        kind: ScopeKind::BuildJob,
        namespace: job.namespace().unwrap_or_default(),
        name: job.name_any(),
        uid: job.uid().unwrap_or_default(),
    }
}

/// The id of `job`'s BUILD: one per UID, so a BUILD resent after an operator restart is answered
/// from the agent's record, not run again.
pub fn job_id(uid: &str) -> String {
    format!("build-{uid}")
}

/// The repository `job` pushes to: `spec.image`, else `<registry>/<namespace>/<project>/<service>`.
pub fn image_repository(job: &BuildJob, registry: Option<&Registry>) -> Option<String> {
    if let Some(image) = &job.spec.image {
        return Some(image.clone());
    }
    let project = job.labels().get(keys::PROJECT)?;
    let namespace = job.namespace().unwrap_or_default();
    Some(format!("{}/{}", registry?.host(), Registry::repository(&namespace, project, &job.spec.service)))
}

/// The image `job` builds: `<repository>:<commit>-<arch>`.
pub fn image_reference(job: &BuildJob, registry: Option<&Registry>) -> Option<String> {
    let repository = image_repository(job, registry)?;
    Some(format!("{repository}:{}-{}", job.spec.commit, job.spec.platform.arch()))
}

fn describe(job: &BuildJob) -> String {
    format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any())
}

fn is_finished(status: &BuildJobStatus) -> bool {
    status.phase.is_some_and(BuildJobPhase::is_finished)
}

/// Finished, with no VM left: the job holds nothing any more.
fn settled(status: &BuildJobStatus) -> bool {
    is_finished(status) && live_vm(status).is_none()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The job's CloudProvider, followed from its Project.
struct Target {
    view: ProviderView,
    /// `<namespace>/<name>` of the CloudProvider, the capacity ledger's key.
    key: Option<String>,
    project: Option<Arc<Project>>,
    object: Option<Arc<CloudProvider>>,
    provider: Option<Arc<dyn providers::CloudProvider>>,
}

impl Target {
    fn unavailable(reason: &'static str, message: String) -> Self {
        Self {
            view: ProviderView::Unavailable { reason, message },
            key: None,
            project: None,
            object: None,
            provider: None,
        }
    }

    fn why_unusable(&self) -> String {
        match &self.view {
            ProviderView::Unavailable { message, .. } => message.clone(),
            ProviderView::Ready { .. } => "the CloudProvider cannot be used".to_owned(),
        }
    }
}

/// Project → CloudProvider → provider. What is missing or not Ready is a [`ProviderView`] for the
/// user; only failures to read are errors.
async fn dereference(job: &BuildJob, ctx: &Context) -> Result<Target, Error> {
    let namespace = job.namespace().unwrap_or_default();
    let read = |what: String| move |source| Error::Read { what, job: describe(job), source };
    let Some(project_name) = job.labels().get(keys::PROJECT) else {
        return Ok(Target::unavailable(
            "ProjectNotFound",
            format!("the BuildJob has no {} label naming its Project", keys::PROJECT),
        ));
    };
    let caches = lock(&ctx.caches).clone();
    let project = cached(caches.as_ref().map(|c| &c.projects), &ctx.client, &namespace, project_name)
        .await
        .map_err(read(format!("Project {namespace}/{project_name}")))?;
    let Some(project) = project else {
        return Ok(Target::unavailable("ProjectNotFound", format!("Project {namespace}/{project_name} not found")));
    };
    let provider_name = project.spec.cloud_provider_ref.name.clone();
    let key = format!("{namespace}/{provider_name}");
    let object = cached(caches.as_ref().map(|c| &c.providers), &ctx.client, &namespace, &provider_name)
        .await
        .map_err(read(format!("CloudProvider {key}")))?;
    let Some(object) = object else {
        let message = format!("CloudProvider {key} (of Project {project_name}) not found");
        return Ok(Target {
            key: Some(key),
            project: Some(project),
            ..Target::unavailable("CloudProviderNotFound", message)
        });
    };
    let (provider, view) = match account::connect(&ctx.client, &object, &ctx.endpoints).await {
        Ok(provider) => {
            let ready = object.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
            let view = match ready {
                _ if object.metadata.deletion_timestamp.is_some() => ProviderView::Unavailable {
                    reason: "CloudProviderDeleting",
                    message: format!("CloudProvider {key} is being deleted: no new VM is started through it"),
                },
                Some(ready) if ready.status == "True" => ProviderView::Ready {
                    max_instances: usize::try_from(object.spec.max_instances.max(1)).unwrap_or(1),
                },
                Some(ready) => ProviderView::Unavailable {
                    reason: "CloudProviderNotReady",
                    message: format!("CloudProvider {key} is not ready: {}", ready.message),
                },
                None => ProviderView::Unavailable {
                    reason: "CloudProviderNotReady",
                    message: format!("CloudProvider {key} has not been checked yet"),
                },
            };
            (Some(provider), view)
        }
        Err(source @ AccountError::Kube { .. }) => {
            return Err(Error::Account { provider: key, job: describe(job), source: Box::new(source) });
        }
        Err(err) => (
            None,
            ProviderView::Unavailable {
                reason: "CloudProviderNotReady",
                message: format!("CloudProvider {key} cannot be used: {err}"),
            },
        ),
    };
    Ok(Target { view, key: Some(key), project: Some(project), object: Some(object), provider })
}

/// Reconciles one BuildJob, its finalizer first.
pub async fn reconcile(job: Arc<BuildJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let span = tracing::info_span!("reconcile_buildjob", %namespace, %name);
    async move {
        let api: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &namespace);
        let result = finalizer(&api, keys::BUILDJOB_FINALIZER, job, |event| async {
            match event {
                finalizer::Event::Apply(job) => apply(job, &ctx).await,
                finalizer::Event::Cleanup(job) => cleanup(job, &ctx).await,
            }
        })
        .await
        .map_err(|err| Error::Finalizer(Box::new(err)));
        ctx.metrics.reconciled_after("buildjob", result.as_ref().map_or_else(Error::reason, |_| "ok"), started);
        result
    }
    .instrument(span)
    .await
}

/// Moves a live job along: observe, plan, step, plan again; then write what changed.
async fn apply(job: Arc<BuildJob>, ctx: &Context) -> Result<Action, Error> {
    let uid = job.uid().unwrap_or_default();
    let mut old = job.status.clone().unwrap_or_default();
    let heartbeat = old.last_heartbeat.take();
    if let Some(newer) = ctx.written.newer(&uid, &old) {
        old = newer;
    }
    old.last_heartbeat = heartbeat;
    if settled(&old) {
        // Idempotent, in memory: in case the process that ended the job did not get to it.
        ctx.capacity.release_everywhere(&uid);
        ctx.gateway.forget(&scope(&job));
        ctx.followers.stop(&job_id(&uid));
        ctx.written.forget(&uid);
        settle(&job, ctx).await?;
        return Ok(Action::await_change());
    }
    let target = dereference(&job, ctx).await?;
    let mut seen = Observed {
        now: Timestamp::now(),
        provider: target.view.clone(),
        grant: None,
        image: image_reference(&job, ctx.registry.as_ref()),
        vm: VmView::NotSeen,
        create_failure: None,
        build_sent: ctx.followers.following(&job_id(&uid)),
        agent: ctx.followers.latest(&job_id(&uid)),
        log_tail: Vec::new(),
    };
    if !is_finished(&old)
        && let Some(id) = old.vm.as_ref().and_then(|vm| vm.provider_id.as_deref())
    {
        seen.vm = match &target.provider {
            Some(provider) => match provider.get(id).await {
                Ok(Some(instance)) => VmView::Found(instance),
                Ok(None) => VmView::Gone,
                Err(err) => VmView::Unknown(err.to_string()),
            },
            None => VmView::Unknown(target.why_unusable()),
        };
    }
    if seen.agent.as_ref().is_some_and(|status| status.state == JobState::Failed) {
        seen.log_tail = ctx.gateway.log_tail(&job_id(&uid), ctx.timings.log_tail_lines).await;
    }

    let mut status = old.clone();
    let mut requeue = Some(RETRY);
    let mut failed = None;
    for _ in 0..MAX_STEPS {
        let planned = plan::plan(&job, &status, &seen, &ctx.timings);
        status = planned.status;
        requeue = planned.requeue;
        let Some(step) = planned.step else { break };
        if let Err(err) = take_step(step, &job, &status, &target, &mut seen, ctx).await {
            failed = Some(err);
            break;
        }
    }

    let mut comparable = old.clone();
    comparable.last_heartbeat = None;
    if comparable != status {
        write_status(&job, ctx, &status).await?;
        ctx.written.wrote(&uid, &status);
    }
    after(&job, ctx, &old, &status, target.key.as_deref()).await;
    match failed {
        Some(err) => Err(err),
        None => Ok(requeue.map_or_else(Action::await_change, Action::requeue)),
    }
}

async fn take_step(
    step: Step,
    job: &BuildJob,
    status: &BuildJobStatus,
    target: &Target,
    seen: &mut Observed,
    ctx: &Context,
) -> Result<(), Error> {
    let uid = job.uid().unwrap_or_default();
    match step {
        Step::Acquire => {
            let (Some(key), ProviderView::Ready { max_instances }) = (&target.key, &target.view) else {
                return Ok(());
            };
            let since = job.creation_timestamp().map_or(seen.now, |t| t.0);
            seen.grant = Some(ctx.capacity.acquire(key, &uid, since, *max_instances));
        }
        Step::CreateVm => match create_vm(job, target, ctx).await {
            Ok(instance) => {
                tracing::info!(vm = %instance.id, state = ?instance.state, "created builder VM");
                seen.vm = VmView::Found(instance);
            }
            Err(failure) => {
                tracing::warn!(permanent = failure.permanent, error = %failure.message, "failed to create the builder VM");
                seen.create_failure = Some(failure);
            }
        },
        Step::SendBuild => {
            let git_token = match &target.project {
                Some(project) => crate::controllers::clone_token(&ctx.client, project, ctx.github.as_deref())
                    .await
                    .map_err(|source| Error::GitHub { job: describe(job), source })?,
                None => None,
            };
            send_build(job, target, seen.image.as_deref(), git_token, ctx)?;
            seen.build_sent = true;
        }
        Step::TerminateVm => {
            let recorded = status.vm.as_ref().and_then(|vm| vm.provider_id.as_deref());
            let terminated = terminate(job, target, recorded).await?;
            tracing::info!(vms = ?terminated, "terminated builder VM");
            seen.vm = VmView::Terminated;
        }
    }
    Ok(())
}

async fn create_vm(job: &BuildJob, target: &Target, ctx: &Context) -> Result<providers::Instance, CreateFailure> {
    let (Some(provider), Some(object)) = (&target.provider, &target.object) else {
        return Err(CreateFailure { permanent: false, message: target.why_unusable() });
    };
    let spec = vm::instance_spec(
        &ctx.gateway,
        &ctx.agents,
        object,
        Role::Builder,
        &scope(job),
        job.spec.machine,
        job.spec.platform,
    );
    let permanent =
        |err: &ProviderError| matches!(err, ProviderError::Unsupported(_) | ProviderError::InvalidCredentials { .. });
    let spec = spec.map_err(|err| CreateFailure {
        permanent: match &err {
            VmError::Token { .. } => false,
            VmError::NoRegion(_) | VmError::PlainGateway { .. } | VmError::NoAgentBinary { .. } => true,
            // The file may be in the middle of being replaced.
            VmError::GatewayCa(_) => false,
            VmError::Provider(err) => permanent(err),
        },
        message: err.to_string(),
    })?;
    provider.create(&spec).await.map_err(|err| CreateFailure { permanent: permanent(&err), message: err.to_string() })
}

/// Hands BUILD to the gateway and follows its STATUS. Sending a job id the gateway still holds
/// does not send it twice.
fn send_build(
    job: &BuildJob,
    target: &Target,
    image: Option<&str>,
    git_token: Option<stagely_api::protocol::Sensitive>,
    ctx: &Context,
) -> Result<(), Error> {
    let uid = job.uid().unwrap_or_default();
    let not_sendable = |why: String| Error::NotSendable { job: describe(job), why };
    let project = target.project.as_ref().ok_or_else(|| not_sendable(target.why_unusable()))?;
    let image = image.ok_or_else(|| not_sendable("no image can be named".into()))?;
    let repository = image_repository(job, ctx.registry.as_ref()).unwrap_or_default();
    let registry_auth = push_credential(ctx.registry.as_ref(), &repository)
        .map_err(|source| Error::Registry { job: describe(job), source })?;
    let build = Build {
        job_id: job_id(&uid),
        clone_url: project.spec.clone_url(),
        git_token,
        commit: job.spec.commit.clone(),
        context: job.spec.context.clone(),
        dockerfile: job.spec.dockerfile.clone(),
        platform: job.spec.platform,
        build_args: job.spec.build_args.clone(),
        cache_from: job.spec.cache_from.clone(),
        cache_to: job.spec.cache_to.clone(),
        image: image.to_owned(),
        registry_auth,
        timeout_seconds: stagely_api::v1alpha1::parse_duration(&job.spec.timeout).map_or(1800, |d| d.as_secs()),
    };
    let handle = ctx
        .gateway
        .send(&scope(job), Message::Build(build))
        .map_err(|source| Error::Gateway { job: describe(job), source })?;
    tracing::info!(job_id = %handle.job_id(), %image, "sent BUILD");
    ctx.followers.follow(ObjectRef::from_obj(job), handle);
    Ok(())
}

/// A push-and-pull credential for `repository` when it is in the operator's registry.
fn push_credential(registry: Option<&Registry>, repository: &str) -> Result<Option<RegistryAuth>, RegistryError> {
    let Some(registry) = registry else { return Ok(None) };
    match repository.strip_prefix(registry.host()).and_then(|rest| rest.strip_prefix('/')) {
        Some(path) => registry.push_credential(path, PUSH_CREDENTIAL_TTL),
        None => Ok(None),
    }
}

/// Terminates the recorded VM and anything else tagged with the job's UID (a VM created just
/// before a crash, never recorded). Returns what was terminated.
async fn terminate(job: &BuildJob, target: &Target, recorded: Option<&str>) -> Result<Vec<String>, Error> {
    let Some(provider) = &target.provider else {
        return Err(Error::NoProvider { job: describe(job), why: target.why_unusable() });
    };
    let uid = job.uid().unwrap_or_default();
    let failed = |source| Error::Terminate { job: describe(job), source };
    let mut terminated = Vec::new();
    if let Some(id) = recorded {
        provider.terminate(id).await.map_err(failed)?;
        terminated.push(id.to_owned());
    }
    for id in vm::terminate_all(provider.as_ref(), &uid).await.map_err(failed)? {
        if !terminated.contains(&id) {
            terminated.push(id);
        }
    }
    Ok(terminated)
}

/// Marks a settled job [`keys::SETTLED`] and removes its finalizer, in one write conditional on
/// the version read: it leaves this controller's watch, and nothing is left to clean up when it
/// is deleted (its VM is gone; the Environment's teardown and the orphan sweep look by tag).
async fn settle(job: &BuildJob, ctx: &Context) -> Result<(), Error> {
    let has_finalizer = job.finalizers().iter().any(|f| f == keys::BUILDJOB_FINALIZER);
    if !has_finalizer && job.labels().contains_key(keys::SETTLED) {
        return Ok(());
    }
    let finalizers: Vec<&String> = job.finalizers().iter().filter(|f| *f != keys::BUILDJOB_FINALIZER).collect();
    let patch = json!({
        "metadata": {
            "resourceVersion": job.resource_version(),
            "labels": { keys::SETTLED: "true" },
            "finalizers": if finalizers.is_empty() { serde_json::Value::Null } else { json!(finalizers) },
        }
    });
    let api: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    api.patch(&job.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Settle { job: describe(job), source })?;
    Ok(())
}

async fn write_status(job: &BuildJob, ctx: &Context, status: &BuildJobStatus) -> Result<(), Error> {
    let api: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": BuildJob::api_version(&()),
        "kind": BuildJob::kind(&()),
        "status": status,
    });
    api.patch_status(&job.name_any(), &PatchParams::apply(keys::MANAGER_OPERATOR).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Status { job: describe(job), source })?;
    Ok(())
}

/// What follows a status change: Events, the metric, and once nothing is held any more, the
/// capacity slot and the gateway scope given back.
async fn after(job: &BuildJob, ctx: &Context, old: &BuildJobStatus, new: &BuildJobStatus, key: Option<&str>) {
    // What the job held goes back before anything is announced: whoever sees the status written
    // finds the slot free, however long the Events take.
    if settled(new) {
        let uid = job.uid().unwrap_or_default();
        match key {
            Some(key) => ctx.capacity.release(key, &uid),
            None => ctx.capacity.release_everywhere(&uid),
        }
        ctx.gateway.forget(&scope(job));
        ctx.followers.stop(&job_id(&uid));
    }
    for note in plan::notes(old, new) {
        publish(job, ctx, note.warning, &note.reason, &note.note).await;
    }
    if !is_finished(old) && is_finished(new) {
        let succeeded = new.phase == Some(BuildJobPhase::Succeeded);
        let result = if succeeded { "succeeded" } else { "failed" };
        let started = new.started_at.as_ref().or(job.metadata.creation_timestamp.as_ref()).map(|t| t.0);
        let finished = new.finished_at.as_ref().map_or_else(Timestamp::now, |t| t.0);
        let seconds = started.map_or(0.0, |started| plan::elapsed(started, finished).as_secs_f64());
        ctx.metrics
            .build_duration
            .get_or_create(&BuildLabels { platform: job.spec.platform.as_str().to_owned(), result: result.to_owned() })
            .observe(seconds);
        tracing::info!(result, seconds, message = new.message.as_deref().unwrap_or(""), "build finished");
    }
}

async fn publish(job: &BuildJob, ctx: &Context, warning: bool, reason: &str, note: &str) {
    let type_ = if warning { EventType::Warning } else { EventType::Normal };
    ctx.recorder.record(&job.object_ref(&()), type_, reason, reason, shorten(note, MAX_NOTE)).await;
}

/// `text` in at most about `max` bytes: its first line and as much of its end as fits (a failed
/// build's message is its reason, then the end of its log, which matters most).
fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let floor = |text: &str, mut at: usize| {
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    let first = text.lines().next().unwrap_or_default();
    let first = &first[..floor(first, first.len().min(max / 2))];
    let room = max.saturating_sub(first.len() + 5);
    let mut start = text.len() - room;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("{first}\n…\n{}", &text[start..])
}

/// The job is being deleted: its VM terminated (by the recorded id and by tag), its slot and
/// gateway scope given back. Idempotent.
async fn cleanup(job: Arc<BuildJob>, ctx: &Context) -> Result<Action, Error> {
    let uid = job.uid().unwrap_or_default();
    ctx.followers.stop(&job_id(&uid));
    ctx.written.forget(&uid);
    let target = dereference(&job, ctx).await?;
    // A failure is tried again with a growing backoff, until the deadline or an admin's
    // annotation: then the job goes, and the orphan sweep finds its VM by its owner tag.
    let job_ref = &job;
    let give_up = |problem: String| async move {
        let job = job_ref;
        let Some(why) = cleanup::give_up(&job.metadata, CLEANUP_DEADLINE, Timestamp::now()) else {
            return Err(problem);
        };
        let note = format!("gave up terminating the builder VM ({why}): {problem}; the orphan sweep keeps trying");
        publish(job, ctx, true, "CleanupAbandoned", &note).await;
        Ok(Vec::new())
    };
    let terminated = match (&target.provider, &target.object) {
        (Some(_), _) => {
            let recorded = job.status.as_ref().and_then(|s| s.vm.as_ref()).and_then(|vm| vm.provider_id.as_deref());
            match terminate(&job, &target, recorded).await {
                Ok(terminated) => terminated,
                Err(err) => {
                    let problem = err.to_string();
                    give_up(problem).await.map_err(|_| err)?
                }
            }
        }
        // The CloudProvider is there but cannot be used now: try again, for a while.
        (None, Some(_)) => {
            give_up(target.why_unusable()).await.map_err(|why| Error::NoProvider { job: describe(&job), why })?
        }
        // The Project or its CloudProvider is gone: look for the job's VMs wherever they can be.
        (None, None) => terminate_anywhere(&job, ctx).await,
    };
    match &target.key {
        Some(key) => ctx.capacity.release(key, &uid),
        None => ctx.capacity.release_everywhere(&uid),
    }
    ctx.gateway.forget(&scope(&job));
    if !terminated.is_empty() {
        tracing::info!(vms = ?terminated, "terminated builder VM of a deleted BuildJob");
        publish(&job, ctx, false, "VMTerminated", &format!("terminated builder VM {}", terminated.join(", "))).await;
    }
    Ok(Action::await_change())
}

/// Terminates the job's VMs in every usable CloudProvider of its namespace, by tag.
async fn terminate_anywhere(job: &BuildJob, ctx: &Context) -> Vec<String> {
    let namespace = job.namespace().unwrap_or_default();
    let uid = job.uid().unwrap_or_default();
    let providers =
        match Api::<CloudProvider>::namespaced(ctx.client.clone(), &namespace).list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(err) => {
                tracing::warn!(error = %err, "failed to list CloudProviders to find a deleted BuildJob's VMs");
                return Vec::new();
            }
        };
    let mut terminated = Vec::new();
    for object in providers {
        let Ok(provider) = account::connect(&ctx.client, &object, &ctx.endpoints).await else { continue };
        match vm::terminate_all(provider.as_ref(), &uid).await {
            Ok(ids) => terminated.extend(ids),
            Err(err) => {
                tracing::warn!(provider = %object.name_any(), error = %err, "failed to look for a deleted BuildJob's VMs")
            }
        }
    }
    terminated
}

fn error_policy(job: Arc<BuildJob>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(namespace = ?job.namespace(), name = %job.name_any(), error = %err, "reconcile failed; retrying");
    if job.metadata.deletion_timestamp.is_some() {
        return Action::requeue(cleanup::retry_after(&job.metadata, Timestamp::now()));
    }
    Action::requeue(RETRY)
}

/// Re-registers the slots taken before a restart (jobs past the queue, and finished ones whose VM
/// is not yet terminated) with the capacity ledger, so nothing new is granted past
/// `maxInstances`. False if `shutdown` came first.
async fn seed(ctx: &Context, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> bool {
    let jobs = loop {
        match ctx.api::<BuildJob>().list(&ListParams::default().labels(&unsettled())).await {
            Ok(list) => break list.items,
            Err(err) => {
                tracing::warn!(error = %err, "failed to list BuildJobs to count their VMs; retrying");
                tokio::select! {
                    () = &mut *shutdown => return false,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    };
    let mut providers: HashMap<(String, String), Option<String>> = HashMap::new();
    for job in jobs {
        let Some(status) = &job.status else { continue };
        // A job past the queue had its slot, VM or not yet; a finished one holds it until its
        // VM is terminated.
        let started = matches!(status.phase, Some(BuildJobPhase::Provisioning | BuildJobPhase::Building));
        if !started && live_vm(status).is_none() {
            continue;
        }
        let namespace = job.namespace().unwrap_or_default();
        let Some(project) = job.labels().get(keys::PROJECT) else { continue };
        let entry = (namespace.clone(), project.clone());
        if !providers.contains_key(&entry) {
            let found = Api::<Project>::namespaced(ctx.client.clone(), &namespace).get_opt(project).await;
            let provider = found.ok().flatten().map(|p| format!("{namespace}/{}", p.spec.cloud_provider_ref.name));
            providers.insert(entry.clone(), provider);
        }
        if let (Some(Some(key)), Some(uid)) = (providers.get(&entry), job.uid()) {
            ctx.capacity.hold(key, &uid);
        }
    }
    true
}

/// What of a CloudProvider a queued job depends on: its spec and its Ready condition (not, say,
/// the instance count its controller keeps writing).
fn provider_usability(provider: &CloudProvider) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    provider.metadata.generation.hash(&mut hasher);
    if let Some(ready) = provider.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready")) {
        (&ready.status, &ready.reason, &ready.message).hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// The label selector of the jobs this controller follows: those not settled.
fn unsettled() -> String {
    format!("!{}", keys::SETTLED)
}

/// The unfinished, queued BuildJobs of `namespace` (of `project`, if given).
fn queued(store: &Store<BuildJob>, namespace: Option<String>, project: Option<&str>) -> Vec<ObjectRef<BuildJob>> {
    store
        .state()
        .into_iter()
        .filter(|job| job.namespace() == namespace)
        .filter(|job| project.is_none_or(|p| job.labels().get(keys::PROJECT).map(String::as_str) == Some(p)))
        .filter(|job| job.status.as_ref().and_then(|s| s.phase).unwrap_or_default() == BuildJobPhase::Queued)
        .map(|job| ObjectRef::from_obj(&*job))
        .collect()
}

fn request(object: ObjectRef<BuildJob>, reason: &str) -> Result<ReconcileRequest<BuildJob>, watcher::Error> {
    Ok(ReconcileRequest { obj_ref: object, reason: ReconcileReason::Custom { reason: reason.to_owned() } })
}

/// Runs the controller until `shutdown` resolves: every BuildJob, woken by its agent's STATUS,
/// by a freed capacity slot, and (while queued) by changes to CloudProviders and Projects.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let mut shutdown = Box::pin(shutdown);
    if !seed(&ctx, &mut shutdown).await {
        return;
    }
    let (store, writer) = reflector::store::<BuildJob>();
    // Settled jobs leave the watch (the apiserver reports them deleted from it): at thousands of
    // Environments, their finished BuildJobs are not held here.
    let jobs = trigger_self(
        watcher(ctx.api::<BuildJob>(), watcher::Config::default().labels(&unsettled()))
            .default_backoff()
            .modify(strip)
            .reflect(writer)
            .applied_objects(),
        (),
    );
    let (provider_cache, provider_writer) = reflector::store::<CloudProvider>();
    let (project_cache, project_writer) = reflector::store::<Project>();
    *lock(&ctx.caches) = Some(Caches { projects: project_cache, providers: provider_cache });
    let providers = {
        let store = store.clone();
        trigger_with(
            watcher(ctx.api::<CloudProvider>(), watcher::Config::default())
                .default_backoff()
                .modify(strip)
                .reflect(provider_writer)
                .applied_objects()
                .predicate_filter(provider_usability, Default::default()),
            move |provider: CloudProvider| queued(&store, provider.namespace(), None),
        )
    };
    let projects = {
        let store = store.clone();
        trigger_with(
            watcher(ctx.api::<Project>(), watcher::Config::default())
                .default_backoff()
                .modify(strip)
                .reflect(project_writer)
                .applied_objects()
                .predicate_filter(predicates::generation, Default::default()),
            move |project: Project| queued(&store, project.namespace(), Some(&project.name_any())),
        )
    };
    let slots = {
        let store = store.clone();
        stream::unfold(ctx.capacity.subscribe(), |mut wakes| async move {
            loop {
                match wakes.recv().await {
                    Ok(uid) => return Some((uid, wakes)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .filter_map(move |uid| {
            let found = store.state().into_iter().find(|job| job.uid().as_deref() == Some(uid.as_str()));
            std::future::ready(found.map(|job| request(ObjectRef::from_obj(&*job), "a capacity slot freed")))
        })
    };
    let statuses = match lock(&ctx.woken).take() {
        Some(woken) => stream::unfold(woken, |mut woken| async move { Some((woken.recv().await?, woken)) })
            .map(|object| request(object, "agent status"))
            .boxed(),
        None => {
            tracing::warn!("the BuildJob controller's context ran before: agent statuses wake nothing");
            stream::pending().boxed()
        }
    };
    let queue = stream::select_all([jobs.boxed(), providers.boxed(), projects.boxed(), slots.boxed(), statuses])
        .take_until(shutdown);
    applier(
        |job, ctx| CancelableJoinHandle::spawn(reconcile(job, ctx), &tokio::runtime::Handle::current()),
        error_policy,
        Arc::clone(&ctx),
        store,
        queue,
        controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES),
    )
    .for_each(|result| async move { crate::controllers::log_run("buildjob", result) })
    .await;
    *lock(&ctx.caches) = None;
    ctx.followers.clear();
}

#[cfg(test)]
mod tests {
    use stagely_api::v1alpha1::BuildJobSpec;

    use super::*;

    fn job(image: Option<&str>) -> BuildJob {
        let spec: BuildJobSpec = serde_json::from_value(json!({
            "service": "web", "platform": "linux/arm64", "repository": "acme/shop",
            "commit": "0123456789abcdef0123456789abcdef01234567", "image": image,
        }))
        .unwrap();
        let mut job = BuildJob::new("shop-pr-7-web-arm64-0123456", spec);
        job.metadata.namespace = Some("team-a".into());
        job.metadata.uid = Some("uid-1".into());
        job.metadata.labels = Some([(keys::PROJECT.to_owned(), "shop".to_owned())].into());
        job
    }

    #[test]
    fn images_are_the_repository_tagged_with_commit_and_arch() {
        let registry = Registry::anonymous("reg:5000");
        assert_eq!(
            image_reference(&job(None), Some(&registry)).as_deref(),
            Some("reg:5000/team-a/shop/web:0123456789abcdef0123456789abcdef01234567-arm64")
        );
        assert_eq!(
            image_reference(&job(Some("other:5000/x/y")), Some(&registry)).as_deref(),
            Some("other:5000/x/y:0123456789abcdef0123456789abcdef01234567-arm64")
        );
        assert_eq!(image_reference(&job(None), None), None, "no repository can be named");
        assert_eq!(push_credential(Some(&registry), "other:5000/x/y").unwrap(), None, "not the operator's registry");
        assert_eq!(job_id("uid-1"), "build-uid-1");
        assert_eq!(scope(&job(None)).kind, ScopeKind::BuildJob);
    }

    #[test]
    fn long_notes_keep_their_first_line_and_their_end() {
        assert_eq!(shorten("short", 10), "short");
        let text = format!("the build failed: boom\nlast log lines:\n{}\n  boom-marker-42", "x".repeat(5000));
        let short = shorten(&text, 1000);
        assert!(short.len() <= 1000, "{}", short.len());
        assert!(short.starts_with("the build failed: boom\n…\n") && short.ends_with("boom-marker-42"), "{short}");
        assert!(shorten(&"é".repeat(2000), 999).len() <= 999);
    }

    #[test]
    fn settled_means_finished_with_no_live_vm() {
        let mut status = BuildJobStatus { phase: Some(BuildJobPhase::Failed), ..Default::default() };
        assert!(settled(&status));
        status.vm = Some(stagely_api::v1alpha1::VmStatus {
            provider_id: Some("vm-1".into()),
            state: Some("running".into()),
            ..Default::default()
        });
        assert!(!settled(&status));
        status.vm.as_mut().unwrap().state = Some("terminated".into());
        assert!(!settled(&status), "stopped by itself, not yet terminated by the controller");
        crate::controllers::conditions::set_condition(
            &mut status.conditions,
            plan::VM_READY,
            false,
            "Terminated",
            "builder VM vm-1 terminated",
            None,
            Timestamp::now(),
        );
        assert!(settled(&status));
        status.phase = Some(BuildJobPhase::Building);
        assert!(!settled(&status));
    }
}
