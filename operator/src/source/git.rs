//! The git [`RepositorySource`]: reads one file at one commit of any git remote without cloning
//! the repository.
//!
//! Each clone URL gets one bare repository under the cache directory, named after the URL (a
//! readable part and a hash). Its `origin` is a promisor remote, as in a partial clone: a read
//! fetches the one commit with its trees and no blobs (`git fetch --depth 1
//! --filter=blob:none`), skipped when the commit is already there, looks the path up in the
//! trees (`git ls-tree`), asks the blob's size (`git cat-file -s`, which fetches that one blob on
//! demand) and reads it (`git cat-file blob`) only if it is within the limit. A file over the
//! limit is downloaded into the cache, since git cannot tell a blob's size without it, but never
//! read into memory; the time limit bounds the download.
//!
//! Git runs with no system or global configuration, no terminal prompt and the C locale, its
//! process group killed when a read is abandoned. A token travels as an `http.extraHeader` set
//! through `GIT_CONFIG_*` environment variables, never in the arguments or the URL (which may be
//! logged). Reads of one repository are serialized.
//!
//! The cached objects are shared by every Project using the same clone URL: a commit fetched
//! with one Project's token is read again without asking the remote.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use stagely_api::protocol::Sensitive;
use tokio::process::Command;

use super::{BoxFuture, Repo, RepositorySource, SourceError};

/// Reads files through git, keeping one bare repository per clone URL under a cache directory.
pub struct GitSource {
    cache_dir: PathBuf,
    timeout: Duration,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl GitSource {
    /// A source keeping its repositories under `cache_dir` (created when needed) and giving up
    /// on a read after `timeout`, fetching included.
    pub fn new(cache_dir: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self { cache_dir: cache_dir.into(), timeout, locks: Mutex::new(HashMap::new()) }
    }

    /// The bare repository kept for `clone_url`.
    pub fn repository_dir(&self, clone_url: &str) -> PathBuf {
        self.cache_dir.join(dir_name(clone_url))
    }

    fn lock(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(dir.to_owned()).or_default())
    }

    async fn read(&self, repo: &Repo, commit: &str, path: &str, max_bytes: u64) -> Result<Vec<u8>, SourceError> {
        let url = public_url(&repo.clone_url);
        let invalid = |reason: String| SourceError::InvalidRequest { commit: commit.into(), path: path.into(), reason };
        if !is_object_id(commit) {
            return Err(invalid(format!("{commit:?} is not a full commit id (40 or 64 hexadecimal digits)")));
        }
        if path.is_empty() || path.starts_with(['/', '-']) || path.split('/').any(|c| c.is_empty() || c == "..") {
            return Err(invalid(format!("{path:?} is not a path inside the repository")));
        }
        if repo.clone_url.is_empty() || repo.clone_url.starts_with('-') || repo.clone_url.contains(char::is_whitespace)
        {
            return Err(invalid(format!("clone URL {url:?} is not usable")));
        }
        let commit = commit.to_ascii_lowercase();
        let dir = self.repository_dir(&repo.clone_url);
        let lock = self.lock(&dir);
        let _held = lock.lock().await;
        let git = Git { dir: &dir, header: repo.token.as_ref().map(auth_header), token: repo.token.as_ref(), url };
        let failed = |detail: String| SourceError::Failed {
            url: git.url.clone(),
            commit: commit.clone(),
            path: path.into(),
            detail,
        };

        self.prepare(&git, &repo.clone_url).await.map_err(failed)?;
        if !git.has_commit(&commit).await.map_err(failed)? {
            tracing::debug!(url = %git.url, %commit, "fetching commit");
            let out = git
                .run(&[
                    "fetch",
                    "--quiet",
                    "--depth=1",
                    "--filter=blob:none",
                    "--no-tags",
                    "--no-write-fetch-head",
                    "--recurse-submodules=no",
                    "origin",
                    &commit,
                ])
                .await
                .map_err(failed)?;
            if !out.status.success() {
                return Err(git.remote_error(&out, &commit, path));
            }
        }

        let out = git.run(&["ls-tree", "-z", &commit, "--", path]).await.map_err(failed)?;
        if !out.status.success() {
            return Err(git.remote_error(&out, &commit, path));
        }
        let listing = String::from_utf8_lossy(&out.stdout);
        let Some(entry) = listing.split('\0').find(|e| e.split_once('\t').is_some_and(|(_, p)| p == path)) else {
            return Err(SourceError::FileNotFound { path: path.into(), commit });
        };
        // `<mode> SP <type> SP <object> TAB <path>`
        let mut fields = entry.split(['\t', ' ']);
        let (mode, kind, object) = (fields.next(), fields.next(), fields.next().unwrap_or_default());
        let not_a_file = |kind| SourceError::NotAFile { path: path.into(), commit: commit.clone(), kind };
        match (mode, kind) {
            (Some("120000"), _) => return Err(not_a_file("symbolic link")),
            (_, Some("tree")) => return Err(not_a_file("directory")),
            (_, Some("commit")) => return Err(not_a_file("submodule")),
            (_, Some("blob")) if is_object_id(object) => {}
            _ => return Err(failed(format!("git ls-tree printed {entry:?}"))),
        }

        // Fetches the blob from the remote when it is not here yet.
        let out = git.run(&["cat-file", "-s", object]).await.map_err(failed)?;
        if !out.status.success() {
            return Err(git.remote_error(&out, &commit, path));
        }
        let size: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| failed(format!("git cat-file -s printed {:?}", String::from_utf8_lossy(&out.stdout))))?;
        if size > max_bytes {
            return Err(SourceError::TooLarge { path: path.into(), commit, size, max: max_bytes });
        }
        let out = git.run(&["cat-file", "blob", object]).await.map_err(failed)?;
        if !out.status.success() {
            return Err(git.remote_error(&out, &commit, path));
        }
        if out.stdout.len() as u64 != size {
            return Err(failed(format!("git cat-file blob gave {} bytes, not {size}", out.stdout.len())));
        }
        Ok(out.stdout)
    }

    /// Creates the bare repository for `clone_url` if it is not there, and checks that an
    /// existing one is for the same URL.
    async fn prepare(&self, git: &Git<'_>, clone_url: &str) -> Result<(), String> {
        let dir = git.dir;
        if dir.join("config").exists() {
            let out = git.run(&["config", "--get", "remote.origin.url"]).await?;
            let existing = String::from_utf8_lossy(&out.stdout);
            match existing.trim_end_matches('\n') {
                url if url == clone_url => return Ok(()),
                // Not a repository this source made whole: made again below.
                "" => std::fs::remove_dir_all(dir)
                    .map_err(|err| format!("failed to remove the broken repository {}: {err}", dir.display()))?,
                _ => return Err(format!("the cache directory {} belongs to another clone URL", dir.display())),
            }
        }
        std::fs::create_dir_all(&self.cache_dir)
            .map_err(|err| format!("failed to create the cache directory {}: {err}", self.cache_dir.display()))?;
        // Set up aside and renamed into place, so a half-made repository is never used.
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let staging = self.cache_dir.join(format!(".{name}.{}.{nanos}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let init = Git { dir: &staging, ..git.clone() };
        let mut steps: Vec<Vec<&str>> = vec![vec!["init", "--quiet", "--bare"]];
        for (key, value) in [
            ("remote.origin.url", clone_url),
            // A promisor remote: objects missing here (the blobs) are fetched from it on demand.
            ("remote.origin.promisor", "true"),
            ("remote.origin.partialclonefilter", "blob:none"),
        ] {
            steps.push(vec!["config", key, value]);
        }
        for args in steps {
            let out = init.run(&args).await?;
            if !out.status.success() {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(format!("git {} failed: {}", args[0], first_error(&out.stderr)));
            }
        }
        let moved = std::fs::rename(&staging, dir);
        if moved.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        match moved {
            // Another process sharing the cache directory made it first.
            Err(_) if dir.join("config").exists() => Ok(()),
            Err(err) => Err(format!("failed to move the new repository to {}: {err}", dir.display())),
            Ok(()) => Ok(()),
        }
    }
}

impl RepositorySource for GitSource {
    fn read_file<'a>(
        &'a self,
        repo: &'a Repo,
        commit: &'a str,
        path: &'a str,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
        // Dropping the read on timeout kills the git process groups it started.
        let url = public_url(&repo.clone_url);
        Box::pin(super::within(self.timeout, url, commit, path, self.read(repo, commit, path, max_bytes)))
    }
}

/// Git commands against one bare repository.
#[derive(Clone)]
struct Git<'a> {
    dir: &'a Path,
    /// The `http.extraHeader` value carrying the token.
    header: Option<String>,
    token: Option<&'a Sensitive>,
    /// The clone URL without user information, as messages show it.
    url: String,
}

/// Inherited `GIT_*` variables that may stay: how to reach servers (SSH, CA certificates) and
/// where git's helpers are. Any other (`GIT_DIR`, `GIT_TRACE*`, `GIT_CONFIG_*`, …) would change
/// what git does or prints.
const KEPT_GIT_ENV: &[&str] =
    &["GIT_EXEC_PATH", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_SSH_VARIANT", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH"];

/// `protocol.*` settings: every transport refused but these.
const ALLOWED_PROTOCOLS: &[(&str, &str)] = &[
    ("protocol.allow", "never"),
    ("protocol.https.allow", "always"),
    ("protocol.http.allow", "always"),
    ("protocol.ssh.allow", "always"),
    ("protocol.git.allow", "always"),
    ("protocol.file.allow", "always"),
];

impl Git<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("git");
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("GIT_") && !KEPT_GIT_ENV.contains(&k)) {
                command.env_remove(key);
            }
        }
        command
            .arg("--git-dir")
            .arg(self.dir)
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_LITERAL_PATHSPECS", "1")
            .env("GIT_ASKPASS", "")
            .env_remove("SSH_ASKPASS")
            // Messages are matched in English.
            .env("LC_ALL", "C")
            .env("LANGUAGE", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own group, so that abandoning a read stops git's helpers too.
            .process_group(0);
        // Configuration through the environment, where neither `ps` nor git's own messages show
        // it: the transports a clone URL may use (those `cloneUrl` accepts; never `ext::` and
        // the like), and the token's header.
        let mut config: Vec<(&str, &str)> = ALLOWED_PROTOCOLS.to_vec();
        if let Some(header) = &self.header {
            config.push(("http.extraHeader", header));
        }
        command.env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (key, value)) in config.into_iter().enumerate() {
            command.env(format!("GIT_CONFIG_KEY_{i}"), key).env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        command
    }

    /// Runs git to completion; `Err` only when it could not run at all.
    async fn run(&self, args: &[&str]) -> Result<Output, String> {
        let mut command = self.command(args);
        let child = command.spawn().map_err(|err| format!("failed to run git: {err}"))?;
        let group = KillGroup(child.id());
        let out = child.wait_with_output().await.map_err(|err| format!("failed to wait for git: {err}"));
        std::mem::forget(group);
        out
    }

    /// Whether `commit` is here, without fetching it (any other command would fetch a missing
    /// commit from the promisor remote, with its whole history).
    async fn has_commit(&self, commit: &str) -> Result<bool, String> {
        let out = self.run(&["rev-list", "--no-walk", "--missing=allow-any", commit, "--"]).await?;
        Ok(out.status.success() && !out.stdout.is_empty())
    }

    /// What a failed command that talked to the remote means.
    fn remote_error(&self, out: &Output, commit: &str, path: &str) -> SourceError {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let unknown_commit = ["not our ref", "unadvertised object", "couldn't find remote ref", "no such remote ref"];
        if unknown_commit.iter().any(|needle| stderr.contains(needle)) {
            return SourceError::CommitNotFound { url: self.url.clone(), commit: commit.into() };
        }
        // 128 is git's `die()`: the remote (or the way to it) failed. Anything else (a signal, a
        // crash) is git's own failure.
        if out.status.code() != Some(128) {
            return SourceError::Failed {
                url: self.url.clone(),
                commit: commit.into(),
                path: path.into(),
                detail: format!("git ended with {}: {}", out.status, self.redact(&first_error(&out.stderr))),
            };
        }
        let denied = [
            "could not read Username",
            "could not read Password",
            "Authentication failed",
            "returned error: 401",
            "returned error: 403",
        ];
        let detail = if denied.iter().any(|needle| stderr.contains(needle)) {
            "the remote refused access (check the token, or that the repository exists)".to_owned()
        } else {
            self.redact(&first_error(&out.stderr))
        };
        SourceError::Unreachable { url: self.url.clone(), detail }
    }

    /// `text` with the clone URL's user information, the token and its header taken out.
    fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        if let Some(header) = &self.header {
            text = text.replace(header.as_str(), "<redacted>");
        }
        if let Some(token) = self.token.filter(|t| !t.expose().is_empty()) {
            text = text.replace(token.expose(), "<redacted>");
        }
        text.split(' ').map(public_url).collect::<Vec<_>>().join(" ")
    }
}

/// Kills a process group when dropped (forgotten once the process ended).
struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|pid| i32::try_from(pid).ok()).and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// The most telling line of git's error output, without its `fatal: ` or `error: ` prefix.
fn first_error(stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let generic =
        |line: &&str| line.contains("from promisor remote") || line.contains("Could not read from remote repository");
    let chosen = lines
        .iter()
        .find(|l| (l.starts_with("fatal: ") || l.starts_with("error: ")) && !generic(l))
        .or_else(|| lines.iter().find(|l| l.starts_with("fatal: ") || l.starts_with("error: ")))
        .or(lines.last())
        .copied()
        .unwrap_or("no error message");
    chosen.trim_start_matches("fatal: ").trim_start_matches("error: ").to_owned()
}

/// The `http.extraHeader` value carrying `token` as GitHub expects it (as the agent sends it).
fn auth_header(token: &Sensitive) -> String {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{}", token.expose()));
    format!("Authorization: Basic {basic}")
}

fn is_object_id(id: &str) -> bool {
    matches!(id.len(), 40 | 64) && id.chars().all(|c| c.is_ascii_hexdigit())
}

/// `url` without user information (`https://user:secret@host/x` → `https://host/x`); any other
/// text unchanged. Quotes around the URL, as git prints them, are kept.
fn public_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// A directory name for `clone_url`: its readable part (host and path) and a hash of all of it.
fn dir_name(clone_url: &str) -> String {
    let public = public_url(clone_url);
    let readable = public.split_once("://").map_or(public.as_str(), |(_, rest)| rest);
    let mut slug: String =
        readable.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    slug = slug.trim_matches(['-', '.']).chars().take(48).collect();
    format!("{slug}-{:032x}", fnv1a_128(clone_url.as_bytes()))
}

/// FNV-1a, 128 bits: stable across releases (unlike std's hasher), which keeps directory names.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes.iter().fold(OFFSET, |hash, &b| (hash ^ u128::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_information_is_taken_out_of_urls() {
        assert_eq!(public_url("https://x:ghp_secret@github.com/a/b.git"), "https://github.com/a/b.git");
        assert_eq!(public_url("'https://tok@github.com/a/b.git/':"), "'https://github.com/a/b.git/':");
        assert_eq!(public_url("https://github.com/a/b@c.git"), "https://github.com/a/b@c.git");
        assert_eq!(public_url("git@github.com:a/b.git"), "git@github.com:a/b.git");
    }

    #[test]
    fn directory_names_are_readable_distinct_and_stable() {
        let name = dir_name("https://github.com/acme/shop.git");
        assert!(name.starts_with("github.com-acme-shop.git-"), "{name}");
        assert_eq!(name, dir_name("https://github.com/acme/shop.git"));
        assert_ne!(name, dir_name("https://github.com/acme/shop"));
        assert!(!dir_name("https://u:secret@h/x").contains("secret"));
        assert_eq!(fnv1a_128(b""), 0x6c62272e07bb014262b821756295c58d);
        assert_eq!(fnv1a_128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
    }

    #[test]
    fn the_most_telling_error_line_is_kept() {
        let stderr = b"fatal: '/x' does not appear to be a git repository\nfatal: Could not read from remote repository.\n\nPlease make sure\n";
        assert_eq!(first_error(stderr), "'/x' does not appear to be a git repository");
        assert_eq!(
            first_error(b"fatal: could not fetch abc from promisor remote\n"),
            "could not fetch abc from promisor remote"
        );
    }

    #[test]
    fn the_header_hides_the_token() {
        let header = auth_header(&"ghs_abc".into());
        assert_eq!(header, "Authorization: Basic eC1hY2Nlc3MtdG9rZW46Z2hzX2FiYw==");
    }
}
