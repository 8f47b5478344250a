//! What keygate answers with itself, rather than the upstream: the list of
//! outcomes (the policy's denials among them), the contract's JSON error body,
//! and request ids.
//!
//! Kept apart from the Pingora adapter so that the proxy, the admin API, the
//! ops endpoints, the metrics and the usage counters share it without
//! importing one another.

use bytes::Bytes;
use http::HeaderValue;

/// Why a keyed request is refused, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    MissingKey,
    InvalidKey,
    KeyRevoked,
    KeyExpired,
    KeyDisabled,
    IpNotAllowed,
    InsufficientScope,
    /// `retry_after` in whole seconds, at least 1.
    RateLimited {
        retry_after: u64,
    },
    QuotaExceeded {
        retry_after: u64,
    },
}

/// How many distinct denial codes there are; usage counters keep one slot each.
pub const DENIAL_KINDS: usize = 9;

impl Denial {
    pub fn code(self) -> &'static str {
        match self {
            Denial::MissingKey => "missing_key",
            Denial::InvalidKey => "invalid_key",
            Denial::KeyRevoked => "key_revoked",
            Denial::KeyExpired => "key_expired",
            Denial::KeyDisabled => "key_disabled",
            Denial::IpNotAllowed => "ip_not_allowed",
            Denial::InsufficientScope => "insufficient_scope",
            Denial::RateLimited { .. } => "rate_limited",
            Denial::QuotaExceeded { .. } => "quota_exceeded",
        }
    }

    /// A dense index per code, for counters.
    pub fn index(self) -> usize {
        match self {
            Denial::MissingKey => 0,
            Denial::InvalidKey => 1,
            Denial::KeyRevoked => 2,
            Denial::KeyExpired => 3,
            Denial::KeyDisabled => 4,
            Denial::IpNotAllowed => 5,
            Denial::InsufficientScope => 6,
            Denial::RateLimited { .. } => 7,
            Denial::QuotaExceeded { .. } => 8,
        }
    }

    /// The code for each index of [`Denial::index`].
    pub const CODES: [&'static str; DENIAL_KINDS] = [
        "missing_key",
        "invalid_key",
        "key_revoked",
        "key_expired",
        "key_disabled",
        "ip_not_allowed",
        "insufficient_scope",
        "rate_limited",
        "quota_exceeded",
    ];

    pub fn retry_after(self) -> Option<u64> {
        match self {
            Denial::RateLimited { retry_after } | Denial::QuotaExceeded { retry_after } => Some(retry_after),
            _ => None,
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Denial::MissingKey | Denial::InvalidKey | Denial::KeyRevoked | Denial::KeyExpired => 401,
            Denial::KeyDisabled | Denial::IpNotAllowed | Denial::InsufficientScope => 403,
            Denial::RateLimited { .. } | Denial::QuotaExceeded { .. } => 429,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Denial::MissingKey => "an API key is required",
            Denial::InvalidKey => "the API key is not valid",
            Denial::KeyRevoked => "the API key has been revoked",
            Denial::KeyExpired => "the API key has expired",
            Denial::KeyDisabled => "the API key is disabled",
            Denial::IpNotAllowed => "the API key may not be used from this address",
            Denial::InsufficientScope => "the API key lacks a scope this route requires",
            Denial::RateLimited { .. } => "too many requests for this API key; retry later",
            Denial::QuotaExceeded { .. } => "the API key has used its quota for this period",
        }
    }
}

/// Everything that keygate itself answers with, rather than the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Denied(Denial),
    NoRoute,
    BadRequest,
    UpstreamError,
    UpstreamUnavailable,
    UpstreamTimeout,
    /// No keys loaded yet, or the last sync is older than `keys.max_staleness`.
    NotReady,
    Internal,
}

impl Rejection {
    /// How many distinct codes there are (see [`Rejection::index`]).
    pub const KINDS: usize = DENIAL_KINDS + 7;

    /// A dense index per code, for metrics.
    pub fn index(self) -> usize {
        match self {
            Rejection::Denied(denial) => denial.index(),
            Rejection::NoRoute => DENIAL_KINDS,
            Rejection::BadRequest => DENIAL_KINDS + 1,
            Rejection::UpstreamError => DENIAL_KINDS + 2,
            Rejection::UpstreamUnavailable => DENIAL_KINDS + 3,
            Rejection::UpstreamTimeout => DENIAL_KINDS + 4,
            Rejection::Internal => DENIAL_KINDS + 5,
            Rejection::NotReady => DENIAL_KINDS + 6,
        }
    }

    /// The rejection with a given [`Rejection::index`]; denials come back with
    /// a zero `retry_after`, which only matters for their code.
    pub fn from_index(index: usize) -> Option<Rejection> {
        const DENIALS: [Denial; DENIAL_KINDS] = [
            Denial::MissingKey,
            Denial::InvalidKey,
            Denial::KeyRevoked,
            Denial::KeyExpired,
            Denial::KeyDisabled,
            Denial::IpNotAllowed,
            Denial::InsufficientScope,
            Denial::RateLimited { retry_after: 0 },
            Denial::QuotaExceeded { retry_after: 0 },
        ];
        if let Some(denial) = DENIALS.get(index) {
            return Some(Rejection::Denied(*denial));
        }
        [
            Rejection::NoRoute,
            Rejection::BadRequest,
            Rejection::UpstreamError,
            Rejection::UpstreamUnavailable,
            Rejection::UpstreamTimeout,
            Rejection::Internal,
            Rejection::NotReady,
        ]
        .get(index - DENIAL_KINDS)
        .copied()
    }

    pub fn code(self) -> &'static str {
        match self {
            Rejection::Denied(denial) => denial.code(),
            Rejection::NoRoute => "no_route",
            Rejection::BadRequest => "bad_request",
            Rejection::UpstreamError => "upstream_error",
            Rejection::UpstreamUnavailable => "upstream_unavailable",
            Rejection::UpstreamTimeout => "upstream_timeout",
            Rejection::NotReady => "not_ready",
            Rejection::Internal => "internal_error",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Rejection::Denied(denial) => denial.status(),
            Rejection::NoRoute => 404,
            Rejection::BadRequest => 400,
            Rejection::UpstreamError => 502,
            Rejection::UpstreamUnavailable => 503,
            Rejection::UpstreamTimeout => 504,
            Rejection::NotReady => 503,
            Rejection::Internal => 500,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Rejection::Denied(denial) => denial.message(),
            Rejection::NoRoute => "no route matches this request",
            Rejection::BadRequest => "the request is malformed",
            Rejection::UpstreamError => "the upstream failed to answer",
            Rejection::UpstreamUnavailable => "no healthy upstream target is available",
            Rejection::UpstreamTimeout => "the upstream did not answer in time",
            Rejection::NotReady => "the gateway has no current keys yet; retry shortly",
            Rejection::Internal => "internal error",
        }
    }
}

/// The content type of every error body.
pub const APPLICATION_JSON: &str = "application/json";

/// The JSON body of an error.
pub fn error_body(rejection: Rejection, request_id: &str) -> Bytes {
    error_json(rejection.code(), rejection.message(), request_id)
}

/// `{"error":{"code","message","request_id"}}`: the one place the contract's
/// error body is written. Every field is escaped, since the admin API's
/// messages can carry what a client sent.
pub fn error_json(code: &str, message: &str, request_id: &str) -> Bytes {
    let mut body = String::with_capacity(48 + code.len() + message.len() + request_id.len());
    body.push_str(r#"{"error":{"code":""#);
    push_json_escaped(&mut body, code);
    body.push_str(r#"","message":""#);
    push_json_escaped(&mut body, message);
    body.push_str(r#"","request_id":""#);
    push_json_escaped(&mut body, request_id);
    body.push_str("\"}}");
    Bytes::from(body)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `text` as the inside of a JSON string, escaped as serde_json does,
/// so that bodies the admin API used to build with serde_json stay byte for byte.
fn push_json_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' => {
                let b = c as u8;
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
            c => out.push(c),
        }
    }
}

/// 128 random bits as 32 lowercase hex characters.
pub fn new_request_id() -> HeaderValue {
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

    #[test]
    fn error_body_is_the_contract_shape() {
        let body = error_body(Rejection::Denied(Denial::InvalidKey), "abc123");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "invalid_key");
        assert_eq!(json["error"]["request_id"], "abc123");
        assert!(json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    #[test]
    fn error_body_escapes_a_hostile_request_id() {
        let body = error_body(Rejection::NoRoute, r#"a"b\c"#);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["request_id"], r#"a"b\c"#);
    }

    #[test]
    fn error_json_escapes_any_message_as_serde_json_does() {
        let message = "say \"hi\" \\ path\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f} é 💥 </script>";
        let body = error_json("invalid_request", message, "id-1");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["message"], message);
        let expected =
            serde_json::json!({"error": {"code": "invalid_request", "message": message, "request_id": "id-1"}});
        assert_eq!(body, serde_json::to_vec(&expected).unwrap());
    }

    #[test]
    fn upstream_failures_map_to_gateway_statuses() {
        assert_eq!((Rejection::UpstreamError.status(), Rejection::UpstreamError.code()), (502, "upstream_error"));
        assert_eq!(
            (Rejection::UpstreamUnavailable.status(), Rejection::UpstreamUnavailable.code()),
            (503, "upstream_unavailable")
        );
        assert_eq!((Rejection::UpstreamTimeout.status(), Rejection::UpstreamTimeout.code()), (504, "upstream_timeout"));
        assert_eq!((Rejection::NoRoute.status(), Rejection::NoRoute.code()), (404, "no_route"));
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
