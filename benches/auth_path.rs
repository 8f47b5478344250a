//! The auth path of one request, without the network: find the key in the
//! request, check its format, SHA-256 it, look it up, check address and scopes,
//! take from its rate limit and quota, and count its usage.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keygate::config::{KeyLocation, LimitScope, PlanConfig, QuotaConfig, QuotaPeriod, RateLimitConfig};
use keygate::index::{KeyRecord, Snapshot};
use keygate::key::{self, KeyDigest};
use keygate::limit::KeyStates;
use keygate::policy::{decide, Limits, PlanTable, RequestFacts};
use keygate::proxy::find_key;
use keygate::usage::RequestUsage;
use pingora::http::RequestHeader;
use time::OffsetDateTime;

const INDEX_SIZE: usize = 100_000;

fn locations() -> Vec<KeyLocation> {
    vec![
        KeyLocation::Header { name: http::header::AUTHORIZATION, scheme: Some("Bearer".into()) },
        KeyLocation::Header { name: http::HeaderName::from_static("x-api-key"), scheme: None },
        KeyLocation::Query { name: "api_key".into() },
    ]
}

fn request(key: &str) -> RequestHeader {
    let mut req = RequestHeader::build("GET", b"/v1/orders/42?page=2", None).expect("valid request");
    req.append_header("host", "api.example.com").expect("valid header");
    req.append_header("x-api-key", key).expect("valid header");
    req
}

fn plan(requests: u32, per: Duration) -> PlanConfig {
    PlanConfig {
        rate_limit: Some(RateLimitConfig { requests, per, burst: None, by: LimitScope::Key }),
        quota: Some(QuotaConfig { requests: u64::MAX >> 25, per: QuotaPeriod::Month, by: LimitScope::Key }),
    }
}

fn bench_auth(c: &mut Criterion) {
    let keys: Vec<String> = (0..INDEX_SIZE).map(|_| key::generate("kg_live").expect("valid prefix")).collect();
    let snapshot = Snapshot::build(
        1,
        keys.iter().enumerate().map(|(i, k)| {
            // Key 0 is on a plan it exhausts at once; every other key never reaches its limit.
            let plan = if i == 0 { "tiny" } else { "roomy" };
            let record = KeyRecord::builder(format!("key_{i}"))
                .plan(Some(plan.into()))
                .scopes(vec!["orders:*".into()])
                .ip_allowlist(vec!["10.0.0.0/8".parse().expect("cidr")])
                .build();
            (KeyDigest::of(k), record)
        }),
    )
    .expect("unique keys");
    let plans = PlanTable::new(
        [
            ("roomy".to_owned(), plan(u32::MAX, Duration::from_secs(1))),
            ("tiny".to_owned(), plan(1, Duration::from_secs(3600))),
        ],
        None,
    );
    let states = KeyStates::new();
    let limits = Limits { plans: &plans, states: &states };
    let locations = locations();
    let required = vec!["orders:read".to_owned()];
    let client: IpAddr = "10.1.2.3".parse().expect("ip");

    let run = |req: &RequestHeader| {
        let presented = find_key(req, &locations);
        let facts = RequestFacts { presented_key: presented.as_deref(), client_ip: client, required_scopes: &required };
        let decision = decide(&facts, &snapshot, &limits, OffsetDateTime::now_utc());
        if let (Some(key), Some(slot)) = (&decision.key, &decision.usage) {
            let request = RequestUsage { denial: decision.denial, status: 200, bytes_in: 0, bytes_out: 0, at_ms: 0 };
            slot.record(key.owner(), &request);
        }
        decision.denial.is_none()
    };

    let allowed = request(&keys[INDEX_SIZE / 2]);
    let unknown = request(&key::generate("kg_live").expect("valid prefix"));
    let mut tampered = keys[7].clone();
    tampered.replace_range(10..11, if &tampered[10..11] == "a" { "b" } else { "a" });
    let bad_checksum = request(&tampered);
    let rate_limited = request(&keys[0]);
    run(&rate_limited);

    let mut group = c.benchmark_group("auth_path");
    group.bench_function("allowed_key", |b| b.iter(|| assert!(run(black_box(&allowed)))));
    group.bench_function("unknown_key", |b| b.iter(|| assert!(!run(black_box(&unknown)))));
    group.bench_function("bad_checksum", |b| b.iter(|| assert!(!run(black_box(&bad_checksum)))));
    group.bench_function("rate_limited_key", |b| b.iter(|| assert!(!run(black_box(&rate_limited)))));
    group.bench_function("sha256_only", |b| b.iter(|| KeyDigest::of(black_box(&keys[3]))));
    group.bench_function("request_id", |b| b.iter(keygate::outcome::new_request_id));
    group.finish();
}

criterion_group!(benches, bench_auth);
criterion_main!(benches);
