//! Kubernetes Events for the controllers, published as kube's `Recorder` publishes them (an
//! `events.k8s.io/v1` Event per outcome; the same event again within six minutes counted in the
//! first one's `series`), with a small, bounded memory.
//!
//! kube's `Recorder` keeps a whole copy of every Event it published for six minutes, and sweeps
//! all of them on every publish. A burst of a few thousand Environments publishes tens of
//! thousands of Events: tens of megabytes held, and a sweep quadratic in the burst. This one
//! keeps, per recent event key, only the Event's name and its count, at most [`CAPACITY`] keys,
//! the oldest dropped first (a repeat of a dropped key starts a new Event, as one after six
//! minutes does).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};

/// The longest note the Events API takes.
const MAX_NOTE_BYTES: usize = 1024;

/// `text` in at most `max` bytes, cut on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// How long an Event can gain a series (kube's `Recorder`, and client-go, use six minutes).
const TTL: SignedDuration = SignedDuration::from_mins(6);
/// Event keys remembered at most.
pub const CAPACITY: usize = 1024;

/// What is kept of a recent Event: enough to count a repeat in its series.
struct Recent {
    name: String,
    namespace: String,
    count: i32,
    last: Timestamp,
}

#[derive(Default)]
struct Cache {
    recent: HashMap<u64, Recent>,
    /// Keys by the time they were last published, oldest first; an entry whose time no longer
    /// matches its key's is stale and skipped.
    order: VecDeque<(Timestamp, u64)>,
}

impl Cache {
    fn expire(&mut self, now: Timestamp) {
        while let Some(&(at, key)) = self.order.front() {
            let live = self.recent.get(&key).is_some_and(|recent| recent.last == at);
            if live && at + TTL > now && self.recent.len() <= CAPACITY {
                break;
            }
            self.order.pop_front();
            if live {
                self.recent.remove(&key);
            }
        }
    }
}

/// Publishes Events for one controller. Cheap to share; publishes from many tasks at once.
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("reporter", &self.reporter).finish_non_exhaustive()
    }
}

/// The key kube's `Recorder` deduplicates by: type, action, reason, reporter, and the whole
/// regarding and related references.
fn key(reporter: &Reporter, event: &Event, regarding: &ObjectReference) -> u64 {
    let mut hasher = DefaultHasher::new();
    event.type_.hash(&mut hasher);
    event.action.hash(&mut hasher);
    event.reason.hash(&mut hasher);
    reporter.hash(&mut hasher);
    let reference = |reference: &ObjectReference, hasher: &mut DefaultHasher| {
        reference.api_version.hash(hasher);
        reference.kind.hash(hasher);
        reference.namespace.hash(hasher);
        reference.name.hash(hasher);
        reference.uid.hash(hasher);
        reference.resource_version.hash(hasher);
        reference.field_path.hash(hasher);
    };
    reference(regarding, &mut hasher);
    if let Some(related) = &event.secondary {
        reference(related, &mut hasher);
    }
    hasher.finish()
}

impl Recorder {
    /// A recorder publishing as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { client, reporter, cache: Mutex::default() }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes an Event about `regarding` of `type_`, `action` and `reason`, with `note` cut
    /// to the 1 KiB the Events API takes. A failure is logged, not returned: an Event tells
    /// people what happened, and is never a reason to retry the work it reports.
    pub async fn record(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        action: &str,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(cut(note, MAX_NOTE_BYTES)),
            action: action.into(),
            secondary: None,
        };
        if let Err(err) = self.publish(&event, regarding).await {
            tracing::warn!(
                namespace = regarding.namespace.as_deref().unwrap_or_default(),
                name = regarding.name.as_deref().unwrap_or_default(),
                kind = regarding.kind.as_deref().unwrap_or_default(),
                reason,
                error = %err,
                "cannot record an event"
            );
        }
    }

    /// Publishes `event` about the object `regarding`: a new Event, or the series of the same
    /// event published within the last six minutes counted up.
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = key(&self.reporter, event, regarding);
        let repeat = {
            let mut cache = self.cache();
            cache.expire(now);
            cache.recent.get(&key).map(|recent| (recent.name.clone(), recent.namespace.clone(), recent.count + 1))
        };
        let (name, namespace, count) = match repeat {
            Some((name, namespace, count)) => {
                let series = EventSeries { count, last_observed_time: MicroTime(now) };
                let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                api.patch(&name, &PatchParams::default(), &Patch::Merge(serde_json::json!({ "series": series })))
                    .await?;
                (name, namespace, count)
            }
            None => {
                let created = self.generate(event, regarding, now);
                let namespace = created.metadata.namespace.clone().unwrap_or_default();
                let name = created.metadata.name.clone().unwrap_or_default();
                Api::<K8sEvent>::namespaced(self.client.clone(), &namespace)
                    .create(&PostParams::default(), &created)
                    .await?;
                (name, namespace, 1)
            }
        };
        let mut cache = self.cache();
        cache.recent.insert(key, Recent { name, namespace, count, last: now });
        cache.order.push_back((now, key));
        cache.expire(now);
        Ok(())
    }

    /// The Event kube's `Recorder` would create.
    fn generate(&self, event: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".to_owned());
        K8sEvent {
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            note: event.note.clone(),
            metadata: ObjectMeta {
                namespace: Some(namespace),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_ref().unwrap_or(&self.reporter.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter.instance.clone().unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some(match event.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            related: event.secondary.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with(keys: impl IntoIterator<Item = (u64, Timestamp)>) -> Cache {
        let mut cache = Cache::default();
        for (key, at) in keys {
            cache.recent.insert(key, Recent { name: format!("e{key}"), namespace: "ns".into(), count: 1, last: at });
            cache.order.push_back((at, key));
        }
        cache
    }

    #[test]
    fn keys_expire_after_six_minutes_and_past_the_capacity() {
        let start = Timestamp::from_second(1_700_000_000).unwrap();
        let mut cache = cache_with([(1, start), (2, start + SignedDuration::from_mins(1))]);
        cache.expire(start + SignedDuration::from_mins(5));
        assert_eq!(cache.recent.len(), 2);
        cache.expire(start + SignedDuration::from_secs(6 * 60 + 1));
        assert!(!cache.recent.contains_key(&1) && cache.recent.contains_key(&2));

        let mut full = cache_with((0..CAPACITY as u64 + 10).map(|key| (key, start)));
        full.expire(start);
        assert_eq!(full.recent.len(), CAPACITY);
        assert!(!full.recent.contains_key(&9) && full.recent.contains_key(&10), "the oldest go first");
    }

    #[test]
    fn a_note_is_cut_to_what_the_events_api_takes_on_a_character_boundary() {
        assert_eq!(cut("short".into(), MAX_NOTE_BYTES), "short");
        let long = "é".repeat(MAX_NOTE_BYTES);
        let note = cut(long, MAX_NOTE_BYTES);
        assert_eq!(note.len(), MAX_NOTE_BYTES, "1024 bytes hold 512 two-byte characters");
        assert_eq!(cut("aé".into(), 2), "a", "never half a character");
    }

    #[test]
    fn a_refreshed_key_outlives_its_first_publish() {
        let start = Timestamp::from_second(1_700_000_000).unwrap();
        let later = start + SignedDuration::from_mins(4);
        let mut cache = cache_with([(1, start)]);
        cache.recent.get_mut(&1).unwrap().last = later;
        cache.order.push_back((later, 1));
        cache.expire(start + SignedDuration::from_mins(7));
        assert_eq!(cache.recent[&1].last, later, "the stale order entry is skipped");
        cache.expire(later + SignedDuration::from_secs(6 * 60 + 1));
        assert!(cache.recent.is_empty());
    }

    #[test]
    fn the_key_is_kubes_dedup_key() {
        let reporter = Reporter { controller: "c".into(), instance: None };
        let event = |reason: &str| Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some("a note is not part of the key".into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let object = |rv: &str| ObjectReference {
            kind: Some("Environment".into()),
            namespace: Some("ns".into()),
            name: Some("env".into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        };
        let mut noted = event("Building");
        noted.note = Some("another note".into());
        assert_eq!(key(&reporter, &event("Building"), &object("1")), key(&reporter, &noted, &object("1")));
        assert_ne!(key(&reporter, &event("Building"), &object("1")), key(&reporter, &event("Ready"), &object("1")));
        assert_ne!(key(&reporter, &event("Building"), &object("1")), key(&reporter, &event("Building"), &object("2")));
    }
}
