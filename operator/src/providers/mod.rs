//! Cloud providers: one interface over AWS EC2, DigitalOcean, Hetzner Cloud and the local host,
//! so controllers start, watch and stop VMs the same way everywhere.
//!
//! Creation is idempotent: every instance carries a deterministic name and Stagely's tags, and a
//! create retried with the same [`InstanceSpec::idempotency_key`] returns the instance the first
//! attempt made (EC2's ClientToken; adoption by name and tag elsewhere). Termination of an
//! instance that is already gone succeeds.

pub mod account;
pub mod aws;
pub mod cloudinit;
pub mod digitalocean;
pub mod hetzner;
pub mod http;
pub mod local;
pub mod names;
pub mod orphans;
pub mod sizes;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::SystemTime;

use stagely_api::keys::cloud_tags;
use stagely_api::v1alpha1::{Platform, Size};

/// A boxed future, so providers can sit behind `dyn CloudProvider`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a VM is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Builds one image, then goes.
    Builder,
    /// Runs a preview.
    Preview,
}

impl Role {
    /// The value of the role tag.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Builder => "builder",
            Role::Preview => "preview",
        }
    }
}

/// What to start.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSpec {
    /// Deterministic name (derived from the owning object), also the adoption key where the
    /// cloud has no idempotency token.
    pub name: String,
    /// Machine size.
    pub size: Size,
    /// CPU architecture.
    pub platform: Platform,
    /// Region or location.
    pub region: String,
    /// cloud-init user data (plain text; providers encode it as their API wants).
    pub user_data: String,
    /// Tags (AWS) or labels (Hetzner); DigitalOcean gets `key:value` tags.
    pub tags: BTreeMap<String, String>,
    /// Prefer spot capacity, falling back to on-demand.
    pub spot: bool,
    /// Same key, same instance: derived from the owning object's UID and run.
    pub idempotency_key: String,
}

/// Stagely's tags for an instance owned by object `owner_uid` in `namespace`.
pub fn stagely_tags(owner_uid: &str, namespace: &str, role: Role) -> BTreeMap<String, String> {
    BTreeMap::from([
        (cloud_tags::MANAGED_BY.to_owned(), "stagely".to_owned()),
        (cloud_tags::OWNER_UID.to_owned(), owner_uid.to_owned()),
        (cloud_tags::ROLE.to_owned(), role.as_str().to_owned()),
        (cloud_tags::NAMESPACE.to_owned(), namespace.to_owned()),
    ])
}

/// Where an instance is in its life, in Stagely's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Being created or booting.
    Pending,
    /// Running.
    Running,
    /// Stopping or being deleted.
    Stopping,
    /// Gone, or going for good.
    Terminated,
    /// A state Stagely does not know, as the provider named it.
    Other(String),
}

/// An instance as the provider reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// The provider's id.
    pub id: String,
    /// Its state.
    pub state: InstanceState,
    /// Public address, once assigned.
    pub public_ip: Option<IpAddr>,
    /// Private address, if any.
    pub private_ip: Option<IpAddr>,
    /// When it was launched.
    pub launched_at: Option<SystemTime>,
    /// Its tags or labels.
    pub tags: BTreeMap<String, String>,
}

impl Instance {
    /// Running with a public address: the agent can be expected to connect.
    pub fn ready(&self) -> bool {
        self.state == InstanceState::Running && self.public_ip.is_some()
    }
}

/// Why a provider call failed. Messages are written for the user reading a condition.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The credentials were refused; the text says what the provider answered.
    #[error("{provider} rejected the credentials: {reason}")]
    InvalidCredentials {
        /// `AWS`, `DigitalOcean`, `Hetzner`.
        provider: &'static str,
        /// The provider's words (never the credential).
        reason: String,
    },
    /// The request cannot be met by this provider (e.g. arm64 on DigitalOcean).
    #[error("{0}")]
    Unsupported(String),
    /// The provider is throttling; retried with backoff before this surfaces.
    #[error("{provider} is throttling requests; retry later")]
    Throttled {
        /// Which provider.
        provider: &'static str,
    },
    /// Any other answer from the API.
    #[error("{provider} API error ({code}): {message}")]
    Api {
        /// Which provider.
        provider: &'static str,
        /// HTTP status or API error code.
        code: String,
        /// The provider's message.
        message: String,
    },
    /// The API could not be reached.
    #[error("failed to reach {provider}: {message}")]
    Transport {
        /// Which provider.
        provider: &'static str,
        /// What failed.
        message: String,
    },
}

/// One cloud account (or the local host).
pub trait CloudProvider: Send + Sync {
    /// Creates an instance, or returns the one an earlier attempt with the same idempotency key
    /// created.
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance, ProviderError>>;
    /// The instance, or `None` if it no longer exists.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>>;
    /// Terminates the instance; one already gone is success.
    fn terminate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>>;
    /// Every instance carrying Stagely's managed-by tag (for the orphan sweep).
    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>>;
    /// The instances tagged as owned by the object with UID `owner_uid`. This default filters
    /// [`list`](Self::list); a provider whose API can filter by tag should, so that cleaning up
    /// after one object does not fetch every VM.
    fn list_owned<'a>(&'a self, owner_uid: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            let owned =
                |instance: &Instance| instance.tags.get(cloud_tags::OWNER_UID).map(String::as_str) == Some(owner_uid);
            Ok(self.list().await?.into_iter().filter(owned).collect())
        })
    }
    /// The instances tagged as belonging to `namespace` (every owner and role of it). This
    /// default filters [`list`](Self::list); a provider whose API can filter by tag should, so
    /// that the orphan sweep of one namespace does not fetch every VM of an account that several
    /// namespaces share (and hold them all in memory at once).
    fn list_namespace<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            let ours =
                |instance: &Instance| instance.tags.get(cloud_tags::NAMESPACE).map(String::as_str) == Some(namespace);
            Ok(self.list().await?.into_iter().filter(ours).collect())
        })
    }
    /// Checks the credentials with a real call.
    fn validate_credentials(&self) -> BoxFuture<'_, Result<(), ProviderError>>;
    /// Hourly price of a size in the provider's billing currency (US dollars; euros for Hetzner,
    /// which bills in euros), if the provider publishes one.
    fn hourly_price(&self, size: Size, platform: Platform) -> BoxFuture<'_, Result<Option<f64>, ProviderError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_name_owner_role_and_namespace() {
        let tags = stagely_tags("uid-1", "team-a", Role::Builder);
        assert_eq!(tags["stagely-managed-by"], "stagely");
        assert_eq!(tags["stagely-owner-uid"], "uid-1");
        assert_eq!(tags["stagely-role"], "builder");
        assert_eq!(tags["stagely-namespace"], "team-a");
    }

    #[test]
    fn ready_means_running_with_a_public_address() {
        let mut instance = Instance {
            id: "i-1".into(),
            state: InstanceState::Running,
            public_ip: None,
            private_ip: None,
            launched_at: None,
            tags: BTreeMap::new(),
        };
        assert!(!instance.ready());
        instance.public_ip = Some("203.0.113.7".parse().unwrap());
        assert!(instance.ready());
        instance.state = InstanceState::Pending;
        assert!(!instance.ready());
    }

    #[test]
    fn errors_read_as_conditions() {
        let err = ProviderError::InvalidCredentials { provider: "AWS", reason: "AuthFailure".into() };
        assert_eq!(err.to_string(), "AWS rejected the credentials: AuthFailure");
    }
}
