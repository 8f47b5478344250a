//! Every response keygate writes itself: JSON errors in one shape.

use bytes::Bytes;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::policy::Denial;

/// Everything that keygate itself answers with, rather than the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Denied(Denial),
    NoRoute,
    BadRequest,
    UpstreamError,
    UpstreamUnavailable,
    UpstreamTimeout,
    Internal,
}

impl Rejection {
    pub fn code(self) -> &'static str {
        match self {
            Rejection::Denied(denial) => denial.code(),
            Rejection::NoRoute => "no_route",
            Rejection::BadRequest => "bad_request",
            Rejection::UpstreamError => "upstream_error",
            Rejection::UpstreamUnavailable => "upstream_unavailable",
            Rejection::UpstreamTimeout => "upstream_timeout",
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
            Rejection::Internal => "internal error",
        }
    }
}

/// The JSON body of an error. The request id is ours (or the client's, checked
/// to be visible ASCII), so it needs no JSON escaping beyond quotes and backslashes.
pub fn error_body(rejection: Rejection, request_id: &str) -> Bytes {
    let mut body = String::with_capacity(96 + request_id.len());
    body.push_str(r#"{"error":{"code":""#);
    body.push_str(rejection.code());
    body.push_str(r#"","message":""#);
    body.push_str(rejection.message());
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

/// Writes the error and keeps the connection open unless `keep_alive` is false
/// (a request body is still unread, so the next bytes on the wire are not a request).
pub async fn write_error(
    session: &mut Session,
    rejection: Rejection,
    request_id: &HeaderValue,
    keep_alive: bool,
) -> Result<()> {
    let body = error_body(rejection, request_id.to_str().unwrap_or(""));
    let mut header = ResponseHeader::build(rejection.status(), Some(6))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    header.insert_header(super::X_REQUEST_ID, request_id.clone())?;
    if rejection.status() == 401 {
        header.insert_header(http::header::WWW_AUTHENTICATE, r#"Bearer realm="keygate""#)?;
    }
    if !keep_alive {
        session.set_keepalive(None);
        header.insert_header(http::header::CONNECTION, "close")?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
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
        assert!(json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }

    #[test]
    fn error_body_escapes_a_hostile_request_id() {
        let body = error_body(Rejection::NoRoute, r#"a"b\c"#);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["request_id"], r#"a"b\c"#);
    }

    #[test]
    fn upstream_failures_map_to_gateway_statuses() {
        assert_eq!(
            (
                Rejection::UpstreamError.status(),
                Rejection::UpstreamError.code()
            ),
            (502, "upstream_error")
        );
        assert_eq!(
            (
                Rejection::UpstreamUnavailable.status(),
                Rejection::UpstreamUnavailable.code()
            ),
            (503, "upstream_unavailable")
        );
        assert_eq!(
            (
                Rejection::UpstreamTimeout.status(),
                Rejection::UpstreamTimeout.code()
            ),
            (504, "upstream_timeout")
        );
        assert_eq!(
            (Rejection::NoRoute.status(), Rejection::NoRoute.code()),
            (404, "no_route")
        );
    }
}
