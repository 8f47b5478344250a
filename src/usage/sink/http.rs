//! `{ type: http, format: cloudevents }`: usage as batches of CloudEvents POSTed to
//! a metering endpoint (OpenMeter, Lago, a Stripe meter bridge, a collector).
//!
//! A batch from the flusher is sent as requests of at most `batch_size` events.
//! `write` succeeds once every request was answered 2xx; a retry sends only the
//! requests not yet accepted. Event ids are deterministic, so a receiver that
//! deduplicates by `id` counts a re-sent event once even when an acceptance was
//! lost on the way back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};

use super::event::{request_id, usage_event, Delivery, KeyOwners};
use super::{SinkError, UsageBatch, UsageSink};
use crate::config::HttpSinkConfig;
use crate::http_client;
use crate::webhook_signature::{signature, signing_key};

pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One request, sent and answered. The flusher gives a whole write 10 s but then
/// waits for the same write on its next try, so a slow receiver still gets through.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests of one batch in flight at once.
const CONCURRENT_REQUESTS: usize = 4;
/// How much of a refusal's body goes into the error message.
const ERROR_BODY_LIMIT: usize = 256;

pub struct HttpSink {
    client: reqwest::Client,
    url: String,
    batch_size: usize,
    signing_key: Option<Vec<u8>>,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    owners: Arc<dyn KeyOwners>,
    delivery: Delivery,
}

impl HttpSink {
    pub fn new(config: &HttpSinkConfig, owners: Arc<dyn KeyOwners>) -> Result<Self, SinkError> {
        let client = http_client::builder(http_client::GATEWAY_AGENT, CONNECT_TIMEOUT, Some(REQUEST_TIMEOUT))
            // A redirected POST turns into a GET on 301-303, whose 2xx would look
            // like an acceptance of usage that nobody received.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SinkError::Other(format!("usage sink {}: {e}", config.url)))?;
        Ok(HttpSink {
            client,
            url: config.url.clone(),
            batch_size: config.batch_size.max(1),
            signing_key: config.secret.as_deref().map(signing_key),
            headers: config.headers.clone(),
            owners,
            delivery: Delivery::default(),
        })
    }

    async fn post(&self, batch: &UsageBatch<'_>, chunk: usize, body: Vec<u8>) -> Result<(), SinkError> {
        let mut request = self.client.post(&self.url).header(http::header::CONTENT_TYPE, BATCH_CONTENT_TYPE);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(key) = &self.signing_key {
            let id = request_id(batch, chunk);
            let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
            request = request
                .header("webhook-id", &id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature(key, &id, timestamp, &body));
        }
        let response = request.body(body).send().await.map_err(|e| self.fail(&e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(ERROR_BODY_LIMIT).collect();
        Err(self.fail(&format!("HTTP {status}: {}", text.trim())))
    }

    /// Sends the `chunk`th `batch_size` records of `batch`; returns `chunk` once accepted.
    async fn send_chunk(
        &self,
        batch: &UsageBatch<'_>,
        owners: &HashMap<String, String>,
        chunk: usize,
    ) -> Result<usize, SinkError> {
        let start = chunk * self.batch_size;
        let records = &batch.records[start..(start + self.batch_size).min(batch.records.len())];
        let events = records.iter().map(|record| usage_event(batch, record, owners)).collect::<Result<Vec<_>, _>>()?;
        let body =
            serde_json::to_vec(&events).map_err(|e| SinkError::Other(format!("cannot encode usage events: {e}")))?;
        self.post(batch, chunk, body).await.map(|()| chunk)
    }

    fn fail(&self, message: &str) -> SinkError {
        SinkError::Other(format!("{}: {message}", self.url))
    }
}

#[async_trait]
impl UsageSink for HttpSink {
    fn kind(&self) -> &'static str {
        "http"
    }

    async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError> {
        let (owners, acknowledged) = self.delivery.start(&batch, &self.owners).await?;
        let chunks: Vec<usize> =
            (0..batch.records.len().div_ceil(self.batch_size)).filter(|chunk| !acknowledged.contains(chunk)).collect();
        let total = chunks.len();
        let mut results = stream::iter(chunks)
            .map(|chunk| self.send_chunk(&batch, &owners, chunk))
            .buffer_unordered(CONCURRENT_REQUESTS);
        let mut first_error = None;
        let mut failed = 0;
        while let Some(result) = results.next().await {
            match result {
                Ok(chunk) => self.delivery.acknowledged(&batch, [chunk]),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(SinkError::Other(message)) if total > 1 => {
                Err(SinkError::Other(format!("{failed} of {total} requests failed; first: {message}")))
            }
            Some(e) => Err(e),
        }
    }
}
