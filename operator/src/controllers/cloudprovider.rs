//! The CloudProvider controller: checks each account's credentials with a real call, reports the
//! result as the `Ready` condition (with a message a user can act on) and the number of VMs
//! Stagely runs for its namespace, and checks again whenever the credentials Secret changes.
//!
//! Its finalizer keeps a CloudProvider while VMs it started exist, as Kubernetes' own
//! `pvc-protection` keeps a volume while a pod uses it: deleting it stops new VMs at once,
//! terminates its orphans (no grace), and then waits, saying in `Ready` which VMs are still in
//! use and by whom, until their Environments and BuildJobs are gone (those have deadlines of their
//! own). It lets go early only when an admin sets `stagely.dev/abandon-cleanup`, or when its VMs
//! cannot be listed: at once when nothing can reach them through it any more (its credentials
//! Secret is gone, or the provider rejects its credentials), after the cleanup deadline when the
//! provider keeps failing; an Event then says what may be left.
//!
//! Its credentials Secret carries a finalizer of its own while a CloudProvider uses it, so that a
//! namespace deleted whole (everything at once) still has working credentials for its
//! Environments' teardown and this sweep; the Secret goes right after the last CloudProvider
//! using it.
//!
//! Credentials are read, used and dropped: they never reach a log line, an event or the status.
//! Secrets are watched by their metadata only (a change is all the watch needs to see), so no
//! Secret's data is held here; a check reads its one credentials Secret with a targeted GET.
//! Messages come from [`AccountError`] and [`ProviderError`](crate::providers::ProviderError),
//! which carry the provider's answer, never what was sent.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Reporter};

use crate::controllers::cleanup;
use crate::controllers::conditions::set_condition;
use crate::controllers::events::Recorder;
use crate::metrics::Metrics;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use stagely_api::keys;
use stagely_api::v1alpha1::{CloudProvider, CloudProviderStatus, ProviderType};

use crate::providers::account::{self, AccountError, Endpoints, provider_reason};

/// The controller's name, as events report it.
pub const CONTROLLER: &str = "stagely-cloudprovider-controller";

/// Checked again this often while healthy (the instance count drifts as VMs come and go).
const RECHECK: Duration = Duration::from_secs(300);
/// Checked again this soon after the provider could not be reached or throttled us.
const RETRY: Duration = Duration::from_secs(30);

/// How long deletion waits for VMs that cannot even be listed before letting go.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(600);

/// What the reconciler needs.
pub struct Context {
    /// The cluster.
    pub client: Client,
    /// Where the clouds are.
    pub endpoints: Endpoints,
    recorder: Recorder,
    metrics: Metrics,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, endpoints: Endpoints) -> Self {
        let reporter = Reporter { controller: CONTROLLER.into(), instance: std::env::var("POD_NAME").ok() };
        Self { recorder: Recorder::new(client.clone(), reporter), client, endpoints, metrics: Metrics::default() }
    }

    /// Counts orphans terminated on deletion in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }
}

/// Why a reconcile failed (and will be retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Deletion waits for VMs.
    #[error("CloudProvider {name} is kept: {what}")]
    Waiting {
        /// The CloudProvider.
        name: String,
        /// What it waits for.
        what: String,
    },
    /// The finalizer could not be added or removed.
    #[error("failed to manage the finalizer of a CloudProvider: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Writing the status failed.
    #[error("cannot update the status of {name}: {source}")]
    Status {
        /// The CloudProvider.
        name: String,
        /// The API error.
        source: kube::Error,
    },
}

impl Error {
    /// The reconcile outcome this error is counted as.
    fn reason(&self) -> &'static str {
        match self {
            Error::Waiting { .. } => "Waiting",
            Error::Finalizer(_) => "FinalizerError",
            Error::Status { .. } => "ApiError",
        }
    }
}

/// The outcome of one check.
struct Check {
    ready: bool,
    reason: &'static str,
    message: String,
    instances: Option<i32>,
    retry: bool,
}

async fn check(object: &CloudProvider, ctx: &Context) -> Check {
    let failed = |reason: &'static str, message: String, retry: bool| Check {
        ready: false,
        reason,
        message,
        instances: None,
        retry,
    };
    let provider = match account::connect(&ctx.client, object, &ctx.endpoints).await {
        Ok(provider) => provider,
        Err(err) => {
            let retry = matches!(err, AccountError::Kube { .. });
            return failed(err.reason(), err.to_string(), retry);
        }
    };
    if let Err(err) = provider.validate_credentials().await {
        let retry = !matches!(err, crate::providers::ProviderError::InvalidCredentials { .. });
        return failed(provider_reason(&err), err.to_string(), retry);
    }
    // This namespace's VMs only, filtered by the cloud: the account may be shared by many
    // namespaces and hold thousands of VMs, and every CloudProvider is checked again each
    // RECHECK.
    let namespace = object.namespace().unwrap_or_default();
    let (instances, listed) = match provider.list_namespace(&namespace).await {
        Ok(list) => (i32::try_from(list.len()).ok(), String::new()),
        Err(err) => (None, format!("; listing its VMs failed: {err}")),
    };
    let message = match object.spec.type_ {
        ProviderType::Local => format!("agents run as processes on the operator's host{listed}"),
        other => format!(
            "{} accepted the credentials in {}{listed}",
            provider_name(other),
            object.spec.region.as_deref().unwrap_or_default()
        ),
    };
    Check { ready: true, reason: "CredentialsAccepted", message, instances, retry: !listed.is_empty() }
}

fn provider_name(type_: ProviderType) -> &'static str {
    match type_ {
        ProviderType::Aws => "AWS",
        ProviderType::Digitalocean => "DigitalOcean",
        ProviderType::Hetzner => "Hetzner",
        ProviderType::Local => "local",
    }
}

/// Reconciles one CloudProvider: its finalizer first, then the check.
pub async fn reconcile(object: Arc<CloudProvider>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let api: Api<CloudProvider> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let result = finalizer(&api, keys::CLOUDPROVIDER_FINALIZER, object, |event| async {
        match event {
            finalizer::Event::Apply(object) => check_and_report(object, &ctx).await,
            finalizer::Event::Cleanup(object) => cleanup(object, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled_after("cloudprovider", result.as_ref().map_or_else(Error::reason, |_| "ok"), started);
    result
}

/// The CloudProvider is being deleted: see [`sweep_before_release`]; once it lets go, its
/// credentials Secret is no longer kept for it.
async fn cleanup(object: Arc<CloudProvider>, ctx: &Context) -> Result<Action, Error> {
    let action = sweep_before_release(Arc::clone(&object), ctx).await?;
    let namespace = object.namespace().unwrap_or_default();
    protect_credentials(&ctx.client, &namespace, None, Some(&object.name_any()))
        .await
        .map_err(|source| Error::Status { name: object.name_any(), source })?;
    Ok(action)
}

/// Its orphans are terminated now; while VMs of live Environments or BuildJobs remain, it stays
/// and says which (see the module's doc).
async fn sweep_before_release(object: Arc<CloudProvider>, ctx: &Context) -> Result<Action, Error> {
    let name = object.name_any();
    let swept = crate::reaper::sweep_provider(
        &ctx.client,
        &ctx.endpoints,
        &ctx.metrics,
        &ctx.recorder,
        &object,
        Duration::ZERO,
    )
    .await;
    let (what, in_use) = match &swept {
        Ok(swept) if swept.owned.is_empty() && swept.failed.is_empty() => return Ok(Action::await_change()),
        Ok(swept) => {
            let mut parts = Vec::new();
            if !swept.owned.is_empty() {
                let vms: Vec<String> =
                    swept.owned.iter().map(|(id, owner)| format!("{id} (owner UID {owner})")).collect();
                parts.push(format!(
                    "{} VM{} still in use: {}; delete their Environments and BuildJobs, or set {} to leave them",
                    vms.len(),
                    if vms.len() == 1 { "" } else { "s" },
                    vms.join(", "),
                    keys::ABANDON_CLEANUP
                ));
            }
            if !swept.failed.is_empty() {
                let vms: Vec<String> = swept.failed.iter().map(|(id, err)| format!("{id}: {err}")).collect();
                parts.push(format!("orphaned VMs not terminated yet ({})", vms.join("; ")));
            }
            (parts.join("; "), !swept.owned.is_empty())
        }
        // Nothing can reach its VMs any more (its Secret is gone, its credentials rejected):
        // keeping it would help nobody.
        Err(failure) if failure.permanent => {
            let note = format!(
                "deleted although its VMs cannot be listed ({}): any left must be stopped by hand",
                failure.message
            );
            publish(&object, ctx, true, "CleanupAbandoned", note).await;
            return Ok(Action::await_change());
        }
        Err(failure) => (format!("its VMs cannot be listed: {}", failure.message), false),
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    // VMs in use keep it (only an admin lets go of them); VMs that cannot be reached, for a while.
    let give_up = match cleanup::give_up(&object.metadata, CLEANUP_DEADLINE, now) {
        Some(why) if why.starts_with("an admin") || !in_use => Some(why),
        _ => None,
    };
    if let Some(why) = give_up {
        let note = format!("deleted ({why}) although {what}");
        tracing::warn!(namespace = ?object.namespace(), %name, %note, "releasing the CloudProvider");
        publish(&object, ctx, true, "CleanupAbandoned", note).await;
        return Ok(Action::await_change());
    }
    report_deleting(&object, ctx, &what).await;
    Err(Error::Waiting { name, what })
}

/// Writes `Ready` False, reason `Deleting`, with what deletion waits for (once per change).
async fn report_deleting(object: &CloudProvider, ctx: &Context, what: &str) {
    let message = format!("being deleted; waiting: {what}");
    let mut conditions = object.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    if conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "Deleting" && c.message == message) {
        return;
    }
    let now = k8s_openapi::jiff::Timestamp::now();
    set_condition(&mut conditions, "Ready", false, "Deleting", &message, object.metadata.generation, now);
    let api: Api<CloudProvider> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let patch = json!({ "status": { "conditions": conditions } });
    if let Err(err) = api.patch_status(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        tracing::debug!(name = %object.name_any(), error = %err, "cannot report the deletion yet");
    }
    publish(object, ctx, false, "Deleting", message).await;
}

async fn publish(object: &CloudProvider, ctx: &Context, warning: bool, reason: &str, note: String) {
    let type_ = if warning { EventType::Warning } else { EventType::Normal };
    ctx.recorder.record(&object.object_ref(&()), type_, "Delete", reason, note).await;
}

/// Keeps a finalizer on exactly the Secrets of `namespace` that a CloudProvider still uses (one
/// not deleted, or still cleaning up; `releasing` is letting go now), plus `protect` (the one
/// being checked now), and on no other.
async fn protect_credentials(
    client: &Client,
    namespace: &str,
    protect: Option<&str>,
    releasing: Option<&str>,
) -> Result<(), kube::Error> {
    let providers = Api::<CloudProvider>::namespaced(client.clone(), namespace).list(&ListParams::default()).await?;
    let used: std::collections::BTreeSet<String> = providers
        .items
        .iter()
        .filter(|cp| Some(cp.name_any().as_str()) != releasing)
        .filter(|cp| {
            cp.metadata.deletion_timestamp.is_none()
                || cp.finalizers().iter().any(|f| f == keys::CLOUDPROVIDER_FINALIZER)
        })
        .filter_map(|cp| cp.spec.credentials_secret_ref.as_ref().map(|r| r.name.clone()))
        .chain(protect.map(str::to_owned))
        .collect();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for secret in secrets.list_metadata(&ListParams::default()).await?.items {
        let name = secret.name_any();
        let has = secret.finalizers().iter().any(|f| f == keys::CREDENTIALS_FINALIZER);
        let wanted = used.contains(&name);
        if has == wanted {
            continue;
        }
        let mut finalizers: Vec<String> =
            secret.finalizers().iter().filter(|f| *f != keys::CREDENTIALS_FINALIZER).cloned().collect();
        if wanted {
            finalizers.push(keys::CREDENTIALS_FINALIZER.to_owned());
        }
        // Conditional on the version read: another controller's finalizers are never lost.
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": secret.resource_version()}});
        match secrets.patch_metadata(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // Changed meanwhile (the next check fixes it), or gone.
            Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Checks one CloudProvider and writes what it found.
async fn check_and_report(object: Arc<CloudProvider>, ctx: &Context) -> Result<Action, Error> {
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    let secret = object.spec.credentials_secret_ref.as_ref().map(|r| r.name.as_str());
    if let Err(err) = protect_credentials(&ctx.client, &namespace, secret, None).await {
        tracing::warn!(%namespace, %name, error = %err, "cannot protect the credentials Secret yet");
    }
    let namespace = object.namespace().unwrap_or_default();
    let found = check(&object, ctx).await;
    let status = if found.ready { "True" } else { "False" };

    let previous = object.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let changed = previous.is_none_or(|c| c.status != status || c.reason != found.reason || c.message != found.message);
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let condition = Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: found.reason.into(),
        message: found.message.clone(),
        last_transition_time,
        observed_generation: object.metadata.generation,
    };
    let mut conditions: Vec<Condition> = object
        .status
        .as_ref()
        .map(|s| s.conditions.iter().filter(|c| c.type_ != "Ready").cloned().collect())
        .unwrap_or_default();
    conditions.push(condition);
    let new_status = CloudProviderStatus {
        observed_generation: object.metadata.generation,
        conditions,
        instances: found.instances.or(object.status.as_ref().and_then(|s| s.instances)),
    };
    // The Event before the status: a reconcile cut short in between (the operator killed, a
    // replica losing its lease) must not leave the new status written and its Event never sent,
    // since the next reconcile sees no change to announce. Cut short the other way round, the
    // Event is sent again (counted in its series).
    if changed {
        tracing::info!(%namespace, %name, ready = found.ready, reason = found.reason, message = %found.message, "checked cloud provider");
        let type_ = if found.ready { EventType::Normal } else { EventType::Warning };
        ctx.recorder
            .record(&object.object_ref(&()), type_, "CheckCredentials", found.reason, found.message.clone())
            .await;
    }
    if object.status.as_ref() != Some(&new_status) {
        let api: Api<CloudProvider> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": new_status })))
            .await
            .map_err(|source| Error::Status { name: name.clone(), source })?;
    }
    Ok(Action::requeue(if found.retry { RETRY } else { RECHECK }))
}

fn error_policy(object: Arc<CloudProvider>, err: &Error, _ctx: Arc<Context>) -> Action {
    if object.metadata.deletion_timestamp.is_some() {
        tracing::info!(name = %object.name_any(), error = %err, "deletion waits");
        return Action::requeue(cleanup::retry_after(&object.metadata, k8s_openapi::jiff::Timestamp::now()));
    }
    tracing::warn!(name = %object.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// What of a CloudProvider a reconcile acts on: all but its status, which only this controller
/// writes. Its own status writes (the VM count changes with every VM) would otherwise wake a new
/// check, and a new list of the account's VMs, as fast as VMs come and go.
fn beyond_status(object: &CloudProvider) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let meta = &object.metadata;
    (meta.generation, meta.deletion_timestamp.is_some(), &meta.finalizers, &meta.labels, &meta.annotations)
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// Runs the controller until `shutdown` resolves: every CloudProvider, re-checked when its
/// credentials Secret changes (seen through a metadata-only watch: no Secret's data comes here).
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (store, writer) = reflector::store::<CloudProvider>();
    let events = watcher(Api::<CloudProvider>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .predicate_filter(beyond_status, Default::default());
    let controller = Controller::for_stream(events, store.clone());
    controller
        .watches(Api::<PartialObjectMeta<Secret>>::all(client), watcher::Config::default(), move |secret| {
            let namespace = secret.namespace();
            let name = secret.name_any();
            store
                .state()
                .into_iter()
                .filter(|cp| {
                    cp.namespace() == namespace
                        && cp.spec.credentials_secret_ref.as_ref().is_some_and(|r| r.name == name)
                })
                .map(|cp| ObjectRef::from_obj(&*cp))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move { crate::controllers::log_run("cloudprovider", result) })
        .await;
}
