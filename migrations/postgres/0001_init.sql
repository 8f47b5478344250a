-- keygate control-plane store, PostgreSQL.
-- Same shape as the SQLite schema: timestamps are unix milliseconds (BIGINT), list-valued
-- and object-valued fields are JSON text. Every integer is BIGINT because sqlx decodes
-- them as i64. Text keys use the "C" collation so cursor comparisons match byte order,
-- as on SQLite.

CREATE TABLE keys (
    id           TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    hash         TEXT COLLATE "C" NOT NULL UNIQUE,
    prefix       TEXT   NOT NULL,
    masked       TEXT   NOT NULL,
    name         TEXT   NOT NULL,
    owner        TEXT,
    plan         TEXT,
    scopes       TEXT   NOT NULL DEFAULT '[]',
    ip_allowlist TEXT   NOT NULL DEFAULT '[]',
    rate_limit   TEXT,
    quota        TEXT,
    status       TEXT   NOT NULL CHECK (status IN ('active', 'disabled', 'revoked')),
    expires_at   BIGINT,
    metadata     TEXT   NOT NULL DEFAULT '{}',
    tags         TEXT   NOT NULL DEFAULT '[]',
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    version      BIGINT NOT NULL
);
CREATE INDEX keys_created_idx ON keys (created_at DESC, id DESC);
CREATE INDEX keys_owner_idx ON keys (owner);

-- The sync feed. Writers hold a transaction-level advisory lock from before they take a
-- version until they commit, so versions become visible in increasing order.
CREATE TABLE changes (
    version BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id  TEXT COLLATE "C" NOT NULL,
    hash    TEXT   NOT NULL,
    op      TEXT   NOT NULL CHECK (op IN ('upsert', 'delete')),
    at      BIGINT NOT NULL
);

-- No foreign key to keys: the audit trail of a deleted key stays.
CREATE TABLE audit_log (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT   NOT NULL,
    action  TEXT   NOT NULL,
    key_id  TEXT COLLATE "C",
    details TEXT   NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_key_idx ON audit_log (key_id, id);

-- Usage batches already counted, so a retried upload is counted once.
CREATE TABLE usage_batches (
    node        TEXT   NOT NULL,
    boot_id     TEXT   NOT NULL,
    sequence    BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (node, boot_id, sequence)
);

-- Per-key minute buckets. No foreign key: usage of unknown or deleted keys is kept.
CREATE TABLE usage_buckets (
    key_id       TEXT COLLATE "C" NOT NULL,
    bucket_start BIGINT NOT NULL,
    requests     BIGINT NOT NULL DEFAULT 0,
    allowed      BIGINT NOT NULL DEFAULT 0,
    s2xx         BIGINT NOT NULL DEFAULT 0,
    s3xx         BIGINT NOT NULL DEFAULT 0,
    s4xx         BIGINT NOT NULL DEFAULT 0,
    s5xx         BIGINT NOT NULL DEFAULT 0,
    bytes_in     BIGINT NOT NULL DEFAULT 0,
    bytes_out    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, bucket_start)
);

CREATE TABLE usage_denied (
    key_id       TEXT COLLATE "C" NOT NULL,
    bucket_start BIGINT NOT NULL,
    code         TEXT   NOT NULL,
    n            BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, bucket_start, code)
);
