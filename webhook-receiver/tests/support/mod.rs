//! What the receiver's tests share: the real control plane, a namespace per test with its
//! Project and credentials Secret, the receiver itself (in process, on loopback ports), and
//! signed deliveries of schema-checked payloads over real HTTP.

#![allow(dead_code)]

pub mod http;
pub mod payloads;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::Value;
use stagely_api::v1alpha1::{Environment, Project};
use stagely_testenv::{ControlPlane, Options};
use stagely_webhook_receiver::github::sign;
use stagely_webhook_receiver::server::WEBHOOK_PATH;
use stagely_webhook_receiver::{Config, Listeners};

pub use self::http::Response;

/// How long a test waits for a condition.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The control plane every test of a test binary shares.
pub fn plane() -> &'static ControlPlane {
    stagely_testenv::shared(|| Options { crds: stagely_api::crds(), ..Options::default() })
}

/// A namespace of its own for one test.
pub struct Team {
    /// The namespace.
    pub namespace: String,
    /// A client.
    pub client: Client,
}

impl Team {
    /// Creates `namespace`.
    pub async fn new(plane: &ControlPlane, namespace: &str) -> Self {
        let client = plane.client().await.expect("a client");
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
        Self { namespace: namespace.into(), client }
    }

    /// Creates the Secret `name` holding `data`.
    pub async fn secret(&self, name: &str, data: &[(&str, &str)]) -> Secret {
        let secret = Secret {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            string_data: Some(data.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()),
            ..Default::default()
        };
        self.secrets().create(&PostParams::default(), &secret).await.unwrap()
    }

    /// Creates Project `name` bound to `repository` with `trigger` (JSON), and its credentials
    /// Secret `<name>-github` whose `webhookSecret` is `secret`.
    pub async fn project(&self, name: &str, repository: &str, secret: &str, trigger: Value) -> Project {
        let credentials = format!("{name}-github");
        self.secret(&credentials, &[("token", "ghp_not_used_by_the_receiver"), ("webhookSecret", secret)]).await;
        let project: Project = serde_json::from_value(serde_json::json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "Project",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "repository": repository,
                "cloudProviderRef": {"name": "local"},
                "previewDomain": "preview.example.com",
                "github": {"credentialsSecretRef": {"name": credentials}},
                "trigger": trigger,
            },
        }))
        .unwrap();
        Api::<Project>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &project)
            .await
            .unwrap()
    }

    /// The Secrets of this namespace.
    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The Environments of this namespace.
    pub fn environments(&self) -> Api<Environment> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The Projects of this namespace.
    pub fn projects(&self) -> Api<Project> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The Environment `name`, if it exists.
    pub async fn environment(&self, name: &str) -> Option<Environment> {
        self.environments().get_opt(name).await.unwrap()
    }

    /// Waits until the Environment `name` exists at head `sha`.
    pub async fn wait_for_head(&self, name: &str, sha: &str) -> Environment {
        let what = format!("Environment {}/{name} at {sha}", self.namespace);
        wait_for(&what, || async { self.environment(name).await.filter(|env| env.spec.pull_request.head_sha == sha) })
            .await
    }

    /// Waits until the Environment `name` is gone (or being deleted: nothing here removes
    /// finalizers, and no operator runs).
    pub async fn wait_gone(&self, name: &str) {
        let what = format!("Environment {}/{name} to be deleted", self.namespace);
        wait_for(&what, || async {
            match self.environment(name).await {
                None => Some(()),
                Some(env) => env.metadata.deletion_timestamp.map(|_| ()),
            }
        })
        .await
    }
}

/// Calls `check` until it returns `Some`, for at most [`DEADLINE`].
pub async fn wait_for<T, F: Future<Output = Option<T>>>(what: &str, check: impl FnMut() -> F) -> T {
    stagely_testenv::server::eventually(what, DEADLINE, check).await
}

/// A receiver running in this test's runtime; stopped when dropped.
pub struct Receiver {
    /// The webhook address.
    pub addr: SocketAddr,
    /// The operations address.
    pub ops: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts the receiver with `args` (flags as on its command line) and waits until it is
    /// ready.
    pub async fn start(client: Client, args: &[&str]) -> Self {
        let config = Config::try_parse_from(std::iter::once("stagely-webhook-receiver").chain(args.iter().copied()))
            .expect("valid flags");
        let listeners = Listeners {
            webhooks: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            ops: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let (addr, ops) = (listeners.webhooks.local_addr().unwrap(), listeners.ops.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            stagely_webhook_receiver::serve(config, client, listeners, shutdown).await.expect("the receiver serves");
        });
        let receiver = Self { addr, ops, stop: Some(stop), task };
        wait_for("the receiver to be ready", || async { (receiver.get("/readyz").await.status == 200).then_some(()) })
            .await;
        receiver
    }

    /// Stops the receiver, letting its queued writes finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap();
    }

    /// `GET path` on the operations address.
    pub async fn get(&self, path: &str) -> Response {
        let request = format!("GET {path} HTTP/1.1\r\nHost: receiver\r\nConnection: close\r\n\r\n");
        http::exchange(self.ops, request.as_bytes(), false).await.expect("a response")
    }

    /// Delivers `payload` as `event` with id `delivery`, signed with `secret`, after checking
    /// it against GitHub's schema.
    pub async fn deliver(&self, event: &str, delivery: &str, secret: &str, payload: &Value) -> Response {
        payloads::assert_valid(event, payload);
        let body = payload.to_string();
        let signature = sign(secret.as_bytes(), body.as_bytes());
        self.post(
            &[("X-GitHub-Event", event), ("X-GitHub-Delivery", delivery), ("X-Hub-Signature-256", &signature)],
            body.as_bytes(),
        )
        .await
    }

    /// Posts `body` with `headers` to the webhook path.
    pub async fn post(&self, headers: &[(&str, &str)], body: &[u8]) -> Response {
        http::post(self.addr, WEBHOOK_PATH, headers, body).await
    }

    /// The value of every sample of the metric family `name` (e.g.
    /// `stagely_webhook_environment_writes_total`), by its labels as written.
    pub async fn metric(&self, name: &str) -> BTreeMap<String, f64> {
        let text = self.get("/metrics").await.body;
        text.lines()
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let labels = series.strip_prefix(name)?;
                if !(labels.is_empty() || labels.starts_with('{')) {
                    return None;
                }
                Some((labels.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// Jobs the workers finished, by outcome (retries and waits not counted; the outcomes the
    /// receiver shows at zero neither).
    pub async fn writes(&self) -> BTreeMap<String, u64> {
        self.metric("stagely_webhook_environment_writes_total")
            .await
            .into_iter()
            .filter_map(|(labels, value)| {
                let outcome = labels.strip_prefix("{outcome=\"")?.strip_suffix("\"}")?;
                (value > 0.0 && !matches!(outcome, "retrying" | "waiting")).then(|| (outcome.to_owned(), value as u64))
            })
            .collect()
    }

    /// Waits until the workers finished `jobs` jobs in all, and returns them by outcome.
    pub async fn wait_for_writes(&self, jobs: u64) -> BTreeMap<String, u64> {
        wait_for(&format!("{jobs} jobs to be finished"), || async {
            let writes = self.writes().await;
            (writes.values().sum::<u64>() >= jobs).then_some(writes)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A unique delivery id.
pub fn delivery() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("72d3162e-cc78-11e3-81ab-{:012x}", NEXT.fetch_add(1, Ordering::Relaxed))
}
