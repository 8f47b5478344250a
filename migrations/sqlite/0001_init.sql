-- keygate control-plane store, SQLite.
-- Timestamps are unix milliseconds (INTEGER) so ordering is the same as on PostgreSQL;
-- list-valued and object-valued fields are JSON text.

CREATE TABLE keys (
    id           TEXT    NOT NULL PRIMARY KEY,
    hash         TEXT    NOT NULL UNIQUE,
    prefix       TEXT    NOT NULL,
    masked       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    owner        TEXT,
    plan         TEXT,
    scopes       TEXT    NOT NULL DEFAULT '[]',
    ip_allowlist TEXT    NOT NULL DEFAULT '[]',
    rate_limit   TEXT,
    quota        TEXT,
    status       TEXT    NOT NULL CHECK (status IN ('active', 'disabled', 'revoked')),
    expires_at   INTEGER,
    metadata     TEXT    NOT NULL DEFAULT '{}',
    tags         TEXT    NOT NULL DEFAULT '[]',
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    version      INTEGER NOT NULL
);
-- Listing order (newest first) and the keyset cursor.
CREATE INDEX keys_created_idx ON keys (created_at DESC, id DESC);
CREATE INDEX keys_owner_idx ON keys (owner);

-- The sync feed. AUTOINCREMENT: a version is never handed out twice, even after a failed write.
CREATE TABLE changes (
    version INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    key_id  TEXT    NOT NULL,
    hash    TEXT    NOT NULL,
    op      TEXT    NOT NULL CHECK (op IN ('upsert', 'delete')),
    at      INTEGER NOT NULL
);

-- No foreign key to keys: the audit trail of a deleted key stays.
CREATE TABLE audit_log (
    id      INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    key_id  TEXT,
    details TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_key_idx ON audit_log (key_id, id);

-- Usage batches already counted, so a retried upload is counted once.
CREATE TABLE usage_batches (
    node        TEXT    NOT NULL,
    boot_id     TEXT    NOT NULL,
    sequence    INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (node, boot_id, sequence)
);

-- Per-key minute buckets. No foreign key: usage of unknown or deleted keys is kept.
CREATE TABLE usage_buckets (
    key_id       TEXT    NOT NULL,
    bucket_start INTEGER NOT NULL,
    requests     INTEGER NOT NULL DEFAULT 0,
    allowed      INTEGER NOT NULL DEFAULT 0,
    s2xx         INTEGER NOT NULL DEFAULT 0,
    s3xx         INTEGER NOT NULL DEFAULT 0,
    s4xx         INTEGER NOT NULL DEFAULT 0,
    s5xx         INTEGER NOT NULL DEFAULT 0,
    bytes_in     INTEGER NOT NULL DEFAULT 0,
    bytes_out    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, bucket_start)
);

CREATE TABLE usage_denied (
    key_id       TEXT    NOT NULL,
    bucket_start INTEGER NOT NULL,
    code         TEXT    NOT NULL,
    n            INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, bucket_start, code)
);
