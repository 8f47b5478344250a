//! Reading keys out of requests and cleaning requests before they go upstream.

use std::borrow::Cow;

use http::HeaderValue;
use pingora::http::RequestHeader;

use crate::config::KeyLocation;

/// The first key found, trying `locations` in order. Empty values do not count.
pub fn find_key<'a>(req: &'a RequestHeader, locations: &[KeyLocation]) -> Option<Cow<'a, str>> {
    locations.iter().find_map(|location| match location {
        KeyLocation::Header { name, scheme } => req
            .headers
            .get_all(name)
            .iter()
            .find_map(|value| key_in_header(value, scheme.as_deref()))
            .map(Cow::Borrowed),
        KeyLocation::Query { name } => req.uri.query().and_then(|q| query_param(q, name)),
    })
}

fn key_in_header<'a>(value: &'a HeaderValue, scheme: Option<&str>) -> Option<&'a str> {
    let text = value.to_str().ok()?.trim();
    let key = match scheme {
        None => text,
        Some(scheme) => {
            let (given, rest) = text.split_once(|c: char| c.is_ascii_whitespace())?;
            if !given.eq_ignore_ascii_case(scheme) {
                return None;
            }
            rest.trim()
        }
    };
    (!key.is_empty()).then_some(key)
}

/// The first non-empty value of the parameter `name`, percent-decoded.
fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (!v.is_empty() && decode(k) == name).then(|| decode(v))
    })
}

/// Whether a header location holds a key in the form it expects, so that only
/// those headers are removed (an `Authorization: Basic` meant for the upstream stays).
pub fn header_holds_key(req: &RequestHeader, location: &KeyLocation) -> bool {
    match location {
        KeyLocation::Header { name, scheme } => {
            req.headers.get_all(name).iter().any(|value| key_in_header(value, scheme.as_deref()).is_some())
        }
        KeyLocation::Query { .. } => false,
    }
}

/// The path and query with every parameter named in `names` removed, the others
/// kept in order; `None` when nothing had to be removed.
pub fn strip_query_params<S: AsRef<str>>(path_and_query: &str, names: &[S]) -> Option<String> {
    let (path, query) = path_and_query.split_once('?')?;
    let is_key_param = |pair: &&str| {
        let name = pair.split_once('=').map_or(*pair, |(k, _)| k);
        names.iter().any(|n| decode(name) == n.as_ref())
    };
    if !query.split('&').any(|pair| is_key_param(&pair)) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !pair.is_empty() && !is_key_param(pair)).collect();
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Some(out)
}

/// Percent- and plus-decoding for query components; malformed escapes stay literal.
fn decode(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Longest client-sent request id that is passed on rather than replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `X-Request-Id` when it is short visible ASCII, otherwise a new one.
pub fn request_id(client_sent: Option<&HeaderValue>) -> HeaderValue {
    if let Some(value) = client_sent {
        let bytes = value.as_bytes();
        if !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID_LEN && bytes.iter().all(|b| b.is_ascii_graphic()) {
            return value.clone();
        }
    }
    new_request_id()
}

/// 128 random bits as 32 lowercase hex characters.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n: u128 = rand::random();
    let mut buf = [0u8; 32];
    for slot in buf.iter_mut() {
        *slot = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // Only hex digits: always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    fn default_locations() -> Vec<KeyLocation> {
        vec![
            KeyLocation::Header { name: http::header::AUTHORIZATION, scheme: Some("Bearer".into()) },
            KeyLocation::Header { name: http::HeaderName::from_static("x-api-key"), scheme: None },
            KeyLocation::Query { name: "api_key".into() },
        ]
    }

    #[test]
    fn locations_are_tried_in_order() {
        let r = req("/x?api_key=q", &[("x-api-key", "h"), ("authorization", "Bearer b")]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some("b"));
        let r = req("/x?api_key=q", &[("x-api-key", "h")]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some("h"));
        let r = req("/x?a=1&api_key=q&b=2", &[]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some("q"));
        assert_eq!(find_key(&req("/x?a=1", &[]), &default_locations()), None);
    }

    #[test]
    fn scheme_is_case_insensitive_and_must_match() {
        let locations = default_locations();
        assert_eq!(find_key(&req("/", &[("authorization", "bearer  k1 ")]), &locations).as_deref(), Some("k1"));
        assert_eq!(find_key(&req("/", &[("authorization", "Basic dXNlcg==")]), &locations), None);
        assert_eq!(find_key(&req("/", &[("authorization", "Bearer")]), &locations), None);
    }

    #[test]
    fn empty_values_are_not_keys() {
        assert_eq!(find_key(&req("/?api_key=", &[("x-api-key", " ")]), &default_locations()), None);
    }

    #[test]
    fn query_keys_are_percent_decoded() {
        assert_eq!(find_key(&req("/?api%5Fkey=kg%5Flive_x", &[]), &default_locations()).as_deref(), Some("kg_live_x"));
    }

    #[test]
    fn only_key_shaped_headers_count_as_holding_a_key() {
        let basic = req("/", &[("authorization", "Basic abc")]);
        assert!(!header_holds_key(&basic, &default_locations()[0]));
        let bearer = req("/", &[("authorization", "Bearer abc")]);
        assert!(header_holds_key(&bearer, &default_locations()[0]));
    }

    #[test]
    fn stripping_keeps_other_parameters_in_order() {
        assert_eq!(strip_query_params("/p?a=1&api_key=k&b=2", &["api_key"]).as_deref(), Some("/p?a=1&b=2"));
        assert_eq!(strip_query_params("/p?api_key=k", &["api_key"]).as_deref(), Some("/p"));
        assert_eq!(strip_query_params("/p?api_key=k&api_key=j&c", &["api_key"]).as_deref(), Some("/p?c"));
        assert_eq!(strip_query_params("/p?api%5Fkey=k&z=1", &["api_key"]).as_deref(), Some("/p?z=1"));
        assert_eq!(strip_query_params("/p?a=1", &["api_key"]), None);
        assert_eq!(strip_query_params("/p", &["api_key"]), None);
        assert_eq!(strip_query_params("/p?api_keyx=1", &["api_key"]), None);
    }

    #[test]
    fn decode_handles_malformed_escapes() {
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("a%zz"), "a%zz");
        assert_eq!(decode("a+b%41"), "a bA");
        assert_eq!(decode("%"), "%");
    }

    #[test]
    fn client_request_id_is_kept_when_sane() {
        let sent = HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(&sent)), "abc-123");
        let long = HeaderValue::from_str(&"a".repeat(200)).unwrap();
        assert_ne!(request_id(Some(&long)), long);
        let spaced = HeaderValue::from_static("a b");
        assert_ne!(request_id(Some(&spaced)), "a b");
    }

    #[test]
    fn new_request_ids_are_unique_hex() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(|b| b.is_ascii_hexdigit()));
    }
}
