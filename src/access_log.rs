//! The access log: one JSON line per request, written off the request path.
//!
//! Each worker thread writes finished lines into a buffer of its own, and a dedicated
//! writer thread takes the buffers whole and writes them out, so a slow disk or a
//! blocked stdout never stalls a request, and a request writes nothing that other
//! cores share (a channel's tail would be one line every request writes). If the
//! writer falls behind, lines are dropped and counted rather than buffered without
//! bound. `access_log: off` skips even the formatting.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::IntCounter;
use serde::Serialize;
use time::OffsetDateTime;

use crate::config::AccessLogConfig;
use crate::metrics::sharded::Slots;

/// Bytes of lines waiting for the writer, all threads together, before lines are dropped.
const PENDING_BYTES: usize = 16 << 20;
/// A thread's buffer this full wakes the writer before its next round.
const WAKE_BYTES: usize = 64 << 10;
/// The writer takes the buffers at least this often, so lines reach the file even
/// under light traffic.
const WRITE_EVERY: Duration = Duration::from_millis(200);

/// One finished request, as it appears in the log.
#[derive(Serialize)]
pub struct AccessEntry<'a> {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub request_id: &'a str,
    pub route: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    /// Path and query with every key parameter removed.
    pub path: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub duration_ms: f64,
    pub upstream: Option<&'a str>,
    pub upstream_addr: Option<SocketAddr>,
}

enum Message {
    /// A thread's buffer filled up: take the buffers now.
    Wake,
    /// Write out every line recorded so far, then answer.
    Flush(SyncSender<()>),
}

/// Lines not yet written, one buffer per thread slot.
type Pending = Slots<Mutex<Vec<u8>>>;

struct Writer {
    pending: Arc<Pending>,
    /// Bytes one slot's buffer may hold.
    slot_bytes: usize,
    wake: SyncSender<Message>,
}

pub struct AccessLog {
    writer: Option<Writer>,
    dropped: IntCounter,
}

impl AccessLog {
    /// `dropped` counts lines given up because the writer fell behind.
    pub fn start(config: &AccessLogConfig, dropped: IntCounter) -> io::Result<Self> {
        Self::start_with_bound(config, dropped, PENDING_BYTES)
    }

    fn start_with_bound(config: &AccessLogConfig, dropped: IntCounter, pending_bytes: usize) -> io::Result<Self> {
        let sink: Box<dyn Write + Send> = match config {
            AccessLogConfig::Off => return Ok(AccessLog { writer: None, dropped }),
            AccessLogConfig::Stdout => Box::new(io::stdout()),
            AccessLogConfig::File(path) => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        let pending = Arc::new(Pending::default());
        let slot_bytes = pending_bytes / pending.iter().count().max(1);
        // Wake-ups beyond one waiting round add nothing; flushes wait their turn.
        let (wake, messages) = mpsc::sync_channel::<Message>(4);
        let buffers = Arc::clone(&pending);
        std::thread::Builder::new()
            .name("keygate-access-log".into())
            .spawn(move || write_until_closed(&buffers, &messages, sink))?;
        Ok(AccessLog { writer: Some(Writer { pending, slot_bytes, wake }), dropped })
    }

    pub fn enabled(&self) -> bool {
        self.writer.is_some()
    }

    pub fn record(&self, entry: &AccessEntry<'_>) {
        let Some(writer) = &self.writer else { return };
        let mut buffer = writer.pending.local().lock().unwrap_or_else(PoisonError::into_inner);
        let before = buffer.len();
        if before >= writer.slot_bytes {
            drop(buffer);
            self.dropped.inc();
            return;
        }
        if serde_json::to_writer(&mut *buffer, entry).is_err() {
            buffer.truncate(before);
            return;
        }
        buffer.push(b'\n');
        if before < WAKE_BYTES && buffer.len() >= WAKE_BYTES {
            drop(buffer);
            // A full queue means the writer is due anyway.
            let _ = writer.wake.try_send(Message::Wake);
        }
    }

    /// Waits until every line recorded so far has been written (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let Some(writer) = &self.writer else { return };
        let (done, written) = mpsc::sync_channel(1);
        if writer.wake.send(Message::Flush(done)).is_ok() {
            let _ = written.recv_timeout(timeout);
        }
    }
}

/// The writer thread: takes every thread's buffer each round and writes it out, until
/// the log is dropped (then once more, so nothing recorded is lost).
fn write_until_closed(pending: &Pending, messages: &mpsc::Receiver<Message>, sink: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, sink);
    let mut taken = Vec::new();
    loop {
        let message = messages.recv_timeout(WRITE_EVERY);
        for buffer in pending.iter() {
            {
                let mut buffer = buffer.lock().unwrap_or_else(PoisonError::into_inner);
                if buffer.is_empty() {
                    continue;
                }
                // The thread keeps writing into the emptied buffer of the last round.
                std::mem::swap(&mut *buffer, &mut taken);
            }
            // Write errors have nowhere to go but this log; keep serving.
            let _ = out.write_all(&taken);
            taken.clear();
        }
        let _ = out.flush();
        match message {
            Ok(Message::Flush(done)) => {
                let _ = done.send(());
            }
            Ok(Message::Wake) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let log = AccessLog::start(&AccessLogConfig::File(path.clone()), dropped).unwrap();
        log.record(&AccessEntry {
            time: OffsetDateTime::UNIX_EPOCH,
            request_id: "r1",
            route: Some("orders"),
            key_id: Some("key_1"),
            client_ip: Some("10.0.0.1".parse().unwrap()),
            method: "GET",
            path: "/v1/orders?a=1",
            status: 200,
            outcome: "allowed",
            duration_ms: 1.5,
            upstream: Some("api"),
            upstream_addr: Some("127.0.0.1:9000".parse().unwrap()),
        });
        log.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["key_id"], "key_1");
        assert_eq!(line["status"], 200);
        assert_eq!(line["time"], "1970-01-01T00:00:00Z");
        assert_eq!(line["upstream_addr"], "127.0.0.1:9000");
    }

    fn entry(request_id: &str) -> AccessEntry<'_> {
        AccessEntry {
            time: OffsetDateTime::UNIX_EPOCH,
            request_id,
            route: None,
            key_id: None,
            client_ip: None,
            method: "GET",
            path: "/",
            status: 200,
            outcome: "allowed",
            duration_ms: 0.1,
            upstream: None,
            upstream_addr: None,
        }
    }

    #[test]
    fn lines_of_every_thread_are_written_whole_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let log = AccessLog::start(&AccessLogConfig::File(path.clone()), dropped.clone()).unwrap();
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let log = &log;
                scope.spawn(move || {
                    for n in 0..2_000 {
                        log.record(&entry(&format!("t{thread}-{n}")));
                    }
                });
            }
        });
        log.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        let mut ids: Vec<String> = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["request_id"].as_str().unwrap().into())
            .collect();
        assert_eq!(ids.len(), 8_000);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 8_000, "every line once");
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn lines_past_the_bound_are_dropped_and_counted_and_later_ones_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let config = AccessLogConfig::File(path.clone());
        // Room for a few lines per thread slot: the writer cannot keep up with a burst.
        let log = AccessLog::start_with_bound(&config, dropped.clone(), 1_000 * slot_count()).unwrap();
        for n in 0..100 {
            log.record(&entry(&format!("burst-{n}")));
        }
        assert!(dropped.get() > 0, "a burst over the bound drops lines");
        log.flush(Duration::from_secs(5));
        log.record(&entry("after"));
        log.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        let written = text.lines().count() as u64;
        assert_eq!(written + dropped.get(), 101, "each line written or counted");
        assert!(text.lines().last().unwrap().contains("\"after\""), "the writer caught up");
    }

    #[test]
    fn lines_recorded_before_the_log_is_dropped_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&AccessLogConfig::File(path.clone()), IntCounter::new("d", "t").unwrap()).unwrap();
        log.record(&entry("last"));
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&path).unwrap().contains("\"last\"") {
            assert!(std::time::Instant::now() < deadline, "the line was lost");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn slot_count() -> usize {
        Pending::default().iter().count()
    }

    #[test]
    fn off_records_nothing() {
        let log = AccessLog::start(&AccessLogConfig::Off, IntCounter::new("dropped", "test").unwrap()).unwrap();
        assert!(!log.enabled());
    }
}
