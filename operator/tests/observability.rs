//! Observability end to end, against a real Prometheus (Debian's `prometheus` package) scraping
//! the operator, the webhook receiver and the edge proxy every second while the whole flow runs:
//! a signed `pull_request` webhook becomes an Environment that goes Ready, its URL answers through
//! the edge proxy, GitHub (the fake behind Prism) gets its feedback, and a `closed` webhook tears
//! it down. Then:
//!
//! - every query of every panel of the chart's Grafana dashboard (`dashboards/stagely.json`,
//!   Grafana's `$__rate_interval` replaced by a window covering the whole run) returns data: at
//!   least one series with a finite value;
//! - the chart's PrometheusRule, rendered by `helm template`, passes `promtool check rules`, and
//!   the same Prometheus loads and evaluates its rules with health `ok`;
//! - the Environment's Events tell its story in order, from the run the webhook started to the
//!   teardown;
//! - the operator's JSON log lines of the reconcile carry the Environment's namespace and name
//!   and the webhook's delivery id.
//!
//! Without the flow: `promtool` checks the rendered rules and, as recording rules, every panel's
//! query; `helm lint --strict` passes with both switches on, and neither object renders with them
//! off. A missing `prometheus` or `promtool` fails the tests, naming the package.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/github_fake.rs"]
mod fake;
#[path = "support/prism.rs"]
mod prism;
#[path = "support/stack.rs"]
mod stack;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::Api;
use stack::{BUILD_TIMEOUT, STEP_TIMEOUT, Stack, phase, wait_env};
use stagely_api::v1alpha1::{Environment, EnvironmentPhase};
use stagely_testenv::server::eventually;

const DOMAIN: &str = "preview.example.com";
const NAMESPACE: &str = "observed";
/// The webhook secret `Stack::namespace` gives the Project's credentials Secret.
const WEBHOOK_SECRET: &[u8] = b"whsec_test";

/// A Prometheus server scraping `targets` every second with the rules of `rules`, its storage
/// in a directory of its own; killed when dropped (and with the test process).
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `prometheus` binary on the PATH (or in /usr/bin); fails the test when it is missing.
fn prometheus_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: run scripts/install-deps.sh (Debian's prometheus package)"))
}

impl Prometheus {
    fn start(targets: &[(&str, u16)], rules: &Path) -> Self {
        let dir = tempfile::Builder::new().prefix("stagely-prometheus-").tempdir().unwrap();
        let port = agent_support::free_port();
        let jobs: String = targets
            .iter()
            .map(|(job, port)| {
                format!("  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\nscrape_configs:\n{jobs}",
            rules.display()
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let mut command = Command::new(prometheus_binary("prometheus"));
        command
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = stagely_testenv::spawn_tied(command).expect("prometheus starts");
        agent_support::wait_for("Prometheus to be ready", STEP_TIMEOUT, || {
            agent_support::http_get(port, "/-/ready").filter(|(code, _)| *code == 200)
        });
        Self { child, port, _dir: dir }
    }

    /// GET `path` of the HTTP API (with `query` parameters): its `data`.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let answer: serde_json::Value =
            reqwest::Client::new().get(url).query(query).send().await.unwrap().json().await.unwrap();
        assert_eq!(answer["status"], "success", "{path} {query:?}: {answer}");
        answer["data"].clone()
    }

    /// The instant vector `expr` evaluates to now.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        self.api("/api/v1/query", &[("query", expr)]).await["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Whether an instant vector holds a series with a finite value.
fn has_data(result: &[serde_json::Value]) -> bool {
    result
        .iter()
        .any(|series| series["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite))
}

/// helm, as `scripts/install-helm.sh` builds it.
fn helm() -> Command {
    let cache = std::env::var_os("STAGELY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/stagely"));
    let bin = cache.join("helm-v4.3.1/bin/helm");
    assert!(bin.is_file(), "helm is not built at {}: run scripts/install-helm.sh (or make deps)", bin.display());
    let mut command = Command::new(bin);
    let home = std::env::temp_dir().join(format!("stagely-observability-helm-{}", std::process::id()));
    command.env("HELM_CACHE_HOME", home.join("cache")).env("HELM_CONFIG_HOME", home.join("config"));
    command.env("HELM_DATA_HOME", home.join("data"));
    command
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/stagely")
}

/// The one object `helm template` renders from `template` with `values` set.
fn render(template: &str, values: &[&str]) -> serde_json::Value {
    let mut command = helm();
    command.args(["template", "stagely"]).arg(chart_dir()).args(["--namespace", "stagely-system"]);
    command.args(["--set", &format!("previewDomain={DOMAIN}"), "--show-only", template]);
    for value in values {
        command.args(["--set", value]);
    }
    let out = command.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_yaml::from_slice(&out.stdout).unwrap()
}

/// The chart's alerting rules as a Prometheus rule file in `dir`, checked by `promtool`.
fn rule_file(dir: &Path) -> PathBuf {
    let rule = render("templates/prometheusrule.yaml", &["metrics.prometheusRule.enabled=true"]);
    assert_eq!(rule["kind"], "PrometheusRule", "{rule}");
    let file = dir.join("stagely-rules.yml");
    let groups = serde_json::json!({ "groups": rule["spec"]["groups"] });
    std::fs::write(&file, serde_yaml::to_string(&groups).unwrap()).unwrap();
    let out = Command::new(prometheus_binary("promtool")).args(["check", "rules"]).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

/// Every panel's queries in the chart's dashboard, each with its panel's title; checks that the
/// chart ships that very file as a labelled ConfigMap.
fn dashboard_queries() -> Vec<(String, String)> {
    let file = std::fs::read_to_string(chart_dir().join("dashboards/stagely.json")).unwrap();
    let config_map = render("templates/dashboard.yaml", &["metrics.dashboard.enabled=true"]);
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1", "{config_map}");
    assert_eq!(config_map["data"]["stagely.json"].as_str(), Some(file.trim_end()), "the ConfigMap carries the file");
    let dashboard: serde_json::Value = serde_json::from_str(&file).unwrap();
    let mut queries = Vec::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            queries.push((title, target["expr"].as_str().expect("every target has an expr").to_owned()));
        }
    }
    queries.reverse();
    queries
}

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

/// The reasons and notes of the Events about Environment `name`, oldest first.
async fn story(client: &kube::Client, name: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NAMESPACE);
    let mut events: Vec<_> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().is_some_and(|r| r.kind.as_deref() == Some("Environment")))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    events.into_iter().map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default())).collect()
}

/// Whether `reasons` holds `wanted` in that order (other reasons between them).
fn in_order(reasons: &[&str], wanted: &[&str]) -> bool {
    let mut rest = reasons.iter();
    wanted.iter().all(|want| rest.any(|reason| reason == want))
}

#[test]
fn the_charts_alerts_and_dashboard_queries_pass_promtool_and_helm_lint_with_the_switches_on() {
    let dir = tempfile::tempdir().unwrap();
    rule_file(dir.path());
    // Each panel's query as a recording rule: promtool parses it (without a server to ask).
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| serde_json::json!({"record": format!("stagely:panel_{i}"), "expr": expr.replace("$__rate_interval", "5m")}))
        .collect();
    let file = dir.path().join("panels.yml");
    let groups = serde_json::json!({"groups": [{"name": "panels", "rules": rules}]});
    std::fs::write(&file, serde_yaml::to_string(&groups).unwrap()).unwrap();
    let out = Command::new(prometheus_binary("promtool")).args(["check", "rules"]).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "a dashboard query does not parse:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lint = helm();
    lint.arg("lint").arg(chart_dir()).args(["--strict", "--set", &format!("previewDomain={DOMAIN}")]);
    lint.args(["--set", "metrics.dashboard.enabled=true", "--set", "metrics.prometheusRule.enabled=true"]);
    let out = lint.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "helm lint --strict failed:\n{}", String::from_utf8_lossy(&out.stdout));
    // Off by default: nothing for a CRD the cluster may lack.
    let mut template = helm();
    template.args(["template", "stagely"]).arg(chart_dir()).args(["--set", &format!("previewDomain={DOMAIN}")]);
    let out = template.stdin(Stdio::null()).output().unwrap();
    let manifest = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !manifest.contains("PrometheusRule") && !manifest.contains("grafana_dashboard"));
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_finds_data_for_every_panel_and_evaluates_every_alert_during_the_flow() {
    let started = Instant::now();
    let stack = Stack::shared();
    let github = fake::GitHubFake::default();
    github.add_repo("acme/shop");
    github.add_personal_token("ghp_not_used_by_the_git_source", "stagely-bot");
    let sha = {
        let repo = stack.dir.path().join("repos").join(NAMESPACE);
        let sha = stack::web_app_repo(&repo, "observed");
        github.open_pull("acme/shop", fake::Pull::new(1, "feature-1", &sha));
        stack.namespace(NAMESPACE, &repo, 10).await;
        sha
    };
    let prism = prism::Prism::start(
        "node_modules/@octokit/openapi/generated/api.github.com.json",
        &prism::serve(github.router()),
    );
    github.set_base_url(&prism.url);
    let operator =
        stack.operator_custom(true, &[("--github-api-url", prism.url.as_str()), ("--log-format", "json")], &[]);
    let proxy = stack.edge_proxy(DOMAIN);
    let receiver = stack.webhook_receiver();
    let client = stack.client().await;

    // Prometheus first, so that it sees every series before its first event.
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rule_file(rules_dir.path());
    let queries = dashboard_queries();
    let prometheus = Prometheus::start(
        &[
            ("stagely-operator", operator.ops_port()),
            ("stagely-webhook-receiver", receiver.ops_port),
            ("stagely-edge-proxy", proxy.ops_port),
        ],
        &rules,
    );
    let scraping = Instant::now();
    eventually("Prometheus to scrape all three components", STEP_TIMEOUT, || async {
        let up = prometheus.query("up == 1").await;
        (up.len() == 3).then_some(())
    })
    .await;

    // The flow: a signed webhook, Ready, the URL through the edge proxy.
    let ping = serde_json::to_vec(&serde_json::json!({
        "zen": "Keep it logically awesome.", "hook_id": 1,
        "hook": {"type": "Repository", "id": 1, "name": "web", "active": true, "events": ["pull_request"],
                 "config": {"content_type": "json", "insecure_ssl": "0", "url": "http://127.0.0.1/v1/webhooks/github"}},
        "repository": {"full_name": "acme/shop", "name": "shop"},
    }))
    .unwrap();
    let mut deliveries = 0;
    let mut delivery = || {
        deliveries += 1;
        format!("observed-delivery-{deliveries}")
    };
    eventually("the receiver to answer the ping for acme/shop", STEP_TIMEOUT, || {
        let answer = receiver.deliver("ping", &delivery(), WEBHOOK_SECRET, &ping);
        async move { answer.filter(|(code, _)| *code == 200) }
    })
    .await;
    let opened_by = delivery();
    let (code, body) = receiver
        .deliver("pull_request", &opened_by, WEBHOOK_SECRET, &pull_request("opened", &sha, "2026-01-01T00:00:00Z"))
        .unwrap();
    assert_eq!(code, 202, "{body}");
    let envs: Api<Environment> = Api::namespaced(client.clone(), NAMESPACE);
    let env = wait_env(&envs, "shop-pr-1", "Ready or Failed", BUILD_TIMEOUT + STEP_TIMEOUT, |e| {
        matches!(phase(e), Some(EnvironmentPhase::Ready | EnvironmentPhase::Failed))
    })
    .await;
    assert_eq!(phase(&env), Some(EnvironmentPhase::Ready), "{:#?}", env.status);
    let run = env.status.as_ref().and_then(|s| s.run.as_ref()).unwrap();
    assert!(run.ready_at.is_some(), "the run says when it first became Ready: {run:?}");
    let host = format!("{}.{DOMAIN}", env.status.as_ref().unwrap().subdomain_hash.as_ref().unwrap());
    for _ in 0..3 {
        let (code, _, body) = proxy.get(&host, "/").unwrap();
        assert_eq!((code, body.trim()), (200, "observed"));
    }
    eventually("the pull request's GitHub Deployment to succeed", STEP_TIMEOUT, || async {
        let states: Vec<String> =
            github.deployments("acme/shop").into_iter().flat_map(|d| d.statuses.into_iter().map(|s| s.state)).collect();
        states.iter().any(|s| s == "success").then_some(())
    })
    .await;

    // Every panel has data.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut pending = queries.clone();
    loop {
        // Grafana's `$__rate_interval`: a window covering the whole run.
        let window = format!("{}s", scraping.elapsed().as_secs() + 60);
        let mut still = Vec::new();
        let mut last = Vec::new();
        for (title, expr) in pending {
            let concrete = expr.replace("$__rate_interval", &window);
            let result = prometheus.query(&concrete).await;
            if !has_data(&result) {
                last.push(format!("{title}: {concrete} -> {}", serde_json::Value::from(result)));
                still.push((title, expr));
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "panels without data:\n  {}", last.join("\n  "));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("observability_queries_with_data={}", queries.len());

    // Every alert is loaded and evaluated.
    let rules = eventually("every alerting rule to be evaluated", STEP_TIMEOUT, || async {
        let groups = prometheus.api("/api/v1/rules", &[]).await["groups"].clone();
        let rules: Vec<serde_json::Value> = groups
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules.iter().all(|r| r["health"] != "unknown" && r["lastEvaluation"] != "0001-01-01T00:00:00Z").then_some(rules)
    })
    .await;
    let mut names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap_or_default()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "StagelyCloudProviderNotReady",
            "StagelyEnvironmentStuck",
            "StagelyGitHubRateLimitLow",
            "StagelyOrphanedVMsFound"
        ]
    );
    for rule in &rules {
        assert_eq!((rule["type"].as_str(), rule["health"].as_str()), (Some("alerting"), Some("ok")), "{rule}");
    }

    // The operator's JSON log: the reconcile's lines name the Environment and the delivery.
    let log = std::fs::read_to_string(stack.operator_log()).unwrap();
    let ready_line = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["fields"]["message"] == "ready, counted from the webhook that started the run")
        .unwrap_or_else(|| {
            panic!("no JSON line counting the time from the webhook to Ready in {}", stack.operator_log().display())
        });
    let span = &ready_line["span"];
    assert_eq!(
        (span["namespace"].as_str(), span["environment"].as_str(), span["delivery"].as_str()),
        (Some(NAMESPACE), Some("shop-pr-1"), Some(opened_by.as_str())),
        "{ready_line}"
    );

    // The Events tell the story in order: the run the webhook started, then teardown.
    let told = story(&client, "shop-pr-1").await;
    let reasons: Vec<&str> = told.iter().map(|(reason, _)| reason.as_str()).collect();
    assert!(in_order(&reasons, &["Building", "VMCreated", "DeploySent", "Ready"]), "{told:#?}");
    assert!(reasons.contains(&"Deploying"), "the phase Deploying is told: {told:#?}");
    let first_run = told.iter().find(|(_, note)| note.starts_with("run of commit")).expect("the run is told");
    assert!(first_run.1.contains(&format!("started (webhook delivery {opened_by})")), "{told:#?}");
    let (code, body) = receiver
        .deliver("pull_request", &delivery(), WEBHOOK_SECRET, &pull_request("closed", &sha, "2026-01-01T00:05:00Z"))
        .unwrap();
    assert_eq!(code, 202, "{body}");
    eventually("the Environment to go", STEP_TIMEOUT, || async {
        envs.get_opt("shop-pr-1").await.unwrap().is_none().then_some(())
    })
    .await;
    let told = story(&client, "shop-pr-1").await;
    let reasons: Vec<&str> = told.iter().map(|(reason, _)| reason.as_str()).collect();
    assert!(in_order(&reasons, &["Ready", "Terminating", "VMTerminated", "TornDown"]), "{told:#?}");
    println!("observability_test_s={}", started.elapsed().as_secs());
}
