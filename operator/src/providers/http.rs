//! The JSON-over-HTTPS client DigitalOcean and Hetzner share: bearer auth, retries on 429 that
//! honour the provider's wait, and API errors mapped to [`ProviderError`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{AUTHORIZATION, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use stagely_api::backoff::Backoff;
use stagely_api::protocol::Sensitive;

use super::ProviderError;

/// How long and how often to wait out a provider's throttling.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// The longest single wait, whatever the provider asks for.
    pub max_delay: Duration,
    /// The first wait when the provider names none; it grows on each retry ([`Backoff`]).
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 5, max_delay: Duration::from_secs(30), base_delay: Duration::from_secs(1) }
    }
}

/// A client for one provider's REST API.
#[derive(Debug)]
pub(crate) struct JsonApi {
    client: reqwest::Client,
    provider: &'static str,
    base_url: String,
    token: Sensitive,
    retry: RetryPolicy,
}

impl JsonApi {
    /// A client sending `token` as a bearer token to `base_url` (no trailing slash).
    pub(crate) fn new(provider: &'static str, base_url: &str, token: Sensitive, retry: RetryPolicy) -> Self {
        let client = reqwest::Client::builder()
            .user_agent(concat!("stagely-operator/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("the TLS backend is compiled in");
        Self { client, provider, base_url: base_url.trim_end_matches('/').to_owned(), token, retry }
    }

    /// Sends one call and decodes the answer. `Ok(None)` means 404: the resource does not exist.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<Option<T>, ProviderError> {
        let url = format!("{}{path}", self.base_url);
        let mut attempt = 1;
        let mut backoff = Backoff::new(self.retry.base_delay, self.retry.max_delay);
        loop {
            let mut request = self
                .client
                .request(method.clone(), &url)
                .header(AUTHORIZATION, format!("Bearer {}", self.token.expose()));
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|err| self.transport(&method, path, err))?;
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                if attempt >= self.retry.max_attempts {
                    tracing::warn!(provider = self.provider, %method, path, attempt, "still throttled; giving up");
                    return Err(ProviderError::Throttled { provider: self.provider });
                }
                let wait = throttle_delay(response.headers(), &self.retry, &mut backoff);
                tracing::info!(provider = self.provider, %method, path, attempt, ?wait, "throttled; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
                continue;
            }
            let bytes = response.bytes().await.map_err(|err| self.transport(&method, path, err))?;
            if status == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(self.api_error(status, &bytes));
            }
            let text: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(text).map(Some).map_err(|err| ProviderError::Api {
                provider: self.provider,
                code: status.as_u16().to_string(),
                message: format!("failed to read the answer to {method} {path}: {err}"),
            });
        }
    }

    /// A GET whose resource must exist.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, ProviderError> {
        self.call(Method::GET, path, query, None).await?.ok_or_else(|| self.not_found(path))
    }

    /// The error for a resource that should exist and does not.
    pub(crate) fn not_found(&self, path: &str) -> ProviderError {
        ProviderError::Api { provider: self.provider, code: "404".into(), message: format!("{path} was not found") }
    }

    fn transport(&self, method: &Method, path: &str, err: reqwest::Error) -> ProviderError {
        // Without the URL: the base may be an internal address; the path says enough.
        let cause = std::error::Error::source(&err).map(|s| format!(": {s}")).unwrap_or_default();
        ProviderError::Transport {
            provider: self.provider,
            message: format!("{method} {path}: {}{cause}", err.without_url()),
        }
    }

    fn api_error(&self, status: StatusCode, body: &[u8]) -> ProviderError {
        let (code, message) = error_text(body);
        let code = code.unwrap_or_else(|| status.as_u16().to_string());
        let message = message.unwrap_or_else(|| status.canonical_reason().unwrap_or("no message").to_owned());
        if status == StatusCode::UNAUTHORIZED {
            return ProviderError::InvalidCredentials { provider: self.provider, reason: message };
        }
        ProviderError::Api { provider: self.provider, code, message }
    }
}

/// The error code and message from the error shapes these APIs use: Hetzner's
/// `{"error": {"code", "message"}}`, DigitalOcean's `{"id", "message"}`, and an RFC 7807 problem
/// (`title`, `detail`, and Prism's `validation` list).
fn error_text(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        let text = String::from_utf8_lossy(body).trim().chars().take(300).collect::<String>();
        return (None, (!text.is_empty()).then_some(text));
    };
    let text = |v: &serde_json::Value, key: &str| v.get(key).and_then(|s| s.as_str()).map(str::to_owned);
    if let Some(error) = value.get("error").filter(|e| e.is_object()) {
        return (text(error, "code"), text(error, "message"));
    }
    if value.get("message").is_some() {
        return (text(&value, "id"), text(&value, "message"));
    }
    let mut message = [text(&value, "title"), text(&value, "detail")].into_iter().flatten().collect::<Vec<_>>();
    if let Some(violations) = value.get("validation").and_then(|v| v.as_array()) {
        message.extend(violations.iter().filter_map(|v| text(v, "message")));
    }
    (None, (!message.is_empty()).then(|| message.join("; ")))
}

/// How long to wait before the next retry: `Retry-After` (seconds or an HTTP date), else
/// `RateLimit-Reset` (a Unix time, as both providers send it), else `backoff`'s next delay; capped.
fn throttle_delay(headers: &HeaderMap, policy: &RetryPolicy, backoff: &mut Backoff) -> Duration {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let now = SystemTime::now();
    let asked = header(RETRY_AFTER.as_str())
        .and_then(|v| v.parse::<u64>().ok().map(Duration::from_secs).or_else(|| httpdate_delay(v, now)))
        .or_else(|| {
            let reset = header("ratelimit-reset")?.parse::<u64>().ok()?;
            let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
            Some(Duration::from_secs(reset.saturating_sub(now)))
        });
    asked.unwrap_or_else(|| backoff.next_delay()).min(policy.max_delay)
}

/// The wait until an HTTP date such as `Wed, 21 Oct 2015 07:28:00 GMT`.
fn httpdate_delay(value: &str, now: SystemTime) -> Option<Duration> {
    let at = stagely_api::k8s_openapi::jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    Some(SystemTime::from(at).duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_reads_both_providers_and_prism() {
        assert_eq!(
            error_text(br#"{"error":{"code":"uniqueness_error","message":"server name is already used"}}"#),
            (Some("uniqueness_error".into()), Some("server name is already used".into()))
        );
        assert_eq!(
            error_text(br#"{"id":"Unauthorized","message":"Unable to authenticate you"}"#),
            (Some("Unauthorized".into()), Some("Unable to authenticate you".into()))
        );
        let (code, message) = error_text(
            br#"{"title":"Request/Response not valid","detail":"d","validation":[{"message":"must have required property 'x'"}]}"#,
        );
        assert_eq!(code, None);
        assert_eq!(message.unwrap(), "Request/Response not valid; d; must have required property 'x'");
        assert_eq!(error_text(b"upstream down"), (None, Some("upstream down".into())));
    }

    #[test]
    fn throttling_waits_as_asked_within_the_cap() {
        let policy =
            RetryPolicy { max_attempts: 3, max_delay: Duration::from_secs(10), base_delay: Duration::from_secs(1) };
        let mut backoff = Backoff::new(policy.base_delay, policy.max_delay);
        let mut headers = HeaderMap::new();
        let first = throttle_delay(&headers, &policy, &mut backoff);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1), "{first:?}");
        throttle_delay(&headers, &policy, &mut backoff);
        let third = throttle_delay(&headers, &policy, &mut backoff);
        assert!(
            third >= Duration::from_secs(2) && third <= Duration::from_secs(4),
            "exponential without a hint: {third:?}"
        );
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(throttle_delay(&headers, &policy, &mut backoff), Duration::from_secs(7));
        headers.insert(RETRY_AFTER, "3600".parse().unwrap());
        assert_eq!(throttle_delay(&headers, &policy, &mut backoff), Duration::from_secs(10), "capped");
        headers.remove(RETRY_AFTER);
        let reset = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 5;
        headers.insert("ratelimit-reset", reset.to_string().parse().unwrap());
        let wait = throttle_delay(&headers, &policy, &mut backoff);
        assert!(wait <= Duration::from_secs(5) && wait >= Duration::from_secs(4), "{wait:?}");
        headers.remove("ratelimit-reset");
        headers.insert(RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(throttle_delay(&headers, &policy, &mut backoff), Duration::ZERO, "a date in the past: go now");
    }
}
