//! The admin API client: errors worded for a person, the HTTP client, and a JSON value
//! that keeps the server's field order.

use super::*;

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeysError {
    #[error(
        "cannot reach the admin API at {url}: {reason}\n\
         hint: check that keygate's admin API listens there; set the address with --admin-url or KEYGATE_ADMIN_URL"
    )]
    Unreachable { url: String, reason: String },
    /// A non-2xx answer, already worded by `describe_api_error`.
    #[error("{0}")]
    Api(String),
    #[error("unexpected response from the admin API at {url}: {reason}")]
    BadResponse { url: String, reason: String },
    #[error("{0}")]
    Local(String),
    /// The command ran and has `output` to show, but part of what it was given failed.
    #[error("{message}")]
    Partial { output: String, message: String },
}

/// The `{"error": {"code", "message", "request_id"}}` body, as far as it is there.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    pub(crate) code: Option<String>,
    pub(crate) message: Option<String>,
    pub(crate) request_id: Option<String>,
}

pub(crate) fn parse_error_body(body: &str) -> ErrorBody {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        // Not ours (a proxy's HTML page, plain text): show the start of it.
        let text: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
        let excerpt: String = text.chars().take(MAX_BODY_EXCERPT).collect();
        return ErrorBody { message: (!excerpt.is_empty()).then(|| clean(&excerpt)), ..ErrorBody::default() };
    };
    let error = value.get("error").unwrap_or(&Value::Null);
    let field = |name: &str| {
        error.get(name).or_else(|| value.get(name)).and_then(Value::as_str).map(clean).filter(|s| s != "-")
    };
    let message = field("message").or_else(|| error.as_str().map(clean));
    ErrorBody { code: field("code"), message, request_id: field("request_id") }
}

/// Words a non-2xx answer. `key_id` is the key the call was about, if any.
pub(crate) fn describe_api_error(status: u16, body: &str, key_id: Option<&str>, token_given: bool) -> String {
    let error = parse_error_body(body);
    let detail = error.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    match (status, key_id) {
        (400, _) => format!("invalid request{detail}"),
        (401, _) => {
            let hint = if token_given {
                "check the token given with --token or KEYGATE_ADMIN_TOKEN"
            } else {
                "no token was given; pass one with --token or set KEYGATE_ADMIN_TOKEN"
            };
            format!("the admin API refused the token (401){detail}\nhint: {hint}")
        }
        (404, Some(id)) => {
            // keygate's own message already reads "no key <id>"; others are added to it.
            let mut text = match &error.message {
                Some(message) if message.contains(id) => message.clone(),
                _ => format!("no key {id}{detail}"),
            };
            // Another code (a gateway's `no_route`) means we are not talking to the admin API.
            if error.code.as_deref().is_some_and(|code| code != "not_found") {
                text.push_str("\nhint: is --admin-url (KEYGATE_ADMIN_URL) the admin address?");
            }
            text
        }
        (409, _) => format!("conflict{detail}"),
        _ => {
            let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
            let mut text = format!("the admin API answered {status} {reason}").trim_end().to_owned();
            text.push_str(&detail);
            if let (true, Some(id)) = (status >= 500, &error.request_id) {
                text.push_str(&format!(" (request id {id})"));
            }
            text
        }
    }
}

/// The innermost cause reads best ("Connection refused (os error 111)");
/// the outer layers only repeat the URL.
pub(crate) fn network_reason(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return if error.is_connect() {
            format!("no connection within {}s", CONNECT_TIMEOUT.as_secs())
        } else {
            format!("no answer within {}s", TOTAL_TIMEOUT.as_secs())
        };
    }
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The admin URL for messages: no password, no trailing slash.
pub(crate) fn display_url(url: &Url) -> String {
    let mut url = url.clone();
    // Fails only for URLs without a host, which parse_admin_url refuses.
    let _ = url.set_password(None);
    url.as_str().trim_end_matches('/').to_owned()
}

// ---------------------------------------------------------------------------
// The HTTP client.

pub(crate) struct Admin {
    pub(crate) http: reqwest::Client,
    pub(crate) base: Url,
    pub(crate) auth: Option<HeaderValue>,
}

/// A 2xx answer.
pub(crate) struct Reply {
    pub(crate) text: String,
    pub(crate) url: String,
}

impl Admin {
    pub(crate) fn new(global: &GlobalOpts) -> Result<Self, KeysError> {
        Self::with_total_timeout(global, Some(TOTAL_TIMEOUT))
    }

    /// `total: None` for calls that take as long as their upload (an import).
    pub(crate) fn with_total_timeout(global: &GlobalOpts, total: Option<Duration>) -> Result<Self, KeysError> {
        let http = http_client::build(concat!("keygate-cli/", env!("CARGO_PKG_VERSION")), CONNECT_TIMEOUT, total)
            .map_err(|e| KeysError::Local(format!("cannot set up the HTTP client: {e}")))?;
        // An empty KEYGATE_ADMIN_TOKEN= is "no token", not an empty one.
        let auth = match global.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    KeysError::Local("the admin token contains characters that cannot go in an HTTP header".into())
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Admin { http, base: global.admin_url.clone(), auth })
    }

    /// `segments` are percent-encoded, so an id cannot escape its path segment.
    pub(crate) fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
        key_id: Option<&str>,
    ) -> Result<Reply, KeysError> {
        let mut url = self.endpoint(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self.http.request(method, url.clone());
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(request, url, key_id).await
    }

    /// POSTs `body` (streamed as it is read) to `segments`.
    pub(crate) async fn post_stream(
        &self,
        segments: &[&str],
        content_type: &'static str,
        body: reqwest::Body,
    ) -> Result<Reply, KeysError> {
        let url = self.endpoint(segments);
        let mut request = self.http.post(url.clone()).header(reqwest::header::CONTENT_TYPE, content_type).body(body);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        self.send(request, url, None).await
    }

    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: Url,
        key_id: Option<&str>,
    ) -> Result<Reply, KeysError> {
        let unreachable =
            |e: reqwest::Error| KeysError::Unreachable { url: display_url(&self.base), reason: network_reason(&e) };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(KeysError::Api(describe_api_error(status.as_u16(), &text, key_id, self.auth.is_some())));
        }
        Ok(Reply { text, url: display_url(&url) })
    }
}

impl Reply {
    pub(crate) fn bad(&self, reason: impl Into<String>) -> KeysError {
        KeysError::BadResponse { url: self.url.clone(), reason: reason.into() }
    }

    pub(crate) fn value(&self) -> Result<Value, KeysError> {
        serde_json::from_str(&self.text).map_err(|e| self.bad(format!("the body is not JSON ({e})")))
    }
}
