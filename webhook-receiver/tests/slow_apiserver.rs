//! The receiver answers while the apiserver does not: deliveries are verified from its caches
//! and queued, and the Environments are written once the apiserver is back. The apiserver is
//! frozen (SIGSTOP) for real, so this test binary has a control plane of its own.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use stagely_testenv::{ControlPlane, Options};
use support::payloads::{self, Pr, sha};
use support::{Receiver, Team, delivery};

/// Longer than any answer takes: only a receiver stuck on the apiserver reaches it.
const HANG: Duration = Duration::from_secs(30);

/// Thaws the process when dropped, so that a failing test leaves no frozen apiserver behind.
struct Frozen(u32);

impl Frozen {
    fn freeze(pid: u32) -> Self {
        let status = Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap();
        assert!(status.success(), "kill -STOP {pid}");
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

#[tokio::test]
async fn deliveries_are_answered_while_the_apiserver_is_frozen_and_written_after() {
    let plane = ControlPlane::start(Options { crds: stagely_api::crds(), ..Options::default() }).await.unwrap();
    let team = Team::new(&plane, "webhook-slow").await;
    team.project("shop", "acme/slow", "slow-secret", json!({})).await;
    // Short calls, so the frozen apiserver is retried several times while the test waits.
    let receiver = Receiver::start(team.client.clone(), &["--call-timeout-secs", "1"]).await;
    let pr = Pr::new("acme/slow", 21);

    // The control plane's processes, in start order: etcd, then kube-apiserver.
    let frozen = Frozen::freeze(plane.pids()[1]);
    // The apiserver stays frozen until after the answers: a receiver that waited for it would
    // never answer (the deadline only keeps such a failure from hanging the test run).
    for (action, pr) in [("opened", pr.clone()), ("synchronize", pr.at(2, 5))] {
        let (id, payload) = (delivery(), payloads::pull_request(action, &pr));
        let delivered = receiver.deliver("pull_request", &id, "slow-secret", &payload);
        let answer = tokio::time::timeout(HANG, delivered).await.expect("an answer while the apiserver is frozen");
        assert_eq!(answer.status, 202, "{}", answer.body);
    }
    support::wait_for("a failed write to be retried", || async {
        let retries = receiver.metric("stagely_webhook_environment_writes_total").await;
        retries.get("{outcome=\"retrying\"}").is_some_and(|retried| *retried > 0.0).then_some(())
    })
    .await;
    drop(frozen);

    // Once the apiserver is back, the newer state of the pull request lands, whichever retry
    // runs first; nothing is dropped.
    team.wait_for_head("shop-pr-21", &sha(2)).await;
    let writes = receiver.writes().await;
    assert!(!writes.contains_key("failed"), "{writes:?}");
}
