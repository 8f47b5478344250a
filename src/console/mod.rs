//! The web console at `GET /ui`: a small single-page app, embedded in the binary,
//! that talks to nothing but the public admin API, with the token its user signs
//! in with. Serving its files needs no token: they hold no data.
//!
//! Every response under `/ui` carries a strict Content-Security-Policy (scripts,
//! styles and requests only from this origin, no inline code, no framing), so a
//! string from the API that slipped into the page could not run.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest as _, Sha256};

use crate::outcome::{error_json, new_request_id, APPLICATION_JSON};

pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset { name: $name, content_type: $content_type, body: include_bytes!(concat!("assets/", $name)) }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

const INDEX: &str = "index.html";

const ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("app.css", CSS),
    asset!("favicon.svg", SVG),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("sse.js", JS),
    asset!("chart.js", JS),
    asset!("secret.js", JS),
    asset!("signin.js", JS),
    asset!("keys.js", JS),
    asset!("create.js", JS),
    asset!("key.js", JS),
    asset!("audit.js", JS),
    asset!("fleet.js", JS),
];

/// A strong ETag per asset (in `ASSETS` order), so a browser revalidates cheaply
/// and a new binary's files replace the old ones at once.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| {
            let digest = Sha256::digest(asset.body);
            let tag = format!("\"{}\"", hex::encode(&digest[..12]));
            // Only hex digits and quotes: always a valid header value.
            HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"0\""))
        })
        .collect()
});

const SECURITY_HEADERS: &[(HeaderName, &str)] = &[
    (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_FRAME_OPTIONS, "DENY"),
];

/// The console's routes, merged into the admin router of nodes that have the admin API.
pub fn router() -> Router {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{*path}", get(asset))
        .layer(axum::middleware::map_response(security_headers))
}

/// On every response under `/ui`, errors and 405s included.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn index(headers: HeaderMap) -> Response {
    serve(INDEX, &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(name: &str, request: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.name == name) else {
        return not_found(name);
    };
    let asset = &ASSETS[i];
    let etag = ETAGS.get(i).cloned().unwrap_or(HeaderValue::from_static("\"0\""));
    let cache = [(header::CACHE_CONTROL, HeaderValue::from_static("no-cache")), (header::ETAG, etag.clone())];
    if request.get_all(header::IF_NONE_MATCH).iter().any(|v| matches_etag(v, &etag)) {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    let content_type = [(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type))];
    (content_type, cache, asset.body).into_response()
}

/// `If-None-Match` holds a list of tags, or `*`; weak tags compare by their opaque part.
fn matches_etag(value: &HeaderValue, etag: &HeaderValue) -> bool {
    let (Ok(value), Ok(etag)) = (value.to_str(), etag.to_str()) else { return false };
    value.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

fn not_found(name: &str) -> Response {
    let request_id = new_request_id();
    let body = error_json("not_found", &format!("the console has no file {name:?}"), request_id.to_str().unwrap_or(""));
    let mut response = (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, APPLICATION_JSON)], body).into_response();
    response.headers_mut().insert("x-request-id", request_id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::ServiceExt as _;

    async fn call(method: Method, path: &str, headers: &[(HeaderName, &str)]) -> Response {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        router().oneshot(request.body(Body::empty()).unwrap()).await.unwrap()
    }

    async fn body(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap().to_vec()
    }

    fn assert_secure(response: &Response, path: &str) {
        let headers = response.headers();
        assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY, "{path}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        assert_eq!(headers[header::REFERRER_POLICY], "no-referrer", "{path}");
    }

    #[tokio::test]
    async fn every_asset_is_served_with_its_content_type_and_revalidated() {
        for (path, content_type) in [
            ("/ui", HTML),
            ("/ui/", HTML),
            ("/ui/index.html", HTML),
            ("/ui/app.js", JS),
            ("/ui/app.css", CSS),
            ("/ui/favicon.svg", SVG),
        ] {
            let response = call(Method::GET, path, &[]).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(response.headers()[header::CONTENT_TYPE], content_type, "{path}");
            assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache", "{path}");
            assert!(response.headers().contains_key(header::ETAG), "{path}");
            assert_secure(&response, path);
        }
        for asset in ASSETS {
            let path = format!("/ui/{}", asset.name);
            let response = call(Method::GET, &path, &[]).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(response.headers()[header::CONTENT_TYPE], asset.content_type, "{path}");
            assert_eq!(body(response).await, asset.body, "{path}");
        }
    }

    #[tokio::test]
    async fn a_matching_etag_answers_not_modified() {
        let first = call(Method::GET, "/ui/app.js", &[]).await;
        let etag = first.headers()[header::ETAG].to_str().unwrap().to_owned();
        let again = call(Method::GET, "/ui/app.js", &[(header::IF_NONE_MATCH, &etag)]).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_secure(&again, "/ui/app.js (304)");
        assert!(body(again).await.is_empty());
        let listed = format!("\"other\", W/{etag}");
        let weak = call(Method::GET, "/ui/app.js", &[(header::IF_NONE_MATCH, &listed)]).await;
        assert_eq!(weak.status(), StatusCode::NOT_MODIFIED);
        let stale = call(Method::GET, "/ui/app.js", &[(header::IF_NONE_MATCH, "\"stale\"")]).await;
        assert_eq!(stale.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn an_unknown_file_is_a_404_in_the_contract_error_shape() {
        for path in ["/ui/nope.js", "/ui/assets/app.js", "/ui/../Cargo.toml", "/ui/%2e%2e/secret"] {
            let response = call(Method::GET, path, &[]).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
            assert_secure(&response, path);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json", "{path}");
            let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
            let json: serde_json::Value = serde_json::from_slice(&body(response).await).unwrap();
            assert_eq!(json["error"]["code"], "not_found", "{path}");
            assert!(json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{path}");
            assert_eq!(json["error"]["request_id"], request_id.as_str(), "{path}");
        }
    }

    #[tokio::test]
    async fn other_methods_are_refused_with_the_same_headers() {
        let response = call(Method::POST, "/ui", &[]).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_secure(&response, "POST /ui");
    }

    /// An attribute such as ` onclick=` in markup.
    fn has_inline_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    #[test]
    fn the_page_has_no_inline_code_and_loads_nothing_from_elsewhere() {
        let index = ASSETS.iter().find(|a| a.name == INDEX).unwrap();
        let html = std::str::from_utf8(index.body).unwrap();
        assert!(!html.contains("<style"), "an inline style element");
        assert!(!html.contains(" style="), "an inline style attribute");
        assert!(!has_inline_handler(html), "an inline event handler");
        assert!(has_inline_handler("<a onclick=\"x\">"));
        for script in html.split("<script").skip(1) {
            let head = script.split('>').next().unwrap_or("");
            assert!(head.contains("src=\"/ui/"), "an inline script: <script{head}>");
        }
        for asset in ASSETS {
            let text = String::from_utf8_lossy(asset.body);
            for needle in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "src=\"http",
                "href=\"http",
                "from 'http",
                "import('http",
                "url(http",
                "@import",
            ] {
                assert!(!text.contains(needle), "{} contains {needle:?}", asset.name);
            }
        }
    }
}
