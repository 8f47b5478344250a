//! Upstream pools: round-robin over targets, active health checks, peers with timeouts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
use crate::metrics::sharded::Slots;
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
    /// Runs the health checks; requests pick from `targets` without it, which saves
    /// a hashed health lookup and building a peer on every request.
    balancer: LoadBalancer<RoundRobin>,
    targets: Arc<[Target]>,
    next: Slots<AtomicUsize>,
    health_check: Option<HealthSchedule>,
    pub metrics: UpstreamMetrics,
}

/// One address of an upstream, with the peer every request to it starts from.
pub struct Target {
    pub addr: SocketAddr,
    peer: HttpPeer,
    /// Kept current by the health checks' change callback; targets start healthy.
    healthy: AtomicBool,
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
        let targets: Arc<[Target]> = addrs
            .iter()
            .map(|&addr| Target {
                addr,
                peer: peer_template(addr, tls.as_ref(), config),
                healthy: AtomicBool::new(true),
            })
            .collect();
        let health_check = config.health_check.as_ref().map(|hc| {
            let host = tls.as_ref().map_or_else(|| host_part(&config.targets[0]).to_owned(), |t| t.sni.clone());
            let observer = HealthObserver { upstream: name.to_owned(), targets: Arc::clone(&targets) };
            balancer.set_health_check(http_health_check(observer, &host, tls.as_ref(), hc));
            HealthSchedule { interval: hc.interval, next_due: Mutex::new(Instant::now()) }
        });
        Ok(Upstream { name: name.to_owned(), balancer, targets, next: Slots::default(), health_check, metrics })
    }

    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// The next healthy target in round-robin order.
    pub fn select(&self) -> Option<&Target> {
        let count = self.targets.len();
        // A lone target needs no turn taken; with several, each thread keeps its own
        // turn so cores do not all write one counter.
        let start = if count > 1 { self.next.local().fetch_add(1, Ordering::Relaxed) } else { 0 };
        (0..count).map(|i| &self.targets[(start + i) % count]).find(|t| t.healthy.load(Ordering::Relaxed))
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

impl Target {
    /// A peer for one request; cloning the template costs no allocation for plain HTTP.
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }
}

fn peer_template(addr: SocketAddr, tls: Option<&UpstreamTls>, config: &UpstreamConfig) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, tls.is_some(), tls.map(|t| t.sni.clone()).unwrap_or_default());
    if let Some(tls) = tls {
        apply_tls(&mut peer, tls);
    }
    peer.options.connection_timeout = Some(config.connect_timeout);
    peer.options.read_timeout = Some(config.read_timeout);
    peer.options.write_timeout = Some(config.read_timeout);
    peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
    peer
}

fn apply_tls(peer: &mut HttpPeer, tls: &UpstreamTls) {
    peer.options.verify_cert = tls.verify;
    peer.options.verify_hostname = tls.verify;
    peer.options.ca = tls.ca.clone();
}

fn http_health_check(
    observer: HealthObserver,
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
    check.health_changed_callback = Some(Box::new(observer));
    Box::new(check)
}

/// Marks targets up and down as their health checks change, and says so in the log.
struct HealthObserver {
    upstream: String,
    targets: Arc<[Target]>,
}

#[async_trait]
impl HealthObserve for HealthObserver {
    async fn observe(&self, target: &Backend, healthy: bool) {
        let addr = target.addr.as_inet().copied();
        for t in self.targets.iter().filter(|t| Some(t.addr) == addr) {
            t.healthy.store(healthy, Ordering::Relaxed);
        }
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
        let peer = upstream.select().unwrap().peer();
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
