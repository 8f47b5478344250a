//! The access log: one JSON line per request, written off the request path.
//!
//! Workers hand finished lines to a dedicated writer thread through a bounded
//! channel, so a slow disk or a blocked stdout never stalls a request; if the
//! writer falls that far behind, lines are dropped and counted rather than queued
//! without bound. `access_log: off` skips even the formatting.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use prometheus::IntCounter;
use serde::Serialize;
use time::OffsetDateTime;

use crate::config::AccessLogConfig;

/// Lines buffered between the workers and the writer thread.
const QUEUE_LINES: usize = 65_536;
/// Written lines reach the file at least this often, even under light traffic.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

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
    Line(Vec<u8>),
    /// Write out everything queued so far, then answer.
    Flush(SyncSender<()>),
}

pub struct AccessLog {
    sender: Option<SyncSender<Message>>,
    dropped: IntCounter,
}

impl AccessLog {
    /// `dropped` counts lines given up because the writer fell behind.
    pub fn start(config: &AccessLogConfig, dropped: IntCounter) -> io::Result<Self> {
        let sink: Box<dyn Write + Send> = match config {
            AccessLogConfig::Off => return Ok(AccessLog { sender: None, dropped }),
            AccessLogConfig::Stdout => Box::new(io::stdout()),
            AccessLogConfig::File(path) => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (sender, receiver) = mpsc::sync_channel::<Message>(QUEUE_LINES);
        std::thread::Builder::new().name("keygate-access-log".into()).spawn(move || {
            let mut out = BufWriter::with_capacity(64 * 1024, sink);
            loop {
                // Write errors have nowhere to go but this log; keep serving.
                match receiver.recv_timeout(FLUSH_EVERY) {
                    Ok(Message::Line(line)) => {
                        let _ = out.write_all(&line);
                    }
                    Ok(Message::Flush(done)) => {
                        let _ = out.flush();
                        let _ = done.send(());
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        let _ = out.flush();
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            let _ = out.flush();
        })?;
        Ok(AccessLog { sender: Some(sender), dropped })
    }

    pub fn enabled(&self) -> bool {
        self.sender.is_some()
    }

    pub fn record(&self, entry: &AccessEntry<'_>) {
        let Some(sender) = &self.sender else { return };
        let mut line = Vec::with_capacity(320);
        if serde_json::to_writer(&mut line, entry).is_err() {
            return;
        }
        line.push(b'\n');
        if let Err(TrySendError::Full(_)) = sender.try_send(Message::Line(line)) {
            self.dropped.inc();
        }
    }

    /// Waits until every line recorded so far has been written (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let Some(sender) = &self.sender else { return };
        let (done, written) = mpsc::sync_channel(1);
        if sender.send(Message::Flush(done)).is_ok() {
            let _ = written.recv_timeout(timeout);
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

    #[test]
    fn off_records_nothing() {
        let log = AccessLog::start(&AccessLogConfig::Off, IntCounter::new("dropped", "test").unwrap()).unwrap();
        assert!(!log.enabled());
    }
}
