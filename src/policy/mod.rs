//! The access decision: every rule of a keyed request, as a pure function.
//!
//! `decide` knows nothing of Pingora or sockets; the proxy gathers the facts,
//! calls it, and turns the outcome into a response.

mod client_ip;

use std::net::IpAddr;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::index::{KeyRecord, KeyStatus, Snapshot};
use crate::key::{self, KeyDigest};

pub use client_ip::resolve_client_ip;

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

/// Why a keyed request is refused, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    MissingKey,
    InvalidKey,
    KeyRevoked,
    KeyExpired,
    KeyDisabled,
    IpNotAllowed,
    InsufficientScope,
}

impl Denial {
    pub fn code(self) -> &'static str {
        match self {
            Denial::MissingKey => "missing_key",
            Denial::InvalidKey => "invalid_key",
            Denial::KeyRevoked => "key_revoked",
            Denial::KeyExpired => "key_expired",
            Denial::KeyDisabled => "key_disabled",
            Denial::IpNotAllowed => "ip_not_allowed",
            Denial::InsufficientScope => "insufficient_scope",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Denial::MissingKey | Denial::InvalidKey | Denial::KeyRevoked | Denial::KeyExpired => {
                401
            }
            Denial::KeyDisabled | Denial::IpNotAllowed | Denial::InsufficientScope => 403,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Denial::MissingKey => "an API key is required",
            Denial::InvalidKey => "the API key is not valid",
            Denial::KeyRevoked => "the API key has been revoked",
            Denial::KeyExpired => "the API key has expired",
            Denial::KeyDisabled => "the API key is disabled",
            Denial::IpNotAllowed => "the API key may not be used from this address",
            Denial::InsufficientScope => "the API key lacks a scope this route requires",
        }
    }
}

/// Runs the checks in contract order and returns the key's record when every one passes.
/// The checksum is verified before any hashing, so garbage costs no SHA-256 and no lookup.
pub fn decide(
    facts: &RequestFacts<'_>,
    snapshot: &Snapshot,
    now: OffsetDateTime,
) -> Result<Arc<KeyRecord>, Denial> {
    let raw = facts.presented_key.ok_or(Denial::MissingKey)?;
    key::parse(raw).map_err(|_| Denial::InvalidKey)?;
    let record = snapshot
        .get(&KeyDigest::of(raw))
        .ok_or(Denial::InvalidKey)?;
    match record.status {
        KeyStatus::Revoked => return Err(Denial::KeyRevoked),
        _ if record.is_expired(now) => return Err(Denial::KeyExpired),
        KeyStatus::Disabled => return Err(Denial::KeyDisabled),
        KeyStatus::Active => {}
    }
    if !record.allows_ip(facts.client_ip) {
        return Err(Denial::IpNotAllowed);
    }
    if !record.scopes.holds_all(facts.required_scopes) {
        return Err(Denial::InsufficientScope);
    }
    Ok(Arc::clone(record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-06-01 12:00 UTC);

    struct Fixture {
        snapshot: Snapshot,
        keys: Vec<String>,
    }

    /// One key per record, in the order given.
    fn fixture(records: Vec<KeyRecord>) -> Fixture {
        let keys: Vec<String> = records
            .iter()
            .map(|_| key::generate("kg_test").unwrap())
            .collect();
        let snapshot =
            Snapshot::build(1, keys.iter().map(|k| KeyDigest::of(k)).zip(records)).unwrap();
        Fixture { snapshot, keys }
    }

    fn facts<'a>(key: Option<&'a str>, ip: &str, scopes: &'a [String]) -> RequestFacts<'a> {
        RequestFacts {
            presented_key: key,
            client_ip: ip.parse().unwrap(),
            required_scopes: scopes,
        }
    }

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn check(f: &Fixture, key: usize, ip: &str, required: &[&str]) -> Result<String, Denial> {
        let required = scopes(required);
        decide(&facts(Some(&f.keys[key]), ip, &required), &f.snapshot, NOW).map(|r| r.id.clone())
    }

    #[test]
    fn missing_key_is_refused_first() {
        let f = fixture(vec![]);
        assert_eq!(
            decide(&facts(None, "10.0.0.1", &[]), &f.snapshot, NOW).err(),
            Some(Denial::MissingKey)
        );
    }

    #[test]
    fn malformed_and_bad_checksum_keys_are_invalid() {
        let f = fixture(vec![KeyRecord::builder("key_a").build()]);
        let mut tampered = f.keys[0].clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        for bad in ["", "not-a-key", "kg_test_tooshort", tampered.as_str()] {
            assert_eq!(
                decide(&facts(Some(bad), "10.0.0.1", &[]), &f.snapshot, NOW).err(),
                Some(Denial::InvalidKey),
                "{bad}"
            );
        }
    }

    #[test]
    fn well_formed_unknown_key_is_invalid() {
        let f = fixture(vec![]);
        let unknown = key::generate("kg_live").unwrap();
        assert_eq!(
            decide(&facts(Some(&unknown), "10.0.0.1", &[]), &f.snapshot, NOW).err(),
            Some(Denial::InvalidKey)
        );
    }

    #[test]
    fn active_key_with_everything_in_order_is_allowed() {
        let f = fixture(vec![KeyRecord::builder("key_a")
            .scopes(scopes(&["orders:read"]))
            .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap()])
            .expires_at(Some(datetime!(2027-01-01 0:00 UTC)))
            .build()]);
        assert_eq!(
            check(&f, 0, "10.1.2.3", &["orders:read"]),
            Ok("key_a".into())
        );
    }

    #[test]
    fn status_checks_come_in_contract_order() {
        let expired = datetime!(2026-01-01 0:00 UTC);
        let f = fixture(vec![
            KeyRecord::builder("revoked_and_expired")
                .status(KeyStatus::Revoked)
                .expires_at(Some(expired))
                .build(),
            KeyRecord::builder("disabled_and_expired")
                .status(KeyStatus::Disabled)
                .expires_at(Some(expired))
                .build(),
            KeyRecord::builder("disabled")
                .status(KeyStatus::Disabled)
                .build(),
            KeyRecord::builder("expired")
                .expires_at(Some(expired))
                .build(),
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
        let f = fixture(vec![KeyRecord::builder("k")
            .ip_allowlist(vec!["192.0.2.0/24".parse().unwrap()])
            .build()]);
        assert_eq!(
            check(&f, 0, "10.0.0.1", &["orders:read"]),
            Err(Denial::IpNotAllowed)
        );
        assert_eq!(
            check(&f, 0, "192.0.2.7", &["orders:read"]),
            Err(Denial::InsufficientScope)
        );
    }

    #[test]
    fn ipv6_allowlists_match_ipv6_clients() {
        let f = fixture(vec![KeyRecord::builder("k")
            .ip_allowlist(vec![
                "2001:db8:1::/48".parse().unwrap(),
                "127.0.0.1/32".parse().unwrap(),
            ])
            .build()]);
        assert!(check(&f, 0, "2001:db8:1::5", &[]).is_ok());
        assert!(check(&f, 0, "127.0.0.1", &[]).is_ok());
        assert_eq!(
            check(&f, 0, "2001:db8:2::5", &[]),
            Err(Denial::IpNotAllowed)
        );
        assert_eq!(check(&f, 0, "::1", &[]), Err(Denial::IpNotAllowed));
    }

    #[test]
    fn every_required_scope_must_be_held() {
        let f = fixture(vec![KeyRecord::builder("k")
            .scopes(scopes(&["orders:*", "billing:read"]))
            .build()]);
        assert!(check(&f, 0, "10.0.0.1", &["orders:write", "billing:read"]).is_ok());
        assert_eq!(
            check(&f, 0, "10.0.0.1", &["orders:write", "billing:write"]),
            Err(Denial::InsufficientScope)
        );
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
        ];
        for (denial, code, status) in table {
            assert_eq!((denial.code(), denial.status()), (code, status));
        }
    }
}
