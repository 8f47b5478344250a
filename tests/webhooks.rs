//! Black-box tests of `webhooks:` (CONTRACT §3, §6, §7): a real `keygate serve`
//! delivering to a real HTTP receiver that checks every Standard Webhooks signature,
//! through a receiver outage and a node killed and restarted; event filters,
//! `key.expiring` and `quota.threshold` from real traffic.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use common::standard_webhooks::verify_signature;
use common::*;

const ADMIN_TOKEN: &str = "kg-test-admin-token-83b1fe";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

// ---------------------------------------------------------------------------
// A receiver that verifies signatures
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    body: Value,
    /// What this receiver answered.
    accepted: bool,
}

#[derive(Default)]
struct ReceiverState {
    deliveries: Mutex<Vec<Delivery>>,
    problems: Mutex<Vec<String>>,
    refusing: AtomicBool,
}

type Receiver = common::standard_webhooks::Receiver<ReceiverState>;

impl Receiver {
    fn start() -> Receiver {
        Receiver::listen("/hooks", receive)
    }

    fn refuse(&self, refusing: bool) {
        self.state.refusing.store(refusing, Ordering::SeqCst);
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.state.deliveries.lock().unwrap().clone()
    }

    /// The events accepted so far, as (type, key id of `data.key` or `data.key_id`).
    fn accepted(&self) -> Vec<(String, String)> {
        self.deliveries()
            .iter()
            .filter(|d| d.accepted)
            .map(|d| {
                let data = &d.body["data"];
                let key = data["key"]["id"].as_str().or(data["key_id"].as_str()).unwrap_or_default();
                (d.body["type"].as_str().unwrap_or_default().to_owned(), key.to_owned())
            })
            .collect()
    }

    #[track_caller]
    fn assert_no_problems(&self) {
        let problems = self.state.problems.lock().unwrap();
        assert!(problems.is_empty(), "the receiver found: {problems:?}");
    }
}

async fn receive(
    axum::extract::State(state): axum::extract::State<Arc<ReceiverState>>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> http::StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let id = header("webhook-id");
    if let Err(problem) =
        verify_signature(SECRET, &id, &header("webhook-timestamp"), &header("webhook-signature"), &body)
    {
        state.problems.lock().unwrap().push(problem);
    }
    if header("content-type") != "application/json" {
        state.problems.lock().unwrap().push(format!("content-type {:?}", header("content-type")));
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String("not JSON".into()));
    let accepted = !state.refusing.load(Ordering::SeqCst);
    state.deliveries.lock().unwrap().push(Delivery { id, body, accepted });
    if accepted {
        http::StatusCode::NO_CONTENT
    } else {
        http::StatusCode::SERVICE_UNAVAILABLE
    }
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// A standalone node on a SQLite file in its own dir, delivering to `receiver`;
/// `webhook` adds fields to the webhook entry, `rest` adds sections.
fn standalone(up: &Upstream, receiver: &Receiver, webhook: &str, rest: &str) -> Node {
    let template = format!(
        r#"mode: standalone
node_id: @NODE@
threads: 1
admin:
  address: @ADMIN@
  tokens: [ {{ name: ops, token: "${{env:ADMIN_TOKEN}}" }} ]
store: {{ url: "sqlite://@DIR@/keygate.db" }}
webhooks:
  - {{ url: "{url}", secret: "${{env:HOOK_SECRET}}"{webhook} }}
listeners:
  - address: @LISTEN@
upstreams:
  api: {{ targets: ["@UP@"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api }}
access_log: off
{rest}"#,
        url = receiver.url
    );
    NodeBuilder::new(&template).var("UP", &up.addr()).env("ADMIN_TOKEN", ADMIN_TOKEN).env("HOOK_SECRET", SECRET).start()
}

#[track_caller]
fn call(node: &Node, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
    let (status, _, value) = admin_json(method, node.admin, path, Some(ADMIN_TOKEN), body.as_ref());
    assert_eq!(status, want, "{method} {path} with {body:?}: expected {want}, got {status} {value}");
    value
}

fn create(node: &Node, body: Value) -> (String, String) {
    let v = call(node, "POST", "/v1/keys", Some(body), 201);
    (v["key"].as_str().unwrap().to_owned(), v["record"]["id"].as_str().unwrap().to_owned())
}

fn pair(kind: &str, id: &str) -> (String, String) {
    (kind.to_owned(), id.to_owned())
}

/// A receiver seen for the first time starts after the newest event: wait until the
/// node has taken its place in the log for the `runs`-th time.
#[track_caller]
fn wait_delivering(node: &Node, runs: usize) {
    wait_until(Duration::from_secs(10), "the webhook to start delivering", || {
        (node.output().matches("webhook: delivering").count() >= runs).then_some(())
    });
}

#[track_caller]
fn wait_accepted(receiver: &Receiver, expected: &[(String, String)], within: Duration) {
    wait_until(within, &format!("the receiver to accept {expected:?}"), || {
        (receiver.accepted() == expected).then_some(())
    });
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn webhooks_are_signed_and_arrive_through_a_receiver_outage_and_a_node_restart() {
    let up = Upstream::start("up");
    let receiver = Receiver::start();
    let mut node = standalone(&up, &receiver, "", "");
    wait_delivering(&node, 1);

    let (_, a) = create(&node, json!({"name": "a"}));
    wait_accepted(&receiver, &[pair("key.created", &a)], Duration::from_secs(5));
    let first = &receiver.deliveries()[0];
    assert!(first.id.starts_with("evt_"), "{first:?}");
    assert!(first.body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{first:?}");
    assert_eq!(first.body["data"]["key"]["name"], "a");
    assert!(!first.body.to_string().contains("sha256:"), "a webhook leaks the key's hash: {}", first.body);

    // The receiver goes down: the revocation is retried, with the same id every time.
    receiver.refuse(true);
    call(&node, "POST", &format!("/v1/keys/{a}/revoke"), None, 200);
    wait_until(Duration::from_secs(10), "two refused attempts", || {
        (receiver.deliveries().iter().filter(|d| !d.accepted).count() >= 2).then_some(())
    });
    let refused: Vec<Delivery> = receiver.deliveries().into_iter().filter(|d| !d.accepted).collect();
    assert!(refused.iter().all(|d| d.id == refused[0].id && d.body["type"] == "key.revoked"), "{refused:?}");
    assert!(node.metric("keygate_webhook_deliveries_total{result=\"retry\"}").unwrap_or(0.0) >= 2.0);
    assert_eq!(node.metric("keygate_webhook_pending"), Some(1.0));

    // The node is killed while the receiver is down, and a key changes after its restart.
    node.kill();
    node.restart();
    wait_delivering(&node, 2);
    let (_, b) = create(&node, json!({"name": "b"}));
    receiver.refuse(false);
    let expected = [pair("key.created", &a), pair("key.revoked", &a), pair("key.created", &b)];
    wait_accepted(&receiver, &expected, Duration::from_secs(20));
    let revoked = receiver.deliveries().into_iter().find(|d| d.accepted && d.body["type"] == "key.revoked").unwrap();
    assert_eq!(revoked.id, refused[0].id, "a retried event keeps its webhook-id");
    assert!(node.metric("keygate_webhook_deliveries_total{result=\"delivered\"}").unwrap_or(0.0) >= 2.0);
    wait_until(Duration::from_secs(5), "nothing pending", || {
        (node.metric("keygate_webhook_pending") == Some(0.0)).then_some(())
    });
    receiver.assert_no_problems();
}

#[test]
fn a_webhook_gets_only_its_events_and_expiring_keys_once_within_their_lead() {
    let up = Upstream::start("up");
    let receiver = Receiver::start();
    let node = standalone(&up, &receiver, ", events: [key.expiring, key.deleted], expiring_lead: 1h", "");
    wait_delivering(&node, 1);
    let (_, soon) = create(&node, json!({"name": "soon", "ttl": "30m"}));
    let (_, later) = create(&node, json!({"name": "later", "ttl": "2h"}));
    let (_, never) = create(&node, json!({"name": "never"}));
    call(&node, "PATCH", &format!("/v1/keys/{never}"), Some(json!({"name": "renamed"})), 200);
    admin_request("DELETE", node.admin, &format!("/v1/keys/{never}"), Some(ADMIN_TOKEN), None);
    let expected = [pair("key.deleted", &never), pair("key.expiring", &soon)];
    wait_until(Duration::from_secs(25), "the deletion and the expiring key", || {
        let mut accepted = receiver.accepted();
        accepted.sort();
        (accepted == expected).then_some(())
    });
    let expiring = receiver.deliveries().into_iter().find(|d| d.body["type"] == "key.expiring").unwrap();
    assert_eq!(expiring.body["data"]["lead"], "1h");
    assert!(expiring.body["data"]["key"]["expires_at"].is_string());
    // Later scans send it again to no one, and the key two hours out is not due.
    std::thread::sleep(Duration::from_secs(11));
    let mut accepted = receiver.accepted();
    accepted.sort();
    assert_eq!(accepted, expected, "{later} is not due, {soon} is sent once");
    receiver.assert_no_problems();
}

#[test]
fn quota_thresholds_are_sent_once_per_period_at_80_and_100_percent() {
    let up = Upstream::start("up");
    let receiver = Receiver::start();
    let plans = "plans:\n  metered: { quota: { requests: 5, per: day } }\nusage:\n  flush_interval: 1s\n";
    let node = standalone(&up, &receiver, ", events: [quota.threshold]", plans);
    wait_delivering(&node, 1);
    let (raw, id) = create(&node, json!({"name": "metered", "plan": "metered"}));
    let auth = format!("Bearer {raw}");
    wait_until(Duration::from_secs(5), "the key to be served", || {
        (node.get("/v1/orders", &[("Authorization", &auth)]).status == 200).then_some(())
    });
    for _ in 0..3 {
        assert_proxied(&node.get("/v1/orders", &[("Authorization", &auth)]));
    }
    // 4 of 5: 80 %.
    wait_accepted(&receiver, &[pair("quota.threshold", &id)], Duration::from_secs(30));
    let first = &receiver.deliveries()[0].body["data"];
    assert_eq!(
        (first["threshold"].as_u64(), first["limit"].as_u64(), first["period"].as_str()),
        (Some(80), Some(5), Some("day"))
    );
    assert_eq!(first["used"], 4);
    assert_proxied(&node.get("/v1/orders", &[("Authorization", &auth)]));
    let refused = node.get("/v1/orders", &[("Authorization", &auth)]);
    assert_error(&refused, 429, "quota_exceeded");
    wait_accepted(&receiver, &[pair("quota.threshold", &id), pair("quota.threshold", &id)], Duration::from_secs(30));
    assert_eq!(receiver.deliveries()[1].body["data"]["threshold"], 100);
    // Each threshold once in the period, however many scans see it crossed.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(receiver.accepted().len(), 2);
    receiver.assert_no_problems();
}

#[test]
fn control_planes_sharing_postgres_deliver_each_event_once_and_take_over_from_one_that_stops() {
    let db = PgDb::create("keygate_webhooks");
    let receiver = Receiver::start();
    let control_plane = || {
        let template = format!(
            r#"mode: control-plane
node_id: @NODE@
admin:
  address: @ADMIN@
  tokens: [ {{ name: ops, token: "${{env:ADMIN_TOKEN}}" }} ]
store: {{ url: "{db}" }}
webhooks:
  - {{ url: "{url}", secret: "${{env:HOOK_SECRET}}" }}
"#,
            db = db.url,
            url = receiver.url
        );
        NodeBuilder::new(&template).env("ADMIN_TOKEN", ADMIN_TOKEN).env("HOOK_SECRET", SECRET).start()
    };
    let mut first = control_plane();
    wait_delivering(&first, 1);
    let second = control_plane();
    let mut expected = Vec::new();
    for i in 0..6 {
        let node = if i % 2 == 0 { &first } else { &second };
        expected.push(pair("key.created", &create(node, json!({"name": format!("k{i}")})).1));
    }
    wait_accepted(&receiver, &expected, Duration::from_secs(10));
    // The holder stops and gives its lease up; the other delivers from there.
    assert!(first.stop().is_some_and(|status| status.success()));
    wait_delivering(&second, 1);
    expected.push(pair("key.created", &create(&second, json!({"name": "after"})).1));
    wait_accepted(&receiver, &expected, Duration::from_secs(15));
    let ids: Vec<String> = receiver.deliveries().into_iter().map(|d| d.id).collect();
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an event was delivered twice: {ids:?}");
    receiver.assert_no_problems();
}
