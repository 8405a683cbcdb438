//! Resync: webhooks are the fast path, not the only one. Every period, each Project's open pull
//! requests are listed on GitHub and its Environments brought in line: a missing preview is
//! created, a moved head sha applied, and the preview of a pull request that closed while its
//! webhook was lost deleted, but only once GitHub confirms it (`GET` of that pull request says
//! `closed`). An error, an empty or partial page, or an answer that is not JSON fails the
//! Project's whole resync, which then changes nothing: a list is never read as "no pull requests".
//!
//! It writes what the webhook receiver writes (the same Environment, from
//! `stagely_api::pull_request`; the same `updated_at` ordering and removal records on the
//! Project), as the same field manager, so that whichever learns of a change first, the other
//! finds nothing to do, and neither rolls the other back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use stagely_api::pull_request::{self, Removal, applied_at, removed_at};
use stagely_api::v1alpha1::{Environment, Project};
use stagely_api::{keys, names};

use crate::github::auth::read_credentials;
use crate::github::{GitHub, GitHubError, Repository};

/// What one Project's resync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Environments created for open pull requests that had none.
    pub created: usize,
    /// Environments moved to their pull request's newer state.
    pub updated: usize,
    /// Environments deleted: their pull request is closed (confirmed), or no longer previewed.
    pub deleted: usize,
    /// Environments whose pull request could not be confirmed closed, left as they are.
    pub unconfirmed: usize,
}

/// Why a Project's resync changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// GitHub could not list the pull requests, or the credentials are unusable.
    #[error("failed to resync Project {project} with GitHub: {source}")]
    GitHub {
        /// `<namespace>/<name>`.
        project: String,
        /// GitHub's answer.
        source: GitHubError,
    },
    /// The cluster could not be read or written.
    #[error("failed to {action} while resyncing Project {project}: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// `<namespace>/<name>`.
        project: String,
        /// The API error.
        source: kube::Error,
    },
}

/// What to do about one pull request's preview.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing.
    Keep,
    /// Create its Environment.
    Create(stagely_api::v1alpha1::PullRequest),
    /// Apply the pull request's newer state to its Environment.
    Apply(stagely_api::v1alpha1::PullRequest),
    /// Delete its Environment (recording the removal on the Project).
    Delete(Removal),
}

/// What to do about a pull request GitHub lists as it is at `updated_at`, wanted as `wanted`,
/// given its Environment's recorded state (`None`: no Environment; `Some((updated_at,
/// terminating, spec))`) and the Project's removal record for it.
pub fn step(
    wanted: Result<stagely_api::v1alpha1::PullRequest, Removal>,
    updated_at: Timestamp,
    env: Option<(Option<Timestamp>, bool, &stagely_api::v1alpha1::PullRequest)>,
    removed_at: Option<Timestamp>,
) -> Step {
    match (wanted, env) {
        // Being deleted: the receiver recreates it once it is gone; the next resync would too.
        (_, Some((_, true, _))) => Step::Keep,
        // The Environment reflects a state at least as new.
        (_, Some((Some(applied), _, _))) if applied >= updated_at => Step::Keep,
        (Ok(pr), Some((_, _, current))) if *current == pr => Step::Keep,
        (Ok(pr), Some(_)) => Step::Apply(pr),
        (Ok(_), None) if removed_at.is_some_and(|removed| removed >= updated_at) => Step::Keep,
        (Ok(pr), None) => Step::Create(pr),
        (Err(reason), Some(_)) => Step::Delete(reason),
        (Err(_), None) => Step::Keep,
    }
}

/// Resyncs one Project; see the module documentation.
pub async fn resync_project(client: &Client, github: &GitHub, project: &Project) -> Result<Summary, Error> {
    let namespace = project.namespace().unwrap_or_default();
    let name = project.name_any();
    let described = format!("{namespace}/{name}");
    let github_error = |source| Error::GitHub { project: described.clone(), source };
    let kube_error = |action| {
        let project = described.clone();
        move |source| Error::Kube { action, project, source }
    };
    let secret = &project.spec.github.credentials_secret_ref.name;
    let Some(credentials) = read_credentials(client, &namespace, secret).await.map_err(github_error)? else {
        return Ok(Summary::default());
    };
    let repository = &project.spec.repository;
    let open = github.open_pull_requests(&credentials, Repository(repository)).await.map_err(github_error)?;

    let environments: Api<Environment> = Api::namespaced(client.clone(), &namespace);
    let selector = format!("{}={}", keys::PROJECT, names::label_value(&name));
    let listed = environments
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_error("list the Environments"))?;
    let mut by_number: HashMap<i64, Environment> = listed
        .items
        .into_iter()
        .filter(|env| env.spec.project_ref.name == name)
        .map(|env| (env.spec.pull_request.number, env))
        .collect();

    let mut summary = Summary::default();
    for pr in &open {
        let wanted = match pull_request::wanted(pr, repository, &project.spec.trigger) {
            Ok(wanted) => wanted,
            Err(field) => {
                tracing::warn!(project = %described, number = pr.number, %field, "pull request cannot be previewed");
                continue;
            }
        };
        let env = by_number.remove(&pr.number);
        let recorded = env
            .as_ref()
            .map(|env| (applied_at(env), env.metadata.deletion_timestamp.is_some(), &env.spec.pull_request));
        match step(wanted, pr.updated_at, recorded, removed_at(project, pr.number)) {
            Step::Keep => {}
            Step::Create(spec) => {
                let env = pull_request::environment(&namespace, &name, &spec, SOURCE, pr.updated_at);
                match environments.create(&PostParams::default(), &env).await {
                    Ok(_) => summary.created += 1,
                    // Created meanwhile (by a webhook): that is the newer news.
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(err) => return Err(kube_error("create an Environment")(err)),
                }
                tracing::info!(project = %described, number = pr.number, sha = %spec.head_sha, "resync created a missing preview");
            }
            Step::Apply(spec) => {
                let env = env.expect("applied to an existing Environment");
                if apply(&environments, env, &spec, pr.updated_at).await.map_err(kube_error("apply an Environment"))? {
                    summary.updated += 1;
                    tracing::info!(project = %described, number = pr.number, sha = %spec.head_sha, "resync moved a preview to its pull request's head");
                }
            }
            Step::Delete(reason) => {
                let env = env.expect("deleting an existing Environment");
                if super::remove_environment(client, Some((project, pr.updated_at)), &env)
                    .await
                    .map_err(kube_error("delete an Environment"))?
                {
                    summary.deleted += 1;
                    tracing::info!(project = %described, number = pr.number, reason = reason.message(), "resync deleted a preview");
                }
            }
        }
    }

    // Environments whose pull request is not listed open: deleted only once GitHub confirms it
    // closed, at a state newer than the one they show.
    for env in by_number.into_values().filter(|env| env.metadata.deletion_timestamp.is_none()) {
        let number = env.spec.pull_request.number;
        match github.pull_request(&credentials, Repository(repository), number).await {
            Ok(Some(pr)) if pr.state == "closed" && applied_at(&env).is_none_or(|applied| applied <= pr.updated_at) => {
                if super::remove_environment(client, Some((project, pr.updated_at)), &env)
                    .await
                    .map_err(kube_error("delete an Environment"))?
                {
                    summary.deleted += 1;
                    tracing::info!(project = %described, number, "resync deleted the preview of a closed pull request");
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                summary.unconfirmed += 1;
                tracing::warn!(project = %described, number, "GitHub has no such pull request; its preview is kept");
            }
            Err(err) => {
                summary.unconfirmed += 1;
                tracing::warn!(project = %described, number, error = %err, "could not confirm the pull request closed; its preview is kept");
            }
        }
    }
    Ok(summary)
}

/// The `stagely.dev/github-delivery` value of what the resync writes.
pub const SOURCE: &str = "resync";

/// Times an apply is decided again because the Environment changed under it (controllers write
/// to a live Environment all the time).
const CONFLICT_ATTEMPTS: u32 = 5;

/// Applies `spec` (the pull request at `updated_at`) to `env`, on condition that it did not
/// change since it was read; on a conflict it is read again and applied only if it still shows
/// an older state. `Ok(false)` when there was nothing left to apply.
async fn apply(
    environments: &Api<Environment>,
    mut env: Environment,
    spec: &stagely_api::v1alpha1::PullRequest,
    updated_at: Timestamp,
) -> Result<bool, kube::Error> {
    let params = PatchParams::apply(keys::MANAGER_WEBHOOK).force();
    for _ in 0..CONFLICT_ATTEMPTS {
        let recorded = (applied_at(&env), env.metadata.deletion_timestamp.is_some(), &env.spec.pull_request);
        if step(Ok(spec.clone()), updated_at, Some(recorded), None) == Step::Keep {
            return Ok(false);
        }
        let project = env.spec.project_ref.name.clone();
        let mut wanted =
            pull_request::environment(&env.namespace().unwrap_or_default(), &project, spec, SOURCE, updated_at);
        wanted.metadata.resource_version = env.resource_version();
        match environments.patch(&env.name_any(), &params, &Patch::Apply(&wanted)).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => match environments.get_opt(&env.name_any()).await? {
                Some(again) => env = again,
                None => return Ok(false),
            },
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(false),
            Err(err) => return Err(err),
        }
    }
    // Still changing: the next resync looks again.
    Ok(false)
}

/// Resyncs every Project every `period` until `shutdown`.
pub async fn run(
    client: Client,
    github: Arc<GitHub>,
    period: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let projects: Api<Project> = Api::all(client.clone());
    let work = async {
        // The first after one period too: at startup the webhooks' work is fresh.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let listed = match projects.list(&ListParams::default()).await {
                Ok(listed) => listed.items,
                Err(err) => {
                    tracing::warn!(error = %err, "resync: failed to list the Projects");
                    continue;
                }
            };
            for project in &listed {
                match resync_project(&client, &github, project).await {
                    Ok(summary) if summary != Summary::default() => {
                        tracing::info!(namespace = ?project.namespace(), project = %project.name_any(), ?summary, "resynced with GitHub");
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!(error = %err, "resync failed; nothing was changed"),
                }
            }
        }
    };
    tokio::select! {
        () = work => {}
        () = shutdown => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stagely_api::v1alpha1::PullRequest;

    fn pr(sha: char) -> PullRequest {
        PullRequest {
            number: 7,
            head_sha: sha.to_string().repeat(40),
            head_ref: "f".into(),
            base_ref: "main".into(),
            author: None,
            url: None,
        }
    }

    #[test]
    fn the_resync_never_rolls_back_and_only_removes_what_it_saw_go() {
        let t = |s| Timestamp::from_second(s).unwrap();
        let (a, b) = (pr('a'), pr('b'));
        let cases = [
            (Ok(a.clone()), t(10), None, None, Step::Create(a.clone()), "missing: created"),
            (Ok(a.clone()), t(10), None, Some(t(10)), Step::Keep, "removed at this state: not resurrected"),
            (Ok(a.clone()), t(10), None, Some(t(5)), Step::Create(a.clone()), "reopened after its removal"),
            (Ok(b.clone()), t(10), Some((Some(t(5)), false, &a)), None, Step::Apply(b.clone()), "moved head"),
            (Ok(b.clone()), t(10), Some((Some(t(20)), false, &a)), None, Step::Keep, "a newer webhook won"),
            (Ok(a.clone()), t(10), Some((Some(t(5)), false, &a)), None, Step::Keep, "same state"),
            (Ok(b.clone()), t(10), Some((Some(t(5)), true, &a)), None, Step::Keep, "being deleted"),
            (
                Err(Removal::NoLabel),
                t(10),
                Some((Some(t(5)), false, &a)),
                None,
                Step::Delete(Removal::NoLabel),
                "label gone",
            ),
            (Err(Removal::Draft), t(10), Some((Some(t(20)), false, &a)), None, Step::Keep, "newer than the list"),
            (Err(Removal::Fork), t(10), None, None, Step::Keep, "nothing to remove"),
        ];
        for (wanted, updated_at, env, removed_at, expected, case) in cases {
            assert_eq!(step(wanted, updated_at, env, removed_at), expected, "{case}");
        }
    }
}
