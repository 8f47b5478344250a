//! Quota usage as the store knows it, for seeding gateways' quota counters.

use time::OffsetDateTime;

use super::store::{Store, StoreError};
use crate::config::QuotaPeriod;
use crate::limit::{period_start, QuotaCounters, UsedElsewhere};

/// Allowed requests per key in the current UTC day and month, from stored usage.
pub async fn used_in_current_periods(store: &Store, now: OffsetDateTime) -> Result<UsedElsewhere, StoreError> {
    let (day, month) = QuotaCounters::periods(now);
    let by_day = store.allowed_since(period_start(QuotaPeriod::Day, now)).await?.into_iter().collect();
    let by_month = store.allowed_since(period_start(QuotaPeriod::Month, now)).await?.into_iter().collect();
    Ok(UsedElsewhere { day, month, by_day, by_month })
}
