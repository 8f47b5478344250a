//! Usage that no sink has acknowledged yet, kept on disk so that it survives a
//! restart (`usage.spool`).
//!
//! The file is a log of checksummed entries, appended as the flusher works:
//! - `Counted`: the records of a closed window, for the sinks named. Synced before
//!   any sink sees them.
//! - `Sent`: a sink took these records as batch `sequence` of boot `boot_id`. Synced
//!   before the batch is sent, so a batch that may have arrived is always sent
//!   again under the same identity, which the receiver drops as a duplicate.
//! - `Acked`: the sink took the batch. Not synced: losing it only means one more
//!   send that the receiver drops.
//! - `State`: a sink's whole queue, written when the log is rewritten.
//!
//! Replaying the log gives each sink its queue back. An entry cut short by a crash
//! ends the log: it was being written when the process died, so nothing it holds
//! was ever sent. The log is emptied whenever every sink is up to date, and
//! rewritten as `State` entries when it has grown well beyond what it holds.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::record::{merge_by_key, UsageRecord};

const MAGIC: [u8; 8] = *b"KGUSAGE1";
const FRAME_HEAD_LEN: usize = 8;
/// No entry is larger: a length above it is corruption.
const MAX_ENTRY: usize = 1 << 30;
/// Records of a window in one `Counted` entry at most (a few megabytes).
const RECORDS_PER_ENTRY: usize = 10_000;
/// The log is rewritten once it is this much larger than its last rewrite…
const REWRITE_FACTOR: u64 = 4;
/// …and at least this large.
const REWRITE_MIN_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("usage spool {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("usage spool {path} is not a keygate usage spool")]
    NotASpool { path: String },
    #[error("usage spool {path}: the spool writer stopped: {reason}")]
    Stopped { path: String, reason: String },
}

/// A batch handed to a sink and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentBatch {
    pub boot_id: String,
    pub sequence: u64,
    pub records: Vec<UsageRecord>,
}

/// One sink's undelivered usage, as the log left it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SpooledQueue {
    /// Batches handed to the sink and not acknowledged, in the order they were sent.
    pub in_flight: Vec<SentBatch>,
    pub pending: HashMap<String, UsageRecord>,
}

impl SpooledQueue {
    pub fn records(&self) -> usize {
        self.in_flight.iter().map(|b| b.records.len()).sum::<usize>() + self.pending.len()
    }

    fn add(&mut self, records: &[UsageRecord]) {
        merge_by_key(&mut self.pending, records);
    }
}

/// A batch in flight, borrowed from a sink's queue (encoded as a [`SentBatch`]).
#[derive(Debug, Serialize)]
pub struct SentRef<'a> {
    pub boot_id: &'a str,
    pub sequence: u64,
    pub records: &'a [UsageRecord],
}

/// A sink's queue, borrowed, for a rewrite.
pub struct QueueView<'a> {
    pub sink: &'a str,
    pub in_flight: Vec<SentRef<'a>>,
    pub pending: Vec<&'a UsageRecord>,
}

/// Encoded as [`OwnedEntry`] decodes: the same variants, in the same order.
#[derive(Debug, Serialize)]
enum Entry<'a> {
    Counted { sinks: &'a [&'a str], records: &'a [UsageRecord] },
    Sent { sink: &'a str, boot_id: &'a str, sequence: u64, records: &'a [UsageRecord] },
    Acked { sink: &'a str, boot_id: &'a str, sequence: u64 },
    State { sink: &'a str, in_flight: &'a [SentRef<'a>], pending: &'a [&'a UsageRecord] },
}

#[derive(Debug, Deserialize)]
enum OwnedEntry {
    Counted { sinks: Vec<String>, records: Vec<UsageRecord> },
    Sent { sink: String, boot_id: String, sequence: u64, records: Vec<UsageRecord> },
    Acked { sink: String, boot_id: String, sequence: u64 },
    State { sink: String, in_flight: Vec<SentBatch>, pending: Vec<UsageRecord> },
}

fn encode(entry: &Entry<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEAD_LEN]);
    // JSON, as the records' timestamps are RFC 3339 text that only a
    // self-describing format reads back. Serialising these types cannot fail.
    let written = serde_json::to_writer(&mut *out, entry).is_ok();
    debug_assert!(written);
    let len = out.len() - start - FRAME_HEAD_LEN;
    let crc = crc32fast::hash(&out[start + FRAME_HEAD_LEN..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The entries of a log, up to the first one that is cut short or does not check
/// out; and the length of the good part.
fn decode_log(bytes: &[u8]) -> (Vec<OwnedEntry>, usize) {
    let mut entries = Vec::new();
    let mut at = MAGIC.len();
    while bytes.len() - at >= FRAME_HEAD_LEN {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let start = at + FRAME_HEAD_LEN;
        if len > MAX_ENTRY || bytes.len() - start < len {
            break;
        }
        let payload = &bytes[start..start + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        match serde_json::from_slice::<OwnedEntry>(payload) {
            Ok(entry) => entries.push(entry),
            Err(_) => break,
        }
        at = start + len;
    }
    (entries, at)
}

/// Folds the log into each sink's queue.
fn replay(entries: Vec<OwnedEntry>) -> HashMap<String, SpooledQueue> {
    let mut queues: HashMap<String, SpooledQueue> = HashMap::new();
    for entry in entries {
        match entry {
            OwnedEntry::Counted { sinks, records } => {
                for sink in sinks {
                    queues.entry(sink).or_default().add(&records);
                }
            }
            OwnedEntry::Sent { sink, boot_id, sequence, records } => {
                let queue = queues.entry(sink).or_default();
                for record in &records {
                    queue.pending.remove(&record.key_id);
                }
                queue.in_flight.push(SentBatch { boot_id, sequence, records });
            }
            OwnedEntry::Acked { sink, boot_id, sequence } => {
                let queue = queues.entry(sink).or_default();
                queue.in_flight.retain(|b| !(b.boot_id == boot_id && b.sequence == sequence));
            }
            OwnedEntry::State { sink, in_flight, pending } => {
                let queue = queues.entry(sink).or_default();
                queue.in_flight = in_flight;
                queue.pending = pending.into_iter().map(|r| (r.key_id.clone(), r)).collect();
            }
        }
    }
    queues.retain(|_, queue| queue.records() > 0);
    queues
}

/// The open spool. Writes run on the blocking pool; one at a time, in order.
pub struct Spool {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    /// Held while open: a process taking over the sockets (`--upgrade`) waits for
    /// the one before it to finish with the spool. A file of its own, as the spool
    /// itself is replaced when rewritten.
    _lock: File,
    bytes: u64,
    /// The size right after the last rewrite or reset.
    base: u64,
}

impl Spool {
    /// Opens the spool at `path` (creating it and its directory if needed) and
    /// returns what it holds, per sink identity. A torn or unreadable tail is cut off.
    /// Blocks while another process holds it.
    pub fn open(path: &Path) -> Result<(Spool, HashMap<String, SpooledQueue>), SpoolError> {
        let fail = |source| SpoolError::Io { path: path.display().to_string(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let lock = OpenOptions::new().write(true).create(true).truncate(false).open(lock_path(path)).map_err(fail)?;
        if let Err(std::fs::TryLockError::WouldBlock) = lock.try_lock() {
            tracing::info!(path = %path.display(), "waiting for the process before this one to let go of the usage spool");
            lock.lock().map_err(fail)?;
        }
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(fail)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(fail)?;
        let (queues, good) = if bytes.is_empty() {
            file.write_all(&MAGIC).map_err(fail)?;
            (HashMap::new(), MAGIC.len())
        } else if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(SpoolError::NotASpool { path: path.display().to_string() });
        } else {
            let (entries, good) = decode_log(&bytes);
            if good < bytes.len() {
                tracing::warn!(
                    path = %path.display(),
                    kept = good,
                    cut = bytes.len() - good,
                    "the usage spool ends in an entry cut short (a crash while writing it); it is cut off"
                );
            }
            (replay(entries), good)
        };
        file.set_len(good as u64).map_err(fail)?;
        file.seek(SeekFrom::End(0)).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        let bytes = good as u64;
        Ok((Spool { path: path.to_owned(), file: Arc::new(Mutex::new(file)), _lock: lock, bytes, base: bytes }, queues))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A closed window's records, for these sinks; on disk when this returns. A
    /// large window is written as several entries, so that encoding it needs a
    /// bounded buffer, then synced once.
    pub async fn counted(&mut self, sinks: &[&str], records: &[UsageRecord]) -> Result<(), SpoolError> {
        if records.is_empty() || sinks.is_empty() {
            return Ok(());
        }
        let mut chunks = records.chunks(RECORDS_PER_ENTRY).peekable();
        while let Some(chunk) = chunks.next() {
            let mut out = Vec::new();
            encode(&Entry::Counted { sinks, records: chunk }, &mut out);
            self.append(out, chunks.peek().is_none()).await?;
        }
        Ok(())
    }

    /// Batches about to be sent, in order; on disk (one sync) when this returns.
    pub async fn sent(&mut self, sink: &str, batches: &[SentRef<'_>]) -> Result<(), SpoolError> {
        let mut out = Vec::new();
        for batch in batches {
            let entry = Entry::Sent { sink, boot_id: batch.boot_id, sequence: batch.sequence, records: batch.records };
            encode(&entry, &mut out);
        }
        self.append(out, true).await
    }

    pub async fn acked(&mut self, sink: &str, boot_id: &str, sequence: u64) -> Result<(), SpoolError> {
        let mut out = Vec::new();
        encode(&Entry::Acked { sink, boot_id, sequence }, &mut out);
        self.append(out, false).await
    }

    /// Whether the log has grown enough beyond its content to be rewritten.
    pub fn wants_rewrite(&self) -> bool {
        self.bytes > REWRITE_MIN_BYTES.max(self.base.saturating_mul(REWRITE_FACTOR))
    }

    /// Whether the log holds any entry.
    pub fn holds_entries(&self) -> bool {
        self.bytes > MAGIC.len() as u64
    }

    /// Replaces the log by the queues given (none: an empty log), synced.
    pub async fn rewrite(&mut self, queues: &[QueueView<'_>]) -> Result<(), SpoolError> {
        let mut out = MAGIC.to_vec();
        for queue in queues {
            if queue.in_flight.is_empty() && queue.pending.is_empty() {
                continue;
            }
            let entry = Entry::State { sink: queue.sink, in_flight: &queue.in_flight, pending: &queue.pending };
            encode(&entry, &mut out);
        }
        let (file, path) = (Arc::clone(&self.file), self.path.clone());
        let len = out.len() as u64;
        run_blocking(&self.path, move || {
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if len == MAGIC.len() as u64 {
                // Nothing left: cut the log back to its header.
                file.set_len(len)?;
                file.seek(SeekFrom::End(0))?;
                return file.sync_data();
            }
            // The new log beside the old one, then renamed over it: a crash leaves one or the other.
            let next = path.with_extension("spool.next");
            let mut fresh = File::create(&next)?;
            fresh.write_all(&out)?;
            fresh.sync_all()?;
            std::fs::rename(&next, &path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            *file = OpenOptions::new().read(true).write(true).open(&path)?;
            file.seek(SeekFrom::End(0))?;
            Ok(())
        })
        .await?;
        self.bytes = len;
        self.base = len;
        Ok(())
    }

    async fn append(&mut self, entry: Vec<u8>, sync: bool) -> Result<(), SpoolError> {
        let file = Arc::clone(&self.file);
        let len = entry.len() as u64;
        let before = self.bytes;
        run_blocking(&self.path, move || {
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let written = file.write_all(&entry).and_then(|()| if sync { file.sync_data() } else { Ok(()) });
            if written.is_err() {
                // A partial entry would end the log for every entry after it.
                let _ = file.set_len(before).and_then(|()| file.seek(SeekFrom::End(0)).map(|_| ()));
            }
            written
        })
        .await?;
        self.bytes += len;
        Ok(())
    }
}

fn lock_path(spool: &Path) -> PathBuf {
    let mut name = spool.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

async fn run_blocking(
    path: &Path,
    work: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<(), SpoolError> {
    let path_text = || path.display().to_string();
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SpoolError::Stopped { path: path_text(), reason: e.to_string() })?
        .map_err(|source| SpoolError::Io { path: path_text(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn record(key: &str, requests: u64) -> UsageRecord {
        UsageRecord {
            node: "n".into(),
            key_id: key.into(),
            window_start: datetime!(2026-01-01 00:00 UTC),
            window_end: datetime!(2026-01-01 00:00:05 UTC),
            requests,
            allowed: requests,
            denied: [("rate_limited".to_owned(), 1)].into(),
            status: Default::default(),
            bytes_in: 3,
            bytes_out: 4,
            last_used_at: Some(datetime!(2026-01-01 00:00:04 UTC)),
            owner_at_count: None,
        }
    }

    fn reopen(path: &Path) -> HashMap<String, SpooledQueue> {
        Spool::open(path).unwrap().1
    }

    fn sent_ref(batch: &SentBatch) -> SentRef<'_> {
        SentRef { boot_id: &batch.boot_id, sequence: batch.sequence, records: &batch.records }
    }

    fn batch(sequence: u64, records: Vec<UsageRecord>) -> SentBatch {
        SentBatch { boot_id: "boot-1".into(), sequence, records }
    }

    #[tokio::test]
    async fn replay_gives_each_sink_what_it_has_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.spool");
        let (mut spool, queues) = Spool::open(&path).unwrap();
        assert!(queues.is_empty());
        spool.counted(&["store", "file"], &[record("a", 1), record("b", 2)]).await.unwrap();
        let sent = batch(1, vec![record("a", 1), record("b", 2)]);
        spool.sent("store", &[sent_ref(&sent)]).await.unwrap();
        spool.acked("store", "boot-1", 1).await.unwrap();
        spool.sent("file", &[sent_ref(&sent)]).await.unwrap();
        spool.counted(&["store", "file"], &[record("a", 5)]).await.unwrap();
        drop(spool);

        let queues = reopen(&path);
        let store = &queues["store"];
        assert!(store.in_flight.is_empty());
        assert_eq!(store.pending["a"].requests, 5);
        let file = &queues["file"];
        assert_eq!(file.in_flight, [sent], "an unacknowledged batch keeps its identity");
        assert_eq!(file.pending.len(), 1);
    }

    #[tokio::test]
    async fn batches_sent_together_are_acknowledged_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.spool");
        let (mut spool, _) = Spool::open(&path).unwrap();
        spool.counted(&["store"], &[record("a", 1), record("b", 1), record("c", 1)]).await.unwrap();
        let (first, second) = (batch(1, vec![record("a", 1), record("b", 1)]), batch(2, vec![record("c", 1)]));
        spool.sent("store", &[sent_ref(&first), sent_ref(&second)]).await.unwrap();
        spool.acked("store", "boot-1", 1).await.unwrap();
        drop(spool);
        let queues = reopen(&path);
        assert_eq!(queues["store"].in_flight, [second]);
        assert!(queues["store"].pending.is_empty());
    }

    #[tokio::test]
    async fn a_torn_last_entry_is_cut_off_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.spool");
        let (mut spool, _) = Spool::open(&path).unwrap();
        spool.counted(&["store"], &[record("a", 1)]).await.unwrap();
        let whole = std::fs::metadata(&path).unwrap().len();
        spool.counted(&["store"], &[record("b", 7)]).await.unwrap();
        drop(spool);
        let full = std::fs::metadata(&path).unwrap().len();
        for cut in [full - 1, whole + 5, whole + 1] {
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(cut).unwrap();
            drop(file);
            let queues = reopen(&path);
            assert_eq!(queues["store"].pending.len(), 1, "cut at {cut}");
            assert_eq!(queues["store"].pending["a"].requests, 1);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "the torn tail is cut off");
        }
    }

    #[tokio::test]
    async fn a_corrupt_entry_ends_the_log_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.spool");
        let (mut spool, _) = Spool::open(&path).unwrap();
        spool.counted(&["store"], &[record("a", 1)]).await.unwrap();
        let whole = std::fs::metadata(&path).unwrap().len() as usize;
        spool.counted(&["store"], &[record("b", 7)]).await.unwrap();
        drop(spool);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let queues = reopen(&path);
        assert_eq!(queues["store"].pending.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, whole);
    }

    #[tokio::test]
    async fn rewrite_keeps_the_queues_and_an_empty_rewrite_leaves_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.spool");
        let (mut spool, _) = Spool::open(&path).unwrap();
        for i in 0..20 {
            spool.counted(&["store"], &[record("a", i)]).await.unwrap();
        }
        let mut queue = SpooledQueue::default();
        queue.add(&[record("a", 190), record("c", 1)]);
        queue.in_flight = vec![batch(3, vec![record("b", 2)])];
        let in_flight = &queue.in_flight[0];
        let view = QueueView {
            sink: "store",
            in_flight: vec![SentRef { boot_id: &in_flight.boot_id, sequence: 3, records: &in_flight.records }],
            pending: queue.pending.values().collect(),
        };
        let before = spool.bytes();
        spool.rewrite(&[view]).await.unwrap();
        assert!(spool.bytes() < before);
        spool.counted(&["store"], &[record("c", 1)]).await.unwrap();
        drop(spool);
        let queues = reopen(&path);
        assert_eq!(queues["store"].in_flight, queue.in_flight);
        assert_eq!(queues["store"].pending["a"].requests, 190);
        assert_eq!(queues["store"].pending["c"].requests, 2);

        let (mut spool, _) = Spool::open(&path).unwrap();
        spool.rewrite(&[]).await.unwrap();
        assert_eq!(spool.bytes(), MAGIC.len() as u64);
        drop(spool);
        assert!(reopen(&path).is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MAGIC.len() as u64);
    }

    #[test]
    fn a_second_opener_waits_for_the_first_to_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.spool");
        let (first, _) = Spool::open(&path).unwrap();
        let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let second = std::thread::spawn({
            let (path, opened) = (path.clone(), Arc::clone(&opened));
            move || {
                let spool = Spool::open(&path).map(|(spool, _)| spool);
                opened.store(true, std::sync::atomic::Ordering::SeqCst);
                spool.is_ok()
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!opened.load(std::sync::atomic::Ordering::SeqCst), "opened while the first still holds it");
        drop(first);
        assert!(second.join().unwrap());
    }

    #[test]
    fn a_file_that_is_not_a_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.spool");
        std::fs::write(&path, b"{\"not\": \"a spool\"}").unwrap();
        assert!(matches!(Spool::open(&path), Err(SpoolError::NotASpool { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"not\": \"a spool\"}", "left as it was");
    }
}
