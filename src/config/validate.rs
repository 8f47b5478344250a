//! Raw structs → typed [`Config`], collecting every error with its field path.
//!
//! Each step falls back to a default after reporting, so that later checks
//! still run; the `Config` is returned only when nothing was reported. Checks
//! that depend on another section (a route's upstream, a sink's mode) are
//! skipped when that section itself failed, to avoid follow-on errors.

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

    fn fleet_limits(
        &mut self,
        raw: Option<Parsed<RawFleetLimits>>,
        keys: Option<&KeysConfig>,
    ) -> Option<FleetLimitsConfig> {
        let raw = self.parsed(raw, "fleet_limits")?;
        let interval_text = raw.sync_interval;
        let sync_interval = self.duration(
            interval_text.clone(),
            "fleet_limits.sync_interval",
            super::DEFAULT_FLEET_SYNC_INTERVAL,
            false,
        );
        if interval_text.is_some()
            && !(super::MIN_FLEET_SYNC_INTERVAL..=super::MAX_FLEET_SYNC_INTERVAL).contains(&sync_interval)
        {
            self.issues.add(
                "fleet_limits.sync_interval",
                format!(
                    "must be from {} to {}",
                    format_duration(super::MIN_FLEET_SYNC_INTERVAL),
                    format_duration(super::MAX_FLEET_SYNC_INTERVAL)
                ),
            );
        }
        let engine = match raw.engine.as_ref().map(|Text(e)| e.trim()) {
            None => {
                self.issues.add("fleet_limits.engine", MISSING);
                return None;
            }
            Some("redis") => {
                let url = self.required(raw.url, "fleet_limits.url")?;
                if let Err(e) = redis::Client::open(url.as_str()) {
                    self.issues
                        .add("fleet_limits.url", format!("not a Redis URL (redis://host:port, unix:///path): {e}"));
                    return None;
                }
                FleetEngine::Redis { url }
            }
            Some("control_plane") => {
                if raw.url.is_some() {
                    self.issues.add("fleet_limits.url", "only for `redis`: `control_plane` uses keys.control_plane");
                }
                // Unknown when `keys` has its own errors, which are reported already.
                if keys.is_some_and(|keys| keys.control_plane.is_none()) {
                    self.issues.add(
                        "fleet_limits.engine",
                        "`control_plane` needs keys.control_plane (a gateway following a control plane)",
                    );
                    return None;
                }
                FleetEngine::ControlPlane
            }
            Some(other) => {
                self.issues.add(
                    "fleet_limits.engine",
                    format!("unknown engine {other:?}, expected `redis` or `control_plane`"),
                );
                return None;
            }
        };
        Some(FleetLimitsConfig { engine, sync_interval })
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
            match crate::index::parse_cidr(s) {
                Some(net) => trusted_proxies.push(net),
                None => self.issues.add(
                    &join_index("client_ip.trusted_proxies", i),
                    format!("{s:?} is not an IP address or CIDR (e.g. 10.0.0.0/8 or ::1)"),
                ),
            }
        }
        ClientIpConfig { trusted_proxies }
    }

    fn key_locations(&mut self, raw: Option<Parsed<Vec<Parsed<RawKeyLocation>>>>) -> Vec<KeyLocation> {
        let Some(parsed) = raw else {
            return vec![
                KeyLocation::Header { name: http::header::AUTHORIZATION, scheme: Some("Bearer".to_owned()) },
                KeyLocation::Header { name: http::HeaderName::from_static("x-api-key"), scheme: None },
                KeyLocation::Query { name: "api_key".to_owned() },
            ];
        };
        let Some(items) = self.issues.take(parsed, "key_locations") else {
            return Vec::new();
        };
        if items.is_empty() {
            self.issues.add(
                "key_locations",
                "at least one key location is required (leave `key_locations` out for the defaults)",
            );
        }
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let path = join_index("key_locations", i);
            let Some(location) = self.issues.take(item, &path) else {
                continue;
            };
            match (location.header, location.query) {
                (Some(Text(header)), None) => {
                    let header_path = join_key(&path, "header");
                    let name = match http::HeaderName::from_bytes(header.trim().to_ascii_lowercase().as_bytes()) {
                        Ok(name) => Some(name),
                        Err(_) => {
                            self.issues.add(&header_path, format!("{header:?} is not a valid header name"));
                            None
                        }
                    };
                    let scheme = location.scheme.and_then(|Text(scheme)| {
                        let scheme = scheme.trim().to_owned();
                        if scheme.is_empty() || !scheme.bytes().all(is_token_byte) {
                            self.issues.add(
                                &join_key(&path, "scheme"),
                                format!("{scheme:?} is not a valid auth scheme (one word, like Bearer)"),
                            );
                            None
                        } else {
                            Some(scheme)
                        }
                    });
                    if let Some(name) = name {
                        out.push(KeyLocation::Header { name, scheme });
                    }
                }
                (None, Some(Text(query))) => {
                    if location.scheme.is_some() {
                        self.issues.add(&join_key(&path, "scheme"), "`scheme` applies to `header` locations only");
                    }
                    let query = query.trim().to_owned();
                    if query.is_empty() || query.contains(['&', '=', '#', '?', ' ']) {
                        self.issues
                            .add(&join_key(&path, "query"), format!("{query:?} is not a valid query parameter name"));
                    } else {
                        out.push(KeyLocation::Query { name: query });
                    }
                }
                (Some(_), Some(_)) => self.issues.add(&path, "give either `header` or `query`, not both"),
                (None, None) => {
                    self.issues.add(&path, "needs `header: <name>` (optionally with `scheme`) or `query: <name>`")
                }
            }
        }
        out
    }

    /// Also returns every declared upstream name (even of entries that failed),
    /// or None when the section itself is unreadable.
    fn upstreams(
        &mut self,
        raw: Option<Parsed<Entries<Parsed<RawUpstream>>>>,
    ) -> (BTreeMap<String, UpstreamConfig>, Option<BTreeSet<String>>) {
        let mut out = BTreeMap::new();
        let Some(parsed) = raw else {
            return (out, Some(BTreeSet::new()));
        };
        let Some(Entries(entries)) = self.issues.take(parsed, "upstreams") else {
            return (out, None);
        };
        let names = entries.iter().map(|(name, _)| name.clone()).collect();
        for (name, item) in entries {
            let path = join_key("upstreams", &name);
            if name.trim().is_empty() {
                self.issues.add(&path, "upstream names must not be empty");
            }
            let Some(upstream) = self.issues.take(item, &path) else {
                continue;
            };
            let config = self.upstream(upstream, &path);
            out.insert(name, config);
        }
        (out, Some(names))
    }

    fn upstream(&mut self, raw: RawUpstream, path: &str) -> UpstreamConfig {
        let targets_path = join_key(path, "targets");
        let mut targets = Vec::new();
        match raw.targets {
            None => self.issues.add(&targets_path, MISSING),
            Some(list) if list.is_empty() => self.issues.add(&targets_path, "at least one target is required"),
            Some(list) => {
                for (i, Text(target)) in list.into_iter().enumerate() {
                    let target_path = join_index(&targets_path, i);
                    match check_target(&target) {
                        Ok(target) if targets.contains(&target) => {
                            self.issues.add(&target_path, format!("duplicate target {target:?}"))
                        }
                        Ok(target) => targets.push(target),
                        Err(message) => self.issues.add(&target_path, message),
                    }
                }
            }
        }
        let tls_path = join_key(path, "tls");
        let tls = self.parsed(raw.tls, &tls_path).map(|tls| {
            let sni = tls.sni.and_then(|Text(sni)| {
                let sni = sni.trim().to_ascii_lowercase();
                if valid_host_name(&sni) {
                    Some(sni)
                } else {
                    self.issues.add(&join_key(&tls_path, "sni"), format!("{sni:?} is not a valid host name"));
                    None
                }
            });
            let ca = tls.ca.and_then(|ca| self.pem_file(Some(ca), &join_key(&tls_path, "ca"), Pem::Cert));
            UpstreamTlsConfig { sni, ca, verify: tls.verify.is_none_or(|raw::Flag(v)| v) }
        });
        let hc_path = join_key(path, "health_check");
        let health_check = self.parsed(raw.health_check, &hc_path).map(|hc| {
            let check_path = hc.path.map_or_else(|| "/".to_owned(), |Text(p)| p);
            if !check_path.starts_with('/') {
                self.issues.add(&join_key(&hc_path, "path"), "must start with '/'");
            }
            let mut threshold = |value: Option<raw::Num<u32>>, field: &str| match value {
                None => 1,
                Some(raw::Num(0)) => {
                    self.issues.add(&join_key(&hc_path, field), "must be at least 1");
                    1
                }
                Some(raw::Num(n)) => n,
            };
            let healthy_threshold = threshold(hc.healthy_threshold, "healthy_threshold");
            let unhealthy_threshold = threshold(hc.unhealthy_threshold, "unhealthy_threshold");
            HealthCheckConfig {
                path: check_path,
                interval: self.duration(hc.interval, &join_key(&hc_path, "interval"), Duration::from_secs(5), false),
                timeout: self.duration(hc.timeout, &join_key(&hc_path, "timeout"), Duration::from_secs(2), false),
                healthy_threshold,
                unhealthy_threshold,
            }
        });
        let connect_timeout =
            self.duration(raw.connect_timeout, &join_key(path, "connect_timeout"), Duration::from_secs(2), false);
        let read_timeout =
            self.duration(raw.read_timeout, &join_key(path, "read_timeout"), Duration::from_secs(30), false);
        UpstreamConfig { targets, tls, health_check, connect_timeout, read_timeout }
    }

    fn routes(
        &mut self,
        raw: Option<Parsed<Vec<Parsed<RawRoute>>>>,
        upstreams: Option<&BTreeSet<String>>,
    ) -> Vec<RouteConfig> {
        let items = self.parsed(raw, "routes").unwrap_or_default();
        let mut out = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.into_iter().enumerate() {
            let path = join_index("routes", i);
            let Some(route) = self.issues.take(item, &path) else {
                continue;
            };
            let name_path = join_key(&path, "name");
            let name = self.required_nonblank(route.name, &name_path);
            if let Some(name) = &name {
                if let Some(first) = names.get(name) {
                    self.issues.add(
                        &name_path,
                        format!("duplicate route name {name:?}: routes[{first}] and routes[{i}] both use it"),
                    );
                } else {
                    names.insert(name.clone(), i);
                }
            }
            let match_path = join_key(&path, "match");
            let matcher = match route.matcher {
                None => Some(RouteMatch { path_prefix: "/".to_owned(), methods: Vec::new(), host: None }),
                Some(p) => self.issues.take(p, &match_path).map(|m| self.route_match(m, &match_path)),
            };
            let upstream_path = join_key(&path, "upstream");
            let upstream = self.required_nonblank(route.upstream, &upstream_path);
            if let (Some(upstream), Some(known)) = (&upstream, upstreams) {
                if !known.contains(upstream) {
                    self.issues
                        .add(&upstream_path, format!("unknown upstream {upstream:?} (not defined under `upstreams`)"));
                }
            }
            let auth = match route.auth {
                None | Some(RawRouteAuth::Key) => RouteAuth::Key,
                Some(RawRouteAuth::None) => RouteAuth::None,
            };
            let scopes_path = join_key(&path, "scopes");
            let mut scopes = Vec::new();
            for (j, Text(scope)) in route.scopes.unwrap_or_default().into_iter().enumerate() {
                if scope.is_empty() || scope.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    self.issues.add(
                        &join_index(&scopes_path, j),
                        format!("{scope:?} is not a valid scope (non-empty, no spaces)"),
                    );
                } else {
                    scopes.push(scope);
                }
            }
            if auth == RouteAuth::None && !scopes.is_empty() {
                self.issues.add(
                    &scopes_path,
                    "a route with `auth: none` checks no key, so its scopes would be ignored: remove them or use `auth: key`",
                );
            }
            let set_headers = self.set_headers(route.set_headers, &join_key(&path, "set_headers"));
            if let (Some(name), Some(matcher), Some(upstream)) = (name, matcher, upstream) {
                out.push(RouteConfig { name, matcher, upstream, auth, scopes, set_headers });
            }
        }
        out
    }

    fn route_match(&mut self, raw: raw::RawRouteMatch, path: &str) -> RouteMatch {
        let prefix_path = join_key(path, "path_prefix");
        let path_prefix = raw.path_prefix.map_or_else(|| "/".to_owned(), |Text(p)| p);
        if !path_prefix.starts_with('/') {
            self.issues.add(&prefix_path, "must start with '/'");
        } else if path_prefix.contains(['?', '#']) {
            self.issues.add(&prefix_path, "matches the path only: it cannot contain '?' or '#'");
        } else if path_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.issues.add(&prefix_path, "must not contain spaces or control characters");
        }
        let mut methods: Vec<http::Method> = Vec::new();
        for (i, Text(m)) in raw.methods.unwrap_or_default().into_iter().enumerate() {
            match parse_method(&m) {
                Ok(method) => {
                    if !methods.contains(&method) {
                        methods.push(method);
                    }
                }
                Err(message) => self.issues.add(&join_index(&join_key(path, "methods"), i), message),
            }
        }
        let host = raw.host.and_then(|Text(host)| {
            let host = host.trim().to_ascii_lowercase();
            let host_path = join_key(path, "host");
            if host.contains(':') {
                self.issues.add(&host_path, format!("{host:?}: match the host name without a port"));
                None
            } else if !valid_host_name(&host) {
                self.issues.add(&host_path, format!("{host:?} is not a valid host name"));
                None
            } else {
                Some(host)
            }
        });
        RouteMatch { path_prefix, methods, host }
    }

    fn set_headers(&mut self, raw: Option<Entries<Text>>, path: &str) -> Vec<(http::HeaderName, http::HeaderValue)> {
        // Headers that frame the message or the connection: overriding them
        // would corrupt the proxied exchange.
        const FORBIDDEN: &[&str] = &[
            "connection",
            "content-length",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ];
        self.header_list(raw, path, FORBIDDEN, "is managed by the proxy")
    }

    /// Header names and values from config, minus those in `forbidden` (refused as `{name} {why}`).
    fn header_list(
        &mut self,
        raw: Option<Entries<Text>>,
        path: &str,
        forbidden: &[&str],
        why: &str,
    ) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let mut out: Vec<(http::HeaderName, http::HeaderValue)> = Vec::new();
        for (raw_name, Text(value)) in raw.map(|e| e.0).unwrap_or_default() {
            let header_path = join_key(path, &raw_name);
            let name = match http::HeaderName::from_bytes(raw_name.to_ascii_lowercase().as_bytes()) {
                Ok(name) => name,
                Err(_) => {
                    self.issues.add(&header_path, format!("{raw_name:?} is not a valid header name"));
                    continue;
                }
            };
            if forbidden.contains(&name.as_str()) {
                self.issues.add(&header_path, format!("{name} {why} and cannot be set"));
                continue;
            }
            if out.iter().any(|(n, _)| *n == name) {
                self.issues.add(&header_path, format!("header {name} is set twice (names are case-insensitive)"));
                continue;
            }
            // The value is likely a secret: the message must not echo it.
            match http::HeaderValue::from_str(&value) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    out.push((name, value));
                }
                Err(_) => self.issues.add(
                    &header_path,
                    "invalid header value: only visible ASCII characters, spaces and tabs are allowed",
                ),
            }
        }
        out
    }

    fn plans(
        &mut self,
        raw: Option<Parsed<Entries<Parsed<RawPlan>>>>,
    ) -> (BTreeMap<String, PlanConfig>, Option<BTreeSet<String>>) {
        let mut out = BTreeMap::new();
        let Some(parsed) = raw else {
            return (out, Some(BTreeSet::new()));
        };
        let Some(Entries(entries)) = self.issues.take(parsed, "plans") else {
            return (out, None);
        };
        let names = entries.iter().map(|(name, _)| name.clone()).collect();
        for (name, item) in entries {
            let path = join_key("plans", &name);
            if name.trim().is_empty() {
                self.issues.add(&path, "plan names must not be empty");
            }
            let Some(plan) = self.issues.take(item, &path) else {
                continue;
            };
            let rl_path = join_key(&path, "rate_limit");
            let rate_limit = self.parsed(plan.rate_limit, &rl_path).and_then(|rl| self.collect(rl.validate(&rl_path)));
            let quota_path = join_key(&path, "quota");
            let quota = self.parsed(plan.quota, &quota_path).and_then(|q| self.collect(q.validate(&quota_path)));
            out.insert(name, PlanConfig { rate_limit, quota });
        }
        (out, Some(names))
    }

    fn collect<T>(&mut self, result: Result<T, Vec<(String, String)>>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(errors) => {
                for (path, message) in errors {
                    self.issues.add(&path, message);
                }
                None
            }
        }
    }

    fn default_plan(&mut self, raw: Option<Parsed<Text>>, plans: Option<&BTreeSet<String>>) -> Option<String> {
        let Text(name) = self.parsed(raw, "default_plan")?;
        if plans.is_some_and(|plans| !plans.contains(&name)) {
            self.issues.add("default_plan", format!("unknown plan {name:?} (not defined under `plans`)"));
        }
        Some(name)
    }

    fn usage(&mut self, raw: Option<Parsed<RawUsage>>, mode: Option<Mode>, keys: Option<&KeysConfig>) -> UsageConfig {
        let usage = self.parsed(raw, "usage");
        let (flush_interval, spool, sinks, retention) = match usage {
            Some(u) => (u.flush_interval, u.spool, u.sinks, u.retention),
            None => (None, None, None, None),
        };
        let flush_interval = self.duration(flush_interval, "usage.flush_interval", Duration::from_secs(5), false);
        let spool = self.optional_path(spool, "usage.spool");
        let retention = self.retention(retention, mode);
        let Some(sinks) = sinks else {
            let sinks = if mode.unwrap_or_default() == Mode::Standalone { vec![SinkConfig::Store] } else { Vec::new() };
            return UsageConfig { flush_interval, spool, sinks, retention };
        };
        let mut out: Vec<SinkConfig> = Vec::new();
        for (i, item) in sinks.into_iter().enumerate() {
            let path = join_index("usage.sinks", i);
            let Some(sink) = self.issues.take(item, &path) else {
                continue;
            };
            if let Some(sink) = self.sink(sink, &path, mode, keys) {
                if let Some(j) = out.iter().position(|s| *s == sink) {
                    self.issues
                        .add(&path, format!("same sink as an earlier entry (index {j}): usage would be counted twice"));
                } else {
                    out.push(sink);
                }
            }
        }
        UsageConfig { flush_interval, spool, sinks: out, retention }
    }

    /// `usage.retention`: each age at least the finer one's, so a rollup never
    /// reaches buckets younger than those it rolls up into.
    fn retention(&mut self, raw: Option<Parsed<RawRetention>>, mode: Option<Mode>) -> UsageRetention {
        let defaults = UsageRetention::default();
        let Some(raw) = self.parsed(raw, "usage.retention") else {
            return defaults;
        };
        if mode == Some(Mode::Gateway) {
            self.issues.add(
                "usage.retention",
                "a gateway has no store: retention applies where usage is stored (standalone or control-plane)",
            );
            return defaults;
        }
        let issues_before = self.issues.list.len();
        let minute = self.duration(raw.minute, "usage.retention.minute", defaults.minute, false);
        let hour = self.duration(raw.hour, "usage.retention.hour", defaults.hour, false);
        let day = self.duration(raw.day, "usage.retention.day", defaults.day, false);
        if self.issues.list.len() > issues_before {
            // Comparing against a default put in for a bad value would only confuse.
            return UsageRetention { minute, hour, day };
        }
        let shown = format_duration;
        if minute < UsageRetention::MIN_MINUTE {
            self.issues.add(
                "usage.retention.minute",
                format!(
                    "must be at least {}: minutes are rolled up a whole hour at a time",
                    shown(UsageRetention::MIN_MINUTE)
                ),
            );
        }
        if hour < minute {
            self.issues
                .add("usage.retention.hour", format!("must be at least usage.retention.minute ({})", shown(minute)));
        }
        if day < hour {
            self.issues.add("usage.retention.day", format!("must be at least usage.retention.hour ({})", shown(hour)));
        } else if day < UsageRetention::MIN_DAY {
            self.issues.add(
                "usage.retention.day",
                format!(
                    "must be at least {}: monthly quotas count the usage stored since the first of the month",
                    shown(UsageRetention::MIN_DAY)
                ),
            );
        }
        UsageRetention { minute, hour, day }
    }

    fn sink(&mut self, raw: RawSink, path: &str, mode: Option<Mode>, keys: Option<&KeysConfig>) -> Option<SinkConfig> {
        let type_path = join_key(path, "type");
        let kind = self.required(raw.kind.clone(), &type_path)?;
        // Which sink types take each optional field.
        let fields: [(&str, bool, &[&str]); 7] = [
            ("path", raw.path.is_some(), &["file"]),
            ("url", raw.url.is_some(), &["http", "nats"]),
            ("format", raw.format.is_some(), &["http"]),
            ("batch_size", raw.batch_size.is_some(), &["http"]),
            ("secret", raw.secret.is_some(), &["http"]),
            ("headers", raw.headers.is_some(), &["http"]),
            ("subject", raw.subject.is_some(), &["nats"]),
        ];
        let known = ["store", "control_plane", "file", "http", "nats"].contains(&kind.as_str());
        for (field, present, takers) in fields {
            if present && known && !takers.contains(&kind.as_str()) {
                let takers = takers.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(" or ");
                self.issues.add(&join_key(path, field), format!("only a sink of type {takers} takes `{field}`"));
            }
        }
        match kind.as_str() {
            "store" => {
                if mode == Some(Mode::Gateway) {
                    self.issues.add(&type_path, "a gateway has no store: use { type: control_plane } or a file sink");
                }
                Some(SinkConfig::Store)
            }
            "control_plane" => {
                if mode.is_some_and(|m| m != Mode::Gateway) {
                    self.issues.add(&type_path, "only gateways send usage to a control plane: use { type: store }");
                } else if keys.is_some_and(|k| k.control_plane.is_none())
                    && !self.issues.list.iter().any(|i| i.path.starts_with("keys.control_plane"))
                {
                    self.issues.add(&type_path, "needs keys.control_plane, the control plane to send usage to");
                }
                Some(SinkConfig::ControlPlane)
            }
            "file" => {
                let file = self.required_nonblank(raw.path, &join_key(path, "path"))?;
                Some(SinkConfig::File { path: PathBuf::from(file) })
            }
            "http" => self.http_sink(raw, path).map(SinkConfig::Http),
            "nats" => self.nats_sink(raw, path).map(SinkConfig::Nats),
            other => {
                self.issues.add(
                    &type_path,
                    format!("unknown sink type {other:?}, expected `store`, `control_plane`, `file`, `http` or `nats`"),
                );
                None
            }
        }
    }

    fn http_sink(&mut self, raw: RawSink, path: &str) -> Option<HttpSinkConfig> {
        /// Headers the sink writes itself: the body's framing and type, and the signature.
        const SET_BY_THE_SINK: &[&str] = &[
            "connection",
            "content-length",
            "content-type",
            "host",
            "transfer-encoding",
            "webhook-id",
            "webhook-signature",
            "webhook-timestamp",
        ];
        let url_path = join_key(path, "url");
        let url = self.required_nonblank(raw.url, &url_path).filter(|url| self.check_http_url(url, &url_path));
        let format_path = join_key(path, "format");
        let format = match raw.format {
            Some(Text(f)) if f == "cloudevents" => Some(EventFormat::CloudEvents),
            Some(Text(other)) => {
                self.issues.add(&format_path, format!("unknown format {other:?}, expected `cloudevents`"));
                None
            }
            None => {
                self.issues.add(&format_path, format!("{MISSING}: the only format is `cloudevents`"));
                None
            }
        };
        let batch_size = match raw.batch_size {
            None => DEFAULT_SINK_BATCH_SIZE,
            Some(raw::Num(n)) if (1..=MAX_SINK_BATCH_SIZE as u32).contains(&n) => n as usize,
            Some(raw::Num(n)) => {
                self.issues.add(
                    &join_key(path, "batch_size"),
                    format!("must be between 1 and {MAX_SINK_BATCH_SIZE}, found {n}"),
                );
                DEFAULT_SINK_BATCH_SIZE
            }
        };
        let secret = raw.secret.and_then(|secret| self.signing_secret(Some(secret), &join_key(path, "secret")));
        let headers = self.header_list(raw.headers, &join_key(path, "headers"), SET_BY_THE_SINK, "is set by the sink");
        Some(HttpSinkConfig { url: url?, format: format?, batch_size, secret, headers })
    }

    fn nats_sink(&mut self, raw: RawSink, path: &str) -> Option<NatsSinkConfig> {
        let url_path = join_key(path, "url");
        let url = self.required_nonblank(raw.url, &url_path).filter(|url| {
            let ok = (url.starts_with("nats://") || url.starts_with("tls://"))
                && url.parse::<http::Uri>().ok().and_then(|u| u.host().map(|h| !h.is_empty())).unwrap_or(false);
            if !ok {
                self.issues.add(&url_path, format!("expected a nats:// or tls:// URL with a host, found {url:?}"));
            }
            ok
        });
        let subject_path = join_key(path, "subject");
        let subject = self.required_nonblank(raw.subject, &subject_path).filter(|subject| {
            let tokens_ok = subject.split('.').all(|token| !token.is_empty() && token != "*" && token != ">");
            let ok = tokens_ok && !subject.chars().any(char::is_whitespace);
            if !ok {
                self.issues.add(
                    &subject_path,
                    format!("{subject:?} is not a subject to publish to: dot-separated names, no spaces, no wildcards"),
                );
            }
            ok
        });
        Some(NatsSinkConfig { url: url?, subject: subject? })
    }

    fn http(&mut self, raw: Option<Parsed<RawHttp>>, key_locations: &[KeyLocation]) -> HttpConfig {
        let defaults = HttpConfig::default();
        let Some(raw) = self.parsed(raw, "http") else {
            return defaults;
        };
        let mut timeout = |text: Option<Text>, field: &str, default: Duration| {
            let path = join_key("http", field);
            let value = self.duration(text, &path, default, false);
            if value > super::MAX_HTTP_TIMEOUT {
                self.issues.add(&path, "must be at most 24h");
                return default;
            }
            value
        };
        let request_header_timeout =
            timeout(raw.request_header_timeout, "request_header_timeout", defaults.request_header_timeout);
        let idle_timeout = timeout(raw.idle_timeout, "idle_timeout", defaults.idle_timeout);
        let max_connections = match raw.max_connections {
            None => defaults.max_connections,
            Some(raw::Num(0)) => {
                self.issues.add("http.max_connections", "must be at least 1");
                defaults.max_connections
            }
            Some(raw::Num(n)) => n,
        };
        let mut choice = |text: Option<Text>, field: &str, options: &[&str]| -> Option<usize> {
            let Text(value) = text?;
            let found = options.iter().position(|o| *o == value.trim());
            if found.is_none() {
                let expected = options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ");
                self.issues.add(&join_key("http", field), format!("{value:?} is not one of {expected}"));
            }
            found
        };
        let escaped_slashes = match choice(raw.escaped_slashes, "escaped_slashes", &["reject", "pass"]) {
            Some(1) => EscapedSlashes::Pass,
            _ => EscapedSlashes::Reject,
        };
        let underscore_headers = match choice(raw.underscore_headers, "underscore_headers", &["drop", "reject", "pass"])
        {
            Some(1) => UnderscoreHeaders::Reject,
            Some(2) => UnderscoreHeaders::Pass,
            _ => UnderscoreHeaders::Drop,
        };
        if underscore_headers == UnderscoreHeaders::Reject {
            for (i, location) in key_locations.iter().enumerate() {
                if let KeyLocation::Header { name, .. } = location {
                    if name.as_str().contains('_') {
                        self.issues.add(
                            &join_key(&join_index("key_locations", i), "header"),
                            format!("{name:?} has '_', and http.underscore_headers: reject refuses every such request"),
                        );
                    }
                }
            }
        }
        HttpConfig { request_header_timeout, idle_timeout, max_connections, escaped_slashes, underscore_headers }
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

impl RawRateLimit {
    /// Checks the values and builds the typed limit; errors carry paths under
    /// `path` (pass "" for bare field names). A limit the rate limiter cannot
    /// enforce as written is refused, naming the field to change.
    pub fn validate(&self, path: &str) -> Result<RateLimitConfig, Vec<(String, String)>> {
        let limit = self.validate_form(path)?;
        crate::limit::check_rate_limit(&limit).map_err(|e| vec![(join_key(path, e.field()), e.to_string())])?;
        Ok(limit)
    }

    /// Only the checks that earlier versions made, for limits read back from a
    /// store or a sync feed: refusing one there would fail the whole key set,
    /// and the limiter clamps what it cannot enforce.
    pub(crate) fn validate_form(&self, path: &str) -> Result<RateLimitConfig, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let requests = match self.requests {
            None => {
                errors.push((join_key(path, "requests"), MISSING.to_owned()));
                0
            }
            Some(raw::Num(0)) => {
                errors.push((join_key(path, "requests"), "must be at least 1".to_owned()));
                0
            }
            Some(raw::Num(n)) => n,
        };
        let per = required_duration(self.per.as_ref(), &join_key(path, "per"), &mut errors);
        if self.burst == Some(raw::Num(0)) {
            errors.push((join_key(path, "burst"), "must be at least 1 when given".to_owned()));
        }
        let by = limit_scope(self.by.as_ref(), &join_key(path, "by"), &mut errors);
        if errors.is_empty() {
            Ok(RateLimitConfig { requests, per, burst: self.burst.map(|raw::Num(b)| b), by })
        } else {
            Err(errors)
        }
    }
}

impl RawQuota {
    /// Checks the values and builds the typed quota; errors carry paths under
    /// `path` (pass "" for bare field names). A quota the counters cannot keep
    /// is refused, naming the field to change.
    pub fn validate(&self, path: &str) -> Result<QuotaConfig, Vec<(String, String)>> {
        let quota = self.validate_form(path)?;
        crate::limit::check_quota(&quota).map_err(|e| vec![(join_key(path, e.field()), e.to_string())])?;
        Ok(quota)
    }

    /// Only the checks that earlier versions made (see `RawRateLimit::validate_form`).
    pub(crate) fn validate_form(&self, path: &str) -> Result<QuotaConfig, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let requests = match self.requests {
            None => {
                errors.push((join_key(path, "requests"), MISSING.to_owned()));
                0
            }
            Some(raw::Num(0)) => {
                errors.push((join_key(path, "requests"), "must be at least 1".to_owned()));
                0
            }
            Some(raw::Num(n)) => n,
        };
        let per_path = join_key(path, "per");
        let per = match self.per.as_ref().map(|Text(p)| p.trim()) {
            Some("day") => Some(QuotaPeriod::Day),
            Some("month") => Some(QuotaPeriod::Month),
            Some(other) => {
                errors.push((per_path, format!("unknown quota period {other:?}, expected `day` or `month`")));
                None
            }
            None => {
                errors.push((per_path, MISSING.to_owned()));
                None
            }
        };
        let by = limit_scope(self.by.as_ref(), &join_key(path, "by"), &mut errors);
        match per {
            Some(per) if errors.is_empty() => Ok(QuotaConfig { requests, per, by }),
            _ => Err(errors),
        }
    }
}

/// `by: key | owner`; absent means `key`.
fn limit_scope(text: Option<&Text>, path: &str, errors: &mut Vec<(String, String)>) -> LimitScope {
    match text.map(|Text(t)| t.trim()) {
        None | Some("key") => LimitScope::Key,
        Some("owner") => LimitScope::Owner,
        Some(other) => {
            errors.push((path.to_owned(), format!("unknown limit scope {other:?}, expected `key` or `owner`")));
            LimitScope::Key
        }
    }
}

fn required_duration(text: Option<&Text>, path: &str, errors: &mut Vec<(String, String)>) -> Duration {
    match text.map(|Text(s)| parse_duration(s)) {
        None => errors.push((path.to_owned(), MISSING.to_owned())),
        Some(Err(e)) => errors.push((path.to_owned(), e.to_string())),
        Some(Ok(d)) if d.is_zero() => errors.push((path.to_owned(), "must be greater than 0".to_owned())),
        Some(Ok(d)) => return d,
    }
    Duration::ZERO
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

/// Standard methods plus the IANA registry's extension methods (WebDAV and
/// friends) and PURGE; anything else is far likelier a typo than intended.
const METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "ACL",
    "BASELINE-CONTROL",
    "BIND",
    "CHECKIN",
    "CHECKOUT",
    "COPY",
    "LABEL",
    "LINK",
    "LOCK",
    "MERGE",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKCOL",
    "MKREDIRECTREF",
    "MKWORKSPACE",
    "MOVE",
    "ORDERPATCH",
    "PROPFIND",
    "PROPPATCH",
    "PURGE",
    "QUERY",
    "REBIND",
    "REPORT",
    "SEARCH",
    "UNBIND",
    "UNCHECKOUT",
    "UNLINK",
    "UNLOCK",
    "UPDATE",
    "UPDATEREDIRECTREF",
    "VERSION-CONTROL",
];

fn parse_method(s: &str) -> Result<http::Method, String> {
    let name = s.trim();
    if METHODS.contains(&name) {
        return http::Method::from_bytes(name.as_bytes()).map_err(|_| format!("unknown HTTP method {s:?}"));
    }
    let upper = name.to_ascii_uppercase();
    if METHODS.contains(&upper.as_str()) {
        return Err(format!("HTTP methods are case-sensitive: write {upper:?}, not {s:?}"));
    }
    Err(format!("unknown HTTP method {s:?}"))
}

/// `host:port` with a required port; hosts may be names (resolved elsewhere)
/// or IP addresses, IPv6 in brackets.
fn check_target(s: &str) -> Result<String, String> {
    let target = s.trim();
    if target.contains("://") {
        return Err(format!("{s:?}: targets are host:port without a scheme (use `tls:` for HTTPS)"));
    }
    let port = if let Some(rest) = target.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(|| format!("{s:?}: missing ']' after the IPv6 address"))?;
        ip.parse::<Ipv6Addr>().map_err(|_| format!("{s:?}: {ip:?} is not an IPv6 address"))?;
        after.strip_prefix(':').ok_or_else(|| format!("{s:?} has no port; write [addr]:port"))?
    } else {
        let (host, port) =
            target.rsplit_once(':').ok_or_else(|| format!("{s:?} has no port; write host:port, e.g. 10.0.1.5:8000"))?;
        if host.contains(':') {
            return Err(format!("{s:?}: write IPv6 addresses in brackets, e.g. [::1]:8000"));
        }
        if !valid_host_name(host) {
            return Err(format!("{s:?}: {host:?} is not a valid host name or IP address"));
        }
        port
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(target.to_owned()),
        _ => Err(format!("{s:?}: the port must be a number from 1 to 65535")),
    }
}

/// DNS-style names (also IPv4 literals): dot-separated labels of letters,
/// digits, '-' and '_', none empty.
fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// RFC 9110 token characters.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
