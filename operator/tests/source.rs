//! Reading `stagely.yaml` with the git source from real repositories (`file://` remotes, and
//! loopback sockets for remotes that are down, slow or refuse access): each outcome has its own
//! reason, the loader caches what it should, only the one commit is fetched, and a token never
//! appears in git's arguments, its URL or an error.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stagely_operator::source::git::GitSource;
use stagely_operator::source::{
    BoxFuture, COMMIT_NOT_FOUND, CONFIG_FETCH_TIMEOUT, CONFIG_FILE_NOT_FOUND, CONFIG_INVALID, CONFIG_TOO_LARGE,
    ConfigLoader, ConfigProblem, REPOSITORY_UNREACHABLE, Repo, RepositorySource, SourceError,
};

const VALID: &str = "version: 2\nbuilds:\n  web:\n    platforms: [linux/amd64, linux/arm64]\n";

/// Runs git in `dir` with no configuration but ours, and returns its trimmed output.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Stagely Test")
        .env("GIT_AUTHOR_EMAIL", "test@stagely.dev")
        .env("GIT_COMMITTER_NAME", "Stagely Test")
        .env("GIT_COMMITTER_EMAIL", "test@stagely.dev")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A repository to fetch from, and its commits (oldest first).
struct Origin {
    dir: tempfile::TempDir,
    commits: Vec<String>,
}

impl Origin {
    /// A repository with one commit per element of `commits`, each writing the given files.
    fn new(commits: &[&[(&str, &[u8])]]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q", "-b", "main"]);
        // As GitHub does: clients may ask for a subset of objects.
        git(dir.path(), &["config", "uploadpack.allowFilter", "true"]);
        let mut ids = Vec::new();
        for files in commits {
            for (path, content) in *files {
                let file = dir.path().join(path);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, content).unwrap();
            }
            git(dir.path(), &["add", "-A"]);
            git(dir.path(), &["commit", "-q", "--allow-empty", "-m", "change"]);
            ids.push(git(dir.path(), &["rev-parse", "HEAD"]));
        }
        Self { dir, commits: ids }
    }

    fn with_file(path: &str, content: &str) -> Self {
        Self::new(&[&[(path, content.as_bytes())]])
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    fn repo(&self) -> Repo {
        Repo { clone_url: self.url(), token: None, github: None }
    }

    fn head(&self) -> &str {
        self.commits.last().unwrap()
    }
}

fn source(cache: &Path) -> Arc<GitSource> {
    Arc::new(GitSource::new(cache, Duration::from_secs(60)))
}

/// A source that counts the reads reaching the one it wraps.
struct Counting {
    inner: Arc<GitSource>,
    reads: AtomicUsize,
}

impl RepositorySource for Counting {
    fn read_file<'a>(
        &'a self,
        repo: &'a Repo,
        commit: &'a str,
        path: &'a str,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_file(repo, commit, path, max_bytes)
    }
}

fn counting(cache: &Path) -> Arc<Counting> {
    Arc::new(Counting { inner: source(cache), reads: AtomicUsize::new(0) })
}

async fn load_err(loader: &ConfigLoader, repo: &Repo, commit: &str) -> ConfigProblem {
    loader.load(repo, commit).await.expect_err("the load fails")
}

/// Every object of a repository, as `<id> <type> <size>` lines.
fn objects(dir: &Path) -> Vec<String> {
    let listing = git(dir, &["cat-file", "--batch-all-objects", "--batch-check"]);
    listing.lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_valid_file_is_read_and_parsed() {
    let origin = Origin::with_file("stagely.yaml", VALID);
    let cache = tempfile::tempdir().unwrap();
    let git = source(cache.path());
    let bytes = git.read_file(&origin.repo(), origin.head(), "stagely.yaml", 1024).await.unwrap();
    assert_eq!(bytes, VALID.as_bytes());

    let config = ConfigLoader::new(git).load(&origin.repo(), origin.head()).await.unwrap();
    assert_eq!(config.builds["web"].platforms.len(), 2);
}

#[tokio::test]
async fn stagely_yml_is_read_when_there_is_no_stagely_yaml() {
    let origin = Origin::with_file("stagely.yml", VALID);
    let cache = tempfile::tempdir().unwrap();
    let config = ConfigLoader::new(source(cache.path())).load(&origin.repo(), origin.head()).await.unwrap();
    assert!(config.builds.contains_key("web"));
}

#[tokio::test]
async fn a_missing_file_is_config_file_not_found() {
    let origin = Origin::new(&[&[("README.md", b"hello"), ("deploy/stagely.yaml", VALID.as_bytes())]]);
    let cache = tempfile::tempdir().unwrap();
    let git = source(cache.path());
    let err = git.read_file(&origin.repo(), origin.head(), "stagely.yaml", 1024).await.unwrap_err();
    assert_eq!(err, SourceError::FileNotFound { path: "stagely.yaml".into(), commit: origin.head().into() });
    // A nested path is found, and one whose directory is missing is not.
    assert!(git.read_file(&origin.repo(), origin.head(), "deploy/stagely.yaml", 1024).await.is_ok());
    let err = git.read_file(&origin.repo(), origin.head(), "nope/stagely.yaml", 1024).await.unwrap_err();
    assert!(matches!(err, SourceError::FileNotFound { .. }), "{err:?}");

    let problem = load_err(&ConfigLoader::new(git), &origin.repo(), origin.head()).await;
    assert_eq!(problem.reason(), CONFIG_FILE_NOT_FOUND);
    assert!(problem.is_permanent());
    let short = &origin.head()[..7];
    assert_eq!(
        problem.to_string(),
        format!(
            "commit {short} has no stagely.yaml (nor stagely.yml) at the root of the repository; add one to the \
             branch to get a preview"
        )
    );
}

#[tokio::test]
async fn a_directory_is_not_a_config_file() {
    let origin = Origin::with_file("stagely.yaml/inside", "x");
    let cache = tempfile::tempdir().unwrap();
    let problem = load_err(&ConfigLoader::new(source(cache.path())), &origin.repo(), origin.head()).await;
    assert_eq!(problem.reason(), CONFIG_FILE_NOT_FOUND);
    assert_eq!(
        problem.to_string(),
        format!("stagely.yaml at {} is a directory, not a file; make it a regular file", &origin.head()[..7])
    );
}

#[tokio::test]
async fn an_unknown_commit_is_commit_not_found_and_transient() {
    let origin = Origin::with_file("stagely.yaml", VALID);
    let cache = tempfile::tempdir().unwrap();
    let unknown = "0123456789abcdef0123456789abcdef01234567";
    let err = source(cache.path()).read_file(&origin.repo(), unknown, "stagely.yaml", 1024).await.unwrap_err();
    assert_eq!(err, SourceError::CommitNotFound { url: origin.url(), commit: unknown.into() });

    let loader = ConfigLoader::new(source(cache.path()));
    let problem = load_err(&loader, &origin.repo(), unknown).await;
    assert_eq!(problem.reason(), COMMIT_NOT_FOUND);
    assert!(!problem.is_permanent());
    assert_eq!(
        problem.to_string(),
        format!(
            "commit 0123456 is not in {}; it may not have reached that remote yet, so it will be looked for again",
            origin.url()
        )
    );
}

#[tokio::test]
async fn an_id_that_is_not_a_commit_is_refused_before_git_runs() {
    let cache = tempfile::tempdir().unwrap();
    let repo = Repo { clone_url: "file:///nowhere".into(), token: None, github: None };
    let err = source(cache.path()).read_file(&repo, "--upload-pack=touch", "stagely.yaml", 1024).await.unwrap_err();
    assert!(matches!(err, SourceError::InvalidRequest { .. }), "{err:?}");
    assert!(std::fs::read_dir(cache.path()).unwrap().next().is_none(), "nothing was set up");
}

#[tokio::test]
async fn an_unreachable_remote_is_repository_unreachable() {
    let cache = tempfile::tempdir().unwrap();
    let loader = ConfigLoader::new(source(cache.path()));
    let commit = "0123456789abcdef0123456789abcdef01234567";

    let missing = tempfile::tempdir().unwrap().path().join("gone.git");
    let repo = Repo { clone_url: format!("file://{}", missing.display()), token: None, github: None };
    let problem = load_err(&loader, &repo, commit).await;
    assert_eq!(problem.reason(), REPOSITORY_UNREACHABLE);
    assert!(!problem.is_permanent());
    assert_eq!(
        problem.to_string(),
        format!(
            "cannot fetch from {}: '{}' does not appear to be a git repository; retrying",
            repo.clone_url,
            missing.display()
        )
    );

    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let repo = Repo { clone_url: format!("http://127.0.0.1:{closed}/x.git"), token: None, github: None };
    let problem = load_err(&loader, &repo, commit).await;
    assert_eq!(problem.reason(), REPOSITORY_UNREACHABLE);
    let message = problem.to_string();
    assert!(
        message.starts_with(&format!("cannot fetch from http://127.0.0.1:{closed}/x.git: unable to access")),
        "{message}"
    );
    assert!(message.contains("Couldn't connect to server"), "{message}");
}

#[tokio::test]
async fn invalid_yaml_lists_every_field_path() {
    let yaml = "version: 2\nbuilds:\n  web:\n    context: ../outside\n    platforms: [linux/amd64, linux/amd64]\n  \
                Api:\n    timeout: soon\npreview:\n  lifecycle:\n    on_start:\n      - service: web\n        command: ''\n";
    let origin = Origin::with_file("stagely.yaml", yaml);
    let cache = tempfile::tempdir().unwrap();
    let problem = load_err(&ConfigLoader::new(source(cache.path())), &origin.repo(), origin.head()).await;
    assert_eq!(problem.reason(), CONFIG_INVALID);
    assert!(problem.is_permanent());
    let message = problem.to_string();
    assert!(message.starts_with(&format!("stagely.yaml at {} is invalid: ", &origin.head()[..7])), "{message}");
    for path in [
        "builds.Api: ",
        "builds.Api.timeout: ",
        "builds.web.context: ",
        "builds.web.platforms[1]: ",
        "preview.lifecycle.on_start[0].command: ",
    ] {
        assert!(message.contains(path), "{path} missing from {message}");
    }

    // A file that does not deserialize names its one field, with the line.
    let origin = Origin::with_file("stagely.yaml", "version: 2\nbuilds:\n  web:\n    platform: linux/s390\n");
    let problem = load_err(&ConfigLoader::new(source(cache.path())), &origin.repo(), origin.head()).await;
    let message = problem.to_string();
    assert!(message.contains("is invalid: builds.web.platform (line 4): "), "{message}");
    assert!(message.contains("linux/s390"), "{message}");
}

#[tokio::test]
async fn a_file_over_the_limit_is_refused_without_reading_it() {
    let big = format!("version: 2\nbuilds:\n  web: {{}}\n{}", "# padding\n".repeat(20_000));
    let origin = Origin::with_file("stagely.yaml", &big);
    let cache = tempfile::tempdir().unwrap();
    let err = source(cache.path()).read_file(&origin.repo(), origin.head(), "stagely.yaml", 100_000).await.unwrap_err();
    assert_eq!(
        err,
        SourceError::TooLarge {
            path: "stagely.yaml".into(),
            commit: origin.head().into(),
            size: big.len() as u64,
            max: 100_000
        }
    );
    let loader = ConfigLoader::with_limits(source(cache.path()), 100_000, 10);
    let problem = load_err(&loader, &origin.repo(), origin.head()).await;
    assert_eq!(problem.reason(), CONFIG_TOO_LARGE);
    assert!(problem.is_permanent());
    assert_eq!(
        problem.to_string(),
        format!(
            "stagely.yaml at {} is {} bytes, more than the 100000 bytes allowed; make it smaller",
            &origin.head()[..7],
            big.len()
        )
    );
}

#[tokio::test]
async fn only_the_one_commit_is_fetched() {
    let large = vec![7u8; 3 * 1024 * 1024];
    let other = vec![9u8; 200 * 1024];
    let origin = Origin::new(&[
        &[("stagely.yaml", b"version: 2\nbuilds: {old: {}}\n"), ("large.bin", &large)],
        &[("stagely.yaml", VALID.as_bytes()), ("large.bin", b""), ("other.bin", &other)],
    ]);
    let cache = tempfile::tempdir().unwrap();
    let git = source(cache.path());
    let config = ConfigLoader::new(git.clone()).load(&origin.repo(), origin.head()).await.unwrap();
    assert!(config.builds.contains_key("web"));

    let objects = objects(&git.repository_dir(&origin.url()));
    let commits: Vec<&String> = objects.iter().filter(|o| o.contains(" commit ")).collect();
    assert_eq!(commits.len(), 1, "one commit: {objects:?}");
    assert!(commits[0].starts_with(origin.head()), "{objects:?}");
    let blobs: Vec<&String> = objects.iter().filter(|o| o.contains(" blob ")).collect();
    assert_eq!(blobs.len(), 1, "only stagely.yaml's blob, not large.bin's nor other.bin's: {objects:?}");
    assert!(blobs[0].ends_with(&format!(" blob {}", VALID.len())), "{objects:?}");
}

#[tokio::test]
async fn a_second_load_of_a_commit_runs_no_git() {
    let origin = Origin::with_file("stagely.yaml", VALID);
    let cache = tempfile::tempdir().unwrap();
    let source = counting(cache.path());
    let loader = ConfigLoader::new(source.clone());
    let (repo, head) = (origin.repo(), origin.head().to_owned());
    let first = loader.load(&repo, &head).await.unwrap();
    assert_eq!(source.reads.load(Ordering::SeqCst), 1);

    drop(origin);
    let again = loader.load(&repo, &head).await.unwrap();
    assert!(Arc::ptr_eq(&first, &again), "the same parsed configuration");
    assert_eq!(source.reads.load(Ordering::SeqCst), 1, "the source was not asked again");

    // Without the loader's cache, the git source still needs no remote: the commit and the
    // blob are in its repository, and the fetch is skipped.
    let fresh = ConfigLoader::new(source.inner.clone());
    assert_eq!(*fresh.load(&repo, &head).await.unwrap(), *first);
}

#[tokio::test]
async fn permanent_problems_are_cached_and_transient_ones_are_not() {
    let origin = Origin::with_file("README.md", "no configuration here");
    let cache = tempfile::tempdir().unwrap();
    let source = counting(cache.path());
    let loader = ConfigLoader::new(source.clone());
    let (repo, head) = (origin.repo(), origin.head().to_owned());
    assert_eq!(load_err(&loader, &repo, &head).await.reason(), CONFIG_FILE_NOT_FOUND);
    let reads = source.reads.load(Ordering::SeqCst);
    assert_eq!(reads, 2, "stagely.yaml, then stagely.yml");
    assert_eq!(load_err(&loader, &repo, &head).await.reason(), CONFIG_FILE_NOT_FOUND);
    assert_eq!(source.reads.load(Ordering::SeqCst), reads, "the problem was remembered");

    // A remote that is not there yet: tried again, and found once it is there.
    let later = tempfile::tempdir().unwrap();
    let path = later.path().join("later");
    let repo = Repo { clone_url: format!("file://{}", path.display()), token: None, github: None };
    let made = Origin::with_file("stagely.yaml", VALID);
    let commit = made.head().to_owned();
    assert_eq!(load_err(&loader, &repo, &commit).await.reason(), REPOSITORY_UNREACHABLE);
    assert_eq!(load_err(&loader, &repo, &commit).await.reason(), REPOSITORY_UNREACHABLE);
    let reads = source.reads.load(Ordering::SeqCst);
    std::fs::rename(made.dir.path(), &path).unwrap();
    let config = loader.load(&repo, &commit).await.unwrap();
    assert!(config.builds.contains_key("web"));
    assert_eq!(source.reads.load(Ordering::SeqCst), reads + 1);
    std::mem::forget(made.dir); // moved away; `later` removes it
}

#[tokio::test]
async fn a_remote_that_never_answers_times_out_and_git_is_stopped() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || listener.accept().unwrap().0);

    let cache = tempfile::tempdir().unwrap();
    let git = Arc::new(GitSource::new(cache.path(), Duration::from_secs(2)));
    let loader = ConfigLoader::new(git);
    let repo = Repo { clone_url: format!("http://127.0.0.1:{port}/slow.git"), token: None, github: None };
    let started = Instant::now();
    let problem = load_err(&loader, &repo, "0123456789abcdef0123456789abcdef01234567").await;
    assert_eq!(problem.reason(), CONFIG_FETCH_TIMEOUT);
    assert!(!problem.is_permanent());
    assert!(started.elapsed() < Duration::from_secs(30), "gave up in time: {:?}", started.elapsed());
    assert_eq!(
        problem.to_string(),
        format!("reading the configuration of commit 0123456 from {} took longer than 2s; retrying", repo.clone_url)
    );

    // git (and its HTTP helper) were killed: the connection they held is closed.
    let mut connection = accepted.join().unwrap();
    connection.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match connection.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(err) => panic!("the connection stayed open: {err}"),
        }
    }
}

/// The command lines of every process, as `/proc` shows them.
fn command_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let path: PathBuf = entry.path().join("cmdline");
        if let Ok(bytes) = std::fs::read(&path) {
            lines.push(String::from_utf8_lossy(&bytes).replace('\0', " "));
        }
    }
    lines
}

#[tokio::test]
async fn a_token_travels_in_a_header_only() {
    let token = "ghs_TopSecretInstallationToken0123456789";
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // What git sends, and what every process's command line said while git was talking to us.
    let server = std::thread::spawn(move || {
        let (mut connection, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = connection.read(&mut buf).unwrap();
            assert!(n > 0, "git closed the connection early");
            request.extend_from_slice(&buf[..n]);
        }
        let seen = command_lines();
        connection.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        (String::from_utf8_lossy(&request).into_owned(), seen)
    });

    let cache = tempfile::tempdir().unwrap();
    let loader = ConfigLoader::new(source(cache.path()));
    let repo =
        Repo { clone_url: format!("http://127.0.0.1:{port}/acme/shop.git"), token: Some(token.into()), github: None };
    let problem = load_err(&loader, &repo, "0123456789abcdef0123456789abcdef01234567").await;
    let (request, command_lines) = server.join().unwrap();

    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
    assert!(request.contains(&format!("\r\nAuthorization: Basic {basic}\r\n")), "{request}");
    assert!(request.starts_with("GET /acme/shop.git/info/refs?service=git-upload-pack "), "{request}");
    assert!(command_lines.iter().any(|l| l.contains("/acme/shop.git")), "git was running: {command_lines:?}");
    for line in &command_lines {
        assert!(!line.contains(token) && !line.contains(&basic), "a command line carries the token: {line}");
    }
    let config = std::fs::read_to_string(
        GitSource::new(cache.path(), Duration::from_secs(1)).repository_dir(&repo.clone_url).join("config"),
    )
    .unwrap();
    assert!(!config.contains(token) && !config.contains(&basic), "the token was written down: {config}");

    assert_eq!(problem.reason(), REPOSITORY_UNREACHABLE);
    assert_eq!(
        problem.to_string(),
        format!(
            "cannot fetch from {}: the remote refused access (check the token, or that the repository exists); \
             retrying",
            repo.clone_url
        )
    );
    assert!(!format!("{problem:?}").contains(token));
}

#[tokio::test]
async fn user_information_in_a_clone_url_stays_out_of_messages() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cache = tempfile::tempdir().unwrap();
    let repo =
        Repo { clone_url: format!("http://bot:hunter2secret@127.0.0.1:{closed}/x.git"), token: None, github: None };
    let problem =
        load_err(&ConfigLoader::new(source(cache.path())), &repo, "0123456789abcdef0123456789abcdef01234567").await;
    let message = problem.to_string();
    assert_eq!(problem.reason(), REPOSITORY_UNREACHABLE);
    assert!(message.starts_with(&format!("cannot fetch from http://127.0.0.1:{closed}/x.git: ")), "{message}");
    assert!(!message.contains("hunter2secret"), "{message}");
}
