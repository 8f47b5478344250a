//! The control plane's store: keys, the change feed, the audit trail and usage,
//! on SQLite (standalone, one file) or PostgreSQL (several control planes).
//!
//! Every key mutation is one transaction that writes the key, appends to the
//! change feed and appends to the audit log, so the three never disagree.
//!
//! A feed row names one key (`upsert`, `delete`), or stands for a whole batch of
//! a bulk import (`import`): the batch appends one row and one audit event, and
//! every key it writes carries that row's version. `changes_since` expands such a
//! row into an upsert per key still at that version (a key changed since comes
//! with its later change), and never splits one version across two pages.
//!
//! Feed versions come from the database (SQLite AUTOINCREMENT, a PostgreSQL
//! identity column). On PostgreSQL every key mutation first takes one
//! transaction-level advisory lock, so versions are handed out and committed in
//! the same order and a reader of `changes_since` can never pass over a lower
//! version that commits later. SQLite serialises writers itself (`BEGIN IMMEDIATE`).
//!
//! Timestamps are unix milliseconds in both backends; lists and objects are JSON
//! text. The SQL is written once (`ops.rs`) and compiled per backend with concrete
//! sqlx types; `$N` placeholders work on both.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use futures_util::stream::BoxStream;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use time::OffsetDateTime;

use crate::config::{QuotaConfig, RateLimitConfig, UsageRetention};
use crate::control::model::{
    AuditEvent, Change, Granularity, ImportKey, KeyFilter, KeyOrder, KeyPatch, KeyStatusText, NewKey, StoredKey,
    UsageBucket,
};
use crate::index::wire::{WireKey, WireQuota, WireRate};
use crate::key::KeyDigest;
use crate::usage::UsageRecord;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The snapshot's own read of a SQLite file (see `sqlite_pages`).
    #[error("database error: {0}")]
    SqliteRead(#[from] rusqlite::Error),
    #[error("invalid: {0}")]
    Invalid(String),
}

/// Largest page of `list_keys` and `audit`.
pub const MAX_PAGE: u32 = 1000;
/// Largest page of `changes_since`; larger requests are cut to this.
pub const MAX_CHANGES_PAGE: u32 = 10_000;

/// Advisory lock taken by every key mutation on PostgreSQL ("kgfeed" + 1).
const FEED_LOCK_KEY: i64 = 0x6b67_6665_6564_0001;
/// Advisory lock held by a usage rollup transaction on PostgreSQL ("kgroll" + 1), so
/// control planes sharing a database take turns instead of racing over one slice.
const ROLLUP_LOCK_KEY: i64 = 0x6b67_726f_6c6c_0001;

/// Batch ids are kept at least this long, whatever `usage.retention.minute` says: a
/// gateway that was stopped with unacknowledged uploads in its spool replays them at
/// its next start, which may be days later, and its replay must still be recognised.
pub const USAGE_BATCH_IDS_KEPT_AT_LEAST: Duration = Duration::from_secs(7 * 86_400);
/// Minute buckets folded into hours per transaction: ten minutes of every active key.
const HOUR_ROLLUP_SLICE_MS: i64 = 10 * 60_000;
/// Hour buckets folded into days per transaction: six hours of every active key.
const DAY_ROLLUP_SLICE_MS: i64 = 6 * 3_600_000;
/// Expired buckets deleted per transaction: one day of every active key.
const DELETE_SLICE_MS: i64 = 86_400_000;
/// Batch ids forgotten per statement.
const BATCH_PRUNE_CHUNK: i64 = 10_000;

/// A connected store. Cloning is cheap (the pools are reference-counted).
#[derive(Debug, Clone)]
pub enum Store {
    /// The pool, and the database's file (none in memory): snapshots read the file
    /// on a connection of their own (see `sqlite_pages`).
    Sqlite(SqlitePool, Option<PathBuf>),
    Postgres(PgPool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// The columns of `keys`, in `KeyRow` order.
macro_rules! key_columns {
    () => {
        "id, hash, prefix, masked, name, owner, plan, scopes, ip_allowlist, rate_limit, quota, status, \
         expires_at, metadata, tags, created_at, updated_at, last_used_at, version, imported"
    };
}

/// The columns of [`GatewayKeyRow`].
macro_rules! gateway_key_columns {
    () => {
        "id, hash, name, owner, plan, scopes, ip_allowlist, rate_limit, quota, status, expires_at, metadata, \
         tags, imported"
    };
}

/// The text PostgreSQL's trigram index `keys_search_idx` covers (migration 0003): the
/// listing's `q` filter must use this exact expression for the index to apply. The fields
/// are joined by [`SEARCH_SEPARATOR`].
macro_rules! search_text {
    () => {
        "lower(name || chr(1) || COALESCE(owner, '') || chr(1) || (id COLLATE \"default\") || chr(1) || masked)"
    };
}

/// Joins the fields in [`search_text!`]: a needle without it matches the joined text
/// exactly when it matches one of the fields.
const SEARCH_SEPARATOR: char = '\u{1}';

// `ops.rs` compiled once per backend: sqlx's generic executor bounds are unwieldy,
// and concrete types keep every query checked by the compiler for both.
mod sqlite {
    type Db = sqlx::Sqlite;
    const DIALECT: super::Dialect = super::Dialect::Sqlite;
    include!("ops.rs");
    include!("event_ops.rs");
}

mod sqlite_pages;

mod postgres {
    type Db = sqlx::Postgres;
    const DIALECT: super::Dialect = super::Dialect::Postgres;
    include!("ops.rs");
    include!("event_ops.rs");
}

macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Store::Sqlite(pool, _) => sqlite::$method(pool, $($arg),*).await,
            Store::Postgres(pool) => postgres::$method(pool, $($arg),*).await,
        }
    };
}

mod event_log;
pub use event_log::{WebhookCursor, EVENTS_KEPT};

impl Store {
    /// Opens `sqlite://path/to/file.db` (created with its directory if missing),
    /// `sqlite::memory:`, or `postgres://…` / `postgresql://…`, and brings the
    /// schema up to date.
    pub async fn connect(url: &str) -> Result<Store> {
        if url.starts_with("sqlite:") {
            connect_sqlite(url).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await?;
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Ok(Store::Postgres(pool))
        } else {
            Err(StoreError::Invalid("store url must start with sqlite:, postgres:// or postgresql://".into()))
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Sqlite(..) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        match self {
            Store::Sqlite(pool, _) => pool.close().await,
            Store::Postgres(pool) => pool.close().await,
        }
    }

    /// Creates an `active` key. `Conflict` if its id or hash exists.
    pub async fn create_key(&self, new: NewKey, actor: &str) -> Result<StoredKey> {
        validate_new(&new)?;
        dispatch!(self.create_key(new, actor))
    }

    pub async fn get_key(&self, id: &str) -> Result<Option<StoredKey>> {
        dispatch!(self.get_key(id))
    }

    pub async fn get_key_by_hash(&self, hash: &str) -> Result<Option<StoredKey>> {
        dispatch!(self.get_key_by_hash(hash))
    }

    /// One page of keys, newest first, and the cursor of the next page (`None` on
    /// the last one).
    pub async fn list_keys(
        &self,
        filter: &KeyFilter,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<StoredKey>, Option<String>)> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(StoreError::Invalid(format!("limit must be between 1 and {MAX_PAGE}")));
        }
        let after = cursor.map(|c| decode_cursor(c, filter.order)).transpose()?;
        dispatch!(self.list_keys(filter, limit, after))
    }

    /// Applies `patch`. A patch that changes nothing returns the key untouched
    /// (no new version, no audit event).
    pub async fn update_key(&self, id: &str, patch: KeyPatch, actor: &str) -> Result<StoredKey> {
        if patch.status == Some(KeyStatusText::Revoked) {
            return Err(StoreError::Invalid("status: a key is revoked through revoke, not update".into()));
        }
        dispatch!(self.update_key(id, patch, actor))
    }

    /// Revokes a key for good. Revoking a revoked key returns it unchanged.
    pub async fn revoke_key(&self, id: &str, actor: &str) -> Result<StoredKey> {
        dispatch!(self.revoke_key(id, actor))
    }

    /// Creates `new` and lets the old key expire at the latest `grace` from now.
    /// Returns (old, new).
    pub async fn rotate_key(
        &self,
        id: &str,
        new: NewKey,
        grace: Duration,
        actor: &str,
    ) -> Result<(StoredKey, StoredKey)> {
        validate_new(&new)?;
        dispatch!(self.rotate_key(id, new, grace, actor))
    }

    pub async fn delete_key(&self, id: &str, actor: &str) -> Result<()> {
        dispatch!(self.delete_key(id, actor))
    }

    /// Audit events, newest first, of one key or of all.
    pub async fn audit(&self, key_id: Option<&str>, actor: Option<&str>, limit: u32) -> Result<Vec<AuditEvent>> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(StoreError::Invalid(format!("limit must be between 1 and {MAX_PAGE}")));
        }
        dispatch!(self.audit(key_id, actor, limit))
    }

    /// Changes with a version above `version`, oldest first, and the latest
    /// version. A page holds about `limit` changes (itself at most
    /// [`MAX_CHANGES_PAGE`]): feed rows are taken whole until it holds at least
    /// `limit`, so an import row may take it up to one batch past it, and every
    /// version in it is complete. An upsert carries the key's current record; one
    /// whose key has since been deleted comes as a delete. An import row comes as
    /// one upsert per key still at its version.
    pub async fn changes_since(&self, version: u64, limit: u32) -> Result<(Vec<Change>, u64)> {
        if limit == 0 {
            return Err(StoreError::Invalid("limit must be at least 1".into()));
        }
        let limit = limit.min(MAX_CHANGES_PAGE);
        // Versions above i64::MAX cannot exist; nothing is newer.
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        dispatch!(self.changes_since(version, limit))
    }

    /// The newest feed version (0 for an empty feed).
    pub async fn latest_version(&self) -> Result<u64> {
        dispatch!(self.latest_feed_version())
    }

    /// Starts a bulk import on a connection of its own; see [`Import`].
    pub async fn begin_import(&self) -> Result<Import> {
        let (conn, max_connections) = match self {
            Store::Sqlite(pool, _) => {
                (ImportConn::Sqlite(sqlite::begin_import(pool).await?), pool.options().get_max_connections())
            }
            Store::Postgres(pool) => {
                (ImportConn::Postgres(postgres::begin_import(pool).await?), pool.options().get_max_connections())
            }
        };
        // A pool of one connection is an in-memory database: that connection is the data.
        Ok(Import { conn, written: 0, finished: false, closable: max_connections > 1 })
    }

    /// Every key, in no particular order, streamed by one statement as the caller
    /// takes them: one consistent state of the store, at least as new as a version
    /// read before. A snapshot is read this way, never held whole; the statement holds
    /// one connection until the stream is done or dropped.
    pub fn all_keys(&self) -> futures_util::stream::BoxStream<'_, Result<StoredKey>> {
        match self {
            Store::Sqlite(pool, _) => sqlite::all_keys(pool),
            Store::Postgres(pool) => postgres::all_keys(pool),
        }
    }

    /// [`Store::all_keys`] in the form a gateway needs, in pages of up to `page`
    /// rows: what a snapshot reads.
    pub fn gateway_key_pages(&self, page: usize) -> BoxStream<'_, Result<Vec<GatewayKeyRow>>> {
        use futures_util::{StreamExt as _, TryStreamExt as _};
        let rows = match self {
            Store::Sqlite(_, Some(file)) => return sqlite_pages::gateway_key_pages(file.clone(), page),
            Store::Sqlite(pool, None) => sqlite::gateway_keys(pool),
            Store::Postgres(pool) => postgres::gateway_keys(pool),
        };
        rows.try_chunks(page.max(1)).map_err(|e| e.1).boxed()
    }

    /// About how many keys there are (PostgreSQL's planner estimate; exact on SQLite).
    pub async fn key_count_estimate(&self) -> Result<u64> {
        dispatch!(self.key_count_estimate())
    }

    /// Every key, and a feed version read before them: each key is as of that version
    /// or later, and applying the changes after it gives the current state. Holds the
    /// whole key set: for tests and small stores.
    pub async fn snapshot(&self) -> Result<(u64, Vec<StoredKey>)> {
        use futures_util::TryStreamExt as _;
        let version = self.latest_version().await?;
        let mut keys: Vec<StoredKey> = self.all_keys().try_collect().await?;
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((version, keys))
    }

    /// Adds one usage batch. `Ok(false)`: this `(node, boot_id, sequence)` was
    /// already counted and nothing was added.
    pub async fn ingest_usage(
        &self,
        node: &str,
        boot_id: &str,
        sequence: u64,
        records: &[UsageRecord],
    ) -> Result<bool> {
        let sequence =
            i64::try_from(sequence).map_err(|_| StoreError::Invalid("usage batch sequence is too large".into()))?;
        let batch = UsageAggregate::of(records)?;
        dispatch!(self.ingest_usage(node, boot_id, sequence, &batch))
    }

    /// One exchange of a gateway's fleet sync (`fleet_limits: { engine: control_plane }`):
    /// an answer per op, as Redis would give it.
    pub async fn fleet_exchange(&self, ops: &[crate::limit::fleet::Op]) -> Result<Vec<Option<u64>>> {
        let now = now_ms();
        dispatch!(self.fleet_exchange(ops, now))
    }

    /// Forgets the fleet counters that have expired; how many.
    pub async fn sweep_fleet_counters(&self) -> Result<u64> {
        let now = now_ms();
        dispatch!(self.sweep_fleet_counters(now))
    }

    /// Non-empty buckets of `[from, to)`, ascending, and their totals (with
    /// `start = from`).
    pub async fn usage(
        &self,
        key_id: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
        granularity: Granularity,
    ) -> Result<(Vec<UsageBucket>, UsageBucket)> {
        let (from_ms, to_ms) = (to_ms(from), to_ms(to));
        let rows = if from_ms < to_ms {
            dispatch!(self.usage(key_id, from_ms, to_ms, granularity.millis()))?
        } else {
            UsageRows::default()
        };
        rows.into_buckets(from)
    }

    /// Applies `usage.retention` as of `now`: minute buckets older than `minute` are
    /// rolled up into hours and hours older than `hour` into days (whole hours and
    /// days, at their start, so a query by hour or day answers as before), days older
    /// than `day` are deleted, and batch ids are forgotten once a retry of their batch
    /// is no longer to be expected. Work goes in bounded transactions, so ingestion
    /// carries on meanwhile; running it again, or on several control planes at
    /// once, changes nothing more.
    pub async fn compact_usage(&self, now: OffsetDateTime, retention: &UsageRetention) -> Result<UsageCompaction> {
        let now = to_ms(now);
        let ago = |age: Duration| now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let floor = |ms: i64, width: i64| ms - ms.rem_euclid(width);
        let (hour, day) = (Granularity::Hour.millis(), Granularity::Day.millis());
        // A retried batch is one whose answer was lost: its gateway sends it again at
        // once, or from its spool after a restart. Its id is kept as long as minute
        // buckets (and at least a week), so a replay within that age counts once.
        let ids_kept = retention.minute.max(USAGE_BATCH_IDS_KEPT_AT_LEAST);
        Ok(UsageCompaction {
            hour_buckets: dispatch!(self.roll_up_usage(
                "hour",
                hour,
                floor(ago(retention.minute), hour),
                HOUR_ROLLUP_SLICE_MS
            ))?,
            day_buckets: dispatch!(self.roll_up_usage(
                "day",
                day,
                floor(ago(retention.hour), day),
                DAY_ROLLUP_SLICE_MS
            ))?,
            deleted_buckets: dispatch!(self.delete_usage_before(floor(ago(retention.day), day), DELETE_SLICE_MS))?,
            pruned_batch_ids: dispatch!(self.prune_usage_batches(ago(ids_kept), BATCH_PRUNE_CHUNK))?,
        })
    }

    /// Allowed requests of every key with usage since `since`, for seeding quota
    /// counters after a restart and across gateways.
    pub async fn allowed_since(&self, since: OffsetDateTime) -> Result<Vec<(String, u64)>> {
        dispatch!(self.allowed_since(to_ms(since)))
    }

    /// Allowed requests per key owner since `since`, for quotas shared `by: owner`.
    pub async fn allowed_by_owner_since(&self, since: OffsetDateTime) -> Result<Vec<(String, u64)>> {
        dispatch!(self.allowed_by_owner_since(to_ms(since)))
    }

    /// Allowed requests of a key since `since` (seeds quota counters after a restart).
    pub async fn quota_used(&self, key_id: &str, since: OffsetDateTime) -> Result<u64> {
        dispatch!(self.quota_used(key_id, to_ms(since)))
    }
}

/// What one [`Store::compact_usage`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UsageCompaction {
    /// Hour buckets written or added to by rolling up minutes.
    pub hour_buckets: u64,
    /// Day buckets written or added to by rolling up hours.
    pub day_buckets: u64,
    /// Buckets older than the day retention, deleted.
    pub deleted_buckets: u64,
    /// Batch ids forgotten.
    pub pruned_batch_ids: u64,
}

/// A bulk import in progress. Its batches run on one connection whose temporary
/// table remembers the id, hash and line of every record taken so far, so a line
/// that repeats an earlier one is refused however far back that one was, while
/// the importer's memory stays that of one batch.
pub struct Import {
    conn: ImportConn,
    /// Keys written so far.
    written: u64,
    finished: bool,
    /// Whether an unfinished import may close its connection (see `Drop`).
    closable: bool,
}

enum ImportConn {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

/// Keys an import writes before it refreshes PostgreSQL's statistics (a sample of
/// 30,000 rows: under a second at ten million keys).
const ANALYZE_AFTER_IMPORTING: u64 = 10_000;

/// What one import batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Keys created or changed.
    pub imported: u64,
    /// Keys already stored exactly as given.
    pub unchanged: u64,
    /// `(line, message)` of every record not taken, in line order.
    pub errors: Vec<(u64, String)>,
    /// The feed version of the keys written; `None` when the batch wrote none.
    pub version: Option<u64>,
}

impl Import {
    /// Writes one batch in one transaction, with one feed row and one audit event
    /// (`key.import`) for all the keys it writes. A record that cannot be taken
    /// (it repeats an earlier line's id or hash, its id is stored with another
    /// hash, its hash under another id, or it would change a revoked key) is an
    /// error of its line. `Err`: the batch wrote nothing.
    pub async fn write_batch(&mut self, batch: Vec<ImportKey>, actor: &str) -> Result<BatchOutcome> {
        let outcome = match &mut self.conn {
            ImportConn::Sqlite(conn) => sqlite::import_batch(conn, batch, actor).await,
            ImportConn::Postgres(conn) => postgres::import_batch(conn, batch, actor).await,
        }?;
        self.written += outcome.imported;
        Ok(outcome)
    }

    /// Forgets the records remembered and hands the connection back to the pool.
    /// After a large import, PostgreSQL's statistics are brought up to date: the
    /// listing's plans depend on them, and autovacuum may be late or off (a
    /// filter planned for an empty table took seconds at ten million keys).
    pub async fn finish(mut self) -> Result<()> {
        let large = self.written >= ANALYZE_AFTER_IMPORTING;
        match &mut self.conn {
            ImportConn::Sqlite(conn) => {
                sqlite::end_import(conn).await?;
                if large {
                    sqlite::refresh_statistics(conn).await?;
                }
            }
            ImportConn::Postgres(conn) => {
                postgres::end_import(conn).await?;
                if large {
                    postgres::refresh_statistics(conn).await?;
                }
            }
        }
        self.finished = true;
        Ok(())
    }
}

/// An import that did not finish (a store error, an upload that broke off) still
/// holds its table of records taken: its connection is closed, which drops that
/// table, rather than handed back to the pool with it.
impl Drop for Import {
    fn drop(&mut self) {
        if self.finished || !self.closable {
            return;
        }
        match &mut self.conn {
            ImportConn::Sqlite(conn) => conn.close_on_drop(),
            ImportConn::Postgres(conn) => conn.close_on_drop(),
        }
    }
}

/// What an import record does to the store.
#[derive(Debug, Clone, PartialEq)]
enum ImportAction {
    /// The key is stored exactly so already.
    Unchanged,
    /// Create or replace the key with this record (its version is set when written).
    Write(Box<StoredKey>),
    /// The record cannot be taken: the message of its line.
    Refuse(String),
}

/// What `record` does, given the stored key with its id (if any), the id of the
/// stored key with its hash (if any) and the time of the batch.
fn import_action(record: ImportKey, by_id: Option<&StoredKey>, hash_owner: Option<&str>, now: i64) -> ImportAction {
    // Compare at stored precision, so re-importing the same times is not a change.
    let stored = |t: OffsetDateTime| from_ms(to_ms(t)).unwrap_or(t);
    let Some(current) = by_id else {
        if let Some(other) = hash_owner {
            return ImportAction::Refuse(format!("hash: already belongs to key {other}"));
        }
        let Ok(at) = from_ms(now) else { return ImportAction::Refuse("the clock is out of range".into()) };
        return ImportAction::Write(Box::new(StoredKey {
            prefix: record.prefix.unwrap_or_default(),
            masked: record.masked.unwrap_or_else(|| "…".into()),
            name: record.name,
            owner: record.owner,
            plan: record.plan,
            scopes: record.scopes,
            ip_allowlist: record.ip_allowlist,
            rate_limit: record.rate_limit,
            quota: record.quota,
            status: record.status,
            expires_at: record.expires_at.map(stored),
            metadata: record.metadata,
            tags: record.tags,
            created_at: record.created_at.map_or(at, stored),
            updated_at: at,
            last_used_at: None,
            version: 0,
            imported: true,
            id: record.id,
            hash: record.hash,
        }));
    };
    if current.hash != record.hash {
        return ImportAction::Refuse(format!("id: {} is stored with another hash", record.id));
    }
    let mut next = current.clone();
    next.prefix = record.prefix.unwrap_or_else(|| current.prefix.clone());
    next.masked = record.masked.unwrap_or_else(|| current.masked.clone());
    next.name = record.name;
    next.owner = record.owner;
    next.plan = record.plan;
    next.scopes = record.scopes;
    next.ip_allowlist = record.ip_allowlist;
    next.rate_limit = record.rate_limit;
    next.quota = record.quota;
    next.status = record.status;
    next.expires_at = record.expires_at.map(stored);
    next.metadata = record.metadata;
    next.tags = record.tags;
    next.created_at = record.created_at.map_or(current.created_at, stored);
    if next == *current {
        return ImportAction::Unchanged;
    }
    if current.status == KeyStatusText::Revoked {
        return ImportAction::Refuse(format!("status: {} is revoked, and revoked keys cannot be changed", record.id));
    }
    match from_ms(now) {
        Ok(at) => next.updated_at = at,
        Err(_) => return ImportAction::Refuse("the clock is out of range".into()),
    }
    ImportAction::Write(Box::new(next))
}

async fn connect_sqlite(url: &str) -> Result<Store> {
    let memory = url.contains(":memory:") || url.contains("mode=memory");
    let mut options = SqliteConnectOptions::from_str(url)?
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10))
        .create_if_missing(true);
    let file = (!memory).then(|| options.get_filename().to_path_buf());
    let pool_options = if memory {
        // Each connection to `:memory:` would be its own database: keep exactly one, forever.
        SqlitePoolOptions::new().max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None)
    } else {
        if let Some(dir) = options.get_filename().parent().filter(|d| !d.as_os_str().is_empty()) {
            create_dir(dir)?;
        }
        // WAL: readers (the sync feed, listings) never wait for the writer.
        options = options.journal_mode(SqliteJournalMode::Wal).synchronous(SqliteSynchronous::Normal);
        SqlitePoolOptions::new().max_connections(4)
    };
    let pool = pool_options.acquire_timeout(Duration::from_secs(10)).connect_with(options).await?;
    sqlx::migrate!("migrations/sqlite").run(&pool).await?;
    Ok(Store::Sqlite(pool, file))
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))
}

fn validate_new(new: &NewKey) -> Result<()> {
    if new.id.is_empty() || new.id.len() > 64 {
        return Err(StoreError::Invalid("id: must be 1 to 64 characters".into()));
    }
    KeyDigest::parse(&new.hash).map_err(|e| StoreError::Invalid(format!("hash: {e}")))?;
    Ok(())
}

/// The store's own check of an import record, as `validate_new` for a new key.
fn validate_import(record: &ImportKey) -> std::result::Result<(), String> {
    if record.id.is_empty() || record.id.len() > 64 {
        return Err("id: must be 1 to 64 characters".into());
    }
    KeyDigest::parse(&record.hash).map_err(|e| format!("hash: {e}"))?;
    Ok(())
}

// ---- conversions between rows and the model ----

/// Unix milliseconds, rounded down.
fn to_ms(t: OffsetDateTime) -> i64 {
    // OffsetDateTime spans ±9999 years, well inside i64 milliseconds.
    t.unix_timestamp_nanos().div_euclid(1_000_000) as i64
}

fn from_ms(ms: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map_err(corrupt)
}

fn now_ms() -> i64 {
    to_ms(OffsetDateTime::now_utc())
}

/// A stored value the store cannot read back (a bug or a hand-edited database).
fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(sqlx::Error::Decode(format!("unreadable stored value: {e}").into()))
}

fn to_u64(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(corrupt)
}

fn to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| StoreError::Invalid(format!("count {n} is too large")))
}

fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn unjson<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(corrupt)
}

/// Maps a unique-constraint violation (a concurrent writer won a race) to `Conflict`.
fn conflict_on_unique(e: sqlx::Error, message: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message.into()),
        _ => StoreError::Database(e),
    }
}

/// One row of `keys`, as stored: what a gateway needs, and the rest.
#[derive(sqlx::FromRow)]
struct KeyRow {
    #[sqlx(flatten)]
    served: GatewayKeyRow,
    prefix: String,
    masked: String,
    created_at: i64,
    updated_at: i64,
    last_used_at: Option<i64>,
    version: i64,
}

impl KeyRow {
    fn into_key(self) -> Result<StoredKey> {
        let GatewayKeyRow {
            id,
            hash,
            name,
            owner,
            plan,
            scopes,
            ip_allowlist,
            rate_limit,
            quota,
            status,
            expires_at,
            metadata,
            tags,
            imported,
        } = self.served;
        Ok(StoredKey {
            status: KeyStatusText::parse(&status).ok_or_else(|| corrupt(format!("status {status:?}")))?,
            scopes: unjson(&scopes)?,
            ip_allowlist: unjson(&ip_allowlist)?,
            rate_limit: rate_limit.as_deref().map(unjson::<RateLimitConfig>).transpose()?,
            quota: quota.as_deref().map(unjson::<QuotaConfig>).transpose()?,
            expires_at: expires_at.map(from_ms).transpose()?,
            metadata: unjson(&metadata)?,
            tags: unjson(&tags)?,
            created_at: from_ms(self.created_at)?,
            updated_at: from_ms(self.updated_at)?,
            last_used_at: self.last_used_at.map(from_ms).transpose()?,
            version: to_u64(self.version)?,
            imported,
            id,
            hash,
            prefix: self.prefix,
            masked: self.masked,
            name,
            owner,
            plan,
        })
    }
}

/// What a gateway needs of one key, as stored: a snapshot reads every key in this
/// form. Fewer columns than [`KeyRow`] and its JSON left as text until [`wire`]
/// borrows from it, so ten million keys stream without building each as a
/// [`StoredKey`]. The result is the same as [`crate::control::snapshot::wire_key`]
/// of the stored key.
///
/// [`wire`]: GatewayKeyRow::wire
#[derive(sqlx::FromRow)]
pub struct GatewayKeyRow {
    id: String,
    hash: String,
    name: String,
    owner: Option<String>,
    plan: Option<String>,
    scopes: String,
    ip_allowlist: String,
    rate_limit: Option<String>,
    quota: Option<String>,
    status: String,
    expires_at: Option<i64>,
    metadata: String,
    tags: String,
    imported: bool,
}

impl GatewayKeyRow {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key in wire form, borrowing the row's text. An unusable hash or a stored
    /// value that does not parse is an error: the key cannot be served as stored.
    pub fn wire(&self) -> Result<WireKey<'_>> {
        /// A JSON string, borrowed from the row unless it holds escapes.
        #[derive(serde::Deserialize)]
        struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
        fn strings(column: &str) -> Result<Vec<Cow<'_, str>>> {
            let texts: Vec<Text<'_>> = serde_json::from_str(column).map_err(corrupt)?;
            Ok(texts.into_iter().map(|t| t.0).collect())
        }
        let digest = KeyDigest::parse(&self.hash).map_err(|e| corrupt(format!("hash of {}: {e}", self.id)))?;
        let status = KeyStatusText::parse(&self.status).ok_or_else(|| corrupt(format!("status {:?}", self.status)))?;
        // Stored compact by the admin API and the import; checked, never rebuilt.
        let metadata = match self.metadata.as_str() {
            "{}" => None,
            text => {
                if !text.starts_with('{') {
                    return Err(corrupt(format!("metadata of {} is no object", self.id)));
                }
                serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(corrupt)?;
                Some(Cow::Borrowed(text))
            }
        };
        Ok(WireKey {
            digest: digest.0,
            id: Cow::Borrowed(&self.id),
            name: (self.name != self.id).then_some(Cow::Borrowed(self.name.as_str())),
            owner: self.owner.as_deref().map(Cow::Borrowed),
            plan: self.plan.as_deref().map(Cow::Borrowed),
            scopes: strings(&self.scopes)?,
            ip_allowlist: strings(&self.ip_allowlist)?,
            ip_allowlist_unusable: false,
            rate_limit: self
                .rate_limit
                .as_deref()
                .map(unjson::<RateLimitConfig>)
                .transpose()?
                .as_ref()
                .map(WireRate::from),
            quota: self.quota.as_deref().map(unjson::<QuotaConfig>).transpose()?.as_ref().map(WireQuota::from),
            status: status.into(),
            expires_at_ms: self.expires_at,
            metadata,
            tags: strings(&self.tags)?,
            imported: self.imported,
        })
    }
}

/// The settable columns of a key, encoded for binding.
struct KeyColumns {
    scopes: String,
    ip_allowlist: String,
    rate_limit: Option<String>,
    quota: Option<String>,
    expires_at: Option<i64>,
    metadata: String,
    tags: String,
}

impl KeyColumns {
    fn of(key: &StoredKey) -> Result<Self> {
        Ok(KeyColumns {
            scopes: json(&key.scopes)?,
            ip_allowlist: json(&key.ip_allowlist)?,
            rate_limit: key.rate_limit.as_ref().map(json).transpose()?,
            quota: key.quota.as_ref().map(json).transpose()?,
            expires_at: key.expires_at.map(to_ms),
            metadata: json(&key.metadata)?,
            tags: json(&key.tags)?,
        })
    }
}

/// The record a new key will have (before the store assigns its version).
fn key_from_new(new: NewKey, now: i64) -> Result<StoredKey> {
    let now = from_ms(now)?;
    Ok(StoredKey {
        id: new.id,
        hash: new.hash,
        prefix: new.prefix,
        masked: new.masked,
        name: new.name,
        owner: new.owner,
        plan: new.plan,
        scopes: new.scopes,
        ip_allowlist: new.ip_allowlist,
        rate_limit: new.rate_limit,
        quota: new.quota,
        status: KeyStatusText::Active,
        expires_at: new.expires_at,
        metadata: new.metadata,
        tags: new.tags,
        created_at: now,
        updated_at: now,
        last_used_at: None,
        version: 0,
        imported: false,
    })
}

/// `key` with `patch` applied, and the names of the fields whose value changed.
fn apply_patch(key: &StoredKey, patch: KeyPatch) -> (StoredKey, Vec<&'static str>) {
    let mut next = key.clone();
    let mut changed = Vec::new();
    fn set<T: PartialEq>(field: &mut T, value: Option<T>, name: &'static str, changed: &mut Vec<&'static str>) {
        if let Some(value) = value {
            if *field != value {
                *field = value;
                changed.push(name);
            }
        }
    }
    // Compare at stored precision, so re-sending the same expiry is not a change.
    let expires_at = patch.expires_at.map(|at| at.map(|t| from_ms(to_ms(t)).unwrap_or(t)));
    set(&mut next.name, patch.name, "name", &mut changed);
    set(&mut next.owner, patch.owner, "owner", &mut changed);
    set(&mut next.plan, patch.plan, "plan", &mut changed);
    set(&mut next.scopes, patch.scopes, "scopes", &mut changed);
    set(&mut next.ip_allowlist, patch.ip_allowlist, "ip_allowlist", &mut changed);
    set(&mut next.rate_limit, patch.rate_limit, "rate_limit", &mut changed);
    set(&mut next.quota, patch.quota, "quota", &mut changed);
    set(&mut next.status, patch.status, "status", &mut changed);
    set(&mut next.expires_at, expires_at, "expires_at", &mut changed);
    set(&mut next.metadata, patch.metadata, "metadata", &mut changed);
    set(&mut next.tags, patch.tags, "tags", &mut changed);
    (next, changed)
}

// ---- list cursor ----

/// Position after the last key of a page: (created_at ms, id).
type Cursor = (i64, String);

/// Hex of `created_at_ms:id` (`used:last_used_ms:id` in last-use order): opaque to
/// clients, trivial to check.
fn encode_cursor(key: &StoredKey, order: KeyOrder) -> String {
    match order {
        KeyOrder::Created => hex::encode(format!("{}:{}", to_ms(key.created_at), key.id)),
        KeyOrder::LastUsed => hex::encode(format!("used:{}:{}", key.last_used_at.map_or(0, to_ms), key.id)),
    }
}

fn decode_cursor(text: &str, order: KeyOrder) -> Result<Cursor> {
    let invalid = || StoreError::Invalid("cursor: not a cursor returned by this listing".into());
    let bytes = hex::decode(text).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let text = match order {
        KeyOrder::Created => text.as_str(),
        KeyOrder::LastUsed => text.strip_prefix("used:").ok_or_else(invalid)?,
    };
    let (ms, id) = text.split_once(':').ok_or_else(invalid)?;
    let ms = ms.parse::<i64>().map_err(|_| invalid())?;
    if id.is_empty() {
        return Err(invalid());
    }
    Ok((ms, id.to_owned()))
}

/// `%needle%` for `LIKE … ESCAPE '\'`, lowercased, with wildcards in the needle escaped.
fn like_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for c in needle.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Whether pg_trgm's index can narrow a search for `needle`: it takes trigrams from runs
/// of letters and digits, and a needle without a run of three has only rare-to-useless
/// ones (word-boundary padding), which would read most of the index.
fn trigram_indexable(needle: &str) -> bool {
    let mut run = 0;
    needle.chars().any(|c| {
        run = if c.is_alphanumeric() { run + 1 } else { 0 };
        run >= 3
    })
}

/// The FTS5 query for `needle` as one phrase (a substring, on the trigram index), or
/// `None` when it is shorter than a trigram and the index cannot answer.
fn fts_phrase(needle: &str) -> Option<String> {
    let needle = needle.to_lowercase();
    (needle.chars().count() >= 3).then(|| format!("\"{}\"", needle.replace('"', "\"\"")))
}

// ---- usage ----

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    requests: u64,
    allowed: u64,
    s2xx: u64,
    s3xx: u64,
    s4xx: u64,
    s5xx: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// A usage batch folded into per-key minute buckets, sorted so that concurrent
/// writers touch rows in one order (no deadlocks on PostgreSQL).
#[derive(Debug, Default)]
struct UsageAggregate {
    buckets: BTreeMap<(String, i64), Counts>,
    denied: BTreeMap<(String, i64, String), u64>,
    last_used: BTreeMap<String, i64>,
}

impl UsageAggregate {
    /// The start of the oldest bucket.
    fn oldest_bucket(&self) -> Option<i64> {
        self.buckets.keys().map(|(_, start)| *start).min()
    }

    fn of(records: &[UsageRecord]) -> Result<Self> {
        let mut agg = UsageAggregate::default();
        for r in records {
            // The minute (UTC) in which the window ended.
            let bucket = to_ms(r.window_end).div_euclid(60_000) * 60_000;
            let c = agg.buckets.entry((r.key_id.clone(), bucket)).or_default();
            let add = |a: &mut u64, b: u64| -> Result<()> {
                *a = a.checked_add(b).ok_or_else(|| StoreError::Invalid("usage counts overflow".into()))?;
                Ok(())
            };
            add(&mut c.requests, r.requests)?;
            add(&mut c.allowed, r.allowed)?;
            add(&mut c.s2xx, r.status.s2xx)?;
            add(&mut c.s3xx, r.status.s3xx)?;
            add(&mut c.s4xx, r.status.s4xx)?;
            add(&mut c.s5xx, r.status.s5xx)?;
            add(&mut c.bytes_in, r.bytes_in)?;
            add(&mut c.bytes_out, r.bytes_out)?;
            for (code, n) in &r.denied {
                add(agg.denied.entry((r.key_id.clone(), bucket, code.clone())).or_default(), *n)?;
            }
            if let Some(at) = r.last_used_at {
                let at = to_ms(at);
                let seen = agg.last_used.entry(r.key_id.clone()).or_insert(at);
                *seen = (*seen).max(at);
            }
        }
        Ok(agg)
    }
}

/// One rolled-up bucket as summed by the database.
#[derive(sqlx::FromRow)]
struct BucketSums {
    bucket: i64,
    requests: i64,
    allowed: i64,
    s2xx: i64,
    s3xx: i64,
    s4xx: i64,
    s5xx: i64,
    bytes_in: i64,
    bytes_out: i64,
}

impl BucketSums {
    fn into_counts(self) -> Result<(i64, Counts)> {
        Ok((
            self.bucket,
            Counts {
                requests: to_u64(self.requests)?,
                allowed: to_u64(self.allowed)?,
                s2xx: to_u64(self.s2xx)?,
                s3xx: to_u64(self.s3xx)?,
                s4xx: to_u64(self.s4xx)?,
                s5xx: to_u64(self.s5xx)?,
                bytes_in: to_u64(self.bytes_in)?,
                bytes_out: to_u64(self.bytes_out)?,
            },
        ))
    }
}

/// Rolled-up rows as read from the database: `(start ms, counts)` and
/// `(start ms, code, n)`.
#[derive(Debug, Default)]
struct UsageRows {
    buckets: Vec<(i64, Counts)>,
    denied: Vec<(i64, String, u64)>,
}

impl UsageRows {
    fn into_buckets(self, from: OffsetDateTime) -> Result<(Vec<UsageBucket>, UsageBucket)> {
        let mut by_start: BTreeMap<i64, UsageBucket> = BTreeMap::new();
        for (start, c) in self.buckets {
            let bucket = match by_start.entry(start) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(UsageBucket::empty(from_ms(start)?)),
            };
            bucket.add(&UsageBucket {
                start: bucket.start,
                requests: c.requests,
                allowed: c.allowed,
                denied: BTreeMap::new(),
                status: crate::control::model::StatusCounts { s2xx: c.s2xx, s3xx: c.s3xx, s4xx: c.s4xx, s5xx: c.s5xx },
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
            });
        }
        for (start, code, n) in self.denied {
            if n == 0 {
                continue;
            }
            let bucket = match by_start.entry(start) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(UsageBucket::empty(from_ms(start)?)),
            };
            *bucket.denied.entry(code).or_default() += n;
        }
        let buckets: Vec<UsageBucket> = by_start.into_values().filter(|b| !b.is_empty()).collect();
        let mut totals = UsageBucket::empty(from);
        for b in &buckets {
            totals.add(b);
        }
        Ok((buckets, totals))
    }
}

/// Distinct ids, in first-seen order.
fn distinct<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = BTreeSet::new();
    ids.filter(|id| seen.insert(*id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn key() -> StoredKey {
        key_from_new(
            NewKey {
                id: "key_a".into(),
                hash: format!("sha256:{}", "a".repeat(64)),
                prefix: "kg_live".into(),
                masked: "kg_live_Ab3d…x9Zq".into(),
                name: "a".into(),
                owner: Some("o".into()),
                plan: None,
                scopes: vec![],
                ip_allowlist: vec![],
                rate_limit: None,
                quota: None,
                expires_at: None,
                metadata: serde_json::Map::new(),
                tags: vec![],
            },
            1_700_000_000_000,
        )
        .unwrap()
    }

    fn import_record(key: &StoredKey) -> ImportKey {
        ImportKey {
            line: 1,
            id: key.id.clone(),
            hash: key.hash.clone(),
            prefix: None,
            masked: None,
            name: key.name.clone(),
            owner: key.owner.clone(),
            plan: key.plan.clone(),
            scopes: key.scopes.clone(),
            ip_allowlist: key.ip_allowlist.clone(),
            rate_limit: key.rate_limit,
            quota: key.quota,
            status: key.status,
            expires_at: key.expires_at,
            metadata: key.metadata.clone(),
            tags: key.tags.clone(),
            created_at: None,
        }
    }

    const LATER: i64 = 1_800_000_000_000;

    #[test]
    fn an_import_of_a_new_key_marks_it_imported_with_unknown_shape() {
        let mut record = import_record(&key());
        record.created_at = Some(datetime!(2019-05-01 12:00:00.123456 UTC));
        let ImportAction::Write(written) = import_action(record, None, None, LATER) else { panic!("not written") };
        assert!(written.imported);
        assert_eq!((written.prefix.as_str(), written.masked.as_str()), ("", "…"));
        assert_eq!(written.created_at, datetime!(2019-05-01 12:00:00.123 UTC), "stored to the millisecond");
        assert_eq!(to_ms(written.updated_at), LATER);
    }

    #[test]
    fn an_import_that_matches_the_stored_key_changes_nothing() {
        let stored = key();
        let mut record = import_record(&stored);
        record.created_at = Some(stored.created_at + time::Duration::microseconds(300));
        assert_eq!(import_action(record, Some(&stored), Some(&stored.id), LATER), ImportAction::Unchanged);
        let revoked = StoredKey { status: KeyStatusText::Revoked, ..key() };
        assert_eq!(
            import_action(import_record(&revoked), Some(&revoked), Some(&revoked.id), LATER),
            ImportAction::Unchanged
        );
    }

    #[test]
    fn an_import_that_changes_a_field_rewrites_the_key_and_keeps_what_it_does_not_give() {
        let stored = StoredKey { imported: false, ..key() };
        let record = ImportKey { owner: Some("other".into()), ..import_record(&stored) };
        let ImportAction::Write(written) = import_action(record, Some(&stored), Some(&stored.id), LATER) else {
            panic!("not written")
        };
        assert_eq!(written.owner.as_deref(), Some("other"));
        assert_eq!((written.prefix.as_str(), written.masked.as_str()), ("kg_live", "kg_live_Ab3d…x9Zq"));
        assert_eq!(written.created_at, stored.created_at);
        assert!(!written.imported, "a key keygate issued keeps its shape");
        assert_eq!(to_ms(written.updated_at), LATER);
    }

    #[test]
    fn an_import_that_conflicts_is_refused_naming_the_field() {
        let stored = key();
        let other_hash = ImportKey { hash: format!("sha256:{}", "b".repeat(64)), ..import_record(&stored) };
        let refused = |action| match action {
            ImportAction::Refuse(message) => message,
            other => panic!("not refused: {other:?}"),
        };
        assert!(refused(import_action(other_hash, Some(&stored), None, LATER)).starts_with("id: key_a"));
        let other_id = ImportKey { id: "key_b".into(), ..import_record(&stored) };
        assert_eq!(refused(import_action(other_id, None, Some("key_a"), LATER)), "hash: already belongs to key key_a");
        let revoked = StoredKey { status: KeyStatusText::Revoked, ..key() };
        let revive = ImportKey { status: KeyStatusText::Active, ..import_record(&revoked) };
        assert!(refused(import_action(revive, Some(&revoked), Some("key_a"), LATER)).starts_with("status:"));
    }

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let k = key();
        let cursor = encode_cursor(&k, KeyOrder::Created);
        assert_eq!(decode_cursor(&cursor, KeyOrder::Created).unwrap(), (1_700_000_000_000, "key_a".to_owned()));
        assert!(matches!(decode_cursor(&cursor, KeyOrder::LastUsed), Err(StoreError::Invalid(_))));
        for bad in ["", "zz", &hex::encode("no-colon"), &hex::encode("x:key_a"), &hex::encode("12:")] {
            assert!(matches!(decode_cursor(bad, KeyOrder::Created), Err(StoreError::Invalid(_))), "{bad}");
        }
        let used = StoredKey { last_used_at: Some(k.created_at + time::Duration::SECOND), ..key() };
        let cursor = encode_cursor(&used, KeyOrder::LastUsed);
        assert_eq!(decode_cursor(&cursor, KeyOrder::LastUsed).unwrap(), (1_700_000_001_000, "key_a".to_owned()));
        assert_eq!(decode_cursor(&encode_cursor(&k, KeyOrder::LastUsed), KeyOrder::LastUsed).unwrap().0, 0);
    }

    #[test]
    fn like_pattern_escapes_wildcards() {
        assert_eq!(like_pattern("A_b%c\\"), "%a\\_b\\%c\\\\%");
    }

    #[test]
    fn trigram_index_needs_three_letters_or_digits_in_a_row() {
        for yes in ["abc", "org-09999", "a b cde", "été", "x1y"] {
            assert!(trigram_indexable(yes), "{yes}");
        }
        for no in ["", "ab", "a b c", "g s", "ab-cd", "%_\\", "a\u{1}bc"] {
            assert!(!trigram_indexable(no), "{no}");
        }
    }

    #[test]
    fn fts_phrase_quotes_and_needs_a_trigram() {
        assert_eq!(fts_phrase("Ab\"c").as_deref(), Some("\"ab\"\"c\""));
        assert_eq!(fts_phrase("a%_").as_deref(), Some("\"a%_\""));
        assert_eq!(fts_phrase("ab"), None);
        assert_eq!(fts_phrase("éé"), None);
        assert_eq!(fts_phrase("ééé").as_deref(), Some("\"ééé\""));
    }

    #[test]
    fn patch_reports_only_fields_that_change() {
        let k = key();
        let (next, changed) = apply_patch(
            &k,
            KeyPatch {
                name: Some("a".into()),
                owner: Some(None),
                plan: Some(Some("pro".into())),
                ..KeyPatch::default()
            },
        );
        assert_eq!(changed, ["owner", "plan"]);
        assert_eq!(next.owner, None);
        assert_eq!(next.plan.as_deref(), Some("pro"));
        assert_eq!(next.name, "a");
        assert!(apply_patch(&k, KeyPatch::default()).1.is_empty());
    }

    #[test]
    fn usage_is_bucketed_by_the_minute_the_window_ended() {
        let record = |end: OffsetDateTime| UsageRecord {
            node: "n".into(),
            key_id: "key_a".into(),
            window_start: end - time::Duration::seconds(5),
            window_end: end,
            requests: 3,
            allowed: 2,
            denied: [("rate_limited".to_owned(), 1)].into(),
            status: Default::default(),
            bytes_in: 1,
            bytes_out: 2,
            last_used_at: Some(end),
            owner_at_count: None,
        };
        let agg = UsageAggregate::of(&[
            record(datetime!(2026-01-01 10:00:05 UTC)),
            record(datetime!(2026-01-01 10:00:59.999 UTC)),
            record(datetime!(2026-01-01 10:01:00 UTC)),
        ])
        .unwrap();
        let minute = to_ms(datetime!(2026-01-01 10:00 UTC));
        assert_eq!(agg.buckets[&("key_a".to_owned(), minute)].requests, 6);
        assert_eq!(agg.buckets[&("key_a".to_owned(), minute + 60_000)].requests, 3);
        assert_eq!(agg.denied[&("key_a".to_owned(), minute, "rate_limited".to_owned())], 2);
        assert_eq!(agg.last_used["key_a"], minute + 60_000);
    }
}
