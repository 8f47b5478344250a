-- Bulk import (POST /v1/keys/import).
--
-- A key written by an import carries `imported = TRUE`: its raw form may have any shape,
-- so gateways that hold one hash every presented key instead of refusing the ones
-- without keygate's checksum first.
ALTER TABLE keys ADD COLUMN imported BOOLEAN NOT NULL DEFAULT FALSE;
-- changes_since finds the keys of an import row by their version.
CREATE INDEX keys_version_idx ON keys (version);

-- One feed row per import batch (op 'import', no single key): every key the batch
-- wrote has that row's version.
ALTER TABLE changes ALTER COLUMN key_id DROP NOT NULL, ALTER COLUMN hash DROP NOT NULL;
ALTER TABLE changes DROP CONSTRAINT changes_op_check;
ALTER TABLE changes ADD CONSTRAINT changes_op_check CHECK (op IN ('upsert', 'delete', 'import'));
ALTER TABLE changes ADD CONSTRAINT changes_key_check
    CHECK (CASE WHEN op = 'import' THEN key_id IS NULL AND hash IS NULL
                ELSE key_id IS NOT NULL AND hash IS NOT NULL END);
