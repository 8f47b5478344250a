//! One mutable state per budget: rate limit, quota and usage side by side.
//!
//! A keyed request looks its key's entry up once (one hash of the key id, one
//! shard read guard) and takes a clone of the entry's `Arc`: the rate and quota
//! checks run on it, and the request keeps it (a [`UsageSlot`]) to count its
//! usage when it finishes, with no second lookup. The fleet sync, the usage
//! drain and quota seeding read the same entries.
//!
//! Budgets: an entry is keyed by budget id (see [`super::budget_id`]), so a
//! key's own limits and its usage share its entry. A limit with `by: owner` draws
//! from the entry named `owner <name>`, found by a second lookup. Keeping an
//! `Arc` to the owner's entry inside each key's entry would save that lookup, but
//! a key's owner can change and the owner's entry can be evicted while a key's
//! entry lives on: the key would then draw from a budget no other key sees.
//!
//! Eviction: an entry is removed only when every part is idle (the rate budget is
//! full and has nothing unsynced, the quota counts a finished period and has
//! nothing unsynced, the usage has been drained and no request counted since the
//! last drain) and no request holds its `Arc`. The removal runs under the shard's
//! write guard, where no new clone can be taken, and `Arc::get_mut` proves that
//! none is out; so no request can count into an entry that is gone. A part that is
//! idle in an entry kept for another part is reset, which is what a new entry
//! would hold.

use std::borrow::Cow;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use time::OffsetDateTime;

use super::{budget_id, QuotaExceeded, QuotaPeriods, QuotaState, RateClock, RateInfo, RateLimited, RateState};
use crate::config::{LimitScope, QuotaConfig, QuotaPeriod, RateLimitConfig};
use crate::index::{KeyId, KeyIdMap, KeyRecord};
use crate::usage::{KeyUsage, RequestUsage, UsageCounters, UsageRecord};

/// Every budget's state on this node.
pub struct KeyStates<C: Clock = DefaultClock> {
    pub(crate) map: KeyIdMap<Arc<KeyState>>,
    /// Whether allowed requests are counted for a fleet sync.
    pub(crate) fleet: bool,
    pub(crate) rate_clock: RateClock<C>,
    pub(crate) periods: QuotaPeriods,
}

/// One budget's state. The usage part of an owner's budget stays empty.
#[derive(Default)]
pub(crate) struct KeyState {
    pub(crate) rate: RateState,
    pub(crate) quota: QuotaState,
    pub(crate) usage: KeyUsage,
}

/// Where a request's usage is counted when it finishes: its key's entry, held
/// since the decision, which no drain or eviction removes meanwhile.
#[derive(Clone)]
pub struct UsageSlot(Arc<KeyState>);

impl UsageSlot {
    /// `owner` is the key's owner, recorded with its usage when the entry starts counting.
    pub fn record(&self, owner: Option<&str>, usage: &RequestUsage) {
        self.0.usage.add(owner, usage);
    }
}

impl std::fmt::Debug for UsageSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageSlot")
    }
}

/// Why a key's limits refuse a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Rate(RateLimited),
    /// `rate`: what the rate limit, which let the request through, reports.
    Quota {
        rate: Option<RateInfo>,
        exceeded: QuotaExceeded,
    },
}

impl KeyStates<DefaultClock> {
    pub fn new() -> Self {
        KeyStates::with_clock(DefaultClock::default())
    }

    /// States whose allowed requests a fleet sync takes (`take_rate_unsynced`, `take_quota_unsynced`).
    pub fn for_fleet() -> Self {
        KeyStates { fleet: true, ..KeyStates::new() }
    }
}

impl Default for KeyStates<DefaultClock> {
    fn default() -> Self {
        Self::new()
    }
}

/// What a sweep does beyond removing idle entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sweep {
    /// The maintenance loop's: leaves the usage window alone.
    Evict,
    /// The usage drain's: closes the window, and an entry whose usage sat idle a
    /// whole window starts the next one afresh (its owner is taken again).
    CloseWindow,
}

impl<C: Clock> KeyStates<C> {
    pub fn with_clock(clock: C) -> Self {
        KeyStates {
            map: KeyIdMap::default(),
            fleet: false,
            rate_clock: RateClock::new(clock),
            periods: QuotaPeriods::default(),
        }
    }

    /// The entry of `budget`, made on first use. The clone lets the caller work on
    /// it after the shard guard is released, and keeps eviction off it meanwhile.
    pub(crate) fn state(&self, budget: &str) -> Arc<KeyState> {
        if let Some(state) = self.map.get(budget) {
            return Arc::clone(&state);
        }
        Arc::clone(&self.map.entry(KeyId::from(budget)).or_default())
    }

    /// Applies a keyed request's limits (rate limit first: a request it refuses
    /// spends no quota) and returns the slot its usage is counted in. The key's
    /// own entry is looked up once for all three; a limit by owner adds one
    /// lookup of the owner's entry.
    pub fn check_limits(
        &self,
        record: &KeyRecord,
        rate_limit: Option<&RateLimitConfig>,
        quota: Option<&QuotaConfig>,
        now: OffsetDateTime,
    ) -> (Result<Option<RateInfo>, Refusal>, UsageSlot) {
        let own = self.state(record.id());
        let shared = [rate_limit.map(|limit| limit.by), quota.map(|quota| quota.by)]
            .into_iter()
            .flatten()
            .find_map(|by| match budget_id(record, by) {
                Cow::Owned(budget) => Some(budget),
                Cow::Borrowed(_) => None,
            })
            .map(|budget| {
                let state = self.state(&budget);
                (budget, state)
            });
        // A limit by owner draws from the owner's entry where the key has one (see `budget_id`).
        let budget = |by| match (&shared, by) {
            (Some((id, state)), LimitScope::Owner) => (id.as_str(), state),
            _ => (record.id(), &own),
        };
        let verdict = self.apply(
            rate_limit.map(|limit| (limit, budget(limit.by).1)),
            quota.map(|quota| (quota, budget(quota.by))),
            now,
        );
        (verdict, UsageSlot(own))
    }

    fn apply(
        &self,
        rate_limit: Option<(&RateLimitConfig, &Arc<KeyState>)>,
        quota: Option<(&QuotaConfig, (&str, &Arc<KeyState>))>,
        now: OffsetDateTime,
    ) -> Result<Option<RateInfo>, Refusal> {
        let rate = match rate_limit {
            Some((limit, state)) => {
                Some(state.rate.check(limit, self.rate_clock.now(), self.fleet).map_err(Refusal::Rate)?)
            }
            None => None,
        };
        if let Some((quota, (budget, state))) = quota {
            self.consume(budget, state, quota, now).map_err(|exceeded| Refusal::Quota { rate, exceeded })?;
        }
        Ok(rate)
    }

    /// The slot a request of `key_id` that no limit applies to is counted in.
    pub fn usage_slot(&self, key_id: &str) -> UsageSlot {
        UsageSlot(self.state(key_id))
    }

    /// Removes entries idle in every part (see the module comment); returns how many.
    pub fn evict_idle(&self, now: OffsetDateTime) -> usize {
        self.sweep(now, Sweep::Evict)
    }

    pub(crate) fn sweep(&self, now: OffsetDateTime, sweep: Sweep) -> usize {
        let rate_now = self.rate_clock.now();
        let day = self.periods.current(QuotaPeriod::Day, now);
        let month = self.periods.current(QuotaPeriod::Month, now);
        // Counted here: requests may add entries meanwhile.
        let mut removed = 0;
        self.map.retain(|_, state| {
            // Closed for every entry, busy or not: a request counted since sets it again.
            let active = match sweep {
                Sweep::CloseWindow => state.usage.close_window(),
                Sweep::Evict => state.usage.is_active(),
            };
            // Under the write guard no clone can be taken; none out means no request
            // works on this entry, and every one that did has finished (`get_mut`
            // synchronises with their drops).
            let Some(state) = Arc::get_mut(state) else { return true };
            let usage_idle = !active && state.usage.is_drained();
            if usage_idle && sweep == Sweep::CloseWindow {
                state.usage = KeyUsage::default();
            }
            let rate_idle = state.rate.is_idle(rate_now);
            if rate_idle {
                state.rate = RateState::default();
            }
            let quota_idle = state.quota.is_idle(day, month);
            if quota_idle {
                state.quota = QuotaState::default();
            }
            let idle = usage_idle && rate_idle && quota_idle;
            removed += usize::from(idle);
            !idle
        });
        removed
    }

    /// Budgets with an entry in memory.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl<C: Clock> KeyStates<C> {
    /// Counts a request of `key_id` whose decision did not hold its entry (see [`UsageSlot`]).
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

impl<C> UsageCounters for KeyStates<C>
where
    C: Clock + Send + Sync,
    C::Instant: Send + Sync,
{
    fn drain(&self, node: &str, window_start: OffsetDateTime, window_end: OffsetDateTime) -> Vec<UsageRecord> {
        KeyStates::drain(self, node, window_start, window_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-03-10 12:00 UTC);

    fn states() -> (KeyStates<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (KeyStates::with_clock(clock.clone()), clock)
    }

    fn rate(requests: u32, by: LimitScope) -> RateLimitConfig {
        RateLimitConfig { requests, per: Duration::from_secs(1), burst: None, by }
    }

    fn daily(requests: u64, by: LimitScope) -> QuotaConfig {
        QuotaConfig { requests, per: QuotaPeriod::Day, by }
    }

    fn allowed() -> RequestUsage {
        RequestUsage { denial: None, status: 200, bytes_in: 1, bytes_out: 2, at_ms: 1_767_225_601_000 }
    }

    fn drained(states: &KeyStates<FakeRelativeClock>) -> u64 {
        states.drain("n", NOW, NOW).iter().map(|record| record.requests).sum()
    }

    #[test]
    fn a_keyed_request_uses_one_entry_for_all_three_parts() {
        let (states, _) = states();
        let key = KeyRecord::builder("k").build();
        let (verdict, slot) =
            states.check_limits(&key, Some(&rate(2, LimitScope::Key)), Some(&daily(5, LimitScope::Key)), NOW);
        assert_eq!(verdict.map(|info| info.map(|info| info.remaining)), Ok(Some(1)));
        slot.record(None, &allowed());
        assert_eq!(states.len(), 1);
        assert_eq!(states.used("k", QuotaPeriod::Day, NOW), 1);
        assert_eq!(drained(&states), 1);
    }

    #[test]
    fn limits_by_owner_draw_from_the_owners_entry_and_usage_stays_per_key() {
        let (states, _) = states();
        let a = KeyRecord::builder("a").owner(Some("acme".into())).build();
        let b = KeyRecord::builder("b").owner(Some("acme".into())).build();
        let (limit, quota) = (rate(10, LimitScope::Owner), daily(3, LimitScope::Key));
        for key in [&a, &b, &a] {
            let (verdict, slot) = states.check_limits(key, Some(&limit), Some(&quota), NOW);
            assert!(verdict.is_ok());
            slot.record(key.owner(), &allowed());
        }
        assert_eq!(states.len(), 3, "a, b and acme's budget");
        assert_eq!((states.used("a", QuotaPeriod::Day, NOW), states.used("b", QuotaPeriod::Day, NOW)), (2, 1));
        let mut records = states.drain("n", NOW, NOW);
        records.sort_by(|x, y| x.key_id.cmp(&y.key_id));
        let counted: Vec<_> = records.iter().map(|r| (r.key_id.as_str(), r.requests)).collect();
        assert_eq!(counted, [("a", 2), ("b", 1)], "the owner's budget counts no usage");
        let (verdict, _) = states.check_limits(&a, Some(&rate(3, LimitScope::Owner)), None, NOW);
        assert!(matches!(verdict, Err(Refusal::Rate(_))), "3 of acme's 3 are spent");
    }

    #[test]
    fn a_rate_limited_request_spends_no_quota() {
        let (states, _) = states();
        let key = KeyRecord::builder("k").build();
        let (limit, quota) = (rate(1, LimitScope::Key), daily(5, LimitScope::Key));
        assert!(states.check_limits(&key, Some(&limit), Some(&quota), NOW).0.is_ok());
        assert!(matches!(states.check_limits(&key, Some(&limit), Some(&quota), NOW).0, Err(Refusal::Rate(_))));
        assert_eq!(states.used("k", QuotaPeriod::Day, NOW), 1);
    }

    #[test]
    fn an_entry_is_kept_while_any_part_holds_something() {
        let (states, clock) = states();
        let key = KeyRecord::builder("k").build();
        let (verdict, slot) = states.check_limits(&key, Some(&rate(1, LimitScope::Key)), None, NOW);
        assert!(verdict.is_ok());
        slot.record(None, &allowed());
        drop(slot);
        assert_eq!(drained(&states), 1);
        assert_eq!(drained(&states), 0);
        assert_eq!(states.len(), 1, "usage idle a window, but the rate budget is not full yet");
        clock.advance(Duration::from_secs(1));
        assert_eq!(states.evict_idle(NOW), 1, "every part idle");

        // A quota counting today keeps the entry; one of a finished day does not.
        assert!(states.try_consume("q", &daily(5, LimitScope::Key), NOW).is_ok());
        assert_eq!(states.evict_idle(NOW), 0);
        assert_eq!(states.evict_idle(datetime!(2026-03-11 00:00:01 UTC)), 1);

        // Counted but not drained, or counted since the last drain: kept.
        states.record("u", None, &allowed());
        assert_eq!(states.evict_idle(NOW), 0);
        assert_eq!(drained(&states), 1);
        states.record("u", None, &allowed());
        assert_eq!(states.evict_idle(NOW), 0);
        assert_eq!(drained(&states), 1);
        assert_eq!(states.evict_idle(NOW), 1, "drained, and nothing counted since");
    }

    #[test]
    fn unsynced_counts_keep_an_entry_until_the_fleet_sync_takes_them() {
        let clock = FakeRelativeClock::default();
        let states = KeyStates { fleet: true, ..KeyStates::with_clock(clock.clone()) };
        assert!(states.check_rate("r", &rate(1, LimitScope::Key)).is_ok());
        assert!(states.try_consume("q", &daily(5, LimitScope::Key), NOW).is_ok());
        clock.advance(Duration::from_secs(5));
        let tomorrow = datetime!(2026-03-11 00:00:01 UTC);
        assert_eq!(states.evict_idle(tomorrow), 0, "both hold requests the fleet has not had");
        states.take_rate_unsynced(|_, _, _| {});
        assert_eq!(states.take_quota_unsynced().len(), 1);
        assert_eq!(states.evict_idle(tomorrow), 2);
    }

    #[test]
    fn a_part_idle_in_a_kept_entry_is_reset_as_a_new_one_would_be() {
        let clock = FakeRelativeClock::default();
        let states = KeyStates { fleet: true, ..KeyStates::with_clock(clock.clone()) };
        assert!(states.check_rate("k", &rate(1, LimitScope::Key)).is_ok());
        assert!(states.try_consume("k", &daily(5, LimitScope::Key), NOW).is_ok());
        clock.advance(Duration::from_secs(1));
        states.take_rate_unsynced(|_, _, _| {});
        let _ = states.take_quota_unsynced();
        assert_eq!(states.evict_idle(NOW), 0, "the quota counts today");
        let mut listed = 0;
        states.take_rate_unsynced(|_, _, _| listed += 1);
        assert_eq!(listed, 0, "a full rate budget is no longer synced");
        assert_eq!(states.used("k", QuotaPeriod::Day, NOW), 1);
    }

    #[test]
    fn the_owner_is_taken_again_after_an_idle_window_in_a_kept_entry() {
        let (states, _) = states();
        assert!(states.try_consume("k", &daily(5, LimitScope::Key), NOW).is_ok());
        states.record("k", Some("acme"), &allowed());
        states.record("k", Some("bolt"), &allowed());
        assert_eq!(states.drain("n", NOW, NOW)[0].owner_at_count, Some(Some("acme".to_owned())));
        assert!(states.drain("n", NOW, NOW).is_empty());
        assert_eq!(states.len(), 1, "kept for the quota");
        states.record("k", Some("bolt"), &allowed());
        assert_eq!(states.drain("n", NOW, NOW)[0].owner_at_count, Some(Some("bolt".to_owned())));
    }

    #[test]
    fn a_slot_held_by_a_request_keeps_its_entry_across_drains_and_evictions() {
        let (states, _) = states();
        let slot = states.usage_slot("k");
        for _ in 0..3 {
            assert_eq!(drained(&states), 0);
            assert_eq!(states.evict_idle(NOW), 0);
        }
        slot.record(None, &allowed());
        drop(slot);
        assert_eq!(drained(&states), 1, "counted into the entry the map still holds");
        assert_eq!(drained(&states), 0);
        assert_eq!(states.len(), 0);
    }

    #[test]
    fn requests_counted_while_drains_and_evictions_remove_entries_are_never_lost() {
        let states = Arc::new(KeyStates::new());
        let key = |i: usize| KeyRecord::builder(format!("k{}", i % 5)).build();
        let limit =
            RateLimitConfig { requests: u32::MAX, per: Duration::from_secs(1), burst: None, by: LimitScope::Key };
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let states = Arc::clone(&states);
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        let (verdict, slot) = states.check_limits(&key(t + i), Some(&limit), None, NOW);
                        assert!(verdict.is_ok());
                        // Some requests finish while a drain runs between decision and count.
                        if i % 3 == 0 {
                            std::thread::yield_now();
                        }
                        slot.record(None, &allowed());
                    }
                })
            })
            .collect();
        let mut total = 0;
        while threads.iter().any(|t| !t.is_finished()) {
            total += states.drain("n", NOW, NOW).iter().map(|r| r.requests).sum::<u64>();
            states.evict_idle(NOW);
        }
        for thread in threads {
            thread.join().expect("no panic");
        }
        total += states.drain("n", NOW, NOW).iter().map(|r| r.requests).sum::<u64>();
        assert_eq!(total, 80_000);
    }
}

#[cfg(test)]
mod usage_tests {
    use super::*;
    use crate::outcome::Denial;
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
