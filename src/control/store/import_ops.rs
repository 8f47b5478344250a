// The bulk import's operations.
// Included after `ops.rs` by `mod sqlite` and `mod postgres` in `mod.rs` (same
// `Db`, `DIALECT`, `Conn` and imports).

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
