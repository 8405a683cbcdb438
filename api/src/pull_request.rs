//! Pull requests as GitHub describes them (webhook payloads and the REST API give the same
//! fields), which of them a Project previews ([`wanted`]), and the Environment that previews one
//! ([`environment`]): shared by the webhook receiver and the operator's resync, so that a pull
//! request gets the same Environment whichever of them saw it first.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use serde::Deserialize;

use crate::v1alpha1::{Environment, EnvironmentSpec, LocalObjectRef, Project, PullRequest, Trigger, TriggerMode};
use crate::{keys, names};

/// The fields of a GitHub pull request Stagely uses.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct GitHubPullRequest {
    /// The pull request number.
    pub number: i64,
    /// `open` or `closed`.
    pub state: String,
    /// Whether it is a draft.
    #[serde(default)]
    pub draft: bool,
    /// When it last changed: orders what is learnt of it, which GitHub does not promise to
    /// deliver in order.
    pub updated_at: Timestamp,
    /// Its web address.
    pub html_url: String,
    /// Its author.
    pub user: Account,
    /// The branch it comes from.
    pub head: Branch,
    /// The branch it merges into.
    pub base: Branch,
    /// Its labels.
    #[serde(default)]
    pub labels: Vec<Label>,
}

/// A repository.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Repository {
    /// `owner/name`.
    pub full_name: String,
}

/// A user or an organization.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Account {
    /// The login.
    pub login: String,
}

/// One end of a pull request.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Branch {
    /// The commit.
    pub sha: String,
    /// The branch name.
    #[serde(rename = "ref")]
    pub ref_: String,
    /// The repository; `null` when a fork was deleted.
    #[serde(default)]
    pub repo: Option<Repository>,
}

/// A label.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Label {
    /// Its name.
    pub name: String,
}

/// Why a pull request has no preview.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// It is closed.
    Closed,
    /// It comes from a fork and the Project does not preview forks.
    Fork,
    /// It is a draft and the Project does not preview drafts.
    Draft,
    /// It lacks the Project's trigger label.
    NoLabel,
}

impl Removal {
    /// What a user reads in the webhook's answer and the logs.
    pub fn message(self) -> &'static str {
        match self {
            Removal::Closed => "the pull request is closed",
            Removal::Fork => "pull requests from forks are not previewed (the Project's spec.trigger.forks is false)",
            Removal::Draft => "draft pull requests are not previewed (the Project's spec.trigger.drafts is false)",
            Removal::NoLabel => "the pull request lacks the Project's trigger label (spec.trigger.label)",
        }
    }
}

/// Whether a Project whose trigger is `trigger`, bound to `repository`, previews `pr` as it is:
/// `Ok(Ok(_))` with the Environment's `spec.pullRequest`, `Ok(Err(_))` with why not, and an
/// error naming the field of the pull request that cannot make an Environment.
pub fn wanted(
    pr: &GitHubPullRequest,
    repository: &str,
    trigger: &Trigger,
) -> Result<Result<PullRequest, Removal>, String> {
    if pr.state != "open" {
        return Ok(Err(Removal::Closed));
    }
    let fork = pr.head.repo.as_ref().is_none_or(|head| !head.full_name.eq_ignore_ascii_case(repository));
    if fork && !trigger.forks {
        return Ok(Err(Removal::Fork));
    }
    if pr.draft && !trigger.drafts {
        return Ok(Err(Removal::Draft));
    }
    if trigger.mode == TriggerMode::Label {
        let label = trigger.label.as_deref().unwrap_or_default();
        if !pr.labels.iter().any(|l| l.name == label) {
            return Ok(Err(Removal::NoLabel));
        }
    }
    spec(pr).map(Ok)
}

/// The Environment's `spec.pullRequest` for `pr`, its fields checked.
fn spec(pr: &GitHubPullRequest) -> Result<PullRequest, String> {
    let sha = &pr.head.sha;
    if !matches!(sha.len(), 40 | 64) || !sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(format!(
            "pull_request.head.sha: {sha:?} is not a full lowercase hex commit id (40 or 64 characters)"
        ));
    }
    for (field, value) in [("pull_request.head.ref", &pr.head.ref_), ("pull_request.base.ref", &pr.base.ref_)] {
        if value.is_empty() || value.len() > 255 {
            return Err(format!("{field}: a branch name must be 1 to 255 characters long"));
        }
    }
    if pr.user.login.len() > 39 {
        return Err("pull_request.user.login: a GitHub login is at most 39 characters long".into());
    }
    let url = &pr.html_url;
    if url.len() > 2048 || !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err("pull_request.html_url: must be an http(s) address of at most 2048 characters".into());
    }
    Ok(PullRequest {
        number: pr.number,
        head_sha: sha.clone(),
        head_ref: pr.head.ref_.clone(),
        base_ref: pr.base.ref_.clone(),
        author: Some(pr.user.login.clone()),
        url: Some(url.clone()),
    })
}

/// The Environment previewing `pr` for Project `namespace/project`, as learnt from `source`
/// (a webhook delivery's id, or `resync`) at the pull request's `updated_at`.
pub fn environment(
    namespace: &str,
    project: &str,
    pr: &PullRequest,
    source: &str,
    updated_at: Timestamp,
) -> Environment {
    let name = names::environment_name(project, pr.number);
    let mut env = Environment::new(
        &name,
        EnvironmentSpec { project_ref: LocalObjectRef::new(project), pull_request: pr.clone(), overrides: None },
    );
    env.metadata = ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([
            (keys::MANAGED_BY.to_owned(), keys::MANAGED_BY_VALUE.to_owned()),
            (keys::PROJECT.to_owned(), names::label_value(project)),
            (keys::PULL_REQUEST.to_owned(), pr.number.to_string()),
        ])),
        annotations: Some(BTreeMap::from([
            (keys::GITHUB_DELIVERY.to_owned(), source.to_owned()),
            (keys::GITHUB_UPDATED_AT.to_owned(), updated_at.to_string()),
        ])),
        ..ObjectMeta::default()
    };
    env
}

/// How long a pull request's removal stays recorded on its Project: longer than GitHub lets a
/// delivery be redelivered (three days).
pub const REMOVAL_MEMORY: SignedDuration = SignedDuration::from_hours(7 * 24);

/// The pull request's `updated_at` the Environment was last written at.
pub fn applied_at(env: &Environment) -> Option<Timestamp> {
    env.annotations().get(keys::GITHUB_UPDATED_AT).and_then(|at| at.parse().ok())
}

/// When the webhook receiver received the delivery that last applied the Environment
/// ([`keys::GITHUB_RECEIVED_AT`]).
pub fn received_at(env: &Environment) -> Option<Timestamp> {
    env.annotations().get(keys::GITHUB_RECEIVED_AT).and_then(|at| at.parse().ok())
}

/// When the Project recorded the removal of pull request `number`'s preview.
pub fn removed_at(project: &Project, number: i64) -> Option<Timestamp> {
    project.annotations().get(&keys::pull_request_removed(number)).and_then(|at| at.parse().ok())
}

/// The merge patch recording on `project` that pull request `number` has no preview as of
/// `updated_at`, forgetting removals recorded longer than [`REMOVAL_MEMORY`] before `now`.
pub fn removal_patch(project: &Project, number: i64, updated_at: Timestamp, now: Timestamp) -> serde_json::Value {
    let horizon = now - REMOVAL_MEMORY;
    let mut annotations: serde_json::Map<String, serde_json::Value> = project
        .annotations()
        .iter()
        .filter(|(key, value)| {
            key.starts_with(keys::PULL_REQUEST_REMOVED_PREFIX)
                && value.parse::<Timestamp>().is_ok_and(|at| at < horizon)
        })
        .map(|(key, _)| (key.clone(), serde_json::Value::Null))
        .collect();
    annotations.insert(keys::pull_request_removed(number), updated_at.to_string().into());
    serde_json::json!({"metadata": {"annotations": annotations}})
}
