//! Looking for a secret value where it must not be: the forms it could take (raw, base64 at any
//! alignment, hex, its halves), and a search of bytes, of files and of whole directory trees,
//! gzip files decompressed. For tests that show a value does not leak.

use std::path::{Path, PathBuf};

use base64::Engine as _;

/// A value and the forms it is looked for in.
#[derive(Clone, Debug)]
pub struct Needle {
    forms: Vec<(String, Vec<u8>)>,
}

/// Where a form of a [`Needle`] was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Where: a file, or what else was searched (`redis key …`, `Environment ns/name`).
    pub place: String,
    /// Which form (`raw`, `base64`, …).
    pub form: String,
}

impl std::fmt::Display for Hit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.place, self.form)
    }
}

impl Needle {
    /// `value` as it is; base64 (standard and URL-safe alphabets) of it at each of the three
    /// alignments it can have inside a longer encoded text, without the characters its
    /// neighbours decide; lowercase and uppercase hex of its bytes; and, when it is at least 16
    /// bytes long, its first and second halves (a truncated or split copy).
    pub fn new(value: &str) -> Self {
        let bytes = value.as_bytes();
        let mut forms = vec![("raw".to_owned(), bytes.to_vec())];
        for (alphabet, engine) in [
            ("base64", &base64::engine::general_purpose::STANDARD_NO_PAD),
            ("base64url", &base64::engine::general_purpose::URL_SAFE_NO_PAD),
        ] {
            for shift in 0..3usize {
                let mut shifted = vec![0u8; shift];
                shifted.extend_from_slice(bytes);
                let encoded = engine.encode(&shifted);
                // Characters wholly made of the value's bits: after the shift's, before the tail's.
                let start = (shift * 8).div_ceil(6);
                let end = (shifted.len() * 8) / 6;
                if end > start {
                    forms.push((format!("{alphabet} at offset {shift}"), encoded.as_bytes()[start..end].to_vec()));
                }
            }
        }
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        forms.push(("hex".to_owned(), hex.clone().into_bytes()));
        forms.push(("HEX".to_owned(), hex.to_uppercase().into_bytes()));
        if bytes.len() >= 16 {
            let half = bytes.len() / 2;
            forms.push(("first half".to_owned(), bytes[..half].to_vec()));
            forms.push(("second half".to_owned(), bytes[half..].to_vec()));
        }
        forms.dedup_by(|a, b| a.1 == b.1);
        Self { forms }
    }

    /// The names of the forms looked for.
    pub fn forms(&self) -> Vec<&str> {
        self.forms.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// The forms found in `haystack`, each a [`Hit`] at `place`.
    pub fn find(&self, place: &str, haystack: &[u8]) -> Vec<Hit> {
        self.forms
            .iter()
            .filter(|(_, form)| contains(haystack, form))
            .map(|(name, _)| Hit { place: place.to_owned(), form: name.clone() })
            .collect()
    }

    /// The forms found in the file at `path`: its bytes, and when it is gzip (by its magic
    /// bytes), its decompressed bytes too (`gzip -dc`).
    pub fn find_in_file(&self, path: &Path) -> std::io::Result<Vec<Hit>> {
        let bytes = std::fs::read(path)?;
        let place = path.display().to_string();
        let mut hits = self.find(&place, &bytes);
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let out = std::process::Command::new("gzip").arg("-dc").arg(path).output()?;
            if !out.status.success() {
                return Err(std::io::Error::other(format!(
                    "gzip -dc {place}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            hits.extend(self.find(&format!("{place} (gunzipped)"), &out.stdout));
        }
        Ok(hits)
    }

    /// The forms found in every regular file under `dir` (symbolic links are not followed),
    /// except the directories `skip` names; with the number of files read.
    pub fn find_in_tree(&self, dir: &Path, skip: &[PathBuf]) -> std::io::Result<(Vec<Hit>, usize)> {
        let mut hits = Vec::new();
        let mut files = 0;
        let mut stack = vec![dir.to_owned()];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Removed while we looked (a log rotated, an instance torn down).
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            for entry in entries {
                let entry = entry?;
                let path = entry.path();
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    if !skip.contains(&path) {
                        stack.push(path);
                    }
                } else if kind.is_file() {
                    match self.find_in_file(&path) {
                        Ok(found) => hits.extend(found),
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(err) => return Err(err),
                    }
                    files += 1;
                }
            }
        }
        Ok((hits, files))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// A new value unique to one test: `prefix` and 32 random hex digits. Only `[a-z0-9-]`, so JSON,
/// YAML, shell and URL escaping leave it as it is: its escaped forms are its raw form.
pub fn unique_value(prefix: &str) -> String {
    let mut random = [0u8; 16];
    getrandom::fill(&mut random).expect("the system's random source");
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_form_inside_longer_text() {
        let value = "canary-0123456789abcdef0123456789abcdef";
        let needle = Needle::new(value);
        assert!(needle.find("x", b"nothing here").is_empty());
        assert_eq!(needle.find("x", format!("a {value} b").as_bytes())[0].form, "raw");
        for prefix in ["", "a", "ab", "abc"] {
            let engine = base64::engine::general_purpose::STANDARD;
            let encoded = engine.encode(format!("{prefix}{value}!?"));
            let hits = needle.find("x", encoded.as_bytes());
            assert!(hits.iter().any(|h| h.form.starts_with("base64 at")), "{prefix:?}: {encoded}: {hits:?}");
            let url = base64::engine::general_purpose::URL_SAFE.encode(format!("{prefix}{value}~~~"));
            assert!(!needle.find("x", url.as_bytes()).is_empty(), "{prefix:?}: {url}");
        }
        let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(needle.find("x", hex.as_bytes()).iter().any(|h| h.form == "hex"));
        assert!(needle.find("x", &value.as_bytes()[..20]).iter().any(|h| h.form == "first half"));
    }

    #[test]
    fn reads_trees_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let value = unique_value("canary");
        let needle = Needle::new(&value);
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::create_dir_all(dir.path().join("skipped")).unwrap();
        std::fs::write(dir.path().join("a/b/plain"), format!("x{value}y")).unwrap();
        std::fs::write(dir.path().join("skipped/plain"), &value).unwrap();
        std::fs::write(dir.path().join("a/clean"), "nothing").unwrap();
        let gz = dir.path().join("a/layer");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s '{value}' | gzip -c > '{}'", gz.display()))
            .status()
            .unwrap();
        assert!(out.success());
        let (hits, files) = needle.find_in_tree(dir.path(), &[dir.path().join("skipped")]).unwrap();
        assert_eq!(files, 3);
        let places: Vec<_> = hits.iter().filter(|h| h.form == "raw").map(|h| h.place.clone()).collect();
        assert_eq!(places.len(), 2, "{hits:?}");
        assert!(places.iter().any(|p| p.ends_with("a/b/plain")));
        assert!(places.iter().any(|p| p.ends_with("a/layer (gunzipped)")));
    }
}
