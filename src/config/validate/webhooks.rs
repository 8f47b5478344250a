//! `webhooks:`: where events are sent, and what each receiver wants.

use std::collections::BTreeSet;
use std::time::Duration;

use super::super::position::{join_index, join_key};
use super::super::raw::{Parsed, RawWebhook, Text};
use super::super::{format_duration, Mode, WebhookConfig, DEFAULT_EXPIRING_LEAD, WEBHOOK_EVENTS};
use super::Builder;

/// The longest `expiring_lead`: a year's notice is already more than anyone reads.
const MAX_EXPIRING_LEAD: Duration = Duration::from_secs(365 * 86_400);

impl Builder<'_> {
    pub(super) fn webhooks(
        &mut self,
        raw: Option<Parsed<Vec<Parsed<RawWebhook>>>>,
        mode: Option<Mode>,
    ) -> Vec<WebhookConfig> {
        let Some(list) = self.parsed(raw, "webhooks") else {
            return Vec::new();
        };
        if mode == Some(Mode::Gateway) && !list.is_empty() {
            self.issues.add(
                "webhooks",
                "sent by the node that holds the store: configure them on the control plane (or a standalone node)",
            );
        }
        let mut out = Vec::new();
        let mut urls = BTreeSet::new();
        for (i, item) in list.into_iter().enumerate() {
            let path = join_index("webhooks", i);
            let Some(raw) = self.issues.take(item, &path) else { continue };
            let url_path = join_key(&path, "url");
            let url = self.required_nonblank(raw.url, &url_path).filter(|url| self.check_http_url(url, &url_path));
            // A receiver's delivery position is kept by its URL.
            if let Some(url) = &url {
                if !urls.insert(url.clone()) {
                    self.issues.add(&url_path, "this URL is already a webhook: give each receiver one entry");
                }
            }
            let secret = self.signing_secret(raw.secret, &join_key(&path, "secret"));
            let events = self.webhook_events(raw.events, &join_key(&path, "events"));
            let lead_path = join_key(&path, "expiring_lead");
            let expiring_lead = self.duration(raw.expiring_lead, &lead_path, DEFAULT_EXPIRING_LEAD, false);
            if expiring_lead > MAX_EXPIRING_LEAD {
                self.issues.add(&lead_path, format!("must be at most {}", format_duration(MAX_EXPIRING_LEAD)));
            }
            if let (Some(url), Some(secret), Some(events)) = (url, secret, events) {
                out.push(WebhookConfig { url, secret, events, expiring_lead });
            }
        }
        out
    }

    /// `Some(None)`: every event.
    fn webhook_events(&mut self, raw: Option<Vec<Text>>, path: &str) -> Option<Option<BTreeSet<String>>> {
        let Some(list) = raw else { return Some(None) };
        if list.is_empty() {
            self.issues.add(path, "must name at least one event (leave it out for every event)");
            return None;
        }
        let mut events = BTreeSet::new();
        let mut ok = true;
        for (i, Text(event)) in list.into_iter().enumerate() {
            if WEBHOOK_EVENTS.contains(&event.as_str()) {
                events.insert(event);
            } else {
                ok = false;
                self.issues.add(
                    &join_index(path, i),
                    format!("unknown event {event:?}, expected one of {}", WEBHOOK_EVENTS.join(", ")),
                );
            }
        }
        ok.then_some(Some(events))
    }
}
