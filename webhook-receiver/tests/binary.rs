//! The `stagely-webhook-receiver` binary as a deployment runs it: flags, JSON logs carrying each
//! delivery's id (and never the webhook secret), readiness, and a clean stop on SIGTERM.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};

use serde_json::json;
use stagely_webhook_receiver::github::sign;
use stagely_webhook_receiver::server::WEBHOOK_PATH;
use support::payloads::{self, Pr, sha};
use support::{Team, delivery, http, plane};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn the_binary_logs_json_with_the_delivery_id_and_stops_on_sigterm() {
    let team = Team::new(plane(), "webhook-binary").await;
    let secret = "binary-secret-never-logged";
    team.project("shop", "acme/binary", secret, json!({})).await;
    let (port, ops_port) = (free_port(), free_port());
    let mut child = stagely_testenv::spawn_tied({
        let mut command = Command::new(env!("CARGO_BIN_EXE_stagely-webhook-receiver"));
        command
            .env("KUBECONFIG", plane().kubeconfig())
            .env("RUST_LOG", "info")
            .args(["--listen-addr", &format!("127.0.0.1:{port}"), "--ops-addr", &format!("127.0.0.1:{ops_port}")])
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        command
    })
    .expect("the receiver starts");
    let ops: std::net::SocketAddr = ([127, 0, 0, 1], ops_port).into();
    support::wait_for("the binary to be ready", || async {
        let ready = http::exchange(ops, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", false).await;
        ready.filter(|answer| answer.status == 200)
    })
    .await;

    let id = delivery();
    let payload = payloads::pull_request("opened", &Pr::new("acme/binary", 3));
    payloads::assert_valid("pull_request", &payload);
    let body = payload.to_string();
    let signature = sign(secret.as_bytes(), body.as_bytes());
    let headers =
        [("X-GitHub-Event", "pull_request"), ("X-GitHub-Delivery", id.as_str()), ("X-Hub-Signature-256", &signature)];
    let answer = http::post(([127, 0, 0, 1], port).into(), WEBHOOK_PATH, &headers, body.as_bytes()).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    team.wait_for_head("shop-pr-3", &sha(1)).await;

    // SIGTERM: the receiver stops accepting, finishes its queue and exits cleanly.
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut logs = String::new();
    child.stdout.take().unwrap().read_to_string(&mut logs).unwrap();
    assert!(!logs.contains(secret), "the webhook secret is in the logs:\n{logs}");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not a JSON log line ({err}): {line}")))
        .collect();
    let about = |message: &str| {
        lines
            .iter()
            .find(|line| {
                line["fields"]["message"].as_str().is_some_and(|m| m.starts_with(message))
                    && line.to_string().contains(&id)
            })
            .unwrap_or_else(|| panic!("no log line {message:?} carrying delivery {id}:\n{logs}"))
    };
    let accepted = about("pull_request opened of #3 accepted");
    assert_eq!(accepted["span"]["delivery"], id.as_str(), "{accepted}");
    assert_eq!(
        (accepted["fields"]["code"].as_u64(), accepted["fields"]["outcome"].as_str()),
        (Some(202), Some("accepted"))
    );
    let created = about("created the Environment");
    assert_eq!(created["span"]["delivery"], id.as_str(), "{created}");
    assert_eq!(created["fields"]["environment"], "shop-pr-3");
    assert!(lines.iter().any(|line| line["fields"]["message"] == "stagely-webhook-receiver stopped"), "{logs}");
}
