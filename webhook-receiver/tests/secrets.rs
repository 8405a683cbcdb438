//! What the receiver reads of Secrets, against the real control plane: every Secret's metadata
//! by a watch, and by name only the credentials Secrets Projects reference. A rotated webhook
//! secret, a Project switching Secrets and a deleted Secret are followed without a restart.
//!
//! The receivers watch the whole cluster, so each also reads the other tests' referenced
//! Secrets; what each test asserts is about its own namespace.

mod support;

use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use stagely_testenv::tap::{self, Tap};
use support::payloads::{self, Pr, sha};
use support::{Receiver, Team, delivery, plane, wait_for};

/// The status of the answer to a `ping` for `repository` signed with `secret`: 200 when a
/// Project bound to it verifies the signature, else 401.
async fn ping(receiver: &Receiver, repository: &str, secret: &str) -> u16 {
    receiver.deliver("ping", &delivery(), secret, &payloads::ping(repository)).await.status
}

/// Waits until a `ping` for `repository` signed with `secret` gets `status`.
async fn wait_ping(receiver: &Receiver, repository: &str, secret: &str, status: u16) {
    wait_for(&format!("a ping signed with {secret:?} to get {status}"), || async {
        (ping(receiver, repository, secret).await == status).then_some(())
    })
    .await
}

/// Sets the `webhookSecret` of the Secret `name`; returns its new `resourceVersion`.
async fn set_webhook_secret(team: &Team, name: &str, value: &str) -> String {
    let patch = Patch::Merge(json!({"stringData": {"webhookSecret": value}}));
    let secret = team.secrets().patch(name, &PatchParams::default(), &patch).await.unwrap();
    secret.metadata.resource_version.unwrap()
}

/// How many times the receiver behind `tap` read the Secret `namespace/name`.
fn reads(tap: &Tap, namespace: &str, name: &str) -> usize {
    tap.responses().iter().filter(|r| tap::secret_read(r, namespace, name)).count()
}

#[tokio::test]
async fn no_unreferenced_secrets_data_reaches_the_receiver_and_the_referenced_one_verifies() {
    let team = Team::new(plane(), "secrets-tap").await;
    let unrelated = "unrelated-value-not-for-the-receiver-42";
    let webhook_secret = "tap-webhook-secret-read-by-name-7";
    team.secret("unrelated", &[("password", unrelated)]).await;
    team.project("shop", "acme/tap", webhook_secret, json!({})).await;
    let tap = Tap::default();
    let receiver = Receiver::start(tap.client(team.client.clone()), &[]).await;
    tap.wait_watched_and_read(unrelated, ("secrets-tap", "shop-github"), webhook_secret).await;

    let opened = payloads::pull_request("opened", &Pr::new("acme/tap", 1));
    let answer = receiver.deliver("pull_request", &delivery(), webhook_secret, &opened).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    team.wait_for_head("shop-pr-1", &sha(1)).await;

    // A change of the unrelated Secret comes by the watch as metadata, and is not read.
    let changed = "unrelated-changed-value-not-for-the-receiver-43";
    let patch = Patch::Merge(json!({"stringData": {"password": changed}}));
    let version = team.secrets().patch("unrelated", &PatchParams::default(), &patch).await.unwrap().metadata;
    let version = format!("\"resourceVersion\":\"{}\"", version.resource_version.unwrap());
    wait_for("the watch to show the unrelated Secret's change", || async {
        tap.carried(tap::secrets_list_or_watch, &version).then_some(())
    })
    .await;

    tap.assert_never_carried(unrelated, |_| false);
    tap.assert_never_carried(changed, |_| false);
    tap.assert_never_carried(webhook_secret, |r| tap::secret_read(r, "secrets-tap", "shop-github"));
    assert_eq!(reads(&tap, "secrets-tap", "unrelated"), 0, "the unrelated Secret was read by name");
    assert_eq!(reads(&tap, "secrets-tap", "shop-github"), 1, "the referenced Secret is read once while unchanged");
}

#[tokio::test]
async fn a_rotated_webhook_secret_is_picked_up_and_the_old_one_refused() {
    let team = Team::new(plane(), "secrets-rotation").await;
    team.project("shop", "acme/rotation", "before-rotation", json!({})).await;
    let tap = Tap::default();
    let receiver = Receiver::start(tap.client(team.client.clone()), &[]).await;
    assert_eq!(ping(&receiver, "acme/rotation", "before-rotation").await, 200);
    assert_eq!(ping(&receiver, "acme/rotation", "after-rotation").await, 401);

    set_webhook_secret(&team, "shop-github", "after-rotation").await;
    wait_ping(&receiver, "acme/rotation", "after-rotation", 200).await;
    assert_eq!(ping(&receiver, "acme/rotation", "before-rotation").await, 401);
    let opened = payloads::pull_request("opened", &Pr::new("acme/rotation", 4));
    let answer = receiver.deliver("pull_request", &delivery(), "after-rotation", &opened).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    team.wait_for_head("shop-pr-4", &sha(1)).await;
    // Once when the receiver started, once for the new version: no read per delivery.
    assert_eq!(reads(&tap, "secrets-rotation", "shop-github"), 2);

    // A value written with a trailing newline (`--from-file` of an `echo`ed file) verifies as
    // the secret GitHub signs with, without it.
    set_webhook_secret(&team, "shop-github", "with-newline\n").await;
    wait_ping(&receiver, "acme/rotation", "with-newline", 200).await;
    assert_eq!(ping(&receiver, "acme/rotation", "with-newline\n").await, 401);
}

#[tokio::test]
async fn a_project_switching_its_credentials_secret_is_verified_with_the_new_one() {
    let team = Team::new(plane(), "secrets-switch").await;
    team.project("shop", "acme/switch", "first-secret", json!({})).await;
    team.secret("second-github", &[("webhookSecret", "second-secret")]).await;
    let receiver = Receiver::start(team.client.clone(), &[]).await;
    assert_eq!(ping(&receiver, "acme/switch", "first-secret").await, 200);
    assert_eq!(ping(&receiver, "acme/switch", "second-secret").await, 401);

    let switch = |secret: &'static str| {
        let projects = team.projects();
        async move {
            let patch = Patch::Merge(json!({"spec": {"github": {"credentialsSecretRef": {"name": secret}}}}));
            projects.patch("shop", &PatchParams::default(), &patch).await.unwrap();
        }
    };
    switch("second-github").await;
    wait_ping(&receiver, "acme/switch", "second-secret", 200).await;
    assert_eq!(ping(&receiver, "acme/switch", "first-secret").await, 401);

    // Back to the first Secret, which was forgotten meanwhile and is read again.
    switch("shop-github").await;
    wait_ping(&receiver, "acme/switch", "first-secret", 200).await;
    assert_eq!(ping(&receiver, "acme/switch", "second-secret").await, 401);

    // A deleted Secret verifies nothing any more.
    team.secrets().delete("shop-github", &DeleteParams::default()).await.unwrap();
    wait_ping(&receiver, "acme/switch", "first-secret", 401).await;
}
