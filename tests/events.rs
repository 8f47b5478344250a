//! Black-box tests of what a console and other watchers of the admin API use
//! (CONTRACT §6): read-only tokens and `403 forbidden`, `GET /v1/whoami`, the
//! Server-Sent Events of `GET /v1/events` (resumed with `Last-Event-ID`, across
//! control planes on one PostgreSQL, usage ticks from real traffic), and
//! `GET /v1/gateways`. Real `keygate serve` processes over real HTTP.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use common::sse::EventStream;
use common::*;

const ADMIN_TOKEN: &str = "kg-test-admin-token-5d1e7a";
const READ_TOKEN: &str = "kg-test-read-token-94c2b0";
const SYNC_TOKEN: &str = "kg-test-sync-token-1f6d3c";

const ADMIN_SECTION: &str = r#"admin:
  address: @ADMIN@
  tokens:
    - { name: ops, token: "${env:ADMIN_TOKEN}" }
    - { name: dashboard, token: "${env:READ_TOKEN}", role: read }
  sync_tokens:
    - { name: edge, token: "${env:SYNC_TOKEN}" }
"#;

const PROXY_SECTION: &str = r#"listeners:
  - address: @LISTEN@
upstreams:
  api: { targets: ["@UP@"] }
routes:
  - { name: orders, match: { path_prefix: /v1/orders }, upstream: api }
access_log: off
"#;

fn with_tokens(builder: NodeBuilder) -> NodeBuilder {
    builder.env("ADMIN_TOKEN", ADMIN_TOKEN).env("READ_TOKEN", READ_TOKEN).env("SYNC_TOKEN", SYNC_TOKEN)
}

/// Admin API and proxy in one process on a SQLite file; usage stored every second.
fn standalone(up: &Upstream) -> Node {
    let template = format!(
        "mode: standalone\nnode_id: @NODE@\nthreads: 1\n{ADMIN_SECTION}store:\n  url: \"sqlite://@DIR@/keygate.db\"\n\
         usage:\n  flush_interval: 1s\n{PROXY_SECTION}"
    );
    with_tokens(NodeBuilder::new(&template).var("UP", &up.addr())).start()
}

fn control_plane(store_url: &str) -> Node {
    let template =
        format!("mode: control-plane\nnode_id: @NODE@\nthreads: 1\n{ADMIN_SECTION}store:\n  url: \"@STORE@\"\n");
    with_tokens(NodeBuilder::new(&template).var("STORE", store_url)).start()
}

fn gateway(up: &Upstream, cp: SocketAddr, node_id: &str) -> Node {
    let template = format!(
        r#"mode: gateway
node_id: {node_id}
threads: 1
admin:
  address: @ADMIN@
keys:
  source: control_plane
  control_plane: {{ url: "http://@CP@", token: "${{env:SYNC_TOKEN}}" }}
{PROXY_SECTION}"#
    );
    NodeBuilder::new(&template).var("CP", &cp.to_string()).var("UP", &up.addr()).env("SYNC_TOKEN", SYNC_TOKEN).start()
}

#[track_caller]
fn call(node: &Node, token: &str, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
    let (status, _, value) = admin_json(method, node.admin, path, Some(token), body.as_ref());
    assert_eq!(status, want, "{method} {path} with {body:?}: expected {want}, got {status} {value}");
    value
}

fn create(node: &Node, name: &str) -> (String, Value) {
    let v = call(node, ADMIN_TOKEN, "POST", "/v1/keys", Some(json!({"name": name})), 201);
    (v["key"].as_str().expect("raw key").to_owned(), v["record"].clone())
}

/// `GET /v1/events`, which must answer 200 with an event stream.
#[track_caller]
fn open_stream(addr: SocketAddr, token: &str, last_event_id: Option<&str>) -> EventStream {
    let stream = EventStream::open(addr, token, last_event_id);
    assert_eq!(stream.status, 200, "GET /v1/events answered {}", stream.status);
    let media_type = stream.header("content-type").unwrap_or_default();
    assert!(media_type.contains("text/event-stream"), "GET /v1/events is {media_type:?}");
    stream
}

const WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn a_read_token_may_look_at_everything_and_is_forbidden_every_change() {
    let up = Upstream::start("up");
    let node = standalone(&up);
    let (_, record) = create(&node, "watched");
    let id = record["id"].as_str().unwrap().to_owned();

    assert_eq!(call(&node, READ_TOKEN, "GET", "/v1/whoami", None, 200), json!({"name": "dashboard", "role": "read"}));
    assert_eq!(call(&node, ADMIN_TOKEN, "GET", "/v1/whoami", None, 200), json!({"name": "ops", "role": "admin"}));
    let listed = call(&node, READ_TOKEN, "GET", "/v1/keys", None, 200);
    assert_eq!(listed["keys"][0]["id"], id.as_str());
    call(&node, READ_TOKEN, "GET", &format!("/v1/keys/{id}"), None, 200);
    call(&node, READ_TOKEN, "GET", &format!("/v1/keys/{id}/usage"), None, 200);
    call(&node, READ_TOKEN, "GET", &format!("/v1/audit?key_id={id}"), None, 200);
    call(&node, READ_TOKEN, "GET", "/v1/gateways", None, 200);
    drop(open_stream(node.admin, READ_TOKEN, None));

    let changes: [(&str, String, Option<Value>); 7] = [
        ("POST", "/v1/keys".into(), Some(json!({"name": "sneaky"}))),
        ("PATCH", format!("/v1/keys/{id}"), Some(json!({"status": "disabled"}))),
        ("POST", format!("/v1/keys/{id}/revoke"), None),
        ("POST", format!("/v1/keys/{id}/rotate"), Some(json!({"grace_period": "1h"}))),
        ("DELETE", format!("/v1/keys/{id}"), None),
        ("POST", "/v1/keys/import".into(), None),
        ("PATCH", "/v1/keys/key_doesnotexist0000000".into(), Some(json!({"name": "x"}))),
    ];
    for (method, path, body) in &changes {
        let r = admin_request(method, node.admin, path, Some(READ_TOKEN), body.as_ref());
        assert_eq!(r.status, 403, "{method} {path} with a read token: {} {}", r.status, r.text());
        assert_error(&r, 403, "forbidden");
    }
    // Nothing changed, and the read token cannot use the sync feed either.
    let after = call(&node, ADMIN_TOKEN, "GET", &format!("/v1/keys/{id}"), None, 200);
    assert_eq!(after["status"], "active");
    assert_eq!(call(&node, ADMIN_TOKEN, "GET", "/v1/keys", None, 200)["keys"].as_array().unwrap().len(), 1);
    let r = admin_request("GET", node.admin, "/v1/sync/changes?since=0", Some(READ_TOKEN), None);
    assert_error(&r, 401, "unauthorized");
    let r = admin_request("GET", node.admin, "/v1/whoami", Some(SYNC_TOKEN), None);
    assert_error(&r, 401, "unauthorized");
}

#[test]
fn key_changes_stream_as_events_in_order_and_resume_after_the_last_event_id() {
    let up = Upstream::start("up");
    let node = standalone(&up);
    let stream = open_stream(node.admin, READ_TOKEN, None);

    let (raw, record) = create(&node, "streamed");
    let id = record["id"].as_str().unwrap().to_owned();
    call(&node, ADMIN_TOKEN, "PATCH", &format!("/v1/keys/{id}"), Some(json!({"tags": ["live"]})), 200);
    call(&node, ADMIN_TOKEN, "PATCH", &format!("/v1/keys/{id}"), Some(json!({"status": "disabled"})), 200);
    call(&node, ADMIN_TOKEN, "PATCH", &format!("/v1/keys/{id}"), Some(json!({"status": "active"})), 200);
    let rotated = call(&node, ADMIN_TOKEN, "POST", &format!("/v1/keys/{id}/rotate"), Some(json!({})), 201);
    let successor = rotated["record"]["id"].as_str().unwrap().to_owned();
    call(&node, ADMIN_TOKEN, "POST", &format!("/v1/keys/{id}/revoke"), None, 200);
    admin_request("DELETE", node.admin, &format!("/v1/keys/{successor}"), Some(ADMIN_TOKEN), None);

    let expected = [
        ("key.created", &id),
        ("key.updated", &id),
        ("key.disabled", &id),
        ("key.updated", &id),
        ("key.rotated", &id),
        ("key.revoked", &id),
        ("key.deleted", &successor),
    ];
    let mut seen = Vec::new();
    for (kind, key_id) in expected {
        let event = stream.next_change(WITHIN);
        assert_eq!((event.kind.as_str(), event.data["data"]["key"]["id"].as_str()), (kind, Some(key_id.as_str())));
        assert_eq!(event.data["type"], kind);
        assert!(event.data["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", event.data);
        let text = event.data.to_string();
        assert!(!text.contains(&raw) && !text.contains("sha256:"), "an event leaks the key: {text}");
        seen.push(event);
    }
    assert_eq!(seen[4].data["data"]["successor"]["id"], successor.as_str());
    assert_eq!(seen[5].data["data"]["key"]["status"], "revoked");
    let ids: Vec<u64> = seen.iter().map(|e| e.id.as_deref().unwrap().parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(stream.quiet_for(Duration::from_millis(300)).is_none());
    drop(stream);

    // A reconnect with the id of the third event replays exactly the ones after it.
    let resumed = open_stream(node.admin, ADMIN_TOKEN, seen[2].id.as_deref());
    for event in &seen[3..] {
        let again = resumed.next_change(WITHIN);
        assert_eq!((again.id.as_deref(), again.kind.as_str()), (event.id.as_deref(), event.kind.as_str()));
    }
    assert!(resumed.quiet_for(Duration::from_millis(300)).is_none());
    let r = admin_request("GET", node.admin, "/v1/events", None, None);
    assert_error(&r, 401, "unauthorized");
}

#[test]
fn a_change_made_through_another_control_plane_on_one_postgres_reaches_the_stream() {
    let db = PgDb::create("keygate_events");
    let first = control_plane(&db.url);
    let second = control_plane(&db.url);
    let stream = open_stream(first.admin, ADMIN_TOKEN, None);
    let (_, record) = create(&second, "elsewhere");
    let event = stream.next_change(WITHIN);
    assert_eq!((event.kind.as_str(), &event.data["data"]["key"]["id"]), ("key.created", &record["id"]));
}

#[test]
fn usage_ticks_carry_the_counts_of_keys_in_use() {
    let up = Upstream::start("up");
    let node = standalone(&up);
    let (raw, record) = create(&node, "busy");
    let stream = open_stream(node.admin, READ_TOKEN, None);
    let auth = format!("Bearer {raw}");
    // A tick counts the current minute: keep the three requests inside one.
    let second = time::OffsetDateTime::now_utc().second();
    if second >= 50 {
        thread::sleep(Duration::from_secs(u64::from(61 - second)));
    }
    // The first request that passes is the key reaching the node's index.
    wait_until(Duration::from_secs(5), "the new key to be served", || {
        (node.get("/v1/orders", &[("Authorization", &auth)]).status == 200).then_some(())
    });
    for _ in 0..2 {
        assert_proxied(&node.get("/v1/orders", &[("Authorization", &auth)]));
    }
    let tick = stream.next_matching(Duration::from_secs(20), |e| {
        e.kind == "usage"
            && e.data["data"]["keys"].as_array().is_some_and(|keys| {
                keys.iter().any(|k| k["key_id"] == record["id"] && k["allowed"].as_u64() == Some(3))
            })
    });
    assert!(tick.id.is_none(), "usage ticks are a live view, not a log to resume");
    assert!(tick.data["data"]["window_start"].as_str().is_some_and(|t| t.ends_with(":00Z")), "{}", tick.data);
}

#[test]
fn the_gateways_list_shows_each_follower_with_its_version_lag_and_last_contact() {
    let dir = tempfile::tempdir().unwrap();
    let cp = control_plane(&format!("sqlite://{}/cp.db", dir.path().display()));
    let up = Upstream::start("up");
    let gw = gateway(&up, cp.admin, "edge-west&1");
    let listed = wait_until(Duration::from_secs(10), "the gateway to be listed", || {
        let v = call(&cp, READ_TOKEN, "GET", "/v1/gateways", None, 200);
        v["gateways"].as_array().filter(|g| !g.is_empty()).cloned()
    });
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["node_id"], "edge-west&1");
    assert_eq!(listed[0]["connected"], true);
    assert_eq!(listed[0]["address"], "127.0.0.1");
    assert!(listed[0]["last_seen"].as_str().is_some_and(|t| t.ends_with('Z')));

    // A change moves the feed; the gateway catches up and the lag returns to 0.
    create(&cp, "moves-the-feed");
    let latest = wait_until(Duration::from_secs(10), "the gateway to catch up", || {
        let v = call(&cp, ADMIN_TOKEN, "GET", "/v1/gateways", None, 200);
        let gw = &v["gateways"][0];
        (v["version"].as_u64() > Some(0) && gw["version"] == v["version"] && gw["lag"] == 0).then_some(v)
    });
    assert_eq!(latest["gateways"][0]["version"], latest["version"]);
    drop(gw);
}
