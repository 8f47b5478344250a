//! The key set a gateway loads at start, streamed page by page from the store.
//!
//! The feed version is read first, then every key by one statement, read in
//! pages (`Store::gateway_key_pages`), each page one frame of the wire encoding
//! (`index::wire`). A key changed while the statement runs shows its newer state
//! or its older one, and either way the gateway's next step, the changes after
//! the version sent, brings it to the current state.
//!
//! Gateways that ask at about the same time (a fleet restarting) share one read
//! of the store: the frames are spooled to a temporary file as they are read, and
//! every gateway is sent that file, following it as it grows. A spool is reused
//! while it is being written and for a few minutes after, as long as the feed has
//! not moved far past its version; the gateway applies the changes since.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::model::StoredKey;
use super::store::{GatewayKeyRow, Store, StoreError};
use crate::index::wire::{self, Frame, WireKey, WireQuota, WireRate};
use crate::key::KeyDigest;

/// The wire form of a stored key; `None` if its hash is unusable (a hand-edited store).
pub fn wire_key(key: &StoredKey) -> Option<WireKey<'_>> {
    let digest = KeyDigest::parse(&key.hash).ok()?;
    fn borrowed(s: &str) -> Cow<'_, str> {
        Cow::Borrowed(s)
    }
    Some(WireKey {
        digest: digest.0,
        id: Cow::Borrowed(&key.id),
        name: (key.name != key.id).then_some(Cow::Borrowed(key.name.as_str())),
        owner: key.owner.as_deref().map(borrowed),
        plan: key.plan.as_deref().map(borrowed),
        scopes: key.scopes.iter().map(|s| borrowed(s)).collect(),
        ip_allowlist: key.ip_allowlist.iter().map(|s| borrowed(s)).collect(),
        ip_allowlist_unusable: false,
        rate_limit: key.rate_limit.as_ref().map(WireRate::from),
        quota: key.quota.as_ref().map(WireQuota::from),
        status: key.status.into(),
        expires_at_ms: key.expires_at.map(|at| at.unix_timestamp_nanos().div_euclid(1_000_000) as i64),
        metadata: (!key.metadata.is_empty())
            .then(|| serde_json::to_string(&key.metadata).ok())
            .flatten()
            .map(Cow::Owned),
        tags: key.tags.iter().map(|s| borrowed(s)).collect(),
        imported: key.imported,
    })
}

/// A stored key in wire form, or `None` (logged) if it cannot be served as stored:
/// an unusable hash or a hand-edited value. Left out, it is refused like an unknown
/// key; the other keys are still served.
pub fn servable(row: &GatewayKeyRow) -> Option<WireKey<'_>> {
    match row.wire() {
        Ok(wire) => Some(wire),
        Err(e) => {
            tracing::error!(key_id = %row.id(), error = %e, "a stored key cannot be read; it is not served");
            None
        }
    }
}

/// Where a snapshot starts: the feed version, read before any key.
pub struct SnapshotStart {
    version: u64,
    keys_estimate: u64,
}

impl SnapshotStart {
    /// Reads the version (and a key count for the gateway to size its index): the
    /// part that can fail before any byte is sent, so it can still get an error answer.
    pub async fn read(store: &Store) -> Result<Self, StoreError> {
        Ok(SnapshotStart { version: store.latest_version().await?, keys_estimate: store.key_count_estimate().await? })
    }
}

/// Keys per frame of a snapshot.
pub const KEYS_PER_FRAME: usize = 5_000;
/// A finished spool is reused this long after it was started, while the feed has not moved.
const REUSE_FOR: Duration = Duration::from_secs(300);
/// What one read of a spool sends at most.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// This many bytes are in the file and may be read.
    Writing(u64),
    Done(u64),
    Failed,
}

/// One read of the store, spooled to a file that readers follow as it grows. The
/// file is unlinked as soon as it is created: readers share the open file, and its
/// disk space goes with the last of them, however the process ends.
struct Spool {
    file: Arc<std::fs::File>,
    version: u64,
    started: Instant,
    progress: watch::Sender<Progress>,
}

impl Spool {
    /// A spool still being written is always worth joining (the gateway applies the
    /// changes since its version); a finished one only while nothing has changed since.
    /// Versions do not count keys (an import batch is one version for a thousand keys),
    /// so "a little behind" cannot be told from them.
    fn reusable(&self, latest: u64) -> bool {
        match *self.progress.borrow() {
            Progress::Failed => false,
            Progress::Writing(_) => true,
            Progress::Done(_) => self.started.elapsed() < REUSE_FOR && latest == self.version,
        }
    }

    /// An unlinked temporary file, open for reading and writing.
    fn create_file() -> std::io::Result<std::fs::File> {
        let path = std::env::temp_dir().join(format!(
            "keygate-snapshot-{}-{}.keys",
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
    }

    /// Reads the store into the file, waking readers at each frame, then lets go of
    /// the spool once it can no longer be reused, so the file goes when its last
    /// reader is done.
    async fn write_then_expire(self: Arc<Self>, store: Arc<Store>, start: SnapshotStart, current: CurrentSpool) {
        Arc::clone(&self).write(store, start).await;
        let failed = *self.progress.borrow() == Progress::Failed;
        // Only a weak hold while waiting: a spool replaced meanwhile goes with its readers.
        let this = Arc::downgrade(&self);
        drop(self);
        if !failed {
            tokio::time::sleep(REUSE_FOR).await;
        }
        let mut current = current.lock().await;
        if current.as_ref().is_some_and(|spool| std::ptr::eq(Arc::as_ptr(spool), this.as_ptr())) {
            *current = None;
        }
    }

    async fn write(self: Arc<Self>, store: Arc<Store>, start: SnapshotStart) {
        let outcome = self.write_frames(&store, start).await;
        match outcome {
            Ok(written) => self.progress.send_replace(Progress::Done(written)),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the key set for a snapshot");
                self.progress.send_replace(Progress::Failed)
            }
        };
    }

    /// The store's keys, one statement read in pages, each page one frame of up to [`KEYS_PER_FRAME`] keys.
    async fn write_frames(&self, store: &Store, start: SnapshotStart) -> Result<u64, String> {
        let handle = self.file.try_clone().map_err(|e| e.to_string())?;
        let mut file = tokio::fs::File::from_std(handle);
        let SnapshotStart { version, keys_estimate } = start;
        let mut written = 0u64;
        let mut frame = wire::header().to_vec();
        // The id only ties a gateway's change log to its snapshot file.
        wire::encode_frame(&Frame::Start { version, keys: keys_estimate, id: 0 }, &mut frame);
        let mut pages = store.gateway_key_pages(KEYS_PER_FRAME);
        let mut sent = 0u64;
        loop {
            let page = pages.next().await.transpose().map_err(|e| e.to_string())?;
            let last = page.is_none();
            match page {
                Some(page) => {
                    let wire_keys: Vec<WireKey<'_>> = page.iter().filter_map(servable).collect();
                    sent += wire_keys.len() as u64;
                    wire::encode_frame(&Frame::Keys(wire_keys), &mut frame);
                }
                None => wire::encode_frame(&Frame::End { version, keys: sent }, &mut frame),
            }
            // tokio's file hands writes to a blocking thread: flushed, they are in the file for readers.
            file.write_all(&frame).await.map_err(|e| e.to_string())?;
            file.flush().await.map_err(|e| e.to_string())?;
            written += frame.len() as u64;
            frame.clear();
            self.progress.send_replace(Progress::Writing(written));
            if last {
                return Ok(written);
            }
        }
    }

    /// The file from its start, following the writer until it is done.
    fn read(self: Arc<Self>) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        let progress = self.progress.subscribe();
        futures_util::stream::try_unfold((self, progress, 0u64), |(spool, mut progress, position)| async move {
            loop {
                let available = match *progress.borrow_and_update() {
                    Progress::Failed => {
                        return Err(std::io::Error::other("reading the key set failed on the control plane"))
                    }
                    Progress::Writing(n) => (n > position).then_some(n),
                    Progress::Done(n) if n > position => Some(n),
                    Progress::Done(_) => return Ok(None),
                };
                if let Some(available) = available {
                    let len = usize::try_from(available - position).unwrap_or(READ_CHUNK).min(READ_CHUNK);
                    let file = Arc::clone(&spool.file);
                    // Each reader reads at its own offset; the shared handle's cursor is the writer's.
                    let chunk = tokio::task::spawn_blocking(move || {
                        let mut buffer = vec![0u8; len];
                        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buffer, position).map(|()| buffer)
                    })
                    .await
                    .map_err(std::io::Error::other)??;
                    return Ok(Some((Bytes::from(chunk), (spool, progress, position + len as u64))));
                }
                if progress.changed().await.is_err() {
                    return Err(std::io::Error::other("the snapshot writer stopped"));
                }
            }
        })
    }
}

type CurrentSpool = Arc<tokio::sync::Mutex<Option<Arc<Spool>>>>;

/// The spool gateways are sent now, if any.
#[derive(Default)]
pub struct SharedSnapshots {
    current: CurrentSpool,
}

impl SharedSnapshots {
    /// The key set as a stream of bytes: the current spool if it can still serve,
    /// else a new read of the store. The version is read before anything is sent, so
    /// a store that is down still gets an error answer.
    pub async fn stream(
        &self,
        store: &Arc<Store>,
        latest: u64,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send, StoreError> {
        let mut current = self.current.lock().await;
        if let Some(spool) = current.as_ref().filter(|spool| spool.reusable(latest)) {
            return Ok(Arc::clone(spool).read());
        }
        let start = SnapshotStart::read(store).await?;
        let file = Spool::create_file().map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        let spool = Arc::new(Spool {
            file: Arc::new(file),
            version: start.version,
            started: Instant::now(),
            progress: watch::Sender::new(Progress::Writing(0)),
        });
        tokio::spawn(Arc::clone(&spool).write_then_expire(Arc::clone(store), start, Arc::clone(&self.current)));
        *current = Some(Arc::clone(&spool));
        Ok(spool.read())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::{new_key_id, NewKey};
    use crate::index::wire::{FrameReader, KeySetLoader};

    fn new_key(n: usize) -> NewKey {
        NewKey {
            id: new_key_id(),
            hash: KeyDigest::of(&format!("raw-{n}")).to_string(),
            prefix: "kg_live".into(),
            masked: "kg_live_…".into(),
            name: format!("k{n}"),
            owner: Some(format!("o{}", n % 3)),
            plan: None,
            scopes: vec!["orders:read".into()],
            ip_allowlist: vec![],
            rate_limit: None,
            quota: None,
            expires_at: None,
            metadata: Default::default(),
            tags: vec![],
        }
    }

    async fn collect(stream: impl Stream<Item = std::io::Result<Bytes>>) -> Vec<u8> {
        let mut stream = std::pin::pin!(stream);
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.expect("the spool reads"));
        }
        bytes
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gateways_asking_at_once_share_one_read_of_the_store_and_get_every_key() {
        let store = Arc::new(Store::connect("sqlite::memory:").await.unwrap());
        for n in 0..12_000 {
            store.create_key(new_key(n), "ops").await.unwrap();
        }
        let shared = SharedSnapshots::default();
        let latest = store.latest_version().await.unwrap();
        let first = shared.stream(&store, latest).await.unwrap();
        let spool = shared.current.lock().await.clone().expect("a spool");
        let second = shared.stream(&store, latest).await.unwrap();
        assert!(Arc::ptr_eq(&spool, shared.current.lock().await.as_ref().unwrap()), "the second read shares the first");
        let (a, b) = tokio::join!(collect(first), collect(second));
        assert_eq!(a, b);
        let mut reader = FrameReader::default();
        reader.push(&a);
        let mut loader = KeySetLoader::new();
        loader.take_from(&mut reader).unwrap();
        let (snapshot, _) = loader.finish().unwrap();
        assert_eq!((snapshot.len(), snapshot.version()), (12_000, latest));
        assert!(snapshot.get(&KeyDigest::of("raw-11999")).is_some());

        // A finished spool serves while nothing has changed...
        let again = shared.stream(&store, latest).await.unwrap();
        assert!(Arc::ptr_eq(&spool, shared.current.lock().await.as_ref().unwrap()));
        drop(again);
        // ...and not after any change, however small its version step: one import
        // batch is one version for a thousand keys.
        store.create_key(new_key(99_999), "ops").await.unwrap();
        let _fresh = shared.stream(&store, latest + 1).await.unwrap();
        assert!(!Arc::ptr_eq(&spool, shared.current.lock().await.as_ref().unwrap()));
    }

    #[tokio::test]
    async fn a_spool_leaves_no_file_behind_whatever_ends_the_process() {
        let store = Arc::new(Store::connect("sqlite::memory:").await.unwrap());
        store.create_key(new_key(1), "ops").await.unwrap();
        let shared = SharedSnapshots::default();
        let bytes = collect(shared.stream(&store, 1).await.unwrap()).await;
        assert!(!bytes.is_empty());
        let prefix = format!("keygate-snapshot-{}-", std::process::id());
        let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "a spool's file has a name while it is in use: {left:?}");
    }
}
