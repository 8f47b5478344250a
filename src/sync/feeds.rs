//! The two places a follower gets keys from.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;

use super::follow::{ChangeBatch, FeedError, KeyFeed};
use crate::control::feed::Feed;
use crate::control::model::StoredKey;
use crate::control::store::Store;
use crate::http_client;

/// A control plane over HTTP, authenticated with a sync token.
pub struct RemoteFeed {
    client: reqwest::Client,
    base_url: String,
    token: String,
}

impl RemoteFeed {
    pub fn new(base_url: &str, token: &str) -> Result<Self, FeedError> {
        let client = http_client::build(http_client::GATEWAY_AGENT, http_client::CONTROL_PLANE_CONNECT, None)
            .map_err(|e| FeedError::Transport(e.to_string()))?;
        Ok(RemoteFeed { client, base_url: base_url.trim_end_matches('/').to_owned(), token: token.to_owned() })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str, timeout: Duration) -> Result<T, FeedError> {
        let response = self
            .client
            .get(format!("{}{path}", self.base_url))
            .bearer_auth(&self.token)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| FeedError::Transport(format!("{}: {e}", self.base_url)))?;
        match response.status() {
            StatusCode::OK => response.json().await.map_err(|e| FeedError::Transport(e.to_string())),
            StatusCode::UNAUTHORIZED => Err(FeedError::Unauthorized),
            other => Err(FeedError::Transport(format!("{}{path}: HTTP {other}", self.base_url))),
        }
    }
}

#[derive(serde::Deserialize)]
struct SnapshotBody {
    version: u64,
    keys: Vec<StoredKey>,
}

#[async_trait]
impl KeyFeed for RemoteFeed {
    async fn snapshot(&self) -> Result<(u64, Vec<StoredKey>), FeedError> {
        let body: SnapshotBody = self.get("/v1/sync/snapshot", Duration::from_secs(60)).await?;
        Ok((body.version, body.keys))
    }

    async fn changes(&self, since: u64, wait: Duration) -> Result<ChangeBatch, FeedError> {
        let path = format!("/v1/sync/changes?since={since}&wait_ms={}", wait.as_millis());
        self.get(&path, wait + Duration::from_secs(10)).await
    }
}

/// The store of this very process (standalone mode).
pub struct LocalFeed {
    store: Arc<Store>,
    feed: Arc<Feed>,
}

impl LocalFeed {
    pub fn new(store: Arc<Store>, feed: Arc<Feed>) -> Self {
        LocalFeed { store, feed }
    }
}

#[async_trait]
impl KeyFeed for LocalFeed {
    async fn snapshot(&self) -> Result<(u64, Vec<StoredKey>), FeedError> {
        self.store.snapshot().await.map_err(|e| FeedError::Store(e.to_string()))
    }

    async fn changes(&self, since: u64, wait: Duration) -> Result<ChangeBatch, FeedError> {
        let mut latest = self.feed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (changes, version) =
                self.store.changes_since(since, 1000).await.map_err(|e| FeedError::Store(e.to_string()))?;
            if version < since {
                return Ok(ChangeBatch { version, changes: Vec::new(), reset: true });
            }
            if !changes.is_empty() || tokio::time::Instant::now() >= deadline {
                let reached = changes.last().map_or(since, |c| c.version);
                return Ok(ChangeBatch { version: reached, changes, reset: false });
            }
            let _ = tokio::time::timeout_at(deadline, latest.wait_for(|v| *v > since)).await;
        }
    }
}
