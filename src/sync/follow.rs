//! A gateway following a control plane's change feed.
//!
//! At start the follower loads a full snapshot; failing that, the last-known-good
//! cache file. It then long-polls for changes after its version and applies each
//! batch to the index as a small overlay, never copying the whole index; an
//! overgrown overlay is folded into a new base beside the request path. Every
//! applied state is written to the cache file atomically (temp file, rename).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::control::model::{Change, KeyChange, StoredKey};
use crate::index::{parse_cidr, KeyIndex, KeyRecord, Snapshot};
use crate::key::KeyDigest;
use crate::metrics::Metrics;
use crate::sync::LastSync;

/// How long one long poll may stay open.
pub const LONG_POLL: Duration = Duration::from_secs(25);
/// Retries stay frequent so a gateway catches up soon after its control plane returns.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("{0}")]
    Transport(String),
    #[error("the control plane refused the sync token")]
    Unauthorized,
    #[error("{0}")]
    Store(String),
}

/// One answer of the change feed.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeBatch {
    pub version: u64,
    pub changes: Vec<Change>,
    /// The feed is behind this gateway (its database was restored): start over.
    #[serde(default)]
    pub reset: bool,
}

/// Where a gateway's keys come from: a remote control plane, or the store in-process.
#[async_trait]
pub trait KeyFeed: Send + Sync {
    async fn snapshot(&self) -> Result<(u64, Vec<StoredKey>), FeedError>;
    async fn changes(&self, since: u64, wait: Duration) -> Result<ChangeBatch, FeedError>;
}

/// The record the request path uses, from the store's record; `None` if its hash is unusable.
///
/// The admin API and keys file refuse allowlist entries that are not addresses or
/// CIDRs, but a store edited by hand or by another version can still hold one. Such
/// a key admits no address (see [`unusable_allowlist_entries`]): skipping the entry
/// could leave an empty allowlist, which admits every address.
pub fn record_from_stored(key: &StoredKey) -> Option<(KeyDigest, KeyRecord)> {
    let digest = KeyDigest::parse(&key.hash).ok()?;
    let builder = KeyRecord::builder(key.id.clone())
        .name(key.name.clone())
        .owner(key.owner.clone())
        .plan(key.plan.clone())
        .scopes(key.scopes.clone())
        .rate_limit(key.rate_limit)
        .quota(key.quota)
        .status(key.status.into())
        .expires_at(key.expires_at)
        .metadata(key.metadata.clone())
        .tags(key.tags.clone())
        .imported(key.imported);
    let builder = match key.ip_allowlist.iter().map(|entry| parse_cidr(entry)).collect::<Option<Vec<_>>>() {
        Some(nets) => builder.ip_allowlist(nets),
        None => builder.unusable_ip_allowlist(),
    };
    Some((digest, builder.build()))
}

/// The entries of a stored allowlist that are not addresses or CIDRs.
pub fn unusable_allowlist_entries(key: &StoredKey) -> Vec<&str> {
    key.ip_allowlist.iter().filter(|entry| parse_cidr(entry).is_none()).map(String::as_str).collect()
}

/// The last-known-good file: the whole key set at one version.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u64,
    keys: Vec<StoredKey>,
}

pub struct Follower {
    feed: Arc<dyn KeyFeed>,
    index: Arc<KeyIndex>,
    metrics: Arc<Metrics>,
    cache_file: Option<PathBuf>,
    /// The current key set in the store's form, for the cache file.
    keys: std::sync::Mutex<std::collections::HashMap<String, StoredKey>>,
    /// The last successful contact with the feed.
    last_success: Arc<LastSync>,
    /// Wakes the cache writer; requests made while it writes coalesce into one more write.
    cache_requested: tokio::sync::Notify,
    cache_dirty: std::sync::atomic::AtomicBool,
    /// Held from reading the current snapshot to publishing the next, so a compaction
    /// finishing beside the sync cannot publish over a change.
    publishing: std::sync::Mutex<()>,
    compacting: std::sync::atomic::AtomicBool,
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
            cache_file,
            keys: std::sync::Mutex::new(Default::default()),
            last_success,
            cache_requested: tokio::sync::Notify::new(),
            cache_dirty: std::sync::atomic::AtomicBool::new(false),
            publishing: std::sync::Mutex::new(()),
            compacting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Loads the first key set: a snapshot from the feed, else the cache file.
    /// Returns false when neither could be had (the gateway is not ready yet).
    pub async fn start(&self, within: Duration) -> bool {
        match tokio::time::timeout(within, self.feed.snapshot()).await {
            Ok(Ok((version, keys))) => {
                self.install(version, keys);
                return true;
            }
            Ok(Err(e)) => {
                self.metrics.sync_errors.inc();
                tracing::warn!(error = %e, "cannot load keys from the control plane");
            }
            Err(_) => {
                self.metrics.sync_errors.inc();
                tracing::warn!("the control plane did not answer within {within:?}");
            }
        }
        let Some(path) = &self.cache_file else { return false };
        match read_cache(path) {
            Ok(cache) => {
                tracing::warn!(
                    file = %path.display(),
                    version = cache.version,
                    keys = cache.keys.len(),
                    "serving the last-known-good keys until the control plane answers"
                );
                self.install_without_success(cache.version, cache.keys);
                // The cached keys are as fresh as the sync that wrote them; a file
                // from the future (the clock stepped back since) counts as just written.
                if let Ok(written) = std::fs::metadata(path).and_then(|m| m.modified()) {
                    self.last_success.mark_age(SystemTime::now().duration_since(written).unwrap_or_default());
                }
                true
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "no usable last-known-good keys file");
                false
            }
        }
    }

    /// Follows the feed until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        tokio::spawn(Arc::clone(&self).write_cache_when_asked(shutdown.clone()));
        let mut backoff = Duration::from_millis(200);
        let mut synced = self.last_success.ever();
        loop {
            let step = async {
                if !synced {
                    let (version, keys) = self.feed.snapshot().await?;
                    self.install(version, keys);
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
                    let (version, keys) = self.feed.snapshot().await?;
                    self.install(version, keys);
                } else if !batch.changes.is_empty() {
                    Arc::clone(&self).apply(batch);
                }
                Ok(())
            };
            let result = tokio::select! {
                result = step => result,
                _ = shutdown.changed() => return,
            };
            match result {
                Ok(()) => {
                    synced = true;
                    backoff = Duration::from_millis(200);
                }
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

    /// Writes the cache file after every change, off the async workers; a write
    /// asked for while one is running becomes one more write, not many.
    async fn write_cache_when_asked(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.cache_requested.notified() => {}
                _ = shutdown.changed() => return,
            }
            self.write_cache_now().await;
        }
    }

    /// Writes the current key set to the cache file if it changed since the last write.
    pub async fn write_cache_now(self: &Arc<Self>) {
        if self.cache_file.is_none() || !self.cache_dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        if let Err(e) = tokio::task::spawn_blocking(move || this.write_cache()).await {
            tracing::warn!(error = %e, "the cache file writer stopped");
        }
    }

    fn mark_success(&self) {
        let now = OffsetDateTime::now_utc();
        self.last_success.mark();
        self.metrics.sync_last_success.set(now.unix_timestamp_nanos() as f64 / 1e9);
    }

    fn install(&self, version: u64, keys: Vec<StoredKey>) {
        self.install_without_success(version, keys);
        self.mark_success();
        self.request_cache_write();
    }

    fn request_cache_write(&self) {
        self.cache_dirty.store(true, Ordering::Release);
        self.cache_requested.notify_one();
    }

    fn install_without_success(&self, version: u64, keys: Vec<StoredKey>) {
        let records: Vec<(KeyDigest, KeyRecord)> = keys.iter().filter_map(|key| self.record(key)).collect();
        let snapshot = match Snapshot::build(version, records) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::error!(error = %e, "the control plane sent an inconsistent key set; keeping the current keys");
                return;
            }
        };
        let publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        self.publish(Arc::new(snapshot));
        drop(publishing);
        let mut by_id = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        *by_id = keys.into_iter().map(|k| (k.id.clone(), k)).collect();
    }

    fn apply(self: Arc<Self>, batch: ChangeBatch) {
        let publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.index.current();
        let mut by_id = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let mut changes = Vec::with_capacity(batch.changes.len());
        for change in batch.changes {
            match change.change {
                KeyChange::Upsert(key) => {
                    if let Some((digest, record)) = self.record(&key) {
                        changes.push((digest, Some(record)));
                    }
                    by_id.insert(key.id.clone(), key);
                }
                KeyChange::Delete { id, hash } => {
                    if let Ok(digest) = KeyDigest::parse(&hash) {
                        changes.push((digest, None));
                    }
                    by_id.remove(&id);
                }
            }
        }
        drop(by_id);
        let next = Arc::new(current.apply(batch.version, changes));
        self.publish(Arc::clone(&next));
        drop(publishing);
        if next.needs_compaction() && !self.compacting.swap(true, Ordering::AcqRel) {
            // Folding a large index takes most of a second: the change is live already,
            // and the folded base is published when it is ready.
            let this = Arc::clone(&self);
            tokio::task::spawn_blocking(move || this.compact_from(&next));
        }
        self.request_cache_write();
    }

    fn compact_from(&self, from: &Snapshot) {
        let compacted = from.compact();
        let publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rebased) = self.index.current().rebase(from, &compacted) {
            self.publish(Arc::new(rebased));
        }
        drop(publishing);
        self.compacting.store(false, Ordering::Release);
    }

    /// `record_from_stored`, logging and counting a key closed by an unusable allowlist.
    fn record(&self, key: &StoredKey) -> Option<(KeyDigest, KeyRecord)> {
        let entry = record_from_stored(key)?;
        if entry.1.ip_allowlist_unusable() {
            self.metrics.key_allowlist_errors.inc();
            tracing::error!(
                key_id = %key.id,
                entries = ?unusable_allowlist_entries(key),
                "ip_allowlist entries are not IP addresses or CIDRs: the key admits no address until they are fixed"
            );
        }
        Some(entry)
    }

    fn publish(&self, snapshot: Arc<Snapshot>) {
        self.metrics.keys_loaded.set(snapshot.len() as i64);
        self.metrics.key_index_version.set(snapshot.version() as i64);
        self.index.publish_shared(snapshot);
    }

    fn write_cache(&self) {
        let Some(path) = &self.cache_file else { return };
        let cache = {
            let by_id = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            CacheFile { version: self.index.current().version(), keys: by_id.values().cloned().collect() }
        };
        if let Err(e) = write_cache(path, &cache) {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the last-known-good keys file");
        }
    }
}

fn read_cache(path: &Path) -> std::io::Result<CacheFile> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

/// Temp file, fsync, rename: a reader sees the old file or the new one, never half.
fn write_cache(path: &Path, cache: &CacheFile) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let temp = path.with_extension(format!("tmp-{}-{stamp}", std::process::id()));
    let mut file = std::fs::File::create(&temp)?;
    serde_json::to_writer(&mut file, cache).map_err(std::io::Error::other)?;
    file.flush()?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::sample_key;

    /// A feed the test drives by calling `apply` itself.
    struct Unused;

    #[async_trait::async_trait]
    impl KeyFeed for Unused {
        async fn snapshot(&self) -> Result<(u64, Vec<StoredKey>), FeedError> {
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
            assert_eq!(unusable_allowlist_entries(&key), allowlist[allowlist.len() - 1..]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_runs_beside_the_sync_and_loses_no_change() {
        let index = Arc::new(KeyIndex::default());
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let follower =
            Arc::new(Follower::new(Arc::new(Unused), Arc::clone(&index), metrics, None, Arc::new(LastSync::new())));
        follower.install(0, vec![]);
        // One key per batch, well past the size at which the overlay is folded; the
        // compaction started by one batch runs while later batches are applied.
        let total = 5000;
        for n in 1..=total {
            let change = Change { version: n as u64, change: KeyChange::Upsert(stored(n)) };
            Arc::clone(&follower).apply(ChangeBatch { version: n as u64, changes: vec![change], reset: false });
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
