//! The receiver's decisions, as pure functions: what a `pull_request` event asks of a Project
//! ([`intent`]), and what to do about it given the Environment as it is ([`decide`]).
//!
//! GitHub does not promise to deliver in order, and redelivers with the same id. So every
//! decision compares the pull request's `updated_at` in the event with the one recorded on the
//! Environment (or, when the Environment is gone, on the Project, when it was removed): an event
//! about an older state changes nothing.

use k8s_openapi::jiff::Timestamp;
use stagely_api::pull_request;
pub use stagely_api::pull_request::Removal;
use stagely_api::v1alpha1::{PullRequest, Trigger};

use crate::github::PullRequestEvent;

/// The `pull_request` actions the receiver acts on; the others (assigned, review_requested, …)
/// are acknowledged and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A pull request was opened.
    Opened,
    /// A closed pull request was reopened.
    Reopened,
    /// Commits were pushed to its branch.
    Synchronize,
    /// A draft was marked ready for review.
    ReadyForReview,
    /// It was turned back into a draft.
    ConvertedToDraft,
    /// A label was added.
    Labeled,
    /// A label was removed.
    Unlabeled,
    /// Its title, body or base branch changed.
    Edited,
    /// It was closed or merged.
    Closed,
}

impl Action {
    /// Every action acted on.
    pub const ALL: [Action; 9] = [
        Action::Opened,
        Action::Reopened,
        Action::Synchronize,
        Action::ReadyForReview,
        Action::ConvertedToDraft,
        Action::Labeled,
        Action::Unlabeled,
        Action::Edited,
        Action::Closed,
    ];

    /// GitHub's name of the action.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Opened => "opened",
            Action::Reopened => "reopened",
            Action::Synchronize => "synchronize",
            Action::ReadyForReview => "ready_for_review",
            Action::ConvertedToDraft => "converted_to_draft",
            Action::Labeled => "labeled",
            Action::Unlabeled => "unlabeled",
            Action::Edited => "edited",
            Action::Closed => "closed",
        }
    }

    /// The action GitHub calls `name`, if the receiver acts on it.
    pub fn parse(name: &str) -> Option<Self> {
        Action::ALL.into_iter().find(|action| action.as_str() == name)
    }
}

/// What an event asks of one Project's preview of the pull request.
#[derive(Clone, Debug, PartialEq)]
pub enum Intent {
    /// The pull request should be previewed at this state.
    Preview(PullRequest),
    /// It should have no preview.
    Remove {
        /// Why.
        reason: Removal,
        /// The event turned the preview off (closed, the trigger label removed, turned into a
        /// draft): recorded even when there is no Environment, so that a late event about an
        /// older state creates none.
        transition: bool,
    },
}

/// What `event` asks of a Project whose trigger is `trigger`; `None` when the receiver ignores
/// the action (or an `edited` that did not change the base branch). An error says which field
/// of the pull request cannot make an Environment.
pub fn intent(event: &PullRequestEvent, action: Action, trigger: &Trigger) -> Result<Option<Intent>, String> {
    let pr = &event.pull_request;
    if action == Action::Edited && event.changes.as_ref().is_none_or(|changes| changes.base.is_none()) {
        return Ok(None);
    }
    if action == Action::Closed {
        return Ok(Some(Intent::Remove { reason: Removal::Closed, transition: true }));
    }
    Ok(Some(match pull_request::wanted(pr, &event.repository.full_name, trigger)? {
        Ok(pr) => Intent::Preview(pr),
        Err(reason) => {
            // The event that turned the preview off, as opposed to one about a pull request
            // that had none.
            let transition = match reason {
                Removal::Closed => false,
                Removal::Fork => false,
                Removal::Draft => action == Action::ConvertedToDraft,
                Removal::NoLabel => {
                    let label = trigger.label.as_deref().unwrap_or_default();
                    action == Action::Unlabeled && event.label.as_ref().is_some_and(|l| l.name == label)
                }
            };
            Intent::Remove { reason, transition }
        }
    }))
}

/// One event's work on one pull request's Environment.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// The delivery that asked for it.
    pub delivery: String,
    /// The action.
    pub action: Action,
    /// The pull request's `updated_at` in the event.
    pub updated_at: Timestamp,
    /// When the receiver received the delivery (the start of the operator's webhook-to-Ready
    /// histogram, through [`keys::GITHUB_RECEIVED_AT`](stagely_api::keys::GITHUB_RECEIVED_AT)).
    pub received_at: Timestamp,
    /// What it asks.
    pub intent: Intent,
    /// Set once an attempt failed: the job is retried with backoff until a deadline.
    pub retry: Option<Retry>,
}

/// A job's failures so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// When its first attempt failed.
    pub since: std::time::Instant,
    /// The delays between its attempts.
    pub backoff: stagely_api::backoff::Backoff,
}

impl Job {
    /// Whether this job describes a state at least as new as `other`'s, so that it replaces
    /// `other` when both wait for the same pull request.
    pub fn supersedes(&self, other: &Job) -> bool {
        self.updated_at >= other.updated_at
    }
}

/// What the receiver knows of an existing Environment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The delivery that last applied it.
    pub delivery: Option<String>,
    /// The pull request's `updated_at` when it was last applied.
    pub updated_at: Option<Timestamp>,
    /// It is being deleted.
    pub terminating: bool,
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Create the Environment.
    Create,
    /// Apply the Environment over the existing one.
    Apply,
    /// Record the removal on the Project, then delete the Environment.
    Delete,
    /// Record the removal on the Project; there is no Environment to delete.
    RecordRemoval,
    /// Try again later: the Environment is being deleted and the pull request wants a preview.
    Wait,
    /// Nothing.
    Skip(Skip),
}

/// Why a job changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The Environment was applied by this very delivery.
    Duplicate,
    /// The Environment reflects a newer state of the pull request.
    Stale,
    /// The preview was removed at a newer state of the pull request (closed, unlabeled, …).
    RemovedLater,
    /// Nothing to remove, and nothing to record.
    NothingToRemove,
}

impl Skip {
    /// The metric and log name.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Duplicate => "duplicate",
            Skip::Stale => "stale",
            Skip::RemovedLater => "removed_later",
            Skip::NothingToRemove => "nothing_to_remove",
        }
    }
}

/// What to do about `job`, given the Environment as it is (`None`: there is none) and, when
/// there is none, when the Project recorded its removal.
pub fn decide(job: &Job, env: Option<&Observed>, removed_at: Option<Timestamp>) -> Decision {
    let preview = matches!(job.intent, Intent::Preview(_));
    let transition = matches!(job.intent, Intent::Remove { transition: true, .. });
    match env {
        Some(env) => {
            if env.delivery.as_deref() == Some(job.delivery.as_str()) {
                Decision::Skip(Skip::Duplicate)
            } else if env.updated_at.is_some_and(|applied| applied > job.updated_at) {
                Decision::Skip(Skip::Stale)
            } else if env.terminating {
                if preview {
                    Decision::Wait
                } else if transition {
                    Decision::RecordRemoval
                } else {
                    Decision::Skip(Skip::NothingToRemove)
                }
            } else if preview {
                Decision::Apply
            } else {
                Decision::Delete
            }
        }
        None => {
            // A removal and an event of the same second are told apart only by a reopening,
            // which always follows the close.
            let removed_later = removed_at.is_some_and(|removed| {
                removed > job.updated_at || (removed == job.updated_at && job.action != Action::Reopened)
            });
            if preview {
                if removed_later { Decision::Skip(Skip::RemovedLater) } else { Decision::Create }
            } else if transition && removed_at.is_none_or(|removed| removed < job.updated_at) {
                Decision::RecordRemoval
            } else {
                Decision::Skip(Skip::NothingToRemove)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::github::parse;

    fn event(action: &str, extra: serde_json::Value) -> PullRequestEvent {
        let mut payload = serde_json::json!({
            "action": action,
            "repository": {"full_name": "acme/shop"},
            "pull_request": {
                "number": 7, "state": "open", "draft": false, "updated_at": "2026-01-02T03:04:05Z",
                "html_url": "https://github.com/acme/shop/pull/7", "user": {"login": "octocat"},
                "head": {"sha": "a".repeat(40), "ref": "feature", "repo": {"full_name": "acme/shop"}},
                "base": {"sha": "b".repeat(40), "ref": "main", "repo": {"full_name": "acme/shop"}},
                "labels": [{"name": "bug"}],
            },
        });
        merge(&mut payload, extra);
        parse(payload.to_string().as_bytes()).unwrap()
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(into), serde_json::Value::Object(from)) => {
                for (key, value) in from {
                    merge(into.entry(key).or_insert(serde_json::Value::Null), value);
                }
            }
            (into, from) => *into = from,
        }
    }

    fn trigger(json: serde_json::Value) -> Trigger {
        serde_json::from_value(json).unwrap()
    }

    fn intent_of(action: &str, extra: serde_json::Value, trigger_json: serde_json::Value) -> Option<Intent> {
        let event = event(action, extra);
        intent(&event, Action::parse(action).unwrap(), &trigger(trigger_json)).unwrap()
    }

    #[test]
    fn an_open_pull_request_is_previewed_at_its_head() {
        let Some(Intent::Preview(pr)) = intent_of("synchronize", serde_json::json!({}), serde_json::json!({})) else {
            panic!("previewed")
        };
        assert_eq!(
            pr,
            PullRequest {
                number: 7,
                head_sha: "a".repeat(40),
                head_ref: "feature".into(),
                base_ref: "main".into(),
                author: Some("octocat".into()),
                url: Some("https://github.com/acme/shop/pull/7".into()),
            }
        );
    }

    #[test]
    fn intents() {
        use serde_json::json;
        let all = json!({});
        let labelled = json!({"mode": "label", "label": "preview"});
        let no_drafts = json!({"drafts": false});
        let with_label = json!({"pull_request": {"labels": [{"name": "preview"}]}});
        let draft = json!({"pull_request": {"draft": true}});
        let fork = json!({"pull_request": {"head": {"repo": {"full_name": "mallory/shop"}}}});
        let closed = json!({"pull_request": {"state": "closed"}});
        type Check = Box<dyn Fn(&Option<Intent>) -> bool>;
        type Case = (&'static str, serde_json::Value, serde_json::Value, Check);
        let preview = || -> Check { Box::new(|i| matches!(i, Some(Intent::Preview(_)))) };
        let removed =
            |reason, transition| -> Check { Box::new(move |i| *i == Some(Intent::Remove { reason, transition })) };
        let cases: Vec<Case> = vec![
            ("opened", json!({}), all.clone(), preview()),
            ("closed", closed.clone(), all.clone(), removed(Removal::Closed, true)),
            // Labelled after it closed: it stays without a preview, and that is no transition.
            ("labeled", closed, all.clone(), removed(Removal::Closed, false)),
            ("opened", fork.clone(), all.clone(), removed(Removal::Fork, false)),
            ("opened", fork, json!({"forks": true}), preview()),
            // A fork whose repository was deleted is still a fork.
            (
                "synchronize",
                json!({"pull_request": {"head": {"repo": null}}}),
                all.clone(),
                removed(Removal::Fork, false),
            ),
            ("opened", draft.clone(), all.clone(), preview()),
            ("opened", draft.clone(), no_drafts.clone(), removed(Removal::Draft, false)),
            ("converted_to_draft", draft, no_drafts.clone(), removed(Removal::Draft, true)),
            ("ready_for_review", json!({}), no_drafts, preview()),
            ("opened", json!({}), labelled.clone(), removed(Removal::NoLabel, false)),
            ("labeled", with_label, labelled.clone(), preview()),
            ("unlabeled", json!({"label": {"name": "preview"}}), labelled.clone(), removed(Removal::NoLabel, true)),
            // Another label removed from a pull request that never had the trigger label.
            ("unlabeled", json!({"label": {"name": "bug"}}), labelled, removed(Removal::NoLabel, false)),
            ("edited", json!({"changes": {"title": {"from": "x"}}}), all.clone(), Box::new(Option::is_none)),
            ("edited", json!({"changes": {"base": {"ref": {"from": "dev"}}}}), all, preview()),
        ];
        for (action, extra, trigger_json, expected) in cases {
            let got = intent_of(action, extra.clone(), trigger_json.clone());
            assert!(expected(&got), "{action} {extra} {trigger_json}: {got:?}");
        }
    }

    #[test]
    fn a_pull_request_that_cannot_make_an_environment_is_refused_with_the_field() {
        for (extra, field) in [
            (serde_json::json!({"pull_request": {"head": {"sha": "abc"}}}), "pull_request.head.sha"),
            (serde_json::json!({"pull_request": {"head": {"sha": "A".repeat(40)}}}), "pull_request.head.sha"),
            (serde_json::json!({"pull_request": {"base": {"ref": "r".repeat(256)}}}), "pull_request.base.ref"),
            (serde_json::json!({"pull_request": {"html_url": "ftp://x"}}), "pull_request.html_url"),
        ] {
            let event = event("opened", extra);
            let err = intent(&event, Action::Opened, &Trigger::default()).unwrap_err();
            assert!(err.starts_with(field), "{err}");
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_790_000_000 + second).unwrap()
    }

    fn job(action: Action, second: i64, preview: bool) -> Job {
        let intent = if preview {
            Intent::Preview(PullRequest::default())
        } else {
            Intent::Remove { reason: Removal::Closed, transition: action == Action::Closed }
        };
        Job {
            delivery: format!("d-{second}"),
            action,
            updated_at: at(second),
            received_at: at(second),
            intent,
            retry: None,
        }
    }

    fn env(delivery: &str, second: i64) -> Observed {
        Observed { delivery: Some(delivery.into()), updated_at: Some(at(second)), terminating: false }
    }

    #[test]
    fn decisions() {
        let sync = |s| job(Action::Synchronize, s, true);
        let closed = |s| job(Action::Closed, s, false);
        let terminating = Observed { terminating: true, ..env("d-1", 1) };
        let cases = [
            // (what, job, environment, removed at, decision)
            ("first event", sync(1), None, None, Decision::Create),
            ("newer commit", sync(2), Some(env("d-1", 1)), None, Decision::Apply),
            ("same second, other delivery", sync(1), Some(env("d-0", 1)), None, Decision::Apply),
            ("redelivery", sync(1), Some(env("d-1", 1)), None, Decision::Skip(Skip::Duplicate)),
            ("older synchronize after a newer one", sync(1), Some(env("d-2", 2)), None, Decision::Skip(Skip::Stale)),
            ("hand-made Environment", sync(1), Some(Observed::default()), None, Decision::Apply),
            ("closed", closed(3), Some(env("d-2", 2)), None, Decision::Delete),
            ("late closed after a reopening", closed(1), Some(env("d-2", 2)), None, Decision::Skip(Skip::Stale)),
            ("synchronize after closed", sync(2), None, Some(at(3)), Decision::Skip(Skip::RemovedLater)),
            ("synchronize of the closing second", sync(3), None, Some(at(3)), Decision::Skip(Skip::RemovedLater)),
            ("reopened", job(Action::Reopened, 4, true), None, Some(at(3)), Decision::Create),
            ("reopened in the closing second", job(Action::Reopened, 3, true), None, Some(at(3)), Decision::Create),
            ("new commit long after a removal", sync(9), None, Some(at(3)), Decision::Create),
            ("closed before opened", closed(3), None, None, Decision::RecordRemoval),
            ("closed again", closed(3), None, Some(at(3)), Decision::Skip(Skip::NothingToRemove)),
            ("older closed", closed(2), None, Some(at(3)), Decision::Skip(Skip::NothingToRemove)),
            ("never previewed", job(Action::Synchronize, 3, false), None, None, Decision::Skip(Skip::NothingToRemove)),
            ("new commit while deleted", sync(2), Some(terminating.clone()), None, Decision::Wait),
            ("closed while deleted", closed(2), Some(terminating.clone()), None, Decision::RecordRemoval),
            (
                "no preview while deleted",
                job(Action::Synchronize, 2, false),
                Some(terminating),
                None,
                Decision::Skip(Skip::NothingToRemove),
            ),
        ];
        for (what, job, env, removed_at, expected) in cases {
            assert_eq!(decide(&job, env.as_ref(), removed_at), expected, "{what}");
        }
    }

    #[test]
    fn a_newer_state_supersedes_an_older_one() {
        let older = job(Action::Synchronize, 1, true);
        let newer = job(Action::Synchronize, 2, true);
        assert!(newer.supersedes(&older) && !older.supersedes(&newer));
        assert!(older.supersedes(&older), "the later of two deliveries of one second wins");
    }

    #[test]
    fn actions_round_trip_through_their_names() {
        for action in Action::ALL {
            assert_eq!(Action::parse(action.as_str()), Some(action));
        }
        assert_eq!(Action::parse("assigned"), None);
    }
}
