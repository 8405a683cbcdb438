//! The kube-rs controllers.

pub mod buildjob;
pub mod capacity;
pub mod cleanup;
pub mod cloudprovider;
pub mod conditions;
pub mod environment;
pub mod events;
pub mod feedback;
pub mod follow;
pub mod project;
pub mod resync;
pub mod vm;
pub mod webhook_secrets;

use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource};

/// Deletes the Environment `env` if it is still the one read (by UID), first recording on its
/// Project that its pull request's preview was removed as of `record`'s `updated_at` (first: a
/// late webhook, or the resync, must find the record once the Environment is gone, and create
/// nothing for that state of the pull request). `Ok(false)` when there was nothing to delete.
pub async fn remove_environment(
    client: &Client,
    record: Option<(&stagely_api::v1alpha1::Project, k8s_openapi::jiff::Timestamp)>,
    env: &stagely_api::v1alpha1::Environment,
) -> Result<bool, kube::Error> {
    use kube::ResourceExt;
    use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
    let namespace = env.namespace().unwrap_or_default();
    if let Some((project, updated_at)) = record {
        let now = k8s_openapi::jiff::Timestamp::now();
        let patch = stagely_api::pull_request::removal_patch(project, env.spec.pull_request.number, updated_at, now);
        let params =
            PatchParams { field_manager: Some(stagely_api::keys::MANAGER_WEBHOOK.into()), ..PatchParams::default() };
        Api::<stagely_api::v1alpha1::Project>::namespaced(client.clone(), &namespace)
            .patch(&project.name_any(), &params, &Patch::Merge(&patch))
            .await?;
    }
    // By UID, not resourceVersion: controllers write to a live Environment all the time, and a
    // webhook that reopens the pull request later finds the removal older than its news.
    let params = DeleteParams {
        preconditions: Some(Preconditions { resource_version: None, uid: env.uid() }),
        ..DeleteParams::default()
    };
    let api = Api::<stagely_api::v1alpha1::Environment>::namespaced(client.clone(), &namespace);
    match api.delete(&env.name_any(), &params).await {
        Ok(_) => Ok(true),
        // Gone already, or replaced by another Environment of the same name.
        Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Where a Project's code is on GitHub, when the operator talks to GitHub and the Project uses
/// GitHub's own clone URL (no `spec.cloneUrl`): stagely.yaml is then read through the contents
/// API and builders clone with a short-lived token.
pub fn github_repo(
    project: &stagely_api::v1alpha1::Project,
    github: Option<&crate::github::GitHub>,
) -> Option<crate::source::GitHubRepo> {
    use kube::ResourceExt;
    if github.is_none() || project.spec.clone_url.is_some() {
        return None;
    }
    Some(crate::source::GitHubRepo {
        repository: project.spec.repository.clone(),
        namespace: project.namespace().unwrap_or_default(),
        secret: project.spec.github.credentials_secret_ref.name.clone(),
    })
}

/// The token an agent clones `project`'s repository with: for a GitHub App, an installation
/// token limited to the repository and `contents: read`; for a token, the token; none when the
/// repository is not read from GitHub or the Project has no GitHub credentials.
pub async fn clone_token(
    client: &Client,
    project: &stagely_api::v1alpha1::Project,
    github: Option<&crate::github::GitHub>,
) -> Result<Option<stagely_api::protocol::Sensitive>, crate::github::GitHubError> {
    let (Some(github), Some(repo)) = (github, github_repo(project, github)) else { return Ok(None) };
    let Some(credentials) = crate::github::auth::read_credentials(client, &repo.namespace, &repo.secret).await? else {
        return Ok(None);
    };
    let (token, _) = github.clone_token(&credentials, crate::github::Repository(&repo.repository)).await?;
    Ok(Some(token))
}

/// Reconciles one controller runs at once. Unbounded, a burst of new objects becomes as many
/// reconciles, each with its apiserver calls in flight at once: the apiserver queues and then
/// refuses them (429), and each call holds a connection of its own. A few dozen keep the
/// apiserver busy without queueing.
pub const MAX_CONCURRENT_RECONCILES: u16 = 32;

/// Logs what a controller's run yields besides its reconciles' outcomes. A watch that failed (an
/// initial list refused, a watch cut, an object the operator cannot decode) leaves the controller
/// blind until it recovers, which a platform team must see: a warning, naming `controller`. A
/// reconcile's own failure was logged by its error policy, and an object gone before its
/// reconcile ran is ordinary: both at debug.
pub fn log_run<T, E: std::fmt::Display>(
    controller: &'static str,
    result: Result<T, kube::runtime::controller::Error<E, kube::runtime::watcher::Error>>,
) {
    use kube::runtime::controller::Error;
    match result {
        Ok(_) => {}
        Err(err @ (Error::ReconcilerFailed(..) | Error::ObjectNotFound(_))) => {
            tracing::debug!(controller, error = %err, "reconcile");
        }
        Err(err) => tracing::warn!(controller, error = %err, "a watch of the controller failed; retrying"),
    }
}

/// Whether a watch cache has listed its objects, awaited by any number of tasks at once.
///
/// kube's `Store::wait_until_ready` keeps the waker of only the last task that polled it (a
/// oneshot receiver behind it): of several reconciles waiting on it together, one wakes when the
/// cache is ready and the others never do, and their objects are never reconciled again (kube
/// holds every later trigger of an object whose reconcile is still running). One task here waits
/// on the store alone and tells every waiter through a `watch` channel.
#[derive(Clone, Debug)]
pub struct Listed(tokio::sync::watch::Receiver<bool>);

impl Listed {
    /// Starts watching `store` for readiness (on the current Tokio runtime).
    pub fn of<K>(store: &Store<K>) -> Self
    where
        K: kube::runtime::reflector::Lookup + Clone + Send + Sync + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let (ready, listed) = tokio::sync::watch::channel(false);
        let store = store.clone();
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                ready.send_replace(true);
            }
            // Dropped without `true`: the watch stopped before it listed; waiters are told so.
        });
        Self(listed)
    }

    /// Waits until the cache has listed its objects; `false` if its watch stopped first.
    pub async fn wait(&self) -> bool {
        self.0.clone().wait_for(|ready| *ready).await.is_ok()
    }
}

/// Drops what no controller reads and every object carries: `managedFields`, often the larger
/// half of a small object, kept once per object in every watch cache.
pub fn strip<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// The object `namespace/name` from `store` when it holds it, else read from the apiserver: the
/// store is a cache fed by a watch, and an object it does not show may only be too new for it.
pub async fn cached<K>(
    store: Option<&Store<K>>,
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Arc<K>>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    if let Some(found) = store.and_then(|store| store.get(&ObjectRef::new(name).within(namespace))) {
        return Ok(Some(found));
    }
    Ok(Api::<K>::namespaced(client.clone(), namespace).get_opt(name).await?.map(Arc::new))
}

/// The statuses a controller wrote, by object UID, until its watch cache shows them.
///
/// A reconcile reads its object from the watch cache, which lags behind the apiserver: under
/// load by seconds. A reconcile woken then (by an agent's STATUS, a child's change) would plan
/// from a status older than the one the controller itself last wrote, undo it (a finished build
/// read as still running, a subdomain hash chosen a second time) and write that back. The
/// controller is the only writer of the fields it plans, so what it last wrote is their current
/// value until the cache catches up.
pub struct Written<S>(std::sync::Mutex<std::collections::HashMap<String, S>>);

impl<S> Default for Written<S> {
    fn default() -> Self {
        Self(std::sync::Mutex::default())
    }
}

impl<S: Clone + PartialEq + serde::Serialize + serde::de::DeserializeOwned> Written<S> {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, S>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The status `uid` was last written with, if the cache shows another (`cached`); forgotten
    /// once the cache shows it.
    pub fn newer(&self, uid: &str, cached: &S) -> Option<S> {
        let mut map = self.map();
        match map.get(uid) {
            Some(written) if written == cached => {
                map.remove(uid);
                None
            }
            Some(written) => Some(written.clone()),
            None => None,
        }
    }

    /// Records that `uid`'s status was written as `status`, as the apiserver keeps it (times to
    /// the second), so that the cache's copy compares equal once it arrives.
    pub fn wrote(&self, uid: &str, status: &S) {
        let stored = serde_json::to_value(status).ok().and_then(|value| serde_json::from_value(value).ok());
        self.map().insert(uid.to_owned(), stored.unwrap_or_else(|| status.clone()));
    }

    /// Forgets `uid` (its object is going).
    pub fn forget(&self, uid: &str) {
        self.map().remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{reflector, watcher};

    use super::{Listed, Written};

    /// Sixteen reconciles waiting at once for a cache that lists later.
    async fn waiters(listed: &Listed) -> Vec<tokio::task::JoinHandle<bool>> {
        let waiters: Vec<_> = (0..16)
            .map(|_| {
                let listed = listed.clone();
                tokio::spawn(async move { listed.wait().await })
            })
            .collect();
        // Every waiter is parked before the cache is listed.
        tokio::task::yield_now().await;
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        waiters
    }

    #[tokio::test]
    async fn every_waiter_wakes_when_the_cache_is_listed() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let listed = Listed::of(&store);
        let waiters = waiters(&listed).await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "nothing is listed yet");
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let woken = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(waiters))
            .await
            .expect("every waiter wakes once the cache is listed");
        assert!(woken.into_iter().all(|w| w.unwrap()));
        assert!(listed.wait().await, "a later waiter does not wait");
    }

    #[tokio::test]
    async fn waiters_learn_that_the_watch_stopped_before_it_listed() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let listed = Listed::of(&store);
        let waiters = waiters(&listed).await;
        drop(writer);
        let woken = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(waiters))
            .await
            .expect("every waiter hears that the watch stopped");
        assert!(woken.into_iter().all(|w| !w.unwrap()));
    }

    #[test]
    fn the_last_write_wins_until_the_cache_shows_it() {
        let written = Written::default();
        assert_eq!(written.newer("a", &1), None, "nothing written: the cache is right");
        written.wrote("a", &2);
        assert_eq!(written.newer("a", &1), Some(2), "the cache lags");
        assert_eq!(written.newer("a", &2), None, "caught up");
        assert_eq!(written.newer("a", &1), None, "forgotten once caught up");
        written.wrote("b", &3);
        written.forget("b");
        assert_eq!(written.newer("b", &1), None);
    }
}
