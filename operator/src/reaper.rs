//! The reaper: deletes Environments whose preview agent went silent (`HeartbeatLost`) or whose
//! TTL ran out (`Expired`), and sweeps every Ready CloudProvider for orphaned VMs (Stagely's tags,
//! an owner UID no Environment or BuildJob has any more) and terminates them.
//!
//! Runs that are stuck are failed by the Environment controller itself (`BuildStuck`, `DeployStuck`),
//! where the phase is decided; the reaper deletes, it never writes an Environment's status.
//! Every action is an Event, a log line and a count in `stagely_operator_reaped_total` or
//! `stagely_operator_orphans_terminated_total`, and a reaped Environment carries
//! [`keys::REAPED`] so that its pull request's comment says why the preview went.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{EventType, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use stagely_api::keys;
use stagely_api::v1alpha1::{CloudProvider as CloudProviderObject, Environment, EnvironmentPhase, Project};

use crate::controllers::environment::preview;
use crate::controllers::events::Recorder;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::providers::account::{self, Endpoints};
use crate::providers::orphans;

/// The name Events report.
pub const CONTROLLER: &str = "stagely-reaper";

/// How the reaper and the orphan sweep run.
#[derive(clap::Args, Debug, Clone)]
pub struct ReaperConfig {
    /// Seconds without a heartbeat from a running preview's agent before its Environment is
    /// deleted (`HeartbeatLost`). Agents send one every 30 s.
    #[arg(long, env = "STAGELY_HEARTBEAT_TIMEOUT_SECS", default_value_t = 900)]
    pub heartbeat_timeout_secs: u64,

    /// Seconds between two looks at every Environment (heartbeats and TTLs).
    #[arg(long, env = "STAGELY_REAP_INTERVAL_SECS", default_value_t = 60)]
    pub reap_interval_secs: u64,

    /// Seconds between two orphan sweeps of every Ready CloudProvider.
    #[arg(long, env = "STAGELY_SWEEP_INTERVAL_SECS", default_value_t = 300)]
    pub sweep_interval_secs: u64,

    /// Seconds an orphaned VM is left alone after its launch before the sweep terminates it.
    #[arg(long, env = "STAGELY_ORPHAN_GRACE_SECS", default_value_t = 600)]
    pub orphan_grace_secs: u64,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        Self { heartbeat_timeout_secs: 900, reap_interval_secs: 60, sweep_interval_secs: 300, orphan_grace_secs: 600 }
    }
}

/// Why the reaper deletes an Environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `Expired` or `HeartbeatLost`: the Event's reason and the metric's label.
    pub reason: &'static str,
    /// What the user reads, in the Event and the pull request's comment.
    pub message: String,
}

/// Reason: past `status.expiresAt`.
pub const EXPIRED: &str = "Expired";
/// Reason: a running preview's agent has not been heard from for the heartbeat timeout.
pub const HEARTBEAT_LOST: &str = "HeartbeatLost";

/// Whether the reaper deletes `env` now, and why.
///
/// A preview "should be running" once it is Deploying or Ready on a VM whose agent connected;
/// its agent was last heard at its `lastHeartbeat`, when `AgentConnected` last turned True, or
/// when the reaper started watching, whichever is latest: after an operator restart (or a new
/// leader) agents get the whole timeout to reconnect before anything is reaped. An agent the
/// gateway holds a connection to right now (`connected`) is never lost.
pub fn verdict(
    env: &Environment,
    now: Timestamp,
    heartbeat_timeout: Duration,
    watching_since: Timestamp,
    connected: bool,
) -> Option<Verdict> {
    if env.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = env.status.as_ref()?;
    if let Some(expires) = &status.expires_at
        && expires.0 <= now
    {
        let ttl = env.spec.overrides.as_ref().and_then(|o| o.ttl.clone());
        let ttl = ttl.map(|ttl| format!(" (TTL {ttl})")).unwrap_or_default();
        return Some(Verdict {
            reason: EXPIRED,
            message: format!(
                "the preview expired at {}{ttl}: no new commit since its run started",
                expires.0.strftime("%Y-%m-%d %H:%M:%S UTC")
            ),
        });
    }
    let running = matches!(status.phase, Some(EnvironmentPhase::Ready | EnvironmentPhase::Deploying));
    let agent = status.conditions.iter().find(|c| c.type_ == preview::AGENT_CONNECTED);
    if !running || status.vm.is_none() || connected {
        return None;
    }
    // An agent that never connected is the Environment controller's to fail (AgentNeverConnected).
    let connected_at = agent.filter(|c| c.status == "True").map(|c| c.last_transition_time.0);
    let heartbeat = status.last_heartbeat.as_ref().map(|t| t.0);
    if connected_at.is_none() && heartbeat.is_none() && status.deployment.is_none() {
        return None;
    }
    let last_heard = [connected_at, heartbeat, Some(watching_since)].into_iter().flatten().max()?;
    let silent = SignedDuration::try_from(heartbeat_timeout).ok()?;
    if now.duration_since(last_heard) <= silent {
        return None;
    }
    let since = heartbeat.or(connected_at).unwrap_or(last_heard);
    Some(Verdict {
        reason: HEARTBEAT_LOST,
        message: format!(
            "no heartbeat from the preview's agent since {} (more than {}s): its VM is presumed gone",
            since.strftime("%Y-%m-%d %H:%M:%S UTC"),
            heartbeat_timeout.as_secs()
        ),
    })
}

/// The reaper and the orphan sweep.
pub struct Reaper {
    client: Client,
    gateway: Option<Gateway>,
    endpoints: Endpoints,
    metrics: Metrics,
    recorder: Recorder,
    config: ReaperConfig,
    watching_since: Timestamp,
}

impl Reaper {
    /// A reaper over `client`'s cluster; `gateway` tells which agents are connected now.
    pub fn new(
        client: Client,
        gateway: Option<Gateway>,
        endpoints: Endpoints,
        metrics: Metrics,
        config: ReaperConfig,
    ) -> Self {
        let reporter = Reporter { controller: CONTROLLER.into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            gateway,
            endpoints,
            metrics,
            config,
            watching_since: Timestamp::now(),
        }
    }

    /// Looks at every Environment once (a page at a time) and deletes those with a verdict.
    pub async fn reap(&self) -> Result<usize, kube::Error> {
        let api: Api<Environment> = Api::all(self.client.clone());
        let timeout = Duration::from_secs(self.config.heartbeat_timeout_secs);
        // Small pages: a look at thousands of Environments must not swell the operator's memory.
        let mut params = ListParams::default().limit(100);
        let mut reaped = 0;
        loop {
            let page = api.list(&params).await?;
            let now = Timestamp::now();
            for env in &page.items {
                let connected = self.gateway.as_ref().is_some_and(|g| g.is_connected(&preview::scope(env)));
                if let Some(verdict) = verdict(env, now, timeout, self.watching_since, connected) {
                    match self.delete(env, &verdict).await {
                        Ok(true) => reaped += 1,
                        Ok(false) => {}
                        Err(err) => tracing::warn!(
                            namespace = ?env.namespace(), name = %env.name_any(), error = %err, "cannot reap"
                        ),
                    }
                }
            }
            match page.metadata.continue_.filter(|token| !token.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(reaped),
            }
        }
    }

    /// Marks `env` with why, records the removal on its Project (so that neither the resync nor
    /// a redelivered webhook brings the same state of the pull request back), and deletes it.
    async fn delete(&self, env: &Environment, verdict: &Verdict) -> Result<bool, kube::Error> {
        let namespace = env.namespace().unwrap_or_default();
        let name = env.name_any();
        let api: Api<Environment> = Api::namespaced(self.client.clone(), &namespace);
        let why = format!("{}: {}", verdict.reason, verdict.message);
        let patch = json!({"metadata": {"annotations": {keys::REAPED: why}}});
        match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(false),
            Err(err) => return Err(err),
        }
        let project =
            Api::<Project>::namespaced(self.client.clone(), &namespace).get_opt(&env.spec.project_ref.name).await?;
        let record = project.as_ref().zip(stagely_api::pull_request::applied_at(env));
        if !crate::controllers::remove_environment(&self.client, record, env).await? {
            return Ok(false);
        }
        tracing::warn!(%namespace, %name, reason = verdict.reason, message = %verdict.message, "reaped an Environment");
        self.metrics.reap(verdict.reason);
        self.event(&env.object_ref(&()), verdict.reason, &verdict.message).await;
        Ok(true)
    }

    /// Sweeps every Ready CloudProvider not being deleted (a CloudProvider being deleted sweeps
    /// itself, from its finalizer): orphans older than the grace period are terminated.
    pub async fn sweep(&self) -> Result<usize, kube::Error> {
        let providers = Api::<CloudProviderObject>::all(self.client.clone()).list(&ListParams::default()).await?;
        let grace = Duration::from_secs(self.config.orphan_grace_secs);
        let mut terminated = 0;
        for object in &providers.items {
            let ready = object
                .status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if !ready || object.metadata.deletion_timestamp.is_some() {
                continue;
            }
            terminated += sweep_provider(&self.client, &self.endpoints, &self.metrics, &self.recorder, object, grace)
                .await
                .map(|swept| swept.terminated.len())
                .unwrap_or(0);
        }
        Ok(terminated)
    }

    async fn event(&self, regarding: &k8s_openapi::api::core::v1::ObjectReference, reason: &str, note: &str) {
        self.recorder.record(regarding, EventType::Warning, "Reap", reason, note.into()).await;
    }

    /// Reaps every `reap_interval_secs` and sweeps every `sweep_interval_secs` until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
        let reap_every = Duration::from_secs(self.config.reap_interval_secs.max(1));
        let sweep_every = Duration::from_secs(self.config.sweep_interval_secs.max(1));
        let mut reap_ticks = tokio::time::interval(reap_every);
        let mut sweep_ticks = tokio::time::interval(sweep_every);
        reap_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = reap_ticks.tick() => {
                    if let Err(err) = self.reap().await {
                        tracing::warn!(error = %err, "the reaper could not list Environments; trying again");
                    }
                }
                _ = sweep_ticks.tick() => {
                    if let Err(err) = self.sweep().await {
                        tracing::warn!(error = %err, "the orphan sweep could not list CloudProviders; trying again");
                    }
                }
            }
        }
    }
}

/// Why a sweep of one CloudProvider could not look at its VMs.
#[derive(Debug)]
pub struct SweepFailure {
    /// What failed, for the user.
    pub message: String,
    /// Nothing will reach this account's VMs through this CloudProvider (its credentials Secret
    /// is gone or the provider rejects the credentials), as opposed to a failure worth retrying.
    pub permanent: bool,
}

/// Sweeps one CloudProvider: terminates its namespace's orphans older than `grace`, each with an
/// Event on the CloudProvider and a count; a failure to list or terminate is an Event too. Used
/// by the periodic sweep and by the CloudProvider's finalizer (with no grace).
pub async fn sweep_provider(
    client: &Client,
    endpoints: &Endpoints,
    metrics: &Metrics,
    recorder: &Recorder,
    object: &CloudProviderObject,
    grace: Duration,
) -> Result<orphans::Swept, SweepFailure> {
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let type_ = object.spec.type_.as_str();
    let regarding = object.object_ref(&());
    let publish = |reason: &'static str, note: String| {
        let regarding = regarding.clone();
        async move { recorder.record(&regarding, EventType::Warning, "SweepOrphans", reason, note).await }
    };
    let swept = match account::connect(client, object, endpoints).await {
        Ok(provider) => orphans::sweep(provider.as_ref(), client, &namespace, grace).await.map_err(|err| {
            let permanent =
                matches!(&err, orphans::SweepError::List(crate::providers::ProviderError::InvalidCredentials { .. }));
            SweepFailure { message: err.to_string(), permanent }
        }),
        Err(err) => {
            let permanent = !matches!(err, account::AccountError::Kube { .. });
            Err(SweepFailure { message: err.to_string(), permanent })
        }
    };
    let swept = match swept {
        Ok(swept) => swept,
        Err(failure) => {
            tracing::warn!(%namespace, %name, error = %failure.message, "orphan sweep failed");
            publish("SweepFailed", format!("the orphan sweep failed: {}", failure.message)).await;
            return Err(failure);
        }
    };
    metrics.swept(type_, swept.terminated.len() + swept.failed.len(), swept.terminated.len());
    for (id, owner) in &swept.terminated {
        tracing::warn!(%namespace, %name, instance = %id, %owner, "terminated an orphaned VM");
        let note = format!("terminated VM {id}: its owner (UID {owner}) no longer exists");
        publish("OrphanTerminated", note).await;
    }
    for (id, err) in &swept.failed {
        tracing::warn!(%namespace, %name, instance = %id, error = %err, "cannot terminate an orphaned VM");
        publish("OrphanNotTerminated", format!("cannot terminate orphaned VM {id} yet: {err}")).await;
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use stagely_api::v1alpha1::{EnvironmentSpec, EnvironmentStatus, LocalObjectRef, PullRequest, VmStatus};

    use super::*;

    const MIN: i64 = 60;

    fn at(minutes: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + minutes * MIN).unwrap()
    }

    fn env(
        phase: EnvironmentPhase,
        heartbeat: Option<i64>,
        connected_at: Option<i64>,
        expires: Option<i64>,
    ) -> Environment {
        let mut env = Environment::new(
            "shop-pr-7",
            EnvironmentSpec {
                project_ref: LocalObjectRef { name: "shop".into() },
                pull_request: PullRequest { number: 7, head_sha: "9f2c1e0".into(), ..PullRequest::default() },
                overrides: None,
            },
        );
        env.status = Some(EnvironmentStatus {
            phase: Some(phase),
            vm: Some(VmStatus::default()),
            last_heartbeat: heartbeat.map(|m| Time(at(m))),
            expires_at: expires.map(|m| Time(at(m))),
            conditions: connected_at
                .map(|m| Condition {
                    type_: preview::AGENT_CONNECTED.into(),
                    status: "True".into(),
                    reason: "Connected".into(),
                    message: String::new(),
                    last_transition_time: Time(at(m)),
                    observed_generation: None,
                })
                .into_iter()
                .collect(),
            ..EnvironmentStatus::default()
        });
        env
    }

    #[test]
    fn the_reaper_deletes_expired_and_silent_previews_and_nothing_else() {
        let timeout = Duration::from_secs(15 * 60);
        let ready = EnvironmentPhase::Ready;
        // (environment, now, connected now, the reaper's start, verdict, case); minutes.
        let cases = [
            (env(ready, Some(100), Some(50), None), 110, false, 0, None, "heard 10 minutes ago"),
            (env(ready, Some(100), Some(50), None), 116, false, 0, Some(HEARTBEAT_LOST), "silent for 16 minutes"),
            (env(ready, Some(100), Some(50), None), 116, true, 0, None, "connected right now"),
            (env(EnvironmentPhase::Deploying, None, Some(100), None), 120, false, 0, Some(HEARTBEAT_LOST), "deploying"),
            (env(ready, Some(100), Some(50), None), 120, false, 110, None, "the reaper started 10 minutes ago"),
            (env(ready, None, None, None), 500, false, 0, None, "the agent never connected"),
            (env(EnvironmentPhase::Failed, Some(100), Some(50), None), 500, false, 0, None, "a failed run"),
            (env(EnvironmentPhase::Building, None, None, None), 500, false, 0, None, "building"),
            (env(EnvironmentPhase::Building, None, None, Some(400)), 401, false, 0, Some(EXPIRED), "expired"),
            (env(ready, Some(100), Some(50), Some(400)), 399, true, 0, None, "not yet expired"),
            (env(ready, Some(100), Some(50), Some(120)), 121, true, 0, Some(EXPIRED), "expired while connected"),
        ];
        for (env, now, connected, started, expected, case) in cases {
            let got = verdict(&env, at(now), timeout, at(started), connected);
            assert_eq!(got.as_ref().map(|v| v.reason), expected, "{case}: {got:?}");
        }
        let started = at(0);
        let mut deleting = env(ready, Some(100), Some(50), Some(10));
        deleting.metadata.deletion_timestamp = Some(Time(at(11)));
        assert_eq!(verdict(&deleting, at(500), timeout, started, false), None, "already being deleted");
        let silent = verdict(&env(ready, Some(100), Some(50), None), at(116), timeout, started, false).unwrap();
        assert_eq!(
            silent.message,
            "no heartbeat from the preview's agent since 2027-01-15 09:40:00 UTC (more than 900s): its VM is presumed gone"
        );
    }
}
