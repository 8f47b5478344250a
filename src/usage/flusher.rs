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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::counters::UsageCounters;
use super::record::UsageRecord;
use super::sink::{SinkError, UsageBatch, UsageSink};
use crate::metrics::Metrics;

/// One sink write may take this long before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Pause between delivery rounds during the final flush.
const FINAL_RETRY_PAUSE: Duration = Duration::from_millis(200);

struct SinkQueue {
    /// Names the sink's configuration, to keep its queue across config reloads.
    identity: String,
    sink: Arc<dyn UsageSink>,
    in_flight: Option<(u64, Arc<[UsageRecord]>)>,
    /// The write of `in_flight` still under way, if the last try stopped waiting for it.
    writing: Option<JoinHandle<Result<(), SinkError>>>,
    pending: HashMap<String, UsageRecord>,
    next_sequence: u64,
    failures: u32,
    retry_at: Instant,
}

impl SinkQueue {
    fn queued(&self) -> usize {
        self.in_flight.as_ref().map_or(0, |(_, r)| r.len()) + self.pending.len()
    }

    fn add(&mut self, records: &[UsageRecord]) {
        for record in records {
            match self.pending.get_mut(&record.key_id) {
                Some(existing) => existing.merge(record),
                None => {
                    self.pending.insert(record.key_id.clone(), record.clone());
                }
            }
        }
    }

    /// Delivers what it can; stops at the first failure and backs off.
    async fn deliver(&mut self, node: &str, boot_id: &str, metrics: &Metrics, write_timeout: Duration) {
        loop {
            if self.in_flight.is_none() {
                if self.pending.is_empty() {
                    return;
                }
                let records: Arc<[UsageRecord]> = self.pending.drain().map(|(_, r)| r).collect();
                self.next_sequence += 1;
                self.in_flight = Some((self.next_sequence, records));
            }
            let Some((sequence, records)) = &self.in_flight else { return };
            let writing = match &mut self.writing {
                Some(writing) => writing,
                None => self.writing.insert(spawn_write(&self.sink, node, boot_id, *sequence, records)),
            };
            let kind = self.sink.kind();
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
                    metrics.usage_flushed(kind, true);
                    if self.failures > 0 {
                        tracing::info!(sink = kind, "usage sink recovered; pending usage delivered");
                    }
                    self.in_flight = None;
                    self.failures = 0;
                }
                Err(error) => {
                    metrics.usage_flushed(kind, false);
                    self.failures += 1;
                    let backoff = Duration::from_secs(1).saturating_mul(1 << self.failures.min(6)).min(MAX_BACKOFF);
                    self.retry_at = Instant::now() + backoff;
                    tracing::warn!(
                        sink = kind,
                        failures = self.failures,
                        pending = self.queued(),
                        retry_in = ?backoff,
                        "usage sink failed, keeping its usage to retry: {error}"
                    );
                    return;
                }
            }
        }
    }
}

/// One attempt to write a batch, on a task that finishes whether or not anyone waits.
fn spawn_write(
    sink: &Arc<dyn UsageSink>,
    node: &str,
    boot_id: &str,
    sequence: u64,
    records: &Arc<[UsageRecord]>,
) -> JoinHandle<Result<(), SinkError>> {
    let (sink, node, boot_id, records) = (Arc::clone(sink), node.to_owned(), boot_id.to_owned(), Arc::clone(records));
    tokio::spawn(
        async move { sink.write(UsageBatch { node: &node, boot_id: &boot_id, sequence, records: &records }).await },
    )
}

pub struct Flusher {
    counters: Arc<UsageCounters>,
    node: String,
    boot_id: String,
    interval: Duration,
    sinks: Vec<SinkQueue>,
    metrics: Arc<Metrics>,
    window_start: OffsetDateTime,
    /// `WRITE_TIMEOUT`, shortened by tests.
    write_timeout: Duration,
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
    SinkQueue {
        identity,
        sink,
        in_flight: None,
        writing: None,
        pending: HashMap::new(),
        next_sequence: 0,
        failures: 0,
        retry_at: Instant::now(),
    }
}

impl Flusher {
    pub fn new(
        counters: Arc<UsageCounters>,
        sinks: Vec<NamedSink>,
        node: String,
        interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Flusher {
            counters,
            node,
            boot_id: new_boot_id(),
            interval,
            sinks: sinks.into_iter().map(|(identity, sink)| queue(identity, sink)).collect(),
            metrics,
            window_start: OffsetDateTime::now_utc(),
            write_timeout: WRITE_TIMEOUT,
        }
    }

    /// Runs on the current runtime until `flush_and_stop` is called.
    pub fn spawn(self) -> FlusherHandle {
        let (commands, received) = mpsc::channel(4);
        tokio::spawn(self.run(received));
        FlusherHandle { commands }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
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
        for mut removed in old {
            removed.deliver(&self.node, &self.boot_id, &self.metrics, self.write_timeout).await;
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
        self.metrics.usage_pending.set(self.queued() as i64);
    }

    async fn flush_window(&mut self, ignore_backoff: bool) {
        let window_end = OffsetDateTime::now_utc();
        let records = self.counters.drain(&self.node, self.window_start, window_end);
        self.window_start = window_end;
        let now = Instant::now();
        for queue in &mut self.sinks {
            queue.add(&records);
            if ignore_backoff || now >= queue.retry_at {
                queue.deliver(&self.node, &self.boot_id, &self.metrics, self.write_timeout).await;
            }
        }
        self.metrics.usage_pending.set(self.queued() as i64);
    }

    async fn final_flush(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        self.flush_window(true).await;
        while self.queued() > 0 && Instant::now() + FINAL_RETRY_PAUSE < deadline {
            tokio::time::sleep(FINAL_RETRY_PAUSE).await;
            for queue in &mut self.sinks {
                queue.deliver(&self.node, &self.boot_id, &self.metrics, self.write_timeout).await;
            }
        }
        let lost = self.queued();
        self.metrics.usage_pending.set(lost as i64);
        if lost > 0 {
            self.metrics.usage_dropped.inc_by(lost as u64);
            tracing::error!(records = lost, "usage could not be delivered before shutdown and is lost");
        } else {
            tracing::info!("usage flushed");
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
    use crate::policy::Denial;
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

    fn setup() -> (Flusher, Arc<UsageCounters>, Arc<RecordingSink>) {
        let counters = Arc::new(UsageCounters::new());
        let sink = Arc::new(RecordingSink::default());
        let flusher = Flusher::new(
            Arc::clone(&counters),
            vec![("test".to_owned(), Arc::clone(&sink) as Arc<dyn UsageSink>)],
            "node-1".into(),
            Duration::from_secs(5),
            Arc::new(Metrics::new().unwrap()),
        );
        (flusher, counters, sink)
    }

    fn delivered(sink: &RecordingSink) -> u64 {
        sink.batches.lock().unwrap().iter().flat_map(|(_, r)| r).map(|r| r.requests).sum()
    }

    #[tokio::test]
    async fn each_window_is_delivered_once() {
        let (mut flusher, counters, sink) = setup();
        counters.record("a", &allowed());
        counters.record("b", &allowed());
        flusher.flush_window(false).await;
        counters.record("a", &allowed());
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
        counters.record("a", &allowed());
        flusher.flush_window(true).await;
        counters.record("a", &allowed());
        counters.record("a", &RequestUsage { denial: Some(Denial::KeyRevoked), status: 401, ..allowed() });
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
        let counters = Arc::new(UsageCounters::new());
        let sink = Arc::new(DetachedSink { gate: Arc::new(tokio::sync::Semaphore::new(0)), batches: Arc::default() });
        let mut flusher = Flusher::new(
            Arc::clone(&counters),
            vec![("test".to_owned(), Arc::clone(&sink) as Arc<dyn UsageSink>)],
            "node-1".into(),
            Duration::from_secs(5),
            Arc::new(Metrics::new().unwrap()),
        );
        flusher.write_timeout = Duration::from_millis(50);
        counters.record("a", &allowed());
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
            counters.record("a", &allowed());
        }
        handle.flush_and_stop(Duration::from_secs(2)).await;
        assert_eq!(delivered(&sink), 10);
    }

    #[tokio::test]
    async fn usage_that_cannot_be_delivered_at_shutdown_is_counted_as_dropped() {
        let (mut flusher, counters, sink) = setup();
        sink.down.store(true, Ordering::SeqCst);
        counters.record("a", &allowed());
        counters.record("b", &allowed());
        flusher.final_flush(Duration::from_millis(500)).await;
        assert_eq!(flusher.metrics.usage_dropped.get(), 2);
    }
}
