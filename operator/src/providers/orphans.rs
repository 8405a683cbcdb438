//! Orphans: VMs carrying Stagely's tags whose owner (the Environment or BuildJob whose UID they
//! carry) no longer exists. The reaper's periodic sweep and a CloudProvider's finalizer both
//! terminate them through [`sweep`].
//!
//! Owners are checked against the apiserver, never a cache: a list of the namespace's
//! Environments and BuildJobs made *after* the instances were listed. An instance is created only
//! once its owner exists, so an owner alive when the instances were listed is in that later list;
//! an instance whose owner is missing from it has outlived its owner.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use kube::api::{ListParams, PartialObjectMeta};
use kube::{Api, Client, ResourceExt};
use stagely_api::keys::cloud_tags;
use stagely_api::v1alpha1::{BuildJob, Environment};

use super::{CloudProvider, Instance, InstanceState, ProviderError};

/// Why a sweep could not judge its instances.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The provider could not list its instances.
    #[error("cannot list the VMs: {0}")]
    List(#[from] ProviderError),
    /// The owners could not be listed.
    #[error("cannot list the Environments and BuildJobs of {namespace}: {source}")]
    Owners {
        /// The namespace.
        namespace: String,
        /// The API error.
        source: kube::Error,
    },
}

/// What one sweep found and did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Orphans terminated: `(instance id, owner UID)`.
    pub terminated: Vec<(String, String)>,
    /// Orphans that could not be terminated, with why.
    pub failed: Vec<(String, String)>,
    /// Orphans younger than the grace period, left for a later sweep.
    pub young: Vec<String>,
    /// Instances whose owner exists: `(instance id, owner UID)`.
    pub owned: Vec<(String, String)>,
}

/// The instances of `instances` that belong to `namespace` and whose owner is not in `live`,
/// older than `grace` (an instance without a launch time counts as old only with no grace).
/// Instances without an owner tag are not Stagely's to judge.
pub fn orphans<'a>(
    instances: &'a [Instance],
    namespace: &str,
    live: &HashSet<String>,
    now: SystemTime,
    grace: Duration,
) -> (Vec<&'a Instance>, Vec<&'a Instance>) {
    let mut old = Vec::new();
    let mut young = Vec::new();
    for instance in instances {
        let tags = &instance.tags;
        let ours = tags.get(cloud_tags::MANAGED_BY).map(String::as_str) == Some("stagely")
            && tags.get(cloud_tags::NAMESPACE).map(String::as_str) == Some(namespace);
        let Some(owner) = tags.get(cloud_tags::OWNER_UID).filter(|_| ours) else { continue };
        if live.contains(owner) || instance.state == InstanceState::Terminated {
            continue;
        }
        let age = instance.launched_at.and_then(|at| now.duration_since(at).ok());
        if grace.is_zero() || age.is_some_and(|age| age >= grace) {
            old.push(instance);
        } else {
            young.push(instance);
        }
    }
    (old, young)
}

/// The UIDs of every Environment and BuildJob of `namespace`, read from the apiserver now
/// (metadata only).
pub async fn live_owners(client: &Client, namespace: &str) -> Result<HashSet<String>, kube::Error> {
    let mut uids = HashSet::new();
    let environments: Api<Environment> = Api::namespaced(client.clone(), namespace);
    let jobs: Api<BuildJob> = Api::namespaced(client.clone(), namespace);
    collect(&environments, &mut uids).await?;
    collect(&jobs, &mut uids).await?;
    Ok(uids)
}

async fn collect<K>(api: &Api<K>, uids: &mut HashSet<String>) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list_metadata(&params).await?;
        uids.extend(page.items.iter().filter_map(|item: &PartialObjectMeta<K>| item.uid()));
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(()),
        }
    }
}

/// Lists `provider`'s instances of `namespace`, then the namespace's owners, and terminates the
/// orphans older than `grace`.
pub async fn sweep(
    provider: &dyn CloudProvider,
    client: &Client,
    namespace: &str,
    grace: Duration,
) -> Result<Swept, SweepError> {
    // Instances first, owners second (see the module's doc).
    let instances = provider.list_namespace(namespace).await?;
    let live = live_owners(client, namespace)
        .await
        .map_err(|source| SweepError::Owners { namespace: namespace.to_owned(), source })?;
    let (old, young) = orphans(&instances, namespace, &live, SystemTime::now(), grace);
    let mut swept = Swept { young: young.iter().map(|i| i.id.clone()).collect(), ..Swept::default() };
    for instance in &instances {
        if let Some(owner) = instance.tags.get(cloud_tags::OWNER_UID).filter(|owner| live.contains(*owner))
            && instance.tags.get(cloud_tags::NAMESPACE).map(String::as_str) == Some(namespace)
        {
            swept.owned.push((instance.id.clone(), owner.clone()));
        }
    }
    for orphan in old {
        let owner = orphan.tags.get(cloud_tags::OWNER_UID).cloned().unwrap_or_default();
        match provider.terminate(&orphan.id).await {
            Ok(()) => swept.terminated.push((orphan.id.clone(), owner)),
            Err(err) => swept.failed.push((orphan.id.clone(), err.to_string())),
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::providers::{Role, stagely_tags};

    fn instance(id: &str, tags: BTreeMap<String, String>, age: Option<u64>, now: SystemTime) -> Instance {
        Instance {
            id: id.into(),
            state: InstanceState::Running,
            public_ip: None,
            private_ip: None,
            launched_at: age.map(|secs| now - Duration::from_secs(secs)),
            tags,
        }
    }

    #[test]
    fn an_orphan_is_an_old_instance_of_the_namespace_whose_owner_is_gone() {
        let now = SystemTime::now();
        let grace = Duration::from_secs(600);
        let mut foreign = stagely_tags("gone", "team-a", Role::Preview);
        foreign.remove(cloud_tags::MANAGED_BY);
        let mut terminated = instance("terminated", stagely_tags("gone", "team-a", Role::Builder), Some(3600), now);
        terminated.state = InstanceState::Terminated;
        let instances = [
            instance("owned", stagely_tags("alive", "team-a", Role::Preview), Some(3600), now),
            instance("orphan", stagely_tags("gone", "team-a", Role::Builder), Some(3600), now),
            instance("young", stagely_tags("gone", "team-a", Role::Preview), Some(60), now),
            instance("no-launch-time", stagely_tags("gone", "team-a", Role::Preview), None, now),
            instance("other-namespace", stagely_tags("gone", "team-b", Role::Preview), Some(3600), now),
            instance("not-stagely", foreign, Some(3600), now),
            instance("untagged", BTreeMap::new(), Some(3600), now),
            terminated,
        ];
        let live = HashSet::from(["alive".to_owned()]);
        let ids = |list: Vec<&Instance>| list.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        let (old, young) = orphans(&instances, "team-a", &live, now, grace);
        assert_eq!(
            (ids(old), ids(young)),
            (vec!["orphan".to_owned()], vec!["young".to_owned(), "no-launch-time".to_owned()])
        );
        // Without a grace period (a CloudProvider being deleted) age does not matter.
        let (old, young) = orphans(&instances, "team-a", &live, now, Duration::ZERO);
        assert_eq!(ids(old), ["orphan", "young", "no-launch-time"]);
        assert!(young.is_empty());
    }
}
