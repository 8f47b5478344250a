//! What a write shared by all threads costs on the request path, against the
//! per-thread form the proxy uses: every thread does the same step in a loop at once,
//! and the time per step is what each request would pay.
//!
//! - holding the gateway state for a request: one `Arc` whose count every thread
//!   writes, against `StateCell::hold`, a share per thread;
//! - looking at the stop notice while a connection waits for its next request: a
//!   `tokio::sync::Notify` waiter (a lock every connection shares, per poll), against
//!   `StopWatch`, a waker slot per connection;
//! - one key's part of a request (find it, decide, count its usage, take its identity
//!   headers) when every thread serves the same key, against a key per thread: what a
//!   single busy key costs on many cores.
//!
//! `cargo bench --bench shared_writes` (threads: the machine's cores, at least 2).

use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use keygate::config::{KeyLocation, LimitScope, PlanConfig, QuotaConfig, QuotaPeriod, RateLimitConfig};
use keygate::index::{KeyRecord, Snapshot};
use keygate::key::{self, KeyDigest};
use keygate::limit::KeyStates;
use keygate::policy::{decide, Limits, PlanTable, RequestFacts};
use keygate::proxy::{find_key, StateCell, StopSignal};
use keygate::usage::RequestUsage;
use pingora::http::RequestHeader;
use time::OffsetDateTime;
use tokio::sync::Notify;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get).max(2)
}

/// Runs `step` `iters` times on every thread at once; the wall time of the slowest.
fn on_all_threads<S, F>(iters: u64, setup: S) -> Duration
where
    S: Fn() -> F + Sync,
    F: FnMut(),
{
    let threads = threads();
    let start = Barrier::new(threads);
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut step = setup();
                    start.wait();
                    let began = Instant::now();
                    for _ in 0..iters {
                        step();
                    }
                    began.elapsed()
                })
            })
            .collect();
        runs.into_iter().map(|run| run.join().expect("bench thread")).max().unwrap_or_default()
    })
}

fn state_hold(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("hold the state, {} threads", threads()));
    let shared = ArcSwap::from_pointee(vec![0u8; 64]);
    group.bench_function("one Arc for all threads", |b| {
        b.iter_custom(|iters| on_all_threads(iters, || || drop(black_box(shared.load_full()))))
    });
    let cell = StateCell::new(vec![0u8; 64]);
    group.bench_function("a share per thread (StateCell)", |b| {
        b.iter_custom(|iters| on_all_threads(iters, || || drop(black_box(cell.hold()))))
    });
    group.finish();
}

fn stop_notice(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("poll the stop notice, {} threads", threads()));
    let notify = Notify::new();
    group.bench_function("tokio Notify waiter", |b| {
        b.iter_custom(|iters| {
            on_all_threads(iters, || {
                let mut notified = Box::pin(notify.notified());
                notified.as_mut().enable();
                let mut cx = Context::from_waker(Waker::noop());
                move || {
                    let _ = black_box(notified.as_mut().poll(&mut cx));
                }
            })
        })
    });
    let signal = StopSignal::default();
    group.bench_function("a waker slot per connection (StopWatch)", |b| {
        b.iter_custom(|iters| {
            on_all_threads(iters, || {
                let watch = signal.watch();
                let mut cx = Context::from_waker(Waker::noop());
                move || {
                    let _ = black_box(std::pin::pin!(watch.stopped()).poll(&mut cx));
                }
            })
        })
    });
    group.finish();
}

fn one_key(c: &mut Criterion) {
    let threads = threads();
    let keys: Vec<String> = (0..threads).map(|_| key::generate("kg_live").expect("valid prefix")).collect();
    let snapshot = Snapshot::build(
        1,
        keys.iter().enumerate().map(|(i, k)| {
            let record = KeyRecord::builder(format!("key_{i}"))
                .owner(Some("acme".into()))
                .plan(Some("pro".into()))
                .scopes(vec!["orders:*".into()])
                .build();
            (KeyDigest::of(k), record)
        }),
    )
    .expect("unique keys");
    let never_reached = PlanConfig {
        rate_limit: Some(RateLimitConfig {
            requests: u32::MAX,
            per: Duration::from_secs(1),
            burst: None,
            by: LimitScope::Key,
        }),
        quota: Some(QuotaConfig { requests: u64::MAX >> 25, per: QuotaPeriod::Month, by: LimitScope::Key }),
    };
    let plans = PlanTable::new([("pro".to_owned(), never_reached)], None);
    let states = KeyStates::new();
    let limits = Limits { plans: &plans, states: &states };
    let locations = vec![KeyLocation::Header { name: http::HeaderName::from_static("x-api-key"), scheme: None }];
    let required = vec!["orders:read".to_owned()];
    let request = |key: &str| {
        let mut req = RequestHeader::build("GET", b"/v1/orders/42", None).expect("valid request");
        req.append_header("x-api-key", key).expect("valid header");
        req
    };
    let step = |req: &RequestHeader| {
        let presented = find_key(req, &locations);
        let facts = RequestFacts {
            presented_key: presented.as_deref(),
            client_ip: [10, 0, 0, 1].into(),
            required_scopes: &required,
        };
        let decision = decide(&facts, &snapshot, &limits, OffsetDateTime::now_utc());
        let (Some(record), Some(usage)) = (&decision.key, &decision.usage) else { panic!("the key is allowed") };
        black_box((
            record.id_header(),
            record.owner_header(),
            record.plan_header().cloned(),
            record.scopes_header().clone(),
        ));
        let counted = RequestUsage { denial: None, status: 200, bytes_in: 0, bytes_out: 0, at_ms: 0 };
        usage.record(record.owner(), &counted);
    };

    let mut group = c.benchmark_group(format!("one key's part of a request, {threads} threads"));
    group.bench_function("every thread the same key", |b| {
        b.iter_custom(|iters| {
            on_all_threads(iters, || {
                let req = request(&keys[0]);
                move || step(&req)
            })
        })
    });
    group.bench_function("a key per thread", |b| {
        b.iter_custom(|iters| {
            let next = AtomicUsize::new(0);
            on_all_threads(iters, || {
                let req = request(&keys[next.fetch_add(1, Ordering::Relaxed) % keys.len()]);
                move || step(&req)
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = state_hold, stop_notice, one_key
}
criterion_main!(benches);
