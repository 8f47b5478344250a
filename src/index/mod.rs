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

pub use keys_file::{load_keys_file, parse_keys_file, KeysFileError};
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
#[derive(Default)]
pub struct Snapshot {
    version: u64,
    by_digest: DigestMap<Arc<KeyRecord>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("keys {first} and {second} have the same hash")]
    DuplicateHash { first: String, second: String },
}

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
        Ok(Snapshot { version, by_digest })
    }

    pub fn get(&self, digest: &KeyDigest) -> Option<&Arc<KeyRecord>> {
        self.by_digest.get(digest)
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
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

    impl KeyIndex {
        fn load_full_for_test(&self) -> Arc<Snapshot> {
            self.current.load_full()
        }
    }
}
