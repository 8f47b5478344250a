-- Bulk import (POST /v1/keys/import).
--
-- A key written by an import carries `imported = 1`: its raw form may have any shape,
-- so gateways that hold one hash every presented key instead of refusing the ones
-- without keygate's checksum first.
ALTER TABLE keys ADD COLUMN imported INTEGER NOT NULL DEFAULT 0 CHECK (imported IN (0, 1));
-- changes_since finds the keys of an import row by their version.
CREATE INDEX keys_version_idx ON keys (version);

-- One feed row per import batch (op 'import', no single key): every key the batch
-- wrote has that row's version. SQLite cannot change a CHECK constraint in place,
-- so the table is rebuilt with its rows and its AUTOINCREMENT counter.
CREATE TABLE changes_new (
    version INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    key_id  TEXT,
    hash    TEXT,
    op      TEXT    NOT NULL CHECK (op IN ('upsert', 'delete', 'import')),
    at      INTEGER NOT NULL,
    CHECK (CASE WHEN op = 'import' THEN key_id IS NULL AND hash IS NULL
                ELSE key_id IS NOT NULL AND hash IS NOT NULL END)
);
INSERT INTO changes_new (version, key_id, hash, op, at) SELECT version, key_id, hash, op, at FROM changes;
-- A version is never handed out twice: carry the counter over even if it is ahead of the rows.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'changes_new', seq FROM sqlite_sequence
    WHERE name = 'changes' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'changes_new');
UPDATE sqlite_sequence
    SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0))
    WHERE name = 'changes_new';
DROP TABLE changes;
ALTER TABLE changes_new RENAME TO changes;
