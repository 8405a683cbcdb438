//! The Kubernetes objects agents work for, as the gateway sees them: whether a scope still names
//! a live object, and where an agent's last heartbeat is recorded (`status.lastHeartbeat`).
//!
//! Pluggable so that the benchmark and the agent's tests run the gateway without an apiserver.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use stagely_api::protocol::{Scope, ScopeKind};
use stagely_api::v1alpha1::{BuildJob, Environment};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A boxed, sendable future (the trait below is used as a trait object).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The field manager of the gateway's status writes.
pub const FIELD_MANAGER: &str = "stagely-agent-gateway";

/// Why the objects could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// The apiserver refused or failed.
    #[error("failed to {action} {kind} {namespace}/{name}: {source}")]
    Kube {
        /// What was attempted.
        action: &'static str,
        /// The object's kind.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The cause.
        source: kube::Error,
    },
}

/// What the gateway needs to know and record about the objects agents work for.
pub trait ScopeObjects: Send + Sync + 'static {
    /// Whether `scope` still names an existing object with the scope's UID.
    fn is_current<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Result<bool, ObjectsError>>;

    /// Records `at` as the object's last agent heartbeat.
    fn record_heartbeat<'a>(&'a self, scope: &'a Scope, at: Timestamp) -> BoxFuture<'a, Result<(), ObjectsError>>;
}

/// No apiserver: every scope is current and heartbeats are not recorded (benchmarks, and tests
/// of the agent that need no Kubernetes).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObjects;

impl ScopeObjects for NoObjects {
    fn is_current<'a>(&'a self, _scope: &'a Scope) -> BoxFuture<'a, Result<bool, ObjectsError>> {
        Box::pin(async { Ok(true) })
    }

    fn record_heartbeat<'a>(&'a self, _scope: &'a Scope, _at: Timestamp) -> BoxFuture<'a, Result<(), ObjectsError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The Environments and BuildJobs in the cluster.
#[derive(Clone)]
pub struct KubeObjects {
    client: kube::Client,
}

impl std::fmt::Debug for KubeObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeObjects").finish_non_exhaustive()
    }
}

impl KubeObjects {
    /// Objects read and written through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    fn error(action: &'static str, scope: &Scope, source: kube::Error) -> ObjectsError {
        ObjectsError::Kube {
            action,
            kind: kind_name(scope.kind),
            namespace: scope.namespace.clone(),
            name: scope.name.clone(),
            source,
        }
    }
}

fn kind_name(kind: ScopeKind) -> &'static str {
    match kind {
        ScopeKind::Environment => "Environment",
        ScopeKind::BuildJob => "BuildJob",
    }
}

impl ScopeObjects for KubeObjects {
    fn is_current<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Result<bool, ObjectsError>> {
        Box::pin(async move {
            let uid = match scope.kind {
                ScopeKind::Environment => Api::<Environment>::namespaced(self.client.clone(), &scope.namespace)
                    .get_opt(&scope.name)
                    .await
                    .map(|object| object.and_then(|o| o.metadata.uid)),
                ScopeKind::BuildJob => Api::<BuildJob>::namespaced(self.client.clone(), &scope.namespace)
                    .get_opt(&scope.name)
                    .await
                    .map(|object| object.and_then(|o| o.metadata.uid)),
            }
            .map_err(|source| Self::error("get", scope, source))?;
            Ok(uid.as_deref() == Some(scope.uid.as_str()))
        })
    }

    fn record_heartbeat<'a>(&'a self, scope: &'a Scope, at: Timestamp) -> BoxFuture<'a, Result<(), ObjectsError>> {
        Box::pin(async move {
            // The UID in the patch makes the write fail, rather than land on a recreated object
            // of the same name.
            let patch = serde_json::json!({
                "metadata": {"uid": scope.uid},
                "status": {"lastHeartbeat": Time(at)},
            });
            let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PatchParams::default() };
            let result = match scope.kind {
                ScopeKind::Environment => Api::<Environment>::namespaced(self.client.clone(), &scope.namespace)
                    .patch_status(&scope.name, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop),
                ScopeKind::BuildJob => Api::<BuildJob>::namespaced(self.client.clone(), &scope.namespace)
                    .patch_status(&scope.name, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop),
            };
            result.map_err(|source| Self::error("record the heartbeat of", scope, source))
        })
    }
}

/// Coalesces heartbeats: the hot path only notes the time; a background task writes each
/// object's latest heartbeat at most once per interval, the writes of one round spread evenly
/// over the interval. Every write is an update each watch of the kind receives: thousands of
/// previews written at once would be a burst for the apiserver and for every watcher's buffers,
/// the operator's own included.
#[derive(Default)]
pub(crate) struct HeartbeatRecorder {
    latest: Mutex<HashMap<Arc<Scope>, Timestamp>>,
}

/// Status writes in flight at once.
const MAX_CONCURRENT_WRITES: usize = 16;

impl HeartbeatRecorder {
    /// Notes a heartbeat from `scope`'s agent now.
    pub(crate) fn touch(&self, scope: &Arc<Scope>) {
        let now = Timestamp::now();
        let mut latest = self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        latest.insert(Arc::clone(scope), now);
    }

    /// Writes what was noted every `interval`, spread over it, until `shutdown` turns true; then
    /// what is left at once. A heartbeat is written at most two intervals after it was noted.
    pub(crate) async fn run(
        self: Arc<Self>,
        objects: Arc<dyn ScopeObjects>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = ticker.tick() => false,
                _ = shutdown.wait_for(|stop| *stop) => true,
            };
            self.flush(&objects, interval, &mut shutdown).await;
            if stopping {
                return;
            }
        }
    }

    /// Writes the heartbeats noted so far, spread over `over` (at once once `shutdown` is true).
    async fn flush(&self, objects: &Arc<dyn ScopeObjects>, over: Duration, shutdown: &mut watch::Receiver<bool>) {
        let batch = std::mem::take(&mut *self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let mut gap = over / u32::try_from(batch.len().max(1)).unwrap_or(u32::MAX);
        let mut writes = JoinSet::new();
        for (scope, at) in batch {
            if writes.len() >= MAX_CONCURRENT_WRITES {
                writes.join_next().await;
            }
            let objects = Arc::clone(objects);
            writes.spawn(async move {
                if let Err(err) = objects.record_heartbeat(&scope, at).await {
                    tracing::warn!(error = %err, "failed to record an agent heartbeat");
                }
            });
            if !gap.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(gap) => {}
                    _ = shutdown.wait_for(|stop| *stop) => gap = Duration::ZERO,
                }
            }
        }
        while writes.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records when each heartbeat write happened (tokio's clock, paused).
    #[derive(Default)]
    struct Recorded(Mutex<Vec<(String, tokio::time::Instant)>>);

    impl ScopeObjects for Recorded {
        fn is_current<'a>(&'a self, _scope: &'a Scope) -> BoxFuture<'a, Result<bool, ObjectsError>> {
            Box::pin(async { Ok(true) })
        }

        fn record_heartbeat<'a>(&'a self, scope: &'a Scope, _at: Timestamp) -> BoxFuture<'a, Result<(), ObjectsError>> {
            self.0.lock().unwrap().push((scope.name.clone(), tokio::time::Instant::now()));
            Box::pin(async { Ok(()) })
        }
    }

    fn scope(name: &str) -> Arc<Scope> {
        Arc::new(Scope {
            kind: ScopeKind::Environment,
            namespace: "team".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_rounds_writes_are_spread_over_the_interval_and_a_shutdown_writes_the_rest_at_once() {
        let recorder = Arc::new(HeartbeatRecorder::default());
        let recorded = Arc::new(Recorded::default());
        let objects: Arc<dyn ScopeObjects> = recorded.clone();
        let (stop, shutdown) = watch::channel(false);
        let interval = Duration::from_secs(100);
        let start = tokio::time::Instant::now();
        // The first round (at once) finds nothing; ten agents heartbeat before the second.
        let task = tokio::spawn(Arc::clone(&recorder).run(objects, interval, shutdown));
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 0..10 {
            recorder.touch(&scope(&format!("env-{i}")));
        }
        tokio::time::sleep(Duration::from_secs(150)).await;
        let times: Vec<u64> = recorded.0.lock().unwrap().iter().map(|(_, at)| (*at - start).as_secs()).collect();
        assert_eq!(times, [100, 110, 120, 130, 140, 150], "one write every tenth of the interval");

        stop.send(true).unwrap();
        task.await.unwrap();
        let written = recorded.0.lock().unwrap().clone();
        assert_eq!(written.len(), 10, "every noted heartbeat is written");
        assert!(written[6..].iter().all(|(_, at)| (*at - start).as_secs() == 151), "the rest at once: {written:?}");
    }
}
