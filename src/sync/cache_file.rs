//! The last-known-good keys: what a gateway serves when it starts while its
//! control plane is down.
//!
//! Two files in the wire encoding (`index::wire`): `cache_file` holds a whole
//! snapshot, written from the live index now and then; `cache_file` + `.changes`
//! holds the change batches applied since, appended at most once a second. A
//! change therefore costs an append of its own size, never a rewrite of millions
//! of keys; the snapshot is rewritten when the log has grown to a share of it,
//! at most once a minute. Both are written to a temporary file, synced and
//! renamed, so a reader sees a whole file or the previous one. The log's start
//! frame names the snapshot it follows (a random id), so a log left beside a
//! newer snapshot by a crash is ignored. Every frame has a checksum: a snapshot
//! file that fails any check is refused whole; a log is applied up to its last
//! whole batch (a torn tail is the normal result of a crash mid-append), which
//! gives a consistent, slightly older key set that the feed then brings up to date.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::index::wire::{self, FileFrames, Frame, FrameWriter, KeySetLoader, UnusableAllowlists, WireChange, WireKey};
use crate::index::{KeyIndex, KeyRecord, Snapshot};
use crate::key::KeyDigest;

/// Changes are appended at most this often.
pub const APPEND_EVERY: Duration = Duration::from_secs(1);
/// The snapshot file is rewritten at most this often, unless the log grows far past its share.
const REWRITE_EVERY_AT_MOST: Duration = Duration::from_secs(60);
/// Keys per frame in the snapshot file.
const KEYS_PER_FRAME: usize = 1000;

/// The log's share of the snapshot at which the snapshot is rewritten.
fn log_limit(snapshot_keys: usize) -> usize {
    (snapshot_keys / 16).max(65_536)
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("no last-known-good file yet")]
    Missing,
    #[error("{file}: {error}")]
    Unreadable { file: PathBuf, error: wire::WireError },
}

/// What was loaded at start.
pub struct LoadedCache {
    pub snapshot: Snapshot,
    pub unusable: UnusableAllowlists,
    /// Time since the newer of the two files was written.
    pub age: Duration,
    /// Change batches applied from the log.
    pub batches: usize,
}

/// A change batch as applied: the final record of each digest it touched.
type Batch = (u64, Vec<(KeyDigest, Option<Arc<KeyRecord>>)>);

#[derive(Default)]
struct Pending {
    /// The index was replaced whole: the next write is a snapshot.
    rewrite: bool,
    batches: Vec<Batch>,
}

/// The snapshot file on disk that the log follows.
#[derive(Clone, Copy)]
struct Written {
    id: u64,
    version: u64,
    keys: usize,
}

#[derive(Default)]
struct WriterState {
    written: Option<Written>,
    /// Open for appending, positioned at its end; `None` until the first append.
    log: Option<File>,
    log_entries: usize,
    last_rewrite: Option<Instant>,
}

pub struct LastKnownGood {
    path: PathBuf,
    log_path: PathBuf,
    pending: Mutex<Pending>,
    writer: Mutex<WriterState>,
}

impl LastKnownGood {
    pub fn new(path: PathBuf) -> Self {
        let mut log_path = path.clone().into_os_string();
        log_path.push(".changes");
        LastKnownGood { path, log_path: PathBuf::from(log_path), pending: Mutex::default(), writer: Mutex::default() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the snapshot file and applies its log. Blocking: at ten million keys
    /// this reads about a gigabyte.
    pub fn load(&self) -> Result<LoadedCache, CacheError> {
        let unreadable = |file: &Path, error: wire::WireError| CacheError::Unreadable { file: file.to_owned(), error };
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CacheError::Missing),
            Err(e) => return Err(unreadable(&self.path, e.into())),
        };
        let mut written_at = modified(&file);
        let mut frames =
            FileFrames::open(BufReader::with_capacity(1 << 20, file)).map_err(|e| unreadable(&self.path, e))?;
        let mut loader = KeySetLoader::new();
        while let Some(frame) = frames.next_frame().map_err(|e| unreadable(&self.path, e))? {
            loader.frame(frame).map_err(|e| unreadable(&self.path, e))?;
        }
        let id = loader.id().unwrap_or_default();
        let (mut snapshot, unusable) = loader.finish().map_err(|e| unreadable(&self.path, e))?;
        let written = Written { id, version: snapshot.version(), keys: snapshot.len() };

        let (batches, log_entries, log) = self.replay_log(&mut snapshot, written);
        if batches > 0 {
            if let Some(log) = &log {
                written_at = written_at.max(modified(log));
            }
        }
        if snapshot.needs_compaction() {
            snapshot = snapshot.compact();
        }
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        *writer = WriterState { written: Some(written), log, log_entries, last_rewrite: None };
        let age = SystemTime::now().duration_since(written_at).unwrap_or_default();
        Ok(LoadedCache { snapshot, unusable, age, batches })
    }

    /// Applies the log's batches newer than the snapshot, up to the first frame that
    /// does not check out, and cuts the log there so later appends follow whole frames.
    /// Returns the batches applied, the entries the log keeps, and the log to append to.
    fn replay_log(&self, snapshot: &mut Snapshot, written: Written) -> (usize, usize, Option<File>) {
        let file = match OpenOptions::new().read(true).write(true).open(&self.log_path) {
            Ok(file) => file,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(file = %self.log_path.display(), error = %e, "cannot read the key change log");
                }
                return (0, 0, None);
            }
        };
        let Ok(reader) = file.try_clone() else { return (0, 0, None) };
        let mut frames = match FileFrames::open(BufReader::new(reader)) {
            Ok(frames) => frames,
            Err(e) => {
                tracing::warn!(file = %self.log_path.display(), error = %e, "ignoring an unreadable key change log");
                return (0, 0, None);
            }
        };
        match frames.next_frame() {
            Ok(Some(Frame::Start { id, version, .. })) if id == written.id && version == written.version => {}
            _ => {
                // A log of an earlier snapshot file (a crash between the two renames).
                tracing::info!(file = %self.log_path.display(), "the key change log belongs to another snapshot file; ignoring it");
                return (0, 0, None);
            }
        }
        let (mut batches, mut entries) = (0, 0);
        let mut good_end = frames.position();
        loop {
            match frames.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Changes { version, changes })) => {
                    entries += changes.len();
                    if version > snapshot.version() {
                        *snapshot = snapshot.apply(version, wire::changes_to_records(&changes));
                        batches += 1;
                    }
                    good_end = frames.position();
                }
                Ok(Some(_)) => {
                    tracing::warn!(file = %self.log_path.display(), "a frame that is not a change batch in the key change log; stopping there");
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        file = %self.log_path.display(),
                        error = %e,
                        "the key change log ends in a torn or corrupt batch; using the batches before it"
                    );
                    break;
                }
            }
        }
        drop(frames);
        let mut file = file;
        let positioned = file.set_len(good_end).and_then(|()| file.seek(io::SeekFrom::End(0)).map(|_| ()));
        match positioned {
            Ok(()) => (batches, entries, Some(file)),
            Err(e) => {
                tracing::warn!(file = %self.log_path.display(), error = %e, "cannot cut the key change log; it will be rewritten");
                (batches, entries, None)
            }
        }
    }

    /// The index was replaced whole: the next write rewrites the snapshot file.
    pub fn snapshot_replaced(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.rewrite = true;
        pending.batches.clear();
    }

    /// A batch was applied to the index: `changes` holds the final record of each
    /// digest it touched (`None`: removed).
    pub fn changes_applied(&self, version: u64, changes: Vec<(KeyDigest, Option<Arc<KeyRecord>>)>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.batches.push((version, changes));
    }

    fn has_pending(&self) -> bool {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.rewrite || !pending.batches.is_empty()
    }

    /// Writes what is pending, from the index's current snapshot. Blocking.
    pub fn write_pending(&self, index: &KeyIndex) {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Pending { rewrite, batches } = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let new_entries: usize = batches.iter().map(|(_, changes)| changes.len()).sum();
        let due = match writer.written {
            None => true,
            Some(written) => {
                let limit = log_limit(written.keys);
                let over = writer.log_entries + new_entries;
                let rested = writer.last_rewrite.is_none_or(|at| at.elapsed() >= REWRITE_EVERY_AT_MOST);
                rewrite || (over > limit && rested) || over > 4 * limit
            }
        };
        if due {
            let snapshot = index.current();
            match self.rewrite(&snapshot) {
                Ok(written) => {
                    writer.written = Some(written);
                    writer.log = None;
                    writer.log_entries = 0;
                    writer.last_rewrite = Some(Instant::now());
                }
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot write the last-known-good keys file");
                    // Try again at the next write.
                    self.pending.lock().unwrap_or_else(|p| p.into_inner()).rewrite = true;
                    return;
                }
            }
        }
        let Some(written) = writer.written else { return };
        let newer: Vec<&Batch> = batches.iter().filter(|(version, _)| *version > written.version).collect();
        if newer.is_empty() {
            return;
        }
        match self.append(&mut writer, &newer) {
            Ok(entries) => writer.log_entries += entries,
            Err(e) => {
                tracing::warn!(file = %self.log_path.display(), error = %e, "cannot append to the key change log; rewriting the snapshot file next");
                writer.log = None;
                self.pending.lock().unwrap_or_else(|p| p.into_inner()).rewrite = true;
            }
        }
    }

    /// Writes `snapshot` whole, then a fresh log that follows it.
    fn rewrite(&self, snapshot: &Snapshot) -> io::Result<Written> {
        let id = rand::random::<u64>();
        let version = snapshot.version();
        let keys = snapshot.len();
        write_atomically(&self.path, |out| {
            let mut writer = FrameWriter::create(out)?;
            writer.write(&Frame::Start { version, keys: keys as u64, id })?;
            let mut chunk: Vec<WireKey<'_>> = Vec::with_capacity(KEYS_PER_FRAME);
            let mut sent = 0u64;
            for (_, record) in snapshot.records() {
                chunk.push(WireKey::from_record(record));
                if chunk.len() == KEYS_PER_FRAME {
                    sent += chunk.len() as u64;
                    writer.write(&Frame::Keys(std::mem::take(&mut chunk)))?;
                }
            }
            if !chunk.is_empty() {
                sent += chunk.len() as u64;
                writer.write(&Frame::Keys(chunk))?;
            }
            writer.write(&Frame::End { version, keys: sent })
        })?;
        write_atomically(&self.log_path, |out| {
            FrameWriter::create(out)?.write(&Frame::Start { version, keys: keys as u64, id })
        })?;
        Ok(Written { id, version, keys })
    }

    fn append(&self, writer: &mut WriterState, batches: &[&Batch]) -> io::Result<usize> {
        if writer.log.is_none() {
            let log = OpenOptions::new().append(true).open(&self.log_path)?;
            writer.log = Some(log);
        }
        let Some(log) = writer.log.as_mut() else { return Ok(0) };
        let mut out = FrameWriter::append(BufWriter::new(&*log));
        let mut entries = 0;
        for (version, changes) in batches {
            let changes: Vec<WireChange<'_>> = changes
                .iter()
                .map(|(digest, record)| WireChange {
                    digest: digest.0,
                    key: record.as_deref().map(WireKey::from_record),
                })
                .collect();
            entries += changes.len();
            out.write(&Frame::Changes { version: *version, changes })?;
        }
        out.into_inner().flush()?;
        log.sync_data()?;
        Ok(entries)
    }

    /// Writes pending changes at most once per [`APPEND_EVERY`] until `shutdown`.
    pub async fn run(self: Arc<Self>, index: Arc<KeyIndex>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(APPEND_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            if !self.has_pending() {
                continue;
            }
            let (this, index) = (Arc::clone(&self), Arc::clone(&index));
            if let Err(e) = tokio::task::spawn_blocking(move || this.write_pending(&index)).await {
                tracing::warn!(error = %e, "the last-known-good writer stopped");
            }
        }
    }

    /// Writes what is pending now (at shutdown).
    pub async fn flush(self: &Arc<Self>, index: &Arc<KeyIndex>) {
        if !self.has_pending() {
            return;
        }
        let (this, index) = (Arc::clone(self), Arc::clone(index));
        if let Err(e) = tokio::task::spawn_blocking(move || this.write_pending(&index)).await {
            tracing::warn!(error = %e, "the last-known-good writer stopped");
        }
    }
}

fn modified(file: &File) -> SystemTime {
    file.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Temp file, write, fsync, rename, fsync the directory: a reader sees the old file
/// or the new one, never half, and the rename survives a power cut.
fn write_atomically(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(format!(".tmp-{}-{stamp}", std::process::id()));
    let temp = dir.join(temp_name);
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&temp)?);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> KeyRecord {
        KeyRecord::builder(format!("key_{n}")).owner(Some(format!("o{}", n % 5))).scopes(vec!["a:b".into()]).build()
    }

    fn digest(n: usize) -> KeyDigest {
        KeyDigest::of(&format!("raw-{n}"))
    }

    fn index_with(version: u64, keys: std::ops::Range<usize>) -> Arc<KeyIndex> {
        let index = Arc::new(KeyIndex::default());
        index.publish(Snapshot::build(version, keys.map(|n| (digest(n), record(n)))).unwrap());
        index
    }

    /// An index of `keys` at `version` and its cache files just written, in a temp dir.
    fn written_from(
        version: u64,
        keys: std::ops::Range<usize>,
    ) -> (tempfile::TempDir, PathBuf, Arc<KeyIndex>, LastKnownGood) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.snapshot");
        let index = index_with(version, keys);
        let cache = LastKnownGood::new(path.clone());
        cache.snapshot_replaced();
        cache.write_pending(&index);
        (dir, path, index, cache)
    }

    /// Applies a batch to the index and tells the cache, as the follower does.
    fn apply(index: &KeyIndex, cache: &LastKnownGood, version: u64, changes: Vec<(KeyDigest, Option<KeyRecord>)>) {
        let digests: Vec<KeyDigest> = changes.iter().map(|(d, _)| *d).collect();
        let next = index.current().apply(version, changes);
        let applied = digests.iter().map(|d| (*d, next.get(d).cloned())).collect();
        index.publish(next);
        cache.changes_applied(version, applied);
    }

    fn ids(snapshot: &Snapshot) -> Vec<String> {
        let mut ids: Vec<String> = snapshot.records().map(|(_, r)| r.id().to_owned()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_restart_sees_the_snapshot_and_every_change_appended_since() {
        let (_dir, path, index, cache) = written_from(10, 0..100);
        let size_after_snapshot = fs::metadata(&path).unwrap().len();
        apply(&index, &cache, 11, vec![(digest(1), None), (digest(500), Some(record(500)))]);
        apply(
            &index,
            &cache,
            12,
            vec![(digest(2), Some(KeyRecord::builder("key_2").status(crate::index::KeyStatus::Revoked).build()))],
        );
        cache.write_pending(&index);
        assert_eq!(fs::metadata(&path).unwrap().len(), size_after_snapshot, "changes only append to the log");

        let loaded = LastKnownGood::new(path).load().unwrap();
        assert_eq!(loaded.snapshot.version(), 12);
        assert_eq!(loaded.batches, 2);
        assert_eq!(ids(&loaded.snapshot), ids(&index.current()));
        assert_eq!(loaded.snapshot.get(&digest(2)).unwrap().status, crate::index::KeyStatus::Revoked);
        assert!(loaded.snapshot.get(&digest(1)).is_none());
    }

    #[test]
    fn a_torn_log_tail_is_cut_and_later_appends_still_load() {
        let (dir, path, index, cache) = written_from(1, 0..10);
        apply(&index, &cache, 2, vec![(digest(100), Some(record(100)))]);
        cache.write_pending(&index);
        apply(&index, &cache, 3, vec![(digest(101), Some(record(101)))]);
        cache.write_pending(&index);
        let log = dir.path().join("keys.snapshot.changes");
        let len = fs::metadata(&log).unwrap().len();
        OpenOptions::new().write(true).open(&log).unwrap().set_len(len - 5).unwrap();

        let restarted = LastKnownGood::new(path.clone());
        let loaded = restarted.load().unwrap();
        assert_eq!((loaded.snapshot.version(), loaded.batches), (2, 1), "the torn batch is not applied");
        let index = Arc::new(KeyIndex::default());
        index.publish(loaded.snapshot);
        apply(&index, &restarted, 4, vec![(digest(102), Some(record(102)))]);
        restarted.write_pending(&index);
        let again = LastKnownGood::new(path).load().unwrap();
        assert_eq!(again.snapshot.version(), 4);
        assert!(again.snapshot.get(&digest(102)).is_some() && again.snapshot.get(&digest(100)).is_some());
    }

    #[test]
    fn a_corrupt_snapshot_file_is_refused_whole() {
        let (_dir, path, _, _) = written_from(5, 0..3000);
        let bytes = fs::read(&path).unwrap();
        for at in [3, 20, bytes.len() / 2, bytes.len() - 2] {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x01;
            fs::write(&path, &corrupt).unwrap();
            assert!(matches!(LastKnownGood::new(path.clone()).load(), Err(CacheError::Unreadable { .. })), "byte {at}");
        }
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(LastKnownGood::new(path.clone()).load(), Err(CacheError::Unreadable { .. })));
        fs::remove_file(&path).unwrap();
        assert!(matches!(LastKnownGood::new(path).load(), Err(CacheError::Missing)));
    }

    #[test]
    fn a_log_left_beside_a_newer_snapshot_is_ignored() {
        let (dir, path, index, cache) = written_from(1, 0..10);
        apply(&index, &cache, 2, vec![(digest(0), None)]);
        cache.write_pending(&index);
        let old_log = fs::read(dir.path().join("keys.snapshot.changes")).unwrap();
        cache.snapshot_replaced();
        cache.write_pending(&index);
        // A crash between the snapshot's rename and the log's: the old log stays.
        fs::write(dir.path().join("keys.snapshot.changes"), old_log).unwrap();
        let loaded = LastKnownGood::new(path).load().unwrap();
        assert_eq!((loaded.snapshot.version(), loaded.batches, loaded.snapshot.len()), (2, 0, 9));
    }

    #[test]
    fn many_changes_rewrite_the_snapshot_instead_of_growing_the_log() {
        let (dir, path, index, cache) = written_from(1, 0..10);
        let limit = log_limit(10);
        // Far past the share, so the rewrite happens even within a minute of the last.
        let changes = (0..4 * limit + 1).map(|n| (digest(1000 + n), Some(record(1000 + n)))).collect();
        apply(&index, &cache, 2, changes);
        cache.write_pending(&index);
        let log_len = fs::metadata(dir.path().join("keys.snapshot.changes")).unwrap().len();
        assert!(log_len < 100, "the log restarted after the rewrite: {log_len} bytes");
        let loaded = LastKnownGood::new(path).load().unwrap();
        assert_eq!((loaded.snapshot.version(), loaded.snapshot.len()), (2, 10 + 4 * limit + 1));
    }
}
