// The event log's operations, included after `ops.rs` by `mod sqlite` and `mod
// postgres` in `mod.rs` (same `Db`, `DIALECT` and `Conn`).

use crate::control::model::{StoredEvent, UsageTick};

/// Appends an event inside the transaction of the change it tells of, so an event
/// exists exactly when its change committed.
async fn append_event(
    conn: &mut Conn,
    at: i64,
    kind: &str,
    key_id: Option<&str>,
    data: &serde_json::Value,
) -> Result<()> {
    sqlx::query("INSERT INTO events (at, type, key_id, data) VALUES ($1, $2, $3, $4)")
        .bind(at)
        .bind(kind)
        .bind(key_id)
        .bind(data.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The event that tells of one key's change: `{"key": <record>}` plus `extra`'s fields.
async fn append_key_event(
    conn: &mut Conn,
    at: i64,
    kind: &str,
    key: &StoredKey,
    extra: serde_json::Value,
) -> Result<()> {
    let mut data = serde_json::Map::new();
    data.insert("key".into(), key.public_json());
    if let serde_json::Value::Object(extra) = extra {
        data.extend(extra);
    }
    append_event(conn, at, kind, Some(&key.id), &serde_json::Value::Object(data)).await
}

pub(super) async fn events_after(pool: &Pool<Db>, after: i64, limit: i64) -> Result<Vec<StoredEvent>> {
    let rows: Vec<(i64, i64, String, Option<String>, String)> =
        sqlx::query_as("SELECT id, at, type, key_id, data FROM events WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|(id, at, kind, key_id, data)| {
            Ok(StoredEvent { id: to_u64(id)?, at: from_ms(at)?, kind, key_id, data: unjson(&data)? })
        })
        .collect()
}

pub(super) async fn latest_event_id(pool: &Pool<Db>) -> Result<u64> {
    let latest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM events").fetch_one(pool).await?;
    to_u64(latest)
}

/// The busiest `limit` keys of the minute bucket starting at `minute`, with their denials.
pub(super) async fn usage_of_minute(pool: &Pool<Db>, minute: i64, limit: i64) -> Result<Vec<UsageTick>> {
    let mut tx = begin_read(pool).await?;
    let rows: Vec<(String, i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT key_id, requests, allowed, s2xx, s3xx, s4xx, s5xx FROM usage_buckets \
         WHERE bucket_start = $1 ORDER BY requests DESC, key_id LIMIT $2",
    )
    .bind(minute)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut ticks = Vec::with_capacity(rows.len());
    let mut at = HashMap::with_capacity(rows.len());
    for (key_id, requests, allowed, s2xx, s3xx, s4xx, s5xx) in rows {
        at.insert(key_id.clone(), ticks.len());
        ticks.push(UsageTick {
            key_id,
            requests: to_u64(requests)?,
            allowed: to_u64(allowed)?,
            denied: Default::default(),
            status: crate::control::model::StatusCounts {
                s2xx: to_u64(s2xx)?,
                s3xx: to_u64(s3xx)?,
                s4xx: to_u64(s4xx)?,
                s5xx: to_u64(s5xx)?,
            },
        });
    }
    if !ticks.is_empty() {
        let denied: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT key_id, code, n FROM usage_denied WHERE bucket_start = $1")
                .bind(minute)
                .fetch_all(&mut *tx)
                .await?;
        for (key_id, code, n) in denied {
            if let Some(&i) = at.get(&key_id) {
                ticks[i].denied.insert(code, to_u64(n)?);
            }
        }
    }
    tx.commit().await?;
    Ok(ticks)
}

/// Appends the event unless `(mark, subject, period)` was marked before: events that
/// must be sent once however often, and by however many control planes, they are
/// found. `true` when this call appended it.
pub(super) async fn append_event_once(
    pool: &Pool<Db>,
    mark: (&str, &str, i64),
    kind: &str,
    key_id: Option<&str>,
    data: &serde_json::Value,
) -> Result<bool> {
    // The feed lock: event ids stay in commit order on PostgreSQL.
    let mut tx = begin_key_write(pool).await?;
    let (name, subject, period) = mark;
    let marked = sqlx::query("INSERT INTO event_marks (mark, subject, period) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(name)
        .bind(subject)
        .bind(period)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if marked {
        append_event(&mut tx, now_ms(), kind, key_id, data).await?;
    }
    tx.commit().await?;
    Ok(marked)
}

/// Active keys whose `expires_at` is in `(after, until]` and not yet marked with
/// `mark` for that expiry, soonest first.
pub(super) async fn expiring_keys(
    pool: &Pool<Db>,
    mark: &str,
    after: i64,
    until: i64,
    limit: i64,
) -> Result<Vec<StoredKey>> {
    let rows: Vec<KeyRow> = sqlx::query_as(concat!(
        "SELECT ",
        key_columns!(),
        " FROM keys WHERE expires_at > $1 AND expires_at <= $2 AND status = 'active' AND NOT EXISTS          (SELECT 1 FROM event_marks WHERE mark = $4 AND subject = keys.id AND period = keys.expires_at)          ORDER BY expires_at LIMIT $3"
    ))
    .bind(after)
    .bind(until)
    .bind(limit)
    .bind(mark)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(KeyRow::into_key).collect()
}

/// Keys with usage in a bucket starting at or after `since`.
pub(super) async fn keys_used_since(pool: &Pool<Db>, since: i64) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT DISTINCT key_id FROM usage_buckets WHERE bucket_start >= $1")
        .bind(since)
        .fetch_all(pool)
        .await?)
}

pub(super) async fn keys_by_id(pool: &Pool<Db>, ids: &[String]) -> Result<Vec<StoredKey>> {
    let mut conn = pool.acquire().await?;
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    Ok(fetch_keys(&mut conn, &ids).await?.into_values().collect())
}

/// Allowed requests since `since` per key of `ids` (`by_owner`: per owner of `ids`,
/// over every key of theirs).
pub(super) async fn allowed_since_of(
    pool: &Pool<Db>,
    ids: &[String],
    by_owner: bool,
    since: i64,
) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Db>::new(if by_owner {
            "SELECT keys.owner, CAST(SUM(usage_buckets.allowed) AS BIGINT) FROM usage_buckets \
             JOIN keys ON keys.id = usage_buckets.key_id WHERE keys.owner IN ("
        } else {
            "SELECT key_id, CAST(SUM(allowed) AS BIGINT) FROM usage_buckets WHERE key_id IN ("
        });
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        qb.push(") AND bucket_start >= ").push_bind(since);
        qb.push(if by_owner { " GROUP BY keys.owner" } else { " GROUP BY key_id" });
        let rows: Vec<(String, i64)> = qb.build_query_as().fetch_all(pool).await?;
        for (subject, n) in rows {
            out.insert(subject, to_u64(n)?);
        }
    }
    Ok(out)
}

/// Takes (or renews) the lease on delivering to `url`, starting a new receiver at the
/// newest event. `None` while another control plane holds it.
pub(super) async fn webhook_lease(
    pool: &Pool<Db>,
    url: &str,
    owner: &str,
    now: i64,
    until: i64,
) -> Result<Option<(u64, Option<i64>)>> {
    let mut tx = begin_usage_write(pool).await?;
    sqlx::query(
        "INSERT INTO webhook_cursors (url, delivered_through) \
         SELECT $1, COALESCE(MAX(id), 0) FROM events WHERE true ON CONFLICT (url) DO NOTHING",
    )
    .bind(url)
    .execute(&mut *tx)
    .await?;
    let row: Option<(i64, Option<i64>)> = sqlx::query_as(
        "UPDATE webhook_cursors SET lease_owner = $2, lease_until = $4 \
         WHERE url = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $3) \
         RETURNING delivered_through, failing_since",
    )
    .bind(url)
    .bind(owner)
    .bind(now)
    .bind(until)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    row.map(|(through, failing_since)| Ok((to_u64(through)?, failing_since))).transpose()
}

/// Moves the receiver's place to `through` (and records since when its current event
/// fails), if this owner still holds the lease. `false` when it lost it.
pub(super) async fn webhook_advance(
    pool: &Pool<Db>,
    url: &str,
    owner: &str,
    through: i64,
    failing_since: Option<i64>,
) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE webhook_cursors SET delivered_through = $3, failing_since = $4 \
         WHERE url = $1 AND lease_owner = $2 AND delivered_through <= $3",
    )
    .bind(url)
    .bind(owner)
    .bind(through)
    .bind(failing_since)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Gives the lease up (a stopping control plane), so another takes over at once.
pub(super) async fn webhook_release(pool: &Pool<Db>, url: &str, owner: &str) -> Result<()> {
    sqlx::query("UPDATE webhook_cursors SET lease_owner = NULL, lease_until = 0 WHERE url = $1 AND lease_owner = $2")
        .bind(url)
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}

/// Events after `after` of the given types (`None`: every type), counted up to `cap`.
pub(super) async fn count_events_after(
    pool: &Pool<Db>,
    after: i64,
    kinds: Option<&[String]>,
    cap: i64,
) -> Result<u64> {
    let mut qb = QueryBuilder::<Db>::new("SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE id > ");
    qb.push_bind(after);
    if let Some(kinds) = kinds {
        qb.push(" AND type IN (");
        let mut list = qb.separated(", ");
        for kind in kinds {
            list.push_bind(kind.as_str());
        }
        qb.push(")");
    }
    qb.push(" LIMIT ").push_bind(cap).push(") AS pending");
    let n: i64 = qb.build_query_scalar().fetch_one(pool).await?;
    to_u64(n)
}

/// Deletes up to `chunk` events written before `before` that every webhook receiver has
/// passed, and marks of periods that ended before `marks_before`. Returns the events
/// deleted. A receiver no node has leased since `before` (one taken out of the config)
/// holds nothing back.
pub(super) async fn prune_event_log(pool: &Pool<Db>, before: i64, marks_before: i64, chunk: i64) -> Result<u64> {
    let deleted = sqlx::query(
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < $1 \
         AND id <= COALESCE((SELECT MIN(delivered_through) FROM webhook_cursors WHERE lease_until >= $1), id) \
         ORDER BY id LIMIT $2)",
    )
    .bind(before)
    .bind(chunk)
    .execute(pool)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM event_marks WHERE period < $1").bind(marks_before).execute(pool).await?;
    Ok(deleted)
}
