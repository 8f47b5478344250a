//! What the limiters can enforce exactly as written. The config file, the keys
//! file and the admin API refuse a limit beyond these bounds; the limiters
//! (`crate::limit`) clamp one stored before they did to the nearest they can keep.

use std::time::Duration;

use super::{QuotaConfig, RateLimitConfig};

const SECONDS_PER_YEAR: u64 = 365 * 86_400;
const MAX_YEARS: u64 = MAX_RATE_WINDOW.as_secs() / SECONDS_PER_YEAR;

/// The longest a limit may take to refill its whole burst. The rate limiter keeps
/// time in u64 nanoseconds (584 years) from its creation; a century leaves room
/// for any uptime.
pub const MAX_RATE_WINDOW: Duration = Duration::from_secs(100 * SECONDS_PER_YEAR);

/// The most requests a quota can count in one period: the count's share (40 bits)
/// of the quota counter's word.
pub const MAX_QUOTA_REQUESTS: u64 = (1 << 40) - 1;

/// Why a limit cannot be enforced as written. Config, keys file and admin API
/// refuse such a limit; one stored before they did is clamped to the nearest
/// that can be enforced, and reported as clamped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unenforceable {
    #[error("at most one request per nanosecond of `per` can be enforced")]
    RequestsTooFast,
    #[error("the limit spans {years} years; a limiter can keep at most {MAX_YEARS}")]
    PeriodTooLong { years: u128 },
    #[error("refilling a burst this large takes {years} years (per / requests × burst); a limiter can keep at most {MAX_YEARS}")]
    BurstTooLong { years: u128 },
    #[error("at most {MAX_QUOTA_REQUESTS} requests per period can be counted")]
    QuotaTooLarge,
}

impl Unenforceable {
    /// The field of `rate_limit` or `quota` to change.
    pub fn field(&self) -> &'static str {
        match self {
            Unenforceable::RequestsTooFast | Unenforceable::QuotaTooLarge => "requests",
            Unenforceable::PeriodTooLong { .. } => "per",
            Unenforceable::BurstTooLong { .. } => "burst",
        }
    }
}

/// Whole years in `nanos`, rounded up, for messages.
fn years(nanos: u128) -> u128 {
    nanos.div_ceil(u128::from(SECONDS_PER_YEAR) * 1_000_000_000)
}

/// Whether the rate limiter can enforce `config` exactly as written.
pub fn check_rate_limit(config: &RateLimitConfig) -> Result<(), Unenforceable> {
    let Some(requests) = std::num::NonZeroU32::new(config.requests) else { return Ok(()) };
    let interval = config.per / requests.get();
    if interval.is_zero() {
        return Err(Unenforceable::RequestsTooFast);
    }
    let burst = config.burst.unwrap_or(config.requests);
    let window = interval.as_nanos() * u128::from(burst);
    if interval > MAX_RATE_WINDOW || (config.burst.is_none() && window > MAX_RATE_WINDOW.as_nanos()) {
        return Err(Unenforceable::PeriodTooLong { years: years(window.max(interval.as_nanos())) });
    }
    if window > MAX_RATE_WINDOW.as_nanos() {
        return Err(Unenforceable::BurstTooLong { years: years(window) });
    }
    Ok(())
}

/// Whether the quota counters can enforce `quota` exactly as written.
pub fn check_quota(quota: &QuotaConfig) -> Result<(), Unenforceable> {
    if quota.requests > MAX_QUOTA_REQUESTS {
        return Err(Unenforceable::QuotaTooLarge);
    }
    Ok(())
}
