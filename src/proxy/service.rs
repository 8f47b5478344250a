//! The proxy as a Pingora listening service, with a gentler stop.
//!
//! When Pingora stops accepting (SIGTERM, or the end of an upgrade's hand-over)
//! it at once closes every connection that is waiting for a request, including
//! one accepted an instant earlier whose request is still on its way: that
//! client sees its connection closed unanswered. This service lets such
//! connections linger a moment first, so what arrives is answered (with
//! `Connection: close`, as Pingora does for every request after the stop), and
//! counts open connections so that the node ends only once they are gone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;

use super::{DataPlane, Gateway};

/// How long connections waiting for a request stay open after accepting stops.
/// A client that connected just before sends its request well within it.
pub const STOP_LINGER: Duration = Duration::from_secs(1);

pub struct ProxyService {
    proxy: Arc<HttpProxy<Gateway>>,
    plane: Arc<DataPlane>,
    linger: Duration,
}

impl ProxyService {
    /// A listening service named `name` for `gateway`; add listeners to it.
    /// `linger` is capped by the caller at the shutdown timeout.
    pub fn build(conf: &Arc<ServerConf>, gateway: Gateway, linger: Duration, name: &str) -> Service<ProxyService> {
        let plane = Arc::clone(&gateway.plane);
        let proxy = Arc::new(pingora::proxy::http_proxy(conf, gateway));
        Service::new(name.to_owned(), ProxyService { proxy, plane, linger })
    }
}

#[async_trait]
impl ServerApp for ProxyService {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let _open = OpenConnection::enter(&self.plane.connections);
        self.proxy.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        tokio::time::sleep(self.linger).await;
        self.proxy.cleanup().await;
    }
}

/// Counts a connection as open until dropped, however its handling ends.
struct OpenConnection<'a>(&'a AtomicUsize);

impl<'a> OpenConnection<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        OpenConnection(count)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_counts_until_its_handling_ends_even_by_panic() {
        let count = AtomicUsize::new(0);
        {
            let _a = OpenConnection::enter(&count);
            let _b = OpenConnection::enter(&count);
            assert_eq!(count.load(Ordering::Acquire), 2);
        }
        assert_eq!(count.load(Ordering::Acquire), 0);
        let unwound = std::panic::catch_unwind(|| {
            let _c = OpenConnection::enter(&count);
            panic!("handler failed");
        });
        assert!(unwound.is_err());
        assert_eq!(count.load(Ordering::Acquire), 0);
    }
}
