//! Masking of secret values in everything the agent reports: each command's output is masked
//! line by line before it leaves as LOG, with every secret value the agent has received.

use std::sync::{Arc, RwLock};

/// What a masked value is replaced with.
pub const MASK: &str = "****";

/// The known secret values; cheap to clone, shared by every job.
#[derive(Clone, Default, Debug)]
pub struct Masker {
    values: Arc<RwLock<Vec<String>>>,
}

impl Masker {
    /// An empty masker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret value. A multi-line value is also masked line by line, because output is
    /// masked one line at a time.
    pub fn add(&self, value: &str) {
        let mut candidates = vec![value.to_owned()];
        if value.contains('\n') {
            candidates.extend(value.lines().map(str::trim).filter(|l| l.len() >= 4).map(str::to_owned));
        }
        let mut values = self.values.write().expect("masker lock");
        for candidate in candidates {
            if !candidate.is_empty() && !values.contains(&candidate) {
                values.push(candidate);
            }
        }
        // Longest first, so a value containing another is masked whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }

    /// `text` with every known value replaced by [`MASK`].
    pub fn mask(&self, text: &str) -> String {
        let values = self.values.read().expect("masker lock");
        let mut out = text.to_owned();
        for value in values.iter() {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), MASK);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_known_value_longest_first() {
        let masker = Masker::new();
        masker.add("hunter2");
        masker.add("hunter2-extended");
        masker.add("");
        assert_eq!(masker.mask("pw=hunter2-extended and hunter2"), "pw=**** and ****");
        assert_eq!(masker.mask("nothing here"), "nothing here");
    }

    #[test]
    fn masks_the_lines_of_a_multi_line_value() {
        let masker = Masker::new();
        masker.add("-----BEGIN KEY-----\nMIIEabcdef\n-----END KEY-----\n");
        assert_eq!(masker.mask("line: MIIEabcdef"), "line: ****");
        let clone = masker.clone();
        clone.add("later");
        assert_eq!(masker.mask("later"), "****", "clones share their values");
    }
}
