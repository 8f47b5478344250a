//! The proxy as a Pingora listening service, with a gentler stop.
//!
//! When Pingora stops accepting (SIGTERM, or the end of an upgrade's hand-over)
//! it at once closes every connection that is waiting for a request, including
//! one accepted an instant earlier whose request is still on its way: that
//! client sees its connection closed unanswered. This service lets such
//! connections linger a moment first, so what arrives is answered (with
//! `Connection: close`, as Pingora does for every request after the stop), and
//! counts open connections so that the node ends only once they are gone.
//!
//! It also bounds what a client connection may hold: at most
//! `http.max_connections` are open (past it, new ones are closed at the accept),
//! and each HTTP/1 connection runs through a [`GuardedStream`] with its deadlines.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::ConnectionFilter;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use prometheus::IntGauge;

use super::connection::{ConnectionClock, ConnectionLimits, GuardedStream};
use super::stop::{StopSignal, StopWatch};
use super::{DataPlane, Gateway};

/// How long connections waiting for a request stay open after accepting stops.
/// A client that connected just before sends its request well within it.
pub const STOP_LINGER: Duration = Duration::from_secs(1);

pub struct ProxyService {
    proxy: Arc<HttpProxy<Gateway>>,
    plane: Arc<DataPlane>,
    linger: Duration,
    /// Given when connections waiting for a request are to close.
    stop: StopSignal,
}

impl ProxyService {
    /// A listening service named `name` for `gateway`; add listeners to it.
    /// `linger` is capped by the caller at the shutdown timeout.
    pub fn build(conf: &Arc<ServerConf>, gateway: Gateway, linger: Duration, name: &str) -> Service<ProxyService> {
        let plane = Arc::clone(&gateway.plane);
        let mut proxy = pingora::proxy::http_proxy(conf, gateway);
        // HTTP/2 connections are Pingora's to time: one idle with no stream open is closed.
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2_idle_timeout = Some(plane.state.load().http.idle_timeout);
        proxy.server_options = Some(options);
        let mut service = Service::new(
            name.to_owned(),
            ProxyService { proxy: Arc::new(proxy), plane: Arc::clone(&plane), linger, stop: StopSignal::default() },
        );
        // Refuses over the limit before a TLS handshake is spent on the connection.
        service.set_connection_filter(Arc::new(ConnectionCap { plane }));
        service
    }

    /// Serves HTTP/1 requests one after another on `stream`: Pingora's own loop,
    /// with the connection's clock re-armed between requests, and each wait for a
    /// request's first byte spent without a Pingora session (which, with the
    /// proxy's state machine, is most of what a connection costs).
    async fn serve_http1(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) {
        let http = self.plane.state.load().http;
        let accepted = Instant::now();
        let clock = Arc::new(ConnectionClock::new());
        let limits =
            ConnectionLimits { request_header_timeout: http.request_header_timeout, idle_timeout: http.idle_timeout };
        let header_timeouts = &self.plane.metrics.connections_refused_header_timeout;
        let guarded = GuardedStream::new(stream, Arc::clone(&clock), limits, header_timeouts.clone(), accepted);
        let mut stream: Stream = Box::new(guarded);
        let mut settings = None;
        // Enlisted once for the connection's whole life, not per request.
        let stop = self.stop.watch();
        loop {
            if !first_byte(&mut stream, &stop).await {
                return;
            }
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(settings) => HttpPersistentSettings::apply_to_session(settings, &mut session),
                // Pingora's per-read keep-alive timeout stays out of the way of ours.
                None => session.set_keepalive(
                    (!*shutdown.borrow()).then_some(http.idle_timeout.max(http.request_header_timeout).as_secs() + 1),
                ),
            }
            let Some(reused) = self.proxy.process_new_http(session, shutdown).await else {
                return;
            };
            (stream, settings) = reused.consume();
            clock.await_request();
        }
    }
}

/// Waits until a request's first byte has arrived (true), or the client is gone,
/// the connection's deadline passed or the service stops (false).
async fn first_byte(stream: &mut Stream, stop: &StopWatch<'_>) -> bool {
    if stop.is_stopped() {
        return false;
    }
    let mut byte = [0u8; 1];
    // The byte first: when it is there already, the stop's waker is not even registered.
    tokio::select! {
        biased;
        peeked = stream.try_peek(&mut byte) => peeked.is_ok(),
        () = stop.stopped() => false,
    }
}

#[async_trait]
impl ServerApp for ProxyService {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let max = self.plane.state.load().http.max_connections;
        let Some(_open) = OpenConnection::enter(&self.plane.connections, max, &self.plane.metrics.connections_open)
        else {
            self.plane.metrics.connections_refused_max.inc();
            return None;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.proxy.process_new(stream, shutdown).await;
        }
        self.serve_http1(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        tokio::time::sleep(self.linger).await;
        self.stop.stop();
        self.proxy.cleanup().await;
    }
}

/// Drops connections over `http.max_connections` at the accept.
struct ConnectionCap {
    plane: Arc<DataPlane>,
}

impl std::fmt::Debug for ConnectionCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCap").finish_non_exhaustive()
    }
}

#[async_trait]
impl ConnectionFilter for ConnectionCap {
    async fn should_accept(&self, _addr: Option<&SocketAddr>) -> bool {
        let accept = self.plane.connections.load(Ordering::Acquire) < self.plane.state.load().http.max_connections;
        if !accept {
            self.plane.metrics.connections_refused_max.inc();
        }
        accept
    }
}

/// Counts a connection as open until dropped, however its handling ends.
struct OpenConnection<'a> {
    count: &'a AtomicUsize,
    gauge: &'a IntGauge,
}

impl<'a> OpenConnection<'a> {
    /// `None` when `max` connections are open already.
    fn enter(count: &'a AtomicUsize, max: usize, gauge: &'a IntGauge) -> Option<Self> {
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        gauge.inc();
        Some(OpenConnection { count, gauge })
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_counts_until_its_handling_ends_even_by_panic() {
        let count = AtomicUsize::new(0);
        let gauge = IntGauge::new("open", "open").unwrap();
        {
            let _a = OpenConnection::enter(&count, 10, &gauge);
            let _b = OpenConnection::enter(&count, 10, &gauge);
            assert_eq!(count.load(Ordering::Acquire), 2);
            assert_eq!(gauge.get(), 2);
        }
        assert_eq!(count.load(Ordering::Acquire), 0);
        let unwound = std::panic::catch_unwind(|| {
            let _c = OpenConnection::enter(&count, 10, &gauge);
            panic!("handler failed");
        });
        assert!(unwound.is_err());
        assert_eq!(count.load(Ordering::Acquire), 0);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn connections_past_the_maximum_are_not_entered() {
        let count = AtomicUsize::new(0);
        let gauge = IntGauge::new("open", "open").unwrap();
        let a = OpenConnection::enter(&count, 2, &gauge);
        let b = OpenConnection::enter(&count, 2, &gauge);
        assert!(a.is_some() && b.is_some());
        assert!(OpenConnection::enter(&count, 2, &gauge).is_none());
        assert_eq!((count.load(Ordering::Acquire), gauge.get()), (2, 2));
        drop(a);
        assert!(OpenConnection::enter(&count, 2, &gauge).is_some());
    }
}
