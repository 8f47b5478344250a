//! Per-key rate limits and quotas: mutable state kept beside the key index.
//!
//! State is keyed by key id, so it survives index swaps (a reload does not
//! reset anyone's budget) and is created on a key's first request. Idle state is
//! evicted by the maintenance loop, so memory follows active keys only.

mod quota;
mod rate;

pub use quota::{check_quota, period_start, QuotaCounters, QuotaExceeded, UsedElsewhere, MAX_QUOTA_REQUESTS};
pub use rate::{check_rate_limit, RateInfo, RateLimited, RateLimiters, MAX_RATE_WINDOW};

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

const SECONDS_PER_YEAR: u64 = 365 * 86_400;
const MAX_YEARS: u64 = MAX_RATE_WINDOW.as_secs() / SECONDS_PER_YEAR;

/// Whole years in `nanos`, rounded up, for messages.
fn years(nanos: u128) -> u128 {
    nanos.div_ceil(u128::from(SECONDS_PER_YEAR) * 1_000_000_000)
}

/// Whole seconds a client should wait, never less than one (CONTRACT §5 step 8).
pub fn retry_after_secs(wait: std::time::Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(86_400)), 86_400);
    }
}
