//! The GitHub fake's contract: every endpoint Stagely's GitHub client calls, driven with plain
//! HTTP through Prism, which validates each request and answer against GitHub's published OpenAPI
//! description (`@octokit/openapi`). An answer the spec describes must also come back without an
//! `sl-violations` header (Prism's report of even a warning), so the fake's shapes are GitHub's.

#[path = "support/github_fake.rs"]
mod fake;
#[path = "support/prism.rs"]
mod prism;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use fake::{Auth, Fault, GitHubFake, Pull, RateSubject};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prism::Prism;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

const APP_ID: u64 = 4242;
const SPEC: &str = "node_modules/@octokit/openapi/generated/api.github.com.json";

struct Stack {
    fake: GitHubFake,
    prism: Prism,
    /// The fake's own URL, for what Prism cannot forward (a connection cut mid-answer).
    direct: String,
    /// The App's private key (PEM).
    key: String,
}

/// One fake and one Prism for the whole binary (the spec takes seconds to load); tests keep
/// apart by using their own repositories, installations and tokens.
fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let (key, public) = fake::rsa_key_pair();
        let fake = GitHubFake::default();
        fake.set_app(APP_ID, "stagely", &public);
        let direct = prism::serve(fake.router());
        let prism = Prism::start(SPEC, &direct);
        fake.set_base_url(&prism.url);
        Stack { fake, prism, direct, key }
    })
}

fn epoch() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// An App JWT issued `iat` seconds from now, expiring `exp` seconds from now, signed with `key`.
fn jwt_with(key: &str, iat: i64, exp: i64) -> String {
    let claims = json!({ "iss": APP_ID.to_string(), "iat": epoch() + iat, "exp": epoch() + exp });
    let der = pem::parse(key).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_der(der.contents())).unwrap()
}

/// A valid App JWT, backdated a minute against clock drift as GitHub recommends.
fn jwt() -> String {
    jwt_with(&stack().key, -60, 540)
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// A request through Prism with `authorization` (the whole header value).
fn call(method: Method, path: &str, authorization: &str) -> reqwest::RequestBuilder {
    http()
        .request(method, format!("{}{path}", stack().prism.url))
        .header("authorization", authorization)
        .header("accept", "application/vnd.github+json")
        .header("x-github-api-version", "2022-11-28")
}

/// Sends, and checks Prism found nothing wrong: no violation, except the warning that the
/// status is not among those the operation declares (GitHub's specs leave out many 401s and
/// 404s it does send).
async fn send(request: reqwest::RequestBuilder) -> Response {
    let response = request.send().await.unwrap();
    if let Some(report) = response.headers().get("sl-violations") {
        let violations: Vec<Value> = serde_json::from_slice(report.as_bytes()).unwrap();
        for violation in &violations {
            let message = violation["message"].as_str().unwrap_or_default();
            assert!(
                violation["severity"] == "Warning" && message.starts_with("Unable to match the returned status code"),
                "Prism reports a violation for {} {}: {violation}",
                response.status(),
                response.url(),
            );
            assert!(!response.status().is_success(), "a 2xx must be declared");
        }
    }
    response
}

async fn json_of(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status, "{}", response.url());
    response.json().await.unwrap()
}

/// Mints a token for `installation`, with `body` when given.
async fn mint(installation: u64, body: Option<Value>) -> Value {
    let mut request =
        call(Method::POST, &format!("/app/installations/{installation}/access_tokens"), &format!("Bearer {}", jwt()));
    if let Some(body) = body {
        request = request.json(&body);
    }
    json_of(send(request).await, StatusCode::CREATED).await
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
}

/// The `rel` links of a `Link` header.
fn links(response: &Response) -> Vec<(String, String)> {
    let Some(link) = response.headers().get("link") else { return Vec::new() };
    link.to_str()
        .unwrap()
        .split(", ")
        .map(|part| {
            let (url, rel) = part.split_once("; rel=").unwrap();
            (rel.trim_matches('"').to_owned(), url.trim_start_matches('<').trim_end_matches('>').to_owned())
        })
        .collect()
}

fn link(response: &Response, rel: &str) -> Option<String> {
    links(response).into_iter().find(|(r, _)| r == rel).map(|(_, url)| url)
}

const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

#[tokio::test]
async fn an_app_jwt_mints_tokens_that_reach_their_installation_only() {
    let fake = &stack().fake;
    fake.add_repo("acme/auth");
    fake.add_repo("acme/auth-other");
    fake.add_installation(11, &["acme/auth"]);

    let token = mint(11, None).await;
    let value = token["token"].as_str().unwrap().to_owned();
    assert!(value.starts_with("ghs_"), "{token}");
    assert_eq!(token["repository_selection"], "selected");
    assert_eq!(token["permissions"]["contents"], "read");
    let expires: k8s_openapi::jiff::Timestamp = token["expires_at"].as_str().unwrap().parse().unwrap();
    let lifetime = expires.as_second() - epoch();
    assert!((3500..=3600).contains(&lifetime), "a token lives an hour: {lifetime} s");
    assert_eq!(fake.tokens_minted(11), 1);

    for scheme in ["Bearer", "token"] {
        let repo =
            json_of(send(call(Method::GET, "/repos/acme/auth", &format!("{scheme} {value}"))).await, StatusCode::OK)
                .await;
        assert_eq!(repo["full_name"], "acme/auth");
        assert_eq!(repo["default_branch"], "main");
    }
    let other = send(call(Method::GET, "/repos/acme/auth-other", &format!("Bearer {value}"))).await;
    assert_eq!(other.status(), StatusCode::NOT_FOUND, "a repository outside the installation is hidden");
    let foreign = send(call(Method::GET, "/repos/acme/auth", "Bearer ghs_not_a_token")).await;
    let body = json_of(foreign, StatusCode::UNAUTHORIZED).await;
    assert_eq!(body["message"], "Bad credentials");
    assert!(body["documentation_url"].is_string());
    assert_eq!(send(call(Method::GET, "/repos/acme/auth", "")).await.status(), StatusCode::UNAUTHORIZED);

    // Bad JWTs: another key, expired, longer than ten minutes, not RS256, a token instead.
    let (other_key, _) = fake::rsa_key_pair();
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "iss": APP_ID.to_string(), "iat": epoch() - 60, "exp": epoch() + 300 }),
        &EncodingKey::from_secret(b"secret"),
    )
    .unwrap();
    for (what, bearer, message) in [
        ("another key", jwt_with(&other_key, -60, 300), "could not be decoded"),
        ("expired", jwt_with(&stack().key, -700, -100), "'Expiration time'"),
        ("too long", jwt_with(&stack().key, -60, 1200), "too far in the future"),
        ("HS256", hs256, "could not be decoded"),
        ("an installation token", value.clone(), "could not be decoded"),
    ] {
        let response =
            send(call(Method::POST, "/app/installations/11/access_tokens", &format!("Bearer {bearer}"))).await;
        let body = json_of(response, StatusCode::UNAUTHORIZED).await;
        assert!(body["message"].as_str().unwrap().contains(message), "{what}: {body}");
    }
    let unknown = send(call(Method::POST, "/app/installations/999/access_tokens", &format!("Bearer {}", jwt()))).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(fake.tokens_minted(11), 1, "refused JWTs mint nothing");

    // A token limited to one repository and one permission reaches only those.
    fake.add_file("acme/auth", SHA_A, "stagely.yaml", "version: 1\n");
    let limited = mint(11, Some(json!({ "repositories": ["auth"], "permissions": { "contents": "read" } }))).await;
    assert_eq!(limited["repositories"][0]["full_name"], "acme/auth");
    assert_eq!(limited["permissions"], json!({ "contents": "read" }));
    let limited = format!("token {}", limited["token"].as_str().unwrap());
    let file = send(call(Method::GET, &format!("/repos/acme/auth/contents/stagely.yaml?ref={SHA_A}"), &limited)).await;
    assert_eq!(file.status(), StatusCode::OK);
    let pulls = json_of(send(call(Method::GET, "/repos/acme/auth/pulls", &limited)).await, StatusCode::FORBIDDEN).await;
    assert_eq!(pulls["message"], "Resource not accessible by integration");
    let minted = fake.minted_tokens().into_iter().filter(|t| t.installation == 11).collect::<Vec<_>>();
    assert_eq!(minted[1].repositories.as_deref(), Some(&["acme/auth".to_owned()][..]));

    let refused = send(
        call(Method::POST, "/app/installations/11/access_tokens", &format!("Bearer {}", jwt()))
            .json(&json!({ "permissions": { "administration": "write" } })),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY, "permissions the installation lacks");
    let refused = send(
        call(Method::POST, "/app/installations/11/access_tokens", &format!("Bearer {}", jwt()))
            .json(&json!({ "repositories": ["auth-other"] })),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY, "repositories outside the installation");

    // Expired tokens are refused like unknown ones.
    fake.expire_tokens(11);
    let expired = send(call(Method::GET, "/repos/acme/auth", &format!("Bearer {value}"))).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    fake.set_token_lifetime(11, Duration::ZERO);
    let born_expired = mint(11, None).await;
    let response =
        send(call(Method::GET, "/repos/acme/auth", &format!("Bearer {}", born_expired["token"].as_str().unwrap())))
            .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(fake.tokens_minted(11), 3);

    let log = fake.requests();
    let minting = log.iter().filter(|r| r.path == "/app/installations/11/access_tokens").collect::<Vec<_>>();
    assert!(minting.iter().all(|r| r.method == "POST"));
    assert_eq!(minting.iter().filter(|r| r.auth == Auth::AppJwt).count(), minting.len() - 1, "all but one sent a JWT");
    assert!(log.iter().any(|r| r.path == "/repos/acme/auth" && r.auth == Auth::Installation(11)));
}

#[tokio::test]
async fn contents_are_served_per_commit_as_files_and_directories() {
    let fake = &stack().fake;
    fake.add_repo("acme/contents");
    fake.add_personal_token("ghp_contents", "alice");
    let yaml = "version: 1\nbuilds:\n  web:\n    context: .\n".repeat(20);
    fake.add_file("acme/contents", SHA_A, "stagely.yaml", yaml.clone());
    fake.add_file("acme/contents", SHA_A, "deploy/app.yml", "services: {}\n");
    fake.add_file("acme/contents", SHA_B, "stagely.yaml", "version: 2\n");
    fake.set_branch("acme/contents", "main", SHA_B);
    let auth = "Bearer ghp_contents";

    let file = send(call(Method::GET, &format!("/repos/acme/contents/contents/stagely.yaml?ref={SHA_A}"), auth)).await;
    let file = json_of(file, StatusCode::OK).await;
    assert_eq!((file["type"].as_str(), file["encoding"].as_str()), (Some("file"), Some("base64")));
    assert_eq!((file["name"].as_str(), file["path"].as_str()), (Some("stagely.yaml"), Some("stagely.yaml")));
    assert_eq!(file["size"], yaml.len());
    let content = file["content"].as_str().unwrap();
    assert!(content.lines().all(|l| l.len() <= 60), "GitHub wraps base64 at 60 columns");
    let decoded = base64::engine::general_purpose::STANDARD.decode(content.replace('\n', "")).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), yaml);
    assert_eq!(file["sha"].as_str().unwrap().len(), 40);

    for git_ref in [SHA_B, "main"] {
        let other =
            send(call(Method::GET, &format!("/repos/acme/contents/contents/stagely.yaml?ref={git_ref}"), auth)).await;
        let other = json_of(other, StatusCode::OK).await;
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(other["content"].as_str().unwrap().replace('\n', ""));
        assert_eq!(decoded.unwrap(), b"version: 2\n");
    }
    let default_branch = send(call(Method::GET, "/repos/acme/contents/contents/stagely.yaml", auth)).await;
    assert_eq!(default_branch.status(), StatusCode::OK, "no ref is the default branch");

    let listing = send(call(Method::GET, &format!("/repos/acme/contents/contents/deploy?ref={SHA_A}"), auth)).await;
    let listing = json_of(listing, StatusCode::OK).await;
    assert_eq!(listing.as_array().unwrap().len(), 1, "{listing}");
    assert_eq!((listing[0]["type"].as_str(), listing[0]["path"].as_str()), (Some("file"), Some("deploy/app.yml")));

    for missing in [format!("missing.yaml?ref={SHA_A}"), format!("deploy?ref={SHA_B}"), "stagely.yaml?ref=nope".into()]
    {
        let response = send(call(Method::GET, &format!("/repos/acme/contents/contents/{missing}"), auth)).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
    }
    let no_repo = send(call(Method::GET, "/repos/acme/nothing-here/contents/stagely.yaml", auth)).await;
    assert_eq!(no_repo.status(), StatusCode::NOT_FOUND);

    // Deeper paths and the root listing work on the fake itself; Prism matches `contents/{path}`
    // as one segment only and refuses an empty one.
    let direct = |path: &str| http().get(format!("{}/repos/acme/contents/contents/{path}", stack().direct));
    let nested = direct(&format!("deploy/app.yml?ref={SHA_A}")).header("authorization", auth).send().await.unwrap();
    assert_eq!(json_of(nested, StatusCode::OK).await["path"], "deploy/app.yml");
    let root = direct(&format!("?ref={SHA_A}")).header("authorization", auth).send().await.unwrap();
    let root = json_of(root, StatusCode::OK).await;
    let entries: Vec<(&str, &str)> =
        root.as_array().unwrap().iter().map(|e| (e["type"].as_str().unwrap(), e["path"].as_str().unwrap())).collect();
    assert_eq!(entries, [("dir", "deploy"), ("file", "stagely.yaml")]);
    let refused = call(Method::GET, &format!("/repos/acme/contents/contents/?ref={SHA_A}"), auth).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY, "Prism refuses an empty path");
}

#[tokio::test]
async fn pulls_paginate_with_links_and_a_matching_etag_answers_304() {
    let fake = &stack().fake;
    let repo = "acme/pulls";
    fake.add_repo(repo);
    fake.add_personal_token("ghp_pulls", "bob");
    for number in 1..=5 {
        fake.open_pull(repo, Pull::new(number, &format!("feature-{number}"), &format!("{number:0>40}")));
    }
    fake.open_pull(repo, Pull { labels: vec!["preview".into()], draft: true, ..Pull::new(6, "drafty", SHA_A) });
    fake.open_pull(
        repo,
        Pull { head_repo: Some("forker/pulls".into()), user: "forker".into(), ..Pull::new(7, "fork-branch", SHA_B) },
    );
    fake.close_pull(repo, 2);
    let auth = "Bearer ghp_pulls";

    let first = send(call(Method::GET, "/repos/acme/pulls/pulls?state=open&per_page=2", auth)).await;
    let etag = header(&first, "etag").to_owned();
    assert!(etag.starts_with("W/\""), "{etag}");
    let last = link(&first, "last").unwrap();
    assert!(last.starts_with(&stack().prism.url) && last.contains("page=3") && last.contains("per_page=2"), "{last}");
    assert!(link(&first, "prev").is_none());
    let mut next = link(&first, "next");
    let mut numbers: Vec<u64> = json_of(first, StatusCode::OK)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    while let Some(url) = next {
        let page = send(http().get(&url).header("authorization", auth)).await;
        assert!(link(&page, "prev").is_some() && link(&page, "first").is_some());
        next = link(&page, "next");
        numbers.extend(
            json_of(page, StatusCode::OK).await.as_array().unwrap().iter().map(|p| p["number"].as_u64().unwrap()),
        );
    }
    assert_eq!(numbers, [7, 6, 5, 4, 3, 1], "open pull requests, newest first");

    let page =
        json_of(send(call(Method::GET, "/repos/acme/pulls/pulls?per_page=100", auth)).await, StatusCode::OK).await;
    let draft = page.as_array().unwrap().iter().find(|p| p["number"] == 6).unwrap();
    assert_eq!((draft["draft"].as_bool(), draft["labels"][0]["name"].as_str()), (Some(true), Some("preview")));
    assert_eq!(draft["head"]["sha"], SHA_A);
    assert_eq!(draft["head"]["ref"], "drafty");
    assert_eq!(draft["base"]["ref"], "main");
    assert_eq!(draft["base"]["repo"]["full_name"], "acme/pulls");
    assert_eq!(draft["user"]["login"], "octocat");
    assert_eq!(draft["html_url"], "https://github.com/acme/pulls/pull/6");
    let fork = page.as_array().unwrap().iter().find(|p| p["number"] == 7).unwrap();
    assert_eq!(fork["head"]["repo"]["full_name"], "forker/pulls");
    assert_eq!(fork["head"]["label"], "forker:fork-branch");
    let closed =
        json_of(send(call(Method::GET, "/repos/acme/pulls/pulls?state=closed", auth)).await, StatusCode::OK).await;
    assert_eq!(closed.as_array().unwrap().iter().map(|p| p["number"].clone()).collect::<Vec<_>>(), [json!(2)]);
    assert!(closed[0]["closed_at"].is_string());

    // The same page with its ETag: 304, no body, not charged.
    let subject = RateSubject::Token("ghp_pulls".into());
    let before = fake.rate_remaining(&subject);
    let same =
        send(call(Method::GET, "/repos/acme/pulls/pulls?state=open&per_page=2", auth).header("if-none-match", &etag))
            .await;
    assert_eq!(same.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&same, "x-ratelimit-remaining"), before.to_string());
    assert!(same.bytes().await.unwrap().is_empty());
    assert_eq!(fake.rate_remaining(&subject), before, "a 304 costs nothing");

    // A push changes the page: a new head sha and a later updated_at.
    let old = fake.pull(repo, 7).unwrap();
    fake.push_pull(repo, 7, SHA_A);
    let changed =
        send(call(Method::GET, "/repos/acme/pulls/pulls?state=open&per_page=2", auth).header("if-none-match", &etag))
            .await;
    assert_ne!(header(&changed, "etag"), etag);
    let changed = json_of(changed, StatusCode::OK).await;
    assert_eq!(changed[0]["head"]["sha"], SHA_A);
    assert!(fake.pull(repo, 7).unwrap().updated_at > old.updated_at);
    fake.push_pull(repo, 3, SHA_B);
    let by_update =
        send(call(Method::GET, "/repos/acme/pulls/pulls?sort=updated&direction=desc&per_page=1", auth)).await;
    assert_eq!(json_of(by_update, StatusCode::OK).await[0]["number"], 3);

    let one = json_of(send(call(Method::GET, "/repos/acme/pulls/pulls/3", auth)).await, StatusCode::OK).await;
    assert_eq!(
        (one["number"].as_u64(), one["state"].as_str(), one["merged"].as_bool()),
        (Some(3), Some("open"), Some(false))
    );
    assert_eq!(one["head"]["sha"], SHA_B);
    let one = send(call(Method::GET, "/repos/acme/pulls/pulls/3", auth)).await;
    let tag = header(&one, "etag").to_owned();
    let again = send(call(Method::GET, "/repos/acme/pulls/pulls/3", auth).header("if-none-match", &tag)).await;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(send(call(Method::GET, "/repos/acme/pulls/pulls/99", auth)).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn deployments_and_their_statuses_are_recorded_in_order() {
    let fake = &stack().fake;
    let repo = "acme/deploys";
    fake.add_repo(repo);
    fake.add_installation(21, &[repo]);
    fake.open_pull(repo, Pull::new(1, "feature", SHA_A));
    let token = mint(21, None).await;
    let auth = format!("Bearer {}", token["token"].as_str().unwrap());

    let body = json!({
        "ref": "feature", "environment": "pr-1", "transient_environment": true,
        "production_environment": false, "auto_merge": false, "required_contexts": [],
        "description": "Stagely preview", "payload": { "environment": "team-a/pr-1" },
    });
    let created = send(call(Method::POST, "/repos/acme/deploys/deployments", &auth).json(&body)).await;
    let created = json_of(created, StatusCode::CREATED).await;
    assert_eq!((created["sha"].as_str(), created["environment"].as_str()), (Some(SHA_A), Some("pr-1")));
    assert_eq!(created["creator"]["login"], "stagely[bot]");
    assert_eq!(created["transient_environment"], true);
    let id = created["id"].as_u64().unwrap();

    let statuses = format!("/repos/acme/deploys/deployments/{id}/statuses");
    let progress = send(call(Method::POST, &statuses, &auth).json(
        &json!({ "state": "in_progress", "log_url": "https://stagely.example/logs/1", "description": "Building" }),
    ))
    .await;
    assert_eq!(json_of(progress, StatusCode::CREATED).await["state"], "in_progress");
    let success = send(call(Method::POST, &statuses, &auth).json(&json!({
        "state": "success", "environment_url": "https://abc123.preview.example", "description": "Ready",
        "environment": "pr-1", "auto_inactive": false,
    })))
    .await;
    let success = json_of(success, StatusCode::CREATED).await;
    assert_eq!(success["environment_url"], "https://abc123.preview.example");

    let listed = json_of(send(call(Method::GET, &statuses, &auth)).await, StatusCode::OK).await;
    let states: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["success", "in_progress"], "newest first, as GitHub lists them");
    let listed = send(call(Method::GET, "/repos/acme/deploys/deployments?environment=pr-1", &auth)).await;
    assert_eq!(json_of(listed, StatusCode::OK).await.as_array().unwrap().len(), 1);
    let one = send(call(Method::GET, &format!("/repos/acme/deploys/deployments/{id}"), &auth)).await;
    assert_eq!(json_of(one, StatusCode::OK).await["payload"]["environment"], "team-a/pr-1");

    let recorded = &fake.deployments(repo)[0];
    assert_eq!(
        (recorded.git_ref.as_str(), recorded.auto_merge, recorded.required_contexts.as_deref()),
        ("feature", Some(false), Some(&[][..]))
    );
    assert_eq!((recorded.transient_environment, recorded.production_environment), (Some(true), Some(false)));
    let states: Vec<&str> = recorded.statuses.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states, ["in_progress", "success"]);
    assert_eq!(recorded.statuses[1].environment_url.as_deref(), Some("https://abc123.preview.example"));
    assert_eq!(recorded.statuses[1].auto_inactive, Some(false));
    assert_eq!(recorded.statuses[0].log_url.as_deref(), Some("https://stagely.example/logs/1"));

    // GitHub's auto_inactive: a newer success retires an older non-transient deployment's success.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let staging = json!({ "ref": SHA_B, "environment": "staging", "auto_merge": false, "required_contexts": [] });
        let created = send(call(Method::POST, "/repos/acme/deploys/deployments", &auth).json(&staging)).await;
        let id = json_of(created, StatusCode::CREATED).await["id"].as_u64().unwrap();
        let success = send(
            call(Method::POST, &format!("/repos/acme/deploys/deployments/{id}/statuses"), &auth)
                .json(&json!({ "state": "success" })),
        )
        .await;
        assert_eq!(success.status(), StatusCode::CREATED);
        ids.push(id);
    }
    let deployments = fake.deployments(repo);
    let older = deployments.iter().find(|d| d.id == ids[0]).unwrap();
    assert_eq!(older.statuses.iter().map(|s| s.state.as_str()).collect::<Vec<_>>(), ["success", "inactive"]);
    assert_eq!(deployments[0].statuses.len(), 2, "the transient pr-1 deployment is left alone");

    let unknown_ref =
        send(call(Method::POST, "/repos/acme/deploys/deployments", &auth).json(&json!({ "ref": "no-such-branch" })))
            .await;
    assert_eq!(unknown_ref.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let unknown = send(call(Method::GET, "/repos/acme/deploys/deployments/1/statuses", &auth)).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let invalid = call(Method::POST, "/repos/acme/deploys/deployments", &auth).json(&json!({ "environment": "x" }));
    assert_eq!(
        invalid.send().await.unwrap().status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "Prism refuses a body without ref"
    );
}

#[tokio::test]
async fn comments_are_created_listed_edited_and_deleted() {
    let fake = &stack().fake;
    let repo = "acme/comments";
    fake.add_repo(repo);
    fake.add_installation(31, &[repo]);
    fake.open_pull(repo, Pull::new(4, "feature", SHA_A));
    let token = mint(31, None).await;
    let auth = format!("token {}", token["token"].as_str().unwrap());

    let mut ids = Vec::new();
    for n in 1..=3 {
        let created = send(
            call(Method::POST, "/repos/acme/comments/issues/4/comments", &auth)
                .json(&json!({ "body": format!("comment {n}") })),
        )
        .await;
        let created = json_of(created, StatusCode::CREATED).await;
        assert_eq!(created["user"]["login"], "stagely[bot]");
        assert_eq!(created["user"]["type"], "Bot");
        ids.push(created["id"].as_u64().unwrap());
    }
    let first = send(call(Method::GET, "/repos/acme/comments/issues/4/comments?per_page=2", &auth)).await;
    let next = link(&first, "next").expect("a second page");
    let bodies: Vec<String> = json_of(first, StatusCode::OK)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bodies, ["comment 1", "comment 2"], "oldest first");
    let second = send(http().get(&next).header("authorization", &auth)).await;
    assert!(link(&second, "next").is_none());
    assert_eq!(json_of(second, StatusCode::OK).await[0]["body"], "comment 3");

    let comment = format!("/repos/acme/comments/issues/comments/{}", ids[1]);
    let edited = send(call(Method::PATCH, &comment, &auth).json(&json!({ "body": "edited" }))).await;
    let edited = json_of(edited, StatusCode::OK).await;
    assert_eq!(edited["body"], "edited");
    assert!(edited["updated_at"].as_str().unwrap() > edited["created_at"].as_str().unwrap());
    let stored = fake.comments(repo, 4);
    assert_eq!(stored.iter().map(|c| c.body.as_str()).collect::<Vec<_>>(), ["comment 1", "edited", "comment 3"]);
    assert!(stored[1].updated_at > stored[1].created_at);

    assert_eq!(send(call(Method::DELETE, &comment, &auth)).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        send(call(Method::PATCH, &comment, &auth).json(&json!({ "body": "again" }))).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(send(call(Method::DELETE, &comment, &auth)).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(send(call(Method::GET, &comment, &auth)).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(fake.comments(repo, 4).iter().map(|c| c.id).collect::<Vec<_>>(), [ids[0], ids[2]]);

    let no_issue =
        send(call(Method::POST, "/repos/acme/comments/issues/5/comments", &auth).json(&json!({ "body": "x" }))).await;
    assert_eq!(no_issue.status(), StatusCode::NOT_FOUND);
    let no_body = call(Method::POST, "/repos/acme/comments/issues/4/comments", &auth).json(&json!({}));
    assert_eq!(
        no_body.send().await.unwrap().status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "Prism refuses a comment without body"
    );
}

#[tokio::test]
async fn rate_limits_are_reported_and_an_exhausted_budget_answers_403() {
    let fake = &stack().fake;
    fake.add_repo("acme/rates");
    fake.add_personal_token("ghp_rates", "carol");
    let subject = RateSubject::Token("ghp_rates".into());
    fake.set_rate_limit(subject.clone(), 10, 2);

    let response = send(call(Method::GET, "/repos/acme/rates", "Bearer ghp_rates")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-ratelimit-limit"), "10");
    assert_eq!(header(&response, "x-ratelimit-remaining"), "1");
    assert_eq!(header(&response, "x-ratelimit-used"), "9");
    assert_eq!(header(&response, "x-ratelimit-resource"), "core");
    let reset: i64 = header(&response, "x-ratelimit-reset").parse().unwrap();
    assert!(reset > epoch(), "the budget resets in the future");

    let response = send(call(Method::GET, "/repos/acme/rates", "Bearer ghp_rates")).await;
    assert_eq!(header(&response, "x-ratelimit-remaining"), "0");
    assert_eq!(response.status(), StatusCode::OK, "the last request of the budget is served");
    let response = send(call(Method::GET, "/repos/acme/rates", "Bearer ghp_rates")).await;
    assert_eq!(header(&response, "x-ratelimit-remaining"), "0");
    assert_eq!(header(&response, "x-ratelimit-reset"), reset.to_string());
    let body = json_of(response, StatusCode::FORBIDDEN).await;
    assert!(body["message"].as_str().unwrap().starts_with("API rate limit exceeded"), "{body}");

    // An installation's tokens share its budget.
    fake.add_installation(41, &["acme/rates"]);
    fake.set_rate_limit(RateSubject::Installation(41), 100, 100);
    for expected in ["99", "98"] {
        let token = mint(41, None).await;
        let response =
            send(call(Method::GET, "/repos/acme/rates", &format!("Bearer {}", token["token"].as_str().unwrap()))).await;
        assert_eq!(header(&response, "x-ratelimit-remaining"), expected);
    }
    assert_eq!(fake.rate_remaining(&RateSubject::Installation(41)), 98);
}

#[tokio::test]
async fn injected_faults_reach_the_client_as_github_sends_them() {
    let fake = &stack().fake;
    let repo = "acme/faults";
    fake.add_repo(repo);
    fake.add_personal_token("ghp_faults", "dave");
    fake.add_installation(51, &[repo]);
    for number in 1..=3 {
        fake.open_pull(repo, Pull::new(number, &format!("f{number}"), SHA_A));
    }
    let auth = "Bearer ghp_faults";
    let pulls = "/repos/acme/faults/pulls";

    // Prism passes answers whose status the operation does not declare through as they are.
    fake.fail_next("GET", pulls, 2, Fault::ServerError);
    for _ in 0..2 {
        let response = call(Method::GET, pulls, auth).send().await.unwrap();
        assert_eq!(json_of(response, StatusCode::INTERNAL_SERVER_ERROR).await["message"], "Server Error");
    }
    assert_eq!(send(call(Method::GET, pulls, auth)).await.status(), StatusCode::OK, "two faults, then answers");

    fake.fail_next("GET", pulls, 1, Fault::BadGateway);
    let response = call(Method::GET, pulls, auth).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(header(&response, "content-type").starts_with("text/html"));
    assert!(response.text().await.unwrap().contains("502 Bad Gateway"));

    fake.fail_next("GET", pulls, 1, Fault::TooManyRequests { retry_after: 7 });
    let response = call(Method::GET, pulls, auth).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "retry-after"), "7");

    fake.fail_next("GET", pulls, 1, Fault::SecondaryRateLimit { retry_after: 30 });
    let response = call(Method::GET, pulls, auth).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&response, "retry-after"), "30");
    assert_ne!(header(&response, "x-ratelimit-remaining"), "0", "a secondary limit is not the primary one");
    assert!(response.text().await.unwrap().contains("secondary rate limit"));

    // On an operation that declares the status, the fault's body is valid for it.
    fake.fail_next("GET", "/repos/acme/faults/pulls/1", 1, Fault::ServerError);
    let response = send(call(Method::GET, "/repos/acme/faults/pulls/1", auth)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    fake.fail_next("GET", "/repos/acme/faults", 1, Fault::SecondaryRateLimit { retry_after: 1 });
    assert_eq!(send(call(Method::GET, "/repos/acme/faults", auth)).await.status(), StatusCode::FORBIDDEN);
    fake.fail_next("POST", "/app/installations/51/", 1, Fault::ServerError);
    let response =
        call(Method::POST, "/app/installations/51/access_tokens", &format!("Bearer {}", jwt())).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(fake.tokens_minted(51), 0, "a failed mint minted nothing");
    mint(51, None).await;

    // A page that comes back empty while its Link still promises more.
    fake.fail_next("GET", pulls, 1, Fault::EmptyPage);
    let response = send(call(Method::GET, &format!("{pulls}?per_page=1"), auth)).await;
    assert!(link(&response, "next").is_some());
    assert_eq!(json_of(response, StatusCode::OK).await, json!([]));

    // A connection cut mid-answer cannot pass Prism faithfully (it answers a 500 of its own), so
    // tests of it go to the fake itself.
    fake.fail_next("GET", pulls, 1, Fault::TruncatedBody);
    let rewritten = call(Method::GET, pulls, auth).send().await.unwrap();
    assert_eq!(rewritten.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(header(&rewritten, "content-type"), "application/problem+json");
    for _ in 0..3 {
        fake.fail_next("GET", pulls, 1, Fault::TruncatedBody);
        let response = http().get(format!("{}{pulls}", stack().direct)).header("authorization", auth).send().await;
        let response = response.expect("the head arrives whole");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.bytes().await.is_err(), "the body breaks off");
    }
    let whole = http().get(format!("{}{pulls}", stack().direct)).header("authorization", auth).send().await.unwrap();
    assert_eq!(json_of(whole, StatusCode::OK).await.as_array().unwrap().len(), 3);

    assert_eq!(fake.count("GET", pulls), 13, "every request is logged, faults included");
}
