//! A TLS certificate served from files (a mounted Secret, e.g. one cert-manager renews), reloaded
//! when the files change: the edge proxy's wildcard certificate and the agent gateway's.
//! Connections keep the certificate they started with; new handshakes get the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("failed to read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not PEM of the expected kind.
    #[error("failed to parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The current certificate, swapped in place on reload.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// A fingerprint of the files' contents (not the key itself) and the loaded certificate.
    current: RwLock<(u64, Arc<CertifiedKey>)>,
}

impl CertStore {
    /// Loads the certificate chain and key; fails if either is missing or unreadable.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let (fingerprint, key) = read(cert_path, key_path)?;
        Ok(Self { cert_path: cert_path.into(), key_path: key_path.into(), current: RwLock::new((fingerprint, key)) })
    }

    /// Rereads the files; swaps the certificate in if they changed. Returns whether it did.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (fingerprint, key) = read(&self.cert_path, &self.key_path)?;
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.0 == fingerprint {
            return Ok(false);
        }
        *current = (fingerprint, key);
        Ok(true)
    }

    /// Rereads the files every `interval` until `shutdown` turns true. A broken file is logged
    /// and passed to `failed` (for a metric); the previous certificate stays in use.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        failed: impl Fn(&TlsError) + Send + 'static,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let store = self.clone();
            match tokio::task::spawn_blocking(move || store.reload()).await {
                Ok(Ok(true)) => tracing::info!(cert = %self.cert_path.display(), "reloaded the TLS certificate"),
                Ok(Ok(false)) => {}
                Ok(Err(err)) => {
                    failed(&err);
                    tracing::error!(%err, "failed to reload the TLS certificate; keeping the current one");
                }
                Err(err) => tracing::error!(%err, "certificate reload task failed"),
            }
        }
    }

    /// A rustls configuration serving this store's certificate, offering the `alpn` protocols
    /// (most preferred first).
    pub fn server_config(self: Arc<Self>, alpn: &[&[u8]]) -> ServerConfig {
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self);
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        config
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).1.clone())
    }
}

fn read(cert_path: &Path, key_path: &Path) -> Result<(u64, Arc<CertifiedKey>), TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source });
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let parse = |path: &Path, reason: String| TlsError::Parse { path: path.into(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|err| parse(cert_path, err.to_string()))?;
    if certs.is_empty() {
        return Err(parse(cert_path, "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| parse(key_path, err.to_string()))?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|err| parse(key_path, err.to_string()))?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified.keys_match().map_err(|err| parse(key_path, format!("the key does not match the certificate: {err}")))?;
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&(&cert_pem, &key_pem), &mut hasher);
    Ok((std::hash::Hasher::finish(&hasher), Arc::new(certified)))
}
