//! The Projects and their webhook secrets, kept in process: a delivery is verified without an
//! apiserver call.
//!
//! Projects are watched whole. The webhook secrets come from one of two places:
//!
//! - [`SecretSource::Mirror`] (the Helm chart's way): the one Secret the operator keeps every
//!   referenced credentials Secret's `webhookSecret` in ([`stagely_api::webhook_secrets`]), watched
//!   by name. The receiver then needs a grant on that Secret alone, none on the teams' Secrets.
//! - [`SecretSource::Direct`]: Secrets are watched by their metadata only, so no Secret's data
//!   reaches the receiver by the watch; the Secrets that Projects reference
//!   (`spec.github.credentialsSecretRef`) are read by name in the background, when a Project
//!   starts referencing one and whenever the watch shows it at another `resourceVersion`. This
//!   needs a grant to read every Secret of the teams' namespaces.
//!
//! Of a Secret read only its `webhookSecret` is kept, and only while a Project references the
//! Secret and the Secret exists.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use stagely_api::backoff::Backoff;
use stagely_api::v1alpha1::Project;
use stagely_api::webhook_secrets::{self, SecretLocation};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The key of a credentials Secret holding the webhook secret.
pub const WEBHOOK_SECRET_KEY: &str = "webhookSecret";

/// How long one read of a Secret may take before it counts as failed.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Secrets read at once (when the receiver starts, every referenced one is read).
const READS_AT_ONCE: usize = 8;
/// The first and the longest wait before a failed read is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A Project a delivery may be for, with its webhook secret if the cache has one.
pub struct Candidate {
    /// The Project.
    pub project: Arc<Project>,
    /// Its credentials Secret's `webhookSecret`, if the Secret was read and holds a non-empty one.
    pub secret: Option<Arc<[u8]>>,
}

impl Candidate {
    /// The webhook secret's bytes.
    pub fn webhook_secret(&self) -> Option<&[u8]> {
        self.secret.as_deref()
    }
}

/// Why a referenced Secret could not be read. No variant carries any of the Secret's data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver did not answer in time.
    #[error("failed to read the Secret {namespace}/{name}: no answer within {READ_TIMEOUT:?}")]
    Timeout {
        /// The Secret's namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The answer could not be decoded. The decoder's message is left out: it may quote the
    /// Secret's data.
    #[error("failed to read the Secret {namespace}/{name}: its answer could not be decoded")]
    Undecodable {
        /// The Secret's namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The apiserver refused, or could not be reached.
    #[error("failed to read the Secret {namespace}/{name}: {source}")]
    Kube {
        /// The Secret's namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The cause.
        source: kube::Error,
    },
}

/// Where the webhook secrets are read; see the module documentation.
#[derive(Clone, Debug)]
pub enum SecretSource {
    /// The credentials Secrets themselves.
    Direct,
    /// The operator's webhook secrets Secret at this place.
    Mirror(SecretLocation),
}

/// The cache; see the module documentation.
pub struct Cache {
    projects: Store<Project>,
    /// Every Secret's name and `resourceVersion`: which exist, and which changed.
    secrets: Store<PartialObjectMeta<Secret>>,
    /// The referenced Secrets as read.
    read: RwLock<HashMap<ObjectRef<Secret>, Read>>,
    ready: AtomicBool,
}

/// A referenced Secret as read (no `Debug`: it holds the webhook secret).
struct Read {
    /// The `resourceVersion` the watch showed when it was read (the read may have found a newer
    /// one): it is read again when the watch shows another.
    version: String,
    /// Its `webhookSecret`, if non-empty.
    webhook_secret: Option<Arc<[u8]>>,
}

impl Cache {
    /// Starts watching Projects in every namespace, and the webhook secrets from `source`; all
    /// of it runs as long as the returned future is polled.
    pub fn start(
        client: Client,
        source: SecretSource,
    ) -> (Arc<Self>, std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>) {
        match source {
            SecretSource::Direct => {
                let (cache, run) = Self::start_direct(client);
                (cache, Box::pin(run))
            }
            SecretSource::Mirror(location) => {
                let (cache, run) = Self::start_mirror(client, location);
                (cache, Box::pin(run))
            }
        }
    }

    /// Watches Projects, and the webhook secrets Secret at `location`: what it holds is what is
    /// known, keyed by the credentials Secret each value comes from.
    fn start_mirror(
        client: Client,
        location: SecretLocation,
    ) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static) {
        let (projects, project_writer) = reflector::store();
        // The Secrets' metadata store stays empty: the mirror alone is read.
        let (secrets, _) = reflector::store();
        let cache = Arc::new(Self { projects, secrets, read: RwLock::default(), ready: AtomicBool::new(false) });
        let project_watch = watcher(Api::<Project>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(strip_project)
            .reflect(project_writer)
            .for_each(|event| {
                if let Err(err) = event {
                    tracing::warn!(%err, "the Project watch failed; retrying");
                }
                async {}
            });
        let (mirror, mirror_writer) = reflector::store::<Secret>();
        let by_name = watcher::Config::default().fields(&format!("metadata.name={}", location.name));
        let mirror_watch = watcher(Api::<Secret>::namespaced(client, &location.namespace), by_name)
            .default_backoff()
            .modify(|secret: &mut Secret| {
                secret.metadata.managed_fields = None;
                secret.metadata.annotations = None;
            })
            .reflect(mirror_writer)
            .for_each({
                let (cache, mirror, location) = (cache.clone(), mirror.clone(), location.clone());
                move |event| {
                    match event {
                        Ok(_) => cache.take_mirror(&mirror, &location),
                        Err(err) => {
                            tracing::warn!(%err, secret = %location, "the webhook secrets watch failed; retrying")
                        }
                    }
                    async {}
                }
            });
        let ready = {
            let cache = cache.clone();
            async move {
                if cache.projects.wait_until_ready().await.is_err() || mirror.wait_until_ready().await.is_err() {
                    return;
                }
                cache.take_mirror(&mirror, &location);
                cache.ready.store(true, Ordering::Release);
                let read = cache.read.read().unwrap_or_else(|e| e.into_inner()).len();
                if mirror.is_empty() {
                    tracing::warn!(secret = %location, "no webhook secrets Secret yet (the operator writes it): deliveries get 401 until it does");
                }
                tracing::info!(projects = cache.projects.len(), secrets_read = read, secret = %location,
                    "the Project and webhook secrets caches are ready");
            }
        };
        let run = async move {
            tokio::join!(project_watch, mirror_watch, ready);
        };
        (cache, run)
    }

    /// Takes the webhook secrets the mirror holds as those known.
    fn take_mirror(&self, mirror: &Store<Secret>, location: &SecretLocation) {
        let secret = mirror.get(&ObjectRef::new(&location.name).within(&location.namespace));
        let version = secret.as_ref().and_then(|s| s.metadata.resource_version.clone()).unwrap_or_default();
        let known: HashMap<ObjectRef<Secret>, Read> = secret
            .and_then(|secret| secret.data.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, value)| {
                let (namespace, name) = webhook_secrets::parse_key(&key)?;
                let webhook_secret = webhook_secrets::webhook_secret(&value.0).map(Arc::from);
                Some((ObjectRef::new(name).within(namespace), Read { version: version.clone(), webhook_secret }))
            })
            .collect();
        *self.read.write().unwrap_or_else(|e| e.into_inner()) = known;
    }

    /// Starts watching Projects and Secrets' metadata in every namespace, and reading the
    /// referenced Secrets.
    fn start_direct(client: Client) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static) {
        let (projects, project_writer) = reflector::store();
        let (secrets, secret_writer) = reflector::store();
        let cache = Arc::new(Self { projects, secrets, read: RwLock::default(), ready: AtomicBool::new(false) });
        // Any change of either store may change what is to be read; a burst of them is one pass.
        let changed = Arc::new(Notify::new());
        let project_watch = watcher(Api::<Project>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(strip_project)
            .reflect(project_writer)
            .for_each({
                let changed = changed.clone();
                move |event| {
                    match event {
                        Ok(_) => changed.notify_one(),
                        Err(err) => tracing::warn!(%err, "the Project watch failed; retrying"),
                    }
                    async {}
                }
            });
        let secret_watch = watcher(Api::<PartialObjectMeta<Secret>>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|secret: &mut PartialObjectMeta<Secret>| {
                secret.metadata.managed_fields = None;
                secret.metadata.annotations = None;
                secret.metadata.labels = None;
            })
            .reflect(secret_writer)
            .for_each({
                let changed = changed.clone();
                move |event| {
                    match event {
                        Ok(_) => changed.notify_one(),
                        Err(err) => tracing::warn!(%err, "the Secret metadata watch failed; retrying"),
                    }
                    async {}
                }
            });
        let reads = cache.clone().keep_read(client, changed);
        let run = async move {
            tokio::join!(project_watch, secret_watch, reads);
        };
        (cache, run)
    }

    /// Whether both watches have listed once and every referenced Secret has been read since.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The Projects bound to `repository` (compared as GitHub does, ignoring case); for an
    /// organization's webhook without a repository (its `ping`), those of `organization`'s
    /// repositories.
    pub fn candidates(&self, repository: Option<&str>, organization: Option<&str>) -> Vec<Candidate> {
        let projects = match (repository, organization) {
            (Some(repository), _) => self.projects.state_filter(|p| p.spec.repository.eq_ignore_ascii_case(repository)),
            (None, Some(organization)) => self.projects.state_filter(|p| {
                p.spec.repository.split_once('/').is_some_and(|(owner, _)| owner.eq_ignore_ascii_case(organization))
            }),
            (None, None) => Vec::new(),
        };
        let read = self.read.read().unwrap_or_else(|e| e.into_inner());
        projects
            .into_iter()
            .map(|project| {
                let secret = read.get(&credentials_secret(&project)).and_then(|r| r.webhook_secret.clone());
                Candidate { project, secret }
            })
            .collect()
    }

    /// Once both watches have listed, brings the Secrets read up to date with the stores after
    /// every change of either, and retries failed reads with backoff; marks the cache ready
    /// after the first pass that leaves no referenced Secret unread.
    async fn keep_read(self: Arc<Self>, client: Client, changed: Arc<Notify>) {
        if self.projects.wait_until_ready().await.is_err() || self.secrets.wait_until_ready().await.is_err() {
            return;
        }
        let mut retries = HashMap::new();
        loop {
            self.pass(&client, &mut retries).await;
            if retries.is_empty() && !self.ready.swap(true, Ordering::AcqRel) {
                let read = self.read.read().unwrap_or_else(|e| e.into_inner()).len();
                tracing::info!(
                    projects = self.projects.len(),
                    secrets_read = read,
                    "the Project and Secret caches are ready"
                );
            }
            let next_retry = retries.values().map(|retry: &Retry| retry.at).min();
            tokio::select! {
                () = changed.notified() => {}
                () = sleep_until(next_retry) => {}
            }
        }
    }

    /// One pass: drops what is no longer wanted, and reads the Secrets due (those `plan` picks
    /// whose retry, if any, is due). `retries` keeps the Secrets whose read failed.
    async fn pass(&self, client: &Client, retries: &mut HashMap<ObjectRef<Secret>, Retry>) {
        let watched: HashMap<ObjectRef<Secret>, Option<String>> = self
            .projects
            .state()
            .iter()
            .map(|project| credentials_secret(project))
            .map(|key| {
                let meta = self.secrets.get(&key.clone().into_kind_unchecked(()));
                (key, meta.map(|meta| meta.metadata.resource_version.clone().unwrap_or_default()))
            })
            .collect();
        let versions: HashMap<ObjectRef<Secret>, String> = {
            let read = self.read.read().unwrap_or_else(|e| e.into_inner());
            read.iter().map(|(key, read)| (key.clone(), read.version.clone())).collect()
        };
        let plan = plan(&watched, &versions);
        // A Secret no longer referenced, or gone, needs no retry.
        retries.retain(|key, _| plan.read.iter().any(|(to_read, _)| to_read == key));

        let now = Instant::now();
        let due: Vec<_> =
            plan.read.into_iter().filter(|(key, _)| retries.get(key).is_none_or(|retry| retry.at <= now)).collect();
        let results: Vec<_> = stream::iter(due)
            .map(|(key, version)| {
                let client = client.clone();
                async move {
                    let result = read_webhook_secret(&client, &key).await;
                    (key, version, result)
                }
            })
            .buffer_unordered(READS_AT_ONCE)
            .collect()
            .await;

        let mut read = self.read.write().unwrap_or_else(|e| e.into_inner());
        for key in &plan.drop {
            read.remove(key);
        }
        for (key, version, result) in results {
            match result {
                Ok(webhook_secret) => {
                    retries.remove(&key);
                    read.insert(key, Read { version, webhook_secret });
                }
                Err(err) => {
                    let retry = retries
                        .entry(key)
                        .or_insert_with(|| Retry { backoff: Backoff::new(RETRY_FIRST, RETRY_MAX), at: now });
                    let delay = retry.backoff.next_delay();
                    retry.at = Instant::now() + delay;
                    tracing::warn!(error = %err, retry_in = ?delay, "a credentials Secret could not be read; retrying");
                }
            }
        }
    }
}

/// Keeps what the cache needs of a Project: its metadata's names, and its spec.
fn strip_project(project: &mut Project) {
    project.metadata.managed_fields = None;
    project.metadata.annotations = None;
    project.status = None;
}

/// When a Secret whose read failed is read again.
struct Retry {
    backoff: Backoff,
    at: Instant,
}

/// Waits until `at`; without one, forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The credentials Secret `project` references (in its namespace).
fn credentials_secret(project: &Project) -> ObjectRef<Secret> {
    ObjectRef::new(&project.spec.github.credentials_secret_ref.name).within(&project.namespace().unwrap_or_default())
}

/// What one pass does; see [`plan`].
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// The Secrets to read, with the `resourceVersion` the watch shows.
    read: Vec<(ObjectRef<Secret>, String)>,
    /// The Secrets read to forget.
    drop: Vec<ObjectRef<Secret>>,
}

/// From `watched` (each referenced Secret with the `resourceVersion` the watch shows, `None` if
/// there is no such Secret) and `read` (each Secret read, with the version the watch showed
/// then): the referenced Secrets that exist and were not read at the version shown are to be
/// read, and those read that are no longer referenced or no longer exist are to be forgotten.
fn plan(watched: &HashMap<ObjectRef<Secret>, Option<String>>, read: &HashMap<ObjectRef<Secret>, String>) -> Plan {
    let to_read = watched
        .iter()
        .filter_map(|(key, shown)| Some((key, shown.as_ref()?)))
        .filter(|(key, shown)| read.get(*key) != Some(*shown))
        .map(|(key, shown)| (key.clone(), shown.clone()))
        .collect();
    let to_drop = read.keys().filter(|key| !matches!(watched.get(*key), Some(Some(_)))).cloned().collect();
    Plan { read: to_read, drop: to_drop }
}

/// Reads the Secret `key` and keeps its `webhookSecret` (trimmed) if non-empty (`None` too if the
/// Secret is gone since the watch showed it: the watch will say so).
async fn read_webhook_secret(client: &Client, key: &ObjectRef<Secret>) -> Result<Option<Arc<[u8]>>, Error> {
    let (namespace, name) = (key.namespace.clone().unwrap_or_default(), key.name.clone());
    let api = Api::<Secret>::namespaced(client.clone(), &namespace);
    let secret = match tokio::time::timeout(READ_TIMEOUT, api.get_opt(&name)).await {
        Ok(Ok(secret)) => secret,
        Err(_) => return Err(Error::Timeout { namespace, name }),
        Ok(Err(kube::Error::SerdeError(_))) => return Err(Error::Undecodable { namespace, name }),
        Ok(Err(source)) => return Err(Error::Kube { namespace, name, source }),
    };
    let webhook_secret = secret
        .and_then(|secret| secret.data)
        .and_then(|mut data| data.remove(WEBHOOK_SECRET_KEY))
        .and_then(|value| webhook_secrets::webhook_secret(&value.0).map(Arc::from));
    Ok(webhook_secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectRef<Secret> {
        ObjectRef::new(name).within("team")
    }

    fn watched(entries: &[(&str, Option<&str>)]) -> HashMap<ObjectRef<Secret>, Option<String>> {
        entries.iter().map(|(name, version)| (key(name), version.map(str::to_owned))).collect()
    }

    fn read(entries: &[(&str, &str)]) -> HashMap<ObjectRef<Secret>, String> {
        entries.iter().map(|(name, version)| (key(name), (*version).to_owned())).collect()
    }

    fn sorted(mut plan: Plan) -> Plan {
        plan.read.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        plan.drop.sort_by(|a, b| a.name.cmp(&b.name));
        plan
    }

    #[test]
    fn a_newly_referenced_secret_is_read_at_the_version_shown() {
        let plan = plan(&watched(&[("github", Some("7"))]), &read(&[]));
        assert_eq!(plan, Plan { read: vec![(key("github"), "7".into())], drop: vec![] });
    }

    #[test]
    fn a_secret_read_at_the_version_shown_is_not_read_again() {
        let plan = plan(&watched(&[("github", Some("7"))]), &read(&[("github", "7")]));
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn a_secret_shown_at_another_version_is_read_again() {
        let plan = plan(&watched(&[("github", Some("9"))]), &read(&[("github", "7")]));
        assert_eq!(plan, Plan { read: vec![(key("github"), "9".into())], drop: vec![] });
    }

    #[test]
    fn a_referenced_secret_that_does_not_exist_is_not_read_and_forgotten_once_deleted() {
        assert_eq!(plan(&watched(&[("github", None)]), &read(&[])), Plan::default());
        let plan = plan(&watched(&[("github", None)]), &read(&[("github", "7")]));
        assert_eq!(plan, Plan { read: vec![], drop: vec![key("github")] });
    }

    #[test]
    fn a_secret_no_project_references_is_forgotten_and_the_new_reference_read() {
        let plan = sorted(plan(&watched(&[("second", Some("3"))]), &read(&[("first", "7")])));
        assert_eq!(plan, Plan { read: vec![(key("second"), "3".into())], drop: vec![key("first")] });
    }
}
