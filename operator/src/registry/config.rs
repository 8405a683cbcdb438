//! The registry's command-line and environment configuration.

use std::path::{Path, PathBuf};

use super::token::{SigningKey, TokenIssuer};
use super::{Registry, RegistryError, default_api_url};

/// Where images go and how the operator signs access to them.
///
/// With `--registry` unset the operator knows no registry. With it set and no
/// `--registry-token-key-file`, the registry is used without authentication (a registry only the
/// cluster and the VMs can reach, or a demo). With a key file, the registry runs distribution's
/// `token` auth and trusts the key's certificate: its config has
///
/// ```yaml
/// auth:
///   token:
///     realm: https://<the agent gateway's address>/v1/registry/token
///     service: stagely-registry        # --registry-token-service
///     issuer: stagely                  # --registry-token-issuer
///     rootcertbundle: /etc/registry/token.crt   # the key's certificate
/// ```
#[derive(clap::Args, Debug, Clone)]
pub struct RegistryConfig {
    /// The registry's host (and port) as image references name it, e.g. `127.0.0.1:5000` or
    /// `registry.example.com`: images are pushed to `<registry>/<namespace>/<project>/<service>`,
    /// and builders and previews log in to it. Unset: no registry.
    #[arg(long = "registry", env = "STAGELY_REGISTRY")]
    pub registry: Option<String>,

    /// Base URL of the registry's HTTP API for the operator's own calls (image index merge,
    /// tag deletion), when it differs from the host images name (e.g. an in-cluster Service).
    /// Default: `https://<registry>`, or `http://<registry>` for loopback hosts.
    #[arg(long, env = "STAGELY_REGISTRY_URL")]
    pub registry_url: Option<String>,

    /// PEM file holding the registry token signing key: ECDSA P-256, PKCS#8 (`PRIVATE KEY`) or
    /// SEC1 (`EC PRIVATE KEY`). Its certificate is in the registry's `auth.token.rootcertbundle`.
    /// Unset: the registry runs without authentication and no credentials are handed out.
    #[arg(long, env = "STAGELY_REGISTRY_TOKEN_KEY_FILE")]
    pub registry_token_key_file: Option<PathBuf>,

    /// PEM file holding the key's certificate (and any intermediates, leaf first), sent with each
    /// token for the registry to check against its root bundle. Default: the certificates in the
    /// key file (a Kubernetes TLS Secret mounts `tls.key` and `tls.crt`: name both).
    #[arg(long, env = "STAGELY_REGISTRY_TOKEN_CERT_FILE")]
    pub registry_token_cert_file: Option<PathBuf>,

    /// The issuer registry tokens name; the registry's `auth.token.issuer`.
    #[arg(long, env = "STAGELY_REGISTRY_TOKEN_ISSUER", default_value = "stagely")]
    pub registry_token_issuer: String,

    /// The service registry tokens are for; the registry's `auth.token.service`. The token
    /// endpoint refuses requests for any other.
    #[arg(long, env = "STAGELY_REGISTRY_TOKEN_SERVICE", default_value = "stagely-registry")]
    pub registry_token_service: String,
}

impl RegistryConfig {
    /// The registry this configuration names: `None` without `--registry`; anonymous without a
    /// key file; with token auth otherwise.
    pub fn build(&self) -> Result<Option<Registry>, RegistryError> {
        let Some(host) = self.registry.as_deref().map(str::trim).filter(|h| !h.is_empty()) else {
            if self.registry_token_key_file.is_some() {
                return Err(RegistryError::Config("--registry-token-key-file needs --registry".into()));
            }
            return Ok(None);
        };
        if host.contains('/') {
            return Err(RegistryError::Config(format!(
                "--registry is a host[:port] as image references name it, not a URL: {host:?}"
            )));
        }
        let api_url = self.registry_url.clone().unwrap_or_else(|| default_api_url(host));
        let tokens = match &self.registry_token_key_file {
            None => {
                if self.registry_token_cert_file.is_some() {
                    return Err(RegistryError::Config(
                        "--registry-token-cert-file needs --registry-token-key-file".into(),
                    ));
                }
                None
            }
            Some(key_path) => {
                let key = read("registry token key file", key_path)?;
                let cert = match &self.registry_token_cert_file {
                    Some(cert_path) => read("registry token certificate file", cert_path)?,
                    None => key.clone(),
                };
                let key = SigningKey::from_pem(&key, &cert)?;
                Some(TokenIssuer::new(key, &self.registry_token_issuer, &self.registry_token_service))
            }
        };
        Ok(Some(Registry::new(host, api_url, tokens)))
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|source| RegistryError::ReadFile { what, path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use stagely_testenv::registry::TokenKey;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        registry: RegistryConfig,
    }

    fn parse(args: &[&str]) -> RegistryConfig {
        Cli::try_parse_from(std::iter::once("operator").chain(args.iter().copied())).unwrap().registry
    }

    #[test]
    fn no_registry_without_the_flag() {
        assert!(parse(&[]).build().unwrap().is_none());
        assert!(parse(&["--registry-token-key-file", "/x"]).build().is_err());
    }

    #[test]
    fn anonymous_without_a_key() {
        let registry = parse(&["--registry", "127.0.0.1:5000"]).build().unwrap().unwrap();
        assert_eq!((registry.host(), registry.api_url()), ("127.0.0.1:5000", "http://127.0.0.1:5000"));
        assert!(registry.tokens().is_none());
        let registry = parse(&["--registry", "reg.example.com", "--registry-url", "http://registry.stagely:5000/"])
            .build()
            .unwrap();
        assert_eq!(registry.unwrap().api_url(), "http://registry.stagely:5000");
        assert!(parse(&["--registry", "https://reg.example.com"]).build().is_err());
    }

    #[test]
    fn token_auth_with_a_key_and_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let key = TokenKey::generate().unwrap();
        let (key_file, cert_file) = (dir.path().join("tls.key"), dir.path().join("tls.crt"));
        std::fs::write(&key_file, &key.key_pem).unwrap();
        std::fs::write(&cert_file, &key.cert_pem).unwrap();
        let config = parse(&[
            "--registry",
            "reg.example.com",
            "--registry-token-key-file",
            key_file.to_str().unwrap(),
            "--registry-token-cert-file",
            cert_file.to_str().unwrap(),
            "--registry-token-service",
            "svc",
        ]);
        assert_eq!(config.registry_token_issuer, "stagely");
        let registry = config.build().unwrap().unwrap();
        assert_eq!(registry.api_url(), "https://reg.example.com");
        assert_eq!(registry.tokens().unwrap().service(), "svc");

        // Without a certificate file, the key file must hold the certificate.
        let config = parse(&["--registry", "r:5000", "--registry-token-key-file", key_file.to_str().unwrap()]);
        assert!(config.build().unwrap_err().to_string().contains("no CERTIFICATE"));
        let missing = parse(&["--registry", "r:5000", "--registry-token-key-file", "/nonexistent/key"]);
        assert!(missing.build().unwrap_err().to_string().contains("/nonexistent/key"));
    }
}
