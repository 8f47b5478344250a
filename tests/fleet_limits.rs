//! Fleet limits (CONTRACT §3 `fleet_limits`, §7 `keygate_fleet_limits_*`): real
//! `keygate serve` gateways reconciling through a real Redis. The shared server at
//! 127.0.0.1:6379 is only ever used through budgets named uniquely per test; a test
//! that stops the engine starts a `redis-server` of its own on a free port.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";
const EVENTUALLY: Duration = Duration::from_secs(15);

/// A key id no other test run uses, so its counters in a shared Redis are its own.
fn unique_id(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("key_{name}_{}_{nanos}", std::process::id())
}

fn fleet_config(redis_url: &str) -> String {
    simple_config(&format!("fleet_limits: {{ engine: redis, url: \"{redis_url}\", sync_interval: 100ms }}\n"))
}

fn start_gateway(config: &str, up: &Upstream, keys: &str) -> Gateway {
    GatewayBuilder::new(config).var("UP", &up.addr()).keys(keys).start()
}

fn call(gw: &Gateway, key: &TestKey) -> Response {
    gw.get("/v1/orders", &[("x-api-key", &key.raw)])
}

/// Sends to each gateway in turn, `pause` apart; returns how many were let through.
/// Every answer must be a pass or a `rate_limited` 429 with its headers.
fn alternate(gateways: &[&Gateway], key: &TestKey, requests: usize, pause: Duration) -> usize {
    let mut allowed = 0;
    for i in 0..requests {
        let r = call(gateways[i % gateways.len()], key);
        match r.status {
            200 => allowed += 1,
            429 => {
                assert_error(&r, 429, "rate_limited");
                assert!(r.header("retry-after").is_some(), "429 without Retry-After: {:?}", r.headers);
                for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
                    assert!(r.header(name).is_some(), "429 without {name}: {:?}", r.headers);
                }
            }
            other => panic!("request {i}: unexpected {other}: {}", r.text()),
        }
        thread::sleep(pause);
    }
    allowed
}

fn fallback(gw: &Gateway) -> Option<f64> {
    gw.metric("keygate_fleet_limits_local_fallback")
}

fn syncs(gw: &Gateway, result: &str) -> f64 {
    gw.metric(&format!("keygate_fleet_limits_sync_total{{result=\"{result}\"}}")).unwrap_or(0.0)
}

#[test]
fn two_gateways_sharing_a_key_allow_its_limit_once_not_twice() {
    let up = Upstream::start("api");
    let key = TestKey::new(&unique_id("fleet_two"));
    // 20 an hour: nothing refills during the test, so the fleet may let through 20 in all.
    let keys = keys_file(&[key.entry("scopes: [orders:read]\nrate_limit: { requests: 20, per: 1h }")]);
    let config = fleet_config(SHARED_REDIS);
    let (a, b) = (start_gateway(&config, &up, &keys), start_gateway(&config, &up, &keys));
    for gw in [&a, &b] {
        wait_until(EVENTUALLY, "the gateway reaches Redis", || (syncs(gw, "ok") > 0.0).then_some(()));
    }

    let allowed = alternate(&[&a, &b], &key, 60, Duration::from_millis(40));
    // Per process this would be 40; the fleet overshoots by what the other gateway
    // allowed before it heard of the last requests: one sync interval (100 ms, a few
    // requests at this pace), with room for rounds delayed on a busy machine.
    assert!((20..=25).contains(&allowed), "two gateways allowed {allowed} of a fleet limit of 20");
    assert_eq!(up.request_count(), allowed);
    for gw in [&a, &b] {
        assert_eq!(fallback(gw), Some(0.0));
        assert_eq!(syncs(gw, "error"), 0.0);
    }
}

#[test]
fn keys_of_one_owner_share_a_fleet_budget_across_gateways() {
    let up = Upstream::start("api");
    let owner = unique_id("owner");
    let (first, second) = (TestKey::new(&unique_id("fleet_o1")), TestKey::new(&unique_id("fleet_o2")));
    let limit = "rate_limit: { requests: 10, per: 1h, by: owner }";
    let keys = keys_file(&[
        first.entry(&format!("scopes: [orders:read]\n{limit}")).replace("owner: acme", &format!("owner: {owner}")),
        second.entry(&format!("scopes: [orders:read]\n{limit}")).replace("owner: acme", &format!("owner: {owner}")),
    ]);
    let config = fleet_config(SHARED_REDIS);
    let (a, b) = (start_gateway(&config, &up, &keys), start_gateway(&config, &up, &keys));
    let mut allowed = 0;
    for i in 0..30 {
        let (gw, key) = if i % 2 == 0 { (&a, &first) } else { (&b, &second) };
        if call(gw, key).status == 200 {
            allowed += 1;
        }
        thread::sleep(Duration::from_millis(40));
    }
    // Per process (or per key) this would be 20.
    assert!((10..=14).contains(&allowed), "one owner's keys on two gateways allowed {allowed} of 10");
}

/// A `redis-server` of the test's own, without persistence, to kill and start again.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Fails where no `redis-server` is installed: a test that cannot run must not pass.
    fn start() -> OwnRedis {
        let installed = Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(installed, "redis-server is not installed: this test starts an engine of its own");
        let mut redis = OwnRedis { port: free_port(), child: None };
        redis.run();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        assert!(wait_for_port(sock(&format!("127.0.0.1:{}", self.port)), EVENTUALLY), "redis-server did not listen");
    }

    /// Kills it outright, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Requests with a key that is never limited, to both gateways, until stopped:
/// every answer is recorded, so that any failure while the engine is away shows.
struct Background {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Background {
    fn start(addrs: Vec<std::net::SocketAddr>, key: &TestKey) -> Background {
        let (stop, sent, failures) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::default());
        let raw = key.raw.clone();
        let thread = {
            let (stop, sent, failures): (_, _, Arc<Mutex<Vec<String>>>) =
                (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failures));
            thread::spawn(move || {
                let request = request("GET", "/v1/orders", &[("x-api-key", &raw)]);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let addr = addrs[i % addrs.len()];
                    match try_send_to(addr, &request) {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failures.lock().unwrap().push(format!("{addr}: {} {}", r.status, r.text())),
                        Err(e) => failures.lock().unwrap().push(format!("{addr}: {e}")),
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Background { stop, sent, failures, thread: Some(thread) }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the background load panicked");
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.sent.load(Ordering::Relaxed), failures)
    }
}

#[test]
fn engine_down_mid_load_fails_no_request_and_limits_hold_locally_until_it_is_back() {
    let mut redis = OwnRedis::start();
    let up = Upstream::start("api");
    let limited = TestKey::new(&unique_id("fleet_down"));
    let busy = TestKey::new(&unique_id("fleet_busy"));
    let keys = keys_file(&[
        limited.entry("scopes: [orders:read]\nrate_limit: { requests: 10, per: 1h }"),
        busy.entry("scopes: [orders:read]\nrate_limit: { requests: 100000, per: 1s }"),
    ]);
    let config = fleet_config(&redis.url());
    let (a, b) = (start_gateway(&config, &up, &keys), start_gateway(&config, &up, &keys));
    for gw in [&a, &b] {
        wait_until(EVENTUALLY, "the gateway reaches Redis", || (syncs(gw, "ok") > 0.0).then_some(()));
        assert_eq!(fallback(gw), Some(0.0));
    }
    let load = Background::start(vec![a.addr, b.addr], &busy);

    // Engine up: 6 of the fleet's 10 through A, and the fleet knows.
    assert_eq!(alternate(&[&a], &limited, 6, Duration::ZERO), 6);
    thread::sleep(Duration::from_millis(400));

    redis.kill();
    let down_at = Instant::now();
    for gw in [&a, &b] {
        wait_until(EVENTUALLY, "fallback to local state", || (fallback(gw) == Some(1.0)).then_some(()));
    }
    // Away: each gateway enforces the full limit on its own state. A has spent 6 of
    // its 10; B took on the fleet's 6 only if it had drawn from the budget before, which
    // it had not, so it has 10 of its own.
    assert_eq!(alternate(&[&a], &limited, 12, Duration::ZERO), 4, "A while the engine is away");
    assert_eq!(alternate(&[&b], &limited, 12, Duration::ZERO), 10, "B while the engine is away");
    let away_for = down_at.elapsed();

    redis.run();
    for gw in [&a, &b] {
        wait_until(EVENTUALLY, "reconciling again", || (fallback(gw) == Some(0.0)).then_some(()));
        assert!(syncs(gw, "error") >= 1.0, "failed syncs are counted");
    }
    // Back: B reports what it spent and A takes on the fleet's TAT again, so both are spent.
    thread::sleep(Duration::from_millis(400));
    assert_eq!(alternate(&[&a, &b], &limited, 6, Duration::from_millis(20)), 0, "after the engine is back");

    let (sent, failures) = load.finish();
    assert!(sent > 50, "the background load sent only {sent} requests");
    assert!(failures.is_empty(), "requests failed while the engine was away ({away_for:?}): {failures:?}");
    for gw in [&a, &b] {
        let output = gw.output();
        assert_eq!(output.matches("fleet limits: the engine is away").count(), 1, "one line when it goes:\n{output}");
        assert_eq!(
            output.matches("fleet limits: reconciling with the fleet").count(),
            2,
            "one line at start, one when back:\n{output}"
        );
    }
}

#[test]
fn a_quota_holds_across_gateways() {
    let up = Upstream::start("api");
    let key = TestKey::new(&unique_id("fleet_quota"));
    // All requests in one UTC day.
    let into_day = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() % 86_400;
    if into_day > 86_400 - 10 {
        thread::sleep(Duration::from_secs(86_400 - into_day + 1));
    }
    let keys = keys_file(&[key.entry("scopes: [orders:read]\nquota: { requests: 8, per: day }")]);
    let config = fleet_config(SHARED_REDIS);
    let (a, b) = (start_gateway(&config, &up, &keys), start_gateway(&config, &up, &keys));
    let mut allowed = 0;
    for i in 0..24 {
        let r = call(if i % 2 == 0 { &a } else { &b }, &key);
        match r.status {
            200 => allowed += 1,
            _ => {
                assert_error(&r, 429, "quota_exceeded");
                assert!(r.header("retry-after").is_some(), "429 without Retry-After: {:?}", r.headers);
            }
        }
        thread::sleep(Duration::from_millis(40));
    }
    // Per process this would be 16.
    assert!((8..=11).contains(&allowed), "two gateways allowed {allowed} of a fleet quota of 8");
}

/// A gateway that stops delivers what it counted since its last round: the fleet's
/// quota counter holds every request it let through, none lost to the timing of
/// the last round before SIGTERM.
#[test]
fn a_stopping_gateway_delivers_the_quota_it_counted_since_its_last_round() {
    let up = Upstream::start("api");
    let key = TestKey::new(&unique_id("fleet_stop"));
    let keys = keys_file(&[key.entry("scopes: [orders:read]\nquota: { requests: 100000, per: day }")]);
    let config =
        simple_config(&format!("fleet_limits: {{ engine: redis, url: \"{SHARED_REDIS}\", sync_interval: 250ms }}\n"));
    let gw = start_gateway(&config, &up, &keys);
    let day = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() / 86_400;
    let mut allowed = 0;
    for _ in 0..20 {
        assert_eq!(call(&gw, &key).status, 200);
        allowed += 1;
    }
    let (exit, output) = gw.stop_with_status();
    assert!(exit.is_some_and(|s| s.success()), "the gateway did not stop cleanly:\n{output}");

    let client = redis::Client::open(SHARED_REDIS).expect("redis url");
    let mut redis = client.get_connection().expect("connect to redis");
    let counted: Option<u64> =
        redis::cmd("GET").arg(format!("keygate:fleet:quota:day:{day}:{}", key.id)).query(&mut redis).expect("GET");
    assert_eq!(counted, Some(allowed), "requests counted by the fleet of the {allowed} let through");
}
