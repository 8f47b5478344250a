//! Upstream pools: round-robin over targets, active health checks, peers with timeouts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::lb::health_check::{HealthObserve, HttpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::WrappedX509;
use pingora::{Error, ErrorType};

use crate::config::{HealthCheckConfig, UpstreamConfig};
use crate::metrics::UpstreamMetrics;

/// How long an idle upstream connection stays in the keep-alive pool.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamBuildError {
    #[error("upstream {upstream}: target {target} does not resolve: {reason}")]
    Unresolvable { upstream: String, target: String, reason: String },
    #[error("upstream {upstream}: tls.ca: {source}")]
    Ca { upstream: String, source: super::tls::TlsError },
}

/// How an upstream is reached over TLS.
struct UpstreamTls {
    sni: String,
    verify: bool,
    ca: Option<Arc<[WrappedX509]>>,
}

pub struct Upstream {
    pub name: String,
    balancer: LoadBalancer<RoundRobin>,
    target_count: usize,
    tls: Option<UpstreamTls>,
    connect_timeout: Duration,
    read_timeout: Duration,
    health_check: Option<HealthSchedule>,
    pub metrics: UpstreamMetrics,
}

struct HealthSchedule {
    interval: Duration,
    next_due: Mutex<Instant>,
}

impl Upstream {
    /// Resolves every target now: DNS never runs on the request path.
    pub fn build(name: &str, config: &UpstreamConfig, metrics: UpstreamMetrics) -> Result<Self, UpstreamBuildError> {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for target in &config.targets {
            let unresolvable = |reason: String| UpstreamBuildError::Unresolvable {
                upstream: name.to_owned(),
                target: target.clone(),
                reason,
            };
            let resolved: Vec<SocketAddr> =
                target.to_socket_addrs().map_err(|e| unresolvable(e.to_string()))?.collect();
            if resolved.is_empty() {
                return Err(unresolvable("no addresses".into()));
            }
            for addr in resolved {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
        }
        let mut balancer = LoadBalancer::<RoundRobin>::try_from_iter(addrs.iter().copied()).map_err(|e| {
            UpstreamBuildError::Unresolvable {
                upstream: name.to_owned(),
                target: config.targets.join(", "),
                reason: e.to_string(),
            }
        })?;
        let tls = match &config.tls {
            None => None,
            Some(tls) => Some(UpstreamTls {
                sni: tls.sni.clone().unwrap_or_else(|| host_part(&config.targets[0]).to_owned()),
                verify: tls.verify,
                ca: tls
                    .ca
                    .as_deref()
                    .map(super::tls::load_upstream_ca)
                    .transpose()
                    .map_err(|source| UpstreamBuildError::Ca { upstream: name.to_owned(), source })?,
            }),
        };
        let health_check = config.health_check.as_ref().map(|hc| {
            let host = tls.as_ref().map_or_else(|| host_part(&config.targets[0]).to_owned(), |t| t.sni.clone());
            balancer.set_health_check(http_health_check(name, &host, tls.as_ref(), hc));
            HealthSchedule { interval: hc.interval, next_due: Mutex::new(Instant::now()) }
        });
        Ok(Upstream {
            name: name.to_owned(),
            balancer,
            target_count: addrs.len(),
            tls,
            connect_timeout: config.connect_timeout,
            read_timeout: config.read_timeout,
            health_check,
            metrics,
        })
    }

    pub fn target_count(&self) -> usize {
        self.target_count
    }

    /// The next healthy target in round-robin order.
    pub fn select(&self) -> Option<Backend> {
        self.balancer.select(b"", self.target_count.max(1) * 2)
    }

    pub fn peer(&self, backend: &Backend) -> pingora::Result<Box<HttpPeer>> {
        let addr = backend
            .addr
            .as_inet()
            .copied()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "upstream target is not an inet address"))?;
        let mut peer =
            HttpPeer::new(addr, self.tls.is_some(), self.tls.as_ref().map(|t| t.sni.clone()).unwrap_or_default());
        if let Some(tls) = &self.tls {
            apply_tls(&mut peer, tls);
        }
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        Ok(Box::new(peer))
    }

    /// Claims the next round of health checks if its interval has passed.
    pub fn health_check_due(&self, now: Instant) -> bool {
        let Some(schedule) = &self.health_check else {
            return false;
        };
        let mut next_due = schedule.next_due.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if now < *next_due {
            return false;
        }
        *next_due = now + schedule.interval;
        true
    }

    pub async fn run_health_check(&self) {
        self.balancer.backends().run_health_check(true).await;
    }
}

fn apply_tls(peer: &mut HttpPeer, tls: &UpstreamTls) {
    peer.options.verify_cert = tls.verify;
    peer.options.verify_hostname = tls.verify;
    peer.options.ca = tls.ca.clone();
}

fn http_health_check(
    upstream: &str,
    host: &str,
    tls: Option<&UpstreamTls>,
    config: &HealthCheckConfig,
) -> Box<HttpHealthCheck> {
    let mut check = HttpHealthCheck::new(host, tls.is_some());
    if let Some(tls) = tls {
        apply_tls(&mut check.peer_template, tls);
    }
    // `new` only fails on an invalid method or path; the path was validated with the config.
    if let Ok(mut req) = pingora::http::RequestHeader::build("GET", config.path.as_bytes(), None) {
        let _ = req.append_header("Host", host);
        let _ = req.append_header("User-Agent", "keygate-health-check");
        check.req = req;
    }
    check.peer_template.options.connection_timeout = Some(config.timeout);
    check.peer_template.options.read_timeout = Some(config.timeout);
    check.consecutive_success = config.healthy_threshold.max(1) as usize;
    check.consecutive_failure = config.unhealthy_threshold.max(1) as usize;
    check.validator = Some(Box::new(|resp| {
        if resp.status.is_success() || resp.status.is_redirection() {
            Ok(())
        } else {
            Error::e_explain(ErrorType::CustomCode("unhealthy status", resp.status.as_u16()), "health check")
        }
    }));
    check.health_changed_callback = Some(Box::new(HealthLogger { upstream: upstream.to_owned() }));
    Box::new(check)
}

struct HealthLogger {
    upstream: String,
}

#[async_trait]
impl HealthObserve for HealthLogger {
    async fn observe(&self, target: &Backend, healthy: bool) {
        if healthy {
            tracing::info!(upstream = %self.upstream, target = %target.addr, "upstream target is healthy again");
        } else {
            tracing::warn!(upstream = %self.upstream, target = %target.addr, "upstream target failed its health check");
        }
    }
}

/// `host` of `host:port`, also for `[v6]:port`.
fn host_part(target: &str) -> &str {
    let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_metrics() -> UpstreamMetrics {
        crate::metrics::Metrics::new().unwrap().upstream("api")
    }

    fn config(targets: &[&str]) -> UpstreamConfig {
        UpstreamConfig {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            tls: None,
            health_check: None,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn round_robin_visits_every_target() {
        let upstream = Upstream::build("api", &config(&["127.0.0.1:9001", "127.0.0.1:9002"]), test_metrics()).unwrap();
        let picks: Vec<String> = (0..4).map(|_| upstream.select().unwrap().addr.to_string()).collect();
        assert!(picks.contains(&"127.0.0.1:9001".to_string()));
        assert!(picks.contains(&"127.0.0.1:9002".to_string()));
        assert_ne!(picks[0], picks[1]);
    }

    #[test]
    fn peers_carry_the_configured_timeouts() {
        let upstream = Upstream::build("api", &config(&["127.0.0.1:9001"]), test_metrics()).unwrap();
        let peer = upstream.peer(&upstream.select().unwrap()).unwrap();
        assert_eq!(peer.options.connection_timeout, Some(Duration::from_secs(1)));
        assert_eq!(peer.options.read_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn unresolvable_targets_are_reported() {
        let result = Upstream::build("api", &config(&["no-such-host.invalid:80"]), test_metrics());
        assert!(matches!(result, Err(UpstreamBuildError::Unresolvable { .. })));
    }

    #[test]
    fn host_part_strips_ports_and_brackets() {
        assert_eq!(host_part("orders.internal:8000"), "orders.internal");
        assert_eq!(host_part("[::1]:8000"), "::1");
    }
}
