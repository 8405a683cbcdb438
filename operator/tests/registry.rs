//! Registry access for real: the distribution registry with token auth on, trusting a key the
//! operator signs with, and the operator's token endpoint served on loopback. podman logs in
//! with the credentials the operator hands out and pushes and pulls within them (and is refused
//! outside them); the operator merges an amd64 and an arm64 image into one OCI index and deletes
//! it through the registry's HTTP API.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use agent_support::Podman;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use stagely_api::protocol::RegistryAuth;
use stagely_api::v1alpha1::Platform;
use stagely_operator::registry::{Registry, SigningKey, TOKEN_PATH, TokenIssuer};
use stagely_testenv::registry::{Registry as TestRegistry, TokenAuth, TokenKey};
use tokio::net::TcpListener;

const SERVICE: &str = "stagely-registry";
const ISSUER: &str = "stagely";
const REPO: &str = "team-a/shop/web";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The registry with token auth, the operator's view of it, and its token endpoint.
struct Setup {
    registry: TestRegistry,
    ours: Registry,
    token_url: String,
    http: reqwest::Client,
    _server: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn start() -> Self {
        let key = TokenKey::generate().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token_url = format!("http://{}{TOKEN_PATH}", listener.local_addr().unwrap());
        let auth = TokenAuth {
            realm: token_url.clone(),
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_cert_pem: key.cert_pem.clone(),
        };
        let registry = tokio::task::spawn_blocking(move || TestRegistry::start_with_token_auth(&auth))
            .await
            .unwrap()
            .expect("the registry starts with token auth (testenv/build.sh builds it)");
        let signing = SigningKey::from_pem(key.key_pem.as_bytes(), key.cert_pem.as_bytes()).unwrap();
        let ours = Registry::new(registry.addr(), registry.url(), Some(TokenIssuer::new(signing, ISSUER, SERVICE)));
        let router = ours.router();
        let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { registry, ours, token_url, http: reqwest::Client::new(), _server: server }
    }

    /// `GET` the token endpoint with `password` (if any) as Basic auth and `query`.
    async fn token_request(&self, password: Option<&str>, query: &str) -> (u16, serde_json::Value) {
        let mut request = self.http.get(format!("{}?{query}", self.token_url));
        if let Some(password) = password {
            request =
                request.header("authorization", format!("Basic {}", STANDARD.encode(format!("stagely:{password}"))));
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
    }

    /// A registry token for `scope`, exchanged for `auth` at the token endpoint.
    async fn bearer(&self, auth: &RegistryAuth, scope: &str) -> String {
        let (status, body) =
            self.token_request(Some(auth.password.expose()), &format!("service={SERVICE}&scope={scope}")).await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// `GET /v2/<repository>/manifests/<reference>` accepting an OCI index: status, content type
    /// and body.
    async fn get_manifest(&self, token: &str, repository: &str, reference: &str) -> (u16, String, Vec<u8>) {
        let response = self
            .http
            .get(format!("{}/v2/{repository}/manifests/{reference}", self.registry.url()))
            .header("accept", OCI_INDEX)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        (status, content_type.unwrap_or_default(), response.bytes().await.unwrap().to_vec())
    }
}

/// podman with its own storage and, per credential, its own auth file.
struct Engine {
    podman: Podman,
    dir: std::path::PathBuf,
}

impl Engine {
    fn new(dir: &Path) -> Self {
        Self { podman: Podman::new(dir), dir: dir.to_owned() }
    }

    fn podman(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut command = self.podman.command();
        command.args(args).stdin(std::process::Stdio::piped());
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    fn authfile(&self, name: &str) -> String {
        self.dir.join(format!("auth-{name}.json")).to_string_lossy().into_owned()
    }

    /// `podman login` with `auth` into the auth file `name`.
    fn login(&self, name: &str, auth: &RegistryAuth) -> Output {
        let authfile = self.authfile(name);
        self.podman(
            &[
                "login",
                "--tls-verify=false",
                "--authfile",
                &authfile,
                "--username",
                &auth.username,
                "--password-stdin",
                &auth.server,
            ],
            Some(auth.password.expose()),
        )
    }

    /// `podman push` of `image` with the auth file `name`; the digest when it succeeded.
    fn push(&self, name: &str, image: &str) -> Result<String, String> {
        let digestfile = self.dir.join("digest");
        let _ = std::fs::remove_file(&digestfile);
        let output = self.podman(
            &[
                "push",
                "--tls-verify=false",
                "--authfile",
                &self.authfile(name),
                "--digestfile",
                digestfile.to_str().unwrap(),
                image,
            ],
            None,
        );
        if output.status.success() {
            Ok(std::fs::read_to_string(&digestfile).unwrap().trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Builds a `FROM scratch` image for `platform` tagged `image` (no RUN, so no emulation).
    fn build(&self, platform: Platform, image: &str) {
        let context = self.dir.join(format!("context-{}", platform.arch()));
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(context.join("hello.txt"), format!("hello from {platform}\n")).unwrap();
        std::fs::write(context.join("Dockerfile"), "FROM scratch\nCOPY hello.txt /hello.txt\nCMD [\"/hello.txt\"]\n")
            .unwrap();
        self.podman.run(&["build", "-q", "--platform", platform.as_str(), "-t", image, context.to_str().unwrap()]);
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The claims of a JWT, unverified.
fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pushes_and_pulls_within_its_credential_only() {
    let setup = Setup::start().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(dir.path());
    let host = setup.ours.host().to_owned();
    let image = setup.ours.reference(REPO, "pr-1");
    engine.build(Platform::LinuxAmd64, &image);

    let push = setup.ours.push_credential(REPO, Duration::from_secs(600)).unwrap().expect("token auth is on");
    assert_eq!(push.server, host);
    let login = engine.login("push", &push);
    assert!(login.status.success(), "podman login with a push credential: {}", stderr(&login));
    let digest = engine.push("push", &image).expect("the push credential pushes its own repository");
    assert!(digest.starts_with("sha256:"), "{digest}");

    // The same image into another repository of the same team: refused by the registry, because
    // the token endpoint grants nothing there.
    let other = setup.ours.reference("team-a/other/web", "pr-1");
    engine.podman.run(&["tag", &image, &other]);
    let refused = engine.push("push", &other).expect_err("a push credential pushes nowhere else");
    assert!(
        ["denied", "unauthorized", "insufficient"].iter().any(|word| refused.to_lowercase().contains(word)),
        "{refused}"
    );

    // A pull credential pulls (the local copy removed first) but cannot push.
    let pull = setup.ours.pull_credential(&[REPO.to_owned()], Duration::from_secs(600)).unwrap().unwrap();
    let login = engine.login("pull", &pull);
    assert!(login.status.success(), "podman login with a pull credential: {}", stderr(&login));
    engine.podman.run(&["rmi", "-f", &image, &other]);
    let pinned = format!("{host}/{REPO}@{digest}");
    let pulled =
        engine.podman(&["pull", "-q", "--tls-verify=false", "--authfile", &engine.authfile("pull"), &pinned], None);
    assert!(pulled.status.success(), "podman pull with a pull credential: {}", stderr(&pulled));
    let retag = setup.ours.reference(REPO, "pr-2");
    engine.podman.run(&["tag", &pinned, &retag]);
    let refused = engine.push("pull", &retag).expect_err("a pull credential cannot push");
    assert!(
        ["denied", "unauthorized", "insufficient"].iter().any(|word| refused.to_lowercase().contains(word)),
        "{refused}"
    );

    // A credential podman did not get from this operator: login fails.
    let forged = RegistryAuth { password: "forged".into(), ..push.clone() };
    let login = engine.login("forged", &forged);
    assert!(!login.status.success(), "podman login with a forged credential succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_refuses_expired_forged_and_malformed_credentials() {
    let setup = Setup::start().await;
    let scope = format!("service={SERVICE}&scope=repository:{REPO}:pull,push");

    let push = setup.ours.push_credential(REPO, Duration::from_secs(600)).unwrap().unwrap();
    let (status, body) =
        setup.token_request(Some(push.password.expose()), &format!("{scope},delete&account=stagely")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token"], body["access_token"]);
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!((590..=600).contains(&expires_in), "{body}");
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'), "{body}");
    let token = claims(body["token"].as_str().unwrap());
    // Asked for delete too: granted only what the credential holds.
    assert_eq!(token["access"], serde_json::json!([{"type": "repository", "name": REPO, "actions": ["pull", "push"]}]));
    assert_eq!((token["iss"].as_str(), token["aud"].as_str()), (Some(ISSUER), Some(SERVICE)));

    // Login (no scope) gets a token allowing nothing; another repository gets nothing either.
    let (status, body) = setup.token_request(Some(push.password.expose()), &format!("service={SERVICE}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(claims(body["token"].as_str().unwrap())["access"], serde_json::json!([]));
    let (status, body) = setup
        .token_request(Some(push.password.expose()), &format!("service={SERVICE}&scope=repository:team-b/x/y:pull"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(claims(body["token"].as_str().unwrap())["access"], serde_json::json!([]));

    // No credential, a malformed one, one signed by another key.
    let (status, body) = setup.token_request(None, &scope).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.to_string().contains("credential is required"), "{body}");
    let (status, body) = setup.token_request(Some("not-a-credential"), &scope).await;
    assert_eq!((status, body["errors"][0]["message"].as_str()), (401, Some("the registry credential is not valid")));
    let stranger = TokenKey::generate().unwrap();
    let stranger = Registry::new(
        setup.ours.host(),
        setup.ours.api_url(),
        Some(TokenIssuer::new(
            SigningKey::from_pem(stranger.key_pem.as_bytes(), stranger.cert_pem.as_bytes()).unwrap(),
            ISSUER,
            SERVICE,
        )),
    );
    let forged = stranger.push_credential(REPO, Duration::from_secs(600)).unwrap().unwrap();
    let (status, body) = setup.token_request(Some(forged.password.expose()), &scope).await;
    assert_eq!((status, body["errors"][0]["message"].as_str()), (401, Some("the registry credential is not valid")));

    // The wrong service, a malformed scope.
    let (status, body) =
        setup.token_request(Some(push.password.expose()), &format!("service=other&scope=repository:{REPO}:pull")).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        setup.token_request(Some(push.password.expose()), &format!("service={SERVICE}&scope=repository")).await;
    assert_eq!(status, 400, "{body}");

    // A credential is no registry token: the registry refuses it as a bearer.
    let response = setup
        .http
        .get(format!("{}/v2/{REPO}/tags/list", setup.registry.url()))
        .bearer_auth(push.password.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // A credential living one second: refused once it has expired.
    let short = setup.ours.push_credential(REPO, Duration::from_secs(1)).unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = setup.token_request(Some(short.password.expose()), &scope).await;
        if status == 401 {
            assert_eq!(body["errors"][0]["message"], "the registry credential has expired", "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "a one-second credential was still accepted after 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amd64_and_arm64_images_merge_into_one_index_that_delete_removes() {
    let setup = Setup::start().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(dir.path());
    let push = setup.ours.push_credential(REPO, Duration::from_secs(600)).unwrap().unwrap();
    let login = engine.login("push", &push);
    assert!(login.status.success(), "podman login: {}", stderr(&login));

    let mut pushed = Vec::new();
    for platform in Platform::ALL {
        let image = setup.ours.reference(REPO, &format!("abc1234-{}", platform.arch()));
        engine.build(platform, &image);
        let digest = engine.push("push", &image).unwrap_or_else(|err| panic!("push of {image}: {err}"));
        pushed.push((platform, digest));
    }

    let digest = setup.ours.merge_index(REPO, "abc1234", &pushed).await.expect("the index merges");

    let pull = setup.ours.pull_credential(&[REPO.to_owned()], Duration::from_secs(600)).unwrap().unwrap();
    let token = setup.bearer(&pull, &format!("repository:{REPO}:pull")).await;
    let (status, content_type, body) = setup.get_manifest(&token, REPO, "abc1234").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(content_type, OCI_INDEX);
    assert_eq!(
        stagely_operator::registry::index::sha256_digest(&body),
        digest,
        "the digest is the sha256 of the bytes served"
    );
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((index["schemaVersion"].as_u64(), index["mediaType"].as_str()), (Some(2), Some(OCI_INDEX)));
    let listed: Vec<(String, String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(m["size"].as_u64().unwrap() > 0, "{m}");
            assert!(m["mediaType"].as_str().unwrap().contains("manifest"), "{m}");
            (
                m["platform"]["os"].as_str().unwrap().to_owned(),
                m["platform"]["architecture"].as_str().unwrap().to_owned(),
                m["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> =
        pushed.iter().map(|(p, d)| ("linux".to_owned(), p.arch().to_owned(), d.clone())).collect();
    assert_eq!(listed, expected);
    // Each listed size is that of the manifest the registry serves.
    for m in index["manifests"].as_array().unwrap() {
        let (status, _, manifest) = setup.get_manifest_any(&token, m["digest"].as_str().unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(manifest.len() as u64, m["size"].as_u64().unwrap());
    }

    // Merging again is idempotent: the same bytes, the same digest.
    assert_eq!(setup.ours.merge_index(REPO, "abc1234", &pushed).await.unwrap(), digest);

    setup.ours.delete(REPO, "abc1234").await.expect("the tag is deleted");
    let (status, _, body) = setup.get_manifest(&token, REPO, "abc1234").await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    setup.ours.delete(REPO, "abc1234").await.expect("deleting what is gone succeeds");
    setup.ours.delete(REPO, &digest).await.expect("deleting a digest that is gone succeeds");
    // The per-platform images are still there.
    let (status, _, _) = setup.get_manifest_any(&token, &pushed[0].1).await;
    assert_eq!(status, 200);
}

impl Setup {
    /// `GET` of a manifest by digest, accepting OCI and Docker image manifests.
    async fn get_manifest_any(&self, token: &str, digest: &str) -> (u16, String, Vec<u8>) {
        let response = self
            .http
            .get(format!("{}/v2/{REPO}/manifests/{digest}", self.registry.url()))
            .header(
                "accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, String::new(), response.bytes().await.unwrap().to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_token_auth_the_operator_calls_the_registry_anonymously() {
    let registry = tokio::task::spawn_blocking(TestRegistry::start).await.unwrap().expect("the registry starts");
    let ours = Registry::anonymous(registry.addr());
    assert_eq!(ours.api_url(), registry.url());
    assert!(ours.push_credential(REPO, Duration::from_secs(60)).unwrap().is_none());
    ours.delete(REPO, "never-pushed").await.expect("deleting a tag that never existed succeeds");
    let missing = format!("sha256:{}", "0".repeat(64));
    let err = ours.merge_index(REPO, "abc1234", &[(Platform::LinuxAmd64, missing.clone())]).await.unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with(&format!("failed to read manifest {REPO}@{missing}")), "{text}");
    assert!(text.contains("404"), "{text}");
}
