//! Usage ingestion and retention on a real `keygate serve` control plane (CONTRACT §6
//! usage API, §3 `usage.retention`, §8): a gateway-sized window uploaded in chunks
//! lands whole, an upload over the documented limits is refused whole with
//! `413 payload_too_large`, and old minutes are rolled up in the background while the
//! usage API keeps its answers. On SQLite and on PostgreSQL (a fresh database each).

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use keygate::usage::upload::{MAX_UPLOAD_BYTES, MAX_UPLOAD_RECORDS};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use common::*;

const ADMIN_TOKEN: &str = "kg-test-admin-token-51c0de";
const SYNC_TOKEN: &str = "kg-test-sync-token-9ad7e2";

/// Distinct keys active in the window a gateway uploads.
const WINDOW_KEYS: usize = 20_000;

fn control_plane(store_url: &str) -> Node {
    let template = r#"mode: control-plane
node_id: @NODE@
threads: 1
admin:
  address: @ADMIN@
  tokens:
    - { name: ops, token: "${env:ADMIN_TOKEN}" }
  sync_tokens:
    - { name: edge, token: "${env:SYNC_TOKEN}" }
store:
  url: "@STORE@"
"#;
    NodeBuilder::new(template)
        .var("STORE", store_url)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SYNC_TOKEN", SYNC_TOKEN)
        .start()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("format a timestamp")
}

/// A usage record (CONTRACT §8) of `key_id` for the 5 s window ending at `end`.
fn record(key_id: &str, end: OffsetDateTime, allowed: u64) -> Value {
    json!({
        "node": "edge-big",
        "key_id": key_id,
        "window_start": rfc3339(end - time::Duration::seconds(5)),
        "window_end": rfc3339(end),
        "requests": allowed + 1,
        "allowed": allowed,
        "denied": {"rate_limited": 1},
        "status": {"2xx": allowed, "3xx": 0, "4xx": 1, "5xx": 0},
        "bytes_in": 100,
        "bytes_out": 1000,
        "last_used_at": rfc3339(end),
    })
}

fn upload(sequence: u64, records: &[Value]) -> Value {
    json!({"node": "edge-big", "boot_id": "boot-7", "sequence": sequence, "records": records})
}

fn post_usage(cp: SocketAddr, body: &Value) -> (u16, Value) {
    let (status, _, value) = admin_json("POST", cp, "/v1/sync/usage", Some(SYNC_TOKEN), Some(body));
    (status, value)
}

/// `(buckets, sum of allowed)` of every key whose id starts with `prefix`, read from
/// the store behind the control plane's back.
fn stored(store_url: &str, prefix: &str) -> (i64, i64) {
    use sqlx::Connection as _;
    let sql = "SELECT COUNT(*), CAST(COALESCE(SUM(allowed), 0) AS BIGINT) FROM usage_buckets WHERE key_id LIKE $1";
    let pattern = format!("{prefix}%");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        if store_url.starts_with("sqlite:") {
            let mut conn = sqlx::SqliteConnection::connect(store_url).await.expect("open the SQLite store");
            sqlx::query_as(sql).bind(&pattern).fetch_one(&mut conn).await.expect("read usage_buckets")
        } else {
            let mut conn = sqlx::PgConnection::connect(store_url).await.expect("open the PostgreSQL store");
            sqlx::query_as(sql).bind(&pattern).fetch_one(&mut conn).await.expect("read usage_buckets")
        }
    })
}

fn key_usage(cp: SocketAddr, id: &str, from: OffsetDateTime, to: OffsetDateTime, granularity: &str) -> Value {
    let path = format!(
        "/v1/keys/{id}/usage?from={}&to={}&granularity={granularity}",
        rfc3339(from).replace('+', "%2B"),
        rfc3339(to).replace('+', "%2B")
    );
    let (status, _, value) = admin_json("GET", cp, &path, Some(ADMIN_TOKEN), None);
    assert_eq!(status, 200, "GET {path}: {value}");
    value
}

fn create_key(cp: SocketAddr, name: &str) -> String {
    let (status, _, value) = admin_json("POST", cp, "/v1/keys", Some(ADMIN_TOKEN), Some(&json!({"name": name})));
    assert_eq!(status, 201, "create a key: {value}");
    value["record"]["id"].as_str().expect("the new key's id").to_owned()
}

fn window_in_chunks_lands_whole_and_over_limit_uploads_are_refused(store_url: &str) {
    let cp = control_plane(store_url);
    let end = OffsetDateTime::now_utc();
    // Three of the window's keys exist, so the usage API can be asked about them.
    let known: Vec<String> = (0..3).map(|i| create_key(cp.admin, &format!("metered-{i}"))).collect();
    let mut records: Vec<Value> =
        (0..WINDOW_KEYS).map(|i| record(&format!("key_window_{i:06}"), end, 1 + (i % 5) as u64)).collect();
    for (i, id) in known.iter().enumerate() {
        records[i * 7_001] = record(id, end, 40 + i as u64);
    }
    let expected_allowed: u64 = records.iter().map(|r| r["allowed"].as_u64().unwrap()).sum();

    let chunks: Vec<&[Value]> = records.chunks(MAX_UPLOAD_RECORDS).collect();
    assert!(chunks.len() >= 4, "the window needs several chunks");
    for (i, chunk) in chunks.iter().enumerate() {
        let (status, answer) = post_usage(cp.admin, &upload(i as u64 + 1, chunk));
        assert_eq!((status, &answer), (200, &json!({"accepted": true, "duplicate": false})), "chunk {i}");
    }
    // A chunk whose answer was lost comes again: counted once.
    let (status, answer) = post_usage(cp.admin, &upload(2, chunks[1]));
    assert_eq!((status, &answer), (200, &json!({"accepted": true, "duplicate": true})));

    // Key ids all start with `key_`: the window's made-up ones and the three created.
    let (buckets, allowed) = stored(store_url, "key_");
    assert_eq!(buckets, WINDOW_KEYS as i64, "one bucket per key of the window");
    assert_eq!(allowed as u64, expected_allowed, "every record counted exactly once");
    let day = (end - time::Duration::DAY, end + time::Duration::minutes(1));
    for (i, id) in known.iter().enumerate() {
        let usage = key_usage(cp.admin, id, day.0, day.1, "hour");
        assert_eq!(usage["totals"]["allowed"], 40 + i as u64, "{usage}");
        assert_eq!(usage["totals"]["denied"]["rate_limited"], 1, "{usage}");
    }

    // One record over the limit: refused whole, nothing of it counted.
    let over: Vec<Value> = (0..=MAX_UPLOAD_RECORDS).map(|i| record(&format!("key_over_{i:06}"), end, 1)).collect();
    let (status, answer) = post_usage(cp.admin, &upload(100, &over));
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "payload_too_large", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&MAX_UPLOAD_RECORDS.to_string()), "{message}");
    assert_eq!(stored(store_url, "key_over_"), (0, 0));
    // Its id was not taken: the same sequence split to fit is counted.
    let (status, answer) = post_usage(cp.admin, &upload(100, &over[..MAX_UPLOAD_RECORDS]));
    assert_eq!((status, &answer), (200, &json!({"accepted": true, "duplicate": false})));
    assert_eq!(stored(store_url, "key_over_").0, MAX_UPLOAD_RECORDS as i64);

    // A body declared over the byte limit is answered before it is read.
    let length = (MAX_UPLOAD_BYTES + 1).to_string();
    let auth = format!("Bearer {SYNC_TOKEN}");
    let head = request(
        "POST",
        "/v1/sync/usage",
        &[("Authorization", &auth), ("Content-Type", "application/json"), ("Content-Length", &length)],
    );
    let mut conn = Conn::open(cp.admin);
    conn.write(&head).expect("send the request head");
    conn.write(b"{\"node\": \"edge-big\"").expect("send the start of the body");
    let refused = conn.read_response(false).expect("an answer before the body is complete");
    assert_error(&refused, 413, "payload_too_large");
    assert!(refused.json()["error"]["message"].as_str().unwrap_or_default().contains(&MAX_UPLOAD_BYTES.to_string()));
}

#[test]
fn a_20000_key_window_in_chunks_lands_whole_and_over_limit_uploads_are_refused_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    window_in_chunks_lands_whole_and_over_limit_uploads_are_refused(&format!(
        "sqlite://{}/keygate.db",
        dir.path().display()
    ));
}

#[test]
fn a_20000_key_window_in_chunks_lands_whole_and_over_limit_uploads_are_refused_on_postgres() {
    let db = PgDb::create("keygate_ingest_test");
    window_in_chunks_lands_whole_and_over_limit_uploads_are_refused(&db.url);
}

/// Minutes older than `usage.retention.minute` (7 days by default) are rolled up
/// shortly after the start; an hour query answers exactly as before, and a minute
/// query over them gets one bucket per hour.
fn old_minutes_are_rolled_up_in_the_background(store_url: &str) {
    let cp = control_plane(store_url);
    let id = create_key(cp.admin, "old-usage");
    let day = OffsetDateTime::now_utc().date() - time::Duration::days(30);
    let at = |h: u8, m: u8| day.with_hms(h, m, 0).expect("a time of day").assume_utc();
    let records = [record(&id, at(10, 15), 3), record(&id, at(10, 45), 4), record(&id, at(13, 5), 5)];
    let (status, answer) = post_usage(cp.admin, &upload(1, &records));
    assert_eq!(status, 200, "{answer}");
    let range = (at(0, 0), at(0, 0) + time::Duration::DAY);
    let hours = key_usage(cp.admin, &id, range.0, range.1, "hour");
    assert_eq!(hours["totals"]["allowed"], 12, "{hours}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let minutes = key_usage(cp.admin, &id, range.0, range.1, "minute");
        let starts: Vec<&str> =
            minutes["buckets"].as_array().unwrap().iter().filter_map(|b| b["start"].as_str()).collect();
        if starts.len() == 2 {
            assert_eq!(starts, [rfc3339(at(10, 0)), rfc3339(at(13, 0))], "{minutes}");
            assert_eq!(minutes["totals"], hours["totals"]);
            break;
        }
        assert!(Instant::now() < deadline, "the minutes were not rolled up: {minutes}\n{}", cp.output());
        thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(key_usage(cp.admin, &id, range.0, range.1, "hour"), hours, "an hour query answers as before");
    assert_eq!(stored(store_url, &id).0, 2, "one bucket per hour is stored");
}

#[test]
fn old_minutes_are_rolled_up_in_the_background_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    old_minutes_are_rolled_up_in_the_background(&format!("sqlite://{}/keygate.db", dir.path().display()));
}

#[test]
fn old_minutes_are_rolled_up_in_the_background_on_postgres() {
    let db = PgDb::create("keygate_rollup_test");
    old_minutes_are_rolled_up_in_the_background(&db.url);
}
