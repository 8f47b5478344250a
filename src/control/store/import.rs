//! A bulk import in progress, and what it decides for each record.

use super::*;

/// A bulk import in progress. Its batches run on one connection whose temporary
/// table remembers the id, hash and line of every record taken so far, so a line
/// that repeats an earlier one is refused however far back that one was, while
/// the importer's memory stays that of one batch.
pub struct Import {
    pub(super) conn: ImportConn,
    /// Keys written so far.
    pub(super) written: u64,
    pub(super) finished: bool,
    /// Whether an unfinished import may close its connection (see `Drop`).
    pub(super) closable: bool,
}

pub(super) enum ImportConn {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

/// Keys an import writes before it refreshes PostgreSQL's statistics (a sample of
/// 30,000 rows: under a second at ten million keys).
pub(super) const ANALYZE_AFTER_IMPORTING: u64 = 10_000;

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
pub(super) enum ImportAction {
    /// The key is stored exactly so already.
    Unchanged,
    /// Create or replace the key with this record (its version is set when written).
    Write(Box<StoredKey>),
    /// The record cannot be taken: the message of its line.
    Refuse(String),
}

/// What `record` does, given the stored key with its id (if any), the id of the
/// stored key with its hash (if any) and the time of the batch.
pub(super) fn import_action(
    record: ImportKey,
    by_id: Option<&StoredKey>,
    hash_owner: Option<&str>,
    now: i64,
) -> ImportAction {
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

/// The store's own check of an import record, as `validate_new` for a new key.
pub(super) fn validate_import(record: &ImportKey) -> std::result::Result<(), String> {
    if record.id.is_empty() || record.id.len() > 64 {
        return Err("id: must be 1 to 64 characters".into());
    }
    KeyDigest::parse(&record.hash).map_err(|e| format!("hash: {e}"))?;
    Ok(())
}
