//! The canary: a Secret value unique to this test travels the whole flow — a signed
//! `pull_request` webhook to the receiver, which creates the Environment; the operator builds
//! (the value is no build argument), starts a preview agent and DEPLOYs with the Project's
//! secrets, the Secret given both as an environment variable and as a file; the app proves it
//! got both; the edge proxy serves it; a `closed` webhook tears it down — and the value is
//! nowhere but inside the app container.
//!
//! Searched, while the preview is Ready and again after teardown, for every form
//! `stagely_testenv::scan::Needle` knows (raw — which is also its JSON, YAML, shell and URL
//! escaped form, the value being `[a-z0-9-]` only —, base64 and base64url at each alignment,
//! hex, and each half):
//!
//! - every file under the stack's directory (gzip files also decompressed): the operator's,
//!   edge proxy's and webhook receiver's logs, the local provider's state (each instance's
//!   `agent.json`, which is the agent configuration its cloud-init user data carries, its
//!   `agent.log`, `instance.json` and work directory: the clone and the compose override), those
//!   top-level instance files again as kept after their instance was removed (hard links made as
//!   they appeared, so builder agents' logs are searched too), the operator's source cache and
//!   the test's git repository;
//! - the registry's directory: its storage (manifests, image configs, layers gunzipped) and log;
//! - the control plane's directory: etcd's data files (WAL and bbolt database), whose Secrets
//!   are encrypted at rest, and the etcd and apiserver logs;
//! - Redis: every key's name and value, read by its type (strings, hashes, lists, sets, sorted
//!   sets, streams: the masked job logs);
//! - every object of every listable resource of every API group, in all namespaces, serialized
//!   whole (spec, status, metadata with managed fields): Environments, BuildJobs, Projects,
//!   CloudProviders, Events, ConfigMaps, Leases, … and every Secret but the canary's own.
//!
//! Excluded, and only these: podman's storage (the app container's filesystem, overlay and
//! configuration) and, while the preview runs, the agent's `secrets/` directories (the 0700
//! directory of 0600 files podman reads the environment from and bind-mounts the file from: the
//! VM side of the container's secrets, which the security model allows and TERMINATE deletes).
//! After teardown nothing of the local provider is left, and nothing is excluded but podman's
//! storage. Prints `canary_hits=0`.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/stack.rs"]
mod stack;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::discovery::{Discovery, verbs};
use kube::{Client, ResourceExt};
use sha2::Digest;
use stack::{BUILD_TIMEOUT, InstanceFiles, InstanceWatch, STEP_TIMEOUT, Stack, phase, wait_env};
use stagely_api::v1alpha1::{Environment, EnvironmentPhase, Project};
use stagely_testenv::scan::{Hit, Needle, unique_value};
use stagely_testenv::server::eventually;

const DOMAIN: &str = "preview.example.com";
const NAMESPACE: &str = "canary";
/// The webhook secret `Stack::namespace` gives the Project's credentials Secret.
const WEBHOOK_SECRET: &[u8] = b"whsec_test";

/// A `pull_request` webhook for pull request #1 of `acme/shop` at `sha`, made from the complete
/// payload in `examples/webhook/`.
fn pull_request(action: &str, sha: &str, updated_at: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/webhook/pull-request-opened.json");
    let mut payload: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    payload["action"] = action.into();
    payload["number"] = 1.into();
    payload["repository"]["full_name"] = "acme/shop".into();
    let pr = &mut payload["pull_request"];
    pr["number"] = 1.into();
    pr["state"] = if action == "closed" { "closed" } else { "open" }.into();
    pr["updated_at"] = updated_at.into();
    pr["html_url"] = "https://github.com/acme/shop/pull/1".into();
    pr["head"]["sha"] = sha.into();
    pr["head"]["ref"] = "feature-1".into();
    pr["head"]["repo"]["full_name"] = "acme/shop".into();
    pr["base"]["repo"]["full_name"] = "acme/shop".into();
    serde_json::to_vec(&payload).unwrap()
}

/// The app: the web app of the other end-to-end tests, serving `marker` at `/` and, at
/// `/cgi-bin/canary`, the SHA-256 of its `CANARY` environment variable and of the file
/// `/run/canary/CANARY` (never the value: what the proxy carries is no secret).
fn app_repo(dir: &Path, marker: &str) -> String {
    stack::web_app_repo(dir, marker);
    let script = dir.join("www/cgi-bin/canary");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\n\
         echo \"env=$(printf %s \"$CANARY\" | sha256sum | cut -d' ' -f1)\"\n\
         echo \"file=$(sha256sum < /run/canary/CANARY | cut -d' ' -f1)\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    stack::commit(dir, "canary")
}

/// Everything searched in one pass, and what was found.
struct Scan<'a> {
    stack: &'a Stack,
    client: Client,
    needle: Needle,
    hits: Vec<Hit>,
}

impl Scan<'_> {
    /// Searches every place; `running` while the preview runs (its `secrets/` directories are
    /// then skipped, after their modes are checked).
    async fn all(&mut self, when: &str, running: bool) {
        let started = std::time::Instant::now();
        let before = self.hits.len();
        let stack = self.stack;
        for log in [stack.operator_log(), stack.webhook_receiver_log(), stack.dir.path().join("edge-proxy.log")] {
            let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            assert!(size > 0, "{} is empty or missing", log.display());
        }
        let mut skip = vec![stack.dir.path().join("podman")];
        if running {
            let secrets = secrets_dirs(&stack.dir.path().join("local"));
            assert!(!secrets.is_empty(), "the preview agent's secrets/ directory is not under local/");
            skip.extend(secrets);
        }
        let mut files = 0;
        for dir in [stack.dir.path(), stack.registry.dir(), stack.plane.dir(), stack.redis.dir()] {
            let (hits, n) = self.needle.find_in_tree(dir, &skip).unwrap();
            self.hits.extend(hits);
            files += n;
        }
        let keys = self.redis().await;
        let objects = self.objects().await;
        println!(
            "canary_scan when={when:?} seconds={} files={files} redis_keys={keys} objects={objects} hits={}",
            started.elapsed().as_secs(),
            self.hits.len() - before
        );
    }

    /// Every Redis key's name and value; the number of keys.
    async fn redis(&mut self) -> usize {
        let client = redis::Client::open(self.stack.redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
        for key in &keys {
            let place = format!("redis key {}", String::from_utf8_lossy(key));
            self.hits.extend(self.needle.find(&place, key));
            let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut conn).await.unwrap();
            let mut command = match kind.as_str() {
                "string" => redis::cmd("GET"),
                "hash" => redis::cmd("HGETALL"),
                "list" => redis::cmd("LRANGE"),
                "set" => redis::cmd("SMEMBERS"),
                "zset" => redis::cmd("ZRANGE"),
                "stream" => redis::cmd("XRANGE"),
                "none" => continue, // expired or deleted since KEYS
                other => panic!("{place} has type {other}, which the canary test cannot read"),
            };
            command.arg(key);
            match kind.as_str() {
                "list" => command.arg(0).arg(-1),
                "zset" => command.arg(0).arg(-1).arg("WITHSCORES"),
                "stream" => command.arg("-").arg("+"),
                _ => &mut command,
            };
            let value: redis::Value = command.query_async(&mut conn).await.unwrap();
            let mut bytes = Vec::new();
            flatten(&value, &mut bytes);
            self.hits.extend(self.needle.find(&place, &bytes));
        }
        keys.len()
    }

    /// Every object the apiserver lists, of every resource and group, in every namespace,
    /// except the canary's own Secret; the number of objects.
    async fn objects(&mut self) -> usize {
        let discovery = Discovery::new(self.client.clone()).run().await.unwrap();
        let mut count = 0;
        for group in discovery.groups() {
            for (resource, caps) in group.recommended_resources() {
                if !caps.supports_operation(verbs::LIST) {
                    continue;
                }
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
                let list = api
                    .list(&Default::default())
                    .await
                    .unwrap_or_else(|err| panic!("failed to list {}: {err}", resource.plural));
                for object in list.items {
                    let namespace = object.namespace().unwrap_or_default();
                    if resource.kind == "Secret" && namespace == NAMESPACE && object.name_any() == "canary" {
                        continue;
                    }
                    let place = format!("{} {}/{}", resource.kind, namespace, object.name_any());
                    self.hits.extend(self.needle.find(&place, &serde_json::to_vec(&object).unwrap()));
                    count += 1;
                }
            }
        }
        count
    }
}

/// The bytes of a Redis reply, its strings one after another.
fn flatten(value: &redis::Value, out: &mut Vec<u8>) {
    match value {
        redis::Value::BulkString(bytes) => out.extend_from_slice(bytes),
        redis::Value::SimpleString(text) | redis::Value::VerbatimString { text, .. } => {
            out.extend_from_slice(text.as_bytes())
        }
        redis::Value::Array(items) | redis::Value::Set(items) => items.iter().for_each(|item| flatten(item, out)),
        redis::Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        other => out.extend_from_slice(format!("{other:?}").as_bytes()),
    }
    out.push(b'\n');
}

/// The agents' `secrets/` directories under `dir`, each checked to be 0700 with 0600 files.
fn secrets_dirs(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name() == "secrets" && path.ancestors().any(|a| a.file_name().is_some_and(|n| n == "work")) {
                let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                let mut inner = vec![path.clone()];
                while let Some(d) = inner.pop() {
                    for e in std::fs::read_dir(&d).unwrap().flatten() {
                        if e.file_type().unwrap().is_dir() {
                            inner.push(e.path());
                        } else {
                            assert_eq!(mode(&e.path()) & 0o077, 0, "{} is readable by others", e.path().display());
                        }
                    }
                }
                found.push(path);
            } else {
                stack.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_secret_reaches_the_app_and_nothing_else() {
    let started = std::time::Instant::now();
    let stack = Stack::shared();
    let _operator = stack.operator();
    let proxy = stack.edge_proxy(DOMAIN);
    let receiver = stack.webhook_receiver();
    let client = stack.client().await;
    println!("canary_stack_started_s={}", started.elapsed().as_secs());

    let canary = unique_value("canary");
    let marker = unique_value("served");
    let repo = stack.dir.path().join("repos").join(NAMESPACE);
    let sha = app_repo(&repo, &marker);
    stack.namespace(NAMESPACE, &repo, 10).await;
    let watch = InstanceWatch::start(stack.local_dir(NAMESPACE));
    let _kept = InstanceFiles::start(stack.local_dir(NAMESPACE), stack.dir.path().join("instance-files"));
    let secret = Secret {
        metadata: ObjectMeta { name: Some("canary".into()), ..Default::default() },
        string_data: Some(BTreeMap::from([("CANARY".to_owned(), canary.clone())])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), NAMESPACE).create(&PostParams::default(), &secret).await.unwrap();
    let patch = serde_json::json!({"spec": {"secretRefs": [
        {"name": "canary", "type": "env"},
        {"name": "canary", "type": "file", "path": "/run/canary"},
    ]}});
    Api::<Project>::namespaced(client.clone(), NAMESPACE)
        .patch("shop", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    // GitHub's ping, until the receiver's caches hold the new Project and its Secret; then the
    // pull request is opened.
    let ping = serde_json::json!({"zen": "Keep it logically awesome.", "hook_id": 1,
        "hook": {"type": "Repository", "id": 1, "name": "web", "active": true, "events": ["pull_request"],
                 "config": {"content_type": "json", "insecure_ssl": "0", "url": "http://127.0.0.1/v1/webhooks/github"}},
        "repository": {"full_name": "acme/shop", "name": "shop"}});
    let ping = serde_json::to_vec(&ping).unwrap();
    let mut deliveries = 0;
    let mut delivery = || {
        deliveries += 1;
        format!("canary-delivery-{deliveries}")
    };
    eventually("the receiver to answer the ping for acme/shop", STEP_TIMEOUT, || {
        let answer = receiver.deliver("ping", &delivery(), WEBHOOK_SECRET, &ping);
        async move { answer.filter(|(code, _)| *code == 200) }
    })
    .await;
    let opened = pull_request("opened", &sha, "2026-01-01T00:00:00Z");
    let (code, body) = receiver.deliver("pull_request", &delivery(), WEBHOOK_SECRET, &opened).unwrap();
    assert_eq!(code, 202, "{body}");
    assert!(body.contains("shop-pr-1"), "{body}");

    // Ready: the app has the value both ways, and the proxy serves it.
    let envs: Api<Environment> = Api::namespaced(client.clone(), NAMESPACE);
    let env = wait_env(&envs, "shop-pr-1", "Ready or Failed", BUILD_TIMEOUT + STEP_TIMEOUT, |e| {
        matches!(phase(e), Some(EnvironmentPhase::Ready | EnvironmentPhase::Failed))
    })
    .await;
    assert_eq!(phase(&env), Some(EnvironmentPhase::Ready), "{:#?}", env.status);
    let host = format!("{}.{DOMAIN}", env.status.as_ref().unwrap().subdomain_hash.as_ref().unwrap());
    let (code, _, body) = proxy.get(&host, "/").unwrap();
    assert_eq!((code, body.trim()), (200, marker.as_str()));
    let (code, _, body) = proxy.get(&host, "/cgi-bin/canary").unwrap();
    let digest: String = sha2::Sha256::digest(canary.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!((code, body.trim()), (200, format!("env={digest}\nfile={digest}").as_str()), "the app's answer");

    println!("canary_ready_s={}", started.elapsed().as_secs());
    let mut scan = Scan { stack, client: client.clone(), needle: Needle::new(&canary), hits: Vec::new() };
    println!("canary_forms={:?}", scan.needle.forms());
    // The search reads what it should: the served marker is in a layer, found once gunzipped.
    let (layers, _) = Needle::new(&marker).find_in_tree(stack.registry.dir(), &[]).unwrap();
    assert!(layers.iter().any(|h| h.form == "raw" && h.place.ends_with("(gunzipped)")), "{layers:?}");
    scan.all("ready", true).await;

    // The pull request is closed: the receiver deletes the Environment, and everything goes.
    let closed = pull_request("closed", &sha, "2026-01-01T00:05:00Z");
    let (code, body) = receiver.deliver("pull_request", &delivery(), WEBHOOK_SECRET, &closed).unwrap();
    assert_eq!(code, 202, "{body}");
    eventually("the Environment to go", STEP_TIMEOUT, || async {
        envs.get_opt("shop-pr-1").await.unwrap().is_none().then_some(())
    })
    .await;
    stack::assert_nothing_left(&stack.local_dir(NAMESPACE), &watch.seen());
    let roles: Vec<String> = watch.seen().into_iter().map(|s| s.role).collect();
    assert!(roles.contains(&"builder".to_owned()) && roles.contains(&"preview".to_owned()), "{roles:?}");
    let kept: Vec<_> = std::fs::read_dir(stack.dir.path().join("instance-files"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for seen in watch.seen() {
        for file in ["agent.json", "agent.log"] {
            assert!(
                kept.contains(&format!("{}.{file}", seen.instance)),
                "{file} of {} not kept: {kept:?}",
                seen.instance
            );
        }
    }
    scan.all("after teardown", false).await;

    println!("canary_hits={}", scan.hits.len());
    assert!(
        scan.hits.is_empty(),
        "the canary leaked:\n{}",
        scan.hits.iter().map(|h| format!("  {h}")).collect::<Vec<_>>().join("\n")
    );
}
