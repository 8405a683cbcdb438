//! The GitHub client: authentication ([`auth`]), the calls the operator makes (stagely.yaml
//! through the contents API, pull requests, Deployments and their statuses, issue comments), and
//! GitHub's rules for clients: rate limits, secondary limits and conditional requests.
//!
//! Written on reqwest like the DigitalOcean and Hetzner clients rather than on octocrab: the
//! operator makes a dozen calls, and what matters here (one installation token cache shared by
//! every controller, a rate-limit gate per credential, ETags on what is polled, answers checked
//! for their shape so that an HTML error page is never read as "no pull requests") is policy
//! octocrab would leave to us anyway.
//!
//! A call that cannot be made or answered returns a [`GitHubError`]; none retries for long.
//! Callers on the pipeline's path treat GitHub as optional: feedback is retried later and its
//! state shown as a condition, never blocking a preview.

pub mod auth;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, ETAG, HeaderMap, IF_NONE_MATCH, LINK, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use stagely_api::protocol::Sensitive;

pub use self::auth::Credentials;
use self::auth::InstallationToken;

/// GitHub's public API.
pub const DEFAULT_API_URL: &str = "https://api.github.com";
/// The REST API version the client is written against.
const API_VERSION: &str = "2022-11-28";
/// The longest the client waits out a secondary rate limit within one call; a longer wait is
/// returned as [`GitHubError::RateLimited`] for the caller to schedule.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(10);
/// How many conditional-request answers are kept (each a page of pull requests).
const ETAG_ENTRIES: usize = 256;
/// Pages read at most when listing (100 items each).
const MAX_PAGES: usize = 50;

/// Why a call to GitHub failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GitHubError {
    /// GitHub refused the credentials (401).
    #[error("GitHub refused the credentials ({identity}): {message}")]
    Unauthorized {
        /// Which credentials (see [`Credentials::identity`]).
        identity: String,
        /// GitHub's message.
        message: String,
    },
    /// The credentials lack a permission (403 that is not a rate limit).
    #[error("GitHub denied {call}: {message}")]
    Forbidden {
        /// The call.
        call: String,
        /// GitHub's message.
        message: String,
    },
    /// A rate limit is exhausted; calls resume after `retry_after`.
    #[error("GitHub's rate limit for {identity} is exhausted; retrying in {}s", retry_after.as_secs())]
    RateLimited {
        /// Which credentials.
        identity: String,
        /// How long until GitHub accepts calls again.
        retry_after: Duration,
    },
    /// GitHub answered with an error of its own (5xx) or an unexpected status.
    #[error("GitHub answered {call} with {status}: {message}")]
    Unavailable {
        /// The call.
        call: String,
        /// The HTTP status.
        status: u16,
        /// GitHub's message, or the start of its body.
        message: String,
    },
    /// GitHub refused what was sent (422 and other 4xx).
    #[error("GitHub refused {call} ({status}): {message}")]
    Rejected {
        /// The call.
        call: String,
        /// The HTTP status.
        status: u16,
        /// GitHub's message.
        message: String,
    },
    /// GitHub could not be reached.
    #[error("failed to reach GitHub for {call}: {message}")]
    Transport {
        /// The call.
        call: String,
        /// What failed.
        message: String,
    },
    /// A success answer that is not what GitHub documents (an HTML page from a proxy, a cut
    /// body): never read as an empty result.
    #[error("GitHub's answer to {call} is not as documented: {message}")]
    Malformed {
        /// The call.
        call: String,
        /// What is wrong with it.
        message: String,
    },
    /// The credentials Secret's keys cannot be used.
    #[error("the GitHub credentials cannot be used: {0}")]
    Credentials(String),
}

impl GitHubError {
    /// A condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            GitHubError::Unauthorized { .. } => "GitHubCredentialsRejected",
            GitHubError::Forbidden { .. } => "GitHubPermissionDenied",
            GitHubError::RateLimited { .. } => "GitHubRateLimited",
            GitHubError::Unavailable { .. } | GitHubError::Transport { .. } | GitHubError::Malformed { .. } => {
                "GitHubUnavailable"
            }
            GitHubError::Rejected { .. } => "GitHubRejected",
            GitHubError::Credentials(_) => "GitHubSecretInvalid",
        }
    }

    /// How long to wait before trying again, when GitHub said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GitHubError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Labels of a GitHub call's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// What was called, e.g. `contents`, `pulls`, `deployment_statuses`.
    pub call: String,
    /// The HTTP status, `transport` or `rate_limited` (refused by the client's own gate).
    pub status: String,
}

/// Labels of a credential's rate limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The credentials ([`Credentials::identity`]).
    pub credentials: String,
}

/// What the client counts. Cheap to clone; clones share the values.
#[derive(Clone, Default)]
pub struct GitHubMetrics {
    /// Calls by endpoint and answer.
    pub calls: Family<CallLabels, Counter>,
    /// Calls left in the current rate-limit window, as GitHub last said, by credentials.
    pub rate_limit_remaining: Family<LimitLabels, Gauge>,
    /// Calls allowed per rate-limit window, as GitHub last said, by credentials.
    pub rate_limit: Family<LimitLabels, Gauge>,
}

/// A success answer.
struct Answer {
    headers: HeaderMap,
    body: bytes::Bytes,
}

/// A GET answer kept for conditional requests.
struct Conditional {
    etag: String,
    headers: HeaderMap,
    body: bytes::Bytes,
}

/// The GitHub client; see the module documentation. One per operator, shared by the controllers.
pub struct GitHub {
    http: reqwest::Client,
    base_url: String,
    metrics: GitHubMetrics,
    /// Installation tokens by [`Credentials::identity`].
    installations: tokio::sync::Mutex<HashMap<String, InstallationToken>>,
    /// Until when each credential's primary rate limit is exhausted.
    exhausted: Mutex<HashMap<String, SystemTime>>,
    /// Conditional GET answers by credentials and URL.
    etags: Mutex<HashMap<(String, String), Conditional>>,
}

impl std::fmt::Debug for GitHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHub").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

/// A repository, as `owner/name`.
#[derive(Clone, Copy, Debug)]
pub struct Repository<'a>(pub &'a str);

impl Repository<'_> {
    fn path(&self) -> String {
        let (owner, name) = self.0.split_once('/').unwrap_or((self.0, ""));
        format!("/repos/{}/{}", encode(owner), encode(name))
    }

    fn name(&self) -> &str {
        self.0.split_once('/').map_or(self.0, |(_, name)| name)
    }
}

/// A path segment, percent-encoded.
fn encode(segment: &str) -> String {
    form_urlencoded::byte_serialize(segment.as_bytes()).collect::<String>().replace('+', "%20")
}

/// A file read through the contents API.
#[derive(Debug)]
pub enum FileAnswer {
    /// The file's bytes.
    File(Vec<u8>),
    /// The path is something else: `directory`, `symbolic link` or `submodule`.
    NotAFile(&'static str),
    /// The file is larger than asked for; its size.
    TooLarge(u64),
    /// The commit has no such path.
    FileNotFound,
    /// GitHub does not know the commit.
    CommitNotFound,
}

/// A pull request as the REST API gives it (the fields the operator reads).
pub use stagely_api::pull_request::GitHubPullRequest as PullRequest;

/// An issue comment.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Comment {
    /// Its id.
    pub id: u64,
    /// Its Markdown.
    #[serde(default)]
    pub body: Option<String>,
}

/// A deployment state GitHub knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Building or deploying.
    InProgress,
    /// Serving at its URL.
    Success,
    /// The run failed.
    Failure,
    /// Torn down.
    Inactive,
}

impl DeploymentState {
    /// GitHub's name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::InProgress => "in_progress",
            DeploymentState::Success => "success",
            DeploymentState::Failure => "failure",
            DeploymentState::Inactive => "inactive",
        }
    }
}

#[derive(Deserialize)]
struct Id {
    id: u64,
}

impl GitHub {
    /// A client for the API at `base_url` (`https://api.github.com`, or a GitHub Enterprise
    /// server's `https://<host>/api/v3`).
    pub fn new(base_url: &str, metrics: GitHubMetrics) -> Self {
        let http = reqwest::Client::builder()
            .user_agent(concat!("stagely-operator/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("the TLS backend is compiled in");
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            metrics,
            installations: tokio::sync::Mutex::default(),
            exhausted: Mutex::default(),
            etags: Mutex::default(),
        }
    }

    /// The API's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The token calls are made with: the token itself, or the installation's token, minted
    /// once and reused until ten minutes before it expires.
    async fn token(&self, credentials: &Credentials) -> Result<Sensitive, GitHubError> {
        let app = match credentials {
            Credentials::Token(token) => return Ok(token.clone()),
            Credentials::App(app) => app,
        };
        let identity = credentials.identity();
        // Held across the mint, so that concurrent callers wait for one token instead of minting many.
        let mut installations = self.installations.lock().await;
        if let Some(cached) = installations.get(&identity).filter(|t| t.fresh(SystemTime::now())) {
            return Ok(cached.token.clone());
        }
        let minted = self.mint(credentials, app, None).await?;
        installations.insert(identity, minted.clone());
        Ok(minted.token)
    }

    /// Forgets the installation token of `credentials` (GitHub refused it).
    async fn forget_token(&self, credentials: &Credentials) {
        self.installations.lock().await.remove(&credentials.identity());
    }

    async fn mint(
        &self,
        credentials: &Credentials,
        app: &auth::App,
        body: Option<serde_json::Value>,
    ) -> Result<InstallationToken, GitHubError> {
        #[derive(Deserialize)]
        struct Minted {
            token: String,
            expires_at: k8s_openapi::jiff::Timestamp,
        }
        let jwt = app.jwt(SystemTime::now()).map_err(GitHubError::Credentials)?;
        let path = format!("/app/installations/{}/access_tokens", app.installation_id);
        let answer = self
            .send_raw(credentials, &jwt, "installation_token", Method::POST, &path, &[], body.as_ref(), false)
            .await?
            .map_err(|_| GitHubError::Unauthorized {
                identity: credentials.identity(),
                message: format!("installation {} of App {} was not found", app.installation_id, app.app_id),
            })?;
        let minted: Minted = decode("installation_token", &answer.body)?;
        Ok(InstallationToken { token: Sensitive(minted.token), expires_at: SystemTime::from(minted.expires_at) })
    }

    /// A token for a builder to clone `repository` with: for an App, a new installation token
    /// limited to that repository and `contents: read`, expiring within the hour; for a token,
    /// the token itself (give Projects a fine-grained token with read access to contents only).
    pub async fn clone_token(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
    ) -> Result<(Sensitive, Option<SystemTime>), GitHubError> {
        match credentials {
            Credentials::Token(token) => Ok((token.clone(), None)),
            Credentials::App(app) => {
                let body = serde_json::json!({
                    "repositories": [repository.name()],
                    "permissions": {"contents": "read"},
                });
                let minted = self.mint(credentials, app, Some(body)).await?;
                Ok((minted.token, Some(minted.expires_at)))
            }
        }
    }

    /// Whether the credentials reach `repository`: `Ok(false)` when GitHub says it does not
    /// exist for them (not installed there, no access).
    pub async fn can_read(&self, credentials: &Credentials, repository: Repository<'_>) -> Result<bool, GitHubError> {
        let answer = self.call(credentials, "repository", Method::GET, &repository.path(), &[], None, false).await?;
        Ok(answer.is_some())
    }

    /// The file `path` at `commit`, at most `max_bytes`.
    pub async fn file(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
        commit: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<FileAnswer, GitHubError> {
        #[derive(Deserialize)]
        struct Content {
            #[serde(rename = "type")]
            kind: String,
            size: u64,
            #[serde(default)]
            content: Option<String>,
            #[serde(default)]
            encoding: Option<String>,
        }
        let url_path =
            format!("{}/contents/{}", repository.path(), path.split('/').map(encode).collect::<Vec<_>>().join("/"));
        let call = "contents";
        let answer =
            match self.call_raw(credentials, call, Method::GET, &url_path, &[("ref", commit)], None, false).await? {
                Ok(answer) => answer,
                Err(message) if message.contains("No commit found") => return Ok(FileAnswer::CommitNotFound),
                Err(_) => return Ok(FileAnswer::FileNotFound),
            };
        let value: serde_json::Value = decode(call, &answer.body)?;
        if value.is_array() {
            return Ok(FileAnswer::NotAFile("directory"));
        }
        let content: Content = serde_json::from_value(value)
            .map_err(|err| GitHubError::Malformed { call: call.into(), message: err.to_string() })?;
        match content.kind.as_str() {
            "file" => {}
            "dir" => return Ok(FileAnswer::NotAFile("directory")),
            "symlink" => return Ok(FileAnswer::NotAFile("symbolic link")),
            _ => return Ok(FileAnswer::NotAFile("submodule")),
        }
        if content.size > max_bytes {
            return Ok(FileAnswer::TooLarge(content.size));
        }
        let (Some(text), Some("base64")) = (content.content, content.encoding.as_deref()) else {
            return Err(GitHubError::Malformed { call: call.into(), message: "the file has no base64 content".into() });
        };
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|err| GitHubError::Malformed { call: call.into(), message: format!("content: {err}") })?;
        if bytes.len() as u64 != content.size {
            return Err(GitHubError::Malformed {
                call: call.into(),
                message: format!("content has {} bytes, size says {}", bytes.len(), content.size),
            });
        }
        Ok(FileAnswer::File(bytes))
    }

    /// Every open pull request of `repository`, page by page (conditional requests: a page that
    /// did not change costs no rate limit). An error on any page fails the whole list.
    pub async fn open_pull_requests(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
    ) -> Result<Vec<PullRequest>, GitHubError> {
        let path = format!("{}/pulls", repository.path());
        self.list(credentials, "pulls", &path, &[("state", "open"), ("sort", "created"), ("direction", "asc")]).await
    }

    /// Pull request `number`, if it exists.
    pub async fn pull_request(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
        number: i64,
    ) -> Result<Option<PullRequest>, GitHubError> {
        let path = format!("{}/pulls/{number}", repository.path());
        match self.call(credentials, "pull", Method::GET, &path, &[], None, true).await? {
            None => Ok(None),
            Some(answer) => decode("pull", &answer.body).map(Some),
        }
    }

    /// Creates a Deployment of `sha` to `environment` (transient, not production; no merge of
    /// the base branch, no required status checks) and returns its id.
    pub async fn create_deployment(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
        sha: &str,
        environment: &str,
        description: &str,
    ) -> Result<u64, GitHubError> {
        let body = serde_json::json!({
            "ref": sha,
            "environment": environment,
            "description": description,
            "transient_environment": true,
            "production_environment": false,
            "auto_merge": false,
            "required_contexts": [],
        });
        let path = format!("{}/deployments", repository.path());
        let answer = self.must(credentials, "deployments", Method::POST, &path, Some(&body)).await?;
        Ok(decode::<Id>("deployments", &answer.body)?.id)
    }

    /// The ids of the Deployments of `sha` to `environment`, newest first.
    pub async fn deployments(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
        sha: &str,
        environment: &str,
    ) -> Result<Vec<u64>, GitHubError> {
        let path = format!("{}/deployments", repository.path());
        let found: Vec<Id> =
            self.list(credentials, "deployments", &path, &[("sha", sha), ("environment", environment)]).await?;
        Ok(found.into_iter().map(|d| d.id).collect())
    }

    /// Adds a status to Deployment `id`: `Ok(false)` when the Deployment is gone.
    pub async fn create_deployment_status(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
        id: u64,
        state: DeploymentState,
        environment_url: Option<&str>,
        description: &str,
    ) -> Result<bool, GitHubError> {
        let mut body = serde_json::json!({
            "state": state.as_str(),
            // GitHub cuts descriptions at 140 characters.
            "description": description.chars().take(140).collect::<String>(),
            "auto_inactive": false,
        });
        if let Some(url) = environment_url {
            body["environment_url"] = url.into();
        }
        let path = format!("{}/deployments/{id}/statuses", repository.path());
        Ok(self.call(credentials, "deployment_statuses", Method::POST, &path, &[], Some(&body), false).await?.is_some())
    }

    /// The comments on issue (or pull request) `number`.
    pub async fn comments(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
        number: i64,
    ) -> Result<Vec<Comment>, GitHubError> {
        let path = format!("{}/issues/{number}/comments", repository.path());
        self.list(credentials, "comments", &path, &[]).await
    }

    /// Comments on pull request `number`; returns the comment's id.
    pub async fn create_comment(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
        number: i64,
        body: &str,
    ) -> Result<u64, GitHubError> {
        let path = format!("{}/issues/{number}/comments", repository.path());
        let json = serde_json::json!({"body": body});
        let answer = self.must(credentials, "create_comment", Method::POST, &path, Some(&json)).await?;
        Ok(decode::<Id>("create_comment", &answer.body)?.id)
    }

    /// Replaces comment `id`'s body: `Ok(false)` when the comment is gone (a user deleted it).
    pub async fn update_comment(
        &self,
        credentials: &Credentials,
        repository: Repository<'_>,
        id: u64,
        body: &str,
    ) -> Result<bool, GitHubError> {
        let path = format!("{}/issues/comments/{id}", repository.path());
        let json = serde_json::json!({"body": body});
        Ok(self.call(credentials, "update_comment", Method::PATCH, &path, &[], Some(&json), false).await?.is_some())
    }

    /// Every item of a paginated list, following `Link: rel="next"`.
    async fn list<T: DeserializeOwned>(
        &self,
        credentials: &Credentials,
        call: &'static str,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<T>, GitHubError> {
        let mut items = Vec::new();
        let mut page = 1usize;
        loop {
            let page_text = page.to_string();
            let mut query = query.to_vec();
            query.extend([("per_page", "100"), ("page", page_text.as_str())]);
            let answer =
                self.call(credentials, call, Method::GET, path, &query, None, true).await?.ok_or_else(|| {
                    GitHubError::Unavailable {
                        call: call.into(),
                        status: 404,
                        message: format!("{path} was not found"),
                    }
                })?;
            let found: Result<Vec<T>, GitHubError> = decode(call, &answer.body);
            let more = has_next(&answer.headers);
            let found = match found {
                Ok(found) if found.is_empty() && more => Err(GitHubError::Malformed {
                    call: call.into(),
                    message: format!("page {page} is empty but links to a next page"),
                }),
                other => other,
            };
            let found = match found {
                Ok(found) => found,
                Err(err) => {
                    // Not kept for conditional requests: a 304 would hand it back again.
                    self.forget_conditional(credentials, path, &query);
                    return Err(err);
                }
            };
            items.extend(found);
            if !more {
                return Ok(items);
            }
            page += 1;
            if page > MAX_PAGES {
                return Err(GitHubError::Malformed {
                    call: call.into(),
                    message: format!("more than {MAX_PAGES} pages"),
                });
            }
        }
    }

    /// A call whose resource must exist.
    async fn must(
        &self,
        credentials: &Credentials,
        call: &'static str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, GitHubError> {
        self.call(credentials, call, method, path, &[], body, false).await?.ok_or_else(|| GitHubError::Rejected {
            call: call.into(),
            status: 404,
            message: "not found (the repository, or the credentials' access to it)".into(),
        })
    }

    /// A call: `Ok(None)` on 404.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        credentials: &Credentials,
        call: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
        conditional: bool,
    ) -> Result<Option<Answer>, GitHubError> {
        Ok(self.call_raw(credentials, call, method, path, query, body, conditional).await?.ok())
    }

    /// A call: `Ok(Err(message))` on 404, with GitHub's message.
    #[allow(clippy::too_many_arguments)]
    async fn call_raw(
        &self,
        credentials: &Credentials,
        call: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
        conditional: bool,
    ) -> Result<Result<Answer, String>, GitHubError> {
        let token = self.token(credentials).await?;
        match self.send_raw(credentials, &token, call, method.clone(), path, query, body, conditional).await {
            Err(GitHubError::Unauthorized { .. }) if matches!(credentials, Credentials::App(_)) => {
                // The installation token may have been revoked: one more try with a new one.
                self.forget_token(credentials).await;
                let token = self.token(credentials).await?;
                self.send_raw(credentials, &token, call, method, path, query, body, conditional).await
            }
            other => other,
        }
    }

    /// Sends one call with `token`, waiting out a short secondary rate limit.
    #[allow(clippy::too_many_arguments)]
    async fn send_raw(
        &self,
        credentials: &Credentials,
        token: &Sensitive,
        call: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
        conditional: bool,
    ) -> Result<Result<Answer, String>, GitHubError> {
        let identity = credentials.identity();
        let count = |status: &str| {
            self.metrics.calls.get_or_create(&CallLabels { call: call.to_owned(), status: status.to_owned() }).inc();
        };
        if let Some(until) = self.exhausted_until(&identity) {
            count("rate_limited");
            let retry_after = until.duration_since(SystemTime::now()).unwrap_or_default();
            return Err(GitHubError::RateLimited { identity, retry_after });
        }
        let url = format!("{}{path}", self.base_url);
        let etag_key = (identity.clone(), format!("{url}?{query:?}"));
        let mut waited = Duration::ZERO;
        loop {
            let mut request = self
                .http
                .request(method.clone(), &url)
                .header(AUTHORIZATION, format!("Bearer {}", token.expose()))
                .header(ACCEPT, "application/vnd.github+json")
                .header("x-github-api-version", API_VERSION);
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            if conditional && let Some(cached) = self.etags.lock().unwrap_or_else(|p| p.into_inner()).get(&etag_key) {
                request = request.header(IF_NONE_MATCH, cached.etag.clone());
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(err) => {
                    count("transport");
                    let cause = std::error::Error::source(&err).map(|s| format!(": {s}")).unwrap_or_default();
                    return Err(GitHubError::Transport {
                        call: format!("{method} {path}"),
                        message: format!("{}{cause}", err.without_url()),
                    });
                }
            };
            let status = response.status();
            count(status.as_str());
            let headers = response.headers().clone();
            self.note_rate_limit(&identity, &headers);
            let body = response.bytes().await.map_err(|err| GitHubError::Transport {
                call: format!("{method} {path}"),
                message: err.without_url().to_string(),
            })?;
            let described = || format!("{method} {path}");
            if status == StatusCode::NOT_MODIFIED {
                let etags = self.etags.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(cached) = etags.get(&etag_key) {
                    return Ok(Ok(Answer { headers: cached.headers.clone(), body: cached.body.clone() }));
                }
                return Err(GitHubError::Malformed {
                    call: described(),
                    message: "304 to an unconditional request".into(),
                });
            }
            if status.is_success() {
                if !is_json(&headers) && !body.is_empty() {
                    return Err(GitHubError::Malformed {
                        call: described(),
                        message: format!("{status} with a body that is not JSON: {}", snippet(&body)),
                    });
                }
                if conditional && let Some(etag) = headers.get(ETAG).and_then(|v| v.to_str().ok()) {
                    let mut etags = self.etags.lock().unwrap_or_else(|p| p.into_inner());
                    if etags.len() >= ETAG_ENTRIES && !etags.contains_key(&etag_key) {
                        etags.clear();
                    }
                    let entry = Conditional { etag: etag.to_owned(), headers: headers.clone(), body: body.clone() };
                    etags.insert(etag_key.clone(), entry);
                }
                return Ok(Ok(Answer { headers, body }));
            }
            let message = error_message(&body, status);
            match status {
                StatusCode::NOT_FOUND => return Ok(Err(message)),
                StatusCode::UNAUTHORIZED => return Err(GitHubError::Unauthorized { identity, message }),
                StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => {
                    if let Some(wait) = retry_after(&headers) {
                        // A secondary rate limit: wait it out when short, else hand it back.
                        if waited + wait <= MAX_INLINE_WAIT {
                            tracing::info!(call, credentials = %identity, ?wait, "GitHub's secondary rate limit; waiting");
                            tokio::time::sleep(wait).await;
                            waited += wait;
                            continue;
                        }
                        return Err(GitHubError::RateLimited { identity, retry_after: wait });
                    }
                    if header(&headers, "x-ratelimit-remaining") == Some("0") {
                        let until = reset_time(&headers).unwrap_or_else(|| SystemTime::now() + Duration::from_secs(60));
                        self.exhausted.lock().unwrap_or_else(|p| p.into_inner()).insert(identity.clone(), until);
                        let retry_after = until.duration_since(SystemTime::now()).unwrap_or_default();
                        return Err(GitHubError::RateLimited { identity, retry_after });
                    }
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        return Err(GitHubError::RateLimited { identity, retry_after: Duration::from_secs(60) });
                    }
                    return Err(GitHubError::Forbidden { call: described(), message });
                }
                s if s.is_server_error() => {
                    return Err(GitHubError::Unavailable { call: described(), status: s.as_u16(), message });
                }
                s => return Err(GitHubError::Rejected { call: described(), status: s.as_u16(), message }),
            }
        }
    }

    /// Forgets the conditional answer kept for a GET of `path` with `query`.
    fn forget_conditional(&self, credentials: &Credentials, path: &str, query: &[(&str, &str)]) {
        let key = (credentials.identity(), format!("{}{path}?{query:?}", self.base_url));
        self.etags.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }

    fn exhausted_until(&self, identity: &str) -> Option<SystemTime> {
        let mut exhausted = self.exhausted.lock().unwrap_or_else(|p| p.into_inner());
        match exhausted.get(identity) {
            Some(until) if *until > SystemTime::now() => Some(*until),
            Some(_) => {
                exhausted.remove(identity);
                None
            }
            None => None,
        }
    }

    fn note_rate_limit(&self, identity: &str, headers: &HeaderMap) {
        let labels = || LimitLabels { credentials: identity.to_owned() };
        if let Some(remaining) = header(headers, "x-ratelimit-remaining").and_then(|v| v.parse::<i64>().ok()) {
            self.metrics.rate_limit_remaining.get_or_create(&labels()).set(remaining);
        }
        if let Some(limit) = header(headers, "x-ratelimit-limit").and_then(|v| v.parse::<i64>().ok()) {
            self.metrics.rate_limit.get_or_create(&labels()).set(limit);
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn is_json(headers: &HeaderMap) -> bool {
    header(headers, CONTENT_TYPE.as_str()).is_some_and(|v| v.contains("json"))
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header(headers, RETRY_AFTER.as_str())?.parse::<u64>().ok().map(Duration::from_secs)
}

fn reset_time(headers: &HeaderMap) -> Option<SystemTime> {
    let reset = header(headers, "x-ratelimit-reset")?.parse::<u64>().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(reset))
}

/// Whether a `Link` header names a next page.
fn has_next(headers: &HeaderMap) -> bool {
    headers
        .get_all(LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|link| link.split(';').skip(1).any(|param| param.trim().replace(' ', "") == "rel=\"next\""))
}

fn decode<T: DeserializeOwned>(call: &str, body: &[u8]) -> Result<T, GitHubError> {
    serde_json::from_slice(body)
        .map_err(|err| GitHubError::Malformed { call: call.to_owned(), message: err.to_string() })
}

/// GitHub's `message`, else the start of the body, else the status's name.
fn error_message(body: &[u8], status: StatusCode) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .or_else(|| (!body.is_empty()).then(|| snippet(body)))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("no message").to_owned())
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).trim().chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_next_page_is_found_in_any_link_header_form() {
        let next = r#"<https://api.github.com/repositories/1/pulls?page=2>; rel="next", <https://api.github.com/repositories/1/pulls?page=5>; rel="last""#;
        assert!(has_next(&headers(&[("link", next)])));
        let last = r#"<https://api.github.com/repositories/1/pulls?page=4>; rel="prev", <https://api.github.com/repositories/1/pulls?page=1>; rel="first""#;
        assert!(!has_next(&headers(&[("link", last)])));
        assert!(!has_next(&HeaderMap::new()));
    }

    #[test]
    fn errors_read_githubs_message_or_the_body() {
        assert_eq!(error_message(br#"{"message":"Bad credentials"}"#, StatusCode::UNAUTHORIZED), "Bad credentials");
        assert_eq!(error_message(b"<html>502</html>", StatusCode::BAD_GATEWAY), "<html>502</html>");
        assert_eq!(error_message(b"", StatusCode::BAD_GATEWAY), "Bad Gateway");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(Repository("acme/shop.web").path(), "/repos/acme/shop.web");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
