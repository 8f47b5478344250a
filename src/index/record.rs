//! One key's settings as the gateway needs them on the request path.
//!
//! An index holds millions of records, so a record is laid out for size:
//! inline, only what is the key's own and what the request path reads (id and
//! owner in one buffer that also backs their header values, status, expiry);
//! what keys of the same plan, scopes, allowlist and limits have in common is
//! one shared [`KeyPolicy`] (while a key set is built, [`SharedPolicies`] gives
//! the records with equal settings one policy, allocated once); and what the
//! request path never reads and few keys have (tags, metadata) sits in an
//! optional box.
//!
//! One file because it is one thing: the record's layout, its builder and the
//! sharing of policies are a single memory design, measured together (the size
//! test below and `benches/index_scale.rs`).

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use ipnet::IpNet;
use time::OffsetDateTime;

use crate::config::{QuotaConfig, RateLimitConfig};
use crate::key::KeyDigest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyStatus {
    Active,
    Disabled,
    Revoked,
}

impl KeyStatus {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(KeyStatus::Active),
            "disabled" => Some(KeyStatus::Disabled),
            "revoked" => Some(KeyStatus::Revoked),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Disabled => "disabled",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// Scopes a key holds: exact names, `prefix:*` wildcards and `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    all: bool,
    exact: Vec<Box<str>>,
    /// Stored with the trailing `*` removed, e.g. `orders:`.
    prefixes: Vec<Box<str>>,
}

impl ScopeSet {
    pub fn new<S: AsRef<str>>(scopes: &[S]) -> Self {
        let mut set = ScopeSet::default();
        for scope in scopes {
            let scope = scope.as_ref();
            if scope == "*" {
                set.all = true;
            } else if let Some(prefix) = scope.strip_suffix('*') {
                set.prefixes.push(prefix.into());
            } else {
                set.exact.push(scope.into());
            }
        }
        set.exact.shrink_to_fit();
        set.prefixes.shrink_to_fit();
        set
    }

    pub fn holds(&self, required: &str) -> bool {
        self.all
            || self.exact.iter().any(|s| &**s == required)
            || self.prefixes.iter().any(|p| required.len() > p.len() && required.starts_with(&**p))
    }

    pub fn holds_all<S: AsRef<str>>(&self, required: &[S]) -> bool {
        required.iter().all(|r| self.holds(r.as_ref()))
    }
}

/// The `X-Keygate-Plan` and `X-Keygate-Scopes` values of a [`KeyPolicy`], built
/// once for every key that shares it.
#[derive(Debug)]
struct PolicyHeaders {
    plan: Option<HeaderValue>,
    scopes: HeaderValue,
}

/// What a key shares with every key of the same plan, scopes, allowlist and
/// limits. Immutable once built.
#[derive(Debug)]
pub struct KeyPolicy {
    plan: Option<Box<str>>,
    scope_names: Box<[Box<str>]>,
    scopes: ScopeSet,
    ip_allowlist: Box<[IpNet]>,
    /// The allowlist as stored had an entry that cannot be parsed: no address is
    /// admitted. Dropping the entry instead could leave an empty list, which admits every one.
    ip_allowlist_unusable: bool,
    rate_limit: Option<RateLimitConfig>,
    quota: Option<QuotaConfig>,
    headers: PolicyHeaders,
    /// `PolicySettings::hash` of the settings above.
    hash: u64,
}

/// The settings a policy is built from, borrowed from a builder or a policy
/// (everything else in a policy is derived from them).
struct PolicySettings<'a, S> {
    plan: Option<&'a str>,
    scopes: &'a [S],
    ip_allowlist: &'a [IpNet],
    ip_allowlist_unusable: bool,
    rate_limit: Option<&'a RateLimitConfig>,
    quota: Option<&'a QuotaConfig>,
}

impl<S: AsRef<str>> PolicySettings<'_, S> {
    fn hash(&self) -> u64 {
        let mut state = foldhash::fast::FixedState::default().build_hasher();
        self.plan.hash(&mut state);
        self.scopes.len().hash(&mut state);
        for scope in self.scopes {
            scope.as_ref().hash(&mut state);
        }
        self.ip_allowlist.hash(&mut state);
        self.ip_allowlist_unusable.hash(&mut state);
        self.rate_limit.map(|r| (r.requests, r.per, r.burst)).hash(&mut state);
        self.quota.map(|q| (q.requests, q.per)).hash(&mut state);
        state.finish()
    }
}

impl KeyPolicy {
    fn settings(&self) -> PolicySettings<'_, Box<str>> {
        PolicySettings {
            plan: self.plan.as_deref(),
            scopes: &self.scope_names,
            ip_allowlist: &self.ip_allowlist,
            ip_allowlist_unusable: self.ip_allowlist_unusable,
            rate_limit: self.rate_limit.as_ref(),
            quota: self.quota.as_ref(),
        }
    }

    /// Whether this policy was built from exactly these settings.
    fn has_settings<S: AsRef<str>>(&self, settings: &PolicySettings<'_, S>) -> bool {
        self.plan.as_deref() == settings.plan
            && self.scope_names.len() == settings.scopes.len()
            && self.scope_names.iter().zip(settings.scopes).all(|(a, b)| **a == *b.as_ref())
            && *self.ip_allowlist == *settings.ip_allowlist
            && self.ip_allowlist_unusable == settings.ip_allowlist_unusable
            && self.rate_limit.as_ref() == settings.rate_limit
            && self.quota.as_ref() == settings.quota
    }

    fn same_settings(&self, other: &KeyPolicy) -> bool {
        self.hash == other.hash && self.has_settings(&other.settings())
    }
}

/// Rarely set, never read on the request path.
#[derive(Debug, Clone, Default)]
struct KeyDetails {
    /// Compact JSON text of the metadata object: a parsed map costs a B-tree node (~600 bytes).
    metadata: Option<Box<str>>,
    tags: Box<[Box<str>]>,
}

impl KeyDetails {
    fn is_empty(&self) -> bool {
        self.metadata.is_none() && self.tags.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct KeyRecord {
    /// The digest the record is indexed by, set when it enters a snapshot.
    pub(super) digest: KeyDigest,
    /// The id's text followed by the owner's: `id()` and `owner()` read it, and the
    /// `X-Keygate-Key-Id` and `X-Keygate-Owner` values are slices of it that share
    /// the buffer, so a record carries neither a second copy of the text nor two
    /// 40-byte header values.
    identity: Bytes,
    policy: Arc<KeyPolicy>,
    /// Unix milliseconds, [`NEVER`] for none: half the size of an `Option<OffsetDateTime>`,
    /// which brings the record (with its reference counts) to a whole allocator size class.
    expires_at_ms: i64,
    /// `None` when the name is the id (a keys file's default).
    name: Option<Box<str>>,
    details: Option<Box<KeyDetails>>,
    /// Where the id ends in `identity`.
    id_len: u32,
    has_owner: bool,
    /// Written by a bulk import: the raw key may have any shape (see [`KeyRecord::imported`]).
    imported: bool,
    pub status: KeyStatus,
}

impl KeyRecord {
    pub fn builder(id: impl Into<String>) -> KeyRecordBuilder {
        KeyRecordBuilder {
            id: id.into(),
            name: String::new(),
            owner: None,
            plan: None,
            scopes: Vec::new(),
            ip_allowlist: Vec::new(),
            ip_allowlist_unusable: false,
            rate_limit: None,
            quota: None,
            status: KeyStatus::Active,
            expires_at: None,
            metadata: None,
            tags: Vec::new(),
            imported: false,
        }
    }

    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at_ms != NEVER && unix_ms(now) >= self.expires_at_ms
    }

    /// When the key expires, to the millisecond.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        (self.expires_at_ms != NEVER)
            .then(|| OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.expires_at_ms) * 1_000_000).ok())
            .flatten()
    }

    pub fn id(&self) -> &str {
        // `identity` is built from the id's and the owner's `String`s and split at
        // the id's length, so both halves are UTF-8; the fallback is never taken.
        std::str::from_utf8(&self.identity[..self.id_len as usize]).unwrap_or_default()
    }

    /// The `X-Keygate-Key-Id` value: a slice of the record's buffer, no copy.
    pub fn id_header(&self) -> HeaderValue {
        self.identity_header(0..self.id_len as usize)
    }

    /// The `X-Keygate-Owner` value: a slice of the record's buffer, no copy.
    pub fn owner_header(&self) -> Option<HeaderValue> {
        self.has_owner.then(|| self.identity_header(self.id_len as usize..self.identity.len()))
    }

    /// A header value sharing `identity[range]`; cleaned (a copy) only if a control
    /// character slipped through the validation where records enter.
    fn identity_header(&self, range: std::ops::Range<usize>) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.identity.slice(range.clone()))
            .unwrap_or_else(|_| header_value(std::str::from_utf8(&self.identity[range]).unwrap_or_default()))
    }

    pub fn plan_header(&self) -> Option<&HeaderValue> {
        self.policy.headers.plan.as_ref()
    }

    pub fn scopes_header(&self) -> &HeaderValue {
        &self.policy.headers.scopes
    }

    pub fn allows_ip(&self, ip: std::net::IpAddr) -> bool {
        let allowlist = &self.policy.ip_allowlist;
        !self.policy.ip_allowlist_unusable && (allowlist.is_empty() || allowlist.iter().any(|net| net.contains(&ip)))
    }

    /// Whether the stored allowlist had an entry that cannot be parsed, so the key admits no address.
    pub fn ip_allowlist_unusable(&self) -> bool {
        self.policy.ip_allowlist_unusable
    }

    pub fn scopes(&self) -> &ScopeSet {
        &self.policy.scopes
    }

    /// The scopes as given, in order.
    pub fn scope_names(&self) -> &[Box<str>] {
        &self.policy.scope_names
    }

    pub fn ip_allowlist(&self) -> &[IpNet] {
        &self.policy.ip_allowlist
    }

    pub fn plan(&self) -> Option<&str> {
        self.policy.plan.as_deref()
    }

    pub fn rate_limit(&self) -> Option<&RateLimitConfig> {
        self.policy.rate_limit.as_ref()
    }

    pub fn quota(&self) -> Option<&QuotaConfig> {
        self.policy.quota.as_ref()
    }

    /// The policy this record shares with keys of the same settings.
    pub fn policy(&self) -> &Arc<KeyPolicy> {
        &self.policy
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.id())
    }

    pub fn owner(&self) -> Option<&str> {
        // UTF-8 for the same reason as in `id`.
        self.has_owner.then(|| std::str::from_utf8(&self.identity[self.id_len as usize..]).unwrap_or_default())
    }

    /// The metadata object (parsed on each call: nothing on the request path reads it).
    pub fn metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        self.details
            .as_ref()
            .and_then(|d| d.metadata.as_deref())
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default()
    }

    /// The metadata as the compact JSON text the record keeps; `None` when empty.
    pub fn metadata_json(&self) -> Option<&str> {
        self.details.as_ref().and_then(|d| d.metadata.as_deref())
    }

    /// The name as given, `None` when it is the id.
    pub fn own_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn tags(&self) -> &[Box<str>] {
        self.details.as_ref().map_or(&[], |d| &d.tags)
    }

    /// Whether the key came from a bulk import, so its raw form may lack keygate's
    /// shape and checksum: an index holding one cannot refuse keys by shape.
    pub fn imported(&self) -> bool {
        self.imported
    }
}

/// `expires_at_ms` of a key that never expires.
const NEVER: i64 = i64::MAX;

/// Unix milliseconds, rounded down: a key expires within the millisecond it is set to.
fn unix_ms(at: OffsetDateTime) -> i64 {
    // OffsetDateTime spans ±9999 years, well inside i64 milliseconds.
    at.unix_timestamp_nanos().div_euclid(1_000_000) as i64
}

pub struct KeyRecordBuilder {
    id: String,
    name: String,
    owner: Option<String>,
    plan: Option<String>,
    scopes: Vec<String>,
    ip_allowlist: Vec<IpNet>,
    ip_allowlist_unusable: bool,
    rate_limit: Option<RateLimitConfig>,
    quota: Option<QuotaConfig>,
    status: KeyStatus,
    expires_at: Option<OffsetDateTime>,
    metadata: Option<String>,
    tags: Vec<String>,
    imported: bool,
}

impl KeyRecordBuilder {
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    pub fn owner(mut self, owner: Option<String>) -> Self {
        self.owner = owner;
        self
    }
    pub fn plan(mut self, plan: Option<String>) -> Self {
        self.plan = plan;
        self
    }
    pub fn scopes(mut self, scopes: Vec<String>) -> Self {
        self.scopes = scopes;
        self
    }
    pub fn ip_allowlist(mut self, nets: Vec<IpNet>) -> Self {
        self.ip_allowlist = nets;
        self
    }
    /// The key's allowlist has an entry that cannot be parsed: the key admits no
    /// address until it is fixed (fail closed), whatever else the list holds.
    pub fn unusable_ip_allowlist(mut self) -> Self {
        self.ip_allowlist.clear();
        self.ip_allowlist_unusable = true;
        self
    }
    pub fn rate_limit(mut self, limit: Option<RateLimitConfig>) -> Self {
        self.rate_limit = limit;
        self
    }
    pub fn quota(mut self, quota: Option<QuotaConfig>) -> Self {
        self.quota = quota;
        self
    }
    pub fn status(mut self, status: KeyStatus) -> Self {
        self.status = status;
        self
    }
    pub fn expires_at(mut self, at: Option<OffsetDateTime>) -> Self {
        self.expires_at = at;
        self
    }
    pub fn metadata(mut self, metadata: serde_json::Map<String, serde_json::Value>) -> Self {
        // Serialising a map with string keys cannot fail; were it to, the metadata would read as empty.
        self.metadata = (!metadata.is_empty()).then(|| serde_json::to_string(&metadata).ok()).flatten();
        self
    }
    /// The metadata as compact JSON object text, as `metadata_json` gives it back.
    pub fn metadata_json(mut self, json: Option<String>) -> Self {
        self.metadata = json.filter(|json| !json.is_empty() && json != "{}");
        self
    }
    pub fn tags(mut self, tags: Vec<String>) -> Self {
        self.tags = tags;
        self
    }
    pub fn imported(mut self, imported: bool) -> Self {
        self.imported = imported;
        self
    }

    /// The record with a policy of its own. Use [`KeyRecordBuilder::build_sharing`]
    /// where many records are built at once.
    pub fn build(mut self) -> KeyRecord {
        let policy = self.take_policy(self.settings().hash());
        self.finish(policy)
    }

    /// The record, with the policy of an earlier record in `policies` that has the same
    /// settings, if there is one: then nothing is allocated for it.
    pub fn build_sharing(mut self, policies: &mut SharedPolicies) -> KeyRecord {
        let settings = self.settings();
        let hash = settings.hash();
        let policy = match policies.seen.find(hash, |policy| policy.has_settings(&settings)) {
            Some(policy) => Arc::clone(policy),
            None => {
                let policy = self.take_policy(hash);
                policies.seen.insert_unique(hash, Arc::clone(&policy), |policy| policy.hash);
                policy
            }
        };
        self.finish(policy)
    }

    fn settings(&self) -> PolicySettings<'_, String> {
        PolicySettings {
            plan: self.plan.as_deref(),
            scopes: &self.scopes,
            ip_allowlist: &self.ip_allowlist,
            ip_allowlist_unusable: self.ip_allowlist_unusable,
            rate_limit: self.rate_limit.as_ref(),
            quota: self.quota.as_ref(),
        }
    }

    /// A new policy of this builder's settings, whose `hash` is given; takes them out of the builder.
    fn take_policy(&mut self, hash: u64) -> Arc<KeyPolicy> {
        Arc::new(KeyPolicy {
            headers: PolicyHeaders {
                plan: self.plan.as_deref().map(header_value),
                scopes: header_value(&self.scopes.join(" ")),
            },
            scopes: ScopeSet::new(&self.scopes),
            scope_names: std::mem::take(&mut self.scopes).into_iter().map(String::into_boxed_str).collect(),
            plan: self.plan.take().map(String::into_boxed_str),
            ip_allowlist: std::mem::take(&mut self.ip_allowlist).into_boxed_slice(),
            ip_allowlist_unusable: self.ip_allowlist_unusable,
            rate_limit: self.rate_limit,
            quota: self.quota,
            hash,
        })
    }

    fn finish(self, policy: Arc<KeyPolicy>) -> KeyRecord {
        let details = KeyDetails {
            metadata: self.metadata.map(String::into_boxed_str),
            tags: self.tags.into_iter().map(String::into_boxed_str).collect(),
        };
        let name = (self.name != self.id).then(|| self.name.into_boxed_str());
        let has_owner = self.owner.is_some();
        let mut identity = self.id;
        // Ids are at most 128 characters where they enter (keys file, admin API);
        // the cap only keeps `id_len` exact.
        let mut id_end = identity.len().min(u32::MAX as usize);
        while !identity.is_char_boundary(id_end) {
            id_end -= 1;
        }
        identity.truncate(id_end);
        let id_len = identity.len() as u32;
        identity.push_str(self.owner.as_deref().unwrap_or_default());
        KeyRecord {
            digest: KeyDigest([0; 32]),
            identity: Bytes::from(identity.into_bytes().into_boxed_slice()),
            policy,
            expires_at_ms: self.expires_at.map_or(NEVER, |at| unix_ms(at).min(NEVER - 1)),
            name,
            details: (!details.is_empty()).then(|| Box::new(details)),
            id_len,
            has_owner,
            imported: self.imported,
            status: self.status,
        }
    }
}

/// The policies of the records built so far in one key set, by settings: a
/// record built through it ([`KeyRecordBuilder::build_sharing`]) or added to it
/// ([`SharedPolicies::share`]) gets the one policy of every record with the same
/// settings. Held only while a key set is built: a snapshot keeps no table.
#[derive(Default)]
pub struct SharedPolicies {
    seen: hashbrown::HashTable<Arc<KeyPolicy>>,
}

impl SharedPolicies {
    /// Gives `record` the policy of an earlier one with the same settings, or
    /// remembers its own.
    pub(super) fn share(&mut self, record: &mut KeyRecord) {
        let policy = &record.policy;
        match self.seen.find(policy.hash, |seen| Arc::ptr_eq(seen, policy) || seen.same_settings(policy)) {
            Some(seen) => record.policy = Arc::clone(seen),
            None => {
                self.seen.insert_unique(policy.hash, Arc::clone(policy), |policy| policy.hash);
            }
        }
    }

    /// How many different policies the records so far have.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// Record fields are validated where they enter (keys file, admin API); this only
/// guards against a control character slipping through into a header.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| {
        let cleaned: String = text.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
        HeaderValue::from_str(&cleaned).unwrap_or(HeaderValue::from_static("?"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitScope, QuotaPeriod};
    use std::time::Duration;

    #[test]
    fn exact_scopes_match_only_themselves() {
        let set = ScopeSet::new(&["orders:read"]);
        assert!(set.holds("orders:read"));
        assert!(!set.holds("orders:write"));
        assert!(!set.holds("orders"));
    }

    #[test]
    fn prefix_wildcard_matches_everything_under_it() {
        let set = ScopeSet::new(&["orders:*"]);
        assert!(set.holds("orders:read"));
        assert!(set.holds("orders:write:all"));
        assert!(!set.holds("orders:"));
        assert!(!set.holds("orders"));
        assert!(!set.holds("billing:read"));
    }

    #[test]
    fn star_holds_every_scope() {
        let set = ScopeSet::new(&["*"]);
        assert!(set.holds("anything"));
        assert!(set.holds_all(&["a", "b:c"]));
    }

    #[test]
    fn holds_all_needs_every_required_scope() {
        let set = ScopeSet::new(&["orders:read", "billing:*"]);
        assert!(set.holds_all(&["orders:read", "billing:write"]));
        assert!(!set.holds_all(&["orders:read", "orders:write"]));
        assert!(set.holds_all::<&str>(&[]));
        assert!(ScopeSet::default().holds_all::<&str>(&[]));
        assert!(!ScopeSet::default().holds("x"));
    }

    #[test]
    fn allowlist_empty_means_any_address() {
        let open = KeyRecord::builder("k").build();
        assert!(open.allows_ip("203.0.113.9".parse().unwrap()));
        let closed = KeyRecord::builder("k")
            .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()])
            .build();
        assert!(closed.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(closed.allows_ip("2001:db8::1".parse().unwrap()));
        assert!(!closed.allows_ip("11.0.0.1".parse().unwrap()));
        assert!(!closed.allows_ip("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn identity_headers_are_prepared_once() {
        let record =
            KeyRecord::builder("key_1").owner(Some("acme".into())).scopes(vec!["a:b".into(), "c".into()]).build();
        assert_eq!(record.id_header(), "key_1");
        assert_eq!(record.owner_header().unwrap(), "acme");
        assert_eq!(record.scopes_header(), "a:b c");
        assert!(record.plan_header().is_none());
        let with_plan = KeyRecord::builder("key_2").plan(Some("pro".into())).build();
        assert_eq!(with_plan.plan_header().unwrap(), "pro");
        assert_eq!(with_plan.scopes_header(), "");
    }

    #[test]
    fn id_and_owner_headers_share_the_records_buffer() {
        let record = KeyRecord::builder("key_1").owner(Some("acme".into())).build();
        let id = record.id_header();
        let owner = record.owner_header().unwrap();
        assert_eq!(id.as_bytes().as_ptr(), record.id().as_ptr(), "the id header is not a copy");
        assert_eq!(owner.as_bytes().as_ptr(), record.owner().unwrap().as_ptr(), "the owner header is not a copy");
        let without_owner = KeyRecord::builder("key_2").build();
        assert!(without_owner.owner_header().is_none());
        assert_eq!(without_owner.id(), "key_2");
    }

    #[test]
    fn a_record_with_its_reference_counts_fills_one_allocator_size_class() {
        // Ten million of them make up most of an index: growth here is memory per key
        // (see benches/index_scale.rs before growing it). With the two counts of its
        // `Arc` a record is 128 bytes, one of mimalloc's size classes; at 129 it would
        // take a 160-byte block.
        let in_arc = std::mem::size_of::<KeyRecord>() + 2 * std::mem::size_of::<usize>();
        assert!(in_arc <= 128, "{in_arc} bytes");
    }

    #[test]
    fn control_characters_never_reach_a_header() {
        let record = KeyRecord::builder("key\n1").build();
        assert_eq!(record.id_header(), "key?1");
        assert_eq!(record.id(), "key\n1");
    }

    fn full_builder() -> KeyRecordBuilder {
        let mut metadata = serde_json::Map::new();
        metadata.insert("team".into(), "payments".into());
        metadata.insert("tier".into(), 2.into());
        metadata.insert("ratio".into(), serde_json::json!(0.1));
        metadata.insert("nested".into(), serde_json::json!({"a": [1, null, true, "x"]}));
        KeyRecord::builder("key_full")
            .name("full key")
            .owner(Some("acme".into()))
            .plan(Some("pro".into()))
            .scopes(vec!["orders:*".into(), "billing:read".into(), "*".into()])
            .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()])
            .rate_limit(Some(RateLimitConfig {
                requests: 5,
                per: Duration::from_secs(1),
                burst: Some(10),
                by: LimitScope::Key,
            }))
            .quota(Some(QuotaConfig { requests: 1000, per: QuotaPeriod::Day, by: LimitScope::Key }))
            .status(KeyStatus::Disabled)
            .expires_at(Some(OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap()))
            .metadata(metadata)
            .tags(vec!["prod".into(), "eu".into()])
    }

    #[test]
    fn every_setting_reads_back_as_given() {
        let record = full_builder().build();
        assert_eq!(record.id(), "key_full");
        assert_eq!(record.name(), "full key");
        assert_eq!(record.owner(), Some("acme"));
        assert_eq!(record.plan(), Some("pro"));
        let names: Vec<&str> = record.scope_names().iter().map(|s| &**s).collect();
        assert_eq!(names, ["orders:*", "billing:read", "*"]);
        assert_eq!(record.ip_allowlist(), ["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse::<IpNet>().unwrap()]);
        assert_eq!(
            record.rate_limit(),
            Some(&RateLimitConfig { requests: 5, per: Duration::from_secs(1), burst: Some(10), by: LimitScope::Key })
        );
        assert_eq!(record.quota(), Some(&QuotaConfig { requests: 1000, per: QuotaPeriod::Day, by: LimitScope::Key }));
        assert_eq!(record.status, KeyStatus::Disabled);
        assert_eq!(record.expires_at(), Some(OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap()));
        let metadata = record.metadata();
        assert_eq!(metadata["team"], "payments");
        assert_eq!(metadata["tier"], 2);
        assert_eq!(metadata["ratio"], 0.1);
        assert_eq!(metadata["nested"], serde_json::json!({"a": [1, null, true, "x"]}));
        assert_eq!(metadata.len(), 4);
        let tags: Vec<&str> = record.tags().iter().map(|s| &**s).collect();
        assert_eq!(tags, ["prod", "eu"]);
        // A clone shares the policy and reads the same.
        let clone = record.clone();
        assert!(Arc::ptr_eq(clone.policy(), record.policy()));
        assert_eq!(clone.metadata(), metadata);
    }

    #[test]
    fn unset_settings_read_as_empty() {
        let record = KeyRecord::builder("key_bare").build();
        assert_eq!(record.name(), "");
        assert_eq!(record.owner(), None);
        assert_eq!(record.plan(), None);
        assert!(record.scope_names().is_empty());
        assert!(record.ip_allowlist().is_empty());
        assert!(record.rate_limit().is_none() && record.quota().is_none());
        assert!(record.metadata().is_empty());
        assert!(record.tags().is_empty());
        assert!(record.details.is_none(), "no details box for a key without details");
    }

    #[test]
    fn a_name_equal_to_the_id_is_not_stored_twice() {
        let record = KeyRecord::builder("key_same").name("key_same").build();
        assert_eq!(record.name(), "key_same");
        assert!(record.name.is_none());
    }

    #[test]
    fn an_owner_whose_header_was_cleaned_keeps_its_exact_text() {
        let tab = KeyRecord::builder("k").owner(Some("a\tb".into())).build();
        assert_eq!(tab.owner(), Some("a\tb"));
        let control = KeyRecord::builder("k").owner(Some("ac\u{7}me".into())).build();
        assert_eq!(control.owner_header().unwrap(), "ac?me");
        assert_eq!(control.owner(), Some("ac\u{7}me"));
        let accented = KeyRecord::builder("k").owner(Some("café".into())).build();
        assert_eq!(accented.owner_header().unwrap().as_bytes(), "café".as_bytes());
        assert_eq!(accented.owner(), Some("café"));
        let empty = KeyRecord::builder("k").owner(Some(String::new())).build();
        assert_eq!(empty.owner(), Some(""));
        assert_eq!(empty.owner_header().unwrap(), "");
    }

    #[test]
    fn an_unusable_allowlist_admits_nobody_and_never_shares_an_open_policy() {
        let open = KeyRecord::builder("open").build();
        let closed = KeyRecord::builder("closed")
            .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap()])
            .unusable_ip_allowlist()
            .build();
        assert!(open.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(!closed.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(closed.ip_allowlist_unusable() && closed.ip_allowlist().is_empty());
        assert!(!Arc::ptr_eq(open.policy(), closed.policy()));
        let (mut open, mut closed) = (open, closed);
        let mut policies = SharedPolicies::default();
        policies.share(&mut open);
        policies.share(&mut closed);
        assert!(closed.policy().ip_allowlist_unusable && !open.policy().ip_allowlist_unusable);
    }

    #[test]
    fn equal_policies_are_shared_and_different_ones_are_not() {
        let mut policies = SharedPolicies::default();
        let mut a = full_builder().build();
        let mut b = full_builder().build();
        let mut other_scope = full_builder().scopes(vec!["orders:*".into()]).build();
        let mut other_limit = full_builder().rate_limit(None).build();
        let mut other_allowlist = full_builder().ip_allowlist(vec![]).build();
        let mut other_plan = full_builder().plan(None).build();
        let mut other_quota = full_builder()
            .quota(Some(QuotaConfig { requests: 1000, per: QuotaPeriod::Month, by: LimitScope::Key }))
            .build();
        assert!(!Arc::ptr_eq(a.policy(), b.policy()));
        for record in [
            &mut a,
            &mut b,
            &mut other_scope,
            &mut other_limit,
            &mut other_allowlist,
            &mut other_plan,
            &mut other_quota,
        ] {
            policies.share(record);
        }
        assert!(Arc::ptr_eq(a.policy(), b.policy()));
        for other in [&other_scope, &other_limit, &other_allowlist, &other_plan, &other_quota] {
            assert!(!Arc::ptr_eq(a.policy(), other.policy()));
        }
        // Sharing changes nothing a reader sees.
        assert_eq!(b.scopes_header(), "orders:* billing:read *");
        assert_eq!(b.owner(), Some("acme"));
        assert_eq!(other_scope.scopes_header(), "orders:*");
        assert!(other_limit.rate_limit().is_none());
        assert_eq!(other_quota.quota().map(|q| q.per), Some(QuotaPeriod::Month));
    }

    #[test]
    fn records_built_sharing_allocate_one_policy_per_settings() {
        let mut policies = SharedPolicies::default();
        let a = full_builder().build_sharing(&mut policies);
        let b = full_builder().name("another").owner(Some("globex".into())).build_sharing(&mut policies);
        assert!(Arc::ptr_eq(a.policy(), b.policy()));
        let other = full_builder().scopes(vec!["orders:*".into(), "billing:read".into()]).build_sharing(&mut policies);
        assert!(!Arc::ptr_eq(a.policy(), other.policy()));
        assert_eq!(policies.len(), 2);
        assert_eq!(other.scopes_header(), "orders:* billing:read");
        assert_eq!((b.owner(), b.plan()), (Some("globex"), Some("pro")));
        // A record built alone into the same set, then added, gets the shared policy too.
        let mut alone = full_builder().build();
        assert!(!Arc::ptr_eq(a.policy(), alone.policy()));
        policies.share(&mut alone);
        assert!(Arc::ptr_eq(a.policy(), alone.policy()));
        assert_eq!(policies.len(), 2);
        // Records outlive the set: it only held the policies while the key set was built.
        let weak = Arc::downgrade(a.policy());
        drop(policies);
        assert_eq!(a.scopes_header(), "orders:* billing:read *");
        drop((a, b, alone));
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn same_hash_with_other_settings_keeps_its_own_policy() {
        let mut policies = SharedPolicies::default();
        let mut first = full_builder().build();
        let mut forged = full_builder().plan(None).build();
        // Two settings that hash alike (as a collision would) must still not share.
        let hash = first.policy.hash;
        match Arc::get_mut(&mut forged.policy) {
            Some(policy) => policy.hash = hash,
            None => panic!("a record built alone holds the only reference to its policy"),
        }
        policies.share(&mut first);
        policies.share(&mut forged);
        assert!(!Arc::ptr_eq(first.policy(), forged.policy()));
        assert_eq!((first.plan(), forged.plan()), (Some("pro"), None));
        assert_eq!(policies.len(), 2);
    }
}
