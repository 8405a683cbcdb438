//! The gateway's command-line and environment configuration, and starting it from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stagely_api::protocol::Sensitive;
use stagely_api::tls::{CertStore, TlsError};

use super::objects::KubeObjects;
use super::token::SigningKey;
use super::{Gateway, GatewayError, Settings};

/// How the agent gateway is configured.
///
/// The token signing key comes from `--gateway-signing-key-file` (the file's bytes, at least
/// 32) or else `STAGELY_GATEWAY_SIGNING_KEY` (the string's bytes). Without either, a random key is
/// generated with a warning: every token then dies with the process, so agents must re-enroll
/// after a restart, which they cannot. Production sets a key from a Secret.
///
/// With `--gateway-tls-cert` and `--gateway-tls-key` the gateway serves `wss://`; without them,
/// plain `ws://`, which only agents configured `insecure` (the `local` provider's) accept.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayConfig {
    /// Address of the agent gateway (WebSocket at /v1/agent/connect, job logs at /v1/jobs/{id}/logs).
    #[arg(long, env = "STAGELY_GATEWAY_ADDR", default_value = "0.0.0.0:8443")]
    pub gateway_addr: SocketAddr,

    /// File holding the agent token signing key (raw bytes, at least 32).
    #[arg(long, env = "STAGELY_GATEWAY_SIGNING_KEY_FILE")]
    pub gateway_signing_key_file: Option<PathBuf>,

    /// The agent token signing key itself (prefer the file; at least 32 bytes).
    #[arg(long, env = "STAGELY_GATEWAY_SIGNING_KEY", hide_env_values = true)]
    pub gateway_signing_key: Option<Sensitive>,

    /// Redis for job logs, e.g. `redis://redis:6379`; without it LOG lines are not stored.
    #[arg(long, env = "STAGELY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Sensitive>,

    /// Log lines kept per job (approximately).
    #[arg(long, env = "STAGELY_LOG_MAX_LINES", default_value_t = 10_000)]
    pub log_max_lines: usize,

    /// Seconds between writes of one object's `status.lastHeartbeat`. Every write is an update
    /// of the object that each watch of its kind receives (5,000 previews at once a minute were
    /// 83 writes a second); the reaper never counts a connected agent as lost, and a third of its
    /// 15-minute heartbeat timeout is margin enough for one that is not.
    #[arg(long, env = "STAGELY_HEARTBEAT_WRITE_INTERVAL_SECS", default_value_t = 300)]
    pub heartbeat_write_interval_secs: u64,

    /// PEM certificate chain the gateway serves `wss://` with (e.g. a mounted cert-manager
    /// Secret's `tls.crt`); reread when it changes. Without it the gateway serves plain `ws://`.
    #[arg(long, env = "STAGELY_GATEWAY_TLS_CERT", requires = "gateway_tls_key")]
    pub gateway_tls_cert: Option<PathBuf>,

    /// PEM private key of `--gateway-tls-cert`.
    #[arg(long, env = "STAGELY_GATEWAY_TLS_KEY", requires = "gateway_tls_cert")]
    pub gateway_tls_key: Option<PathBuf>,

    /// Seconds between checks of the gateway's certificate files.
    #[arg(long, env = "STAGELY_GATEWAY_TLS_RELOAD_SECS", default_value_t = 5)]
    pub gateway_tls_reload_secs: u64,
}

/// Why the gateway's configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The key file could not be read.
    #[error("failed to read the gateway signing key file {path}: {source}")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The gateway's certificate could not be loaded.
    #[error("failed to load the gateway's TLS certificate: {0}")]
    Tls(#[from] TlsError),
    /// The gateway could not start.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

impl GatewayConfig {
    /// The signing key this configuration names, or a fresh random one (with a warning).
    pub fn signing_key(&self) -> Result<SigningKey, ConfigError> {
        let key = if let Some(path) = &self.gateway_signing_key_file {
            let bytes = std::fs::read(path).map_err(|source| ConfigError::ReadKey { path: path.clone(), source })?;
            SigningKey::from_bytes(bytes).map_err(GatewayError::from)?
        } else if let Some(key) = &self.gateway_signing_key {
            SigningKey::from_bytes(key.expose().as_bytes()).map_err(GatewayError::from)?
        } else {
            tracing::warn!(
                "no gateway signing key configured (STAGELY_GATEWAY_SIGNING_KEY_FILE); using a random one: \
                 agent tokens will not survive a restart"
            );
            SigningKey::generate().map_err(GatewayError::from)?
        };
        Ok(key)
    }

    /// The certificate the gateway serves, if it is to serve `wss://`.
    pub fn certificate(&self) -> Result<Option<CertStore>, ConfigError> {
        match (&self.gateway_tls_cert, &self.gateway_tls_key) {
            (Some(cert), Some(key)) => Ok(Some(CertStore::load(cert, key)?)),
            _ => Ok(None),
        }
    }

    /// Builds the gateway, checking scopes and recording heartbeats through `client`.
    pub async fn build(&self, client: kube::Client) -> Result<Gateway, ConfigError> {
        let mut builder = Gateway::builder()
            .signing_key(self.signing_key()?)
            .objects(KubeObjects::new(client))
            .log_max_len(self.log_max_lines)
            .settings(Settings {
                heartbeat_write_interval: Duration::from_secs(self.heartbeat_write_interval_secs.max(1)),
                tls_reload_interval: Duration::from_secs(self.gateway_tls_reload_secs.max(1)),
                ..Settings::default()
            });
        if let Some(certificate) = self.certificate()? {
            builder = builder.tls(certificate);
        }
        if let Some(url) = &self.redis_url {
            builder = builder.redis(url.expose());
        }
        Ok(builder.build().await?)
    }
}
