//! Environment: the preview environment of one pull request.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{DURATION_RULE, LocalObjectRef, Platform, Size, VmStatus};

/// The preview environment of one pull request: its builds, its VM and its URL.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stagely.dev",
    version = "v1alpha1",
    kind = "Environment",
    namespaced,
    derive = "PartialEq",
    status = "EnvironmentStatus",
    shortname = "env",
    category = "stagely",
    doc = "The preview environment of one pull request: its builds, its VM and its URL.",
    printcolumn(name = "PR", type_ = "integer", json_path = ".spec.pullRequest.number"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentSpec {
    /// The Project (in this namespace) this environment belongs to. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("projectRef is immutable: an Environment stays with its Project"))]
    pub project_ref: LocalObjectRef,

    /// The pull request this environment previews.
    pub pull_request: PullRequest,

    /// Per-environment overrides of the Project's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<EnvironmentOverrides>,
}

/// The pull request an environment previews.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PullRequest {
    /// The pull request number. Immutable: each pull request gets its own Environment.
    #[schemars(range(min = 1))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("pullRequest.number is immutable: each pull request gets its own Environment"))]
    pub number: i64,

    /// The commit to preview: the full 40-character (SHA-1) or 64-character (SHA-256) hex
    /// object id of the pull request's head.
    #[schemars(length(min = 40, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9a-f]{40}|[0-9a-f]{64})$')").message("headSha must be a full lowercase hex commit id (40 or 64 characters)"))]
    pub head_sha: String,

    /// The branch the pull request comes from.
    #[schemars(length(min = 1, max = 255))]
    pub head_ref: String,

    /// The branch the pull request merges into.
    #[schemars(length(min = 1, max = 255))]
    pub base_ref: String,

    /// GitHub login of the pull request's author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 39))]
    pub author: Option<String>,

    /// Web address of the pull request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("url must be an http(s) address"))]
    pub url: Option<String>,
}

/// Per-environment overrides of the Project's settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentOverrides {
    /// Preview VM size for this environment only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_size: Option<Size>,

    /// Time to live for this environment only, e.g. `72h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("ttl must be a positive duration such as 30m, 24h or 7d"))]
    pub ttl: Option<String>,
}

/// Where an environment is in its life.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnvironmentPhase {
    /// Accepted; reading stagely.yaml.
    #[default]
    Pending,
    /// Building images.
    Building,
    /// Starting the preview VM and the app.
    Deploying,
    /// Serving at its URL.
    Ready,
    /// The current run failed; conditions say why.
    Failed,
    /// Being torn down.
    Terminating,
}

/// Observed state of an Environment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Where the environment is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<EnvironmentPhase>,

    /// ConfigValid, BuildsSucceeded, VMReady, AgentConnected, Deployed and Routed, each with a
    /// reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Address the preview is served at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// The subdomain label of the URL: a lowercase alphanumeric NanoID, fixed for the
    /// environment's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]{8,32}$"))]
    pub subdomain_hash: Option<String>,

    /// The preview VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmStatus>,

    /// The current run: the commit being built and deployed, and its builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunStatus>,

    /// When the preview VM's agent last sent a heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,

    /// When the environment is torn down unless it is updated first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// Estimated cloud cost so far, in US dollars, from the providers' hourly prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost_usd: Option<f64>,

    /// The last deployment sent to the preview VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentStatus>,

    /// Registry tags (`<repository>:<tag>`) this environment's runs pushed, deleted with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registry_tags: Vec<String>,

    /// What the pull request was told on GitHub: its Deployment and its comment. Written by the
    /// operator's GitHub feedback, which also sets the `GitHubFeedback` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github: Option<GitHubFeedbackStatus>,
}

/// The condition type the GitHub feedback sets on an Environment.
pub const GITHUB_FEEDBACK_CONDITION: &str = "GitHubFeedback";

/// What an Environment's pull request was told on GitHub.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GitHubFeedbackStatus {
    /// The GitHub Deployment of the current run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<GitHubDeployment>,

    /// The id of the pull request comment Stagely keeps up to date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment_id: Option<i64>,

    /// A digest of the comment's last written text: it is edited only when the text changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub comment_digest: Option<String>,
}

/// A GitHub Deployment and the last status it was given.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GitHubDeployment {
    /// GitHub's id of the Deployment.
    pub id: i64,

    /// The commit it deploys.
    #[schemars(length(max = 64))]
    pub sha: String,

    /// The last status given: `in_progress`, `success`, `failure` or `inactive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub state: Option<String>,
}

/// A deployment of the app onto the preview VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// The DEPLOY job: derived from the environment, the commit and the secrets' contents, so a
    /// new commit or a changed Secret deploys again and nothing else does.
    pub job_id: String,
    /// The commit deployed.
    pub commit: String,
    /// A digest of the secret values deployed (never the values).
    pub secrets_digest: String,
    /// `running`, `succeeded` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The service the URL serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The port on the preview VM the URL is proxied to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// When it was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// The test stage against this deployment: `running`, `succeeded` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<String>,
}

/// One run of an environment: a commit, built and deployed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunStatus {
    /// The commit this run builds.
    pub sha: String,

    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// When the run first became Ready (a later redeploy of the same commit keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Time>,

    /// One entry per BuildJob of the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds: Vec<RunBuild>,

    /// Once every build succeeded: the image each service runs, by digest (an image index
    /// listing every platform when the service builds for several).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub images: std::collections::BTreeMap<String, String>,
}

/// A build of the current run, as the Environment sees it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunBuild {
    /// Name of the BuildJob.
    pub build_job: String,
    /// The stagely.yaml build (service) it builds.
    pub service: String,
    /// The platform it builds for.
    pub platform: Platform,
    /// The BuildJob's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<super::BuildJobPhase>,
    /// The pushed image, by digest, once built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When the build started on its builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}
