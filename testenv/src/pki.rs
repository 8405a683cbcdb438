//! Certificates, keys and the admin token of a test control plane, generated fresh each start.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

use crate::{Error, Result};

/// The files written by [`write`].
pub(crate) struct Files {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub sa_public: PathBuf,
    pub sa_private: PathBuf,
    pub tokens: PathBuf,
    pub token: String,
}

/// Writes a CA, an apiserver serving certificate for 127.0.0.1/localhost signed by it, a
/// service-account signing key, and a static token file with one cluster-admin token.
pub(crate) fn write(dir: &Path) -> Result<Files> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(|source| Error::Io { path: pki.clone(), source })?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "stagely-testenv-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut serving = CertificateParams::new(vec!["localhost".to_owned()])?;
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    let serving_key = KeyPair::generate()?;
    let serving_cert = serving.signed_by(&serving_key, &ca)?;

    let sa_key = KeyPair::generate()?;
    // Random enough for a loopback-only test cluster, and never reused: a fresh key's bytes.
    let token: String = KeyPair::generate()?.serialize_der()[40..64].iter().map(|b| format!("{b:02x}")).collect();

    let files = Files {
        ca_cert: pki.join("ca.crt"),
        serving_cert: pki.join("apiserver.crt"),
        serving_key: pki.join("apiserver.key"),
        sa_public: pki.join("sa.pub"),
        sa_private: pki.join("sa.key"),
        tokens: pki.join("tokens.csv"),
        token,
    };
    let contents = [
        (&files.ca_cert, ca.pem()),
        (&files.serving_cert, serving_cert.pem()),
        (&files.serving_key, serving_key.serialize_pem()),
        (&files.sa_public, sa_key.public_key_pem()),
        (&files.sa_private, sa_key.serialize_pem()),
        (&files.tokens, format!("{},stagely-admin,stagely-admin,\"system:masters\"\n", files.token)),
    ];
    for (path, text) in contents {
        std::fs::write(path, text).map_err(|source| Error::Io { path: path.clone(), source })?;
    }
    Ok(files)
}
