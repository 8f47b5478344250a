//! The background half of usage: drain the counters every window and deliver.
//!
//! Each sink has one batch in flight (retried unchanged, with its sequence,
//! until it is taken) and one pending batch into which newer windows are merged
//! per key. So a failing sink holds at most two records per active key, loses
//! nothing, and never receives a count twice.
//!
//! A write runs as a task of its own. One that outlasts `WRITE_TIMEOUT` counts as
//! failed, but may still land (a file sink's blocking write cannot be called
//! back): the flusher keeps the task and, on its next try, waits for that same
//! write instead of making another, so a late success is taken as delivered.
//!
//! A batch holds at most the sink's `max_batch_records`, so a window with a
//! million active keys goes out as many bounded batches, each with a sequence of
//! its own. With `usage.spool`, every window and every batch is on disk before a
//! sink sees it (see `spool`), and the queues come back from there after a restart.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::counters::UsageCounters;
use super::record::{merge_by_key, merge_owned_by_key, UsageRecord};
use super::sink::{SinkError, UsageBatch, UsageSink};
use super::spool::{QueueView, SentRef, Spool, SpooledQueue};
use crate::metrics::Metrics;

/// One sink write may take this long before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Batches taken from a sink's pending usage together (and synced to the spool
/// together): up to 320,000 records at the default batch size.
const BATCHES_TAKEN_AT_ONCE: usize = 64;
/// Pause between delivery rounds during the final flush.
const FINAL_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A batch handed to a sink, retried unchanged until it is taken.
struct InFlight {
    /// The boot that first sent it: a batch from the spool keeps its earlier boot's.
    boot_id: Arc<str>,
    sequence: u64,
    records: Arc<[UsageRecord]>,
}

struct SinkQueue {
    /// Names the sink's configuration, to keep its queue across config reloads.
    identity: String,
    /// The name of this queue in the spool: a digest of `identity`, which may hold
    /// secrets of the sink's configuration.
    spool_name: String,
    sink: Arc<dyn UsageSink>,
    /// Batches taken out of `pending` and on record in the spool, sent one after the
    /// other (the front one is being sent). Taking several at once costs the spool
    /// one sync for all of them rather than one each.
    in_flight: VecDeque<InFlight>,
    /// The write of the front batch still under way, if the last try stopped waiting for it.
    writing: Option<JoinHandle<Result<(), SinkError>>>,
    pending: HashMap<String, UsageRecord>,
    next_sequence: u64,
    failures: u32,
    retry_at: Instant,
}

/// What every delivery needs besides its queue.
struct Delivery<'a> {
    node: &'a str,
    boot_id: &'a Arc<str>,
    metrics: &'a Metrics,
    write_timeout: Duration,
}

impl SinkQueue {
    fn queued(&self) -> usize {
        self.in_flight.iter().map(|b| b.records.len()).sum::<usize>() + self.pending.len()
    }

    fn add(&mut self, records: &[UsageRecord]) {
        merge_by_key(&mut self.pending, records);
    }

    /// `add`, keeping the records given rather than copies.
    fn take(&mut self, records: Vec<UsageRecord>) {
        merge_owned_by_key(&mut self.pending, records);
    }

    /// The next batch: up to the sink's limit, taken out of `pending`.
    fn take_batch(&mut self) -> Arc<[UsageRecord]> {
        let limit = self.sink.max_batch_records().max(1);
        if self.pending.len() <= limit {
            return self.pending.drain().map(|(_, r)| r).collect();
        }
        let keys: Vec<String> = self.pending.keys().take(limit).cloned().collect();
        keys.iter().filter_map(|key| self.pending.remove(key)).collect()
    }

    fn view(&self) -> QueueView<'_> {
        QueueView {
            sink: &self.spool_name,
            in_flight: self.in_flight.iter().map(InFlight::as_sent).collect(),
            pending: self.pending.values().collect(),
        }
    }

    fn backoff(&mut self) -> Duration {
        self.failures += 1;
        let backoff = Duration::from_secs(1).saturating_mul(1 << self.failures.min(6)).min(MAX_BACKOFF);
        self.retry_at = Instant::now() + backoff;
        backoff
    }

    /// Delivers what it can; stops at the first failure and backs off.
    async fn deliver(&mut self, to: &Delivery<'_>, mut spool: Option<&mut Spool>) {
        let kind = self.sink.kind();
        loop {
            if self.in_flight.is_empty() {
                if self.pending.is_empty() {
                    return;
                }
                let mut batches = VecDeque::new();
                while !self.pending.is_empty() && batches.len() < BATCHES_TAKEN_AT_ONCE {
                    let records = self.take_batch();
                    self.next_sequence += 1;
                    batches.push_back(InFlight {
                        boot_id: Arc::clone(to.boot_id),
                        sequence: self.next_sequence,
                        records,
                    });
                }
                if let Some(spool) = spool.as_deref_mut() {
                    // Never sent unless the spool knows: else a restart could send them again as new.
                    let sent: Vec<SentRef<'_>> = batches.iter().map(InFlight::as_sent).collect();
                    if let Err(e) = spool.sent(&self.spool_name, &sent).await {
                        for batch in &batches {
                            self.add(&batch.records);
                        }
                        let retry_in = self.backoff();
                        tracing::error!(sink = kind, error = %e, ?retry_in, "usage spool write failed; usage is kept to retry");
                        return;
                    }
                    to.metrics.usage_spool_bytes.set(spool.bytes() as i64);
                }
                self.in_flight = batches;
            }
            let Some(batch) = self.in_flight.front() else { return };
            let writing = match &mut self.writing {
                Some(writing) => writing,
                None => self.writing.insert(spawn_write(&self.sink, to.node, batch)),
            };
            let write_timeout = to.write_timeout;
            let result = match tokio::time::timeout(write_timeout, writing).await {
                Ok(joined) => {
                    self.writing = None;
                    match joined {
                        Ok(written) => written.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("the write stopped: {e}")),
                    }
                }
                Err(_) => Err(format!("no answer within {write_timeout:?}; the next try waits for this write")),
            };
            match result {
                Ok(()) => {
                    to.metrics.usage_flushed(kind, true);
                    if self.failures > 0 {
                        tracing::info!(sink = kind, "usage sink recovered; pending usage delivered");
                    }
                    if let (Some(spool), Some(batch)) = (spool.as_deref_mut(), self.in_flight.front()) {
                        // Unsynced: were it lost, the batch is sent once more and dropped as a duplicate.
                        if let Err(e) = spool.acked(&self.spool_name, &batch.boot_id, batch.sequence).await {
                            tracing::warn!(sink = kind, error = %e, "usage spool write failed");
                        }
                        to.metrics.usage_spool_bytes.set(spool.bytes() as i64);
                    }
                    self.in_flight.pop_front();
                    self.failures = 0;
                }
                Err(error) => {
                    to.metrics.usage_flushed(kind, false);
                    let retry_in = self.backoff();
                    tracing::warn!(
                        sink = kind,
                        failures = self.failures,
                        pending = self.queued(),
                        ?retry_in,
                        "usage sink failed, keeping its usage to retry: {error}"
                    );
                    return;
                }
            }
        }
    }
}

impl InFlight {
    fn as_sent(&self) -> SentRef<'_> {
        SentRef { boot_id: &self.boot_id, sequence: self.sequence, records: &self.records }
    }
}

/// One attempt to write a batch, on a task that finishes whether or not anyone waits.
fn spawn_write(sink: &Arc<dyn UsageSink>, node: &str, batch: &InFlight) -> JoinHandle<Result<(), SinkError>> {
    let (sink, node, boot_id, records) =
        (Arc::clone(sink), node.to_owned(), Arc::clone(&batch.boot_id), Arc::clone(&batch.records));
    let sequence = batch.sequence;
    tokio::spawn(
        async move { sink.write(UsageBatch { node: &node, boot_id: &boot_id, sequence, records: &records }).await },
    )
}

pub struct Flusher {
    counters: Arc<dyn UsageCounters>,
    node: String,
    boot_id: Arc<str>,
    interval: Duration,
    sinks: Vec<SinkQueue>,
    metrics: Arc<Metrics>,
    window_start: OffsetDateTime,
    /// `WRITE_TIMEOUT`, shortened by tests.
    write_timeout: Duration,
    spool_path: Option<PathBuf>,
    spool: Option<Spool>,
    /// The spool missed a write: it is rewritten from the queues at the next chance.
    spool_behind: bool,
}

/// A sink and the identity of the configuration it was built from.
pub type NamedSink = (String, Arc<dyn UsageSink>);

enum Command {
    /// Final flush within the duration, then stop.
    Stop(Duration, oneshot::Sender<()>),
    /// A reloaded config's sinks: unchanged ones keep their queues, dropped ones
    /// get one last delivery attempt.
    ReplaceSinks(Vec<NamedSink>),
}

/// Talks to a running flusher.
#[derive(Clone)]
pub struct FlusherHandle {
    commands: mpsc::Sender<Command>,
}

impl FlusherHandle {
    /// Drains the counters one last time and tries every sink until `within` runs out.
    pub async fn flush_and_stop(&self, within: Duration) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Stop(within, done)).await.is_ok() {
            let _ = tokio::time::timeout(within + Duration::from_secs(1), finished).await;
        }
    }

    pub async fn replace_sinks(&self, sinks: Vec<NamedSink>) {
        let _ = self.commands.send(Command::ReplaceSinks(sinks)).await;
    }
}

fn queue(identity: String, sink: Arc<dyn UsageSink>) -> SinkQueue {
    let digest = Sha256::digest(identity.as_bytes());
    let spool_name = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    SinkQueue {
        identity,
        spool_name,
        sink,
        in_flight: VecDeque::new(),
        writing: None,
        pending: HashMap::new(),
        next_sequence: 0,
        failures: 0,
        retry_at: Instant::now(),
    }
}

impl Flusher {
    /// `spool`: where undelivered usage is kept across restarts (`usage.spool`).
    pub fn new(
        counters: Arc<dyn UsageCounters>,
        sinks: Vec<NamedSink>,
        node: String,
        interval: Duration,
        metrics: Arc<Metrics>,
        spool: Option<PathBuf>,
    ) -> Self {
        Flusher {
            counters,
            node,
            boot_id: new_boot_id().into(),
            interval,
            sinks: sinks.into_iter().map(|(identity, sink)| queue(identity, sink)).collect(),
            metrics,
            window_start: OffsetDateTime::now_utc(),
            write_timeout: WRITE_TIMEOUT,
            spool_path: spool,
            spool: None,
            spool_behind: false,
        }
    }

    /// Runs on the current runtime until `flush_and_stop` is called.
    pub fn spawn(self) -> FlusherHandle {
        let (commands, received) = mpsc::channel(4);
        tokio::spawn(self.run(received));
        FlusherHandle { commands }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        self.open_spool().await;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush_window(false).await,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Stop(within, done)) => {
                        self.final_flush(within).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::ReplaceSinks(sinks)) => self.replace_sinks(sinks).await,
                },
            }
        }
    }

    /// Opens the spool (waiting for a process before this one to let go of it) and
    /// gives each sink back what it held. Usage counted meanwhile waits in the counters.
    async fn open_spool(&mut self) {
        let Some(path) = self.spool_path.clone() else { return };
        let opened = tokio::task::spawn_blocking(move || Spool::open(&path)).await;
        let (spool, spooled) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "usage spool unusable: undelivered usage is kept in memory only");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "usage spool could not be opened: usage is kept in memory only");
                return;
            }
        };
        self.spool = Some(spool);
        self.take_back(spooled);
        // The replayed state as one compact log, without the queues of sinks gone since.
        self.spool_behind = true;
        self.settle_spool().await;
    }

    fn take_back(&mut self, spooled: HashMap<String, SpooledQueue>) {
        let mut restored = 0;
        for (name, held) in spooled {
            let records = held.records();
            let Some(queue) = self.sinks.iter_mut().find(|q| q.spool_name == name) else {
                self.metrics.usage_dropped.inc_by(records as u64);
                tracing::error!(records, "the usage spool holds usage for a sink no longer configured; it is dropped");
                continue;
            };
            queue.in_flight = held
                .in_flight
                .into_iter()
                .map(|batch| InFlight {
                    boot_id: batch.boot_id.into(),
                    sequence: batch.sequence,
                    records: batch.records.into(),
                })
                .collect();
            let pending: Vec<UsageRecord> = held.pending.into_values().collect();
            queue.add(&pending);
            restored += records;
        }
        if restored > 0 {
            tracing::info!(records = restored, "usage kept in the spool by an earlier run is delivered again");
        }
        self.metrics.usage_pending.set(self.queued() as i64);
    }

    /// Empties the spool when nothing is left to deliver, or rewrites it from the
    /// queues when it has fallen behind them or grown well beyond them.
    async fn settle_spool(&mut self) {
        let Some(spool) = &mut self.spool else { return };
        let empty = self.sinks.iter().all(|q| q.queued() == 0);
        let result = if empty && spool.holds_entries() {
            spool.rewrite(&[]).await
        } else if self.spool_behind || spool.wants_rewrite() {
            let views: Vec<QueueView<'_>> = self.sinks.iter().map(SinkQueue::view).collect();
            spool.rewrite(&views).await
        } else {
            Ok(())
        };
        match result {
            Ok(()) => self.spool_behind = false,
            Err(e) => {
                self.spool_behind = true;
                tracing::error!(error = %e, "usage spool rewrite failed; retried after the next window");
            }
        }
        self.metrics.usage_spool_bytes.set(spool.bytes() as i64);
    }

    async fn replace_sinks(&mut self, sinks: Vec<NamedSink>) {
        // What was counted so far goes to the sinks it was counted for.
        self.flush_window(true).await;
        let mut old: Vec<SinkQueue> = std::mem::take(&mut self.sinks);
        for (identity, sink) in sinks {
            match old.iter().position(|q| q.identity == identity) {
                Some(i) => self.sinks.push(old.swap_remove(i)),
                None => self.sinks.push(queue(identity, sink)),
            }
        }
        let to = Delivery {
            node: &self.node,
            boot_id: &self.boot_id,
            metrics: &self.metrics,
            write_timeout: self.write_timeout,
        };
        for mut removed in old {
            removed.deliver(&to, self.spool.as_mut()).await;
            let lost = removed.queued();
            if lost > 0 {
                self.metrics.usage_dropped.inc_by(lost as u64);
                tracing::error!(
                    sink = removed.sink.kind(),
                    records = lost,
                    "a removed usage sink kept undelivered usage"
                );
            }
        }
        // The removed sinks' queues leave the spool.
        self.spool_behind = true;
        self.settle_spool().await;
        self.metrics.usage_pending.set(self.queued() as i64);
    }

    async fn flush_window(&mut self, ignore_backoff: bool) {
        let window_end = OffsetDateTime::now_utc();
        let records = self.counters.drain(&self.node, self.window_start, window_end);
        self.window_start = window_end;
        if let Some(spool) = &mut self.spool {
            let names: Vec<&str> = self.sinks.iter().map(|q| q.spool_name.as_str()).collect();
            if let Err(e) = spool.counted(&names, &records).await {
                self.spool_behind = true;
                tracing::error!(error = %e, records = records.len(), "usage spool write failed; the window is kept in memory");
            }
        }
        let now = Instant::now();
        let to = Delivery {
            node: &self.node,
            boot_id: &self.boot_id,
            metrics: &self.metrics,
            write_timeout: self.write_timeout,
        };
        let mut records = records;
        let sinks = self.sinks.len();
        for (i, queue) in self.sinks.iter_mut().enumerate() {
            // The last sink takes the window's records themselves: a million active keys
            // are then held once, not twice, while they are delivered.
            if i + 1 == sinks {
                queue.take(std::mem::take(&mut records));
            } else {
                queue.add(&records);
            }
            if ignore_backoff || now >= queue.retry_at {
                queue.deliver(&to, self.spool.as_mut()).await;
            }
        }
        self.settle_spool().await;
        self.metrics.usage_pending.set(self.queued() as i64);
    }

    async fn final_flush(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        self.flush_window(true).await;
        while self.queued() > 0 && Instant::now() + FINAL_RETRY_PAUSE < deadline {
            tokio::time::sleep(FINAL_RETRY_PAUSE).await;
            let to = Delivery {
                node: &self.node,
                boot_id: &self.boot_id,
                metrics: &self.metrics,
                write_timeout: self.write_timeout,
            };
            for queue in &mut self.sinks {
                queue.deliver(&to, self.spool.as_mut()).await;
            }
        }
        self.settle_spool().await;
        let left = self.queued();
        self.metrics.usage_pending.set(left as i64);
        if left == 0 {
            tracing::info!("usage flushed");
        } else if self.spool.is_some() && !self.spool_behind {
            tracing::warn!(records = left, "usage not yet delivered is kept in the spool for the next start");
        } else {
            self.metrics.usage_dropped.inc_by(left as u64);
            tracing::error!(records = left, "usage could not be delivered before shutdown and is lost");
        }
    }

    fn queued(&self) -> usize {
        self.sinks.iter().map(SinkQueue::queued).sum()
    }
}

/// Distinguishes this process's batches from those of an earlier run of the same node.
fn new_boot_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Denial;
    use crate::usage::counters::TestCounters;
    use crate::usage::{RequestUsage, SinkError};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// Records what it receives; fails while `down` is set.
    #[derive(Default)]
    struct RecordingSink {
        down: AtomicBool,
        batches: Mutex<Vec<(u64, Vec<UsageRecord>)>>,
    }

    #[async_trait]
    impl UsageSink for RecordingSink {
        fn kind(&self) -> &'static str {
            "test"
        }

        async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(SinkError::Other("down".into()));
            }
            self.batches.lock().unwrap().push((batch.sequence, batch.records.to_vec()));
            Ok(())
        }
    }

    type Batch = (u64, Vec<UsageRecord>);

    /// Like the file sink: the write runs on a thread of its own, which goes on when
    /// the caller stops waiting. Each write waits for one permit of `gate`.
    struct DetachedSink {
        gate: Arc<tokio::sync::Semaphore>,
        batches: Arc<Mutex<Vec<Batch>>>,
    }

    #[async_trait]
    impl UsageSink for DetachedSink {
        fn kind(&self) -> &'static str {
            "test"
        }

        async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError> {
            let (gate, batches) = (Arc::clone(&self.gate), Arc::clone(&self.batches));
            let entry = (batch.sequence, batch.records.to_vec());
            tokio::spawn(async move {
                gate.acquire().await.map_err(|e| SinkError::Other(e.to_string()))?.forget();
                batches.lock().unwrap().push(entry);
                Ok(())
            })
            .await
            .map_err(|e| SinkError::Other(e.to_string()))?
        }
    }

    async fn wait_for(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn allowed() -> RequestUsage {
        RequestUsage { denial: None, status: 200, bytes_in: 0, bytes_out: 0, at_ms: 0 }
    }

    fn setup() -> (Flusher, Arc<TestCounters>, Arc<RecordingSink>) {
        let counters = Arc::new(TestCounters::default());
        let sink = Arc::new(RecordingSink::default());
        let flusher = Flusher::new(
            Arc::clone(&counters) as Arc<dyn UsageCounters>,
            vec![("test".to_owned(), Arc::clone(&sink) as Arc<dyn UsageSink>)],
            "node-1".into(),
            Duration::from_secs(5),
            Arc::new(Metrics::new().unwrap()),
            None,
        );
        (flusher, counters, sink)
    }

    fn delivered(sink: &RecordingSink) -> u64 {
        sink.batches.lock().unwrap().iter().flat_map(|(_, r)| r).map(|r| r.requests).sum()
    }

    #[tokio::test]
    async fn each_window_is_delivered_once() {
        let (mut flusher, counters, sink) = setup();
        counters.record("a", None, &allowed());
        counters.record("b", None, &allowed());
        flusher.flush_window(false).await;
        counters.record("a", None, &allowed());
        flusher.flush_window(false).await;
        flusher.flush_window(false).await;
        let batches = sink.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].1.len(), 2);
        assert_eq!(delivered(&sink), 3);
        assert!(batches.iter().all(|(_, records)| records.iter().all(|r| r.node == "node-1")));
    }

    #[tokio::test]
    async fn a_failed_batch_is_retried_unchanged_and_later_windows_merge() {
        let (mut flusher, counters, sink) = setup();
        sink.down.store(true, Ordering::SeqCst);
        counters.record("a", None, &allowed());
        flusher.flush_window(true).await;
        counters.record("a", None, &allowed());
        counters.record("a", None, &RequestUsage { denial: Some(Denial::KeyRevoked), status: 401, ..allowed() });
        flusher.flush_window(true).await;
        assert_eq!(flusher.queued(), 2, "one in flight, one merged pending record");
        sink.down.store(false, Ordering::SeqCst);
        flusher.flush_window(true).await;
        let batches = sink.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].0, 1, "the failed batch keeps its sequence");
        assert_eq!(batches[0].1[0].requests, 1);
        assert_eq!(batches[1].1[0].requests, 2);
        assert_eq!(batches[1].1[0].denied["key_revoked"], 1);
        assert_eq!(flusher.queued(), 0);
    }

    #[tokio::test]
    async fn a_write_that_finishes_after_its_timeout_is_not_written_again() {
        let counters = Arc::new(TestCounters::default());
        let sink = Arc::new(DetachedSink { gate: Arc::new(tokio::sync::Semaphore::new(0)), batches: Arc::default() });
        let mut flusher = Flusher::new(
            Arc::clone(&counters) as Arc<dyn UsageCounters>,
            vec![("test".to_owned(), Arc::clone(&sink) as Arc<dyn UsageSink>)],
            "node-1".into(),
            Duration::from_secs(5),
            Arc::new(Metrics::new().unwrap()),
            None,
        );
        flusher.write_timeout = Duration::from_millis(50);
        counters.record("a", None, &allowed());
        // The write is still hanging when the flusher stops waiting; then it finishes.
        flusher.flush_window(true).await;
        assert!(sink.batches.lock().unwrap().is_empty());
        sink.gate.add_permits(1);
        wait_for(|| !sink.batches.lock().unwrap().is_empty()).await;
        // Later rounds, with the sink answering at once, must not write the batch again.
        sink.gate.add_permits(100);
        flusher.flush_window(true).await;
        flusher.flush_window(true).await;
        let requests: u64 = sink.batches.lock().unwrap().iter().flat_map(|(_, r)| r).map(|r| r.requests).sum();
        assert_eq!(requests, 1, "batches: {:?}", sink.batches.lock().unwrap());
        assert_eq!(flusher.queued(), 0);
    }

    #[tokio::test]
    async fn final_flush_delivers_everything_counted() {
        let (flusher, counters, sink) = setup();
        let handle = flusher.spawn();
        for _ in 0..10 {
            counters.record("a", None, &allowed());
        }
        handle.flush_and_stop(Duration::from_secs(2)).await;
        assert_eq!(delivered(&sink), 10);
    }

    /// A `RecordingSink` that takes at most three records a batch.
    struct SmallBatches(Arc<RecordingSink>);

    #[async_trait]
    impl UsageSink for SmallBatches {
        fn kind(&self) -> &'static str {
            "test"
        }

        fn max_batch_records(&self) -> usize {
            3
        }

        async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError> {
            self.0.write(batch).await
        }
    }

    #[tokio::test]
    async fn a_window_larger_than_a_batch_goes_out_as_several_each_with_its_own_sequence() {
        let counters = Arc::new(TestCounters::default());
        let sink = Arc::new(RecordingSink::default());
        let mut flusher = Flusher::new(
            Arc::clone(&counters) as Arc<dyn UsageCounters>,
            vec![("test".to_owned(), Arc::new(SmallBatches(Arc::clone(&sink))) as Arc<dyn UsageSink>)],
            "node-1".into(),
            Duration::from_secs(5),
            Arc::new(Metrics::new().unwrap()),
            None,
        );
        for key in 0..10 {
            counters.record(&format!("k{key}"), None, &allowed());
        }
        flusher.flush_window(false).await;
        let batches = sink.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().map(|(_, r)| r.len()).collect::<Vec<_>>(), [3, 3, 3, 1]);
        assert_eq!(batches.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3, 4]);
        let keys: std::collections::BTreeSet<_> = batches.iter().flat_map(|(_, r)| r).map(|r| &r.key_id).collect();
        assert_eq!(keys.len(), 10);
    }

    /// A flusher on a spool in `dir`, sending to `sink` as "node-1".
    fn spooled(dir: &std::path::Path, sink: &Arc<RecordingSink>) -> (Flusher, Arc<TestCounters>) {
        let counters = Arc::new(TestCounters::default());
        let flusher = Flusher::new(
            Arc::clone(&counters) as Arc<dyn UsageCounters>,
            vec![("test".to_owned(), Arc::new(SmallBatches(Arc::clone(sink))) as Arc<dyn UsageSink>)],
            "node-1".into(),
            Duration::from_secs(5),
            Arc::new(Metrics::new().unwrap()),
            Some(dir.join("usage.spool")),
        );
        (flusher, counters)
    }

    #[tokio::test]
    async fn usage_a_sink_has_not_taken_at_shutdown_is_delivered_after_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(RecordingSink::default());
        sink.down.store(true, Ordering::SeqCst);
        let (mut flusher, counters) = spooled(dir.path(), &sink);
        flusher.open_spool().await;
        for key in 0..5 {
            counters.record(&format!("k{key}"), None, &allowed());
        }
        counters.record("k0", None, &allowed());
        flusher.final_flush(Duration::from_millis(300)).await;
        assert_eq!(flusher.metrics.usage_dropped.get(), 0, "kept in the spool, not dropped");
        assert!(flusher.metrics.usage_spool_bytes.get() > 0);
        drop(flusher);

        sink.down.store(false, Ordering::SeqCst);
        let (mut next, _) = spooled(dir.path(), &sink);
        next.open_spool().await;
        assert_eq!(next.queued(), 5);
        next.flush_window(false).await;
        assert_eq!(delivered(&sink), 6);
        assert_eq!(next.queued(), 0);
        assert_eq!(std::fs::metadata(dir.path().join("usage.spool")).unwrap().len(), 8, "emptied once delivered");
    }

    #[tokio::test]
    async fn a_batch_sent_before_a_crash_is_sent_again_under_its_first_identity() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(RecordingSink::default());
        let (mut flusher, counters) = spooled(dir.path(), &sink);
        flusher.open_spool().await;
        for key in 0..4 {
            counters.record(&format!("k{key}"), None, &allowed());
        }
        // The first batch is sent and taken; the crash comes before its acknowledgement
        // reaches the spool, which is what cutting the log back to before it does.
        sink.down.store(true, Ordering::SeqCst);
        flusher.flush_window(true).await;
        let spool = dir.path().join("usage.spool");
        let first_boot = flusher.boot_id.to_string();
        drop(flusher);

        sink.down.store(false, Ordering::SeqCst);
        let (mut next, _) = spooled(dir.path(), &sink);
        next.open_spool().await;
        assert_ne!(next.boot_id.as_ref(), first_boot);
        // Four keys in batches of three: two batches, taken (and spooled) together.
        let held: Vec<_> = next.sinks[0].in_flight.iter().map(|b| (b.boot_id.to_string(), b.sequence)).collect();
        assert_eq!(held, [(first_boot.clone(), 1), (first_boot.clone(), 2)], "the batches in flight come back");
        next.flush_window(false).await;
        assert_eq!(delivered(&sink), 4);
        assert_eq!(std::fs::metadata(&spool).unwrap().len(), 8);
    }

    #[tokio::test]
    async fn usage_that_cannot_be_delivered_at_shutdown_is_counted_as_dropped() {
        let (mut flusher, counters, sink) = setup();
        sink.down.store(true, Ordering::SeqCst);
        counters.record("a", None, &allowed());
        counters.record("b", None, &allowed());
        flusher.final_flush(Duration::from_millis(500)).await;
        assert_eq!(flusher.metrics.usage_dropped.get(), 2);
    }
}
