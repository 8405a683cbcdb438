//! Names, tags and labels made from Stagely's keys, for clouds that restrict them: one sanitiser
//! for every provider.
//!
//! Replacing the characters a cloud refuses, or cutting to its length, can map two keys to one
//! name (`a/b` and `a_b`; two long keys with one prefix), and a name is what DigitalOcean and
//! Hetzner adopt an earlier attempt's VM by. So a value that had to change gets a suffix from a
//! hash of the original: two different keys then collide only if the first 32 bits of their
//! SHA-256 do (about one in four billion per pair). A value the cloud accepts as it is stays
//! as it is.

use sha2::{Digest, Sha256};

/// Hex digits of the hash suffix.
const SUFFIX_HEX: usize = 8;

/// `value` in the alphabet `allowed` (other characters become `replacement`), at most `max`
/// characters, starting and ending with an ASCII letter or digit; with `-` and a hash of
/// `value` at its end when anything had to change.
pub fn fit(value: &str, max: usize, allowed: impl Fn(char) -> bool, replacement: char) -> String {
    let edge = |c: char| !c.is_ascii_alphanumeric();
    let clean = value.chars().all(&allowed) && value.len() <= max && !value.starts_with(edge) && !value.ends_with(edge);
    if clean && !value.is_empty() {
        return value.to_owned();
    }
    let mapped: String = value.chars().map(|c| if allowed(c) { c } else { replacement }).collect();
    let hash: String =
        Sha256::digest(value.as_bytes()).iter().take(SUFFIX_HEX / 2).map(|b| format!("{b:02x}")).collect();
    let room = max.saturating_sub(SUFFIX_HEX + 1);
    let head: String = mapped.trim_matches(edge).chars().take(room).collect();
    let head = head.trim_end_matches(edge);
    if head.is_empty() { hash } else { format!("{head}-{hash}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(value: &str) -> String {
        fit(value, 63, |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'), '-')
    }

    #[test]
    fn a_value_the_cloud_accepts_stays_as_it_is() {
        assert_eq!(label("team-a"), "team-a");
        assert_eq!(label("3f2a9c1e-0b7d-4e8a-9c55-1d2e3f4a5b6c"), "3f2a9c1e-0b7d-4e8a-9c55-1d2e3f4a5b6c");
    }

    #[test]
    fn values_that_sanitise_alike_stay_apart() {
        let (a, b) = (label("uid/run:2"), label("uid_run_2"));
        assert_ne!(a, b);
        assert!(a.starts_with("uid-run-2-") && a.len() == "uid-run-2-".len() + SUFFIX_HEX, "{a}");
        assert_eq!(b, "uid_run_2", "valid as it is");
        assert_eq!(label("uid/run:2"), a, "the same value always maps to the same name");
    }

    #[test]
    fn long_values_with_one_prefix_stay_apart_and_fit() {
        let prefix = "x".repeat(70);
        let (a, b) = (label(&format!("{prefix}-a")), label(&format!("{prefix}-b")));
        assert_ne!(a, b);
        for value in [&a, &b] {
            assert!(value.len() <= 63, "{value}");
            assert!(value.chars().next().unwrap().is_ascii_alphanumeric());
            assert!(value.chars().last().unwrap().is_ascii_alphanumeric());
        }
    }

    #[test]
    fn edges_and_empty_values_are_fixed() {
        let edged = label("-x_");
        assert!(edged.starts_with("x-") && !edged.ends_with('_'), "{edged}");
        let empty = label("");
        assert_eq!(empty.len(), SUFFIX_HEX);
        assert_eq!(label("///").len(), SUFFIX_HEX);
    }
}
