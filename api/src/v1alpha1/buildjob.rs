//! BuildJob: one image build (one build target, one platform) on a builder VM.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{DURATION_RULE, Platform, Size, VmStatus};

/// One image build of an Environment's run, for one build target and one platform, on its own
/// builder VM. Owned by its Environment.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stagely.dev",
    version = "v1alpha1",
    kind = "BuildJob",
    namespaced,
    derive = "PartialEq",
    status = "BuildJobStatus",
    shortname = "bj",
    category = "stagely",
    doc = "One image build (one stagely.yaml build, one platform) on its own builder VM, owned by an Environment.",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
    printcolumn(name = "Platform", type_ = "string", json_path = ".spec.platform"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Commit", type_ = "string", json_path = ".spec.commit", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a BuildJob's spec is immutable: a new commit gets new BuildJobs"))]
pub struct BuildJobSpec {
    /// The stagely.yaml build (compose service) this job builds.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("service must be a DNS label: lowercase letters, digits and '-'"))]
    pub service: String,

    /// The platform to build for: `linux/amd64` or `linux/arm64`.
    pub platform: Platform,

    /// The repository to clone, as `owner/name`.
    #[schemars(length(min = 3, max = 140))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$')").message("repository must be a GitHub repository written as owner/name, e.g. acme/shop"))]
    pub repository: String,

    /// The commit to build (full hex object id).
    #[schemars(length(min = 40, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9a-f]{40}|[0-9a-f]{64})$')").message("commit must be a full lowercase hex commit id (40 or 64 characters)"))]
    pub commit: String,

    /// Build context, relative to the repository root.
    #[serde(default = "default_context")]
    #[schemars(length(min = 1, max = 1024))]
    pub context: String,

    /// Dockerfile, relative to the context.
    #[serde(default = "default_dockerfile")]
    #[schemars(length(min = 1, max = 1024))]
    pub dockerfile: String,

    /// Size of the builder VM.
    #[serde(default)]
    pub machine: Size,

    /// Build arguments (`--build-arg KEY=VALUE`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,

    /// Images to use as layer caches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_from: Vec<String>,

    /// Image the build pushes its layer cache to, for the next build of this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub cache_to: Option<String>,

    /// How long the build may run before it is failed, e.g. `30m`.
    #[serde(default = "default_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("timeout must be a positive duration such as 30m or 1h"))]
    pub timeout: String,

    /// Image repository to push to (without tag or digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

fn default_context() -> String {
    ".".to_owned()
}

fn default_dockerfile() -> String {
    "Dockerfile".to_owned()
}

fn default_timeout() -> String {
    "30m".to_owned()
}

/// Where a build is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BuildJobPhase {
    /// Waiting for a builder VM.
    #[default]
    Queued,
    /// The builder VM is starting.
    Provisioning,
    /// The agent is building.
    Building,
    /// The image was pushed; `imageDigest` names it.
    Succeeded,
    /// The build failed; `message` says why.
    Failed,
}

impl BuildJobPhase {
    /// Whether the job has ended, well or badly.
    pub fn is_finished(self) -> bool {
        matches!(self, BuildJobPhase::Succeeded | BuildJobPhase::Failed)
    }
}

/// Observed state of a BuildJob.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildJobStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Where the build is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BuildJobPhase>,

    /// VMReady, AgentConnected and Built, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The builder VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmStatus>,

    /// Digest of the pushed image (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,

    /// When the build started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// When the build finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,

    /// Exit code of the build command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,

    /// A human-readable summary; on failure, why, with the tail of the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// When the agent last sent a heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
}
