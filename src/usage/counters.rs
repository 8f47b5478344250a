//! The request-path half of usage: atomics in each key's entry of [`KeyStates`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

use governor::clock::Clock;
use time::OffsetDateTime;

use crate::key_state::{KeyStates, Sweep};

use super::record::{StatusClasses, UsageRecord};
use crate::outcome::{Denial, DENIAL_KINDS};

/// What one finished request adds to its key's usage.
#[derive(Debug, Clone, Copy)]
pub struct RequestUsage {
    pub denial: Option<Denial>,
    /// The status sent to the client; 0 when none was sent.
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Unix time in milliseconds.
    pub at_ms: i64,
}

/// One key's usage since the last drain. All zero is what an entry that has not
/// counted this window holds, and what one idle a whole window is reset to.
#[derive(Default)]
pub(crate) struct KeyUsage {
    /// Set by every request, cleared by each drain: an entry still clear at the
    /// next drain sat idle a whole window and starts afresh (or is removed).
    active: AtomicBool,
    allowed: AtomicU64,
    denied: [AtomicU64; DENIAL_KINDS],
    /// 2xx, 3xx, 4xx, 5xx.
    status: [AtomicU64; 4],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    last_used_ms: AtomicI64,
    /// The key's owner when it started counting: what a metering sink names as
    /// the events' subject, without a lookup by id in the index.
    owner: OnceLock<Option<Box<str>>>,
}

impl<C: Clock> KeyStates<C> {
    /// Counts a request of `key_id` whose decision did not hold its entry (see [`crate::key_state::UsageSlot`]).
    pub fn record(&self, key_id: &str, owner: Option<&str>, usage: &RequestUsage) {
        self.state(key_id).usage.add(owner, usage);
    }

    /// Takes every count since the last drain, as records for the window
    /// `[window_start, window_end)`; forgets keys that had no requests in it
    /// (entries idle in every part are removed, see [`KeyStates::evict_idle`]).
    pub fn drain(&self, node: &str, window_start: OffsetDateTime, window_end: OffsetDateTime) -> Vec<UsageRecord> {
        let mut records = Vec::new();
        for entry in self.map.iter() {
            if let Some(record) = entry.value().usage.take(node, entry.key(), window_start, window_end) {
                records.push(record);
            }
        }
        // Under the write guard: a request counted since `take` set `active` again.
        self.sweep(window_end, Sweep::CloseWindow);
        records
    }
}

impl KeyUsage {
    pub(crate) fn add(&self, owner: Option<&str>, usage: &RequestUsage) {
        self.owner.get_or_init(|| owner.map(Box::from));
        // Release: a drain that takes this outcome also sees the owner set above.
        match usage.denial {
            None => self.allowed.fetch_add(1, Ordering::Release),
            Some(denial) => self.denied[denial.index()].fetch_add(1, Ordering::Release),
        };
        if let Some(slot) = (usage.status / 100).checked_sub(2).and_then(|i| self.status.get(usize::from(i))) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes_in.fetch_add(usage.bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(usage.bytes_out, Ordering::Relaxed);
        self.last_used_ms.fetch_max(usage.at_ms, Ordering::Relaxed);
        self.active.store(true, Ordering::Release);
    }

    /// Ends the window: whether a request was counted since the last call.
    pub(crate) fn close_window(&self) -> bool {
        self.active.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Nothing counted that a drain has yet to take. (Status and byte counts of a
    /// request whose outcome the last drain took are not waited for, as before.)
    pub(crate) fn is_drained(&self) -> bool {
        self.allowed.load(Ordering::Acquire) == 0 && self.denied.iter().all(|n| n.load(Ordering::Acquire) == 0)
    }

    /// Swaps every counter to zero; `None` when there was nothing to take.
    /// `requests` is derived from the outcomes, so a record always adds up even
    /// when requests finish while it is being taken.
    fn take(
        &self,
        node: &str,
        key_id: &str,
        window_start: OffsetDateTime,
        window_end: OffsetDateTime,
    ) -> Option<UsageRecord> {
        // Most entries of a large map count nothing in a window: loads, not swaps, find them.
        if self.is_drained() {
            return None;
        }
        let allowed = self.allowed.swap(0, Ordering::AcqRel);
        let denied: BTreeMap<String, u64> = self
            .denied
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.swap(0, Ordering::AcqRel);
                (n > 0).then(|| (Denial::CODES[i].to_owned(), n))
            })
            .collect();
        let requests = allowed + denied.values().sum::<u64>();
        if requests == 0 {
            return None;
        }
        let last_used_ms = self.last_used_ms.load(Ordering::Relaxed);
        Some(UsageRecord {
            node: node.to_owned(),
            key_id: key_id.to_owned(),
            window_start,
            window_end,
            requests,
            allowed,
            denied,
            status: StatusClasses {
                s2xx: self.status[0].swap(0, Ordering::AcqRel),
                s3xx: self.status[1].swap(0, Ordering::AcqRel),
                s4xx: self.status[2].swap(0, Ordering::AcqRel),
                s5xx: self.status[3].swap(0, Ordering::AcqRel),
            },
            bytes_in: self.bytes_in.swap(0, Ordering::AcqRel),
            bytes_out: self.bytes_out.swap(0, Ordering::AcqRel),
            owner_at_count: Some(self.owner.get().and_then(Option::as_deref).map(str::to_owned)),
            last_used_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(last_used_ms) * 1_000_000).ok(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const START: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);
    const END: OffsetDateTime = datetime!(2026-01-01 00:00:05 UTC);

    fn usage(denial: Option<Denial>, status: u16) -> RequestUsage {
        RequestUsage { denial, status, bytes_in: 3, bytes_out: 7, at_ms: 1_767_225_601_000 }
    }

    #[test]
    fn drain_returns_each_key_once_with_exact_counts() {
        let counters = KeyStates::new();
        for _ in 0..3 {
            counters.record("a", None, &usage(None, 200));
        }
        counters.record("a", None, &usage(Some(Denial::RateLimited { retry_after: 1 }), 429));
        counters.record("b", None, &usage(None, 503));
        let mut records = counters.drain("n", START, END);
        records.sort_by(|x, y| x.key_id.cmp(&y.key_id));
        assert_eq!(records.len(), 2);
        let a = &records[0];
        assert_eq!((a.requests, a.allowed), (4, 3));
        assert_eq!(a.denied["rate_limited"], 1);
        assert_eq!((a.status.s2xx, a.status.s4xx), (3, 1));
        assert_eq!((a.bytes_in, a.bytes_out), (12, 28));
        assert_eq!(a.last_used_at, Some(datetime!(2026-01-01 00:00:01 UTC)));
        assert_eq!(records[1].status.s5xx, 1);
        assert!(counters.drain("n", START, END).is_empty());
    }

    #[test]
    fn a_record_carries_the_owner_its_key_had_when_counted() {
        let counters = KeyStates::new();
        counters.record("a", Some("acme"), &usage(None, 200));
        counters.record("b", None, &usage(None, 200));
        let mut records = counters.drain("n", START, END);
        records.sort_by(|x, y| x.key_id.cmp(&y.key_id));
        assert_eq!(records[0].owner_at_count, Some(Some("acme".to_owned())));
        assert_eq!(records[1].owner_at_count, Some(None), "known to have no owner");
    }

    #[test]
    fn keys_idle_for_a_whole_window_are_forgotten() {
        let counters = KeyStates::new();
        counters.record("a", None, &usage(None, 200));
        counters.drain("n", START, END);
        assert_eq!(counters.len(), 1, "active in the last window: kept");
        counters.drain("n", START, END);
        assert_eq!(counters.len(), 0, "idle for a window: removed");
    }

    #[test]
    fn concurrent_counting_loses_nothing_across_drains() {
        let counters = std::sync::Arc::new(KeyStates::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let counters = std::sync::Arc::clone(&counters);
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        counters.record(&format!("k{}", (t + i) % 7), None, &usage(None, 200));
                    }
                })
            })
            .collect();
        let mut total = 0;
        while threads.iter().any(|t| !t.is_finished()) {
            total += counters.drain("n", START, END).iter().map(|r| r.requests).sum::<u64>();
        }
        total += counters.drain("n", START, END).iter().map(|r| r.requests).sum::<u64>();
        assert_eq!(total, 80_000);
    }
}
