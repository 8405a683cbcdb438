//! `POST /v1/webhooks/github`: the per-delivery path. It reads the body (bounded), finds the
//! Projects bound to the repository in the cache, verifies the signature, deduplicates, decides
//! what the event asks of each Project and queues that work, then answers; it never calls the
//! apiserver, so it answers within GitHub's ten seconds however slow the apiserver is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use kube::ResourceExt;
use serde::Serialize;
use stagely_api::names;

use crate::cache::{Cache, Candidate};
use crate::deliveries::Deliveries;
use crate::github::{self, Envelope, PullRequestEvent, Signature};
use crate::metrics::{DeliveryLabels, FailureLabels, Outcome, WebhookMetrics};
use crate::plan::{self, Action, Intent, Job};
use crate::queue::{Full, Key, Queue};

/// The path GitHub posts to.
pub const WEBHOOK_PATH: &str = "/v1/webhooks/github";
/// How long the body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// What a 503 asks the sender to wait, in seconds.
const RETRY_AFTER_SECS: u64 = 5;

/// What the per-delivery path shares.
pub struct Receiver {
    /// Projects and webhook secrets.
    pub cache: Arc<Cache>,
    /// Recent deliveries.
    pub deliveries: Arc<Deliveries>,
    /// The work after the answer.
    pub queue: Arc<Queue>,
    /// Metrics.
    pub metrics: WebhookMetrics,
    /// The largest body accepted, in bytes.
    pub max_body_bytes: usize,
}

/// The webhook route.
pub fn router(receiver: Arc<Receiver>) -> Router {
    Router::new().route(WEBHOOK_PATH, post(webhook)).with_state(receiver)
}

/// The answer's body: what became of the delivery, for GitHub's delivery log and for people.
#[derive(Debug, Serialize)]
struct Answer {
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery: Option<String>,
    outcome: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    environments: Vec<Planned>,
    #[serde(skip)]
    status: StatusCode,
    #[serde(skip)]
    labels: (String, String),
}

/// What the delivery asks of one Project's Environment.
#[derive(Debug, Serialize)]
struct Planned {
    namespace: String,
    name: String,
    /// `preview` or `remove`.
    intent: &'static str,
    message: String,
}

impl Answer {
    fn new(status: StatusCode, outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            delivery: None,
            outcome: outcome.as_str(),
            message: message.into(),
            environments: Vec::new(),
            status,
            labels: ("unverified".into(), String::new()),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Outcome::BadRequest, message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, Outcome::Unauthorized, message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, Outcome::Unavailable, message)
    }
}

async fn webhook(State(receiver): State<Arc<Receiver>>, request: Request) -> Response {
    let started = Instant::now();
    let delivery = request.headers().get(github::DELIVERY_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let span = tracing::info_span!("delivery", delivery = %delivery);
    let mut answer = tracing::Instrument::instrument(receiver.handle(request), span.clone()).await;
    let _entered = span.enter();
    let (event, action) = std::mem::take(&mut answer.labels);
    let code = answer.status.as_u16();
    if answer.status.is_success() {
        tracing::info!(code, event, action, outcome = answer.outcome, "{}", answer.message);
    } else {
        tracing::warn!(code, event, action, outcome = answer.outcome, "{}", answer.message);
    }
    receiver.metrics.delivered(DeliveryLabels { event, action, outcome: answer.outcome }, started.elapsed());
    // Serialising plain strings and numbers cannot fail.
    let body = serde_json::to_vec(&answer).unwrap_or_default();
    let mut response = (answer.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if answer.status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
    }
    response
}

impl Receiver {
    async fn handle(&self, request: Request) -> Answer {
        if !self.cache.is_ready() {
            return Answer::unavailable("the receiver is starting: its Project and Secret caches are not ready yet");
        }
        let (parts, body) = request.into_parts();
        let headers = Headers::read(&parts.headers);
        let (event, delivery) = match (headers.event, headers.delivery) {
            (Some(event), Some(delivery)) => (event, delivery),
            (None, _) => return Answer::bad_request("the X-GitHub-Event header is missing"),
            (_, None) => {
                return Answer::bad_request(
                    "the X-GitHub-Delivery header is missing or is not 1 to 100 printable characters",
                );
            }
        };
        let Some(signature) = headers.signature else {
            self.signature_failure("missing");
            return Answer::unauthorized(
                "the X-Hub-Signature-256 header is missing: set the webhook's secret in GitHub",
            );
        };
        let Ok(signature) = Signature::parse(signature) else {
            self.signature_failure("malformed");
            return Answer::unauthorized("the X-Hub-Signature-256 header is not sha256= and 64 hex digits");
        };
        let body = match read_body(body, &parts.headers, self.max_body_bytes).await {
            Ok(body) => body,
            Err(answer) => return answer,
        };
        // GitHub signs the body as sent; with the form content type, the JSON is its `payload`.
        let json = match github::payload(&parts.headers, &body) {
            Ok(json) => json,
            Err(err) => return Answer::bad_request(err),
        };
        // Parsed once, before the signature is checked: the repository says whose secret to try.
        let payload = if event == "pull_request" {
            github::parse(&json).map(|event| Payload::PullRequest(Box::new(event)))
        } else {
            github::parse(&json).map(Payload::Other)
        };
        let payload = match payload {
            Ok(payload) => payload,
            Err(err) => return Answer::bad_request(format!("the body is not a webhook payload: {err}")),
        };
        let (repository, organization) = match &payload {
            Payload::PullRequest(event) => (Some(event.repository.full_name.as_str()), None),
            Payload::Other(envelope) => (
                envelope.repository.as_ref().map(|r| r.full_name.as_str()),
                envelope.organization.as_ref().map(|o| o.login.as_str()),
            ),
        };
        let Some(subject) = repository.or(organization) else {
            return Answer::bad_request("repository.full_name is missing: the payload names no repository");
        };
        let candidates = self.cache.candidates(repository, organization);
        let verified = self.verify(&signature, &body, candidates);
        if verified.is_empty() {
            return Answer::unauthorized(format!(
                "the signature does not verify with the webhook secret of any Project bound to {subject}"
            ));
        }
        let mut answer = self.dispatch(event, delivery, payload, &verified);
        answer.delivery = Some(delivery.to_owned());
        answer
    }

    /// The candidates whose webhook secret made the signature (none: the delivery is refused,
    /// and the reason counted).
    fn verify(&self, signature: &Signature, body: &[u8], candidates: Vec<Candidate>) -> Vec<Candidate> {
        if candidates.is_empty() {
            self.signature_failure("no_project");
            return Vec::new();
        }
        let mut secrets = 0;
        let mut verified = Vec::new();
        for candidate in candidates {
            let Some(secret) = candidate.webhook_secret() else {
                let project = &candidate.project;
                tracing::warn!(
                    namespace = project.namespace().unwrap_or_default(),
                    project = project.name_any(),
                    secret = project.spec.github.credentials_secret_ref.name,
                    "the Project's credentials Secret is missing or has no webhookSecret: its deliveries cannot be verified"
                );
                continue;
            };
            secrets += 1;
            if signature.verifies(secret, body) {
                verified.push(candidate);
            }
        }
        if verified.is_empty() {
            self.signature_failure(if secrets == 0 { "no_secret" } else { "mismatch" });
        }
        verified
    }

    fn signature_failure(&self, reason: &'static str) {
        self.metrics.signature_failures.get_or_create(&FailureLabels { reason }).inc();
    }

    /// What a verified delivery gets, by event.
    fn dispatch(&self, event: &str, delivery: &str, payload: Payload, projects: &[Candidate]) -> Answer {
        let event_label = label_token(event);
        let mut answer = match (event, payload) {
            ("ping", _) => Answer::new(
                StatusCode::OK,
                Outcome::Pong,
                format!("pong: the webhook reaches {}", project_list(projects)),
            ),
            (_, Payload::PullRequest(pull_request)) => self.pull_request(delivery, &pull_request, projects),
            _ => Answer::new(StatusCode::ACCEPTED, Outcome::Ignored, format!("{event} events are ignored")),
        };
        answer.labels.0 = event_label;
        answer
    }

    fn pull_request(&self, delivery: &str, event: &PullRequestEvent, projects: &[Candidate]) -> Answer {
        let action_label = label_token(&event.action);
        let with_action = |mut answer: Answer| {
            answer.labels.1 = action_label.clone();
            answer
        };
        let Some(action) = Action::parse(&event.action) else {
            let message = format!("pull_request {} is ignored", event.action);
            return with_action(Answer::new(StatusCode::ACCEPTED, Outcome::Ignored, message));
        };
        let number = event.pull_request.number;
        let mut jobs = Vec::new();
        for candidate in projects {
            let trigger = &candidate.project.spec.trigger;
            let intent = match plan::intent(event, action, trigger) {
                Ok(Some(intent)) => intent,
                Ok(None) => continue,
                Err(err) => {
                    return with_action(Answer::bad_request(format!("the pull request cannot be previewed: {err}")));
                }
            };
            let key = Key {
                namespace: candidate.project.namespace().unwrap_or_default(),
                project: candidate.project.name_any(),
                number,
            };
            jobs.push((key, intent));
        }
        if jobs.is_empty() {
            let message = format!("pull_request {} changes no preview", event.action);
            return with_action(Answer::new(StatusCode::ACCEPTED, Outcome::Ignored, message));
        }
        if !self.deliveries.insert(delivery) {
            let message = "this delivery was accepted already; it is not done twice";
            return with_action(Answer::new(StatusCode::OK, Outcome::Duplicate, message));
        }
        let received_at = received_now();
        let mut planned = Vec::new();
        for (key, intent) in jobs {
            planned.push(Planned {
                namespace: key.namespace.clone(),
                name: names::environment_name(&key.project, key.number),
                intent: if matches!(intent, Intent::Preview(_)) { "preview" } else { "remove" },
                message: match &intent {
                    Intent::Preview(pr) => format!("preview {} at {}", pr.head_ref, pr.head_sha),
                    Intent::Remove { reason, .. } => reason.message().to_owned(),
                },
            });
            let job = Job {
                delivery: delivery.to_owned(),
                action,
                updated_at: event.pull_request.updated_at,
                received_at,
                intent,
                retry: None,
            };
            if let Err(Full) = self.queue.push(key, job) {
                self.deliveries.forget(delivery);
                let message = "too many pull requests wait to be written: redeliver this delivery later";
                return with_action(Answer::unavailable(message));
            }
        }
        self.metrics.queue_depth.set(self.queue.len() as i64);
        let mut answer = Answer::new(
            StatusCode::ACCEPTED,
            Outcome::Accepted,
            format!("pull_request {} of #{number} accepted; the Environments are written next", event.action),
        );
        answer.environments = planned;
        with_action(answer)
    }
}

/// Now, to the millisecond: when a delivery was received, as the Environment's
/// [`GITHUB_RECEIVED_AT`](stagely_api::keys::GITHUB_RECEIVED_AT) annotation says it.
fn received_now() -> k8s_openapi::jiff::Timestamp {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.round(k8s_openapi::jiff::Unit::Millisecond).unwrap_or(now)
}

/// A payload, as far as the receiver reads it.
enum Payload {
    /// A `pull_request` event.
    PullRequest(Box<PullRequestEvent>),
    /// Any other event: whom it is about.
    Other(Envelope),
}

/// The headers a delivery needs, each `None` when missing or unreadable.
struct Headers<'a> {
    event: Option<&'a str>,
    delivery: Option<&'a str>,
    signature: Option<&'a [u8]>,
}

impl<'a> Headers<'a> {
    fn read(headers: &'a HeaderMap) -> Self {
        let text = |name| headers.get(name).and_then(|value: &axum::http::HeaderValue| value.to_str().ok());
        Self {
            event: text(github::EVENT_HEADER).filter(|event| !event.is_empty()),
            delivery: text(github::DELIVERY_HEADER).filter(|id| github::valid_delivery_id(id)),
            signature: headers.get(github::SIGNATURE_HEADER).map(|value| value.as_bytes()),
        }
    }
}

/// The body, refused as soon as it grows over `limit` (or announces it will).
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Vec<u8>, Answer> {
    let too_large = || {
        Answer::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Outcome::TooLarge,
            format!("the body is over the receiver's limit of {limit} bytes (--max-body-bytes)"),
        )
    };
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::with_capacity(announced.map_or(16 * 1024, |length| length as usize));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| Answer::bad_request(format!("the body could not be read: {err}")))?;
            if bytes.len() + chunk.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(Answer::new(
            StatusCode::REQUEST_TIMEOUT,
            Outcome::Timeout,
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        )),
    }
}

/// `value` as a metric label if it looks like GitHub's event and action names (lowercase
/// letters and `_`, at most 40), else `other`: a label's values stay few.
fn label_token(value: &str) -> String {
    if !value.is_empty() && value.len() <= 40 && value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        value.to_owned()
    } else {
        "other".to_owned()
    }
}

fn project_list(projects: &[Candidate]) -> String {
    let names: Vec<String> = projects
        .iter()
        .map(|c| format!("Project {}/{}", c.project.namespace().unwrap_or_default(), c.project.name_any()))
        .collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_tokens_stay_few() {
        assert_eq!(label_token("pull_request"), "pull_request");
        assert_eq!(label_token("Pull-Request"), "other");
        assert_eq!(label_token(&"a".repeat(41)), "other");
        assert_eq!(label_token(""), "other");
    }
}
