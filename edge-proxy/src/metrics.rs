//! The proxy's Prometheus metrics.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP status code answered.
    pub code: u16,
    /// Which path answered.
    pub path: Path,
}

/// The two ways a request is served: the lean HTTP/1.1 path ([`crate::fast`]) or hyper
/// ([`crate::proxy`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Path {
    /// [`crate::fast`].
    Fast,
    /// [`crate::proxy`].
    Hyper,
}

impl EncodeLabelValue for Path {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Path::Fast => "fast",
            Path::Hyper => "hyper",
        })
    }
}

/// Counters and histograms the proxy updates; cheap to clone (every field is an `Arc`).
#[derive(Clone)]
pub struct ProxyMetrics {
    /// Requests answered, by status code and path.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from request to response headers.
    pub latency: Histogram,
    /// Route lookups answered from the in-process cache.
    pub cache_hits: Counter,
    /// Route lookups that had to ask Redis.
    pub cache_misses: Counter,
    /// Failed Redis calls (lookups and the invalidation subscription).
    pub redis_errors: Counter,
    /// Certificate reloads that failed (the previous certificate stays in use).
    pub tls_reload_errors: Counter,
    /// `requests{code="200"}` of each path, resolved once: most requests would otherwise hash
    /// a label and take the family's lock.
    ok: Arc<[OnceLock<Counter>; 2]>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            redis_errors: Counter::default(),
            tls_reload_errors: Counter::default(),
            ok: Arc::default(),
        }
    }
}

impl ProxyMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("requests", "Requests answered, by status code and path", self.requests.clone());
        registry.register("request_duration_seconds", "Time to response headers", self.latency.clone());
        registry.register("route_cache_hits", "Route lookups answered from the cache", self.cache_hits.clone());
        registry.register("route_cache_misses", "Route lookups that asked Redis", self.cache_misses.clone());
        registry.register("redis_errors", "Failed Redis calls", self.redis_errors.clone());
        registry.register("tls_reload_errors", "Failed certificate reloads", self.tls_reload_errors.clone());
    }

    /// Records one request `path` answered.
    pub fn observe(&self, path: Path, code: u16, elapsed: Duration) {
        let labels = || RequestLabels { code, path };
        if code == 200 {
            self.ok[path as usize].get_or_init(|| self.requests.get_or_create(&labels()).clone()).inc();
        } else {
            self.requests.get_or_create(&labels()).inc();
        }
        self.latency.observe(elapsed.as_secs_f64());
    }
}
