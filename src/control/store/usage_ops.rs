// Usage: ingestion, rollups and retention, and what quotas read.
// Included after `ops.rs` by `mod sqlite` and `mod postgres` in `mod.rs` (same
// `Db`, `DIALECT`, `Conn` and imports).

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
