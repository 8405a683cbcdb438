//! The receiver's Prometheus metrics.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the delivery counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `X-GitHub-Event` once the signature verified (`unverified` before).
    pub event: String,
    /// The payload's `action`, for `pull_request`; empty otherwise.
    pub action: String,
    /// What the delivery got: see [`Outcome`].
    pub outcome: &'static str,
}

/// Labels of the signature failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `missing`, `malformed`, `no_project` (no Project is bound to the repository),
    /// `no_secret` (none of those Projects has a readable `webhookSecret`) or `mismatch`.
    pub reason: &'static str,
}

/// Labels of the write counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// What the job did: `created`, `applied`, `deleted`, `removal_recorded`, a reason it did
    /// nothing (`duplicate`, `stale`, `removed_later`, `nothing_to_remove`, `project_gone`),
    /// `waiting` (the Environment is being deleted), `retrying` or `failed`.
    pub outcome: &'static str,
}

/// Counters and histograms the receiver updates; cheap to clone (every field is an `Arc`).
#[derive(Clone)]
pub struct WebhookMetrics {
    /// Deliveries answered, by event, action and outcome.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Deliveries refused for their signature, by reason.
    pub signature_failures: Family<FailureLabels, Counter>,
    /// Time from the request to the answer.
    pub ack_latency: Histogram,
    /// Jobs finished (or retried) by the workers, by outcome.
    pub writes: Family<WriteLabels, Counter>,
    /// Time a worker spent on a job, apiserver calls included.
    pub write_latency: Histogram,
    /// Pull requests with a job waiting or being worked on.
    pub queue_depth: Gauge,
}

/// The signature failure reasons (see [`FailureLabels`]).
pub const FAILURE_REASONS: [&str; 5] = ["missing", "malformed", "no_project", "no_secret", "mismatch"];
/// The write outcomes (see [`WriteLabels`]).
pub const WRITE_OUTCOMES: [&str; 12] = [
    "created",
    "applied",
    "deleted",
    "removal_recorded",
    "duplicate",
    "stale",
    "removed_later",
    "nothing_to_remove",
    "project_gone",
    "waiting",
    "retrying",
    "failed",
];

impl Default for WebhookMetrics {
    fn default() -> Self {
        let metrics = Self {
            deliveries: Family::default(),
            signature_failures: Family::default(),
            ack_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            writes: Family::default(),
            write_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            queue_depth: Gauge::default(),
        };
        // Known label values start at zero (as Prometheus advises): a rate sees their first
        // event, and a panel shows 0 rather than no data.
        for reason in FAILURE_REASONS {
            drop(metrics.signature_failures.get_or_create(&FailureLabels { reason }));
        }
        for outcome in WRITE_OUTCOMES {
            drop(metrics.writes.get_or_create(&WriteLabels { outcome }));
        }
        metrics
    }
}

impl WebhookMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("deliveries", "Deliveries answered, by event, action and outcome", self.deliveries.clone());
        registry.register(
            "signature_failures",
            "Deliveries refused for their signature, by reason",
            self.signature_failures.clone(),
        );
        registry.register("ack_duration_seconds", "Time from a delivery to its answer", self.ack_latency.clone());
        registry.register("environment_writes", "Jobs finished or retried, by outcome", self.writes.clone());
        registry.register(
            "environment_write_duration_seconds",
            "Time a worker spent on a job",
            self.write_latency.clone(),
        );
        registry.register(
            "queue_depth",
            "Pull requests with a job waiting or being worked on",
            self.queue_depth.clone(),
        );
    }

    /// Records one answered delivery.
    pub fn delivered(&self, labels: DeliveryLabels, elapsed: Duration) {
        self.deliveries.get_or_create(&labels).inc();
        self.ack_latency.observe(elapsed.as_secs_f64());
    }

    /// Records one finished (or retried) job.
    pub fn wrote(&self, outcome: &'static str, elapsed: Duration) {
        self.writes.get_or_create(&WriteLabels { outcome }).inc();
        self.write_latency.observe(elapsed.as_secs_f64());
    }
}

/// What a delivery got, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 202: work queued.
    Accepted,
    /// 202: an event or action the receiver does not act on.
    Ignored,
    /// 200: a delivery already accepted.
    Duplicate,
    /// 200: `ping`.
    Pong,
    /// 400: a malformed request or payload.
    BadRequest,
    /// 401: no or a wrong signature.
    Unauthorized,
    /// 408: the body took too long to arrive.
    Timeout,
    /// 413: the body is over the limit.
    TooLarge,
    /// 503: not ready yet, or the queue is full; GitHub (or whoever redelivers) should retry.
    Unavailable,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Ignored => "ignored",
            Outcome::Duplicate => "duplicate",
            Outcome::Pong => "pong",
            Outcome::BadRequest => "bad_request",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Timeout => "timeout",
            Outcome::TooLarge => "too_large",
            Outcome::Unavailable => "unavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_reasons_and_outcomes_start_at_zero() {
        let metrics = WebhookMetrics::default();
        let mut registry = Registry::with_prefix("stagely_webhook");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for reason in FAILURE_REASONS {
            let line = format!("stagely_webhook_signature_failures_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        for outcome in WRITE_OUTCOMES {
            let line = format!("stagely_webhook_environment_writes_total{{outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }
}
