//! Fleet limits: rate limits and quotas that hold across every gateway.
//!
//! Requests are decided locally, with no network hop. Every `sync_interval` a
//! round exchanges, in one pipelined round trip per few thousand budgets, what
//! this gateway spent with what the others spent:
//!
//! - **Rate limits.** Each budget has a counter per 10 s epoch
//!   (`INCRBY` + `PEXPIRE`): a round adds the requests this gateway allowed since
//!   the last one and reads back the current and previous epoch's totals. What
//!   the others added since the last round is folded into the local GCRA state
//!   (its TAT moves on by their cost), so the local limiter decides on the whole
//!   fleet's consumption, late by at most one round. A gateway also reports its
//!   TAT (`ZADD GT`, so the stored one only moves forward), and one that starts
//!   drawing from a budget takes that on: it learns what the fleet has already
//!   spent, not only what is spent from then on.
//! - **Quotas.** Each budget has a counter per quota period; the fleet's total,
//!   plus what this gateway counted since it delivered, is a floor for the local
//!   count.
//!
//! When the engine does not answer, nothing on the request path notices: each
//! gateway goes on deciding on its own state (the full limit per gateway), rate
//! counts of the outage are not sent later (they are no longer recent, and the
//! fleet would otherwise be punished twice for them), quota counts are, and the
//! first round back takes the fleet's TAT again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use governor::clock::Clock;
use tokio::sync::oneshot;

use super::KeyStates;
use super::QuotaDelta;
use crate::config::QuotaPeriod;
use crate::index::KeyId;
use crate::metrics::Metrics;

/// Rate counters are kept per epoch of this length, so that none grows for ever
/// and a fresh one needs no reset.
const EPOCH: Duration = Duration::from_secs(10);
/// An epoch's counter is still read during the next epoch.
const EPOCH_TTL: Duration = Duration::from_secs(30);
/// A reported TAT is kept this long past its time, so a gateway's next round finds it.
const TAT_GRACE: Duration = Duration::from_secs(10);
/// Longest a round trip may take before the round counts as failed.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(1);
/// Operations per round trip, so that no single pipeline holds the engine long.
pub const OPS_PER_EXCHANGE: usize = 4096;

/// The body of `POST /v1/sync/fleet` (`engine: control_plane`): one exchange's ops.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct FleetExchange {
    pub ops: Vec<Op>,
}

/// Its answer: one value per op, `null` where the op answers nothing or finds nothing.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct FleetAnswers {
    pub answers: Vec<Option<u64>>,
}
const KEY_PREFIX: &str = "keygate:fleet:";

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Engine(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the engine answered {answered} values for {asked} operations")]
    Answer { asked: usize, answered: usize },
}

/// One operation on the engine's counters. Also the wire form of an exchange with
/// the control plane (`POST /v1/sync/fleet`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Adds `by` to a counter that then lives `ttl` more; answers the new total.
    Add { key: String, by: u64, ttl: Duration },
    /// Answers a counter's value (none when there is no counter: the caller counts it as 0).
    Read { key: String },
    /// Raises a high-water mark to `to` (never lowers it), kept until `until`
    /// (Unix milliseconds) at least; answers nothing.
    Raise { key: String, to: u64, until: u64 },
    /// Answers a high-water mark, if there is one.
    ReadMark { key: String },
}

impl Op {
    /// The counter or mark it works on.
    pub fn key(&self) -> &str {
        match self {
            Op::Add { key, .. } | Op::Read { key } | Op::Raise { key, .. } | Op::ReadMark { key } => key,
        }
    }
}

/// Where the fleet's counts meet: Redis or Valkey, the control plane, or a fake in tests.
#[async_trait]
pub trait CountEngine: Send {
    /// Applies `ops` in order; one answer per op (`None` where it answers nothing
    /// or finds nothing). With no ops, checks that the engine answers.
    async fn exchange(&mut self, ops: &[Op]) -> Result<Vec<Option<u64>>, FleetError>;

    /// Names the engine in logs.
    fn name(&self) -> String;
}

/// What one rate budget's counters looked like at the last round.
#[derive(Debug, Clone, Copy, Default)]
struct EpochCount {
    /// Requests this gateway delivered into the epoch's counter.
    own: u64,
    /// Of the counter's total, what the others had added when last read; None
    /// until the first read, which only sets it.
    others_seen: Option<u64>,
}

#[derive(Debug)]
struct RateSync {
    epoch: u64,
    current: EpochCount,
    previous: EpochCount,
}

impl RateSync {
    fn new(epoch: u64) -> Self {
        RateSync { epoch, current: EpochCount::default(), previous: EpochCount::default() }
    }

    /// Moves to `epoch`. Into the next one, what the last counter held carries
    /// over and all of the new counter is news; after a gap nothing is known.
    fn roll(&mut self, epoch: u64) {
        if epoch == self.epoch {
            return;
        }
        let next = epoch == self.epoch + 1;
        self.previous = if next { self.current } else { EpochCount::default() };
        self.current = EpochCount { own: 0, others_seen: next.then_some(0) };
        self.epoch = epoch;
    }

    /// Takes in the counters' totals after delivering `delivered`; returns the
    /// requests the others added since the last read.
    fn observe(&mut self, delivered: u64, current_total: u64, previous_total: u64) -> u64 {
        self.current.own = self.current.own.saturating_add(delivered);
        [(&mut self.current, current_total), (&mut self.previous, previous_total)]
            .into_iter()
            .map(|(count, total)| {
                let others = total.saturating_sub(count.own);
                let news = count.others_seen.map_or(0, |seen| others.saturating_sub(seen));
                count.others_seen = Some(count.others_seen.map_or(others, |seen| seen.max(others)));
                news
            })
            .sum()
    }
}

fn rate_key(epoch: u64, budget: &str) -> String {
    format!("{KEY_PREFIX}rate:{epoch}:{budget}")
}

fn tat_key(budget: &str) -> String {
    format!("{KEY_PREFIX}tat:{budget}")
}

fn quota_key(delta: &QuotaDelta) -> String {
    format!("{KEY_PREFIX}quota:{}:{}:{}", delta.per.as_str(), delta.period, delta.budget)
}

/// A quota period's counter outlives the period by a day, for clocks that differ.
fn quota_ttl(per: QuotaPeriod) -> Duration {
    const DAY: u64 = 86_400;
    Duration::from_secs(match per {
        QuotaPeriod::Day => 2 * DAY,
        QuotaPeriod::Month => 32 * DAY,
    })
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(0))
}

/// A round that failed after its first `delivered` ops got through.
struct Undelivered {
    delivered: usize,
    error: FleetError,
}

/// One rate budget in a round: what was taken, and where its answers are.
struct RateItem {
    budget: KeyId,
    delivered: u64,
    /// Index of the current epoch's total; the previous epoch's follows it.
    totals_at: usize,
    /// Index of the fleet's TAT, asked for budgets new to this gateway.
    mark_at: Option<usize>,
}

/// The running fleet sync of a node.
pub struct FleetSyncTask {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl FleetSyncTask {
    /// Stops the rounds after one last, once no request is left to count: a
    /// gateway that stops delivers what it counted since the previous round.
    pub async fn last_round(self) {
        let _ = self.stop.send(());
        // A round gives up on the engine after EXCHANGE_TIMEOUT per round trip.
        if tokio::time::timeout(EXCHANGE_TIMEOUT * 4, self.task).await.is_err() {
            tracing::warn!("fleet limits: the last round did not finish; its counts are lost to the fleet");
        }
    }
}

/// The state of reconciliation with the engine, kept by the one task that runs rounds.
pub struct FleetSync<E> {
    engine: E,
    interval: Duration,
    rate_budgets: HashMap<KeyId, RateSync>,
    /// Whether the last round reached the engine; None before the first.
    reachable: Option<bool>,
    last_round: Option<Instant>,
}

impl<E: CountEngine> FleetSync<E> {
    pub fn new(engine: E, interval: Duration) -> Self {
        FleetSync { engine, interval, rate_budgets: HashMap::new(), reachable: None, last_round: None }
    }

    /// Runs a round every interval until [`FleetSyncTask::last_round`].
    pub fn spawn(mut self, states: Arc<KeyStates>, metrics: Arc<Metrics>) -> FleetSyncTask
    where
        E: 'static,
    {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.round(&states, &metrics).await,
                    _ = &mut stopped => break,
                }
            }
            // What was counted since the last round, quotas above all, reaches the fleet.
            self.round(&states, &metrics).await;
        });
        FleetSyncTask { stop, task }
    }

    /// One exchange with the engine; requests never wait on it.
    pub async fn round<C: Clock + Clone>(&mut self, states: &KeyStates<C>, metrics: &Metrics) {
        let epoch = unix_ms() / EPOCH.as_millis() as u64;
        let since_last = self.last_round.map_or(self.interval, |at| at.elapsed()).min(self.interval * 2);
        self.last_round = Some(Instant::now());

        let mut ops = Vec::new();
        let mut rate_items = Vec::new();
        states.take_rate_unsynced(|budget, delivered, tat_unix_ms| {
            let is_new = !self.rate_budgets.contains_key(budget);
            let sync = self.rate_budgets.entry(KeyId::from(budget)).or_insert_with(|| RateSync::new(epoch));
            sync.roll(epoch);
            let totals_at = ops.len();
            let current = rate_key(epoch, budget);
            ops.push(match delivered {
                0 => Op::Read { key: current },
                by => Op::Add { key: current, by, ttl: EPOCH_TTL },
            });
            ops.push(Op::Read { key: rate_key(epoch.saturating_sub(1), budget) });
            let mark_at = is_new.then(|| {
                ops.push(Op::ReadMark { key: tat_key(budget) });
                ops.len() - 1
            });
            // Only a gateway that allowed requests moves the budget on; the others' TATs
            // follow theirs a round later, so an idle one has nothing new to report.
            if let Some(tat) = tat_unix_ms.filter(|_| delivered > 0) {
                let until = tat.saturating_add(TAT_GRACE.as_millis() as u64);
                ops.push(Op::Raise { key: tat_key(budget), to: tat, until });
            }
            rate_items.push(RateItem { budget: KeyId::from(budget), delivered, totals_at, mark_at });
        });
        let quota_deltas = states.take_quota_unsynced();
        let quotas_at = ops.len();
        ops.extend(quota_deltas.iter().map(|delta| Op::Add {
            key: quota_key(delta),
            by: delta.requests,
            ttl: quota_ttl(delta.per),
        }));

        match self.exchange_all(&ops).await {
            Ok(answers) => {
                let answer = |at: usize| answers.get(at).copied().flatten().unwrap_or(0);
                for item in &rate_items {
                    if let Some(at) = item.mark_at {
                        if let Some(tat) = answers.get(at).copied().flatten() {
                            states.adopt_tat(&item.budget, tat, item.delivered);
                        }
                    }
                    if let Some(sync) = self.rate_budgets.get_mut(&item.budget) {
                        let news = sync.observe(item.delivered, answer(item.totals_at), answer(item.totals_at + 1));
                        states.absorb(&item.budget, news, since_last);
                    }
                }
                for (i, delta) in quota_deltas.iter().enumerate() {
                    states.raise_to_fleet(&delta.budget, delta.period, answer(quotas_at + i));
                }
                let held: HashSet<&KeyId> = rate_items.iter().map(|item| &item.budget).collect();
                self.rate_budgets.retain(|budget, _| held.contains(budget));
                metrics.fleet_limits_sync_ok.inc();
                if self.reachable != Some(true) {
                    tracing::info!(engine = %self.engine.name(), "fleet limits: reconciling with the fleet");
                }
                metrics.fleet_limits_local_fallback.set(0);
                self.reachable = Some(true);
            }
            Err(Undelivered { delivered, error: e }) => {
                // Start again from the fleet's TAT once the engine is back.
                self.rate_budgets.clear();
                // Quota counts in a chunk that got through are in the engine; the rest wait.
                for (i, delta) in quota_deltas.iter().enumerate() {
                    if quotas_at + i >= delivered {
                        states.return_unsynced(&delta.budget, delta.requests);
                    }
                }
                metrics.fleet_limits_sync_error.inc();
                if self.reachable != Some(false) {
                    tracing::warn!(
                        engine = %self.engine.name(),
                        error = %e,
                        "fleet limits: the engine is away; each gateway enforces the full limits on its own traffic until it is back"
                    );
                }
                metrics.fleet_limits_local_fallback.set(1);
                self.reachable = Some(false);
            }
        }
    }

    /// Sends `ops` chunk by chunk (each op stands alone, so where a chunk ends does
    /// not matter); on failure, says how many ops got through before it.
    async fn exchange_all(&mut self, ops: &[Op]) -> Result<Vec<Option<u64>>, Undelivered> {
        if ops.is_empty() {
            return self.exchange_chunk(ops).await.map_err(|error| Undelivered { delivered: 0, error });
        }
        let mut answers = Vec::with_capacity(ops.len());
        for chunk in ops.chunks(OPS_PER_EXCHANGE) {
            match self.exchange_chunk(chunk).await {
                Ok(chunk_answers) => answers.extend(chunk_answers),
                Err(error) => return Err(Undelivered { delivered: answers.len(), error }),
            }
        }
        Ok(answers)
    }

    async fn exchange_chunk(&mut self, ops: &[Op]) -> Result<Vec<Option<u64>>, FleetError> {
        let answers = tokio::time::timeout(EXCHANGE_TIMEOUT, self.engine.exchange(ops))
            .await
            .map_err(|_| FleetError::Timeout(EXCHANGE_TIMEOUT))??;
        if answers.len() != ops.len() {
            return Err(FleetError::Answer { asked: ops.len(), answered: answers.len() });
        }
        Ok(answers)
    }
}

/// Redis or Valkey (7.0 or later: `PEXPIREAT … NX/GT`), through one
/// multiplexed connection that reconnects by itself.
pub struct RedisEngine {
    client: redis::Client,
    connection: Option<redis::aio::ConnectionManager>,
    /// The URL without credentials, for logs.
    shown: String,
}

impl RedisEngine {
    /// Checks the URL; connects at the first round, so a gateway starts while the engine is away.
    pub fn new(url: &str, shown: String) -> Result<Self, FleetError> {
        let client = redis::Client::open(url).map_err(|e| FleetError::Engine(e.to_string()))?;
        Ok(RedisEngine { client, connection: None, shown })
    }

    async fn connection(&mut self) -> Result<redis::aio::ConnectionManager, FleetError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(EXCHANGE_TIMEOUT))
            .set_response_timeout(Some(EXCHANGE_TIMEOUT))
            .set_number_of_retries(1);
        let connection = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| FleetError::Engine(e.to_string()))?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }
}

#[async_trait]
impl CountEngine for RedisEngine {
    async fn exchange(&mut self, ops: &[Op]) -> Result<Vec<Option<u64>>, FleetError> {
        let mut connection = self.connection().await?;
        let engine_error = |e: redis::RedisError| FleetError::Engine(e.to_string());
        if ops.is_empty() {
            redis::cmd("PING").query_async::<()>(&mut connection).await.map_err(engine_error)?;
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for op in ops {
            match op {
                Op::Add { key, by, ttl } => {
                    pipe.cmd("INCRBY").arg(key).arg(*by);
                    pipe.cmd("PEXPIRE").arg(key).arg(ttl.as_millis() as u64).ignore();
                }
                Op::Read { key } => {
                    pipe.cmd("GET").arg(key);
                }
                Op::Raise { key, to, until } => {
                    pipe.cmd("ZADD").arg(key).arg("GT").arg(*to).arg("tat").ignore();
                    // NX gives a new key its expiry, GT only ever extends it.
                    pipe.cmd("PEXPIREAT").arg(key).arg(*until).arg("NX").ignore();
                    pipe.cmd("PEXPIREAT").arg(key).arg(*until).arg("GT").ignore();
                }
                Op::ReadMark { key } => {
                    pipe.cmd("ZSCORE").arg(key).arg("tat");
                }
            }
        }
        let values: Vec<Option<f64>> = pipe.query_async(&mut connection).await.map_err(engine_error)?;
        let mut values = values.into_iter();
        let mut answers = Vec::with_capacity(ops.len());
        for op in ops {
            let answer = match op {
                Op::Raise { .. } => None,
                _ => values.next().ok_or(FleetError::Answer { asked: ops.len(), answered: answers.len() })?,
            };
            // Counts and Unix milliseconds are whole numbers well inside f64's exact range.
            answers.push(answer.map(|value| value.max(0.0) as u64));
        }
        Ok(answers)
    }

    fn name(&self) -> String {
        self.shown.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitScope, QuotaConfig, RateLimitConfig};
    use std::sync::{Arc, Mutex};

    /// An engine in memory, shared by the gateways of a test; it can be switched off.
    #[derive(Clone, Default)]
    struct MemoryEngine {
        counters: Arc<Mutex<HashMap<String, u64>>>,
        away: Arc<std::sync::atomic::AtomicBool>,
        /// Exchanges answered before the engine goes away by itself.
        answers_left: Option<usize>,
    }

    #[async_trait]
    impl CountEngine for MemoryEngine {
        async fn exchange(&mut self, ops: &[Op]) -> Result<Vec<Option<u64>>, FleetError> {
            if let Some(left) = self.answers_left.as_mut() {
                if *left == 0 {
                    self.away.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                *left = left.saturating_sub(1);
            }
            if self.away.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(FleetError::Engine("connection refused".into()));
            }
            let mut counters = self.counters.lock().unwrap();
            Ok(ops
                .iter()
                .map(|op| match op {
                    Op::Add { key, by, .. } => {
                        let total = counters.entry(key.clone()).or_default();
                        *total += by;
                        Some(*total)
                    }
                    Op::Read { key } => Some(counters.get(key).copied().unwrap_or(0)),
                    Op::Raise { key, to, .. } => {
                        let mark = counters.entry(key.clone()).or_default();
                        *mark = (*mark).max(*to);
                        None
                    }
                    Op::ReadMark { key } => counters.get(key).copied(),
                })
                .collect())
        }

        fn name(&self) -> String {
            "memory".into()
        }
    }

    fn limit(requests: u32) -> RateLimitConfig {
        RateLimitConfig { requests, per: Duration::from_secs(60), burst: None, by: LimitScope::Key }
    }

    fn allowed(rates: &KeyStates, config: &RateLimitConfig, n: usize) -> usize {
        (0..n).filter(|_| rates.check_rate("k", config).is_ok()).count()
    }

    #[test]
    fn epochs_roll_over_keeping_what_was_seen() {
        let mut sync = RateSync::new(7);
        assert_eq!(sync.observe(5, 12, 0), 0, "the first read only sets the baseline");
        assert_eq!(sync.observe(1, 15, 0), 2, "6 own and 9 others: 2 new");
        sync.roll(8);
        assert_eq!(sync.observe(3, 4, 16), 2, "1 new in the new epoch, 1 late in the old one");
        sync.roll(10);
        assert_eq!(sync.observe(0, 50, 50), 0, "after a gap the counters are baselines again");
    }

    #[tokio::test]
    async fn two_gateways_share_one_budget() {
        let engine = MemoryEngine::default();
        let metrics = Metrics::new().unwrap();
        let (a, b) = (KeyStates::for_fleet(), KeyStates::for_fleet());
        let (mut sync_a, mut sync_b) = (
            FleetSync::new(engine.clone(), Duration::from_millis(200)),
            FleetSync::new(engine.clone(), Duration::from_millis(200)),
        );
        let config = limit(10);
        assert_eq!(allowed(&a, &config, 6), 6);
        sync_a.round(&a, &metrics).await;
        // B draws from the budget for the first time and takes on A's TAT.
        assert_eq!(allowed(&b, &config, 1), 1);
        sync_b.round(&b, &metrics).await;
        assert_eq!(allowed(&b, &config, 10), 3, "6 + 1 spent; 3 left of 10");
        sync_b.round(&b, &metrics).await;
        sync_a.round(&a, &metrics).await;
        assert_eq!(allowed(&a, &config, 10), 0, "A has folded in B's 4");
        assert_eq!(metrics.fleet_limits_sync_ok.get(), 4);
        assert_eq!(metrics.fleet_limits_local_fallback.get(), 0);
    }

    #[tokio::test]
    async fn an_absent_engine_leaves_each_gateway_its_own_full_limit_and_reports_it() {
        let engine = MemoryEngine::default();
        let metrics = Metrics::new().unwrap();
        let states = KeyStates::for_fleet();
        let mut sync = FleetSync::new(engine.clone(), Duration::from_millis(200));
        engine.away.store(true, std::sync::atomic::Ordering::Relaxed);
        let quota = QuotaConfig { requests: 100, per: QuotaPeriod::Day, by: LimitScope::Key };
        let now = time::OffsetDateTime::now_utc();
        for _ in 0..3 {
            assert!(states.try_consume("q", &quota, now).is_ok());
        }
        assert_eq!(allowed(&states, &limit(5), 9), 5);
        sync.round(&states, &metrics).await;
        assert_eq!((metrics.fleet_limits_local_fallback.get(), metrics.fleet_limits_sync_error.get()), (1, 1));
        // Back: the quota's 3 requests arrive late, the rate limit's do not.
        engine.away.store(false, std::sync::atomic::Ordering::Relaxed);
        sync.round(&states, &metrics).await;
        assert_eq!(metrics.fleet_limits_local_fallback.get(), 0);
        let counters = engine.counters.lock().unwrap();
        let (day, _) = crate::limit::periods(now);
        assert_eq!(counters.get(&format!("{KEY_PREFIX}quota:day:{day}:q")), Some(&3));
        let rate_total: u64 =
            counters.iter().filter(|(key, _)| key.starts_with(&format!("{KEY_PREFIX}rate:"))).map(|(_, n)| n).sum();
        assert_eq!(rate_total, 0);
    }

    #[tokio::test]
    async fn quota_counts_of_a_chunk_that_got_through_are_not_sent_again() {
        let engine = MemoryEngine { answers_left: Some(1), ..MemoryEngine::default() };
        let metrics = Metrics::new().unwrap();
        let states = KeyStates::for_fleet();
        let quota = QuotaConfig { requests: 10, per: QuotaPeriod::Day, by: LimitScope::Key };
        let now = time::OffsetDateTime::now_utc();
        let budgets = OPS_PER_EXCHANGE + 4;
        for i in 0..budgets {
            assert!(states.try_consume(&format!("q{i}"), &quota, now).is_ok());
        }
        let mut sync = FleetSync::new(engine.clone(), Duration::from_millis(200));
        sync.round(&states, &metrics).await;
        assert_eq!(metrics.fleet_limits_sync_error.get(), 1, "the second chunk failed");
        let waiting: u64 = states.take_quota_unsynced().iter().map(|delta| delta.requests).sum();
        assert_eq!(waiting, 4, "only the undelivered chunk's counts wait for the next round");
        assert_eq!(engine.counters.lock().unwrap().values().sum::<u64>(), OPS_PER_EXCHANGE as u64);
    }

    #[tokio::test]
    async fn quotas_count_what_every_gateway_counted() {
        let engine = MemoryEngine::default();
        let metrics = Metrics::new().unwrap();
        let (a, b) = (KeyStates::for_fleet(), KeyStates::for_fleet());
        let (mut sync_a, mut sync_b) = (
            FleetSync::new(engine.clone(), Duration::from_millis(200)),
            FleetSync::new(engine, Duration::from_millis(200)),
        );
        let quota = QuotaConfig { requests: 5, per: QuotaPeriod::Month, by: LimitScope::Key };
        let now = time::OffsetDateTime::now_utc();
        for _ in 0..3 {
            assert!(a.try_consume("q", &quota, now).is_ok());
        }
        assert!(b.try_consume("q", &quota, now).is_ok());
        sync_a.round(&a, &metrics).await;
        sync_b.round(&b, &metrics).await;
        assert_eq!(b.try_consume("q", &quota, now), Ok(0), "3 + 1 counted, this is the 5th");
        assert!(b.try_consume("q", &quota, now).is_err());
    }
}
