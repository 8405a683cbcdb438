//! DigitalOcean droplets, through API v2.
//!
//! DigitalOcean has no idempotency token, so a create first looks for a droplet with the same
//! name carrying the idempotency tag, and adopts it: a create retried after a crash between the
//! API call and the status write finds the first droplet instead of starting a second.

use std::collections::BTreeMap;
use std::time::SystemTime;

use reqwest::Method;
use serde::Deserialize;
use serde_json::json;
use stagely_api::keys::cloud_tags;
use stagely_api::protocol::Sensitive;
use stagely_api::v1alpha1::{Platform, ProviderType, Size};

use super::http::{JsonApi, RetryPolicy};
use super::names;
use super::{BoxFuture, CloudProvider, Instance, InstanceSpec, InstanceState, ProviderError, cloudinit, sizes};

const PROVIDER: &str = "DigitalOcean";

/// The API's address.
pub const API_URL: &str = "https://api.digitalocean.com";

/// Tag key holding the idempotency key (as `key:value`, like every Stagely tag here).
pub const IDEMPOTENCY_TAG: &str = "stagely-idempotency-key";

/// Where and how to reach DigitalOcean.
#[derive(Clone, Debug)]
pub struct DigitalOceanSettings {
    /// API token; its `Debug` never shows it.
    pub token: Sensitive,
    /// The API's address ([`API_URL`]; tests point it elsewhere).
    pub base_url: String,
    /// Image slug of the droplets.
    pub image: String,
    /// How throttling is waited out.
    pub retry: RetryPolicy,
}

impl DigitalOceanSettings {
    /// Settings for the real API with Ubuntu 24.04 droplets.
    pub fn new(token: &str) -> Self {
        Self {
            token: Sensitive(token.to_owned()),
            base_url: API_URL.to_owned(),
            image: "ubuntu-24-04-x64".to_owned(),
            retry: RetryPolicy::default(),
        }
    }
}

/// A DigitalOcean account.
#[derive(Debug)]
pub struct DigitalOcean {
    api: JsonApi,
    settings: DigitalOceanSettings,
}

#[derive(Deserialize)]
struct Droplet {
    id: u64,
    name: String,
    status: String,
    created_at: String,
    networks: Networks,
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct Networks {
    #[serde(default)]
    v4: Vec<Address>,
}

#[derive(Deserialize)]
struct Address {
    ip_address: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct OneDroplet {
    droplet: Droplet,
}

#[derive(Deserialize)]
struct DropletPage {
    droplets: Vec<Droplet>,
    #[serde(default)]
    links: Links,
}

#[derive(Deserialize, Default)]
struct Links {
    #[serde(default)]
    pages: Option<Pages>,
}

#[derive(Deserialize, Default)]
struct Pages {
    next: Option<String>,
}

#[derive(Deserialize)]
struct SizePage {
    sizes: Vec<SizeInfo>,
    #[serde(default)]
    links: Links,
}

#[derive(Deserialize)]
struct SizeInfo {
    slug: String,
    price_hourly: f64,
}

impl DigitalOcean {
    /// A client for `settings`.
    pub fn new(settings: DigitalOceanSettings) -> Self {
        let api = JsonApi::new(PROVIDER, &settings.base_url, settings.token.clone(), settings.retry.clone());
        Self { api, settings }
    }

    /// Every droplet carrying `tag`, all pages.
    /// The droplets tagged `key:value` that are not gone, as instances.
    async fn instances_tagged(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        let droplets = self.droplets_tagged(&tag(key, value)).await?;
        let mut instances: Vec<Instance> = droplets.into_iter().map(convert).collect();
        instances.retain(|i| i.state != InstanceState::Terminated);
        Ok(instances)
    }

    async fn droplets_tagged(&self, tag: &str) -> Result<Vec<Droplet>, ProviderError> {
        let mut droplets = Vec::new();
        for page in 1.. {
            let page = page.to_string();
            let found: DropletPage =
                self.api.get("/v2/droplets", &[("tag_name", tag), ("per_page", "200"), ("page", &page)]).await?;
            let more = found.links.pages.is_some_and(|p| p.next.is_some()) && !found.droplets.is_empty();
            droplets.extend(found.droplets);
            if !more {
                break;
            }
        }
        Ok(droplets)
    }

    async fn create_droplet(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        let slug = sizes::digitalocean_size(spec.size, spec.platform)?;
        let name = droplet_name(&spec.name);
        let key_tag = tag(IDEMPOTENCY_TAG, &spec.idempotency_key);
        // Adopt what an earlier attempt made: same name, same idempotency tag.
        if let Some(existing) = self.droplets_tagged(&key_tag).await?.into_iter().find(|d| d.name == name) {
            tracing::info!(id = existing.id, %name, "adopting the droplet an earlier attempt created");
            return Ok(convert(existing));
        }
        let mut tags: Vec<String> = spec.tags.iter().map(|(k, v)| tag(k, v)).collect();
        tags.push(key_tag);
        let body = json!({
            "name": name,
            "region": spec.region,
            "size": slug,
            "image": self.settings.image,
            "tags": tags,
            "user_data": spec.user_data,
            "monitoring": false,
        });
        let created: OneDroplet = self
            .api
            .call(Method::POST, "/v2/droplets", &[], Some(&body))
            .await?
            .ok_or_else(|| self.api.not_found("/v2/droplets"))?;
        Ok(convert(created.droplet))
    }
}

/// A DigitalOcean tag: `key:value` in what tags may hold (letters, digits, `:`, `-`, `_`), at
/// most 255 characters; one that had to change gets a hash suffix ([`names::fit`]).
pub fn tag(key: &str, value: &str) -> String {
    names::fit(&format!("{key}:{value}"), 255, |c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_'), '_')
}

/// A droplet name: letters, digits, `.` and `-`, starting and ending with a letter or digit.
fn droplet_name(name: &str) -> String {
    names::fit(name, 255, |c| c.is_ascii_alphanumeric() || c == '.' || c == '-', '-')
}

/// Tags back into a map: `key:value` splits at the first colon; a bare tag maps to "".
fn untag(tags: &[String]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| match t.split_once(':') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (t.clone(), String::new()),
        })
        .collect()
}

fn convert(droplet: Droplet) -> Instance {
    let state = match droplet.status.as_str() {
        "new" => InstanceState::Pending,
        "active" => InstanceState::Running,
        "off" => InstanceState::Stopping,
        "archive" => InstanceState::Terminated,
        other => InstanceState::Other(other.to_owned()),
    };
    let address =
        |kind: &str| droplet.networks.v4.iter().find(|a| a.kind == kind).and_then(|a| a.ip_address.parse().ok());
    Instance {
        id: droplet.id.to_string(),
        state,
        public_ip: address("public"),
        private_ip: address("private"),
        launched_at: parse_time(&droplet.created_at),
        tags: untag(&droplet.tags),
    }
}

/// An RFC 3339 time, as both DigitalOcean and Hetzner write them.
pub(crate) fn parse_time(text: &str) -> Option<SystemTime> {
    text.parse::<stagely_api::k8s_openapi::jiff::Timestamp>().ok().map(SystemTime::from)
}

/// Droplet ids are positive integers; anything else names no droplet.
fn droplet_id(id: &str) -> Option<u64> {
    id.parse().ok().filter(|id| *id > 0)
}

impl CloudProvider for DigitalOcean {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance, ProviderError>> {
        Box::pin(async move {
            cloudinit::check_size(&spec.user_data, ProviderType::Digitalocean)?;
            self.create_droplet(spec).await
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            let Some(id) = droplet_id(id) else { return Ok(None) };
            let found: Option<OneDroplet> =
                self.api.call(Method::GET, &format!("/v2/droplets/{id}"), &[], None).await?;
            Ok(found.map(|d| convert(d.droplet)))
        })
    }

    fn terminate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let Some(id) = droplet_id(id) else { return Ok(()) };
            // 404: already gone, which is what was asked.
            let _: Option<serde::de::IgnoredAny> =
                self.api.call(Method::DELETE, &format!("/v2/droplets/{id}"), &[], None).await?;
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(self.instances_tagged(cloud_tags::MANAGED_BY, "stagely"))
    }

    fn list_owned<'a>(&'a self, owner_uid: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        // By the owner's tag, not every droplet of the account once per object torn down.
        Box::pin(self.instances_tagged(cloud_tags::OWNER_UID, owner_uid))
    }

    fn list_namespace<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        // By the namespace's tag: a sweep of one namespace does not fetch the whole account.
        Box::pin(self.instances_tagged(cloud_tags::NAMESPACE, namespace))
    }

    fn validate_credentials(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            let _: serde::de::IgnoredAny = self.api.get("/v2/account", &[]).await?;
            Ok(())
        })
    }

    fn hourly_price(&self, size: Size, platform: Platform) -> BoxFuture<'_, Result<Option<f64>, ProviderError>> {
        Box::pin(async move {
            let slug = sizes::digitalocean_size(size, platform)?;
            for page in 1.. {
                let page = page.to_string();
                let found: SizePage = self.api.get("/v2/sizes", &[("per_page", "200"), ("page", &page)]).await?;
                if let Some(size) = found.sizes.iter().find(|s| s.slug == slug) {
                    return Ok(Some(size.price_hourly));
                }
                if found.sizes.is_empty() || found.links.pages.is_none_or(|p| p.next.is_none()) {
                    break;
                }
            }
            Ok(None)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_key_colon_value_in_the_allowed_characters() {
        assert_eq!(tag("stagely-owner-uid", "0b7e-11"), "stagely-owner-uid:0b7e-11");
        let sanitised = tag("stagely-idempotency-key", "uid/run 2");
        assert!(sanitised.starts_with("stagely-idempotency-key:uid_run_2-"), "{sanitised}");
        assert_ne!(sanitised, tag("stagely-idempotency-key", "uid_run_2"), "keys that sanitise alike stay apart");
        let map = untag(&["stagely-role:builder".into(), "plain".into(), "a:b:c".into()]);
        assert_eq!(map["stagely-role"], "builder");
        assert_eq!(map["plain"], "");
        assert_eq!(map["a"], "b:c");
    }

    #[test]
    fn names_fit_the_droplet_pattern() {
        assert_eq!(droplet_name("stagely-env-42.b"), "stagely-env-42.b");
        assert!(droplet_name("stagely-env_42.b").starts_with("stagely-env-42.b-"));
        assert!(droplet_name("-x-").starts_with("x-"));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let provider = DigitalOcean::new(DigitalOceanSettings::new("dop_v1_secret"));
        assert!(!format!("{provider:?}").contains("dop_v1_secret"));
    }
}
