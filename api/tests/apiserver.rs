//! The stagely.dev CRDs against a real kube-apiserver, etcd and kube-controller-manager
//! (started by `stagely-testenv`): installation, round trips, schema validation as a user meets
//! it through kubectl, printer columns, and garbage collection through owner references.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use stagely_api::v1alpha1::*;
use stagely_testenv::{ControlPlane, Options};

fn plane() -> &'static ControlPlane {
    stagely_testenv::shared(|| Options { controller_manager: true, crds: stagely_api::crds(), ..Options::default() })
}

/// A client and a fresh namespace of its own for one test.
async fn setup(namespace: &str) -> Client {
    let client = plane().client().await.expect("client");
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    client
}

fn kubectl(namespace: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut cmd: Command = plane().kubectl();
    cmd.args(["-n", namespace]).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl runs");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::from_second(1_790_000_000).unwrap()),
        observed_generation: Some(1),
    }
}

const SHA: &str = "9f2c1e0b7a6d5c4b3a29180f7e6d5c4b3a291807";

fn project_spec() -> ProjectSpec {
    serde_json::from_value(serde_json::json!({
        "repository": "acme/shop",
        "cloudProviderRef": {"name": "local"},
        "previewDomain": "preview.example.com",
        "github": {"credentialsSecretRef": {"name": "gh"}},
    }))
    .unwrap()
}

fn environment(name: &str, pr: i64) -> Environment {
    Environment::new(
        name,
        EnvironmentSpec {
            project_ref: LocalObjectRef::new("shop"),
            pull_request: PullRequest {
                number: pr,
                head_sha: SHA.into(),
                head_ref: "feature".into(),
                base_ref: "main".into(),
                author: Some("octocat".into()),
                url: Some(format!("https://github.com/acme/shop/pull/{pr}")),
            },
            overrides: None,
        },
    )
}

fn buildjob(name: &str) -> BuildJob {
    BuildJob::new(
        name,
        serde_json::from_value(serde_json::json!({
            "service": "web", "platform": "linux/arm64", "repository": "acme/shop", "commit": SHA,
        }))
        .unwrap(),
    )
}

#[tokio::test]
async fn crds_install_and_become_established() {
    let client = plane().client().await.unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let mut short_names = Vec::new();
    for crd in stagely_api::crds() {
        let live = api.get(&crd.name_any()).await.expect("CRD installed");
        let conditions = live.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(
            conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"),
            "{} not Established: {conditions:?}",
            crd.name_any()
        );
        assert_eq!(live.spec.group, "stagely.dev");
        assert_eq!(live.spec.scope, "Namespaced");
        let version = &live.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
        short_names.extend(live.spec.names.short_names.unwrap_or_default());
    }
    short_names.sort();
    assert_eq!(short_names, ["bj", "cp", "env", "proj"]);
}

/// Creates `object`, reads it back, patches its status through the status subresource and
/// checks that spec and status survive the trip unchanged.
async fn round_trip<K>(api: &Api<K>, object: K, status: serde_json::Value)
where
    K: Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let name = object.meta().name.clone().unwrap();
    let created = api.create(&PostParams::default(), &object).await.unwrap_or_else(|e| panic!("create {name}: {e}"));
    let fetched = api.get(&name).await.unwrap();
    assert_eq!(created.meta().uid, fetched.meta().uid);
    let spec = |k: &K| serde_json::to_value(k).unwrap()["spec"].clone();
    assert_eq!(spec(&fetched), spec(&object), "spec of {name} changed on the way through the apiserver");

    let patch = serde_json::json!({ "status": status });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("status of {name}: {e}"));
    let after = serde_json::to_value(api.get(&name).await.unwrap()).unwrap();
    assert_eq!(after["status"], status, "status of {name}");
}

#[tokio::test]
async fn every_kind_round_trips_create_get_and_status_patch() {
    let ns = "round-trip";
    let client = setup(ns).await;
    let conditions = |type_: &str| serde_json::to_value(vec![condition(type_, "True", "Checked", "all good")]).unwrap();

    let project = Project::new("shop", project_spec());
    round_trip(
        &Api::<Project>::namespaced(client.clone(), ns),
        project,
        serde_json::json!({
            "observedGeneration": 1, "conditions": conditions("Ready"), "environments": 3,
        }),
    )
    .await;

    let provider = CloudProvider::new(
        "aws",
        serde_json::from_value(serde_json::json!({
            "type": "aws", "region": "eu-west-1", "credentialsSecretRef": {"name": "aws"},
            "aws": {"subnetId": "subnet-0123abcd", "securityGroupIds": ["sg-0123abcd"]},
        }))
        .unwrap(),
    );
    round_trip(
        &Api::<CloudProvider>::namespaced(client.clone(), ns),
        provider,
        serde_json::json!({
            "observedGeneration": 1, "conditions": conditions("Ready"), "instances": 2,
        }),
    )
    .await;

    round_trip(&Api::<Environment>::namespaced(client.clone(), ns), environment("shop-pr-7", 7), serde_json::json!({
        "observedGeneration": 1,
        "phase": "Ready",
        "conditions": conditions("Deployed"),
        "url": "https://abc123xyz.preview.example.com",
        "subdomainHash": "abc123xyz",
        "vm": {"providerId": "i-0abc", "ip": "203.0.113.7", "state": "running", "size": "medium"},
        "run": {"sha": SHA, "startedAt": "2026-09-21T12:26:40Z", "builds": [
            {"buildJob": "shop-pr-7-web-arm64", "service": "web", "platform": "linux/arm64", "phase": "Succeeded", "image": "registry/shop/web@sha256:00"},
        ]},
        "lastHeartbeat": "2026-09-21T12:27:00Z",
        "expiresAt": "2026-09-22T12:26:40Z",
        "estimatedCostUsd": 0.25,
    }))
    .await;

    round_trip(
        &Api::<BuildJob>::namespaced(client.clone(), ns),
        buildjob("shop-pr-7-web-arm64"),
        serde_json::json!({
            "observedGeneration": 1,
            "phase": "Failed",
            "conditions": conditions("Built"),
            "vm": {"providerId": "i-0def", "state": "terminated"},
            "startedAt": "2026-09-21T12:26:40Z",
            "finishedAt": "2026-09-21T12:30:00Z",
            "exitCode": 1,
            "message": "RUN npm ci failed",
        }),
    )
    .await;

    // The typed status deserializes too.
    let env = Api::<Environment>::namespaced(client, ns).get("shop-pr-7").await.unwrap();
    let status = env.status.unwrap();
    assert_eq!(status.phase, Some(EnvironmentPhase::Ready));
    assert!(stagely_api::v1alpha1::is_condition_true(&status.conditions, "Deployed"));
}

#[tokio::test]
async fn every_example_applies_with_kubectl() {
    let ns = "examples";
    let client = setup(ns).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let (ok, stdout, stderr) = kubectl(ns, &["apply", "-f", dir], None);
    assert!(ok, "kubectl apply -f examples/ failed:\n{stdout}\n{stderr}");
    let files = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "yaml"))
        .count();
    assert!(files >= 5, "examples/ holds {files} manifests");

    assert_eq!(Api::<Project>::namespaced(client.clone(), ns).get("shop").await.unwrap().spec.ttl, "24h");
    let providers = Api::<CloudProvider>::namespaced(client.clone(), ns).list(&Default::default()).await.unwrap();
    let mut types: Vec<_> = providers.items.iter().map(|p| p.spec.type_.as_str()).collect();
    types.sort();
    assert_eq!(types, ["aws", "local"]);
    assert_eq!(
        Api::<Environment>::namespaced(client.clone(), ns).get("shop-pr-42").await.unwrap().spec.pull_request.number,
        42
    );
    assert_eq!(
        Api::<BuildJob>::namespaced(client, ns).get("shop-pr-42-web-arm64").await.unwrap().spec.platform,
        Platform::LinuxArm64
    );

    let config = std::fs::read_to_string(format!("{dir}/repo/stagely.yaml")).unwrap();
    stagely_api::config::parse(&config).expect("examples/repo/stagely.yaml is valid");
}

/// What `make demo` applies (examples/demo, its placeholders filled in as scripts/demo.sh does)
/// and the stagely.yaml of its app (examples/app) stay valid as the API changes.
#[tokio::test]
async fn the_demo_manifests_apply_and_its_app_config_parses() {
    let ns = "demo";
    let client = setup(ns).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let text = std::fs::read_to_string(format!("{dir}/demo/project.yaml")).unwrap();
    let text = text.replace("${DEMO_REPO}", "/tmp/demo/repo");
    let (ok, stdout, stderr) = kubectl(ns, &["apply", "-f", "-"], Some(&text));
    assert!(ok, "kubectl apply -f examples/demo/project.yaml failed:\n{stdout}\n{stderr}");
    let project = Api::<Project>::namespaced(client, ns).get("hello").await.unwrap();
    assert_eq!(project.spec.clone_url.as_deref(), Some("file:///tmp/demo/repo"));
    assert_eq!(
        (project.spec.trigger.drafts, project.spec.trigger.forks),
        (true, false),
        "the apiserver fills in the trigger's defaults"
    );
    // The Environment the demo's webhook makes, and waits for by name.
    assert_eq!(stagely_api::names::environment_name(&project.name_any(), 1), "hello-pr-1");

    let config = std::fs::read_to_string(format!("{dir}/app/stagely.yaml")).unwrap();
    let config = stagely_api::config::parse(&config).expect("examples/app/stagely.yaml is valid");
    assert!(config.builds.contains_key("web"), "the demo app builds its compose service web");
}

const CP_HEADER: &str = "apiVersion: stagely.dev/v1alpha1\nkind: CloudProvider\nmetadata: {name: bad}\n";
const PROJECT_HEADER: &str = "apiVersion: stagely.dev/v1alpha1\nkind: Project\nmetadata: {name: bad}\n";
const BJ_HEADER: &str = "apiVersion: stagely.dev/v1alpha1\nkind: BuildJob\nmetadata: {name: bad}\n";
const ENV_HEADER: &str = "apiVersion: stagely.dev/v1alpha1\nkind: Environment\nmetadata: {name: bad}\n";

fn project_yaml(field: &str) -> String {
    let mut spec = serde_json::json!({
        "repository": "acme/shop", "cloudProviderRef": {"name": "local"}, "previewDomain": "preview.example.com",
        "github": {"credentialsSecretRef": {"name": "gh"}},
    });
    let (key, value): (String, serde_json::Value) =
        serde_yaml::from_str::<std::collections::BTreeMap<String, serde_json::Value>>(field)
            .unwrap()
            .into_iter()
            .next()
            .unwrap();
    spec[key] = value;
    format!("{PROJECT_HEADER}spec: {spec}\n")
}

fn bj_yaml(field: &str) -> String {
    format!("{BJ_HEADER}spec:\n  service: web\n  repository: acme/shop\n  commit: \"{SHA}\"\n  {field}\n")
}

fn env_yaml(pr: &str, sha: &str) -> String {
    format!(
        "{ENV_HEADER}spec:\n  projectRef: {{name: shop}}\n  pullRequest: {{number: {pr}, headSha: \"{sha}\", headRef: f, baseRef: main}}\n"
    )
}

#[tokio::test]
async fn mistakes_are_rejected_with_messages_a_user_understands() {
    let ns = "mistakes";
    setup(ns).await;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad repository name",
            project_yaml("repository: not-a-repo"),
            "spec.repository: Invalid value: \"not-a-repo\": repository must be a GitHub repository written as owner/name, e.g. acme/shop",
        ),
        (
            "unknown provider type",
            format!("{CP_HEADER}spec: {{type: gcp, region: europe-west1}}\n"),
            r#"spec.type: Unsupported value: "gcp": supported values: "aws", "digitalocean", "hetzner", "local""#,
        ),
        (
            "aws without region",
            format!("{CP_HEADER}spec: {{type: aws, credentialsSecretRef: {{name: aws}}}}\n"),
            "spec.region: Required value: region is required when type is aws, digitalocean or hetzner",
        ),
        (
            "hetzner without credentials",
            format!("{CP_HEADER}spec: {{type: hetzner, region: fsn1}}\n"),
            "spec.credentialsSecretRef: Required value: credentialsSecretRef is required when type is aws, digitalocean or hetzner",
        ),
        (
            "malformed AWS region",
            format!("{CP_HEADER}spec: {{type: aws, region: Ireland, credentialsSecretRef: {{name: aws}}}}\n"),
            "region must be an AWS region such as eu-west-1",
        ),
        (
            "aws settings on another type",
            format!(
                "{CP_HEADER}spec: {{type: digitalocean, region: fra1, credentialsSecretRef: {{name: do}}, aws: {{subnetId: subnet-0123abcd}}}}\n"
            ),
            "aws settings are allowed only when type is aws",
        ),
        (
            "zero max instances",
            format!("{CP_HEADER}spec: {{type: local, maxInstances: 0}}\n"),
            "spec.maxInstances: Invalid value: 0: spec.maxInstances in body should be greater than or equal to 1",
        ),
        (
            "bad preview size",
            project_yaml("previewSize: huge"),
            r#"spec.previewSize: Unsupported value: "huge": supported values: "small", "medium", "large""#,
        ),
        ("negative ttl", project_yaml("ttl: -1h"), "ttl must be a positive duration such as 30m, 24h or 7d"),
        ("zero ttl", project_yaml("ttl: 0h"), "ttl must be a positive duration such as 30m, 24h or 7d"),
        (
            "bad preview domain",
            project_yaml("previewDomain: https://preview.example.com/"),
            "previewDomain must be a DNS name such as preview.example.com",
        ),
        (
            "label trigger without a label",
            project_yaml("trigger: {mode: label}"),
            "trigger.label is required when trigger.mode is label",
        ),
        (
            "file secret without a path",
            project_yaml("secretRefs: [{name: tls, type: file}]"),
            "path is required when type is file",
        ),
        (
            "bad platform",
            bj_yaml("platform: linux/s390"),
            r#"spec.platform: Unsupported value: "linux/s390": supported values: "linux/amd64", "linux/arm64""#,
        ),
        (
            "bad machine size",
            bj_yaml("platform: linux/amd64\n  machine: xxl"),
            r#"spec.machine: Unsupported value: "xxl""#,
        ),
        (
            "negative build timeout",
            bj_yaml("platform: linux/amd64\n  timeout: -5m"),
            "timeout must be a positive duration such as 30m or 1h",
        ),
        ("missing platform", bj_yaml(""), "spec.platform: Required value"),
        (
            "pull request number zero",
            env_yaml("0", SHA),
            "spec.pullRequest.number: Invalid value: 0: spec.pullRequest.number in body should be greater than or equal to 1",
        ),
        (
            "abbreviated head sha",
            env_yaml("5", "9f2c1e0"),
            "headSha must be a full lowercase hex commit id (40 or 64 characters)",
        ),
    ];
    let mut failures = Vec::new();
    for (what, manifest, want) in &cases {
        let (ok, stdout, stderr) = kubectl(ns, &["apply", "-f", "-"], Some(manifest));
        if ok || !stderr.contains(want) {
            failures.push(format!(
                "{what}: expected rejection containing\n    {want}\n  got ok={ok} stdout={stdout} stderr={stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[tokio::test]
async fn immutable_fields_cannot_change() {
    let ns = "immutable";
    let client = setup(ns).await;
    let envs = Api::<Environment>::namespaced(client.clone(), ns);
    envs.create(&PostParams::default(), &environment("shop-pr-9", 9)).await.unwrap();

    let cases = [
        (
            serde_json::json!({"spec": {"projectRef": {"name": "other"}}}),
            "projectRef is immutable: an Environment stays with its Project",
        ),
        (
            serde_json::json!({"spec": {"pullRequest": {"number": 10}}}),
            "pullRequest.number is immutable: each pull request gets its own Environment",
        ),
    ];
    for (patch, want) in cases {
        let err = envs
            .patch("shop-pr-9", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect_err("immutable field changed");
        assert!(err.to_string().contains(want), "{err}");
    }
    // A new head sha is the normal update of a pull request, and is allowed.
    let sha = "0".repeat(40);
    envs.patch(
        "shop-pr-9",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"pullRequest": {"headSha": sha}}})),
    )
    .await
    .unwrap();

    let providers = Api::<CloudProvider>::namespaced(client.clone(), ns);
    providers
        .create(
            &PostParams::default(),
            &CloudProvider::new("local", serde_json::from_value(serde_json::json!({"type": "local"})).unwrap()),
        )
        .await
        .unwrap();
    let patch =
        serde_json::json!({"spec": {"type": "hetzner", "region": "fsn1", "credentialsSecretRef": {"name": "h"}}});
    let err = providers.patch("local", &PatchParams::default(), &Patch::Merge(&patch)).await.expect_err("type changed");
    assert!(err.to_string().contains("type is immutable: create a new CloudProvider to use another cloud"), "{err}");

    let jobs = Api::<BuildJob>::namespaced(client, ns);
    jobs.create(&PostParams::default(), &buildjob("job")).await.unwrap();
    let err = jobs
        .patch("job", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"dockerfile": "Other"}})))
        .await
        .expect_err("spec changed");
    assert!(err.to_string().contains("a BuildJob's spec is immutable"), "{err}");
}

#[tokio::test]
async fn kubectl_get_env_shows_the_printer_columns() {
    let ns = "columns";
    let client = setup(ns).await;
    let envs = Api::<Environment>::namespaced(client, ns);
    envs.create(&PostParams::default(), &environment("shop-pr-42", 42)).await.unwrap();
    let status = serde_json::json!({"status": {"phase": "Ready", "url": "https://k3x9a7q2.preview.example.com"}});
    envs.patch_status("shop-pr-42", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();

    let (ok, stdout, stderr) = kubectl(ns, &["get", "env"], None);
    assert!(ok, "{stderr}");
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines[0], ["NAME", "PR", "PHASE", "URL", "AGE"], "{stdout}");
    assert_eq!(lines[1][..4], ["shop-pr-42", "42", "Ready", "https://k3x9a7q2.preview.example.com"], "{stdout}");
}

#[tokio::test]
async fn deleting_an_environment_garbage_collects_its_buildjobs() {
    let ns = "gc";
    let client = setup(ns).await;
    let envs = Api::<Environment>::namespaced(client.clone(), ns);
    let jobs = Api::<BuildJob>::namespaced(client.clone(), ns);
    let env = envs.create(&PostParams::default(), &environment("shop-pr-5", 5)).await.unwrap();
    let owner = OwnerReference {
        api_version: "stagely.dev/v1alpha1".into(),
        kind: "Environment".into(),
        name: env.name_any(),
        uid: env.uid().unwrap(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    for name in ["shop-pr-5-web-amd64", "shop-pr-5-web-arm64"] {
        let mut job = buildjob(name);
        job.metadata.owner_references = Some(vec![owner.clone()]);
        jobs.create(&PostParams::default(), &job).await.unwrap();
    }
    // An unowned job in the same namespace must survive.
    jobs.create(&PostParams::default(), &buildjob("unrelated")).await.unwrap();

    envs.delete("shop-pr-5", &DeleteParams::background()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let names: Vec<String> =
            jobs.list(&Default::default()).await.unwrap().items.iter().map(|j| j.name_any()).collect();
        if names == ["unrelated"] {
            break;
        }
        assert!(Instant::now() < deadline, "owned BuildJobs not collected; still there: {names:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
