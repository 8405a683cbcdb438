//! How the operator authenticates to GitHub: a token, or a GitHub App (an RS256 JWT signed with
//! the App's private key, exchanged for an installation token that lasts an hour).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::ByteString;
use serde::Serialize;
use sha2::{Digest, Sha256};
use stagely_api::protocol::Sensitive;

/// The credentials Secret's key holding a token (personal, fine-grained or installation).
pub const TOKEN_KEY: &str = "token";
/// The credentials Secret's key holding the GitHub App's id.
pub const APP_ID_KEY: &str = "appId";
/// The credentials Secret's key holding the App installation's id.
pub const INSTALLATION_ID_KEY: &str = "installationId";
/// The credentials Secret's key holding the App's private key (PEM).
pub const PRIVATE_KEY_KEY: &str = "privateKey";

/// What the operator authenticates to GitHub with.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// A token sent as it is.
    Token(Sensitive),
    /// A GitHub App installation.
    App(App),
}

/// A GitHub App installation's credentials.
#[derive(Clone, Debug)]
pub struct App {
    /// The App's id (the JWT's issuer).
    pub app_id: String,
    /// The installation on the repository's account.
    pub installation_id: u64,
    /// The App's private key, PEM.
    private_key: Sensitive,
}

impl Credentials {
    /// The credentials a credentials Secret's data holds: `None` when it holds neither a token
    /// nor an App's keys (only a webhook secret); an error names the key that is not usable.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Option<Self>, String> {
        let text = |key: &str| -> Result<Option<String>, String> {
            match data.get(key).filter(|value| !value.0.is_empty()) {
                None => Ok(None),
                Some(value) => String::from_utf8(value.0.clone())
                    .map(|text| Some(text.trim().to_owned()))
                    .map_err(|_| format!("{key} is not UTF-8 text")),
            }
        };
        if let Some(token) = text(TOKEN_KEY)? {
            return Ok(Some(Credentials::Token(Sensitive(token))));
        }
        let (app_id, installation_id, private_key) =
            (text(APP_ID_KEY)?, text(INSTALLATION_ID_KEY)?, text(PRIVATE_KEY_KEY)?);
        if app_id.is_none() && installation_id.is_none() && private_key.is_none() {
            return Ok(None);
        }
        let missing = |key: &str| format!("{key} is missing (a GitHub App needs appId, installationId and privateKey)");
        let app_id = app_id.ok_or_else(|| missing(APP_ID_KEY))?;
        if app_id.is_empty() || !app_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{APP_ID_KEY} must be the App's numeric id"));
        }
        let installation_id = installation_id
            .ok_or_else(|| missing(INSTALLATION_ID_KEY))?
            .parse::<u64>()
            .map_err(|_| format!("{INSTALLATION_ID_KEY} must be the installation's numeric id"))?;
        let private_key = private_key.ok_or_else(|| missing(PRIVATE_KEY_KEY))?;
        // Checked now, so that a wrong key is reported where it is set rather than on first use.
        signing_key(&private_key)?;
        Ok(Some(Credentials::App(App { app_id, installation_id, private_key: Sensitive(private_key) })))
    }

    /// A short stable name for these credentials in caches and logs, revealing nothing of them:
    /// the App and installation ids, or a digest of the token.
    pub fn identity(&self) -> String {
        match self {
            Credentials::Token(token) => {
                let digest = Sha256::digest(token.expose().as_bytes());
                let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
                format!("token:{hex}")
            }
            Credentials::App(app) => format!("app:{}/{}", app.app_id, app.installation_id),
        }
    }
}

#[derive(Serialize)]
struct AppClaims<'a> {
    iat: u64,
    exp: u64,
    iss: &'a str,
}

impl App {
    /// The App's JWT, as GitHub asks: issued a minute in the past (clock drift), valid ten minutes.
    pub fn jwt(&self, now: SystemTime) -> Result<Sensitive, String> {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = AppClaims { iat: now.saturating_sub(60), exp: now + 9 * 60, iss: &self.app_id };
        let key = signing_key(self.private_key.expose())?;
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key)
            .map(Sensitive)
            .map_err(|err| format!("failed to sign the App's JWT: {err}"))
    }
}

/// The App's signing key from its PEM, as GitHub gives it (`BEGIN RSA PRIVATE KEY`, PKCS#1).
fn signing_key(pem_text: &str) -> Result<EncodingKey, String> {
    let invalid = || format!("{PRIVATE_KEY_KEY} is not an RSA private key in PEM (as GitHub gives it)");
    let block = pem::parse(pem_text.as_bytes()).map_err(|_| invalid())?;
    if block.tag() != "RSA PRIVATE KEY" {
        return Err(format!(
            "{PRIVATE_KEY_KEY} is a PEM {:?} block; GitHub gives an App's key as an RSA PRIVATE KEY block, \
             which is what Stagely reads",
            block.tag()
        ));
    }
    // Signing once proves the key usable: from_rsa_der itself checks nothing.
    let key = EncodingKey::from_rsa_der(block.contents());
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &serde_json::json!({}), &key).map_err(|_| invalid())?;
    Ok(key)
}

/// An installation token and when GitHub says it expires.
#[derive(Clone, Debug)]
pub struct InstallationToken {
    /// The token.
    pub token: Sensitive,
    /// When it stops working.
    pub expires_at: SystemTime,
}

/// The credentials in Secret `namespace/name` (a Project's `spec.github.credentialsSecretRef`),
/// read by name when needed: `None` when it holds only a webhook secret.
pub async fn read_credentials(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Credentials>, super::GitHubError> {
    use k8s_openapi::api::core::v1::Secret;
    let secret = kube::Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|err| super::GitHubError::Credentials(format!("failed to read Secret {namespace}/{name}: {err}")))?
        .ok_or_else(|| super::GitHubError::Credentials(format!("Secret {namespace}/{name} not found")))?;
    Credentials::from_secret_data(&secret.data.unwrap_or_default())
        .map_err(|problem| super::GitHubError::Credentials(format!("Secret {namespace}/{name}: {problem}")))
}

/// How long before its expiry an installation token is renewed: work started with it (a clone, a
/// few calls) has that long to finish.
pub const RENEW_BEFORE: Duration = Duration::from_secs(10 * 60);

impl InstallationToken {
    /// Whether it is still good for new work at `now`.
    pub fn fresh(&self, now: SystemTime) -> bool {
        now + RENEW_BEFORE < self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect()
    }

    #[test]
    fn a_secret_holds_a_token_an_app_or_nothing_and_bad_keys_are_named() {
        assert!(matches!(
            Credentials::from_secret_data(&data(&[("token", "ghp_x\n"), ("webhookSecret", "w")])),
            Ok(Some(Credentials::Token(t))) if t.expose() == "ghp_x"
        ));
        assert!(matches!(Credentials::from_secret_data(&data(&[("webhookSecret", "w")])), Ok(None)));
        let err = Credentials::from_secret_data(&data(&[("appId", "12")])).unwrap_err();
        assert_eq!(err, "installationId is missing (a GitHub App needs appId, installationId and privateKey)");
        let err =
            Credentials::from_secret_data(&data(&[("appId", "x1"), ("installationId", "3"), ("privateKey", "k")]))
                .unwrap_err();
        assert_eq!(err, "appId must be the App's numeric id");
        let err = Credentials::from_secret_data(&data(&[("appId", "1"), ("installationId", "3"), ("privateKey", "k")]))
            .unwrap_err();
        assert_eq!(err, "privateKey is not an RSA private key in PEM (as GitHub gives it)");
    }

    /// An RSA key as `openssl genrsa` writes it: `traditional` gives GitHub's PKCS#1 form.
    fn rsa_key(traditional: bool) -> String {
        let mut command = std::process::Command::new("openssl");
        command.arg("genrsa");
        if traditional {
            command.arg("-traditional");
        }
        let output = command.arg("2048").output().expect("openssl is installed (the tests generate App keys with it)");
        assert!(output.status.success(), "openssl genrsa: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn an_apps_jwt_is_rs256_issued_by_the_app_for_ten_minutes() {
        let key = rsa_key(true);
        let secret = data(&[("appId", "42"), ("installationId", "7"), ("privateKey", &key)]);
        let Ok(Some(Credentials::App(app))) = Credentials::from_secret_data(&secret) else { panic!("an App") };
        assert_eq!((app.app_id.as_str(), app.installation_id), ("42", 7));
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let jwt = app.jwt(now).unwrap();
        let header = jsonwebtoken::decode_header(jwt.expose()).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        let claims = jwt.expose().split('.').nth(1).unwrap();
        use base64::Engine;
        let claims: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims, serde_json::json!({"iat": 1_699_999_940u64, "exp": 1_700_000_540u64, "iss": "42"}));
        assert!(!format!("{app:?}").contains("PRIVATE KEY"), "Debug hides the key");

        let pkcs8 = data(&[("appId", "42"), ("installationId", "7"), ("privateKey", &rsa_key(false))]);
        let err = Credentials::from_secret_data(&pkcs8).unwrap_err();
        assert!(err.contains("\"PRIVATE KEY\" block"), "{err}");
    }

    #[test]
    fn a_token_identity_reveals_nothing_of_it() {
        let identity = Credentials::Token(Sensitive("ghp_secret".into())).identity();
        assert!(identity.starts_with("token:") && !identity.contains("secret"), "{identity}");
        assert_eq!(identity.len(), "token:".len() + 12);
    }

    #[test]
    fn an_installation_token_is_renewed_ten_minutes_before_it_expires() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = |left| InstallationToken { token: Sensitive("t".into()), expires_at: now + left };
        assert!(token(Duration::from_secs(3600)).fresh(now));
        assert!(!token(Duration::from_secs(600)).fresh(now));
    }
}
