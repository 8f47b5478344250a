//! The access decision: every rule of a keyed request, as a pure function.
//!
//! `decide` knows nothing of Pingora or sockets; the proxy gathers the facts,
//! calls it, and turns the outcome into a response.

mod client_ip;
mod plans;

use std::net::IpAddr;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use time::OffsetDateTime;

use crate::index::{KeyRecord, KeyStatus, Snapshot};
use crate::key::{self, KeyDigest};
use crate::limit::{retry_after_secs, RateInfo};
use crate::limit::{KeyStates, Refusal, UsageSlot};

/// The decision refuses with these; they are also outcomes the metrics and usage count.
pub use crate::outcome::{Denial, DENIAL_KINDS};

pub use client_ip::resolve_client_ip;
pub use plans::PlanTable;

/// What the proxy learned about a request that the decision needs.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The key as presented, if any key location held one.
    pub presented_key: Option<&'a str>,
    /// The client address after `trusted_proxies`.
    pub client_ip: IpAddr,
    /// Scopes the matched route requires; the key must hold each.
    pub required_scopes: &'a [String],
}

/// The limits and the per-key mutable state the decision consults and updates.
pub struct Limits<'a, C: Clock = DefaultClock> {
    pub plans: &'a PlanTable,
    pub states: &'a KeyStates<C>,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone)]
pub struct Decision {
    /// The key's record whenever the presented key is known, also when it is refused,
    /// so that its usage is counted.
    pub key: Option<Arc<KeyRecord>>,
    /// Where a rate limit applies, the state for the `RateLimit-*` headers.
    pub rate: Option<RateInfo>,
    pub denial: Option<Denial>,
    /// Where the request's usage is counted once it is finished; present with `key`.
    pub usage: Option<UsageSlot>,
}

impl Decision {
    fn deny(key: Option<(Arc<KeyRecord>, UsageSlot)>, denial: Denial) -> Self {
        let (key, usage) = key.unzip();
        Decision { key, rate: None, denial: Some(denial), usage }
    }
}

/// Longest presented key that is hashed and looked up without keygate's shape,
/// once the index holds imported keys; a longer one is refused unhashed.
pub const MAX_FOREIGN_KEY_LEN: usize = 1024;

/// Runs the checks in contract order. The checksum is verified before any hashing,
/// so garbage costs no SHA-256 and no lookup, as long as the index holds no
/// imported key: those may have any shape, so then a key without keygate's shape
/// (up to [`MAX_FOREIGN_KEY_LEN`] bytes) is hashed and looked up too. A request
/// refused before the rate limit spends nothing; one refused by the rate limit
/// spends no quota.
pub fn decide<C: Clock + Clone>(
    facts: &RequestFacts<'_>,
    snapshot: &Snapshot,
    limits: &Limits<'_, C>,
    now: OffsetDateTime,
) -> Decision {
    let Some(raw) = facts.presented_key else {
        return Decision::deny(None, Denial::MissingKey);
    };
    if key::parse(raw).is_err() && !(snapshot.has_imported() && raw.len() <= MAX_FOREIGN_KEY_LEN) {
        return Decision::deny(None, Denial::InvalidKey);
    }
    let Some(record) = snapshot.get(&KeyDigest::of(raw)) else {
        return Decision::deny(None, Denial::InvalidKey);
    };
    let record = Arc::clone(record);
    let denial = match record.status {
        KeyStatus::Revoked => Some(Denial::KeyRevoked),
        _ if record.is_expired(now) => Some(Denial::KeyExpired),
        KeyStatus::Disabled => Some(Denial::KeyDisabled),
        KeyStatus::Active if !record.allows_ip(facts.client_ip) => Some(Denial::IpNotAllowed),
        KeyStatus::Active if !record.scopes().holds_all(facts.required_scopes) => Some(Denial::InsufficientScope),
        KeyStatus::Active => None,
    };
    if let Some(denial) = denial {
        let usage = limits.states.usage_slot(record.id());
        return Decision::deny(Some((record, usage)), denial);
    }

    let (rate_limit, quota) = limits.plans.limits_for(&record);
    let (verdict, usage) = limits.states.check_limits(&record, rate_limit, quota, now);
    let (rate, denial) = match verdict {
        Ok(rate) => (rate, None),
        Err(Refusal::Rate(limited)) => {
            (Some(limited.info), Some(Denial::RateLimited { retry_after: retry_after_secs(limited.retry_after) }))
        }
        Err(Refusal::Quota { rate, exceeded }) => {
            (rate, Some(Denial::QuotaExceeded { retry_after: retry_after_secs(exceeded.retry_after) }))
        }
    };
    Decision { key: Some(record), rate, denial, usage: Some(usage) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitScope, PlanConfig, QuotaConfig, QuotaPeriod, RateLimitConfig};
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-06-01 12:00 UTC);

    struct Fixture {
        snapshot: Snapshot,
        keys: Vec<String>,
        plans: PlanTable,
        states: KeyStates<FakeRelativeClock>,
        clock: FakeRelativeClock,
    }

    impl Fixture {
        fn limits(&self) -> Limits<'_, FakeRelativeClock> {
            Limits { plans: &self.plans, states: &self.states }
        }

        fn decide(&self, key: Option<&str>, ip: &str, required: &[&str]) -> Decision {
            let required = scopes(required);
            decide(&facts(key, ip, &required), &self.snapshot, &self.limits(), NOW)
        }
    }

    /// One key per record, in the order given.
    fn fixture(records: Vec<KeyRecord>) -> Fixture {
        let keys: Vec<String> = records.iter().map(|_| key::generate("kg_test").unwrap()).collect();
        let snapshot = Snapshot::build(1, keys.iter().map(|k| KeyDigest::of(k)).zip(records)).unwrap();
        let clock = FakeRelativeClock::default();
        Fixture { snapshot, keys, plans: PlanTable::default(), states: KeyStates::with_clock(clock.clone()), clock }
    }

    fn facts<'a>(key: Option<&'a str>, ip: &str, scopes: &'a [String]) -> RequestFacts<'a> {
        RequestFacts { presented_key: key, client_ip: ip.parse().unwrap(), required_scopes: scopes }
    }

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn check(f: &Fixture, key: usize, ip: &str, required: &[&str]) -> Result<String, Denial> {
        let decision = f.decide(Some(&f.keys[key]), ip, required);
        match decision.denial {
            Some(denial) => Err(denial),
            None => Ok(decision.key.expect("an allowed request has a key").id().to_owned()),
        }
    }

    #[test]
    fn missing_key_is_refused_first() {
        let f = fixture(vec![]);
        assert_eq!(f.decide(None, "10.0.0.1", &[]).denial, Some(Denial::MissingKey));
    }

    #[test]
    fn malformed_and_bad_checksum_keys_are_invalid() {
        let f = fixture(vec![KeyRecord::builder("key_a").build()]);
        let mut tampered = f.keys[0].clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        for bad in ["", "not-a-key", "kg_test_tooshort", tampered.as_str()] {
            let decision = f.decide(Some(bad), "10.0.0.1", &[]);
            assert_eq!(decision.denial, Some(Denial::InvalidKey), "{bad}");
            assert!(decision.key.is_none());
        }
    }

    /// A Stripe-style key that keygate never issued: it has no keygate checksum.
    const FOREIGN_KEY: &str = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";

    fn with_foreign_key(record: KeyRecord) -> Fixture {
        let mut f = fixture(vec![KeyRecord::builder("native").build()]);
        f.snapshot = f.snapshot.apply(2, [(KeyDigest::of(FOREIGN_KEY), Some(record))]);
        f
    }

    #[test]
    fn a_foreign_shaped_imported_key_is_looked_up_and_garbage_still_refused() {
        let f = with_foreign_key(KeyRecord::builder("key_kong").imported(true).build());
        let allowed = f.decide(Some(FOREIGN_KEY), "10.0.0.1", &[]);
        assert_eq!(allowed.denial, None);
        assert_eq!(allowed.key.map(|k| k.id().to_owned()), Some("key_kong".to_owned()));
        assert!(check(&f, 0, "10.0.0.1", &[]).is_ok(), "keygate's own keys still work");
        let too_long = "x".repeat(MAX_FOREIGN_KEY_LEN + 1);
        for garbage in ["", "garbage", "sk_live_4eC39HqLyjWDarjtT1zdp7dd", too_long.as_str()] {
            let decision = f.decide(Some(garbage), "10.0.0.1", &[]);
            assert_eq!(decision.denial, Some(Denial::InvalidKey), "{garbage}");
            assert!(decision.key.is_none());
        }
    }

    #[test]
    fn without_imported_keys_a_foreign_shape_is_refused_before_any_lookup() {
        // Indexed, but not marked imported: the shape check refuses it unhashed.
        let f = with_foreign_key(KeyRecord::builder("key_odd").build());
        assert!(!f.snapshot.has_imported());
        assert_eq!(f.decide(Some(FOREIGN_KEY), "10.0.0.1", &[]).denial, Some(Denial::InvalidKey));
    }

    #[test]
    fn well_formed_unknown_key_is_invalid() {
        let f = fixture(vec![]);
        let unknown = key::generate("kg_live").unwrap();
        assert_eq!(f.decide(Some(&unknown), "10.0.0.1", &[]).denial, Some(Denial::InvalidKey));
    }

    #[test]
    fn active_key_with_everything_in_order_is_allowed() {
        let f = fixture(vec![KeyRecord::builder("key_a")
            .scopes(scopes(&["orders:read"]))
            .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap()])
            .expires_at(Some(datetime!(2027-01-01 0:00 UTC)))
            .build()]);
        assert_eq!(check(&f, 0, "10.1.2.3", &["orders:read"]), Ok("key_a".into()));
    }

    #[test]
    fn status_checks_come_in_contract_order() {
        let expired = datetime!(2026-01-01 0:00 UTC);
        let f = fixture(vec![
            KeyRecord::builder("revoked_and_expired").status(KeyStatus::Revoked).expires_at(Some(expired)).build(),
            KeyRecord::builder("disabled_and_expired").status(KeyStatus::Disabled).expires_at(Some(expired)).build(),
            KeyRecord::builder("disabled").status(KeyStatus::Disabled).build(),
            KeyRecord::builder("expired").expires_at(Some(expired)).build(),
        ]);
        assert_eq!(check(&f, 0, "10.0.0.1", &[]), Err(Denial::KeyRevoked));
        assert_eq!(check(&f, 1, "10.0.0.1", &[]), Err(Denial::KeyExpired));
        assert_eq!(check(&f, 2, "10.0.0.1", &[]), Err(Denial::KeyDisabled));
        assert_eq!(check(&f, 3, "10.0.0.1", &[]), Err(Denial::KeyExpired));
    }

    #[test]
    fn expiry_is_inclusive_of_the_instant() {
        let f = fixture(vec![KeyRecord::builder("k").expires_at(Some(NOW)).build()]);
        assert_eq!(check(&f, 0, "10.0.0.1", &[]), Err(Denial::KeyExpired));
    }

    #[test]
    fn key_status_is_checked_before_the_address() {
        let f = fixture(vec![KeyRecord::builder("k")
            .status(KeyStatus::Revoked)
            .ip_allowlist(vec!["192.0.2.0/24".parse().unwrap()])
            .build()]);
        assert_eq!(check(&f, 0, "10.0.0.1", &[]), Err(Denial::KeyRevoked));
    }

    #[test]
    fn address_is_checked_before_scopes() {
        let f = fixture(vec![KeyRecord::builder("k").ip_allowlist(vec!["192.0.2.0/24".parse().unwrap()]).build()]);
        assert_eq!(check(&f, 0, "10.0.0.1", &["orders:read"]), Err(Denial::IpNotAllowed));
        assert_eq!(check(&f, 0, "192.0.2.7", &["orders:read"]), Err(Denial::InsufficientScope));
    }

    #[test]
    fn ipv6_allowlists_match_ipv6_clients() {
        let f = fixture(vec![KeyRecord::builder("k")
            .ip_allowlist(vec!["2001:db8:1::/48".parse().unwrap(), "127.0.0.1/32".parse().unwrap()])
            .build()]);
        assert!(check(&f, 0, "2001:db8:1::5", &[]).is_ok());
        assert!(check(&f, 0, "127.0.0.1", &[]).is_ok());
        assert_eq!(check(&f, 0, "2001:db8:2::5", &[]), Err(Denial::IpNotAllowed));
        assert_eq!(check(&f, 0, "::1", &[]), Err(Denial::IpNotAllowed));
    }

    #[test]
    fn every_required_scope_must_be_held() {
        let f = fixture(vec![KeyRecord::builder("k").scopes(scopes(&["orders:*", "billing:read"])).build()]);
        assert!(check(&f, 0, "10.0.0.1", &["orders:write", "billing:read"]).is_ok());
        assert_eq!(check(&f, 0, "10.0.0.1", &["orders:write", "billing:write"]), Err(Denial::InsufficientScope));
    }

    fn limited(requests: u32, quota: Option<u64>) -> PlanTable {
        PlanTable::new(
            [(
                "p".to_owned(),
                PlanConfig {
                    rate_limit: Some(RateLimitConfig {
                        requests,
                        per: Duration::from_secs(1),
                        burst: None,
                        by: LimitScope::Key,
                    }),
                    quota: quota.map(|requests| QuotaConfig { requests, per: QuotaPeriod::Day, by: LimitScope::Key }),
                },
            )],
            Some("p".to_owned()),
        )
    }

    #[test]
    fn known_but_refused_keys_are_still_identified() {
        let f = fixture(vec![KeyRecord::builder("k").status(KeyStatus::Revoked).build()]);
        let decision = f.decide(Some(&f.keys[0]), "10.0.0.1", &[]);
        assert_eq!(decision.denial, Some(Denial::KeyRevoked));
        assert_eq!(decision.key.map(|k| k.id().to_owned()), Some("k".to_owned()));
    }

    #[test]
    fn rate_limit_applies_after_every_other_check() {
        let mut f = fixture(vec![KeyRecord::builder("k").scopes(scopes(&["a"])).build()]);
        f.plans = limited(1, None);
        // Refused for scope: spends nothing from the rate limit.
        assert_eq!(check(&f, 0, "10.0.0.1", &["b"]), Err(Denial::InsufficientScope));
        let allowed = f.decide(Some(&f.keys[0]), "10.0.0.1", &["a"]);
        assert!(allowed.denial.is_none());
        assert_eq!(allowed.rate.map(|r| (r.limit, r.remaining)), Some((1, 0)));
        let refused = f.decide(Some(&f.keys[0]), "10.0.0.1", &["a"]);
        assert_eq!(refused.denial, Some(Denial::RateLimited { retry_after: 1 }));
        assert_eq!(refused.rate.map(|r| r.remaining), Some(0));
    }

    #[test]
    fn rate_limited_requests_spend_no_quota() {
        let mut f = fixture(vec![KeyRecord::builder("k").build()]);
        f.plans = limited(1, Some(2));
        assert!(check(&f, 0, "10.0.0.1", &[]).is_ok());
        assert!(matches!(check(&f, 0, "10.0.0.1", &[]), Err(Denial::RateLimited { .. })));
        assert_eq!(f.states.used("k", QuotaPeriod::Day, NOW), 1);
        f.clock.advance(Duration::from_secs(1)); // the rate budget is full again
        assert!(check(&f, 0, "10.0.0.1", &[]).is_ok());
        f.clock.advance(Duration::from_secs(1)); // the rate budget is full again
                                                 // Quota exhausted: retry at the next UTC midnight, twelve hours after NOW.
        assert_eq!(check(&f, 0, "10.0.0.1", &[]), Err(Denial::QuotaExceeded { retry_after: 12 * 3600 }));
    }

    #[test]
    fn keys_of_one_owner_share_a_budget_by_owner() {
        let owned = |id: &str, owner: Option<&str>| KeyRecord::builder(id).owner(owner.map(str::to_owned)).build();
        let mut f = fixture(vec![
            owned("a1", Some("acme")),
            owned("a2", Some("acme")),
            owned("b1", Some("bolt")),
            owned("lone", None),
        ]);
        let shared = PlanConfig {
            rate_limit: Some(RateLimitConfig {
                requests: 2,
                per: Duration::from_secs(1),
                burst: None,
                by: LimitScope::Owner,
            }),
            quota: Some(QuotaConfig { requests: 3, per: QuotaPeriod::Day, by: LimitScope::Owner }),
        };
        f.plans = PlanTable::new([("team".to_owned(), shared)], Some("team".to_owned()));
        assert!(check(&f, 0, "10.0.0.1", &[]).is_ok());
        assert!(check(&f, 1, "10.0.0.1", &[]).is_ok());
        let refused = f.decide(Some(&f.keys[0]), "10.0.0.1", &[]);
        assert!(matches!(refused.denial, Some(Denial::RateLimited { .. })), "acme's budget of 2 is spent");
        assert_eq!(refused.rate.map(|r| (r.limit, r.remaining)), Some((2, 0)));
        assert!(matches!(check(&f, 1, "10.0.0.1", &[]), Err(Denial::RateLimited { .. })));
        assert!(check(&f, 2, "10.0.0.1", &[]).is_ok(), "another owner has a budget of its own");
        assert!(check(&f, 3, "10.0.0.1", &[]).is_ok(), "a key without an owner keeps its own");
        assert_eq!(f.states.used(&crate::limit::owner_budget("acme"), QuotaPeriod::Day, NOW), 2);
        // The quota is shared too: one more for acme, through either key.
        f.clock.advance(Duration::from_secs(1)); // the rate budget is full again
        assert!(check(&f, 1, "10.0.0.1", &[]).is_ok());
        f.clock.advance(Duration::from_secs(1)); // the rate budget is full again
        assert!(matches!(check(&f, 0, "10.0.0.1", &[]), Err(Denial::QuotaExceeded { .. })));
    }

    #[test]
    fn denial_codes_and_statuses_follow_the_contract() {
        let table = [
            (Denial::MissingKey, "missing_key", 401),
            (Denial::InvalidKey, "invalid_key", 401),
            (Denial::KeyRevoked, "key_revoked", 401),
            (Denial::KeyExpired, "key_expired", 401),
            (Denial::KeyDisabled, "key_disabled", 403),
            (Denial::IpNotAllowed, "ip_not_allowed", 403),
            (Denial::InsufficientScope, "insufficient_scope", 403),
            (Denial::RateLimited { retry_after: 1 }, "rate_limited", 429),
            (Denial::QuotaExceeded { retry_after: 1 }, "quota_exceeded", 429),
        ];
        for (denial, code, status) in table {
            assert_eq!((denial.code(), denial.status()), (code, status));
            assert_eq!(Denial::CODES[denial.index()], code);
        }
    }
}
