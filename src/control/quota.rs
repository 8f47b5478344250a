//! Quota usage as the store knows it, for seeding gateways' quota counters.

use time::OffsetDateTime;

use super::store::{Store, StoreError};
use crate::config::QuotaPeriod;
use crate::limit::{owner_budget, period_start, periods, UsedElsewhere};

/// Allowed requests per budget (each key, and each owner for quotas shared
/// `by: owner`) in the current UTC day and month, from stored usage.
pub async fn used_in_current_periods(store: &Store, now: OffsetDateTime) -> Result<UsedElsewhere, StoreError> {
    let (day, month) = periods(now);
    let mut used = UsedElsewhere { day, month, ..UsedElsewhere::default() };
    for (period, map) in [(QuotaPeriod::Day, &mut used.by_day), (QuotaPeriod::Month, &mut used.by_month)] {
        let since = period_start(period, now);
        map.extend(store.allowed_since(since).await?);
        map.extend(store.allowed_by_owner_since(since).await?.into_iter().map(|(owner, n)| (owner_budget(&owner), n)));
    }
    Ok(used)
}
