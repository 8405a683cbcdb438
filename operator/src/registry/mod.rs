//! The image registry: short-lived, repository-scoped credentials and tokens for the
//! distribution registry's `token` auth, the token endpoint that exchanges one for the other,
//! and merging per-platform images into one OCI image index.
//!
//! How access flows: the operator signs a credential (the password of a [`RegistryAuth`])
//! naming the repositories and actions it grants and when it expires, and hands it to a builder
//! or preview over the agent's connection. `docker login` / `podman login` present it as Basic
//! auth to the token endpoint ([`Registry::router`], which the registry's `auth.token.realm`
//! names); the endpoint answers with a registry token allowing what the client asked for within
//! the grant. For its own calls (the index merge, deletes) the operator signs tokens directly.

mod config;
mod endpoint;
pub mod index;
pub mod token;

use std::sync::Arc;
use std::time::Duration;

use stagely_api::protocol::RegistryAuth;
use stagely_api::v1alpha1::Platform;

pub use self::config::RegistryConfig;
pub use self::endpoint::TOKEN_PATH;
use self::token::{Access, USERNAME};
pub use self::token::{SigningKey, TokenIssuer};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The signing key or its certificate is unusable.
    #[error("failed to load the registry signing key: {0}")]
    SigningKey(String),
    /// A configured file could not be read.
    #[error("failed to read {what} {path}: {source}")]
    ReadFile {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("failed to configure the registry: {0}")]
    Config(String),
    /// A repository name the registry would refuse.
    #[error("failed to issue a registry credential: `{0}` is not a repository name")]
    InvalidRepository(String),
    /// No randomness for a token id.
    #[error("failed to read random bytes for a registry token: {0}")]
    Random(#[source] std::io::Error),
    /// Signing a token or credential failed.
    #[error("failed to sign a registry token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
    /// The registry could not be reached.
    #[error("failed to {operation}: {message}")]
    Transport {
        /// What was being done, naming the object.
        operation: String,
        /// The cause (without the URL).
        message: String,
    },
    /// The registry answered with an error.
    #[error("failed to {operation}: the registry answered {status}: {message}")]
    Status {
        /// What was being done, naming the object.
        operation: String,
        /// The HTTP status.
        status: u16,
        /// The registry's error message.
        message: String,
    },
    /// The registry answered something unusable.
    #[error("failed to {operation}: {reason}")]
    Manifest {
        /// What was being done, naming the object.
        operation: String,
        /// What was wrong.
        reason: String,
    },
}

/// The registry the operator pushes images to and hands out credentials for. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    host: String,
    api_url: String,
    tokens: Option<TokenIssuer>,
    http: reqwest::Client,
}

impl Registry {
    /// A registry without authentication at `host` (as image references name it), its API at
    /// [`default_api_url`].
    pub fn anonymous(host: impl Into<String>) -> Self {
        let host = host.into();
        let api_url = default_api_url(&host);
        Self::new(host, api_url, None)
    }

    /// The registry at `host` (as image references name it) whose HTTP API is at `api_url`
    /// (e.g. `https://registry.stagely.svc:5000`), with token auth when `tokens` is set.
    pub fn new(host: impl Into<String>, api_url: impl Into<String>, tokens: Option<TokenIssuer>) -> Self {
        let http = reqwest::Client::builder()
            .user_agent(concat!("stagely-operator/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("the TLS backend is compiled in");
        let api_url = api_url.into().trim_end_matches('/').to_owned();
        Self { inner: Arc::new(Inner { host: host.into(), api_url, tokens, http }) }
    }

    /// The registry's host (and port), as image references name it.
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The base URL of the registry's HTTP API.
    pub fn api_url(&self) -> &str {
        &self.inner.api_url
    }

    /// The token signer, when the registry runs with token auth.
    pub fn tokens(&self) -> Option<&TokenIssuer> {
        self.inner.tokens.as_ref()
    }

    /// The repository of a service's images: `<namespace>/<project>/<service>`.
    pub fn repository(namespace: &str, project: &str, service: &str) -> String {
        format!("{namespace}/{project}/{service}")
    }

    /// `<host>/<repository>:<tag>`.
    pub fn reference(&self, repository: &str, tag: &str) -> String {
        format!("{}/{repository}:{tag}", self.inner.host)
    }

    /// A credential that can push and pull `repository` only, for at most `ttl` (capped at one
    /// hour); `None` when the registry needs no authentication.
    pub fn push_credential(&self, repository: &str, ttl: Duration) -> Result<Option<RegistryAuth>, RegistryError> {
        self.credential(&[repository], &["pull", "push"], ttl)
    }

    /// A credential that can pull `repositories` only, for at most `ttl` (capped at one hour);
    /// `None` when the registry needs no authentication.
    pub fn pull_credential(
        &self,
        repositories: &[String],
        ttl: Duration,
    ) -> Result<Option<RegistryAuth>, RegistryError> {
        let repositories: Vec<&str> = repositories.iter().map(String::as_str).collect();
        self.credential(&repositories, &["pull"], ttl)
    }

    fn credential(
        &self,
        repositories: &[&str],
        actions: &[&str],
        ttl: Duration,
    ) -> Result<Option<RegistryAuth>, RegistryError> {
        let Some(tokens) = &self.inner.tokens else { return Ok(None) };
        let mut grants = Vec::with_capacity(repositories.len());
        for repository in repositories {
            if !token::is_repository_name(repository) {
                return Err(RegistryError::InvalidRepository((*repository).to_owned()));
            }
            grants.push(Access::repository(repository, actions));
        }
        let credential = tokens.credential(grants, ttl)?;
        Ok(Some(RegistryAuth {
            server: self.inner.host.clone(),
            username: USERNAME.to_owned(),
            password: credential.token,
        }))
    }

    /// Tags `tag` in `repository` as an OCI image index of `manifests` (one per platform, by
    /// digest) and returns the index's digest.
    pub async fn merge_index(
        &self,
        repository: &str,
        tag: &str,
        manifests: &[(Platform, String)],
    ) -> Result<String, RegistryError> {
        index::merge(self, repository, tag, manifests).await
    }

    /// Deletes the manifest `reference` (a tag or a digest) of `repository`; one already gone is
    /// success.
    pub async fn delete(&self, repository: &str, reference: &str) -> Result<(), RegistryError> {
        index::delete(self, repository, reference).await
    }

    /// The token endpoint (`GET /v1/registry/token`) the registry's `auth.token.realm` points at.
    pub fn router(&self) -> axum::Router {
        endpoint::router(self.clone())
    }
}

/// The API URL of a registry that image references name `host`: `http://<host>` for loopback
/// hosts (`localhost`, `127.*`, `[::1]`), `https://<host>` otherwise.
pub fn default_api_url(host: &str) -> String {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let loopback =
        name == "localhost" || name == "::1" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let scheme = if loopback { "http" } else { "https" };
    format!("{scheme}://{host}")
}

#[cfg(test)]
mod tests {
    use stagely_testenv::registry::TokenKey;

    use super::*;

    fn with_tokens() -> Registry {
        let key = TokenKey::generate().unwrap();
        let signing = SigningKey::from_pem(key.key_pem.as_bytes(), key.cert_pem.as_bytes()).unwrap();
        Registry::new("127.0.0.1:5000", "http://127.0.0.1:5000", Some(TokenIssuer::new(signing, "stagely", "reg")))
    }

    #[test]
    fn api_url_defaults_to_http_only_on_loopback() {
        assert_eq!(default_api_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(default_api_url("localhost:5000"), "http://localhost:5000");
        assert_eq!(default_api_url("[::1]:5000"), "http://[::1]:5000");
        assert_eq!(default_api_url("registry.example.com"), "https://registry.example.com");
        assert_eq!(default_api_url("registry.stagely.svc:5000"), "https://registry.stagely.svc:5000");
        assert_eq!(default_api_url("10.0.0.1:5000"), "https://10.0.0.1:5000");
    }

    #[test]
    fn anonymous_registries_hand_out_no_credentials() {
        let registry = Registry::anonymous("127.0.0.1:5000");
        assert_eq!(registry.push_credential("a/b/c", Duration::from_secs(60)).unwrap(), None);
        assert_eq!(registry.pull_credential(&["a/b/c".into()], Duration::from_secs(60)).unwrap(), None);
        assert_eq!(registry.api_url(), "http://127.0.0.1:5000");
    }

    #[test]
    fn credentials_grant_their_repositories_for_at_most_an_hour() {
        let registry = with_tokens();
        let tokens = registry.tokens().unwrap();
        let push = registry.push_credential("team-a/shop/web", Duration::from_secs(86_400)).unwrap().unwrap();
        assert_eq!((push.server.as_str(), push.username.as_str()), ("127.0.0.1:5000", USERNAME));
        let claims = tokens.verify_credential(push.password.expose()).unwrap();
        assert_eq!(claims.grants, vec![Access::repository("team-a/shop/web", &["pull", "push"])]);
        assert!(claims.exp <= claims.iat + 3600);

        let repos = vec!["team-a/shop/web".to_owned(), "team-a/shop/api".to_owned()];
        let pull = registry.pull_credential(&repos, Duration::from_secs(600)).unwrap().unwrap();
        let claims = tokens.verify_credential(pull.password.expose()).unwrap();
        assert_eq!(
            claims.grants,
            vec![Access::repository("team-a/shop/web", &["pull"]), Access::repository("team-a/shop/api", &["pull"])]
        );
        assert_eq!(claims.exp, claims.iat + 600);

        let err = registry.push_credential("Team-A/../x", Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, RegistryError::InvalidRepository(_)), "{err}");
    }

    #[test]
    fn debug_of_credentials_shows_no_secret() {
        let registry = with_tokens();
        let auth = registry.push_credential("team-a/shop/web", Duration::from_secs(60)).unwrap().unwrap();
        let secret = auth.password.expose().to_owned();
        for text in [format!("{auth:?}"), format!("{registry:?}"), format!("{:?}", auth.password)] {
            assert!(!text.contains(&secret), "{text}");
            // Not even a piece of the signature.
            assert!(!text.contains(secret.rsplit('.').next().unwrap()), "{text}");
        }
        assert!(format!("{auth:?}").contains("redacted"));
    }
}
