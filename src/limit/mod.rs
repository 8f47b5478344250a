//! Rate limits and quotas: mutable state kept beside the key index, in each
//! budget's entry of [`KeyStates`] (`state.rs`), beside the key's usage counters.
//!
//! State is keyed by budget: a key's id, or its owner's name for limits with
//! `by: owner` (see [`budget_id`]). So it survives index swaps (a reload does not
//! reset anyone's budget) and is created on a budget's first request. Idle state
//! is evicted by the maintenance loop, so memory follows active budgets only.

pub mod fleet;
mod quota;
mod rate;
mod state;

pub use quota::{period_start, periods, QuotaDelta, QuotaExceeded, UsedElsewhere};
pub(crate) use quota::{QuotaPeriods, QuotaState};
pub(crate) use rate::{RateClock, RateState};
pub use rate::{RateInfo, RateLimited};
pub(crate) use state::KeyState;
pub use state::{KeyStates, Refusal, UsageSlot};

use std::borrow::Cow;

use crate::config::LimitScope;
use crate::index::KeyRecord;

/// Owner budgets are named with a prefix that no key id can hold (ids have no
/// whitespace), so an owner's budget never meets a key's own.
pub const OWNER_BUDGET_PREFIX: &str = "owner ";

/// The budget a limit with scope `by` draws from: the owner's for `by: owner`,
/// else the key's own. A key without an owner has no one to share with, so it
/// keeps its own budget either way.
pub fn budget_id(record: &KeyRecord, by: LimitScope) -> Cow<'_, str> {
    match (by, record.owner()) {
        (LimitScope::Owner, Some(owner)) if !owner.is_empty() => Cow::Owned(owner_budget(owner)),
        _ => Cow::Borrowed(record.id()),
    }
}

/// The budget id of `owner`'s shared limits.
pub fn owner_budget(owner: &str) -> String {
    format!("{OWNER_BUDGET_PREFIX}{owner}")
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
    fn owner_budgets_are_shared_by_owner_and_apart_from_key_budgets() {
        let owned = KeyRecord::builder("key_a").owner(Some("acme".into())).build();
        let sibling = KeyRecord::builder("key_b").owner(Some("acme".into())).build();
        let alone = KeyRecord::builder("key_c").build();
        assert_eq!(budget_id(&owned, LimitScope::Owner), budget_id(&sibling, LimitScope::Owner));
        assert_eq!(budget_id(&owned, LimitScope::Key), "key_a");
        assert_ne!(budget_id(&owned, LimitScope::Owner), "acme", "an owner named like a key id stays apart");
        assert_eq!(budget_id(&alone, LimitScope::Owner), "key_c", "no owner: the key's own budget");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(86_400)), 86_400);
    }
}
