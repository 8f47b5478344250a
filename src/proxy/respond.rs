//! Writing keygate's own answers through Pingora; their shape is `crate::outcome`'s.

use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::limit::RateInfo;
use crate::outcome::{error_body, Rejection, APPLICATION_JSON};

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
    header.insert_header(http::header::CONTENT_TYPE, APPLICATION_JSON)?;
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
