//! The background half of usage: drain the counters every window and deliver.
//!
//! Each sink has one batch in flight (retried unchanged, with its sequence,
//! until it is taken) and one pending batch into which newer windows are merged
//! per key. So a failing sink holds at most two records per active key, loses
//! nothing, and never receives a count twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::counters::UsageCounters;
use super::record::UsageRecord;
use super::sink::{UsageBatch, UsageSink};
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
    in_flight: Option<(u64, Vec<UsageRecord>)>,
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
    async fn deliver(&mut self, node: &str, boot_id: &str, metrics: &Metrics) {
        loop {
            if self.in_flight.is_none() {
                if self.pending.is_empty() {
                    return;
                }
                let records: Vec<UsageRecord> = self.pending.drain().map(|(_, r)| r).collect();
                self.next_sequence += 1;
                self.in_flight = Some((self.next_sequence, records));
            }
            let Some((sequence, records)) = &self.in_flight else { return };
            let batch = UsageBatch { node, boot_id, sequence: *sequence, records };
            let kind = self.sink.kind();
            let result = match tokio::time::timeout(WRITE_TIMEOUT, self.sink.write(batch)).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {WRITE_TIMEOUT:?}")),
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

pub struct Flusher {
    counters: Arc<UsageCounters>,
    node: String,
    boot_id: String,
    interval: Duration,
    sinks: Vec<SinkQueue>,
    metrics: Arc<Metrics>,
    window_start: OffsetDateTime,
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
            removed.deliver(&self.node, &self.boot_id, &self.metrics).await;
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
                queue.deliver(&self.node, &self.boot_id, &self.metrics).await;
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
                queue.deliver(&self.node, &self.boot_id, &self.metrics).await;
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
