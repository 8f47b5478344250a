//! The key index at scale: 1, 100k, 1M and 10M keys.
//!
//! `cargo bench --bench index_scale` runs criterion's lookup and revocation
//! benchmarks and prints a report with what criterion does not measure:
//!
//! - memory per key: a counting global allocator (wrapping mimalloc, as the
//!   gateway's binary uses) gives the bytes the snapshot keeps allocated after
//!   `Snapshot::build`, divided by the number of keys; the bytes of the records'
//!   own strings (id, name, owner, plan, scopes, tags, metadata) are counted from
//!   the generated inputs and reported beside it;
//! - the latency distribution of single lookups (each timed on its own, random
//!   keys), since criterion reports means;
//! - build and swap of a full-size snapshot while a reader thread keeps looking
//!   up keys, with the reader's longest single lookup, and which thread frees the
//!   old snapshot when a reader still holds it at the swap.
//!
//! Digests are not SHA-256 of generated keys: hashing 10M keys would only add
//! time to the run. Each digest is 32 bytes of splitmix64 output, uniform like
//! SHA-256 output, and distinct for every key number. Records are a mix meant to
//! look like a real key set (see `spec`).
//!
//! `KEYGATE_INDEX_SIZES=1,100000` picks other sizes. Under `cargo test` (criterion's
//! test mode) everything runs once on small sizes.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion};
use keygate::config::{LimitScope, QuotaConfig, QuotaPeriod, RateLimitConfig};
use keygate::index::{KeyIndex, KeyRecord, KeyStatus, SharedPolicies, Snapshot};
use keygate::key::KeyDigest;
use time::OffsetDateTime;

// ---------------------------------------------------------------------------
// A global allocator that counts live bytes (requested sizes, not the
// allocator's rounding) and, per thread, the bytes that thread freed.

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static FREED_HERE: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn note_free(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
    // `try_with`: a thread being torn down may free after its locals are gone.
    let _ = FREED_HERE.try_with(|freed| freed.set(freed.get() + size));
}

// SAFETY: every call is forwarded unchanged to mimalloc; the counters are plain atomics
// and a const-initialised thread local, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if !ptr.is_null() {
            note_alloc(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        if !ptr.is_null() {
            note_alloc(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let new = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn freed_by_this_thread() -> usize {
    FREED_HERE.with(Cell::get)
}

// ---------------------------------------------------------------------------
// Key sets.

fn mix64(mut z: u64) -> u64 {
    // splitmix64's finaliser: a bijection, so distinct inputs give distinct outputs.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The digest of key number `i`: uniform bytes, distinct for every `i` (the first
/// word alone is a bijection of `i`). Numbers at or past the index size are unknown keys.
fn digest(i: u64) -> KeyDigest {
    let mut bytes = [0u8; 32];
    for (word, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        let seed = (i << 2 | word as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        chunk.copy_from_slice(&mix64(seed).to_le_bytes());
    }
    KeyDigest(bytes)
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
const SCOPE_SETS: [&[&str]; 4] =
    [&["orders:read"], &["orders:read", "orders:write"], &["orders:*", "billing:read"], &["*"]];

/// What one generated record holds, before it becomes a `KeyRecord`.
struct Spec {
    id: String,
    name: String,
    owner: String,
    plan: &'static str,
    scopes: &'static [&'static str],
    allow: Option<ipnet::IpNet>,
    rate_limit: Option<RateLimitConfig>,
    quota: Option<QuotaConfig>,
    status: KeyStatus,
    expires_at: Option<OffsetDateTime>,
    team: Option<&'static str>,
    tag: Option<&'static str>,
}

/// Key number `i` of a key set that looks like a real one: ids in the control
/// plane's format (`key_` + 20 base62), a name on every key, owners holding two keys
/// each, three plans, four scope sets; one key in 20 with its own one-address
/// allowlist, one in 100 with its own rate limit, one in 100 with its own quota,
/// one in 4 expiring, one in 25 with metadata, one in 10 with a tag, some disabled
/// or revoked.
fn spec(i: u64) -> Spec {
    let mut id = String::with_capacity(24);
    id.push_str("key_");
    let (mut a, mut b) = (mix64(i ^ 0x5555_5555), mix64(i ^ 0xaaaa_aaaa));
    for n in 0..20 {
        let source = if n < 10 { &mut a } else { &mut b };
        id.push(BASE62[(*source % 62) as usize] as char);
        *source /= 62;
    }
    let allow = i.is_multiple_of(20).then(|| {
        let ip = std::net::Ipv4Addr::from(0xc633_6400u32.wrapping_add(i as u32)); // from 198.51.100.0 up
        ipnet::IpNet::from(std::net::IpAddr::V4(ip))
    });
    Spec {
        id,
        name: format!("app-{i:08}"),
        owner: format!("acct_{:08}", i / 2),
        plan: PLANS[(i % 3) as usize],
        scopes: SCOPE_SETS[((i / 3) % 4) as usize],
        allow,
        rate_limit: (i % 100 == 1).then(|| RateLimitConfig {
            requests: 10 + (i % 50) as u32,
            per: Duration::from_secs(1),
            burst: None,
            by: LimitScope::Key,
        }),
        quota: (i % 100 == 2).then_some(QuotaConfig {
            requests: 100_000,
            per: QuotaPeriod::Month,
            by: LimitScope::Key,
        }),
        status: match i % 100 {
            3 => KeyStatus::Disabled,
            4 => KeyStatus::Revoked,
            _ => KeyStatus::Active,
        },
        expires_at: i
            .is_multiple_of(4)
            .then(|| OffsetDateTime::from_unix_timestamp(1_900_000_000 + i as i64).expect("a valid timestamp")),
        team: (i % 25 == 5).then_some("payments"),
        tag: (i % 10 == 6).then_some("prod"),
    }
}

impl Spec {
    /// Bytes of text the record carries as its own (counted once each).
    fn string_bytes(&self) -> usize {
        self.id.len()
            + self.name.len()
            + self.owner.len()
            + self.plan.len()
            + self.scopes.iter().map(|s| s.len()).sum::<usize>()
            + self.team.map_or(0, |team| "team".len() + team.len())
            + self.tag.map_or(0, str::len)
    }

    /// The record, built as a keys file's or a feed's records are: sharing policies within the key set.
    fn into_record(self, policies: &mut SharedPolicies) -> KeyRecord {
        let mut metadata = serde_json::Map::new();
        if let Some(team) = self.team {
            metadata.insert("team".into(), team.into());
        }
        KeyRecord::builder(self.id)
            .name(self.name)
            .owner(Some(self.owner))
            .plan(Some(self.plan.into()))
            .scopes(self.scopes.iter().map(|s| (*s).to_owned()).collect())
            .ip_allowlist(self.allow.into_iter().collect())
            .rate_limit(self.rate_limit)
            .quota(self.quota)
            .status(self.status)
            .expires_at(self.expires_at)
            .metadata(metadata)
            .tags(self.tag.into_iter().map(str::to_owned).collect())
            .build_sharing(policies)
    }
}

// ---------------------------------------------------------------------------
// Measurements.

struct Built {
    snapshot: Snapshot,
    bytes: usize,
    string_bytes: usize,
    /// Generating the records (bench input) and `Snapshot::build` on them.
    generate_s: f64,
    build_s: f64,
}

/// Generates `n` records, builds a snapshot of them and counts what it keeps.
fn build(n: u64, version: u64) -> Built {
    let before = live_bytes();
    let mut string_bytes = 0;
    let started = Instant::now();
    let mut policies = SharedPolicies::default();
    let records: Vec<(KeyDigest, KeyRecord)> = (0..n)
        .map(|i| {
            let spec = spec(i);
            string_bytes += spec.string_bytes();
            (digest(i), spec.into_record(&mut policies))
        })
        .collect();
    drop(policies);
    let generate_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let snapshot = Snapshot::build(version, records).expect("distinct digests");
    let build_s = started.elapsed().as_secs_f64();
    let bytes = live_bytes().saturating_sub(before);
    Built { snapshot, bytes, string_bytes, generate_s, build_s }
}

/// Digests of `count` random keys of an index of `n` (present) or past it (absent).
fn sample(n: u64, count: usize, present: bool, seed: u64) -> Vec<KeyDigest> {
    (0..count as u64)
        .map(|k| {
            let r = mix64(seed ^ k.wrapping_mul(0x2545_f491_4f6c_dd1d));
            if present {
                digest(r % n)
            } else {
                digest(n + r % (u64::MAX / 4 - n))
            }
        })
        .collect()
}

struct Latencies {
    sorted_ns: Vec<u64>,
}

impl Latencies {
    fn new(mut ns: Vec<u64>) -> Self {
        ns.sort_unstable();
        Latencies { sorted_ns: ns }
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.sorted_ns.is_empty() {
            return 0;
        }
        let at = ((self.sorted_ns.len() - 1) as f64 * q).round() as usize;
        self.sorted_ns[at]
    }

    fn max(&self) -> u64 {
        self.sorted_ns.last().copied().unwrap_or(0)
    }
}

/// Times single lookups one by one, as a request does them: load the snapshot,
/// look up one random key, read its status. Returns the latencies and the
/// timer's own cost. Timed alone, a lookup's cache misses cannot overlap with
/// the next lookup's.
fn single_lookups(index: &KeyIndex, keys: &[KeyDigest]) -> (Latencies, Latencies) {
    let mut overhead = Vec::with_capacity(keys.len().min(100_000));
    for _ in 0..overhead.capacity() {
        let t0 = Instant::now();
        let t1 = Instant::now();
        overhead.push((t1 - t0).as_nanos() as u64);
    }
    let mut ns = Vec::with_capacity(keys.len());
    for key in keys {
        let t0 = Instant::now();
        let found = index.load().get(black_box(key)).map(|r| r.status);
        let t1 = Instant::now();
        black_box(found);
        ns.push((t1 - t0).as_nanos() as u64);
    }
    (Latencies::new(ns), Latencies::new(overhead))
}

/// Lookups per timed batch in `batched_lookups`.
const BATCH: usize = 64;

/// Times batches of `BATCH` lookups of random keys and gives each batch's time per
/// lookup: what a busy worker sees, where the next lookups overlap with this one's misses.
fn batched_lookups(index: &KeyIndex, keys: &[KeyDigest]) -> Latencies {
    let mut ns = Vec::with_capacity(keys.len() / BATCH);
    for batch in keys.chunks_exact(BATCH) {
        let t0 = Instant::now();
        for key in batch {
            black_box(index.load().get(black_box(key)).map(|r| r.status));
        }
        ns.push((t0.elapsed().as_nanos() / BATCH as u128) as u64);
    }
    Latencies::new(ns)
}

struct SizeReport {
    keys: u64,
    bytes_per_key: f64,
    strings_per_key: f64,
    generate_s: f64,
    build_s: f64,
    hit: Latencies,
    miss: Latencies,
    timer: Latencies,
    batched: Latencies,
}

fn per_key(bytes: usize, keys: u64) -> f64 {
    bytes as f64 / keys.max(1) as f64
}

fn bench_lookups(c: &mut Criterion, index: &KeyIndex, n: u64, sample_len: usize) {
    let hits = sample(n, sample_len, true, 1);
    let misses = sample(n, sample_len, false, 2);
    let mask = sample_len - 1;
    let mut group = c.benchmark_group("index_lookup");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.bench_with_input(BenchmarkId::new("hit", n), &hits, |b, keys| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & mask;
            index.load().get(black_box(&keys[i])).map(|r| r.status)
        })
    });
    group.bench_with_input(BenchmarkId::new("miss", n), &misses, |b, keys| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & mask;
            index.load().get(black_box(&keys[i])).is_some()
        })
    });
    group.finish();
}

fn revoked(i: u64) -> KeyRecord {
    let mut spec = spec(i);
    spec.status = KeyStatus::Revoked;
    spec.into_record(&mut SharedPolicies::default())
}

/// One revocation applied to the full index, with overlays of several sizes; and the
/// time `compact` takes to fold an overlay of `compact_at` changes into a new base.
fn bench_revocation(
    c: &mut Criterion,
    base: &Snapshot,
    n: u64,
    overlays: &[u64],
    compact_at: u64,
) -> (Vec<(u64, f64)>, Option<f64>) {
    let mut group = c.benchmark_group("index_apply_one_revocation");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(30);
    let mut timings = Vec::new();
    let mut compact_s = None;
    for &overlay in overlays {
        // `overlay` keys changed since the base was built (compaction not run).
        let snapshot = base.apply(2, (0..overlay).map(|i| (digest(i * 7 % n), Some(revoked(i * 7 % n)))));
        let target = n / 2 + 1;
        let record = revoked(target);
        group.bench_function(BenchmarkId::new(format!("{n}_keys_overlay"), snapshot.overlay_len()), |b| {
            b.iter_batched(
                || record.clone(),
                |record| snapshot.apply(3, [(digest(target), Some(record))]),
                BatchSize::SmallInput,
            )
        });
        // Our own timing of the same, for the report.
        let rounds = 50;
        let mut total = Duration::ZERO;
        for _ in 0..rounds {
            let record = record.clone();
            let started = Instant::now();
            let next = snapshot.apply(3, [(digest(target), Some(record))]);
            total += started.elapsed();
            drop(black_box(next));
        }
        timings.push((snapshot.overlay_len() as u64, total.as_secs_f64() / f64::from(rounds)));
        if overlay == compact_at {
            let started = Instant::now();
            let compacted = snapshot.compact();
            compact_s = Some(started.elapsed().as_secs_f64());
            assert_eq!(compacted.len(), snapshot.len());
        }
    }
    group.finish();
    (timings, compact_s)
}

/// What a reader thread saw while it looked up keys in a loop.
#[derive(Default)]
struct ReaderStats {
    lookups: u64,
    max_ns: u64,
    /// When the longest lookup started, from the start of the experiment.
    max_at: Duration,
    /// Lookups over 1 us, 10 us, 100 us and 1 ms.
    over: [u64; 4],
    freed_bytes: usize,
}

impl ReaderStats {
    fn note(&mut self, ns: u64, at: Duration) {
        self.lookups += 1;
        if ns > self.max_ns {
            self.max_ns = ns;
            self.max_at = at;
        }
        for (limit, count) in [1_000, 10_000, 100_000, 1_000_000].iter().zip(self.over.iter_mut()) {
            if ns > *limit {
                *count += 1;
            }
        }
    }
}

struct SwapReport {
    records_s: f64,
    build_s: f64,
    published_at: Duration,
    publish_s: f64,
    released_after_s: f64,
    reader: ReaderStats,
    publisher_freed_bytes: usize,
}

/// Builds a second full-size snapshot and publishes it while a reader thread keeps
/// looking up keys in whatever snapshot is current. `old_bytes` is the size of the
/// snapshot being replaced.
fn build_and_swap(index: &Arc<KeyIndex>, n: u64, old_bytes: usize) -> SwapReport {
    let stop = Arc::new(AtomicBool::new(false));
    let keys = Arc::new(sample(n, 1 << 16, true, 3));
    let start = Instant::now();
    let reader = {
        let (index, stop, keys) = (Arc::clone(index), Arc::clone(&stop), Arc::clone(&keys));
        std::thread::spawn(move || {
            let freed_before = freed_by_this_thread();
            let mut stats = ReaderStats::default();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 1) & (keys.len() - 1);
                let t0 = Instant::now();
                let found = index.load().get(&keys[i]).map(|r| r.status);
                let t1 = Instant::now();
                black_box(found);
                stats.note((t1 - t0).as_nanos() as u64, t0 - start);
            }
            stats.freed_bytes = freed_by_this_thread() - freed_before;
            stats
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    let mut policies = SharedPolicies::default();
    let records: Vec<(KeyDigest, KeyRecord)> =
        (0..n).map(|i| (digest(i), spec(i).into_record(&mut policies))).collect();
    drop(policies);
    let records_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let next = Snapshot::build(2, records).expect("distinct digests");
    let build_s = started.elapsed().as_secs_f64();
    let with_both = live_bytes();
    let published_at = start.elapsed();
    let freed_before = freed_by_this_thread();
    let started = Instant::now();
    index.publish(next);
    let publish_s = started.elapsed().as_secs_f64();
    let publisher_freed_bytes = freed_by_this_thread() - freed_before;
    // Wait for the old snapshot's memory to come back, wherever it is freed.
    let target = with_both.saturating_sub(old_bytes / 2);
    let released_from = Instant::now();
    while live_bytes() > target && released_from.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let released_after_s = released_from.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let reader = reader.join().expect("the reader thread");
    SwapReport { records_s, build_s, published_at, publish_s, released_after_s, reader, publisher_freed_bytes }
}

struct HeldGuardReport {
    reader_guard_drop_ns: u64,
    reader_freed_bytes: usize,
    publisher_freed_bytes: usize,
    released_after_s: f64,
}

/// The worst case for the swap: a reader holds the current snapshot (an arc-swap
/// guard, as a request does for the length of `decide`) while a new one is
/// published, and lets go after. Who frees the old snapshot, and what does the
/// reader pay when it lets go?
fn reader_holds_guard_across_swap(index: &Arc<KeyIndex>, old_bytes: usize) -> HeldGuardReport {
    let barrier = Arc::new(Barrier::new(2));
    let reader = {
        let (index, barrier) = (Arc::clone(index), Arc::clone(&barrier));
        std::thread::spawn(move || {
            let freed_before = freed_by_this_thread();
            let guard = index.load();
            black_box(guard.len());
            barrier.wait(); // holding the guard
            barrier.wait(); // the new snapshot is published
            let started = Instant::now();
            drop(guard);
            let drop_ns = started.elapsed().as_nanos() as u64;
            (drop_ns, freed_by_this_thread() - freed_before)
        })
    };
    barrier.wait();
    let before = live_bytes();
    let freed_before = freed_by_this_thread();
    index.publish(
        Snapshot::build(3, [(digest(0), spec(0).into_record(&mut SharedPolicies::default()))]).expect("one key"),
    );
    let publisher_freed_bytes = freed_by_this_thread() - freed_before;
    barrier.wait();
    let (reader_guard_drop_ns, reader_freed_bytes) = reader.join().expect("the reader thread");
    let released_from = Instant::now();
    while live_bytes() > before.saturating_sub(old_bytes / 2) && released_from.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    HeldGuardReport {
        reader_guard_drop_ns,
        reader_freed_bytes,
        publisher_freed_bytes,
        released_after_s: released_from.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------

fn sizes(bench_mode: bool) -> Vec<u64> {
    if let Ok(text) = std::env::var("KEYGATE_INDEX_SIZES") {
        let sizes: Vec<u64> = text.split(',').filter_map(|s| s.trim().replace('_', "").parse().ok()).collect();
        if !sizes.is_empty() {
            return sizes;
        }
    }
    if bench_mode {
        vec![1, 100_000, 1_000_000, 10_000_000]
    } else {
        vec![1, 1_000]
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench_mode = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let mut c = Criterion::default().configure_from_args();
    let sizes = sizes(bench_mode);
    let sample_len = if bench_mode { 1 << 20 } else { 1 << 10 };
    let largest = sizes.iter().copied().max().unwrap_or(1);

    let mut reports = Vec::new();
    let mut kept: Option<(Arc<KeyIndex>, Snapshot, usize)> = None;
    for &n in &sizes {
        let built = build(n, 1);
        let snapshot_for_apply = built.snapshot.clone();
        let index = Arc::new(KeyIndex::default());
        index.publish(built.snapshot);
        bench_lookups(&mut c, &index, n, sample_len);
        let (hit, timer) = single_lookups(&index, &sample(n, sample_len, true, 4));
        let (miss, _) = single_lookups(&index, &sample(n, sample_len, false, 5));
        let batched = batched_lookups(&index, &sample(n, sample_len, true, 6));
        reports.push(SizeReport {
            keys: n,
            bytes_per_key: per_key(built.bytes, n),
            strings_per_key: per_key(built.string_bytes, n),
            generate_s: built.generate_s,
            build_s: built.build_s,
            hit,
            miss,
            timer,
            batched,
        });
        if n == largest && kept.is_none() {
            kept = Some((index, snapshot_for_apply, built.bytes));
        }
    }

    let Some((index, base, old_bytes)) = kept else { return };
    let n = largest;
    // No overlay, a small one, the largest one compaction lets grow, and one past that.
    let limit = base.overlay_limit() as u64 - 1;
    let overlays: Vec<u64> = [0u64, 1_000, limit, 100_000].into_iter().filter(|&o| o < n).collect();
    let (revocations, compact_s) = bench_revocation(&mut c, &base, n, &overlays, limit);
    drop(base);
    let swap = build_and_swap(&index, n, old_bytes);
    let held = reader_holds_guard_across_swap(&index, old_bytes);
    c.final_summary();

    println!();
    println!("index_scale report (bytes are requested sizes counted by the bench's allocator)");
    println!(
        "{:>10} | {:>7} | {:>7} | {:>7} | {:>7} | {:>8} | {:>8} | {:>8} | {:>8} | {:>9} | {:>8} | {:>6} | {:>8} | {:>8}",
        "keys",
        "B/key",
        "strings",
        "beyond",
        "gen s",
        "build s",
        "hit p50",
        "hit p99",
        "hit p999",
        "hit max",
        "miss p99",
        "timer",
        "batch50",
        "batch99"
    );
    for r in &reports {
        println!(
            "{:>10} | {:>7.1} | {:>7.1} | {:>7.1} | {:>7.2} | {:>8.3} | {:>6}ns | {:>6}ns | {:>6}ns | {:>7}ns | {:>6}ns | {:>4}ns | {:>6}ns | {:>6}ns",
            r.keys,
            r.bytes_per_key,
            r.strings_per_key,
            r.bytes_per_key - r.strings_per_key,
            r.generate_s,
            r.build_s,
            r.hit.quantile(0.5),
            r.hit.quantile(0.99),
            r.hit.quantile(0.999),
            r.hit.max(),
            r.miss.quantile(0.99),
            r.timer.quantile(0.5),
            r.batched.quantile(0.5),
            r.batched.quantile(0.99),
        );
    }
    println!("(gen s: generating the records, bench input; build s: Snapshot::build on them, no other thread running;");
    println!(" a single lookup is `index.load().get(digest)`, timed one by one over {sample_len} random keys;");
    println!(" the times include the timer's own cost, `timer`: the median of an empty timed interval;");
    println!(" batch50/99: the time per lookup of batches of {BATCH} random lookups, median and p99 over the batches)");
    println!();
    println!("one revocation applied to {n} keys (Snapshot::apply, mean of 50, without dropping the result):");
    for (overlay, seconds) in &revocations {
        println!("  overlay of {overlay:>7} changes: {:>9.1} us", seconds * 1e6);
    }
    if let Some(seconds) = compact_s {
        println!("Snapshot::compact of {n} keys with an overlay of {limit} changes: {seconds:.3} s");
    }
    println!();
    let r = &swap.reader;
    println!("build and swap of {n} keys while a reader thread looks up keys:");
    println!("  generate records:  {:>8.3} s (bench input, not index work)", swap.records_s);
    println!("  Snapshot::build:   {:>8.3} s", swap.build_s);
    println!(
        "  KeyIndex::publish: {:>8.3} ms (publisher freed {:.1} MiB in it)",
        swap.publish_s * 1e3,
        mib(swap.publisher_freed_bytes)
    );
    println!("  old snapshot's memory back {:.3} s after the publish", swap.released_after_s);
    println!(
        "  reader: {} lookups; longest {:.1} us at {:+.3} s from the publish; over 1/10/100/1000 us: {:?}; freed {:.1} MiB itself",
        r.lookups,
        r.max_ns as f64 / 1e3,
        r.max_at.as_secs_f64() - swap.published_at.as_secs_f64(),
        r.over,
        mib(r.freed_bytes)
    );
    println!();
    println!("a reader holding a guard on the {n}-key snapshot while a new one is published:");
    println!(
        "  the reader's guard drop took {:.3} ms and freed {:.1} MiB; the publisher freed {:.1} MiB; memory back after {:.3} s",
        held.reader_guard_drop_ns as f64 / 1e6,
        mib(held.reader_freed_bytes),
        mib(held.publisher_freed_bytes),
        held.released_after_s
    );
    println!(
        "sizes: KeyRecord {} B (+16 B of Arc counts), KeyPolicy {} B, http::HeaderValue {} B, KeyDigest {} B",
        std::mem::size_of::<KeyRecord>(),
        std::mem::size_of::<keygate::index::KeyPolicy>(),
        std::mem::size_of::<http::HeaderValue>(),
        std::mem::size_of::<KeyDigest>()
    );
    println!("peak live bytes during the run: {:.1} MiB", mib(PEAK.load(Ordering::Relaxed)));
}
