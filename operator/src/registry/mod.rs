//! The image registry: short-lived, repository-scoped tokens for the distribution registry's `token`
//! auth, and merging per-platform images into one OCI image index.
//!
//! SKELETON: the signatures below are what the controllers call; the bodies are being written.

use std::time::Duration;

use stagely_api::protocol::RegistryAuth;
use stagely_api::v1alpha1::Platform;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Not written yet.
    #[error("failed to use the registry: {0}")]
    Other(String),
}

/// The registry the operator pushes images to and hands out credentials for. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Registry {
    host: String,
}

impl Registry {
    /// A registry without authentication at `host` (as image references name it).
    pub fn anonymous(host: impl Into<String>) -> Self {
        Self { host: host.into() }
    }

    /// The registry's host (and port), as image references name it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The repository of a service's images: `<namespace>/<project>/<service>`.
    pub fn repository(namespace: &str, project: &str, service: &str) -> String {
        format!("{namespace}/{project}/{service}")
    }

    /// `<host>/<repository>:<tag>`.
    pub fn reference(&self, repository: &str, tag: &str) -> String {
        format!("{}/{repository}:{tag}", self.host)
    }

    /// A credential that can push and pull `repository` only, for at most `ttl` (capped at one
    /// hour); `None` when the registry needs no authentication.
    pub fn push_credential(&self, _repository: &str, _ttl: Duration) -> Result<Option<RegistryAuth>, RegistryError> {
        Ok(None)
    }

    /// A credential that can pull `repositories` only, for at most `ttl` (capped at one hour);
    /// `None` when the registry needs no authentication.
    pub fn pull_credential(
        &self,
        _repositories: &[String],
        _ttl: Duration,
    ) -> Result<Option<RegistryAuth>, RegistryError> {
        Ok(None)
    }

    /// Tags `tag` in `repository` as an OCI image index of `manifests` (one per platform, by
    /// digest) and returns the index's digest.
    pub async fn merge_index(
        &self,
        _repository: &str,
        _tag: &str,
        _manifests: &[(Platform, String)],
    ) -> Result<String, RegistryError> {
        Err(RegistryError::Other("image index merge is not written yet".into()))
    }

    /// Deletes the manifest `reference` (a tag or a digest) of `repository`; one already gone is
    /// success.
    pub async fn delete(&self, _repository: &str, _reference: &str) -> Result<(), RegistryError> {
        Ok(())
    }

    /// The token endpoint (`GET /v1/registry/token`) the registry's `auth.token.realm` points at.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
    }
}
