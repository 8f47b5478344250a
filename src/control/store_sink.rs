//! Usage straight into the store (standalone mode), deduplicated like uploads.

use std::sync::Arc;

use async_trait::async_trait;

use super::store::Store;
use crate::usage::{SinkError, UsageBatch, UsageSink};

pub struct StoreSink {
    store: Arc<Store>,
}

impl StoreSink {
    pub fn new(store: Arc<Store>) -> Self {
        StoreSink { store }
    }
}

#[async_trait]
impl UsageSink for StoreSink {
    fn kind(&self) -> &'static str {
        "store"
    }

    async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError> {
        self.store
            .ingest_usage(batch.node, batch.boot_id, batch.sequence, batch.records)
            .await
            .map(|_| ())
            .map_err(|e| SinkError::Other(e.to_string()))
    }
}
