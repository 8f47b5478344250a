//! Running a node: builds Pingora's server from keygate's validated config.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use time::OffsetDateTime;
use tokio::signal::unix::{signal, SignalKind};

use crate::access_log::AccessLog;
use crate::admin::{ops_router, OpsState};
use crate::config::{Config, KeySource, Mode, SinkConfig};
use crate::index::KeyIndex;
use crate::limit::{QuotaCounters, RateLimiters};
use crate::metrics::Metrics;
use crate::proxy::{DataPlane, Gateway, GatewayState};
use crate::sync::KeysFileSource;
use crate::usage::{FileSink, Flusher, FlusherHandle, UsageCounters, UsageSink};

/// How often upstream health schedules are looked at; each upstream keeps its own interval.
const HEALTH_TICK: Duration = Duration::from_millis(250);
/// How often idle limiter and quota state is dropped.
const EVICT_EVERY: Duration = Duration::from_secs(30);
/// On SIGTERM, requests in flight get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Then usage gets this long to reach its sinks.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// `keygate serve`: blocks until the node is shut down by a signal.
pub fn serve(config_path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let config = crate::config::load(config_path).map_err(|errors| {
        anyhow::anyhow!("{errors}").context(format!("{} is not a valid config", config_path.display()))
    })?;
    refuse_unavailable(&config)?;
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);

    let keys = Arc::new(KeyIndex::default());
    let keys_file = match (config.keys.source, &config.keys.file) {
        (KeySource::File, Some(path)) => {
            Arc::new(KeysFileSource::new(path.clone(), config.plans.clone(), Arc::clone(&keys), Arc::clone(&metrics)))
        }
        _ => bail!("this build serves keys only from a keys file (`keys.source: file`)"),
    };
    let loaded = keys_file.reload().context("the keys file is not valid")?;
    tracing::info!(keys = loaded, "keys loaded");

    let admin_listener = std::net::TcpListener::bind(config.admin.address)
        .with_context(|| format!("cannot listen on the admin address {}", config.admin.address))?;
    let plane = Arc::new(DataPlane {
        state: ArcSwap::from_pointee(GatewayState::build(&config, &metrics)?),
        keys: Arc::clone(&keys),
        rates: RateLimiters::new(),
        quotas: QuotaCounters::new(),
        usage: Arc::new(UsageCounters::new()),
        access_log: AccessLog::start(&config.access_log, metrics.access_log_dropped.clone())
            .context("cannot open the access log")?,
        metrics: Arc::clone(&metrics),
        in_flight: AtomicUsize::new(0),
    });

    let opt = Opt { upgrade, daemon: false, nocapture: false, test: false, conf: None };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config));
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(Arc::clone(&plane)),
        "keygate proxy",
    );
    for listener in &config.listeners {
        proxy.add_tcp(&listener.address.to_string());
    }
    server.add_service(proxy);
    let maintenance = Maintenance {
        plane,
        keys_file,
        admin_listener: std::sync::Mutex::new(Some(admin_listener)),
        sinks: usage_sinks(&config)?,
        node_id: config.node_id.clone(),
        flush_interval: config.usage.flush_interval,
    };
    server.add_service(background_service("keygate maintenance", maintenance));

    tracing::info!(
        mode = config.mode.as_str(),
        listeners = ?config.listeners.iter().map(|l| l.address).collect::<Vec<_>>(),
        admin = %config.admin.address,
        routes = config.routes.len(),
        "keygate serving"
    );
    server.run(RunArgs { shutdown_signal: Box::new(GracefulOnInterrupt) });
    Ok(())
}

/// Parts of the contract this build does not serve yet are refused up front
/// rather than ignored.
fn refuse_unavailable(config: &Config) -> anyhow::Result<()> {
    if config.mode != Mode::Gateway {
        bail!(
            "mode {} needs the control plane (admin API and store), which this build does not include; \
             run with `mode: gateway` and `keys.source: file`",
            config.mode.as_str()
        );
    }
    if let Some(listener) = config.listeners.iter().find(|l| l.tls.is_some()) {
        bail!("listener {}: TLS termination is not available in this build; use a plain listener", listener.address);
    }
    if config.upstreams.values().any(|u| u.tls.as_ref().is_some_and(|t| t.ca.is_some())) {
        bail!("upstreams[].tls.ca (a custom CA) is not available in this build");
    }
    Ok(())
}

fn usage_sinks(config: &Config) -> anyhow::Result<Vec<Arc<dyn UsageSink>>> {
    config
        .usage
        .sinks
        .iter()
        .map(|sink| match sink {
            SinkConfig::File { path } => {
                // Created once at start; a directory that vanishes later is an outage, retried.
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create the usage directory {}", dir.display()))?;
                }
                Ok(Arc::new(FileSink::new(path.clone())) as Arc<dyn UsageSink>)
            }
            SinkConfig::Store | SinkConfig::ControlPlane => {
                bail!("usage sinks of type store and control_plane need the control plane, which this build does not include")
            }
        })
        .collect()
}

/// Pingora's own settings, derived from keygate's config rather than read from a file.
fn server_conf(config: &Config) -> ServerConf {
    let port = config.listeners.first().map_or(0, |l| l.address.port());
    let runtime_file = |suffix: &str| {
        std::env::temp_dir().join(format!("keygate-{}-{port}.{suffix}", config.node_id)).display().to_string()
    };
    ServerConf {
        threads: config.threads,
        daemon: false,
        error_log: None,
        // The maintenance service ends the process as soon as requests have drained and
        // usage is flushed; this is only the upper bound Pingora waits before stopping
        // its runtimes.
        grace_period_seconds: Some((DRAIN_TIMEOUT + FINAL_FLUSH_TIMEOUT).as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: runtime_file("upgrade.sock"),
        pid_file: runtime_file("pid"),
        ..ServerConf::default()
    }
}

/// SIGTERM and SIGINT both drain and flush (Pingora treats SIGINT as a fast exit);
/// SIGQUIT hands the sockets to a new process.
struct GracefulOnInterrupt;

#[async_trait]
impl ShutdownSignalWatch for GracefulOnInterrupt {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) =
            (signal(SignalKind::quit()), signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::GracefulTerminate,
        }
    }
}

/// Work beside the request path: keys file watching, health checks, usage,
/// the admin address, SIGHUP, and the end of a graceful shutdown.
struct Maintenance {
    plane: Arc<DataPlane>,
    keys_file: Arc<KeysFileSource>,
    /// Bound before Pingora starts so a busy port fails the start; taken once.
    admin_listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    sinks: Vec<Arc<dyn UsageSink>>,
    node_id: String,
    flush_interval: Duration,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let keys_file = Arc::clone(&self.keys_file);
        let watch_shutdown = shutdown.clone();
        tokio::spawn(async move { keys_file.watch(watch_shutdown).await });
        self.start_admin(shutdown.clone());
        let flusher = Flusher::new(
            Arc::clone(&self.plane.usage),
            self.sinks.clone(),
            self.node_id.clone(),
            self.flush_interval,
            Arc::clone(&self.plane.metrics),
        )
        .spawn();

        let mut hangup = signal(SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by editing the keys file"))
            .ok();
        let mut health_tick = tokio::time::interval(HEALTH_TICK);
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut evict_tick = tokio::time::interval(EVICT_EVERY);
        evict_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = health_tick.tick() => self.run_due_health_checks(),
                _ = evict_tick.tick() => {
                    self.plane.rates.evict_idle();
                    self.plane.quotas.evict_finished(OffsetDateTime::now_utc());
                }
                Some(()) = async { match hangup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading the keys file");
                    self.keys_file.request_reload();
                }
                _ = shutdown.changed() => break,
            }
        }
        self.finish(&flusher).await;
    }
}

impl Maintenance {
    fn start_admin(&self, mut shutdown: ShutdownWatch) {
        let listener = self.admin_listener.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let Some(listener) = listener else { return };
        let router =
            ops_router(OpsState { keys: Arc::clone(&self.plane.keys), metrics: Arc::clone(&self.plane.metrics) });
        tokio::spawn(async move {
            let stop = async move {
                let _ = shutdown.changed().await;
            };
            if let Err(e) = crate::admin::serve(listener, router, stop).await {
                tracing::error!(error = %e, "the admin server stopped");
            }
        });
    }

    fn run_due_health_checks(&self) {
        // Checks run in their own tasks so a slow target never delays another upstream.
        let now = Instant::now();
        for upstream in self.plane.state.load().upstreams.iter().filter(|u| u.health_check_due(now)) {
            let upstream = Arc::clone(upstream);
            tokio::spawn(async move { upstream.run_health_check().await });
        }
    }

    /// Pingora has stopped accepting; wait for requests in flight, flush usage and
    /// the access log, and end the process rather than sit out the grace period.
    async fn finish(&self, flusher: &FlusherHandle) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.plane.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let unfinished = self.plane.in_flight.load(Ordering::Acquire);
        if unfinished > 0 {
            tracing::warn!(requests = unfinished, "requests still in flight after {DRAIN_TIMEOUT:?}; stopping anyway");
        }
        flusher.flush_and_stop(FINAL_FLUSH_TIMEOUT).await;
        self.plane.access_log.flush(Duration::from_secs(2));
        tracing::info!("keygate stopped");
        std::process::exit(0);
    }
}
