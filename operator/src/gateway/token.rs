//! Agent credentials: the single-use enrollment JWT the operator mints per VM, the reusable
//! session credential HELLO_ACK hands out for reconnects, and the job-scoped token that reads
//! a job's logs over HTTP.
//!
//! All three are HS256 JWTs signed with the gateway's key and told apart by their audience, so
//! one can never stand in for another.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use stagely_api::protocol::{ErrorCode, Scope, Sensitive};

/// Audience of enrollment tokens (single use, minted per VM).
pub const ENROLLMENT_AUDIENCE: &str = "stagely-agent-enrollment";
/// Audience of session tokens (reusable until expiry, handed out in HELLO_ACK).
pub const SESSION_AUDIENCE: &str = "stagely-agent-session";
/// Audience of log-read tokens.
pub const LOGS_AUDIENCE: &str = "stagely-job-logs";
/// Issuer of every gateway token.
pub const ISSUER: &str = "stagely-operator";

/// The shortest signing key accepted, in bytes (HS256 wants at least the hash size).
pub const MIN_KEY_LEN: usize = 32;

/// The HMAC key that signs and verifies agent tokens. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// A key from raw bytes; at least [`MIN_KEY_LEN`] of them.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Self, TokenError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(TokenError::KeyTooShort { len: bytes.len() });
        }
        Ok(Self(bytes))
    }

    /// A fresh random key (tokens it signs die with the process).
    pub fn generate() -> Result<Self, TokenError> {
        Ok(Self(random_bytes(MIN_KEY_LEN).map_err(TokenError::Random)?))
    }
}

/// The claims of an agent token (enrollment or session).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AgentClaims {
    /// Always [`ISSUER`].
    pub iss: String,
    /// [`ENROLLMENT_AUDIENCE`] or [`SESSION_AUDIENCE`].
    pub aud: String,
    /// The agent id the token was minted for.
    pub sub: String,
    /// Unique id of this token (enrollment tokens are refused the second time).
    pub jti: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    /// The one object the agent works for.
    pub scope: Scope,
    /// The type of the CloudProvider the VM was started through (enrollment tokens minted for a
    /// VM): the `provider` label of its provisioning time, observed when its agent enrolls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

impl AgentClaims {
    /// Enrollment claims for `agent_id` in `scope`, valid for `ttl` from now.
    pub fn enrollment(scope: &Scope, agent_id: &str, ttl: Duration) -> Result<Self, TokenError> {
        Self::new(ENROLLMENT_AUDIENCE, scope, agent_id, ttl)
    }

    /// When the token was minted, for an enrollment token just before its VM was created.
    pub fn issued_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.iat)
    }

    fn new(aud: &str, scope: &Scope, agent_id: &str, ttl: Duration) -> Result<Self, TokenError> {
        let now = unix_now();
        Ok(Self {
            iss: ISSUER.to_owned(),
            aud: aud.to_owned(),
            sub: agent_id.to_owned(),
            jti: new_id()?,
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
            scope: scope.clone(),
            provider: None,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct LogClaims {
    iss: String,
    aud: String,
    sub: String,
    iat: u64,
    exp: u64,
}

/// Which kind of agent token a HELLO carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// The single-use enrollment token.
    Enrollment,
    /// A session token from an earlier HELLO_ACK.
    Session,
}

/// Why a token was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Bad signature, malformed, wrong issuer or audience.
    #[error("the token is not valid")]
    Invalid,
    /// Past its expiry.
    #[error("the token has expired")]
    Expired,
    /// An enrollment token presented a second time.
    #[error("the enrollment token was already used")]
    Replayed,
    /// Minted for another agent or object.
    #[error("the token is for another agent or object")]
    WrongScope,
    /// The signing key is too short.
    #[error("the signing key is {len} bytes; at least {MIN_KEY_LEN} are needed")]
    KeyTooShort {
        /// Its length.
        len: usize,
    },
    /// No randomness for a key or token id.
    #[error("failed to read random bytes: {0}")]
    Random(#[source] std::io::Error),
    /// Signing failed.
    #[error("failed to sign a token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

impl TokenError {
    /// The protocol error code an agent is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Invalid => ErrorCode::InvalidToken,
            TokenError::Expired => ErrorCode::ExpiredToken,
            TokenError::Replayed => ErrorCode::TokenReplayed,
            TokenError::WrongScope => ErrorCode::WrongScope,
            TokenError::KeyTooShort { .. } | TokenError::Random(_) | TokenError::Sign(_) => ErrorCode::Internal,
        }
    }
}

/// Signs and verifies the gateway's tokens, and remembers which enrollment tokens were used.
///
/// The used-token set here is in memory; with Redis configured the gateway also records each
/// used token there, so a restarted operator refuses a replay too.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    agent_validation: Validation,
    logs_validation: Validation,
    /// Used enrollment tokens: a digest of each id (16 bytes, not a string), with its expiry.
    used: Mutex<HashMap<[u8; 16], u64>>,
    /// The key of [`TokenKeys::secrets_mac`], derived from the signing key.
    secrets_key: [u8; 32],
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys").finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// Keys from `key`; tokens are accepted up to `leeway` past their expiry (clock skew).
    pub fn new(key: &SigningKey, leeway: Duration) -> Self {
        let validation = |audiences: &[&str]| {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.leeway = leeway.as_secs();
            validation.set_audience(audiences);
            validation.set_issuer(&[ISSUER]);
            validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
            validation
        };
        Self {
            encoding: EncodingKey::from_secret(&key.0),
            decoding: DecodingKey::from_secret(&key.0),
            agent_validation: validation(&[ENROLLMENT_AUDIENCE, SESSION_AUDIENCE]),
            logs_validation: validation(&[LOGS_AUDIENCE]),
            used: Mutex::new(HashMap::new()),
            secrets_key: {
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key.0).expect("HMAC accepts any key length");
                mac.update(b"stagely/secrets-digest/v1");
                mac.finalize().into_bytes().into()
            },
        }
    }

    /// A MAC keyed by the operator's secret, for digests of secret values that objects show
    /// (`status.deployment.secretsDigest`): unlike a plain hash, nobody who can read the status
    /// can test guesses of a secret against it.
    pub fn secrets_mac(&self) -> Hmac<sha2::Sha256> {
        Hmac::<sha2::Sha256>::new_from_slice(&self.secrets_key).expect("HMAC accepts any key length")
    }

    /// Signs `claims` as they are (tests use it to make expired or foreign tokens).
    pub fn sign(&self, claims: &AgentClaims) -> Result<Sensitive, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map(Sensitive)
            .map_err(TokenError::Sign)
    }

    /// A single-use enrollment token for `agent_id` in `scope`, valid for `ttl`.
    pub fn mint_enrollment(&self, scope: &Scope, agent_id: &str, ttl: Duration) -> Result<Sensitive, TokenError> {
        self.sign(&AgentClaims::enrollment(scope, agent_id, ttl)?)
    }

    /// [`TokenKeys::mint_enrollment`] for a VM started through a CloudProvider of type
    /// `provider` (see [`AgentClaims::provider`]).
    pub fn mint_vm_enrollment(
        &self,
        scope: &Scope,
        agent_id: &str,
        ttl: Duration,
        provider: &str,
    ) -> Result<Sensitive, TokenError> {
        let mut claims = AgentClaims::enrollment(scope, agent_id, ttl)?;
        claims.provider = Some(provider.to_owned());
        self.sign(&claims)
    }

    /// A session token for `agent_id` in `scope`, valid for `ttl`.
    pub fn mint_session(&self, scope: &Scope, agent_id: &str, ttl: Duration) -> Result<Sensitive, TokenError> {
        self.sign(&AgentClaims::new(SESSION_AUDIENCE, scope, agent_id, ttl)?)
    }

    /// A token that reads the logs of `job_id`, valid for `ttl`.
    pub fn mint_logs(&self, job_id: &str, ttl: Duration) -> Result<Sensitive, TokenError> {
        let now = unix_now();
        let claims = LogClaims {
            iss: ISSUER.to_owned(),
            aud: LOGS_AUDIENCE.to_owned(),
            sub: job_id.to_owned(),
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map(Sensitive)
            .map_err(TokenError::Sign)
    }

    /// Checks an agent token's signature, expiry and agent id. Does not consume an enrollment
    /// token: call [`TokenKeys::consume`] once everything else about the HELLO is accepted.
    pub fn verify_agent(&self, token: &str, agent_id: &str) -> Result<(AgentClaims, TokenKind), TokenError> {
        let claims = jsonwebtoken::decode::<AgentClaims>(token, &self.decoding, &self.agent_validation)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?
            .claims;
        if claims.sub != agent_id {
            return Err(TokenError::WrongScope);
        }
        let kind = if claims.aud == ENROLLMENT_AUDIENCE { TokenKind::Enrollment } else { TokenKind::Session };
        Ok((claims, kind))
    }

    /// Marks an enrollment token used; refuses one used before.
    pub fn consume(&self, claims: &AgentClaims) -> Result<(), TokenError> {
        let mut used = self.used.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if used.len() % 1024 == 1023 {
            let now = unix_now();
            // Kept past expiry by a day, well beyond any leeway, so a token is never accepted twice.
            used.retain(|_, exp| exp.saturating_add(86_400) > now);
        }
        if used.insert(jti_digest(&claims.jti), claims.exp).is_some() {
            return Err(TokenError::Replayed);
        }
        Ok(())
    }

    /// Forgets that an enrollment token was used, when recording it elsewhere failed and the
    /// agent is told to retry.
    pub fn release(&self, claims: &AgentClaims) {
        self.used.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&jti_digest(&claims.jti));
    }

    /// The job id a log-read token grants.
    pub fn verify_logs(&self, token: &str) -> Result<String, TokenError> {
        jsonwebtoken::decode::<LogClaims>(token, &self.decoding, &self.logs_validation)
            .map(|data| data.claims.sub)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })
    }
}

/// The first 16 bytes of the SHA-256 of a token id: what is kept of a used token.
fn jti_digest(jti: &str) -> [u8; 16] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(jti.as_bytes());
    let mut first = [0; 16];
    first.copy_from_slice(&digest[..16]);
    first
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_bytes(len: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0; len];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn new_id() -> Result<String, TokenError> {
    let bytes = random_bytes(16).map_err(TokenError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use stagely_api::protocol::ScopeKind;

    use super::*;

    fn scope() -> Scope {
        Scope { kind: ScopeKind::BuildJob, namespace: "team-a".into(), name: "api-amd64".into(), uid: "u-1".into() }
    }

    fn keys() -> TokenKeys {
        TokenKeys::new(&SigningKey::generate().unwrap(), Duration::ZERO)
    }

    #[test]
    fn enrollment_is_single_use_and_bound_to_its_agent() {
        let keys = keys();
        let token = keys.mint_enrollment(&scope(), "agent-1", Duration::from_secs(60)).unwrap();
        assert!(matches!(keys.verify_agent(token.expose(), "agent-2"), Err(TokenError::WrongScope)));
        let (claims, kind) = keys.verify_agent(token.expose(), "agent-1").unwrap();
        assert_eq!((kind, claims.scope), (TokenKind::Enrollment, scope()));
        let (claims, _) = keys.verify_agent(token.expose(), "agent-1").unwrap();
        keys.consume(&claims).unwrap();
        assert!(matches!(keys.consume(&claims), Err(TokenError::Replayed)));
    }

    #[test]
    fn a_vm_enrollment_names_its_provider_and_when_it_was_minted() {
        let keys = keys();
        let before = SystemTime::now() - Duration::from_secs(1);
        let token = keys.mint_vm_enrollment(&scope(), "agent-1", Duration::from_secs(60), "hetzner").unwrap();
        let (claims, kind) = keys.verify_agent(token.expose(), "agent-1").unwrap();
        assert_eq!((kind, claims.provider.as_deref()), (TokenKind::Enrollment, Some("hetzner")));
        assert!(before <= claims.issued_at() && claims.issued_at() <= SystemTime::now());
        let plain = keys.mint_enrollment(&scope(), "agent-1", Duration::from_secs(60)).unwrap();
        assert_eq!(keys.verify_agent(plain.expose(), "agent-1").unwrap().0.provider, None);
    }

    #[test]
    fn tokens_are_told_apart_and_foreign_keys_refused() {
        let keys = keys();
        let logs = keys.mint_logs("job-1", Duration::from_secs(60)).unwrap();
        assert!(matches!(keys.verify_agent(logs.expose(), "job-1"), Err(TokenError::Invalid)));
        assert_eq!(keys.verify_logs(logs.expose()).unwrap(), "job-1");
        let session = keys.mint_session(&scope(), "agent-1", Duration::from_secs(60)).unwrap();
        assert!(matches!(keys.verify_logs(session.expose()), Err(TokenError::Invalid)));
        assert_eq!(keys.verify_agent(session.expose(), "agent-1").unwrap().1, TokenKind::Session);
        let other = TokenKeys::new(&SigningKey::generate().unwrap(), Duration::ZERO);
        assert!(matches!(other.verify_agent(session.expose(), "agent-1"), Err(TokenError::Invalid)));
    }

    #[test]
    fn expired_tokens_and_short_keys_are_refused() {
        let keys = keys();
        let mut claims = AgentClaims::enrollment(&scope(), "agent-1", Duration::ZERO).unwrap();
        claims.exp -= 10;
        let token = keys.sign(&claims).unwrap();
        assert!(matches!(keys.verify_agent(token.expose(), "agent-1"), Err(TokenError::Expired)));
        assert!(matches!(SigningKey::from_bytes(vec![1; 8]), Err(TokenError::KeyTooShort { len: 8 })));
        assert!(!format!("{:?}", SigningKey::from_bytes(vec![b'k'; 40]).unwrap()).contains("kkkk"));
    }
}
