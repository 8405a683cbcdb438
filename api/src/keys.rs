//! Well-known label, annotation, finalizer and field-manager names.

/// Label on every object Stagely creates; value [`MANAGED_BY_VALUE`].
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "stagely";

/// Label: the Project an Environment or BuildJob belongs to.
pub const PROJECT: &str = "stagely.dev/project";
/// Label: the Environment a BuildJob belongs to.
pub const ENVIRONMENT: &str = "stagely.dev/environment";
/// Label: the pull request number of an Environment or BuildJob.
pub const PULL_REQUEST: &str = "stagely.dev/pull-request";
/// Label: the stagely.yaml build (service) of a BuildJob.
pub const SERVICE: &str = "stagely.dev/service";
/// Label: the architecture (`amd64`, `arm64`) of a BuildJob. Label values cannot hold `/`.
pub const ARCH: &str = "stagely.dev/arch";
/// Label: the commit a BuildJob builds (a 40-character SHA-1 fits a label value; longer ids
/// are truncated to 63).
pub const COMMIT: &str = "stagely.dev/commit";

/// Annotation: the `X-GitHub-Delivery` id of the webhook that last applied an Environment. A
/// redelivery of it (GitHub keeps the id) changes nothing, even after the receiver restarted.
pub const GITHUB_DELIVERY: &str = "stagely.dev/github-delivery";
/// Annotation: the pull request's `updated_at` (RFC 3339) in the webhook that last applied an
/// Environment. A webhook about an older state of the pull request (GitHub does not promise to
/// deliver in order) never overwrites a newer one: an older `synchronize` never rolls the head
/// sha back.
pub const GITHUB_UPDATED_AT: &str = "stagely.dev/github-updated-at";
/// Annotation: when (RFC 3339, to the millisecond) the webhook receiver received the delivery
/// that last applied an Environment. The operator measures from it the time from a webhook to
/// the first Ready of the run it started (`stagely_operator_environment_webhook_to_ready_seconds`).
pub const GITHUB_RECEIVED_AT: &str = "stagely.dev/github-received-at";
/// Annotation prefix on a Project, followed by a pull request number
/// ([`pull_request_removed`]): the pull request's `updated_at` (RFC 3339) when the webhook
/// receiver last removed its Environment, or found none to remove (closed, unlabeled, turned
/// draft). A late webhook about an older state of that pull request creates nothing: a
/// `synchronize` delivered after `closed` does not resurrect the preview. Kept for a week.
pub const PULL_REQUEST_REMOVED_PREFIX: &str = "stagely.dev/removed-pr-";

/// The annotation on a Project recording when pull request `number`'s Environment was removed
/// (see [`PULL_REQUEST_REMOVED_PREFIX`]).
pub fn pull_request_removed(number: i64) -> String {
    format!("{PULL_REQUEST_REMOVED_PREFIX}{number}")
}

/// Annotation on a BuildJob: stop it (its VM is terminated and it ends `Failed`); the value is
/// why, shown in its status, e.g. `cancelled: build web (linux/arm64) failed`.
pub const CANCEL: &str = "stagely.dev/cancel";

/// Annotation an admin sets on an Environment, BuildJob or CloudProvider being deleted whose
/// cleanup keeps failing: stop trying and let it go now (any value). What was left is said in an
/// Event; VMs left behind carry Stagely's tags, and the orphan sweep keeps trying to stop them.
pub const ABANDON_CLEANUP: &str = "stagely.dev/abandon-cleanup";

/// Annotation the reaper sets on an Environment just before deleting it: `<Reason>: <why>`
/// (`Expired: ...`, `HeartbeatLost: ...`), so the pull request's comment can say why the
/// preview went.
pub const REAPED: &str = "stagely.dev/reaped";

/// Label on a BuildJob that holds nothing any more (finished, its VM gone), set as its finalizer
/// is removed: the BuildJob controller watches only BuildJobs without it, so a settled job costs
/// it no memory and is deleted at once.
pub const SETTLED: &str = "stagely.dev/settled";

/// Finalizer: an Environment's VM, route, builds and images are cleaned up before it goes.
pub const ENVIRONMENT_FINALIZER: &str = "stagely.dev/environment-cleanup";
/// Finalizer: a BuildJob's builder VM is terminated before it goes.
pub const BUILDJOB_FINALIZER: &str = "stagely.dev/buildjob-cleanup";
/// Finalizer: an Environment's GitHub Deployment is marked inactive and its pull request comment
/// says the preview is gone before the Environment goes.
pub const GITHUB_FEEDBACK_FINALIZER: &str = "stagely.dev/github-feedback";
/// Finalizer: a CloudProvider stays while VMs it started still exist.
pub const CLOUDPROVIDER_FINALIZER: &str = "stagely.dev/cloudprovider-protection";
/// Finalizer on a CloudProvider's credentials Secret: it stays while a CloudProvider using it
/// does, so that deleting a whole namespace still tears its VMs down with working credentials.
pub const CREDENTIALS_FINALIZER: &str = "stagely.dev/credentials-in-use";

/// Server-side apply field manager of the webhook receiver.
pub const MANAGER_WEBHOOK: &str = "stagely-webhook-receiver";
/// Server-side apply field manager of the operator's controllers.
pub const MANAGER_OPERATOR: &str = "stagely-operator";
/// Server-side apply field manager of the operator's GitHub feedback (`status.github` and the
/// `GitHubFeedback` condition of Environments).
pub const MANAGER_GITHUB_FEEDBACK: &str = "stagely-github-feedback";

/// Tag/label keys Stagely puts on cloud instances, so the orphan sweep can find them.
pub mod cloud_tags {
    /// Marks an instance as Stagely's; value `stagely`.
    pub const MANAGED_BY: &str = "stagely-managed-by";
    /// UID of the owning Environment or BuildJob.
    pub const OWNER_UID: &str = "stagely-owner-uid";
    /// `builder` or `preview`.
    pub const ROLE: &str = "stagely-role";
    /// Namespace of the owning object.
    pub const NAMESPACE: &str = "stagely-namespace";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kubernetes_qualified_names() {
        for key in [
            MANAGED_BY,
            PROJECT,
            ENVIRONMENT,
            PULL_REQUEST,
            SERVICE,
            ARCH,
            COMMIT,
            GITHUB_DELIVERY,
            GITHUB_UPDATED_AT,
            GITHUB_RECEIVED_AT,
            pull_request_removed(i64::MAX).as_str(),
            GITHUB_FEEDBACK_FINALIZER,
            CANCEL,
            ENVIRONMENT_FINALIZER,
            BUILDJOB_FINALIZER,
            CLOUDPROVIDER_FINALIZER,
        ] {
            let (prefix, name) = key.split_once('/').expect("prefixed");
            assert!(prefix.contains('.') && prefix.len() <= 253, "{key}");
            assert!(!name.is_empty() && name.len() <= 63, "{key}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{key}");
        }
    }
}
