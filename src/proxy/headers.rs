//! Reading keys out of requests and cleaning requests before they go upstream.

use std::borrow::Cow;

use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

use crate::config::KeyLocation;
use crate::key;
use crate::outcome::new_request_id;

/// Whether `value` has the form of a keygate key (prefix, length, checksum). Only such
/// values are taken as the key and removed: anything else in a key location, such as
/// an application's own JWT in `Authorization: Bearer`, belongs to the upstream.
fn is_key_shaped(value: &str) -> bool {
    key::parse(value).is_ok()
}

/// The presented key: trying `locations` in order, the first value shaped like a key.
/// When none is, the first non-empty value, so that garbage or a mistyped key is still
/// refused as invalid rather than missing. Allocates only for a percent-encoded query.
pub fn find_key<'a>(req: &'a RequestHeader, locations: &[KeyLocation]) -> Option<Cow<'a, str>> {
    let mut first_value: Option<Cow<'a, str>> = None;
    for location in locations {
        match location {
            KeyLocation::Header { name, scheme } => {
                for value in req.headers.get_all(name) {
                    let Some(text) = key_in_header(value, scheme.as_deref()) else { continue };
                    if is_key_shaped(text) {
                        return Some(Cow::Borrowed(text));
                    }
                    first_value.get_or_insert(Cow::Borrowed(text));
                }
            }
            KeyLocation::Query { name } => {
                let Some(query) = req.uri.query() else { continue };
                for text in query_values(query, name) {
                    if is_key_shaped(&text) {
                        return Some(text);
                    }
                    first_value.get_or_insert(text);
                }
            }
        }
    }
    first_value
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

/// The non-empty values of the parameter `name`, percent-decoded, in order.
fn query_values<'q: 'n, 'n>(query: &'q str, name: &'n str) -> impl Iterator<Item = Cow<'q, str>> + 'n {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=')?;
        (!v.is_empty() && decode(k) == name).then(|| decode(v))
    })
}

/// Whether `value` must not reach the upstream: it is shaped like a key, or it is
/// `foreign`, an imported key of another shape that the request presented.
fn is_presented_key(value: &str, foreign: Option<&str>) -> bool {
    is_key_shaped(value) || foreign.is_some_and(|foreign| foreign == value)
}

/// Removes the values shaped like a key, and `foreign` (see [`is_presented_key`]),
/// from the header location `name` (with its `scheme`, if any); the header's other
/// values stay as the client sent them.
pub fn remove_key_values(
    req: &mut RequestHeader,
    name: &HeaderName,
    scheme: Option<&str>,
    foreign: Option<&str>,
) -> pingora::Result<()> {
    let holds_key =
        |value: &HeaderValue| key_in_header(value, scheme).is_some_and(|text| is_presented_key(text, foreign));
    let (mut keys, mut others) = (0usize, 0usize);
    for value in req.headers.get_all(name) {
        if holds_key(value) {
            keys += 1;
        } else {
            others += 1;
        }
    }
    if keys == 0 {
        return Ok(());
    }
    if others == 0 {
        req.remove_header(name);
        return Ok(());
    }
    // Rare: a key beside other values under one name. Only the key goes.
    let kept: Vec<HeaderValue> = req.headers.get_all(name).iter().filter(|v| !holds_key(v)).cloned().collect();
    req.remove_header(name);
    for value in kept {
        req.append_header(name.clone(), value)?;
    }
    Ok(())
}

/// The path and query with the key-shaped values (and `foreign`, see
/// [`is_presented_key`]) of the parameters named in `names` removed, what the
/// upstream gets; `None` when nothing had to be removed.
pub fn strip_key_params<S: AsRef<str>>(path_and_query: &str, names: &[S], foreign: Option<&str>) -> Option<String> {
    strip_params(path_and_query, names, |value| is_presented_key(&decode(value), foreign))
}

/// The path and query with every parameter named in `names` removed whatever its
/// value, what logs show: a mistyped key is still most of a key. `None` when nothing
/// had to be removed.
pub fn strip_query_params<S: AsRef<str>>(path_and_query: &str, names: &[S]) -> Option<String> {
    strip_params(path_and_query, names, |_| true)
}

/// Removes the parameters named in `names` whose raw value `drops` accepts, keeping
/// the others in order.
fn strip_params<S: AsRef<str>>(path_and_query: &str, names: &[S], drops: impl Fn(&str) -> bool) -> Option<String> {
    let (path, query) = path_and_query.split_once('?')?;
    let dropped = |pair: &str| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name);
        names.iter().any(|n| name == n.as_ref()) && drops(value)
    };
    if !query.split('&').any(dropped) {
        return None;
    }
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    let mut separator = '?';
    for pair in query.split('&').filter(|pair| !pair.is_empty() && !dropped(pair)) {
        out.push(separator);
        out.push_str(pair);
        separator = '&';
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

/// The value of one hex digit.
pub(super) fn hex_value(b: u8) -> Option<u8> {
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

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

    /// Distinct, reproducible keys with valid checksums.
    fn test_key(n: u8) -> String {
        let body: String = std::iter::repeat_n(char::from(b'A' + n % 26), key::BODY_LEN).collect();
        key::with_checksum(key::DEFAULT_PREFIX, &body)
    }

    /// Strips every header location of `locations` as the proxy does.
    fn remove_all_keys(req: &mut RequestHeader, locations: &[KeyLocation]) {
        for location in locations {
            if let KeyLocation::Header { name, scheme } = location {
                remove_key_values(req, name, scheme.as_deref(), None).unwrap();
            }
        }
    }

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmF0dXJl";

    #[test]
    fn locations_are_tried_in_order() {
        let (a, h, q) = (test_key(0), test_key(1), test_key(2));
        let bearer = format!("Bearer {a}");
        let r = req(&format!("/x?api_key={q}"), &[("x-api-key", &h), ("authorization", &bearer)]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(a.as_str()));
        let r = req(&format!("/x?api_key={q}"), &[("x-api-key", &h)]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(h.as_str()));
        let r = req(&format!("/x?a=1&api_key={q}&b=2"), &[]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(q.as_str()));
        assert_eq!(find_key(&req("/x?a=1", &[]), &default_locations()), None);
    }

    #[test]
    fn jwt_in_authorization_does_not_shadow_a_key_in_a_later_location() {
        let key = test_key(3);
        let bearer = format!("Bearer {JWT}");
        let r = req("/", &[("authorization", &bearer), ("x-api-key", &key)]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(key.as_str()));
        let r = req(&format!("/?api_key={key}"), &[("authorization", &bearer), ("x-api-key", "typo")]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(key.as_str()));
        // Several values under one name: the key-shaped one, wherever it is.
        let r = req("/", &[("x-api-key", "app-value"), ("x-api-key", &key)]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(key.as_str()));
    }

    #[test]
    fn without_a_key_shaped_value_the_first_non_empty_value_is_presented() {
        // Presented, so the request is refused as invalid_key rather than missing_key.
        let bearer = format!("Bearer {JWT}");
        let r = req("/?api_key=q", &[("x-api-key", "h"), ("authorization", &bearer)]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(JWT));
        let mistyped = with_bad_checksum(&test_key(4));
        let r = req(&format!("/?api_key={mistyped}"), &[]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(mistyped.as_str()));
    }

    fn with_bad_checksum(key: &str) -> String {
        let mut key = key.to_owned();
        let last = if key.ends_with('A') { "B" } else { "A" };
        key.replace_range(key.len() - 1.., last);
        key
    }

    #[test]
    fn scheme_is_case_insensitive_and_must_match() {
        let locations = default_locations();
        let key = test_key(5);
        let spaced = format!("bearer  {key} ");
        assert_eq!(find_key(&req("/", &[("authorization", &spaced)]), &locations).as_deref(), Some(key.as_str()));
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
        let key = test_key(6);
        let encoded = key.replace('_', "%5F");
        let r = req(&format!("/?api%5Fkey={encoded}"), &[]);
        assert_eq!(find_key(&r, &default_locations()).as_deref(), Some(key.as_str()));
    }

    #[test]
    fn key_shaped_header_values_are_removed_and_other_values_stay() {
        let key = test_key(7);
        let (jwt, basic) = (format!("Bearer {JWT}"), "Basic dXNlcg==");
        let mut r = req("/", &[("authorization", &jwt), ("x-api-key", &key), ("x-other", "kept")]);
        remove_all_keys(&mut r, &default_locations());
        let values = |r: &RequestHeader, name: &str| -> Vec<String> {
            r.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
        };
        assert_eq!(values(&r, "authorization"), [jwt]);
        assert!(values(&r, "x-api-key").is_empty());
        assert_eq!(values(&r, "x-other"), ["kept"]);

        let bearer = format!("Bearer {key}");
        let mut r = req("/", &[("authorization", &bearer), ("x-api-key", "typo"), ("x-api-key", &key)]);
        remove_all_keys(&mut r, &default_locations());
        assert!(values(&r, "authorization").is_empty());
        assert_eq!(values(&r, "x-api-key"), ["typo"]);

        let mut r = req("/", &[("authorization", basic)]);
        remove_all_keys(&mut r, &default_locations());
        assert_eq!(values(&r, "authorization"), [basic]);
    }

    #[test]
    fn a_presented_imported_key_of_another_shape_is_removed_too() {
        let foreign = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
        let bearer = format!("Bearer {foreign}");
        let mut r = req("/", &[("authorization", &bearer), ("x-api-key", foreign), ("x-api-key", "other")]);
        for location in default_locations() {
            if let KeyLocation::Header { name, scheme } = location {
                remove_key_values(&mut r, &name, scheme.as_deref(), Some(foreign)).unwrap();
            }
        }
        assert!(r.headers.get("authorization").is_none());
        let left: Vec<&str> = r.headers.get_all("x-api-key").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(left, ["other"]);
        let sent = format!("/p?api_key={foreign}&a=1&api_key=other");
        assert_eq!(strip_key_params(&sent, &["api_key"], Some(foreign)).as_deref(), Some("/p?a=1&api_key=other"));
        // Without the presented key, another shape is the upstream's.
        assert_eq!(strip_key_params(&sent, &["api_key"], None), None);
    }

    #[test]
    fn query_parameters_that_are_not_keys_go_upstream_unchanged() {
        let key = test_key(8);
        let sent = format!("/p?api_key=app-value&a=1&api_key={key}&b=2");
        assert_eq!(strip_key_params(&sent, &["api_key"], None).as_deref(), Some("/p?api_key=app-value&a=1&b=2"));
        assert_eq!(strip_key_params("/p?api_key=app-value&a=1", &["api_key"], None), None);
        let encoded = format!("/p?api%5Fkey={}&z=1", key.replace('_', "%5F"));
        assert_eq!(strip_key_params(&encoded, &["api_key"], None).as_deref(), Some("/p?z=1"));
        assert_eq!(strip_key_params(&format!("/p?api_key={key}"), &["api_key"], None).as_deref(), Some("/p"));
    }

    #[test]
    fn logged_paths_lose_every_value_of_a_key_parameter() {
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

    // Property tests: what a client sends must never panic these parsers, and the
    // rules above must hold for any mix of values.

    /// A value a client may put in a key location.
    #[derive(Debug, Clone)]
    enum Sent {
        Key(u8),
        /// Printable ASCII, possibly padded with spaces; almost never key-shaped.
        Text(String),
    }

    impl Sent {
        fn text(&self) -> String {
            match self {
                Sent::Key(n) => test_key(*n),
                Sent::Text(text) => text.clone(),
            }
        }
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            (0u8..26).prop_map(Sent::Key),
            "[ -~]{0,48}".prop_map(Sent::Text),
            Just(Sent::Text(JWT.to_owned())),
            (0u8..26).prop_map(|n| Sent::Text(with_bad_checksum(&test_key(n)))),
        ]
    }

    /// What the client sends: Authorization values (with whether they use the Bearer
    /// scheme), x-api-key values, and api_key query values between other parameters.
    #[derive(Debug, Clone)]
    struct Sending {
        authorization: Vec<(bool, Sent)>,
        api_key: Vec<Sent>,
        query: Vec<Sent>,
        encode_name: bool,
    }

    fn sending() -> impl Strategy<Value = Sending> {
        let list = |n| proptest::collection::vec(sent(), 0..n);
        (proptest::collection::vec((any::<bool>(), sent()), 0..3), list(3), list(3), any::<bool>()).prop_map(
            |(authorization, api_key, query, encode_name)| Sending { authorization, api_key, query, encode_name },
        )
    }

    fn percent_encode_all(text: &str) -> String {
        text.bytes().map(|b| format!("%{b:02X}")).collect()
    }

    impl Sending {
        fn request(&self) -> RequestHeader {
            let name = if self.encode_name { "api%5Fkey" } else { "api_key" };
            let mut uri = String::from("/p?x=1");
            for value in &self.query {
                uri.push_str(&format!("&{name}={}&y=2", percent_encode_all(&value.text())));
            }
            let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
            for (bearer, value) in &self.authorization {
                let scheme = if *bearer { "Bearer" } else { "Basic" };
                r.append_header("authorization", format!("{scheme} {}", value.text())).unwrap();
            }
            for value in &self.api_key {
                r.append_header("x-api-key", value.text()).unwrap();
            }
            r
        }

        /// Every value in a key location, in the order locations are tried, as the
        /// gateway reads it (header values are trimmed).
        fn presented(&self) -> Vec<String> {
            let bearer =
                self.authorization.iter().filter(|(bearer, _)| *bearer).map(|(_, v)| v.text().trim().to_owned());
            let headers = self.api_key.iter().map(|v| v.text().trim().to_owned());
            let query = self.query.iter().map(Sent::text);
            bearer.chain(headers).chain(query).filter(|v| !v.is_empty()).collect()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        #[test]
        fn find_key_takes_the_first_key_shaped_value_else_the_first_value(sending in sending()) {
            let r = sending.request();
            let presented = sending.presented();
            let expected = presented.iter().find(|v| is_key_shaped(v)).or(presented.first());
            let locations = default_locations();
            let found = find_key(&r, &locations);
            prop_assert_eq!(found.as_deref(), expected.map(String::as_str));
        }

        #[test]
        fn only_key_shaped_values_are_removed_before_proxying(sending in sending()) {
            let mut r = sending.request();
            let before: Vec<(String, Vec<u8>)> =
                r.headers.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect();
            let locations = default_locations();
            remove_all_keys(&mut r, &locations);
            let shaped = |name: &str, value: &[u8]| {
                let scheme = (name == "authorization").then_some("Bearer");
                HeaderValue::from_bytes(value).is_ok_and(|v| key_in_header(&v, scheme).is_some_and(is_key_shaped))
            };
            let mut expected: Vec<(String, Vec<u8>)> = before.into_iter().filter(|(n, v)| !shaped(n, v)).collect();
            let mut after: Vec<(String, Vec<u8>)> =
                r.headers.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect();
            // Values under one name keep their order; names may come back in another.
            expected.sort_by(|a, b| a.0.cmp(&b.0));
            after.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(after, expected);

            let path_and_query = r.uri.path_and_query().unwrap().as_str();
            let stripped = strip_key_params(path_and_query, &["api_key"], None);
            let upstream = stripped.as_deref().unwrap_or(path_and_query);
            prop_assert!(upstream.parse::<http::Uri>().is_ok(), "{upstream}");
            let r = RequestHeader::build("GET", upstream.as_bytes(), None).unwrap();
            let left: Vec<_> = r.uri.query().map(|q| query_values(q, "api_key").collect()).unwrap_or_default();
            let expected: Vec<String> =
                sending.query.iter().map(Sent::text).filter(|v| !v.is_empty() && !is_key_shaped(v)).collect();
            prop_assert_eq!(left, expected);
        }

        #[test]
        fn query_stripping_never_panics_and_keeps_other_parameters(
            path_and_query in prop_oneof!["/[ -~]{0,40}", "[a-z/]{0,6}\\?[a-z_%5F=&+0-9A-F]{0,40}", any::<String>()],
        ) {
            for (stripped, all) in [
                (strip_key_params(&path_and_query, &["api_key"], None), false),
                (strip_query_params(&path_and_query, &["api_key"]), true),
            ] {
                let Some(out) = stripped else { continue };
                let (path, query) = path_and_query.split_once('?').unwrap();
                prop_assert!(out.starts_with(path));
                let kept: Vec<&str> = out[path.len()..].strip_prefix('?').unwrap_or("").split('&').filter(|p| !p.is_empty()).collect();
                let named = |pair: &str| decode(pair.split_once('=').map_or(pair, |(k, _)| k)) == "api_key";
                let value = |pair: &str| decode(pair.split_once('=').map_or("", |(_, v)| v)).into_owned();
                let wanted: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.is_empty() && !(named(p) && (all || is_key_shaped(&value(p)))))
                    .collect();
                prop_assert_eq!(kept, wanted);
                if path_and_query.starts_with('/') && path_and_query.parse::<http::Uri>().is_ok() {
                    prop_assert!(out.parse::<http::Uri>().is_ok(), "{out}");
                }
            }
        }

        #[test]
        fn decode_never_panics_and_undoes_percent_encoding(text in any::<String>()) {
            let _ = decode(&text);
            let encoded = percent_encode_all(&text);
            prop_assert_eq!(decode(&encoded), text.as_str());
            if !text.contains(['%', '+']) {
                prop_assert!(matches!(decode(&text), Cow::Borrowed(t) if t == text));
            }
        }

        #[test]
        fn request_id_is_always_short_visible_ascii(sent in proptest::collection::vec(any::<u8>(), 0..200)) {
            let Ok(value) = HeaderValue::from_bytes(&sent) else { return Ok(()) };
            let id = request_id(Some(&value));
            prop_assert!((1..=MAX_REQUEST_ID_LEN).contains(&id.len()));
            prop_assert!(id.as_bytes().iter().all(u8::is_ascii_graphic));
            let sane = !sent.is_empty() && sent.len() <= MAX_REQUEST_ID_LEN && sent.iter().all(u8::is_ascii_graphic);
            prop_assert_eq!(id.as_bytes() == sent.as_slice(), sane);
        }
    }
}
