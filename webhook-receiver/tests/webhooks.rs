//! The webhook receiver against the real control plane: signed deliveries of payloads checked
//! against GitHub's published schemas, over real HTTP, and the Environments they leave.
//!
//! Each test has its own namespace, repository and receiver; the receivers share the control
//! plane and see each other's Projects, as receivers of one cluster would.

mod support;

use serde_json::json;
use stagely_api::keys;
use stagely_webhook_receiver::github::sign;
use stagely_webhook_receiver::server::WEBHOOK_PATH;
use support::payloads::{self, Pr, sha};
use support::{Receiver, Team, delivery, http, plane};

/// A team with Project `shop` bound to `repository` (trigger `trigger`), and a receiver.
async fn setup(namespace: &str, repository: &str, secret: &str, trigger: serde_json::Value) -> (Team, Receiver) {
    let team = Team::new(plane(), namespace).await;
    team.project("shop", repository, secret, trigger).await;
    let receiver = Receiver::start(team.client.clone(), &[]).await;
    (team, receiver)
}

#[tokio::test]
async fn a_pull_request_is_previewed_at_its_head_and_removed_when_it_closes() {
    let (team, receiver) = setup("webhook-flow", "acme/flow", "flow-secret", json!({})).await;
    let pr = Pr::new("acme/flow", 7);
    let sent = k8s_openapi::jiff::Timestamp::now();
    let opened =
        receiver.deliver("pull_request", &delivery(), "flow-secret", &payloads::pull_request("opened", &pr)).await;
    let answered = k8s_openapi::jiff::Timestamp::now();
    assert_eq!(opened.status, 202, "{}", opened.body);
    let answer = opened.json();
    assert_eq!(answer["outcome"], "accepted");
    assert_eq!(answer["environments"][0]["name"], "shop-pr-7");
    assert_eq!(answer["environments"][0]["intent"], "preview");

    let env = team.wait_for_head("shop-pr-7", &sha(1)).await;
    let spec = &env.spec;
    assert_eq!(spec.project_ref.name, "shop");
    assert_eq!(
        (spec.pull_request.number, spec.pull_request.head_ref.as_str(), spec.pull_request.base_ref.as_str()),
        (7, "feature-7", "main")
    );
    assert_eq!(spec.pull_request.author.as_deref(), Some("octocat"));
    assert_eq!(spec.pull_request.url.as_deref(), Some("https://github.com/acme/flow/pull/7"));
    let labels = env.metadata.labels.clone().unwrap();
    assert_eq!((labels[keys::PROJECT].as_str(), labels[keys::PULL_REQUEST].as_str()), ("shop", "7"));
    let annotations = env.metadata.annotations.clone().unwrap();
    assert_eq!(annotations[keys::GITHUB_UPDATED_AT], pr.updated_at());
    // When the delivery was received (to the millisecond), whatever the payload's times say.
    let received = stagely_api::pull_request::received_at(&env).expect("the receipt time is recorded");
    let millisecond = k8s_openapi::jiff::SignedDuration::from_millis(1);
    assert!(
        sent - millisecond <= received && received <= answered + millisecond,
        "{received} not in {sent}..{answered}"
    );

    let newer = pr.at(2, 10);
    receiver.deliver("pull_request", &delivery(), "flow-secret", &payloads::pull_request("synchronize", &newer)).await;
    team.wait_for_head("shop-pr-7", &sha(2)).await;

    // A base change moves the Environment's base; a title-only edit is ignored.
    let rebased = Pr { base_ref: "release".into(), ..newer.at(2, 20) };
    let edited =
        receiver.deliver("pull_request", &delivery(), "flow-secret", &payloads::pull_request("edited", &rebased)).await;
    assert_eq!(edited.status, 202);
    support::wait_for("the base change", || async {
        team.environment("shop-pr-7").await.filter(|env| env.spec.pull_request.base_ref == "release")
    })
    .await;
    let mut title_only = payloads::pull_request("edited", &rebased.at(2, 25));
    title_only["changes"] = json!({"title": {"from": "Checkout"}});
    let answer = receiver.deliver("pull_request", &delivery(), "flow-secret", &title_only).await;
    assert_eq!((answer.status, answer.json()["outcome"].as_str()), (202, Some("ignored")));

    // Labels change nothing when every pull request is previewed.
    let labelled = Pr { labels: vec!["bug".into()], ..rebased.at(3, 30) };
    receiver.deliver("pull_request", &delivery(), "flow-secret", &payloads::pull_request("labeled", &labelled)).await;
    team.wait_for_head("shop-pr-7", &sha(3)).await;
    let unlabelled = Pr { labels: vec![], ..labelled.at(4, 40) };
    receiver.deliver("pull_request", &delivery(), "flow-secret", &payloads::unlabeled(&unlabelled, "bug")).await;
    team.wait_for_head("shop-pr-7", &sha(4)).await;

    let closed = receiver
        .deliver("pull_request", &delivery(), "flow-secret", &payloads::pull_request("closed", &unlabelled.at(4, 50)))
        .await;
    assert_eq!(closed.json()["environments"][0]["intent"], "remove");
    team.wait_gone("shop-pr-7").await;
    let project = team.projects().get("shop").await.unwrap();
    assert_eq!(
        project.metadata.annotations.unwrap()[&keys::pull_request_removed(7)],
        unlabelled.at(4, 50).updated_at(),
        "the removal is recorded on the Project"
    );

    let reopened = unlabelled.at(5, 60);
    receiver.deliver("pull_request", &delivery(), "flow-secret", &payloads::pull_request("reopened", &reopened)).await;
    team.wait_for_head("shop-pr-7", &sha(5)).await;
    let writes = receiver.wait_for_writes(7).await;
    assert_eq!(
        writes,
        [("applied", 4), ("created", 2), ("deleted", 1)].map(|(k, v)| (k.to_owned(), v)).into(),
        "every delivery but the title edit made one write"
    );
}

#[tokio::test]
async fn the_label_trigger_creates_on_the_label_and_deletes_without_it() {
    let trigger = json!({"mode": "label", "label": "preview"});
    let (team, receiver) = setup("webhook-label", "acme/label", "label-secret", trigger).await;
    let pr = Pr::new("acme/label", 3);
    let send = |action: &'static str, pr: Pr| {
        let receiver = &receiver;
        async move {
            receiver.deliver("pull_request", &delivery(), "label-secret", &payloads::pull_request(action, &pr)).await
        }
    };
    let opened = send("opened", pr.clone()).await;
    assert_eq!(opened.json()["environments"][0]["intent"], "remove");
    // Another label does not trigger.
    send("labeled", Pr { labels: vec!["bug".into()], ..pr.at(1, 5) }).await;
    assert_eq!(receiver.wait_for_writes(2).await.get("nothing_to_remove"), Some(&2));
    assert!(team.environment("shop-pr-3").await.is_none());

    let labelled = Pr { labels: vec!["bug".into(), "preview".into()], ..pr.at(1, 10) };
    send("labeled", labelled.clone()).await;
    team.wait_for_head("shop-pr-3", &sha(1)).await;
    send("synchronize", labelled.at(2, 20)).await;
    team.wait_for_head("shop-pr-3", &sha(2)).await;

    let unlabelled = Pr { labels: vec!["bug".into()], ..labelled.at(2, 30) };
    receiver.deliver("pull_request", &delivery(), "label-secret", &payloads::unlabeled(&unlabelled, "preview")).await;
    team.wait_gone("shop-pr-3").await;
    // A late synchronize from before the label came off does not bring the preview back.
    send("synchronize", labelled.at(3, 25)).await;
    let writes = receiver.wait_for_writes(6).await;
    assert_eq!(writes.get("removed_later"), Some(&1), "{writes:?}");
    assert!(team.environment("shop-pr-3").await.is_none());
}

#[tokio::test]
async fn drafts_are_previewed_unless_the_project_says_not_to() {
    let team = Team::new(plane(), "webhook-drafts").await;
    team.project("eager", "acme/drafts", "drafts-secret", json!({})).await;
    team.project("patient", "acme/drafts", "drafts-secret", json!({"drafts": false})).await;
    let receiver = Receiver::start(team.client.clone(), &[]).await;
    let draft = Pr { draft: true, ..Pr::new("acme/drafts", 5) };
    let opened =
        receiver.deliver("pull_request", &delivery(), "drafts-secret", &payloads::pull_request("opened", &draft)).await;
    let mut intents: Vec<(String, String)> = opened.json()["environments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["intent"].as_str().unwrap().to_owned()))
        .collect();
    intents.sort();
    assert_eq!(intents, [("eager-pr-5".to_owned(), "preview".to_owned()), ("patient-pr-5".into(), "remove".into())]);
    team.wait_for_head("eager-pr-5", &sha(1)).await;
    assert!(team.environment("patient-pr-5").await.is_none());

    let ready = Pr { draft: false, ..draft.at(1, 10) };
    receiver
        .deliver("pull_request", &delivery(), "drafts-secret", &payloads::pull_request("ready_for_review", &ready))
        .await;
    team.wait_for_head("patient-pr-5", &sha(1)).await;

    let again = Pr { draft: true, ..ready.at(1, 20) };
    receiver
        .deliver("pull_request", &delivery(), "drafts-secret", &payloads::pull_request("converted_to_draft", &again))
        .await;
    team.wait_gone("patient-pr-5").await;
    // Each pull request's Environments are written on their own pace: the eager one's write of
    // this delivery may come after the patient one's deletion.
    support::wait_for("the eager Project's preview to take the draft delivery", || async {
        let eager = team.environment("eager-pr-5").await?;
        let stamped = eager.metadata.annotations?.get(keys::GITHUB_UPDATED_AT).cloned();
        (stamped.as_deref() == Some(again.updated_at().as_str())).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_fork_is_not_previewed_unless_the_project_allows_it() {
    let team = Team::new(plane(), "webhook-forks").await;
    team.project("careful", "acme/forks", "forks-secret", json!({})).await;
    let receiver = Receiver::start(team.client.clone(), &[]).await;
    let fork = Pr { fork: true, ..Pr::new("acme/forks", 9) };
    let answer =
        receiver.deliver("pull_request", &delivery(), "forks-secret", &payloads::pull_request("opened", &fork)).await;
    assert_eq!(answer.status, 202);
    let planned = &answer.json()["environments"][0];
    assert_eq!(planned["intent"], "remove");
    assert!(planned["message"].as_str().unwrap().contains("forks are not previewed"), "{planned}");
    receiver
        .deliver("pull_request", &delivery(), "forks-secret", &payloads::pull_request("synchronize", &fork.at(2, 5)))
        .await;
    assert_eq!(receiver.wait_for_writes(2).await.get("nothing_to_remove"), Some(&2));
    assert!(team.environment("careful-pr-9").await.is_none(), "a fork's code never runs with the Project's secrets");

    team.project("trusting", "acme/forks", "forks-secret", json!({"forks": true})).await;
    support::wait_for("the receiver to see the new Project", || async {
        let answer = receiver
            .deliver(
                "pull_request",
                &delivery(),
                "forks-secret",
                &payloads::pull_request("synchronize", &fork.at(3, 10)),
            )
            .await;
        (answer.json()["environments"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;
    team.wait_for_head("trusting-pr-9", &sha(3)).await;
    assert!(team.environment("careful-pr-9").await.is_none());
}

#[tokio::test]
async fn a_delivery_repeated_three_times_is_done_once_even_across_a_restart() {
    let (team, receiver) = setup("webhook-repeat", "acme/repeat", "repeat-secret", json!({})).await;
    let id = delivery();
    let payload = payloads::pull_request("opened", &Pr::new("acme/repeat", 1));
    let answers = [
        receiver.deliver("pull_request", &id, "repeat-secret", &payload).await,
        receiver.deliver("pull_request", &id, "repeat-secret", &payload).await,
        receiver.deliver("pull_request", &id, "repeat-secret", &payload).await,
    ];
    let outcomes: Vec<(u16, String)> =
        answers.iter().map(|a| (a.status, a.json()["outcome"].as_str().unwrap().to_owned())).collect();
    assert_eq!(outcomes, [(202, "accepted".into()), (200, "duplicate".into()), (200, "duplicate".into())]);
    let env = team.wait_for_head("shop-pr-1", &sha(1)).await;
    assert_eq!(env.metadata.annotations.unwrap()[keys::GITHUB_DELIVERY], id);
    assert_eq!(receiver.wait_for_writes(1).await, [("created".to_owned(), 1)].into());
    receiver.stop().await;

    // A new receiver remembers no delivery; the Environment does.
    let restarted = Receiver::start(team.client.clone(), &[]).await;
    let again = restarted.deliver("pull_request", &id, "repeat-secret", &payload).await;
    assert_eq!(again.status, 202);
    assert_eq!(restarted.wait_for_writes(1).await, [("duplicate".to_owned(), 1)].into());
    let env = team.environment("shop-pr-1").await.unwrap();
    assert_eq!(env.metadata.generation, Some(1), "the Environment was not written again");
}

#[tokio::test]
async fn an_older_synchronize_after_a_newer_one_never_rolls_the_head_back() {
    let (team, receiver) = setup("webhook-order", "acme/order", "order-secret", json!({})).await;
    let pr = Pr::new("acme/order", 4);
    let send = |action: &'static str, pr: Pr| {
        let receiver = &receiver;
        async move {
            receiver.deliver("pull_request", &delivery(), "order-secret", &payloads::pull_request(action, &pr)).await
        }
    };
    send("opened", pr.clone()).await;
    team.wait_for_head("shop-pr-4", &sha(1)).await;
    send("synchronize", pr.at(3, 30)).await;
    team.wait_for_head("shop-pr-4", &sha(3)).await;
    send("synchronize", pr.at(2, 20)).await;
    let writes = receiver.wait_for_writes(3).await;
    assert_eq!(writes.get("stale"), Some(&1), "{writes:?}");
    let env = team.environment("shop-pr-4").await.unwrap();
    assert_eq!(env.spec.pull_request.head_sha, sha(3));

    // Both at once, the older last: the queue keeps the newer, or the write finds it stale.
    let a = send("synchronize", pr.at(5, 50));
    let b = send("synchronize", pr.at(4, 40));
    let (a, b) = tokio::join!(a, b);
    assert_eq!((a.status, b.status), (202, 202));
    support::wait_for("the newest head", || async {
        let writes = receiver.writes().await;
        let env = team.environment("shop-pr-4").await?;
        (writes.values().sum::<u64>() >= 4 && env.spec.pull_request.head_sha == sha(5)).then_some(())
    })
    .await;
    let env = team.environment("shop-pr-4").await.unwrap();
    assert_eq!(env.spec.pull_request.head_sha, sha(5));

    // A burst of twenty commits: the newest lands, in fewer writes than deliveries.
    let before = receiver.writes().await.values().sum::<u64>();
    for n in 0..20 {
        assert_eq!(send("synchronize", pr.at(100 + n, 100 + i64::from(n))).await.status, 202);
    }
    team.wait_for_head("shop-pr-4", &sha(119)).await;
    let writes = receiver.writes().await.values().sum::<u64>() - before;
    assert!(writes < 20, "{writes} writes for 20 deliveries about one pull request");
}

#[tokio::test]
async fn closed_before_opened_and_a_late_synchronize_after_closed_leave_no_environment() {
    let (team, receiver) = setup("webhook-late", "acme/late", "late-secret", json!({})).await;
    let pr = Pr::new("acme/late", 11);
    // Closed (second 10) arrives before opened (second 0).
    deliver(&receiver, "closed", &pr.at(1, 10)).await;
    deliver(&receiver, "opened", &pr.at(1, 0)).await;
    let writes = receiver.wait_for_writes(2).await;
    assert_eq!(writes, [("removal_recorded", 1), ("removed_later", 1)].map(|(k, v)| (k.to_owned(), v)).into());
    assert!(team.environment("shop-pr-11").await.is_none());

    // Opened, closed, then a synchronize from before the close.
    let pr = Pr::new("acme/late", 12);
    deliver(&receiver, "opened", &pr).await;
    team.wait_for_head("shop-pr-12", &sha(1)).await;
    deliver(&receiver, "closed", &pr.at(1, 20)).await;
    team.wait_gone("shop-pr-12").await;
    deliver(&receiver, "synchronize", &pr.at(2, 10)).await;
    receiver.wait_for_writes(5).await;
    assert!(team.environment("shop-pr-12").await.is_none());

    // The record is on the Project: another receiver (a restart, a second replica) keeps to it.
    let other = Receiver::start(team.client.clone(), &[]).await;
    deliver(&other, "synchronize", &pr.at(3, 15)).await;
    assert_eq!(other.wait_for_writes(1).await, [("removed_later".to_owned(), 1)].into());
    assert!(team.environment("shop-pr-12").await.is_none());
}

async fn deliver(receiver: &Receiver, action: &str, pr: &Pr) -> http::Response {
    let secret = match pr.repository.as_str() {
        "acme/late" => "late-secret",
        other => panic!("no secret for {other}"),
    };
    receiver.deliver("pull_request", &delivery(), secret, &payloads::pull_request(action, pr)).await
}

#[tokio::test]
async fn signatures_are_verified_with_the_projects_secret() {
    let (team, receiver) = setup("webhook-signatures", "acme/signed", "signed-secret", json!({})).await;
    // Another team's Project, bound to another repository, with its own secret.
    let other = Team::new(plane(), "webhook-signatures-other").await;
    other.project("other", "acme/other", "other-secret", json!({})).await;
    let payload = payloads::pull_request("opened", &Pr::new("acme/signed", 2));
    payloads::assert_valid("pull_request", &payload);
    let body = payload.to_string();
    let post = |signature: Option<String>| {
        let (receiver, body) = (&receiver, body.clone());
        async move {
            let id = delivery();
            let mut headers = vec![("X-GitHub-Event", "pull_request".to_owned()), ("X-GitHub-Delivery", id)];
            if let Some(signature) = signature {
                headers.push(("X-Hub-Signature-256", signature));
            }
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            receiver.post(&headers, body.as_bytes()).await
        }
    };
    let refused = [
        ("missing", post(None).await),
        ("malformed", post(Some("sha256=not-hex".into())).await),
        ("mismatch", post(Some(sign(b"wrong-secret", body.as_bytes()))).await),
        ("mismatch", post(Some(sign(b"other-secret", body.as_bytes()))).await),
        ("mismatch", post(Some(sign(b"signed-secret", b"another body"))).await),
    ];
    for (reason, answer) in &refused {
        assert_eq!(answer.status, 401, "{reason}: {}", answer.body);
        assert_eq!(answer.json()["outcome"], "unauthorized");
    }
    // Signed for the other Project's repository with our secret: that Project's secret differs.
    let theirs = payloads::pull_request("opened", &Pr::new("acme/other", 2));
    assert_eq!(receiver.deliver("pull_request", &delivery(), "signed-secret", &theirs).await.status, 401);
    // A repository no Project is bound to.
    let unbound = payloads::pull_request("opened", &Pr::new("acme/nobody", 2));
    assert_eq!(receiver.deliver("pull_request", &delivery(), "signed-secret", &unbound).await.status, 401);

    let failures = receiver.metric("stagely_webhook_signature_failures_total").await;
    let count = |reason: &str| failures.get(&format!("{{reason=\"{reason}\"}}")).copied().unwrap_or_default();
    assert_eq!((count("missing"), count("malformed"), count("mismatch"), count("no_project")), (1.0, 1.0, 4.0, 1.0));

    let good = post(Some(sign(b"signed-secret", body.as_bytes()))).await;
    assert_eq!(good.status, 202, "{}", good.body);
    team.wait_for_head("shop-pr-2", &sha(1)).await;
    assert_eq!(receiver.wait_for_writes(1).await, [("created".to_owned(), 1)].into(), "only the good one was written");
    assert!(other.environment("other-pr-2").await.is_none());
}

#[tokio::test]
async fn bad_bodies_get_4xx_never_5xx() {
    let (team, receiver) = setup("webhook-bodies", "acme/bodies", "bodies-secret", json!({})).await;
    let signed = |body: &[u8]| sign(b"bodies-secret", body);
    let send = |body: Vec<u8>, event: &'static str| {
        let receiver = &receiver;
        async move {
            let signature = signed(&body);
            receiver
                .post(
                    &[
                        ("X-GitHub-Event", event),
                        ("X-GitHub-Delivery", &delivery()),
                        ("X-Hub-Signature-256", &signature),
                    ],
                    &body,
                )
                .await
        }
    };
    let valid = payloads::pull_request("opened", &Pr::new("acme/bodies", 6));
    payloads::assert_valid("pull_request", &valid);
    let text = valid.to_string();

    let not_json = send(b"payload=%7B%7D".to_vec(), "pull_request").await;
    assert_eq!(not_json.status, 400);
    assert!(not_json.json()["message"].as_str().unwrap().starts_with("the body is not a webhook payload"));
    let truncated = send(text.as_bytes()[..text.len() / 2].to_vec(), "pull_request").await;
    assert_eq!(truncated.status, 400, "{}", truncated.body);
    let mut wrong_type = valid.clone();
    wrong_type["pull_request"]["number"] = json!("6");
    let answer = send(wrong_type.to_string().into_bytes(), "pull_request").await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.json()["message"].as_str().unwrap().contains("pull_request.number: invalid type"),
        "{}",
        answer.body
    );
    let mut missing = valid.clone();
    missing["pull_request"].as_object_mut().unwrap().remove("updated_at");
    let answer = send(missing.to_string().into_bytes(), "pull_request").await;
    assert_eq!(answer.status, 400);
    assert!(answer.json()["message"].as_str().unwrap().contains("missing field `updated_at`"), "{}", answer.body);
    let mut no_repository = valid.clone();
    no_repository.as_object_mut().unwrap().remove("repository");
    let answer = send(no_repository.to_string().into_bytes(), "pull_request").await;
    assert_eq!(answer.status, 400);
    assert!(answer.json()["message"].as_str().unwrap().contains("missing field `repository`"), "{}", answer.body);
    let answer = send(br#"{"zen": "no repository"}"#.to_vec(), "ping").await;
    assert_eq!(
        (answer.status, answer.json()["message"].as_str().unwrap()),
        (400, "repository.full_name is missing: the payload names no repository")
    );
    let mut short_sha = valid.clone();
    short_sha["pull_request"]["head"]["sha"] = json!("abc1234");
    let answer = send(short_sha.to_string().into_bytes(), "pull_request").await;
    assert_eq!(answer.status, 400);
    assert!(answer.json()["message"].as_str().unwrap().contains("pull_request.head.sha"), "{}", answer.body);
    let no_event = receiver
        .post(&[("X-GitHub-Delivery", "d"), ("X-Hub-Signature-256", &signed(text.as_bytes()))], text.as_bytes())
        .await;
    assert_eq!(no_event.status, 400);
    let no_delivery = receiver
        .post(&[("X-GitHub-Event", "pull_request"), ("X-Hub-Signature-256", &signed(text.as_bytes()))], text.as_bytes())
        .await;
    assert_eq!(no_delivery.status, 400);

    // Over the default limit (5 MiB), as announced by Content-Length.
    let limit = 5 * 1024 * 1024;
    let mut big = valid.clone();
    big["pull_request"]["body"] = json!("x".repeat(limit));
    let big = big.to_string().into_bytes();
    let answer = send(big.clone(), "pull_request").await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    // Chunked, with no length announced, and never finished: refused while reading.
    let mut request = http::post_head(
        WEBHOOK_PATH,
        &[("X-GitHub-Event", "pull_request"), ("X-GitHub-Delivery", "chunked"), ("X-Hub-Signature-256", &signed(&big))],
        None,
    );
    for chunk in big[..limit + 1].chunks(64 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    let answer = http::exchange(receiver.addr, &request, false).await.expect("an answer before the body ends");
    assert_eq!(answer.status, 413, "{}", answer.body);
    // A body shorter than its Content-Length, then the sender stops: no answer, or a 4xx.
    let mut request = http::post_head(
        WEBHOOK_PATH,
        &[
            ("X-GitHub-Event", "pull_request"),
            ("X-GitHub-Delivery", "short"),
            ("X-Hub-Signature-256", &signed(text.as_bytes())),
        ],
        Some(text.len()),
    );
    request.extend_from_slice(&text.as_bytes()[..100]);
    if let Some(answer) = http::exchange(receiver.addr, &request, true).await {
        assert!((400..500).contains(&answer.status), "{answer:?}");
    }

    let deliveries = receiver.metric("stagely_webhook_deliveries_total").await;
    assert!(deliveries.keys().all(|labels| !labels.contains("outcome=\"accepted\"")), "{deliveries:?}");
    assert!(deliveries.contains_key("{event=\"unverified\",action=\"\",outcome=\"too_large\"}"), "{deliveries:?}");
    // Still serving, and nothing was written.
    let good = send(text.clone().into_bytes(), "pull_request").await;
    assert_eq!(good.status, 202);
    team.wait_for_head("shop-pr-6", &sha(1)).await;
    assert_eq!(receiver.wait_for_writes(1).await, [("created".to_owned(), 1)].into());
}

#[tokio::test]
async fn ping_is_answered_and_other_events_are_ignored() {
    let (team, receiver) = setup("webhook-ping", "acme/ping", "ping-secret", json!({})).await;
    let pong = receiver.deliver("ping", &delivery(), "ping-secret", &payloads::ping("acme/ping")).await;
    assert_eq!(pong.status, 200, "{}", pong.body);
    assert_eq!(pong.json()["message"], "pong: the webhook reaches Project webhook-ping/shop");
    // An organization's webhook pings without a repository.
    let mut org_ping = payloads::ping("acme/ping");
    org_ping.as_object_mut().unwrap().remove("repository");
    org_ping["hook"]["type"] = json!("Organization");
    org_ping["organization"] = json!({
        "login": "acme", "id": 81234567, "node_id": "O_kgDOBNeGZw", "url": "https://api.github.com/orgs/acme",
        "repos_url": "https://api.github.com/orgs/acme/repos", "events_url": "https://api.github.com/orgs/acme/events",
        "hooks_url": "https://api.github.com/orgs/acme/hooks", "issues_url": "https://api.github.com/orgs/acme/issues",
        "members_url": "https://api.github.com/orgs/acme/members{/member}",
        "public_members_url": "https://api.github.com/orgs/acme/public_members{/member}",
        "avatar_url": "https://avatars.githubusercontent.com/u/81234567?v=4", "description": null,
    });
    let org_pong = receiver.deliver("ping", &delivery(), "ping-secret", &org_ping).await;
    assert_eq!(org_pong.status, 200, "{}", org_pong.body);
    // GitHub's default content type: the JSON form-encoded in `payload`, the form signed.
    let ping = payloads::ping("acme/ping");
    payloads::assert_valid("ping", &ping);
    let form = format!("payload={}", form_urlencoded::byte_serialize(ping.to_string().as_bytes()).collect::<String>());
    let signature = sign(b"ping-secret", form.as_bytes());
    let headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-GitHub-Event", "ping"),
        ("X-GitHub-Delivery", "form"),
        ("X-Hub-Signature-256", signature.as_str()),
    ];
    let form_pong = receiver.post(&headers, form.as_bytes()).await;
    assert_eq!(form_pong.status, 200, "{}", form_pong.body);

    let push = receiver.deliver("push", &delivery(), "ping-secret", &payloads::push("acme/ping")).await;
    assert_eq!((push.status, push.json()["outcome"].as_str()), (202, Some("ignored")));
    let mut assigned = payloads::pull_request("opened", &Pr::new("acme/ping", 8));
    assigned["action"] = json!("assigned");
    assigned["assignee"] = assigned["sender"].clone();
    let answer = receiver.deliver("pull_request", &delivery(), "ping-secret", &assigned).await;
    assert_eq!((answer.status, answer.json()["outcome"].as_str()), (202, Some("ignored")));
    // An unsigned push is refused like any unsigned delivery.
    let unsigned = receiver.post(&[("X-GitHub-Event", "push"), ("X-GitHub-Delivery", &delivery())], b"{}").await;
    assert_eq!(unsigned.status, 401);

    let deliveries = receiver.metric("stagely_webhook_deliveries_total").await;
    for series in [
        "{event=\"ping\",action=\"\",outcome=\"pong\"}",
        "{event=\"push\",action=\"\",outcome=\"ignored\"}",
        "{event=\"pull_request\",action=\"assigned\",outcome=\"ignored\"}",
        "{event=\"unverified\",action=\"\",outcome=\"unauthorized\"}",
    ] {
        assert!(deliveries.contains_key(series), "{series} in {deliveries:?}");
    }
    assert_eq!(deliveries["{event=\"ping\",action=\"\",outcome=\"pong\"}"], 3.0);
    let latency = receiver.metric("stagely_webhook_ack_duration_seconds_count").await;
    assert_eq!(latency.values().sum::<f64>(), 6.0);
    assert!(team.environment("shop-pr-8").await.is_none());
}

#[tokio::test]
async fn the_example_payload_is_what_github_sends() {
    payloads::assert_valid("pull_request", &payloads::example());
    for action in ["opened", "reopened", "synchronize", "edited", "closed", "labeled"] {
        payloads::assert_valid("pull_request", &payloads::pull_request(action, &Pr::new("acme/shop", 1)));
    }
    let draft = Pr { draft: true, ..Pr::new("acme/shop", 1) };
    payloads::assert_valid("pull_request", &payloads::pull_request("converted_to_draft", &draft));
    payloads::assert_valid("pull_request", &payloads::pull_request("ready_for_review", &Pr::new("acme/shop", 1)));
    payloads::assert_valid("pull_request", &payloads::unlabeled(&Pr::new("acme/shop", 1), "preview"));
    // And the validator does refuse what GitHub would not send.
    let mut bad = payloads::example();
    bad["pull_request"]["number"] = json!("1");
    let refused = std::panic::catch_unwind(|| payloads::assert_valid("pull_request", &bad));
    assert!(refused.is_err(), "a string pull request number passed the schema");
}
