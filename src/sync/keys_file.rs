//! `keys.source: file`: the keys file is loaded at start, then watched.
//!
//! Changes are noticed through inotify (the parent directory is watched, so
//! editors and tools that replace the file by rename are seen too), with a
//! metadata poll as a fallback. A file that fails to parse is refused as a
//! whole and the keys already loaded keep serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::Notify;

use crate::config::{ConfigErrors, PlanConfig};
use crate::index::{load_keys_file, KeyIndex, Snapshot};
use crate::metrics::Metrics;

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// How often the file's metadata is compared when no event arrives.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Writers often touch a file several times in a row; wait for them to finish.
const SETTLE_DELAY: Duration = Duration::from_millis(100);

pub struct KeysFileSource {
    path: PathBuf,
    /// The plans a key may name; replaced when the config is reloaded.
    plans: ArcSwap<BTreeMap<String, PlanConfig>>,
    index: Arc<KeyIndex>,
    metrics: Arc<Metrics>,
    version: AtomicU64,
    reload_requested: Arc<Notify>,
    /// The file as it was when last read: the watcher compares with this, so a change
    /// made before the watcher started is not taken for the version already loaded.
    loaded: std::sync::Mutex<Option<Fingerprint>>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysFileLoadError {
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("{0}")]
    Snapshot(#[from] crate::index::SnapshotError),
}

/// Identifies one version of the file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Fingerprint { modified: meta.modified().ok(), len: meta.len(), inode: meta.ino() })
}

impl KeysFileSource {
    pub fn new(
        path: PathBuf,
        plans: BTreeMap<String, PlanConfig>,
        index: Arc<KeyIndex>,
        metrics: Arc<Metrics>,
    ) -> Self {
        KeysFileSource {
            path,
            plans: ArcSwap::from_pointee(plans),
            index,
            metrics,
            version: AtomicU64::new(0),
            reload_requested: Arc::new(Notify::new()),
            loaded: std::sync::Mutex::new(None),
        }
    }

    pub fn set_plans(&self, plans: BTreeMap<String, PlanConfig>) {
        self.plans.store(Arc::new(plans));
    }

    /// Asks the watcher to reload now (SIGHUP).
    pub fn request_reload(&self) {
        self.reload_requested.notify_one();
    }

    /// Loads the file and publishes it; on error the index is left as it was.
    pub fn reload(&self) -> Result<usize, KeysFileLoadError> {
        let result = self.load_and_publish();
        match &result {
            Ok(count) => {
                self.metrics.keys_loaded.set(*count as i64);
                self.metrics.key_index_version.set(self.version.load(Ordering::Relaxed) as i64);
                self.metrics.sync_last_success.set(unix_seconds());
            }
            Err(_) => self.metrics.sync_errors.inc(),
        }
        result
    }

    fn load_and_publish(&self) -> Result<usize, KeysFileLoadError> {
        // Taken before reading: a change during the read shows at the next look.
        let seen = fingerprint(&self.path);
        *self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = seen;
        let records = load_keys_file(&self.path, &self.plans.load()).map_err(KeysFileLoadError::Invalid)?;
        let version = self.version.load(Ordering::Relaxed) + 1;
        let snapshot = Snapshot::build(version, records)?;
        let count = snapshot.len();
        self.index.publish(snapshot);
        self.version.store(version, Ordering::Relaxed);
        Ok(count)
    }

    /// Follows the file until `shutdown` fires.
    pub async fn watch(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let _watcher = self.start_inotify();
        loop {
            let woken = tokio::select! {
                _ = self.reload_requested.notified() => true,
                _ = tokio::time::sleep(POLL_INTERVAL) => false,
                _ = shutdown.changed() => return,
            };
            if woken {
                tokio::time::sleep(SETTLE_DELAY).await;
            }
            let current = fingerprint(&self.path);
            if !woken && current == *self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) {
                continue;
            }
            match self.reload() {
                Ok(count) => {
                    tracing::info!(file = %self.path.display(), keys = count, "keys file reloaded")
                }
                Err(e) => tracing::error!(
                    file = %self.path.display(),
                    "keys file refused, the previously loaded keys stay in use:\n{e}"
                ),
            }
        }
    }

    fn start_inotify(&self) -> Option<notify::RecommendedWatcher> {
        let file_name = self.path.file_name()?.to_owned();
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let wake = Arc::clone(&self.reload_requested);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                let touches_file = event.paths.iter().any(|p| p.file_name() == Some(file_name.as_os_str()));
                if touches_file && !event.kind.is_access() {
                    wake.notify_one();
                }
            }
        });
        match watcher.and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w)) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the keys file's directory; polling only");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_HASH: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    #[tokio::test]
    async fn a_file_replaced_before_the_watcher_starts_is_still_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, "keys: []\n").unwrap();
        let index = Arc::new(KeyIndex::default());
        let metrics = Arc::new(Metrics::new().unwrap());
        let source = Arc::new(KeysFileSource::new(path.clone(), BTreeMap::new(), Arc::clone(&index), metrics));
        assert_eq!(source.reload().unwrap(), 0);
        // Replaced by a rename between the first load and the watcher's start.
        let next = dir.path().join("keys.yaml.new");
        std::fs::write(&next, format!("keys:\n  - {{ id: key_a, name: a, hash: \"{KEY_HASH}\" }}\n")).unwrap();
        std::fs::rename(&next, &path).unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let watching = tokio::spawn({
            let source = Arc::clone(&source);
            async move { source.watch(stopped).await }
        });
        let deadline = tokio::time::Instant::now() + POLL_INTERVAL * 3;
        while index.load().len() != 1 {
            assert!(tokio::time::Instant::now() < deadline, "the replaced file was never loaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop.send(true);
        watching.await.unwrap();
    }
}
