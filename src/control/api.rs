//! The admin API (CONTRACT §6) and the feed gateways follow.
//!
//! Handlers validate every field before the store sees it and answer errors in
//! the one JSON shape keygate uses everywhere. Every change is audited with the
//! name of the token that made it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::feed::Feed;
use super::fields::{
    duration, expiry_from_ttl, ip_allowlist, metadata, quota, rate_limit, scopes, string_field, string_list, timestamp,
    FieldError,
};
use super::gateways::GatewayRegistry;
use super::model::{
    new_key_id, ChangeBatch, Granularity, KeyFilter, KeyOrder, KeyPatch, KeyStatusText, NewKey, StoredKey,
};
use super::snapshot::SharedSnapshots;
use super::store::{Store, StoreError};
use crate::admin::Route;
use crate::config::{TokenConfig, TokenRole};
use crate::index::wire;
use crate::key::{self, KeyDigest};
use crate::limit::fleet::{FleetAnswers, FleetExchange, OPS_PER_EXCHANGE};
use crate::outcome::{error_json, new_request_id, APPLICATION_JSON};
use crate::usage::upload::{MAX_UPLOAD_BYTES, MAX_UPLOAD_RECORDS};
use crate::usage::UsageRecord;

/// Everything the handlers share.
pub struct ApiState {
    pub store: Arc<Store>,
    pub admin_tokens: Vec<TokenConfig>,
    pub sync_tokens: Vec<TokenConfig>,
    pub plans: BTreeSet<String>,
    pub feed: Arc<Feed>,
    /// Snapshots being sent, shared by gateways that ask at the same time.
    pub snapshots: SharedSnapshots,
    /// When expired fleet counters were last swept (Unix seconds).
    pub fleet_swept_at: std::sync::atomic::AtomicU64,
    /// The gateways following this control plane, from their polls.
    pub gateways: GatewayRegistry,
    /// Turns true when the node stops: open event streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// How often a control plane sweeps expired fleet counters, at most.
const FLEET_SWEEP_EVERY_SECS: u64 = 60;

/// A gateway's node id is shown up to this many characters.
const MAX_NODE_ID_CHARS: usize = 128;
/// Longest a gateway's long poll is held open.
const MAX_WAIT: Duration = Duration::from_secs(30);
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
const DEFAULT_GRACE: &str = "24h";

pub fn router(state: Arc<ApiState>) -> Router {
    crate::admin::router_of(routes()).with_state(state)
}

/// Every route of the admin API: `router` serves exactly these, and the OpenAPI
/// document (`control::openapi`) is tested against them.
pub fn routes() -> Vec<Route<Arc<ApiState>>> {
    vec![
        Route::new(Method::POST, "/v1/keys", create_key),
        Route::new(Method::GET, "/v1/keys", list_keys),
        Route::new(Method::POST, "/v1/keys/import", super::import::import_keys),
        Route::new(Method::GET, "/v1/keys/{id}", get_key),
        Route::new(Method::PATCH, "/v1/keys/{id}", update_key),
        Route::new(Method::DELETE, "/v1/keys/{id}", delete_key),
        Route::new(Method::POST, "/v1/keys/{id}/revoke", revoke_key),
        Route::new(Method::POST, "/v1/keys/{id}/rotate", rotate_key),
        Route::new(Method::GET, "/v1/keys/{id}/usage", key_usage),
        Route::new(Method::GET, "/v1/audit", audit),
        Route::new(Method::GET, "/v1/events", super::events::stream_events),
        Route::new(Method::GET, "/v1/gateways", list_gateways),
        Route::new(Method::GET, "/v1/whoami", whoami),
        Route::new(Method::GET, "/v1/openapi.json", super::openapi::document),
        Route::new(Method::GET, "/v1/sync/snapshot", sync_snapshot),
        Route::new(Method::GET, "/v1/sync/changes", sync_changes),
        Route::new(Method::POST, "/v1/sync/usage", sync_usage),
        Route::new(Method::GET, "/v1/sync/quota-usage", sync_quota_usage),
        Route::new(Method::POST, "/v1/sync/fleet", sync_fleet),
    ]
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, code: "invalid_request", message: format!("{field}: {message}") }
    }

    fn too_large(message: String) -> Self {
        ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, code: "payload_too_large", message }
    }

    fn not_found(id: &str) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, code: "not_found", message: format!("no key {id}") }
    }

    fn forbidden() -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: "this token may only read: changes need a token with role admin".into(),
        }
    }

    fn unauthorized(message: &str) -> Self {
        ApiError { status: StatusCode::UNAUTHORIZED, code: "unauthorized", message: message.to_owned() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => {
                ApiError { status: StatusCode::NOT_FOUND, code: "not_found", message: "no such key".into() }
            }
            StoreError::Conflict(message) => ApiError { status: StatusCode::CONFLICT, code: "conflict", message },
            StoreError::Invalid(message) => {
                ApiError { status: StatusCode::BAD_REQUEST, code: "invalid_request", message }
            }
            other => {
                tracing::error!(error = %other, "store error");
                ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    code: "internal_error",
                    message: "the store failed".into(),
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = new_request_id();
        let body = error_json(self.code, &self.message, request_id.to_str().unwrap_or(""));
        let mut response = (self.status, [(header::CONTENT_TYPE, APPLICATION_JSON)], body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(r#"Bearer realm="keygate""#));
        }
        response.headers_mut().insert("x-request-id", request_id);
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ---------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------

/// A token that may change things (`role: admin`); its name goes in the audit log.
pub struct Admin(pub String);
/// Any admin-list token, `role: read` included: enough to look.
pub struct Reader(pub String, pub TokenRole);
/// A gateway holding a sync token.
pub struct SyncClient(#[allow(dead_code)] pub String);

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Compares digests in constant time, so response timing says nothing about tokens.
fn find_token<'a>(tokens: &'a [TokenConfig], presented: &str) -> Option<&'a TokenConfig> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found = None;
    for token in tokens {
        let difference = token.sha256.iter().zip(digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference == 0 {
            found = Some(token);
        }
    }
    found
}

impl FromRequestParts<Arc<ApiState>> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(|| ApiError::unauthorized("an admin token is required"))?;
        find_token(&state.admin_tokens, token)
            .map(|token| Reader(token.name.clone(), token.role))
            .ok_or_else(|| ApiError::unauthorized("the admin token is not valid"))
    }
}

impl FromRequestParts<Arc<ApiState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> Result<Self, Self::Rejection> {
        match Reader::from_request_parts(parts, state).await? {
            Reader(name, TokenRole::Admin) => Ok(Admin(name)),
            Reader(_, TokenRole::Read) => Err(ApiError::forbidden()),
        }
    }
}

impl FromRequestParts<Arc<ApiState>> for SyncClient {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(|| ApiError::unauthorized("a sync token is required"))?;
        find_token(&state.sync_tokens, token)
            .map(|token| SyncClient(token.name.clone()))
            .ok_or_else(|| ApiError::unauthorized("the sync token is not valid"))
    }
}

/// Query parameters, with a 400 in the contract's shape instead of axum's plain-text rejection.
struct ApiQuery<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(ApiQuery(query)),
            Err(e) => Err(ApiError::invalid("query", e.body_text())),
        }
    }
}

/// A JSON object body, with a 400 naming the problem instead of axum's plain-text rejection.
struct JsonObject(Map<String, Value>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!("body: {}", e.body_text()))
            } else {
                ApiError::invalid("body", e.body_text())
            }
        })?;
        if bytes.is_empty() {
            return Ok(JsonObject(Map::new()));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::invalid("body", "expected a JSON object")),
            Err(e) => Err(ApiError::invalid("body", format!("not valid JSON: {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------
// Fields (validated in `fields`, shared with the bulk import)
// ---------------------------------------------------------------------------

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::invalid(&e.field, e.message)
    }
}

fn status(value: &Value) -> ApiResult<KeyStatusText> {
    match value.as_str() {
        Some("active") => Ok(KeyStatusText::Active),
        Some("disabled") => Ok(KeyStatusText::Disabled),
        Some("revoked") => Err(ApiError::invalid("status", "revoke a key with POST /v1/keys/{id}/revoke")),
        _ => Err(ApiError::invalid("status", "must be \"active\" or \"disabled\"")),
    }
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

const CREATE_FIELDS: &[&str] = &[
    "name",
    "owner",
    "plan",
    "scopes",
    "ip_allowlist",
    "rate_limit",
    "quota",
    "expires_at",
    "ttl",
    "prefix",
    "metadata",
    "tags",
];

/// A fresh raw key and the record fields derived from it.
fn mint(prefix: &str) -> ApiResult<(String, String, String)> {
    let raw = key::generate(prefix).map_err(|e| ApiError::invalid("prefix", e))?;
    let hash = KeyDigest::of(&raw).to_string();
    let masked = key::mask(&raw);
    Ok((raw, hash, masked))
}

async fn create_key(
    State(state): State<Arc<ApiState>>,
    Admin(actor): Admin,
    JsonObject(body): JsonObject,
) -> ApiResult<Response> {
    if let Some(unknown) = body.keys().find(|k| !CREATE_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(unknown, "unknown field"));
    }
    let field = |name: &str| body.get(name).filter(|v| !v.is_null());
    let name = string_field("name", field("name").ok_or_else(|| ApiError::invalid("name", "is required"))?)?;
    if body.contains_key("expires_at") && body.contains_key("ttl") {
        return Err(ApiError::invalid("ttl", "give either expires_at or ttl, not both"));
    }
    let expires_at = match (field("expires_at"), field("ttl")) {
        (Some(at), _) => Some(timestamp("expires_at", at)?),
        (None, Some(ttl)) => Some(expiry_from_ttl(ttl)?),
        (None, None) => None,
    };
    let prefix =
        field("prefix").map(|v| string_field("prefix", v)).transpose()?.unwrap_or_else(|| key::DEFAULT_PREFIX.into());
    if !key::valid_prefix(&prefix) {
        return Err(ApiError::invalid("prefix", key::KeyFormatError::BadPrefix));
    }
    let (raw, hash, masked) = mint(&prefix)?;
    let new = NewKey {
        id: new_key_id(),
        hash,
        prefix,
        masked,
        name,
        owner: field("owner").map(|v| string_field("owner", v)).transpose()?,
        plan: field("plan").map(|v| super::fields::plan(&state.plans, v)).transpose()?,
        scopes: field("scopes").map(scopes).transpose()?.unwrap_or_default(),
        ip_allowlist: field("ip_allowlist").map(ip_allowlist).transpose()?.unwrap_or_default(),
        rate_limit: field("rate_limit").map(rate_limit).transpose()?,
        quota: field("quota").map(quota).transpose()?,
        expires_at,
        metadata: field("metadata").map(metadata).transpose()?.unwrap_or_default(),
        tags: field("tags").map(|v| string_list("tags", v)).transpose()?.unwrap_or_default(),
    };
    let record = state.store.create_key(new, &actor).await?;
    state.feed.poke();
    Ok((StatusCode::CREATED, Json(json!({"key": raw, "record": record.public_json()}))).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    owner: Option<String>,
    status: Option<String>,
    plan: Option<String>,
    tag: Option<String>,
    q: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    sort: Option<String>,
}

async fn list_keys(
    State(state): State<Arc<ApiState>>,
    _reader: Reader,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<Value>> {
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some("active") => Some(KeyStatusText::Active),
        Some("disabled") => Some(KeyStatusText::Disabled),
        Some("revoked") => Some(KeyStatusText::Revoked),
        Some(other) => {
            return Err(ApiError::invalid("status", format!("{other:?} is not active, disabled or revoked")))
        }
    };
    let limit = match query.limit.as_deref() {
        None | Some("") => DEFAULT_PAGE,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(ApiError::invalid("limit", format!("must be a number from 1 to {MAX_PAGE}"))),
        },
    };
    let order = match query.sort.as_deref() {
        None | Some("") | Some("created") => KeyOrder::Created,
        Some("last_used") => KeyOrder::LastUsed,
        Some(other) => return Err(ApiError::invalid("sort", format!("{other:?} is not created or last_used"))),
    };
    let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let filter = KeyFilter {
        order,
        owner: non_empty(query.owner),
        status,
        plan: non_empty(query.plan),
        tag: non_empty(query.tag),
        q: non_empty(query.q),
    };
    let cursor = non_empty(query.cursor);
    let (keys, next_cursor) = state.store.list_keys(&filter, limit, cursor.as_deref()).await.map_err(|e| match e {
        StoreError::Invalid(message) => ApiError::invalid("cursor", message),
        other => other.into(),
    })?;
    Ok(Json(json!({"keys": keys.iter().map(StoredKey::public_json).collect::<Vec<_>>(), "next_cursor": next_cursor})))
}

async fn get_key(
    State(state): State<Arc<ApiState>>,
    _reader: Reader,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let key = state.store.get_key(&id).await?.ok_or_else(|| ApiError::not_found(&id))?;
    Ok(Json(key.public_json()))
}

async fn update_key(
    State(state): State<Arc<ApiState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let mut patch = KeyPatch::default();
    if body.contains_key("expires_at") && body.contains_key("ttl") {
        return Err(ApiError::invalid("ttl", "give either expires_at or ttl, not both"));
    }
    for (field, value) in &body {
        let clear = value.is_null();
        match field.as_str() {
            "name" if !clear => patch.name = Some(string_field("name", value)?),
            "owner" => patch.owner = Some((!clear).then(|| string_field("owner", value)).transpose()?),
            "plan" => patch.plan = Some((!clear).then(|| super::fields::plan(&state.plans, value)).transpose()?),
            "scopes" => patch.scopes = Some(if clear { Vec::new() } else { scopes(value)? }),
            "ip_allowlist" => patch.ip_allowlist = Some(if clear { Vec::new() } else { ip_allowlist(value)? }),
            "rate_limit" => patch.rate_limit = Some((!clear).then(|| rate_limit(value)).transpose()?),
            "quota" => patch.quota = Some((!clear).then(|| quota(value)).transpose()?),
            "expires_at" => patch.expires_at = Some((!clear).then(|| timestamp("expires_at", value)).transpose()?),
            "ttl" => patch.expires_at = Some((!clear).then(|| expiry_from_ttl(value)).transpose()?),
            "status" if !clear => patch.status = Some(status(value)?),
            "metadata" => patch.metadata = Some(if clear { Map::new() } else { metadata(value)? }),
            "tags" => patch.tags = Some(if clear { Vec::new() } else { string_list("tags", value)? }),
            "name" | "status" => return Err(ApiError::invalid(field, "cannot be cleared")),
            "prefix" | "id" | "masked" | "created_at" | "updated_at" | "last_used_at" | "imported" => {
                return Err(ApiError::invalid(field, "cannot be changed"))
            }
            _ => return Err(ApiError::invalid(field, "unknown field")),
        }
    }
    if body.is_empty() {
        return Err(ApiError::invalid("body", "nothing to change"));
    }
    let key = state.store.update_key(&id, patch, &actor).await.map_err(|e| not_found_as(e, &id))?;
    state.feed.poke();
    Ok(Json(key.public_json()))
}

fn not_found_as(e: StoreError, id: &str) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::not_found(id),
        other => other.into(),
    }
}

async fn revoke_key(
    State(state): State<Arc<ApiState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let key = state.store.revoke_key(&id, &actor).await.map_err(|e| not_found_as(e, &id))?;
    state.feed.poke();
    Ok(Json(key.public_json()))
}

async fn rotate_key(
    State(state): State<Arc<ApiState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
    JsonObject(body): JsonObject,
) -> ApiResult<Response> {
    if let Some(unknown) = body.keys().find(|k| k.as_str() != "grace_period") {
        return Err(ApiError::invalid(unknown, "unknown field"));
    }
    let grace = duration("grace_period", body.get("grace_period").unwrap_or(&Value::from(DEFAULT_GRACE)))?;
    let old = state.store.get_key(&id).await?.ok_or_else(|| ApiError::not_found(&id))?;
    // An imported key may have no prefix keygate can mint with: its successor gets the default.
    let prefix = if key::valid_prefix(&old.prefix) { old.prefix.clone() } else { key::DEFAULT_PREFIX.to_owned() };
    let (raw, hash, masked) = mint(&prefix)?;
    let new = NewKey {
        id: new_key_id(),
        hash,
        prefix,
        masked,
        name: old.name.clone(),
        owner: old.owner.clone(),
        plan: old.plan.clone(),
        scopes: old.scopes.clone(),
        ip_allowlist: old.ip_allowlist.clone(),
        rate_limit: old.rate_limit,
        quota: old.quota,
        expires_at: old.expires_at,
        metadata: old.metadata.clone(),
        tags: old.tags.clone(),
    };
    let (_, created) = state.store.rotate_key(&id, new, grace, &actor).await.map_err(|e| not_found_as(e, &id))?;
    state.feed.poke();
    Ok((StatusCode::CREATED, Json(json!({"key": raw, "record": created.public_json()}))).into_response())
}

async fn delete_key(
    State(state): State<Arc<ApiState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.store.delete_key(&id, &actor).await.map_err(|e| not_found_as(e, &id))?;
    state.feed.poke();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
}

async fn key_usage(
    State(state): State<Arc<ApiState>>,
    _reader: Reader,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> ApiResult<Json<Value>> {
    state.store.get_key(&id).await?.ok_or_else(|| ApiError::not_found(&id))?;
    let to = match query.to.as_deref().filter(|s| !s.is_empty()) {
        Some(text) => timestamp("to", &Value::from(text))?,
        None => OffsetDateTime::now_utc(),
    };
    let from = match query.from.as_deref().filter(|s| !s.is_empty()) {
        Some(text) => timestamp("from", &Value::from(text))?,
        None => to - time::Duration::DAY,
    };
    if from >= to {
        return Err(ApiError::invalid("from", "must be before to"));
    }
    let granularity = match query.granularity.as_deref() {
        None | Some("") | Some("hour") => Granularity::Hour,
        Some("minute") => Granularity::Minute,
        Some("day") => Granularity::Day,
        Some(other) => return Err(ApiError::invalid("granularity", format!("{other:?} is not minute, hour or day"))),
    };
    let (buckets, totals) = state.store.usage(&id, from, to, granularity).await?;
    Ok(Json(json!({"key_id": id, "buckets": buckets, "totals": totals})))
}

#[derive(Deserialize)]
struct AuditQuery {
    key_id: Option<String>,
    actor: Option<String>,
    limit: Option<String>,
}

async fn audit(
    State(state): State<Arc<ApiState>>,
    _reader: Reader,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let limit = match query.limit.as_deref() {
        None | Some("") => 100,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(ApiError::invalid("limit", format!("must be a number from 1 to {MAX_PAGE}"))),
        },
    };
    fn present(v: Option<&str>) -> Option<&str> {
        v.filter(|s| !s.is_empty())
    }
    let events = state.store.audit(present(query.key_id.as_deref()), present(query.actor.as_deref()), limit).await?;
    Ok(Json(json!({"events": events})))
}

// ---------------------------------------------------------------------------
// The caller and the fleet
// ---------------------------------------------------------------------------

/// The token's name and role, so a console shows only what the token may do.
async fn whoami(Reader(name, role): Reader) -> Json<Value> {
    Json(json!({"name": name, "role": role.as_str()}))
}

async fn list_gateways(State(state): State<Arc<ApiState>>, _reader: Reader) -> Json<Value> {
    let latest = state.feed.latest();
    Json(json!({"gateways": state.gateways.list(latest), "version": latest}))
}

// ---------------------------------------------------------------------------
// Gateway feed and usage upload (sync tokens)
// ---------------------------------------------------------------------------

/// The whole key set in the wire encoding (`index::wire`), read from the store page
/// by page and shared by the gateways that ask at about the same time (see
/// `control::snapshot`): memory per gateway is one read buffer, however many keys
/// there are.
async fn sync_snapshot(State(state): State<Arc<ApiState>>, _client: SyncClient) -> ApiResult<Response> {
    let bytes = state.snapshots.stream(&state.store, state.feed.latest()).await?;
    let body = axum::body::Body::from_stream(bytes);
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(wire::MEDIA_TYPE))], body).into_response())
}

#[derive(Deserialize)]
struct ChangesQuery {
    since: u64,
    /// The polling gateway's node id, for `GET /v1/gateways`.
    node: Option<String>,
    /// How long to hold the request open when nothing has changed, in milliseconds.
    wait_ms: Option<u64>,
}

/// The long poll of `Feed::changes_after`, and the gateway's place for `GET /v1/gateways`.
async fn sync_changes(
    State(state): State<Arc<ApiState>>,
    _client: SyncClient,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(query): ApiQuery<ChangesQuery>,
) -> ApiResult<Json<ChangeBatch>> {
    let _open = query.node.as_deref().filter(|n| !n.is_empty()).map(|node| {
        let node: String = node.chars().take(MAX_NODE_ID_CHARS).collect();
        state.gateways.poll_started(&node, query.since, Some(peer))
    });
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    Ok(Json(state.feed.changes_after(&state.store, query.since, wait).await?))
}

#[derive(Deserialize)]
struct UsageUpload {
    node: String,
    boot_id: String,
    sequence: u64,
    records: Vec<UsageRecord>,
}

/// One chunk of a gateway's usage, counted once per `(node, boot_id, sequence)`.
/// Bounded by `MAX_UPLOAD_BYTES` and `MAX_UPLOAD_RECORDS` (see `usage::upload`).
async fn sync_usage(
    State(state): State<Arc<ApiState>>,
    _client: SyncClient,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let body = read_upload(&headers, body).await?;
    let upload: UsageUpload = serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", e))?;
    drop(body);
    if upload.records.len() > MAX_UPLOAD_RECORDS {
        return Err(ApiError::too_large(format!(
            "a usage upload holds at most {MAX_UPLOAD_RECORDS} records, this one has {}: send them in chunks, \
             each with its own sequence",
            upload.records.len()
        )));
    }
    let fresh = state.store.ingest_usage(&upload.node, &upload.boot_id, upload.sequence, &upload.records).await?;
    Ok(Json(json!({"accepted": true, "duplicate": !fresh})))
}

/// The upload's body, refused as soon as it is known to exceed `MAX_UPLOAD_BYTES`
/// (by its `Content-Length`, or while it streams in), never cut short.
async fn read_upload(headers: &HeaderMap, body: axum::body::Body) -> ApiResult<Vec<u8>> {
    use futures_util::StreamExt as _;
    let too_large =
        || ApiError::too_large(format!("an upload is at most {MAX_UPLOAD_BYTES} bytes: send it in smaller chunks"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES) {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(declared.unwrap_or(0));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid("body", format!("reading the upload failed: {e}")))?;
        if out.len() + chunk.len() > MAX_UPLOAD_BYTES {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Allowed requests per key in the current UTC day and month, counted from every
/// gateway's uploads, so gateways enforce quotas on the whole fleet's usage and a
/// restarted gateway does not start its quotas afresh.
async fn sync_quota_usage(State(state): State<Arc<ApiState>>, _client: SyncClient) -> ApiResult<Json<Value>> {
    let now = OffsetDateTime::now_utc();
    let used = super::quota::used_in_current_periods(&state.store, now).await?;
    let at = now.format(&Rfc3339).unwrap_or_default();
    Ok(Json(json!({"at": at, "by_day": used.by_day, "by_month": used.by_month})))
}

/// One exchange of a gateway's fleet limits (`fleet_limits: { engine: control_plane }`),
/// applied to the store in one transaction.
async fn sync_fleet(
    State(state): State<Arc<ApiState>>,
    _client: SyncClient,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<FleetAnswers>> {
    use std::sync::atomic::Ordering;
    let body = read_upload(&headers, body).await?;
    let exchange: FleetExchange = serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", e))?;
    if exchange.ops.len() > OPS_PER_EXCHANGE {
        return Err(ApiError::too_large(format!(
            "a fleet exchange holds at most {OPS_PER_EXCHANGE} operations, this one has {}",
            exchange.ops.len()
        )));
    }
    let answers = state.store.fleet_exchange(&exchange.ops).await?;
    let now = OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    let swept = state.fleet_swept_at.load(Ordering::Relaxed);
    if now >= swept + FLEET_SWEEP_EVERY_SECS
        && state.fleet_swept_at.compare_exchange(swept, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        let store = Arc::clone(&state.store);
        tokio::spawn(async move {
            if let Err(e) = store.sweep_fleet_counters().await {
                tracing::warn!(error = %e, "cannot sweep expired fleet counters");
            }
        });
    }
    Ok(Json(FleetAnswers { answers }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn refused(result: ApiResult<Vec<u8>>) -> Value {
        let Err(error) = result else { panic!("the upload should be refused") };
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "payload_too_large");
        json
    }

    #[tokio::test]
    async fn an_upload_over_the_byte_limit_is_refused_whole_never_cut() {
        let at_limit = vec![b' '; MAX_UPLOAD_BYTES];
        let read = read_upload(&HeaderMap::new(), axum::body::Body::from(at_limit)).await.unwrap();
        assert_eq!(read.len(), MAX_UPLOAD_BYTES);

        // Streamed without a length, in pieces: refused once the total passes the limit.
        let pieces = futures_util::stream::iter(
            (0..17).map(|_| Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b' '; 1024 * 1024]))),
        );
        let json = refused(read_upload(&HeaderMap::new(), axum::body::Body::from_stream(pieces)).await).await;
        assert!(json["error"]["message"].as_str().unwrap().contains(&MAX_UPLOAD_BYTES.to_string()), "{json}");

        // A declared length over the limit is refused before any byte is read.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(MAX_UPLOAD_BYTES + 1));
        refused(read_upload(&headers, axum::body::Body::empty()).await).await;
    }

    #[tokio::test]
    async fn api_errors_are_the_contract_shape_with_client_text_escaped() {
        let message = "bad \"name\" \\ here\n".to_string();
        let error = ApiError { status: StatusCode::UNAUTHORIZED, code: "unauthorized", message: message.clone() };
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let headers = response.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(headers[header::WWW_AUTHENTICATE], r#"Bearer realm="keygate""#);
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "unauthorized");
        assert_eq!(json["error"]["message"], message.as_str());
        assert_eq!(json["error"]["request_id"], headers["x-request-id"].to_str().unwrap());
    }
}
