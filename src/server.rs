//! Running a node: builds Pingora's server from keygate's validated config.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use tokio::signal::unix::{signal, SignalKind};

use crate::access_log::AccessLog;
use crate::config::{Config, KeySource, Mode};
use crate::index::KeyIndex;
use crate::proxy::{Gateway, GatewayState};
use crate::sync::KeysFileSource;

/// How often upstream health schedules are looked at; each upstream keeps its own interval.
const HEALTH_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// `keygate serve`: blocks until the node is shut down by a signal.
pub fn serve(config_path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let config = crate::config::load(config_path).map_err(|errors| {
        anyhow::anyhow!("{errors}")
            .context(format!("{} is not a valid config", config_path.display()))
    })?;
    if config.mode != Mode::Gateway {
        bail!(
            "mode {} needs the control plane (admin API and store), which this build does not include; \
             run with `mode: gateway` and `keys.source: file`",
            config.mode.as_str()
        );
    }
    if let Some(listener) = config.listeners.iter().find(|l| l.tls.is_some()) {
        bail!(
            "listener {}: TLS termination is not available in this build; use a plain listener",
            listener.address
        );
    }
    if config
        .upstreams
        .values()
        .any(|u| u.tls.as_ref().is_some_and(|t| t.ca.is_some()))
    {
        bail!("upstreams[].tls.ca (a custom CA) is not available in this build");
    }

    let keys = Arc::new(KeyIndex::default());
    let keys_file = match (config.keys.source, &config.keys.file) {
        (KeySource::File, Some(path)) => Arc::new(KeysFileSource::new(
            path.clone(),
            config.plans.clone(),
            Arc::clone(&keys),
        )),
        _ => bail!("this build serves keys only from a keys file (`keys.source: file`)"),
    };
    let loaded = keys_file.reload().context("the keys file is not valid")?;
    tracing::info!(keys = loaded, "keys loaded");

    let state = Arc::new(ArcSwap::from_pointee(GatewayState::build(&config)?));

    let opt = Opt {
        upgrade,
        daemon: false,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config));
    server.bootstrap();

    let access_log =
        Arc::new(AccessLog::start(&config.access_log).context("cannot open the access log")?);
    let gateway = Gateway::new(
        Arc::clone(&state),
        Arc::clone(&keys),
        Arc::clone(&access_log),
    );
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        gateway,
        "keygate proxy",
    );
    for listener in &config.listeners {
        proxy.add_tcp(&listener.address.to_string());
    }
    server.add_service(proxy);
    server.add_service(background_service(
        "keygate maintenance",
        Maintenance { state, keys_file },
    ));

    tracing::info!(
        mode = config.mode.as_str(),
        listeners = ?config.listeners.iter().map(|l| l.address).collect::<Vec<_>>(),
        routes = config.routes.len(),
        "keygate serving"
    );
    server.run(RunArgs::default());
    access_log.flush(std::time::Duration::from_secs(5));
    tracing::info!("keygate stopped");
    Ok(())
}

/// Pingora's own settings, derived from keygate's config rather than read from a file.
fn server_conf(config: &Config) -> ServerConf {
    let port = config.listeners.first().map_or(0, |l| l.address.port());
    let runtime_file = |suffix: &str| {
        std::env::temp_dir()
            .join(format!("keygate-{}-{port}.{suffix}", config.node_id))
            .display()
            .to_string()
    };
    ServerConf {
        threads: config.threads,
        daemon: false,
        error_log: None,
        // Pingora's defaults wait five minutes before exiting on SIGTERM.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(10),
        upgrade_sock: runtime_file("upgrade.sock"),
        pid_file: runtime_file("pid"),
        ..ServerConf::default()
    }
}

/// Work beside the request path: keys file watching, health checks, SIGHUP.
struct Maintenance {
    state: Arc<ArcSwap<GatewayState>>,
    keys_file: Arc<KeysFileSource>,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, shutdown: ShutdownWatch) {
        let keys_file = Arc::clone(&self.keys_file);
        let watch_shutdown = shutdown.clone();
        tokio::spawn(async move { keys_file.watch(watch_shutdown).await });

        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by editing the keys file");
                None
            }
        };
        let mut shutdown = shutdown;
        let mut tick = tokio::time::interval(HEALTH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Checks run in their own tasks so a slow target never delays another upstream.
                    let now = std::time::Instant::now();
                    for upstream in self.state.load().upstreams.iter().filter(|u| u.health_check_due(now)) {
                        let upstream = Arc::clone(upstream);
                        tokio::spawn(async move { upstream.run_health_check().await });
                    }
                }
                Some(()) = async { match hangup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading the keys file");
                    self.keys_file.request_reload();
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}
