//! Tells waiting gateways that the change feed moved.
//!
//! Changes made through this process poke the feed at once; changes made by
//! another control-plane process on the same database are noticed by polling
//! the feed's latest version, so every gateway hears of every change within a
//! poll interval wherever it was made.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::store::Store;

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
