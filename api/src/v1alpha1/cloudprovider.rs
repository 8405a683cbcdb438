//! CloudProvider: a cloud account (or the local host) that runs Stagely's VMs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LocalObjectRef, Size};

/// A cloud account that runs builder and preview VMs, checked with a real credentials call.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stagely.dev",
    version = "v1alpha1",
    kind = "CloudProvider",
    namespaced,
    derive = "PartialEq",
    status = "CloudProviderStatus",
    shortname = "cp",
    category = "stagely",
    doc = "A cloud account (AWS, DigitalOcean, Hetzner, or the local host) that runs Stagely's builder and preview VMs.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Instances", type_ = "integer", json_path = ".status.instances"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'local' || has(self.region)").message("region is required when type is aws, digitalocean or hetzner").field_path(".region").reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("self.type == 'local' || has(self.credentialsSecretRef)").message("credentialsSecretRef is required when type is aws, digitalocean or hetzner").field_path(".credentialsSecretRef").reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("self.type != 'aws' || !has(self.region) || self.region.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')").message("region must be an AWS region such as eu-west-1").field_path(".region"))]
#[x_kube(validation = Rule::new("!has(self.aws) || self.type == 'aws'").message("aws settings are allowed only when type is aws").field_path(".aws"))]
#[x_kube(validation = Rule::new("!has(self.local) || self.type == 'local'").message("local settings are allowed only when type is local").field_path(".local"))]
#[x_kube(validation = Rule::new("self.type == oldSelf.type").message("type is immutable: create a new CloudProvider to use another cloud").field_path(".type"))]
pub struct CloudProviderSpec {
    /// Which cloud: `aws`, `digitalocean`, `hetzner`, or `local` (agents run as processes on
    /// the operator's host, for demos and tests). Immutable.
    #[serde(rename = "type")]
    pub type_: ProviderType,

    /// Region (AWS, DigitalOcean) or location (Hetzner) where VMs start, e.g. `eu-west-1`,
    /// `fra1`, `fsn1`. Required for every type but `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub region: Option<String>,

    /// Secret holding the credentials: `accessKeyId` and `secretAccessKey` for aws, `token`
    /// for digitalocean and hetzner. Required for every type but `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalObjectRef>,

    /// Defaults for the VMs this provider starts.
    #[serde(default)]
    pub defaults: ProviderDefaults,

    /// Upper bound on VMs running at once through this provider; further requests wait.
    #[serde(default = "default_max_instances")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_instances: i32,

    /// AWS-specific settings (only with type `aws`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsSettings>,

    /// Settings of the `local` type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSettings>,
}

fn default_max_instances() -> i32 {
    10
}

/// The kinds of CloudProvider.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    /// Amazon EC2.
    Aws,
    /// DigitalOcean Droplets.
    Digitalocean,
    /// Hetzner Cloud servers.
    Hetzner,
    /// Agent processes on the operator's host.
    Local,
}

impl ProviderType {
    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Aws => "aws",
            ProviderType::Digitalocean => "digitalocean",
            ProviderType::Hetzner => "hetzner",
            ProviderType::Local => "local",
        }
    }
}

/// Defaults for the VMs a provider starts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderDefaults {
    /// Size of builder VMs when stagely.yaml names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_size: Option<Size>,

    /// Size of preview VMs when neither the Project nor stagely.yaml names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_size: Option<Size>,

    /// Machine image to boot instead of the provider's current Ubuntu 24.04 (an AMI id, a
    /// DigitalOcean image slug, or a Hetzner image name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub image: Option<String>,

    /// Run builder VMs on spot capacity where the provider has it, falling back to on-demand.
    #[serde(default)]
    pub spot: bool,
}

/// AWS-specific settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AwsSettings {
    /// Subnet to start instances in; the account's default VPC when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^subnet-[0-9a-f]{8,17}$"))]
    pub subnet_id: Option<String>,

    /// Security groups for the instances; the VPC's default group when omitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(regex(pattern = r"^sg-[0-9a-f]{8,17}$")))]
    pub security_group_ids: Vec<String>,
}

/// Settings of the `local` type.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalSettings {
    /// Container engine the local agents drive: `docker` or `podman`.
    #[serde(default)]
    pub engine: ContainerEngine,
}

/// A container engine the agent can drive.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContainerEngine {
    /// Docker with the compose plugin.
    #[default]
    Docker,
    /// Podman with podman-compose.
    Podman,
}

/// Observed state of a CloudProvider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CloudProviderStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` is True when the credentials were accepted by a real call to the provider; when
    /// False its message says what the provider answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Number of VMs Stagely runs for this namespace in this account and region (those tagged
    /// with the namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<i32>,
}
