//! `GET /v1/gateways`: the gateways following this control plane, as seen from their
//! long polls of the change feed (each names its node and the version it holds).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

/// A gateway is shown as connected while a poll is open or was answered this recently:
/// a healthy one is never longer than one long poll (30 s) plus its reconnect away.
const CONNECTED_WITHIN: Duration = Duration::from_secs(45);
/// A gateway not heard of for this long is forgotten.
const FORGOTTEN_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Most gateways remembered: node names come from sync-token holders, but a bug in a
/// fleet (a random node id per start) must not grow this without end.
const MAX_GATEWAYS: usize = 10_000;

#[derive(Debug, Clone)]
struct Seen {
    version: u64,
    address: Option<SocketAddr>,
    last_seen: OffsetDateTime,
    polls_open: u32,
}

/// One gateway as `GET /v1/gateways` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewayView {
    pub node_id: String,
    /// The index version the gateway holds (the feed version it asked after).
    pub version: u64,
    /// Feed versions it is behind this control plane's latest.
    pub lag: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    pub connected: bool,
    pub address: Option<String>,
}

#[derive(Debug, Default)]
pub struct GatewayRegistry {
    seen: Mutex<HashMap<String, Seen>>,
}

/// Marks a poll open for as long as it lives.
pub struct OpenPoll<'a> {
    registry: &'a GatewayRegistry,
    node: String,
}

impl GatewayRegistry {
    /// Records a poll from `node` holding `version`; the poll counts as open until the
    /// returned guard drops.
    pub fn poll_started(&self, node: &str, version: u64, address: Option<SocketAddr>) -> OpenPoll<'_> {
        let now = OffsetDateTime::now_utc();
        let mut seen = self.lock();
        if !seen.contains_key(node) && seen.len() >= MAX_GATEWAYS {
            forget_old(&mut seen, now);
        }
        if seen.contains_key(node) || seen.len() < MAX_GATEWAYS {
            let entry = seen.entry(node.to_owned()).or_insert(Seen { version, address, last_seen: now, polls_open: 0 });
            entry.version = version;
            entry.address = address.or(entry.address);
            entry.last_seen = now;
            entry.polls_open += 1;
        }
        OpenPoll { registry: self, node: node.to_owned() }
    }

    /// Every gateway heard of in the last day, by node id.
    pub fn list(&self, latest: u64) -> Vec<GatewayView> {
        let now = OffsetDateTime::now_utc();
        let mut seen = self.lock();
        forget_old(&mut seen, now);
        let mut out: Vec<GatewayView> = seen
            .iter()
            .map(|(node, s)| GatewayView {
                node_id: node.clone(),
                version: s.version,
                lag: latest.saturating_sub(s.version),
                last_seen: s.last_seen,
                connected: s.polls_open > 0 || now - s.last_seen <= CONNECTED_WITHIN,
                address: s.address.map(|a| a.ip().to_string()),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn forget_old(seen: &mut HashMap<String, Seen>, now: OffsetDateTime) {
    seen.retain(|_, s| s.polls_open > 0 || now - s.last_seen <= FORGOTTEN_AFTER);
}

impl Drop for OpenPoll<'_> {
    fn drop(&mut self) {
        let mut seen = self.registry.lock();
        if let Some(entry) = seen.get_mut(&self.node) {
            entry.polls_open = entry.polls_open.saturating_sub(1);
            entry.last_seen = OffsetDateTime::now_utc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_shows_its_version_lag_and_whether_a_poll_is_open() {
        let registry = GatewayRegistry::default();
        let poll = registry.poll_started("gw-2", 7, Some("10.0.0.2:5000".parse().unwrap()));
        drop(registry.poll_started("gw-1", 9, None));
        let listed = registry.list(10);
        assert_eq!(listed.iter().map(|g| g.node_id.as_str()).collect::<Vec<_>>(), ["gw-1", "gw-2"]);
        assert_eq!((listed[0].version, listed[0].lag, listed[0].connected), (9, 1, true));
        assert_eq!((listed[1].lag, listed[1].address.as_deref()), (3, Some("10.0.0.2")));
        drop(poll);
        assert_eq!(registry.lock()["gw-2"].polls_open, 0);
    }

    #[test]
    fn the_registry_is_bounded() {
        let registry = GatewayRegistry::default();
        for i in 0..MAX_GATEWAYS + 5 {
            drop(registry.poll_started(&format!("gw-{i}"), 1, None));
        }
        assert_eq!(registry.list(1).len(), MAX_GATEWAYS);
    }
}
