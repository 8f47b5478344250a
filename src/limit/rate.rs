//! Rate limits: GCRA (the algorithm governor implements), one state word per budget.
//!
//! A budget's whole state is its theoretical arrival time (TAT): the budget is
//! full once the TAT is in the past, and a request is let through unless the TAT
//! is more than the burst's span ahead of now. Keeping only that word, rather
//! than a limiter bound to one limit, lets keys with different limits share an
//! owner's budget (each request is judged by its own key's limit), lets a changed
//! limit apply to the budget as it stands (no reset), and lets requests allowed
//! by other gateways be folded in (`absorb`) for fleet limits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, Reference};

use super::KeyStates;
use crate::config::{RateLimitConfig, MAX_RATE_WINDOW};

/// What the `RateLimit-*` response headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// Requests the key may make in one burst.
    pub limit: u32,
    pub remaining: u32,
    /// Until the whole burst is available again.
    pub reset: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub info: RateInfo,
    /// Until the next request would be let through.
    pub retry_after: Duration,
}

/// One budget's rate state. All zero is a full budget no limit has drawn from,
/// which is also what an idle one is reset to.
#[derive(Default)]
pub(crate) struct RateState {
    /// Theoretical arrival time, nanoseconds since the clock's origin.
    tat: AtomicU64,
    /// Emission interval (nanoseconds) of the limit last applied: what one request
    /// allowed elsewhere costs when it is folded in. 0 until a limit draws from
    /// the budget, which is how the fleet sync tells budgets from the other entries.
    interval: AtomicU64,
    /// Requests allowed here that the fleet sync has not taken yet.
    unsynced: AtomicU64,
}

/// The limiters' time: nanoseconds since an origin, which is also known as a Unix
/// time because TATs shared with other gateways are wall-clock times.
pub(crate) struct RateClock<C: Clock> {
    clock: C,
    origin: C::Instant,
    /// Unix time of `origin` in milliseconds.
    origin_unix_ms: u64,
}

impl<C: Clock> RateClock<C> {
    pub(crate) fn new(clock: C) -> Self {
        let origin = clock.now();
        let origin_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        RateClock { clock, origin, origin_unix_ms }
    }

    pub(crate) fn now(&self) -> u64 {
        let elapsed: Duration = self.clock.now().duration_since(self.origin).into();
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A limit in GCRA terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gcra {
    /// Nanoseconds one request costs.
    interval: u64,
    /// Requests allowed at once.
    burst: u32,
    /// How far ahead of now the TAT may be for a request to pass: the span of
    /// the burst beyond its first request.
    tolerance: u64,
}

impl Gcra {
    /// `requests` per `per`, in bursts of up to `burst` (default: `requests`). A
    /// limit that `check_rate_limit` refuses (stored before validation refused
    /// it) is clamped to the nearest one that can be kept; its headers then
    /// report the clamped burst, which is what is enforced. None for a zero rate
    /// or burst, which validation refuses.
    fn of(config: &RateLimitConfig) -> Option<Gcra> {
        let requests = std::num::NonZeroU32::new(config.requests)?;
        let interval = (config.per / requests.get()).clamp(Duration::from_nanos(1), MAX_RATE_WINDOW);
        let interval = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
        let longest = u32::try_from(MAX_RATE_WINDOW.as_nanos() / u128::from(interval)).unwrap_or(u32::MAX);
        let burst = config.burst.unwrap_or(config.requests).min(longest);
        if burst == 0 {
            return None;
        }
        Some(Gcra { interval, burst, tolerance: interval.saturating_mul(u64::from(burst - 1)) })
    }
}

/// `tat` with the requests it is ahead of `now` repriced from `from` to `to` nanoseconds each.
fn reprice(tat: u64, now: u64, from: u64, to: u64) -> u64 {
    if tat <= now || from == 0 {
        return tat;
    }
    let owed = u128::from(tat - now) * u128::from(to) / u128::from(from);
    now.saturating_add(u64::try_from(owed).unwrap_or(u64::MAX))
}

impl RateState {
    /// Takes one request under the limit `config`; `fleet`: count it for the fleet sync.
    pub(crate) fn check(&self, config: &RateLimitConfig, now: u64, fleet: bool) -> Result<RateInfo, RateLimited> {
        let Some(gcra) = Gcra::of(config) else {
            return Ok(RateInfo { limit: u32::MAX, remaining: u32::MAX, reset: Duration::ZERO });
        };
        self.check_gcra(gcra, now, fleet)
    }

    /// Full again (the TAT has passed) and holding nothing the fleet sync has yet to
    /// take: a new state behaves exactly the same.
    pub(crate) fn is_idle(&self, now: u64) -> bool {
        self.tat.load(Ordering::Acquire) <= now && self.unsynced.load(Ordering::Relaxed) == 0
    }

    fn is_held(&self) -> bool {
        self.interval.load(Ordering::Relaxed) != 0
    }

    fn check_gcra(&self, gcra: Gcra, now: u64, fleet: bool) -> Result<RateInfo, RateLimited> {
        let applied = self.interval.load(Ordering::Relaxed);
        // A budget counts requests, not time: under a different limit (changed, or
        // another key of the same owner) the requests it still owes keep their number.
        // Only the thread that switches the interval converts the TAT, so it is converted once.
        if applied != gcra.interval
            && self.interval.compare_exchange(applied, gcra.interval, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            let _ = self.tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(reprice(tat, now, applied, gcra.interval))
            });
        }
        let limit = gcra.burst;
        let interval = Duration::from_nanos(gcra.interval);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let earliest = tat.saturating_sub(gcra.tolerance);
            if now < earliest {
                let retry_after = Duration::from_nanos(earliest - now);
                let reset = retry_after.saturating_add(Duration::from_nanos(gcra.tolerance));
                return Err(RateLimited { info: RateInfo { limit, remaining: 0, reset }, retry_after });
            }
            let next = tat.max(now).saturating_add(gcra.interval);
            match self.tat.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if fleet {
                        self.unsynced.fetch_add(1, Ordering::Relaxed);
                    }
                    let span = gcra.tolerance.saturating_add(gcra.interval);
                    let left = now.saturating_add(span).saturating_sub(next).min(span);
                    let remaining = u32::try_from(left / gcra.interval).unwrap_or(u32::MAX);
                    let reset = interval.saturating_mul(limit.saturating_sub(remaining));
                    return Ok(RateInfo { limit, remaining, reset });
                }
                Err(actual) => tat = actual,
            }
        }
    }
}

impl<C: Clock + Clone> KeyStates<C> {
    /// Takes one request from `budget` under the limit `config`.
    pub fn check_rate(&self, budget: &str, config: &RateLimitConfig) -> Result<RateInfo, RateLimited> {
        let now = self.rate_clock.now();
        self.state(budget).rate.check(config, now, self.fleet)
    }

    /// Calls `each` with every budget a rate limit draws from, the requests allowed in it since the last
    /// call (which starts them from zero again; budgets with none get 0), and its
    /// TAT as a Unix time in milliseconds while that is in the future.
    pub fn take_rate_unsynced(&self, mut each: impl FnMut(&str, u64, Option<u64>)) {
        let now = self.rate_clock.now();
        for entry in self.map.iter().filter(|entry| entry.rate.is_held()) {
            let rate = &entry.rate;
            let tat = rate.tat.load(Ordering::Acquire);
            let tat_unix_ms = (tat > now).then(|| self.rate_clock.origin_unix_ms.saturating_add(tat / 1_000_000));
            each(entry.key(), rate.unsynced.swap(0, Ordering::Relaxed), tat_unix_ms);
        }
    }

    /// Takes on the fleet's TAT for `budget` (a Unix time in milliseconds, the
    /// latest any gateway has reported), plus the cost of `own` requests allowed
    /// here that it cannot hold yet, where that is later than this one's: how a
    /// gateway that has just started drawing from a budget learns what the others
    /// have spent of it.
    pub fn adopt_tat(&self, budget: &str, tat_unix_ms: u64, own: u64) {
        let Some(state) = self.map.get(budget).filter(|state| state.rate.is_held()) else { return };
        let state = &state.rate;
        let fleet = tat_unix_ms.saturating_sub(self.rate_clock.origin_unix_ms).saturating_mul(1_000_000);
        let cost = own.saturating_mul(state.interval.load(Ordering::Relaxed));
        state.tat.fetch_max(fleet.max(self.rate_clock.now()).saturating_add(cost), Ordering::AcqRel);
    }

    /// Folds in `requests` that other gateways allowed from `budget` over the last
    /// `over`: its TAT moves on by their cost, as if they had arrived here from
    /// the start of that span. A budget not held here is left alone.
    pub fn absorb(&self, budget: &str, requests: u64, over: Duration) {
        if requests == 0 {
            return;
        }
        let Some(state) = self.map.get(budget).filter(|state| state.rate.is_held()) else { return };
        let state = &state.rate;
        let since = self.rate_clock.now().saturating_sub(u64::try_from(over.as_nanos()).unwrap_or(u64::MAX));
        let cost = requests.saturating_mul(state.interval.load(Ordering::Relaxed));
        let _ = state
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| Some(tat.max(since).saturating_add(cost)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::retry_after_secs;
    use super::*;
    use crate::config::LimitScope;
    use governor::clock::FakeRelativeClock;

    fn limit(requests: u32, per_ms: u64, burst: Option<u32>) -> RateLimitConfig {
        RateLimitConfig { requests, per: Duration::from_millis(per_ms), burst, by: LimitScope::Key }
    }

    fn limiters() -> (KeyStates<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (KeyStates::with_clock(clock.clone()), clock)
    }

    #[test]
    fn burst_is_the_number_of_requests_allowed_at_once() {
        let (limiters, _) = limiters();
        let config = limit(10, 1000, Some(20));
        for i in 0..20 {
            let info = limiters.check_rate("k", &config).unwrap_or_else(|_| panic!("request {i} limited"));
            assert_eq!(info.limit, 20);
            assert_eq!(info.remaining, 19 - i);
        }
        let limited = limiters.check_rate("k", &config).unwrap_err();
        assert_eq!(limited.info.remaining, 0);
        assert_eq!(limited.retry_after, Duration::from_millis(100));
    }

    #[test]
    fn without_burst_the_limit_is_the_request_count() {
        let (limiters, _) = limiters();
        let config = limit(3, 1000, None);
        for _ in 0..3 {
            assert!(limiters.check_rate("k", &config).is_ok());
        }
        let limited = limiters.check_rate("k", &config).unwrap_err();
        assert_eq!(limited.info.limit, 3);
        assert_eq!(limited.retry_after, Duration::from_nanos(333_333_333));
        assert_eq!(retry_after_secs(limited.retry_after), 1);
    }

    #[test]
    fn budget_refills_one_request_per_interval() {
        let (limiters, clock) = limiters();
        let config = limit(2, 1000, None);
        assert!(limiters.check_rate("k", &config).is_ok());
        assert!(limiters.check_rate("k", &config).is_ok());
        assert!(limiters.check_rate("k", &config).is_err());
        clock.advance(Duration::from_millis(499));
        assert!(limiters.check_rate("k", &config).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(limiters.check_rate("k", &config).is_ok());
        assert!(limiters.check_rate("k", &config).is_err());
    }

    #[test]
    fn reset_is_the_time_until_the_whole_burst_is_back() {
        let (limiters, clock) = limiters();
        let config = limit(4, 1000, None);
        let first = limiters.check_rate("k", &config).unwrap();
        assert_eq!((first.remaining, first.reset), (3, Duration::from_millis(250)));
        let second = limiters.check_rate("k", &config).unwrap();
        assert_eq!((second.remaining, second.reset), (2, Duration::from_millis(500)));
        clock.advance(Duration::from_millis(500));
        let third = limiters.check_rate("k", &config).unwrap();
        assert_eq!((third.remaining, third.reset), (3, Duration::from_millis(250)));
    }

    #[test]
    fn keys_have_separate_budgets() {
        let (limiters, _) = limiters();
        let config = limit(1, 1000, None);
        assert!(limiters.check_rate("a", &config).is_ok());
        assert!(limiters.check_rate("a", &config).is_err());
        assert!(limiters.check_rate("b", &config).is_ok());
    }

    #[test]
    fn a_changed_limit_takes_effect_at_once() {
        let (limiters, _) = limiters();
        assert!(limiters.check_rate("k", &limit(1, 1000, None)).is_ok());
        assert!(limiters.check_rate("k", &limit(1, 1000, None)).is_err());
        // The one request made counts against the new limit: four of five are left.
        for left in (0..4).rev() {
            assert_eq!(limiters.check_rate("k", &limit(5, 1000, None)).map(|info| info.remaining), Ok(left));
        }
        assert!(limiters.check_rate("k", &limit(5, 1000, None)).is_err());
    }

    #[test]
    fn keys_with_different_limits_sharing_a_budget_cannot_reset_it() {
        let (limiters, _) = limiters();
        let (small, large) = (limit(2, 1000, None), limit(4, 1000, None));
        // Alternating limits spends one budget: 4 requests in all, not 2 + 4.
        let allowed = (0..10)
            .filter(|i| limiters.check_rate("owner acme", if i % 2 == 0 { &small } else { &large }).is_ok())
            .count();
        assert_eq!(allowed, 4, "the large limit's 4, the small one refusing once 2 are spent");
    }

    #[test]
    fn requests_allowed_elsewhere_are_folded_in() {
        let (limiters, clock) = limiters();
        let config = limit(10, 1000, None);
        assert!(limiters.check_rate("k", &config).is_ok());
        limiters.absorb("k", 8, Duration::ZERO);
        assert!(limiters.check_rate("k", &config).is_ok(), "1 + 8 + 1 = 10");
        let limited = limiters.check_rate("k", &config).unwrap_err();
        assert_eq!(limited.retry_after, Duration::from_millis(100));
        clock.advance(Duration::from_secs(1));
        // Requests spread over the last second cost from its start: a full budget stays full.
        limiters.absorb("k", 5, Duration::from_secs(1));
        assert_eq!(limiters.check_rate("k", &config).map(|info| info.remaining), Ok(4));
        limiters.absorb("unknown", 5, Duration::ZERO);
        assert_eq!(limiters.len(), 1, "absorbing creates no budget");
    }

    #[test]
    fn unsynced_requests_are_counted_only_for_a_fleet_and_taken_once() {
        let fleet = KeyStates::for_fleet();
        let config = limit(3, 1000, None);
        for _ in 0..5 {
            let _ = fleet.check_rate("k", &config);
        }
        let mut taken = Vec::new();
        fleet.take_rate_unsynced(|budget, n, tat| taken.push((budget.to_owned(), n, tat.is_some())));
        assert_eq!(taken, [("k".to_owned(), 3, true)], "refused requests are not counted");
        fleet.take_rate_unsynced(|_, n, _| assert_eq!(n, 0));
        let local = KeyStates::new();
        let _ = local.check_rate("k", &config);
        local.take_rate_unsynced(|_, n, _| assert_eq!(n, 0));
    }

    #[test]
    fn a_later_fleet_tat_is_adopted_and_an_earlier_one_ignored() {
        let (limiters, _) = limiters();
        let config = limit(10, 1000, None);
        assert!(limiters.check_rate("k", &config).is_ok());
        let mut tat = None;
        limiters.take_rate_unsynced(|_, _, t| tat = t);
        let tat = tat.expect("a budget just drawn from has a future TAT");
        limiters.adopt_tat("k", tat.saturating_sub(5_000), 0);
        assert_eq!(limiters.check_rate("k", &config).map(|info| info.remaining), Ok(8));
        // Other gateways have spent 8 of the 10, and this one 2 they do not know of yet.
        limiters.adopt_tat("k", tat + 700, 2);
        assert!(limiters.check_rate("k", &config).is_err());
    }

    #[test]
    fn a_stored_limit_beyond_what_the_limiter_keeps_is_enforced_as_reported() {
        // Accepted before validation bounded it: a burst of 2^32 - 1 minutes.
        let (limiters, _) = limiters();
        let config = limit(1, 60_000, Some(u32::MAX));
        let first = limiters.check_rate("k", &config).expect("the first request passes");
        assert!(first.limit < u32::MAX, "RateLimit-Limit {} is not what is enforced", first.limit);
        assert_eq!(first.remaining, first.limit - 1);
        let second = limiters.check_rate("k", &config).expect("the burst allows a second request");
        assert_eq!(second.remaining, first.limit - 2);
        // A period too long to keep at all is enforced as the longest that can be.
        let config = limit(1, u64::MAX / 2, None);
        let only = limiters.check_rate("long", &config).expect("the first request passes");
        assert_eq!((only.limit, only.remaining), (1, 0));
        assert!(limiters.check_rate("long", &config).is_err());
    }

    #[test]
    fn only_limiters_idle_until_full_are_evicted() {
        let (limiters, clock) = limiters();
        let config = limit(1, 1000, Some(2));
        assert!(limiters.check_rate("busy", &config).is_ok());
        assert!(limiters.check_rate("idle", &config).is_ok());
        clock.advance(Duration::from_millis(1500));
        assert!(limiters.check_rate("busy", &config).is_ok());
        clock.advance(Duration::from_millis(600));
        // "idle" was full again 1.1 s ago; "busy" is full only in 0.4 s.
        assert_eq!(limiters.evict_idle(time::OffsetDateTime::now_utc()), 1);
        assert_eq!(limiters.len(), 1);
        assert!(limiters.check_rate("busy", &config).is_ok());
    }
}
