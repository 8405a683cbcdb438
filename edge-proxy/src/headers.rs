//! Header rules both paths ([`crate::fast`] and [`crate::proxy`]) share: which headers describe
//! one connection rather than the message.

/// Headers that describe one connection, not the message: never forwarded either way
/// (RFC 9110 §7.6.1), nor are those the `Connection` header names. `upgrade` is set again on a
/// request the proxy upgrades.
pub(crate) const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is in [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop))
}

/// The comma-separated tokens of a header value (`Connection`, `Transfer-Encoding`).
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|token| !token.is_empty())
}

/// Whether a `Connection` header value among `connection` names `name`.
pub(crate) fn named_in<V: AsRef<[u8]>>(connection: &[V], name: &str) -> bool {
    connection.iter().any(|value| tokens(value.as_ref()).any(|token| token.eq_ignore_ascii_case(name.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens_name_headers_case_insensitively() {
        let connection: [&[u8]; 2] = [b"keep-alive, X-Secret-Hop", b" te"];
        assert!(named_in(&connection, "x-secret-hop"));
        assert!(named_in(&connection, "TE"));
        assert!(!named_in(&connection, "x-kept"));
        assert!(is_hop_by_hop("Transfer-Encoding") && is_hop_by_hop("upgrade") && !is_hop_by_hop("host"));
    }
}
