//! Following an agent job's STATUS updates without polling: a task per job awaits the gateway's
//! updates, keeps the latest, and wakes the owning object's reconcile on each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::runtime::reflector::ObjectRef;
use prometheus_client::metrics::gauge::Gauge;
use stagely_api::protocol::Status;
use tokio::sync::mpsc;

use crate::gateway;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Follower {
    latest: Arc<Mutex<Option<Status>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The jobs being followed, by job id.
pub struct Followers<K: kube::Resource<DynamicType = ()>> {
    jobs: Mutex<HashMap<String, Follower>>,
    wake: mpsc::UnboundedSender<ObjectRef<K>>,
    /// How many jobs are followed (each holds a task and its last STATUS).
    count: Gauge,
}

impl<K: kube::Resource<DynamicType = ()> + Send + Sync + 'static> Followers<K> {
    /// Followers that wake objects through `wake`, and keep `count` at how many jobs they follow.
    pub fn new(wake: mpsc::UnboundedSender<ObjectRef<K>>, count: Gauge) -> Self {
        Self { jobs: Mutex::new(HashMap::new()), wake, count }
    }

    /// Changes the followed jobs, and the count with them.
    fn jobs<T>(&self, change: impl FnOnce(&mut HashMap<String, Follower>) -> T) -> T {
        let mut jobs = lock(&self.jobs);
        let result = change(&mut jobs);
        self.count.set(i64::try_from(jobs.len()).unwrap_or(i64::MAX));
        result
    }

    /// Whether `job_id` is followed (still running, or its final STATUS is in).
    pub fn following(&self, job_id: &str) -> bool {
        lock(&self.jobs).get(job_id).is_some_and(|follower| {
            !follower.task.is_finished() || lock(&follower.latest).as_ref().is_some_and(|s| s.state.is_final())
        })
    }

    /// The latest STATUS of `job_id`, if any came.
    pub fn latest(&self, job_id: &str) -> Option<Status> {
        lock(&self.jobs).get(job_id).and_then(|follower| lock(&follower.latest).clone())
    }

    /// Follows `job`, waking `object`'s reconcile on each STATUS.
    pub fn follow(&self, object: ObjectRef<K>, mut job: gateway::Job) {
        let job_id = job.job_id().to_owned();
        let first = job.latest();
        if first.is_some() {
            let _ = self.wake.send(object.clone());
        }
        let latest = Arc::new(Mutex::new(first));
        let wake = self.wake.clone();
        let task = tokio::spawn({
            let latest = Arc::clone(&latest);
            async move {
                // Ends with the final STATUS, or when the gateway forgets the job.
                while let Ok(status) = job.next_status().await {
                    let done = status.state.is_final();
                    *lock(&latest) = Some(status);
                    let _ = wake.send(object.clone());
                    if done {
                        break;
                    }
                }
            }
        });
        self.jobs(|jobs| jobs.insert(job_id, Follower { latest, task }));
    }

    /// Stops following `job_id`.
    pub fn stop(&self, job_id: &str) {
        self.jobs(|jobs| jobs.remove(job_id));
    }

    /// Stops following every job.
    pub fn clear(&self) {
        self.jobs(HashMap::clear);
    }

    /// Stops following every job whose id starts with `prefix`.
    pub fn stop_prefix(&self, prefix: &str) {
        self.jobs(|jobs| jobs.retain(|id, _| !id.starts_with(prefix)));
    }
}
