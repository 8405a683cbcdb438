//! Where the code comes from: reading `stagely.yaml` at a commit without cloning the whole
//! repository.
//!
//! [`RepositorySource`] is the seam: it reads one file at one commit. [`git::GitSource`] does it
//! with git against any clone URL (a local repository too); a GitHub contents-API source can be
//! added beside it. [`ConfigLoader`] sits on top: it reads `stagely.yaml` through a source,
//! parses it, and remembers the outcome per (clone URL, commit), so an Environment's reconciles
//! do not fetch the same file again.
//!
//! What goes wrong comes back as a [`ConfigProblem`], whose [`reason`](ConfigProblem::reason) is
//! a condition reason and whose `Display` is written for the pull request's author.

pub mod git;
pub mod github;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stagely_api::config::{self, ConfigError, FieldError, StagelyConfig};
use stagely_api::protocol::Sensitive;

/// A boxed future that can move between threads, as [`RepositorySource`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Reads files of a repository at a commit.
pub trait RepositorySource: Send + Sync {
    /// The bytes of `path` at `commit` of the repository at `repo.clone_url`, at most
    /// `max_bytes`: a larger file is refused with [`SourceError::TooLarge`] before it is read.
    fn read_file<'a>(
        &'a self,
        repo: &'a Repo,
        commit: &'a str,
        path: &'a str,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, SourceError>>;
}

/// A repository to read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repo {
    /// Where it is fetched from (see `ProjectSpec::clone_url`).
    pub clone_url: String,
    /// A GitHub token (installation token or personal token) to fetch with, if the repository
    /// needs one. Never logged: `Sensitive`'s `Debug` hides it.
    pub token: Option<Sensitive>,
    /// Where GitHub's contents API serves it, when it is a GitHub repository.
    pub github: Option<GitHubRepo>,
}

/// A repository on GitHub, and where its Project's credentials are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitHubRepo {
    /// `owner/name`.
    pub repository: String,
    /// The Project's namespace.
    pub namespace: String,
    /// The credentials Secret (`spec.github.credentialsSecretRef`).
    pub secret: String,
}

/// Why a [`RepositorySource`] could not read a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The remote does not have the commit, or does not have it yet.
    #[error("failed to find commit {commit} in {url}")]
    CommitNotFound {
        /// The clone URL, without any user information.
        url: String,
        /// The commit.
        commit: String,
    },
    /// The commit has no file at `path`.
    #[error("failed to find {path} at commit {commit}")]
    FileNotFound {
        /// The file.
        path: String,
        /// The commit.
        commit: String,
    },
    /// `path` names something that is not a regular file.
    #[error("failed to read {path} at commit {commit}: it is a {kind}, not a file")]
    NotAFile {
        /// The file.
        path: String,
        /// The commit.
        commit: String,
        /// `directory`, `symbolic link` or `submodule`.
        kind: &'static str,
    },
    /// The file is larger than allowed; it was not read.
    #[error("failed to read {path} at commit {commit}: it is {size} bytes, over the limit of {max}")]
    TooLarge {
        /// The file.
        path: String,
        /// The commit.
        commit: String,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        max: u64,
    },
    /// The remote could not be reached, or refused access.
    #[error("failed to reach {url}: {detail}")]
    Unreachable {
        /// The clone URL, without any user information.
        url: String,
        /// What went wrong, as the transport said it (never carrying a credential).
        detail: String,
    },
    /// Reading took longer than allowed and was abandoned.
    #[error("failed to read {path} at commit {commit} from {url} within {}s", after.as_secs())]
    Timeout {
        /// The clone URL, without any user information.
        url: String,
        /// The commit.
        commit: String,
        /// The file.
        path: String,
        /// The time allowed.
        after: Duration,
    },
    /// The request can never succeed: the commit is not an object id, or the path or URL is not
    /// usable.
    #[error("failed to read {path} at commit {commit}: {reason}")]
    InvalidRequest {
        /// The commit, as given.
        commit: String,
        /// The file, as given.
        path: String,
        /// What is wrong with the request.
        reason: String,
    },
    /// Something failed on the operator's side (git missing, the cache directory not writable).
    #[error("failed to read {path} at commit {commit} from {url}: {detail}")]
    Failed {
        /// The clone URL, without any user information.
        url: String,
        /// The commit.
        commit: String,
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
}

/// `read` of `path` at `commit` from `url`, abandoned after `after` as [`SourceError::Timeout`]
/// (dropping it stops what it started).
async fn within<T>(
    after: Duration,
    url: String,
    commit: &str,
    path: &str,
    read: impl Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(after, read)
        .await
        .unwrap_or_else(|_| Err(SourceError::Timeout { url, commit: commit.into(), path: path.into(), after }))
}

/// The configuration file read at the root of the repository.
pub const CONFIG_FILE: &str = "stagely.yaml";
/// Read instead of [`CONFIG_FILE`] when a commit has no `stagely.yaml`. When both exist,
/// `stagely.yaml` wins.
pub const CONFIG_FILE_ALTERNATIVE: &str = "stagely.yml";
/// The largest configuration file read, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// How many loads [`ConfigLoader`] remembers by default.
pub const CACHE_ENTRIES: usize = 1000;

/// Condition reason: the commit has no `stagely.yaml` (or `stagely.yml`), or it is not a file.
pub const CONFIG_FILE_NOT_FOUND: &str = "ConfigFileNotFound";
/// Condition reason: the remote does not have the commit (yet).
pub const COMMIT_NOT_FOUND: &str = "CommitNotFound";
/// Condition reason: the remote could not be reached or refused access.
pub const REPOSITORY_UNREACHABLE: &str = "RepositoryUnreachable";
/// Condition reason: the file is not a valid `stagely.yaml`.
pub const CONFIG_INVALID: &str = "ConfigInvalid";
/// Condition reason: the file is larger than [`MAX_CONFIG_BYTES`] (or the loader's limit).
pub const CONFIG_TOO_LARGE: &str = "ConfigTooLarge";
/// Condition reason: reading the file took too long.
pub const CONFIG_FETCH_TIMEOUT: &str = "ConfigFetchTimeout";
/// Condition reason: the operator itself failed to read the file (git missing, its cache
/// directory not writable), or was asked for something that is not a commit.
pub const CONFIG_FETCH_FAILED: &str = "ConfigFetchFailed";

/// Why the configuration of a commit could not be loaded. `Display` is the condition message,
/// written for the pull request's author.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigProblem {
    /// The commit has neither `stagely.yaml` nor `stagely.yml` at its root. Permanent.
    FileNotFound {
        /// The commit.
        commit: String,
    },
    /// The configuration file is a directory, a symbolic link or a submodule. Permanent.
    NotAFile {
        /// The file.
        file: String,
        /// The commit.
        commit: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// The remote does not have the commit. Transient: a mirror, or GitHub right after a push,
    /// may not have it yet.
    CommitNotFound {
        /// The clone URL.
        url: String,
        /// The commit.
        commit: String,
    },
    /// The remote could not be reached or refused access. Transient.
    Unreachable {
        /// The clone URL.
        url: String,
        /// What the transport said.
        detail: String,
    },
    /// The file is not a valid `stagely.yaml`. Permanent.
    Invalid {
        /// The file.
        file: String,
        /// The commit.
        commit: String,
        /// Every problem, by field.
        error: ConfigError,
    },
    /// The file is over the size limit. Permanent.
    TooLarge {
        /// The file.
        file: String,
        /// The commit.
        commit: String,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        max: u64,
    },
    /// Reading took too long. Transient.
    Timeout {
        /// The clone URL.
        url: String,
        /// The commit.
        commit: String,
        /// The time allowed.
        after: Duration,
    },
    /// The operator failed to read the file, for a reason of its own; permanent when the request
    /// itself can never succeed (the commit is not an object id).
    Failed {
        /// What failed.
        detail: String,
        /// Whether trying again is pointless.
        permanent: bool,
    },
}

impl ConfigProblem {
    /// The condition reason: one of the `CONFIG_*`, `COMMIT_NOT_FOUND` and
    /// `REPOSITORY_UNREACHABLE` constants of this module.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::FileNotFound { .. } | Self::NotAFile { .. } => CONFIG_FILE_NOT_FOUND,
            Self::CommitNotFound { .. } => COMMIT_NOT_FOUND,
            Self::Unreachable { .. } => REPOSITORY_UNREACHABLE,
            Self::Invalid { .. } => CONFIG_INVALID,
            Self::TooLarge { .. } => CONFIG_TOO_LARGE,
            Self::Timeout { .. } => CONFIG_FETCH_TIMEOUT,
            Self::Failed { .. } => CONFIG_FETCH_FAILED,
        }
    }

    /// Whether the problem stays for this commit: a missing, invalid or too large file (and an
    /// id that is not a commit). Such problems are cached, and an Environment waits for a new
    /// commit. The others (unreachable, timeout, unknown commit, the operator's own failures)
    /// are not cached and are retried with backoff.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::FileNotFound { .. } | Self::NotAFile { .. } | Self::Invalid { .. } | Self::TooLarge { .. } => true,
            Self::CommitNotFound { .. } | Self::Unreachable { .. } | Self::Timeout { .. } => false,
            Self::Failed { permanent, .. } => *permanent,
        }
    }

    fn from_source(error: SourceError, file: &str) -> Self {
        match error {
            SourceError::CommitNotFound { url, commit } => Self::CommitNotFound { url, commit },
            SourceError::FileNotFound { commit, .. } => Self::FileNotFound { commit },
            SourceError::NotAFile { commit, kind, .. } => Self::NotAFile { file: file.to_owned(), commit, kind },
            SourceError::TooLarge { commit, size, max, .. } => {
                Self::TooLarge { file: file.to_owned(), commit, size, max }
            }
            SourceError::Unreachable { url, detail } => Self::Unreachable { url, detail },
            SourceError::Timeout { url, commit, after, .. } => Self::Timeout { url, commit, after },
            SourceError::InvalidRequest { reason, .. } => Self::Failed { detail: reason, permanent: true },
            SourceError::Failed { detail, .. } => Self::Failed { detail, permanent: false },
        }
    }
}

/// The abbreviated commit id users see in GitHub.
fn short(commit: &str) -> &str {
    commit.get(..7).filter(|_| commit.chars().all(|c| c.is_ascii_hexdigit())).unwrap_or(commit)
}

/// `path (line N): reason`, or `line N: reason` for the document as a whole.
fn field_error(error: &FieldError) -> String {
    match (error.path.as_str(), error.line) {
        (config::ROOT_PATH, Some(line)) => format!("line {line}: {}", error.reason),
        (config::ROOT_PATH, None) => error.reason.clone(),
        (path, Some(line)) => format!("{path} (line {line}): {}", error.reason),
        (path, None) => format!("{path}: {}", error.reason),
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FileNotFound { commit } => write!(
                f,
                "commit {} has no {CONFIG_FILE} (nor {CONFIG_FILE_ALTERNATIVE}) at the root of the repository; \
                 add one to the branch to get a preview",
                short(commit)
            ),
            Self::NotAFile { file, commit, kind } => {
                write!(f, "{file} at {} is a {kind}, not a file; make it a regular file", short(commit))
            }
            Self::CommitNotFound { url, commit } => write!(
                f,
                "commit {} is not in {url}; it may not have reached that remote yet, so it will be looked for again",
                short(commit)
            ),
            Self::Unreachable { url, detail } => write!(f, "cannot fetch from {url}: {detail}; retrying"),
            Self::Invalid { file, commit, error } => {
                let errors: Vec<String> = error.errors.iter().map(field_error).collect();
                write!(f, "{file} at {} is invalid: {}", short(commit), errors.join("; "))
            }
            Self::TooLarge { file, commit, size, max } => write!(
                f,
                "{file} at {} is {size} bytes, more than the {max} bytes allowed; make it smaller",
                short(commit)
            ),
            Self::Timeout { url, commit, after } => write!(
                f,
                "reading the configuration of commit {} from {url} took longer than {}s; retrying",
                short(commit),
                after.as_secs()
            ),
            Self::Failed { detail, .. } => write!(f, "the operator failed to read the configuration: {detail}"),
        }
    }
}

impl std::error::Error for ConfigProblem {}

type CacheKey = (String, String);
type Loaded = Result<Arc<StagelyConfig>, ConfigProblem>;

/// Remembered loads, the oldest evicted first.
struct Cache {
    capacity: usize,
    entries: HashMap<CacheKey, Loaded>,
    order: VecDeque<CacheKey>,
}

impl Cache {
    fn insert(&mut self, key: CacheKey, value: Loaded) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.entries.remove(&oldest);
            }
        }
    }
}

/// Loads and parses `stagely.yaml` at a commit, remembering each commit's outcome.
///
/// Successes and permanent problems (see [`ConfigProblem::is_permanent`]) are cached by
/// (clone URL, commit), at most [`CACHE_ENTRIES`] of them by default, the oldest evicted first;
/// transient problems are not, so the next load tries again. The cache does not look at the
/// token: what a commit holds does not depend on who reads it.
///
/// `stagely.yaml` is read at the root of the repository; when the commit has none,
/// `stagely.yml` is read instead.
pub struct ConfigLoader {
    source: Arc<dyn RepositorySource>,
    max_bytes: u64,
    cache: Mutex<Cache>,
}

impl ConfigLoader {
    /// A loader reading through `source`, with the default limits ([`MAX_CONFIG_BYTES`],
    /// [`CACHE_ENTRIES`]).
    pub fn new(source: Arc<dyn RepositorySource>) -> Self {
        Self::with_limits(source, MAX_CONFIG_BYTES, CACHE_ENTRIES)
    }

    /// A loader refusing files over `max_bytes` and remembering at most `cache_entries` loads.
    pub fn with_limits(source: Arc<dyn RepositorySource>, max_bytes: u64, cache_entries: usize) -> Self {
        let cache = Cache { capacity: cache_entries, entries: HashMap::new(), order: VecDeque::new() };
        Self { source, max_bytes, cache: Mutex::new(cache) }
    }

    /// The configuration of `repo` at `commit`.
    pub async fn load(&self, repo: &Repo, commit: &str) -> Result<Arc<StagelyConfig>, ConfigProblem> {
        let key = (repo.clone_url.clone(), commit.to_ascii_lowercase());
        if let Some(known) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).entries.get(&key) {
            return known.clone();
        }
        let loaded = self.read(repo, commit).await;
        if loaded.as_ref().err().is_none_or(ConfigProblem::is_permanent) {
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, loaded.clone());
        }
        loaded
    }

    async fn read(&self, repo: &Repo, commit: &str) -> Loaded {
        let read = |file| self.source.read_file(repo, commit, file, self.max_bytes);
        let (file, bytes) = match read(CONFIG_FILE).await {
            Ok(bytes) => (CONFIG_FILE, bytes),
            Err(SourceError::FileNotFound { .. }) => match read(CONFIG_FILE_ALTERNATIVE).await {
                Ok(bytes) => (CONFIG_FILE_ALTERNATIVE, bytes),
                Err(err) => return Err(ConfigProblem::from_source(err, CONFIG_FILE_ALTERNATIVE)),
            },
            Err(err) => return Err(ConfigProblem::from_source(err, CONFIG_FILE)),
        };
        let invalid = |error: ConfigError| ConfigProblem::Invalid { file: file.into(), commit: commit.into(), error };
        let text = String::from_utf8(bytes).map_err(|err| {
            let at = err.utf8_error().valid_up_to();
            let line = err.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            invalid(
                FieldError {
                    path: config::ROOT_PATH.into(),
                    reason: "the file is not UTF-8 text".into(),
                    line: Some(line),
                }
                .into(),
            )
        })?;
        config::parse(&text).map(Arc::new).map_err(invalid)
    }
}

#[cfg(test)]
mod tests {
    //! The loader against an in-memory source (a fake standing in for a repository: the git
    //! source itself is tested against real repositories in `tests/source.rs`).

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const COMMIT: &str = "9f2c1e0aa7d94f6d1a8f0e3c5b2d7e9f01234567";

    /// Files by (commit, path); a commit absent from `commits` is unknown to the remote.
    #[derive(Default)]
    struct Memory {
        files: HashMap<(String, String), Vec<u8>>,
        unreachable: bool,
        reads: AtomicUsize,
    }

    impl Memory {
        fn with(files: &[(&str, &str, &str)]) -> Self {
            let files = files.iter().map(|(c, p, t)| (((*c).into(), (*p).into()), t.as_bytes().to_vec())).collect();
            Self { files, ..Self::default() }
        }
    }

    impl RepositorySource for Memory {
        fn read_file<'a>(
            &'a self,
            repo: &'a Repo,
            commit: &'a str,
            path: &'a str,
            max_bytes: u64,
        ) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let result = if self.unreachable {
                Err(SourceError::Unreachable { url: repo.clone_url.clone(), detail: "connection refused".into() })
            } else if !self.files.keys().any(|(c, _)| c == commit) {
                Err(SourceError::CommitNotFound { url: repo.clone_url.clone(), commit: commit.into() })
            } else {
                match self.files.get(&(commit.to_owned(), path.to_owned())) {
                    None => Err(SourceError::FileNotFound { path: path.into(), commit: commit.into() }),
                    Some(bytes) if bytes.len() as u64 > max_bytes => Err(SourceError::TooLarge {
                        path: path.into(),
                        commit: commit.into(),
                        size: bytes.len() as u64,
                        max: max_bytes,
                    }),
                    Some(bytes) => Ok(bytes.clone()),
                }
            };
            Box::pin(std::future::ready(result))
        }
    }

    fn repo() -> Repo {
        Repo { clone_url: "https://example.com/acme/shop.git".into(), token: None, github: None }
    }

    const VALID: &str = "version: 2\nbuilds:\n  web: {}\n";

    #[tokio::test]
    async fn reads_stagely_yaml_and_falls_back_to_stagely_yml() {
        let other = "1111111111111111111111111111111111111111";
        let source = Arc::new(Memory::with(&[
            (COMMIT, "stagely.yaml", VALID),
            (COMMIT, "stagely.yml", "not: read"),
            (other, "stagely.yml", VALID),
        ]));
        let loader = ConfigLoader::new(source);
        assert!(loader.load(&repo(), COMMIT).await.unwrap().builds.contains_key("web"));
        assert!(loader.load(&repo(), other).await.unwrap().builds.contains_key("web"));
    }

    #[tokio::test]
    async fn invalid_files_name_every_field_with_its_line() {
        let yaml = "version: 3\nbuilds:\n  Web:\n    context: /abs\n";
        let loader = ConfigLoader::new(Arc::new(Memory::with(&[(COMMIT, "stagely.yaml", yaml)])));
        let problem = loader.load(&repo(), COMMIT).await.unwrap_err();
        assert_eq!(problem.reason(), CONFIG_INVALID);
        assert!(problem.is_permanent());
        let message = problem.to_string();
        assert!(message.starts_with("stagely.yaml at 9f2c1e0 is invalid: version: unsupported version 3"), "{message}");
        assert!(message.contains("; builds.Web: build name \"Web\" must be a DNS label"), "{message}");
        assert!(message.contains("; builds.Web.context: "), "{message}");

        let yaml = "version: 2\nbuilds:\n  web:\n    platforms: [linux/amd64, linux/s390]\n";
        let loader = ConfigLoader::new(Arc::new(Memory::with(&[(COMMIT, "stagely.yaml", yaml)])));
        let message = loader.load(&repo(), COMMIT).await.unwrap_err().to_string();
        assert!(
            message.starts_with("stagely.yaml at 9f2c1e0 is invalid: builds.web.platforms[1] (line 4): "),
            "{message}"
        );
        assert!(message.contains("linux/s390"), "{message}");
    }

    #[tokio::test]
    async fn a_file_that_is_not_utf8_is_invalid_at_its_line() {
        let source = Memory {
            files: [((COMMIT.into(), "stagely.yaml".into()), b"version: 2\n\xff\n".to_vec())].into(),
            ..Memory::default()
        };
        let message = ConfigLoader::new(Arc::new(source)).load(&repo(), COMMIT).await.unwrap_err().to_string();
        assert_eq!(message, "stagely.yaml at 9f2c1e0 is invalid: line 2: the file is not UTF-8 text");
    }

    #[tokio::test]
    async fn each_problem_has_its_reason_and_permanence() {
        let source = Arc::new(Memory::with(&[(COMMIT, "README.md", "hi"), ("22", "stagely.yaml", &"#".repeat(100))]));
        let loader = ConfigLoader::with_limits(source, 10, 10);
        let missing = loader.load(&repo(), COMMIT).await.unwrap_err();
        assert_eq!((missing.reason(), missing.is_permanent()), (CONFIG_FILE_NOT_FOUND, true));
        assert_eq!(
            missing.to_string(),
            "commit 9f2c1e0 has no stagely.yaml (nor stagely.yml) at the root of the repository; \
             add one to the branch to get a preview"
        );
        let large = loader.load(&repo(), "22").await.unwrap_err();
        assert_eq!((large.reason(), large.is_permanent()), (CONFIG_TOO_LARGE, true));
        assert_eq!(
            large.to_string(),
            "stagely.yaml at 22 is 100 bytes, more than the 10 bytes allowed; make it smaller"
        );
        let unknown = loader.load(&repo(), "3333333333").await.unwrap_err();
        assert_eq!((unknown.reason(), unknown.is_permanent()), (COMMIT_NOT_FOUND, false));
    }

    #[tokio::test]
    async fn successes_and_permanent_problems_are_cached_transient_ones_are_not() {
        let source = Arc::new(Memory::with(&[(COMMIT, "stagely.yaml", VALID), ("44", "x", "")]));
        let loader = ConfigLoader::new(source.clone());
        let first = loader.load(&repo(), COMMIT).await.unwrap();
        let again = loader.load(&repo(), &COMMIT.to_uppercase()).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(source.reads.load(Ordering::SeqCst), 1);

        // Missing: two reads (stagely.yaml, then stagely.yml), then none.
        loader.load(&repo(), "44").await.unwrap_err();
        loader.load(&repo(), "44").await.unwrap_err();
        assert_eq!(source.reads.load(Ordering::SeqCst), 3);

        // Unknown commit: read every time.
        loader.load(&repo(), "55").await.unwrap_err();
        loader.load(&repo(), "55").await.unwrap_err();
        assert_eq!(source.reads.load(Ordering::SeqCst), 5);

        let down = Arc::new(Memory { unreachable: true, ..Memory::default() });
        let loader = ConfigLoader::new(down.clone());
        for _ in 0..2 {
            let problem = loader.load(&repo(), COMMIT).await.unwrap_err();
            assert_eq!((problem.reason(), problem.is_permanent()), (REPOSITORY_UNREACHABLE, false));
        }
        assert_eq!(down.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_forgets_the_oldest_first() {
        let commits = ["a1", "a2", "a3"];
        let files: Vec<_> = commits.iter().map(|c| (*c, "stagely.yaml", VALID)).collect();
        let source = Arc::new(Memory::with(&files));
        let loader = ConfigLoader::with_limits(source.clone(), MAX_CONFIG_BYTES, 2);
        for commit in commits {
            loader.load(&repo(), commit).await.unwrap();
        }
        assert_eq!(source.reads.load(Ordering::SeqCst), 3);
        loader.load(&repo(), "a3").await.unwrap();
        loader.load(&repo(), "a2").await.unwrap();
        assert_eq!(source.reads.load(Ordering::SeqCst), 3, "the two newest are remembered");
        loader.load(&repo(), "a1").await.unwrap();
        assert_eq!(source.reads.load(Ordering::SeqCst), 4, "the oldest was forgotten");
    }

    #[test]
    fn short_commits_are_seven_hex_digits() {
        assert_eq!(short(COMMIT), "9f2c1e0");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("not-a-commit-id"), "not-a-commit-id");
    }
}
