//! Tests of the whole pipeline: text in, `Config` or every error out.
//!
//! Long because the config file is long: one file for the one entry point
//! (`from_str`), every test through the same helpers (`ok`, `errors`, `error_at`).

use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "config/keygate.yaml";

fn env(name: &str) -> Option<String> {
    match name {
        "KEYGATE_SYNC_TOKEN" => Some("sync-secret".to_owned()),
        "ORDERS_UPSTREAM_TOKEN" => Some("upstream-secret".to_owned()),
        "ADMIN_TOKEN" => Some("admin-secret".to_owned()),
        "HOST" => Some("cp.internal".to_owned()),
        "PORT" => Some("9090".to_owned()),
        "THREADS" => Some("3".to_owned()),
        "KEYGATE_WEBHOOK_SECRET" => Some("whsec_aGk=".to_owned()),
        _ => None,
    }
}

fn parse(yaml: &str) -> Result<Config, ConfigErrors> {
    from_str_with_env(yaml, Path::new(FILE), &env)
}

fn ok(yaml: &str) -> Config {
    match parse(yaml) {
        Ok(config) => config,
        Err(errors) => panic!("config should load, got:\n{errors}"),
    }
}

fn errors(yaml: &str) -> Vec<ConfigError> {
    match parse(yaml) {
        Ok(config) => panic!("config should be refused, got {config:?}"),
        Err(errors) => {
            assert!(!errors.is_empty());
            errors.0
        }
    }
}

/// The error at `path` whose message contains `needle`.
fn error_at(yaml: &str, path: &str, needle: &str) -> ConfigError {
    let all = errors(yaml);
    match all.iter().find(|e| e.path == path && e.message.contains(needle)) {
        Some(e) => e.clone(),
        None => panic!("no error at {path:?} containing {needle:?}; got:\n{}", ConfigErrors(all)),
    }
}

/// A gateway following a control plane.
const GATEWAY_FOLLOWING: &str = "\
mode: gateway
keys: { control_plane: { url: \"http://cp.internal:9090\", token: t } }
upstreams:
  api: { targets: [\"127.0.0.1:8000\"] }
routes:
  - name: all
    upstream: api
";

/// A gateway that needs no files: the base for rule tests.
const GATEWAY: &str = "\
mode: gateway
keys: { source: file, file: keys.yaml }
upstreams:
  api: { targets: [\"127.0.0.1:8000\"] }
routes:
  - name: all
    upstream: api
";

/// The contract's example, verbatim (CONTRACT.md §3).
const CONTRACT_EXAMPLE: &str = r#"mode: standalone                  # standalone | gateway | control-plane
node_id: gw-1                     # default: the host name
threads: 2                        # proxy worker threads (default: the number of CPUs)
listeners:
  - address: 0.0.0.0:8080
  - address: 0.0.0.0:8443
    tls: { cert: /etc/keygate/tls/cert.pem, key: /etc/keygate/tls/key.pem }
admin:
  address: 127.0.0.1:9090         # admin API, /healthz, /readyz, /metrics
  tokens:                         # admin bearer tokens (store them as sha256:... hashes or ${env:...})
    - { name: ops, hash: "sha256:..." }                 # role: admin (default) | read
    - { name: dashboard, hash: "sha256:...", role: read }
  sync_tokens:                    # tokens that gateways use for the sync feed and usage upload
    - { name: edge, hash: "sha256:..." }
store:
  url: sqlite://data/keygate.db   # or postgres://user@host:5432/db
keys:
  source: store                   # store (standalone) | control_plane | file
  control_plane: { url: "http://cp.internal:9090", token: "${env:KEYGATE_SYNC_TOKEN}" }
  file: config/keys.yaml
  cache_file: data/keys.snapshot  # last-known-good snapshot, used when the control plane is down at start
  max_staleness: 0s               # 0s: serve the last-known-good forever; else 503 not_ready after this long without a sync
client_ip:
  trusted_proxies: [10.0.0.0/8]   # X-Forwarded-For is believed only from these peers
key_locations:                    # where a key may be presented, tried in this order
  - { header: authorization, scheme: Bearer }
  - { header: x-api-key }
  - { query: api_key }
upstreams:
  orders:
    targets: ["10.0.1.5:8000", "10.0.1.6:8000"]
    tls: { sni: orders.internal }  # omit for plain HTTP
    health_check: { path: /healthz, interval: 5s }
    connect_timeout: 2s
    read_timeout: 30s
routes:                           # first match in file order wins
  - name: health
    match: { path_prefix: /healthz }
    upstream: orders
    auth: none
  - name: orders-read
    match: { path_prefix: /v1/orders, methods: [GET, HEAD], host: api.example.com }
    upstream: orders
    scopes: [orders:read]          # the key must hold every listed scope
    set_headers:                   # upstream credential injection: clients never see this secret
      authorization: "Bearer ${env:ORDERS_UPSTREAM_TOKEN}"
plans:
  free: { rate_limit: { requests: 10, per: 1s, burst: 20 }, quota: { requests: 10000, per: month } }
  pro:  { rate_limit: { requests: 1000, per: 1s } }
default_plan: free
webhooks:                         # control-plane and standalone nodes
  - url: https://hooks.example.com/keygate
    secret: "${env:KEYGATE_WEBHOOK_SECRET}"
    events: [key.created, key.revoked, key.expiring, quota.threshold]   # absent: every event
    expiring_lead: 7d
usage:
  flush_interval: 5s
  sinks:
    - { type: store }              # standalone; gateways use { type: control_plane }
    - { type: file, path: data/usage.jsonl }
access_log: { path: stdout }       # JSON lines to stdout or a file path; `access_log: off` disables it
"#;

const OPS_HASH: &str = "sha256:8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4";
const EDGE_HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

struct TlsDir {
    dir: tempfile::TempDir,
}

impl TlsDir {
    fn new() -> TlsDir {
        let dir = tempfile::tempdir().unwrap();
        // The config checks for PEM blocks only; the key material is checked when serving.
        std::fs::write(dir.path().join("cert.pem"), "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
            .unwrap();
        std::fs::write(
            dir.path().join("key.pem"),
            "-----BEGIN EC PRIVATE KEY-----\nMHcC\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        TlsDir { dir }
    }

    fn cert(&self) -> String {
        self.dir.path().join("cert.pem").display().to_string()
    }

    fn key(&self) -> String {
        self.dir.path().join("key.pem").display().to_string()
    }
}

/// The example with its placeholders made real: the `sha256:...` hashes and
/// the TLS files under /etc, which a test machine does not have.
fn contract_example(tls: &TlsDir) -> String {
    CONTRACT_EXAMPLE
        .replacen("\"sha256:...\" }", &format!("\"{OPS_HASH}\" }}"), 1)
        .replacen("\"sha256:...\", role", &format!("\"{EDGE_HASH}\", role"), 1)
        .replacen("\"sha256:...\" }", &format!("\"{EDGE_HASH}\" }}"), 1)
        .replace("/etc/keygate/tls/cert.pem", &tls.cert())
        .replace("/etc/keygate/tls/key.pem", &tls.key())
}

#[test]
fn contract_example_loads() {
    let tls = TlsDir::new();
    let config = ok(&contract_example(&tls));
    assert_eq!(config.mode, Mode::Standalone);
    assert_eq!(config.node_id, "gw-1");
    assert_eq!(config.threads, 2);
    assert_eq!(config.listeners.len(), 2);
    assert_eq!(config.listeners[0].address.to_string(), "0.0.0.0:8080");
    assert_eq!(config.listeners[0].tls, None);
    assert_eq!(config.listeners[1].tls, Some(TlsFiles { cert: tls.cert().into(), key: tls.key().into() }));
    assert_eq!(config.admin.address.to_string(), "127.0.0.1:9090");
    assert_eq!(config.admin.tokens[0].name, "ops");
    assert_eq!(hex::encode(config.admin.tokens[0].sha256), OPS_HASH.trim_start_matches("sha256:"));
    assert_eq!(config.admin.tokens[0].role, TokenRole::Admin);
    assert_eq!((config.admin.tokens[1].name.as_str(), config.admin.tokens[1].role), ("dashboard", TokenRole::Read));
    assert_eq!(config.admin.sync_tokens[0].name, "edge");
    assert_eq!(config.store.url, "sqlite://data/keygate.db");
    assert_eq!(config.keys.source, KeySource::Store);
    let cp = config.keys.control_plane.as_ref().unwrap();
    assert_eq!(cp.url, "http://cp.internal:9090");
    assert_eq!(cp.token, "sync-secret");
    assert_eq!(config.keys.file.as_deref(), Some(Path::new("config/keys.yaml")));
    assert_eq!(config.keys.cache_file.as_deref(), Some(Path::new("data/keys.snapshot")));
    assert_eq!(config.keys.max_staleness, Duration::ZERO);
    assert_eq!(config.client_ip.trusted_proxies, vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]);
    assert_eq!(config.key_locations.len(), 3);
    let orders = &config.upstreams["orders"];
    assert_eq!(orders.targets, vec!["10.0.1.5:8000", "10.0.1.6:8000"]);
    assert_eq!(orders.tls, Some(UpstreamTlsConfig { sni: Some("orders.internal".to_owned()), ca: None, verify: true }));
    let hc = orders.health_check.as_ref().unwrap();
    assert_eq!(hc.path, "/healthz");
    assert_eq!(hc.interval, Duration::from_secs(5));
    assert_eq!(orders.connect_timeout, Duration::from_secs(2));
    assert_eq!(orders.read_timeout, Duration::from_secs(30));
    assert_eq!(config.routes.len(), 2);
    assert_eq!(config.routes[0].name, "health");
    assert_eq!(config.routes[0].auth, RouteAuth::None);
    assert_eq!(config.routes[0].matcher.path_prefix, "/healthz");
    let read = &config.routes[1];
    assert_eq!(read.auth, RouteAuth::Key);
    assert_eq!(read.matcher.methods, vec![http::Method::GET, http::Method::HEAD]);
    assert_eq!(read.matcher.host.as_deref(), Some("api.example.com"));
    assert_eq!(read.scopes, vec!["orders:read"]);
    assert_eq!(read.set_headers[0].0, http::header::AUTHORIZATION);
    assert_eq!(read.set_headers[0].1, "Bearer upstream-secret");
    assert_eq!(
        config.plans["free"],
        PlanConfig {
            rate_limit: Some(RateLimitConfig {
                requests: 10,
                per: Duration::from_secs(1),
                burst: Some(20),
                by: LimitScope::Key
            }),
            quota: Some(QuotaConfig { requests: 10_000, per: QuotaPeriod::Month, by: LimitScope::Key }),
        }
    );
    assert_eq!(config.plans["pro"].rate_limit.unwrap().burst, None);
    assert_eq!(config.default_plan.as_deref(), Some("free"));
    assert_eq!(config.usage.flush_interval, Duration::from_secs(5));
    assert_eq!(config.usage.sinks, vec![SinkConfig::Store, SinkConfig::File { path: "data/usage.jsonl".into() }]);
    let hook = &config.webhooks[0];
    assert_eq!((hook.url.as_str(), hook.secret.as_str()), ("https://hooks.example.com/keygate", "whsec_aGk="));
    assert_eq!(hook.expiring_lead, Duration::from_secs(7 * 86_400));
    assert!(hook.wants("key.revoked") && hook.wants("quota.threshold") && !hook.wants("key.updated"));
    assert!(!format!("{config:?}").contains("whsec_aGk="), "the secret must not show in Debug");
    assert_eq!(config.access_log, AccessLogConfig::Stdout);
}

#[test]
fn contract_example_placeholders_are_reported_not_accepted() {
    // The example's literal `sha256:...` is a placeholder, not a hash.
    let e = errors(CONTRACT_EXAMPLE);
    assert!(e.iter().any(|e| e.path == "admin.tokens[0].hash" && e.line == Some(11)));
    assert!(e.iter().any(|e| e.path == "listeners[1].tls.cert"));
}

#[test]
fn load_reads_the_file_and_the_process_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keygate.yaml");
    // A name no other test uses, so setting it cannot race with them.
    std::env::set_var("KEYGATE_CONFIG_TEST_LOAD_NODE", "from-env");
    std::fs::write(&file, "node_id: ${env:KEYGATE_CONFIG_TEST_LOAD_NODE}\n").unwrap();
    assert_eq!(load(&file).unwrap().node_id, "from-env");
    let missing = load(&dir.path().join("nope.yaml")).unwrap_err();
    assert_eq!(missing.len(), 1);
    assert!(missing.0[0].message.contains("cannot read"));
    assert!(missing.to_string().starts_with(&dir.path().display().to_string()));
}

#[test]
fn minimal_gateway_fills_defaults() {
    let config = ok(GATEWAY);
    assert_eq!(config.mode, Mode::Gateway);
    assert!(!config.node_id.is_empty());
    assert!(config.threads >= 1);
    assert_eq!(config.listeners, vec![ListenerConfig { address: "0.0.0.0:8080".parse().unwrap(), tls: None }]);
    assert_eq!(config.admin.address.to_string(), "127.0.0.1:9090");
    assert!(config.admin.tokens.is_empty() && config.admin.sync_tokens.is_empty());
    assert_eq!(config.store.url, "sqlite://data/keygate.db");
    assert_eq!(config.keys.source, KeySource::File);
    assert_eq!(config.keys.file.as_deref(), Some(Path::new("keys.yaml")));
    assert_eq!(config.keys.max_staleness, Duration::ZERO);
    assert!(config.client_ip.trusted_proxies.is_empty());
    assert_eq!(
        config.key_locations,
        vec![
            KeyLocation::Header { name: http::header::AUTHORIZATION, scheme: Some("Bearer".to_owned()) },
            KeyLocation::Header { name: http::HeaderName::from_static("x-api-key"), scheme: None },
            KeyLocation::Query { name: "api_key".to_owned() },
        ]
    );
    let api = &config.upstreams["api"];
    assert_eq!(api.tls, None);
    assert_eq!(api.health_check, None);
    assert_eq!(api.connect_timeout, Duration::from_secs(2));
    assert_eq!(api.read_timeout, Duration::from_secs(30));
    let route = &config.routes[0];
    assert_eq!(route.matcher.path_prefix, "/");
    assert!(route.matcher.methods.is_empty());
    assert_eq!(route.matcher.host, None);
    assert_eq!(route.auth, RouteAuth::Key);
    assert!(route.scopes.is_empty() && route.set_headers.is_empty());
    assert!(config.plans.is_empty());
    assert_eq!(config.default_plan, None);
    assert_eq!(config.usage.flush_interval, Duration::from_secs(5));
    assert!(config.usage.sinks.is_empty());
    assert_eq!(config.access_log, AccessLogConfig::Stdout);
}

#[test]
fn empty_file_is_a_standalone_node_with_defaults() {
    let config = ok("");
    assert_eq!(config.mode, Mode::Standalone);
    assert_eq!(config.keys.source, KeySource::Store);
    assert_eq!(config.usage.sinks, vec![SinkConfig::Store]);
    assert!(config.routes.is_empty());
}

#[test]
fn defaults_fill_in_nested_sections() {
    let config = ok(&format!(
        "{GATEWAY}upstreams:\n  api:\n    targets: [\"a.internal:80\"]\n    tls: {{}}\n    health_check: {{}}\n"
    )
    .replacen("upstreams:\n  api: { targets: [\"127.0.0.1:8000\"] }\n", "", 1));
    let api = &config.upstreams["api"];
    assert_eq!(api.tls, Some(UpstreamTlsConfig { sni: None, ca: None, verify: true }));
    assert_eq!(
        api.health_check,
        Some(HealthCheckConfig {
            path: "/".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        })
    );
}

#[test]
fn several_errors_are_all_listed_with_their_lines() {
    let yaml = "\
mode: gateway
keys: { source: file, file: keys.yaml }
admin:
  adress: 127.0.0.1:9090
client_ip:
  trusted_proxies:
    - 10.0.0.0/8
    - 10.0.0.300/8
upstreams:
  api: { targets: [\"127.0.0.1:8000\"] }
routes:
  - name: ok
    upstream: api
  - name: bad
    upstream: missing
    match: { methods: [GET, GTE] }
";
    let all = errors(yaml);
    let summary: Vec<(&str, Option<usize>, Option<usize>)> =
        all.iter().map(|e| (e.path.as_str(), e.line, e.column)).collect();
    assert_eq!(
        summary,
        vec![
            ("admin.adress", Some(4), Some(3)),
            ("client_ip.trusted_proxies[1]", Some(8), Some(7)),
            ("routes[1].upstream", Some(15), Some(15)),
            ("routes[1].match.methods[1]", Some(16), Some(29)),
        ],
        "{}",
        ConfigErrors(all.clone())
    );
    assert!(all[0].message.contains("unknown field `adress`"));
    assert!(all[2].message.contains("unknown upstream \"missing\""));
    assert_eq!(
        all[3].to_string(),
        "config/keygate.yaml:16:29: routes[1].match.methods[1]: unknown HTTP method \"GTE\""
    );
}

#[test]
fn errors_in_sibling_list_elements_are_all_reported() {
    let yaml = format!(
        "{GATEWAY}  - name: a\n    upstream: api\n    bogus: 1\n  - name: b\n    upstream: api\n    auth: maybe\n  - name: c\n    upstream: nope\n"
    );
    let all = errors(&yaml);
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["routes[1].bogus", "routes[2].auth", "routes[3].upstream"]);
    assert_eq!(all[0].line, Some(10));
}

#[test]
fn unknown_top_level_field_is_rejected_with_path() {
    let e = error_at(&format!("{GATEWAY}listners: []\n"), "listners", "unknown field `listners`");
    assert_eq!((e.line, e.column), (Some(8), Some(1)));
    assert!(e.message.contains("`listeners`"));
}

#[test]
fn unknown_nested_field_is_rejected_with_path() {
    let yaml = GATEWAY.replace(
        "api: { targets: [\"127.0.0.1:8000\"] }",
        "api: { targets: [\"127.0.0.1:8000\"], health_check: { path: /h, intervall: 5s } }",
    );
    let e = error_at(&yaml, "upstreams.api.health_check.intervall", "unknown field");
    assert_eq!(e.line, Some(4));
    error_at(&format!("{GATEWAY}    match: {{ prefix: /x }}\n"), "routes[0].match.prefix", "unknown field `prefix`");
}

#[test]
fn yaml_syntax_error_has_line_and_column() {
    let all = errors("mode: gateway\nroutes: [\n  { name: a,\nkeys: 1\n");
    assert_eq!(all.len(), 1);
    assert!(all[0].message.starts_with("invalid YAML"), "{}", all[0]);
    assert!(all[0].line.is_some() && all[0].column.is_some());
    let tab = errors("mode: gateway\nadmin:\n\taddress: x\n");
    assert_eq!(tab[0].line, Some(3), "{}", tab[0]);
}

#[test]
fn duplicate_yaml_key_points_at_the_second_key() {
    let all = errors("mode: gateway\nadmin:\n  address: 127.0.0.1:1\n  address: 127.0.0.1:2\n");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].path, "admin.address");
    assert_eq!((all[0].line, all[0].column), (Some(4), Some(3)));
    assert!(all[0].message.contains("duplicate"));
}

#[test]
fn yaml_anchors_and_merge_keys_are_supported() {
    let yaml = "\
mode: gateway
keys: { file: k.yaml }
upstreams:
  a: &base
    targets: [\"a:80\"]
    read_timeout: 5s
  b:
    <<: *base
    targets: [\"b:80\"]
  c:
    <<: *base
    connect_timeout: 1x
";
    let all = errors(yaml);
    assert_eq!(all.len(), 1, "{}", ConfigErrors(all.clone()));
    assert_eq!(all[0].path, "upstreams.c.connect_timeout");
    assert_eq!(all[0].line, Some(12));
    let config = ok(&yaml.replace("1x", "1s"));
    assert_eq!(config.upstreams["b"].targets, vec!["b:80"]);
    assert_eq!(config.upstreams["b"].read_timeout, Duration::from_secs(5));
    assert_eq!(config.upstreams["c"].targets, vec!["a:80"]);
}

#[test]
fn top_level_must_be_a_mapping() {
    error_at("- a\n- b\n", "", "must be a mapping");
}

#[test]
fn wrong_type_for_a_section_is_reported() {
    error_at(&format!("{GATEWAY}plans: [free]\n"), "plans", "expected a mapping");
    error_at(&format!("{GATEWAY}listeners: 0.0.0.0:80\n"), "listeners", "invalid type");
}

#[test]
fn error_display_formats() {
    let with_position = ConfigError {
        file: "config/keygate.yaml".into(),
        path: "routes[1].match.methods[0]".to_owned(),
        line: Some(12),
        column: Some(5),
        message: "unknown HTTP method \"GTE\"".to_owned(),
    };
    assert_eq!(
        with_position.to_string(),
        "config/keygate.yaml:12:5: routes[1].match.methods[0]: unknown HTTP method \"GTE\""
    );
    let without = ConfigError { line: None, column: None, ..with_position.clone() };
    assert_eq!(without.to_string(), "config/keygate.yaml: routes[1].match.methods[0]: unknown HTTP method \"GTE\"");
    let both = ConfigErrors(vec![with_position, without]);
    assert_eq!(both.to_string().lines().count(), 2);
}

// ---- environment interpolation ----

#[test]
fn env_variables_are_interpolated_in_any_string() {
    let config = ok(&format!(
        "{GATEWAY}    set_headers:\n      x-auth: \"${{env:ADMIN_TOKEN}}:${{env:ORDERS_UPSTREAM_TOKEN}}\"\nadmin:\n  address: \"127.0.0.1:${{env:PORT}}\"\nthreads: ${{env:THREADS}}\n"
    ));
    assert_eq!(config.routes[0].set_headers[0].1, "admin-secret:upstream-secret");
    assert_eq!(config.admin.address.port(), 9090);
    assert_eq!(config.threads, 3);
}

#[test]
fn env_missing_variable_is_an_error_at_its_path() {
    let yaml =
        "mode: gateway\nkeys:\n  control_plane: { url: \"http://${env:HOST}:1\", token: \"${env:NO_SUCH_TOKEN}\" }\n";
    let all = errors(yaml);
    assert_eq!(all.len(), 1, "{}", ConfigErrors(all.clone()));
    assert_eq!(all[0].path, "keys.control_plane.token");
    assert_eq!(all[0].line, Some(3));
    assert!(all[0].message.contains("NO_SUCH_TOKEN is not set"));
}

#[test]
fn env_missing_variable_causes_no_follow_on_errors() {
    let all = errors(&format!("{GATEWAY}threads: ${{env:NO_SUCH_THREADS}}\n"));
    assert_eq!(all.len(), 1, "{}", ConfigErrors(all.clone()));
    assert_eq!(all[0].path, "threads");
}

#[test]
fn env_dollar_without_env_prefix_passes_through() {
    let config = ok(&format!("{GATEWAY}    set_headers: {{ x-price: \"$$5 $HOME\" }}\n"));
    assert_eq!(config.routes[0].set_headers[0].1, "$$5 $HOME");
}

#[test]
fn env_is_not_applied_to_keys() {
    error_at(&format!("{GATEWAY}\"${{env:HOST}}\": 1\n"), "${env:HOST}", "unknown field");
}

// ---- one test per rule ----

#[test]
fn mode_must_be_known() {
    error_at("mode: proxy\n", "mode", "unknown variant `proxy`");
}

#[test]
fn mode_control_plane_needs_no_routes() {
    let config = ok("mode: control-plane\nstore: { url: \"postgres://kg@db:5432/kg\" }\n");
    assert_eq!(config.mode, Mode::ControlPlane);
    assert_eq!(config.keys.source, KeySource::Store);
    assert!(config.usage.sinks.is_empty());
}

#[test]
fn routes_may_be_absent_in_gateway_and_standalone() {
    ok("mode: gateway\nkeys: { file: keys.yaml }\n");
    ok("mode: standalone\n");
}

#[test]
fn node_id_must_not_be_blank() {
    error_at("node_id: \"  \"\n", "node_id", "must not be empty");
    error_at("node_id: \"a b\"\n", "node_id", "spaces");
    assert_eq!(ok("node_id: 7\n").node_id, "7");
}

#[test]
fn threads_zero_is_rejected() {
    error_at("threads: 0\n", "threads", "at least 1");
    error_at("threads: -2\n", "threads", "negative");
}

#[test]
fn listeners_must_not_be_empty_when_given() {
    error_at("listeners: []\n", "listeners", "at least one listener");
}

#[test]
fn listener_address_must_be_ip_and_port() {
    error_at("listeners:\n  - address: localhost:8080\n", "listeners[0].address", "expected IP:port");
    error_at("listeners:\n  - address: 8080\n", "listeners[0].address", "IP:port");
    error_at("listeners:\n  - tls: {}\n", "listeners[0].address", "required");
    assert_eq!(ok("listeners:\n  - address: \"[::1]:8443\"\n").listeners[0].address.to_string(), "[::1]:8443");
}

#[test]
fn listener_addresses_must_not_repeat() {
    let e = error_at(
        "listeners:\n  - address: 0.0.0.0:8080\n  - address: 127.0.0.1:8081\n  - address: 127.0.0.1:8080\n",
        "listeners[2].address",
        "already used by listeners[0]",
    );
    assert_eq!(e.line, Some(4));
    error_at("listeners:\n  - address: 127.0.0.1:9090\n", "listeners[0].address", "admin.address");
    // Port 0 asks the kernel for a free port each time: never a clash.
    ok("listeners:\n  - address: 127.0.0.1:0\n  - address: 127.0.0.1:0\n");
}

#[test]
fn listener_tls_files_must_exist() {
    let tls = TlsDir::new();
    let yaml =
        format!("listeners:\n  - address: 0.0.0.0:8443\n    tls: {{ cert: {}, key: /no/such/key.pem }}\n", tls.cert());
    error_at(&yaml, "listeners[0].tls.key", "cannot read /no/such/key.pem");
    error_at("listeners:\n  - address: 0.0.0.0:8443\n    tls: { key: k.pem }\n", "listeners[0].tls.cert", "required");
}

#[test]
fn listener_tls_files_must_hold_pem() {
    let tls = TlsDir::new();
    // Swapped: the certificate file holds no private key and vice versa.
    let yaml =
        format!("listeners:\n  - address: 0.0.0.0:8443\n    tls: {{ cert: {}, key: {} }}\n", tls.key(), tls.cert());
    let all = errors(&yaml);
    assert!(all.iter().any(|e| e.path == "listeners[0].tls.cert" && e.message.contains("no PEM certificate")));
    assert!(all.iter().any(|e| e.path == "listeners[0].tls.key" && e.message.contains("no PEM private key")));
}

#[test]
fn admin_address_must_be_ip_and_port() {
    error_at("admin: { address: \"admin:9090\" }\n", "admin.address", "IP:port");
}

#[test]
fn admin_token_needs_exactly_one_of_hash_and_token() {
    error_at("admin:\n  tokens:\n    - { name: a }\n", "admin.tokens[0]", "needs `hash");
    error_at(
        &format!("admin:\n  tokens:\n    - {{ name: a, hash: \"{OPS_HASH}\", token: x }}\n"),
        "admin.tokens[0]",
        "not both",
    );
}

#[test]
fn admin_token_hash_must_be_sha256_hex() {
    for bad in ["sha256:...", "md5:abcd", "sha256:abcd", &OPS_HASH.replace('a', "g")] {
        error_at(
            &format!("admin:\n  tokens:\n    - {{ name: a, hash: \"{bad}\" }}\n"),
            "admin.tokens[0].hash",
            "sha256:<64 hex digits>",
        );
    }
}

#[test]
fn webhooks_are_checked_entry_by_entry() {
    let config = ok("webhooks:\n  - { url: \"http://127.0.0.1:9/h\", secret: s }\n");
    assert!(config.webhooks[0].events.is_none() && config.webhooks[0].wants("key.updated"));
    assert_eq!(config.webhooks[0].expiring_lead, DEFAULT_EXPIRING_LEAD);
    let e = errors(
        "webhooks:\n  - { url: ftp://x, secret: s }\n  - { url: \"https://h/x\" }\n  \
         - { url: \"https://h/y\", secret: \"whsec_***\", events: [key.created, key.exploded], expiring_lead: 400d }\n  \
         - { url: \"https://h/z\", secret: s, events: [] }\n  - { url: \"https://h/z\", secret: s, color: red }\n",
    );
    let at = |path: &str, needle: &str| {
        assert!(e.iter().any(|e| e.path == path && e.message.contains(needle)), "no {path}: {needle} in {e:?}")
    };
    at("webhooks[0].url", "http:// or https://");
    at("webhooks[1].secret", "required");
    at("webhooks[2].secret", "base64");
    at("webhooks[2].events[1]", "unknown event \"key.exploded\"");
    at("webhooks[2].expiring_lead", "at most");
    at("webhooks[3].events", "at least one event");
    at("webhooks[4].color", "unknown field");
    error_at(
        "webhooks:\n  - { url: \"https://h/x\", secret: s }\n  - { url: \"https://h/x\", secret: t }\n",
        "webhooks[1].url",
        "already a webhook",
    );
    error_at(
        "mode: gateway\nkeys: { source: file, file: k.yaml }\nwebhooks:\n  - { url: \"https://h/x\", secret: s }\n",
        "webhooks",
        "control plane",
    );
}

#[test]
fn a_document_that_is_not_a_mapping_is_refused_at_line_one() {
    for text in ["|#", "- a\n- b\n", "just text\n"] {
        let e = errors(text);
        assert_eq!((e[0].path.as_str(), e[0].line), ("", Some(1)), "{text:?}: {e:?}");
        assert!(e[0].message.contains("must be a mapping"), "{text:?}: {e:?}");
    }
}

#[test]
fn token_roles_are_admin_or_read_and_only_on_admin_tokens() {
    error_at(
        &format!("admin:\n  tokens:\n    - {{ name: a, hash: \"{OPS_HASH}\", role: owner }}\n"),
        "admin.tokens[0].role",
        "is not admin or read",
    );
    error_at(
        &format!("admin:\n  sync_tokens:\n    - {{ name: a, hash: \"{OPS_HASH}\", role: read }}\n"),
        "admin.sync_tokens[0].role",
        "only admin.tokens have a role",
    );
}

#[test]
fn admin_raw_token_is_hashed_at_load() {
    let config = ok("admin:\n  sync_tokens:\n    - { name: edge, token: \"${env:ADMIN_TOKEN}\" }\n");
    let expected: [u8; 32] = sha2::Sha256::digest(b"admin-secret").into();
    assert_eq!(config.admin.sync_tokens[0].sha256, expected);
    assert!(!format!("{config:?}").contains("admin-secret"));
    error_at("admin:\n  tokens:\n    - { name: a, token: \"\" }\n", "admin.tokens[0].token", "must not be empty");
}

#[test]
fn admin_token_names_are_unique_per_list() {
    let yaml = format!(
        "admin:\n  tokens:\n    - {{ name: ops, hash: \"{OPS_HASH}\" }}\n    - {{ name: ops, token: x }}\n  sync_tokens:\n    - {{ name: ops, token: y }}\n"
    );
    let all = errors(&yaml);
    assert_eq!(all.len(), 1, "{}", ConfigErrors(all.clone()));
    assert_eq!(all[0].path, "admin.tokens[1].name");
    assert!(all[0].message.contains("duplicate token name \"ops\" (also admin.tokens[0])"));
    error_at("admin:\n  tokens:\n    - { hash: x }\n", "admin.tokens[0].name", "required");
}

use sha2::Digest as _;

#[test]
fn store_url_scheme_is_checked() {
    error_at("store: { url: \"mysql://x\" }\n", "store.url", "expected sqlite://");
    error_at("store: { url: \"sqlite://\" }\n", "store.url", "expected sqlite://");
    for good in ["sqlite://data/keygate.db", "sqlite::memory:", "postgres://kg@db:5432/kg", "postgresql://db/kg"] {
        assert_eq!(ok(&format!("store: {{ url: \"{good}\" }}\n")).store.url, good);
    }
}

#[test]
fn keys_source_store_is_refused_in_gateway_mode() {
    error_at(&GATEWAY.replace("source: file", "source: store"), "keys.source", "not available in gateway mode");
}

#[test]
fn keys_source_defaults_by_mode() {
    let cp = ok("mode: gateway\nkeys: { control_plane: { url: \"https://cp:9090\", token: t }, file: k.yaml }\n");
    assert_eq!(cp.keys.source, KeySource::ControlPlane);
    let file = ok("mode: gateway\nkeys: { file: k.yaml }\n");
    assert_eq!(file.keys.source, KeySource::File);
    let all = errors("mode: gateway\nkeys:\n  cache_file: x\n");
    assert_eq!(all.len(), 1, "{}", ConfigErrors(all.clone()));
    assert_eq!((all[0].path.as_str(), all[0].line), ("keys", Some(2)));
    assert!(all[0].message.contains("gateway mode needs a key source"));
    error_at("mode: gateway\n", "keys", "gateway mode needs a key source");
    assert_eq!(ok("keys: { file: k.yaml }\n").keys.source, KeySource::Store);
}

#[test]
fn keys_source_file_requires_keys_file() {
    error_at("mode: gateway\nkeys: { source: file }\n", "keys.file", "required when keys.source is file");
    error_at("keys: { source: file, file: \"\" }\n", "keys.file", "must not be empty");
}

#[test]
fn keys_source_control_plane_requires_control_plane() {
    error_at(
        "mode: gateway\nkeys: { source: control_plane }\n",
        "keys.control_plane",
        "required when keys.source is control_plane",
    );
}

#[test]
fn keys_source_must_be_store_in_control_plane_mode() {
    error_at(
        "mode: control-plane\nkeys: { source: file, file: k.yaml }\n",
        "keys.source",
        "serves keys from its store",
    );
}

#[test]
fn keys_source_must_be_known() {
    error_at("keys: { source: database }\n", "keys.source", "unknown variant `database`");
}

#[test]
fn keys_control_plane_url_and_token_are_checked() {
    let yaml = "mode: gateway\nkeys: { control_plane: { url: \"ftp://cp\", token: \"\" } }\n";
    error_at(yaml, "keys.control_plane.url", "http:// or https://");
    error_at(yaml, "keys.control_plane.token", "must not be empty");
    error_at("mode: gateway\nkeys: { control_plane: { token: t } }\n", "keys.control_plane.url", "required");
}

#[test]
fn keys_control_plane_token_is_not_debug_printed() {
    let config =
        ok("mode: gateway\nkeys: { control_plane: { url: \"http://cp:1\", token: \"${env:KEYGATE_SYNC_TOKEN}\" } }\n");
    assert!(!format!("{config:?}").contains("sync-secret"));
}

#[test]
fn keys_max_staleness_is_a_duration() {
    let config = ok("keys: { max_staleness: 1h30m }\n");
    assert_eq!(config.keys.max_staleness, Duration::from_secs(5400));
    error_at("keys: { max_staleness: 30 }\n", "keys.max_staleness", "no unit");
}

#[test]
fn trusted_proxies_accept_cidrs_and_bare_addresses() {
    let config = ok("client_ip: { trusted_proxies: [10.0.0.0/8, 10.1.2.3, \"::1\", \"fd00::/8\"] }\n");
    let expected: Vec<ipnet::IpNet> =
        ["10.0.0.0/8", "10.1.2.3/32", "::1/128", "fd00::/8"].iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(config.client_ip.trusted_proxies, expected);
}

#[test]
fn trusted_proxies_bad_cidr_is_reported_per_element() {
    let all = errors("client_ip:\n  trusted_proxies: [10.0.0.0/33, ok, 1.2.3.4]\n");
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["client_ip.trusted_proxies[0]", "client_ip.trusted_proxies[1]"]);
}

#[test]
fn key_location_needs_exactly_one_of_header_and_query() {
    error_at("key_locations:\n  - { scheme: Bearer }\n", "key_locations[0]", "needs `header");
    error_at("key_locations:\n  - { header: a, query: b }\n", "key_locations[0]", "not both");
    error_at(
        "key_locations:\n  - { query: api_key, scheme: Bearer }\n",
        "key_locations[0].scheme",
        "header` locations only",
    );
    error_at("key_locations: []\n", "key_locations", "at least one");
}

#[test]
fn key_location_header_names_are_checked_and_lowercased() {
    let config = ok("key_locations:\n  - { header: X-Api-Key }\n  - { header: Authorization, scheme: Token }\n");
    assert_eq!(
        config.key_locations,
        vec![
            KeyLocation::Header { name: http::HeaderName::from_static("x-api-key"), scheme: None },
            KeyLocation::Header { name: http::header::AUTHORIZATION, scheme: Some("Token".to_owned()) },
        ]
    );
    error_at("key_locations:\n  - { header: \"x key\" }\n", "key_locations[0].header", "not a valid header name");
    error_at(
        "key_locations:\n  - { header: authorization, scheme: \"Bear er\" }\n",
        "key_locations[0].scheme",
        "auth scheme",
    );
}

#[test]
fn upstream_targets_are_required_and_checked() {
    let base = "mode: gateway\nkeys: { file: k }\nupstreams:\n";
    error_at(&format!("{base}  a: {{ read_timeout: 1s }}\n"), "upstreams.a.targets", "required");
    error_at(&format!("{base}  a: {{ targets: [] }}\n"), "upstreams.a.targets", "at least one");
    let all = errors(&format!(
        "{base}  a: {{ targets: [\"10.0.0.1\", \"http://x:80\", \"x:0\", \"::1:80\", \"bad host:80\", \"ok.internal:80\", \"ok.internal:80\"] }}\n"
    ));
    let messages: Vec<(&str, &str)> = all.iter().map(|e| (e.path.as_str(), e.message.as_str())).collect();
    assert_eq!(messages.len(), 6, "{messages:#?}");
    assert!(messages[0].1.contains("has no port"));
    assert!(messages[1].1.contains("without a scheme"));
    assert!(messages[2].1.contains("1 to 65535"));
    assert!(messages[3].1.contains("brackets"));
    assert!(messages[4].1.contains("not a valid host name"));
    assert_eq!(messages[5].0, "upstreams.a.targets[6]");
    assert!(messages[5].1.contains("duplicate"));
    let config = ok(&format!("{base}  a: {{ targets: [\"[::1]:8000\", \"api.internal:443\"] }}\n"));
    assert_eq!(config.upstreams["a"].targets, vec!["[::1]:8000", "api.internal:443"]);
}

#[test]
fn upstream_timeouts_must_be_positive_durations() {
    let base = "mode: gateway\nkeys: { file: k }\nupstreams:\n  a:\n    targets: [\"h:1\"]\n";
    error_at(&format!("{base}    connect_timeout: 0s\n"), "upstreams.a.connect_timeout", "greater than 0");
    error_at(&format!("{base}    read_timeout: 30\n"), "upstreams.a.read_timeout", "250ms, 5s");
}

#[test]
fn upstream_tls_fields_are_checked() {
    let base = "mode: gateway\nkeys: { file: k }\nupstreams:\n  a:\n    targets: [\"h:1\"]\n";
    let config = ok(&format!("{base}    tls: {{ sni: API.Internal, verify: false }}\n"));
    assert_eq!(
        config.upstreams["a"].tls,
        Some(UpstreamTlsConfig { sni: Some("api.internal".to_owned()), ca: None, verify: false })
    );
    error_at(&format!("{base}    tls: {{ ca: /no/such/ca.pem }}\n"), "upstreams.a.tls.ca", "cannot read");
    error_at(&format!("{base}    tls: {{ verify: maybe }}\n"), "upstreams.a.tls.verify", "true or false");
    let tls = TlsDir::new();
    let config = ok(&format!("{base}    tls: {{ ca: {} }}\n", tls.cert()));
    assert_eq!(config.upstreams["a"].tls.as_ref().unwrap().ca, Some(tls.cert().into()));
}

#[test]
fn upstream_health_check_fields_are_checked() {
    let base = "mode: gateway\nkeys: { file: k }\nupstreams:\n  a:\n    targets: [\"h:1\"]\n";
    let yaml = format!(
        "{base}    health_check: {{ path: healthz, interval: 0s, timeout: 1x, healthy_threshold: 0, unhealthy_threshold: 3 }}\n"
    );
    let all = errors(&yaml);
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "upstreams.a.health_check.path",
            "upstreams.a.health_check.interval",
            "upstreams.a.health_check.timeout",
            "upstreams.a.health_check.healthy_threshold",
        ]
    );
}

#[test]
fn upstream_entry_errors_do_not_hide_each_other() {
    let yaml = "mode: gateway\nkeys: { file: k }\nupstreams:\n  a: { targets: [\"h:1\"], tsl: {} }\n  b: { targets: [\"h\"] }\nroutes:\n  - { name: r, upstream: a }\n";
    let all = errors(yaml);
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    // Route r names `a`, which exists even though its entry failed.
    assert_eq!(paths, vec!["upstreams.a.tsl", "upstreams.b.targets[0]"]);
}

#[test]
fn route_upstream_must_exist() {
    let e = error_at(
        &GATEWAY.replace("upstream: api", "upstream: apii"),
        "routes[0].upstream",
        "unknown upstream \"apii\"",
    );
    assert_eq!(e.line, Some(7));
    error_at(&GATEWAY.replace("    upstream: api\n", ""), "routes[0].upstream", "required");
}

#[test]
fn route_name_is_required_and_unique() {
    let yaml = format!("{GATEWAY}  - name: other\n    upstream: api\n  - name: all\n    upstream: api\n");
    let e = error_at(&yaml, "routes[2].name", "routes[0] and routes[2]");
    assert_eq!(e.line, Some(10));
    error_at(&GATEWAY.replace("  - name: all\n    upstream", "  - upstream"), "routes[0].name", "required");
}

#[test]
fn route_auth_none_with_scopes_is_rejected() {
    error_at(&format!("{GATEWAY}    auth: none\n    scopes: [orders:read]\n"), "routes[0].scopes", "auth: none");
    let config = ok(&format!("{GATEWAY}    auth: none\n"));
    assert_eq!(config.routes[0].auth, RouteAuth::None);
    error_at(&format!("{GATEWAY}    auth: token\n"), "routes[0].auth", "unknown variant");
}

#[test]
fn route_scopes_must_be_words() {
    error_at(&format!("{GATEWAY}    scopes: [\"orders read\", \"\"]\n"), "routes[0].scopes[0]", "not a valid scope");
    error_at(&format!("{GATEWAY}    scopes: [\"orders read\", \"\"]\n"), "routes[0].scopes[1]", "not a valid scope");
    let config = ok(&format!("{GATEWAY}    scopes: [\"orders:*\", \"*\"]\n"));
    assert_eq!(config.routes[0].scopes, vec!["orders:*", "*"]);
}

#[test]
fn route_match_path_prefix_must_start_with_slash() {
    error_at(&format!("{GATEWAY}    match: {{ path_prefix: v1 }}\n"), "routes[0].match.path_prefix", "start with '/'");
    error_at(&format!("{GATEWAY}    match: {{ path_prefix: \"/v1?x=1\" }}\n"), "routes[0].match.path_prefix", "'?'");
}

#[test]
fn route_match_methods_are_checked() {
    error_at(&format!("{GATEWAY}    match: {{ methods: [get] }}\n"), "routes[0].match.methods[0]", "write \"GET\"");
    let e = error_at(
        &format!("{GATEWAY}    match: {{ methods: [GET, GTE] }}\n"),
        "routes[0].match.methods[1]",
        "unknown HTTP method \"GTE\"",
    );
    assert_eq!((e.line, e.column), (Some(8), Some(29)));
    let config = ok(&format!("{GATEWAY}    match: {{ methods: [GET, PROPFIND, GET] }}\n"));
    assert_eq!(
        config.routes[0].matcher.methods,
        vec![http::Method::GET, http::Method::from_bytes(b"PROPFIND").unwrap()]
    );
}

#[test]
fn route_match_host_is_lowercased_and_portless() {
    let config = ok(&format!("{GATEWAY}    match: {{ host: API.Example.com }}\n"));
    assert_eq!(config.routes[0].matcher.host.as_deref(), Some("api.example.com"));
    error_at(
        &format!("{GATEWAY}    match: {{ host: \"api.example.com:8443\" }}\n"),
        "routes[0].match.host",
        "without a port",
    );
    error_at(
        &format!("{GATEWAY}    match: {{ host: \"api example\" }}\n"),
        "routes[0].match.host",
        "not a valid host name",
    );
}

#[test]
fn route_set_headers_are_checked_and_keep_order() {
    let config = ok(&format!(
        "{GATEWAY}    set_headers:\n      X-B: two\n      x-a: 1\n      Authorization: \"Bearer ${{env:ORDERS_UPSTREAM_TOKEN}}\"\n"
    ));
    let names: Vec<&str> = config.routes[0].set_headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["x-b", "x-a", "authorization"]);
    assert_eq!(config.routes[0].set_headers[1].1, "1");
    assert!(!format!("{config:?}").contains("upstream-secret"));

    let bad = format!(
        "{GATEWAY}    set_headers:\n      \"bad name\": x\n      x-ok: \"line\\nbreak\"\n      Content-Length: \"5\"\n      X-Dup: a\n      x-dup: b\n"
    );
    error_at(&bad, "routes[0].set_headers.bad name", "not a valid header name");
    let value_error = error_at(&bad, "routes[0].set_headers.x-ok", "invalid header value");
    assert!(!value_error.message.contains("line"));
    error_at(&bad, "routes[0].set_headers.Content-Length", "managed by the proxy");
    let dup = error_at(&bad, "routes[0].set_headers.x-dup", "set twice");
    assert_eq!(dup.line, Some(13));
}

#[test]
fn plans_limits_are_checked() {
    let yaml = format!(
        "{GATEWAY}plans:\n  a: {{ rate_limit: {{ requests: 0, per: 0s, burst: 0 }} }}\n  b: {{ quota: {{ requests: 0, per: week }} }}\n  c: {{ rate_limit: {{ per: 1s }}, quota: {{ requests: 5 }} }}\n  d: {{ rate_limit: {{ requests: 5, per: 1s, brust: 2 }} }}\n"
    );
    let all = errors(&yaml);
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "plans.a.rate_limit.requests",
            "plans.a.rate_limit.per",
            "plans.a.rate_limit.burst",
            "plans.b.quota.requests",
            "plans.b.quota.per",
            "plans.c.rate_limit.requests",
            "plans.c.quota.per",
            "plans.d.rate_limit.brust",
        ],
        "{}",
        ConfigErrors(all.clone())
    );
    assert!(all[4].message.contains("`day` or `month`"));
}

#[test]
fn limits_the_limiter_cannot_honour_are_refused() {
    let yaml = format!(
        "{GATEWAY}plans:\n  a: {{ rate_limit: {{ requests: 1, per: 1m, burst: 4294967295 }} }}\n  b: {{ rate_limit: {{ requests: 1, per: 50000d }} }}\n  c: {{ rate_limit: {{ requests: 1, per: 50000d, burst: 1 }} }}\n  d: {{ rate_limit: {{ requests: 4000000000, per: 1s }} }}\n  e: {{ quota: {{ requests: 2000000000000, per: day }} }}\n"
    );
    let all = errors(&yaml);
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "plans.a.rate_limit.burst",
            "plans.b.rate_limit.per",
            "plans.c.rate_limit.per",
            "plans.d.rate_limit.requests",
            "plans.e.quota.requests",
        ],
        "{}",
        ConfigErrors(all.clone())
    );
    // Large values the limiter can keep stay allowed.
    let config = ok(&format!(
        "{GATEWAY}plans:\n  big: {{ rate_limit: {{ requests: 10, per: 1s, burst: 4294967295 }}, quota: {{ requests: 1000000000000, per: month }} }}\n"
    ));
    assert_eq!(config.plans["big"].rate_limit.and_then(|r| r.burst), Some(u32::MAX));
}

#[test]
fn plans_may_be_empty() {
    let config =
        ok(&format!("{GATEWAY}plans:\n  unlimited: {{}}\n  daily: {{ quota: {{ requests: \"100\", per: day }} }}\n"));
    assert_eq!(config.plans["unlimited"], PlanConfig::default());
    assert_eq!(
        config.plans["daily"].quota,
        Some(QuotaConfig { requests: 100, per: QuotaPeriod::Day, by: LimitScope::Key })
    );
}

#[test]
fn default_plan_must_exist() {
    error_at(&format!("{GATEWAY}plans: {{ free: {{}} }}\ndefault_plan: fre\n"), "default_plan", "unknown plan \"fre\"");
    error_at(&format!("{GATEWAY}default_plan: free\n"), "default_plan", "unknown plan");
    // A plan whose entry failed still exists: no follow-on error.
    let all = errors(&format!("{GATEWAY}plans: {{ free: {{ bogus: 1 }} }}\ndefault_plan: free\n"));
    assert_eq!(all.len(), 1);
}

#[test]
fn usage_sinks_are_checked_against_the_mode() {
    error_at(
        &format!("{GATEWAY}usage: {{ sinks: [{{ type: store }}] }}\n"),
        "usage.sinks[0].type",
        "gateway has no store",
    );
    error_at("usage: { sinks: [{ type: control_plane }] }\n", "usage.sinks[0].type", "only gateways");
    error_at(
        &format!("{GATEWAY}usage: {{ sinks: [{{ type: control_plane }}] }}\n"),
        "usage.sinks[0].type",
        "needs keys.control_plane",
    );
    let config = ok("mode: gateway\nkeys: { control_plane: { url: \"http://cp:9090\", token: t } }\nusage: { sinks: [{ type: control_plane }, { type: file, path: u.jsonl }] }\n");
    assert_eq!(config.usage.sinks, vec![SinkConfig::ControlPlane, SinkConfig::File { path: "u.jsonl".into() }]);
}

#[test]
fn usage_sink_fields_are_checked() {
    error_at("usage: { sinks: [{ type: kafka }] }\n", "usage.sinks[0].type", "unknown sink type");
    error_at("usage: { sinks: [{ type: file }] }\n", "usage.sinks[0].path", "required");
    error_at("usage: { sinks: [{ type: store, path: x }] }\n", "usage.sinks[0].path", "only a sink of type `file`");
    error_at("usage: { sinks: [{ path: x }] }\n", "usage.sinks[0].type", "required");
    error_at("usage: { sinks: [{ type: store }, { type: store }] }\n", "usage.sinks[1]", "counted twice");
    error_at("usage: { flush_interval: 0s }\n", "usage.flush_interval", "greater than 0");
}

#[test]
fn usage_spool_is_optional_and_never_empty() {
    assert_eq!(ok("").usage.spool, None);
    assert_eq!(ok("usage: { spool: data/usage.spool }\n").usage.spool, Some("data/usage.spool".into()));
    error_at("usage: { spool: \"\" }\n", "usage.spool", "must not be empty");
}

#[test]
fn usage_sinks_default_by_mode() {
    assert_eq!(ok("").usage.sinks, vec![SinkConfig::Store]);
    assert!(ok(GATEWAY).usage.sinks.is_empty());
    assert!(ok("usage: { sinks: [] }\n").usage.sinks.is_empty());
}

#[test]
fn usage_http_and_nats_sinks_parse_with_defaults_and_env() {
    let config = ok(r#"usage:
  sinks:
    - { type: http, url: "https://meter.example.com/events", format: cloudevents }
    - type: http
      url: "http://127.0.0.1:8123/e"
      format: cloudevents
      batch_size: 10000
      secret: "${env:ORDERS_UPSTREAM_TOKEN}"
      headers: { Authorization: "Bearer ${env:KEYGATE_SYNC_TOKEN}", x-tenant: t1 }
    - { type: nats, url: "nats://127.0.0.1:4222", subject: keygate.usage }
"#);
    let [SinkConfig::Http(first), SinkConfig::Http(second), SinkConfig::Nats(nats)] = &config.usage.sinks[..] else {
        panic!("expected two http sinks and a nats sink, got {:?}", config.usage.sinks);
    };
    assert_eq!(
        (first.url.as_str(), first.format, first.batch_size),
        ("https://meter.example.com/events", EventFormat::CloudEvents, 100)
    );
    assert_eq!((first.secret.as_deref(), first.headers.len()), (None, 0));
    assert_eq!(second.batch_size, 10_000);
    assert_eq!(second.secret.as_deref(), Some("upstream-secret"));
    let headers: Vec<(&str, &[u8])> = second.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
    assert_eq!(headers, [("authorization", &b"Bearer sync-secret"[..]), ("x-tenant", &b"t1"[..])]);
    assert_eq!((nats.url.as_str(), nats.subject.as_str()), ("nats://127.0.0.1:4222", "keygate.usage"));
}

#[test]
fn usage_http_and_nats_sink_problems_are_all_listed() {
    let all = errors(
        r#"usage:
  sinks:
    - { type: http, url: "ftp://meter", format: json, batch_size: 0, subject: s }
    - { type: http, url: "https://meter", batch_size: 10001, secret: "whsec_not*base64", headers: { Content-Type: text/plain, webhook-signature: x, "bad name": y } }
    - { type: nats, url: "http://127.0.0.1:4222", subject: "keygate.*", format: cloudevents }
    - { type: nats, subject: "a..b" }
    - { type: nats, url: "nats://127.0.0.1:4222", subject: "has space" }
    - { type: file, path: u.jsonl, url: "http://x" }
"#,
    );
    let expected = [
        ("usage.sinks[0].url", "http:// or https://"),
        ("usage.sinks[0].format", "unknown format \"json\", expected `cloudevents`"),
        ("usage.sinks[0].batch_size", "between 1 and 10000, found 0"),
        ("usage.sinks[0].subject", "only a sink of type `nats` takes `subject`"),
        ("usage.sinks[1].format", "the only format is `cloudevents`"),
        ("usage.sinks[1].batch_size", "between 1 and 10000, found 10001"),
        ("usage.sinks[1].secret", "whsec_"),
        ("usage.sinks[1].headers.Content-Type", "set by the sink"),
        ("usage.sinks[1].headers.webhook-signature", "set by the sink"),
        ("usage.sinks[1].headers.bad name", "not a valid header name"),
        ("usage.sinks[2].url", "nats:// or tls://"),
        ("usage.sinks[2].subject", "no wildcards"),
        ("usage.sinks[2].format", "only a sink of type `http` takes `format`"),
        ("usage.sinks[3].url", "required"),
        ("usage.sinks[3].subject", "not a subject to publish to"),
        ("usage.sinks[4].subject", "not a subject to publish to"),
        ("usage.sinks[5].url", "only a sink of type `http` or `nats` takes `url`"),
    ];
    for (path, needle) in expected {
        assert!(
            all.iter().any(|e| e.path == path && e.message.contains(needle)),
            "no error at {path:?} containing {needle:?}; got:\n{}",
            ConfigErrors(all.clone())
        );
    }
    assert_eq!(all.len(), expected.len(), "unexpected extra errors:\n{}", ConfigErrors(all.clone()));
}

#[test]
fn usage_the_same_metering_sink_twice_is_refused() {
    let sink = "{ type: nats, url: \"nats://127.0.0.1:4222\", subject: keygate.usage }";
    error_at(&format!("usage: {{ sinks: [{sink}, {sink}] }}\n"), "usage.sinks[1]", "counted twice");
}

#[test]
fn usage_sink_debug_hides_credentials_but_changes_with_them() {
    let http = |secret: &str, header: &str| {
        let config = ok(&format!(
            "usage: {{ sinks: [{{ type: http, url: \"https://user:pw@meter.example.com/e?token=qs\", format: cloudevents, secret: {secret}, headers: {{ x-api-key: {header} }} }}] }}\n"
        ));
        format!("{:?}", config.usage.sinks[0])
    };
    let shown = http("s3cret", "h3ader");
    for hidden in ["s3cret", "h3ader", "pw", "qs"] {
        assert!(!shown.contains(hidden), "{hidden} shown in {shown}");
    }
    assert!(shown.contains("https://meter.example.com/e") && shown.contains("x-api-key"), "{shown}");
    assert_ne!(shown, http("other", "h3ader"), "a new secret must make a new sink");
    assert_ne!(shown, http("s3cret", "other"), "a new header value must make a new sink");

    let nats = ok("usage: { sinks: [{ type: nats, url: \"nats://u:pw@127.0.0.1:4222\", subject: s }] }\n");
    let shown = format!("{:?}", nats.usage.sinks[0]);
    assert!(!shown.contains("pw") && shown.contains("nats://127.0.0.1:4222"), "{shown}");
}

#[test]
fn usage_retention_defaults_and_the_contract_form() {
    const DAY: u64 = 86_400;
    let defaults = ok("").usage.retention;
    assert_eq!(defaults, UsageRetention::default());
    assert_eq!(
        (defaults.minute, defaults.hour, defaults.day),
        (Duration::from_secs(7 * DAY), Duration::from_secs(90 * DAY), Duration::from_secs(730 * DAY))
    );
    // CONTRACT §3, on both kinds of node with a store.
    for mode in ["", "mode: control-plane\nstore: { url: \"postgres://kg@db:5432/kg\" }\n"] {
        let yaml = format!("{mode}usage:\n  retention: {{ minute: 7d, hour: 90d, day: 2y }}   # store only\n");
        assert_eq!(ok(&yaml).usage.retention, defaults);
    }
    let partial = ok("usage: { retention: { minute: 2d } }\n").usage.retention;
    assert_eq!((partial.minute, partial.hour), (Duration::from_secs(2 * DAY), defaults.hour));
    let tight = ok("usage: { retention: { minute: 1h, hour: 1h, day: 31d } }\n").usage.retention;
    assert_eq!(
        (tight.minute, tight.hour, tight.day),
        (Duration::from_secs(3600), Duration::from_secs(3600), Duration::from_secs(31 * DAY))
    );
}

#[test]
fn usage_retention_problems_are_all_listed() {
    let all = errors("usage: { retention: { minute: 0s, hour: soon, day: 5, week: 1d } }\n");
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["usage.retention.week"], "an unknown field stops the section before its values are read");
    let all = errors("usage: { retention: { minute: 0s, hour: soon, day: 5 } }\n");
    let found: Vec<(&str, &str)> = all.iter().map(|e| (e.path.as_str(), e.message.as_str())).collect();
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].0 == "usage.retention.minute" && found[0].1.contains("greater than 0"), "{found:?}");
    assert!(found[1].0 == "usage.retention.hour" && found[1].1.contains("invalid duration"), "{found:?}");
    assert!(found[2].0 == "usage.retention.day" && found[2].1.contains("no unit"), "{found:?}");

    error_at("usage: { retention: { minute: 30m } }\n", "usage.retention.minute", "at least 1h");
    error_at(
        "usage: { retention: { minute: 10d, hour: 2d } }\n",
        "usage.retention.hour",
        "at least usage.retention.minute (10d)",
    );
    error_at(
        "usage: { retention: { hour: 90d, day: 60d } }\n",
        "usage.retention.day",
        "at least usage.retention.hour (90d)",
    );
    error_at("usage: { retention: { minute: 1d, hour: 2d, day: 30d } }\n", "usage.retention.day", "monthly quotas");
    error_at("usage: { retention: 7d }\n", "usage.retention", "");
    let all = errors("usage: { retention: { minute: 30m, hour: 10m, day: 5m } }\n");
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["usage.retention.minute", "usage.retention.hour", "usage.retention.day"]);
}

#[test]
fn usage_retention_on_a_gateway_is_an_error() {
    let error = error_at(
        &format!("{GATEWAY}usage:\n  retention: {{ minute: 7d }}\n"),
        "usage.retention",
        "a gateway has no store",
    );
    assert_eq!(error.line, Some(9));
}

#[test]
fn access_log_forms() {
    assert_eq!(ok("access_log: off\n").access_log, AccessLogConfig::Off);
    assert_eq!(ok("access_log: false\n").access_log, AccessLogConfig::Off);
    assert_eq!(ok("access_log: { path: stdout }\n").access_log, AccessLogConfig::Stdout);
    assert_eq!(
        ok("access_log: { path: /var/log/keygate/access.log }\n").access_log,
        AccessLogConfig::File("/var/log/keygate/access.log".into())
    );
    error_at("access_log: on\n", "access_log", "expected `off`");
    error_at("access_log: { file: x }\n", "access_log", "unknown field `file`");
    error_at("access_log: {}\n", "access_log.path", "required");
}

// ---- the typed limits that the keys file reuses ----

#[test]
fn rate_limit_and_quota_deserialize_directly() {
    let rl: RateLimitConfig = serde_norway::from_str("{ requests: 10, per: 1s, burst: 20 }").unwrap();
    assert_eq!(rl, RateLimitConfig { requests: 10, per: Duration::from_secs(1), burst: Some(20), by: LimitScope::Key });
    let q: QuotaConfig = serde_json::from_str(r#"{"requests": 10000, "per": "month"}"#).unwrap();
    assert_eq!(q.per, QuotaPeriod::Month);
    let err = serde_norway::from_str::<RateLimitConfig>("{ requests: 0, per: 5 }").unwrap_err();
    assert!(err.to_string().contains("requests: must be at least 1"), "{err}");
    assert!(serde_norway::from_str::<QuotaConfig>("{ requests: 1, per: day, x: 1 }").is_err());
}

#[test]
fn rate_limit_and_quota_serialize_in_config_form() {
    let rl = RateLimitConfig { requests: 10, per: Duration::from_millis(1500), burst: None, by: LimitScope::Key };
    assert_eq!(serde_json::to_string(&rl).unwrap(), r#"{"requests":10,"per":"1s500ms"}"#);
    let q = QuotaConfig { requests: 5, per: QuotaPeriod::Day, by: LimitScope::Key };
    assert_eq!(serde_json::to_string(&q).unwrap(), r#"{"requests":5,"per":"day"}"#);
}

#[test]
fn raw_limits_validate_with_paths() {
    let raw: raw::RawRateLimit = serde_norway::from_str("{ per: 1m }").unwrap();
    assert_eq!(
        raw.validate("keys[3].rate_limit").unwrap_err(),
        vec![("keys[3].rate_limit.requests".to_owned(), "required field is missing".to_owned())]
    );
}

#[test]
fn limits_may_be_shared_by_owner() {
    let config = ok(&format!(
        "{GATEWAY}plans:\n  team: {{ rate_limit: {{ requests: 100, per: 1s, by: owner }}, quota: {{ requests: 1000, per: month, by: owner }} }}\n  solo: {{ rate_limit: {{ requests: 5, per: 1s, by: key }} }}\n"
    ));
    assert_eq!(config.plans["team"].rate_limit.map(|r| r.by), Some(LimitScope::Owner));
    assert_eq!(config.plans["team"].quota.map(|q| q.by), Some(LimitScope::Owner));
    assert_eq!(config.plans["solo"].rate_limit.map(|r| r.by), Some(LimitScope::Key));
    error_at(
        &format!("{GATEWAY}plans:\n  team: {{ quota: {{ requests: 10, per: day, by: team }} }}\n"),
        "plans.team.quota.by",
        "expected `key` or `owner`",
    );
    // Stored and synced limits read `by` back, and write it only when it is not the default.
    let shared = RateLimitConfig { requests: 10, per: Duration::from_secs(1), burst: None, by: LimitScope::Owner };
    let text = serde_json::to_string(&shared).unwrap();
    assert_eq!(text, r#"{"requests":10,"per":"1s","by":"owner"}"#);
    assert_eq!(serde_json::from_str::<RateLimitConfig>(&text).unwrap(), shared);
    let quota: QuotaConfig = serde_json::from_str(r#"{"requests": 1, "per": "day", "by": "owner"}"#).unwrap();
    assert_eq!(quota.by, LimitScope::Owner);
}

// ---- fleet_limits: limits shared by every gateway ----

#[test]
fn fleet_limits_take_a_redis_engine_and_a_sync_interval() {
    assert_eq!(ok(GATEWAY).fleet_limits, None, "absent: each process on its own");
    let config = ok(&format!("{GATEWAY}fleet_limits: {{ engine: redis, url: redis://127.0.0.1:6379 }}\n"));
    let fleet = config.fleet_limits.expect("fleet_limits");
    assert_eq!(fleet.engine, FleetEngine::Redis { url: "redis://127.0.0.1:6379".into() });
    assert_eq!(fleet.sync_interval, Duration::from_millis(200));
    let config = ok(&format!(
        "{GATEWAY}fleet_limits: {{ engine: redis, url: \"redis://:pw@cache:6380/2\", sync_interval: 100ms }}\n"
    ));
    let fleet = config.fleet_limits.expect("fleet_limits");
    assert_eq!(fleet.sync_interval, Duration::from_millis(100));
    assert!(!format!("{:?}", fleet.engine).contains("pw"), "the password stays out of logs");
}

#[test]
fn fleet_limits_through_the_control_plane_use_keys_control_plane() {
    let config = ok(&format!("{GATEWAY_FOLLOWING}fleet_limits: {{ engine: control_plane, sync_interval: 250ms }}\n"));
    let fleet = config.fleet_limits.expect("fleet_limits");
    assert_eq!(fleet.engine, FleetEngine::ControlPlane);
    assert_eq!(fleet.sync_interval, Duration::from_millis(250));
}

#[test]
fn fleet_limits_errors_name_their_field() {
    let with = |block: &str| format!("{GATEWAY}fleet_limits: {block}\n");
    error_at(&with("{ engine: control_plane }"), "fleet_limits.engine", "needs keys.control_plane");
    error_at(
        &format!("{GATEWAY_FOLLOWING}fleet_limits: {{ engine: control_plane, url: redis://127.0.0.1 }}\n"),
        "fleet_limits.url",
        "only for `redis`",
    );
    error_at(&with("{ engine: memcached, url: x }"), "fleet_limits.engine", "unknown engine");
    error_at(&with("{ url: redis://127.0.0.1 }"), "fleet_limits.engine", "required");
    error_at(&with("{ engine: redis }"), "fleet_limits.url", "required");
    error_at(&with("{ engine: redis, url: \"http://127.0.0.1\" }"), "fleet_limits.url", "not a Redis URL");
    for interval in ["50ms", "1s"] {
        error_at(
            &with(&format!("{{ engine: redis, url: redis://127.0.0.1, sync_interval: {interval} }}")),
            "fleet_limits.sync_interval",
            "from 100ms to 250ms",
        );
    }
    error_at(&with("{ engine: redis, url: redis://127.0.0.1, prefix: x }"), "fleet_limits.prefix", "unknown field");
}

// ---- http: what every client meets ----

#[test]
fn http_block_defaults_and_values() {
    let defaults = ok("").http;
    assert_eq!(defaults, HttpConfig::default());
    assert_eq!(defaults.request_header_timeout, Duration::from_secs(10));
    assert_eq!(defaults.idle_timeout, Duration::from_secs(60));
    assert_eq!(defaults.max_connections, 10_000);
    assert_eq!(defaults.escaped_slashes, EscapedSlashes::Reject);
    assert_eq!(defaults.underscore_headers, UnderscoreHeaders::Drop);
    let set = ok("http: { request_header_timeout: 2s, idle_timeout: 500ms, max_connections: 3, escaped_slashes: pass, underscore_headers: reject }\n").http;
    assert_eq!(
        set,
        HttpConfig {
            request_header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_millis(500),
            max_connections: 3,
            escaped_slashes: EscapedSlashes::Pass,
            underscore_headers: UnderscoreHeaders::Reject,
        }
    );
}

#[test]
fn http_block_refuses_what_it_cannot_honour_naming_each_field() {
    let yaml = "http: { request_header_timeout: 0s, idle_timeout: 30d, max_connections: 0, escaped_slashes: decode, underscore_headers: keep }\n";
    let found = errors(yaml);
    for (path, needle) in [
        ("http.request_header_timeout", "greater than 0"),
        ("http.idle_timeout", "at most 24h"),
        ("http.max_connections", "at least 1"),
        ("http.escaped_slashes", "`reject`, `pass`"),
        ("http.underscore_headers", "`drop`, `reject`, `pass`"),
    ] {
        assert!(found.iter().any(|e| e.path == path && e.message.contains(needle)), "{path}: {found:?}");
    }
    error_at("http: { bogus: 1 }\n", "http.bogus", "unknown field");
}

#[test]
fn underscore_key_header_cannot_be_combined_with_rejecting_underscores() {
    let yaml = "key_locations: [ { header: x_api_key } ]\nhttp: { underscore_headers: reject }\n";
    error_at(yaml, "key_locations[0].header", "underscore_headers: reject");
    ok("key_locations: [ { header: x_api_key } ]\nhttp: { underscore_headers: drop }\n");
}

#[test]
fn a_file_that_is_not_a_mapping_is_refused_at_its_first_node() {
    // Found by `arbitrary_text_loads_or_every_error_says_where`: the error had no position.
    for (text, at) in [("ெ\n", (1, 1)), ("# keygate\n- mode: gateway\n", (2, 1)), ("\n  42\n", (2, 3))] {
        let all = errors(text);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].message.contains("must be a mapping"), "{}", all[0].message);
        assert_eq!((all[0].line, all[0].column), (Some(at.0), Some(at.1)), "{text:?}");
    }
}

#[test]
fn a_second_document_is_refused_where_it_starts() {
    // Found by `arbitrary_text_loads_or_every_error_says_where`: the error had no position.
    for (text, line) in [("mode: gateway\n---\nthreads: 2\n", 2), ("  <<: \nmode", 2)] {
        let all = errors(text);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].message.contains("more than one document"), "{}", all[0].message);
        assert_eq!(all[0].line, Some(line), "{text:?}");
    }
}

// ---- property tests: whatever the text, a config or errors that say where ----

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Every refusal must tell the operator where to look.
    fn check(text: &str) -> Result<(), TestCaseError> {
        if let Err(errors) = parse(text) {
            prop_assert!(!errors.is_empty());
            for e in errors.iter() {
                prop_assert!(!e.path.is_empty() || e.line.is_some(), "error without path or position: {e:?}\n{text}");
                let _ = e.to_string();
            }
        }
        Ok(())
    }

    /// Pieces of YAML, keygate's field names and values it gives meaning to.
    fn token() -> impl Strategy<Value = String> {
        const PIECES: &[&str] = &[
            "mode",
            "gateway",
            "standalone",
            "listeners",
            "address",
            "admin",
            "tokens",
            "keys",
            "source",
            "file",
            "client_ip",
            "trusted_proxies",
            "key_locations",
            "header",
            "scheme",
            "query",
            "upstreams",
            "targets",
            "routes",
            "name",
            "match",
            "path_prefix",
            "methods",
            "upstream",
            "auth",
            "none",
            "plans",
            "rate_limit",
            "quota",
            "requests",
            "per",
            "burst",
            "usage",
            "sinks",
            "type",
            "access_log",
            "threads",
            ": ",
            ":",
            "- ",
            "-",
            "{",
            "}",
            "[",
            "]",
            ", ",
            "'",
            "\"",
            "&a ",
            "*a",
            "<<: ",
            "${env:PORT}",
            "${env:NOPE}",
            "${env:",
            "#",
            "|",
            ">",
            "!!str ",
            "!x ",
            "? ",
            "---",
            "...",
            "~",
            "null",
            "true",
            "off",
            "1s",
            "0s",
            "0",
            "-1",
            "1e999",
            "4294967296",
            "127.0.0.1:8080",
            "[::]:0",
            "10.0.0.0/8",
            "sha256:",
            "/v1",
            "GET",
            "\t",
            "\\",
            "%",
            "@",
            "`",
            "é",
            "\u{feff}",
            "\u{0}",
        ];
        prop_oneof![
            4 => proptest::sample::select(PIECES).prop_map(str::to_owned),
            1 => "[a-z0-9_.]{1,8}",
            1 => any::<char>().prop_map(String::from),
        ]
    }

    fn yamlish() -> impl Strategy<Value = String> {
        let line = (0usize..7, proptest::collection::vec(token(), 0..7))
            .prop_map(|(indent, tokens)| format!("{}{}", " ".repeat(indent), tokens.concat()));
        proptest::collection::vec(line, 0..14).prop_map(|lines| lines.join("\n"))
    }

    /// A valid config with one character inserted, removed or replaced.
    fn near_valid() -> impl Strategy<Value = String> {
        (
            proptest::sample::select(vec![CONTRACT_EXAMPLE, GATEWAY]),
            any::<proptest::sample::Index>(),
            0u8..3,
            proptest::sample::select(vec![' ', '\n', ':', '-', '{', '[', '"', '\'', '#', '&', '*', '0', 'x', '\t']),
        )
            .prop_map(|(base, at, op, c)| {
                let mut text = base.to_owned();
                let i = at.index(text.len() + 1);
                let i = (0..=i).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
                let end = text[i..].chars().next().map_or(i, |ch| i + ch.len_utf8());
                match op {
                    0 => text.insert(i, c),
                    1 => text.replace_range(i..end, ""),
                    _ => text.replace_range(i..end, c.encode_utf8(&mut [0; 4])),
                }
                text
            })
    }

    /// A gateway config whose every value is a slot; slots left alone keep a valid value.
    const TEMPLATE: &str = "\
mode: gateway
node_id: @
threads: @
listeners: [{ address: @ }]
admin: { address: @, tokens: [{ name: @, hash: @ }], sync_tokens: [{ name: @, token: @ }] }
keys: { source: file, file: @, max_staleness: @ }
client_ip: { trusted_proxies: [@] }
key_locations: [{ header: @, scheme: @ }, { query: @ }]
upstreams:
  api:
    targets: [@]
    connect_timeout: @
    read_timeout: @
    health_check: { path: @, interval: @, timeout: @, healthy_threshold: @, unhealthy_threshold: @ }
    tls: { sni: @, verify: @ }
routes:
  - name: @
    match: { path_prefix: @, methods: [@], host: @ }
    upstream: @
    auth: @
    scopes: [@]
    set_headers: { @: @ }
plans: { free: { rate_limit: { requests: @, per: @, burst: @ }, quota: { requests: @, per: @ } } }
default_plan: @
usage: { flush_interval: @, sinks: [{ type: @, path: @ }] }
access_log: @
shutdown_timeout: @
";

    const VALID: &[&str] = &[
        "gw-1",
        "2",
        "0.0.0.0:8080",
        "127.0.0.1:9090",
        "ops",
        OPS_HASH,
        "edge",
        "\"${env:ADMIN_TOKEN}\"",
        "keys.yaml",
        "0s",
        "10.0.0.0/8",
        "authorization",
        "Bearer",
        "api_key",
        "\"127.0.0.1:8000\"",
        "2s",
        "30s",
        "/healthz",
        "5s",
        "1s",
        "2",
        "3",
        "api.internal",
        "true",
        "orders",
        "/v1",
        "GET",
        "api.example.com",
        "api",
        "key",
        "orders:read",
        "x-upstream-token",
        "\"${env:ORDERS_UPSTREAM_TOKEN}\"",
        "10",
        "1s",
        "20",
        "10000",
        "month",
        "free",
        "5s",
        "file",
        "data/usage.jsonl",
        "off",
        "30s",
    ];

    /// A value to put in a slot: scalars of every YAML type, odd text, collections.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9:./_*-]{0,12}",
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| n.to_string()),
            proptest::sample::select(vec![
                "",
                "~",
                "null",
                "true",
                "false",
                "off",
                "0",
                "-1",
                "1e400",
                "4294967296",
                "18446744073709551616",
                "[]",
                "{}",
                "[1, [2]]",
                "{ a: 1 }",
                "${env:PORT}",
                "${env:NOPE}",
                "\"${env:\"",
                "0s",
                "0ms",
                "999999999999d",
                "1h30m",
                "1s1s",
                "::",
                "[::1]:0",
                "0.0.0.0:99999",
                "/",
                "*",
                "\"a b\"",
                "\"\\t\"",
                "\"\\u0000\"",
                "sha256:",
                "\"x\\ny\"",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn filled_template() -> impl Strategy<Value = String> {
        let slots = TEMPLATE.matches('@').count();
        assert_eq!(slots, VALID.len(), "one valid value per slot");
        proptest::collection::vec(proptest::option::weighted(0.06, value()), slots).prop_map(|values| {
            let mut text = String::with_capacity(TEMPLATE.len() * 2);
            for (i, part) in TEMPLATE.split('@').enumerate() {
                text.push_str(part);
                if let Some(value) = values.get(i) {
                    text.push_str(value.as_deref().unwrap_or(VALID[i]));
                }
            }
            text
        })
    }

    #[test]
    fn the_template_loads_as_it_stands() {
        let mut text = String::new();
        for (i, part) in TEMPLATE.split('@').enumerate() {
            text.push_str(part);
            text.push_str(VALID.get(i).copied().unwrap_or(""));
        }
        ok(&text);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_loads_or_every_error_says_where(text in prop_oneof![yamlish(), any::<String>()]) {
            check(&text)?;
        }

        #[test]
        fn a_valid_config_one_character_off_loads_or_every_error_says_where(text in near_valid()) {
            check(&text)?;
        }

        #[test]
        fn arbitrary_values_in_known_fields_load_or_every_error_says_where(text in filled_template()) {
            check(&text)?;
        }
    }
}
