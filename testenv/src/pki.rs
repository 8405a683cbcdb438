//! Certificates, keys and the admin token of a test control plane, generated fresh each start;
//! and [`TestCa`], the certificate authority tests give their own TLS servers.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::{Error, Result};

/// A certificate authority made for one test: it signs serving certificates for loopback
/// servers, and clients trust it.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A fresh CA whose common name is `name`.
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's certificate, DER.
    pub fn der(&self) -> &[u8] {
        self.issuer.der()
    }

    /// A client certificate for the user `name` in the groups `groups` (Kubernetes reads the
    /// common name and the organizations), signed by this CA, with a fresh key: the certificate
    /// and the key, PEM.
    pub fn client(&self, name: &str, groups: &[&str]) -> Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        for group in groups {
            params.distinguished_name.push(DnType::OrganizationName, *group);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A serving certificate for `names` (DNS names, wildcards or IP addresses) signed by this CA,
    /// with a fresh key: the certificate and the key, PEM.
    pub fn serving(&self, names: &[&str]) -> Result<(String, String)> {
        let mut params = CertificateParams::new(names.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("server"));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The files written by [`write`].
pub(crate) struct Files {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub sa_public: PathBuf,
    pub sa_private: PathBuf,
    pub kubelet_client_cert: PathBuf,
    pub kubelet_client_key: PathBuf,
    pub tokens: PathBuf,
    pub token: String,
}

/// Writes a CA, an apiserver serving certificate signed by it (for 127.0.0.1/localhost, and for
/// the names and addresses pods reach it by when the plane runs a node: the `kubernetes`
/// Service and the node's bridge), the client certificate the apiserver shows kubelets, a
/// service-account signing key, and a static token file with one cluster-admin token.
pub(crate) fn write(dir: &Path) -> Result<Files> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(|source| Error::Io { path: pki.clone(), source })?;

    let ca = TestCa::new("stagely-testenv-ca")?;
    let (serving_cert, serving_key) = ca.serving(&[
        "localhost",
        "127.0.0.1",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        crate::node::KUBERNETES_SERVICE_IP,
        crate::node::BRIDGE_IP,
    ])?;
    let (kubelet_client_cert, kubelet_client_key) = ca.client("kube-apiserver-kubelet-client", &["system:masters"])?;

    let sa_key = KeyPair::generate()?;
    // Random enough for a loopback-only test cluster, and never reused: a fresh key's bytes.
    let token: String = KeyPair::generate()?.serialize_der()[40..64].iter().map(|b| format!("{b:02x}")).collect();

    let files = Files {
        ca_cert: pki.join("ca.crt"),
        serving_cert: pki.join("apiserver.crt"),
        serving_key: pki.join("apiserver.key"),
        sa_public: pki.join("sa.pub"),
        sa_private: pki.join("sa.key"),
        kubelet_client_cert: pki.join("apiserver-kubelet-client.crt"),
        kubelet_client_key: pki.join("apiserver-kubelet-client.key"),
        tokens: pki.join("tokens.csv"),
        token,
    };
    let contents = [
        (&files.ca_cert, ca.pem()),
        (&files.serving_cert, serving_cert),
        (&files.serving_key, serving_key),
        (&files.sa_public, sa_key.public_key_pem()),
        (&files.sa_private, sa_key.serialize_pem()),
        (&files.kubelet_client_cert, kubelet_client_cert),
        (&files.kubelet_client_key, kubelet_client_key),
        (&files.tokens, format!("{},stagely-admin,stagely-admin,\"system:masters\"\n", files.token)),
    ];
    for (path, text) in contents {
        std::fs::write(path, text).map_err(|source| Error::Io { path: path.clone(), source })?;
    }
    Ok(files)
}
