//! Running a node: builds Pingora's server from keygate's validated config.
//!
//! One file, one job: the wiring of a node. `serve` builds what must exist before
//! Pingora starts (listeners, the data plane); `Maintenance` starts every
//! background component in one order, stops them on Pingora's shutdown signal
//! and ends the process. Each component lives in its own module; only how they
//! are put together is here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use time::OffsetDateTime;
use tokio::signal::unix::{signal, SignalKind};

use crate::access_log::AccessLog;
use crate::admin::{ops_router, OpsState, Readiness};
use crate::config::{Config, FleetEngine, FleetLimitsConfig, KeySource, Mode, SinkConfig, TokenConfig};
use crate::control::api::ApiState;
use crate::control::feed::Feed;
use crate::control::retention::{self, UsageCompactor};
use crate::control::store::Store;
use crate::control::store_sink::StoreSink;
use crate::control::webhooks::{Plans, Webhooks};
use crate::index::KeyIndex;
use crate::limit::fleet::{FleetSync, FleetSyncTask, RedisEngine};
use crate::limit::KeyStates;
use crate::metrics::Metrics;
use crate::proxy::tls::{load_certified_key, ListenerCertificate};
use crate::proxy::{DataPlane, Gateway, GatewayState, ProxyService, STOP_LINGER};
use crate::sync::{
    ControlPlaneEngine, Follower, Freshness, KeyFeed, KeysFileSource, LastSync, LocalFeed, QuotaSeedSource, RemoteFeed,
};
use crate::usage::{
    ControlPlaneSink, FileSink, Flusher, FlusherHandle, HttpSink, KeyOwners, NamedSink, NatsSink, UsageCounters,
    UsageSink,
};

/// How long a starting gateway waits for its first key snapshot before trying the cache file.
const SYNC_START_TIMEOUT: Duration = Duration::from_secs(5);
/// How often upstream health schedules are looked at; each upstream keeps its own interval.
const HEALTH_TICK: Duration = Duration::from_millis(250);
/// How often idle limiter and quota state is dropped.
const EVICT_EVERY: Duration = Duration::from_secs(30);
/// Read buffers under each client connection. Pingora's default of 64 KiB is most
/// of what an idle connection costs. Request heads are read into Pingora's own
/// buffer and bodies in large reads, which bypass this one, so plain HTTP loses
/// nothing with a small one; under TLS it holds whole records (up to 16 KiB).
const PLAIN_READ_BUFFER: usize = 4 * 1024;
const TLS_READ_BUFFER: usize = 16 * 1024 + 512;
/// Then usage gets this long to reach its sinks.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// A stop waits this long before it looks for open connections: a connection
/// accepted in the last instant is counted only once its task has started.
const SETTLE_BEFORE_DRAIN: Duration = Duration::from_millis(50);

/// `keygate serve`: blocks until the node is shut down by a signal.
pub fn serve(config_path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let config = crate::config::load(config_path).map_err(|errors| {
        anyhow::anyhow!("{errors}").context(format!("{} is not a valid config", config_path.display()))
    })?;
    let certificates = listener_certificates(&config)?;
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);

    let keys = Arc::new(KeyIndex::default());
    let key_source = match config.keys.source {
        KeySource::File => {
            let Some(path) = &config.keys.file else { bail!("keys.source is file but keys.file is missing") };
            let source =
                KeysFileSource::new(path.clone(), config.plans.clone(), Arc::clone(&keys), Arc::clone(&metrics));
            let loaded = source.reload().context("the keys file is not valid")?;
            tracing::info!(keys = loaded, "keys loaded");
            KeySourcePlan::File(Arc::new(source))
        }
        KeySource::ControlPlane => {
            let Some(remote) = &config.keys.control_plane else {
                bail!("keys.source is control_plane but keys.control_plane is missing")
            };
            KeySourcePlan::Remote { url: remote.url.clone(), token: remote.token.clone() }
        }
        KeySource::Store => KeySourcePlan::Store,
    };
    let last_sync = Arc::new(LastSync::new());
    let freshness = (!config.keys.max_staleness.is_zero() && !matches!(key_source, KeySourcePlan::File(_)))
        .then(|| Freshness { last_success: Arc::clone(&last_sync), max_staleness: config.keys.max_staleness });
    let store_url = matches!(config.mode, Mode::Standalone | Mode::ControlPlane).then(|| config.store.url.clone());
    if let Some(url) = &store_url {
        preflight_store(url)?;
    }

    let admin_listener = crate::admin::bind(config.admin.address)
        .with_context(|| format!("cannot listen on the admin address {}", config.admin.address))?;
    let fleet_limits = config.fleet_limits.clone().filter(|_| config.mode != Mode::ControlPlane);
    let states = Arc::new(match fleet_limits {
        Some(_) => KeyStates::for_fleet(),
        None => KeyStates::new(),
    });
    let access_log = AccessLog::start(&config.access_log, metrics.access_log_dropped.clone())
        .context("cannot open the access log")?;
    let plane = Arc::new(DataPlane::new(
        GatewayState::build(&config, &metrics)?,
        Arc::clone(&keys),
        Arc::clone(&states),
        access_log,
        Arc::clone(&metrics),
        freshness,
    ));

    let opt = Opt { upgrade, daemon: false, nocapture: false, test: false, conf: None };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config));
    server.bootstrap();

    if config.mode != Mode::ControlPlane {
        let mut proxy = ProxyService::build(
            &server.configuration,
            Gateway::new(Arc::clone(&plane)),
            STOP_LINGER.min(config.shutdown_timeout),
            "keygate proxy",
        );
        for (listener, certificate) in config.listeners.iter().zip(&certificates) {
            let endpoint = ListenerConfig::tcp(listener.address.to_string());
            let endpoint = match certificate {
                Some(certificate) => {
                    let settings =
                        certificate.settings().map_err(|e| anyhow::anyhow!("listener {}: {e}", listener.address))?;
                    endpoint.tls(settings).l4_buffer(L4BufferSettings::default().read(TLS_READ_BUFFER))
                }
                None => endpoint.l4_buffer(L4BufferSettings::default().read(PLAIN_READ_BUFFER)),
            };
            proxy.add_listener(endpoint);
        }
        server.add_service(proxy);
    }
    let maintenance = Maintenance {
        parts: NodeParts { mode: config.mode, node_id: config.node_id.clone(), plane, keys, states, metrics },
        keys: KeySync { source: key_source, last_sync, cache_file: config.keys.cache_file.clone() },
        store_url,
        admin: AdminSettings {
            listener: std::sync::Mutex::new(Some(admin_listener)),
            admin_tokens: config.admin.tokens.clone(),
            sync_tokens: config.admin.sync_tokens.clone(),
            plans: config.plans.keys().cloned().collect(),
        },
        usage: UsageSettings {
            sinks: config.usage.sinks.clone(),
            flush_interval: config.usage.flush_interval,
            spool: config.usage.spool.clone(),
        },
        fleet_limits,
        drain_timeout: config.shutdown_timeout,
        config: ConfigFile {
            path: config_path.to_owned(),
            certificates: config
                .listeners
                .iter()
                .zip(&certificates)
                .filter_map(|(listener, certificate)| certificate.clone().map(|c| (listener.address, c)))
                .collect(),
            applied: std::sync::Mutex::new(config.clone()),
        },
    };
    server.add_service(background_service("keygate maintenance", maintenance));

    if config.mode == Mode::ControlPlane {
        tracing::info!(mode = config.mode.as_str(), admin = %config.admin.address, "keygate serving");
    } else {
        tracing::info!(
            mode = config.mode.as_str(),
            listeners = ?config.listeners.iter().map(|l| l.address).collect::<Vec<_>>(),
            admin = %config.admin.address,
            routes = config.routes.len(),
            "keygate serving"
        );
    }
    server.run(RunArgs { shutdown_signal: Box::new(GracefulOnInterrupt) });
    Ok(())
}

/// The certificate of each TLS listener, loaded and checked before Pingora starts
/// (Pingora's own loader panics on a bad file).
fn listener_certificates(config: &Config) -> anyhow::Result<Vec<Option<Arc<ListenerCertificate>>>> {
    config
        .listeners
        .iter()
        .map(|listener| {
            listener
                .tls
                .as_ref()
                .map(|tls| {
                    ListenerCertificate::load(&tls.cert, &tls.key)
                        .map(Arc::new)
                        .with_context(|| format!("listener {}", listener.address))
                })
                .transpose()
        })
        .collect()
}

/// Connects once before Pingora starts, so an unreachable database or a failed
/// migration stops the start with a clear error instead of a half-running node.
fn preflight_store(url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let store = Store::connect(url).await.with_context(|| format!("cannot open the store {}", redact_url(url)))?;
        store.close().await;
        Ok(())
    })
}

/// A store URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
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
        grace_period_seconds: Some((config.shutdown_timeout + FINAL_FLUSH_TIMEOUT).as_secs() + 2),
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

/// Where this node's keys come from, decided before Pingora starts.
enum KeySourcePlan {
    File(Arc<KeysFileSource>),
    Remote { url: String, token: String },
    Store,
}

/// The parts every component may be handed.
struct NodeParts {
    mode: Mode,
    node_id: String,
    plane: Arc<DataPlane>,
    keys: Arc<KeyIndex>,
    states: Arc<KeyStates>,
    metrics: Arc<Metrics>,
}

/// How the key index is kept: where keys come from, and what a follower records.
struct KeySync {
    source: KeySourcePlan,
    last_sync: Arc<LastSync>,
    cache_file: Option<PathBuf>,
}

struct AdminSettings {
    /// Bound before Pingora starts so a busy port fails the start; taken once.
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    admin_tokens: Vec<TokenConfig>,
    sync_tokens: Vec<TokenConfig>,
    plans: BTreeSet<String>,
}

struct UsageSettings {
    sinks: Vec<SinkConfig>,
    flush_interval: Duration,
    spool: Option<PathBuf>,
}

/// For SIGHUP: the file to read again, and what is running now.
struct ConfigFile {
    path: PathBuf,
    applied: std::sync::Mutex<Config>,
    certificates: Vec<(std::net::SocketAddr, Arc<ListenerCertificate>)>,
}

/// The store and its change feed, on nodes that have a store.
struct Control {
    store: Arc<Store>,
    feed: Arc<Feed>,
}

/// What `finish` stops once requests have drained.
struct Running {
    flusher: FlusherHandle,
    follower: Option<Arc<Follower>>,
    fleet_sync: Option<FleetSyncTask>,
}

/// Work beside the request path: the store and admin API, key sync, health
/// checks, usage, SIGHUP, and the end of a graceful shutdown. It all runs on
/// this service's runtime, which is also where the database pool lives.
///
/// `run` starts each component with what it needs, in one order, and every one
/// stops on Pingora's shutdown signal. A component that cannot start returns its
/// error to `start`, the one place that ends the process.
struct Maintenance {
    parts: NodeParts,
    keys: KeySync,
    store_url: Option<String>,
    admin: AdminSettings,
    usage: UsageSettings,
    /// Set on nodes with a proxy whose limits hold across the fleet.
    fleet_limits: Option<FleetLimitsConfig>,
    /// How long SIGTERM waits for requests in flight.
    drain_timeout: Duration,
    config: ConfigFile,
}

/// Settings a running process keeps until it restarts: sockets, the store, where
/// keys come from, the process layout.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let listeners = |c: &Config| c.listeners.iter().map(|l| (l.address, l.tls.is_some())).collect::<Vec<_>>();
    let mut changed = Vec::new();
    for (name, differs) in [
        ("mode", running.mode != new.mode),
        ("node_id", running.node_id != new.node_id),
        ("threads", running.threads != new.threads),
        ("listeners", listeners(running) != listeners(new)),
        ("admin", running.admin != new.admin),
        ("store", running.store != new.store),
        ("keys", running.keys != new.keys),
        ("access_log", running.access_log != new.access_log),
        ("shutdown_timeout", running.shutdown_timeout != new.shutdown_timeout),
        ("usage.spool", running.usage.spool != new.usage.spool),
        ("usage.flush_interval", running.usage.flush_interval != new.usage.flush_interval),
        ("fleet_limits", running.fleet_limits != new.fleet_limits),
        ("webhooks", running.webhooks != new.webhooks),
    ] {
        if differs {
            changed.push(name);
        }
    }
    changed
}

/// A failure after Pingora started, as `start` reports it: `what` failed, and why.
fn failed<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> anyhow::Error {
    move |error| anyhow::anyhow!("{what}: {error}")
}

#[async_trait]
impl BackgroundService for Maintenance {
    /// The one place the node ends: after a graceful stop, or when a component
    /// cannot start (nothing sensible runs without it). The process exits rather
    /// than sit out Pingora's grace period.
    async fn start(&self, shutdown: ShutdownWatch) {
        match self.run(shutdown).await {
            Ok(()) => {
                tracing::info!("keygate stopped");
                std::process::exit(0);
            }
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}

impl Maintenance {
    /// Starts the components, serves until the shutdown signal, then stops them.
    async fn run(&self, shutdown: ShutdownWatch) -> anyhow::Result<()> {
        // First of all: SIGHUP's default action would end the process.
        let hangup =
            signal(SignalKind::hangup()).map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP")).ok();
        let control = self.start_control(&shutdown).await?;
        self.start_admin(control.as_ref(), shutdown.clone());
        if let Some(control) = &control {
            self.start_webhooks(control, shutdown.clone())?;
        }
        self.start_keys_file_watch(&shutdown);
        let follower = self.key_follower(control.as_ref())?;
        self.start_quota_seeds(control.as_ref(), &shutdown).await;
        if let Some(follower) = &follower {
            self.start_follower(follower, &shutdown).await;
        }
        let fleet_sync = self.fleet_limits.as_ref().map(|fleet| self.start_fleet_sync(fleet)).transpose()?;
        let store = control.as_ref().map(|control| &control.store);
        let sinks = self.build_sinks(&self.usage.sinks, store).map_err(failed("usage sinks"))?;
        crate::systemd_notify::ready();
        let flusher = self.start_flusher(sinks);

        self.tick_until_shutdown(shutdown, hangup, &flusher, store).await;
        self.finish(Running { flusher, follower, fleet_sync }).await;
        Ok(())
    }

    /// Opens the store and follows its change feed (standalone and control-plane nodes).
    async fn start_control(&self, shutdown: &ShutdownWatch) -> anyhow::Result<Option<Control>> {
        let Some(url) = &self.store_url else { return Ok(None) };
        let store = Arc::new(Store::connect(url).await.map_err(failed("cannot open the store"))?);
        let (_, version) = store.changes_since(u64::MAX, 1).await.map_err(failed("cannot read the change feed"))?;
        let feed = Arc::new(Feed::new(version));
        tokio::spawn(Arc::clone(&feed).run(Arc::clone(&store), shutdown.clone()));
        Ok(Some(Control { store, feed }))
    }

    fn start_admin(&self, control: Option<&Control>, mut shutdown: ShutdownWatch) {
        let listener = self.admin.listener.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let Some(listener) = listener else { return };
        // A control plane without a proxy is ready once its store is open.
        let ready = match (&self.keys.source, control) {
            (KeySourcePlan::Store, _) | (_, None) => Readiness::KeysLoaded(Arc::clone(&self.parts.keys)),
            (_, Some(_)) => Readiness::Always,
        };
        let mut router = ops_router(OpsState { ready, metrics: Arc::clone(&self.parts.metrics) });
        if let Some(Control { store, feed }) = control {
            if self.admin.admin_tokens.is_empty() {
                tracing::warn!("admin.tokens is empty: the admin API will refuse every call");
            }
            router = router.merge(crate::control::api::router(Arc::new(ApiState {
                store: Arc::clone(store),
                admin_tokens: self.admin.admin_tokens.clone(),
                sync_tokens: self.admin.sync_tokens.clone(),
                plans: self.admin.plans.clone(),
                feed: Arc::clone(feed),
                snapshots: Default::default(),
                fleet_swept_at: Default::default(),
                gateways: Default::default(),
                stopping: shutdown.clone(),
            })));
            router = router.merge(crate::console::router());
        }
        let router = crate::admin::with_json_fallbacks(router);
        tokio::spawn(async move {
            let stop = async move {
                let _ = shutdown.changed().await;
            };
            if let Err(e) = crate::admin::serve(listener, router, stop).await {
                tracing::error!(error = %e, "the admin server stopped");
            }
        });
    }

    /// Delivers the event log to `webhooks:` (standalone and control-plane nodes).
    fn start_webhooks(&self, control: &Control, shutdown: ShutdownWatch) -> anyhow::Result<()> {
        let (hooks, plans) = {
            let applied = self.config.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let plans = Plans { plans: applied.plans.clone(), default_plan: applied.default_plan.clone() };
            (applied.webhooks.clone(), plans)
        };
        if hooks.is_empty() {
            return Ok(());
        }
        tracing::info!(receivers = hooks.len(), "webhooks: delivering key events");
        let metrics = Arc::clone(&self.parts.metrics);
        let (store, feed) = (Arc::clone(&control.store), Arc::clone(&control.feed));
        let webhooks = Webhooks::new(store, feed, metrics, hooks, plans, &self.parts.node_id)
            .map_err(failed("cannot set up the webhook client"))?;
        tokio::spawn(webhooks.run(shutdown));
        Ok(())
    }

    /// A keys file is read again when it changes.
    fn start_keys_file_watch(&self, shutdown: &ShutdownWatch) {
        if let KeySourcePlan::File(source) = &self.keys.source {
            let (source, shutdown) = (Arc::clone(source), shutdown.clone());
            tokio::spawn(async move { source.watch(shutdown).await });
        }
    }

    /// What keeps the key index fresh from a feed (none for a keys file).
    fn key_follower(&self, control: Option<&Control>) -> anyhow::Result<Option<Arc<Follower>>> {
        let feed = match &self.keys.source {
            KeySourcePlan::File(_) => None,
            KeySourcePlan::Remote { url, token } => {
                let feed = RemoteFeed::new(url, token, &self.parts.node_id)
                    .map_err(failed("cannot set up the key sync client"))?;
                Some(Arc::new(feed) as Arc<dyn KeyFeed>)
            }
            // A control plane has no proxy, so no index to keep.
            KeySourcePlan::Store if self.parts.mode == Mode::ControlPlane => None,
            KeySourcePlan::Store => match control {
                Some(Control { store, feed }) => {
                    Some(Arc::new(LocalFeed::new(Arc::clone(store), Arc::clone(feed))) as Arc<dyn KeyFeed>)
                }
                None => return Err(failed("keys.source is store")("this mode has no store")),
            },
        };
        Ok(feed.map(|feed| {
            Arc::new(Follower::new(
                feed,
                Arc::clone(&self.parts.keys),
                Arc::clone(&self.parts.metrics),
                self.keys.cache_file.clone(),
                Arc::clone(&self.keys.last_sync),
            ))
        }))
    }

    /// Quotas start from the usage already stored, before the first key can be served.
    async fn start_quota_seeds(&self, control: Option<&Control>, shutdown: &ShutdownWatch) {
        let Some(source) = self.quota_seed_source(control.map(|control| &control.store)) else { return };
        tokio::time::timeout(SYNC_START_TIMEOUT, source.seed_once(&self.parts.states)).await.ok();
        tokio::spawn(source.run(Arc::clone(&self.parts.states), self.quota_seed_every(), shutdown.clone()));
    }

    /// Loads the first keys (from the feed, else the cache file), then follows the feed.
    async fn start_follower(&self, follower: &Arc<Follower>, shutdown: &ShutdownWatch) {
        if follower.start(SYNC_START_TIMEOUT).await {
            tracing::info!(keys = self.parts.keys.load().len(), "keys loaded");
        } else {
            tracing::warn!("no keys yet: keyed requests get 503 not_ready until the control plane answers");
        }
        tokio::spawn(Arc::clone(follower).run(shutdown.clone()));
    }

    /// Reconciles this node's limit consumption with the fleet's every `sync_interval`.
    fn start_fleet_sync(&self, fleet: &FleetLimitsConfig) -> anyhow::Result<FleetSyncTask> {
        let interval = fleet.sync_interval;
        tracing::info!(engine = %fleet.engine.shown(), ?interval, "fleet limits: rate limits and quotas hold across the fleet");
        let (states, metrics) = (Arc::clone(&self.parts.states), Arc::clone(&self.parts.metrics));
        match (&fleet.engine, &self.keys.source) {
            (FleetEngine::Redis { url }, _) => {
                let engine = RedisEngine::new(url, fleet.engine.shown()).map_err(failed("fleet_limits.url"))?;
                Ok(FleetSync::new(engine, interval).spawn(states, metrics))
            }
            (FleetEngine::ControlPlane, KeySourcePlan::Remote { url, token }) => {
                let engine = ControlPlaneEngine::new(url, token).map_err(failed("fleet_limits"))?;
                Ok(FleetSync::new(engine, interval).spawn(states, metrics))
            }
            // Validation refuses it: the engine is the control plane the keys come from.
            (FleetEngine::ControlPlane, _) => {
                Err(failed("fleet_limits.engine")("control_plane needs keys.control_plane"))
            }
        }
    }

    /// Drains usage to `sinks` every `usage.flush_interval`.
    fn start_flusher(&self, sinks: Vec<NamedSink>) -> FlusherHandle {
        Flusher::new(
            Arc::clone(&self.parts.states) as Arc<dyn UsageCounters>,
            sinks,
            self.parts.node_id.clone(),
            self.usage.flush_interval,
            Arc::clone(&self.parts.metrics),
            self.usage.spool.clone(),
        )
        .spawn()
    }

    /// Health checks, eviction, usage compaction and SIGHUP, until the shutdown signal.
    async fn tick_until_shutdown(
        &self,
        mut shutdown: ShutdownWatch,
        mut hangup: Option<tokio::signal::unix::Signal>,
        flusher: &FlusherHandle,
        store: Option<&Arc<Store>>,
    ) {
        let mut health_tick = tokio::time::interval(HEALTH_TICK);
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut evict_tick = tokio::time::interval(EVICT_EVERY);
        evict_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut compactor = store.map(|store| UsageCompactor::new(Arc::clone(store)));
        let mut compact_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + retention::FIRST_PASS_AFTER,
            retention::COMPACT_EVERY,
        );
        compact_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = health_tick.tick() => self.run_due_health_checks(),
                _ = compact_tick.tick(), if compactor.is_some() => {
                    let retention = self.config.applied.lock().unwrap_or_else(|p| p.into_inner()).usage.retention;
                    if let Some(compactor) = compactor.as_mut() {
                        compactor.tick(retention);
                    }
                }
                _ = evict_tick.tick() => {
                    self.parts.states.evict_idle(OffsetDateTime::now_utc());
                }
                Some(()) = async { match hangup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    self.reload(flusher, store).await;
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// Where quota usage counted elsewhere comes from: this node's store, or the
    /// control plane a gateway follows. A keys-file gateway counts on its own.
    fn quota_seed_source(&self, store: Option<&Arc<Store>>) -> Option<QuotaSeedSource> {
        match (&self.keys.source, store) {
            _ if self.parts.mode == Mode::ControlPlane => None,
            (KeySourcePlan::Remote { url, token }, _) => QuotaSeedSource::remote(url, token)
                .map_err(|e| tracing::warn!(error = %e, "cannot set up quota seeding"))
                .ok(),
            (KeySourcePlan::Store, Some(store)) => Some(QuotaSeedSource::Store(Arc::clone(store))),
            _ => None,
        }
    }

    /// A standalone node counts all of its own traffic, so its store only matters
    /// after a restart; gateways also learn what other gateways used.
    fn quota_seed_every(&self) -> Duration {
        match self.keys.source {
            KeySourcePlan::Remote { .. } => self.usage.flush_interval.max(Duration::from_secs(1)),
            _ => Duration::from_secs(3600),
        }
    }

    /// SIGHUP: the config file is read again. Routes, upstreams, plans, key
    /// locations, trusted proxies, usage sinks, usage retention and TLS certificates change in
    /// place, without dropping a connection; a config with any problem is refused
    /// whole and the running one stays.
    async fn reload(&self, flusher: &FlusherHandle, store: Option<&Arc<Store>>) {
        let result = self.try_reload(flusher, store).await;
        self.parts.metrics.config_reloaded(result.is_ok());
        match result {
            Ok(restart_only) => {
                tracing::info!(file = %self.config.path.display(), "config reloaded");
                for change in restart_only {
                    tracing::warn!("{change} changed: that takes effect at the next restart");
                }
            }
            Err(e) => tracing::error!(
                file = %self.config.path.display(),
                "config reload refused; the running config stays in use:\n{e}"
            ),
        }
    }

    async fn try_reload(
        &self,
        flusher: &FlusherHandle,
        store: Option<&Arc<Store>>,
    ) -> Result<Vec<&'static str>, String> {
        let config = crate::config::load(&self.config.path).map_err(|e| e.to_string())?;
        let state = GatewayState::build(&config, &self.parts.metrics).map_err(|e| e.to_string())?;
        let mut certificates = Vec::new();
        for listener in &config.listeners {
            let (Some(tls), Some((_, running))) =
                (&listener.tls, self.config.certificates.iter().find(|(address, _)| *address == listener.address))
            else {
                continue;
            };
            let certified =
                load_certified_key(&tls.cert, &tls.key).map_err(|e| format!("listener {}: {e}", listener.address))?;
            certificates.push((Arc::clone(running), certified));
        }
        let sinks = self.build_sinks(&config.usage.sinks, store)?;

        let restart_only =
            restart_only_changes(&self.config.applied.lock().unwrap_or_else(|p| p.into_inner()), &config);
        self.parts.plane.replace_state(state);
        for (running, certified) in certificates {
            running.replace(certified);
        }
        if let KeySourcePlan::File(source) = &self.keys.source {
            source.set_plans(config.plans.clone());
            source.request_reload();
        }
        flusher.replace_sinks(sinks).await;
        *self.config.applied.lock().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(restart_only)
    }

    fn build_sinks(&self, configs: &[SinkConfig], store: Option<&Arc<Store>>) -> Result<Vec<NamedSink>, String> {
        let mut sinks: Vec<NamedSink> = Vec::new();
        for sink in configs {
            let built: Arc<dyn UsageSink> = match sink {
                SinkConfig::File { path } => {
                    // Created once here; a directory that vanishes later is an outage, retried.
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        if let Err(e) = std::fs::create_dir_all(dir) {
                            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the usage directory");
                        }
                    }
                    Arc::new(FileSink::new(path.clone()))
                }
                SinkConfig::Store => match store {
                    Some(store) => Arc::new(StoreSink::new(Arc::clone(store))),
                    None => return Err("usage sink store: this mode has no store".into()),
                },
                SinkConfig::ControlPlane => match &self.keys.source {
                    KeySourcePlan::Remote { url, token } => {
                        Arc::new(ControlPlaneSink::new(url, token).map_err(|e| format!("usage upload: {e}"))?)
                    }
                    _ => return Err("usage sink control_plane: keys.control_plane is not configured".into()),
                },
                SinkConfig::Http(http) => Arc::new(
                    HttpSink::new(http, Arc::clone(&self.parts.keys) as Arc<dyn KeyOwners>)
                        .map_err(|e| e.to_string())?,
                ),
                SinkConfig::Nats(nats) => Arc::new(NatsSink::new(
                    nats,
                    &self.parts.node_id,
                    Arc::clone(&self.parts.keys) as Arc<dyn KeyOwners>,
                )),
            };
            sinks.push((format!("{sink:?}"), built));
        }
        Ok(sinks)
    }

    fn run_due_health_checks(&self) {
        // Checks run in their own tasks so a slow target never delays another upstream.
        let now = Instant::now();
        for upstream in self.parts.plane.state().upstreams.iter().filter(|u| u.health_check_due(now)) {
            let upstream = Arc::clone(upstream);
            tokio::spawn(async move { upstream.run_health_check().await });
        }
    }

    /// Pingora has stopped accepting; wait for open connections (requests in flight,
    /// and connections lingering for a request: see `ProxyService`), then flush
    /// usage, the key cache and the access log.
    async fn finish(&self, running: Running) {
        crate::systemd_notify::stopping();
        let plane = &self.parts.plane;
        let deadline = Instant::now() + self.drain_timeout;
        // A connection accepted in the last instant is counted once its task starts.
        tokio::time::sleep(SETTLE_BEFORE_DRAIN.min(self.drain_timeout)).await;
        let open = || plane.requests_in_flight() > 0 || plane.open_connections() > 0;
        while open() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let unfinished = plane.requests_in_flight();
        if unfinished > 0 {
            tracing::warn!(
                requests = unfinished,
                "requests still in flight after {:?}; stopping anyway",
                self.drain_timeout
            );
        }
        let Running { flusher, follower, fleet_sync } = running;
        let last_round = async {
            if let Some(fleet_sync) = fleet_sync {
                fleet_sync.last_round().await;
            }
        };
        tokio::join!(flusher.flush_and_stop(FINAL_FLUSH_TIMEOUT), last_round);
        if let Some(follower) = follower {
            follower.write_cache_now().await;
        }
        plane.flush_access_log(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        let keys = "keys:\n  source: file\n  file: keys.yaml\n";
        crate::config::from_str(&format!("mode: gateway\n{keys}{yaml}"), Path::new("test.yaml"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn reload_applies_routes_in_place_but_names_what_needs_a_restart() {
        let upstream = "upstreams:\n  api: { targets: [\"127.0.0.1:9\"] }\n";
        let running = config(&format!("{upstream}listeners: [ {{ address: 127.0.0.1:8080 }} ]\n"));
        let new_routes = config(&format!(
            "{upstream}listeners: [ {{ address: 127.0.0.1:8080 }} ]\nroutes: [ {{ name: r, match: {{ path_prefix: / }}, upstream: api }} ]\n"
        ));
        assert!(restart_only_changes(&running, &new_routes).is_empty());
        let new_listener = config(&format!("{upstream}listeners: [ {{ address: 127.0.0.1:8081 }} ]\nthreads: 3\n"));
        assert_eq!(restart_only_changes(&running, &new_listener), ["threads", "listeners"]);
    }

    #[test]
    fn store_urls_lose_their_password_in_messages() {
        assert_eq!(redact_url("postgres://kg:s3cret@db:5432/kg"), "postgres://kg:***@db:5432/kg");
        assert_eq!(redact_url("postgres://kg@db/kg"), "postgres://kg@db/kg");
        assert_eq!(redact_url("sqlite://data/keygate.db"), "sqlite://data/keygate.db");
    }
}
