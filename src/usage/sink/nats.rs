//! `{ type: nats, url, subject }`: usage published to NATS JetStream.
//!
//! Each record is one message whose body is the record's CloudEvent in JSON
//! (structured mode of the CloudEvents NATS binding, `Content-Type:
//! application/cloudevents+json`): the same envelope as the `http` sink, so a
//! consumer can switch transports without a second parser, and the envelope
//! carries what the bare §8 record lacks: the key's owner (`subject`) and an id.
//!
//! `Nats-Msg-Id` is the event id, deterministic per (node, boot, sequence, key),
//! so JetStream stores a retried publish once within the stream's
//! `duplicate_window`. The sink's acknowledgement is JetStream's publish ack for
//! every message of the batch; a retry publishes only the records not yet acked.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_trait::async_trait;
use futures_util::future::join_all;
use tokio::sync::Mutex;

use super::event::{usage_event, Delivery, KeyOwners, EVENT_CONTENT_TYPE};
use super::{SinkError, UsageBatch, UsageSink};
use crate::config::NatsSinkConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages published before their acks are awaited: enough to keep the broker
/// busy, few enough that a failure leaves little to publish again.
const PUBLISH_WINDOW: usize = 256;

pub struct NatsSink {
    url: String,
    subject: String,
    client_name: String,
    /// Connected on the first write: a broker that is down at start is an outage
    /// like any other, retried by the flusher. Once connected, the client
    /// reconnects by itself.
    connection: Mutex<Option<(async_nats::Client, async_nats::jetstream::Context)>>,
    owners: Arc<dyn KeyOwners>,
    delivery: Delivery,
}

impl NatsSink {
    pub fn new(config: &NatsSinkConfig, node: &str, owners: Arc<dyn KeyOwners>) -> Self {
        NatsSink {
            url: config.url.clone(),
            subject: config.subject.clone(),
            client_name: format!("keygate {node}"),
            connection: Mutex::new(None),
            owners,
            delivery: Delivery::default(),
        }
    }

    async fn jetstream(&self) -> Result<async_nats::jetstream::Context, SinkError> {
        let mut connection = self.connection.lock().await;
        if let Some((client, context)) = connection.as_ref() {
            // While reconnecting, publishes would queue in the client and each wait
            // out its ack timeout: fail the batch at once instead.
            if client.connection_state() != async_nats::connection::State::Connected {
                return Err(self.fail("not connected (reconnecting)".into()));
            }
            return Ok(context.clone());
        }
        let server: async_nats::ServerAddr =
            self.url.parse().map_err(|e| self.fail(format!("not a NATS server address: {e}")))?;
        let mut options = async_nats::ConnectOptions::new().name(&self.client_name).connection_timeout(CONNECT_TIMEOUT);
        // The client takes no credentials from the URL itself.
        match (server.username().map(percent_decoded), server.password().map(percent_decoded)) {
            (Some(user), Some(password)) => options = options.user_and_password(user, password),
            (Some(token), None) => options = options.token(token),
            _ => {}
        }
        let client = options.connect(server).await.map_err(|e| self.fail(format!("cannot connect: {e}")))?;
        let context = async_nats::jetstream::new(client.clone());
        *connection = Some((client, context.clone()));
        Ok(context)
    }

    fn fail(&self, message: String) -> SinkError {
        SinkError::Other(format!("NATS {}: {message}", redacted(&self.url)))
    }

    fn publish_failed(&self, error: &async_nats::jetstream::context::PublishError) -> SinkError {
        match error.kind() {
            PublishErrorKind::StreamNotFound => self.fail(format!(
                "no JetStream stream captures the subject {:?}: create one that does (with a duplicate_window \
                 longer than a sink outage's retry interval, 2 minutes by default)",
                self.subject
            )),
            _ => self.fail(format!("publish to {:?} failed: {error}", self.subject)),
        }
    }
}

/// `%XX` escapes of URL user info decoded; anything else kept as written.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%').then(|| bytes.get(i + 1..i + 3)).flatten().and_then(|hex| {
            let mut byte = [0u8];
            hex::decode_to_slice(hex, &mut byte).ok().map(|()| byte[0])
        });
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL without user info, which may hold a password.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[async_trait]
impl UsageSink for NatsSink {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn write(&self, batch: UsageBatch<'_>) -> Result<(), SinkError> {
        let jetstream = self.jetstream().await?;
        let (owners, acknowledged) = self.delivery.start(&batch, &self.owners).await?;
        let pending: Vec<usize> = (0..batch.records.len()).filter(|i| !acknowledged.contains(i)).collect();
        for window in pending.chunks(PUBLISH_WINDOW) {
            let mut acks = Vec::with_capacity(window.len());
            let mut first_error = None;
            for &i in window {
                let event = usage_event(&batch, &batch.records[i], &owners)?;
                let body = serde_json::to_vec(&event)
                    .map_err(|e| SinkError::Other(format!("cannot encode a usage event: {e}")))?;
                let message = PublishMessage::build()
                    .payload(body.into())
                    .message_id(&event.id)
                    .header("Content-Type", EVENT_CONTENT_TYPE);
                match jetstream.send_publish(self.subject.clone(), message).await {
                    Ok(ack) => acks.push(async move { (i, ack.await) }),
                    Err(e) => {
                        first_error = Some(self.publish_failed(&e));
                        break;
                    }
                }
            }
            // Messages already sent still get their acks counted.
            let mut acked = Vec::with_capacity(acks.len());
            for (i, result) in join_all(acks).await {
                match result {
                    Ok(_) => acked.push(i),
                    Err(e) => {
                        first_error.get_or_insert_with(|| self.publish_failed(&e));
                    }
                }
            }
            self.delivery.acknowledged(&batch, acked);
            if let Some(error) = first_error {
                return Err(error);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_percent_decoded() {
        assert_eq!(percent_decoded("p%40ss%3Aword"), "p@ss:word");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz"), "%zz");
    }

    #[test]
    fn error_messages_never_show_a_password() {
        assert_eq!(redacted("nats://user:secret@127.0.0.1:4222"), "nats://…@127.0.0.1:4222");
        assert_eq!(redacted("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
