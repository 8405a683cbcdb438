//! Webhook payloads as GitHub sends them, built from `examples/webhook/pull-request-opened.json`
//! (a complete `pull_request` payload), and checked against GitHub's published schemas
//! (`@octokit/webhooks-schemas`, installed in `tools/webhook-schemas` by
//! `scripts/install-deps.sh`) before a test sends them.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use serde_json::{Value, json};

/// The commit ids tests use, by index.
pub fn sha(n: u32) -> String {
    format!("{n:08x}").repeat(5)
}

/// A pull request at one moment.
#[derive(Clone, Debug)]
pub struct Pr {
    /// The repository it merges into, `owner/name`.
    pub repository: String,
    /// Its number.
    pub number: i64,
    /// Its head commit.
    pub sha: String,
    /// Its head branch.
    pub head_ref: String,
    /// Its base branch.
    pub base_ref: String,
    /// `updated_at`, as seconds after a fixed moment.
    pub updated: i64,
    /// Its labels.
    pub labels: Vec<String>,
    /// A draft.
    pub draft: bool,
    /// From a fork (`mallory/<name>`).
    pub fork: bool,
}

impl Pr {
    /// Pull request `number` of `repository` at commit `sha(1)`, updated at second 0.
    pub fn new(repository: &str, number: i64) -> Self {
        Self {
            repository: repository.into(),
            number,
            sha: sha(1),
            head_ref: format!("feature-{number}"),
            base_ref: "main".into(),
            updated: 0,
            labels: Vec::new(),
            draft: false,
            fork: false,
        }
    }

    /// At commit `sha(n)`, updated at second `updated`.
    pub fn at(&self, n: u32, updated: i64) -> Self {
        Self { sha: sha(n), updated, ..self.clone() }
    }

    /// `updated_at` as GitHub writes it.
    pub fn updated_at(&self) -> String {
        k8s_openapi::jiff::Timestamp::from_second(1_790_000_000 + self.updated).unwrap().to_string()
    }
}

fn template() -> &'static Value {
    static TEMPLATE: OnceLock<Value> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/webhook/pull-request-opened.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

/// The template payload, unchanged.
pub fn example() -> Value {
    template().clone()
}

fn label(name: &str) -> Value {
    json!({
        "id": 7_000_000 + name.len(), "node_id": "LA_kwDOGx7qF88AAAABg", "url": format!("https://api.github.com/labels/{name}"),
        "name": name, "color": "0e8a16", "default": false, "description": null,
    })
}

fn point_at(repo: &mut Value, full_name: &str) {
    let (owner, name) = full_name.split_once('/').unwrap();
    repo["full_name"] = json!(full_name);
    repo["name"] = json!(name);
    repo["owner"]["login"] = json!(owner);
    repo["html_url"] = json!(format!("https://github.com/{full_name}"));
    repo["url"] = json!(format!("https://api.github.com/repos/{full_name}"));
}

/// The `pull_request` payload of `action` on `pr`, shaped as GitHub's schema for that action
/// wants it (`before`/`after` for synchronize, `label` for labeled, `changes` for edited, …).
pub fn pull_request(action: &str, pr: &Pr) -> Value {
    let mut payload = template().clone();
    payload["action"] = json!(action);
    payload["number"] = json!(pr.number);
    point_at(&mut payload["repository"], &pr.repository);
    let body = &mut payload["pull_request"];
    body["number"] = json!(pr.number);
    body["html_url"] = json!(format!("https://github.com/{}/pull/{}", pr.repository, pr.number));
    body["updated_at"] = json!(pr.updated_at());
    body["draft"] = json!(pr.draft);
    body["labels"] = Value::Array(pr.labels.iter().map(|name| label(name)).collect());
    point_at(&mut body["base"]["repo"], &pr.repository);
    body["base"]["ref"] = json!(pr.base_ref);
    body["head"]["ref"] = json!(pr.head_ref);
    body["head"]["sha"] = json!(pr.sha);
    if pr.fork {
        let name = pr.repository.split_once('/').unwrap().1;
        point_at(&mut body["head"]["repo"], &format!("mallory/{name}"));
        body["head"]["repo"]["fork"] = json!(true);
        body["head"]["label"] = json!(format!("mallory:{}", pr.head_ref));
    } else {
        point_at(&mut body["head"]["repo"], &pr.repository);
    }
    match action {
        "closed" => {
            body["state"] = json!("closed");
            body["closed_at"] = json!(pr.updated_at());
        }
        "synchronize" => {
            payload["before"] = json!(sha(0));
            payload["after"] = json!(pr.sha);
        }
        "labeled" | "unlabeled" => {
            let name = pr.labels.last().cloned().unwrap_or_else(|| "preview".into());
            payload["label"] = label(&name);
        }
        "edited" => {
            payload["changes"] = json!({"base": {"ref": {"from": "develop"}, "sha": {"from": sha(0)}}});
        }
        _ => {}
    }
    payload
}

/// The `unlabeled` payload of `pr` after `removed` was taken off.
pub fn unlabeled(pr: &Pr, removed: &str) -> Value {
    let mut payload = pull_request("unlabeled", pr);
    payload["label"] = label(removed);
    payload
}

/// A repository webhook's `ping` for `repository`.
pub fn ping(repository: &str) -> Value {
    let mut payload = json!({
        "zen": "Design for failure.",
        "hook_id": 512_345_678,
        "hook": {
            "type": "Repository", "id": 512_345_678, "name": "web", "active": true, "events": ["pull_request"],
            "config": {"content_type": "json", "insecure_ssl": "0", "url": "https://stagely.example.com/v1/webhooks/github"},
            "updated_at": "2026-01-20T14:31:07Z", "created_at": "2026-01-20T14:31:07Z",
            "url": format!("https://api.github.com/repos/{repository}/hooks/512345678"),
            "test_url": format!("https://api.github.com/repos/{repository}/hooks/512345678/test"),
            "ping_url": format!("https://api.github.com/repos/{repository}/hooks/512345678/pings"),
            "deliveries_url": format!("https://api.github.com/repos/{repository}/hooks/512345678/deliveries"),
            "last_response": {"code": null, "status": "unused", "message": null},
        },
        "sender": template()["sender"].clone(),
    });
    let mut repo = template()["repository"].clone();
    point_at(&mut repo, repository);
    payload["repository"] = repo;
    payload
}

/// A `push` payload (an event the receiver ignores).
pub fn push(repository: &str) -> Value {
    let mut repo = template()["repository"].clone();
    point_at(&mut repo, repository);
    // A push event's repository carries its timestamps as numbers, and a few fields more.
    repo["created_at"] = json!(1_762_161_164);
    repo["pushed_at"] = json!(1_768_919_467);
    repo["stargazers"] = json!(3);
    repo["master_branch"] = json!("main");
    let author = json!({"name": "The Octocat", "email": "octocat@example.com", "username": "octocat"});
    json!({
        "ref": "refs/heads/main", "before": sha(0), "after": sha(1), "created": false, "deleted": false,
        "forced": false, "base_ref": null, "compare": format!("https://github.com/{repository}/compare/a...b"),
        "commits": [], "head_commit": {
            "id": sha(1), "tree_id": sha(2), "distinct": true, "message": "Update README",
            "timestamp": "2026-01-20T14:31:07Z", "url": format!("https://github.com/{repository}/commit/{}", sha(1)),
            "author": author, "committer": author, "added": [], "removed": [], "modified": ["README.md"],
        },
        "repository": repo, "pusher": {"name": "octocat", "email": "octocat@example.com"},
        "sender": template()["sender"].clone(),
    })
}

struct Validator {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

fn validator() -> &'static Mutex<Validator> {
    static VALIDATOR: OnceLock<Mutex<Validator>> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/webhook-schemas"));
        assert!(
            dir.join("node_modules/@octokit/webhooks-schemas/schema.json").exists(),
            "GitHub's webhook schemas are not installed in {}: run `make deps` (scripts/install-deps.sh runs \
             `npm ci --prefix tools/webhook-schemas`)",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg(dir.join("validate.mjs"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("node (Node.js, which validates the payloads) does not run: {err}; run `make deps`")
            });
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Mutex::new(Validator { _child: child, stdin, stdout })
    })
}

/// Panics unless `payload` is valid against GitHub's schema for `event` (and its action).
pub fn assert_valid(event: &str, payload: &Value) {
    let mut validator = validator().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let line = json!({"event": event, "payload": payload}).to_string();
    writeln!(validator.stdin, "{line}").expect("the schema validator runs");
    let mut answer = String::new();
    validator.stdout.read_line(&mut answer).expect("the schema validator answers");
    assert_eq!(answer.trim_end(), "ok", "the test's {event} payload is not what GitHub sends");
}
