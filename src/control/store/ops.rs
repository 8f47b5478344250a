// Store operations on keys, the listing, the feed and the audit log, included by
// `mod sqlite` and `mod postgres` in `mod.rs` with `Db` and `DIALECT` defined: the
// same SQL, compiled against each backend's concrete sqlx types. Placeholders are
// `$N`, which both backends accept. The import, usage, fleet and event operations
// follow in `import_ops.rs`, `usage_ops.rs`, `fleet_ops.rs` and `event_ops.rs`.

use std::collections::HashMap;

use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, Pool, QueryBuilder, Transaction};

use super::{
    conflict_on_unique, corrupt, distinct, from_ms, fts_phrase, fts_rare_trigrams, fts_trigrams, import_action, key_from_new, like_pattern, now_ms,
    to_i64, to_u64, trigram_indexable, unjson, AuditEvent, BatchOutcome, BucketSums, Change, Cursor, Dialect,
    GatewayKeyRow, ImportAction, KeyColumns, KeyFilter, KeyOrder, KeyPatch, KeyRow, KeyStatusText, NewKey, Result, StoreError, StoredKey,
    UsageAggregate, UsageRows, FEED_LOCK_KEY, ROLLUP_LOCK_KEY,
};
use crate::control::model::{ImportKey, KeyChange};
use crate::limit::fleet::Op as FleetOp;

type Conn = <Db as sqlx::Database>::Connection;

/// Rows per multi-row INSERT: 10 binds a row stays far below both backends' limits.
const INSERT_CHUNK: usize = 500;

/// A transaction for a key mutation. SQLite: `BEGIN IMMEDIATE` takes the write
/// lock up front, so two writers wait for each other instead of failing on a
/// read-to-write upgrade. PostgreSQL: the feed lock orders versions by commit.
async fn begin_key_write(pool: &Pool<Db>) -> Result<Transaction<'static, Db>> {
    match DIALECT {
        Dialect::Sqlite => Ok(pool.begin_with("BEGIN IMMEDIATE").await?),
        Dialect::Postgres => {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(FEED_LOCK_KEY).execute(&mut *tx).await?;
            Ok(tx)
        }
    }
}

/// `begin_key_write` on a connection held for longer (an import).
async fn begin_key_write_on(conn: &mut Conn) -> Result<Transaction<'_, Db>> {
    match DIALECT {
        Dialect::Sqlite => Ok(conn.begin_with("BEGIN IMMEDIATE").await?),
        Dialect::Postgres => {
            let mut tx = conn.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(FEED_LOCK_KEY).execute(&mut *tx).await?;
            Ok(tx)
        }
    }
}

/// A transaction that writes usage only; it does not touch the feed.
async fn begin_usage_write(pool: &Pool<Db>) -> Result<Transaction<'static, Db>> {
    match DIALECT {
        Dialect::Sqlite => Ok(pool.begin_with("BEGIN IMMEDIATE").await?),
        Dialect::Postgres => Ok(pool.begin().await?),
    }
}

/// A read transaction that sees one consistent state for all its statements.
/// SQLite in WAL mode keeps the snapshot of a transaction's first read.
async fn begin_read(pool: &Pool<Db>) -> Result<Transaction<'static, Db>> {
    match DIALECT {
        Dialect::Sqlite => Ok(pool.begin().await?),
        Dialect::Postgres => Ok(pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?),
    }
}

async fn fetch_key(conn: &mut Conn, id: &str) -> Result<Option<StoredKey>> {
    let row: Option<KeyRow> = sqlx::query_as(concat!("SELECT ", key_columns!(), " FROM keys WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(KeyRow::into_key).transpose()
}

async fn fetch_keys(conn: &mut Conn, ids: &[&str]) -> Result<HashMap<String, StoredKey>> {
    let mut keys = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Db>::new(concat!("SELECT ", key_columns!(), " FROM keys WHERE id IN ("));
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        qb.push(")");
        let rows: Vec<KeyRow> = qb.build_query_as().fetch_all(&mut *conn).await?;
        for row in rows {
            let key = row.into_key()?;
            keys.insert(key.id.clone(), key);
        }
    }
    Ok(keys)
}

async fn latest_version(conn: &mut Conn) -> Result<u64> {
    let latest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM changes").fetch_one(&mut *conn).await?;
    to_u64(latest)
}

/// Appends to the feed and returns the new version. `key_id` and `hash` are
/// `None` only for an import row.
async fn append_change(
    conn: &mut Conn,
    key_id: Option<&str>,
    hash: Option<&str>,
    op: &str,
    at: i64,
) -> Result<i64> {
    Ok(sqlx::query_scalar("INSERT INTO changes (key_id, hash, op, at) VALUES ($1, $2, $3, $4) RETURNING version")
        .bind(key_id)
        .bind(hash)
        .bind(op)
        .bind(at)
        .fetch_one(&mut *conn)
        .await?)
}

async fn append_audit(
    conn: &mut Conn,
    at: i64,
    actor: &str,
    action: &str,
    key_id: &str,
    details: serde_json::Value,
) -> Result<()> {
    append_audit_event(conn, at, actor, action, Some(key_id), details).await
}

/// An audit event about one key, or (`key_id` `None`) about many.
async fn append_audit_event(
    conn: &mut Conn,
    at: i64,
    actor: &str,
    action: &str,
    key_id: Option<&str>,
    details: serde_json::Value,
) -> Result<()> {
    sqlx::query("INSERT INTO audit_log (at, actor, action, key_id, details) VALUES ($1, $2, $3, $4, $5)")
        .bind(at)
        .bind(actor)
        .bind(action)
        .bind(key_id)
        .bind(details.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts a new key with its feed entry and audit event, and returns it as stored.
async fn insert_key(
    conn: &mut Conn,
    new: NewKey,
    now: i64,
    actor: &str,
    details: serde_json::Value,
) -> Result<StoredKey> {
    let existing: Option<(String,)> = sqlx::query_as("SELECT id FROM keys WHERE id = $1 OR hash = $2 LIMIT 1")
        .bind(&new.id)
        .bind(&new.hash)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some((id,)) = existing {
        let what = if id == new.id { "id" } else { "hash" };
        return Err(StoreError::Conflict(format!("a key with this {what} already exists")));
    }
    let key = key_from_new(new, now)?;
    let cols = KeyColumns::of(&key)?;
    let version = append_change(conn, Some(&key.id), Some(&key.hash), "upsert", now).await?;
    sqlx::query(concat!(
        "INSERT INTO keys (",
        key_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, NULL, $18, $19)"
    ))
    .bind(&key.id)
    .bind(&key.hash)
    .bind(&key.prefix)
    .bind(&key.masked)
    .bind(&key.name)
    .bind(&key.owner)
    .bind(&key.plan)
    .bind(&cols.scopes)
    .bind(&cols.ip_allowlist)
    .bind(&cols.rate_limit)
    .bind(&cols.quota)
    .bind(key.status.as_str())
    .bind(cols.expires_at)
    .bind(&cols.metadata)
    .bind(&cols.tags)
    .bind(now)
    .bind(now)
    .bind(version)
    .bind(key.imported)
    .execute(&mut *conn)
    .await
    .map_err(|e| conflict_on_unique(e, "a key with this id or hash already exists"))?;
    append_audit(conn, now, actor, "key.create", &key.id, details).await?;
    fetch_key(conn, &key.id).await?.ok_or(StoreError::NotFound)
}

/// Writes every settable column of `key` and returns it as stored, with a new version.
async fn write_key(conn: &mut Conn, key: &StoredKey, now: i64) -> Result<StoredKey> {
    let cols = KeyColumns::of(key)?;
    let version = append_change(conn, Some(&key.id), Some(&key.hash), "upsert", now).await?;
    sqlx::query(
        "UPDATE keys SET name = $1, owner = $2, plan = $3, scopes = $4, ip_allowlist = $5, rate_limit = $6, \
         quota = $7, status = $8, expires_at = $9, metadata = $10, tags = $11, updated_at = $12, version = $13 \
         WHERE id = $14",
    )
    .bind(&key.name)
    .bind(&key.owner)
    .bind(&key.plan)
    .bind(&cols.scopes)
    .bind(&cols.ip_allowlist)
    .bind(&cols.rate_limit)
    .bind(&cols.quota)
    .bind(key.status.as_str())
    .bind(cols.expires_at)
    .bind(&cols.metadata)
    .bind(&cols.tags)
    .bind(now)
    .bind(version)
    .bind(&key.id)
    .execute(&mut *conn)
    .await?;
    fetch_key(conn, &key.id).await?.ok_or(StoreError::NotFound)
}

pub(super) async fn create_key(pool: &Pool<Db>, new: NewKey, actor: &str) -> Result<StoredKey> {
    let now = now_ms();
    let mut tx = begin_key_write(pool).await?;
    let details = serde_json::json!({ "name": new.name, "masked": new.masked });
    let key = insert_key(&mut tx, new, now, actor, details).await?;
    append_key_event(&mut tx, now, "key.created", &key, serde_json::json!({})).await?;
    tx.commit().await?;
    Ok(key)
}

pub(super) async fn get_key(pool: &Pool<Db>, id: &str) -> Result<Option<StoredKey>> {
    let mut conn = pool.acquire().await?;
    fetch_key(&mut conn, id).await
}

pub(super) async fn get_key_by_hash(pool: &Pool<Db>, hash: &str) -> Result<Option<StoredKey>> {
    let row: Option<KeyRow> = sqlx::query_as(concat!("SELECT ", key_columns!(), " FROM keys WHERE hash = $1"))
        .bind(hash)
        .fetch_optional(pool)
        .await?;
    row.map(KeyRow::into_key).transpose()
}

/// How a listing page answers `q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    /// Through the search index where it can answer, else by testing every key.
    Indexed,
    /// By testing only the first this many keys, in listing order, that pass the other
    /// filters.
    Newest(i64),
}

/// Keys tested in listing order before SQLite asks its search index, per key of the page.
const SQLITE_NEWEST_PER_ROW: i64 = 100;

pub(super) async fn list_keys(
    pool: &Pool<Db>,
    filter: &KeyFilter,
    limit: u32,
    after: Option<Cursor>,
) -> Result<(Vec<StoredKey>, Option<String>)> {
    // One extra row tells whether another page follows.
    let take = i64::from(limit) + 1;
    let needle = filter.q.as_deref().filter(|q| !q.is_empty());
    // SQLite's planner cannot weigh its trigram index against the listing order, and the
    // index costs a lookup and a sort per match: a needle that many keys match is answered
    // far sooner by testing the newest keys. A full page from them is the answer (they are
    // the first in order); else the index answers.
    let mut rows = Vec::new();
    if DIALECT == Dialect::Sqlite && needle.and_then(fts_phrase).is_some() {
        let newest = Search::Newest(take * SQLITE_NEWEST_PER_ROW);
        rows = fetch_page(pool, filter, after.as_ref(), take, newest).await?;
    }
    if rows.len() < take as usize {
        rows = fetch_page(pool, filter, after.as_ref(), take, Search::Indexed).await?;
    }
    let more = rows.len() > limit as usize;
    let keys = rows.into_iter().take(limit as usize).map(KeyRow::into_key).collect::<Result<Vec<_>>>()?;
    let next = if more { keys.last().map(|key| super::encode_cursor(key, filter.order)) } else { None };
    Ok((keys, next))
}

/// Entries counted at most when weighing an owner against a tag.
const DRIVER_PROBE: i64 = 5_000;

/// Whether `owner` has fewer keys than `tag` (each counted up to [`DRIVER_PROBE`] in
/// its index, well under a millisecond). SQLite keeps no per-value statistics, and
/// the walk driven by the larger side can read a whole large account or tag for a
/// page; on a tie the tag drives, as its index carries the owner.
async fn owner_is_smaller(pool: &Pool<Db>, owner: &str, tag: &str) -> Result<bool> {
    let owners: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM (SELECT 1 FROM keys WHERE owner = $1 LIMIT $2)")
        .bind(owner)
        .bind(DRIVER_PROBE)
        .fetch_one(pool)
        .await?;
    let tagged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM (SELECT 1 FROM key_tags WHERE tag = $1 LIMIT $2)")
        .bind(tag)
        .bind(DRIVER_PROBE)
        .fetch_one(pool)
        .await?;
    Ok(owners < tagged)
}

/// Keys, the newest by rowid, in which SQLite's search counts a needle's trigrams.
const FTS_SAMPLE: i64 = 10_000;

/// The FTS5 query that finds candidates for `needle` on SQLite's trigram index: the
/// needle's rarest trigrams (see [`fts_rare_trigrams`]) as counted among the newest
/// [`FTS_SAMPLE`] keys, or the whole needle as a phrase when every trigram is common.
/// A count reads at most the sample's part of the trigram's list (FTS5 seeks to a rowid),
/// well under a millisecond each, where the phrase of a common needle reads whole lists.
async fn fts_match(pool: &Pool<Db>, needle: &str) -> Result<Option<String>> {
    let Some(phrase) = fts_phrase(needle) else { return Ok(None) };
    let trigrams = fts_trigrams(needle);
    if trigrams.len() < 2 {
        return Ok(Some(phrase));
    }
    let (first, sampled): (i64, i64) =
        sqlx::query_as(concat!(
            "WITH sample AS (SELECT COALESCE(MAX(rowid), 0) - $1 AS after FROM keys) ",
            "SELECT after, (SELECT COUNT(*) FROM keys WHERE rowid > after) FROM sample"
        ))
        .bind(FTS_SAMPLE)
        .fetch_one(pool)
        .await?;
    let mut counted = Vec::with_capacity(trigrams.len());
    for trigram in trigrams {
        let term = fts_phrase(&trigram).unwrap_or_default();
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM keys_search WHERE keys_search MATCH $1 AND rowid > $2")
                .bind(term)
                .bind(first)
                .fetch_one(pool)
                .await?;
        counted.push((trigram, count.max(0) as u64));
    }
    Ok(Some(fts_rare_trigrams(&counted, sampled.max(0) as u64).unwrap_or(phrase)))
}

/// Up to `take` keys of a listing page, in listing order.
async fn fetch_page(
    pool: &Pool<Db>,
    filter: &KeyFilter,
    after: Option<&Cursor>,
    take: i64,
    search: Search,
) -> Result<Vec<KeyRow>> {
    let needle = filter.q.as_deref().filter(|q| !q.is_empty());
    let mut fts = match (DIALECT, search, needle) {
        (Dialect::Sqlite, Search::Indexed, Some(q)) => fts_match(pool, q).await?,
        _ => None,
    };
    let mut qb = QueryBuilder::<Db>::new(concat!("SELECT ", key_columns!(), " FROM "));
    if let Search::Newest(_) = search {
        qb.push(concat!("(SELECT ", key_columns!(), " FROM "));
    }
    // The listing order's columns: (created_at, id) of the key, as key_tags holds them when
    // its primary key (in that order) drives, else as keys does. On SQLite an owner with
    // fewer keys than the tag drives (see below). In last-use order keys drives: key_tags
    // holds a copy of the creation time, not of the last use.
    let tags_drive = match (&filter.tag, &filter.owner) {
        _ if filter.order == KeyOrder::LastUsed => false,
        (Some(tag), Some(owner)) if DIALECT == Dialect::Sqlite => !owner_is_smaller(pool, owner, tag).await?,
        (tag, _) => tag.is_some(),
    };
    let (order_column, id_column) = if let (Some(tag), true) = (&filter.tag, tags_drive) {
        // The other filters on key_tags' copies, tested inside its index. The owner on keys
        // as well: PostgreSQL may then walk a small owner's keys instead of a large tag.
        // CROSS JOIN: SQLite keeps key_tags as the outer loop; PostgreSQL plans freely.
        qb.push("key_tags CROSS JOIN keys WHERE keys.id = key_tags.key_id AND key_tags.tag = ").push_bind(tag);
        if let Some(status) = filter.status {
            qb.push(" AND key_tags.key_status = ").push_bind(status.as_str());
        }
        if let Some(owner) = &filter.owner {
            qb.push(" AND key_tags.key_owner = ").push_bind(owner);
            qb.push(" AND keys.owner = ").push_bind(owner);
        }
        if let Some(plan) = &filter.plan {
            qb.push(" AND key_tags.key_plan = ").push_bind(plan);
        }
        ("key_tags.key_created_at", "key_tags.key_id")
    } else {
        // SQLite keeps no statistics to weigh one filter's index against another's. An
        // owner's keys are few in all but the largest accounts: with an owner, its index
        // drives (a unary + keeps SQLite off the status and plan indexes) and a tag, when
        // it has more keys than the owner, is looked up per key. In last-use order the
        // status and plan indexes are kept out too: they would sort every match (seconds
        // at millions), where walking the last-use index finds a page of them at once.
        let sqlite_owner = DIALECT == Dialect::Sqlite && filter.owner.is_some();
        let sqlite_last_used = DIALECT == Dialect::Sqlite && filter.order == KeyOrder::LastUsed;
        let other = if sqlite_owner || sqlite_last_used { "+" } else { "" };
        if let Some(tag) = &filter.tag {
            qb.push("keys CROSS JOIN key_tags WHERE key_tags.key_id = keys.id AND key_tags.tag = ").push_bind(tag);
        } else {
            qb.push("keys WHERE 1 = 1");
        }
        if let Some(status) = filter.status {
            qb.push(format_args!(" AND {other}status = ")).push_bind(status.as_str());
        }
        if let Some(owner) = &filter.owner {
            qb.push(" AND owner = ").push_bind(owner);
        }
        if let Some(plan) = &filter.plan {
            qb.push(format_args!(" AND {other}plan = ")).push_bind(plan);
        }
        match filter.order {
            KeyOrder::Created => ("keys.created_at", "keys.id"),
            // The exact expression of `keys_last_used_idx`.
            KeyOrder::LastUsed => ("COALESCE(keys.last_used_at, 0)", "keys.id"),
        }
    };
    if let Some((at, id)) = after {
        // SQLite takes no range from a row value on an expression index (last-use order):
        // the plain bound on its first column gives it one.
        if filter.order == KeyOrder::LastUsed {
            qb.push(format_args!(" AND {order_column} <= ")).push_bind(*at);
        }
        // A row value: the index range starts at the cursor, no earlier row is read.
        qb.push(format_args!(" AND ({order_column}, {id_column}) < ("))
            .push_bind(*at)
            .push(", ")
            .push_bind(id.clone())
            .push(")");
    }
    if let Search::Newest(n) = search {
        qb.push(format_args!(" ORDER BY {order_column} DESC, {id_column} DESC LIMIT ")).push_bind(n);
        qb.push(") AS newest WHERE 1 = 1");
    }
    if let Some(q) = needle {
        let pattern = like_pattern(q);
        let exact = match (DIALECT, search) {
            (_, Search::Newest(_)) => false,
            // The one expression of the trigram index, exact on its own. The planner walks
            // the listing order instead when the needle is common.
            (Dialect::Postgres, Search::Indexed) if !q.contains(super::SEARCH_SEPARATOR) && trigram_indexable(q) => {
                qb.push(concat!(" AND ", search_text!(), " LIKE ")).push_bind(pattern.clone()).push(" ESCAPE '\\'");
                true
            }
            (Dialect::Postgres, Search::Indexed) => false,
            // Candidates from the FTS5 trigram index, then the exact test below.
            (Dialect::Sqlite, Search::Indexed) => {
                if let Some(fts) = fts.take() {
                    qb.push(" AND keys.rowid IN (SELECT rowid FROM keys_search WHERE keys_search MATCH ")
                        .push_bind(fts)
                        .push(")");
                }
                false
            }
        };
        if !exact {
            qb.push(" AND (");
            for (i, column) in ["name", "COALESCE(owner, '')", "id", "masked"].into_iter().enumerate() {
                if i > 0 {
                    qb.push(" OR ");
                }
                qb.push(format_args!("LOWER({column}) LIKE ")).push_bind(pattern.clone()).push(" ESCAPE '\\'");
            }
            qb.push(")");
        }
    }
    let (order_column, id_column) = match (search, filter.order) {
        (Search::Newest(_), KeyOrder::Created) => ("created_at", "id"),
        (Search::Newest(_), KeyOrder::LastUsed) => ("COALESCE(last_used_at, 0)", "id"),
        (Search::Indexed, _) => (order_column, id_column),
    };
    qb.push(format_args!(" ORDER BY {order_column} DESC, {id_column} DESC LIMIT ")).push_bind(take);
    // Not a prepared statement kept for reuse: PostgreSQL would in time plan it once for
    // every value, and the right index differs between a common tag and a rare one.
    Ok(qb.build_query_as().persistent(false).fetch_all(pool).await?)
}

pub(super) async fn update_key(pool: &Pool<Db>, id: &str, patch: KeyPatch, actor: &str) -> Result<StoredKey> {
    let mut tx = begin_key_write(pool).await?;
    let current = fetch_key(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
    if current.status == KeyStatusText::Revoked {
        return Err(StoreError::Conflict("revoked keys cannot be changed".into()));
    }
    let (next, changed) = super::apply_patch(&current, patch);
    if changed.is_empty() {
        return Ok(current);
    }
    let now = now_ms();
    let key = write_key(&mut tx, &next, now).await?;
    let disabled = current.status != KeyStatusText::Disabled && key.status == KeyStatusText::Disabled;
    let kind = if disabled { "key.disabled" } else { "key.updated" };
    append_key_event(&mut tx, now, kind, &key, serde_json::json!({ "fields": changed })).await?;
    append_audit(&mut tx, now, actor, "key.update", id, serde_json::json!({ "fields": changed })).await?;
    tx.commit().await?;
    Ok(key)
}

pub(super) async fn revoke_key(pool: &Pool<Db>, id: &str, actor: &str) -> Result<StoredKey> {
    let mut tx = begin_key_write(pool).await?;
    let mut key = fetch_key(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
    if key.status == KeyStatusText::Revoked {
        return Ok(key);
    }
    let now = now_ms();
    key.status = KeyStatusText::Revoked;
    let key = write_key(&mut tx, &key, now).await?;
    append_key_event(&mut tx, now, "key.revoked", &key, serde_json::json!({})).await?;
    append_audit(&mut tx, now, actor, "key.revoke", id, serde_json::json!({})).await?;
    tx.commit().await?;
    Ok(key)
}

pub(super) async fn rotate_key(
    pool: &Pool<Db>,
    id: &str,
    new: NewKey,
    grace: std::time::Duration,
    actor: &str,
) -> Result<(StoredKey, StoredKey)> {
    let mut tx = begin_key_write(pool).await?;
    let mut old = fetch_key(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
    if old.status == KeyStatusText::Revoked {
        return Err(StoreError::Conflict("revoked keys cannot be rotated".into()));
    }
    let now = now_ms();
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let grace_end =
        from_ms(now.saturating_add(grace_ms)).map_err(|_| StoreError::Invalid("grace period is too long".into()))?;
    old.expires_at = Some(old.expires_at.map_or(grace_end, |at| at.min(grace_end)));
    // The new key first: a reader that sees the old key's expiry also sees its successor.
    let created_details = serde_json::json!({ "name": new.name, "masked": new.masked, "rotated_from": id });
    let new_id = new.id.clone();
    let new_key = insert_key(&mut tx, new, now, actor, created_details).await?;
    let old = write_key(&mut tx, &old, now).await?;
    let successor = serde_json::json!({ "successor": new_key.public_json() });
    append_key_event(&mut tx, now, "key.rotated", &old, successor).await?;
    append_audit(&mut tx, now, actor, "key.rotate", id, serde_json::json!({ "new_key_id": new_id })).await?;
    tx.commit().await?;
    Ok((old, new_key))
}

pub(super) async fn delete_key(pool: &Pool<Db>, id: &str, actor: &str) -> Result<()> {
    let mut tx = begin_key_write(pool).await?;
    let key = fetch_key(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
    let now = now_ms();
    sqlx::query("DELETE FROM keys WHERE id = $1").bind(id).execute(&mut *tx).await?;
    append_change(&mut tx, Some(&key.id), Some(&key.hash), "delete", now).await?;
    append_key_event(&mut tx, now, "key.deleted", &key, serde_json::json!({})).await?;
    append_audit(&mut tx, now, actor, "key.delete", id, serde_json::json!({ "name": key.name, "masked": key.masked }))
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn audit(
    pool: &Pool<Db>,
    key_id: Option<&str>,
    actor: Option<&str>,
    limit: u32,
) -> Result<Vec<super::AuditEvent>> {
    let mut qb = QueryBuilder::<Db>::new("SELECT id, at, actor, action, key_id, details FROM audit_log WHERE 1 = 1");
    if let Some(key_id) = key_id {
        qb.push(" AND key_id = ").push_bind(key_id);
    }
    if let Some(actor) = actor {
        qb.push(" AND actor = ").push_bind(actor);
    }
    qb.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(limit));
    let rows: Vec<(i64, i64, String, String, Option<String>, String)> = qb.build_query_as().fetch_all(pool).await?;
    rows.into_iter()
        .map(|(id, at, actor, action, key_id, details)| {
            Ok(AuditEvent { id: to_u64(id)?, at: from_ms(at)?, actor, action, key_id, details: unjson(&details)? })
        })
        .collect()
}

/// One row of `changes`: version, key id, hash, op (no key for an import row).
type ChangeRow = (i64, Option<String>, Option<String>, String);

pub(super) async fn changes_since(pool: &Pool<Db>, version: i64, limit: u32) -> Result<(Vec<Change>, u64)> {
    let limit = limit as usize;
    let mut tx = begin_read(pool).await?;
    let latest = latest_version(&mut tx).await?;
    let mut changes = Vec::new();
    let mut after = version;
    // Rows are taken whole until the page holds `limit` changes. Another round is
    // needed only when the rows read expand to fewer (import rows whose keys all
    // changed again later expand to none).
    loop {
        let rows: Vec<ChangeRow> = sqlx::query_as(
            "SELECT version, key_id, hash, op FROM changes WHERE version > $1 ORDER BY version LIMIT $2",
        )
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let read_all = rows.len() < limit;
        let imports: Vec<i64> = rows.iter().filter(|row| row.3 == "import").map(|row| row.0).collect();
        let sizes = import_sizes(&mut tx, &imports).await?;
        let mut size = changes.len();
        let mut taken = 0;
        for row in &rows {
            taken += 1;
            size += if row.3 == "import" { sizes.get(&row.0).copied().unwrap_or(0) } else { 1 };
            if size >= limit {
                break;
            }
        }
        let rows = &rows[..taken];
        let upserts = distinct(rows.iter().filter(|row| row.3 == "upsert").filter_map(|row| row.1.as_deref()));
        let keys = fetch_keys(&mut tx, &upserts).await?;
        let imported: Vec<i64> =
            rows.iter().filter(|row| row.3 == "import" && sizes.contains_key(&row.0)).map(|row| row.0).collect();
        let mut batches = fetch_keys_at_versions(&mut tx, &imported).await?;
        for (version, key_id, hash, op) in rows {
            let version_u64 = to_u64(*version)?;
            if op == "import" {
                for key in batches.remove(version).unwrap_or_default() {
                    changes.push(Change { version: version_u64, change: KeyChange::Upsert(key) });
                }
                continue;
            }
            let (Some(key_id), Some(hash)) = (key_id, hash) else {
                return Err(corrupt(format!("feed row {version} ({op}) names no key")));
            };
            let change = match keys.get(key_id) {
                Some(key) if op == "upsert" => KeyChange::Upsert(key.clone()),
                // A delete, or an upsert of a key deleted since: the key is gone either way.
                _ => KeyChange::Delete { id: key_id.clone(), hash: hash.clone() },
            };
            changes.push(Change { version: version_u64, change });
        }
        match rows.last() {
            Some(last) if size < limit && !read_all => after = last.0,
            _ => break,
        }
    }
    tx.commit().await?;
    Ok((changes, latest))
}

/// How many keys each of these import versions holds now (versions holding none are absent).
async fn import_sizes(conn: &mut Conn, versions: &[i64]) -> Result<HashMap<i64, usize>> {
    let mut sizes = HashMap::with_capacity(versions.len());
    for chunk in versions.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Db>::new("SELECT version, COUNT(*) FROM keys WHERE version IN (");
        let mut list = qb.separated(", ");
        for version in chunk {
            list.push_bind(*version);
        }
        qb.push(") GROUP BY version");
        let rows: Vec<(i64, i64)> = qb.build_query_as().fetch_all(&mut *conn).await?;
        for (version, n) in rows {
            sizes.insert(version, usize::try_from(n).map_err(corrupt)?);
        }
    }
    Ok(sizes)
}

/// The keys at each of these versions, by id within a version.
async fn fetch_keys_at_versions(conn: &mut Conn, versions: &[i64]) -> Result<HashMap<i64, Vec<StoredKey>>> {
    let mut keys: HashMap<i64, Vec<StoredKey>> = HashMap::with_capacity(versions.len());
    for chunk in versions.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Db>::new(concat!("SELECT ", key_columns!(), " FROM keys WHERE version IN ("));
        let mut list = qb.separated(", ");
        for version in chunk {
            list.push_bind(*version);
        }
        qb.push(") ORDER BY version, id");
        let rows: Vec<KeyRow> = qb.build_query_as().fetch_all(&mut *conn).await?;
        for row in rows {
            let version = row.version;
            keys.entry(version).or_default().push(row.into_key()?);
        }
    }
    Ok(keys)
}

pub(super) async fn latest_feed_version(pool: &Pool<Db>) -> Result<u64> {
    let mut conn = pool.acquire().await?;
    latest_version(&mut conn).await
}

/// Every key, in no particular order, read by one statement as the caller takes them.
pub(super) fn all_keys(pool: &Pool<Db>) -> futures_util::stream::BoxStream<'_, Result<StoredKey>> {
    use futures_util::StreamExt as _;
    sqlx::query_as::<_, KeyRow>(concat!("SELECT ", key_columns!(), " FROM keys"))
        .fetch(pool)
        .map(|row| row.map_err(StoreError::from).and_then(KeyRow::into_key))
        .boxed()
}

pub(super) fn gateway_keys(pool: &Pool<Db>) -> futures_util::stream::BoxStream<'_, Result<GatewayKeyRow>> {
    use futures_util::StreamExt as _;
    sqlx::query_as::<_, GatewayKeyRow>(concat!("SELECT ", gateway_key_columns!(), " FROM keys"))
        .fetch(pool)
        .map(|row| row.map_err(StoreError::from))
        .boxed()
}

pub(super) async fn key_count_estimate(pool: &Pool<Db>) -> Result<u64> {
    let count: i64 = match DIALECT {
        // The planner's figure: counting ten million rows would cost a second per snapshot.
        Dialect::Postgres => {
            sqlx::query_scalar(
                "SELECT GREATEST(CAST(reltuples AS BIGINT), 0) FROM pg_class WHERE oid = 'keys'::regclass",
            )
            .fetch_one(pool)
            .await?
        }
        Dialect::Sqlite => sqlx::query_scalar("SELECT COUNT(*) FROM keys").fetch_one(pool).await?,
    };
    Ok(u64::try_from(count).unwrap_or(0))
}
