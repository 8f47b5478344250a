//! A gateway following a control plane's change feed.
//!
//! At start the follower loads its last-known-good files, if any, and brings
//! them up to date with the changes since their version; without them it loads
//! a snapshot, built into the index as it streams in and published only whole.
//! It then long-polls for changes after its version and applies each batch to
//! the index as a small overlay, never copying the whole index; an overgrown
//! overlay is folded into a new base beside the request path. The follower keeps
//! no copy of the keys of its own: the last-known-good files are written from
//! the index and from the batches as applied (`cache_file`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::cache_file::{CacheError, LastKnownGood};
use crate::control::model::{Change, KeyChange, StoredKey};
use crate::index::wire::UnusableAllowlists;
use crate::index::{KeyIndex, KeyRecord, SharedPolicies, Snapshot};
use crate::key::KeyDigest;
use crate::metrics::Metrics;
use crate::sync::LastSync;

/// How long one long poll may stay open.
pub const LONG_POLL: Duration = Duration::from_secs(25);
/// Retries stay frequent so a gateway catches up soon after its control plane returns.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a control plane may take to start answering a snapshot request once the
/// gateway is running; a snapshot that keeps flowing may take longer than this.
const SNAPSHOT_ANSWER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("{0}")]
    Transport(String),
    #[error("the control plane refused the sync token")]
    Unauthorized,
    #[error("{0}")]
    Store(String),
    #[error("the control plane sent a key set that does not check out: {0}")]
    KeySet(#[from] crate::index::wire::WireError),
    #[error("the control plane's feed is behind this gateway (its database was restored)")]
    Behind,
}

pub use crate::control::model::ChangeBatch;

/// A whole key set, loaded and checked.
pub struct LoadedKeys {
    pub snapshot: Snapshot,
    pub unusable: UnusableAllowlists,
}

/// Where a gateway's keys come from: a remote control plane, or the store in-process.
#[async_trait]
pub trait KeyFeed: Send + Sync {
    /// The whole key set, built into a snapshot as it arrives and returned only
    /// complete. The source must start answering within `answer_within`.
    async fn snapshot(&self, answer_within: Duration) -> Result<LoadedKeys, FeedError>;
    async fn changes(&self, since: u64, wait: Duration) -> Result<ChangeBatch, FeedError>;
}

/// The record the request path uses, from the store's record; `None` if its hash is unusable.
///
/// The admin API and keys file refuse allowlist entries that are not addresses or
/// CIDRs, but a store edited by hand or by another version can still hold one. Such
/// a key admits no address: skipping the entry
/// could leave an empty allowlist, which admits every address.
pub fn record_from_stored(key: &StoredKey) -> Option<(KeyDigest, KeyRecord)> {
    crate::control::snapshot::wire_key(key).map(|wire| wire.to_record())
}

pub struct Follower {
    feed: Arc<dyn KeyFeed>,
    index: Arc<KeyIndex>,
    metrics: Arc<Metrics>,
    cache: Option<Arc<LastKnownGood>>,
    /// The last successful contact with the feed.
    last_success: Arc<LastSync>,
    /// Held from reading the current snapshot to publishing the next, so a compaction
    /// finishing beside the sync cannot publish over a change.
    publishing: Arc<std::sync::Mutex<()>>,
    compacting: Arc<std::sync::atomic::AtomicBool>,
}

impl Follower {
    /// `last_success` (the last successful sync) is shared with the request path's
    /// staleness check.
    pub fn new(
        feed: Arc<dyn KeyFeed>,
        index: Arc<KeyIndex>,
        metrics: Arc<Metrics>,
        cache_file: Option<PathBuf>,
        last_success: Arc<LastSync>,
    ) -> Self {
        Follower {
            feed,
            index,
            metrics,
            cache: cache_file.map(|path| Arc::new(LastKnownGood::new(path))),
            last_success,
            publishing: Arc::default(),
            compacting: Arc::default(),
        }
    }

    /// Loads the first key set: the last-known-good files brought up to date by the
    /// feed (or as they are, if the feed does not answer within `within`), else a
    /// snapshot from the feed. Returns false when neither could be had (the gateway
    /// is not ready yet).
    pub async fn start(&self, within: Duration) -> bool {
        if let Some(cache) = &self.cache {
            let reading = Arc::clone(cache);
            match tokio::task::spawn_blocking(move || reading.load()).await {
                Ok(Ok(loaded)) => {
                    self.log_unusable(&loaded.unusable);
                    tracing::info!(
                        file = %cache.path().display(),
                        version = loaded.snapshot.version(),
                        keys = loaded.snapshot.len(),
                        batches = loaded.batches,
                        "loaded the last-known-good keys"
                    );
                    let age = loaded.age;
                    // Brought up to date before it is published, so a key revoked while
                    // this gateway was down is never served when the control plane answers.
                    let mut snapshot = loaded.snapshot;
                    let mut touched = Vec::new();
                    let deadline = tokio::time::Instant::now() + within;
                    let outcome = tokio::time::timeout_at(deadline, async {
                        loop {
                            let batch = self.feed.changes(snapshot.version(), Duration::ZERO).await?;
                            if batch.reset {
                                return Err(FeedError::Behind);
                            }
                            if batch.changes.is_empty() {
                                return Ok(());
                            }
                            let (changes, unusable) = records_of(batch.changes);
                            self.log_unusable(&unusable);
                            touched.extend(changes.iter().map(|(digest, _)| *digest));
                            snapshot = snapshot.apply(batch.version, changes);
                        }
                    })
                    .await;
                    if snapshot.needs_compaction() {
                        snapshot = compact_beside(snapshot).await;
                    }
                    let snapshot = Arc::new(snapshot);
                    self.publish_locked(Arc::clone(&snapshot));
                    if !touched.is_empty() {
                        cache.changes_applied(
                            snapshot.version(),
                            touched.iter().map(|d| (*d, snapshot.get(d).cloned())).collect(),
                        );
                    }
                    match outcome {
                        Ok(Ok(())) => self.mark_success(),
                        outcome => {
                            self.metrics.sync_errors.inc();
                            match outcome {
                                Ok(Err(e)) => {
                                    tracing::warn!(error = %e, "cannot bring the last-known-good keys up to date")
                                }
                                _ => tracing::warn!("the control plane did not answer within {within:?}"),
                            }
                            tracing::warn!("serving the last-known-good keys until the control plane answers");
                            // The cached keys are as fresh as the sync that wrote them.
                            self.last_success.mark_age(age);
                        }
                    }
                    return true;
                }
                Ok(Err(CacheError::Missing)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "refusing the last-known-good keys file"),
                Err(e) => tracing::error!(error = %e, "the last-known-good reader stopped"),
            }
        }
        match self.fetch_snapshot(within).await {
            Ok(loaded) => {
                self.install(loaded);
                true
            }
            Err(e) => {
                self.metrics.sync_errors.inc();
                tracing::warn!(error = %e, "cannot load keys from the control plane");
                false
            }
        }
    }

    /// Follows the feed until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        if let Some(cache) = &self.cache {
            tokio::spawn(Arc::clone(cache).run(Arc::clone(&self.index), shutdown.clone()));
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            let step = async {
                if !self.index.is_loaded() {
                    let loaded = self.fetch_snapshot(SNAPSHOT_ANSWER).await?;
                    self.install(loaded);
                    return Ok::<(), FeedError>(());
                }
                let since = self.index.current().version();
                let batch = self.feed.changes(since, LONG_POLL).await?;
                self.mark_success();
                if batch.reset {
                    tracing::warn!(
                        since,
                        feed = batch.version,
                        "the control plane's feed is behind this gateway; reloading"
                    );
                    let loaded = self.fetch_snapshot(SNAPSHOT_ANSWER).await?;
                    self.install(loaded);
                } else if !batch.changes.is_empty() {
                    self.apply(batch);
                }
                Ok(())
            };
            let result = tokio::select! {
                result = step => result,
                _ = shutdown.changed() => return,
            };
            match result {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    self.metrics.sync_errors.inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "key sync failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Writes pending changes to the last-known-good files now (at shutdown).
    pub async fn write_cache_now(&self) {
        if let Some(cache) = &self.cache {
            cache.flush(&self.index).await;
        }
    }

    fn mark_success(&self) {
        let now = OffsetDateTime::now_utc();
        self.last_success.mark();
        self.metrics.sync_last_success.set(now.unix_timestamp_nanos() as f64 / 1e9);
    }

    fn install(&self, loaded: LoadedKeys) {
        self.log_unusable(&loaded.unusable);
        self.publish_locked(Arc::new(loaded.snapshot));
        self.mark_success();
        if let Some(cache) = &self.cache {
            cache.snapshot_replaced();
        }
    }

    fn publish_locked(&self, snapshot: Arc<Snapshot>) {
        let publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        self.publish(snapshot);
        drop(publishing);
    }

    fn log_unusable(&self, unusable: &UnusableAllowlists) {
        if unusable.count == 0 {
            return;
        }
        self.metrics.key_allowlist_errors.inc_by(unusable.count);
        tracing::error!(
            keys = unusable.count,
            examples = ?unusable.examples,
            "ip_allowlist entries are not IP addresses or CIDRs: these keys admit no address until they are fixed"
        );
    }

    /// A snapshot from the feed with the changes made while it was read applied,
    /// before anything is published: its pages were read one after another, so a
    /// key changed meanwhile may show an older state until then.
    async fn fetch_snapshot(&self, answer_within: Duration) -> Result<LoadedKeys, FeedError> {
        let mut loaded = self.feed.snapshot(answer_within).await?;
        loop {
            let batch = self.feed.changes(loaded.snapshot.version(), Duration::ZERO).await?;
            if batch.reset {
                return Err(FeedError::Behind);
            }
            if batch.changes.is_empty() {
                if loaded.snapshot.needs_compaction() {
                    loaded.snapshot = compact_beside(loaded.snapshot).await;
                }
                return Ok(loaded);
            }
            let (changes, unusable) = records_of(batch.changes);
            loaded.unusable.count += unusable.count;
            loaded.snapshot = loaded.snapshot.apply(batch.version, changes);
        }
    }

    fn apply(&self, batch: ChangeBatch) {
        let publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.index.current();
        let (changes, unusable) = records_of(batch.changes);
        let digests: Vec<KeyDigest> = changes.iter().map(|(digest, _)| *digest).collect();
        let next = Arc::new(current.apply(batch.version, changes));
        self.publish(Arc::clone(&next));
        drop(publishing);
        self.log_unusable(&unusable);
        if let Some(cache) = &self.cache {
            cache.changes_applied(batch.version, digests.iter().map(|d| (*d, next.get(d).cloned())).collect());
        }
        if next.needs_compaction() && !self.compacting.swap(true, Ordering::AcqRel) {
            // Folding a large index takes most of a second: the change is live already,
            // and the folded base is published when it is ready.
            let (index, metrics) = (Arc::clone(&self.index), Arc::clone(&self.metrics));
            let (publishing, compacting) = (Arc::clone(&self.publishing), Arc::clone(&self.compacting));
            tokio::task::spawn_blocking(move || {
                let compacted = next.compact();
                let guard = publishing.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(rebased) = index.current().rebase(&next, &compacted) {
                    publish(&index, &metrics, Arc::new(rebased));
                }
                drop(guard);
                compacting.store(false, Ordering::Release);
            });
        }
    }

    fn publish(&self, snapshot: Arc<Snapshot>) {
        publish(&self.index, &self.metrics, snapshot);
    }
}

/// `snapshot` with its overlay folded, on a blocking thread (it takes most of a
/// second at ten million keys).
async fn compact_beside(snapshot: Snapshot) -> Snapshot {
    let snapshot = Arc::new(snapshot);
    let folding = Arc::clone(&snapshot);
    match tokio::task::spawn_blocking(move || folding.compact()).await {
        Ok(compacted) => compacted,
        Err(_) => Arc::unwrap_or_clone(snapshot),
    }
}

/// The records a batch of changes sets (`None`: removes), and the keys among them
/// that an unusable allowlist closes.
fn records_of(batch: Vec<Change>) -> (Vec<(KeyDigest, Option<KeyRecord>)>, UnusableAllowlists) {
    let mut changes = Vec::with_capacity(batch.len());
    let mut unusable = UnusableAllowlists::default();
    let mut policies = SharedPolicies::default();
    for change in batch {
        match change.change {
            KeyChange::Upsert(key) => {
                if let Some(wire) = crate::control::snapshot::wire_key(&key) {
                    unusable.note(&wire);
                    let (digest, record) = wire.to_builder();
                    changes.push((digest, Some(record.build_sharing(&mut policies))));
                }
            }
            KeyChange::Delete { hash, .. } => {
                if let Ok(digest) = KeyDigest::parse(&hash) {
                    changes.push((digest, None));
                }
            }
        }
    }
    (changes, unusable)
}

fn publish(index: &KeyIndex, metrics: &Metrics, snapshot: Arc<Snapshot>) {
    metrics.keys_loaded.set(snapshot.len() as i64);
    metrics.key_index_version.set(snapshot.version() as i64);
    index.publish_shared(snapshot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::sample_key;

    /// A feed the test drives by calling `apply` itself.
    struct Unused;

    #[async_trait::async_trait]
    impl KeyFeed for Unused {
        async fn snapshot(&self, _answer_within: Duration) -> Result<LoadedKeys, FeedError> {
            unreachable!("the test applies batches itself")
        }
        async fn changes(&self, _since: u64, _wait: Duration) -> Result<ChangeBatch, FeedError> {
            unreachable!("the test applies batches itself")
        }
    }

    fn stored(n: usize) -> StoredKey {
        let hash = format!("sha256:{}", hex::encode(KeyDigest::of(&format!("raw-{n}")).0));
        StoredKey { version: n as u64, ..sample_key(&format!("key_{n}"), hash) }
    }

    #[test]
    fn an_unparsable_allowlist_entry_admits_no_address() {
        for allowlist in [vec!["banana"], vec!["127.0.0.0/8", "10.0.0.0/33"]] {
            let key = StoredKey { ip_allowlist: allowlist.iter().map(|s| s.to_string()).collect(), ..stored(1) };
            let (_, record) = record_from_stored(&key).expect("a record with a good hash is built");
            for ip in ["127.0.0.1", "10.1.2.3", "203.0.113.9", "2001:db8::1"] {
                assert!(!record.allows_ip(ip.parse().unwrap()), "{allowlist:?} admits {ip}");
            }
            let wire = crate::control::snapshot::wire_key(&key).unwrap();
            assert_eq!(wire.unusable_allowlist_entries(), allowlist[allowlist.len() - 1..]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_runs_beside_the_sync_and_loses_no_change() {
        let index = Arc::new(KeyIndex::default());
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let follower =
            Arc::new(Follower::new(Arc::new(Unused), Arc::clone(&index), metrics, None, Arc::new(LastSync::new())));
        follower.install(LoadedKeys { snapshot: Snapshot::default(), unusable: Default::default() });
        // One key per batch, well past the size at which the overlay is folded; the
        // compaction started by one batch runs while later batches are applied.
        let total = 5000;
        for n in 1..=total {
            let change = Change { version: n as u64, change: KeyChange::Upsert(stored(n)) };
            follower.apply(ChangeBatch { version: n as u64, changes: vec![change], reset: false });
            let live = index.current();
            assert_eq!(live.len(), n, "every change is live as soon as it is applied");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while follower.compacting.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let live = index.current();
        assert_eq!(live.version(), total as u64);
        assert_eq!(live.len(), total);
        assert!(live.overlay_len() < total, "the overlay was folded at least once: {}", live.overlay_len());
        for n in 1..=total {
            assert!(live.get(&KeyDigest::of(&format!("raw-{n}"))).is_some(), "key {n} is present");
        }
    }
}
