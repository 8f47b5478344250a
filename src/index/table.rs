//! The base table of a snapshot: records by digest, built once, never changed.
//!
//! A lookup of a present key costs two cache misses, the bucket and the record
//! (which the request reads anyway); a lookup of an absent key costs one. Each
//! bucket is one 64-byte cache line of four slots, a slot holding the record and
//! a second 8-byte piece of its digest, so the full digest (kept in the record)
//! is compared only when that piece matches, which for an absent key happens
//! with odds of 2^-64. A general-purpose map (std's) reads a control byte array,
//! then the entry, then the record: three misses for a hit. Its control bytes
//! (1 byte a slot) can stay in the last-level cache where these buckets cannot,
//! so for absent keys in a 10M-key index it is faster (about 80 ns against 150 ns
//! on average in benches/index_scale.rs), while present keys, the common case,
//! are faster here (about 150 ns against 195 ns).
//!
//! The table is filled with linear probing over buckets, without deletions
//! (a changed base is rebuilt), so a lookup stops at the first empty slot.

use std::sync::Arc;

use super::record::KeyRecord;
use crate::key::KeyDigest;

/// Slots per bucket: a slot is 16 bytes, a bucket one cache line.
const SLOTS: usize = 4;
/// At most this share of the slots is filled (3 keys for 4 slots): about 21 bytes a key.
const FILL_NUMERATOR: usize = 3;
const FILL_DENOMINATOR: usize = 4;

type Slot = Option<(u64, Arc<KeyRecord>)>;

#[derive(Default)]
#[repr(align(64))]
struct Bucket([Slot; SLOTS]);

pub(super) struct BaseTable {
    /// Never empty.
    buckets: Box<[Bucket]>,
    len: usize,
}

impl Default for BaseTable {
    fn default() -> Self {
        BaseTable::with_capacity(0)
    }
}

/// The digest's first 8 bytes pick the bucket; the next 8 are kept in the slot.
fn halves(digest: &KeyDigest) -> (u64, u64) {
    let mut home = [0u8; 8];
    let mut tag = [0u8; 8];
    home.copy_from_slice(&digest.0[..8]);
    tag.copy_from_slice(&digest.0[8..16]);
    (u64::from_le_bytes(home), u64::from_le_bytes(tag))
}

impl BaseTable {
    /// An empty table with room for `keys` keys.
    pub(super) fn with_capacity(keys: usize) -> Self {
        let slots = keys.saturating_mul(FILL_DENOMINATOR) / FILL_NUMERATOR + 1;
        let buckets = slots.div_ceil(SLOTS).max(1);
        BaseTable { buckets: (0..buckets).map(|_| Bucket::default()).collect(), len: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The bucket a hash starts at: SHA-256 output is uniform, so a multiply-shift
    /// maps it evenly onto any number of buckets.
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.buckets.len() as u128) >> 64) as usize
    }

    pub(super) fn get(&self, digest: &KeyDigest) -> Option<&Arc<KeyRecord>> {
        let (hash, tag) = halves(digest);
        let mut at = self.home(hash);
        // Terminates: the table is never full, and probing ends at the first empty slot.
        loop {
            for slot in &self.buckets[at].0 {
                match slot {
                    None => return None,
                    Some((slot_tag, record)) if *slot_tag == tag && record.digest == *digest => return Some(record),
                    Some(_) => {}
                }
            }
            at = if at + 1 == self.buckets.len() { 0 } else { at + 1 };
        }
    }

    /// Adds `record` under its digest, or gives it back with the record already there.
    pub(super) fn insert(&mut self, record: Arc<KeyRecord>) -> Result<(), (Arc<KeyRecord>, Arc<KeyRecord>)> {
        if (self.len + 1) * FILL_DENOMINATOR > self.buckets.len() * SLOTS * FILL_NUMERATOR {
            self.grow();
        }
        let (hash, tag) = halves(&record.digest);
        let mut at = self.home(hash);
        loop {
            let bucket_len = self.buckets.len();
            for slot in &mut self.buckets[at].0 {
                match slot {
                    None => {
                        *slot = Some((tag, record));
                        self.len += 1;
                        return Ok(());
                    }
                    Some((slot_tag, existing)) if *slot_tag == tag && existing.digest == record.digest => {
                        return Err((Arc::clone(existing), record));
                    }
                    Some(_) => {}
                }
            }
            at = if at + 1 == bucket_len { 0 } else { at + 1 };
        }
    }

    /// Only reached when more keys are inserted than the table was made for.
    fn grow(&mut self) {
        let old = std::mem::replace(self, BaseTable::with_capacity((self.len + 1) * 2));
        for record in old.into_records() {
            // Keys already in a table are distinct.
            let _ = self.insert(record);
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<KeyRecord>> {
        self.buckets.iter().flat_map(|bucket| bucket.0.iter().flatten().map(|(_, record)| record))
    }

    /// Drops every record in the order they lie in memory, which is about the order
    /// they were built in: freeing millions of records in hash order would miss the
    /// cache on every one.
    pub(super) fn free_in_address_order(self) {
        let mut records: Vec<Arc<KeyRecord>> = self.into_records().collect();
        records.sort_unstable_by_key(|record| Arc::as_ptr(record) as usize);
        drop(records);
    }

    fn into_records(self) -> impl Iterator<Item = Arc<KeyRecord>> {
        self.buckets.into_vec().into_iter().flat_map(|bucket| bucket.0.into_iter().flatten().map(|(_, record)| record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(digest: KeyDigest, id: &str) -> Arc<KeyRecord> {
        let mut record = KeyRecord::builder(id).build();
        record.digest = digest;
        Arc::new(record)
    }

    fn digest(home: u64, tag: u64, rest: u8) -> KeyDigest {
        let mut bytes = [rest; 32];
        bytes[..8].copy_from_slice(&home.to_le_bytes());
        bytes[8..16].copy_from_slice(&tag.to_le_bytes());
        KeyDigest(bytes)
    }

    #[test]
    fn an_empty_table_finds_nothing() {
        assert!(BaseTable::default().get(&KeyDigest::of("a")).is_none());
        assert!(BaseTable::with_capacity(0).get(&KeyDigest([0xff; 32])).is_none());
        assert_eq!(BaseTable::default().iter().count(), 0);
    }

    #[test]
    fn a_bucket_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
        assert_eq!(std::mem::align_of::<Bucket>(), 64);
    }

    #[test]
    fn keys_that_start_at_the_same_bucket_all_stay_findable() {
        // Twenty keys with the same home bucket (the last one, so probing wraps
        // around), some with the same tag and differing only after it.
        let mut table = BaseTable::with_capacity(40);
        let digests: Vec<KeyDigest> = (0..20).map(|i| digest(u64::MAX, i / 2, i as u8)).collect();
        for (i, d) in digests.iter().enumerate() {
            table.insert(record(*d, &format!("k{i}"))).unwrap();
        }
        assert_eq!(table.len(), 20);
        for (i, d) in digests.iter().enumerate() {
            assert_eq!(table.get(d).unwrap().id(), format!("k{i}"));
        }
        assert!(table.get(&digest(u64::MAX, 0, 200)).is_none(), "same home and tag, another digest");
        assert!(table.get(&digest(u64::MAX, 99, 0)).is_none());
        assert!(table.get(&digest(0, 0, 0)).is_none());
        assert_eq!(table.iter().count(), 20);
    }

    #[test]
    fn a_duplicate_digest_is_refused_with_both_records() {
        let mut table = BaseTable::with_capacity(2);
        let d = KeyDigest::of("a");
        table.insert(record(d, "first")).unwrap();
        let (existing, refused) = table.insert(record(d, "second")).unwrap_err();
        assert_eq!((existing.id(), refused.id()), ("first", "second"));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn more_keys_than_planned_grow_the_table() {
        let mut table = BaseTable::with_capacity(0);
        assert!(table.get(&KeyDigest::of("x")).is_none());
        for i in 0..1000 {
            table.insert(record(KeyDigest::of(&i.to_string()), &i.to_string())).unwrap();
        }
        assert_eq!(table.len(), 1000);
        for i in 0..1000 {
            assert_eq!(table.get(&KeyDigest::of(&i.to_string())).unwrap().id(), i.to_string());
        }
        assert!(table.get(&KeyDigest::of("1000")).is_none());
    }

    #[test]
    fn about_21_bytes_a_key() {
        let table = BaseTable::with_capacity(3_000_000);
        let bytes = table.buckets.len() * std::mem::size_of::<Bucket>();
        assert!(bytes <= 3_000_000 * 22, "{bytes}");
    }
}
