-- The admin listing at millions of keys. Every filter has an index in listing order
-- (created_at DESC, id DESC after the filtered column), so a page reads about as many
-- index entries as it returns instead of sorting every match; `q` has a trigram index.

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
    tag            TEXT    NOT NULL,
    key_created_at INTEGER NOT NULL,
    key_id         TEXT    NOT NULL,
    key_status     TEXT    NOT NULL,
    key_owner      TEXT,
    key_plan       TEXT,
    PRIMARY KEY (tag, key_created_at, key_id)
) WITHOUT ROWID;
-- Filled in primary key order, then indexed: far faster than the other way round.
INSERT INTO key_tags (tag, key_created_at, key_id, key_status, key_owner, key_plan)
SELECT DISTINCT tag.value, keys.created_at, keys.id, keys.status, keys.owner, keys.plan
FROM keys, json_each(keys.tags) AS tag
ORDER BY 1, 2, 3;
-- For the triggers, and for joins from a small set of keys (one owner's) to their tags.
CREATE INDEX key_tags_key_idx ON key_tags (key_id);

CREATE TRIGGER keys_tags_insert AFTER INSERT ON keys BEGIN
    INSERT INTO key_tags (tag, key_created_at, key_id, key_status, key_owner, key_plan)
    SELECT DISTINCT value, new.created_at, new.id, new.status, new.owner, new.plan FROM json_each(new.tags);
END;
CREATE TRIGGER keys_tags_update AFTER UPDATE OF tags, status, owner, plan, created_at, id ON keys
WHEN old.tags IS NOT new.tags OR old.status IS NOT new.status OR old.owner IS NOT new.owner
     OR old.plan IS NOT new.plan OR old.created_at IS NOT new.created_at OR old.id IS NOT new.id
BEGIN
    DELETE FROM key_tags WHERE key_id = old.id;
    INSERT INTO key_tags (tag, key_created_at, key_id, key_status, key_owner, key_plan)
    SELECT DISTINCT value, new.created_at, new.id, new.status, new.owner, new.plan FROM json_each(new.tags);
END;
CREATE TRIGGER keys_tags_delete AFTER DELETE ON keys BEGIN
    DELETE FROM key_tags WHERE key_id = old.id;
END;


-- `q`: a case-insensitive substring of name, owner, id or masked, for needles of 3 or more
-- characters. FTS5's trigram tokenizer indexes the four columns of `keys` (external
-- content, by rowid: VACUUM keeps the rowids of a table with indexes); the listing asks it
-- for candidates and then checks each field (the exact answer). Shorter needles scan.
CREATE VIRTUAL TABLE keys_search USING fts5(
    name, owner, id, masked, content = 'keys', content_rowid = 'rowid', tokenize = 'trigram'
);
CREATE TRIGGER keys_search_insert AFTER INSERT ON keys BEGIN
    INSERT INTO keys_search (rowid, name, owner, id, masked) VALUES (new.rowid, new.name, new.owner, new.id, new.masked);
END;
CREATE TRIGGER keys_search_update AFTER UPDATE OF name, owner, id, masked ON keys
WHEN old.name IS NOT new.name OR old.owner IS NOT new.owner OR old.id IS NOT new.id OR old.masked IS NOT new.masked
BEGIN
    INSERT INTO keys_search (keys_search, rowid, name, owner, id, masked)
    VALUES ('delete', old.rowid, old.name, old.owner, old.id, old.masked);
    INSERT INTO keys_search (rowid, name, owner, id, masked) VALUES (new.rowid, new.name, new.owner, new.id, new.masked);
END;
CREATE TRIGGER keys_search_delete AFTER DELETE ON keys BEGIN
    INSERT INTO keys_search (keys_search, rowid, name, owner, id, masked)
    VALUES ('delete', old.rowid, old.name, old.owner, old.id, old.masked);
END;
INSERT INTO keys_search (keys_search) VALUES ('rebuild');
