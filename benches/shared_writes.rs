//! What a write shared by all threads costs on the request path, against the
//! per-thread form the proxy uses: every thread does the same step in a loop at once,
//! and the time per step is what each request would pay.
//!
//! - holding the gateway state for a request: one `Arc` whose count every thread
//!   writes, against `StateCell::hold`, a share per thread;
//! - looking at the stop notice while a connection waits for its next request: a
//!   `tokio::sync::Notify` waiter (a lock every connection shares, per poll), against
//!   `StopWatch`, a waker slot per connection.
//!
//! `cargo bench --bench shared_writes` (threads: the machine's cores, at least 2).

use std::future::Future;
use std::hint::black_box;
use std::sync::Barrier;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use keygate::proxy::{StateCell, StopSignal};
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

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = state_hold, stop_notice
}
criterion_main!(benches);
