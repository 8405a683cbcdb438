//! From a CloudProvider object and its credentials Secret to a working [`CloudProvider`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use stagely_api::v1alpha1::{CloudProvider as CloudProviderObject, ProviderType};

use super::aws::{Aws, AwsSettings};
use super::digitalocean::{DigitalOcean, DigitalOceanSettings};
use super::hetzner::{Hetzner, HetznerSettings};
use super::local::{Local, LocalSettings};
use super::{CloudProvider, ProviderError};

/// A test and benchmark seam: makes the provider of a CloudProvider object before [`connect`]
/// tries the built-in types. The operator binary never sets one; `make bench-operator` plugs in
/// a provider whose instances are simulated agents, under an ordinary `local` CloudProvider, so
/// the API needs no type of its own for it.
pub trait ProviderFactory: Send + Sync + std::fmt::Debug {
    /// The provider for `object`, or `None` to leave it to the built-in types.
    fn provider(&self, object: &CloudProviderObject) -> Option<Arc<dyn CloudProvider>>;
}

/// Where to reach each cloud, and how to run local agents: the operator's configuration, not
/// the user's. The endpoint overrides exist for API-compatible services and tests.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// Another EC2 endpoint (e.g. moto in tests).
    pub aws: Option<String>,
    /// Another DigitalOcean API base URL.
    pub digitalocean: Option<String>,
    /// Another Hetzner Cloud API base URL.
    pub hetzner: Option<String>,
    /// The agent binary `local` providers start.
    pub local_agent_bin: PathBuf,
    /// Where `local` providers keep their instances.
    pub local_state_dir: PathBuf,
    /// Extra environment for local agents.
    pub local_env: BTreeMap<String, String>,
    /// Whether `local` CloudProviders may be used at all (`--allow-local-provider`): their
    /// "VMs" are processes on the operator's host, right for the demo and tests only. Off, each is
    /// refused with [`AccountError::LocalNotAllowed`] and no instance is ever started through it.
    pub allow_local: bool,
    /// Consulted before the built-in types (tests and benchmarks only; see [`ProviderFactory`]).
    pub factory: Option<Arc<dyn ProviderFactory>>,
}

/// Why a CloudProvider cannot be used; each names what the user should fix.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The credentials Secret does not exist.
    #[error("Secret {namespace}/{name} not found")]
    SecretNotFound {
        /// Namespace of the Secret.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The Secret lacks a key the provider type needs.
    #[error("Secret {namespace}/{name} has no key {key:?} ({provider} needs {needs})")]
    MissingKey {
        /// Namespace of the Secret.
        namespace: String,
        /// Its name.
        name: String,
        /// The missing key.
        key: &'static str,
        /// The provider type.
        provider: &'static str,
        /// Every key the type needs.
        needs: &'static str,
    },
    /// The spec lacks a field (only possible if the schema was bypassed).
    #[error("spec.{0} is required for this type")]
    MissingField(&'static str),
    /// Reading the Secret failed.
    #[error("cannot read Secret {namespace}/{name}: {source}")]
    Kube {
        /// Namespace of the Secret.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// A `local` CloudProvider, and the operator was not started with `--allow-local-provider`.
    #[error(
        "the local provider is off: its VMs would be processes on the operator's host; start the \
         operator with --allow-local-provider (STAGELY_ALLOW_LOCAL_PROVIDER=true), for demos and tests only"
    )]
    LocalNotAllowed,
    /// The provider refused the configuration.
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

impl AccountError {
    /// A `Reason` for a condition.
    pub fn reason(&self) -> &'static str {
        match self {
            AccountError::SecretNotFound { .. } => "SecretNotFound",
            AccountError::MissingKey { .. } => "SecretIncomplete",
            AccountError::MissingField(_) => "InvalidSpec",
            AccountError::Kube { .. } => "SecretUnreadable",
            AccountError::LocalNotAllowed => "LocalProviderNotAllowed",
            AccountError::Provider(err) => provider_reason(err),
        }
    }
}

/// A `Reason` for a condition from a provider error.
pub fn provider_reason(err: &ProviderError) -> &'static str {
    match err {
        ProviderError::InvalidCredentials { .. } => "CredentialsRejected",
        ProviderError::Unsupported(_) => "Unsupported",
        ProviderError::Throttled { .. } => "Throttled",
        ProviderError::Api { .. } => "ProviderError",
        ProviderError::Transport { .. } => "ProviderUnreachable",
    }
}

/// The credentials of a CloudProvider, read from its Secret. Values are kept out of `Debug`.
struct Credentials {
    data: BTreeMap<String, Vec<u8>>,
    namespace: String,
    name: String,
}

impl Credentials {
    fn get(&self, key: &'static str, provider: &'static str, needs: &'static str) -> Result<String, AccountError> {
        let value = self.data.get(key).map(|v| String::from_utf8_lossy(v).trim().to_owned()).unwrap_or_default();
        if value.is_empty() {
            return Err(AccountError::MissingKey {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                key,
                provider,
                needs,
            });
        }
        Ok(value)
    }
}

async fn credentials(client: &Client, object: &CloudProviderObject) -> Result<Credentials, AccountError> {
    let namespace = object.namespace().unwrap_or_default();
    let name = object.spec.credentials_secret_ref.as_ref().ok_or(AccountError::MissingField("credentialsSecretRef"))?;
    let name = name.name.clone();
    let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
        .get_opt(&name)
        .await
        .map_err(|source| AccountError::Kube { namespace: namespace.clone(), name: name.clone(), source })?;
    let secret =
        secret.ok_or_else(|| AccountError::SecretNotFound { namespace: namespace.clone(), name: name.clone() })?;
    let mut data: BTreeMap<String, Vec<u8>> =
        secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    for (key, value) in secret.string_data.unwrap_or_default() {
        data.insert(key, value.into_bytes());
    }
    Ok(Credentials { data, namespace, name })
}

/// The provider `object` describes, with its credentials read from its Secret. Every path to a
/// VM goes through here, so a `local` provider the operator does not allow is refused here.
pub async fn connect(
    client: &Client,
    object: &CloudProviderObject,
    endpoints: &Endpoints,
) -> Result<Arc<dyn CloudProvider>, AccountError> {
    if object.spec.type_ == ProviderType::Local && !endpoints.allow_local {
        return Err(AccountError::LocalNotAllowed);
    }
    if let Some(provider) = endpoints.factory.as_ref().and_then(|factory| factory.provider(object)) {
        return Ok(provider);
    }
    let spec = &object.spec;
    let region = || spec.region.clone().ok_or(AccountError::MissingField("region"));
    match spec.type_ {
        ProviderType::Local => Ok(Arc::new(Local::new(LocalSettings {
            agent_bin: endpoints.local_agent_bin.clone(),
            state_dir: endpoints.local_state_dir.join(object.namespace().unwrap_or_default()).join(object.name_any()),
            engine: spec.local.clone().unwrap_or_default().engine,
            env: endpoints.local_env.clone(),
        }))),
        ProviderType::Aws => {
            let creds = credentials(client, object).await?;
            const NEEDS: &str = "accessKeyId and secretAccessKey";
            let mut settings = AwsSettings::new(
                &region()?,
                &creds.get("accessKeyId", "aws", NEEDS)?,
                &creds.get("secretAccessKey", "aws", NEEDS)?,
            );
            settings.endpoint = endpoints.aws.clone();
            settings.image = spec.defaults.image.clone();
            if let Some(aws) = &spec.aws {
                settings.subnet_id = aws.subnet_id.clone();
                settings.security_group_ids = aws.security_group_ids.clone();
            }
            Ok(Arc::new(Aws::new(settings)))
        }
        ProviderType::Digitalocean => {
            let creds = credentials(client, object).await?;
            let mut settings = DigitalOceanSettings::new(&creds.get("token", "digitalocean", "token")?);
            if let Some(url) = &endpoints.digitalocean {
                settings.base_url = url.clone();
            }
            if let Some(image) = &spec.defaults.image {
                settings.image = image.clone();
            }
            Ok(Arc::new(DigitalOcean::new(settings)))
        }
        ProviderType::Hetzner => {
            let creds = credentials(client, object).await?;
            let mut settings = HetznerSettings::new(&creds.get("token", "hetzner", "token")?, &region()?);
            if let Some(url) = &endpoints.hetzner {
                settings.base_url = url.clone();
            }
            if let Some(image) = &spec.defaults.image {
                settings.image = image.clone();
            }
            Ok(Arc::new(Hetzner::new(settings)))
        }
    }
}
