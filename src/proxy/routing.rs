//! Routes: the first whose method, host and path prefix match wins.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};

use super::upstream::Upstream;
use crate::config::{RouteAuth, RouteConfig};
use crate::metrics::RouteMetrics;

pub struct Route {
    pub name: String,
    methods: Vec<Method>,
    host: Option<String>,
    path_prefix: String,
    pub upstream: Arc<Upstream>,
    pub auth: RouteAuth,
    pub scopes: Vec<String>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub metrics: RouteMetrics,
}

impl Route {
    pub fn new(config: &RouteConfig, upstream: Arc<Upstream>, metrics: RouteMetrics) -> Self {
        Route {
            name: config.name.clone(),
            methods: config.matcher.methods.clone(),
            host: config.matcher.host.clone(),
            path_prefix: config.matcher.path_prefix.clone(),
            upstream,
            auth: config.auth,
            scopes: config.scopes.clone(),
            set_headers: config.set_headers.clone(),
            metrics,
        }
    }

    pub fn matches(&self, method: &Method, host: Option<&str>, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self.host.as_deref().is_none_or(|want| host.is_some_and(|h| strip_port(h).eq_ignore_ascii_case(want)))
            && path.starts_with(&self.path_prefix)
    }
}

/// The position of the first route, in file order, that matches.
pub fn find_route(routes: &[Route], method: &Method, host: Option<&str>, path: &str) -> Option<usize> {
    routes.iter().position(|route| route.matches(method, host, path))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // "[v6]:port" → "v6"
        return rest.split_once(']').map_or(rest, |(v6, _)| v6);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RouteMatch, UpstreamConfig};
    use std::time::Duration;

    fn metrics() -> crate::metrics::Metrics {
        crate::metrics::Metrics::new().unwrap()
    }

    fn upstream() -> Arc<Upstream> {
        let config = UpstreamConfig {
            targets: vec!["127.0.0.1:9".into()],
            tls: None,
            health_check: None,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
        };
        Arc::new(Upstream::build("u", &config, metrics().upstream("u")).unwrap())
    }

    fn route(name: &str, prefix: &str, methods: &[&str], host: Option<&str>) -> Route {
        let config = RouteConfig {
            name: name.into(),
            matcher: RouteMatch {
                path_prefix: prefix.into(),
                methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
                host: host.map(str::to_owned),
            },
            upstream: "u".into(),
            auth: RouteAuth::Key,
            scopes: vec![],
            set_headers: vec![],
        };
        Route::new(&config, upstream(), metrics().route(name))
    }

    fn pick<'r>(routes: &'r [Route], method: &str, host: Option<&str>, path: &str) -> Option<&'r str> {
        find_route(routes, &method.parse().unwrap(), host, path).map(|i| routes[i].name.as_str())
    }

    #[test]
    fn first_match_in_order_wins() {
        let routes = [route("specific", "/v1/orders", &[], None), route("catch-all", "/", &[], None)];
        assert_eq!(pick(&routes, "GET", None, "/v1/orders/7"), Some("specific"));
        assert_eq!(pick(&routes, "GET", None, "/v2"), Some("catch-all"));
        let reversed = [route("catch-all", "/", &[], None), route("specific", "/v1/orders", &[], None)];
        assert_eq!(pick(&reversed, "GET", None, "/v1/orders/7"), Some("catch-all"));
    }

    #[test]
    fn methods_filter_and_fall_through() {
        let routes = [route("read", "/v1", &["GET", "HEAD"], None), route("write", "/v1", &["POST"], None)];
        assert_eq!(pick(&routes, "HEAD", None, "/v1/x"), Some("read"));
        assert_eq!(pick(&routes, "POST", None, "/v1/x"), Some("write"));
        assert_eq!(pick(&routes, "DELETE", None, "/v1/x"), None);
    }

    #[test]
    fn host_matches_without_case_or_port() {
        let routes = [route("api", "/", &[], Some("api.example.com"))];
        assert_eq!(pick(&routes, "GET", Some("API.example.com:8080"), "/"), Some("api"));
        assert_eq!(pick(&routes, "GET", Some("api.example.com"), "/"), Some("api"));
        assert_eq!(pick(&routes, "GET", Some("other.example.com"), "/"), None);
        assert_eq!(pick(&routes, "GET", None, "/"), None);
    }

    #[test]
    fn path_prefix_is_a_plain_prefix() {
        let routes = [route("orders", "/v1/orders", &[], None)];
        assert_eq!(pick(&routes, "GET", None, "/v1/orders"), Some("orders"));
        assert_eq!(pick(&routes, "GET", None, "/v1/orders?x=1"), Some("orders"));
        assert_eq!(pick(&routes, "GET", None, "/v1/order"), None);
    }

    #[test]
    fn strip_port_understands_ipv6() {
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Any host header and path: no panic, and the route found is the first whose
        /// prefix the path starts with (here every route takes any host and method).
        #[test]
        fn the_first_matching_prefix_wins_for_any_host_and_path(
            host in proptest::option::of("\\PC{0,24}"),
            path in "/[a-z/%.]{0,16}",
        ) {
            let routes = [route("a", "/a", &[], None), route("ab", "/a/b", &[], None), route("root", "/", &[], None)];
            let found = pick(&routes, "GET", host.as_deref(), &path);
            let expected = routes.iter().find(|r| path.starts_with(&r.path_prefix)).map(|r| r.name.as_str());
            proptest::prop_assert_eq!(found, expected);
            let _ = strip_port(host.as_deref().unwrap_or(""));
            let hosted = [route("h", "/", &[], Some("api.example.com"))];
            let _ = pick(&hosted, "GET", host.as_deref(), &path);
        }
    }
}
