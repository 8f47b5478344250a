//! The key index: an immutable snapshot of every key, swapped whole.
//!
//! Requests do one `ArcSwap::load` and never lock; writers build the next
//! snapshot off the request path and publish it with one store.

mod keys_file;
mod record;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::key::KeyDigest;

pub use keys_file::{load_keys_file, parse_cidr, parse_keys_file, KeysFileError};
pub use record::{KeyRecord, KeyStatus, ScopeSet};

/// SHA-256 output is already uniform: its first eight bytes are a perfect hash.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than KeyDigest is hashed; stay correct anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Per-key mutable state (limits, usage) lives beside the index in maps keyed by
/// key id. Ids come from the index, not from clients, so a fast seeded hasher is safe.
pub type KeyIdMap<V> = dashmap::DashMap<Arc<str>, V, foldhash::fast::RandomState>;

type DigestMap<V> = HashMap<KeyDigest, V, BuildHasherDefault<DigestHasher>>;

/// Every key known at one moment, by digest.
///
/// A large immutable base shared between snapshots, plus a small overlay of the
/// changes applied since the base was built (`None` marks a removed key). One
/// change therefore copies the overlay, not the index; `compact` folds the
/// overlay into a new base off the request path once it has grown.
#[derive(Default, Clone)]
pub struct Snapshot {
    version: u64,
    base: Arc<DigestMap<Arc<KeyRecord>>>,
    overlay: DigestMap<Option<Arc<KeyRecord>>>,
    len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("keys {first} and {second} have the same hash")]
    DuplicateHash { first: String, second: String },
}

/// An overlay this large (or larger than this share of the base) is worth folding.
const COMPACT_AT_LEAST: usize = 1024;
const COMPACT_BASE_DIVISOR: usize = 16;

impl Snapshot {
    pub fn build(
        version: u64,
        records: impl IntoIterator<Item = (KeyDigest, KeyRecord)>,
    ) -> Result<Self, SnapshotError> {
        let records = records.into_iter();
        let mut by_digest = DigestMap::with_capacity_and_hasher(records.size_hint().0, Default::default());
        for (digest, record) in records {
            if let Some(previous) = by_digest.insert(digest, Arc::new(record)) {
                let second = by_digest[&digest].id.clone();
                return Err(SnapshotError::DuplicateHash { first: previous.id.clone(), second });
            }
        }
        let len = by_digest.len();
        Ok(Snapshot { version, base: Arc::new(by_digest), overlay: DigestMap::default(), len })
    }

    pub fn get(&self, digest: &KeyDigest) -> Option<&Arc<KeyRecord>> {
        match self.overlay.get(digest) {
            Some(entry) => entry.as_ref(),
            None => self.base.get(digest),
        }
    }

    /// The next snapshot: this one with `changes` applied in order (`None` removes
    /// the key). Costs a copy of the overlay, never of the base.
    pub fn apply(&self, version: u64, changes: impl IntoIterator<Item = (KeyDigest, Option<KeyRecord>)>) -> Snapshot {
        let mut next = Snapshot { version, base: Arc::clone(&self.base), overlay: self.overlay.clone(), len: self.len };
        for (digest, record) in changes {
            let was_present = next.get(&digest).is_some();
            let is_present = record.is_some();
            next.overlay.insert(digest, record.map(Arc::new));
            match (was_present, is_present) {
                (false, true) => next.len += 1,
                (true, false) => next.len -= 1,
                _ => {}
            }
        }
        next
    }

    pub fn needs_compaction(&self) -> bool {
        self.overlay.len() >= COMPACT_AT_LEAST.max(self.base.len() / COMPACT_BASE_DIVISOR)
    }

    /// The same keys with the overlay folded into a new base: O(keys), so callers
    /// run it beside the request path and publish the result.
    pub fn compact(&self) -> Snapshot {
        let mut base = DigestMap::clone(&self.base);
        for (digest, record) in &self.overlay {
            match record {
                Some(record) => base.insert(*digest, Arc::clone(record)),
                None => base.remove(digest),
            };
        }
        Snapshot { version: self.version, len: base.len(), base: Arc::new(base), overlay: DigestMap::default() }
    }

    /// Every live record, base and overlay merged.
    pub fn records(&self) -> impl Iterator<Item = (&KeyDigest, &Arc<KeyRecord>)> {
        let overlay = self.overlay.iter().filter_map(|(d, r)| r.as_ref().map(|r| (d, r)));
        let base = self.base.iter().filter(|(d, _)| !self.overlay.contains_key(*d));
        overlay.chain(base)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn version(&self) -> u64 {
        self.version
    }
}

/// The live index shared by every worker thread.
pub struct KeyIndex {
    current: ArcSwap<Snapshot>,
    /// Whether a snapshot has been published yet: what `/readyz` reports.
    loaded: AtomicBool,
}

impl KeyIndex {
    pub fn new(snapshot: Snapshot) -> Self {
        KeyIndex { current: ArcSwap::from_pointee(snapshot), loaded: AtomicBool::new(false) }
    }

    /// Lock-free; the guard keeps the snapshot alive while it is held.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot, for building the next one.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        self.loaded.store(true, Ordering::Release);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex::new(Snapshot::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> KeyRecord {
        KeyRecord::builder(id).build()
    }

    #[test]
    fn lookup_finds_records_by_digest() {
        let snapshot =
            Snapshot::build(1, [(KeyDigest::of("a"), record("key_a")), (KeyDigest::of("b"), record("key_b"))]).unwrap();
        assert_eq!(snapshot.get(&KeyDigest::of("a")).unwrap().id, "key_a");
        assert_eq!(snapshot.get(&KeyDigest::of("b")).unwrap().id, "key_b");
        assert!(snapshot.get(&KeyDigest::of("c")).is_none());
        assert_eq!(snapshot.len(), 2);
    }

    #[test]
    fn duplicate_hashes_are_refused() {
        let result = Snapshot::build(1, [(KeyDigest::of("a"), record("key_a")), (KeyDigest::of("a"), record("key_b"))]);
        assert!(matches!(result, Err(SnapshotError::DuplicateHash { .. })));
    }

    #[test]
    fn publish_replaces_the_whole_snapshot() {
        let index = KeyIndex::default();
        let held = index.load_full_for_test();
        index.publish(Snapshot::build(7, [(KeyDigest::of("a"), record("key_a"))]).unwrap());
        assert_eq!(index.load().version(), 7);
        assert!(index.load().get(&KeyDigest::of("a")).is_some());
        // A reader that loaded before the swap keeps a consistent old view.
        assert!(held.is_empty());
    }

    #[test]
    fn applied_changes_add_replace_and_remove_without_touching_the_base() {
        let base =
            Snapshot::build(1, [(KeyDigest::of("a"), record("key_a")), (KeyDigest::of("b"), record("key_b"))]).unwrap();
        let next = base.apply(
            2,
            [
                (KeyDigest::of("c"), Some(record("key_c"))),
                (KeyDigest::of("a"), Some(KeyRecord::builder("key_a").status(KeyStatus::Revoked).build())),
                (KeyDigest::of("b"), None),
            ],
        );
        assert_eq!(next.version(), 2);
        assert_eq!(next.len(), 2);
        assert_eq!(next.get(&KeyDigest::of("a")).unwrap().status, KeyStatus::Revoked);
        assert!(next.get(&KeyDigest::of("b")).is_none());
        assert_eq!(next.get(&KeyDigest::of("c")).unwrap().id, "key_c");
        assert!(Arc::ptr_eq(&base.base, &next.base), "the base is shared, not copied");
        // The earlier snapshot is untouched.
        assert_eq!(base.len(), 2);
        assert_eq!(base.get(&KeyDigest::of("a")).unwrap().status, KeyStatus::Active);
        assert!(base.get(&KeyDigest::of("b")).is_some());
    }

    #[test]
    fn removing_an_absent_key_and_re_adding_keep_the_count_right() {
        let base = Snapshot::build(1, [(KeyDigest::of("a"), record("key_a"))]).unwrap();
        let next = base.apply(2, [(KeyDigest::of("zzz"), None), (KeyDigest::of("a"), None)]);
        assert_eq!(next.len(), 0);
        let again = next.apply(3, [(KeyDigest::of("a"), Some(record("key_a")))]);
        assert_eq!(again.len(), 1);
        assert!(again.get(&KeyDigest::of("a")).is_some());
    }

    #[test]
    fn compaction_keeps_exactly_the_live_keys() {
        let base =
            Snapshot::build(1, (0..10).map(|i| (KeyDigest::of(&i.to_string()), record(&format!("k{i}"))))).unwrap();
        let changed = base.apply(
            2,
            (0..5).map(|i| (KeyDigest::of(&i.to_string()), None)).chain([(KeyDigest::of("new"), Some(record("new")))]),
        );
        let compacted = changed.compact();
        assert_eq!(compacted.len(), 6);
        assert!(compacted.overlay.is_empty());
        assert_eq!(compacted.version(), 2);
        let mut ids: Vec<String> = compacted.records().map(|(_, r)| r.id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["k5", "k6", "k7", "k8", "k9", "new"]);
        let mut before: Vec<String> = changed.records().map(|(_, r)| r.id.clone()).collect();
        before.sort();
        assert_eq!(before, ids);
    }

    impl KeyIndex {
        fn load_full_for_test(&self) -> Arc<Snapshot> {
            self.current.load_full()
        }
    }
}
