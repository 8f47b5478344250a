//! The metering sinks against real receivers: `{ type: http, format: cloudevents }`
//! against an HTTP server in this process that checks and deduplicates events as
//! a metering service would, and `{ type: nats }` against real NATS JetStream (the
//! broker at 127.0.0.1:4222, and a `nats-server` of the test's own where the broker
//! has to stop). Each test counts the requests it sent through a real gateway and
//! finds exactly that many in the receiver, through outages and retries.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use serde_json::Value;

const NODE: &str = "test-gw";
/// The NATS server that runs on this machine with JetStream.
const SHARED_NATS: &str = "nats://127.0.0.1:4222";
/// Sink retries back off up to a minute; an outage of a few seconds is over within this.
const AFTER_OUTAGE: Duration = Duration::from_secs(40);
const WEBHOOK_SECRET: &str = "whsec_c2luay10ZXN0LXNlY3JldA==";

// ---------------------------------------------------------------------------
// Keys, requests and what they should add up to.
// ---------------------------------------------------------------------------

struct Keys {
    /// Owner `acme`, may call the route.
    alice: TestKey,
    /// No owner, no scope: every request is denied, and still counted.
    bob: TestKey,
    /// Owner `globex`, may call the route.
    carol: TestKey,
}

impl Keys {
    fn new() -> Keys {
        Keys { alice: TestKey::new("key_alice"), bob: TestKey::new("key_bob"), carol: TestKey::new("key_carol") }
    }

    fn file(&self) -> String {
        let entry = |key: &TestKey, owner: Option<&str>, scopes: &str| {
            let owner = owner.map(|o| format!("    owner: {o}\n")).unwrap_or_default();
            format!(
                "  - id: {}\n    hash: \"{}\"\n    name: {}\n{owner}    scopes: [{scopes}]\n",
                key.id, key.hash, key.id
            )
        };
        format!(
            "keys:\n{}{}{}",
            entry(&self.alice, Some("acme"), "orders:read"),
            entry(&self.bob, None, ""),
            entry(&self.carol, Some("globex"), "orders:read")
        )
    }

    /// The `subject` each key's events must carry.
    fn subjects(&self) -> BTreeMap<String, String> {
        [(&self.alice, "acme"), (&self.bob, "key_bob"), (&self.carol, "globex")]
            .into_iter()
            .map(|(k, s)| (k.id.clone(), s.to_owned()))
            .collect()
    }
}

/// Requests sent per key id.
#[derive(Default)]
struct Sent(BTreeMap<String, u64>);

impl Sent {
    fn send(&mut self, gw: &Gateway, key: &TestKey, n: u64) {
        for _ in 0..n {
            let response = gw.get("/v1/orders", &[("authorization", &key.bearer())]);
            assert!(
                matches!(response.status, 200 | 403),
                "unexpected {} for {}: {}",
                response.status,
                key.id,
                response.text()
            );
            *self.0.entry(key.id.clone()).or_default() += 1;
        }
    }
}

fn start_gateway(up: &Upstream, keys: &Keys, sink: &str) -> Gateway {
    let usage = format!("usage:\n  flush_interval: 1s\n  sinks:\n    - {sink}\n");
    GatewayBuilder::new(&simple_config(&usage))
        .var("UP", &up.addr())
        .keys(&keys.file())
        .env("METER_TENANT", "tenant-7")
        .start()
}

/// `keygate_usage_flush_total{sink, result}`, whatever order the labels come in.
fn flushes(gw: &Gateway, sink: &str, result: &str) -> f64 {
    let text = gw.admin_get("/metrics").text();
    text.lines()
        .filter(|line| line.starts_with("keygate_usage_flush_total{"))
        .filter(|line| line.contains(&format!("sink=\"{sink}\"")) && line.contains(&format!("result=\"{result}\"")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Problems with one event, per CloudEvents 1.0 and CONTRACT §8.
fn event_problems(event: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut expect = |what: &str, ok: bool| {
        if !ok {
            problems.push(format!("{what}: {event}"));
        }
    };
    expect("specversion", event["specversion"] == "1.0");
    expect("type", event["type"] == "keygate.usage");
    expect("source", event["source"] == format!("keygate/{NODE}"));
    let id = event["id"].as_str().unwrap_or_default();
    expect("id", id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    expect("subject", event["subject"].as_str().is_some_and(|s| !s.is_empty()));
    expect("datacontenttype", event["datacontenttype"] == "application/json");
    let time = event["time"].as_str().unwrap_or_default();
    expect(
        "time is RFC 3339",
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).is_ok(),
    );
    expect("time is the window's end", event["time"] == event["data"]["window_end"]);
    for field in [
        "node",
        "key_id",
        "window_start",
        "window_end",
        "requests",
        "allowed",
        "denied",
        "status",
        "bytes_in",
        "bytes_out",
        "last_used_at",
    ] {
        expect(&format!("data.{field}"), event["data"].get(field).is_some());
    }
    expect("data.node", event["data"]["node"] == NODE);
    let known = ["specversion", "type", "source", "id", "subject", "time", "datacontenttype", "data"];
    expect("only known attributes", event.as_object().is_some_and(|o| o.keys().all(|k| known.contains(&k.as_str()))));
    problems
}

/// Events kept once per id, as a deduplicating receiver keeps them.
#[derive(Default)]
struct Ledger {
    events: HashMap<String, Value>,
    duplicates: usize,
    problems: Vec<String>,
}

impl Ledger {
    fn add(&mut self, event: Value) {
        self.problems.extend(event_problems(&event));
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        match self.events.get(&id) {
            Some(kept) => {
                self.duplicates += 1;
                if *kept != event {
                    self.problems.push(format!("id {id} came again with other content: {kept} then {event}"));
                }
            }
            None => {
                self.events.insert(id, event);
            }
        }
    }

    /// Requests counted per key id.
    fn totals(&self) -> BTreeMap<String, u64> {
        let mut totals = BTreeMap::new();
        for event in self.events.values() {
            let key = event["data"]["key_id"].as_str().unwrap_or_default().to_owned();
            *totals.entry(key).or_default() += event["data"]["requests"].as_u64().unwrap_or_default();
        }
        totals
    }

    fn subjects(&self) -> BTreeMap<String, String> {
        self.events
            .values()
            .map(|e| {
                (
                    e["data"]["key_id"].as_str().unwrap_or_default().to_owned(),
                    e["subject"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// An HTTP metering receiver.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct ReceiverState {
    ledger: Mutex<Ledger>,
    /// Answer 503 without looking at the body.
    refusing: AtomicBool,
    /// Keep the events of this many requests but answer 500, as if the acceptance was lost.
    lose_acceptances: AtomicUsize,
    requests: AtomicUsize,
    refused: AtomicUsize,
    largest_batch: AtomicUsize,
}

type Receiver = common::standard_webhooks::Receiver<ReceiverState>;

impl Receiver {
    fn start() -> Receiver {
        Receiver::listen("/events", receive)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.state.ledger.lock().unwrap()
    }
}

async fn receive(
    axum::extract::State(state): axum::extract::State<Arc<ReceiverState>>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> http::StatusCode {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if state.refusing.load(Ordering::SeqCst) {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return http::StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let mut problems = Vec::new();
    if header("content-type") != "application/cloudevents-batch+json" {
        problems.push(format!("content-type {:?}", header("content-type")));
    }
    if header("x-tenant") != "tenant-7" {
        problems.push(format!("x-tenant {:?}", header("x-tenant")));
    }
    if let Err(problem) = common::standard_webhooks::verify_signature(
        WEBHOOK_SECRET,
        &header("webhook-id"),
        &header("webhook-timestamp"),
        &header("webhook-signature"),
        &body,
    ) {
        problems.push(problem);
    }
    let events = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(events)) => events,
        _ => {
            problems.push(format!("body is not a JSON array: {}", String::from_utf8_lossy(&body)));
            Vec::new()
        }
    };
    state.largest_batch.fetch_max(events.len(), Ordering::SeqCst);
    let mut ledger = state.ledger.lock().unwrap();
    ledger.problems.extend(problems);
    for event in events {
        ledger.add(event);
    }
    drop(ledger);
    let lose = state.lose_acceptances.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    if lose {
        http::StatusCode::INTERNAL_SERVER_ERROR
    } else {
        http::StatusCode::ACCEPTED
    }
}

fn wait_for_http_totals(receiver: &Receiver, sent: &Sent, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while receiver.ledger().totals() != sent.0 {
        assert!(Instant::now() < deadline, "the receiver counted {:?}, sent {:?}", receiver.ledger().totals(), sent.0);
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn http_sink_counts_every_request_once_through_an_outage_and_a_lost_acceptance() {
    let up = Upstream::start("api");
    let keys = Keys::new();
    let receiver = Receiver::start();
    let sink = format!(
        "{{ type: http, url: \"{}\", format: cloudevents, batch_size: 2, secret: \"{WEBHOOK_SECRET}\", \
         headers: {{ x-tenant: \"${{env:METER_TENANT}}\" }} }}",
        receiver.url
    );
    let gw = start_gateway(&up, &keys, &sink);
    let mut sent = Sent::default();

    // Three keys in a window and batch_size 2: each batch takes two requests.
    sent.send(&gw, &keys.alice, 3);
    sent.send(&gw, &keys.bob, 2);
    sent.send(&gw, &keys.carol, 1);
    wait_for_http_totals(&receiver, &sent, EVENTUALLY);
    assert_eq!(receiver.state.largest_batch.load(Ordering::SeqCst), 2, "batch_size was not the largest request");

    // Outage: every request is refused; the usage waits and then arrives once.
    receiver.state.refusing.store(true, Ordering::SeqCst);
    sent.send(&gw, &keys.alice, 4);
    sent.send(&gw, &keys.carol, 2);
    wait_until(EVENTUALLY, "a refused flush", || (flushes(&gw, "http", "error") >= 1.0).then_some(()));
    sent.send(&gw, &keys.bob, 1);
    thread::sleep(Duration::from_secs(1));
    receiver.state.refusing.store(false, Ordering::SeqCst);
    wait_for_http_totals(&receiver, &sent, AFTER_OUTAGE);
    assert!(receiver.state.refused.load(Ordering::SeqCst) >= 1);

    // Accepted, but the answer is lost: the sink sends the events again, and the
    // receiver drops them by id.
    receiver.state.lose_acceptances.store(1, Ordering::SeqCst);
    sent.send(&gw, &keys.alice, 2);
    sent.send(&gw, &keys.bob, 1);
    wait_until(AFTER_OUTAGE, "the events of the lost acceptance sent again", || {
        (receiver.ledger().duplicates >= 1).then_some(())
    });
    wait_for_http_totals(&receiver, &sent, AFTER_OUTAGE);

    thread::sleep(Duration::from_millis(2500));
    let ledger = receiver.ledger();
    assert_eq!(ledger.totals(), sent.0, "counts changed after delivery");
    assert!(ledger.problems.is_empty(), "problems:\n{}", ledger.problems.join("\n"));
    assert_eq!(ledger.subjects(), keys.subjects());
    assert!(flushes(&gw, "http", "ok") >= 3.0);
}

// ---------------------------------------------------------------------------
// NATS JetStream.
// ---------------------------------------------------------------------------

/// A stream of the test's own, deleted when the test ends however it ends.
struct TestStream {
    runtime: tokio::runtime::Runtime,
    jetstream: jetstream::Context,
    name: String,
    subject: String,
}

static STREAMS: AtomicU64 = AtomicU64::new(0);

impl TestStream {
    fn create(url: &str, storage: jetstream::stream::StorageType) -> TestStream {
        Self::create_with(url, storage, async_nats::ConnectOptions::new())
    }

    fn create_with(
        url: &str,
        storage: jetstream::stream::StorageType,
        options: async_nats::ConnectOptions,
    ) -> TestStream {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let unique = format!(
            "{}_{}_{}",
            std::process::id(),
            STREAMS.fetch_add(1, Ordering::SeqCst),
            time::OffsetDateTime::now_utc().unix_timestamp_nanos() % 1_000_000_000
        );
        let name = format!("KEYGATE_TEST_{unique}");
        let subject = format!("keygate.test.{unique}.usage");
        let jetstream = runtime.block_on(async {
            let client = options.connect(url).await.unwrap_or_else(|e| panic!("connect to NATS at {url}: {e}"));
            let jetstream = jetstream::new(client);
            jetstream
                .create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![subject.clone()],
                    storage,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
            jetstream
        });
        TestStream { runtime, jetstream, name, subject }
    }

    /// Every message in the stream, as a deduplicating consumer would keep them,
    /// after checking each one's `Nats-Msg-Id` and content type.
    fn ledger(&self) -> (Ledger, u64) {
        self.runtime.block_on(async {
            let mut ledger = Ledger::default();
            let Ok(mut stream) = self.jetstream.get_stream(&self.name).await else {
                ledger.problems.push("stream unreachable".into());
                return (ledger, 0);
            };
            let Ok(info) = stream.info().await.cloned() else {
                ledger.problems.push("stream info unreachable".into());
                return (ledger, 0);
            };
            for sequence in info.state.first_sequence..=info.state.last_sequence {
                let Ok(message) = stream.get_raw_message(sequence).await else { continue };
                let event: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
                let msg_id = message.headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.as_str().to_owned());
                if msg_id.as_deref() != event["id"].as_str() {
                    ledger.problems.push(format!("Nats-Msg-Id {msg_id:?} is not the event id: {event}"));
                }
                let content_type = message.headers.get("Content-Type").map(|v| v.as_str().to_owned());
                if content_type.as_deref() != Some("application/cloudevents+json") {
                    ledger.problems.push(format!("Content-Type {content_type:?}"));
                }
                ledger.add(event);
            }
            (ledger, info.state.messages)
        })
    }

    fn wait_for_totals(&self, sent: &Sent, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (ledger, _) = self.ledger();
            if ledger.totals() == sent.0 {
                return;
            }
            assert!(Instant::now() < deadline, "the stream counted {:?}, sent {:?}", ledger.totals(), sent.0);
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The checks that end a test: exact, stays exact, stored once, well formed.
    fn assert_final(&self, sent: &Sent, keys: &Keys) {
        self.wait_for_totals(sent, EVENTUALLY);
        thread::sleep(Duration::from_millis(2500));
        let (ledger, stored) = self.ledger();
        assert_eq!(ledger.totals(), sent.0, "counts changed after delivery");
        assert_eq!(ledger.duplicates, 0, "JetStream stored an event twice");
        assert_eq!(stored, ledger.events.len() as u64);
        assert!(ledger.problems.is_empty(), "problems:\n{}", ledger.problems.join("\n"));
        assert_eq!(ledger.subjects(), keys.subjects());
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (jetstream, name) = (&self.jetstream, &self.name);
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), jetstream.delete_stream(name)).await });
    }
}

fn nats_sink(url: &str, subject: &str) -> String {
    format!("{{ type: nats, url: \"{url}\", subject: \"{subject}\" }}")
}

#[test]
fn nats_sink_stores_every_request_once_in_jetstream() {
    let up = Upstream::start("api");
    let keys = Keys::new();
    let stream = TestStream::create(SHARED_NATS, jetstream::stream::StorageType::Memory);
    let gw = start_gateway(&up, &keys, &nats_sink(SHARED_NATS, &stream.subject));
    let mut sent = Sent::default();
    sent.send(&gw, &keys.alice, 3);
    sent.send(&gw, &keys.bob, 2);
    sent.send(&gw, &keys.carol, 1);
    stream.wait_for_totals(&sent, EVENTUALLY);
    sent.send(&gw, &keys.alice, 2);
    stream.assert_final(&sent, &keys);
    assert!(flushes(&gw, "nats", "ok") >= 2.0);
}

/// A `nats-server` of the test's own, to stop and start again.
struct OwnBroker {
    port: u16,
    store: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

/// The `nats-server` program: on the PATH, or where Debian installs it (`/usr/sbin`,
/// which a non-root PATH may leave out).
fn nats_server() -> &'static str {
    ["nats-server", "/usr/sbin/nats-server", "/usr/local/sbin/nats-server"]
        .into_iter()
        .find(|program| Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("nats-server is not installed: these tests start brokers of their own")
}

impl OwnBroker {
    fn start() -> OwnBroker {
        Self::start_with(&[])
    }

    /// Fails where no `nats-server` is installed: this machine kind runs NATS, and a
    /// test that cannot run must not pass.
    fn start_with(args: &[&str]) -> OwnBroker {
        let mut broker = OwnBroker {
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        broker.run();
        broker
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let child = Command::new(nats_server())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        assert!(wait_for_port(sock(&format!("127.0.0.1:{}", self.port)), EVENTUALLY), "nats-server did not listen");
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn nats_sink_loses_nothing_and_stores_nothing_twice_through_a_broker_outage() {
    let mut broker = OwnBroker::start();
    let up = Upstream::start("api");
    let keys = Keys::new();
    // File storage: the stream outlives the broker's restart.
    let stream = TestStream::create(&broker.url(), jetstream::stream::StorageType::File);
    let gw = start_gateway(&up, &keys, &nats_sink(&broker.url(), &stream.subject));
    let mut sent = Sent::default();
    sent.send(&gw, &keys.alice, 3);
    sent.send(&gw, &keys.carol, 1);
    stream.wait_for_totals(&sent, EVENTUALLY);

    broker.stop();
    sent.send(&gw, &keys.alice, 4);
    sent.send(&gw, &keys.bob, 2);
    wait_until(EVENTUALLY, "a failed flush", || (flushes(&gw, "nats", "error") >= 1.0).then_some(()));
    sent.send(&gw, &keys.carol, 3);
    broker.run();
    stream.wait_for_totals(&sent, AFTER_OUTAGE);
    stream.assert_final(&sent, &keys);
}

// ---------------------------------------------------------------------------
// The NATS sink on its own: what JetStream does with a batch published again.
// ---------------------------------------------------------------------------

/// Owners as the gateway's index would give them.
struct Owners;

impl keygate::usage::KeyOwners for Owners {
    fn owners_of(&self, key_ids: &std::collections::HashSet<String>) -> HashMap<String, String> {
        key_ids.iter().filter(|id| *id != "key_bob").map(|id| (id.clone(), "acme".to_owned())).collect()
    }
}

fn usage_record(key_id: &str, requests: u64) -> keygate::usage::UsageRecord {
    let end = time::OffsetDateTime::now_utc();
    keygate::usage::UsageRecord {
        node: NODE.into(),
        key_id: key_id.into(),
        window_start: end - Duration::from_secs(1),
        window_end: end,
        requests,
        allowed: requests,
        denied: BTreeMap::new(),
        status: keygate::usage::StatusClasses { s2xx: requests, ..Default::default() },
        bytes_in: 0,
        bytes_out: 0,
        last_used_at: Some(end),
        owner_at_count: None,
    }
}

fn nats_sink_for(subject: &str) -> keygate::usage::NatsSink {
    nats_sink_at(SHARED_NATS, subject)
}

fn nats_sink_at(url: &str, subject: &str) -> keygate::usage::NatsSink {
    let config = keygate::config::NatsSinkConfig { url: url.into(), subject: subject.into() };
    keygate::usage::NatsSink::new(&config, NODE, Arc::new(Owners))
}

#[test]
fn nats_sink_batch_published_again_is_stored_once() {
    use keygate::usage::{UsageBatch, UsageSink};
    let stream = TestStream::create(SHARED_NATS, jetstream::stream::StorageType::Memory);
    let records: Vec<_> = (0..300).map(|i| usage_record(&format!("key_{i}"), 1 + i % 3)).collect();
    let batch = UsageBatch { node: NODE, boot_id: "boot-1", sequence: 1, records: &records };
    let stored = || stream.ledger().1;

    stream.runtime.block_on(nats_sink_for(&stream.subject).write(batch)).unwrap();
    assert_eq!(stored(), 300);
    // A sink that remembers nothing of the first try (as after a lost ack on a
    // fresh connection) publishes all of it again: JetStream drops every message.
    stream.runtime.block_on(nats_sink_for(&stream.subject).write(batch)).unwrap();
    assert_eq!(stored(), 300, "a re-published batch was stored again");
    // The next batch of the same records is new usage.
    stream.runtime.block_on(nats_sink_for(&stream.subject).write(UsageBatch { sequence: 2, ..batch })).unwrap();
    assert_eq!(stored(), 600);
    let (ledger, _) = stream.ledger();
    assert_eq!(ledger.duplicates, 0);
    assert!(ledger.events.values().all(|e| e["subject"] == "acme"), "an event without its key's owner");
    assert!(ledger.problems.is_empty(), "problems:\n{}", ledger.problems.join("\n"));
}

#[test]
fn nats_sink_without_a_stream_for_its_subject_says_so() {
    use keygate::usage::{UsageBatch, UsageSink};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let subject = format!("keygate.test.{}.nostream", std::process::id());
    let records = [usage_record("key_a", 1)];
    let batch = UsageBatch { node: NODE, boot_id: "boot-1", sequence: 1, records: &records };
    let error = runtime.block_on(nats_sink_for(&subject).write(batch)).expect_err("published without a stream");
    let message = error.to_string();
    assert!(message.contains("no JetStream stream captures the subject") && message.contains(&subject), "{message}");
}

#[test]
fn nats_sink_signs_in_with_the_credentials_of_its_url() {
    use keygate::usage::{UsageBatch, UsageSink};
    let broker = OwnBroker::start_with(&["--user", "keygate", "--pass", "p@ss:w0rd"]);
    let options = async_nats::ConnectOptions::with_user_and_password("keygate".into(), "p@ss:w0rd".into());
    let stream = TestStream::create_with(&broker.url(), jetstream::stream::StorageType::Memory, options);
    let records = [usage_record("key_a", 2), usage_record("key_b", 1)];
    let batch = UsageBatch { node: NODE, boot_id: "boot-1", sequence: 1, records: &records };

    let anonymous = stream.runtime.block_on(nats_sink_at(&broker.url(), &stream.subject).write(batch));
    assert!(anonymous.is_err(), "the broker let a client without a password publish");
    let url = format!("nats://keygate:p%40ss%3Aw0rd@127.0.0.1:{}", broker.port);
    stream.runtime.block_on(nats_sink_at(&url, &stream.subject).write(batch)).unwrap();
    assert_eq!(stream.ledger().1, 2);
}
