//! Header rules both paths ([`crate::fast`] and [`crate::proxy`]) share: which headers describe
//! one connection rather than the message, and how a response's body may be framed.

/// The longest request head either path takes; a longer one gets 431.
pub(crate) const MAX_REQUEST_HEAD: usize = 64 * 1024;

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

/// The transfer codings of a response, gathered over its `Transfer-Encoding` lines.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TransferCodings {
    count: u8,
    last_chunked: bool,
}

impl TransferCodings {
    /// Adds the codings of one `Transfer-Encoding` line.
    pub(crate) fn add(&mut self, value: &[u8]) {
        for coding in tokens(value) {
            self.count = self.count.saturating_add(1);
            self.last_chunked = coding.eq_ignore_ascii_case(b"chunked");
        }
    }

    /// Whether the body is chunked, or why the proxy cannot pass the response on with one
    /// framing the client reads as the app meant it. As nginx, it refuses a `Content-Length`
    /// beside `Transfer-Encoding` (a sign of response splitting, RFC 9112 §6.3) and codings
    /// other than a lone `chunked` (a client could not undo them once the proxy drops the
    /// hop-by-hop header).
    pub(crate) fn chunked(self, has_length: bool) -> Result<bool, &'static str> {
        match (self.count, self.last_chunked, has_length) {
            (0, _, _) => Ok(false),
            (1, true, false) => Ok(true),
            (1, true, true) => Err("both content-length and transfer-encoding"),
            _ => Err("a transfer coding other than chunked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codings(lines: &[&str], has_length: bool) -> Result<bool, &'static str> {
        let mut codings = TransferCodings::default();
        for line in lines {
            codings.add(line.as_bytes());
        }
        codings.chunked(has_length)
    }

    #[test]
    fn only_a_lone_chunked_coding_without_a_length_frames_a_response() {
        assert_eq!(codings(&[], false), Ok(false));
        assert_eq!(codings(&[], true), Ok(false));
        assert_eq!(codings(&["chunked"], false), Ok(true));
        assert_eq!(codings(&[" Chunked "], false), Ok(true));
        assert!(codings(&["chunked"], true).is_err(), "content-length and transfer-encoding");
        for refused in
            [&["gzip"][..], &["gzip, chunked"], &["gzip", "chunked"], &["chunked, chunked"], &["chunked, gzip"]]
        {
            assert!(codings(refused, false).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn connection_tokens_name_headers_case_insensitively() {
        let connection: [&[u8]; 2] = [b"keep-alive, X-Secret-Hop", b" te"];
        assert!(named_in(&connection, "x-secret-hop"));
        assert!(named_in(&connection, "TE"));
        assert!(!named_in(&connection, "x-kept"));
        assert!(is_hop_by_hop("Transfer-Encoding") && is_hop_by_hop("upgrade") && !is_hop_by_hop("host"));
    }
}
