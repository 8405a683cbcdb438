//! Names Stagely derives for Kubernetes objects and label values: the same input always gives
//! the same name, and names that would not fit are shortened with a hash so that two inputs
//! never share one.

/// Longest Kubernetes object name (a DNS subdomain).
pub const MAX_NAME: usize = 253;
/// Longest Kubernetes label value.
pub const MAX_LABEL_VALUE: usize = 63;

/// The Environment of pull request `number` of Project `project`: `<project>-pr-<number>`,
/// shortened with a hash when it would not fit an object name. The webhook receiver creates it
/// under this name; anything that looks an Environment up by its pull request uses it too.
pub fn environment_name(project: &str, number: i64) -> String {
    fit(&format!("{project}-pr-{number}"), MAX_NAME)
}

/// A label value: at most 63 characters, shortened with a hash when longer.
pub fn label_value(value: &str) -> String {
    fit(value, MAX_LABEL_VALUE)
}

/// `value` if it is at most `max` characters long; else its first characters, `-` and
/// [`short_hash`] of the whole, `max` characters in all (trailing `-`, `.` and `_` of the
/// kept part dropped, so the result is still a valid name).
pub fn fit(value: &str, max: usize) -> String {
    if value.len() <= max {
        return value.to_owned();
    }
    let hash = short_hash(value);
    let keep = max - hash.len() - 1;
    let mut head: String = value.chars().take(keep).collect();
    while head.ends_with(['-', '.', '_']) {
        head.pop();
    }
    format!("{head}-{hash}")
}

/// Eight lowercase base-36 characters derived from `text` (FNV-1a), for shortening names
/// without making two of them equal.
pub fn short_hash(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let alphabet = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..8)
        .map(|_| {
            let c = alphabet[(hash % 36) as usize] as char;
            hash /= 36;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hashes_are_stable_and_differ() {
        assert_eq!(short_hash("a"), short_hash("a"));
        assert_ne!(short_hash("a"), short_hash("b"));
        assert_eq!(short_hash("anything").len(), 8);
    }

    #[test]
    fn environment_names_are_derived_and_fit() {
        assert_eq!(environment_name("shop", 42), "shop-pr-42");
        let long = "p".repeat(MAX_NAME);
        let name = environment_name(&long, 7);
        assert!(name.len() <= MAX_NAME, "{name}");
        assert_ne!(name, environment_name(&long, 8), "two pull requests never share an Environment");
        assert_eq!(name, environment_name(&long, 7));
    }

    #[test]
    fn label_values_fit() {
        assert_eq!(label_value("short"), "short");
        let long = format!("{}-", "x".repeat(70));
        let value = label_value(&long);
        assert!(value.len() <= MAX_LABEL_VALUE && !value.contains("--"), "{value}");
        assert_ne!(value, label_value(&format!("{long}y")));
    }
}
