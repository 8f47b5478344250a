//! What the control-plane store keeps: key records, the change feed, the audit
//! trail and usage buckets. `StoredKey` is also the admin API's JSON record and
//! the sync feed's payload, so its serde shape is part of the contract.

use std::collections::BTreeMap;

use rand::Rng;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::{QuotaConfig, RateLimitConfig};
use crate::index::KeyStatus;

/// Characters after `key_` in a key id.
pub const KEY_ID_LEN: usize = 20;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A fresh key id: `key_` and 20 random base62 characters (~119 bits).
pub fn new_key_id() -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(4 + KEY_ID_LEN);
    id.push_str("key_");
    for _ in 0..KEY_ID_LEN {
        id.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    id
}

/// A key's status as stored and as written in JSON (`"active"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatusText {
    Active,
    Disabled,
    Revoked,
}

impl KeyStatusText {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatusText::Active => "active",
            KeyStatusText::Disabled => "disabled",
            KeyStatusText::Revoked => "revoked",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        KeyStatus::parse(text).map(Self::from)
    }
}

impl From<KeyStatus> for KeyStatusText {
    fn from(status: KeyStatus) -> Self {
        match status {
            KeyStatus::Active => KeyStatusText::Active,
            KeyStatus::Disabled => KeyStatusText::Disabled,
            KeyStatus::Revoked => KeyStatusText::Revoked,
        }
    }
}

impl From<KeyStatusText> for KeyStatus {
    fn from(status: KeyStatusText) -> Self {
        match status {
            KeyStatusText::Active => KeyStatus::Active,
            KeyStatusText::Disabled => KeyStatus::Disabled,
            KeyStatusText::Revoked => KeyStatus::Revoked,
        }
    }
}

/// One answer of the change feed (`GET /v1/sync/changes`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeBatch {
    pub version: u64,
    pub changes: Vec<Change>,
    /// The feed is behind this gateway (its database was restored): start over.
    #[serde(default)]
    pub reset: bool,
}

/// One key as the store keeps it. Timestamps have millisecond precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredKey {
    pub id: String,
    /// `sha256:<64 hex>`. Serialized because the gateway sync feed needs it; the
    /// admin API removes it from its responses.
    pub hash: String,
    pub prefix: String,
    pub masked: String,
    pub name: String,
    pub owner: Option<String>,
    pub plan: Option<String>,
    pub scopes: Vec<String>,
    pub ip_allowlist: Vec<String>,
    pub rate_limit: Option<RateLimitConfig>,
    pub quota: Option<QuotaConfig>,
    pub status: KeyStatusText,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub tags: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// Feed version of this key's last change.
    pub version: u64,
    /// Written by a bulk import: its raw key may have any shape, not only keygate's.
    #[serde(default)]
    pub imported: bool,
}

/// A key to create. It starts `active`; the store sets the timestamps.
#[derive(Debug, Clone, PartialEq)]
pub struct NewKey {
    pub id: String,
    pub hash: String,
    pub prefix: String,
    pub masked: String,
    pub name: String,
    pub owner: Option<String>,
    pub plan: Option<String>,
    pub scopes: Vec<String>,
    pub ip_allowlist: Vec<String>,
    pub rate_limit: Option<RateLimitConfig>,
    pub quota: Option<QuotaConfig>,
    pub expires_at: Option<OffsetDateTime>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub tags: Vec<String>,
}

/// One validated line of a bulk import: an existing key, known by its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportKey {
    /// Where the record stands in the import, for its error.
    pub line: u64,
    pub id: String,
    pub hash: String,
    /// `None` keeps a stored key's prefix (a new key gets an empty one: its shape is unknown).
    pub prefix: Option<String>,
    /// `None` keeps a stored key's masked form (a new key gets `…`).
    pub masked: Option<String>,
    pub name: String,
    pub owner: Option<String>,
    pub plan: Option<String>,
    pub scopes: Vec<String>,
    pub ip_allowlist: Vec<String>,
    pub rate_limit: Option<RateLimitConfig>,
    pub quota: Option<QuotaConfig>,
    pub status: KeyStatusText,
    pub expires_at: Option<OffsetDateTime>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub tags: Vec<String>,
    /// `None` keeps a stored key's creation time (a new key gets the import's time).
    pub created_at: Option<OffsetDateTime>,
}

/// The id of an imported key given without one: `key_` and 20 base62 characters
/// taken from SHA-256 of the hash text, so a re-run of the same file names it alike.
pub fn key_id_from_hash(hash: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(hash.as_bytes());
    let mut head = [0u8; 16];
    head.copy_from_slice(&digest[..16]);
    // 62^20 < 2^128: twenty digits of the first 128 bits.
    let mut n = u128::from_be_bytes(head);
    let mut id = String::with_capacity(4 + KEY_ID_LEN);
    id.push_str("key_");
    for _ in 0..KEY_ID_LEN {
        id.push(BASE62[(n % 62) as usize] as char);
        n /= 62;
    }
    id
}

/// Fields to change. `None` leaves a field as it is; `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub owner: Option<Option<String>>,
    pub plan: Option<Option<String>>,
    pub scopes: Option<Vec<String>>,
    pub ip_allowlist: Option<Vec<String>>,
    pub rate_limit: Option<Option<RateLimitConfig>>,
    pub quota: Option<Option<QuotaConfig>>,
    /// `active` or `disabled`; `revoked` only through `revoke_key`.
    pub status: Option<KeyStatusText>,
    pub expires_at: Option<Option<OffsetDateTime>>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub tags: Option<Vec<String>>,
}

/// What `list_keys` returns. Every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    pub owner: Option<String>,
    pub status: Option<KeyStatusText>,
    pub plan: Option<String>,
    /// The key carries this tag.
    pub tag: Option<String>,
    /// Case-insensitive substring of name, owner, id or masked.
    pub q: Option<String>,
    pub order: KeyOrder,
}

/// The listing's order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyOrder {
    /// Newest first.
    #[default]
    Created,
    /// Most recently used first; keys never used last.
    LastUsed,
}

/// One entry of the sync feed: `{"op":"upsert","key":{..}}` or
/// `{"op":"delete","id":..,"hash":..}`.
// Unboxed on purpose: nearly every change is an upsert, so boxing would cost an
// allocation per change and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum KeyChange {
    /// The key's current record (which may be newer than the change's version).
    Upsert(StoredKey),
    Delete {
        id: String,
        hash: String,
    },
}

/// The wire form of [`KeyChange`]: serde's internal tagging cannot put a newtype
/// variant's content under `key`, so the enum is mapped through these.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum KeyChangeRef<'a> {
    Upsert { key: &'a StoredKey },
    Delete { id: &'a str, hash: &'a str },
}

#[allow(clippy::large_enum_variant)]
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum KeyChangeOwned {
    Upsert { key: StoredKey },
    Delete { id: String, hash: String },
}

impl Serialize for KeyChange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            KeyChange::Upsert(key) => KeyChangeRef::Upsert { key },
            KeyChange::Delete { id, hash } => KeyChangeRef::Delete { id, hash },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for KeyChange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match KeyChangeOwned::deserialize(d)? {
            KeyChangeOwned::Upsert { key } => KeyChange::Upsert(key),
            KeyChangeOwned::Delete { id, hash } => KeyChange::Delete { id, hash },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub version: u64,
    pub change: KeyChange,
}

impl StoredKey {
    /// The record as the admin API, events and webhooks show it: every field but the
    /// hash and the feed version.
    pub fn public_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(map) = &mut value {
            map.remove("hash");
            map.remove("version");
        }
        value
    }
}

/// One entry of the event log (`GET /v1/events`, webhooks), written in the
/// transaction of the change it tells of.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Increasing in commit order, across every control plane on one database.
    pub id: u64,
    pub at: OffsetDateTime,
    /// `key.created`, `key.revoked`, …
    pub kind: String,
    pub key_id: Option<String>,
    pub data: serde_json::Value,
}

impl StoredEvent {
    /// The body every consumer gets: `{"type", "timestamp", "data"}`.
    pub fn body(&self) -> serde_json::Value {
        let timestamp = self.at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        serde_json::json!({ "type": self.kind, "timestamp": timestamp, "data": self.data })
    }
}

/// One key's counts in one minute, for the live `usage` events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageTick {
    pub key_id: String,
    pub requests: u64,
    pub allowed: u64,
    pub denied: BTreeMap<String, u64>,
    pub status: StatusCounts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub id: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub key_id: Option<String>,
    pub details: serde_json::Value,
}

/// Responses by class, `{"2xx": n, "3xx": n, "4xx": n, "5xx": n}`: the usage line's `status`.
pub use crate::usage::StatusClasses as StatusCounts;

/// Usage of one key over one minute, hour or day (UTC), or over a whole range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBucket {
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    pub requests: u64,
    pub allowed: u64,
    /// Only codes that occurred.
    pub denied: BTreeMap<String, u64>,
    pub status: StatusCounts,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl UsageBucket {
    pub fn empty(start: OffsetDateTime) -> Self {
        UsageBucket {
            start,
            requests: 0,
            allowed: 0,
            denied: BTreeMap::new(),
            status: StatusCounts::default(),
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Adds another bucket's counts to this one (its start is kept).
    pub fn add(&mut self, other: &UsageBucket) {
        self.requests += other.requests;
        self.allowed += other.allowed;
        crate::usage::add_denied(&mut self.denied, &other.denied);
        self.status.add(&other.status);
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
    }

    pub fn is_empty(&self) -> bool {
        self.requests == 0 && self.bytes_in == 0 && self.bytes_out == 0 && self.denied.values().all(|&n| n == 0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "minute" => Some(Granularity::Minute),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            _ => None,
        }
    }

    /// Bucket width in milliseconds. UTC days and hours are whole multiples of it
    /// since the epoch, so `ms / width * width` is the bucket start.
    pub fn millis(self) -> i64 {
        match self {
            Granularity::Minute => 60_000,
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }
}

/// An active key with no plan, scopes or limits, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn sample_key(id: &str, hash: String) -> StoredKey {
    let at = time::macros::datetime!(2026-01-01 00:00 UTC);
    StoredKey {
        id: id.into(),
        hash,
        prefix: "kg_live".into(),
        masked: "kg_live_Ab3d…x9Zq".into(),
        name: "n".into(),
        owner: None,
        plan: None,
        scopes: vec![],
        ip_allowlist: vec![],
        rate_limit: None,
        quota: None,
        status: KeyStatusText::Active,
        expires_at: None,
        metadata: serde_json::Map::new(),
        tags: vec![],
        created_at: at,
        updated_at: at,
        last_used_at: None,
        version: 0,
        imported: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn key() -> StoredKey {
        StoredKey {
            plan: Some("free".into()),
            scopes: vec!["orders:*".into()],
            version: 3,
            ..sample_key("key_abc", format!("sha256:{}", "0".repeat(64)))
        }
    }

    #[test]
    fn key_ids_have_the_documented_form() {
        let id = new_key_id();
        assert_eq!(id.len(), 4 + KEY_ID_LEN);
        assert!(id.starts_with("key_"));
        assert!(id[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(id, new_key_id());
    }

    #[test]
    fn ids_derived_from_a_hash_are_stable_and_well_formed() {
        let hash = format!("sha256:{}", "ab".repeat(32));
        let id = key_id_from_hash(&hash);
        assert_eq!(id, key_id_from_hash(&hash));
        assert_eq!(id.len(), 4 + KEY_ID_LEN);
        assert!(id.starts_with("key_") && id[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(id, key_id_from_hash(&format!("sha256:{}", "cd".repeat(32))));
    }

    #[test]
    fn a_record_without_the_imported_flag_reads_as_not_imported() {
        let mut json = serde_json::to_value(key()).unwrap();
        json.as_object_mut().unwrap().remove("imported");
        let back: StoredKey = serde_json::from_value(json).unwrap();
        assert!(!back.imported);
    }

    #[test]
    fn changes_serialize_tagged_by_op() {
        let upsert = serde_json::to_value(KeyChange::Upsert(key())).unwrap();
        assert_eq!(upsert["op"], "upsert");
        assert_eq!(upsert["key"]["status"], "active");
        assert_eq!(upsert["key"]["created_at"], "2026-01-01T00:00:00Z");
        assert_eq!(upsert["key"]["expires_at"], serde_json::Value::Null);
        let delete = serde_json::to_value(KeyChange::Delete { id: "key_abc".into(), hash: "sha256:x".into() }).unwrap();
        assert_eq!(delete, serde_json::json!({"op": "delete", "id": "key_abc", "hash": "sha256:x"}));
        let change = Change { version: 7, change: KeyChange::Upsert(key()) };
        let back: Change = serde_json::from_str(&serde_json::to_string(&change).unwrap()).unwrap();
        assert_eq!(back, change);
    }

    #[test]
    fn usage_bucket_status_uses_class_names() {
        let bucket = UsageBucket::empty(datetime!(2026-01-01 00:00 UTC));
        let json = serde_json::to_value(&bucket).unwrap();
        assert_eq!(json["status"], serde_json::json!({"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}));
        assert!(bucket.is_empty());
    }
}
