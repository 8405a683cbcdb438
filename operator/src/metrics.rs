//! The operator's own Prometheus metrics, registered beside `build_info` in the ops registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use stagely_api::ops;

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
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            build_duration: Family::new_with_constructor(|| {
                Histogram::new([5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0])
            }),
            reconciles: Family::default(),
            followed_jobs: Family::default(),
            github: crate::github::GitHubMetrics::default(),
            reaped: Family::default(),
            orphans_found: Family::default(),
            orphans_terminated: Family::default(),
            leader: Gauge::default(),
        }
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
        })
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
}
