//! The command line of `keygate keys`: clap's types, the value parsers that check
//! what can be checked before any request, and the request each command sends.

use super::*;

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(flatten)]
    pub(crate) global: GlobalOpts,
    // Boxed: the subcommands are large, and `KeysArgs` sits in the top-level
    // command enum beside small variants (clippy::large_enum_variant).
    #[command(subcommand)]
    pub(crate) command: Box<KeysCommand>,
}

/// Options accepted before or after the subcommand.
#[derive(Args)]
pub(crate) struct GlobalOpts {
    /// Base URL of the admin API.
    #[arg(long, global = true, env = "KEYGATE_ADMIN_URL", default_value = DEFAULT_ADMIN_URL,
          value_name = "URL", value_parser = parse_admin_url)]
    pub(crate) admin_url: Url,
    /// Admin bearer token (sent as `Authorization: Bearer TOKEN`).
    // `hide_env_values`: `--help` must not echo the token from the environment.
    #[arg(long, global = true, env = "KEYGATE_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub(crate) token: Option<String>,
    /// Print the API's JSON response instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,
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
pub(crate) enum KeysCommand {
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
pub(crate) struct IdArg {
    /// The key id (key_…).
    #[arg(value_parser = parse_id)]
    pub(crate) id: String,
}

/// Fields that `create` and `update` share.
#[derive(Args, Debug)]
pub(crate) struct KeyFields {
    /// Who the key belongs to.
    #[arg(long)]
    pub(crate) owner: Option<String>,
    /// The plan whose limits apply (a key's own limits override them).
    #[arg(long)]
    pub(crate) plan: Option<String>,
    /// A scope the key holds; repeat or separate with commas (wildcards: orders:*, *).
    #[arg(long = "scope", value_name = "SCOPE", value_delimiter = ',', value_parser = parse_word)]
    pub(crate) scopes: Vec<String>,
    /// An allowed client network (CIDR or a single address); repeat or separate with commas.
    #[arg(long = "ip", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    pub(crate) ips: Vec<String>,
    /// The key's own rate limit, REQUESTS/DURATION (10/1s, 1000/1m).
    #[arg(long, value_name = "REQUESTS/DURATION", value_parser = parse_rate_limit)]
    pub(crate) rate_limit: Option<RateLimitArg>,
    /// Burst size for --rate-limit.
    #[arg(long, value_name = "N", requires = "rate_limit", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) burst: Option<u32>,
    /// Whose budget --rate-limit counts: the key's own, or one shared by every key of its owner.
    #[arg(long, value_name = "key|owner", requires = "rate_limit", value_parser = ["key", "owner"])]
    pub(crate) rate_limit_by: Option<String>,
    /// The key's own quota, REQUESTS/day or REQUESTS/month.
    #[arg(long, value_name = "REQUESTS/PERIOD", value_parser = parse_quota)]
    pub(crate) quota: Option<QuotaArg>,
    /// Whose budget --quota counts: the key's own, or one shared by every key of its owner.
    #[arg(long, value_name = "key|owner", requires = "quota", value_parser = ["key", "owner"])]
    pub(crate) quota_by: Option<String>,
    /// When the key stops working (RFC 3339, e.g. 2026-01-31T00:00:00Z).
    #[arg(long, value_name = "RFC3339", conflicts_with = "ttl", value_parser = parse_timestamp)]
    pub(crate) expires_at: Option<String>,
    /// Lifetime from now (30d, 12h); the server turns it into expires_at.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub(crate) ttl: Option<String>,
    /// A metadata entry KEY=VALUE; repeat for more (a repeated KEY keeps the last value).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_metadata)]
    pub(crate) metadata: Vec<(String, String)>,
    /// A tag; repeat or separate with commas.
    #[arg(long = "tag", value_name = "TAG", value_delimiter = ',', value_parser = parse_word)]
    pub(crate) tags: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// A name for people.
    #[arg(long)]
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) fields: KeyFields,
    /// Key prefix (default on the server: kg_live).
    #[arg(long, value_parser = parse_prefix)]
    pub(crate) prefix: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct UpdateArgs {
    #[arg(value_parser = parse_id)]
    pub(crate) id: String,
    /// A new name.
    #[arg(long)]
    pub(crate) name: Option<String>,
    #[command(flatten)]
    pub(crate) fields: KeyFields,
    /// Enable or disable the key (use `revoke` to revoke it).
    #[arg(long, value_enum)]
    pub(crate) status: Option<UpdateStatus>,
    /// Remove the owner.
    #[arg(long, conflicts_with = "owner")]
    pub(crate) clear_owner: bool,
    /// Remove the plan.
    #[arg(long, conflicts_with = "plan")]
    pub(crate) clear_plan: bool,
    /// Remove every scope.
    #[arg(long, conflicts_with = "scopes")]
    pub(crate) clear_scopes: bool,
    /// Allow every client address again.
    #[arg(long, conflicts_with = "ips")]
    pub(crate) clear_ip_allowlist: bool,
    /// Drop the key's own rate limit (its plan's applies).
    #[arg(long, conflicts_with_all = ["rate_limit", "burst"])]
    pub(crate) clear_rate_limit: bool,
    /// Drop the key's own quota (its plan's applies).
    #[arg(long, conflicts_with = "quota")]
    pub(crate) clear_quota: bool,
    /// Make the key never expire.
    #[arg(long, conflicts_with_all = ["expires_at", "ttl"])]
    pub(crate) clear_expires_at: bool,
    /// Remove all metadata.
    #[arg(long, conflicts_with = "metadata")]
    pub(crate) clear_metadata: bool,
    /// Remove every tag.
    #[arg(long, conflicts_with = "tags")]
    pub(crate) clear_tags: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    #[arg(long)]
    pub(crate) owner: Option<String>,
    #[arg(long, value_enum)]
    pub(crate) status: Option<ListStatus>,
    #[arg(long)]
    pub(crate) plan: Option<String>,
    #[arg(long)]
    pub(crate) tag: Option<String>,
    /// Free-text search (name, owner, id…; the server decides).
    #[arg(long = "q", value_name = "TEXT")]
    pub(crate) q: Option<String>,
    /// Keys per page.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) limit: Option<u32>,
    /// Start from this page cursor (from a previous list).
    #[arg(long, value_name = "CURSOR")]
    pub(crate) cursor: Option<String>,
    /// Follow next_cursor until the last page.
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Args, Debug)]
pub(crate) struct RotateArgs {
    #[arg(value_parser = parse_id)]
    pub(crate) id: String,
    /// How long the old key keeps working (24h, 30m, 0s); the server's default when omitted.
    #[arg(long, value_name = "DURATION", value_parser = parse_any_duration)]
    pub(crate) grace_period: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct UsageArgs {
    #[arg(value_parser = parse_id)]
    pub(crate) id: String,
    /// Start of the period (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub(crate) from: Option<String>,
    /// End of the period (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub(crate) to: Option<String>,
    #[arg(long, value_enum)]
    pub(crate) granularity: Option<Granularity>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpdateStatus {
    Active,
    Disabled,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListStatus {
    Active,
    Disabled,
    Revoked,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Granularity {
    Minute,
    Hour,
    Day,
}

impl UpdateStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpdateStatus::Active => "active",
            UpdateStatus::Disabled => "disabled",
        }
    }
}

impl ListStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ListStatus::Active => "active",
            ListStatus::Disabled => "disabled",
            ListStatus::Revoked => "revoked",
        }
    }
}

impl Granularity {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

/// `--rate-limit 10/1s`: `per` is sent as written once it has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RateLimitArg {
    pub(crate) requests: u32,
    pub(crate) per: String,
}

/// `--quota 10000/month`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QuotaArg {
    pub(crate) requests: u64,
    pub(crate) per: &'static str,
}

// ---------------------------------------------------------------------------
// Value parsers: each error is the whole explanation clap prints (exit 2).

pub(crate) fn parse_admin_url(s: &str) -> Result<Url, String> {
    let mut url = Url::parse(s.trim()).map_err(|e| format!("{e}; expected a URL like {DEFAULT_ADMIN_URL}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("expected an http:// or https:// URL with a host, like {DEFAULT_ADMIN_URL}"));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

pub(crate) fn parse_id(s: &str) -> Result<String, String> {
    let id = s.trim();
    if id.is_empty() {
        return Err("the key id is empty".to_owned());
    }
    Ok(id.to_owned())
}

/// Scopes and tags: one word each, since gateways pass scopes on space-separated.
pub(crate) fn parse_word(s: &str) -> Result<String, String> {
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
pub(crate) fn parse_cidr(s: &str) -> Result<String, String> {
    let text = s.trim();
    let net = crate::config::parse_cidr(text)
        .ok_or_else(|| "expected a CIDR such as 10.0.0.0/8 or 2001:db8::/32, or a single address".to_owned())?;
    // A CIDR goes to the server as the operator wrote it; only a bare address is rewritten.
    Ok(if text.contains('/') { text.to_owned() } else { net.to_string() })
}

pub(crate) fn parse_rate_limit(s: &str) -> Result<RateLimitArg, String> {
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

pub(crate) fn parse_quota(s: &str) -> Result<QuotaArg, String> {
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

pub(crate) fn parse_timestamp(s: &str) -> Result<String, String> {
    let text = s.trim();
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{e}; expected an RFC 3339 time such as 2026-01-31T00:00:00Z"))?;
    Ok(text.to_owned())
}

pub(crate) fn parse_any_duration(s: &str) -> Result<String, String> {
    parse_duration(s).map_err(|e| e.to_string())?;
    Ok(s.trim().to_owned())
}

pub(crate) fn parse_positive_duration(s: &str) -> Result<String, String> {
    if parse_duration(s).map_err(|e| e.to_string())?.is_zero() {
        return Err("it must be longer than 0".to_owned());
    }
    Ok(s.trim().to_owned())
}

pub(crate) fn parse_metadata(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    let key = key.trim();
    if key.is_empty() {
        return Err("the metadata key is empty; expected KEY=VALUE".to_owned());
    }
    Ok((key.to_owned(), value.to_owned()))
}

pub(crate) fn parse_prefix(s: &str) -> Result<String, String> {
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
    pub(crate) fn write_into(&self, body: &mut Map<String, Value>) {
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

pub(crate) fn create_body(args: &CreateArgs) -> Value {
    let mut body = Map::new();
    body.insert("name".into(), json!(args.name));
    args.fields.write_into(&mut body);
    if let Some(prefix) = &args.prefix {
        body.insert("prefix".into(), json!(prefix));
    }
    Value::Object(body)
}

pub(crate) fn update_body(args: &UpdateArgs) -> Value {
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

pub(crate) fn list_query(args: &ListArgs, cursor: Option<&str>) -> Vec<(&'static str, String)> {
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

pub(crate) fn usage_query(args: &UsageArgs) -> Vec<(&'static str, String)> {
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
