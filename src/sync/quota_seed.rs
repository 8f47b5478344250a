//! Keeps quota counters at least as high as the usage the store has counted.
//!
//! A standalone node reads its own store; a gateway asks its control plane,
//! whose store holds every gateway's uploads. So a restart does not reset
//! quotas, and a key's quota holds across gateways within a flush interval or so.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::follow::FeedError;
use crate::control::store::Store;
use crate::http_client;
use crate::limit::{periods, KeyStates, UsedElsewhere};

pub enum QuotaSeedSource {
    Store(Arc<Store>),
    Remote { client: reqwest::Client, url: String, token: String },
}

#[derive(Deserialize)]
struct QuotaUsageBody {
    at: String,
    by_day: std::collections::HashMap<String, u64>,
    by_month: std::collections::HashMap<String, u64>,
}

impl QuotaSeedSource {
    pub fn remote(base_url: &str, token: &str) -> Result<Self, FeedError> {
        let client = http_client::build(
            http_client::GATEWAY_AGENT,
            http_client::CONTROL_PLANE_CONNECT,
            Some(Duration::from_secs(30)),
        )
        .map_err(|e| FeedError::Transport(e.to_string()))?;
        Ok(QuotaSeedSource::Remote {
            client,
            url: format!("{}/v1/sync/quota-usage", base_url.trim_end_matches('/')),
            token: token.to_owned(),
        })
    }

    async fn fetch(&self) -> Result<UsedElsewhere, FeedError> {
        match self {
            QuotaSeedSource::Store(store) => {
                crate::control::quota::used_in_current_periods(store, OffsetDateTime::now_utc())
                    .await
                    .map_err(|e| FeedError::Store(e.to_string()))
            }
            QuotaSeedSource::Remote { client, url, token } => {
                let response = client
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .map_err(|e| FeedError::Transport(format!("{url}: {e}")))?;
                if !response.status().is_success() {
                    return Err(FeedError::Transport(format!("{url}: HTTP {}", response.status())));
                }
                let body: QuotaUsageBody = response.json().await.map_err(|e| FeedError::Transport(e.to_string()))?;
                let at = OffsetDateTime::parse(&body.at, &Rfc3339).map_err(|e| FeedError::Transport(e.to_string()))?;
                let (day, month) = periods(at);
                Ok(UsedElsewhere { day, month, by_day: body.by_day, by_month: body.by_month })
            }
        }
    }

    /// Seeds the quota counters once; a failure leaves them counting this node's traffic.
    pub async fn seed_once(&self, states: &KeyStates) {
        match self.fetch().await {
            Ok(used) => states.seed(used),
            Err(e) => tracing::warn!(error = %e, "cannot read quota usage; quotas count from this node's traffic"),
        }
    }

    /// Seeds every `every` until `shutdown` fires.
    pub async fn run(self, states: Arc<KeyStates>, every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            self.seed_once(&states).await;
        }
    }
}
