//! Black-box tests of plans, rate limits, quotas, usage records and metrics
//! (CONTRACT §3 `plans` / `default_plan` / `usage`, §5 steps 8 and 10, §7, §8):
//! the real `keygate serve` in gateway mode with a keys file, over real sockets.
//!
//! One file because these share one setup (a gateway, its keys file and a usage
//! file) and check one thing: what a request costs and how it is counted.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use common::*;

/// A one-upstream config with three keyed routes: `orders` (/v1/orders,
/// orders:read), `reports` (/v1/reports, reports:read) and `health` (/healthz,
/// orders:read; the test upstream answers it 500 when switched unhealthy).
/// `extra` holds `plans`, `default_plan` and `usage`; `@UP@` is the upstream.
fn config(extra: &str) -> String {
    gateway_config(&format!(
        r#"upstreams:
  api: {{ targets: ["@UP@"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api, scopes: [orders:read] }}
  - {{ name: reports, match: {{ path_prefix: /v1/reports }}, upstream: api, scopes: [reports:read] }}
  - {{ name: health, match: {{ path_prefix: /healthz }}, upstream: api, scopes: [orders:read] }}
{extra}access_log: off
"#
    ))
}

/// A plan whose budget refills so slowly (one request per 720 s) that no
/// request in a test is ever let through by the refill.
const TINY_PLAN: &str = "plans:\n  tiny: { rate_limit: { requests: 5, per: 1h } }\n";

fn start(up: &Upstream, extra: &str, keys: &[String]) -> Gateway {
    GatewayBuilder::new(&config(extra)).var("UP", &up.addr()).keys(&keys_file(keys)).start()
}

/// One GET with the key in `x-api-key`, on a fresh connection.
fn call(gw: &Gateway, key: &TestKey, target: &str) -> Response {
    gw.get(target, &[("x-api-key", &key.raw)])
}

// ---------------------------------------------------------------------------
// Header helpers
// ---------------------------------------------------------------------------

#[track_caller]
fn header_u64(resp: &Response, name: &str) -> u64 {
    let v = resp.header(name).unwrap_or_else(|| panic!("{} response lacks {name}: {:?}", resp.status, resp.headers));
    v.parse().unwrap_or_else(|_| panic!("{name} is not a whole number of seconds/requests: {v:?}"))
}

/// (`RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`), all required.
#[track_caller]
fn rate_headers(resp: &Response) -> (u64, u64, u64) {
    (header_u64(resp, "ratelimit-limit"), header_u64(resp, "ratelimit-remaining"), header_u64(resp, "ratelimit-reset"))
}

#[track_caller]
fn assert_no_rate_headers(resp: &Response) {
    for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert!(
            resp.header(name).is_none(),
            "response for a key without a rate limit carries {name}: {:?}",
            resp.headers
        );
    }
}

/// Asserts a 429 `rate_limited` with Retry-After and the RateLimit-* headers
/// (Remaining 0); returns (Retry-After, RateLimit-Reset).
#[track_caller]
fn assert_rate_limited(resp: &Response, limit: u64) -> (u64, u64) {
    assert_error(resp, 429, "rate_limited");
    assert!(resp.header("x-request-id").is_some(), "429 to a keyed request lacks X-Request-Id");
    let retry_after = header_u64(resp, "retry-after");
    assert!(retry_after >= 1, "Retry-After must be at least 1, got {retry_after}");
    let (l, remaining, reset) = rate_headers(resp);
    assert_eq!((l, remaining), (limit, 0), "RateLimit-Limit/Remaining on a 429");
    (retry_after, reset)
}

// ---------------------------------------------------------------------------
// UTC calendar (quota windows)
// ---------------------------------------------------------------------------

/// Seconds from now to the next UTC midnight, by the system clock.
fn secs_to_next_utc_day() -> f64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    86_400.0 - now % 86_400.0
}

/// Seconds from now to 00:00 UTC on the first of next month.
fn secs_to_next_utc_month() -> f64 {
    let now = time::OffsetDateTime::now_utc();
    let (year, month) = match now.month() {
        time::Month::December => (now.year() + 1, time::Month::January),
        m => (now.year(), m.next()),
    };
    let next = time::Date::from_calendar_date(year, month, 1).unwrap().midnight().assume_utc();
    (next - now).as_seconds_f64()
}

/// If a quota window ends within a few seconds, waits until it has begun
/// anew, so a test's requests all fall in one window.
fn avoid_window_boundary(secs_to_boundary: fn() -> f64) {
    let left = secs_to_boundary();
    if left < 10.0 {
        thread::sleep(Duration::from_secs_f64(left + 1.0));
    }
}

/// Asserts a 429 `quota_exceeded` whose Retry-After is the time to the next
/// window, as measured just before (`before`) and after the request.
#[track_caller]
fn assert_quota_exceeded(resp: &Response, before: f64, secs_to_boundary: fn() -> f64) -> u64 {
    let after = secs_to_boundary();
    assert_error(resp, 429, "quota_exceeded");
    let retry_after = header_u64(resp, "retry-after");
    assert!(retry_after >= 1, "Retry-After must be at least 1, got {retry_after}");
    assert!(
        (retry_after as f64) >= after.floor() - 2.0 && (retry_after as f64) <= before.ceil() + 2.0,
        "quota Retry-After {retry_after} is not the time to the next window ({after:.1}..{before:.1} s)"
    );
    retry_after
}

// ---------------------------------------------------------------------------
// Admin endpoints
// ---------------------------------------------------------------------------

#[test]
fn admin_serves_healthz_readyz_and_metrics_in_gateway_mode() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let gw = start(&up, "", &[alice.entry("scopes: [orders:read]")]);

    let health = gw.admin_get("/healthz");
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json(), serde_json::json!({"status": "ok"}));

    // Keys are loaded before the listener opens, but allow for it to settle.
    wait_until(EVENTUALLY, "/readyz to answer 200 once the keys file is loaded", || {
        (gw.admin_get("/readyz").status == 200).then_some(())
    });

    let metrics = gw.admin_get("/metrics");
    assert_eq!(metrics.status, 200, "{}", metrics.text());
    let ct = metrics.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "/metrics content-type {ct:?}, want Prometheus text/plain");
    let exposition = parse_prometheus(&metrics.text()).unwrap_or_else(|e| panic!("{e}\n{}", metrics.text()));
    assert_eq!(exposition.value("keygate_keys_loaded", &[]), Some(1.0));

    // The admin port is not the proxy: a keyed request there is not proxied.
    let r = get(gw.admin_addr(), "/v1/orders", &[("x-api-key", &alice.raw)]);
    assert_ne!(r.status, 200, "the admin listener proxied a request");
    assert_eq!(up.request_count(), 0);
}

// ---------------------------------------------------------------------------
// Rate limits (CONTRACT §5 steps 8 and 10)
// ---------------------------------------------------------------------------

#[test]
fn rate_limit_lets_the_burst_through_then_429_rate_limited() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let gw = start(&up, TINY_PLAN, &[alice.entry("scopes: [orders:read]\nplan: tiny")]);

    for (used, want_remaining) in [(1u64, 4u64), (2, 3), (3, 2), (4, 1), (5, 0)] {
        let r = call(&gw, &alice, "/v1/orders");
        assert_proxied(&r);
        let (limit, remaining, reset) = rate_headers(&r);
        assert_eq!((limit, remaining), (5, want_remaining), "RateLimit-Limit/Remaining after {used} requests");
        // Each request used costs 720 s of refill (5 per hour); a minute of slack
        // for the time the test itself takes.
        assert!(
            reset <= 720 * used && reset + 60 >= 720 * used,
            "RateLimit-Reset {reset} after {used} requests, want about {} s",
            720 * used
        );
    }

    let (retry_after, reset) = assert_rate_limited(&call(&gw, &alice, "/v1/orders"), 5);
    // The next request is due one refill interval (720 s) after the burst.
    assert!((660..=720).contains(&retry_after), "Retry-After {retry_after}, want about 720");
    assert!((3540..=3600).contains(&reset), "RateLimit-Reset {reset} on the 429, want about 3600");
    assert_rate_limited(&call(&gw, &alice, "/v1/orders"), 5);
    assert_eq!(up.request_count(), 5, "a rate-limited request reached the upstream");
}

#[test]
fn burst_sets_ratelimit_limit_and_the_refill_sets_retry_after() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let plans = "plans:\n  bursty: { rate_limit: { requests: 1, per: 1h, burst: 3 } }\n";
    let gw = start(&up, plans, &[alice.entry("scopes: [orders:read]\nplan: bursty")]);

    for want_remaining in [2, 1, 0] {
        let r = call(&gw, &alice, "/v1/orders");
        assert_proxied(&r);
        let (limit, remaining, _) = rate_headers(&r);
        assert_eq!((limit, remaining), (3, want_remaining));
    }
    let (retry_after, _) = assert_rate_limited(&call(&gw, &alice, "/v1/orders"), 3);
    assert!((3540..=3600).contains(&retry_after), "Retry-After {retry_after}, want about 3600 (1 per hour)");
    assert_eq!(up.request_count(), 3);
}

#[test]
fn default_plan_applies_to_keys_without_a_plan() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let bob = TestKey::new("key_bob");
    let extra = "plans:
  tiny: { rate_limit: { requests: 5, per: 1h } }
  roomy: { rate_limit: { requests: 100, per: 1h } }
default_plan: tiny
";
    let gw =
        start(&up, extra, &[alice.entry("scopes: [orders:read]"), bob.entry("scopes: [orders:read]\nplan: roomy")]);

    for want_remaining in [4, 3, 2, 1, 0] {
        let (limit, remaining, _) = rate_headers(&call(&gw, &alice, "/v1/orders"));
        assert_eq!((limit, remaining), (5, want_remaining), "alice has no plan, so default_plan tiny applies");
    }
    assert_rate_limited(&call(&gw, &alice, "/v1/orders"), 5);

    let r = call(&gw, &bob, "/v1/orders");
    assert_proxied(&r);
    assert_eq!(rate_headers(&r).0, 100, "bob's own plan wins over default_plan");
}

#[test]
fn keys_without_any_rate_limit_get_no_ratelimit_headers() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let metered = TestKey::new("key_metered");
    let extra = "plans:\n  metered: { quota: { requests: 1000, per: day } }\n";
    let gw = start(
        &up,
        extra,
        &[alice.entry("scopes: [orders:read]"), metered.entry("scopes: [orders:read]\nplan: metered")],
    );

    // Far more than any default budget: nothing limits these keys.
    for _ in 0..30 {
        for key in [&alice, &metered] {
            let r = call(&gw, key, "/v1/orders");
            assert_proxied(&r);
            assert_no_rate_headers(&r);
            assert!(r.header("x-request-id").is_some(), "keyed response without X-Request-Id");
        }
    }
    assert_eq!(up.request_count(), 60);
}

#[test]
fn key_limits_override_their_plan_field_by_field() {
    let up = Upstream::start("api");
    let plain = TestKey::new("key_plain");
    let own_rate = TestKey::new("key_own_rate");
    let roomy_rate = TestKey::new("key_roomy_rate");
    let own_quota = TestKey::new("key_own_quota");
    let extra = "plans:
  mixed: { rate_limit: { requests: 5, per: 1h }, quota: { requests: 4, per: day } }
default_plan: mixed
";
    avoid_window_boundary(secs_to_next_utc_day);
    let gw = start(
        &up,
        extra,
        &[
            plain.entry("scopes: [orders:read]"),
            own_rate.entry("scopes: [orders:read]\nrate_limit: { requests: 2, per: 1h }"),
            roomy_rate.entry("scopes: [orders:read]\nplan: mixed\nrate_limit: { requests: 100, per: 1h }"),
            own_quota.entry("scopes: [orders:read]\nquota: { requests: 1, per: day }"),
        ],
    );

    // The plan alone: rate 5/h, quota 4/day; the quota runs out first.
    for want_remaining in [4, 3, 2, 1] {
        let r = call(&gw, &plain, "/v1/orders");
        assert_proxied(&r);
        assert_eq!(rate_headers(&r).0, 5);
        assert_eq!(rate_headers(&r).1, want_remaining);
    }
    let before = secs_to_next_utc_day();
    assert_quota_exceeded(&call(&gw, &plain, "/v1/orders"), before, secs_to_next_utc_day);

    // Own rate limit replaces the plan's.
    for want_remaining in [1, 0] {
        let r = call(&gw, &own_rate, "/v1/orders");
        assert_proxied(&r);
        assert_eq!((rate_headers(&r).0, rate_headers(&r).1), (2, want_remaining));
    }
    assert_rate_limited(&call(&gw, &own_rate, "/v1/orders"), 2);

    // Own rate limit, and the plan's quota still applies.
    for _ in 0..4 {
        let r = call(&gw, &roomy_rate, "/v1/orders");
        assert_proxied(&r);
        assert_eq!(rate_headers(&r).0, 100);
    }
    let before = secs_to_next_utc_day();
    assert_quota_exceeded(&call(&gw, &roomy_rate, "/v1/orders"), before, secs_to_next_utc_day);

    // Own quota replaces the plan's, and the plan's rate limit still applies.
    let r = call(&gw, &own_quota, "/v1/orders");
    assert_proxied(&r);
    assert_eq!(rate_headers(&r).0, 5);
    let before = secs_to_next_utc_day();
    assert_quota_exceeded(&call(&gw, &own_quota, "/v1/orders"), before, secs_to_next_utc_day);

    assert_eq!(up.request_count(), 4 + 2 + 4 + 1);
}

#[test]
fn separate_keys_have_separate_rate_budgets() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let bob = TestKey::new("key_bob");
    let gw = start(
        &up,
        TINY_PLAN,
        &[alice.entry("scopes: [orders:read]\nplan: tiny"), bob.entry("scopes: [orders:read]\nplan: tiny")],
    );

    for _ in 0..5 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    assert_rate_limited(&call(&gw, &alice, "/v1/orders"), 5);

    // Alice's exhausted budget is hers alone.
    for want_remaining in [4, 3, 2, 1, 0] {
        let r = call(&gw, &bob, "/v1/orders");
        assert_proxied(&r);
        assert_eq!(rate_headers(&r).1, want_remaining, "bob's budget was touched by alice's requests");
    }
    assert_rate_limited(&call(&gw, &bob, "/v1/orders"), 5);
    assert_rate_limited(&call(&gw, &alice, "/v1/orders"), 5);
    assert_eq!(up.request_count(), 10);
}

#[test]
fn requests_refused_before_the_rate_limit_do_not_spend_it() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let gw = start(&up, TINY_PLAN, &[alice.entry("scopes: [reports:read]\nplan: tiny")]);

    // Step 7 refuses these before step 8 is reached.
    for _ in 0..10 {
        assert_error(&call(&gw, &alice, "/v1/orders"), 403, "insufficient_scope");
    }
    for want_remaining in [4, 3, 2, 1, 0] {
        let r = call(&gw, &alice, "/v1/reports");
        assert_proxied(&r);
        assert_eq!(rate_headers(&r).1, want_remaining, "scope refusals spent rate limit");
    }
    assert_rate_limited(&call(&gw, &alice, "/v1/reports"), 5);
    assert_eq!(up.request_count(), 5);
}

// ---------------------------------------------------------------------------
// Quotas (CONTRACT §5 step 8)
// ---------------------------------------------------------------------------

#[test]
fn daily_quota_is_429_quota_exceeded_until_the_next_utc_midnight() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    avoid_window_boundary(secs_to_next_utc_day);
    let gw = start(
        &up,
        "",
        &[alice
            .entry("scopes: [orders:read]\nrate_limit: { requests: 1000, per: 1s }\nquota: { requests: 3, per: day }")],
    );

    for _ in 0..3 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    for _ in 0..2 {
        let before = secs_to_next_utc_day();
        let r = call(&gw, &alice, "/v1/orders");
        let retry_after = assert_quota_exceeded(&r, before, secs_to_next_utc_day);
        assert!(retry_after <= 86_400, "daily quota Retry-After {retry_after} is more than a day");
        assert!(r.header("x-request-id").is_some(), "429 to a keyed request lacks X-Request-Id");
        // A rate limit applies to this key, so its 429 carries the headers too.
        assert_eq!(rate_headers(&r).0, 1000, "quota 429 for a rate-limited key lacks RateLimit-Limit");
    }
    assert_eq!(up.request_count(), 3);
}

#[test]
fn monthly_quota_retry_after_runs_to_the_first_of_next_month() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    avoid_window_boundary(secs_to_next_utc_month);
    let plans = "plans:\n  monthly: { quota: { requests: 2, per: month } }\n";
    let gw = start(&up, plans, &[alice.entry("scopes: [orders:read]\nplan: monthly")]);

    for _ in 0..2 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    let before = secs_to_next_utc_month();
    let retry_after = assert_quota_exceeded(&call(&gw, &alice, "/v1/orders"), before, secs_to_next_utc_month);
    assert!(retry_after <= 31 * 86_400, "monthly Retry-After {retry_after} is more than a month");
    assert_eq!(up.request_count(), 2);
}

#[test]
fn rate_limited_and_refused_requests_do_not_consume_quota() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    avoid_window_boundary(secs_to_next_utc_day);
    // Two requests a second in bursts of two, five a day.
    let gw = start(
        &up,
        "",
        &[alice
            .entry("scopes: [reports:read]\nrate_limit: { requests: 2, per: 1s }\nquota: { requests: 5, per: day }")],
    );

    for _ in 0..10 {
        assert_error(&call(&gw, &alice, "/v1/orders"), 403, "insufficient_scope");
    }

    // Keep asking until the quota says no; count what was let through and
    // what the rate limit refused on the way.
    let mut conn = gw.conn();
    let raw = request("GET", "/v1/reports", &[("x-api-key", &alice.raw)]);
    let (mut allowed, mut rate_limited) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "quota never ran out: {allowed} allowed, {rate_limited} rate-limited");
        let r = conn.send(&raw);
        match r.status {
            200 => allowed += 1,
            429 if r.json()["error"]["code"] == "rate_limited" => {
                rate_limited += 1;
                thread::sleep(Duration::from_millis(20));
            }
            429 => {
                assert_error(&r, 429, "quota_exceeded");
                break;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert!(rate_limited > 0, "the rate limit never refused a request, so this test proved nothing");
    assert_eq!(allowed, 5, "the quota of 5 ran out after {allowed} allowed and {rate_limited} rate-limited requests");
    assert_eq!(up.request_count(), 5);
}

// ---------------------------------------------------------------------------
// Usage file sink (CONTRACT §3 `usage`, §8)
// ---------------------------------------------------------------------------

/// A `usage:` block with one file sink at `path`.
fn usage_block(flush_interval: &str, path: &Path) -> String {
    format!("usage:\n  flush_interval: {flush_interval}\n  sinks: [ {{ type: file, path: \"{}\" }} ]\n", path.display())
}

/// One key's usage summed over lines (or expected).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Totals {
    requests: u64,
    allowed: u64,
    /// Codes with a non-zero count.
    denied: BTreeMap<String, u64>,
    /// Status classes with a non-zero count.
    status: BTreeMap<String, u64>,
}

impl Totals {
    fn allowed(mut self, n: u64, class: &str) -> Self {
        self.requests += n;
        self.allowed += n;
        *self.status.entry(class.to_string()).or_default() += n;
        self
    }

    fn denied(mut self, code: &str, n: u64, class: &str) -> Self {
        self.requests += n;
        *self.denied.entry(code.to_string()).or_default() += n;
        *self.status.entry(class.to_string()).or_default() += n;
        self
    }
}

/// What the file holds, per key id, plus bytes_out per key and the number of lines.
#[derive(Debug, Default)]
struct UsageFile {
    totals: BTreeMap<String, Totals>,
    bytes_out: BTreeMap<String, u64>,
    lines: usize,
}

fn field_u64(line: &Value, field: &str) -> u64 {
    line[field].as_u64().unwrap_or_else(|| panic!("usage line field {field} is not a count: {line}"))
}

/// Reads every complete line of the usage file (a missing file is empty),
/// checking each against CONTRACT §8, and sums them per key.
fn read_usage(path: &Path) -> UsageFile {
    let text = fs::read_to_string(path).unwrap_or_default();
    // A line still being appended has no newline yet; leave it for the next read.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut file = UsageFile::default();
    for raw in complete.lines().filter(|l| !l.trim().is_empty()) {
        let line: Value = serde_json::from_str(raw).unwrap_or_else(|e| panic!("usage line is not JSON ({e}): {raw:?}"));
        assert_eq!(line["node"], "test-gw", "usage line node is not the config's node_id: {line}");
        let key_id = line["key_id"].as_str().unwrap_or_else(|| panic!("usage line without key_id: {line}"));
        for field in ["window_start", "window_end", "last_used_at"] {
            let t = line[field].as_str().unwrap_or_else(|| panic!("usage line {field} is not a string: {line}"));
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("usage line {field} {t:?} is not RFC 3339 ({e}): {line}"));
        }
        let (start, end) = (line["window_start"].as_str().unwrap(), line["window_end"].as_str().unwrap());
        let parse = |t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap();
        assert!(parse(start) <= parse(end), "usage window ends before it starts: {line}");

        let requests = field_u64(&line, "requests");
        let allowed = field_u64(&line, "allowed");
        let denied = line["denied"].as_object().unwrap_or_else(|| panic!("usage line denied is not an object: {line}"));
        let status = line["status"].as_object().unwrap_or_else(|| panic!("usage line status is not an object: {line}"));
        assert_eq!(
            status.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            BTreeSet::from(["2xx", "3xx", "4xx", "5xx"]),
            "usage line status classes: {line}"
        );
        field_u64(&line, "bytes_in");
        let bytes_out = field_u64(&line, "bytes_out");
        assert!(requests > 0, "usage line for a window without activity: {line}");

        let t = file.totals.entry(key_id.to_string()).or_default();
        t.requests += requests;
        t.allowed += allowed;
        let mut denied_sum = 0;
        for (code, n) in denied {
            let n = n.as_u64().unwrap_or_else(|| panic!("denied count for {code} is not a count: {line}"));
            assert!(n > 0, "usage line lists a denial code that did not occur: {line}");
            denied_sum += n;
            *t.denied.entry(code.clone()).or_default() += n;
        }
        let mut status_sum = 0;
        for (class, n) in status {
            let n = n.as_u64().unwrap_or_else(|| panic!("status count for {class} is not a count: {line}"));
            status_sum += n;
            if n > 0 {
                *t.status.entry(class.clone()).or_default() += n;
            }
        }
        assert_eq!(requests, allowed + denied_sum, "requests != allowed + denied in usage line {line}");
        assert_eq!(requests, status_sum, "requests != sum of status classes in usage line {line}");
        *file.bytes_out.entry(key_id.to_string()).or_default() += bytes_out;
        file.lines += 1;
    }
    file
}

/// Panics if the file counts a key not in `expected` or more of anything than expected.
#[track_caller]
fn assert_no_overcount(file: &UsageFile, expected: &BTreeMap<String, Totals>) {
    for (key, got) in &file.totals {
        let want = expected.get(key).unwrap_or_else(|| panic!("usage counted a key it must not: {key}: {got:?}"));
        let over = got.requests > want.requests
            || got.allowed > want.allowed
            || got.denied.iter().any(|(c, n)| *n > want.denied.get(c).copied().unwrap_or(0))
            || got.status.iter().any(|(c, n)| *n > want.status.get(c).copied().unwrap_or(0));
        assert!(!over, "usage for {key} counts more than was sent (double count?):\n got  {got:?}\n want {want:?}");
    }
}

/// Polls the usage file until its sums equal `expected` exactly; fails at once
/// on any overcount.
#[track_caller]
fn wait_for_usage(path: &Path, expected: &BTreeMap<String, Totals>, timeout: Duration) -> UsageFile {
    let deadline = Instant::now() + timeout;
    loop {
        let file = read_usage(path);
        assert_no_overcount(&file, expected);
        if file.totals == *expected {
            return file;
        }
        if Instant::now() >= deadline {
            panic!(
                "usage file {} never summed to the requests sent within {timeout:?}\n got  {:#?}\n want {expected:#?}",
                path.display(),
                file.totals
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Proving that nothing more arrives needs a window: keeps checking the sums
/// for `d` (several flush intervals).
#[track_caller]
fn assert_usage_stays(path: &Path, expected: &BTreeMap<String, Totals>, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        let file = read_usage(path);
        assert_eq!(file.totals, *expected, "usage file changed after it held every request");
        thread::sleep(Duration::from_millis(200));
    }
}

fn expect(entries: &[(&TestKey, Totals)]) -> BTreeMap<String, Totals> {
    entries.iter().map(|(k, t)| (k.id.clone(), t.clone())).collect()
}

/// A directory outside the gateway's own temp dir, for the usage file.
fn sink_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("sink");
    fs::create_dir(&dir).unwrap();
    (tmp, dir)
}

#[test]
fn usage_file_sums_exactly_per_key_code_and_status_class() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let bob = TestKey::new("key_bob");
    let (_tmp, dir) = sink_dir();
    let path = dir.join("usage.jsonl");
    avoid_window_boundary(secs_to_next_utc_day);
    let gw = start(
        &up,
        &usage_block("1s", &path),
        &[
            alice.entry("scopes: [orders:read]\nrate_limit: { requests: 3, per: 1h }"),
            bob.entry("scopes: [orders:read]\nquota: { requests: 2, per: day }"),
        ],
    );
    let (unknown, _) = gen_key(None);

    // First window(s): a 500 from the upstream for alice, two 200s for bob.
    up.set_healthy(false);
    assert_eq!(call(&gw, &alice, "/healthz").status, 500);
    up.set_healthy(true);
    assert_proxied(&call(&gw, &bob, "/v1/orders"));
    assert_proxied(&call(&gw, &bob, "/v1/orders"));
    let first = expect(&[(&alice, Totals::default().allowed(1, "5xx")), (&bob, Totals::default().allowed(2, "2xx"))]);
    wait_for_usage(&path, &first, EVENTUALLY);

    // Later window(s): the rest, mixed with requests that name no known key.
    for _ in 0..2 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    for _ in 0..2 {
        assert_rate_limited(&call(&gw, &alice, "/v1/orders"), 3);
    }
    for _ in 0..2 {
        assert_error(&call(&gw, &alice, "/v1/reports"), 403, "insufficient_scope");
    }
    for _ in 0..3 {
        assert_error(&call(&gw, &bob, "/v1/orders"), 429, "quota_exceeded");
    }
    assert_error(&call(&gw, &bob, "/v1/reports"), 403, "insufficient_scope");
    assert_error(&gw.get("/v1/orders", &[("x-api-key", &unknown)]), 401, "invalid_key");
    assert_error(&gw.get("/v1/orders", &[("x-api-key", &with_bad_checksum(&alice.raw))]), 401, "invalid_key");
    assert_error(&gw.get("/v1/orders", &[]), 401, "missing_key");

    let all = expect(&[
        (
            &alice,
            Totals::default().allowed(1, "5xx").allowed(2, "2xx").denied("rate_limited", 2, "4xx").denied(
                "insufficient_scope",
                2,
                "4xx",
            ),
        ),
        (
            &bob,
            Totals::default().allowed(2, "2xx").denied("quota_exceeded", 3, "4xx").denied(
                "insufficient_scope",
                1,
                "4xx",
            ),
        ),
    ]);
    let file = wait_for_usage(&path, &all, EVENTUALLY);
    // At least one line per key for each phase, as the first phase was flushed before the second began.
    assert!(file.lines >= 4, "the two phases were not written as separate windows: {} lines", file.lines);
    assert!(
        file.bytes_out.values().all(|&b| b > 0),
        "bytes_out is zero for a key with responses: {:?}",
        file.bytes_out
    );
    assert_usage_stays(&path, &all, Duration::from_millis(2500));
}

#[test]
fn usage_counts_every_denial_of_a_known_key_and_no_unknown_keys() {
    let up = Upstream::start("api");
    let ok = TestKey::new("key_ok");
    let revoked = TestKey::new("key_revoked");
    let expired = TestKey::new("key_expired");
    let disabled = TestKey::new("key_disabled");
    let elsewhere = TestKey::new("key_elsewhere");
    let (_tmp, dir) = sink_dir();
    let path = dir.join("usage.jsonl");
    let gw = start(
        &up,
        &usage_block("1s", &path),
        &[
            ok.entry("scopes: [orders:read]"),
            revoked.entry("scopes: [orders:read]\nstatus: revoked"),
            expired.entry("scopes: [orders:read]\nexpires_at: \"2001-01-01T00:00:00Z\""),
            disabled.entry("scopes: [orders:read]\nstatus: disabled"),
            elsewhere.entry("scopes: [orders:read]\nip_allowlist: [\"10.0.0.0/8\"]"),
        ],
    );
    let (unknown, _) = gen_key(None);

    assert_proxied(&call(&gw, &ok, "/v1/orders"));
    for _ in 0..2 {
        assert_error(&call(&gw, &revoked, "/v1/orders"), 401, "key_revoked");
        assert_error(&call(&gw, &expired, "/v1/orders"), 401, "key_expired");
        assert_error(&call(&gw, &disabled, "/v1/orders"), 403, "key_disabled");
        assert_error(&call(&gw, &elsewhere, "/v1/orders"), 403, "ip_not_allowed");
        assert_error(&gw.get("/v1/orders", &[("x-api-key", &unknown)]), 401, "invalid_key");
        assert_error(&gw.get("/v1/orders", &[("x-api-key", "kg_live_garbage")]), 401, "invalid_key");
        assert_error(&gw.get("/v1/orders", &[]), 401, "missing_key");
    }

    let all = expect(&[
        (&ok, Totals::default().allowed(1, "2xx")),
        (&revoked, Totals::default().denied("key_revoked", 2, "4xx")),
        (&expired, Totals::default().denied("key_expired", 2, "4xx")),
        (&disabled, Totals::default().denied("key_disabled", 2, "4xx")),
        (&elsewhere, Totals::default().denied("ip_not_allowed", 2, "4xx")),
    ]);
    wait_for_usage(&path, &all, EVENTUALLY);
    assert_usage_stays(&path, &all, Duration::from_millis(2500));
    let text = fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&unknown) && !text.contains(&ok.raw), "a raw key appears in the usage file:\n{text}");
}

#[test]
fn usage_sink_outage_loses_nothing_and_counts_nothing_twice() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let bob = TestKey::new("key_bob");
    let (tmp, dir) = sink_dir();
    let away = tmp.path().join("sink-away");
    let path = dir.join("usage.jsonl");
    let gw = start(
        &up,
        &usage_block("1s", &path),
        &[alice.entry("scopes: [orders:read]"), bob.entry("scopes: [reports:read]")],
    );
    let flush_errors =
        || metrics(&gw).value("keygate_usage_flush_total", &[("result", "error"), ("sink", "file")]).unwrap_or(0.0);

    // Before: the sink works.
    for _ in 0..3 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    wait_for_usage(&path, &expect(&[(&alice, Totals::default().allowed(3, "2xx"))]), EVENTUALLY);
    assert_eq!(flush_errors(), 0.0, "flush errors while the sink was fine");

    // Outage: the sink's directory is gone (the tests run as root, so chmod would not stop writes).
    fs::rename(&dir, &away).unwrap();
    for _ in 0..4 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    assert_error(&call(&gw, &bob, "/v1/orders"), 403, "insufficient_scope");
    wait_until(EVENTUALLY, "keygate_usage_flush_total{result=\"error\",sink=\"file\"} >= 1", || {
        (flush_errors() >= 1.0).then_some(())
    });
    for _ in 0..5 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    for _ in 0..2 {
        assert_proxied(&call(&gw, &bob, "/v1/reports"));
    }
    assert!(!dir.exists(), "something recreated the sink directory during the outage");

    // Recovery: everything arrives in the restored file, once.
    fs::rename(&away, &dir).unwrap();
    let all = expect(&[
        (&alice, Totals::default().allowed(12, "2xx")),
        (&bob, Totals::default().allowed(2, "2xx").denied("insufficient_scope", 1, "4xx")),
    ]);
    // Retries back off after failures, so allow a while.
    wait_for_usage(&path, &all, Duration::from_secs(40));
    assert_usage_stays(&path, &all, Duration::from_millis(2500));
}

#[test]
fn sigterm_flushes_all_usage_and_exits_zero() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let bob = TestKey::new("key_bob");
    let (_tmp, dir) = sink_dir();
    let path = dir.join("usage.jsonl");
    // An hour-long window: only the shutdown flush can write these requests.
    let gw = start(
        &up,
        &usage_block("1h", &path),
        &[alice.entry("scopes: [orders:read]"), bob.entry("scopes: [reports:read]")],
    );

    for _ in 0..7 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    for _ in 0..3 {
        assert_error(&call(&gw, &bob, "/v1/orders"), 403, "insufficient_scope");
    }
    assert!(read_usage(&path).totals.is_empty(), "usage was written before the shutdown flush");

    let (status, output) = gw.stop_with_status();
    let status = status.unwrap_or_else(|| panic!("keygate did not exit within 10 s of SIGTERM\n{output}"));
    assert!(status.success(), "keygate exited with {status} after SIGTERM\n{output}");

    let all = expect(&[
        (&alice, Totals::default().allowed(7, "2xx")),
        (&bob, Totals::default().denied("insufficient_scope", 3, "4xx")),
    ]);
    let file = read_usage(&path);
    assert_eq!(file.totals, all, "usage file after SIGTERM\n{output}");
}

// ---------------------------------------------------------------------------
// Prometheus text exposition: a small parser
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Exposition {
    /// Family name to its `# TYPE`.
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The sample with exactly these labels (order does not matter).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.iter().find(|s| s.name == name && s.labels == want).map(|s| s.value)
    }

    /// The sum over every sample of `name`.
    fn total(&self, name: &str) -> f64 {
        self.samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `{a="x",b="y\"z"}` (the braces included); returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or_else(|| format!("label without '=' in {s:?}"))?;
        let name = rest[..eq].trim();
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?} in {s:?}"));
        }
        let mut chars = rest[eq + 1..].trim_start().char_indices();
        let body = rest[eq + 1..].trim_start();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label value not quoted in {s:?}"));
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape \\{other:?} in {s:?}")),
                },
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("unterminated label value in {s:?}"))?;
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated in {s:?}"));
        }
        rest = body[end..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' after a label in {s:?}"));
        }
    }
}

/// The `# TYPE` family a sample name belongs to, if any.
fn family_of<'a>(types: &HashMap<String, String>, name: &'a str) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            match types.get(base).map(String::as_str) {
                Some("histogram") => return Some(base),
                Some("summary") if suffix != "_bucket" => return Some(base),
                _ => {}
            }
        }
    }
    None
}

/// Lines are `# HELP name text`, `# TYPE name type`, other `#` comments, blank,
/// or `name{labels} value [timestamp]`; each sample's value is a float and its
/// family was declared with `# TYPE` before it; no series appears twice.
fn parse_prometheus(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut seen = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("HELP") => {
                    let name = parts.next().unwrap_or("");
                    if !is_metric_name(name) {
                        return Err(at(format!("HELP for a bad metric name {name:?}")));
                    }
                }
                Some("TYPE") => {
                    let name = parts.next().unwrap_or("");
                    let kind = parts.next().unwrap_or("").trim();
                    if !is_metric_name(name) {
                        return Err(at(format!("TYPE for a bad metric name {name:?}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown metric type {kind:?}")));
                    }
                    if out.types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = fields.next().ok_or_else(|| at("sample without a value".into()))?;
        let value: f64 = value.parse().map_err(|_| at(format!("value {value:?} is not a float")))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| at(format!("timestamp {ts:?} is not an integer")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields after the sample".into()));
        }
        let family = family_of(&out.types, name).ok_or_else(|| at(format!("{name} has no # TYPE before it")))?;
        if name.ends_with("_bucket") && out.types[family] == "histogram" && !labels.contains_key("le") {
            return Err(at("histogram bucket without le".into()));
        }
        if !seen.insert((name.to_string(), labels.clone())) {
            return Err(at("series appears twice".into()));
        }
        out.samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(out)
}

fn metrics_text(gw: &Gateway) -> String {
    let r = gw.admin_get("/metrics");
    assert_eq!(r.status, 200, "/metrics answered {}: {}", r.status, r.text());
    r.text()
}

fn metrics(gw: &Gateway) -> Exposition {
    let text = metrics_text(gw);
    parse_prometheus(&text).unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{text}"))
}

#[test]
fn prometheus_parser_used_here_rejects_malformed_text() {
    let good = "# HELP x_total X.\n# TYPE x_total counter\nx_total{b=\"2\",a=\"1\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n";
    let parsed = parse_prometheus(good).unwrap();
    assert_eq!(parsed.value("x_total", &[("a", "1"), ("b", "2")]), Some(3.0));
    assert_eq!(parsed.value("h_count", &[]), Some(1.0));
    for bad in [
        "x_total 1\n",                              // no TYPE
        "# TYPE x counter\nx one\n",                // value not a float
        "# TYPE x counter\nx{a=1} 1\n",             // unquoted label
        "# TYPE x counter\nx{a=\"1\"\n",            // unterminated labels
        "# TYPE x counter\nx 1\nx 2\n",             // series twice
        "# TYPE x gauge\n# TYPE x gauge\n",         // TYPE twice
        "# TYPE x countr\n",                        // unknown type
        "# TYPE x counter\nx_bucket{le=\"1\"} 1\n", // not a histogram
        "# TYPE h histogram\nh_bucket 1\n",         // bucket without le
        "# TYPE x counter\n9x 1\n",                 // bad name
    ] {
        assert!(parse_prometheus(bad).is_err(), "parser accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------
// Metrics (CONTRACT §7)
// ---------------------------------------------------------------------------

#[test]
fn metrics_count_requests_per_route_and_outcome_without_key_labels() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_metrics_alice");
    let bob = TestKey::new("key_metrics_bob");
    let carol = TestKey::new("key_metrics_carol");
    let gw = start(
        &up,
        TINY_PLAN,
        &[
            alice.entry("scopes: [orders:read]\nplan: tiny"),
            bob.entry("scopes: [orders:read]"),
            carol.entry("scopes: [orders:read]\nstatus: revoked"),
        ],
    );
    let (unknown, _) = gen_key(None);

    for _ in 0..5 {
        assert_proxied(&call(&gw, &alice, "/v1/orders"));
    }
    for _ in 0..2 {
        assert_rate_limited(&call(&gw, &alice, "/v1/orders"), 5);
    }
    for _ in 0..3 {
        assert_proxied(&call(&gw, &bob, "/v1/orders/1"));
    }
    assert_error(&call(&gw, &bob, "/v1/reports"), 403, "insufficient_scope");
    for _ in 0..4 {
        assert_error(&gw.get("/v1/orders", &[("x-api-key", &unknown)]), 401, "invalid_key");
    }
    assert_error(&call(&gw, &carol, "/v1/orders"), 401, "key_revoked");
    assert_error(&gw.get("/nowhere", &[]), 404, "no_route");
    assert_error(&call(&gw, &alice, "/nowhere"), 404, "no_route");
    let sent = 5 + 2 + 3 + 1 + 4 + 1 + 2;

    // Counting may finish just after the response: wait for all of it.
    let m = wait_until(EVENTUALLY, "keygate_requests_total to count every request sent", || {
        let m = metrics(&gw);
        (m.total("keygate_requests_total") == f64::from(sent)).then_some(m)
    });
    let text = metrics_text(&gw);
    for (family, kind) in [
        ("keygate_requests_total", "counter"),
        ("keygate_request_duration_seconds", "histogram"),
        ("keygate_upstream_responses_total", "counter"),
        ("keygate_keys_loaded", "gauge"),
    ] {
        assert_eq!(m.types.get(family).map(String::as_str), Some(kind), "# TYPE of {family}\n{text}");
    }
    let requests =
        |outcome: &str, route: &str| m.value("keygate_requests_total", &[("outcome", outcome), ("route", route)]);
    assert_eq!(requests("allowed", "orders"), Some(8.0), "{text}");
    assert_eq!(requests("rate_limited", "orders"), Some(2.0), "{text}");
    assert_eq!(requests("invalid_key", "orders"), Some(4.0), "{text}");
    assert_eq!(requests("key_revoked", "orders"), Some(1.0), "{text}");
    assert_eq!(requests("insufficient_scope", "reports"), Some(1.0), "{text}");
    assert_eq!(requests("no_route", "none"), Some(2.0), "{text}");

    let durations = |route: &str| m.value("keygate_request_duration_seconds_count", &[("route", route)]);
    assert_eq!(durations("orders"), Some(15.0), "{text}");
    assert_eq!(durations("reports"), Some(1.0), "{text}");
    assert_eq!(durations("none"), Some(2.0), "{text}");
    assert_eq!(
        m.value("keygate_request_duration_seconds_bucket", &[("le", "+Inf"), ("route", "orders")]),
        Some(15.0),
        "+Inf bucket differs from the count\n{text}"
    );

    assert_eq!(
        m.value("keygate_upstream_responses_total", &[("class", "2xx"), ("upstream", "api")]),
        Some(8.0),
        "{text}"
    );
    assert_eq!(up.request_count(), 8);
    assert_eq!(m.value("keygate_keys_loaded", &[]), Some(3.0), "{text}");

    // Exposition order puts labels alphabetically.
    assert!(text.contains(r#"keygate_requests_total{outcome="allowed",route="orders"} 8"#), "{text}");

    // No per-key labels, and never a secret.
    for key in [&alice, &bob, &carol] {
        assert!(!text.contains(&key.id), "metrics mention key id {}:\n{text}", key.id);
        assert!(!text.contains(&key.raw), "metrics contain a raw key:\n{text}");
    }
    assert!(!text.contains(&unknown), "metrics contain a raw (unknown) key:\n{text}");
    let ids: Vec<&str> = [&alice, &bob, &carol].iter().map(|k| k.id.as_str()).collect();
    for s in &m.samples {
        assert!(s.labels.values().all(|v| !ids.contains(&v.as_str()) && !v.starts_with("kg_")), "per-key label: {s:?}");
    }
}

// ---------------------------------------------------------------------------
// Budgets shared by owner (`by: owner`)
// ---------------------------------------------------------------------------

/// A keys-file entry like `TestKey::entry`, for `owner` instead of acme.
fn entry_of(key: &TestKey, owner: &str, fields: &str) -> String {
    key.entry(fields).replace("owner: acme", &format!("owner: {owner}"))
}

#[test]
fn keys_of_one_owner_share_one_rate_limit_and_other_owners_keep_theirs() {
    let up = Upstream::start("api");
    let (first, second, other) = (TestKey::new("key_acme_1"), TestKey::new("key_acme_2"), TestKey::new("key_bolt"));
    let plans = "plans:\n  team: { rate_limit: { requests: 4, per: 1h, by: owner } }\ndefault_plan: team\n";
    let gw = start(
        &up,
        plans,
        &[
            first.entry("scopes: [orders:read]"),
            // Its own limit, the same size, shared the same way: the keys file reads `by` too.
            second.entry("scopes: [orders:read]\nrate_limit: { requests: 4, per: 1h, by: owner }"),
            entry_of(&other, "bolt", "scopes: [orders:read]"),
        ],
    );

    // Alternating keys of acme spend one budget of 4.
    for (i, key) in [&first, &second, &first, &second].into_iter().enumerate() {
        let r = call(&gw, key, "/v1/orders");
        assert_proxied(&r);
        assert_eq!(rate_headers(&r).1, 3 - i as u64, "RateLimit-Remaining counts acme's shared budget");
    }
    for key in [&first, &second] {
        assert_rate_limited(&call(&gw, key, "/v1/orders"), 4);
    }
    // bolt's key is untouched by acme's traffic.
    for _ in 0..4 {
        assert_proxied(&call(&gw, &other, "/v1/orders"));
    }
    assert_rate_limited(&call(&gw, &other, "/v1/orders"), 4);
    assert_eq!(up.request_count(), 8);
}

#[test]
fn keys_of_one_owner_share_one_quota() {
    let up = Upstream::start("api");
    let (first, second, other) = (TestKey::new("key_acme_1"), TestKey::new("key_acme_2"), TestKey::new("key_bolt"));
    avoid_window_boundary(secs_to_next_utc_day);
    let plans = "plans:\n  team: { quota: { requests: 3, per: day, by: owner } }\ndefault_plan: team\n";
    let gw = start(
        &up,
        plans,
        &[
            first.entry("scopes: [orders:read]"),
            second.entry("scopes: [orders:read]"),
            entry_of(&other, "bolt", "scopes: [orders:read]"),
        ],
    );
    for key in [&first, &second, &first] {
        assert_proxied(&call(&gw, key, "/v1/orders"));
    }
    let before = secs_to_next_utc_day();
    assert_quota_exceeded(&call(&gw, &second, "/v1/orders"), before, secs_to_next_utc_day);
    assert_proxied(&call(&gw, &other, "/v1/orders"));
    assert_eq!(up.request_count(), 4);
}
