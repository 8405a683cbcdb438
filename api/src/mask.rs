//! The one secret masker: the agent masks every line of output it sends, the gateway masks
//! again what it stores (an agent may be old or wrong), and both blot out values the same way.

use std::borrow::Cow;

use crate::protocol::Message;

/// What replaces a secret value.
pub const MASK: &str = "***";

/// Lines of a multi-line secret shorter than this are not masked on their own (a PEM key's
/// closing `=` would otherwise blot out every `=` in the logs).
pub const MIN_LINE_LEN: usize = 6;

/// Known secret values, and how to blot them out of text. `Debug` shows only how many.
#[derive(Default, Clone)]
pub struct Masker {
    /// Longest first, so that a secret containing another is masked whole.
    needles: Vec<String>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker").field("values", &self.needles.len()).finish()
    }
}

impl Masker {
    /// An empty masker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret value: the whole value, and for a multi-line value each of its lines, since
    /// output is masked line by line.
    pub fn add(&mut self, secret: &str) {
        let mut add = |needle: &str| {
            if !needle.is_empty() && !self.needles.iter().any(|n| n == needle) {
                self.needles.push(needle.to_owned());
            }
        };
        add(secret);
        if secret.contains('\n') {
            for line in secret.lines().map(str::trim).filter(|line| line.len() >= MIN_LINE_LEN) {
                add(line);
            }
        }
        self.needles.sort_by_key(|needle| std::cmp::Reverse(needle.len()));
    }

    /// Adds every secret value `command` carries.
    pub fn add_from(&mut self, command: &Message) {
        for secret in secret_values(command) {
            self.add(secret);
        }
    }

    /// Whether no value is known.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// The longest known value, in bytes (how much text around a cut can hide part of one).
    pub fn longest(&self) -> usize {
        self.needles.first().map_or(0, String::len)
    }

    /// `text` with every known value replaced by [`MASK`].
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut text = Cow::Borrowed(text);
        for needle in &self.needles {
            if text.contains(needle.as_str()) {
                text = Cow::Owned(text.replace(needle.as_str(), MASK));
            }
        }
        text
    }
}

/// The secret values a command carries.
pub fn secret_values(command: &Message) -> Vec<&str> {
    let mut values = Vec::new();
    match command {
        Message::Build(build) => {
            values.extend(build.git_token.as_ref().map(|t| t.expose()));
            values.extend(build.registry_auth.as_ref().map(|a| a.password.expose()));
        }
        Message::Deploy(deploy) => {
            values.extend(deploy.git_token.as_ref().map(|t| t.expose()));
            values.extend(deploy.registry_auth.as_ref().map(|a| a.password.expose()));
            values.extend(deploy.secrets.iter().map(|s| s.value.expose()));
        }
        Message::Test(test) => {
            values.extend(test.registry_auth.as_ref().map(|a| a.password.expose()));
        }
        _ => {}
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_whole_values_longest_first_and_lines_of_multi_line_values() {
        let mut masker = Masker::default();
        masker.add("hunter2");
        masker.add("hunter2-extended");
        masker.add("");
        masker.add("-----BEGIN KEY-----\nMIIEpAIBAAKCAQEA\n=\n-----END KEY-----\n");
        assert_eq!(masker.mask("pw=hunter2-extended and hunter2"), "pw=*** and ***");
        assert_eq!(masker.mask("  MIIEpAIBAAKCAQEA\n"), "  ***\n");
        assert_eq!(masker.mask("a = b"), "a = b");
        assert!(matches!(masker.mask("nothing here"), Cow::Borrowed(_)));
        assert!(!format!("{masker:?}").contains("hunter2"));
        assert_eq!(masker.longest(), "-----BEGIN KEY-----\nMIIEpAIBAAKCAQEA\n=\n-----END KEY-----\n".len());
    }
}
