//! Black-box tests of what a console and other watchers of the admin API use
//! (CONTRACT §6): read-only tokens and `403 forbidden`, `GET /v1/whoami`, the
//! Server-Sent Events of `GET /v1/events` (resumed with `Last-Event-ID`, across
//! control planes on one PostgreSQL, usage ticks from real traffic), and
//! `GET /v1/gateways`. Real `keygate serve` processes over real HTTP.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

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

// ---------------------------------------------------------------------------
// A Server-Sent Events client over a plain socket
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SseEvent {
    id: Option<String>,
    kind: String,
    data: Value,
}

/// One open `GET /v1/events`; events arrive on a channel read by `next`.
struct EventStream {
    events: mpsc::Receiver<SseEvent>,
    socket: TcpStream,
}

impl EventStream {
    fn open(addr: SocketAddr, token: &str, last_event_id: Option<&str>) -> EventStream {
        let mut socket = TcpStream::connect(addr).expect("connect to the admin address");
        let mut head = format!("GET /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n");
        if let Some(id) = last_event_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("Accept: text/event-stream\r\n\r\n");
        socket.write_all(head.as_bytes()).expect("send the request");
        let mut reader = BufReader::new(socket.try_clone().expect("clone the socket"));
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.starts_with("HTTP/1.1 200"), "GET /v1/events answered {status:?}");
        let mut chunked = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header line");
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("content-type:") {
                assert!(lower.contains("text/event-stream"), "{line}");
            }
            chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
            if line == "\r\n" {
                break;
            }
        }
        let (sender, events) = mpsc::channel();
        thread::spawn(move || read_events(reader, chunked, sender));
        EventStream { events, socket }
    }

    /// The next event that is not a usage tick, within `within`.
    #[track_caller]
    fn next_change(&self, within: Duration) -> SseEvent {
        self.next_matching(within, |e| e.kind != "usage")
    }

    #[track_caller]
    fn next_matching(&self, within: Duration, wanted: impl Fn(&SseEvent) -> bool) -> SseEvent {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) if wanted(&event) => return event,
                Ok(_) => {}
                Err(e) => panic!("no matching event within {within:?}: {e}"),
            }
        }
    }

    /// Whether another change event arrives within `within`.
    fn quiet_for(&self, within: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + within;
        while let Ok(event) = self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if event.kind != "usage" {
                return Some(event);
            }
        }
        None
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// Decodes the body (chunked or not) and parses `id:`, `event:` and `data:` lines,
/// one event per blank line; comments (`:`) are keep-alives.
fn read_events(mut reader: BufReader<TcpStream>, chunked: bool, sender: mpsc::Sender<SseEvent>) {
    let mut body = Vec::new();
    let mut pending = String::new();
    loop {
        let bytes = if chunked {
            let mut size = String::new();
            if reader.read_line(&mut size).unwrap_or(0) == 0 {
                return;
            }
            let Ok(n) = usize::from_str_radix(size.trim(), 16) else { return };
            if n == 0 {
                return;
            }
            let mut chunk = vec![0; n + 2];
            if reader.read_exact(&mut chunk).is_err() {
                return;
            }
            chunk.truncate(n);
            chunk
        } else {
            let mut chunk = vec![0; 4096];
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => chunk[..n].to_vec(),
            }
        };
        body.extend_from_slice(&bytes);
        while let Some(end) = body.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = body.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
            if line.is_empty() {
                if !pending.is_empty() {
                    if let Some(event) = parse_event(&pending) {
                        if sender.send(event).is_err() {
                            return;
                        }
                    }
                    pending.clear();
                }
            } else {
                pending.push_str(&line);
                pending.push('\n');
            }
        }
    }
}

fn parse_event(block: &str) -> Option<SseEvent> {
    let (mut id, mut kind, mut data) = (None, String::from("message"), String::new());
    for line in block.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => kind = value.to_owned(),
            "data" => data.push_str(value),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
    Some(SseEvent { id, kind, data })
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
    drop(EventStream::open(node.admin, READ_TOKEN, None));

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
    let stream = EventStream::open(node.admin, READ_TOKEN, None);

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
    let resumed = EventStream::open(node.admin, ADMIN_TOKEN, seen[2].id.as_deref());
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
    let stream = EventStream::open(first.admin, ADMIN_TOKEN, None);
    let (_, record) = create(&second, "elsewhere");
    let event = stream.next_change(WITHIN);
    assert_eq!((event.kind.as_str(), &event.data["data"]["key"]["id"]), ("key.created", &record["id"]));
}

#[test]
fn usage_ticks_carry_the_counts_of_keys_in_use() {
    let up = Upstream::start("up");
    let node = standalone(&up);
    let (raw, record) = create(&node, "busy");
    let stream = EventStream::open(node.admin, READ_TOKEN, None);
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
