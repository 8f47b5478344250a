//! Which rate limit and quota apply to a key: its own, else its plan's.

use std::collections::HashMap;

use crate::config::{PlanConfig, QuotaConfig, RateLimitConfig};
use crate::index::KeyRecord;

#[derive(Debug, Default, Clone)]
pub struct PlanTable {
    plans: HashMap<String, PlanConfig>,
    default_plan: Option<String>,
}

impl PlanTable {
    pub fn new(plans: impl IntoIterator<Item = (String, PlanConfig)>, default_plan: Option<String>) -> Self {
        PlanTable { plans: plans.into_iter().collect(), default_plan }
    }

    /// The plan a key is on: its own, else the default plan.
    pub fn plan_name<'a>(&'a self, record: &'a KeyRecord) -> Option<&'a str> {
        record.plan().or(self.default_plan.as_deref())
    }

    /// A key's own `rate_limit` and `quota` override its plan's, each on its own.
    pub fn limits_for<'a>(&'a self, record: &'a KeyRecord) -> (Option<&'a RateLimitConfig>, Option<&'a QuotaConfig>) {
        let plan = self.plan_name(record).and_then(|name| self.plans.get(name));
        (
            record.rate_limit().or(plan.and_then(|p| p.rate_limit.as_ref())),
            record.quota().or(plan.and_then(|p| p.quota.as_ref())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitScope, QuotaPeriod};
    use std::time::Duration;

    fn rate(requests: u32) -> RateLimitConfig {
        RateLimitConfig { requests, per: Duration::from_secs(1), burst: None, by: LimitScope::Key }
    }

    fn table() -> PlanTable {
        PlanTable::new(
            [
                (
                    "free".to_owned(),
                    PlanConfig {
                        rate_limit: Some(rate(10)),
                        quota: Some(QuotaConfig { requests: 100, per: QuotaPeriod::Day, by: LimitScope::Key }),
                    },
                ),
                ("pro".to_owned(), PlanConfig { rate_limit: Some(rate(1000)), quota: None }),
            ],
            Some("free".to_owned()),
        )
    }

    #[test]
    fn keys_without_a_plan_get_the_default_plan() {
        let record = KeyRecord::builder("k").build();
        let table = table();
        let (rate_limit, quota) = table.limits_for(&record);
        assert_eq!(rate_limit.map(|r| r.requests), Some(10));
        assert_eq!(quota.map(|q| q.requests), Some(100));
    }

    #[test]
    fn the_key_plan_wins_over_the_default() {
        let record = KeyRecord::builder("k").plan(Some("pro".into())).build();
        let table = table();
        let (rate_limit, quota) = table.limits_for(&record);
        assert_eq!(rate_limit.map(|r| r.requests), Some(1000));
        assert_eq!(quota, None);
    }

    #[test]
    fn own_limits_override_the_plan_field_by_field() {
        let record = KeyRecord::builder("k").rate_limit(Some(rate(3))).build();
        let table = table();
        let (rate_limit, quota) = table.limits_for(&record);
        assert_eq!(rate_limit.map(|r| r.requests), Some(3));
        assert_eq!(quota.map(|q| q.requests), Some(100));
    }

    #[test]
    fn no_plan_and_no_default_means_no_limits() {
        let table = PlanTable::new([], None);
        let record = KeyRecord::builder("k").build();
        assert_eq!(table.limits_for(&record), (None, None));
    }
}
