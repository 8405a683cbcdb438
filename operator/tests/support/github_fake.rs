//! A hand-written, stateful, in-memory fake of the parts of GitHub's REST API Stagely calls: App
//! installation tokens, repositories, contents, pull requests, deployments with their statuses,
//! and issue comments. It exists because GitHub cannot run here (no internet, no GitHub
//! Enterprise image); it always runs behind Prism (see `prism.rs`), which checks every request
//! and every answer against GitHub's published OpenAPI description (`@octokit/openapi`'s
//! `generated/api.github.com.json`, pinned in `tools/prism`), so neither a client nor this fake
//! can drift from GitHub's contract unnoticed.
//!
//! What it models, as GitHub does:
//! - **Auth.** `POST /app/installations/{id}/access_tokens` takes `Bearer <JWT>` and verifies the
//!   JWT: RS256, signed with the App's key, `iss` the App id (string or number), `iat`/`exp`
//!   present, `exp` in the future and at most 10 minutes after `iat`, `iat` at most 60 s ahead.
//!   Everything else takes `Bearer <t>` or `token <t>`: a registered personal token (reaching
//!   every repository) or an unexpired installation token (reaching its installation's
//!   repositories, or the subset and permissions it was minted for: other repositories answer
//!   404, missing permissions 403 "Resource not accessible by integration"). An unknown or
//!   expired token answers 401 "Bad credentials", no `Authorization` 401 "Requires
//!   authentication" (GitHub would show a public repository to an anonymous caller; Stagely never
//!   calls anonymously, so the fake refuses).
//! - **Rate limits.** Every authenticated answer carries `x-ratelimit-{limit,remaining,reset,
//!   used,resource}` from the caller's budget: one per personal token, one per installation
//!   (shared by its tokens, as on GitHub), one for the App's JWT. An exhausted budget answers
//!   403 with `x-ratelimit-remaining: 0`. 304 answers are not charged.
//! - **Conditional requests.** Every 200 answer to a GET carries a weak `ETag` (of the body and
//!   the caller); `If-None-Match` with it answers 304 with no body.
//! - **Pagination.** Lists take `per_page` (default 30, at most 100) and `page`, and answer a
//!   `Link` header with `prev`/`next`/`last`/`first` as GitHub does. Links (and the API URLs in
//!   bodies) use the base URL set with [`GitHubFake::set_base_url`], which tests set to Prism's
//!   URL so that following `next` goes through Prism again.
//! - **Time.** Object timestamps come from a clock that never repeats a second, so a push always
//!   moves a pull request's `updated_at` forward, however fast a test runs. Token expiry uses the
//!   real clock.
//!
//! Simplifications: blob `sha`s are not git's SHA-1 (they are derived from the content); an
//! issue exists only as a seeded pull request; only one App; content of any size is returned
//! inline; a deployment's `ref` must be a 40-hex sha, a branch set with
//! [`GitHubFake::set_branch`] or a pull request's head branch (else 422, as for an unknown ref);
//! required status contexts are recorded, never enforced.
//!
//! **Prism's own limits.** It matches `contents/{path}` with one path segment only (the spec's
//! `x-multi-segment` is ignored) and refuses `contents/` (an empty `path`) with 422: through
//! Prism, files and directories must sit at the repository root; nested paths and the root
//! listing work on the fake's own URL.
//!
//! **Faults and Prism.** [`GitHubFake::fail_next`] makes the next N requests matching a method
//! and path prefix fail. Prism `--errors` turns an answer into its own 500 only when it breaks a
//! response the spec *declares*: an answer whose status the operation does not declare is passed
//! through unchanged with a warning in an `sl-violations` header (Prism's validator rates an
//! undeclared status an error only for 2xx). So 500 JSON, 502 HTML, 429 and the secondary-limit
//! 403 pass through Prism as they are (a declared status must carry a body valid for it: the
//! fake's JSON errors are GitHub's `basic-error`). [`Fault::EmptyPage`] is a valid 200 and
//! passes too. [`Fault::TruncatedBody`] cuts the connection mid-body, and Prism rewrites that:
//! it answers a whole 500 `application/problem+json` of its own ("FetchError … Premature
//! close"), so a test of a cut-off answer must talk to the fake's own URL (the one
//! `prism::serve(fake.router())` returns), bypassing Prism.

// Each test binary uses its own part of the fake's API.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const DOCS: &str = "https://docs.github.com/rest";
const RATE_DOCS: &str = "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api";

/// The fake; clones share state.
#[derive(Clone, Default)]
pub struct GitHubFake {
    inner: Arc<Mutex<Inner>>,
}

/// A pull request as the fake keeps it. Seed one with [`Pull::new`] and struct update syntax;
/// the fake sets `id` and the timestamps.
#[derive(Clone, Debug)]
pub struct Pull {
    /// Its number (also its issue number).
    pub number: u64,
    /// Its title.
    pub title: String,
    /// `open` or `closed`.
    pub state: String,
    /// Whether it is a draft.
    pub draft: bool,
    /// The head branch.
    pub head_ref: String,
    /// The head commit.
    pub head_sha: String,
    /// The head repository's `owner/name`; `None` for the base repository itself (not a fork).
    pub head_repo: Option<String>,
    /// The base branch.
    pub base_ref: String,
    /// Its author's login.
    pub user: String,
    /// Its label names.
    pub labels: Vec<String>,
    /// Creation time, epoch seconds (set by the fake).
    pub created_at: u64,
    /// Last change, epoch seconds (set by the fake; moves on every change).
    pub updated_at: u64,
    /// When it was closed, epoch seconds.
    pub closed_at: Option<u64>,
    /// Its id (set by the fake).
    pub id: u64,
}

impl Pull {
    /// An open, non-draft pull request by `octocat` from `head_ref` at `head_sha` into `main`.
    pub fn new(number: u64, head_ref: &str, head_sha: &str) -> Self {
        Self {
            number,
            title: format!("Pull request #{number}"),
            state: "open".into(),
            draft: false,
            head_ref: head_ref.into(),
            head_sha: head_sha.into(),
            head_repo: None,
            base_ref: "main".into(),
            user: "octocat".into(),
            labels: Vec::new(),
            created_at: 0,
            updated_at: 0,
            closed_at: None,
            id: 0,
        }
    }
}

/// A deployment as created through the API, with what the client sent.
#[derive(Clone, Debug)]
pub struct Deployment {
    /// Its id.
    pub id: u64,
    /// `ref` as sent.
    pub git_ref: String,
    /// The commit `ref` resolved to.
    pub sha: String,
    /// `task` (default `deploy`).
    pub task: String,
    /// `environment` (default `production`).
    pub environment: String,
    /// `transient_environment` as sent.
    pub transient_environment: Option<bool>,
    /// `production_environment` as sent.
    pub production_environment: Option<bool>,
    /// `auto_merge` as sent.
    pub auto_merge: Option<bool>,
    /// `required_contexts` as sent.
    pub required_contexts: Option<Vec<String>>,
    /// `description` as sent.
    pub description: Option<String>,
    /// `payload` as sent (`{}` when absent).
    pub payload: Value,
    /// Who created it (a login, `<slug>[bot]` for an App).
    pub creator: String,
    /// Creation time, epoch seconds.
    pub created_at: u64,
    /// Its statuses, oldest first.
    pub statuses: Vec<DeploymentStatus>,
}

/// A deployment status as created through the API (or by GitHub's `auto_inactive`).
#[derive(Clone, Debug)]
pub struct DeploymentStatus {
    /// Its id.
    pub id: u64,
    /// `state` as sent.
    pub state: String,
    /// `environment_url` as sent.
    pub environment_url: Option<String>,
    /// `log_url` as sent.
    pub log_url: Option<String>,
    /// `description` as sent.
    pub description: Option<String>,
    /// `environment` as sent.
    pub environment: Option<String>,
    /// `auto_inactive` as sent; `None` also for a status GitHub added itself.
    pub auto_inactive: Option<bool>,
    /// Who created it.
    pub creator: String,
    /// Creation time, epoch seconds.
    pub created_at: u64,
}

/// An issue comment that exists (deleted ones are gone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comment {
    /// Its id.
    pub id: u64,
    /// The issue (pull request) number.
    pub issue: u64,
    /// Its body.
    pub body: String,
    /// Its author's login.
    pub user: String,
    /// Creation time, epoch seconds.
    pub created_at: u64,
    /// Last edit, epoch seconds.
    pub updated_at: u64,
}

/// How a request authenticated, as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// No `Authorization` header.
    None,
    /// A JWT (valid or not) on `Bearer`.
    AppJwt,
    /// A valid token of this installation.
    Installation(u64),
    /// A registered personal token of this login.
    Personal(String),
    /// Anything else: unknown, expired or malformed.
    Invalid,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query, `""` when none.
    pub query: String,
    /// How it authenticated.
    pub auth: Auth,
}

/// An installation token the fake minted.
#[derive(Clone, Debug)]
pub struct MintedToken {
    /// The token.
    pub token: String,
    /// Its installation.
    pub installation: u64,
    /// Expiry, epoch seconds.
    pub expires_at: u64,
    /// The repositories (`owner/name`) it was limited to, when it was.
    pub repositories: Option<Vec<String>>,
    /// Its permissions (name → `read`/`write`).
    pub permissions: BTreeMap<String, String>,
}

/// Whose rate-limit budget: GitHub keeps one per personal token, one per installation (all its
/// tokens share it) and one for the App itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateSubject {
    /// A personal token.
    Token(String),
    /// An installation's tokens.
    Installation(u64),
    /// The App's JWT.
    App,
}

/// A fault to inject; see [`GitHubFake::fail_next`].
#[derive(Clone, Debug)]
pub enum Fault {
    /// 500 with GitHub's JSON error.
    ServerError,
    /// 502 with an HTML body, as GitHub's front end answers.
    BadGateway,
    /// 429 with `retry-after`.
    TooManyRequests {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// GitHub's secondary rate limit: 403 with `retry-after`, `x-ratelimit-remaining` not 0.
    SecondaryRateLimit {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// The real answer's headers (`Link` included) with an empty JSON array for a body, as when a
    /// list shrinks between two pages.
    EmptyPage,
    /// The real answer, cut off halfway through its body: the connection drops.
    TruncatedBody,
}

struct App {
    id: u64,
    key: DecodingKey,
    slug: String,
}

struct Installation {
    repos: Vec<String>,
    permissions: BTreeMap<String, String>,
    token_lifetime: Duration,
}

struct Repo {
    id: u64,
    full_name: String,
    private: bool,
    default_branch: String,
    branches: HashMap<String, String>,
    /// Commit sha → path → content.
    files: HashMap<String, BTreeMap<String, Vec<u8>>>,
    pulls: BTreeMap<u64, Pull>,
    deployments: Vec<Deployment>,
    created_at: u64,
}

struct StoredComment {
    repo: String,
    comment: Comment,
}

struct Budget {
    limit: u64,
    used: u64,
    reset: u64,
}

struct FaultRule {
    method: Method,
    prefix: String,
    times: usize,
    fault: Fault,
}

struct Inner {
    base_url: Option<String>,
    clock: u64,
    next_id: u64,
    app: Option<App>,
    installations: BTreeMap<u64, Installation>,
    tokens: HashMap<String, MintedToken>,
    minted: Vec<MintedToken>,
    personal: HashMap<String, String>,
    repos: BTreeMap<String, Repo>,
    comments: BTreeMap<u64, StoredComment>,
    budgets: HashMap<RateSubject, Budget>,
    default_limit: u64,
    faults: Vec<FaultRule>,
    requests: Vec<RequestRecord>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            base_url: None,
            clock: 0,
            next_id: 1000,
            app: None,
            installations: BTreeMap::new(),
            tokens: HashMap::new(),
            minted: Vec::new(),
            personal: HashMap::new(),
            repos: BTreeMap::new(),
            comments: BTreeMap::new(),
            budgets: HashMap::new(),
            default_limit: 5000,
            faults: Vec::new(),
            requests: Vec::new(),
        }
    }
}

/// Permissions an installation gets unless a test says otherwise.
const DEFAULT_PERMISSIONS: [(&str, &str); 5] = [
    ("contents", "read"),
    ("deployments", "write"),
    ("issues", "write"),
    ("metadata", "read"),
    ("pull_requests", "write"),
];

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970").as_secs()
}

fn rfc3339(secs: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs as i64).expect("a valid timestamp").to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha_of(data: &[u8]) -> String {
    hex(&Sha256::digest(data))[..40].to_owned()
}

/// The PKCS#1 DER of an RSA public key in PEM: jsonwebtoken without its `use_pem` feature reads
/// only that, and `openssl rsa -pubout` writes it wrapped in a SubjectPublicKeyInfo.
fn rsa_public_key_der(text: &str) -> Vec<u8> {
    let block = pem::parse(text).expect("an RSA public key in PEM");
    match block.tag() {
        "RSA PUBLIC KEY" => block.contents().to_vec(),
        "PUBLIC KEY" => {
            // SEQUENCE { AlgorithmIdentifier, BIT STRING { 0 unused bits, RSAPublicKey } }
            let (_, info, _) = der_element(block.contents());
            let (_, _, rest) = der_element(info);
            let (tag, bits, _) = der_element(rest);
            assert_eq!(tag, 0x03, "a SubjectPublicKeyInfo ends in a BIT STRING");
            bits[1..].to_vec()
        }
        tag => panic!("an RSA public key in PEM, not {tag}"),
    }
}

/// One DER element: (tag, contents, what follows).
fn der_element(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (der[0], der[1] as usize);
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let octets = first & 0x7f;
        (der[2..2 + octets].iter().fold(0, |len, b| len << 8 | *b as usize), 2 + octets)
    };
    (tag, &der[start..start + len], &der[start + len..])
}

/// A stable id for a login, so a user has the same id in every answer.
fn user_id(login: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    login.hash(&mut hasher);
    hasher.finish() % 90_000_000 + 1_000_000
}

fn level(permission: &str) -> u8 {
    match permission {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 0,
    }
}

impl Inner {
    /// The next object timestamp: now, but always after the last one handed out.
    fn tick(&mut self) -> u64 {
        self.clock = now().max(self.clock + 1);
        self.clock
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn repo_mut(&mut self, full_name: &str) -> &mut Repo {
        self.repos.get_mut(&full_name.to_lowercase()).unwrap_or_else(|| panic!("no repository {full_name} seeded"))
    }

    fn budget(&mut self, subject: &RateSubject) -> &mut Budget {
        let limit = self.default_limit;
        let budget =
            self.budgets.entry(subject.clone()).or_insert_with(|| Budget { limit, used: 0, reset: now() + 3600 });
        if now() >= budget.reset {
            budget.used = 0;
            budget.reset = now() + 3600;
        }
        budget
    }
}

/// What the caller authenticated as; handlers receive it as a request extension.
#[derive(Clone, Debug)]
enum Caller {
    App,
    Installation(MintedToken),
    Personal { token: String, login: String },
}

impl Caller {
    fn subject(&self) -> RateSubject {
        match self {
            Caller::App => RateSubject::App,
            Caller::Installation(token) => RateSubject::Installation(token.installation),
            Caller::Personal { token, .. } => RateSubject::Token(token.clone()),
        }
    }
}

/// The API base URL answers point at.
#[derive(Clone)]
struct Base(String);

impl GitHubFake {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// API URLs in answers and `Link` headers start with `url` (tests give Prism's URL); until it
    /// is set they use the request's `Host`.
    pub fn set_base_url(&self, url: &str) {
        self.lock().base_url = Some(url.trim_end_matches('/').to_owned());
    }

    // ---- seeding ----

    /// Adds the repository `owner/name` (public, default branch `main`).
    pub fn add_repo(&self, full_name: &str) {
        let (owner, name) = full_name.split_once('/').expect("owner/name");
        assert!(!owner.is_empty() && !name.is_empty(), "owner/name");
        let mut inner = self.lock();
        let id = inner.next_id();
        let created_at = inner.tick();
        inner.repos.insert(
            full_name.to_lowercase(),
            Repo {
                id,
                full_name: full_name.to_owned(),
                private: false,
                default_branch: "main".into(),
                branches: HashMap::new(),
                files: HashMap::new(),
                pulls: BTreeMap::new(),
                deployments: Vec::new(),
                created_at,
            },
        );
    }

    /// Marks a repository private (it answers the same; only `private` changes).
    pub fn set_private(&self, full_name: &str, private: bool) {
        self.lock().repo_mut(full_name).private = private;
    }

    /// Points branch `name` at `sha` (refs are resolved through branches and pull request heads).
    pub fn set_branch(&self, full_name: &str, name: &str, sha: &str) {
        self.lock().repo_mut(full_name).branches.insert(name.to_owned(), sha.to_owned());
    }

    /// Adds a file at commit `sha`. A path with `/` makes its directories exist (through Prism
    /// only root-level paths can be fetched: Prism matches `contents/{path}` as one segment).
    pub fn add_file(&self, full_name: &str, sha: &str, path: &str, content: impl Into<Vec<u8>>) {
        let mut inner = self.lock();
        let repo = inner.repo_mut(full_name);
        repo.files.entry(sha.to_owned()).or_default().insert(path.trim_matches('/').to_owned(), content.into());
    }

    /// Opens (or replaces) a pull request; its timestamps and id are set now.
    pub fn open_pull(&self, full_name: &str, mut pull: Pull) {
        let mut inner = self.lock();
        let at = inner.tick();
        pull.id = inner.next_id();
        pull.created_at = at;
        pull.updated_at = at;
        if pull.state == "closed" {
            pull.closed_at = Some(at);
        }
        inner.repo_mut(full_name).pulls.insert(pull.number, pull);
    }

    fn change_pull(&self, full_name: &str, number: u64, change: impl FnOnce(&mut Pull, u64)) {
        let mut inner = self.lock();
        let at = inner.tick();
        let repo = inner.repo_mut(full_name);
        let pull = repo.pulls.get_mut(&number).unwrap_or_else(|| panic!("no pull request #{number} in {full_name}"));
        change(pull, at);
        pull.updated_at = at;
    }

    /// Closes a pull request.
    pub fn close_pull(&self, full_name: &str, number: u64) {
        self.change_pull(full_name, number, |pull, at| {
            pull.state = "closed".into();
            pull.closed_at = Some(at);
        });
    }

    /// Reopens a pull request.
    pub fn reopen_pull(&self, full_name: &str, number: u64) {
        self.change_pull(full_name, number, |pull, _| {
            pull.state = "open".into();
            pull.closed_at = None;
        });
    }

    /// A new head commit on a pull request (moves `updated_at`).
    pub fn push_pull(&self, full_name: &str, number: u64, sha: &str) {
        self.change_pull(full_name, number, |pull, _| pull.head_sha = sha.to_owned());
    }

    /// Replaces a pull request's labels (moves `updated_at`).
    pub fn set_labels(&self, full_name: &str, number: u64, labels: &[&str]) {
        self.change_pull(full_name, number, |pull, _| pull.labels = labels.iter().map(|l| (*l).to_owned()).collect());
    }

    /// Configures the GitHub App: its id, slug (its bot is `<slug>[bot]`) and RSA public key, PEM
    /// (`PUBLIC KEY` as `openssl rsa -pubout` writes it, or `RSA PUBLIC KEY`).
    pub fn set_app(&self, app_id: u64, slug: &str, public_key_pem: &str) {
        let key = DecodingKey::from_rsa_der(&rsa_public_key_der(public_key_pem));
        self.lock().app = Some(App { id: app_id, key, slug: slug.to_owned() });
    }

    /// Installs the App on `repos` (`owner/name`) with the default permissions (contents read,
    /// deployments, issues and pull requests write, metadata read).
    pub fn add_installation(&self, installation_id: u64, repos: &[&str]) {
        let permissions = DEFAULT_PERMISSIONS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let repos = repos.iter().map(|r| r.to_lowercase()).collect();
        let token_lifetime = Duration::from_secs(3600);
        self.lock().installations.insert(installation_id, Installation { repos, permissions, token_lifetime });
    }

    /// Replaces an installation's permissions (name → `read`/`write`).
    pub fn set_installation_permissions(&self, installation_id: u64, permissions: &[(&str, &str)]) {
        let mut inner = self.lock();
        let installation = inner.installations.get_mut(&installation_id).expect("the installation exists");
        installation.permissions = permissions.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    }

    /// How long an installation's tokens minted from now on live (default one hour; zero makes
    /// them born expired).
    pub fn set_token_lifetime(&self, installation_id: u64, lifetime: Duration) {
        self.lock().installations.get_mut(&installation_id).expect("the installation exists").token_lifetime = lifetime;
    }

    /// Expires every token of an installation now, as if their hour had passed.
    pub fn expire_tokens(&self, installation_id: u64) {
        let mut inner = self.lock();
        let past = now().saturating_sub(1);
        for token in inner.tokens.values_mut().filter(|t| t.installation == installation_id) {
            token.expires_at = past;
        }
    }

    /// Registers a personal access token for `login`; it reaches every repository.
    pub fn add_personal_token(&self, token: &str, login: &str) {
        self.lock().personal.insert(token.to_owned(), login.to_owned());
    }

    /// Sets a rate-limit budget: `limit` per hour with `remaining` left, resetting in an hour.
    pub fn set_rate_limit(&self, subject: RateSubject, limit: u64, remaining: u64) {
        let mut inner = self.lock();
        let budget = inner.budget(&subject);
        budget.limit = limit;
        budget.used = limit.saturating_sub(remaining);
    }

    /// The next `times` requests with `method` whose path starts with `path_prefix` fail with
    /// `fault` (after authentication; before the rate limit, which they do not charge, except
    /// `EmptyPage` and `TruncatedBody`, which are real answers spoiled).
    pub fn fail_next(&self, method: &str, path_prefix: &str, times: usize, fault: Fault) {
        let method = Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        self.lock().faults.push(FaultRule { method, prefix: path_prefix.to_owned(), times, fault });
    }

    // ---- inspection ----

    /// A pull request as it is now.
    pub fn pull(&self, full_name: &str, number: u64) -> Option<Pull> {
        self.lock().repo_mut(full_name).pulls.get(&number).cloned()
    }

    /// A repository's deployments, oldest first, each with its statuses oldest first.
    pub fn deployments(&self, full_name: &str) -> Vec<Deployment> {
        self.lock().repo_mut(full_name).deployments.clone()
    }

    /// The comments on an issue that exist, oldest first.
    pub fn comments(&self, full_name: &str, issue: u64) -> Vec<Comment> {
        let inner = self.lock();
        let repo = full_name.to_lowercase();
        inner
            .comments
            .values()
            .filter(|c| c.repo == repo && c.comment.issue == issue)
            .map(|c| c.comment.clone())
            .collect()
    }

    /// Every installation token minted so far, oldest first.
    pub fn minted_tokens(&self) -> Vec<MintedToken> {
        self.lock().minted.clone()
    }

    /// How many tokens were minted for an installation.
    pub fn tokens_minted(&self, installation_id: u64) -> usize {
        self.lock().minted.iter().filter(|t| t.installation == installation_id).count()
    }

    /// Every request received, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// How many requests with `method` had a path starting with `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.lock().requests.iter().filter(|r| r.method == method && r.path.starts_with(path_prefix)).count()
    }

    /// Requests left in a budget before it is exhausted.
    pub fn rate_remaining(&self, subject: &RateSubject) -> u64 {
        let mut inner = self.lock();
        let budget = inner.budget(subject);
        budget.limit.saturating_sub(budget.used)
    }

    /// The API's routes, behind the authentication, fault, rate-limit and ETag layer.
    pub fn router(&self) -> Router {
        let repo = "/repos/{owner}/{repo}";
        Router::new()
            .route("/app/installations/{installation_id}/access_tokens", post(mint_token))
            .route(repo, get(get_repo))
            .route(&format!("{repo}/contents/"), get(get_root))
            .route(&format!("{repo}/contents/{{*path}}"), get(get_contents))
            .route(&format!("{repo}/pulls"), get(list_pulls))
            .route(&format!("{repo}/pulls/{{number}}"), get(get_pull))
            .route(&format!("{repo}/deployments"), get(list_deployments).post(create_deployment))
            .route(&format!("{repo}/deployments/{{id}}"), get(get_deployment))
            .route(&format!("{repo}/deployments/{{id}}/statuses"), get(list_statuses).post(create_status))
            .route(&format!("{repo}/issues/{{number}}/comments"), get(list_comments).post(create_comment))
            .route(
                &format!("{repo}/issues/comments/{{id}}"),
                get(get_comment).patch(update_comment).delete(delete_comment),
            )
            .fallback(|| async { error(StatusCode::NOT_FOUND, "Not Found") })
            .layer(middleware::from_fn_with_state(self.clone(), gate))
            .with_state(self.clone())
    }

    /// Who the `Authorization` header names; `Err` is the 401 to answer.
    fn authenticate(&self, headers: &HeaderMap, path: &str) -> (Auth, Result<Caller, Response>) {
        let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let (scheme, credential) = value.split_once(' ').unwrap_or((value, ""));
        let credential = credential.trim();
        let is_jwt = credential.split('.').count() == 3;
        let app_path = path.starts_with("/app/");
        if value.is_empty() {
            let message = if app_path { "A JSON web token could not be decoded" } else { "Requires authentication" };
            return (Auth::None, Err(error(StatusCode::UNAUTHORIZED, message)));
        }
        if app_path {
            if !scheme.eq_ignore_ascii_case("bearer") || !is_jwt {
                return (Auth::Invalid, Err(error(StatusCode::UNAUTHORIZED, "A JSON web token could not be decoded")));
            }
            return (
                Auth::AppJwt,
                self.verify_jwt(credential).map(|()| Caller::App).map_err(IntoResponse::into_response),
            );
        }
        if !(scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")) {
            return (Auth::Invalid, Err(bad_credentials()));
        }
        let inner = self.lock();
        if let Some(login) = inner.personal.get(credential) {
            let login = login.clone();
            return (Auth::Personal(login.clone()), Ok(Caller::Personal { token: credential.to_owned(), login }));
        }
        match inner.tokens.get(credential) {
            Some(token) if token.expires_at > now() => {
                (Auth::Installation(token.installation), Ok(Caller::Installation(token.clone())))
            }
            _ if is_jwt => (Auth::AppJwt, Err(bad_credentials())),
            _ => (Auth::Invalid, Err(bad_credentials())),
        }
    }

    fn verify_jwt(&self, jwt: &str) -> Result<(), Refusal> {
        let undecodable = || Refusal(StatusCode::UNAUTHORIZED, "A JSON web token could not be decoded");
        let inner = self.lock();
        let app = inner.app.as_ref().ok_or_else(undecodable)?;
        let mut validation = Validation::new(Algorithm::RS256);
        // Times are checked below, against GitHub's rules rather than the library's.
        validation.validate_exp = false;
        validation.required_spec_claims = HashSet::new();
        let claims = jsonwebtoken::decode::<Value>(jwt, &app.key, &validation).map_err(|_| undecodable())?.claims;
        let issuer = match &claims["iss"] {
            Value::String(s) => s.parse::<u64>().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        };
        if issuer != Some(app.id) {
            return Err(undecodable());
        }
        let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
            return Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued.",
            ));
        };
        let now = now() as i64;
        if iat > now + 60 {
            return Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "'Issued at' claim ('iat') must be an Integer representing a time in the past.",
            ));
        }
        if exp <= now {
            return Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires.",
            ));
        }
        if exp - iat > 600 {
            return Err(Refusal(StatusCode::UNAUTHORIZED, "'Expiration time' claim ('exp') is too far in the future."));
        }
        Ok(())
    }

    fn take_fault(&self, method: &Method, path: &str) -> Option<Fault> {
        let mut inner = self.lock();
        let rule =
            inner.faults.iter_mut().find(|f| f.times > 0 && f.method == method && path.starts_with(&f.prefix))?;
        rule.times -= 1;
        let fault = rule.fault.clone();
        inner.faults.retain(|f| f.times > 0);
        Some(fault)
    }

    fn base(&self, headers: &HeaderMap) -> String {
        self.lock().base_url.clone().unwrap_or_else(|| {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("api.github.com");
            format!("http://{host}")
        })
    }

    /// Finds a repository the caller may reach with `permission` (`None`: metadata only).
    fn reach<'a>(
        inner: &'a mut Inner,
        caller: &Caller,
        owner: &str,
        name: &str,
        permission: Option<(&[&str], &str)>,
    ) -> Result<&'a mut Repo, Refusal> {
        let key = format!("{owner}/{name}").to_lowercase();
        let not_found = || Refusal(StatusCode::NOT_FOUND, "Not Found");
        match caller {
            Caller::App => return Err(Refusal(StatusCode::FORBIDDEN, "A JSON web token cannot be used here")),
            Caller::Personal { .. } => {}
            Caller::Installation(token) => {
                let installation = inner.installations.get(&token.installation).ok_or_else(not_found)?;
                if !installation.repos.contains(&key) {
                    return Err(not_found());
                }
                if let Some(limited) = &token.repositories
                    && !limited.contains(&key)
                {
                    return Err(not_found());
                }
                if let Some((names, wanted)) = permission {
                    let granted = names
                        .iter()
                        .filter_map(|n| token.permissions.get(*n))
                        .any(|level_granted| level(level_granted) >= level(wanted));
                    if !granted {
                        return Err(Refusal(StatusCode::FORBIDDEN, "Resource not accessible by integration"));
                    }
                }
            }
        }
        inner.repos.get_mut(&key).ok_or_else(not_found)
    }
}

/// A refusal with GitHub's error JSON; small, unlike a `Response`, so results carry it cheaply.
struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message, "documentation_url": DOCS, "status": status.as_u16().to_string() })))
        .into_response()
}

fn bad_credentials() -> Response {
    error(StatusCode::UNAUTHORIZED, "Bad credentials")
}

fn set_rate_headers(headers: &mut HeaderMap, budget: &Budget) {
    let remaining = budget.limit.saturating_sub(budget.used);
    headers.insert("x-ratelimit-limit", budget.limit.into());
    headers.insert("x-ratelimit-remaining", remaining.into());
    headers.insert("x-ratelimit-reset", budget.reset.into());
    headers.insert("x-ratelimit-used", budget.used.into());
    headers.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
}

fn fault_response(fault: &Fault) -> Response {
    match fault {
        Fault::ServerError => error(StatusCode::INTERNAL_SERVER_ERROR, "Server Error"),
        Fault::BadGateway => (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>\
             <p>We couldn't respond to your request in time. Sorry about that.</p></body></html>\n",
        )
            .into_response(),
        Fault::TooManyRequests { retry_after } => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
            );
            response.headers_mut().insert(header::RETRY_AFTER, (*retry_after).into());
            response
        }
        Fault::SecondaryRateLimit { retry_after } => {
            let mut response = error(
                StatusCode::FORBIDDEN,
                "You have exceeded a secondary rate limit. Please wait a few minutes before you try again. \
                 If you reach out to GitHub Support for help, please include the request ID FAKE:0000.",
            );
            response.headers_mut().insert(header::RETRY_AFTER, (*retry_after).into());
            response
        }
        Fault::EmptyPage | Fault::TruncatedBody => unreachable!("spoils a real answer"),
    }
}

/// The layer every request passes: log, authenticate, inject faults, rate-limit, answer, then
/// add the rate-limit headers and the ETag (answering 304 when it matches).
async fn gate(State(fake): State<GitHubFake>, mut request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let (auth, caller) = fake.authenticate(request.headers(), &path);
    fake.lock().requests.push(RequestRecord {
        method: method.to_string(),
        path: path.clone(),
        query: request.uri().query().unwrap_or_default().to_owned(),
        auth,
    });
    let caller = match caller {
        Ok(caller) => caller,
        Err(refusal) => return refusal.into_response(),
    };
    let subject = caller.subject();

    let fault = fake.take_fault(&method, &path);
    if let Some(
        fault @ (Fault::ServerError
        | Fault::BadGateway
        | Fault::TooManyRequests { .. }
        | Fault::SecondaryRateLimit { .. }),
    ) = &fault
    {
        let mut response = fault_response(fault);
        set_rate_headers(response.headers_mut(), fake.lock().budget(&subject));
        return response;
    }
    {
        let mut inner = fake.lock();
        let budget = inner.budget(&subject);
        if budget.used >= budget.limit {
            let message = match &subject {
                RateSubject::Installation(id) => format!("API rate limit exceeded for installation ID {id}."),
                _ => "API rate limit exceeded for user.".to_owned(),
            };
            let mut response =
                (StatusCode::FORBIDDEN, Json(json!({ "message": message, "documentation_url": RATE_DOCS })))
                    .into_response();
            set_rate_headers(response.headers_mut(), budget);
            return response;
        }
    }

    let if_none_match = request.headers().get(header::IF_NONE_MATCH).cloned();
    let base = fake.base(request.headers());
    request.extensions_mut().insert(caller);
    request.extensions_mut().insert(Base(base));
    let response = next.run(request).await;

    let (mut parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let mut not_modified = false;
    if method == Method::GET && parts.status == StatusCode::OK {
        let mut hasher = DefaultHasher::new();
        body.hash(&mut hasher);
        subject.hash(&mut hasher);
        let etag = HeaderValue::from_str(&format!("W/\"{:016x}\"", hasher.finish())).unwrap();
        not_modified = if_none_match.as_ref().is_some_and(|sent| {
            sent.to_str().is_ok_and(|sent| sent.split(',').any(|tag| tag.trim() == etag.to_str().unwrap()))
        });
        parts.headers.insert(header::ETAG, etag);
        parts.headers.insert(header::VARY, HeaderValue::from_static("Accept, Authorization, Cookie, X-GitHub-OTP"));
    }
    {
        let mut inner = fake.lock();
        let budget = inner.budget(&subject);
        if !not_modified {
            budget.used += 1;
        }
        set_rate_headers(&mut parts.headers, budget);
    }
    if not_modified {
        parts.status = StatusCode::NOT_MODIFIED;
        parts.headers.remove(header::CONTENT_TYPE);
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::empty());
    }
    match fault {
        Some(Fault::EmptyPage) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from("[]"))
        }
        Some(Fault::TruncatedBody) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            // Half the body, then a pause (so the server flushes the head and that half), then an
            // error, on which the server drops the connection.
            let half = body.slice(..body.len() / 2);
            let stream = futures_util::stream::unfold(0, move |step| {
                let half = half.clone();
                async move {
                    match step {
                        0 => Some((Ok(half), 1)),
                        1 => {
                            tokio::task::yield_now().await;
                            Some((Err(std::io::Error::other("the fake cuts the answer off")), 2))
                        }
                        _ => None,
                    }
                }
            });
            Response::from_parts(parts, Body::from_stream(stream))
        }
        _ => Response::from_parts(parts, Body::from(body)),
    }
}

// ---- JSON shapes (every property GitHub's schema marks required) ----

fn user_json(login: &str, base: &str) -> Value {
    let app = login.strip_suffix("[bot]");
    let web = match app {
        Some(slug) => format!("https://github.com/apps/{slug}"),
        None => format!("https://github.com/{login}"),
    };
    let api = format!("{base}/users/{}", login.replace('[', "%5B").replace(']', "%5D"));
    json!({
        "login": login,
        "id": user_id(login),
        "node_id": format!("U_fake{}", user_id(login)),
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{}?v=4", user_id(login)),
        "gravatar_id": "",
        "url": api,
        "html_url": web,
        "followers_url": format!("{api}/followers"),
        "following_url": format!("{api}/following{{/other_user}}"),
        "gists_url": format!("{api}/gists{{/gist_id}}"),
        "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{api}/subscriptions"),
        "organizations_url": format!("{api}/orgs"),
        "repos_url": format!("{api}/repos"),
        "events_url": format!("{api}/events{{/privacy}}"),
        "received_events_url": format!("{api}/received_events"),
        "type": if app.is_some() { "Bot" } else { "User" },
        "site_admin": false,
    })
}

struct RepoView<'a> {
    id: u64,
    full_name: &'a str,
    private: bool,
    default_branch: &'a str,
    created_at: u64,
}

fn repo_view(repo: &Repo) -> RepoView<'_> {
    RepoView {
        id: repo.id,
        full_name: &repo.full_name,
        private: repo.private,
        default_branch: &repo.default_branch,
        created_at: repo.created_at,
    }
}

/// The API URLs of a repository: (property, suffix after `/repos/{owner}/{name}`).
const REPO_API_URLS: [(&str, &str); 37] = [
    ("url", ""),
    ("archive_url", "/{archive_format}{/ref}"),
    ("assignees_url", "/assignees{/user}"),
    ("blobs_url", "/git/blobs{/sha}"),
    ("branches_url", "/branches{/branch}"),
    ("collaborators_url", "/collaborators{/collaborator}"),
    ("comments_url", "/comments{/number}"),
    ("commits_url", "/commits{/sha}"),
    ("compare_url", "/compare/{base}...{head}"),
    ("contents_url", "/contents/{+path}"),
    ("contributors_url", "/contributors"),
    ("deployments_url", "/deployments"),
    ("downloads_url", "/downloads"),
    ("events_url", "/events"),
    ("forks_url", "/forks"),
    ("git_commits_url", "/git/commits{/sha}"),
    ("git_refs_url", "/git/refs{/sha}"),
    ("git_tags_url", "/git/tags{/sha}"),
    ("hooks_url", "/hooks"),
    ("issue_comment_url", "/issues/comments{/number}"),
    ("issue_events_url", "/issues/events{/number}"),
    ("issues_url", "/issues{/number}"),
    ("keys_url", "/keys{/key_id}"),
    ("labels_url", "/labels{/name}"),
    ("languages_url", "/languages"),
    ("merges_url", "/merges"),
    ("milestones_url", "/milestones{/number}"),
    ("notifications_url", "/notifications{?since,all,participating}"),
    ("pulls_url", "/pulls{/number}"),
    ("releases_url", "/releases{/id}"),
    ("stargazers_url", "/stargazers"),
    ("statuses_url", "/statuses/{sha}"),
    ("subscribers_url", "/subscribers"),
    ("subscription_url", "/subscription"),
    ("tags_url", "/tags"),
    ("teams_url", "/teams"),
    ("trees_url", "/git/trees{/sha}"),
];

/// A repository: the properties both `repository` and `full-repository` require.
fn repo_json(repo: &RepoView<'_>, base: &str) -> Value {
    let (owner, name) = repo.full_name.split_once('/').unwrap_or((repo.full_name, repo.full_name));
    let api = format!("{base}/repos/{}", repo.full_name);
    let web = format!("https://github.com/{}", repo.full_name);
    let at = rfc3339(repo.created_at);
    let mut value = json!({
        "id": repo.id,
        "node_id": format!("R_fake{}", repo.id),
        "name": name,
        "full_name": repo.full_name,
        "owner": user_json(owner, base),
        "private": repo.private,
        "visibility": if repo.private { "private" } else { "public" },
        "html_url": web,
        "description": null,
        "fork": false,
        "git_url": format!("git://github.com/{}.git", repo.full_name),
        "ssh_url": format!("git@github.com:{}.git", repo.full_name),
        "clone_url": format!("{web}.git"),
        "svn_url": web,
        "mirror_url": null,
        "homepage": null,
        "language": null,
        "forks_count": 0,
        "stargazers_count": 0,
        "watchers_count": 0,
        "size": 0,
        "default_branch": repo.default_branch,
        "open_issues_count": 0,
        "has_issues": true,
        "has_projects": true,
        "has_wiki": true,
        "has_pages": false,
        "has_downloads": true,
        "has_discussions": false,
        "archived": false,
        "disabled": false,
        "pushed_at": at,
        "created_at": at,
        "updated_at": at,
        "subscribers_count": 0,
        "network_count": 0,
        "license": null,
        "forks": 0,
        "open_issues": 0,
        "watchers": 0,
    });
    let object = value.as_object_mut().unwrap();
    for (key, suffix) in REPO_API_URLS {
        object.insert(key.to_owned(), json!(format!("{api}{suffix}")));
    }
    value
}

fn label_json(name: &str, base: &str, full_name: &str) -> Value {
    let id = user_id(name);
    json!({
        "id": id,
        "node_id": format!("LA_fake{id}"),
        "url": format!("{base}/repos/{full_name}/labels/{name}"),
        "name": name,
        "description": "",
        "color": "ededed",
        "default": false,
    })
}

/// A pull request: `pull-request-simple`, or `pull-request` when `full`.
fn pull_json(repo: &Repo, pull: &Pull, base: &str, full: bool, comments: usize) -> Value {
    let api = format!("{base}/repos/{}", repo.full_name);
    let pull_api = format!("{api}/pulls/{}", pull.number);
    let issue_api = format!("{api}/issues/{}", pull.number);
    let html = format!("https://github.com/{}/pull/{}", repo.full_name, pull.number);
    let base_repo = repo_json(&repo_view(repo), base);
    let head_repo = match &pull.head_repo {
        Some(fork) if !fork.eq_ignore_ascii_case(&repo.full_name) => repo_json(
            &RepoView {
                id: user_id(fork),
                full_name: fork,
                private: repo.private,
                default_branch: "main",
                created_at: repo.created_at,
            },
            base,
        ),
        _ => base_repo.clone(),
    };
    let head_owner = head_repo["owner"]["login"].as_str().unwrap_or_default().to_owned();
    let base_owner = base_repo["owner"]["login"].as_str().unwrap_or_default().to_owned();
    let base_sha = repo.branches.get(&pull.base_ref).cloned().unwrap_or_else(|| sha_of(pull.base_ref.as_bytes()));
    let link = |href: String| json!({ "href": href });
    let head = json!({
        "label": format!("{head_owner}:{}", pull.head_ref),
        "ref": pull.head_ref,
        "sha": pull.head_sha,
        "user": head_repo["owner"],
        "repo": head_repo,
    });
    let base_side = json!({
        "label": format!("{base_owner}:{}", pull.base_ref),
        "ref": pull.base_ref,
        "sha": base_sha,
        "user": base_repo["owner"],
        "repo": base_repo,
    });
    let links = json!({
        "self": link(pull_api.clone()),
        "html": link(html.clone()),
        "issue": link(issue_api.clone()),
        "comments": link(format!("{issue_api}/comments")),
        "review_comments": link(format!("{pull_api}/comments")),
        "review_comment": link(format!("{api}/pulls/comments{{/number}}")),
        "commits": link(format!("{pull_api}/commits")),
        "statuses": link(format!("{api}/statuses/{}", pull.head_sha)),
    });
    let mut value = json!({
        "url": pull_api,
        "id": pull.id,
        "node_id": format!("PR_fake{}", pull.id),
        "html_url": html,
        "diff_url": format!("{html}.diff"),
        "patch_url": format!("{html}.patch"),
        "issue_url": issue_api,
        "commits_url": format!("{pull_api}/commits"),
        "review_comments_url": format!("{pull_api}/comments"),
        "review_comment_url": format!("{api}/pulls/comments{{/number}}"),
        "comments_url": format!("{issue_api}/comments"),
        "statuses_url": format!("{api}/statuses/{}", pull.head_sha),
        "number": pull.number,
        "state": pull.state,
        "locked": false,
        "title": pull.title,
        "user": user_json(&pull.user, base),
        "body": null,
        "labels": pull.labels.iter().map(|l| label_json(l, base, &repo.full_name)).collect::<Vec<_>>(),
        "milestone": null,
        "active_lock_reason": null,
        "created_at": rfc3339(pull.created_at),
        "updated_at": rfc3339(pull.updated_at),
        "closed_at": pull.closed_at.map(rfc3339),
        "merged_at": null,
        "merge_commit_sha": null,
        "assignee": null,
        "assignees": [],
        "requested_reviewers": [],
        "requested_teams": [],
        "head": head,
        "base": base_side,
        "_links": links,
        "author_association": "CONTRIBUTOR",
        "auto_merge": null,
        "draft": pull.draft,
    });
    if full {
        let object = value.as_object_mut().unwrap();
        for (key, field) in [
            ("merged", json!(false)),
            ("mergeable", json!(pull.state == "open")),
            ("rebaseable", json!(pull.state == "open")),
            ("mergeable_state", json!(if pull.state == "open" { "clean" } else { "unknown" })),
            ("merged_by", Value::Null),
            ("comments", json!(comments)),
            ("review_comments", json!(0)),
            ("maintainer_can_modify", json!(false)),
            ("commits", json!(1)),
            ("additions", json!(1)),
            ("deletions", json!(0)),
            ("changed_files", json!(1)),
        ] {
            object.insert(key.to_owned(), field);
        }
    }
    value
}

fn deployment_json(repo: &Repo, deployment: &Deployment, base: &str) -> Value {
    let api = format!("{base}/repos/{}", repo.full_name);
    let url = format!("{api}/deployments/{}", deployment.id);
    let production = deployment.production_environment.unwrap_or(deployment.environment == "production");
    json!({
        "url": url,
        "id": deployment.id,
        "node_id": format!("DE_fake{}", deployment.id),
        "sha": deployment.sha,
        "ref": deployment.git_ref,
        "task": deployment.task,
        "payload": deployment.payload,
        "original_environment": deployment.environment,
        "environment": deployment.environment,
        "description": deployment.description,
        "creator": user_json(&deployment.creator, base),
        "created_at": rfc3339(deployment.created_at),
        "updated_at": rfc3339(deployment.statuses.last().map_or(deployment.created_at, |s| s.created_at)),
        "statuses_url": format!("{url}/statuses"),
        "repository_url": api,
        "transient_environment": deployment.transient_environment.unwrap_or(false),
        "production_environment": production,
    })
}

fn status_json(repo: &Repo, deployment: &Deployment, status: &DeploymentStatus, base: &str) -> Value {
    let api = format!("{base}/repos/{}", repo.full_name);
    let deployment_url = format!("{api}/deployments/{}", deployment.id);
    let url = format!("{deployment_url}/statuses/{}", status.id);
    let mut value = json!({
        "url": url,
        "id": status.id,
        "node_id": format!("DES_fake{}", status.id),
        "state": status.state,
        "creator": user_json(&status.creator, base),
        "description": status.description.clone().unwrap_or_default(),
        "environment": status.environment.clone().unwrap_or_else(|| deployment.environment.clone()),
        // GitHub answers "" without a log URL, which the spec's `format: uri` refuses; the
        // status's own URL stands in.
        "target_url": status.log_url.clone().unwrap_or_else(|| url.clone()),
        "created_at": rfc3339(status.created_at),
        "updated_at": rfc3339(status.created_at),
        "deployment_url": deployment_url,
        "repository_url": api,
    });
    let object = value.as_object_mut().unwrap();
    if let Some(environment_url) = &status.environment_url {
        object.insert("environment_url".into(), json!(environment_url));
    }
    if let Some(log_url) = &status.log_url {
        object.insert("log_url".into(), json!(log_url));
    }
    value
}

fn comment_json(full_name: &str, comment: &Comment, base: &str) -> Value {
    let api = format!("{base}/repos/{full_name}");
    json!({
        "id": comment.id,
        "node_id": format!("IC_fake{}", comment.id),
        "url": format!("{api}/issues/comments/{}", comment.id),
        "html_url": format!("https://github.com/{full_name}/pull/{}#issuecomment-{}", comment.issue, comment.id),
        "body": comment.body,
        "user": user_json(&comment.user, base),
        "created_at": rfc3339(comment.created_at),
        "updated_at": rfc3339(comment.updated_at),
        "issue_url": format!("{api}/issues/{}", comment.issue),
        "author_association": "NONE",
    })
}

/// One page of `items` and its `Link` header, as GitHub paginates.
fn paginate(items: Vec<Value>, query: &[(String, String)], base: &str, path: &str) -> Response {
    let param = |name: &str| query.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.parse::<usize>().ok());
    let per_page = param("per_page").unwrap_or(30).clamp(1, 100);
    let page = param("page").unwrap_or(1).max(1);
    let last = items.len().div_ceil(per_page).max(1);
    let shown: Vec<Value> = items.into_iter().skip((page - 1) * per_page).take(per_page).collect();
    let url = |page: usize| {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        for (k, v) in query.iter().filter(|(k, _)| k != "page") {
            serializer.append_pair(k, v);
        }
        serializer.append_pair("page", &page.to_string());
        format!("<{base}{path}?{}>", serializer.finish())
    };
    let mut links = Vec::new();
    if page > 1 {
        links.push(format!("{}; rel=\"prev\"", url(page - 1)));
    }
    if page < last {
        links.push(format!("{}; rel=\"next\"", url(page + 1)));
        links.push(format!("{}; rel=\"last\"", url(last)));
    }
    if page > 1 {
        links.push(format!("{}; rel=\"first\"", url(1)));
    }
    let mut response = Json(shown).into_response();
    if !links.is_empty() {
        response.headers_mut().insert(header::LINK, HeaderValue::from_str(&links.join(", ")).unwrap());
    }
    response
}

/// The raw query string, in order (pagination links keep the caller's parameters).
struct RawQuery(Vec<(String, String)>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RawQuery {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes()).into_owned().collect()))
    }
}

fn creator(inner: &Inner, caller: &Caller) -> String {
    match caller {
        Caller::Personal { login, .. } => login.clone(),
        _ => format!("{}[bot]", inner.app.as_ref().map_or("app", |a| a.slug.as_str())),
    }
}

// ---- handlers ----

async fn mint_token(
    State(fake): State<GitHubFake>,
    Extension(Base(base)): Extension<Base>,
    Path(installation_id): Path<u64>,
    body: Bytes,
) -> Response {
    let request: Value = if body.is_empty() { json!({}) } else { serde_json::from_slice(&body).unwrap_or(json!({})) };
    let mut inner = fake.lock();
    let Some(installation) = inner.installations.get(&installation_id) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let invalid = |message: &str| {
        (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "message": message, "documentation_url": DOCS })))
            .into_response()
    };
    let repositories = match request.get("repositories").and_then(Value::as_array) {
        None => None,
        Some(names) => {
            let mut chosen = Vec::new();
            for name in names.iter().filter_map(Value::as_str) {
                let found = installation
                    .repos
                    .iter()
                    .find(|r| r.split_once('/').is_some_and(|(_, n)| n.eq_ignore_ascii_case(name)));
                match found {
                    Some(full) => chosen.push(full.clone()),
                    None => {
                        return invalid(
                            "There is at least one repository that does not exist or is not accessible to the parent installation.",
                        );
                    }
                }
            }
            Some(chosen)
        }
    };
    let permissions = match request.get("permissions").and_then(Value::as_object) {
        None => installation.permissions.clone(),
        Some(asked) => {
            let mut granted = BTreeMap::new();
            for (name, wanted) in asked {
                let wanted = wanted.as_str().unwrap_or_default();
                match installation.permissions.get(name) {
                    Some(has) if level(has) >= level(wanted) && level(wanted) > 0 => {
                        granted.insert(name.clone(), wanted.to_owned());
                    }
                    _ => return invalid("The permissions requested are not granted to this installation."),
                }
            }
            granted
        }
    };
    let lifetime = installation.token_lifetime;
    let serial = inner.next_id();
    let token = MintedToken {
        token: format!("ghs_fake{serial:032}"),
        installation: installation_id,
        expires_at: now() + lifetime.as_secs(),
        repositories,
        permissions,
    };
    inner.tokens.insert(token.token.clone(), token.clone());
    inner.minted.push(token.clone());
    let mut answer = json!({
        "token": token.token,
        "expires_at": rfc3339(token.expires_at),
        "permissions": token.permissions,
        "repository_selection": "selected",
    });
    if let Some(limited) = &token.repositories {
        let repos: Vec<Value> = limited
            .iter()
            .filter_map(|full| inner.repos.get(full))
            .map(|repo| repo_json(&repo_view(repo), &base))
            .collect();
        answer["repositories"] = json!(repos);
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn get_repo(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name)): Path<(String, String)>,
) -> Response {
    let mut inner = fake.lock();
    match GitHubFake::reach(&mut inner, &caller, &owner, &name, None) {
        Ok(repo) => Json(repo_json(&repo_view(repo), &base)).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn get_root(
    state: State<GitHubFake>,
    caller: Extension<Caller>,
    base: Extension<Base>,
    Path((owner, name)): Path<(String, String)>,
    query: Query<HashMap<String, String>>,
) -> Response {
    get_contents(state, caller, base, Path((owner, name, String::new())), query).await
}

async fn get_contents(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, path)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut inner = fake.lock();
    let repo = match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["contents"], "read"))) {
        Ok(repo) => repo,
        Err(refusal) => return refusal.into_response(),
    };
    let git_ref = query.get("ref").cloned().unwrap_or_else(|| repo.default_branch.clone());
    let sha = if repo.files.contains_key(&git_ref) {
        Some(git_ref.clone())
    } else {
        repo.branches
            .get(&git_ref)
            .cloned()
            .or_else(|| repo.pulls.values().find(|p| p.head_ref == git_ref).map(|p| p.head_sha.clone()))
    };
    let Some(sha) = sha else {
        return error(StatusCode::NOT_FOUND, &format!("No commit found for the ref {git_ref}"));
    };
    let empty = BTreeMap::new();
    let files = repo.files.get(&sha).unwrap_or(&empty);
    let path = path.trim_matches('/');
    let api = format!("{base}/repos/{}", repo.full_name);
    let entry = |entry_path: &str, kind: &str, size: usize, blob: &str| {
        let self_url = format!("{api}/contents/{entry_path}?ref={git_ref}");
        let tree = if kind == "dir" { "tree" } else { "blob" };
        let git_url = format!("{api}/git/{}s/{blob}", if kind == "dir" { "tree" } else { "blob" });
        let html_url = format!("https://github.com/{}/{tree}/{git_ref}/{entry_path}", repo.full_name);
        let download_url = (kind == "file")
            .then(|| format!("https://raw.githubusercontent.com/{}/{git_ref}/{entry_path}", repo.full_name));
        json!({
            "type": kind,
            "size": size,
            "name": entry_path.rsplit('/').next().unwrap_or(entry_path),
            "path": entry_path,
            "sha": blob,
            "url": self_url,
            "git_url": git_url,
            "html_url": html_url,
            "download_url": download_url,
            "_links": { "self": self_url, "git": git_url, "html": html_url },
        })
    };
    if let Some(content) = files.get(path) {
        let encoded = base64::engine::general_purpose::STANDARD.encode(content);
        // GitHub wraps the base64 at 60 characters, each line ending in a newline.
        let wrapped: String =
            encoded.as_bytes().chunks(60).map(|l| format!("{}\n", String::from_utf8_lossy(l))).collect();
        let mut file = entry(path, "file", content.len(), &sha_of(content));
        file["content"] = json!(wrapped);
        file["encoding"] = json!("base64");
        return Json(file).into_response();
    }
    let prefix = if path.is_empty() { String::new() } else { format!("{path}/") };
    let mut children: BTreeMap<String, (&str, usize, String)> = BTreeMap::new();
    for (file_path, content) in files.range(prefix.clone()..).take_while(|(p, _)| p.starts_with(&prefix)) {
        let rest = &file_path[prefix.len()..];
        match rest.split_once('/') {
            Some((dir, _)) => {
                children
                    .insert(format!("{prefix}{dir}"), ("dir", 0, sha_of(format!("{sha}:{prefix}{dir}").as_bytes())));
            }
            None => {
                children.insert(file_path.clone(), ("file", content.len(), sha_of(content)));
            }
        }
    }
    if children.is_empty() {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let listing: Vec<Value> = children.iter().map(|(p, (kind, size, blob))| entry(p, kind, *size, blob)).collect();
    Json(listing).into_response()
}

fn comment_count(inner: &Inner, full_name: &str, issue: u64) -> usize {
    let key = full_name.to_lowercase();
    inner.comments.values().filter(|c| c.repo == key && c.comment.issue == issue).count()
}

async fn list_pulls(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut inner = fake.lock();
    let repo = match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["pull_requests"], "read"))) {
        Ok(repo) => repo,
        Err(refusal) => return refusal.into_response(),
    };
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let state = param("state").unwrap_or("open");
    let sort = param("sort").unwrap_or("created");
    let descending = match param("direction") {
        Some(direction) => direction == "desc",
        None => sort == "created",
    };
    let mut pulls: Vec<&Pull> = repo
        .pulls
        .values()
        .filter(|p| state == "all" || p.state == state)
        .filter(|p| param("base").is_none_or(|b| p.base_ref == b))
        .filter(|p| param("head").is_none_or(|h| h.rsplit(':').next() == Some(p.head_ref.as_str())))
        .collect();
    match sort {
        "updated" => pulls.sort_by_key(|p| (p.updated_at, p.number)),
        _ => pulls.sort_by_key(|p| (p.created_at, p.number)),
    }
    if descending {
        pulls.reverse();
    }
    let items = pulls.into_iter().map(|p| pull_json(repo, p, &base, false, 0)).collect();
    paginate(items, &query, &base, &format!("/repos/{owner}/{name}/pulls"))
}

async fn get_pull(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, number)): Path<(String, String, u64)>,
) -> Response {
    let mut inner = fake.lock();
    let full_name = match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["pull_requests"], "read"))) {
        Ok(repo) => repo.full_name.clone(),
        Err(refusal) => return refusal.into_response(),
    };
    let comments = comment_count(&inner, &full_name, number);
    let repo = inner.repo_mut(&full_name);
    match repo.pulls.get(&number) {
        Some(pull) => Json(pull_json(repo, pull, &base, true, comments)).into_response(),
        None => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn list_deployments(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut inner = fake.lock();
    let repo = match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["deployments"], "read"))) {
        Ok(repo) => repo,
        Err(refusal) => return refusal.into_response(),
    };
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let items = repo
        .deployments
        .iter()
        .rev()
        .filter(|d| param("environment").is_none_or(|e| d.environment == e))
        .filter(|d| param("ref").is_none_or(|r| d.git_ref == r))
        .filter(|d| param("sha").is_none_or(|s| d.sha == s))
        .filter(|d| param("task").is_none_or(|t| d.task == t))
        .map(|d| deployment_json(repo, d, &base))
        .collect();
    paginate(items, &query, &base, &format!("/repos/{owner}/{name}/deployments"))
}

async fn get_deployment(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, id)): Path<(String, String, u64)>,
) -> Response {
    let mut inner = fake.lock();
    let repo = match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["deployments"], "read"))) {
        Ok(repo) => repo,
        Err(refusal) => return refusal.into_response(),
    };
    match repo.deployments.iter().find(|d| d.id == id) {
        Some(deployment) => Json(deployment_json(repo, deployment, &base)).into_response(),
        None => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn create_deployment(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let mut inner = fake.lock();
    let who = creator(&inner, &caller);
    let at = inner.tick();
    let id = inner.next_id();
    let repo = match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["deployments"], "write"))) {
        Ok(repo) => repo,
        Err(refusal) => return refusal.into_response(),
    };
    let git_ref = body["ref"].as_str().unwrap_or_default().to_owned();
    let is_sha = git_ref.len() == 40 && git_ref.bytes().all(|b| b.is_ascii_hexdigit());
    let sha = if is_sha {
        Some(git_ref.clone())
    } else {
        repo.branches
            .get(&git_ref)
            .cloned()
            .or_else(|| repo.pulls.values().find(|p| p.head_ref == git_ref).map(|p| p.head_sha.clone()))
    };
    let Some(sha) = sha else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "message": format!("No ref found for: {git_ref}"), "documentation_url": DOCS })),
        )
            .into_response();
    };
    let text = |key: &str| body[key].as_str().map(str::to_owned);
    let deployment = Deployment {
        id,
        git_ref,
        sha,
        task: text("task").unwrap_or_else(|| "deploy".into()),
        environment: text("environment").unwrap_or_else(|| "production".into()),
        transient_environment: body["transient_environment"].as_bool(),
        production_environment: body["production_environment"].as_bool(),
        auto_merge: body["auto_merge"].as_bool(),
        required_contexts: body["required_contexts"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect()),
        description: text("description"),
        payload: if body["payload"].is_null() { json!({}) } else { body["payload"].clone() },
        creator: who,
        created_at: at,
        statuses: Vec::new(),
    };
    let answer = deployment_json(repo, &deployment, &base);
    repo.deployments.push(deployment);
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn list_statuses(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, id)): Path<(String, String, u64)>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut inner = fake.lock();
    let repo = match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["deployments"], "read"))) {
        Ok(repo) => repo,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(deployment) = repo.deployments.iter().find(|d| d.id == id) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let items = deployment.statuses.iter().rev().map(|s| status_json(repo, deployment, s, &base)).collect();
    paginate(items, &query, &base, &format!("/repos/{owner}/{name}/deployments/{id}/statuses"))
}

async fn create_status(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, id)): Path<(String, String, u64)>,
    Json(body): Json<Value>,
) -> Response {
    let mut inner = fake.lock();
    let who = creator(&inner, &caller);
    let at = inner.tick();
    let status_id = inner.next_id();
    let full_name = match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["deployments"], "write"))) {
        Ok(repo) => repo.full_name.clone(),
        Err(refusal) => return refusal.into_response(),
    };
    // Ids for the inactive statuses auto_inactive may add, one per deployment at most.
    let count = inner.repo_mut(&full_name).deployments.len();
    let inactive_ids: Vec<u64> = (0..count).map(|_| inner.next_id()).collect();
    let repo = inner.repo_mut(&full_name);
    let Some(index) = repo.deployments.iter().position(|d| d.id == id) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let text = |key: &str| body[key].as_str().map(str::to_owned);
    let status = DeploymentStatus {
        id: status_id,
        state: text("state").unwrap_or_default(),
        environment_url: text("environment_url"),
        log_url: text("log_url").or_else(|| text("target_url")),
        description: text("description"),
        environment: text("environment"),
        auto_inactive: body["auto_inactive"].as_bool(),
        creator: who.clone(),
        created_at: at,
    };
    if let Some(environment) = &status.environment {
        repo.deployments[index].environment = environment.clone();
    }
    // GitHub's auto_inactive: a success marks prior non-transient, non-production deployments of
    // the same environment whose last state was success as inactive.
    if status.state == "success" && status.auto_inactive != Some(false) {
        let environment = repo.deployments[index].environment.clone();
        let mut ids = inactive_ids.into_iter();
        for prior in repo.deployments.iter_mut().filter(|d| d.id < id && d.environment == environment) {
            let eligible = !prior.transient_environment.unwrap_or(false)
                && !prior.production_environment.unwrap_or(prior.environment == "production")
                && prior.statuses.last().is_some_and(|s| s.state == "success");
            if eligible {
                prior.statuses.push(DeploymentStatus {
                    id: ids.next().unwrap_or(status_id),
                    state: "inactive".into(),
                    environment_url: None,
                    log_url: None,
                    description: None,
                    environment: None,
                    auto_inactive: None,
                    creator: who.clone(),
                    created_at: at,
                });
            }
        }
    }
    let deployment = &mut repo.deployments[index];
    deployment.statuses.push(status);
    let deployment = &repo.deployments[index];
    let answer = status_json(repo, deployment, deployment.statuses.last().unwrap(), &base);
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn list_comments(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, number)): Path<(String, String, u64)>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut inner = fake.lock();
    let full_name =
        match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["issues", "pull_requests"], "read"))) {
            Ok(repo) if repo.pulls.contains_key(&number) => repo.full_name.clone(),
            Ok(_) => return error(StatusCode::NOT_FOUND, "Not Found"),
            Err(refusal) => return refusal.into_response(),
        };
    let key = full_name.to_lowercase();
    let items = inner
        .comments
        .values()
        .filter(|c| c.repo == key && c.comment.issue == number)
        .map(|c| comment_json(&full_name, &c.comment, &base))
        .collect();
    paginate(items, &query, &base, &format!("/repos/{owner}/{name}/issues/{number}/comments"))
}

async fn create_comment(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, number)): Path<(String, String, u64)>,
    Json(body): Json<Value>,
) -> Response {
    let mut inner = fake.lock();
    let who = creator(&inner, &caller);
    let at = inner.tick();
    let id = inner.next_id();
    let full_name =
        match GitHubFake::reach(&mut inner, &caller, &owner, &name, Some((&["issues", "pull_requests"], "write"))) {
            Ok(repo) if repo.pulls.contains_key(&number) => repo.full_name.clone(),
            Ok(_) => return error(StatusCode::NOT_FOUND, "Not Found"),
            Err(refusal) => return refusal.into_response(),
        };
    let comment = Comment {
        id,
        issue: number,
        body: body["body"].as_str().unwrap_or_default().to_owned(),
        user: who,
        created_at: at,
        updated_at: at,
    };
    let answer = comment_json(&full_name, &comment, &base);
    inner.comments.insert(id, StoredComment { repo: full_name.to_lowercase(), comment });
    (StatusCode::CREATED, Json(answer)).into_response()
}

/// The comment `id` of the reached repository, or the answer to give.
fn find_comment<'a>(
    inner: &'a mut Inner,
    caller: &Caller,
    owner: &str,
    name: &str,
    id: u64,
    wanted: &str,
) -> Result<(String, &'a mut Comment), Refusal> {
    let full_name =
        GitHubFake::reach(inner, caller, owner, name, Some((&["issues", "pull_requests"], wanted)))?.full_name.clone();
    let key = full_name.to_lowercase();
    match inner.comments.get_mut(&id) {
        Some(stored) if stored.repo == key => Ok((full_name, &mut stored.comment)),
        _ => Err(Refusal(StatusCode::NOT_FOUND, "Not Found")),
    }
}

async fn get_comment(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, id)): Path<(String, String, u64)>,
) -> Response {
    let mut inner = fake.lock();
    match find_comment(&mut inner, &caller, &owner, &name, id, "read") {
        Ok((full_name, comment)) => Json(comment_json(&full_name, comment, &base)).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn update_comment(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Extension(Base(base)): Extension<Base>,
    Path((owner, name, id)): Path<(String, String, u64)>,
    Json(body): Json<Value>,
) -> Response {
    let mut inner = fake.lock();
    let at = inner.tick();
    match find_comment(&mut inner, &caller, &owner, &name, id, "write") {
        Ok((full_name, comment)) => {
            comment.body = body["body"].as_str().unwrap_or_default().to_owned();
            comment.updated_at = at;
            Json(comment_json(&full_name, comment, &base)).into_response()
        }
        Err(refusal) => refusal.into_response(),
    }
}

async fn delete_comment(
    State(fake): State<GitHubFake>,
    Extension(caller): Extension<Caller>,
    Path((owner, name, id)): Path<(String, String, u64)>,
) -> Response {
    let mut inner = fake.lock();
    if let Err(refusal) = find_comment(&mut inner, &caller, &owner, &name, id, "write") {
        return refusal.into_response();
    }
    inner.comments.remove(&id);
    StatusCode::NO_CONTENT.into_response()
}

/// `openssl` with `args`, fed `input`; its output.
fn openssl(args: &[&str], input: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("openssl is installed (the tests make the App's RSA key with it; scripts/install-deps.sh installs it)");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "openssl {args:?} failed");
    String::from_utf8(output.stdout).unwrap()
}

/// A fresh RSA key pair: (private, public), PEM. The private key is PKCS#1 (`RSA PRIVATE KEY`),
/// the form GitHub hands out App keys in.
pub fn rsa_key_pair() -> (String, String) {
    let private = openssl(&["genrsa", "-traditional", "2048"], b"");
    let public = openssl(&["rsa", "-pubout"], private.as_bytes());
    (private, public)
}
