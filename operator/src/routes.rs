//! The route records the edge proxy serves from: written to Redis at `route:<hash>` and
//! announced on `stagely:routes` after every change, so proxies drop their cached copy at once.
//!
//! The last record written for each hash is remembered, so a reconcile that finds nothing new
//! costs no Redis round trip; after an operator restart every route is written once again.
//!
//! Redis may lose them (flushed, or restarted without persistence): the operator marks Redis with
//! an epoch key of its own and checks it every [`CHECK_EVERY`]; when it is gone, every route
//! remembered is written back and announced in one pipeline ([`Routes::watch`]), so the proxies,
//! which keep serving their cached copies meanwhile, never miss one for long.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::ConnectionManager;
use stagely_api::route::{ROUTE_CHANNEL, Route, route_key};

/// Why a route could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Redis could not be reached at startup.
    #[error("failed to connect to Redis for routes: {0}")]
    Connect(#[source] redis::RedisError),
    /// A write or delete failed.
    #[error("failed to {action} the route of {hash} in Redis: {source}")]
    Redis {
        /// What was attempted.
        action: &'static str,
        /// The subdomain hash.
        hash: String,
        /// The cause.
        source: redis::RedisError,
    },
}

/// The key marking a Redis as holding this operator's routes; its value is the operator's epoch.
pub const EPOCH_KEY: &str = "stagely:routes:epoch";
/// How often the epoch key is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Route records in Redis.
pub struct Routes {
    conn: ConnectionManager,
    /// The record last written, by hash (about 150 bytes each: 1 MiB at 7,000 previews), to
    /// write back what Redis lost.
    written: Mutex<HashMap<String, Box<str>>>,
    /// Held across every write and the restore, so that a restore never puts back a record older
    /// than one written meanwhile.
    writing: tokio::sync::Mutex<()>,
    /// This process's mark on Redis (random).
    epoch: String,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes").finish_non_exhaustive()
    }
}

impl Routes {
    /// Connects to the Redis at `url` (reconnecting as needed afterwards).
    pub async fn connect(url: &str) -> Result<Self, RouteError> {
        let client = redis::Client::open(url).map_err(RouteError::Connect)?;
        let mut conn = ConnectionManager::new(client).await.map_err(RouteError::Connect)?;
        let mut bytes = [0u8; 12];
        getrandom::fill(&mut bytes).expect("the OS has randomness");
        let epoch: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        redis::cmd("SET").arg(EPOCH_KEY).arg(&epoch).query_async::<()>(&mut conn).await.map_err(RouteError::Connect)?;
        Ok(Self { conn, written: Mutex::new(HashMap::new()), writing: tokio::sync::Mutex::new(()), epoch })
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, Box<str>>> {
        self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes `route` for `hash` and publishes the change, unless this exact record was the last
    /// one written.
    pub async fn write(&self, hash: &str, route: &Route) -> Result<(), RouteError> {
        // A plain struct of strings and numbers always serializes.
        let json = serde_json::to_string(route).unwrap_or_default();
        if self.written().get(hash).is_some_and(|last| **last == *json) {
            return Ok(());
        }
        let _writing = self.writing.lock().await;
        let mut pipe = redis::pipe();
        pipe.atomic().set(route_key(hash), &json).ignore().publish(ROUTE_CHANNEL, hash).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(|source| RouteError::Redis {
            action: "write",
            hash: hash.to_owned(),
            source,
        })?;
        self.written().insert(hash.to_owned(), json.into_boxed_str());
        Ok(())
    }

    /// Deletes the route of `hash` and publishes the change; one already gone is success.
    pub async fn delete(&self, hash: &str) -> Result<(), RouteError> {
        let _writing = self.writing.lock().await;
        let mut pipe = redis::pipe();
        pipe.atomic().del(route_key(hash)).ignore().publish(ROUTE_CHANNEL, hash).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(|source| RouteError::Redis {
            action: "delete",
            hash: hash.to_owned(),
            source,
        })?;
        self.written().remove(hash);
        Ok(())
    }

    /// Whether Redis still holds this operator's epoch (`false`: it lost its data).
    async fn intact(&self) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        let epoch: Option<String> = redis::cmd("GET").arg(EPOCH_KEY).query_async(&mut conn).await?;
        Ok(epoch.as_deref() == Some(self.epoch.as_str()))
    }

    /// Writes every remembered route back and announces each, then marks Redis again; returns
    /// how many were written.
    pub async fn restore(&self) -> Result<usize, RouteError> {
        let _writing = self.writing.lock().await;
        let routes: Vec<(String, Box<str>)> = self.written().iter().map(|(h, r)| (h.clone(), r.clone())).collect();
        let mut pipe = redis::pipe();
        for (hash, json) in &routes {
            pipe.set(route_key(hash), &**json).ignore().publish(ROUTE_CHANNEL, hash).ignore();
        }
        // Last: a restore cut short is done again on the next check.
        pipe.set(EPOCH_KEY, &self.epoch).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(|source| RouteError::Redis {
            action: "restore",
            hash: format!("{} routes", routes.len()),
            source,
        })?;
        Ok(routes.len())
    }

    /// Checks Redis every `every` and restores the routes when it lost them, until `shutdown`.
    pub async fn watch(&self, every: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let work = async {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match self.intact().await {
                    Ok(true) => {}
                    Ok(false) => match self.restore().await {
                        Ok(count) => tracing::warn!(
                            routes = count,
                            "Redis lost the routes (flushed or restarted empty); wrote them back"
                        ),
                        Err(err) => {
                            tracing::warn!(error = %err, "Redis lost the routes; writing them back failed, retrying")
                        }
                    },
                    Err(err) => tracing::debug!(error = %err, "cannot check Redis for lost routes; retrying"),
                }
            }
        };
        tokio::select! {
            () = work => {}
            () = shutdown => {}
        }
    }
}
