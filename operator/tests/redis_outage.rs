//! Redis going away, everything else real (the operator binary, a `local` preview VM running the
//! app with podman, redis-server): the route is what the Environment waits for, never what
//! blocks the rest. While Redis refuses the route's write a deployed Environment does not go
//! Ready (`Routed` says why) and goes Ready once the write goes through; with Redis down, a
//! deletion still stops the app and its VM, and releases the Environment (with no route left)
//! once Redis answers again.
//!
//! The operator here has a redis-server of its own, stopped and started again on the same port.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/stack.rs"]
mod stack;

use kube::api::{Api, DeleteParams, PostParams};
use stack::{BUILD_TIMEOUT, InstanceWatch, STEP_TIMEOUT, Stack, condition, environment, phase, wait_env};
use stagely_api::v1alpha1::{Environment, EnvironmentPhase};
use stagely_testenv::server::{Server, eventually};

/// Changes the `default` user's permissions in the Redis at `url` (`ACL SETUSER default …`).
async fn acl(url: &str, rules: &[&str]) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("ACL").arg("SETUSER").arg("default").arg(rules).query_async::<()>(&mut conn).await.unwrap();
}

/// The route record of `hash` in the Redis at `url`.
async fn route(url: &str, hash: &str) -> Option<serde_json::Value> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let value: Option<String> = redis::cmd("GET").arg(format!("route:{hash}")).query_async(&mut conn).await.unwrap();
    value.map(|v| serde_json::from_str(&v).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_holds_ready_and_the_finalizer_back_but_not_the_rest() {
    let stack = Stack::shared();
    let mut redis = Server::redis().expect("redis-server is installed (make deps)");
    let (port, url) = (redis.port(), redis.url());
    let _operator = stack.operator_custom(true, &[("--redis-url", url.as_str())], &[]);

    let ns = "redis-outage";
    let (_, sha) = stack.web_app_namespace(ns, "hello").await;
    let client = stack.client().await;
    let watch = InstanceWatch::start(stack.local_dir(ns));
    let envs: Api<Environment> = Api::namespaced(client.clone(), ns);
    envs.create(&PostParams::default(), &environment("shop-pr-1", 1, &sha)).await.unwrap();
    let env = wait_env(&envs, "shop-pr-1", "the building route", STEP_TIMEOUT, |e| {
        condition(e, "Routed").is_some_and(|(_, reason, _)| reason == "NotServing")
    })
    .await;
    let hash = env.status.unwrap().subdomain_hash.unwrap();
    assert!(route(&url, &hash).await.is_some(), "the building route is in Redis");

    // Redis refuses the route writes (an ACL leaving the operator its `stagely:` keys and the
    // routes read-only, so that the preview agent can still enroll, which Redis records): the
    // app is deployed, but without its route the Environment is not Ready.
    acl(&url, &["resetkeys", "~stagely:*", "%R~route:*"]).await;
    let env = wait_env(&envs, "shop-pr-1", "deployed, its route unwritten", BUILD_TIMEOUT, |e| {
        condition(e, "Deployed").is_some_and(|(status, _, _)| status == "True")
            && condition(e, "Routed").is_some_and(|(_, reason, _)| reason == "RedisUnavailable")
            || matches!(phase(e), Some(EnvironmentPhase::Failed | EnvironmentPhase::Ready))
    })
    .await;
    assert_ne!(phase(&env), Some(EnvironmentPhase::Failed), "{:#?}", env.status);
    assert_ne!(phase(&env), Some(EnvironmentPhase::Ready), "Ready without a route: {:#?}", env.status);
    let (status, _, message) = condition(&env, "Routed").unwrap();
    assert_eq!(status, "False");
    assert!(message.contains("retrying"), "{message}");
    let waiting = route(&url, &hash).await.unwrap();
    assert!(matches!(waiting["status"].as_str(), Some("building" | "deploying")), "still the waiting page: {waiting}");

    // Redis takes the writes again: the route is written, and the Environment is Ready.
    acl(&url, &["allkeys"]).await;
    let env = wait_env(&envs, "shop-pr-1", "Ready once Redis takes writes again", STEP_TIMEOUT, |e| {
        phase(e) == Some(EnvironmentPhase::Ready)
    })
    .await;
    assert_eq!(condition(&env, "Routed").unwrap().0, "True");
    let written = route(&url, &hash).await.expect("the ready route");
    assert_eq!(written["status"], "ready", "{written}");
    assert!(written["port"].as_u64().is_some(), "{written}");

    // Redis goes, and the Environment is deleted: the app and its VM still go; the Environment
    // stays, saying it waits for its route.
    redis.stop();
    envs.delete("shop-pr-1", &DeleteParams::default()).await.unwrap();
    let env = wait_env(&envs, "shop-pr-1", "the teardown to wait for the route", STEP_TIMEOUT, |e| {
        condition(e, "CleanedUp").is_some_and(|(_, _, message)| message.contains("route"))
    })
    .await;
    assert_eq!(phase(&env), Some(EnvironmentPhase::Terminating));
    eventually("the preview VM to go while Redis is down", STEP_TIMEOUT, || async {
        stack::instances(&stack.local_dir(ns)).is_empty().then_some(())
    })
    .await;
    stack::assert_nothing_left(&stack.local_dir(ns), &watch.seen());
    assert!(envs.get_opt("shop-pr-1").await.unwrap().is_some(), "released with its route still in Redis");

    // Redis is back: the finalizer goes, with no route left.
    let _redis = Server::redis_on(port).unwrap();
    eventually("the Environment to go", STEP_TIMEOUT, || async {
        envs.get_opt("shop-pr-1").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(route(&url, &hash).await.is_none(), "no route left");
}
