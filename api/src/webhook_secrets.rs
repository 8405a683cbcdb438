//! The webhook secrets Secret: one Secret, in Stagely's own namespace, holding the
//! `webhookSecret` of every GitHub credentials Secret a Project references, so that the webhook
//! receiver can verify deliveries while reading no other Secret. The operator writes it (it
//! reads the Projects' Secrets anyway); the receiver watches that one Secret by name, which RBAC
//! can grant by `resourceNames` where it cannot grant "the Secrets Projects reference".
//!
//! Each key is `<namespace>_<secret>`: the credentials Secret's namespace and name. Neither a
//! namespace (a DNS label) nor a Secret name (a DNS subdomain) holds `_`, so the key is
//! unambiguous, and both characters sets are allowed in a Secret's data keys.

use std::fmt;
use std::str::FromStr;

/// A Secret's place: `<namespace>/<name>`, as the operator's and receiver's
/// `--webhook-secrets` flag gives it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretLocation {
    /// The namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
}

impl fmt::Display for SecretLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for SecretLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("{s:?} is not <namespace>/<name>");
        let (namespace, name) = s.split_once('/').ok_or_else(invalid)?;
        let label = |part: &str| {
            !part.is_empty()
                && part.len() <= 253
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        if !label(namespace) || !label(name) {
            return Err(invalid());
        }
        Ok(Self { namespace: namespace.to_owned(), name: name.to_owned() })
    }
}

/// The key of the credentials Secret `namespace`/`secret`'s webhook secret.
pub fn key(namespace: &str, secret: &str) -> String {
    format!("{namespace}_{secret}")
}

/// The credentials Secret (namespace, name) a key names; `None` for a key [`key`] did not make.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let (namespace, secret) = key.split_once('_')?;
    (!namespace.is_empty() && !secret.is_empty() && !secret.contains('_')).then_some((namespace, secret))
}

/// The webhook secret a credentials Secret's `webhookSecret` value holds: without the spaces and
/// line ends around it (a Secret made with `--from-file` from a file written by `echo` ends in a
/// newline GitHub never signed with); `None` if nothing is left.
pub fn webhook_secret(value: &[u8]) -> Option<&[u8]> {
    Some(value.trim_ascii()).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_its_secret_and_nothing_else_parses() {
        let made = key("team-a", "github.app");
        assert_eq!(made, "team-a_github.app");
        assert_eq!(parse_key(&made), Some(("team-a", "github.app")));
        for bad in ["nounderscore", "_secret", "team_", "a_b_c"] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_location_is_namespace_slash_name() {
        let location: SecretLocation = "stagely/stagely-webhook-secrets".parse().unwrap();
        assert_eq!(location, SecretLocation { namespace: "stagely".into(), name: "stagely-webhook-secrets".into() });
        assert_eq!(location.to_string(), "stagely/stagely-webhook-secrets");
        for bad in ["stagely", "/name", "ns/", "ns/Name", "ns/a/b"] {
            let err = bad.parse::<SecretLocation>().unwrap_err();
            assert!(err.contains("<namespace>/<name>"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_webhook_secret_is_read_without_the_whitespace_around_it() {
        assert_eq!(webhook_secret(b"whsec\n"), Some(&b"whsec"[..]));
        assert_eq!(webhook_secret(b" wh sec\r\n"), Some(&b"wh sec"[..]), "inner spaces are the secret's");
        assert_eq!(webhook_secret(b" \n"), None);
        assert_eq!(webhook_secret(b""), None);
    }
}
