//! Raw structs → typed [`Config`], collecting every error with its field path.
//!
//! Each step falls back to a default after reporting, so that later checks
//! still run; the `Config` is returned only when nothing was reported. Checks
//! that depend on another section (a route's upstream, a sink's mode) are
//! skipped when that section itself failed, to avoid follow-on errors.
//!
//! This file holds the error collection, the shared field checks and the node's own
//! sections (mode, listeners, admin, store, keys); the request path's sections
//! (`proxy`), limits (`limits`), usage (`usage`) and webhooks (`webhooks`) are checked
//! in the child modules, all as methods of the one `Builder`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_norway::{Mapping, Value};
use sha2::{Digest, Sha256};

use super::env::{interpolate_tree, key_text, EnvLookup};
use super::position::{join_index, join_key, Positions};
use super::raw::{
    self, Entries, NodeError, Parsed, RawAccessLog, RawAdmin, RawConfig, RawFleetLimits, RawHttp, RawKeyLocation,
    RawKeySource, RawKeys, RawListener, RawMode, RawPlan, RawQuota, RawRateLimit, RawRetention, RawRoute, RawRouteAuth,
    RawSink, RawToken, RawUpstream, RawUsage, Text, TOP_LEVEL_FIELDS,
};
use super::{
    format_duration, parse_duration, AccessLogConfig, AdminConfig, ClientIpConfig, Config, ConfigError, ConfigErrors,
    ControlPlaneClientConfig, EscapedSlashes, EventFormat, FleetEngine, FleetLimitsConfig, HealthCheckConfig,
    HttpConfig, HttpSinkConfig, KeyLocation, KeySource, KeysConfig, LimitScope, ListenerConfig, Mode, NatsSinkConfig,
    PlanConfig, QuotaConfig, QuotaPeriod, RateLimitConfig, RouteAuth, RouteConfig, RouteMatch, SinkConfig, StoreConfig,
    TlsFiles, TokenConfig, TokenRole, UnderscoreHeaders, UpstreamConfig, UpstreamTlsConfig, UsageConfig,
    UsageRetention,
};

mod limits;
mod proxy;
mod usage;
mod webhooks;

const MISSING: &str = "required field is missing";
const DEFAULT_SINK_BATCH_SIZE: usize = 100;
const MAX_SINK_BATCH_SIZE: usize = 10_000;

pub(crate) fn run(text: &str, file: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    let positions = Positions::build(text);
    let mut value: Value = match serde_norway::from_str(text) {
        Ok(value) => value,
        Err(e) => return Err(syntax_error(&e, text, file, &positions)),
    };
    if value.is_null() {
        // An empty file is a config with every default.
        value = Value::Mapping(Mapping::new());
    }
    let mut issues = Issues::default();
    // `<<: *anchor` merge keys, so that shared upstream or plan settings can be
    // written once.
    if let Err(e) = value.apply_merge() {
        issues.add("", format!("invalid YAML merge key (<<): {e}"));
        return Err(issues.into_errors(file, &positions));
    }
    for (path, message) in interpolate_tree(&mut value, "", env) {
        issues.add(&path, message);
        // The unexpanded text would only cause follow-on errors at this path.
        issues.suppressed.push(path);
    }
    let config = build(value, &mut issues);
    match config {
        Some(config) if issues.list.is_empty() => Ok(config),
        _ => Err(issues.into_errors(file, &positions)),
    }
}

fn syntax_error(e: &serde_norway::Error, text: &str, file: &Path, positions: &Positions) -> ConfigErrors {
    let mut message = e.to_string();
    let mut path = String::new();
    let mut at = e.location().map(|l| (l.line(), l.column()));
    if let Some((line, column)) = at {
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    } else {
        // Several documents: serde_norway has no position for that.
        at = super::position::past_first_document(text).or_else(|| positions.value(""));
    }
    // libyaml places duplicate keys at the document start; the walk knows better.
    if let Some(start) = message.find("duplicate entry") {
        if let Some((dup_path, pos)) = positions.first_duplicate() {
            message = message[start..].to_owned();
            path.clone_from(dup_path);
            at = Some(*pos);
        }
    }
    ConfigErrors(vec![ConfigError {
        file: file.to_owned(),
        path,
        line: at.map(|(l, _)| l),
        column: at.map(|(_, c)| c),
        message: format!("invalid YAML: {message}"),
    }])
}

struct Issue {
    path: String,
    message: String,
    /// Point at the mapping key rather than its value (unknown fields).
    at_key: bool,
}

#[derive(Default)]
struct Issues {
    list: Vec<Issue>,
    suppressed: Vec<String>,
}

impl Issues {
    fn push(&mut self, path: &str, message: String, at_key: bool) {
        let hidden = self
            .suppressed
            .iter()
            .any(|s| path.strip_prefix(s.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '['])));
        if !hidden {
            self.list.push(Issue { path: path.to_owned(), message, at_key });
        }
    }

    fn add(&mut self, path: &str, message: impl Into<String>) {
        self.push(path, message.into(), false);
    }

    fn node(&mut self, base: &str, e: &NodeError) {
        self.push(&e.path_under(base), e.message.clone(), e.is_unknown_field());
    }

    /// The parsed subtree, or None after reporting why it did not parse.
    fn take<T>(&mut self, parsed: Parsed<T>, path: &str) -> Option<T> {
        match parsed.0 {
            Ok(value) => Some(value),
            Err(e) => {
                self.node(path, &e);
                None
            }
        }
    }

    fn into_errors(self, file: &Path, positions: &Positions) -> ConfigErrors {
        let mut errors: Vec<ConfigError> = Vec::with_capacity(self.list.len());
        for issue in self.list {
            let at = if issue.at_key { positions.key(&issue.path) } else { positions.value(&issue.path) };
            // The whole document is at fault (a block scalar has no position of its own).
            let at = at.or_else(|| issue.path.is_empty().then_some((1, 1)));
            let error = ConfigError {
                file: file.to_owned(),
                path: issue.path,
                line: at.map(|(l, _)| l),
                column: at.map(|(_, c)| c),
                message: issue.message,
            };
            if !errors.contains(&error) {
                errors.push(error);
            }
        }
        // File order reads best; errors with no position go last.
        errors.sort_by_key(|e| (e.line.is_none(), e.line, e.column));
        if errors.is_empty() {
            // Not expected, but a refusal must always say something.
            errors.push(ConfigError {
                file: file.to_owned(),
                path: String::new(),
                line: None,
                column: None,
                message: "invalid configuration".to_owned(),
            });
        }
        ConfigErrors(errors)
    }
}

fn build(value: Value, issues: &mut Issues) -> Option<Config> {
    let Value::Mapping(map) = value else {
        issues.add("", "the config file must be a mapping of settings (mode, listeners, routes, ...)");
        return None;
    };
    let mut known = Mapping::new();
    for (key, value) in map {
        match key.as_str() {
            Some(name) if TOP_LEVEL_FIELDS.contains(&name) => {
                known.insert(key, value);
            }
            _ => issues.push(
                &key_text(&key),
                format!(
                    "unknown field `{}`, expected one of {}",
                    key_text(&key),
                    TOP_LEVEL_FIELDS.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
                ),
                true,
            ),
        }
    }
    let raw: RawConfig = match raw::parse_value(Value::Mapping(known)) {
        Ok(raw) => raw,
        Err(e) => {
            issues.node("", &e);
            return None;
        }
    };
    Some(Builder { issues }.config(raw))
}

struct Builder<'a> {
    issues: &'a mut Issues,
}

impl Builder<'_> {
    fn config(&mut self, raw: RawConfig) -> Config {
        // None when `mode` is invalid: mode-dependent rules are then skipped.
        let known_mode = match raw.mode {
            None => Some(Mode::Standalone),
            Some(p) => self.issues.take(p, "mode").map(|m| match m {
                RawMode::Standalone => Mode::Standalone,
                RawMode::Gateway => Mode::Gateway,
                RawMode::ControlPlane => Mode::ControlPlane,
            }),
        };
        let mode = known_mode.unwrap_or_default();

        let node_id = self.node_id(raw.node_id);
        let threads = self.threads(raw.threads);
        let admin = self.admin(raw.admin);
        let listeners = self.listeners(raw.listeners, admin.address);
        let store = self.store(raw.store);
        let (keys, keys_parsed) = self.keys(raw.keys, known_mode);
        let client_ip = self.client_ip(raw.client_ip);
        let key_locations = self.key_locations(raw.key_locations);
        let (upstreams, upstream_names) = self.upstreams(raw.upstreams);
        let routes = self.routes(raw.routes, upstream_names.as_ref());
        let (plans, plan_names) = self.plans(raw.plans);
        let default_plan = self.default_plan(raw.default_plan, plan_names.as_ref());
        let usage = self.usage(raw.usage, known_mode, keys_parsed.then_some(&keys));
        let access_log = self.access_log(raw.access_log);
        let shutdown_timeout_text = self.parsed(raw.shutdown_timeout, "shutdown_timeout");
        let shutdown_timeout =
            self.duration(shutdown_timeout_text, "shutdown_timeout", super::DEFAULT_SHUTDOWN_TIMEOUT, true);
        let http = self.http(raw.http, &key_locations);
        let fleet_limits = self.fleet_limits(raw.fleet_limits, keys_parsed.then_some(&keys));
        let webhooks = self.webhooks(raw.webhooks, known_mode);

        Config {
            mode,
            node_id,
            threads,
            listeners,
            admin,
            store,
            keys,
            client_ip,
            key_locations,
            upstreams,
            routes,
            plans,
            default_plan,
            usage,
            access_log,
            shutdown_timeout,
            http,
            fleet_limits,
            webhooks,
        }
    }

    fn parsed<T>(&mut self, parsed: Option<Parsed<T>>, path: &str) -> Option<T> {
        parsed.and_then(|p| self.issues.take(p, path))
    }

    fn required(&mut self, text: Option<Text>, path: &str) -> Option<String> {
        match text {
            Some(Text(s)) => Some(s),
            None => {
                self.issues.add(path, MISSING);
                None
            }
        }
    }

    /// A required string that must not be blank.
    fn required_nonblank(&mut self, text: Option<Text>, path: &str) -> Option<String> {
        let s = self.required(text, path)?;
        if s.trim().is_empty() {
            self.issues.add(path, "must not be empty");
            return None;
        }
        Some(s)
    }

    fn optional_path(&mut self, text: Option<Text>, path: &str) -> Option<PathBuf> {
        let Text(s) = text?;
        if s.trim().is_empty() {
            self.issues.add(path, "must not be empty");
            return None;
        }
        Some(PathBuf::from(s))
    }

    fn duration(&mut self, text: Option<Text>, path: &str, default: Duration, zero_ok: bool) -> Duration {
        let Some(Text(s)) = text else {
            return default;
        };
        match parse_duration(&s) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.issues.add(path, "must be greater than 0");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.issues.add(path, e.to_string());
                default
            }
        }
    }

    fn socket_addr(&mut self, s: &str, path: &str) -> Option<SocketAddr> {
        match s.trim().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.issues.add(path, format!("expected IP:port such as 0.0.0.0:8080 or [::]:8080, found {s:?}"));
                None
            }
        }
    }

    fn pem_file(&mut self, text: Option<Text>, path: &str, kind: Pem) -> Option<PathBuf> {
        let file = self.required_nonblank(text, path)?;
        match check_pem(Path::new(&file), kind) {
            Ok(()) => Some(PathBuf::from(file)),
            Err(message) => {
                self.issues.add(path, message);
                None
            }
        }
    }

    fn node_id(&mut self, raw: Option<Parsed<Text>>) -> String {
        match self.parsed(raw, "node_id") {
            Some(Text(id)) => {
                if id.trim().is_empty() {
                    self.issues.add("node_id", "must not be empty");
                } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    self.issues.add("node_id", format!("{id:?} must not contain spaces or control characters"));
                }
                id
            }
            None => gethostname::gethostname()
                .into_string()
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "keygate".to_owned()),
        }
    }

    fn threads(&mut self, raw: Option<Parsed<raw::Num<usize>>>) -> usize {
        match self.parsed(raw, "threads") {
            Some(raw::Num(0)) => {
                self.issues.add("threads", "must be at least 1");
                1
            }
            Some(raw::Num(n)) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    fn listeners(&mut self, raw: Option<Parsed<Vec<Parsed<RawListener>>>>, admin: SocketAddr) -> Vec<ListenerConfig> {
        let Some(parsed) = raw else {
            return vec![ListenerConfig { address: SocketAddr::from(([0, 0, 0, 0], 8080)), tls: None }];
        };
        let Some(items) = self.issues.take(parsed, "listeners") else {
            return Vec::new();
        };
        if items.is_empty() {
            self.issues.add("listeners", "at least one listener is required (leave `listeners` out for 0.0.0.0:8080)");
        }
        let mut out = Vec::new();
        let mut seen: Vec<(usize, SocketAddr)> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let path = join_index("listeners", i);
            let Some(listener) = self.issues.take(item, &path) else {
                continue;
            };
            let address_path = join_key(&path, "address");
            let address =
                self.required(listener.address, &address_path).and_then(|s| self.socket_addr(&s, &address_path));
            let tls = self.parsed(listener.tls, &join_key(&path, "tls")).map(|tls| {
                let tls_path = join_key(&path, "tls");
                let cert = self.pem_file(tls.cert, &join_key(&tls_path, "cert"), Pem::Cert);
                let key = self.pem_file(tls.key, &join_key(&tls_path, "key"), Pem::Key);
                (cert, key)
            });
            let Some(address) = address else { continue };
            if let Some((j, _)) = seen.iter().find(|(_, other)| overlaps(*other, address)) {
                self.issues.add(&address_path, format!("address {address} is already used by listeners[{j}]"));
            } else if overlaps(admin, address) {
                self.issues.add(&address_path, format!("address {address} is already used by admin.address ({admin})"));
            }
            seen.push((i, address));
            let tls = match tls {
                None => None,
                Some((Some(cert), Some(key))) => Some(TlsFiles { cert, key }),
                Some(_) => continue,
            };
            out.push(ListenerConfig { address, tls });
        }
        out
    }

    fn admin(&mut self, raw: Option<Parsed<RawAdmin>>) -> AdminConfig {
        let default_address = SocketAddr::from(([127, 0, 0, 1], 9090));
        let Some(admin) = self.parsed(raw, "admin") else {
            return AdminConfig { address: default_address, tokens: Vec::new(), sync_tokens: Vec::new() };
        };
        let address = match admin.address {
            Some(Text(s)) => self.socket_addr(&s, "admin.address").unwrap_or(default_address),
            None => default_address,
        };
        AdminConfig {
            address,
            tokens: self.tokens(admin.tokens, "admin.tokens"),
            sync_tokens: self.tokens(admin.sync_tokens, "admin.sync_tokens"),
        }
    }

    fn tokens(&mut self, raw: Option<Vec<Parsed<RawToken>>>, list: &str) -> Vec<TokenConfig> {
        let mut out = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, item) in raw.unwrap_or_default().into_iter().enumerate() {
            let path = join_index(list, i);
            let Some(token) = self.issues.take(item, &path) else {
                continue;
            };
            let name_path = join_key(&path, "name");
            let name = self.required_nonblank(token.name, &name_path);
            if let Some(name) = &name {
                if let Some(first) = names.get(name) {
                    self.issues
                        .add(&name_path, format!("duplicate token name {name:?} (also {})", join_index(list, *first)));
                } else {
                    names.insert(name.clone(), i);
                }
            }
            let sha256 = match (token.hash, token.token) {
                (Some(Text(hash)), None) => {
                    parse_sha256(&hash).map_err(|m| self.issues.add(&join_key(&path, "hash"), m)).ok()
                }
                (None, Some(Text(raw))) => {
                    if raw.is_empty() {
                        self.issues.add(&join_key(&path, "token"), "must not be empty");
                        None
                    } else {
                        Some(Sha256::digest(raw.as_bytes()).into())
                    }
                }
                (Some(_), Some(_)) => {
                    self.issues.add(&path, "give either `hash` or `token`, not both");
                    None
                }
                (None, None) => {
                    self.issues.add(&path, "needs `hash: \"sha256:<64 hex digits>\"` or `token: \"${env:NAME}\"`");
                    None
                }
            };
            let role = match (token.role, list) {
                (None, _) => Some(TokenRole::Admin),
                (Some(Text(role)), "admin.tokens") => match role.as_str() {
                    "admin" => Some(TokenRole::Admin),
                    "read" => Some(TokenRole::Read),
                    other => {
                        self.issues.add(&join_key(&path, "role"), format!("{other:?} is not admin or read"));
                        None
                    }
                },
                (Some(_), _) => {
                    self.issues.add(&join_key(&path, "role"), "only admin.tokens have a role");
                    None
                }
            };
            if let (Some(name), Some(sha256), Some(role)) = (name, sha256, role) {
                out.push(TokenConfig { name, sha256, role });
            }
        }
        out
    }

    fn store(&mut self, raw: Option<Parsed<raw::RawStore>>) -> StoreConfig {
        const DEFAULT: &str = "sqlite://data/keygate.db";
        let url = self.parsed(raw, "store").and_then(|s| s.url).map_or_else(|| DEFAULT.to_owned(), |Text(url)| url);
        let sqlite_path = url.strip_prefix("sqlite://");
        let ok = url == "sqlite::memory:"
            || sqlite_path.is_some_and(|p| !p.is_empty())
            || ["postgres://", "postgresql://"]
                .iter()
                .any(|scheme| url.len() > scheme.len() && url.starts_with(scheme));
        if !ok {
            self.issues
                .add("store.url", "expected sqlite://<file>, sqlite::memory:, postgres://... or postgresql://...");
        }
        StoreConfig { url }
    }

    /// Also says whether `keys` parsed, which usage sink checks depend on.
    fn keys(&mut self, raw: Option<Parsed<RawKeys>>, mode: Option<Mode>) -> (KeysConfig, bool) {
        let (keys, parsed) = match raw {
            None => (None, true),
            Some(p) => match self.issues.take(p, "keys") {
                Some(keys) => (Some(keys), true),
                None => (None, false),
            },
        };
        let RawKeys { source, control_plane, file, cache_file, max_staleness } = keys.unwrap_or(RawKeys {
            source: None,
            control_plane: None,
            file: None,
            cache_file: None,
            max_staleness: None,
        });
        let had_control_plane = control_plane.is_some();
        let control_plane = self.parsed(control_plane, "keys.control_plane").and_then(|cp| {
            let url = self.required(cp.url, "keys.control_plane.url");
            let token = self.required_nonblank(cp.token, "keys.control_plane.token");
            let url = url.filter(|url| self.check_http_url(url, "keys.control_plane.url"));
            Some(ControlPlaneClientConfig { url: url?, token: token? })
        });
        let file = self.optional_path(file, "keys.file");
        let cache_file = self.optional_path(cache_file, "keys.cache_file");
        let max_staleness = self.duration(max_staleness, "keys.max_staleness", Duration::ZERO, true);

        // Set when no source could be picked: the checks below would only repeat it.
        let mut unresolved = false;
        let source = match source {
            Some(RawKeySource::Store) => KeySource::Store,
            Some(RawKeySource::ControlPlane) => KeySource::ControlPlane,
            Some(RawKeySource::File) => KeySource::File,
            None => match mode {
                Some(Mode::Gateway) if had_control_plane => KeySource::ControlPlane,
                Some(Mode::Gateway) if file.is_some() => KeySource::File,
                Some(Mode::Gateway) => {
                    self.issues.add(
                        "keys",
                        "gateway mode needs a key source: set keys.control_plane (source control_plane) or keys.file (source file)",
                    );
                    unresolved = true;
                    KeySource::File
                }
                _ => KeySource::Store,
            },
        };
        if parsed && !unresolved {
            match (source, mode) {
                (KeySource::Store, Some(Mode::Gateway)) => self.issues.add(
                    "keys.source",
                    "`store` is not available in gateway mode (a gateway has no store): use control_plane or file",
                ),
                (KeySource::ControlPlane | KeySource::File, Some(Mode::ControlPlane)) => self
                    .issues
                    .add("keys.source", "a control plane serves keys from its store: use `store` (or leave it out)"),
                _ => {}
            }
            if source == KeySource::ControlPlane && !had_control_plane {
                self.issues
                    .add("keys.control_plane", "required when keys.source is control_plane: { url: ..., token: ... }");
            }
            if source == KeySource::File && file.is_none() && !self.has_issue("keys.file") {
                self.issues.add("keys.file", "required when keys.source is file");
            }
        }
        (KeysConfig { source, control_plane, file, cache_file, max_staleness }, parsed)
    }

    /// A Standard Webhooks secret: any text, or `whsec_` and base64.
    fn signing_secret(&mut self, raw: Option<Text>, path: &str) -> Option<String> {
        let secret = self.required_nonblank(raw, path)?;
        if let Some(encoded) = secret.strip_prefix("whsec_") {
            use base64::Engine;
            if base64::engine::general_purpose::STANDARD.decode(encoded).is_err() {
                self.issues.add(path, "a secret that starts with whsec_ must continue in base64");
                return None;
            }
        }
        Some(secret)
    }

    fn has_issue(&self, path: &str) -> bool {
        self.issues.list.iter().any(|i| i.path == path)
    }

    fn check_http_url(&mut self, url: &str, path: &str) -> bool {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.parse::<http::Uri>().ok().and_then(|u| u.host().map(|h| !h.is_empty())).unwrap_or(false);
        if !ok {
            self.issues.add(path, format!("expected an http:// or https:// URL with a host, found {url:?}"));
        }
        ok
    }

    fn client_ip(&mut self, raw: Option<Parsed<raw::RawClientIp>>) -> ClientIpConfig {
        let mut trusted_proxies = Vec::new();
        let list = self.parsed(raw, "client_ip").and_then(|c| c.trusted_proxies).unwrap_or_default();
        for (i, Text(s)) in list.into_iter().enumerate() {
            let s = s.trim();
            match super::parse_cidr(s) {
                Some(net) => trusted_proxies.push(net),
                None => self.issues.add(
                    &join_index("client_ip.trusted_proxies", i),
                    format!("{s:?} is not an IP address or CIDR (e.g. 10.0.0.0/8 or ::1)"),
                ),
            }
        }
        ClientIpConfig { trusted_proxies }
    }

    fn access_log(&mut self, raw: Option<Parsed<RawAccessLog>>) -> AccessLogConfig {
        match self.parsed(raw, "access_log") {
            None => AccessLogConfig::Stdout,
            Some(RawAccessLog::Off) => AccessLogConfig::Off,
            Some(RawAccessLog::Path(path)) => match self.required_nonblank(path, "access_log.path") {
                Some(p) if p == "stdout" => AccessLogConfig::Stdout,
                Some(p) => AccessLogConfig::File(PathBuf::from(p)),
                None => AccessLogConfig::Stdout,
            },
        }
    }
}

/// `sha256:<64 hex digits>` → digest.
fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    const FORM: &str = "expected sha256:<64 hex digits> (`keygate hash-key` prints one)";
    let digits = s.trim().strip_prefix("sha256:").ok_or_else(|| FORM.to_owned())?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(digits, &mut out).map_err(|_| FORM.to_owned())?;
    Ok(out)
}

#[derive(Clone, Copy)]
enum Pem {
    Cert,
    Key,
}

/// The proxy's TLS setup panics on unreadable PEM, so it is checked here.
fn check_pem(path: &Path, kind: Pem) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
    match kind {
        Pem::Cert if !has(b"-----BEGIN CERTIFICATE-----") => {
            Err(format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display()))
        }
        Pem::Key if !(has(b"-----BEGIN") && has(b"PRIVATE KEY-----")) => {
            Err(format!("{} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)", path.display()))
        }
        _ => Ok(()),
    }
}

/// Two listen addresses collide when equal, or when one is the unspecified
/// address of the same family on the same port. Port 0 never collides.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
