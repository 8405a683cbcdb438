//! What the receiver reads from GitHub's webhooks: the headers, the signature, and the few
//! fields of a payload it acts on (GitHub sends many more; they are skipped).

use std::borrow::Cow;

use axum::http;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;
pub use stagely_api::pull_request::{Account, Branch, GitHubPullRequest, Label, Repository};

/// Header: the event's name (`pull_request`, `ping`, `push`, …).
pub const EVENT_HEADER: &str = "x-github-event";
/// Header: the delivery's id; a redelivery keeps it.
pub const DELIVERY_HEADER: &str = "x-github-delivery";
/// Header: `sha256=` and the hex HMAC-SHA256 of the body under the webhook secret.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// Longest delivery id accepted (GitHub's are 36-character GUIDs).
const MAX_DELIVERY_ID: usize = 100;

/// A signature header that is not `sha256=` and 64 hex digits.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedSignature;

/// The HMAC-SHA256 `X-Hub-Signature-256` carries.
#[derive(Debug, PartialEq, Eq)]
pub struct Signature([u8; 32]);

impl Signature {
    /// Parses `sha256=<64 hex digits>`.
    pub fn parse(header: &[u8]) -> Result<Self, MalformedSignature> {
        let hex = header.strip_prefix(b"sha256=").ok_or(MalformedSignature)?;
        if hex.len() != 64 {
            return Err(MalformedSignature);
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            *byte =
                (hex_digit(pair[0]).ok_or(MalformedSignature)? << 4) | hex_digit(pair[1]).ok_or(MalformedSignature)?;
        }
        Ok(Self(bytes))
    }

    /// Whether this is the signature of `body` under `secret`, compared in constant time.
    pub fn verifies(&self, secret: &[u8], body: &[u8]) -> bool {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
        mac.update(body);
        mac.verify_slice(&self.0).is_ok()
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `X-Hub-Signature-256` of `body` under `secret`, as GitHub sends it (for tests, the
/// benchmark and the demo's tooling).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in tag {
        out.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    out
}

/// Whether `id` can be a delivery id: 1 to 100 printable ASCII characters.
pub fn valid_delivery_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_DELIVERY_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The JSON payload of a delivery: the body itself, or, when the webhook's content type is
/// `application/x-www-form-urlencoded` (GitHub's default), the body's `payload` field.
pub fn payload<'a>(headers: &http::HeaderMap, body: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
    let form = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return Ok(Cow::Borrowed(body));
    }
    form_urlencoded::parse(body)
        .find(|(name, _)| name == "payload")
        .map(|(_, payload)| Cow::Owned(payload.into_owned().into_bytes()))
        .ok_or_else(|| "the form-encoded body has no payload field".to_owned())
}

/// What the receiver reads of any payload before it can check the signature: which repository
/// (or, for an organization's webhook without one, which organization) it is about.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    /// The repository, absent from an organization webhook's `ping`.
    #[serde(default)]
    pub repository: Option<Repository>,
    /// The organization, for a repository of one or an organization's webhook.
    #[serde(default)]
    pub organization: Option<Account>,
}

/// A `pull_request` event.
#[derive(Debug, Deserialize)]
pub struct PullRequestEvent {
    /// `opened`, `synchronize`, `closed`, …
    pub action: String,
    /// The pull request as it is after the action.
    pub pull_request: GitHubPullRequest,
    /// The repository the pull request merges into.
    pub repository: Repository,
    /// For `edited`: what changed.
    #[serde(default)]
    pub changes: Option<Changes>,
    /// For `labeled` and `unlabeled`: the label added or removed.
    #[serde(default)]
    pub label: Option<Label>,
}

/// What an `edited` event changed; only a base change matters.
#[derive(Debug, Deserialize)]
pub struct Changes {
    /// Present when the base branch changed.
    #[serde(default)]
    pub base: Option<serde::de::IgnoredAny>,
}

/// Reads `T` from `body`, naming the field at fault: `pull_request.head.sha: invalid type: …`.
pub fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    // Tracking the path costs a few percent of the receiver's CPU: only a failure pays for it.
    serde_json::from_slice(body).or_else(|_| {
        let mut json = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut json).map_err(|err| {
            let path = err.path().to_string();
            if path == "." { err.into_inner().to_string() } else { format!("{path}: {}", err.into_inner()) }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_with_the_right_secret_and_body() {
        let header = sign(b"It's a Secret to Everybody", b"Hello, World!");
        // GitHub's documented example (docs: "Validating webhook deliveries").
        assert_eq!(header, "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17");
        let signature = Signature::parse(header.as_bytes()).unwrap();
        assert!(signature.verifies(b"It's a Secret to Everybody", b"Hello, World!"));
        assert!(!signature.verifies(b"another secret", b"Hello, World!"));
        assert!(!signature.verifies(b"It's a Secret to Everybody", b"Hello, World?"));
        assert!(Signature::parse(header.to_uppercase().replace("SHA256", "sha256").as_bytes()).is_ok());
        for bad in ["", "sha256=", "sha1=757107ea", &header[..70], &format!("{header}0"), &header.replace('7', "g")] {
            assert_eq!(Signature::parse(bad.as_bytes()), Err(MalformedSignature), "{bad}");
        }
    }

    #[test]
    fn parse_errors_name_the_field() {
        let err = parse::<PullRequestEvent>(br#"{"action": "opened", "pull_request": {"number": "7"}}"#).unwrap_err();
        assert!(err.starts_with("pull_request.number: invalid type: string \"7\", expected i64"), "{err}");
        let err = parse::<Envelope>(b"{\"repository\": ").unwrap_err();
        assert!(err.contains("EOF while parsing"), "{err}");
    }

    #[test]
    fn form_encoded_deliveries_carry_the_json_in_payload() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(payload(&headers, b"{}").unwrap().as_ref(), b"{}");
        headers.insert(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded".parse().unwrap());
        let body = b"payload=%7B%22zen%22%3A%22a+b%22%7D";
        assert_eq!(payload(&headers, body).unwrap().as_ref(), br#"{"zen":"a b"}"#);
        assert_eq!(payload(&headers, b"other=1").unwrap_err(), "the form-encoded body has no payload field");
    }

    #[test]
    fn delivery_ids_are_bounded_printable_text() {
        assert!(valid_delivery_id("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        assert!(!valid_delivery_id(""));
        assert!(!valid_delivery_id("a b"));
        assert!(!valid_delivery_id(&"a".repeat(101)));
    }
}
