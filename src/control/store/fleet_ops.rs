// Fleet limits through the control plane (`fleet_limits: { engine: control_plane }`).
// Included after `ops.rs` by `mod sqlite` and `mod postgres` in `mod.rs` (same
// `Db`, `DIALECT`, `Conn` and imports).

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
