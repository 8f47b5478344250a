-- The admin listing at millions of keys. Every filter has an index in listing order
-- (created_at DESC, id DESC after the filtered column), so a page reads about as many
-- index entries as it returns instead of sorting every match; `q` has a trigram index.
-- Indexes are built after their tables are filled, with at least 256 MB to sort in.

SELECT set_config('maintenance_work_mem', '256MB', true)
WHERE pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes('256MB');

CREATE INDEX keys_owner_created_idx ON keys (owner, created_at DESC, id DESC);
-- The new index serves lookups by owner alone as well.
DROP INDEX keys_owner_idx;
CREATE INDEX keys_status_created_idx ON keys (status, created_at DESC, id DESC);
CREATE INDEX keys_plan_created_idx ON keys (plan, created_at DESC, id DESC);

-- One row per distinct tag of a key, in listing order: `tag=` walks this table's primary
-- key and joins only the keys of the page. The key's status, owner and plan ride along, so
-- a tag with other filters skips non-matching keys inside this index. Triggers keep it in
-- step with keys inside the transaction that writes the key, whoever writes it (the admin
-- API, a bulk import, SQL by hand).
CREATE TABLE key_tags (
    tag            TEXT COLLATE "C" NOT NULL,
    key_created_at BIGINT NOT NULL,
    key_id         TEXT COLLATE "C" NOT NULL,
    key_status     TEXT NOT NULL,
    key_owner      TEXT,
    key_plan       TEXT
);
INSERT INTO key_tags (tag, key_created_at, key_id, key_status, key_owner, key_plan)
SELECT DISTINCT tag, created_at, id, status, owner, plan FROM keys, jsonb_array_elements_text(keys.tags::jsonb) AS tag;
ALTER TABLE key_tags ADD PRIMARY KEY (tag, key_created_at, key_id) INCLUDE (key_status, key_owner, key_plan);
-- For the triggers, and for joins from a small set of keys (one owner's) to their tags.
CREATE INDEX key_tags_key_idx ON key_tags (key_id);

CREATE FUNCTION key_tags_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        DELETE FROM key_tags WHERE key_id = OLD.id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO key_tags (tag, key_created_at, key_id, key_status, key_owner, key_plan)
        SELECT DISTINCT tag, NEW.created_at, NEW.id, NEW.status, NEW.owner, NEW.plan
        FROM jsonb_array_elements_text(NEW.tags::jsonb) AS tag;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER keys_tags_insert AFTER INSERT ON keys
    FOR EACH ROW EXECUTE FUNCTION key_tags_sync();
CREATE TRIGGER keys_tags_update AFTER UPDATE OF tags, status, owner, plan, created_at, id ON keys
    FOR EACH ROW
    WHEN (OLD.tags IS DISTINCT FROM NEW.tags OR OLD.status IS DISTINCT FROM NEW.status
          OR OLD.owner IS DISTINCT FROM NEW.owner OR OLD.plan IS DISTINCT FROM NEW.plan
          OR OLD.created_at IS DISTINCT FROM NEW.created_at OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION key_tags_sync();
CREATE TRIGGER keys_tags_delete AFTER DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION key_tags_sync();

-- `q`: a case-insensitive substring of name, owner, id or masked. The four fields joined
-- by chr(1), which the listing never searches for through this index, so a match in the
-- joined text is a match within one field; pg_trgm's index answers LIKE on it. pg_trgm is
-- a trusted extension (PostgreSQL 13+): the database's owner may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX keys_search_idx ON keys USING gin (
    lower(name || chr(1) || COALESCE(owner, '') || chr(1) || (id COLLATE "default") || chr(1) || masked) gin_trgm_ops
);

-- Fresh statistics for the new indexes' expressions and tables, so the planner picks them
-- from the first listing on.
ANALYZE keys;
ANALYZE key_tags;
