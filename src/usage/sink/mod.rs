//! Where usage goes. Each sink receives whole batches and either takes all of
//! one or none of it, so a retry never counts anything twice. The metering
//! sinks (`http`, `nats`) may take part of a batch; their receivers drop what a
//! retry repeats by the events' deterministic ids.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::record::UsageRecord;
use crate::http_client;

mod event;
mod http;
mod nats;

pub use event::{event_id, KeyOwners, UsageEvent, EVENT_CONTENT_TYPE, EVENT_TYPE};
pub use http::{HttpSink, BATCH_CONTENT_TYPE};
pub use nats::NatsSink;

/// One delivery attempt. `sequence` identifies the batch for receivers that
/// drop duplicates: a batch that failed is retried with the same sequence and
/// the same records.
#[derive(Debug, Clone, Copy)]
pub struct UsageBatch<'a> {
    pub node: &'a str,
    pub boot_id: &'a str,
    pub sequence: u64,
    pub records: &'a [UsageRecord],
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

#[async_trait]
pub trait UsageSink: Send + Sync {
    /// The `sink` label in metrics: `file`, `store`, `control_plane`, `http`, `nats`.
    fn kind(&self) -> &'static str;

    /// The most records one batch may hold: a window with more active keys is sent
    /// as several batches.
    fn max_batch_records(&self) -> usize {
        DEFAULT_MAX_BATCH_RECORDS
    }

    async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError>;
}

/// Batches of a few megabytes at most (a record is about 300 bytes of JSON).
pub const DEFAULT_MAX_BATCH_RECORDS: usize = 5_000;

/// JSON lines appended to a file (CONTRACT §8). The file is opened for every
/// batch, so rotating it away needs no signal.
pub struct FileSink {
    path: PathBuf,
    /// Held by the blocking write itself, which outlives a caller that stops
    /// waiting: a failed write cuts the file back to where it began, and must not
    /// cut another write's lines with it.
    appending: Arc<Mutex<()>>,
}

impl FileSink {
    pub fn new(path: PathBuf) -> Self {
        FileSink { path, appending: Arc::default() }
    }

    fn fail(&self, source: std::io::Error) -> SinkError {
        SinkError::File { path: self.path.display().to_string(), source }
    }
}

fn json_lines(records: &[UsageRecord]) -> std::io::Result<Vec<u8>> {
    let mut lines = Vec::with_capacity(records.len() * 256);
    for record in records {
        serde_json::to_writer(&mut lines, record)?;
        lines.push(b'\n');
    }
    Ok(lines)
}

/// All or nothing: a partial write is cut off again so a retry repeats no line.
fn append_all_or_nothing(path: &std::path::Path, lines: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    let before = file.metadata()?.len();
    if let Err(e) = file.write_all(lines).and_then(|()| file.sync_data()) {
        let _ = file.set_len(before);
        return Err(e);
    }
    Ok(())
}

#[async_trait]
impl UsageSink for FileSink {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError> {
        let lines = json_lines(batch.records).map_err(|e| self.fail(e))?;
        let (path, appending) = (self.path.clone(), Arc::clone(&self.appending));
        // File I/O and fsync block: keep them off the async workers.
        tokio::task::spawn_blocking(move || {
            let _one_at_a_time = appending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            append_all_or_nothing(&path, &lines)
        })
        .await
        .map_err(|e| SinkError::Other(format!("usage file writer stopped: {e}")))?
        .map_err(|e| self.fail(e))
    }
}

/// Batches uploaded to a control plane, which drops duplicates by
/// `(node, boot_id, sequence)`: a retry after a lost answer counts nothing twice.
pub struct ControlPlaneSink {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl ControlPlaneSink {
    pub fn new(base_url: &str, token: &str) -> Result<Self, SinkError> {
        let client = http_client::build(
            http_client::GATEWAY_AGENT,
            http_client::CONTROL_PLANE_CONNECT,
            Some(std::time::Duration::from_secs(10)),
        )
        .map_err(|e| SinkError::Other(e.to_string()))?;
        Ok(ControlPlaneSink {
            client,
            url: format!("{}/v1/sync/usage", base_url.trim_end_matches('/')),
            token: token.to_owned(),
        })
    }
}

#[derive(serde::Serialize)]
struct Upload<'a> {
    node: &'a str,
    boot_id: &'a str,
    sequence: u64,
    records: &'a [UsageRecord],
}

#[async_trait]
impl UsageSink for ControlPlaneSink {
    fn kind(&self) -> &'static str {
        "control_plane"
    }

    /// The control plane's limit per upload.
    fn max_batch_records(&self) -> usize {
        super::upload::MAX_UPLOAD_RECORDS
    }

    async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError> {
        let upload =
            Upload { node: batch.node, boot_id: batch.boot_id, sequence: batch.sequence, records: batch.records };
        let response = self
            .client
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(&upload)
            .send()
            .await
            .map_err(|e| SinkError::Other(format!("{}: {e}", self.url)))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(SinkError::Other(format!("{}: HTTP {}", self.url, response.status())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn record(key: &str) -> UsageRecord {
        UsageRecord {
            node: "n".into(),
            key_id: key.into(),
            window_start: datetime!(2026-01-01 00:00 UTC),
            window_end: datetime!(2026-01-01 00:00:05 UTC),
            requests: 1,
            allowed: 1,
            denied: Default::default(),
            status: Default::default(),
            bytes_in: 0,
            bytes_out: 0,
            last_used_at: None,
            owner_at_count: None,
        }
    }

    fn batch(records: &[UsageRecord]) -> UsageBatch<'_> {
        UsageBatch { node: "n", boot_id: "b", sequence: 1, records }
    }

    #[tokio::test]
    async fn file_sink_appends_one_json_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path().join("usage.jsonl"));
        sink.write(batch(&[record("a"), record("b")])).await.unwrap();
        sink.write(batch(&[record("c")])).await.unwrap();
        let text = std::fs::read_to_string(dir.path().join("usage.jsonl")).unwrap();
        let keys: Vec<String> = text.lines().map(|l| serde_json::from_str::<UsageRecord>(l).unwrap().key_id).collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn file_sink_fails_cleanly_when_its_directory_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path().join("missing").join("usage.jsonl"));
        assert!(matches!(sink.write(batch(&[record("a")])).await, Err(SinkError::File { .. })));
    }
}
