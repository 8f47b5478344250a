//! The two places a follower gets keys from.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;

use super::follow::{ChangeBatch, FeedError, KeyFeed, LoadedKeys};
use crate::control::feed::Feed;
use crate::control::store::Store;
use crate::http_client;
use crate::index::wire::{self, FrameReader, KeySetLoader, UnusableAllowlists, WireError};
use crate::index::SnapshotBuilder;

/// How long a snapshot body may stall before the gateway gives up on it.
const SNAPSHOT_STALL: Duration = Duration::from_secs(30);

/// A control plane over HTTP, authenticated with a sync token.
pub struct RemoteFeed {
    client: reqwest::Client,
    base_url: String,
    token: String,
    /// This node's id: the control plane lists its gateways by it.
    node: String,
}

impl RemoteFeed {
    pub fn new(base_url: &str, token: &str, node_id: &str) -> Result<Self, FeedError> {
        let client = http_client::build(http_client::GATEWAY_AGENT, http_client::CONTROL_PLANE_CONNECT, None)
            .map_err(|e| FeedError::Transport(e.to_string()))?;
        let (base_url, token, node) = (base_url.trim_end_matches('/').to_owned(), token.to_owned(), node_id.to_owned());
        Ok(RemoteFeed { client, base_url, token, node })
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<T, FeedError> {
        let response = self
            .client
            .get(format!("{}{path}", self.base_url))
            .query(query)
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

#[async_trait]
impl KeyFeed for RemoteFeed {
    /// Reads the snapshot as it streams in, building the index frame by frame: the
    /// gateway holds one frame of it at a time besides the index being built.
    async fn snapshot(&self, answer_within: Duration) -> Result<LoadedKeys, FeedError> {
        let url = format!("{}/v1/sync/snapshot", self.base_url);
        let transport = |e: reqwest::Error| FeedError::Transport(format!("{url}: {e}"));
        let request = self.client.get(&url).bearer_auth(&self.token).send();
        let mut response = tokio::time::timeout(answer_within, request)
            .await
            .map_err(|_| FeedError::Transport(format!("{url}: no answer within {answer_within:?}")))?
            .map_err(transport)?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(FeedError::Unauthorized),
            other => return Err(FeedError::Transport(format!("{url}: HTTP {other}"))),
        }
        let media_type = response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        if media_type != Some(wire::MEDIA_TYPE) {
            return Err(FeedError::Transport(format!(
                "{url}: the control plane sent {media_type:?}, not a key set this gateway reads; \
                 upgrade the control planes before their gateways"
            )));
        }
        let mut reader = FrameReader::default();
        let mut loader = KeySetLoader::new();
        loop {
            let chunk = tokio::time::timeout(SNAPSHOT_STALL, response.chunk())
                .await
                .map_err(|_| FeedError::Transport(format!("{url}: the snapshot stalled for {SNAPSHOT_STALL:?}")))?
                .map_err(transport)?;
            let Some(chunk) = chunk else { break };
            reader.push(&chunk);
            loader.take_from(&mut reader)?;
        }
        if reader.has_partial_frame() {
            return Err(WireError::Truncated(reader.position()).into());
        }
        let (snapshot, unusable) = loader.finish()?;
        Ok(LoadedKeys { snapshot, unusable })
    }

    async fn changes(&self, since: u64, wait: Duration) -> Result<ChangeBatch, FeedError> {
        let (since, wait_ms) = (since.to_string(), wait.as_millis().to_string());
        let query = [("since", since.as_str()), ("wait_ms", wait_ms.as_str()), ("node", self.node.as_str())];
        self.get("/v1/sync/changes", &query, wait + Duration::from_secs(10)).await
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
    /// The store read by one streamed statement, as a control plane reads it for its gateways.
    async fn snapshot(&self, _answer_within: Duration) -> Result<LoadedKeys, FeedError> {
        use futures_util::StreamExt as _;
        let failed = |e: crate::control::store::StoreError| FeedError::Store(e.to_string());
        let version = self.store.latest_version().await.map_err(failed)?;
        let estimate = self.store.key_count_estimate().await.map_err(failed)?;
        let mut builder = SnapshotBuilder::with_capacity(usize::try_from(estimate).unwrap_or(0));
        let mut unusable = UnusableAllowlists::default();
        let mut pages = self.store.gateway_key_pages(crate::control::snapshot::KEYS_PER_FRAME);
        while let Some(page) = pages.next().await {
            for row in &page.map_err(failed)? {
                let Some(wire) = crate::control::snapshot::servable(row) else { continue };
                unusable.note(&wire);
                let (digest, record) = wire.to_builder();
                builder.push_new(digest, record).map_err(|e| FeedError::Store(e.to_string()))?;
            }
        }
        Ok(LoadedKeys { snapshot: builder.finish(version), unusable })
    }

    async fn changes(&self, since: u64, wait: Duration) -> Result<ChangeBatch, FeedError> {
        self.feed.changes_after(&self.store, since, wait).await.map_err(|e| FeedError::Store(e.to_string()))
    }
}
