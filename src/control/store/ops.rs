// Store operations, included by `mod sqlite` and `mod postgres` in `mod.rs` with
// `Db` and `DIALECT` defined: the same SQL, compiled against each backend's
// concrete sqlx types. Placeholders are `$N`, which both backends accept.

use std::collections::HashMap;

use sqlx::{Pool, QueryBuilder, Transaction};

use super::{
    conflict_on_unique, distinct, from_ms, fts_phrase, key_from_new, like_pattern, now_ms, to_i64, to_u64,
    trigram_indexable, unjson, AuditEvent, BucketSums, Change, Cursor, Dialect, KeyColumns, KeyFilter, KeyPatch,
    KeyRow, KeyStatusText, NewKey, Result, StoreError, StoredKey, UsageAggregate, UsageRows, FEED_LOCK_KEY,
};
use crate::control::model::KeyChange;

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

/// Appends to the feed and returns the new version.
async fn append_change(conn: &mut Conn, key_id: &str, hash: &str, op: &str, at: i64) -> Result<i64> {
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
    let version = append_change(conn, &key.id, &key.hash, "upsert", now).await?;
    sqlx::query(concat!(
        "INSERT INTO keys (",
        key_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, NULL, $18)"
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
    .execute(&mut *conn)
    .await
    .map_err(|e| conflict_on_unique(e, "a key with this id or hash already exists"))?;
    append_audit(conn, now, actor, "key.create", &key.id, details).await?;
    fetch_key(conn, &key.id).await?.ok_or(StoreError::NotFound)
}

/// Writes every settable column of `key` and returns it as stored, with a new version.
async fn write_key(conn: &mut Conn, key: &StoredKey, now: i64) -> Result<StoredKey> {
    let cols = KeyColumns::of(key)?;
    let version = append_change(conn, &key.id, &key.hash, "upsert", now).await?;
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
    let next = if more { keys.last().map(super::encode_cursor) } else { None };
    Ok((keys, next))
}

/// Up to `take` keys of a listing page, in listing order.
async fn fetch_page(
    pool: &Pool<Db>,
    filter: &KeyFilter,
    after: Option<&Cursor>,
    take: i64,
    search: Search,
) -> Result<Vec<KeyRow>> {
    let mut qb = QueryBuilder::<Db>::new(concat!("SELECT ", key_columns!(), " FROM "));
    if let Search::Newest(_) = search {
        qb.push(concat!("(SELECT ", key_columns!(), " FROM "));
    }
    // The listing order's columns: (created_at, id) of the key, as key_tags holds them when
    // its primary key (in that order) drives, else as keys does. On SQLite an owner drives
    // (see below).
    let tags_drive = filter.tag.is_some() && !(DIALECT == Dialect::Sqlite && filter.owner.is_some());
    let (created_at_column, id_column) = if let (Some(tag), true) = (&filter.tag, tags_drive) {
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
        // drives (a unary + keeps SQLite off the status and plan indexes) and a tag is
        // looked up per key.
        let sqlite_owner = DIALECT == Dialect::Sqlite && filter.owner.is_some();
        let other = if sqlite_owner { "+" } else { "" };
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
        ("keys.created_at", "keys.id")
    };
    if let Some((created_at, id)) = after {
        // A row value: the index range starts at the cursor, no earlier row is read.
        qb.push(format_args!(" AND ({created_at_column}, {id_column}) < ("))
            .push_bind(*created_at)
            .push(", ")
            .push_bind(id.clone())
            .push(")");
    }
    if let Search::Newest(n) = search {
        qb.push(format_args!(" ORDER BY {created_at_column} DESC, {id_column} DESC LIMIT ")).push_bind(n);
        qb.push(") AS newest WHERE 1 = 1");
    }
    if let Some(q) = filter.q.as_deref().filter(|q| !q.is_empty()) {
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
                if let Some(phrase) = fts_phrase(q) {
                    qb.push(" AND keys.rowid IN (SELECT rowid FROM keys_search WHERE keys_search MATCH ")
                        .push_bind(phrase)
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
    let (created_at_column, id_column) = match search {
        Search::Newest(_) => ("created_at", "id"),
        Search::Indexed => (created_at_column, id_column),
    };
    qb.push(format_args!(" ORDER BY {created_at_column} DESC, {id_column} DESC LIMIT ")).push_bind(take);
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
    append_audit(&mut tx, now, actor, "key.rotate", id, serde_json::json!({ "new_key_id": new_id })).await?;
    tx.commit().await?;
    Ok((old, new_key))
}

pub(super) async fn delete_key(pool: &Pool<Db>, id: &str, actor: &str) -> Result<()> {
    let mut tx = begin_key_write(pool).await?;
    let key = fetch_key(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
    let now = now_ms();
    sqlx::query("DELETE FROM keys WHERE id = $1").bind(id).execute(&mut *tx).await?;
    append_change(&mut tx, &key.id, &key.hash, "delete", now).await?;
    append_audit(&mut tx, now, actor, "key.delete", id, serde_json::json!({ "name": key.name, "masked": key.masked }))
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn audit(pool: &Pool<Db>, key_id: Option<&str>, limit: u32) -> Result<Vec<super::AuditEvent>> {
    let mut qb = QueryBuilder::<Db>::new("SELECT id, at, actor, action, key_id, details FROM audit_log");
    if let Some(key_id) = key_id {
        qb.push(" WHERE key_id = ").push_bind(key_id);
    }
    qb.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(limit));
    let rows: Vec<(i64, i64, String, String, Option<String>, String)> = qb.build_query_as().fetch_all(pool).await?;
    rows.into_iter()
        .map(|(id, at, actor, action, key_id, details)| {
            Ok(AuditEvent { id: to_u64(id)?, at: from_ms(at)?, actor, action, key_id, details: unjson(&details)? })
        })
        .collect()
}

pub(super) async fn changes_since(pool: &Pool<Db>, version: i64, limit: u32) -> Result<(Vec<Change>, u64)> {
    let mut tx = begin_read(pool).await?;
    let rows: Vec<(i64, String, String, String)> =
        sqlx::query_as("SELECT version, key_id, hash, op FROM changes WHERE version > $1 ORDER BY version LIMIT $2")
            .bind(version)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
    let latest = latest_version(&mut tx).await?;
    let upserts = distinct(rows.iter().filter(|(_, _, _, op)| op == "upsert").map(|(_, id, _, _)| id.as_str()));
    let keys = fetch_keys(&mut tx, &upserts).await?;
    tx.commit().await?;
    let changes = rows
        .into_iter()
        .map(|(version, key_id, hash, op)| {
            let change = match keys.get(&key_id) {
                Some(key) if op == "upsert" => KeyChange::Upsert(key.clone()),
                // A delete, or an upsert of a key deleted since: the key is gone either way.
                _ => KeyChange::Delete { id: key_id, hash },
            };
            Ok(Change { version: to_u64(version)?, change })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((changes, latest))
}

pub(super) async fn snapshot(pool: &Pool<Db>) -> Result<(u64, Vec<StoredKey>)> {
    let mut tx = begin_read(pool).await?;
    let version = latest_version(&mut tx).await?;
    let rows: Vec<KeyRow> = sqlx::query_as(concat!("SELECT ", key_columns!(), " FROM keys ORDER BY created_at, id"))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let keys = rows.into_iter().map(KeyRow::into_key).collect::<Result<Vec<_>>>()?;
    Ok((version, keys))
}

pub(super) async fn ingest_usage(
    pool: &Pool<Db>,
    node: &str,
    boot_id: &str,
    sequence: i64,
    batch: &UsageAggregate,
) -> Result<bool> {
    let mut tx = begin_usage_write(pool).await?;
    // The batch id goes in with the counts: both commit or neither does.
    let inserted = sqlx::query(
        "INSERT INTO usage_batches (node, boot_id, sequence, received_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
    )
    .bind(node)
    .bind(boot_id)
    .bind(sequence)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }

    let buckets: Vec<_> = batch.buckets.iter().collect();
    for chunk in buckets.chunks(INSERT_CHUNK) {
        let rows = chunk
            .iter()
            .map(|((key_id, start), c)| {
                Ok((
                    key_id.as_str(),
                    *start,
                    [
                        to_i64(c.requests)?,
                        to_i64(c.allowed)?,
                        to_i64(c.s2xx)?,
                        to_i64(c.s3xx)?,
                        to_i64(c.s4xx)?,
                        to_i64(c.s5xx)?,
                        to_i64(c.bytes_in)?,
                        to_i64(c.bytes_out)?,
                    ],
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut qb = QueryBuilder::<Db>::new(
            "INSERT INTO usage_buckets (key_id, bucket_start, requests, allowed, s2xx, s3xx, s4xx, s5xx, bytes_in, \
             bytes_out) ",
        );
        qb.push_values(rows, |mut row, (key_id, start, counts)| {
            row.push_bind(key_id).push_bind(start);
            for n in counts {
                row.push_bind(n);
            }
        });
        qb.push(
            " ON CONFLICT (key_id, bucket_start) DO UPDATE SET \
             requests = usage_buckets.requests + excluded.requests, \
             allowed = usage_buckets.allowed + excluded.allowed, \
             s2xx = usage_buckets.s2xx + excluded.s2xx, \
             s3xx = usage_buckets.s3xx + excluded.s3xx, \
             s4xx = usage_buckets.s4xx + excluded.s4xx, \
             s5xx = usage_buckets.s5xx + excluded.s5xx, \
             bytes_in = usage_buckets.bytes_in + excluded.bytes_in, \
             bytes_out = usage_buckets.bytes_out + excluded.bytes_out",
        );
        qb.build().execute(&mut *tx).await?;
    }

    let denied: Vec<_> = batch.denied.iter().collect();
    for chunk in denied.chunks(INSERT_CHUNK) {
        let rows = chunk
            .iter()
            .map(|((key_id, start, code), n)| Ok((key_id.as_str(), *start, code.as_str(), to_i64(**n)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut qb = QueryBuilder::<Db>::new("INSERT INTO usage_denied (key_id, bucket_start, code, n) ");
        qb.push_values(rows, |mut row, (key_id, start, code, n)| {
            row.push_bind(key_id).push_bind(start).push_bind(code).push_bind(n);
        });
        qb.push(" ON CONFLICT (key_id, bucket_start, code) DO UPDATE SET n = usage_denied.n + excluded.n");
        qb.build().execute(&mut *tx).await?;
    }

    // Not a key change: last_used_at does not go through the feed.
    for (key_id, at) in &batch.last_used {
        sqlx::query("UPDATE keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)")
            .bind(*at)
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn usage(pool: &Pool<Db>, key_id: &str, from: i64, to: i64, width: i64) -> Result<UsageRows> {
    let mut tx = begin_read(pool).await?;
    // Minute buckets rolled up in SQL: integer division by the width is the UTC hour or day.
    let buckets: Vec<BucketSums> = sqlx::query_as(
        "SELECT (bucket_start / $4) * $4 AS bucket, CAST(SUM(requests) AS BIGINT) AS requests, \
         CAST(SUM(allowed) AS BIGINT) AS allowed, CAST(SUM(s2xx) AS BIGINT) AS s2xx, \
         CAST(SUM(s3xx) AS BIGINT) AS s3xx, CAST(SUM(s4xx) AS BIGINT) AS s4xx, CAST(SUM(s5xx) AS BIGINT) AS s5xx, \
         CAST(SUM(bytes_in) AS BIGINT) AS bytes_in, CAST(SUM(bytes_out) AS BIGINT) AS bytes_out \
         FROM usage_buckets WHERE key_id = $1 AND bucket_start >= $2 AND bucket_start < $3 \
         GROUP BY 1 ORDER BY 1",
    )
    .bind(key_id)
    .bind(from)
    .bind(to)
    .bind(width)
    .fetch_all(&mut *tx)
    .await?;
    let denied: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT (bucket_start / $4) * $4, code, CAST(SUM(n) AS BIGINT) FROM usage_denied \
         WHERE key_id = $1 AND bucket_start >= $2 AND bucket_start < $3 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(key_id)
    .bind(from)
    .bind(to)
    .bind(width)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(UsageRows {
        buckets: buckets.into_iter().map(BucketSums::into_counts).collect::<Result<_>>()?,
        denied: denied.into_iter().map(|(start, code, n)| Ok((start, code, to_u64(n)?))).collect::<Result<_>>()?,
    })
}

pub(super) async fn allowed_since(pool: &Pool<Db>, since: i64) -> Result<Vec<(String, u64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT key_id, CAST(COALESCE(SUM(allowed), 0) AS BIGINT) FROM usage_buckets WHERE bucket_start >= $1 GROUP BY key_id",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(key_id, allowed)| Ok((key_id, to_u64(allowed)?))).collect()
}

pub(super) async fn quota_used(pool: &Pool<Db>, key_id: &str, since: i64) -> Result<u64> {
    let used: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(allowed), 0) AS BIGINT) FROM usage_buckets WHERE key_id = $1 AND bucket_start >= $2",
    )
    .bind(key_id)
    .bind(since)
    .fetch_one(pool)
    .await?;
    to_u64(used)
}
