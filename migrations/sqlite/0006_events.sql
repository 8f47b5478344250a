-- The event log behind `GET /v1/events` and webhooks: one row per key change (one per
-- import batch), per expiring key and per quota threshold crossed, written
-- in the change's own transaction. AUTOINCREMENT: an id is never handed out twice.
CREATE TABLE events (
    id     INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    type   TEXT    NOT NULL,
    key_id TEXT,
    data   TEXT    NOT NULL
);

-- The audit log filtered by the token that acted.
CREATE INDEX audit_log_actor_idx ON audit_log (actor, id);

-- The listing sorted by last use (`sort=last_used`), never-used keys last.
CREATE INDEX keys_last_used_idx ON keys (COALESCE(last_used_at, 0) DESC, id DESC);

-- Webhooks: each receiver's place in the event log, kept by its URL. Every event up to
-- `delivered_through` was delivered (or given up on after a day of failures). A control
-- plane delivers to a receiver while it holds the lease, so control planes sharing the
-- database do not send each event several times.
CREATE TABLE webhook_cursors (
    url               TEXT   NOT NULL PRIMARY KEY,
    delivered_through INTEGER NOT NULL,
    failing_since     INTEGER,
    lease_owner       TEXT,
    lease_until       INTEGER NOT NULL DEFAULT 0
);

-- Events sent once per subject and period (`key.expiring`, `quota.threshold`).
CREATE TABLE event_marks (
    mark    TEXT   NOT NULL,
    subject TEXT   NOT NULL,
    period  INTEGER NOT NULL,
    PRIMARY KEY (mark, subject, period)
);

-- Keys about to expire, for `key.expiring`.
CREATE INDEX keys_expires_idx ON keys (expires_at) WHERE expires_at IS NOT NULL;
