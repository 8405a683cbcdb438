//! Keeps the webhook secrets Secret ([`stagely_api::webhook_secrets`]): the `webhookSecret` of
//! each GitHub credentials Secret a Project references, in one Secret the webhook receiver alone
//! reads, so that the receiver needs no grant on the teams' Secrets.
//!
//! The Project controller reads each credentials Secret when it changes (it checks its keys);
//! this keeps what it read, and after every change of a Project, of a Secret or of what was read,
//! writes the whole Secret by server-side apply when its content would change: a key appears when
//! a Project references a Secret holding a `webhookSecret`, changes when the Secret does, and goes
//! with the last Project referencing it or with the Secret. Until a referenced Secret has been
//! read (after a restart), its key keeps the value the Secret already holds, so deliveries keep
//! verifying while the operator starts. No value reaches a log line or an event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};
use stagely_api::backoff::Backoff;
use stagely_api::webhook_secrets::{self, SecretLocation};
use tokio::sync::Notify;

/// The field manager of the webhook secrets Secret.
pub const MANAGER: &str = "stagely-webhook-secrets";

/// The first and the longest wait before a failed write is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A credentials Secret: (namespace, name).
pub type SecretKey = (String, String);

/// What was read of a credentials Secret: its `webhookSecret`, if it holds a non-empty one.
/// No `Debug`: it holds the secret.
pub type Read = Option<Arc<[u8]>>;

/// The mirror: where it writes, what was read, and its wake-up call.
pub struct Mirror {
    location: SecretLocation,
    read: Mutex<HashMap<SecretKey, Read>>,
    changed: Notify,
}

impl Mirror {
    /// A mirror writing to `location`.
    pub fn new(location: SecretLocation) -> Self {
        Self { location, read: Mutex::default(), changed: Notify::new() }
    }

    /// Records what a read of the credentials Secret `key` found (`None`: the Secret is gone).
    pub fn record(&self, key: SecretKey, read: Option<Read>) {
        let mut known = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match read {
            Some(read) => known.insert(key, read.clone()).is_none_or(|old| old != read),
            None => known.remove(&key).is_some(),
        };
        drop(known);
        if changed {
            self.wake();
        }
    }

    /// Asks for the Secret to be brought up to date.
    pub fn wake(&self) {
        self.changed.notify_one();
    }

    /// Keeps the Secret up to date with `referenced()` (each credentials Secret some Project
    /// references and that exists). Call it once the stores `referenced` reads
    /// have listed. It runs until dropped.
    pub async fn keep(&self, client: Client, referenced: impl Fn() -> BTreeSet<SecretKey>) {
        let api = Api::<Secret>::namespaced(client, &self.location.namespace);
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        // What the Secret holds, as last read or written; `None` until read.
        let mut written: Option<BTreeMap<String, ByteString>> = None;
        loop {
            let outcome = match &written {
                None => api.get_opt(&self.location.name).await.map(|secret| {
                    written = Some(secret.and_then(|s| s.data).unwrap_or_default());
                    true
                }),
                Some(current) => {
                    let wanted = {
                        let read = self.read.lock().unwrap_or_else(|e| e.into_inner());
                        desired(&referenced(), &read, current)
                    };
                    if &wanted == current {
                        Ok(false)
                    } else {
                        let keys = wanted.len();
                        let result = self.write(&api, &wanted).await;
                        if result.is_ok() {
                            tracing::info!(secret = %self.location, keys, "updated the webhook secrets Secret");
                            written = Some(wanted);
                            backoff.reset();
                        }
                        result.map(|()| true)
                    }
                }
            };
            let retry = match outcome {
                // Read, or written: look again at once (more may have changed meanwhile). A read
                // is no success yet: a write refused again waits longer each time.
                Ok(true) => continue,
                Ok(false) => {
                    backoff.reset();
                    None
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(secret = %self.location, error = %err, retry_in = ?delay,
                        "failed to update the webhook secrets Secret; retrying");
                    // A write refused for a stale view (someone else changed it) reads it again.
                    written = None;
                    Some(delay)
                }
            };
            tokio::select! {
                () = self.changed.notified() => {}
                () = sleep(retry) => {}
            }
        }
    }

    async fn write(&self, api: &Api<Secret>, data: &BTreeMap<String, ByteString>) -> Result<(), kube::Error> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.location.name.clone()),
                namespace: Some(self.location.namespace.clone()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data.clone()),
            ..Secret::default()
        };
        // k8s-openapi writes `apiVersion` and `kind`, as an apply needs. Only the data (and the
        // type) are the operator's: no labels, which the chart's own apply of the Secret owns (a
        // label applied here too conflicts with `helm upgrade`).
        api.patch(&self.location.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&secret)).await?;
        Ok(())
    }
}

/// Waits `delay`; without one, forever.
async fn sleep(delay: Option<Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}

/// The Secret's data: for each `referenced` credentials Secret, its `webhookSecret` as `read`,
/// or as `current` holds it while the Secret is not read yet; nothing for a Secret read without
/// one, or no longer referenced.
pub fn desired(
    referenced: &BTreeSet<SecretKey>,
    read: &HashMap<SecretKey, Read>,
    current: &BTreeMap<String, ByteString>,
) -> BTreeMap<String, ByteString> {
    referenced
        .iter()
        .filter_map(|secret| {
            let key = webhook_secrets::key(&secret.0, &secret.1);
            let value = match read.get(secret) {
                Some(read) => ByteString(read.as_deref()?.to_vec()),
                None => current.get(&key)?.clone(),
            };
            Some((key, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(namespace: &str, name: &str) -> SecretKey {
        (namespace.to_owned(), name.to_owned())
    }

    fn bytes(value: &str) -> ByteString {
        ByteString(value.as_bytes().to_vec())
    }

    #[test]
    fn each_referenced_secret_read_gives_its_webhook_secret_under_its_key() {
        let referenced = [secret("team-a", "github"), secret("team-b", "github")].into();
        let read = [
            (secret("team-a", "github"), Some(Arc::from(&b"one"[..]))),
            (secret("team-b", "github"), Some(Arc::from(&b"two"[..]))),
        ]
        .into();
        let data = desired(&referenced, &read, &BTreeMap::new());
        assert_eq!(data, [("team-a_github".into(), bytes("one")), ("team-b_github".into(), bytes("two"))].into());
    }

    #[test]
    fn a_secret_without_a_webhook_secret_or_no_longer_referenced_has_no_key() {
        let referenced = [secret("team-a", "github")].into();
        let read = [(secret("team-a", "github"), None), (secret("team-a", "old"), Some(Arc::from(&b"x"[..])))].into();
        let current = [("team-a_github".into(), bytes("stale")), ("team-a_old".into(), bytes("x"))].into();
        assert_eq!(desired(&referenced, &read, &current), BTreeMap::new());
    }

    #[test]
    fn a_secret_not_read_yet_keeps_what_the_secret_holds() {
        let referenced = [secret("team-a", "github"), secret("team-a", "new")].into();
        let current = [("team-a_github".into(), bytes("kept"))].into();
        assert_eq!(desired(&referenced, &HashMap::new(), &current), [("team-a_github".into(), bytes("kept"))].into());
    }

    #[test]
    fn a_read_replaces_the_value_held() {
        let referenced = [secret("team-a", "github")].into();
        let read = [(secret("team-a", "github"), Some(Arc::from(&b"rotated"[..])))].into();
        let current = [("team-a_github".into(), bytes("old"))].into();
        assert_eq!(desired(&referenced, &read, &current), [("team-a_github".into(), bytes("rotated"))].into());
    }
}
