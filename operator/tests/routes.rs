//! Routes survive Redis: against a real redis-server, the operator's route writer notices that
//! Redis lost its data (FLUSHALL, or a restart without persistence) and writes every route back,
//! announcing each on `stagely:routes`. The time it took is printed (`--nocapture`); the tests
//! assert only what came back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use stagely_api::route::{ROUTE_CHANNEL, Route, RouteStatus, route_key};
use stagely_operator::routes::{EPOCH_KEY, Routes};
use stagely_testenv::server::Server;

const DEADLINE: Duration = Duration::from_secs(30);

fn route(n: u64) -> Route {
    Route {
        status: RouteStatus::Ready,
        ip: Some(format!("10.0.0.{n}")),
        port: Some(8080),
        project: "shop".into(),
        namespace: "team".into(),
        environment: format!("shop-pr-{n}"),
        pr: n,
    }
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Every `route:*` key and its value.
async fn stored(url: &str) -> BTreeMap<String, String> {
    let mut conn = conn(url).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("route:*").query_async(&mut conn).await.unwrap();
    let mut all = BTreeMap::new();
    for key in keys {
        let value: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
        all.insert(key, value);
    }
    all
}

/// Waits until Redis holds `expected` again; returns how long that took.
async fn restored(url: &str, expected: &BTreeMap<String, String>, since: Instant) -> Duration {
    loop {
        if stored(url).await == *expected {
            return since.elapsed();
        }
        assert!(since.elapsed() < DEADLINE, "the routes were not written back: {:?}", stored(url).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn routes_lost_to_flushall_or_an_empty_restart_are_written_back_and_announced() {
    let mut redis = Server::redis().expect("redis-server is installed (scripts/install-deps.sh installs it)");
    let url = redis.url();
    let routes = Arc::new(Routes::connect(&url).await.unwrap());
    for n in 1..=50 {
        routes.write(&format!("hash{n:04}"), &route(n)).await.unwrap();
    }
    routes.delete("hash0050").await.unwrap();
    let expected = stored(&url).await;
    assert_eq!(expected.len(), 49);
    let watcher = Arc::clone(&routes);
    tokio::spawn(async move { watcher.watch(Duration::from_millis(200), std::future::pending()).await });

    // FLUSHALL while a proxy listens: every route comes back, and each is announced.
    let mut pubsub = redis::Client::open(url.as_str()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(ROUTE_CHANNEL).await.unwrap();
    let mut conn = conn(&url).await;
    let flushed = Instant::now();
    redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await.unwrap();
    let took = restored(&url, &expected, flushed).await;
    eprintln!("routes_restored_after_flushall_ms={}", took.as_millis());
    let mut announced = std::collections::BTreeSet::new();
    let mut messages = pubsub.on_message();
    while announced.len() < 49 {
        let message = tokio::time::timeout(DEADLINE, messages.next()).await.expect("announced").unwrap();
        announced.insert(message.get_payload::<String>().unwrap());
    }
    assert!(!announced.contains("hash0050"), "a deleted route stays deleted");
    drop(messages);
    let epoch: Option<String> = redis::cmd("GET").arg(EPOCH_KEY).query_async(&mut conn).await.unwrap();
    assert!(epoch.is_some(), "Redis is marked again");

    // A restart without persistence on the same port: found on reconnecting, written back.
    let port = redis.port();
    redis.stop();
    let _redis = Server::redis_on(port).expect("redis-server comes back");
    let restarted = Instant::now();
    let took = restored(&url, &expected, restarted).await;
    eprintln!("routes_restored_after_restart_ms={}", took.as_millis());

    // Writes go on as before, and an unchanged route is not written twice.
    routes.write("hash0001", &route(1)).await.unwrap();
    let mut changed = route(2);
    changed.status = RouteStatus::Failed;
    routes.write("hash0002", &changed).await.unwrap();
    let now = stored(&url).await;
    assert_eq!(now.get(&route_key("hash0002")), Some(&serde_json::to_string(&changed).unwrap()));
}
