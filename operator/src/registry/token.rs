//! Registry tokens for the distribution registry's `token` auth, and the credentials the
//! operator hands to builders and previews, which the token endpoint exchanges for tokens.
//!
//! Both are ES256 JWTs signed with the registry signing key. A registry token carries the
//! `x5c` header (the key's certificate, which is in the registry's `auth.token.rootcertbundle`),
//! the audience the registry's `auth.token.service` names and an `access` claim. A credential
//! carries another audience and its grant in a `grants` claim, so the registry never takes one
//! for a token, and the token endpoint never takes a token for a credential.
//!
//! Why `x5c` and not `kid`: distribution v3 finds a key named by `kid` through the RFC 7638
//! thumbprints of the root certificates' keys, and v3.0.0 computes the thumbprint of an EC key
//! from its curve's base point instead of the key, so any EC key would match any other. A
//! certificate chain is checked against the root bundle itself.

use std::collections::BTreeSet;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use stagely_api::protocol::Sensitive;

use super::RegistryError;

/// The longest life of a credential or token.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// The `type` of a repository in a scope and in a token's `access` claim.
pub const REPOSITORY: &str = "repository";

/// The user name of every credential (the password alone carries the grant).
pub const USERNAME: &str = "stagely";

/// Suffix of the audience of credentials: `<service>` + this. The registry accepts only the
/// service itself as an audience.
const CREDENTIAL_AUDIENCE_SUFFIX: &str = "#credential";

/// What a token or credential allows on one resource, as the registry's `access` claim lists it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// The resource type: `repository` (the only one the operator grants).
    #[serde(rename = "type")]
    pub kind: String,
    /// The repository, e.g. `team-a/shop/web`.
    pub name: String,
    /// `pull`, `push`, `delete` (and `*`, all of them, in a request).
    pub actions: Vec<String>,
}

impl Access {
    /// `actions` on repository `name`.
    pub fn repository(name: &str, actions: &[&str]) -> Self {
        Self {
            kind: REPOSITORY.to_owned(),
            name: name.to_owned(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        }
    }
}

/// Parses one `scope` parameter of a token request, `type[(class)]:name:action[,action…]`
/// (e.g. `repository:team-a/shop/web:pull,push`). The class is dropped, as the registry drops
/// it when it checks access. `None` when the scope is malformed.
pub fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let kind = kind.split_once('(').map_or(kind, |(kind, _)| kind);
    if kind.is_empty() || name.is_empty() {
        return None;
    }
    let actions: Vec<String> = actions.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
    if actions.is_empty() {
        return None;
    }
    Some(Access { kind: kind.to_owned(), name: name.to_owned(), actions })
}

/// What of `requested` `granted` allows: for each requested repository, the requested actions
/// the grant names (`*` asks for all of them). Resources the grant does not name, and actions it
/// does not hold, are left out: the registry then refuses what is missing, as clients expect.
pub fn intersect(requested: &[Access], granted: &[Access]) -> Vec<Access> {
    let mut result: Vec<Access> = Vec::new();
    for request in requested {
        let allowed: BTreeSet<&str> = granted
            .iter()
            .filter(|g| g.kind == request.kind && g.name == request.name)
            .flat_map(|g| g.actions.iter().map(String::as_str))
            .collect();
        let actions: Vec<String> = if request.actions.iter().any(|a| a == "*") {
            allowed.iter().map(|a| (*a).to_owned()).collect()
        } else {
            request.actions.iter().filter(|a| allowed.contains(a.as_str())).cloned().collect()
        };
        if actions.is_empty() {
            continue;
        }
        match result.iter_mut().find(|r| r.kind == request.kind && r.name == request.name) {
            Some(existing) => {
                for action in actions {
                    if !existing.actions.contains(&action) {
                        existing.actions.push(action);
                    }
                }
            }
            None => result.push(Access { kind: request.kind.clone(), name: request.name.clone(), actions }),
        }
    }
    result
}

/// `ttl`, at most [`MAX_TTL`].
pub fn cap_ttl(ttl: Duration) -> Duration {
    ttl.min(MAX_TTL)
}

/// Whether `name` is a repository name the registry accepts: lowercase path components of
/// letters and digits joined by `.`, `_`, `__` or runs of `-`, separated by `/`.
pub fn is_repository_name(name: &str) -> bool {
    fn component(c: &str) -> bool {
        let bytes = c.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return false;
        }
        let mut i = 0;
        while i < bytes.len() {
            if alnum(bytes[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && !alnum(bytes[i]) {
                i += 1;
            }
            let separator = &c[start..i];
            let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
            if !ok {
                return false;
            }
        }
        true
    }
    name.len() <= 255 && name.split('/').all(component)
}

/// The ECDSA P-256 key that signs registry tokens and credentials, with the certificate chain
/// the registry checks tokens against. `Debug` never shows the key.
#[derive(Clone)]
pub struct SigningKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Base64 (standard) DER of each certificate, leaf first, for the `x5c` header.
    x5c: Vec<String>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("certificates", &self.x5c.len()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The key in `key_pem` (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`, ECDSA P-256) and
    /// the certificates in `cert_pem`, leaf first; the leaf must be for that key. Either PEM may
    /// hold both: the key is the first private key found, the chain every `CERTIFICATE`.
    pub fn from_pem(key_pem: &[u8], cert_pem: &[u8]) -> Result<Self, RegistryError> {
        let key_error = |reason: &str| RegistryError::SigningKey(reason.to_owned());
        let blocks = pem::parse_many(key_pem).map_err(|err| key_error(&format!("the key is not PEM: {err}")))?;
        let pkcs8 = blocks
            .iter()
            .find_map(|block| match block.tag() {
                "PRIVATE KEY" => Some(block.contents().to_vec()),
                "EC PRIVATE KEY" => Some(sec1_to_pkcs8(block.contents())),
                _ => None,
            })
            .ok_or_else(|| key_error("no PRIVATE KEY or EC PRIVATE KEY block"))?;
        let encoding = EncodingKey::from_ec_der(&pkcs8);
        let jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)
            .map_err(|_| key_error("the key is not an ECDSA P-256 private key"))?;
        let AlgorithmParameters::EllipticCurve(params) = &jwk.algorithm else {
            return Err(key_error("the key is not an ECDSA P-256 private key"));
        };
        let decoding = DecodingKey::from_ec_components(&params.x, &params.y)
            .map_err(|_| key_error("the key's public point is not usable"))?;

        let certificates: Vec<Vec<u8>> = pem::parse_many(cert_pem)
            .map_err(|err| key_error(&format!("the certificate is not PEM: {err}")))?
            .into_iter()
            .filter(|block| block.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .collect();
        let leaf = certificates.first().ok_or_else(|| key_error("no CERTIFICATE block for the key"))?;
        // The certificate's SubjectPublicKeyInfo holds the uncompressed point 04 || x || y.
        let mut point = vec![4u8];
        for coordinate in [&params.x, &params.y] {
            point.extend(URL_SAFE_NO_PAD.decode(coordinate).map_err(|_| key_error("the key's point is malformed"))?);
        }
        if !leaf.windows(point.len()).any(|window| window == point.as_slice()) {
            return Err(key_error("the first certificate is not for this key"));
        }
        let x5c = certificates.iter().map(|der| STANDARD.encode(der)).collect();
        Ok(Self { encoding, decoding, x5c })
    }
}

/// Wraps a SEC1 `ECPrivateKey` (RFC 5915) of a P-256 key in a PKCS#8 `PrivateKeyInfo`.
fn sec1_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    // version 0, AlgorithmIdentifier { id-ecPublicKey, prime256v1 }
    const PREFIX: &[u8] = &[
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut body = PREFIX.to_vec();
    body.push(0x04);
    body.extend(der_length(sec1.len()));
    body.extend_from_slice(sec1);
    let mut out = vec![0x30];
    out.extend(der_length(body.len()));
    out.extend(body);
    out
}

fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

/// The claims of a registry token, as distribution's `token` auth reads them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenClaims {
    /// The issuer the registry's `auth.token.issuer` names.
    pub iss: String,
    /// Who the token is for (the registry logs it as the user).
    pub sub: String,
    /// The service the registry's `auth.token.service` names.
    pub aud: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    pub nbf: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Unique id of the token.
    pub jti: String,
    /// What the token allows.
    pub access: Vec<Access>,
}

/// The claims of a credential: who may ask the token endpoint for what, until when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CredentialClaims {
    /// The issuer of registry tokens.
    pub iss: String,
    /// [`USERNAME`].
    pub sub: String,
    /// `<service>#credential`.
    pub aud: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    pub nbf: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Unique id of the credential.
    pub jti: String,
    /// The repositories and actions tokens exchanged for this credential may allow.
    pub grants: Vec<Access>,
}

/// A signed registry token and when it expires.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The JWT.
    pub token: Sensitive,
    /// Issued at, seconds since the Unix epoch.
    pub issued_at: u64,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Why a credential was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not signed by this operator's key, malformed, or for another service or issuer.
    #[error("the registry credential is not valid")]
    Invalid,
    /// Past its expiry.
    #[error("the registry credential has expired")]
    Expired,
}

/// Signs registry tokens and credentials for one registry (its issuer and service).
#[derive(Clone)]
pub struct TokenIssuer {
    key: SigningKey,
    issuer: String,
    service: String,
    credential_validation: Validation,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("issuer", &self.issuer)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// Tokens signed with `key` for the registry whose `auth.token.issuer` is `issuer` and
    /// `auth.token.service` is `service`.
    pub fn new(key: SigningKey, issuer: impl Into<String>, service: impl Into<String>) -> Self {
        let issuer = issuer.into();
        let service = service.into();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_audience(&[format!("{service}{CREDENTIAL_AUDIENCE_SUFFIX}")]);
        validation.set_issuer(&[&issuer]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Self { key, issuer, service, credential_validation: validation }
    }

    /// The service tokens are for (the registry's `auth.token.service`).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// A credential allowing tokens for `grants` for `ttl` (at most [`MAX_TTL`]) from now.
    pub fn credential(&self, grants: Vec<Access>, ttl: Duration) -> Result<IssuedToken, RegistryError> {
        self.credential_at(grants, ttl, unix_now())
    }

    pub(crate) fn credential_at(
        &self,
        grants: Vec<Access>,
        ttl: Duration,
        now: u64,
    ) -> Result<IssuedToken, RegistryError> {
        let exp = now.saturating_add(cap_ttl(ttl).as_secs());
        let claims = CredentialClaims {
            iss: self.issuer.clone(),
            sub: USERNAME.to_owned(),
            aud: format!("{}{CREDENTIAL_AUDIENCE_SUFFIX}", self.service),
            exp,
            nbf: now,
            iat: now,
            jti: new_id()?,
            grants,
        };
        // No x5c: a credential is only ever read back by this operator.
        let header = Header::new(Algorithm::ES256);
        let token = jsonwebtoken::encode(&header, &claims, &self.key.encoding).map_err(RegistryError::Sign)?;
        Ok(IssuedToken { token: Sensitive(token), issued_at: now, expires_at: exp })
    }

    /// The claims of `credential` if this issuer signed it for this service and it has not
    /// expired.
    pub fn verify_credential(&self, credential: &str) -> Result<CredentialClaims, CredentialError> {
        jsonwebtoken::decode::<CredentialClaims>(credential, &self.key.decoding, &self.credential_validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => CredentialError::Expired,
                _ => CredentialError::Invalid,
            })
    }

    /// A registry token for `subject` allowing `access`, expiring at `expires_at` (Unix seconds,
    /// at most [`MAX_TTL`] from now).
    pub fn token(&self, subject: &str, access: Vec<Access>, expires_at: u64) -> Result<IssuedToken, RegistryError> {
        let now = unix_now();
        let exp = expires_at.min(now.saturating_add(MAX_TTL.as_secs()));
        let claims = TokenClaims {
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            aud: self.service.clone(),
            exp,
            nbf: now,
            iat: now,
            jti: new_id()?,
            access,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.x5c = Some(self.key.x5c.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.key.encoding).map_err(RegistryError::Sign)?;
        Ok(IssuedToken { token: Sensitive(token), issued_at: now, expires_at: exp })
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn new_id() -> Result<String, RegistryError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).map_err(RegistryError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use stagely_testenv::registry::TokenKey;

    use super::*;

    fn issuer() -> TokenIssuer {
        let key = TokenKey::generate().unwrap();
        TokenIssuer::new(
            SigningKey::from_pem(key.key_pem.as_bytes(), key.cert_pem.as_bytes()).unwrap(),
            "stagely",
            "reg",
        )
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(
            parse_scope("repository:team-a/shop/web:pull,push"),
            Some(Access::repository("team-a/shop/web", &["pull", "push"]))
        );
        assert_eq!(parse_scope("repository(plugin):a/b:pull"), Some(Access::repository("a/b", &["pull"])));
        assert_eq!(
            parse_scope("registry:catalog:*"),
            Some(Access { kind: "registry".into(), name: "catalog".into(), actions: vec!["*".into()] })
        );
        // A name with a colon (a host with a port) keeps everything between the first and the last.
        assert_eq!(parse_scope("repository:host:5000/a:pull").unwrap().name, "host:5000/a");
        for bad in ["", "repository", "repository:a", "repository::pull", ":a:pull", "repository:a:", "repository:a:,"]
        {
            assert_eq!(parse_scope(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn requests_are_intersected_with_the_grant() {
        let grant = vec![Access::repository("team-a/shop/web", &["pull", "push"])];
        let ask = |scopes: &[&str]| {
            let requested: Vec<Access> = scopes.iter().map(|s| parse_scope(s).unwrap()).collect();
            intersect(&requested, &grant)
        };
        assert_eq!(
            ask(&["repository:team-a/shop/web:pull,push"]),
            vec![Access::repository("team-a/shop/web", &["pull", "push"])]
        );
        // More than granted: only what the grant holds.
        assert_eq!(
            ask(&["repository:team-a/shop/web:pull,push,delete"]),
            vec![Access::repository("team-a/shop/web", &["pull", "push"])]
        );
        assert_eq!(
            ask(&["repository:team-a/shop/web:*"]),
            vec![Access::repository("team-a/shop/web", &["pull", "push"])]
        );
        // Another repository, a prefix of it, another type: nothing.
        assert_eq!(ask(&["repository:team-a/other/web:pull,push"]), vec![]);
        assert_eq!(ask(&["repository:team-a/shop:pull"]), vec![]);
        assert_eq!(ask(&["registry:catalog:*"]), vec![]);
        // The same repository asked twice: one entry.
        assert_eq!(
            ask(&["repository:team-a/shop/web:pull", "repository:team-a/shop/web:push", "repository:x/y:pull"]),
            vec![Access::repository("team-a/shop/web", &["pull", "push"])]
        );
        // A pull grant never yields push.
        let pull = vec![Access::repository("team-a/shop/web", &["pull"])];
        let requested = vec![parse_scope("repository:team-a/shop/web:pull,push").unwrap()];
        assert_eq!(intersect(&requested, &pull), vec![Access::repository("team-a/shop/web", &["pull"])]);
    }

    #[test]
    fn ttl_is_capped_at_an_hour() {
        assert_eq!(cap_ttl(Duration::from_secs(60)), Duration::from_secs(60));
        assert_eq!(cap_ttl(Duration::from_secs(86_400)), MAX_TTL);
        let issuer = issuer();
        let credential = issuer.credential_at(vec![], Duration::from_secs(86_400), 1_000).unwrap();
        assert_eq!(credential.expires_at, 1_000 + 3600);
        let now = unix_now();
        let token = issuer.token("s", vec![], now + 86_400).unwrap();
        assert!(token.expires_at <= now + 3600 + 1, "{} vs {now}", token.expires_at);
    }

    #[test]
    fn repository_names() {
        for good in ["team-a/shop/web", "a", "a.b_c__d---e/f0", "0/1"] {
            assert!(is_repository_name(good), "{good}");
        }
        for bad in ["", "Team/a", "a//b", "/a", "a/", "a_-b", "-a", "a.", "a b", "a:b", "a@b", "a/../b"] {
            assert!(!is_repository_name(bad), "{bad}");
        }
    }

    #[test]
    fn credentials_round_trip_and_refuse_forgeries_and_expiry() {
        let issuer = issuer();
        let grants = vec![Access::repository("team-a/shop/web", &["pull"])];
        let credential = issuer.credential(grants.clone(), Duration::from_secs(60)).unwrap();
        let claims = issuer.verify_credential(credential.token.expose()).unwrap();
        assert_eq!(claims.grants, grants);
        assert_eq!(claims.sub, USERNAME);

        let expired = issuer.credential_at(grants.clone(), Duration::from_secs(60), unix_now() - 120).unwrap();
        assert_eq!(issuer.verify_credential(expired.token.expose()), Err(CredentialError::Expired));

        let other = self::issuer().credential(grants.clone(), Duration::from_secs(60)).unwrap();
        assert_eq!(issuer.verify_credential(other.token.expose()), Err(CredentialError::Invalid));
        assert_eq!(issuer.verify_credential("not a jwt"), Err(CredentialError::Invalid));

        // A registry token is not a credential, and a credential is not for the registry's audience.
        let token = issuer.token(USERNAME, grants, unix_now() + 60).unwrap();
        assert_eq!(issuer.verify_credential(token.token.expose()), Err(CredentialError::Invalid));
        let payload = credential.token.expose().split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["aud"], "reg#credential");
        assert!(claims.get("access").is_none());
    }

    #[test]
    fn tokens_carry_what_the_registry_checks() {
        let key = TokenKey::generate().unwrap();
        let issuer = TokenIssuer::new(
            SigningKey::from_pem(key.key_pem.as_bytes(), key.cert_pem.as_bytes()).unwrap(),
            "stagely",
            "reg",
        );
        let token = issuer.token("builder", vec![Access::repository("a/b", &["pull"])], unix_now() + 60).unwrap();
        let header = jsonwebtoken::decode_header(token.token.expose()).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        let cert = pem::parse(&key.cert_pem).unwrap();
        assert_eq!(header.x5c, Some(vec![STANDARD.encode(cert.contents())]));
        let payload = token.token.expose().split('.').nth(1).unwrap();
        let claims: TokenClaims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!((claims.iss.as_str(), claims.aud.as_str(), claims.sub.as_str()), ("stagely", "reg", "builder"));
        assert_eq!(claims.access, vec![Access::repository("a/b", &["pull"])]);
        assert!(claims.nbf <= claims.iat && claims.iat < claims.exp && !claims.jti.is_empty());
    }

    #[test]
    fn keys_load_from_pkcs8_and_sec1_and_must_match_their_certificate() {
        let key = TokenKey::generate().unwrap();
        let pkcs8 = pem::parse(&key.key_pem).unwrap();
        // PrivateKeyInfo = SEQUENCE { version, algorithm, OCTET STRING { ECPrivateKey } }: its
        // wrapping back must give the same bytes.
        let der = pkcs8.contents();
        let (body, _) = tlv(der);
        let (_, rest) = tlv(body);
        let (_, rest) = tlv(rest);
        let (sec1, _) = tlv(rest);
        assert_eq!(sec1_to_pkcs8(sec1), der, "the PKCS#8 wrapping of a SEC1 key differs from ring's");
        let sec1_pem = pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1.to_vec()));
        SigningKey::from_pem(sec1_pem.as_bytes(), key.cert_pem.as_bytes()).unwrap();
        // One file holding both.
        let both = format!("{}{}", key.key_pem, key.cert_pem);
        SigningKey::from_pem(both.as_bytes(), both.as_bytes()).unwrap();

        let other = TokenKey::generate().unwrap();
        let err = SigningKey::from_pem(key.key_pem.as_bytes(), other.cert_pem.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("not for this key"), "{err}");
        let err = SigningKey::from_pem(key.key_pem.as_bytes(), b"").unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
        let err = SigningKey::from_pem(b"nonsense", key.cert_pem.as_bytes()).unwrap_err();
        assert!(!err.to_string().contains(&key.key_pem), "{err}");
    }

    /// The contents of the DER element `der` starts with, and what follows it.
    fn tlv(der: &[u8]) -> (&[u8], &[u8]) {
        let (len, start) = match der[1] {
            n if n < 0x80 => (n as usize, 2),
            0x81 => (der[2] as usize, 3),
            0x82 => (u16::from_be_bytes([der[2], der[3]]) as usize, 4),
            other => panic!("unexpected DER length byte {other:#x}"),
        };
        (&der[start..start + len], &der[start + len..])
    }

    #[test]
    fn debug_shows_no_key() {
        let key = TokenKey::generate().unwrap();
        let signing = SigningKey::from_pem(key.key_pem.as_bytes(), key.cert_pem.as_bytes()).unwrap();
        let issuer = TokenIssuer::new(signing.clone(), "stagely", "reg");
        let credential = issuer.credential(vec![], Duration::from_secs(60)).unwrap();
        let key_body: String = key.key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
        for text in [format!("{signing:?}"), format!("{issuer:?}"), format!("{credential:?}")] {
            assert!(!text.contains(&key_body[..24]), "{text}");
            assert!(!text.contains(credential.token.expose()), "{text}");
        }
    }
}
