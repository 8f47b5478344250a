//! The data plane: a thin Pingora adapter around `policy::decide`.
//!
//! `request_filter` gathers the facts, asks the policy, and answers denials
//! itself; the later hooks pick the upstream and clean the request on its way.

mod connection;
mod headers;
mod path;
mod respond;
mod routing;
mod service;
mod state;
mod stop;
pub mod tls;
mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use crossbeam_utils::CachePadded;
use http::header::HOST;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use time::OffsetDateTime;

use crate::access_log::{AccessEntry, AccessLog};
use crate::config::{HttpConfig, KeyLocation, RouteAuth, UnderscoreHeaders};
use crate::index::{KeyIndex, KeyRecord};
use crate::limit::RateInfo;
use crate::limit::{KeyStates, UsageSlot};
use crate::metrics::sharded::ShardedGauge;
use crate::metrics::Metrics;
use crate::outcome::{new_request_id, Rejection};
use crate::policy::{decide, resolve_client_ip, Limits, RequestFacts};
use crate::sync::Freshness;
use crate::usage::RequestUsage;

pub use headers::find_key;
pub use routing::Route;
pub use service::{ProxyService, STOP_LINGER};
pub use state::{GatewayState, StateCell, StateShare};
pub use stop::{StopSignal, StopWatch};
pub use upstream::{Upstream, UpstreamBuildError};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_KEYGATE_PREFIX: &str = "x-keygate-";

/// Names of the headers keygate writes, spelled as they go on the wire. Pingora keeps a
/// wire spelling beside every header; a `&'static str` is stored as it is, where a
/// `HeaderName` would be re-titled into a new allocation on every request.
mod wire {
    pub const X_REQUEST_ID: &str = "X-Request-Id";
    pub const X_FORWARDED_FOR: &str = "X-Forwarded-For";
    pub const X_KEYGATE_KEY_ID: &str = "X-Keygate-Key-Id";
    pub const X_KEYGATE_OWNER: &str = "X-Keygate-Owner";
    pub const X_KEYGATE_PLAN: &str = "X-Keygate-Plan";
    pub const X_KEYGATE_SCOPES: &str = "X-Keygate-Scopes";
}

/// Everything the request path shares with the rest of the node. The node hands
/// it its parts once ([`DataPlane::new`]) and then changes it only through its
/// methods: a reload swaps the whole [`GatewayState`], a stop reads the counts.
pub struct DataPlane {
    state: StateCell<GatewayState>,
    keys: Arc<KeyIndex>,
    /// Each budget's rate limit, quota and usage; the flusher drains the usage.
    states: Arc<KeyStates>,
    access_log: AccessLog,
    metrics: Arc<Metrics>,
    /// Requests between their first byte and their log line; every request adds to it
    /// twice, so each thread counts in a slot of its own.
    in_flight: ShardedGauge,
    /// Downstream connections being served, idle keep-alive ones included. Written
    /// once per connection: on a line of its own, away from what every request reads.
    connections: CachePadded<AtomicUsize>,
    /// Set when keys come from a feed with a `max_staleness` limit.
    freshness: Option<Freshness>,
}

impl DataPlane {
    pub fn new(
        state: GatewayState,
        keys: Arc<KeyIndex>,
        states: Arc<KeyStates>,
        access_log: AccessLog,
        metrics: Arc<Metrics>,
        freshness: Option<Freshness>,
    ) -> Self {
        DataPlane {
            state: StateCell::new(state),
            keys,
            states,
            access_log,
            metrics,
            in_flight: ShardedGauge::default(),
            connections: CachePadded::new(AtomicUsize::new(0)),
            freshness,
        }
    }

    /// Whether keyed requests can be judged: keys are loaded and, where a staleness
    /// limit is set, recent enough (see `Freshness::is_current`).
    pub fn keys_current(&self) -> bool {
        self.keys.is_loaded() && self.freshness.as_ref().is_none_or(Freshness::is_current)
    }

    /// Routes and upstreams of a reloaded config: requests already routed keep the old ones.
    pub fn replace_state(&self, state: GatewayState) {
        self.state.store(state);
    }

    /// The routes and upstreams in use now.
    pub fn state(&self) -> Arc<GatewayState> {
        self.state.load_full()
    }

    /// Requests between their first byte and their log line.
    pub fn requests_in_flight(&self) -> usize {
        usize::try_from(self.in_flight.get()).unwrap_or(0)
    }

    /// Downstream connections open, idle keep-alive ones included.
    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Writes out the access log's buffered lines, waiting at most `within`.
    pub fn flush_access_log(&self, within: std::time::Duration) {
        self.access_log.flush(within);
    }
}

/// The `ProxyHttp` implementation shared by every worker thread.
pub struct Gateway {
    plane: Arc<DataPlane>,
}

impl Gateway {
    pub fn new(plane: Arc<DataPlane>) -> Self {
        Gateway { plane }
    }
}

/// Per-request state carried between Pingora's hooks.
pub struct RequestCtx {
    state: Option<Arc<StateShare<GatewayState>>>,
    route: Option<usize>,
    request_id: HeaderValue,
    key: Option<Arc<KeyRecord>>,
    /// The key's usage entry, held from the decision to the count in `logging`.
    usage: Option<UsageSlot>,
    rate: Option<RateInfo>,
    upstream_status: Option<u16>,
    peer_ip: Option<IpAddr>,
    peer_trusted: bool,
    /// The client address after `trusted_proxies`, once known.
    client_ip: Option<IpAddr>,
    upstream_addr: Option<SocketAddr>,
    connect_attempts: usize,
    started: Instant,
    /// Set when keygate decided the outcome itself, so `fail_to_proxy` answers with it.
    rejection: Option<Rejection>,
    /// The presented key when it is an imported key without keygate's shape: the
    /// upstream must not get it either, and only this request knows its text.
    foreign_key: Option<Box<str>>,
}

impl RequestCtx {
    fn route(&self) -> Option<&Route> {
        let (state, index) = (self.state.as_ref()?, self.route?);
        state.routes.get(index)
    }
}

/// What `request_filter` concluded, computed while the request is borrowed.
enum Verdict {
    Proxy,
    Reject(Rejection),
}

impl Gateway {
    fn judge(&self, req: &RequestHeader, state: &GatewayState, ctx: &mut RequestCtx) -> Verdict {
        let path = req.uri.path();
        // An absolute-form target's authority is the request's host (RFC 9112 §3.2.2),
        // whatever `Host` says; an upstream that follows the RFC routes on it.
        let host = req.uri.host().or_else(|| req.headers.get(HOST).and_then(|h| h.to_str().ok()));
        let Some(index) = routing::find_route(&state.routes, &req.method, host, path) else {
            return Verdict::Reject(Rejection::NoRoute);
        };
        ctx.route = Some(index);
        let route = &state.routes[index];
        if route.auth == RouteAuth::None {
            return Verdict::Proxy;
        }
        let presented = headers::find_key(req, &state.key_locations);
        let client_ip = resolve_client_ip(
            ctx.peer_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            req.headers.get_all(X_FORWARDED_FOR).iter().map(HeaderValue::as_bytes),
            &state.trusted_proxies,
        );
        ctx.client_ip = Some(client_ip);
        let facts = RequestFacts { presented_key: presented.as_deref(), client_ip, required_scopes: &route.scopes };
        let plane = &*self.plane;
        let now = OffsetDateTime::now_utc();
        if !plane.keys_current() {
            return Verdict::Reject(Rejection::NotReady);
        }
        let limits = Limits { plans: &state.plans, states: &plane.states };
        let decision = decide(&facts, &plane.keys.load(), &limits, now);
        if let (Some(record), Some(raw)) = (&decision.key, presented.as_deref()) {
            if record.imported() && crate::key::parse(raw).is_err() {
                ctx.foreign_key = Some(raw.into());
            }
        }
        ctx.key = decision.key;
        ctx.usage = decision.usage;
        ctx.rate = decision.rate;
        match decision.denial {
            None => Verdict::Proxy,
            Some(denial) => Verdict::Reject(Rejection::Denied(denial)),
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        // Paired with the decrement in `logging`, which Pingora calls for every request.
        self.plane.in_flight.increment();
        RequestCtx {
            state: None,
            route: None,
            request_id: HeaderValue::from_static(""),
            key: None,
            usage: None,
            rate: None,
            upstream_status: None,
            peer_ip: None,
            peer_trusted: false,
            client_ip: None,
            upstream_addr: None,
            connect_attempts: 0,
            started: Instant::now(),
            rejection: None,
            foreign_key: None,
        }
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut RequestCtx) -> Result<()> {
        // The head is in: the connection's header deadline no longer applies.
        if let Some(stream) = session.as_downstream().stream() {
            if let Some(guarded) = (**stream).as_any().downcast_ref::<connection::GuardedStream>() {
                guarded.clock().head_received();
            }
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let state = self.plane.state.hold();
        ctx.request_id = headers::request_id(session.req_header().headers.get(X_REQUEST_ID));
        ctx.peer_ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_canonical());
        ctx.peer_trusted = ctx.peer_ip.is_some_and(|ip| state.trusted_proxies.iter().any(|n| n.contains(&ip)));
        let verdict = match normalize_request(session.req_header_mut(), &state.http) {
            Ok(()) => self.judge(session.req_header(), &state, ctx),
            Err(rejection) => Verdict::Reject(rejection),
        };
        ctx.state = Some(state);
        match verdict {
            Verdict::Proxy => Ok(false),
            Verdict::Reject(rejection) => {
                ctx.rejection = Some(rejection);
                // An unread body would be parsed as the next request: close instead.
                let keep_alive = session.is_body_done();
                let answer = respond::ErrorAnswer {
                    rejection,
                    request_id: &ctx.request_id,
                    rate: ctx.rate.as_ref(),
                    keep_alive,
                };
                if let Err(e) = respond::write_error(session, answer).await {
                    tracing::debug!(error = %e, "could not write a denial to the client");
                    session.set_keepalive(None);
                }
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        // Borrowed from the request's state, not cloned: an `Arc` clone is a write
        // to a count that every core shares.
        let route = ctx.route.and_then(|index| ctx.state.as_ref()?.routes.get(index));
        let Some(upstream) = route.map(|route| &route.upstream) else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        ctx.connect_attempts += 1;
        let Some(target) = upstream.select() else {
            ctx.rejection = Some(Rejection::UpstreamUnavailable);
            return Error::e_explain(
                ErrorType::ConnectNoRoute,
                format!("upstream {} has no healthy target", upstream.name),
            );
        };
        ctx.upstream_addr = Some(target.addr);
        Ok(target.peer())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent yet, so another target may take the request.
        let targets = ctx.route().map_or(0, |r| r.upstream.target_count());
        if ctx.connect_attempts < targets {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(state) = ctx.state.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "upstream request without gateway state");
        };
        drop_forged_headers(upstream_request, state);
        if let Some(key) = &ctx.key {
            strip_key(upstream_request, state, ctx.foreign_key.as_deref())?;
            upstream_request.insert_header(wire::X_KEYGATE_KEY_ID, key.id_header())?;
            if let Some(owner) = key.owner_header() {
                upstream_request.insert_header(wire::X_KEYGATE_OWNER, owner)?;
            }
            if let Some(plan) = key.plan_header().or(state.default_plan.as_ref()) {
                upstream_request.insert_header(wire::X_KEYGATE_PLAN, plan.clone())?;
            }
            upstream_request.insert_header(wire::X_KEYGATE_SCOPES, key.scopes_header().clone())?;
        }

        if let Some(peer) = ctx.peer_ip {
            let forwarded = forwarded_for(upstream_request, peer, ctx.peer_trusted);
            upstream_request.insert_header(wire::X_FORWARDED_FOR, forwarded)?;
        }
        upstream_request.insert_header(wire::X_REQUEST_ID, ctx.request_id.clone())?;
        if let Some(route) = ctx.route.and_then(|index| state.routes.get(index)) {
            for (name, value) in &route.set_headers {
                upstream_request.insert_header(name.clone(), value.clone())?;
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header(wire::X_REQUEST_ID, ctx.request_id.clone())?;
        if let Some(rate) = &ctx.rate {
            respond::insert_rate_headers(upstream_response, rate)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let rejection = ctx.rejection.take().or_else(|| classify(e));
        let Some(rejection) = rejection else {
            // The client went away: nobody to answer.
            return FailToProxy { error_code: 0, can_reuse_downstream: false };
        };
        ctx.rejection = Some(rejection);
        if ctx.request_id.is_empty() {
            ctx.request_id = new_request_id();
        }
        if session.response_written().is_none() {
            let answer = respond::ErrorAnswer {
                rejection,
                request_id: &ctx.request_id,
                rate: ctx.rate.as_ref(),
                keep_alive: false,
            };
            if let Err(write_error) = respond::write_error(session, answer).await {
                tracing::debug!(error = %write_error, "could not write an error response to the client");
            }
        }
        FailToProxy { error_code: rejection.status(), can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, _error: Option<&Error>, ctx: &mut RequestCtx) {
        let plane = &*self.plane;
        plane.in_flight.decrement();
        let elapsed = ctx.started.elapsed();
        let status = match (session.response_written(), ctx.rejection) {
            (Some(resp), _) => resp.status.as_u16(),
            (None, Some(rejection)) => rejection.status(),
            (None, None) => 0,
        };
        let route = ctx.route();
        match (route, &ctx.state) {
            (Some(route), _) => route.metrics.observe(ctx.rejection, elapsed),
            (None, Some(state)) => state.unrouted_metrics.observe(ctx.rejection, elapsed),
            (None, None) => {}
        }
        if let (Some(route), Some(upstream_status)) = (route, ctx.upstream_status) {
            route.upstream.metrics.observe(upstream_status);
        }
        if let (Some(key), Some(slot)) = (&ctx.key, &ctx.usage) {
            let denial = match ctx.rejection {
                Some(Rejection::Denied(denial)) => Some(denial),
                _ => None,
            };
            let usage = RequestUsage {
                denial,
                status,
                bytes_in: session.body_bytes_read() as u64,
                bytes_out: session.body_bytes_sent() as u64,
                at_ms: unix_millis(),
            };
            slot.record(key.owner(), &usage);
        }
        if !plane.access_log.enabled() {
            return;
        }
        let req = session.req_header();
        let path_and_query = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let stripped =
            ctx.state.as_ref().and_then(|state| headers::strip_query_params(path_and_query, &state.key_query_params));
        plane.access_log.record(&AccessEntry {
            time: OffsetDateTime::now_utc(),
            request_id: ctx.request_id.to_str().unwrap_or(""),
            route: route.map(|r| r.name.as_str()),
            key_id: ctx.key.as_ref().map(|k| k.id()),
            client_ip: ctx.client_ip.or(ctx.peer_ip),
            method: req.method.as_str(),
            path: stripped.as_deref().unwrap_or(path_and_query),
            status,
            outcome: ctx.rejection.map_or("allowed", Rejection::code),
            duration_ms: (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0,
            upstream: route.filter(|_| ctx.upstream_addr.is_some()).map(|r| r.upstream.name.as_str()),
            upstream_addr: ctx.upstream_addr,
        });
    }

    /// Pingora's default summary logs the raw path and query, which can hold `?api_key=`.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let route = ctx.route().map_or("-", |r| r.name.as_str());
        format!(
            "{} {}, route: {}, request_id: {}",
            req.method,
            req.uri.path(),
            route,
            ctx.request_id.to_str().unwrap_or("-")
        )
    }
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Maps a Pingora error to the answer the client gets; `None` when the client is gone.
fn classify(e: &Error) -> Option<Rejection> {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed | ReadTimedout | WriteTimedout) => None,
        (ErrorSource::Downstream, _) => Some(Rejection::BadRequest),
        (_, ConnectTimedout | ReadTimedout | WriteTimedout) => Some(Rejection::UpstreamTimeout),
        (ErrorSource::Upstream, _) => Some(Rejection::UpstreamError),
        (_, HTTPStatus(400..=499)) => Some(Rejection::BadRequest),
        _ => Some(Rejection::Internal),
    }
}

/// Brings the path to the one form that routing and the upstream share (see
/// `path`), and refuses header names with `_` where the config says so.
fn normalize_request(req: &mut RequestHeader, http: &HttpConfig) -> std::result::Result<(), Rejection> {
    if http.underscore_headers == UnderscoreHeaders::Reject
        && req.headers.keys().any(|name| name.as_str().contains('_'))
    {
        return Err(Rejection::BadRequest);
    }
    // The URI drops a `#fragment`, and holds a lossy copy of a target that is not
    // UTF-8, while the upstream is sent the target's bytes: those would be routed
    // on one path and served another.
    if !req.raw_path_is_utf8() || req.raw_path().contains(&b'#') {
        return Err(Rejection::BadRequest);
    }
    let normalized = match path::normalize(req.uri.path(), http.escaped_slashes) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(normalized)) => normalized,
        Err(refusal) => {
            tracing::debug!(reason = %refusal, "request path refused");
            return Err(Rejection::BadRequest);
        }
    };
    let mut target = normalized;
    if let Some(query) = req.uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|_| Rejection::BadRequest)?);
    let uri = http::Uri::from_parts(parts).map_err(|_| Rejection::BadRequest)?;
    req.set_uri(uri);
    Ok(())
}

/// Whether an upstream could read `name` as a header only keygate may set:
/// `X-Keygate-*`, or with `_` for `-` (CGI, WSGI and Rack read both as
/// `HTTP_X_KEYGATE_...`) one of those or another header keygate writes.
fn is_forged_name(name: &str, state: &GatewayState) -> bool {
    const PREFIX: &[u8] = X_KEYGATE_PREFIX.as_bytes();
    let bytes = name.as_bytes();
    let dashed = |b: u8| if b == b'_' { b'-' } else { b };
    if bytes.len() >= PREFIX.len() && bytes[..PREFIX.len()].iter().zip(PREFIX).all(|(&b, &p)| dashed(b) == p) {
        return true;
    }
    if !name.contains('_') {
        return false;
    }
    let reads_as = |wanted: &str| {
        wanted.len() == bytes.len() && bytes.iter().zip(wanted.as_bytes()).all(|(&b, &w)| dashed(b) == w)
    };
    reads_as(X_FORWARDED_FOR.as_str())
        || reads_as(X_REQUEST_ID.as_str())
        || state.routes.iter().any(|route| route.set_headers.iter().any(|(set, _)| reads_as(set.as_str())))
}

/// Removes what the client may not send upstream: any spelling of the headers
/// keygate sets, and, unless `underscore_headers: pass`, every name with `_`.
fn drop_forged_headers(req: &mut RequestHeader, state: &GatewayState) {
    let drop_underscores = state.http.underscore_headers != UnderscoreHeaders::Pass;
    let doomed = |name: &HeaderName| {
        let name = name.as_str();
        (drop_underscores && name.contains('_')) || is_forged_name(name, state)
    };
    if !req.headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = req.headers.keys().filter(|name| doomed(name)).cloned().collect();
    for name in names {
        req.remove_header(&name);
    }
}

/// Removes every value shaped like a key, and `foreign` (the presented imported key of
/// another shape), from every place a key may be presented, not only where it was
/// found, so no copy of it reaches the upstream. Other values there (an application's
/// own `Authorization: Bearer` token) are the upstream's and stay.
fn strip_key(upstream_request: &mut RequestHeader, state: &GatewayState, foreign: Option<&str>) -> Result<()> {
    for location in &state.key_locations {
        if let KeyLocation::Header { name, scheme } = location {
            headers::remove_key_values(upstream_request, name, scheme.as_deref(), foreign)?;
        }
    }
    if state.key_query_params.is_empty() {
        return Ok(());
    }
    let Some(path_and_query) = upstream_request.uri.path_and_query() else {
        return Ok(());
    };
    if let Some(stripped) = headers::strip_key_params(path_and_query.as_str(), &state.key_query_params, foreign) {
        let uri = stripped
            .parse::<http::Uri>()
            .map_err(|e| Error::because(ErrorType::InternalError, "rewriting the query", e))?;
        upstream_request.set_uri(uri);
    }
    Ok(())
}

/// A trusted peer's chain is extended; an untrusted client's own chain is replaced,
/// so it cannot plant addresses the upstream might believe.
fn forwarded_for(req: &RequestHeader, peer: IpAddr, peer_trusted: bool) -> HeaderValue {
    let mut peer_text = IpText::default();
    let peer_text = peer_text.format(peer);
    let mut chain: Vec<u8> = Vec::new();
    if peer_trusted {
        for value in req.headers.get_all(X_FORWARDED_FOR) {
            // Values that are not visible ASCII are dropped rather than passed on.
            let Ok(text) = value.to_str() else { continue };
            let text = text.trim();
            if !text.is_empty() {
                chain.extend_from_slice(text.as_bytes());
                chain.extend_from_slice(b", ");
            }
        }
    }
    if chain.is_empty() {
        // Only digits, dots and colons: always a valid header value.
        return HeaderValue::from_bytes(peer_text).unwrap_or(HeaderValue::from_static(""));
    }
    chain.extend_from_slice(peer_text);
    // The chain was a valid header value already; ", " and an address keep it one.
    HeaderValue::from_bytes(&chain)
        .unwrap_or_else(|_| HeaderValue::from_bytes(peer_text).unwrap_or(HeaderValue::from_static("")))
}

/// An address as text without `fmt`, which costs more than the rest of the header.
struct IpText {
    buf: [u8; 45],
}

impl Default for IpText {
    fn default() -> Self {
        IpText { buf: [0; 45] }
    }
}

impl IpText {
    fn format(&mut self, ip: IpAddr) -> &[u8] {
        match ip {
            IpAddr::V4(v4) => {
                let mut len = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.buf[len] = b'.';
                        len += 1;
                    }
                    if octet >= 100 {
                        self.buf[len] = b'0' + octet / 100;
                        len += 1;
                    }
                    if octet >= 10 {
                        self.buf[len] = b'0' + octet / 10 % 10;
                        len += 1;
                    }
                    self.buf[len] = b'0' + octet % 10;
                    len += 1;
                }
                &self.buf[..len]
            }
            IpAddr::V6(v6) => {
                use std::io::Write;
                let mut cursor = std::io::Cursor::new(&mut self.buf[..]);
                // The longest IPv6 text is 45 bytes (an IPv4-mapped address): it always fits.
                let _ = write!(cursor, "{v6}");
                let len = usize::try_from(cursor.position()).unwrap_or(0);
                &self.buf[..len]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_failures_get_no_answer_and_upstream_failures_map_to_5xx() {
        let down = Error::new_down;
        let up = Error::new_up;
        assert_eq!(classify(&down(ErrorType::ConnectionClosed)), None);
        assert_eq!(classify(&down(ErrorType::ReadTimedout)), None);
        assert_eq!(classify(&down(ErrorType::InvalidHTTPHeader)), Some(Rejection::BadRequest));
        assert_eq!(classify(&up(ErrorType::ConnectTimedout)), Some(Rejection::UpstreamTimeout));
        assert_eq!(classify(&up(ErrorType::ReadTimedout)), Some(Rejection::UpstreamTimeout));
        assert_eq!(classify(&up(ErrorType::ConnectRefused)), Some(Rejection::UpstreamError));
        assert_eq!(classify(&up(ErrorType::ConnectionClosed)), Some(Rejection::UpstreamError));
    }

    #[test]
    fn forwarded_for_extends_only_a_trusted_chain() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "198.51.100.1").unwrap();
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(forwarded_for(&req, peer, true), "198.51.100.1, 10.0.0.2");
        assert_eq!(forwarded_for(&req, peer, false), "10.0.0.2");
        let bare = RequestHeader::build("GET", b"/", None).unwrap();
        assert_eq!(forwarded_for(&bare, peer, true), "10.0.0.2");
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        let samples = [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ];
        for sample in samples {
            let ip: IpAddr = sample.parse().unwrap();
            let mut text = IpText::default();
            assert_eq!(std::str::from_utf8(text.format(ip)).unwrap(), ip.to_string());
        }
        for octet in 0..=255u8 {
            let ip = IpAddr::from([octet, octet, 0, 255]);
            let mut text = IpText::default();
            assert_eq!(std::str::from_utf8(text.format(ip)).unwrap(), ip.to_string());
        }
    }
}
