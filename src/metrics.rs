//! Prometheus metrics (CONTRACT §7). No label ever names a key.
//!
//! Request-path series are resolved once per route and upstream when the
//! gateway state is built, so a request only adds to atomics of its own thread
//! (`request_series`).

mod request_series;
pub mod sharded;

use std::sync::Arc;

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub use request_series::{RouteMetrics, UpstreamMetrics};

use crate::outcome::Rejection;
use request_series::RequestSeries;

pub struct Metrics {
    registry: Registry,
    request_series: Arc<RequestSeries>,
    pub keys_loaded: IntGauge,
    pub key_index_version: IntGauge,
    pub sync_last_success: Gauge,
    pub sync_errors: IntCounter,
    /// Keys loaded whose `ip_allowlist` has an entry that cannot be parsed (each admits no address).
    pub key_allowlist_errors: IntCounter,
    usage_flush: IntCounterVec,
    pub usage_pending: IntGauge,
    pub usage_dropped: IntCounter,
    /// Bytes of the usage spool file (`usage.spool`).
    pub usage_spool_bytes: IntGauge,
    config_reloads: IntCounterVec,
    pub access_log_dropped: IntCounter,
    pub connections_open: IntGauge,
    pub connections_refused_max: IntCounter,
    pub connections_refused_header_timeout: IntCounter,
    /// `keygate_fleet_limits_sync_total{result="ok"}` / `{result="error"}`.
    pub fleet_limits_sync_ok: IntCounter,
    pub fleet_limits_sync_error: IntCounter,
    /// 1 while fleet limits are decided on this process's own state alone.
    pub fleet_limits_local_fallback: IntGauge,
    webhook_deliveries: IntCounterVec,
    /// Events waiting for delivery, over every webhook this node delivers to.
    pub webhook_pending: IntGauge,
}

/// What became of one webhook delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookResult {
    /// The receiver answered 2xx.
    Delivered,
    /// It failed; the event is tried again later.
    Retry,
    /// It failed for longer than keygate retries; the event is skipped.
    GivenUp,
}

/// Every value of the `outcome` label: `allowed` and each code keygate answers with.
pub const OUTCOMES: usize = 1 + Rejection::KINDS;

pub fn outcome_index(rejection: Option<Rejection>) -> usize {
    rejection.map_or(0, |r| 1 + r.index())
}

fn outcome_label(index: usize) -> &'static str {
    if index == 0 {
        "allowed"
    } else {
        Rejection::from_index(index - 1).map_or("unknown", Rejection::code)
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let request_series = Arc::new(RequestSeries::new()?);
        let keys_loaded = IntGauge::new("keygate_keys_loaded", "Keys in the active index")?;
        let key_index_version = IntGauge::new("keygate_key_index_version", "Version of the active key index")?;
        let sync_last_success = Gauge::new(
            "keygate_sync_last_success_timestamp_seconds",
            "Unix time of the last successful key sync or load",
        )?;
        let sync_errors = IntCounter::new("keygate_sync_errors_total", "Failed key syncs or loads")?;
        let key_allowlist_errors = IntCounter::new(
            "keygate_key_allowlist_errors_total",
            "Keys loaded with an ip_allowlist entry that cannot be parsed; such a key admits no address",
        )?;
        let usage_flush = IntCounterVec::new(
            Opts::new("keygate_usage_flush_total", "Usage flushes by sink and result"),
            &["sink", "result"],
        )?;
        let usage_pending = IntGauge::new("keygate_usage_pending", "Usage records waiting to reach their sinks")?;
        let usage_dropped = IntCounter::new("keygate_usage_dropped_total", "Usage records given up on")?;
        let usage_spool_bytes =
            IntGauge::new("keygate_usage_spool_bytes", "Bytes of the spool of usage no sink has acknowledged yet")?;
        let config_reloads =
            IntCounterVec::new(Opts::new("keygate_config_reloads_total", "Config reloads by result"), &["result"])?;
        let access_log_dropped = IntCounter::new(
            "keygate_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind",
        )?;

        registry.register(Box::new(request_series::Collected(Arc::clone(&request_series))))?;
        registry.register(Box::new(keys_loaded.clone()))?;
        registry.register(Box::new(key_index_version.clone()))?;
        registry.register(Box::new(sync_last_success.clone()))?;
        registry.register(Box::new(sync_errors.clone()))?;
        registry.register(Box::new(key_allowlist_errors.clone()))?;
        registry.register(Box::new(usage_flush.clone()))?;
        registry.register(Box::new(usage_pending.clone()))?;
        registry.register(Box::new(usage_dropped.clone()))?;
        registry.register(Box::new(usage_spool_bytes.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        let connections_open =
            IntGauge::new("keygate_connections_open", "Client connections open on the proxy listeners")?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "keygate_connections_refused_total",
                "Client connections closed unserved: over max_connections, or no request head within request_header_timeout",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        let fleet_limits_sync = IntCounterVec::new(
            Opts::new(
                "keygate_fleet_limits_sync_total",
                "Exchanges of limit consumption with the fleet engine, by result",
            ),
            &["result"],
        )?;
        let fleet_limits_local_fallback = IntGauge::new(
            "keygate_fleet_limits_local_fallback",
            "1 while fleet limits are decided on this process's own state alone (the engine is away)",
        )?;
        registry.register(Box::new(fleet_limits_sync.clone()))?;
        registry.register(Box::new(fleet_limits_local_fallback.clone()))?;
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "keygate_webhook_deliveries_total",
                "Webhook delivery attempts by result: delivered, retry (tried again later), given_up",
            ),
            &["result"],
        )?;
        let webhook_pending =
            IntGauge::new("keygate_webhook_pending", "Events waiting for delivery to this node's webhooks")?;
        registry.register(Box::new(webhook_deliveries.clone()))?;
        registry.register(Box::new(webhook_pending.clone()))?;

        Ok(Metrics {
            registry,
            request_series,
            keys_loaded,
            key_index_version,
            sync_last_success,
            sync_errors,
            key_allowlist_errors,
            usage_flush,
            usage_pending,
            usage_dropped,
            usage_spool_bytes,
            config_reloads,
            access_log_dropped,
            connections_open,
            connections_refused_max: connections_refused.with_label_values(&["max_connections"]),
            connections_refused_header_timeout: connections_refused.with_label_values(&["header_timeout"]),
            fleet_limits_sync_ok: fleet_limits_sync.with_label_values(&["ok"]),
            fleet_limits_sync_error: fleet_limits_sync.with_label_values(&["error"]),
            fleet_limits_local_fallback,
            webhook_deliveries,
            webhook_pending,
        })
    }

    pub fn route(&self, route: &str) -> RouteMetrics {
        self.request_series.route(route)
    }

    pub fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        self.request_series.upstream(upstream)
    }

    pub fn usage_flushed(&self, sink: &str, ok: bool) {
        self.usage_flush.with_label_values(&[sink, if ok { "ok" } else { "error" }]).inc();
    }

    pub fn webhook_delivery(&self, result: WebhookResult) {
        let label = match result {
            WebhookResult::Delivered => "delivered",
            WebhookResult::Retry => "retry",
            WebhookResult::GivenUp => "given_up",
        };
        self.webhook_deliveries.with_label_values(&[label]).inc();
    }

    pub fn config_reloaded(&self, ok: bool) {
        self.config_reloads.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::outcome::Denial;

    #[test]
    fn route_series_count_each_outcome_separately() {
        let metrics = Metrics::new().unwrap();
        let route = metrics.route("orders");
        route.observe(None, Duration::from_millis(2));
        route.observe(Some(Rejection::Denied(Denial::InvalidKey)), Duration::from_millis(1));
        route.observe(Some(Rejection::Denied(Denial::InvalidKey)), Duration::from_millis(1));
        let text = metrics.render();
        assert!(text.contains(r#"keygate_requests_total{outcome="allowed",route="orders"} 1"#), "{text}");
        assert!(text.contains(r#"keygate_requests_total{outcome="invalid_key",route="orders"} 2"#), "{text}");
        assert!(text.contains(r#"keygate_request_duration_seconds_count{route="orders"} 3"#), "{text}");
        assert!(text.contains(r#"keygate_request_duration_seconds_bucket{route="orders",le="0.001"} 2"#), "{text}");
        assert!(text.contains(r#"keygate_request_duration_seconds_bucket{route="orders",le="+Inf"} 3"#), "{text}");
        assert!(text.contains(r#"keygate_request_duration_seconds_sum{route="orders"} 0.004"#), "{text}");
        assert!(text.contains("# TYPE keygate_request_duration_seconds histogram"), "{text}");
        assert!(text.contains("# TYPE keygate_requests_total counter"), "{text}");
    }

    #[test]
    fn counts_from_many_threads_add_up_and_a_route_keeps_its_series() {
        let metrics = Metrics::new().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let route = metrics.route("orders");
                std::thread::spawn(move || (0..500).for_each(|_| route.observe(None, Duration::from_micros(100))))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        metrics.route("orders").observe(None, Duration::from_micros(100));
        let text = metrics.render();
        assert!(text.contains(r#"keygate_requests_total{outcome="allowed",route="orders"} 4001"#), "{text}");
        assert!(text.contains(r#"keygate_request_duration_seconds_bucket{route="orders",le="0.0005"} 4001"#), "{text}");
    }

    #[test]
    fn upstream_series_count_by_status_class() {
        let metrics = Metrics::new().unwrap();
        let upstream = metrics.upstream("api");
        upstream.observe(204);
        upstream.observe(503);
        upstream.observe(99);
        let text = metrics.render();
        assert!(text.contains(r#"keygate_upstream_responses_total{class="2xx",upstream="api"} 1"#), "{text}");
        assert!(text.contains(r#"keygate_upstream_responses_total{class="5xx",upstream="api"} 1"#), "{text}");
    }

    #[test]
    fn every_outcome_has_a_distinct_label() {
        let labels: std::collections::HashSet<&str> = (0..OUTCOMES).map(outcome_label).collect();
        assert_eq!(labels.len(), OUTCOMES);
        assert!(!labels.contains("unknown"));
    }

    #[test]
    fn contract_metric_names_are_all_exposed() {
        let metrics = Metrics::new().unwrap();
        metrics.route("r");
        metrics.upstream("u");
        metrics.usage_flushed("file", true);
        metrics.config_reloaded(true);
        metrics.sync_errors.inc();
        let text = metrics.render();
        for name in [
            "keygate_requests_total",
            "keygate_request_duration_seconds",
            "keygate_upstream_responses_total",
            "keygate_keys_loaded",
            "keygate_key_index_version",
            "keygate_sync_last_success_timestamp_seconds",
            "keygate_sync_errors_total",
            "keygate_usage_flush_total",
            "keygate_usage_pending",
            "keygate_usage_dropped_total",
            "keygate_usage_spool_bytes",
            "keygate_config_reloads_total",
            "keygate_connections_open",
            "keygate_connections_refused_total",
            "keygate_fleet_limits_sync_total",
            "keygate_fleet_limits_local_fallback",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing from:\n{text}");
        }
    }
}
