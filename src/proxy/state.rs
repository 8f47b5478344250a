//! What the proxy needs from the config, built once and swapped whole on reload.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};
use http::HeaderValue;
use ipnet::IpNet;

use super::routing::Route;
use super::upstream::{Upstream, UpstreamBuildError};
use crate::config::{Config, HttpConfig, KeyLocation};
use crate::metrics::sharded::Slots;
use crate::metrics::{Metrics, RouteMetrics};
use crate::policy::PlanTable;

pub struct GatewayState {
    pub routes: Vec<Route>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub key_locations: Vec<KeyLocation>,
    /// Query parameter names that can carry a key, removed before proxying.
    pub key_query_params: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    /// Sent as `X-Keygate-Plan` for keys without a plan of their own.
    pub default_plan: Option<HeaderValue>,
    pub plans: PlanTable,
    /// Series for requests that matched no route.
    pub unrouted_metrics: RouteMetrics,
    /// Timeouts, connection limit and path and header policies.
    pub http: HttpConfig,
}

impl GatewayState {
    pub fn build(config: &Config, metrics: &Metrics) -> Result<Self, UpstreamBuildError> {
        let mut upstreams = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            upstreams.insert(name.as_str(), Arc::new(Upstream::build(name, upstream, metrics.upstream(name))?));
        }
        // Validation guarantees every route names an existing upstream.
        let routes = config
            .routes
            .iter()
            .filter_map(|route| {
                upstreams
                    .get(route.upstream.as_str())
                    .map(|u| Route::new(route, Arc::clone(u), metrics.route(&route.name)))
            })
            .collect();
        let key_query_params = config
            .key_locations
            .iter()
            .filter_map(|location| match location {
                KeyLocation::Query { name } => Some(name.clone()),
                KeyLocation::Header { .. } => None,
            })
            .collect();
        Ok(GatewayState {
            routes,
            upstreams: upstreams.into_values().collect(),
            key_locations: config.key_locations.clone(),
            key_query_params,
            trusted_proxies: config.client_ip.trusted_proxies.clone(),
            default_plan: config.default_plan.as_deref().and_then(|p| HeaderValue::from_str(p).ok()),
            plans: PlanTable::new(config.plans.clone(), config.default_plan.clone()),
            unrouted_metrics: metrics.route("none"),
            http: config.http,
        })
    }
}

/// The state in use, as requests hold it. Holding the one `Arc` of the state for a
/// request would write its count (twice) on a cache line that every core shares; each
/// thread slot here keeps a share of its own, and a request counts on its thread's.
pub struct StateCell<T> {
    current: ArcSwap<T>,
    /// Counts the states put in use: a share of an older one is stale. Read by every
    /// request but written only on reload, so its line stays in every core's cache.
    generation: AtomicU64,
    shares: Slots<Mutex<Option<HeldShare<T>>>>,
}

/// A thread slot's share, with the generation of its state.
type HeldShare<T> = (u64, Arc<StateShare<T>>);

/// A thread's hold on one state.
pub struct StateShare<T>(Arc<T>);

impl<T> Deref for StateShare<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> StateCell<T> {
    pub fn new(state: T) -> Self {
        StateCell { current: ArcSwap::from_pointee(state), generation: AtomicU64::new(0), shares: Slots::default() }
    }

    /// The state in use now, for a short look.
    pub fn load(&self) -> Guard<Arc<T>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// The state in use now, held for as long as a request needs it.
    pub fn hold(&self) -> Arc<StateShare<T>> {
        // Read before the state: a reload in between leaves the share marked stale.
        let generation = self.generation.load(Ordering::Acquire);
        let mut share = self.shares.local().lock().unwrap_or_else(PoisonError::into_inner);
        match &*share {
            Some((held_generation, held)) if *held_generation == generation => Arc::clone(held),
            _ => {
                let held = Arc::new(StateShare(self.current.load_full()));
                *share = Some((generation, Arc::clone(&held)));
                held
            }
        }
    }

    /// Puts `state` in use; requests that hold the old one keep it to their end.
    pub fn store(&self, state: T) {
        self.current.store(Arc::new(state));
        self.generation.fetch_add(1, Ordering::AcqRel);
        // The old state goes once its last request ends, not at each thread's next request.
        for share in self.shares.iter() {
            share.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_of_one_thread_hold_one_share_until_the_state_changes() {
        let cell = StateCell::new(1);
        let first = cell.hold();
        let second = cell.hold();
        assert!(Arc::ptr_eq(&first, &second), "one share per thread");
        cell.store(2);
        let third = cell.hold();
        assert_eq!((**first, **third), (1, 2));
        assert!(!Arc::ptr_eq(&first, &third), "a request keeps the state it began with");
    }

    #[test]
    fn a_replaced_state_lives_only_as_long_as_its_requests() {
        let cell = StateCell::new(Arc::new("old"));
        let old = Arc::downgrade(&cell.load_full());
        let request = cell.hold();
        cell.store(Arc::new("new"));
        assert!(old.upgrade().is_some(), "held by the request");
        drop(request);
        assert!(old.upgrade().is_none(), "no thread's share keeps it");
        assert_eq!(**cell.hold(), Arc::new("new"));
    }

    #[test]
    fn threads_share_the_state_through_shares_of_their_own() {
        let cell = Arc::new(StateCell::new(7));
        let here = cell.hold();
        let there = {
            let cell = Arc::clone(&cell);
            std::thread::spawn(move || cell.hold()).join().unwrap()
        };
        assert_eq!((**here, **there), (7, 7));
        assert!(Arc::ptr_eq(&here.0, &there.0), "one state");
    }
}
