//! Black-box tests of the control plane (CONTRACT §2 modes, §3 `admin` / `store` /
//! `keys` / `usage`, §5 key denials, §6 admin API and sync, §8 usage): real
//! `keygate serve` processes in standalone, control-plane and gateway mode, over
//! real HTTP, on SQLite and on PostgreSQL.
//!
//! PostgreSQL is `postgres://postgres@127.0.0.1:5432/postgres` unless
//! `KEYGATE_TEST_POSTGRES_URL` says otherwise; each test gets a fresh database,
//! dropped afterwards. If the server is unreachable the PostgreSQL tests fail,
//! they never skip.
//!
//! One file for one subject, the nodes of a control-plane deployment working
//! together; events, webhooks, import, usage ingest and the store alone have
//! files of their own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use common::*;
use keygate::index::KeyStatus;

const ADMIN_TOKEN: &str = "kg-test-admin-token-7f3a9c";
const SYNC_TOKEN: &str = "kg-test-sync-token-2b8e41";

/// How long a change made through the admin API may take to reach a gateway
/// that is connected to the control plane it was made on.
const PROPAGATION: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

/// Admin address with one admin token (`ops`) and one sync token (`edge`), both
/// given through the environment.
const ADMIN_SECTION: &str = r#"admin:
  address: @ADMIN@
  tokens:
    - { name: ops, token: "${env:ADMIN_TOKEN}" }
  sync_tokens:
    - { name: edge, token: "${env:SYNC_TOKEN}" }
"#;

const PLANS: &str = "plans:
  free: { rate_limit: { requests: 1000, per: 1s } }
  pro: { rate_limit: { requests: 1000, per: 1s } }
";

/// A proxy listener, one upstream (`@UP@`) and two keyed routes:
/// `/v1/orders` needs `orders:read`, `/v1/reports` needs `reports:read`.
const PROXY_SECTION: &str = r#"listeners:
  - address: @LISTEN@
upstreams:
  api: { targets: ["@UP@"] }
routes:
  - { name: orders, match: { path_prefix: /v1/orders }, upstream: api, scopes: [orders:read] }
  - { name: reports, match: { path_prefix: /v1/reports }, upstream: api, scopes: [reports:read] }
access_log: off
"#;

/// The SQLite store inside a node's own temp dir.
const SQLITE_IN_NODE_DIR: &str = "sqlite://@DIR@/keygate.db";

/// Admin API, store and gateway in one process; usage goes to the store every second.
fn standalone(up: &Upstream, store_url: &str) -> Node {
    let template = format!(
        "mode: standalone\nnode_id: @NODE@\nthreads: 1\n{ADMIN_SECTION}store:\n  url: \"@STORE@\"\n{PLANS}\
         usage:\n  flush_interval: 1s\n{PROXY_SECTION}"
    );
    NodeBuilder::new(&template)
        .var("STORE", store_url)
        .var("UP", &up.addr())
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SYNC_TOKEN", SYNC_TOKEN)
        .start()
}

/// A control plane (no proxy listener) on `store_url`; not started yet.
fn control_plane_builder(store_url: &str) -> NodeBuilder {
    let template =
        format!("mode: control-plane\nnode_id: @NODE@\nthreads: 1\n{ADMIN_SECTION}store:\n  url: \"@STORE@\"\n{PLANS}");
    NodeBuilder::new(&template).var("STORE", store_url).env("ADMIN_TOKEN", ADMIN_TOKEN).env("SYNC_TOKEN", SYNC_TOKEN)
}

fn control_plane(store_url: &str) -> Node {
    control_plane_builder(store_url).start()
}

/// A gateway following the control plane at `cp`, with a cache file in its own
/// dir, `max_staleness: 0s`, and usage sent to the control plane every second.
fn gateway(up: &Upstream, cp: SocketAddr) -> Node {
    let template = gateway_template(
        "  cache_file: @DIR@/keys.snapshot\n  max_staleness: 0s\n",
        "usage:\n  flush_interval: 1s\n  sinks: [ { type: control_plane } ]\n",
    );
    NodeBuilder::new(&template).var("CP", &cp.to_string()).var("UP", &up.addr()).env("SYNC_TOKEN", SYNC_TOKEN).start()
}

/// A gateway following the control plane at `@CP@`; `keys` adds lines to its `keys:`
/// section and `rest` sections before the proxy's.
fn gateway_template(keys: &str, rest: &str) -> String {
    format!(
        r#"mode: gateway
node_id: @NODE@
threads: 1
admin:
  address: @ADMIN@
keys:
  source: control_plane
  control_plane: {{ url: "http://@CP@", token: "${{env:SYNC_TOKEN}}" }}
{keys}{PLANS}{rest}{PROXY_SECTION}"#
    )
}

/// Polls `/readyz` until it answers 200.
#[track_caller]
fn wait_ready(node: &Node, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let r = node.admin_get("/readyz");
        if r.status == 200 {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "/readyz on {} still {} {} after {within:?}\n--- output ---\n{}",
                node.admin,
                r.status,
                r.text(),
                node.output()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Admin API client
// ---------------------------------------------------------------------------

/// The admin API of one node, called with the `ops` admin token.
struct Api {
    addr: SocketAddr,
}

impl Api {
    fn of(node: &Node) -> Api {
        Api { addr: node.admin }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, value) = admin_json(method, self.addr, path, Some(ADMIN_TOKEN), body.as_ref());
        (status, value)
    }

    /// A call that must answer `want`; returns its JSON body.
    #[track_caller]
    fn expect(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (status, value) = self.call(method, path, body.clone());
        assert_eq!(status, want, "{method} {path} with {body:?}: expected {want}, got {status} {value}");
        value
    }

    /// `POST /v1/keys` that must answer 201; returns (raw key, record).
    #[track_caller]
    fn create(&self, body: Value) -> (String, Value) {
        let v = self.expect("POST", "/v1/keys", Some(body), 201);
        let raw = v["key"].as_str().unwrap_or_else(|| panic!("create answered no raw key: {v}")).to_owned();
        let record = v["record"].clone();
        assert_record(&record, &[&raw]);
        (raw, record)
    }

    /// A call that must fail with `status` `code`; returns the error message.
    #[track_caller]
    fn error(&self, method: &str, path: &str, body: Option<Value>, status: u16, code: &str) -> String {
        let r = admin_request(method, self.addr, path, Some(ADMIN_TOKEN), body.as_ref());
        assert_eq!(r.status, status, "{method} {path} with {body:?}: expected {status} {code}, got {}", r.text());
        assert_error(&r, status, code);
        r.json()["error"]["message"].as_str().unwrap_or_default().to_owned()
    }

    /// A call that must be refused as 400 `invalid_request` with a message naming `field`.
    #[track_caller]
    fn invalid(&self, method: &str, path: &str, body: Option<Value>, field: &str) -> String {
        let message = self.error(method, path, body.clone(), 400, "invalid_request");
        assert!(
            message.contains(field),
            "{method} {path} with {body:?}: the 400 message {message:?} does not name the field {field:?}"
        );
        message
    }

    /// Ids of one page of `GET /v1/keys?<query>`; every record is checked.
    #[track_caller]
    fn list_ids(&self, query: &str) -> BTreeSet<String> {
        let v = self.expect("GET", &format!("/v1/keys?{query}"), None, 200);
        let keys = v["keys"].as_array().unwrap_or_else(|| panic!("list answered no `keys` array: {v}"));
        assert!(v.get("next_cursor").is_some(), "list answer lacks next_cursor: {v}");
        keys.iter().map(|k| assert_record(k, &[])).collect()
    }
}

/// Checks a key record's shape: `key_` id, `masked` and `prefix`, no `hash` and
/// no raw key (none of `raws` appears anywhere in it). Returns its id.
#[track_caller]
fn assert_record(record: &Value, raws: &[&str]) -> String {
    let id = record["id"].as_str().unwrap_or_else(|| panic!("record without an id: {record}")).to_owned();
    assert!(id.starts_with("key_"), "key id {id:?} does not start with key_");
    let masked = record["masked"].as_str().unwrap_or_else(|| panic!("record without masked: {record}"));
    let prefix = record["prefix"].as_str().unwrap_or_else(|| panic!("record without prefix: {record}"));
    assert!(
        !prefix.is_empty() && masked.starts_with(prefix),
        "masked {masked:?} does not start with prefix {prefix:?}"
    );
    assert!(record.get("hash").is_none(), "the admin API shows a key's hash: {record}");
    assert!(record.get("key").is_none(), "a record carries a `key` field: {record}");
    let text = record.to_string();
    assert!(!text.contains("sha256:"), "a record carries a key hash: {record}");
    for raw in raws {
        assert!(!text.contains(raw), "a record contains the raw key: {record}");
        assert_ne!(masked, *raw, "masked form is the raw key");
    }
    id
}

// ---------------------------------------------------------------------------
// Requests through a gateway
// ---------------------------------------------------------------------------

/// "200" for a proxied answer, else "<status> <error code>".
fn outcome(r: &Response) -> String {
    if r.status == 200 && r.upstream().is_some() {
        return "200".to_owned();
    }
    let code = serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("(body {:?})", r.text()));
    format!("{} {code}", r.status)
}

fn call(gw: &Node, key: &str, path: &str) -> Response {
    gw.get(path, &[("x-api-key", key)])
}

/// Asserts one request answers `want` ("200" or "<status> <code>"), with the
/// error shape for a denial.
#[track_caller]
fn assert_outcome(r: &Response, want: &str) {
    assert_eq!(outcome(r), want, "unexpected answer: {} {}", r.status, r.text());
    if let Some((status, code)) = want.split_once(' ') {
        assert_error(r, status.parse().unwrap(), code);
    }
}

/// Polls `GET path` with `key` until the gateway answers `want`, counting every
/// answer in `tally` when one is given. Panics with the last answer after `within`.
#[track_caller]
fn poll_outcome(
    gw: &Node,
    key: &str,
    path: &str,
    want: &str,
    within: Duration,
    mut tally: Option<&mut Tally>,
) -> Response {
    let start = Instant::now();
    loop {
        let r = call(gw, key, path);
        if let Some(t) = tally.as_deref_mut() {
            t.count(&r);
        }
        let got = outcome(&r);
        if got == want {
            assert_outcome(&r, want);
            return r;
        }
        if start.elapsed() >= within {
            panic!(
                "gateway {} still answers {got} for GET {path} after {within:?}, want {want}\n--- gateway output ---\n{}",
                gw.listen,
                gw.output()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What a key's usage totals must be, counted on the client side: every answer
/// except `invalid_key`, which a gateway gives before it knows the key (a
/// request naming no known key is not counted, CONTRACT §8).
#[derive(Default, Debug)]
struct Tally {
    allowed: u64,
    denied: BTreeMap<String, u64>,
    classes: [u64; 4],
}

impl Tally {
    fn count(&mut self, r: &Response) {
        let got = outcome(r);
        if got.ends_with(" invalid_key") {
            return;
        }
        if got == "200" {
            self.allowed += 1;
        } else {
            let code = got.split_once(' ').map_or(got.as_str(), |(_, c)| c).to_owned();
            *self.denied.entry(code).or_default() += 1;
        }
        let class = usize::from(r.status / 100).clamp(2, 5) - 2;
        self.classes[class] += 1;
    }

    /// Polling a gateway until a new key works counts one request: the first 200.
    fn after_the_first_200() -> Tally {
        Tally { allowed: 1, classes: [1, 0, 0, 0], ..Tally::default() }
    }

    fn send(&mut self, gw: &Node, key: &str, path: &str) -> Response {
        let r = call(gw, key, path);
        self.count(&r);
        r
    }

    fn expected(&self) -> Value {
        json!({
            "requests": self.allowed + self.denied.values().sum::<u64>(),
            "allowed": self.allowed,
            "denied": self.denied,
            "status": {"2xx": self.classes[0], "3xx": self.classes[1], "4xx": self.classes[2], "5xx": self.classes[3]},
        })
    }
}

/// The comparable part of a usage `totals` (or bucket): denial codes with a
/// zero count are dropped.
fn comparable(totals: &Value) -> Value {
    let denied: BTreeMap<String, u64> = totals["denied"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| v.as_u64().filter(|n| *n > 0).map(|n| (k.clone(), n))).collect())
        .unwrap_or_default();
    json!({
        "requests": totals["requests"],
        "allowed": totals["allowed"],
        "denied": denied,
        "status": {
            "2xx": totals["status"]["2xx"],
            "3xx": totals["status"]["3xx"],
            "4xx": totals["status"]["4xx"],
            "5xx": totals["status"]["5xx"],
        },
    })
}

/// Polls `GET /v1/keys/{id}/usage` until its totals equal `expected`; returns the answer.
#[track_caller]
fn wait_usage_totals(api: &Api, key_id: &str, expected: &Value) -> Value {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let v = api.expect("GET", &format!("/v1/keys/{key_id}/usage"), None, 200);
        assert_eq!(v["key_id"], key_id, "usage answer for the wrong key: {v}");
        if comparable(&v["totals"]) == *expected {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("usage totals of {key_id} never became {expected} within {EVENTUALLY:?}; last answer {v}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// 1. The admin API, on SQLite and on PostgreSQL
// ---------------------------------------------------------------------------

#[test]
fn admin_api_manages_keys_end_to_end_on_sqlite() {
    admin_api_scenario(SQLITE_IN_NODE_DIR);
}

#[test]
fn admin_api_manages_keys_end_to_end_on_postgres() {
    let db = PgDb::create("keygate_cp_test");
    admin_api_scenario(&db.url);
}

/// The whole admin API against a standalone node whose store is `store_url`,
/// with every change checked through the node's own gateway.
fn admin_api_scenario(store_url: &str) {
    let up = Upstream::start("api");
    let node = standalone(&up, store_url);
    let api = Api::of(&node);

    let health = node.admin_get("/healthz");
    assert_eq!(health.status, 200, "/healthz: {}", health.text());
    assert_eq!(health.json(), json!({"status": "ok"}));
    wait_ready(&node, EVENTUALLY);

    admin_and_sync_tokens_are_kept_apart(&node, &api);
    let alpha = create_and_show(&node, &api, &up);
    let pages = list_filters_and_cursor_pagination(&api, &alpha.1);
    invalid_creates_are_refused(&api);
    patch_changes_what_the_gateway_enforces(&node, &api, &alpha);
    let victim = revoke_is_final_and_audited(&node, &api);
    rotate_keeps_the_old_key_for_the_grace_period(&node, &api);
    let deleted = delete_removes_the_key(&node, &api, &pages[5]);

    // Status filters over everything this scenario left behind.
    api.expect("PATCH", &format!("/v1/keys/{}", pages[2].1), Some(json!({"status": "disabled"})), 200);
    assert_eq!(api.list_ids("status=disabled&limit=1000"), BTreeSet::from([pages[2].1.clone()]));
    assert_eq!(api.list_ids("status=revoked&limit=1000"), BTreeSet::from([victim.clone()]));
    let active = api.list_ids("status=active&limit=1000");
    let all = api.list_ids("limit=1000");
    assert!(!all.contains(&deleted), "a deleted key is still listed");
    let mut expected_active = all.clone();
    expected_active.remove(&pages[2].1);
    expected_active.remove(&victim);
    assert_eq!(active, expected_active, "status=active must list every key but the disabled and revoked ones");
    assert!(active.contains(&alpha.1));

    usage_endpoint_reports_proxied_requests(&node, &api);

    let ready = node.admin_get("/readyz");
    assert_eq!(ready.status, 200, "/readyz at the end: {}", ready.text());
}

/// Admin calls refuse a missing, wrong or sync token with 401 `unauthorized`;
/// the sync feed refuses admin tokens and takes sync tokens.
fn admin_and_sync_tokens_are_kept_apart(node: &Node, api: &Api) {
    let calls: [(&str, &str, Option<Value>); 4] = [
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys", Some(json!({"name": "intruder"}))),
        ("GET", "/v1/keys/key_doesnotexist0000000", None),
        ("GET", "/v1/audit", None),
    ];
    for (what, token) in
        [("no token", None), ("a wrong token", Some("not-the-admin-token")), ("a sync token", Some(SYNC_TOKEN))]
    {
        for (method, path, body) in &calls {
            let r = admin_request(method, node.admin, path, token, body.as_ref());
            assert_eq!(r.status, 401, "{method} {path} with {what}: expected 401, got {} {}", r.status, r.text());
            assert_error(&r, 401, "unauthorized");
        }
    }
    for path in ["/v1/sync/snapshot", "/v1/sync/changes?since=0&wait_ms=0"] {
        let r = admin_request("GET", node.admin, path, Some(ADMIN_TOKEN), None);
        assert_eq!(r.status, 401, "GET {path} with the admin token: expected 401, got {} {}", r.status, r.text());
        assert_error(&r, 401, "unauthorized");
        let r = admin_request("GET", node.admin, path, Some(SYNC_TOKEN), None);
        assert_eq!(r.status, 200, "GET {path} with the sync token: {}", r.text());
    }
    let r = admin_request("POST", node.admin, "/v1/sync/usage", Some(ADMIN_TOKEN), Some(&json!({})));
    assert_error(&r, 401, "unauthorized");
    // The refused create created nothing.
    assert!(api.list_ids("").is_empty(), "a refused call created a key");
}

/// Creates `alpha`, which the gateway then accepts; returns (raw key, id).
fn create_and_show(node: &Node, api: &Api, up: &Upstream) -> (String, String) {
    let (raw, record) = api.create(json!({
        "name": "alpha",
        "owner": "acme",
        "plan": "pro",
        "scopes": ["orders:read"],
        "tags": ["blue"],
        "metadata": {"team": "payments"},
    }));
    assert!(raw.starts_with("kg_live_"), "a new key has the default prefix kg_live_: {raw:?}");
    assert_eq!(record["prefix"], "kg_live");
    assert_eq!(record["name"], "alpha");
    assert_eq!(record["owner"], "acme");
    assert_eq!(record["plan"], "pro");
    assert_eq!(record["scopes"], json!(["orders:read"]));
    assert_eq!(record["tags"], json!(["blue"]));
    assert_eq!(record["metadata"], json!({"team": "payments"}));
    assert_eq!(record["status"], "active");
    let id = record["id"].as_str().unwrap().to_owned();

    poll_outcome(node, &raw, "/v1/orders/1", "200", PROPAGATION, None);
    assert_eq!(up.last().header("x-keygate-key-id"), Some(id.as_str()), "the upstream saw another key id");

    let shown = api.expect("GET", &format!("/v1/keys/{id}"), None, 200);
    assert_record(&shown, &[&raw]);
    for field in
        ["id", "name", "owner", "plan", "scopes", "tags", "metadata", "status", "masked", "prefix", "created_at"]
    {
        assert_eq!(shown[field], record[field], "GET shows another {field} than create answered");
    }
    api.error("GET", "/v1/keys/key_doesnotexist0000000", None, 404, "not_found");
    (raw, id)
}

/// Seven more keys; every filter, and `limit=3` pages followed by `next_cursor`.
/// Returns the seven as (raw, id), `page-0` to `page-6`.
fn list_filters_and_cursor_pagination(api: &Api, alpha: &str) -> Vec<(String, String)> {
    let mut pages = Vec::new();
    for i in 0..7 {
        let mut body = json!({"name": format!("page-{i}"), "owner": "pager", "scopes": ["orders:read"]});
        body["tags"] = if i % 2 == 1 { json!(["page", "odd"]) } else { json!(["page"]) };
        if i % 2 == 0 {
            body["plan"] = json!("free");
        }
        let (raw, record) = api.create(body);
        pages.push((raw, record["id"].as_str().unwrap().to_owned()));
    }
    let ids = |pick: &[usize]| pick.iter().map(|&i| pages[i].1.clone()).collect::<BTreeSet<_>>();
    let everyone: BTreeSet<String> = pages.iter().map(|p| p.1.clone()).chain([alpha.to_owned()]).collect();

    assert_eq!(api.list_ids("owner=pager"), ids(&[0, 1, 2, 3, 4, 5, 6]), "owner filter");
    assert_eq!(api.list_ids("owner=acme"), BTreeSet::from([alpha.to_owned()]), "owner filter");
    assert_eq!(api.list_ids("plan=free"), ids(&[0, 2, 4, 6]), "plan filter");
    assert_eq!(api.list_ids("plan=pro"), BTreeSet::from([alpha.to_owned()]), "plan filter");
    assert_eq!(api.list_ids("tag=odd"), ids(&[1, 3, 5]), "tag filter");
    assert_eq!(api.list_ids("tag=page&plan=free"), ids(&[0, 2, 4, 6]), "tag and plan filters together");
    assert_eq!(api.list_ids("q=page-3"), ids(&[3]), "q filter on the name");
    assert_eq!(api.list_ids("q=PAGE-3"), ids(&[3]), "q is case-insensitive");
    assert_eq!(api.list_ids(&format!("q={}", &alpha[4..])), BTreeSet::from([alpha.to_owned()]), "q filter on the id");
    assert_eq!(api.list_ids("status=active"), everyone, "status filter");
    assert!(api.list_ids("status=disabled").is_empty(), "status filter");
    assert!(api.list_ids("owner=nobody").is_empty(), "owner filter");
    assert_eq!(api.list_ids(""), everyone, "unfiltered list");

    for (query, want, page_sizes) in [
        ("owner=pager&limit=3", ids(&[0, 1, 2, 3, 4, 5, 6]), vec![3, 3, 1]),
        ("limit=3", everyone.clone(), vec![3, 3, 2]),
    ] {
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/keys?{query}&cursor={c}"),
                None => format!("/v1/keys?{query}"),
            };
            let v = api.expect("GET", &path, None, 200);
            let keys = v["keys"].as_array().unwrap_or_else(|| panic!("no keys array: {v}"));
            sizes.push(keys.len());
            seen.extend(keys.iter().map(|k| assert_record(k, &[])));
            match &v["next_cursor"] {
                Value::String(c) if !c.is_empty() => cursor = Some(c.clone()),
                Value::Null => break,
                other => panic!("next_cursor must be a cursor string or null, got {other}"),
            }
            assert!(sizes.len() < 10, "{query}: pagination does not end (pages so far {sizes:?})");
        }
        let distinct: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(distinct.len(), seen.len(), "{query}: a key was listed twice across pages: {seen:?}");
        assert_eq!(distinct, want, "{query}: pages do not cover exactly the matching keys");
        assert_eq!(sizes, page_sizes, "{query}: page sizes");
    }

    // Raw keys are shown once, at creation: never in a listing.
    let listing = api.expect("GET", "/v1/keys?limit=1000", None, 200).to_string();
    for (raw, _) in &pages {
        assert!(!listing.contains(raw.as_str()), "the key listing contains a raw key");
    }

    api.invalid("GET", "/v1/keys?status=bogus", None, "status");
    api.invalid("GET", "/v1/keys?limit=0", None, "limit");
    api.invalid("GET", "/v1/keys?limit=lots", None, "limit");
    api.invalid("GET", "/v1/keys?cursor=not-a-cursor", None, "cursor");
    pages
}

/// Bad create bodies: 400 naming the field, and nothing created.
fn invalid_creates_are_refused(api: &Api) {
    let before = api.list_ids("limit=1000");
    let cases = [
        (json!({"owner": "acme"}), "name"),
        (json!({"name": "x", "colour": "red"}), "colour"),
        (json!({"name": "x", "ip_allowlist": ["10.0.0.0/33"]}), "ip_allowlist[0]"),
        (json!({"name": "x", "ip_allowlist": ["127.0.0.1/32", "not-an-ip"]}), "ip_allowlist[1]"),
        (json!({"name": "x", "plan": "platinum"}), "plan"),
        (json!({"name": "x", "expires_at": "next tuesday"}), "expires_at"),
        (json!({"name": "x", "ttl": "soon"}), "ttl"),
        (json!({"name": "x", "rate_limit": {"requests": 10, "per": "fortnight"}}), "rate_limit"),
        (json!({"name": "x", "quota": {"requests": 10, "per": "day", "by": "team"}}), "quota.by"),
        (json!({"name": "x", "scopes": "orders:read"}), "scopes"),
    ];
    for (body, field) in cases {
        let message = api.invalid("POST", "/v1/keys", Some(body), field);
        if field == "plan" {
            assert!(message.contains("unknown plan"), "unknown plan message: {message:?}");
        }
    }
    assert_eq!(api.list_ids("limit=1000"), before, "a refused create created a key");
}

/// PATCH of name, scopes, ip_allowlist and status, each seen at the gateway;
/// bad fields are refused naming the field and change nothing.
fn patch_changes_what_the_gateway_enforces(node: &Node, api: &Api, alpha: &(String, String)) {
    let (raw, id) = alpha;
    let path = format!("/v1/keys/{id}");
    let v = api.expect(
        "PATCH",
        &path,
        Some(json!({"name": "alpha-renamed", "scopes": ["orders:*"], "ip_allowlist": ["127.0.0.1/32", "::1/128"]})),
        200,
    );
    assert_record(&v, &[raw]);
    assert_eq!(v["name"], "alpha-renamed");
    assert_eq!(v["scopes"], json!(["orders:*"]));
    assert_eq!(v["ip_allowlist"], json!(["127.0.0.1/32", "::1/128"]));
    assert_eq!(v["owner"], "acme", "PATCH changed a field it was not given");
    let shown = api.expect("GET", &path, None, 200);
    for field in ["name", "scopes", "ip_allowlist", "owner", "plan", "tags"] {
        assert_eq!(shown[field], v[field], "GET after PATCH shows another {field}");
    }

    api.expect("PATCH", &path, Some(json!({"ip_allowlist": ["10.0.0.0/8"]})), 200);
    poll_outcome(node, raw, "/v1/orders/1", "403 ip_not_allowed", PROPAGATION, None);
    api.expect("PATCH", &path, Some(json!({"ip_allowlist": ["127.0.0.0/8"]})), 200);
    poll_outcome(node, raw, "/v1/orders/1", "200", PROPAGATION, None);

    api.expect("PATCH", &path, Some(json!({"scopes": ["reports:read"]})), 200);
    poll_outcome(node, raw, "/v1/orders/1", "403 insufficient_scope", PROPAGATION, None);
    assert_outcome(&call(node, raw, "/v1/reports/1"), "200");
    api.expect("PATCH", &path, Some(json!({"scopes": ["orders:*"]})), 200);
    poll_outcome(node, raw, "/v1/orders/1", "200", PROPAGATION, None);

    let v = api.expect("PATCH", &path, Some(json!({"status": "disabled"})), 200);
    assert_eq!(v["status"], "disabled");
    poll_outcome(node, raw, "/v1/orders/1", "403 key_disabled", PROPAGATION, None);
    let v = api.expect("PATCH", &path, Some(json!({"status": "active"})), 200);
    assert_eq!(v["status"], "active");
    poll_outcome(node, raw, "/v1/orders/1", "200", PROPAGATION, None);

    let settled = api.expect("GET", &path, None, 200);
    let cases = [
        (json!({"ip_allowlist": ["300.1.1.1"]}), "ip_allowlist[0]"),
        (json!({"ip_allowlist": ["127.0.0.1", "10.0.0.0/99"]}), "ip_allowlist[1]"),
        (json!({"plan": "platinum"}), "plan"),
        (json!({"ttl": "whenever"}), "ttl"),
        (json!({"expires_at": "next tuesday"}), "expires_at"),
        (json!({"rate_limit": {"requests": 10, "per": "fortnight"}}), "rate_limit"),
        (json!({"colour": "red"}), "colour"),
        (json!({"name": "sneaky", "colour": "red"}), "colour"),
        (json!({"status": "revoked"}), "status"),
        (json!({"status": "sleeping"}), "status"),
    ];
    for (body, field) in cases {
        let message = api.invalid("PATCH", &path, Some(body), field);
        if field == "plan" {
            assert!(message.contains("unknown plan"), "unknown plan message: {message:?}");
        }
    }
    let after = api.expect("GET", &path, None, 200);
    for field in ["name", "plan", "scopes", "ip_allowlist", "status", "expires_at", "rate_limit", "updated_at"] {
        assert_eq!(after[field], settled[field], "a refused PATCH changed {field}");
    }
    api.error("PATCH", "/v1/keys/key_doesnotexist0000000", Some(json!({"name": "x"})), 404, "not_found");
    poll_outcome(node, raw, "/v1/orders/1", "200", PROPAGATION, None);
}

/// Revoke: the gateway answers `key_revoked`, later PATCHes and rotations are
/// 409, and the audit log has the key's history newest first, by `ops`.
/// Returns the revoked key's id.
fn revoke_is_final_and_audited(node: &Node, api: &Api) -> String {
    let (raw, record) = api.create(json!({"name": "victim", "scopes": ["orders:read"]}));
    let id = record["id"].as_str().unwrap().to_owned();
    poll_outcome(node, &raw, "/v1/orders/1", "200", PROPAGATION, None);
    api.expect("PATCH", &format!("/v1/keys/{id}"), Some(json!({"name": "victim-2"})), 200);

    let v = api.expect("POST", &format!("/v1/keys/{id}/revoke"), None, 200);
    assert_record(&v, &[&raw]);
    assert_eq!(v["status"], "revoked");
    poll_outcome(node, &raw, "/v1/orders/1", "401 key_revoked", PROPAGATION, None);
    assert_eq!(api.expect("GET", &format!("/v1/keys/{id}"), None, 200)["status"], "revoked");

    api.error("PATCH", &format!("/v1/keys/{id}"), Some(json!({"name": "back"})), 409, "conflict");
    api.error("PATCH", &format!("/v1/keys/{id}"), Some(json!({"status": "active"})), 409, "conflict");
    api.error("POST", &format!("/v1/keys/{id}/rotate"), Some(json!({"grace_period": "1h"})), 409, "conflict");
    assert_eq!(api.expect("GET", &format!("/v1/keys/{id}"), None, 200)["status"], "revoked", "revocation is final");
    assert_outcome(&call(node, &raw, "/v1/orders/1"), "401 key_revoked");
    api.error("POST", "/v1/keys/key_doesnotexist0000000/revoke", None, 404, "not_found");

    let audit = api.expect("GET", &format!("/v1/audit?key_id={id}"), None, 200);
    let events = audit["events"].as_array().unwrap_or_else(|| panic!("audit answered no events array: {audit}"));
    let actions: Vec<&str> = events.iter().map(|e| e["action"].as_str().unwrap_or("")).collect();
    assert_eq!(actions.len(), 3, "the key's audit trail is create, update, revoke: {audit}");
    assert!(actions[0].contains("revoke"), "newest first: {actions:?}");
    assert!(actions[1].contains("update"), "newest first: {actions:?}");
    assert!(actions[2].contains("create"), "newest first: {actions:?}");
    for e in events {
        assert_eq!(e["actor"], "ops", "actor is the admin token's name: {e}");
        assert_eq!(e["key_id"], id.as_str(), "audit filtered by key_id: {e}");
        assert!(e["at"].as_str().is_some_and(|at| OffsetDateTime::parse(at, &Rfc3339).is_ok()), "bad `at`: {e}");
        assert!(e.get("id").is_some() && e.get("details").is_some(), "audit event lacks id or details: {e}");
    }
    let ats: Vec<OffsetDateTime> =
        events.iter().map(|e| OffsetDateTime::parse(e["at"].as_str().unwrap(), &Rfc3339).unwrap()).collect();
    assert!(ats.windows(2).all(|w| w[0] >= w[1]), "audit events are not newest first: {ats:?}");
    assert!(!audit.to_string().contains(&raw), "the audit log contains a raw key");

    let limited = api.expect("GET", &format!("/v1/audit?key_id={id}&limit=2"), None, 200);
    let limited: Vec<&Value> = limited["events"].as_array().unwrap().iter().collect();
    assert_eq!(limited.len(), 2, "audit limit=2");
    assert_eq!(limited[0]["id"], events[0]["id"]);
    assert_eq!(limited[1]["id"], events[1]["id"]);
    id
}

/// Rotation: a new key that works at once, the old one working through its
/// grace period and `key_expired` after it.
fn rotate_keeps_the_old_key_for_the_grace_period(node: &Node, api: &Api) {
    let (old_raw, old) = api.create(json!({"name": "rotor", "owner": "acme", "scopes": ["orders:read"]}));
    let old_id = old["id"].as_str().unwrap().to_owned();
    poll_outcome(node, &old_raw, "/v1/orders/1", "200", PROPAGATION, None);

    let before = OffsetDateTime::now_utc();
    let v = api.expect("POST", &format!("/v1/keys/{old_id}/rotate"), Some(json!({"grace_period": "1h"})), 201);
    let new_raw = v["key"].as_str().unwrap_or_else(|| panic!("rotate answered no raw key: {v}")).to_owned();
    let new_id = assert_record(&v["record"], &[&new_raw, &old_raw]);
    assert_ne!(new_raw, old_raw, "rotation must mint a new key");
    assert_ne!(new_id, old_id, "the rotated key gets a new id");
    assert_eq!(v["record"]["name"], "rotor");
    assert_eq!(v["record"]["owner"], "acme");
    assert_eq!(v["record"]["scopes"], json!(["orders:read"]));
    assert_eq!(v["record"]["prefix"], old["prefix"]);
    poll_outcome(node, &new_raw, "/v1/orders/1", "200", PROPAGATION, None);
    assert_outcome(&call(node, &old_raw, "/v1/orders/1"), "200");
    let old_now = api.expect("GET", &format!("/v1/keys/{old_id}"), None, 200);
    let expires = old_now["expires_at"]
        .as_str()
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
        .unwrap_or_else(|| panic!("the rotated-from key has no expires_at: {old_now}"));
    let grace = expires - before;
    assert!(
        grace >= time::Duration::seconds(3590) && grace <= time::Duration::seconds(3660),
        "the old key must expire when the 1h grace period ends, expires_at {expires} is {grace} after the rotation"
    );

    // A one-second grace period: the old key ends with key_expired.
    let (old_raw, old) = api.create(json!({"name": "short", "scopes": ["orders:read"]}));
    let old_id = old["id"].as_str().unwrap().to_owned();
    poll_outcome(node, &old_raw, "/v1/orders/1", "200", PROPAGATION, None);
    let rotated = Instant::now();
    let v = api.expect("POST", &format!("/v1/keys/{old_id}/rotate"), Some(json!({"grace_period": "1s"})), 201);
    let new_raw = v["key"].as_str().unwrap().to_owned();
    if rotated.elapsed() < Duration::from_millis(500) {
        assert_outcome(&call(node, &old_raw, "/v1/orders/1"), "200");
    }
    poll_outcome(node, &new_raw, "/v1/orders/1", "200", PROPAGATION, None);
    poll_outcome(node, &old_raw, "/v1/orders/1", "401 key_expired", Duration::from_secs(5), None);
    let after = rotated.elapsed();
    assert!(after >= Duration::from_millis(900), "the old key expired {after:?} after a rotation with a 1 s grace");
    assert_outcome(&call(node, &new_raw, "/v1/orders/1"), "200");

    api.invalid(
        "POST",
        &format!("/v1/keys/{new_id}/rotate"),
        Some(json!({"grace_period": "eventually"})),
        "grace_period",
    );
    api.invalid("POST", &format!("/v1/keys/{new_id}/rotate"), Some(json!({"grace": "1h"})), "grace");
    api.error("POST", "/v1/keys/key_doesnotexist0000000/rotate", Some(json!({"grace_period": "1h"})), 404, "not_found");
}

/// DELETE: 204, then 404 everywhere and `invalid_key` at the gateway; audited.
/// Returns the deleted id.
fn delete_removes_the_key(node: &Node, api: &Api, key: &(String, String)) -> String {
    let (raw, id) = key;
    poll_outcome(node, raw, "/v1/orders/1", "200", PROPAGATION, None);
    let r = admin_request("DELETE", node.admin, &format!("/v1/keys/{id}"), Some(ADMIN_TOKEN), None);
    assert_eq!(r.status, 204, "DELETE: {}", r.text());
    assert!(r.body.is_empty(), "204 with a body: {}", r.text());
    api.error("GET", &format!("/v1/keys/{id}"), None, 404, "not_found");
    poll_outcome(node, raw, "/v1/orders/1", "401 invalid_key", PROPAGATION, None);
    api.error("DELETE", &format!("/v1/keys/{id}"), None, 404, "not_found");
    api.error("PATCH", &format!("/v1/keys/{id}"), Some(json!({"name": "x"})), 404, "not_found");

    let audit = api.expect("GET", "/v1/audit?limit=1", None, 200);
    let events = audit["events"].as_array().unwrap_or_else(|| panic!("no events array: {audit}"));
    assert_eq!(events.len(), 1, "audit limit=1: {audit}");
    assert!(events[0]["action"].as_str().is_some_and(|a| a.contains("delete")), "newest event is the delete: {audit}");
    assert_eq!(events[0]["key_id"], id.as_str());
    assert_eq!(events[0]["actor"], "ops");
    id.clone()
}

/// Requests through the gateway show up in the key's usage, exactly.
fn usage_endpoint_reports_proxied_requests(node: &Node, api: &Api) {
    let (raw, record) = api.create(json!({"name": "meter", "scopes": ["orders:read"]}));
    let id = record["id"].as_str().unwrap().to_owned();
    let mut tally = Tally::default();
    poll_outcome(node, &raw, "/v1/orders/1", "200", PROPAGATION, Some(&mut tally));
    for _ in 0..3 {
        assert_outcome(&tally.send(node, &raw, "/v1/orders/1"), "200");
    }
    assert_outcome(&tally.send(node, &raw, "/v1/reports/1"), "403 insufficient_scope");
    api.expect("PATCH", &format!("/v1/keys/{id}"), Some(json!({"status": "disabled"})), 200);
    poll_outcome(node, &raw, "/v1/orders/1", "403 key_disabled", PROPAGATION, Some(&mut tally));
    assert_outcome(&tally.send(node, &raw, "/v1/orders/1"), "403 key_disabled");
    assert!(tally.allowed >= 4 && tally.denied.get("key_disabled").copied().unwrap_or(0) >= 2, "{tally:?}");

    let usage = wait_usage_totals(api, &id, &tally.expected());
    assert!(usage["totals"]["bytes_out"].as_u64().is_some_and(|n| n > 0), "no bytes_out counted: {usage}");

    // Minute buckets add up to the same totals.
    let minutes = api.expect("GET", &format!("/v1/keys/{id}/usage?granularity=minute"), None, 200);
    let buckets = minutes["buckets"].as_array().unwrap_or_else(|| panic!("no buckets array: {minutes}"));
    assert!(!buckets.is_empty(), "usage with requests but no buckets: {minutes}");
    let requests: u64 = buckets.iter().map(|b| b["requests"].as_u64().unwrap_or(0)).sum();
    let allowed: u64 = buckets.iter().map(|b| b["allowed"].as_u64().unwrap_or(0)).sum();
    assert_eq!((requests, allowed), (tally.expected()["requests"].as_u64().unwrap(), tally.allowed), "{minutes}");
    assert_eq!(comparable(&minutes["totals"]), tally.expected(), "minute granularity totals");

    api.invalid("GET", &format!("/v1/keys/{id}/usage?granularity=fortnight"), None, "granularity");
    api.invalid("GET", &format!("/v1/keys/{id}/usage?from=yesterday"), None, "from");
    api.error("GET", "/v1/keys/key_doesnotexist0000000/usage", None, 404, "not_found");
}

// ---------------------------------------------------------------------------
// 2-5, 7, 8: gateways following control planes
// ---------------------------------------------------------------------------

#[test]
fn key_changes_reach_every_gateway_following_one_control_plane_within_two_seconds() {
    let up = Upstream::start("api");
    let cp = control_plane(SQLITE_IN_NODE_DIR);
    let gws = [gateway(&up, cp.admin), gateway(&up, cp.admin)];
    for gw in &gws {
        wait_ready(gw, EVENTUALLY);
    }
    let api = Api::of(&cp);

    let (raw, record) = api.create(json!({"name": "shared", "scopes": ["orders:read"]}));
    let id = record["id"].as_str().unwrap().to_owned();
    for gw in &gws {
        poll_outcome(gw, &raw, "/v1/orders/1", "200", PROPAGATION, None);
    }

    let revoked = Instant::now();
    api.expect("POST", &format!("/v1/keys/{id}/revoke"), None, 200);
    for gw in &gws {
        let left = PROPAGATION.saturating_sub(revoked.elapsed());
        poll_outcome(gw, &raw, "/v1/orders/1", "401 key_revoked", left, None);
    }
}

#[test]
fn gateways_keep_serving_through_a_control_plane_crash_and_follow_it_after_restart() {
    let up = Upstream::start("api");
    let mut cp = control_plane(SQLITE_IN_NODE_DIR);
    let gw = gateway(&up, cp.admin);
    wait_ready(&gw, EVENTUALLY);
    let api = Api::of(&cp);
    let (a, _) = api.create(json!({"name": "a", "scopes": ["orders:read"]}));
    let (b, b_record) = api.create(json!({"name": "b", "scopes": ["orders:read"]}));
    let b_id = b_record["id"].as_str().unwrap().to_owned();
    poll_outcome(&gw, &a, "/v1/orders/1", "200", PROPAGATION, None);
    poll_outcome(&gw, &b, "/v1/orders/1", "200", PROPAGATION, None);

    let errors_before = gw.metric("keygate_sync_errors_total").unwrap_or(0.0);
    cp.kill();
    assert!(try_send_to(cp.admin, &request("GET", "/healthz", &[])).is_err(), "the control plane still answers");
    // Wait until the gateway has noticed the outage, then check it still serves.
    wait_until(EVENTUALLY, "the gateway to count a failed sync after the control plane died", || {
        (gw.metric("keygate_sync_errors_total").unwrap_or(0.0) > errors_before).then_some(())
    });
    for _ in 0..3 {
        assert_outcome(&call(&gw, &a, "/v1/orders/1"), "200");
        assert_outcome(&call(&gw, &b, "/v1/orders/1"), "200");
    }
    assert_eq!(gw.admin_get("/readyz").status, 200, "the gateway went unready during the outage");

    cp.restart();
    let api = Api::of(&cp);
    api.expect("POST", &format!("/v1/keys/{b_id}/revoke"), None, 200);
    let (c, _) = api.create(json!({"name": "c", "scopes": ["orders:read"]}));
    // The follower may be in its back-off (at most 5 s) when the control plane returns.
    poll_outcome(&gw, &b, "/v1/orders/1", "401 key_revoked", EVENTUALLY, None);
    poll_outcome(&gw, &c, "/v1/orders/1", "200", PROPAGATION, None);
    assert_outcome(&call(&gw, &a, "/v1/orders/1"), "200");
}

#[test]
fn gateway_restarted_while_the_control_plane_is_down_serves_its_cache_file() {
    let up = Upstream::start("api");
    let mut cp = control_plane(SQLITE_IN_NODE_DIR);
    let mut gw = gateway(&up, cp.admin);
    wait_ready(&gw, EVENTUALLY);
    let api = Api::of(&cp);
    let (good, good_record) = api.create(json!({"name": "good", "scopes": ["orders:read"]}));
    let good_id = good_record["id"].as_str().unwrap().to_owned();
    let (bad, bad_record) = api.create(json!({"name": "bad", "scopes": ["orders:read"]}));
    let bad_id = bad_record["id"].as_str().unwrap().to_owned();
    poll_outcome(&gw, &bad, "/v1/orders/1", "200", PROPAGATION, None);
    api.expect("POST", &format!("/v1/keys/{bad_id}/revoke"), None, 200);
    poll_outcome(&gw, &bad, "/v1/orders/1", "401 key_revoked", PROPAGATION, None);
    poll_outcome(&gw, &good, "/v1/orders/1", "200", PROPAGATION, None);

    // The cache files are written beside the request path; wait until they hold the revocation.
    let cache = gw.dir().join("keys.snapshot");
    wait_until(EVENTUALLY, "the gateway's cache file to record the revocation", || {
        let loaded = keygate::sync::LastKnownGood::new(cache.clone()).load().ok()?;
        let status =
            |raw: &str| loaded.snapshot.get(&keygate::key::KeyDigest::of(raw)).map(|r| (r.id().to_owned(), r.status));
        (status(&bad) == Some((bad_id.clone(), KeyStatus::Revoked))
            && status(&good) == Some((good_id.clone(), KeyStatus::Active)))
        .then_some(())
    });

    cp.kill();
    gw.kill();
    assert!(try_send_to(cp.admin, &request("GET", "/healthz", &[])).is_err(), "the control plane still answers");
    gw.restart();
    wait_ready(&gw, EVENTUALLY);
    assert_outcome(&call(&gw, &good, "/v1/orders/1"), "200");
    assert_outcome(&call(&gw, &bad, "/v1/orders/1"), "401 key_revoked");
    let (stranger, _) = gen_key(None);
    assert_outcome(&call(&gw, &stranger, "/v1/orders/1"), "401 invalid_key");
    assert_eq!(gw.admin_get("/readyz").status, 200);
}

#[test]
fn a_gateway_restarted_from_its_cache_files_applies_changes_made_while_it_was_down_before_serving() {
    let up = Upstream::start("api");
    let cp = control_plane(SQLITE_IN_NODE_DIR);
    let mut gw = gateway(&up, cp.admin);
    wait_ready(&gw, EVENTUALLY);
    let api = Api::of(&cp);
    let (raw, record) = api.create(json!({"name": "k", "scopes": ["orders:read"]}));
    let id = record["id"].as_str().unwrap().to_owned();
    poll_outcome(&gw, &raw, "/v1/orders/1", "200", PROPAGATION, None);
    let cache = gw.dir().join("keys.snapshot");
    wait_until(EVENTUALLY, "the gateway's cache files to hold the key", || {
        let loaded = keygate::sync::LastKnownGood::new(cache.clone()).load().ok()?;
        loaded.snapshot.get(&keygate::key::KeyDigest::of(&raw)).map(|_| ())
    });
    gw.kill();
    api.expect("POST", &format!("/v1/keys/{id}/revoke"), None, 200);
    gw.restart();
    // The first answer that is not `not_ready` already knows of the revocation.
    let first = wait_until(EVENTUALLY, "the gateway to serve", || {
        let r = call(&gw, &raw, "/v1/orders/1");
        (outcome(&r) != "503 not_ready").then_some(r)
    });
    assert_outcome(&first, "401 key_revoked");
}

/// Writes a last-known-good file holding `keys` (store records) at `version`, as a
/// gateway's sync would have.
fn write_cache_file(path: &std::path::Path, version: u64, keys: &[Value]) {
    use keygate::index::wire::{Frame, FrameWriter};
    let stored: Vec<keygate::control::model::StoredKey> =
        keys.iter().map(|k| serde_json::from_value(k.clone()).expect("a store record")).collect();
    let wire: Vec<_> = stored.iter().map(|k| keygate::control::snapshot::wire_key(k).expect("a usable hash")).collect();
    let mut out = FrameWriter::create(std::fs::File::create(path).unwrap()).unwrap();
    out.write(&Frame::Start { version, keys: wire.len() as u64, id: 1 }).unwrap();
    let count = wire.len() as u64;
    out.write(&Frame::Keys(wire)).unwrap();
    out.write(&Frame::End { version, keys: count }).unwrap();
}

/// One key in the form of the store's record.
fn cached_key(id: &str, hash: &str, ip_allowlist: &[&str]) -> Value {
    json!({
        "id": id, "hash": hash, "prefix": "kg_live", "masked": "kg_live_Ab3d…x9Zq", "name": id,
        "owner": null, "plan": null, "scopes": ["orders:read"], "ip_allowlist": ip_allowlist,
        "rate_limit": null, "quota": null, "status": "active", "expires_at": null, "metadata": {}, "tags": [],
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "last_used_at": null,
        "version": 1
    })
}

/// A gateway whose control plane is down, serving the keys of `cache` (written by
/// a sync before it started).
fn gateway_from_cache(up: &Upstream, cache: &std::path::Path) -> Node {
    let template = gateway_template("  cache_file: @CACHE@\n", "");
    let gw = NodeBuilder::new(&template)
        .var("CP", &format!("127.0.0.1:{}", free_port()))
        .var("CACHE", &cache.display().to_string())
        .var("UP", &up.addr())
        .env("SYNC_TOKEN", SYNC_TOKEN)
        .start();
    wait_ready(&gw, EVENTUALLY);
    gw
}

#[test]
fn a_key_whose_allowlist_has_an_unusable_entry_admits_no_address() {
    let up = Upstream::start("api");
    let (good, good_hash) = gen_key(None);
    let (half_bad, half_bad_hash) = gen_key(None);
    let (all_bad, all_bad_hash) = gen_key(None);
    // The control plane is down, so the gateway serves the keys of its cache file,
    // written (say) by a version that parsed allowlist entries differently.
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("keys.snapshot");
    write_cache_file(
        &cache,
        1,
        &[
            cached_key("key_good", &good_hash, &["127.0.0.1/32"]),
            cached_key("key_half_bad", &half_bad_hash, &["127.0.0.1/32", "127.0.0.1/33"]),
            cached_key("key_all_bad", &all_bad_hash, &["localhost"]),
        ],
    );
    let gw = gateway_from_cache(&up, &cache);
    assert_outcome(&call(&gw, &good, "/v1/orders/1"), "200");
    assert_outcome(&call(&gw, &half_bad, "/v1/orders/1"), "403 ip_not_allowed");
    assert_outcome(&call(&gw, &all_bad, "/v1/orders/1"), "403 ip_not_allowed");
    assert_eq!(gw.metric("keygate_key_allowlist_errors_total"), Some(2.0), "{}", gw.output());
    let output = gw.output();
    assert!(output.contains("key_half_bad") && output.contains("key_all_bad"), "no log names the keys:\n{output}");
}

#[test]
fn a_stored_rate_limit_beyond_what_the_limiter_keeps_is_enforced_as_reported() {
    let up = Upstream::start("api");
    let (raw, hash) = gen_key(None);
    // Stored before validation refused it: a burst of 2^32 - 1, one a minute.
    let mut key = cached_key("key_huge_burst", &hash, &[]);
    key["rate_limit"] = json!({"requests": 1, "per": "1m", "burst": 4294967295u64});
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("keys.snapshot");
    write_cache_file(&cache, 1, &[key]);
    let gw = gateway_from_cache(&up, &cache);
    let header = |r: &Response, name: &str| -> u64 {
        r.header(name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {name} in {} {}", r.status, r.text()))
    };
    let first = call(&gw, &raw, "/v1/orders/1");
    assert_outcome(&first, "200");
    let limit = header(&first, "ratelimit-limit");
    assert!(limit < u64::from(u32::MAX), "RateLimit-Limit {limit} is not what can be enforced");
    assert_eq!(header(&first, "ratelimit-remaining"), limit - 1);
    let second = call(&gw, &raw, "/v1/orders/1");
    assert_outcome(&second, "200");
    assert_eq!((header(&second, "ratelimit-limit"), header(&second, "ratelimit-remaining")), (limit, limit - 2));
}

#[test]
fn admin_api_refuses_limits_the_limiter_cannot_honour_naming_the_field() {
    let cp = control_plane(SQLITE_IN_NODE_DIR);
    let api = Api::of(&cp);
    let (_, record) = api.create(json!({"name": "limited"}));
    let id = record["id"].as_str().unwrap().to_owned();
    let cases = [
        (json!({"rate_limit": {"requests": 1, "per": "1m", "burst": 4294967295u64}}), "rate_limit.burst"),
        (json!({"rate_limit": {"requests": 1, "per": "50000d"}}), "rate_limit.per"),
        (json!({"rate_limit": {"requests": 4000000000u64, "per": "1s"}}), "rate_limit.requests"),
        (json!({"quota": {"requests": 2000000000000u64, "per": "day"}}), "quota.requests"),
    ];
    for (fields, field) in cases {
        let mut body = fields.clone();
        body["name"] = json!("x");
        api.invalid("POST", "/v1/keys", Some(body), field);
        api.invalid("PATCH", &format!("/v1/keys/{id}"), Some(fields), field);
    }
    let unchanged = api.expect("GET", &format!("/v1/keys/{id}"), None, 200);
    assert_eq!((&unchanged["rate_limit"], &unchanged["quota"]), (&Value::Null, &Value::Null), "{unchanged}");
}

/// A TCP relay to `target` that cuts the first `cuts` snapshot answers short: it passes
/// their head and `body_bytes` bytes of body, then closes both sides.
struct CuttingRelay {
    addr: SocketAddr,
    cut: std::sync::Arc<AtomicUsize>,
}

impl CuttingRelay {
    fn start(target: SocketAddr, cuts: usize, body_bytes: usize) -> CuttingRelay {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&cut);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = std::net::TcpStream::connect(target) else { continue };
                let counter = std::sync::Arc::clone(&counter);
                thread::spawn(move || {
                    // Requests are small: read the head to see what is asked.
                    let mut head = vec![0u8; 8192];
                    let n = client.read(&mut head).unwrap_or(0);
                    head.truncate(n);
                    let is_snapshot = head.starts_with(b"GET /v1/sync/snapshot");
                    if server.write_all(&head).is_err() {
                        return;
                    }
                    let (mut client_in, mut server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut client_in, &mut server_out);
                    });
                    let cutting = is_snapshot && counter.fetch_add(1, Ordering::SeqCst) < cuts;
                    if !cutting {
                        let _ = std::io::copy(&mut server, &mut client);
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    let mut passed = Vec::new();
                    let mut buf = [0u8; 1];
                    let mut body_seen = None;
                    while server.read(&mut buf).is_ok_and(|n| n == 1) {
                        passed.push(buf[0]);
                        if body_seen.is_none() && passed.ends_with(b"\r\n\r\n") {
                            body_seen = Some(passed.len());
                        }
                        if body_seen.is_some_and(|at| passed.len() >= at + body_bytes) {
                            break;
                        }
                    }
                    let _ = client.write_all(&passed);
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingRelay { addr, cut }
    }

    fn snapshots_asked(&self) -> usize {
        self.cut.load(Ordering::SeqCst)
    }
}

#[test]
fn a_snapshot_cut_mid_stream_is_never_served_and_the_gateway_fetches_it_again() {
    let up = Upstream::start("api");
    let cp = control_plane(SQLITE_IN_NODE_DIR);
    let api = Api::of(&cp);
    let raws: Vec<String> =
        (0..8).map(|i| api.create(json!({"name": format!("k{i}"), "scopes": ["orders:read"]})).0).collect();
    // Cut inside the frame of keys, twice.
    let relay = CuttingRelay::start(cp.admin, 2, 120);
    let gw = gateway(&up, relay.addr);
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        // Never a part of the set: none of the keys, or all of them. (Read before
        // `/readyz`: the load may complete between the two calls.)
        let loaded = gw.metric("keygate_keys_loaded");
        assert!(matches!(loaded, Some(0.0) | Some(8.0)), "a part of the set was loaded ({loaded:?}):\n{}", gw.output());
        if gw.admin_get("/readyz").status == 200 {
            // Whenever it is ready, it holds every key.
            assert_eq!(gw.metric("keygate_keys_loaded"), Some(8.0), "{}", gw.output());
            break;
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", gw.output());
        thread::sleep(Duration::from_millis(20));
    }
    assert!(relay.snapshots_asked() >= 3, "the gateway asked {} times", relay.snapshots_asked());
    let output = gw.output();
    assert!(output.contains("cannot load keys from the control plane"), "no log of the cut:\n{output}");
    for raw in &raws {
        assert_outcome(&call(&gw, raw, "/v1/orders/1"), "200");
    }
}

#[test]
fn a_corrupt_cache_file_is_refused_and_the_gateway_waits_for_its_control_plane() {
    let up = Upstream::start("api");
    let mut cp = control_plane(SQLITE_IN_NODE_DIR);
    let api = Api::of(&cp);
    let (raw, record) = api.create(json!({"name": "k", "scopes": ["orders:read"]}));
    let stored = api.expect("GET", &format!("/v1/keys/{}", record["id"].as_str().unwrap()), None, 200);
    cp.kill();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("keys.snapshot");
    let mut key = cached_key(stored["id"].as_str().unwrap(), &keygate::key::KeyDigest::of(&raw).to_string(), &[]);
    key["name"] = json!("k");
    write_cache_file(&cache, 1, &[key]);
    let mut bytes = std::fs::read(&cache).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&cache, &bytes).unwrap();

    let template = gateway_template("  cache_file: @CACHE@\n", "");
    let gw = NodeBuilder::new(&template)
        .var("CP", &cp.admin.to_string())
        .var("CACHE", &cache.display().to_string())
        .var("UP", &up.addr())
        .env("SYNC_TOKEN", SYNC_TOKEN)
        .start();
    wait_until(EVENTUALLY, "the gateway to refuse its cache file", || {
        gw.output().contains("refusing the last-known-good keys file").then_some(())
    });
    thread::sleep(Duration::from_millis(500));
    assert_eq!(gw.admin_get("/readyz").status, 503, "a corrupt cache file was served:\n{}", gw.output());
    assert_outcome(&call(&gw, &raw, "/v1/orders/1"), "503 not_ready");
    cp.restart();
    wait_ready(&gw, EVENTUALLY);
    assert_outcome(&call(&gw, &raw, "/v1/orders/1"), "200");
}

#[test]
fn gateway_without_control_plane_or_cache_is_not_ready_until_the_control_plane_starts() {
    let up = Upstream::start("api");
    let cp_addr = sock(&format!("127.0.0.1:{}", free_port()));
    let gw = gateway(&up, cp_addr);
    let (key, _) = gen_key(None);

    let r = call(&gw, &key, "/v1/orders/1");
    assert_outcome(&r, "503 not_ready");
    let ready = gw.admin_get("/readyz");
    assert_eq!(ready.status, 503, "/readyz of a gateway with no keys: {}", ready.text());

    let cp = control_plane_builder(SQLITE_IN_NODE_DIR).admin_addr(cp_addr).start();
    let api = Api::of(&cp);
    let (raw, _) = api.create(json!({"name": "late", "scopes": ["orders:read"]}));
    // The follower retries with a back-off of at most 5 s.
    wait_ready(&gw, EVENTUALLY);
    poll_outcome(&gw, &raw, "/v1/orders/1", "200", EVENTUALLY, None);
    assert_outcome(&call(&gw, &key, "/v1/orders/1"), "401 invalid_key");
}

#[test]
fn duplicate_usage_upload_is_counted_once() {
    let cp = control_plane(SQLITE_IN_NODE_DIR);
    let api = Api::of(&cp);
    let (_, record) = api.create(json!({"name": "metered"}));
    let id = record["id"].as_str().unwrap().to_owned();

    let now = OffsetDateTime::now_utc();
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap();
    let batch = |sequence: u64| {
        json!({
            "node": "edge-test-1",
            "boot_id": "boot-0001",
            "sequence": sequence,
            "records": [{
                "node": "edge-test-1",
                "key_id": id,
                "window_start": fmt(now - time::Duration::seconds(5)),
                "window_end": fmt(now),
                "requests": 5,
                "allowed": 3,
                "denied": {"rate_limited": 2},
                "status": {"2xx": 3, "3xx": 0, "4xx": 2, "5xx": 0},
                "bytes_in": 100,
                "bytes_out": 2000,
                "last_used_at": fmt(now),
            }],
        })
    };

    let r = admin_request("POST", cp.admin, "/v1/sync/usage", Some(ADMIN_TOKEN), Some(&batch(1)));
    assert_error(&r, 401, "unauthorized");
    let (status, _, v) = admin_json("POST", cp.admin, "/v1/sync/usage", Some(SYNC_TOKEN), Some(&batch(1)));
    assert_eq!((status, &v), (200, &json!({"accepted": true, "duplicate": false})), "first upload");
    let (status, _, v) = admin_json("POST", cp.admin, "/v1/sync/usage", Some(SYNC_TOKEN), Some(&batch(1)));
    assert_eq!((status, &v), (200, &json!({"accepted": true, "duplicate": true})), "the same upload again");

    let once = json!({
        "requests": 5, "allowed": 3, "denied": {"rate_limited": 2},
        "status": {"2xx": 3, "3xx": 0, "4xx": 2, "5xx": 0},
    });
    let usage = wait_usage_totals(&api, &id, &once);
    assert_eq!(usage["totals"]["bytes_in"], 100, "{usage}");
    assert_eq!(usage["totals"]["bytes_out"], 2000, "{usage}");
    // Read again: a late second count would show now.
    let again = api.expect("GET", &format!("/v1/keys/{id}/usage"), None, 200);
    assert_eq!(comparable(&again["totals"]), once, "the duplicate upload was counted");

    // A new sequence is a new batch: counted.
    let (status, _, v) = admin_json("POST", cp.admin, "/v1/sync/usage", Some(SYNC_TOKEN), Some(&batch(2)));
    assert_eq!((status, &v), (200, &json!({"accepted": true, "duplicate": false})), "next sequence");
    let twice = json!({
        "requests": 10, "allowed": 6, "denied": {"rate_limited": 4},
        "status": {"2xx": 6, "3xx": 0, "4xx": 4, "5xx": 0},
    });
    wait_usage_totals(&api, &id, &twice);
}

#[test]
fn gateway_following_one_control_plane_serves_keys_created_through_another_on_shared_postgres() {
    let db = PgDb::create("keygate_cp_test");
    let up = Upstream::start("api");
    let cp1 = control_plane(&db.url);
    let cp2 = control_plane(&db.url);
    let gw = gateway(&up, cp2.admin);
    wait_ready(&gw, EVENTUALLY);

    let api1 = Api::of(&cp1);
    let (raw, record) = api1.create(json!({"name": "cross", "scopes": ["orders:read"]}));
    let id = record["id"].as_str().unwrap().to_owned();
    poll_outcome(&gw, &raw, "/v1/orders/1", "200", Duration::from_secs(3), None);
    let seen = Api::of(&cp2).expect("GET", &format!("/v1/keys/{id}"), None, 200);
    assert_eq!(seen["name"], "cross", "the second control plane does not see the shared store");

    api1.expect("POST", &format!("/v1/keys/{id}/revoke"), None, 200);
    poll_outcome(&gw, &raw, "/v1/orders/1", "401 key_revoked", Duration::from_secs(3), None);
}

#[test]
fn gateway_usage_reaches_the_control_plane_exactly() {
    let up = Upstream::start("api");
    let cp = control_plane(SQLITE_IN_NODE_DIR);
    let mut gw = gateway(&up, cp.admin);
    wait_ready(&gw, EVENTUALLY);
    let api = Api::of(&cp);
    let (raw, record) = api.create(json!({"name": "counted", "scopes": ["orders:read"]}));
    let id = record["id"].as_str().unwrap().to_owned();

    let mut tally = Tally::default();
    poll_outcome(&gw, &raw, "/v1/orders/1", "200", PROPAGATION, Some(&mut tally));
    for _ in 0..4 {
        assert_outcome(&tally.send(&gw, &raw, "/v1/orders/1"), "200");
    }
    for _ in 0..2 {
        assert_outcome(&tally.send(&gw, &raw, "/v1/reports/1"), "403 insufficient_scope");
    }
    let expected = tally.expected();
    let usage = wait_usage_totals(&api, &id, &expected);
    assert!(usage["totals"]["bytes_out"].as_u64().is_some_and(|n| n > 0), "no bytes_out counted: {usage}");

    // A graceful stop flushes what is left (nothing): the totals must not grow.
    assert!(gw.stop().is_some_and(|s| s.success()), "the gateway did not exit cleanly on SIGTERM\n{}", gw.output());
    let after = api.expect("GET", &format!("/v1/keys/{id}/usage"), None, 200);
    assert_eq!(comparable(&after["totals"]), expected, "usage was counted twice: {after}");
}

// ---------------------------------------------------------------------------
// Quotas count from stored usage
// ---------------------------------------------------------------------------

/// A restart must not hand a key a fresh quota: counters start from the usage
/// already in the store.
#[test]
fn quota_used_before_a_restart_still_counts_after_it() {
    let up = Upstream::start("api");
    let mut node = standalone(&up, SQLITE_IN_NODE_DIR);
    wait_ready(&node, EVENTUALLY);
    let api = Api::of(&node);
    let (raw, record) =
        api.create(json!({"name": "metered", "scopes": ["orders:read"], "quota": {"requests": 3, "per": "day"}}));
    let id = record["id"].as_str().unwrap().to_owned();
    // Avoid a UTC day boundary between the two halves of the test.
    let now = OffsetDateTime::now_utc();
    let midnight = (now + time::Duration::DAY).replace_time(time::Time::MIDNIGHT);
    if midnight - now < time::Duration::seconds(30) {
        thread::sleep((midnight - now).unsigned_abs() + Duration::from_secs(1));
    }

    // The first 200 comes once the key has reached the gateway; 401s spend no quota.
    poll_outcome(&node, &raw, "/v1/orders/1", "200", EVENTUALLY, None);
    assert_eq!(node.get("/v1/orders/1", &[("x-api-key", &raw)]).status, 200);
    // Both requests are in the store before the process goes away.
    wait_usage_totals(
        &api,
        &id,
        &json!({"requests": 2, "allowed": 2, "denied": {}, "status": {"2xx": 2, "3xx": 0, "4xx": 0, "5xx": 0}}),
    );
    node.restart();
    wait_ready(&node, EVENTUALLY);

    // One request is left of the quota of three, however soon after the start it comes.
    let first = wait_until(EVENTUALLY, "the restarted node to accept the key", || {
        let r = node.get("/v1/orders/1", &[("x-api-key", &raw)]);
        (r.status != 503).then_some(r)
    });
    assert_eq!(first.status, 200, "{}", first.text());
    let refused = node.get("/v1/orders/1", &[("x-api-key", &raw)]);
    assert_error(&refused, 429, "quota_exceeded");
}

// ---------------------------------------------------------------------------
// Usage that is never lost: the spool across stops and crashes
// ---------------------------------------------------------------------------

/// `gateway`, with a usage spool in its dir.
fn spooling_gateway(up: &Upstream, cp: SocketAddr) -> Node {
    let template = gateway_template(
        "  cache_file: @DIR@/keys.snapshot\n  max_staleness: 0s\n",
        "usage:\n  flush_interval: 1s\n  spool: @DIR@/usage.spool\n  sinks: [ { type: control_plane } ]\n",
    );
    NodeBuilder::new(&template).var("CP", &cp.to_string()).var("UP", &up.addr()).env("SYNC_TOKEN", SYNC_TOKEN).start()
}

/// A control plane, a spooling gateway following it, and one key it serves.
fn spool_setup(up: &Upstream) -> (Node, Node, String, String) {
    let cp = control_plane(SQLITE_IN_NODE_DIR);
    let gw = spooling_gateway(up, cp.admin);
    wait_ready(&gw, EVENTUALLY);
    let (raw, record) = Api::of(&cp).create(json!({"name": "metered", "scopes": ["orders:read"]}));
    poll_outcome(&gw, &raw, "/v1/orders/1", "200", PROPAGATION, None);
    (cp, gw, raw, record["id"].as_str().unwrap().to_owned())
}

#[test]
fn usage_held_at_sigterm_while_the_control_plane_is_down_arrives_after_the_next_start() {
    let up = Upstream::start("api");
    let (mut cp, mut gw, raw, id) = spool_setup(&up);
    let mut tally = Tally::after_the_first_200();
    for _ in 0..5 {
        tally.send(&gw, &raw, "/v1/orders/1");
    }
    wait_usage_totals(&Api::of(&cp), &id, &tally.expected());

    cp.kill();
    for _ in 0..7 {
        tally.send(&gw, &raw, "/v1/orders/1");
    }
    tally.send(&gw, &raw, "/v1/reports/1");
    let status = gw.stop().expect("the gateway exits after SIGTERM");
    assert!(status.success(), "exit {status}\n{}", gw.output());
    assert!(gw.output().contains("kept in the spool"), "{}", gw.output());
    assert!(!gw.output().contains("is lost"), "{}", gw.output());

    cp.restart();
    gw.restart();
    wait_usage_totals(&Api::of(&cp), &id, &tally.expected());
    assert_eq!(gw.metric("keygate_usage_dropped_total"), Some(0.0));
    wait_until(EVENTUALLY, "the spool to be emptied", || {
        (gw.metric("keygate_usage_spool_bytes") == Some(8.0)).then_some(())
    });
}

#[test]
fn a_control_plane_killed_and_restarted_under_load_counts_every_request_once() {
    let up = Upstream::start("api");
    let (mut cp, gw, raw, id) = spool_setup(&up);
    let mut tally = Tally::after_the_first_200();
    let started = Instant::now();
    let mut killed = false;
    let mut restarted = false;
    // About six seconds of requests; the control plane is down for the middle two.
    while started.elapsed() < Duration::from_secs(6) {
        tally.send(&gw, &raw, "/v1/orders/1");
        if !killed && started.elapsed() > Duration::from_secs(2) {
            cp.kill();
            killed = true;
        }
        if !restarted && started.elapsed() > Duration::from_secs(4) {
            cp.restart();
            restarted = true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    wait_usage_totals(&Api::of(&cp), &id, &tally.expected());
    assert_eq!(gw.metric("keygate_usage_dropped_total"), Some(0.0));
}

/// `kill -9` loses at most the window still open: every closed window is on disk
/// before any sink sees it.
#[test]
fn a_gateway_killed_with_sigkill_keeps_every_closed_window() {
    let up = Upstream::start("api");
    let (mut cp, mut gw, raw, id) = spool_setup(&up);
    let mut tally = Tally::after_the_first_200();
    cp.kill();
    for _ in 0..9 {
        tally.send(&gw, &raw, "/v1/orders/1");
    }
    // Two 1 s windows close with the control plane down: the usage is in the spool only.
    wait_until(EVENTUALLY, "the spool to hold the closed windows", || {
        (gw.metric("keygate_usage_spool_bytes").unwrap_or(0.0) > 8.0).then_some(())
    });
    thread::sleep(Duration::from_millis(1200));
    gw.kill();

    cp.restart();
    gw.restart();
    wait_usage_totals(&Api::of(&cp), &id, &tally.expected());
}

// ---------------------------------------------------------------------------
// Fleet limits through the control plane (`fleet_limits: { engine: control_plane }`)
// ---------------------------------------------------------------------------

/// A gateway that reconciles its limits through the control plane it follows.
fn fleet_gateway(up: &Upstream, cp: SocketAddr) -> Node {
    let template = gateway_template("", "fleet_limits: { engine: control_plane, sync_interval: 100ms }\n");
    NodeBuilder::new(&template).var("CP", &cp.to_string()).var("UP", &up.addr()).env("SYNC_TOKEN", SYNC_TOKEN).start()
}

/// Two gateways share one key's rate limit through the control plane's store; with
/// the control plane gone they go on deciding alone, say so in the metric, and
/// reconcile again once it is back.
#[test]
fn two_gateways_hold_one_rate_limit_through_the_control_plane_and_decide_alone_without_it() {
    let up = Upstream::start("api");
    let mut cp = control_plane_builder(SQLITE_IN_NODE_DIR).start();
    let (raw, _) = Api::of(&cp).create(json!({
        "name": "fleet",
        "scopes": ["orders:read"],
        "rate_limit": {"requests": 10, "per": "1h"},
    }));
    let (a, b) = (fleet_gateway(&up, cp.admin), fleet_gateway(&up, cp.admin));
    wait_ready(&a, Duration::from_secs(20));
    wait_ready(&b, Duration::from_secs(20));
    let call = |gw: &Node| {
        let r = gw.get("/v1/orders", &[("x-api-key", &raw)]);
        assert!(matches!(r.status, 200 | 429), "unexpected {}: {}", r.status, r.text());
        if r.status == 429 {
            assert!(r.header("retry-after").is_some(), "429 without Retry-After: {:?}", r.headers);
        }
        r.status == 200
    };
    let mut allowed = 0;
    for i in 0..30 {
        allowed += usize::from(call(if i % 2 == 0 { &a } else { &b }));
        thread::sleep(Duration::from_millis(40));
    }
    // Per process this would be 20.
    assert!((10..=14).contains(&allowed), "two gateways allowed {allowed} of a limit of 10");
    assert!(a.metric("keygate_fleet_limits_sync_total{result=\"ok\"}").unwrap_or(0.0) > 0.0, "{}", a.output());
    assert_eq!(a.metric("keygate_fleet_limits_local_fallback"), Some(0.0));

    cp.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.metric("keygate_fleet_limits_local_fallback") != Some(1.0) {
        assert!(Instant::now() < deadline, "no fallback without the control plane:\n{}", a.output());
        call(&a);
        thread::sleep(Duration::from_millis(50));
    }
    // Still answered from local state: 200 or 429, never an error.
    for _ in 0..5 {
        call(&a);
    }

    cp.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.metric("keygate_fleet_limits_local_fallback") != Some(0.0) {
        assert!(Instant::now() < deadline, "no reconciliation once the control plane is back:\n{}", a.output());
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_admin_error_is_the_contract_json_even_for_paths_methods_and_queries_axum_refuses() {
    let up = Upstream::start("up");
    let node = standalone(&up, SQLITE_IN_NODE_DIR);
    let api = Api::of(&node);
    for (method, path, token, status, code) in [
        ("GET", "/v1/nothing-here", Some(ADMIN_TOKEN), 404, "not_found"),
        ("GET", "/no/such/path", None, 404, "not_found"),
        ("DELETE", "/v1/audit", Some(ADMIN_TOKEN), 405, "method_not_allowed"),
        ("GET", "/v1/keys?owner=a&owner=b", Some(ADMIN_TOKEN), 400, "invalid_request"),
        ("GET", "/v1/sync/changes?since=soon", Some(SYNC_TOKEN), 400, "invalid_request"),
    ] {
        let r = admin_request(method, node.admin, path, token, None);
        assert_eq!(r.status, status, "{method} {path}: {} {}", r.status, r.text());
        assert_error(&r, status, code);
        assert!(r.header("x-request-id").is_some(), "{method} {path} has no X-Request-Id");
    }
    let r = admin_request("DELETE", node.admin, "/v1/audit", Some(ADMIN_TOKEN), None);
    assert!(r.header("allow").is_some_and(|allow| allow.contains("GET")), "405 without Allow: {:?}", r.headers);
    // A body past the admin API's limit is refused as too large, not as malformed.
    let huge = json!({"name": "x".repeat(3 << 20)});
    let r = admin_request("POST", node.admin, "/v1/keys", Some(ADMIN_TOKEN), Some(&huge));
    assert_error(&r, 413, "payload_too_large");
    // `expires_at` and `ttl` together are refused on create as on update, null or not.
    api.invalid("POST", "/v1/keys", Some(json!({"name": "n", "expires_at": null, "ttl": "1d"})), "ttl");
}
