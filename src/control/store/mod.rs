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
//! text. The SQL is written once and compiled per backend with concrete sqlx types;
//! `$N` placeholders work on both: keys, listing, feed and audit in `ops.rs`, the
//! import in `import_ops.rs`, usage in `usage_ops.rs`, fleet counters in
//! `fleet_ops.rs`, the event log and webhook cursors in `event_ops.rs`. Beside them:
//! rows and their conversions (`rows.rs`), a running import (`import.rs`), the event
//! log's `Store` calls (`event_log.rs`) and the snapshot's own SQLite read
//! (`sqlite_pages.rs`).

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
    include!("import_ops.rs");
    include!("usage_ops.rs");
    include!("fleet_ops.rs");
    include!("event_ops.rs");
}

mod sqlite_pages;

mod postgres {
    type Db = sqlx::Postgres;
    const DIALECT: super::Dialect = super::Dialect::Postgres;
    include!("ops.rs");
    include!("import_ops.rs");
    include!("usage_ops.rs");
    include!("fleet_ops.rs");
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
mod import;
mod rows;

pub use event_log::{WebhookCursor, EVENTS_KEPT};
use import::*;
pub use import::{BatchOutcome, Import};
pub use rows::GatewayKeyRow;
use rows::*;

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

#[cfg(test)]
mod tests;
