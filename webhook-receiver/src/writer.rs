//! The workers: they take jobs from the queue, look at the Environment as it is, decide
//! ([`plan::decide`]) and carry the decision out against the apiserver, after the delivery was
//! answered.
//!
//! Every write is conditional, so that two receivers (or a receiver and a person) never undo
//! each other: an Environment is created only if it does not exist, applied or deleted only at
//! the version the decision was made on; when it changed meanwhile, the job is decided again.
//! A failed call is retried with backoff until it works, the job is superseded, or a deadline
//! passes; a job the apiserver refuses as invalid is dropped. Either way the delivery is
//! forgotten, so that a redelivery from GitHub tries again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use stagely_api::backoff::Backoff;
use stagely_api::pull_request;
use stagely_api::v1alpha1::{Environment, Project};
use stagely_api::{keys, names};
use tracing::Instrument;

use crate::deliveries::Deliveries;
use crate::metrics::WebhookMetrics;
use crate::plan::{self, Decision, Intent, Job, Observed, Retry};
use crate::queue::{Key, Queue};

/// Times a job is decided again in a row because the Environment changed under it.
const CONFLICT_ATTEMPTS: u32 = 5;
/// How often a job waits for an Environment being deleted to be gone.
const TERMINATING_POLL: Duration = Duration::from_secs(2);
/// The outcomes that wrote something.
const WRITES: [&str; 4] = ["created", "applied", "deleted", "removal_recorded"];

/// How long a pull request is held after a write: `interval` and up to a quarter more, at
/// random. Pull requests written together once (the first deliveries after a start, a
/// redelivery of everything) would otherwise be written together every interval ever after,
/// a burst of apply calls on the apiserver each time instead of an even flow.
fn spread(interval: Duration) -> Duration {
    interval + interval.mul_f64(fastrand::f64() / 4.0)
}

/// How the workers behave.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// Workers, each on one pull request at a time.
    pub workers: usize,
    /// Deadline of each apiserver call.
    pub call_timeout: Duration,
    /// How long a failing job is retried before it is dropped.
    pub give_up_after: Duration,
    /// Least time between two writes of one pull request's Environment: the deliveries of a
    /// burst (a force-push storm, a redelivery of everything) coalesce into the newest meanwhile.
    pub min_interval: Duration,
}

/// What the workers share.
pub struct Writer {
    client: Client,
    queue: Arc<Queue>,
    deliveries: Arc<Deliveries>,
    metrics: WebhookMetrics,
    settings: WriterSettings,
}

/// What one attempt at a job came to.
enum Done {
    /// Finished; the outcome's name.
    Finished(&'static str),
    /// Try again: after the given delay, or after the job's backoff when `None`.
    Later(&'static str, Option<Duration>),
    /// Dropped: retrying cannot help.
    Failed,
}

/// Why an apiserver call failed.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    /// The object changed between the read and the write (or appeared, for a create).
    #[error("the object changed meanwhile")]
    Conflict,
    /// The object is gone.
    #[error("the object is gone")]
    Gone,
    /// The apiserver refused the object: retrying cannot help.
    #[error("the apiserver refused to {what}: {message}")]
    Invalid { what: &'static str, message: String },
    /// Anything else: the apiserver is away, slow or overloaded.
    #[error("failed to {what}: {source}")]
    Transient { what: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
}

impl Writer {
    /// Workers for `queue`.
    pub fn new(
        client: Client,
        queue: Arc<Queue>,
        deliveries: Arc<Deliveries>,
        metrics: WebhookMetrics,
        settings: WriterSettings,
    ) -> Arc<Self> {
        Arc::new(Self { client, queue, deliveries, metrics, settings })
    }

    /// Runs the workers until dropped.
    pub async fn run(self: Arc<Self>) {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..self.settings.workers.max(1) {
            workers.spawn(self.clone().work());
        }
        while workers.join_next().await.is_some() {}
    }

    async fn work(self: Arc<Self>) {
        loop {
            let (key, mut job) = self.queue.take().await;
            let started = Instant::now();
            let span = tracing::info_span!(
                "job",
                namespace = %key.namespace,
                project = %key.project,
                pr = key.number,
                delivery = %job.delivery,
                action = job.action.as_str(),
            );
            let done = self.attempt(&key, &job).instrument(span.clone()).await;
            let _entered = span.enter();
            let mut hold = Duration::ZERO;
            match done {
                Done::Finished(outcome) => {
                    self.metrics.wrote(outcome, started.elapsed());
                    if WRITES.contains(&outcome) {
                        hold = spread(self.settings.min_interval).saturating_sub(started.elapsed());
                    }
                }
                Done::Failed => self.give_up(&job, started),
                Done::Later(outcome, delay) => {
                    let retry = job.retry.get_or_insert_with(|| Retry {
                        since: started,
                        backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
                    });
                    if retry.since.elapsed() >= self.settings.give_up_after {
                        tracing::error!("gave up after {:?} of failures", self.settings.give_up_after);
                        self.give_up(&job, started);
                    } else {
                        let delay = delay.unwrap_or_else(|| retry.backoff.next_delay());
                        self.metrics.wrote(outcome, started.elapsed());
                        let (queue, deliveries, key) = (self.queue.clone(), self.deliveries.clone(), key.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let delivery = job.delivery.clone();
                            if queue.push(key, job).is_err() {
                                tracing::error!(%delivery, "the queue is full: dropped a job waiting to be retried");
                                deliveries.forget(&delivery);
                            }
                        });
                    }
                }
            }
            if hold.is_zero() {
                self.queue.done(&key);
            } else {
                // The pull request stays taken (its next job waits, replaced by newer ones) while
                // this worker moves on.
                let queue = self.queue.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    queue.done(&key);
                });
            }
            self.metrics.queue_depth.set(self.queue.len() as i64);
        }
    }

    /// Drops `job` for good; a redelivery of its delivery is done again.
    fn give_up(&self, job: &Job, started: Instant) {
        self.deliveries.forget(&job.delivery);
        self.metrics.wrote("failed", started.elapsed());
    }

    /// Decides `job` and carries the decision out, deciding again when the Environment changed
    /// under it.
    async fn attempt(&self, key: &Key, job: &Job) -> Done {
        let mut conflicts = 0;
        loop {
            match self.decide_and_write(key, job).await {
                Ok(done) => return done,
                Err(WriteError::Conflict | WriteError::Gone) if conflicts < CONFLICT_ATTEMPTS => conflicts += 1,
                Err(err @ WriteError::Invalid { .. }) => {
                    tracing::error!(%err, "dropped the job: the apiserver refused it");
                    return Done::Failed;
                }
                Err(err) => {
                    tracing::warn!(%err, "the job failed; retrying");
                    return Done::Later("retrying", None);
                }
            }
        }
    }

    async fn decide_and_write(&self, key: &Key, job: &Job) -> Result<Done, WriteError> {
        let name = names::environment_name(&key.project, key.number);
        let environments: Api<Environment> = Api::namespaced(self.client.clone(), &key.namespace);
        let projects: Api<Project> = Api::namespaced(self.client.clone(), &key.namespace);
        let existing = self.call("read the Environment", environments.get_opt(&name)).await?;
        // The Project's removal records matter only when there is no Environment; it is read
        // then (not from the cache), so that what another receiver recorded is seen.
        let mut project = None;
        if existing.is_none() {
            project = self.call("read the Project", projects.get_opt(&key.project)).await?;
            if project.is_none() {
                tracing::info!("the Project is gone: nothing to do");
                return Ok(Done::Finished("project_gone"));
            }
        }
        let observed = existing.as_ref().map(observe);
        let removed_at = project.as_ref().and_then(|project| pull_request::removed_at(project, key.number));
        let decision = plan::decide(job, observed.as_ref(), removed_at);
        let version = existing.as_ref().and_then(|env| env.resource_version());
        match (decision, &job.intent) {
            (Decision::Create, Intent::Preview(pr)) => {
                let env = environment(key, pr, job);
                self.call("create the Environment", environments.create(&PostParams::default(), &env)).await?;
                tracing::info!(environment = %name, sha = %pr.head_sha, "created the Environment");
                Ok(Done::Finished("created"))
            }
            (Decision::Apply, Intent::Preview(pr)) => {
                let mut env = environment(key, pr, job);
                // A precondition: the apply fails if the Environment changed since it was read.
                env.metadata.resource_version = version;
                let params = PatchParams::apply(keys::MANAGER_WEBHOOK).force();
                self.call("apply the Environment", environments.patch(&name, &params, &Patch::Apply(&env))).await?;
                tracing::info!(environment = %name, sha = %pr.head_sha, "applied the Environment");
                Ok(Done::Finished("applied"))
            }
            (Decision::Delete, Intent::Remove { reason, .. }) => {
                let Some(project) = self.project(&projects, project, key).await? else {
                    return Ok(Done::Finished("project_gone"));
                };
                // Recorded first: a late delivery must find the record once the Environment is gone.
                self.record_removal(&projects, &project, key.number, job.updated_at).await?;
                let params = DeleteParams {
                    preconditions: Some(Preconditions { resource_version: version, uid: None }),
                    ..DeleteParams::default()
                };
                match self.call("delete the Environment", environments.delete(&name, &params)).await {
                    Ok(_) | Err(WriteError::Gone) => {}
                    Err(err) => return Err(err),
                }
                tracing::info!(environment = %name, reason = reason.message(), "deleted the Environment");
                Ok(Done::Finished("deleted"))
            }
            (Decision::RecordRemoval, Intent::Remove { reason, .. }) => {
                let Some(project) = self.project(&projects, project, key).await? else {
                    return Ok(Done::Finished("project_gone"));
                };
                self.record_removal(&projects, &project, key.number, job.updated_at).await?;
                tracing::info!(environment = %name, reason = reason.message(), "recorded the removal; there is no Environment to delete");
                Ok(Done::Finished("removal_recorded"))
            }
            (Decision::Wait, _) => {
                tracing::info!(environment = %name, "the Environment is being deleted; waiting for it to go before creating it again");
                Ok(Done::Later("waiting", Some(TERMINATING_POLL)))
            }
            (Decision::Skip(skip), _) => {
                tracing::info!(environment = %name, "nothing to do: {}", skip_message(skip));
                Ok(Done::Finished(skip.as_str()))
            }
            (decision, intent) => unreachable!("plan::decide returned {decision:?} for {intent:?}"),
        }
    }

    /// `project` if it was read already, else the Project read now.
    async fn project(
        &self,
        projects: &Api<Project>,
        project: Option<Project>,
        key: &Key,
    ) -> Result<Option<Project>, WriteError> {
        match project {
            Some(project) => Ok(Some(project)),
            None => self.call("read the Project", projects.get_opt(&key.project)).await,
        }
    }

    /// Records on the Project that pull request `number` has no preview as of `updated_at`, and
    /// forgets removals older than [`pull_request::REMOVAL_MEMORY`].
    async fn record_removal(
        &self,
        projects: &Api<Project>,
        project: &Project,
        number: i64,
        updated_at: Timestamp,
    ) -> Result<(), WriteError> {
        let patch = pull_request::removal_patch(project, number, updated_at, Timestamp::now());
        let params = PatchParams { field_manager: Some(keys::MANAGER_WEBHOOK.into()), ..PatchParams::default() };
        let name = project.name_any();
        self.call("record the removal on the Project", projects.patch(&name, &params, &Patch::Merge(&patch))).await?;
        Ok(())
    }

    /// Runs one apiserver call under the call deadline, sorting its failure.
    async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, WriteError> {
        match tokio::time::timeout(self.settings.call_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(kube::Error::Api(status))) if status.code == 409 => Err(WriteError::Conflict),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => Err(WriteError::Gone),
            Ok(Err(kube::Error::Api(status))) if matches!(status.code, 400 | 422) => {
                Err(WriteError::Invalid { what, message: status.message.clone() })
            }
            Ok(Err(err)) => Err(WriteError::Transient { what, source: Box::new(err) }),
            Err(elapsed) => Err(WriteError::Transient { what, source: Box::new(elapsed) }),
        }
    }
}

/// The Environment `job` asks for pull request `pr`, stamped with when its delivery was received.
fn environment(key: &Key, pr: &stagely_api::v1alpha1::PullRequest, job: &Job) -> Environment {
    let mut env = pull_request::environment(&key.namespace, &key.project, pr, &job.delivery, job.updated_at);
    env.annotations_mut().insert(keys::GITHUB_RECEIVED_AT.to_owned(), job.received_at.to_string());
    env
}

fn skip_message(skip: plan::Skip) -> &'static str {
    match skip {
        plan::Skip::Duplicate => "this delivery applied the Environment already",
        plan::Skip::Stale => "the Environment reflects a newer state of the pull request",
        plan::Skip::RemovedLater => "the preview was removed at a newer state of the pull request",
        plan::Skip::NothingToRemove => "the pull request has no preview",
    }
}

/// What the decision needs of an existing Environment.
fn observe(env: &Environment) -> Observed {
    let annotations = env.annotations();
    Observed {
        delivery: annotations.get(keys::GITHUB_DELIVERY).cloned(),
        updated_at: pull_request::applied_at(env),
        terminating: env.metadata.deletion_timestamp.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_says_when_its_delivery_was_received() {
        let key = Key { namespace: "team".into(), project: "shop".into(), number: 7 };
        let received_at: Timestamp = "2026-03-01T10:00:00.123Z".parse().unwrap();
        let job = Job {
            delivery: "d-1".into(),
            action: plan::Action::Opened,
            updated_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            received_at,
            intent: Intent::Preview(Default::default()),
            retry: None,
        };
        let pr = stagely_api::v1alpha1::PullRequest::default();
        let env = environment(&key, &pr, &job);
        assert_eq!(env.annotations()[keys::GITHUB_RECEIVED_AT], "2026-03-01T10:00:00.123Z");
        assert_eq!(pull_request::received_at(&env), Some(received_at));
        assert_eq!(env.annotations()[keys::GITHUB_DELIVERY], "d-1");
    }

    #[test]
    fn holds_are_spread_over_a_quarter_of_the_interval_past_it() {
        let interval = Duration::from_millis(1000);
        let holds: Vec<Duration> = (0..1000).map(|_| spread(interval)).collect();
        assert!(holds.iter().all(|hold| (interval..=interval * 5 / 4).contains(hold)), "{holds:?}");
        let (shortest, longest) = (holds.iter().min().unwrap(), holds.iter().max().unwrap());
        assert!(*longest - *shortest > Duration::from_millis(200), "not spread: {shortest:?}..{longest:?}");
    }
}
