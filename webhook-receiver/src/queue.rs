//! The work the receiver does after it answered: at most one job waiting per pull request of a
//! Project, the newest; one worker at a time on a pull request.
//!
//! A burst of deliveries about one pull request (a force-push storm, a redelivery of everything)
//! costs one write (the workers also space a pull request's writes), and the queue holds at most
//! one job per pull request, however many deliveries arrive; it is bounded by the number of pull
//! requests waiting.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::plan::Job;

/// A pull request of a Project: `(namespace, project, number)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The Project's namespace.
    pub namespace: String,
    /// The Project's name.
    pub project: String,
    /// The pull request number.
    pub number: i64,
}

/// What became of a pushed job.
#[derive(Debug, PartialEq)]
pub enum Pushed {
    /// It waits for a worker.
    Queued,
    /// It replaced an older job of the same pull request, which is dropped.
    Replaced,
    /// A newer job of the same pull request waits already: this one is dropped.
    Outdated,
}

/// The queue is full: as many pull requests wait as it may hold.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Default)]
struct State {
    /// The newest job of each pull request waiting.
    waiting: HashMap<Key, Job>,
    /// Pull requests with a job waiting and no worker on them, oldest first.
    ready: VecDeque<Key>,
    /// Pull requests a worker is on.
    busy: HashSet<Key>,
}

/// The job queue; see the module documentation.
pub struct Queue {
    state: Mutex<State>,
    capacity: usize,
    wake: Notify,
    idle: Notify,
}

impl Queue {
    /// A queue holding jobs of at most `capacity` pull requests.
    pub fn new(capacity: usize) -> Self {
        Self { state: Mutex::default(), capacity: capacity.max(1), wake: Notify::new(), idle: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A worker that panicked left consistent state behind: every change is one statement.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `job` for `key`, unless a newer job of that pull request waits.
    pub fn push(&self, key: Key, job: Job) -> Result<Pushed, Full> {
        let mut state = self.lock();
        if let Some(waiting) = state.waiting.get_mut(&key) {
            if job.supersedes(waiting) {
                *waiting = job;
                return Ok(Pushed::Replaced);
            }
            return Ok(Pushed::Outdated);
        }
        if state.waiting.len() >= self.capacity {
            return Err(Full);
        }
        if !state.busy.contains(&key) {
            state.ready.push_back(key.clone());
        }
        state.waiting.insert(key, job);
        drop(state);
        self.wake.notify_one();
        Ok(Pushed::Queued)
    }

    /// The next job, waiting for one; its pull request is the caller's until [`Queue::done`].
    pub async fn take(&self) -> (Key, Job) {
        loop {
            let wake = self.wake.notified();
            {
                let mut state = self.lock();
                if let Some(key) = state.ready.pop_front() {
                    let job = state.waiting.remove(&key).expect("a ready pull request has a waiting job");
                    state.busy.insert(key.clone());
                    return (key, job);
                }
            }
            wake.await;
        }
    }

    /// The worker is done with `key`; a job that arrived meanwhile becomes ready.
    pub fn done(&self, key: &Key) {
        let mut state = self.lock();
        state.busy.remove(key);
        let again = state.waiting.contains_key(key);
        if again {
            state.ready.push_back(key.clone());
        }
        let idle = state.waiting.is_empty() && state.busy.is_empty();
        drop(state);
        if again {
            self.wake.notify_one();
        }
        if idle {
            self.idle.notify_waiters();
        }
    }

    /// Pull requests with a job waiting or being worked on.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.waiting.len() + state.busy.iter().filter(|key| !state.waiting.contains_key(*key)).count()
    }

    /// Whether nothing waits and no worker is busy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Completes once nothing waits and no worker is busy.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.is_empty() {
                return;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::plan::{Action, Intent, Removal};

    fn key(number: i64) -> Key {
        Key { namespace: "team".into(), project: "shop".into(), number }
    }

    fn job(delivery: &str, second: i64) -> Job {
        Job {
            delivery: delivery.into(),
            action: Action::Synchronize,
            updated_at: Timestamp::from_second(1_790_000_000 + second).unwrap(),
            received_at: Timestamp::from_second(1_790_000_000 + second).unwrap(),
            intent: Intent::Remove { reason: Removal::Closed, transition: false },
            retry: None,
        }
    }

    #[tokio::test]
    async fn one_job_waits_per_pull_request_the_newest() {
        let queue = Queue::new(10);
        assert_eq!(queue.push(key(1), job("a", 1)), Ok(Pushed::Queued));
        assert_eq!(queue.push(key(1), job("b", 2)), Ok(Pushed::Replaced));
        assert_eq!(queue.push(key(1), job("c", 1)), Ok(Pushed::Outdated));
        assert_eq!(queue.push(key(2), job("d", 1)), Ok(Pushed::Queued));
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.take().await, (key(1), job("b", 2)));
        assert_eq!(queue.take().await, (key(2), job("d", 1)));
        assert!(!queue.is_empty(), "two workers are busy");
    }

    #[tokio::test]
    async fn a_pull_request_is_worked_on_by_one_worker_at_a_time() {
        let queue = Queue::new(10);
        queue.push(key(1), job("a", 1)).unwrap();
        let (taken, _) = queue.take().await;
        queue.push(key(1), job("b", 2)).unwrap();
        queue.push(key(2), job("c", 1)).unwrap();
        // Pull request 1 is busy: the next job is pull request 2's.
        assert_eq!(queue.take().await, (key(2), job("c", 1)));
        queue.done(&taken);
        assert_eq!(queue.take().await, (key(1), job("b", 2)));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_new_pull_requests_but_takes_newer_jobs_of_waiting_ones() {
        let queue = Queue::new(1);
        queue.push(key(1), job("a", 1)).unwrap();
        assert_eq!(queue.push(key(2), job("b", 1)), Err(Full));
        assert_eq!(queue.push(key(1), job("c", 2)), Ok(Pushed::Replaced));
    }

    #[tokio::test]
    async fn drained_completes_when_the_last_job_is_done() {
        let queue = std::sync::Arc::new(Queue::new(10));
        queue.drained().await;
        queue.push(key(1), job("a", 1)).unwrap();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.drained().await }
        });
        let (taken, _) = queue.take().await;
        assert!(!waiter.is_finished());
        queue.done(&taken);
        waiter.await.unwrap();
    }
}
