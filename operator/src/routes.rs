//! The route records the edge proxy serves from: written to Redis at `route:<hash>` and
//! announced on `stagely:routes` after every change, so proxies drop their cached copy at once.
//!
//! A digest of the last record written for each hash is remembered, so a reconcile that finds
//! nothing new costs no Redis round trip; after a restart every route is written once again.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

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

/// Route records in Redis.
pub struct Routes {
    conn: ConnectionManager,
    /// A digest of the record last written, by hash (not the record: thousands of them add up).
    written: Mutex<HashMap<String, u64>>,
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
        let conn = ConnectionManager::new(client).await.map_err(RouteError::Connect)?;
        Ok(Self { conn, written: Mutex::new(HashMap::new()) })
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes `route` for `hash` and publishes the change, unless this exact record was the last
    /// one written.
    pub async fn write(&self, hash: &str, route: &Route) -> Result<(), RouteError> {
        // A plain struct of strings and numbers always serializes.
        let json = serde_json::to_string(route).unwrap_or_default();
        let mut hasher = DefaultHasher::new();
        json.hash(&mut hasher);
        let digest = hasher.finish();
        if self.written().get(hash) == Some(&digest) {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic().set(route_key(hash), json).ignore().publish(ROUTE_CHANNEL, hash).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(|source| RouteError::Redis {
            action: "write",
            hash: hash.to_owned(),
            source,
        })?;
        self.written().insert(hash.to_owned(), digest);
        Ok(())
    }

    /// Deletes the route of `hash` and publishes the change; one already gone is success.
    pub async fn delete(&self, hash: &str) -> Result<(), RouteError> {
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
}
