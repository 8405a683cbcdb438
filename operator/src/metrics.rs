//! The operator's own Prometheus metrics, registered beside `build_info` in the ops registry.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use stagely_api::ops;
use stagely_api::v1alpha1::{CloudProvider, Environment, EnvironmentPhase, GITHUB_FEEDBACK_CONDITION, ProviderType};

use crate::gateway::Gateway;

/// The controllers, as the `controller` label names them.
pub const CONTROLLERS: [&str; 5] = ["cloudprovider", "project", "environment", "buildjob", "feedback"];
/// The reasons the reaper (and the stuck-run checks) act for, as the `reason` label names them.
pub const REAP_REASONS: [&str; 4] = ["Expired", "HeartbeatLost", "BuildStuck", "DeployStuck"];
/// The provider types, as the `provider` label names them.
const PROVIDERS: [ProviderType; 4] =
    [ProviderType::Aws, ProviderType::Digitalocean, ProviderType::Hetzner, ProviderType::Local];

/// Labels of a finished build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// `linux/amd64` or `linux/arm64`.
    pub platform: String,
    /// `succeeded` or `failed`.
    pub result: String,
}

/// Labels of a reconcile outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// The controller, e.g. `environment`.
    pub controller: String,
    /// `ok` or the error's reason.
    pub outcome: String,
}

/// Labels of a per-controller value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// The controller, e.g. `environment`.
    pub controller: String,
}

/// Labels of a reaper action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `Expired`, `HeartbeatLost`, `BuildStuck` or `DeployStuck`.
    pub reason: String,
}

/// Labels of a VM's provisioning time.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    /// The CloudProvider's type: `aws`, `digitalocean`, `hetzner`, `local`.
    pub provider: String,
    /// `builder` or `preview`.
    pub role: String,
}

/// Labels of an orphan sweep's count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// The CloudProvider's type: `aws`, `digitalocean`, `hetzner`, `local`.
    pub provider: String,
}

/// What the controllers count and time. Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    /// Seconds from a BuildJob's start to its end, by platform and result.
    pub build_duration: Family<BuildLabels, Histogram>,
    /// Reconciles by controller and outcome.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Seconds a reconcile took, by controller.
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    /// Seconds from the receipt of the webhook that started a run to the run's first Ready.
    pub webhook_to_ready: Histogram,
    /// Seconds from a VM's creation (its enrollment token's minting) to its agent's first
    /// connection, by provider type and role.
    pub vm_provisioning: Family<VmLabels, Histogram>,
    /// Agent jobs whose STATUS updates a controller follows, by controller.
    pub followed_jobs: Family<ControllerLabels, Gauge>,
    /// GitHub calls and rate limits.
    pub github: crate::github::GitHubMetrics,
    /// Environments the reaper deleted or failed, by reason.
    pub reaped: Family<ReasonLabels, Counter>,
    /// Orphaned VMs found by the sweep, by provider type.
    pub orphans_found: Family<ProviderLabels, Counter>,
    /// Orphaned VMs the sweep (or a CloudProvider's finalizer) terminated, by provider type.
    pub orphans_terminated: Family<ProviderLabels, Counter>,
    /// 1 while this replica holds the leader Lease (and so acts), 0 while it follows.
    pub leader: Gauge,
    /// What is counted when scraped.
    scraped: Scraped,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Self {
            build_duration: Family::new_with_constructor(|| {
                Histogram::new([5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0])
            }),
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
            }),
            webhook_to_ready: Histogram::new([
                15.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0, 7200.0,
            ]),
            vm_provisioning: Family::new_with_constructor(|| {
                Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0])
            }),
            followed_jobs: Family::default(),
            github: crate::github::GitHubMetrics::default(),
            reaped: Family::default(),
            orphans_found: Family::default(),
            orphans_terminated: Family::default(),
            leader: Gauge::default(),
            scraped: Scraped::default(),
        };
        metrics.start_at_zero();
        metrics
    }
}

impl Metrics {
    /// Registers these metrics and returns the ops registry holding them.
    pub fn register(&self, version: &str) -> ops::Metrics {
        let this = self.clone();
        ops::Metrics::with("stagely_operator", version, move |registry: &mut Registry| {
            registry.register(
                "build_duration_seconds",
                "Seconds from a BuildJob's start to its end, by platform and result",
                this.build_duration,
            );
            registry.register("reconciles", "Reconciles by controller and outcome", this.reconciles);
            registry.register(
                "reconcile_duration_seconds",
                "Seconds a reconcile took, by controller",
                this.reconcile_duration,
            );
            registry.register(
                "environment_webhook_to_ready_seconds",
                "Seconds from the receipt of the webhook that started a run to the run's first Ready",
                this.webhook_to_ready,
            );
            registry.register(
                "vm_provisioning_seconds",
                "Seconds from a VM's creation to its agent's first connection, by provider type and role",
                this.vm_provisioning,
            );
            registry.register(
                "followed_jobs",
                "Agent jobs whose STATUS updates a controller follows, by controller",
                this.followed_jobs,
            );
            registry.register("github_calls", "GitHub API calls by call and answer status", this.github.calls);
            registry.register(
                "github_rate_limit_remaining",
                "GitHub API calls left in the current rate-limit window, by credentials",
                this.github.rate_limit_remaining,
            );
            registry.register(
                "github_rate_limit",
                "GitHub API calls allowed per rate-limit window, by credentials",
                this.github.rate_limit,
            );
            registry.register("reaped", "Environments the reaper deleted or failed, by reason", this.reaped);
            registry.register("orphans_found", "Orphaned VMs the sweep found, by provider type", this.orphans_found);
            registry.register(
                "orphans_terminated",
                "Orphaned VMs terminated by the sweep or a CloudProvider's finalizer, by provider type",
                this.orphans_terminated,
            );
            registry.register(
                "leader",
                "1 while this replica holds the leader Lease (and so acts), 0 while it follows",
                this.leader,
            );
            registry.register_collector(Box::new(this.scraped));
        })
    }

    /// Series whose label values are known in advance start at zero rather than at their first
    /// event (as Prometheus advises): a rate over a window that holds the first event sees it,
    /// and a panel shows 0 rather than no data.
    fn start_at_zero(&self) {
        for controller in CONTROLLERS {
            drop(
                self.reconciles.get_or_create(&ReconcileLabels { controller: controller.into(), outcome: "ok".into() }),
            );
            drop(self.reconcile_duration.get_or_create(&ControllerLabels { controller: controller.into() }));
        }
        for platform in ["linux/amd64", "linux/arm64"] {
            for result in ["succeeded", "failed"] {
                drop(
                    self.build_duration
                        .get_or_create(&BuildLabels { platform: platform.into(), result: result.into() }),
                );
            }
        }
        for reason in REAP_REASONS {
            drop(self.reaped.get_or_create(&ReasonLabels { reason: reason.into() }));
        }
        for provider in PROVIDERS.map(ProviderType::as_str) {
            drop(self.orphans_found.get_or_create(&ProviderLabels { provider: provider.into() }));
            drop(self.orphans_terminated.get_or_create(&ProviderLabels { provider: provider.into() }));
            for role in ["builder", "preview"] {
                drop(self.vm_provisioning.get_or_create(&VmLabels { provider: provider.into(), role: role.into() }));
            }
        }
    }

    /// Counts the Environments of `store` (the Environment controller's watch cache) by phase
    /// at each scrape, with how long the longest-waiting of each unsettled phase has gone without
    /// progress. The leader's controller fills the store; a follower shows none.
    pub fn count_environments(&self, store: Store<Environment>) {
        let _ = self.scraped.0.environments.set(store);
    }

    /// Shows the readiness of each CloudProvider of `store` (a watch cache) at each scrape.
    pub fn count_cloud_providers(&self, store: Store<CloudProvider>) {
        let _ = self.scraped.0.cloud_providers.set(store);
    }

    /// Counts `gateway`'s connected agents at each scrape, and has it observe each VM's
    /// provisioning time as its agent enrolls.
    pub fn count_agents(&self, gateway: &Gateway) {
        gateway.observe_provisioning(self.vm_provisioning.clone());
        let _ = self.scraped.0.gateway.set(gateway.clone());
    }

    /// The gauge of jobs `controller` follows.
    pub fn followed(&self, controller: &str) -> Gauge {
        self.followed_jobs.get_or_create(&ControllerLabels { controller: controller.to_owned() }).clone()
    }

    /// Counts one reaper action for `reason`.
    pub fn reap(&self, reason: &str) {
        self.reaped.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Counts a sweep's orphans of a `provider`-type CloudProvider: `found`, of which `terminated`.
    pub fn swept(&self, provider: &str, found: usize, terminated: usize) {
        let labels = ProviderLabels { provider: provider.to_owned() };
        self.orphans_found.get_or_create(&labels).inc_by(found as u64);
        self.orphans_terminated.get_or_create(&labels).inc_by(terminated as u64);
    }

    /// Counts one reconcile of `controller` ending in `outcome`.
    pub fn reconciled(&self, controller: &str, outcome: &str) {
        self.reconciles
            .get_or_create(&ReconcileLabels { controller: controller.to_owned(), outcome: outcome.to_owned() })
            .inc();
    }

    /// Counts one reconcile of `controller` ending in `outcome`, started at `started`, and
    /// observes how long it took.
    pub fn reconciled_after(&self, controller: &str, outcome: &str, started: Instant) {
        self.reconciled(controller, outcome);
        self.reconcile_duration
            .get_or_create(&ControllerLabels { controller: controller.to_owned() })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Observes a run's time from webhook to Ready (see [`webhook_to_ready`]).
    pub fn ready_after_webhook(&self, seconds: Duration) {
        self.webhook_to_ready.observe(seconds.as_secs_f64());
    }
}

/// The time from the webhook that started `env`'s run to the run's first Ready, when `before`
/// (the status last written) and `after` (the one just written) show that first Ready now: the
/// run's `readyAt` was just set, and the Environment's [`GITHUB_RECEIVED_AT`] annotation is from
/// before the run started, so it is the delivery that started it (a later one, a label change,
/// say, started nothing). `None` for an Environment no webhook applied (kubectl, the resync).
///
/// [`GITHUB_RECEIVED_AT`]: stagely_api::keys::GITHUB_RECEIVED_AT
pub fn webhook_to_ready(
    env: &Environment,
    before: &stagely_api::v1alpha1::EnvironmentStatus,
    after: &stagely_api::v1alpha1::EnvironmentStatus,
) -> Option<Duration> {
    let run = after.run.as_ref()?;
    let ready = run.ready_at.as_ref()?.0;
    let earlier = before.run.as_ref().filter(|earlier| earlier.sha == run.sha);
    if earlier.is_some_and(|earlier| earlier.ready_at.is_some()) {
        return None;
    }
    let received = stagely_api::pull_request::received_at(env)?;
    // The run's start is written to the second; the receipt to the millisecond.
    let started = run.started_at.as_ref()?.0 + k8s_openapi::jiff::SignedDuration::from_secs(1);
    if received > started {
        return None;
    }
    Duration::try_from(ready.duration_since(received)).ok()
}

/// The phases, as the `phase` label names them, and whether each is on its way somewhere (an
/// Environment that stays in one of those without progress is stuck).
const PHASES: [(EnvironmentPhase, &str, bool); 6] = [
    (EnvironmentPhase::Pending, "Pending", true),
    (EnvironmentPhase::Building, "Building", true),
    (EnvironmentPhase::Deploying, "Deploying", true),
    (EnvironmentPhase::Ready, "Ready", false),
    (EnvironmentPhase::Failed, "Failed", false),
    (EnvironmentPhase::Terminating, "Terminating", true),
];

/// Labels of a per-phase value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// The Environments of one phase.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseCount {
    /// The phase.
    pub phase: &'static str,
    /// How many Environments are in it (one without a phase yet counts as `Pending`).
    pub count: i64,
    /// For a phase on the way somewhere: the longest any of its Environments has gone without
    /// progress, in seconds (0 when it has none); `None` for `Ready` and `Failed`.
    pub stalled_seconds: Option<f64>,
}

/// When `env` last made progress: its creation, its run's start, a condition's last transition
/// (but the GitHub feedback's), or, once it is being deleted, its deletion.
pub fn last_progress(env: &Environment) -> Option<Timestamp> {
    if let Some(deleted) = &env.metadata.deletion_timestamp {
        return Some(deleted.0);
    }
    let status = env.status.as_ref();
    let conditions = status
        .into_iter()
        .flat_map(|s| &s.conditions)
        .filter(|c| c.type_ != GITHUB_FEEDBACK_CONDITION)
        .map(|c| c.last_transition_time.0);
    let started = status.and_then(|s| s.run.as_ref()).and_then(|run| run.started_at.as_ref()).map(|t| t.0);
    let created = env.metadata.creation_timestamp.as_ref().map(|t| t.0);
    conditions.chain(started).chain(created).max()
}

/// The Environments counted by phase (see [`PhaseCount`]), every phase listed, at `now`.
pub fn count_phases<'a>(environments: impl IntoIterator<Item = &'a Environment>, now: Timestamp) -> Vec<PhaseCount> {
    let mut counts: Vec<PhaseCount> = PHASES
        .iter()
        .map(|(_, phase, moving)| PhaseCount { phase, count: 0, stalled_seconds: moving.then_some(0.0) })
        .collect();
    for env in environments {
        let phase = env.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
        let Some(at) = PHASES.iter().position(|(p, _, _)| *p == phase) else { continue };
        let entry = &mut counts[at];
        entry.count += 1;
        if let (Some(stalled), Some(progress)) = (&mut entry.stalled_seconds, last_progress(env)) {
            let since = now.duration_since(progress).as_secs_f64().max(0.0);
            *stalled = stalled.max(since);
        }
    }
    counts
}

/// Labels of a CloudProvider's readiness.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloudProviderLabels {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its type.
    pub provider: String,
}

/// Each CloudProvider with 1 when its `Ready` condition is `True`, else 0.
pub fn cloud_provider_readiness<'a>(
    providers: impl IntoIterator<Item = &'a CloudProvider>,
) -> Vec<(CloudProviderLabels, i64)> {
    providers
        .into_iter()
        .map(|provider| {
            let ready = provider
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True");
            let labels = CloudProviderLabels {
                namespace: provider.namespace().unwrap_or_default(),
                name: provider.name_any(),
                provider: provider.spec.type_.as_str().to_owned(),
            };
            (labels, i64::from(ready))
        })
        .collect()
}

/// Labels of a per-role value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

/// Gauges counted when scraped, from what the operator holds anyway (the controllers' watch
/// caches, the gateway's connections): nothing is kept per Environment for them, and no series
/// is per Environment.
#[derive(Clone, Default)]
struct Scraped(Arc<Sources>);

#[derive(Default)]
struct Sources {
    environments: OnceLock<Store<Environment>>,
    cloud_providers: OnceLock<Store<CloudProvider>>,
    gateway: OnceLock<Gateway>,
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped")
            .field("environments", &self.0.environments.get().is_some())
            .field("cloud_providers", &self.0.cloud_providers.get().is_some())
            .field("gateway", &self.0.gateway.get().is_some())
            .finish()
    }
}

/// Encodes one gauge family of `values`.
fn gauges<S: EncodeLabelSet, N: EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(S, N)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(store) = self.0.environments.get() {
            let environments = store.state();
            let counts = count_phases(environments.iter().map(|env| &**env), Timestamp::now());
            let by_phase: Vec<_> = counts.iter().map(|c| (PhaseLabels { phase: c.phase }, c.count)).collect();
            gauges(&mut encoder, "environments", "Environments by phase", &by_phase)?;
            let stalled: Vec<_> =
                counts.iter().filter_map(|c| Some((PhaseLabels { phase: c.phase }, c.stalled_seconds?))).collect();
            gauges(
                &mut encoder,
                "environments_stalled_seconds",
                "For each phase on the way somewhere (Pending, Building, Deploying, Terminating), the longest any \
                 Environment in it has gone without progress (a condition's transition, its run's start; \
                 Terminating: since its deletion); 0 when none is in it",
                &stalled,
            )?;
        }
        if let Some(store) = self.0.cloud_providers.get() {
            let providers = store.state();
            let readiness = cloud_provider_readiness(providers.iter().map(|p| &**p));
            gauges(
                &mut encoder,
                "cloudprovider_ready",
                "1 while a CloudProvider's Ready condition is True, else 0",
                &readiness,
            )?;
        }
        if let Some(gateway) = self.0.gateway.get() {
            let connected = gateway.connected_agents();
            let by_role = [
                (RoleLabels { role: "builder" }, connected.builders as i64),
                (RoleLabels { role: "preview" }, connected.previews as i64),
            ];
            gauges(&mut encoder, "connected_agents", "Agents connected to the gateway, by role", &by_role)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector, watcher};
    use serde_json::json;
    use stagely_api::keys;
    use stagely_api::v1alpha1::EnvironmentStatus;

    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn env(name: &str, extra: serde_json::Value) -> Environment {
        let mut value = json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "Environment",
            "metadata": {"name": name, "namespace": "team", "creationTimestamp": "2026-03-01T09:00:00Z"},
            "spec": {
                "projectRef": {"name": "shop"},
                "pullRequest": {"number": 1, "headSha": "a".repeat(40), "headRef": "f", "baseRef": "main"},
            },
        });
        json_patch(&mut value, extra);
        serde_json::from_value(value).unwrap()
    }

    /// Merges `patch` into `value` (objects key by key, anything else replaced).
    fn json_patch(value: &mut serde_json::Value, patch: serde_json::Value) {
        match (value, patch) {
            (serde_json::Value::Object(value), serde_json::Value::Object(patch)) => {
                for (key, patch) in patch {
                    json_patch(value.entry(key).or_insert(serde_json::Value::Null), patch);
                }
            }
            (value, patch) => *value = patch,
        }
    }

    fn condition(type_: &str, status: &str, since: &str) -> serde_json::Value {
        json!({"type": type_, "status": status, "reason": "R", "message": "m", "lastTransitionTime": since})
    }

    #[test]
    fn environments_are_counted_by_phase_with_the_longest_wait_of_each_phase_on_its_way() {
        let now = at("2026-03-01T12:00:00Z");
        let environments = [
            // No status yet: Pending since its creation, three hours ago.
            env("new", json!({})),
            // Building since its run started an hour ago.
            env(
                "building",
                json!({"status": {"phase": "Building",
                "run": {"sha": "a", "startedAt": "2026-03-01T11:00:00Z"},
                "conditions": [condition("BuildsSucceeded", "False", "2026-03-01T11:00:00Z")]}}),
            ),
            // Deploying: its VM went Ready ten minutes ago; the GitHub feedback is no progress.
            env(
                "deploying",
                json!({"status": {"phase": "Deploying",
                "run": {"sha": "a", "startedAt": "2026-03-01T11:00:00Z"},
                "conditions": [
                    condition("BuildsSucceeded", "True", "2026-03-01T11:30:00Z"),
                    condition("VMReady", "True", "2026-03-01T11:50:00Z"),
                    condition("GitHubFeedback", "True", "2026-03-01T11:59:00Z"),
                ]}}),
            ),
            env(
                "ready",
                json!({"status": {"phase": "Ready",
                "conditions": [condition("Routed", "True", "2026-03-01T10:00:00Z")]}}),
            ),
            env("ready-too", json!({"status": {"phase": "Ready"}})),
            // Being deleted for two minutes, whatever its conditions say.
            env(
                "going",
                json!({"metadata": {"deletionTimestamp": "2026-03-01T11:58:00Z", "finalizers": ["f"]},
                "status": {"phase": "Terminating",
                    "conditions": [condition("CleanedUp", "False", "2026-03-01T11:59:30Z")]}}),
            ),
        ];
        let counts = count_phases(&environments, now);
        let seen: Vec<(&str, i64, Option<f64>)> =
            counts.iter().map(|c| (c.phase, c.count, c.stalled_seconds)).collect();
        assert_eq!(
            seen,
            [
                ("Pending", 1, Some(3.0 * 3600.0)),
                ("Building", 1, Some(3600.0)),
                ("Deploying", 1, Some(600.0)),
                ("Ready", 2, None),
                ("Failed", 0, None),
                ("Terminating", 1, Some(120.0)),
            ]
        );
        assert!(count_phases(&[], now).iter().all(|c| c.count == 0 && c.stalled_seconds.unwrap_or(0.0) == 0.0));
    }

    fn run(sha: &str, started: &str, ready: Option<&str>) -> serde_json::Value {
        json!({"sha": sha, "startedAt": started, "readyAt": ready})
    }

    fn status(phase: &str, run: serde_json::Value) -> EnvironmentStatus {
        serde_json::from_value(json!({"phase": phase, "run": run})).unwrap()
    }

    #[test]
    fn the_time_from_webhook_to_ready_is_taken_once_per_run_from_the_delivery_that_started_it() {
        let received = json!({"metadata": {"annotations": {keys::GITHUB_RECEIVED_AT: "2026-03-01T10:00:00.500Z"}}});
        let webhooked = env("e", received);
        let deploying = status("Deploying", run("a", "2026-03-01T10:00:00Z", None));
        let ready = status("Ready", run("a", "2026-03-01T10:00:00Z", Some("2026-03-01T10:03:00Z")));
        assert_eq!(
            webhook_to_ready(&webhooked, &deploying, &ready),
            Some(Duration::from_millis(179_500)),
            "the run started within the second of the receipt"
        );
        assert_eq!(webhook_to_ready(&webhooked, &ready, &ready), None, "once: it was Ready already");
        let redeploying = status("Deploying", run("a", "2026-03-01T10:00:00Z", Some("2026-03-01T10:03:00Z")));
        assert_eq!(webhook_to_ready(&webhooked, &redeploying, &ready), None, "a redeploy of the run is no new run");
        let new_run = status("Ready", run("b", "2026-03-01T10:00:00Z", Some("2026-03-01T10:03:00Z")));
        assert!(webhook_to_ready(&webhooked, &ready, &new_run).is_some(), "a new commit's run counts again");

        let later = json!({"metadata": {"annotations": {keys::GITHUB_RECEIVED_AT: "2026-03-01T10:01:00Z"}}});
        assert_eq!(webhook_to_ready(&env("e", later), &deploying, &ready), None, "a delivery after the start");
        assert_eq!(webhook_to_ready(&env("e", json!({})), &deploying, &ready), None, "applied without a webhook");
        assert_eq!(webhook_to_ready(&webhooked, &deploying, &deploying), None, "not Ready");
    }

    fn provider(name: &str, ready: Option<&str>) -> CloudProvider {
        let conditions: Vec<_> = ready.iter().map(|s| condition("Ready", s, "2026-03-01T10:00:00Z")).collect();
        serde_json::from_value(json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"type": "hetzner", "region": "fsn1", "credentialsSecretRef": {"name": "hcloud"}},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn a_cloud_provider_is_ready_only_with_its_ready_condition_true() {
        let providers = [provider("a", Some("True")), provider("b", Some("False")), provider("c", None)];
        let readiness: Vec<(String, i64)> =
            cloud_provider_readiness(&providers).into_iter().map(|(labels, ready)| (labels.name, ready)).collect();
        assert_eq!(readiness, [("a".to_owned(), 1), ("b".to_owned(), 0), ("c".to_owned(), 0)]);
    }

    #[test]
    fn the_registry_shows_known_series_at_zero_and_counts_the_caches_when_scraped() {
        let metrics = Metrics::default();
        let registry = metrics.register("0.0.0");
        let text = registry.encode();
        for line in [
            r#"stagely_operator_reaped_total{reason="HeartbeatLost"} 0"#,
            r#"stagely_operator_orphans_found_total{provider="aws"} 0"#,
            r#"stagely_operator_reconciles_total{controller="feedback",outcome="ok"} 0"#,
            r#"stagely_operator_reconcile_duration_seconds_count{controller="cloudprovider"} 0"#,
            r#"stagely_operator_vm_provisioning_seconds_count{provider="local",role="preview"} 0"#,
            "stagely_operator_environment_webhook_to_ready_seconds_count 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("stagely_operator_environments{"), "no cache yet, no count:\n{text}");

        let (environments, mut writer) = reflector::store::<Environment>();
        writer.apply_watcher_event(&watcher::Event::Apply(env("a", json!({"status": {"phase": "Ready"}}))));
        writer.apply_watcher_event(&watcher::Event::Apply(env("b", json!({"status": {"phase": "Ready"}}))));
        metrics.count_environments(environments);
        let (providers, mut writer) = reflector::store::<CloudProvider>();
        writer.apply_watcher_event(&watcher::Event::Apply(provider("hcloud", Some("False"))));
        metrics.count_cloud_providers(providers);
        metrics.reconciled_after("environment", "ok", Instant::now());
        let text = registry.encode();
        for line in [
            r#"stagely_operator_environments{phase="Ready"} 2"#,
            r#"stagely_operator_environments{phase="Building"} 0"#,
            r#"stagely_operator_environments_stalled_seconds{phase="Deploying"} 0"#,
            r#"stagely_operator_cloudprovider_ready{namespace="team",name="hcloud",provider="hetzner"} 0"#,
            r#"stagely_operator_reconcile_duration_seconds_count{controller="environment"} 1"#,
            r#"stagely_operator_reconciles_total{controller="environment",outcome="ok"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains(r#"environments_stalled_seconds{phase="Ready"}"#), "{text}");
    }
}
