//! Per-key rate limits and quotas: mutable state kept beside the key index.
//!
//! State is keyed by key id, so it survives index swaps (a reload does not
//! reset anyone's budget) and is created on a key's first request. Idle state is
//! evicted by the maintenance loop, so memory follows active keys only.

mod quota;
mod rate;

pub use quota::{period_start, QuotaCounters, QuotaExceeded, UsedElsewhere};
pub use rate::{RateInfo, RateLimited, RateLimiters};

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
