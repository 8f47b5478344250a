//! The OpenAPI document against a real node: a standalone `keygate serve` (SQLite in its
//! dir, a real upstream) is called for every operation `GET /v1/openapi.json` documents,
//! successes and errors, and every answer is checked against what the document fetched
//! from the node says for its path, method and status: the status must be documented,
//! the media type one the document names, the documented headers present, and a JSON
//! body valid against the schema (with `$ref`s into `#/components/schemas`). Event
//! stream data is validated against the schema the document names for it. An answer the
//! document does not describe fails the test, as does an operation left uncalled.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use common::sse::EventStream;
use common::*;

const ADMIN_TOKEN: &str = "kg-test-admin-token-0a5e2f";
const READ_TOKEN: &str = "kg-test-read-token-6c1d93";
const SYNC_TOKEN: &str = "kg-test-sync-token-e48b27";

fn standalone(up: &Upstream) -> Node {
    let template = r#"mode: standalone
node_id: @NODE@
threads: 1
admin:
  address: @ADMIN@
  tokens:
    - { name: ops, token: "${env:ADMIN_TOKEN}" }
    - { name: dashboard, token: "${env:READ_TOKEN}", role: read }
  sync_tokens:
    - { name: edge, token: "${env:SYNC_TOKEN}" }
store:
  url: "sqlite://@DIR@/keygate.db"
plans:
  free: { rate_limit: { requests: 1000, per: 1s } }
  pro: { rate_limit: { requests: 1000, per: 1s }, quota: { requests: 1000000, per: month } }
default_plan: free
usage:
  flush_interval: 1s
listeners:
  - address: @LISTEN@
upstreams:
  api: { targets: ["@UP@"] }
routes:
  - { name: orders, match: { path_prefix: /v1/orders }, upstream: api }
access_log: off
"#;
    NodeBuilder::new(template)
        .var("UP", &up.addr())
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("READ_TOKEN", READ_TOKEN)
        .env("SYNC_TOKEN", SYNC_TOKEN)
        .start()
}

// ---------------------------------------------------------------------------
// The document, and answers checked against it
// ---------------------------------------------------------------------------

struct Spec {
    doc: Value,
    /// (METHOD, path template) → statuses answered.
    seen: RefCell<BTreeMap<(String, String), BTreeSet<u16>>>,
}

impl Spec {
    /// The document as the node serves it; the fetch itself is checked against it.
    fn fetch(admin: SocketAddr) -> Spec {
        let resp = admin_request("GET", admin, "/v1/openapi.json", Some(READ_TOKEN), None);
        assert_eq!(resp.status, 200, "GET /v1/openapi.json: {}", resp.text());
        let spec = Spec { doc: resp.json(), seen: RefCell::default() };
        spec.check("GET", "/v1/openapi.json", &resp);
        spec
    }

    /// `$ref` to a Response, Parameter or Schema object followed, inside the document.
    fn resolve<'a>(&'a self, object: &'a Value) -> &'a Value {
        match object["$ref"].as_str() {
            Some(reference) => self
                .doc
                .pointer(reference.strip_prefix('#').unwrap_or_else(|| panic!("{reference} is not local")))
                .unwrap_or_else(|| panic!("{reference} points at nothing")),
            None => object,
        }
    }

    fn operation(&self, method: &str, template: &str) -> &Value {
        let operation = &self.doc["paths"][template][method.to_lowercase()];
        assert!(operation.is_object(), "openapi.json documents no {method} {template}");
        operation
    }

    /// Validates `instance` against `schema`, whose `$ref`s point into the document's components.
    #[track_caller]
    fn validate(&self, schema: &Value, instance: &Value, what: &str) {
        let root = json!({"components": self.doc["components"], "allOf": [schema]});
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("{what}: the schema does not compile: {e}"));
        let errors: Vec<String> =
            validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        assert!(errors.is_empty(), "{what}: the answer does not match openapi.json:\n{errors:#?}\n{instance:#}");
    }

    /// Checks one answer of `method template` against the document and returns its JSON
    /// body (`Null` when it has none).
    #[track_caller]
    fn check(&self, method: &str, template: &str, resp: &Response) -> Value {
        let what = format!("{method} {template} → {}", resp.status);
        let operation = self.operation(method, template);
        let documented = operation["responses"].get(resp.status.to_string()).unwrap_or_else(|| {
            panic!("{what} is not documented (body {})", resp.text());
        });
        let documented = self.resolve(documented);
        self.seen.borrow_mut().entry((method.to_owned(), template.to_owned())).or_default().insert(resp.status);

        for name in documented["headers"].as_object().into_iter().flatten().map(|(name, _)| name) {
            assert!(resp.header(&name.to_lowercase()).is_some(), "{what}: documented header {name} is missing");
        }
        let Some(content) = documented["content"].as_object() else {
            assert!(resp.body.is_empty(), "{what}: documented without a body, answered {}", resp.text());
            return Value::Null;
        };
        let content_type = resp.header("content-type").unwrap_or_else(|| panic!("{what}: no Content-Type"));
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        let media = content.get(content_type).or_else(|| content.get(essence)).unwrap_or_else(|| {
            panic!("{what}: Content-Type {content_type:?} is not one of {:?}", content.keys().collect::<Vec<_>>())
        });
        if essence != "application/json" {
            return Value::Null;
        }
        let body: Value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {}", resp.text()));
        self.validate(&media["schema"], &body, &what);
        if resp.status >= 400 {
            assert_eq!(
                resp.header("x-request-id"),
                body["error"]["request_id"].as_str(),
                "{what}: X-Request-Id differs from the error's request_id"
            );
        }
        body
    }
}

/// One call to the admin address, checked against the document. `template` is the
/// documented path the concrete `target` (which may carry a query) is an instance of.
struct Api<'a> {
    spec: &'a Spec,
    admin: SocketAddr,
}

impl Api<'_> {
    #[track_caller]
    fn call(&self, method: &str, template: &str, target: &str, token: Option<&str>, body: Option<&Value>) -> Response {
        assert_instance(template, target);
        admin_request(method, self.admin, target, token, body)
    }

    /// A call that must answer `want`; its JSON body, validated.
    #[track_caller]
    fn json(
        &self,
        method: &str,
        template: &str,
        target: &str,
        token: Option<&str>,
        body: Option<&Value>,
        want: u16,
    ) -> Value {
        let resp = self.call(method, template, target, token, body);
        assert_eq!(resp.status, want, "{method} {target} with {body:?}: {}", resp.text());
        self.spec.check(method, template, &resp)
    }

    /// A call with a raw body and headers of its own.
    #[track_caller]
    fn raw(
        &self,
        method: &str,
        template: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        want: u16,
    ) -> Value {
        assert_instance(template, target);
        let mut all = vec![("Connection", "close")];
        all.extend_from_slice(headers);
        let raw =
            if body.is_empty() { request(method, target, &all) } else { request_with_body(method, target, &all, body) };
        let resp = try_send_to(self.admin, &raw).unwrap_or_else(|e| panic!("{method} {target}: {e}"));
        assert_eq!(resp.status, want, "{method} {target}: {}", resp.text());
        self.spec.check(method, template, &resp)
    }

    /// An error answer: its status, code, and the document's schema.
    #[track_caller]
    fn error(
        &self,
        method: &str,
        template: &str,
        target: &str,
        token: Option<&str>,
        body: Option<&Value>,
        want: (u16, &str),
    ) {
        let answer = self.json(method, template, target, token, body, want.0);
        assert_eq!(answer["error"]["code"], want.1, "{method} {target}: {answer}");
    }
}

/// `target`'s path matches `template` segment by segment, `{name}` matching any one.
#[track_caller]
fn assert_instance(template: &str, target: &str) {
    let path = target.split('?').next().unwrap_or_default();
    let (want, got): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    let matches = want.len() == got.len()
        && want.iter().zip(&got).all(|(w, g)| (w.starts_with('{') && w.ends_with('}') && !g.is_empty()) || w == g);
    assert!(matches, "{target} is not an instance of {template}");
}

fn id_of(record: &Value) -> String {
    record["id"].as_str().unwrap_or_else(|| panic!("no id in {record}")).to_owned()
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).expect("formats")
}

// ---------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------

/// Opens `GET /v1/events` from `last_event_id` and checks the answer's head against
/// the document.
fn open_events(spec: &Spec, admin: SocketAddr, last_event_id: &str) -> EventStream {
    let stream = EventStream::open(admin, READ_TOKEN, Some(last_event_id));
    let head = Response { status: stream.status, headers: stream.headers.clone(), body: Vec::new() };
    spec.check("GET", "/v1/events", &head);
    assert_eq!(stream.status, 200);
    stream
}

/// Requests through the proxy with `key` every 300 ms until dropped, so that the
/// current minute always has usage for the `usage` events.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(listen: SocketAddr, key: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let _ = try_send_to(listen, &request("GET", "/v1/orders", &[("x-api-key", &key)]));
                thread::sleep(Duration::from_millis(300));
            }
        });
        Traffic { stop, thread: Some(thread) }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn every_operation_answers_as_the_openapi_document_says() {
    let up = Upstream::start("api");
    let node = standalone(&up);
    let spec = Spec::fetch(node.admin);
    let api = Api { spec: &spec, admin: node.admin };
    let (admin, read, sync) = (Some(ADMIN_TOKEN), Some(READ_TOKEN), Some(SYNC_TOKEN));

    // Operations routes and the caller.
    api.json("GET", "/healthz", "/healthz", None, None, 200);
    api.json("GET", "/readyz", "/readyz", None, None, 200);
    api.json("GET", "/metrics", "/metrics", None, None, 200);
    api.error("GET", "/v1/openapi.json", "/v1/openapi.json", None, None, (401, "unauthorized"));
    assert_eq!(
        api.json("GET", "/v1/whoami", "/v1/whoami", read, None, 200),
        json!({"name": "dashboard", "role": "read"})
    );
    assert_eq!(api.json("GET", "/v1/whoami", "/v1/whoami", admin, None, 200), json!({"name": "ops", "role": "admin"}));
    api.error("GET", "/v1/whoami", "/v1/whoami", Some("not-a-token"), None, (401, "unauthorized"));

    // Create: every field, a minimal key, and refusals.
    let full = json!({
        "name": "alice laptop", "owner": "acme", "plan": "pro", "scopes": ["orders:read", "billing:*"],
        "ip_allowlist": ["127.0.0.0/8", "2001:db8::/32"],
        "rate_limit": {"requests": 100, "per": "1s", "burst": 200, "by": "owner"},
        "quota": {"requests": 100000, "per": "month", "by": "key"}, "ttl": "30d",
        "metadata": {"team": "payments", "n": 1}, "tags": ["internal", "laptop"], "prefix": "acme_live",
    });
    let created = api.json("POST", "/v1/keys", "/v1/keys", admin, Some(&full), 201);
    let (alice_raw, alice) = (created["key"].as_str().expect("a raw key").to_owned(), id_of(&created["record"]));
    assert!(alice_raw.starts_with("acme_live_"), "{created}");
    let expires = rfc3339(OffsetDateTime::now_utc() + time::Duration::days(90));
    let bob = id_of(
        &api.json("POST", "/v1/keys", "/v1/keys", admin, Some(&json!({"name": "bob", "expires_at": expires})), 201)
            ["record"],
    );
    let traffic =
        api.json("POST", "/v1/keys", "/v1/keys", admin, Some(&json!({"name": "traffic", "owner": "acme"})), 201);
    let traffic_raw = traffic["key"].as_str().expect("a raw key").to_owned();
    api.error(
        "POST",
        "/v1/keys",
        "/v1/keys",
        admin,
        Some(&json!({"name": "x", "colour": "blue"})),
        (400, "invalid_request"),
    );
    api.error(
        "POST",
        "/v1/keys",
        "/v1/keys",
        admin,
        Some(&json!({"name": "x", "ip_allowlist": ["10.0.0.0/33"]})),
        (400, "invalid_request"),
    );
    api.error("POST", "/v1/keys", "/v1/keys", None, Some(&json!({"name": "x"})), (401, "unauthorized"));
    api.error("POST", "/v1/keys", "/v1/keys", read, Some(&json!({"name": "x"})), (403, "forbidden"));

    // Traffic through the proxy, so usage and `last_used_at` have values.
    // Changes reach the proxy's index within moments, not at once: wait for each.
    let alice_auth = format!("Bearer {alice_raw}");
    wait_until(EVENTUALLY, "alice's key to be served", || {
        (node.get("/v1/orders/1", &[("authorization", &alice_auth)]).status == 200).then_some(())
    });
    wait_until(EVENTUALLY, "the traffic key to be served", || {
        (node.get("/v1/orders/2", &[("x-api-key", &traffic_raw)]).status == 200).then_some(())
    });

    // Show, list with every filter, sort and a cursor.
    api.json("GET", "/v1/keys/{id}", &format!("/v1/keys/{alice}"), read, None, 200);
    api.error("GET", "/v1/keys/{id}", "/v1/keys/key_00000000000000000000", read, None, (404, "not_found"));
    api.error("GET", "/v1/keys/{id}", &format!("/v1/keys/{alice}"), None, None, (401, "unauthorized"));
    let all = api.json("GET", "/v1/keys", "/v1/keys", read, None, 200);
    assert_eq!(all["keys"].as_array().map(Vec::len), Some(3), "{all}");
    let filtered = api.json(
        "GET",
        "/v1/keys",
        "/v1/keys?owner=acme&status=active&plan=pro&tag=internal&q=ALICE&limit=10&sort=created",
        read,
        None,
        200,
    );
    assert_eq!(filtered["keys"][0]["id"], alice.as_str(), "{filtered}");
    let page = api.json("GET", "/v1/keys", "/v1/keys?limit=1&sort=last_used", read, None, 200);
    let cursor = page["next_cursor"].as_str().expect("a next page").to_owned();
    api.json("GET", "/v1/keys", &format!("/v1/keys?limit=1&sort=last_used&cursor={cursor}"), read, None, 200);
    for query in ["status=paused", "limit=0", "limit=1001", "sort=name", "cursor=zz"] {
        api.error("GET", "/v1/keys", &format!("/v1/keys?{query}"), read, None, (400, "invalid_request"));
    }
    api.error("GET", "/v1/keys", "/v1/keys", None, None, (401, "unauthorized"));

    // Change: fields, clearing, disabling (and a denial counted while disabled), refusals.
    let path = format!("/v1/keys/{alice}");
    let changed = api.json(
        "PATCH",
        "/v1/keys/{id}",
        &path,
        admin,
        Some(&json!({"owner": null, "tags": ["moved"], "expires_at": null, "rate_limit": null, "metadata": null})),
        200,
    );
    assert_eq!((changed["owner"].clone(), changed["rate_limit"].clone()), (Value::Null, Value::Null), "{changed}");
    api.json("PATCH", "/v1/keys/{id}", &path, admin, Some(&json!({"status": "disabled"})), 200);
    let denied = wait_until(EVENTUALLY, "alice's key to be refused as disabled", || {
        Some(node.get("/v1/orders/3", &[("x-api-key", &alice_raw)])).filter(|r| r.status == 403)
    });
    assert_error(&denied, 403, "key_disabled");
    api.json("PATCH", "/v1/keys/{id}", &path, admin, Some(&json!({"status": "active", "ttl": "7d"})), 200);
    for body in [
        json!({}),
        json!({"status": "revoked"}),
        json!({"prefix": "x"}),
        json!({"name": null}),
        json!({"ttl": "1d", "expires_at": null}),
    ] {
        api.error("PATCH", "/v1/keys/{id}", &path, admin, Some(&body), (400, "invalid_request"));
    }
    api.error("PATCH", "/v1/keys/{id}", &path, read, Some(&json!({"name": "x"})), (403, "forbidden"));
    api.error("PATCH", "/v1/keys/{id}", &path, None, Some(&json!({"name": "x"})), (401, "unauthorized"));
    api.error(
        "PATCH",
        "/v1/keys/{id}",
        "/v1/keys/key_00000000000000000000",
        admin,
        Some(&json!({"name": "x"})),
        (404, "not_found"),
    );

    // Usage, once the store has the traffic above (flushed every second).
    let usage_path = format!("/v1/keys/{alice}/usage");
    let usage = wait_until(EVENTUALLY, "alice's usage in the store", || {
        let usage =
            api.json("GET", "/v1/keys/{id}/usage", &format!("{usage_path}?granularity=minute"), read, None, 200);
        let totals = &usage["totals"];
        (totals["denied"]["key_disabled"].as_u64() > Some(0) && totals["allowed"].as_u64() > Some(0)).then_some(usage)
    });
    assert!(!usage["buckets"].as_array().expect("buckets").is_empty(), "{usage}");
    let now = OffsetDateTime::now_utc();
    let (from, to) = (rfc3339(now - time::Duration::hours(2)), rfc3339(now + time::Duration::minutes(1)));
    api.json(
        "GET",
        "/v1/keys/{id}/usage",
        &format!("{usage_path}?from={from}&to={to}&granularity=hour"),
        read,
        None,
        200,
    );
    api.json("GET", "/v1/keys/{id}/usage", &format!("{usage_path}?granularity=day"), read, None, 200);
    for query in ["granularity=week", &format!("from={to}&to={from}"), "from=yesterday"] {
        api.error("GET", "/v1/keys/{id}/usage", &format!("{usage_path}?{query}"), read, None, (400, "invalid_request"));
    }
    api.error("GET", "/v1/keys/{id}/usage", "/v1/keys/key_00000000000000000000/usage", read, None, (404, "not_found"));
    api.error("GET", "/v1/keys/{id}/usage", &usage_path, None, None, (401, "unauthorized"));

    // Rotate, revoke, and what a revoked key refuses.
    let bob_path = format!("/v1/keys/{bob}");
    let rotated = api.json(
        "POST",
        "/v1/keys/{id}/rotate",
        &format!("{bob_path}/rotate"),
        admin,
        Some(&json!({"grace_period": "1h"})),
        201,
    );
    let successor = id_of(&rotated["record"]);
    api.json("POST", "/v1/keys/{id}/rotate", &format!("/v1/keys/{successor}/rotate"), admin, None, 201);
    api.error(
        "POST",
        "/v1/keys/{id}/rotate",
        &format!("{bob_path}/rotate"),
        admin,
        Some(&json!({"grace_period": "soon"})),
        (400, "invalid_request"),
    );
    api.error(
        "POST",
        "/v1/keys/{id}/rotate",
        "/v1/keys/key_00000000000000000000/rotate",
        admin,
        None,
        (404, "not_found"),
    );
    api.error("POST", "/v1/keys/{id}/rotate", &format!("{bob_path}/rotate"), read, None, (403, "forbidden"));
    api.error("POST", "/v1/keys/{id}/rotate", &format!("{bob_path}/rotate"), None, None, (401, "unauthorized"));
    let revoked = api.json("POST", "/v1/keys/{id}/revoke", &format!("{bob_path}/revoke"), admin, None, 200);
    assert_eq!(revoked["status"], "revoked");
    api.json("POST", "/v1/keys/{id}/revoke", &format!("{bob_path}/revoke"), admin, None, 200);
    api.error(
        "POST",
        "/v1/keys/{id}/revoke",
        "/v1/keys/key_00000000000000000000/revoke",
        admin,
        None,
        (404, "not_found"),
    );
    api.error("POST", "/v1/keys/{id}/revoke", &format!("{bob_path}/revoke"), read, None, (403, "forbidden"));
    api.error("POST", "/v1/keys/{id}/revoke", &format!("{bob_path}/revoke"), None, None, (401, "unauthorized"));
    api.error("PATCH", "/v1/keys/{id}", &bob_path, admin, Some(&json!({"name": "x"})), (409, "conflict"));
    api.error("POST", "/v1/keys/{id}/rotate", &format!("{bob_path}/rotate"), admin, None, (409, "conflict"));

    // Import: one good line, one bad, a blank one; then refusals.
    let ndjson = format!(
        "{}\n\n{}\n",
        json!({"hash": format!("sha256:{}", "ab".repeat(32)), "id": "legacy-1", "owner": "acme", "status": "disabled",
               "created_at": "2019-05-01T12:00:00Z", "masked": "sk_live_4eC3…p7dc", "prefix": "sk_live"}),
        json!({"hash": format!("sha256:{}", "cd".repeat(32)), "plan": "gold"}),
    );
    let content_type = [("Content-Type", "application/x-ndjson")];
    let auth = |token: &str| format!("Bearer {token}");
    let (admin_auth, read_auth) = (auth(ADMIN_TOKEN), auth(READ_TOKEN));
    let imported = api.raw(
        "POST",
        "/v1/keys/import",
        "/v1/keys/import",
        &[content_type[0], ("Authorization", &admin_auth)],
        ndjson.as_bytes(),
        200,
    );
    assert_eq!(
        (imported["imported"].clone(), imported["errors"][0]["line"].clone()),
        (json!(1), json!(3)),
        "{imported}"
    );
    let again = api.raw(
        "POST",
        "/v1/keys/import",
        "/v1/keys/import",
        &[content_type[0], ("Authorization", &admin_auth)],
        ndjson.as_bytes(),
        200,
    );
    assert_eq!(again["unchanged"], 1, "{again}");
    let refused = |headers: &[(&str, &str)], want: u16| {
        api.raw("POST", "/v1/keys/import", "/v1/keys/import", headers, ndjson.as_bytes(), want)
    };
    assert_eq!(refused(&[content_type[0], ("Authorization", &read_auth)], 403)["error"]["code"], "forbidden");
    assert_eq!(refused(&content_type, 401)["error"]["code"], "unauthorized");
    api.json("GET", "/v1/keys/{id}", "/v1/keys/legacy-1", read, None, 200);

    // The audit log.
    let audit = api.json("GET", "/v1/audit", "/v1/audit", read, None, 200);
    let actions: BTreeSet<&str> =
        audit["events"].as_array().expect("events").iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(
        actions,
        BTreeSet::from(["key.create", "key.update", "key.rotate", "key.revoke", "key.import"]),
        "{audit}"
    );
    api.json("GET", "/v1/audit", &format!("/v1/audit?key_id={alice}&actor=ops&limit=5"), read, None, 200);
    api.error("GET", "/v1/audit", "/v1/audit?limit=0", read, None, (400, "invalid_request"));
    api.error("GET", "/v1/audit", "/v1/audit", None, None, (401, "unauthorized"));

    // The gateways' feed, with a sync token; a poll makes this node list a gateway.
    let changes =
        api.json("GET", "/v1/sync/changes", "/v1/sync/changes?since=0&node=gw-openapi&wait_ms=0", sync, None, 200);
    let ops: BTreeSet<&str> =
        changes["changes"].as_array().expect("changes").iter().filter_map(|c| c["change"]["op"].as_str()).collect();
    assert!(ops.contains("upsert"), "{changes}");
    let latest = changes["version"].as_u64().expect("a version");
    assert_eq!(
        api.json("GET", "/v1/sync/changes", &format!("/v1/sync/changes?since={}", latest + 100), sync, None, 200)
            ["reset"],
        true
    );
    api.raw("GET", "/v1/sync/changes", "/v1/sync/changes?node=gw", &[("Authorization", &auth(SYNC_TOKEN))], b"", 400);
    api.error("GET", "/v1/sync/changes", "/v1/sync/changes?since=0", admin, None, (401, "unauthorized"));
    let gateways = api.json("GET", "/v1/gateways", "/v1/gateways", read, None, 200);
    assert_eq!(gateways["gateways"][0]["node_id"], "gw-openapi", "{gateways}");
    api.error("GET", "/v1/gateways", "/v1/gateways", None, None, (401, "unauthorized"));

    let snapshot = api.call("GET", "/v1/sync/snapshot", "/v1/sync/snapshot", sync, None);
    assert_eq!(snapshot.status, 200, "{}", snapshot.text());
    spec.check("GET", "/v1/sync/snapshot", &snapshot);
    api.error("GET", "/v1/sync/snapshot", "/v1/sync/snapshot", admin, None, (401, "unauthorized"));

    let window_end = OffsetDateTime::now_utc();
    let upload = json!({"node": "gw-openapi", "boot_id": "boot-1", "sequence": 1, "records": [{
        "node": "gw-openapi", "key_id": alice, "window_start": rfc3339(window_end - time::Duration::seconds(5)),
        "window_end": rfc3339(window_end), "requests": 3, "allowed": 2, "denied": {"rate_limited": 1},
        "status": {"2xx": 2, "3xx": 0, "4xx": 1, "5xx": 0}, "bytes_in": 10, "bytes_out": 20,
        "last_used_at": rfc3339(window_end)}]});
    assert_eq!(api.json("POST", "/v1/sync/usage", "/v1/sync/usage", sync, Some(&upload), 200)["duplicate"], false);
    assert_eq!(api.json("POST", "/v1/sync/usage", "/v1/sync/usage", sync, Some(&upload), 200)["duplicate"], true);
    api.error("POST", "/v1/sync/usage", "/v1/sync/usage", sync, Some(&json!({"node": "gw"})), (400, "invalid_request"));
    api.error("POST", "/v1/sync/usage", "/v1/sync/usage", admin, Some(&upload), (401, "unauthorized"));
    let too_large = (16 * 1024 * 1024 + 1).to_string();
    let sync_auth = auth(SYNC_TOKEN);
    let answer = api.raw(
        "POST",
        "/v1/sync/usage",
        "/v1/sync/usage",
        &[("Authorization", &sync_auth), ("Content-Type", "application/json"), ("Content-Length", &too_large)],
        b"",
        413,
    );
    assert_eq!(answer["error"]["code"], "payload_too_large");

    api.json("GET", "/v1/sync/quota-usage", "/v1/sync/quota-usage", sync, None, 200);
    api.error("GET", "/v1/sync/quota-usage", "/v1/sync/quota-usage", admin, None, (401, "unauthorized"));

    let exchange = json!({"ops": [
        {"op": "add", "key": "openapi:c", "by": 2, "ttl": {"secs": 30, "nanos": 0}},
        {"op": "read", "key": "openapi:c"},
        {"op": "raise", "key": "openapi:m", "to": 5, "until": (window_end.unix_timestamp() + 60) * 1000},
        {"op": "read_mark", "key": "openapi:m"},
        {"op": "read_mark", "key": "openapi:none"},
    ]});
    let answers = api.json("POST", "/v1/sync/fleet", "/v1/sync/fleet", sync, Some(&exchange), 200);
    assert_eq!(answers["answers"], json!([2, 2, null, 5, null]), "{answers}");
    let many: Vec<Value> = (0..4097).map(|_| json!({"op": "read", "key": "k"})).collect();
    api.error(
        "POST",
        "/v1/sync/fleet",
        "/v1/sync/fleet",
        sync,
        Some(&json!({"ops": many})),
        (413, "payload_too_large"),
    );
    api.error(
        "POST",
        "/v1/sync/fleet",
        "/v1/sync/fleet",
        sync,
        Some(&json!({"ops": [{"op": "nope"}]})),
        (400, "invalid_request"),
    );
    api.error("POST", "/v1/sync/fleet", "/v1/sync/fleet", admin, Some(&exchange), (401, "unauthorized"));

    // Delete, last of the key changes.
    api.error("DELETE", "/v1/keys/{id}", &path, read, None, (403, "forbidden"));
    api.error("DELETE", "/v1/keys/{id}", &path, None, None, (401, "unauthorized"));
    api.json("DELETE", "/v1/keys/{id}", &path, admin, None, 204);
    api.error("DELETE", "/v1/keys/{id}", &path, admin, None, (404, "not_found"));

    // The event stream from its start: every key event of the above, and live usage
    // while traffic flows; each event's data against the document's event schema.
    let events_auth = auth(READ_TOKEN);
    api.raw(
        "GET",
        "/v1/events",
        "/v1/events",
        &[("Authorization", &events_auth), ("Last-Event-ID", "later")],
        b"",
        400,
    );
    api.error("GET", "/v1/events", "/v1/events", None, None, (401, "unauthorized"));
    let data_schema = spec.operation("GET", "/v1/events")["responses"]["200"]["content"]["text/event-stream"]
        ["x-event-data-schema"]
        .clone();
    assert!(data_schema.is_object(), "GET /v1/events names no schema for its events' data");
    let _traffic = Traffic::start(node.listen, traffic_raw);
    let stream = open_events(&spec, node.admin, "0");
    let wanted: BTreeSet<&str> = BTreeSet::from([
        "key.created",
        "key.updated",
        "key.disabled",
        "key.revoked",
        "key.rotated",
        "key.deleted",
        "keys.imported",
        "usage",
    ]);
    let mut kinds = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !wanted.iter().all(|k| kinds.contains(*k)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event =
            stream.events.recv_timeout(left).unwrap_or_else(|_| panic!("events seen: {kinds:?}, wanted {wanted:?}"));
        spec.validate(&data_schema, &event.data, &format!("event {}", event.kind));
        assert_eq!(event.data["type"], event.kind.as_str(), "the SSE event name is the event's type");
        assert_eq!(event.id.is_some(), event.kind != "usage", "key events carry an id, usage events none");
        kinds.insert(event.kind);
    }
    drop(stream);

    // Every documented operation was called, and every error status the admin API uses was met.
    let seen = spec.seen.borrow();
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    let documented: BTreeSet<(String, String)> = spec.doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("a path item");
            item.keys().filter(|m| METHODS.contains(&m.as_str())).map(|m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let uncalled: Vec<_> = documented.iter().filter(|op| !seen.contains_key(*op)).collect();
    assert!(uncalled.is_empty(), "documented operations this test did not call: {uncalled:?}");
    let statuses: BTreeSet<u16> = seen.values().flatten().copied().collect();
    for status in [200, 201, 204, 400, 401, 403, 404, 409, 413] {
        assert!(statuses.contains(&status), "no call answered {status}: {statuses:?}");
    }
}
