//! Project: binds a GitHub repository to a namespace and says how its previews run.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{DURATION_RULE, LocalObjectRef, Size};

/// A GitHub repository whose pull requests get preview environments in this namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stagely.dev",
    version = "v1alpha1",
    kind = "Project",
    namespaced,
    derive = "PartialEq",
    status = "ProjectStatus",
    shortname = "proj",
    category = "stagely",
    doc = "A GitHub repository whose pull requests get preview environments in this namespace.",
    printcolumn(name = "Repository", type_ = "string", json_path = ".spec.repository"),
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.cloudProviderRef.name"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSpec {
    /// The GitHub repository, as `owner/name` (e.g. `acme/shop`).
    #[schemars(length(min = 3, max = 140))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$')").message("repository must be a GitHub repository written as owner/name, e.g. acme/shop"))]
    pub repository: String,

    /// Where builders and the operator fetch the code: any git URL (`https://…`, `ssh://…`,
    /// `git@host:owner/name.git`, `file:///path` for a repository on the operator's host with
    /// the `local` provider). Default `https://github.com/<repository>.git`; set it for GitHub
    /// Enterprise or a mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(https?|ssh|git|file)://.+$') || self.matches('^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:.+$')").message("cloneUrl must be a git URL: https://, http://, ssh://, git://, file:// or user@host:path"))]
    pub clone_url: Option<String>,

    /// The CloudProvider (in this namespace) whose account runs the builder and preview VMs.
    pub cloud_provider_ref: LocalObjectRef,

    /// Machine size of preview VMs, unless stagely.yaml's `preview.size` says otherwise.
    #[serde(default)]
    pub preview_size: Size,

    /// How long an environment lives after its last update before it is torn down, as a
    /// duration such as `30m`, `24h` or `7d`.
    #[serde(default = "default_ttl")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("ttl must be a positive duration such as 30m, 24h or 7d"))]
    pub ttl: String,

    /// DNS domain under which previews are served: each environment gets
    /// `https://<hash>.<previewDomain>`.
    #[schemars(length(min = 1, max = 200))]
    #[x_kube(validation = Rule::new("self.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?\\\\.)+[a-z]{2,63}$')").message("previewDomain must be a DNS name such as preview.example.com"))]
    pub preview_domain: String,

    /// Secrets whose keys are injected into the preview's services, as environment variables
    /// or files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub secret_refs: Vec<ProjectSecretRef>,

    /// How Stagely authenticates to GitHub and verifies its webhooks.
    pub github: GitHubSpec,

    /// Which pull requests get an environment.
    #[serde(default)]
    pub trigger: Trigger,
}

impl ProjectSpec {
    /// The git URL the code is fetched from: `cloneUrl`, else GitHub's HTTPS URL of the
    /// repository.
    pub fn clone_url(&self) -> String {
        self.clone_url.clone().unwrap_or_else(|| format!("https://github.com/{}.git", self.repository))
    }
}

fn default_ttl() -> String {
    "24h".to_owned()
}

/// A Secret whose keys are injected into preview services.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type != 'file' || has(self.path)").message("path is required when type is file"))]
#[x_kube(validation = Rule::new("self.type == 'file' || (!has(self.path) && !has(self.mode))").message("path and mode apply only when type is file"))]
pub struct ProjectSecretRef {
    /// Name of the Secret, in the Project's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// The compose service that receives the keys; omit to give them to every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub service: Option<String>,

    /// `env` injects each key as an environment variable; `file` writes each key as a file in
    /// `path`.
    #[serde(default, rename = "type")]
    pub type_: SecretInjection,

    /// Directory inside the container where `file` secrets are written, one file per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("path must be absolute"))]
    pub path: Option<String>,

    /// File mode of `file` secrets, as a decimal number (384 is octal 0600, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 511))]
    pub mode: Option<i32>,
}

/// How a secret's keys reach a service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SecretInjection {
    /// As environment variables.
    #[default]
    Env,
    /// As files.
    File,
}

/// GitHub credentials and webhook verification.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GitHubSpec {
    /// Secret holding the GitHub credentials: either `appId`, `installationId` and
    /// `privateKey` (a GitHub App), or `token`; and `webhookSecret`, the secret GitHub signs
    /// webhooks with.
    pub credentials_secret_ref: LocalObjectRef,
}

/// Which pull requests get an environment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'label' || has(self.label)").message("trigger.label is required when trigger.mode is label"))]
pub struct Trigger {
    /// `all` previews every pull request; `label` only those carrying `label`: adding the label
    /// creates the preview, removing it deletes the preview.
    #[serde(default)]
    pub mode: TriggerMode,

    /// The pull request label that turns previews on, when mode is `label`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 50))]
    pub label: Option<String>,

    /// Whether draft pull requests are previewed (default true). When false, a draft gets its
    /// preview once it is marked ready for review, and loses it when turned back into a draft.
    #[serde(default = "previews_drafts")]
    pub drafts: bool,

    /// Whether pull requests from forks are previewed (default false). A fork's code would be
    /// built and run with this Project's secrets (`secretRefs`): turn it on only for a
    /// repository whose forks you trust.
    #[serde(default)]
    pub forks: bool,
}

impl Default for Trigger {
    fn default() -> Self {
        Self { mode: TriggerMode::default(), label: None, drafts: previews_drafts(), forks: false }
    }
}

fn previews_drafts() -> bool {
    true
}

/// Which pull requests get an environment.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TriggerMode {
    /// Every pull request.
    #[default]
    All,
    /// Only pull requests carrying the trigger label.
    Label,
}

/// Observed state of a Project.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` says whether the Project's CloudProvider, Secrets and GitHub credentials were
    /// found and work.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Number of Environments of this Project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments: Option<i32>,
}
