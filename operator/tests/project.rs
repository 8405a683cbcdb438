//! The Project controller against a real kube-apiserver (testenv): Ready goes through each reason
//! as the CloudProvider, its readiness, the GitHub credentials Secret and the `secretRefs`
//! Secrets come, break and are fixed; `status.environments` follows the Environments; transitions
//! are events; no Secret value reaches the status, an event or a log line; and no Secret's data
//! reaches the controller but its GitHub credentials Secret's, read by name.

#[path = "support/logs.rs"]
mod logs;

use stagely_testenv::tap;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use stagely_api::v1alpha1::{CloudProvider, Environment, Project};
use stagely_operator::controllers::project::{self, Context};
use stagely_operator::metrics::{Metrics, ReconcileLabels};
use stagely_testenv::{ControlPlane, Options};

fn plane() -> &'static ControlPlane {
    stagely_testenv::shared(|| Options { crds: stagely_api::crds(), ..Options::default() })
}

/// What the controller's client received.
fn tapped() -> &'static tap::Tap {
    static TAP: OnceLock<tap::Tap> = OnceLock::new();
    TAP.get_or_init(tap::Tap::default)
}

/// The controller, once per test binary (two would both announce each transition), on a
/// runtime of its own that outlives each test's; and the metrics it counts into.
fn controller() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = Metrics::default();
        let counted = metrics.clone();
        let (started, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let client = tapped().client(plane().client().await.expect("client"));
                let ctx = Arc::new(Context::new(client, counted));
                started.send(()).unwrap();
                project::run(ctx, std::future::pending()).await;
            });
        });
        ready.recv().expect("the controller starts");
        metrics
    })
}

/// A namespace of its own, and the controller running against the control plane.
async fn setup(namespace: &str) -> (Client, &'static Metrics) {
    logs::capture();
    let metrics = controller();
    let client = plane().client().await.expect("client");
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    (client, metrics)
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        string_data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>()),
        ..Default::default()
    }
}

fn project(name: &str, secret_refs: &[&str]) -> Project {
    let refs: Vec<_> = secret_refs.iter().map(|n| json!({"name": n})).collect();
    let spec = serde_json::from_value(json!({
        "repository": "acme/shop",
        "cloudProviderRef": {"name": "cloud"},
        "previewDomain": "preview.example.com",
        "github": {"credentialsSecretRef": {"name": "github"}},
        "secretRefs": refs,
    }))
    .unwrap();
    Project::new(name, spec)
}

fn environment(name: &str, project: &str, number: i64) -> Environment {
    let spec = serde_json::from_value(json!({
        "projectRef": {"name": project},
        "pullRequest": {
            "number": number,
            "headSha": "9f2c1e0aa7d94f6d1a8f0e3c5b2d7e9f01234567",
            "headRef": "feature",
            "baseRef": "main",
        },
    }))
    .unwrap();
    Environment::new(name, spec)
}

/// Sets the CloudProvider's Ready condition as its controller would.
async fn set_provider_ready(api: &Api<CloudProvider>, status: &str, message: &str) {
    let patch = json!({"status": {"conditions": [{
        "type": "Ready", "status": status, "reason": "Test", "message": message,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }]}});
    api.patch_status("cloud", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
}

/// Waits until the Project's Ready condition has `reason`, and returns its status and message.
async fn wait_reason(api: &Api<Project>, name: &str, reason: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        let object = api.get(name).await.unwrap();
        if let Some(ready) = object.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready")) {
            if ready.reason == reason {
                return (ready.status.clone(), ready.message.clone());
            }
            last = Some(ready.clone());
        }
        assert!(Instant::now() < deadline, "Ready never had reason {reason}; last: {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `status.environments` is `count`.
async fn wait_environments(api: &Api<Project>, name: &str, count: i32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = api.get(name).await.unwrap().status;
        if status.as_ref().and_then(|s| s.environments) == Some(count) {
            return;
        }
        assert!(Instant::now() < deadline, "environments never became {count}: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times each reason was recorded as an event (a repeated event counts each time).
async fn event_counts(client: &Client, namespace: &str) -> BTreeMap<String, i32> {
    let events = Api::<Event>::namespaced(client.clone(), namespace).list(&ListParams::default()).await.unwrap();
    let mut counts = BTreeMap::new();
    for event in events.items {
        let times = event.series.as_ref().map_or(1, |s| s.count);
        *counts.entry(event.reason.unwrap_or_default()).or_default() += times;
    }
    counts
}

async fn events_text(client: &Client, namespace: &str) -> String {
    let events = Api::<Event>::namespaced(client.clone(), namespace).list(&ListParams::default()).await.unwrap();
    events.items.iter().map(|e| serde_json::to_string(e).unwrap()).collect::<Vec<_>>().join("\n")
}

/// Waits until `reason` was recorded `times` times.
async fn wait_events(client: &Client, namespace: &str, reason: &str, times: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = event_counts(client, namespace).await;
        if counts.get(reason).copied().unwrap_or_default() >= times {
            return;
        }
        assert!(Instant::now() < deadline, "{reason} not recorded {times} times: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const NEEDS: &str = "it needs webhookSecret, and either token or appId, installationId and privateKey";

#[tokio::test]
async fn ready_goes_through_each_reason_as_references_come_break_and_are_fixed() {
    let ns = "proj-ready";
    let (client, metrics) = setup(ns).await;
    let projects = Api::<Project>::namespaced(client.clone(), ns);
    let providers = Api::<CloudProvider>::namespaced(client.clone(), ns);
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let token = "ghp_ProjectTestToken0123456789abcdef";
    let webhook_secret = "whsec-project-test-0123456789";
    let private_key = "-----BEGIN RSA PRIVATE KEY-----project-test";
    let database_url = "postgres://shop:db-password-0123456789@db/shop";

    projects.create(&PostParams::default(), &project("shop", &["db", "api"])).await.unwrap();
    let (status, message) = wait_reason(&projects, "shop", "CloudProviderNotFound").await;
    assert_eq!(status, "False");
    assert_eq!(
        message,
        format!(
            "CloudProvider {ns}/cloud (spec.cloudProviderRef) not found; Secret {ns}/github \
             (spec.github.credentialsSecretRef) not found; {NEEDS}; Secrets {ns}/db and {ns}/api (spec.secretRefs) \
             not found"
        )
    );

    // The CloudProvider: created (not checked yet), rejected, accepted.
    let spec = serde_json::from_value(json!({"type": "local"})).unwrap();
    providers.create(&PostParams::default(), &CloudProvider::new("cloud", spec)).await.unwrap();
    let (_, message) = wait_reason(&projects, "shop", "CloudProviderNotReady").await;
    assert!(message.starts_with(&format!("CloudProvider {ns}/cloud has not been checked yet; ")), "{message}");
    set_provider_ready(&providers, "False", "AWS rejected the credentials: AuthFailure").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, message) = wait_reason(&projects, "shop", "CloudProviderNotReady").await;
        if message
            .starts_with(&format!("CloudProvider {ns}/cloud is not ready: AWS rejected the credentials: AuthFailure; "))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{message}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_provider_ready(&providers, "True", "agents run as processes on the operator's host").await;
    let (_, message) = wait_reason(&projects, "shop", "GitHubSecretNotFound").await;
    assert!(message.starts_with(&format!("Secret {ns}/github (spec.github.credentialsSecretRef) not found; {NEEDS}")));

    // The GitHub Secret: a token without the webhook secret, then complete.
    secrets.create(&PostParams::default(), &secret("github", &[("token", token)])).await.unwrap();
    let (_, message) = wait_reason(&projects, "shop", "GitHubSecretIncomplete").await;
    assert_eq!(
        message,
        format!(
            "Secret {ns}/github (spec.github.credentialsSecretRef) has no webhookSecret; {NEEDS}; \
             Secrets {ns}/db and {ns}/api (spec.secretRefs) not found"
        )
    );
    let patch = json!({"stringData": {"webhookSecret": webhook_secret}});
    secrets.patch("github", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let (_, message) = wait_reason(&projects, "shop", "SecretNotFound").await;
    assert_eq!(message, format!("Secrets {ns}/db and {ns}/api (spec.secretRefs) not found"));

    // The secretRefs Secrets, one at a time.
    secrets.create(&PostParams::default(), &secret("db", &[("DATABASE_URL", database_url)])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, message) = wait_reason(&projects, "shop", "SecretNotFound").await;
        if message == format!("Secret {ns}/api (spec.secretRefs) not found") {
            break;
        }
        assert!(Instant::now() < deadline, "{message}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    secrets.create(&PostParams::default(), &secret("api", &[("API_KEY", "api-key-0123456789")])).await.unwrap();
    let (status, message) = wait_reason(&projects, "shop", "ReferencesFound").await;
    assert_eq!(status, "True");
    assert_eq!(
        message,
        "CloudProvider cloud is ready, Secret github holds a token and a webhook secret, and its 2 secretRefs \
         Secrets exist; whether GitHub accepts the credentials is not checked"
    );
    let object = projects.get("shop").await.unwrap();
    assert_eq!(object.status.as_ref().unwrap().observed_generation, object.metadata.generation);

    // Broken and fixed again: a secretRefs Secret deleted and recreated.
    secrets.delete("db", &DeleteParams::default()).await.unwrap();
    let (_, message) = wait_reason(&projects, "shop", "SecretNotFound").await;
    assert_eq!(message, format!("Secret {ns}/db (spec.secretRefs) not found"));
    secrets.create(&PostParams::default(), &secret("db", &[("DATABASE_URL", database_url)])).await.unwrap();
    wait_reason(&projects, "shop", "ReferencesFound").await;

    // The GitHub Secret switched to an App, half done, then complete.
    let app = secret("github", &[("webhookSecret", webhook_secret), ("appId", "12345"), ("privateKey", private_key)]);
    secrets.replace("github", &PostParams::default(), &app).await.unwrap();
    let (_, message) = wait_reason(&projects, "shop", "GitHubSecretIncomplete").await;
    assert_eq!(
        message,
        format!("Secret {ns}/github (spec.github.credentialsSecretRef) has no installationId; {NEEDS}")
    );
    let patch = json!({"stringData": {"installationId": "678"}});
    secrets.patch("github", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let (_, message) = wait_reason(&projects, "shop", "ReferencesFound").await;
    assert!(message.contains("Secret github holds GitHub App credentials and a webhook secret"), "{message}");

    // The CloudProvider turning unready is noticed too, quoting its message.
    set_provider_ready(&providers, "False", "Hetzner rejected the credentials: unable to authenticate").await;
    let (_, message) = wait_reason(&projects, "shop", "CloudProviderNotReady").await;
    assert_eq!(
        message,
        format!("CloudProvider {ns}/cloud is not ready: Hetzner rejected the credentials: unable to authenticate")
    );
    providers.delete("cloud", &DeleteParams::default()).await.unwrap();
    wait_reason(&projects, "shop", "CloudProviderNotFound").await;

    // Every transition is an event a user sees in `kubectl describe`.
    for reason in [
        "CloudProviderNotFound",
        "CloudProviderNotReady",
        "GitHubSecretNotFound",
        "GitHubSecretIncomplete",
        "SecretNotFound",
        "ReferencesFound",
    ] {
        wait_events(&client, ns, reason, 1).await;
    }

    // No Secret value anywhere a user or a log collector can read.
    let status = serde_json::to_string(&projects.get("shop").await.unwrap().status).unwrap();
    let events = events_text(&client, ns).await;
    let logs = logs::text();
    assert!(logs.contains("project readiness changed"), "the controller logs its transitions: {logs}");
    for leak in [token, webhook_secret, private_key, database_url, "api-key-0123456789"] {
        assert!(!status.contains(leak), "status leaks a secret: {status}");
        assert!(!events.contains(leak), "events leak a secret: {events}");
        assert!(!logs.contains(leak), "logs leak a secret");
    }
    let ok = ReconcileLabels { controller: "project".into(), outcome: "ok".into() };
    assert!(metrics.reconciles.get_or_create(&ok).get() > 0, "reconciles are counted");
}

#[tokio::test]
async fn environments_are_counted_and_events_come_on_transitions_only() {
    let ns = "proj-envs";
    let (client, _) = setup(ns).await;
    let projects = Api::<Project>::namespaced(client.clone(), ns);
    let environments = Api::<Environment>::namespaced(client.clone(), ns);
    projects.create(&PostParams::default(), &project("shop", &[])).await.unwrap();
    projects.create(&PostParams::default(), &project("other", &[])).await.unwrap();
    wait_reason(&projects, "shop", "CloudProviderNotFound").await;
    wait_environments(&projects, "shop", 0).await;

    environments.create(&PostParams::default(), &environment("shop-pr-1", "shop", 1)).await.unwrap();
    environments.create(&PostParams::default(), &environment("shop-pr-2", "shop", 2)).await.unwrap();
    environments.create(&PostParams::default(), &environment("other-pr-1", "other", 1)).await.unwrap();
    wait_environments(&projects, "shop", 2).await;
    wait_environments(&projects, "other", 1).await;
    environments.delete("shop-pr-1", &DeleteParams::default()).await.unwrap();
    wait_environments(&projects, "shop", 1).await;

    // An Environment of a Project created after it is counted too.
    environments.create(&PostParams::default(), &environment("late-pr-7", "late", 7)).await.unwrap();
    projects.create(&PostParams::default(), &project("late", &[])).await.unwrap();
    wait_environments(&projects, "late", 1).await;

    // Those reconciles changed the count, not Ready: still one event per Project.
    wait_events(&client, ns, "CloudProviderNotFound", 3).await;
    let counts = event_counts(&client, ns).await;
    assert_eq!(counts.get("CloudProviderNotFound"), Some(&3), "{counts:?}: {}", events_text(&client, ns).await);

    // A spec change is observed.
    let patch = json!({"spec": {"ttl": "48h"}});
    projects.patch("shop", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let object = projects.get("shop").await.unwrap();
        let observed = object.status.as_ref().and_then(|s| s.observed_generation);
        if observed == object.metadata.generation && observed == Some(2) {
            let ready = object.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap();
            assert_eq!(ready.observed_generation, Some(2));
            break;
        }
        assert!(Instant::now() < deadline, "generation 2 never observed: {:?}", object.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(event_counts(&client, ns).await.get("CloudProviderNotFound"), Some(&3));
}

/// Secrets reach the controller by their metadata only: the watch brings every Secret's name and
/// none of their data (an unrelated Secret's value never arrives at all), and the GitHub
/// credentials Secret is read by name for its key names.
#[tokio::test]
async fn secrets_are_watched_by_metadata_and_the_github_secret_read_by_name() {
    let (client, _) = setup("project-tap").await;
    let tap = tapped();
    let secrets = Api::<Secret>::namespaced(client.clone(), "project-tap");
    let projects = Api::<Project>::namespaced(client.clone(), "project-tap");
    let unrelated = "unrelated-value-not-for-the-operator-42";
    let token = "ghp-token-read-by-name-only-0123";
    secrets.create(&PostParams::default(), &secret("unrelated", &[("password", unrelated)])).await.unwrap();
    let github = secret("github", &[("token", token), ("webhookSecret", "whsec")]);
    secrets.create(&PostParams::default(), &github).await.unwrap();
    projects.create(&PostParams::default(), &project("shop", &[])).await.unwrap();

    tap.wait_watched_and_read(unrelated, ("project-tap", "github"), token).await;
    // The CloudProvider is missing, and nothing else: the Secret's key names were read.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, message) = wait_reason(&projects, "shop", "CloudProviderNotFound").await;
        if message == "CloudProvider project-tap/cloud (spec.cloudProviderRef) not found" {
            break;
        }
        assert!(Instant::now() < deadline, "{message}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tap.assert_never_carried(unrelated, |_| false);
    tap.assert_never_carried(token, |r| tap::secret_read(r, "project-tap", "github"));
}
