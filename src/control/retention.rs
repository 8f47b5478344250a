//! Applies `usage.retention` (and the event log's own retention, see
//! `store::EVENTS_KEPT`) in the background on every node with a store: a pass
//! shortly after the start, then one every [`COMPACT_EVERY`]. A pass works in
//! bounded transactions (see [`Store::compact_usage`]), so ingestion and queries
//! carry on meanwhile; several control planes on one database take turns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::task::JoinHandle;

use super::store::{Store, UsageCompaction};
use crate::config::UsageRetention;

/// Between passes. Buckets wait at most this long past their retention.
pub const COMPACT_EVERY: Duration = Duration::from_secs(600);
/// Before the first pass: a starting node gets to serve first.
pub const FIRST_PASS_AFTER: Duration = Duration::from_secs(5);

/// Runs one pass at a time; a tick while one is still running is skipped.
pub struct UsageCompactor {
    store: Arc<Store>,
    running: Option<JoinHandle<()>>,
}

impl UsageCompactor {
    pub fn new(store: Arc<Store>) -> Self {
        UsageCompactor { store, running: None }
    }

    /// Starts a pass with `retention` (the config in force now, so SIGHUP applies to
    /// the next pass) unless the last one is still running.
    pub fn tick(&mut self, retention: UsageRetention) {
        if self.running.as_ref().is_some_and(|pass| !pass.is_finished()) {
            return;
        }
        let store = Arc::clone(&self.store);
        self.running = Some(tokio::spawn(async move {
            let started = Instant::now();
            match store.compact_usage(OffsetDateTime::now_utc(), &retention).await {
                Ok(done) if done == UsageCompaction::default() => {}
                Ok(done) => tracing::info!(
                    hour_buckets = done.hour_buckets,
                    day_buckets = done.day_buckets,
                    deleted_buckets = done.deleted_buckets,
                    pruned_batch_ids = done.pruned_batch_ids,
                    took_ms = started.elapsed().as_millis() as u64,
                    "usage retention applied"
                ),
                Err(e) => tracing::warn!(error = %e, "usage retention pass failed; the next pass carries on"),
            }
            match store.prune_event_log(OffsetDateTime::now_utc()).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "old events forgotten"),
                Err(e) => tracing::warn!(error = %e, "pruning the event log failed; the next pass carries on"),
            }
        }));
    }
}
