//! When the keys were last synced, on the monotonic clock, and whether that is
//! recent enough to judge keyed requests ([`Freshness`]).
//!
//! `keys.max_staleness` bounds a duration, and the wall clock can step (NTP) both
//! ways: measured on it, a step back right after a sync made the keys look
//! synced in the future, and every keyed request got `503 not_ready`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Marks "before any sync".
const NEVER: i64 = i64::MIN;

pub struct LastSync {
    origin: Instant,
    /// Milliseconds from `origin` to the last success; negative for keys loaded
    /// from a cache file written before this process started; `NEVER` before any.
    at_ms: AtomicI64,
}

impl Default for LastSync {
    fn default() -> Self {
        Self::new()
    }
}

impl LastSync {
    pub fn new() -> Self {
        LastSync { origin: Instant::now(), at_ms: AtomicI64::new(NEVER) }
    }

    /// A sync succeeded just now.
    pub fn mark(&self) {
        self.at_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// The keys are as fresh as a sync `age` ago (a last-known-good file's age).
    pub fn mark_age(&self, age: Duration) {
        let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        self.at_ms.store(self.elapsed_ms().saturating_sub(age).max(NEVER + 1), Ordering::Relaxed);
    }

    /// Whether keys were ever synced or loaded from a cache file.
    pub fn ever(&self) -> bool {
        self.at_ms.load(Ordering::Relaxed) != NEVER
    }

    /// Time since the last success; `None` before any.
    pub fn age(&self) -> Option<Duration> {
        let at = self.at_ms.load(Ordering::Relaxed);
        (at != NEVER).then(|| Duration::from_millis(self.elapsed_ms().saturating_sub(at).unsigned_abs()))
    }

    fn elapsed_ms(&self) -> i64 {
        i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// How old the keys may get before keyed requests are refused with `not_ready`.
pub struct Freshness {
    /// The last successful sync, on the monotonic clock.
    pub last_success: Arc<LastSync>,
    pub max_staleness: Duration,
}

impl Freshness {
    /// Synced within `max_staleness`. Measured on the monotonic clock: a wall clock
    /// stepped back must not make a fresh sync look like one from the future.
    pub fn is_current(&self) -> bool {
        self.last_success.age().is_some_and(|age| age <= self.max_staleness)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freshness(last: &Arc<LastSync>, max_staleness: Duration) -> Freshness {
        Freshness { last_success: Arc::clone(last), max_staleness }
    }

    #[test]
    fn a_wall_clock_step_backwards_does_not_make_synced_keys_stale() {
        // Staleness is measured from the sync on the monotonic clock, so the wall
        // clock stepping back an hour right after it (NTP) changes nothing.
        let last = Arc::new(LastSync::new());
        let fresh = freshness(&last, Duration::from_secs(60));
        assert!(!fresh.is_current(), "never synced");
        last.mark();
        assert!(fresh.is_current());
        assert!(last.age().is_some_and(|age| age < Duration::from_secs(60)));
    }

    #[test]
    fn keys_older_than_max_staleness_are_not_current() {
        let last = Arc::new(LastSync::new());
        last.mark_age(Duration::from_secs(61));
        assert!(last.ever());
        assert!(!freshness(&last, Duration::from_secs(60)).is_current());
        assert!(freshness(&last, Duration::from_secs(120)).is_current());
        last.mark_age(Duration::MAX);
        assert!(last.ever() && !freshness(&last, Duration::from_secs(60)).is_current());
    }
}
