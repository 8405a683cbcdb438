//! AWS EC2, with `aws-sdk-ec2`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceStateName, InstanceType, MarketType,
    ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
};
use stagely_api::backoff::Backoff;
use stagely_api::keys::cloud_tags;
use stagely_api::protocol::Sensitive;
use stagely_api::v1alpha1::{Platform, ProviderType, Size};
use tokio::sync::Mutex;

use super::{BoxFuture, CloudProvider, Instance, InstanceSpec, InstanceState, ProviderError, cloudinit, names, sizes};

const PROVIDER: &str = "AWS";

/// Canonical's AWS account, which publishes the Ubuntu images.
pub const CANONICAL_OWNER: &str = "099720109477";

/// Tag holding the idempotency key, so a create retried after a crash can find what the first
/// attempt made even where ClientToken idempotency has expired (it lasts hours, not forever).
pub const IDEMPOTENCY_TAG: &str = "stagely-idempotency-key";

/// Where and how to reach EC2.
#[derive(Clone, Debug)]
pub struct AwsSettings {
    /// Region, e.g. `eu-west-1`.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key; its `Debug` never shows it.
    pub secret_access_key: Sensitive,
    /// Another endpoint (tests point this at moto).
    pub endpoint: Option<String>,
    /// Subnet to start instances in.
    pub subnet_id: Option<String>,
    /// Security groups for the instances.
    pub security_group_ids: Vec<String>,
    /// A fixed image, instead of the newest Ubuntu 24.04.
    pub image: Option<String>,
    /// Owner of the Ubuntu images ([`CANONICAL_OWNER`]).
    pub image_owner: String,
    /// Name pattern of the Ubuntu images; `{arch}` becomes `amd64` or `arm64`.
    pub image_name_pattern: String,
}

impl AwsSettings {
    /// Settings with Canonical's Ubuntu 24.04 images.
    pub fn new(region: &str, access_key_id: &str, secret_access_key: &str) -> Self {
        Self {
            region: region.to_owned(),
            access_key_id: access_key_id.to_owned(),
            secret_access_key: Sensitive(secret_access_key.to_owned()),
            endpoint: None,
            subnet_id: None,
            security_group_ids: Vec::new(),
            image: None,
            image_owner: CANONICAL_OWNER.to_owned(),
            image_name_pattern: "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-*".to_owned(),
        }
    }
}

/// An EC2 account and region.
pub struct Aws {
    client: aws_sdk_ec2::Client,
    settings: AwsSettings,
    images: Mutex<BTreeMap<&'static str, String>>,
}

impl Aws {
    /// Stagely's instances that are not terminated, of `namespace` only when given, every page.
    async fn described(&self, namespace: Option<&str>) -> Result<Vec<Instance>, ProviderError> {
        let mut request =
            self.client.describe_instances().filters(filter(&format!("tag:{}", cloud_tags::MANAGED_BY), "stagely"));
        if let Some(namespace) = namespace {
            request = request.filters(filter(&format!("tag:{}", cloud_tags::NAMESPACE), namespace));
        }
        let mut pages = request.into_paginator().send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(api_error)?;
            instances.extend(page.reservations().iter().flat_map(|r| r.instances()).map(convert));
        }
        instances.retain(|i| i.state != InstanceState::Terminated);
        Ok(instances)
    }

    /// A client for `settings`. Throttled and transient failures are retried by the SDK with
    /// exponential backoff.
    pub fn new(settings: AwsSettings) -> Self {
        let credentials =
            Credentials::new(&settings.access_key_id, settings.secret_access_key.expose(), None, None, "stagely");
        let mut config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(credentials)
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::standard().with_max_attempts(6));
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        Self { client: aws_sdk_ec2::Client::from_conf(config.build()), settings, images: Mutex::default() }
    }

    /// The newest Ubuntu image for `platform`, looked up once and cached.
    pub async fn image(&self, platform: Platform) -> Result<String, ProviderError> {
        if let Some(image) = &self.settings.image {
            return Ok(image.clone());
        }
        let arch = platform.arch();
        let mut images = self.images.lock().await;
        if let Some(image) = images.get(arch) {
            return Ok(image.clone());
        }
        let found = self
            .client
            .describe_images()
            .owners(&self.settings.image_owner)
            .filters(filter("name", &self.settings.image_name_pattern.replace("{arch}", arch)))
            .filters(filter("state", "available"))
            .send()
            .await
            .map_err(api_error)?;
        // The name pattern holds the architecture. Canonical's names end in the build date, which
        // breaks ties between images registered in the same second.
        let newest = found
            .images()
            .iter()
            .filter_map(|image| Some((image.creation_date()?, image.name()?, image.image_id()?)))
            .max_by(|a, b| a.0.cmp(b.0).then(a.1.cmp(b.1)))
            .map(|(_, _, id)| id.to_owned())
            .ok_or_else(|| {
                ProviderError::Unsupported(format!("no Ubuntu 24.04 {arch} image found in {}", self.settings.region))
            })?;
        images.insert(arch, newest.clone());
        Ok(newest)
    }

    async fn find_by_key(&self, key: &str) -> Result<Option<Instance>, ProviderError> {
        let found = self
            .client
            .describe_instances()
            .filters(filter(&format!("tag:{IDEMPOTENCY_TAG}"), key))
            // One filter with both values: EC2 ANDs separate filters, and no instance is in two
            // states at once.
            .filters(filter_any("instance-state-name", &["pending", "running"]))
            .send()
            .await
            .map_err(api_error)?;
        Ok(found.reservations().iter().flat_map(|r| r.instances()).map(convert).next())
    }

    /// Creates the instance, or adopts the one an earlier attempt made: first by the idempotency
    /// tag (which also covers an attempt that fell back from spot to on-demand, whose ClientToken
    /// differs), then by ClientToken, which EC2 keeps for a while. What stays racy: EC2's
    /// DescribeInstances is eventually consistent, so a retry within moments of a crash that
    /// followed a spot-to-on-demand fallback may not see the first instance and start a second;
    /// the owner tag on both lets the orphan sweep find it.
    async fn create_instance(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        cloudinit::check_size(&spec.user_data, ProviderType::Aws)?;
        if let Some(existing) = self.find_by_key(&spec.idempotency_key).await? {
            return Ok(existing);
        }
        let image = self.image(spec.platform).await?;
        let mut tags: Vec<Tag> = spec.tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
        tags.push(Tag::builder().key("Name").value(&spec.name).build());
        tags.push(Tag::builder().key(IDEMPOTENCY_TAG).value(&spec.idempotency_key).build());
        let tag_spec = TagSpecification::builder().resource_type(ResourceType::Instance).set_tags(Some(tags)).build();
        let request = |spot: bool| {
            let mut run = self
                .client
                .run_instances()
                .image_id(&image)
                .instance_type(InstanceType::from(sizes::aws_instance_type(spec.size, spec.platform)))
                .min_count(1)
                .max_count(1)
                .user_data(base64(spec.user_data.as_bytes()))
                // The same token on a retry returns the first attempt's instance.
                .client_token(client_token(&spec.idempotency_key, spot))
                .tag_specifications(tag_spec.clone())
                .set_subnet_id(self.settings.subnet_id.clone());
            if !self.settings.security_group_ids.is_empty() {
                run = run.set_security_group_ids(Some(self.settings.security_group_ids.clone()));
            }
            if spot {
                run = run.instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(
                            SpotMarketOptions::builder()
                                .spot_instance_type(SpotInstanceType::OneTime)
                                .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                                .build(),
                        )
                        .build(),
                );
            }
            run.send()
        };
        let output = match request(spec.spot).await {
            Err(err) if spec.spot && is_capacity_error(err.code()) => {
                tracing::info!(code = err.code(), name = %spec.name, "no spot capacity; starting on-demand");
                request(false).await
            }
            other => other,
        }
        .map_err(api_error)?;
        output.instances().first().map(convert).ok_or_else(|| ProviderError::Api {
            provider: PROVIDER,
            code: "Empty".into(),
            message: "RunInstances returned no instance".into(),
        })
    }
}

fn is_capacity_error(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "InsufficientInstanceCapacity"
                | "SpotMaxPriceTooLow"
                | "MaxSpotInstanceCountExceeded"
                | "InsufficientCapacity"
        )
    )
}

/// A ClientToken (at most 64 ASCII characters) from the idempotency key; on-demand fallbacks
/// get their own, since EC2 ties a token to the original parameters.
fn client_token(key: &str, spot: bool) -> String {
    let suffix = if spot { "-s" } else { "-o" };
    names::fit(key, 62, |c| c.is_ascii_alphanumeric() || c == '-', '-') + suffix
}

fn filter(name: &str, value: &str) -> Filter {
    filter_any(name, &[value])
}

/// A filter matching any of `values` (EC2 ORs the values of one filter, and ANDs filters).
fn filter_any(name: &str, values: &[&str]) -> Filter {
    Filter::builder().name(name).set_values(Some(values.iter().map(|v| (*v).to_owned()).collect())).build()
}

fn convert(instance: &aws_sdk_ec2::types::Instance) -> Instance {
    let state = match instance.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::Stopping | InstanceStateName::Stopped | InstanceStateName::ShuttingDown) => {
            InstanceState::Stopping
        }
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        Some(other) => InstanceState::Other(other.as_str().to_owned()),
        None => InstanceState::Other("unknown".into()),
    };
    Instance {
        id: instance.instance_id().unwrap_or_default().to_owned(),
        state,
        public_ip: instance.public_ip_address().and_then(|ip| ip.parse().ok()),
        private_ip: instance.private_ip_address().and_then(|ip| ip.parse().ok()),
        launched_at: instance.launch_time().and_then(|t| SystemTime::try_from(*t).ok()),
        tags: instance.tags().iter().filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned()))).collect(),
    }
}

fn api_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    err: SdkError<E, R>,
) -> ProviderError {
    let code = err.code().unwrap_or_default().to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    match code.as_str() {
        "AuthFailure"
        | "InvalidClientTokenId"
        | "UnauthorizedOperation"
        | "SignatureDoesNotMatch"
        | "OptInRequired" => ProviderError::InvalidCredentials { provider: PROVIDER, reason: code },
        "RequestLimitExceeded" | "Throttling" => ProviderError::Throttled { provider: PROVIDER },
        "" => ProviderError::Transport {
            provider: PROVIDER,
            message: aws_sdk_ec2::error::DisplayErrorContext(&err).to_string(),
        },
        _ => ProviderError::Api { provider: PROVIDER, code, message },
    }
}

fn is_not_found<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    matches!(err.code(), Some("InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed"))
}

impl CloudProvider for Aws {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance, ProviderError>> {
        Box::pin(self.create_instance(spec))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            match self.client.describe_instances().instance_ids(id).send().await {
                Ok(output) => Ok(output.reservations().iter().flat_map(|r| r.instances()).map(convert).next()),
                Err(err) if is_not_found(&err) => Ok(None),
                Err(err) => Err(api_error(err)),
            }
        })
    }

    fn terminate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            match self.client.terminate_instances().instance_ids(id).send().await {
                Ok(_) => Ok(()),
                Err(err) if is_not_found(&err) => Ok(()),
                Err(err) => Err(api_error(err)),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(self.described(None))
    }

    fn list_namespace<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        // Filtered by EC2: a sweep of one namespace does not describe the whole account.
        Box::pin(self.described(Some(namespace)))
    }

    fn list_owned<'a>(&'a self, owner_uid: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        // Filtered by EC2, not after listing every instance: a teardown of many objects would
        // otherwise describe the whole account once per object.
        Box::pin(async move {
            let found = self
                .client
                .describe_instances()
                .filters(filter(&format!("tag:{}", cloud_tags::OWNER_UID), owner_uid))
                .send()
                .await
                .map_err(api_error)?;
            let mut instances: Vec<Instance> =
                found.reservations().iter().flat_map(|r| r.instances()).map(convert).collect();
            instances.retain(|i| i.state != InstanceState::Terminated);
            Ok(instances)
        })
    }

    fn validate_credentials(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            self.client.describe_account_attributes().send().await.map_err(api_error)?;
            Ok(())
        })
    }

    fn hourly_price(&self, size: Size, platform: Platform) -> BoxFuture<'_, Result<Option<f64>, ProviderError>> {
        // On-demand list prices (us-east-1, Linux); the pricing API lives in another service.
        let price = match sizes::aws_instance_type(size, platform) {
            "t3.small" => 0.0208,
            "t4g.small" => 0.0168,
            "c7i.xlarge" => 0.1785,
            "c7g.xlarge" => 0.145,
            "c7i.2xlarge" => 0.357,
            "c7g.2xlarge" => 0.29,
            _ => return Box::pin(async { Ok(None) }),
        };
        Box::pin(async move { Ok(Some(price)) })
    }
}

/// Polls `aws` until the instance has a public address and runs, or `deadline` passes.
pub async fn wait_until_ready(aws: &Aws, id: &str, deadline: Duration) -> Result<Instance, ProviderError> {
    let start = std::time::Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    loop {
        if let Some(instance) = aws.get(id).await?
            && instance.ready()
        {
            return Ok(instance);
        }
        if start.elapsed() > deadline {
            return Err(ProviderError::Api {
                provider: PROVIDER,
                code: "Timeout".into(),
                message: format!("instance {id} had no public address after {deadline:?}"),
            });
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret_key() {
        let settings = AwsSettings::new("eu-west-1", "AKIAEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
        assert!(!format!("{settings:?}").contains("wJalrXUtnFEMI"), "{settings:?}");
        let aws = Aws::new(settings);
        assert!(!format!("{:?}", aws.settings).contains("wJalrXUtnFEMI"));
    }
}
