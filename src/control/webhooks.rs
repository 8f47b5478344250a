//! Webhooks (`webhooks:`): the event log delivered to each receiver at least once, in
//! order, signed the Standard Webhooks way, and the events that no admin call makes
//! (`key.expiring`, `quota.threshold`).
//!
//! A receiver's place in the log is kept in the store (`webhook_cursors`), and moves
//! only after the receiver answered 2xx, so a receiver outage or a control-plane
//! restart loses nothing: delivery resumes at the first event not acknowledged, with
//! the same `webhook-id`. Control planes sharing a database take a lease per receiver
//! (held by node id), so one of them delivers at a time. An event that keeps failing is retried with
//! backoff for a day, then given up (counted, logged) so the receiver's later events
//! still arrive.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::events::minute_start;
use super::feed::Feed;
use super::model::{StoredEvent, StoredKey};
use super::store::{Store, StoreError, WebhookCursor};
use crate::config::{format_duration, LimitScope, PlanConfig, QuotaConfig, QuotaPeriod, WebhookConfig};
use crate::http_client;
use crate::limit::period_start;
use crate::metrics::{Metrics, WebhookResult};
use crate::webhook_signature::{signature, signing_key};

/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// A lease outlives a crashed holder by this much at most.
const LEASE: Duration = Duration::from_secs(30);
/// How often a node without the lease asks for it again.
const LEASE_RETRY: Duration = Duration::from_secs(5);
/// How often the log is read when nothing pokes (events of other control planes).
const EVENT_POLL: Duration = Duration::from_secs(1);
/// Events read per query.
const EVENTS_PER_READ: u32 = 100;
/// Retries back off from 1 s, doubling, up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// An event failing for this long is given up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(86_400);
/// Pending events are counted up to this many per receiver.
const PENDING_CAP: u32 = 100_000;
/// How often expiring keys and quota thresholds are looked for.
const SCAN_EVERY: Duration = Duration::from_secs(10);
/// Expiring keys turned into events per scan and lead.
const EXPIRING_PER_SCAN: u32 = 1000;
/// Quota thresholds sent, in percent of the quota.
const QUOTA_THRESHOLDS: [u64; 2] = [80, 100];

/// What the quota scan needs of the config to find a key's quota.
#[derive(Debug, Clone, Default)]
pub struct Plans {
    pub plans: BTreeMap<String, PlanConfig>,
    pub default_plan: Option<String>,
}

impl Plans {
    /// The quota that applies to `key`: its own, else its plan's.
    fn quota_of(&self, key: &StoredKey) -> Option<QuotaConfig> {
        key.quota.or_else(|| {
            let plan = key.plan.as_ref().or(self.default_plan.as_ref())?;
            self.plans.get(plan)?.quota
        })
    }
}

pub struct Webhooks {
    store: Arc<Store>,
    feed: Arc<Feed>,
    metrics: Arc<Metrics>,
    plans: Plans,
    hooks: Vec<WebhookConfig>,
    /// The lease holder's name: the node id, so a node restarted after a crash takes
    /// its receivers back at once instead of waiting for its old lease to run out.
    owner: String,
    client: reqwest::Client,
    /// Each receiver's pending events, summed into `keygate_webhook_pending`.
    pending: Vec<AtomicU64>,
}

impl Webhooks {
    pub fn new(
        store: Arc<Store>,
        feed: Arc<Feed>,
        metrics: Arc<Metrics>,
        hooks: Vec<WebhookConfig>,
        plans: Plans,
        node_id: &str,
    ) -> reqwest::Result<Self> {
        let client = http_client::build(http_client::GATEWAY_AGENT, Duration::from_secs(5), Some(DELIVERY_TIMEOUT))?;
        let owner = node_id.to_owned();
        let pending = hooks.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Webhooks { store, feed, metrics, plans, hooks, owner, client, pending })
    }

    /// Delivers to every receiver, and scans for due events, until `shutdown` fires;
    /// then gives the leases up so another control plane takes over at once.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut tasks = JoinSet::new();
        for index in 0..this.hooks.len() {
            tasks.spawn(Arc::clone(&this).deliver(index, shutdown.clone()));
        }
        if this.hooks.iter().any(|h| h.wants("key.expiring") || h.wants("quota.threshold")) {
            tasks.spawn(Arc::clone(&this).scan(shutdown.clone()));
        }
        while tasks.join_next().await.is_some() {}
        for hook in &this.hooks {
            if let Err(e) = this.store.webhook_release(&hook.url, &this.owner).await {
                tracing::debug!(url = %hook.url, error = %e, "cannot give up a webhook lease");
            }
        }
    }

    // ------------------------------------------------------------------ delivery

    async fn deliver(self: Arc<Self>, index: usize, mut shutdown: watch::Receiver<bool>) {
        let hook = &self.hooks[index];
        let key = signing_key(&hook.secret);
        let mut feed = self.feed.subscribe();
        let mut holding = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let next = match self.lease(hook).await {
                Some(cursor) => {
                    if !holding {
                        tracing::info!(url = %hook.url, after_event = cursor.delivered_through, "webhook: delivering");
                        holding = true;
                    }
                    self.deliver_some(index, &key, cursor, &mut shutdown).await
                }
                None => {
                    if holding {
                        tracing::info!(url = %hook.url, "webhook: another control plane delivers now");
                        holding = false;
                    }
                    Idle::Wait(LEASE_RETRY)
                }
            };
            let wait = match next {
                Idle::Stop => return,
                Idle::More => continue,
                Idle::Backoff(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
                Idle::Wait(wait) => wait,
            };
            tokio::select! {
                _ = feed.changed() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn lease(&self, hook: &WebhookConfig) -> Option<WebhookCursor> {
        match self.store.webhook_lease(&hook.url, &self.owner, OffsetDateTime::now_utc(), LEASE).await {
            Ok(cursor) => cursor,
            Err(e) => {
                tracing::warn!(url = %hook.url, error = %e, "cannot read a webhook's place in the event log");
                None
            }
        }
    }

    /// Delivers the events after `cursor` that the receiver wants, in order.
    async fn deliver_some(
        &self,
        index: usize,
        key: &[u8],
        mut cursor: WebhookCursor,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Idle {
        let hook = &self.hooks[index];
        self.count_pending(index, cursor.delivered_through).await;
        let events = match self.store.events_after(cursor.delivered_through, EVENTS_PER_READ).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(url = %hook.url, error = %e, "cannot read the event log for a webhook");
                return Idle::Wait(LEASE_RETRY);
            }
        };
        if events.is_empty() {
            return Idle::Wait(EVENT_POLL);
        }
        let full = events.len() == EVENTS_PER_READ as usize;
        for event in events {
            if hook.wants(&event.kind) {
                match self.deliver_one(hook, key, &event, cursor.failing_since, shutdown).await {
                    Attempt::Done(result) => {
                        self.metrics.webhook_delivery(result);
                        cursor = WebhookCursor { delivered_through: event.id, failing_since: None };
                    }
                    Attempt::Failed { since, wait } => {
                        self.metrics.webhook_delivery(WebhookResult::Retry);
                        cursor.failing_since = Some(since);
                        self.advance(hook, cursor).await;
                        return Idle::Backoff(wait);
                    }
                    Attempt::Stopped => return Idle::Stop,
                }
            } else {
                cursor = WebhookCursor { delivered_through: event.id, failing_since: None };
            }
            if !self.advance(hook, cursor).await {
                return Idle::Wait(LEASE_RETRY);
            }
        }
        self.count_pending(index, cursor.delivered_through).await;
        if full {
            Idle::More
        } else {
            Idle::Wait(EVENT_POLL)
        }
    }

    /// One attempt at `event`, or the decision to give it up after a day of failures.
    async fn deliver_one(
        &self,
        hook: &WebhookConfig,
        key: &[u8],
        event: &StoredEvent,
        failing_since: Option<OffsetDateTime>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Attempt {
        let id = format!("evt_{}", event.id);
        let body = event.body().to_string();
        let timestamp = OffsetDateTime::now_utc().unix_timestamp();
        let request = self
            .client
            .post(&hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature(key, &id, timestamp, body.as_bytes()))
            .body(body)
            .send();
        let outcome = tokio::select! {
            outcome = request => outcome,
            _ = shutdown.changed() => return Attempt::Stopped,
        };
        let error = match outcome {
            Ok(response) if response.status().is_success() => return Attempt::Done(WebhookResult::Delivered),
            Ok(response) => format!("HTTP {}", response.status()),
            Err(e) => e.to_string(),
        };
        let now = OffsetDateTime::now_utc();
        let since = failing_since.unwrap_or(now);
        let failing_for = Duration::try_from(now - since).unwrap_or(Duration::ZERO);
        if failing_for >= GIVE_UP_AFTER {
            tracing::error!(url = %hook.url, event = %id, kind = %event.kind, %error,
                "webhook event given up after failing for {}", format_duration(GIVE_UP_AFTER));
            return Attempt::Done(WebhookResult::GivenUp);
        }
        let wait = backoff(failing_for);
        tracing::warn!(url = %hook.url, event = %id, %error, retry_in = ?wait, "webhook delivery failed");
        Attempt::Failed { since, wait }
    }

    /// Records the receiver's place; `false` when the lease was lost (or the store failed).
    async fn advance(&self, hook: &WebhookConfig, cursor: WebhookCursor) -> bool {
        match self.store.webhook_advance(&hook.url, &self.owner, cursor).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(url = %hook.url, error = %e, "cannot record a webhook's place in the event log");
                false
            }
        }
    }

    async fn count_pending(&self, index: usize, after: u64) {
        let hook = &self.hooks[index];
        let kinds: Option<Vec<String>> = hook.events.as_ref().map(|events| events.iter().cloned().collect());
        match self.store.count_events_after(after, kinds.as_deref(), PENDING_CAP).await {
            Ok(n) => {
                self.pending[index].store(n, Ordering::Relaxed);
                let total: u64 = self.pending.iter().map(|p| p.load(Ordering::Relaxed)).sum();
                self.metrics.webhook_pending.set(i64::try_from(total).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::debug!(url = %hook.url, error = %e, "cannot count pending webhook events"),
        }
    }

    // ------------------------------------------------------------------ due events

    async fn scan(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Usage of the minute before the first scan may already have crossed a threshold.
        let mut used_since = OffsetDateTime::now_utc() - time::Duration::minutes(2);
        loop {
            let started = OffsetDateTime::now_utc();
            if let Err(e) = self.scan_expiring(started).await {
                tracing::warn!(error = %e, "cannot look for expiring keys");
            }
            match self.scan_quotas(used_since).await {
                // The next scan looks again at this minute: usage arrives late by a flush.
                Ok(()) => used_since = minute_start(started) - time::Duration::MINUTE,
                Err(e) => tracing::warn!(error = %e, "cannot look for quota thresholds"),
            }
            tokio::select! {
                _ = tokio::time::sleep(SCAN_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One `key.expiring` per key, expiry and lead, when the key enters the lead time.
    async fn scan_expiring(&self, now: OffsetDateTime) -> Result<(), StoreError> {
        let leads: BTreeSet<Duration> =
            self.hooks.iter().filter(|h| h.wants("key.expiring")).map(|h| h.expiring_lead).collect();
        for lead in leads {
            let lead_text = format_duration(lead);
            let mark = format!("key.expiring/{lead_text}");
            let until = now.saturating_add(time::Duration::try_from(lead).unwrap_or(time::Duration::MAX));
            for key in self.store.expiring_keys(&mark, now, until, EXPIRING_PER_SCAN).await? {
                let Some(expires_at) = key.expires_at else { continue };
                let data = serde_json::json!({ "key": key.public_json(), "lead": lead_text });
                let mark = (mark.as_str(), key.id.as_str(), expires_at);
                self.store.append_event_once(mark, "key.expiring", Some(&key.id), &data).await?;
            }
        }
        Ok(())
    }

    /// One `quota.threshold` per budget, threshold and period, for the budgets of the
    /// keys used since `used_since` (only they can have crossed one).
    async fn scan_quotas(&self, used_since: OffsetDateTime) -> Result<(), StoreError> {
        let used = self.store.keys_used_since(used_since).await?;
        if used.is_empty() {
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        let mut budgets: HashMap<(LimitScope, QuotaPeriod), Budgets> = HashMap::new();
        for chunk in used.chunks(1000) {
            for key in self.store.keys_by_id(chunk).await? {
                let Some(quota) = self.plans.quota_of(&key) else { continue };
                let subject = match quota.by {
                    LimitScope::Key => key.id.clone(),
                    LimitScope::Owner => match &key.owner {
                        Some(owner) => owner.clone(),
                        None => key.id.clone(),
                    },
                };
                let scope = if key.owner.is_none() { LimitScope::Key } else { quota.by };
                budgets.entry((scope, quota.per)).or_default().insert(subject, (quota, key));
            }
        }
        for ((scope, period), subjects) in budgets {
            let start = period_start(period, now);
            let names: Vec<String> = subjects.keys().cloned().collect();
            let counts = self.store.allowed_since_of(&names, scope == LimitScope::Owner, start).await?;
            for (subject, (quota, key)) in &subjects {
                let used = counts.get(subject).copied().unwrap_or(0);
                for threshold in QUOTA_THRESHOLDS {
                    if quota.requests == 0 || used.saturating_mul(100) < threshold.saturating_mul(quota.requests) {
                        continue;
                    }
                    let data = serde_json::json!({
                        "key_id": key.id,
                        "owner": key.owner,
                        "by": scope.as_str(),
                        "threshold": threshold,
                        "used": used,
                        "limit": quota.requests,
                        "period": quota.per.as_str(),
                        "period_start": start.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                    });
                    let mark_name = format!("quota.threshold/{}/{threshold}", scope.as_str());
                    let mark = (mark_name.as_str(), subject.as_str(), start);
                    self.store.append_event_once(mark, "quota.threshold", Some(&key.id), &data).await?;
                }
            }
        }
        Ok(())
    }
}

/// The quota budgets of one scope and period: subject (key id or owner) -> its quota
/// and one of its keys.
type Budgets = HashMap<String, (QuotaConfig, StoredKey)>;

enum Idle {
    /// More events are waiting: go on at once.
    More,
    /// Until a change, or this long.
    Wait(Duration),
    /// This long, whatever changes: a failing receiver is not hurried.
    Backoff(Duration),
    Stop,
}

enum Attempt {
    Done(WebhookResult),
    /// Failing since `since`; try again after `wait`.
    Failed {
        since: OffsetDateTime,
        wait: Duration,
    },
    Stopped,
}

/// 1 s, doubling with the time an event has been failing, up to `MAX_BACKOFF`.
fn backoff(failing_for: Duration) -> Duration {
    let seconds = failing_for.as_secs().max(1).next_power_of_two();
    Duration::from_secs(seconds).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_up_to_ten_minutes() {
        assert_eq!(backoff(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(backoff(Duration::from_secs(3)), Duration::from_secs(4));
        assert_eq!(backoff(Duration::from_secs(100)), Duration::from_secs(128));
        assert_eq!(backoff(Duration::from_secs(5000)), MAX_BACKOFF);
    }
}
