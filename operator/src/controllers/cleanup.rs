//! When a finalizer's cleanup that keeps failing may stop trying, and how soon it tries again:
//! one policy for every Stagely finalizer (Environment, BuildJob, GitHub feedback,
//! CloudProvider), so that no object hangs in deletion forever.
//!
//! A failing cleanup is retried with a backoff that grows with the time since deletion began;
//! it gives up after its deadline, or at once when an admin sets [`keys::ABANDON_CLEANUP`]. What
//! is left is then said in an Event, and VMs left behind are found again by the orphan sweep
//! (they carry their owner's tag).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use stagely_api::keys;

/// The first retry's wait.
const FIRST_RETRY: Duration = Duration::from_secs(2);
/// The longest wait between two tries.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// How long the object has been in deletion (zero if it is not).
pub fn deleting_for(meta: &ObjectMeta, now: Timestamp) -> Duration {
    meta.deletion_timestamp
        .as_ref()
        .and_then(|since| Duration::try_from(now.duration_since(since.0)).ok())
        .unwrap_or(Duration::ZERO)
}

/// Why the cleanup of an object in deletion stops trying, if it should: the admin's annotation,
/// or `deadline` passed since deletion began.
pub fn give_up(meta: &ObjectMeta, deadline: Duration, now: Timestamp) -> Option<String> {
    if meta.annotations.as_ref().is_some_and(|a| a.contains_key(keys::ABANDON_CLEANUP)) {
        return Some(format!("an admin set {}", keys::ABANDON_CLEANUP));
    }
    let waited = deleting_for(meta, now);
    (meta.deletion_timestamp.is_some() && waited >= deadline)
        .then(|| format!("still failing {}s after deletion began", waited.as_secs()))
}

/// How soon a cleanup that failed tries again: a tenth of the time it has been failing, from
/// 2 s up to a minute (2 s for the first 20 s, a minute after 10 minutes).
pub fn retry_after(meta: &ObjectMeta, now: Timestamp) -> Duration {
    (deleting_for(meta, now) / 10).clamp(FIRST_RETRY, MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    fn meta(deleted_ago: Option<i64>, abandon: bool) -> (ObjectMeta, Timestamp) {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let meta = ObjectMeta {
            deletion_timestamp: deleted_ago.map(|s| Time(now - SignedDuration::from_secs(s))),
            annotations: abandon.then(|| BTreeMap::from([(keys::ABANDON_CLEANUP.to_owned(), "true".to_owned())])),
            ..ObjectMeta::default()
        };
        (meta, now)
    }

    #[test]
    fn cleanup_gives_up_after_its_deadline_or_when_an_admin_says_so() {
        let deadline = Duration::from_secs(600);
        let cases = [
            (None, false, None, "not in deletion"),
            (Some(30), false, None, "trying"),
            (Some(599), false, None, "just before the deadline"),
            (Some(600), false, Some("still failing 600s after deletion began"), "at the deadline"),
            (Some(5), true, Some("an admin set stagely.dev/abandon-cleanup"), "the admin's annotation"),
        ];
        for (ago, abandon, expected, case) in cases {
            let (meta, now) = meta(ago, abandon);
            assert_eq!(give_up(&meta, deadline, now).as_deref(), expected, "{case}");
        }
    }

    #[test]
    fn retries_back_off_from_two_seconds_to_a_minute() {
        let waits: Vec<u64> = [0, 10, 30, 120, 599, 3600]
            .into_iter()
            .map(|ago| {
                let (meta, now) = meta(Some(ago), false);
                retry_after(&meta, now).as_secs()
            })
            .collect();
        assert_eq!(waits, [2, 2, 3, 12, 59, 60]);
    }
}
