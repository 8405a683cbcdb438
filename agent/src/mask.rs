//! The agent's shared handle on the one secret masker ([`stagely_api::mask`]): every job adds
//! the secret values it receives, and each command's output is masked line by line with all of
//! them before it leaves as LOG.

use std::sync::{Arc, RwLock};

pub use stagely_api::mask::MASK;
use stagely_api::protocol::Message;

/// The known secret values; cheap to clone, shared by every job.
#[derive(Clone, Default, Debug)]
pub struct Masker {
    inner: Arc<RwLock<stagely_api::mask::Masker>>,
}

impl Masker {
    /// An empty masker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret value (a multi-line value also line by line).
    pub fn add(&self, value: &str) {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner()).add(value);
    }

    /// Adds every secret value `command` carries.
    pub fn add_from(&self, command: &Message) {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner()).add_from(command);
    }

    /// The longest known value, in bytes.
    pub fn longest(&self) -> usize {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner()).longest()
    }

    /// `text` with every known value replaced by [`MASK`].
    pub fn mask(&self, text: &str) -> String {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner()).mask(text).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_their_values() {
        let masker = Masker::new();
        masker.add("-----BEGIN KEY-----\nMIIEabcdef\n-----END KEY-----\n");
        assert_eq!(masker.mask("line: MIIEabcdef"), "line: ***");
        let clone = masker.clone();
        clone.add("later");
        assert_eq!(masker.mask("later"), "***", "clones share their values");
    }
}
