//! What the proxy needs from the config, built once and swapped whole on reload.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderValue;
use ipnet::IpNet;

use super::routing::Route;
use super::upstream::{Upstream, UpstreamBuildError};
use crate::config::{Config, HttpConfig, KeyLocation};
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
