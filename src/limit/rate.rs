//! Rate limits: one GCRA limiter (governor) per key id.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::index::{KeyId, KeyIdMap};
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::Unenforceable;
use crate::config::RateLimitConfig;

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

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

struct KeyLimiter<C: Clock> {
    config: RateLimitConfig,
    quota: Quota,
    limiter: Limiter<C>,
    /// Clock reading (nanoseconds since the limiters were created) of the last check.
    last_used: AtomicU64,
}

pub struct RateLimiters<C: Clock = DefaultClock> {
    clock: C,
    origin: C::Instant,
    by_key: KeyIdMap<KeyLimiter<C>>,
}

impl RateLimiters<DefaultClock> {
    pub fn new() -> Self {
        RateLimiters::with_clock(DefaultClock::default())
    }
}

impl Default for RateLimiters<DefaultClock> {
    fn default() -> Self {
        Self::new()
    }
}

/// The longest a limit may take to refill its whole burst. governor keeps time in
/// u64 nanoseconds (584 years) from a limiter's creation and adds the burst's span
/// to it unchecked; a century leaves room for any uptime.
pub const MAX_RATE_WINDOW: Duration = Duration::from_secs(100 * super::SECONDS_PER_YEAR);

/// Whether the limiter can enforce `config` exactly as written.
pub fn check_rate_limit(config: &RateLimitConfig) -> Result<(), Unenforceable> {
    let Some(requests) = NonZeroU32::new(config.requests) else { return Ok(()) };
    let interval = config.per / requests.get();
    if interval.is_zero() {
        return Err(Unenforceable::RequestsTooFast);
    }
    let burst = config.burst.unwrap_or(config.requests);
    let window = interval.as_nanos() * u128::from(burst);
    if interval > MAX_RATE_WINDOW || (config.burst.is_none() && window > MAX_RATE_WINDOW.as_nanos()) {
        return Err(Unenforceable::PeriodTooLong { years: super::years(window.max(interval.as_nanos())) });
    }
    if window > MAX_RATE_WINDOW.as_nanos() {
        return Err(Unenforceable::BurstTooLong { years: super::years(window) });
    }
    Ok(())
}

/// `requests` per `per`, in bursts of up to `burst` (default: `requests`). A limit
/// that `check_rate_limit` refuses (stored before validation refused it) is
/// clamped to the nearest one the limiter can keep; its headers then report the
/// clamped burst, which is what is enforced.
pub fn quota_of(config: &RateLimitConfig) -> Option<Quota> {
    let requests = NonZeroU32::new(config.requests)?;
    let interval = (config.per / requests.get()).clamp(Duration::from_nanos(1), MAX_RATE_WINDOW);
    let longest = u32::try_from(MAX_RATE_WINDOW.as_nanos() / interval.as_nanos()).unwrap_or(u32::MAX);
    let burst = NonZeroU32::new(config.burst.unwrap_or(config.requests).min(longest))?;
    Quota::with_period(interval).map(|q| q.allow_burst(burst))
}

impl<C: Clock + Clone> RateLimiters<C> {
    pub fn with_clock(clock: C) -> Self {
        let origin = clock.now();
        RateLimiters { clock, origin, by_key: KeyIdMap::default() }
    }

    /// Takes one request from the key's budget. A key whose limit changed since its
    /// last request starts over with the new limit.
    pub fn check(&self, key_id: &str, config: &RateLimitConfig) -> Result<RateInfo, RateLimited> {
        let now = self.elapsed_nanos();
        if let Some(entry) = self.by_key.get(key_id) {
            if entry.config == *config {
                return entry.check(now);
            }
        }
        let Some(quota) = quota_of(config) else {
            // Only a zero rate or burst has no quota, and validation refuses both.
            return Ok(RateInfo { limit: u32::MAX, remaining: u32::MAX, reset: Duration::ZERO });
        };
        let mut entry = self.by_key.entry(KeyId::from(key_id)).or_insert_with(|| self.new_limiter(*config, quota, now));
        if entry.config != *config {
            *entry = self.new_limiter(*config, quota, now);
        }
        entry.check(now)
    }

    fn new_limiter(&self, config: RateLimitConfig, quota: Quota, now: u64) -> KeyLimiter<C> {
        KeyLimiter {
            config,
            quota,
            limiter: RateLimiter::direct_with_clock(quota, self.clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            last_used: AtomicU64::new(now),
        }
    }

    /// Drops limiters that have been idle long enough to be full again: a new one
    /// behaves exactly the same, so nothing is forgotten.
    pub fn evict_idle(&self) -> usize {
        let now = self.elapsed_nanos();
        let before = self.by_key.len();
        self.by_key.retain(|_, e| {
            let idle = now.saturating_sub(e.last_used.load(Ordering::Relaxed));
            u128::from(idle) <= e.quota.burst_size_replenished_in().as_nanos()
        });
        before - self.by_key.len()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    fn elapsed_nanos(&self) -> u64 {
        let elapsed: Duration = self.clock.now().duration_since(self.origin).into();
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }
}

impl<C: Clock> KeyLimiter<C> {
    fn check(&self, now: u64) -> Result<RateInfo, RateLimited> {
        self.last_used.store(now, Ordering::Relaxed);
        let limit = self.quota.burst_size().get();
        let interval = self.quota.replenish_interval();
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Ok(RateInfo { limit, remaining, reset: interval.saturating_mul(limit.saturating_sub(remaining)) })
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.limiter.clock().now());
                let reset = retry_after.saturating_add(interval.saturating_mul(limit - 1));
                Err(RateLimited { info: RateInfo { limit, remaining: 0, reset }, retry_after })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::retry_after_secs;
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limit(requests: u32, per_ms: u64, burst: Option<u32>) -> RateLimitConfig {
        RateLimitConfig { requests, per: Duration::from_millis(per_ms), burst }
    }

    fn limiters() -> (RateLimiters<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimiters::with_clock(clock.clone()), clock)
    }

    #[test]
    fn burst_is_the_number_of_requests_allowed_at_once() {
        let (limiters, _) = limiters();
        let config = limit(10, 1000, Some(20));
        for i in 0..20 {
            let info = limiters.check("k", &config).unwrap_or_else(|_| panic!("request {i} limited"));
            assert_eq!(info.limit, 20);
            assert_eq!(info.remaining, 19 - i);
        }
        let limited = limiters.check("k", &config).unwrap_err();
        assert_eq!(limited.info.remaining, 0);
        assert_eq!(limited.retry_after, Duration::from_millis(100));
    }

    #[test]
    fn without_burst_the_limit_is_the_request_count() {
        let (limiters, _) = limiters();
        let config = limit(3, 1000, None);
        for _ in 0..3 {
            assert!(limiters.check("k", &config).is_ok());
        }
        let limited = limiters.check("k", &config).unwrap_err();
        assert_eq!(limited.info.limit, 3);
        assert_eq!(limited.retry_after, Duration::from_nanos(333_333_333));
        assert_eq!(retry_after_secs(limited.retry_after), 1);
    }

    #[test]
    fn budget_refills_one_request_per_interval() {
        let (limiters, clock) = limiters();
        let config = limit(2, 1000, None);
        assert!(limiters.check("k", &config).is_ok());
        assert!(limiters.check("k", &config).is_ok());
        assert!(limiters.check("k", &config).is_err());
        clock.advance(Duration::from_millis(499));
        assert!(limiters.check("k", &config).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(limiters.check("k", &config).is_ok());
        assert!(limiters.check("k", &config).is_err());
    }

    #[test]
    fn reset_is_the_time_until_the_whole_burst_is_back() {
        let (limiters, clock) = limiters();
        let config = limit(4, 1000, None);
        let first = limiters.check("k", &config).unwrap();
        assert_eq!((first.remaining, first.reset), (3, Duration::from_millis(250)));
        let second = limiters.check("k", &config).unwrap();
        assert_eq!((second.remaining, second.reset), (2, Duration::from_millis(500)));
        clock.advance(Duration::from_millis(500));
        let third = limiters.check("k", &config).unwrap();
        assert_eq!((third.remaining, third.reset), (3, Duration::from_millis(250)));
    }

    #[test]
    fn keys_have_separate_budgets() {
        let (limiters, _) = limiters();
        let config = limit(1, 1000, None);
        assert!(limiters.check("a", &config).is_ok());
        assert!(limiters.check("a", &config).is_err());
        assert!(limiters.check("b", &config).is_ok());
    }

    #[test]
    fn a_changed_limit_takes_effect_at_once() {
        let (limiters, _) = limiters();
        assert!(limiters.check("k", &limit(1, 1000, None)).is_ok());
        assert!(limiters.check("k", &limit(1, 1000, None)).is_err());
        assert!(limiters.check("k", &limit(5, 1000, None)).is_ok());
    }

    #[test]
    fn a_stored_limit_beyond_what_the_limiter_keeps_is_enforced_as_reported() {
        // Accepted before validation bounded it: a burst of 2^32 - 1 minutes.
        let (limiters, _) = limiters();
        let config = limit(1, 60_000, Some(u32::MAX));
        let first = limiters.check("k", &config).expect("the first request passes");
        assert!(first.limit < u32::MAX, "RateLimit-Limit {} is not what is enforced", first.limit);
        assert_eq!(first.remaining, first.limit - 1);
        let second = limiters.check("k", &config).expect("the burst allows a second request");
        assert_eq!(second.remaining, first.limit - 2);
        // A period too long to keep at all is enforced as the longest that can be.
        let config = limit(1, u64::MAX / 2, None);
        let only = limiters.check("long", &config).expect("the first request passes");
        assert_eq!((only.limit, only.remaining), (1, 0));
        assert!(limiters.check("long", &config).is_err());
    }

    #[test]
    fn only_limiters_idle_until_full_are_evicted() {
        let (limiters, clock) = limiters();
        let config = limit(1, 1000, Some(2));
        assert!(limiters.check("busy", &config).is_ok());
        assert!(limiters.check("idle", &config).is_ok());
        clock.advance(Duration::from_millis(1500));
        assert!(limiters.check("busy", &config).is_ok());
        clock.advance(Duration::from_millis(600));
        // "idle" was last used 2.1 s ago and refills in 2 s; "busy" 0.6 s ago.
        assert_eq!(limiters.evict_idle(), 1);
        assert_eq!(limiters.len(), 1);
        assert!(limiters.check("busy", &config).is_ok());
    }
}
