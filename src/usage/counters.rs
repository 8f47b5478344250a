//! The request-path half of usage: atomics in each key's entry of
//! `crate::limit::KeyStates`, and the [`UsageCounters`] the flusher drains them through.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

use time::OffsetDateTime;

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

/// Where the flusher takes usage from: each key's [`KeyUsage`], wherever the
/// node keeps it (beside its limits, in `crate::limit::KeyStates`). The flusher
/// needs nothing else of those entries.
pub trait UsageCounters: Send + Sync {
    /// Takes every count since the last drain, as records for the window
    /// `[window_start, window_end)`.
    fn drain(&self, node: &str, window_start: OffsetDateTime, window_end: OffsetDateTime) -> Vec<UsageRecord>;
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
    pub(crate) fn take(
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

/// Counters in a plain map, for the flusher's tests.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct TestCounters(std::sync::Mutex<BTreeMap<String, KeyUsage>>);

#[cfg(test)]
impl TestCounters {
    pub(crate) fn record(&self, key_id: &str, owner: Option<&str>, usage: &RequestUsage) {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(key_id.to_owned()).or_default().add(owner, usage);
    }
}

#[cfg(test)]
impl UsageCounters for TestCounters {
    fn drain(&self, node: &str, window_start: OffsetDateTime, window_end: OffsetDateTime) -> Vec<UsageRecord> {
        let map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter().filter_map(|(key_id, usage)| usage.take(node, key_id, window_start, window_end)).collect()
    }
}
