//! The images `make images` builds (`scripts/images.sh`: the Dockerfile's runtime stages, FROM
//! scratch, from static binaries built here), built into a podman storage of the test's own and
//! run as the chart runs them: as 65532, with a read-only root filesystem, every capability
//! dropped and no privilege escalation.
//!
//! - each image's configuration names user 65532 and its binary as the entrypoint; it holds its
//!   binary, the CA bundle (and, for the operator, the agent binary) and nothing else, so there
//!   is no shell to run;
//! - the edge proxy answers on a published port with its 404 page for an unknown preview,
//!   reaching Redis by a name from `/etc/hosts`, and by a name only DNS knows, looked up through
//!   a search domain as a Service's name is in a cluster;
//! - the webhook receiver and the operator, given a kubeconfig, are ready against testenv's
//!   apiserver; the operator serves the agent binary it carries, with that binary's SHA-256.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_support::{Podman, free_port, http_get, wait_for};
use sha2::{Digest, Sha256};
use stagely_testenv::Options;
use stagely_testenv::server::Server;

/// Anything but the build: containers start in seconds, but share two cores with other tests.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// The user every image runs as (the chart's `runAsUser`).
const USER: &str = "65532";
const DOMAIN: &str = "preview.example.com";
/// Where the operator image carries the agents: the operator's default `--agent-bin-dir`.
const AGENT: &str = "/usr/local/lib/stagely/agents/stagely-agent-linux-amd64";
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// The three images, built once for the test binary.
struct Images {
    podman: Podman,
    dir: tempfile::TempDir,
    operator: String,
    webhook_receiver: String,
    edge_proxy: String,
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("stagely-images-").tempdir().unwrap();
        let podman = Podman::new(dir.path());
        stagely_testenv::at_exit::remove_at_exit(dir.path());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        // What `make images` runs, into this test's podman storage.
        let output = Command::new(root.join("scripts/images.sh"))
            .current_dir(root)
            .env("CARGO", env!("CARGO"))
            .env("IMAGE_REPO", "localhost/stagely-images-test")
            .envs(podman.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("scripts/images.sh runs");
        assert!(output.status.success(), "scripts/images.sh failed:\n{}", String::from_utf8_lossy(&output.stderr));
        let names: Vec<String> = String::from_utf8(output.stdout).unwrap().lines().map(str::to_owned).collect();
        let version = env!("CARGO_PKG_VERSION");
        let name = |component: &str| {
            let name = format!("localhost/stagely-images-test/{component}:{version}");
            assert!(names.contains(&name), "scripts/images.sh names {name} among what it built: {names:?}");
            name
        };
        Images {
            operator: name("operator"),
            webhook_receiver: name("webhook-receiver"),
            edge_proxy: name("edge-proxy"),
            podman,
            dir,
        }
    })
}

/// A container started detached, removed when dropped.
struct Container<'a> {
    images: &'a Images,
    name: String,
}

impl Images {
    fn podman(&self, args: &[&str]) -> Output {
        self.podman.command().args(args).output().unwrap()
    }

    /// `podman run -d` of `image` as the chart runs it, with `options` before the image and
    /// `args` after it.
    fn run(&self, what: &str, image: &str, options: &[&str], args: &[&str]) -> Container<'_> {
        let name = format!("stagely-images-{what}-{}-{}", std::process::id(), free_port());
        let confined = ["--read-only", "--cap-drop=ALL", "--security-opt", "no-new-privileges", "--user", USER];
        let mut command = vec!["run", "-d", "--name", &name];
        command.extend(confined);
        command.extend(options);
        command.push(image);
        command.extend(args);
        let output = self.podman(&command);
        assert!(output.status.success(), "podman {command:?}: {}", String::from_utf8_lossy(&output.stderr));
        Container { images: self, name }
    }

    /// The image's files (regular files, with their paths), and the file at `extract` copied
    /// out into the test's directory.
    fn files(&self, image: &str, extract: Option<&str>) -> (Vec<String>, Option<PathBuf>) {
        let name = format!("stagely-images-files-{}-{}", std::process::id(), free_port());
        let created = self.podman(&["create", "--name", &name, image]);
        assert!(created.status.success(), "podman create {image}: {}", String::from_utf8_lossy(&created.stderr));
        let tar = self.dir.path().join(format!("{name}.tar"));
        let exported = self.podman(&["export", "-o", &tar.to_string_lossy(), &name]);
        let copied = extract.map(|path| {
            let to = self.dir.path().join(format!("{name}.extracted"));
            let copied = self.podman(&["cp", &format!("{name}:{path}"), &to.to_string_lossy()]);
            assert!(copied.status.success(), "podman cp {path}: {}", String::from_utf8_lossy(&copied.stderr));
            to
        });
        self.podman(&["rm", &name]);
        assert!(exported.status.success(), "podman export: {}", String::from_utf8_lossy(&exported.stderr));
        let listing = Command::new("tar").arg("-tvf").arg(&tar).output().expect("tar is installed");
        assert!(listing.status.success(), "tar -tvf: {}", String::from_utf8_lossy(&listing.stderr));
        let files = String::from_utf8(listing.stdout)
            .unwrap()
            .lines()
            .filter(|line| line.starts_with('-'))
            .filter_map(|line| line.split_whitespace().last().map(str::to_owned))
            .collect();
        (files, copied)
    }
}

impl Container<'_> {
    /// Polls `check` until it answers, panicking with the container's log after the deadline or
    /// once the container has stopped.
    fn wait_for<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let mut stopped = None;
        let found = wait_for(what, STEP_TIMEOUT, || {
            if let Some(value) = check() {
                return Some(Some(value));
            }
            let state = self.images.podman(&["inspect", "--format", "{{.State.Status}}", &self.name]);
            let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
            if state != "running" {
                stopped = Some(state);
                return Some(None);
            }
            None
        });
        found.unwrap_or_else(|| panic!("{} is {:?} before {what}:\n{}", self.name, stopped, self.logs()))
    }

    fn logs(&self) -> String {
        let logs = self.images.podman(&["logs", &self.name]);
        format!("{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr))
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        self.images.podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

#[test]
fn each_image_runs_as_65532_and_holds_its_binary_and_no_shell() {
    let images = images();
    let cases = [
        (&images.operator, "stagely-operator", vec![AGENT.trim_start_matches('/')]),
        (&images.webhook_receiver, "stagely-webhook-receiver", vec![]),
        (&images.edge_proxy, "stagely-edge-proxy", vec![]),
    ];
    for (image, binary, extra) in cases {
        let config = images.podman(&["image", "inspect", "--format", "{{.Config.User}} {{.Config.Entrypoint}}", image]);
        assert_eq!(
            String::from_utf8_lossy(&config.stdout).trim(),
            format!("65532:65532 [/usr/local/bin/{binary}]"),
            "{image}: user and entrypoint"
        );

        let (mut files, _) = images.files(image, None);
        files.sort();
        let mut expected: Vec<String> = [CA_BUNDLE.to_owned(), format!("usr/local/bin/{binary}")]
            .into_iter()
            .chain(extra.into_iter().map(str::to_owned))
            .collect();
        expected.sort();
        assert_eq!(files, expected, "{image}: its files");

        let shell = images.podman(&[
            "run",
            "--rm",
            "--read-only",
            "--user",
            USER,
            "--entrypoint",
            "/bin/sh",
            image,
            "-c",
            "true",
        ]);
        let stderr = String::from_utf8_lossy(&shell.stderr);
        assert_eq!(shell.status.code(), Some(127), "{image}: /bin/sh must not run: {stderr}");
        assert!(stderr.contains("/bin/sh") && stderr.contains("no such file"), "{image}: {stderr}");

        // The binary runs read-only and confined: it prints its version.
        let version = images.podman(&[
            "run",
            "--rm",
            "--read-only",
            "--cap-drop=ALL",
            "--security-opt",
            "no-new-privileges",
            "--user",
            USER,
            image,
            "--version",
        ]);
        let stdout = String::from_utf8_lossy(&version.stdout);
        assert!(version.status.success(), "{image} --version: {}", String::from_utf8_lossy(&version.stderr));
        assert_eq!(stdout.trim(), format!("{binary} {}", env!("CARGO_PKG_VERSION")), "{image} --version");
    }
}

/// `GET /` for a preview address no environment has: status and body.
fn unknown_preview(port: u16) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET / HTTP/1.0\r\nHost: nosuchpreview1.{DOMAIN}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n")?.1.to_owned()))
}

#[test]
fn the_edge_proxy_answers_on_a_published_port_reaching_redis_by_name() {
    let images = images();
    let redis = Server::redis().expect("redis-server is installed (make deps)");

    // A name podman writes into /etc/hosts; the host's loopback (where Redis listens) is 10.0.2.2
    // from slirp4netns' network, and the proxy's port is published on the host's.
    let port = free_port();
    let proxy = images.run(
        "edge-proxy-hosts",
        &images.edge_proxy,
        &[
            "--network",
            "slirp4netns:allow_host_loopback=true",
            "--add-host",
            "stagely-redis:10.0.2.2",
            "--publish",
            &format!("127.0.0.1:{port}:8080"),
        ],
        &[
            "--domain",
            DOMAIN,
            "--redis-url",
            &format!("redis://stagely-redis:{}", redis.port()),
            "--http-addr",
            "0.0.0.0:8080",
        ],
    );
    // Before Redis answers, the proxy says "Temporarily unavailable" (503); its 404 means it
    // looked the address up there.
    let (status, body) =
        proxy.wait_for("the edge proxy's 404 page", || unknown_preview(port).filter(|(status, _)| *status == 404));
    assert_eq!(status, 404);
    assert!(body.contains("No preview here"), "{body}");
    drop(proxy);

    // A name only DNS knows, as a Service's: the cluster's search domain and ndots:5, answered by
    // a DNS server of the test's own; the proxy shares the host's network to reach it.
    let server = Ipv4Addr::new(127, 53, (std::process::id() >> 8) as u8, std::process::id() as u8);
    let search = "stagely-system.svc.cluster.local";
    let asked = serve_dns(server, &format!("stagely-redis.{search}"));
    let (port, ops_port) = (free_port(), free_port());
    let proxy = images.run(
        "edge-proxy-dns",
        &images.edge_proxy,
        &["--network", "host", "--dns", &server.to_string(), "--dns-search", search, "--dns-option", "ndots:5"],
        &[
            "--domain",
            DOMAIN,
            "--redis-url",
            &format!("redis://stagely-redis:{}", redis.port()),
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--ops-addr",
            &format!("127.0.0.1:{ops_port}"),
        ],
    );
    let (_, body) = proxy.wait_for("the edge proxy's 404 page, Redis found through DNS", || {
        unknown_preview(port).filter(|(status, _)| *status == 404)
    });
    assert!(body.contains("No preview here"), "{body}");
    assert!(asked.load(Ordering::SeqCst) > 0, "the proxy found Redis through the test's DNS server");
    let (status, _) = http_get(ops_port, "/readyz").expect("the ops port answers");
    assert_eq!(status, 200);
}

/// Answers DNS queries on `addr` port 53 (UDP) from a thread that lives as long as the test
/// process: `name` is 127.0.0.1 (A; no AAAA), every other name does not exist. Counts the
/// queries for `name`.
fn serve_dns(addr: Ipv4Addr, name: &str) -> Arc<AtomicUsize> {
    let socket =
        UdpSocket::bind((addr, 53)).unwrap_or_else(|err| panic!("binding {addr}:53 (the tests run as root): {err}"));
    let name = name.to_ascii_lowercase();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    std::thread::spawn(move || {
        let mut buffer = [0u8; 512];
        while let Ok((len, peer)) = socket.recv_from(&mut buffer) {
            if let Some((answer, known)) = dns_answer(&buffer[..len], &name) {
                counter.fetch_add(usize::from(known), Ordering::SeqCst);
                let _ = socket.send_to(&answer, peer);
            }
        }
    });
    asked
}

/// The answer to the one-question `query` (see [`serve_dns`]), and whether it asked for `name`.
fn dns_answer(query: &[u8], name: &str) -> Option<(Vec<u8>, bool)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question = query.get(12..at + 4)?;
    let known = labels.join(".") == name;
    let answers = u16::from(known && qtype == 1);
    // QR, AA, the query's RD, RA; NXDOMAIN for an unknown name.
    let flags: u16 = 0x8480 | (u16::from(query[2] & 1) << 8) | if known { 0 } else { 3 };
    let mut answer = Vec::with_capacity(question.len() + 28);
    answer.extend_from_slice(&query[..2]);
    answer.extend_from_slice(&flags.to_be_bytes());
    answer.extend_from_slice(&[0, 1, 0, answers as u8, 0, 0, 0, 0]);
    answer.extend_from_slice(question);
    if answers == 1 {
        // The question's name (a pointer to offset 12), A, IN, TTL 5 s, 127.0.0.1.
        answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1]);
    }
    Some((answer, known))
}

/// The control plane's kubeconfig as a container reads it: the CA inline (the original names a
/// file in the plane's directory) and readable by 65532, in a directory of its own.
fn kubeconfig_for_containers(images: &Images) -> PathBuf {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt as _;
    let plane = stagely_testenv::shared(|| Options { crds: stagely_api::crds(), ..Options::default() });
    let mut config: serde_yaml::Value = serde_yaml::from_slice(&std::fs::read(plane.kubeconfig()).unwrap()).unwrap();
    let cluster = &mut config["clusters"][0]["cluster"];
    let ca =
        std::fs::read(cluster["certificate-authority"].as_str().expect("the kubeconfig names its CA file")).unwrap();
    let cluster = cluster.as_mapping_mut().unwrap();
    cluster.remove("certificate-authority");
    cluster.insert("certificate-authority-data".into(), base64::engine::general_purpose::STANDARD.encode(ca).into());
    let path = images.dir.path().join(format!("kubeconfig-{}", free_port()));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

#[test]
fn the_webhook_receiver_is_ready_against_the_apiserver() {
    let images = images();
    let kubeconfig = kubeconfig_for_containers(images);
    let (port, ops_port) = (free_port(), free_port());
    let receiver = images.run(
        "webhook-receiver",
        &images.webhook_receiver,
        &[
            "--network",
            "host",
            "--volume",
            &format!("{}:/etc/stagely/kubeconfig:ro", kubeconfig.display()),
            "--env",
            "KUBECONFIG=/etc/stagely/kubeconfig",
        ],
        &["--listen-addr", &format!("127.0.0.1:{port}"), "--ops-addr", &format!("127.0.0.1:{ops_port}")],
    );
    // Ready once its caches of Projects and Secrets are listed from the apiserver.
    receiver.wait_for("the webhook receiver's /readyz", || http_get(ops_port, "/readyz").filter(|(s, _)| *s == 200));
    assert_eq!(http_get(ops_port, "/healthz").map(|(status, _)| status), Some(200));
    // It takes webhooks: an unsigned ping is refused, saying why.
    let (status, body) = unsigned_ping(port).expect("the receiver answers");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("X-Hub-Signature-256 header is missing"), "{body}");
}

/// `POST /v1/webhooks/github` of a ping with no signature: status and body.
fn unsigned_ping(port: u16) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let body = r#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    write!(
        stream,
        "POST /v1/webhooks/github HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: ping\r\nX-GitHub-Delivery: images-test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n")?.1.to_owned()))
}

#[test]
fn the_operator_leads_and_serves_the_agent_binary_it_carries() {
    let images = images();
    let kubeconfig = kubeconfig_for_containers(images);
    let (ops_port, gateway_port) = (free_port(), free_port());
    let operator = images.run(
        "operator",
        &images.operator,
        &[
            "--network",
            "host",
            "--volume",
            &format!("{}:/etc/stagely/kubeconfig:ro", kubeconfig.display()),
            "--env",
            "KUBECONFIG=/etc/stagely/kubeconfig",
            "--env",
            "STAGELY_GATEWAY_SIGNING_KEY=a test gateway signing key of at least 32 bytes",
        ],
        &[
            "--ops-addr",
            &format!("127.0.0.1:{ops_port}"),
            "--gateway-addr",
            &format!("127.0.0.1:{gateway_port}"),
            "--lease-name",
            &format!("stagely-images-{}", std::process::id()),
            "--github-api-url",
            "off",
        ],
    );
    // Ready once it holds the Lease and serves the gateway.
    operator.wait_for("the operator's /readyz", || http_get(ops_port, "/readyz").filter(|(s, _)| *s == 200));

    let (_, agent) = images.files(&images.operator, Some(AGENT));
    let agent = std::fs::read(agent.unwrap()).unwrap();
    let sha256: String = Sha256::digest(&agent).iter().map(|b| format!("{b:02x}")).collect();
    let (status, body) = http_get(gateway_port, "/v1/agent/download/linux-amd64.sha256").expect("the gateway answers");
    assert_eq!((status, body.as_str()), (200, format!("{sha256}  stagely-agent\n").as_str()));
    // Built here, the image carries the amd64 agent alone (no aarch64 standard library here);
    // a release's carries both (README, "Images").
    let (status, body) = http_get(gateway_port, "/v1/agent/download/linux-arm64.sha256").unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("carries: linux/amd64"), "{body}");
}
