//! Tells waiting gateways that the change feed moved.
//!
//! Changes made through this process poke the feed at once; changes made by
//! another control-plane process on the same database are noticed by polling
//! the feed's latest version, so every gateway hears of every change within a
//! poll interval wherever it was made.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::model::ChangeBatch;
use super::store::{Store, StoreError};

/// Changes per long-poll answer, about (an import batch is never split).
const CHANGES_PER_ANSWER: u32 = 1000;

/// How often the database is asked for the latest version when nothing pokes.
const POLL_EVERY: Duration = Duration::from_millis(100);

pub struct Feed {
    latest: watch::Sender<u64>,
    poke: Notify,
}

impl Feed {
    pub fn new(version: u64) -> Self {
        Feed { latest: watch::Sender::new(version), poke: Notify::new() }
    }

    /// A change was just committed here: look at the store now rather than at the next poll.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Long poll: the changes after `since` as soon as there are any, else an empty batch
    /// once `wait` passes. `reset` tells a follower ahead of this store (a restored
    /// database) to start over from a snapshot.
    pub async fn changes_after(&self, store: &Store, since: u64, wait: Duration) -> Result<ChangeBatch, StoreError> {
        let mut latest = self.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (changes, version) = store.changes_since(since, CHANGES_PER_ANSWER).await?;
            if version < since {
                return Ok(ChangeBatch { version, changes: Vec::new(), reset: true });
            }
            if !changes.is_empty() || tokio::time::Instant::now() >= deadline {
                let reached = changes.last().map_or(since, |c| c.version);
                return Ok(ChangeBatch { version: reached, changes, reset: false });
            }
            // Woken by a newer version, or by the deadline.
            let _ = tokio::time::timeout_at(deadline, latest.wait_for(|v| *v > since)).await;
        }
    }

    /// Follows the store's latest version until `shutdown` fires.
    pub async fn run(self: Arc<Self>, store: Arc<Store>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.poke.notified() => {}
                _ = tokio::time::sleep(POLL_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            match store.latest_version().await {
                Ok(version) => {
                    self.latest.send_if_modified(|latest| {
                        let moved = version != *latest;
                        *latest = version;
                        moved
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the change feed's version"),
            }
        }
    }
}
