//! The event log: what `GET /v1/events` streams and webhooks deliver. Events are
//! written by the key mutations themselves (`event_ops.rs`), in their transaction.

use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;

use super::rows::{from_ms, to_ms};
use super::{postgres, sqlite, Result, Store};
use crate::control::model::{StoredEvent, StoredKey, UsageTick};

/// A webhook receiver's place in the log: every event up to `delivered_through` is
/// done; `failing_since` when the next one has been failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookCursor {
    pub delivered_through: u64,
    pub failing_since: Option<OffsetDateTime>,
}

/// How long the event log keeps an event (longer while a webhook receiver still needs
/// it): a client resuming `GET /v1/events` from further back misses events.
pub const EVENTS_KEPT: Duration = Duration::from_secs(30 * 86_400);
/// Once-only marks outlive their period (a day or month of quota, an expiry) by this.
const MARKS_KEPT: Duration = Duration::from_secs(62 * 86_400);
/// Events deleted per statement.
const PRUNE_CHUNK: i64 = 10_000;

fn id(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn ms_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Up to `limit` events after `after`, oldest first.
    pub async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>> {
        dispatch!(self.events_after(id(after), i64::from(limit)))
    }

    /// The newest event's id (0 when there is none).
    pub async fn latest_event_id(&self) -> Result<u64> {
        dispatch!(self.latest_event_id())
    }

    /// The busiest `limit` keys of the minute starting at `minute_start`.
    pub async fn usage_of_minute(&self, minute_start: OffsetDateTime, limit: u32) -> Result<Vec<UsageTick>> {
        dispatch!(self.usage_of_minute(to_ms(minute_start), i64::from(limit)))
    }

    /// Appends the event unless `mark` (name, subject, the period's start) was marked
    /// before; `true` when this call appended it.
    pub async fn append_event_once(
        &self,
        mark: (&str, &str, OffsetDateTime),
        kind: &str,
        key_id: Option<&str>,
        data: &serde_json::Value,
    ) -> Result<bool> {
        let (name, subject, period) = mark;
        dispatch!(self.append_event_once((name, subject, to_ms(period)), kind, key_id, data))
    }

    /// Up to `limit` active keys expiring in `(after, until]` that `mark` has not marked
    /// for that expiry yet, soonest first.
    pub async fn expiring_keys(
        &self,
        mark: &str,
        after: OffsetDateTime,
        until: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<StoredKey>> {
        dispatch!(self.expiring_keys(mark, to_ms(after), to_ms(until), i64::from(limit)))
    }

    /// Ids of keys with usage in a minute starting at or after `since`.
    pub async fn keys_used_since(&self, since: OffsetDateTime) -> Result<Vec<String>> {
        dispatch!(self.keys_used_since(to_ms(since)))
    }

    /// The stored keys among `ids` (absent ones are left out), in no order.
    pub async fn keys_by_id(&self, ids: &[String]) -> Result<Vec<StoredKey>> {
        dispatch!(self.keys_by_id(ids))
    }

    /// Allowed requests since `since` of each key in `subjects`, or (`by_owner`) of each
    /// owner in `subjects` over all their keys.
    pub async fn allowed_since_of(
        &self,
        subjects: &[String],
        by_owner: bool,
        since: OffsetDateTime,
    ) -> Result<HashMap<String, u64>> {
        dispatch!(self.allowed_since_of(subjects, by_owner, to_ms(since)))
    }

    /// Takes or renews the lease on delivering to `url` for `lease` from `now`; `None`
    /// while another owner holds it. A receiver seen for the first time starts after the
    /// newest event.
    pub async fn webhook_lease(
        &self,
        url: &str,
        owner: &str,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Option<WebhookCursor>> {
        let now = to_ms(now);
        let held = dispatch!(self.webhook_lease(url, owner, now, now.saturating_add(ms_of(lease))))?;
        held.map(|(delivered_through, failing_since)| {
            Ok(WebhookCursor { delivered_through, failing_since: failing_since.map(from_ms).transpose()? })
        })
        .transpose()
    }

    /// Records the receiver's new place; `false` when `owner` no longer holds the lease.
    pub async fn webhook_advance(&self, url: &str, owner: &str, cursor: WebhookCursor) -> Result<bool> {
        let failing_since = cursor.failing_since.map(to_ms);
        dispatch!(self.webhook_advance(url, owner, id(cursor.delivered_through), failing_since))
    }

    pub async fn webhook_release(&self, url: &str, owner: &str) -> Result<()> {
        dispatch!(self.webhook_release(url, owner))
    }

    /// Forgets events older than `EVENTS_KEPT` that every webhook receiver has passed,
    /// and once-only marks of periods long over, a bounded chunk at a time.
    pub async fn prune_event_log(&self, now: OffsetDateTime) -> Result<u64> {
        let now = to_ms(now);
        let ago = |age: Duration| now.saturating_sub(ms_of(age));
        let mut deleted = 0;
        loop {
            let n = dispatch!(self.prune_event_log(ago(EVENTS_KEPT), ago(MARKS_KEPT), PRUNE_CHUNK))?;
            deleted += n;
            if n < PRUNE_CHUNK as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Events after `after` of `kinds` (`None`: all), counted up to `cap`.
    pub async fn count_events_after(&self, after: u64, kinds: Option<&[String]>, cap: u32) -> Result<u64> {
        dispatch!(self.count_events_after(id(after), kinds, i64::from(cap)))
    }
}
