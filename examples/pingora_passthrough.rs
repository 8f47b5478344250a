//! Pingora with nothing of keygate in it: every request goes to one upstream
//! unchanged. `load-tests/` runs it beside keygate as the floor of what a proxy
//! built on Pingora costs per request on the same machine (same Pingora version,
//! allocator, release profile and one worker thread as keygate).
//!
//! `cargo run --release --example pingora_passthrough -- [--upstream-timeouts] 127.0.0.1:18105 127.0.0.1:18100 [THREADS]`
//! (worker threads, 1 unless given: keygate's `threads` in the same run). With
//! `--upstream-timeouts` the peer has the timeouts of the load test's keygate config
//! (connect 2 s, read and write 30 s, idle 60 s): what those cost Pingora alone.

use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Passthrough {
    /// Built once and cloned per request, as keygate does with its targets' peers.
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let upstream_timeouts = args.next_if(|arg| arg == "--upstream-timeouts").is_some();
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: pingora_passthrough [--upstream-timeouts] LISTEN_ADDR UPSTREAM_ADDR [THREADS]");
        std::process::exit(2);
    };
    let Ok(upstream) = upstream.parse::<std::net::SocketAddr>() else {
        eprintln!("{upstream} is not an IP address and port");
        std::process::exit(2);
    };
    let threads = match args.next().map(|t| t.parse::<usize>()) {
        None => 1,
        Some(Ok(threads)) if threads > 0 => threads,
        Some(_) => {
            eprintln!("THREADS must be a whole number above 0");
            std::process::exit(2);
        }
    };
    let conf = pingora::server::configuration::ServerConf { threads, ..Default::default() };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut peer = HttpPeer::new(upstream, false, String::new());
    if upstream_timeouts {
        peer.options.connection_timeout = Some(Duration::from_secs(2));
        peer.options.read_timeout = Some(Duration::from_secs(30));
        peer.options.write_timeout = Some(Duration::from_secs(30));
        peer.options.idle_timeout = Some(Duration::from_secs(60));
    }
    let mut proxy = http_proxy_service(&server.configuration, Passthrough { peer });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
