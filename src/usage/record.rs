//! One key's usage over one window: the line format of CONTRACT §8.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusClasses {
    #[serde(rename = "2xx")]
    pub s2xx: u64,
    #[serde(rename = "3xx")]
    pub s3xx: u64,
    #[serde(rename = "4xx")]
    pub s4xx: u64,
    #[serde(rename = "5xx")]
    pub s5xx: u64,
}

impl StatusClasses {
    pub fn add(&mut self, other: &StatusClasses) {
        self.s2xx += other.s2xx;
        self.s3xx += other.s3xx;
        self.s4xx += other.s4xx;
        self.s5xx += other.s5xx;
    }
}

/// Adds per-code denial counts into `into`.
pub fn add_denied(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (code, n) in from {
        *into.entry(code.clone()).or_default() += n;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub node: String,
    pub key_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub window_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub window_end: OffsetDateTime,
    pub requests: u64,
    pub allowed: u64,
    /// Only codes that occurred.
    pub denied: BTreeMap<String, u64>,
    pub status: StatusClasses,
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// The key's owner when its requests were counted (`Some(None)`: it had none),
    /// for the CloudEvents `subject`; `None` where that is not known (a record read
    /// back from the spool). Not part of the record's line.
    #[serde(skip)]
    pub owner_at_count: Option<Option<String>>,
}

impl UsageRecord {
    /// Folds a later (or earlier) window of the same key into this one.
    pub fn merge(&mut self, other: &UsageRecord) {
        self.window_start = self.window_start.min(other.window_start);
        self.window_end = self.window_end.max(other.window_end);
        self.requests += other.requests;
        self.allowed += other.allowed;
        add_denied(&mut self.denied, &other.denied);
        self.status.add(&other.status);
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.last_used_at = self.last_used_at.max(other.last_used_at);
        if self.owner_at_count.is_none() {
            self.owner_at_count.clone_from(&other.owner_at_count);
        }
    }
}

/// Merges `records` into `pending`, one record per key.
pub fn merge_by_key(pending: &mut HashMap<String, UsageRecord>, records: &[UsageRecord]) {
    for record in records {
        merge_one(pending, Cow::Borrowed(record));
    }
}

/// `merge_by_key`, keeping the records given rather than copies of them.
pub fn merge_owned_by_key(pending: &mut HashMap<String, UsageRecord>, records: Vec<UsageRecord>) {
    for record in records {
        merge_one(pending, Cow::Owned(record));
    }
}

fn merge_one(pending: &mut HashMap<String, UsageRecord>, record: Cow<'_, UsageRecord>) {
    match pending.get_mut(&record.key_id) {
        Some(existing) => existing.merge(&record),
        None => {
            pending.insert(record.key_id.clone(), record.into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn record(start: OffsetDateTime, end: OffsetDateTime, allowed: u64, denied: &[(&str, u64)]) -> UsageRecord {
        UsageRecord {
            node: "n".into(),
            key_id: "k".into(),
            window_start: start,
            window_end: end,
            requests: allowed + denied.iter().map(|(_, n)| n).sum::<u64>(),
            allowed,
            denied: denied.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            status: StatusClasses { s2xx: allowed, ..Default::default() },
            bytes_in: 10,
            bytes_out: 20,
            last_used_at: Some(end),
            owner_at_count: None,
        }
    }

    #[test]
    fn merging_adds_counts_and_spans_both_windows() {
        let t = |m: u8| datetime!(2026-01-01 00:00 UTC) + time::Duration::minutes(m.into());
        let mut a = record(t(0), t(5), 3, &[("rate_limited", 1)]);
        a.merge(&record(t(5), t(10), 2, &[("rate_limited", 2), ("key_revoked", 1)]));
        assert_eq!((a.window_start, a.window_end), (t(0), t(10)));
        assert_eq!((a.requests, a.allowed), (9, 5));
        assert_eq!(a.denied["rate_limited"], 3);
        assert_eq!(a.denied["key_revoked"], 1);
        assert_eq!(a.status.s2xx, 5);
        assert_eq!((a.bytes_in, a.bytes_out), (20, 40));
        assert_eq!(a.last_used_at, Some(t(10)));
    }

    #[test]
    fn serialises_to_the_contract_line() {
        let r = record(datetime!(2026-01-01 00:00 UTC), datetime!(2026-01-01 00:00:05 UTC), 1, &[]);
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        for field in [
            "node",
            "key_id",
            "window_start",
            "window_end",
            "requests",
            "allowed",
            "denied",
            "status",
            "bytes_in",
            "bytes_out",
            "last_used_at",
        ] {
            assert!(json.get(field).is_some(), "{field} missing: {json}");
        }
        assert_eq!(json["status"]["2xx"], 1);
        assert_eq!(json["window_end"], "2026-01-01T00:00:05Z");
    }
}
