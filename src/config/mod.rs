//! The config file (CONTRACT §3): parse, then validate, then build.
//!
//! 1. The text is parsed once into a `serde_norway::Value`; a YAML syntax error
//!    is the only error that stops everything, and it carries the parser's
//!    line/column.
//! 2. `${env:NAME}` is expanded in every string value of that tree (`env.rs`).
//! 3. The tree is deserialized into the `raw` structs, which mirror the file and
//!    deny unknown fields. Each section, list element and map entry is a
//!    separate deserialization (`raw::Parsed`), so one bad element does not hide
//!    the errors of the others.
//! 4. `validate.rs` turns whatever parsed into the typed [`Config`], collecting
//!    every problem with its field path. Positions come from a second walk of
//!    the text (`position.rs`); an error whose exact node has none points at its
//!    nearest ancestor.
//!
//! Relative file paths (TLS files, keys file, sinks) are relative to the
//! working directory, as in the contract's example (`file: config/keys.yaml`).
//!
//! Reuse by the keys file and the admin API: deserialize [`raw::RawRateLimit`] /
//! [`raw::RawQuota`] and call their `validate(path)`, which applies the rules of
//! `plans` and returns every (path, message) pair. [`RateLimitConfig`] and
//! [`QuotaConfig`] implement `Deserialize` themselves (same shape, unknown
//! fields refused) for reading stored limits back: that accepts what earlier
//! versions accepted, which the limiters clamp to what they can enforce. Both
//! `Serialize` with durations written as `1s`.

mod cidr;
mod duration;
mod enforceable;
mod env;
pub(crate) mod position;
pub mod raw;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use cidr::parse_cidr;
pub use duration::{format_duration, parse_duration, DurationError};
pub use enforceable::{check_quota, check_rate_limit, Unenforceable, MAX_QUOTA_REQUESTS, MAX_RATE_WINDOW};
pub use env::EnvLookup;

/// How long SIGTERM waits for requests in flight unless `shutdown_timeout` says otherwise.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Longest `request_header_timeout` / `idle_timeout`: a day. Longer ones could
/// not be told apart from "never" and would hold sockets and memory as long.
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Reads, parses, interpolates and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => from_str(&text, path),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            path: String::new(),
            line: None,
            column: None,
            message: format!("cannot read the config file: {e}"),
        }])),
    }
}

/// Like [`load`], for text already in memory; `file` only labels errors.
pub fn from_str(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
    from_str_with_env(text, file, &|name| std::env::var(name).ok())
}

/// Like [`from_str`], with `${env:NAME}` resolved through `env` instead of the
/// process environment (tests need not mutate process-global state).
pub fn from_str_with_env(text: &str, file: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    validate::run(text, file, env)
}

/// Every problem found in a config file; never empty. `Display` writes one
/// error per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// One problem: the file, the field path (`routes[1].match.methods[0]`, empty
/// for the file as a whole), and the 1-based line/column where known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration the rest of keygate runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mode: Mode,
    pub node_id: String,
    pub threads: usize,
    /// On SIGTERM, how long requests in flight may take to finish (keygate's
    /// own field, default 30s; Pingora's default would be five minutes).
    pub shutdown_timeout: Duration,
    pub listeners: Vec<ListenerConfig>,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub keys: KeysConfig,
    pub client_ip: ClientIpConfig,
    pub key_locations: Vec<KeyLocation>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// In file order: the first match wins.
    pub routes: Vec<RouteConfig>,
    pub plans: BTreeMap<String, PlanConfig>,
    pub default_plan: Option<String>,
    pub usage: UsageConfig,
    pub access_log: AccessLogConfig,
    pub http: HttpConfig,
    /// Rate limits and quotas shared by every gateway; None: each process on its own.
    pub fleet_limits: Option<FleetLimitsConfig>,
    /// Sent by the node that holds the store (standalone, control plane).
    pub webhooks: Vec<WebhookConfig>,
}

/// Every event a webhook may subscribe to.
pub const WEBHOOK_EVENTS: &[&str] = &[
    "key.created",
    "key.updated",
    "key.disabled",
    "key.revoked",
    "key.rotated",
    "key.deleted",
    "keys.imported",
    "key.expiring",
    "quota.threshold",
];

/// `webhooks[].expiring_lead` when absent.
pub const DEFAULT_EXPIRING_LEAD: Duration = Duration::from_secs(7 * 86_400);

/// One `webhooks:` entry.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub url: String,
    /// Signs every delivery (Standard Webhooks: `whsec_` and base64, or any text).
    pub secret: String,
    /// The events sent; `None`: every one.
    pub events: Option<BTreeSet<String>>,
    /// How long before a key's `expires_at` its `key.expiring` is sent.
    pub expiring_lead: Duration,
}

impl WebhookConfig {
    pub fn wants(&self, event: &str) -> bool {
        self.events.as_ref().is_none_or(|events| events.contains(event))
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("expiring_lead", &self.expiring_lead)
            .finish_non_exhaustive()
    }
}

/// Shortest and longest `fleet_limits.sync_interval`: often enough that the fleet
/// overshoots a limit by little, seldom enough that the engine's load stays small.
pub const MIN_FLEET_SYNC_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_FLEET_SYNC_INTERVAL: Duration = Duration::from_millis(250);
pub const DEFAULT_FLEET_SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// The `fleet_limits:` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetLimitsConfig {
    pub engine: FleetEngine,
    pub sync_interval: Duration,
}

/// Where gateways reconcile their consumption.
#[derive(Clone, PartialEq, Eq)]
pub enum FleetEngine {
    /// Redis or Valkey at `url` (`redis://`, `unix://`).
    Redis { url: String },
    /// The control plane of `keys.control_plane`, which keeps the counts in its store.
    ControlPlane,
}

impl FleetEngine {
    /// For logs: the engine and its address without credentials.
    pub fn shown(&self) -> String {
        match self {
            FleetEngine::Redis { url } => format!("redis {}", without_credentials(url)),
            FleetEngine::ControlPlane => "control_plane".to_owned(),
        }
    }
}

impl fmt::Debug for FleetEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Standalone,
    Gateway,
    ControlPlane,
}

impl Mode {
    /// The name the config file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Gateway => "gateway",
            Mode::ControlPlane => "control-plane",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What every client connection meets (the `http:` block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpConfig {
    /// From a connection's first byte (for its first request, from the accept)
    /// until the whole request head has arrived.
    pub request_header_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Open client connections per process; past it new ones are closed at once.
    pub max_connections: usize,
    pub escaped_slashes: EscapedSlashes,
    pub underscore_headers: UnderscoreHeaders,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            request_header_timeout: DEFAULT_REQUEST_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            escaped_slashes: EscapedSlashes::Reject,
            underscore_headers: UnderscoreHeaders::Drop,
        }
    }
}

/// `%2F`, `%5C` and `\` in a path: upstreams disagree on whether they separate segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// `400 bad_request`.
    Reject,
    /// Matched and forwarded as sent.
    Pass,
}

/// Header names with `_`, which CGI-style upstreams read as if spelled with `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderscoreHeaders {
    /// Removed before the request goes upstream.
    Drop,
    /// `400 bad_request`.
    Reject,
    /// Forwarded, except spellings of the headers keygate itself sets.
    Pass,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
}

/// PEM files, checked at load to exist and to hold a certificate / a private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub address: SocketAddr,
    pub tokens: Vec<TokenConfig>,
    pub sync_tokens: Vec<TokenConfig>,
}

/// A bearer token, kept only as its SHA-256 digest.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenConfig {
    pub name: String,
    pub sha256: [u8; 32],
    pub role: TokenRole,
}

/// What an admin token may do. Sync tokens are always `Admin` here: their role is
/// the sync feed's, and `role:` is refused on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenRole {
    /// Every admin API call.
    #[default]
    Admin,
    /// Lists, records, usage, audit and events; a change gets 403 `forbidden`.
    Read,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Admin => "admin",
            TokenRole::Read => "read",
        }
    }
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("sha256", &hex::encode(self.sha256))
            .field("role", &self.role)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `sqlite://...`, `sqlite::memory:`, `postgres://...` or `postgresql://...`.
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysConfig {
    pub source: KeySource,
    pub control_plane: Option<ControlPlaneClientConfig>,
    pub file: Option<PathBuf>,
    pub cache_file: Option<PathBuf>,
    /// Zero: serve the last-known-good snapshot forever.
    pub max_staleness: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Store,
    ControlPlane,
    File,
}

/// How a gateway reaches its control plane.
#[derive(Clone, PartialEq, Eq)]
pub struct ControlPlaneClientConfig {
    /// `http://` or `https://`.
    pub url: String,
    pub token: String,
}

impl fmt::Debug for ControlPlaneClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneClientConfig").field("url", &self.url).field("token", &"<redacted>").finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientIpConfig {
    /// Bare addresses are stored as /32 or /128 networks.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    /// `name` is lowercase. With a `scheme`, the value must read `<scheme> <key>`
    /// (the scheme compared case-insensitively, as HTTP auth schemes are).
    Header {
        name: http::HeaderName,
        scheme: Option<String>,
    },
    Query {
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `host:port`; hosts may be names, resolved elsewhere. IPv6 as `[::1]:80`.
    pub targets: Vec<String>,
    pub tls: Option<UpstreamTlsConfig>,
    pub health_check: Option<HealthCheckConfig>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    pub sni: Option<String>,
    /// A PEM file of CA certificates, checked at load.
    pub ca: Option<PathBuf>,
    pub verify: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub name: String,
    pub matcher: RouteMatch,
    pub upstream: String,
    pub auth: RouteAuth,
    pub scopes: Vec<String>,
    /// Lowercase names, file order; values are marked sensitive so that
    /// `Debug` does not print them (they are usually credentials).
    pub set_headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    pub path_prefix: String,
    /// Empty: any method.
    pub methods: Vec<http::Method>,
    /// Lowercase, without a port.
    pub host: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteAuth {
    #[default]
    Key,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanConfig {
    pub rate_limit: Option<RateLimitConfig>,
    pub quota: Option<QuotaConfig>,
}

/// `{ requests: 10, per: 1s, burst: 20 }`: `requests` per `per`, with bursts of
/// up to `burst` (when given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub requests: u32,
    pub per: Duration,
    pub burst: Option<u32>,
    pub by: LimitScope,
}

/// `{ requests: 10000, per: month }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaConfig {
    pub requests: u64,
    pub per: QuotaPeriod,
    pub by: LimitScope,
}

/// Whose budget a limit counts (`by:`): each key's own, or one shared by every
/// key of the same owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    #[default]
    Key,
    Owner,
}

impl LimitScope {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitScope::Key => "key",
            LimitScope::Owner => "owner",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Day,
    Month,
}

impl QuotaPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }
}

/// Reads limits back from a store, a sync feed or a cache file, with the checks
/// of every earlier version; new limits enter through `validate`.
impl<'de> Deserialize<'de> for RateLimitConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        raw::RawRateLimit::deserialize(d)?
            .validate_form("")
            .map_err(|errors| serde::de::Error::custom(join_messages(&errors)))
    }
}

/// Reads quotas back, like `RateLimitConfig`'s `Deserialize`.
impl<'de> Deserialize<'de> for QuotaConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        raw::RawQuota::deserialize(d)?
            .validate_form("")
            .map_err(|errors| serde::de::Error::custom(join_messages(&errors)))
    }
}

fn join_messages(errors: &[(String, String)]) -> String {
    errors.iter().map(|(path, message)| format!("{path}: {message}")).collect::<Vec<_>>().join("; ")
}

impl Serialize for RateLimitConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("RateLimitConfig", 4)?;
        st.serialize_field("requests", &self.requests)?;
        st.serialize_field("per", &format_duration(self.per))?;
        if let Some(burst) = self.burst {
            st.serialize_field("burst", &burst)?;
        } else {
            st.skip_field("burst")?;
        }
        serialize_scope(&mut st, self.by)?;
        st.end()
    }
}

impl Serialize for QuotaConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("QuotaConfig", 3)?;
        st.serialize_field("requests", &self.requests)?;
        st.serialize_field("per", &self.per)?;
        serialize_scope(&mut st, self.by)?;
        st.end()
    }
}

/// `by` is written only when it is not the default, so limits stored before it
/// existed and limits without it read and compare the same.
fn serialize_scope<S: serde::ser::SerializeStruct>(st: &mut S, by: LimitScope) -> Result<(), S::Error> {
    match by {
        LimitScope::Key => st.skip_field("by"),
        LimitScope::Owner => st.serialize_field("by", &by),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConfig {
    pub flush_interval: Duration,
    /// Where usage no sink has acknowledged yet is kept across restarts.
    pub spool: Option<PathBuf>,
    pub sinks: Vec<SinkConfig>,
    /// Used only by nodes with a store.
    pub retention: UsageRetention,
}

/// How long the store keeps usage at each granularity (`usage.retention`): minute
/// buckets older than `minute` are rolled up into hours, hours older than `hour`
/// into days, and days older than `day` are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRetention {
    pub minute: Duration,
    pub hour: Duration,
    pub day: Duration,
}

impl Default for UsageRetention {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        UsageRetention {
            minute: Duration::from_secs(7 * DAY),
            hour: Duration::from_secs(90 * DAY),
            day: Duration::from_secs(730 * DAY),
        }
    }
}

impl UsageRetention {
    /// Rollups work on whole hours: minutes younger than this are never rolled up.
    pub const MIN_MINUTE: Duration = Duration::from_secs(3600);
    /// Monthly quotas count usage from the first of the month, which must still be stored.
    pub const MIN_DAY: Duration = Duration::from_secs(31 * 86_400);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkConfig {
    Store,
    ControlPlane,
    File { path: PathBuf },
    Http(HttpSinkConfig),
    Nats(NatsSinkConfig),
}

/// `{ type: http, url, format: cloudevents }`: usage events POSTed in batches.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpSinkConfig {
    pub url: String,
    pub format: EventFormat,
    /// Events per request, at most.
    pub batch_size: usize,
    /// Signs each request (Standard Webhooks, like `webhooks`).
    pub secret: Option<String>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFormat {
    CloudEvents,
}

/// `{ type: nats, url, subject }`: usage events published to JetStream.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsSinkConfig {
    pub url: String,
    pub subject: String,
}

// A sink's `Debug` text is also its identity across config reloads (an unchanged
// sink keeps its queue). URLs may carry credentials and headers and the secret are
// credentials: they appear only as a fingerprint, which still changes with them.
impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<&[u8]> = vec![self.url.as_bytes(), self.secret.as_deref().unwrap_or_default().as_bytes()];
        for (name, value) in &self.headers {
            parts.extend([name.as_str().as_bytes(), value.as_bytes()]);
        }
        f.debug_struct("HttpSinkConfig")
            .field("url", &without_credentials(&self.url))
            .field("format", &self.format)
            .field("batch_size", &self.batch_size)
            .field("headers", &self.headers.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>())
            .field("fingerprint", &fingerprint(&parts))
            .finish()
    }
}

impl fmt::Debug for NatsSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSinkConfig")
            .field("url", &without_credentials(&self.url))
            .field("subject", &self.subject)
            .field("fingerprint", &fingerprint(&[self.url.as_bytes()]))
            .finish()
    }
}

/// `scheme://host/path`: no user info, no query.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if path.is_empty() {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}/{path}")
    }
}

fn fingerprint(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..8])
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLogConfig {
    Off,
    #[default]
    Stdout,
    File(PathBuf),
}
