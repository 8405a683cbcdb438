//! The route table: route records read from Redis and cached in process, so a steady-state
//! request makes no Redis round trip.
//!
//! Entries are invalidated by the hashes the operator publishes on [`ROUTE_CHANNEL`]; the whole
//! table is marked stale whenever the subscription (re)connects, since messages may have been
//! missed meanwhile; and every entry expires after a TTL as a backstop. A stale entry is
//! refetched on its next use, and while Redis cannot answer, the stale value keeps serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::HeaderValue;
use http::uri::Authority;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use stagely_api::backoff::Backoff;
use stagely_api::route::{ROUTE_CHANNEL, Route, route_key};
use tokio::sync::watch;

use crate::metrics::ProxyMetrics;
use crate::ratelimit::RateLimiter;

/// Cached entries beyond which unknown hashes stop being remembered (they are cheap to
/// refetch, and must not let random hostnames grow the table without bound).
const MAX_ENTRIES: usize = 100_000;

/// A route, with what the hot path needs ready-made.
#[derive(Debug)]
pub struct ResolvedRoute {
    /// The record.
    pub route: Route,
    /// `ip:port` of the app, when the route is ready.
    pub backend: Option<Authority>,
    /// The same, when it is an IP address (what the HTTP/1.1 fast path connects to).
    pub backend_addr: Option<SocketAddr>,
    /// `X-Stagely-Project`.
    pub project: HeaderValue,
    /// `X-Stagely-PR`.
    pub pr: HeaderValue,
    /// `X-Stagely-Environment`.
    pub environment: HeaderValue,
    /// This environment's request budget.
    pub limiter: RateLimiter,
}

impl ResolvedRoute {
    fn new(route: Route, rate_limit: u32) -> Self {
        let header = |value: &str| HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        let backend = route.backend();
        Self {
            backend_addr: backend.as_deref().and_then(|backend| backend.parse().ok()),
            backend: backend.and_then(|backend| backend.parse().ok()),
            project: header(&route.project),
            pr: HeaderValue::from(route.pr),
            environment: header(&format!("{}/{}", route.namespace, route.environment)),
            limiter: RateLimiter::new(rate_limit),
            route,
        }
    }
}

/// The outcome of a lookup.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// The route.
    Found(Arc<ResolvedRoute>),
    /// No route has this hash.
    Unknown,
    /// Redis cannot answer and nothing is cached.
    Unavailable,
}

struct Entry {
    route: Option<Arc<ResolvedRoute>>,
    expires: Instant,
}

/// Settings of the route table.
#[derive(Clone, Debug)]
pub struct RouteTableConfig {
    /// Backstop lifetime of a cached route.
    pub ttl: Duration,
    /// Lifetime of a cached "no such route".
    pub negative_ttl: Duration,
    /// Requests per second allowed per environment (0: unlimited).
    pub rate_limit: u32,
    /// How long one Redis call may take.
    pub redis_timeout: Duration,
}

/// Route records from Redis, cached.
pub struct RouteTable {
    entries: RwLock<HashMap<Box<str>, Entry>>,
    /// The runtime that owns the Redis connection; lookups from the proxy's per-thread runtimes
    /// hand their (rare) misses to it, so the connection never depends on one worker thread.
    runtime: tokio::runtime::Handle,
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    config: RouteTableConfig,
    metrics: ProxyMetrics,
}

impl RouteTable {
    /// A table reading from `client`, owned by the current runtime. Nothing connects until
    /// the first lookup.
    pub fn new(client: redis::Client, config: RouteTableConfig, metrics: ProxyMetrics) -> Self {
        Self {
            entries: RwLock::default(),
            runtime: tokio::runtime::Handle::current(),
            client,
            connection: tokio::sync::Mutex::new(None),
            config,
            metrics,
        }
    }

    /// The route of subdomain `hash` if the cache holds a fresh one; never asks Redis and counts
    /// nothing (the caller counts the hit if it uses the route).
    pub fn cached(&self, hash: &str) -> Option<Arc<ResolvedRoute>> {
        let entries = self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = entries.get(hash)?;
        if entry.expires > Instant::now() { entry.route.clone() } else { None }
    }

    /// The route of subdomain `hash`.
    pub async fn lookup(self: &Arc<Self>, hash: &str) -> Lookup {
        let stale = {
            let entries = self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            match entries.get(hash) {
                Some(entry) if entry.expires > Instant::now() => {
                    self.metrics.cache_hits.inc();
                    return match &entry.route {
                        Some(route) => Lookup::Found(route.clone()),
                        None => Lookup::Unknown,
                    };
                }
                Some(entry) => Some(entry.route.clone()),
                None => None,
            }
        };
        self.metrics.cache_misses.inc();
        let fetched = {
            let table = self.clone();
            let hash = hash.to_owned();
            self.runtime.spawn(async move { table.fetch(&hash).await }).await
        };
        match fetched.unwrap_or_else(|err| Err(RouteError::Task(err.to_string()))) {
            Ok(route) => {
                let route = route.map(|route| Arc::new(ResolvedRoute::new(route, self.config.rate_limit)));
                self.insert(hash, route.clone());
                match route {
                    Some(route) => Lookup::Found(route),
                    None => Lookup::Unknown,
                }
            }
            Err(err) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(%err, hash, "failed to read a route from Redis; serving the cached copy if any");
                match stale {
                    Some(Some(route)) => Lookup::Found(route),
                    Some(None) => Lookup::Unknown,
                    None => Lookup::Unavailable,
                }
            }
        }
    }

    fn insert(&self, hash: &str, route: Option<Arc<ResolvedRoute>>) {
        let ttl = if route.is_some() { self.config.ttl } else { self.config.negative_ttl };
        let mut entries = self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= MAX_ENTRIES {
            let now = Instant::now();
            entries.retain(|_, entry| entry.route.is_some() && entry.expires > now);
        }
        entries.insert(hash.into(), Entry { route, expires: Instant::now() + ttl });
    }

    async fn fetch(&self, hash: &str) -> Result<Option<Route>, RouteError> {
        let mut connection = self.connection().await?;
        let value: Option<String> = connection.get(route_key(hash)).await?;
        match value {
            None => Ok(None),
            Some(json) => serde_json::from_str(&json)
                .map(Some)
                .map_err(|source| RouteError::Decode { hash: hash.to_owned(), source }),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, RouteError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.redis_timeout))
            .set_response_timeout(Some(self.config.redis_timeout))
            .set_number_of_retries(1);
        let connection = self.client.get_connection_manager_with_config(config).await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Marks the route of `hash` stale: its next use rereads it.
    pub fn invalidate(&self, hash: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = entries.get_mut(hash) {
            entry.expires = Instant::now();
        }
    }

    /// Marks every route stale.
    pub fn invalidate_all(&self) {
        let now = Instant::now();
        let mut entries = self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for entry in entries.values_mut() {
            entry.expires = now;
        }
    }

    /// Follows [`ROUTE_CHANNEL`] until `shutdown` turns true, reconnecting with backoff.
    pub async fn follow_invalidations(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let followed = tokio::select! {
                result = self.follow_once() => result,
                _ = crate::stopped(&mut shutdown) => return,
            };
            self.metrics.redis_errors.inc();
            match followed {
                Ok(()) => {
                    tracing::warn!("the route invalidation subscription ended; reconnecting");
                    backoff.reset();
                }
                Err(err) => tracing::warn!(%err, "failed to subscribe to route invalidations; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
        }
    }

    async fn follow_once(&self) -> Result<(), RouteError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(ROUTE_CHANNEL).await?;
        // Anything published while we were not listening is lost: reread everything.
        self.invalidate_all();
        tracing::info!(channel = ROUTE_CHANNEL, "following route invalidations");
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            match message.get_payload::<String>() {
                Ok(hash) => self.invalidate(&hash),
                Err(err) => tracing::warn!(%err, "ignoring an unreadable route invalidation"),
            }
        }
        Ok(())
    }
}

/// Why a route could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The lookup task failed (the runtime is shutting down).
    #[error("route lookup task failed: {0}")]
    Task(String),
    /// The record is not a route.
    #[error("failed to decode the route of {hash}: {source}")]
    Decode {
        /// Its hash.
        hash: String,
        /// The cause.
        source: serde_json::Error,
    },
}
