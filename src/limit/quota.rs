//! Quotas: requests per UTC calendar day or month, counted per budget (a key id,
//! or an owner's budget for `by: owner`).
//!
//! A key's period and count share one atomic word (period in the high 24 bits,
//! count in the low 40), so rolling into a new period and counting are one
//! compare-and-swap with no lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{KeyState, KeyStates};
use crate::index::KeyId;
use arc_swap::ArcSwap;
use governor::clock::Clock;
use time::{Date, Month, OffsetDateTime, Time};

use crate::config::{QuotaConfig, QuotaPeriod, MAX_QUOTA_REQUESTS};

const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

// The count's share of the word is what the config layer lets a quota ask for.
const _: () = assert!(COUNT_MASK == MAX_QUOTA_REQUESTS);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExceeded {
    /// Until the period ends.
    pub retry_after: Duration,
}

/// Requests already used in a period, as counted elsewhere: before a restart, or
/// by other gateways (from the store's usage).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UsedElsewhere {
    /// Period indices (see `period_index`) the maps below belong to. The maps are
    /// keyed by budget id (see `budget_id`).
    pub day: u64,
    pub month: u64,
    pub by_day: HashMap<String, u64>,
    pub by_month: HashMap<String, u64>,
}

/// One budget's quota state. All zero is a quota no request has counted in,
/// which is also what an idle one is reset to.
#[derive(Default)]
pub(crate) struct QuotaState {
    /// Period index in the high bits, count in the low `COUNT_BITS`; 0 until a
    /// quota counts in the budget, which then starts from the budget's floor.
    word: AtomicU64,
    /// Whether the period is a month (else a day): names the budget's fleet counter.
    monthly: AtomicBool,
    /// Requests counted here that the fleet sync has not taken yet.
    unsynced: AtomicU64,
}

impl QuotaState {
    /// Counting in a period that is over (neither `day` nor `month`, the current
    /// indices) and holding nothing the fleet sync has yet to take. A live
    /// counter's index equals one of them; a stale one could only match by a
    /// coincidence of decades and would merely linger.
    pub(crate) fn is_idle(&self, day: u64, month: u64) -> bool {
        let index = self.word.load(Ordering::Relaxed) >> COUNT_BITS;
        index != day && index != month && self.unsynced.load(Ordering::Relaxed) == 0
    }

    fn is_held(&self) -> bool {
        self.word.load(Ordering::Relaxed) != 0
    }
}

/// Requests a fleet sync took from one budget ([`KeyStates::take_quota_unsynced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaDelta {
    pub budget: KeyId,
    pub per: QuotaPeriod,
    /// The period they were counted in (see `period_index`).
    pub period: u64,
    pub requests: u64,
}

/// What all quota counters share: the usage counted elsewhere, and the latest
/// periods seen.
#[derive(Default)]
pub(crate) struct QuotaPeriods {
    floors: ArcSwap<UsedElsewhere>,
    /// The latest day and month index seen, so that a clock stepped back does not
    /// reopen a period that has ended (see `current`).
    latest_day: AtomicU64,
    latest_month: AtomicU64,
}

/// The period `now` falls in, numbered so that consecutive periods differ by one.
fn period_index(period: QuotaPeriod, now: OffsetDateTime) -> u64 {
    let index = match period {
        QuotaPeriod::Day => now.unix_timestamp().div_euclid(86_400),
        QuotaPeriod::Month => i64::from(now.year()) * 12 + i64::from(u8::from(now.month())) - 1,
    };
    // Both indices are far below 2^24 for any date `time` can represent here.
    (index.max(0) as u64) & ((1 << (64 - COUNT_BITS)) - 1)
}

/// When the period containing `now` began.
pub fn period_start(period: QuotaPeriod, now: OffsetDateTime) -> OffsetDateTime {
    let midnight = now.replace_time(Time::MIDNIGHT);
    match period {
        QuotaPeriod::Day => midnight,
        QuotaPeriod::Month => midnight.replace_day(1).unwrap_or(midnight),
    }
}

/// When the period containing `now` ends.
pub fn period_end(period: QuotaPeriod, now: OffsetDateTime) -> OffsetDateTime {
    let midnight = now.replace_time(Time::MIDNIGHT);
    match period {
        QuotaPeriod::Day => midnight + time::Duration::DAY,
        QuotaPeriod::Month => {
            let (year, month) = match now.month() {
                Month::December => (now.year() + 1, Month::January),
                month => (now.year(), month.next()),
            };
            Date::from_calendar_date(year, month, 1)
                .map(|date| date.midnight().assume_utc())
                .unwrap_or(midnight + time::Duration::DAY)
        }
    }
}

impl QuotaPeriods {
    /// The period that `now` counts in: the clock's, unless the clock has stepped
    /// back (NTP) from the latest period seen into the one before it. That one has
    /// ended, and counting in it again would hand every key a second budget; so
    /// the latest stays current until the clock catches up. A step back further
    /// than one period is the clock being set, not adjusted, and is followed.
    pub(crate) fn current(&self, per: QuotaPeriod, now: OffsetDateTime) -> u64 {
        let index = period_index(per, now);
        let latest = match per {
            QuotaPeriod::Day => &self.latest_day,
            QuotaPeriod::Month => &self.latest_month,
        };
        let seen = latest.load(Ordering::Relaxed);
        if index + 1 == seen {
            return seen;
        }
        if index != seen {
            if index > seen {
                latest.fetch_max(index, Ordering::Relaxed);
            } else {
                latest.store(index, Ordering::Relaxed);
            }
        }
        index
    }

    /// What is known to be used already of `period`, for a counter starting now.
    fn floor(&self, budget: &str, per: QuotaPeriod, period: u64) -> u64 {
        let floors = self.floors.load();
        let (index, map) = match per {
            QuotaPeriod::Day => (floors.day, &floors.by_day),
            QuotaPeriod::Month => (floors.month, &floors.by_month),
        };
        if index == period {
            map.get(budget).copied().unwrap_or(0).min(COUNT_MASK)
        } else {
            0
        }
    }
}

/// The day and month indices of `now`, to label seeds.
pub fn periods(now: OffsetDateTime) -> (u64, u64) {
    (period_index(QuotaPeriod::Day, now), period_index(QuotaPeriod::Month, now))
}

impl<C: Clock> KeyStates<C> {
    /// Counts one request unless `budget` has used its quota for this period.
    /// Returns how many requests are left after this one.
    pub fn try_consume(&self, budget: &str, quota: &QuotaConfig, now: OffsetDateTime) -> Result<u64, QuotaExceeded> {
        self.consume(budget, &self.state(budget), quota, now)
    }

    /// [`KeyStates::try_consume`] on `budget`'s entry, already looked up.
    pub(crate) fn consume(
        &self,
        budget: &str,
        state: &KeyState,
        quota: &QuotaConfig,
        now: OffsetDateTime,
    ) -> Result<u64, QuotaExceeded> {
        let counter = &state.quota;
        let period = self.periods.current(quota.per, now);
        // Validation refuses larger quotas; one stored before it did is clamped to what can be counted.
        let limit = quota.requests.min(MAX_QUOTA_REQUESTS);
        let monthly = quota.per == QuotaPeriod::Month;
        // Names the fleet counter; set before counting, so that no sync sees a count without it.
        if counter.monthly.load(Ordering::Relaxed) != monthly {
            counter.monthly.store(monthly, Ordering::Relaxed);
        }
        let mut current = counter.word.load(Ordering::Relaxed);
        let left = loop {
            let used = match current {
                // A counter's first request: it starts from what is known to be used elsewhere.
                0 => self.periods.floor(budget, quota.per, period),
                _ if current >> COUNT_BITS == period => current & COUNT_MASK,
                _ => 0,
            };
            if used >= limit {
                if current == 0 {
                    // Refused at its first request: it holds its floor, as a new counter did.
                    let _ = counter.word.compare_exchange(
                        0,
                        (period << COUNT_BITS) | used,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
                let mut end = period_end(quota.per, now);
                if period != period_index(quota.per, now) {
                    // The clock is behind the period counted in: wait for that period's end.
                    end = period_end(quota.per, end);
                }
                let retry_after = (end - now).try_into().unwrap_or(Duration::from_secs(1));
                return Err(QuotaExceeded { retry_after });
            }
            let next = (period << COUNT_BITS) | (used + 1).min(COUNT_MASK);
            match counter.word.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break limit - used - 1,
                Err(actual) => current = actual,
            }
        };
        if self.fleet {
            counter.unsynced.fetch_add(1, Ordering::Relaxed);
        }
        Ok(left)
    }

    /// Every budget's requests counted since the last call, which starts them from
    /// zero again; budgets with none are listed too (with 0), so that a sync also
    /// learns what the rest of the fleet used of them.
    pub fn take_quota_unsynced(&self) -> Vec<QuotaDelta> {
        self.map
            .iter()
            .filter(|entry| entry.quota.is_held())
            .map(|entry| {
                let counter = &entry.quota;
                let per = if counter.monthly.load(Ordering::Relaxed) { QuotaPeriod::Month } else { QuotaPeriod::Day };
                QuotaDelta {
                    budget: entry.key().clone(),
                    per,
                    period: counter.word.load(Ordering::Acquire) >> COUNT_BITS,
                    requests: counter.unsynced.swap(0, Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Gives back requests a sync took but could not deliver, for the next one.
    pub fn return_unsynced(&self, budget: &str, requests: u64) {
        if let Some(state) = self.map.get(budget) {
            state.quota.unsynced.fetch_add(requests, Ordering::Relaxed);
        }
    }

    /// The fleet counted `fleet_total` requests (this node's delivered ones among
    /// them) for `budget` in `period`: with what this node counted since, that is a
    /// floor for its count. A floor, not an addition, so it never counts a request
    /// twice, whichever of this and the store's usage (`seed`) came first.
    pub fn raise_to_fleet(&self, budget: &str, period: u64, fleet_total: u64) {
        let Some(state) = self.map.get(budget) else { return };
        let counter = &state.quota;
        let floor = fleet_total.saturating_add(counter.unsynced.load(Ordering::Relaxed)).min(COUNT_MASK);
        let _ = counter.word.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |current| {
            (current >> COUNT_BITS == period && current & COUNT_MASK < floor).then_some((period << COUNT_BITS) | floor)
        });
    }

    /// Takes in usage counted elsewhere: counters of the same period never fall
    /// below it, and counters started later start from it.
    pub fn seed(&self, used: UsedElsewhere) {
        for (index, map) in [(used.day, &used.by_day), (used.month, &used.by_month)] {
            for (budget, &n) in map {
                if let Some(state) = self.map.get(budget.as_str()) {
                    let _ = state.quota.word.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |current| {
                        (current >> COUNT_BITS == index && current & COUNT_MASK < n)
                            .then_some((index << COUNT_BITS) | n.min(COUNT_MASK))
                    });
                }
            }
        }
        self.periods.floors.store(Arc::new(used));
    }

    /// Requests counted for `budget` in the period containing `now`.
    pub fn used(&self, budget: &str, period: QuotaPeriod, now: OffsetDateTime) -> u64 {
        let current = self.periods.current(period, now);
        self.map.get(budget).map_or(0, |state| {
            let value = state.quota.word.load(Ordering::Relaxed);
            if value >> COUNT_BITS == current {
                value & COUNT_MASK
            } else {
                0
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitScope;
    use time::macros::datetime;

    fn daily(requests: u64) -> QuotaConfig {
        QuotaConfig { requests, per: QuotaPeriod::Day, by: LimitScope::Key }
    }

    fn monthly(requests: u64) -> QuotaConfig {
        QuotaConfig { requests, per: QuotaPeriod::Month, by: LimitScope::Key }
    }

    #[test]
    fn quota_allows_exactly_its_requests_per_period() {
        let counters = KeyStates::new();
        let now = datetime!(2026-03-10 12:00 UTC);
        assert_eq!(counters.try_consume("k", &daily(3), now), Ok(2));
        assert_eq!(counters.try_consume("k", &daily(3), now), Ok(1));
        assert_eq!(counters.try_consume("k", &daily(3), now), Ok(0));
        let exceeded = counters.try_consume("k", &daily(3), now).unwrap_err();
        assert_eq!(exceeded.retry_after, Duration::from_secs(12 * 3600));
        assert_eq!(counters.used("k", QuotaPeriod::Day, now), 3);
    }

    #[test]
    fn refused_requests_do_not_consume_quota() {
        let counters = KeyStates::new();
        let now = datetime!(2026-03-10 12:00 UTC);
        assert!(counters.try_consume("k", &daily(1), now).is_ok());
        for _ in 0..5 {
            assert!(counters.try_consume("k", &daily(1), now).is_err());
        }
        assert_eq!(counters.used("k", QuotaPeriod::Day, now), 1);
    }

    #[test]
    fn a_new_utc_day_resets_the_count() {
        let counters = KeyStates::new();
        assert!(counters.try_consume("k", &daily(1), datetime!(2026-03-10 23:59:59 UTC)).is_ok());
        assert!(counters.try_consume("k", &daily(1), datetime!(2026-03-10 23:59:59 UTC)).is_err());
        assert!(counters.try_consume("k", &daily(1), datetime!(2026-03-11 00:00 UTC)).is_ok());
    }

    #[test]
    fn monthly_quota_resets_on_the_first_of_the_month() {
        let counters = KeyStates::new();
        let late = datetime!(2026-12-31 18:00 UTC);
        assert!(counters.try_consume("k", &monthly(1), late).is_ok());
        let exceeded = counters.try_consume("k", &monthly(1), late).unwrap_err();
        assert_eq!(exceeded.retry_after, Duration::from_secs(6 * 3600));
        assert!(counters.try_consume("k", &monthly(1), datetime!(2027-01-01 00:00 UTC)).is_ok());
    }

    #[test]
    fn a_clock_stepping_back_over_midnight_keeps_the_current_period() {
        let counters = KeyStates::new();
        assert_eq!(counters.try_consume("k", &daily(2), datetime!(2026-03-11 00:00:05 UTC)), Ok(1));
        // NTP steps the clock back ten seconds, into yesterday.
        let stepped = datetime!(2026-03-10 23:59:55 UTC);
        assert_eq!(counters.try_consume("k", &daily(2), stepped), Ok(0));
        let exceeded = counters.try_consume("k", &daily(2), stepped).unwrap_err();
        assert_eq!(exceeded.retry_after, Duration::from_secs(86_405), "until the end of 2026-03-11");
        assert_eq!(counters.used("k", QuotaPeriod::Day, stepped), 2);
        assert_eq!(counters.evict_idle(stepped), 0);
        // A key first seen while the clock is behind counts in the same day.
        assert_eq!(counters.try_consume("fresh", &daily(1), stepped), Ok(0));
        // Back past midnight again: the day's counts were not lost.
        let later = datetime!(2026-03-11 00:00:06 UTC);
        assert!(counters.try_consume("k", &daily(2), later).is_err());
        assert!(counters.try_consume("fresh", &daily(1), later).is_err());
    }

    #[test]
    fn period_end_handles_month_lengths_and_year_end() {
        assert_eq!(period_end(QuotaPeriod::Month, datetime!(2028-02-29 10:00 UTC)), datetime!(2028-03-01 00:00 UTC));
        assert_eq!(period_end(QuotaPeriod::Month, datetime!(2026-12-01 00:00 UTC)), datetime!(2027-01-01 00:00 UTC));
        assert_eq!(period_end(QuotaPeriod::Day, datetime!(2026-12-31 00:00 UTC)), datetime!(2027-01-01 00:00 UTC));
    }

    #[test]
    fn usage_counted_elsewhere_is_a_floor_for_new_and_running_counters() {
        let counters = KeyStates::new();
        let now = datetime!(2026-03-10 12:00 UTC);
        let (day, month) = periods(now);
        assert!(counters.try_consume("running", &daily(10), now).is_ok());
        counters.seed(UsedElsewhere {
            day,
            month,
            by_day: [("running".to_owned(), 8), ("fresh".to_owned(), 9)].into(),
            by_month: [("monthly".to_owned(), 4)].into(),
        });
        assert_eq!(counters.used("running", QuotaPeriod::Day, now), 8);
        assert_eq!(counters.try_consume("fresh", &daily(10), now), Ok(0));
        assert!(counters.try_consume("fresh", &daily(10), now).is_err());
        assert_eq!(counters.try_consume("monthly", &monthly(5), now), Ok(0));
        // A seed never lowers a counter, and a stale seed does not apply to a new day.
        counters.seed(UsedElsewhere { day, month, by_day: [("running".to_owned(), 2)].into(), ..Default::default() });
        assert_eq!(counters.used("running", QuotaPeriod::Day, now), 8);
        let tomorrow = datetime!(2026-03-11 00:30 UTC);
        assert_eq!(counters.try_consume("other", &daily(10), tomorrow), Ok(9));
    }

    #[test]
    fn fleet_totals_are_floors_and_undelivered_requests_come_back() {
        let counters = KeyStates::for_fleet();
        let now = datetime!(2026-03-10 12:00 UTC);
        let (day, _) = periods(now);
        for _ in 0..3 {
            assert!(counters.try_consume("k", &daily(100), now).is_ok());
        }
        let taken = counters.take_quota_unsynced();
        assert_eq!(taken, [QuotaDelta { budget: "k".into(), per: QuotaPeriod::Day, period: day, requests: 3 }]);
        // Delivered: the fleet has these 3 and 10 from elsewhere; one more came in meanwhile.
        assert!(counters.try_consume("k", &daily(100), now).is_ok());
        counters.raise_to_fleet("k", day, 13);
        assert_eq!(counters.used("k", QuotaPeriod::Day, now), 14);
        // A lower or repeated total changes nothing: floors do not add up.
        counters.raise_to_fleet("k", day, 13);
        counters.raise_to_fleet("k", day - 1, 50);
        assert_eq!(counters.used("k", QuotaPeriod::Day, now), 14);
        // Not delivered: the requests wait for the next sync.
        let pending = counters.take_quota_unsynced()[0].requests;
        counters.return_unsynced("k", pending);
        assert_eq!(counters.take_quota_unsynced()[0].requests, 1);
        assert!(KeyStates::new().take_quota_unsynced().is_empty());
    }

    #[test]
    fn counters_of_finished_periods_are_evicted() {
        let counters = KeyStates::new();
        assert!(counters.try_consume("old", &daily(5), datetime!(2026-03-09 12:00 UTC)).is_ok());
        assert!(counters.try_consume("today", &daily(5), datetime!(2026-03-10 12:00 UTC)).is_ok());
        assert!(counters.try_consume("month", &monthly(5), datetime!(2026-03-01 12:00 UTC)).is_ok());
        assert_eq!(counters.evict_idle(datetime!(2026-03-10 13:00 UTC)), 1);
        assert_eq!(counters.len(), 2);
    }
}
