//! `GET /v1/events`: the event log as Server-Sent Events, and live usage.
//!
//! Key events come from the store's event log (written with each change, in its
//! transaction), so a stream shows changes made through any control plane on the
//! same database, in commit order, and `Last-Event-ID` resumes after the last one a
//! client saw. `usage` events (no id: they are a live view, not a log) carry the
//! busiest keys' counts of the current minute every few seconds.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::Stream;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::api::{ApiError, ApiState, Reader};
use super::store::Store;

/// Events read from the store per query.
const EVENTS_PER_READ: u32 = 500;
/// How often the log is read when nothing local pokes: events written by another
/// control plane, or by this one's background work, show within this.
const EVENT_POLL: Duration = Duration::from_secs(1);
/// How often a `usage` event is sent while keys are in use.
const USAGE_TICK: Duration = Duration::from_secs(5);
/// For how long into a minute the minute before is sent too.
const USAGE_LATE: time::Duration = time::Duration::seconds(30);
/// Keys in one `usage` event, the busiest first.
const USAGE_TICK_KEYS: u32 = 500;
/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events queued for a client that reads slowly; when full, reading the log waits.
const CLIENT_QUEUE: usize = 64;

/// `GET /v1/events` (admin or read token). Without `Last-Event-ID` the stream starts
/// with the next change.
pub(super) async fn stream_events(
    State(state): State<Arc<ApiState>>,
    _reader: Reader,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::invalid("Last-Event-ID", "must be an event id this stream sent"))?,
        None => state.store.latest_event_id().await?,
    };
    let (sender, receiver) = mpsc::channel(CLIENT_QUEUE);
    tokio::spawn(pump(Arc::clone(&state), after, sender));
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Feeds one client until it goes away or the node stops (which ends the response,
/// so a graceful shutdown never waits on an open stream).
async fn pump(state: Arc<ApiState>, mut after: u64, sender: mpsc::Sender<Event>) {
    let mut feed = state.feed.subscribe();
    let mut stopping = state.stopping.clone();
    let mut usage = tokio::time::interval(USAGE_TICK);
    usage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match send_events_after(&state.store, after, &sender).await {
            Ok(Some(reached)) => after = reached,
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "cannot read the event log for an event stream"),
        }
        tokio::select! {
            _ = feed.changed() => {}
            _ = tokio::time::sleep(EVENT_POLL) => {}
            _ = usage.tick() => {
                if !send_usage(&state.store, &sender).await {
                    return;
                }
            }
            _ = stopping.changed() => return,
            _ = sender.closed() => return,
        }
    }
}

/// Sends every event after `after`; `None` once the client is gone.
async fn send_events_after(
    store: &Store,
    mut after: u64,
    sender: &mpsc::Sender<Event>,
) -> Result<Option<u64>, super::store::StoreError> {
    loop {
        let events = store.events_after(after, EVENTS_PER_READ).await?;
        let full = events.len() == EVENTS_PER_READ as usize;
        for event in events {
            let sse = Event::default().id(event.id.to_string()).event(&event.kind).data(event.body().to_string());
            if sender.send(sse).await.is_err() {
                return Ok(None);
            }
            after = event.id;
        }
        if !full {
            return Ok(Some(after));
        }
    }
}

/// A `usage` event with the current minute's busiest keys, when any key was used in
/// it, and early in a minute one for the minute before, whose last usage can still be
/// on its way (gateways flush every few seconds); `false` once the client is gone.
async fn send_usage(store: &Store, sender: &mpsc::Sender<Event>) -> bool {
    let now = OffsetDateTime::now_utc();
    let minute = minute_start(now);
    if now - minute < USAGE_LATE && !send_usage_of(store, sender, minute - time::Duration::MINUTE, now).await {
        return false;
    }
    send_usage_of(store, sender, minute, now).await
}

/// One `usage` event with the busiest keys of the minute starting at `minute`, each
/// with its totals so far in it, when any key was used in it.
async fn send_usage_of(
    store: &Store,
    sender: &mpsc::Sender<Event>,
    minute: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    let keys = match store.usage_of_minute(minute, USAGE_TICK_KEYS).await {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read usage for an event stream");
            return true;
        }
    };
    if keys.is_empty() {
        return true;
    }
    let rfc3339 = |t: OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let (timestamp, window_start) = (rfc3339(now), rfc3339(minute));
    let body = json!({"type": "usage", "timestamp": timestamp, "data": {"window_start": window_start, "keys": keys}});
    sender.send(Event::default().event("usage").data(body.to_string())).await.is_ok()
}

/// The start of `t`'s minute: usage is counted in minute buckets.
pub(super) fn minute_start(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_time(time::Time::from_hms(t.hour(), t.minute(), 0).unwrap_or(time::Time::MIDNIGHT))
}
