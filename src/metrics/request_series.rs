//! The series every request adds to: `keygate_requests_total`,
//! `keygate_request_duration_seconds` and `keygate_upstream_responses_total`.
//!
//! Each route and upstream counts in per-thread slots (see `sharded`) and the scrape
//! sums them, so no two cores write the same cache line on the request path. A series
//! once created lives as long as the node, as a Prometheus vector's would: a route
//! dropped by a reload and brought back continues its counts.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};

use super::sharded::{sum_durations, DurationCounts, Slots};
use super::{outcome_index, outcome_label, OUTCOMES};
use crate::outcome::Rejection;

/// Request durations from half a millisecond to ten seconds.
const DURATION_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// The bounded buckets and the one above them.
const BUCKETS: usize = DURATION_BUCKETS.len() + 1;
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

const REQUESTS: &str = "keygate_requests_total";
const REQUEST_DURATION: &str = "keygate_request_duration_seconds";
const UPSTREAM_RESPONSES: &str = "keygate_upstream_responses_total";

/// One thread's counts for one route: the outcome counters and the histogram share
/// the thread's cache lines.
#[derive(Default)]
struct RouteSlot {
    by_outcome: [AtomicU64; OUTCOMES],
    duration: DurationCounts<BUCKETS>,
}

/// One route's series, resolved once when the gateway state is built.
#[derive(Clone)]
pub struct RouteMetrics {
    slots: Arc<Slots<RouteSlot>>,
}

impl RouteMetrics {
    pub fn observe(&self, rejection: Option<Rejection>, elapsed: Duration) {
        let slot = self.slots.local();
        if let Some(counter) = slot.by_outcome.get(outcome_index(rejection)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        slot.duration.observe(&DURATION_BUCKETS, elapsed);
    }
}

/// One upstream's response counters by status class.
#[derive(Clone)]
pub struct UpstreamMetrics {
    slots: Arc<Slots<[AtomicU64; STATUS_CLASSES.len()]>>,
}

impl UpstreamMetrics {
    pub fn observe(&self, status: u16) {
        let class = (status / 100).checked_sub(1).map(usize::from);
        if let Some(counter) = class.and_then(|class| self.slots.local().get(class)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Every route's and upstream's series, by name; registered with the registry.
pub struct RequestSeries {
    routes: Mutex<BTreeMap<String, RouteMetrics>>,
    upstreams: Mutex<BTreeMap<String, UpstreamMetrics>>,
    descs: [Desc; 3],
}

impl RequestSeries {
    pub fn new() -> Result<Self, prometheus::Error> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(name.into(), help.into(), labels.iter().map(|l| (*l).to_owned()).collect(), HashMap::new())
        };
        Ok(RequestSeries {
            routes: Mutex::default(),
            upstreams: Mutex::default(),
            descs: [
                desc(REQUESTS, "Requests by route and outcome (allowed or a denial code)", &["route", "outcome"])?,
                desc(REQUEST_DURATION, "Time from request to response, by route", &["route"])?,
                desc(UPSTREAM_RESPONSES, "Upstream responses by upstream and status class", &["upstream", "class"])?,
            ],
        })
    }

    pub fn route(&self, name: &str) -> RouteMetrics {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.entry(name.to_owned()).or_insert_with(|| RouteMetrics { slots: Arc::default() }).clone()
    }

    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(PoisonError::into_inner);
        upstreams.entry(name.to_owned()).or_insert_with(|| UpstreamMetrics { slots: Arc::default() }).clone()
    }
}

/// The registry's handle on the series.
pub struct Collected(pub Arc<RequestSeries>);

impl Collector for Collected {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = &self.0;
        let mut requests = Vec::new();
        let mut durations = Vec::new();
        for (route, metrics) in series.routes.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            for outcome in 0..OUTCOMES {
                let count: u64 =
                    metrics.slots.iter().map(|slot| slot.by_outcome[outcome].load(Ordering::Relaxed)).sum();
                requests.push(counter(&[("outcome", outcome_label(outcome)), ("route", route)], count));
            }
            let snapshot = sum_durations(metrics.slots.iter().map(|slot| &slot.duration));
            let mut histogram = proto::Histogram::default();
            histogram.set_bucket(
                DURATION_BUCKETS
                    .iter()
                    .zip(&snapshot.cumulative)
                    .map(|(&bound, &count)| {
                        let mut bucket = proto::Bucket::default();
                        bucket.set_upper_bound(bound);
                        bucket.set_cumulative_count(count);
                        bucket
                    })
                    .collect(),
            );
            histogram.set_sample_count(snapshot.count);
            histogram.set_sample_sum(snapshot.sum_seconds);
            let mut metric = Metric::from_label(labels(&[("route", route)]));
            metric.set_histogram(histogram);
            durations.push(metric);
        }
        let mut responses = Vec::new();
        for (upstream, metrics) in series.upstreams.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            for (class, label) in STATUS_CLASSES.iter().enumerate() {
                let count: u64 = metrics.slots.iter().map(|slot| slot[class].load(Ordering::Relaxed)).sum();
                responses.push(counter(&[("class", label), ("upstream", upstream)], count));
            }
        }
        [(0, MetricType::COUNTER, requests), (1, MetricType::HISTOGRAM, durations), (2, MetricType::COUNTER, responses)]
            .into_iter()
            .map(|(desc, kind, metrics)| {
                let desc = &series.descs[desc];
                let mut family = MetricFamily::default();
                family.set_name(desc.fq_name.clone());
                family.set_help(desc.help.clone());
                family.set_field_type(kind);
                family.set_metric(metrics);
                family
            })
            .collect()
    }
}

/// Label pairs, given in the order Prometheus sorts them (by name).
fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], count: u64) -> Metric {
    let mut value = proto::Counter::default();
    value.set_value(count as f64);
    let mut metric = Metric::from_label(labels(pairs));
    metric.set_counter(value);
    metric
}
