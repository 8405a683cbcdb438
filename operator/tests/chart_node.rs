//! The Helm chart installed on testenv's node (kubelet, containerd, kube-proxy, CoreDNS), with
//! Stagely's images as `make images` builds them (scripts/images.sh, with podman) imported into
//! the node's containerd:
//!
//! - `helm install`: the webhook receiver's and the edge proxy's pods become Ready, and of the two
//!   operator replicas the one holding the Lease (the follower is never Ready, by design);
//! - in cluster, on the chart's grants: the operator keeps the team Project's webhook secret in
//!   the webhook secrets Secret; a signed `ping` and `pull_request` sent to the receiver's
//!   Service are verified with it and the pull request becomes an Environment, which the operator
//!   reconciles, writing its route; the edge proxy's Service serves from the Redis the chart
//!   points it at: 404 for a name with no preview, the waiting page at the Environment's name;
//! - `helm upgrade` with changed values rolls the receiver's pods (new ones Ready) and the
//!   operator's (both replaced, one of the new ones leading), and the Environment is still there; `helm uninstall` leaves the CRDs and the Environment, and says so.
//!
//! Redis and the registry are external here (a redis-server on the node's bridge address; a
//! registry host name): the chart's bundled ones run upstream images, which cannot be pulled on
//! this machine. The preview itself (a build and a deploy) is not run in cluster: the operator's
//! pod has no container engine for the `local` provider; the preview flow on the chart's grants
//! is tested out of cluster (tests/chart.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ListParams, PostParams};
use sha2::Sha256;
use stagely_api::v1alpha1::{Environment, Project};
use stagely_testenv::server::eventually;
use stagely_testenv::{ControlPlane, Options, node};

const RELEASE: &str = "stagely";
const NAMESPACE: &str = "stagely-system";
const TEAM: &str = "team-node";
const DOMAIN: &str = "preview.example.com";
const WEBHOOK_SECRET: &str = "whsec_node";
/// Pods starting, images unpacking and leader election on a shared 2-core machine.
const POD_TIMEOUT: Duration = Duration::from_secs(240);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn cache_dir() -> PathBuf {
    std::env::var_os("STAGELY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/stagely"))
}

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `command`, which must succeed: its stdout.
fn ok(mut command: Command) -> String {
    let shown = format!("{command:?}");
    let out: Output = command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("failed to run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Podman with its configuration and storage under `dir` (the host's and other tests' storage
/// stay untouched).
fn podman_env(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let root = dir.join("podman");
    std::fs::create_dir_all(&root).unwrap();
    let conf = root.join("containers.conf");
    let engine = format!(
        "[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\ntmp_dir = \"{}\"\n",
        root.join("tmp").display()
    );
    std::fs::write(&conf, engine).unwrap();
    let storage = root.join("storage.conf");
    let graph = format!(
        "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
        root.join("graph").display(),
        root.join("run").display()
    );
    std::fs::write(&storage, graph).unwrap();
    vec![("CONTAINERS_CONF", conf), ("CONTAINERS_STORAGE_CONF", storage)]
}

/// helm, as scripts/install-helm.sh builds it, with its own cache and configuration.
fn helm(plane: &ControlPlane, dir: &Path) -> Command {
    let bin = cache_dir().join("helm-v4.3.1/bin/helm");
    assert!(bin.is_file(), "helm is not built at {}: run scripts/install-helm.sh (or make deps)", bin.display());
    let mut command = Command::new(bin);
    let home = dir.join("helm");
    command.env("HELM_CACHE_HOME", home.join("cache")).env("HELM_CONFIG_HOME", home.join("config"));
    command.env("HELM_DATA_HOME", home.join("data"));
    command.arg("--kubeconfig").arg(plane.kubeconfig());
    command
}

/// The chart's values for this node: the images as imported, Redis and the registry external,
/// no TLS on the edge proxy (no wildcard certificate here), and `extra`.
fn values(redis_url: &str, extra: &[&str]) -> Vec<String> {
    let mut values = vec![
        format!("previewDomain={DOMAIN}"),
        "redis.enabled=false".to_owned(),
        format!("redis.externalUrl={redis_url}"),
        "registry.enabled=false".to_owned(),
        format!("registry.external.host={}:5000", node::BRIDGE_IP),
        "edgeProxy.tls.enabled=false".to_owned(),
        "edgeProxy.service.type=ClusterIP".to_owned(),
    ];
    values.extend(extra.iter().map(|v| (*v).to_owned()));
    values.into_iter().flat_map(|v| ["--set".to_owned(), v]).collect()
}

/// An HTTP/1.1 request to `addr` with `host` as Host, `headers` and `body`: the status and body.
fn http(
    addr: &str,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let code = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// `body` delivered to the receiver at `addr` as GitHub sends an `event`, signed with the
/// team's webhook secret.
fn deliver(addr: &str, event: &str, delivery: &str, body: &[u8]) -> Option<(u16, String)> {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let signature = format!("sha256={hex}");
    let headers = [
        ("Content-Type", "application/json"),
        ("X-GitHub-Event", event),
        ("X-GitHub-Delivery", delivery),
        ("X-Hub-Signature-256", signature.as_str()),
    ];
    http(addr, "POST", "hooks", "/v1/webhooks/github", &headers, body)
}

/// A process stopped (and reaped) when the test ends, passed or not.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `pod` is Ready.
fn pod_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The release's pods of `component` that are not being deleted: (Ready, not Ready) names.
async fn component_pods(pods: &Api<Pod>, component: &str) -> (Vec<String>, Vec<String>) {
    let selector = format!("app.kubernetes.io/component={component}");
    let list = pods.list(&ListParams::default().labels(&selector)).await.map(|l| l.items).unwrap_or_default();
    let (ready, not): (Vec<Pod>, Vec<Pod>) =
        list.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).partition(pod_ready);
    let names = |pods: Vec<Pod>| pods.into_iter().filter_map(|p| p.metadata.name).collect();
    (names(ready), names(not))
}

/// Waits until the receiver's and the edge proxy's `replicas` pods are all Ready and exactly one
/// operator pod is (the leader), none left over from an earlier ReplicaSet.
async fn wait_for_pods(plane: &ControlPlane, pods: &Api<Pod>, what: &str) {
    let described = || {
        let mut command = plane.kubectl();
        command.args(["get", "pods", "-o", "wide", "-n", NAMESPACE]);
        let mut logs = plane.kubectl();
        logs.args(["logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator", "--tail=15", "--prefix"]);
        let logs = logs
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr));
        format!("{}\noperator logs:\n{}", ok(command), logs.unwrap_or_default())
    };
    let result = tokio::time::timeout(POD_TIMEOUT, async {
        loop {
            let (receiver, receiver_not) = component_pods(pods, "webhook-receiver").await;
            let (proxy, proxy_not) = component_pods(pods, "edge-proxy").await;
            let (operator, operator_not) = component_pods(pods, "operator").await;
            if receiver.len() == 2
                && receiver_not.is_empty()
                && proxy.len() == 2
                && proxy_not.is_empty()
                && operator.len() == 1
                && operator_not.len() == 1
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(result.is_ok(), "{what}: the pods did not become Ready within {POD_TIMEOUT:?}:\n{}", described());
}

/// The ClusterIP of the release's Service `name`.
async fn cluster_ip(services: &Api<Service>, name: &str) -> String {
    let service = services.get(name).await.unwrap_or_else(|e| panic!("no Service {name}: {e}"));
    service.spec.and_then(|s| s.cluster_ip).unwrap_or_else(|| panic!("Service {name} has no ClusterIP"))
}

/// A `pull_request` `opened` webhook of `acme/shop`'s pull request #1, from the repository's
/// example payload.
fn pull_request_opened() -> Vec<u8> {
    let path = repo_dir().join("examples/webhook/pull-request-opened.json");
    let mut payload: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    payload["action"] = "opened".into();
    payload["number"] = 1.into();
    payload["repository"]["full_name"] = "acme/shop".into();
    let pr = &mut payload["pull_request"];
    pr["number"] = 1.into();
    pr["state"] = "open".into();
    pr["updated_at"] = "2026-01-01T00:00:00Z".into();
    pr["head"]["sha"] = "a".repeat(40).into();
    pr["head"]["repo"]["full_name"] = "acme/shop".into();
    pr["base"]["repo"]["full_name"] = "acme/shop".into();
    serde_json::to_vec(&payload).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_runs_on_a_node_with_stagelys_images() {
    for tool in ["podman", "redis-server", "redis-cli"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap().status.success();
        assert!(found, "{tool} is not installed: run scripts/install-deps.sh (make deps)");
    }
    let work = tempfile::Builder::new().prefix("stagely-chart-node-").tempdir().unwrap();
    let dir = work.path();

    // The images, as `make images` builds them, saved and imported into the node's containerd.
    let podman_env = podman_env(dir);
    let mut build = Command::new(repo_dir().join("scripts/images.sh"));
    build.envs(podman_env.iter().map(|(k, v)| (*k, v.as_os_str())));
    ok(build);
    let plane =
        ControlPlane::start(Options { node: true, ..Options::default() }).await.expect("the plane with its node");
    let version = env!("CARGO_PKG_VERSION");
    for component in ["operator", "webhook-receiver", "edge-proxy"] {
        let image = format!("docker.io/stagely/{component}:{version}");
        let archive = dir.join(format!("{component}.tar"));
        let mut save = Command::new("podman");
        save.envs(podman_env.iter().map(|(k, v)| (*k, v.as_os_str())));
        save.args(["save", "-q", "-o"]).arg(&archive).arg(&image);
        ok(save);
        plane.import_image(&archive).unwrap_or_else(|e| panic!("importing {image}: {e}"));
    }
    let mut reset = Command::new("podman");
    reset.envs(podman_env.iter().map(|(k, v)| (*k, v.as_os_str()))).args(["system", "reset", "-f"]);
    ok(reset);

    // Redis where pods reach it: on the node's bridge address.
    let redis_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = Command::new("redis-server");
    redis
        .args(["--bind", node::BRIDGE_IP, "--port", &redis_port.to_string(), "--save", "", "--appendonly", "no"])
        // Pods are not loopback clients: protected mode would refuse them.
        .args(["--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _redis = Stopped(stagely_testenv::spawn_tied(redis).expect("redis-server starts"));
    let redis_url = format!("redis://{}:{redis_port}", node::BRIDGE_IP);

    // helm install.
    let chart = repo_dir().join("charts/stagely");
    let mut install = helm(&plane, dir);
    install.args(["install", RELEASE]).arg(&chart).args(["-n", NAMESPACE, "--create-namespace"]);
    install.args(values(&redis_url, &[]));
    let notes = ok(install);
    assert!(notes.contains("STATUS: deployed"), "{notes}");
    let client = plane.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    wait_for_pods(&plane, &pods, "helm install").await;

    // A team: its GitHub Secret and Project (its CloudProvider need not exist for the webhook).
    let team_ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": TEAM}})).unwrap();
    Api::all(client.clone()).create(&PostParams::default(), &team_ns).await.unwrap();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "github"},
        "stringData": {"token": "ghp_not_used", "webhookSecret": WEBHOOK_SECRET},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), TEAM).create(&PostParams::default(), &secret).await.unwrap();
    let project: Project = serde_json::from_value(serde_json::json!({
        "apiVersion": "stagely.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": "shop"},
        "spec": {
            "repository": "acme/shop",
            "cloudProviderRef": {"name": "aws"},
            "previewDomain": DOMAIN,
            "github": {"credentialsSecretRef": {"name": "github"}},
        },
    }))
    .unwrap();
    Api::<Project>::namespaced(client.clone(), TEAM).create(&PostParams::default(), &project).await.unwrap();

    // The operator, in its pod, keeps the webhook secret where the receiver reads it.
    let release_secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    eventually("the operator pod to keep the team's webhook secret", STEP_TIMEOUT, || async {
        let secret = release_secrets.get_opt(&format!("{RELEASE}-webhook-secrets")).await.ok()??;
        let data = secret.data.unwrap_or_default();
        (data.get(&format!("{TEAM}_github")).map(|v| v.0.as_slice()) == Some(WEBHOOK_SECRET.as_bytes())).then_some(())
    })
    .await;

    // The receiver's Service: a signed ping, then the pull request, which becomes an Environment.
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let receiver = format!("{}:80", cluster_ip(&services, &format!("{RELEASE}-webhook-receiver")).await);
    let receiver_port = services
        .get(&format!("{RELEASE}-webhook-receiver"))
        .await
        .unwrap()
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p.first().map(|p| p.port))
        .unwrap();
    let receiver = receiver.replace(":80", &format!(":{receiver_port}"));
    let ping = serde_json::to_vec(&serde_json::json!({
        "zen": "Keep it logically awesome.", "hook_id": 1,
        "hook": {"type": "Repository", "id": 1, "name": "web", "active": true, "events": ["pull_request"],
                 "config": {"content_type": "json", "insecure_ssl": "0", "url": "http://hooks/v1/webhooks/github"}},
        "repository": {"full_name": "acme/shop", "name": "shop"},
    }))
    .unwrap();
    let mut n = 0;
    eventually("the receiver's Service to verify a signed ping", STEP_TIMEOUT, || {
        n += 1;
        let answer = deliver(&receiver, "ping", &format!("node-ping-{n}"), &ping);
        async move { answer.filter(|(code, _)| *code == 200) }
    })
    .await;
    let (code, body) = deliver(&receiver, "pull_request", "node-pr-1", &pull_request_opened()).expect("an answer");
    assert_eq!(code, 202, "{body}");
    let envs: Api<Environment> = Api::namespaced(client.clone(), TEAM);
    eventually("the operator pod to reconcile the receiver's Environment", STEP_TIMEOUT, || async {
        let env = envs.get_opt("shop-pr-1").await.ok()??;
        env.status.as_ref().and_then(|s| s.phase)
    })
    .await;

    // The edge proxy's Service answers from the Redis it was given: no preview at this name, and
    // at the Environment's own name the page of the route the operator's pod wrote (the run
    // cannot go further here: its stagely.yaml is on a GitHub this machine cannot reach).
    let proxy = format!("{}:80", cluster_ip(&services, &format!("{RELEASE}-edge-proxy")).await);
    let (code, _) = eventually("the edge proxy's Service to answer", STEP_TIMEOUT, || {
        let answer = http(&proxy, "GET", &format!("nothing.{DOMAIN}"), "/", &[], b"");
        async move { answer }
    })
    .await;
    assert_eq!(code, 404, "an unknown preview name");
    let hash = envs.get("shop-pr-1").await.unwrap().status.and_then(|s| s.subdomain_hash).expect("a subdomain hash");
    let (code, page) = eventually("the edge proxy's Service to serve the Environment's route", STEP_TIMEOUT, || {
        let answer = http(&proxy, "GET", &format!("{hash}.{DOMAIN}"), "/", &[], b"");
        async move { answer.filter(|(code, _)| *code != 404) }
    })
    .await;
    assert_eq!(code, 503, "{page}");
    assert!(page.contains("Building your environment") || page.contains("Preview failed"), "{page}");

    // helm upgrade with changed values: the receiver rolls, and so does the operator (whose new
    // pods can lead only once the old leader is gone), the Environment stays.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let generation = |d: Deployment| d.metadata.generation.unwrap_or_default();
    let before = generation(deployments.get(&format!("{RELEASE}-webhook-receiver")).await.unwrap());
    let mut upgrade = helm(&plane, dir);
    upgrade.args(["upgrade", RELEASE]).arg(&chart).args(["-n", NAMESPACE]);
    upgrade.args(values(
        &redis_url,
        &["webhookReceiver.workers=8", "operator.extraArgs={--agent-connect-timeout-secs=900}"],
    ));
    ok(upgrade);
    let after = generation(deployments.get(&format!("{RELEASE}-webhook-receiver")).await.unwrap());
    assert!(after > before, "the upgrade did not change the receiver's Deployment");
    eventually("the receiver's rollout to finish", POD_TIMEOUT, || async {
        let d = deployments.get(&format!("{RELEASE}-webhook-receiver")).await.ok()?;
        let status = d.status?;
        (status.observed_generation == Some(after)
            && status.updated_replicas == Some(2)
            && status.ready_replicas == Some(2)
            && status.replicas == Some(2))
        .then_some(())
    })
    .await;
    eventually("the operator's pods to be the upgrade's, one of them leading", POD_TIMEOUT, || async {
        let selector = ListParams::default().labels("app.kubernetes.io/component=operator");
        let list = pods.list(&selector).await.ok()?;
        let upgraded = |pod: &Pod| {
            let args = pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.args.clone());
            args.unwrap_or_default().iter().any(|a| a == "--agent-connect-timeout-secs=900")
                && pod.metadata.deletion_timestamp.is_none()
        };
        let ready = |pod: &Pod| {
            let conditions = pod.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
            conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
        };
        (list.items.len() == 2
            && list.items.iter().all(upgraded)
            && list.items.iter().filter(|p| ready(p)).count() == 1)
            .then_some(())
    })
    .await;
    wait_for_pods(&plane, &pods, "helm upgrade").await;
    assert!(envs.get_opt("shop-pr-1").await.unwrap().is_some(), "the upgrade lost the Environment");
    // The upgrade left the operator's data in the webhook secrets Secret: the new receiver pods
    // verify with it.
    // (Any answer: the Service's rules may still be moving to the new pods.)
    let mut n = 0;
    let (code, body) = eventually("the receiver's Service to answer after the upgrade", STEP_TIMEOUT, || {
        n += 1;
        let answer = deliver(&receiver, "ping", &format!("node-ping-after-upgrade-{n}"), &ping);
        async move { answer }
    })
    .await;
    assert_eq!(code, 200, "a signed ping after the upgrade: {body}");

    // helm uninstall: the CRDs and the Environment stay, and helm says so.
    let mut uninstall = helm(&plane, dir);
    uninstall.args(["uninstall", RELEASE, "-n", NAMESPACE]);
    let said = ok(uninstall);
    assert!(said.to_lowercase().contains("crd") || said.contains("kept"), "helm uninstall said: {said}");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(crds.get_opt("environments.stagely.dev").await.unwrap().is_some(), "the CRD went with the release");
    assert!(envs.get_opt("shop-pr-1").await.unwrap().is_some(), "the Environment went with the release");
    eventually("the release's pods to go", POD_TIMEOUT, || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
}
