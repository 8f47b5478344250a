//! The one reading of a request path that routing and the upstream both get.
//!
//! Upstreams differ in how they read a path: some decode `%2F` before they
//! resolve `..`, some take `\` for `/`, some merge `//`, Java servlets drop
//! `;params`. A path that one reading maps onto a keyed route and another onto
//! a public one would let a request walk past its key. So the path is brought
//! to one form before routing, that form is what goes upstream, and whatever
//! still reads differently across upstreams is refused.

use std::borrow::Cow;

use super::headers::hex_value;
use crate::config::EscapedSlashes;

/// Why a path is refused (`400 bad_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    #[error("the path holds an encoded slash or a backslash")]
    EscapedSlash,
    #[error("the path holds a `.` or `..` segment")]
    DotSegment,
    #[error("the path holds a malformed percent escape")]
    BadEscape,
    #[error("the path does not start with '/'")]
    NotAbsolute,
}

/// The path to route on and to forward: percent-encoded unreserved characters
/// decoded (`%6F` → `o`, `%2E` → `.`), runs of `/` merged into one. Refuses dot
/// segments (also `..;x`, which servlet containers read as `..`), malformed
/// escapes, and, unless `escaped_slashes` is `pass`, `%2F`, `%5C` and `\`. With
/// `pass` those stay as sent but still end a segment for the dot-segment check.
/// Borrows when the path is already in that form, as nearly every path is.
pub fn normalize(path: &str, escaped_slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathRefusal> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        // `*` (OPTIONS) and authority-form targets carry no path to route on.
        return if path == "*" { Ok(Cow::Borrowed(path)) } else { Err(PathRefusal::NotAbsolute) };
    }
    if is_plain(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) =
                    (bytes.get(i + 1).copied().and_then(hex_value), bytes.get(i + 2).copied().and_then(hex_value))
                else {
                    return Err(PathRefusal::BadEscape);
                };
                let decoded = hi << 4 | lo;
                if is_unreserved(decoded) {
                    out.push(decoded);
                } else if decoded == b'/' || decoded == b'\\' {
                    if escaped_slashes == EscapedSlashes::Reject {
                        return Err(PathRefusal::EscapedSlash);
                    }
                    out.extend_from_slice(&bytes[i..i + 3]);
                } else {
                    out.extend_from_slice(&bytes[i..i + 3]);
                }
                i += 3;
                continue;
            }
            b'\\' if escaped_slashes == EscapedSlashes::Reject => return Err(PathRefusal::EscapedSlash),
            b'/' if out.last() == Some(&b'/') => {}
            _ => out.push(b),
        }
        i += 1;
    }
    if has_dot_segment(&out) {
        return Err(PathRefusal::DotSegment);
    }
    // Only ASCII came in and only ASCII was decoded.
    String::from_utf8(out).map(Cow::Owned).map_err(|_| PathRefusal::BadEscape)
}

/// Nothing to decode, merge or check: no `%`, no `\`, no `//`, no segment
/// starting with `.`.
fn is_plain(bytes: &[u8]) -> bool {
    let mut previous = 0u8;
    for &b in bytes {
        match b {
            b'%' | b'\\' => return false,
            b'/' | b'.' if previous == b'/' => return false,
            _ => {}
        }
        previous = b;
    }
    true
}

/// Whether a segment, ended by `/`, `\`, `%2F` or `%5C` and read up to its
/// first `;` or `%3B`, is `.` or `..`.
fn has_dot_segment(path: &[u8]) -> bool {
    let mut i = 0;
    while i < path.len() {
        let start = i;
        let mut end = path.len();
        let mut next = path.len();
        while i < path.len() {
            if path[i] == b'/' || path[i] == b'\\' {
                (end, next) = (i, i + 1);
                break;
            }
            if path[i] == b'%' && path.len() >= i + 3 {
                let escaped = &path[i + 1..i + 3];
                if escaped.eq_ignore_ascii_case(b"2f") || escaped.eq_ignore_ascii_case(b"5c") {
                    (end, next) = (i, i + 3);
                    break;
                }
            }
            i += 1;
        }
        let segment = &path[start..end];
        // `;` starts a servlet path parameter, also as `%3B` (decoded before it is cut off).
        let params = segment
            .windows(3)
            .position(|w| w.eq_ignore_ascii_case(b"%3b"))
            .into_iter()
            .chain(segment.iter().position(|&b| b == b';'))
            .min();
        let name = params.map_or(segment, |at| &segment[..at]);
        if name == b"." || name == b".." {
            return true;
        }
        i = next;
    }
    false
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REJECT: EscapedSlashes = EscapedSlashes::Reject;
    const PASS: EscapedSlashes = EscapedSlashes::Pass;

    #[test]
    fn plain_paths_are_borrowed_unchanged() {
        for path in ["/", "/v1/orders", "/v1/orders/42", "/a.b/c..d/e.", "/.well-known/x", "/a/b;c=d", "*"] {
            let normalized = normalize(path, REJECT);
            if path.contains("/.") {
                assert_eq!(normalized.as_deref(), Ok(path), "{path}");
            } else {
                assert!(matches!(normalized, Ok(Cow::Borrowed(p)) if p == path), "{path}");
            }
        }
    }

    #[test]
    fn encoded_slashes_are_refused_by_default() {
        for path in [
            "/public/..%2Fv1/orders",
            "/public/%2E%2E%2Fv1/orders",
            "/public%2F..%2Fv1%2Forders",
            "/public/x%2fy",
            "/public/x%5Cy",
            "/public\\..\\v1",
            "/public/a\\b",
        ] {
            assert_eq!(normalize(path, REJECT), Err(PathRefusal::EscapedSlash), "{path}");
        }
    }

    #[test]
    fn passed_escaped_slashes_still_end_segments_for_dot_checks() {
        assert_eq!(normalize("/public/..%2Fv1/orders", PASS), Err(PathRefusal::DotSegment));
        assert_eq!(normalize("/public%2F..%2Fv1%2Forders", PASS), Err(PathRefusal::DotSegment));
        assert_eq!(normalize("/public/%2E%2E%5Cv1", PASS), Err(PathRefusal::DotSegment));
        assert_eq!(normalize("/public\\..\\v1", PASS), Err(PathRefusal::DotSegment));
        assert_eq!(normalize("/files/a%2Fb", PASS).as_deref(), Ok("/files/a%2Fb"));
        assert_eq!(normalize("/files/a\\b", PASS).as_deref(), Ok("/files/a\\b"));
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for path in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/.",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "/a/%2e",
            "/public/..;/v1/orders",
            "/public/..%3B/v1/orders",
            "/.%3b",
            "/public/..;jsessionid=1/v1",
            "/public/.;x/v1",
            "/a/%2E./b",
            "//..//v1",
        ] {
            assert_eq!(normalize(path, REJECT), Err(PathRefusal::DotSegment), "{path}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_so_routes_see_what_upstreams_see() {
        assert_eq!(normalize("/v1/%6Frders", REJECT).as_deref(), Ok("/v1/orders"));
        assert_eq!(normalize("/%76%31/orders", REJECT).as_deref(), Ok("/v1/orders"));
        assert_eq!(normalize("/a%7Eb%2d%5F", REJECT).as_deref(), Ok("/a~b-_"));
        // Reserved and non-ASCII escapes keep their meaning and their spelling.
        assert_eq!(normalize("/q/a%20b%3F%C3%A9", REJECT).as_deref(), Ok("/q/a%20b%3F%C3%A9"));
    }

    #[test]
    fn runs_of_slashes_are_merged() {
        assert_eq!(normalize("//v1/orders", REJECT).as_deref(), Ok("/v1/orders"));
        assert_eq!(normalize("/v1///orders//", REJECT).as_deref(), Ok("/v1/orders/"));
    }

    #[test]
    fn malformed_escapes_and_relative_targets_are_refused() {
        for path in ["/a%", "/a%2", "/a%zz", "/%G0"] {
            assert_eq!(normalize(path, REJECT), Err(PathRefusal::BadEscape), "{path}");
        }
        assert_eq!(normalize("v1/orders", REJECT), Err(PathRefusal::NotAbsolute));
        assert_eq!(normalize("", REJECT), Err(PathRefusal::NotAbsolute));
    }

    /// Decodes every escape and resolves `\` as `/`: the most generous reading an
    /// upstream might apply.
    fn upstream_reading(path: &str) -> Vec<String> {
        let mut decoded = Vec::new();
        let bytes = path.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match (
                bytes[i],
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                (b'%', Some(hi), Some(lo)) => {
                    decoded.push(hi << 4 | lo);
                    i += 3;
                }
                (b, _, _) => {
                    decoded.push(b);
                    i += 1;
                }
            }
        }
        let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
        decoded.split('/').filter(|s| !s.is_empty()).map(|s| s.split(';').next().unwrap_or("").to_owned()).collect()
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just("//".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%2F".to_owned()),
            Just("%2f".to_owned()),
            Just("%5C".to_owned()),
            Just("\\".to_owned()),
            Just(";".to_owned()),
            Just("%3B".to_owned()),
            Just("%".to_owned()),
            Just("%6F".to_owned()),
            Just("%20".to_owned()),
            "[a-z0-9]{1,4}",
            "%[0-9A-Fa-f]{2}",
            "[ -~]{1,3}",
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn normalize_never_panics(path in "\\PC{0,40}", pass in any::<bool>()) {
            let _ = normalize(&path, if pass { PASS } else { REJECT });
        }

        /// Whatever keygate accepts, it routes on a path whose segments an upstream
        /// decoding everything reads the same way, with no dot segment to resolve:
        /// a prefix match on the normalized path holds for the upstream's reading.
        #[test]
        fn accepted_paths_read_alike_for_keygate_and_a_decoding_upstream(path in path_strategy()) {
            if let Ok(normalized) = normalize(&path, REJECT) {
                let ours = upstream_reading(&normalized);
                prop_assert!(!ours.iter().any(|s| s == "." || s == ".."), "{path} → {normalized}");
                prop_assert_eq!(&ours, &upstream_reading(&path), "{} → {}", path, normalized);
                prop_assert!(!normalized.contains("//"));
                prop_assert!(!normalized.contains('\\'));
                // Normalizing is idempotent: what goes upstream reads the same again.
                let again = normalize(&normalized, REJECT);
                prop_assert_eq!(again.as_deref(), Ok(&*normalized));
            }
        }

        #[test]
        fn passed_paths_never_hold_dot_segments_in_any_reading(path in path_strategy()) {
            if let Ok(normalized) = normalize(&path, PASS) {
                let reading = upstream_reading(&normalized);
                prop_assert!(!reading.iter().any(|s| s == "." || s == ".."), "{path} → {normalized}");
            }
        }
    }
}
