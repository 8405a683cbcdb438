//! Hetzner Cloud servers, through API v1.
//!
//! Server names are unique per project, so a create retried after a crash between the API call
//! and the status write gets `uniqueness_error`, and adopts the server the first attempt made
//! when it carries the same idempotency label. Server types are read from `/server_types`, since
//! Hetzner renames and retires them; prices come from `/pricing`.

use std::collections::BTreeMap;

use reqwest::Method;
use serde::Deserialize;
use serde_json::json;
use stagely_api::keys::cloud_tags;
use stagely_api::protocol::Sensitive;
use stagely_api::v1alpha1::{Platform, ProviderType, Size};
use tokio::sync::Mutex;

use super::digitalocean::parse_time;
use super::http::{JsonApi, RetryPolicy};
use super::names;
use super::sizes::{self, HetznerServerType};
use super::{BoxFuture, CloudProvider, Instance, InstanceSpec, InstanceState, ProviderError, cloudinit};

const PROVIDER: &str = "Hetzner";

/// The API's address.
pub const API_URL: &str = "https://api.hetzner.cloud/v1";

/// Label holding the idempotency key.
pub const IDEMPOTENCY_LABEL: &str = "stagely-idempotency-key";

/// Where and how to reach Hetzner Cloud.
#[derive(Clone, Debug)]
pub struct HetznerSettings {
    /// API token of the project; its `Debug` never shows it.
    pub token: Sensitive,
    /// The API's address ([`API_URL`]; tests point it elsewhere).
    pub base_url: String,
    /// Location whose prices [`CloudProvider::hourly_price`] reports, e.g. `fsn1`.
    pub location: String,
    /// Image name of the servers.
    pub image: String,
    /// How throttling is waited out.
    pub retry: RetryPolicy,
}

impl HetznerSettings {
    /// Settings for the real API with Ubuntu 24.04 servers, priced in `location`.
    pub fn new(token: &str, location: &str) -> Self {
        Self {
            token: Sensitive(token.to_owned()),
            base_url: API_URL.to_owned(),
            location: location.to_owned(),
            image: "ubuntu-24.04".to_owned(),
            retry: RetryPolicy::default(),
        }
    }
}

/// A Hetzner Cloud project.
#[derive(Debug)]
pub struct Hetzner {
    api: JsonApi,
    settings: HetznerSettings,
    server_types: Mutex<Option<Vec<HetznerServerType>>>,
}

#[derive(Deserialize)]
struct Server {
    id: u64,
    name: String,
    status: String,
    created: String,
    labels: BTreeMap<String, String>,
    public_net: PublicNet,
    #[serde(default)]
    private_net: Vec<PrivateNet>,
}

#[derive(Deserialize)]
struct PublicNet {
    ipv4: Option<Ip>,
}

#[derive(Deserialize)]
struct Ip {
    ip: String,
}

#[derive(Deserialize)]
struct PrivateNet {
    ip: Option<String>,
}

#[derive(Deserialize)]
struct OneServer {
    server: Server,
}

#[derive(Deserialize)]
struct ServerPage {
    servers: Vec<Server>,
    meta: Meta,
}

#[derive(Deserialize)]
struct Meta {
    pagination: Pagination,
}

#[derive(Deserialize)]
struct Pagination {
    next_page: Option<u64>,
}

#[derive(Deserialize)]
struct ServerTypePage {
    server_types: Vec<ServerTypeInfo>,
    meta: Meta,
}

#[derive(Deserialize)]
struct ServerTypeInfo {
    name: String,
    cores: u32,
    memory: f64,
    architecture: String,
    deprecated: Option<bool>,
    #[serde(default)]
    deprecation: Option<serde_json::Value>,
    prices: Vec<LocationPrice>,
}

#[derive(Deserialize)]
struct LocationPrice {
    location: String,
    price_hourly: Price,
}

#[derive(Deserialize)]
struct Price {
    gross: String,
}

#[derive(Deserialize)]
struct PricingAnswer {
    pricing: Pricing,
}

#[derive(Deserialize)]
struct Pricing {
    server_types: Vec<TypePrices>,
}

#[derive(Deserialize)]
struct TypePrices {
    name: String,
    prices: Vec<LocationPrice>,
}

impl Hetzner {
    /// A client for `settings`.
    pub fn new(settings: HetznerSettings) -> Self {
        let api = JsonApi::new(PROVIDER, &settings.base_url, settings.token.clone(), settings.retry.clone());
        Self { api, settings, server_types: Mutex::default() }
    }

    /// The current server types, read once and cached.
    pub async fn server_types(&self) -> Result<Vec<HetznerServerType>, ProviderError> {
        let mut cached = self.server_types.lock().await;
        if let Some(types) = cached.as_ref() {
            return Ok(types.clone());
        }
        let mut types = Vec::new();
        let mut page = 1;
        loop {
            let page_text = page.to_string();
            let found: ServerTypePage =
                self.api.get("/server_types", &[("per_page", "50"), ("page", &page_text)]).await?;
            types.extend(found.server_types.into_iter().map(|t| {
                HetznerServerType {
                    deprecated: t.deprecated.unwrap_or(false) || t.deprecation.is_some_and(|d| !d.is_null()),
                    prices: t
                        .prices
                        .iter()
                        .filter_map(|p| Some((p.location.clone(), p.price_hourly.gross.parse().ok()?)))
                        .collect(),
                    name: t.name,
                    cores: t.cores,
                    memory: t.memory,
                    architecture: t.architecture,
                }
            }));
            match found.meta.pagination.next_page {
                Some(next) if next > page => page = next,
                _ => break,
            }
        }
        *cached = Some(types.clone());
        Ok(types)
    }

    /// The server type for a size and architecture in `location`.
    pub async fn server_type(&self, size: Size, platform: Platform, location: &str) -> Result<String, ProviderError> {
        let types = self.server_types().await?;
        Ok(sizes::hetzner_server_type(&types, size, platform, location)?.name.clone())
    }

    /// Servers matching a label selector, all pages.
    /// The servers matching the label selector `selector` that are not gone, as instances.
    async fn instances_labelled(&self, selector: &str) -> Result<Vec<Instance>, ProviderError> {
        let servers = self.servers(&[("label_selector", selector)]).await?;
        let mut instances: Vec<Instance> = servers.into_iter().map(convert).collect();
        instances.retain(|i| i.state != InstanceState::Terminated);
        Ok(instances)
    }

    async fn servers(&self, query: &[(&str, &str)]) -> Result<Vec<Server>, ProviderError> {
        let mut servers = Vec::new();
        let mut page = 1;
        loop {
            let page_text = page.to_string();
            let mut paged = query.to_vec();
            paged.extend([("per_page", "50"), ("page", page_text.as_str())]);
            let found: ServerPage = self.api.get("/servers", &paged).await?;
            servers.extend(found.servers);
            match found.meta.pagination.next_page {
                Some(next) if next > page => page = next,
                _ => break,
            }
        }
        Ok(servers)
    }

    async fn create_server(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        let server_type = self.server_type(spec.size, spec.platform, &spec.region).await?;
        let name = server_name(&spec.name);
        let key = label_value(&spec.idempotency_key);
        let mut labels: BTreeMap<String, String> = spec.tags.iter().map(|(k, v)| (k.clone(), label_value(v))).collect();
        labels.insert(IDEMPOTENCY_LABEL.to_owned(), key.clone());
        let body = json!({
            "name": name,
            "server_type": server_type,
            "image": self.settings.image,
            "location": spec.region,
            "labels": labels,
            "user_data": spec.user_data,
            "start_after_create": true,
        });
        match self.api.call::<OneServer>(Method::POST, "/servers", &[], Some(&body)).await {
            Ok(Some(created)) => Ok(convert(created.server)),
            Ok(None) => Err(self.api.not_found("/servers")),
            Err(ProviderError::Api { code, message, .. }) if code == "uniqueness_error" => {
                // The name is taken: by an earlier attempt of this create, or by someone else.
                let selector = format!("{IDEMPOTENCY_LABEL}={key}");
                let existing = self.servers(&[("name", &name), ("label_selector", &selector)]).await?;
                match existing.into_iter().find(|s| s.name == name) {
                    Some(server) => {
                        tracing::info!(id = server.id, %name, "adopting the server an earlier attempt created");
                        Ok(convert(server))
                    }
                    None => Err(ProviderError::Api {
                        provider: PROVIDER,
                        code,
                        message: format!("{message}: server {name} exists and was not created by this request"),
                    }),
                }
            }
            Err(err) => Err(err),
        }
    }
}

/// A label value: at most 63 of letters, digits, `-`, `_` and `.`, starting and ending with a
/// letter or digit; one that had to change gets a hash suffix ([`names::fit`]).
pub fn label_value(value: &str) -> String {
    names::fit(value, 63, |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'), '-')
}

/// A server name: a valid hostname (letters, digits, `-`, `.`), at most 63 characters.
fn server_name(name: &str) -> String {
    names::fit(name, 63, |c| c.is_ascii_alphanumeric() || c == '-' || c == '.', '-')
}

fn convert(server: Server) -> Instance {
    let state = match server.status.as_str() {
        "initializing" | "starting" => InstanceState::Pending,
        "running" => InstanceState::Running,
        "stopping" | "off" => InstanceState::Stopping,
        "deleting" => InstanceState::Terminated,
        other => InstanceState::Other(other.to_owned()),
    };
    Instance {
        id: server.id.to_string(),
        state,
        public_ip: server.public_net.ipv4.and_then(|ip| ip.ip.parse().ok()),
        private_ip: server.private_net.iter().find_map(|n| n.ip.as_deref()?.parse().ok()),
        launched_at: parse_time(&server.created),
        tags: server.labels,
    }
}

/// Server ids are positive integers; anything else names no server.
fn server_id(id: &str) -> Option<u64> {
    id.parse().ok().filter(|id| *id > 0)
}

impl CloudProvider for Hetzner {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance, ProviderError>> {
        Box::pin(async move {
            cloudinit::check_size(&spec.user_data, ProviderType::Hetzner)?;
            self.create_server(spec).await
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            let Some(id) = server_id(id) else { return Ok(None) };
            let found: Option<OneServer> = self.api.call(Method::GET, &format!("/servers/{id}"), &[], None).await?;
            Ok(found.map(|s| convert(s.server)))
        })
    }

    fn terminate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let Some(id) = server_id(id) else { return Ok(()) };
            // 404: already gone, which is what was asked.
            let _: Option<serde::de::IgnoredAny> =
                self.api.call(Method::DELETE, &format!("/servers/{id}"), &[], None).await?;
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move { self.instances_labelled(&format!("{}=stagely", cloud_tags::MANAGED_BY)).await })
    }

    fn list_owned<'a>(&'a self, owner_uid: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        // By the owner's label, not every server of the project once per object torn down.
        Box::pin(async move {
            self.instances_labelled(&format!("{}={}", cloud_tags::OWNER_UID, label_value(owner_uid))).await
        })
    }

    fn list_namespace<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        // By the namespace's label: a sweep of one namespace does not fetch the whole project.
        Box::pin(async move {
            self.instances_labelled(&format!("{}={}", cloud_tags::NAMESPACE, label_value(namespace))).await
        })
    }

    fn validate_credentials(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        // Hetzner has no account endpoint; a one-item listing needs a valid token.
        Box::pin(async move {
            let _: serde::de::IgnoredAny = self.api.get("/servers", &[("per_page", "1")]).await?;
            Ok(())
        })
    }

    /// The gross hourly price in the project's currency (EUR), in the settings' location.
    fn hourly_price(&self, size: Size, platform: Platform) -> BoxFuture<'_, Result<Option<f64>, ProviderError>> {
        Box::pin(async move {
            let location = &self.settings.location;
            let server_type = self.server_type(size, platform, location).await?;
            let answer: PricingAnswer = self.api.get("/pricing", &[]).await?;
            Ok(answer
                .pricing
                .server_types
                .iter()
                .find(|t| t.name == server_type)
                .and_then(|t| t.prices.iter().find(|p| &p.location == location))
                .and_then(|p| p.price_hourly.gross.parse().ok()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_fit_hetzners_rules() {
        assert_eq!(label_value("team-a"), "team-a");
        assert!(label_value("uid/run:2").starts_with("uid-run-2-"), "changed, so hash-suffixed");
        assert_ne!(label_value("uid/run:2"), label_value("uid-run-2"), "keys that sanitise alike stay apart");
        assert!(label_value("-x_").starts_with("x-"));
        let long = label_value(&"a-".repeat(40));
        assert!(long.len() <= 63 && long.chars().last().unwrap().is_ascii_alphanumeric(), "{long}");
        assert_ne!(long, label_value(&format!("{}b", "a-".repeat(40))), "cut values stay apart");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let provider = Hetzner::new(HetznerSettings::new("hcloud-secret-token", "fsn1"));
        assert!(!format!("{provider:?}").contains("hcloud-secret-token"));
    }
}
