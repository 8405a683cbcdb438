//! Multi-platform images: one OCI image index over the per-platform manifests the builders
//! pushed, written through the distribution HTTP API; and deleting manifests on teardown.

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stagely_api::protocol::Sensitive;
use stagely_api::v1alpha1::Platform;

use super::token::{Access, is_repository_name, unix_now};
use super::{Registry, RegistryError};

/// An OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// A Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// An OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// A Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest type the operator reads.
const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, \
                          application/vnd.docker.distribution.manifest.v2+json, \
                          application/vnd.oci.image.index.v1+json, \
                          application/vnd.docker.distribution.manifest.list.v2+json";

/// Who the operator's own registry tokens are for.
const OPERATOR_SUBJECT: &str = "stagely-operator";

/// How long the operator's own registry tokens live (one merge or delete).
const OPERATOR_TOKEN_SECS: u64 = 300;

/// An OCI image index.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// [`OCI_INDEX`].
    pub media_type: String,
    /// One per platform.
    pub manifests: Vec<Descriptor>,
}

/// A manifest in an index.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The manifest's media type.
    pub media_type: String,
    /// `sha256:…` of its bytes.
    pub digest: String,
    /// Its length in bytes.
    pub size: u64,
    /// What it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<OciPlatform>,
}

/// The platform of a manifest in an index.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
pub struct OciPlatform {
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// Operating system, e.g. `linux`.
    pub os: String,
}

impl From<Platform> for OciPlatform {
    fn from(platform: Platform) -> Self {
        Self { architecture: platform.arch().to_owned(), os: "linux".to_owned() }
    }
}

/// Just the media type of a manifest or index (a Docker schema 2 manifest always names it;
/// an OCI one should).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Peek {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn is_digest(reference: &str) -> bool {
    reference
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

fn is_tag(reference: &str) -> bool {
    let bytes = reference.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_reference(operation: &str, repository: &str, reference: &str) -> Result<(), RegistryError> {
    let reason = if !is_repository_name(repository) {
        format!("`{repository}` is not a repository name")
    } else if !is_tag(reference) && !is_digest(reference) {
        format!("`{reference}` is neither a tag nor a sha256 digest")
    } else {
        return Ok(());
    };
    Err(RegistryError::Manifest { operation: operation.to_owned(), reason })
}

/// One repository's manifests, with a token for the operator's own calls on it.
struct Manifests<'a> {
    registry: &'a Registry,
    repository: &'a str,
    token: Option<Sensitive>,
}

impl<'a> Manifests<'a> {
    fn new(registry: &'a Registry, repository: &'a str, actions: &[&str]) -> Result<Self, RegistryError> {
        let token = match registry.tokens() {
            Some(tokens) => {
                let access = vec![Access::repository(repository, actions)];
                Some(tokens.token(OPERATOR_SUBJECT, access, unix_now() + OPERATOR_TOKEN_SECS)?.token)
            }
            None => None,
        };
        Ok(Self { registry, repository, token })
    }

    fn request(&self, method: Method, reference: &str) -> RequestBuilder {
        let url = format!("{}/v2/{}/manifests/{reference}", self.registry.api_url(), self.repository);
        let mut request = self.registry.inner.http.request(method, url);
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        request
    }

    async fn send(
        &self,
        operation: &str,
        request: RequestBuilder,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), RegistryError> {
        let transport = |err: reqwest::Error| {
            let cause = std::error::Error::source(&err).map(|s| format!(": {s}")).unwrap_or_default();
            RegistryError::Transport {
                operation: operation.to_owned(),
                message: format!("{}{cause}", err.without_url()),
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(transport)?;
        Ok((status, headers, body.to_vec()))
    }
}

/// The registry's `{"errors": [{"code", "message"}]}`, or the start of whatever it said.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(errors) = serde_json::from_slice::<Errors>(body)
        && !errors.errors.is_empty()
    {
        return errors.errors.iter().map(|e| format!("{} ({})", e.message, e.code)).collect::<Vec<_>>().join("; ");
    }
    let text = String::from_utf8_lossy(body);
    text.trim().chars().take(200).collect()
}

fn status_error(operation: &str, status: StatusCode, body: &[u8]) -> RegistryError {
    RegistryError::Status { operation: operation.to_owned(), status: status.as_u16(), message: error_message(body) }
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or(value).trim().to_owned())
}

/// The descriptor of `digest`'s manifest for `platform`: the manifest itself, or when `digest`
/// is an index (a builder that pushes attestations alongside), its entry for that platform.
async fn descriptor(manifests: &Manifests<'_>, platform: Platform, digest: &str) -> Result<Descriptor, RegistryError> {
    let operation = format!("read manifest {}@{digest}", manifests.repository);
    check_reference(&operation, manifests.repository, digest)?;
    if !is_digest(digest) {
        return Err(RegistryError::Manifest { operation, reason: format!("`{digest}` is not a sha256 digest") });
    }
    let request = manifests.request(Method::GET, digest).header(ACCEPT, ACCEPT_ALL);
    let (status, headers, body) = manifests.send(&operation, request).await?;
    if status != StatusCode::OK {
        return Err(status_error(&operation, status, &body));
    }
    let served = sha256_digest(&body);
    if served != digest {
        return Err(RegistryError::Manifest {
            operation,
            reason: format!("the registry served bytes of digest {served}"),
        });
    }
    let peek: Peek = serde_json::from_slice(&body)
        .map_err(|err| RegistryError::Manifest { operation: operation.clone(), reason: format!("not JSON: {err}") })?;
    let media = media_type(&headers).filter(|m| !m.is_empty() && m != "application/json").or(peek.media_type);
    let wanted = OciPlatform::from(platform);
    match media.as_deref() {
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => Ok(Descriptor {
            media_type: media.unwrap_or_default(),
            digest: digest.to_owned(),
            size: body.len() as u64,
            platform: Some(wanted),
        }),
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => peek
            .manifests
            .into_iter()
            .find(|m| {
                matches!(m.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST)
                    && m.platform.as_ref().is_some_and(|p| p.os == wanted.os && p.architecture == wanted.architecture)
            })
            .map(|m| Descriptor { platform: Some(wanted.clone()), ..m })
            .ok_or_else(|| RegistryError::Manifest {
                operation,
                reason: format!("the index lists no manifest for {platform}"),
            }),
        other => Err(RegistryError::Manifest {
            operation,
            reason: format!("unexpected media type {}", other.unwrap_or("(none)")),
        }),
    }
}

/// The bytes of the index over `descriptors`.
pub fn index_bytes(descriptors: Vec<Descriptor>) -> Vec<u8> {
    let index = ImageIndex { schema_version: 2, media_type: OCI_INDEX.to_owned(), manifests: descriptors };
    serde_json::to_vec(&index).expect("an image index serializes")
}

pub(super) async fn merge(
    registry: &Registry,
    repository: &str,
    tag: &str,
    platforms: &[(Platform, String)],
) -> Result<String, RegistryError> {
    let operation = format!("tag {repository}:{tag} as an image index");
    check_reference(&operation, repository, tag)?;
    if platforms.is_empty() {
        return Err(RegistryError::Manifest { operation, reason: "no manifests to merge".into() });
    }
    let manifests = Manifests::new(registry, repository, &["pull", "push"])?;
    let mut descriptors = Vec::with_capacity(platforms.len());
    for (platform, digest) in platforms {
        descriptors.push(descriptor(&manifests, *platform, digest).await?);
    }
    let body = index_bytes(descriptors);
    let digest = sha256_digest(&body);
    let request = manifests.request(Method::PUT, tag).header(CONTENT_TYPE, OCI_INDEX).body(body);
    let (status, headers, answer) = manifests.send(&operation, request).await?;
    if !status.is_success() {
        return Err(status_error(&operation, status, &answer));
    }
    let stored = headers.get("docker-content-digest").and_then(|v| v.to_str().ok()).unwrap_or("(none)");
    if stored != digest {
        return Err(RegistryError::Manifest {
            operation,
            reason: format!("the registry stored digest {stored}, the index sent is {digest}"),
        });
    }
    tracing::info!(repository, tag, %digest, platforms = platforms.len(), "image index pushed");
    Ok(digest)
}

pub(super) async fn delete(registry: &Registry, repository: &str, reference: &str) -> Result<(), RegistryError> {
    let operation = format!("delete manifest {repository}:{reference}");
    check_reference(&operation, repository, reference)?;
    let manifests = Manifests::new(registry, repository, &["pull", "delete"])?;
    let digest = if is_digest(reference) {
        reference.to_owned()
    } else {
        let request = manifests.request(Method::HEAD, reference).header(ACCEPT, ACCEPT_ALL);
        let (status, headers, body) = manifests.send(&operation, request).await?;
        match status {
            StatusCode::NOT_FOUND => return Ok(()),
            StatusCode::OK => {}
            _ => return Err(status_error(&operation, status, &body)),
        }
        let digest = headers.get("docker-content-digest").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !is_digest(digest) {
            return Err(RegistryError::Manifest {
                operation,
                reason: "the registry named no digest for the tag".into(),
            });
        }
        digest.to_owned()
    };
    let (status, _, body) = manifests.send(&operation, manifests.request(Method::DELETE, &digest)).await?;
    match status {
        StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NOT_FOUND => {
            tracing::info!(repository, reference, %digest, "manifest deleted");
            Ok(())
        }
        StatusCode::METHOD_NOT_ALLOWED => Err(RegistryError::Status {
            operation,
            status: status.as_u16(),
            message: "the registry does not allow deletes (set storage.delete.enabled)".into(),
        }),
        _ => Err(status_error(&operation, status, &body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_checked() {
        let digest = format!("sha256:{}", "a".repeat(64));
        assert!(is_digest(&digest));
        assert!(!is_digest("sha256:abc") && !is_digest(&format!("sha512:{}", "a".repeat(64))));
        assert!(is_tag("0123abc-amd64") && is_tag("v1.2_3") && !is_tag("-x") && !is_tag("a/b") && !is_tag(""));
        assert!(check_reference("x", "team-a/shop/web", &digest).is_ok());
        assert!(check_reference("x", "team-a/shop/web", "../../x").is_err());
        assert!(check_reference("x", "Team/x", "latest").is_err());
    }

    #[test]
    fn the_index_is_an_oci_index_with_one_platform_per_manifest() {
        let bytes = index_bytes(vec![Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: "sha256:00".into(),
            size: 7,
            platform: Some(Platform::LinuxArm64.into()),
        }]);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:00", "size": 7,
                               "platform": {"architecture": "arm64", "os": "linux"}}],
            })
        );
        assert_eq!(sha256_digest(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn registry_errors_are_read() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(error_message(body), "manifest unknown (MANIFEST_UNKNOWN)");
        assert_eq!(error_message(b"  plain  "), "plain");
    }
}
