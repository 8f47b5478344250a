//! The admin address: `/healthz`, `/readyz` and `/metrics` on every node.

use std::sync::Arc;

use axum::extract::State;
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;

use crate::index::KeyIndex;
use crate::metrics::Metrics;
use crate::outcome::{error_json, new_request_id, APPLICATION_JSON};

/// What `/readyz` reports.
#[derive(Clone)]
pub enum Readiness {
    /// Ready once the key index holds a key set (gateways, standalone).
    KeysLoaded(Arc<KeyIndex>),
    /// A control plane is ready once it runs: its store opened before it started.
    Always,
}

#[derive(Clone)]
pub struct OpsState {
    pub ready: Readiness,
    pub metrics: Arc<Metrics>,
}

/// One method on one path of the admin address, with its handler. Routers are built
/// from tables of these, so the routes a node serves are a value that tests compare
/// with the OpenAPI document (`control::openapi`).
pub struct Route<S> {
    pub method: Method,
    pub path: &'static str,
    pub handler: MethodRouter<S>,
}

impl<S: Clone + Send + Sync + 'static> Route<S> {
    /// `handler` for `method` on `path`; a `GET` also answers `HEAD`, as axum's `get` does.
    ///
    /// # Panics
    /// On a method axum cannot route by (an extension method): tables name standard ones.
    pub fn new<H: Handler<T, S>, T: 'static>(method: Method, path: &'static str, handler: H) -> Self {
        let filter = MethodFilter::try_from(method.clone()).expect("routes use standard HTTP methods");
        Route { method, path, handler: axum::routing::on(filter, handler) }
    }
}

/// A router serving exactly `routes` (methods on one path merge, as `.get(..).post(..)` would).
pub fn router_of<S: Clone + Send + Sync + 'static>(routes: Vec<Route<S>>) -> Router<S> {
    routes.into_iter().fold(Router::new(), |router, route| router.route(route.path, route.handler))
}

/// `/healthz`, `/readyz` and `/metrics`: no token, on every node.
pub fn ops_routes() -> Vec<Route<OpsState>> {
    vec![
        Route::new(Method::GET, "/healthz", healthz),
        Route::new(Method::GET, "/readyz", readyz),
        Route::new(Method::GET, "/metrics", metrics),
    ]
}

pub fn ops_router(state: OpsState) -> Router {
    router_of(ops_routes()).with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let ready = match &state.ready {
        Readiness::KeysLoaded(keys) => keys.is_loaded(),
        Readiness::Always => true,
    };
    if ready {
        Json(json!({"status": "ready"})).into_response()
    } else {
        error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "keys are not loaded yet")
    }
}

async fn metrics(State(state): State<OpsState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

/// An error in the contract's JSON shape, with its `X-Request-Id`.
fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let request_id = new_request_id();
    let body = error_json(code, message, request_id.to_str().unwrap_or(""));
    let mut response = (status, [(header::CONTENT_TYPE, APPLICATION_JSON)], body).into_response();
    response.headers_mut().insert("x-request-id", request_id);
    response
}

/// Answers an unknown path or a method a path does not take in the contract's error
/// shape, as every other error of the admin address.
pub fn with_json_fallbacks(router: Router) -> Router {
    router
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "not_found", "no such path on the admin address") })
        .method_not_allowed_fallback(|| async {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this path does not take that method")
        })
}

/// Binds the admin address with `SO_REUSEPORT`, so a process started with
/// `serve --upgrade` can bind it while the old one still drains.
pub fn bind(address: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves `router` on an already-bound listener until `shutdown` resolves.
pub async fn serve(
    listener: std::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    // Without TCP_NODELAY a long-poll answer can sit out a delayed ACK (~40 ms),
    // which would be most of a revocation's journey to the gateways.
    let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an admin connection");
        }
    });
    // The peer's address is shown in `GET /v1/gateways`.
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(shutdown).await
}
