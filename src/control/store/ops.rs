// Store operations, included by `mod sqlite` and `mod postgres` in `mod.rs` with
// `Db` and `DIALECT` defined: the same SQL, compiled against each backend's
// concrete sqlx types. Placeholders are `$N`, which both backends accept.

use std::collections::HashMap;

use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, Pool, QueryBuilder, Transaction};

use super::{
    conflict_on_unique, corrupt, distinct, from_ms, fts_phrase, import_action, key_from_new, like_pattern, now_ms,
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
        // it has more keys than the owner, is looked up per key.
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

// ---- bulk import ----

/// Records per multi-row statement of an import: 20 binds a row.
const IMPORT_CHUNK: usize = 500;

/// A connection for one import, with its table of records taken (emptied).
pub(super) async fn begin_import(pool: &Pool<Db>) -> Result<PoolConnection<Db>> {
    let mut conn = pool.acquire().await?;
    let create = match DIALECT {
        Dialect::Sqlite => {
            "CREATE TEMP TABLE IF NOT EXISTS import_seen \
             (id TEXT NOT NULL PRIMARY KEY, hash TEXT NOT NULL UNIQUE, line INTEGER NOT NULL)"
        }
        Dialect::Postgres => {
            "CREATE TEMP TABLE IF NOT EXISTS import_seen \
             (id TEXT COLLATE \"C\" NOT NULL PRIMARY KEY, hash TEXT COLLATE \"C\" NOT NULL UNIQUE, line BIGINT NOT NULL)"
        }
    };
    sqlx::query(create).execute(&mut *conn).await?;
    sqlx::query("DELETE FROM import_seen").execute(&mut *conn).await?;
    Ok(conn)
}

pub(super) async fn end_import(conn: &mut Conn) -> Result<()> {
    sqlx::query("DELETE FROM import_seen").execute(&mut *conn).await?;
    Ok(())
}

/// Fresh planner statistics for the tables the listing reads. SQLite keeps none
/// unless asked, and its listing queries name their plan (`CROSS JOIN`, unary `+`).
pub(super) async fn refresh_statistics(conn: &mut Conn) -> Result<()> {
    if DIALECT == Dialect::Postgres {
        sqlx::query("ANALYZE keys").execute(&mut *conn).await?;
        sqlx::query("ANALYZE key_tags").execute(&mut *conn).await?;
    }
    Ok(())
}

pub(super) async fn import_batch(conn: &mut Conn, batch: Vec<ImportKey>, actor: &str) -> Result<BatchOutcome> {
    let mut outcome = BatchOutcome::default();
    let (Some(first_line), Some(last_line)) = (batch.first().map(|r| r.line), batch.last().map(|r| r.line)) else {
        return Ok(outcome);
    };
    let mut tx = begin_key_write_on(conn).await?;
    let now = now_ms();

    // The first line that gives a hash or an id has it; a later one is an error.
    let (seen_ids, seen_hashes) = import_seen_lines(&mut tx, &batch).await?;
    let mut ids_here: HashMap<String, u64> = HashMap::with_capacity(batch.len());
    let mut hashes_here: HashMap<String, u64> = HashMap::with_capacity(batch.len());
    let mut taken = Vec::with_capacity(batch.len());
    for record in batch {
        if let Err(e) = super::validate_import(&record) {
            outcome.errors.push((record.line, e));
        } else if let Some(line) = seen_hashes.get(&record.hash).or_else(|| hashes_here.get(&record.hash)) {
            outcome.errors.push((record.line, format!("hash: already given on line {line}")));
        } else if let Some(line) = seen_ids.get(&record.id).or_else(|| ids_here.get(&record.id)) {
            outcome.errors.push((record.line, format!("id: {} is already given on line {line}", record.id)));
        } else {
            ids_here.insert(record.id.clone(), record.line);
            hashes_here.insert(record.hash.clone(), record.line);
            taken.push(record);
        }
    }

    let ids: Vec<&str> = taken.iter().map(|r| r.id.as_str()).collect();
    let hashes: Vec<&str> = taken.iter().map(|r| r.hash.as_str()).collect();
    let by_id = fetch_keys(&mut tx, &ids).await?;
    let hash_owners = fetch_hash_owners(&mut tx, &hashes).await?;
    let remembered: Vec<(String, String, u64)> = taken.iter().map(|r| (r.id.clone(), r.hash.clone(), r.line)).collect();
    let mut writes = Vec::new();
    for record in taken {
        let line = record.line;
        let current = by_id.get(&record.id);
        let owner = hash_owners.get(&record.hash).map(String::as_str);
        match import_action(record, current, owner, now) {
            ImportAction::Unchanged => outcome.unchanged += 1,
            ImportAction::Write(key) => writes.push(*key),
            ImportAction::Refuse(message) => outcome.errors.push((line, message)),
        }
    }

    if !writes.is_empty() {
        let version = append_change(&mut tx, None, None, "import", now).await?;
        for chunk in writes.chunks(IMPORT_CHUNK) {
            upsert_imported(&mut tx, chunk, version).await?;
        }
        let details = serde_json::json!({
            "count": writes.len(),
            "unchanged": outcome.unchanged,
            "first_line": first_line,
            "last_line": last_line,
        });
        append_audit_event(&mut tx, now, actor, "key.import", None, details.clone()).await?;
        // One event per batch, like the feed: an import of millions floods no subscriber.
        append_event(&mut tx, now, "keys.imported", None, &details).await?;
        outcome.imported = writes.len() as u64;
        outcome.version = Some(to_u64(version)?);
    }
    for chunk in remembered.chunks(IMPORT_CHUNK) {
        let mut qb = QueryBuilder::<Db>::new("INSERT INTO import_seen (id, hash, line) ");
        qb.push_values(chunk, |mut row, (id, hash, line)| {
            row.push_bind(id.as_str()).push_bind(hash.as_str()).push_bind(i64::try_from(*line).unwrap_or(i64::MAX));
        });
        qb.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    outcome.errors.sort_by_key(|(line, _)| *line);
    Ok(outcome)
}

/// The lines that took any of these records' ids and hashes in earlier batches.
async fn import_seen_lines(
    conn: &mut Conn,
    records: &[ImportKey],
) -> Result<(HashMap<String, u64>, HashMap<String, u64>)> {
    let (mut ids, mut hashes) = (HashMap::new(), HashMap::new());
    for chunk in records.chunks(IMPORT_CHUNK) {
        let mut qb = QueryBuilder::<Db>::new("SELECT id, hash, line FROM import_seen WHERE id IN (");
        let mut list = qb.separated(", ");
        for record in chunk {
            list.push_bind(record.id.as_str());
        }
        qb.push(") OR hash IN (");
        let mut list = qb.separated(", ");
        for record in chunk {
            list.push_bind(record.hash.as_str());
        }
        qb.push(")");
        let rows: Vec<(String, String, i64)> = qb.build_query_as().fetch_all(&mut *conn).await?;
        for (id, hash, line) in rows {
            let line = to_u64(line)?;
            ids.insert(id, line);
            hashes.insert(hash, line);
        }
    }
    Ok((ids, hashes))
}

/// The id of the stored key with each of these hashes, by hash.
async fn fetch_hash_owners(conn: &mut Conn, hashes: &[&str]) -> Result<HashMap<String, String>> {
    let mut owners = HashMap::with_capacity(hashes.len());
    for chunk in hashes.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Db>::new("SELECT hash, id FROM keys WHERE hash IN (");
        let mut list = qb.separated(", ");
        for hash in chunk {
            list.push_bind(*hash);
        }
        qb.push(")");
        let rows: Vec<(String, String)> = qb.build_query_as().fetch_all(&mut *conn).await?;
        owners.extend(rows);
    }
    Ok(owners)
}

/// Creates or replaces `keys` at `version`. A replaced key keeps its
/// `last_used_at` and its `imported` flag.
async fn upsert_imported(conn: &mut Conn, keys: &[StoredKey], version: i64) -> Result<()> {
    let rows = keys.iter().map(|key| Ok((key, KeyColumns::of(key)?))).collect::<Result<Vec<_>>>()?;
    let mut qb = QueryBuilder::<Db>::new(concat!("INSERT INTO keys (", key_columns!(), ") "));
    qb.push_values(rows, |mut row, (key, cols)| {
        row.push_bind(key.id.as_str())
            .push_bind(key.hash.as_str())
            .push_bind(key.prefix.as_str())
            .push_bind(key.masked.as_str())
            .push_bind(key.name.as_str())
            .push_bind(key.owner.as_deref())
            .push_bind(key.plan.as_deref())
            .push_bind(cols.scopes)
            .push_bind(cols.ip_allowlist)
            .push_bind(cols.rate_limit)
            .push_bind(cols.quota)
            .push_bind(key.status.as_str())
            .push_bind(cols.expires_at)
            .push_bind(cols.metadata)
            .push_bind(cols.tags)
            .push_bind(super::to_ms(key.created_at))
            .push_bind(super::to_ms(key.updated_at))
            .push_bind(None::<i64>)
            .push_bind(version)
            .push_bind(key.imported);
    });
    qb.push(
        " ON CONFLICT (id) DO UPDATE SET prefix = excluded.prefix, masked = excluded.masked, name = excluded.name, \
         owner = excluded.owner, plan = excluded.plan, scopes = excluded.scopes, ip_allowlist = excluded.ip_allowlist, \
         rate_limit = excluded.rate_limit, quota = excluded.quota, status = excluded.status, \
         expires_at = excluded.expires_at, metadata = excluded.metadata, tags = excluded.tags, \
         created_at = excluded.created_at, updated_at = excluded.updated_at, version = excluded.version",
    );
    qb.build().execute(&mut *conn).await.map_err(|e| conflict_on_unique(e, "a key with this hash already exists"))?;
    Ok(())
}

pub(super) async fn ingest_usage(
    pool: &Pool<Db>,
    node: &str,
    boot_id: &str,
    sequence: i64,
    batch: &UsageAggregate,
) -> Result<bool> {
    let mut tx = begin_usage_write(pool).await?;
    let late = batch.oldest_bucket().filter(|oldest| *oldest < now_ms() - LATE_USAGE_AGE_MS);
    if let Some(oldest) = late {
        // Usage old enough to have been rolled up already (a gateway's spool replayed
        // after a long stop). A rollup must not fold these buckets while this upload adds
        // to them, and must look at them again: it resumes from the oldest bucket written.
        if DIALECT == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(ROLLUP_LOCK_KEY).execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE usage_rollups SET done_before = $1 WHERE done_before > $1")
            .bind(oldest)
            .execute(&mut *tx)
            .await?;
    }
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
        qb.push(ADD_TO_BUCKET);
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
        qb.push(ADD_TO_DENIED);
        qb.build().execute(&mut *tx).await?;
    }

    // Not a key change: last_used_at does not go through the feed.
    let last_used: Vec<(&str, i64)> = batch.last_used.iter().map(|(id, at)| (id.as_str(), *at)).collect();
    for chunk in last_used.chunks(INSERT_CHUNK) {
        if DIALECT == Dialect::Postgres {
            // Uploads from several gateways touch the same keys, and the join below may
            // visit them in any order: take the row locks in id order first.
            let mut qb = QueryBuilder::<Db>::new("SELECT id FROM keys WHERE id IN (");
            let mut ids = qb.separated(", ");
            for (id, _) in chunk {
                ids.push_bind(*id);
            }
            qb.push(") ORDER BY id FOR UPDATE");
            qb.build().fetch_all(&mut *tx).await?;
        }
        let mut qb = QueryBuilder::<Db>::new("WITH seen (id, at) AS (");
        qb.push_values(chunk, |mut row, (id, at)| {
            row.push_bind(*id).push_bind(*at);
        });
        qb.push(
            ") UPDATE keys SET last_used_at = seen.at FROM seen \
             WHERE keys.id = seen.id AND (keys.last_used_at IS NULL OR keys.last_used_at < seen.at)",
        );
        qb.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Buckets at least this old may already have been rolled up: `usage.retention.minute`
/// is never shorter (`UsageRetention::MIN_MINUTE`).
const LATE_USAGE_AGE_MS: i64 = 3_600_000;

/// Adds an inserted bucket's counts to the stored one.
const ADD_TO_BUCKET: &str = " ON CONFLICT (key_id, bucket_start) DO UPDATE SET \
    requests = usage_buckets.requests + excluded.requests, \
    allowed = usage_buckets.allowed + excluded.allowed, \
    s2xx = usage_buckets.s2xx + excluded.s2xx, \
    s3xx = usage_buckets.s3xx + excluded.s3xx, \
    s4xx = usage_buckets.s4xx + excluded.s4xx, \
    s5xx = usage_buckets.s5xx + excluded.s5xx, \
    bytes_in = usage_buckets.bytes_in + excluded.bytes_in, \
    bytes_out = usage_buckets.bytes_out + excluded.bytes_out";

const ADD_TO_DENIED: &str = " ON CONFLICT (key_id, bucket_start, code) DO UPDATE SET n = usage_denied.n + excluded.n";

/// Folds the buckets of `[cutoff's past, cutoff)` that are narrower than `width` into
/// buckets of `width` at the start of their hour or day, `slice` milliseconds of
/// buckets per transaction, resuming where the last pass of `level` stopped. Returns
/// how many wider buckets were written (or added to).
pub(super) async fn roll_up_usage(pool: &Pool<Db>, level: &str, width: i64, cutoff: i64, slice: i64) -> Result<u64> {
    let mut written = 0;
    loop {
        let mut tx = begin_usage_write(pool).await?;
        if DIALECT == Dialect::Postgres {
            let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(ROLLUP_LOCK_KEY)
                .fetch_one(&mut *tx)
                .await?;
            if !ours {
                // Another control plane is rolling up, or late usage is being written:
                // the next pass carries on from the same point.
                return Ok(written);
            }
        }
        let done: Option<i64> = sqlx::query_scalar("SELECT done_before FROM usage_rollups WHERE level = $1")
            .bind(level)
            .fetch_optional(&mut *tx)
            .await?;
        let next: Option<i64> =
            sqlx::query_scalar("SELECT MIN(bucket_start) FROM usage_buckets WHERE bucket_start >= $1 AND bucket_start < $2")
                .bind(done.unwrap_or(i64::MIN))
                .bind(cutoff)
                .fetch_one(&mut *tx)
                .await?;
        let end = next.map_or(cutoff, |start| start.saturating_add(slice).min(cutoff));
        if let Some(start) = next {
            written += fold_usage(&mut tx, start, end, width).await?;
        }
        if done.is_none_or(|done| done < end) {
            sqlx::query(
                "INSERT INTO usage_rollups (level, done_before) VALUES ($1, $2) \
                 ON CONFLICT (level) DO UPDATE SET done_before = excluded.done_before",
            )
            .bind(level)
            .bind(end)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if next.is_none() {
            return Ok(written);
        }
    }
}

/// Moves every bucket of `[from, to)` not aligned to `width` into the aligned bucket
/// that holds it, in `usage_buckets` and `usage_denied`. The aligned bucket is kept
/// (and added to), so folding again changes nothing.
async fn fold_usage(conn: &mut Conn, from: i64, to: i64, width: i64) -> Result<u64> {
    const COUNTS: &str = "requests, allowed, s2xx, s3xx, s4xx, s5xx, bytes_in, bytes_out";
    const SUMS: &str = "CAST(SUM(requests) AS BIGINT), CAST(SUM(allowed) AS BIGINT), CAST(SUM(s2xx) AS BIGINT), \
        CAST(SUM(s3xx) AS BIGINT), CAST(SUM(s4xx) AS BIGINT), CAST(SUM(s5xx) AS BIGINT), \
        CAST(SUM(bytes_in) AS BIGINT), CAST(SUM(bytes_out) AS BIGINT)";
    const NARROW: &str = "bucket_start >= $1 AND bucket_start < $2 AND bucket_start % $3 <> 0";
    let statements = match DIALECT {
        // One statement sums exactly the rows it deletes, so a gateway's late upload that
        // commits meanwhile is either moved whole or left for the next pass, never lost.
        Dialect::Postgres => vec![
            format!(
                "WITH moved AS (DELETE FROM usage_buckets WHERE {NARROW} RETURNING key_id, bucket_start, {COUNTS}) \
                 INSERT INTO usage_buckets (key_id, bucket_start, {COUNTS}) \
                 SELECT key_id, (bucket_start / $3) * $3, {SUMS} FROM moved GROUP BY 1, 2{ADD_TO_BUCKET}"
            ),
            format!(
                "WITH moved AS (DELETE FROM usage_denied WHERE {NARROW} RETURNING key_id, bucket_start, code, n) \
                 INSERT INTO usage_denied (key_id, bucket_start, code, n) \
                 SELECT key_id, (bucket_start / $3) * $3, code, CAST(SUM(n) AS BIGINT) FROM moved \
                 GROUP BY 1, 2, 3{ADD_TO_DENIED}"
            ),
        ],
        // SQLite has no DELETE in WITH; its writers are serialised, so copy then delete.
        Dialect::Sqlite => vec![
            format!(
                "INSERT INTO usage_buckets (key_id, bucket_start, {COUNTS}) \
                 SELECT key_id, (bucket_start / $3) * $3, {SUMS} FROM usage_buckets WHERE {NARROW} \
                 GROUP BY 1, 2{ADD_TO_BUCKET}"
            ),
            format!("DELETE FROM usage_buckets WHERE {NARROW}"),
            format!(
                "INSERT INTO usage_denied (key_id, bucket_start, code, n) \
                 SELECT key_id, (bucket_start / $3) * $3, code, SUM(n) FROM usage_denied WHERE {NARROW} \
                 GROUP BY 1, 2, 3{ADD_TO_DENIED}"
            ),
            format!("DELETE FROM usage_denied WHERE {NARROW}"),
        ],
    };
    let mut written = 0;
    for (i, sql) in statements.iter().enumerate() {
        let affected = sqlx::query(sql).bind(from).bind(to).bind(width).execute(&mut *conn).await?.rows_affected();
        if i == 0 {
            written = affected;
        }
    }
    Ok(written)
}

/// Deletes every bucket that starts before `cutoff`, `slice` milliseconds of buckets
/// per transaction. Returns how many buckets were deleted.
pub(super) async fn delete_usage_before(pool: &Pool<Db>, cutoff: i64, slice: i64) -> Result<u64> {
    let mut deleted = 0;
    loop {
        let mut tx = begin_usage_write(pool).await?;
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(bucket_start) FROM usage_buckets WHERE bucket_start < $1")
            .bind(cutoff)
            .fetch_one(&mut *tx)
            .await?;
        let Some(oldest) = oldest else {
            // Denials always come with their bucket; this only clears strays.
            sqlx::query("DELETE FROM usage_denied WHERE bucket_start < $1").bind(cutoff).execute(&mut *tx).await?;
            tx.commit().await?;
            return Ok(deleted);
        };
        let end = oldest.saturating_add(slice).min(cutoff);
        deleted += sqlx::query("DELETE FROM usage_buckets WHERE bucket_start < $1")
            .bind(end)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM usage_denied WHERE bucket_start < $1").bind(end).execute(&mut *tx).await?;
        tx.commit().await?;
    }
}

/// Forgets the ids of usage batches received before `before`, `chunk` ids per
/// statement. Returns how many were forgotten.
pub(super) async fn prune_usage_batches(pool: &Pool<Db>, before: i64, chunk: i64) -> Result<u64> {
    let mut pruned = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM usage_batches WHERE (node, boot_id, sequence) IN \
             (SELECT node, boot_id, sequence FROM usage_batches WHERE received_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(chunk)
        .execute(pool)
        .await?
        .rows_affected();
        pruned += n;
        if n == 0 || n < chunk.unsigned_abs() {
            return Ok(pruned);
        }
    }
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

/// Like `allowed_since`, summed per owner of the key (as the key is now).
pub(super) async fn allowed_by_owner_since(pool: &Pool<Db>, since: i64) -> Result<Vec<(String, u64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT k.owner, CAST(COALESCE(SUM(u.allowed), 0) AS BIGINT) FROM usage_buckets u JOIN keys k ON k.id = u.key_id \
         WHERE u.bucket_start >= $1 AND k.owner IS NOT NULL AND k.owner <> '' GROUP BY k.owner",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(owner, allowed)| Ok((owner, to_u64(allowed)?))).collect()
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

// ---- fleet limits through the control plane ----

/// Applies one exchange of a gateway's fleet sync (see `limit::fleet::Op`) in one
/// transaction. Rows are written in name order, whatever the order of `ops`, so
/// exchanges of several gateways never wait on each other in a cycle; ops on one
/// name keep their order.
pub(super) async fn fleet_exchange(pool: &Pool<Db>, ops: &[FleetOp], now: i64) -> Result<Vec<Option<u64>>> {
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by(|a, b| ops[*a].key().cmp(ops[*b].key()));
    let mut answers = vec![None; ops.len()];
    let mut tx = begin_usage_write(pool).await?;
    for at in order {
        answers[at] = match &ops[at] {
            FleetOp::Add { key, by, ttl } => {
                let expires_at = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
                let total: i64 = sqlx::query_scalar(
                    "INSERT INTO fleet_counters (name, value, expires_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET \
                     value = CASE WHEN fleet_counters.expires_at <= $4 THEN excluded.value \
                     ELSE fleet_counters.value + excluded.value END, expires_at = excluded.expires_at \
                     RETURNING value",
                )
                .bind(key)
                .bind(to_i64(*by)?)
                .bind(expires_at)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                Some(to_u64(total)?)
            }
            FleetOp::Read { key } | FleetOp::ReadMark { key } => {
                let value: Option<i64> =
                    sqlx::query_scalar("SELECT value FROM fleet_counters WHERE name = $1 AND expires_at > $2")
                        .bind(key)
                        .bind(now)
                        .fetch_optional(&mut *tx)
                        .await?;
                value.map(to_u64).transpose()?
            }
            FleetOp::Raise { key, to, until } => {
                sqlx::query(
                    "INSERT INTO fleet_counters (name, value, expires_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET \
                     value = CASE WHEN fleet_counters.expires_at <= $4 OR excluded.value > fleet_counters.value \
                     THEN excluded.value ELSE fleet_counters.value END, \
                     expires_at = CASE WHEN excluded.expires_at > fleet_counters.expires_at \
                     THEN excluded.expires_at ELSE fleet_counters.expires_at END",
                )
                .bind(key)
                .bind(to_i64(*to)?)
                .bind(to_i64(*until)?)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                None
            }
        };
    }
    tx.commit().await?;
    Ok(answers)
}

/// Forgets fleet counters that expired before `now`.
pub(super) async fn sweep_fleet_counters(pool: &Pool<Db>, now: i64) -> Result<u64> {
    let done = sqlx::query("DELETE FROM fleet_counters WHERE expires_at <= $1").bind(now).execute(pool).await?;
    Ok(done.rows_affected())
}
