//! The Projects and their webhook secrets, kept in process by watches (reflectors): a delivery
//! is verified without an apiserver call.
//!
//! The Secret watch covers every Secret the receiver may read, but the cache keeps only each
//! Secret's `webhookSecret` (no other key, no annotation: `kubectl apply` copies a Secret's data
//! into one), so its memory grows with the Secrets, not with their contents.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use stagely_api::v1alpha1::Project;

/// The key of a credentials Secret holding the webhook secret.
pub const WEBHOOK_SECRET_KEY: &str = "webhookSecret";

/// A Project a delivery may be for, with its webhook secret if the cache has one.
pub struct Candidate {
    /// The Project.
    pub project: Arc<Project>,
    /// Its credentials Secret's `webhookSecret`, if the Secret exists and holds one.
    pub secret: Option<Arc<Secret>>,
}

impl Candidate {
    /// The webhook secret's bytes.
    pub fn webhook_secret(&self) -> Option<&[u8]> {
        let data = self.secret.as_ref()?.data.as_ref()?;
        data.get(WEBHOOK_SECRET_KEY).map(|value| value.0.as_slice()).filter(|value| !value.is_empty())
    }
}

/// The cache; see the module documentation.
pub struct Cache {
    projects: Store<Project>,
    secrets: Store<Secret>,
    ready: AtomicBool,
}

impl Cache {
    /// Starts watching Projects and Secrets in every namespace; the watches run as long as the
    /// returned future is polled.
    pub fn start(client: Client) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static) {
        let (projects, project_writer) = reflector::store();
        let (secrets, secret_writer) = reflector::store();
        let cache = Arc::new(Self { projects, secrets, ready: AtomicBool::new(false) });
        let project_watch = watcher(Api::<Project>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|project: &mut Project| {
                project.metadata.managed_fields = None;
                project.metadata.annotations = None;
                project.status = None;
            })
            .reflect(project_writer)
            .for_each(|event| async move {
                if let Err(err) = event {
                    tracing::warn!(%err, "the Project watch failed; retrying");
                }
            });
        let secret_watch = watcher(Api::<Secret>::all(client), watcher::Config::default())
            .default_backoff()
            .modify(|secret: &mut Secret| {
                secret.metadata.managed_fields = None;
                secret.metadata.annotations = None;
                secret.metadata.labels = None;
                secret.string_data = None;
                if let Some(data) = &mut secret.data {
                    data.retain(|key, _| key == WEBHOOK_SECRET_KEY);
                }
            })
            .reflect(secret_writer)
            .for_each(|event| async move {
                if let Err(err) = event {
                    tracing::warn!(%err, "the Secret watch failed; retrying");
                }
            });
        let ready = {
            let cache = cache.clone();
            async move {
                if cache.projects.wait_until_ready().await.is_ok() && cache.secrets.wait_until_ready().await.is_ok() {
                    cache.ready.store(true, Ordering::Release);
                    tracing::info!(projects = cache.projects.len(), "the Project and Secret caches are ready");
                }
            }
        };
        let run = async move {
            tokio::join!(project_watch, secret_watch, ready);
        };
        (cache, run)
    }

    /// Whether both watches have listed once.
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
        projects
            .into_iter()
            .map(|project| {
                let name = &project.spec.github.credentials_secret_ref.name;
                let key = ObjectRef::new(name).within(&project.namespace().unwrap_or_default());
                let secret = self.secrets.get(&key);
                Candidate { project, secret }
            })
            .collect()
    }
}
