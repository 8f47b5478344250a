//! Every response keygate writes itself: JSON errors in one shape.

use bytes::Bytes;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::limit::RateInfo;
use crate::policy::{Denial, DENIAL_KINDS};

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

/// The JSON body of an error.
pub fn error_body(rejection: Rejection, request_id: &str) -> Bytes {
    error_json(rejection.code(), rejection.message(), request_id)
}

/// `{"error":{"code","message","request_id"}}`. Codes and messages are keygate's
/// own; the request id is ours (or the client's, checked to be visible ASCII),
/// so it needs no JSON escaping beyond quotes and backslashes.
pub fn error_json(code: &str, message: &str, request_id: &str) -> Bytes {
    let mut body = String::with_capacity(96 + request_id.len());
    body.push_str(r#"{"error":{"code":""#);
    body.push_str(code);
    body.push_str(r#"","message":""#);
    body.push_str(message);
    body.push_str(r#"","request_id":""#);
    for c in request_id.chars() {
        if c == '"' || c == '\\' {
            body.push('\\');
        }
        body.push(c);
    }
    body.push_str("\"}}");
    Bytes::from(body)
}

/// One error answer to write.
pub struct ErrorAnswer<'a> {
    pub rejection: Rejection,
    pub request_id: &'a HeaderValue,
    /// Where a rate limit applied, its state for the `RateLimit-*` headers.
    pub rate: Option<&'a RateInfo>,
    /// False when a request body is still unread: the next bytes on the wire
    /// are not a request, so the connection is closed.
    pub keep_alive: bool,
}

pub async fn write_error(session: &mut Session, answer: ErrorAnswer<'_>) -> Result<()> {
    let rejection = answer.rejection;
    let body = error_body(rejection, answer.request_id.to_str().unwrap_or(""));
    let mut header = ResponseHeader::build(rejection.status(), Some(8))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    header.insert_header(super::wire::X_REQUEST_ID, answer.request_id.clone())?;
    if rejection.status() == 401 {
        header.insert_header(http::header::WWW_AUTHENTICATE, r#"Bearer realm="keygate""#)?;
    }
    if let Rejection::Denied(denial) = rejection {
        if let Some(seconds) = denial.retry_after() {
            header.insert_header(http::header::RETRY_AFTER, seconds)?;
        }
    }
    if let Some(rate) = answer.rate {
        insert_rate_headers(&mut header, rate)?;
    }
    if !answer.keep_alive {
        session.set_keepalive(None);
        header.insert_header(http::header::CONNECTION, "close")?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(header), head_only).await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

// Wire spellings: see `super::wire`.
const RATELIMIT_LIMIT: &str = "RateLimit-Limit";
const RATELIMIT_REMAINING: &str = "RateLimit-Remaining";
const RATELIMIT_RESET: &str = "RateLimit-Reset";

/// `RateLimit-Limit` is the burst a key may send at once, `RateLimit-Remaining`
/// what is left of it, `RateLimit-Reset` the whole seconds until it is full again.
pub fn insert_rate_headers(header: &mut ResponseHeader, rate: &RateInfo) -> Result<()> {
    let reset = rate.reset.as_secs() + u64::from(rate.reset.subsec_nanos() > 0);
    header.insert_header(RATELIMIT_LIMIT, rate.limit)?;
    header.insert_header(RATELIMIT_REMAINING, rate.remaining)?;
    header.insert_header(RATELIMIT_RESET, reset)?;
    Ok(())
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
    fn upstream_failures_map_to_gateway_statuses() {
        assert_eq!((Rejection::UpstreamError.status(), Rejection::UpstreamError.code()), (502, "upstream_error"));
        assert_eq!(
            (Rejection::UpstreamUnavailable.status(), Rejection::UpstreamUnavailable.code()),
            (503, "upstream_unavailable")
        );
        assert_eq!((Rejection::UpstreamTimeout.status(), Rejection::UpstreamTimeout.code()), (504, "upstream_timeout"));
        assert_eq!((Rejection::NoRoute.status(), Rejection::NoRoute.code()), (404, "no_route"));
    }
}
