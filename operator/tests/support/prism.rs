//! Prism in proxy mode in front of an in-process fake: every request a provider sends and every
//! answer the fake gives is checked against the cloud's published OpenAPI description, and
//! `--errors` turns a violation into an error response (422 for a request, 500 for an answer), so
//! a test that breaks the contract fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Prism proxy. It is stopped when the test process exits: it runs under a shell that
/// kills it once the pipe to its standard input closes, which happens however the process ends.
pub struct Prism {
    /// Where the provider under test sends its requests.
    pub url: String,
    _shell: Child,
}

fn prism_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/prism/node_modules/.bin/prism")
}

/// A spec: `node_modules/…` is one pinned in `tools/prism` beside Prism (GitHub's, from
/// `@octokit/openapi`); anything else is a file in `/work/shared/specs` (or `$STAGELY_SPECS`),
/// beside the repository.
fn spec_path(file: &str) -> PathBuf {
    if file.starts_with("node_modules/") {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/prism").join(file);
        assert!(
            path.exists(),
            "the OpenAPI spec {} is missing: run `make deps` (scripts/install-deps.sh runs `npm ci --prefix tools/prism`)",
            path.display()
        );
        return path;
    }
    let dir = std::env::var_os("STAGELY_SPECS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/specs"));
    let path = dir.join(file);
    assert!(path.exists(), "the OpenAPI spec {} is missing (set STAGELY_SPECS to the specs folder)", path.display());
    path
}

impl Prism {
    /// Starts `prism proxy --errors` for `spec` (see `spec_path`) in front of `upstream` and waits
    /// until it answers.
    pub fn start(spec: &str, upstream: &str) -> Self {
        let prism = prism_binary();
        assert!(
            prism.exists(),
            "Prism is not installed at {}: run `make deps` (scripts/install-deps.sh runs `npm ci --prefix tools/prism`)",
            prism.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = r#""$@" & pid=$!; read _; kill "$pid""#;
        let shell = Command::new("sh")
            .args(["-c", script, "prism-guard"])
            .arg(&prism)
            .args(["proxy", "--errors", "-h", "127.0.0.1", "-p", &port.to_string()])
            .arg(spec_path(spec))
            .arg(upstream)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sh runs");
        let prism = Self { url: format!("http://127.0.0.1:{port}"), _shell: shell };
        // Loading a large spec takes seconds (more on a busy machine); any HTTP answer means ready.
        let deadline = Instant::now() + Duration::from_secs(180);
        while !answers_http(port) {
            assert!(Instant::now() < deadline, "Prism did not start serving {spec} within 180 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        prism
    }
}

fn answers_http(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(b"GET /__prism_ready HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

/// Serves `router` on loopback from a thread of its own, so it outlives any one test's runtime;
/// returns its address.
pub fn serve(router: axum::Router) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, router).await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}
