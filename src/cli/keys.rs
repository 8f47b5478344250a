//! `keygate keys …`: a client of the admin API (CONTRACT §6).
//!
//! Everything that can be checked without the server (rate-limit and quota
//! syntax, durations, timestamps, CIDRs) is checked by clap, so a typo fails
//! with exit 2 before any request is sent. The server stays the authority on
//! everything else; its errors are mapped to one readable line (exit 1).

use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode, Url};
use serde::ser::SerializeMap;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::import::ImportArgs;
use super::table::{clean, Table};
use crate::config::parse_duration;
use crate::http_client;

const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9090";
/// Short, so a wrong address fails fast instead of hanging a script.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a non-JSON error body is worth showing.
const MAX_BODY_EXCERPT: usize = 200;

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(flatten)]
    global: GlobalOpts,
    // Boxed: the subcommands are large, and `KeysArgs` sits in the top-level
    // command enum beside small variants (clippy::large_enum_variant).
    #[command(subcommand)]
    command: Box<KeysCommand>,
}

/// Options accepted before or after the subcommand.
#[derive(Args)]
pub(super) struct GlobalOpts {
    /// Base URL of the admin API.
    #[arg(long, global = true, env = "KEYGATE_ADMIN_URL", default_value = DEFAULT_ADMIN_URL,
          value_name = "URL", value_parser = parse_admin_url)]
    admin_url: Url,
    /// Admin bearer token (sent as `Authorization: Bearer TOKEN`).
    // `hide_env_values`: `--help` must not echo the token from the environment.
    #[arg(long, global = true, env = "KEYGATE_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Print the API's JSON response instead of a table.
    #[arg(long, global = true)]
    pub(super) json: bool,
}

/// Written by hand so that no `{:?}` anywhere can leak the token.
impl fmt::Debug for GlobalOpts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GlobalOpts")
            .field("admin_url", &display_url(&self.admin_url))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("json", &self.json)
            .finish()
    }
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Create a key; the raw key is printed once and never again.
    Create(CreateArgs),
    /// List keys, a page at a time (or all with --all).
    List(ListArgs),
    /// Show one key.
    Show(IdArg),
    /// Change some fields of a key; fields not given are left as they are.
    Update(UpdateArgs),
    /// Revoke a key for good.
    Revoke(IdArg),
    /// Issue a replacement key; the old one keeps working for the grace period.
    Rotate(RotateArgs),
    /// Delete a key.
    Delete(IdArg),
    /// Show a key's usage over time.
    Usage(UsageArgs),
    /// Import existing keys from an NDJSON file (one record a line, with "hash" instead of a raw key).
    ///
    /// Lines that fail are listed by number and the others imported; the exit code is
    /// 1 when any line failed. Running the same file again changes nothing.
    Import(ImportArgs),
}

#[derive(Args, Debug)]
struct IdArg {
    /// The key id (key_…).
    #[arg(value_parser = parse_id)]
    id: String,
}

/// Fields that `create` and `update` share.
#[derive(Args, Debug)]
struct KeyFields {
    /// Who the key belongs to.
    #[arg(long)]
    owner: Option<String>,
    /// The plan whose limits apply (a key's own limits override them).
    #[arg(long)]
    plan: Option<String>,
    /// A scope the key holds; repeat or separate with commas (wildcards: orders:*, *).
    #[arg(long = "scope", value_name = "SCOPE", value_delimiter = ',', value_parser = parse_word)]
    scopes: Vec<String>,
    /// An allowed client network (CIDR or a single address); repeat or separate with commas.
    #[arg(long = "ip", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    ips: Vec<String>,
    /// The key's own rate limit, REQUESTS/DURATION (10/1s, 1000/1m).
    #[arg(long, value_name = "REQUESTS/DURATION", value_parser = parse_rate_limit)]
    rate_limit: Option<RateLimitArg>,
    /// Burst size for --rate-limit.
    #[arg(long, value_name = "N", requires = "rate_limit", value_parser = clap::value_parser!(u32).range(1..))]
    burst: Option<u32>,
    /// Whose budget --rate-limit counts: the key's own, or one shared by every key of its owner.
    #[arg(long, value_name = "key|owner", requires = "rate_limit", value_parser = ["key", "owner"])]
    rate_limit_by: Option<String>,
    /// The key's own quota, REQUESTS/day or REQUESTS/month.
    #[arg(long, value_name = "REQUESTS/PERIOD", value_parser = parse_quota)]
    quota: Option<QuotaArg>,
    /// Whose budget --quota counts: the key's own, or one shared by every key of its owner.
    #[arg(long, value_name = "key|owner", requires = "quota", value_parser = ["key", "owner"])]
    quota_by: Option<String>,
    /// When the key stops working (RFC 3339, e.g. 2026-01-31T00:00:00Z).
    #[arg(long, value_name = "RFC3339", conflicts_with = "ttl", value_parser = parse_timestamp)]
    expires_at: Option<String>,
    /// Lifetime from now (30d, 12h); the server turns it into expires_at.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    ttl: Option<String>,
    /// A metadata entry KEY=VALUE; repeat for more (a repeated KEY keeps the last value).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_metadata)]
    metadata: Vec<(String, String)>,
    /// A tag; repeat or separate with commas.
    #[arg(long = "tag", value_name = "TAG", value_delimiter = ',', value_parser = parse_word)]
    tags: Vec<String>,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// A name for people.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    fields: KeyFields,
    /// Key prefix (default on the server: kg_live).
    #[arg(long, value_parser = parse_prefix)]
    prefix: Option<String>,
}

#[derive(Args, Debug)]
struct UpdateArgs {
    #[arg(value_parser = parse_id)]
    id: String,
    /// A new name.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    fields: KeyFields,
    /// Enable or disable the key (use `revoke` to revoke it).
    #[arg(long, value_enum)]
    status: Option<UpdateStatus>,
    /// Remove the owner.
    #[arg(long, conflicts_with = "owner")]
    clear_owner: bool,
    /// Remove the plan.
    #[arg(long, conflicts_with = "plan")]
    clear_plan: bool,
    /// Remove every scope.
    #[arg(long, conflicts_with = "scopes")]
    clear_scopes: bool,
    /// Allow every client address again.
    #[arg(long, conflicts_with = "ips")]
    clear_ip_allowlist: bool,
    /// Drop the key's own rate limit (its plan's applies).
    #[arg(long, conflicts_with_all = ["rate_limit", "burst"])]
    clear_rate_limit: bool,
    /// Drop the key's own quota (its plan's applies).
    #[arg(long, conflicts_with = "quota")]
    clear_quota: bool,
    /// Make the key never expire.
    #[arg(long, conflicts_with_all = ["expires_at", "ttl"])]
    clear_expires_at: bool,
    /// Remove all metadata.
    #[arg(long, conflicts_with = "metadata")]
    clear_metadata: bool,
    /// Remove every tag.
    #[arg(long, conflicts_with = "tags")]
    clear_tags: bool,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[arg(long)]
    owner: Option<String>,
    #[arg(long, value_enum)]
    status: Option<ListStatus>,
    #[arg(long)]
    plan: Option<String>,
    #[arg(long)]
    tag: Option<String>,
    /// Free-text search (name, owner, id…; the server decides).
    #[arg(long = "q", value_name = "TEXT")]
    q: Option<String>,
    /// Keys per page.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    /// Start from this page cursor (from a previous list).
    #[arg(long, value_name = "CURSOR")]
    cursor: Option<String>,
    /// Follow next_cursor until the last page.
    #[arg(long)]
    all: bool,
}

#[derive(Args, Debug)]
struct RotateArgs {
    #[arg(value_parser = parse_id)]
    id: String,
    /// How long the old key keeps working (24h, 30m, 0s); the server's default when omitted.
    #[arg(long, value_name = "DURATION", value_parser = parse_any_duration)]
    grace_period: Option<String>,
}

#[derive(Args, Debug)]
struct UsageArgs {
    #[arg(value_parser = parse_id)]
    id: String,
    /// Start of the period (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    from: Option<String>,
    /// End of the period (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    to: Option<String>,
    #[arg(long, value_enum)]
    granularity: Option<Granularity>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum UpdateStatus {
    Active,
    Disabled,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ListStatus {
    Active,
    Disabled,
    Revoked,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Granularity {
    Minute,
    Hour,
    Day,
}

impl UpdateStatus {
    fn as_str(self) -> &'static str {
        match self {
            UpdateStatus::Active => "active",
            UpdateStatus::Disabled => "disabled",
        }
    }
}

impl ListStatus {
    fn as_str(self) -> &'static str {
        match self {
            ListStatus::Active => "active",
            ListStatus::Disabled => "disabled",
            ListStatus::Revoked => "revoked",
        }
    }
}

impl Granularity {
    fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

/// `--rate-limit 10/1s`: `per` is sent as written once it has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RateLimitArg {
    requests: u32,
    per: String,
}

/// `--quota 10000/month`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QuotaArg {
    requests: u64,
    per: &'static str,
}

// ---------------------------------------------------------------------------
// Value parsers: each error is the whole explanation clap prints (exit 2).

fn parse_admin_url(s: &str) -> Result<Url, String> {
    let mut url = Url::parse(s.trim()).map_err(|e| format!("{e}; expected a URL like {DEFAULT_ADMIN_URL}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("expected an http:// or https:// URL with a host, like {DEFAULT_ADMIN_URL}"));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

fn parse_id(s: &str) -> Result<String, String> {
    let id = s.trim();
    if id.is_empty() {
        return Err("the key id is empty".to_owned());
    }
    Ok(id.to_owned())
}

/// Scopes and tags: one word each, since gateways pass scopes on space-separated.
fn parse_word(s: &str) -> Result<String, String> {
    let word = s.trim();
    if word.is_empty() {
        return Err("it is empty".to_owned());
    }
    if word.contains(char::is_whitespace) {
        return Err("it must not contain spaces".to_owned());
    }
    Ok(word.to_owned())
}

/// A CIDR as written, or a bare address made into a /32 or /128.
fn parse_cidr(s: &str) -> Result<String, String> {
    let text = s.trim();
    let net = crate::index::parse_cidr(text)
        .ok_or_else(|| "expected a CIDR such as 10.0.0.0/8 or 2001:db8::/32, or a single address".to_owned())?;
    // A CIDR goes to the server as the operator wrote it; only a bare address is rewritten.
    Ok(if text.contains('/') { text.to_owned() } else { net.to_string() })
}

fn parse_rate_limit(s: &str) -> Result<RateLimitArg, String> {
    const FORM: &str = "expected REQUESTS/DURATION, e.g. 10/1s or 1000/1m";
    let (requests, per) = s.trim().split_once('/').ok_or(FORM)?;
    let requests: u32 =
        requests.trim().parse().map_err(|_| format!("{:?} is not a whole number; {FORM}", requests.trim()))?;
    if requests == 0 {
        return Err(format!("the number of requests must be at least 1; {FORM}"));
    }
    let mut per = per.trim().to_owned();
    // `10/s` reads naturally; it means `10/1s`.
    if matches!(per.as_str(), "ms" | "s" | "m" | "h" | "d") {
        per.insert(0, '1');
    }
    let duration = parse_duration(&per).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err(format!("the duration must be longer than 0; {FORM}"));
    }
    Ok(RateLimitArg { requests, per })
}

fn parse_quota(s: &str) -> Result<QuotaArg, String> {
    const FORM: &str = "expected REQUESTS/day or REQUESTS/month, e.g. 10000/month";
    let (requests, per) = s.trim().split_once('/').ok_or(FORM)?;
    let requests: u64 =
        requests.trim().parse().map_err(|_| format!("{:?} is not a whole number; {FORM}", requests.trim()))?;
    if requests == 0 {
        return Err(format!("the number of requests must be at least 1; {FORM}"));
    }
    let per = match per.trim() {
        "day" => "day",
        "month" => "month",
        other => return Err(format!("unknown period {other:?}; {FORM}")),
    };
    Ok(QuotaArg { requests, per })
}

fn parse_timestamp(s: &str) -> Result<String, String> {
    let text = s.trim();
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{e}; expected an RFC 3339 time such as 2026-01-31T00:00:00Z"))?;
    Ok(text.to_owned())
}

fn parse_any_duration(s: &str) -> Result<String, String> {
    parse_duration(s).map_err(|e| e.to_string())?;
    Ok(s.trim().to_owned())
}

fn parse_positive_duration(s: &str) -> Result<String, String> {
    if parse_duration(s).map_err(|e| e.to_string())?.is_zero() {
        return Err("it must be longer than 0".to_owned());
    }
    Ok(s.trim().to_owned())
}

fn parse_metadata(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    let key = key.trim();
    if key.is_empty() {
        return Err("the metadata key is empty; expected KEY=VALUE".to_owned());
    }
    Ok((key.to_owned(), value.to_owned()))
}

fn parse_prefix(s: &str) -> Result<String, String> {
    let prefix = s.trim();
    if !crate::key::valid_prefix(prefix) {
        return Err(format!(
            "a prefix is 1 to {} letters, digits or underscores, not starting or ending with '_'",
            crate::key::MAX_PREFIX_LEN
        ));
    }
    Ok(prefix.to_owned())
}

// ---------------------------------------------------------------------------
// Request bodies.

impl KeyFields {
    /// Adds the fields that were given; absent ones stay out of the body so
    /// that PATCH leaves them alone.
    fn write_into(&self, body: &mut Map<String, Value>) {
        if let Some(owner) = &self.owner {
            body.insert("owner".into(), json!(owner));
        }
        if let Some(plan) = &self.plan {
            body.insert("plan".into(), json!(plan));
        }
        if !self.scopes.is_empty() {
            body.insert("scopes".into(), json!(self.scopes));
        }
        if !self.ips.is_empty() {
            body.insert("ip_allowlist".into(), json!(self.ips));
        }
        if let Some(rate) = &self.rate_limit {
            let mut limit = json!({ "requests": rate.requests, "per": rate.per });
            if let Some(object) = limit.as_object_mut() {
                if let Some(burst) = self.burst {
                    object.insert("burst".into(), json!(burst));
                }
                if let Some(by) = &self.rate_limit_by {
                    object.insert("by".into(), json!(by));
                }
            }
            body.insert("rate_limit".into(), limit);
        }
        if let Some(quota) = &self.quota {
            let mut limit = json!({ "requests": quota.requests, "per": quota.per });
            if let (Some(by), Some(object)) = (&self.quota_by, limit.as_object_mut()) {
                object.insert("by".into(), json!(by));
            }
            body.insert("quota".into(), limit);
        }
        if let Some(at) = &self.expires_at {
            body.insert("expires_at".into(), json!(at));
        }
        if let Some(ttl) = &self.ttl {
            body.insert("ttl".into(), json!(ttl));
        }
        if !self.metadata.is_empty() {
            let entries: Map<String, Value> = self.metadata.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            body.insert("metadata".into(), Value::Object(entries));
        }
        if !self.tags.is_empty() {
            body.insert("tags".into(), json!(self.tags));
        }
    }
}

fn create_body(args: &CreateArgs) -> Value {
    let mut body = Map::new();
    body.insert("name".into(), json!(args.name));
    args.fields.write_into(&mut body);
    if let Some(prefix) = &args.prefix {
        body.insert("prefix".into(), json!(prefix));
    }
    Value::Object(body)
}

fn update_body(args: &UpdateArgs) -> Value {
    let mut body = Map::new();
    if let Some(name) = &args.name {
        body.insert("name".into(), json!(name));
    }
    args.fields.write_into(&mut body);
    if let Some(status) = args.status {
        body.insert("status".into(), json!(status.as_str()));
    }
    // Nullable fields are cleared with null; collections with an empty value,
    // which says "none" without relying on how the server reads null there.
    let clears: [(bool, &str, Value); 9] = [
        (args.clear_owner, "owner", Value::Null),
        (args.clear_plan, "plan", Value::Null),
        (args.clear_ip_allowlist, "ip_allowlist", Value::Null),
        (args.clear_rate_limit, "rate_limit", Value::Null),
        (args.clear_quota, "quota", Value::Null),
        (args.clear_expires_at, "expires_at", Value::Null),
        (args.clear_scopes, "scopes", json!([])),
        (args.clear_tags, "tags", json!([])),
        (args.clear_metadata, "metadata", json!({})),
    ];
    for (given, field, value) in clears {
        if given {
            body.insert(field.into(), value);
        }
    }
    Value::Object(body)
}

fn list_query(args: &ListArgs, cursor: Option<&str>) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    let mut add = |name, value: Option<String>| {
        if let Some(value) = value {
            query.push((name, value));
        }
    };
    add("owner", args.owner.clone());
    add("status", args.status.map(|s| s.as_str().to_owned()));
    add("plan", args.plan.clone());
    add("tag", args.tag.clone());
    add("q", args.q.clone());
    add("limit", args.limit.map(|n| n.to_string()));
    add("cursor", cursor.map(str::to_owned));
    query
}

fn usage_query(args: &UsageArgs) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if let Some(from) = &args.from {
        query.push(("from", from.clone()));
    }
    if let Some(to) = &args.to {
        query.push(("to", to.clone()));
    }
    if let Some(granularity) = args.granularity {
        query.push(("granularity", granularity.as_str().to_owned()));
    }
    query
}

// ---------------------------------------------------------------------------
// Errors.

#[derive(Debug, thiserror::Error)]
pub(super) enum KeysError {
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
struct ErrorBody {
    code: Option<String>,
    message: Option<String>,
    request_id: Option<String>,
}

fn parse_error_body(body: &str) -> ErrorBody {
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
fn describe_api_error(status: u16, body: &str, key_id: Option<&str>, token_given: bool) -> String {
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
pub(super) fn network_reason(error: &reqwest::Error) -> String {
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
pub(super) fn display_url(url: &Url) -> String {
    let mut url = url.clone();
    // Fails only for URLs without a host, which parse_admin_url refuses.
    let _ = url.set_password(None);
    url.as_str().trim_end_matches('/').to_owned()
}

// ---------------------------------------------------------------------------
// The HTTP client.

pub(super) struct Admin {
    http: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
}

/// A 2xx answer.
pub(super) struct Reply {
    pub(super) text: String,
    url: String,
}

impl Admin {
    fn new(global: &GlobalOpts) -> Result<Self, KeysError> {
        Self::with_total_timeout(global, Some(TOTAL_TIMEOUT))
    }

    /// `total: None` for calls that take as long as their upload (an import).
    pub(super) fn with_total_timeout(global: &GlobalOpts, total: Option<Duration>) -> Result<Self, KeysError> {
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
    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn call(
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
    pub(super) async fn post_stream(
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

    async fn send(&self, request: reqwest::RequestBuilder, url: Url, key_id: Option<&str>) -> Result<Reply, KeysError> {
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
    pub(super) fn bad(&self, reason: impl Into<String>) -> KeysError {
        KeysError::BadResponse { url: self.url.clone(), reason: reason.into() }
    }

    pub(super) fn value(&self) -> Result<Value, KeysError> {
        serde_json::from_str(&self.text).map_err(|e| self.bad(format!("the body is not JSON ({e})")))
    }

    pub(super) fn ordered(&self) -> Result<Json, KeysError> {
        serde_json::from_str(&self.text).map_err(|e| self.bad(format!("the body is not JSON ({e})")))
    }
}

/// A JSON value that keeps object keys in the order the API sent them, so
/// `--json` prints the body as returned (`serde_json::Value` sorts keys).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct JsonVisitor;

        impl<'de> serde::de::Visitor<'de> for JsonVisitor {
            type Value = Json;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
                serde::Deserialize::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::String(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::String(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Json>()? {
                    entries.push(entry);
                }
                Ok(Json::Object(entries))
            }
        }

        deserializer.deserialize_any(JsonVisitor)
    }
}

impl serde::Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(b) => serializer.serialize_bool(*b),
            Json::Number(n) => n.serialize(serializer),
            Json::String(s) => serializer.serialize_str(s),
            Json::Array(items) => serializer.collect_seq(items),
            Json::Object(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

pub(super) fn pretty(json: &Json) -> String {
    // Serializing an in-memory tree of strings and numbers cannot fail.
    let mut text = serde_json::to_string_pretty(json).unwrap_or_default();
    text.push('\n');
    text
}

// ---------------------------------------------------------------------------
// Running a command.

/// Runs `keygate keys …`: prints the output, or `error: …` on stderr and exits 1.
pub fn run(args: KeysArgs) -> ExitCode {
    if let Err(e) = check_command_line(&args) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    match execute(args) {
        Ok(output) => {
            // A key that could not be written out is lost to the user: say so.
            if let Err(e) = std::io::stdout().lock().write_all(output.as_bytes()) {
                eprintln!("error: cannot write the output: {e}");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let KeysError::Partial { output, .. } = &e {
                if let Err(write) = std::io::stdout().lock().write_all(output.as_bytes()) {
                    eprintln!("error: cannot write the output: {write}");
                }
            }
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// What clap cannot express briefly: `update` needs a change. (An ArgGroup of
/// all 21 flags works too, but its error message lists every one of them.)
fn check_command_line(args: &KeysArgs) -> Result<(), clap::Error> {
    if let KeysCommand::Update(update) = args.command.as_ref() {
        if update_body(update).as_object().is_some_and(Map::is_empty) {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::MissingRequiredArgument,
                "nothing to change: give at least one field, e.g. --name, --status disabled or --clear-owner\n\n\
                 For more information, try 'keygate keys update --help'.\n",
            ));
        }
    }
    Ok(())
}

/// Runs the command and returns what it would print: testable without stdout.
fn execute(args: KeysArgs) -> Result<String, KeysError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KeysError::Local(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(dispatch(args))
}

async fn dispatch(args: KeysArgs) -> Result<String, KeysError> {
    let admin = Admin::new(&args.global)?;
    let json = args.global.json;
    match *args.command {
        KeysCommand::Create(create) => {
            let reply = admin.call(Method::POST, &["v1", "keys"], &[], Some(&create_body(&create)), None).await?;
            if json {
                return Ok(pretty(&reply.ordered()?));
            }
            render_new_key(&reply, "Created")
        }
        KeysCommand::List(list) => list_keys(&admin, &list, json).await,
        KeysCommand::Show(IdArg { id }) => {
            let reply = admin.call(Method::GET, &["v1", "keys", &id], &[], None, Some(&id)).await?;
            if json {
                return Ok(pretty(&reply.ordered()?));
            }
            Ok(render_record(&reply.value()?))
        }
        KeysCommand::Update(update) => {
            let id = &update.id;
            let body = update_body(&update);
            let reply = admin.call(Method::PATCH, &["v1", "keys", id], &[], Some(&body), Some(id)).await?;
            if json {
                return Ok(pretty(&reply.ordered()?));
            }
            Ok(format!("updated {}\n{}", clean(id), render_record(&reply.value()?)))
        }
        KeysCommand::Revoke(IdArg { id }) => {
            let reply = admin.call(Method::POST, &["v1", "keys", &id, "revoke"], &[], None, Some(&id)).await?;
            if json {
                return Ok(pretty(&reply.ordered()?));
            }
            Ok(format!("revoked {}\n{}", clean(&id), render_record(&reply.value()?)))
        }
        KeysCommand::Rotate(RotateArgs { id, grace_period }) => {
            let body = match &grace_period {
                Some(grace) => json!({ "grace_period": grace }),
                None => json!({}),
            };
            let reply = admin.call(Method::POST, &["v1", "keys", &id, "rotate"], &[], Some(&body), Some(&id)).await?;
            if json {
                return Ok(pretty(&reply.ordered()?));
            }
            let heading = match &grace_period {
                Some(grace) => format!("Rotated {}; the old key keeps working for {}.", clean(&id), clean(grace)),
                None => format!("Rotated {}; the old key keeps working for the grace period.", clean(&id)),
            };
            render_new_key(&reply, &heading)
        }
        KeysCommand::Delete(IdArg { id }) => {
            let reply = admin.call(Method::DELETE, &["v1", "keys", &id], &[], None, Some(&id)).await?;
            if json {
                // 204 has no body; print one only if the server sent one.
                return if reply.text.trim().is_empty() { Ok(String::new()) } else { Ok(pretty(&reply.ordered()?)) };
            }
            Ok(format!("deleted {}\n", clean(&id)))
        }
        KeysCommand::Usage(usage) => {
            let id = &usage.id;
            let reply =
                admin.call(Method::GET, &["v1", "keys", id, "usage"], &usage_query(&usage), None, Some(id)).await?;
            if json {
                return Ok(pretty(&reply.ordered()?));
            }
            Ok(render_usage(&reply.value()?, id))
        }
        KeysCommand::Import(import) => {
            // No overall timeout: the upload takes as long as the file.
            let admin = Admin::with_total_timeout(&args.global, None)?;
            super::import::import(&admin, &import, json).await
        }
    }
}

async fn list_keys(admin: &Admin, args: &ListArgs, json: bool) -> Result<String, KeysError> {
    let mut cursor = args.cursor.clone();
    let mut seen = HashSet::new();
    let mut records: Vec<Value> = Vec::new();
    let mut ordered: Vec<Json> = Vec::new();
    let mut first_page: Option<Json> = None;
    loop {
        let reply = admin.call(Method::GET, &["v1", "keys"], &list_query(args, cursor.as_deref()), None, None).await?;
        let page = reply.value()?;
        let keys = page.get("keys").and_then(Value::as_array).ok_or_else(|| reply.bad("no \"keys\" list"))?;
        records.extend(keys.iter().cloned());
        let next = next_cursor(&page);
        if json {
            let page = reply.ordered()?;
            if !args.all {
                first_page = Some(page);
            } else if let Json::Object(entries) = page {
                for (name, value) in entries {
                    if let ("keys", Json::Array(items)) = (name.as_str(), value) {
                        ordered.extend(items);
                    }
                }
            }
        }
        match next {
            Some(next) if args.all => {
                // A server that hands out the same cursor again would loop forever.
                if !seen.insert(next.clone()) {
                    return Err(reply.bad(format!("next_cursor {next:?} came back twice")));
                }
                cursor = Some(next);
            }
            next => {
                if json {
                    // --all prints one body as if the server had sent every key at once.
                    let body = first_page.unwrap_or_else(|| {
                        Json::Object(vec![("keys".into(), Json::Array(ordered)), ("next_cursor".into(), Json::Null)])
                    });
                    return Ok(pretty(&body));
                }
                return Ok(render_key_list(&records, next.as_deref()));
            }
        }
    }
}

fn next_cursor(page: &Value) -> Option<String> {
    match page.get("next_cursor") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Human output.

fn render_key_list(records: &[Value], next: Option<&str>) -> String {
    let mut out = String::new();
    if records.is_empty() {
        out.push_str("no keys\n");
    } else {
        let mut table =
            Table::new(["ID", "NAME", "OWNER", "PLAN", "STATUS", "MASKED", "SCOPES", "EXPIRES", "LAST USED"]);
        for record in records {
            table.row([
                plain(record.get("id")),
                plain(record.get("name")),
                plain(record.get("owner")),
                plain(record.get("plan")),
                plain(record.get("status")),
                plain(record.get("masked")),
                joined(record.get("scopes"), ","),
                timestamp(record.get("expires_at")),
                timestamp(record.get("last_used_at")),
            ]);
        }
        out.push_str(&table.render());
    }
    if let Some(next) = next {
        out.push_str(&format!("\nmore keys: run again with --cursor {} (or use --all)\n", clean(next)));
    }
    out
}

/// The fields of a record in the order people read them; others follow.
const RECORD_FIELDS: [&str; 17] = [
    "id",
    "name",
    "owner",
    "plan",
    "status",
    "prefix",
    "masked",
    "scopes",
    "ip_allowlist",
    "rate_limit",
    "quota",
    "expires_at",
    "metadata",
    "tags",
    "created_at",
    "updated_at",
    "last_used_at",
];

/// `field: value` lines, values aligned.
fn render_record(record: &Value) -> String {
    let Some(fields) = record.as_object() else {
        return pretty_value(record);
    };
    let mut lines: Vec<(&str, String)> = Vec::new();
    for name in RECORD_FIELDS {
        if let Some(value) = fields.get(name) {
            lines.push((name, describe_field(name, value)));
        } else if matches!(name, "owner" | "plan" | "expires_at" | "last_used_at") {
            // Say "-" rather than leave people wondering whether it was printed.
            lines.push((name, "-".to_owned()));
        }
    }
    for (name, value) in fields {
        if !RECORD_FIELDS.contains(&name.as_str()) {
            lines.push((name, describe_field(name, value)));
        }
    }
    let width = lines.iter().map(|(name, _)| clean(name).chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (name, value) in lines {
        let label = format!("{}:", clean(name));
        out.push_str(&format!("{label:<w$} {value}\n", w = width + 1));
    }
    out
}

/// `, by owner` for a limit shared by the key's owner; nothing for the default.
fn shared_by(limit: &Map<String, Value>) -> String {
    match limit.get("by").and_then(Value::as_str) {
        Some(by) if by != "key" => format!(", by {by}"),
        _ => String::new(),
    }
}

fn describe_field(name: &str, value: &Value) -> String {
    match (name, value) {
        ("rate_limit", Value::Object(limit)) => {
            let mut text = format!("{}/{}", plain(limit.get("requests")), plain(limit.get("per")));
            if let Some(burst) = limit.get("burst").filter(|b| !b.is_null()) {
                text.push_str(&format!(", burst {}", plain(Some(burst))));
            }
            clean(&(text + &shared_by(limit)))
        }
        ("quota", Value::Object(quota)) => {
            clean(&(format!("{}/{}", plain(quota.get("requests")), plain(quota.get("per"))) + &shared_by(quota)))
        }
        (_, Value::Object(entries)) if entries.values().all(|v| !v.is_object() && !v.is_array()) => {
            clean(&entries.iter().map(|(k, v)| format!("{k}={}", plain(Some(v)))).collect::<Vec<_>>().join(", "))
        }
        (_, Value::Array(_)) => clean(&joined(Some(value), ", ")),
        (_, Value::Object(_)) => clean(&value.to_string()),
        _ => clean(&plain(Some(value))),
    }
}

/// A scalar as text; null and absent are empty (rendered `-`).
fn plain(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn joined(value: Option<&Value>, separator: &str) -> String {
    match value {
        Some(Value::Array(items)) => items.iter().map(|item| plain(Some(item))).collect::<Vec<_>>().join(separator),
        other => plain(other),
    }
}

/// RFC 3339 shortened to whole seconds in UTC; anything else as it came.
fn timestamp(value: Option<&Value>) -> String {
    let text = plain(value);
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    OffsetDateTime::parse(&text, &Rfc3339)
        .ok()
        .and_then(|at| at.to_offset(UtcOffset::UTC).format(format).ok())
        .unwrap_or(text)
}

fn pretty_value(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

fn render_new_key(reply: &Reply, heading: &str) -> Result<String, KeysError> {
    let body = reply.value()?;
    let raw = body.get("key").and_then(Value::as_str).ok_or_else(|| reply.bad("no \"key\" in the response"))?;
    let record = body.get("record").unwrap_or(&Value::Null);
    let id = plain(record.get("id"));
    let heading = if heading == "Created" { format!("Created key {}.", clean(&id)) } else { heading.to_owned() };
    Ok(format!(
        "{heading}\n\n    {}\n\nThis key is shown only once: store it now. keygate keeps only its hash.\n\n{}",
        clean(raw),
        render_record(record)
    ))
}

/// One usage bucket (or the totals) reduced to the table's numbers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct UsageRow {
    requests: u64,
    allowed: u64,
    denied: u64,
    s2xx: u64,
    s4xx: u64,
    s5xx: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl UsageRow {
    /// Absent counters are zero: the server may leave out what did not happen.
    fn of(bucket: &Value) -> Self {
        let number = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
        let status = |class: &str| number(bucket.get("status").and_then(|s| s.get(class)));
        let denied = match bucket.get("denied") {
            Some(Value::Object(codes)) => codes.values().map(|n| n.as_u64().unwrap_or(0)).fold(0, u64::saturating_add),
            other => number(other),
        };
        UsageRow {
            requests: number(bucket.get("requests")),
            allowed: number(bucket.get("allowed")),
            denied,
            s2xx: status("2xx"),
            s4xx: status("4xx"),
            s5xx: status("5xx"),
            bytes_in: number(bucket.get("bytes_in")),
            bytes_out: number(bucket.get("bytes_out")),
        }
    }

    fn add(self, other: UsageRow) -> UsageRow {
        UsageRow {
            requests: self.requests.saturating_add(other.requests),
            allowed: self.allowed.saturating_add(other.allowed),
            denied: self.denied.saturating_add(other.denied),
            s2xx: self.s2xx.saturating_add(other.s2xx),
            s4xx: self.s4xx.saturating_add(other.s4xx),
            s5xx: self.s5xx.saturating_add(other.s5xx),
            bytes_in: self.bytes_in.saturating_add(other.bytes_in),
            bytes_out: self.bytes_out.saturating_add(other.bytes_out),
        }
    }

    fn cells(self, start: String) -> [String; 9] {
        [
            start,
            self.requests.to_string(),
            self.allowed.to_string(),
            self.denied.to_string(),
            self.s2xx.to_string(),
            self.s4xx.to_string(),
            self.s5xx.to_string(),
            self.bytes_in.to_string(),
            self.bytes_out.to_string(),
        ]
    }
}

fn render_usage(body: &Value, id: &str) -> String {
    let buckets = body.get("buckets").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if buckets.is_empty() {
        return format!("no usage recorded for {} in this period\n", clean(id));
    }
    let mut table =
        Table::new(["START", "REQUESTS", "ALLOWED", "DENIED", "2XX", "4XX", "5XX", "BYTES IN", "BYTES OUT"])
            .right(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let mut sum = UsageRow::default();
    for bucket in buckets {
        let row = UsageRow::of(bucket);
        sum = sum.add(row);
        table.row(row.cells(timestamp(bucket.get("start"))));
    }
    // The server's totals are authoritative; the sum covers a server that sends none.
    let totals = body.get("totals").filter(|t| t.is_object()).map(UsageRow::of).unwrap_or(sum);
    table.row(totals.cells("TOTAL".to_owned()));
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        keys: KeysArgs,
    }

    fn parse(args: &[&str]) -> Result<KeysArgs, clap::Error> {
        TestCli::try_parse_from(std::iter::once("keys").chain(args.iter().copied())).map(|cli| cli.keys)
    }

    fn parsed(args: &[&str]) -> KeysArgs {
        match parse(args) {
            Ok(keys) => keys,
            Err(e) => panic!("{args:?} should parse: {e}"),
        }
    }

    fn refused(args: &[&str]) -> clap::Error {
        match parse(args) {
            Ok(keys) => panic!("{args:?} should be refused, got {keys:?}"),
            Err(e) => e,
        }
    }

    fn create(args: &[&str]) -> CreateArgs {
        match *parsed(args).command {
            KeysCommand::Create(create) => create,
            other => panic!("expected create, got {other:?}"),
        }
    }

    fn update(args: &[&str]) -> UpdateArgs {
        match *parsed(args).command {
            KeysCommand::Update(update) => update,
            other => panic!("expected update, got {other:?}"),
        }
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        TestCli::command().debug_assert();
        super::super::Cli::command().debug_assert();
    }

    #[test]
    fn rate_limit_and_quota_syntax() {
        assert_eq!(parse_rate_limit("10/1s"), Ok(RateLimitArg { requests: 10, per: "1s".into() }));
        assert_eq!(parse_rate_limit(" 1000 / 1m "), Ok(RateLimitArg { requests: 1000, per: "1m".into() }));
        assert_eq!(parse_rate_limit("5/s"), Ok(RateLimitArg { requests: 5, per: "1s".into() }));
        assert_eq!(parse_rate_limit("100/1h30m"), Ok(RateLimitArg { requests: 100, per: "1h30m".into() }));
        for bad in ["10", "10/", "/1s", "x/1s", "0/1s", "-1/1s", "10/0s", "10/1.5s", "10/1x", "99999999999/1s"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_rate_limit("10").unwrap_err().contains("REQUESTS/DURATION"));

        assert_eq!(parse_quota("10000/month"), Ok(QuotaArg { requests: 10_000, per: "month" }));
        assert_eq!(parse_quota("50/day"), Ok(QuotaArg { requests: 50, per: "day" }));
        for bad in ["10000", "10000/week", "0/day", "x/day", "10/1d", "10/Month"] {
            assert!(parse_quota(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn bad_flag_values_are_command_line_errors() {
        for args in [
            &["create", "--name", "a", "--rate-limit", "10/x"][..],
            &["create", "--name", "a", "--quota", "10/week"],
            &["create", "--name", "a", "--ip", "10.0.0.0/33"],
            &["create", "--name", "a", "--expires-at", "tomorrow"],
            &["create", "--name", "a", "--ttl", "0s"],
            &["create", "--name", "a", "--metadata", "novalue"],
            &["create", "--name", "a", "--prefix", "_bad"],
            &["create", "--name", "a", "--scope", "has space"],
            &["list", "--limit", "0"],
            &["list", "--status", "expired"],
            &["update", "k", "--status", "revoked"],
            &["usage", "k", "--granularity", "week"],
            &["usage", "k", "--from", "yesterday"],
            &["rotate", "k", "--grace-period", "1 day"],
            &["list", "--admin-url", "localhost:9090"],
        ] {
            let error = refused(args);
            assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        }
    }

    #[test]
    fn required_fields_and_conflicts() {
        // create needs --name; update needs something to change.
        assert_eq!(refused(&["create"]).kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let error = match check_command_line(&parsed(&["update", "key_1"])) {
            Ok(()) => panic!("an update without changes should be refused"),
            Err(e) => e,
        };
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("nothing to change"), "{error}");
        assert!(check_command_line(&parsed(&["update", "key_1", "--tag", "x"])).is_ok());
        assert!(check_command_line(&parsed(&["show", "key_1"])).is_ok());
        assert_eq!(refused(&["show"]).kind(), clap::error::ErrorKind::MissingRequiredArgument);
        // --burst only means something with --rate-limit.
        assert_eq!(refused(&["create", "--name", "a", "--burst", "5"]).exit_code(), 2);
        assert_eq!(
            refused(&["create", "--name", "a", "--ttl", "1d", "--expires-at", "2030-01-01T00:00:00Z"]).exit_code(),
            2
        );
        assert_eq!(
            refused(&["update", "k", "--owner", "o", "--clear-owner"]).kind(),
            clap::error::ErrorKind::ArgumentConflict
        );
        assert_eq!(refused(&["update", "k", "--ttl", "1d", "--clear-expires-at"]).exit_code(), 2);
        // A clear flag alone is a change.
        assert!(update(&["update", "key_1", "--clear-quota"]).clear_quota);
    }

    #[test]
    fn global_options_go_before_or_after_the_subcommand() {
        let before = parsed(&["--json", "--admin-url", "http://cp:9999/", "--token", "t0k", "list"]);
        let after = parsed(&["list", "--json", "--admin-url", "http://cp:9999/", "--token", "t0k"]);
        for args in [before, after] {
            assert!(args.global.json);
            assert_eq!(display_url(&args.global.admin_url), "http://cp:9999");
            assert_eq!(args.global.token.as_deref(), Some("t0k"));
            // Debug output must not carry the token.
            assert!(!format!("{args:?}").contains("t0k"));
        }
    }

    #[test]
    fn the_admin_url_defaults_to_the_local_admin_port() {
        // Only meaningful when the environment does not override it.
        if std::env::var_os("KEYGATE_ADMIN_URL").is_none() {
            assert_eq!(display_url(&parsed(&["list"]).global.admin_url), DEFAULT_ADMIN_URL);
        }
    }

    #[test]
    fn create_body_carries_exactly_the_given_fields() {
        let minimal = create(&["create", "--name", "web"]);
        assert_eq!(create_body(&minimal), json!({ "name": "web" }));

        let full = create(&[
            "create",
            "--name",
            "web",
            "--owner",
            "acme",
            "--plan",
            "pro",
            "--scope",
            "orders:read",
            "--scope",
            "orders:write,users:*",
            "--ip",
            "10.0.0.0/8",
            "--ip",
            "192.0.2.7",
            "--ip",
            "2001:db8::/32",
            "--rate-limit",
            "10/1s",
            "--burst",
            "20",
            "--quota",
            "10000/month",
            "--quota-by",
            "owner",
            "--ttl",
            "30d",
            "--prefix",
            "kg_test",
            "--metadata",
            "team=core",
            "--metadata",
            "ticket=OPS-1=2",
            "--tag",
            "prod",
            "--tag",
            "eu",
        ]);
        assert_eq!(
            create_body(&full),
            json!({
                "name": "web",
                "owner": "acme",
                "plan": "pro",
                "scopes": ["orders:read", "orders:write", "users:*"],
                "ip_allowlist": ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"],
                "rate_limit": { "requests": 10, "per": "1s", "burst": 20 },
                "quota": { "requests": 10000, "per": "month", "by": "owner" },
                "ttl": "30d",
                "prefix": "kg_test",
                "metadata": { "team": "core", "ticket": "OPS-1=2" },
                "tags": ["prod", "eu"],
            })
        );

        let expiring =
            create(&["create", "--name", "w", "--expires-at", "2030-01-31T00:00:00Z", "--rate-limit", "5/1m"]);
        assert_eq!(
            create_body(&expiring),
            json!({ "name": "w", "expires_at": "2030-01-31T00:00:00Z", "rate_limit": { "requests": 5, "per": "1m" } })
        );
    }

    #[test]
    fn update_body_sends_only_changes_and_nulls_for_clears() {
        let rename = update(&["update", "key_1", "--name", "new", "--status", "disabled"]);
        assert_eq!(update_body(&rename), json!({ "name": "new", "status": "disabled" }));

        let clears = update(&[
            "update",
            "key_1",
            "--clear-owner",
            "--clear-plan",
            "--clear-ip-allowlist",
            "--clear-rate-limit",
            "--clear-quota",
            "--clear-expires-at",
        ]);
        assert_eq!(
            update_body(&clears),
            json!({
                "owner": null, "plan": null, "ip_allowlist": null,
                "rate_limit": null, "quota": null, "expires_at": null,
            })
        );

        let mixed = update(&["update", "key_1", "--quota", "50/day", "--scope", "a"]);
        assert_eq!(update_body(&mixed), json!({ "quota": { "requests": 50, "per": "day" }, "scopes": ["a"] }));

        let collections = update(&["update", "key_1", "--clear-scopes", "--clear-tags", "--clear-metadata"]);
        assert_eq!(update_body(&collections), json!({ "scopes": [], "tags": [], "metadata": {} }));
    }

    #[test]
    fn list_and_usage_queries_carry_only_what_was_given() {
        let KeysCommand::List(list) =
            *parsed(&["list", "--owner", "acme", "--status", "revoked", "--limit", "5"]).command
        else {
            panic!("expected list");
        };
        assert_eq!(
            list_query(&list, Some("c2")),
            vec![
                ("owner", "acme".into()),
                ("status", "revoked".into()),
                ("limit", "5".into()),
                ("cursor", "c2".into())
            ]
        );
        let KeysCommand::Usage(usage) =
            *parsed(&["usage", "key_1", "--from", "2025-01-01T00:00:00Z", "--granularity", "hour"]).command
        else {
            panic!("expected usage");
        };
        assert_eq!(usage_query(&usage), vec![("from", "2025-01-01T00:00:00Z".into()), ("granularity", "hour".into())]);
    }

    #[test]
    fn error_messages_follow_the_status() {
        let body = |message: &str| format!(r#"{{"error":{{"code":"x","message":"{message}","request_id":"req_1"}}}}"#);
        assert_eq!(
            describe_api_error(400, &body("rate_limit.per: invalid duration"), None, true),
            "invalid request: rate_limit.per: invalid duration"
        );
        let unauthorized = describe_api_error(401, &body("bad token"), None, true);
        assert!(unauthorized.starts_with("the admin API refused the token (401): bad token\nhint: "), "{unauthorized}");
        assert!(unauthorized.contains("--token") && unauthorized.contains("KEYGATE_ADMIN_TOKEN"));
        assert!(describe_api_error(401, "", None, false).contains("no token was given"));

        let not_found = r#"{"error":{"code":"not_found","message":"key not found","request_id":"r"}}"#;
        assert_eq!(describe_api_error(404, not_found, Some("key_9"), true), "no key key_9: key not found");
        let own = r#"{"error":{"code":"not_found","message":"no key key_9","request_id":"r"}}"#;
        assert_eq!(describe_api_error(404, own, Some("key_9"), true), "no key key_9");
        assert_eq!(describe_api_error(404, "", Some("key_9"), true), "no key key_9");
        let no_route = r#"{"error":{"code":"no_route","message":"no route","request_id":"r"}}"#;
        assert!(describe_api_error(404, no_route, Some("key_9"), true).contains("--admin-url"));

        assert_eq!(describe_api_error(409, &body("name taken"), None, true), "conflict: name taken");
        assert_eq!(
            describe_api_error(500, &body("database down"), None, true),
            "the admin API answered 500 Internal Server Error: database down (request id req_1)"
        );
        assert_eq!(describe_api_error(403, "", None, true), "the admin API answered 403 Forbidden");
        assert_eq!(
            describe_api_error(502, "<html>\n <b>Bad\tgateway</b></html>", None, true),
            "the admin API answered 502 Bad Gateway: <html> <b>Bad gateway</b></html>"
        );
    }

    #[test]
    fn an_unreachable_admin_api_is_exit_1_with_a_clear_message() {
        let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => panic!("cannot bind a local port: {e}"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let args = || parsed(&["--admin-url", &url, "--token", "s3cret-token", "show", "key_1"]);
        let message = match execute(args()) {
            Ok(output) => panic!("expected an error, got {output:?}"),
            Err(e) => e.to_string(),
        };
        assert!(message.starts_with(&format!("cannot reach the admin API at {url}: ")), "{message}");
        assert!(message.contains("--admin-url") && message.contains("KEYGATE_ADMIN_URL"), "{message}");
        assert!(!message.contains("s3cret-token"), "{message}");
        assert_eq!(run(args()), ExitCode::from(1));
    }

    fn record() -> Value {
        json!({
            "id": "key_1", "name": "web", "owner": "acme", "plan": null, "status": "active",
            "masked": "kg_live_Ab3d…x9Zq", "prefix": "kg_live", "scopes": ["orders:read", "orders:*"],
            "ip_allowlist": [], "rate_limit": { "requests": 10, "per": "1s", "burst": 20 },
            "quota": { "requests": 10000, "per": "month", "by": "owner" }, "expires_at": "2030-01-31T12:00:00.123+01:00",
            "metadata": { "team": "core" }, "tags": ["prod"], "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z", "last_used_at": null, "version": 3,
        })
    }

    #[test]
    fn the_key_table_aligns_columns_and_dashes_empty_cells() {
        let other = json!({ "id": "key_22", "name": "batch job", "status": "revoked", "masked": "kg_live_Zz…Yy" });
        let rendered = render_key_list(&[record(), other], Some("abc"));
        let expected = "\
ID      NAME       OWNER  PLAN  STATUS   MASKED             SCOPES                EXPIRES               LAST USED
key_1   web        acme   -     active   kg_live_Ab3d…x9Zq  orders:read,orders:*  2030-01-31 11:00:00Z  -
key_22  batch job  -      -     revoked  kg_live_Zz…Yy      -                     -                     -

more keys: run again with --cursor abc (or use --all)
";
        assert_eq!(rendered, expected);
        assert_eq!(render_key_list(&[], None), "no keys\n");
    }

    #[test]
    fn a_record_is_field_value_lines() {
        let rendered = render_record(&record());
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines[0], "id:           key_1");
        assert!(lines.contains(&"plan:         -"), "{rendered}");
        assert!(lines.contains(&"scopes:       orders:read, orders:*"), "{rendered}");
        assert!(lines.contains(&"ip_allowlist: -"), "{rendered}");
        assert!(lines.contains(&"rate_limit:   10/1s, burst 20"), "{rendered}");
        assert!(lines.contains(&"quota:        10000/month, by owner"), "{rendered}");
        assert!(lines.contains(&"metadata:     team=core"), "{rendered}");
        assert!(lines.contains(&"last_used_at: -"), "{rendered}");
        assert_eq!(lines.last(), Some(&"version:      3"));
    }

    #[test]
    fn a_new_key_is_shown_prominently_once() {
        let reply = Reply {
            text: json!({ "key": "kg_live_secret", "record": { "id": "key_1", "name": "web" } }).to_string(),
            url: "http://x".into(),
        };
        let rendered = match render_new_key(&reply, "Created") {
            Ok(text) => text,
            Err(e) => panic!("{e}"),
        };
        assert!(rendered.starts_with("Created key key_1.\n\n    kg_live_secret\n\n"), "{rendered}");
        assert!(rendered.contains("shown only once"), "{rendered}");
        assert!(rendered.contains("\nname:         web\n"), "{rendered}");
        let missing = Reply { text: "{}".into(), url: "http://x".into() };
        assert!(render_new_key(&missing, "Created").is_err());
    }

    #[test]
    fn usage_table_sums_denials_and_adds_a_totals_row() {
        let body = json!({
            "key_id": "key_1",
            "buckets": [
                { "start": "2025-01-01T00:00:00Z", "requests": 10, "allowed": 7, "denied": { "rate_limited": 2, "quota_exceeded": 1 },
                  "status": { "2xx": 6, "4xx": 1 }, "bytes_in": 100, "bytes_out": 2000 },
                { "start": "2025-01-01T01:00:00Z", "requests": 1, "allowed": 1, "denied": {},
                  "status": { "5xx": 1 }, "bytes_in": 5, "bytes_out": 0 },
            ],
        });
        let expected = "\
START                 REQUESTS  ALLOWED  DENIED  2XX  4XX  5XX  BYTES IN  BYTES OUT
2025-01-01 00:00:00Z        10        7       3    6    1    0       100       2000
2025-01-01 01:00:00Z         1        1       0    0    0    1         5          0
TOTAL                       11        8       3    6    1    1       105       2000
";
        assert_eq!(render_usage(&body, "key_1"), expected);
        let mut with_totals = body.clone();
        with_totals["totals"] = json!({ "requests": 99, "allowed": 90, "denied": { "x": 9 } });
        let rendered = render_usage(&with_totals, "key_1");
        assert!(rendered.lines().last().is_some_and(|l| l.starts_with("TOTAL") && l.contains("99")), "{rendered}");
        assert_eq!(render_usage(&json!({ "buckets": [] }), "key_1"), "no usage recorded for key_1 in this period\n");
    }

    #[test]
    fn json_output_keeps_the_servers_key_order() {
        let text = r#"{"record":{"zeta":1,"alpha":[true,null,1.5,"s"]},"key":"kg_live_x","empty":{}}"#;
        let json: Json = match serde_json::from_str(text) {
            Ok(json) => json,
            Err(e) => panic!("{e}"),
        };
        let printed = pretty(&json);
        assert!(printed.find("record").zip(printed.find("\"key\"")).is_some_and(|(r, k)| r < k), "{printed}");
        assert!(printed.find("zeta").zip(printed.find("alpha")).is_some_and(|(z, a)| z < a), "{printed}");
        let reparsed: Value = serde_json::from_str(&printed).unwrap_or_default();
        assert_eq!(reparsed, serde_json::from_str::<Value>(text).unwrap_or_default());
    }

    #[test]
    fn ids_are_one_path_segment() {
        let admin = match Admin::new(&parsed(&["--admin-url", "http://h:1/base/", "list"]).global) {
            Ok(admin) => admin,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(admin.endpoint(&["v1", "keys", "a/../b?c"]).as_str(), "http://h:1/base/v1/keys/a%2F..%2Fb%3Fc");
    }
}
