//! The key index: an immutable snapshot of every key, swapped whole.
//!
//! Requests do one `ArcSwap::load` and never lock; writers build the next
//! snapshot off the request path and publish it with one store. Replaced
//! snapshots are freed on a thread of the index's own, never by a request.

mod keys_file;
mod record;
mod table;
pub mod wire;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::key::KeyDigest;

pub use keys_file::{load_keys_file, parse_keys_file, KeysFileError};
pub use record::{KeyPolicy, KeyRecord, KeyRecordBuilder, KeyStatus, ScopeSet, SharedPolicies};

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
/// Ids up to 24 bytes (generated ones are exactly that) are stored inline, so a lookup
/// compares them without following a pointer to another cache line.
pub type KeyIdMap<V> = dashmap::DashMap<KeyId, V, foldhash::fast::RandomState>;

/// A key id as stored in the per-key maps; hashes and compares as the `str` it holds.
pub type KeyId = compact_str::CompactString;

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
    base: Arc<table::BaseTable>,
    overlay: DigestMap<Option<Arc<KeyRecord>>>,
    len: usize,
    /// Live records that came from a bulk import (see [`Snapshot::has_imported`]).
    imported: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("keys {first} and {second} have the same hash")]
    DuplicateHash { first: String, second: String },
}

/// The overlay is folded into the base once it holds this share of the base...
const COMPACT_BASE_DIVISOR: usize = 16;
/// ...but at least this many changes, so small indexes are not rebuilt on every change...
const COMPACT_AT_LEAST: usize = 1024;
/// ...and at most this many, since every change copies the overlay: at 7 to 25 ns an
/// entry (benches/index_scale.rs), 16k entries keep one change under half a
/// millisecond however large the base.
const COMPACT_AT_MOST: usize = 16 * 1024;

/// The overlay size at which a base of `base_len` keys is worth rebuilding.
fn compaction_threshold(base_len: usize) -> usize {
    (base_len / COMPACT_BASE_DIVISOR).clamp(COMPACT_AT_LEAST, COMPACT_AT_MOST)
}

impl Snapshot {
    /// A snapshot of `records`. Records with equal policies (plan, scopes,
    /// allowlist, limits) come to share one.
    pub fn build(
        version: u64,
        records: impl IntoIterator<Item = (KeyDigest, KeyRecord)>,
    ) -> Result<Self, SnapshotError> {
        let records = records.into_iter();
        let mut builder = SnapshotBuilder::with_capacity(records.size_hint().0);
        for (digest, record) in records {
            builder.push(digest, record)?;
        }
        Ok(builder.finish(version))
    }

    pub fn get(&self, digest: &KeyDigest) -> Option<&Arc<KeyRecord>> {
        if !self.overlay.is_empty() {
            if let Some(entry) = self.overlay.get(digest) {
                return entry.as_ref();
            }
        }
        self.base.get(digest)
    }

    /// The next snapshot: this one with `changes` applied in order (`None` removes
    /// the key). Costs a copy of the overlay, never of the base.
    pub fn apply(&self, version: u64, changes: impl IntoIterator<Item = (KeyDigest, Option<KeyRecord>)>) -> Snapshot {
        let mut next = Snapshot {
            version,
            base: Arc::clone(&self.base),
            overlay: self.overlay.clone(),
            len: self.len,
            imported: self.imported,
        };
        for (digest, record) in changes {
            let was = next.get(&digest);
            let was_present = was.is_some();
            let is_present = record.is_some();
            let was_imported = was.is_some_and(|r| r.imported());
            let is_imported = record.as_ref().is_some_and(KeyRecord::imported);
            next.imported = (next.imported + usize::from(is_imported)).saturating_sub(usize::from(was_imported));
            let record = record.map(|mut record| {
                record.digest = digest;
                Arc::new(record)
            });
            next.overlay.insert(digest, record);
            match (was_present, is_present) {
                (false, true) => next.len += 1,
                (true, false) => next.len -= 1,
                _ => {}
            }
        }
        next
    }

    pub fn needs_compaction(&self) -> bool {
        self.overlay.len() >= self.overlay_limit()
    }

    /// The overlay size at which `needs_compaction` becomes true.
    pub fn overlay_limit(&self) -> usize {
        compaction_threshold(self.base.len())
    }

    /// The same keys with the overlay folded into a new base: O(keys), so callers
    /// run it beside the request path and publish the result.
    pub fn compact(&self) -> Snapshot {
        let mut base = table::BaseTable::with_capacity(self.len);
        let kept = self.base.iter().filter(|record| !self.overlay.contains_key(&record.digest));
        let changed = self.overlay.values().flatten();
        for record in kept.chain(changed) {
            // Digests are distinct: the overlay's replace the base's.
            let _ = base.insert(Arc::clone(record));
        }
        // The same live records: as many imported ones.
        Snapshot {
            version: self.version,
            len: base.len(),
            base: Arc::new(base),
            overlay: DigestMap::default(),
            imported: self.imported,
        }
    }

    /// This snapshot on the base of `compacted`, which is `from.compact()` for an earlier
    /// snapshot `from` on this snapshot's base: the changes made since `from` stay in the
    /// overlay, the ones `compacted` folded leave it. Lets a compaction run beside the
    /// sync instead of holding up the change that triggered it. `None` when the bases
    /// differ (a full reload came in between): the compaction is then of no use.
    pub fn rebase(&self, from: &Snapshot, compacted: &Snapshot) -> Option<Snapshot> {
        if !Arc::ptr_eq(&self.base, &from.base) || !compacted.overlay.is_empty() {
            return None;
        }
        // Every change makes a new record, so an entry still identical to `from`'s is one
        // `compacted` holds already.
        let folded = |digest: &KeyDigest, entry: &Option<Arc<KeyRecord>>| match (from.overlay.get(digest), entry) {
            (Some(None), None) => true,
            (Some(Some(before)), Some(now)) => Arc::ptr_eq(before, now),
            _ => false,
        };
        let overlay = self
            .overlay
            .iter()
            .filter(|(digest, entry)| !folded(digest, entry))
            .map(|(d, e)| (*d, e.clone()))
            .collect();
        Some(Snapshot {
            version: self.version,
            base: Arc::clone(&compacted.base),
            overlay,
            len: self.len,
            imported: self.imported,
        })
    }

    /// Every live record, base and overlay merged.
    pub fn records(&self) -> impl Iterator<Item = (&KeyDigest, &Arc<KeyRecord>)> {
        let overlay = self.overlay.iter().filter_map(|(d, r)| r.as_ref().map(|r| (d, r)));
        let base = self
            .base
            .iter()
            .filter(|record| !self.overlay.contains_key(&record.digest))
            .map(|record| (&record.digest, record));
        overlay.chain(base)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Changes applied since the base was built: what `apply` copies.
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether any live record came from a bulk import. While none did, every
    /// key in the index has keygate's shape, so a presented key without it can be
    /// refused before it is hashed.
    pub fn has_imported(&self) -> bool {
        self.imported > 0
    }

    /// How many live records came from a bulk import.
    pub fn imported_len(&self) -> usize {
        self.imported
    }
}

/// A snapshot built one record at a time, as a key set streams in.
pub struct SnapshotBuilder {
    base: table::BaseTable,
    policies: SharedPolicies,
    imported: usize,
}

impl SnapshotBuilder {
    /// Room for `keys` keys before the table grows.
    pub fn with_capacity(keys: usize) -> Self {
        SnapshotBuilder { base: table::BaseTable::with_capacity(keys), policies: Default::default(), imported: 0 }
    }

    /// Adds a record, sharing the policy of an equal one already added.
    pub fn push(&mut self, digest: KeyDigest, mut record: KeyRecord) -> Result<(), SnapshotError> {
        self.policies.share(&mut record);
        self.insert(digest, record)
    }

    /// Adds the record `builder` makes, with no policy allocated for it when an
    /// equal one was added already: how a key set streamed in is best added.
    pub fn push_new(&mut self, digest: KeyDigest, builder: KeyRecordBuilder) -> Result<(), SnapshotError> {
        let record = builder.build_sharing(&mut self.policies);
        self.insert(digest, record)
    }

    fn insert(&mut self, digest: KeyDigest, mut record: KeyRecord) -> Result<(), SnapshotError> {
        record.digest = digest;
        let imported = record.imported();
        self.base.insert(Arc::new(record)).map_err(|(first, second)| SnapshotError::DuplicateHash {
            first: first.id().to_owned(),
            second: second.id().to_owned(),
        })?;
        self.imported += usize::from(imported);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.base.len()
    }

    pub fn is_empty(&self) -> bool {
        self.base.len() == 0
    }

    pub fn finish(self, version: u64) -> Snapshot {
        let len = self.base.len();
        Snapshot { version, base: Arc::new(self.base), overlay: DigestMap::default(), len, imported: self.imported }
    }
}

/// The live index shared by every worker thread.
pub struct KeyIndex {
    current: ArcSwap<Snapshot>,
    /// Whether a snapshot has been published yet: what `/readyz` reports.
    loaded: AtomicBool,
    /// Where replaced snapshots go to be freed; started at the first publish.
    reaper: OnceLock<Option<mpsc::Sender<Arc<Snapshot>>>>,
}

impl KeyIndex {
    pub fn new(snapshot: Snapshot) -> Self {
        KeyIndex { current: ArcSwap::from_pointee(snapshot), loaded: AtomicBool::new(false), reaper: OnceLock::new() }
    }

    /// Lock-free; the guard keeps the snapshot alive while it is held.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot, for building the next one.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `snapshot` the one requests see. The replaced snapshot is freed on the
    /// index's reaper thread once no reader holds it: a request that still holds
    /// it when the swap happens (an arc-swap guard then owns a reference) would
    /// otherwise free it when it lets go, and freeing millions of records takes
    /// most of a second.
    pub fn publish(&self, snapshot: Snapshot) {
        self.publish_shared(Arc::new(snapshot));
    }

    /// `publish` for a snapshot the caller keeps a reference to.
    pub fn publish_shared(&self, snapshot: Arc<Snapshot>) {
        let old = self.current.swap(snapshot);
        self.loaded.store(true, Ordering::Release);
        self.retire(old);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    fn retire(&self, old: Arc<Snapshot>) {
        let reaper = self.reaper.get_or_init(|| {
            let (sender, receiver) = mpsc::channel();
            let started = std::thread::Builder::new().name("keygate-index-reaper".into()).spawn(move || reap(receiver));
            match started {
                Ok(_) => Some(sender),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the index reaper thread; replaced snapshots are freed where they are released");
                    None
                }
            }
        });
        let Some(sender) = reaper else { return };
        // Sending fails only if the reaper has gone; the snapshot is then dropped here.
        let _ = sender.send(old);
    }
}

/// Frees retired snapshots once the reaper holds the last reference. After the
/// swap no reader can take a new reference to a retired snapshot, so a count of
/// one stays one; readers holding it let go within microseconds.
fn reap(retired: mpsc::Receiver<Arc<Snapshot>>) {
    let mut pending: Vec<Arc<Snapshot>> = Vec::new();
    let mut wait = Duration::from_millis(1);
    loop {
        let next = if pending.is_empty() {
            match retired.recv() {
                Ok(snapshot) => Some(snapshot),
                Err(_) => return,
            }
        } else {
            match retired.recv_timeout(wait) {
                Ok(snapshot) => Some(snapshot),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    // The index is gone: whoever still holds these frees them.
                    return;
                }
            }
        };
        pending.extend(next);
        let before = pending.len();
        let (free, held): (Vec<_>, Vec<_>) = pending.into_iter().partition(|snapshot| Arc::strong_count(snapshot) == 1);
        pending = held;
        free.into_iter().for_each(free_snapshot);
        wait =
            if pending.len() < before { Duration::from_millis(1) } else { (wait * 2).min(Duration::from_millis(100)) };
    }
}

/// Frees a snapshot the caller holds the last reference to.
fn free_snapshot(snapshot: Arc<Snapshot>) {
    let Ok(snapshot) = Arc::try_unwrap(snapshot) else { return };
    let Snapshot { base, overlay, .. } = snapshot;
    drop(overlay);
    // A base shared with a later snapshot stays; one held by nothing else goes.
    if let Ok(base) = Arc::try_unwrap(base) {
        base.free_in_address_order();
    }
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex::new(Snapshot::default())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rebase_keeps_the_changes_made_while_compacting() {
        let digest = |n: u8| KeyDigest([n; 32]);
        let record = |id: &str| KeyRecord::builder(id).build();
        let start = Snapshot::build(1, (1..=4).map(|n| (digest(n), record(&format!("k{n}"))))).unwrap();
        // Folded by the compaction: k1 revoked, k5 added.
        let from = start.apply(2, [(digest(1), None), (digest(5), Some(record("k5")))]);
        let compacted = from.compact();
        // Made while it ran: k2 revoked, k5 replaced, k1 back, k6 added.
        let later = from.apply(
            3,
            [
                (digest(2), None),
                (digest(5), Some(record("k5-new"))),
                (digest(1), Some(record("k1-back"))),
                (digest(6), Some(record("k6"))),
            ],
        );
        let rebased = later.rebase(&from, &compacted).expect("same base");
        assert_eq!(rebased.version(), 3);
        assert_eq!(rebased.len(), later.len());
        assert_eq!(rebased.overlay_len(), 4, "only the later changes stay in the overlay");
        for n in 1..=6 {
            assert_eq!(
                rebased.get(&digest(n)).map(|r| r.id().to_owned()),
                later.get(&digest(n)).map(|r| r.id().to_owned()),
                "key {n}"
            );
        }
        let reloaded = Snapshot::build(4, [(digest(9), record("k9"))]).unwrap();
        assert!(reloaded.rebase(&from, &compacted).is_none(), "a reload in between makes the compaction useless");
    }

    use super::*;

    fn record(id: &str) -> KeyRecord {
        KeyRecord::builder(id).build()
    }

    fn imported(id: &str) -> KeyRecord {
        KeyRecord::builder(id).imported(true).build()
    }

    /// The imported records of `snapshot`, counted one by one.
    fn count_imported(snapshot: &Snapshot) -> usize {
        snapshot.records().filter(|(_, r)| r.imported()).count()
    }

    #[test]
    fn the_imported_count_follows_build_apply_compact_and_rebase() {
        let digest = |n: u8| KeyDigest([n; 32]);
        let start =
            Snapshot::build(1, [(digest(1), imported("i1")), (digest(2), record("k2")), (digest(3), imported("i3"))])
                .unwrap();
        assert_eq!(start.imported_len(), 2);
        assert!(start.has_imported());
        // Replaced by a native record, removed, added, replaced by an imported one, removed when absent.
        let next = start.apply(
            2,
            [
                (digest(1), Some(record("i1-native"))),
                (digest(3), None),
                (digest(4), Some(imported("i4"))),
                (digest(2), Some(imported("k2-imported"))),
                (digest(9), None),
            ],
        );
        assert_eq!(next.imported_len(), 2);
        assert_eq!(next.imported_len(), count_imported(&next));
        let compacted = next.compact();
        assert_eq!(compacted.imported_len(), count_imported(&compacted));
        let later = next.apply(3, [(digest(4), None), (digest(2), Some(record("k2-native")))]);
        assert!(!later.has_imported());
        let rebased = later.rebase(&next, &compacted).expect("same base");
        assert_eq!(rebased.imported_len(), 0);
        assert_eq!(count_imported(&rebased), 0);
        assert_eq!(start.imported_len(), 2, "the earlier snapshot is untouched");
        assert!(!Snapshot::build(1, [(digest(1), record("k"))]).unwrap().has_imported());
    }

    #[test]
    fn lookup_finds_records_by_digest() {
        let snapshot =
            Snapshot::build(1, [(KeyDigest::of("a"), record("key_a")), (KeyDigest::of("b"), record("key_b"))]).unwrap();
        assert_eq!(snapshot.get(&KeyDigest::of("a")).unwrap().id(), "key_a");
        assert_eq!(snapshot.get(&KeyDigest::of("b")).unwrap().id(), "key_b");
        assert!(snapshot.get(&KeyDigest::of("c")).is_none());
        assert_eq!(snapshot.len(), 2);
    }

    #[test]
    fn an_empty_index_finds_nothing() {
        let index = KeyIndex::default();
        assert!(index.load().get(&KeyDigest::of("a")).is_none());
        assert!(Snapshot::default().get(&KeyDigest::of("a")).is_none());
        assert!(Snapshot::build(1, []).unwrap().get(&KeyDigest::of("a")).is_none());
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
        assert_eq!(next.get(&KeyDigest::of("c")).unwrap().id(), "key_c");
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
        let mut ids: Vec<String> = compacted.records().map(|(_, r)| r.id().to_owned()).collect();
        ids.sort();
        assert_eq!(ids, ["k5", "k6", "k7", "k8", "k9", "new"]);
        let mut before: Vec<String> = changed.records().map(|(_, r)| r.id().to_owned()).collect();
        before.sort();
        assert_eq!(before, ids);
    }

    #[test]
    fn records_carry_the_digest_they_are_found_by() {
        let base =
            Snapshot::build(1, (0..100).map(|i| (KeyDigest::of(&i.to_string()), record(&format!("k{i}"))))).unwrap();
        let next = base.apply(2, [(KeyDigest::of("new"), Some(record("new")))]);
        for (digest, record) in next.records() {
            assert_eq!(&record.digest, digest);
            assert!(Arc::ptr_eq(next.get(digest).unwrap(), record));
        }
        let compacted = next.compact();
        assert_eq!(compacted.len(), 101);
        assert_eq!(compacted.get(&KeyDigest::of("new")).unwrap().id(), "new");
        assert_eq!(compacted.get(&KeyDigest::of("42")).unwrap().id(), "k42");
        assert!(compacted.get(&KeyDigest::of("100")).is_none());
    }

    #[test]
    fn compaction_replaces_changed_records_in_the_base() {
        let base = Snapshot::build(1, [(KeyDigest::of("a"), record("key_a"))]).unwrap();
        let revoked =
            base.apply(2, [(KeyDigest::of("a"), Some(KeyRecord::builder("key_a").status(KeyStatus::Revoked).build()))]);
        let compacted = revoked.compact();
        assert_eq!(compacted.get(&KeyDigest::of("a")).unwrap().status, KeyStatus::Revoked);
        assert_eq!(compacted.len(), 1);
        assert_eq!(base.get(&KeyDigest::of("a")).unwrap().status, KeyStatus::Active);
    }

    #[test]
    fn keys_with_equal_settings_share_one_policy() {
        let key = |id: &str, plan: &str| {
            KeyRecord::builder(id).plan(Some(plan.into())).scopes(vec!["orders:read".into()]).build()
        };
        let snapshot = Snapshot::build(
            1,
            [
                (KeyDigest::of("a"), key("key_a", "pro")),
                (KeyDigest::of("b"), key("key_b", "pro")),
                (KeyDigest::of("c"), key("key_c", "free")),
            ],
        )
        .unwrap();
        let get = |raw: &str| snapshot.get(&KeyDigest::of(raw)).unwrap();
        assert!(Arc::ptr_eq(get("a").policy(), get("b").policy()));
        assert!(!Arc::ptr_eq(get("a").policy(), get("c").policy()));
        assert_eq!(get("b").id_header(), "key_b");
        assert_eq!(get("c").plan_header().unwrap(), "free");
    }

    #[test]
    fn the_overlay_is_compacted_before_a_change_copies_too_much() {
        let small = Snapshot::build(1, (0..10).map(|i| (KeyDigest::of(&i.to_string()), record("k")))).unwrap();
        let changes = |n: usize| (0..n).map(|i| (KeyDigest::of(&format!("c{i}")), Some(record("c"))));
        assert!(!small.apply(2, changes(COMPACT_AT_LEAST - 1)).needs_compaction());
        assert!(small.apply(2, changes(COMPACT_AT_LEAST)).needs_compaction());
        assert_eq!(compaction_threshold(0), COMPACT_AT_LEAST);
        assert_eq!(compaction_threshold(100_000), 100_000 / COMPACT_BASE_DIVISOR);
        // However large the base, one change never copies more than COMPACT_AT_MOST entries.
        assert_eq!(compaction_threshold(10_000_000), COMPACT_AT_MOST);
    }

    #[test]
    fn a_reader_holding_the_old_snapshot_does_not_free_it() {
        let index = KeyIndex::default();
        index.publish(Snapshot::build(1, [(KeyDigest::of("a"), record("key_a"))]).unwrap());
        let weak_record = Arc::downgrade(index.load().get(&KeyDigest::of("a")).unwrap());
        let guard = index.load();
        index.publish(Snapshot::build(2, [(KeyDigest::of("b"), record("key_b"))]).unwrap());
        assert_eq!(guard.version(), 1, "the reader keeps a consistent old view");
        assert_eq!(Arc::strong_count(&guard), 2, "the guard and the reaper hold the old snapshot");
        drop(guard);
        // The reaper frees it soon after the reader lets go.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while weak_record.upgrade().is_some() {
            assert!(std::time::Instant::now() < deadline, "the old snapshot was never freed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(index.load().version(), 2);
    }

    impl KeyIndex {
        fn load_full_for_test(&self) -> Arc<Snapshot> {
            self.current.load_full()
        }
    }
}
