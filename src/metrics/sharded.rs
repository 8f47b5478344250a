//! Counters that every request adds to, split into per-thread slots.
//!
//! A plain atomic counter is one cache line that every core writes on every request;
//! under load the line moves from core to core and each add waits for it. Here each
//! thread adds to a slot of its own (its own cache lines) and a reader sums the slots,
//! which only the scrape and the shutdown drain do.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crossbeam_utils::CachePadded;

/// Slots per sharded value: the machine's cores rounded up to a power of two, at most
/// 64, so threads rarely share a slot and a reader sums a bounded number of them.
fn slot_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(4, std::num::NonZeroUsize::get);
        cores.next_power_of_two().min(64)
    })
}

/// This thread's number: threads are numbered as they first ask. A `Slots` takes it
/// modulo its length.
fn this_thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|number| *number)
}

/// One value per slot, each on cache lines of its own.
pub struct Slots<T> {
    slots: Box<[CachePadded<T>]>,
}

impl<T: Default> Default for Slots<T> {
    fn default() -> Self {
        Slots { slots: (0..slot_count()).map(|_| CachePadded::new(T::default())).collect() }
    }
}

impl<T> Slots<T> {
    /// This thread's slot.
    pub fn local(&self) -> &T {
        // The length is a power of two (`slot_count`): a mask, not a division.
        &self.slots[this_thread_number() & (self.slots.len() - 1)]
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|slot| &**slot)
    }
}

/// A gauge that goes up and down from many threads: requests in flight. A request may
/// end on another thread than it began, so one slot can go below zero; the sum is right.
#[derive(Default)]
pub struct ShardedGauge {
    slots: Slots<AtomicI64>,
}

impl ShardedGauge {
    pub fn increment(&self) {
        self.slots.local().fetch_add(1, Ordering::Relaxed);
    }

    pub fn decrement(&self) {
        self.slots.local().fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.slots.iter().map(|slot| slot.load(Ordering::Acquire)).sum()
    }
}

/// Counts in fixed buckets of a duration histogram, plus the sum in nanoseconds: adding
/// an integer is one instruction where a floating-point sum needs a compare-and-swap loop.
pub struct DurationCounts<const BUCKETS: usize> {
    /// Observations in each bucket alone (not cumulative); the last is above every bound.
    pub buckets: [AtomicU64; BUCKETS],
    pub sum_nanos: AtomicU64,
}

impl<const BUCKETS: usize> Default for DurationCounts<BUCKETS> {
    fn default() -> Self {
        DurationCounts { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_nanos: AtomicU64::new(0) }
    }
}

impl<const BUCKETS: usize> DurationCounts<BUCKETS> {
    /// `bounds` are the buckets' upper bounds in seconds, ascending, one fewer than BUCKETS.
    pub fn observe(&self, bounds: &[f64], elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = bounds.iter().position(|&bound| seconds <= bound).unwrap_or(bounds.len());
        if let Some(count) = self.buckets.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// The sum of one histogram's slots, as Prometheus writes it: cumulative bucket counts.
pub struct DurationSnapshot {
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

pub fn sum_durations<'a, const BUCKETS: usize>(
    slots: impl Iterator<Item = &'a DurationCounts<BUCKETS>>,
) -> DurationSnapshot {
    let mut per_bucket = [0u64; BUCKETS];
    let mut sum_nanos = 0u64;
    for slot in slots {
        for (total, count) in per_bucket.iter_mut().zip(&slot.buckets) {
            *total = total.wrapping_add(count.load(Ordering::Relaxed));
        }
        sum_nanos = sum_nanos.wrapping_add(slot.sum_nanos.load(Ordering::Relaxed));
    }
    let mut running = 0u64;
    let cumulative = per_bucket
        .iter()
        .map(|count| {
            running = running.wrapping_add(*count);
            running
        })
        .collect();
    DurationSnapshot { cumulative, count: running, sum_seconds: sum_nanos as f64 / 1e9 }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_gauge_sums_every_thread_even_when_requests_end_elsewhere() {
        let gauge = Arc::new(ShardedGauge::default());
        let starters: Vec<_> = (0..4)
            .map(|_| {
                let gauge = Arc::clone(&gauge);
                std::thread::spawn(move || (0..1000).for_each(|_| gauge.increment()))
            })
            .collect();
        starters.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(gauge.get(), 4000);
        let gauge_for_enders = Arc::clone(&gauge);
        std::thread::spawn(move || (0..3000).for_each(|_| gauge_for_enders.decrement())).join().unwrap();
        assert_eq!(gauge.get(), 1000);
    }

    #[test]
    fn durations_fall_in_the_first_bucket_whose_bound_holds_them() {
        let bounds = [0.001, 0.01, 0.1];
        let counts = DurationCounts::<4>::default();
        counts.observe(&bounds, Duration::from_micros(500));
        counts.observe(&bounds, Duration::from_millis(1));
        counts.observe(&bounds, Duration::from_millis(50));
        counts.observe(&bounds, Duration::from_secs(2));
        let snapshot = sum_durations(std::iter::once(&counts));
        assert_eq!(snapshot.cumulative, [2, 2, 3, 4]);
        assert_eq!(snapshot.count, 4);
        assert!((snapshot.sum_seconds - 2.0515).abs() < 1e-9, "{}", snapshot.sum_seconds);
    }

    #[test]
    fn every_thread_has_a_slot_within_bounds() {
        let slots: Slots<AtomicU64> = Slots::default();
        let threads: Vec<_> =
            (0..100).map(|_| std::thread::spawn(|| this_thread_number() & (slot_count() - 1))).collect();
        for thread in threads {
            assert!(thread.join().unwrap() < slots.iter().count());
        }
    }
}
